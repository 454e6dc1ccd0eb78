//! COM1's output as QEMU's chardevs deliver it: a pty, a file, stdio or
//! nothing, each optionally copied to a `logfile=` (libvirt's
//! `-chardev pty,logfile=/dev/fdset/N`: the pty for `virsh console`, the log
//! for virtlogd).
//!
//! The engine writes to one [`SinkSpec`]; this adapter hands it
//! `SinkSpec::File("/proc/self/fd/<pipe>")` and copies what comes out of the
//! pipe to every output. The pipe's write end stays open for the life of
//! the process, so a VM rebuilt by a restore or a reset writes to the same
//! outputs. A pty nobody reads never blocks the guest: its output is
//! dropped once the pty's buffer is full, as QEMU does.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use ferry_vmm::devices::serial::SinkSpec;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::termios;

use crate::argv::{Chardev, ChardevBackend, SocketAddr, SocketEndpoint};

/// Why a serial output could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("chardev '{id}': cannot open {what}: {source}")]
    Open {
        id: String,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("chardev '{id}': backend {what} is not supported for serial ports by ferry-qemu")]
    Unsupported { id: String, what: String },
}

/// One serial port's outputs, fed by the engine through a pipe.
#[derive(Debug)]
pub struct SerialTee {
    /// The chardev id (`query-chardev` label).
    pub label: String,
    /// What `query-chardev` shows as `filename` (`pty:/dev/pts/N`, `file:...`).
    pub filename: String,
    /// The pty's slave path, for `-chardev pty`.
    pub pty: Option<PathBuf>,
    /// Kept open so the pipe never reports EOF between VMs.
    write_end: OwnedFd,
}

impl SerialTee {
    /// Opens the outputs of `chardev` and starts the copying thread.
    pub fn open(chardev: &Chardev) -> Result<Self, SerialError> {
        let id = chardev.id.clone();
        let open_err = |what: String| {
            let id = id.clone();
            move |source| SerialError::Open { id, what, source }
        };
        let mut outputs: Vec<Box<dyn Write + Send>> = Vec::new();
        let mut pty = None;
        let filename = match &chardev.backend {
            ChardevBackend::Null => "null".to_string(),
            ChardevBackend::Stdio => {
                outputs.push(Box::new(io::stdout()));
                "stdio".to_string()
            }
            ChardevBackend::File { path } => {
                let f = open_output(Path::new(path), false)
                    .map_err(open_err(format!("file {path}")))?;
                outputs.push(Box::new(f));
                format!("file:{path}")
            }
            ChardevBackend::Pty => {
                let (master, path) = open_pty().map_err(open_err("a pty".into()))?;
                // QEMU prints this on stderr; operators (and old libvirts) look for it.
                eprintln!(
                    "char device redirected to {} (label {})",
                    path.display(),
                    chardev.id
                );
                outputs.push(Box::new(DropWhenFull(master)));
                let name = format!("pty:{}", path.display());
                pty = Some(path);
                name
            }
            ChardevBackend::Socket(SocketAddr {
                endpoint: SocketEndpoint::Unix(path),
                server: false,
                ..
            }) => {
                // A client socket (QEMU's `-chardev socket,path=P`): output goes to
                // whoever listens there; it must be listening when the VM starts.
                let stream = std::os::unix::net::UnixStream::connect(path)
                    .map_err(open_err(format!("unix socket {}", path.display())))?;
                outputs.push(Box::new(stream));
                format!("unix:{}", path.display())
            }
            ChardevBackend::Socket(_) => {
                return Err(SerialError::Unsupported {
                    id,
                    what: "a listening or TCP socket".into(),
                })
            }
            ChardevBackend::Other { kind, .. } => {
                return Err(SerialError::Unsupported {
                    id,
                    what: format!("'{kind}'"),
                })
            }
        };
        if let Some(log) = &chardev.logfile {
            let f = open_output(Path::new(log), !chardev.logappend)
                .map_err(open_err(format!("logfile {log}")))?;
            outputs.push(Box::new(f));
        }
        let (read_end, write_end) =
            nix::unistd::pipe().map_err(|e| open_err("a pipe".into())(io::Error::from(e)))?;
        std::thread::Builder::new()
            .name(format!("serial-{}", chardev.id))
            .spawn(move || copy_out(File::from(read_end), outputs))
            .map_err(open_err("the serial thread".into()))?;
        Ok(Self {
            label: chardev.id.clone(),
            filename,
            pty,
            write_end,
        })
    }

