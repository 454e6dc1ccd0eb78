//! A ferry-qemu domain with a raw disk on storage both hosts see, between two
//! real libvirt hosts (tests/twohosts/): it starts (libvirt 9.0 writes
//! `-blockdev` file + raw and `-device virtio-blk-pci`), `virsh domblklist`
//! lists the disk, and `virsh migrate --live --unsafe` (the shared dir is a
//! local filesystem, which libvirt calls unsafe) moves it to the other host
//! and back; the memory oracle passes after each move. `--copy-storage-all`
//! is refused with ferry-qemu's reason (its `nbd-server-start` says it has no
//! NBD server or block mirror), the guest running on.
//!
//! A Nova-shaped domain (issue 19 item 6) has what a Nova compute node gives
//! every instance, as libvirt writes it: a qcow2 root disk over a raw `_base`
//! image, the config drive (an ISO on an IDE CD-ROM), a balloon with stats,
//! a virtio-rng on `/dev/urandom`, a NIC on a bridge, a pty serial with a log
//! file, SMBIOS from `<sysinfo>`, Nova's clock and `<vmcoreinfo/>` (fw_cfg's
//! `etc/vmcoreinfo`). Its guest drives them
//! all; `virsh dommemstat`, `setmem` and `domblkinfo` answer from the
//! devices, and it moves to the other host and back with every oracle
//! passing: memory, the disk's records read through the qcow2 chain, the
//! config drive's sector, the entropy, the balloon's pages.
//!
//! A Nova instance as Nova 25 writes it boots from its disk through the
//! firmware (issue 17 item 6): no `<kernel>`, `<boot dev='hd'/>`,
//! `<smbios mode='sysinfo'/>`, `<acpi/>`, Nova's timers. SeaBIOS boots the
//! dirtier's own boot loader from the qcow2 root disk; `virsh reset`,
//! `virsh reboot` and `virsh shutdown` go through the firmware and the ACPI
//! power button; it migrates to the other host and back (plain, then
//! `--p2p`) with the memory oracle passing.
//!
//! Skipped, with the reason printed, where the hosts cannot be brought up;
//! in CI (`CI` set) that is a failure.

mod twohosts;

/// The tests of this binary (they share one pair of hosts).
const TESTS: usize = 3;

use twohosts::lab::CMDLINE;
use twohosts::{text, DEST_A, DEST_B};

