//! Human and machine output. Humans get aligned lines and, on a terminal, a
//! progress bar on stderr; scripts (`--json`) get one JSON object per result
//! or one JSON line per event on stdout.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::checks::{CheckReport, Status};
use crate::job::JobSnapshot;

/// Writes one JSON value as a line on stdout.
pub fn json_line<T: Serialize>(value: &T) {
    let line = serde_json::to_string(value)
        .unwrap_or_else(|e| json!({"event": "error", "error": e.to_string()}).to_string());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The pre-flight report, as text lines.
pub fn report_text(r: &CheckReport) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "ferry check {}{}{}\n",
        r.domain,
        r.source
            .as_deref()
            .map(|u| format!(" on {u}"))
            .unwrap_or_default(),
        r.destination
            .as_deref()
            .map(|u| format!(" -> {u}"))
            .unwrap_or_default()
    ));
    for c in &r.checks {
        let tag = match c.status {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        };
        s.push_str(&format!("{tag}  {:<24} {}\n", c.id, c.message));
        if let Some(fix) = &c.fix {
            s.push_str(&format!("      {:<24} fix: {fix}\n", ""));
        }
    }
    let failed = r.failures().count();
    if failed > 0 {
        s.push_str(&format!(
            "BLOCKED: {failed} check{} failed; the domain was not touched\n",
            if failed == 1 { "" } else { "s" }
        ));
    } else {
        let skipped = r.checks.iter().filter(|c| c.status == Status::Skip).count();
        s.push_str(&format!(
            "OK: {} checks passed, {skipped} skipped\n",
            r.checks.len() - skipped
        ));
    }
    s
}

pub fn print_report(r: &CheckReport, json: bool) {
    if json {
        json_line(r);
    } else {
        print!("{}", report_text(r));
    }
}

/// Job statistics for `ferry status` and the end of `ferry migrate`.
pub fn job_text(domain: &str, s: &JobSnapshot) -> String {
    let mut t = format!("{domain}: job {}", s.state());
    if let Some(op) = s.operation_name() {
        t.push_str(&format!(" ({op})"));
    }
    let summary = s.summary();
    if !summary.is_empty() {
        t.push_str(&format!("\n  {summary}"));
    }
    if let (Some(p), Some(total)) = (s.data_processed, s.data_total) {
        t.push_str(&format!(
            "\n  data processed {} of {}",
            crate::job::mib(p),
            crate::job::mib(total)
        ));
    }
    if let Some(e) = &s.error_message {
        t.push_str(&format!("\n  error: {e}"));
    }
    t
}

pub fn print_job(domain: &str, s: &JobSnapshot, json: bool) {
    if json {
        json_line(&json!({"domain": domain, "state": s.state(),
                          "operation": s.operation_name(), "stats": s}));
    } else {
        println!("{}", job_text(domain, s));
    }
}

/// Whether a plain (not a TTY) progress line is due: the first one, then one
/// per pass; where libvirt reports no pass, one per [`PLAIN_INTERVAL`].
fn plain_line_due(last: Option<(Option<u64>, Instant)>, pass: Option<u64>) -> bool {
    match (last, pass) {
        (None, _) => true,
        (Some((before, _)), Some(now)) => before != Some(now),
        (Some((_, at)), None) => at.elapsed() >= PLAIN_INTERVAL * 10,
    }
}

/// Progress of a running migration.
#[derive(Debug)]
pub struct Progress {
    json: bool,
    tty: bool,
    /// The pass (and when) the last plain line was printed for.
    last_line: Option<(Option<u64>, Instant)>,
    drawn: bool,
}

const BAR_WIDTH: usize = 30;
const PLAIN_INTERVAL: Duration = Duration::from_secs(1);

impl Progress {
    pub fn new(json: bool) -> Self {
        Progress {
            json,
            tty: std::io::stderr().is_terminal(),
            last_line: None,
            drawn: false,
        }
    }

    /// A named step (`checks`, `migrating`...), for JSON consumers.
    pub fn event(&mut self, event: &str, extra: serde_json::Value) {
        if self.json {
            let mut v = json!({"event": event});
            if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
                o.extend(e);
            }
            json_line(&v);
        }
    }

    pub fn update(&mut self, s: &JobSnapshot) {
        if s.state() != "running" {
            return;
        }
        if self.json {
            json_line(&json!({"event": "progress", "stats": s}));
        } else if self.tty {
            let frac = s.fraction().unwrap_or(0.0);
            let filled = ((frac * BAR_WIDTH as f64).round() as usize).min(BAR_WIDTH);
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r\x1b[K[{}{}] {}",
                "#".repeat(filled),
                "-".repeat(BAR_WIDTH - filled),
                s.summary()
            );
            let _ = err.flush();
            self.drawn = true;
        } else if plain_line_due(self.last_line, s.mem_iteration) {
            // Into a log: a line per pass, not a bar redrawn hundreds of times.
            eprintln!("migrating: {}", s.summary());
            self.last_line = Some((s.mem_iteration, Instant::now()));
        }
    }

    /// Ends the bar line so that later output starts on a fresh line.
    pub fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_progress_is_a_line_per_pass() {
        let now = Instant::now();
        assert!(plain_line_due(None, Some(1)));
        assert!(!plain_line_due(Some((Some(1), now)), Some(1)));
        assert!(plain_line_due(Some((Some(1), now)), Some(2)));
        assert!(!plain_line_due(Some((None, now)), None));
    }
    use crate::checks::Check;

    #[test]
    fn report_lines_name_status_rule_and_fix() {
        let r = CheckReport::new(
            "g",
            Some("qemu:///system".into()),
            Some("qemu+tcp://hostb/system".into()),
            vec![Check {
                id: "host-device",
                status: Status::Fail,
                device: Some("usb host device 0x1d6b:0x0002".into()),
                message: "bad".into(),
                fix: Some("detach it".into()),
            }],
        );
        let t = report_text(&r);
        assert!(t.starts_with("ferry check g on qemu:///system -> qemu+tcp://hostb/system\n"));
        assert!(t.contains("FAIL  host-device"));
        assert!(t.contains("fix: detach it"));
        assert!(t.contains("BLOCKED: 1 check failed"));
    }
}
