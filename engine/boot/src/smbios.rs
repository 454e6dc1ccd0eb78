//! SMBIOS tables as QEMU 7.2 builds them for its `pc` machine
//! (`pc-i440fx-7.2`), so that a guest sees the same DMI data under ferry as
//! under QEMU + SeaBIOS: `dmidecode`, `/sys/class/dmi/id` and cloud-init
//! (which reads the OpenStack product name and the serial from here).
//!
//! QEMU 7.2's `pc` machines default to the SMBIOS 2.1 (32-bit) entry point,
//! `_SM_` + `_DMI_`, announcing SMBIOS 2.8. Without firmware there is no EFI
//! system table, so Linux's `dmi_scan_machine` finds the entry point the way it
//! does on a legacy BIOS: at a 16-byte boundary in `0xF0000..0xFFFFF`. The
//! entry point goes to [`SMBIOS_START`] and the structure table right after it
//! (beside the MP configuration table at [`crate::MP_CONFIG_START`]), all in
//! the reserved `[0x9fc00, 1 MiB)` of the memory map.
//!
//! Structures, with QEMU's handles:
//!
//! | type | handle | what | built |
//! |------|--------|------|-------|
//! | 0    | 0x000  | BIOS | always (QEMU leaves it to SeaBIOS; ferry has none, so without `-smbios type=0` it is SeaBIOS's, as Debian 12 ships it) |
//! | 1    | 0x100  | system: manufacturer, product, version, serial, UUID, SKU, family | always |
//! | 2    | 0x200  | baseboard | when given (`-smbios type=2`) |
//! | 3    | 0x300  | chassis | always |
//! | 4    | 0x400+ | one per socket | always |
//! | 11   | 0xe00  | OEM strings | when strings are given |
//! | 16   | 0x1000 | physical memory array | always |
//! | 17   | 0x1100+| one memory device per 16 GiB | always |
//! | 19   | 0x1300+| one memory array mapped address per RAM range | always |
//! | 32   | 0x2000 | system boot information | always |
//! | 127  | 0x7f00 | end of table | always |
//!
//! Unset strings take QEMU's defaults (manufacturer "QEMU", product
//! "Standard PC (i440FX + PIIX, 1996)", version the machine type's name,
//! [`SmbiosConfig::machine`]: "pc-i440fx-7.2" unless the guest was started
//! with another `pc-i440fx-*`); a string set to the empty string is absent,
//! as in QEMU.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{MemoryLayout, HIMEM_START};
use crate::BootError;

/// Where the SMBIOS entry point goes: 16-byte aligned in the BIOS area that
/// Linux and dmidecode scan (`0xF0000..0xFFFFF`), after the MP configuration
/// table (at most 1.5 KiB from 0xF0000).
pub const SMBIOS_START: u64 = 0xf_1000;
/// Where the structure table goes, right after the 31-byte entry point.
pub const SMBIOS_TABLE_START: u64 = SMBIOS_START + 0x20;
/// Most bytes the structure table may take: up to 1 MiB.
pub const SMBIOS_TABLE_MAX: usize = (HIMEM_START - SMBIOS_TABLE_START) as usize;

/// QEMU's default manufacturer for types 1, 2, 3, 4 and 17.
pub const DEFAULT_MANUFACTURER: &str = "QEMU";
/// QEMU's description of `pc-i440fx-7.2`: the default type 1 and 2 product.
pub const DEFAULT_PRODUCT: &str = "Standard PC (i440FX + PIIX, 1996)";
/// The default machine type name ([`SmbiosConfig::machine`]): the default
/// type 1, 2, 3 and 4 version.
pub const DEFAULT_VERSION: &str = "pc-i440fx-7.2";
/// SeaBIOS's type 0 vendor (QEMU 7.2 leaves type 0 to SeaBIOS).
pub const DEFAULT_BIOS_VENDOR: &str = "SeaBIOS";
/// The SeaBIOS version a Debian 12 QEMU 7.2 guest sees (seabios 1.16.2-1):
/// the reference lab's guests print `DMI: QEMU Standard PC (i440FX + PIIX,
/// 1996), BIOS 1.16.2-debian-1.16.2-1 04/01/2014`.
pub const DEFAULT_BIOS_VERSION: &str = "1.16.2-debian-1.16.2-1";
/// SeaBIOS's fixed release date.
pub const DEFAULT_BIOS_DATE: &str = "04/01/2014";

