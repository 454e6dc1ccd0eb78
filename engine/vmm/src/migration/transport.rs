//! Migration transports: TCP, unix sockets, an inherited fd, and files, named by
//! QEMU-style URIs (`tcp:HOST:PORT`, `unix:PATH`, `fd:N`, `file:PATH`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::tls::{Endpoint, TlsCreds, TlsSessionError};

/// Where a migration stream goes or comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    Tcp(String),
    Unix(PathBuf),
    /// An inherited or received file descriptor (a socket or a pipe).
    Fd(RawFd),
    /// A file: a checkpoint is a migration into a file.
    File(PathBuf),
}

/// Errors of transports.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("unsupported migration URI '{0}': use tcp:HOST:PORT, unix:PATH, fd:N or file:PATH")]
    BadUri(String),
    #[error("cannot {action} {uri}: {source}")]
    Io {
        action: &'static str,
        uri: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS with {uri} failed: {source}")]
    Tls {
        uri: String,
        #[source]
        source: TlsSessionError,
    },
}

impl FromStr for MigrationUri {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TransportError::BadUri(s.to_string());
        if let Some(rest) = s.strip_prefix("tcp:") {
            // tcp:HOST:PORT, tcp:[v6]:PORT; QEMU options after a comma are ignored.
            let addr = rest.split(',').next().unwrap_or_default();
            if addr
                .rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
            {
                return Err(bad());
            }
            return Ok(Self::Tcp(addr.to_string()));
        }
        if let Some(p) = s.strip_prefix("unix:") {
            return if p.is_empty() {
                Err(bad())
            } else {
                Ok(Self::Unix(p.into()))
            };
        }
        if let Some(p) = s.strip_prefix("file:") {
            return if p.is_empty() {
                Err(bad())
            } else {
                Ok(Self::File(p.into()))
            };
        }
        if let Some(n) = s.strip_prefix("fd:") {
            return n.parse().map(Self::Fd).map_err(|_| bad());
        }
        Err(bad())
    }
}

impl std::fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp:{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Fd(n) => write!(f, "fd:{n}"),
            Self::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// Whether `fd` is a socket (a peer that can answer) rather than a file or a pipe.
pub fn is_socket(fd: &impl std::os::fd::AsFd) -> bool {
    nix::sys::stat::fstat(fd.as_fd()).is_ok_and(|st| (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK)
}

/// An open migration channel: a stream to write or read, and, for sockets, the
/// other direction (the return path).
#[derive(Debug)]
pub struct Channel {
    pub reader: Box<dyn ReadHalf>,
    pub writer: Box<dyn WriteHalf>,
    /// Whether the other end can answer (sockets yes, files no).
    pub has_return_path: bool,
    shutdown: Option<OwnedFd>,
    /// Where a `tcp:`/`unix:` channel was connected: extra page streams of a
    /// multi-stream migration connect there too. `None` for `fd:` and `file:`,
    /// which carry one stream.
    reconnect: Option<MigrationUri>,
    /// The URI, for messages.
    label: String,
    /// A `file:` channel's file, which appears under its name only once the
    /// migration completed ([`Channel::take_file`]).
    file: Option<crate::private_file::PrivateFile>,
}

/// The reading half of a channel.
pub trait ReadHalf: Read + Send + std::fmt::Debug {}
impl<T: Read + Send + std::fmt::Debug> ReadHalf for T {}
/// The writing half of a channel.
pub trait WriteHalf: Write + Send + std::fmt::Debug {}
impl<T: Write + Send + std::fmt::Debug> WriteHalf for T {}

/// A handle that breaks a channel from another thread (cancel, timeouts).
#[derive(Debug)]
pub struct Breaker(Option<OwnedFd>);

impl Breaker {
    /// A second breaker of the same channel.
    pub fn try_clone(&self) -> Result<Self, io::Error> {
        Ok(Self(match &self.0 {
            Some(fd) => Some(fd.try_clone()?),
            None => None,
        }))
    }

    /// Bounds each read of the channel's socket to `timeout` (`None`: no bound);
    /// a read that waits longer fails with `WouldBlock` and consumes nothing. No
    /// effect on files and pipes.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        use nix::sys::socket::{setsockopt, sockopt};
        use nix::sys::time::TimeVal;
        let Some(fd) = &self.0 else {
            return Ok(());
        };
        let tv = timeout.map_or(TimeVal::new(0, 0), |t| {
            // A zero timeval means "no timeout": round up to 1 µs.
            let t = t.max(Duration::from_micros(1));
            TimeVal::new(t.as_secs() as i64, t.subsec_micros().into())
        });
        setsockopt(fd, sockopt::ReceiveTimeout, &tv)?;
        Ok(())
    }

    /// Shuts the socket down both ways: blocked reads and writes return at once.
    pub fn break_channel(&self) {
        if let Some(fd) = &self.0 {
            let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
    }
}

fn io_err<'a>(
    action: &'static str,
    uri: &'a MigrationUri,
) -> impl FnOnce(io::Error) -> TransportError + 'a {
    move |source| TransportError::Io {
        action,
        uri: uri.to_string(),
        source,
    }
}

