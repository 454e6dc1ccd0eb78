//! The QMP server: monitors, connections, negotiation and dispatch.
//!
//! One thread per monitor accepts one connection at a time (like QEMU); a
//! second client waits in the listen backlog until the first goes away, so
//! libvirt can reconnect after a restart. A client that does not negotiate
//! within [`NEGOTIATION_TIMEOUT`] is dropped, so that it cannot hold the
//! monitor. Replies and events go through the connection's [`Outbox`] and
//! are written by its own writer thread, so an event emitted by a command
//! precedes its reply (as in QEMU) and emitting never waits for a client.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use serde_json::{json, Map, Value};

use super::error::{to_qmp, CommandError};
use super::events::{EventSink, Outbox};
use super::json::{Piece, Splitter};
use super::schema;
use crate::argv::{Incoming, Invocation};
use crate::backend::{Backend, MachineConfig, MigrationCapabilities, MigrationParameters};
use crate::commands::{self, Ctx, TlsObject, TlsParameters};

/// QEMU version ferry-qemu reports (libvirt 9.0 needs >= 4.2.0).
pub const QEMU_VERSION: (u64, u64, u64) = (7, 2, 0);
/// The `package` string of the greeting and `query-version`.
pub const PACKAGE: &str = concat!("ferry ", env!("CARGO_PKG_VERSION"));

/// The greeting sent on every new connection.
pub fn greeting() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({"QMP": {
        "version": {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": PACKAGE},
        "capabilities": ["oob"],
    }})
}

/// One fd in an fd set (`-add-fd`, `add-fd`).
#[derive(Debug)]
pub struct FdSetEntry {
    /// The number QEMU reports (`fd` in `query-fdsets`), the fd's own number.
    pub fd: OwnedFd,
    pub opaque: Option<String>,
}

/// `-add-fd` / `add-fd` sets, by set id.
pub type FdSets = BTreeMap<u64, Vec<FdSetEntry>>;

/// A chardev as `query-chardev` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevInfo {
    pub label: String,
    pub filename: String,
}

/// State shared by all monitors: the VM and what QMP stores beside it.
#[derive(Debug)]
pub struct Vm {
    pub backend: Box<dyn Backend>,
    pub invocation: Invocation,
    pub config: Option<MachineConfig>,
    pub fdsets: FdSets,
    pub chardevs: Vec<ChardevInfo>,
    pub migrate_params: MigrationParameters,
    pub migrate_caps: MigrationCapabilities,
    /// The incoming migration reads a URI that carries one stream (`fd:`,
    /// `file:`, `exec:`): QEMU refuses the multifd capability then.
    pub incoming_one_stream: bool,
    /// `object-add`ed (or `-object`) TLS credentials, by id.
    pub objects: BTreeMap<String, TlsObject>,
    /// `tls-creds`, `tls-hostname`, `tls-authz`.
    pub tls_params: TlsParameters,
    pub events: EventSink,
    /// Set by `quit`; the connection exits the process after replying.
    pub quit: bool,
}

impl Vm {
    pub fn new(
        backend: Box<dyn Backend>,
        invocation: Invocation,
        config: Option<MachineConfig>,
        events: EventSink,
    ) -> Self {
        let incoming_one_stream = matches!(
            invocation.incoming,
            Some(Incoming::Fd(_) | Incoming::File(_) | Incoming::Exec(_))
        );
        Self {
            // `-object` credentials are loaded at startup (process.rs).
            objects: BTreeMap::new(),
            tls_params: TlsParameters::default(),
            backend,
            invocation,
            config,
            fdsets: FdSets::new(),
            chardevs: Vec::new(),
            migrate_params: MigrationParameters::default(),
            migrate_caps: MigrationCapabilities::default(),
            incoming_one_stream,
            events,
            quit: false,
        }
    }
}

/// Per-connection negotiation state.
#[derive(Debug, Default)]
pub struct Session {
    pub negotiated: bool,
    pub oob: bool,
}

/// Per-monitor state that outlives connections (QEMU keeps `getfd` fds on
/// the monitor).
#[derive(Debug, Default)]
pub struct MonitorState {
    pub named_fds: HashMap<String, OwnedFd>,
}

