//! Integration tests against two real libvirt hosts (tests/twohosts/) whose
//! domains run on the emulator under test (ferry-qemu built next to `ferry`,
//! else QEMU): pre-flight checks, then live migration of a running dirtier
//! guest with `virsh migrate` (plain, peer to peer, tunnelled), `ferry migrate`
//! and virDomainMigrateToURI3 as OpenStack Nova calls it, judged by the memory oracle.
//!
//! The hosts are expensive to bring up, so the tests share one pair: the first
//! test brings it up, the tests take turns (a mutex), and the last one to
//! finish tears it down (a watcher does it if a filtered run leaves it up).
//! Skipped, with the reason printed, where the hosts cannot be brought up;
//! in CI (`CI` set) that is a failure.

mod twohosts;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use twohosts::lab::{fixture, ms, rate, Lab, Sample, CMDLINE};
use twohosts::{text, TwoHosts, DEST_A, DEST_B};
use virt::connect::Connect;
use virt::domain::{Domain, MigrateParameters};
use virt::sys;

/// How many #[test]s share the hosts: the last one to finish tears them down.
const TESTS: usize = 16;

/// The shared hosts (see [`twohosts::lab::lab`]).
fn lab() -> Option<twohosts::lab::LabGuard> {
    twohosts::lab::lab(TESTS)
}

impl Lab {
    /// `virsh migrate --live EXTRA DOM DEST` on `h`, which must fail; its output.
    fn migrate_refused(&self, h: &str, dom: &str, dest: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "timeout",
            "120",
            "virsh",
            "-c",
            "qemu:///system",
            "migrate",
            "--live",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[dom, dest]);
        let out = self.hosts.sh(h, &args);
        let t = text(&out);
        assert!(
            !out.status.success(),
            "virsh migrate {extra:?} {dom} was not refused: {t}"
        );
        t
    }

    /// `ferry migrate DOM DEST-B` on A, which the pre-flight checks must block
    /// (exit 3) with a FAIL line of rule `id` naming `device`.
    fn ferry_migrate_blocked(&self, dom: &str, id: &str, device: &str) {
        let out = self.hosts.ferry("A", &["migrate", dom, DEST_B]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(3), "ferry migrate {dom}: {t}");
        assert!(
            t.lines()
                .any(|l| l.starts_with("FAIL") && l.contains(id) && l.contains(device)),
            "ferry migrate {dom}: no FAIL {id} line naming {device}: {t}"
        );
    }

    /// TCP peers on host `h` for chardevs that connect out when the emulator
    /// starts (USB redirection, smartcard passthrough): they accept on `ports`
    /// and hold the connections, and exit once those are closed again.
    fn tcp_peers(&self, h: &str, ports: &[u16]) -> Peers {
        use std::io::BufRead;
        let script = self.shared().join("peers.py");
        std::fs::write(&script, PEERS_PY).expect("write peers.py");
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let mut args = vec!["timeout", "300", "python3", script.to_str().expect("utf-8")];
        args.extend(ports.iter().map(String::as_str));
        let mut child = self.hosts.spawn(h, &args);
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        assert!(
            line.starts_with("listening"),
            "TCP peers on {ports:?} did not start: {line}"
        );
        Peers(child)
    }
}

/// The peers of [`Lab::tcp_peers`]: accept on every port given, hold the
/// connections, exit once all of them closed again.
const PEERS_PY: &str = r#"import select, socket, sys
listeners = []
for port in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(port)))
    s.listen(4)
    listeners.append(s)
print("listening", flush=True)
conns, seen = [], False
while not (seen and not conns):
    ready, _, _ = select.select(listeners + conns, [], [])
    for r in ready:
        if r in listeners:
            c, _ = r.accept()
            conns.append(c)
            seen = True
        elif not r.recv(65536):
            conns.remove(r)
            r.close()
"#;

/// Started by [`Lab::tcp_peers`]; the peers themselves exit when the domain
/// that connected to them is gone (or after 5 minutes).
struct Peers(std::process::Child);

impl Drop for Peers {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A read-only loop device over a file, detached when dropped.
struct LoopDev(String);

impl LoopDev {
    fn attach(file: &Path) -> Result<LoopDev, String> {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(file)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || !dev.starts_with("/dev/") {
            return Err(format!(
                "no loop device for {}: {}",
                file.display(),
                text(&out)
            ));
        }
        Ok(LoopDev(dev))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .output();
    }
}

/// QEMU, for the devices ferry-qemu cannot run (it refuses disks, NICs, USB
/// and custom CPU models by name); `None` after skipping (a failure in CI).
const QEMU: &str = "/usr/bin/qemu-system-x86_64";

fn qemu() -> Option<&'static str> {
    if Path::new(QEMU).exists() {
        Some(QEMU)
    } else {
        twohosts::skip_or_fail(&format!(
            "{QEMU} is not installed (Debian: qemu-system-x86): the refusal tests run the \
             devices ferry-qemu does not have under QEMU"
        ));
        None
    }
}

/// A QEMU domain of the dirtier with `devices`, its CPU the best this host's
/// QEMU runs ([`ferry_tests::migrate::qemu_cpu`]: host-passthrough where it
/// can; QEMU's default for KVM, qemu64, names features (svm, pni) some hosts'
/// KVM does not report, which the destination's CompareCPU would refuse).
/// The domain's emulator is [`ferry_standin`]: QEMU runs it, and the
/// destination's hook, which acts on ferry-qemu domains only, takes it for one.
fn qemu_dirtier(lab: &Lab, qemu: &str, dom: &str, mib: u64, devices: &str) -> String {
    let cpu = ferry_tests::migrate::qemu_cpu(Path::new(qemu)).xml;
    let xml = lab
        .dirtier_on(ferry_standin(lab, qemu), dom, mib, CMDLINE)
        .replacen("<features>", &format!("{cpu}\n  <features>"), 1);
    with_devices(&xml, devices)
}

/// On both hosts, an emulator that runs `qemu` and whose file carries
/// ferry-qemu's version line (of this release), so that ferry's hook takes its
/// domains for ferry's: the devices ferry-qemu does not have (and the hook
/// must refuse) run on it. The hook reads the file and never runs it.
fn ferry_standin(lab: &Lab, qemu: &str) -> &'static str {
    const PATH: &str = "/var/lib/libvirt/ferry-emu/qemu-as-ferry";
    for h in ["A", "B"] {
        let dir = lab.hosts.private_var_lib(h).join("ferry-emu");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let script = dir.join("qemu-as-ferry");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n# QEMU emulator version 7.2.0 (ferry-qemu {})\nexec {qemu} \"$@\"\n",
                env!("CARGO_PKG_VERSION")
            ),
        )
        .expect("write the stand-in");
        chmod_x(&script);
    }
    PATH
}

