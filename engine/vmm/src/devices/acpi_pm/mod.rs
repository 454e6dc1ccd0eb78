//! The PIIX4 power-management function (PCI 00:01.3, 8086:7113), as QEMU's
//! `PIIX4_PM` on the `pc` machine: the ACPI fixed hardware a firmware
//! programs and an OS drives.
//!
//! - **PCI configuration:** PMBA (0x40, the PM I/O base; SeaBIOS 1.16 writes
//!   0x600), PMREGMISC (0x80, bit 0 enables it), DEVACTB (0x58) with APMC_EN
//!   set from reset, which tells SeaBIOS that SMM is set up (ferry has none,
//!   as QEMU says when SMM is off).
//! - **PM I/O block** at PMBA, 64 bytes: PM1 status (write 1 to clear), PM1
//!   enable, PM1 control (SCI_EN; SLP_TYP and SLP_EN: S5 powers the machine
//!   off) and the 24-bit ACPI PM timer at 3.579545 MHz.
//! - **GPE0** at 0xafe0 (status and enable, 2 bytes each), where QEMU's
//!   piix4 has it.
//! - **APM** ports 0xb2/0xb3: writing ACPI_ENABLE (0xf1) or ACPI_DISABLE
//!   (0xf0) to 0xb2 sets or clears SCI_EN, as QEMU does without SMM.
//! - **SCI** on ISA IRQ 9, a level: high while an enabled status bit (power
//!   button, timer, global lock, RTC, or a GPE) is set.
//! - The **power button** (`system_powerdown`) sets PWRBTN_STS when the OS
//!   enabled it, as QEMU's `acpi_pm1_evt_power_down`.
//!
//! Not modelled: the SMBus (its base is kept, it decodes nothing), the PM
//! timer's overflow interrupt (TMR_STS), S3 and S4 (a sleep request other
//! than S5 is logged and ignored).

mod persist;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Instant;

pub use persist::AcpiPmState;

use crate::devices::ide::IrqLine;
use crate::devices::pci::ConfigSpace;

/// PCI function of the PM device in the PIIX3's slot.
pub const PM_FUNCTION: u8 = 3;
/// The SCI's ISA interrupt.
pub const SCI_IRQ: u32 = 9;
/// Where SeaBIOS 1.16 puts the PM I/O block (and ferry's ACPI tables say so).
pub const PM_BASE: u16 = 0x600;
/// Bytes of the PM I/O block.
pub const PM_LEN: u16 = 64;
/// QEMU's piix4 GPE0 block (status, then enable).
pub const GPE0_BASE: u16 = 0xafe0;
pub const GPE0_LEN: u16 = 4;
/// APM control (SMI command) and status ports.
pub const APM_CNT: u16 = 0xb2;
pub const APM_STS: u16 = 0xb3;
/// SMI command values that turn ACPI mode on and off (the FADT says so).
pub const ACPI_ENABLE: u8 = 0xf1;
pub const ACPI_DISABLE: u8 = 0xf0;
/// The PM timer's frequency.
pub const PM_TIMER_HZ: u64 = 3_579_545;

/// PM1 status and enable bits.
pub mod pm1 {
    pub const TMR: u16 = 1 << 0;
    pub const GBL: u16 = 1 << 5;
    pub const PWRBTN: u16 = 1 << 8;
    pub const RTC: u16 = 1 << 10;
    pub const WAK: u16 = 1 << 15;
    /// Enable bits that raise the SCI.
    pub const SCI_SOURCES: u16 = TMR | GBL | PWRBTN | RTC;
    /// PM1 control: SCI_EN, SLP_TYP (bits 10-12), SLP_EN.
    pub const SCI_EN: u16 = 1 << 0;
    pub const SLP_TYP_SHIFT: u16 = 10;
    pub const SLP_EN: u16 = 1 << 13;
}

/// SLP_TYP of S5 (soft off) on QEMU's piix4 (its `\_S5` package says 0).
pub const SLP_TYP_S5: u16 = 0;