/// The outcome of one request.
#[derive(Debug)]
pub struct Outcome {
    /// The reply (`None` never happens today; kept for OOB responses).
    pub reply: Option<Value>,
    /// `quit` was executed: exit after sending the reply.
    pub quit: bool,
    /// The text was not JSON: the rest of its line is dropped.
    pub malformed: bool,
}

/// Handles one complete JSON text; `received` holds fds that arrived with
/// the bytes (SCM_RIGHTS); unused ones are closed afterwards.
pub fn handle_message(
    vm: &Mutex<Vm>,
    monitor: &mut MonitorState,
    session: &mut Session,
    text: &[u8],
    received: &mut Vec<OwnedFd>,
) -> Outcome {
    let value: Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => {
            let err = CommandError::Input(format!("JSON parse error, {e}"));
            return Outcome {
                reply: Some(to_qmp(&err).to_json()),
                quit: false,
                malformed: true,
            };
        }
    };
    let id = value.get("id").cloned();
    let result = dispatch(vm, monitor, session, value, received);
    received.clear();
    let (mut reply, quit) = match result {
        Ok((ret, quit)) => (json!({"return": ret}), quit),
        Err(e) => (to_qmp(&e).to_json(), false),
    };
    if let (Some(id), Some(obj)) = (id, reply.as_object_mut()) {
        obj.insert("id".into(), id);
    }
    Outcome {
        reply: Some(reply),
        quit,
        malformed: false,
    }
}

/// A reply for a framing-level problem found by the splitter.
pub fn framing_error(piece: &Piece) -> Option<Value> {
    let desc = match piece {
        Piece::Message(_) => return None,
        Piece::TooLarge => format!(
            "JSON parse error, message exceeds the limit of {} bytes or {} nesting levels",
            super::json::MAX_MESSAGE,
            super::json::MAX_NESTING
        ),
        Piece::Unbalanced => "JSON parse error, stray '}' or ']'".to_string(),
        Piece::Stray(b) if b.is_ascii_graphic() => {
            format!("JSON parse error, stray '{}'", char::from(*b))
        }
        Piece::Stray(b) => format!("JSON parse error, stray byte {b:#04x}"),
        Piece::ControlInString(b) => {
            format!("JSON parse error, control character {b:#04x} in a string")
        }
    };
    Some(to_qmp(&CommandError::Input(desc)).to_json())
}

