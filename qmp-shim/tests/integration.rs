//! ferry-qemu as libvirt runs it: the real binary, real sockets, and (when
//! installed) a real libvirtd probing it.

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_testguest::{check, FileImage, OracleReport};
use ferry_tests::pki::Ca;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_ferry-qemu");

#[path = "replay/mod.rs"]
mod replay;

fn read_json(r: &mut impl BufRead) -> Value {
    let mut line = String::new();
    r.read_line(&mut line).expect("read");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

#[test]
fn probe_daemonizes_after_the_socket_listens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("qmp.monitor");
    let pidfile = dir.path().join("qmp.pid");
    let status = Command::new(BIN)
        .args([
            "-S",
            "-no-user-config",
            "-nodefaults",
            "-nographic",
            "-machine",
            "none,accel=kvm:tcg",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .arg("-pidfile")
        .arg(&pidfile)
        .arg("-daemonize")
        .status()
        .expect("run ferry-qemu");
    assert!(status.success());
    // The contract libvirt relies on: when the command returns, the socket
    // listens and the pidfile names the daemon.
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    let stream = UnixStream::connect(&sock).expect("monitor listens");
    let mut r = BufReader::new(stream.try_clone().expect("clone"));
    let mut w = stream;
    assert_eq!(
        read_json(&mut r)["QMP"]["version"]["qemu"],
        json!({"major": 7, "minor": 2, "micro": 0})
    );
    for (cmd, check) in [
        ("qmp_capabilities", json!({})),
        ("query-target", json!({"arch": "x86_64"})),
    ] {
        writeln!(w, "{}", json!({"execute": cmd})).expect("write");
        assert_eq!(read_json(&mut r)["return"], check);
    }
    writeln!(w, "{}", json!({"execute": "query-qmp-schema"})).expect("write");
    assert!(
        read_json(&mut r)["return"]
            .as_array()
            .expect("schema")
            .len()
            > 50
    );
    // A second client waits until the first leaves (libvirt reconnects).
    drop(w);
    drop(r);
    let again = UnixStream::connect(&sock).expect("reconnect");
    let mut r2 = BufReader::new(again);
    assert!(read_json(&mut r2).get("QMP").is_some());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM the daemon");
}

#[test]
fn startup_errors_exit_1_with_the_reason() {
    let out = Command::new(BIN)
        .args(["-frobnicate"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "ferry-qemu: -frobnicate: invalid option"
    );
    let out = Command::new(BIN)
        .args([
            "-machine",
            "pc",
            "-accel",
            "kvm",
            "-device",
            "vfio-pci,host=01:00.0",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("device 'vfio-pci' is not supported"));
    // TLS credentials are loaded at startup: a bad directory is named.
    let out = Command::new(BIN)
        .args([
            "-machine",
            "none",
            "-object",
            "tls-creds-x509,id=tls0,dir=/nonexistent/pki,endpoint=server",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/pki/ca-cert.pem"), "{err}");
    // With -daemonize, the child's error comes back through the parent.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args(["-machine", "none", "-qmp"])
        .arg(format!(
            "unix:{}/no/such/dir/s,server=on,wait=off",
            dir.path().display()
        ))
        .arg("-daemonize")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("compat_monitor0"));
    let out = Command::new(BIN).arg("-version").output().expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("QEMU emulator version 7.2.0"));
}

/// Whether the private-libvirtd tests can run here (libvirtd installed, root).
/// Says why when not; under CI a missing piece is a failure, never a skip.
fn libvirt_available(test: &str) -> bool {
    let why = if !Path::new("/usr/sbin/libvirtd").exists() {
        "libvirtd is not installed (apt-get install libvirt-daemon-system libvirt-clients)"
    } else if !nix::unistd::geteuid().is_root() {
        "needs root (private mount namespace for libvirtd)"
    } else {
        return true;
    };
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run {test}: {why}"
    );
    eprintln!("SKIP {test}: {why}");
    false
}

/// `virsh domcapabilities` with ferry-qemu as the emulator, against a private
/// libvirtd in its own mount namespace (tests/libvirt-probe.sh). Skips, saying
/// why, when libvirtd is not installed or we are not root.
#[test]
fn libvirt_accepts_ferry_qemu() {
    if !libvirt_available("libvirt_accepts_ferry_qemu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/libvirt-probe.sh");
    let out = Command::new("timeout")
        .args([
            "120",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "bash",
            script,
        ])
        .arg(dir.path())
        .arg(BIN)
        .arg("kvm")
        .output()
        .expect("run libvirt-probe.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(dir.path().join("var-log-libvirt/libvirtd.log"))
        .unwrap_or_default();
    let probe_errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" error : ") || l.contains(" warning : "))
        .filter(|l| l.contains("QEMU") || l.contains("qemu") || l.contains("ferry"))
        .collect();
    assert!(
        out.status.success() && probe_errors.is_empty(),
        "virsh domcapabilities failed: {}\nstdout: {stdout}\nlibvirtd errors:\n{}",
        String::from_utf8_lossy(&out.stderr),
        probe_errors.join("\n")
    );
    assert!(stdout.contains("<domain>kvm</domain>"), "{stdout}");
    assert!(
        stdout.contains("<machine>pc-i440fx-7.2</machine>")
            && stdout.contains("<machine>pc-i440fx-4.2</machine>"),
        "{stdout}"
    );
    assert!(
        log.contains("Try to probe capabilities of"),
        "libvirt really probed"
    );
    // The CPU models come from ferry's own answers (query-cpu-definitions,
    // query-cpu-model-expansion): host-model is a model ferry runs, with
    // fallback='forbid' (libvirt's mark of a QEMU-provided host model).
    assert!(
        stdout.contains("<mode name='host-model' supported='yes'>")
            && stdout.contains("<model fallback='forbid'>kvm64</model>")
            && stdout.contains("<mode name='custom' supported='yes'>"),
        "{stdout}"
    );
    assert!(
        log.contains(r#""execute":"query-cpu-definitions""#)
            && log.contains(r#""execute":"query-cpu-model-expansion""#)
    );
}

/// libvirt domains with each CPU mode on ferry-qemu (tests/libvirt-cpu.sh):
/// host-passthrough (`-cpu host,migratable=on`), custom qemu64, host-model
/// (libvirt writes kvm64 plus the features of ferry's expansion) and a
/// host-passthrough guest with invtsc all start; the invtsc guest reports
/// QEMU's blocker, `virsh migrate` refuses with it in the Begin phase, and
/// the guest runs on. After each start libvirt reads the vCPU's feature
/// bools and `unavailable-features` and fixes its live XML as it does with
/// QEMU: qemu64 with check='none' shows what this host's KVM lacks as
/// disabled; with check='full' the start fails naming the differences; with
/// the default check libvirt refuses before starting when the host lacks a
/// qemu64 feature. A domain with `<type machine='pc-i440fx-4.2'>` starts;
/// one with q35 is refused at define.
#[test]
fn libvirt_cpu_modes_and_the_invtsc_blocker() {
    let name = "libvirt_cpu_modes_and_the_invtsc_blocker";
    if !libvirt_available(name) || !kvm_usable(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // The emulator (libvirt-qemu) must reach the kernel under it.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod the lab dir");
    let work = dir.path().join("w");
    let kernel = dir.path().join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/libvirt-cpu.sh");
    let out = Command::new("timeout")
        .args(["300", "unshare", "--mount", "--propagation", "private"])
        .arg("bash")
        .arg(script)
        .arg(&work)
        .arg(BIN)
        .arg(&kernel)
        .output()
        .expect("run libvirt-cpu.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = |p: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(p))
            .unwrap_or_else(|| panic!("no '{p}' in:\n{stdout}"))
            .to_string()
    };
    assert_eq!(
        line("CPU passthrough "),
        "CPU passthrough host,migratable=on started"
    );
    assert_eq!(
        line("LIVECPU passthrough "),
        "LIVECPU passthrough <cpu mode='host-passthrough' check='none' migratable='on'/>"
    );
    // What this host's KVM cannot give qemu64 (pni on some nested KVMs):
    // libvirt must learn it from the CPU object.
    let kvm = kvm_ioctls::Kvm::new().expect("kvm");
    let host = ferry_vmm::cpu::supported_cpuid(&kvm).expect("supported cpuid");
    let lacking = ferry_vmm::cpu::model::unavailable_features(&host, "qemu64");
    // check='none': it starts, QEMU's way, without what the host lacks, and
    // libvirt's live XML says so (policy='disable'), plus what KVM adds.
    assert_eq!(line("CPU qemu64 "), "CPU qemu64 qemu64 started");
    let live = line("LIVECPU qemu64 ");
    assert!(live.contains("check='full'"), "{live}");
    for f in &lacking {
        assert!(
            live.contains(&format!("<feature policy='disable' name='{f}'/>")),
            "{f}: {live}"
        );
    }
    for f in ["x2apic", "hypervisor", "lahf_lm"] {
        assert!(
            live.contains(&format!("<feature policy='require' name='{f}'/>")),
            "{f}: {live}"
        );
    }
    // Default check (partial for KVM): libvirt compares with the host CPU
    // before it starts anything.
    let partial = line("CPU qemu64partial ");
    if lacking.is_empty() {
        assert!(partial.ends_with(" started"), "{partial}");
    } else {
        assert!(
            partial.contains("the CPU is incompatible with host CPU"),
            "{partial}"
        );
    }
    // check='full': the started CPU must be exactly the model; it is not
    // (KVM's x2apic and hypervisor bits, QEMU's lahf_lm, the lacking ones).
    let full = line("CPU qemu64full ");
    assert!(
        full.contains("guest CPU doesn't match specification: extra features: x2apic,hypervisor"),
        "{full}"
    );
    if !lacking.is_empty() {
        assert!(
            full.contains(&format!("missing features: {}", lacking.join(","))),
            "{full}"
        );
    }
    let hm = line("CPU hostmodel ");
    assert!(
        hm.starts_with("CPU hostmodel kvm64,") && hm.ends_with(" started"),
        "{hm}"
    );
    let live = line("LIVECPU hostmodel ");
    assert!(
        live.contains("<model fallback='forbid'>kvm64</model>") && live.contains("check='full'"),
        "{live}"
    );
    assert_eq!(
        line("CPU invtsc "),
        "CPU invtsc host,migratable=off,invtsc=on started"
    );
    let blocker = "State blocked by non-migratable CPU device (invtsc flag)";
    assert!(line("BLOCKED ").contains(blocker), "{stdout}");
    assert!(!line("UNBLOCKED ").contains("blocked-reasons"), "{stdout}");
    assert!(
        line("MIGRATE ").contains(&format!("cannot migrate domain: {blocker}")),
        "{stdout}"
    );
    // QEMU's migrate_prepare refusal, straight over QMP.
    let qmp = line("QMPMIGRATE ");
    assert!(
        qmp.contains("GenericError") && qmp.contains(blocker),
        "{qmp}"
    );
    assert_eq!(line("STATE invtsc "), "STATE invtsc running");
    // Issue 17: a domain pinned to an older i440FX type starts as that type;
    // libvirt refuses q35 itself, as query-machines does not offer it.
    assert_eq!(
        line("CPU i440fx42 "),
        "CPU i440fx42 host,migratable=on started"
    );
    let machine = line("MACHINE i440fx42 ");
    assert!(
        machine.starts_with("MACHINE i440fx42 pc-i440fx-4.2,"),
        "{machine}"
    );
    let qom = line("QOMMACHINE ");
    assert!(qom.contains("pc-i440fx-4.2-machine"), "{qom}");
    let q35 = line("Q35 ");
    assert!(q35.contains("does not support machine type 'q35'"), "{q35}");
    assert_eq!(line("LIBVIRTD "), "LIBVIRTD alive");
}

/// Guest RAM of the guests below.
const MEM: u64 = 128 << 20;

/// A QMP client that keeps the events it reads past.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects (retrying while the process starts) and negotiates.
    fn connect(path: &Path) -> Self {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("connect {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout");
        let mut q = Self {
            r: BufReader::new(stream.try_clone().expect("clone")),
            w: stream,
            events: Vec::new(),
        };
        assert!(read_json(&mut q.r).get("QMP").is_some());
        q.ok("qmp_capabilities", json!({}));
        q
    }

    fn send(&mut self, name: &str, args: Value, fd: Option<RawFd>) {
        let text = format!("{}\n", json!({"execute": name, "arguments": args}));
        match fd {
            None => self.w.write_all(text.as_bytes()).expect("write"),
            Some(fd) => {
                let fds = [fd];
                sendmsg::<()>(
                    self.w.as_raw_fd(),
                    &[IoSlice::new(text.as_bytes())],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                )
                .expect("sendmsg");
            }
        }
    }

    /// The reply to `name` (events before it are kept).
    fn cmd_with_fd(&mut self, name: &str, args: Value, fd: Option<RawFd>) -> Value {
        self.send(name, args, fd);
        loop {
            let v = read_json(&mut self.r);
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    fn ok(&mut self, name: &str, args: Value) -> Value {
        let reply = self.cmd_with_fd(name, args, None);
        reply
            .get("return")
            .cloned()
            .unwrap_or_else(|| panic!("{name}: {reply}"))
    }

    /// Waits for event `name` (with `data.status == status` if given).
    fn wait_event(&mut self, name: &str, status: Option<&str>) -> Value {
        let matches =
            |v: &Value| v["event"] == name && status.is_none_or(|s| v["data"]["status"] == s);
        if let Some(i) = self.events.iter().position(matches) {
            return self.events.remove(i);
        }
        loop {
            let v = read_json(&mut self.r);
            if matches(&v) {
                return v;
            }
            self.events.push(v);
        }
    }

    fn status(&mut self) -> String {
        self.ok("query-status", json!({}))["status"]
            .as_str()
            .expect("status")
            .to_string()
    }

    /// pmemsave of all guest RAM, checked by the oracle.
    fn oracle(&mut self, path: &Path) -> OracleReport {
        self.ok(
            "pmemsave",
            json!({"val": 0, "size": MEM, "filename": path.display().to_string()}),
        );
        check(&FileImage::open(path, 0).expect("open dump"))
            .unwrap_or_else(|e| panic!("oracle rejects {}: {e}", path.display()))
    }
}

/// A ferry-qemu process, killed when dropped.
struct Qemu {
    child: Child,
    qmp: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_guest(dir: &Path, tag: &str, kernel: &Path, extra: &[&str]) -> Qemu {
    let qmp = dir.join(format!("{tag}.qmp"));
    let child = Command::new(BIN)
        .args([
            "-M",
            "microvm",
            "-enable-kvm",
            "-m",
            "128M",
            "-nodefaults",
            "-S",
        ])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "ws=16M fill=1"])
        .arg("-serial")
        .arg(format!(
            "file:{}",
            dir.join(format!("{tag}.serial")).display()
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn ferry-qemu");
    Qemu { child, qmp }
}

fn wait_for_serial(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(what)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} never showed {what:?}", path.display());
}

fn serial_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Lets the guest run until its serial output grows, then stops it.
fn run_a_while(q: &mut Qmp, serial: &Path) {
    let before = serial_len(serial);
    q.ok("cont", json!({}));
    q.wait_event("RESUME", None);
    wait_for_serial_growth(serial, before);
    q.ok("stop", json!({}));
    q.wait_event("STOP", None);
    assert_eq!(q.status(), "paused");
}

fn kvm_usable(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run every test: skipped"
        );
        eprintln!("SKIP {test}: /dev/kvm is not usable here");
    }
    ok
}

/// A `pc` guest (which has QEMU's MC146818 RTC, here from a given date)
/// resets under `system_reset` and boots again, its RTC carried over as
/// QEMU keeps it; `rtc-reset-reinjection` answers as QEMU's does.
#[test]
fn a_pc_guest_with_its_rtc_resets_and_boots_again() {
    if !kvm_usable("a_pc_guest_with_its_rtc_resets_and_boots_again") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let serial = d.join("pc.serial");
    let qmp = d.join("pc.qmp");
    let child = Command::new(BIN)
        .args(["-M", "pc", "-enable-kvm", "-m", "128M", "-nodefaults", "-S"])
        .args(["-rtc", "base=2006-06-17T16:01:21,clock=vm,driftfix=slew"])
        .args(["-boot", "order=dc"])
        .arg("-kernel")
        .arg(&kernel)
        .args(["-append", "ws=4M"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn ferry-qemu");
    let guest = Qemu { child, qmp };
    let mut q = Qmp::connect(&guest.qmp);
    q.ok("cont", json!({}));
    wait_for_serial(&serial, "dirtier: ready");
    assert_eq!(q.ok("rtc-reset-reinjection", json!({})), json!({}));
    let before = std::fs::read_to_string(&serial).expect("serial");
    let boots = |s: &str| s.matches("dirtier: ready").count();
    q.ok("system_reset", json!({}));
    q.wait_event("RESET", None);
    let deadline = Instant::now() + Duration::from_secs(120);
    while boots(&std::fs::read_to_string(&serial).expect("serial")) <= boots(&before) {
        assert!(Instant::now() < deadline, "the guest did not boot again");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(q.status(), "running");
}

/// A `pc` dirtier (with its RTC) as the other tests' microvm one.
fn spawn_pc_guest(dir: &Path, tag: &str, kernel: &Path, extra: &[&str]) -> Qemu {
    let qmp = dir.join(format!("{tag}.qmp"));
    let child = Command::new(BIN)
        .args(["-M", "pc", "-enable-kvm", "-m", "128M", "-nodefaults"])
        .args(["-rtc", "base=2006-06-17T16:01:21,driftfix=slew"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "ws=16M fill=1"])
        .arg("-serial")
        .arg(format!(
            "file:{}",
            dir.join(format!("{tag}.serial")).display()
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn ferry-qemu");
    Qemu { child, qmp }
}

/// A running `pc` guest migrates with its RTC to another `pc` (its shape
/// names the RTC, which both have) and runs on there.
#[test]
fn a_pc_guest_migrates_with_its_rtc() {
    if !kvm_usable("a_pc_guest_migrates_with_its_rtc") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let a = spawn_pc_guest(d, "a", &kernel, &[]);
    let mut qa = Qmp::connect(&a.qmp);
    wait_for_serial(&d.join("a.serial"), "dirtier: ready");
    let b = spawn_pc_guest(d, "b", &kernel, &["-incoming", "defer"]);
    let mut qb = Qmp::connect(&b.qmp);
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    qb.ok("migrate-incoming", json!({"uri": uri}));
    qb.wait_event("MIGRATION", Some("setup"));
    qa.ok("migrate", json!({"uri": uri}));
    let info = poll_until_done(&mut qa);
    check_completed(&info);
    qb.wait_event("MIGRATION", Some("completed"));
    wait_status(&mut qb, "running");
    let serial = d.join("b.serial");
    let before = serial_len(&serial);
    let deadline = Instant::now() + Duration::from_secs(60);
    while serial_len(&serial) <= before + 100 {
        assert!(
            Instant::now() < deadline,
            "no heartbeats on the destination"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// QEMU's command line by hand: boot the dirtier paused, run, stop,
/// pmemsave (oracle), save to `file:`, restore with `-incoming file:`,
/// save again to `exec:`, restore with `-incoming defer` + `migrate-incoming
/// fd:` (getfd), then from `-incoming exec:`: the guest continues where it
/// stopped each time.
#[test]
fn qemu_cli_run_save_restore_keeps_the_guest() {
    if !kvm_usable("qemu_cli_run_save_restore_keeps_the_guest") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");

    // 1. Boot, run, stop, dump, save to file:.
    let a = spawn_guest(d, "a", &kernel, &[]);
    let mut q = Qmp::connect(&a.qmp);
    assert_eq!(q.status(), "prelaunch");
    let chardevs = q.ok("query-chardev", json!({}));
    assert!(
        chardevs
            .as_array()
            .expect("list")
            .iter()
            .any(|c| c["label"] == "serial0"
                && c["filename"] == format!("file:{}", d.join("a.serial").display())),
        "{chardevs}"
    );
    let cpus = q.ok("query-cpus-fast", json!({}));
    assert_eq!(cpus[0]["qom-path"], "/machine/unattached/device[0]");
    q.ok("cont", json!({}));
    q.wait_event("RESUME", None);
    wait_for_serial(&d.join("a.serial"), "dirtier: ready");
    q.ok("stop", json!({}));
    q.wait_event("STOP", None);
    let r1 = q.oracle(&d.join("a.raw"));
    assert!(r1.fill_done, "{r1:?}");
    let save1 = d.join("one.ferry");
    q.ok(
        "migrate",
        json!({"uri": format!("file:{}", save1.display())}),
    );
    q.wait_event("MIGRATION", Some("completed"));
    assert_eq!(q.ok("query-migrate", json!({}))["status"], "completed");
    assert_eq!(q.status(), "postmigrate");
    q.ok("quit", json!({}));
    drop(a);

    // 2. -incoming file: the guest is exactly where it stopped.
    let b = spawn_guest(
        d,
        "b",
        &kernel,
        &["-incoming", &format!("file:{}", save1.display())],
    );
    let mut q = Qmp::connect(&b.qmp);
    wait_status(&mut q, "paused");
    let r2 = q.oracle(&d.join("b0.raw"));
    assert_eq!((r2.passes, r2.cursor), (r1.passes, r1.cursor));
    run_a_while(&mut q, &d.join("b.serial"));
    let r3 = q.oracle(&d.join("b1.raw"));
    assert!(
        (r3.passes, r3.cursor) > (r1.passes, r1.cursor),
        "the guest did not go on after the restore: {r1:?} then {r3:?}"
    );
    let save2 = d.join("two.ferry");
    // Forget the incoming migration's events.
    q.events.clear();
    q.ok(
        "migrate",
        json!({"uri": format!("exec:cat > {}", save2.display())}),
    );
    q.wait_event("MIGRATION", Some("completed"));
    drop(q);
    drop(b);

    // 3. -incoming defer + migrate-incoming with an fd passed by getfd.
    let c = spawn_guest(d, "c", &kernel, &["-incoming", "defer"]);
    let mut q = Qmp::connect(&c.qmp);
    assert_eq!(q.status(), "inmigrate");
    let file = std::fs::File::open(&save2).expect("save2");
    let r = q.cmd_with_fd("getfd", json!({"fdname": "in"}), Some(file.as_raw_fd()));
    assert_eq!(r["return"], json!({}), "{r}");
    q.ok("migrate-incoming", json!({"uri": "fd:in"}));
    q.wait_event("MIGRATION", Some("completed"));
    assert_eq!(q.status(), "paused");
    let r4 = q.oracle(&d.join("c0.raw"));
    assert_eq!((r4.passes, r4.cursor), (r3.passes, r3.cursor));
    run_a_while(&mut q, &d.join("c.serial"));
    let r5 = q.oracle(&d.join("c1.raw"));
    let save3 = d.join("three.ferry");
    q.events.clear();
    q.ok(
        "migrate",
        json!({"uri": format!("exec:cat > {}", save3.display())}),
    );
    q.wait_event("MIGRATION", Some("completed"));

    // 4. -incoming exec: reads the stream from a command's stdout.
    let e = spawn_guest(
        d,
        "e",
        &kernel,
        &["-incoming", &format!("exec:cat {}", save3.display())],
    );
    let mut qe = Qmp::connect(&e.qmp);
    wait_status(&mut qe, "paused");
    let r6 = qe.oracle(&d.join("e0.raw"));
    assert_eq!((r6.passes, r6.cursor), (r5.passes, r5.cursor));
    run_a_while(&mut qe, &d.join("e.serial"));
    drop(qe);
    drop(e);
    // A command that fails yields no guest: the load fails, exit 1.
    let mut bad = spawn_guest(d, "bad", &kernel, &["-incoming", "exec:exit 3"]);
    let status = bad.child.wait().expect("wait");
    assert_eq!(status.code(), Some(1), "{status}");

    // virsh destroy: SIGTERM → SHUTDOWN (host-signal), exit 0.
    let mut c = c;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let ev = q.wait_event("SHUTDOWN", None);
    assert_eq!(ev["data"], json!({"guest": false, "reason": "host-signal"}));
    assert!(c.child.wait().expect("wait").success());
}

/// Runs tests/libvirt-domain.sh in `mode` (a private libvirtd + virtlogd
/// configured as Debian ships them) in a fresh dir; returns that dir (the
/// script's WORK is `w` in it) and the script's stdout. Panics with the
/// domains' and libvirtd's logs when the script fails.
fn libvirt_domain_lab(mode: &str, domains: &[&str]) -> (tempfile::TempDir, String) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    // The emulator runs as libvirt-qemu: it must reach the kernel and its
    // dump dir below (libvirt's DAC driver labels the files it is given,
    // not the dirs above them).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the lab dir");
    let work = dir.path().join("w");
    let kernel = dir.path().join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/libvirt-domain.sh");
    let out = Command::new("timeout")
        .args([
            "300",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "bash",
            script,
        ])
        .arg(&work)
        .arg(BIN)
        .arg(&kernel)
        .arg(mode)
        .output()
        .expect("run libvirt-domain.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let log = |p: &str| std::fs::read_to_string(work.join(p)).unwrap_or_default();
    assert!(
        out.status.success() && stdout.contains("STEP done"),
        "libvirt-domain.sh {mode} failed: {}\nstdout:\n{stdout}\ndomain logs:\n{}\nlibvirtd errors:\n{}",
        String::from_utf8_lossy(&out.stderr),
        domains
            .iter()
            .map(|d| log(&format!("var-log-libvirt/qemu/{d}.log")))
            .collect::<Vec<_>>()
            .join("\n"),
        log("var-log-libvirt/libvirtd.log")
            .lines()
            .filter(|l| l.contains(" error : ") && !l.contains("virGDBus") && !l.contains("cgroup"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Packaged defaults, not root: the emulator is libvirt's user in a /dev
    // of its own.
    for d in domains {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("EMULATOR {d} ")))
            .unwrap_or_else(|| panic!("no EMULATOR line for {d}:\n{stdout}"));
        assert!(
            line.contains(" user=libvirt-qemu ") && line.contains(" dev=private"),
            "{line}"
        );
    }
    (dir, stdout)
}

/// A libvirt domain with ferry-qemu as its emulator, driven by virsh
/// through define, start, suspend/resume, save, restore and destroy against
/// a private libvirtd + virtlogd configured as Debian ships them
/// (tests/libvirt-domain.sh); the oracle checks pmemsave dumps before the
/// save and after the restore. Skips, saying why, when libvirtd is not
/// installed, we are not root, or /dev/kvm is unusable.
#[test]
fn libvirt_runs_a_ferry_qemu_domain() {
    let name = "libvirt_runs_a_ferry_qemu_domain";
    if !libvirt_available(name) {
        return;
    }
    if !kvm_usable(name) {
        return;
    }
    let (dir, stdout) = libvirt_domain_lab("lifecycle", &["ferrylab"]);
    let work = dir.path().join("w");
    // virsh domdirtyrate-calc + domstats --dirtyrate: the guest rewrites 16
    // of its 128 MiB, so the rate is above 0 and at most all of RAM per second.
    let rate: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("DIRTYRATE "))
        .unwrap_or_else(|| panic!("no dirty rate in:\n{stdout}"))
        .trim()
        .parse()
        .expect("MB/s");
    assert!((1..=128).contains(&rate), "{rate} MB/s");
    assert!(stdout.contains("HMP announce_self []"), "{stdout}");
    assert!(
        stdout.contains("HMP info status [VM status: running]"),
        "{stdout}"
    );
    let log = |p: &str| std::fs::read_to_string(work.join(p)).unwrap_or_default();
    let serial = log("var-log-libvirt/qemu/ferrylab-serial.log");
    assert!(
        serial.contains("dirtier: ready") && serial.contains("...."),
        "{serial}"
    );
    let dump = |f: &str| FileImage::open(work.join("dumps").join(f), 0).expect("dump");
    let before = check(&dump("mem-before-save.raw")).expect("oracle: dump before the save");
    let after = check(&dump("mem-after-restore.raw")).expect("oracle: dump after the restore");
    assert!(
        (after.passes, after.cursor) > (before.passes, before.cursor),
        "the restored guest did not go on: {before:?} then {after:?}"
    );
    // libvirt really used QMP save/restore on ferry-qemu.
    let libvirtd = log("var-log-libvirt/libvirtd.log");
    assert!(libvirtd.contains(
        r#""execute":"migrate","arguments":{"detach":true,"resume":false,"uri":"fd:migrate"}"#
    ));
    assert!(libvirtd.contains(r#""execute":"migrate-incoming""#));
    // The domain's <rng model='virtio'> with <rate>, as libvirt 9.0 writes it
    // for ferry-qemu (key=value: ferry-qemu does not claim QAPIfied -object
    // and JSON -device), at the start and at the restore.
    let argv: String = log("var-log-libvirt/qemu/ferrylab.log")
        .lines()
        .filter(|l| l.contains("rng"))
        .collect::<Vec<_>>()
        .join("\n");
    for want in [
        "-object rng-random,id=objrng0,filename=/dev/urandom",
        "-device virtio-rng-pci,rng=objrng0,id=rng0,max-bytes=1024,period=1000,bus=pci.0,addr=0x",
    ] {
        assert_eq!(argv.matches(want).count(), 2, "{want}:\n{argv}");
    }
    // The domain is Nova's: <sysinfo> with <smbios mode='sysinfo'/> and the
    // HPET off. libvirt passed them as QEMU 7.2 takes them, and the restored
    // guest's first MiB holds the tables (dmidecode scans it as an OS does).
    let domain_log = log("var-log-libvirt/qemu/ferrylab.log");
    assert!(
        domain_log.contains(
            "-smbios 'type=1,manufacturer=OpenStack Foundation,product=OpenStack Nova,\
             version=26.1.0,serial=c7a5fdbd-cdaf-9455-926a-d65c16db1809,\
             uuid=c7a5fdbd-cdaf-9455-926a-d65c16db1809,family=Virtual Machine'"
        ) && domain_log.contains("-no-hpet"),
        "{domain_log}"
    );
    let dmi = Command::new("/usr/sbin/dmidecode")
        .args(["--no-sysfs", "--dev-mem"])
        .arg(work.join("dumps").join("mem-after-restore.raw"))
        .output()
        .expect("run dmidecode (scripts/deps --tests installs it)");
    let dmi = String::from_utf8_lossy(&dmi.stdout);
    for want in [
        "\tManufacturer: OpenStack Foundation",
        "\tProduct Name: OpenStack Nova",
        "\tSerial Number: c7a5fdbd-cdaf-9455-926a-d65c16db1809",
        "\tUUID: c7a5fdbd-cdaf-9455-926a-d65c16db1809",
        "\tFamily: Virtual Machine",
    ] {
        assert!(dmi.contains(want), "dmidecode lacks {want:?}:\n{dmi}");
    }
}

/// Issue 19 item 1: a libvirt domain whose disk is Nova's, a qcow2 over a
/// raw base (`<driver type='qcow2'/>`), starts under ferry-qemu: libvirt
/// writes the -blockdev chain, and `virsh domblklist`/`domblkinfo` answer
/// with the qcow2's virtual size as the capacity.
#[test]
fn libvirt_starts_a_qcow2_disk_over_a_raw_base() {
    let name = "libvirt_starts_a_qcow2_disk_over_a_raw_base";
    if !libvirt_available(name) || !kvm_usable(name) {
        return;
    }
    let (dir, stdout) = libvirt_domain_lab("qcow2", &["ferrylab"]);
    let work = dir.path().join("w");
    let top = work.join("images/disk.qcow2");
    assert!(
        stdout.contains(&format!("BLKLIST {}", top.display())),
        "{stdout}"
    );
    let info = |what: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("BLKINFO {what} ")))
            .unwrap_or_else(|| panic!("no {what} in:\n{stdout}"))
            .parse()
            .expect("bytes")
    };
    assert_eq!(info("Capacity"), 64 << 20, "{stdout}");
    let file_len = std::fs::metadata(&top).expect("stat the image").len();
    assert!(info("Physical") >= file_len.min(1 << 20), "{stdout}");
    assert!(info("Allocation") < 64 << 20, "{stdout}");
    for node in [
        "NODE libvirt-1-format",
        "NODE libvirt-1-storage",
        "NODE libvirt-2-format",
        "NODE libvirt-2-storage",
    ] {
        assert!(stdout.contains(node), "{node}:\n{stdout}");
    }
    let argv =
        std::fs::read_to_string(work.join("var-log-libvirt/qemu/ferrylab.log")).unwrap_or_default();
    assert!(
        argv.contains(
            r#""driver":"qcow2","file":"libvirt-1-storage","backing":"libvirt-2-format""#
        ),
        "{argv}"
    );
}

/// Issue 19 item 4: Nova's config drive, an ISO on an IDE CD-ROM
/// (`<disk device='cdrom'><target bus='ide'/>`), in a domain libvirt starts
/// under ferry-qemu: libvirt writes `-device ide-cd`, the guest finds the
/// ATAPI drive and reads the file's sector, and `virsh domblklist` /
/// `domblkinfo` show the drive with the ISO's size.
#[test]
fn libvirt_starts_a_config_drive_on_an_ide_cdrom() {
    let name = "libvirt_starts_a_config_drive_on_an_ide_cdrom";
    if !libvirt_available(name) || !kvm_usable(name) {
        return;
    }
    let (dir, stdout) = libvirt_domain_lab("cdrom", &["ferrylab"]);
    let work = dir.path().join("w");
    let expect = stdout
        .lines()
        .find_map(|l| l.strip_prefix("EXPECT "))
        .unwrap_or_else(|| panic!("no EXPECT in:\n{stdout}"));
    let (lba, hex) = expect.split_once(' ').expect("EXPECT LBA HEX");
    assert!(
        stdout.contains(&format!("CDROM cdrom: lba={lba} data={hex}")),
        "the guest did not read the config drive's file:\n{stdout}"
    );
    let iso = work.join("disk.config");
    assert!(
        stdout.contains(&format!("BLKLIST hdd {}", iso.display())),
        "{stdout}"
    );
    let len = std::fs::metadata(&iso).expect("stat the ISO").len();
    assert!(
        stdout.contains(&format!("BLKINFO Capacity {len}")),
        "{stdout}"
    );
    let argv =
        std::fs::read_to_string(work.join("var-log-libvirt/qemu/ferrylab.log")).unwrap_or_default();
    assert!(
        argv.contains("-device ide-cd,bus=ide.1,unit=1,drive=libvirt-1-format,id=ide0-1-1"),
        "{argv}"
    );
}

/// Issue 13 item 5: under libvirt's packaged defaults (emulator user
/// libvirt-qemu, DAC, a private /dev) a domain with
/// `<serial type='pty'><log file=.../>` and one with `<serial type='file'>`
/// start, and their guests' output reaches the log and the file. libvirt
/// passes both outputs as fd sets (`-add-fd`, `/dev/fdset/N`) holding
/// virtlogd's pipes; ferry-qemu used to reopen them through /proc/self/fd
/// and fail: "cannot open logfile /proc/self/fd/33: Permission denied".
#[test]
fn libvirt_serial_log_and_file_under_packaged_defaults() {
    let name = "libvirt_serial_log_and_file_under_packaged_defaults";
    if !libvirt_available(name) || !kvm_usable(name) {
        return;
    }
    let (pty, file) = ("ferrylab-pty", "ferrylab-file");
    let (dir, stdout) = libvirt_domain_lab("serial", &[pty, file]);
    let work = dir.path().join("w");
    for d in [pty, file] {
        let qemu_log = std::fs::read_to_string(work.join(format!("var-log-libvirt/qemu/{d}.log")))
            .expect("domain log");
        assert!(qemu_log.contains("-add-fd set="), "{qemu_log}");
        let out =
            std::fs::read_to_string(work.join(format!("var-log-libvirt/qemu/{d}-serial.log")))
                .unwrap_or_default();
        assert!(
            out.contains("dirtier: ready") && out.contains("...."),
            "{d}: {out}"
        );
    }
    assert!(stdout.contains("/dev/pts/"), "virsh ttyconsole: {stdout}");
}

/// A descriptor this process passes to a child as `-add-fd fd=N`: it stays
/// open across exec (std opens everything close-on-exec).
fn inheritable(f: &(impl AsRawFd + std::os::fd::AsFd)) -> String {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(f, FcntlArg::F_SETFD(FdFlag::empty())).expect("clear FD_CLOEXEC");
    f.as_raw_fd().to_string()
}

/// libvirt's defaults without libvirt: ferry-qemu runs as an unprivileged
/// user (nobody, with /dev/kvm's group, as libvirt-qemu with kvm) and gets
/// its serial file, its log (a pipe, as virtlogd's) and its disk as fds
/// (`-add-fd`, `/dev/fdset/N`) of files only root may open. It must use
/// them as passed: reopening one through /proc/self/fd is refused
/// (EACCES), the failure libvirt showed ("cannot open logfile
/// /proc/self/fd/33"). The guest's output reaches the file and the pipe,
/// its records reach the disk, and query-block sizes the disk from its fd.
#[test]
fn fdset_files_are_used_as_passed_by_an_unprivileged_emulator() {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let name = "fdset_files_are_used_as_passed_by_an_unprivileged_emulator";
    if !nix::unistd::geteuid().is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI must run {name}");
        eprintln!("SKIP {name}: needs root (files only root may open, another user)");
        return;
    }
    if !kvm_usable(name) {
        return;
    }
    let kvm = std::fs::metadata("/dev/kvm").expect("/dev/kvm");
    if kvm.mode() & 0o060 != 0o060 {
        eprintln!(
            "SKIP {name}: /dev/kvm is mode {:o}: its group cannot use it (Debian's udev \
             rule makes it root:kvm 0660)",
            kvm.mode() & 0o777
        );
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("getpwnam")
        .expect("user nobody");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // Only root may open what is in `private`; the emulator's user reaches
    // the kernel and its own `run` dir.
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let private = d.join("private");
    std::fs::create_dir(&private).expect("mkdir");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let run = d.join("run");
    std::fs::create_dir(&run).expect("mkdir");
    nix::unistd::chown(&run, Some(nobody.uid), None).expect("chown");
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");

    let image = private.join("disk.raw");
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&image)
        .expect("image");
    disk.set_len(16 << 20).expect("size the image");
    let out_path = private.join("serial.out");
    let out = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&out_path)
        .expect("serial file");
    let (log_r, log_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    let storage = json!({"driver": "file", "filename": "/dev/fdset/2",
        "node-name": "libvirt-1-storage", "auto-read-only": true, "discard": "unmap"})
    .to_string();
    let format = json!({"node-name": "libvirt-1-format", "read-only": false,
        "driver": "raw", "file": "libvirt-1-storage"})
    .to_string();
    let qmp = run.join("q.qmp");
    let mut child = Command::new(BIN)
        .args(["-M", "pc", "-enable-kvm", "-m", "128M", "-nodefaults"])
        .arg("-kernel")
        .arg(&kernel)
        .args(["-append", &format!("ws=16M fill=1 blk={BLK_K}")])
        .arg("-add-fd")
        .arg(format!(
            "set=0,fd={},opaque=serial0-log",
            inheritable(&log_w)
        ))
        .arg("-add-fd")
        .arg(format!(
            "set=1,fd={},opaque=serial0-source",
            inheritable(&out)
        ))
        .arg("-add-fd")
        .arg(format!("set=2,fd={}", inheritable(&disk)))
        .args([
            "-chardev",
            "file,id=charserial0,path=/dev/fdset/1,append=on,logfile=/dev/fdset/0,logappend=on",
            "-device",
            "isa-serial,chardev=charserial0,id=serial0",
            "-blockdev",
            &storage,
            "-blockdev",
            &format,
            "-device",
            "virtio-blk-pci,drive=libvirt-1-format,id=virtio-disk0,addr=0x3",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .uid(nobody.uid.as_raw())
        .gid(kvm.gid())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry-qemu");
    // Only the child holds the pipe's write end now: EOF when it exits.
    drop(log_w);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut log = std::fs::File::from(log_r);
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = log.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let mut logged = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !String::from_utf8_lossy(&logged).contains("dirtier: ready") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(bytes) => logged.extend(bytes),
            Err(e) => {
                let _ = child.kill();
                let mut err = String::new();
                let _ = child.stderr.take().map(|mut s| s.read_to_string(&mut err));
                panic!(
                    "no 'dirtier: ready' in the log pipe ({e}); ferry-qemu: {:?}\n{err}\nlog: {}",
                    child.wait(),
                    String::from_utf8_lossy(&logged)
                );
            }
        }
    }
    let q = Qemu { child, qmp };
    wait_for_serial(&out_path, "dirtier: ready");
    let mut qm = Qmp::connect(&q.qmp);
    let blocks = qm.ok("query-block", json!({}));
    assert_eq!(
        blocks[0]["inserted"]["image"]["virtual-size"],
        16 << 20,
        "{blocks}"
    );
    assert_eq!(blocks[0]["inserted"]["file"], "/dev/fdset/2", "{blocks}");
    // More passes, then the disk oracle (the dump goes to `run`).
    qm.ok("stop", json!({}));
    qm.wait_event("STOP", None);
    run_a_while(&mut qm, &out_path);
    disk_oracle(&mut qm, &run, &image, "fdset-disk");
}

/// A TCP port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Waits until `query-status` says `want`.
fn wait_status(q: &mut Qmp, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = q.status();
        if s == want {
            return;
        }
        assert!(Instant::now() < deadline, "status stays {s}, not {want}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `status` of every MIGRATION event kept so far, in order.
fn migration_statuses(q: &Qmp) -> Vec<String> {
    q.events
        .iter()
        .filter(|e| e["event"] == "MIGRATION")
        .filter_map(|e| e["data"]["status"].as_str().map(str::to_string))
        .collect()
}

/// Boots the dirtier in a fresh ferry-qemu and lets it run until its working
/// set and fill are in place.
fn running_source(d: &Path, tag: &str, kernel: &Path) -> (Qemu, Qmp) {
    let a = spawn_guest(d, tag, kernel, &[]);
    let mut q = Qmp::connect(&a.qmp);
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    q.ok("cont", json!({}));
    q.wait_event("RESUME", None);
    wait_for_serial(&d.join(format!("{tag}.serial")), "dirtier: ready");
    (a, q)
}

/// Polls `query-migrate` on the source until the migration ends; checks the
/// QEMU shape on the way and returns the last reply.
fn poll_until_done(q: &mut Qmp) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut saw_active = false;
    loop {
        let info = q.ok("query-migrate", json!({}));
        assert!(
            info.get("blocked-reasons")
                .is_none_or(|b| b.as_array().is_some_and(Vec::is_empty)),
            "{info}"
        );
        match info["status"].as_str().expect("status") {
            "completed" | "failed" | "cancelled" => {
                assert!(saw_active || info["status"] != "completed", "{info}");
                return info;
            }
            "active" => {
                saw_active = true;
                assert_eq!(info["ram"]["total"], json!(MEM), "{info}");
                assert_eq!(info["ram"]["page-size"], json!(4096), "{info}");
                for k in ["total-time", "setup-time", "expected-downtime"] {
                    assert!(info[k].is_u64(), "{k} in {info}");
                }
            }
            "setup" | "pre-switchover" | "device" | "cancelling" => {}
            other => panic!("unexpected status {other}: {info}"),
        }
        assert!(Instant::now() < deadline, "migration never ended: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The QEMU shape of a completed outgoing migration's `query-migrate`.
fn check_completed(info: &Value) {
    assert_eq!(info["status"], "completed", "{info}");
    for k in [
        "total-time",
        "setup-time",
        "downtime",
        "cpu-throttle-percentage",
    ] {
        assert!(info[k].is_u64(), "{k} in {info}");
    }
    let ram = &info["ram"];
    for k in [
        "transferred",
        "remaining",
        "total",
        "duplicate",
        "skipped",
        "normal",
        "normal-bytes",
        "dirty-pages-rate",
        "dirty-sync-count",
        "page-size",
        "pages-per-second",
        "precopy-bytes",
        "downtime-bytes",
        "postcopy-bytes",
        "multifd-bytes",
        "postcopy-requests",
    ] {
        assert!(ram[k].is_u64(), "ram.{k} in {info}");
    }
    assert!(ram["mbps"].is_number(), "{info}");
    assert_eq!(ram["remaining"], 0, "{info}");
    assert_eq!(ram["total"], json!(MEM), "{info}");
    // The fill alone is 64 MiB of non-zero pages.
    assert!(ram["normal-bytes"].as_u64() > Some(32 << 20), "{info}");
    assert!(
        ram["transferred"].as_u64()
            == Some(
                ram["precopy-bytes"].as_u64().unwrap_or(0)
                    + ram["downtime-bytes"].as_u64().unwrap_or(0)
            ),
        "{info}"
    );
    assert!(
        info["downtime"].as_u64() <= info["total-time"].as_u64(),
        "{info}"
    );
}

/// Both dumps pass the oracle and are the same bytes (the source stays
/// stopped in `postmigrate`, the destination stopped by `-S`).
fn same_memory(src: &mut Qmp, dst: &mut Qmp, dir: &Path, tag: &str) -> OracleReport {
    let (a, b) = (
        dir.join(format!("{tag}-src.raw")),
        dir.join(format!("{tag}-dst.raw")),
    );
    let ra = src.oracle(&a);
    let rb = dst.oracle(&b);
    assert_eq!((ra.passes, ra.cursor), (rb.passes, rb.cursor));
    assert!(
        std::fs::read(&a).expect("src dump") == std::fs::read(&b).expect("dst dump"),
        "guest RAM differs between source and destination"
    );
    rb
}

/// Live migration between two ferry-qemu processes driven over QMP by hand:
/// A → B over TCP (`-incoming defer` + `migrate-incoming`), then B → C over a
/// unix socket (`-incoming unix:` on the command line); `query-migrate` is
/// polled to `completed`, events come in QEMU's order, the destination stays
/// paused under `-S` until `cont`, and the memory oracle passes on both sides.
#[test]
fn live_migration_tcp_then_unix_keeps_the_running_guest() {
    let name = "live_migration_tcp_then_unix_keeps_the_running_guest";
    if !kvm_usable(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");

    let (_a, mut qa) = running_source(d, "a", &kernel);
    assert_eq!(qa.ok("query-migrate", json!({})), json!({}));
    let b = spawn_guest(d, "b", &kernel, &["-incoming", "defer"]);
    let mut qb = Qmp::connect(&b.qmp);
    assert_eq!(qb.status(), "inmigrate");
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    qb.ok("migrate-incoming", json!({"uri": uri}));
    // Listening when the command returns, as libvirt expects.
    qb.wait_event("MIGRATION", Some("setup"));

    qa.ok("migrate", json!({"uri": uri}));
    // `setup` reaches the client before the reply (libvirt looks right after).
    assert_eq!(migration_statuses(&qa), ["setup"]);
    let info = poll_until_done(&mut qa);
    check_completed(&info);
    qa.wait_event("MIGRATION", Some("completed"));
    // (wait_event took `completed` out of the list.)
    assert_eq!(migration_statuses(&qa), ["setup", "active", "device"]);
    let stop = qa.events.iter().position(|e| e["event"] == "STOP");
    let device = qa
        .events
        .iter()
        .position(|e| e["data"]["status"] == "device");
    assert!(
        stop.is_some() && stop < device,
        "STOP before device: {:?}",
        qa.events
    );
    assert!(qa
        .events
        .iter()
        .any(|e| e["event"] == "MIGRATION_PASS" && e["data"]["pass"] == 1));
    assert_eq!(qa.status(), "postmigrate");
    eprintln!(
        "tcp: total-time {} ms, downtime {} ms, setup-time {} ms, {} MB, {} passes",
        info["total-time"],
        info["downtime"],
        info["setup-time"],
        info["ram"]["transferred"].as_u64().unwrap_or(0) >> 20,
        info["ram"]["dirty-sync-count"]
    );

    qb.wait_event("MIGRATION", Some("completed"));
    assert_eq!(
        qb.events
            .iter()
            .filter(|e| e["event"] == "MIGRATION")
            .map(|e| e["data"]["status"].as_str().unwrap_or_default())
            .collect::<Vec<_>>(),
        ["active"]
    );
    assert_eq!(qb.status(), "paused");
    assert_eq!(qb.ok("query-migrate", json!({}))["status"], "completed");
    let r1 = same_memory(&mut qa, &mut qb, d, "ab");
    // The source is done: libvirt kills it.
    drop(qa);
    drop(_a);

    // B runs on, then goes to C over a unix socket C listens on from startup.
    qb.events.clear();
    qb.ok("cont", json!({}));
    qb.wait_event("RESUME", None);
    let before = serial_len(&d.join("b.serial"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while serial_len(&d.join("b.serial")) <= before + 20 {
        assert!(Instant::now() < deadline, "B does not run");
        std::thread::sleep(Duration::from_millis(50));
    }
    let sock = d.join("c.migrate");
    let c = spawn_guest(
        d,
        "c",
        &kernel,
        &["-incoming", &format!("unix:{}", sock.display())],
    );
    let mut qc = Qmp::connect(&c.qmp);
    assert_eq!(qc.status(), "inmigrate");
    qb.ok(
        "migrate",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    let info = poll_until_done(&mut qb);
    check_completed(&info);
    eprintln!(
        "unix: total-time {} ms, downtime {} ms, {} MB",
        info["total-time"],
        info["downtime"],
        info["ram"]["transferred"].as_u64().unwrap_or(0) >> 20
    );
    wait_status(&mut qc, "paused");
    let r2 = same_memory(&mut qb, &mut qc, d, "bc");
    assert!(
        (r2.passes, r2.cursor) > (r1.passes, r1.cursor),
        "the guest did not go on between the migrations: {r1:?} then {r2:?}"
    );
    run_a_while(&mut qc, &d.join("c.serial"));
    let r3 = qc.oracle(&d.join("c1.raw"));
    assert!((r3.passes, r3.cursor) > (r2.passes, r2.cursor));
}

/// The QMP conversation of a libvirt 9.0 live migration (as recorded between
/// two libvirt hosts running QEMU 7.2), replayed by hand: destination `-incoming defer` +
/// `migrate-incoming tcp:[::]:PORT`, source `getfd migrate` with a socket the
/// "libvirtd" (this test) connected + `migrate fd:migrate`,
/// pause-before-switchover answered by `migrate-continue`, then `cont` on the
/// destination once it reports `completed`.
#[test]
fn libvirt_migration_conversation_replayed() {
    let name = "libvirt_migration_conversation_replayed";
    if !kvm_usable(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let (_a, mut src) = running_source(d, "a", &kernel);

    // Prepare (destination): the start sequence, then the migration setup.
    let b = spawn_guest(d, "b", &kernel, &["-incoming", "defer"]);
    let mut dst = Qmp::connect(&b.qmp);
    let caps = dst.ok("query-migrate-capabilities", json!({}));
    assert!(caps.as_array().is_some_and(|c| c
        .iter()
        .any(|c| c["capability"] == "pause-before-switchover")));
    dst.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    for cmd in [
        "query-chardev",
        "query-hotpluggable-cpus",
        "query-cpus-fast",
        "query-iothreads",
    ] {
        dst.ok(cmd, json!({}));
    }
    let saved_params = dst.ok("query-migrate-parameters", json!({}));
    dst.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "pause-before-switchover", "state": false},
            {"capability": "late-block-activate", "state": true},
            {"capability": "return-path", "state": true},
        ]}),
    );
    dst.ok(
        "migrate-set-parameters",
        json!({"tls-creds": "", "tls-hostname": ""}),
    );
    let port = free_port();
    let any = if Path::new("/proc/sys/net/ipv6").exists() {
        "[::]"
    } else {
        "0.0.0.0"
    };
    dst.ok(
        "migrate-incoming",
        json!({"uri": format!("tcp:{any}:{port}")}),
    );
    assert_eq!(migration_statuses(&dst), ["setup"]);

    // Begin + Perform (source).
    src.ok("query-block", json!({}));
    assert_eq!(src.ok("query-migrate", json!({})), json!({}));
    src.ok("query-migrate-parameters", json!({}));
    src.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "pause-before-switchover", "state": true},
            {"capability": "late-block-activate", "state": false},
            {"capability": "return-path", "state": true},
        ]}),
    );
    src.ok(
        "migrate-set-parameters",
        json!({"tls-creds": "", "tls-hostname": "", "max-bandwidth": 9_223_372_036_853_727_232u64}),
    );
    let sock = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to dst");
    let r = src.cmd_with_fd(
        "getfd",
        json!({"fdname": "migrate"}),
        Some(sock.as_raw_fd()),
    );
    assert_eq!(r["return"], json!({}), "{r}");
    drop(sock);
    src.ok(
        "migrate",
        json!({"detach": true, "resume": false, "uri": "fd:migrate"}),
    );
    assert_eq!(migration_statuses(&src), ["setup"]);
    src.wait_event("MIGRATION", Some("active"));
    src.wait_event("STOP", None);
    src.wait_event("MIGRATION", Some("pre-switchover"));
    assert_eq!(src.status(), "finish-migrate");
    let info = src.ok("query-migrate", json!({}));
    assert_eq!(info["status"], "pre-switchover", "{info}");
    // Waits here until told: nothing completes on its own.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        src.ok("query-migrate", json!({}))["status"],
        "pre-switchover"
    );
    let wrong = src.cmd_with_fd("migrate-continue", json!({"state": "active"}), None);
    assert!(wrong["error"]["desc"]
        .as_str()
        .is_some_and(|e| e.contains("Migration not in expected state: pre-switchover")));
    src.ok("migrate-continue", json!({"state": "pre-switchover"}));
    src.wait_event("MIGRATION", Some("device"));
    src.wait_event("MIGRATION", Some("completed"));
    let info = src.ok("query-migrate", json!({}));
    check_completed(&info);
    assert!(src.events.iter().any(|e| e["event"] == "MIGRATION_PASS"));
    eprintln!(
        "libvirt replay: total-time {} ms, downtime {} ms (from migrate-continue)",
        info["total-time"], info["downtime"]
    );

    // Finish (destination): completed, then libvirt's checks and `cont`.
    dst.wait_event("MIGRATION", Some("completed"));
    assert_eq!(dst.status(), "paused");
    same_memory(&mut src, &mut dst, d, "replay");
    // Confirm (source): libvirt kills it.
    drop(src);
    drop(_a);
    dst.ok("query-chardev", json!({}));
    dst.ok("qom-list", json!({"path": "/machine/peripheral"}));
    dst.ok("query-block", json!({}));
    dst.ok("cont", json!({}));
    dst.wait_event("RESUME", None);
    dst.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "pause-before-switchover", "state": false},
            {"capability": "late-block-activate", "state": false},
            {"capability": "return-path", "state": false},
        ]}),
    );
    dst.ok(
        "migrate-set-parameters",
        json!({
            "max-bandwidth": saved_params["max-bandwidth"],
            "downtime-limit": saved_params["downtime-limit"],
            "tls-creds": "", "tls-hostname": "",
        }),
    );
    assert_eq!(dst.status(), "running");
    let before = serial_len(&d.join("b.serial"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while serial_len(&d.join("b.serial")) <= before + 20 {
        assert!(Instant::now() < deadline, "the destination does not run");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Cancel (while pages flow, and while waiting in pre-switchover) leaves the
/// source running with status `cancelled`; `migrate-set-parameters` steers a
/// migration in flight: a downtime limit of 0 never converges, a bandwidth
/// cap shows in `mbps`, and raising the limit lets it complete.
#[test]
fn live_migration_cancel_and_parameters_in_flight() {
    let name = "live_migration_cancel_and_parameters_in_flight";
    if !kvm_usable(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let (_a, mut src) = running_source(d, "a", &kernel);
    let serial = d.join("a.serial");

    let destination = |tag: &str| -> (Qemu, Qmp, String) {
        let port = free_port();
        let uri = format!("tcp:127.0.0.1:{port}");
        let q = spawn_guest(d, tag, &kernel, &["-incoming", &uri]);
        let mut qmp = Qmp::connect(&q.qmp);
        assert_eq!(qmp.status(), "inmigrate");
        (q, qmp, uri)
    };
    let still_runs = |src: &mut Qmp| {
        assert_eq!(src.status(), "running");
        let before = serial_len(&serial);
        let deadline = Instant::now() + Duration::from_secs(60);
        while serial_len(&serial) <= before + 20 {
            assert!(Instant::now() < deadline, "the source stopped running");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // 1. Cancel while the first pass crawls at 8 MiB/s.
    let (mut b, _qb, uri) = destination("b");
    src.ok("migrate-set-parameters", json!({"max-bandwidth": 8 << 20}));
    src.ok("migrate", json!({"uri": uri}));
    src.wait_event("MIGRATION", Some("active"));
    std::thread::sleep(Duration::from_millis(500));
    let info = src.ok("query-migrate", json!({}));
    assert_eq!(info["status"], "active", "{info}");
    let sent = info["ram"]["transferred"].as_u64().unwrap_or(0);
    assert!(sent < 16 << 20, "8 MiB/s cap ignored: {info}");
    let busy = src.cmd_with_fd("migrate", json!({"uri": uri}), None);
    assert!(busy["error"]["desc"]
        .as_str()
        .is_some_and(|e| e.contains("in progress")));
    src.ok("migrate_cancel", json!({}));
    src.wait_event("MIGRATION", Some("cancelling"));
    src.wait_event("MIGRATION", Some("cancelled"));
    let info = src.ok("query-migrate", json!({}));
    assert_eq!(info["status"], "cancelled", "{info}");
    assert!(!src.events.iter().any(|e| e["event"] == "STOP"));
    still_runs(&mut src);
    // The destination gives up, like QEMU's (libvirt kills it anyway).
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(st) = b.child.try_wait().expect("wait") {
            break st.code();
        }
        assert!(Instant::now() < deadline, "the destination lingers");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(1));

    // 2. Cancel while waiting in pre-switchover: the guest resumes.
    let (_c, _qc, uri) = destination("c");
    src.events.clear();
    src.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]}),
    );
    src.ok("migrate-set-parameters", json!({"max-bandwidth": 0}));
    src.ok("migrate", json!({"uri": uri}));
    src.wait_event("STOP", None);
    src.wait_event("MIGRATION", Some("pre-switchover"));
    src.ok("migrate_cancel", json!({}));
    src.wait_event("RESUME", None);
    src.wait_event("MIGRATION", Some("cancelled"));
    assert_eq!(migration_statuses(&src), ["setup", "active", "cancelling"]);
    still_runs(&mut src);

    // 3. Parameters in flight: a downtime limit of 0 never converges; a
    // generous limit set mid-migration lets it finish. (A new max-bandwidth
    // is taken at the engine's next pass.)
    let (_e, mut qe, uri) = destination("e");
    src.events.clear();
    src.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "pause-before-switchover", "state": false}]}),
    );
    src.ok("migrate-set-parameters", json!({"downtime-limit": 0}));
    src.ok("migrate", json!({"uri": uri}));
    for _ in 0..3 {
        src.wait_event("MIGRATION_PASS", None);
    }
    let info = src.ok("query-migrate", json!({}));
    assert_eq!(info["status"], "active", "{info}");
    assert!(
        info["ram"]["dirty-sync-count"].as_u64() >= Some(3),
        "{info}"
    );
    src.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1u64 << 30, "downtime-limit": 60_000}),
    );
    let info = poll_until_done(&mut src);
    check_completed(&info);
    eprintln!(
        "in flight: total-time {} ms, downtime {} ms, {} passes, throttle {}%",
        info["total-time"],
        info["downtime"],
        info["ram"]["dirty-sync-count"],
        info["cpu-throttle-percentage"]
    );
    assert_eq!(src.status(), "postmigrate");
    wait_status(&mut qe, "paused");
    same_memory(&mut src, &mut qe, d, "inflight");
    let _ = b.child.kill();
}

