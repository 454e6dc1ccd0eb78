//! Live migration: iterative pre-copy over the KVM dirty log, convergence control with
//! vCPU throttling, switch-over with checkpointed device state, and the incoming side.
//!
//! ```text
//!  source                                   destination
//!  Preamble, Shape ─────────────────────────▶ check shape, create VM
//!                  ◀───────────────────────── Reply::Ready (or Reply::Error: nothing moved)
//!  dirty logging on
//!  RamPages × pass 1 (all non-zero pages) ──▶ apply (validated per batch)
//!  RamPages × pass n (dirtied since n-1) ───▶ apply
//!  ... until the rest fits the downtime limit
//!  pause vCPUs, final dirty sync
//!  RamPages (rest), Vcpus, Vm, Devices,
//!  [Digest], End ───────────────────────────▶ verify digest, load state, [resume]
//!                  ◀───────────────────────── Reply::Loaded (or Reply::Error: source resumes)
//!  free the VM
//! ```
//!
//! With `multifd-channels` N > 1 (`tcp:` and `unix:` only: `fd:` and `file:` carry
//! one stream), the handshake proposes N streams and a random session token; the
//! destination answers `Reply::Accepted { streams: n }` with n ≤ its limit, and the
//! source opens n − 1 more connections to the same address:
//!
//! ```text
//!  Preamble, Shape {streams: N, session} ─▶ check shape, create VM
//!                  ◀───────────────────────── Reply::Accepted {streams: n}
//!  connection k = 1..n-1:
//!  Preamble, Join {session, k, n} ─────────▶ session must match, k unused and < n
//!  RamPages (stripes s, s mod n = k) ──────▶ apply (each page checked to be of stream k)
//!  End ────────────────────────────────────▶ stream k complete
//! ```
//!
//! Pages are split by address into stripes of 256 KiB (`stream_of`): a page always
//! travels on the same stream, so the order of its copies across passes is that
//! stream's order, and no two receiving threads ever write the same page. The main
//! connection carries stripe 0, then the vCPU/device state and End; the source
//! finishes every extra stream before it writes the main End, and the destination
//! loads the state only once every stream reached its End. A connection with the
//! wrong session is answered with an error and ignored; a wrong index or count, a
//! page of another stripe, or any stream failing fails the migration (the source
//! resumes).
//!
//! With `postcopy` on (handshake field; the destination checks it can serve
//! missing pages, or refuses), `migrate-start-postcopy` switches before the rest is
//! small:
//!
//! ```text
//!  pause vCPUs, final dirty sync
//!  Postcopy {pages still to come},
//!  Vcpus, Vm, Devices ─────────────────────▶ drop those pages, userfaultfd on,
//!                                             load state, run the VM
//!                  ◀───────────────────────── Reply::PageRequest {gpa} (a touch)
//!  RamPages (requested first, then the
//!  rest in address order), End ────────────▶ place each page (waiters wake)
//!                  ◀───────────────────────── Reply::Loaded (every page came)
//! ```
//!
//! Any failure before `End` is sent leaves the source running with memory intact and
//! dirty logging off. A failure after `End` was sent but before `Loaded` arrived leaves
//! the source paused: the destination may be running, and two running copies must
//! never exist. In post-copy that holds from the state on: whatever fails after it,
//! the source stays paused (there is no post-copy recovery yet).

pub(crate) mod converge;
pub mod endpoint;
pub mod exec;
mod incoming;
pub(crate) mod postcopy;
mod precopy;
mod stats;
pub mod tls;
pub mod transport;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use serde::{Deserialize, Serialize};

pub use endpoint::{CheckpointSink, Destination, NotStarted, Source, Target};
pub use incoming::{
    receive, receive_streams, serve, ExtraStreams, ServeOptions, KEEPALIVE_INTERVAL,
};
pub use precopy::{migrate, ReturnPathError};
pub use stats::{MigrationStats, MigrationStatus, RamStats};
pub use tls::{CredsSpec, Endpoint, TlsCreds, TlsError, TlsSessionError};
pub use transport::{Channel, Listener, MigrationUri, TransportError};