/// Configuration registers.
const PMBA: usize = 0x40;
const DEVACTB: usize = 0x58;
const APMC_EN: u8 = 0x02;
const PMREGMISC: usize = 0x80;
const SMBBA: usize = 0x90;
const SMBHSTCFG: usize = 0xd2;
const INTERRUPT_PIN: usize = 0x3d;

/// What a guest access asks of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmAction {
    None,
    /// SLP_EN with S5: power off.
    PowerOff,
}

/// The PIIX4 PM function.
#[derive(Debug)]
pub struct AcpiPm {
    config: ConfigSpace,
    pm1_sts: u16,
    pm1_en: u16,
    pm1_cnt: u16,
    gpe_sts: u16,
    gpe_en: u16,
    apm_cnt: u8,
    apm_sts: u8,
    /// The PM timer counts from here (moved on restore so it goes on).
    timer_base: Instant,
    sci: bool,
    irq: Arc<dyn IrqLine>,
}

/// The function's configuration space at reset (QEMU's `piix4_pm_realize`
/// and `piix4_reset`).
fn pm_config() -> ConfigSpace {
    let mut c = ConfigSpace::new(0x8086, 0x7113, 0x06_80_00, 0x03);
    c.set_subsystem(0x1af4, 0x1100);
    c.set_byte(INTERRUPT_PIN, 0x01);
    // PMBA: bits 15:6 the base, bit 0 reads 1 (I/O space).
    c.set_byte(PMBA, 0x01);
    c.set_writable(PMBA, 0xc0);
    c.set_writable(PMBA + 1, 0xff);
    // DEVACTB: "SMM already set up" (QEMU without SMM).
    c.set_byte(DEVACTB + 3, APMC_EN);
    c.set_writable(PMREGMISC, 0x01);
    c.set_byte(SMBBA, 0x01);
    c.set_writable(SMBBA, 0xf0);
    c.set_writable(SMBBA + 1, 0xff);
    c.set_writable(SMBHSTCFG, 0x0f);
    c
}

