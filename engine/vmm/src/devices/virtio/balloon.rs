//! virtio-balloon, the memory balloon (virtio 1.2 section 5.5): the host
//! sets a target (`num_pages`, in 4 KiB pages) of guest memory to give back,
//! and the driver inflates its balloon towards it, handing over page frame
//! numbers the guest no longer uses, or deflates it, taking pages back. The
//! driver writes how many pages the balloon holds into `actual`.
//!
//! Queues (QEMU's numbering, fixed by the features ferry offers):
//!
//! * 0, inflateq: device-readable arrays of 32-bit PFNs (4 KiB page numbers).
//!   Each page goes back to the host ([`GuestRam::discard`]): its memory is
//!   freed and it reads as zeroes afterwards, so a migration's first pass,
//!   which skips zero pages, does not send it.
//! * 1, deflateq: PFN arrays of pages the guest takes back. They were never
//!   taken away from the guest's mappings: a touch faults them back in
//!   (VIRTIO_BALLOON_F_MUST_TELL_HOST is not offered), so deflating is an
//!   acknowledgement.
//! * 2, statsq (VIRTIO_BALLOON_F_STATS_VQ): the driver puts one buffer of
//!   (le16 tag, le64 value) pairs there; the device keeps it, and gives it
//!   back every polling interval (set by the host, 0 = never) so the driver
//!   refills it with fresh values (QEMU's `guest-stats-polling-interval`).
//! * 3, reportingq (VIRTIO_BALLOON_F_REPORTING, `free-page-reporting=on`):
//!   device-writable buffers naming free guest pages, which go back to the
//!   host like inflated ones; the guest reuses them later without telling.
//!
//! PFNs outside guest RAM are skipped and counted, as QEMU skips them; a
//! buffer of the wrong direction or of a length that is not a whole number of
//! entries is the driver's fault: the device needs a reset, the VMM carries
//! on. Work runs on the vCPU thread that notified the queue, or (stats
//! returned to the driver) on the device thread, under the device's lock.

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_kvm::memory::GuestMemory;
use ferry_kvm::{GuestRam, MemoryError};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::{DeviceStateError, QueueError, VirtioDevice, F_VERSION_1};

/// A request of the host's that the balloon refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BalloonError {
    #[error("a balloon of {pages} pages is larger than guest RAM ({ram_pages} pages)")]
    TargetTooLarge { pages: u64, ram_pages: u64 },
}

pub const INFLATE_QUEUE: usize = 0;
pub const DEFLATE_QUEUE: usize = 1;
pub const STATS_QUEUE: usize = 2;
/// Present with free page reporting on only.
pub const REPORTING_QUEUE: usize = 3;
const QUEUE_SIZE: u16 = 256;

/// Feature bits (virtio 1.2 section 5.5.3).
pub const F_STATS_VQ: u64 = 1 << 1;
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
pub const F_REPORTING: u64 = 1 << 5;

/// The balloon's page: PFNs count 4 KiB pages whatever the guest's page size.
pub const BALLOON_PAGE: u64 = 4096;
/// Most bytes of one PFN buffer (Linux sends at most 256 PFNs, 1 KiB).
pub const MAX_PFN_BUFFER: usize = 64 << 10;
/// One stats entry: le16 tag, le64 value.
const STAT_ENTRY: usize = 10;
/// Most bytes of a stats buffer (Linux sends 10 to 16 entries).
pub const MAX_STATS_BUFFER: usize = 256 * STAT_ENTRY;
/// Most bytes of one reported free range (Linux reports up to 4 MiB).
const MAX_REPORT: u64 = 1 << 30;

/// The statistics the device keeps, by tag (virtio 1.2 section 5.5.6.3), with
/// QEMU's names for them (`guest-stats`). Later tags are ignored, as QEMU
/// ignores them.
pub const STAT_NAMES: [&str; 10] = [
    "stat-swap-in",
    "stat-swap-out",
    "stat-major-faults",
    "stat-minor-faults",
    "stat-free-memory",
    "stat-total-memory",
    "stat-available-memory",
    "stat-disk-caches",
    "stat-htlb-pgalloc",
    "stat-htlb-pgfail",
];
pub const STAT_COUNT: usize = STAT_NAMES.len();

