//! Convergence control: when to switch over, and how hard to throttle vCPUs.
//!
//! Rules (checked after every pass):
//! 1. expected downtime = (dirty bytes + device state estimate) / measured bandwidth;
//!    once it is within the downtime limit, make up to five more passes while each
//!    shrinks the rest by a quarter (a shorter pause for the price of a pass), then
//!    switch over (precopy.rs applies this rule).
//! 2. If the guest dirties memory faster than half the bandwidth for two passes in a
//!    row, throttle ("stun during page send"): take away just enough vCPU time that the
//!    dirty rate falls to half the bandwidth, computed from the dirty rate measured
//!    under the current throttle. Lift it at switch-over.
//! 3. Past the total-time cap, cancel or force the switch-over, per policy.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One throttle period: the vCPUs run `(100 - pct)%` of it and sleep the rest, so a
/// throttled guest never stalls longer than this.
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(20);

/// Device state estimate per vCPU used before the real size is known.
pub const DEVICE_STATE_PER_VCPU: u64 = 16 << 10;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Shared with the vCPU threads: how long they must nap when kicked.
#[derive(Debug, Default)]
pub struct ThrottleState {
    pct: AtomicU8,
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

    pub fn percent(&self) -> u8 {
        self.pct.load(Ordering::Acquire)
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

    /// Keeps every vCPU out of the guest and stops the devices (a held guest
    /// receives no frames); returns once each running vCPU has left it (or after
    /// 100 ms, for vCPUs the VMM paused itself meanwhile).
    pub fn hold(&self) {
        (self.stop_devices)(true);
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
                    let pct = u64::from(s.pct.load(Ordering::Acquire));
                    let period = THROTTLE_PERIOD.as_nanos() as u64;
                    if pct == 0 {
                        std::thread::sleep(THROTTLE_PERIOD);
                        continue;
                    }
                    let nap = period * pct / 100;
                    std::thread::sleep(Duration::from_nanos(period - nap));
                    let until = epoch().elapsed().as_nanos() as u64 + nap;
                    s.nap_until.store(until, Ordering::Release);
                    kick();
                    std::thread::sleep(Duration::from_nanos(nap));
                }
            })
            .ok();
        Self {
            state,
            stop,
            ticker,
        }
    }

    pub fn set(&self, pct: u8) {
        self.state.pct.store(pct.min(99), Ordering::Release);
        if pct == 0 {
            self.state.nap_until.store(0, Ordering::Release);
        }
    }

    pub fn percent(&self) -> u8 {
        self.state.percent()
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.set(0);
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
    }
}

/// The decision after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    SwitchOver,
    Continue,
}

/// Tracks passes and decides.
#[derive(Debug, Default)]
pub struct Convergence {
    /// Bytes/s of the link, from the passes so far (0 = not measured yet).
    pub bandwidth: f64,
    non_converging: u32,
    /// Small passes not yet folded into `bandwidth`: bytes and seconds.
    pending: (u64, f64),
}

/// A pass (or a run of small passes) must move this much to say something about the
/// link: less can sit in socket buffers.
const MIN_SAMPLE_BYTES: u64 = 4 << 20;

/// One pass's measurements.
#[derive(Debug, Clone, Copy)]
pub struct PassReport {
    pub bytes_sent: u64,
    pub elapsed: Duration,
    pub dirty_bytes: u64,
    pub device_bytes: u64,
}

impl Convergence {
    /// Folds a pass into the bandwidth estimate and returns the expected downtime.
    pub fn observe(&mut self, pass: &PassReport, cap: u64) -> Duration {
        // Passes that moved little say little about the link alone: consecutive
        // ones are summed until they moved enough (so the estimate recovers after a
        // slow spell, e.g. a link outage, even once throttling keeps passes small),
        // unless nothing better is known yet (an idle guest never sends much).
        self.pending.0 += pass.bytes_sent;
        self.pending.1 += pass.elapsed.as_secs_f64();
        let (bytes, secs) = self.pending;
        if (bytes >= MIN_SAMPLE_BYTES || (self.bandwidth == 0.0 && bytes > 0)) && secs > 0.0 {
            let rate = bytes as f64 / secs;
            self.bandwidth = if self.bandwidth == 0.0 {
                rate
            } else {
                0.5 * self.bandwidth + 0.5 * rate
            };
            self.pending = (0, 0.0);
        }
        if cap > 0 && (self.bandwidth == 0.0 || self.bandwidth > cap as f64) {
            self.bandwidth = cap as f64;
        }
        self.expected_downtime(pass.dirty_bytes + pass.device_bytes)
    }

    pub fn expected_downtime(&self, bytes: u64) -> Duration {
        if bytes == 0 {
            return Duration::ZERO;
        }
        if self.bandwidth <= 0.0 {
            return Duration::from_secs(3600);
        }
        Duration::from_secs_f64(bytes as f64 / self.bandwidth)
    }

