//! The destination side: what only a migration has (the return path, serving a
//! listener, extra page streams, the idle timeout) around persist's reader, which
//! checks the shape, builds the VM, reads pages and state and loads them.

use std::io::{BufReader, BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_format::{FormatError, SectionId, StreamReader, StreamWriter};
use ferry_kvm::GuestRam;

use super::postcopy::{PageBits, PostcopyError, PostcopyPages, RequestPage};
use super::tls::TlsCreds;
use super::transport::{Breaker, Listener, Waker};
use super::{stream_of, Channel, MigrationError, Reply, MAX_STREAMS};
use crate::persist::{
    self, check_inside, prefault, producer, read_main, write_page, Frontier, Handshake, LoadError,
    RestoreOptions, StreamJoin,
};
use crate::vm::Vm;
use crate::VmmError;

use super::transport::{ReadHalf, WriteHalf};

/// Where the extra page streams of a multi-stream migration come from.
#[derive(Debug)]
pub struct ExtraStreams<'a> {
    /// The listener the main connection came in on: extra connections arrive there.
    pub listener: &'a Listener,
    /// Most streams, the main connection included, this destination takes (1 to
    /// [`MAX_STREAMS`]); the source's proposal is cut down to it.
    pub max_streams: u32,
    /// Breaks the main connection when a page stream fails, so its reader stops
    /// waiting.
    pub main_breaker: Option<Breaker>,
}

/// How long the extra streams may take to connect after the handshake was accepted.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections beyond the agreed streams that are read (and refused) before further
/// ones are closed unread.
const MAX_STRANGERS: u32 = 8;

/// The stream of replies to the source.
type ReplyStream = StreamWriter<BufWriter<Box<dyn WriteHalf>>>;

struct ReturnPath {
    out: Mutex<Option<ReplyStream>>,
}

impl ReturnPath {
    fn open(writer: Option<Box<dyn WriteHalf>>) -> Self {
        let out = writer.and_then(|w| {
            match StreamWriter::new(BufWriter::with_capacity(64 << 10, w), &producer()) {
                Ok(mut out) => {
                    let _ = out.get_mut().flush();
                    Some(out)
                }
                Err(e) => {
                    tracing::warn!("cannot open the return path: {e}");
                    None
                }
            }
        });
        Self {
            out: Mutex::new(out),
        }
    }

    fn send(&self, reply: &Reply) {
        let Ok(mut out) = self.out.lock() else { return };
        if let Some(out) = &mut *out {
            if let Err(e) = send_reply(out, reply) {
                tracing::warn!("cannot answer the source: {e}");
            }
        }
    }
}

fn send_reply<W: Write>(out: &mut StreamWriter<W>, reply: &Reply) -> Result<(), FormatError> {
    out.write_cbor(SectionId::Reply, SectionId::Reply.current_version(), reply)?;
    out.get_mut().flush().map_err(FormatError::Io)
}

/// Receives a VM from `reader`; with `writer`, answers the source on the return path.
/// Returns the VM loaded (and running if `autostart`). On any error the VM is dropped
/// before it ever ran, and the source is told why. Takes one stream: a source that
/// proposes more is told to use one.
pub fn receive(
    reader: Box<dyn ReadHalf>,
    writer: Option<Box<dyn WriteHalf>>,
    opts: &RestoreOptions,
) -> Result<Vm, MigrationError> {
    receive_streams(reader, writer, None, opts)
}

/// [`receive`], taking up to `extra.max_streams` page streams: the extra ones
/// connect to `extra.listener` after the handshake.
pub fn receive_streams(
    reader: Box<dyn ReadHalf>,
    writer: Option<Box<dyn WriteHalf>>,
    extra: Option<ExtraStreams<'_>>,
    opts: &RestoreOptions,
) -> Result<Vm, MigrationError> {
    let ret = ReturnPath::open(writer);
    let result = read_offer(reader, opts, None).and_then(|(reader, hs)| {
        let vm = build(&hs, opts)?;
        load(vm, reader, &hs, extra, opts, &ret, None)
    });
    conclude(result, &ret)
}

/// Tells the source how the migration ended: loaded (and running or not), or why
/// not.
fn conclude(result: Result<Vm, MigrationError>, ret: &ReturnPath) -> Result<Vm, MigrationError> {
    match result {
        Ok(vm) => {
            ret.send(&Reply::Loaded {
                running: vm.is_running(),
            });
            Ok(vm)
        }
        Err(e) => {
            ret.send(&Reply::Error {
                message: e.to_string(),
            });
            Err(e)
        }
    }
}

/// How a destination listening on the network treats whoever connects.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// A connection must complete its TLS handshake, preamble and Shape within
    /// this, or it is dropped.
    pub handshake_deadline: Duration,
    /// Once pages flow, the source must send something (on any of its streams)
    /// within this, or the migration fails: a source with nothing to send says
    /// it is alive every [`KEEPALIVE_INTERVAL`].
    pub idle_timeout: Duration,
    /// Handshakes that may run at once; connections beyond them are closed
    /// unread.
    pub max_pending: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            handshake_deadline: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
            max_pending: 8,
        }
    }
}

/// How often a source that has nothing to send (paused before its switch-over)
/// sends a KeepAlive section; well below [`ServeOptions::idle_timeout`].
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// How often a served migration's main connection wakes to check the idle
/// timeout while nothing arrives.
const IDLE_POLL: Duration = Duration::from_millis(500);

/// When the source of a served migration last sent anything.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// The idle timeout in ms; 0 while none applies (the handshake has a
    /// deadline of its own).
    limit_ms: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            limit_ms: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_ms.fetch_max(self.now_ms(), Ordering::Relaxed);
    }

    /// `Some(limit)` once the source has been silent for longer than the limit.
    fn expired(&self) -> Option<Duration> {
        let limit = self.limit_ms.load(Ordering::Relaxed);
        let idle = self
            .now_ms()
            .saturating_sub(self.last_ms.load(Ordering::Relaxed));
        (limit > 0 && idle >= limit).then(|| Duration::from_millis(limit))
    }
}