    /// What the engine should write COM1's output to.
    pub fn sink(&self) -> SinkSpec {
        SinkSpec::File(PathBuf::from(format!(
            "/proc/self/fd/{}",
            self.write_end.as_raw_fd()
        )))
    }
}

/// Opens a chardev output; `/dev/fdset/N` paths were resolved to
/// `/proc/self/fd/M` by the caller. `truncate` only applies to regular files.
fn open_output(path: &Path, truncate: bool) -> io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .append(!truncate)
        .write(true)
        .open(path)?;
    if truncate && f.metadata()?.is_file() {
        f.set_len(0)?;
    }
    Ok(f)
}

/// A raw-mode pty; returns the master (non-blocking) and the slave's path.
/// The slave stays open (leaked) so that the master never sees a hangup.
fn open_pty() -> io::Result<(File, PathBuf)> {
    let pty = nix::pty::openpty(None, None).map_err(io::Error::from)?;
    let mut t = termios::tcgetattr(pty.slave.as_fd()).map_err(io::Error::from)?;
    termios::cfmakeraw(&mut t);
    termios::tcsetattr(pty.slave.as_fd(), termios::SetArg::TCSANOW, &t).map_err(io::Error::from)?;
    let flags = fcntl(&pty.master, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    fcntl(
        &pty.master,
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(io::Error::from)?;
    let path = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd()))?;
    std::mem::forget(pty.slave);
    Ok((File::from(pty.master), path))
}

/// A non-blocking output whose excess is dropped (a pty nobody reads).
struct DropWhenFull(File);

impl Write for DropWhenFull {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.write(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(buf.len()),
            other => other,
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn copy_out(mut pipe: File, mut outputs: Vec<Box<dyn Write + Send>>) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("serial pipe: {e}");
                return;
            }
        };
        // An output that fails (a log reader that went away) is dropped; the
        // others keep receiving.
        outputs.retain_mut(|o| o.write_all(&buf[..n]).and_then(|()| o.flush()).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pty_and_log_both_receive_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        let tee = SerialTee::open(&Chardev {
            id: "charserial0".into(),
            backend: ChardevBackend::Pty,
            logfile: Some(log.display().to_string()),
            logappend: true,
        })
        .expect("open");
        let pty = tee.pty.clone().expect("pty path");
        assert_eq!(tee.filename, format!("pty:{}", pty.display()));
        let mut reader = File::open(&pty).expect("open slave");
        let SinkSpec::File(path) = tee.sink() else {
            panic!("sink is a file")
        };
        let mut w = OpenOptions::new().append(true).open(path).expect("pipe");
        w.write_all(b"hello").expect("write");
        let mut got = [0u8; 5];
        reader.read_exact(&mut got).expect("pty read");
        assert_eq!(&got, b"hello");
        for _ in 0..200 {
            if std::fs::read(&log).unwrap_or_default() == b"hello" {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("log never received the output");
    }

    #[test]
    fn unread_pty_never_blocks() {
        let tee = SerialTee::open(&Chardev {
            id: "s".into(),
            backend: ChardevBackend::Pty,
            logfile: None,
            logappend: false,
        })
        .expect("open");
        let SinkSpec::File(path) = tee.sink() else {
            panic!("sink is a file")
        };
        let mut w = OpenOptions::new().append(true).open(path).expect("pipe");
        // Far more than a pty and a pipe buffer hold together.
        for _ in 0..256 {
            w.write_all(&[b'.'; 4096]).expect("write does not block");
        }
    }
}
