//! COM1's output as QEMU's chardevs deliver it: a pty, a file, stdio or
//! nothing, each optionally copied to a `logfile=` (libvirt's
//! `-chardev pty,logfile=/dev/fdset/N`: the pty for `virsh console`, the log
//! for virtlogd).
//!
//! An output given as `/dev/fdset/N` is the descriptor libvirt passed in
//! that set, written to as passed: reopening it (through `/proc/self/fd`)
//! checks permissions again, and the emulator's user may not pass them on
//! virtlogd's pipe or on a file libvirt opened for it.
//!
//! The engine writes to one [`SinkSpec`]; this adapter hands it
//! `SinkSpec::Fd` of a pipe's write end and copies what comes out of the
//! pipe to every output. The pipe's write end stays open for the life of
//! the process, so a VM rebuilt by a restore or a reset writes to the same
//! outputs. A pty nobody reads never blocks the guest: its output is
//! dropped once the pty's buffer is full, as QEMU does.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use ferry_vmm::devices::serial::SinkSpec;
use ferry_vmm::devices::SharedFd;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::termios;

use crate::argv::{Chardev, ChardevBackend, ChardevFds, SocketAddr, SocketEndpoint};

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
    write_end: SharedFd,
}

impl SerialTee {
    /// Opens the outputs of `chardev`, those in `fds` as passed, and starts
    /// the copying thread.
    pub fn open(chardev: &Chardev, fds: &ChardevFds) -> Result<Self, SerialError> {
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
                let f = match &fds.path {
                    Some(fd) => passed_output(fd),
                    None => open_output(Path::new(path), false),
                }
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
            let f = match &fds.logfile {
                Some(fd) => passed_output(fd),
                None => open_output(Path::new(log), !chardev.logappend),
            }
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
            write_end: SharedFd::new(write_end),
        })
    }

    /// What the engine should write COM1's output to.
    pub fn sink(&self) -> SinkSpec {
        SinkSpec::Fd(self.write_end.clone())
    }
}

/// A passed output (`/dev/fdset/N`), blocking: its excess must wait, not be
/// dropped (QEMU retries a write that would block), whatever flags the
/// sender left on it.
fn passed_output(fd: &SharedFd) -> io::Result<File> {
    let f = fd.dup()?;
    let flags = fcntl(&f, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    fcntl(
        &f,
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK),
    )
    .map_err(io::Error::from)?;
    Ok(f)
}

/// Opens a chardev output by path (`/dev/fdset/N` outputs are passed fds,
/// see [`ChardevFds`]). `truncate` only applies to regular files.
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

    /// What the engine writes to: the pipe's write end, as passed.
    fn engine_end(tee: &SerialTee) -> File {
        let SinkSpec::Fd(fd) = tee.sink() else {
            panic!("the sink is the pipe's fd")
        };
        fd.dup().expect("dup the pipe")
    }

    /// libvirt's `-add-fd`: a pipe whose write end was passed (virtlogd's
    /// for a log), non-blocking as a sender may leave it; no path leads to it.
    fn passed_pipe() -> (File, SharedFd) {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK).expect("pipe");
        (File::from(r), SharedFd::new(w))
    }

    /// A file backend and a logfile given as `/dev/fdset/N` write to the
    /// passed descriptors; the paths are never opened.
    #[test]
    fn fdset_file_and_logfile_use_the_passed_fds() {
        let (file, file_fd) = passed_pipe();
        let (log, log_fd) = passed_pipe();
        let tee = SerialTee::open(
            &Chardev {
                id: "charserial0".into(),
                backend: ChardevBackend::File {
                    path: "/dev/fdset/1".into(),
                },
                logfile: Some("/dev/fdset/0".into()),
                logappend: false,
            },
            &ChardevFds {
                path: Some(file_fd),
                logfile: Some(log_fd),
            },
        )
        .expect("open");
        assert_eq!(tee.filename, "file:/dev/fdset/1");
        // More than a pipe holds (64 KiB): the excess waits for the reader
        // instead of being dropped.
        let sent: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let mut engine = engine_end(&tee);
            let sent = sent.clone();
            std::thread::spawn(move || engine.write_all(&sent).expect("write"))
        };
        // Both read at once: the copying thread writes each chunk to one
        // output, then the other. A lost chunk would leave a reader waiting:
        // bounded.
        let (tx, rx) = std::sync::mpsc::channel();
        for out in [file, log] {
            let len = sent.len();
            let tx = tx.clone();
            std::thread::spawn(move || {
                // Blocking reads (the pipe was made non-blocking).
                let flags = fcntl(&out, FcntlArg::F_GETFL).expect("flags");
                fcntl(
                    &out,
                    FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK),
                )
                .expect("blocking");
                let mut got = vec![0u8; len];
                (&out).read_exact(&mut got).expect("read");
                let _ = tx.send(got);
            });
        }
        for _ in 0..2 {
            let got = rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("an output lost bytes: its reader still waits");
            assert!(got == sent, "an output's bytes differ");
        }
        writer.join().expect("writer");
    }

    #[test]
    fn pty_and_log_both_receive_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        let tee = SerialTee::open(
            &Chardev {
                id: "charserial0".into(),
                backend: ChardevBackend::Pty,
                logfile: Some(log.display().to_string()),
                logappend: true,
            },
            &ChardevFds::default(),
        )
        .expect("open");
        let pty = tee.pty.clone().expect("pty path");
        assert_eq!(tee.filename, format!("pty:{}", pty.display()));
        let mut reader = File::open(&pty).expect("open slave");
        let mut w = engine_end(&tee);
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
        let tee = SerialTee::open(
            &Chardev {
                id: "s".into(),
                backend: ChardevBackend::Pty,
                logfile: None,
                logappend: false,
            },
            &ChardevFds::default(),
        )
        .expect("open");
        let mut w = engine_end(&tee);
        // Far more than a pty and a pipe buffer hold together.
        for _ in 0..256 {
            w.write_all(&[b'.'; 4096]).expect("write does not block");
        }
    }
}