/// `stop` and `cont` during a live migration, as `virsh suspend`/`resume` send
/// them: the guest stops (no heartbeats, STOP, `paused`) while pages still flow,
/// runs again on `cont`; stopped and cancelled, it stays stopped until `cont`;
/// stopped and completed, it arrives stopped with its memory intact.
#[test]
fn stop_and_cont_during_a_live_migration() {
    let name = "stop_and_cont_during_a_live_migration";
    if !kvm_usable(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let (_a, mut src) = running_source(d, "a", &kernel);
    let serial = d.join("a.serial");
    let grows = |expect: bool| {
        let before = serial_len(&serial);
        std::thread::sleep(Duration::from_millis(300));
        let grew = serial_len(&serial) > before;
        assert_eq!(
            grew,
            expect,
            "heartbeats while the guest should be {}",
            if expect { "running" } else { "stopped" }
        );
    };
    let destination = |tag: &str| -> (Qemu, String) {
        let uri = format!("tcp:127.0.0.1:{}", free_port());
        let q = spawn_guest(d, tag, &kernel, &["-incoming", &uri]);
        Qmp::connect(&q.qmp);
        (q, uri)
    };

    // 1. Stop and cont while the first pass crawls; then cancel while stopped.
    let (_b, uri) = destination("b");
    src.ok("migrate-set-parameters", json!({"max-bandwidth": 8 << 20}));
    src.ok("migrate", json!({"uri": uri}));
    src.wait_event("MIGRATION", Some("active"));
    src.ok("stop", json!({}));
    src.wait_event("STOP", None);
    assert_eq!(src.status(), "paused");
    grows(false);
    // Pages still flow (counted per 8 MiB batch: one a second at this cap).
    let sent = src.ok("query-migrate", json!({}))["ram"]["transferred"].as_u64();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = src.ok("query-migrate", json!({}));
        assert_eq!(info["status"], "active", "{info}");
        if info["ram"]["transferred"].as_u64() > sent {
            break;
        }
        assert!(Instant::now() < deadline, "pages stopped flowing: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
    src.ok("cont", json!({}));
    src.wait_event("RESUME", None);
    assert_eq!(src.status(), "running");
    grows(true);
    src.ok("stop", json!({}));
    src.wait_event("STOP", None);
    src.ok("migrate_cancel", json!({}));
    src.wait_event("MIGRATION", Some("cancelled"));
    assert_eq!(src.status(), "paused");
    grows(false);
    assert!(!src.events.iter().any(|e| e["event"] == "RESUME"));
    src.ok("cont", json!({}));
    src.wait_event("RESUME", None);
    grows(true);

    // 2. Stopped during the migration, it completes and arrives stopped.
    let (c, uri) = destination("c");
    src.events.clear();
    src.ok("migrate-set-parameters", json!({"max-bandwidth": 64 << 20}));
    src.ok("migrate", json!({"uri": uri}));
    src.wait_event("MIGRATION", Some("active"));
    src.ok("stop", json!({}));
    src.wait_event("STOP", None);
    src.ok("migrate-set-parameters", json!({"max-bandwidth": 0}));
    src.wait_event("MIGRATION", Some("completed"));
    assert_eq!(
        src.events.iter().filter(|e| e["event"] == "STOP").count(),
        0,
        "a second STOP at the switch-over"
    );
    assert_eq!(src.status(), "postmigrate");
    let mut dst = Qmp::connect(&c.qmp);
    wait_status(&mut dst, "paused");
    same_memory(&mut src, &mut dst, d, "stopped");
}

/// Connections a destination accepted on TCP `port` that are open now:
/// ESTABLISHED sockets whose local port it is (/proc/net/tcp and tcp6).
fn tcp_accepted(port: u16) -> usize {
    let want = format!(":{port:04X}");
    let open = |l: &&str| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "01"
    };
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|text| text.lines().skip(1).filter(open).count())
        .sum()
}

