//! Outgoing live migration: the engine's pre-copy (`ferry_vmm::migration::migrate`)
//! behind QMP's `migrate`, `migrate_cancel`, `migrate-continue`,
//! `migrate-set-parameters` and `query-migrate`.
//!
//! The engine runs a whole migration in the thread that owns the guest, so
//! `migrate` moves the guest out of `Inner` into a `migration` thread and
//! puts it back when the engine returns. Meanwhile `query-status` answers
//! from the QMP run state and `query-migrate` from the engine's statistics;
//! commands that need the guest itself (`stop`, `cont`, `pmemsave`) are
//! refused until the migration ends.
//!
//! Events, as QEMU 7.2 sends them on the source:
//!
//! ```text
//!  migrate ──▶ MIGRATION setup (before the reply: libvirt looks right after)
//!              MIGRATION active, MIGRATION_PASS n after every pass
//!              STOP, MIGRATION pre-switchover   (pause-before-switchover;
//!                                                migrate-continue goes on)
//!              [STOP,] MIGRATION device
//!              MIGRATION completed              run state postmigrate
//!  or          [RESUME,] MIGRATION failed/cancelled (the guest runs on)
//! ```
//!
//! The terminal event is sent only once the guest is back in `Inner`, so a
//! client that reacts to it (libvirt's `cont` after a failure) finds it there.
//!
//! With the multifd capability, the engine proposes `multifd-channels` page
//! streams and the destination answers how many it takes. Fewer than
//! proposed means the destination has multifd off or fewer channels; QEMU
//! fails such a migration, and so does ferry-qemu, right after the handshake
//! (`setup` → `failed`, the guest never stopped), naming both numbers.

use std::os::fd::{AsFd, AsRawFd};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ferry_vmm::migration::transport::Breaker;
use ferry_vmm::migration::{
    self, Channel, MigrationControl, MigrationError, MigrationEvent, MigrationOutcome,
    MigrationParams, MigrationUri, VcpuHold,
};
use serde_json::json;

use super::{state_name, FerryBackend, Guest, Shared};
use crate::backend::*;
use crate::exec::StreamEnd;

/// How long `Channel::connect` may take for `tcp:`/`unix:`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After `migrate_cancel`, how long the engine gets to notice by itself
/// before the channel is shut down under it (a peer that stopped reading
/// blocks the sender in `write`).
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// A live migration in flight, or the last one (for `query-migrate`).
#[derive(Debug)]
pub(super) struct Outgoing {
    ctl: Arc<MigrationControl>,
    start: Instant,
    /// The guest ran when the migration started (STOP/RESUME are sent then).
    was_running: bool,
    /// STOP was sent at the switch-over.
    stopped: bool,
    /// Bytes on the wire when the guest stopped (`precopy-bytes`).
    precopy_bytes: Option<u64>,
    cancel_requested: bool,
    /// Set once the engine returned.
    done: Arc<AtomicBool>,
    breaker: Option<Arc<Breaker>>,
    /// Stops and restarts the vCPUs while the migration thread owns the guest.
    hold: VcpuHold,
    /// QMP `stop` came during the migration (and no `cont` since).
    user_stopped: bool,
    /// Why the migration was stopped after the handshake: the destination
    /// took fewer page streams than multifd-channels.
    mismatch: Option<String>,
}

