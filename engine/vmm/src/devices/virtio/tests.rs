//! The virtio-pci transport and virtio-blk driven the way a guest driver drives
//! them: config cycles on ports 0xcf8/0xcfc, BAR accesses, rings in guest RAM.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_kvm::Backing;

use super::{status, STOP_PAUSED};
use crate::devices::serial::SinkSpec;
use crate::devices::virtio::balloon;
use crate::devices::virtio::blk::{BlockConfig, BlockImage};
use crate::devices::virtio::net::{self, NetConfig};
use crate::devices::virtio::rng;
use crate::vm::{VirtioDeviceSpec, VirtioSpec, Vm, VmConfig};

use super::test_driver::{Driver, Ring, AVAIL, DATA, DESC, HEADER, STATUS, USED};

const SLOT: u8 = 4;

fn disk_spec(path: &Path, read_only: bool) -> VirtioSpec {
    VirtioSpec {
        slot: SLOT,
        id: "virtio-disk0".into(),
        device: VirtioDeviceSpec::Block(BlockConfig {
            read_only,
            serial: Some("ferry-serial".into()),
            ..BlockConfig::new(BlockImage::Path(path.to_path_buf()))
        }),
    }
}

fn vm_with(spec: VirtioSpec) -> Vm {
    try_vm(spec).expect("VM with a disk")
}

fn disk(sectors: usize) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(sectors as u64 * 512).unwrap();
    f
}

/// A disk on an image handed over open (libvirt's `-add-fd`) writes to that
/// open file: the image is unlinked, so no path could reach it. One open for
/// reading only serves a read-only disk and is refused, by name, for a
/// writable one.
#[test]
fn blk_uses_a_passed_image_as_given() {
    use crate::devices::virtio::blk::Block;
    use crate::devices::SharedFd;
    use std::os::unix::fs::FileExt;
    let img = disk(64);
    let rw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img.path())
        .unwrap();
    let ro = std::fs::File::open(img.path()).unwrap();
    img.close().unwrap();
    let passed = |f: &std::fs::File, read_only| BlockConfig {
        read_only,
        ..BlockConfig::new(BlockImage::Fd {
            fd: SharedFd::new(f.try_clone().unwrap().into()),
            name: "/dev/fdset/3".into(),
        })
    };
    let err = Block::open(&passed(&ro, false)).unwrap_err().to_string();
    assert!(
        err.contains("/dev/fdset/3") && err.contains("passed open for reading only"),
        "{err}"
    );
    assert_eq!(Block::open(&passed(&ro, true)).unwrap().sectors(), 64);

    let vm = vm_with(VirtioSpec {
        slot: SLOT,
        id: "virtio-disk0".into(),
        device: VirtioDeviceSpec::Block(passed(&rw, false)),
    });
    let mut d = Driver::probe(&vm, SLOT, 2);
    d.init();
    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 5 + 1) as u8).collect();
    d.put(DATA, &pattern);
    assert_eq!(d.request(1, 2, 512, DATA), (0, 1));
    let mut on_disk = vec![0u8; 512];
    rw.read_exact_at(&mut on_disk, 2 * 512).unwrap();
    assert_eq!(on_disk, pattern);
}

#[test]
fn blk_reads_writes_flushes_and_reports_its_config() {
    let img = disk(64);
    let vm = vm_with(disk_spec(img.path(), false));
    let mut d = Driver::probe(&vm, SLOT, 2);
    assert!(d.bar >= crate::devices::pci::BAR_WINDOW);
    d.init();
    assert_eq!(d.read(d.device, 8), 64, "capacity in sectors");

    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    d.put(DATA, &pattern);
    assert_eq!(d.request(1, 3, 1024, DATA), (0, 1));
    let on_disk = std::fs::read(img.path()).unwrap();
    assert_eq!(&on_disk[3 * 512..5 * 512], &pattern[..]);

    d.put(DATA, &[0u8; 1024]);
    assert_eq!(d.request(0, 3, 1024, DATA), (0, 1025));
    assert_eq!(d.get(DATA, 1024), pattern);

    assert_eq!(d.request(4, 0, 0, DATA).0, 0, "flush");
    assert_eq!(d.request(8, 0, 20, DATA), (0, 21), "get-id");
    assert_eq!(&d.get(DATA, 12), b"ferry-serial");

    // Past the end, unaligned, unknown: the request fails, the device goes on.
    assert_eq!(d.request(0, 63, 1024, DATA).0, 1);
    assert_eq!(d.request(1, 0, 100, DATA).0, 1);
    assert_eq!(d.request(99, 0, 512, DATA).0, 2);
    assert_eq!(d.status(), 0xf);
    let stats = vm.device_stats();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].0, "virtio-disk0");
    let crate::devices::virtio::DeviceStats::Block(b) = stats[0].1 else {
        panic!("{stats:?}");
    };
    assert_eq!(
        b,
        crate::devices::virtio::blk::BlockStats {
            rd_bytes: 1024,
            wr_bytes: 1024,
            rd_operations: 1,
            wr_operations: 1,
            flush_operations: 1,
            invalid_operations: 3,
            ..Default::default()
        }
    );
}

