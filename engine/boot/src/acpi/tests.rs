use std::path::Path;
use std::process::{Command, Stdio};

use vm_memory::GuestMemoryMmap;

use super::*;

const GIB: u64 = 1 << 30;
/// Where the fake firmware puts the files (SeaBIOS: high memory, F segment).
const HIGH_ADDR: u64 = 0x7ffd_f000;
const FSEG_ADDR: u64 = 0xf_5a40;

/// A Nova-like guest: 6 GiB, a virtio-net in slot 3 and a virtio-blk in slot 4.
fn config(vcpus: u32) -> AcpiConfig {
    let mut c = AcpiConfig::new(vcpus, &MemoryLayout::new(6 * GIB).expect("layout"));
    for slot in [3, 4] {
        c.pci.push(PciFunction {
            slot,
            function: 0,
            pin: Some(IntxPin::A),
        });
    }
    c
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Runs the script as SeaBIOS would, with the files at fake addresses.
fn link(f: &AcpiFwCfg) -> Vec<LoadedFile> {
    execute_table_loader(
        &f.table_loader,
        &[(ACPI_RSDP_FILE, &f.rsdp), (ACPI_TABLES_FILE, &f.tables)],
        |_, zone, _, _| match zone {
            LoaderZone::High => HIGH_ADDR,
            LoaderZone::FSeg => FSEG_ADDR,
        },
    )
    .expect("the script runs")
}

/// Guest physical memory as a reader of tables.
trait Phys {
    fn read(&self, addr: u64, len: usize) -> Vec<u8>;

    /// The table at `addr`, its length from its header.
    fn table(&self, addr: u64) -> Vec<u8> {
        let head = self.read(addr, 36);
        self.read(addr, u32_at(&head, 4) as usize)
    }
}

impl Phys for Vec<LoadedFile> {
    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let f = self
            .iter()
            .find(|f| addr >= f.addr && addr + len as u64 <= f.addr + f.data.len() as u64)
            .unwrap_or_else(|| panic!("{addr:#x}+{len} is in no loaded file"));
        let at = (addr - f.addr) as usize;
        f.data[at..at + len].to_vec()
    }
}

impl Phys for GuestMemoryMmap<()> {
    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.read_slice(&mut v, GuestAddress(addr)).expect("read");
        v
    }
}

/// The tables an OS finds from the RSDP, each checked as it is found.
#[derive(Debug)]
struct Found {
    rsdt: Vec<u8>,
    fadt: Vec<u8>,
    fadt_addr: u64,
    facs: Vec<u8>,
    facs_addr: u64,
    dsdt: Vec<u8>,
    dsdt_addr: u64,
    madt: Vec<u8>,
    waet: Vec<u8>,
}

fn check_table(t: &[u8], sig: &[u8; 4], revision: u8) {
    assert_eq!(&t[..4], sig);
    assert_eq!(u32_at(t, 4) as usize, t.len());
    assert_eq!(t[8], revision, "{} revision", String::from_utf8_lossy(sig));
    assert_eq!(sum(t), 0, "{} checksum", String::from_utf8_lossy(sig));
    assert_eq!(&t[10..16], b"BOCHS ");
    assert_eq!(&t[16..24], b"BXPC    ");
    assert_eq!(&t[28..32], b"BXPC");
}

