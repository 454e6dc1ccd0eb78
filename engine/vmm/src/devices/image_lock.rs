//! Disk image locks that QEMU understands: open-file-description byte locks
//! (`F_OFD_SETLK`) on the image, laid out as QEMU's `file-posix` driver lays
//! them out, so that ferry and QEMU (and `qemu-img`) refuse to write one image
//! at the same time, whichever started first.
//!
//! The layout (QEMU `block/file-posix.c`, `raw_apply_lock_bytes` and
//! `raw_check_lock_bytes`): each block-layer permission has a bit (0
//! consistent-read, 1 write, 2 write-unchanged, 3 resize, 4 graph-mod). A user
//! of the image holds a shared (read) lock on byte `100 + bit` for each
//! permission it holds, and on byte `200 + bit` for each permission it refuses
//! to share with others. It conflicts with another user when a permission it
//! holds is refused by someone (byte `200 + bit` locked by another open file),
//! or a permission it refuses is held by someone (byte `100 + bit`). Locks are
//! taken first and checked after, so of two users starting at once at least
//! one sees the other.
//!
//! What ferry holds, measured against QEMU 7.2 with `/proc/locks` for a
//! virtio-blk disk on a raw image (and the same here):
//!
//! | disk                       | bytes locked      |
//! |----------------------------|-------------------|
//! | writable                   | 100, 101, 201     |
//! | read-only                  | 100, 201          |
//! | writable, `share-rw=on`    | 100, 101          |
//! | read-only, `share-rw=on`   | 100               |
//! | incoming migration         | none (until load) |
//!
//! So a writer excludes every other writer and every reader that refuses to
//! share writing (a read-only disk does, as in QEMU); readers share with each
//! other; `share-rw` (libvirt's `<shareable/>`) disks share writing with each
//! other.
//!
//! The locks belong to the open file description, not the process: they hold
//! across `dup` (a descriptor libvirt passed keeps them), two opens of one
//! image in one process conflict as two processes do, and they go when the
//! last descriptor of that open file closes.

use std::os::fd::AsFd;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};

/// First of the "permission held" bytes.
const PERM_BASE: i64 = 100;
/// First of the "permission not shared" bytes.
const SHARED_BASE: i64 = 200;
/// QEMU's permission bits (consistent-read .. graph-mod).
const PERM_BITS: u32 = 5;
/// BLK_PERM_CONSISTENT_READ.
const CONSISTENT_READ: u32 = 1 << 0;
/// BLK_PERM_WRITE.
const WRITE: u32 = 1 << 1;

/// QEMU's name of each permission bit (`bdrv_perm_names`).
const PERM_NAMES: [&str; PERM_BITS as usize] = [
    "consistent read",
    "write",
    "write unchanged",
    "resize",
    "change children",
];

/// How a disk uses its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageAccess {
    /// The guest may write (not read-only).
    pub write: bool,
    /// Others may write the image meanwhile (`share-rw=on`, `<shareable/>`).
    pub share_write: bool,
}

impl ImageAccess {
    /// The permissions held (bytes 100 + bit).
    fn held(self) -> u32 {
        CONSISTENT_READ | if self.write { WRITE } else { 0 }
    }

    /// The permissions refused to others (bytes 200 + bit).
    fn unshared(self) -> u32 {
        if self.share_write {
            0
        } else {
            WRITE
        }
    }
}

/// Why the locks could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ImageLockError {
    /// Another open file of the image holds a permission this disk refuses,
    /// or refuses one this disk holds. The text is QEMU's for the same case.
    #[error("Failed to get {}\"{perm}\" lock", if *.shared { "shared " } else { "" })]
    Conflict {
        perm: &'static str,
        /// The conflict is on a permission this disk refuses to share (QEMU's
        /// "shared" lock), not on one it holds.
        shared: bool,
    },
    /// fcntl refused (the file system has no byte-range locks, ...).
    #[error("cannot lock byte {byte} of the image")]
    Fcntl {
        byte: i64,
        #[source]
        source: Errno,
    },
}

fn range(kind: libc::c_int, start: i64, len: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: len,
        l_pid: 0,
    }
}

fn set(fd: &impl AsFd, kind: libc::c_int, byte: i64) -> Result<(), ImageLockError> {
    fcntl(fd, FcntlArg::F_OFD_SETLK(&range(kind, byte, 1)))
        .map(drop)
        .map_err(|source| ImageLockError::Fcntl { byte, source })
}

