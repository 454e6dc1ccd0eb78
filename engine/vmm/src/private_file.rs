//! Files that hold guest memory (checkpoints, memory dumps): the owner's alone
//! (mode 0600), created under a random temporary name in the target's directory
//! with O_EXCL (a planted file or symlink there is never followed or
//! overwritten), then synced, renamed into place and the directory synced, so
//! the name holds the old file or the whole new one, also after a crash.
//! Sockets that control a VM or carry its memory likewise ([`bind_socket`]).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

/// A file being written for `path`; it appears there only on [`Self::commit`],
/// and is removed if dropped before.
#[derive(Debug)]
pub struct PrivateFile {
    tmp: NamedTempFile,
    path: PathBuf,
}

impl PrivateFile {
    /// Creates the temporary file beside `path` (mode 0600).
    pub fn create(path: &Path) -> io::Result<Self> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.", name.to_string_lossy()))
            .suffix(".partial")
            .tempfile_in(parent(path))?;
        Ok(Self {
            tmp,
            path: path.to_path_buf(),
        })
    }

    pub fn file(&self) -> &File {
        self.tmp.as_file()
    }

    pub fn file_mut(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    /// Syncs the data, renames the file to its name and syncs the directory.
    pub fn commit(self) -> io::Result<()> {
        self.tmp.as_file().sync_all()?;
        self.tmp.persist(&self.path).map_err(|e| e.error)?;
        File::open(parent(&self.path))?.sync_all()
    }
}

/// Listens on a unix socket at `path` that only this user can connect to:
/// mode 0600 from its creation (the socket's inode gets the mode before
/// bind(2), which creates the file with it). A stale socket at `path` is
/// replaced; anything else there is refused, never deleted.
pub fn bind_socket(path: &Path) -> io::Result<UnixListener> {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};
    use nix::sys::stat::{fchmod, Mode};
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket: remove it, or choose another path",
                    path.display()
                ),
            ))
        }
        Ok(_) => std::fs::remove_file(path)?,
        Err(_) => {}
    }
    let sock = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    fchmod(&sock, Mode::from_bits_truncate(0o600))?;
    bind(sock.as_raw_fd(), &nix::sys::socket::UnixAddr::new(path)?)?;
    listen(&sock, Backlog::new(128)?)?;
    Ok(UnixListener::from(sock))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn only_a_committed_file_appears_and_it_is_the_owners() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.ckpt");
        std::fs::write(&path, b"the old checkpoint").unwrap();
        // Dropped before commit: the old file stays, no temporary is left.
        let mut f = PrivateFile::create(&path).unwrap();
        f.file_mut().write_all(b"half").unwrap();
        drop(f);
        assert_eq!(std::fs::read(&path).unwrap(), b"the old checkpoint");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let mut f = PrivateFile::create(&path).unwrap();
        f.file_mut().write_all(b"new").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }

    #[test]
    fn sockets_are_the_owners_and_nothing_else_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.sock");
        let l = bind_socket(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        drop(l);
        // A stale socket is replaced.
        let _l = bind_socket(&path).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A regular file is refused and kept.
        let file = dir.path().join("notes.txt");
        std::fs::write(&file, b"keep me").unwrap();
        let e = bind_socket(&file).unwrap_err().to_string();
        assert!(e.contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }

    #[test]
    fn a_planted_symlink_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let path = dir.path().join("vm.ckpt");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let mut f = PrivateFile::create(&path).unwrap();
        f.file_mut().write_all(b"guest memory").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
    }
}