/// A reader that records every arrival in its [`Activity`] and, where the
/// socket under it has a read timeout, waits on until the source has been
/// silent for the idle timeout.
#[derive(Debug)]
struct IdleReader {
    inner: Box<dyn ReadHalf>,
    activity: Arc<Activity>,
}

/// `reader`, its arrivals recorded in `activity` when there is one.
fn watched(reader: Box<dyn ReadHalf>, activity: Option<Arc<Activity>>) -> Box<dyn ReadHalf> {
    match activity {
        Some(activity) => Box::new(IdleReader {
            inner: reader,
            activity,
        }),
        None => reader,
    }
}

impl std::io::Read for IdleReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::ErrorKind;
        loop {
            match self.inner.read(buf) {
                Ok(n) => {
                    self.activity.touch();
                    return Ok(n);
                }
                // The socket's read timeout: nothing was consumed.
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if let Some(limit) = self.activity.expired() {
                        return Err(std::io::Error::new(
                            ErrorKind::TimedOut,
                            format!(
                                "the source sent nothing for {} s: it is gone or stuck",
                                limit.as_secs_f64()
                            ),
                        ));
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// What the source of a refused connection is told: the reason, where it names
/// only what the source itself sent; otherwise a generic refusal. The full
/// reason goes to this side's log.
fn refusal(e: &MigrationError) -> String {
    match e {
        MigrationError::Vmm(VmmError::Mismatch(m)) => m.public(),
        _ => "the destination refused this connection: it did not open a ferry migration it \
              accepts (the destination's log says why)"
            .into(),
    }
}

/// Refuses connection `id`: the reason to this side's log, [`refusal`] to its
/// source.
fn refuse(id: u64, ret: &ReturnPath, e: &MigrationError) {
    tracing::warn!(
        "refused a connection (#{id}; the wait for the source goes on): {}",
        crate::error_chain(e)
    );
    ret.send(&Reply::Error {
        message: refusal(e),
    });
}

/// A connection whose handshake ran on its own thread.
struct Handshaken {
    /// Sequence number, for the log.
    id: u64,
    ret: ReturnPath,
    main: Option<Breaker>,
    result: Result<(MainReader, Handshake), MigrationError>,
    activity: Arc<Activity>,
}

/// A connection whose handshake is running.
struct Pending {
    id: u64,
    deadline: Instant,
    /// Taken when the connection is broken at its deadline.
    breaker: Option<Breaker>,
    done: Arc<AtomicBool>,
}

/// Runs one connection's handshake: TLS, preamble, Shape, checked against this
/// side's configuration. Runs on its own thread; the accept loop breaks the
/// connection if it is not done by its deadline.
fn handshake(
    id: u64,
    ch: Channel,
    tls: Option<TlsCreds>,
    opts: &RestoreOptions,
    done: &AtomicBool,
) -> Handshaken {
    let main = ch.breaker().ok();
    let activity = Activity::new();
    let secured = super::transport::secure_accepted(tls.as_ref(), ch);
    let (ret, result) = match secured {
        Ok(ch) => {
            let Channel {
                reader,
                writer,
                has_return_path,
                ..
            } = ch;
            let ret = ReturnPath::open(has_return_path.then_some(writer));
            let result = read_offer(reader, opts, Some(Arc::clone(&activity)));
            (ret, result)
        }
        Err(e) => (ReturnPath::open(None), Err(e.into())),
    };
    done.store(true, Ordering::Release);
    Handshaken {
        id,
        ret,
        main,
        result,
        activity,
    }
}

/// Waits on `listener` for the source of a live migration and receives the VM
/// from it, as a destination on the network must.
///
/// * Every connection runs its handshake (TLS, preamble, Shape) on a thread of
///   its own, within `serve.handshake_deadline`: a silent or slow stranger holds
///   up nobody; at most `serve.max_pending` run at once.
/// * The Shape must be the VM this side was configured for (`opts`: RAM size and
///   vCPU count are required, devices and CPU features checked): nothing is built
///   from what a stream asks for.
/// * A connection that fails its handshake is refused (its source is told only
///   what it sent itself; the reason is logged here) and the wait goes on.
/// * Once pages flow, the source must not fall silent for `serve.idle_timeout`.
///
/// `accepted` is called once a source's handshake is accepted, before any page
/// moves; `max_streams` then says how many page streams this side takes.
pub fn serve(
    listener: &Listener,
    serve: &ServeOptions,
    opts: &RestoreOptions,
    accepted: &mut dyn FnMut(),
    max_streams: &dyn Fn() -> u32,
) -> Result<Vm, MigrationError> {
    if opts.expect_mem_bytes.is_none() || opts.expect_vcpus.is_none() {
        return Err(VmmError::Config(
            "a migration destination must be configured with its VM's RAM size and vCPU count \
             (-m and -smp): it never builds the VM a stream asks for"
                .into(),
        )
        .into());
    }
    if listener.is_file() {
        // A file is this side's own: one stream, nobody to refuse.
        let ch = listener.accept_next()?;
        return receive_streams(ch.reader, None, None, opts);
    }
    let (tx, rx) = std::sync::mpsc::channel::<Handshaken>();
    // A finished handshake wakes the accept wait below: the source waits for
    // its answer, and a 20 ms poll was most of its setup time.
    let waker = Arc::new(Waker::new().map_err(MigrationError::WakePipe)?);
    let mut pending: Vec<Pending> = Vec::new();
    let mut next_id = 0u64;
    let chosen = loop {
        // Handshakes that finished: the first good one wins.
        let mut winner = None;
        while let Ok(h) = rx.try_recv() {
            pending.retain(|p| p.id != h.id);
            if winner.is_some() {
                let e = MigrationError::Refused("another source's migration came first".into());
                refuse(h.id, &h.ret, &e);
                continue;
            }
            let offer = h
                .result
                .and_then(|(reader, hs)| Ok((build(&hs, opts)?, reader, hs)));
            match offer {
                Ok((vm, reader, hs)) => {
                    tracing::info!("connection {}: accepted the migration", h.id);
                    winner = Some((vm, reader, hs, h.ret, h.main, h.activity));
                }
                Err(e) => refuse(h.id, &h.ret, &e),
            }
        }
        if let Some(w) = winner {
            break w;
        }
        // Handshakes past their deadline: broken, once (their threads end and
        // what they send is refused); each counts until its result is read above.
        let now = Instant::now();
        for p in pending.iter_mut().filter(|p| now >= p.deadline) {
            if let (false, Some(b)) = (p.done.load(Ordering::Acquire), p.breaker.take()) {
                tracing::warn!(
                    "dropped connection {}: its handshake took longer than {} s",
                    p.id,
                    serve.handshake_deadline.as_secs_f64()
                );
                b.break_channel();
            }
        }
        let Some(ch) = listener.accept_within(Duration::from_millis(20), Some(&waker))? else {
            continue;
        };
        next_id += 1;
        let id = next_id;
        if pending.len() >= serve.max_pending {
            tracing::warn!(
                "closed connection {id} unread: {} handshakes are already running",
                pending.len()
            );
            continue;
        }
        let done = Arc::new(AtomicBool::new(false));
        pending.push(Pending {
            id,
            deadline: Instant::now() + serve.handshake_deadline,
            breaker: ch.breaker().ok(),
            done: Arc::clone(&done),
        });
        let (tx, tls, opts) = (tx.clone(), listener.tls().cloned(), opts.clone());
        let waker = Arc::clone(&waker);
        let spawned = std::thread::Builder::new()
            .name("incoming-handshake".into())
            .spawn(move || {
                let _ = tx.send(handshake(id, ch, tls, &opts, &done));
                waker.wake();
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a thread for connection {id}: {e}");
        }
    };
    // The others lose: their connections break, their threads end.
    for p in &pending {
        if let Some(b) = &p.breaker {
            b.break_channel();
        }
    }
    let (vm, reader, hs, ret, main, activity) = chosen;
    accepted();
    if let Some(b) = &main {
        if let Err(e) = b.set_read_timeout(Some(IDLE_POLL)) {
            tracing::warn!("cannot set the idle timeout of the migration connection: {e}");
        }
    }
    activity.limit_ms.store(
        serve.idle_timeout.as_millis().max(1) as u64,
        Ordering::Relaxed,
    );
    activity.touch();
    let extra = ExtraStreams {
        listener,
        max_streams: max_streams(),
        main_breaker: main,
    };
    let result = load(vm, reader, &hs, Some(extra), opts, &ret, Some(activity));
    conclude(result, &ret)
}

/// What the threads receiving one migration share.
struct Incoming<'a> {
    streams: u32,
    session: u64,
    ret: &'a ReturnPath,
    /// When the source last sent anything on any stream (a served migration).
    activity: Option<Arc<Activity>>,
    /// Where the pages arrive: see [`prefault`].
    frontier: Frontier,
    main_breaker: Option<Breaker>,
    state: Mutex<IncomingState>,
    changed: Condvar,
    aborted: AtomicBool,
}

#[derive(Default)]
struct IncomingState {
    /// Extra streams that presented a valid Join, by index.
    joined: Vec<bool>,
    /// Extra streams that reached their End.
    finished: u32,
    /// The first failure, which is the one reported.
    error: Option<MigrationError>,
    /// The outcome is known: every stream ended (the VM loads) or one failed.
    /// A failure that comes later (a stranger's late, bad Join) must not reach the
    /// source: it would resume its guest while this side runs it.
    decided: bool,
    /// Every accepted extra connection, broken when the migration ends.
    breakers: Vec<Breaker>,
}

impl Incoming<'_> {
    fn lock(&self) -> Result<MutexGuard<'_, IncomingState>, MigrationError> {
        self.state
            .lock()
            .map_err(|_| MigrationError::StreamsPoisoned)
    }

    /// Fails the migration: tells the source at once and breaks every connection,
    /// so the main reader and the other streams stop.
    fn fail(&self, e: MigrationError) {
        let message = e.to_string();
        let first = match self.lock() {
            Ok(mut st) if !st.decided => {
                st.error = Some(e);
                st.decided = true;
                true
            }
            Ok(st) if st.error.is_none() => {
                drop(st);
                tracing::warn!("refused a connection after every page stream had ended: {message}");
                return;
            }
            _ => false,
        };
        tracing::warn!("incoming migration: {message}");
        if first {
            self.ret.send(&Reply::Error { message });
        }
        self.stop();
        if let Some(b) = &self.main_breaker {
            b.break_channel();
        }
    }

    /// Ends the extra streams' threads: the acceptor and every connection.
    fn stop(&self) {
        self.aborted.store(true, Ordering::Release);
        if let Ok(st) = self.lock() {
            st.breakers.iter().for_each(Breaker::break_channel);
        }
        self.changed.notify_all();
    }

    fn take_error(&self) -> Option<MigrationError> {
        self.lock().ok().and_then(|mut st| st.error.take())
    }

    fn joined_all(&self) -> bool {
        self.lock()
            .map(|st| st.joined.iter().skip(1).all(|&j| j))
            .unwrap_or(true)
    }

    /// Waits until every extra stream reached its End, or one failed.
    fn wait_finished(&self) -> Result<(), MigrationError> {
        let mut st = self.lock()?;
        loop {
            if let Some(e) = st.error.take() {
                return Err(e);
            }
            if st.finished + 1 >= self.streams {
                st.decided = true;
                return Ok(());
            }
            st = self
                .changed
                .wait(st)
                .map_err(|_| MigrationError::StreamsPoisoned)?;
        }
    }
}

/// Accepts the extra streams, each served on its own thread, until all of them
/// joined, the migration ended, or [`JOIN_TIMEOUT`] passed.
fn accept_streams<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    listener: &'scope Listener,
    inc: &'scope Incoming<'_>,
    ram: &'scope GuestRam,
) {
    let deadline = Instant::now() + JOIN_TIMEOUT;
    let mut accepted = 0u32;
    while !inc.aborted.load(Ordering::Acquire) && !inc.joined_all() {
        match listener.accept_within(Duration::from_millis(20), None) {
            Ok(Some(ch)) => {
                accepted += 1;
                if accepted > inc.streams - 1 + MAX_STRANGERS {
                    // Closed unread: more connections than streams and strangers.
                    continue;
                }
                if let (Ok(b), Ok(mut st)) = (ch.breaker(), inc.lock()) {
                    st.breakers.push(b);
                }
                let spawned = std::thread::Builder::new()
                    .name("incoming-stream".into())
                    .spawn_scoped(scope, move || serve_stream(ch, listener, inc, ram));
                if let Err(e) = spawned {
                    inc.fail(MigrationError::Streams {
                        streams: inc.streams,
                        reason: format!("cannot start a page stream thread: {e}"),
                    });
                }
            }
            Ok(None) if Instant::now() > deadline => {
                let joined = inc
                    .lock()
                    .map(|st| st.joined.iter().filter(|&&j| j).count())
                    .unwrap_or(0);
                inc.fail(MigrationError::Streams {
                    streams: inc.streams,
                    reason: format!(
                        "only {joined} of the {} extra connections joined within {} s",
                        inc.streams - 1,
                        JOIN_TIMEOUT.as_secs()
                    ),
                });
            }
            Ok(None) => {}
            Err(e) => inc.fail(MigrationError::Streams {
                streams: inc.streams,
                reason: e.to_string(),
            }),
        }
    }
}