#[test]
fn blk_refuses_writes_when_read_only() {
    let img = disk(8);
    let vm = vm_with(disk_spec(img.path(), true));
    let mut d = Driver::probe(&vm, SLOT, 2);
    d.init();
    d.write(d.common, 4, 0);
    assert_ne!(d.read(d.common + 4, 4) & (1 << 5), 0, "VIRTIO_BLK_F_RO");
    d.put(DATA, &[0xab; 512]);
    assert_eq!(d.request(1, 0, 512, DATA).0, 1);
    assert!(std::fs::read(img.path()).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn a_buffer_outside_guest_memory_breaks_the_device_not_the_vmm() {
    let img = disk(8);
    let vm = vm_with(disk_spec(img.path(), false));
    let mut d = Driver::probe(&vm, SLOT, 2);
    d.init();
    d.put(HEADER, &[0; 16]);
    // Data descriptor far beyond the 16 MiB of RAM.
    let mut desc = Vec::new();
    for (addr, len, flags, next) in [
        (HEADER, 16u32, 1u16, 1u16),
        (1u64 << 40, 512, 3, 2),
        (STATUS, 1, 2, 0),
    ] {
        desc.extend_from_slice(&addr.to_le_bytes());
        desc.extend_from_slice(&len.to_le_bytes());
        desc.extend_from_slice(&flags.to_le_bytes());
        desc.extend_from_slice(&next.to_le_bytes());
    }
    d.put(DESC, &desc);
    d.put(AVAIL + 2, &1u16.to_le_bytes());
    d.notify(0);
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    // A reset brings it back.
    d.init();
    d.put(DATA, &[1; 512]);
    assert_eq!(d.request(1, 0, 512, DATA).0, 0);
}

#[test]
fn device_writes_land_in_the_dirty_log() {
    let img = disk(8);
    let vm = vm_with(disk_spec(img.path(), false));
    let mut d = Driver::probe(&vm, SLOT, 2);
    d.init();
    vm.ram().register(vm.vm_fd(), true).unwrap();
    let _ = vm.ram().get_dirty_log(vm.vm_fd()).unwrap();
    assert_eq!(d.request(0, 0, 512, DATA).0, 0);
    let log = vm.ram().get_dirty_log(vm.vm_fd()).unwrap();
    let dirty = |gpa: u64| log[0][(gpa / 4096 / 64) as usize] & (1 << ((gpa / 4096) % 64)) != 0;
    assert!(dirty(DATA), "data read from disk into the guest");
    assert!(dirty(USED), "used ring");
    assert!(dirty(STATUS), "status byte");
    assert!(!dirty(0x30000), "an untouched page");
    let again = vm.ram().get_dirty_log(vm.vm_fd()).unwrap();
    assert!(again[0].iter().all(|&w| w == 0), "the log was reset");
}

#[test]
fn state_round_trips_and_hostile_state_is_refused() {
    let img = disk(8);
    let vm = vm_with(disk_spec(img.path(), false));
    let mut d = Driver::probe(&vm, SLOT, 2);
    d.init();
    d.put(DATA, &[5; 512]);
    assert_eq!(d.request(1, 1, 512, DATA).0, 0);
    let saved = vm.capture_devices().unwrap();
    assert_eq!(saved.virtio.len(), 1);
    // As at a migration's switch-over: the flushed disk lets go of its image
    // locks, for the other VM to take.
    vm.deactivate_disks().unwrap();

    let mut other = vm_with(disk_spec(img.path(), false));
    let vcpus = vm.capture_vcpus().unwrap();
    let vmstate = vm.capture_vm().unwrap();
    let mut bad = saved.clone();
    bad.virtio[0].queues[0].size = 3;
    let err = other
        .restore_state(vm.capture_vcpus().unwrap(), &vmstate, &bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("queue 0: size 3"), "{err}");
    let mut bad = saved.clone();
    bad.virtio[0].driver_features |= 1 << 60;
    assert!(other
        .restore_state(vm.capture_vcpus().unwrap(), &vmstate, &bad)
        .unwrap_err()
        .to_string()
        .contains("never offered"));
    let mut bad = saved.clone();
    bad.virtio[0].config[0] = 0x1041_1af4;
    assert!(other
        .restore_state(vm.capture_vcpus().unwrap(), &vmstate, &bad)
        .unwrap_err()
        .to_string()
        .contains("read-only bits"));

    other.restore_state(vcpus, &vmstate, &saved).unwrap();
    assert_eq!(other.capture_devices().unwrap().virtio, saved.virtio);
    // The restored device carries on where the other stopped: the next request
    // completes at used index 2.
    for g in [DESC, AVAIL, USED, HEADER, DATA, STATUS] {
        let mut page = vec![0u8; 4096];
        vm.ram().read(g, &mut page).unwrap();
        other.ram().write(g, &page).unwrap();
    }
    let mut d2 = Driver::probe(&other, SLOT, 2);
    d2.rings[0].avail_idx = 1;
    d2.rings[0].used_seen = 1;
    assert_eq!(d2.request(0, 1, 512, DATA), (0, 513));
    assert_eq!(d2.get(DATA, 512), vec![5; 512]);
}

/// A request the driver notified while the device was stopped (between a
/// migration stopping the devices and the vCPUs leaving the guest, or a
/// notification the device thread had not read yet) is pending on the source,
/// which the device state does not carry: the destination's device serves it on
/// its first start. (Before, the destination never looked at the queue again
/// and the guest waited forever.)
#[test]
fn a_request_pending_at_the_switch_over_is_served_after_it() {
    let img = disk(8);
    let vm = vm_with(disk_spec(img.path(), false));
    let mut d = Driver::probe(&vm, SLOT, 2);
    d.init();
    // Stopped as a switch-over stops it (the vCPUs are not run here).
    vm.pci().set_stopped(STOP_PAUSED, true);
    // The driver posts a write and notifies; the stopped device keeps it.
    d.put(DATA, &[7; 512]);
    d.post_request(1, 2, 512, DATA);
    d.notify(0);
    assert_eq!(d.used(0), None, "a stopped device served a request");
    let saved = vm.capture_devices().unwrap();
    // The destination opens the image unlocked; the source lets go of it.
    let mut other =
        Vm::create_for_shape(&vm.shape(), virtio_only(vec![disk_spec(img.path(), false)])).unwrap();
    vm.deactivate_disks().unwrap();
    for g in [DESC, AVAIL, USED, HEADER, DATA, STATUS] {
        let mut page = vec![0u8; 4096];
        vm.ram().read(g, &mut page).unwrap();
        other.ram().write(g, &page).unwrap();
    }
    drop(vm);
    other
        .restore_state(
            other.capture_vcpus().unwrap(),
            &other.capture_vm().unwrap(),
            &saved,
        )
        .unwrap();
    // The first start, as `Vm::resume` starts the devices.
    other.pci().set_stopped(STOP_PAUSED, false);
    let mut d2 = Driver::probe(&other, SLOT, 2);
    d2.rings[0].avail_idx = 1;
    assert_eq!(d2.wait_used(0, 5000).map(|(_, len)| len), Some(1));
    assert_eq!(d2.get(STATUS, 1), vec![0]);
    let on_disk = std::fs::read(img.path()).unwrap();
    assert_eq!(&on_disk[2 * 512..3 * 512], &[7; 512][..]);
}

/// This host's devices for a VM built from a shape: `virtio` and nothing else.
fn virtio_only(virtio: Vec<VirtioSpec>) -> crate::vm::HostDevices {
    crate::vm::HostDevices {
        backing: Backing::Anonymous,
        serial: SinkSpec::Null,
        virtio,
        ide: Vec::new(),
        fw_cfg: None,
        firmware: None,
        rtc: None,
    }
}

/// How a checkpoint of one of these VMs is restored: with `virtio` as
/// this side's devices, nothing else required.
fn restore_opts(virtio: Vec<VirtioSpec>) -> crate::persist::RestoreOptions {
    crate::persist::RestoreOptions {
        backing: Backing::Anonymous,
        serial: SinkSpec::Null,
        expect_mem_bytes: None,
        expect_vcpus: None,
        autostart: false,
        virtio,
        ide: Vec::new(),
        fw_cfg: None,
        firmware: None,
        rtc: None,
        on_postcopy: None,
    }
}

fn try_vm(spec: VirtioSpec) -> Result<Vm, crate::VmmError> {
    Vm::create(VmConfig {
        mem_bytes: 16 << 20,
        vcpus: 1,
        backing: Backing::Anonymous,
        serial: SinkSpec::Null,
        cpu: crate::cpu::model::CpuModel::Host,
        virtio: vec![spec],
        ide: Vec::new(),
        fw_cfg: None,
        firmware: None,
        rtc: None,
    })
}

fn shared_spec(path: &Path, read_only: bool) -> VirtioSpec {
    let mut spec = disk_spec(path, read_only);
    if let VirtioDeviceSpec::Block(c) = &mut spec.device {
        c.shared = true;
    }
    spec
}

/// Two VMs never write one image: the second is refused, naming the image
/// and the way out, as QEMU refuses it. Readers share; `share-rw` disks share
/// writing with each other. (Before image locks both VMs ran.)
#[test]
fn a_second_vm_on_a_written_image_is_refused() {
    let img = disk(8);
    let first = vm_with(disk_spec(img.path(), false));
    let refused = |e: crate::VmmError| {
        let text = e.to_string();
        assert!(
            matches!(e, crate::VmmError::DiskLock(_))
                && text.contains(&img.path().display().to_string())
                && text.contains("is another VM using it?")
                && text.contains("share-rw=on"),
            "{text}"
        );
        text
    };
    let e = try_vm(disk_spec(img.path(), false)).expect_err("a second writer");
    assert!(refused(e).contains("Failed to get \"write\" lock"));
    let e = try_vm(disk_spec(img.path(), true)).expect_err("a reader of a written image");
    assert!(refused(e).contains("Failed to get shared \"write\" lock"));
    refused(try_vm(shared_spec(img.path(), false)).expect_err("a sharer and a writer"));
    drop(first);

    let a = vm_with(disk_spec(img.path(), true));
    let b = vm_with(disk_spec(img.path(), true));
    refused(try_vm(disk_spec(img.path(), false)).expect_err("a writer among readers"));
    drop((a, b));
    let a = vm_with(shared_spec(img.path(), false));
    let b = vm_with(shared_spec(img.path(), false));
    drop((a, b));
}

/// The destination of a migration opens the image while the source runs on
/// it and takes the locks only when it loads the state, after the source let
/// go at switch-over; the source then cannot resume on the image (no guest on
/// two hosts), until the destination is gone.
#[test]
fn the_image_locks_move_with_a_migration() {
    let img = disk(8);
    let mut source = vm_with(disk_spec(img.path(), false));
    let mut dest = Vm::create_for_shape(
        &source.shape(),
        virtio_only(vec![disk_spec(img.path(), false)]),
    )
    .expect("the destination opens the image while the source holds it");
    source.pause().unwrap();
    let devices = source.capture_devices().unwrap();
    let (vcpus, vmstate) = (
        source.capture_vcpus().unwrap(),
        source.capture_vm().unwrap(),
    );
    source.deactivate_disks().unwrap();
    dest.restore_state(vcpus, &vmstate, &devices)
        .expect("the destination takes the locks");
    let e = source
        .resume()
        .expect_err("the source resumes on a taken image");
    assert!(
        e.to_string().contains("Failed to get \"write\" lock"),
        "{e}"
    );
    drop(dest);
    source
        .resume()
        .expect("the destination gone, the source takes them back");
    source.pause().unwrap();
}

fn qcow2_spec(path: &Path) -> VirtioSpec {
    let mut spec = disk_spec(path, false);
    if let VirtioDeviceSpec::Block(c) = &mut spec.device {
        c.format = crate::devices::virtio::blk::ImageFormat::Qcow2 {
            backing: crate::devices::virtio::blk::Backing::FromHeader,
        };
    }
    spec
}

/// A qcow2 overlay (`top`) on a 1 MiB raw base whose sector `n` is all
/// `n + 1`, made with qemu-img.
fn qcow2_chain(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    use crate::devices::disk_image::qemu_img;
    let base = dir.join("base.raw");
    let data: Vec<u8> = (0..1u64 << 20).map(|i| (i / 512 + 1) as u8).collect();
    std::fs::write(&base, data).unwrap();
    let top = dir.join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "raw", t]);
    (base, top)
}