/// Connections a destination accepted on the unix socket `path` that are
/// open now: connected sockets bound to it (/proc/net/unix).
fn unix_accepted(path: &Path) -> usize {
    let path = path.display().to_string();
    std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 7 && f[5] == "03" && f[7] == path
        })
        .count()
}

/// libvirt 9.0's `virsh migrate --live --parallel --parallel-connections N`,
/// one side: the capabilities ferry-qemu lists, set as libvirt sets them
/// (pause-before-switchover on the source, late-block-activate on the
/// destination, multifd and return-path on both), then the parameters.
fn parallel_setup(q: &mut Qmp, source: bool, channels: u32, extra: Value) {
    let caps = q.ok("query-migrate-capabilities", json!({}));
    assert!(
        caps.as_array()
            .is_some_and(|c| c.iter().any(|c| c["capability"] == "multifd")),
        "multifd is not listed: {caps}"
    );
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "pause-before-switchover", "state": source},
            {"capability": "late-block-activate", "state": !source},
            {"capability": "multifd", "state": true},
            {"capability": "return-path", "state": true},
        ]}),
    );
    let mut params = json!({"tls-creds": "", "tls-hostname": "", "multifd-channels": channels});
    if let (Some(p), Some(x)) = (params.as_object_mut(), extra.as_object()) {
        p.extend(x.clone());
    }
    q.ok("migrate-set-parameters", params);
    assert_eq!(
        q.ok("query-migrate-parameters", json!({}))["multifd-channels"],
        channels
    );
}

