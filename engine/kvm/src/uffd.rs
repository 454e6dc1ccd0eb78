//! userfaultfd over guest RAM: the destination of a post-copy migration runs
//! the guest before all of its RAM arrived, and a touch of a page not there
//! yet (by a vCPU, through KVM, or by a device thread) waits until
//! [`Userfault::copy`] places it.
//!
//! The kernel's ABI (`linux/userfaultfd.h`) is written out here, as small as
//! the missing-page mode needs: the `userfaultfd` crate generates it with
//! bindgen at build time, which needs libclang on every build host.
//!
//! Faults KVM takes on behalf of a vCPU are kernel-mode faults, so the file is
//! opened without `UFFD_USER_MODE_ONLY`. That needs `CAP_SYS_PTRACE` (or the
//! `vm.unprivileged_userfaultfd` sysctl); without it, access to
//! `/dev/userfaultfd` (Linux 6.1+) does as well. [`Userfault::new`] tries the
//! syscall, then the device, and names both causes if neither works.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use crate::memory::{GuestRam, PAGE_SIZE};

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;
/// `uffd_msg.arg.pagefault.feat.ptid` is filled in.
const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// The ioctls a missing-mode registration must offer (`_UFFDIO_COPY`,
/// `_UFFDIO_ZEROPAGE`, `_UFFDIO_WAKE`).
const NEEDED_RANGE_IOCTLS: u64 = (1 << 3) | (1 << 4) | (1 << 2);

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: 32 bytes, packed.
const MSG_SIZE: usize = 32;

vmm_sys_util::ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3f, UffdioApi);
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
vmm_sys_util::ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
vmm_sys_util::ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
vmm_sys_util::ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);

