//! Boots a real distribution kernel image, when one is available.
//!
//! Set `FERRY_TEST_BZIMAGE` to a bzImage (e.g. Debian's
//! `/boot/vmlinuz-6.1.0-*-amd64`, from `apt-get download linux-image-amd64`'s
//! dependency and `dpkg -x`); otherwise the first `/boot/vmlinuz-*` is used.
//! Without either, the tests print why and pass.

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