/// A multifd migration from `src` whose destination already listens: waits
/// in pre-switchover, checks there that `accepted()` connections are open (the
/// page streams) and that query-migrate sums them, then lets it complete.
fn parallel_migrate(src: &mut Qmp, uri: &str, channels: usize, accepted: &dyn Fn() -> usize) {
    src.events.clear();
    src.ok(
        "migrate",
        json!({"detach": true, "resume": false, "uri": uri}),
    );
    src.wait_event("MIGRATION", Some("active"));
    src.wait_event("MIGRATION", Some("pre-switchover"));
    assert_eq!(accepted(), channels, "page streams open at pre-switchover");
    let info = src.ok("query-migrate", json!({}));
    let ram = &info["ram"];
    // Totals over every stream: the main connection alone carries 1/N of
    // the pages.
    assert!(
        ram["transferred"].as_u64() >= ram["normal-bytes"].as_u64()
            && ram["normal-bytes"].as_u64() > Some(32 << 20),
        "{info}"
    );
    assert_eq!(ram["multifd-bytes"], ram["transferred"], "{info}");
    src.ok("migrate-continue", json!({"state": "pre-switchover"}));
    src.wait_event("MIGRATION", Some("completed"));
    let info = src.ok("query-migrate", json!({}));
    check_completed(&info);
    assert_eq!(info["ram"]["multifd-bytes"], info["ram"]["transferred"]);
    eprintln!(
        "multifd {uri} ({channels} streams): total-time {} ms, downtime {} ms, {} MB",
        info["total-time"],
        info["downtime"],
        info["ram"]["transferred"].as_u64().unwrap_or(0) >> 20
    );
}