/// The keys `-smbios type=0` takes (QEMU 7.2), besides `type`.
pub const TYPE0_KEYS: &[&str] = &["vendor", "version", "date", "release", "uefi"];
/// The keys `-smbios type=1` takes.
pub const TYPE1_KEYS: &[&str] = &[
    "manufacturer",
    "product",
    "version",
    "serial",
    "uuid",
    "sku",
    "family",
];
/// The keys `-smbios type=2` takes.
pub const TYPE2_KEYS: &[&str] = &[
    "manufacturer",
    "product",
    "version",
    "serial",
    "asset",
    "location",
];
/// The keys `-smbios type=3` takes.
pub const TYPE3_KEYS: &[&str] = &["manufacturer", "version", "serial", "asset", "sku"];
/// The keys `-smbios type=11` takes (`value=` repeats; `path=` reads a file,
/// which ferry does not).
pub const TYPE11_KEYS: &[&str] = &["value"];

const T4_MAX_SPEED_MHZ: u16 = 2000;
const MAX_DIMM_BYTES: u64 = 16 << 30;
const ENTRY_POINT_LEN: usize = 0x1f;

/// Why SMBIOS tables could not be built from what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmbiosError {
    /// A UUID is not in the `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` form.
    #[error("invalid UUID '{uuid}'; write it as 8-4-4-4-12 hexadecimal digits")]
    BadUuid {
        /// The text given.
        uuid: String,
    },
    /// A BIOS release is not `MAJOR.MINOR` with both below 256.
    #[error("invalid BIOS release '{release}'; write it as MAJOR.MINOR, e.g. 1.0")]
    BadRelease {
        /// The text given.
        release: String,
    },
    /// A string contains a NUL byte, which ends SMBIOS strings.
    #[error("SMBIOS {field} contains a NUL byte; remove it")]
    StringHasNul {
        /// Which field.
        field: String,
    },
    /// The structure table does not fit below 1 MiB.
    #[error(
        "the SMBIOS tables take {bytes} bytes, more than the {max} bytes free below 1 MiB; \
         shorten the SMBIOS strings"
    )]
    TooLarge {
        /// Size of the structure table.
        bytes: usize,
        /// Room for it.
        max: usize,
    },
    /// A table type ferry cannot build fields for.
    #[error(
        "ferry cannot build fields for SMBIOS type {table}; it builds types 0, 1, 2, 3 and 11"
    )]
    UnknownType {
        /// The type asked for.
        table: u64,
    },
    /// A key that the table type does not have.
    #[error("SMBIOS type {table} has no field '{key}'; it has: {known}")]
    UnknownKey {
        /// The table type.
        table: u8,
        /// The key given.
        key: String,
        /// The keys it has, comma-separated.
        known: String,
    },
    /// A value that is not `on` or `off`.
    #[error("SMBIOS type {table} field '{key}' takes on or off, not '{value}'")]
    BadBool {
        /// The table type.
        table: u8,
        /// The key.
        key: String,
        /// The value given.
        value: String,
    },
}

/// Type 0, BIOS information: as given, unset strings absent (QEMU builds
/// type 0 from the given fields alone).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BiosInfo {
    /// Vendor string.
    pub vendor: Option<String>,
    /// BIOS version string.
    pub version: Option<String>,
    /// Release date string (conventionally MM/DD/YYYY).
    pub date: Option<String>,
    /// System BIOS major and minor release.
    pub release: Option<(u8, u8)>,
    /// Whether UEFI is supported (characteristics extension bit).
    pub uefi: bool,
}

/// Type 1, system information.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemInfo {
    /// Manufacturer (default "QEMU").
    pub manufacturer: Option<String>,
    /// Product name (default "Standard PC (i440FX + PIIX, 1996)").
    pub product: Option<String>,
    /// Version (default the machine type).
    pub version: Option<String>,
    /// Serial number.
    pub serial: Option<String>,
    /// UUID in RFC 4122 (big-endian) byte order, as [`parse_uuid`] returns
    /// it; all zeros when unset, as QEMU without `-uuid`.
    pub uuid: Option<[u8; 16]>,
    /// SKU number.
    pub sku: Option<String>,
    /// Family.
    pub family: Option<String>,
}