/// A dead peer (a cut link, a host gone) fails a TCP migration after about this
/// long instead of the kernel's 15 minutes of retransmissions: unacknowledged data
/// times out (TCP_USER_TIMEOUT), and an idle connection is probed (keep-alive).
pub const DEAD_LINK_TIMEOUT: Duration = Duration::from_secs(30);

fn configure_tcp(s: &impl std::os::fd::AsFd) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let secs = DEAD_LINK_TIMEOUT.as_secs() as u32;
    setsockopt(s, sockopt::TcpNoDelay, &true)?;
    setsockopt(s, sockopt::TcpUserTimeout, &(secs * 1000))?;
    setsockopt(s, sockopt::KeepAlive, &true)?;
    setsockopt(s, sockopt::TcpKeepIdle, &(secs / 3))?;
    setsockopt(s, sockopt::TcpKeepInterval, &(secs / 6))?;
    setsockopt(s, sockopt::TcpKeepCount, &4)?;
    Ok(())
}

impl Channel {
    fn from_tcp(s: TcpStream, uri: &MigrationUri) -> Result<Self, TransportError> {
        configure_tcp(&s).map_err(io_err("configure", uri))?;
        Self::from_fd(OwnedFd::from(s), uri)
    }

    fn from_unix(s: UnixStream, uri: &MigrationUri) -> Result<Self, TransportError> {
        Self::from_fd(OwnedFd::from(s), uri)
    }

    fn from_fd(fd: OwnedFd, uri: &MigrationUri) -> Result<Self, TransportError> {
        let file = File::from(fd);
        let r = file.try_clone().map_err(io_err("clone", uri))?;
        let b = file.try_clone().map_err(io_err("clone", uri))?;
        // A pipe has no return path; a socket does.
        let is_socket = is_socket(&file);
        Ok(Self {
            reader: Box::new(r),
            writer: Box::new(file),
            has_return_path: is_socket,
            shutdown: is_socket.then(|| OwnedFd::from(b)),
            reconnect: None,
            label: uri.to_string(),
            file: None,
        })
    }