/// How to build a virtio-balloon device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM (QEMU's `deflate-on-oom`): the
    /// guest deflates rather than run out of memory.
    pub deflate_on_oom: bool,
    /// Offer VIRTIO_BALLOON_F_REPORTING (QEMU's `free-page-reporting`) and its
    /// queue.
    pub free_page_reporting: bool,
}

/// The balloon as it travels in checkpoints and migrations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// The host's target, in balloon pages.
    pub num_pages: u32,
    /// What the driver last wrote: pages in the balloon.
    pub actual: u32,
    /// The stats buffer the device holds (its chain's head), to give back at
    /// the next poll.
    pub stats_head: Option<u16>,
    /// The guest's latest statistics, by tag; `None`: never sent.
    pub stats: Vec<Option<u64>>,
    /// When they arrived (seconds since the epoch; 0: never).
    pub stats_last_update: i64,
    /// The counters (see [`BalloonStats`]).
    pub counters: BalloonStats,
}

/// Counters of one balloon device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    /// Pages the balloon holds now, as the device counted them: inflated
    /// ones less deflated ones.
    pub held_pages: u64,
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    /// Pages free page reporting gave back.
    pub reported_pages: u64,
    /// PFNs outside guest RAM the driver gave, skipped.
    pub refused_pfns: u64,
    /// Pages the host could not free (huge-page RAM, see
    /// [`GuestRam::discard`]): they stay the guest's.
    pub discard_failures: u64,
}

/// What the host sees of a balloon (`query-balloon`, `guest-stats`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BalloonInfo {
    pub num_pages: u32,
    pub actual: u32,
    pub stats: [Option<u64>; STAT_COUNT],
    pub stats_last_update: i64,
    /// Seconds between stats requests; 0: off.
    pub poll_interval: u32,
    pub counters: BalloonStats,
}

