use std::sync::{Arc, Mutex};

use super::*;

/// Records the SCI's level changes.
#[derive(Debug, Default)]
struct Line(Mutex<Vec<(u32, bool)>>);

impl IrqLine for Line {
    fn set_level(&self, irq: u32, level: bool) {
        self.0.lock().unwrap().push((irq, level));
    }
}

fn device() -> (AcpiPm, Arc<Line>) {
    let line = Arc::new(Line::default());
    (AcpiPm::new(line.clone()), line)
}

/// What SeaBIOS 1.16's `piix4_pm_setup` writes: PMBA 0x600 | 1, PMREGMISC 1.
fn as_seabios_leaves_it(pm: &mut AcpiPm) {
    pm.config_write(PMBA / 4, 0, &(u32::from(PM_BASE) | 1).to_le_bytes());
    pm.config_write(PMREGMISC / 4, 0, &[1]);
}

fn read16(pm: &mut AcpiPm, port: u16) -> u16 {
    let mut b = [0u8; 2];
    pm.io_read(port, &mut b);
    u16::from_le_bytes(b)
}

fn read32(pm: &mut AcpiPm, port: u16) -> u32 {
    let mut b = [0u8; 4];
    pm.io_read(port, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn the_config_space_is_qemus_piix4_pm() {
    let (pm, _) = device();
    let c = pm.config();
    assert_eq!(c.read(0), 0x7113_8086);
    assert_eq!(c.read(2) >> 8, 0x06_80_00, "bridge, other");
    assert_eq!(c.byte(INTERRUPT_PIN), 1);
    assert_eq!(c.byte(DEVACTB + 3), APMC_EN, "SMM reads as set up");
    assert_eq!(c.byte(PMBA), 1);
    assert_eq!(
        pm.pm_base(),
        None,
        "PM I/O is off until the firmware enables it"
    );
}

#[test]
fn the_pm_block_decodes_where_the_firmware_put_it() {
    let (mut pm, _) = device();
    assert!(!pm.claims_port(PM_BASE));
    as_seabios_leaves_it(&mut pm);
    assert_eq!(pm.pm_base(), Some(PM_BASE));
    assert_eq!(pm.config().byte(PMBA) & 1, 1, "bit 0 stays 1");
    assert!(pm.claims_port(PM_BASE) && pm.claims_port(PM_BASE + PM_LEN - 1));
    assert!(!pm.claims_port(PM_BASE + PM_LEN));
    assert!(pm.claims_port(APM_CNT) && pm.claims_port(GPE0_BASE + 3));
    // The base moves when the guest moves it.
    pm.config_write(PMBA / 4, 0, &0xb001u32.to_le_bytes());
    assert_eq!(pm.pm_base(), Some(0xb000));
    assert!(!pm.claims_port(PM_BASE) && pm.claims_port(0xb008));
}

#[test]
fn the_pm_timer_counts_at_3_58_mhz_in_24_bits() {
    let (mut pm, _) = device();
    as_seabios_leaves_it(&mut pm);
    let a = read32(&mut pm, PM_BASE + 8);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let b = read32(&mut pm, PM_BASE + 8);
    assert!(a <= 0xff_ffff && b <= 0xff_ffff);
    let ticks = b.wrapping_sub(a) & 0xff_ffff;
    // 20 ms is 71591 ticks; allow a loaded host's oversleep.
    assert!(ticks >= 71_000, "{ticks} ticks in 20 ms");
}

#[test]
fn acpi_enable_through_apm_sets_sci_en() {
    let (mut pm, _) = device();
    as_seabios_leaves_it(&mut pm);
    assert_eq!(read16(&mut pm, PM_BASE + 4) & pm1::SCI_EN, 0);
    pm.io_write(APM_CNT, &[ACPI_ENABLE]);
    assert_eq!(read16(&mut pm, PM_BASE + 4) & pm1::SCI_EN, pm1::SCI_EN);
    assert_eq!(read16(&mut pm, APM_CNT) & 0xff, u16::from(ACPI_ENABLE));
    pm.io_write(APM_CNT, &[ACPI_DISABLE]);
    assert_eq!(read16(&mut pm, PM_BASE + 4) & pm1::SCI_EN, 0);
}

#[test]
fn the_power_button_raises_the_sci_until_the_os_clears_it() {
    let (mut pm, line) = device();
    as_seabios_leaves_it(&mut pm);
    assert!(!pm.press_power_button(), "not enabled: nothing happens");
    assert!(line.0.lock().unwrap().is_empty());
    pm.io_write(PM_BASE + 2, &pm1::PWRBTN.to_le_bytes());
    assert!(pm.press_power_button());
    assert_eq!(read16(&mut pm, PM_BASE) & pm1::PWRBTN, pm1::PWRBTN);
    assert_eq!(*line.0.lock().unwrap(), [(SCI_IRQ, true)]);
    // Writing 0 changes nothing; writing 1 clears it and drops the SCI.
    pm.io_write(PM_BASE, &0u16.to_le_bytes());
    assert_eq!(read16(&mut pm, PM_BASE) & pm1::PWRBTN, pm1::PWRBTN);
    pm.io_write(PM_BASE, &pm1::PWRBTN.to_le_bytes());
    assert_eq!(read16(&mut pm, PM_BASE), 0);
    assert_eq!(*line.0.lock().unwrap(), [(SCI_IRQ, true), (SCI_IRQ, false)]);
}

#[test]
fn slp_en_with_s5_powers_off_and_other_states_do_not() {
    let (mut pm, _) = device();
    as_seabios_leaves_it(&mut pm);
    let s3 = (1 << pm1::SLP_TYP_SHIFT) | pm1::SLP_EN;
    assert_eq!(pm.io_write(PM_BASE + 4, &s3.to_le_bytes()), PmAction::None);
    let s5 = (SLP_TYP_S5 << pm1::SLP_TYP_SHIFT) | pm1::SLP_EN | pm1::SCI_EN;
    assert_eq!(
        pm.io_write(PM_BASE + 4, &s5.to_le_bytes()),
        PmAction::PowerOff
    );
    assert_eq!(
        read16(&mut pm, PM_BASE + 4) & pm1::SLP_EN,
        0,
        "SLP_EN reads 0"
    );
}

#[test]
fn gpe0_status_clears_by_writing_one_and_raises_the_sci_when_enabled() {
    let (mut pm, line) = device();
    pm.gpe_sts = 0b10;
    pm.io_write(GPE0_BASE + 2, &0b10u16.to_le_bytes());
    assert_eq!(*line.0.lock().unwrap(), [(SCI_IRQ, true)]);
    assert_eq!(read32(&mut pm, GPE0_BASE), 0b10 | (0b10 << 16));
    pm.io_write(GPE0_BASE, &0b10u16.to_le_bytes());
    assert_eq!(read16(&mut pm, GPE0_BASE), 0);
    assert_eq!(line.0.lock().unwrap().last(), Some(&(SCI_IRQ, false)));
}

#[test]
fn the_state_round_trips_and_a_hostile_one_is_refused_whole() {
    let (mut pm, _) = device();
    as_seabios_leaves_it(&mut pm);
    pm.io_write(APM_CNT, &[ACPI_ENABLE]);
    pm.io_write(PM_BASE + 2, &pm1::PWRBTN.to_le_bytes());
    pm.press_power_button();
    let saved = pm.state();

    let (mut other, line) = device();
    other.restore(&saved).unwrap();
    assert_eq!(other.pm_base(), Some(PM_BASE));
    assert_eq!(read16(&mut other, PM_BASE) & pm1::PWRBTN, pm1::PWRBTN);
    assert_eq!(
        *line.0.lock().unwrap(),
        [(SCI_IRQ, true)],
        "the SCI is raised again"
    );
    let timer = read32(&mut other, PM_BASE + 8);
    assert!(
        timer.wrapping_sub(saved.timer) & 0xff_ffff < PM_TIMER_HZ as u32,
        "the timer goes on from {:#x}, not from 0: {timer:#x}",
        saved.timer
    );
    let mut again = other.state();
    again.timer = saved.timer;
    assert_eq!(again, saved);

    for bad in [
        AcpiPmState {
            timer: 1 << 24,
            ..saved.clone()
        },
        AcpiPmState {
            pm1_cnt: pm1::SLP_EN,
            ..saved.clone()
        },
        AcpiPmState {
            config: vec![0; 64],
            ..saved.clone()
        },
        AcpiPmState {
            config: vec![0; 3],
            ..saved.clone()
        },
    ] {
        let (mut fresh, _) = device();
        assert!(fresh.restore(&bad).is_err(), "{bad:?}");
        assert_eq!(
            fresh.state().config,
            device().0.state().config,
            "nothing applied"
        );
    }
}