/// Messages on the return path (destination to source).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The destination accepted the shape and built the VM: pages may flow.
    Ready,
    /// The destination loaded everything (and runs the VM if `running`).
    Loaded { running: bool },
    /// The destination refused or failed; `message` says why, for the operator.
    Error { message: String },
    /// The destination accepted the shape, built the VM and takes `streams` page
    /// streams (the answer when the source proposed more than one; 1 ≤ streams ≤
    /// the proposal).
    Accepted { streams: u32 },
    /// Post-copy: something on the destination touched the page at `gpa`
    /// before it came; the source sends it ahead of the others.
    PageRequest { gpa: u64 },
}

/// Most page streams (the main connection included) a migration may use.
pub const MAX_STREAMS: u32 = 16;

/// A stripe of guest-physical memory that always travels on one stream: 256 KiB,
/// one word of the dirty bitmap.
const STRIPE_SHIFT: u32 = 18;

/// The stream that carries the page at `gpa` when `streams` streams are in use.
pub(crate) fn stream_of(gpa: u64, streams: u32) -> u32 {
    if streams <= 1 {
        return 0;
    }
    ((gpa >> STRIPE_SHIFT) % u64::from(streams)) as u32
}

/// Tunables, in QEMU's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationParams {
    /// Longest acceptable pause of the guest at switch-over (QEMU downtime-limit).
    pub downtime_limit_ms: u64,
    /// Bandwidth cap in bytes/s; 0 = unlimited (QEMU max-bandwidth).
    pub max_bandwidth: u64,
    /// Give up (or force the switch-over) after this long; 0 = never.
    pub max_total_time_ms: u64,
    /// What to do when `max_total_time_ms` passes.
    pub on_timeout: TimeoutPolicy,
    /// Slow vCPUs when the guest dirties memory faster than the link drains it.
    pub auto_converge: bool,
    /// Highest throttle, percent of vCPU time taken away (QEMU max-cpu-throttle).
    pub max_throttle_pct: u8,
    /// How the throttle rises: ferry's own, or QEMU's auto-converge steps.
    pub throttle: ThrottlePolicy,
    /// Past `max_throttle_pct`, go on slowing the vCPUs until their dirty rate
    /// fits the link (down to 0.02% of their time), so that every pre-copy ends
    /// (see converge.rs); off: QEMU's behaviour, the throttle stops at the cap.
    pub dirty_limit: bool,
    /// Compare a digest of all RAM on both sides before the destination resumes.
    pub verify_digest: bool,
    /// Stop in `pre-switchover` with vCPUs paused until [`MigrationControl::resume_switchover`]
    /// (libvirt's pause-before-switchover).
    pub pause_before_switchover: bool,
    /// Page streams to propose (QEMU multifd-channels), 1 to [`MAX_STREAMS`]; more
    /// than 1 needs a `tcp:` or `unix:` URI. The destination may accept fewer.
    pub multifd_channels: u32,
    /// QEMU's postcopy-ram capability: the migration may switch to post-copy
    /// ([`MigrationControl::start_postcopy`]); the destination must be able to
    /// run a guest with missing pages (userfaultfd), which it checks at the
    /// handshake. One page stream only, and no digest (RAM is not whole at the
    /// switch).
    pub postcopy: bool,
    /// Bandwidth cap in bytes/s for post-copy's rest, instead of
    /// `max_bandwidth`; 0 = unlimited (QEMU max-postcopy-bandwidth).
    pub max_postcopy_bandwidth: u64,
    /// QEMU's rule for multifd: a destination that takes fewer page streams
    /// than proposed fails the migration right after the handshake (the guest
    /// never stopped), naming both numbers. Off: the source goes on with the
    /// streams the destination took (ferry-vm's way).
    pub exact_streams: bool,
    /// Use KVM's manual dirty-log protection (KVM_CLEAR_DIRTY_LOG right before pages
    /// are read) where the kernel offers it; otherwise, or when off, reading the log
    /// resets it. Off by default: measured on this project's machine, it made a
    /// 100%-hot 1 GiB guest's migration slower (median 4.9 s against 3.2 s) for about
    /// the same pause; see README.
    pub clear_dirty_log: bool,
    /// Client TLS credentials (QEMU tls-creds): every connection of the migration
    /// completes a TLS handshake before the stream starts. `None`: plain.
    pub tls: Option<TlsCreds>,
    /// The name the destination's certificate must carry (QEMU tls-hostname);
    /// `None`: the host of the `tcp:` URI.
    pub tls_hostname: Option<String>,
}

