//! Emulated devices. Each device owns its `XState` DTO in `persist.rs`.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

pub mod acpi_pm;
pub mod disk_image;
pub mod fw_cfg;
pub mod i8042;
pub mod ide;
pub mod image_lock;
pub mod pci;
pub mod rtc;
pub mod serial;
pub mod virtio;

/// An open file, pipe or socket this process was handed (libvirt's
/// `-add-fd`), shared by every device built on it: each build writes to a
/// duplicate ([`SharedFd::dup`]), never to a reopen by path. A reopen through
/// `/proc/self/fd/N` checks the file's permissions again, and the emulator's
/// user (libvirt's `libvirt-qemu`) may not pass them for a file libvirt or
/// virtlogd opened for it. Equal only to itself.
#[derive(Debug, Clone)]
pub struct SharedFd(Arc<OwnedFd>);

impl SharedFd {
    pub fn new(fd: OwnedFd) -> Self {
        Self(Arc::new(fd))
    }

    /// A new descriptor for the same open file (`dup`): same access mode,
    /// flags and offset.
    pub fn dup(&self) -> io::Result<File> {
        self.0.try_clone().map(File::from)
    }
}

impl From<OwnedFd> for SharedFd {
    fn from(fd: OwnedFd) -> Self {
        Self::new(fd)
    }
}

impl AsFd for SharedFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl PartialEq for SharedFd {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SharedFd {}