fn walk(mem: &dyn Phys, rsdp_addr: u64) -> Found {
    let rsdp = mem.read(rsdp_addr, 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
    assert_eq!(rsdp[15], 2, "RSDP revision");
    assert_eq!(u32_at(&rsdp, 20), 36);
    assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
    assert_eq!(&rsdp[9..15], b"BOCHS ");

    let rsdt = mem.table(u64::from(u32_at(&rsdp, 16)));
    check_table(&rsdt, b"RSDT", 1);
    let xsdt = mem.table(u64_at(&rsdp, 24));
    check_table(&xsdt, b"XSDT", 1);
    let from_rsdt: Vec<u64> = rsdt[36..]
        .chunks(4)
        .map(|e| u64::from(u32_at(e, 0)))
        .collect();
    let from_xsdt: Vec<u64> = xsdt[36..].chunks(8).map(|e| u64_at(e, 0)).collect();
    assert_eq!(from_rsdt, from_xsdt, "RSDT and XSDT list the same tables");
    let sigs: Vec<Vec<u8>> = from_rsdt.iter().map(|&a| mem.read(a, 4)).collect();
    assert_eq!(sigs, [b"FACP".to_vec(), b"APIC".to_vec(), b"WAET".to_vec()]);
    let waet = mem.table(from_rsdt[2]);
    check_table(&waet, b"WAET", 1);
    assert_eq!(u32_at(&waet, 36), 2, "ACPI PM timer good");

    let fadt_addr = from_rsdt[0];
    let fadt = mem.table(fadt_addr);
    check_table(&fadt, b"FACP", 3);
    assert_eq!(fadt.len(), 244);
    let dsdt_addr = u64::from(u32_at(&fadt, 40));
    assert_eq!(u64_at(&fadt, 140), dsdt_addr, "X_DSDT = DSDT");
    let dsdt = mem.table(dsdt_addr);
    check_table(&dsdt, b"DSDT", 1);
    let facs_addr = u64::from(u32_at(&fadt, 36));
    assert_eq!(facs_addr % 64, 0, "FACS 64-byte aligned");
    let facs = mem.read(facs_addr, 64);
    assert_eq!(&facs[..4], b"FACS");
    assert_eq!(u32_at(&facs, 4), 64);
    let madt = mem.table(from_rsdt[1]);
    check_table(&madt, b"APIC", 1);
    Found {
        rsdt,
        fadt,
        fadt_addr,
        facs,
        facs_addr,
        dsdt,
        dsdt_addr,
        madt,
        waet,
    }
}

fn linked(c: &AcpiConfig) -> (Vec<LoadedFile>, Found) {
    let files = link(&AcpiFwCfg::new(c).expect("tables"));
    let found = walk(&files, FSEG_ADDR);
    (files, found)
}

#[test]
fn linked_tables_chain_from_the_rsdp_with_valid_checksums() {
    for vcpus in [1, 2, 8, 9, ACPI_MAX_CPUS] {
        let (files, found) = linked(&config(vcpus));
        assert_eq!(files.len(), 2);
        let rsdp = files.iter().find(|f| f.name == ACPI_RSDP_FILE).unwrap();
        assert_eq!(rsdp.zone, LoaderZone::FSeg);
        // Everything but the RSDP is in the tables file, FACS first.
        assert_eq!(found.facs_addr, HIGH_ADDR);
        assert!(found.dsdt_addr > HIGH_ADDR && found.fadt_addr > HIGH_ADDR);
        assert_eq!(found.facs[32], 0, "FACS version as QEMU's");
        assert_eq!(found.rsdt.len(), 36 + 3 * 4);
    }
}

#[test]
fn the_unlinked_blob_holds_offsets_into_itself() {
    let (f, offsets) = build_acpi_tables(&config(2)).expect("tables");
    let at = |sig: &[u8; 4]| offsets.iter().find(|(s, _, _)| s == sig).unwrap().1;
    assert_eq!(at(b"FACS"), 0);
    let fadt = &f.tables[at(b"FACP")..];
    assert_eq!(u32_at(fadt, 36), 0, "FIRMWARE_CTRL: offset of the FACS");
    assert_eq!(u32_at(fadt, 40) as usize, at(b"DSDT"));
    assert_eq!(u32_at(&f.rsdp, 16) as usize, at(b"RSDT"));
    assert_eq!(u64_at(&f.rsdp, 24) as usize, at(b"XSDT"));
    // Tables are back to back and fill the file.
    let mut end = 0;
    for (_, start, len) in &offsets {
        assert_eq!(*start, end);
        end += len;
    }
    assert_eq!(end, f.tables.len());
}

/// MADT subtables: `(type, bytes)`.
fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut v = Vec::new();
    let mut at = 44;
    while at < madt.len() {
        let len = madt[at + 1] as usize;
        assert!(len >= 2 && at + len <= madt.len(), "subtable length");
        v.push((madt[at], madt[at..at + len].to_vec()));
        at += len;
    }
    v
}

