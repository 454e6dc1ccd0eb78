//! How fast the guest dirties its memory, measured as QEMU's `calc-dirty-rate`
//! does in its `page-sampling` mode (what `virsh domdirtyrate-calc` asks for
//! by default): hash a random sample of guest pages, wait, hash them again and
//! scale the share that changed to the whole RAM. It reads guest memory only:
//! no dirty logging, no vCPU exit, nothing the guest or a migration notices.
//!
//! An operator runs it before a migration to see whether the guest will
//! converge over a link: a dirty rate above the link's rate needs the
//! throttle (auto-converge) or post-copy.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ferry_kvm::memory::PAGE_SIZE;
use ferry_kvm::{GuestRam, MemoryError};

/// QEMU's range of `calc-time`, in seconds.
pub const CALC_TIME_RANGE: std::ops::RangeInclusive<u64> = 1..=60;
/// QEMU's range of `sample-pages` (pages sampled per GiB of RAM).
pub const SAMPLE_PAGES_RANGE: std::ops::RangeInclusive<u64> = 128..=4096;
/// QEMU's default `sample-pages`.
pub const DEFAULT_SAMPLE_PAGES: u64 = 512;

/// Why a measurement cannot start. The texts are QEMU 7.2's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DirtyRateError {
    #[error("calc-time is out of range[1, 60].")]
    CalcTime,
    #[error("sample-pages is out of range[128, 4096].")]
    SamplePages,
    #[error("the dirty rate is already being measured.")]
    Busy,
}

/// A random sample of guest pages with a hash of each.
#[derive(Debug)]
pub struct PageSample {
    /// (guest physical address, CRC-32 of the page).
    pages: Vec<(u64, u32)>,
}

impl PageSample {
    /// Hashes `per_gib` random pages per GiB of each RAM range (at least one
    /// page of each range: QEMU skips blocks under 128 MiB, which would leave a
    /// small guest unmeasured).
    pub fn take(ram: &GuestRam, per_gib: u64) -> Result<Self, MemoryError> {
        let mut rng = XorShift(RandomState::new().build_hasher().finish() | 1);
        let mut pages = Vec::new();
        for (base, size) in ram.ranges() {
            let count = (per_gib * (size >> 20) / 1024).max(1);
            let in_range = size / PAGE_SIZE as u64;
            for _ in 0..count {
                let gpa = base + rng.next() % in_range * PAGE_SIZE as u64;
                pages.push((gpa, 0));
            }
        }
        let mut sample = Self { pages };
        let mut buf = vec![0u8; PAGE_SIZE];
        for page in &mut sample.pages {
            page.1 = hash(ram, page.0, &mut buf)?;
        }
        Ok(sample)
    }

    /// Pages sampled.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether nothing was sampled (a VM without RAM).
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// How many of the sampled pages hold other bytes now.
    pub fn changed(&self, ram: &GuestRam) -> Result<u64, MemoryError> {
        let mut buf = vec![0u8; PAGE_SIZE];
        let mut n = 0;
        for &(gpa, crc) in &self.pages {
            if hash(ram, gpa, &mut buf)? != crc {
                n += 1;
            }
        }
        Ok(n)
    }
}

fn hash(ram: &GuestRam, gpa: u64, buf: &mut [u8]) -> Result<u32, MemoryError> {
    ram.read(gpa, buf)?;
    Ok(crc32fast::hash(buf))
}

/// A small PRNG for picking sample pages (not for anything secret).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// QEMU's estimate: the changed share of the sample, times the RAM in MiB,
/// per second of `elapsed`: MiB/s ("MB/s" in QEMU's and libvirt's words).
pub fn rate_mib_per_s(changed: u64, sampled: u64, ram_bytes: u64, elapsed: Duration) -> u64 {
    let ms = elapsed.as_millis().max(1);
    if sampled == 0 {
        return 0;
    }
    let rate =
        u128::from(changed) * u128::from(ram_bytes >> 20) * 1000 / (u128::from(sampled) * ms);
    u64::try_from(rate).unwrap_or(u64::MAX)
}

/// Where a measurement stands (QEMU's `DirtyRateStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Unstarted,
    Measuring,
    Measured,
}

impl Status {
    /// QEMU's name of the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unstarted => "unstarted",
            Self::Measuring => "measuring",
            Self::Measured => "measured",
        }
    }
}

/// The last measurement (QEMU's `DirtyRateInfo`, page-sampling mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measurement {
    pub status: Status,
    /// When it started: seconds of the monotonic clock, as QEMU's
    /// `QEMU_CLOCK_REALTIME` counts them.
    pub start_time_s: i64,
    /// The requested period, in seconds.
    pub calc_time_s: u64,
    /// Pages sampled per GiB.
    pub sample_pages: u64,
    /// MiB/s, once measured (`None` if the guest's memory could not be read).
    pub dirty_rate: Option<u64>,
}

/// Runs measurements one at a time, each in its own thread, and keeps the
/// last result. Dropping it ends a measurement under way.
#[derive(Debug)]
pub struct DirtyRateMeter {
    last: Arc<Mutex<Measurement>>,
    /// Set (and notified) to end the measurement early.
    quit: Arc<(Mutex<bool>, Condvar)>,
}

impl Default for DirtyRateMeter {
    fn default() -> Self {
        Self {
            last: Arc::new(Mutex::new(Measurement {
                status: Status::Unstarted,
                start_time_s: 0,
                calc_time_s: 0,
                sample_pages: 0,
                dirty_rate: None,
            })),
            quit: Arc::new((Mutex::new(false), Condvar::new())),
        }
    }
}

