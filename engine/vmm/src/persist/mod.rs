//! Persistence of a VM as a ferry stream: the layer between the VM and its
//! migration. A checkpoint is a paused VM written as a stream (a migration into a
//! file); a restore builds a new VM from one. Migration sends and receives the
//! same sections over the network with this module's writer and reader.
//!
//! Order in the stream: Shape, RAM pages (zero pages are not stored: a new VM's RAM is
//! zero), vCPUs, VM state, devices, [Digest], End. A restore validates every section
//! before the VM runs; a stream that fails anywhere leaves a VM that never ran and is
//! dropped.
//!
//! Layers, each importing only from those below it: kvm, format, then the VM
//! (`vm`, `vcpu`, `cpu`, `devices`), then this module, then `migration`.

mod digest;
mod load;
mod save;
mod shape;

use serde::{Deserialize, Serialize};

use ferry_kvm::Backing;

use crate::devices::serial::SinkSpec;
use crate::vm::VmShape;

pub use crate::vm::ShapeMismatch;
pub use digest::ram_digest;
pub use load::{build, read_offer, restore, LoadError};
pub(crate) use load::{finish, prefault, read_main, write_page, Frontier, MainSections};
pub use save::{save, write_ram, write_state, CheckpointStats};
pub(crate) use shape::check_inside;
pub use shape::{check_shape, MAX_RAM_RANGES};

/// The producer string written into every stream.
pub fn producer() -> String {
    format!("ferry {}", env!("CARGO_PKG_VERSION"))
}

/// What the first section of a ferry stream carries: the VM's shape and what the
/// sender will do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handshake {
    pub shape: VmShape,
    /// The sender will send a Digest section before End.
    #[serde(default)]
    pub digest: bool,
    /// Page streams the sender proposes (0 or 1: only this connection). Left out
    /// of a one-stream handshake, which stays as it was before page streams.
    #[serde(default, skip_serializing_if = "one_stream")]
    pub streams: u32,
    /// Random token that extra streams present in their Join section (0 when
    /// `streams` ≤ 1).
    #[serde(default, skip_serializing_if = "no_session")]
    pub session: u64,
    /// The sender may switch to post-copy: the receiver must be able to run the
    /// VM with pages missing, or refuse now. Left out when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub postcopy: bool,
}

fn one_stream(streams: &u32) -> bool {
    *streams <= 1
}

fn no_session(session: &u64) -> bool {
    *session == 0
}

/// The first section (Join) of an extra page stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamJoin {
    /// The handshake's session token.
    pub session: u64,
    /// Which stream this is, 1..streams (0 is the main connection).
    pub index: u32,
    /// The number of streams agreed on, the main connection included.
    pub streams: u32,
}

/// Options for building a VM from a stream: a checkpoint's, or a migration's on
/// its destination.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub backing: Backing,
    pub serial: SinkSpec,
    /// When set, the stream's RAM size must equal this (the user's `-m`).
    /// `migration::serve` demands it: a destination on the network builds the VM
    /// it was configured for, never one a stream asks for.
    pub expect_mem_bytes: Option<u64>,
    /// When set, the stream's vCPU count must equal this (the user's `-smp`);
    /// `migration::serve` demands it too.
    pub expect_vcpus: Option<u32>,
    /// Resume the VM once loaded (otherwise it stays paused, like QEMU with `-S`).
    pub autostart: bool,
    /// This host's virtio devices; they must match the checkpoint's.
    pub virtio: Vec<crate::vm::VirtioSpec>,
    /// This host's IDE drives; they must match the checkpoint's.
    pub ide: Vec<crate::devices::ide::IdeDriveConfig>,
    /// This host's fw_cfg; it must match the checkpoint's.
    pub fw_cfg: Option<crate::devices::fw_cfg::FwCfgConfig>,
    /// This host's firmware; the checkpoint's ROM replaces it, of the same size.
    pub firmware: Option<crate::firmware::FirmwareConfig>,
    /// This host's RTC; the checkpoint must have one exactly when this
    /// does (its clock and CMOS come from the checkpoint).
    pub rtc: Option<crate::devices::rtc::RtcConfig>,
    /// A migration's destination in post-copy runs the VM before all of its
    /// RAM came: this is called then, with a hold on its vCPUs. Without
    /// `autostart` the vCPUs run held (the front-end releases them, QEMU's
    /// `cont`); the VM itself comes back once every page came.
    pub on_postcopy: Option<PostcopyHook>,
}

/// See [`RestoreOptions::on_postcopy`].
#[derive(Clone)]
pub struct PostcopyHook(pub std::sync::Arc<dyn Fn(crate::throttle::VcpuHold) + Send + Sync>);

impl std::fmt::Debug for PostcopyHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostcopyHook")
    }
}
