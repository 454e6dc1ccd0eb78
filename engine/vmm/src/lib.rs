//! ferry's VMM: a small KVM virtual machine monitor with checkpoint/restore, the
//! library under the `ferry-vm` and `ferry-qemu` binaries.

pub mod checkpoint;
pub mod cli;
pub mod control;
pub mod cpu;
pub mod devices;
pub mod migration;
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
    #[error(transparent)]
    Format(#[from] ferry_format::FormatError),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("vCPU {0} thread has exited")]
    VcpuGone(u32),
}
