//! Virtio devices under a real guest driver: the dirtier with `blk=K` writes a
//! record to its virtio-blk disk every pass and reads it back. After a live
//! migration (or a checkpoint and restore) the guest keeps going on the other side
//! with the same disk (shared storage), and two oracles judge the result: the
//! memory oracle, and the disk oracle, which checks the disk holds exactly the
//! records of the guest's last K passes. A lost device write (used ring, read
//! buffer, status byte) stops the guest with `blk: ERR ...` instead.
//!
//! With `net=1` on a tap (root), the guest broadcasts a frame every pass and
//! answers pings; after a migration the destination announces the guest's MAC
//! with RARP frames (as QEMU and vMotion do) and the guest answers on the new tap.
//!
//! With `rng=1` the guest takes 64 checked random bytes from its virtio-rng
//! every pass, on both sides of a live migration; with `balloon=1` it follows
//! the balloon's target set on the control socket, with pages past its working
//! set that the host discards, answers stats requests, and carries the balloon
//! across a live migration.
//!
//! With `cdrom=LBA` the guest reads a file of a config drive (an ISO on an
//! IDE CD-ROM, as Nova attaches it) by PIO at boot and again every pass, on
//! both sides of a live migration.

use std::path::Path;
use std::time::Duration;

use ferry_testguest::link::{Link, Tap};
use ferry_testguest::{OracleReport, BALLOON_STALE_MAGIC, PAGE_SIZE};
use ferry_tests::{dirtier_source, require_kvm, Scratch, VmProcess};

const K: u64 = 8;

fn disk(s: &Scratch, name: &str, bytes: u64) -> String {
    let path = s.path(name);
    let f = std::fs::File::create(&path).expect("create disk image");
    f.set_len(bytes).expect("size disk image");
    path.display().to_string()
}

fn disk_source(s: &Scratch, disk: &str) -> VmProcess {
    disk_source_with(s, &format!("{disk},serial=ferry-disk"))
}

/// The dirtier with `blk=K` on the disk `--disk ARG` (a 1 MiB one).
fn disk_source_with(s: &Scratch, arg: &str) -> VmProcess {
    let src = dirtier_source(s, "128M", &format!("ws=4M blk={K}"), &["--disk", arg]);
    let serial = String::from_utf8_lossy(&src.serial_output()).into_owned();
    assert!(serial.contains("blk: capacity=2048"), "{serial}");
    src
}

/// Pauses `vm`, runs the memory oracle, then the disk oracle with the header's
/// pass count; returns the passes.
fn check_both(s: &Scratch, vm: &VmProcess, tag: &str, disk: &str) -> u64 {
    let report = vm.oracle(s, tag);
    let serial = String::from_utf8_lossy(&vm.serial_output()).into_owned();
    assert!(
        !serial.contains("ERR"),
        "the guest's driver failed: {serial}"
    );
    let bytes = disk_bytes(s, disk);
    ferry_testguest::disk::check_disk(&bytes, K, report.passes)
        .unwrap_or_else(|e| panic!("disk oracle failed after {} passes: {e}", report.passes));
    report.passes
}

/// What the guest sees on `disk`: the file, or for a qcow2 image what
/// `qemu-img` reads through its chain (`-U`: the VM holds the image locks).
fn disk_bytes(s: &Scratch, disk: &str) -> Vec<u8> {
    if !disk.ends_with(".qcow2") {
        return std::fs::read(Path::new(disk)).expect("read disk image");
    }
    let out = s.path("guest-view.raw");
    let out = out.to_str().expect("UTF-8 scratch path");
    qemu_img(&["convert", "-U", "-f", "qcow2", "-O", "raw", disk, out]);
    std::fs::read(out).expect("read the converted image")
}