fn dispatch(
    vm: &Mutex<Vm>,
    monitor: &mut MonitorState,
    session: &mut Session,
    value: Value,
    received: &mut Vec<OwnedFd>,
) -> Result<(Value, bool), CommandError> {
    let Value::Object(req) = value else {
        return Err(CommandError::Input(
            "QMP input must be a JSON object".into(),
        ));
    };
    for key in req.keys() {
        if !matches!(
            key.as_str(),
            "execute" | "exec-oob" | "arguments" | "id" | "control"
        ) {
            return Err(CommandError::Input(format!(
                "QMP input member '{key}' is unexpected"
            )));
        }
    }
    let (name, oob) = match (req.get("execute"), req.get("exec-oob")) {
        (Some(_), Some(_)) => {
            return Err(CommandError::Input(
                "QMP input must not have both 'execute' and 'exec-oob'".into(),
            ))
        }
        (Some(v), None) => (v, false),
        (None, Some(v)) => (v, true),
        (None, None) => {
            return Err(CommandError::Input(
                "QMP input lacks member 'execute'".into(),
            ))
        }
    };
    let name = name.as_str().ok_or_else(|| {
        CommandError::Input(format!(
            "QMP input member '{}' must be a string",
            if oob { "exec-oob" } else { "execute" }
        ))
    })?;
    let empty = Map::new();
    let args = match req.get("arguments") {
        None => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(CommandError::Input(
                "QMP input member 'arguments' must be an object".into(),
            ))
        }
    };
    if !session.negotiated && name != "qmp_capabilities" {
        return Err(CommandError::NotNegotiated);
    }
    if session.negotiated && name == "qmp_capabilities" {
        return Err(CommandError::AlreadyNegotiated);
    }
    let command = commands::find(name).ok_or_else(|| CommandError::CommandNotFound {
        name: name.to_string(),
    })?;
    if oob {
        if !session.oob {
            return Err(CommandError::Input(
                "QMP input member 'exec-oob' is unexpected (out-of-band is not enabled)".into(),
            ));
        }
        return Err(CommandError::Input(format!(
            "The command {name} does not support OOB"
        )));
    }
    schema::validate(args, command.schema.args)?;
    if name == "qmp_capabilities" {
        let enable = args.get("enable").and_then(Value::as_array);
        session.oob = enable.is_some_and(|e| e.iter().any(|c| c == "oob"));
        session.negotiated = true;
        return Ok((json!({}), false));
    }
    let mut guard = vm
        .lock()
        .map_err(|_| CommandError::Generic("internal error: VM state poisoned".into()))?;
    let mut ctx = Ctx {
        vm: &mut guard,
        monitor_fds: &mut monitor.named_fds,
        received,
    };
    let ret = (command.handler)(&mut ctx, args)?;
    Ok((ret, guard.quit))
}

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// How long a client may stay connected without negotiating
/// (`qmp_capabilities`) before it is dropped, so that the next one is served.
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes of replies and events queued for one client; a client that
/// lets more pile up (it does not read) is disconnected.
pub const MAX_QUEUED_BYTES: usize = 1 << 20;
/// How long the writer thread waits for a client to take one message.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `quit` waits for its reply to be written.
const QUIT_FLUSH: Duration = Duration::from_secs(1);

/// Per-connection limits ([`Default`]: the constants above; tests shorten
/// them).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub negotiation_timeout: Duration,
    pub max_queued_bytes: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            negotiation_timeout: NEGOTIATION_TIMEOUT,
            max_queued_bytes: MAX_QUEUED_BYTES,
        }
    }
}

/// Serves monitor connections on `listener` forever (one at a time).
pub fn serve_monitor(listener: UnixListener, vm: Arc<Mutex<Vm>>) {
    serve_monitor_with(listener, vm, ConnectionLimits::default());
}

/// [`serve_monitor`] with explicit limits.
pub fn serve_monitor_with(listener: UnixListener, vm: Arc<Mutex<Vm>>, limits: ConnectionLimits) {
    let mut state = MonitorState::default();
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                if let Err(e) = serve_connection_with(s, &vm, &mut state, limits) {
                    tracing::debug!("monitor connection ended: {e}");
                }
            }
            Err(e) => tracing::warn!("monitor accept failed: {e}"),
        }
    }
}

/// Serves one connection until EOF, an I/O error, or `quit` (which exits
/// the process after the reply), with the default limits.
pub fn serve_connection(
    stream: UnixStream,
    vm: &Arc<Mutex<Vm>>,
    state: &mut MonitorState,
) -> io::Result<()> {
    serve_connection_with(stream, vm, state, ConnectionLimits::default())
}

