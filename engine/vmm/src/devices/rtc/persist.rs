//! RTC state as it travels in checkpoints and migration streams: the 128
//! CMOS bytes (registers, flags and NVRAM), the index and NMI mask, and the
//! guest's clock as an offset from the host's UTC. As QEMU's
//! `mc146818rtc` section carries the offset from the host clock, the guest's
//! clock on the destination follows that host's wall clock: time a
//! checkpoint spent on disk passes for the guest too. A periodic interrupt
//! starts a fresh period on arrival; an update cycle that came due on the
//! way is delivered once. Everything is checked as hostile before any of it
//! is applied.

use serde::{Deserialize, Serialize};

use super::{a, c, reg, Rtc, CMOS_LEN, MAX_OFFSET_SECS, NS_PER_SEC, REG_D_VRT};
use crate::devices::DeviceStateError;

/// The device's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    /// All of CMOS memory, registers A to D included; the time bytes as the
    /// clock had them at capture.
    pub cmos: Vec<u8>,
    /// The selected byte (0 to 127).
    pub index: u8,
    /// Bit 7 of the last index write.
    #[serde(default)]
    pub nmi_masked: bool,
    /// The guest's clock minus the host's UTC: whole seconds (rounded down)...
    pub offset_secs: i64,
    /// ...and the nanoseconds past them (below 10^9).
    pub offset_subsec_ns: u32,
    /// The guest second whose update cycle the device accounted last.
    #[serde(default)]
    pub update_second: Option<i64>,
}

impl Rtc {
    /// The state to save; the VM must be paused. Flags are brought up to
    /// date first (QEMU's `rtc_pre_save`).
    pub fn state(&self) -> RtcState {
        let now = self.clock.now_ns();
        let mut core = self.lock();
        // A stopped device's line stays as it is: the irqchips may be
        // captured already, and what is due is in the flags.
        if core.stopped == 0 {
            core.process(now);
        }
        core.refresh_time(now);
        RtcState {
            cmos: core.cmos.to_vec(),
            index: core.index,
            nmi_masked: core.nmi_masked,
            offset_secs: core.offset_ns.div_euclid(NS_PER_SEC) as i64,
            offset_subsec_ns: core.offset_ns.rem_euclid(NS_PER_SEC) as u32,
            update_second: Some(core.update_second),
        }
    }

    /// Refuses a state this device could never have been in.
    pub fn check(&self, state: &RtcState) -> Result<(), DeviceStateError> {
        if state.cmos.len() != CMOS_LEN {
            return Err(DeviceStateError::RtcCmosLength {
                len: state.cmos.len(),
                expected: CMOS_LEN,
            });
        }
        if usize::from(state.index) >= CMOS_LEN {
            return Err(DeviceStateError::RtcIndex {
                index: state.index,
                len: CMOS_LEN,
            });
        }
        let (ra, rc, rd) = (
            state.cmos[usize::from(reg::A)],
            state.cmos[usize::from(reg::C)],
            state.cmos[usize::from(reg::D)],
        );
        if ra & a::UIP != 0 {
            return Err(DeviceStateError::RtcUip(ra));
        }
        if rc & !(c::IRQF | c::MASK) != 0 {
            return Err(DeviceStateError::RtcRegisterC(rc));
        }
        if rd != REG_D_VRT {
            return Err(DeviceStateError::RtcRegisterD {
                value: rd,
                expected: REG_D_VRT,
            });
        }
        if i128::from(state.offset_subsec_ns) >= NS_PER_SEC {
            return Err(DeviceStateError::RtcSubsecond(state.offset_subsec_ns));
        }
        if state.offset_secs.unsigned_abs() > MAX_OFFSET_SECS as u64 {
            return Err(DeviceStateError::RtcOffset(state.offset_secs));
        }
        Ok(())
    }

    /// Checks `state` ([`Self::check`]) and applies all of it, or nothing.
    /// The interrupt line is left as the destination's irqchips have it.
    pub fn restore(&self, state: &RtcState) -> Result<(), DeviceStateError> {
        self.check(state)?;
        let now = self.clock.now_ns();
        let mut core = self.lock();
        core.cmos.copy_from_slice(&state.cmos);
        core.index = state.index;
        core.nmi_masked = state.nmi_masked;
        core.offset_ns =
            i128::from(state.offset_secs) * NS_PER_SEC + i128::from(state.offset_subsec_ns);
        let cur = core.guest_second(now);
        // One update cycle at most came due on the way.
        core.update_second = state
            .update_second
            .unwrap_or(cur)
            .clamp(cur.saturating_sub(1), cur);
        core.alarm = None;
        core.reprogram_periodic(now);
        drop(core);
        self.shared.wake.notify_all();
        Ok(())
    }
}
