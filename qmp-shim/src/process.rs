//! Process startup: argv → policy → (`-daemonize`) → fd sets, signals,
//! monitors, pidfile → backend → QMP loop.
//!
//! `-daemonize` re-executes this binary instead of forking (the crate has no
//! `unsafe`, and `fork` in a Rust process is). The foreground process
//! spawns `/proc/self/exe` with the same arguments and [`DAEMON_ENV`] set,
//! its stdout/stderr on pipes; the child binds the monitor sockets, writes
//! the pidfile, calls `setsid` and prints [`READY`]. Only then does the
//! foreground process exit 0 — libvirt relies on "the socket exists when the
//! command returns". If the child fails first, its stderr is relayed and the
//! foreground process exits 1.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use ferry_vmm::devices::virtio::blk::{Backing, BlockImage, ImageFormat};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{getsockname, getsockopt, sockopt, UnixAddr};

use crate::argv::{
    self, ArgvError, ChardevBackend, Invocation, Mode, SocketEndpoint, UNSUPPORTED_HINT,
};
use crate::backend::{Backend, BackendError, MachineConfig, NoVm};
use crate::qmp::events::EventSink;
use crate::qmp::server::{serve_monitor, ChardevInfo, FdSetEntry, FdSets, Vm};
use crate::vmm::{exit_after_events, fdset_fd, FdAccess, FdSetError, FerryBackend};

/// Set in the environment of the re-executed daemon child.
pub const DAEMON_ENV: &str = "FERRY_QEMU_DAEMON_CHILD";
/// What the daemon child prints on stdout once it is ready.
pub const READY: &str = "FERRY-QEMU-READY";

/// Exit status for command-line and startup errors (QEMU uses 1 too).
pub const EXIT_FAILURE: i32 = 1;

/// Why startup failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Argv(#[from] ArgvError),
    #[error("-chardev {id}: {source}")]
    Monitor {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("-add-fd fd={fd}: {source}")]
    AddFd {
        fd: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    FdSet {
        what: String,
        #[source]
        source: FdSetError,
    },
    #[error("cannot write pid file {path}: {source}")]
    Pidfile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("-daemonize: {0}")]
    Daemonize(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Picks the backend for this process: ferry-vmm for a guest, [`NoVm`] for
/// the capability probe (`-machine none`), which runs no guest.
pub fn select_backend(inv: &Invocation, events: EventSink) -> Box<dyn Backend> {
    if inv.is_probe() {
        Box::new(NoVm::new(true, events))
    } else {
        Box::new(FerryBackend::new(events))
    }
}

/// Signals that end the process the way QEMU ends on them: a SHUTDOWN
/// event (`host-signal`), then exit 0. libvirt's `virsh destroy` is SIGTERM.
fn termination_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set
}

/// Waits for a termination signal on a thread of its own (the signals are
/// blocked in every other thread: they inherit the mask set in [`start`]).
fn spawn_signal_thread(set: SigSet, events: EventSink) -> Result<(), StartError> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                eprintln!("ferry-qemu: terminating on signal {}", sig as i32);
                events.emit(
                    "SHUTDOWN",
                    Some(serde_json::json!({"guest": false, "reason": "host-signal"})),
                );
                exit_after_events(0);
            }
        })
        .map(|_| ())
        .map_err(|e| StartError::Daemonize(format!("cannot start the signal thread: {e}")))
}