/// [`serve_connection`] with explicit limits.
pub fn serve_connection_with(
    stream: UnixStream,
    vm: &Arc<Mutex<Vm>>,
    state: &mut MonitorState,
    limits: ConnectionLimits,
) -> io::Result<()> {
    let mut out = stream.try_clone()?;
    // Only the writer thread waits on the client, and not forever.
    out.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let outbox = Outbox::new(limits.max_queued_bytes, Some(stream.try_clone()?));
    let writer = {
        let outbox = Arc::clone(&outbox);
        std::thread::Builder::new()
            .name("qmp-writer".into())
            .spawn(move || {
                if let Err(e) = outbox.run_writer(&mut out) {
                    tracing::debug!("monitor client dropped: {e}");
                    outbox.close();
                    let _ = out.shutdown(std::net::Shutdown::Both);
                }
            })?
    };
    let conn_id = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
    let result = read_requests(&stream, vm, state, &outbox, conn_id, limits);
    let events = vm.lock().map(|v| v.events.clone());
    if let Ok(events) = events {
        events.unsubscribe(conn_id);
    }
    if result.is_err() {
        // Do not wait for a client that is being dropped.
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    outbox.close();
    let _ = writer.join();
    let _ = stream.shutdown(std::net::Shutdown::Both);
    result
}

/// The reading half of a connection: requests in, replies to `outbox`.
fn read_requests(
    stream: &UnixStream,
    vm: &Arc<Mutex<Vm>>,
    state: &mut MonitorState,
    outbox: &Arc<Outbox>,
    conn_id: u64,
    limits: ConnectionLimits,
) -> io::Result<()> {
    let gone = || io::Error::other("the client does not read its replies and events");
    if !outbox.push(&greeting()) {
        return Err(gone());
    }
    let events = vm
        .lock()
        .map_err(|_| io::Error::other("VM state poisoned"))?
        .events
        .clone();
    let deadline = Instant::now() + limits.negotiation_timeout;
    let mut session = Session::default();
    let mut splitter = Splitter::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Before negotiation each read waits only until the deadline: a client
        // that never negotiates cannot hold the monitor.
        let negotiating = !session.negotiated;
        let (n, fds) = if negotiating {
            let left = deadline.saturating_duration_since(Instant::now());
            let timed_out = || {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the client did not send qmp_capabilities within {:?}",
                        limits.negotiation_timeout
                    ),
                )
            };
            if left.is_zero() {
                return Err(timed_out());
            }
            stream.set_read_timeout(Some(left))?;
            match read_with_fds(stream.as_raw_fd(), &mut buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(timed_out())
                }
                r => r?,
            }
        } else {
            read_with_fds(stream.as_raw_fd(), &mut buf)?
        };
        if n == 0 {
            return Ok(());
        }
        splitter.feed(&buf[..n]);
        let mut conn = Connection {
            session: &mut session,
            splitter: &mut splitter,
            outbox,
            events: &events,
            id: conn_id,
        };
        conn.serve_pieces(vm, state, fds)?;
        if negotiating && session.negotiated {
            stream.set_read_timeout(None)?;
        }
    }
}

/// One connection's reading state, borrowed for [`Connection::serve_pieces`].
struct Connection<'a> {
    session: &'a mut Session,
    splitter: &'a mut Splitter,
    outbox: &'a Arc<Outbox>,
    events: &'a EventSink,
    id: u64,
}

impl Connection<'_> {
    /// Handles every piece the splitter has, queuing the replies.
    fn serve_pieces(
        &mut self,
        vm: &Arc<Mutex<Vm>>,
        state: &mut MonitorState,
        mut fds: Vec<OwnedFd>,
    ) -> io::Result<()> {
        while let Some(piece) = self.splitter.next_piece() {
            let out = match &piece {
                Piece::Message(text) => {
                    let was = self.session.negotiated;
                    let o = handle_message(vm, state, self.session, text, &mut fds);
                    if !was && self.session.negotiated {
                        // Events flow only after negotiation, as in QEMU.
                        self.events
                            .subscribe_outbox(self.id, Arc::clone(self.outbox));
                    }
                    o
                }
                other => Outcome {
                    reply: framing_error(other),
                    quit: false,
                    malformed: false,
                },
            };
            if out.malformed {
                // Not JSON: drop the rest of its line, as after a framing
                // error.
                self.splitter.resync();
            }
            if let Some(reply) = &out.reply {
                if !self.outbox.push(reply) {
                    return Err(io::Error::other(
                        "the client does not read its replies and events",
                    ));
                }
            }
            if out.quit {
                tracing::info!("quit requested over QMP");
                self.outbox.flush(QUIT_FLUSH);
                std::process::exit(0);
            }
        }
        Ok(())
    }
}

/// Reads bytes and any SCM_RIGHTS fds that came with them.
fn read_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let mut cmsg = nix::cmsg_space!([RawFd; 16]);
        match recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => {
                let mut fds = Vec::new();
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            fds.extend(crate::fd::adopt_received(&raw));
                        }
                    }
                }
                return Ok((msg.bytes, fds));
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}