impl AcpiPm {
    /// The function at reset; the SCI goes to `irq`.
    pub fn new(irq: Arc<dyn IrqLine>) -> Self {
        Self {
            config: pm_config(),
            pm1_sts: 0,
            pm1_en: 0,
            pm1_cnt: 0,
            gpe_sts: 0,
            gpe_en: 0,
            apm_cnt: 0,
            apm_sts: 0,
            timer_base: Instant::now(),
            sci: false,
            irq,
        }
    }

    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    pub fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data);
    }

    /// The PM I/O base, when the firmware enabled it.
    pub fn pm_base(&self) -> Option<u16> {
        if self.config.byte(PMREGMISC) & 1 == 0 {
            return None;
        }
        let base = u16::from(self.config.byte(PMBA)) | (u16::from(self.config.byte(PMBA + 1)) << 8);
        Some(base & 0xffc0)
    }

    /// Whether a port access belongs to the device.
    pub fn claims_port(&self, port: u16) -> bool {
        port == APM_CNT
            || port == APM_STS
            || (GPE0_BASE..GPE0_BASE + GPE0_LEN).contains(&port)
            || self
                .pm_base()
                .is_some_and(|b| (b..b + PM_LEN).contains(&port))
    }

    /// The PM timer's value now.
    fn timer(&self) -> u32 {
        let ns = self.timer_base.elapsed().as_nanos();
        ((ns * u128::from(PM_TIMER_HZ) / 1_000_000_000) & 0xff_ffff) as u32
    }

    /// A guest read of `data.len()` bytes at `port`.
    pub fn io_read(&mut self, port: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_byte(port.wrapping_add(i as u16));
        }
    }

    fn read_byte(&self, port: u16) -> u8 {
        let byte = |v: u32, n: u16| (v >> (8 * n)) as u8;
        if port == APM_CNT {
            return self.apm_cnt;
        }
        if port == APM_STS {
            return self.apm_sts;
        }
        if (GPE0_BASE..GPE0_BASE + GPE0_LEN).contains(&port) {
            let v = u32::from(self.gpe_sts) | (u32::from(self.gpe_en) << 16);
            return byte(v, port - GPE0_BASE);
        }
        let Some(base) = self.pm_base() else {
            return 0xff;
        };
        match port.wrapping_sub(base) {
            off @ 0..=3 => byte(
                u32::from(self.pm1_sts) | (u32::from(self.pm1_en) << 16),
                off,
            ),
            off @ 4..=5 => byte(u32::from(self.pm1_cnt), off - 4),
            off @ 8..=11 => byte(self.timer(), off - 8),
            _ => 0,
        }
    }

    /// A guest write at `port`; a power-off request comes back as an action.
    pub fn io_write(&mut self, port: u16, data: &[u8]) -> PmAction {
        let value = data
            .iter()
            .rev()
            .fold(0u32, |acc, &b| (acc << 8) | u32::from(b));
        let mut action = PmAction::None;
        if port == APM_CNT {
            self.apm_cnt = value as u8;
            match self.apm_cnt {
                ACPI_ENABLE => self.pm1_cnt |= pm1::SCI_EN,
                ACPI_DISABLE => self.pm1_cnt &= !pm1::SCI_EN,
                _ => {}
            }
        } else if port == APM_STS {
            self.apm_sts = value as u8;
        } else if (GPE0_BASE..GPE0_BASE + GPE0_LEN).contains(&port) {
            for (i, &b) in data.iter().enumerate() {
                let at = port - GPE0_BASE + i as u16;
                let shift = 8 * (at % 2);
                match at {
                    0 | 1 => self.gpe_sts &= !(u16::from(b) << shift),
                    2 | 3 => {
                        self.gpe_en = (self.gpe_en & !(0xff << shift)) | (u16::from(b) << shift)
                    }
                    _ => {}
                }
            }
        } else if let Some(base) = self.pm_base() {
            for (i, &b) in data.iter().enumerate() {
                let at = port.wrapping_sub(base).wrapping_add(i as u16);
                let shift = 8 * (at % 2);
                match at {
                    // Status: write 1 to clear.
                    0 | 1 => self.pm1_sts &= !(u16::from(b) << shift),
                    2 | 3 => {
                        self.pm1_en = (self.pm1_en & !(0xff << shift)) | (u16::from(b) << shift)
                    }
                    4 | 5 => {
                        let cnt = (self.pm1_cnt & !(0xff << shift)) | (u16::from(b) << shift);
                        action = self.write_cnt(cnt);
                    }
                    _ => {}
                }
            }
        }
        self.update_sci();
        action
    }

    /// PM1 control: SLP_EN starts the sleep state SLP_TYP names.
    fn write_cnt(&mut self, cnt: u16) -> PmAction {
        self.pm1_cnt = cnt & !pm1::SLP_EN;
        if cnt & pm1::SLP_EN == 0 {
            return PmAction::None;
        }
        let typ = (cnt >> pm1::SLP_TYP_SHIFT) & 7;
        if typ == SLP_TYP_S5 {
            return PmAction::PowerOff;
        }
        tracing::warn!("ACPI sleep type {typ} requested: ferry has only S5 (soft off)");
        PmAction::None
    }

    /// Presses the power button: the OS sees PWRBTN_STS and an SCI if it
    /// enabled the button (QEMU's `system_powerdown`). Returns whether it did.
    pub fn press_power_button(&mut self) -> bool {
        if self.pm1_en & pm1::PWRBTN == 0 {
            return false;
        }
        self.pm1_sts |= pm1::PWRBTN;
        self.update_sci();
        true
    }

    fn update_sci(&mut self) {
        let level = (self.pm1_sts & self.pm1_en & pm1::SCI_SOURCES) != 0
            || (self.gpe_sts & self.gpe_en) != 0;
        if level != self.sci {
            self.sci = level;
            self.irq.set_level(SCI_IRQ, level);
        }
    }
}
