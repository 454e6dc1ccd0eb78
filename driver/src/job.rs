//! A snapshot of a libvirt job (virDomainGetJobStats) and how it is shown.

use serde::Serialize;

/// libvirt's job statistics, in ferry's words. Sizes in bytes, times in ms.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct JobSnapshot {
    /// virDomainJobType: 0 none, 1 bounded, 2 unbounded, 3 completed, 4 failed, 5 cancelled.
    #[serde(skip)]
    pub job_type: i32,
    /// virDomainJobOperation: 4 outgoing migration, 3 incoming migration...
    #[serde(skip)]
    pub operation: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_elapsed_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_remaining_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_total: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_processed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_remaining: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem_total: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem_processed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem_remaining: Option<u64>,
    /// Transfer rate, bytes/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem_bps: Option<u64>,
    /// Pages/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem_dirty_rate: Option<u64>,
    /// Pre-copy pass number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem_iteration: Option<u64>,
    /// Expected downtime while running, real downtime when completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_time_ms: Option<u64>,
    /// vCPU throttle percentage (auto-converge).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_converge_throttle: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

impl JobSnapshot {
    /// `none`, `running`, `completed`, `failed`, `cancelled`.
    pub fn state(&self) -> &'static str {
        match self.job_type {
            0 => "none",
            1 | 2 => "running",
            3 => "completed",
            4 => "failed",
            5 => "cancelled",
            _ => "unknown",
        }
    }

    pub fn operation_name(&self) -> Option<&'static str> {
        Some(match self.operation? {
            1 => "start",
            2 => "save",
            3 => "restore",
            4 => "incoming migration",
            5 => "outgoing migration",
            6 => "snapshot",
            7 => "snapshot revert",
            8 => "dump",
            9 => "backup",
            _ => "other",
        })
    }

    /// Fraction of the data sent so far, 0.0..=1.0.
    pub fn fraction(&self) -> Option<f64> {
        let total = self.data_total.filter(|t| *t > 0)?;
        let done = match (self.data_processed, self.data_remaining) {
            (_, Some(rem)) => total.saturating_sub(rem),
            (Some(p), None) => p,
            _ => return None,
        };
        Some((done as f64 / total as f64).clamp(0.0, 1.0))
    }

    /// One human line: pass, remaining, rate, expected downtime, throttle.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(f) = self.fraction() {
            parts.push(format!("{:3.0}%", f * 100.0));
        }
        if let Some(i) = self.mem_iteration {
            parts.push(format!("pass {i}"));
        }
        if let Some(r) = self.data_remaining {
            parts.push(format!("remaining {}", mib(r)));
        }
        if let Some(b) = self.mem_bps {
            parts.push(format!("rate {}/s", mib(b)));
        }
        if let Some(d) = self.downtime_ms {
            let what = if self.state() == "running" {
                "expected downtime"
            } else {
                "downtime"
            };
            parts.push(format!("{what} {d} ms"));
        }
        if let Some(t) = self.auto_converge_throttle {
            parts.push(format!("throttle {t}%"));
        }
        if let Some(t) = self.time_elapsed_ms {
            parts.push(format!("elapsed {t} ms"));
        }
        parts.join("  ")
    }
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_job_summary() {
        let s = JobSnapshot {
            job_type: 2,
            data_total: Some(256 << 20),
            data_remaining: Some(64 << 20),
            mem_bps: Some(10 << 20),
            mem_iteration: Some(2),
            downtime_ms: Some(300),
            auto_converge_throttle: Some(20),
            ..Default::default()
        };
        assert_eq!(s.state(), "running");
        assert_eq!(s.fraction(), Some(0.75));
        assert_eq!(
            s.summary(),
            " 75%  pass 2  remaining 64.0 MiB  rate 10.0 MiB/s  expected downtime 300 ms  throttle 20%"
        );
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["data_remaining"], 64 << 20);
        assert!(v.get("error_message").is_none());
    }
}