#[test]
fn madt_has_a_local_apic_per_vcpu_and_qemus_overrides() {
    for vcpus in [1u32, 2, 4, 9, 64] {
        let (_, found) = linked(&config(vcpus));
        let m = &found.madt;
        assert_eq!(u32_at(m, 36), 0xfee0_0000, "local APIC address");
        assert_eq!(u32_at(m, 40), 1, "PCAT_COMPAT");
        let entries = madt_entries(m);
        let lapics: Vec<&Vec<u8>> = entries
            .iter()
            .filter(|(t, _)| *t == 0)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(lapics.len() as u32, vcpus);
        for (i, e) in lapics.iter().enumerate() {
            assert_eq!(e.len(), 8);
            assert_eq!((e[2], e[3]), (i as u8, i as u8), "UID and APIC ID");
            assert_eq!(u32_at(e, 4), 1, "enabled");
        }
        let ioapics: Vec<&Vec<u8>> = entries
            .iter()
            .filter(|(t, _)| *t == 1)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!(ioapics[0][2] as u32, vcpus, "I/O APIC ID");
        assert_eq!(u32_at(ioapics[0], 4), 0xfec0_0000);
        assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");
        let overrides: Vec<(u8, u8, u32, u16)> = entries
            .iter()
            .filter(|(t, _)| *t == 2)
            .map(|(_, e)| (e[2], e[3], u32_at(e, 4), u16_at(e, 8)))
            .collect();
        assert_eq!(
            overrides,
            [
                (0, 0, 2, 0),
                (0, 5, 5, 0xd),
                (0, 9, 9, 0xd),
                (0, 10, 10, 0xd),
                (0, 11, 11, 0xd)
            ]
        );
        let nmis: Vec<&Vec<u8>> = entries
            .iter()
            .filter(|(t, _)| *t == 4)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(
            nmis,
            [&vec![4u8, 6, 0xff, 0, 0, 1]],
            "NMI on LINT1, all CPUs"
        );
        assert_eq!(entries.len() as u32, vcpus + 1 + 5 + 1);
    }
}

#[test]
fn fadt_describes_the_piix4_pm_as_qemu() {
    let (_, found) = linked(&config(2));
    let f = &found.fadt;
    assert_eq!(f[44], 1, "INT_MODEL");
    assert_eq!(u16_at(f, 46), 9, "SCI_INT");
    assert_eq!(u32_at(f, 48), 0xb2, "SMI_CMD");
    assert_eq!((f[52], f[53]), (0xf1, 0xf0), "ACPI_ENABLE, ACPI_DISABLE");
    assert_eq!(u32_at(f, 56), 0x600, "PM1a_EVT_BLK");
    assert_eq!(u32_at(f, 64), 0x604, "PM1a_CNT_BLK");
    assert_eq!(u32_at(f, 76), 0x608, "PM_TMR_BLK");
    assert_eq!(u32_at(f, 80), 0xafe0, "GPE0_BLK");
    assert_eq!(&f[88..93], &[4, 2, 0, 4, 4], "block lengths");
    assert_eq!(u16_at(f, 96), 0xfff, "no C2");
    assert_eq!(u16_at(f, 98), 0xfff, "no C3");
    assert_eq!(f[108], 0x32, "century");
    assert_eq!(u16_at(f, 109), 3, "LEGACY_DEVICES | 8042");
    // WBINVD, PROC_C1, SLP_BUTTON, RTC_S4, RESET_REG_SUP, USE_PLATFORM_CLOCK;
    // PWR_BUTTON clear: the fixed power button.
    assert_eq!(
        u32_at(f, 112),
        1 | 1 << 2 | 1 << 5 | 1 << 7 | 1 << 10 | 1 << 15
    );
    assert_eq!(&f[116..120], &[1, 8, 0, 0], "reset register: 8-bit I/O");
    assert_eq!(u64_at(f, 120), 0xcf9);
    assert_eq!(f[128], 6, "reset value");
    assert_eq!(u64_at(f, 132), 0, "X_FIRMWARE_CTRL: the 32-bit one is used");
    for (at, bits, port) in [
        (148, 32, 0x600),
        (172, 16, 0x604),
        (208, 32, 0x608),
        (220, 32, 0xafe0),
    ] {
        assert_eq!(&f[at..at + 4], &[1, bits, 0, 0], "GAS at {at}");
        assert_eq!(u64_at(f, at + 4), port, "GAS at {at}");
    }

    // More than 8 vCPUs: cluster mode; no SMI port; no keyboard.
    let mut c = config(9);
    c.smi_cmd = false;
    c.keyboard = false;
    let (_, found) = linked(&c);
    let f = &found.fadt;
    assert_ne!(u32_at(f, 112) & 1 << 18, 0, "FORCE_APIC_CLUSTER_MODEL");
    assert_eq!((u32_at(f, 48), f[52], f[53]), (0, 0, 0));
    assert_eq!(u16_at(f, 109), 1, "no 8042");
}

