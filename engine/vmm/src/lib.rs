//! ferry's VMM: a small KVM virtual machine monitor with checkpoint/restore, the
//! library under the `ferry-vm` and `ferry-qemu` binaries.

pub mod cli;
pub mod control;
pub mod cpu;
pub mod devices;
pub mod dirty_rate;
pub mod firmware;
pub mod migration;
pub mod persist;
pub mod private_file;
pub mod throttle;
pub mod vcpu;
pub mod vm;

pub use cli::Cli;
pub use vcpu::GuestExit;
pub use vm::{KernelConfig, Vm, VmConfig, VmShape};

/// Errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0}")]
    NoKvm(String),
    #[error("{0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] ferry_kvm::MemoryError),
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("cannot boot: {0}")]
    Boot(String),
    #[error("cannot restore: {0}")]
    Restore(String),
    #[error("cannot restore: {0}")]
    Mismatch(#[from] vm::ShapeMismatch),
    /// A stream (checkpoint or migration) was refused while it was read.
    #[error("cannot restore: {0}")]
    Load(#[from] persist::LoadError),
    /// A device refused its saved state.
    #[error("cannot restore: {0}")]
    DeviceState(#[from] devices::DeviceStateError),
    /// A disk image cannot be opened as configured.
    #[error("invalid VM configuration: {0}")]
    DiskOpen(#[source] devices::virtio::DeviceDiskError),
    /// The IDE drives' configuration is refused, or a drive cannot open.
    #[error("invalid VM configuration: {0}")]
    Ide(#[source] devices::ide::IdeError),
    /// A NIC's tap cannot be opened or set up.
    #[error("invalid VM configuration: {id}: {source}")]
    Net {
        id: String,
        #[source]
        source: devices::virtio::net::NetError,
    },
    /// A virtio-rng configuration is refused or its source cannot open.
    #[error("invalid VM configuration: {id}: {source}")]
    Rng {
        id: String,
        #[source]
        source: devices::virtio::rng::RngError,
    },
    /// A device thread could not start.
    #[error("{0}")]
    Workers(#[source] devices::virtio::WorkerError),
    /// A disk image is locked by another VM or QEMU (or cannot be locked).
    #[error("{0}")]
    DiskLock(#[source] devices::virtio::DeviceDiskError),
    /// A disk could not make the guest's writes durable (before a
    /// switch-over or a checkpoint).
    #[error("{0}")]
    DiskFlush(#[source] devices::virtio::DeviceDiskError),
    #[error(transparent)]
    Format(#[from] ferry_format::FormatError),
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    #[error("vCPU {0} thread has exited")]
    VcpuGone(u32),
    /// A control-socket command was malformed or unknown (the text says how
    /// to write it).
    #[error("{0}")]
    Command(String),
    #[error(transparent)]
    DirtyRate(#[from] dirty_rate::DirtyRateError),
    #[error(transparent)]
    Firmware(firmware::FirmwareError),
    /// The migration thread panicked with the VM (an engine bug).
    #[error("the migration thread panicked: the VM is lost")]
    MigrationLost,
    #[error("the VM has no balloon device")]
    NoBalloon,
    /// The host asked the balloon for something it refuses.
    #[error("{0}")]
    Balloon(#[source] devices::virtio::balloon::BalloonError),
    #[error(
        "cannot restore: this host's KVM cannot load MSRs of vCPU {vcpu} that the guest can \
         read: {}; start the guest with a CPU model both hosts run (ferry-vm --cpu qemu64; \
         libvirt's <cpu mode='custom'><model>qemu64</model></cpu>) or move it to a host whose \
         kernel has these MSRs",
        .refused.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    MsrsRefused {
        vcpu: u32,
        refused: Vec<cpu::msrs::RefusedMsr>,
    },
}

/// An error and its sources, once each: "cannot open x: No such file or directory".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        src = s.source();
    }
    msg
}
