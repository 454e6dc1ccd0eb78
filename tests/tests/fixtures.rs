//! Golden fixtures: a checkpoint and a live-migration stream of a running
//! dirtier guest, recorded once with the portable CPU model (qemu64) and
//! committed in tests/fixtures/. Every build, on every host of this kind
//! whatever its kernel or CPU, must restore them, run the guest on and pass
//! the memory oracle: old streams, new binary (QEMU's migration-compat idea).
//!
//! `FERRY_FIXTURES_REGEN=1` records them anew (only for a new format version:
//! keep the old files, they must go on loading).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_tests::{dirtier_source, require_kvm, Scratch, VmProcess};

const CHECKPOINT: &str = "dirtier-qemu64-v1.ckpt";
const STREAM: &str = "dirtier-qemu64-v1.mig";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn regenerating() -> bool {
    std::env::var("FERRY_FIXTURES_REGEN").as_deref() == Ok("1")
}

/// The recorded guest: small, so the files stay small (its working set and
/// the pages the kernel image and page tables fill).
fn recorded_guest(s: &Scratch) -> VmProcess {
    dirtier_source(s, "16M", "ws=512K", &["--cpu", "qemu64"])
}

/// Connects to a unix socket that a starting process is about to create.
fn connect_when_there(path: &Path, vm: &mut VmProcess) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match UnixStream::connect(path) {
            Ok(c) => return c,
            Err(e) => {
                if let Ok(Some(status)) = vm.child.try_wait() {
                    panic!("ferry-vm exited ({status}): {}", vm.stderr_text());
                }
                assert!(Instant::now() < deadline, "{}: {e}", path.display());
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Checks a VM that arrived from a fixture: its memory passes the oracle, and
/// once resumed the guest goes on dirtying and beating.
fn runs_on(s: &Scratch, vm: &VmProcess) {
    // The oracle pauses the VM for its dump.
    let before = vm.oracle(s, "arrived");
    assert!(before.working_set_pages > 0, "{before:?}");
    vm.ok("resume");
    vm.wait_heartbeats(100, Duration::from_secs(30));
    let after = vm.oracle(s, "running");
    assert!(
        (after.passes, after.cursor) > (before.passes, before.cursor),
        "the guest made no progress: {before:?} then {after:?}"
    );
}

/// Records the fixtures: a checkpoint of a running guest, and what its
/// source sent a real destination during a live migration.
fn record(s: &Scratch) {
    std::fs::create_dir_all(fixture("")).expect("mkdir fixtures");
    let src = recorded_guest(s);
    let ckpt = s.path("golden.ckpt");
    src.ok(&format!("checkpoint {}", ckpt.display()));
    std::fs::copy(&ckpt, fixture(CHECKPOINT)).expect("copy the checkpoint");

    // A relay between the source and a real destination that keeps what the
    // source sent.
    let relay = s.path("relay.sock");
    let dst_sock = s.path("dst.sock");
    let listener = UnixListener::bind(&relay).expect("bind the relay");
    let mut dst = VmProcess::spawn(
        s,
        "dst",
        &[
            "incoming",
            &format!("unix:{}", dst_sock.display()),
            "-m",
            "16M",
        ],
    );
    let to_dst = connect_when_there(&dst_sock, &mut dst);
    let recorder = std::thread::spawn(move || {
        let (mut from_src, _) = listener.accept().expect("the source connects");
        let mut back_src = from_src.try_clone().expect("clone");
        let mut from_dst = to_dst.try_clone().expect("clone");
        let mut to_dst = to_dst;
        let replies = std::thread::spawn(move || std::io::copy(&mut from_dst, &mut back_src));
        let mut sent = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = from_src.read(&mut buf).expect("read the source");
            if n == 0 {
                break;
            }
            sent.extend_from_slice(&buf[..n]);
            to_dst.write_all(&buf[..n]).expect("write the destination");
        }
        let _ = to_dst.shutdown(std::net::Shutdown::Write);
        let _ = replies.join();
        sent
    });
    let reply = src.ok(&format!("migrate unix:{}", relay.display()));
    assert_eq!(reply["migration"]["status"], "completed", "{reply}");
    let sent = recorder.join().expect("the recorder");
    std::fs::write(fixture(STREAM), sent).expect("write the stream");
    dst.wait_for_control();
    runs_on(s, &dst);
    dst.quit();
}

#[test]
fn golden_checkpoint_restores_and_runs() {
    require_kvm();
    let s = Scratch::new();
    if regenerating() {
        record(&s);
    }
    let path = fixture(CHECKPOINT);
    let vm = VmProcess::start(
        &s,
        "restored",
        &["restore", path.to_str().expect("utf-8"), "--paused"],
    );
    runs_on(&s, &vm);
    vm.quit();
}

#[test]
fn golden_stream_arrives_and_runs() {
    require_kvm();
    if regenerating() {
        // Recorded by golden_checkpoint_restores_and_runs.
        return;
    }
    let s = Scratch::new();
    let stream = std::fs::read(fixture(STREAM)).expect("the committed stream");
    let sock = s.path("in.sock");
    let mut dst = VmProcess::spawn(
        &s,
        "dst",
        &["incoming", &format!("unix:{}", sock.display()), "-m", "16M"],
    );
    let mut conn = connect_when_there(&sock, &mut dst);
    let mut replies = conn.try_clone().expect("clone");
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = replies.read_to_end(&mut sink);
    });
    conn.write_all(&stream).expect("send the recorded stream");
    let _ = conn.shutdown(std::net::Shutdown::Write);
    dst.wait_for_control();
    let _ = drain.join();
    runs_on(&s, &dst);
    dst.quit();
}