#[test]
fn table_loader_script_is_qemus_format() {
    let (f, offsets) = build_acpi_tables(&config(4)).expect("tables");
    let script = &f.table_loader;
    assert_eq!(script.len() % 128, 0);
    // QEMU's layout of ALLOCATE: command, file[56], align, zone.
    let first = &script[..128];
    assert_eq!(u32_at(first, 0), 1);
    assert_eq!(&first[4..20], b"etc/acpi/tables\0");
    assert!(first[20..60].iter().all(|&b| b == 0));
    assert_eq!(u32_at(first, 60), 64);
    assert_eq!(first[64], 1, "ZONE_HIGH");
    assert!(first[65..].iter().all(|&b| b == 0));

    let commands: Vec<LoaderCommand> = script
        .chunks(128)
        .map(|e| {
            LoaderCommand::decode(e.try_into().unwrap())
                .expect("decodes")
                .expect("a known command")
        })
        .collect();
    let size_of = |name: &str| match name {
        ACPI_TABLES_FILE => f.tables.len(),
        ACPI_RSDP_FILE => f.rsdp.len(),
        other => panic!("unknown file {other}"),
    };
    assert_eq!(
        commands[1],
        LoaderCommand::Allocate {
            file: ACPI_RSDP_FILE.into(),
            align: 16,
            zone: LoaderZone::FSeg
        }
    );
    let mut checksummed = Vec::new();
    let mut seen_checksum = false;
    for c in &commands[2..] {
        assert_eq!(c.encode().len(), 128);
        assert_eq!(
            LoaderCommand::decode(&c.encode()).unwrap().as_ref(),
            Some(c)
        );
        match c {
            LoaderCommand::Allocate { .. } => panic!("allocations come first"),
            LoaderCommand::AddPointer {
                dest_file,
                src_file,
                offset,
                size,
            } => {
                assert!(!seen_checksum, "pointers before checksums");
                assert_eq!(src_file, ACPI_TABLES_FILE);
                assert!([4, 8].contains(size));
                assert!(*offset as usize + *size as usize <= size_of(dest_file));
            }
            LoaderCommand::AddChecksum {
                file,
                offset,
                start,
                length,
            } => {
                seen_checksum = true;
                assert!((start + length) as usize <= size_of(file));
                assert!(offset >= start && offset < &(start + length));
                checksummed.push((file.clone(), *start as usize, *length as usize));
            }
        }
    }
    // Every table but the FACS (which has no checksum) is checksummed whole.
    for (sig, at, len) in &offsets {
        let want = (ACPI_TABLES_FILE.to_string(), *at, *len);
        assert_eq!(checksummed.contains(&want), sig != b"FACS", "{sig:?}");
    }
    assert!(checksummed.contains(&(ACPI_RSDP_FILE.into(), 0, 20)));
    assert_eq!(
        checksummed.last(),
        Some(&(ACPI_RSDP_FILE.into(), 0, 36)),
        "the extended checksum last"
    );
    // FADT FIRMWARE_CTRL, DSDT, X_DSDT; 3 RSDT and 3 XSDT entries; RSDP's 2.
    let pointers = commands
        .iter()
        .filter(|c| matches!(c, LoaderCommand::AddPointer { .. }))
        .count();
    assert_eq!(pointers, 3 + 3 + 3 + 2);
}