/// `virsh migrate --parallel` as libvirt 9.0 drives QEMU 7.2, by hand: the
/// multifd capability and `multifd-channels` on both sides, `migrate tcp:`
/// (libvirt lets QEMU connect for multifd) with 2 streams, then on to a third
/// process over `unix:` with 4; the page streams are really open (counted in
/// /proc/net), query-migrate reports their totals, and the memory oracle
/// passes on every side.
#[test]
fn multifd_migrations_over_tcp_and_unix() {
    let name = "multifd_migrations_over_tcp_and_unix";
    if !kvm_usable(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let (_a, mut qa) = running_source(d, "a", &kernel);

    // A → B over TCP, 2 streams, libvirt's sequence.
    let b = spawn_guest(d, "b", &kernel, &["-incoming", "defer"]);
    let mut qb = Qmp::connect(&b.qmp);
    qb.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    let saved = qb.ok("query-migrate-parameters", json!({}));
    parallel_setup(&mut qb, false, 2, json!({}));
    let port = free_port();
    let any = if Path::new("/proc/sys/net/ipv6").exists() {
        "[::]"
    } else {
        "0.0.0.0"
    };
    qb.ok(
        "migrate-incoming",
        json!({"uri": format!("tcp:{any}:{port}")}),
    );
    parallel_setup(
        &mut qa,
        true,
        2,
        json!({"max-bandwidth": 9_223_372_036_853_727_232u64}),
    );
    parallel_migrate(&mut qa, &format!("tcp:127.0.0.1:{port}"), 2, &|| {
        tcp_accepted(port)
    });
    qb.wait_event("MIGRATION", Some("completed"));
    assert_eq!(qb.status(), "paused");
    let r1 = same_memory(&mut qa, &mut qb, d, "mfd-ab");
    drop(qa);
    drop(_a);
    // Finish: cont, then libvirt resets what it set.
    qb.ok("cont", json!({}));
    qb.wait_event("RESUME", None);
    qb.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "pause-before-switchover", "state": false},
            {"capability": "late-block-activate", "state": false},
            {"capability": "multifd", "state": false},
            {"capability": "return-path", "state": false},
        ]}),
    );
    qb.ok(
        "migrate-set-parameters",
        json!({
            "max-bandwidth": saved["max-bandwidth"],
            "downtime-limit": saved["downtime-limit"],
            "multifd-channels": saved["multifd-channels"],
            "tls-creds": "", "tls-hostname": "",
        }),
    );
    assert_eq!(
        qb.ok("query-migrate-parameters", json!({}))["multifd-channels"],
        2
    );
    let before = serial_len(&d.join("b.serial"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while serial_len(&d.join("b.serial")) <= before + 20 {
        assert!(Instant::now() < deadline, "B does not run");
        std::thread::sleep(Duration::from_millis(50));
    }

    // B → C over a unix socket, 4 streams.
    let c = spawn_guest(d, "c", &kernel, &["-incoming", "defer"]);
    let mut qc = Qmp::connect(&c.qmp);
    parallel_setup(&mut qc, false, 4, json!({}));
    let sock = d.join("c.migrate");
    qc.ok(
        "migrate-incoming",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    parallel_setup(&mut qb, true, 4, json!({}));
    parallel_migrate(&mut qb, &format!("unix:{}", sock.display()), 4, &|| {
        unix_accepted(&sock)
    });
    wait_status(&mut qc, "paused");
    let r2 = same_memory(&mut qb, &mut qc, d, "mfd-bc");
    assert!(
        (r2.passes, r2.cursor) > (r1.passes, r1.cursor),
        "the guest did not go on between the migrations: {r1:?} then {r2:?}"
    );
    run_a_while(&mut qc, &d.join("c.serial"));
    qc.oracle(&d.join("mfd-c1.raw"));
}

/// Mismatched multifd settings fail the migration the way QEMU 7.2's do,
/// with the numbers named, and never harm the source: a destination with
/// fewer channels or with multifd off is found out at the handshake (`setup`
/// → `failed`, the guest never stops, the destination gives up); multifd to
/// an `fd:` socket is refused at once. A destination with more channels
/// than the source takes the source's number, and the source, still intact,
/// then migrates.
#[test]
fn multifd_mismatches_fail_and_the_source_runs_on() {
    let name = "multifd_mismatches_fail_and_the_source_runs_on";
    if !kvm_usable(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let (_a, mut src) = running_source(d, "a", &kernel);
    let serial = d.join("a.serial");
    let still_runs = |src: &mut Qmp| {
        assert_eq!(src.status(), "running");
        let before = serial_len(&serial);
        let deadline = Instant::now() + Duration::from_secs(60);
        while serial_len(&serial) <= before + 20 {
            assert!(Instant::now() < deadline, "the source stopped running");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // A destination listening on TCP, multifd on with `channels` or off.
    let destination = |tag: &str, channels: Option<u32>| -> (Qemu, Qmp, u16) {
        let q = spawn_guest(d, tag, &kernel, &["-incoming", "defer"]);
        let mut qmp = Qmp::connect(&q.qmp);
        if let Some(n) = channels {
            parallel_setup(&mut qmp, false, n, json!({}));
        }
        let port = free_port();
        qmp.ok(
            "migrate-incoming",
            json!({"uri": format!("tcp:127.0.0.1:{port}")}),
        );
        (q, qmp, port)
    };
    let gives_up = |q: &mut Qemu| {
        let deadline = Instant::now() + Duration::from_secs(30);
        let code = loop {
            if let Some(st) = q.child.try_wait().expect("wait") {
                break st.code();
            }
            assert!(Instant::now() < deadline, "the destination lingers");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(code, Some(1), "the destination's exit status");
    };
    parallel_setup(&mut src, true, 4, json!({}));

    // 1. The destination takes 2 of the 4 streams, 2. it has multifd off.
    for (tag, channels, took) in [("b", Some(2), 2), ("c", None, 1)] {
        let (mut q, _qmp, port) = destination(tag, channels);
        src.events.clear();
        src.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
        src.wait_event("MIGRATION", Some("failed"));
        assert_eq!(migration_statuses(&src), ["setup"], "{:?}", src.events);
        assert!(!src.events.iter().any(|e| e["event"] == "STOP"));
        let info = src.ok("query-migrate", json!({}));
        assert_eq!(info["status"], "failed", "{info}");
        let e = info["error-desc"].as_str().unwrap_or_default();
        assert!(
            e.contains(&format!("took {took} of the 4 page streams"))
                && e.contains("on both sides"),
            "{info}"
        );
        still_runs(&mut src);
        gives_up(&mut q);
    }

    // 3. multifd to an fd: socket (what libvirt uses without --parallel).
    let (mut q, _qd, port) = destination("d", Some(4));
    let sock = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let r = src.cmd_with_fd(
        "getfd",
        json!({"fdname": "migrate"}),
        Some(sock.as_raw_fd()),
    );
    assert_eq!(r["return"], json!({}), "{r}");
    drop(sock);
    let r = src.cmd_with_fd("migrate", json!({"uri": "fd:migrate"}), None);
    let e = r["error"]["desc"].as_str().unwrap_or_default();
    assert!(
        e.starts_with("multifd is not supported by current protocol"),
        "{r}"
    );
    assert_eq!(src.ok("query-migrate", json!({}))["status"], "failed");
    still_runs(&mut src);
    let _ = q.child.kill();

    // 4. The source offers 2, the destination takes up to 4: 2 streams.
    let (_e, mut qe, port) = destination("e", Some(4));
    parallel_setup(&mut src, true, 2, json!({}));
    parallel_migrate(&mut src, &format!("tcp:127.0.0.1:{port}"), 2, &|| {
        tcp_accepted(port)
    });
    wait_status(&mut qe, "paused");
    same_memory(&mut src, &mut qe, d, "mfd-mismatch");
}

/// An error reply's description.
fn error_desc(q: &mut Qmp, name: &str, args: Value) -> String {
    let reply = q.cmd_with_fd(name, args, None);
    reply["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} did not fail: {reply}"))
        .to_string()
}

/// Encrypted migration between two ferry-qemu driven over QMP the way libvirt's
/// `virsh migrate --tls` drives QEMU: `object-add tls-creds-x509` (server
/// credentials on the destination, client ones on the source),
/// `migrate-set-parameters tls-creds/tls-hostname`, a socket libvirtd connected
/// handed over with `getfd` and `migrate fd:`. A source whose certificate another
/// CA signed is refused before any page moves and runs on; the destination keeps
/// waiting and then takes the real source; the oracle passes on both sides.
#[test]
fn tls_migration_with_x509_objects_refuses_a_stranger_first() {
    let name = "tls_migration_with_x509_objects_refuses_a_stranger_first";
    if !kvm_usable(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let ca = Ca::new(&d.join("ca"), "ferry test CA");
    let server = ca.issue(&d.join("server"), "server", "hostb", &["hostb.example"]);
    let client = ca.issue(&d.join("client"), "client", "hosta", &[]);
    let rogue = Ca::new(&d.join("rogue-ca"), "rogue CA");
    let stranger = rogue.issue(&d.join("stranger"), "client", "hosta", &[]);
    std::fs::copy(server.join("ca-cert.pem"), stranger.join("ca-cert.pem")).expect("copy CA");
    let x509 = |id: &str, dir: &Path, endpoint: &str| {
        json!({"qom-type": "tls-creds-x509", "id": id, "dir": dir.to_str().expect("utf-8"),
               "endpoint": endpoint, "verify-peer": true})
    };

    let (_a, mut qa) = running_source(d, "a", &kernel);
    let b = spawn_guest(d, "b", &kernel, &["-incoming", "defer"]);
    let mut qb = Qmp::connect(&b.qmp);
    let types = qb.ok("qom-list-types", json!({}));
    assert!(
        types
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["name"] == "tls-creds-x509")),
        "libvirt's --tls needs tls-creds-x509 listed: {types}"
    );
    // libvirt 9.0's form: the properties nested in `props`.
    qb.ok(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "objlibvirt_migrate_tls0",
               "props": {"dir": server.to_str().expect("utf-8"), "endpoint": "server",
                         "verify-peer": true}}),
    );
    qb.ok(
        "migrate-set-parameters",
        json!({"tls-creds": "objlibvirt_migrate_tls0", "tls-hostname": ""}),
    );
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    qb.ok("migrate-incoming", json!({"uri": uri}));
    qb.wait_event("MIGRATION", Some("setup"));

    // Mistakes are named, and leave nothing behind.
    let err = error_desc(
        &mut qa,
        "object-add",
        x509("c", &d.join("nowhere"), "client"),
    );
    assert!(
        err.contains("nowhere/ca-cert.pem") && err.contains("No such file"),
        "{err}"
    );
    let err = error_desc(
        &mut qa,
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "c", "endpoint": "client"}),
    );
    assert_eq!(err, "Missing 'dir' property value");
    let err = error_desc(
        &mut qa,
        "object-add",
        json!({"qom-type": "secret", "id": "s"}),
    );
    assert!(err.contains("'secret' is not supported"), "{err}");
    let err = error_desc(&mut qa, "object-del", json!({"id": "c"}));
    assert_eq!(err, "object 'c' not found");
    // Server credentials cannot start an outgoing migration.
    qa.ok("object-add", x509("wrong-end", &server, "server"));
    qa.ok("migrate-set-parameters", json!({"tls-creds": "wrong-end"}));
    let err = error_desc(&mut qa, "migrate", json!({"uri": uri}));
    assert_eq!(err, "Expected TLS credentials for a client endpoint");
    qa.ok("object-del", json!({"id": "wrong-end"}));

    // The stranger.
    qa.ok(
        "object-add",
        x509("objlibvirt_migrate_tls0", &stranger, "client"),
    );
    let err = error_desc(
        &mut qa,
        "object-add",
        x509("objlibvirt_migrate_tls0", &client, "client"),
    );
    assert!(err.contains("duplicate"), "{err}");
    qa.ok(
        "migrate-set-parameters",
        json!({"tls-creds": "objlibvirt_migrate_tls0", "tls-hostname": "hostb.example"}),
    );
    qa.ok("migrate", json!({"uri": uri}));
    let info = poll_until_done(&mut qa);
    assert_eq!(info["status"], "failed", "{info}");
    let why = info["error-desc"].as_str().unwrap_or_default();
    assert!(why.contains("refused the TLS session"), "{info}");
    assert_eq!(
        info["ram"]["transferred"].as_u64().unwrap_or(0),
        0,
        "{info}"
    );
    eprintln!("stranger refused: {why}");
    assert_eq!(qa.status(), "running");
    assert_eq!(qb.status(), "inmigrate");

    // The real source, over a socket "libvirtd" connected, as libvirt does.
    qa.ok("object-del", json!({"id": "objlibvirt_migrate_tls0"}));
    qa.ok(
        "object-add",
        x509("objlibvirt_migrate_tls0", &client, "client"),
    );
    let params = qa.ok("query-migrate-parameters", json!({}));
    assert_eq!(params["tls-creds"], "objlibvirt_migrate_tls0", "{params}");
    assert_eq!(params["tls-hostname"], "hostb.example", "{params}");
    let sock = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to dst");
    let r = qa.cmd_with_fd(
        "getfd",
        json!({"fdname": "migrate"}),
        Some(sock.as_raw_fd()),
    );
    assert_eq!(r, json!({"return": {}}));
    drop(sock);
    qa.ok("migrate", json!({"uri": "fd:migrate"}));
    let info = poll_until_done(&mut qa);
    check_completed(&info);
    eprintln!(
        "tls: total-time {} ms, downtime {} ms, {} MB",
        info["total-time"],
        info["downtime"],
        info["ram"]["transferred"].as_u64().unwrap_or(0) >> 20
    );
    qb.wait_event("MIGRATION", Some("completed"));
    wait_status(&mut qb, "paused");
    same_memory(&mut qa, &mut qb, d, "tls");
    // libvirt's clean-up.
    qa.ok("object-del", json!({"id": "objlibvirt_migrate_tls0"}));
    qa.ok(
        "migrate-set-parameters",
        json!({"tls-creds": "", "tls-hostname": ""}),
    );
}