/// Reads one extra connection: its Join section, then its pages up to End. A
/// connection that does not present this migration's session is refused (told so,
/// and closed) without harming the migration; one that does and then misbehaves
/// fails it.
fn serve_stream(ch: Channel, listener: &Listener, inc: &Incoming<'_>, ram: &GuestRam) {
    let limits = ferry_format::Limits::default();
    // The TLS handshake runs here, off the accept loop: a slow stranger holds up
    // only its own thread.
    let ch = match listener.secured(ch) {
        Ok(ch) => ch,
        Err(e) => {
            tracing::warn!("refused a connection: {e}");
            return;
        }
    };
    let Channel { reader, writer, .. } = ch;
    let reader = watched(reader, inc.activity.clone());
    let mut buf = Vec::new();
    let join = StreamReader::new(BufReader::with_capacity(1 << 20, reader), limits).and_then(
        |(mut r, _)| {
            let h = r.next_section(&mut buf)?;
            if h.id != SectionId::Join {
                return Ok((r, None));
            }
            let join: StreamJoin = ferry_format::decode_cbor(h.id, &buf, &limits)?;
            Ok((r, Some(join)))
        },
    );
    let (mut reader, join) = match join {
        Ok((r, Some(j))) if j.session == inc.session => (r, j),
        other => {
            let why = match other {
                Ok((_, Some(_))) => "it presented another migration's session".to_string(),
                Ok((_, None)) => "it did not start with a Join section".to_string(),
                Err(e) => e.to_string(),
            };
            if !inc.aborted.load(Ordering::Acquire) {
                tracing::warn!(
                    "refused a connection that is not a page stream of this migration: {why}"
                );
                if let Ok(mut out) = StreamWriter::new(writer, &producer()) {
                    let _ = send_reply(
                        &mut out,
                        &Reply::Error {
                            message: format!(
                                "this connection is not a page stream of the migration in \
                                 progress: {why}"
                            ),
                        },
                    );
                }
            }
            return;
        }
    };
    let index = join.index;
    let fail = |reason: String| MigrationError::PageStream { index, reason };
    let joined = inc.lock().and_then(|mut st| {
        if join.streams != inc.streams {
            return Err(fail(format!(
                "it was opened for {} streams, {} were agreed",
                join.streams, inc.streams
            )));
        }
        match st.joined.get_mut(index as usize) {
            Some(j) if index > 0 && !*j => {
                *j = true;
                Ok(())
            }
            Some(_) if index > 0 => Err(fail("it joined twice".into())),
            _ => Err(fail(format!(
                "there is no such stream: streams are numbered 1 to {}",
                inc.streams - 1
            ))),
        }
    });
    if let Err(e) = joined {
        inc.fail(e);
        return;
    }
    let mut sink = StripeSink::new(ram, index, inc.streams, &inc.frontier);
    let result = (|| loop {
        let h = reader.next_section_into(&mut buf, &mut sink)?;
        match h.id {
            SectionId::RamPages => {}
            SectionId::End => return Ok(()),
            other => {
                return Err(fail(format!(
                    "it carries section {other}; a page stream carries RAM pages only"
                )))
            }
        }
    })();
    match result {
        Ok(()) => {
            if let Ok(mut st) = inc.lock() {
                st.finished += 1;
            }
            inc.changed.notify_all();
        }
        Err(e) if inc.aborted.load(Ordering::Acquire) => {
            tracing::debug!("page stream {index} ended with the migration: {e}");
        }
        Err(MigrationError::PageStream { index, reason }) => {
            inc.fail(MigrationError::PageStream { index, reason })
        }
        Err(e) => inc.fail(fail(e.to_string())),
    }
}

