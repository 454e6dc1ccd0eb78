//! The two ends of a migration as the front-ends drive them: [`Source::start`]
//! moves a VM out on a thread of its own and hands it back when the migration
//! ended; [`Destination::open`] binds or opens where a VM comes from and
//! [`Destination::serve`] builds it from the stream.
//!
//! They own everything between a front-end's URI and the engine's streams:
//! transport selection (`tcp:`, `unix:`, `file:`, `exec:`, a descriptor handed
//! over, told apart as a socket that can answer or a file or pipe that
//! cannot), the `exec:` child, TLS on every connection, extra page streams
//! (through [`super::serve`]), cancel (through [`MigrationControl`]) and the
//! stream-count rule ([`super::MigrationParams::exact_streams`]). `ferry-vm`'s
//! control socket and `ferry-qemu`'s QMP only translate their commands into
//! these calls and the engine's statistics and events back.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Child;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::exec::{self, StreamEnd};
use super::transport::{is_socket, ReadHalf, WriteHalf};
use super::{
    Channel, Listener, MigrationControl, MigrationError, MigrationStats, MigrationUri,
    ServeOptions, TlsCreds,
};
use crate::persist::RestoreOptions;
use crate::vm::Vm;

/// How long connecting to a `tcp:`/`unix:` destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a migration stream goes to or comes from.
#[derive(Debug)]
pub enum Target {
    /// `tcp:HOST:PORT`, `unix:PATH` or `file:PATH`.
    Uri(MigrationUri),
    /// `exec:CMD`: `/bin/sh -c CMD` writes (incoming: reads) the stream.
    Exec(String),
    /// A descriptor this process holds: a socket (the peer answers on it) or
    /// a pipe or file (nobody answers).
    Fd(OwnedFd),
}

impl std::str::FromStr for Target {
    type Err = MigrationError;

    /// QEMU's URI forms; `fd:N` needs the descriptor itself ([`Target::Fd`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("exec:") {
            Some(cmd) if !cmd.trim().is_empty() => Ok(Self::Exec(cmd.to_string())),
            _ => Ok(Self::Uri(s.parse()?)),
        }
    }
}

impl Target {
    /// Whether a peer reads the stream and answers (a live migration) rather
    /// than a file or a pipe taking it (a checkpoint).
    pub fn has_peer(&self) -> bool {
        match self {
            Self::Uri(MigrationUri::Tcp(_) | MigrationUri::Unix(_)) => true,
            Self::Fd(fd) => is_socket(fd),
            Self::Uri(_) | Self::Exec(_) => false,
        }
    }

    /// Opens the sending side: connects, creates the file or starts the
    /// command. The child, if any, is to be waited for once the stream ended.
    fn connect(self) -> Result<(Channel, Option<Child>), MigrationError> {
        match self {
            Self::Uri(uri) => Ok((Channel::connect(&uri, CONNECT_TIMEOUT)?, None)),
            Self::Exec(cmd) => {
                let (child, fd) = exec::spawn(&cmd, StreamEnd::Stdin)?;
                let uri = MigrationUri::Fd(fd.as_raw_fd());
                Ok((Channel::from_owned_fd(fd, &uri)?, Some(child)))
            }
            Self::Fd(fd) => {
                let uri = MigrationUri::Fd(fd.as_raw_fd());
                Ok((Channel::from_owned_fd(fd, &uri)?, None))
            }
        }
    }
}

/// A migration that could not start: the VM, untouched, and why.
#[derive(Debug)]
pub struct NotStarted {
    pub vm: Vm,
    pub error: MigrationError,
}

/// An outgoing migration running on its own thread.
#[derive(Debug)]
pub struct Source<T> {
    ctl: Arc<MigrationControl>,
    thread: JoinHandle<T>,
}