/// A raw disk typed by hand (`-drive` + `-device virtio-blk-pci`) on the
/// source and in libvirt's JSON `-blockdev` form on the destinations, on the
/// same image file (shared storage): `query-block`, `query-named-block-nodes`
/// and `qom-list` describe it as QEMU 7.2 does; a destination without the
/// disk refuses the stream naming the source's virtio-blk device (the engine
/// has it) and the source runs on; a destination with it takes the guest.
/// Then a save to `file:` restores with the disk (`-incoming file:`), and is
/// refused without it. The dirtier's virtio-blk driver (`blk=8`) finds the
/// disk and writes a record per pass: the disk oracle checks the image
/// against the guest's pass count after the migration and after the restore.
#[test]
fn raw_disk_by_hand_and_libvirt_form_migrates_with_shared_storage() {
    let name = "raw_disk_by_hand_and_libvirt_form_migrates_with_shared_storage";
    if !kvm_usable(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let image = d.join("disk.raw");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("image");
    let img = image.display().to_string();

    let drive = format!("file={img},format=raw,if=none,id=drive0,cache=none");
    // The dirtier writes a record per pass to its first BLK_K sectors.
    let append = format!("ws=16M fill=1 blk={BLK_K}");
    let a = spawn_guest(
        d,
        "a",
        &kernel,
        &[
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=drive0,id=disk0",
            "-append",
            &append,
        ],
    );
    let mut qa = Qmp::connect(&a.qmp);
    let blocks = qa.ok("query-block", json!({}));
    assert_eq!(blocks.as_array().map(Vec::len), Some(1), "{blocks}");
    let b0 = &blocks[0];
    assert_eq!(b0["device"], "drive0", "{b0}");
    assert_eq!(b0["qdev"], "/machine/peripheral/disk0/virtio-backend");
    assert_eq!(b0["removable"], false);
    let ins = &b0["inserted"];
    assert_eq!(
        (&ins["drv"], &ins["ro"], &ins["file"]),
        (&json!("raw"), &json!(false), &json!(img))
    );
    assert_eq!(ins["image"]["virtual-size"], json!(16 << 20), "{ins}");
    assert_eq!(ins["image"]["format"], "raw");
    let nodes = qa.ok("query-named-block-nodes", json!({"flat": true}));
    assert_eq!(
        nodes
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| n["drv"].as_str().unwrap_or_default())
            .collect::<Vec<_>>(),
        ["raw", "file"],
        "{nodes}"
    );
    let stats = qa.ok("query-blockstats", json!({}));
    assert_eq!(stats[0]["device"], "drive0", "{stats}");
    assert_eq!(stats[0]["qdev"], b0["qdev"], "{stats}");
    assert_eq!(stats[0]["parent"]["node-name"], nodes[1]["node-name"]);
    assert_eq!(stats[0]["stats"]["wr_operations"], 0, "{stats}");
    let peripheral = qa.ok("qom-list", json!({"path": "/machine/peripheral"}));
    assert!(
        peripheral
            .as_array()
            .expect("list")
            .iter()
            .any(|p| p["name"] == "disk0" && p["type"] == "child<virtio-blk-pci>"),
        "{peripheral}"
    );
    // Storage migration and hotplug are absent, so libvirt knows; the NBD
    // server libvirt's --copy-storage-all starts first says why.
    let r = qa.cmd_with_fd(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "::", "port": "49153"}}}),
        None,
    );
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert!(
        r["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("cannot copy disks during a migration")),
        "{r}"
    );
    let commands = qa.ok("query-commands", json!({}));
    for absent in [
        "block-export-add",
        "blockdev-mirror",
        "blockdev-add",
        "device_add",
        "device_del",
        "netdev_add",
    ] {
        assert!(
            !commands
                .as_array()
                .expect("list")
                .iter()
                .any(|c| c["name"] == absent),
            "{absent} is advertised"
        );
        let r = qa.cmd_with_fd(absent, json!({}), None);
        assert_eq!(r["error"]["class"], "CommandNotFound", "{r}");
    }
    qa.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    qa.ok("cont", json!({}));
    qa.wait_event("RESUME", None);
    let serial = d.join("a.serial");
    wait_for_serial(&serial, "dirtier: ready");
    // The guest's driver found the disk (16 MiB = 32768 sectors).
    wait_for_serial(&serial, "blk: capacity=32768");

    // 1. A destination without the disk: refused, the source runs on.
    let mut b = spawn_guest(d, "b", &kernel, &["-incoming", "defer"]);
    let mut qb = Qmp::connect(&b.qmp);
    let port = free_port();
    qb.ok(
        "migrate-incoming",
        json!({"uri": format!("tcp:127.0.0.1:{port}")}),
    );
    qa.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    qa.wait_event("MIGRATION", Some("failed"));
    let info = qa.ok("query-migrate", json!({}));
    let e = info["error-desc"].as_str().unwrap_or_default();
    // The source is told its own devices, not the destination's.
    assert!(
        e.contains("virtio-blk@03") && e.contains("not configured with this VM's devices"),
        "{info}"
    );
    eprintln!("destination without the disk: {e}");
    assert_eq!(qa.status(), "running");
    let before = serial_len(&serial);
    let deadline = Instant::now() + Duration::from_secs(60);
    while serial_len(&serial) <= before + 20 {
        assert!(Instant::now() < deadline, "the source stopped running");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The destination waits on for a source it was configured for.
    assert!(
        b.child.try_wait().expect("wait").is_none(),
        "the destination gave up"
    );
    let _ = b.child.kill();
    let _ = b.child.wait();
    drop(qb);

    // 2. libvirt's form of the same disk, in the same slot: migrates.
    let storage = json!({"driver": "file", "filename": img, "node-name": "libvirt-1-storage",
        "cache": {"direct": true, "no-flush": false}, "auto-read-only": true,
        "discard": "unmap"})
    .to_string();
    let format = json!({"node-name": "libvirt-1-format", "read-only": false,
        "cache": {"direct": true, "no-flush": false}, "driver": "raw",
        "file": "libvirt-1-storage"})
    .to_string();
    let device = json!({"driver": "virtio-blk-pci", "addr": "0x3",
        "drive": "libvirt-1-format", "id": "virtio-disk0", "bootindex": 1,
        "write-cache": "on"})
    .to_string();
    let c = spawn_guest(
        d,
        "c",
        &kernel,
        &[
            "-blockdev",
            &storage,
            "-blockdev",
            &format,
            "-device",
            &device,
            "-append",
            &append,
            "-incoming",
            "defer",
        ],
    );
    let mut qc = Qmp::connect(&c.qmp);
    let blocks = qc.ok("query-block", json!({}));
    assert_eq!(blocks[0]["device"], "", "{blocks}");
    assert_eq!(blocks[0]["inserted"]["node-name"], "libvirt-1-format");
    assert_eq!(
        blocks[0]["qdev"],
        "/machine/peripheral/virtio-disk0/virtio-backend"
    );
    let port = free_port();
    qc.ok(
        "migrate-incoming",
        json!({"uri": format!("tcp:127.0.0.1:{port}")}),
    );
    qa.events.clear();
    qa.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = poll_until_done(&mut qa);
    check_completed(&info);
    wait_status(&mut qc, "paused");
    same_memory(&mut qa, &mut qc, d, "disk");
    drop(qa);
    drop(a);
    run_a_while(&mut qc, &d.join("c.serial"));
    disk_oracle(&mut qc, d, &image, "c-disk");
    // The guest's record writes are counted (since this process got it).
    let stats = qc.ok("query-blockstats", json!({}));
    assert!(
        stats[0]["stats"]["wr_operations"].as_u64() > Some(0)
            && stats[0]["stats"]["wr_bytes"].as_u64() >= Some(512),
        "{stats}"
    );

    // 3. Save to file: and restore with -incoming file:, with the disk (the
    // guest goes on) and without it (refused, exit status 1).
    let saved = d.join("disk.ferry");
    qc.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    // (C's own incoming migration left a `completed` behind.)
    qc.events.clear();
    qc.ok(
        "migrate",
        json!({"uri": format!("file:{}", saved.display())}),
    );
    qc.wait_event("MIGRATION", Some("completed"));
    let r = qc.oracle(&d.join("c-saved.raw"));
    drop(qc);
    drop(c);
    let incoming = format!("file:{}", saved.display());
    let mut e = spawn_guest(d, "e", &kernel, &["-incoming", &incoming]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(st) = e.child.try_wait().expect("wait") {
            break st.code();
        }
        assert!(
            Instant::now() < deadline,
            "a restore without the disk lingers"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(1), "restore without the disk");
    let f = spawn_guest(
        d,
        "f",
        &kernel,
        &[
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=drive0,id=disk0",
            "-append",
            &append,
            "-incoming",
            &incoming,
        ],
    );
    let mut qf = Qmp::connect(&f.qmp);
    wait_status(&mut qf, "paused");
    let rf = qf.oracle(&d.join("f0.raw"));
    assert_eq!((rf.passes, rf.cursor), (r.passes, r.cursor));
    run_a_while(&mut qf, &d.join("f.serial"));
    let after = disk_oracle(&mut qf, d, &image, "f-disk");
    assert!(after > r.passes, "the restored guest wrote no more records");
}

/// Sectors of the dirtier's disk records (`blk=K`).
const BLK_K: u64 = 8;

/// The memory oracle of the stopped guest, then the disk oracle of `image`
/// with its pass count; returns the passes.
fn disk_oracle(q: &mut Qmp, d: &Path, image: &Path, tag: &str) -> u64 {
    let report = q.oracle(&d.join(format!("{tag}.raw")));
    let bytes = std::fs::read(image).expect("read the disk image");
    ferry_testguest::disk::check_disk(&bytes, BLK_K, report.passes)
        .unwrap_or_else(|e| panic!("{tag}: disk oracle after {} passes: {e}", report.passes));
    assert!(report.passes >= 1, "{tag}: the guest wrote no record");
    report.passes
}

/// A NIC typed by hand (`-netdev tap,ifname=` + `-device virtio-net-pci`):
/// qom-list names it, and the engine has it: a destination without it refuses
/// the stream naming the source's virtio-net device, the source running on;
/// one with the same NIC (its own tap) takes the guest.
#[test]
fn tap_nic_by_hand_is_in_the_guest_and_its_migration_shape() {
    let name = "tap_nic_by_hand_is_in_the_guest_and_its_migration_shape";
    if !kvm_usable(name) {
        return;
    }
    if !Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP {name}: no /dev/net/tun");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let nic = |tap: &str| {
        vec![
            "-netdev".to_string(),
            format!("tap,id=hostnet0,ifname={tap},script=no,downscript=no"),
            "-device".to_string(),
            "virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:fe:00:01,addr=0x5".to_string(),
        ]
    };
    let pid = std::process::id() % 10000;
    let (tap_a, tap_c) = (format!("fq{pid}a"), format!("fq{pid}c"));
    let args_a = nic(&tap_a);
    let args_a: Vec<&str> = args_a.iter().map(String::as_str).collect();
    let a = spawn_guest(d, "a", &kernel, &args_a);
    let mut qa = Qmp::connect(&a.qmp);
    let peripheral = qa.ok("qom-list", json!({"path": "/machine/peripheral"}));
    assert!(
        peripheral
            .as_array()
            .expect("list")
            .iter()
            .any(|p| p["name"] == "net0" && p["type"] == "child<virtio-net-pci>"),
        "{peripheral}"
    );
    qa.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    qa.ok("cont", json!({}));
    qa.wait_event("RESUME", None);
    wait_for_serial(&d.join("a.serial"), "dirtier: ready");

    let b = spawn_guest(d, "b", &kernel, &["-incoming", "defer"]);
    let mut qb = Qmp::connect(&b.qmp);
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    qb.ok("migrate-incoming", json!({"uri": uri}));
    qa.ok("migrate", json!({"uri": uri}));
    qa.wait_event("MIGRATION", Some("failed"));
    let info = qa.ok("query-migrate", json!({}));
    let e = info["error-desc"].as_str().unwrap_or_default();
    assert!(e.contains("virtio-net@05"), "{info}");
    assert_eq!(qa.status(), "running");
    drop(qb);
    drop(b);

    let mut args_c = nic(&tap_c);
    args_c.extend(["-incoming".to_string(), "defer".to_string()]);
    let args_c: Vec<&str> = args_c.iter().map(String::as_str).collect();
    let c = spawn_guest(d, "c", &kernel, &args_c);
    let mut qc = Qmp::connect(&c.qmp);
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    qc.ok("migrate-incoming", json!({"uri": uri}));
    qa.ok("migrate", json!({"uri": uri}));
    let info = poll_until_done(&mut qa);
    check_completed(&info);
    wait_status(&mut qc, "paused");
    same_memory(&mut qa, &mut qc, d, "nic");
    drop(qa);
    drop(a);
    run_a_while(&mut qc, &d.join("c.serial"));
    drop(qc);
    drop(c);
    for tap in [&tap_a, &tap_c] {
        let _ = Command::new("ip").args(["link", "del", tap]).output();
    }
}

/// `auto-converge` as libvirt turns it on (`virsh migrate --auto-converge
/// --auto-converge-initial 30 --auto-converge-increment 20`): advertised,
/// its parameters checked with QEMU's ranges, and the throttle steps QEMU's
/// way (initial, then +increment every second pass that dirtied more than
/// half of what it sent) up to max-cpu-throttle.
#[test]
fn auto_converge_steps_the_throttle_as_qemu_does() {
    let name = "auto_converge_steps_the_throttle_as_qemu_does";
    if !kvm_usable(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let (_a, mut src) = running_source(d, "a", &kernel);
    let caps = src.ok("query-migrate-capabilities", json!({}));
    assert!(
        caps.as_array()
            .expect("capabilities")
            .contains(&json!({"capability": "auto-converge", "state": false})),
        "{caps}"
    );
    let e = error_desc(
        &mut src,
        "migrate-set-parameters",
        json!({"max-cpu-throttle": 100}),
    );
    assert_eq!(
        e,
        "Parameter 'max_cpu_throttle' expects an integer in the range of 1 to 99"
    );
    src.ok(
        "migrate-set-parameters",
        json!({"cpu-throttle-initial": 30, "cpu-throttle-increment": 20,
               "max-cpu-throttle": 70, "max-bandwidth": 32 << 20, "downtime-limit": 0}),
    );
    let p = src.ok("query-migrate-parameters", json!({}));
    assert_eq!(
        (&p["cpu-throttle-initial"], &p["cpu-throttle-increment"]),
        (&json!(30), &json!(20)),
        "{p}"
    );
    assert_eq!(p["max-cpu-throttle"], 70, "{p}");
    src.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "auto-converge", "state": true}]}),
    );
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let b = spawn_guest(d, "b", &kernel, &["-incoming", &uri]);
    // Listening once its monitor answers (as the other tests' destinations).
    assert_eq!(Qmp::connect(&b.qmp).status(), "inmigrate");
    src.ok("migrate", json!({"uri": uri}));
    src.wait_event("MIGRATION", Some("active"));
    // A downtime limit of 0 never converges: watch the throttle rise.
    let mut seen: Vec<u64> = Vec::new();
    while seen.last().is_none_or(|&t| t < 70) {
        let info = src.ok("query-migrate", json!({}));
        assert_eq!(info["status"], "active", "{info}");
        // Three steps, two passes each, after the first pass: bounded by passes.
        assert!(
            info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) < 40,
            "no throttle steps to 70%: {seen:?} {info}"
        );
        let t = info["cpu-throttle-percentage"].as_u64().unwrap_or(0);
        if t > 0 && seen.last() != Some(&t) {
            seen.push(t);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(seen, [30, 50, 70], "QEMU's steps");
    src.ok("migrate_cancel", json!({}));
    src.wait_event("MIGRATION", Some("cancelled"));
}

