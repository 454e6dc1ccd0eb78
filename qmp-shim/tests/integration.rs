//! ferry-qemu as libvirt runs it: the real binary, real sockets, and (when
//! installed) a real libvirtd probing it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_ferry-qemu");

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

/// `virsh domcapabilities` with ferry-qemu as the emulator, against a private
/// libvirtd in its own mount namespace (tests/libvirt-probe.sh). Skips, saying
/// why, when libvirtd is not installed or we are not root.
#[test]
fn libvirt_accepts_ferry_qemu() {
    if !Path::new("/usr/sbin/libvirtd").exists() {
        eprintln!("SKIP libvirt_accepts_ferry_qemu: libvirtd is not installed (apt-get install libvirt-daemon-system libvirt-clients)");
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIP libvirt_accepts_ferry_qemu: needs root (private mount namespace for libvirtd)"
        );
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
        stdout.contains("<machine>pc-i440fx-7.2</machine>"),
        "{stdout}"
    );
    assert!(
        log.contains("Try to probe capabilities of"),
        "libvirt really probed"
    );
}