/// Writes the pages stream `index` receives straight into guest RAM, as the
/// reader takes them from its buffer. Each batch is checked whole first: every
/// page inside RAM and of this stream's stripes (so no two streams ever write
/// the same page).
struct StripeSink<'a> {
    ram: &'a GuestRam,
    ranges: Vec<(u64, u64)>,
    index: u32,
    streams: u32,
    frontier: &'a Frontier,
}

impl<'a> StripeSink<'a> {
    fn new(ram: &'a GuestRam, index: u32, streams: u32, frontier: &'a Frontier) -> Self {
        Self {
            ram,
            ranges: ram.ranges(),
            index,
            streams,
            frontier,
        }
    }
}

impl ferry_format::PageSink for StripeSink<'_> {
    type Error = LoadError;

    fn check(&mut self, gpas: &[u64]) -> Result<(), LoadError> {
        let (index, streams) = (self.index, self.streams);
        for &gpa in gpas {
            check_inside(&self.ranges, gpa)?;
            let owner = stream_of(gpa, streams);
            if owner != index {
                return Err(LoadError::WrongStream { gpa, index, owner });
            }
        }
        Ok(())
    }

    fn page(&mut self, gpa: u64, data: Option<&[u8]>) -> Result<(), LoadError> {
        if data.is_some() {
            self.frontier.advance(gpa);
        }
        write_page(self.ram, gpa, data).map_err(|source| LoadError::WritePage { gpa, source })
    }
}

