//! The source side: handshake, pre-copy passes over the dirty log, switch-over.

use std::io::{BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_format::{RamBatchBuilder, SectionId, StreamReader, StreamWriter};
use ferry_kvm::{GuestRam, PAGE_SIZE};
use kvm_ioctls::VmFd;

use super::converge::{
    max_nap_ppm, next_step, Convergence, PassRecord, PassReport, Step, TimeLimit,
    DEVICE_STATE_PER_VCPU,
};
use super::transport::{Breaker, WriteHalf};
use super::{
    stream_of, Channel, Endpoint, MigrationControl, MigrationError, MigrationEvent,
    MigrationParams, MigrationStats, MigrationStatus, MigrationUri, Reply, ThrottlePolicy,
    TlsSessionError, TransportError, MAX_STREAMS,
};
use crate::persist::{producer, ram_digest, Handshake, StreamJoin};
use crate::throttle::{cycle, Throttle};
use crate::vm::Vm;

/// How long the source waits for the destination to accept the shape, and to confirm
/// it loaded the VM.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);
/// How long opening an extra page stream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest pre-copy pass.
const MIN_PASS: Duration = Duration::from_millis(5);
/// Pages per RAM section on the wire: 256 KiB of data, small enough that the
/// copy out of guest memory, the checksum and the socket's copy all find it in
/// the cache (2048 pages, 8 MiB, went through memory three times).
const BATCH_PAGES: u32 = 64;
/// The buffer in front of each stream's socket, for the small sections; a RAM
/// batch, larger than it, goes to the socket directly (one writev).
const WRITE_BUFFER: usize = 64 << 10;

/// Why no reply came from the destination on the return path.
#[derive(Debug, thiserror::Error)]
pub enum ReturnPathError {
    /// Reading or decoding a reply failed.
    #[error(transparent)]
    Read(#[from] ferry_format::FormatError),
    #[error("unexpected section {0} on the return path")]
    UnexpectedSection(SectionId),
    #[error("the destination closed the connection")]
    Closed,
    #[error("no answer within {waited_s} s")]
    NoAnswer { waited_s: u64 },
    #[error("cancelled")]
    Cancelled,
    #[error("the return path lock is poisoned")]
    Poisoned,
}

/// The destination's replies, as the return path's thread reads them.
type Replies = Receiver<Result<Reply, ReturnPathError>>;

/// Per-slot bitmaps of guest pages, bit i of word w = page w*64+i of the slot.
#[derive(Debug, Clone, Default)]
pub(crate) struct PageMap {
    slots: Vec<(u64, usize, Vec<u64>)>,
}

impl PageMap {
    pub fn new(ram: &GuestRam, full: bool) -> Self {
        let slots = ram
            .ranges()
            .into_iter()
            .map(|(base, size)| {
                let pages = (size as usize) / PAGE_SIZE;
                let mut bits = vec![if full { u64::MAX } else { 0 }; pages.div_ceil(64)];
                if full && pages % 64 != 0 {
                    if let Some(last) = bits.last_mut() {
                        *last = (1u64 << (pages % 64)) - 1;
                    }
                }
                (base, pages, bits)
            })
            .collect();
        Self { slots }
    }

    /// ORs KVM's per-slot logs in.
    pub fn merge(&mut self, logs: &[Vec<u64>]) {
        for ((_, _, bits), log) in self.slots.iter_mut().zip(logs) {
            for (b, l) in bits.iter_mut().zip(log) {
                *b |= *l;
            }
        }
    }

    /// ORs another map of the same RAM in.
    pub fn union(&mut self, other: &PageMap) {
        for ((_, _, bits), (_, _, theirs)) in self.slots.iter_mut().zip(&other.slots) {
            for (b, t) in bits.iter_mut().zip(theirs) {
                *b |= *t;
            }
        }
    }

    /// The bitmap words, one vector per RAM range (as KVM's dirty log).
    pub fn words(&self) -> Vec<Vec<u64>> {
        self.slots.iter().map(|s| s.2.clone()).collect()
    }

    /// The pages set, in address order.
    pub fn pages(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (base, _, bits) in &self.slots {
            for (wi, &w) in bits.iter().enumerate() {
                let _ = for_each_page(w, *base, wi as u64 * 64, |_, gpa| {
                    out.push(gpa);
                    Ok(())
                });
            }
        }
        out
    }

    /// Sets the bit of the page at `gpa`; whether it was set before (`None`:
    /// not a page of these ranges).
    pub fn test_and_set(&mut self, gpa: u64) -> Option<bool> {
        let (_, bits, page) = self.slots.iter_mut().find_map(|(base, pages, bits)| {
            let page = gpa.checked_sub(*base)? / PAGE_SIZE as u64;
            ((page as usize) < *pages).then_some(((), bits, page))
        })?;
        let (w, bit) = ((page / 64) as usize, 1u64 << (page % 64));
        let was = bits[w] & bit != 0;
        bits[w] |= bit;
        Some(was)
    }

    pub fn count(&self) -> u64 {
        self.slots
            .iter()
            .flat_map(|s| s.2.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// The pages set in `self`, in address order, in chunks of up to
    /// [`CHUNK_WORDS`] bitmap words: `f(slot, base of the slot, first page of the
    /// chunk in the slot, words)`, bit i of word w = page first_page + w*64 + i; with
    /// `mask`, only the pages whose bit in `mask` equals `masked`. Chunks without such
    /// pages are skipped; `f` may change the words it is given.
    pub fn for_each_chunk(
        &self,
        mask: Option<(&PageMap, bool)>,
        mut f: impl FnMut(u32, u64, u64, &mut [u64]) -> Result<(), MigrationError>,
    ) -> Result<(), MigrationError> {
        let mut chunk = [0u64; CHUNK_WORDS];
        for (si, (base, _, bits)) in self.slots.iter().enumerate() {
            for (ci, words) in bits.chunks(CHUNK_WORDS).enumerate() {
                let mut any = 0;
                for (wi, (c, &word)) in chunk.iter_mut().zip(words).enumerate() {
                    *c = word;
                    if let Some((m, masked)) = mask {
                        let mw = m.slots[si].2[ci * CHUNK_WORDS + wi];
                        *c &= if masked { mw } else { !mw };
                    }
                    any |= *c;
                }
                if any != 0 {
                    let first_page = (ci * CHUNK_WORDS * 64) as u64;
                    f(si as u32, *base, first_page, &mut chunk[..words.len()])?;
                }
            }
        }
        Ok(())
    }
}

/// Bitmap words per chunk of [`PageMap::for_each_chunk`]: 2048 pages, one RAM
/// batch, and one KVM_CLEAR_DIRTY_LOG.
const CHUNK_WORDS: usize = 32;

/// The guest-physical address of page `bit` of the word at `first_page` of a slot.
fn page_gpa(base: u64, first_page: u64, bit: u32) -> u64 {
    base + (first_page + u64::from(bit)) * PAGE_SIZE as u64
}

/// Calls `f(bit, gpa)` for every page set in `word`, the bitmap word of the pages
/// from `word_page` of the slot at `base`, in address order.
fn for_each_page(
    word: u64,
    base: u64,
    word_page: u64,
    mut f: impl FnMut(u32, u64) -> Result<(), MigrationError>,
) -> Result<(), MigrationError> {
    let mut w = word;
    while w != 0 {
        let bit = w.trailing_zeros();
        w &= w - 1;
        f(bit, page_gpa(base, word_page, bit))?;
    }
    Ok(())
}

/// The writing side of one page stream.
type Out = StreamWriter<BufWriter<Box<dyn WriteHalf>>>;

/// What the page streams of one migration share: the counters behind query-migrate,
/// the bandwidth cap (over all streams together), and the reasons to stop.
struct PageStreams<'a> {
    ctl: &'a MigrationControl,
    /// A post-copy request does not stop the sending: the switch-over (or the
    /// switch to post-copy) is under way.
    postcopy_waits: AtomicBool,
    /// Post-copy's rest is being sent: `max-postcopy-bandwidth` caps it.
    postcopy_phase: AtomicBool,
    /// Page requests waiting to be served: the pace does not sleep over them.
    requests_pending: Arc<AtomicU64>,
    replies: Arc<Mutex<Replies>>,
    /// Set once a stream failed: the others stop at their next batch.
    failed: AtomicBool,
    /// The first stream's error, which is the one reported.
    first_error: Mutex<Option<MigrationError>>,
    /// Every stream's channel, broken when one fails so no writer stays blocked.
    breakers: &'a Mutex<Vec<Breaker>>,
    /// Bytes written on all streams, and pages sent with data and as zero flags.
    bytes: AtomicU64,
    normal: AtomicU64,
    duplicate: AtomicU64,
    /// What the running pass set out to send, in bytes (all of RAM in pass 1),
    /// and the pages (sent with data or as zero) counted before it began:
    /// query-migrate's `remaining` goes down as the pass goes on.
    pass_rest: AtomicU64,
    pass_pages: AtomicU64,
    limiter: Mutex<RateWindow>,
    /// Time spent in KVM_CLEAR_DIRTY_LOG, all streams together.
    clear_ns: AtomicU64,
    /// Where the last live rate sample started: when, bytes, pages.
    rate_sample: Mutex<(Instant, u64, u64)>,
    /// While the switch-over sends the rest: the bound on the guest's pause.
    guard: Mutex<Option<DowntimeGuard>>,
    /// The guard fired: every stream stops at its next batch, and the guest
    /// runs again.
    overrun: AtomicBool,
}

/// The switch-over's bound on the pause (issue 16, item 6): if sending the
/// rest would keep the guest paused past `limit` (the downtime limit, the
/// link slowed or the estimate was wrong), the source resumes the guest and
/// goes on with pre-copy instead of stretching the pause.
#[derive(Debug, Clone, Copy)]
struct DowntimeGuard {
    start: Instant,
    bytes_at_start: u64,
    /// Bytes the rest takes (pages at their full size).
    rest_bytes: u64,
    limit: Duration,
}

/// At most this many returns to pre-copy per migration; then the switch-over
/// goes through however long it takes (the dirty limit still bounds the rest).
pub const MAX_SWITCHOVER_RETURNS: u32 = 5;
/// The guard's limit is at least this: below it, the time to resume the
/// guest and go back would cost more than it saves.
const MIN_GUARD: Duration = Duration::from_millis(50);

/// How often query-migrate's rates (`mbps`, `pages-per-second`) are refreshed
/// while a pass runs.
const RATE_SAMPLE: Duration = Duration::from_millis(100);

/// How often a long pass reads the dirty log for query-migrate's
/// `dirty-pages-rate` (QEMU measures that rate over periods of 1 s too). Each
/// read write-protects again the pages the guest dirtied since the last one, so
/// it costs the guest a fault per such page: once a second is a few percent of
/// a busy vCPU, ten times a second would be a third.
const DIRTY_SAMPLE: Duration = Duration::from_secs(1);

/// Reads the dirty log while a long pass runs, so `dirty-pages-rate` is known
/// during a first pass of many seconds and not only once it ends. The pages read
/// are kept, and the sync at the end of the pass adds them to its own: none is
/// lost. Only with the classic dirty log, where a read also re-arms it; with
/// manual protection the bits stay set until each chunk's clear, so a read
/// mid-pass would count pages not yet sent.
struct DirtySampler<'v> {
    vm: &'v VmFd,
    ram: &'v GuestRam,
    state: Mutex<(Instant, PageMap)>,
}

impl<'v> DirtySampler<'v> {
    fn new(vm: &'v VmFd, ram: &'v GuestRam, pass_start: Instant) -> Self {
        Self {
            vm,
            ram,
            state: Mutex::new((pass_start, PageMap::new(ram, false))),
        }
    }

    /// Reads the log if [`DIRTY_SAMPLE`] passed since the pass began or the
    /// last read (another stream reading it now is enough).
    fn sample(&self, sh: &PageStreams<'_>) -> Result<(), MigrationError> {
        let Ok(mut state) = self.state.try_lock() else {
            return Ok(());
        };
        let secs = state.0.elapsed();
        if secs < DIRTY_SAMPLE {
            return Ok(());
        }
        let log = self.ram.get_dirty_log(self.vm)?;
        state.0 = Instant::now();
        let pages: u64 = log
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        state.1.merge(&log);
        let rate = (pages as f64 / secs.as_secs_f64()) as u64;
        sh.ctl.update_stats(|s| s.ram.dirty_pages_rate = rate);
        Ok(())
    }

    /// The pages read during the pass.
    fn into_pages(self) -> PageMap {
        match self.state.into_inner() {
            Ok((_, pages)) => pages,
            Err(poisoned) => poisoned.into_inner().1,
        }
    }
}

/// The bandwidth cap's window: bytes sent (by all streams) since `start`.
struct RateWindow {
    start: Instant,
    bytes: u64,
    cap: u64,
}

impl<'a> PageStreams<'a> {
    /// The streams of a migration of `total_bytes` of RAM under `ctl`, the
    /// bandwidth capped at `cap` (0: no cap).
    fn new(
        ctl: &'a MigrationControl,
        replies: Arc<Mutex<Replies>>,
        total_bytes: u64,
        cap: u64,
    ) -> Self {
        Self {
            ctl,
            replies,
            failed: AtomicBool::new(false),
            first_error: Mutex::new(None),
            breakers: &ctl.breakers,
            bytes: AtomicU64::new(0),
            normal: AtomicU64::new(0),
            duplicate: AtomicU64::new(0),
            pass_rest: AtomicU64::new(total_bytes),
            pass_pages: AtomicU64::new(0),
            clear_ns: AtomicU64::new(0),
            rate_sample: Mutex::new((Instant::now(), 0, 0)),
            limiter: Mutex::new(RateWindow {
                start: Instant::now(),
                bytes: 0,
                cap,
            }),
            guard: Mutex::new(None),
            overrun: AtomicBool::new(false),
            postcopy_waits: AtomicBool::new(false),
            postcopy_phase: AtomicBool::new(false),
            requests_pending: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A pass (or the switch-over's send) sets out to send `rest_bytes`.
    fn begin_pass(&self, rest_bytes: u64) {
        let (_, normal, duplicate) = self.totals();
        self.pass_pages.store(normal + duplicate, Ordering::Release);
        self.pass_rest.store(rest_bytes, Ordering::Release);
    }

    /// Bytes on all streams, pages sent with data, pages sent as zero flags.
    fn totals(&self) -> (u64, u64, u64) {
        (
            self.bytes.load(Ordering::Acquire),
            self.normal.load(Ordering::Acquire),
            self.duplicate.load(Ordering::Acquire),
        )
    }

    /// Bytes/s and pages/s since the last sample, once `RATE_SAMPLE` has passed
    /// (then a new sample starts), given the totals now.
    fn sample_rate(&self, bytes: u64, pages: u64) -> Option<(f64, u64)> {
        let mut sample = self.rate_sample.lock().ok()?;
        let (start, b0, p0) = *sample;
        let secs = start.elapsed().as_secs_f64();
        if secs < RATE_SAMPLE.as_secs_f64() {
            return None;
        }
        *sample = (Instant::now(), bytes, pages);
        Some((
            bytes.saturating_sub(b0) as f64 / secs,
            (pages.saturating_sub(p0) as f64 / secs) as u64,
        ))
    }

    /// Records a stream's failure; the first one is the migration's error.
    fn fail(&self, e: MigrationError) {
        if let Ok(mut first) = self.first_error.lock() {
            if first.is_none() {
                *first = Some(e);
            }
        }
        self.failed.store(true, Ordering::Release);
        if let Ok(b) = self.breakers.lock() {
            b.iter().for_each(Breaker::break_channel);
        }
    }

    fn take_error(&self) -> MigrationError {
        self.first_error
            .lock()
            .ok()
            .and_then(|mut e| e.take())
            .unwrap_or(MigrationError::PageStreamFailed)
    }

    fn check_abort(&self) -> Result<(), MigrationError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(MigrationError::OtherPageStreamFailed);
        }
        if self.ctl.postcopy_requested() && !self.postcopy_waits.load(Ordering::Acquire) {
            return Err(MigrationError::PostcopyNow);
        }
        let replies = self
            .replies
            .lock()
            .map_err(|_| MigrationError::ReturnPathPoisoned)?;
        check_abort(self.ctl, &replies)
    }

    /// Whether the switch-over's send, measured so far, would keep the guest
    /// paused past its guard's limit (a quarter of the limit in, once the
    /// rate is known): then it stops, for every stream, at the next batch.
    fn overran(&self) -> bool {
        if self.overrun.load(Ordering::Acquire) {
            return true;
        }
        let Some(g) = self.guard.lock().ok().and_then(|g| *g) else {
            return false;
        };
        let elapsed = g.start.elapsed();
        if elapsed < g.limit / 4 {
            return false;
        }
        let sent = self
            .bytes
            .load(Ordering::Acquire)
            .saturating_sub(g.bytes_at_start);
        let left = g.rest_bytes.saturating_sub(sent);
        let projected = if left == 0 {
            elapsed
        } else if sent == 0 {
            Duration::MAX
        } else {
            elapsed.saturating_add(elapsed.mul_f64(left as f64 / sent as f64))
        };
        let over = projected > g.limit.saturating_add(g.limit / 4);
        if over {
            self.overrun.store(true, Ordering::Release);
        }
        over
    }

    /// A new cap applies from now on, not to what was sent under the old one.
    fn set_cap(&self, cap: u64) {
        if let Ok(mut w) = self.limiter.lock() {
            if w.cap != cap {
                *w = RateWindow {
                    start: Instant::now(),
                    bytes: 0,
                    cap,
                };
            }
        }
    }

    /// Counts `len` bytes against the cap and sleeps as long as they exceed it.
    /// The cap is read anew for every batch and while sleeping, so a
    /// `max-bandwidth` change (virsh migrate-setspeed) takes effect at once, as
    /// in QEMU, not only at the next pass.
    /// The cap in force: `max-bandwidth`, or in post-copy's rest
    /// `max-postcopy-bandwidth` (QEMU's split; 0 = unlimited).
    fn cap_now(&self) -> u64 {
        let p = self.ctl.params();
        if self.postcopy_phase.load(Ordering::Acquire) {
            p.max_postcopy_bandwidth
        } else {
            p.max_bandwidth
        }
    }

    fn pace(&self, len: u64) -> Result<(), MigrationError> {
        self.set_cap(self.cap_now());
        let wait = {
            let Ok(mut w) = self.limiter.lock() else {
                return Ok(());
            };
            if w.cap == 0 {
                return Ok(());
            }
            w.bytes += len;
            let allowed = w.start.elapsed().as_secs_f64() * w.cap as f64;
            (w.bytes as f64 - allowed).max(0.0) / w.cap as f64
        };
        if wait > 0.0 {
            // Sleep in slices so a cancel is honoured at once, also on a slow link.
            let until = Instant::now() + Duration::from_secs_f64(wait);
            let cap = self.limiter.lock().map(|w| w.cap).unwrap_or(0);
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                self.check_abort()?;
                // A slow link at the switch-over: stop waiting as soon as the
                // pause bound is known to be passed, not a whole batch later.
                if self.overran() {
                    return Err(MigrationError::SwitchoverOverrun);
                }
                // Post-copy: a page the guest waits for goes now; the
                // bytes stay counted, so the cap holds over the window.
                if self.postcopy_phase.load(Ordering::Acquire)
                    && self.requests_pending.load(Ordering::Acquire) > 0
                {
                    break;
                }
                let now = self.cap_now();
                if now != cap {
                    // A new cap starts a new window; these bytes are not owed.
                    self.set_cap(now);
                    break;
                }
                std::thread::sleep(left.min(Duration::from_millis(10)));
            }
        }
        if let Ok(mut w) = self.limiter.lock() {
            if w.start.elapsed() > Duration::from_secs(1) {
                w.start = Instant::now();
                w.bytes = 0;
            }
        }
        Ok(())
    }
}

/// Writes one stream's pages into RAM sections.
struct PageSender {
    out: Out,
    batch: RamBatchBuilder,
    /// This stream's number and the number of streams: it sends the pages of
    /// stripe `index` (see `stream_of`).
    index: u32,
    streams: u32,
    /// Pages counted since the last report to the shared counters.
    normal: u64,
    duplicate: u64,
    /// `out`'s bytes already added to the shared counter.
    reported: u64,
}

impl PageSender {
    fn new(out: Out, index: u32, streams: u32) -> Self {
        Self {
            out,
            batch: RamBatchBuilder::with_max_pages(BATCH_PAGES),
            index,
            streams,
            normal: 0,
            duplicate: 0,
            reported: 0,
        }
    }

    fn send(
        &mut self,
        sh: &PageStreams<'_>,
        ram: &GuestRam,
        gpa: u64,
        skip_zero: bool,
    ) -> Result<(), MigrationError> {
        // Test for zero in place: most pages of a fresh guest are zero, and copying
        // them first would double the memory traffic of the first pass.
        if ram.is_zero_page(gpa)? {
            self.duplicate += 1;
            if skip_zero {
                return Ok(());
            }
            self.batch.push_zero(gpa)?;
        } else {
            // Straight from guest memory into the batch: one copy, not two.
            self.batch
                .push_data_with(gpa, |buf| ram.read(gpa, buf).map_err(MigrationError::from))?;
            self.normal += 1;
        }
        if self.batch.is_full() {
            self.flush(sh)?;
        }
        Ok(())
    }

    /// Sends this stream's share of the pass's pages, then flushes.
    fn send_map(
        &mut self,
        sh: &PageStreams<'_>,
        ram: &GuestRam,
        pass: &PassPlan<'_>,
    ) -> Result<(), MigrationError> {
        let PassPlan {
            map,
            prev,
            skip_zero,
            clear,
            sampler,
        } = *pass;
        let (index, streams) = (self.index, self.streams);
        let mut chunk = |slot: u32, base: u64, first_page: u64, words: &mut [u64]| {
            // Only this stream's pages: another stream may be reading the others.
            let mut any = 0;
            for (wi, word) in words.iter_mut().enumerate() {
                let mut own = *word;
                for_each_page(*word, base, first_page + wi as u64 * 64, |bit, gpa| {
                    if stream_of(gpa, streams) != index {
                        own &= !(1 << bit);
                    }
                    Ok(())
                })?;
                *word = own;
                any |= own;
            }
            if any == 0 {
                return Ok(());
            }
            if let Some(vm) = clear {
                let t = Instant::now();
                ram.clear_dirty_log(vm, slot, first_page, words)?;
                sh.clear_ns
                    .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            for (wi, &word) in words.iter().enumerate() {
                for_each_page(word, base, first_page + wi as u64 * 64, |_, gpa| {
                    self.send(sh, ram, gpa, skip_zero)
                })?;
            }
            match sampler {
                Some(d) => d.sample(sh),
                None => Ok(()),
            }
        };
        match prev {
            Some(prev) => {
                map.for_each_chunk(Some((prev, false)), &mut chunk)?;
                map.for_each_chunk(Some((prev, true)), &mut chunk)?;
            }
            None => map.for_each_chunk(None, &mut chunk)?,
        }
        self.flush(sh)
    }

    fn flush(&mut self, sh: &PageStreams<'_>) -> Result<(), MigrationError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let len = self.batch.payload_len();
        self.out.write_ram_batch(&self.batch)?;
        self.batch.clear();
        self.report(sh);
        sh.check_abort()?;
        sh.pace(len)?;
        if sh.overran() {
            return Err(MigrationError::SwitchoverOverrun);
        }
        Ok(())
    }

    /// Adds what this stream sent since the last report to the shared counters and
    /// publishes them (progress within a pass, for query-migrate while a long pass
    /// runs).
    fn report(&mut self, sh: &PageStreams<'_>) {
        let written = self.out.bytes_written();
        let delta = written - self.reported;
        self.reported = written;
        let bytes = sh.bytes.fetch_add(delta, Ordering::AcqRel) + delta;
        let normal = sh.normal.fetch_add(self.normal, Ordering::AcqRel) + self.normal;
        let duplicate = sh.duplicate.fetch_add(self.duplicate, Ordering::AcqRel) + self.duplicate;
        (self.normal, self.duplicate) = (0, 0);
        let rate = sh.sample_rate(bytes, normal + duplicate);
        let seen = (normal + duplicate).saturating_sub(sh.pass_pages.load(Ordering::Acquire));
        let remaining = sh
            .pass_rest
            .load(Ordering::Acquire)
            .saturating_sub(seen * PAGE_SIZE as u64);
        sh.ctl.update_stats(|s| {
            record_pages(s, bytes, normal, duplicate);
            // Live, as QEMU's: libvirt's domjobinfo and Nova's progress log
            // show them mid-pass, not only once a pass ends.
            s.ram.remaining = remaining;
            if let Some((bytes_per_sec, pages_per_sec)) = rate {
                s.ram.mbps = bytes_per_sec * 8.0 / 1e6;
                s.ram.pages_per_second = pages_per_sec;
                // QEMU's estimate: what remains at the rate the link just had.
                if bytes_per_sec > 0.0 {
                    s.expected_downtime = (remaining as f64 * 1e3 / bytes_per_sec) as u64;
                }
            }
        });
    }
}

/// What one pass (or the switch-over's send) sends, and how.
#[derive(Clone, Copy)]
struct PassPlan<'p> {
    /// The pages to send.
    map: &'p PageMap,
    /// The previous sync's pages: those not in it (cold ones) go first.
    prev: Option<&'p PageMap>,
    /// Zero pages are not sent (pass 1: the destination's RAM starts zeroed).
    skip_zero: bool,
    /// Manual dirty-log protection: the dirty bits of each chunk of 2048 pages
    /// are reset (one KVM_CLEAR_DIRTY_LOG) right before its pages are read, so a
    /// write after that marks the page dirty for the next pass, and one before
    /// it is sent now and not again.
    clear: Option<&'p VmFd>,
    /// Reads the classic dirty log once a second of a long pass.
    sampler: Option<&'p DirtySampler<'p>>,
}

/// Sends a pass's pages over all streams in parallel, each its stripes; returns
/// once every stream has flushed its share, or with the first stream's error.
fn send_pass(
    senders: &mut [PageSender],
    sh: &PageStreams<'_>,
    ram: &GuestRam,
    pass: &PassPlan<'_>,
) -> Result<(), MigrationError> {
    let Some((main, extra)) = senders.split_first_mut() else {
        return Err(MigrationError::NoPageStream);
    };
    if extra.is_empty() {
        return main.send_map(sh, ram, pass);
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = extra
            .iter_mut()
            .map(|s| {
                let index = s.index;
                let spawned = std::thread::Builder::new()
                    .name(format!("migration-{index}"))
                    .spawn_scoped(scope, move || match s.send_map(sh, ram, pass) {
                        Ok(()) | Err(MigrationError::SwitchoverOverrun) => {}
                        Err(e) => sh.fail(e),
                    });
                let handle = match spawned {
                    Ok(handle) => Some(handle),
                    Err(source) => {
                        sh.fail(MigrationError::StartPageStreamThread { index, source });
                        None
                    }
                };
                (index, handle)
            })
            .collect();
        match main.send_map(sh, ram, pass) {
            Ok(()) | Err(MigrationError::SwitchoverOverrun) => {}
            Err(e) => sh.fail(e),
        }
        for (index, w) in workers {
            if let Some(handle) = w {
                if handle.join().is_err() {
                    sh.fail(MigrationError::PageStreamThreadPanicked { index });
                }
            }
        }
    });
    if sh.failed.load(Ordering::Acquire) {
        return Err(sh.take_error());
    }
    if sh.overrun.load(Ordering::Acquire) {
        return Err(MigrationError::SwitchoverOverrun);
    }
    Ok(())
}

/// Opens the extra page streams `1..streams` to `uri`, each announcing itself with
/// a Join section.
fn open_extra_streams(
    uri: &MigrationUri,
    session: u64,
    streams: u32,
    breakers: &Mutex<Vec<Breaker>>,
    params: &MigrationParams,
) -> Result<Vec<PageSender>, MigrationError> {
    let mut senders = Vec::new();
    for index in 1..streams {
        let fail = |source| MigrationError::OpenPageStream { index, source };
        let channel = Channel::connect(uri, CONNECT_TIMEOUT).map_err(fail)?;
        if let (Ok(b), Ok(mut all)) = (channel.breaker(), breakers.lock()) {
            all.push(b);
        }
        let channel = secure(channel, params).map_err(fail)?;
        let mut out = StreamWriter::new(
            BufWriter::with_capacity(WRITE_BUFFER, channel.writer),
            &producer(),
        )?;
        out.write_cbor(
            SectionId::Join,
            SectionId::Join.current_version(),
            &StreamJoin {
                session,
                index,
                streams,
            },
        )?;
        out.get_mut()
            .flush()
            .map_err(|source| MigrationError::SendJoin { index, source })?;
        senders.push(PageSender::new(out, index, streams));
    }
    Ok(senders)
}

/// A random session token for extra streams (never 0).
fn session_token(streams: u32) -> Result<u64, MigrationError> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|source| MigrationError::SessionToken { streams, source })?;
    Ok(u64::from_le_bytes(b) | 1)
}

