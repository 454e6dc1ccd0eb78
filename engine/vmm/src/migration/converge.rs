//! Convergence control: when to switch over, and how hard to throttle vCPUs.
//!
//! Rules (checked after every pass):
//! 1. expected downtime = (dirty bytes + device state estimate) / measured bandwidth;
//!    once it is within the downtime limit, make up to five more passes while each
//!    shrinks the rest by a quarter (a shorter pause for the price of a pass), then
//!    switch over ([`next_step`], which lists the rules in full).
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
//! 3. Past the total-time cap, cancel or force the switch-over, per policy
//!    ([`next_step`]).
//!
//! The throttle's mechanics (the vCPUs' naps) live in [`crate::throttle`].

use std::time::Duration;

use super::{MigrationParams, ThrottlePolicy, TimeoutPolicy};
use crate::throttle::{MIN_RUN_PPM, PPM};

/// Device state estimate per vCPU used before the real size is known.
pub const DEVICE_STATE_PER_VCPU: u64 = 16 << 10;

/// Passes made after the rest already fits the downtime limit, to shrink it further.
pub const MAX_EXTRA_PASSES: u32 = 5;
/// A rest this small is not worth another pass.
pub const SMALL_REST: u64 = 1 << 20;

/// What one pre-copy pass measured, as [`next_step`] weighs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassRecord {
    /// Bytes the pass put on the wire.
    pub bytes_sent: u64,
    /// How long the pass took.
    pub elapsed: Duration,
    /// Bytes the guest dirtied while the pass ran: the rest, if it switched over now.
    pub dirty_bytes: u64,
    /// How long sending that rest and the device state would pause the guest.
    pub expected_downtime: Duration,
    /// The downtime limit in force when the pass ended (it may change between
    /// passes: migrate-set-parameters).
    pub downtime_limit: Duration,
}

impl PassRecord {
    /// The rest fits the downtime limit.
    fn fits(&self) -> bool {
        self.expected_downtime <= self.downtime_limit
    }
}

/// The part of the migration's parameters that bounds pre-copy as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeLimit {
    /// The cap on the migration's total time; `None`: no cap.
    pub max_total_time: Option<Duration>,
    /// What happens past it.
    pub on_timeout: TimeoutPolicy,
}

impl TimeLimit {
    pub fn of(params: &MigrationParams) -> Self {
        Self {
            max_total_time: (params.max_total_time_ms > 0)
                .then(|| Duration::from_millis(params.max_total_time_ms)),
            on_timeout: params.on_timeout,
        }
    }
}

/// What pre-copy does after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The rest does not fit the downtime limit yet: another pass.
    Continue,
    /// The rest fits, but one more pass with the guest running shrinks it.
    ExtraPass,
    /// Pause the guest and send the rest.
    SwitchOver,
    /// The total time ran out, and its policy is to switch over now, whatever
    /// the downtime (the switch-over is not guarded then).
    ForceSwitchOver,
    /// The total time ran out, and its policy is to cancel.
    TimedOut,
}

/// The step after the last pass of `history`, the passes since pre-copy began
/// or last returned to it from a switch-over that would have overrun the
/// downtime limit, `elapsed` into the migration. Rules, in this order:
///
/// 1. The last pass's rest fits its downtime limit ([`PassRecord::fits`]):
///    switch over if [`MAX_EXTRA_PASSES`] extra passes were made already (every
///    earlier pass of `history` that fit was one), if the rest is at most
///    [`SMALL_REST`], or if it did not shrink by more than a quarter since the
///    pass before (the first pass counts as shrinking). Otherwise the next pass
///    is an extra one, unless rule 2 applies.
/// 2. Past `limit.max_total_time`: [`Step::TimedOut`] or
///    [`Step::ForceSwitchOver`], as `limit.on_timeout` says.
/// 3. Otherwise [`Step::ExtraPass`] (rule 1 asked for one) or [`Step::Continue`].
///
/// A return to pre-copy starts a new history: its extra passes start from
/// none, and its first pass counts as shrinking.
pub fn next_step(history: &[PassRecord], limit: &TimeLimit, elapsed: Duration) -> Step {
    let Some((pass, before)) = history.split_last() else {
        return Step::Continue;
    };
    let mut extra = false;
    if pass.fits() {
        let extra_passes = before.iter().filter(|p| p.fits()).count();
        let shrinking = before
            .last()
            .is_none_or(|last| pass.dirty_bytes * 4 < last.dirty_bytes * 3);
        if extra_passes >= MAX_EXTRA_PASSES as usize || pass.dirty_bytes <= SMALL_REST || !shrinking
        {
            return Step::SwitchOver;
        }
        extra = true;
    }
    if limit.max_total_time.is_some_and(|max| elapsed > max) {
        return match limit.on_timeout {
            TimeoutPolicy::Cancel => Step::TimedOut,
            TimeoutPolicy::ForceSwitchover => Step::ForceSwitchOver,
        };
    }
    if extra {
        Step::ExtraPass
    } else {
        Step::Continue
    }
}

