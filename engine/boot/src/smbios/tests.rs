use std::process::Command;

use vm_memory::GuestMemoryMmap;

use super::*;
use crate::layout::{MemoryKind, MemoryLayout};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// One parsed structure: type, handle, formatted area, strings.
#[derive(Debug)]
struct Parsed {
    kind: u8,
    handle: u16,
    formatted: Vec<u8>,
    strings: Vec<String>,
}

impl Parsed {
    /// The string a formatted-area byte at `offset` points to.
    fn str_at(&self, offset: usize) -> Option<&str> {
        match self.formatted[offset] {
            0 => None,
            n => Some(self.strings[n as usize - 1].as_str()),
        }
    }
}

/// Walks the structure table as an OS does.
fn parse(table: &[u8]) -> Vec<Parsed> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < table.len() {
        let len = table[at + 1] as usize;
        let formatted = table[at..at + len].to_vec();
        let mut end = at + len;
        // The string set ends with a double NUL.
        while !(table[end] == 0 && table[end + 1] == 0) {
            end += 1;
        }
        let raw = &table[at + len..end];
        let strings: Vec<String> = if raw.is_empty() {
            Vec::new()
        } else {
            raw.split(|b| *b == 0)
                .map(|s| String::from_utf8(s.to_vec()).expect("utf-8"))
                .collect()
        };
        out.push(Parsed {
            kind: formatted[0],
            handle: u16::from_le_bytes([formatted[2], formatted[3]]),
            formatted,
            strings,
        });
        at = end + 2;
    }
    assert_eq!(at, table.len(), "the walk ends at the table's end");
    out
}

fn nova() -> SmbiosConfig {
    let mut c = SmbiosConfig::for_vcpus(2);
    for (k, v) in [
        ("manufacturer", "OpenStack Foundation"),
        ("product", "OpenStack Nova"),
        ("version", "26.1.0"),
        ("serial", "9b0e3a55-5c28-4a3c-8e1d-3e4cd0c0a001"),
        ("uuid", "c7a5fdbd-cdaf-9455-926a-d65c16db1809"),
        ("family", "Virtual Machine"),
    ] {
        c.set(1, k, v).expect("valid type 1 field");
    }
    c
}

fn layout(bytes: u64) -> MemoryLayout {
    MemoryLayout::new(bytes).expect("layout")
}

#[test]
fn entry_point_checksums_and_counts_match_the_table() {
    for (config, ram) in [
        (SmbiosConfig::default(), 128 * MIB),
        (nova(), 6 * GIB),
        (SmbiosConfig::for_vcpus(64), 40 * GIB),
    ] {
        let t = smbios_tables(&config, &layout(ram)).expect("tables");
        let ep = &t.entry_point;
        assert_eq!(ep.len(), 0x1f);
        assert_eq!(&ep[..4], b"_SM_");
        assert_eq!(&ep[0x10..0x15], b"_DMI_");
        assert_eq!(checksum(ep), 0, "entry point checksum");
        assert_eq!(checksum(&ep[0x10..]), 0, "intermediate checksum");
        assert_eq!((ep[5], ep[6], ep[7], ep[0x1e]), (0x1f, 2, 8, 0x28));
        assert_eq!(
            u16::from_le_bytes([ep[0x16], ep[0x17]]) as usize,
            t.table.len()
        );
        assert_eq!(
            u32::from_le_bytes(ep[0x18..0x1c].try_into().unwrap()) as u64,
            SMBIOS_TABLE_START
        );
        let parsed = parse(&t.table);
        assert_eq!(
            u16::from_le_bytes([ep[0x1c], ep[0x1d]]) as usize,
            parsed.len()
        );
        let max = parsed
            .iter()
            .map(|p| {
                p.formatted.len()
                    + p.strings.iter().map(|s| s.len() + 1).sum::<usize>()
                    + 1
                    + usize::from(p.strings.is_empty())
            })
            .max()
            .unwrap();
        assert_eq!(u16::from_le_bytes([ep[8], ep[9]]) as usize, max);
        assert_eq!(parsed.last().unwrap().kind, 127);
        let mut handles: Vec<u16> = parsed.iter().map(|p| p.handle).collect();
        handles.dedup();
        assert_eq!(handles.len(), parsed.len(), "handles are unique");
    }
}

