//! The PC's real-time clock and CMOS memory: a Motorola MC146818 as QEMU's
//! `mc146818rtc` on the `pc` machine. Port 0x70 takes the index (bit 7 is the
//! NMI mask, kept but without effect, as in QEMU; reads give 0xff), port 0x71
//! reads and writes the selected byte of 128. Bytes 0x00-0x0d are the clock:
//! time, alarm and registers A to D; 0x32 is the century (QEMU's
//! `RTC_CENTURY`; 0x37, the IBM PS/2 century byte, aliases it); the rest is
//! NVRAM, filled at start as QEMU's `pc_cmos_init` does (see [`pc_cmos`]).
//!
//! # The guest's clock
//! The guest's time is the host's UTC plus an offset (`-rtc base=`: zero,
//! the host's local-time offset, or a given date's distance from now). The
//! time registers are computed from it on every read while the clock runs
//! (register B's SET clear, the dividers of register A running) in BCD or
//! binary (B's DM) and 12 or 24 hours (B's 24/12); a guest write of the
//! time moves the offset, keeping the sub-second phase, as QEMU's
//! `rtc_set_time` does. Register A's UIP reads set for the 244 µs (eight
//! cycles of the 32.768 kHz clock) before each second ends. This is QEMU's
//! `clock=host`: QEMU migrates the same offset from the host clock, so a
//! guest's clock follows the destination's wall clock after a migration or
//! a restore and does not lose the time a checkpoint spent on disk.
//!
//! # Interrupts
//! IRQ 8, as QEMU raises it: the line goes up when a flag of register C
//! whose interrupt register B enables is newly set (IRQF with it), and down
//! when the guest reads C (which clears it) or disables the interrupts.
//! Periodic (PF, register A's rate, on the 32.768 kHz grid of the host
//! clock), alarm (AF, with "don't care" values 0xC0-0xFF) and update-ended
//! (UF, each second of the guest's clock). Flags are computed lazily, on
//! each port access, from the clock: a guest polling C sees them with every
//! interrupt disabled. A thread per RTC only raises the line in time: it
//! sleeps until the next event that could raise it and not at all while no
//! interrupt is enabled (or the line is up already), and while the VM is
//! stopped ([`Rtc::set_stopped`]) it touches nothing. Lost periodic ticks are
//! dropped (QEMU's default `lost_tick_policy=discard`; ferry has no `slew`).

mod persist;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

pub use persist::RtcState;

use crate::devices::ide::IrqLine;

/// The index port (bit 7: NMI mask).
pub const INDEX_PORT: u16 = 0x70;
/// The data port.
pub const DATA_PORT: u16 = 0x71;
/// The ISA interrupt.
pub const RTC_IRQ: u32 = 8;
/// Bytes of CMOS memory (QEMU's pc has 128).
pub const CMOS_LEN: usize = 128;
/// The name a migration destination must have in its shape.
pub const SHAPE_NAME: &str = "rtc";

/// Register indices.
pub mod reg {
    pub const SECONDS: u8 = 0x00;
    pub const SECONDS_ALARM: u8 = 0x01;
    pub const MINUTES: u8 = 0x02;
    pub const MINUTES_ALARM: u8 = 0x03;
    pub const HOURS: u8 = 0x04;
    pub const HOURS_ALARM: u8 = 0x05;
    pub const DAY_OF_WEEK: u8 = 0x06;
    pub const DAY_OF_MONTH: u8 = 0x07;
    pub const MONTH: u8 = 0x08;
    pub const YEAR: u8 = 0x09;
    pub const A: u8 = 0x0a;
    pub const B: u8 = 0x0b;
    pub const C: u8 = 0x0c;
    pub const D: u8 = 0x0d;
    /// QEMU's `RTC_CENTURY`, which ACPI's FADT names to the guest.
    pub const CENTURY: u8 = 0x32;
    /// The IBM PS/2 century byte: an alias of [`CENTURY`].
    pub const IBM_PS2_CENTURY: u8 = 0x37;
}

/// Register A bits.
pub mod a {
    /// Update in progress (read only).
    pub const UIP: u8 = 0x80;
    /// Divider control: 0x20 runs the 32.768 kHz time base; 0x60 and 0x70
    /// hold the dividers in reset.
    pub const DV_MASK: u8 = 0x70;
    /// Periodic rate select.
    pub const RS_MASK: u8 = 0x0f;
}

/// Register B bits.
pub mod b {
    pub const SET: u8 = 0x80;
    pub const PIE: u8 = 0x40;
    pub const AIE: u8 = 0x20;
    pub const UIE: u8 = 0x10;
    pub const SQWE: u8 = 0x08;
    /// Binary (set) or BCD (clear) time.
    pub const DM: u8 = 0x04;
    /// 24-hour (set) or 12-hour (clear) time.
    pub const H24: u8 = 0x02;
    pub const DSE: u8 = 0x01;
}

/// Register C bits.
pub mod c {
    pub const IRQF: u8 = 0x80;
    pub const PF: u8 = 0x40;
    pub const AF: u8 = 0x20;
    pub const UF: u8 = 0x10;
    /// The flags register B's PIE, AIE and UIE enable.
    pub const MASK: u8 = 0x70;
}