/// Gives the serial ports' and disks' `/dev/fdset/N` files the descriptors
/// libvirt passed in set N, used as passed (see [`fdset_fd`]).
fn resolve_fdsets(config: &mut MachineConfig, fdsets: &FdSets) -> Result<(), StartError> {
    for s in &mut config.serials {
        let c = &s.chardev;
        let fail = |source| StartError::FdSet {
            what: format!("chardev '{}'", c.id),
            source,
        };
        if let ChardevBackend::File { path } = &c.backend {
            s.fds.path = fdset_fd(path, fdsets, FdAccess::Write).map_err(fail)?;
        }
        if let Some(log) = &c.logfile {
            s.fds.logfile = fdset_fd(log, fdsets, FdAccess::Write).map_err(fail)?;
        }
    }
    for d in &mut config.disks {
        let need = if d.read_only {
            FdAccess::Read
        } else {
            FdAccess::ReadWrite
        };
        let fd = fdset_fd(&d.filename, fdsets, need).map_err(|source| StartError::FdSet {
            what: format!("disk {}", d.id.as_deref().unwrap_or(&d.storage_node)),
            source,
        })?;
        if let Some(fd) = fd {
            d.image = BlockImage::Fd {
                fd,
                name: d.filename.clone(),
            };
        }
        let what = format!("disk {}", d.id.as_deref().unwrap_or(&d.storage_node));
        resolve_layer_fdsets(&mut d.format, fdsets, &what)?;
    }
    Ok(())
}

/// The `/dev/fdset/N` backing images of an explicit chain: read-only, as the
/// engine opens them.
fn resolve_layer_fdsets(
    format: &mut ImageFormat,
    fdsets: &FdSets,
    what: &str,
) -> Result<(), StartError> {
    let ImageFormat::Qcow2 {
        backing: Backing::Image(layer),
    } = format
    else {
        return Ok(());
    };
    if let BlockImage::Path(p) = &layer.image {
        let name = p.to_string_lossy().into_owned();
        let fd = fdset_fd(&name, fdsets, FdAccess::Read).map_err(|source| StartError::FdSet {
            what: format!("backing image {name} of {what}"),
            source,
        })?;
        if let Some(fd) = fd {
            layer.image = BlockImage::Fd { fd, name };
        }
    }
    resolve_layer_fdsets(&mut layer.format, fdsets, what)
}

/// Opens every NIC's tap: libvirt's inherited `fd=N`, or `ifname=` through
/// /dev/net/tun. The vhost-net fds libvirt opened (`vhostfd=`) are closed:
/// ferry has no vhost-net, and the guest cannot tell.
fn open_taps(config: &mut MachineConfig) -> Result<(), StartError> {
    use ferry_vmm::devices::virtio::net::{parse_mac, NetConfig, Tap};
    let fail = |nic: &crate::argv::NicConfig, e: String| {
        StartError::Backend(BackendError::Engine(format!(
            "NIC {}: {e}",
            nic.id.as_deref().unwrap_or(&nic.netdev)
        )))
    };
    let mut taps = Vec::new();
    for nic in &config.nics {
        let tap = match &nic.tap {
            crate::argv::TapSource::Fd(n) => std::sync::Arc::new(
                crate::fd::adopt_inherited(*n)
                    .map_err(|e| fail(nic, format!("tap fd {n}: {e}")))?,
            ),
            crate::argv::TapSource::Ifname(name) => {
                Tap::open(name).map_err(|e| fail(nic, e.to_string()))?
            }
        };
        for v in &nic.vhost_fds {
            drop(
                crate::fd::adopt_inherited(*v)
                    .map_err(|e| fail(nic, format!("vhostfd {v}: {e}")))?,
            );
        }
        let mac = parse_mac(&nic.mac).map_err(|e| fail(nic, e.to_string()))?;
        taps.push(NetConfig { tap, mac });
    }
    config.taps = taps;
    Ok(())
}

/// `main` in library form; returns the exit status.
pub fn run(args: &[String]) -> i32 {
    match start(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry-qemu: {e}");
            if matches!(
                e,
                StartError::Argv(
                    ArgvError::Unsupported { .. } | ArgvError::UnsupportedBecause { .. }
                )
            ) {
                eprintln!("ferry-qemu: {UNSUPPORTED_HINT}");
            }
            linger_for_libvirt(args);
            EXIT_FAILURE
        }
    }
}

/// How long a refused start waits for libvirt to connect to its monitor.
const LINGER: std::time::Duration = std::time::Duration::from_secs(3);