impl<T: Send + 'static> Source<T> {
    /// Starts migrating `vm` to `target` under `ctl` (its parameters, its
    /// statistics and events, its cancel). Once the migration ended, `ended`
    /// runs on the migration's thread with the VM and the outcome: on success
    /// the VM is paused (the destination runs it); on failure it runs as
    /// before, unless the destination may be running it
    /// ([`MigrationError::Unconfirmed`]). What `ended` returns is what
    /// [`Source::wait`] gives.
    ///
    /// Checked here, before any thread starts: an `exec:` the front-end's
    /// sandbox forbids. If the thread cannot start, the VM comes back in the
    /// error.
    pub fn start<F>(
        vm: Vm,
        target: Target,
        ctl: &Arc<MigrationControl>,
        ended: F,
    ) -> Result<Self, Box<NotStarted>>
    where
        F: FnOnce(Vm, Result<MigrationStats, MigrationError>) -> T + Send + 'static,
    {
        if let Target::Exec(cmd) = &target {
            if let Err(e) = exec::check_spawn(cmd) {
                return Err(Box::new(NotStarted {
                    vm,
                    error: e.into(),
                }));
            }
        }
        // From here a cancel counts: one that came for an earlier migration
        // does not.
        ctl.reset();
        // The VM goes to the thread once it runs: if it cannot start, the VM
        // is still here to give back.
        let (give, take) = std::sync::mpsc::sync_channel::<Vm>(1);
        let thread_ctl = Arc::clone(ctl);
        let spawned = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                let Ok(mut vm) = take.recv() else {
                    unreachable_vm()
                };
                let result = run_source(&mut vm, target, &thread_ctl);
                ended(vm, result)
            });
        let (vm, error) = match spawned {
            Ok(thread) => match give.send(vm) {
                Ok(()) => {
                    return Ok(Self {
                        ctl: Arc::clone(ctl),
                        thread,
                    })
                }
                Err(std::sync::mpsc::SendError(vm)) => (vm, MigrationError::ThreadEnded),
            },
            Err(e) => (vm, MigrationError::StartThread(e)),
        };
        Err(Box::new(NotStarted { vm, error }))
    }

    /// Asks the migration to stop; the source VM runs on.
    pub fn cancel(&self) {
        self.ctl.cancel();
    }

    /// Whether the migration ended (and `ended` ran).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the migration to end; what `ended` returned.
    pub fn wait(self) -> Result<T, MigrationError> {
        self.thread
            .join()
            .map_err(|_| MigrationError::ThreadPanicked)
    }
}

/// The migration thread was spawned, so the VM was sent to it before it
/// could ask: `recv` fails only if the sender went away without sending,
/// which `start` never does once the thread exists.
fn unreachable_vm() -> ! {
    panic!("the migration thread started without its VM")
}

/// Opens the channel and runs the pre-copy; the `exec:` child is waited for.
fn run_source(
    vm: &mut Vm,
    target: Target,
    ctl: &Arc<MigrationControl>,
) -> Result<MigrationStats, MigrationError> {
    let (channel, child) = match target.connect() {
        Ok(c) => c,
        Err(e) => {
            // Nothing moved and the VM never stopped: failed, as any failure.
            ctl.update_stats(|s| s.error_desc = Some(crate::error_chain(&e)));
            ctl.emit(super::MigrationEvent::Status(
                super::MigrationStatus::Failed,
            ));
            return Err(e);
        }
    };
    let result = super::migrate(vm, channel, ctl);
    if let Some(mut child) = child {
        match child.wait() {
            Ok(st) if !st.success() => tracing::warn!("the exec: command failed ({st})"),
            Err(e) => tracing::warn!("cannot wait for the exec: command: {e}"),
            Ok(_) => {}
        }
    }
    result
}

/// Where a checkpoint goes: the stream of a stopped VM with no peer to
/// answer it (QEMU's `migrate` of a paused guest to a file or a pipe).
#[derive(Debug)]
pub struct CheckpointSink {
    out: File,
    /// The `exec:` command, to wait for once the stream ended.
    child: Option<Child>,
    /// For `file:`: the private temporary that replaces PATH once whole.
    file: Option<crate::private_file::PrivateFile>,
}

impl CheckpointSink {
    /// Creates the file (mode 0600, under a temporary name: PATH keeps the
    /// previous checkpoint until this one is whole and synced), starts the
    /// `exec:` command, or takes the descriptor. A `tcp:`/`unix:` peer takes
    /// a live migration ([`Source`]), not a checkpoint.
    pub fn open(target: Target) -> Result<Self, MigrationError> {
        match target {
            Target::Fd(fd) => Ok(Self {
                out: File::from(fd),
                child: None,
                file: None,
            }),
            Target::Uri(MigrationUri::File(p)) => {
                let fail = |source| MigrationError::OpenFile {
                    path: p.clone(),
                    source,
                };
                let file = crate::private_file::PrivateFile::create(&p).map_err(fail)?;
                let out = file.file().try_clone().map_err(fail)?;
                Ok(Self {
                    out,
                    child: None,
                    file: Some(file),
                })
            }
            Target::Exec(cmd) => {
                let (child, stdin) = exec::spawn(&cmd, StreamEnd::Stdin)?;
                Ok(Self {
                    out: File::from(stdin),
                    child: Some(child),
                    file: None,
                })
            }
            Target::Uri(_) => Err(MigrationError::CheckpointTarget),
        }
    }

