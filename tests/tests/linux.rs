//! Debian's kernel boots under ferry via PVH far enough to print its banner.
//!
//! This machine emulates guest ring-0 code (~1.4 M instructions/s), so a Linux guest
//! cannot get further than early boot in test time; the banner proves the PVH entry,
//! the start-info page, the memory map and the command line are right, and the
//! DMI line that Linux finds the SMBIOS tables where ferry puts them, with what a
//! QEMU 7.2 guest sees.

use std::path::PathBuf;
use std::time::Duration;

use ferry_tests::{require_kvm, Scratch, VmProcess};

/// The Debian bzImage: $FERRY_TEST_BZIMAGE, else the one `scripts/deps` unpacked.
fn debian_bzimage() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("FERRY_TEST_BZIMAGE") {
        return Some(PathBuf::from(p));
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debian-kernel/boot");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
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

#[test]
fn debian_vmlinux_boots_via_pvh_to_the_banner() {
    require_kvm();
    let Some(bzimage) = debian_bzimage() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide Debian's kernel (scripts/deps unpacks it into target/debian-kernel)"
        );
        eprintln!("skipped: no Debian kernel; run scripts/deps or set FERRY_TEST_BZIMAGE");
        return;
    };
    let s = Scratch::new();
    let bytes = std::fs::read(&bzimage).expect("read bzImage");
    let vmlinux = ferry_boot::extract_vmlinux(&bytes).expect("extract vmlinux");
    let path = s.path("vmlinux");
    std::fs::write(&path, vmlinux).expect("write vmlinux");
    let vm = VmProcess::start(
        &s,
        "linux",
        &[
            "run",
            "--kernel",
            path.to_str().expect("utf-8 path"),
            "-m",
            "512M",
            "--append",
            "console=ttyS0 earlyprintk=ttyS0 ferry-test-marker",
        ],
    );
    // Guest ring 0 is emulated here (~1.4 M instructions/s): the banner takes about
    // 30 s on an idle machine, and several times that on a loaded one (seen: over
    // 60 s with a libvirt test and a build beside it). The bound only catches a hang.
    vm.wait_serial("Linux version", Duration::from_secs(300));
    vm.wait_serial(
        "Command line: console=ttyS0 earlyprintk=ttyS0 ferry-test-marker",
        Duration::from_secs(10),
    );
    vm.wait_serial(
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
        Duration::from_secs(10),
    );
    // dmi_scan_machine found the SMBIOS entry point in 0xF0000-0xFFFFF without
    // EFI, and its table (right after e820 in setup_arch). Both lines are the
    // ones the reference lab's guests print under QEMU 7.2 (Debian 12).
    vm.wait_serial("SMBIOS 2.8 present.", Duration::from_secs(300));
    vm.wait_serial(
        "DMI: QEMU Standard PC (i440FX + PIIX, 1996), BIOS 1.16.2-debian-1.16.2-1 04/01/2014",
        Duration::from_secs(60),
    );
    vm.quit();
}