#[test]
fn raw_disk_on_shared_storage_runs_is_listed_and_migrates() {
    let Some(lab) = twohosts::lab::lab(TESTS) else {
        return;
    };
    let dom = "ferry-disk";
    let mib = 64;
    let disk = lab.shared().join("ferry-disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(8 << 20))
        .expect("create the disk image");
    let disk = disk.display().to_string();
    let xml = lab.dirtier(dom, mib, CMDLINE).replacen(
        "<devices>",
        &format!(
            "<devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>"
        ),
        1,
    );
    lab.start("A", dom, &xml);
    let listed = |h: &str| {
        let list = lab.virsh_ok(h, &["domblklist", dom]);
        assert!(
            list.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["vda", disk.as_str()]),
            "domblklist on {h}: {list}"
        );
    };
    listed("A");
    let log = std::fs::read_to_string(lab.hosts.log_dir("A").join(format!("qemu/{dom}.log")))
        .unwrap_or_default();
    let disk_args: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("-blockdev") || l.contains("virtio-blk"))
        .collect();
    eprintln!("libvirt's disk arguments:\n{}", disk_args.join("\n"));
    assert!(
        disk_args.iter().any(|l| l.contains(r#""driver":"raw""#))
            && disk_args
                .iter()
                .any(|l| l.contains("virtio-blk-pci") && l.contains("drive=libvirt-1-format")),
        "{log}"
    );
    let info = lab.virsh_ok("A", &["domblkinfo", dom, "vda"]);
    eprintln!("virsh domblkinfo: {info}");
    assert!(
        info.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Capacity:", "8388608"]),
        "{info}"
    );
    let stats = lab.virsh_ok("A", &["domstats", "--block", dom]);
    eprintln!("virsh domstats --block: {stats}");
    assert!(stats.contains("block.0.capacity=8388608"), "{stats}");

    // Storage copy needs NBD and block jobs, which ferry-qemu lacks.
    let out = lab.hosts.sh(
        "A",
        &[
            "timeout",
            "120",
            "virsh",
            "-c",
            "qemu:///system",
            "migrate",
            "--live",
            "--copy-storage-all",
            "--unsafe",
            dom,
            DEST_B,
        ],
    );
    let t = text(&out);
    eprintln!("virsh migrate --copy-storage-all: {t}");
    assert!(
        !out.status.success() && t.contains("cannot copy disks during a migration"),
        "{t}"
    );
    lab.assert_unharmed("A", dom, mib);

    let wall = lab.migrate("A", dom, DEST_B, &["--unsafe"]);
    lab.assert_moved(dom, "A", "B", mib);
    listed("B");
    let wall_back = lab.migrate("B", dom, DEST_A, &["--unsafe", "--p2p"]);
    lab.assert_moved(dom, "B", "A", mib);
    eprintln!("virsh migrate A->B {wall:?}, B->A (p2p) {wall_back:?}");
    lab.forget(dom);
}

/// The dirtier's disk records: `blk=K` writes sector `p mod K` in pass `p`.
const K: u64 = 8;

fn qemu_img(args: &[&str]) -> String {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img: install qemu-utils (scripts/deps --tests)");
    assert!(out.status.success(), "qemu-img {args:?}: {}", text(&out));
    text(&out)
}

/// `virsh dommemstat` as a map: "actual" -> KiB.
fn memstat(
    lab: &twohosts::lab::Lab,
    h: &str,
    dom: &str,
) -> std::collections::BTreeMap<String, u64> {
    lab.virsh_ok(h, &["dommemstat", dom])
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Waits until `pred` holds for `dom`'s `virsh dommemstat` on `h`.
fn wait_memstat(
    lab: &twohosts::lab::Lab,
    h: &str,
    dom: &str,
    what: &str,
    pred: impl Fn(&std::collections::BTreeMap<String, u64>) -> bool,
) -> std::collections::BTreeMap<String, u64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let stats = memstat(lab, h, dom);
        if pred(&stats) {
            return stats;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{dom} on {h}: {what} never came: {stats:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// What Nova 25 writes into every x86 domain besides its devices: the
/// instance's UUID, `<sysinfo>` for SMBIOS, the clock and timers, and
/// `<vmcoreinfo/>` (put in place of `<features>`, which it opens).
fn nova_platform(uuid: &str) -> String {
    format!(
        "<uuid>{uuid}</uuid>
  <sysinfo type='smbios'>
    <system>
      <entry name='manufacturer'>OpenStack Foundation</entry>
      <entry name='product'>OpenStack Nova</entry>
      <entry name='version'>25.1.0</entry>
      <entry name='serial'>{uuid}</entry>
      <entry name='uuid'>{uuid}</entry>
      <entry name='family'>Virtual Machine</entry>
    </system>
  </sysinfo>
  <clock offset='utc'>
    <timer name='pit' tickpolicy='delay'/>
    <timer name='rtc' tickpolicy='catchup'/>
    <timer name='hpet' present='no'/>
  </clock>
  <features><vmcoreinfo state='on'/>"
    )
}

/// The devices Nova gives an instance (put in place of `<devices>`, which
/// they open): the qcow2 root disk `top`, the config drive `iso` on IDE, a
/// NIC on `bridge` if given, the balloon with stats and a virtio-rng.
fn nova_devices(top: &str, iso: &std::path::Path, bridge: Option<&str>) -> String {
    let nic = bridge.map_or(String::new(), |b| {
        format!(
            "
    <interface type='bridge'>
      <mac address='fa:16:3e:aa:d9:23'/>
      <source bridge='{b}'/>
      <model type='virtio'/>
    </interface>"
        )
    });
    format!(
        "<devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{top}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='{}'/>
      <target dev='hdd' bus='ide'/>
      <readonly/>
    </disk>{nic}
    <memballoon model='virtio'>
      <stats period='10'/>
    </memballoon>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
    </rng>",
        iso.display()
    )
}

#[test]
fn a_nova_shaped_domain_runs_answers_and_migrates_both_ways() {
    let Some(lab) = twohosts::lab::lab(TESTS) else {
        return;
    };
    let dom = "ferry-nova";
    let mib = 128;
    let shared = lab.shared();
    // Nova's instance dir: a qcow2 over the image cache's raw base, whose
    // data past the disk records shows through.
    let base = shared.join("_base-abc.raw");
    let mut base_data = vec![0u8; 16 << 20];
    base_data[(K as usize) * 512..].fill(0xb5);
    std::fs::write(&base, &base_data).expect("write the base image");
    let top = shared.join("ferry-nova-disk.qcow2");
    let (b, t) = (base.display().to_string(), top.display().to_string());
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", &b, "-F", "raw", &t]);
    let iso = shared.join("ferry-nova-disk.config");
    let meta = br#"{"uuid": "c7a5fdbd-cdaf-9455-926a-d65c16db1809", "name": "ferry"}"#;
    let lba = ferry_testguest::iso::config_drive(&iso, &[("ferry.txt", meta)])
        .unwrap_or_else(|e| panic!("the config drive: {e}"))[0];
    let hex: String = meta[..16].iter().map(|b| format!("{b:02x}")).collect();
    let (_br_a, _br_b) = (
        lab.hosts.bridge("A", "br-ferry"),
        lab.hosts.bridge("B", "br-ferry"),
    );
    let uuid = "c7a5fdbd-cdaf-9455-926a-d65c16db1809";
    let cmdline = format!("ws=4M blk={K} cdrom={lba} rng=1 balloon=1 net=1");
    let xml = lab
        .dirtier(dom, mib, &cmdline)
        .replacen("</os>", "  <smbios mode='sysinfo'/>\n  </os>", 1)
        .replacen("<features>", &nova_platform(uuid), 1)
        .replacen("<devices>", &nova_devices(&t, &iso, Some("br-ferry")), 1);
    lab.start("A", dom, &xml);
    let serial = std::fs::read_to_string(lab.serial_log("A", dom)).unwrap_or_default();
    for want in [
        format!("cdrom: lba={lba} data={hex}"),
        "rng: ok".into(),
        "balloon: pool=".into(),
        format!("blk: capacity={}", 16 << 11),
        "net: mac=fa:16:3e:aa:d9:23".into(),
    ] {
        assert!(
            serial.contains(&want),
            "no {want:?} in the serial log:\n{serial}"
        );
    }

    // What Nova and an operator ask of it.
    let info = |dev: &str| lab.virsh_ok("A", &["domblkinfo", dom, dev]);
    let capacity = |t: String| -> u64 {
        t.lines()
            .find_map(|l| l.strip_prefix("Capacity:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no capacity in {t}"))
    };
    assert_eq!(capacity(info("vda")), 16 << 20, "the qcow2's virtual size");
    let iso_len = std::fs::metadata(&iso).expect("stat the ISO").len();
    assert_eq!(capacity(info("hdd")), iso_len);
    lab.virsh_ok("A", &["dommemstat", dom, "--period", "1", "--live"]);
    wait_memstat(&lab, "A", dom, "the guest's statistics", |m| {
        m.contains_key("unused") && m.contains_key("usable")
    });
    let full = mib << 10;
    let target = full - (32 << 10);
    lab.virsh_ok("A", &["setmem", dom, &target.to_string(), "--live"]);
    wait_memstat(&lab, "A", dom, "the balloon's inflation", |m| {
        m.get("actual") == Some(&target)
    });

    // Both oracles at one moment: guest memory, and the disk as the qcow2
    // chain gives it.
    let view = lab.hosts.dumps().join("ferry-nova-disk.raw");
    let check = |h: &str| {
        let v = view.display().to_string();
        let report = lab.oracle_then(h, dom, mib, || {
            qemu_img(&["convert", "-U", "-f", "qcow2", "-O", "raw", &t, &v]);
        });
        let disk = std::fs::read(&view).expect("read the disk's view");
        ferry_testguest::disk::check_disk(&disk, K, report.passes)
            .unwrap_or_else(|e| panic!("disk oracle on {h} after {} passes: {e}", report.passes));
        assert!(
            disk[(K as usize) * 512..] == base_data[(K as usize) * 512..],
            "the base shows through"
        );
        let log = std::fs::read_to_string(lab.serial_log(h, dom)).unwrap_or_default();
        assert!(!log.contains("ERR"), "a driver failed on {h}:\n{log}");
        report
    };
    check("A");

    let wall = lab.migrate("A", dom, DEST_B, &["--unsafe"]);
    lab.assert_moved(dom, "A", "B", mib);
    check("B");
    assert_eq!(
        memstat(&lab, "B", dom).get("actual"),
        Some(&target),
        "the balloon moved"
    );
    lab.virsh_ok("B", &["setmem", dom, &full.to_string(), "--live"]);
    wait_memstat(&lab, "B", dom, "the balloon's deflation", |m| {
        m.get("actual") == Some(&full)
    });
    let wall_back = lab.migrate("B", dom, DEST_A, &["--unsafe", "--p2p"]);
    lab.assert_moved(dom, "B", "A", mib);
    check("A");
    eprintln!("Nova-shaped domain: virsh migrate A->B {wall:?}, B->A (p2p) {wall_back:?}");
    lab.forget(dom);
    qemu_img(&["check", "-q", &t]);
    assert!(
        std::fs::read(&base).expect("read the base") == base_data,
        "the base changed"
    );
}

/// The domain Nova writes for an instance booted from its image, on
/// ferry-qemu: SeaBIOS, ACPI, SMBIOS from `<sysinfo>`, the config drive.
#[test]
fn a_nova_instance_boots_through_seabios_resets_moves_and_shuts_down() {
    let Some(lab) = twohosts::lab::lab(TESTS) else {
        return;
    };
    let dom = "ferry-nova-fw";
    let mib = 96;
    let shared = lab.shared();
    // The image cache's _base is the dirtier's boot disk (its loader reads
    // the command line from the disk); the instance's root disk is a qcow2
    // over it, as Nova makes it.
    let base = shared.join("_base-bootdisk.raw");
    ferry_testguest::bootdisk::boot_disk(&base, "ws=4M acpi=1 rng=1 balloon=1", Some(16 << 20))
        .unwrap_or_else(|e| panic!("the boot disk: {e}"));
    let top = shared.join("ferry-nova-fw-disk.qcow2");
    let (b, t) = (base.display().to_string(), top.display().to_string());
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", &b, "-F", "raw", &t]);
    let iso = shared.join("ferry-nova-fw-disk.config");
    ferry_testguest::iso::config_drive(&iso, &[("meta.txt", b"{}")])
        .unwrap_or_else(|e| panic!("the config drive: {e}"));
    let uuid = "0b7c2d1e-5f3a-4c8e-9d21-6a4f0e8b3c57";
    let xml = lab
        .firmware_domain(dom, mib)
        .replacen("</os>", "  <smbios mode='sysinfo'/>\n  </os>", 1)
        .replacen("<features>", &nova_platform(uuid), 1)
        .replacen("<devices>", &nova_devices(&t, &iso, None), 1);
    assert!(!xml.contains("<kernel>") && xml.contains("<boot dev='hd'/>"));
    let started = std::time::Instant::now();
    lab.start("A", dom, &xml);
    eprintln!(
        "Nova instance through SeaBIOS: virsh start to 'dirtier: ready' {:?}",
        started.elapsed()
    );
    let args = std::fs::read_to_string(lab.hosts.log_dir("A").join(format!("qemu/{dom}.log")))
        .unwrap_or_default();
    assert!(!args.contains("-kernel"), "libvirt booted a kernel: {args}");
    lab.wait_serial_from("A", dom, 0, "dirtier: acpi: pm at 0x600");
    lab.heartbeats("A", dom);
    lab.oracle("A", dom, mib);

    // virsh reset: the machine starts over, through the firmware.
    let from = lab.serial_len("A", dom);
    lab.virsh_ok("A", &["reset", dom]);
    lab.wait_serial_from("A", dom, from, "dirtier: ready");
    lab.heartbeats("A", dom);

    let wall = lab.migrate("A", dom, DEST_B, &["--unsafe"]);
    lab.assert_moved(dom, "A", "B", mib);
    let wall_back = lab.migrate("B", dom, DEST_A, &["--unsafe", "--p2p"]);
    lab.assert_moved(dom, "B", "A", mib);
    eprintln!(
        "Nova instance through SeaBIOS: virsh migrate A->B {wall:?}, B->A (p2p) {wall_back:?}"
    );

    // virsh reboot (ACPI: the power button, then libvirt resets the
    // machine the guest powered off) boots it again; virsh shutdown ends it.
    let from = lab.serial_len("A", dom);
    lab.virsh_ok("A", &["reboot", dom]);
    lab.wait_serial_from("A", dom, from, "dirtier: power button");
    lab.wait_serial_from("A", dom, from, "dirtier: ready");
    lab.heartbeats("A", dom);
    lab.oracle("A", dom, mib);
    let from = lab.serial_len("A", dom);
    lab.virsh_ok("A", &["shutdown", dom]);
    lab.wait_serial_from("A", dom, from, "dirtier: power button");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while lab.domstate("A", dom) != "shut off" {
        assert!(
            std::time::Instant::now() < deadline,
            "{dom} did not shut off: {}",
            lab.diagnose(dom)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    lab.forget(dom);
    qemu_img(&["check", "-q", &t]);
}