/// Register D: valid RAM and time.
pub const REG_D_VRT: u8 = 0x80;
/// What register A and B hold at start (QEMU's realize: 32.768 kHz time
/// base, 1024 Hz rate; 24-hour BCD).
pub const REG_A_DEFAULT: u8 = 0x26;
pub const REG_B_DEFAULT: u8 = b::H24;
/// The PM bit of the hours in 12-hour mode.
const PM: u8 = 0x80;

/// The CMOS bytes the PC's firmware reads (QEMU's `pc_cmos_init`).
pub mod nvram {
    pub const FLOPPY: u8 = 0x10;
    pub const EQUIPMENT: u8 = 0x14;
    pub const BASE_MEM: u8 = 0x15;
    pub const EXT_MEM: u8 = 0x17;
    pub const CHECKSUM: u8 = 0x2e;
    pub const EXT_MEM2: u8 = 0x30;
    pub const MEM_ABOVE_16M: u8 = 0x34;
    pub const BOOT_THIRD: u8 = 0x38;
    pub const BOOT_FIRST: u8 = 0x3d;
    pub const MEM_ABOVE_4G: u8 = 0x5b;
    pub const CPUS: u8 = 0x5f;
    /// The range the checksum covers.
    pub const CHECKSUM_RANGE: std::ops::RangeInclusive<u8> = 0x10..=0x2d;
}

const NS_PER_SEC: i128 = 1_000_000_000;
const SECS_PER_DAY: i64 = 86_400;
/// The time base of the periodic interrupt.
const RTC_CLOCK_RATE: i128 = 32_768;
/// UIP reads set this long before a second ends (QEMU's `UIP_HOLD_LENGTH`:
/// eight cycles of the 32.768 kHz clock).
pub const UIP_HOLD_NS: i128 = 8 * NS_PER_SEC / RTC_CLOCK_RATE;
/// The most a guest's clock may be from the host's: about 10,000 years,
/// beyond what the century and year bytes can hold.
pub const MAX_OFFSET_SECS: i64 = 320_000_000_000;

/// Why an RTC cannot be built as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RtcError {
    #[error(
        "RTC base {text:?} is not utc, localtime or a date (2006-06-17 or 2006-06-17T16:01:21)"
    )]
    BadBase { text: String },
    #[error("boot order {order:?}: too many boot devices for PC (3 at most)")]
    TooManyBootDevices { order: String },
    #[error("invalid boot device for PC: '{device}' (a, b, c, d or n)")]
    BadBootDevice { device: char },
    #[error("cannot find the host's UTC offset for an RTC in local time")]
    NoLocalTime,
    #[error("cannot start the RTC's interrupt thread: {reason}")]
    Thread { reason: String },
}

/// What the guest's clock starts from (QEMU's `-rtc base=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RtcBase {
    /// The host's UTC.
    #[default]
    Utc,
    /// The host's local time (its offset from UTC when the VM starts).
    LocalTime,
    /// This moment, in seconds since 1970-01-01 UTC, at start; the clock
    /// runs on from there.
    Date { unix_secs: i64 },
}

impl RtcBase {
    /// Parses QEMU's `base=` values: `utc`, `localtime`, or a date as
    /// `2006-06-17T16:01:21` or `2006-06-17`.
    pub fn parse(text: &str) -> Result<Self, RtcError> {
        match text {
            "utc" => Ok(Self::Utc),
            "localtime" => Ok(Self::LocalTime),
            _ => parse_date(text)
                .map(|unix_secs| Self::Date { unix_secs })
                .ok_or_else(|| RtcError::BadBase {
                    text: text.to_string(),
                }),
        }
    }

    /// The guest clock's offset from the host's UTC, in ns, for a VM
    /// starting at host time `now_ns`.
    pub fn offset_ns(self, now_ns: i128) -> Result<i128, RtcError> {
        match self {
            Self::Utc => Ok(0),
            Self::LocalTime => {
                let now_secs = now_ns.div_euclid(NS_PER_SEC) as i64;
                ferry_kvm::host::utc_offset_secs(now_secs)
                    .map(|s| i128::from(s) * NS_PER_SEC)
                    .ok_or(RtcError::NoLocalTime)
            }
            Self::Date { unix_secs } => Ok(i128::from(unix_secs) * NS_PER_SEC - now_ns),
        }
    }
}