/// The reading side of a connection, framed.
type MainReader = StreamReader<BufReader<Box<dyn ReadHalf>>>;

/// Reads the preamble and the Shape of a stream and checks the shape against
/// `opts` (this side's configuration): nothing is built yet. With `activity`,
/// every byte read counts as a sign of life of the source.
fn read_offer(
    reader: Box<dyn ReadHalf>,
    opts: &RestoreOptions,
    activity: Option<Arc<Activity>>,
) -> Result<(MainReader, Handshake), MigrationError> {
    Ok(persist::read_offer(watched(reader, activity), opts)?)
}

/// Builds the VM of an accepted handshake (see [`persist::build`]).
fn build(hs: &Handshake, opts: &RestoreOptions) -> Result<Vm, MigrationError> {
    Ok(persist::build(hs, opts)?)
}

/// Receives the pages and state of an accepted handshake into `vm`.
fn load(
    vm: Vm,
    mut reader: MainReader,
    hs: &Handshake,
    extra: Option<ExtraStreams<'_>>,
    opts: &RestoreOptions,
    ret: &ReturnPath,
    activity: Option<Arc<Activity>>,
) -> Result<Vm, MigrationError> {
    let limits = ferry_format::Limits::default();
    let mut buf = Vec::new();
    let proposed = hs.streams.max(1);
    let limit = extra
        .as_ref()
        .map_or(1, |x| x.max_streams.clamp(1, MAX_STREAMS));
    let streams = proposed.min(limit);
    if hs.postcopy {
        // Refused now, before a page moves, if this host cannot serve
        // missing pages.
        if proposed > 1 {
            return Err(MigrationError::PostcopyWithStreams);
        }
        drop(ferry_kvm::Userfault::new().map_err(super::postcopy::PostcopyError::from)?);
    }
    if proposed > 1 {
        ret.send(&Reply::Accepted { streams });
    } else {
        ret.send(&Reply::Ready);
    }
    let (listener, main_breaker) = match extra {
        Some(x) => (Some(x.listener), x.main_breaker),
        None => (None, None),
    };
    let postcopy_breaker = main_breaker.as_ref().and_then(|b| b.try_clone().ok());
    let inc = Incoming {
        streams,
        session: hs.session,
        ret,
        activity,
        frontier: Frontier::default(),
        main_breaker,
        state: Mutex::new(IncomingState {
            joined: vec![false; streams as usize],
            ..IncomingState::default()
        }),
        changed: Condvar::new(),
        aborted: AtomicBool::new(false),
    };
    let ram: &GuestRam = vm.ram();
    let received = std::thread::scope(|scope| {
        {
            let inc = &inc;
            let spawned = std::thread::Builder::new()
                .name("incoming-prefault".into())
                .spawn_scoped(scope, move || prefault(ram, &inc.frontier, &inc.aborted));
            if let Err(e) = spawned {
                tracing::warn!("no thread to back guest RAM ahead of the stream: {e}");
            }
        }
        if let (Some(listener), true) = (listener, streams > 1) {
            let inc = &inc;
            let spawned = std::thread::Builder::new()
                .name("incoming-accept".into())
                .spawn_scoped(scope, move || accept_streams(scope, listener, inc, ram));
            if let Err(e) = spawned {
                inc.fail(MigrationError::Streams {
                    streams,
                    reason: format!("cannot start the thread that accepts them: {e}"),
                });
            }
        }
        let mut sink = StripeSink::new(ram, 0, streams, &inc.frontier);
        let result = read_main(&mut reader, &mut buf, &mut sink, &limits)
            .map_err(MigrationError::from)
            .and_then(|sections| inc.wait_finished().map(|()| sections));
        // A page stream's failure is the cause; the main stream's is its echo.
        let result = result.map_err(|e| inc.take_error().unwrap_or(e));
        inc.stop();
        result
    });
    let mut sections = received?;
    if let Some(pages) = sections.postcopy.take() {
        if !hs.postcopy {
            return Err(LoadError::Unexpected(SectionId::Postcopy).into());
        }
        let rest = PostcopyRest {
            reader,
            pages,
            breaker: postcopy_breaker,
        };
        return postcopy_load(vm, rest, sections, hs, opts, ret);
    }
    Ok(persist::finish(vm, sections, hs, opts)?)
}

/// What the main stream still carries once the state arrived in post-copy.
struct PostcopyRest {
    reader: MainReader,
    /// The pages still to come, per RAM range.
    pages: Vec<Vec<u64>>,
    /// Breaks the main connection, so its reader stops when loading fails.
    breaker: Option<Breaker>,
}