/// Type 2, baseboard information.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BaseboardInfo {
    /// Manufacturer (default "QEMU").
    pub manufacturer: Option<String>,
    /// Product (default the machine description).
    pub product: Option<String>,
    /// Version (default the machine type).
    pub version: Option<String>,
    /// Serial number.
    pub serial: Option<String>,
    /// Asset tag.
    pub asset: Option<String>,
    /// Location in the chassis.
    pub location: Option<String>,
}

/// Type 3, chassis information.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChassisInfo {
    /// Manufacturer (default "QEMU").
    pub manufacturer: Option<String>,
    /// Version (default the machine type).
    pub version: Option<String>,
    /// Serial number.
    pub serial: Option<String>,
    /// Asset tag.
    pub asset: Option<String>,
    /// SKU number.
    pub sku: Option<String>,
}

/// What the guest's SMBIOS tables say: the user's fields (QEMU's `-smbios`)
/// and the machine's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmbiosConfig {
    /// Type 0; `None`: SeaBIOS's, which a QEMU 7.2 guest sees
    /// unless `-smbios type=0` is given.
    pub bios: Option<BiosInfo>,
    /// Type 1.
    pub system: SystemInfo,
    /// Type 2; `None`: no type 2, as QEMU without `-smbios type=2`.
    pub baseboard: Option<BaseboardInfo>,
    /// Type 3.
    pub chassis: ChassisInfo,
    /// Type 11 strings; no type 11 when empty.
    pub oem_strings: Vec<String>,
    /// CPU sockets: one type 4 each.
    pub sockets: u32,
    /// Cores per socket.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
    /// Type 4 processor ID: CPUID leaf 1 EAX (low half) and EDX (high half)
    /// of the guest CPU.
    pub processor_id: u64,
    /// The machine type's name (`pc-i440fx-4.2`; `pc` is `pc-i440fx-7.2`):
    /// QEMU's default type 1, 2 and 3 version and its type 4 processor
    /// version. [`DEFAULT_VERSION`] by default.
    pub machine: String,
}

impl Default for SmbiosConfig {
    fn default() -> Self {
        Self {
            bios: None,
            system: SystemInfo::default(),
            baseboard: None,
            chassis: ChassisInfo::default(),
            oem_strings: Vec::new(),
            sockets: 1,
            cores: 1,
            threads: 1,
            processor_id: 0,
            machine: DEFAULT_VERSION.to_string(),
        }
    }
}

fn field(table: u8, key: &str) -> String {
    format!("type {table} {key}")
}

fn text(table: u8, key: &str, value: &str) -> Result<Option<String>, SmbiosError> {
    if value.contains('\0') {
        return Err(SmbiosError::StringHasNul {
            field: field(table, key),
        });
    }
    Ok(Some(value.to_string()))
}

impl SmbiosConfig {
    /// Defaults for `vcpus` vCPUs, one socket each (QEMU's `-smp N`).
    pub fn for_vcpus(vcpus: u32) -> Self {
        Self {
            sockets: vcpus.max(1),
            ..Self::default()
        }
    }

    /// Marks table type `table` as given, as `-smbios type=TABLE` does even
    /// without fields: type 0 is then built from its fields alone, type 2 is
    /// built.
    ///
    /// # Errors
    /// [`SmbiosError::UnknownType`] for a type other than 0, 1, 2, 3 and 11.
    pub fn add_table(&mut self, table: u64) -> Result<(), SmbiosError> {
        match table {
            0 => {
                self.bios.get_or_insert_with(BiosInfo::default);
            }
            2 => {
                self.baseboard.get_or_insert_with(BaseboardInfo::default);
            }
            1 | 3 | 11 => {}
            _ => return Err(SmbiosError::UnknownType { table }),
        }
        Ok(())
    }

