//! ferry's x86_64 boot paths.
//!
//! This crate puts a kernel, an optional initrd and the kernel command line
//! into guest memory and computes the initial vCPU state, without touching
//! KVM: it writes through vm-memory's safe API and returns plain kvm-bindings
//! structs that the VMM applies with its own ioctls.
//!
//! Three kinds of kernel image boot:
//! - an ELF with a Xen `XEN_ELFNOTE_PHYS32_ENTRY` note boots through **PVH**:
//!   32-bit protected mode, paging off, `EBX` = `hvm_start_info`;
//! - an ELF without that note (a plain `vmlinux`) and
//! - a **bzImage** (setup header magic `HdrS` at 0x202) boot through the
//!   **Linux 64-bit boot protocol**: long mode, identity-mapped first GiB,
//!   `RSI` = `boot_params`.
//!
//! Typical use by the VMM:
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use ferry_boot::{boot_fpu, boot_regs, boot_sregs, load_kernel, MemoryLayout};
//! use vm_memory::GuestMemoryMmap;
//!
//! let layout = MemoryLayout::new(512 << 20)?;
//! let ranges: Vec<_> = layout
//!     .ranges()
//!     .into_iter()
//!     .map(|(start, len)| (start, len as usize))
//!     .collect();
//! let mem = GuestMemoryMmap::<()>::from_ranges(&ranges)?;
//! let mut kernel = std::fs::File::open("bzImage")?;
//! let mut initrd = std::fs::File::open("initrd.img")?;
//! let info = load_kernel(&mem, &layout, &mut kernel, Some(&mut initrd), "console=ttyS0")?;
//! let regs = boot_regs(&info);
//! let mut sregs = kvm_bindings::kvm_sregs::default(); // really: vcpu.get_sregs()
//! boot_sregs(&info, &mem, &mut sregs)?;
//! let fpu = boot_fpu();
//! # let _ = (regs, fpu);
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

mod acpi;
mod error;
mod extract;
mod layout;
mod loader;
mod mptable;
mod regs;
mod smbios;

pub use acpi::*;
pub use error::BootError;
pub use extract::extract_vmlinux;
pub use layout::*;
pub use loader::{load_kernel, BootInfo, BootProtocol, ReadSeek};
pub use mptable::{mptable, write_mptable, MPTABLE_MAX_CPUS, MPTABLE_START, MP_CONFIG_START};
pub use regs::{boot_fpu, boot_regs, boot_sregs};
pub use smbios::*;

#[cfg(test)]
mod testutil;