/// A virtio-balloon device.
#[derive(Debug)]
pub struct Balloon {
    config: BalloonConfig,
    ram: Arc<GuestRam>,
    num_pages: u32,
    actual: u32,
    /// The driver changed `actual` since [`Balloon::take_actual_change`].
    actual_changed: bool,
    stats_head: Option<u16>,
    stats: [Option<u64>; STAT_COUNT],
    stats_last_update: i64,
    poll_interval: u32,
    /// When the held stats buffer goes back to the driver.
    next_poll: Option<Instant>,
    counters: BalloonStats,
    buf: Vec<u8>,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Balloon {
    pub fn new(config: BalloonConfig, ram: Arc<GuestRam>) -> Self {
        Self {
            config,
            ram,
            num_pages: 0,
            actual: 0,
            actual_changed: false,
            stats_head: None,
            stats: [None; STAT_COUNT],
            stats_last_update: 0,
            poll_interval: 0,
            next_poll: None,
            counters: BalloonStats::default(),
            buf: Vec::new(),
        }
    }

    /// Guest RAM in balloon pages.
    fn ram_pages(&self) -> u64 {
        self.ram.total_bytes() / BALLOON_PAGE
    }

    pub fn info(&self) -> BalloonInfo {
        BalloonInfo {
            num_pages: self.num_pages,
            actual: self.actual,
            stats: self.stats,
            stats_last_update: self.stats_last_update,
            poll_interval: self.poll_interval,
            counters: self.counters,
        }
    }

    /// Sets the host's target: the balloon should hold `pages` pages. Refused
    /// above guest RAM. Returns whether it changed (the caller then raises a
    /// configuration change interrupt).
    pub fn set_target(&mut self, pages: u64) -> Result<bool, BalloonError> {
        let too_large = || BalloonError::TargetTooLarge {
            pages,
            ram_pages: self.ram_pages(),
        };
        if pages > self.ram_pages() {
            return Err(too_large());
        }
        // num_pages is 32 bits: 16 TiB of 4 KiB pages.
        let pages = u32::try_from(pages).map_err(|_| too_large())?;
        let changed = pages != self.num_pages;
        self.num_pages = pages;
        Ok(changed)
    }

    /// Sets the stats polling interval in seconds (0: off); the next poll is
    /// that far from now.
    pub fn set_poll_interval(&mut self, secs: u32) {
        self.poll_interval = secs;
        self.next_poll = None;
    }

    /// `Some(actual)` if the driver changed `actual` since the last call.
    pub fn take_actual_change(&mut self) -> Option<u32> {
        std::mem::take(&mut self.actual_changed).then_some(self.actual)
    }

    /// The next chain on `queue` (PFNs or stats, entries of `entry` bytes, at
    /// most `max`): checks its buffers and reads them into `self.buf`; returns
    /// the head, or `None` if the queue is empty.
    fn read_chain(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemory,
        what: &'static str,
        entry: usize,
        max: usize,
    ) -> Result<Option<u16>, QueueError> {
        let Some(chain) = queue.iter(mem).map_err(QueueError::AvailRing)?.next() else {
            return Ok(None);
        };
        let head = chain.head_index();
        if chain.clone().any(|d| d.is_write_only()) {
            return Err(QueueError::InputWritable { what, head });
        }
        let mut reader = chain
            .reader(mem)
            .map_err(|e| QueueError::buffer(what, head, e))?;
        let len = reader.available_bytes();
        if len % entry != 0 || len > max {
            return Err(QueueError::InputLength {
                what,
                head,
                len,
                entry,
                max,
            });
        }
        self.buf.resize(len, 0);
        reader
            .read_exact(&mut self.buf)
            .map_err(|e| QueueError::buffer(what, head, e))?;
        Ok(Some(head))
    }

    /// Gives back (`inflate`) or takes back the pages the driver queued.
    fn pfns(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemory,
        inflate: bool,
    ) -> Result<bool, QueueError> {
        let what = if inflate {
            "inflate buffer"
        } else {
            "deflate buffer"
        };
        let mut used = false;
        while let Some(head) = self.read_chain(queue, mem, what, 4, MAX_PFN_BUFFER)? {
            let buf = std::mem::take(&mut self.buf);
            // Runs of consecutive pages are discarded in one call.
            let mut run: Option<(u64, u64)> = None;
            for pfn in buf.chunks_exact(4) {
                let pfn = u64::from(u32::from_le_bytes([pfn[0], pfn[1], pfn[2], pfn[3]]));
                let gpa = pfn * BALLOON_PAGE;
                if !self.ram.contains(gpa, BALLOON_PAGE as usize) {
                    if self.counters.refused_pfns == 0 {
                        tracing::warn!(
                            "virtio-balloon: the driver gave PFN {pfn:#x}, outside guest RAM \
                             (skipped; further ones are counted only)"
                        );
                    }
                    self.counters.refused_pfns += 1;
                    continue;
                }
                if inflate {
                    self.counters.inflated_pages += 1;
                    self.counters.held_pages += 1;
                    run = match run {
                        Some((start, n)) if start + n * BALLOON_PAGE == gpa => Some((start, n + 1)),
                        Some((start, n)) => {
                            self.discard(start, n);
                            Some((gpa, 1))
                        }
                        None => Some((gpa, 1)),
                    };
                } else {
                    self.counters.deflated_pages += 1;
                    self.counters.held_pages = self.counters.held_pages.saturating_sub(1);
                }
            }
            if let Some((start, n)) = run {
                self.discard(start, n);
            }
            self.buf = buf;
            queue.add_used(mem, head, 0).map_err(QueueError::UsedRing)?;
            used = true;
        }
        Ok(used)
    }

    /// Gives `pages` pages from `gpa` (inside one RAM range: each was checked)
    /// back to the host; a failure leaves them to the guest and is counted.
    fn discard(&mut self, gpa: u64, pages: u64) {
        // A run may span two RAM ranges only if they touch; split then.
        let result = match self.ram.discard(gpa, (pages * BALLOON_PAGE) as usize) {
            Err(MemoryError::OutOfRange { .. }) => (0..pages).try_for_each(|i| {
                self.ram
                    .discard(gpa + i * BALLOON_PAGE, BALLOON_PAGE as usize)
            }),
            other => other,
        };
        if let Err(e) = result {
            if self.counters.discard_failures == 0 {
                tracing::warn!("virtio-balloon: pages stay with the guest: {e}");
            }
            self.counters.discard_failures += pages;
        }
    }

    /// Takes the driver's stats buffer (QEMU's `virtio_balloon_receive_stats`):
    /// a buffer already held goes back first.
    fn receive_stats(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, QueueError> {
        let mut used = self.poll_due(queue, mem, Instant::now())?;
        while let Some(head) =
            self.read_chain(queue, mem, "stats buffer", STAT_ENTRY, MAX_STATS_BUFFER)?
        {
            if let Some(old) = self.stats_head.take() {
                // Only a driver outside the specification posts a second one.
                queue.add_used(mem, old, 0).map_err(QueueError::UsedRing)?;
                used = true;
            }
            self.stats_head = Some(head);
            // Stale values of a guest that now sends fewer go, as in QEMU.
            self.stats = [None; STAT_COUNT];
            for e in self.buf.chunks_exact(STAT_ENTRY) {
                let tag = usize::from(u16::from_le_bytes([e[0], e[1]]));
                let mut value = [0u8; 8];
                value.copy_from_slice(&e[2..10]);
                if let Some(slot) = self.stats.get_mut(tag) {
                    *slot = Some(u64::from_le_bytes(value));
                }
            }
            self.stats_last_update = unix_now();
            self.next_poll = None;
        }
        Ok(used)
    }

    /// Gives the held stats buffer back if the polling interval is up.
    fn poll_due(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemory,
        now: Instant,
    ) -> Result<bool, QueueError> {
        if self.next_poll.is_none_or(|t| now < t) {
            return Ok(false);
        }
        self.next_poll = None;
        let Some(head) = self.stats_head.take() else {
            return Ok(false);
        };
        queue.add_used(mem, head, 0).map_err(QueueError::UsedRing)?;
        Ok(true)
    }

    /// Gives back the free pages the driver reports (device-writable buffers
    /// naming them; the device writes nothing into them).
    fn report(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, QueueError> {
        let mut used = false;
        loop {
            let Some(chain) = queue.iter(mem).map_err(QueueError::AvailRing)?.next() else {
                return Ok(used);
            };
            let head = chain.head_index();
            let mut ranges = Vec::new();
            for d in chain {
                let (gpa, len) = (d.addr().0, u64::from(d.len()));
                if !d.is_write_only() {
                    return Err(QueueError::ReportReadable { head });
                }
                if gpa % BALLOON_PAGE != 0
                    || len % BALLOON_PAGE != 0
                    || len == 0
                    || len > MAX_REPORT
                {
                    return Err(QueueError::ReportNotPages { head, gpa, len });
                }
                if !self.ram.contains(gpa, len as usize) {
                    return Err(QueueError::ReportOutsideRam { head, gpa, len });
                }
                ranges.push((gpa, len / BALLOON_PAGE));
            }
            for (gpa, pages) in ranges {
                self.counters.reported_pages += pages;
                self.discard(gpa, pages);
            }
            queue.add_used(mem, head, 0).map_err(QueueError::UsedRing)?;
            used = true;
        }
    }

    /// The balloon's state, for a checkpoint.
    pub fn save(&self) -> BalloonState {
        BalloonState {
            num_pages: self.num_pages,
            actual: self.actual,
            stats_head: self.stats_head,
            stats: self.stats.to_vec(),
            stats_last_update: self.stats_last_update,
            counters: self.counters,
        }
    }

    /// Takes the balloon's state from a stream, checked as hostile: nothing
    /// changes when it is refused.
    pub fn load(&mut self, s: &BalloonState) -> Result<(), DeviceStateError> {
        if u64::from(s.num_pages) > self.ram_pages() {
            return Err(DeviceStateError::BalloonTarget {
                pages: s.num_pages,
                ram_pages: self.ram_pages(),
            });
        }
        if s.stats_head.is_some_and(|h| h >= QUEUE_SIZE) {
            return Err(DeviceStateError::BalloonStatsHead {
                head: s.stats_head.unwrap_or(0),
                max: QUEUE_SIZE,
            });
        }
        let stats: [Option<u64>; STAT_COUNT] =
            s.stats
                .as_slice()
                .try_into()
                .map_err(|_| DeviceStateError::BalloonStatCount {
                    count: s.stats.len(),
                    keeps: STAT_COUNT,
                })?;
        if s.stats_last_update < 0 {
            return Err(DeviceStateError::BalloonStatsTime(s.stats_last_update));
        }
        self.num_pages = s.num_pages;
        self.actual = s.actual;
        self.stats_head = s.stats_head;
        self.stats = stats;
        self.stats_last_update = s.stats_last_update;
        self.counters = s.counters;
        self.next_poll = None;
        Ok(())
    }
}

impl VirtioDevice for Balloon {
    fn kind(&self) -> &'static str {
        "virtio-balloon"
    }

    fn device_id(&self) -> u16 {
        5
    }

    fn pci_class(&self) -> u32 {
        // QEMU's PCI_CLASS_OTHERS.
        0xff_00_00
    }

    fn features(&self) -> u64 {
        let mut f = F_VERSION_1 | F_STATS_VQ;
        if self.config.deflate_on_oom {
            f |= F_DEFLATE_ON_OOM;
        }
        if self.config.free_page_reporting {
            f |= F_REPORTING;
        }
        f
    }

    fn queue_count(&self) -> usize {
        if self.config.free_page_reporting {
            4
        } else {
            3
        }
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        // num_pages, actual; free_page_hint_cmd_id and poison_val read 0
        // (their features are not offered).
        let mut cfg = [0u8; 16];
        cfg[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        cfg[4..8].copy_from_slice(&self.actual.to_le_bytes());
        data.fill(0);
        if let Some(src) = cfg.get(offset..) {
            let n = data.len().min(src.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        let mut actual = self.actual.to_le_bytes();
        for (i, &b) in data.iter().enumerate() {
            let at = offset.checked_add(i).and_then(|o| o.checked_sub(4));
            if let Some(at) = at.filter(|&at| at < 4) {
                actual[at] = b;
            }
        }
        let actual = u32::from_le_bytes(actual);
        if actual != self.actual {
            self.actual = actual;
            self.actual_changed = true;
        }
    }

    fn process(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
        _driver_features: u64,
    ) -> Result<bool, QueueError> {
        let reporting = self.config.free_page_reporting;
        match (index, queues.get_mut(index)) {
            (INFLATE_QUEUE, Some(q)) => self.pfns(q, mem, true),
            (DEFLATE_QUEUE, Some(q)) => self.pfns(q, mem, false),
            (STATS_QUEUE, Some(q)) => self.receive_stats(q, mem),
            (REPORTING_QUEUE, Some(q)) if reporting => self.report(q, mem),
            _ => Err(QueueError::NoQueue { index }),
        }
    }

    fn reset(&mut self) {
        // The driver starts over: a held buffer is gone with its queue. The
        // host's target stays (QEMU keeps it too).
        self.stats_head = None;
        self.next_poll = None;
        if self.actual != 0 {
            self.actual = 0;
            self.actual_changed = true;
        }
        self.counters.held_pages = 0;
    }

    fn identity(&self) -> String {
        // What the driver may have negotiated: the queues and feature bits.
        format!(
            "deflate-on-oom={},free-page-reporting={}",
            if self.config.deflate_on_oom {
                "on"
            } else {
                "off"
            },
            if self.config.free_page_reporting {
                "on"
            } else {
                "off"
            }
        )
    }

    fn timed_queue(&self) -> Option<usize> {
        Some(STATS_QUEUE)
    }

    fn timer(&mut self, now: Instant) -> Option<Instant> {
        if self.stats_head.is_none() || self.poll_interval == 0 {
            self.next_poll = None;
            return None;
        }
        let due = *self
            .next_poll
            .get_or_insert_with(|| now + Duration::from_secs(u64::from(self.poll_interval)));
        // A poll already due is served by the next round that processes the
        // stats queue (at once, or when a stopped device runs again): the
        // device thread must not spin on it meanwhile.
        (due > now).then_some(due)
    }

    fn save_state(&self) -> Option<super::DeviceState> {
        Some(super::DeviceState::Balloon(self.save()))
    }

    fn restore_state(
        &mut self,
        state: Option<&super::DeviceState>,
    ) -> Result<(), DeviceStateError> {
        const KIND: &str = "virtio-balloon";
        match state {
            Some(super::DeviceState::Balloon(s)) => self.load(s),
            Some(_) => Err(DeviceStateError::OtherKind { kind: KIND }),
            // Every ferry with a balloon writes its state.
            None => Err(DeviceStateError::Missing { kind: KIND }),
        }
    }

    fn balloon(&mut self) -> Option<&mut Balloon> {
        Some(self)
    }

    fn stats(&self) -> super::DeviceStats {
        super::DeviceStats::Balloon(self.counters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_kvm::Backing;

    fn balloon() -> Balloon {
        let ram = Arc::new(GuestRam::new(&[(0, 16 << 20)], Backing::Anonymous).unwrap());
        Balloon::new(BalloonConfig::default(), ram)
    }

    #[test]
    fn balloon_config_space_reads_the_target_and_takes_actual() {
        let mut b = balloon();
        assert_eq!(b.set_target(100), Ok(true));
        assert_eq!(b.set_target(100), Ok(false));
        assert!(b.set_target((16 << 20) / 4096 + 1).is_err());
        let mut d = [0u8; 4];
        b.read_config(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 100);
        b.write_config(0, &7u32.to_le_bytes());
        b.read_config(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 100, "num_pages is read-only");
        assert_eq!(b.take_actual_change(), None);
        b.write_config(4, &42u32.to_le_bytes());
        assert_eq!(b.take_actual_change(), Some(42));
        assert_eq!(b.take_actual_change(), None);
        // Byte writes land in their byte; past the end nothing happens.
        b.write_config(5, &[1]);
        assert_eq!(b.take_actual_change(), Some(42 + 256));
        b.write_config(8, &[9; 8]);
        b.write_config(usize::MAX, &[9; 8]);
        assert_eq!(b.take_actual_change(), None);
        let mut all = [0xffu8; 20];
        b.read_config(0, &mut all);
        assert_eq!(&all[4..8], &(42u32 + 256).to_le_bytes());
        assert_eq!(&all[8..], &[0; 12]);
    }

    #[test]
    fn balloon_state_round_trips_and_hostile_state_is_refused() {
        let mut a = balloon();
        a.set_target(300).unwrap();
        a.actual = 200;
        a.stats_head = Some(3);
        a.stats[4] = Some(1 << 30);
        a.stats_last_update = 1_700_000_000;
        a.counters.inflated_pages = 200;
        a.counters.held_pages = 200;
        let saved = a.save();
        let back: BalloonState =
            serde_json::from_slice(&serde_json::to_vec(&saved).unwrap()).unwrap();
        assert_eq!(back, saved);
        let mut b = balloon();
        b.load(&saved).unwrap();
        assert_eq!(b.save(), saved);
        assert_eq!(b.info().stats[4], Some(1 << 30));

        let fresh = balloon().save();
        let mut c = balloon();
        for (bad, why) in [
            (
                BalloonState {
                    num_pages: u32::MAX,
                    ..saved.clone()
                },
                "target",
            ),
            (
                BalloonState {
                    stats_head: Some(QUEUE_SIZE),
                    ..saved.clone()
                },
                "stats buffer",
            ),
            (
                BalloonState {
                    stats: vec![None; 3],
                    ..saved.clone()
                },
                "statistics",
            ),
            (
                BalloonState {
                    stats_last_update: -5,
                    ..saved.clone()
                },
                "1970",
            ),
        ] {
            let err = c.load(&bad).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
            assert_eq!(c.save(), fresh, "a refused state changed nothing");
        }
        assert!(c.restore_state(None).is_err());
    }
}
