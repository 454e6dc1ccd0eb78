//! Outgoing live migration: the engine's source endpoint (`ferry_vmm::migration::Source`)
//! behind QMP's `migrate`, `migrate_cancel`, `migrate-continue`,
//! `migrate-set-parameters` and `query-migrate`.
//!
//! The engine runs a whole migration on a thread that owns the guest, so
//! `migrate` moves the guest out of `Inner` into `Source::start` and puts it
//! back when the engine hands it back. Meanwhile `query-status` answers
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
//! fails such a migration, and so does the engine under `exact_streams`,
//! right after the handshake (`setup` → `failed`, the guest never stopped),
//! naming both numbers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use ferry_vmm::migration::{
    self, MigrationControl, MigrationError, MigrationEvent, MigrationParams, MigrationStats,
    MigrationUri, Source, Target,
};
use ferry_vmm::throttle::VcpuHold;
use serde_json::json;

use super::{state_name, BackendShared, FerryBackend, Guest};
use crate::backend::*;

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
    /// Set once the engine handed the guest back.
    done: Arc<AtomicBool>,
    /// Stops and restarts the vCPUs while the migration thread owns the guest.
    hold: VcpuHold,
    /// QMP `stop` came during the migration (and no `cont` since).
    user_stopped: bool,
}

/// `tcp:ADDR` as the engine's URI (checks the port).
pub(super) fn tcp_uri(addr: &str) -> Result<MigrationUri, BackendError> {
    format!("tcp:{addr}")
        .parse()
        .map_err(|e: migration::TransportError| BackendError::Migration(e.to_string()))
}

/// QMP's migration target as the engine's.
pub(super) fn target(t: MigrationTarget) -> Result<Target, BackendError> {
    Ok(match t {
        MigrationTarget::Tcp(a) => Target::Uri(tcp_uri(&a)?),
        MigrationTarget::Unix(p) => Target::Uri(MigrationUri::Unix(p)),
        MigrationTarget::File(p) => Target::Uri(MigrationUri::File(p)),
        MigrationTarget::Fd(fd) => Target::Fd(fd),
        MigrationTarget::Exec(cmd) => Target::Exec(cmd),
    })
}

/// A migration's failure as QMP reports it.
pub(super) fn migration_error(e: &MigrationError) -> BackendError {
    BackendError::Migration(ferry_vmm::error_chain(e))
}

impl FerryBackend {
    /// Starts a live migration of the guest to `target`; see the module docs.
    pub(super) fn start_live(
        &self,
        target: Target,
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
        if in_flight.is_some_and(MigrationStatus::in_progress) {
            return Err(BackendError::Migration(
                "There's a migration process in progress".into(),
            ));
        }
        let tls = self.shared.lock()?.tls.clone();
        let ctl = MigrationControl::new(MigrationParams {
            downtime_limit_ms: params.downtime_limit_ms,
            max_bandwidth: params.max_bandwidth,
            pause_before_switchover: caps.pause_before_switchover,
            multifd_channels: params.streams(caps),
            exact_streams: true,
            postcopy: caps.postcopy_ram,
            max_postcopy_bandwidth: params.max_postcopy_bandwidth,
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
                hold: guest.hold_handle(),
                user_stopped: false,
            });
        }
        let weak = Arc::downgrade(&self.shared);
        ctl.on_event(move |ev| on_event(&weak, ev));
        self.shared.set_migration(|m| *m = MigrationInfo::default());
        self.shared.migration_status(MigrationStatus::Setup);
        let shared = Arc::clone(&self.shared);
        let started = Source::start(guest, target, &ctl, move |guest, result| {
            done.store(true, Ordering::Release);
            finish(&shared, guest, before, result);
        });
        match started {
            // The thread ends by itself once the guest is back.
            Ok(_) => Ok(()),
            Err(not) => {
                let error = migration_error(&not.error);
                self.put_back(not.vm, &error.to_string());
                Err(error)
            }
        }
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
        if o.done.load(Ordering::Acquire)
            || o.cancel_requested
            || !status.is_some_and(MigrationStatus::in_progress)
        {
            return;
        }
        o.cancel_requested = true;
        self.shared.migration_status(MigrationStatus::Cancelling);
        // The engine breaks the migration's connections: a sender blocked on
        // a peer that stopped reading returns at once.
        o.ctl.cancel();
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

    /// `migrate-start-postcopy`: the engine switches at its next batch.
    pub(super) fn start_postcopy(&self) -> Result<(), BackendError> {
        let o = self
            .shared
            .outgoing
            .lock()
            .map_err(|_| BackendError::Engine("the migration state is poisoned".into()))?;
        let status = self.shared.migration.lock().ok().and_then(|m| m.status);
        match o.as_ref() {
            Some(o) if status.is_some_and(MigrationStatus::in_progress) => {
                o.ctl.start_postcopy().map_err(|_| {
                    BackendError::Migration(
                        "Enable postcopy with migrate_set_capability before the start of \
                         migration"
                            .into(),
                    )
                })
            }
            _ => Err(BackendError::Migration(
                "Postcopy must be started after migration has been started".into(),
            )),
        }
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
fn on_event(shared: &Weak<BackendShared>, ev: &MigrationEvent) {
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
        E::PostcopyActive => (MigrationStatus::PostcopyActive, true),
        // `setup` went out with the reply to `migrate`; the end is sent by
        // `finish` once the guest is back.
        _ => return,
    };
    let mut cancelling = false;
    if let Ok(mut o) = shared.outgoing.lock() {
        if let Some(o) = o.as_mut() {
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

/// Puts the guest back and sends the last event.
fn finish(
    shared: &BackendShared,
    mut guest: Guest,
    before: RunState,
    result: Result<MigrationStats, MigrationError>,
) {
    let (cancel_requested, stopped, user_stopped) = shared
        .outgoing
        .lock()
        .ok()
        .and_then(|o| {
            o.as_ref()
                .map(|o| (o.cancel_requested, o.stopped, o.user_stopped))
        })
        .unwrap_or((false, false, false));
    let result = result.map_err(|e| {
        let unconfirmed = matches!(e, MigrationError::Unconfirmed(_));
        (ferry_vmm::error_chain(&e), unconfirmed)
    });
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
pub(super) fn set_params(shared: &BackendShared, p: &MigrationParameters) {
    if let Ok(o) = shared.outgoing.lock() {
        if let Some(o) = o.as_ref().filter(|o| !o.done.load(Ordering::Acquire)) {
            o.ctl.set_params(|x| {
                x.downtime_limit_ms = p.downtime_limit_ms;
                x.max_bandwidth = p.max_bandwidth;
                x.max_postcopy_bandwidth = p.max_postcopy_bandwidth;
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
pub(super) fn fill_info(shared: &BackendShared, info: &mut MigrationInfo) {
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
            postcopy_bytes: st.postcopy_bytes,
            postcopy_requests: st.postcopy_requests,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_uris_need_a_port() {
        assert!(tcp_uri("127.0.0.1:4444").is_ok());
        assert!(tcp_uri("[::]:49152").is_ok());
        let e = tcp_uri("host").expect_err("no port").to_string();
        assert!(e.contains("unsupported migration URI"), "{e}");
    }
}
