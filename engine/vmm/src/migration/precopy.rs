//! The source side: handshake, pre-copy passes over the dirty log, switch-over.

use std::io::{BufWriter, Write};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_format::{RamBatchBuilder, SectionId, StreamReader, StreamWriter};
use ferry_kvm::{GuestRam, PAGE_SIZE};

use super::converge::{Convergence, Decision, PassReport, DEVICE_STATE_PER_VCPU};
use super::{
    Channel, Handshake, MigrationControl, MigrationError, MigrationEvent, MigrationStats,
    MigrationStatus, Reply, TimeoutPolicy, REPLY_VERSION,
};
use crate::checkpoint::{producer, SHAPE_VERSION};
use crate::vm::Vm;

/// How long the source waits for the destination to accept the shape, and to confirm
/// it loaded the VM.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);
/// Passes made after the rest already fits the downtime limit, to shrink it further.
const MAX_EXTRA_PASSES: u32 = 5;
/// A rest this small is not worth another pass.
const SMALL_REST: u64 = 1 << 20;
/// Shortest pre-copy pass.
const MIN_PASS: Duration = Duration::from_millis(5);
/// Pages per RAM section on the wire.
const BATCH_PAGES: u32 = 2048;

/// How a migration ended on the source.
#[derive(Debug, Clone, PartialEq)]
pub enum MigrationOutcome {
    /// The destination has the VM; the source VM is paused and should be freed.
    Completed(MigrationStats),
}

/// Per-slot bitmaps of guest pages, bit i of word w = page w*64+i of the slot.
#[derive(Debug, Clone)]
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

    pub fn count(&self) -> u64 {
        self.slots
            .iter()
            .flat_map(|s| s.2.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Pages set in `self`, in address order; with `mask`, only those whose bit in
    /// `mask` equals `masked`.
    pub fn for_each(
        &self,
        mask: Option<(&PageMap, bool)>,
        mut f: impl FnMut(u64) -> Result<(), MigrationError>,
    ) -> Result<(), MigrationError> {
        for (si, (base, _, bits)) in self.slots.iter().enumerate() {
            for (wi, &word) in bits.iter().enumerate() {
                let mut w = word;
                if let Some((m, masked)) = mask {
                    let mw = m.slots[si].2[wi];
                    w &= if masked { mw } else { !mw };
                }
                while w != 0 {
                    let bit = w.trailing_zeros() as u64;
                    w &= w - 1;
                    f(base + ((wi as u64) * 64 + bit) * PAGE_SIZE as u64)?;
                }
            }
        }
        Ok(())
    }
}

/// Writes pages into RAM sections, with rate limiting and cancel checks.
struct PageSender<'a, W: Write> {
    out: StreamWriter<W>,
    batch: RamBatchBuilder,
    page: Box<[u8; PAGE_SIZE]>,
    ctl: &'a MigrationControl,
    replies: &'a Receiver<Result<Reply, String>>,
    normal: u64,
    duplicate: u64,
    window_start: Instant,
    window_bytes: u64,
    cap: u64,
}

