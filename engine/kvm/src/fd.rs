//! Adopting file descriptors this process did not open itself: inherited at
//! exec (`-chardev socket,fd=N`, `-add-fd fd=N`, `-incoming fd:N`) or received
//! with SCM_RIGHTS (`getfd`, `add-fd`). Rust's I/O-safety API needs `unsafe`
//! for that; it is confined to this module (the crate denies `unsafe_code`
//! everywhere else).

use std::collections::HashSet;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// Inherited fds already adopted; adopting one twice would double-close it.
static ADOPTED: Mutex<Option<HashSet<RawFd>>> = Mutex::new(None);

/// Takes ownership of inherited fd `fd` and marks it close-on-exec.
///
/// Fails if `fd` is not open, is 0–2, or was adopted already.
pub fn adopt_inherited(fd: RawFd) -> io::Result<OwnedFd> {
    if fd <= 2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} is a standard stream"),
        ));
    }
    let mut guard = ADOPTED
        .lock()
        .map_err(|_| io::Error::other("fd registry poisoned"))?;
    let adopted = guard.get_or_insert_with(HashSet::new);
    if adopted.contains(&fd) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("fd {fd} is already in use"),
        ));
    }
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
    adopted.insert(fd);
    // SAFETY: `fd` is open (F_GETFD succeeded), was inherited by this process
    // and not opened by any Rust object in it (it is not in ADOPTED and the
    // only other fds this process owns come from Rust APIs, which never hand
    // out numbers given on our command line before we adopt them); recording
    // it in ADOPTED ensures a single owner.
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
    use std::os::fd::IntoRawFd;

    #[test]
    fn adopt_rules() {
        assert!(adopt_inherited(1).is_err());
        assert!(adopt_inherited(100_000).is_err());
        let f = tempfile::tempfile().expect("tempfile");
        let raw = f.into_raw_fd();
        let owned = adopt_inherited(raw).expect("open fd");
        assert!(adopt_inherited(raw).is_err(), "second adoption refused");
        drop(owned);
    }
}
