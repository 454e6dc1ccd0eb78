//! Where the guest's serial output goes: a file, stdout, a unix socket, a pty
//! or a descriptor the VMM was handed.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use crate::devices::SharedFd;

/// A serial backend as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkSpec {
    /// Discard output.
    Null,
    /// The VMM's standard output.
    Stdout,
    /// Append to (create) a file.
    File(PathBuf),
    /// Write to an open file, pipe or socket (a duplicate of it), never
    /// reopened by path.
    Fd(SharedFd),
    /// Listen on a unix socket and write to whoever connects (output before a client
    /// connects is dropped, like QEMU's `server=on,wait=off`).
    UnixServer(PathBuf),
    /// Connect to a listening unix socket.
    UnixClient(PathBuf),
    /// A new pseudo-terminal; its path is logged and reported.
    Pty,
}

/// Errors of serial backends.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("unknown serial backend '{0}': use null, stdio, file:PATH, unix:PATH[,server] or pty")]
    Unknown(String),
    #[error("cannot open serial backend {what}: {source}")]
    Open {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl FromStr for SinkSpec {
    type Err = SinkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "null" || s == "none" {
            return Ok(Self::Null);
        }
        if s == "stdio" || s == "stdout" {
            return Ok(Self::Stdout);
        }
        if s == "pty" {
            return Ok(Self::Pty);
        }
        if let Some(p) = s.strip_prefix("file:") {
            if !p.is_empty() {
                return Ok(Self::File(p.into()));
            }
        }
        if let Some(rest) = s.strip_prefix("unix:") {
            let mut parts = rest.split(',');
            let path = parts.next().unwrap_or_default();
            let mut server = false;
            for opt in parts {
                match opt {
                    "server" | "server=on" => server = true,
                    "server=off" | "wait=off" | "wait=on" | "nowait" => {}
                    _ => return Err(SinkError::Unknown(s.into())),
                }
            }
            if !path.is_empty() {
                return Ok(if server {
                    Self::UnixServer(path.into())
                } else {
                    Self::UnixClient(path.into())
                });
            }
        }
        Err(SinkError::Unknown(s.into()))
    }
}

/// An open serial backend.
#[derive(Debug, Clone)]
pub struct SerialSink {
    inner: Arc<Mutex<Target>>,
    /// The pty's path, for `SinkSpec::Pty`.
    pub pty_path: Option<PathBuf>,
}

#[derive(Debug)]
enum Target {
    Null,
    Stdout,
    File(File),
    Stream(Option<UnixStream>),
    Pty(File),
}