/// The page counters of query-migrate's `ram` object.
fn record_pages(s: &mut MigrationStats, transferred: u64, normal: u64, duplicate: u64) {
    s.ram.transferred = transferred;
    s.ram.normal = normal;
    s.ram.normal_bytes = normal * PAGE_SIZE as u64;
    s.ram.duplicate = duplicate;
}

fn check_abort(ctl: &MigrationControl, replies: &Replies) -> Result<(), MigrationError> {
    if ctl.is_cancelled() {
        return Err(MigrationError::Cancelled);
    }
    match replies.try_recv() {
        Ok(Ok(Reply::Error { message })) => Err(MigrationError::Refused(message)),
        Ok(Err(e)) => Err(MigrationError::ReturnPath(e)),
        _ => Ok(()),
    }
}

/// Reads replies from the destination in a thread, so the sender can poll
/// them; post-copy's page requests go to the second receiver.
fn spawn_return_path(channel: &mut Channel) -> (Replies, PageRequests) {
    let (tx, rx) = mpsc::channel();
    let (req_tx, req_rx) = mpsc::channel();
    let pending = Arc::new(AtomicU64::new(0));
    let requests = PageRequests {
        rx: req_rx,
        pending: Arc::clone(&pending),
    };
    if !channel.has_return_path {
        return (rx, requests);
    }
    let reader = std::mem::replace(&mut channel.reader, Box::new(std::io::empty()));
    let _ = std::thread::Builder::new()
        .name("migration-return".into())
        .spawn(move || {
            let limits = ferry_format::Limits::default();
            let mut reader = match StreamReader::new(reader, limits) {
                Ok((r, _)) => r,
                Err(e) => {
                    let _ = tx.send(Err(ReturnPathError::Read(e)));
                    return;
                }
            };
            let mut buf = Vec::new();
            loop {
                let msg = match reader.next_section(&mut buf) {
                    Ok(h) if h.id == SectionId::Reply => {
                        ferry_format::decode_cbor::<Reply>(h.id, &buf, &limits)
                            .map_err(ReturnPathError::Read)
                    }
                    Ok(h) => Err(ReturnPathError::UnexpectedSection(h.id)),
                    Err(e) => Err(ReturnPathError::Read(e)),
                };
                if let Ok(Reply::PageRequest { gpa }) = msg {
                    // Nobody listens once post-copy ended: nothing is lost.
                    pending.fetch_add(1, Ordering::AcqRel);
                    let _ = req_tx.send(gpa);
                    continue;
                }
                let stop = msg.is_err();
                if tx.send(msg).is_err() || stop {
                    return;
                }
            }
        });
    (rx, requests)
}