/// A migration of a disk on a qcow2 chain: the source's writes (data and the
/// cluster tables it allocated) are on the files at the switch-over and the
/// destination reads them, writes on, and leaves a chain `qemu-img check`
/// finds clean, with the base untouched. Two VMs on overlays of one base
/// share it; a writer on the base is refused while they read it.
#[test]
fn a_qcow2_chain_moves_with_a_migration() {
    use crate::devices::disk_image::qemu_img;
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = qcow2_chain(dir.path());
    let base_before = std::fs::read(&base).unwrap();
    let mut source = vm_with(qcow2_spec(&top));
    // A driver holds the device (its bus): each is dropped with its block.
    {
        let mut d = Driver::probe(&source, SLOT, 2);
        d.init();
        assert_eq!(d.read(d.device, 8), 2048, "the qcow2's virtual size");
        assert_eq!(d.request(0, 9, 512, DATA), (0, 513));
        assert_eq!(d.get(DATA, 512), vec![10; 512], "read through to the base");
        d.put(DATA, &[0xa5; 1024]);
        assert_eq!(d.request(1, 700, 1024, DATA), (0, 1));
    }

    let mut dest = Vm::create_for_shape(&source.shape(), virtio_only(vec![qcow2_spec(&top)]))
        .expect("the destination opens the chain while the source writes it");
    source.pause().unwrap();
    let devices = source.capture_devices().unwrap();
    let (vcpus, vmstate) = (
        source.capture_vcpus().unwrap(),
        source.capture_vm().unwrap(),
    );
    // The rings live in guest RAM, which a migration copies.
    for g in [DESC, AVAIL, USED, HEADER, DATA, STATUS] {
        let mut page = vec![0u8; 4096];
        source.ram().read(g, &mut page).unwrap();
        dest.ram().write(g, &page).unwrap();
    }
    source.deactivate_disks().unwrap();
    dest.restore_state(vcpus, &vmstate, &devices)
        .expect("the destination takes the chain");
    dest.pci().set_stopped(STOP_PAUSED, false);
    {
        let mut d = Driver::probe(&dest, SLOT, 2);
        d.rings[0].avail_idx = 2;
        d.rings[0].used_seen = 2;
        d.put(DATA, &[0u8; 1024]);
        assert_eq!(d.request(0, 700, 1024, DATA), (0, 1025));
        assert_eq!(d.get(DATA, 1024), vec![0xa5; 1024], "the source's write");
        d.put(DATA, &[0x3c; 512]);
        assert_eq!(d.request(1, 1500, 512, DATA), (0, 1));
        assert_eq!(d.request(4, 0, 0, DATA).0, 0, "flush");
    }

    // A second overlay on the same base runs beside it; a writer on the
    // base is refused.
    let other = dir.path().join("other.qcow2");
    let (b, o) = (base.to_str().unwrap(), other.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "raw", o]);
    let beside = vm_with(qcow2_spec(&other));
    let e = try_vm(disk_spec(&base, false)).expect_err("a writer on a backing file");
    assert!(
        e.to_string().contains("Failed to get \"write\" lock"),
        "{e}"
    );
    drop((beside, source, dest));

    let t = top.to_str().unwrap();
    qemu_img(&["check", "-q", t]);
    let mut want = base_before.clone();
    want[700 * 512..702 * 512].fill(0xa5);
    want[1500 * 512..1501 * 512].fill(0x3c);
    let expected = dir.path().join("expected.raw");
    std::fs::write(&expected, &want).unwrap();
    let e = expected.to_str().unwrap();
    qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "raw", t, e]);
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the base changed"
    );
}