/// Errors of userfaultfd.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error(
        "cannot open a userfaultfd (the userfaultfd syscall: {syscall}; /dev/userfaultfd: \
         {device}): post-copy needs CAP_SYS_PTRACE, the vm.unprivileged_userfaultfd sysctl \
         set to 1, or read-write access to /dev/userfaultfd"
    )]
    Open {
        syscall: io::Error,
        device: io::Error,
    },
    #[error("the kernel refused userfaultfd's API handshake")]
    Api(#[source] io::Error),
    #[error(
        "this kernel's userfaultfd cannot serve missing pages of guest RAM (its ioctls \
         {ioctls:#x} lack COPY, ZEROPAGE or WAKE)"
    )]
    Unsupported { ioctls: u64 },
    #[error("cannot register guest RAM at {gpa:#x} (+{len:#x}) with userfaultfd")]
    Register {
        gpa: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot unregister guest RAM at {gpa:#x} from userfaultfd")]
    Unregister {
        gpa: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot place the page at {gpa:#x}")]
    Place {
        gpa: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot wake the threads waiting on the page at {gpa:#x}")]
    Wake {
        gpa: u64,
        #[source]
        source: io::Error,
    },
    #[error("the page at {gpa:#x} is not a whole page of guest RAM")]
    OutOfRange { gpa: u64 },
    #[error("cannot read a userfaultfd event")]
    Read(#[source] io::Error),
}

/// A touch of a page that is not there yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The page's guest-physical address (page-aligned).
    pub gpa: u64,
    /// The touch was a write.
    pub write: bool,
    /// The thread that waits (its kernel thread id).
    pub thread: u32,
}

/// What placing a page did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The page is there now, and whoever waited on it runs on.
    Now,
    /// It was there already (a page sent twice, or requested and streamed
    /// at once): nothing changed.
    Already,
}

/// A userfaultfd registered over guest RAM in missing-page mode.
#[derive(Debug)]
pub struct Userfault {
    file: File,
}

impl Userfault {
    /// Opens a userfaultfd (non-blocking, close-on-exec) and completes the
    /// API handshake.
    pub fn new() -> Result<Self, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: userfaultfd(2) takes one int of flags and returns a new fd
        // or -1; it reads and writes no memory of ours.
        let rc = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if rc >= 0 {
            // SAFETY: rc is a descriptor the kernel just opened for us and
            // nothing else owns.
            unsafe { OwnedFd::from_raw_fd(rc as i32) }
        } else {
            let syscall = io::Error::last_os_error();
            open_device(flags).map_err(|device| UffdError::Open { syscall, device })?
        };
        let file = File::from(fd);
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_THREAD_ID,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which
        // `UffdioApi` lays out exactly (three u64) and which lives across the call.
        let rc = unsafe { ioctl_with_mut_ref(&file, UFFDIO_API(), &mut api) };
        if rc != 0 {
            return Err(UffdError::Api(io::Error::last_os_error()));
        }
        Ok(Self { file })
    }

    /// Registers every RAM range of `ram`: from now on a touch of a page that
    /// was never written waits for [`Self::copy`] or [`Self::zero`]. Pages
    /// already there are untouched.
    pub fn register(&self, ram: &GuestRam) -> Result<(), UffdError> {
        for (gpa, len, host) in ram.host_slots() {
            let mut reg = UffdioRegister {
                range: UffdioRange {
                    start: host as u64,
                    len,
                },
                mode: UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            // SAFETY: UFFDIO_REGISTER reads and writes one `struct
            // uffdio_register` (`UffdioRegister` lays it out); the range is a
            // live mapping of guest RAM that `ram` owns, and registering only
            // changes how the kernel resolves its missing pages.
            let rc = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_REGISTER(), &mut reg) };
            if rc != 0 {
                return Err(UffdError::Register {
                    gpa,
                    len,
                    source: io::Error::last_os_error(),
                });
            }
            if reg.ioctls & NEEDED_RANGE_IOCTLS != NEEDED_RANGE_IOCTLS {
                return Err(UffdError::Unsupported { ioctls: reg.ioctls });
            }
        }
        Ok(())
    }

    /// Ends missing-page handling over `ram`: a touch of a missing page gets
    /// a zeroed page again, as before [`Self::register`].
    pub fn unregister(&self, ram: &GuestRam) -> Result<(), UffdError> {
        for (gpa, len, host) in ram.host_slots() {
            let range = UffdioRange {
                start: host as u64,
                len,
            };
            // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`; the
            // range is the mapping registered above, still owned by `ram`.
            let rc = unsafe { ioctl_with_ref(&self.file, UFFDIO_UNREGISTER(), &range) };
            if rc != 0 {
                return Err(UffdError::Unregister {
                    gpa,
                    source: io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for the next touch of a missing page.
    pub fn wait(&self, ram: &GuestRam, timeout: Duration) -> Result<Option<PageFault>, UffdError> {
        loop {
            if !poll_in(&self.file, timeout).map_err(UffdError::Read)? {
                return Ok(None);
            }
            let mut msg = [0u8; MSG_SIZE];
            match (&self.file).read(&mut msg) {
                Ok(MSG_SIZE) => {}
                Ok(_) => return Err(UffdError::Read(io::ErrorKind::UnexpectedEof.into())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(UffdError::Read(e)),
            }
            // Other events (fork, remap, remove) are not asked for.
            if msg[0] != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let word = |at: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&msg[at..at + 8]);
                u64::from_ne_bytes(b)
            };
            let flags = word(8);
            let address = word(16) & !(PAGE_SIZE as u64 - 1);
            let mut tid = [0u8; 4];
            tid.copy_from_slice(&msg[24..28]);
            let Some(gpa) = ram.gpa_of_host(address as usize) else {
                continue;
            };
            return Ok(Some(PageFault {
                gpa,
                write: flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                thread: u32::from_ne_bytes(tid),
            }));
        }
    }

    /// Places `page` (one page of bytes) at `gpa` if it is still missing, and
    /// wakes whoever waits on it.
    pub fn copy(&self, ram: &GuestRam, gpa: u64, page: &[u8]) -> Result<Placed, UffdError> {
        if page.len() != PAGE_SIZE {
            return Err(UffdError::OutOfRange { gpa });
        }
        let host = self.page_host(ram, gpa)?;
        let mut arg = UffdioCopy {
            dst: host as u64,
            src: page.as_ptr() as u64,
            len: PAGE_SIZE as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads and writes one `struct uffdio_copy`
        // (`UffdioCopy` lays it out). The kernel copies PAGE_SIZE bytes from
        // `page`, a live buffer of exactly that length, into a page it
        // allocates and maps at `dst`, a page-aligned address inside guest
        // RAM (page_host checked); no Rust reference to guest memory exists.
        let rc = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_COPY(), &mut arg) };
        self.placed(ram, gpa, rc, arg.copy)
    }

    /// Places a zeroed page at `gpa` if it is still missing, and wakes
    /// whoever waits on it (a page the source knows to be zero).
    pub fn zero(&self, ram: &GuestRam, gpa: u64) -> Result<Placed, UffdError> {
        let host = self.page_host(ram, gpa)?;
        let mut arg = UffdioZeropage {
            range: UffdioRange {
                start: host as u64,
                len: PAGE_SIZE as u64,
            },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one `struct
        // uffdio_zeropage`; the range is one page-aligned page of guest RAM.
        let rc = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_ZEROPAGE(), &mut arg) };
        self.placed(ram, gpa, rc, arg.zeropage)
    }

    fn page_host(&self, ram: &GuestRam, gpa: u64) -> Result<usize, UffdError> {
        if gpa % PAGE_SIZE as u64 != 0 {
            return Err(UffdError::OutOfRange { gpa });
        }
        ram.host_address(gpa, PAGE_SIZE)
            .ok_or(UffdError::OutOfRange { gpa })
    }

    /// The result of a COPY or ZEROPAGE: `EEXIST` means the page was there
    /// already. Threads that faulted on it meanwhile are woken then too.
    fn placed(&self, ram: &GuestRam, gpa: u64, rc: i32, done: i64) -> Result<Placed, UffdError> {
        if rc == 0 && done == PAGE_SIZE as i64 {
            return Ok(Placed::Now);
        }
        let err = if rc != 0 {
            io::Error::last_os_error()
        } else {
            io::Error::from_raw_os_error(-done as i32)
        };
        if err.raw_os_error() == Some(libc::EEXIST) {
            self.wake(ram, gpa)?;
            return Ok(Placed::Already);
        }
        Err(UffdError::Place { gpa, source: err })
    }

    fn wake(&self, ram: &GuestRam, gpa: u64) -> Result<(), UffdError> {
        let host = self.page_host(ram, gpa)?;
        let range = UffdioRange {
            start: host as u64,
            len: PAGE_SIZE as u64,
        };
        // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range`: one page of
        // guest RAM; waking changes no memory.
        let rc = unsafe { ioctl_with_ref(&self.file, UFFDIO_WAKE(), &range) };
        if rc != 0 {
            return Err(UffdError::Wake {
                gpa,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl AsFd for Userfault {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Opens a userfaultfd through `/dev/userfaultfd` (USERFAULTFD_IOC_NEW).
fn open_device(flags: i32) -> io::Result<OwnedFd> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns a new
    // descriptor or -1; it touches no memory of ours.
    let rc = unsafe { ioctl_with_val(&dev, USERFAULTFD_IOC_NEW(), flags as libc::c_ulong) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: rc is a descriptor the kernel just opened for us.
    Ok(unsafe { OwnedFd::from_raw_fd(rc) })
}

/// Whether `fd` became readable within `timeout` (poll(2); this crate keeps
/// to libc).
fn poll_in(fd: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: one pollfd, which lives across the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc >= 0 {
            return Ok(rc > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl AsRawFd for Userfault {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Backing;
    use std::sync::Arc;

    /// A thread touching a missing page waits until the page is placed, and
    /// reads what was placed; a page placed twice is refused as already there.
    #[test]
    fn a_touch_of_a_missing_page_waits_for_its_copy() {
        let uffd = match Userfault::new() {
            Ok(u) => u,
            Err(e) => panic!("userfaultfd is needed on this host: {e}"),
        };
        let ram = Arc::new(GuestRam::new(&[(0, 4 << 20)], Backing::Anonymous).expect("ram"));
        // A page written before registering is there: no fault for it.
        ram.write(0x1000, b"early").expect("write");
        uffd.register(&ram).expect("register");
        let reader = {
            let ram = Arc::clone(&ram);
            std::thread::spawn(move || {
                let mut got = [0u8; 6];
                ram.read(0x20_3000, &mut got).expect("read");
                let mut early = [0u8; 5];
                ram.read(0x1000, &mut early).expect("read");
                (got, early)
            })
        };
        let fault = uffd
            .wait(&ram, Duration::from_secs(30))
            .expect("wait")
            .expect("the reader faults on the missing page");
        assert_eq!(fault.gpa, 0x20_3000);
        assert!(!fault.write);
        assert_ne!(fault.thread, 0, "the thread id is reported");
        let mut page = vec![0u8; PAGE_SIZE];
        page[..6].copy_from_slice(b"served");
        assert_eq!(
            uffd.copy(&ram, fault.gpa, &page).expect("copy"),
            Placed::Now
        );
        let (got, early) = reader.join().expect("reader");
        assert_eq!(&got, b"served");
        assert_eq!(&early, b"early");
        assert_eq!(
            uffd.copy(&ram, fault.gpa, &page).expect("again"),
            Placed::Already
        );
        assert_eq!(uffd.zero(&ram, 0x30_0000).expect("zero"), Placed::Now);
        assert!(ram.is_zero_page(0x30_0000).expect("zero page"));
        assert!(matches!(
            uffd.copy(&ram, 0x40_0000, &page),
            Err(UffdError::OutOfRange { .. })
        ));
        assert!(uffd
            .wait(&ram, Duration::from_millis(10))
            .expect("wait")
            .is_none());
        uffd.unregister(&ram).expect("unregister");
        let mut fresh = [1u8; 4];
        ram.read(0x10_0000, &mut fresh)
            .expect("read after unregister");
        assert_eq!(fresh, [0; 4]);
    }
}