/// libvirt's `-sandbox` (QEMU 7.2's seccomp makes fork/exec fail with
/// spawn=deny).
const LIBVIRT_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Issue 15: with `-sandbox on,spawn=deny` ferry-qemu ran `exec:` commands
/// anyway (only a warning said the sandbox was not enforced). Now every
/// `exec:` (`-incoming`, a save of a stopped guest, a live migration) is
/// refused with the cause, and no command runs.
#[test]
fn sandbox_spawn_deny_refuses_every_exec() {
    let name = "sandbox_spawn_deny_refuses_every_exec";
    if !kvm_usable(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let marker = d.join("ran");
    let touch = format!("exec:touch {}", marker.display());
    // -incoming exec: fails at startup, with the reason on stderr.
    let mut q = spawn_guest(
        d,
        "incoming",
        &kernel,
        &["-sandbox", LIBVIRT_SANDBOX, "-incoming", &touch],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = q.child.try_wait().expect("wait") {
            break Some(st);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.and_then(|s| s.code()), Some(1), "startup fails");
    assert!(!marker.exists(), "-incoming exec: ran under spawn=deny");
    drop(q);
    // migrate exec: of a stopped guest (a save) and of a running one.
    let q = spawn_guest(d, "src", &kernel, &["-sandbox", LIBVIRT_SANDBOX]);
    let mut qmp = Qmp::connect(&q.qmp);
    for running in [false, true] {
        if running {
            qmp.ok("cont", json!({}));
        }
        let r = qmp.cmd_with_fd("migrate", json!({"uri": touch}), None);
        let e = r["error"]["desc"].as_str().unwrap_or_default();
        assert!(
            e.contains("Failed to fork process") && e.contains("spawn=deny"),
            "running {running}: {r}"
        );
        assert!(!marker.exists(), "exec: ran under spawn=deny");
    }
    assert_eq!(qmp.status(), "running");
}

/// Issue 15: pmemsave took any range (zero-filling past the end of RAM,
/// while holding the VM), failed with EINVAL on a FIFO (QEMU streams into
/// one) and wrote regular files in place with the umask's mode. Now a
/// range outside guest RAM is refused before anything is opened, a FIFO
/// gets the bytes streamed, and a regular file appears whole, mode 0600.
#[test]
fn pmemsave_checks_the_range_streams_to_a_fifo_and_writes_privately() {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let name = "pmemsave_checks_the_range_streams_to_a_fifo_and_writes_privately";
    if !kvm_usable(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let q = spawn_guest(d, "pmem", &kernel, &[]);
    let mut qmp = Qmp::connect(&q.qmp);
    let save = |qmp: &mut Qmp, addr: u64, size: u64, path: &Path| {
        qmp.cmd_with_fd(
            "pmemsave",
            json!({"val": addr, "size": size, "filename": path.display().to_string()}),
            None,
        )
    };
    // Past the end of RAM: refused, nothing created.
    let outside = d.join("outside.dump");
    let r = save(&mut qmp, MEM, 4096, &outside);
    let e = r["error"]["desc"].as_str().unwrap_or_default();
    assert!(e.contains("Invalid addr"), "{r}");
    assert!(!outside.exists());
    // A regular file: replaced whole, the owner's alone.
    let file = d.join("mem.dump");
    std::fs::write(&file, b"old").expect("old file");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let size = 1 << 20;
    assert_eq!(save(&mut qmp, 0, size, &file), json!({"return": {}}));
    let want = std::fs::read(&file).expect("dump");
    assert_eq!(want.len() as u64, size);
    let mode = std::fs::metadata(&file).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    // A FIFO: streamed to its reader.
    let fifo = d.join("mem.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            std::fs::File::open(&fifo)
                .and_then(|mut f| f.read_to_end(&mut got))
                .map(|_| got)
        })
    };
    let r = save(&mut qmp, 0, size, &fifo);
    let got = reader.join().expect("reader").expect("read the FIFO");
    assert_eq!(r, json!({"return": {}}));
    assert!(
        got == want,
        "the FIFO got {} bytes, not the dump",
        got.len()
    );
}

/// Issue 15: `migrate file:PATH` of a stopped guest truncated PATH and
/// wrote it in place: a save that died half-way (here: the file size
/// limit kills ferry-qemu with SIGXFSZ) left a partial file over the good
/// checkpoint. Now the good one stays until a whole new one is synced and
/// renamed over it, mode 0600.
#[test]
fn a_failed_save_to_file_keeps_the_old_checkpoint() {
    use std::os::unix::fs::PermissionsExt;
    let name = "a_failed_save_to_file_keeps_the_old_checkpoint";
    if !kvm_usable(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let save = d.join("vm.save");
    std::fs::write(&save, b"the good checkpoint").expect("old save");
    std::fs::set_permissions(&save, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let uri = json!({"uri": format!("file:{}", save.display())});

    let mut q = spawn_guest(d, "dies", &kernel, &[]);
    let mut qmp = Qmp::connect(&q.qmp);
    let limited = Command::new("prlimit")
        .arg(format!("--pid={}", q.child.id()))
        .arg("--fsize=1024")
        .status()
        .expect("run prlimit");
    assert!(limited.success());
    qmp.send("migrate", uri.clone(), None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while q.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "the save never hit the limit");
        std::thread::sleep(Duration::from_millis(50));
    }
    let kept = std::fs::read(&save).expect("old save");
    assert!(
        kept == b"the good checkpoint",
        "a failed save replaced the good one ({} bytes)",
        kept.len()
    );

    let q = spawn_guest(d, "saves", &kernel, &[]);
    let mut qmp = Qmp::connect(&q.qmp);
    qmp.ok("migrate", uri);
    qmp.wait_event("MIGRATION", Some("completed"));
    let m = std::fs::metadata(&save).expect("new save");
    assert!(m.len() > 4096, "a whole checkpoint: {} bytes", m.len());
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
}

/// Polls `query-dirty-rate` until the measurement under way ends.
fn dirty_rate_measured(q: &mut Qmp) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let info = q.ok("query-dirty-rate", json!({}));
        if info["status"] == "measured" {
            return info;
        }
        assert!(Instant::now() < deadline, "never measured: {info}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 16, item 5: `calc-dirty-rate`/`query-dirty-rate` (`virsh
/// domdirtyrate-calc`, `domstats --dirtyrate`) measure the dirtier's working
/// set and nothing when the guest is stopped; `announce-self` and HMP
/// `announce_self` (Nova's `enable_qemu_monitor_announce_self`) send RARP
/// frames into the NIC's tap, with the `announce-*` parameters; QEMU's
/// ranges and texts for bad values.
#[test]
fn dirty_rate_announce_self_and_hmp() {
    let name = "dirty_rate_announce_self_and_hmp";
    if !kvm_usable(name) {
        return;
    }
    if !Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP {name}: no /dev/net/tun");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let tap = format!("fq{}d", std::process::id() % 10000);
    let netdev = format!("tap,id=hostnet0,ifname={tap},script=no,downscript=no");
    let q = spawn_guest(
        d,
        "dr",
        &kernel,
        &[
            "-netdev",
            &netdev,
            "-device",
            "virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:fe:00:02,addr=0x5",
        ],
    );
    let mut qmp = Qmp::connect(&q.qmp);
    let hmp = |q: &mut Qmp, line: &str| -> String {
        q.ok("human-monitor-command", json!({"command-line": line}))
            .as_str()
            .expect("text")
            .to_string()
    };
    assert_eq!(qmp.ok("query-dirty-rate", json!({}))["status"], "unstarted");
    assert_eq!(
        hmp(&mut qmp, "info status"),
        "VM status: paused (prelaunch)\r\n"
    );

    // Stopped: nothing changes.
    qmp.ok("calc-dirty-rate", json!({"calc-time": 1}));
    let info = dirty_rate_measured(&mut qmp);
    assert_eq!(info["dirty-rate"], 0, "{info}");
    assert_eq!(
        (info["calc-time"].clone(), info["sample-pages"].clone()),
        (json!(1), json!(512))
    );

    // Running: the 16 MiB working set of 128 MiB is an eighth of any sample.
    qmp.ok("cont", json!({}));
    qmp.wait_event("RESUME", None);
    wait_for_serial(&d.join("dr.serial"), "dirtier: ready");
    qmp.ok(
        "calc-dirty-rate",
        json!({"calc-time": 1, "sample-pages": 4096}),
    );
    let busy = error_desc(&mut qmp, "calc-dirty-rate", json!({"calc-time": 1}));
    assert_eq!(busy, "the dirty rate is already being measured.");
    let info = dirty_rate_measured(&mut qmp);
    let rate = info["dirty-rate"].as_u64().expect("a rate");
    assert!((1..=128).contains(&rate), "{info}");
    let text = hmp(&mut qmp, "info dirty_rate");
    assert!(
        text.contains(&format!("Dirty rate: {rate} (MB/s)")),
        "{text}"
    );
    for (args, want) in [
        (json!({"calc-time": 0}), "calc-time is out of range[1, 60]."),
        (
            json!({"calc-time": 61}),
            "calc-time is out of range[1, 60].",
        ),
        (
            json!({"calc-time": 1, "sample-pages": 5000}),
            "sample-pages is out of range[128, 4096].",
        ),
        (
            json!({"calc-time": 1, "mode": "dirty-ring"}),
            "mode dirty-ring is not enabled, use other method instead.",
        ),
    ] {
        assert_eq!(error_desc(&mut qmp, "calc-dirty-rate", args), want);
    }

    // Announce: the tap (up) receives the RARP frames ferry-qemu writes.
    let up = Command::new("ip")
        .args(["link", "set", &tap, "up"])
        .status()
        .expect("ip");
    assert!(up.success());
    let rx = || -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/rx_packets"))
            .expect("tap stats")
            .trim()
            .parse()
            .expect("a count")
    };
    let wait_rx = |want: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while rx() < want {
            assert!(Instant::now() < deadline, "{} frames, not {want}", rx());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let before = rx();
    qmp.ok(
        "migrate-set-parameters",
        json!({"announce-rounds": 3, "announce-initial": 10, "announce-step": 10}),
    );
    let p = qmp.ok("query-migrate-parameters", json!({}));
    assert_eq!(
        (
            &p["announce-initial"],
            &p["announce-max"],
            &p["announce-rounds"],
            &p["announce-step"]
        ),
        (&json!(10), &json!(550), &json!(3), &json!(10))
    );
    assert_eq!(hmp(&mut qmp, "announce_self"), "");
    wait_rx(before + 3);
    qmp.ok(
        "announce-self",
        json!({"initial": 10, "max": 20, "rounds": 2, "step": 5, "interfaces": ["net0"], "id": "a"}),
    );
    wait_rx(before + 5);
    // A NIC not named sends nothing; the frames above were all there were.
    qmp.ok(
        "announce-self",
        json!({"initial": 10, "max": 20, "rounds": 4, "step": 5, "interfaces": ["net9"]}),
    );
    hmp(&mut qmp, "announce_self net9");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rx(), before + 5);
    let e = error_desc(
        &mut qmp,
        "announce-self",
        json!({"initial": 10, "max": 20, "rounds": 1001, "step": 5}),
    );
    assert_eq!(e, "Parameter 'rounds' expects a value between 0 and 1000");
    let e = error_desc(
        &mut qmp,
        "migrate-set-parameters",
        json!({"announce-step": 0}),
    );
    assert_eq!(
        e,
        "Parameter 'announce_step' expects a value between 0 and 10000"
    );
    assert_eq!(hmp(&mut qmp, "info status"), "VM status: running\r\n");
    assert_eq!(
        hmp(&mut qmp, "frobnicate 1"),
        "unknown command: 'frobnicate'\r\n"
    );
    drop(qmp);
    drop(q);
    let _ = Command::new("ip").args(["link", "del", &tap]).output();
}

/// Issue 16, item 6: a link that slows at the switch-over (here: the
/// bandwidth cap drops to 1 MiB/s while libvirt's pre-switchover pause
/// waits) would keep the guest paused for seconds; the source resumes the
/// guest and goes back to pre-copy (`active`, RESUME, counted in
/// `x-switchover-returns`) instead, without asking for a second go-ahead,
/// and completes once the link is fast again, memory intact.
#[test]
fn a_switchover_that_would_overrun_goes_back_to_precopy() {
    let name = "a_switchover_that_would_overrun_goes_back_to_precopy";
    if !kvm_usable(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let (a, mut qa) = running_source(d, "a", &kernel);
    qa.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]}),
    );
    let b = spawn_guest(d, "b", &kernel, &["-incoming", "defer"]);
    let mut qb = Qmp::connect(&b.qmp);
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    qb.ok("migrate-incoming", json!({"uri": uri}));
    qa.ok("migrate", json!({"uri": uri}));
    qa.wait_event("MIGRATION", Some("pre-switchover"));
    qa.events.clear();
    qa.ok("migrate-set-parameters", json!({"max-bandwidth": 1 << 20}));
    qa.ok("migrate-continue", json!({"state": "pre-switchover"}));
    qa.wait_event("MIGRATION", Some("device"));
    qa.wait_event("MIGRATION", Some("active"));
    qa.wait_event("RESUME", None);
    assert_eq!(qa.status(), "running");
    let info = qa.ok("query-migrate", json!({}));
    assert!(info["x-switchover-returns"].as_u64() >= Some(1), "{info}");
    qa.ok("migrate-set-parameters", json!({"max-bandwidth": 0}));
    let info = poll_until_done(&mut qa);
    check_completed(&info);
    assert!(
        !migration_statuses(&qa).contains(&"pre-switchover".to_string()),
        "a second go-ahead was asked for: {:?}",
        migration_statuses(&qa)
    );
    wait_status(&mut qb, "paused");
    same_memory(&mut qa, &mut qb, d, "overrun");
    drop((qa, a));
    run_a_while(&mut qb, &d.join("b.serial"));
    drop((qb, b));
}