    /// Sets one field as QEMU's `-smbios type=TABLE,KEY=VALUE` does (the table
    /// counts as given, see [`Self::add_table`]); type 11 `value` adds a
    /// string. A type 1 `uuid` is checked here.
    ///
    /// # Errors
    /// [`SmbiosError::UnknownType`], [`SmbiosError::UnknownKey`], or the value
    /// is invalid (a bad UUID or release, a NUL byte).
    pub fn set(&mut self, table: u64, key: &str, value: &str) -> Result<(), SmbiosError> {
        self.add_table(table)?;
        let t = table as u8;
        let unknown = |known: &[&str]| SmbiosError::UnknownKey {
            table: t,
            key: key.to_string(),
            known: known.join(", "),
        };
        match (t, key) {
            (0, "vendor") => {
                self.bios.get_or_insert_with(BiosInfo::default).vendor = text(t, key, value)?
            }
            (0, "version") => {
                self.bios.get_or_insert_with(BiosInfo::default).version = text(t, key, value)?
            }
            (0, "date") => {
                self.bios.get_or_insert_with(BiosInfo::default).date = text(t, key, value)?
            }
            (0, "release") => {
                self.bios.get_or_insert_with(BiosInfo::default).release =
                    Some(parse_release(value)?)
            }
            (0, "uefi") => {
                self.bios.get_or_insert_with(BiosInfo::default).uefi = match value {
                    "on" | "yes" | "true" => true,
                    "off" | "no" | "false" => false,
                    _ => {
                        return Err(SmbiosError::BadBool {
                            table: t,
                            key: key.into(),
                            value: value.into(),
                        })
                    }
                }
            }
            (0, _) => return Err(unknown(TYPE0_KEYS)),
            (1, "manufacturer") => self.system.manufacturer = text(t, key, value)?,
            (1, "product") => self.system.product = text(t, key, value)?,
            (1, "version") => self.system.version = text(t, key, value)?,
            (1, "serial") => self.system.serial = text(t, key, value)?,
            (1, "uuid") => self.system.uuid = Some(parse_uuid(value)?),
            (1, "sku") => self.system.sku = text(t, key, value)?,
            (1, "family") => self.system.family = text(t, key, value)?,
            (1, _) => return Err(unknown(TYPE1_KEYS)),
            (2, "manufacturer") => {
                self.baseboard
                    .get_or_insert_with(BaseboardInfo::default)
                    .manufacturer = text(t, key, value)?
            }
            (2, "product") => {
                self.baseboard
                    .get_or_insert_with(BaseboardInfo::default)
                    .product = text(t, key, value)?
            }
            (2, "version") => {
                self.baseboard
                    .get_or_insert_with(BaseboardInfo::default)
                    .version = text(t, key, value)?
            }
            (2, "serial") => {
                self.baseboard
                    .get_or_insert_with(BaseboardInfo::default)
                    .serial = text(t, key, value)?
            }
            (2, "asset") => {
                self.baseboard
                    .get_or_insert_with(BaseboardInfo::default)
                    .asset = text(t, key, value)?
            }
            (2, "location") => {
                self.baseboard
                    .get_or_insert_with(BaseboardInfo::default)
                    .location = text(t, key, value)?
            }
            (2, _) => return Err(unknown(TYPE2_KEYS)),
            (3, "manufacturer") => self.chassis.manufacturer = text(t, key, value)?,
            (3, "version") => self.chassis.version = text(t, key, value)?,
            (3, "serial") => self.chassis.serial = text(t, key, value)?,
            (3, "asset") => self.chassis.asset = text(t, key, value)?,
            (3, "sku") => self.chassis.sku = text(t, key, value)?,
            (3, _) => return Err(unknown(TYPE3_KEYS)),
            (_, "value") => {
                if let Some(s) = text(t, key, value)? {
                    self.oem_strings.push(s);
                }
            }
            _ => return Err(unknown(TYPE11_KEYS)),
        }
        Ok(())
    }
}

/// Parses a UUID (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, either case) into
/// its RFC 4122 byte order: the bytes in the order the digits are written.
///
/// # Errors
/// [`SmbiosError::BadUuid`].
pub fn parse_uuid(text: &str) -> Result<[u8; 16], SmbiosError> {
    let bad = || SmbiosError::BadUuid {
        uuid: text.to_string(),
    };
    let groups: Vec<&str> = text.split('-').collect();
    let shape_ok = groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|c| c.is_ascii_hexdigit()));
    if !shape_ok {
        return Err(bad());
    }
    let digits: String = groups.concat();
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn parse_release(text: &str) -> Result<(u8, u8), SmbiosError> {
    let bad = || SmbiosError::BadRelease {
        release: text.to_string(),
    };
    let (major, minor) = text.split_once('.').ok_or_else(bad)?;
    Ok((
        major.parse().map_err(|_| bad())?,
        minor.parse().map_err(|_| bad())?,
    ))
}

/// The SMBIOS 2.6+ wire form of a UUID: the first three fields (time_low,
/// time_mid, time_hi_and_version) little-endian, the rest as written.
pub fn uuid_wire_bytes(uuid: &[u8; 16]) -> [u8; 16] {
    let mut w = *uuid;
    w[0..4].reverse();
    w[4..6].reverse();
    w[6..8].reverse();
    w
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, &b| sum.wrapping_add(b))
        .wrapping_neg()
}