    /// Writes the checkpoint of the stopped `vm`; then syncs and renames the
    /// file into place, or waits for the command (which must succeed). A
    /// failed checkpoint leaves no file under PATH.
    pub fn write(self, vm: &Vm) -> Result<crate::persist::CheckpointStats, MigrationError> {
        use std::io::Write;
        let Self { out, child, file } = self;
        let result = crate::persist::save(vm, std::io::BufWriter::with_capacity(1 << 20, out))
            .map_err(MigrationError::from)
            .and_then(|(w, stats)| {
                // Dropping the writer closes the fd/pipe: the reader sees EOF.
                let mut inner = w
                    .into_inner()
                    .map_err(|e| MigrationError::WriteCheckpoint(e.into_error()))?;
                inner.flush().map_err(MigrationError::WriteCheckpoint)?;
                Ok(stats)
            })
            .and_then(|stats| match file {
                // fsync, rename over PATH, fsync the directory; a failed save
                // drops `file`, which removes the temporary.
                Some(f) => f
                    .commit()
                    .map(|()| stats)
                    .map_err(MigrationError::WriteCheckpoint),
                None => Ok(stats),
            });
        if let Some(mut child) = child {
            let status = child.wait().map_err(MigrationError::WriteCheckpoint)?;
            if result.is_ok() && !status.success() {
                return Err(MigrationError::ExecFailed(status));
            }
        }
        result
    }
}

/// Where an incoming VM comes from.
#[derive(Debug)]
enum Incoming {
    /// A bound `tcp:`/`unix:` endpoint: sources connect, strangers are
    /// refused, extra page streams join.
    Listen(Listener),
    /// A connected socket handed over: the source reads the answers on it.
    Socket(Channel),
    /// A file or a pipe: read to the end, nobody to answer. A pipe is
    /// drained to its end after the stream, so its writer never sees EPIPE.
    Stream { file: File, pipe: bool },
}

/// The receiving end of a migration (or of a checkpoint read back).
#[derive(Debug)]
pub struct Destination {
    incoming: Incoming,
    tls: Option<TlsCreds>,
}

impl Destination {
    /// Binds (`tcp:`, `unix:`), opens (`file:`), starts the command (`exec:`)
    /// or takes the descriptor; with `tls` (server credentials), every
    /// connection must complete a TLS handshake first, which a file or a pipe
    /// cannot.
    pub fn open(target: Target, tls: Option<TlsCreds>) -> Result<Self, MigrationError> {
        let stream = match &target {
            Target::Uri(MigrationUri::File(_)) | Target::Exec(_) => true,
            Target::Fd(fd) => !is_socket(fd),
            Target::Uri(_) => false,
        };
        if tls.is_some() && stream {
            return Err(MigrationError::TlsNeedsSocket);
        }
        let incoming = match target {
            Target::Uri(uri @ (MigrationUri::Tcp(_) | MigrationUri::Unix(_))) => {
                let mut listener = Listener::bind(&uri)?;
                if let Some(creds) = &tls {
                    listener.set_tls(creds.clone())?;
                }
                Incoming::Listen(listener)
            }
            Target::Uri(MigrationUri::File(p)) => Incoming::Stream {
                file: File::open(&p).map_err(|source| MigrationError::OpenFile {
                    path: p.clone(),
                    source,
                })?,
                pipe: false,
            },
            Target::Uri(uri @ MigrationUri::Fd(_)) => {
                return Err(super::TransportError::BadUri(format!(
                    "{uri} (an fd: URI needs the descriptor handed over first)"
                ))
                .into())
            }
            Target::Exec(cmd) => {
                let (child, stdout) = exec::spawn(&cmd, StreamEnd::Stdout)?;
                reap(child)?;
                Incoming::Stream {
                    file: File::from(stdout),
                    pipe: true,
                }
            }
            Target::Fd(fd) if is_socket(&fd) => {
                let uri = MigrationUri::Fd(fd.as_raw_fd());
                Incoming::Socket(Channel::from_owned_fd(fd, &uri)?)
            }
            Target::Fd(fd) => {
                let file = File::from(fd);
                let pipe = file.metadata().map(|m| !m.is_file()).unwrap_or(false);
                Incoming::Stream { file, pipe }
            }
        };
        Ok(Self { incoming, tls })
    }