    /// Secures the channel with TLS: runs the handshake as `creds`' endpoint before
    /// anything else moves on it. A client checks the server's certificate against
    /// `hostname`, or else the host of its `tcp:` URI.
    pub fn secure(self, creds: &TlsCreds, hostname: Option<&str>) -> Result<Self, TransportError> {
        let fail = |source: TlsSessionError| TransportError::Tls {
            uri: self.label.clone(),
            source,
        };
        let sock = match (&self.shutdown, self.has_return_path) {
            (Some(fd), true) => fd.try_clone().map_err(|e| fail(TlsSessionError::Dup(e)))?,
            _ => return Err(fail(TlsSessionError::NotASocket)),
        };
        let host = hostname
            .filter(|h| !h.is_empty())
            .map(str::to_string)
            .or_else(|| match &self.reconnect {
                Some(MigrationUri::Tcp(addr)) => addr
                    .rsplit_once(':')
                    .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string()),
                _ => None,
            });
        let (reader, writer) = creds.handshake(sock, host.as_deref()).map_err(fail)?;
        Ok(Self {
            reader: Box::new(reader),
            writer: Box::new(writer),
            has_return_path: true,
            shutdown: self.shutdown,
            reconnect: self.reconnect,
            label: self.label,
            file: self.file,
        })
    }

    /// The URI that more connections to the same peer can be opened on (`tcp:` and
    /// `unix:` channels opened by [`Channel::connect`]); `None` for `fd:` and `file:`.
    pub fn reconnect_uri(&self) -> Option<&MigrationUri> {
        self.reconnect.as_ref()
    }

    /// The file a `file:` channel writes, to commit (sync, rename into place,
    /// sync the directory) once everything was written; `None` for others.
    pub fn take_file(&mut self) -> Option<crate::private_file::PrivateFile> {
        self.file.take()
    }

    /// A breaker for this channel.
    pub fn breaker(&self) -> Result<Breaker, io::Error> {
        Ok(Breaker(match &self.shutdown {
            Some(fd) => Some(fd.try_clone()?),
            None => None,
        }))
    }

    /// Opens the sending side: connects to a listening destination, or creates a file.
    /// `fd:` URIs need the fd itself, from [`Channel::from_owned_fd`].
    pub fn connect(uri: &MigrationUri, timeout: Duration) -> Result<Self, TransportError> {
        match uri {
            MigrationUri::Tcp(addr) => {
                let mut last = None;
                let addrs = addr.to_socket_addrs().map_err(io_err("resolve", uri))?;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            let mut ch = Self::from_tcp(s, uri)?;
                            ch.reconnect = Some(uri.clone());
                            return Ok(ch);
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(io_err("connect to", uri)(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "no address")
                })))
            }
            MigrationUri::Unix(p) => {
                let mut ch = Self::from_unix(
                    UnixStream::connect(p).map_err(io_err("connect to", uri))?,
                    uri,
                )?;
                ch.reconnect = Some(uri.clone());
                Ok(ch)
            }
            MigrationUri::File(p) => {
                // The owner's alone, and never a half-written file under the
                // name: a temporary file, renamed when the migration completed.
                let file =
                    crate::private_file::PrivateFile::create(p).map_err(io_err("create", uri))?;
                let f = file.file().try_clone().map_err(io_err("create", uri))?;
                Ok(Self {
                    reader: Box::new(io::empty()),
                    writer: Box::new(f),
                    has_return_path: false,
                    shutdown: None,
                    reconnect: None,
                    label: uri.to_string(),
                    file: Some(file),
                })
            }
            MigrationUri::Fd(_) => Err(TransportError::BadUri(format!(
                "{uri} (an fd: URI needs the descriptor handed over first, e.g. with getfd)"
            ))),
        }
    }

    /// A channel over an fd this process owns (inherited or received with SCM_RIGHTS).
    /// A TCP socket (libvirt connects the migration socket itself and hands it over)
    /// gets the same dead-link timeouts as one ferry connected.
    pub fn from_owned_fd(fd: OwnedFd, uri: &MigrationUri) -> Result<Self, TransportError> {
        use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};
        let tcp = getsockname::<SockaddrStorage>(fd.as_raw_fd())
            .ok()
            .and_then(|a| a.family())
            .is_some_and(|f| matches!(f, AddressFamily::Inet | AddressFamily::Inet6));
        if tcp {
            configure_tcp(&fd).map_err(io_err("configure", uri))?;
        }
        Self::from_fd(fd, uri)
    }

    /// Opens the receiving side: waits for one sender, or opens a file.
    pub fn accept(uri: &MigrationUri) -> Result<Self, TransportError> {
        Listener::bind(uri)?.accept()
    }
}

/// A bound incoming endpoint, so the caller can report readiness before a sender
/// connects.
#[derive(Debug)]
pub struct Listener {
    kind: ListenerKind,
    uri: MigrationUri,
    /// Server credentials: every accepted connection completes a TLS handshake first.
    tls: Option<TlsCreds>,
}

#[derive(Debug)]
enum ListenerKind {
    Tcp(TcpListener),
    Unix(UnixListener),
    File(PathBuf),
}