#[test]
fn the_executor_refuses_what_seabios_would_trip_on() {
    let f = AcpiFwCfg::new(&config(1)).expect("tables");
    let files: [(&str, &[u8]); 2] = [(ACPI_RSDP_FILE, &f.rsdp), (ACPI_TABLES_FILE, &f.tables)];
    let run = |script: &[u8], addr: u64| {
        execute_table_loader(script, &files, |_, _, _, _| addr).unwrap_err()
    };
    let pointer = |offset: u32| {
        LoaderCommand::AddPointer {
            dest_file: ACPI_RSDP_FILE.into(),
            src_file: ACPI_TABLES_FILE.into(),
            offset,
            size: 4,
        }
        .encode()
    };
    let alloc = |file: &str| {
        LoaderCommand::Allocate {
            file: file.into(),
            align: 64,
            zone: LoaderZone::High,
        }
        .encode()
    };
    // A truncated script.
    assert!(matches!(
        run(&f.table_loader[..100], 0),
        AcpiError::TableLoader { index: 0, .. }
    ));
    // A pointer into a file not allocated yet.
    let e = run(&pointer(16), 0);
    assert!(e.to_string().contains("was not allocated"), "{e}");
    // A pointer past the end of its file.
    let script = [alloc(ACPI_RSDP_FILE), alloc(ACPI_TABLES_FILE), pointer(34)].concat();
    let e = run(&script, 0x1000);
    assert!(e.to_string().contains("outside"), "{e}");
    // A misaligned allocation.
    let e = run(&alloc(ACPI_RSDP_FILE), 0x1010);
    assert!(e.to_string().contains("aligned"), "{e}");
    // A file fw_cfg does not have.
    let e = run(&alloc("etc/acpi/nope"), 0x1000);
    assert!(e.to_string().contains("no fw_cfg file"), "{e}");
    // A 32-bit pointer to tables above 4 GiB.
    let e = run(&f.table_loader, 1 << 32);
    assert!(e.to_string().contains("does not fit"), "{e}");
    // Commands SeaBIOS does not know (WRITE_POINTER, padding) are skipped.
    let mut skipped = [0u8; 128];
    skipped[0] = 4;
    let script = [f.table_loader.clone(), skipped.to_vec(), vec![0; 128]].concat();
    let loaded = execute_table_loader(&script, &files, |_, z, _, _| match z {
        LoaderZone::High => HIGH_ADDR,
        LoaderZone::FSeg => FSEG_ADDR,
    })
    .expect("runs");
    walk(&loaded, FSEG_ADDR);
}

#[test]
fn invalid_configurations_are_refused_with_a_typed_error() {
    let base = config(2);
    let with = |f: &dyn Fn(&mut AcpiConfig)| {
        let mut c = base.clone();
        f(&mut c);
        AcpiFwCfg::new(&c).unwrap_err()
    };
    assert_eq!(
        with(&|c| c.vcpus = 0),
        AcpiError::TooManyCpus { vcpus: 0, max: 64 }
    );
    assert_eq!(
        with(&|c| c.vcpus = 65),
        AcpiError::TooManyCpus { vcpus: 65, max: 64 }
    );
    for (slot, function) in [(0, 0), (1, 1), (32, 0), (5, 8)] {
        assert_eq!(
            with(&|c| c.pci.push(PciFunction {
                slot,
                function,
                pin: None
            })),
            AcpiError::PciAddress { slot, function }
        );
    }
    assert_eq!(
        with(&|c| c.pci.push(PciFunction {
            slot: 3,
            function: 0,
            pin: None
        })),
        AcpiError::DuplicatePciFunction {
            slot: 3,
            function: 0
        }
    );
    assert!(matches!(
        with(&|c| c.low_ram_end = 0xfec0_0000),
        AcpiError::NoPciHole { .. }
    ));
}