/// Whether `fd` is a socket (a peer that can answer) rather than a file or pipe.
pub(super) fn is_socket(fd: &impl AsFd) -> bool {
    nix::sys::stat::fstat(fd.as_fd()).is_ok_and(|st| (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK)
}

/// QMP's `max-bandwidth` (0 = no cap, as in QEMU) for the engine. The engine
/// also takes 0 as "no cap" but then never restarts its rate window, so a cap
/// set later in flight would first sleep off every byte sent since the start;
/// a huge cap keeps the window rolling and caps nothing.
fn engine_bandwidth(bytes_per_sec: u64) -> u64 {
    if bytes_per_sec == 0 {
        u64::MAX >> 1
    } else {
        bytes_per_sec
    }
}

/// `tcp:ADDR` as the engine's URI (checks the port).
pub(super) fn tcp_uri(addr: &str) -> Result<MigrationUri, BackendError> {
    format!("tcp:{addr}")
        .parse()
        .map_err(|e: migration::TransportError| BackendError::Migration(e.to_string()))
}

pub(super) fn in_progress(status: Option<MigrationStatus>) -> bool {
    matches!(
        status,
        Some(
            MigrationStatus::Setup
                | MigrationStatus::Active
                | MigrationStatus::PreSwitchover
                | MigrationStatus::Device
                | MigrationStatus::Cancelling
        )
    )
}

/// Opens the channel to the destination (on the migration thread: a
/// connect may take a while). `exec:` gets a shell whose stdin is the stream.
fn open_channel(target: MigrationTarget) -> Result<(Channel, Option<Child>), String> {
    let uri = match target {
        MigrationTarget::Tcp(a) => tcp_uri(&a).map_err(|e| e.to_string())?,
        MigrationTarget::Unix(p) => MigrationUri::Unix(p),
        MigrationTarget::File(p) => MigrationUri::File(p),
        MigrationTarget::Fd(fd) => {
            let uri = MigrationUri::Fd(fd.as_raw_fd());
            return Channel::from_owned_fd(fd, &uri)
                .map(|c| (c, None))
                .map_err(|e| e.to_string());
        }
        MigrationTarget::Exec(cmd) => {
            let (child, fd) = crate::exec::spawn_exec(&cmd, StreamEnd::Stdin)?;
            let uri = MigrationUri::Fd(fd.as_raw_fd());
            return Channel::from_owned_fd(fd, &uri)
                .map(|c| (c, Some(child)))
                .map_err(|e| e.to_string());
        }
    };
    Channel::connect(&uri, CONNECT_TIMEOUT)
        .map(|c| (c, None))
        .map_err(|e| e.to_string())
}

impl FerryBackend {
    /// Starts a live migration of the guest to `target`; see the module docs.
    pub(super) fn start_live(
        &self,
        target: MigrationTarget,
        params: &MigrationParameters,
        caps: &MigrationCapabilities,
    ) -> Result<(), BackendError> {
        let in_flight = self
            .shared
            .migration
            .lock()
            .map(|m| m.status)
            .ok()
            .flatten();
        if in_progress(in_flight) {
            return Err(BackendError::Migration(
                "There's a migration process in progress".into(),
            ));
        }
        let tls = self.shared.lock()?.tls.clone();
        let ctl = MigrationControl::new(MigrationParams {
            downtime_limit_ms: params.downtime_limit_ms,
            max_bandwidth: engine_bandwidth(params.max_bandwidth),
            pause_before_switchover: caps.pause_before_switchover,
            multifd_channels: params.streams(caps),
            throttle: params.throttle(caps),
            max_throttle_pct: params.max_cpu_throttle,
            tls: tls.as_ref().map(|t| t.creds.clone()),
            tls_hostname: tls.and_then(|t| t.hostname),
            ..MigrationParams::default()
        });
        let (guest, before) = {
            let mut inner = self.shared.lock()?;
            if inner.state == RunState::InMigrate {
                return Err(BackendError::Migration(
                    "Guest is waiting for an incoming migration".into(),
                ));
            }
            let Some(guest) = inner.guest.take() else {
                return Err(BackendError::BadState {
                    operation: "migrate",
                    state: state_name(inner.state),
                });
            };
            inner.migrating = true;
            (guest, inner.state)
        };
        let done = Arc::new(AtomicBool::new(false));
        if let Ok(mut o) = self.shared.outgoing.lock() {
            *o = Some(Outgoing {
                ctl: Arc::clone(&ctl),
                start: Instant::now(),
                was_running: guest.is_running(),
                stopped: false,
                precopy_bytes: None,
                cancel_requested: false,
                done: Arc::clone(&done),
                breaker: None,
                hold: guest.hold_handle(),
                user_stopped: false,
                mismatch: None,
            });
        }
        let weak = Arc::downgrade(&self.shared);
        ctl.on_event(move |ev| on_event(&weak, ev));
        self.shared.set_migration(|m| *m = MigrationInfo::default());
        self.shared.migration_status(MigrationStatus::Setup);
        let shared = Arc::clone(&self.shared);
        // The guest goes to the thread once it runs: if it cannot start, the
        // guest is still here to put back, running as before.
        let (give, take) = std::sync::mpsc::sync_channel::<Guest>(1);
        let spawned = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                let Ok(mut guest) = take.recv() else { return };
                let result = match open_channel(target) {
                    Ok((channel, child)) => {
                        if let (Ok(b), Ok(mut o)) = (channel.breaker(), shared.outgoing.lock()) {
                            if let Some(o) = o.as_mut() {
                                o.breaker = Some(Arc::new(b));
                            }
                        }
                        let r = migration::migrate(&mut guest, channel, &ctl).map_err(|e| {
                            (e.to_string(), matches!(e, MigrationError::Unconfirmed(_)))
                        });
                        if let Some(mut c) = child {
                            let _ = c.wait();
                        }
                        r
                    }
                    Err(e) => Err((e, false)),
                };
                done.store(true, Ordering::Release);
                finish(&shared, guest, before, result);
            });
        let (guest, why) = match spawned {
            Ok(_) => match give.send(guest) {
                Ok(()) => return Ok(()),
                Err(std::sync::mpsc::SendError(g)) => {
                    (g, "the migration thread ended before it began".to_string())
                }
            },
            Err(e) => (guest, format!("cannot start the migration thread: {e}")),
        };
        self.put_back(guest, &why);
        Err(BackendError::Migration(why))
    }

    /// A migration that never began: the guest goes back as it was (it was
    /// not paused), and query-migrate says why it failed.
    fn put_back(&self, guest: Guest, why: &str) {
        if let Ok(mut o) = self.shared.outgoing.lock() {
            *o = None;
        }
        if let Ok(mut inner) = self.shared.lock() {
            inner.set_guest(guest);
            inner.migrating = false;
        }
        self.shared
            .set_migration(|m| m.error_desc = Some(why.to_string()));
        self.shared.migration_status(MigrationStatus::Failed);
    }

    /// `migrate_cancel`: asks the engine to stop; the guest runs on.
    pub(super) fn cancel_live(&self) {
        let Ok(mut o) = self.shared.outgoing.lock() else {
            return;
        };
        let Some(o) = o.as_mut() else { return };
        let status = self.shared.migration.lock().ok().and_then(|m| m.status);
        if o.done.load(Ordering::Acquire) || o.cancel_requested || !in_progress(status) {
            return;
        }
        o.cancel_requested = true;
        self.shared.migration_status(MigrationStatus::Cancelling);
        o.ctl.cancel();
        let (done, breaker) = (Arc::clone(&o.done), o.breaker.clone());
        let _ = std::thread::Builder::new()
            .name("migration-cancel".into())
            .spawn(move || {
                std::thread::sleep(CANCEL_GRACE);
                if !done.load(Ordering::Acquire) {
                    if let Some(b) = breaker {
                        b.break_channel();
                    }
                }
            });
    }

    /// QMP `stop` while the migration runs: the vCPUs leave the guest (so it
    /// dirties nothing more) and the migration goes on, as in QEMU; the guest
    /// stays stopped whatever the outcome, until `cont`.
    pub(super) fn stop_live(&self) -> Result<(), BackendError> {
        let Ok(mut o) = self.shared.outgoing.lock() else {
            return Err(BackendError::Engine(
                "the migration state is poisoned".into(),
            ));
        };
        let Some(o) = o.as_mut().filter(|o| !o.done.load(Ordering::Acquire)) else {
            return Ok(());
        };
        if o.user_stopped || o.stopped || !o.was_running {
            // Already stopped (by `stop`, by the switch-over, or before).
            return Ok(());
        }
        o.hold.hold();
        o.user_stopped = true;
        if let Ok(mut inner) = self.shared.inner.lock() {
            inner.state = RunState::Paused;
        }
        self.shared.events.emit("STOP", None);
        Ok(())
    }

    /// QMP `cont` while the migration runs: undoes a `stop` given during it.
    pub(super) fn cont_live(&self) -> Result<(), BackendError> {
        let Ok(mut o) = self.shared.outgoing.lock() else {
            return Err(BackendError::Engine(
                "the migration state is poisoned".into(),
            ));
        };
        let Some(o) = o.as_mut().filter(|o| !o.done.load(Ordering::Acquire)) else {
            return Ok(());
        };
        if o.stopped {
            return Err(BackendError::BadState {
                operation: "cont",
                state: "finish-migrate",
            });
        }
        if !o.user_stopped {
            if o.was_running {
                return Ok(());
            }
            return Err(BackendError::Migration(
                "the guest was stopped when the migration began; ferry-qemu starts it \
                 only after the migration ends (cancel it first)"
                    .into(),
            ));
        }
        o.hold.release();
        o.user_stopped = false;
        if let Ok(mut inner) = self.shared.inner.lock() {
            inner.state = RunState::Running;
        }
        self.shared.events.emit("RESUME", None);
        Ok(())
    }

    /// `migrate-continue`: leaves `pre-switchover`.
    pub(super) fn continue_live(&self, state: MigrationStatus) -> Result<(), BackendError> {
        let current = self
            .shared
            .migration
            .lock()
            .ok()
            .and_then(|m| m.status)
            .unwrap_or(MigrationStatus::None);
        if current != state || state != MigrationStatus::PreSwitchover {
            return Err(BackendError::Migration(format!(
                "Migration not in expected state: {}",
                current.as_str()
            )));
        }
        if let Ok(o) = self.shared.outgoing.lock() {
            if let Some(o) = o.as_ref() {
                o.ctl.resume_switchover();
            }
        }
        Ok(())
    }
}