impl Default for MigrationParams {
    fn default() -> Self {
        Self {
            downtime_limit_ms: 300,
            max_bandwidth: 0,
            max_total_time_ms: 0,
            on_timeout: TimeoutPolicy::Cancel,
            auto_converge: true,
            max_throttle_pct: 99,
            throttle: ThrottlePolicy::Adaptive,
            dirty_limit: true,
            verify_digest: false,
            pause_before_switchover: false,
            multifd_channels: 1,
            exact_streams: false,
            postcopy: false,
            max_postcopy_bandwidth: 0,
            clear_dirty_log: false,
            tls: None,
            tls_hostname: None,
        }
    }
}

/// How the throttle rises while a guest outruns the link (converge.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottlePolicy {
    /// ferry's: just enough vCPU time away, from the measured dirty rate.
    Adaptive,
    /// QEMU's auto-converge: once a pass dirtied more than `trigger_threshold`
    /// percent of what it sent, twice, start at `initial` percent, then add
    /// `increment` (with `tailslow`, only what the measured rates call for).
    Qemu {
        initial: u8,
        increment: u8,
        tailslow: bool,
        trigger_threshold: u8,
    },
}

/// What happens when a migration runs longer than its cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutPolicy {
    /// Cancel; the source keeps running.
    Cancel,
    /// Switch over now, whatever the downtime.
    ForceSwitchover,
}

/// Shared between a running migration and whoever watches or steers it (QMP, the
/// control socket): statistics, parameters that may change mid-flight, cancel.
#[derive(Default)]
pub struct MigrationControl {
    cancel: AtomicBool,
    stats: Mutex<MigrationStats>,
    params: Mutex<MigrationParams>,
    switchover: (Mutex<bool>, Condvar),
    /// migrate-start-postcopy came: switch at the next batch.
    postcopy_now: AtomicBool,
    events: Mutex<Option<EventSink>>,
    /// The channels of the migration in flight: `cancel` breaks them, so a sender
    /// blocked writing to a stalled link returns at once.
    pub(crate) breakers: Mutex<Vec<transport::Breaker>>,
}

type EventSink = Box<dyn Fn(&MigrationEvent) + Send>;

impl std::fmt::Debug for MigrationControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationControl")
            .field("cancel", &self.cancel)
            .field("stats", &self.stats)
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

/// Events a migration emits: every state change and every pass.
#[derive(Debug, Clone, PartialEq)]
pub enum MigrationEvent {
    Status(MigrationStatus),
    Pass(u64),
}

impl MigrationControl {
    pub fn new(params: MigrationParams) -> Arc<Self> {
        Arc::new(Self {
            params: Mutex::new(params),
            ..Default::default()
        })
    }