/// Post-copy's page requests, as the return path received them, and how many
/// are waiting (the pace stops sleeping for them).
struct PageRequests {
    rx: Receiver<u64>,
    pending: Arc<AtomicU64>,
}

fn wait_reply(
    replies: &Replies,
    ctl: &MigrationControl,
    timeout: Duration,
) -> Result<Reply, ReturnPathError> {
    let deadline = Instant::now() + timeout;
    loop {
        if ctl.is_cancelled() {
            return Err(ReturnPathError::Cancelled);
        }
        match replies.recv_timeout(Duration::from_millis(50)) {
            Ok(r) => return r,
            Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(RecvTimeoutError::Timeout) => {
                return Err(ReturnPathError::NoAnswer {
                    waited_s: timeout.as_secs(),
                })
            }
            Err(RecvTimeoutError::Disconnected) => return Err(ReturnPathError::Closed),
        }
    }
}

/// How long a source whose stream broke waits for the destination's reason.
const REASON_WAIT: Duration = Duration::from_secs(1);

/// The reason a destination gave for ending the migration, if it gave one: a
/// destination that refuses a stream says why on the return path and closes,
/// and the source's next write fails (connection reset) while the reason
/// waits to be read. The reason is what the operator needs, not the reset.
/// Waits at most [`REASON_WAIT`], less when the return path ends.
fn told_why(replies: &Mutex<Replies>) -> Option<String> {
    let replies = replies.lock().ok()?;
    let deadline = Instant::now() + REASON_WAIT;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match replies.recv_timeout(left) {
            Ok(Ok(Reply::Error { message })) => return Some(message),
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return None,
        }
    }
}

