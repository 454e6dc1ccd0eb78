//! End-to-end: boot the dirtier on /dev/kvm with `ferry-vm`, checkpoint it while it
//! dirties memory, restore it in new processes, and let the oracle judge.

use std::process::Command;
use std::time::Duration;

use ferry_tests::{bin, dirtier_source, oracle, require_kvm, Scratch, VmProcess};

const BOOT: Duration = Duration::from_secs(30);

#[test]
fn dirtier_boots_and_keeps_memory_consistent() {
    require_kvm();
    let s = Scratch::new();
    let dirtier = s.dirtier.display().to_string();
    let vm = VmProcess::start(
        &s,
        "boot",
        &[
            "run",
            "--kernel",
            &dirtier,
            "-m",
            "128M",
            "--append",
            "ws=16M pattern=random fill=1",
        ],
    );
    vm.wait_serial("dirtier: ready", BOOT);
    // First touches of guest pages are slow under nested KVM: give it ~1 s of heartbeats.
    vm.wait_heartbeats(1000, BOOT);
    let image = s.path("boot.img");
    vm.ok("pause");
    vm.ok(&format!("dump {}", image.display()));
    let report = oracle(&image);
    assert!(report.passes >= 1, "{report:?}");
    assert_eq!(report.working_set_pages, 16 << 8);
    assert!(report.filled_pages > 0);
    vm.ok("resume");
    vm.wait_heartbeats(5, BOOT);
    // The dirty rate of its 16 of 128 MiB (the sample sees an eighth of
    // RAM change), and refusals that name the problem.
    assert_eq!(vm.ok("dirty-rate 1 4096")["status"], "measuring");
    let e = vm.command("dirty-rate 1");
    assert_eq!(
        e["error"], "the dirty rate is already being measured.",
        "{e}"
    );
    let deadline = std::time::Instant::now() + BOOT;
    let rate = loop {
        let m = vm.ok("dirty-rate");
        if m["status"] == "measured" {
            break m["dirty-rate"].as_u64().expect("a rate");
        }
        assert!(std::time::Instant::now() < deadline, "{m}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!((1..=128).contains(&rate), "{rate} MiB/s");
    let e = vm.command("dirty-rate 0");
    assert_eq!(e["error"], "calc-time is out of range[1, 60].", "{e}");
    assert_eq!(vm.ok("announce")["nics"], serde_json::json!([]), "no NIC");
    vm.quit();
}

/// Checkpoints a dirtying guest, restores it in a new process, and repeats: heartbeats
/// must resume within a second and the pass counter must continue, not restart.
fn checkpoint_chain(mem: &str, append: &str, rounds: usize) {
    require_kvm();
    let s = Scratch::new();
    let dirtier = s.dirtier.display().to_string();
    let mut vm = VmProcess::start(
        &s,
        "r0",
        &["run", "--kernel", &dirtier, "-m", mem, "--append", append],
    );
    vm.wait_serial("dirtier: ready", BOOT);
    vm.wait_heartbeats(10, BOOT);
    // Progress of the sweep: completed passes, then position in the current pass.
    let progress =
        |r: &ferry_testguest::OracleReport| (r.passes, r.cursor % r.working_set_pages.max(1));
    let mut last = (0, 0);
    for round in 1..=rounds {
        let ckpt = s.path(&format!("r{round}.ckpt"));
        let image = s.path("check.img");
        vm.wait_heartbeats(100, BOOT);
        vm.ok("pause");
        vm.ok(&format!("dump {}", image.display()));
        let before = oracle(&image);
        assert!(
            progress(&before) > last,
            "round {round}: the guest made no progress since the last restore: {:?} after {last:?}",
            progress(&before)
        );
        vm.ok(&format!("checkpoint {}", ckpt.display()));
        vm.quit();

        vm = VmProcess::start(
            &s,
            &format!("r{round}"),
            &["restore", ckpt.to_str().expect("utf-8 path"), "--paused"],
        );
        vm.ok(&format!("dump {}", image.display()));
        let restored = oracle(&image);
        assert_eq!(
            progress(&restored),
            progress(&before),
            "round {round}: the restored guest is not where it stopped"
        );
        vm.ok("resume");
        let waited = vm.wait_heartbeats(3, Duration::from_secs(10));
        assert!(
            waited < Duration::from_secs(1),
            "round {round}: heartbeats took {waited:?} to resume"
        );
        last = progress(&before);
    }
    vm.wait_heartbeats(100, BOOT);
    vm.ok("pause");
    let image = s.path("final.img");
    vm.ok(&format!("dump {}", image.display()));
    let report = oracle(&image);
    assert!(progress(&report) > last, "{report:?}");
    vm.quit();
}

#[test]
fn checkpoint_restore_20_rounds_256m() {
    checkpoint_chain("256M", "ws=64M fill=1", 20);
}

#[test]
fn checkpoint_restore_20_rounds_1g() {
    checkpoint_chain("1G", "ws=64M pattern=random", 20);
}

/// A checkpoint of a running dirtier, for the rejection tests.
fn good_checkpoint(s: &Scratch) -> Vec<u8> {
    let dirtier = s.dirtier.display().to_string();
    let vm = VmProcess::start(
        s,
        "src",
        &[
            "run", "--kernel", &dirtier, "-m", "64M", "--append", "ws=4M",
        ],
    );
    vm.wait_serial("dirtier: ready", BOOT);
    let ckpt = s.path("good.ckpt");
    vm.ok(&format!("checkpoint {}", ckpt.display()));
    vm.quit();
    std::fs::read(&ckpt).expect("read checkpoint")
}

/// `ferry-vm restore` of `bytes` must fail, naming the problem, before any guest runs.
fn refused(s: &Scratch, name: &str, bytes: &[u8], extra: &[&str], expect: &str) {
    let path = s.path(name);
    std::fs::write(&path, bytes).expect("write bad checkpoint");
    let serial = s.path(&format!("{name}.serial"));
    let out = Command::new(bin("ferry-vm"))
        .arg("restore")
        .arg(&path)
        .args(extra)
        .arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .output()
        .expect("run ferry-vm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
    assert!(
        stderr.contains(expect),
        "{name}: expected {expect:?} in {stderr:?}"
    );
    let ran = std::fs::read(&serial).unwrap_or_default();
    assert!(
        ran.is_empty(),
        "{name}: the guest ran: {:?}",
        String::from_utf8_lossy(&ran)
    );
}

#[test]
fn bad_checkpoints_are_refused() {
    require_kvm();
    let s = Scratch::new();
    let good = good_checkpoint(&s);

    refused(&s, "empty", &[], &[], "ended early");
    refused(&s, "truncated", &good[..good.len() / 2], &[], "ended early");
    refused(
        &s,
        "truncated-end",
        &good[..good.len() - 1],
        &[],
        "ended early",
    );

    let mut corrupt = good.clone();
    let at = good.len() / 3;
    corrupt[at] ^= 0x40;
    refused(&s, "corrupt", &corrupt, &[], "checksum");

    let mut newer = good.clone();
    newer[8] = 99;
    refused(&s, "newer", &newer, &[], "newer than this ferry supports");

    refused(
        &s,
        "foreign",
        ferry_testguest::DIRTIER_ELF,
        &[],
        "not a ferry checkpoint",
    );

    refused(
        &s,
        "wrong-size",
        &good,
        &["-m", "128M"],
        "64 MiB of RAM but 128 MiB",
    );
}

/// A checkpoint of a VM with fw_cfg restores only where fw_cfg (and its
/// etc/vmcoreinfo) is given again; elsewhere the refusal names it.
#[test]
fn fw_cfg_travels_in_checkpoints_and_is_required_by_name() {
    require_kvm();
    let s = Scratch::new();
    let vm = dirtier_source(&s, "64M", "ws=4M", &["--fw-cfg=vmcoreinfo=on"]);
    let ckpt = s.path("fw_cfg.ckpt");
    vm.ok("pause");
    vm.ok(&format!("checkpoint {}", ckpt.display()));
    vm.quit();
    let bytes = std::fs::read(&ckpt).expect("read checkpoint");
    refused(&s, "no-fw-cfg", &bytes, &[], "fw_cfg");
    refused(
        &s,
        "no-vmcoreinfo",
        &bytes,
        &["--fw-cfg"],
        "fw_cfg:etc/vmcoreinfo",
    );
    let ckpt = ckpt.to_str().expect("utf-8 path");
    let vm = VmProcess::start(
        &s,
        "dst",
        &["restore", ckpt, "--fw-cfg=vmcoreinfo=on", "--paused"],
    );
    vm.ok("resume");
    vm.wait_heartbeats(10, Duration::from_secs(10));
    vm.quit();
}

/// A checkpoint of a VM with an RTC restores only where --rtc is given
/// again (the refusal names it), and a VM without one refuses a checkpoint
/// with one; with --rtc the guest runs on.
#[test]
fn the_rtc_travels_in_checkpoints_and_is_required_by_name() {
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
            "ws=4M",
            "--rtc=base=2006-06-17T16:01:21,order=dc",
        ],
    );
    vm.wait_serial("dirtier: ready", BOOT);
    let ckpt = s.path("rtc.ckpt");
    vm.ok("pause");
    vm.ok(&format!("checkpoint {}", ckpt.display()));
    vm.quit();
    let bytes = std::fs::read(&ckpt).expect("read checkpoint");
    refused(&s, "no-rtc", &bytes, &[], "rtc");
    let ckpt = ckpt.to_str().expect("utf-8 path");
    // The destination's own base does not matter: the clock comes along.
    let vm = VmProcess::start(&s, "dst", &["restore", ckpt, "--rtc", "--paused"]);
    vm.ok("resume");
    vm.wait_heartbeats(10, Duration::from_secs(10));
    vm.quit();
}

#[test]
fn unbootable_kernel_is_refused() {
    require_kvm();
    let s = Scratch::new();
    let junk = s.path("junk.bin");
    std::fs::write(&junk, vec![0x5au8; 8192]).expect("write junk");
    let out = Command::new(bin("ferry-vm"))
        .args(["run", "--serial", "null", "--kernel"])
        .arg(&junk)
        .output()
        .expect("run ferry-vm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("junk.bin"), "{stderr}");
    assert!(stderr.contains("bzImage"), "{stderr}");
}

/// Guest poweroff and reset end the VM cleanly with their documented exit status.
#[test]
fn guest_poweroff_and_reset_exit_codes() {
    require_kvm();
    let s = Scratch::new();
    let dirtier = s.dirtier.display().to_string();
    for (append, code, what) in [
        ("ws=4M poweroff=3", 0, "powered off"),
        ("ws=4M reset=2", 3, "guest reset"),
    ] {
        let out = Command::new(bin("ferry-vm"))
            .args([
                "run", "--serial", "null", "-m", "64M", "--kernel", &dirtier, "--append", append,
            ])
            .output()
            .expect("run ferry-vm");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{append}: {stderr}");
        if code != 0 {
            assert!(stderr.contains(what), "{append}: {stderr}");
        }
    }
}