/// `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SS`, as QEMU's `-rtc base=` takes
/// them, in UTC; `None` if it is not one (or out of range).
fn parse_date(text: &str) -> Option<i64> {
    let (date, time) = match text.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (text, None),
    };
    let num = |s: &str, len: usize| -> Option<i64> {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let mut d = date.split('-');
    let (y, mo, day) = (num(d.next()?, 4)?, num(d.next()?, 2)?, num(d.next()?, 2)?);
    if d.next().is_some() {
        return None;
    }
    let (h, mi, s) = match time {
        Some(t) => {
            let mut t = t.split(':');
            let hms = (num(t.next()?, 2)?, num(t.next()?, 2)?, num(t.next()?, 2)?);
            if t.next().is_some() {
                return None;
            }
            hms
        }
        None => (0, 0, 0),
    };
    // QEMU's limits (`configure_rtc_base_datetime`): from 1970 on.
    let ok = y >= 1970
        && (1..=12).contains(&mo)
        && (1..=days_in_month(y, mo)).contains(&day)
        && h < 24
        && mi < 60
        && s < 60;
    ok.then(|| days_from_civil(y, mo, day) * SECS_PER_DAY + h * 3600 + mi * 60 + s)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    days_from_civil(y + m / 12, m % 12 + 1, 1) - days_from_civil(y, m, 1)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (month 1 to 12).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (year, month 1 to 12, day 1 to 31) of day `z` since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A broken-down UTC time (`struct tm` with a full year and 1-based month;
/// weekday 0 is Sunday).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tm {
    pub year: i64,
    pub month: i64,
    pub day: i64,
    pub hour: i64,
    pub min: i64,
    pub sec: i64,
    pub wday: i64,
}

impl Tm {
    /// The time `secs` seconds after 1970-01-01 00:00:00 UTC.
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(SECS_PER_DAY);
        let sod = secs.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: sod / 3600,
            min: sod / 60 % 60,
            sec: sod % 60,
            wday: (days + 4).rem_euclid(7),
        }
    }

    /// Seconds since the epoch, normalising out-of-range fields as
    /// `mktimegm` does (the weekday is ignored).
    pub fn to_unix(self) -> i64 {
        let m0 = self.month - 1;
        let days =
            days_from_civil(self.year + m0.div_euclid(12), m0.rem_euclid(12) + 1, 1) + self.day - 1;
        days * SECS_PER_DAY + self.hour * 3600 + self.min * 60 + self.sec
    }
}

/// Which RTC a VM gets (`ferry-vm --rtc`, ferry-qemu's pc machines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtcConfig {
    pub base: RtcBase,
    /// QEMU's `-boot order=` drive letters for CMOS 0x3d and 0x38 (a, b:
    /// floppy, c: disk, d: CD-ROM, n: network; three at most).
    pub boot_order: String,
}

impl Default for RtcConfig {
    /// UTC, boot order "cad" (QEMU's default for pc).
    fn default() -> Self {
        Self {
            base: RtcBase::Utc,
            boot_order: "cad".to_string(),
        }
    }
}

/// The CMOS NVRAM QEMU's `pc` machine fills in for a guest with `layout`'s
/// RAM and `vcpus` vCPUs, booting in `boot_order` (`pc_cmos_init` and
/// `pc_cmos_init_late`, without floppy and IDE geometry: ferry has no
/// floppy and SeaBIOS probes IDE drives itself), with registers A to D as
/// QEMU's realize leaves them. The time bytes are left for the clock.
/// Unlike QEMU, it also sets the standard checksum of 0x10-0x2d at
/// 0x2e-0x2f (QEMU leaves both zero; SeaBIOS and Linux ignore them).
pub fn pc_cmos(
    layout: &ferry_boot::MemoryLayout,
    vcpus: u32,
    boot_order: &str,
) -> Result<[u8; CMOS_LEN], RtcError> {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    let mut cmos = [0u8; CMOS_LEN];
    cmos[usize::from(reg::A)] = REG_A_DEFAULT;
    cmos[usize::from(reg::B)] = REG_B_DEFAULT;
    cmos[usize::from(reg::D)] = REG_D_VRT;
    let mut put16 = |at: u8, v: u64| {
        cmos[usize::from(at)] = v as u8;
        cmos[usize::from(at) + 1] = (v >> 8) as u8;
    };
    let below = layout.low_end();
    put16(nvram::BASE_MEM, (below / KIB).min(640));
    let ext = (below.saturating_sub(MIB) / KIB).min(65_535);
    put16(nvram::EXT_MEM, ext);
    put16(nvram::EXT_MEM2, ext);
    put16(
        nvram::MEM_ABOVE_16M,
        (below.saturating_sub(16 * MIB) / (64 * KIB)).min(65_535),
    );
    let high = layout.high_bytes() / (64 * KIB);
    let at = usize::from(nvram::MEM_ABOVE_4G);
    cmos[at..at + 3].copy_from_slice(&[high as u8, (high >> 8) as u8, (high >> 16) as u8]);
    // QEMU's x86_rtc_set_cpus_count: 0 where the count does not fit.
    cmos[usize::from(nvram::CPUS)] = match u8::try_from(vcpus) {
        Ok(n) if n > 0 => n - 1,
        _ => 0,
    };
    cmos[usize::from(nvram::FLOPPY)] = 0;
    // FPU present, PS/2 mouse.
    cmos[usize::from(nvram::EQUIPMENT)] = 0x02 | 0x04;
    let (first, third) = boot_nibbles(boot_order)?;
    cmos[usize::from(nvram::BOOT_FIRST)] = first;
    // The low bit: skip the floppy boot-signature check (QEMU's
    // `fd_bootchk` defaults to on: 0).
    cmos[usize::from(nvram::BOOT_THIRD)] = third;
    set_checksum(&mut cmos);
    Ok(cmos)
}