/// Migrates `vm` over `channel` (and, with `multifd-channels` above 1, over more
/// connections to the same address). On success (the statistics) the VM is left
/// paused: the destination has it, and the caller frees it. On failure before the
/// switch-over completed the VM runs on as before.
pub fn migrate(
    vm: &mut Vm,
    mut channel: Channel,
    ctl: &Arc<MigrationControl>,
) -> Result<MigrationStats, MigrationError> {
    let was_running = vm.is_running();
    // A `file:` migration's file takes its name only once it is whole and synced.
    let file = channel.take_file();
    let to_file = file.is_some();
    let start = Instant::now();
    ctl.emit(MigrationEvent::Status(MigrationStatus::Setup));
    if let (Ok(b), Ok(mut all)) = (channel.breaker(), ctl.breakers.lock()) {
        all.push(b);
    }
    let mut point_of_no_return = false;
    let mut postcopy = false;
    let mut return_path = None;
    let result = secure(channel, &ctl.params())
        .map_err(MigrationError::from)
        .and_then(|mut channel| {
            let (replies, requests) = spawn_return_path(&mut channel);
            let pending = Arc::clone(&requests.pending);
            let replies = Arc::new(Mutex::new(replies));
            return_path = Some(Arc::clone(&replies));
            let mut precopy = Precopy::handshake(vm, channel, ctl, replies, start)?;
            precopy.sh.requests_pending = pending;
            precopy.requests = Some(requests);
            let result = precopy.run();
            point_of_no_return = precopy.point_of_no_return;
            postcopy = precopy.postcopy_started;
            result
        });
    let result = match (result, file) {
        (Ok(stats), Some(file)) => file
            .commit()
            .map(|()| stats)
            .map_err(MigrationError::CommitFile),
        (result, _) => result,
    };
    // Nothing left for a later cancel to break.
    let breakers = ctl
        .breakers
        .lock()
        .map(|mut b| std::mem::take(&mut *b))
        .unwrap_or_default();
    // Dirty logging off again, whatever happened, and the log back in classic mode.
    if let Err(e) = vm.ram().register(vm.vm_fd(), false) {
        tracing::warn!("cannot turn dirty logging off: {e}");
    }
    if let Err(e) = vm.ram().set_manual_dirty_protect(vm.vm_fd(), false) {
        tracing::warn!("{e}");
    }
    ctl.update_stats(|s| s.total_time = start.elapsed().as_millis() as u64);
    match result {
        Ok(mut stats) => {
            ctl.emit(MigrationEvent::Status(MigrationStatus::Completed));
            stats.status = MigrationStatus::Completed;
            stats.total_time = start.elapsed().as_millis() as u64;
            Ok(stats)
        }
        Err(e) => Err(failed(
            vm,
            ctl,
            e,
            &Failure {
                was_running,
                to_file,
                point_of_no_return,
                postcopy,
                return_path: return_path.as_deref(),
                breakers: &breakers,
            },
        )),
    }
}

