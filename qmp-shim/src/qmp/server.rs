//! The QMP server: monitors, connections, negotiation and dispatch.
//!
//! One thread per monitor accepts one connection at a time (like QEMU); a
//! second client waits in the listen backlog until the first goes away, so
//! libvirt can reconnect after a restart. Replies are written by the reading
//! thread, events by the thread that emits them, both under one lock, so an
//! event emitted by a command precedes its reply (as in QEMU).

use std::collections::{BTreeMap, HashMap};
use std::io::{self, IoSliceMut, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use serde_json::{json, Map, Value};

use super::error::{to_qmp, CommandError};
use super::events::EventSink;
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

/// Serves monitor connections on `listener` forever (one at a time).
pub fn serve_monitor(listener: UnixListener, vm: Arc<Mutex<Vm>>) {
    let mut state = MonitorState::default();
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                if let Err(e) = serve_connection(s, &vm, &mut state) {
                    tracing::debug!("monitor connection ended: {e}");
                }
            }
            Err(e) => tracing::warn!("monitor accept failed: {e}"),
        }
    }
}

fn write_json(w: &Mutex<UnixStream>, v: &Value) -> io::Result<()> {
    let mut text = v.to_string();
    text.push_str("\r\n");
    let mut s = w.lock().map_err(|_| io::Error::other("writer poisoned"))?;
    s.write_all(text.as_bytes())
}

/// Serves one connection until EOF, an I/O error, or `quit` (which exits
/// the process after the reply).
pub fn serve_connection(
    stream: UnixStream,
    vm: &Arc<Mutex<Vm>>,
    state: &mut MonitorState,
) -> io::Result<()> {
    let out = stream.try_clone()?;
    // A client that stops reading must not stall the guest (events are
    // written by whoever emits them): give up on it after a while.
    out.set_write_timeout(Some(std::time::Duration::from_secs(10)))?;
    let writer = Arc::new(Mutex::new(out));
    write_json(&writer, &greeting())?;
    let conn_id = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
    let events = vm
        .lock()
        .map_err(|_| io::Error::other("VM state poisoned"))?
        .events
        .clone();
    let mut session = Session::default();
    let mut splitter = Splitter::new();
    let mut buf = vec![0u8; 64 * 1024];
    let result = loop {
        let (n, mut fds) = match read_with_fds(stream.as_raw_fd(), &mut buf) {
            Ok(r) => r,
            Err(e) => break Err(e),
        };
        if n == 0 {
            break Ok(());
        }
        for piece in splitter.push(&buf[..n]) {
            let out = match &piece {
                Piece::Message(text) => {
                    let was = session.negotiated;
                    let o = handle_message(vm, state, &mut session, text, &mut fds);
                    if !was && session.negotiated {
                        // Events flow only after negotiation, as in QEMU.
                        events.subscribe_stream(conn_id, Arc::clone(&writer));
                    }
                    o
                }
                other => Outcome {
                    reply: framing_error(other),
                    quit: false,
                },
            };
            if let Some(reply) = &out.reply {
                write_json(&writer, reply)?;
            }
            if out.quit {
                tracing::info!("quit requested over QMP");
                std::process::exit(0);
            }
        }
        fds.clear();
    };
    events.unsubscribe(conn_id);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    result
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