/// ferry and QEMU refuse each other's written images: QEMU fails with its
/// own message while a ferry VM writes the image, and ferry refuses an image
/// a running QEMU writes. Skipped where QEMU is not installed.
#[test]
fn ferry_and_qemu_refuse_each_others_images() {
    use std::process::{Command, Stdio};
    let qemu = "qemu-system-x86_64";
    if Command::new(qemu).arg("-version").output().is_err() {
        eprintln!("skipped: no {qemu}");
        return;
    }
    let img = disk(8);
    // A paused QEMU with the image on a virtio-blk disk; `timeout` ends one
    // that was not refused.
    let qemu_on = |timeout: &str, extra: &str| {
        let mut c = Command::new("timeout");
        c.args([
            timeout,
            qemu,
            "-machine",
            "pc",
            "-accel",
            "tcg",
            "-nodefaults",
        ])
        .args(["-display", "none", "-S", "-drive"])
        .arg(format!(
            "file={},format=raw,if=virtio{extra}",
            img.path().display()
        ))
        .stdin(Stdio::null());
        c
    };
    let vm = vm_with(disk_spec(img.path(), false));
    for (extra, want) in [
        ("", "Failed to get \"write\" lock"),
        (",readonly=on", "Failed to get shared \"write\" lock"),
    ] {
        let out = qemu_on("20", extra).output().expect("run QEMU");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(124), "QEMU{extra} ran: {err}");
        assert!(err.contains(want), "{err}");
    }
    drop(vm);

    // Killed with its `timeout` (which ends it on SIGTERM).
    let mut running = qemu_on("60", "")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start QEMU");
    let until = Instant::now() + Duration::from_secs(30);
    while crate::devices::image_lock::lock_on(img.path(), 101).is_none() {
        assert!(Instant::now() < until, "QEMU never took its write lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    let writer = try_vm(disk_spec(img.path(), false)).map(drop);
    let reader = try_vm(disk_spec(img.path(), true)).map(drop);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(running.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = running.wait();
    for (result, want) in [
        (writer, "Failed to get \"write\" lock"),
        (reader, "Failed to get shared \"write\" lock"),
    ] {
        let text = result.expect_err("ferry on QEMU's image").to_string();
        assert!(
            text.contains(&img.path().display().to_string())
                && text.contains(want)
                && text.contains("is another VM using it?"),
            "{text}"
        );
    }
    vm_with(disk_spec(img.path(), false));
}

#[test]
fn bad_device_configuration_is_refused_with_the_reason() {
    let img = disk(8);
    let mut spec = disk_spec(img.path(), false);
    spec.slot = 0;
    let err = Vm::create(VmConfig {
        mem_bytes: 16 << 20,
        vcpus: 1,
        backing: Backing::Anonymous,
        serial: SinkSpec::Null,
        cpu: crate::cpu::model::CpuModel::Host,
        virtio: vec![spec],
        ide: Vec::new(),
        fw_cfg: None,
        firmware: None,
        rtc: None,
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("slot 0 is out of range"), "{err}");
    let missing = disk_spec(Path::new("/nonexistent/disk.img"), false);
    let err = Vm::create(VmConfig {
        mem_bytes: 16 << 20,
        vcpus: 1,
        backing: Backing::Anonymous,
        serial: SinkSpec::Null,
        cpu: crate::cpu::model::CpuModel::Host,
        virtio: vec![missing.clone(), missing],
        ide: Vec::new(),
        fw_cfg: None,
        firmware: None,
        rtc: None,
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("both in PCI slot"), "{err}");
}

// ---- virtio-net on a real tap ----

const NET_SLOT: u8 = 5;
const RXBUF: u64 = 0x30000;
const TXBUF: u64 = 0x40000;
const HDR: usize = net::HEADER_LEN;
const ETH_TEST: u16 = 0x88b5;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// A tap for one test, up, without IPv6 (no stray frames), and a packet socket
/// on its host side.
struct TestTap {
    name: String,
    fd: Arc<OwnedFd>,
    host: OwnedFd,
}

impl TestTap {
    fn new(vnet_hdr: bool) -> Option<Self> {
        if !Path::new("/dev/net/tun").exists() {
            eprintln!("skipped: /dev/net/tun is absent");
            return None;
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "fy{}t{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let fd = Arc::new(ferry_kvm::tap::open_tap(&name, vnet_hdr).expect("tap (needs root)"));
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        let up = std::process::Command::new("ip")
            .args(["link", "set", "dev", &name, "up"])
            .status()
            .expect("ip");
        assert!(up.success(), "ip link set {name} up");
        let host = ferry_kvm::tap::packet_socket(&name).expect("packet socket");
        Some(Self { name, fd, host })
    }

    fn spec(&self, mac: [u8; 6]) -> VirtioSpec {
        VirtioSpec {
            slot: NET_SLOT,
            id: format!("net-{}", self.name),
            device: VirtioDeviceSpec::Net(NetConfig {
                tap: self.fd.clone(),
                mac,
            }),
        }
    }

    /// Sends `frame` out of the interface: the tap's reader (the NIC) gets it.
    fn send(&self, frame: &[u8]) {
        nix::unistd::write(&self.host, frame).expect("send on the packet socket");
    }

    /// The next frame of `ethertype` the NIC sent, within `ms`.
    fn recv(&self, ethertype: u16, ms: u64) -> Option<Vec<u8>> {
        let until = Instant::now() + Duration::from_millis(ms);
        let mut buf = vec![0u8; 70_000];
        while Instant::now() < until {
            match nix::unistd::read(&self.host, &mut buf) {
                Ok(n) if n >= 14 && buf[12..14] == ethertype.to_be_bytes() => {
                    return Some(buf[..n].to_vec())
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        None
    }
}

fn test_frame(dst: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, seed]);
    f.extend_from_slice(&ETH_TEST.to_be_bytes());
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(3).wrapping_add(seed)));
    f
}

fn net_vm(tap: &TestTap, mac: [u8; 6]) -> Vm {
    vm_with(tap.spec(mac))
}

/// Transmits `frame` from the driver (header + frame in one buffer).
fn transmit(d: &mut Driver<'_>, frame: &[u8]) {
    let mut buf = vec![0u8; HDR];
    buf.extend_from_slice(frame);
    d.put(TXBUF, &buf);
    d.post(net::TX_QUEUE, &[(TXBUF, buf.len() as u32, false)]);
    d.notify(net::TX_QUEUE);
    assert_eq!(
        d.used(net::TX_QUEUE),
        Some(((d.rings[1].avail_idx - 1) % 4 * 4) as u32).map(|h| (h, 0))
    );
}

fn post_rx(d: &mut Driver<'_>, k: u64) -> u16 {
    let addr = RXBUF + k * 0x1000;
    d.put(addr, &[0xee; 2048]);
    d.post(net::RX_QUEUE, &[(addr, 2048, true)])
}

#[test]
fn net_transmits_and_receives_through_the_tap() {
    for vnet_hdr in [true, false] {
        let Some(tap) = TestTap::new(vnet_hdr) else {
            return;
        };
        let vm = net_vm(&tap, GUEST_MAC);
        let mut d = Driver::probe(&vm, NET_SLOT, 1);
        d.write(d.common, 4, 0);
        let f = d.read(d.common + 4, 4);
        assert_eq!(
            f & (1 << 5 | 1 << 16),
            1 << 5 | 1 << 16,
            "MAC and STATUS offered"
        );
        d.init();
        let mac: Vec<u8> = (0..6).map(|i| d.read(d.device + i, 1) as u8).collect();
        assert_eq!(mac, GUEST_MAC);
        assert_eq!(d.read(d.device + 6, 2), 1, "link up");

        let out = test_frame([0xff; 6], 100, 1);
        transmit(&mut d, &out);
        assert_eq!(
            tap.recv(ETH_TEST, 2000).as_deref(),
            Some(&out[..]),
            "vnet_hdr {vnet_hdr}"
        );

        let head = post_rx(&mut d, 0);
        d.notify(net::RX_QUEUE);
        let into = test_frame(GUEST_MAC, 1514, 2);
        tap.send(&into);
        let (id, len) = d.wait_used(net::RX_QUEUE, 2000).expect("frame received");
        assert_eq!((id, len as usize), (u32::from(head), HDR + into.len()));
        let got = d.get(RXBUF, len as usize);
        assert_eq!(&got[..HDR], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "header");
        assert_eq!(&got[HDR..], &into[..]);
        assert_eq!(
            d.get(RXBUF + u64::from(len), 1),
            vec![0xee],
            "nothing past the frame"
        );
        assert_eq!(d.status(), 0xf);
    }
}

#[test]
fn net_frames_wait_in_the_tap_for_a_buffer_and_while_paused() {
    let Some(tap) = TestTap::new(true) else {
        return;
    };
    let mut vm = net_vm(&tap, GUEST_MAC);
    let mut d = Driver::probe(&vm, NET_SLOT, 1);
    d.init();
    // No buffer: the frame waits (not dropped) until the driver posts one.
    let first = test_frame(GUEST_MAC, 200, 3);
    tap.send(&first);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d.used(net::RX_QUEUE), None);
    post_rx(&mut d, 0);
    d.notify(net::RX_QUEUE);
    let (_, len) = d
        .wait_used(net::RX_QUEUE, 2000)
        .expect("frame after the buffer came");
    assert_eq!(d.get(RXBUF + HDR as u64, len as usize - HDR), first);

    // Paused: buffers posted and notified, frames arrive, guest memory untouched.
    drop(d);
    vm.pause().unwrap();
    let mut d = Driver::attach(&vm, NET_SLOT, 1);
    d.rings = vec![
        Ring {
            avail_idx: 1,
            used_seen: 1,
            ..Ring::new(0)
        },
        Ring::new(1),
    ];
    vm.ram().register(vm.vm_fd(), true).unwrap();
    let _ = vm.ram().get_dirty_log(vm.vm_fd()).unwrap();
    post_rx(&mut d, 1);
    d.notify(net::RX_QUEUE);
    let second = test_frame(GUEST_MAC, 300, 4);
    tap.send(&second);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(d.used(net::RX_QUEUE), None);
    assert_eq!(d.get(RXBUF + 0x1000, 16), vec![0xee; 16]);
    let log = vm.ram().get_dirty_log(vm.vm_fd()).unwrap();
    let dirty = |gpa: u64| log[0][(gpa / 4096 / 64) as usize] & (1 << ((gpa / 4096) % 64)) != 0;
    assert!(
        !dirty(RXBUF + 0x1000) && !dirty(d.rings[0].used),
        "no device write while paused"
    );
    // Running again: the frame lands, and the pages are in the dirty log.
    vm.pci().set_stopped(STOP_PAUSED, false);
    let (_, len) = d
        .wait_used(net::RX_QUEUE, 2000)
        .expect("frame after resume");
    assert_eq!(
        d.get(RXBUF + 0x1000 + HDR as u64, len as usize - HDR),
        second
    );
    let log = vm.ram().get_dirty_log(vm.vm_fd()).unwrap();
    let dirty = |gpa: u64| log[0][(gpa / 4096 / 64) as usize] & (1 << ((gpa / 4096) % 64)) != 0;
    assert!(dirty(RXBUF + 0x1000) && dirty(d.rings[0].used));
}

#[test]
fn net_hostile_buffers_need_a_reset() {
    let Some(tap) = TestTap::new(true) else {
        return;
    };
    let vm = net_vm(&tap, GUEST_MAC);
    let mut d = Driver::probe(&vm, NET_SLOT, 1);
    let needs_reset = |d: &Driver<'_>| d.status() & status::DEVICE_NEEDS_RESET != 0;
    // Transmit: outside RAM; too long; too short for the header.
    for buf in [(1u64 << 40, 100u32), (0x100000, 70_000), (TXBUF, 4)] {
        d.init();
        d.post(net::TX_QUEUE, &[(buf.0, buf.1, false)]);
        d.notify(net::TX_QUEUE);
        assert!(needs_reset(&d), "{buf:?}");
    }
    // Receive into a buffer outside RAM, or too small for the header.
    for buf in [(1u64 << 40, 2048u32), (RXBUF, 8)] {
        d.init();
        d.post(net::RX_QUEUE, &[(buf.0, buf.1, true)]);
        d.notify(net::RX_QUEUE);
        tap.send(&test_frame(GUEST_MAC, 60, 5));
        let until = Instant::now() + Duration::from_secs(2);
        while !needs_reset(&d) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(needs_reset(&d), "{buf:?}");
    }
    // A reset brings it back.
    d.init();
    let out = test_frame([0xff; 6], 64, 6);
    transmit(&mut d, &out);
    assert_eq!(tap.recv(ETH_TEST, 2000).as_deref(), Some(&out[..]));
}

#[test]
fn net_state_round_trips_the_mac_is_part_of_the_shape_and_arrival_announces() {
    let (Some(tap), Some(tap2)) = (TestTap::new(true), TestTap::new(true)) else {
        return;
    };
    let vm = net_vm(&tap, GUEST_MAC);
    let mut d = Driver::probe(&vm, NET_SLOT, 1);
    d.init();
    post_rx(&mut d, 0);
    d.notify(net::RX_QUEUE);
    let shape = vm.shape();
    assert!(
        shape
            .devices
            .contains(&"virtio-net@05:mac=52:54:00:12:34:56".to_string()),
        "{:?}",
        shape.devices
    );
    vm.pci().set_stopped(STOP_PAUSED, true);
    let saved = vm.capture_devices().unwrap();

    let other_mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];
    let err = Vm::create_for_shape(&shape, virtio_only(vec![tap2.spec(other_mac)]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("mac=52:54:00:12:34:57"), "{err}");
    let mut dest = Vm::create_for_shape(&shape, virtio_only(vec![tap2.spec(GUEST_MAC)])).unwrap();
    dest.restore_state(
        vm.capture_vcpus().unwrap(),
        &vm.capture_vm().unwrap(),
        &saved,
    )
    .unwrap();
    assert_eq!(dest.capture_devices().unwrap().virtio, saved.virtio);
    assert!(
        dest.will_announce(),
        "an arrived VM announces on its first resume"
    );

    // The announce: 5 RARP frames from the guest's MAC, 50 ms then +100 ms apart.
    let start = Instant::now();
    dest.announce();
    let mut times = Vec::new();
    while let Some(f) = tap2.recv(net::ETH_P_RARP, 1000) {
        assert_eq!(f.len(), 60);
        assert_eq!(&f[..], &net::rarp_frame(&GUEST_MAC)[..]);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &GUEST_MAC);
        assert_eq!(&f[20..22], &[0, 3], "reverse request");
        assert_eq!((&f[22..28], &f[32..38]), (&GUEST_MAC[..], &GUEST_MAC[..]));
        times.push(start.elapsed().as_millis() as u64);
    }
    assert_eq!(times.len(), 5, "{times:?}");
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, want) in gaps.iter().zip([50, 150, 250, 350]) {
        assert!(*gap + 5 >= want && *gap < want + 100, "gaps {gaps:?}");
    }
    // The source's tap saw none.
    assert!(tap.recv(net::ETH_P_RARP, 50).is_none());
}

/// `announce-self`: only the NICs named announce, unknown names are ignored
/// (as QEMU ignores them), and the schedule's rounds are sent.
#[test]
fn announce_self_names_the_nics_and_follows_the_schedule() {
    let Some(tap) = TestTap::new(true) else {
        return;
    };
    let vm = net_vm(&tap, GUEST_MAC);
    let id = vm.pci().devices()[0].1.lock().unwrap().id().to_string();
    let schedule = net::AnnounceSchedule {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(20),
        rounds: 3,
        step: Duration::from_millis(5),
    };
    assert!(vm
        .announce_with(schedule, Some(&["net9".to_string()]))
        .is_empty());
    assert!(tap.recv(net::ETH_P_RARP, 100).is_none(), "an unnamed NIC");
    let named = vm.announce_with(schedule, Some(std::slice::from_ref(&id)));
    assert_eq!(named, std::slice::from_ref(&id));
    let mut frames = 0;
    while tap.recv(net::ETH_P_RARP, 500).is_some() {
        frames += 1;
    }
    assert_eq!(frames, 3);
    let none = net::AnnounceSchedule {
        rounds: 0,
        ..schedule
    };
    assert_eq!(vm.announce_with(none, None), [id]);
    assert!(tap.recv(net::ETH_P_RARP, 100).is_none(), "zero rounds");
}

#[test]
fn net_device_thread_ends_with_the_vm() {
    let Some(tap) = TestTap::new(true) else {
        return;
    };
    let vm = net_vm(&tap, GUEST_MAC);
    let dev = Arc::downgrade(&vm.pci().devices()[0].1);
    assert!(Arc::strong_count(&tap.fd) >= 3, "config, device, thread");
    drop(vm);
    assert!(
        dev.upgrade().is_none(),
        "the device thread let go of the device"
    );
    assert_eq!(Arc::strong_count(&tap.fd), 1, "only the test holds the tap");
}

#[test]
fn net_throughput_through_the_tap() {
    let Some(tap) = TestTap::new(true) else {
        return;
    };
    let vm = net_vm(&tap, GUEST_MAC);
    let mut d = Driver::probe(&vm, NET_SLOT, 1);
    d.init();
    let n = 20_000;
    let out = test_frame([0xff; 6], 1514, 7);
    let mut buf = vec![0u8; HDR];
    buf.extend_from_slice(&out);
    d.put(TXBUF, &buf);
    let t = Instant::now();
    for _ in 0..n {
        d.post(net::TX_QUEUE, &[(TXBUF, buf.len() as u32, false)]);
        d.notify(net::TX_QUEUE);
        d.used(net::TX_QUEUE).expect("sent");
    }
    let tx = f64::from(n) / t.elapsed().as_secs_f64();
    let n_rx = 5_000;
    let into = test_frame(GUEST_MAC, 1514, 8);
    let t = Instant::now();
    let mut got = 0;
    for _ in 0..n_rx / 4 {
        for j in 0..4 {
            d.post(net::RX_QUEUE, &[(RXBUF + j * 0x1000, 2048, true)]);
        }
        d.notify(net::RX_QUEUE);
        for _ in 0..4 {
            tap.send(&into);
        }
        for _ in 0..4 {
            if d.wait_used(net::RX_QUEUE, 1000).is_some() {
                got += 1;
            }
        }
    }
    let rx = f64::from(got) / t.elapsed().as_secs_f64();
    eprintln!("virtio-net through a tap, 1514-byte frames: TX {tx:.0} frames/s (device side; the tap drops what the host does not read), RX {rx:.0} frames/s ({got}/{n_rx}, lock-step 4 at a time)");
    assert_eq!(d.status(), 0xf);
}

#[test]
fn net_receives_nothing_while_a_stop_holds_the_vm() {
    let Some(tap) = TestTap::new(true) else {
        return;
    };
    let vm = net_vm(&tap, GUEST_MAC);
    let mut d = Driver::probe(&vm, NET_SLOT, 1);
    d.init();
    let hold = vm.hold_handle();
    hold.hold();
    post_rx(&mut d, 0);
    d.notify(net::RX_QUEUE);
    let frame = test_frame(GUEST_MAC, 100, 9);
    tap.send(&frame);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d.used(net::RX_QUEUE), None, "held: nothing received");
    hold.release();
    let (_, len) = d
        .wait_used(net::RX_QUEUE, 2000)
        .expect("frame after release");
    assert_eq!(d.get(RXBUF + HDR as u64, len as usize - HDR), frame);
}