impl<W: Write> PageSender<'_, W> {
    fn send(&mut self, ram: &GuestRam, gpa: u64, skip_zero: bool) -> Result<(), MigrationError> {
        // Test for zero in place: most pages of a fresh guest are zero, and copying
        // them first would double the memory traffic of the first pass.
        if ram.is_zero_page(gpa)? {
            self.duplicate += 1;
            if skip_zero {
                return Ok(());
            }
            self.batch.push_zero(gpa)?;
        } else {
            ram.read(gpa, &mut self.page[..])?;
            self.normal += 1;
            self.batch.push_data(gpa, &self.page)?;
        }
        if self.batch.is_full() {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), MigrationError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let len = self.batch.payload_len();
        self.out.write_ram_batch(&self.batch)?;
        self.batch.clear();
        self.window_bytes += len;
        // Progress within a pass, for query-migrate while a long pass runs.
        let (transferred, normal, duplicate) =
            (self.out.bytes_written(), self.normal, self.duplicate);
        self.ctl.update_stats(|s| {
            record_pages(s, transferred, normal, duplicate);
            if s.passes == 0 {
                // During the first pass everything not yet looked at remains.
                let seen = (normal + duplicate) * PAGE_SIZE as u64;
                s.ram.remaining = s.ram.total.saturating_sub(seen);
            }
        });
        check_abort(self.ctl, self.replies)?;
        if self.cap > 0 {
            let allowed = self.window_start.elapsed().as_secs_f64() * self.cap as f64;
            if self.window_bytes as f64 > allowed {
                let wait = (self.window_bytes as f64 - allowed) / self.cap as f64;
                // Sleep in slices so a cancel is honoured at once, also on a slow link.
                let until = Instant::now() + Duration::from_secs_f64(wait);
                while let Some(left) = until.checked_duration_since(Instant::now()) {
                    check_abort(self.ctl, self.replies)?;
                    std::thread::sleep(left.min(Duration::from_millis(10)));
                }
            }
            if self.window_start.elapsed() > Duration::from_secs(1) {
                self.window_start = Instant::now();
                self.window_bytes = 0;
            }
        }
        Ok(())
    }
}

/// The page counters of query-migrate's `ram` object.
fn record_pages(s: &mut MigrationStats, transferred: u64, normal: u64, duplicate: u64) {
    s.ram.transferred = transferred;
    s.ram.normal = normal;
    s.ram.normal_bytes = normal * PAGE_SIZE as u64;
    s.ram.duplicate = duplicate;
}

fn check_abort(
    ctl: &MigrationControl,
    replies: &Receiver<Result<Reply, String>>,
) -> Result<(), MigrationError> {
    if ctl.is_cancelled() {
        return Err(MigrationError::Cancelled);
    }
    match replies.try_recv() {
        Ok(Ok(Reply::Error { message })) => Err(MigrationError::Refused(message)),
        Ok(Err(e)) => Err(MigrationError::Stream(format!(
            "the return path broke: {e}"
        ))),
        _ => Ok(()),
    }
}

/// Reads replies from the destination in a thread, so the sender can poll them.
fn spawn_return_path(channel: &mut Channel) -> Receiver<Result<Reply, String>> {
    let (tx, rx) = mpsc::channel();
    if !channel.has_return_path {
        return rx;
    }
    let reader = std::mem::replace(&mut channel.reader, Box::new(std::io::empty()));
    let _ = std::thread::Builder::new()
        .name("migration-return".into())
        .spawn(move || {
            let limits = ferry_format::Limits::default();
            let mut reader = match StreamReader::new(reader, limits) {
                Ok((r, _)) => r,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let mut buf = Vec::new();
            loop {
                let msg = match reader.next_section(&mut buf) {
                    Ok(h) if h.id == SectionId::Reply => {
                        ferry_format::decode_cbor::<Reply>(h.id, &buf, &limits)
                            .map_err(|e| e.to_string())
                    }
                    Ok(h) => Err(format!("unexpected section {} on the return path", h.id)),
                    Err(e) => Err(e.to_string()),
                };
                let stop = msg.is_err();
                if tx.send(msg).is_err() || stop {
                    return;
                }
            }
        });
    rx
}

fn wait_reply(
    replies: &Receiver<Result<Reply, String>>,
    ctl: &MigrationControl,
    timeout: Duration,
) -> Result<Reply, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if ctl.is_cancelled() {
            return Err("cancelled".into());
        }
        match replies.recv_timeout(Duration::from_millis(50)) {
            Ok(r) => return r,
            Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!("no answer within {} s", timeout.as_secs()))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err("the destination closed the connection".into())
            }
        }
    }
}

/// A digest of guest RAM: CRC-32 of every 1 MiB chunk, in address order.
pub(crate) fn ram_digest(ram: &GuestRam) -> Result<Vec<u32>, MigrationError> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut out = Vec::new();
    for (base, size) in ram.ranges() {
        let mut gpa = base;
        while gpa < base + size {
            let n = CHUNK.min(base + size - gpa) as usize;
            ram.read(gpa, &mut buf[..n])?;
            out.push(crc32fast::hash(&buf[..n]));
            gpa += n as u64;
        }
    }
    Ok(out)
}