/// Engine events → QMP events and run states (on the migration thread).
fn on_event(shared: &Weak<Shared>, ev: &MigrationEvent) {
    let Some(shared) = shared.upgrade() else {
        return;
    };
    let status = match ev {
        MigrationEvent::Pass(n) => {
            shared
                .events
                .emit("MIGRATION_PASS", Some(json!({"pass": n})));
            return;
        }
        MigrationEvent::Status(s) => *s,
    };
    use migration::MigrationStatus as E;
    let (next, switchover) = match status {
        E::Active => (MigrationStatus::Active, false),
        E::PreSwitchover => (MigrationStatus::PreSwitchover, true),
        E::Device => (MigrationStatus::Device, true),
        // `setup` went out with the reply to `migrate`; the end is sent by
        // `finish` once the guest is back.
        _ => return,
    };
    let mut cancelling = false;
    if let Ok(mut o) = shared.outgoing.lock() {
        if let Some(o) = o.as_mut() {
            if next == MigrationStatus::Active && o.mismatch.is_none() {
                o.mismatch = streams_mismatch(&o.ctl);
                if o.mismatch.is_some() {
                    // Pages have not flowed yet: the guest runs on, and the
                    // end (`failed`) is sent by `finish`.
                    o.ctl.cancel();
                }
            }
            if o.mismatch.is_some() {
                return;
            }
            cancelling = o.cancel_requested;
            if next == MigrationStatus::Active && o.stopped {
                // The switch-over would have overrun the downtime limit: the
                // guest runs again and pre-copy goes on (as it stopped, so
                // it resumes, with its RESUME).
                o.stopped = false;
                o.precopy_bytes = None;
                let runs = o.was_running && !o.user_stopped;
                if let Ok(mut inner) = shared.inner.lock() {
                    inner.state = if runs {
                        RunState::Running
                    } else {
                        RunState::Paused
                    };
                }
                if runs {
                    shared.events.emit("RESUME", None);
                }
            }
            if switchover && o.precopy_bytes.is_none() {
                o.precopy_bytes = Some(o.ctl.stats().ram.transferred);
            }
            if switchover && !o.stopped {
                o.stopped = true;
                if let Ok(mut inner) = shared.inner.lock() {
                    inner.state = RunState::FinishMigrate;
                }
                // A guest stopped by QMP `stop` meanwhile had its STOP already.
                if o.was_running && !o.user_stopped {
                    shared.events.emit("STOP", None);
                }
            }
        }
    }
    let current = shared.migration.lock().ok().and_then(|m| m.status);
    if !cancelling && current != Some(next) {
        shared.migration_status(next);
    }
}