/// What [`failed`] needs to know of a migration that failed.
struct Failure<'f> {
    /// The guest ran when the migration began.
    was_running: bool,
    /// The migration went to a file.
    to_file: bool,
    /// End was sent: the destination may be running the VM.
    point_of_no_return: bool,
    /// The destination ran the VM in post-copy: whatever happened since, the
    /// source's copy is older than the guest, and never runs again by itself.
    postcopy: bool,
    return_path: Option<&'f Mutex<Replies>>,
    breakers: &'f [Breaker],
}

/// Ends a failed migration: finds the reason the operator needs (the
/// destination's, where it gave one), breaks the channels, resumes the source
/// unless the destination may have the VM, and reports the failure.
fn failed(
    vm: &mut Vm,
    ctl: &MigrationControl,
    e: MigrationError,
    f: &Failure<'_>,
) -> MigrationError {
    let e = match f.return_path {
        Some(replies) if broke(&e) && !ctl.is_cancelled() => {
            told_why(replies).map_or(e, MigrationError::Refused)
        }
        _ => e,
    };
    f.breakers.iter().for_each(Breaker::break_channel);
    // A file has no reader that could be running the VM: its VM resumes.
    let unconfirmed = f.postcopy
        || (f.point_of_no_return && !f.to_file && !matches!(e, MigrationError::Refused(_)));
    let e = if unconfirmed {
        MigrationError::Unconfirmed(crate::error_chain(&e))
    } else if ctl.is_cancelled() && !matches!(e, MigrationError::Refused(_)) {
        // A cancel breaks the channels: the write it interrupted fails, and
        // the reason is the cancel, not the broken pipe.
        MigrationError::Cancelled
    } else {
        e
    };
    if f.was_running && !unconfirmed {
        if let Err(r) = vm.resume() {
            tracing::error!("cannot resume the source VM after a failed migration: {r}");
        }
    }
    let status = if matches!(e, MigrationError::Cancelled) {
        MigrationStatus::Cancelled
    } else {
        MigrationStatus::Failed
    };
    let why = crate::error_chain(&e);
    tracing::warn!("migration failed: {why}");
    ctl.update_stats(|s| s.error_desc = Some(why));
    ctl.emit(MigrationEvent::Status(status));
    e
}

/// Whether `e` says a stream or the return path broke: then the destination
/// may have said why on the return path before it closed.
fn broke(e: &MigrationError) -> bool {
    use MigrationError as E;
    matches!(
        e,
        E::Stream(_)
            | E::PageStream { .. }
            | E::SendHandshake(_)
            | E::AwaitHandshakeAnswer(_)
            | E::UnexpectedHandshakeAnswer { .. }
            | E::ReturnPath(_)
            | E::ReturnPathPoisoned
            | E::NoPageStream
            | E::NoMainStream
            | E::PageStreamFailed
            | E::OtherPageStreamFailed
            | E::OpenPageStream { .. }
            | E::SendJoin { .. }
            | E::StartPageStreamThread { .. }
            | E::PageStreamThreadPanicked { .. }
            | E::FinishPageStream { .. }
            | E::SendKeepalive(_)
            | E::SendEnd(_)
            | E::AwaitConfirmation(_)
            | E::UnexpectedConfirmation { .. }
            | E::CommitFile(_)
    )
}

/// Runs the TLS handshake on a new connection when the migration has credentials.
fn secure(channel: Channel, params: &MigrationParams) -> Result<Channel, TransportError> {
    let Some(creds) = &params.tls else {
        return Ok(channel);
    };
    if creds.endpoint() != Endpoint::Client {
        return Err(TransportError::Tls {
            uri: channel
                .reconnect_uri()
                .map_or_else(|| "the destination".into(), ToString::to_string),
            source: TlsSessionError::WrongEndpoint {
                have: "server",
                side: "source",
                want: "client",
            },
        });
    }
    channel.secure(creds, params.tls_hostname.as_deref())
}

/// How many streams to propose, and where to open the extra ones.
fn proposed_streams(
    channel: &Channel,
    wanted: u32,
) -> Result<(u32, Option<MigrationUri>), MigrationError> {
    let wanted = wanted.max(1);
    if wanted > MAX_STREAMS {
        return Err(MigrationError::Streams {
            streams: wanted,
            reason: format!("multifd-channels is at most {MAX_STREAMS}"),
        });
    }
    if wanted == 1 {
        return Ok((1, None));
    }
    match channel.reconnect_uri() {
        Some(uri) => Ok((wanted, Some(uri.clone()))),
        None => Err(MigrationError::Streams {
            streams: wanted,
            reason: "fd: and file: migrations carry one stream; use a tcp: or unix: URI, or \
                     set multifd-channels=1"
                .into(),
        }),
    }
}

/// Sends the handshake on the main stream: the VM's shape, whether a digest
/// follows, and the page streams it proposes. Returns the main stream.
fn send_handshake(
    vm: &Vm,
    writer: Box<dyn WriteHalf>,
    params: &MigrationParams,
    wanted: u32,
    session: u64,
) -> Result<Out, MigrationError> {
    let mut out = StreamWriter::new(BufWriter::with_capacity(WRITE_BUFFER, writer), &producer())?;
    out.write_cbor(
        SectionId::Shape,
        SectionId::Shape.current_version(),
        &Handshake {
            shape: vm.shape(),
            digest: params.verify_digest,
            streams: wanted,
            session,
            postcopy: params.postcopy,
        },
    )?;
    out.get_mut()
        .flush()
        .map_err(MigrationError::SendHandshake)?;
    Ok(out)
}

/// Waits for the destination's answer to a handshake proposing `wanted`
/// streams: the number of streams it accepted.
fn await_answer(
    ctl: &MigrationControl,
    replies: &Mutex<Replies>,
    wanted: u32,
) -> Result<u32, MigrationError> {
    let answer = match replies.lock() {
        Ok(r) => wait_reply(&r, ctl, HANDSHAKE_TIMEOUT),
        Err(_) => Err(ReturnPathError::Poisoned),
    };
    match answer {
        // A destination that predates page streams answers Ready: one stream.
        Ok(Reply::Ready) => Ok(1),
        Ok(Reply::Accepted { streams: n }) if n < wanted && ctl.params().exact_streams => {
            Err(MigrationError::StreamsRefused { wanted, took: n })
        }
        Ok(Reply::Accepted { streams: n }) if wanted > 1 && (1..=wanted).contains(&n) => Ok(n),
        Ok(Reply::Error { message }) => Err(MigrationError::Refused(message)),
        Ok(other) => Err(MigrationError::UnexpectedHandshakeAnswer {
            reply: format!("{other:?}"),
            wanted,
        }),
        Err(_) if ctl.is_cancelled() => Err(MigrationError::Cancelled),
        // No answer is not a refusal: the destination died, the link broke
        // or it never answered.
        Err(e) => Err(MigrationError::AwaitHandshakeAnswer(e)),
    }
}

/// The guest paused for the switch-over, and its rest sent.
struct Pause {
    /// When the pause was requested: the downtime counts from here.
    start: Instant,
    /// Pages of the rest.
    rest_pages: u64,
    /// The throttle in force before the pause, as query-migrate reports it.
    throttle_pct: u8,
}

/// What the main stream carried after the rest: for the completion's figures.
struct Finished {
    /// Bytes on all streams, pages sent with data and as zero flags, before End.
    totals: (u64, u64, u64),
    device_bytes: u64,
    digest_ms: u64,
}

/// One outgoing migration after its handshake: the page streams, the dirty
/// log, the passes so far and where the switch-over stands.
struct Precopy<'a> {
    vm: &'a mut Vm,
    ctl: &'a MigrationControl,
    /// When the migration began.
    start: Instant,
    /// The parameters when it began (each pass reads them anew for itself).
    params: MigrationParams,
    has_return_path: bool,
    sh: PageStreams<'a>,
    /// The main stream first, then the extra ones.
    senders: Vec<PageSender>,
    streams: u32,
    ram: Arc<GuestRam>,
    /// Manual dirty-log protection is on.
    manual: bool,
    throttle: Throttle,
    conv: Convergence,
    device_estimate: u64,
    /// The pages the next pass sends, and those the last sync found dirty.
    to_send: PageMap,
    prev_sync: PageMap,
    /// Passes made so far.
    pass: u64,
    /// The passes since pre-copy began or last returned to it.
    history: Vec<PassRecord>,
    /// Time spent reading the dirty log at the end of passes, microseconds.
    sync_us: u64,
    /// The timeout forced this switch-over: it is not guarded.
    forced: bool,
    /// Returns to pre-copy from a switch-over that would have overrun.
    returns: u32,
    /// libvirt gave its go-ahead for the switch-over.
    went_ahead: bool,
    /// End was sent: the destination may be running the VM.
    point_of_no_return: bool,
    /// Post-copy's page requests from the destination.
    requests: Option<PageRequests>,
    /// The state went to the destination in post-copy: it runs the VM.
    postcopy_started: bool,
}