/// Migrates `vm` over `channel`. On success the VM is left paused (the destination has
/// it); on failure before the switch-over completed the VM runs on as before.
pub fn migrate(
    vm: &mut Vm,
    mut channel: Channel,
    ctl: &Arc<MigrationControl>,
) -> Result<MigrationOutcome, MigrationError> {
    let was_running = vm.is_running();
    let start = Instant::now();
    ctl.reset();
    ctl.emit(MigrationEvent::Status(MigrationStatus::Setup));
    let breaker = channel.breaker().ok();
    let replies = spawn_return_path(&mut channel);
    let mut point_of_no_return = false;
    let result = run(vm, channel, ctl, &replies, start, &mut point_of_no_return);
    // Dirty logging off again, whatever happened.
    if let Err(e) = vm.ram().register(vm.vm_fd(), false) {
        tracing::warn!("cannot turn dirty logging off: {e}");
    }
    ctl.update_stats(|s| s.total_time = start.elapsed().as_millis() as u64);
    match result {
        Ok(mut stats) => {
            ctl.emit(MigrationEvent::Status(MigrationStatus::Completed));
            stats.status = MigrationStatus::Completed;
            stats.total_time = start.elapsed().as_millis() as u64;
            Ok(MigrationOutcome::Completed(stats))
        }
        Err(e) => {
            if let Some(b) = breaker {
                b.break_channel();
            }
            let unconfirmed = point_of_no_return && !matches!(e, MigrationError::Refused(_));
            let e = if unconfirmed {
                MigrationError::Unconfirmed(e.to_string())
            } else {
                e
            };
            if was_running && !unconfirmed {
                if let Err(r) = vm.resume() {
                    tracing::error!("cannot resume the source VM after a failed migration: {r}");
                }
            }
            let status = if matches!(e, MigrationError::Cancelled) {
                MigrationStatus::Cancelled
            } else {
                MigrationStatus::Failed
            };
            ctl.update_stats(|s| s.error_desc = Some(e.to_string()));
            ctl.emit(MigrationEvent::Status(status));
            tracing::warn!("migration failed: {e}");
            Err(e)
        }
    }
}