#[test]
fn default_tables_are_qemu_pc_i440fx_7_2s() {
    let t = smbios_tables(&SmbiosConfig::for_vcpus(3), &layout(512 * MIB)).expect("tables");
    let p = parse(&t.table);
    let kinds: Vec<u8> = p.iter().map(|p| p.kind).collect();
    assert_eq!(kinds, vec![0, 1, 3, 4, 4, 4, 16, 17, 19, 32, 127]);
    let lens: Vec<usize> = p.iter().map(|p| p.formatted.len()).collect();
    assert_eq!(lens, vec![24, 27, 22, 42, 42, 42, 23, 40, 31, 11, 4]);

    let bios = &p[0];
    assert_eq!(bios.str_at(4), Some("SeaBIOS"));
    assert_eq!(bios.str_at(5), Some(DEFAULT_BIOS_VERSION));
    assert_eq!(bios.str_at(8), Some("04/01/2014"));
    assert_eq!(
        bios.formatted[0x13], 0x04,
        "SeaBIOS: targeted content distribution only"
    );
    let sys = &p[1];
    assert_eq!(sys.strings, vec!["QEMU", DEFAULT_PRODUCT, "pc-i440fx-7.2"]);
    assert_eq!(
        (sys.formatted[7], sys.formatted[8..24].to_vec()),
        (0, vec![0; 16])
    );
    assert_eq!(sys.formatted[24], 0x06, "wake-up: power switch");
    assert_eq!(
        (sys.formatted[25], sys.formatted[26]),
        (0, 0),
        "no SKU, family"
    );
    assert_eq!(p[2].strings, vec!["QEMU", "pc-i440fx-7.2"]);
    let sockets: Vec<(&str, u16)> = p[3..6]
        .iter()
        .map(|t| (t.str_at(4).unwrap(), t.handle))
        .collect();
    assert_eq!(
        sockets,
        vec![("CPU 0", 0x400), ("CPU 1", 0x401), ("CPU 2", 0x402)]
    );
    // Type 17: 512 MiB in one DIMM; type 19: [0, 512 MiB) in KiB.
    assert_eq!(p[7].str_at(0x10), Some("DIMM 0"));
    assert_eq!(
        u16::from_le_bytes([p[7].formatted[12], p[7].formatted[13]]),
        512
    );
    assert_eq!(&p[8].formatted[4..12], &[0, 0, 0, 0, 0xff, 0xff, 0x07, 0]);
    // The end-of-table structure has no strings: two NULs.
    assert_eq!(&t.table[t.table.len() - 6..], &[127, 4, 0, 0x7f, 0, 0]);
}

/// A guest started with an older `pc-i440fx-*` sees that name where QEMU
/// writes the machine type: types 1, 2 and 3 version, type 4 processor
/// version; a version given still wins.
#[test]
fn versions_name_the_machine_type_the_guest_was_started_with() {
    let mut c = SmbiosConfig::for_vcpus(2);
    c.machine = "pc-i440fx-4.2".into();
    c.add_table(2).expect("type 2");
    let p = parse(&smbios_tables(&c, &layout(64 * MIB)).expect("tables").table);
    let kinds: Vec<u8> = p.iter().map(|p| p.kind).collect();
    assert_eq!(kinds, vec![0, 1, 2, 3, 4, 4, 16, 17, 19, 32, 127]);
    assert_eq!(p[1].strings, vec!["QEMU", DEFAULT_PRODUCT, "pc-i440fx-4.2"]);
    assert_eq!(p[2].strings, vec!["QEMU", DEFAULT_PRODUCT, "pc-i440fx-4.2"]);
    assert_eq!(p[3].str_at(6), Some("pc-i440fx-4.2"));
    for t in &p[4..6] {
        assert_eq!(t.str_at(0x10), Some("pc-i440fx-4.2"));
    }
    c.set(1, "version", "26.1.0").expect("valid");
    let p = parse(&smbios_tables(&c, &layout(64 * MIB)).expect("tables").table);
    assert_eq!(p[1].str_at(6), Some("26.1.0"));
    assert_eq!(p[3].str_at(6), Some("pc-i440fx-4.2"));
}