// ---- virtio-rng ----

const RNG_SLOT: u8 = 6;

fn rng_spec(source: rng::RngSource, max_bytes: u64, period_ms: u32) -> VirtioSpec {
    VirtioSpec {
        slot: RNG_SLOT,
        id: "rng0".into(),
        device: VirtioDeviceSpec::Rng(rng::RngConfig {
            source,
            max_bytes,
            period_ms,
        }),
    }
}

fn urandom() -> rng::RngSource {
    rng::RngSource::File("/dev/urandom".into())
}

/// Posts one device-writable buffer of `len` bytes at `DATA + k * 0x1000`.
fn post_entropy(d: &mut Driver<'_>, k: u64, len: u32) -> u16 {
    d.put(DATA + k * 0x1000, &vec![0u8; len as usize]);
    d.post(rng::REQUEST_QUEUE, &[(DATA + k * 0x1000, len, true)])
}

#[test]
fn rng_fills_requests_from_its_source() {
    // A file source gives its bytes in order: the guest gets exactly them.
    let mut src = tempfile::NamedTempFile::new().unwrap();
    let pattern: Vec<u8> = (0..300u32).map(|i| (i * 13 + 7) as u8).collect();
    std::io::Write::write_all(&mut src, &pattern).unwrap();
    let vm = vm_with(rng_spec(
        rng::RngSource::File(src.path().to_path_buf()),
        rng::DEFAULT_MAX_BYTES,
        rng::DEFAULT_PERIOD_MS,
    ));
    let mut d = Driver::probe(&vm, RNG_SLOT, 4);
    assert_eq!(d.rings.len(), 1, "one request queue");
    d.init();
    let head = post_entropy(&mut d, 0, 100);
    d.notify(0);
    assert_eq!(d.used(0), Some((u32::from(head), 100)));
    assert_eq!(d.get(DATA, 100), pattern[..100]);
    // Two buffers in one chain are filled in order.
    d.put(DATA, &[0; 64]);
    d.put(DATA + 0x1000, &[0; 64]);
    d.post(0, &[(DATA, 40, true), (DATA + 0x1000, 60, true)]);
    d.notify(0);
    assert_eq!(d.used(0).map(|u| u.1), Some(100));
    assert_eq!(d.get(DATA, 40), pattern[100..140]);
    assert_eq!(d.get(DATA + 0x1000, 60), pattern[140..200]);
    // At the file's end the request gets what is left, then waits.
    post_entropy(&mut d, 2, 200);
    d.notify(0);
    assert_eq!(d.used(0).map(|u| u.1), Some(100));
    assert_eq!(d.get(DATA + 0x2000, 100), pattern[200..300]);
    post_entropy(&mut d, 3, 16);
    d.notify(0);
    assert_eq!(d.used(0), None, "nothing left in the file");
    assert_eq!(d.status(), 0xf);

    // /dev/urandom and the builtin source: bytes arrive and they differ.
    for source in [urandom(), rng::RngSource::Builtin] {
        let vm = vm_with(rng_spec(source.clone(), rng::DEFAULT_MAX_BYTES, 1000));
        let mut d = Driver::probe(&vm, RNG_SLOT, 4);
        d.init();
        post_entropy(&mut d, 0, 256);
        d.notify(0);
        assert_eq!(d.used(0).map(|u| u.1), Some(256), "{source:?}");
        let bytes = d.get(DATA, 256);
        assert!(
            bytes.iter().any(|&b| b != bytes[0]),
            "{source:?} gave 256 equal bytes"
        );
        let stats = vm.device_stats();
        assert_eq!(stats[0].0, "rng0");
        let crate::devices::virtio::DeviceStats::Rng(s) = stats[0].1 else {
            panic!("{stats:?}");
        };
        assert_eq!((s.bytes, s.requests), (256, 1));
    }
}