impl Listener {
    pub fn bind(uri: &MigrationUri) -> Result<Self, TransportError> {
        let kind = match uri {
            MigrationUri::Tcp(addr) => ListenerKind::Tcp(
                TcpListener::bind(addr.as_str()).map_err(io_err("listen on", uri))?,
            ),
            MigrationUri::Unix(p) => ListenerKind::Unix(
                crate::private_file::bind_socket(p).map_err(io_err("listen on", uri))?,
            ),
            MigrationUri::File(p) => ListenerKind::File(p.clone()),
            MigrationUri::Fd(_) => {
                return Err(TransportError::BadUri(format!(
                    "{uri} (an fd: URI needs the descriptor handed over first)"
                )))
            }
        };
        Ok(Self {
            kind,
            uri: uri.clone(),
            tls: None,
        })
    }

    /// A listener over a TCP socket the caller bound (and may keep a clone of, to
    /// shut it down).
    pub fn from_tcp(listener: TcpListener) -> Result<Self, TransportError> {
        let addr = listener.local_addr().map_err(|e| {
            TransportError::BadUri(format!("tcp: listener without an address: {e}"))
        })?;
        Ok(Self {
            kind: ListenerKind::Tcp(listener),
            uri: MigrationUri::Tcp(addr.to_string()),
            tls: None,
        })
    }

    /// Demands TLS with `creds` (server credentials) on every connection.
    pub fn set_tls(&mut self, creds: TlsCreds) -> Result<(), TransportError> {
        let fail = |source: TlsSessionError| TransportError::Tls {
            uri: self.uri.to_string(),
            source,
        };
        if matches!(self.kind, ListenerKind::File(_)) {
            return Err(fail(TlsSessionError::FileListener));
        }
        if creds.endpoint() != Endpoint::Server {
            return Err(fail(TlsSessionError::WrongEndpoint {
                have: "client",
                side: "incoming side",
                want: "server",
            }));
        }
        self.tls = Some(creds);
        Ok(())
    }

    /// The bound TCP port (for `tcp:HOST:0`).
    pub fn local_port(&self) -> Option<u16> {
        match &self.kind {
            ListenerKind::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            _ => None,
        }
    }

    pub fn accept(self) -> Result<Channel, TransportError> {
        self.accept_next()
    }

    /// Waits up to `timeout` for a connection and returns it as it came, before
    /// any TLS handshake ([`Listener::secured`] runs that): the caller runs
    /// handshakes off its accept loop. `Ok(None)`: nobody came (always for a file),
    /// or `waker` was woken.
    pub(crate) fn accept_within(
        &self,
        timeout: Duration,
        waker: Option<&Waker>,
    ) -> Result<Option<Channel>, TransportError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let uri = &self.uri;
        let fd = match &self.kind {
            ListenerKind::Tcp(l) => l.as_fd(),
            ListenerKind::Unix(l) => l.as_fd(),
            ListenerKind::File(_) => return Ok(None),
        };
        let ms = PollTimeout::try_from(timeout.as_millis().min(60_000) as i32)
            .unwrap_or(PollTimeout::MAX);
        let mut fds = vec![PollFd::new(fd, PollFlags::POLLIN)];
        if let Some(w) = waker {
            fds.push(PollFd::new(w.rx.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, ms) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(io_err("poll", uri)(e.into())),
        }
        if let Some(w) = waker {
            w.drain();
            if !fds[0].any().unwrap_or(false) {
                return Ok(None);
            }
        }
        let pending = |r: io::Result<()>| r.map_err(io_err("poll", uri));
        let ch = match &self.kind {
            ListenerKind::Tcp(l) => {
                pending(l.set_nonblocking(true))?;
                match l.accept() {
                    Ok((s, _)) => {
                        pending(s.set_nonblocking(false))?;
                        Channel::from_tcp(s, uri)?
                    }
                    Err(e) if would_block(&e) => return Ok(None),
                    Err(e) => return Err(io_err("accept on", uri)(e)),
                }
            }
            ListenerKind::Unix(l) => {
                pending(l.set_nonblocking(true))?;
                match l.accept() {
                    Ok((s, _)) => {
                        pending(s.set_nonblocking(false))?;
                        Channel::from_unix(s, uri)?
                    }
                    Err(e) if would_block(&e) => return Ok(None),
                    Err(e) => return Err(io_err("accept on", uri)(e)),
                }
            }
            ListenerKind::File(_) => return Ok(None),
        };
        Ok(Some(ch))
    }