#[test]
fn type1_string_set_holds_the_given_fields_in_order() {
    let mut c = nova();
    c.set(1, "sku", "").expect("empty is allowed");
    let t = smbios_tables(&c, &layout(256 * MIB)).expect("tables");
    let sys = &parse(&t.table)[1];
    assert_eq!(
        sys.strings,
        vec![
            "OpenStack Foundation",
            "OpenStack Nova",
            "26.1.0",
            "9b0e3a55-5c28-4a3c-8e1d-3e4cd0c0a001",
            "Virtual Machine"
        ]
    );
    assert_eq!(&sys.formatted[4..8], &[1, 2, 3, 4]);
    // An empty SKU is absent; the family is string 5.
    assert_eq!((sys.formatted[25], sys.formatted[26]), (0, 5));
}

#[test]
fn uuid_is_stored_with_its_first_three_fields_little_endian() {
    let uuid = parse_uuid("00112233-4455-6677-8899-AaBbCcDdEeFf").expect("valid");
    assert_eq!(
        uuid,
        [
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff
        ]
    );
    let mut c = SmbiosConfig::default();
    c.system.uuid = Some(uuid);
    let t = smbios_tables(&c, &layout(64 * MIB)).expect("tables");
    assert_eq!(
        &parse(&t.table)[1].formatted[8..24],
        &[
            0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff
        ]
    );
    for bad in [
        "",
        "00112233-4455-6677-8899-aabbccddeef",
        "00112233-4455-6677-8899-aabbccddeeffa",
        "0011223-34455-6677-8899-aabbccddeeff",
        "00112233-4455-6677-8899-aabbccddeegg",
        "00112233445566778899aabbccddeeff",
    ] {
        assert_eq!(
            parse_uuid(bad),
            Err(SmbiosError::BadUuid { uuid: bad.into() }),
            "{bad}"
        );
    }
    let err = SmbiosConfig::default().set(1, "uuid", "nope").unwrap_err();
    assert!(err.to_string().contains("8-4-4-4-12"), "{err}");
}