#[test]
fn rng_writes_land_in_the_dirty_log() {
    let vm = vm_with(rng_spec(urandom(), rng::DEFAULT_MAX_BYTES, 1000));
    let mut d = Driver::probe(&vm, RNG_SLOT, 4);
    d.init();
    vm.ram().register(vm.vm_fd(), true).unwrap();
    let _ = vm.ram().get_dirty_log(vm.vm_fd()).unwrap();
    post_entropy(&mut d, 3, 64);
    let _ = vm.ram().get_dirty_log(vm.vm_fd()).unwrap();
    d.notify(0);
    assert_eq!(d.used(0).map(|u| u.1), Some(64));
    let log = vm.ram().get_dirty_log(vm.vm_fd()).unwrap();
    let dirty = |gpa: u64| log[0][(gpa / 4096 / 64) as usize] & (1 << ((gpa / 4096) % 64)) != 0;
    assert!(dirty(DATA + 0x3000), "the entropy buffer");
    assert!(dirty(USED), "used ring");
    assert!(!dirty(0x30000), "an untouched page");
}

/// QEMU's rate limit: with max-bytes=N per period, a request larger than N
/// gets N bytes, the next one waits for the next window, and the device
/// thread serves it then without another notification. Bounds hold on a
/// loaded host: the only timing asserted is "not before the window ended".
#[test]
fn rng_rate_limit_holds_and_the_next_window_serves_waiting_requests() {
    const PERIOD: u64 = 400;
    let vm = vm_with(rng_spec(urandom(), 16, PERIOD as u32));
    let mut d = Driver::probe(&vm, RNG_SLOT, 4);
    d.init();
    let t0 = Instant::now();
    post_entropy(&mut d, 0, 24);
    d.notify(0);
    assert_eq!(
        d.used(0).map(|u| u.1),
        Some(16),
        "a short request: the quota"
    );
    // The quota is spent: this one waits for the window's end.
    post_entropy(&mut d, 1, 8);
    d.notify(0);
    if let Some(early) = d.used(0) {
        // Only possible if this host stalled past the window.
        assert!(
            t0.elapsed() >= Duration::from_millis(PERIOD),
            "served {early:?} within the window"
        );
        return;
    }
    let (_, len) = d
        .wait_used(0, 20_000)
        .expect("the next window served the waiting request");
    assert_eq!(len, 8);
    assert!(
        t0.elapsed() >= Duration::from_millis(PERIOD),
        "served after {:?}, before the {PERIOD} ms window ended",
        t0.elapsed()
    );
    let crate::devices::virtio::DeviceStats::Rng(s) = vm.device_stats()[0].1 else {
        panic!();
    };
    assert_eq!(s.bytes, 24);
    assert!(s.throttled >= 1, "{s:?}");
    assert_eq!(d.status(), 0xf);
}

/// The device thread sleeps while a request waits for the window: it takes
/// (almost) no CPU time meanwhile.
#[test]
fn rng_waits_for_the_window_without_spinning() {
    // A slot of its own: the thread's name is this test's alone.
    const SLOT: u8 = 0x1d;
    let vm = vm_with(VirtioSpec {
        slot: SLOT,
        ..rng_spec(urandom(), 1, 60_000)
    });
    let mut d = Driver::probe(&vm, SLOT, 4);
    d.init();
    post_entropy(&mut d, 0, 1);
    d.notify(0);
    assert!(d.used(0).is_some());
    post_entropy(&mut d, 1, 1);
    d.notify(0);
    assert!(d.used(0).is_none());
    // The device thread's wake-ups (context switches) while the request waits:
    // a thread sleeping until the window's end has none; one polling (even
    // every millisecond) has hundreds.
    let thread = format!("virtio-rng@{SLOT:02x}");
    let switches = || -> Option<u64> {
        for t in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let dir = t.path();
            // Other tests' threads come and go meanwhile.
            let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
                continue;
            };
            if comm.trim() == thread {
                let status = std::fs::read_to_string(dir.join("status")).ok()?;
                return Some(
                    status
                        .lines()
                        .filter(|l| l.contains("ctxt_switches"))
                        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                        .sum(),
                );
            }
        }
        None
    };
    // The thread names itself once it runs: wait for that (bounded).
    let until = Instant::now() + Duration::from_secs(20);
    let before = loop {
        if let Some(n) = switches() {
            break n;
        }
        assert!(Instant::now() < until, "no thread named {thread}");
        std::thread::sleep(Duration::from_millis(10));
    };
    std::thread::sleep(Duration::from_millis(500));
    let after = switches().expect("the device thread exists");
    assert!(
        after - before <= 10,
        "the device thread woke {} times in 500 ms while the request waited",
        after - before
    );
    assert!(d.used(0).is_none(), "the window has not ended");
}

#[test]
fn rng_hostile_requests_need_a_reset() {
    let vm = vm_with(rng_spec(urandom(), rng::DEFAULT_MAX_BYTES, 1000));
    let mut d = Driver::probe(&vm, RNG_SLOT, 4);
    let needs_reset = |d: &Driver<'_>| d.status() & status::DEVICE_NEEDS_RESET != 0;
    for bufs in [
        vec![(DATA, 16u32, false)],
        vec![(DATA, 16, true), (DATA + 0x1000, 16, false)],
        vec![(1u64 << 40, 16, true)],
        vec![(DATA, 0, true)],
    ] {
        d.init();
        d.post(0, &bufs);
        d.notify(0);
        assert!(needs_reset(&d), "{bufs:?}");
        assert_eq!(d.used(0), None, "{bufs:?}");
    }
    // A reset brings it back.
    d.init();
    post_entropy(&mut d, 0, 32);
    d.notify(0);
    assert_eq!(d.used(0).map(|u| u.1), Some(32));
}

