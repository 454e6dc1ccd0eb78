//! The PM function's state in checkpoints and streams: its configuration
//! registers (PMBA and PMREGMISC as the firmware set them), the PM1 and GPE0
//! registers, the APM ports and the PM timer's value. Checked as hostile
//! before anything applies.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{pm1, AcpiPm, PM_TIMER_HZ};
use crate::devices::DeviceStateError;

/// The device's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    pub config: Vec<u32>,
    pub pm1_sts: u16,
    pub pm1_en: u16,
    pub pm1_cnt: u16,
    pub gpe_sts: u16,
    pub gpe_en: u16,
    pub apm_cnt: u8,
    pub apm_sts: u8,
    /// The PM timer (24 bits): it goes on from here on the destination.
    pub timer: u32,
}

impl AcpiPm {
    /// The state to save; the VM must be paused.
    pub fn state(&self) -> AcpiPmState {
        AcpiPmState {
            config: self.config.registers(),
            pm1_sts: self.pm1_sts,
            pm1_en: self.pm1_en,
            pm1_cnt: self.pm1_cnt,
            gpe_sts: self.gpe_sts,
            gpe_en: self.gpe_en,
            apm_cnt: self.apm_cnt,
            apm_sts: self.apm_sts,
            timer: self.timer(),
        }
    }

    /// Refuses a state this device could never hold: other read-only
    /// configuration bits, a timer past 24 bits, SLP_EN latched (it reads 0).
    pub fn check(&self, s: &AcpiPmState) -> Result<(), DeviceStateError> {
        let mut probe = super::pm_config();
        probe.restore(&s.config).map_err(|e| e.of("PIIX4 PM"))?;
        if s.timer > 0xff_ffff {
            return Err(DeviceStateError::PmTimer(s.timer));
        }
        if s.pm1_cnt & pm1::SLP_EN != 0 {
            return Err(DeviceStateError::PmSleep(s.pm1_cnt));
        }
        Ok(())
    }

    /// Checks `s` and applies all of it, or nothing.
    pub fn restore(&mut self, s: &AcpiPmState) -> Result<(), DeviceStateError> {
        self.check(s)?;
        self.config
            .restore(&s.config)
            .map_err(|e| e.of("PIIX4 PM"))?;
        self.pm1_sts = s.pm1_sts;
        self.pm1_en = s.pm1_en;
        self.pm1_cnt = s.pm1_cnt;
        self.gpe_sts = s.gpe_sts;
        self.gpe_en = s.gpe_en;
        self.apm_cnt = s.apm_cnt;
        self.apm_sts = s.apm_sts;
        let since = Duration::from_nanos(u64::from(s.timer) * 1_000_000_000 / PM_TIMER_HZ);
        self.timer_base = Instant::now()
            .checked_sub(since)
            .unwrap_or_else(Instant::now);
        self.sci = false;
        self.update_sci();
        Ok(())
    }
}