impl<'a> Precopy<'a> {
    /// The handshake: proposes the VM's shape and the page streams on
    /// `channel`, waits for the destination's answer, then opens the streams
    /// it accepted.
    fn handshake(
        vm: &'a mut Vm,
        channel: Channel,
        ctl: &'a MigrationControl,
        replies: Arc<Mutex<Replies>>,
        start: Instant,
    ) -> Result<Self, MigrationError> {
        let params = ctl.params();
        let (wanted, reconnect) = proposed_streams(&channel, params.multifd_channels)?;
        if params.postcopy && wanted > 1 {
            return Err(MigrationError::PostcopyWithStreams);
        }
        if params.postcopy && params.verify_digest {
            return Err(MigrationError::PostcopyWithDigest);
        }
        let session = if wanted > 1 {
            session_token(wanted)?
        } else {
            0
        };
        let has_return_path = channel.has_return_path;
        let total_bytes = vm.ram().total_bytes();
        ctl.update_stats(|s| {
            s.ram.total = total_bytes;
            s.ram.page_size = PAGE_SIZE as u64;
        });
        let out = send_handshake(vm, channel.writer, &params, wanted, session)?;
        let streams = if has_return_path {
            await_answer(ctl, &replies, wanted)?
        } else {
            1
        };
        let sh = PageStreams::new(ctl, replies, total_bytes, params.max_bandwidth);
        let mut senders = vec![PageSender::new(out, 0, streams)];
        if let (Some(uri), true) = (&reconnect, streams > 1) {
            senders.extend(open_extra_streams(
                uri,
                session,
                streams,
                &ctl.breakers,
                &params,
            )?);
        }
        for s in &mut senders {
            s.report(&sh);
        }
        ctl.update_stats(|s| s.streams = streams);
        let ram = vm.ram().clone();
        let device_estimate = u64::from(vm.config().vcpus) * DEVICE_STATE_PER_VCPU + 4096;
        Ok(Self {
            throttle: vm.throttle(),
            to_send: PageMap::new(&ram, true),
            prev_sync: PageMap::new(&ram, false),
            vm,
            ctl,
            start,
            params,
            has_return_path,
            sh,
            senders,
            streams,
            ram,
            manual: false,
            conv: Convergence::default(),
            device_estimate,
            pass: 0,
            history: Vec::new(),
            sync_us: 0,
            forced: false,
            returns: 0,
            went_ahead: false,
            point_of_no_return: false,
            requests: None,
            postcopy_started: false,
        })
    }

    /// Pre-copy, the switch-over, and the destination's confirmation.
    fn run(&mut self) -> Result<MigrationStats, MigrationError> {
        self.start_logging()?;
        let pause = loop {
            loop {
                if self.ctl.postcopy_requested() {
                    return self.postcopy();
                }
                match self.pass() {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(MigrationError::PostcopyNow) => return self.postcopy(),
                    Err(e) => return Err(e),
                }
            }
            if let Some(pause) = self.switch_over()? {
                break pause;
            }
        };
        let finished = self.finish()?;
        self.confirm()?;
        Ok(self.completed(&pause, &finished))
    }

    /// Turns dirty logging on, with manual protection where asked for and available.
    fn start_logging(&mut self) -> Result<(), MigrationError> {
        let vm_fd = self.vm.vm_fd();
        // Manual protection first: a slot whose logging is turned on afterwards starts
        // all dirty, without write-protecting all of RAM at once.
        self.manual = self.params.clear_dirty_log
            && self
                .ram
                .set_manual_dirty_protect(vm_fd, true)
                .unwrap_or_else(|e| {
                    tracing::warn!("dirty log: classic mode ({e})");
                    false
                });
        self.ram.register(vm_fd, true)?;
        let (manual, params) = (self.manual, &self.params);
        let setup_time = self.start.elapsed().as_millis() as u64;
        self.ctl.update_stats(|s| {
            s.manual_dirty_protect = manual;
            // Logging on is QEMU's first bitmap sync; until a rate is measured the
            // expected downtime is the limit, as QEMU reports it.
            s.ram.dirty_sync_count = 1;
            s.expected_downtime = params.downtime_limit_ms;
            s.setup_time = setup_time;
        });
        self.ctl
            .emit(MigrationEvent::Status(MigrationStatus::Active));
        Ok(())
    }

    /// One pre-copy pass: sends what is to send, reads what the guest dirtied
    /// meanwhile and weighs the pass ([`next_step`]). Returns whether to
    /// switch over now.
    fn pass(&mut self) -> Result<bool, MigrationError> {
        self.pass += 1;
        let params = self.ctl.params();
        let (sent, elapsed, dirty) = self.send_and_sync(&params)?;
        let report = PassReport {
            bytes_sent: sent,
            elapsed,
            dirty_bytes: dirty.count() * PAGE_SIZE as u64,
            device_bytes: self.device_estimate,
        };
        let expected = self.conv.observe(&report, params.max_bandwidth);
        let dirty_rate = report.dirty_bytes as f64 / elapsed.as_secs_f64().max(1e-3);
        self.record_pass(&params, &report, expected, dirty_rate);
        self.history.push(PassRecord {
            bytes_sent: sent,
            elapsed,
            dirty_bytes: report.dirty_bytes,
            expected_downtime: expected,
            downtime_limit: Duration::from_millis(params.downtime_limit_ms),
        });
        let step = next_step(&self.history, &TimeLimit::of(&params), self.start.elapsed());
        match step {
            Step::Continue | Step::ExtraPass => {
                if params.auto_converge {
                    self.adjust_throttle(&params, &report, dirty_rate);
                }
                self.to_send = dirty.clone();
                self.prev_sync = dirty;
                Ok(false)
            }
            Step::SwitchOver | Step::ForceSwitchOver => {
                self.forced = step == Step::ForceSwitchOver;
                self.prev_sync = dirty;
                Ok(true)
            }
            Step::TimedOut => Err(MigrationError::TimedOut(params.max_total_time_ms)),
        }
    }

    /// Sends the pass's pages, the cold ones (not dirtied in the previous sync)
    /// first, then syncs: returns the bytes sent, the pass's time, and the pages
    /// the guest dirtied while they were sent (with what a long pass already read).
    fn send_and_sync(
        &mut self,
        params: &MigrationParams,
    ) -> Result<(u64, Duration, PageMap), MigrationError> {
        self.sh.set_cap(params.max_bandwidth);
        let pass_start = Instant::now();
        let bytes_before = self.sh.bytes.load(Ordering::Acquire);
        self.sh.begin_pass(self.to_send.count() * PAGE_SIZE as u64);
        let vm_fd = self.vm.vm_fd();
        let sampler = (!self.manual).then(|| DirtySampler::new(vm_fd, &self.ram, pass_start));
        let plan = PassPlan {
            map: &self.to_send,
            prev: Some(&self.prev_sync),
            skip_zero: self.pass == 1,
            clear: self.manual.then_some(vm_fd),
            sampler: sampler.as_ref(),
        };
        if let Err(e) = send_pass(&mut self.senders, &self.sh, &self.ram, &plan) {
            // Switching to post-copy mid-pass: what the pass set out to send
            // goes in the rest, with what the sampler read of the log.
            if let (MigrationError::PostcopyNow, Some(d)) = (&e, sampler) {
                self.to_send.union(&d.into_pages());
            }
            return Err(e);
        }
        // A pass with almost nothing to send still lets the guest run a little, so a
        // limit that cannot be met does not spin on empty passes.
        if let Some(rest) = MIN_PASS.checked_sub(pass_start.elapsed()) {
            std::thread::sleep(rest);
        }
        let elapsed = pass_start.elapsed();
        let sent = self.sh.bytes.load(Ordering::Acquire) - bytes_before;
        let mut dirty = match sampler {
            Some(d) => d.into_pages(),
            None => PageMap::new(&self.ram, false),
        };
        let sync_start = Instant::now();
        dirty.merge(&self.ram.get_dirty_log(vm_fd)?);
        self.sync_us += sync_start.elapsed().as_micros() as u64;
        Ok((sent, elapsed, dirty))
    }