/// The ids of the failed checks of `ferry check --json` DOM DEST-B on A.
fn failed_ids(hosts: &TwoHosts, dom: &str) -> Vec<String> {
    let out = hosts.ferry("A", &["check", dom, DEST_B, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ferry check {dom}: not JSON ({e}): {}", text(&out)));
    let mut ids: Vec<String> = v["checks"]
        .as_array()
        .expect("checks array")
        .iter()
        .filter(|c| c["status"] == "fail")
        .map(|c| c["id"].as_str().expect("id").to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Whether `tool` is on PATH.
fn have(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A userspace iSCSI target (tgt) on one host, serving one LUN per backing
/// file as target `iqn.2026-11.lab:ferry`, LUN 1, 2...; stopped when dropped.
struct IscsiTarget<'a> {
    hosts: &'a TwoHosts,
    h: &'static str,
    daemon: std::process::Child,
}

/// tgtd's management channel: its own, not a system tgtd's.
const TGT_PORT: &str = "7717";
const IQN: &str = "iqn.2026-11.lab:ferry";

impl<'a> IscsiTarget<'a> {
    fn start(hosts: &'a TwoHosts, h: &'static str, luns: &[PathBuf]) -> IscsiTarget<'a> {
        let daemon = hosts.spawn(
            h,
            &["timeout", "-s", "KILL", "600", "tgtd", "-f", "-C", TGT_PORT],
        );
        let t = IscsiTarget { hosts, h, daemon };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !t.admin(&["--mode", "sys", "--op", "show"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "tgtd did not come up on host {h}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        t.admin_ok(&["--mode", "target", "--op", "new", "--tid", "1", "-T", IQN]);
        for (i, lun) in luns.iter().enumerate() {
            let n = (i + 1).to_string();
            let file = lun.to_str().expect("utf-8 path");
            t.admin_ok(&[
                "--mode",
                "logicalunit",
                "--op",
                "new",
                "--tid",
                "1",
                "--lun",
                &n,
                "-b",
                file,
            ]);
        }
        t.admin_ok(&[
            "--mode", "target", "--op", "bind", "--tid", "1", "-I", "ALL",
        ]);
        t
    }

    fn admin(&self, args: &[&str]) -> std::process::Output {
        let mut v = vec!["tgtadm", "-C", TGT_PORT, "--lld", "iscsi"];
        v.extend_from_slice(args);
        self.hosts.sh(self.h, &v)
    }

    fn admin_ok(&self, args: &[&str]) {
        let out = self.admin(args);
        assert!(out.status.success(), "tgtadm {args:?}: {}", text(&out));
    }
}

impl Drop for IscsiTarget<'_> {
    fn drop(&mut self) {
        // tgtd ignores SIGTERM; this is its own way out.
        self.admin(&[
            "--mode", "sys", "--op", "update", "--name", "State", "-v", "offline",
        ]);
        self.admin(&[
            "--mode", "target", "--op", "delete", "--tid", "1", "--force",
        ]);
        self.admin(&["--mode", "sys", "--op", "delete", "--force"]);
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// `xml` with `devices` added before its serial port.
fn with_devices(xml: &str, devices: &str) -> String {
    assert!(xml.contains("<serial type='pty'>"));
    xml.replacen(
        "<serial type='pty'>",
        &format!("{devices}\n    <serial type='pty'>"),
        1,
    )
}

/// `ferry check` must exit 3 and name `device` and `rule` in a FAIL line of rule `id`.
fn assert_refused(hosts: &TwoHosts, domain: &str, id: &str, device: &str, rule: &str) {
    let out = hosts.ferry("A", &["check", domain, DEST_B, "--json"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(3), "{domain}: {t}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["blocked"], true);
    // A domain may break one rule with several devices: the failure of rule
    // `id` about `device`.
    let fail = v["checks"]
        .as_array()
        .expect("checks array")
        .iter()
        .find(|c| {
            c["status"] == "fail"
                && c["id"] == id
                && c["device"].as_str().is_some_and(|d| d.contains(device))
        })
        .unwrap_or_else(|| panic!("{domain}: no failed {id} check naming {device} in {t}"));
    let msg = fail["message"].as_str().expect("message");
    assert!(
        msg.contains(device),
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
fn check_passes_a_clean_domain_and_refuses_source_bound_devices() {
    let Some(lab) = lab() else { return };
    let hosts = &lab.hosts;
    let emu = lab.emu.as_str();
    let shared = lab.shared();

    // A clean domain passes every check.
    hosts.define("A", "base", &fixture("base", emu, &shared));
    let out = hosts.ferry("A", &["check", "ferry-base", DEST_B]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("PASS  emulator-on-destination"));

    // Devices bound to the source host or its clients (defined, never started).
    // Some of them libvirt itself refuses to define for ferry-qemu, which has
    // no such device: that refusal, naming the device, comes first there.
    // Running domains with USB redirection, smartcard passthrough, a host
    // CD-ROM, local disks, missing bridges/networks, an iSCSI LUN passed
    // through and an iSCSI SCSI host device are refused in the
    // running_domain_* tests (under QEMU). The rest cannot run on this machine
    // under any emulator, so they are checked as defined domains only: USB
    // host devices (this kernel has no USB subsystem: libvirt fails "cannot
    // open directory '/sys/bus/usb/devices'"), PCI host devices (no VFIO, no
    // device to assign) and a local device='lun' (needs a host SCSI device
    // answering SG_IO; there is none, and a loop device does not).
    let ferry = emu.ends_with("/ferry-qemu");
    for (file, domain, id, device, rule, libvirt_refuses) in [
        (
            "lun",
            "ferry-lun",
            "passthrough-disk",
            "lun sda",
            "attached to the source host only",
            Some("doesn't support scsi-block for lun passthrough"),
        ),
        (
            "scsi-hostdev",
            "ferry-scsi-hostdev",
            "host-device",
            "scsi host device iscsi:iqn.2026-11.lab:lun1/1",
            "attached to the source host only",
            Some("Unable to determine model for SCSI controller"),
        ),
        (
            "usb-hostdev",
            "ferry-usb-hostdev",
            "host-device",
            "usb host device 0x1d6b:0x0002",
            "attached to the source host only",
            None,
        ),
        (
            "usb-hostdev-addr",
            "ferry-usb-hostdev-addr",
            "host-device",
            "bus 1 device 2",
            "attached to the source host only",
            None,
        ),
        (
            "pci-hostdev",
            "ferry-pci-hostdev",
            "host-device",
            "0000:03:00.0",
            "attached to the source host only",
            None,
        ),
        (
            "redirdev-tcp",
            "ferry-redirdev-tcp",
            "client-device",
            "redir0",
            "USB redirection",
            Some("USB redirection is not supported"),
        ),
        (
            "smartcard",
            "ferry-smartcard",
            "client-device",
            "smartcard #0",
            "attached to the source host only",
            Some("lacks smartcard host mode support"),
        ),
        (
            "cdrom-host",
            "ferry-cdrom-host",
            "client-device",
            "cdrom hdc",
            "host CD-ROM/floppy",
            None,
        ),
        (
            "missing-bridge",
            "ferry-missing-bridge",
            "network-on-destination",
            "ferrybr-missing",
            "must exist on the destination",
            None,
        ),
        (
            "missing-network",
            "ferry-missing-network",
            "network-on-destination",
            "ferrynet-missing",
            "must exist on the destination",
            None,
        ),
    ] {
        let xml = fixture(file, emu, &shared);
        match libvirt_refuses.filter(|_| ferry) {
            Some(why) => {
                let out = hosts.try_define("A", file, &xml);
                let t = text(&out);
                assert!(
                    !out.status.success(),
                    "libvirt defined {domain} for ferry-qemu: {t}"
                );
                assert!(t.contains(why), "{domain}: {t}");
            }
            None => {
                hosts.define("A", file, &xml);
                assert_refused(hosts, domain, id, device, rule);
            }
        }
    }

    // A disk only the source has: not shared, and missing on the destination.
    std::fs::write(
        hosts.private_var_lib("A").join("images/local.raw"),
        vec![0u8; 1 << 20],
    )
    .expect("write local.raw");
    hosts.define("A", "local-disk", &fixture("local-disk", emu, &shared));
    assert_refused(
        hosts,
        "ferry-local-disk",
        "shared-storage",
        "disk vda",
        "Migration without shared storage is unsafe",
    );
    assert_refused(
        hosts,
        "ferry-local-disk",
        "disk-on-destination",
        "disk vda",
        "/var/lib/libvirt/images/local.raw does not exist on the destination",
    );

    // A disk in the shared dir: reachable from both; passes with --unsafe.
    let shared_disk = shared.join("disk.raw");
    std::fs::write(&shared_disk, vec![0u8; 1 << 20]).expect("write disk.raw");
    let xml = fixture("shared-disk", emu, &shared)
        .replace("/shared/disk.raw", shared_disk.to_str().expect("utf-8"));
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
    std::fs::create_dir_all(&wrap_dir).expect("mkdir");
    let wrap = wrap_dir.join("qemu-wrap");
    std::fs::write(&wrap, format!("#!/bin/sh\nexec {emu} \"$@\"\n")).expect("write wrapper");
    chmod_x(&wrap);
    let xml = fixture("base", "/var/lib/libvirt/ferry-emu/qemu-wrap", &shared)
        .replace("ferry-base", "ferry-wrap");
    hosts.define("A", "wrap", &xml);
    assert_refused(
        hosts,
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
}

fn chmod_x(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Plain (virsh drives both daemons) A -> B, `--p2p` B -> A, then
/// `--persistent --undefinesource --bandwidth` with a downtime limit set by
/// `migrate-setmaxdowntime`, there and back.
/// Nova's live_migration_permit_auto_converge: `virsh migrate --auto-converge
/// --auto-converge-initial 30 --auto-converge-increment 20` is accepted (libvirt
/// refused it: "Migration option 'auto-converge' is not supported by QEMU
/// binary"), libvirt turns the capability and its parameters on, and a guest
/// outrunning a 16 MiB/s link arrives whole.
#[test]
fn virsh_migrate_auto_converge_with_its_parameters() {
    let Some(lab) = lab() else { return };
    let dom = "ferry-autoconverge";
    let mib = 128;
    lab.start("A", dom, &lab.dirtier(dom, mib, CMDLINE));
    let log_from = lab.daemon_log_len("A");
    let wall = lab.migrate(
        "A",
        dom,
        DEST_B,
        &[
            "--auto-converge",
            "--auto-converge-initial",
            "30",
            "--auto-converge-increment",
            "20",
            "--bandwidth",
            "16",
        ],
    );
    lab.assert_moved(dom, "A", "B", mib);
    let log = lab.daemon_log_since("A", log_from);
    // libvirt's own account of what it set (its monitor traffic is not logged here).
    for set in [
        "Enabling migration capability 'auto-converge'",
        "Setting migration parameter 'cpu-throttle-initial' from 'auto_converge.initial'",
        "Setting migration parameter 'cpu-throttle-increment' from 'auto_converge.increment'",
    ] {
        assert!(log.contains(set), "A's libvirtd did not log: {set}");
    }
    let st = lab.jobinfo("A", dom, true);
    eprintln!("--auto-converge A->B at 16 MiB/s: virsh {wall:?}, {st:?}");
    lab.migrate("B", dom, DEST_A, &["--p2p"]);
    lab.assert_moved(dom, "B", "A", mib);
}

#[test]
fn virsh_migrate_live_plain_p2p_and_persistent() {
    let Some(lab) = lab() else { return };
    let dom = "ferry-live";
    let mib = 256;
    lab.start("A", dom, &lab.dirtier(dom, mib, CMDLINE));

    let wall = lab.migrate("A", dom, DEST_B, &[]);
    let first = lab.assert_moved(dom, "A", "B", mib);
    let src = lab.jobinfo("A", dom, true);
    assert_eq!(src["Operation"], "Outgoing migration", "{src:?}");
    let downtime = ms(&src, "Total downtime").expect("completed stats have a downtime");
    assert!(
        ms(&src, "Time elapsed").is_some_and(|t| t >= downtime),
        "{src:?}"
    );
    eprintln!("plain A->B: virsh {wall:?}, source stats {src:?}");

    let wall = lab.migrate("B", dom, DEST_A, &["--p2p"]);
    let back = lab.assert_moved(dom, "B", "A", mib);
    assert!(
        (back.passes, back.cursor) > (first.passes, first.cursor),
        "the guest did not go on: {first:?} then {back:?}"
    );
    // B's copy was transient: gone with the migration; A has the statistics.
    assert!(!lab.names("B", true).iter().any(|n| n == dom));
    let dst = lab.jobinfo("A", dom, true);
    assert_eq!(dst["Operation"], "Incoming migration", "{dst:?}");
    eprintln!("p2p B->A: virsh {wall:?}");

    lab.virsh_ok("A", &["migrate-setmaxdowntime", dom, "1000"]);
    let got = lab.virsh_ok("A", &["migrate-getmaxdowntime", dom]);
    assert_eq!(got.trim(), "1000", "{got}");
    let wall = lab.migrate(
        "A",
        dom,
        DEST_B,
        &["--persistent", "--undefinesource", "--bandwidth", "64"],
    );
    lab.assert_moved(dom, "A", "B", mib);
    assert!(
        !lab.names("A", true).iter().any(|n| n == dom),
        "--undefinesource left {dom} defined on A"
    );
    assert!(lab
        .virsh_ok("B", &["dominfo", dom])
        .contains("Persistent:     yes"));
    let st = lab.jobinfo("B", dom, true);
    // 256 MiB of filled memory at 64 MiB/s cannot take less than 3 s.
    assert!(
        ms(&st, "Time elapsed").is_some_and(|t| t >= 3000),
        "--bandwidth 64 was not applied: {st:?}"
    );
    eprintln!("--persistent --undefinesource --bandwidth 64 A->B: virsh {wall:?}");

    lab.migrate(
        "B",
        dom,
        DEST_A,
        &["--p2p", "--persistent", "--undefinesource"],
    );
    lab.assert_moved(dom, "B", "A", mib);
    assert!(!lab.names("B", true).iter().any(|n| n == dom));
    lab.forget(dom);
}

/// `ferry migrate` with JSON lines A -> B, then `--p2p` back.
#[test]
fn ferry_migrate_json_progress_and_back() {
    let Some(lab) = lab() else { return };
    let hosts = &lab.hosts;
    let dom = "ferry-cli";
    let mib = 128;
    lab.start("A", dom, &lab.dirtier(dom, mib, CMDLINE));
    let out = hosts.ferry("A", &["status", dom]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("job none"), "{}", text(&out));
    let out = hosts.ferry("A", &["cancel", dom]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("no job is active"), "{}", text(&out));

    let out = hosts.ferry(
        "A",
        &["migrate", dom, DEST_B, "--json", "--max-downtime", "300"],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        text(&out),
        lab.diagnose(dom)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(lines.first().map(|v| &v["event"]), Some(&"started".into()));
    let last = lines.last().expect("JSON lines");
    assert_eq!(last["event"], "completed", "{last}");
    assert!(last["stats"]["downtime_ms"].as_u64().is_some(), "{last}");
    lab.assert_moved(dom, "A", "B", mib);
    let src = lab.jobinfo("A", dom, true);
    assert_eq!(src["Operation"], "Outgoing migration", "{src:?}");
    assert!(ms(&src, "Total downtime").is_some(), "{src:?}");
    let out = hosts.ferry("B", &["status", dom, "--completed", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let out = hosts.ferry("B", &["migrate", dom, DEST_A, "--p2p"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        text(&out),
        lab.diagnose(dom)
    );
    assert!(text(&out).contains("migrated to"), "{}", text(&out));
    lab.assert_moved(dom, "B", "A", mib);
    lab.forget(dom);
}

/// The destination's hook refuses what only the destination can see, even
/// when the source side is bypassed (plain virsh): here a ferry-qemu of
/// another release at the domain's emulator path (a wrapper whose file carries
/// that release's version line: the hook reads it, never runs it). libvirt
/// shows the hook's text.
#[test]
fn destination_hook_refuses_another_ferry_release() {
    let Some(lab) = lab() else { return };
    let dom = "ferry-hook";
    let path = "/var/lib/libvirt/ferry-emu/qemu-old";
    for (h, version) in [("A", None), ("B", Some("9.9.0"))] {
        let dir = lab.hosts.private_var_lib(h).join("ferry-emu");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let lie = version.map_or(String::new(), |v| {
            format!(
                "[ \"$1\" = --version ] && {{ echo 'QEMU emulator version 7.2.0 (ferry-qemu {v})'; exit 0; }}\n"
            )
        });
        let script = dir.join("qemu-old");
        std::fs::write(
            &script,
            format!("#!/bin/sh\n{lie}exec {} \"$@\"\n", lab.emu),
        )
        .expect("write wrapper");
        chmod_x(&script);
    }
    let xml = fixture("base", path, &lab.shared()).replace("ferry-base", dom);
    lab.start("A", dom, &xml);
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
            dom,
            DEST_B,
        ],
    );
    let t = text(&out);
    assert!(
        !out.status.success(),
        "migration to an incompatible release succeeded: {t}"
    );
    assert!(
        t.contains("ferry: ferry-version") && t.contains("9.9.0"),
        "not the hook's refusal: {t}"
    );
    assert_eq!(lab.domstate("A", dom), "running");
    lab.heartbeats("A", dom);
    assert!(!lab.names("B", true).iter().any(|n| n == dom));
    // `ferry check` cannot see the destination's release (libvirt does not
    // expose an emulator's version) and says so; `ferry migrate` gets the
    // hook's refusal from libvirt and passes it on.
    let out = lab.hosts.ferry("A", &["check", dom, DEST_B]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.lines()
            .any(|l| l.starts_with("SKIP  ferry-version") && l.contains("hook")),
        "{t}"
    );
    let out = lab.hosts.ferry("A", &["migrate", dom, DEST_B]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("ferry: ferry-version") && t.contains("9.9.0"),
        "ferry migrate did not pass the hook's refusal on: {t}"
    );
    lab.assert_unharmed("A", dom, 64);
    lab.forget(dom);
}

/// `virsh domjobabort` during a slow migration (1 MiB/s, 512 MiB of filled
/// memory): the migration fails as cancelled, the guest runs on the source.
#[test]
fn domjobabort_cancels_a_slow_migration_and_the_source_runs_on() {
    let Some(lab) = lab() else { return };
    let dom = "ferry-abort";
    let mib = 512;
    lab.start("A", dom, &lab.dirtier(dom, mib, CMDLINE));
    // `ferry cancel` runs `virsh domjobabort` (virt 0.4.3 has no
    // virDomainAbortJob): the same abort, through ferry's command line.
    for aborter in ["virsh domjobabort", "ferry cancel"] {
        let child = lab.hosts.spawn(
            "A",
            &[
                "timeout",
                "120",
                "virsh",
                "-c",
                "qemu:///system",
                "migrate",
                "--live",
                "--bandwidth",
                "1",
                dom,
                DEST_B,
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = lab.jobinfo("A", dom, false);
            if info
                .get("Operation")
                .is_some_and(|o| o == "Outgoing migration")
                && ms(&info, "Time elapsed").is_some_and(|t| t > 1000)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no migration job: {info:?}\n{}",
                lab.diagnose(dom)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let t0 = Instant::now();
        if aborter == "ferry cancel" {
            let out = lab.hosts.ferry("A", &["status", dom]);
            assert_eq!(out.status.code(), Some(0), "{}", text(&out));
            assert!(!text(&out).contains("job none"), "{}", text(&out));
            let out = lab.hosts.ferry("A", &["cancel", dom]);
            assert_eq!(out.status.code(), Some(0), "{}", text(&out));
            assert!(text(&out).contains("job aborted"), "{}", text(&out));
        } else {
            lab.virsh_ok("A", &["domjobabort", dom]);
        }
        let out = child.wait_with_output().expect("virsh migrate");
        let cancel = t0.elapsed();
        let t = text(&out);
        assert!(
            !out.status.success(),
            "the aborted migration succeeded: {t}"
        );
        assert!(t.contains("canceled by client"), "{t}");
        eprintln!("{aborter}: virsh migrate returned {cancel:?} after the abort");
        assert_eq!(lab.domstate("A", dom), "running", "{}", lab.diagnose(dom));
        assert!(!lab.names("B", true).iter().any(|n| n == dom));
        lab.heartbeats("A", dom);
        lab.oracle("A", dom, mib);
    }
    lab.forget(dom);
}

/// Wall time and downtime of `virsh migrate` for a 256 MiB and a 1 GiB dirtier
/// with a 64 MiB working set (printed; run with --nocapture to see them).
#[test]
fn virsh_migrate_timings_256m_and_1g() {
    let Some(lab) = lab() else { return };
    for mib in [256u64, 1024] {
        let dom = format!("ferry-t{mib}");
        lab.start("A", &dom, &lab.dirtier(&dom, mib, "ws=64M fill=1"));
        let wall = lab.migrate("A", &dom, DEST_B, &[]);
        let st = lab.jobinfo("A", &dom, true);
        lab.assert_moved(&dom, "A", "B", mib);
        let downtime = ms(&st, "Total downtime").expect("downtime");
        let elapsed = ms(&st, "Time elapsed").expect("time elapsed");
        assert!(
            elapsed >= downtime && wall.as_millis() as u64 >= elapsed,
            "{st:?}"
        );
        eprintln!(
            "TIMING {mib} MiB ws=64M: virsh migrate wall {} ms, job {elapsed} ms, \
             downtime {downtime} ms, setup {} ms, iterations {}, data {}",
            wall.as_millis(),
            ms(&st, "Setup time").unwrap_or(0),
            st.get("Iteration").map_or("?", String::as_str),
            st.get("Data processed").map_or("?", String::as_str),
        );
        lab.forget(&dom);
    }
}

/// `virsh migrate --live --p2p --tunnelled`: libvirt carries the stream over
/// its own connection and hands ferry-qemu pipe fds on both sides (a channel
/// without return path).
#[test]
fn virsh_migrate_p2p_tunnelled() {
    let Some(lab) = lab() else { return };
    let dom = "ferry-tunnel";
    let mib = 128;
    lab.start("A", dom, &lab.dirtier(dom, mib, CMDLINE));
    let wall = lab.migrate("A", dom, DEST_B, &["--p2p", "--tunnelled"]);
    lab.assert_moved(dom, "A", "B", mib);
    let src = lab.jobinfo("A", dom, true);
    assert_eq!(src["Operation"], "Outgoing migration", "{src:?}");
    eprintln!("p2p tunnelled A->B: virsh {wall:?}, source stats {src:?}");
    // The stream went through libvirt's tunnel: B's ferry-qemu got a pipe,
    // not a tcp: URI (twohosts.sh logs qemu_migration at debug level).
    let daemon =
        std::fs::read_to_string(lab.hosts.log_dir("B").join("libvirtd.log")).unwrap_or_default();
    assert!(
        daemon
            .lines()
            .any(|l| l.contains("Setting up incoming migration with URI fd:")),
        "B's libvirtd did not hand {dom} a tunnel fd"
    );
    lab.forget(dom);
}

/// One virDomainGetJobStats poll of a running migration.
#[derive(Debug)]
struct JobPoll {
    job_type: i32,
    data_processed: Option<u64>,
}

/// Polls the job of `dom` through `uri` until `done`: virDomainGetJobInfo
/// first (virt 0.4.3's get_job_stats builds a Vec from libvirt's NULL when no
/// job runs), then virDomainGetJobStats while one does.
fn poll_job(uri: String, dom: String, done: Arc<AtomicBool>) -> Vec<JobPoll> {
    let mut conn = Connect::open(Some(&uri)).expect("connect to the source daemon");
    let d = Domain::lookup_by_name(&conn, &dom).expect("the domain on the source");
    let mut polls = Vec::new();
    while !done.load(Ordering::SeqCst) {
        // The domain goes away with the migration (UNDEFINE_SOURCE): errors end nothing.
        if let Ok(info) = d.get_job_info() {
            if info.r#type != sys::VIR_DOMAIN_JOB_NONE as i32 {
                if let Ok(s) = d.get_job_stats(0) {
                    polls.push(JobPoll {
                        job_type: s.r#type,
                        data_processed: s.data_processed,
                    });
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(d);
    let _ = conn.close();
    polls
}

/// OpenStack Nova's live migration, called as Nova calls it: virDomainMigrateToURI3
/// to the destination daemon (peer to peer, no migration URI), LIVE | PEER2PEER |
/// PERSIST_DEST | UNDEFINE_SOURCE, typed parameters bandwidth (Nova's default 0,
/// unlimited) and destination/persistent XML (the migratable XML), while another
/// thread polls virDomainGetJobStats as Nova's monitor loop does.
#[test]
fn nova_migrate_to_uri3_p2p_persistent_with_job_stats_polling() {
    let Some(lab) = lab() else { return };
    // The poller's last calls fail once the domain left A: not worth printing.
    virt::error::clear_error_callback();
    let dom = "ferry-nova";
    let mib = 256;
    lab.start("A", dom, &lab.dirtier(dom, mib, CMDLINE));

    let mut conn = Connect::open(Some(&lab.unix_uri("A"))).expect("connect to host A");
    let d = Domain::lookup_by_name(&conn, dom).expect("the domain on A");
    let xml = d
        .get_xml_desc(sys::VIR_DOMAIN_XML_MIGRATABLE | sys::VIR_DOMAIN_XML_SECURE)
        .expect("migratable XML");
    let done = Arc::new(AtomicBool::new(false));
    let poller = {
        let (uri, dom, done) = (lab.unix_uri("A"), dom.to_owned(), done.clone());
        std::thread::spawn(move || poll_job(uri, dom, done))
    };
    let params = MigrateParameters {
        bandwidth: Some(0),
        dest_xml: Some(xml.clone()),
        persist_xml: Some(xml),
        ..Default::default()
    };
    let flags = sys::VIR_MIGRATE_LIVE
        | sys::VIR_MIGRATE_PEER2PEER
        | sys::VIR_MIGRATE_PERSIST_DEST
        | sys::VIR_MIGRATE_UNDEFINE_SOURCE;
    let t0 = Instant::now();
    let res = d.migrate_to_uri3(Some(DEST_B), params, flags);
    let wall = t0.elapsed();
    done.store(true, Ordering::SeqCst);
    let polls = poller.join().expect("the polling thread");
    if let Err(e) = &res {
        panic!("virDomainMigrateToURI3: {e}\n{}", lab.diagnose(dom));
    }
    drop(d);
    let _ = conn.close();

    lab.assert_moved(dom, "A", "B", mib);
    assert!(
        !lab.names("A", true).iter().any(|n| n == dom),
        "UNDEFINE_SOURCE left {dom} defined on A"
    );
    let mut b = Connect::open(Some(&lab.unix_uri("B"))).expect("connect to host B");
    let on_b = Domain::lookup_by_name(&b, dom).expect("the domain on B");
    assert!(
        on_b.is_persistent().expect("is persistent"),
        "{dom} is transient on B"
    );
    assert!(on_b.is_active().expect("is active"));
    drop(on_b);
    let _ = b.close();
    let progress = polls.iter().any(|p| {
        p.job_type == sys::VIR_DOMAIN_JOB_COMPLETED as i32
            || (p.job_type == sys::VIR_DOMAIN_JOB_UNBOUNDED as i32
                && p.data_processed.is_some_and(|n| n > 0))
    });
    assert!(progress, "no poll saw progress: {polls:?}");
    eprintln!(
        "Nova MigrateToURI3 A->B: {wall:?}, {} polls, last {:?}",
        polls.len(),
        polls.last()
    );
    lab.forget(dom);
}

/// `virsh migrate --live` wall time and downtime of the same dirtier (64 MiB
/// working set) under QEMU and under ferry-qemu, 256 MiB and 1 GiB guests
/// (printed, for comparison; run with --nocapture). Skipped without QEMU,
/// which CI does not install.
#[test]
fn virsh_migrate_timings_qemu_vs_ferry() {
    const QEMU: &str = "/usr/bin/qemu-system-x86_64";
    let Some(lab) = lab() else { return };
    if !Path::new(QEMU).exists() {
        eprintln!("SKIP: {QEMU} is not installed: nothing to compare ferry-qemu with");
        return;
    }
    for mib in [256u64, 1024] {
        for (label, emu) in [("ferry-qemu", lab.emu.as_str()), ("qemu", QEMU)] {
            let dom = format!("ferry-cmp{mib}-{label}");
            lab.start("A", &dom, &lab.dirtier_on(emu, &dom, mib, "ws=64M fill=1"));
            let wall = lab.migrate("A", &dom, DEST_B, &[]);
            let st = lab.jobinfo("A", &dom, true);
            lab.assert_moved(&dom, "A", "B", mib);
            eprintln!(
                "COMPARE {label} {mib} MiB ws=64M: virsh migrate wall {} ms, job {} ms, \
                 downtime {} ms, iterations {}, data {}",
                wall.as_millis(),
                ms(&st, "Time elapsed").map_or("?".to_owned(), |t| t.to_string()),
                ms(&st, "Total downtime").map_or("?".to_owned(), |t| t.to_string()),
                st.get("Iteration").map_or("?", String::as_str),
                st.get("Data processed").map_or("?", String::as_str),
            );
            lab.forget(&dom);
        }
    }
}

/// An emulator only the source has (a wrapper around the emulator under test
/// in A's private /var/lib/libvirt), on a running domain: `ferry check` and
/// `ferry migrate` refuse it by name, so does plain `virsh migrate` (the
/// destination cannot start it), and the guest runs on untouched.
#[test]
fn running_domain_with_an_emulator_missing_on_the_destination_is_refused() {
    let Some(lab) = lab() else { return };
    let dom = "ferry-run-wrap";
    let mib = 64;
    let path = "/var/lib/libvirt/ferry-emu/qemu-wrap";
    let dir = lab.hosts.private_var_lib("A").join("ferry-emu");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let wrap = dir.join("qemu-wrap");
    std::fs::write(&wrap, format!("#!/bin/sh\nexec {} \"$@\"\n", lab.emu)).expect("write wrapper");
    chmod_x(&wrap);
    lab.start("A", dom, &lab.dirtier_on(path, dom, mib, CMDLINE));

    let device = format!("emulator {path}");
    assert_refused(
        &lab.hosts,
        dom,
        "emulator-on-destination",
        &device,
        "the destination must run the same emulator",
    );
    lab.ferry_migrate_blocked(dom, "emulator-on-destination", &device);
    let t = lab.migrate_refused("A", dom, DEST_B, &[]);
    assert!(
        t.contains(path),
        "virsh migrate refused for another reason: {t}"
    );
    lab.assert_unharmed("A", dom, mib);
    lab.forget(dom);
}

/// Devices bound to the source host or its clients, on a domain that really
/// runs: USB redirection and smartcard passthrough to TCP peers on the source,
/// and a host block device as CD-ROM (a loop device: a host node that
/// libvirt would hand to the destination's emulator by the same name). QEMU
/// runs them (ferry-qemu has none of these devices and refuses them by name),
/// as a ferry-qemu stand-in ([`ferry_standin`]).
/// `ferry check` and `ferry migrate` refuse each; plain `virsh migrate` is
/// refused by the destination's hook, which names all three; the guest runs on.
/// USB and PCI host devices and SCSI LUNs/host devices cannot run on this
/// machine (no USB subsystem, no VFIO, no SCSI target): they are checked as
/// defined domains in `check_passes_a_clean_domain_and_refuses_source_bound_devices`.
#[test]
fn running_domain_with_client_devices_is_refused() {
    let Some(lab) = lab() else { return };
    let Some(qemu) = qemu() else { return };
    let dom = "ferry-run-client";
    let mib = 64;
    let iso = lab.shared().join("ferry-cd.iso");
    std::fs::write(&iso, vec![0u8; 1 << 20]).expect("write the CD image");
    let cd = match LoopDev::attach(&iso) {
        Ok(d) => d,
        Err(why) => return twohosts::skip_or_fail(&why),
    };
    let _peers = lab.tcp_peers("A", &[4000, 4001]);
    let devices = format!(
        "<controller type='usb' model='qemu-xhci'/>
    <redirdev bus='usb' type='tcp'>
      <source mode='connect' host='127.0.0.1' service='4000'/>
      <protocol type='raw'/>
    </redirdev>
    <smartcard mode='passthrough' type='tcp'>
      <source mode='connect' host='127.0.0.1' service='4001'/>
      <protocol type='raw'/>
    </smartcard>
    <disk type='block' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source dev='{}'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>",
        cd.0
    );
    lab.start("A", dom, &qemu_dirtier(&lab, qemu, dom, mib, &devices));

    assert_eq!(failed_ids(&lab.hosts, dom), ["client-device"]);
    let rule = "attached to the source host only";
    for device in ["redir0", "smartcard #0 (mode='passthrough')", "cdrom hdc"] {
        assert_refused(&lab.hosts, dom, "client-device", device, rule);
    }
    let out = lab.hosts.ferry("A", &["check", dom, DEST_B]);
    assert!(text(&out).contains(&cd.0), "{}", text(&out));
    lab.ferry_migrate_blocked(dom, "client-device", "redir0");

    let t = lab.migrate_refused("A", dom, DEST_B, &[]);
    for device in ["redir0", "smartcard #0", "cdrom hdc"] {
        assert!(
            t.contains(&format!("ferry: client-device: {device}"))
                || t.contains(&format!("ferry: client-device: usb redirdev {device}")),
            "the destination hook did not name {device}: {t}"
        );
    }
    lab.assert_unharmed("A", dom, mib);
    lab.forget(dom);
}

/// What the destination lacks, on a domain that really runs (under QEMU:
/// ferry-qemu has no disks or NICs yet): a disk on a local filesystem of the
/// source only, a bridge and a libvirt network that exist on the source only.
/// `ferry check` names every one; plain `virsh migrate` is refused by libvirt
/// (unsafe storage), `--unsafe` by the destination's hook (disk, bridge and
/// network named); the guest runs on.
#[test]
fn running_domain_with_storage_and_networks_only_on_the_source_is_refused() {
    let Some(lab) = lab() else { return };
    let Some(qemu) = qemu() else { return };
    let dom = "ferry-run-dest";
    let mib = 64;
    std::fs::write(
        lab.hosts.private_var_lib("A").join("images/run-local.raw"),
        vec![0u8; 1 << 20],
    )
    .expect("write run-local.raw");
    lab.hosts.sh("A", &["ip", "link", "del", "ferrybr-run"]);
    let out = lab
        .hosts
        .sh("A", &["ip", "link", "add", "ferrybr-run", "type", "bridge"]);
    assert!(out.status.success(), "bridge on A: {}", text(&out));
    lab.hosts
        .sh("A", &["ip", "link", "set", "ferrybr-run", "up"]);
    let net = lab.shared().join("ferrynet-run.xml");
    std::fs::write(
        &net,
        "<network><name>ferrynet-run</name><bridge name='ferrynet0'/></network>",
    )
    .expect("write the network");
    lab.hosts.virsh("A", &["net-destroy", "ferrynet-run"]);
    lab.virsh_ok("A", &["net-create", net.to_str().expect("utf-8")]);
    let devices = "<disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/var/lib/libvirt/images/run-local.raw'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:12:34:66'/>
      <source bridge='ferrybr-run'/>
      <model type='virtio'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:12:34:67'/>
      <source network='ferrynet-run'/>
      <model type='virtio'/>
    </interface>";
    lab.start("A", dom, &qemu_dirtier(&lab, qemu, dom, mib, devices));

    let hosts = &lab.hosts;
    assert_eq!(
        failed_ids(hosts, dom),
        [
            "disk-on-destination",
            "network-on-destination",
            "shared-storage"
        ]
    );
    assert_refused(
        hosts,
        dom,
        "shared-storage",
        "disk vda",
        "Migration without shared storage is unsafe",
    );
    assert_refused(
        hosts,
        dom,
        "disk-on-destination",
        "disk vda",
        "/var/lib/libvirt/images/run-local.raw does not exist on the destination",
    );
    for device in ["bridge ferrybr-run", "libvirt network ferrynet-run"] {
        assert_refused(
            hosts,
            dom,
            "network-on-destination",
            device,
            "must exist on the destination",
        );
    }
    lab.ferry_migrate_blocked(dom, "shared-storage", "disk vda");

    let t = lab.migrate_refused("A", dom, DEST_B, &[]);
    assert!(
        t.contains("Migration without shared storage is unsafe"),
        "not libvirt's storage refusal: {t}"
    );
    let t = lab.migrate_refused("A", dom, DEST_B, &["--unsafe"]);
    for what in [
        "ferry: disk-on-destination: disk vda: /var/lib/libvirt/images/run-local.raw",
        "bridge ferrybr-run is missing on the destination",
        "libvirt network ferrynet-run is missing on the destination",
    ] {
        assert!(
            t.contains(what),
            "the destination hook did not say {what:?}: {t}"
        );
    }
    lab.assert_unharmed("A", dom, mib);
    lab.forget(dom);
    lab.hosts.virsh("A", &["net-destroy", "ferrynet-run"]);
    lab.hosts.sh("A", &["ip", "link", "del", "ferrybr-run"]);
}

/// Guest CPU features the destination cannot provide, judged by the
/// destination's own virConnectCompareCPU. Both hosts share this machine's
/// CPU, so the guest's CPU (kvm64 plus features this CPU lacks) is one that
/// no host here provides in full; with check='none' QEMU starts it anyway and
/// leaves those features out. ferry-qemu cannot run it: it offers no custom
/// CPU models (libvirt: "CPU mode 'custom' ... is not supported by
/// hypervisor"). `ferry check` and `ferry migrate` refuse, naming the
/// features; the guest runs on. Plain `virsh migrate` is not refused here:
/// libvirt sends the destination the CPU as QEMU runs it (those features
/// off), and a hook cannot ask libvirtd to compare (it would deadlock).
#[test]
fn running_domain_with_cpu_features_the_destination_lacks_is_refused() {
    let Some(lab) = lab() else { return };
    let Some(qemu) = qemu() else { return };
    let dom = "ferry-run-cpu";
    let mib = 64;
    let flags = std::fs::read_to_string("/proc/cpuinfo").expect("read /proc/cpuinfo");
    let flags: Vec<&str> = flags
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    // libvirt's name and /proc/cpuinfo's for features few CPUs have.
    let lacking: Vec<&str> = [
        ("amx-tile", "amx_tile"),
        ("avx512-fp16", "avx512_fp16"),
        ("serialize", "serialize"),
        ("movdiri", "movdiri"),
        ("movdir64b", "movdir64b"),
        ("waitpkg", "waitpkg"),
        ("avx-vnni", "avx_vnni"),
        ("cldemote", "cldemote"),
        ("avx512-bf16", "avx512_bf16"),
    ]
    .into_iter()
    .filter(|(_, f)| !flags.contains(f))
    .map(|(v, _)| v)
    .take(2)
    .collect();
    if lacking.is_empty() {
        return twohosts::skip_or_fail("this CPU has every feature the test would ask for");
    }
    let features: String = lacking
        .iter()
        .map(|f| format!("<feature policy='require' name='{f}'/>"))
        .collect();
    let cpu = format!(
        "<cpu mode='custom' match='exact' check='none'>\
         <model fallback='forbid'>kvm64</model>{features}</cpu>\n  <features>"
    );
    let xml = lab
        .dirtier_on(qemu, dom, mib, CMDLINE)
        .replacen("<features>", &cpu, 1);
    lab.start("A", dom, &xml);

    assert_refused(
        &lab.hosts,
        dom,
        "cpu",
        "kvm64",
        "the destination host must offer every CPU feature the guest uses",
    );
    assert_eq!(failed_ids(&lab.hosts, dom), ["cpu"]);
    let out = lab.hosts.ferry("A", &["check", dom, DEST_B]);
    let t = text(&out);
    assert!(
        t.contains("Host CPU does not provide required features"),
        "not CompareCPU's verdict: {t}"
    );
    for f in &lacking {
        assert!(t.contains(f), "CompareCPU did not name {f}: {t}");
    }
    lab.ferry_migrate_blocked(dom, "cpu", "kvm64");
    lab.assert_unharmed("A", dom, mib);
    lab.forget(dom);
}

/// `virsh domjobinfo` during a migration capped at 16 MiB/s: through the
/// first pass (64 MiB of filled memory) data processed grows and data
/// remaining shrinks from one reading to the next, at the capped rate, and
/// the iteration goes on. With a 1 ms downtime limit the migration cannot
/// converge at 16 MiB/s, whatever the guest does: the device state alone
/// needs 1.2 ms at that rate. `virsh migrate-setspeed` lifts the cap
/// mid-flight and the migration completes within seconds, which it can only
/// do at the new rate. The engine takes up a new max-bandwidth when its next
/// pass starts (engine/vmm precopy.rs), so the speed is raised after the
/// first pass: during a long first pass it would wait for that pass to end.
#[test]
fn migrate_setspeed_takes_effect_mid_flight_and_domjobinfo_shows_progress() {
    let Some(lab) = lab() else { return };
    let dom = "ferry-speed";
    let mib = 64;
    let (slow, fast) = (16u64, 1024u64);
    lab.start("A", dom, &lab.dirtier(dom, mib, "ws=8M fill=1"));
    lab.virsh_ok("A", &["migrate-setmaxdowntime", dom, "1"]);
    let slow_arg = slow.to_string();
    let mut child = lab.hosts.spawn(
        "A",
        &[
            "timeout",
            "240",
            "virsh",
            "-c",
            "qemu:///system",
            "migrate",
            "--live",
            "--bandwidth",
            &slow_arg,
            dom,
            DEST_B,
        ],
    );
    let running = |child: &mut std::process::Child, what: &str| {
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the migration ended {what}\n{}",
            lab.diagnose(dom)
        );
    };

    // Readings at the slow rate: at least 3 s, and three passes past the first.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut before: Vec<Sample> = Vec::new();
    while before.last().is_none_or(|l| {
        l.at.duration_since(before[0].at) < Duration::from_secs(3) || l.iteration < 4
    }) {
        assert!(
            Instant::now() < deadline,
            "no migration progress in domjobinfo: {before:?}\n{}",
            lab.diagnose(dom)
        );
        running(&mut child, &format!("at {slow} MiB/s: {before:?}"));
        if let Some(s) = lab.sample("A", dom).filter(|s| s.processed > 0) {
            before.push(s);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (first, last) = (before[0], before[before.len() - 1]);
    let moves = before
        .windows(2)
        .filter(|w| w[1].processed > w[0].processed)
        .count();
    let mut remaining: Vec<u64> = before.iter().map(|s| s.remaining).collect();
    remaining.dedup();
    assert!(
        before.windows(2).all(|w| w[1].processed >= w[0].processed)
            && moves >= 4
            && remaining.len() >= 3,
        "domjobinfo shows no steady progress (the engine updates it per 8 MiB batch): \
         {before:?}"
    );
    let slow_rate = rate(&first, &last);
    assert!(
        slow_rate > 0.0 && slow_rate < slow as f64 * 1.5,
        "--bandwidth {slow} not honoured: {slow_rate:.1} MiB/s ({before:?})"
    );

    // The running job's cap, as libvirt reads it back from the emulator.
    let got = lab.virsh_ok("A", &["migrate-getspeed", dom]);
    assert_eq!(got.trim(), slow_arg, "{got}");
    // Raised, the migration completes at once: often before a
    // `migrate-getspeed` could read the new value back.
    let fast_arg = fast.to_string();
    lab.virsh_ok("A", &["migrate-setspeed", dom, &fast_arg]);
    let set = Instant::now();
    let mut after: Vec<Sample> = Vec::new();
    while child.try_wait().expect("try_wait").is_none() {
        assert!(
            set.elapsed() < Duration::from_secs(30),
            "migrate-setspeed {fast} did not take effect: no end 30 s later ({after:?})\n{}",
            lab.diagnose(dom)
        );
        if let Some(s) = lab.sample("A", dom) {
            after.push(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let finished = set.elapsed();
    let out = child.wait_with_output().expect("virsh migrate");
    assert!(
        out.status.success(),
        "virsh migrate: {}\n{}",
        text(&out),
        lab.diagnose(dom)
    );
    let fast_rate = match (after.first(), after.last()) {
        (Some(a), Some(b)) if b.at > a.at => format!("{:.1} MiB/s", rate(a, b)),
        _ => "not sampled".to_owned(),
    };
    let st = lab.jobinfo("A", dom, true);
    lab.assert_moved(dom, "A", "B", mib);
    eprintln!(
        "SETSPEED {mib} MiB ws=8M fill=1: --bandwidth {slow}: domjobinfo {slow_rate:.1} MiB/s \
         over {} readings ({moves} moves, to iteration {}), no convergence; migrate-setspeed \
         {fast}: completed {} ms later ({fast_rate} over {} readings, last pass {:?}); \
         job {} ms, {} iterations",
        before.len(),
        last.iteration,
        finished.as_millis(),
        after.len(),
        st.get("Memory bandwidth"),
        ms(&st, "Time elapsed").map_or("?".to_owned(), |t| t.to_string()),
        st.get("Iteration").map_or("?", String::as_str),
    );
    lab.forget(dom);
}

/// Raw and passthrough SCSI on a domain that really runs: an iSCSI LUN passed
/// through (`<disk type='network' device='lun'>`, QEMU's scsi-block) and an
/// iSCSI SCSI host device (scsi-generic), served by a userspace iSCSI target
/// (tgt) on the source host only. QEMU runs them (ferry-qemu has no SCSI;
/// a local device='lun' needs a device that answers SG_IO, which this machine
/// does not have). `ferry check` and `ferry migrate` refuse both; plain
/// `virsh migrate` is refused by the destination's hook naming both (libvirt
/// itself would let them migrate); the guest runs on.
#[test]
fn running_domain_with_passthrough_scsi_is_refused() {
    let Some(lab) = lab() else { return };
    let Some(qemu) = qemu() else { return };
    if !have("tgtd") {
        return twohosts::skip_or_fail(
            "tgtd is not installed (Debian: tgt): the SCSI passthrough refusal needs an iSCSI target",
        );
    }
    let dom = "ferry-run-scsi";
    let mib = 64;
    let luns: Vec<PathBuf> = (1..=2)
        .map(|i| {
            lab.hosts
                .private_var_lib("A")
                .join(format!("images/lun{i}.img"))
        })
        .collect();
    for l in &luns {
        std::fs::write(l, vec![0u8; 4 << 20]).expect("write a LUN image");
    }
    let _target = IscsiTarget::start(&lab.hosts, "A", &luns);
    let devices = format!(
        "<controller type='scsi' model='virtio-scsi'/>
    <disk type='network' device='lun'>
      <driver name='qemu' type='raw'/>
      <source protocol='iscsi' name='{IQN}/1'>
        <host name='127.0.0.1' port='3260'/>
      </source>
      <target dev='sda' bus='scsi'/>
    </disk>
    <hostdev mode='subsystem' type='scsi'>
      <source protocol='iscsi' name='{IQN}/2'>
        <host name='127.0.0.1' port='3260'/>
      </source>
    </hostdev>"
    );
    lab.start("A", dom, &qemu_dirtier(&lab, qemu, dom, mib, &devices));

    let hosts = &lab.hosts;
    assert_eq!(failed_ids(hosts, dom), ["host-device", "passthrough-disk"]);
    let rule = "attached to the source host only";
    assert_refused(hosts, dom, "passthrough-disk", "lun sda", rule);
    let hostdev = format!("scsi host device iscsi:{IQN}/2");
    assert_refused(hosts, dom, "host-device", &hostdev, rule);
    lab.ferry_migrate_blocked(dom, "passthrough-disk", "lun sda");

    let t = lab.migrate_refused("A", dom, DEST_B, &[]);
    for what in [
        "ferry: passthrough-disk: lun sda".to_owned(),
        format!("ferry: host-device: <hostdev type='scsi'> {hostdev}"),
    ] {
        assert!(
            t.contains(&what),
            "the destination hook did not say {what:?}: {t}"
        );
    }
    lab.assert_unharmed("A", dom, mib);
    lab.forget(dom);
}