#[test]
fn pci_interrupts_follow_seabios_piix_routing() {
    // SeaBIOS: pci_irqs[(pin - 1 + slot - 1) & 3] with pci_irqs = 10, 10, 11, 11.
    assert_eq!(pci_intx_gsi(1, IntxPin::A), 9, "the PIIX4 PM: SCI");
    assert_eq!(pci_intx_gsi(1, IntxPin::D), 11, "PIIX3 USB: PIRQD");
    assert_eq!(pci_intx_gsi(2, IntxPin::A), 10);
    assert_eq!(pci_intx_gsi(3, IntxPin::A), 11);
    assert_eq!(pci_intx_gsi(4, IntxPin::A), 11);
    assert_eq!(pci_intx_gsi(5, IntxPin::A), 10);
    assert_eq!(pci_intx_gsi(3, IntxPin::B), 11);
    assert_eq!(pci_intx_gsi(3, IntxPin::C), 10);
    assert_eq!(pci_intx_gsi(31, IntxPin::D), 10);
    let virtio = PciFunction {
        slot: 4,
        function: 0,
        pin: Some(IntxPin::A),
    };
    assert_eq!(virtio.gsi(), Some(11));
    assert_eq!(
        PciFunction {
            pin: None,
            ..virtio
        }
        .gsi(),
        None
    );
}

#[test]
fn pci0_windows_follow_the_ram_layout() {
    let small = AcpiConfig::new(1, &MemoryLayout::new(512 << 20).unwrap());
    assert_eq!(small.low_ram_end, 512 << 20);
    assert_eq!(small.pci_hole64(), Some((4 * GIB, 6 * GIB - 1)));
    let big = config(1);
    assert_eq!(big.low_ram_end, 3 * GIB);
    assert_eq!(big.pci_hole64(), Some((7 * GIB, 9 * GIB - 1)));
    let mut none = big.clone();
    none.pci_hole64_size = 0;
    assert_eq!(none.pci_hole64(), None);
}

#[test]
fn without_firmware_the_tables_go_straight_into_guest_memory() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
    crate::write_mptable(&mem, 4).expect("mp table");
    let c = config(4);
    let rsdp = write_acpi_tables(&mem, &c, ACPI_TABLES_START).expect("written");
    assert_eq!(rsdp, ACPI_RSDP_START);
    assert_eq!(rsdp % 16, 0);
    assert!((0xe_0000..0x10_0000).contains(&rsdp));
    let found = walk(&mem, rsdp);
    assert_eq!(found.facs_addr, ACPI_TABLES_START);
    let (f, _) = build_acpi_tables(&c).unwrap();
    assert!(f.tables.len() <= ACPI_TABLES_MAX);
    // The MP table is intact.
    let (_, mp) = crate::mptable(4).expect("mp table");
    assert_eq!(Phys::read(&mem, crate::MP_CONFIG_START, mp.len()), mp);
    // Even at 64 vCPUs the tables fit below the MP table.
    let (f, _) = build_acpi_tables(&config(64)).unwrap();
    assert!(f.tables.len() <= ACPI_TABLES_MAX, "{}", f.tables.len());

    let e = write_acpi_tables(&mem, &c, ACPI_TABLES_START + 16).unwrap_err();
    assert!(e.to_string().contains("ACPI"), "{e}");
    assert!(
        write_acpi_tables(&mem, &c, ACPI_RSDP_START).is_err(),
        "overlaps the RSDP"
    );
    // Memory that does not cover the tables.
    assert!(matches!(
        write_acpi_tables(&mem, &c, 0x20_0000),
        Err(BootError::GuestMemory { .. })
    ));
}

// ---- acpica-tools: what an OS's ACPI interpreter makes of the tables ----

fn acpica_tool(name: &str) -> String {
    let path = format!("/usr/bin/{name}");
    assert!(
        Path::new(&path).exists(),
        "{path} is missing: install acpica-tools (apt-get install acpica-tools, or scripts/deps --tests)"
    );
    path
}

/// Writes the linked tables to `dir` as `<signature>.dat`.
fn dump_linked(c: &AcpiConfig, dir: &Path) -> Found {
    let (_, found) = linked(c);
    for (name, t) in [
        ("dsdt", &found.dsdt),
        ("facp", &found.fadt),
        ("apic", &found.madt),
        ("facs", &found.facs),
        ("waet", &found.waet),
    ] {
        std::fs::write(dir.join(format!("{name}.dat")), t).expect("write table");
    }
    found
}

fn run_tool(dir: &Path, tool: &str, args: &[&str]) -> String {
    let out = Command::new(acpica_tool(tool))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} {args:?} failed:\n{text}");
    text
}