impl DirtyRateMeter {
    /// Starts measuring `ram` over `calc_time_s` seconds with `sample_pages`
    /// pages per GiB; returns at once (see [`Self::last`]).
    pub fn start(
        &self,
        ram: Arc<GuestRam>,
        calc_time_s: u64,
        sample_pages: u64,
    ) -> Result<(), DirtyRateError> {
        if !CALC_TIME_RANGE.contains(&calc_time_s) {
            return Err(DirtyRateError::CalcTime);
        }
        if !SAMPLE_PAGES_RANGE.contains(&sample_pages) {
            return Err(DirtyRateError::SamplePages);
        }
        {
            let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
            if last.status == Status::Measuring {
                return Err(DirtyRateError::Busy);
            }
            *last = Measurement {
                status: Status::Measuring,
                start_time_s: monotonic_s(),
                calc_time_s,
                sample_pages,
                dirty_rate: None,
            };
        }
        let (last, quit) = (self.last.clone(), self.quit.clone());
        let spawned = std::thread::Builder::new()
            .name("dirty-rate".into())
            .spawn(move || {
                let rate = measure(&ram, calc_time_s, sample_pages, &quit);
                if let Err(e) = &rate {
                    tracing::warn!("dirty rate: cannot read guest memory: {e}");
                }
                let mut last = last.lock().unwrap_or_else(PoisonError::into_inner);
                last.status = Status::Measured;
                last.dirty_rate = rate.ok().flatten();
            });
        if spawned.is_err() {
            let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
            last.status = Status::Measured;
        }
        Ok(())
    }

    /// The last measurement, or the one under way.
    pub fn last(&self) -> Measurement {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits (at most `timeout`) until no measurement runs; returns the last.
    pub fn wait(&self, timeout: Duration) -> Measurement {
        let end = Instant::now() + timeout;
        loop {
            let m = self.last();
            if m.status != Status::Measuring || Instant::now() >= end {
                return m;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DirtyRateMeter {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.quit;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cvar.notify_all();
    }
}

/// One measurement; `Ok(None)` when it was ended early.
fn measure(
    ram: &GuestRam,
    calc_time_s: u64,
    per_gib: u64,
    quit: &(Mutex<bool>, Condvar),
) -> Result<Option<u64>, MemoryError> {
    let start = Instant::now();
    let sample = PageSample::take(ram, per_gib)?;
    let (lock, cvar) = quit;
    let until = start + Duration::from_secs(calc_time_s);
    let mut ended = lock.lock().unwrap_or_else(PoisonError::into_inner);
    while !*ended {
        let now = Instant::now();
        if now >= until {
            break;
        }
        ended = cvar
            .wait_timeout(ended, until - now)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    if *ended {
        return Ok(None);
    }
    drop(ended);
    let changed = sample.changed(ram)?;
    Ok(Some(rate_mib_per_s(
        changed,
        sample.len() as u64,
        ram.total_bytes(),
        start.elapsed(),
    )))
}

fn monotonic_s() -> i64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_kvm::Backing;

    #[test]
    fn the_estimate_scales_the_changed_share_to_the_ram() {
        // Half the sample changed in 2 s of a 1 GiB guest: 256 MiB/s.
        assert_eq!(
            rate_mib_per_s(256, 512, 1 << 30, Duration::from_secs(2)),
            256
        );
        assert_eq!(rate_mib_per_s(0, 512, 1 << 30, Duration::from_secs(1)), 0);
        assert_eq!(rate_mib_per_s(5, 0, 1 << 30, Duration::from_secs(1)), 0);
    }

    #[test]
    fn a_sample_sees_pages_that_changed_and_only_those() {
        let ram = GuestRam::new(&[(0, 64 << 20)], Backing::Anonymous).unwrap();
        let sample = PageSample::take(&ram, 4096).unwrap();
        assert_eq!(sample.len(), 256, "4096 per GiB of 64 MiB");
        assert_eq!(sample.changed(&ram).unwrap(), 0);
        // Rewrite every page of the first half of RAM.
        for gpa in (0..32u64 << 20).step_by(PAGE_SIZE) {
            ram.write(gpa, &[0xa5]).unwrap();
        }
        let expect = sample.pages.iter().filter(|p| p.0 < 32 << 20).count() as u64;
        assert!(expect > 0 && expect < 256, "{expect}");
        assert_eq!(sample.changed(&ram).unwrap(), expect);
    }

    #[test]
    fn a_meter_measures_once_at_a_time_and_checks_qemus_ranges() {
        let ram = Arc::new(GuestRam::new(&[(0, 16 << 20)], Backing::Anonymous).unwrap());
        let meter = DirtyRateMeter::default();
        assert_eq!(meter.last().status, Status::Unstarted);
        assert_eq!(
            meter.start(ram.clone(), 0, 512),
            Err(DirtyRateError::CalcTime)
        );
        assert_eq!(
            meter.start(ram.clone(), 1, 64),
            Err(DirtyRateError::SamplePages)
        );
        meter.start(ram.clone(), 1, 512).unwrap();
        assert_eq!(
            meter.start(ram.clone(), 1, 512),
            Err(DirtyRateError::Busy),
            "{:?}",
            meter.last()
        );
        let m = meter.wait(Duration::from_secs(30));
        assert_eq!(m.status, Status::Measured);
        assert_eq!((m.calc_time_s, m.sample_pages), (1, 512));
        assert_eq!(m.dirty_rate, Some(0), "nothing wrote the RAM");
    }
}
