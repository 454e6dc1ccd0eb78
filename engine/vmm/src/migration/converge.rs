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
//!    under the current throttle, and at least 5 points or half the vCPU time left
//!    more each pass that still outruns the link. Lift it at switch-over.
//!    A percentage of CPU time does not bound a dirty rate: how many pages a guest
//!    dirties in its last 1% depends on the host (the cost of a dirty-logging write
//!    fault differs between kernels), and the measured rate saturates once a pass
//!    rewrites the whole working set. So past `max-cpu-throttle` the dirty limit
//!    (on by default) goes on halving the vCPUs' share of time, down to
//!    [`MIN_RUN_PPM`], until the rest fits the link: the dirty rate falls with the
//!    time the guest runs, so every migration converges, after at most
//!    log2(1% / 0.02%) < 6 more non-converging passes, each as long as sending
//!    the working set once takes.
//! 3. Past the total-time cap, cancel or force the switch-over, per policy.

use std::time::Duration;

use super::ThrottlePolicy;
use crate::throttle::{MIN_RUN_PPM, PPM};

/// Device state estimate per vCPU used before the real size is known.
pub const DEVICE_STATE_PER_VCPU: u64 = 16 << 10;

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
    /// QEMU's dirty_rate_high_cnt: passes in a row that dirtied too much.
    dirty_rate_high: u32,
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

    /// The throttle this pass calls for, as the share of time vCPUs nap (parts
    /// per million, at most `max_ppm`): 0 while the link keeps up, else enough
    /// that the dirty rate falls to half the link, computed from the rate
    /// measured under the current throttle, and at least 5 points or half the
    /// time left more than now (a saturated measurement, a rate that does not
    /// scale with the time the guest runs, cannot stall it).
    pub fn throttle_for(&mut self, dirty_rate: f64, current_ppm: u32, max_ppm: u32) -> u32 {
        if self.bandwidth <= 0.0 {
            return current_ppm;
        }
        let target = 0.5 * self.bandwidth;
        if dirty_rate <= target {
            self.non_converging = 0;
            return current_ppm;
        }
        self.non_converging += 1;
        if self.non_converging < 2 && current_ppm == 0 {
            return 0;
        }
        let ppm = f64::from(PPM);
        let current = current_ppm.min(PPM - MIN_RUN_PPM);
        let run = f64::from(PPM - current) / ppm;
        // Dirty rate the guest would have unthrottled.
        let free = dirty_rate / run;
        let need = (1.0 - target / free) * ppm;
        let step = 50_000.min((PPM - current) / 2);
        let nap = need.max(f64::from(current + step)).ceil();
        nap.clamp(0.0, f64::from(max_ppm.min(PPM - MIN_RUN_PPM))) as u32
    }
}

impl Convergence {
    /// QEMU's auto-converge (migration_trigger_throttle, mig_throttle_guest_down),
    /// as the share of time vCPUs nap (ppm): when a pass dirtied more than
    /// `trigger_threshold`% of the bytes it sent, twice in a row, throttle
    /// `initial`% the first time, then `increment` points more each time (with
    /// `tailslow`, only as much as brings the dirty bytes to the threshold, at
    /// most `increment`), up to `max_pct`.
    pub fn qemu_throttle_for(
        &mut self,
        dirty_bytes: u64,
        sent_bytes: u64,
        current_ppm: u32,
        policy: ThrottlePolicy,
        max_pct: u8,
    ) -> u32 {
        let ThrottlePolicy::Qemu {
            initial,
            increment,
            tailslow,
            trigger_threshold,
        } = policy
        else {
            return current_ppm;
        };
        let threshold = sent_bytes as f64 * f64::from(trigger_threshold) / 100.0;
        if dirty_bytes as f64 <= threshold {
            return current_ppm;
        }
        self.dirty_rate_high += 1;
        if self.dirty_rate_high < 2 {
            return current_ppm;
        }
        self.dirty_rate_high = 0;
        let now = f64::from(current_ppm) / 10_000.0;
        let pct = if current_ppm == 0 {
            f64::from(initial)
        } else if !tailslow {
            now + f64::from(increment)
        } else {
            let cpu_now = 100.0 - now;
            let cpu_ideal = cpu_now * (threshold / dirty_bytes as f64);
            now + (cpu_now - cpu_ideal).min(f64::from(increment))
        };
        (pct.min(f64::from(max_pct.min(99))) * 10_000.0).round() as u32
    }
}

