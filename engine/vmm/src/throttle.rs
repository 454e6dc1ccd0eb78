//! The vCPU throttle's mechanics: vCPUs run their share of a period and nap the
//! rest ([`Throttle`]), and a hold keeps them out of the guest ([`VcpuHold`]).
//! The migration decides how hard to throttle (`migration::converge`); this
//! module, at the vm/vcpu layer, only carries it out.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One throttle period: the vCPUs run their share of it and nap the rest, so a
/// throttled guest stalls no longer than this, until its share of time is so
/// small that a run would be shorter than [`MIN_RUN`].
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(20);

/// The shortest run between two naps (a kick takes tens of µs to land): below
/// it, the period grows instead, up to a nap of [`MAX_NAP`].
pub const MIN_RUN: Duration = Duration::from_micros(200);

/// The longest nap of a throttled vCPU.
pub const MAX_NAP: Duration = Duration::from_secs(1);

/// The smallest share of time, in parts per million, that the dirty limit
/// leaves the vCPUs: [`MIN_RUN`] in every [`MAX_NAP`].
pub const MIN_RUN_PPM: u32 = 200;

pub(crate) const PPM: u32 = 1_000_000;

/// How long vCPUs run, then nap, in one throttle cycle when they nap `nap_ppm`
/// parts per million of the time.
pub fn cycle(nap_ppm: u32) -> (Duration, Duration) {
    let nap_ppm = nap_ppm.min(PPM - MIN_RUN_PPM);
    let period = THROTTLE_PERIOD.as_nanos() as u64;
    let run = period * u64::from(PPM - nap_ppm) / u64::from(PPM);
    if run >= MIN_RUN.as_nanos() as u64 {
        return (
            Duration::from_nanos(run),
            Duration::from_nanos(period - run),
        );
    }
    let run = MIN_RUN.as_nanos() as u64;
    let nap = run * u64::from(nap_ppm) / u64::from(PPM - nap_ppm);
    (
        Duration::from_nanos(run),
        Duration::from_nanos(nap).min(MAX_NAP),
    )
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Shared with the vCPU threads: how long they must nap when kicked.
#[derive(Debug, Default)]
pub struct ThrottleState {
    /// Share of the time vCPUs nap, parts per million.
    nap_ppm: AtomicU32,
    /// Nanoseconds since `epoch()` until which vCPUs sleep; 0 = none.
    nap_until: AtomicU64,
    /// Held (a `stop` while a migration owns the VM): vCPUs stay out of the
    /// guest until released or until the VMM pauses them.
    held: AtomicBool,
    /// vCPU threads napping now.
    napping: AtomicUsize,
}

impl ThrottleState {
    /// Called by a vCPU thread after KVM_RUN was interrupted, and before it enters
    /// the guest while held: sleeps out the current nap (or the hold) in small
    /// steps, returning early when `stop` is set (a pause request).
    pub fn nap(&self, stop: &AtomicBool) {
        self.napping.fetch_add(1, Ordering::AcqRel);
        self.nap_inner(stop);
        self.napping.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    fn nap_inner(&self, stop: &AtomicBool) {
        loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            if self.held.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let until = self.nap_until.load(Ordering::Acquire);
            if until == 0 || stop.load(Ordering::Acquire) {
                return;
            }
            let now = epoch().elapsed().as_nanos() as u64;
            if now >= until {
                return;
            }
            std::thread::sleep(Duration::from_nanos((until - now).min(1_000_000)));
        }
    }

    /// The throttle as QEMU reports it (`cpu-throttle-percentage`, at most 99).
    pub fn percent(&self) -> u8 {
        (self.nap_ppm() / 10_000).min(99) as u8
    }

    /// Share of the time vCPUs nap, parts per million.
    pub fn nap_ppm(&self) -> u32 {
        self.nap_ppm.load(Ordering::Acquire)
    }
}

/// Stops and restarts a VM's vCPUs from any thread, also while a migration owns
/// the VM (QMP `stop`/`cont` during a migration). A hold keeps vCPUs out of the
/// guest without pausing them the VMM's way, so the migration's own pause at
/// switch-over and its resume after a failure work as before; whoever gets the
/// VM back turns a hold into a real pause (see [`crate::Vm::take_hold`]).
#[derive(Clone)]
pub struct VcpuHold {
    state: Arc<ThrottleState>,
    threads: Vec<libc::pthread_t>,
    /// Stops (true) or lets run the VM's devices (their receive threads).
    stop_devices: Arc<dyn Fn(bool) + Send + Sync>,
}

impl std::fmt::Debug for VcpuHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuHold")
            .field("state", &self.state)
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl VcpuHold {
    pub(crate) fn new(
        state: Arc<ThrottleState>,
        threads: Vec<libc::pthread_t>,
        stop_devices: Arc<dyn Fn(bool) + Send + Sync>,
    ) -> Self {
        Self {
            state,
            threads,
            stop_devices,
        }
    }

    /// Keeps every vCPU out of the guest, then stops the devices (a held guest
    /// receives no frames); returns once each running vCPU has left it (or after
    /// 100 ms, for vCPUs the VMM paused itself meanwhile). The vCPUs go first, as
    /// in [`crate::Vm::pause`]: a queue notification a vCPU sends while leaving
    /// reaches a running device, not one already stopped.
    pub fn hold(&self) {
        self.state.held.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_millis(100);
        while self.state.napping.load(Ordering::Acquire) < self.threads.len()
            && Instant::now() < deadline
        {
            for &t in &self.threads {
                let _ = ferry_kvm::kick(t);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        (self.stop_devices)(true);
    }

    /// [`Self::hold`] for vCPUs that are not running (a paused VM about to
    /// resume held): nothing to kick out or wait for.
    pub fn hold_stopped(&self) {
        self.state.held.store(true, Ordering::Release);
        (self.stop_devices)(true);
    }

    /// Lets held vCPUs and devices run again.
    pub fn release(&self) {
        self.state.held.store(false, Ordering::Release);
        (self.stop_devices)(false);
    }

    pub fn is_held(&self) -> bool {
        self.state.is_held()
    }
}

/// Throttles a VM's vCPUs while alive; dropping it lifts the throttle.
#[derive(Debug)]
pub struct Throttle {
    state: Arc<ThrottleState>,
    stop: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

impl Throttle {
    /// Starts the ticker; `kick` interrupts every vCPU.
    pub fn start(state: Arc<ThrottleState>, kick: impl Fn() + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (state.clone(), stop.clone());
        let ticker = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                while !st.load(Ordering::Acquire) {
                    // Parked, not asleep: dropping the throttle wakes the ticker at
                    // once (a nap may last up to MAX_NAP).
                    let ppm = s.nap_ppm();
                    if ppm == 0 {
                        std::thread::park_timeout(THROTTLE_PERIOD);
                        continue;
                    }
                    let (run, nap) = cycle(ppm);
                    std::thread::park_timeout(run);
                    if st.load(Ordering::Acquire) {
                        break;
                    }
                    let until = epoch().elapsed().as_nanos() as u64 + nap.as_nanos() as u64;
                    s.nap_until.store(until, Ordering::Release);
                    kick();
                    std::thread::park_timeout(nap);
                }
            })
            .ok();
        Self {
            state,
            stop,
            ticker,
        }
    }

    /// Lets vCPUs nap `nap_ppm` parts per million of the time (0: not at all).
    pub fn set_ppm(&self, nap_ppm: u32) {
        self.state
            .nap_ppm
            .store(nap_ppm.min(PPM - MIN_RUN_PPM), Ordering::Release);
        if nap_ppm == 0 {
            self.state.nap_until.store(0, Ordering::Release);
        }
    }

    pub fn percent(&self) -> u8 {
        self.state.percent()
    }

    pub fn nap_ppm(&self) -> u32 {
        self.state.nap_ppm()
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.set_ppm(0);
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.ticker.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_share_of_time_lengthens_the_cycle_not_the_run() {
        assert_eq!(
            cycle(250_000),
            (Duration::from_millis(15), Duration::from_millis(5))
        );
        assert_eq!(
            cycle(990_000),
            (Duration::from_micros(200), Duration::from_micros(19_800))
        );
        let (run, nap) = cycle(999_000);
        assert_eq!(run, MIN_RUN);
        assert_eq!(nap, Duration::from_micros(199_800));
        assert_eq!(cycle(PPM).1, MAX_NAP - Duration::from_micros(200));
    }
}