/// Refuses boot letters QEMU's pc refuses (more than three, or other than
/// a, b, c, d, n).
pub fn check_boot_order(order: &str) -> Result<(), RtcError> {
    boot_nibbles(order).map(drop)
}

/// CMOS 0x3d (first and second boot device) and 0x38 (third, high nibble)
/// for QEMU's boot letters.
fn boot_nibbles(order: &str) -> Result<(u8, u8), RtcError> {
    if order.chars().count() > 3 {
        return Err(RtcError::TooManyBootDevices {
            order: order.to_string(),
        });
    }
    let mut bds = [0u8; 3];
    for (i, ch) in order.chars().enumerate() {
        bds[i] = match ch {
            'a' | 'b' => 0x01,
            'c' => 0x02,
            'd' => 0x03,
            'n' => 0x04,
            device => return Err(RtcError::BadBootDevice { device }),
        };
    }
    Ok(((bds[1] << 4) | bds[0], bds[2] << 4))
}

/// Writes the big-endian sum of bytes 0x10-0x2d at 0x2e-0x2f.
pub fn set_checksum(cmos: &mut [u8; CMOS_LEN]) {
    let sum: u16 = nvram::CHECKSUM_RANGE
        .map(|i| u16::from(cmos[usize::from(i)]))
        .sum();
    let at = usize::from(nvram::CHECKSUM);
    cmos[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// Where the guest's time comes from: the host's UTC, in ns since the epoch.
pub trait HostClock: Send + Sync + std::fmt::Debug {
    fn now_ns(&self) -> i128;
}

/// The host's wall clock (QEMU's `clock=host`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl HostClock for SystemClock {
    fn now_ns(&self) -> i128 {
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        }
    }
}

/// Why the device is stopped (bits, as the virtio devices' `STOP_*`).
pub use crate::devices::virtio::{STOP_HELD, STOP_PAUSED};

/// The registers, the clock and the event bookkeeping. Every method takes
/// the host time `now` (ns since the epoch), so the logic runs on any clock.
#[derive(Debug)]
struct Core {
    cmos: [u8; CMOS_LEN],
    /// The selected byte (0 to 127).
    index: u8,
    /// Bit 7 of the last index write.
    nmi_masked: bool,
    /// The guest's time minus the host's, ns.
    offset_ns: i128,
    /// What `offset_ns` was at start, from `-rtc base=` (this host's, not
    /// migrated): QEMU's RTC_CHANGE reports the guest's offset from it.
    base_offset_ns: i128,
    /// The guest set the time since [`Rtc::take_time_change`] last looked.
    time_changed: bool,
    /// The guest second whose update cycle was accounted last.
    update_second: i64,
    /// The next alarm after `update_second`, once computed: (the second
    /// it was computed from, the alarm's second or `None` for never).
    alarm: Option<(i64, Option<i64>)>,
    /// The next periodic tick, in 32.768 kHz cycles of the host clock,
    /// while periodic interrupts are enabled.
    periodic_next: Option<i128>,
    irq: Arc<dyn IrqLine>,
    /// `STOP_*` bits; the thread raises nothing while any is set.
    stopped: u8,
    shutdown: bool,
}

impl Core {
    fn new(cmos: [u8; CMOS_LEN], offset_ns: i128, irq: Arc<dyn IrqLine>, now: i128) -> Self {
        let mut core = Self {
            cmos,
            index: 0,
            nmi_masked: false,
            offset_ns,
            base_offset_ns: offset_ns,
            time_changed: false,
            update_second: 0,
            alarm: None,
            periodic_next: None,
            irq,
            stopped: STOP_PAUSED,
            shutdown: false,
        };
        core.update_second = core.guest_second(now);
        // QEMU's rtc_set_date_from_host: the time bytes from the clock.
        core.write_time_regs(core.guest_second(now));
        core
    }

    fn r(&self, i: u8) -> u8 {
        self.cmos[usize::from(i)]
    }

    fn set(&mut self, i: u8, v: u8) {
        self.cmos[usize::from(i)] = v;
    }

    fn guest_ns(&self, now: i128) -> i128 {
        now + self.offset_ns
    }

    fn guest_second(&self, now: i128) -> i64 {
        self.guest_ns(now).div_euclid(NS_PER_SEC) as i64
    }

    /// The time advances: SET clear, dividers running (QEMU's `rtc_running`).
    fn running(&self) -> bool {
        self.r(reg::B) & b::SET == 0 && self.r(reg::A) & a::DV_MASK <= 0x20
    }

    /// The dividers are held in reset: no updates, no interrupts but the
    /// periodic one.
    fn divider_reset(&self) -> bool {
        self.r(reg::A) & 0x60 == 0x60
    }

