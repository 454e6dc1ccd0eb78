//! Boots a real distribution kernel image, when one is available.
//!
//! Set `FERRY_TEST_BZIMAGE` to a bzImage (e.g. Debian's
//! `/boot/vmlinuz-6.1.0-*-amd64`, from `apt-get download linux-image-amd64`'s
//! dependency and `dpkg -x`); otherwise the first `/boot/vmlinuz-*` is used.
//! Without either, the tests print why and pass.
//!
//! The ACPI test boots Debian's kernel (`target/debian-kernel`, from
//! `scripts/deps --tests`) on QEMU 7.2 with SeaBIOS, once with QEMU's tables
//! and once with ferry's; without the kernel or QEMU it passes with a note,
//! except on CI (`CI` set), where it fails.

use std::fs;
use std::io::Cursor;
use std::path::PathBuf;

use ferry_boot::{boot_regs, boot_sregs, extract_vmlinux, load_kernel, BootProtocol, MemoryLayout};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::hvm_start_info;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn find_bzimage() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FERRY_TEST_BZIMAGE") {
        return Some(PathBuf::from(path));
    }
    let mut found: Vec<PathBuf> = fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    found.pop()
}

fn bzimage_or_skip(test: &str) -> Option<(PathBuf, Vec<u8>)> {
    let Some(path) = find_bzimage() else {
        eprintln!("{test}: skipped: no FERRY_TEST_BZIMAGE and no /boot/vmlinuz-*");
        return None;
    };
    match fs::read(&path) {
        Ok(bytes) => Some((path, bytes)),
        Err(e) => {
            eprintln!("{test}: skipped: cannot read {}: {e}", path.display());
            None
        }
    }
}