    /// Whether this listener is a file (one stream, read at once, nobody to refuse).
    pub(crate) fn is_file(&self) -> bool {
        matches!(self.kind, ListenerKind::File(_))
    }

    /// Runs the TLS handshake on a fresh connection, if TLS is on.
    pub(crate) fn secured(&self, ch: Channel) -> Result<Channel, TransportError> {
        secure_accepted(self.tls.as_ref(), ch)
    }

    /// The server credentials every connection must present TLS with, if any.
    pub(crate) fn tls(&self) -> Option<&TlsCreds> {
        self.tls.as_ref()
    }

    /// Waits for one sender (or opens the file) and keeps listening. With TLS, a
    /// connection whose handshake fails is refused and the wait goes on. The
    /// handshake runs here, so a slow peer holds up the caller: a destination on
    /// the network uses [`crate::migration::serve`], which runs each on a thread.
    pub fn accept_next(&self) -> Result<Channel, TransportError> {
        let uri = &self.uri;
        loop {
            let ch = match &self.kind {
                ListenerKind::Tcp(l) => {
                    l.set_nonblocking(false).map_err(io_err("configure", uri))?;
                    let (s, _) = l.accept().map_err(io_err("accept on", uri))?;
                    Channel::from_tcp(s, uri)?
                }
                ListenerKind::Unix(l) => {
                    l.set_nonblocking(false).map_err(io_err("configure", uri))?;
                    let (s, _) = l.accept().map_err(io_err("accept on", uri))?;
                    Channel::from_unix(s, uri)?
                }
                ListenerKind::File(p) => {
                    let f = File::open(p).map_err(io_err("open", uri))?;
                    return Ok(Channel {
                        reader: Box::new(f),
                        writer: Box::new(io::sink()),
                        has_return_path: false,
                        shutdown: None,
                        reconnect: None,
                        label: uri.to_string(),
                        file: None,
                    });
                }
            };
            match self.secured(ch) {
                Ok(ch) => return Ok(ch),
                Err(e) => tracing::warn!("refused a connection: {e}"),
            }
        }
    }
}

/// Runs the server side of a TLS handshake on an accepted connection, when
/// `tls` is set.
pub(crate) fn secure_accepted(
    tls: Option<&TlsCreds>,
    ch: Channel,
) -> Result<Channel, TransportError> {
    match tls {
        Some(creds) => ch.secure(creds, None),
        None => Ok(ch),
    }
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uris() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<MigrationUri>().unwrap(),
            MigrationUri::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            "tcp:[::]:49152".parse::<MigrationUri>().unwrap(),
            MigrationUri::Tcp("[::]:49152".into())
        );
        assert_eq!("fd:7".parse::<MigrationUri>().unwrap(), MigrationUri::Fd(7));
        assert_eq!(
            "unix:/tmp/m".parse::<MigrationUri>().unwrap(),
            MigrationUri::Unix("/tmp/m".into())
        );
        for bad in [
            "tcp:host",
            "tcp:h:99999",
            "fd:x",
            "unix:",
            "exec:cat",
            "rdma:x:1",
        ] {
            let e = bad.parse::<MigrationUri>().unwrap_err().to_string();
            assert!(e.contains("unsupported migration URI"), "{bad}: {e}");
        }
    }
}

/// Wakes a thread waiting in [`Listener::accept_within`] at once, rather than
/// at its next timeout: a non-blocking pipe whose read end it polls too.
#[derive(Debug)]
pub(crate) struct Waker {
    rx: OwnedFd,
    tx: OwnedFd,
}

impl Waker {
    pub(crate) fn new() -> io::Result<Self> {
        let (rx, tx) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)?;
        Ok(Self { rx, tx })
    }

    /// Wakes the waiter (a full pipe already will).
    pub(crate) fn wake(&self) {
        let _ = nix::unistd::write(&self.tx, &[1]);
    }

    fn drain(&self) {
        let mut buf = [0u8; 64];
        while matches!(nix::unistd::read(&self.rx, &mut buf), Ok(n) if n > 0) {}
    }
}