/// On a refused start, before exiting: waits (up to [`LINGER`]) until a
/// client connects to a monitor whose listening socket was passed to us
/// (libvirt's `-chardev socket,fd=N,server=on`). libvirt connects right after
/// it started us; if we were gone by then, it would report only "failed to
/// connect to monitor socket" unless it saw our process reaped, a race that
/// load decides. Connected, it sees the monitor close and reports "qemu
/// unexpectedly closed the monitor" with our error from the log, every time.
fn linger_for_libvirt(args: &[String]) {
    let Ok(inv) = argv::parse(args.get(1..).unwrap_or_default()) else {
        return;
    };
    let fds: Vec<i32> = inv
        .monitors
        .iter()
        .filter_map(|m| inv.chardevs.iter().find(|c| c.id == m.chardev))
        .filter_map(|c| match &c.backend {
            argv::ChardevBackend::Socket(argv::SocketAddr {
                endpoint: argv::SocketEndpoint::Fd(fd),
                server: true,
                ..
            }) => Some(*fd),
            _ => None,
        })
        .collect();
    let listeners: Vec<std::os::unix::net::UnixListener> = fds
        .into_iter()
        .filter_map(|fd| ferry_kvm::fd::adopt_inherited(fd).ok())
        .map(std::os::unix::net::UnixListener::from)
        .filter(|l| l.set_nonblocking(true).is_ok())
        .collect();
    if listeners.is_empty() {
        return;
    }
    let deadline = std::time::Instant::now() + LINGER;
    while std::time::Instant::now() < deadline {
        if listeners.iter().any(|l| l.accept().is_ok()) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn start(args: &[String]) -> Result<i32, StartError> {
    let inv = argv::parse(args.get(1..).unwrap_or_default())?;
    match inv.mode {
        Mode::Version => {
            println!(
                "QEMU emulator version 7.2.0 (ferry-qemu {})",
                env!("CARGO_PKG_VERSION")
            );
            return Ok(0);
        }
        Mode::Help => {
            println!("usage: ferry-qemu [options]\n\nA QEMU-compatible front end to ferry, for libvirt. Options:");
            for (name, takes_arg) in argv::OPTIONS {
                println!("  -{name}{}", if *takes_arg { " ARG" } else { "" });
            }
            return Ok(0);
        }
        Mode::Run => {}
    }
    let config = inv.machine_config()?;
    let objects = crate::commands::load_objects(&inv.objects)?;
    let daemon_child = std::env::var_os(DAEMON_ENV).is_some();
    if inv.daemonize && !daemon_child {
        return daemonize_parent(args);
    }
    if let Some(opts) = &inv.sandbox {
        let policy = crate::exec::SandboxPolicy::from_opts(opts)?;
        crate::exec::apply_sandbox(policy);
        if policy.deny_spawn {
            eprintln!(
                "ferry-qemu: warning: -sandbox: spawn=deny is enforced (exec: URIs are \
                 refused); ferry-qemu installs no seccomp filter for the other settings"
            );
        }
    }

    // Before any thread exists, so that every thread inherits the mask.
    let signals = termination_signals();
    signals
        .thread_block()
        .map_err(|e| StartError::Daemonize(format!("cannot block signals: {e}")))?;
    let events = EventSink::new();
    let mut fdsets = FdSets::new();
    for a in &inv.add_fds {
        let fd = crate::fd::adopt_inherited(a.fd)
            .map_err(|source| StartError::AddFd { fd: a.fd, source })?;
        fdsets.entry(a.set).or_default().push(FdSetEntry {
            fd,
            opaque: a.opaque.clone(),
        });
    }
    let mut config = config;
    if let Some(c) = &mut config {
        resolve_fdsets(c, &fdsets)?;
        open_taps(c)?;
    }
    let mut vm = Vm::new(
        select_backend(&inv, events.clone()),
        inv.clone(),
        config.clone(),
        events.clone(),
    );
    vm.fdsets = fdsets;
    vm.objects = objects;
    spawn_signal_thread(signals, events)?;
    let listeners = open_monitors(&inv, &mut vm)?;
    if let Some(p) = &inv.pidfile {
        write_pidfile(p)?;
    }
    if daemon_child {
        nix::unistd::setsid().map_err(|e| StartError::Daemonize(format!("setsid: {e}")))?;
        let mut out = std::io::stdout();
        writeln!(out, "{READY}")
            .and_then(|()| out.flush())
            .map_err(|e| StartError::Daemonize(e.to_string()))?;
        let null = File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|e| StartError::Daemonize(e.to_string()))?;
        for r in [
            nix::unistd::dup2_stdout(&null),
            nix::unistd::dup2_stderr(&null),
        ] {
            r.map_err(|e| StartError::Daemonize(e.to_string()))?;
        }
    }
    if let Some(cfg) = &config {
        vm.backend.create(cfg)?;
        let serials: Vec<ChardevInfo> = vm
            .backend
            .serial_chardevs()
            .into_iter()
            .map(|(label, filename)| ChardevInfo { label, filename })
            .collect();
        vm.chardevs.splice(0..0, serials);
    }
    let vm = Arc::new(Mutex::new(vm));
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let vm = Arc::clone(&vm);
            std::thread::spawn(move || serve_monitor(l, vm))
        })
        .collect();
    if threads.is_empty() {
        // No monitor: nothing can ever talk to us; wait for a signal.
        loop {
            std::thread::park();
        }
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(0)
}

