//! The one crate of ferry that contains `unsafe` code.
//!
//! Everything here is a thin, checked wrapper: guest memory mappings and their
//! registration with KVM, fast copies in and out of guest RAM, the dirty log,
//! and the few vCPU ioctls that kvm-ioctls marks unsafe. Every other crate of
//! the workspace forbids `unsafe` and goes through these functions.

pub mod fd;
pub mod host;
pub mod memory;
pub mod tap;
pub mod uffd;
pub mod vcpu;

pub use memory::{Backing, GuestRam, GuestRom, MemoryError, RomError, PAGE_SIZE, ROM_SLOT};
pub use uffd::{PageFault, Placed, UffdError, Userfault};
pub use vcpu::{install_kick_handler, kick, kick_signal, set_xsave, KickError};
