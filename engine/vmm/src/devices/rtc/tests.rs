//! The device driven through its registers as Linux's `rtc-cmos` and
//! SeaBIOS drive it, on a clock the tests move.

use std::sync::Mutex;

use super::*;

/// 2024-02-29 13:45:07 UTC, a Thursday.
const LEAP_DAY: i64 = 1_709_214_307;
const SEC: i128 = NS_PER_SEC;

#[derive(Debug, Default)]
struct Line {
    level: Mutex<bool>,
    raises: AtomicU64,
}

impl IrqLine for Line {
    fn set_level(&self, irq: u32, level: bool) {
        assert_eq!(irq, RTC_IRQ);
        let mut l = self.level.lock().unwrap();
        if level && !*l {
            self.raises.fetch_add(1, Ordering::SeqCst);
        }
        *l = level;
    }
}

impl Line {
    fn up(&self) -> bool {
        *self.level.lock().unwrap()
    }
    fn raises(&self) -> u64 {
        self.raises.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct ManualClock(Mutex<i128>);

impl HostClock for ManualClock {
    fn now_ns(&self) -> i128 {
        *self.0.lock().unwrap()
    }
}

fn layout(bytes: u64) -> ferry_boot::MemoryLayout {
    ferry_boot::MemoryLayout::new(bytes).expect("layout")
}

/// A core whose guest clock reads `guest_secs` (+ `phase` ns) at host time
/// `host`, with QEMU's start registers.
fn core_at(host: i128, guest_secs: i64, line: &Arc<Line>) -> Core {
    let cmos = pc_cmos(&layout(256 << 20), 1, "cad").unwrap();
    Core::new(
        cmos,
        i128::from(guest_secs) * SEC - host,
        line.clone(),
        host,
    )
}

fn read(core: &mut Core, now: i128, index: u8) -> u8 {
    core.index = index;
    core.read_data(now)
}

fn write(core: &mut Core, now: i128, index: u8, v: u8) {
    core.index = index;
    core.write_data(now, v);
}

fn time_bytes(core: &mut Core, now: i128) -> [u8; 8] {
    [
        reg::SECONDS,
        reg::MINUTES,
        reg::HOURS,
        reg::DAY_OF_WEEK,
        reg::DAY_OF_MONTH,
        reg::MONTH,
        reg::YEAR,
        reg::CENTURY,
    ]
    .map(|i| read(core, now, i))
}

const HOST: i128 = 1_000 * SEC;

#[test]
fn calendar_conversions_match_known_dates() {
    assert_eq!(parse_date("2006-06-17T16:01:21"), Some(1_150_560_081));
    assert_eq!(parse_date("2006-06-17"), Some(1_150_502_400));
    for bad in [
        "2006-6-17",
        "2006-02-30",
        "1969-12-31",
        "2006-06-17T24:00:00",
        "2006-06-17T1:2:3",
        "yesterday",
        "2006-06-17T16:01:21Z",
    ] {
        assert_eq!(parse_date(bad), None, "{bad}");
    }
    let tm = Tm::from_unix(LEAP_DAY);
    assert_eq!(
        (tm.year, tm.month, tm.day, tm.hour, tm.min, tm.sec, tm.wday),
        (2024, 2, 29, 13, 45, 7, 4)
    );
    for secs in [0, LEAP_DAY, -86_401, 253_402_300_799, 951_782_400] {
        assert_eq!(Tm::from_unix(secs).to_unix(), secs);
    }
    // mktimegm's normalisation: month 13 is January of the next year.
    let jan = Tm {
        year: 2023,
        month: 13,
        ..Tm::from_unix(LEAP_DAY)
    };
    assert_eq!(Tm::from_unix(jan.to_unix()).month, 1);
    assert_eq!(RtcBase::parse("utc"), Ok(RtcBase::Utc));
    assert_eq!(RtcBase::parse("localtime"), Ok(RtcBase::LocalTime));
    assert_eq!(
        RtcBase::parse("2006-06-17T16:01:21"),
        Ok(RtcBase::Date {
            unix_secs: 1_150_560_081
        })
    );
    assert!(RtcBase::parse("now").is_err());
    let date = RtcBase::Date { unix_secs: 100 };
    assert_eq!(date.offset_ns(40 * SEC), Ok(60 * SEC));
}

#[test]
fn the_time_reads_in_bcd_or_binary_with_the_century() {
    let line = Arc::new(Line::default());
    let mut core = core_at(HOST, LEAP_DAY, &line);
    // QEMU's start: 24-hour BCD, VRT.
    assert_eq!(read(&mut core, HOST, reg::B), 0x02);
    assert_eq!(read(&mut core, HOST, reg::D), 0x80);
    assert_eq!(read(&mut core, HOST, reg::A), 0x26);
    assert_eq!(
        time_bytes(&mut core, HOST),
        [0x07, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]
    );
    // The PS/2 century byte is the century.
    assert_eq!(read(&mut core, HOST, reg::IBM_PS2_CENTURY), 0x20);
    // The clock runs with the host's.
    let later = HOST + 61 * SEC;
    assert_eq!(time_bytes(&mut core, later)[..3], [0x08, 0x46, 0x13]);
    write(&mut core, later, reg::B, b::DM | b::H24);
    assert_eq!(time_bytes(&mut core, later), [8, 46, 13, 5, 29, 2, 24, 20]);
}

#[test]
fn twelve_hour_mode_sets_the_pm_bit() {
    let line = Arc::new(Line::default());
    for (secs, want) in [
        (LEAP_DAY, 0x81),                       // 13:45 is 1 PM
        (LEAP_DAY - 13 * 3600 - 45 * 60, 0x12), // 00:00 is 12 AM
        (LEAP_DAY - 3600 - 45 * 60, 0x92),      // 12:00 is 12 PM
        (LEAP_DAY - 4 * 3600, 0x09),            // 09:45 AM
    ] {
        let mut core = core_at(HOST, secs, &line);
        write(&mut core, HOST, reg::B, 0);
        assert_eq!(read(&mut core, HOST, reg::HOURS), want, "{secs}");
    }
    // Binary 12-hour: 1 PM is 0x81 too, 11 PM 0x8b.
    let mut core = core_at(HOST, LEAP_DAY + 10 * 3600, &line);
    write(&mut core, HOST, reg::B, b::DM);
    assert_eq!(read(&mut core, HOST, reg::HOURS), 0x8b);
}

#[test]
fn a_guest_sets_the_time_under_set_and_the_clock_runs_on_from_it() {
    let line = Arc::new(Line::default());
    let mut core = core_at(HOST, LEAP_DAY, &line);
    write(&mut core, HOST, reg::B, b::SET | b::H24);
    // 2006-06-17 16:01:21, BCD.
    for (i, v) in [
        (reg::SECONDS, 0x21),
        (reg::MINUTES, 0x01),
        (reg::HOURS, 0x16),
        (reg::DAY_OF_MONTH, 0x17),
        (reg::MONTH, 0x06),
        (reg::YEAR, 0x06),
        (reg::CENTURY, 0x20),
    ] {
        write(&mut core, HOST, i, v);
    }
    // Frozen while SET: the bytes hold what was written.
    assert_eq!(read(&mut core, HOST + 5 * SEC, reg::SECONDS), 0x21);
    write(&mut core, HOST + 5 * SEC, reg::B, b::H24);
    assert_eq!(
        time_bytes(&mut core, HOST + 7 * SEC)[..3],
        [0x23, 0x01, 0x16]
    );
    // The guest's offset from the host moved with it.
    assert_eq!(core.guest_ns(HOST + 7 * SEC).div_euclid(SEC), 1_150_560_083);
    // A write of one byte while running moves the clock at once.
    write(&mut core, HOST + 7 * SEC, reg::MINUTES, 0x30);
    assert_eq!(
        time_bytes(&mut core, HOST + 8 * SEC)[..3],
        [0x24, 0x30, 0x16]
    );
    // Each setting is reported once (QEMU's RTC_CHANGE), from the base.
    assert!(std::mem::take(&mut core.time_changed));
    assert_eq!(
        (core.offset_ns - core.base_offset_ns).div_euclid(SEC),
        i128::from(1_150_560_081 + 29 * 60 + 2 - 7 - LEAP_DAY)
    );
    // SET clears UIE, as QEMU does.
    write(&mut core, HOST + 8 * SEC, reg::B, b::SET | b::UIE | b::H24);
    assert_eq!(read(&mut core, HOST + 8 * SEC, reg::B), b::SET | b::H24);
}

#[test]
fn uip_reads_set_in_the_last_244_microseconds_of_a_second() {
    let line = Arc::new(Line::default());
    let mut core = core_at(HOST, LEAP_DAY, &line);
    assert_eq!(read(&mut core, HOST + SEC / 2, reg::A), 0x26);
    assert_eq!(read(&mut core, HOST + SEC - 200_000, reg::A), 0xa6);
    assert_eq!(read(&mut core, HOST + SEC - 300_000, reg::A), 0x26);
    // Not while the clock is stopped, and never stored.
    write(&mut core, HOST, reg::B, b::SET | b::H24);
    assert_eq!(read(&mut core, HOST + SEC - 200_000, reg::A), 0x26);
    write(&mut core, HOST, reg::A, 0xa6);
    assert_eq!(core.r(reg::A), 0x26);
}

#[test]
fn update_ended_flags_and_interrupts_clear_on_reading_c() {
    let line = Arc::new(Line::default());
    let mut core = core_at(HOST, LEAP_DAY, &line);
    // Polled with interrupts off: UF, no IRQF, no line.
    assert_eq!(read(&mut core, HOST + SEC / 2, reg::C), 0);
    assert_eq!(read(&mut core, HOST + SEC + 1, reg::C), c::UF);
    assert_eq!(read(&mut core, HOST + SEC + 2, reg::C), 0);
    assert_eq!(line.raises(), 0);
    write(&mut core, HOST + SEC + 2, reg::B, b::UIE | b::H24);
    assert!(!line.up());
    assert_eq!(core.next_deadline(HOST + SEC + 2), Some(HOST + 2 * SEC));
    core.process(HOST + 2 * SEC);
    assert!(line.up());
    assert_eq!(line.raises(), 1);
    // The line is up: nothing more to wake for.
    assert_eq!(core.next_deadline(HOST + 2 * SEC), None);
    assert_eq!(read(&mut core, HOST + 2 * SEC, reg::C), c::IRQF | c::UF);
    assert!(!line.up());
    // A flag already set when its interrupt is enabled raises at once.
    let mut core = core_at(HOST, LEAP_DAY, &line);
    core.process(HOST + SEC);
    write(&mut core, HOST + SEC, reg::B, b::UIE | b::H24);
    assert!(line.up());
    assert_eq!(read(&mut core, HOST + SEC, reg::C), c::IRQF | c::UF);
    // Dividers in reset: no updates.
    write(&mut core, HOST + SEC, reg::A, 0x66);
    core.process(HOST + 5 * SEC);
    assert_eq!(read(&mut core, HOST + 5 * SEC, reg::C), 0);
    assert_eq!(core.next_deadline(HOST + 5 * SEC), None);
}

#[test]
fn the_alarm_fires_on_its_time_with_dont_care_values() {
    let line = Arc::new(Line::default());
    let mut core = core_at(HOST, LEAP_DAY, &line);
    // 13:45:10 (three seconds on), BCD.
    write(&mut core, HOST, reg::SECONDS_ALARM, 0x10);
    write(&mut core, HOST, reg::MINUTES_ALARM, 0x45);
    write(&mut core, HOST, reg::HOURS_ALARM, 0x13);
    write(&mut core, HOST, reg::B, b::AIE | b::H24);
    assert_eq!(core.next_deadline(HOST), Some(HOST + 3 * SEC));
    assert_eq!(read(&mut core, HOST + 2 * SEC, reg::C), c::UF);
    assert!(!line.up());
    core.process(HOST + 3 * SEC);
    assert!(line.up());
    assert_eq!(
        read(&mut core, HOST + 3 * SEC, reg::C),
        c::IRQF | c::AF | c::UF
    );
    // Next: the same time tomorrow.
    assert_eq!(
        core.next_deadline(HOST + 3 * SEC),
        Some(HOST + 3 * SEC + i128::from(SECS_PER_DAY) * SEC)
    );
    // Seconds "don't care": every second of 13:46.
    write(&mut core, HOST + 3 * SEC, reg::SECONDS_ALARM, 0xc0);
    write(&mut core, HOST + 3 * SEC, reg::MINUTES_ALARM, 0x46);
    assert_eq!(core.next_deadline(HOST + 3 * SEC), Some(HOST + 53 * SEC));
    // All "don't care": every second.
    write(&mut core, HOST + 3 * SEC, reg::MINUTES_ALARM, 0xff);
    write(&mut core, HOST + 3 * SEC, reg::HOURS_ALARM, 0xc0);
    assert_eq!(core.next_deadline(HOST + 3 * SEC), Some(HOST + 4 * SEC));
    // An alarm that can never match never fires.
    write(&mut core, HOST + 3 * SEC, reg::SECONDS_ALARM, 0x61);
    assert_eq!(core.next_deadline(HOST + 3 * SEC), None);
    assert_eq!(read(&mut core, HOST + 9 * SEC, reg::C), c::UF);
    // 12-hour mode: 1 PM is 0x81.
    let mut core = core_at(HOST, LEAP_DAY, &line);
    write(&mut core, HOST, reg::B, 0);
    write(&mut core, HOST, reg::SECONDS_ALARM, 0x00);
    write(&mut core, HOST, reg::MINUTES_ALARM, 0x50);
    write(&mut core, HOST, reg::HOURS_ALARM, 0x81);
    assert_eq!(core.next_alarm(LEAP_DAY), Some(LEAP_DAY + 4 * 60 + 53));
}

#[test]
fn periodic_interrupts_follow_the_rate_of_register_a() {
    let line = Arc::new(Line::default());
    let mut core = core_at(HOST, LEAP_DAY, &line);
    // Rate 15: 2 Hz. Without PIE, nothing runs.
    write(&mut core, HOST, reg::A, 0x2f);
    assert_eq!(core.periodic_next, None);
    write(&mut core, HOST, reg::B, b::PIE | b::H24);
    let first = core.next_deadline(HOST).expect("a periodic deadline");
    assert!((first - (HOST + SEC / 2)).abs() <= 1, "{first}");
    core.process(first - 1_000);
    assert!(!line.up());
    core.process(first);
    assert!(line.up());
    assert_eq!(read(&mut core, first, reg::C), c::IRQF | c::PF);
    assert!(!line.up());
    // Ticks missed (the guest did not look) are dropped, not queued.
    let late = first + 3 * SEC;
    assert_eq!(read(&mut core, late, reg::C), c::IRQF | c::PF | c::UF);
    assert_eq!(read(&mut core, late, reg::C), 0);
    let next = core.next_deadline(late).unwrap();
    assert!(next > late && next <= late + SEC / 2, "{next}");
    // Rate 6 (1024 Hz) and rates 1 and 2 (as 8 and 9: 256 and 128 Hz).
    for (rate, cycles) in [(6, 32), (1, 128), (2, 256), (3, 4), (0, 0)] {
        write(&mut core, late, reg::A, 0x20 | rate);
        assert_eq!(core.period_cycles(), cycles, "rate {rate}");
    }
    assert_eq!(core.periodic_next, None);
    // PIE off stops it.
    write(&mut core, late, reg::A, 0x26);
    write(&mut core, late, reg::B, b::H24);
    assert_eq!(core.periodic_next, None);
}

#[test]
fn pc_cmos_has_qemus_memory_cpu_and_boot_bytes() {
    let at = |cmos: &[u8; CMOS_LEN], i: u8| cmos[usize::from(i)];
    let word = |cmos: &[u8; CMOS_LEN], i: u8| u16::from_le_bytes([at(cmos, i), at(cmos, i + 1)]);
    // 256 MiB, 4 vCPUs, QEMU's default boot order.
    let cmos = pc_cmos(&layout(256 << 20), 4, "cad").unwrap();
    assert_eq!(at(&cmos, nvram::FLOPPY), 0);
    assert_eq!(at(&cmos, nvram::EQUIPMENT), 0x06);
    assert_eq!(word(&cmos, nvram::BASE_MEM), 640);
    assert_eq!(word(&cmos, nvram::EXT_MEM), 65_535);
    assert_eq!(word(&cmos, nvram::EXT_MEM2), 65_535);
    assert_eq!(word(&cmos, nvram::MEM_ABOVE_16M), 3840);
    assert_eq!(cmos[0x5b..0x5e], [0, 0, 0]);
    assert_eq!(at(&cmos, nvram::CPUS), 3);
    // c (2) first, a (1) second, d (3) third.
    assert_eq!(at(&cmos, nvram::BOOT_FIRST), 0x12);
    assert_eq!(at(&cmos, nvram::BOOT_THIRD), 0x30);
    assert_eq!(cmos[0x0a..0x0e], [0x26, 0x02, 0x00, 0x80]);
    let sum: u16 = cmos[0x10..=0x2d].iter().map(|&b| u16::from(b)).sum();
    assert_eq!(u16::from_be_bytes([cmos[0x2e], cmos[0x2f]]), sum);
    assert_ne!(sum, 0);
    // 16 MiB: extended memory below the cap, nothing above 16 MiB.
    let cmos = pc_cmos(&layout(16 << 20), 1, "c").unwrap();
    assert_eq!(word(&cmos, nvram::EXT_MEM), 15 * 1024);
    assert_eq!(word(&cmos, nvram::MEM_ABOVE_16M), 0);
    assert_eq!(at(&cmos, nvram::CPUS), 0);
    assert_eq!(at(&cmos, nvram::BOOT_FIRST), 0x02);
    assert_eq!(at(&cmos, nvram::BOOT_THIRD), 0x00);
    // 6 GiB: 3 GiB below the hole, 3 GiB above 4 GiB in 64 KiB units.
    let cmos = pc_cmos(&layout(6 << 30), 64, "ndc").unwrap();
    assert_eq!(word(&cmos, nvram::MEM_ABOVE_16M), 48_896);
    assert_eq!(cmos[0x5b..0x5e], [0x00, 0xc0, 0x00]);
    assert_eq!(at(&cmos, nvram::CPUS), 63);
    assert_eq!(at(&cmos, nvram::BOOT_FIRST), 0x34);
    assert_eq!(at(&cmos, nvram::BOOT_THIRD), 0x20);
    // QEMU's refusals.
    assert_eq!(
        pc_cmos(&layout(16 << 20), 1, "cdna"),
        Err(RtcError::TooManyBootDevices {
            order: "cdna".into()
        })
    );
    assert_eq!(
        pc_cmos(&layout(16 << 20), 1, "cx"),
        Err(RtcError::BadBootDevice { device: 'x' })
    );
    assert_eq!(pc_cmos(&layout(16 << 20), 1, "").unwrap()[0x3d], 0);
}

fn manual_rtc(at: i128, line: &Arc<Line>) -> (Rtc, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock(Mutex::new(at)));
    let cmos = pc_cmos(&layout(256 << 20), 2, "cad").unwrap();
    let offset = i128::from(LEAP_DAY) * SEC - at;
    let rtc = Rtc::new(cmos, offset, line.clone(), clock.clone()).expect("RTC");
    (rtc, clock)
}

fn port_read(rtc: &Rtc, index: u8) -> u8 {
    rtc.io_write(INDEX_PORT, &[index]);
    let mut v = [0u8];
    rtc.io_read(DATA_PORT, &mut v);
    v[0]
}

#[test]
fn the_ports_keep_the_nmi_mask_and_nvram() {
    let line = Arc::new(Line::default());
    let (rtc, _) = manual_rtc(HOST, &line);
    rtc.io_write(INDEX_PORT, &[0x80 | 0x40]);
    assert!(rtc.nmi_masked());
    rtc.io_write(DATA_PORT, &[0x5a]);
    assert_eq!(rtc.cmos_byte(0x40), 0x5a);
    rtc.io_write(INDEX_PORT, &[0x40]);
    assert!(!rtc.nmi_masked());
    let mut v = [0u8];
    rtc.io_read(INDEX_PORT, &mut v);
    assert_eq!(v, [0xff], "the index port is write-only");
    rtc.io_read(DATA_PORT, &mut v);
    assert_eq!(v, [0x5a]);
    // Registers C and D take no writes.
    rtc.io_write(INDEX_PORT, &[reg::D]);
    rtc.io_write(DATA_PORT, &[0]);
    assert_eq!(port_read(&rtc, reg::D), 0x80);
    assert_eq!(port_read(&rtc, reg::HOURS), 0x13);
    assert!(Rtc::claims_port(0x70) && Rtc::claims_port(0x71) && !Rtc::claims_port(0x72));
    assert_eq!(rtc.shape_names(), ["rtc"]);
}

#[test]
fn state_round_trips_and_the_clock_follows_the_host() {
    let line = Arc::new(Line::default());
    let (rtc, clock) = manual_rtc(HOST, &line);
    rtc.io_write(INDEX_PORT, &[0x50]);
    rtc.io_write(DATA_PORT, &[0xab]);
    rtc.io_write(INDEX_PORT, &[0x80 | reg::C]);
    let state = rtc.state();
    assert_eq!(state.index, reg::C);
    assert!(state.nmi_masked);
    assert_eq!(state.cmos[0x50], 0xab);
    assert_eq!(
        state.offset_secs,
        (i128::from(LEAP_DAY) - HOST / SEC) as i64
    );
    // Through serde, as a checkpoint carries it.
    let bytes = serde_json::to_vec(&state).unwrap();
    let back: RtcState = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(back, state);

    // A destination whose host clock is 100 s later: the guest's too.
    let (dest, dest_clock) = manual_rtc(HOST + 77 * SEC, &line);
    *dest_clock.0.lock().unwrap() = HOST + 100 * SEC;
    dest.restore(&back).expect("restore");
    *clock.0.lock().unwrap() = HOST + 100 * SEC;
    // The same but for the update cycle: the source is stopped and has
    // not counted the last 100 s, the destination counts one of them.
    let (mut here, there) = (rtc.state(), dest.state());
    assert_eq!(here.update_second, Some(LEAP_DAY));
    assert_eq!(there.update_second, Some(LEAP_DAY + 99));
    here.update_second = there.update_second;
    assert_eq!(here, there);
    assert_eq!(dest.guest_time_ns(), i128::from(LEAP_DAY + 100) * SEC);
    assert_eq!(port_read(&dest, 0x50), 0xab);
    // A restore is no setting of the clock by the guest.
    assert_eq!(dest.take_time_change(), None);
    // A guest setting the time under SET: one change, seconds from the base.
    for (i, v) in [
        (reg::B, b::SET | b::H24),
        (reg::YEAR, 0x25),
        (reg::B, b::H24),
    ] {
        dest.io_write(INDEX_PORT, &[i]);
        dest.io_write(DATA_PORT, &[v]);
    }
    // 2025-02-29 is 2025-03-01 (mktimegm), 366 days on; the destination's
    // base was 77 s behind the source's clock.
    assert_eq!(dest.take_time_change(), Some(366 * 86_400 + 77));
    assert_eq!(dest.take_time_change(), None);
}

#[test]
fn hostile_state_is_refused_and_changes_nothing() {
    let line = Arc::new(Line::default());
    let (rtc, _) = manual_rtc(HOST, &line);
    let good = rtc.state();
    type Spoil = fn(&mut RtcState);
    let cases: Vec<(Spoil, &str)> = vec![
        (|s| s.cmos.truncate(64), "64 bytes of CMOS"),
        (|s| s.cmos.push(0), "129 bytes"),
        (|s| s.index = 0x80, "index 0x80"),
        (|s| s.cmos[0x0a] |= 0x80, "UIP"),
        (|s| s.cmos[0x0c] = 0x01, "register C"),
        (|s| s.cmos[0x0d] = 0x00, "register D"),
        (|s| s.offset_subsec_ns = 1_000_000_000, "ns past a second"),
        (|s| s.offset_secs = i64::MIN, "beyond any date"),
    ];
    for (spoil, words) in cases {
        let mut bad = good.clone();
        bad.cmos[0x50] = 0x77;
        spoil(&mut bad);
        let err = rtc.restore(&bad).unwrap_err().to_string();
        assert!(err.contains(words), "{err} (wanted {words})");
        assert_eq!(rtc.state(), good, "a refused state changed the device");
    }
}

#[test]
fn a_restore_delivers_one_update_that_came_due_on_the_way() {
    let line = Arc::new(Line::default());
    let (rtc, clock) = manual_rtc(HOST, &line);
    let state = rtc.state();
    *clock.0.lock().unwrap() = HOST + 3600 * SEC;
    rtc.restore(&state).unwrap();
    assert_eq!(port_read(&rtc, reg::C), c::UF);
    assert_eq!(port_read(&rtc, reg::C), 0);
}

/// The thread, on the host's clock: it does not wake while nothing is
/// enabled, raises a periodic interrupt once PIE is set, and stops with the
/// device.
#[test]
fn the_thread_raises_periodic_interrupts_and_sleeps_otherwise() {
    let line = Arc::new(Line::default());
    let cmos = pc_cmos(&layout(16 << 20), 1, "cad").unwrap();
    let rtc = Rtc::new(cmos, 0, line.clone(), Arc::new(SystemClock)).expect("RTC");
    rtc.set_stopped(STOP_PAUSED, false);
    std::thread::sleep(Duration::from_millis(100));
    // At most the wake-up of the set_stopped call itself.
    assert!(rtc.wakeups() <= 1, "{} wake-ups", rtc.wakeups());
    assert_eq!(line.raises(), 0);
    // 1024 Hz periodic, as Linux's rtc-cmos does for hpet emulation.
    rtc.io_write(INDEX_PORT, &[reg::B]);
    rtc.io_write(DATA_PORT, &[b::PIE | b::H24]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while line.raises() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no periodic interrupt"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(line.up());
    assert_eq!(port_read(&rtc, reg::C) & (c::IRQF | c::PF), c::IRQF | c::PF);
    // A stopped device raises nothing.
    rtc.set_stopped(STOP_HELD, true);
    let _ = port_read(&rtc, reg::C);
    let raises = line.raises();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(line.raises(), raises);
    rtc.shutdown();
    rtc.shutdown();
}

/// A VM with an RTC names it in its shape (a destination without it is
/// refused by name, and the other way round) and carries its CMOS and clock
/// through a checkpoint: NVRAM the guest wrote, the boot order, the index.
#[test]
fn a_vm_carries_its_rtc_through_a_checkpoint() {
    use crate::devices::serial::SinkSpec;
    use crate::persist::RestoreOptions;
    use crate::vm::{Vm, VmConfig};
    use ferry_kvm::Backing;

    let rtc = RtcConfig {
        base: RtcBase::Date {
            unix_secs: 1_150_560_081,
        },
        boot_order: "dc".into(),
    };
    let config = |rtc: Option<RtcConfig>| VmConfig {
        mem_bytes: 64 << 20,
        vcpus: 2,
        backing: Backing::Anonymous,
        serial: SinkSpec::Null,
        cpu: crate::cpu::model::CpuModel::Host,
        virtio: Vec::new(),
        ide: Vec::new(),
        fw_cfg: None,
        firmware: None,
        rtc,
    };
    let vm = Vm::create(config(Some(rtc.clone()))).expect("a VM with an RTC");
    let dev = vm.rtc().expect("an RTC").clone();
    assert_eq!(dev.cmos_byte(nvram::CPUS), 1);
    assert_eq!(dev.cmos_byte(nvram::BOOT_FIRST), 0x23);
    // 48 MiB above 16 MiB in 64 KiB units.
    assert_eq!(dev.cmos_byte(nvram::MEM_ABOVE_16M), 0x00);
    assert_eq!(dev.cmos_byte(nvram::MEM_ABOVE_16M + 1), 0x03);
    // The guest's clock started at the given date (2006, BCD).
    assert_eq!(dev.cmos_byte(reg::YEAR), 0x06);
    assert_eq!(dev.cmos_byte(reg::CENTURY), 0x20);
    dev.io_write(INDEX_PORT, &[0x60]);
    dev.io_write(DATA_PORT, &[0xa5]);
    dev.io_write(INDEX_PORT, &[0x80 | 0x61]);
    assert!(vm.shape().devices.contains(&"rtc".to_string()));
    let saved = vm.capture_devices().unwrap();
    let state = saved.rtc.clone().expect("RTC state");
    assert_eq!(
        (state.index, state.nmi_masked, state.cmos[0x60]),
        (0x61, true, 0xa5)
    );
    let (stream, _) = crate::persist::save(&vm, Vec::new()).unwrap();

    let opts = |rtc: Option<RtcConfig>| RestoreOptions {
        backing: Backing::Anonymous,
        serial: SinkSpec::Null,
        expect_mem_bytes: None,
        expect_vcpus: None,
        autostart: false,
        virtio: Vec::new(),
        ide: Vec::new(),
        fw_cfg: None,
        firmware: None,
        rtc,
        on_postcopy: None,
    };
    let err = crate::persist::restore(std::io::Cursor::new(stream.clone()), &opts(None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("rtc"), "{err}");
    // The destination's own base and boot order do not matter: the clock
    // and CMOS come from the checkpoint.
    let other = crate::persist::restore(
        std::io::Cursor::new(stream),
        &opts(Some(RtcConfig::default())),
    )
    .expect("restore");
    let back = other.rtc().expect("an RTC");
    assert_eq!(back.cmos_byte(0x60), 0xa5);
    assert_eq!(back.cmos_byte(nvram::BOOT_FIRST), 0x23);
    assert!(back.nmi_masked());
    assert_eq!(back.cmos_byte(reg::YEAR), 0x06);
    let drift = back.guest_time_ns() - dev.guest_time_ns();
    assert!(drift.abs() < 5 * SEC, "{drift} ns apart");
    let restored = other.capture_devices().unwrap().rtc.unwrap();
    assert_eq!(
        (restored.offset_secs, restored.cmos[0x10..0x60].to_vec()),
        (state.offset_secs, state.cmos[0x10..0x60].to_vec())
    );

    // A checkpoint without an RTC does not load on a VM with one.
    let plain = Vm::create(config(None)).expect("a VM without an RTC");
    assert!(plain.rtc().is_none());
    assert!(plain.capture_devices().unwrap().rtc.is_none());
    let (stream, _) = crate::persist::save(&plain, Vec::new()).unwrap();
    let err = crate::persist::restore(
        std::io::Cursor::new(stream),
        &opts(Some(RtcConfig::default())),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("rtc"), "{err}");
}

/// The periodic interrupt reaches KVM's in-kernel PIC: IRQ 8 is the slave
/// PIC's input 0, whose request bit the device's thread sets (on an edge,
/// as the ISA RTC's) once PIE is on, and a read of register C lowers.
#[test]
fn the_periodic_interrupt_reaches_the_vms_slave_pic() {
    use crate::devices::serial::SinkSpec;
    use crate::vm::{Vm, VmConfig};

    let vm = Vm::create(VmConfig {
        mem_bytes: 16 << 20,
        vcpus: 1,
        backing: ferry_kvm::Backing::Anonymous,
        serial: SinkSpec::Null,
        cpu: crate::cpu::model::CpuModel::Host,
        virtio: Vec::new(),
        ide: Vec::new(),
        fw_cfg: None,
        firmware: None,
        rtc: Some(RtcConfig::default()),
    })
    .expect("a VM with an RTC");
    // kvm_irqchip as bytes: chip_id, pad, then kvm_pic_state (last_irr, irr).
    let slave_irr = |vm: &Vm| -> u8 {
        let chip = vm.capture_vm().expect("irqchips").pic_slave;
        let bytes: Vec<u8> = serde_json::from_value(serde_json::to_value(chip).unwrap()).unwrap();
        bytes[9]
    };
    assert_eq!(slave_irr(&vm) & 1, 0);
    let rtc = vm.rtc().expect("an RTC").clone();
    // Only the vCPUs stay stopped: the RTC runs as after a resume.
    rtc.set_stopped(STOP_PAUSED, false);
    rtc.io_write(INDEX_PORT, &[reg::B]);
    rtc.io_write(DATA_PORT, &[b::PIE | b::H24]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while slave_irr(&vm) & 1 == 0 {
        assert!(std::time::Instant::now() < deadline, "IRQ 8 never came");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(port_read(&rtc, reg::C) & (c::IRQF | c::PF), c::IRQF | c::PF);
    rtc.set_stopped(STOP_PAUSED, true);
}

#[test]
fn a_reset_keeps_the_clock_and_nvram_and_drops_enables_and_flags() {
    let line = Arc::new(Line::default());
    let (rtc, clock) = manual_rtc(HOST, &line);
    for (i, v) in [(0x0f, 0x05), (0x40, 0x77), (reg::A, 0x2f)] {
        rtc.io_write(INDEX_PORT, &[i]);
        rtc.io_write(DATA_PORT, &[v]);
    }
    rtc.io_write(INDEX_PORT, &[reg::B]);
    rtc.io_write(DATA_PORT, &[b::PIE | b::AIE | b::UIE | b::H24]);
    *clock.0.lock().unwrap() = HOST + 2 * SEC;
    assert!(rtc.cmos_byte(reg::C) & c::IRQF != 0);
    assert!(line.up());
    rtc.reset();
    assert!(!line.up());
    assert_eq!(rtc.cmos_byte(reg::B), b::UIE | b::H24);
    assert_eq!(rtc.cmos_byte(reg::C), 0);
    assert_eq!(rtc.cmos_byte(0x0f), 0);
    assert_eq!(rtc.cmos_byte(0x40), 0x77);
    assert_eq!(rtc.cmos_byte(reg::A), 0x2f);
    assert_eq!(rtc.guest_time_ns(), i128::from(LEAP_DAY + 2) * SEC);
    // The S3 resume status survives.
    rtc.set_cmos_byte(0x0f, 0xfe);
    rtc.reset();
    assert_eq!(rtc.cmos_byte(0x0f), 0xfe);
}