/// With multifd: why the streams the destination took (the engine's figure,
/// set before `active`) do not do, if they do not.
fn streams_mismatch(ctl: &MigrationControl) -> Option<String> {
    let wanted = ctl.params().multifd_channels;
    let took = ctl.stats().streams;
    (wanted > 1 && took < wanted).then(|| {
        format!(
            "the destination took {took} of the {wanted} page streams (multifd-channels) \
             offered: multifd is off there or its multifd-channels is lower; set the multifd \
             capability and multifd-channels alike on both sides (virsh migrate --parallel \
             does)"
        )
    })
}

/// Puts the guest back and sends the last event.
fn finish(
    shared: &Shared,
    mut guest: Guest,
    before: RunState,
    result: Result<MigrationOutcome, (String, bool)>,
) {
    let (cancel_requested, stopped, user_stopped, mismatch) = shared
        .outgoing
        .lock()
        .ok()
        .and_then(|o| {
            o.as_ref().map(|o| {
                (
                    o.cancel_requested,
                    o.stopped,
                    o.user_stopped,
                    o.mismatch.clone(),
                )
            })
        })
        .unwrap_or((false, false, false, None));
    // Stopped for a stream mismatch: that is the reason, not the cancel that
    // stopped the engine.
    let result = match (result, mismatch) {
        (Err((_, unconfirmed)), Some(why)) => Err((why, unconfirmed)),
        (r, _) => r,
    };
    // A `stop` during the migration becomes a real pause now.
    let held = guest.take_hold().unwrap_or_else(|e| {
        tracing::warn!("cannot pause the held guest: {e}");
        true
    });
    let before = if user_stopped || held {
        RunState::Paused
    } else {
        before
    };
    let running = guest.is_running();
    let mut resumed = false;
    let status = {
        let Ok(mut inner) = shared.inner.lock() else {
            return;
        };
        // What changed while the migration held the guest (the announce
        // schedule, the balloon's stats interval) applies now.
        inner.set_guest(guest);
        inner.migrating = false;
        match &result {
            Ok(_) => {
                inner.state = RunState::PostMigrate;
                MigrationStatus::Completed
            }
            Err((_, unconfirmed)) => {
                inner.state = if running {
                    resumed = stopped;
                    RunState::Running
                } else if *unconfirmed {
                    // The destination may run the guest: it stays stopped
                    // here until someone checks (see MigrationError::Unconfirmed).
                    RunState::Paused
                } else {
                    before
                };
                if cancel_requested && !unconfirmed {
                    MigrationStatus::Cancelled
                } else {
                    MigrationStatus::Failed
                }
            }
        }
    };
    if let Err((e, _)) = &result {
        tracing::warn!("live migration failed: {e}");
        let e = e.clone();
        shared.set_migration(|m| m.error_desc = Some(e));
    }
    if resumed {
        shared.events.emit("RESUME", None);
    }
    shared.migration_status(status);
}