    /// Whether to switch over now.
    pub fn decide(&self, expected: Duration, limit: Duration) -> Decision {
        if expected <= limit {
            Decision::SwitchOver
        } else {
            Decision::Continue
        }
    }

    /// The throttle (percent) this pass calls for: 0 while the link keeps up, else the
    /// share of vCPU time to take away so that the dirty rate falls to half the link.
    pub fn throttle_for(&mut self, dirty_rate: f64, current_pct: u8, max_pct: u8) -> u8 {
        if self.bandwidth <= 0.0 {
            return current_pct;
        }
        let target = 0.5 * self.bandwidth;
        if dirty_rate <= target {
            self.non_converging = 0;
            return current_pct;
        }
        self.non_converging += 1;
        if self.non_converging < 2 && current_pct == 0 {
            return 0;
        }
        // Dirty rate the guest would have unthrottled.
        let free = dirty_rate / (1.0 - f64::from(current_pct) / 100.0).max(0.01);
        let need = (1.0 - target / free) * 100.0;
        // Never throttle less than now while the guest still outruns the link, and step
        // up by at least 5 points so that a noisy measurement cannot stall progress.
        let pct = need.max(f64::from(current_pct) + 5.0).ceil();
        pct.clamp(0.0, f64::from(max_pct)) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_over_when_rest_fits_the_limit() {
        let mut c = Convergence::default();
        let pass = PassReport {
            bytes_sent: 1 << 30,
            elapsed: Duration::from_millis(500),
            dirty_bytes: 100 << 20,
            device_bytes: 64 << 10,
        };
        let expected = c.observe(&pass, 0);
        // 2 GiB/s: 100 MiB takes ~49 ms.
        assert!(expected < Duration::from_millis(60), "{expected:?}");
        assert_eq!(
            c.decide(expected, Duration::from_millis(300)),
            Decision::SwitchOver
        );
        assert_eq!(
            c.decide(expected, Duration::from_millis(10)),
            Decision::Continue
        );
    }

    #[test]
    fn an_idle_guest_still_gets_a_bandwidth_estimate() {
        let mut c = Convergence::default();
        let pass = PassReport {
            bytes_sent: 400 << 10,
            elapsed: Duration::from_millis(200),
            dirty_bytes: 8 << 10,
            device_bytes: 16 << 10,
        };
        let expected = c.observe(&pass, 0);
        assert!(c.bandwidth > 0.0);
        assert_eq!(
            c.decide(expected, Duration::from_millis(300)),
            Decision::SwitchOver
        );
    }

    #[test]
    fn small_passes_together_bring_the_estimate_back_after_a_slow_spell() {
        let mut c = Convergence::default();
        let pass = |bytes: u64, ms: u64| PassReport {
            bytes_sent: bytes,
            elapsed: Duration::from_millis(ms),
            dirty_bytes: 1 << 20,
            device_bytes: 0,
        };
        // 100 MiB/s, then a pass across a 2 s outage.
        c.observe(&pass(100 << 20, 1000), 0);
        c.observe(&pass(10 << 20, 2100), 0);
        let slow = c.bandwidth;
        assert!(slow < (60 << 20) as f64, "{slow}");
        // Throttled passes of 512 KiB in 5 ms (100 MiB/s): one alone says
        // nothing, eight together do.
        for _ in 0..7 {
            c.observe(&pass(512 << 10, 5), 0);
            assert_eq!(c.bandwidth, slow);
        }
        c.observe(&pass(512 << 10, 5), 0);
        assert!(c.bandwidth > slow * 1.3, "{} after {slow}", c.bandwidth);
    }

    #[test]
    fn bandwidth_cap_bounds_the_estimate() {
        let mut c = Convergence::default();
        let pass = PassReport {
            bytes_sent: 1 << 30,
            elapsed: Duration::from_millis(500),
            dirty_bytes: 64 << 20,
            device_bytes: 0,
        };
        let expected = c.observe(&pass, 128 << 20);
        assert_eq!(c.bandwidth, (128u64 << 20) as f64);
        assert!(
            (expected.as_millis() as i64 - 500).abs() <= 1,
            "{expected:?}"
        );
    }

    #[test]
    fn throttles_only_as_much_as_needed() {
        let mut c = Convergence {
            bandwidth: 100.0,
            ..Default::default()
        };
        // Keeps up: no throttle.
        assert_eq!(c.throttle_for(40.0, 0, 99), 0);
        // First pass that outruns the link: wait one more.
        assert_eq!(c.throttle_for(200.0, 0, 99), 0);
        // Second: take away enough that 200 -> 50: 75%.
        assert_eq!(c.throttle_for(200.0, 0, 99), 75);
        // Under 75% the guest still dirties 80 (free rate 320): need 85%.
        assert_eq!(c.throttle_for(80.0, 75, 99), 85);
        // Capped.
        assert_eq!(c.throttle_for(1000.0, 85, 90), 90);
    }
}
