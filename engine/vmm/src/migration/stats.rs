//! Migration statistics in the shape of QEMU's `query-migrate`.

use serde::Serialize;

/// QEMU's MigrationStatus values that ferry goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    #[default]
    None,
    Setup,
    Active,
    PreSwitchover,
    Device,
    /// The destination runs the VM; the rest of RAM follows (post-copy).
    PostcopyActive,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
}

impl MigrationStatus {
    /// Every status, in QAPI's order.
    pub const ALL: [Self; 10] = [
        Self::None,
        Self::Setup,
        Self::Active,
        Self::PreSwitchover,
        Self::Device,
        Self::PostcopyActive,
        Self::Completed,
        Self::Failed,
        Self::Cancelling,
        Self::Cancelled,
    ];

    /// Parses the name QMP uses.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// Whether a migration in this status has not ended yet.
    pub fn in_progress(self) -> bool {
        matches!(
            self,
            Self::Setup
                | Self::Active
                | Self::PreSwitchover
                | Self::Device
                | Self::PostcopyActive
                | Self::Cancelling
        )
    }

    /// The name QMP uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Active => "active",
            Self::PreSwitchover => "pre-switchover",
            Self::Device => "device",
            Self::PostcopyActive => "postcopy-active",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }
}

/// RAM counters, as QEMU's `ram` object.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes put on the wire for RAM (headers included).
    pub transferred: u64,
    /// Bytes still dirty.
    pub remaining: u64,
    /// Guest RAM size.
    pub total: u64,
    /// Pages sent as zero flags.
    pub duplicate: u64,
    /// Pages sent with data.
    pub normal: u64,
    pub normal_bytes: u64,
    /// Pages dirtied per second in the last pass.
    pub dirty_pages_rate: u64,
    /// Throughput of the last pass, megabits/s.
    pub mbps: f64,
    pub dirty_sync_count: u64,
    pub pages_per_second: u64,
    pub page_size: u64,
}

/// Everything `query-migrate` reports, plus ferry's own figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStats {
    pub status: MigrationStatus,
    /// Milliseconds since the migration started (final once completed).
    pub total_time: u64,
    pub setup_time: u64,
    /// Milliseconds the vCPUs were stopped for the switch-over.
    pub downtime: u64,
    pub expected_downtime: u64,
    pub ram: RamStats,
    pub cpu_throttle_percentage: u8,
    /// Microseconds each vCPU naps per throttle cycle once the dirty limit took
    /// the throttle past `max-cpu-throttle` (QEMU 8.1's name); 0 before that.
    pub dirty_limit_throttle_time_per_round: u64,
    /// Passes over memory so far.
    pub passes: u64,
    /// Page streams (connections) in use: the multifd channels the destination
    /// accepted, 1 without them.
    pub streams: u32,
    /// Bytes of vCPU and device state sent at switch-over.
    pub device_state_bytes: u64,
    /// Whether KVM's manual dirty-log protection was used (KVM_CLEAR_DIRTY_LOG right
    /// before pages are read); false: the classic log, reset by every read.
    pub manual_dirty_protect: bool,
    /// Microseconds spent reading the dirty log (KVM_GET_DIRTY_LOG), all passes.
    pub dirty_sync_us: u64,
    /// Microseconds spent in KVM_CLEAR_DIRTY_LOG, all passes and streams.
    pub dirty_clear_us: u64,
    /// Milliseconds spent computing and checking the RAM digest (0 if off).
    pub digest_ms: u64,
    /// Switch-overs that would have overrun the downtime limit and went back
    /// to pre-copy with the guest running.
    pub switchover_returns: u32,
    /// Pages the destination asked for while post-copy ran (QEMU's
    /// `postcopy-requests`).
    pub postcopy_requests: u64,
    /// Bytes sent after the switch to post-copy (QEMU's `ram.postcopy-bytes`).
    pub postcopy_bytes: u64,
    /// Why it failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
}