/// `migrate-set-parameters` during a live migration.
pub(super) fn set_params(shared: &Shared, p: &MigrationParameters) {
    if let Ok(o) = shared.outgoing.lock() {
        if let Some(o) = o.as_ref().filter(|o| !o.done.load(Ordering::Acquire)) {
            o.ctl.set_params(|x| {
                x.downtime_limit_ms = p.downtime_limit_ms;
                x.max_bandwidth = engine_bandwidth(p.max_bandwidth);
                x.max_throttle_pct = p.max_cpu_throttle;
                if let ferry_vmm::migration::ThrottlePolicy::Qemu {
                    initial,
                    increment,
                    tailslow,
                    trigger_threshold,
                } = &mut x.throttle
                {
                    *initial = p.cpu_throttle_initial;
                    *increment = p.cpu_throttle_increment;
                    *tailslow = p.cpu_throttle_tailslow;
                    *trigger_threshold = p.throttle_trigger_threshold;
                }
            });
        }
    }
}

/// Adds the engine's figures to `query-migrate` (QEMU's shape: `ram` once
/// pages flow, `expected-downtime` while active, `downtime` once completed).
pub(super) fn fill_info(shared: &Shared, info: &mut MigrationInfo) {
    let Ok(o) = shared.outgoing.lock() else {
        return;
    };
    let Some(o) = o.as_ref() else { return };
    let Some(status) = info.status else { return };
    let st = o.ctl.stats();
    let done = o.done.load(Ordering::Acquire);
    info.setup_time_ms = Some(st.setup_time);
    info.total_time_ms = Some(if done {
        st.total_time
    } else {
        o.start.elapsed().as_millis() as u64
    });
    info.cpu_throttle_percentage = Some(u64::from(st.cpu_throttle_percentage));
    info.switchover_returns = Some(u64::from(st.switchover_returns));
    match status {
        MigrationStatus::Setup => {}
        MigrationStatus::Completed => info.downtime_ms = Some(st.downtime),
        MigrationStatus::Failed | MigrationStatus::Cancelled => {}
        // The engine's estimate, live (the limit until a rate is measured).
        _ => info.expected_downtime_ms = Some(st.expected_downtime),
    }
    if status != MigrationStatus::Setup {
        let r = &st.ram;
        let precopy = o.precopy_bytes.unwrap_or(r.transferred);
        info.ram = Some(MigrationRamStats {
            transferred: r.transferred,
            remaining: r.remaining,
            total: r.total,
            duplicate: r.duplicate,
            normal: r.normal,
            normal_bytes: r.normal_bytes,
            dirty_sync_count: r.dirty_sync_count,
            page_size: r.page_size,
            mbps: r.mbps,
            dirty_pages_rate: r.dirty_pages_rate,
            pages_per_second: r.pages_per_second,
            precopy_bytes: precopy,
            downtime_bytes: r.transferred.saturating_sub(precopy),
            // Every page goes over the page streams once there are several
            // (the main connection is stream 0).
            multifd_bytes: if st.streams > 1 { r.transferred } else { 0 },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_told_from_pipes_and_files() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        assert!(is_socket(&a));
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        assert!(!is_socket(&r));
        let f = tempfile::tempfile().expect("file");
        assert!(!is_socket(&f));
    }

    #[test]
    fn tcp_uris_need_a_port() {
        assert!(tcp_uri("127.0.0.1:4444").is_ok());
        assert!(tcp_uri("[::]:49152").is_ok());
        let e = tcp_uri("host").expect_err("no port").to_string();
        assert!(e.contains("unsupported migration URI"), "{e}");
    }
}