    fn encode(&self, v: i64) -> u8 {
        let v = v.rem_euclid(100) as u8;
        if self.r(reg::B) & b::DM != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    /// A register's value, or `None` for "don't care" (0xC0-0xFF).
    fn decode(&self, raw: u8) -> Option<i64> {
        if raw & 0xc0 == 0xc0 {
            return None;
        }
        Some(if self.r(reg::B) & b::DM != 0 {
            i64::from(raw)
        } else {
            i64::from(raw >> 4) * 10 + i64::from(raw & 0x0f)
        })
    }

    /// An hours byte (the time's or the alarm's) as 0 to 23.
    fn decode_hour(&self, raw: u8) -> Option<i64> {
        if raw & 0xc0 == 0xc0 {
            return None;
        }
        let hour = self.decode(raw & 0x7f)?;
        Some(if self.r(reg::B) & b::H24 == 0 {
            hour % 12 + if raw & PM != 0 { 12 } else { 0 }
        } else {
            hour
        })
    }

    /// Writes guest second `secs` into the time bytes in the current
    /// format (QEMU's `rtc_set_cmos`).
    fn write_time_regs(&mut self, secs: i64) {
        let tm = Tm::from_unix(secs);
        self.set(reg::SECONDS, self.encode(tm.sec));
        self.set(reg::MINUTES, self.encode(tm.min));
        let hours = if self.r(reg::B) & b::H24 != 0 {
            self.encode(tm.hour)
        } else {
            let h = if tm.hour % 12 == 0 { 12 } else { tm.hour % 12 };
            self.encode(h) | if tm.hour >= 12 { PM } else { 0 }
        };
        self.set(reg::HOURS, hours);
        self.set(reg::DAY_OF_WEEK, self.encode(tm.wday + 1));
        self.set(reg::DAY_OF_MONTH, self.encode(tm.day));
        self.set(reg::MONTH, self.encode(tm.month));
        self.set(reg::YEAR, self.encode(tm.year.rem_euclid(100)));
        self.set(reg::CENTURY, self.encode(tm.year.div_euclid(100)));
    }

    /// The time the time bytes hold, in seconds since the epoch (QEMU's
    /// `rtc_get_time` and `mktimegm`; "don't care" values count as 0).
    fn regs_time(&self) -> i64 {
        let v = |i: u8| self.decode(self.r(i)).unwrap_or(0);
        Tm {
            year: v(reg::YEAR) + v(reg::CENTURY) * 100,
            month: v(reg::MONTH),
            day: v(reg::DAY_OF_MONTH),
            hour: self.decode_hour(self.r(reg::HOURS)).unwrap_or(0),
            min: v(reg::MINUTES),
            sec: v(reg::SECONDS),
            wday: 0,
        }
        .to_unix()
    }

    /// The guest's clock takes the time bytes' time, `subsec_ns` into the
    /// second (QEMU's `rtc_set_time`).
    fn set_time_from_regs(&mut self, now: i128, subsec_ns: i128) {
        let secs = self.regs_time();
        self.offset_ns = i128::from(secs) * NS_PER_SEC + subsec_ns - now;
        self.update_second = secs;
        self.alarm = None;
        self.time_changed = true;
    }

    /// Refreshes the time bytes while the clock runs.
    fn refresh_time(&mut self, now: i128) {
        if self.running() {
            self.write_time_regs(self.guest_second(now));
        }
    }

    fn uip(&self, now: i128) -> bool {
        self.running() && self.guest_ns(now).rem_euclid(NS_PER_SEC) >= NS_PER_SEC - UIP_HOLD_NS
    }

    /// The periodic interval in 32.768 kHz cycles (QEMU's
    /// `periodic_period_to_clock`); 0 without PIE or a rate.
    fn period_cycles(&self) -> i128 {
        if self.r(reg::B) & b::PIE == 0 {
            return 0;
        }
        match self.r(reg::A) & a::RS_MASK {
            0 => 0,
            code @ 1..=2 => 1 << (code + 6),
            code => 1 << (code - 1),
        }
    }

    /// Starts the periodic interrupt afresh (a period from now), or stops it.
    fn reprogram_periodic(&mut self, now: i128) {
        let period = self.period_cycles();
        self.periodic_next = (period != 0).then(|| to_cycles(now) + period);
    }

    /// The first guest second after `after` whose time matches the alarm
    /// bytes, or `None` if none ever does.
    fn next_alarm(&self, after: i64) -> Option<i64> {
        let want = |raw: u8, max: i64| match self.decode(raw) {
            None => Ok(None),
            Some(v) if (0..max).contains(&v) => Ok(Some(v)),
            Some(_) => Err(()),
        };
        let s = want(self.r(reg::SECONDS_ALARM), 60).ok()?;
        let m = want(self.r(reg::MINUTES_ALARM), 60).ok()?;
        let h = match self.decode_hour(self.r(reg::HOURS_ALARM)) {
            None => None,
            Some(v) if (0..24).contains(&v) => Some(v),
            Some(_) => return None,
        };
        let sod = after.rem_euclid(SECS_PER_DAY);
        let day_start = after - sod;
        // The first time of day past `sod` (today or tomorrow) that matches.
        for day in 0..2 {
            let past = |t: i64| day == 0 && t <= sod;
            for hh in h.map_or(0..24, |v| v..v + 1) {
                if past(hh * 3600 + 3599) {
                    continue;
                }
                for mm in m.map_or(0..60, |v| v..v + 1) {
                    if past(hh * 3600 + mm * 60 + 59) {
                        continue;
                    }
                    for ss in s.map_or(0..60, |v| v..v + 1) {
                        let t = hh * 3600 + mm * 60 + ss;
                        if !past(t) {
                            return Some(day_start + day * SECS_PER_DAY + t);
                        }
                    }
                }
            }
        }
        None
    }

    /// The next alarm after `update_second`, cached.
    fn alarm_second(&mut self) -> Option<i64> {
        match self.alarm {
            Some((from, at)) if from == self.update_second => at,
            _ => {
                let at = self.next_alarm(self.update_second);
                self.alarm = Some((self.update_second, at));
                at
            }
        }
    }

    /// Accounts every event up to `now`: update cycles (UF, and AF when an
    /// alarm second passed) and periodic ticks (PF); raises IRQ 8 for newly
    /// set flags that register B enables.
    fn process(&mut self, now: i128) {
        let mut flags = 0u8;
        let cur = self.guest_second(now);
        if cur < self.update_second {
            // The host's clock stepped back: nothing happened yet.
            self.update_second = cur;
        } else if cur > self.update_second {
            if !self.divider_reset() {
                flags |= c::UF;
                if self.running() && self.alarm_second().is_some_and(|t| t <= cur) {
                    flags |= c::AF;
                }
            }
            self.update_second = cur;
        }
        if let Some(next) = self.periodic_next {
            let now_cycles = to_cycles(now);
            if now_cycles >= next {
                flags |= c::PF;
                let period = self.period_cycles().max(1);
                self.periodic_next = Some(next + ((now_cycles - next) / period + 1) * period);
            }
        }
        let new = flags & !self.r(reg::C);
        self.cmos[usize::from(reg::C)] |= flags;
        if new & self.r(reg::B) & c::MASK != 0 {
            self.cmos[usize::from(reg::C)] |= c::IRQF;
            self.irq.set_level(RTC_IRQ, true);
        }
    }

    /// When the next interrupt could be raised (host ns), if one can: none
    /// while the line is up already or no enabled flag can newly be set.
    fn next_deadline(&mut self, _now: i128) -> Option<i128> {
        let (rb, rc) = (self.r(reg::B), self.r(reg::C));
        if rc & c::IRQF != 0 {
            return None;
        }
        let second_at = |s: i64, offset: i128| i128::from(s) * NS_PER_SEC - offset;
        let mut next: Option<i128> = None;
        let mut consider = |t: i128| next = Some(next.map_or(t, |n: i128| n.min(t)));
        if rb & b::PIE != 0 {
            if let Some(p) = self.periodic_next {
                consider(from_cycles(p));
            }
        }
        if !self.divider_reset() {
            if rb & b::UIE != 0 && rc & c::UF == 0 {
                consider(second_at(self.update_second + 1, self.offset_ns));
            }
            if rb & b::AIE != 0 && rc & c::AF == 0 && self.running() {
                if let Some(at) = self.alarm_second() {
                    consider(second_at(at, self.offset_ns));
                }
            }
        }
        next
    }

    fn read_data(&mut self, now: i128) -> u8 {
        self.process(now);
        if self.index == reg::IBM_PS2_CENTURY {
            self.index = reg::CENTURY;
        }
        match self.index {
            reg::SECONDS
            | reg::MINUTES
            | reg::HOURS
            | reg::DAY_OF_WEEK
            | reg::DAY_OF_MONTH
            | reg::MONTH
            | reg::YEAR
            | reg::CENTURY => {
                self.refresh_time(now);
                self.r(self.index)
            }
            reg::A => self.r(reg::A) | if self.uip(now) { a::UIP } else { 0 },
            reg::C => {
                let v = self.r(reg::C);
                self.irq.set_level(RTC_IRQ, false);
                self.set(reg::C, 0);
                v
            }
            i => self.r(i),
        }
    }

    fn write_data(&mut self, now: i128, v: u8) {
        // Events up to now count under the settings they happened under.
        self.process(now);
        if self.index == reg::IBM_PS2_CENTURY {
            self.index = reg::CENTURY;
        }
        match self.index {
            reg::SECONDS_ALARM | reg::MINUTES_ALARM | reg::HOURS_ALARM => {
                self.set(self.index, v);
                self.alarm = None;
            }
            reg::SECONDS
            | reg::MINUTES
            | reg::HOURS
            | reg::DAY_OF_WEEK
            | reg::DAY_OF_MONTH
            | reg::MONTH
            | reg::YEAR
            | reg::CENTURY => {
                // The other time bytes must hold the current time first.
                self.refresh_time(now);
                self.set(self.index, v);
                if self.running() {
                    let phase = self.guest_ns(now).rem_euclid(NS_PER_SEC);
                    self.set_time_from_regs(now, phase);
                }
            }
            reg::A => {
                let old = self.r(reg::A);
                if v & 0x60 == 0x60 {
                    // The dividers stop: the time bytes keep this time.
                    self.refresh_time(now);
                } else if old & 0x60 == 0x60 && v & a::DV_MASK <= 0x20 {
                    // Out of reset, the first update comes half a second later.
                    if self.r(reg::B) & b::SET == 0 {
                        self.set_time_from_regs(now, NS_PER_SEC / 2);
                    }
                }
                self.set(reg::A, v & !a::UIP);
                if (old ^ v) & a::RS_MASK != 0 {
                    self.reprogram_periodic(now);
                }
            }
            reg::B => {
                let old = self.r(reg::B);
                let mut v = v;
                if v & b::SET != 0 {
                    // The time bytes keep the time the clock stopped at.
                    self.refresh_time(now);
                    v &= !b::UIE;
                } else if old & b::SET != 0 && self.r(reg::A) & a::DV_MASK <= 0x20 {
                    // Out of SET: the clock takes what the guest wrote, read
                    // in the format it was written in.
                    let phase = self.guest_ns(now).rem_euclid(NS_PER_SEC);
                    self.set_time_from_regs(now, phase);
                }
                if v & self.r(reg::C) & c::MASK != 0 {
                    self.cmos[usize::from(reg::C)] |= c::IRQF;
                    self.irq.set_level(RTC_IRQ, true);
                } else {
                    self.cmos[usize::from(reg::C)] &= !c::IRQF;
                    self.irq.set_level(RTC_IRQ, false);
                }
                if old & (b::DM | b::H24) != v & (b::DM | b::H24) && self.running() {
                    // Not in QEMU, which rewrites them on the next read too.
                    self.set(reg::B, v);
                    self.refresh_time(now);
                }
                self.set(reg::B, v);
                if (old ^ v) & b::PIE != 0 {
                    self.reprogram_periodic(now);
                }
                self.alarm = None;
            }
            reg::C | reg::D => {}
            i => self.set(i, v),
        }
    }
}

/// 32.768 kHz cycles at host time `ns`.
fn to_cycles(ns: i128) -> i128 {
    (ns * RTC_CLOCK_RATE).div_euclid(NS_PER_SEC)
}

/// The host time (ns) a 32.768 kHz cycle starts at, rounded up.
fn from_cycles(cycles: i128) -> i128 {
    -(-cycles * NS_PER_SEC).div_euclid(RTC_CLOCK_RATE)
}

#[derive(Debug)]
struct RtcShared {
    core: Mutex<Core>,
    wake: Condvar,
    /// Times the thread woke up (for tests: none while nothing is enabled).
    wakeups: AtomicU64,
}

/// The device: registers and CMOS behind a lock, and the thread that raises
/// its interrupts in time. Stopped at first, as the VM's other devices.
#[derive(Debug)]
pub struct Rtc {
    shared: Arc<RtcShared>,
    clock: Arc<dyn HostClock>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Rtc {
    /// A device with `cmos` (time bytes set from the clock), the guest's
    /// clock `offset_ns` from `clock`, raising IRQ 8 on `irq`.
    pub fn new(
        cmos: [u8; CMOS_LEN],
        offset_ns: i128,
        irq: Arc<dyn IrqLine>,
        clock: Arc<dyn HostClock>,
    ) -> Result<Self, RtcError> {
        let core = Core::new(cmos, offset_ns, irq, clock.now_ns());
        let shared = Arc::new(RtcShared {
            core: Mutex::new(core),
            wake: Condvar::new(),
            wakeups: AtomicU64::new(0),
        });
        let thread = {
            let shared = shared.clone();
            let clock = clock.clone();
            std::thread::Builder::new()
                .name("rtc".into())
                .spawn(move || run(&shared, clock.as_ref()))
                .map_err(|e| RtcError::Thread {
                    reason: e.to_string(),
                })?
        };
        Ok(Self {
            shared,
            clock,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The RTC of a `pc` VM with `config`, `layout`'s RAM and `vcpus`
    /// vCPUs, on the host's clock (see [`pc_cmos`]).
    pub fn for_vm(
        config: &RtcConfig,
        layout: &ferry_boot::MemoryLayout,
        vcpus: u32,
        irq: Arc<dyn IrqLine>,
    ) -> Result<Self, RtcError> {
        let cmos = pc_cmos(layout, vcpus, &config.boot_order)?;
        let clock: Arc<dyn HostClock> = Arc::new(SystemClock);
        let offset = config.base.offset_ns(clock.now_ns())?;
        Self::new(cmos, offset, irq, clock)
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic under the lock leaves plain bytes behind: carry on.
        self.shared
            .core
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a port belongs to the device.
    pub fn claims_port(port: u16) -> bool {
        port == INDEX_PORT || port == DATA_PORT
    }

    /// A guest read: byte by byte from `port` on (QEMU's accesses are one
    /// byte); the index port reads 0xff.
    pub fn io_read(&self, port: u16, data: &mut [u8]) {
        let now = self.clock.now_ns();
        let mut core = self.lock();
        let mut notify = false;
        for (i, out) in data.iter_mut().enumerate() {
            *out = match port.wrapping_add(i as u16) {
                DATA_PORT => {
                    notify |= core.index == reg::C;
                    core.read_data(now)
                }
                _ => 0xff,
            };
        }
        drop(core);
        if notify {
            self.shared.wake.notify_all();
        }
    }

    /// A guest write: byte by byte from `port` on.
    pub fn io_write(&self, port: u16, data: &[u8]) {
        let now = self.clock.now_ns();
        let mut core = self.lock();
        let mut notify = false;
        for (i, &v) in data.iter().enumerate() {
            match port.wrapping_add(i as u16) {
                INDEX_PORT => {
                    core.index = v & 0x7f;
                    core.nmi_masked = v & 0x80 != 0;
                }
                DATA_PORT => {
                    core.write_data(now, v);
                    notify = true;
                }
                _ => {}
            }
        }
        drop(core);
        if notify {
            self.shared.wake.notify_all();
        }
    }

    /// CMOS byte `index` (0 to 127) as the guest would read it, without the
    /// side effects of a read (register C stays).
    pub fn cmos_byte(&self, index: u8) -> u8 {
        let now = self.clock.now_ns();
        let mut core = self.lock();
        core.process(now);
        core.refresh_time(now);
        core.cmos[usize::from(index & 0x7f)]
    }

    /// Sets CMOS byte `index` (QEMU's `mc146818rtc_set_cmos_data`: no
    /// side effects, not for the clock's registers).
    pub fn set_cmos_byte(&self, index: u8, value: u8) {
        self.lock().cmos[usize::from(index & 0x7f)] = value;
    }

    /// A system reset (QEMU's `rtc_reset_enter` and `rtc_reset_hold`): the
    /// clock and the NVRAM stay; the periodic, alarm and square-wave enables
    /// and the flags of register C go, the line goes down, and so does the
    /// shutdown status byte 0x0f unless it says S3 resume (0xfe).
    pub fn reset(&self) {
        let now = self.clock.now_ns();
        let mut core = self.lock();
        if core.cmos[0x0f] != 0xfe {
            core.cmos[0x0f] = 0;
        }
        core.cmos[usize::from(reg::B)] &= !(b::PIE | b::AIE | b::SQWE);
        core.cmos[usize::from(reg::C)] &= !(c::UF | c::IRQF | c::PF | c::AF);
        core.update_second = core.guest_second(now);
        core.alarm = None;
        core.reprogram_periodic(now);
        core.irq.set_level(RTC_IRQ, false);
        drop(core);
        self.shared.wake.notify_all();
    }

    /// Whether the guest set the clock since the last call, and if so the
    /// guest's time less the time of `-rtc base=` in whole seconds: QEMU's
    /// RTC_CHANGE `offset`.
    pub fn take_time_change(&self) -> Option<i64> {
        let mut core = self.lock();
        std::mem::take(&mut core.time_changed)
            .then(|| (core.offset_ns - core.base_offset_ns).div_euclid(NS_PER_SEC) as i64)
    }

    /// Whether the last index write masked NMIs (bit 7 of port 0x70).
    pub fn nmi_masked(&self) -> bool {
        self.lock().nmi_masked
    }

    /// The guest's time now, in ns since the epoch.
    pub fn guest_time_ns(&self) -> i128 {
        let now = self.clock.now_ns();
        self.lock().guest_ns(now)
    }

    /// Stops (`on`) the interrupt thread for reason `why` (a `STOP_*` bit),
    /// or lets it run once no reason is left. A stopped RTC's thread
    /// touches neither the registers nor the interrupt line.
    pub fn set_stopped(&self, why: u8, on: bool) {
        let mut core = self.lock();
        if on {
            core.stopped |= why;
        } else {
            core.stopped &= !why;
        }
        drop(core);
        self.shared.wake.notify_all();
    }

    /// The names a migration destination must offer.
    pub fn shape_names(&self) -> Vec<String> {
        vec![SHAPE_NAME.to_string()]
    }

    /// Times the interrupt thread woke up so far.
    pub fn wakeups(&self) -> u64 {
        self.shared.wakeups.load(Ordering::Relaxed)
    }

    /// Stops the thread and waits for it; the device still answers its
    /// ports, lazily. Idempotent.
    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.shared.wake.notify_all();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(t) = thread {
            if t.join().is_err() {
                tracing::warn!("the RTC thread panicked");
            }
        }
    }
}

impl Drop for Rtc {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The interrupt thread: accounts events and raises the line when one is
/// due, sleeping until the next one that could raise it.
fn run(shared: &RtcShared, clock: &dyn HostClock) {
    let mut core = shared
        .core
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        if core.shutdown {
            return;
        }
        let deadline = if core.stopped != 0 {
            None
        } else {
            let now = clock.now_ns();
            core.process(now);
            core.next_deadline(now).map(|t| (t - now).max(0))
        };
        core = match deadline {
            None => shared
                .wake
                .wait(core)
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            Some(ns) => {
                // At least a microsecond: a deadline of now was just served.
                let wait = Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX).max(1_000));
                shared
                    .wake
                    .wait_timeout(core, wait)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0
            }
        };
        shared.wakeups.fetch_add(1, Ordering::Relaxed);
    }
}