/// Binds or adopts every monitor socket; records them for `query-chardev`.
fn open_monitors(inv: &Invocation, vm: &mut Vm) -> Result<Vec<UnixListener>, StartError> {
    let mut out = Vec::new();
    for m in &inv.monitors {
        let Some(c) = inv.chardevs.iter().find(|c| c.id == m.chardev) else {
            continue; // checked by machine_config()
        };
        let ChardevBackend::Socket(sock) = &c.backend else {
            continue;
        };
        let err = |source| StartError::Monitor {
            id: c.id.clone(),
            source,
        };
        let (listener, path) = match &sock.endpoint {
            SocketEndpoint::Unix(path) => {
                // QEMU replaces a stale socket file.
                if std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ = std::fs::remove_file(path);
                }
                (
                    UnixListener::bind(path).map_err(err)?,
                    path.display().to_string(),
                )
            }
            SocketEndpoint::Fd(n) => {
                let fd = crate::fd::adopt_inherited(*n).map_err(err)?;
                let listening = getsockopt(&fd, sockopt::AcceptConn)
                    .map_err(|e| err(std::io::Error::from(e)))?;
                if !listening {
                    return Err(err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("fd {n} is not a listening socket"),
                    )));
                }
                let path = getsockname::<UnixAddr>(fd.as_raw_fd())
                    .ok()
                    .and_then(|a| a.path().map(|p| p.display().to_string()))
                    .unwrap_or_default();
                (UnixListener::from(fd), path)
            }
            SocketEndpoint::Tcp { .. } => continue, // refused by policy
        };
        vm.chardevs.push(ChardevInfo {
            label: c.id.clone(),
            filename: format!("unix:{path},server=on"),
        });
        out.push(listener);
    }
    Ok(out)
}

/// Writes our pid and keeps the file locked for the process's lifetime.
fn write_pidfile(path: &Path) -> Result<(), StartError> {
    let err = |source| StartError::Pidfile {
        path: path.display().to_string(),
        source,
    };
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(err)?;
    let mut locked = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| err(std::io::Error::from(e)))?;
    locked.set_len(0).map_err(err)?;
    writeln!(locked, "{}", std::process::id()).map_err(err)?;
    locked.flush().map_err(err)?;
    // The lock lives as long as the process, like QEMU's.
    Box::leak(Box::new(locked));
    Ok(())
}

fn daemonize_parent(args: &[String]) -> Result<i32, StartError> {
    let exe = std::env::current_exe().map_err(|e| StartError::Daemonize(e.to_string()))?;
    let mut child = Command::new(exe)
        .args(args.get(1..).unwrap_or_default())
        .env(DAEMON_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| StartError::Daemonize(format!("cannot start the daemon: {e}")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| StartError::Daemonize("no pipe to the daemon".into()))?;
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    if line.trim_end() == READY {
        return Ok(0);
    }
    // The child failed before it was ready: relay why.
    let mut why = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut why);
    }
    let _ = child.wait();
    eprint!("{why}");
    Ok(EXIT_FAILURE)
}
