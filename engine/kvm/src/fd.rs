//! Adopting file descriptors this process did not open itself: inherited at
//! exec (`-chardev socket,fd=N`, `-add-fd fd=N`, `-incoming fd:N`) or received
//! with SCM_RIGHTS (`getfd`, `add-fd`). Rust's I/O-safety API needs `unsafe`
//! for that, which is why this module lives in ferry-kvm, the one crate of the
//! workspace with `unsafe` code (see the crate's docs).
//!
//! A number given on a command line or over a monitor is only trusted if it
//! names a descriptor that was open when the process started
//! ([`record_inherited`], called first thing in `main`) and that nothing has
//! claimed since. Anything else (the guest's disk image, a socket this
//! process opened, a number an adopted fd left behind and that was reused)
//! is refused, so a caller cannot make us write into or close our own files.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// Which inherited fds exist and which of them have been handed out.
#[derive(Debug, Default)]
struct Registry {
    /// Fds open at process start, above the standard streams; `None` until
    /// [`record_inherited`] ran (then nothing counts as inherited).
    inherited: Option<BTreeSet<RawFd>>,
    /// Inherited fds already adopted; never shrinks, so a number that an
    /// adopted (and later closed) fd left behind stays refused.
    claimed: BTreeSet<RawFd>,
}

impl Registry {
    /// Claims `fd` if it was inherited and is unclaimed.
    fn claim(&mut self, fd: RawFd) -> io::Result<()> {
        if fd <= 2 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fd {fd} is a standard stream"),
            ));
        }
        if self.claimed.contains(&fd) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("fd {fd} is already in use"),
            ));
        }
        if !self.inherited.as_ref().is_some_and(|s| s.contains(&fd)) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("fd {fd} was not inherited by this process at exec"),
            ));
        }
        self.claimed.insert(fd);
        Ok(())
    }
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    inherited: None,
    claimed: BTreeSet::new(),
});

/// Whether `fd` is an open descriptor of this process.
fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor flags of `fd`; an invalid fd
    // yields -1/EBADF and touches no memory.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// The fds open now above the standard streams, from /proc/self/fd.
fn open_fds() -> io::Result<BTreeSet<RawFd>> {
    let listed: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    // The directory's own fd was listed too; it is closed now (the ReadDir
    // is dropped), so it fails this check, while every inherited fd passes.
    Ok(listed.into_iter().filter(|fd| is_open(*fd)).collect())
}

/// Records the fds this process inherited at exec. Call it first thing in
/// `main`, before anything opens a file or starts a thread; later calls
/// change nothing. Until it ran, [`adopt_inherited`] refuses every fd.
pub fn record_inherited() -> io::Result<()> {
    let fds = open_fds()?;
    let mut reg = REGISTRY
        .lock()
        .map_err(|_| io::Error::other("fd registry poisoned"))?;
    if reg.inherited.is_none() {
        reg.inherited = Some(fds);
    }
    Ok(())
}

/// Takes ownership of inherited fd `fd` and marks it close-on-exec.
///
/// Fails if `fd` is 0–2, was not open when [`record_inherited`] ran (error
/// kind `PermissionDenied`), was adopted already (`AlreadyExists`), or is
/// not open.
pub fn adopt_inherited(fd: RawFd) -> io::Result<OwnedFd> {
    let mut reg = REGISTRY
        .lock()
        .map_err(|_| io::Error::other("fd registry poisoned"))?;
    reg.claim(fd)?;
    // SAFETY: F_GETFD only reads the descriptor flags of `fd`; an invalid fd
    // yields -1/EBADF and touches no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; setting FD_CLOEXEC on an open fd has no memory effects.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is open (F_GETFD succeeded) and was open when the process
    // started, before any Rust object in it existed, so no Rust object owns
    // it; the registry has just recorded it as claimed, and a claim is never
    // given up, so this is its single owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes ownership of fds just received with SCM_RIGHTS.
pub fn adopt_received(fds: &[RawFd]) -> Vec<OwnedFd> {
    fds.iter()
        .filter(|fd| **fd >= 0)
        // SAFETY: the kernel installed these descriptors in this process for
        // this recvmsg call alone; nothing else knows their numbers yet, so
        // each gets exactly one owner here.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn only_unclaimed_inherited_fds_are_adopted() {
        let mut reg = Registry {
            inherited: Some(BTreeSet::from([7, 9])),
            claimed: BTreeSet::new(),
        };
        assert_eq!(
            reg.claim(1).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            reg.claim(8).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied,
            "not inherited"
        );
        reg.claim(7).expect("inherited");
        assert_eq!(
            reg.claim(7).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists,
            "second claim refused"
        );
        // Before the inherited fds are recorded, nothing is adopted.
        let mut empty = Registry::default();
        assert!(empty.claim(7).is_err());
    }

    #[test]
    fn an_fd_this_process_opened_is_refused() {
        // The test harness never calls record_inherited(), and this file is
        // ours in any case: adopting it would give it a second owner.
        let f = tempfile::tempfile().expect("tempfile");
        let e = adopt_inherited(f.as_raw_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(is_open(f.as_raw_fd()), "still open, still ours");
    }

    #[test]
    fn open_fds_lists_this_processs_open_fds() {
        let f = tempfile::tempfile().expect("tempfile");
        let fds = open_fds().expect("/proc/self/fd");
        assert!(fds.contains(&f.as_raw_fd()));
    }
}