/// Whether another open file holds a lock on `byte` (one that a write lock
/// would conflict with: any).
fn taken_by_another(fd: &impl AsFd, byte: i64) -> Result<bool, ImageLockError> {
    let mut probe = range(libc::F_WRLCK, byte, 1);
    fcntl(fd, FcntlArg::F_OFD_GETLK(&mut probe))
        .map_err(|source| ImageLockError::Fcntl { byte, source })?;
    Ok(probe.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes the locks of `access` on the image open as `fd` (and lets go of any
/// other lock bytes this open file held), then checks that nobody conflicts;
/// on a conflict this open file holds no lock bytes any more.
pub fn lock(fd: &impl AsFd, access: ImageAccess) -> Result<(), ImageLockError> {
    let result = apply(fd, access).and_then(|()| check(fd, access));
    if result.is_err() {
        let _ = unlock(fd);
    }
    result
}

fn apply(fd: &impl AsFd, access: ImageAccess) -> Result<(), ImageLockError> {
    for bit in 0..PERM_BITS {
        for (base, wanted) in [(PERM_BASE, access.held()), (SHARED_BASE, access.unshared())] {
            let kind = if wanted & (1 << bit) != 0 {
                libc::F_RDLCK
            } else {
                libc::F_UNLCK
            };
            set(fd, kind, base + i64::from(bit))?;
        }
    }
    Ok(())
}

fn check(fd: &impl AsFd, access: ImageAccess) -> Result<(), ImageLockError> {
    for (base, perms, shared) in [
        (SHARED_BASE, access.held(), false),
        (PERM_BASE, access.unshared(), true),
    ] {
        for bit in 0..PERM_BITS {
            if perms & (1 << bit) != 0 && taken_by_another(fd, base + i64::from(bit))? {
                return Err(ImageLockError::Conflict {
                    perm: PERM_NAMES[bit as usize],
                    shared,
                });
            }
        }
    }
    Ok(())
}

/// Lets go of every lock byte the open file `fd` holds.
pub fn unlock(fd: &impl AsFd) -> Result<(), ImageLockError> {
    for base in [PERM_BASE, SHARED_BASE] {
        fcntl(
            fd,
            FcntlArg::F_OFD_SETLK(&range(libc::F_UNLCK, base, i64::from(PERM_BITS))),
        )
        .map_err(|source| ImageLockError::Fcntl { byte: base, source })?;
    }
    Ok(())
}

/// Whether an open file holds a lock on `byte` of the image at `path`, as a
/// fresh open file of it sees (`F_OFD_GETLK`), and of which kind. For tests:
/// `/proc/locks` would show the same, but its listing skips entries while
/// other threads take and drop locks.
#[cfg(test)]
pub(crate) fn lock_on(path: &std::path::Path, byte: i64) -> Option<libc::c_int> {
    let probe = std::fs::File::open(path).expect("open the image to probe its locks");
    let mut lk = range(libc::F_WRLCK, byte, 1);
    fcntl(&probe, FcntlArg::F_OFD_GETLK(&mut lk)).expect("F_OFD_GETLK");
    let kind = libc::c_int::from(lk.l_type);
    (kind != libc::F_UNLCK).then_some(kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};

    const RW: ImageAccess = ImageAccess {
        write: true,
        share_write: false,
    };
    const RO: ImageAccess = ImageAccess {
        write: false,
        share_write: false,
    };
    const SHARED_RW: ImageAccess = ImageAccess {
        write: true,
        share_write: true,
    };

    fn open(path: &std::path::Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open the image")
    }

    /// The byte ranges of the image that open files hold locks on; every
    /// lock must be a shared one, as QEMU's are.
    fn locked_bytes(path: &std::path::Path) -> Vec<(i64, i64)> {
        let mut ranges: Vec<(i64, i64)> = Vec::new();
        for byte in 0..300 {
            let Some(kind) = lock_on(path, byte) else {
                continue;
            };
            assert_eq!(kind, libc::F_RDLCK, "byte {byte}");
            match ranges.last_mut() {
                Some((_, end)) if *end + 1 == byte => *end = byte,
                _ => ranges.push((byte, byte)),
            }
        }
        ranges
    }

    #[test]
    fn the_bytes_are_qemus() {
        let img = tempfile::NamedTempFile::new().expect("image");
        let f = open(img.path());
        lock(&f, RW).expect("lock");
        assert_eq!(locked_bytes(img.path()), [(100, 101), (201, 201)]);
        lock(&f, RO).expect("relock read-only");
        assert_eq!(locked_bytes(img.path()), [(100, 100), (201, 201)]);
        lock(&f, SHARED_RW).expect("relock shared");
        assert_eq!(locked_bytes(img.path()), [(100, 101)]);
        unlock(&f).expect("unlock");
        assert_eq!(locked_bytes(img.path()), []);
    }

    #[test]
    fn writers_exclude_each_other_and_readers_share() {
        let img = tempfile::NamedTempFile::new().expect("image");
        let (a, b) = (open(img.path()), open(img.path()));
        lock(&a, RW).expect("first writer");
        let e = lock(&b, RW).expect_err("second writer");
        assert_eq!(e.to_string(), "Failed to get \"write\" lock");
        assert_eq!(locked_bytes(img.path()), [(100, 101), (201, 201)]);
        let e = lock(&b, RO).expect_err("a reader of a written image");
        assert_eq!(e.to_string(), "Failed to get shared \"write\" lock");
        // Shared writers still meet a writer that does not share.
        assert!(lock(&b, SHARED_RW).is_err());
        // The writer gone (its locks released), readers share.
        unlock(&a).expect("unlock");
        lock(&a, RO).expect("reader");
        lock(&b, RO).expect("another reader");
        assert!(lock(&File::open(img.path()).expect("open"), RW).is_err());
        unlock(&a).expect("unlock");
        unlock(&b).expect("unlock");
        lock(&a, SHARED_RW).expect("shared writer");
        lock(&b, SHARED_RW).expect("another shared writer");
        drop(a);
        drop(b);
        lock(&open(img.path()), RW).expect("the locks go with the last close");
    }

    /// A duplicate of the descriptor is the same open file: its locks are the
    /// holder's, not a conflict (what libvirt's passed descriptors rely on).
    #[test]
    fn a_duplicate_descriptor_shares_the_locks() {
        let img = tempfile::NamedTempFile::new().expect("image");
        let a = open(img.path());
        lock(&a, RW).expect("lock");
        let dup = a.try_clone().expect("dup");
        lock(&dup, RW).expect("the same open file");
        drop(a);
        assert!(lock(&open(img.path()), RW).is_err(), "the dup holds them");
    }
}