    /// Publishes a pass's figures (query-migrate, the Pass event, the log).
    fn record_pass(
        &self,
        params: &MigrationParams,
        report: &PassReport,
        expected: Duration,
        dirty_rate: f64,
    ) {
        let (pass, sent, elapsed) = (self.pass, report.bytes_sent, report.elapsed);
        let (transferred, normal, duplicate) = self.sh.totals();
        let throttle = &self.throttle;
        self.ctl.update_stats(|s| {
            s.passes = pass;
            // QEMU counts the sync that starts its first pass too.
            s.ram.dirty_sync_count = pass + 1;
            record_pages(s, transferred, normal, duplicate);
            s.ram.remaining = report.dirty_bytes;
            s.ram.dirty_pages_rate = (dirty_rate / PAGE_SIZE as f64) as u64;
            s.ram.mbps = sent as f64 * 8.0 / 1e6 / elapsed.as_secs_f64().max(1e-6);
            s.ram.pages_per_second = (self.conv.bandwidth / PAGE_SIZE as f64) as u64;
            s.expected_downtime = expected.as_millis() as u64;
            s.total_time = self.start.elapsed().as_millis() as u64;
            s.cpu_throttle_percentage = throttle.percent();
            s.dirty_limit_throttle_time_per_round = beyond_cap(throttle.nap_ppm(), params);
            s.dirty_sync_us = self.sync_us;
            s.dirty_clear_us = self.sh.clear_ns.load(Ordering::Relaxed) / 1000;
        });
        self.ctl.emit(MigrationEvent::Pass(pass));
        tracing::debug!(
            pass,
            sent,
            ?elapsed,
            dirty_pages = report.dirty_bytes / PAGE_SIZE as u64,
            ?expected,
            throttle = throttle.percent(),
            "pre-copy pass"
        );
    }

    /// Auto-converge: the throttle this pass calls for, by the policy in force.
    fn adjust_throttle(&mut self, params: &MigrationParams, report: &PassReport, dirty_rate: f64) {
        let now = self.throttle.nap_ppm();
        let max = max_nap_ppm(params.max_throttle_pct, params.dirty_limit);
        let cap = max_nap_ppm(params.max_throttle_pct, false);
        let nap = match params.throttle {
            ThrottlePolicy::Adaptive => self.conv.throttle_for(dirty_rate, now, max),
            // QEMU's steps up to its cap; past it, the dirty limit as above.
            _ if now >= cap && max > cap => self.conv.throttle_for(dirty_rate, now, max),
            qemu => self.conv.qemu_throttle_for(
                report.dirty_bytes,
                report.bytes_sent,
                now,
                qemu,
                params.max_throttle_pct,
            ),
        };
        self.throttle.set_ppm(nap);
    }

