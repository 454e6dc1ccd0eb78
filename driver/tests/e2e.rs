//! Integration tests against two real libvirt hosts (tests/twohosts/).
//! Skipped, with the reason printed, where the hosts cannot be brought up.

mod twohosts;

use twohosts::{text, TwoHosts, DEST_A, DEST_B};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn fixture(name: &str, emulator: &str) -> String {
    std::fs::read_to_string(format!("{FIXTURES}/{name}.xml"))
        .expect("fixture")
        .replace("/usr/bin/qemu-system-x86_64", emulator)
}

/// `ferry check` must exit 3 and name `device` and `rule` in a FAIL line of rule `id`.
fn assert_refused(hosts: &TwoHosts, domain: &str, id: &str, device: &str, rule: &str) {
    let out = hosts.ferry("A", &["check", domain, DEST_B, "--json"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(3), "{domain}: {t}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["blocked"], true);
    let fail = v["checks"]
        .as_array()
        .expect("checks array")
        .iter()
        .find(|c| c["status"] == "fail" && c["id"] == id)
        .unwrap_or_else(|| panic!("{domain}: no failed {id} check in {t}"));
    let msg = fail["message"].as_str().expect("message");
    assert!(
        fail["device"].as_str().expect("device").contains(device) && msg.contains(device),
        "{domain}: device {device} not named: {fail}"
    );
    assert!(msg.contains(rule), "{domain}: rule {rule:?} not in {msg}");
    // Human output says the same on a FAIL line.
    let human = hosts.ferry("A", &["check", domain, DEST_B]);
    let h = text(&human);
    assert_eq!(human.status.code(), Some(3));
    assert!(
        h.lines()
            .any(|l| l.starts_with("FAIL") && l.contains(id) && l.contains(device)),
        "{h}"
    );
}

#[test]
fn check_and_migrate_between_two_libvirt_hosts() {
    if let Some(why) = twohosts::unavailable() {
        eprintln!("SKIP check_and_migrate_between_two_libvirt_hosts: {why}");
        return;
    }
    let Some(emu) = twohosts::emulator() else {
        eprintln!("SKIP: neither qemu-system-x86_64 nor ferry-qemu is built");
        return;
    };
    let dir = std::env::temp_dir().join("ferry-driver-twohosts");
    let hosts = TwoHosts::up(&dir, Some(env!("CARGO_BIN_EXE_ferry"))).expect("two hosts");

    // A clean domain passes every check.
    hosts.define("A", "base", &fixture("base", &emu));
    let out = hosts.ferry("A", &["check", "ferry-base", DEST_B]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("PASS  emulator-on-destination"));

    // Devices bound to the source host or its clients (defined, never started).
    for (file, domain, id, device, rule) in [
        (
            "lun",
            "ferry-lun",
            "passthrough-disk",
            "lun sda",
            "attached to the source host only",
        ),
        (
            "scsi-hostdev",
            "ferry-scsi-hostdev",
            "host-device",
            "scsi host device iscsi:iqn.2026-11.lab:lun1/1",
            "attached to the source host only",
        ),
        (
            "usb-hostdev",
            "ferry-usb-hostdev",
            "host-device",
            "usb host device 0x1d6b:0x0002",
            "attached to the source host only",
        ),
        (
            "redirdev-tcp",
            "ferry-redirdev-tcp",
            "client-device",
            "redir0",
            "USB redirection",
        ),
        (
            "cdrom-host",
            "ferry-cdrom-host",
            "client-device",
            "cdrom hdc",
            "host CD-ROM/floppy",
        ),
        (
            "missing-bridge",
            "ferry-missing-bridge",
            "network-on-destination",
            "ferrybr-missing",
            "must exist on the destination",
        ),
    ] {
        hosts.define("A", file, &fixture(file, &emu));
        assert_refused(&hosts, domain, id, device, rule);
    }

    // A disk only the source has: not shared, and missing on the destination.
    std::fs::write(
        hosts.private_var_lib("A").join("images/local.raw"),
        vec![0u8; 1 << 20],
    )
    .unwrap();
    hosts.define("A", "local-disk", &fixture("local-disk", &emu));
    assert_refused(
        &hosts,
        "ferry-local-disk",
        "shared-storage",
        "disk vda",
        "Migration without shared storage is unsafe",
    );
    assert_refused(
        &hosts,
        "ferry-local-disk",
        "disk-on-destination",
        "disk vda",
        "/var/lib/libvirt/images/local.raw does not exist on the destination",
    );

    // A disk in the shared dir: reachable from both; passes with --unsafe.
    let shared_disk = hosts.shared().join("disk.raw");
    std::fs::write(&shared_disk, vec![0u8; 1 << 20]).unwrap();
    let xml =
        fixture("shared-disk", &emu).replace("/shared/disk.raw", shared_disk.to_str().unwrap());
    hosts.define("A", "shared-disk", &xml);
    let out = hosts.ferry("A", &["check", "ferry-shared-disk", DEST_B, "--unsafe"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("PASS  disk-on-destination"),
        "{}",
        text(&out)
    );

    // An emulator that exists on the source only.
    let wrap_dir = hosts.private_var_lib("A").join("ferry-emu");
    std::fs::create_dir_all(&wrap_dir).unwrap();
    let wrap = wrap_dir.join("qemu-wrap");
    std::fs::write(&wrap, format!("#!/bin/sh\nexec {emu} \"$@\"\n")).unwrap();
    std::process::Command::new("chmod")
        .args(["755", wrap.to_str().unwrap()])
        .status()
        .unwrap();
    let xml =
        fixture("base", "/var/lib/libvirt/ferry-emu/qemu-wrap").replace("ferry-base", "ferry-wrap");
    hosts.define("A", "wrap", &xml);
    assert_refused(
        &hosts,
        "ferry-wrap",
        "emulator-on-destination",
        "emulator /var/lib/libvirt/ferry-emu/qemu-wrap",
        "same emulator",
    );

    // Usage errors exit 2, unknown domains 1.
    assert_eq!(hosts.ferry("A", &["check"]).status.code(), Some(2));
    assert_eq!(
        hosts.ferry("A", &["check", "nope", DEST_B]).status.code(),
        Some(1)
    );

    // Running domain: only with real QEMU (ferry-qemu cannot start domains yet).
    if !emu.ends_with("qemu-system-x86_64") {
        eprintln!("SKIP running-domain cases: {emu} cannot start domains yet");
        return;
    }
    let out = hosts.virsh("A", &["start", "ferry-base"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = hosts.ferry("A", &["status", "ferry-base"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("job none"), "{}", text(&out));
    let out = hosts.ferry("A", &["cancel", "ferry-base"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("no job is active"), "{}", text(&out));

    // Non-p2p A -> B with JSON lines, then p2p B -> A.
    let out = hosts.ferry(
        "A",
        &[
            "migrate",
            "ferry-base",
            DEST_B,
            "--json",
            "--max-downtime",
            "300",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_owned();
    let v: serde_json::Value = serde_json::from_str(&last).expect("JSON line");
    assert_eq!(v["event"], "completed", "{last}");
    assert!(v["stats"]["downtime_ms"].as_u64().is_some(), "{last}");
    let out = hosts.virsh("B", &["domstate", "ferry-base"]);
    assert!(text(&out).contains("running"), "{}", text(&out));
    let out = hosts.ferry("B", &["status", "ferry-base", "--completed", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = hosts.ferry("B", &["migrate", "ferry-base", DEST_A, "--p2p"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("migrated to"), "{}", text(&out));

    // The destination hook refuses a disk it cannot see, even when the source
    // side is bypassed (plain virsh, --unsafe): libvirt shows the hook's text.
    hosts.virsh("A", &["destroy", "ferry-base"]);
    let out = hosts.virsh("A", &["start", "ferry-local-disk"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = hosts.sh(
        "A",
        &[
            "virsh",
            "-c",
            "qemu:///system",
            "migrate",
            "--live",
            "--unsafe",
            "ferry-local-disk",
            DEST_B,
        ],
    );
    let t = text(&out);
    assert!(
        !out.status.success(),
        "migration of a disk B lacks succeeded: {t}"
    );
    eprintln!("virsh migrate with the hook on hostb: {t}");
    assert!(
        t.contains("ferry: disk-on-destination") || t.contains("Cannot access storage file"),
        "{t}"
    );
}