/// Runs qemu-img (qemu-utils), which must succeed.
fn qemu_img(args: &[&str]) {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img: install qemu-utils (scripts/deps --tests)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Migrates `src` live, over `streams` page streams on a unix socket, to a
/// new `ferry-vm incoming` given `devices` (its disks, drives, ...): the
/// migration must complete and the source exit 0. Returns the destination,
/// its guest beating again.
fn live_migrate(s: &Scratch, src: &mut VmProcess, devices: &[&str], streams: u32) -> VmProcess {
    let uri = format!("unix:{}", s.path("mig.sock").display());
    let mut args = vec!["incoming", uri.as_str(), "-m", src.mem.as_str()];
    args.extend_from_slice(devices);
    let mut dst = VmProcess::spawn(s, "dst", &args);
    if streams > 1 {
        src.ok(&format!("migrate-set multifd-channels={streams}"));
    }
    dst.wait_listening();
    let reply = src.ok(&format!("migrate {uri}"));
    assert_eq!(reply["migration"]["status"], "completed", "{reply}");
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
    dst.wait_for_control();
    dst.wait_heartbeats(50, Duration::from_secs(10));
    dst
}

fn wait_passes(vm: &VmProcess, s: &Scratch, at_least: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let passes = vm.oracle(s, "progress").passes;
        vm.ok("resume");
        if passes >= at_least {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest made only {passes} passes"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn disk_records_survive_a_live_migration_over_two_streams() {
    require_kvm();
    let s = Scratch::new();
    let img = disk(&s, "shared.img", 1 << 20);
    let mut src = disk_source(&s, &img);
    wait_passes(&src, &s, 2 * K);
    let dst = live_migrate(&s, &mut src, &["--disk", &img], 2);
    let first = check_both(&s, &dst, "dst1", &img);
    dst.ok("resume");
    // The destination's driver goes on using the device: more records, in order.
    wait_passes(&dst, &s, first + 2 * K);
    check_both(&s, &dst, "dst2", &img);
    dst.quit();
}

/// The guest's disk is a qcow2 overlay on a raw base image, as Nova makes
/// them: its records go through the chain before and after a live migration,
/// the image `qemu-img check` finds clean afterwards, and the base (which
/// holds data past the records) is never written.
#[test]
fn disk_records_on_a_qcow2_chain_survive_a_live_migration() {
    require_kvm();
    let s = Scratch::new();
    let base = s.path("base.raw");
    let mut base_data = vec![0u8; 1 << 20];
    base_data[64 * 512..].fill(0xb5);
    std::fs::write(&base, &base_data).expect("write the base image");
    let top = s.path("disk.qcow2").display().to_string();
    let b = base.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", &b, "-F", "raw", &top]);
    let disk_arg = format!("{top},format=qcow2,serial=ferry-disk");
    let mut src = disk_source_with(&s, &disk_arg);
    wait_passes(&src, &s, 2 * K);
    check_both(&s, &src, "src", &top);
    src.ok("resume");
    let dst_disk = format!("{top},format=qcow2");
    let dst = live_migrate(&s, &mut src, &["--disk", &dst_disk], 1);
    let first = check_both(&s, &dst, "dst1", &top);
    dst.ok("resume");
    wait_passes(&dst, &s, first + 2 * K);
    check_both(&s, &dst, "dst2", &top);
    let view = disk_bytes(&s, &top);
    assert!(
        view[64 * 512..] == base_data[64 * 512..],
        "the base shows through"
    );
    dst.quit();
    qemu_img(&["check", "-q", &top]);
    assert!(
        std::fs::read(&base).expect("read the base") == base_data,
        "the base changed"
    );
}

#[test]
fn a_destination_without_the_disk_is_refused_and_the_source_runs_on() {
    require_kvm();
    let s = Scratch::new();
    let img = disk(&s, "shared.img", 1 << 20);
    let src = disk_source(&s, &img);
    for (tag, extra) in [
        ("nodisk", vec![]),
        (
            "otherdisk",
            vec!["--disk".to_string(), disk(&s, "small.img", 512 << 10)],
        ),
    ] {
        let uri = format!("unix:{}", s.path(&format!("{tag}.sock")).display());
        let mut args = vec![
            "incoming".to_string(),
            uri.clone(),
            "-m".into(),
            src.mem.clone(),
        ];
        args.extend(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut dst = VmProcess::spawn(&s, tag, &args);
        dst.wait_listening();
        let reply = src.command(&format!("migrate {uri}"));
        assert_eq!(reply["ok"], false, "{reply}");
        let err = reply["error"].as_str().unwrap_or_default().to_string();
        // The source learns its own devices, not the destination's.
        assert!(err.contains("virtio-blk@04:2048s-rw"), "{err}");
        assert!(!err.contains("this side was given"), "{err}");
        assert!(
            dst.stderr_text().contains("same disks"),
            "{}",
            dst.stderr_text()
        );
        // The destination waits on for a source it was configured for.
        assert_eq!(dst.child.try_wait().ok().flatten(), None);
        let _ = dst.child.kill();
        let _ = dst.child.wait();
    }
    src.wait_heartbeats(50, Duration::from_secs(10));
    let passes = check_both(&s, &src, "src", &img);
    assert!(passes > 0);
    src.quit();
}

#[test]
fn a_checkpoint_restores_onto_the_same_disk() {
    require_kvm();
    let s = Scratch::new();
    let img = disk(&s, "disk.img", 1 << 20);
    let src = disk_source(&s, &img);
    wait_passes(&src, &s, K);
    let ckpt = s.path("vm.ckpt");
    src.ok("pause");
    src.ok(&format!("checkpoint {}", ckpt.display()));
    let before = check_both(&s, &src, "before", &img);
    src.quit();

    let ckpt = ckpt.display().to_string();
    let mut wrong = VmProcess::spawn(&s, "wrong", &["restore", &ckpt]);
    assert_eq!(wrong.wait_exit(Duration::from_secs(30)), Some(1));
    assert!(
        wrong.stderr_text().contains("virtio-blk@04"),
        "{}",
        wrong.stderr_text()
    );

    let restored = VmProcess::start(&s, "restored", &["restore", &ckpt, "--disk", &img]);
    restored.wait_heartbeats(50, Duration::from_secs(20));
    wait_passes(&restored, &s, before + K);
    check_both(&s, &restored, "after", &img);
    restored.quit();
}

#[test]
fn a_nic_answers_before_and_after_a_live_migration_and_is_announced() {
    require_kvm();
    let s = Scratch::new();
    let img = disk(&s, "shared.img", 1 << 20);
    let (tap_a, tap_b) = (
        Tap::create(Tap::unique_name("ferryva", 0)),
        Tap::create(Tap::unique_name("ferryvb", 1)),
    );
    let (mut link_a, mut link_b) = (Link::new(&tap_a), Link::new(&tap_b));
    let mut src = dirtier_source(
        &s,
        "128M",
        &format!("ws=4M blk={K} net=1"),
        &["--disk", &img, "--net", &format!("tap={}", tap_a.name)],
    );
    let serial = String::from_utf8_lossy(&src.serial_output()).into_owned();
    assert!(serial.contains("net: mac=52:54:00:12:34:56"), "{serial}");
    link_a.wait_pass(2 * K, &src.serial);
    link_a.ping(&[0x11, 0x12, 0x13]);

    let uri = format!("unix:{}", s.path("mig.sock").display());
    let mut dst = VmProcess::spawn(
        &s,
        "dst",
        &[
            "incoming",
            &uri,
            "-m",
            &src.mem,
            "--disk",
            &img,
            "--net",
            &format!("tap={}", tap_b.name),
        ],
    );
    dst.wait_listening();
    let reply = src.ok(&format!("migrate {uri}"));
    assert_eq!(reply["migration"]["status"], "completed", "{reply}");
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
    link_a.drain();
    let last_on_a = *link_a.passes.last().expect("passes on tap A");
    dst.wait_for_control();
    link_b.wait_pass(last_on_a + 2 * K, &dst.serial);
    link_b.ping(&[0x21, 0x22]);
    // QEMU's announce: 5 RARPs over about 0.8 s, on the destination's tap only.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while link_b.rarps.len() < 5 && std::time::Instant::now() < deadline {
        link_b.next_frame();
    }
    assert_eq!(
        link_b.rarps.len(),
        5,
        "RARP announcements on the destination"
    );
    assert!(link_a.rarps.is_empty(), "the source announced nothing");
    // No pass frame went missing across the switch-over: the guest's passes on
    // tap B continue where tap A stopped.
    let first_on_b = *link_b.passes.first().expect("passes on tap B");
    assert!(
        first_on_b <= last_on_a + 1,
        "A ended at {last_on_a}, B began at {first_on_b}"
    );
    check_both(&s, &dst, "dst", &img);
    dst.quit();
}

/// The guest's serial output must show no driver failure.
fn assert_no_driver_error(vm: &VmProcess) {
    let serial = String::from_utf8_lossy(&vm.serial_output()).into_owned();
    assert!(
        !serial.contains("ERR"),
        "the guest's driver failed: {serial}"
    );
}

/// The counters of `vm`'s device of `kind`, from the control socket's `devices`.
fn device(vm: &VmProcess, kind: &str) -> serde_json::Value {
    let reply = vm.ok("devices");
    reply["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["kind"] == kind))
        .cloned()
        .unwrap_or_else(|| panic!("no {kind} in {reply}"))
}

/// Waits until `what` holds of `vm`'s `line` reply (polled, generous deadline
/// for a loaded 2-core machine); returns that reply.
fn wait_reply(
    vm: &VmProcess,
    line: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let reply = vm.ok(line);
        if done(&reply) {
            return reply;
        }
        assert_no_driver_error(vm);
        assert!(
            std::time::Instant::now() < deadline,
            "never {what}: {reply}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rng_bytes(vm: &VmProcess) -> u64 {
    device(vm, "virtio-rng")["bytes"]
        .as_u64()
        .expect("bytes is a number")
}

#[test]
fn an_entropy_device_serves_bytes_before_and_after_a_live_migration() {
    require_kvm();
    let s = Scratch::new();
    let mut src = dirtier_source(&s, "128M", "ws=4M rng=1", &["--rng", "builtin"]);
    src.wait_serial("rng: ok", Duration::from_secs(10));
    wait_passes(&src, &s, 2 * K);
    // One 64-byte request a pass; the device counts what it served.
    assert!(
        rng_bytes(&src) >= 2 * K * 64,
        "{}",
        device(&src, "virtio-rng")
    );
    assert_no_driver_error(&src);

    let dst = live_migrate(&s, &mut src, &["--rng", "builtin"], 2);
    let first = dst.oracle(&s, "dst1").passes;
    dst.ok("resume");
    // The driver goes on on the destination, whose device serves it afresh
    // (its counters start on this host).
    wait_passes(&dst, &s, first + 2 * K);
    assert!(
        rng_bytes(&dst) >= 2 * K * 64,
        "{}",
        device(&dst, "virtio-rng")
    );
    dst.oracle(&s, "dst2");
    assert_no_driver_error(&dst);
    dst.quit();
}

/// GPA of usable page `index` (the oracle's ranges, in order).
fn usable_gpa(report: &OracleReport, mut index: u64) -> u64 {
    for r in &report.ranges {
        let pages = r.len / PAGE_SIZE;
        if index < pages {
            return r.start + index * PAGE_SIZE;
        }
        index -= pages;
    }
    panic!("usable page {index} past the ranges {:?}", report.ranges)
}

fn usable_pages(report: &OracleReport) -> u64 {
    report.ranges.iter().map(|r| r.len / PAGE_SIZE).sum()
}

/// Sets the balloon's target and waits for the guest's driver to reach it.
fn balloon_to(vm: &VmProcess, pages: u64) -> serde_json::Value {
    let reply = vm.ok(&format!("balloon {pages}"));
    assert_eq!(reply["target_pages"], pages, "{reply}");
    wait_reply(vm, "balloon", &format!("at {pages} pages"), |r| {
        r["actual_pages"] == pages
    })
}

fn peek(vm: &VmProcess, gpa: u64) -> u64 {
    vm.ok(&format!("peek {gpa:x}"))["value"]
        .as_u64()
        .expect("value is a number")
}

#[test]
fn the_balloon_follows_its_target_answers_stats_and_migrates() {
    require_kvm();
    const TARGET: u64 = 1000;
    const KEPT: u64 = 256;
    let s = Scratch::new();
    let mut src = dirtier_source(&s, "128M", "ws=4M balloon=1", &["--balloon"]);
    let report = src.oracle(&s, "boot");
    src.ok("resume");
    let total = usable_pages(&report);
    let pool = total - report.working_set_pages;
    src.wait_serial(
        &format!("balloon: pool={pool} stats=1"),
        Duration::from_secs(10),
    );
    // Balloon page k is usable page total - 1 - k: the top of RAM first.
    let balloon_page = |k: u64| usable_gpa(&report, total - 1 - k);

    let reply = balloon_to(&src, TARGET);
    assert_eq!(reply["held_pages"], TARGET, "{reply}");
    let dev = device(&src, "virtio-balloon");
    assert_eq!(dev["inflated_pages"], TARGET, "{dev}");
    assert_eq!(dev["discard_failures"], 0, "{dev}");
    assert_eq!(dev["refused_pfns"], 0, "{dev}");
    // The guest left stale bytes in every page it gave; the host dropped them.
    let stale = u64::from_le_bytes(BALLOON_STALE_MAGIC);
    for k in [0, TARGET / 2, TARGET - 1] {
        let v = peek(&src, balloon_page(k));
        assert_eq!(v, 0, "balloon page {k} kept its bytes (stale {stale:#x})");
    }

    // Stats requests every second: the next answer counts the balloon.
    src.ok("balloon stats 1");
    let free = |pages: u64| json_u64((pool - pages) * PAGE_SIZE);
    let reply = wait_reply(&src, "balloon", "stats after the inflate", |r| {
        r["stats"]["stat-free-memory"] == free(TARGET)
    });
    assert_eq!(reply["stats"]["stat-total-memory"], total * PAGE_SIZE);
    assert_eq!(reply["stats"]["stat-available-memory"], free(TARGET));

    let reply = balloon_to(&src, 0);
    assert_eq!(reply["held_pages"], 0, "{reply}");
    let dev = device(&src, "virtio-balloon");
    assert_eq!(dev["deflated_pages"], TARGET, "{dev}");
    wait_reply(&src, "balloon", "stats after the deflate", |r| {
        r["stats"]["stat-free-memory"] == free(0)
    });
    // The guest never touches a page it took back.
    assert_eq!(peek(&src, balloon_page(0)), 0);

    // A balloon holding pages migrates with the guest.
    balloon_to(&src, KEPT);
    wait_reply(&src, "balloon", "stats before the migration", |r| {
        r["stats"]["stat-free-memory"] == free(KEPT)
    });
    src.oracle(&s, "src");
    src.ok("resume");
    let dst = live_migrate(&s, &mut src, &["--balloon"], 1);
    let first = dst.oracle(&s, "dst1").passes;
    dst.ok("resume");
    let reply = dst.ok("balloon");
    assert_eq!(
        (&reply["target_pages"], &reply["actual_pages"]),
        (&json_u64(KEPT), &json_u64(KEPT)),
        "{reply}"
    );
    assert_eq!(reply["stats"]["stat-free-memory"], free(KEPT), "{reply}");
    for k in [0, KEPT - 1] {
        assert_eq!(peek(&dst, balloon_page(k)), 0, "balloon page {k} on dst");
    }
    // The guest's driver goes on with the destination's device, whose
    // counters came with the balloon's state.
    let dev = device(&dst, "virtio-balloon");
    assert_eq!(dev["inflated_pages"], TARGET + KEPT, "{dev}");
    assert_eq!(dev["held_pages"], KEPT, "{dev}");
    balloon_to(&dst, 0);
    let dev = device(&dst, "virtio-balloon");
    assert_eq!(dev["deflated_pages"], TARGET + KEPT, "{dev}");
    assert_eq!(dev["held_pages"], 0, "{dev}");
    wait_passes(&dst, &s, first + 2 * K);
    dst.oracle(&s, "dst2");
    assert_no_driver_error(&dst);
    dst.quit();
}

fn json_u64(v: u64) -> serde_json::Value {
    serde_json::Value::from(v)
}

/// `balloon=1` with `fill=1` is refused: the fill owns every page the balloon
/// could give, and the oracle checks them.
#[test]
fn a_balloon_with_a_fill_is_refused_by_the_guest() {
    require_kvm();
    let s = Scratch::new();
    let dirtier = s.dirtier.display().to_string();
    let vm = VmProcess::start(
        &s,
        "src",
        &[
            "run",
            "--kernel",
            &dirtier,
            "-m",
            "64M",
            "--append",
            "ws=1M fill=1 balloon=1",
            "--balloon",
        ],
    );
    vm.wait_serial("balloon: ERR fill=1", Duration::from_secs(30));
    let serial = String::from_utf8_lossy(&vm.serial_output()).into_owned();
    assert!(!serial.contains("dirtier: ready"), "{serial}");
    vm.quit();
}

/// Nova's config drive holding `ferry.txt` with `content`; returns the
/// ISO's path and the file's first sector.
fn config_drive(s: &Scratch, content: &[u8]) -> (String, u32) {
    let iso = s.path("config.iso");
    let lba = ferry_testguest::iso::config_drive(&iso, &[("ferry.txt", content)])
        .unwrap_or_else(|e| panic!("the config drive: {e}"))[0];
    (iso.display().to_string(), lba)
}

/// Nova's config drive: an ISO on an IDE CD-ROM. The dirtier with
/// `cdrom=LBA` finds the ATAPI drive by its signature, reads the file's
/// sector by PIO and prints its first bytes, then reads it again every pass
/// and compares (`cdrom: ERR readback` otherwise); after a live migration
/// it goes on reading on the destination, whose drive opened the same ISO.
#[test]
fn a_config_drive_on_an_ide_cdrom_reads_before_and_after_a_live_migration() {
    require_kvm();
    let s = Scratch::new();
    let content = b"ferry config drive: instance-0001\n";
    let (iso, lba) = config_drive(&s, content);
    let hex: String = content[..16].iter().map(|b| format!("{b:02x}")).collect();
    let mut src = dirtier_source(
        &s,
        "128M",
        &format!("ws=4M cdrom={lba}"),
        &["--cdrom", &iso],
    );
    let serial = String::from_utf8_lossy(&src.serial_output()).into_owned();
    assert!(
        serial.contains(&format!("cdrom: lba={lba} data={hex}\n")),
        "{serial}"
    );
    wait_passes(&src, &s, 2 * K);
    assert_no_driver_error(&src);

    let dst = live_migrate(&s, &mut src, &["--cdrom", &iso], 1);
    let first = dst.oracle(&s, "dst1").passes;
    dst.ok("resume");
    // Every pass on the destination reads the sector again from its drive.
    wait_passes(&dst, &s, first + 2 * K);
    dst.oracle(&s, "dst2");
    assert_no_driver_error(&dst);
    dst.quit();
}