    /// The bound TCP port (for `tcp:HOST:0`).
    pub fn local_port(&self) -> Option<u16> {
        match &self.incoming {
            Incoming::Listen(l) => l.local_port(),
            _ => None,
        }
    }

    /// Whether sources connect to this end (`tcp:`, `unix:`): it listens.
    pub fn listens(&self) -> bool {
        matches!(self.incoming, Incoming::Listen(_))
    }

    /// Receives the VM: built as `opts` configure it and checked against
    /// them, loaded, and running if `opts.autostart`. `started` runs once a
    /// source is here (its handshake is done, or the stream opened);
    /// `max_streams` is asked then how many page streams to take (a listener
    /// only: a socket handed over or a pipe carries one). On any error the
    /// VM is dropped before it ever ran, and a source that can hear it is
    /// told why.
    pub fn serve(
        self,
        opts: &RestoreOptions,
        started: &mut dyn FnMut(),
        max_streams: &dyn Fn() -> u32,
    ) -> Result<Vm, MigrationError> {
        match self.incoming {
            Incoming::Listen(l) => {
                super::serve(&l, &ServeOptions::default(), opts, started, max_streams)
            }
            Incoming::Socket(ch) => {
                let ch = match &self.tls {
                    Some(creds) => ch.secure(creds, None)?,
                    None => ch,
                };
                started();
                let writer = ch.has_return_path.then_some(ch.writer);
                super::receive_streams(ch.reader, writer, None, opts)
            }
            Incoming::Stream { file, pipe } => {
                started();
                let drain = pipe.then(|| file.try_clone().ok()).flatten();
                let reader: Box<dyn ReadHalf> = Box::new(file);
                let result = super::receive_streams(reader, None::<Box<dyn WriteHalf>>, None, opts);
                if let Some(mut d) = drain {
                    let _ = std::thread::Builder::new()
                        .name("incoming-drain".into())
                        .spawn(move || std::io::copy(&mut d, &mut std::io::sink()));
                }
                result
            }
        }
    }
}

/// Reaps an incoming `exec:` command when it exits; a failing command shows
/// as a short stream, which the receiver refuses, and its status is logged.
fn reap(mut child: Child) -> Result<(), MigrationError> {
    std::thread::Builder::new()
        .name("incoming-exec".into())
        .spawn(move || match child.wait() {
            Ok(st) if !st.success() => {
                tracing::warn!("the incoming exec: command failed ({st})");
            }
            Err(e) => tracing::warn!("cannot wait for the incoming exec: command: {e}"),
            Ok(_) => {}
        })
        .map(drop)
        .map_err(MigrationError::StartThread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_told_from_pipes_and_files() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        assert!(is_socket(&a));
        assert!(Target::Fd(OwnedFd::from(a)).has_peer());
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        assert!(!is_socket(&r));
        assert!(!Target::Fd(r).has_peer());
        let f = tempfile::tempfile().expect("file");
        assert!(!is_socket(&f));
    }

    #[test]
    fn uris_name_their_transport() {
        assert!(matches!(
            "exec:cat > /dev/null".parse::<Target>(),
            Ok(Target::Exec(c)) if c == "cat > /dev/null"
        ));
        assert!(matches!(
            "tcp:127.0.0.1:4444".parse::<Target>(),
            Ok(Target::Uri(MigrationUri::Tcp(_)))
        ));
        assert!("tcp:host".parse::<Target>().is_err());
        assert!("exec:".parse::<Target>().is_err());
        assert!("unix:/run/x".parse::<Target>().expect("unix").has_peer());
        assert!(!"file:/tmp/x".parse::<Target>().expect("file").has_peer());
    }

    #[test]
    fn a_pipe_or_file_cannot_carry_tls_or_an_fd_uri() {
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        assert!(matches!(
            Destination::open(Target::Fd(r), None),
            Ok(d) if !d.listens() && d.local_port().is_none()
        ));
        let e = Destination::open("fd:3".parse().expect("fd"), None).expect_err("fd:N");
        assert!(e.to_string().contains("handed over"), "{e}");
        let e = Destination::open("file:/nonexistent/x".parse().expect("file"), None)
            .expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/x"), "{e}");
    }
}