fn run(
    vm: &mut Vm,
    channel: Channel,
    ctl: &Arc<MigrationControl>,
    replies: &Receiver<Result<Reply, String>>,
    start: Instant,
    point_of_no_return: &mut bool,
) -> Result<MigrationStats, MigrationError> {
    let params = ctl.params();
    let has_return_path = channel.has_return_path;
    let total_bytes = vm.ram().total_bytes();
    ctl.update_stats(|s| {
        s.ram.total = total_bytes;
        s.ram.page_size = PAGE_SIZE as u64;
    });
    let mut out = StreamWriter::new(
        BufWriter::with_capacity(1 << 20, channel.writer),
        &producer(),
    )?;
    out.write_cbor(
        SectionId::Shape,
        SHAPE_VERSION,
        &Handshake {
            shape: vm.shape(),
            digest: params.verify_digest,
        },
    )?;
    out.get_mut()
        .flush()
        .map_err(|e| MigrationError::Stream(format!("cannot send the handshake: {e}")))?;
    if has_return_path {
        match wait_reply(replies, ctl, HANDSHAKE_TIMEOUT) {
            Ok(Reply::Ready) => {}
            Ok(Reply::Error { message }) => return Err(MigrationError::Refused(message)),
            Ok(other) => {
                return Err(MigrationError::Stream(format!(
                    "the destination answered {other:?} to the handshake"
                )))
            }
            Err(_) if ctl.is_cancelled() => return Err(MigrationError::Cancelled),
            Err(e) => return Err(MigrationError::Refused(e)),
        }
    }

    let ram = vm.ram().clone();
    ram.register(vm.vm_fd(), true)?;
    let setup_time = start.elapsed().as_millis() as u64;
    ctl.update_stats(|s| s.setup_time = setup_time);
    ctl.emit(MigrationEvent::Status(MigrationStatus::Active));

    let mut sender = PageSender {
        out,
        batch: RamBatchBuilder::with_max_pages(BATCH_PAGES),
        page: Box::new([0u8; PAGE_SIZE]),
        ctl,
        replies,
        normal: 0,
        duplicate: 0,
        window_start: Instant::now(),
        window_bytes: 0,
        cap: params.max_bandwidth,
    };
    let throttle = vm.throttle();
    let mut conv = Convergence::default();
    let device_estimate = u64::from(vm.config().vcpus) * DEVICE_STATE_PER_VCPU + 4096;
    let mut to_send = PageMap::new(&ram, true);
    let mut prev_sync = PageMap::new(&ram, false);
    let mut pass = 0u64;
    let mut extra_passes = 0;
    let mut last_dirty_bytes: Option<u64> = None;
    loop {
        pass += 1;
        let params = ctl.params();
        if sender.cap != params.max_bandwidth {
            // A new cap applies from now on, not to what was sent under the old one.
            sender.cap = params.max_bandwidth;
            sender.window_start = Instant::now();
            sender.window_bytes = 0;
        }
        let pass_start = Instant::now();
        let bytes_before = sender.out.bytes_written();
        let first = pass == 1;
        // Cold pages first: those not dirtied in the previous sync too.
        to_send.for_each(Some((&prev_sync, false)), |gpa| {
            sender.send(&ram, gpa, first)
        })?;
        to_send.for_each(Some((&prev_sync, true)), |gpa| {
            sender.send(&ram, gpa, first)
        })?;
        sender.flush()?;
        // A pass with almost nothing to send still lets the guest run a little, so a
        // limit that cannot be met does not spin on empty passes.
        if let Some(rest) = MIN_PASS.checked_sub(pass_start.elapsed()) {
            std::thread::sleep(rest);
        }
        let elapsed = pass_start.elapsed();
        let sent = sender.out.bytes_written() - bytes_before;

        // Sync: what the guest dirtied while we sent.
        let mut dirty = PageMap::new(&ram, false);
        dirty.merge(&ram.get_dirty_log(vm.vm_fd())?);
        let dirty_pages = dirty.count();
        let report = PassReport {
            bytes_sent: sent,
            elapsed,
            dirty_bytes: dirty_pages * PAGE_SIZE as u64,
            device_bytes: device_estimate,
        };
        let expected = conv.observe(&report, params.max_bandwidth);
        let dirty_rate = report.dirty_bytes as f64 / elapsed.as_secs_f64().max(1e-3);
        let transferred = sender.out.bytes_written();
        ctl.update_stats(|s| {
            s.passes = pass;
            s.ram.dirty_sync_count = pass;
            record_pages(s, transferred, sender.normal, sender.duplicate);
            s.ram.remaining = report.dirty_bytes;
            s.ram.dirty_pages_rate = (dirty_rate / PAGE_SIZE as f64) as u64;
            s.ram.mbps = sent as f64 * 8.0 / 1e6 / elapsed.as_secs_f64().max(1e-6);
            s.ram.pages_per_second = (conv.bandwidth / PAGE_SIZE as f64) as u64;
            s.expected_downtime = expected.as_millis() as u64;
            s.total_time = start.elapsed().as_millis() as u64;
            s.cpu_throttle_percentage = throttle.percent();
        });
        ctl.emit(MigrationEvent::Pass(pass));
        tracing::debug!(
            pass,
            sent,
            ?elapsed,
            dirty_pages,
            ?expected,
            throttle = throttle.percent(),
            "pre-copy pass"
        );

        let limit = Duration::from_millis(params.downtime_limit_ms);
        if conv.decide(expected, limit) == Decision::SwitchOver {
            // The rest fits the limit. While each pass still shrinks it by a quarter,
            // one more pass (with the guest running) buys a shorter pause.
            let shrinking = last_dirty_bytes.is_none_or(|last| report.dirty_bytes * 4 < last * 3);
            if extra_passes >= MAX_EXTRA_PASSES || report.dirty_bytes <= SMALL_REST || !shrinking {
                prev_sync = dirty;
                break;
            }
            extra_passes += 1;
        }
        last_dirty_bytes = Some(report.dirty_bytes);
        if params.max_total_time_ms > 0
            && start.elapsed() > Duration::from_millis(params.max_total_time_ms)
        {
            match params.on_timeout {
                TimeoutPolicy::Cancel => {
                    return Err(MigrationError::TimedOut(params.max_total_time_ms))
                }
                TimeoutPolicy::ForceSwitchover => {
                    prev_sync = dirty;
                    break;
                }
            }
        }
        if params.auto_converge {
            let pct = conv.throttle_for(dirty_rate, throttle.percent(), params.max_throttle_pct);
            throttle.set(pct);
        }
        to_send = dirty.clone();
        prev_sync = dirty;
    }

    // Switch-over: stop the guest; from here the downtime counts.
    let throttle_pct = throttle.percent();
    drop(throttle);
    vm.pause()?;
    let down_start = Instant::now();
    if params.pause_before_switchover {
        ctl.emit(MigrationEvent::Status(MigrationStatus::PreSwitchover));
        if !ctl.wait_switchover() {
            return Err(MigrationError::Cancelled);
        }
    }
    // Downtime counts from the pause, as QEMU counts it, also while a
    // pause-before-switchover waits for the go-ahead.
    ctl.emit(MigrationEvent::Status(MigrationStatus::Device));
    let mut rest = prev_sync;
    rest.merge(&ram.get_dirty_log(vm.vm_fd())?);
    let rest_pages = rest.count();
    rest.for_each(None, |gpa| sender.send(&ram, gpa, false))?;
    sender.flush()?;
    let before_devices = sender.out.bytes_written();
    crate::checkpoint::write_state(vm, &mut sender.out)?;
    let device_bytes = sender.out.bytes_written() - before_devices;
    let mut digest_ms = 0;
    if params.verify_digest {
        let t = Instant::now();
        let digest = ram_digest(&ram)?;
        sender
            .out
            .write_cbor(SectionId::Digest, REPLY_VERSION, &digest)?;
        digest_ms = t.elapsed().as_millis() as u64;
    }
    check_abort(ctl, replies)?;
    let transferred = sender.out.bytes_written();
    let mut w = sender.out.finish()?;
    *point_of_no_return = true;
    w.flush()
        .map_err(|e| MigrationError::Stream(format!("cannot send the last bytes: {e}")))?;
    if has_return_path {
        match wait_reply(replies, ctl, CONFIRM_TIMEOUT) {
            Ok(Reply::Loaded { .. }) => {}
            Ok(Reply::Error { message }) => return Err(MigrationError::Refused(message)),
            Ok(other) => {
                return Err(MigrationError::Stream(format!(
                    "the destination answered {other:?} instead of confirming"
                )))
            }
            Err(e) => return Err(MigrationError::Stream(e)),
        }
    }
    let downtime = down_start.elapsed().as_millis() as u64;
    let (normal, duplicate) = (sender.normal, sender.duplicate);
    ctl.update_stats(|s| {
        s.downtime = downtime;
        s.total_time = start.elapsed().as_millis() as u64;
        record_pages(s, transferred, normal, duplicate);
        s.ram.remaining = 0;
        s.ram.dirty_sync_count = pass + 1;
        s.device_state_bytes = device_bytes;
        s.digest_ms = digest_ms;
        s.cpu_throttle_percentage = throttle_pct;
    });
    tracing::info!(
        passes = pass,
        rest_pages,
        downtime_ms = downtime,
        total_ms = start.elapsed().as_millis() as u64,
        "migration completed"
    );
    Ok(ctl.stats())
}