    /// Asks the migration to stop; the source keeps running.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
        if let Ok(b) = self.breakers.lock() {
            b.iter().for_each(transport::Breaker::break_channel);
        }
        let (lock, cv) = &self.switchover;
        if let Ok(_g) = lock.lock() {
            cv.notify_all();
        }
    }

    /// Readies the control for a new migration: a cancel or a switch-over go-ahead
    /// given to an earlier one must not leak into it.
    pub(crate) fn reset(&self) {
        self.cancel.store(false, Ordering::Release);
        self.postcopy_now.store(false, Ordering::Release);
        if let Ok(mut b) = self.breakers.lock() {
            b.clear();
        }
        if let Ok(mut go) = self.switchover.0.lock() {
            *go = false;
        }
        self.update_stats(|s| *s = MigrationStats::default());
    }

    /// QEMU's migrate-start-postcopy: the migration switches to post-copy at
    /// its next batch. Refused unless the migration has `postcopy` on.
    pub fn start_postcopy(&self) -> Result<(), MigrationError> {
        if !self.params().postcopy {
            return Err(MigrationError::PostcopyOff);
        }
        self.postcopy_now.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether migrate-start-postcopy came.
    pub(crate) fn postcopy_requested(&self) -> bool {
        self.postcopy_now.load(Ordering::Acquire)
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> MigrationStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub(crate) fn update_stats(&self, f: impl FnOnce(&mut MigrationStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }

    pub fn params(&self) -> MigrationParams {
        self.params.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Changes parameters; a running migration picks up the bandwidth cap at
    /// its next batch, the others at its next pass.
    pub fn set_params(&self, f: impl FnOnce(&mut MigrationParams)) {
        if let Ok(mut p) = self.params.lock() {
            f(&mut p);
        }
    }

    /// Lets a migration waiting in `pre-switchover` continue.
    pub fn resume_switchover(&self) {
        let (lock, cv) = &self.switchover;
        if let Ok(mut go) = lock.lock() {
            *go = true;
            cv.notify_all();
        }
    }

    /// Waits up to `timeout` for the go-ahead of a pause-before-switchover:
    /// `Some(true)` go on, `Some(false)` cancelled, `None` still waiting.
    pub(crate) fn wait_switchover_for(&self, timeout: std::time::Duration) -> Option<bool> {
        let (lock, cv) = &self.switchover;
        let Ok(go) = lock.lock() else {
            return Some(false);
        };
        let go = match cv.wait_timeout_while(go, timeout, |go| !*go && !self.is_cancelled()) {
            Ok((go, _)) => *go,
            Err(_) => return Some(false),
        };
        if self.is_cancelled() {
            Some(false)
        } else {
            go.then_some(true)
        }
    }

    /// Where events go (QMP's MIGRATION / MIGRATION_PASS).
    pub fn on_event(&self, f: impl Fn(&MigrationEvent) + Send + 'static) {
        if let Ok(mut e) = self.events.lock() {
            *e = Some(Box::new(f));
        }
    }

    pub(crate) fn emit(&self, ev: MigrationEvent) {
        if let MigrationEvent::Status(s) = &ev {
            self.update_stats(|st| st.status = *s);
        }
        if let Ok(e) = self.events.lock() {
            if let Some(f) = &*e {
                f(&ev);
            }
        }
    }
}

/// Errors of migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    #[error("migration cancelled")]
    Cancelled,
    /// The switch-over would have paused the guest past the downtime limit:
    /// the source went back to pre-copy (internal to the source; never the
    /// migration's outcome).
    #[error("the switch-over would overrun the downtime limit")]
    SwitchoverOverrun,
    #[error("migration took longer than its {0} ms limit and was cancelled")]
    TimedOut(u64),
    /// Writing or reading a section failed (the cause names the section
    /// and the I/O error).
    #[error("the migration stream broke: {0}")]
    Stream(#[source] ferry_format::FormatError),
    #[error(
        "the destination did not confirm it loaded the VM ({0}); the source stays paused \
         because the destination may be running it: check the destination, then resume or \
         destroy the source"
    )]
    Unconfirmed(String),
    #[error(transparent)]
    Vmm(crate::VmmError),
    #[error("cannot set up {streams} page streams: {reason}")]
    Streams { streams: u32, reason: String },
    #[error("page stream {index} failed: {reason}")]
    PageStream { index: u32, reason: String },
    /// The destination took fewer page streams than proposed, under
    /// [`MigrationParams::exact_streams`].
    #[error(
        "the destination took {took} of the {wanted} page streams (multifd-channels) offered: \
         multifd is off there or its multifd-channels is lower; set the multifd capability \
         and multifd-channels alike on both sides (virsh migrate --parallel does)"
    )]
    StreamsRefused { wanted: u32, took: u32 },
    #[error(transparent)]
    Exec(#[from] exec::ExecError),
    #[error(
        "tls-creds is set, but a file or a pipe cannot carry TLS: migrate over tcp:, unix: or \
         an fd: socket, or clear tls-creds"
    )]
    TlsNeedsSocket,
    #[error("cannot open {}", path.display())]
    OpenFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the migration thread")]
    StartThread(#[source] std::io::Error),
    #[error("the migration thread ended before it began")]
    ThreadEnded,
    #[error("the migration thread panicked")]
    ThreadPanicked,
    #[error(
        "post-copy is off for this migration: turn it on before the migration starts (QMP: \
         the postcopy-ram capability; ferry-vm: migrate-set postcopy=on; virsh migrate \
         --postcopy)"
    )]
    PostcopyOff,
    #[error(
        "post-copy moves RAM over one stream: set multifd-channels to 1 (QEMU 7.2 does not \
         combine post-copy with multifd either)"
    )]
    PostcopyWithStreams,
    #[error(
        "post-copy cannot verify a RAM digest (RAM is not whole when the guest starts on the \
         destination): turn verify off or post-copy off"
    )]
    PostcopyWithDigest,
    /// migrate-start-postcopy came in the middle of a pass (internal to the
    /// source: it switches now).
    #[error("switching to post-copy")]
    PostcopyNow,
    #[error("post-copy failed")]
    Postcopy(#[from] postcopy::PostcopyError),
    /// The page the destination asked for is not a page of guest RAM.
    #[error("the destination asked for page {gpa:#x}, which is not guest RAM")]
    BadPageRequest { gpa: u64 },
    #[error("a checkpoint goes to fd:, file: or exec:")]
    CheckpointTarget,
    #[error("cannot write the checkpoint")]
    WriteCheckpoint(#[source] std::io::Error),
    #[error("the exec: command failed ({0})")]
    ExecFailed(std::process::ExitStatus),
    /// The destination could not read what the source sent.
    #[error("the migration stream broke: {0}")]
    ReadStream(#[source] ferry_format::FormatError),
    #[error("cannot make the accept loop's wake-up pipe: {0}")]
    WakePipe(#[source] std::io::Error),
    #[error("the page stream state lock is poisoned")]
    StreamsPoisoned,
    #[error("the migration stream broke: cannot send the handshake")]
    SendHandshake(#[source] std::io::Error),
    /// No answer is not a refusal: the destination died, the link broke or it
    /// never answered.
    #[error("the migration stream broke: the destination did not answer the handshake")]
    AwaitHandshakeAnswer(#[source] ReturnPathError),
    #[error(
        "the migration stream broke: the destination answered {reply} to a handshake \
         proposing {wanted} stream(s)"
    )]
    UnexpectedHandshakeAnswer { reply: String, wanted: u32 },
    #[error("the migration stream broke: the return path broke")]
    ReturnPath(#[source] ReturnPathError),
    #[error("the migration stream broke: the return path lock is poisoned")]
    ReturnPathPoisoned,
    #[error("the migration stream broke: no page stream is open")]
    NoPageStream,
    #[error("the migration stream broke: the main stream is missing")]
    NoMainStream,
    /// A page stream failed, and its error was taken already.
    #[error("the migration stream broke: a page stream failed")]
    PageStreamFailed,
    /// Another page stream failed: this one stops.
    #[error("the migration stream broke: another page stream failed")]
    OtherPageStreamFailed,
    #[error("page stream {index} failed")]
    OpenPageStream {
        index: u32,
        #[source]
        source: TransportError,
    },
    #[error("page stream {index} failed: cannot send its Join section")]
    SendJoin {
        index: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("page stream {index} failed: cannot start its thread")]
    StartPageStreamThread {
        index: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("page stream {index} failed: its thread panicked")]
    PageStreamThreadPanicked { index: u32 },
    #[error("page stream {index} failed: cannot finish it")]
    FinishPageStream {
        index: u32,
        #[source]
        source: ferry_format::FormatError,
    },
    #[error("cannot set up {streams} page streams: cannot read /dev/urandom for a session token")]
    SessionToken {
        streams: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("the migration stream broke: cannot send a keep-alive")]
    SendKeepalive(#[source] std::io::Error),
    #[error("the migration stream broke: cannot send the last bytes")]
    SendEnd(#[source] std::io::Error),
    #[error("the migration stream broke")]
    AwaitConfirmation(#[source] ReturnPathError),
    #[error("the migration stream broke: the destination answered {reply} instead of confirming")]
    UnexpectedConfirmation { reply: String },
    #[error("the migration stream broke: cannot sync the migration file and move it into place")]
    CommitFile(#[source] std::io::Error),
}

impl From<crate::VmmError> for MigrationError {
    fn from(e: crate::VmmError) -> Self {
        match e {
            // The stream persist was reading broke: the migration stream did.
            crate::VmmError::Load(crate::persist::LoadError::Read(e)) => Self::ReadStream(e),
            e => Self::Vmm(e),
        }
    }
}

impl From<crate::persist::LoadError> for MigrationError {
    fn from(e: crate::persist::LoadError) -> Self {
        crate::VmmError::from(e).into()
    }
}

impl From<ferry_kvm::MemoryError> for MigrationError {
    fn from(e: ferry_kvm::MemoryError) -> Self {
        Self::Vmm(e.into())
    }
}

impl From<ferry_format::FormatError> for MigrationError {
    fn from(e: ferry_format::FormatError) -> Self {
        Self::Stream(e)
    }
}