/// `iasl -d` disassembles each table without complaint, and the DSDT's
/// source compiles again without errors or warnings.
#[test]
fn iasl_disassembles_the_tables() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let c = config(4);
    let found = dump_linked(&c, d);
    for t in ["dsdt", "facp", "apic", "waet"] {
        let out = run_tool(d, "iasl", &["-d", &format!("{t}.dat")]);
        assert!(
            !out.contains("Error") && !out.contains("Warning"),
            "{t}:\n{out}"
        );
    }
    let read = |f: &str| std::fs::read_to_string(d.join(f)).expect("dsl");

    let facp = read("facp.dsl");
    for want in [
        "Revision : 03".to_string(),
        "SCI Interrupt : 0009".into(),
        "SMI Command Port : 000000B2".into(),
        "ACPI Enable Value : F1".into(),
        "PM1A Event Block Address : 00000600".into(),
        "PM1A Control Block Address : 00000604".into(),
        "PM Timer Block Address : 00000608".into(),
        "GPE0 Block Address : 0000AFE0".into(),
        "RTC Century Index : 32".into(),
        "8042 Present on ports 60/64 (V2) : 1".into(),
        "Control Method Power Button (V1) : 0".into(),
        "Reset Register Supported (V2) : 1".into(),
        "Address : 0000000000000CF9".into(),
        "Value to cause reset : 06".into(),
        format!("DSDT Address : {:08X}", found.dsdt_addr),
        format!("DSDT Address : {:016X}", found.dsdt_addr),
        format!("FACS Address : {:08X}", found.facs_addr),
    ] {
        assert!(
            facp.split('\n').any(|l| l.contains(&want)),
            "FACP lacks {want:?}:\n{facp}"
        );
    }

    let apic = read("apic.dsl");
    assert_eq!(apic.matches("[Processor Local APIC]").count(), 4, "{apic}");
    assert_eq!(apic.matches("[Interrupt Source Override]").count(), 5);
    assert!(apic.contains("I/O Apic ID : 04"), "{apic}");
    assert!(apic.contains("Address : FEC00000"), "{apic}");
    assert!(apic.contains("[Local APIC NMI]"), "{apic}");

    let dsdt = read("dsdt.dsl");
    for want in [
        "Name (\\_S5, Package (0x04)",
        "Device (PCI0)",
        "Name (_HID, EisaId (\"PNP0A03\")",
        "Name (_UID, One)",
        "Name (_PRT, Package (0x7C)",
        "Device (ISA)",
        "Name (_ADR, 0x00010000)",
        "Name (_HID, EisaId (\"PNP0303\")",
        "Name (_HID, EisaId (\"PNP0501\")",
        "Name (_HID, EisaId (\"PNP0B00\")",
        "IRQNoFlags ()\n                            {4}",
        "Device (IDE)",
        "Device (S18)",
        "Name (_ADR, 0x00030000)",
        "Device (S20)",
        "Device (C003)",
        "Name (_HID, \"ACPI0007\"",
        "0x00000001C0000000, // Range Minimum",
    ] {
        assert!(dsdt.contains(want), "DSDT lacks {want:?}:\n{dsdt}");
    }
    assert!(!dsdt.contains("Device (C004)"));
    assert!(
        read("waet.dsl").contains("PM timer, one read only : 1"),
        "{}",
        read("waet.dsl")
    );

    // Compile the disassembly again: iasl's semantic checks of ASL.
    let out = run_tool(d, "iasl", &["-p", "recompiled", "dsdt.dsl"]);
    assert!(out.contains(" 0 Errors, 0 Warnings"), "{out}");
}

/// Integers of an acpiexec object dump, in order.
fn integers(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("[Integer] = "))
        .map(|v| u64::from_str_radix(v.split_whitespace().next().unwrap(), 16).unwrap())
        .collect()
}