#[test]
fn large_memory_uses_several_dimms_and_a_high_range() {
    let t = smbios_tables(&SmbiosConfig::default(), &layout(40 * GIB)).expect("tables");
    let p = parse(&t.table);
    let t16 = p.iter().find(|p| p.kind == 16).unwrap();
    assert_eq!(
        u32::from_le_bytes(t16.formatted[7..11].try_into().unwrap()),
        40 << 20,
        "capacity in KiB"
    );
    assert_eq!(
        u16::from_le_bytes([t16.formatted[13], t16.formatted[14]]),
        3
    );
    let sizes: Vec<u16> = p
        .iter()
        .filter(|p| p.kind == 17)
        .map(|p| u16::from_le_bytes([p.formatted[12], p.formatted[13]]))
        .collect();
    assert_eq!(sizes, vec![16384, 16384, 8192]);
    let ranges: Vec<(u32, u32)> = p
        .iter()
        .filter(|p| p.kind == 19)
        .map(|p| {
            (
                u32::from_le_bytes(p.formatted[4..8].try_into().unwrap()),
                u32::from_le_bytes(p.formatted[8..12].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(
        ranges,
        vec![(0, (3 << 20) - 1), (4 << 20, ((4 + 37) << 20) - 1)]
    );
}

#[test]
fn baseboard_chassis_bios_and_oem_strings_as_libvirt_passes_them() {
    let mut c = SmbiosConfig::default();
    for (table, k, v) in [
        (0, "vendor", "LENOVO"),
        (0, "release", "1.2"),
        (2, "manufacturer", "Board Inc"),
        (2, "location", "slot 3"),
        (3, "serial", "CH-1"),
        (3, "sku", "chassis-sku"),
        (11, "value", "first"),
        (11, "value", "second"),
    ] {
        c.set(table, k, v).expect("valid");
    }
    let t = smbios_tables(&c, &layout(64 * MIB)).expect("tables");
    let p = parse(&t.table);
    let kinds: Vec<u8> = p.iter().map(|p| p.kind).collect();
    assert_eq!(kinds, vec![0, 1, 2, 3, 4, 11, 16, 17, 19, 32, 127]);
    // Type 0 fields given: the others are absent, as in QEMU.
    assert_eq!(p[0].strings, vec!["LENOVO"]);
    assert_eq!((p[0].formatted[5], p[0].formatted[8]), (0, 0));
    assert_eq!((p[0].formatted[0x14], p[0].formatted[0x15]), (1, 2));
    assert_eq!(
        p[0].formatted[0x13], 0x14,
        "QEMU's: targeted content distribution, VM"
    );
    assert_eq!(
        p[2].strings,
        vec!["Board Inc", DEFAULT_PRODUCT, DEFAULT_VERSION, "slot 3"]
    );
    assert_eq!(
        p[3].strings,
        vec!["QEMU", DEFAULT_VERSION, "CH-1", "chassis-sku"]
    );
    assert_eq!(p[3].formatted[0x15], 4, "SKU is string 4");
    assert_eq!(p[5].formatted[4], 2);
    assert_eq!(p[5].strings, vec!["first", "second"]);
}

#[test]
fn invalid_input_is_refused_with_a_typed_error() {
    let mut c = SmbiosConfig::default();
    assert_eq!(
        c.set(4, "x", "y"),
        Err(SmbiosError::UnknownType { table: 4 })
    );
    let err = c.set(1, "colour", "red").unwrap_err();
    assert!(
        matches!(err, SmbiosError::UnknownKey { table: 1, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("serial"), "{err}");
    for bad in ["1", "1.", "256.0", "a.b"] {
        assert!(
            matches!(
                c.set(0, "release", bad),
                Err(SmbiosError::BadRelease { .. })
            ),
            "{bad}"
        );
    }
    assert!(matches!(
        c.set(1, "serial", "a\0b"),
        Err(SmbiosError::StringHasNul { .. })
    ));
    assert!(matches!(
        c.set(0, "uefi", "maybe"),
        Err(SmbiosError::BadBool { .. })
    ));

    c.set(1, "serial", &"x".repeat(SMBIOS_TABLE_MAX))
        .expect("set");
    let err = smbios_tables(&c, &layout(64 * MIB)).unwrap_err();
    assert!(
        matches!(
            err,
            SmbiosError::TooLarge {
                max: SMBIOS_TABLE_MAX,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("shorten"), "{err}");
}

#[test]
fn tables_sit_beside_the_mp_table_in_reserved_memory() {
    let (_, mp) = crate::mptable(crate::MPTABLE_MAX_CPUS).expect("mp table");
    assert!(crate::MP_CONFIG_START + mp.len() as u64 <= SMBIOS_START);
    assert_eq!(SMBIOS_START % 16, 0);
    assert!((0xf_0000..0x10_0000).contains(&SMBIOS_START));
    let l = layout(256 * MIB);
    let reserved = l
        .memory_map()
        .into_iter()
        .find(|e| e.kind == MemoryKind::Reserved)
        .expect("a reserved range");
    let t = smbios_tables(&SmbiosConfig::for_vcpus(64), &l).expect("tables");
    assert!(reserved.addr <= SMBIOS_START);
    assert!(SMBIOS_TABLE_START + t.table.len() as u64 <= reserved.addr + reserved.size);
}

fn dmidecode() -> &'static str {
    let path = "/usr/sbin/dmidecode";
    assert!(
        std::path::Path::new(path).exists(),
        "{path} is missing: install dmidecode (scripts/deps --tests)"
    );
    path
}

fn run_dmidecode(args: &[&str]) -> String {
    let out = Command::new(dmidecode())
        .args(args)
        .output()
        .expect("run dmidecode");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dmidecode {args:?} failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn assert_nova_fields(text: &str) {
    for want in [
        "SMBIOS 2.8 present.",
        "\tVendor: SeaBIOS",
        "\tVersion: 1.16.2-debian-1.16.2-1",
        "\tManufacturer: OpenStack Foundation",
        "\tProduct Name: OpenStack Nova",
        "\tVersion: 26.1.0",
        "\tSerial Number: 9b0e3a55-5c28-4a3c-8e1d-3e4cd0c0a001",
        "\tUUID: c7a5fdbd-cdaf-9455-926a-d65c16db1809",
        "\tFamily: Virtual Machine",
        "\tWake-up Type: Power Switch",
        "\tSocket Designation: CPU 1",
        "\tMaximum Capacity: 6 GB",
        "\tSize: 6 GB",
        "\tLocator: DIMM 0",
        "\tEnding Address: 0x000BFFFFFFF",
        "\tEnding Address: 0x001BFFFFFFF",
        "End Of Table",
    ] {
        assert!(text.contains(want), "dmidecode lacks {want:?}:\n{text}");
    }
    assert!(!text.contains("Invalid"), "{text}");
    assert!(!text.contains("checksum"), "{text}");
}

/// dmidecode reads a `--dump-bin` file: the entry point at offset 0 whose
/// table address is the table's file offset.
#[test]
fn dmidecode_decodes_a_dump_of_the_tables() {
    let t = smbios_tables(&nova(), &layout(6 * GIB)).expect("tables");
    let mut ep = t.entry_point.clone();
    ep[0x18..0x1c].copy_from_slice(&32u32.to_le_bytes());
    ep[0x15] = 0;
    ep[0x15] = checksum(&ep[0x10..]);
    ep[4] = 0;
    ep[4] = checksum(&ep);
    let mut dump = ep;
    dump.resize(32, 0);
    dump.extend_from_slice(&t.table);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("smbios.bin");
    std::fs::write(&file, &dump).expect("write dump");
    let text = run_dmidecode(&["--from-dump", file.to_str().unwrap()]);
    assert_nova_fields(&text);
}

/// dmidecode scans an image of the first MiB of guest memory for the entry
/// point, as Linux's dmi_scan_machine does, with the MP table written too.
#[test]
fn dmidecode_finds_the_tables_in_guest_memory_beside_the_mp_table() {
    let l = layout(6 * GIB);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
    crate::write_mptable(&mem, 2).expect("mp table");
    // The layout's high range is not backed here: only the first MiB matters.
    write_smbios(&mem, &l, &nova()).expect("smbios");
    let mut image = vec![0u8; 1 << 20];
    mem.read_slice(&mut image, GuestAddress(0)).expect("read");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("mem.bin");
    std::fs::write(&file, &image).expect("write image");
    let text = run_dmidecode(&["--no-sysfs", "--dev-mem", file.to_str().unwrap()]);
    assert_nova_fields(&text);
    // The MP table is intact.
    let (_, mp) = crate::mptable(2).expect("mp table");
    let at = crate::MP_CONFIG_START as usize;
    assert_eq!(&image[at..at + mp.len()], &mp[..]);
}

#[test]
fn a_table_given_without_fields_is_built_as_qemu_builds_it() {
    let mut c = SmbiosConfig::default();
    c.add_table(2).expect("type 2");
    c.add_table(0).expect("type 0");
    let t = smbios_tables(&c, &layout(64 * MIB)).expect("tables");
    let p = parse(&t.table);
    // Type 0 from no fields: no strings at all; type 2 with QEMU's defaults.
    assert_eq!((p[0].kind, p[0].strings.len()), (0, 0));
    assert_eq!(p[2].kind, 2);
    assert_eq!(p[2].strings, vec!["QEMU", DEFAULT_PRODUCT, DEFAULT_VERSION]);
    assert_eq!(c.add_table(17), Err(SmbiosError::UnknownType { table: 17 }));
}