fn guest(layout: &MemoryLayout) -> GuestMemoryMmap<()> {
    let ranges: Vec<_> = layout
        .ranges()
        .into_iter()
        .map(|(start, len)| (start, len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
}

#[test]
fn real_bzimage_loads_with_the_linux_64_bit_protocol() {
    let Some((path, image)) = bzimage_or_skip("real_bzimage") else {
        return;
    };
    let layout = MemoryLayout::new(512 << 20).expect("layout");
    let mem = guest(&layout);
    let initrd = vec![0x5a; 1 << 20];
    let info = load_kernel(
        &mem,
        &layout,
        &mut Cursor::new(&image),
        Some(&mut Cursor::new(&initrd)),
        "console=ttyS0 panic=1",
    )
    .unwrap_or_else(|e| panic!("kernel image {}: {e}", path.display()));

    assert_eq!(info.entry, 0x100200);
    assert_eq!(
        info.protocol,
        BootProtocol::Linux64 {
            boot_params_gpa: 0x7000
        }
    );
    let params: boot_params = mem.read_obj(GuestAddress(0x7000)).expect("zero page");
    let hdr = params.hdr;
    assert_eq!({ hdr.header }, 0x5372_6448);
    assert!({ hdr.version } >= 0x020c);
    assert_eq!(hdr.type_of_loader, 0xff);
    assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
    assert_eq!(params.e820_entries, 3);
    let (gpa, size) = info.initrd.expect("initrd");
    assert_eq!(
        ({ hdr.ramdisk_image } as u64, { hdr.ramdisk_size } as u64),
        (gpa, size)
    );
    assert!(gpa >= info.kernel_end);
    eprintln!(
        "{}: protocol {:#x}, init_size {:#x}, kernel_end {:#x}, initrd at {gpa:#x}",
        path.display(),
        { hdr.version },
        { hdr.init_size },
        info.kernel_end
    );

    let regs = boot_regs(&info);
    assert_eq!((regs.rip, regs.rsi), (0x100200, 0x7000));
    let mut sregs = kvm_bindings::kvm_sregs::default();
    boot_sregs(&info, &mem, &mut sregs).expect("sregs");
    assert_eq!(sregs.cs.l, 1);
}

#[test]
fn real_bzimage_yields_a_vmlinux_that_boots() {
    let Some((path, image)) = bzimage_or_skip("real_vmlinux") else {
        return;
    };
    let vmlinux =
        extract_vmlinux(&image).unwrap_or_else(|e| panic!("kernel image {}: {e}", path.display()));
    assert!(vmlinux.starts_with(b"\x7fELF"));

    let layout = MemoryLayout::new(512 << 20).expect("layout");
    let mem = guest(&layout);
    let info = load_kernel(
        &mem,
        &layout,
        &mut Cursor::new(&vmlinux),
        None,
        "console=hvc0",
    )
    .unwrap_or_else(|e| panic!("vmlinux from {}: {e} ({e:?})", path.display()));
    eprintln!(
        "{}: vmlinux of {} bytes, entry {:#x}, {:?}, kernel_end {:#x}",
        path.display(),
        vmlinux.len(),
        info.entry,
        info.protocol,
        info.kernel_end
    );

    // Distribution kernels built with CONFIG_PVH=y carry the Xen PVH note.
    let config = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .map(|release| path.with_file_name(format!("config-{release}")));
    let pvh_configured = config
        .and_then(|c| fs::read_to_string(c).ok())
        .map(|c| c.lines().any(|l| l == "CONFIG_PVH=y"));
    match pvh_configured {
        Some(true) => {
            assert_eq!(
                info.protocol,
                BootProtocol::Pvh {
                    start_info_gpa: 0x6000
                }
            );
            let start: hvm_start_info = mem.read_obj(GuestAddress(0x6000)).expect("start info");
            assert_eq!(start.magic, 0x336e_c578);
            assert_eq!(start.memmap_entries, 3);
        }
        Some(false) => assert!(matches!(info.protocol, BootProtocol::Linux64 { .. })),
        None => eprintln!("no kernel config beside the image: not checking the PVH note"),
    }
}

// ---- ferry's ACPI tables through SeaBIOS, read by Linux, beside QEMU's ----

/// Debian's kernel as scripts/deps unpacks it (or `FERRY_TEST_BZIMAGE`).
fn debian_bzimage() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_TEST_BZIMAGE") {
        return Some(PathBuf::from(p));
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debian-kernel/boot");
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    found.pop()
}

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";

/// Boots `kernel` on QEMU's `pc` (TCG: the same on any host) with SeaBIOS
/// and `extra` arguments until Linux panics for want of a root file system;
/// returns the serial console and SeaBIOS's debug output.
fn boot_on_qemu(
    dir: &std::path::Path,
    kernel: &std::path::Path,
    extra: &[&str],
) -> (String, String) {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let serial = dir.join("serial.log");
    let debug = dir.join("seabios.log");
    let _ = fs::remove_file(&serial);
    let _ = fs::remove_file(&debug);
    let mut child = Command::new(QEMU)
        .args(["-accel", "tcg", "-m", "512", "-smp", "2", "-bios", SEABIOS])
        .args([
            "-display",
            "none",
            "-no-reboot",
            "-net",
            "none",
            "-monitor",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-chardev")
        .arg(format!("file,id=dbg,path={}", debug.display()))
        .args(["-device", "isa-debugcon,iobase=0x402,chardev=dbg"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        // PCI UARTs (INTA#) in slots 3, 5, 6: Linux's built-in 8250_pci
        // prints the IRQ each got through _PRT (PIRQC, A, B: 11, 10, 10).
        .args(["-device", "pci-serial,addr=3"])
        .args(["-device", "pci-serial,addr=5"])
        .args(["-device", "pci-serial,addr=6"])
        .args(extra)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for QEMU") {
            break status;
        }
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "QEMU still running after 300 s; serial:\n{}",
                fs::read_to_string(&serial).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("QEMU's stderr");
    assert!(status.success(), "QEMU failed: {status}\n{stderr}");
    let read = |p: &std::path::Path| {
        String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned()
    };
    (read(&serial), read(&debug))
}

/// What Linux says about the machine's ACPI description, with what differs
/// by design between QEMU's tables and ferry's left out (PNP numbering).
fn acpi_view(serial: &str) -> Vec<String> {
    serial
        .lines()
        .filter_map(|l| l.split_once("] ").map(|(_, m)| m.trim_end()))
        .filter(|m| {
            m.starts_with("ACPI: PM-Timer IO Port")
                || m.starts_with("ACPI: LAPIC_NMI")
                || m.starts_with("ACPI: INT_SRC_OVR")
                || m.starts_with("smp: Brought up")
                || m.starts_with("ACPI: Using IOAPIC for interrupt routing")
                || m.contains("root bus resource")
                || m.starts_with("PCI: Using ACPI for IRQ routing")
                || m.contains(": ttyS")
                || m.contains("registered as rtc0")
        })
        .map(|m| match m.split_once(": ttyS") {
            Some((_, rest)) => format!("ttyS{rest}"),
            None => m
                .split_once(": registered")
                .map_or(m.to_string(), |_| "rtc0".into()),
        })
        .collect()
}

/// SeaBIOS 1.16 runs ferry's etc/table-loader (QEMU's own ACPI switched off
/// with `acpi=off`, the three files given with `-fw_cfg`), and Linux finds
/// the tables, takes its CPUs, interrupt overrides, PM timer, PCI windows and
/// ISA devices from them, and sees what it sees with QEMU 7.2's own tables.
#[test]
fn seabios_loads_ferrys_acpi_tables_and_linux_sees_qemus_machine() {
    let kernel = debian_bzimage();
    let missing: Vec<&str> = [
        (kernel.is_none(), "Debian's kernel (target/debian-kernel)"),
        (!std::path::Path::new(QEMU).exists(), QEMU),
        (!std::path::Path::new(SEABIOS).exists(), SEABIOS),
    ]
    .into_iter()
    .filter_map(|(gone, what)| gone.then_some(what))
    .collect();
    if !missing.is_empty() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide {missing:?} (scripts/deps --tests)"
        );
        eprintln!("skipped: {missing:?} missing; run scripts/deps --tests");
        return;
    }
    let kernel = kernel.expect("checked");
    let dir = tempfile::tempdir().expect("tempdir");

    let (qemu_serial, _) = boot_on_qemu(dir.path(), &kernel, &["-M", "pc"]);
    assert!(
        qemu_serial.contains("ACPI: RSDP") && qemu_serial.contains("VFS: Unable to mount root fs"),
        "QEMU's own boot:\n{qemu_serial}"
    );

    let layout = MemoryLayout::new(512 << 20).expect("layout");
    let mut config = ferry_boot::AcpiConfig::new(2, &layout);
    // QEMU's acpi=off machine has no PIIX4 PM to answer the SMI port; with
    // SMI_CMD 0 Linux takes the machine to be in ACPI mode already.
    config.smi_cmd = false;
    for slot in [3, 5, 6] {
        config.pci.push(ferry_boot::PciFunction {
            slot,
            function: 0,
            pin: Some(ferry_boot::IntxPin::A),
        });
    }
    let mut args: Vec<String> = vec!["-M".into(), "pc,acpi=off".into()];
    for (name, data) in ferry_boot::AcpiFwCfg::new(&config)
        .expect("tables")
        .into_files()
    {
        let file = dir.path().join(name.replace('/', "_"));
        fs::write(&file, data).expect("write fw_cfg file");
        args.push("-fw_cfg".into());
        args.push(format!("name={name},file={}", file.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (serial, seabios) = boot_on_qemu(dir.path(), &kernel, &args);

    assert!(
        seabios.contains("(via xsdt)"),
        "SeaBIOS found no FADT:\n{seabios}"
    );
    assert!(seabios.contains("ACPI: parse DSDT"), "{seabios}");
    for want in [
        "ACPI: RSDP 0x00000000000F",
        " (v02 BOCHS )",
        "ACPI: XSDT 0x",
        "ACPI: FACP 0x",
        " 0000F4 (v03 BOCHS  BXPC     00000001 BXPC 00000001)",
        "ACPI: DSDT 0x",
        "ACPI: FACS 0x",
        "ACPI: APIC 0x",
        "ACPI: WAET 0x",
        "ACPI: Interpreter enabled",
        "ACPI: PM: (supports S0 S5)",
        "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00-ff])",
        "pnp: PnP ACPI: found 3 devices",
        "i8042: PNP: PS/2 Controller [PNP0303:KBD] at 0x60,0x64 irq 1",
        "VFS: Unable to mount root fs",
    ] {
        assert!(
            serial.contains(want),
            "Linux did not say {want:?}:\n{serial}"
        );
    }
    assert!(!serial.contains("ACPI BIOS"), "{serial}");
    assert!(!serial.contains("ACPI Warning"), "{serial}");

    let ours = acpi_view(&serial);
    assert_eq!(
        ours,
        acpi_view(&qemu_serial),
        "ferry's tables vs QEMU 7.2's:\n{serial}"
    );
    assert_eq!(ours.len(), 21, "{ours:#?}");
    for (slot, irq) in [(3, 11), (5, 10), (6, 10)] {
        assert_eq!(ferry_boot::pci_intx_gsi(slot, ferry_boot::IntxPin::A), irq);
        let line = format!("0000:00:{slot:02x}.0: ttyS");
        assert!(
            serial
                .lines()
                .any(|l| l.contains(&line) && l.contains(&format!("(irq = {irq},"))),
            "{line} not on IRQ {irq}:\n{serial}"
        );
    }
}