/// Post-copy on the destination: the pages still to come go missing, the
/// state is loaded and the VM runs (with `opts.autostart`) while the rest
/// arrives; a touch of a missing page asks for it on the return path. Ends
/// once every page came.
fn postcopy_load(
    vm: Vm,
    rest: PostcopyRest,
    sections: persist::MainSections,
    hs: &Handshake,
    opts: &RestoreOptions,
    ret: &ReturnPath,
) -> Result<Vm, MigrationError> {
    let PostcopyRest {
        mut reader,
        pages,
        breaker,
    } = rest;
    let ram = Arc::clone(vm.ram());
    let bits = PageBits::from_words(&ram, &pages)?;
    let to_come = bits.count();
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    let tx = Mutex::new(tx);
    let request: RequestPage = Box::new(move |gpa| {
        tx.lock()
            .map_err(|_| std::io::Error::other("the request queue is poisoned"))?
            .send(gpa)
            .map_err(|_| std::io::ErrorKind::BrokenPipe.into())
    });
    let missing = PostcopyPages::start(Arc::clone(&ram), bits, request)?;
    tracing::info!(
        pages = to_come,
        "post-copy: the VM runs, the rest of RAM follows"
    );
    let ranges = ram.ranges();
    std::thread::scope(|scope| {
        // Requests leave in the order the touches came; this ends once the
        // fault thread (which holds the sender) stopped.
        scope.spawn(|| {
            for gpa in rx {
                ret.send(&Reply::PageRequest { gpa });
            }
        });
        let receiving = scope.spawn(|| {
            let mut buf = Vec::new();
            let mut sink = PostcopySink {
                pages: &missing,
                ranges,
            };
            loop {
                let h = reader.next_section_into(&mut buf, &mut sink)?;
                match h.id {
                    SectionId::RamPages => {}
                    SectionId::End => return Ok::<(), MigrationError>(()),
                    other => return Err(LoadError::Unexpected(other).into()),
                }
            }
        });
        let vm = persist::finish(vm, sections, hs, opts).and_then(|mut vm| {
            if let Some(hook) = &opts.on_postcopy {
                let hold = vm.hold_handle();
                if !vm.is_running() {
                    // Running but held: the front-end's `cont` releases it
                    // while the rest of RAM still comes.
                    hold.hold_stopped();
                    vm.resume()?;
                }
                (hook.0)(hold);
            }
            Ok(vm)
        });
        if vm.is_err() {
            if let Some(b) = &breaker {
                b.break_channel();
            }
        }
        let received = receiving
            .join()
            .map_err(|_| MigrationError::from(PostcopyError::FaultThread))
            .and_then(|r| r);
        let vm = vm?;
        received?;
        let stats = missing.finish()?;
        tracing::info!(
            requests = stats.requests,
            blocktime_ms = stats.blocktime_ms,
            zero_filled = stats.zero_filled,
            "post-copy: every page arrived"
        );
        Ok(vm)
    })
}

/// Places the pages of post-copy's rest as they arrive.
struct PostcopySink<'a> {
    pages: &'a PostcopyPages,
    ranges: Vec<(u64, u64)>,
}