/// A checkpoint of a VM with an entropy device, through a real stream: the
/// queue and the rate-limit window arrive, the restored device carries on,
/// and a destination without the device is refused by its shape.
#[test]
fn rng_survives_a_checkpoint_and_is_part_of_the_shape() {
    const PERIOD: u32 = 60_000;
    let vm = vm_with(rng_spec(urandom(), 16, PERIOD));
    let mut d = Driver::probe(&vm, RNG_SLOT, 4);
    d.init();
    post_entropy(&mut d, 0, 10);
    d.notify(0);
    assert_eq!(d.used(0).map(|u| u.1), Some(10));
    vm.pci().set_stopped(STOP_PAUSED, true);
    let shape = vm.shape();
    assert!(
        shape
            .devices
            .contains(&format!("virtio-rng@{RNG_SLOT:02x}:entropy")),
        "{:?}",
        shape.devices
    );
    let saved = vm.capture_devices().unwrap();
    let Some(crate::devices::virtio::DeviceState::Rng(s)) = &saved.virtio[0].device else {
        panic!("{:?}", saved.virtio[0].device);
    };
    assert_eq!(s.quota_remaining, 6);
    assert!(s.window_left_ms.is_some_and(|ms| ms <= u64::from(PERIOD)));
    let (stream, _) = crate::persist::save(&vm, Vec::new()).unwrap();

    // Without the device, or with it elsewhere: refused, naming it.
    let err = crate::persist::restore(std::io::Cursor::new(stream.clone()), &restore_opts(vec![]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("virtio-rng@06"), "{err}");
    let mut moved = rng_spec(rng::RngSource::Builtin, 16, PERIOD);
    moved.slot = 7;
    let err = crate::persist::restore(
        std::io::Cursor::new(stream.clone()),
        &restore_opts(vec![moved]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("virtio-rng@06"), "{err}");

    // Another source on the destination is fine; the window came along.
    let other = crate::persist::restore(
        std::io::Cursor::new(stream),
        &restore_opts(vec![rng_spec(rng::RngSource::Builtin, 16, PERIOD)]),
    )
    .unwrap();
    let restored = other.capture_devices().unwrap();
    assert_eq!(restored.virtio[0].queues, saved.virtio[0].queues);
    let Some(crate::devices::virtio::DeviceState::Rng(r)) = &restored.virtio[0].device else {
        panic!();
    };
    assert_eq!(r.quota_remaining, 6);
    assert!(r.window_left_ms.is_some());
    other.pci().set_stopped(STOP_PAUSED, false);
    let mut d2 = Driver::attach(&other, RNG_SLOT, 4);
    d2.rings[0].avail_idx = 1;
    d2.rings[0].used_seen = 1;
    // The restored window allows 6 more bytes, no more.
    post_entropy(&mut d2, 1, 10);
    d2.notify(0);
    assert_eq!(d2.used(0).map(|u| u.1), Some(6));
    post_entropy(&mut d2, 2, 10);
    d2.notify(0);
    assert_eq!(d2.used(0), None, "the restored window is spent");
    let bytes = d2.get(DATA + 0x1000, 6);
    assert_ne!(bytes, vec![0; 6]);
}

/// Device state for an rng that no ferry could have written, or for another
/// device, is refused before anything changes.
#[test]
fn rng_hostile_state_is_refused() {
    let vm = vm_with(rng_spec(urandom(), 16, 1000));
    let mut d = Driver::probe(&vm, RNG_SLOT, 4);
    d.init();
    vm.pci().set_stopped(STOP_PAUSED, true);
    let saved = vm.capture_devices().unwrap();
    let mut other = vm_with(rng_spec(urandom(), 16, 1000));
    let vcpus = || vm.capture_vcpus().unwrap();
    let vmstate = vm.capture_vm().unwrap();
    let mut bad = saved.clone();
    bad.virtio[0].device = Some(crate::devices::virtio::DeviceState::Rng(rng::RngState {
        quota_remaining: u64::MAX,
        window_left_ms: None,
    }));
    let err = other
        .restore_state(vcpus(), &vmstate, &bad)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("virtio-rng@06") && err.contains("quota"),
        "{err}"
    );
    let before = other.capture_devices().unwrap().virtio;
    assert_ne!(
        before[0].status, saved.virtio[0].status,
        "nothing was loaded"
    );

    // An rng's state for a disk is refused too.
    let (img, img2) = (disk(8), disk(8));
    let vm2 = vm_with(disk_spec(img.path(), false));
    let mut disk_state = vm2.capture_devices().unwrap();
    disk_state.virtio[0].device = saved.virtio[0].device.clone();
    let mut other2 = vm_with(disk_spec(img2.path(), false));
    let err = other2
        .restore_state(vcpus(), &vmstate, &disk_state)
        .unwrap_err()
        .to_string();
    assert!(err.contains("another kind"), "{err}");
    other.restore_state(vcpus(), &vmstate, &saved).unwrap();
}

// ---- virtio-balloon ----

const BALLOON_SLOT: u8 = 5;
/// Where the tests' pages to balloon live: 1 MiB into the 16 MiB of RAM.
const BALLOON_PAGES: u64 = 0x10_0000;

fn balloon_spec(config: balloon::BalloonConfig) -> VirtioSpec {
    VirtioSpec {
        slot: BALLOON_SLOT,
        id: "balloon0".into(),
        device: VirtioDeviceSpec::Balloon(config),
    }
}

fn balloon_stats(vm: &Vm) -> balloon::BalloonStats {
    let stats = vm.device_stats();
    let crate::devices::virtio::DeviceStats::Balloon(s) = stats[0].1 else {
        panic!("{stats:?}");
    };
    s
}

/// Posts an array of PFNs on `queue` (read-only, at DATA + k pages).
fn post_pfns(d: &mut Driver<'_>, queue: usize, k: u64, pfns: &[u32]) -> u16 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    d.put(DATA + k * 0x1000, &bytes);
    d.post(queue, &[(DATA + k * 0x1000, bytes.len() as u32, false)])
}

/// Posts a stats buffer of (tag, value) pairs on the stats queue.
fn post_stats(d: &mut Driver<'_>, k: u64, stats: &[(u16, u64)]) -> u16 {
    let bytes: Vec<u8> = stats
        .iter()
        .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect();
    d.put(DATA + k * 0x1000, &bytes);
    d.post(
        balloon::STATS_QUEUE,
        &[(DATA + k * 0x1000, bytes.len() as u32, false)],
    )
}

/// An inflate gives the pages back to the host: they read as zero
/// afterwards, their neighbours keep their bytes; a deflate acknowledges.
#[test]
fn balloon_inflate_discards_pages_and_deflate_acknowledges() {
    let vm = vm_with(balloon_spec(balloon::BalloonConfig::default()));
    let mut d = Driver::probe(&vm, BALLOON_SLOT, 5);
    assert_eq!(d.rings.len(), 3, "inflate, deflate and stats queues");
    d.init();
    for i in 0..8u64 {
        d.put(BALLOON_PAGES + i * 0x1000, &[0xa5; 4096]);
    }
    let pfn = (BALLOON_PAGES / 4096) as u32;
    // Two runs: pages 0-2 and page 5.
    let head = post_pfns(
        &mut d,
        balloon::INFLATE_QUEUE,
        0,
        &[pfn, pfn + 1, pfn + 2, pfn + 5],
    );
    d.notify(balloon::INFLATE_QUEUE);
    assert_eq!(d.used(balloon::INFLATE_QUEUE), Some((u32::from(head), 0)));
    for i in 0..8u64 {
        let zero = [0, 1, 2, 5].contains(&i);
        let page = d.get(BALLOON_PAGES + i * 0x1000, 4096);
        assert_eq!(page == vec![0; 4096], zero, "page {i}");
        if !zero {
            assert_eq!(page, vec![0xa5; 4096], "page {i}");
        }
    }
    let s = balloon_stats(&vm);
    assert_eq!(
        (s.inflated_pages, s.held_pages, s.discard_failures),
        (4, 4, 0)
    );
    // A discarded page comes back on touch, zeroed, and keeps what is written.
    d.put(BALLOON_PAGES, &[7; 16]);
    assert_eq!(d.get(BALLOON_PAGES, 16), vec![7; 16]);

    post_pfns(&mut d, balloon::DEFLATE_QUEUE, 1, &[pfn, pfn + 1]);
    d.notify(balloon::DEFLATE_QUEUE);
    assert_eq!(d.used(balloon::DEFLATE_QUEUE).map(|u| u.1), Some(0));
    let s = balloon_stats(&vm);
    assert_eq!((s.deflated_pages, s.held_pages), (2, 2));
    assert_eq!(d.status(), 0xf);
}

/// The host's target reaches the driver through the configuration space
/// with a configuration change; the driver's `actual` reaches the host.
#[test]
fn balloon_target_and_actual_go_through_the_config_space() {
    let vm = vm_with(balloon_spec(balloon::BalloonConfig::default()));
    let mut d = Driver::probe(&vm, BALLOON_SLOT, 5);
    d.init();
    let generation = d.read(d.common + 0x15, 1);
    vm.set_balloon_target(1000).unwrap();
    assert_eq!(d.read(d.device, 4), 1000, "num_pages");
    assert_ne!(d.read(d.common + 0x15, 1), generation, "config generation");
    let err = vm.set_balloon_target(4097).unwrap_err().to_string();
    assert!(err.contains("larger than guest RAM"), "{err}");
    assert_eq!(vm.take_balloon_change(), None);
    d.write(d.device + 4, 4, 600);
    assert_eq!(vm.take_balloon_change(), Some(600));
    assert_eq!(vm.take_balloon_change(), None, "reported once");
    d.write(d.device + 4, 4, 600);
    assert_eq!(vm.take_balloon_change(), None, "unchanged");
    d.write(d.device, 4, 5);
    assert_eq!(d.read(d.device, 4), 1000, "num_pages is the host's");
    let info = vm.balloon_info().unwrap();
    assert_eq!((info.num_pages, info.actual), (1000, 600));
    // A VM without a balloon says so.
    let img = disk(8);
    let other = vm_with(disk_spec(img.path(), false));
    assert!(other.balloon_info().is_none());
    assert!(other.set_balloon_target(1).is_err());
}

/// The driver's stats buffer is kept and its values read; at each polling
/// interval it goes back to the driver, which refills it.
#[test]
fn balloon_stats_are_kept_and_polled() {
    let vm = vm_with(balloon_spec(balloon::BalloonConfig::default()));
    let mut d = Driver::probe(&vm, BALLOON_SLOT, 5);
    d.init_features(super::F_VERSION_1 | balloon::F_STATS_VQ);
    let q = balloon::STATS_QUEUE;
    let head = post_stats(&mut d, 0, &[(4, 1234), (5, 5678), (99, 1), (0, 3)]);
    d.notify(q);
    assert_eq!(d.used(q), None, "the device keeps the buffer");
    let info = vm.balloon_info().unwrap();
    let mut want = [None; balloon::STAT_COUNT];
    want[0] = Some(3);
    want[4] = Some(1234);
    want[5] = Some(5678);
    assert_eq!(info.stats, want);
    assert!(info.stats_last_update > 1_600_000_000);
    // Polling off: it stays; on: it comes back within the interval (bounded
    // generously for a loaded host).
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.used(q), None);
    vm.set_balloon_stats_interval(1).unwrap();
    assert_eq!(vm.balloon_info().unwrap().poll_interval, 1);
    assert_eq!(d.wait_used(q, 20_000), Some((u32::from(head), 0)));
    // The refill replaces every value (a stat no longer sent is gone).
    post_stats(&mut d, 1, &[(4, 99)]);
    d.notify(q);
    let info = vm.balloon_info().unwrap();
    assert_eq!(info.stats[4], Some(99));
    assert_eq!(info.stats[5], None);
    vm.set_balloon_stats_interval(0).unwrap();
    assert_eq!(d.status(), 0xf);
}