/// Tracks passes: the link's bandwidth, and what the throttle saw.
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
        assert!(expected > Duration::from_millis(10), "{expected:?}");
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
        assert!(expected <= Duration::from_millis(300), "{expected:?}");
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

    const LIMIT: Duration = Duration::from_millis(300);
    const NO_CAP: TimeLimit = TimeLimit {
        max_total_time: None,
        on_timeout: TimeoutPolicy::Cancel,
    };

    /// A pass that left `dirty_mib` MiB, expected to take `expected_ms` to send.
    fn pass(dirty_mib: u64, expected_ms: u64) -> PassRecord {
        PassRecord {
            bytes_sent: 256 << 20,
            elapsed: Duration::from_millis(500),
            dirty_bytes: dirty_mib << 20,
            expected_downtime: Duration::from_millis(expected_ms),
            downtime_limit: LIMIT,
        }
    }

    fn step(history: &[PassRecord]) -> Step {
        next_step(history, &NO_CAP, Duration::from_secs(1))
    }

    #[test]
    fn a_rest_over_the_limit_takes_another_pass() {
        assert_eq!(step(&[]), Step::Continue);
        assert_eq!(step(&[pass(512, 2000)]), Step::Continue);
        assert_eq!(step(&[pass(512, 2000), pass(400, 1500)]), Step::Continue);
    }

    #[test]
    fn a_small_rest_that_fits_switches_over() {
        let small = SMALL_REST >> 20;
        assert_eq!(step(&[pass(small, 5)]), Step::SwitchOver);
        assert_eq!(step(&[pass(512, 2000), pass(small, 5)]), Step::SwitchOver);
    }

    #[test]
    fn a_rest_that_fits_and_shrinks_takes_extra_passes_up_to_the_max() {
        // The first pass that fits counts as shrinking.
        let mut history = vec![pass(100, 250)];
        assert_eq!(step(&history), Step::ExtraPass);
        // Each a third smaller than the one before: shrinking by a quarter.
        let mut mib = 100;
        for _ in 1..MAX_EXTRA_PASSES {
            mib = mib * 2 / 3;
            history.push(pass(mib, 200));
            assert_eq!(step(&history), Step::ExtraPass, "{history:?}");
        }
        history.push(pass(mib * 2 / 3, 150));
        assert_eq!(step(&history), Step::SwitchOver, "{history:?}");
        // A pass over the limit in between was no extra pass.
        let history = [pass(900, 3000), pass(100, 250)];
        assert_eq!(step(&history), Step::ExtraPass);
    }

    #[test]
    fn a_rest_that_fits_but_shrinks_less_than_a_quarter_switches_over() {
        assert_eq!(step(&[pass(100, 250), pass(80, 200)]), Step::SwitchOver);
        assert_eq!(step(&[pass(100, 250), pass(74, 200)]), Step::ExtraPass);
        // Growing: also no point in another pass.
        assert_eq!(step(&[pass(100, 2000), pass(120, 290)]), Step::SwitchOver);
    }

    #[test]
    fn a_changed_downtime_limit_applies_to_the_pass_it_was_in_force_for() {
        // The first pass fit a limit raised for it: an extra pass was made.
        let raised = PassRecord {
            downtime_limit: Duration::from_secs(3),
            ..pass(100, 2000)
        };
        let history = [
            raised,
            pass(66, 250),
            pass(44, 200),
            pass(29, 150),
            pass(19, 100),
        ];
        assert_eq!(step(&history), Step::ExtraPass);
        let mut history = history.to_vec();
        history.push(pass(12, 80));
        assert_eq!(step(&history), Step::SwitchOver);
    }

    #[test]
    fn past_the_total_time_cancel_or_force_as_the_policy_says() {
        let cap = |on_timeout| TimeLimit {
            max_total_time: Some(Duration::from_secs(10)),
            on_timeout,
        };
        let cancel = cap(TimeoutPolicy::Cancel);
        let force = cap(TimeoutPolicy::ForceSwitchover);
        let over = [pass(512, 2000)];
        let (before, after) = (Duration::from_secs(10), Duration::from_millis(10_001));
        assert_eq!(next_step(&over, &cancel, before), Step::Continue);
        assert_eq!(next_step(&over, &cancel, after), Step::TimedOut);
        assert_eq!(next_step(&over, &force, after), Step::ForceSwitchOver);
        // The timeout also ends extra passes.
        let extra = [pass(100, 250)];
        assert_eq!(next_step(&extra, &cancel, before), Step::ExtraPass);
        assert_eq!(next_step(&extra, &cancel, after), Step::TimedOut);
        assert_eq!(next_step(&extra, &force, after), Step::ForceSwitchOver);
        // A rest ready to switch over does so, timeout or not.
        let ready = [pass(SMALL_REST >> 20, 5)];
        assert_eq!(next_step(&ready, &cancel, after), Step::SwitchOver);
        // No cap: no timeout.
        let never = Duration::from_secs(1 << 30);
        assert_eq!(next_step(&over, &NO_CAP, never), Step::Continue);
    }

    /// A switch-over that would have overrun the downtime limit goes back to
    /// pre-copy with a new history: the extra passes start again from none.
    #[test]
    fn a_return_to_pre_copy_resets_the_extra_passes() {
        let mut mib = 300;
        let mut history = vec![pass(mib, 250)];
        for _ in 0..MAX_EXTRA_PASSES {
            mib = mib * 2 / 3;
            history.push(pass(mib, 200));
        }
        assert_eq!(step(&history), Step::SwitchOver);
        // Back to pre-copy: the same rest, a new history.
        let after_return = [pass(mib, 200)];
        assert_eq!(step(&after_return), Step::ExtraPass);
        let after_return = [pass(mib, 200), pass(mib * 2 / 3, 150)];
        assert_eq!(step(&after_return), Step::ExtraPass);
    }
}