/// One structure: the formatted area, then its string set.
struct Structure {
    formatted: Vec<u8>,
    strings: Vec<u8>,
    count: u8,
}

impl Structure {
    fn new(kind: u8, handle: u16) -> Self {
        let mut formatted = vec![kind, 0];
        formatted.extend_from_slice(&handle.to_le_bytes());
        Self {
            formatted,
            strings: Vec::new(),
            count: 0,
        }
    }

    fn u8(&mut self, v: u8) -> &mut Self {
        self.formatted.push(v);
        self
    }

    fn u16(&mut self, v: u16) -> &mut Self {
        self.formatted.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn u32(&mut self, v: u32) -> &mut Self {
        self.formatted.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.formatted.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.formatted.extend_from_slice(v);
        self
    }

    /// A string field: its index in the string set, or 0 (none) for an
    /// absent or empty string, as QEMU's `SMBIOS_TABLE_SET_STR`.
    fn string(&mut self, s: Option<&str>) -> &mut Self {
        match s.filter(|s| !s.is_empty()) {
            Some(s) => {
                self.strings.extend_from_slice(s.as_bytes());
                self.strings.push(0);
                self.count += 1;
                self.formatted.push(self.count);
            }
            None => self.formatted.push(0),
        }
        self
    }

    /// The structure with its length filled in and the string set ended
    /// (two NULs when it has no strings).
    fn finish(mut self) -> Vec<u8> {
        self.formatted[1] = self.formatted.len() as u8;
        let mut out = self.formatted;
        if self.strings.is_empty() {
            out.extend_from_slice(&[0, 0]);
        } else {
            out.extend_from_slice(&self.strings);
            out.push(0);
        }
        out
    }
}

/// The built tables: the entry point (for [`SMBIOS_START`]) and the
/// structure table (for [`SMBIOS_TABLE_START`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmbiosTables {
    /// The 31-byte SMBIOS 2.1 entry point, checksums set, pointing at
    /// [`SMBIOS_TABLE_START`].
    pub entry_point: Vec<u8>,
    /// The structures, type 127 last.
    pub table: Vec<u8>,
}

fn or<'a>(v: &'a Option<String>, default: &'a str) -> Option<&'a str> {
    Some(v.as_deref().unwrap_or(default))
}