/// Hostile input: PFNs outside RAM are skipped and counted; buffers of the
/// wrong direction, odd lengths or outside guest memory need a reset.
#[test]
fn balloon_hostile_pfns_and_buffers_are_refused() {
    let vm = vm_with(balloon_spec(balloon::BalloonConfig::default()));
    let mut d = Driver::probe(&vm, BALLOON_SLOT, 5);
    d.init();
    d.put(BALLOON_PAGES, &[0xa5; 4096]);
    let ram_pages = (16u32 << 20) / 4096;
    post_pfns(
        &mut d,
        balloon::INFLATE_QUEUE,
        0,
        &[ram_pages, u32::MAX, (BALLOON_PAGES / 4096) as u32 + 1],
    );
    d.notify(balloon::INFLATE_QUEUE);
    assert_eq!(d.used(balloon::INFLATE_QUEUE).map(|u| u.1), Some(0));
    let s = balloon_stats(&vm);
    assert_eq!((s.refused_pfns, s.inflated_pages), (2, 1));
    assert_eq!(d.get(BALLOON_PAGES, 4096), vec![0xa5; 4096]);
    assert_eq!(d.status(), 0xf);
    let needs_reset = |d: &Driver<'_>| d.status() & status::DEVICE_NEEDS_RESET != 0;
    for (q, bufs) in [
        (balloon::INFLATE_QUEUE, vec![(DATA, 8u32, true)]),
        (balloon::DEFLATE_QUEUE, vec![(DATA, 6, false)]),
        (balloon::INFLATE_QUEUE, vec![(1u64 << 40, 8, false)]),
        (
            balloon::DEFLATE_QUEUE,
            vec![(DATA, 4, false), (DATA, 4, true)],
        ),
        (balloon::INFLATE_QUEUE, vec![(DATA, 1 << 20, false)]),
        (balloon::STATS_QUEUE, vec![(DATA, 15, false)]),
        (balloon::STATS_QUEUE, vec![(DATA, 10, true)]),
    ] {
        d.init();
        d.post(q, &bufs);
        d.notify(q);
        assert!(needs_reset(&d), "{q}: {bufs:?}");
        assert_eq!(d.used(q), None, "{q}: {bufs:?}");
    }
    d.init();
    post_pfns(
        &mut d,
        balloon::INFLATE_QUEUE,
        0,
        &[(BALLOON_PAGES / 4096) as u32],
    );
    d.notify(balloon::INFLATE_QUEUE);
    assert!(d.used(balloon::INFLATE_QUEUE).is_some());
    assert_eq!(d.get(BALLOON_PAGES, 4096), vec![0; 4096]);
}

/// Free page reporting: a fourth queue; reported pages go back to the host.
#[test]
fn balloon_free_page_reporting_gives_pages_back() {
    let config = balloon::BalloonConfig {
        free_page_reporting: true,
        deflate_on_oom: true,
    };
    let vm = vm_with(balloon_spec(config));
    let mut d = Driver::probe(&vm, BALLOON_SLOT, 5);
    assert_eq!(d.rings.len(), 4);
    d.init_features(super::F_VERSION_1 | balloon::F_REPORTING | balloon::F_DEFLATE_ON_OOM);
    assert_eq!(d.status(), 0xf);
    d.put(BALLOON_PAGES, &[1; 3 * 4096]);
    let q = balloon::REPORTING_QUEUE;
    let head = d.post(q, &[(BALLOON_PAGES, 2 * 4096, true)]);
    d.notify(q);
    assert_eq!(d.used(q), Some((u32::from(head), 0)));
    assert_eq!(d.get(BALLOON_PAGES, 2 * 4096), vec![0; 2 * 4096]);
    assert_eq!(d.get(BALLOON_PAGES + 2 * 4096, 4096), vec![1; 4096]);
    assert_eq!(balloon_stats(&vm).reported_pages, 2);
    for bufs in [
        vec![(BALLOON_PAGES, 4096u32, false)],
        vec![(BALLOON_PAGES + 1, 4096, true)],
        vec![((16 << 20) - 4096, 8192, true)],
    ] {
        d.init();
        d.post(q, &bufs);
        d.notify(q);
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0, "{bufs:?}");
    }
}

/// A checkpoint carries the balloon (target, actual, the held stats buffer,
/// the counters); it is part of the shape; hostile state is refused.
#[test]
fn balloon_survives_a_checkpoint_and_is_part_of_the_shape() {
    let vm = vm_with(balloon_spec(balloon::BalloonConfig::default()));
    let mut d = Driver::probe(&vm, BALLOON_SLOT, 5);
    d.init_features(super::F_VERSION_1 | balloon::F_STATS_VQ);
    vm.set_balloon_target(300).unwrap();
    d.write(d.device + 4, 4, 1);
    post_pfns(
        &mut d,
        balloon::INFLATE_QUEUE,
        0,
        &[(BALLOON_PAGES / 4096) as u32],
    );
    d.notify(balloon::INFLATE_QUEUE);
    let stats_head = post_stats(&mut d, 1, &[(4, 42)]);
    d.notify(balloon::STATS_QUEUE);
    vm.pci().set_stopped(STOP_PAUSED, true);
    let shape = vm.shape();
    let name =
        format!("virtio-balloon@{BALLOON_SLOT:02x}:deflate-on-oom=off,free-page-reporting=off");
    assert!(shape.devices.contains(&name), "{:?}", shape.devices);
    let saved = vm.capture_devices().unwrap();
    let Some(crate::devices::virtio::DeviceState::Balloon(s)) = &saved.virtio[0].device else {
        panic!("{:?}", saved.virtio[0].device);
    };
    assert_eq!(
        (s.num_pages, s.actual, s.stats_head),
        (300, 1, Some(stats_head))
    );
    let (stream, _) = crate::persist::save(&vm, Vec::new()).unwrap();

    let err = crate::persist::restore(std::io::Cursor::new(stream.clone()), &restore_opts(vec![]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("virtio-balloon@05"), "{err}");
    let reporting = balloon_spec(balloon::BalloonConfig {
        free_page_reporting: true,
        deflate_on_oom: false,
    });
    let err = crate::persist::restore(
        std::io::Cursor::new(stream.clone()),
        &restore_opts(vec![reporting]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("virtio-balloon@05"), "{err}");

    let other = crate::persist::restore(
        std::io::Cursor::new(stream),
        &restore_opts(vec![balloon_spec(balloon::BalloonConfig::default())]),
    )
    .unwrap();
    let restored = other.capture_devices().unwrap();
    assert_eq!(restored.virtio[0].device, saved.virtio[0].device);
    let info = other.balloon_info().unwrap();
    assert_eq!(
        (info.num_pages, info.actual, info.stats[4]),
        (300, 1, Some(42))
    );
    assert_eq!(info.counters.held_pages, 1);
    // The held buffer goes back to the driver from the destination.
    other.pci().set_stopped(STOP_PAUSED, false);
    other.set_balloon_stats_interval(1).unwrap();
    let mut d2 = Driver::attach(&other, BALLOON_SLOT, 5);
    d2.rings[balloon::STATS_QUEUE].avail_idx = 1;
    assert_eq!(
        d2.wait_used(balloon::STATS_QUEUE, 20_000),
        Some((u32::from(stats_head), 0))
    );

    // Hostile state: refused, naming the device, before anything changes.
    let mut fresh = vm_with(balloon_spec(balloon::BalloonConfig::default()));
    let vcpus = || vm.capture_vcpus().unwrap();
    let vmstate = vm.capture_vm().unwrap();
    let mut bad = saved.clone();
    bad.virtio[0].device = Some(crate::devices::virtio::DeviceState::Balloon(
        balloon::BalloonState {
            num_pages: u32::MAX,
            ..s.clone()
        },
    ));
    let err = fresh
        .restore_state(vcpus(), &vmstate, &bad)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("virtio-balloon@05") && err.contains("target"),
        "{err}"
    );
    let mut bad = saved.clone();
    bad.virtio[0].device = None;
    assert!(fresh.restore_state(vcpus(), &vmstate, &bad).is_err());
    assert_eq!(
        fresh.balloon_info().unwrap().num_pages,
        0,
        "nothing was loaded"
    );
    fresh.restore_state(vcpus(), &vmstate, &saved).unwrap();
}

#[test]
fn only_one_balloon_per_vm() {
    let mut second = balloon_spec(balloon::BalloonConfig::default());
    second.slot = 6;
    second.id = "balloon1".into();
    let err = Vm::create(VmConfig {
        mem_bytes: 16 << 20,
        vcpus: 1,
        backing: Backing::Anonymous,
        serial: SinkSpec::Null,
        cpu: crate::cpu::model::CpuModel::Host,
        virtio: vec![balloon_spec(balloon::BalloonConfig::default()), second],
        ide: Vec::new(),
        fw_cfg: None,
        firmware: None,
        rtc: None,
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("Only one balloon device is supported"),
        "{err}"
    );
}