/// The bytes of an acpiexec buffer dump (`0000: 88 0D ... // text`).
fn buffer_bytes(text: &str) -> Vec<u8> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let (off, rest) = l.split_once(": ")?;
            (off.len() == 4 && u16::from_str_radix(off, 16).is_ok()).then_some(rest)
        })
        .flat_map(|rest| {
            let hex = rest.split("//").next().unwrap();
            hex.split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// What `_CRS` says: `(kind, min, max)` per descriptor.
fn resources_of(buf: &[u8]) -> Vec<(&'static str, u64, u64)> {
    let mut v = Vec::new();
    let mut at = 0;
    loop {
        let tag = buf[at];
        if tag & 0x80 == 0 {
            let len = (tag & 7) as usize;
            match tag >> 3 {
                0x0f => return v, // end tag
                0x08 => v.push((
                    "io",
                    u64::from(u16_at(buf, at + 2)),
                    u64::from(u16_at(buf, at + 4)),
                )),
                other => panic!("small descriptor {other:#x}"),
            }
            at += 1 + len;
        } else {
            let len = u16_at(buf, at + 1) as usize;
            let kind = match buf[at + 3] {
                0 => "mem",
                1 => "io",
                2 => "bus",
                k => panic!("address space type {k}"),
            };
            let (min, max) = match tag {
                0x88 => (
                    u64::from(u16_at(buf, at + 8)),
                    u64::from(u16_at(buf, at + 10)),
                ),
                0x87 => (
                    u64::from(u32_at(buf, at + 10)),
                    u64::from(u32_at(buf, at + 14)),
                ),
                0x8a => (u64_at(buf, at + 14), u64_at(buf, at + 22)),
                t => panic!("large descriptor {t:#x}"),
            };
            v.push((kind, min, max));
            at += 3 + len;
        }
    }
}

/// acpiexec loads the DSDT with ferry's FADT, MADT and FACS (as an OS does)
/// and evaluates `_PRT`, `_CRS` and `_S5`.
#[test]
fn acpiexec_evaluates_prt_crs_and_s5() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let c = config(2);
    dump_linked(&c, d);
    let eval = |object: &str| {
        let out = run_tool(
            d,
            "acpiexec",
            &[
                "-b",
                &format!("evaluate {object}"),
                "facp.dat",
                "dsdt.dat",
                "apic.dat",
                "facs.dat",
            ],
        );
        for bad in ["ACPI Error", "ACPI Warning", "ACPI BIOS", "ACPI Exception"] {
            assert!(!out.contains(bad), "{object}: {bad}:\n{out}");
        }
        assert!(
            out.contains("FACP 0x") && out.contains("(v03 BOCHS  BXPC     00000001 BXPC 00000001)"),
            "{out}"
        );
        // The GPE0 block of 4 bytes (2 registers, GPEs 0-15) on the SCI.
        assert!(
            out.contains("Initialized GPE 00 to 0F [_GPE] 2 regs on interrupt 0x9 (SCI)"),
            "{out}"
        );
        let (_, result) = out
            .split_once(&format!("Evaluation of {object} returned object"))
            .unwrap_or_else(|| panic!("{object} not evaluated:\n{out}"));
        result.to_string()
    };

    let prt = eval("\\_SB.PCI0._PRT");
    assert!(prt.contains("[Package] Contains 124 Elements:"), "{prt}");
    let values = integers(&prt);
    assert_eq!(values.len(), 124 * 4);
    let mut want = Vec::new();
    for slot in 1u8..32 {
        for pin in IntxPin::ALL {
            want.extend([
                (u64::from(slot) << 16) | 0xffff,
                u64::from(pin.index()),
                0,
                u64::from(pci_intx_gsi(slot, pin)),
            ]);
        }
    }
    assert_eq!(values, want);

    let crs = eval("\\_SB.PCI0._CRS");
    let (lo, hi) = c.pci_hole64().unwrap();
    assert_eq!(
        resources_of(&buffer_bytes(&crs)),
        [
            ("bus", 0, 0xff),
            ("io", 0xcf8, 0xcf8),
            ("io", 0, 0xcf7),
            ("io", 0xd00, 0xffff),
            ("mem", 0xa_0000, 0xb_ffff),
            ("mem", 3 * GIB, 0xfebf_ffff),
            ("mem", lo, hi),
        ],
        "{crs}"
    );

    let s5 = eval("\\_S5");
    assert!(s5.contains("[Package] Contains 4 Elements:"), "{s5}");
    assert_eq!(integers(&s5), [0, 0, 0, 0]);
}