/// Builds the tables QEMU 7.2 builds for `pc-i440fx-7.2` with `config`, for
/// guest RAM as `layout` lays it out; the versions name `config.machine`.
///
/// # Errors
/// [`SmbiosError::TooLarge`] when the strings make the table too big for the
/// room below 1 MiB.
pub fn smbios_tables(
    config: &SmbiosConfig,
    layout: &MemoryLayout,
) -> Result<SmbiosTables, SmbiosError> {
    let mut structures: Vec<Vec<u8>> = Vec::new();

    // Type 0: QEMU's, or SeaBIOS's where the user gave none (the same layout;
    // SeaBIOS sets only the targeted-content-distribution extension bit).
    let seabios = BiosInfo {
        vendor: Some(DEFAULT_BIOS_VENDOR.into()),
        version: Some(DEFAULT_BIOS_VERSION.into()),
        date: Some(DEFAULT_BIOS_DATE.into()),
        ..BiosInfo::default()
    };
    let b = config.bios.as_ref().unwrap_or(&seabios);
    let (vendor, version, date) = (b.vendor.as_deref(), b.version.as_deref(), b.date.as_deref());
    let (major, minor) = b.release.unwrap_or((0, 0));
    let mut t = Structure::new(0, 0x000);
    t.string(vendor)
        .string(version)
        .u16(0xe800) // starting address segment
        .string(date)
        .u8(0) // ROM size: 64 KiB
        .u64(0x08) // characteristics not supported
        .u8(0)
        .u8(match &config.bios {
            // Targeted content distribution, VM, UEFI (QEMU's).
            Some(b) => 0x14 | if b.uefi { 0x08 } else { 0 },
            None => 0x04,
        })
        .u8(major)
        .u8(minor)
        .u8(0xff) // no embedded controller
        .u8(0xff);
    structures.push(t.finish());

    // Type 1.
    let s = &config.system;
    let mut t = Structure::new(1, 0x100);
    t.string(or(&s.manufacturer, DEFAULT_MANUFACTURER))
        .string(or(&s.product, DEFAULT_PRODUCT))
        .string(or(&s.version, &config.machine))
        .string(s.serial.as_deref())
        .bytes(&uuid_wire_bytes(&s.uuid.unwrap_or([0; 16])))
        .u8(0x06) // wake-up type: power switch
        .string(s.sku.as_deref())
        .string(s.family.as_deref());
    structures.push(t.finish());

    // Type 2, only when asked for.
    if let Some(bb) = &config.baseboard {
        let mut t = Structure::new(2, 0x200);
        t.string(or(&bb.manufacturer, DEFAULT_MANUFACTURER))
            .string(or(&bb.product, DEFAULT_PRODUCT))
            .string(or(&bb.version, &config.machine))
            .string(bb.serial.as_deref())
            .string(bb.asset.as_deref())
            .u8(0x01) // feature flags: a motherboard
            .string(bb.location.as_deref())
            .u16(0x300) // the chassis
            .u8(0x0a) // board type: motherboard
            .u8(0);
        structures.push(t.finish());
    }

    // Type 3.
    let c = &config.chassis;
    let mut t = Structure::new(3, 0x300);
    t.string(or(&c.manufacturer, DEFAULT_MANUFACTURER))
        .u8(0x01) // type: other
        .string(or(&c.version, &config.machine))
        .string(c.serial.as_deref())
        .string(c.asset.as_deref())
        .u8(0x03) // boot-up state: safe
        .u8(0x03) // power supply state: safe
        .u8(0x03) // thermal state: safe
        .u8(0x02) // security status: unknown
        .u32(0) // OEM defined
        .u8(0) // height
        .u8(0) // power cords
        .u8(0) // contained elements
        .u8(0) // their record length
        .string(c.sku.as_deref());
    structures.push(t.finish());

    // Type 4, one per socket (SMBIOS 2.8 length).
    for socket in 0..config.sockets.max(1) {
        let designation = format!("CPU{socket:2x}");
        let mut t = Structure::new(4, 0x400 + socket as u16);
        t.string(Some(&designation))
            .u8(0x03) // central processor
            .u8(0x01) // family: other
            .string(Some(DEFAULT_MANUFACTURER))
            .u64(config.processor_id)
            .string(Some(config.machine.as_str()))
            .u8(0) // voltage
            .u16(0) // external clock: unknown
            .u16(T4_MAX_SPEED_MHZ)
            .u16(T4_MAX_SPEED_MHZ)
            .u8(0x41) // socket populated, CPU enabled
            .u8(0x01) // upgrade: other
            .u16(0xffff) // no L1, L2, L3 cache structures
            .u16(0xffff)
            .u16(0xffff)
            .string(None) // serial
            .string(None) // asset tag
            .string(None) // part number
            .u8(config.cores.min(255) as u8)
            .u8(config.cores.min(255) as u8)
            .u8(config.threads.min(255) as u8)
            .u16(0x02) // characteristics: unknown
            .u16(0x01); // family 2: other
        structures.push(t.finish());
    }

    // Type 11.
    if !config.oem_strings.is_empty() {
        let mut t = Structure::new(11, 0xe00);
        t.u8(config.oem_strings.len().min(255) as u8);
        for s in config.oem_strings.iter().take(255) {
            t.strings.extend_from_slice(s.as_bytes());
            t.strings.push(0);
        }
        structures.push(t.finish());
    }

    // Types 16 and 17: the RAM as 16 GiB DIMMs.
    let ram = layout.ram_bytes();
    let dimms = ram.div_ceil(MAX_DIMM_BYTES);
    let size_kb = ram.div_ceil(1 << 10);
    let mut t = Structure::new(16, 0x1000);
    t.u8(0x01) // location: other
        .u8(0x03) // use: system memory
        .u8(0x06); // error correction: multi-bit ECC
    if size_kb < 0x8000_0000 {
        t.u32(size_kb as u32);
    } else {
        t.u32(0x8000_0000);
    }
    t.u16(0xfffe) // no memory error information
        .u16(dimms as u16)
        .u64(if size_kb < 0x8000_0000 { 0 } else { ram });
    structures.push(t.finish());
    for i in 0..dimms {
        let size = if i + 1 < dimms {
            MAX_DIMM_BYTES
        } else {
            (ram - 1) % MAX_DIMM_BYTES + 1
        };
        let size_mb = size.div_ceil(1 << 20);
        let (std_size, ext) = if size_mb < 0x7fff {
            (size_mb as u16, 0)
        } else {
            (0x7fff, size_mb as u32)
        };
        let locator = format!("DIMM {i}");
        let mut t = Structure::new(17, 0x1100 + i as u16);
        t.u16(0x1000) // the type 16 array
            .u16(0xfffe)
            .u16(0xffff) // total width: unknown
            .u16(0xffff) // data width: unknown
            .u16(std_size)
            .u8(0x09) // DIMM
            .u8(0) // not in a set
            .string(Some(&locator))
            .string(None) // bank locator
            .u8(0x07) // RAM
            .u16(0x02) // type detail: other
            .u16(0) // speed: unknown
            .string(Some(DEFAULT_MANUFACTURER))
            .string(None) // serial
            .string(None) // asset tag
            .string(None) // part number
            .u8(0) // attributes
            .u32(ext)
            .u16(0) // configured speed
            .u16(0) // voltages: unknown
            .u16(0)
            .u16(0);
        structures.push(t.finish());
    }

    // Type 19, one per RAM range.
    for (i, (start, len)) in layout.ranges().into_iter().enumerate() {
        let start = start.0;
        let end = start + len - 1;
        let (start_kb, end_kb) = (start >> 10, end >> 10);
        let mut t = Structure::new(19, 0x1300 + i as u16);
        if start_kb < u64::from(u32::MAX) && end_kb < u64::from(u32::MAX) {
            t.u32(start_kb as u32).u32(end_kb as u32);
        } else {
            t.u32(u32::MAX).u32(u32::MAX);
        }
        t.u16(0x1000).u8(1);
        if start_kb < u64::from(u32::MAX) && end_kb < u64::from(u32::MAX) {
            t.u64(0).u64(0);
        } else {
            t.u64(start).u64(end);
        }
        structures.push(t.finish());
    }

    // Type 32: no errors detected.
    let mut t = Structure::new(32, 0x2000);
    t.bytes(&[0; 6]).u8(0);
    structures.push(t.finish());

    structures.push(Structure::new(127, 0x7f00).finish());

    let table: Vec<u8> = structures.concat();
    if table.len() > SMBIOS_TABLE_MAX {
        return Err(SmbiosError::TooLarge {
            bytes: table.len(),
            max: SMBIOS_TABLE_MAX,
        });
    }
    let max_structure = structures.iter().map(Vec::len).max().unwrap_or(0);

    let mut ep = Vec::with_capacity(ENTRY_POINT_LEN);
    ep.extend_from_slice(b"_SM_");
    ep.push(0); // checksum, below
    ep.push(ENTRY_POINT_LEN as u8);
    ep.extend_from_slice(&[2, 8]); // SMBIOS 2.8
    ep.extend_from_slice(&(max_structure as u16).to_le_bytes());
    ep.push(0); // entry point revision
    ep.extend_from_slice(&[0; 5]); // formatted area
    ep.extend_from_slice(b"_DMI_");
    ep.push(0); // intermediate checksum, below
    ep.extend_from_slice(&(table.len() as u16).to_le_bytes());
    ep.extend_from_slice(&(SMBIOS_TABLE_START as u32).to_le_bytes());
    ep.extend_from_slice(&(structures.len() as u16).to_le_bytes());
    ep.push(0x28); // BCD revision 2.8
    ep[0x15] = checksum(&ep[0x10..]);
    ep[4] = checksum(&ep);
    Ok(SmbiosTables {
        entry_point: ep,
        table,
    })
}

/// Builds the tables ([`smbios_tables`]) and writes them into guest memory
/// at [`SMBIOS_START`] and [`SMBIOS_TABLE_START`].
///
/// # Errors
/// [`BootError::Smbios`] for a configuration that cannot be built,
/// [`BootError::GuestMemory`] when the memory does not cover the area.
pub fn write_smbios<M: GuestMemoryBackend>(
    mem: &M,
    layout: &MemoryLayout,
    config: &SmbiosConfig,
) -> Result<(), BootError> {
    let tables = smbios_tables(config, layout)?;
    for (what, gpa, bytes) in [
        ("SMBIOS entry point", SMBIOS_START, &tables.entry_point),
        ("SMBIOS structure table", SMBIOS_TABLE_START, &tables.table),
    ] {
        mem.write_slice(bytes, GuestAddress(gpa))
            .map_err(|source| BootError::GuestMemory { what, gpa, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