/// The most a migration with `params` may throttle, parts per million of the
/// vCPUs' time: `max-cpu-throttle`, or with the dirty limit on, as much as it
/// takes to converge (all but [`MIN_RUN_PPM`]).
pub fn max_nap_ppm(max_throttle_pct: u8, dirty_limit: bool) -> u32 {
    if dirty_limit {
        PPM - MIN_RUN_PPM
    } else {
        u32::from(max_throttle_pct.min(99)) * 10_000
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
        let pct = |p: u32| p * 10_000;
        // Keeps up: no throttle.
        assert_eq!(c.throttle_for(40.0, 0, pct(99)), 0);
        // First pass that outruns the link: wait one more.
        assert_eq!(c.throttle_for(200.0, 0, pct(99)), 0);
        // Second: take away enough that 200 -> 50: 75%.
        assert_eq!(c.throttle_for(200.0, 0, pct(99)), pct(75));
        // Under 75% the guest still dirties 80 (free rate 320): need 84.375%.
        assert_eq!(c.throttle_for(80.0, pct(75), pct(99)), 843_750);
        // Capped.
        assert_eq!(c.throttle_for(1000.0, pct(85), pct(90)), pct(90));
    }

    /// The case a percentage cannot end: at 99% the guest still rewrites its
    /// whole working set every pass (the measured rate saturates and does not
    /// fall). With the dirty limit the share of time left halves each pass, so
    /// the rate the guest could reach falls below the link within a bound.
    #[test]
    fn the_dirty_limit_ends_what_a_percentage_cannot() {
        let mut c = Convergence {
            bandwidth: 16.0,
            ..Default::default()
        };
        let max = max_nap_ppm(99, true);
        // Unthrottled, the guest could dirty 3000 a second; what a pass sees is
        // capped at the working set's 32 per pass of 2 s.
        let seen = |nap: u32| (3000.0 * f64::from(PPM - nap) / f64::from(PPM)).min(16.0);
        let mut nap = 0;
        let mut passes = 0;
        while seen(nap) > 8.0 {
            nap = c.throttle_for(seen(nap), nap, max);
            passes += 1;
            assert!(
                passes < 20,
                "no convergence: {nap} ppm after {passes} passes"
            );
        }
        assert!(nap > 990_000, "{nap}");
        // Without it, QEMU's cap holds, and so does the non-convergence.
        let mut c = Convergence {
            bandwidth: 16.0,
            ..Default::default()
        };
        let cap = max_nap_ppm(99, false);
        let mut nap = 0;
        for _ in 0..30 {
            nap = c.throttle_for(seen(nap), nap, cap);
        }
        assert_eq!(nap, cap);
        assert!(seen(nap) > 8.0);
    }

    #[test]
    fn qemu_auto_converge_steps_as_qemu_does() {
        let mut c = Convergence::default();
        let q = ThrottlePolicy::Qemu {
            initial: 20,
            increment: 10,
            tailslow: false,
            trigger_threshold: 50,
        };
        // Dirtied half of what was sent or less: no throttle.
        assert_eq!(c.qemu_throttle_for(50, 100, 0, q, 99), 0);
        // Twice more than half: initial, then +increment each second time.
        assert_eq!(c.qemu_throttle_for(80, 100, 0, q, 99), 0);
        assert_eq!(c.qemu_throttle_for(80, 100, 0, q, 99), 200_000);
        assert_eq!(c.qemu_throttle_for(80, 100, 200_000, q, 99), 200_000);
        assert_eq!(c.qemu_throttle_for(80, 100, 200_000, q, 99), 300_000);
        // Capped at max-cpu-throttle.
        let mut c = Convergence::default();
        c.qemu_throttle_for(80, 100, 950_000, q, 99);
        assert_eq!(c.qemu_throttle_for(80, 100, 950_000, q, 99), 990_000);
        // Tailslow: only what brings 60 dirtied down to the threshold of 50
        // (the guest at 80% CPU needs 80 * 50/60 = 66.7%: +13.3 points, at
        // most the increment).
        let mut c = Convergence::default();
        let t = ThrottlePolicy::Qemu {
            initial: 20,
            increment: 30,
            tailslow: true,
            trigger_threshold: 50,
        };
        c.qemu_throttle_for(60, 100, 200_000, t, 99);
        assert_eq!(c.qemu_throttle_for(60, 100, 200_000, t, 99), 333_333);
        // ferry's own policy is not QEMU's.
        assert_eq!(
            c.qemu_throttle_for(90, 100, 0, ThrottlePolicy::Adaptive, 99),
            0
        );
    }
}