impl SerialSink {
    /// Opens the backend described by `spec`.
    pub fn open(spec: &SinkSpec) -> Result<Self, SinkError> {
        let open_err = |what: String| move |source| SinkError::Open { what, source };
        let mut pty_path = None;
        let target = match spec {
            SinkSpec::Null => Target::Null,
            SinkSpec::Stdout => Target::Stdout,
            SinkSpec::File(p) => Target::File(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(open_err(format!("file {}", p.display())))?,
            ),
            SinkSpec::Fd(fd) => Target::File(fd.dup().map_err(open_err("a passed fd".into()))?),
            SinkSpec::UnixClient(p) => Target::Stream(Some(
                UnixStream::connect(p).map_err(open_err(format!("unix:{}", p.display())))?,
            )),
            SinkSpec::UnixServer(p) => {
                let _ = std::fs::remove_file(p);
                let listener = UnixListener::bind(p)
                    .map_err(open_err(format!("unix:{},server", p.display())))?;
                let sink = Self {
                    inner: Arc::new(Mutex::new(Target::Stream(None))),
                    pty_path: None,
                };
                let weak = Arc::downgrade(&sink.inner);
                std::thread::Builder::new()
                    .name("serial-accept".into())
                    .spawn(move || {
                        for stream in listener.incoming().flatten() {
                            let Some(inner) = weak.upgrade() else { return };
                            if let Ok(mut t) = inner.lock() {
                                *t = Target::Stream(Some(stream));
                            };
                        }
                    })
                    .map_err(open_err("serial accept thread".into()))?;
                return Ok(sink);
            }
            SinkSpec::Pty => {
                let pty = nix::pty::openpty(None, None).map_err(|e| SinkError::Open {
                    what: "pty".into(),
                    source: io::Error::from(e),
                })?;
                let name = std::fs::read_link(format!(
                    "/proc/self/fd/{}",
                    std::os::fd::AsRawFd::as_raw_fd(&pty.slave)
                ))
                .map_err(open_err("pty name".into()))?;
                tracing::info!("serial console on {}", name.display());
                pty_path = Some(name);
                // Keep the slave open so writes do not fail before a client attaches.
                std::mem::forget(pty.slave);
                Target::Pty(File::from(pty.master))
            }
        };
        Ok(Self {
            inner: Arc::new(Mutex::new(target)),
            pty_path,
        })
    }
}

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut t = self
            .inner
            .lock()
            .map_err(|_| io::Error::other("serial sink lock poisoned"))?;
        match &mut *t {
            Target::Null => Ok(buf.len()),
            Target::Stdout => io::stdout().write(buf),
            Target::File(f) => f.write(buf),
            Target::Pty(f) => f.write(buf),
            Target::Stream(s) => {
                if let Some(stream) = s {
                    if stream.write_all(buf).is_err() {
                        // The client went away: drop output until the next one connects.
                        *s = None;
                    }
                }
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut t = self
            .inner
            .lock()
            .map_err(|_| io::Error::other("serial sink lock poisoned"))?;
        match &mut *t {
            Target::Stdout => io::stdout().flush(),
            Target::File(f) => f.flush(),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_backends() {
        assert_eq!("stdio".parse::<SinkSpec>().unwrap(), SinkSpec::Stdout);
        assert_eq!(
            "file:/tmp/x".parse::<SinkSpec>().unwrap(),
            SinkSpec::File("/tmp/x".into())
        );
        assert_eq!(
            "unix:/tmp/s,server=on,wait=off"
                .parse::<SinkSpec>()
                .unwrap(),
            SinkSpec::UnixServer("/tmp/s".into())
        );
        assert_eq!(
            "unix:/tmp/s".parse::<SinkSpec>().unwrap(),
            SinkSpec::UnixClient("/tmp/s".into())
        );
        let err = "vc".parse::<SinkSpec>().unwrap_err().to_string();
        assert!(err.contains("unknown serial backend 'vc'"), "{err}");
        assert!("file:".parse::<SinkSpec>().is_err());
    }

    #[test]
    fn fd_sink_writes_to_the_open_file_itself() {
        // Unlinked: no path leads to it any more, as none the emulator's user
        // may open leads to a pipe from virtlogd.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        let fd = SharedFd::new(file.try_clone().unwrap().into());
        let mut sink = SerialSink::open(&SinkSpec::Fd(fd.clone())).unwrap();
        sink.write_all(b"abc").unwrap();
        // Every sink built on it writes to the same file.
        let mut again = SerialSink::open(&SinkSpec::Fd(fd)).unwrap();
        again.write_all(b"de").unwrap();
        let mut got = [0u8; 8];
        let n = std::os::unix::fs::FileExt::read_at(&file, &mut got, 0).unwrap();
        assert_eq!(&got[..n], b"abcde");
    }

    #[test]
    fn file_and_unix_server_receive_output() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("out");
        let mut sink = SerialSink::open(&SinkSpec::File(file.clone())).unwrap();
        sink.write_all(b"abc").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"abc");

        let sock = dir.path().join("sock");
        let mut sink = SerialSink::open(&SinkSpec::UnixServer(sock.clone())).unwrap();
        sink.write_all(b"dropped").unwrap();
        let mut client = UnixStream::connect(&sock).unwrap();
        // Wait until the accept thread has installed the client.
        for _ in 0..200 {
            if matches!(&*sink.inner.lock().unwrap(), Target::Stream(Some(_))) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        sink.write_all(b"seen").unwrap();
        let mut buf = [0u8; 4];
        io::Read::read_exact(&mut client, &mut buf).unwrap();
        assert_eq!(&buf, b"seen");
    }
}