/// dmidecode's reading of the guest's first MiB (`pmemsave 0 1048576`),
/// scanning 0xF0000 for the SMBIOS entry point as an OS does.
fn dmidecode_low_mib(q: &mut Qmp, image: &Path) -> String {
    let dmidecode = "/usr/sbin/dmidecode";
    assert!(
        Path::new(dmidecode).exists(),
        "{dmidecode} is missing: scripts/deps --tests installs it"
    );
    q.ok(
        "pmemsave",
        json!({"val": 0, "size": 1 << 20, "filename": image.display().to_string()}),
    );
    let out = Command::new(dmidecode)
        .args(["--no-sysfs", "--dev-mem"])
        .arg(image)
        .output()
        .expect("run dmidecode");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dmidecode: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Issue 17: `-smbios type=1,...` as libvirt 9.0 writes it from Nova's
/// `<sysinfo>` (with `-no-hpet` for `<timer name='hpet' present='no'/>`): the
/// guest's first MiB holds SMBIOS tables that dmidecode finds by scanning
/// 0xF0000 as an OS does, with the given fields and QEMU's defaults. They
/// live in guest RAM: a restored guest keeps them even where the destination
/// was started with other fields (its boot path, which builds them, is skipped).
#[test]
fn smbios_fields_reach_the_guest_as_dmidecode_reads_them() {
    let name = "smbios_fields_reach_the_guest_as_dmidecode_reads_them";
    if !kvm_usable(name) {
        return;
    }
    const UUID: &str = "c7a5fdbd-cdaf-9455-926a-d65c16db1809";
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let type1 = |serial: &str| {
        format!(
            "type=1,manufacturer=OpenStack Foundation,product=OpenStack Nova,version=26.1.0,\
             serial={serial},uuid={UUID},family=Virtual Machine"
        )
    };
    let args = |type1: &str| -> Vec<String> {
        [
            "-machine",
            "pc-i440fx-7.2,usb=off",
            "-smp",
            "2,sockets=2,dies=1,cores=1,threads=1",
            "-uuid",
            UUID,
            "-no-hpet",
            "-smbios",
            type1,
        ]
        .map(String::from)
        .to_vec()
    };
    let src_args = args(&type1("8a7f,,rack 4"));
    let src_args: Vec<&str> = src_args.iter().map(String::as_str).collect();
    let q = spawn_guest(d, "smbios", &kernel, &src_args);
    let mut qmp = Qmp::connect(&q.qmp);
    assert_eq!(qmp.ok("query-uuid", json!({}))["UUID"], UUID);
    // The guest runs over its tables (they are in reserved memory) first.
    run_a_while(&mut qmp, &d.join("smbios.serial"));
    let text = dmidecode_low_mib(&mut qmp, &d.join("low.mem"));
    for want in [
        "SMBIOS 2.8 present.",
        "\tVendor: SeaBIOS",
        "\tManufacturer: OpenStack Foundation",
        "\tProduct Name: OpenStack Nova",
        "\tVersion: 26.1.0",
        "\tSerial Number: 8a7f,rack 4",
        "\tUUID: c7a5fdbd-cdaf-9455-926a-d65c16db1809",
        "\tFamily: Virtual Machine",
        "\tSocket Designation: CPU 1",
        "\tMaximum Capacity: 128 MB",
        "\tSize: 128 MB",
        "\tVersion: pc-i440fx-7.2",
    ] {
        assert!(text.contains(want), "dmidecode lacks {want:?}:\n{text}");
    }

    let save = d.join("smbios.ferry");
    qmp.ok(
        "migrate",
        json!({"uri": format!("file:{}", save.display())}),
    );
    qmp.wait_event("MIGRATION", Some("completed"));
    qmp.ok("quit", json!({}));
    drop(q);
    let mut dst_args = args(&type1("other"));
    dst_args.extend(["-incoming".into(), format!("file:{}", save.display())]);
    let dst_args: Vec<&str> = dst_args.iter().map(String::as_str).collect();
    let b = spawn_guest(d, "smbios-dst", &kernel, &dst_args);
    let mut qmp = Qmp::connect(&b.qmp);
    wait_status(&mut qmp, "paused");
    let after = dmidecode_low_mib(&mut qmp, &d.join("low-dst.mem"));
    assert!(
        after.contains("\tSerial Number: 8a7f,rack 4") && !after.contains("other"),
        "the restored guest's tables were rebuilt:\n{after}"
    );
}

/// `-device virtio-balloon-pci` as libvirt 9.0 writes it for
/// `<memballoon model='virtio'><stats period='2'/></memballoon>`: a real
/// device in the guest (QOM path, properties), answering `query-balloon`,
/// `balloon` and `guest-stats` with QEMU's values and errors (the dirtier has
/// no balloon driver, so `actual` stays 0 and no stats arrive), and part of
/// the migration shape: a destination without it is refused, one with it
/// takes the guest and its target.
#[test]
fn balloon_device_answers_libvirt_and_migrates() {
    let name = "balloon_device_answers_libvirt_and_migrates";
    if !kvm_usable(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let balloon = [
        "-device",
        r#"{"driver":"virtio-balloon-pci","id":"balloon0","bus":"pci.0","addr":"0x6"}"#,
    ];
    let a = spawn_guest(d, "a", &kernel, &balloon);
    let mut qa = Qmp::connect(&a.qmp);
    let peripheral = qa.ok("qom-list", json!({"path": "/machine/peripheral"}));
    assert!(
        peripheral
            .as_array()
            .expect("list")
            .iter()
            .any(|p| p["name"] == "balloon0" && p["type"] == "child<virtio-balloon-pci>"),
        "{peripheral}"
    );
    let path = "/machine/peripheral/balloon0";
    qa.ok(
        "qom-set",
        json!({"path": path, "property": "guest-stats-polling-interval", "value": 2}),
    );
    assert_eq!(
        qa.ok(
            "qom-get",
            json!({"path": path, "property": "guest-stats-polling-interval"})
        ),
        json!(2)
    );
    assert_eq!(qa.ok("query-balloon", json!({})), json!({"actual": MEM}));
    assert_eq!(
        error_desc(
            &mut qa,
            "qom-get",
            json!({"path": path, "property": "guest-stats"})
        ),
        "guest hasn't updated any stats yet"
    );
    assert_eq!(
        error_desc(&mut qa, "balloon", json!({"value": 0})),
        "Parameter 'target' expects a size"
    );
    qa.ok("balloon", json!({"value": MEM / 2}));
    qa.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    qa.ok("cont", json!({}));
    qa.wait_event("RESUME", None);
    wait_for_serial(&d.join("a.serial"), "dirtier: ready");
    // Without a driver nothing moves: no BALLOON_CHANGE, actual unchanged.
    assert_eq!(qa.ok("query-balloon", json!({})), json!({"actual": MEM}));

    // A destination without the balloon refuses the stream, naming it.
    let b = spawn_guest(d, "b", &kernel, &["-incoming", "defer"]);
    let mut qb = Qmp::connect(&b.qmp);
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    qb.ok("migrate-incoming", json!({"uri": uri}));
    qa.ok("migrate", json!({"uri": uri}));
    qa.wait_event("MIGRATION", Some("failed"));
    let info = qa.ok("query-migrate", json!({}));
    let e = info["error-desc"].as_str().unwrap_or_default();
    assert!(e.contains("virtio-balloon@06"), "{info}");
    assert_eq!(qa.status(), "running");
    drop(qb);
    drop(b);

    let mut args_c = balloon.to_vec();
    args_c.extend(["-incoming", "defer"]);
    let c = spawn_guest(d, "c", &kernel, &args_c);
    let mut qc = Qmp::connect(&c.qmp);
    // Before the stream arrives: an empty balloon, as QEMU's.
    assert_eq!(qc.ok("query-balloon", json!({})), json!({"actual": MEM}));
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    qc.ok("migrate-incoming", json!({"uri": uri}));
    qa.ok("migrate", json!({"uri": uri}));
    let info = poll_until_done(&mut qa);
    check_completed(&info);
    wait_status(&mut qc, "paused");
    same_memory(&mut qa, &mut qc, d, "balloon");
    drop(qa);
    drop(a);
    assert_eq!(qc.ok("query-balloon", json!({})), json!({"actual": MEM}));
    qc.ok("balloon", json!({"value": MEM}));
    run_a_while(&mut qc, &d.join("c.serial"));
}

/// Post-copy between two ferry-qemu processes, as libvirt drives it
/// (`virsh migrate --postcopy` then `migrate-postcopy`): postcopy-ram on
/// both sides, `migrate-start-postcopy` mid-pass, the destination running
/// the guest once `cont` comes while the rest of RAM still arrives, and the
/// oracle passing there at the end.
#[test]
fn postcopy_runs_the_guest_on_the_destination_before_its_ram_arrived() {
    let name = "postcopy_runs_the_guest_on_the_destination_before_its_ram_arrived";
    if !kvm_usable(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let kernel = d.join("dirtier.elf");
    std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
    let (_a, mut src) = running_source(d, "a", &kernel);
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let b = spawn_guest(d, "b", &kernel, &["-incoming", "defer"]);
    let mut dst = Qmp::connect(&b.qmp);
    let postcopy = json!({"capabilities": [
        {"capability": "events", "state": true},
        {"capability": "postcopy-ram", "state": true},
    ]});
    // Not before a migration runs, as QEMU says.
    let e = error_desc(&mut src, "migrate-start-postcopy", json!({}));
    assert!(e.contains("after migration has been started"), "{e}");
    dst.ok("migrate-set-capabilities", postcopy.clone());
    dst.ok("migrate-incoming", json!({"uri": uri}));
    src.ok("migrate-set-capabilities", postcopy);
    let caps = src.ok("query-migrate-capabilities", json!({}));
    assert!(
        caps.as_array()
            .expect("caps")
            .contains(&json!({"capability": "postcopy-ram", "state": true})),
        "{caps}"
    );
    src.ok("migrate-set-parameters", json!({"max-bandwidth": 32 << 20}));
    src.ok("migrate", json!({"uri": uri}));
    src.wait_event("MIGRATION", Some("active"));
    // A slow rest (QEMU's max-postcopy-bandwidth, which caps post-copy
    // instead of max-bandwidth): the guest must run there while its RAM
    // still comes.
    src.ok(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 4 << 20}),
    );
    src.ok("migrate-start-postcopy", json!({}));
    src.wait_event("MIGRATION", Some("postcopy-active"));
    src.wait_event("STOP", None);
    // The destination has the guest before its RAM: paused under -S, then
    // running at `cont` (libvirt's resume in post-copy).
    dst.wait_event("MIGRATION", Some("postcopy-active"));
    assert_eq!(dst.status(), "paused");
    let serial = d.join("b.serial");
    let before = serial_len(&serial);
    dst.ok("cont", json!({}));
    dst.wait_event("RESUME", None);
    assert_eq!(dst.status(), "running");
    wait_for_serial_growth(&serial, before);
    let info = src.ok("query-migrate", json!({}));
    assert_eq!(info["status"], "postcopy-active", "{info}");
    assert!(info["ram"]["remaining"].as_u64() > Some(0), "{info}");
    src.ok(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 0}),
    );
    dst.wait_event("MIGRATION", Some("completed"));
    src.wait_event("MIGRATION", Some("completed"));
    assert_eq!(src.status(), "postmigrate");
    assert_eq!(dst.status(), "running");
    let info = src.ok("query-migrate", json!({}));
    assert!(
        info["ram"]["postcopy-bytes"].as_u64() > Some(32 << 20),
        "{info}"
    );
    assert!(info["ram"]["postcopy-requests"].is_u64(), "{info}");
    dst.ok("stop", json!({}));
    dst.wait_event("STOP", None);
    let report = dst.oracle(&d.join("postcopy-dst.raw"));
    assert!(report.passes + report.cursor > 0, "{report:?}");
}

/// Waits until the serial file grows past `before` (the guest beats).
fn wait_for_serial_growth(path: &Path, before: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while serial_len(path) <= before + 100 {
        assert!(
            Instant::now() < deadline,
            "no heartbeats in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