impl ferry_format::PageSink for PostcopySink<'_> {
    type Error = MigrationError;

    fn check(&mut self, gpas: &[u64]) -> Result<(), MigrationError> {
        gpas.iter()
            .try_for_each(|&gpa| check_inside(&self.ranges, gpa))
            .map_err(MigrationError::from)
    }

    fn page(&mut self, gpa: u64, data: Option<&[u8]>) -> Result<(), MigrationError> {
        Ok(self.pages.place(gpa, data)?)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::thread::JoinHandle;

    use ferry_format::RamBatchBuilder;
    use ferry_kvm::PAGE_SIZE;

    use super::*;
    use crate::devices::serial::SinkSpec;
    use crate::migration::MigrationUri;
    use crate::vm::VmShape;

    const SESSION: u64 = 0x5eed_0000_0000_0001;

    fn require_kvm() {
        assert!(
            Path::new("/dev/kvm").exists(),
            "/dev/kvm is missing: these tests build a VM"
        );
    }

    /// RAM of the VM the test destinations are configured for.
    const MEM: u64 = 16 << 20;

    /// A destination taking up to 4 streams on a unix socket in `dir`, on a thread.
    fn destination(dir: &Path) -> (PathBuf, JoinHandle<Result<(), String>>) {
        served(dir, ServeOptions::default())
    }

    /// [`destination`] with `serve`'s deadlines.
    fn served(dir: &Path, serve_opts: ServeOptions) -> (PathBuf, JoinHandle<Result<(), String>>) {
        let path = dir.join("mig.sock");
        let listener = Listener::bind(&MigrationUri::Unix(path.clone())).expect("bind");
        let t = std::thread::spawn(move || {
            let opts = RestoreOptions {
                backing: ferry_kvm::Backing::Anonymous,
                serial: SinkSpec::Null,
                expect_mem_bytes: Some(MEM),
                expect_vcpus: Some(1),
                autostart: false,
                virtio: Vec::new(),
                ide: Vec::new(),
                fw_cfg: None,
                firmware: None,
                rtc: None,
                on_postcopy: None,
            };
            serve(&listener, &serve_opts, &opts, &mut || {}, &|| 4)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        (path, t)
    }

    /// A connection to the destination: the stream we write, the replies we read.
    struct Peer {
        out: StreamWriter<UnixStream>,
        back: Option<UnixStream>,
        replies: Option<StreamReader<UnixStream>>,
    }

    impl Peer {
        fn connect(path: &Path) -> Self {
            let s = UnixStream::connect(path).expect("connect");
            let back = s.try_clone().expect("clone");
            let out = StreamWriter::new(s, "ferry-test").expect("preamble");
            Self {
                out,
                back: Some(back),
                replies: None,
            }
        }

        /// The next reply; the first one reads the return path's preamble too.
        fn reply(&mut self) -> Reply {
            if let Some(back) = self.back.take() {
                let r = StreamReader::new(back, ferry_format::Limits::default());
                self.replies = Some(r.expect("reply preamble").0);
            }
            let replies = self.replies.as_mut().expect("return path");
            let mut buf = Vec::new();
            let h = replies.next_section(&mut buf).expect("a reply");
            assert_eq!(h.id, SectionId::Reply);
            ferry_format::decode_cbor(h.id, &buf, &ferry_format::Limits::default())
                .expect("reply payload")
        }

        /// An extra stream presenting `session` as stream `index` of `streams`.
        fn join(path: &Path, index: u32, streams: u32, session: u64) -> Self {
            let mut p = Self::connect(path);
            p.out
                .write_cbor(
                    SectionId::Join,
                    SectionId::Join.current_version(),
                    &StreamJoin {
                        session,
                        index,
                        streams,
                    },
                )
                .expect("join");
            p
        }
    }

    /// Opens a migration of a 16 MiB VM proposing `streams` streams; returns the main
    /// connection after the destination accepted.
    fn handshake(path: &Path, streams: u32) -> Peer {
        let mut main = offer(path, shape(MEM, &["com1"]), streams);
        let want = if streams > 1 {
            Reply::Accepted { streams }
        } else {
            Reply::Ready
        };
        assert_eq!(main.reply(), want);
        main
    }

    fn shape(mem: u64, devices: &[&str]) -> VmShape {
        VmShape {
            ram_ranges: vec![(0, mem)],
            vcpus: 1,
            devices: devices.iter().map(|d| d.to_string()).collect(),
            cpuid: Vec::new(),
        }
    }

    /// Sends a handshake offering `shape`; the reply is the caller's to read.
    fn offer(path: &Path, shape: VmShape, streams: u32) -> Peer {
        let mut main = Peer::connect(path);
        main.out
            .write_cbor(
                SectionId::Shape,
                SectionId::Shape.current_version(),
                &Handshake {
                    shape,
                    digest: false,
                    streams,
                    session: if streams > 1 { SESSION } else { 0 },
                    postcopy: false,
                },
            )
            .expect("shape");
        main
    }

    fn failed_with(t: JoinHandle<Result<(), String>>, what: &str) {
        let e = t
            .join()
            .expect("destination thread")
            .expect_err("must fail");
        assert!(e.contains(what), "{e}");
    }

    #[test]
    fn strangers_are_refused_and_a_bad_index_fails_the_migration() {
        require_kvm();
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, t) = destination(dir.path());
        let mut main = handshake(&path, 2);
        // Another migration's stream: told so, and the migration goes on.
        let mut stranger = Peer::join(&path, 1, 2, SESSION ^ 1);
        match stranger.reply() {
            Reply::Error { message } => {
                assert!(message.contains("not a page stream"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert!(!t.is_finished());
        // The right session with a stream number that does not exist fails it.
        let _bad = Peer::join(&path, 5, 2, SESSION);
        match main.reply() {
            Reply::Error { message } => assert!(message.contains("no such stream"), "{message}"),
            other => panic!("{other:?}"),
        }
        failed_with(t, "page stream 5 failed");
    }

    #[test]
    fn a_wrong_stream_count_fails_the_migration() {
        require_kvm();
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, t) = destination(dir.path());
        let _main = handshake(&path, 3);
        let _bad = Peer::join(&path, 1, 4, SESSION);
        failed_with(t, "opened for 4 streams, 3 were agreed");
    }

    #[test]
    fn a_page_on_the_wrong_stream_fails_the_migration() {
        require_kvm();
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, t) = destination(dir.path());
        let _main = handshake(&path, 2);
        let mut extra = Peer::join(&path, 1, 2, SESSION);
        // Page 0 is in stripe 0: the main stream's, not stream 1's.
        let mut batch = RamBatchBuilder::new();
        batch.push_data(0, &[0xaa; PAGE_SIZE]).expect("page");
        extra.out.write_ram_batch(&batch).expect("batch");
        failed_with(t, "arrived on stream 1, but belongs to stream 0");
    }

    /// A guest whose CPU has a feature this host lacks is refused in the
    /// handshake, naming the feature: before any page moves.
    #[test]
    fn a_cpu_feature_this_host_lacks_is_refused_in_the_handshake() {
        require_kvm();
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let mut cpuid: Vec<crate::cpu::model::CpuidLeaf> = crate::cpu::supported_cpuid(&kvm)
            .expect("supported CPUID")
            .iter()
            .map(Into::into)
            .collect();
        // A feature bit this host does not offer: leaf 7 EBX, leaf 7 EDX or
        // 0x8000_0001 ECX, whichever has a free bit.
        let (leaf, name) = [7u32, 0x8000_0001]
            .into_iter()
            .find_map(|function| {
                let l = cpuid
                    .iter_mut()
                    .find(|l| l.function == function && l.index == 0)?;
                let reg = if function == 7 {
                    &mut l.edx
                } else {
                    &mut l.ecx
                };
                let (bit, name) = if function == 7 {
                    [
                        (24, "amx-tile"),
                        (23, "avx512-fp16"),
                        (22, "amx-bf16"),
                        (8, "avx512-vp2intersect"),
                    ]
                    .into_iter()
                    .find(|(b, _)| *reg & (1 << b) == 0)?
                } else {
                    [(2, "svm"), (11, "xop"), (16, "fma4"), (21, "tbm")]
                        .into_iter()
                        .find(|(b, _)| *reg & (1 << b) == 0)?
                };
                *reg |= 1 << bit;
                Some((function, name))
            })
            .expect("this host lacks some feature");
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, t) = destination(dir.path());
        let mut main = Peer::connect(&path);
        let shape = VmShape {
            ram_ranges: vec![(0, 16 << 20)],
            vcpus: 1,
            devices: vec!["com1".into()],
            cpuid,
        };
        main.out
            .write_cbor(
                SectionId::Shape,
                SectionId::Shape.current_version(),
                &Handshake {
                    shape,
                    digest: false,
                    streams: 1,
                    session: 0,
                    postcopy: false,
                },
            )
            .expect("shape");
        match main.reply() {
            Reply::Error { message } => assert!(
                message.contains("lacks features the guest's CPU has") && message.contains(name),
                "leaf {leaf:#x}: {message}"
            ),
            other => panic!("{other:?}"),
        }
        // The destination waits on for its real source.
        let _ok = handshake(&path, 1);
        assert!(!t.is_finished());
    }

    /// A stranger on the incoming port learns nothing of the destination's
    /// configuration, nothing is built for it, and the wait goes on: the real
    /// source is accepted after it. (Before: the stranger was told the
    /// destination's device list and the destination exited; a Shape asking for
    /// 16 GiB and 8 vCPUs was built.)
    #[test]
    fn a_stranger_learns_nothing_and_the_destination_waits_on() {
        require_kvm();
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, t) = destination(dir.path());
        // Not a ferry stream at all.
        let mut junk = UnixStream::connect(&path).expect("connect");
        junk.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("junk");
        let mut answer = Vec::new();
        let _ = std::io::Read::read_to_end(&mut junk, &mut answer);
        // Other devices, then a big VM: refused naming only what was sent.
        for (mem, devices) in [
            (MEM, vec!["com1", "virtio-blk@04:8192s-rw"]),
            (16 << 30, vec!["com1"]),
        ] {
            let mut stranger = offer(&path, shape(mem, &devices), 1);
            let mut big = shape(mem, &devices);
            big.vcpus = 8;
            match stranger.reply() {
                Reply::Error { message } => {
                    assert!(message.contains("not configured"), "{message}");
                    assert!(!message.contains("this side was given"), "{message}");
                    // The destination's own size never appears.
                    assert!(!message.contains(" 16 MiB"), "{message}");
                }
                other => panic!("{other:?}"),
            }
            let mut stranger = offer(&path, big, 1);
            assert!(matches!(stranger.reply(), Reply::Error { .. }));
        }
        assert!(!t.is_finished(), "a stranger ended the wait");
        let _real = handshake(&path, 1);
        assert!(!t.is_finished());
    }

    /// A stranger that connects and says nothing (or drips bytes) neither
    /// blocks the real source nor outlives its handshake deadline. (Before: it
    /// held the listener until the real source gave up.)
    #[test]
    fn a_silent_stranger_holds_up_nobody_and_is_dropped_at_its_deadline() {
        require_kvm();
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, t) = served(
            dir.path(),
            ServeOptions {
                handshake_deadline: Duration::from_millis(1500),
                ..ServeOptions::default()
            },
        );
        let mut silent = UnixStream::connect(&path).expect("connect");
        let mut dripping = UnixStream::connect(&path).expect("connect");
        dripping.write_all(b"FE").expect("drip");
        let started = Instant::now();
        let _real = handshake(&path, 1);
        assert!(!t.is_finished());
        // The losers' connections are closed: reads see the end at once.
        for s in [&mut silent, &mut dripping] {
            let mut rest = Vec::new();
            let _ = std::io::Read::read_to_end(s, &mut rest);
        }
        // Dropped by the deadline at the latest (or as losers, sooner).
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    /// A handshake that never completes is cut at its deadline while nobody
    /// else connects.
    #[test]
    fn a_dripping_handshake_is_cut_at_its_deadline() {
        require_kvm();
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, t) = served(
            dir.path(),
            ServeOptions {
                handshake_deadline: Duration::from_millis(500),
                ..ServeOptions::default()
            },
        );
        let mut dripping = UnixStream::connect(&path).expect("connect");
        // A byte at a time, each before a per-read timeout would fire: only a
        // deadline on the whole handshake stops it.
        let mut cut = false;
        for _ in 0..200 {
            if dripping.write_all(b"F").is_err() {
                cut = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(cut, "a handshake dripping for 10 s was never cut");
        assert!(!t.is_finished());
    }

    /// Once the pages flow, a source that falls silent is dropped after the idle
    /// timeout; one that sends keep-alives is not.
    #[test]
    fn a_silent_source_times_out_and_keepalives_keep_one_alive() {
        require_kvm();
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, t) = served(
            dir.path(),
            ServeOptions {
                idle_timeout: Duration::from_millis(1500),
                ..ServeOptions::default()
            },
        );
        let mut main = handshake(&path, 1);
        for _ in 0..10 {
            main.out.write_keepalive().expect("keep-alive");
            std::thread::sleep(Duration::from_millis(300));
        }
        assert!(!t.is_finished(), "a source sending keep-alives was dropped");
        match main.reply() {
            Reply::Error { message } => assert!(message.contains("sent nothing"), "{message}"),
            other => panic!("{other:?}"),
        }
        failed_with(t, "sent nothing for 1.5 s");
    }

    /// A destination on the network must know the VM it takes.
    #[test]
    fn serving_needs_the_configured_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = Listener::bind(&MigrationUri::Unix(dir.path().join("s"))).expect("bind");
        let opts = RestoreOptions {
            backing: ferry_kvm::Backing::Anonymous,
            serial: SinkSpec::Null,
            expect_mem_bytes: None,
            expect_vcpus: Some(1),
            autostart: false,
            virtio: Vec::new(),
            ide: Vec::new(),
            fw_cfg: None,
            firmware: None,
            rtc: None,
            on_postcopy: None,
        };
        let Err(e) = serve(
            &listener,
            &ServeOptions::default(),
            &opts,
            &mut || {},
            &|| 1,
        ) else {
            panic!("a destination without its size served");
        };
        assert!(e.to_string().contains("RAM size and vCPU count"), "{e}");
    }

    #[test]
    fn pages_are_striped_over_the_streams() {
        // Stripes: 256 KiB apart, round robin over the streams.
        assert_eq!(stream_of(0, 4), 0);
        assert_eq!(stream_of((256 << 10) - 4096, 4), 0);
        assert_eq!(stream_of(256 << 10, 4), 1);
        assert_eq!(stream_of(3 * (256 << 10), 4), 3);
        assert_eq!(stream_of(4 * (256 << 10), 4), 0);
        assert_eq!(stream_of(!4095, 1), 0);
    }
}