    /// Switch-over: stops the guest and sends the rest. Returns the pause, or
    /// `None` when sending the rest would have kept the guest paused past the
    /// downtime limit: then the guest runs again and pre-copy goes on.
    fn switch_over(&mut self) -> Result<Option<Pause>, MigrationError> {
        // From here the downtime counts. The throttle goes once the vCPUs are
        // stopped: lifted first, a guest throttled to a few runs per second
        // would run free until they stop and dirty its whole working set again.
        let throttle_pct = self.throttle.percent();
        let throttle_ppm = self.throttle.nap_ppm();
        // The pause counts from the stop request, as QEMU counts it from
        // vm_stop: kicking the vCPUs out of the guest takes time too.
        let start = Instant::now();
        // Too late for post-copy: the rest is about to go with the guest paused.
        self.sh.postcopy_waits.store(true, Ordering::Release);
        self.vm.pause()?;
        self.throttle.set_ppm(0);
        tracing::debug!(pause = ?start.elapsed(), "vCPUs stopped for the switch-over");
        self.await_go_ahead()?;
        // Downtime counts from the pause, as QEMU counts it, also while a
        // pause-before-switchover waits for the go-ahead.
        self.ctl
            .emit(MigrationEvent::Status(MigrationStatus::Device));
        let mut rest = std::mem::take(&mut self.prev_sync);
        rest.merge(&self.ram.get_dirty_log(self.vm.vm_fd())?);
        let rest_pages = rest.count();
        match self.send_rest(&rest, rest_pages) {
            Ok(()) => Ok(Some(Pause {
                start,
                rest_pages,
                throttle_pct,
            })),
            Err(MigrationError::SwitchoverOverrun) => {
                self.back_to_precopy(rest, rest_pages, start, throttle_ppm)?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// With pause-before-switchover, waits for libvirt's go-ahead. libvirt
    /// gives it once: a switch-over after a return to pre-copy goes on
    /// without asking again.
    fn await_go_ahead(&mut self) -> Result<(), MigrationError> {
        if !self.params.pause_before_switchover || self.went_ahead {
            return Ok(());
        }
        self.went_ahead = true;
        self.ctl
            .emit(MigrationEvent::Status(MigrationStatus::PreSwitchover));
        // Nothing flows while this waits: keep-alives tell the destination that
        // this source is alive (it drops a source silent for its idle timeout).
        loop {
            match self.ctl.wait_switchover_for(super::KEEPALIVE_INTERVAL) {
                Some(true) => return Ok(()),
                Some(false) => return Err(MigrationError::Cancelled),
                None => {
                    let main = self
                        .senders
                        .first_mut()
                        .ok_or(MigrationError::NoPageStream)?;
                    main.out.write_keepalive()?;
                    main.out
                        .get_mut()
                        .flush()
                        .map_err(MigrationError::SendKeepalive)?;
                }
            }
        }
    }

    /// Sends the rest, the guest paused: nothing can dirty a page again,
    /// nothing needs clearing. Unless the timeout forced this switch-over, the
    /// send is guarded: if it would keep the guest paused past the downtime
    /// limit, it stops with [`MigrationError::SwitchoverOverrun`].
    fn send_rest(&mut self, rest: &PageMap, rest_pages: u64) -> Result<(), MigrationError> {
        let guarded = !self.forced && self.returns < MAX_SWITCHOVER_RETURNS;
        if guarded {
            let limit = Duration::from_millis(self.ctl.params().downtime_limit_ms).max(MIN_GUARD);
            if let Ok(mut g) = self.sh.guard.lock() {
                *g = Some(DowntimeGuard {
                    start: Instant::now(),
                    bytes_at_start: self.sh.bytes.load(Ordering::Acquire),
                    rest_bytes: rest_pages * PAGE_SIZE as u64,
                    limit,
                });
            }
        }
        self.sh.begin_pass(rest_pages * PAGE_SIZE as u64);
        let plan = PassPlan {
            map: rest,
            prev: None,
            skip_zero: false,
            clear: None,
            sampler: None,
        };
        let sent = send_pass(&mut self.senders, &self.sh, &self.ram, &plan);
        if let Ok(mut g) = self.sh.guard.lock() {
            *g = None;
        }
        sent
    }

    /// After a switch-over that would have overrun: the guest runs again,
    /// throttled as before, and pre-copy goes on with a new history.
    fn back_to_precopy(
        &mut self,
        rest: PageMap,
        rest_pages: u64,
        paused: Instant,
        throttle_ppm: u32,
    ) -> Result<(), MigrationError> {
        self.sh.overrun.store(false, Ordering::Release);
        self.sh.postcopy_waits.store(false, Ordering::Release);
        self.returns += 1;
        self.vm.resume()?;
        self.throttle.set_ppm(throttle_ppm);
        let paused_ms = paused.elapsed().as_millis() as u64;
        let returns = self.returns;
        self.ctl.update_stats(|s| s.switchover_returns = returns);
        self.ctl
            .emit(MigrationEvent::Status(MigrationStatus::Active));
        tracing::info!(
            returns,
            rest_pages,
            paused_ms,
            "switch-over would overrun the downtime limit: back to pre-copy"
        );
        // Everything of the rest goes again (what was sent is harmless
        // to resend), and whatever the guest dirties from now on.
        self.to_send = rest.clone();
        self.prev_sync = rest;
        self.history.clear();
        Ok(())
    }

    /// Ends the extra streams, then sends the device state, the digest and End
    /// on the main stream: once End is sent, the destination may run the VM.
    fn finish(&mut self) -> Result<Finished, MigrationError> {
        // Every extra stream ends before the main stream's End: the destination loads
        // the state only once all of them are complete.
        for s in self.senders.drain(1..) {
            let index = s.index;
            s.out
                .finish()
                .map_err(|source| MigrationError::FinishPageStream { index, source })?;
        }
        let [mut main] = <[PageSender; 1]>::try_from(std::mem::take(&mut self.senders))
            .map_err(|_| MigrationError::NoMainStream)?;
        let before_devices = main.out.bytes_written();
        crate::persist::write_state(self.vm, &mut main.out)?;
        // The disks are flushed (write_state did it): let go of their image locks
        // for the destination, which takes them when it loads this state. A
        // failure from here resumes the guest, which takes them back.
        self.vm.deactivate_disks()?;
        let device_bytes = main.out.bytes_written() - before_devices;
        let mut digest_ms = 0;
        if self.params.verify_digest {
            let t = Instant::now();
            let digest = ram_digest(&self.ram)?;
            main.out.write_cbor(
                SectionId::Digest,
                SectionId::Digest.current_version(),
                &digest,
            )?;
            digest_ms = t.elapsed().as_millis() as u64;
        }
        main.report(&self.sh);
        self.sh.check_abort()?;
        let totals = self.sh.totals();
        let mut w = main.out.finish()?;
        self.point_of_no_return = true;
        w.flush().map_err(MigrationError::SendEnd)?;
        Ok(Finished {
            totals,
            device_bytes,
            digest_ms,
        })
    }

    /// Waits for the destination to confirm it loaded the VM, where it can answer.
    fn confirm(&self) -> Result<(), MigrationError> {
        if !self.has_return_path {
            return Ok(());
        }
        let replies = self
            .sh
            .replies
            .lock()
            .map_err(|_| MigrationError::ReturnPathPoisoned)?;
        match wait_reply(&replies, self.ctl, CONFIRM_TIMEOUT) {
            Ok(Reply::Loaded { .. }) => Ok(()),
            Ok(Reply::Error { message }) => Err(MigrationError::Refused(message)),
            Ok(other) => Err(MigrationError::UnexpectedConfirmation {
                reply: format!("{other:?}"),
            }),
            Err(e) => Err(MigrationError::AwaitConfirmation(e)),
        }
    }

    /// The switch to post-copy: the guest stops here, its vCPU and device
    /// state go ahead of the rest of its RAM, and the destination runs it
    /// while the rest follows, the pages it asks for first. From the state
    /// sent on, the source never runs the guest again by itself.
    fn postcopy(&mut self) -> Result<MigrationStats, MigrationError> {
        self.sh.postcopy_waits.store(true, Ordering::Release);
        let throttle_pct = self.throttle.percent();
        let start = Instant::now();
        self.vm.pause()?;
        self.throttle.set_ppm(0);
        self.await_go_ahead()?;
        self.ctl
            .emit(MigrationEvent::Status(MigrationStatus::Device));
        let mut rest = std::mem::take(&mut self.to_send);
        rest.merge(&self.ram.get_dirty_log(self.vm.vm_fd())?);
        let rest_pages = rest.count();
        let main = self
            .senders
            .first_mut()
            .ok_or(MigrationError::NoPageStream)?;
        // A batch cut short by the switch goes first, as pre-copy pages.
        main.flush(&self.sh)?;
        main.out.write_cbor(
            SectionId::Postcopy,
            SectionId::Postcopy.current_version(),
            &rest.words(),
        )?;
        let before_devices = main.out.bytes_written();
        crate::persist::write_state(self.vm, &mut main.out)?;
        self.vm.deactivate_disks()?;
        let device_bytes = main.out.bytes_written() - before_devices;
        main.out
            .get_mut()
            .flush()
            .map_err(MigrationError::SendEnd)?;
        // The destination may run the guest from here.
        self.point_of_no_return = true;
        self.postcopy_started = true;
        let downtime = start.elapsed().as_millis() as u64;
        let bytes_at_switch = self.sh.bytes.load(Ordering::Acquire);
        self.ctl.update_stats(|s| {
            s.downtime = downtime;
            s.device_state_bytes = device_bytes;
            s.cpu_throttle_percentage = throttle_pct;
        });
        self.ctl
            .emit(MigrationEvent::Status(MigrationStatus::PostcopyActive));
        tracing::info!(rest_pages, downtime_ms = downtime, "switched to post-copy");
        self.sh.postcopy_phase.store(true, Ordering::Release);
        self.send_postcopy_rest(&rest)?;
        let main = self
            .senders
            .first_mut()
            .ok_or(MigrationError::NoPageStream)?;
        main.report(&self.sh);
        let totals = self.sh.totals();
        let postcopy_bytes = totals.0.saturating_sub(bytes_at_switch);
        let senders = std::mem::take(&mut self.senders);
        let [main] =
            <[PageSender; 1]>::try_from(senders).map_err(|_| MigrationError::NoMainStream)?;
        let mut w = main.out.finish()?;
        w.flush().map_err(MigrationError::SendEnd)?;
        self.confirm()?;
        self.ctl.update_stats(|s| s.postcopy_bytes = postcopy_bytes);
        let pause = Pause {
            start,
            rest_pages,
            throttle_pct,
        };
        let stats = self.completed(
            &pause,
            &Finished {
                totals,
                device_bytes,
                digest_ms: 0,
            },
        );
        // The guest's pause on the source ended when the destination ran it.
        self.ctl.update_stats(|s| s.downtime = downtime);
        Ok(MigrationStats {
            downtime,
            postcopy_bytes,
            ..stats
        })
    }

    /// Sends the pages of `rest` in address order, with those the destination
    /// asks for ahead of them (each sent at once, in a batch of its own).
    fn send_postcopy_rest(&mut self, rest: &PageMap) -> Result<(), MigrationError> {
        let requests = self.requests.take();
        let ram = Arc::clone(&self.ram);
        let sh = &self.sh;
        let main = self
            .senders
            .first_mut()
            .ok_or(MigrationError::NoPageStream)?;
        let pages = rest.pages();
        sh.begin_pass(pages.len() as u64 * PAGE_SIZE as u64);
        let mut sent = PageMap::new(&ram, false);
        let mut asked = 0u64;
        for &gpa in &pages {
            // Before every page: a touch waits on the destination meanwhile.
            if let Some(requests) = &requests {
                if requests.pending.load(Ordering::Acquire) > 0 {
                    asked += serve_requests(main, sh, &ram, requests, &mut sent)?;
                    sh.ctl.update_stats(|s| s.postcopy_requests = asked);
                }
            }
            if sent.test_and_set(gpa) == Some(false) {
                main.send(sh, &ram, gpa, false)?;
            }
        }
        main.flush(sh)?;
        tracing::info!(requests = asked, "post-copy: every page sent");
        Ok(())
    }

    /// The completed migration's figures.
    fn completed(&self, pause: &Pause, finished: &Finished) -> MigrationStats {
        let downtime = pause.start.elapsed().as_millis() as u64;
        let (transferred, normal, duplicate) = finished.totals;
        let total_time = self.start.elapsed().as_millis() as u64;
        self.ctl.update_stats(|s| {
            s.downtime = downtime;
            s.total_time = total_time;
            record_pages(s, transferred, normal, duplicate);
            s.ram.remaining = 0;
            s.ram.dirty_sync_count = self.pass + 2;
            s.device_state_bytes = finished.device_bytes;
            s.digest_ms = finished.digest_ms;
            s.cpu_throttle_percentage = pause.throttle_pct;
        });
        tracing::info!(
            passes = self.pass,
            rest_pages = pause.rest_pages,
            streams = self.streams,
            downtime_ms = downtime,
            total_ms = self.start.elapsed().as_millis() as u64,
            "migration completed"
        );
        self.ctl.stats()
    }
}

/// Sends the pages the destination asked for and not sent yet, then flushes;
/// returns how many requests came. A request for a page outside guest RAM
/// is refused: the destination is broken or hostile.
fn serve_requests(
    main: &mut PageSender,
    sh: &PageStreams<'_>,
    ram: &GuestRam,
    requests: &PageRequests,
    sent: &mut PageMap,
) -> Result<u64, MigrationError> {
    let mut n = 0;
    while let Ok(gpa) = requests.rx.try_recv() {
        requests.pending.fetch_sub(1, Ordering::AcqRel);
        n += 1;
        let page = gpa & !(PAGE_SIZE as u64 - 1);
        match sent.test_and_set(page) {
            None => return Err(MigrationError::BadPageRequest { gpa }),
            Some(true) => {}
            Some(false) => main.send(sh, ram, page, false)?,
        }
    }
    if n > 0 {
        main.flush(sh)?;
    }
    Ok(n)
}

/// Microseconds each vCPU naps per cycle under a throttle of `nap_ppm`, where
/// the dirty limit took it past `max-cpu-throttle`; 0 below it.
fn beyond_cap(nap_ppm: u32, params: &MigrationParams) -> u64 {
    if nap_ppm <= max_nap_ppm(params.max_throttle_pct, false) {
        return 0;
    }
    cycle(nap_ppm).1.as_micros() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The operator reads the source's errors as their chain: the texts are
    /// those the source gave before its errors were typed.
    #[test]
    fn source_errors_read_as_before_through_their_chain() {
        let chain = |e: MigrationError| crate::error_chain(&e);
        assert_eq!(
            chain(MigrationError::AwaitHandshakeAnswer(
                ReturnPathError::Closed
            )),
            "the migration stream broke: the destination did not answer the handshake: the \
             destination closed the connection"
        );
        assert_eq!(
            chain(MigrationError::AwaitConfirmation(
                ReturnPathError::NoAnswer { waited_s: 60 }
            )),
            "the migration stream broke: no answer within 60 s"
        );
        assert_eq!(
            chain(MigrationError::ReturnPath(
                ReturnPathError::UnexpectedSection(SectionId::Shape)
            )),
            format!(
                "the migration stream broke: the return path broke: unexpected section {} on \
                 the return path",
                SectionId::Shape
            )
        );
        let pipe = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        let io = pipe().to_string();
        assert_eq!(
            chain(MigrationError::SendEnd(pipe())),
            format!("the migration stream broke: cannot send the last bytes: {io}")
        );
        assert_eq!(
            chain(MigrationError::SendJoin {
                index: 2,
                source: pipe()
            }),
            format!("page stream 2 failed: cannot send its Join section: {io}")
        );
        assert_eq!(
            chain(MigrationError::UnexpectedConfirmation {
                reply: format!("{:?}", Reply::Ready)
            }),
            "the migration stream broke: the destination answered Ready instead of confirming"
        );
        // A stream that broke leads to the destination's reason, if it gave one.
        assert!(broke(&MigrationError::SendEnd(pipe())));
        assert!(!broke(&MigrationError::Cancelled));
    }
}
