//! The fault matrix: for each migration state, each fault, the VM must end up
//! running exactly once (never both copies, never none that the operator cannot
//! resume), with the memory oracle passing on that copy, and with a clear error.
//!
//! Two `ferry-vm` processes over loopback TCP, with a stream-aware proxy between
//! them ([`ferry_tests::proxy`]) that stops the migration exactly in the state
//! under test. The rule the engine follows (engine/vmm/src/migration/mod.rs):
//!
//! * a fault before End was sent: the source resumes, the destination exits
//!   with an error; the source copy is the one;
//! * a fault after End was sent, before the destination's Loaded arrived: the
//!   source stays PAUSED, because the destination may be running. If the
//!   destination got End it runs and is the one copy (the source is never
//!   resumed by itself). If the destination is gone, the paused source is the
//!   one copy and the operator resumes it (checked here), exactly as the error
//!   message tells them to.
//!
//! Whichever copy survives carries on as the source of the next case, so one
//! guest goes through the whole row.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_format::SectionId;
use ferry_tests::proxy::{Hold, Proxy};
use ferry_tests::{free_port, require_kvm, Scratch, VmProcess};
use serde_json::Value;

/// KVM guests are heavy on a small host: one case at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const MEM: &str = "64M";
const APPEND: &str = "ws=16M fill=1";
const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Setup,
    FirstPass,
    LaterPass,
    Throttled,
    PreSwitchover,
    DeviceStateSent,
    BeforeConfirmation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillDestination,
    CloseConnection,
    CutLink,
    Cancel,
}

const FAULTS: [Fault; 4] = [
    Fault::KillDestination,
    Fault::CloseConnection,
    Fault::CutLink,
    Fault::Cancel,
];

/// Which copy is the VM after the fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Survivor {
    /// The source resumed by itself.
    SourceRunning,
    /// The source stayed paused and the destination is gone: the operator resumes it.
    SourcePausedOperatorResumes,
    /// The destination runs; the source stays paused.
    Destination,
}

fn expected(state: State, fault: Fault) -> Survivor {
    match state {
        State::DeviceStateSent => match fault {
            // The proxy delivers End after the cancel (it was in flight).
            Fault::Cancel => Survivor::Destination,
            _ => Survivor::SourcePausedOperatorResumes,
        },
        State::BeforeConfirmation => match fault {
            Fault::KillDestination => Survivor::SourcePausedOperatorResumes,
            _ => Survivor::Destination,
        },
        _ => Survivor::SourceRunning,
    }
}

fn start_source(s: &Scratch, tag: &str) -> VmProcess {
    let dirtier = s.dirtier.display().to_string();
    let vm = VmProcess::start(
        s,
        tag,
        &["run", "--kernel", &dirtier, "-m", MEM, "--append", APPEND],
    );
    vm.wait_serial("dirtier: ready", WAIT);
    vm.wait_heartbeats(100, WAIT);
    vm
}

/// A destination listening on a fresh loopback port.
fn start_destination(s: &Scratch, tag: &str) -> (VmProcess, SocketAddr) {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let vm = VmProcess::spawn(s, tag, &["incoming", &format!("tcp:{addr}"), "-m", MEM]);
    let deadline = Instant::now() + WAIT;
    while !vm.stderr_text().contains("listening on port") {
        assert!(
            Instant::now() < deadline,
            "destination never listened: {}",
            vm.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (vm, addr)
}

/// Runs `migrate URI` on the source's control socket in a thread.
fn start_migration(src: &VmProcess, uri: &str) -> JoinHandle<Value> {
    let control = src.control.clone();
    let line = format!("migrate {uri}");
    std::thread::spawn(move || {
        let mut c = std::os::unix::net::UnixStream::connect(control).expect("connect control");
        c.set_read_timeout(Some(Duration::from_secs(180)))
            .expect("timeout");
        writeln!(c, "{line}").expect("send migrate");
        let mut reply = String::new();
        BufReader::new(c)
            .read_line(&mut reply)
            .expect("migrate reply");
        serde_json::from_str(&reply).expect("migrate reply is JSON")
    })
}

fn query(src: &VmProcess) -> Value {
    src.ok("query-migrate")
}

fn wait_query(src: &VmProcess, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let q = query(src);
        if pred(&q) {
            return q;
        }
        assert!(
            Instant::now() < deadline,
            "source never reached {what}: {q}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Configures the source and the proxy, starts the migration and waits until it
/// sits in `state`.
fn drive_to(state: State, src: &VmProcess, proxy: &Proxy) -> JoinHandle<Value> {
    // Defaults first: a case must not inherit the previous case's settings.
    src.ok("migrate-set downtime-limit=300 max-bandwidth=0 auto-converge=on pause-before-switchover=off verify=off");
    match state {
        State::Setup => proxy.hold_replies_from(0),
        State::FirstPass => proxy.hold(Hold::Before(SectionId::RamPages, 3)),
        // A limit no pass can meet keeps the migration in its passes.
        State::LaterPass => {
            src.ok("migrate-set downtime-limit=0 auto-converge=off");
        }
        State::Throttled => {
            src.ok("migrate-set downtime-limit=0");
        }
        State::PreSwitchover => {
            src.ok("migrate-set pause-before-switchover=on");
        }
        State::DeviceStateSent => proxy.hold(Hold::Before(SectionId::End, 1)),
        State::BeforeConfirmation => proxy.hold_replies_from(1),
    };
    let t = start_migration(src, &proxy.uri());
    if matches!(
        state,
        State::LaterPass | State::Throttled | State::PreSwitchover
    ) {
        // Past the handshake, so query-migrate shows this migration, not the last.
        proxy.wait_for("the destination's Ready", WAIT, |p| {
            p.replies_forwarded >= 1
        });
    }
    match state {
        State::Setup => {
            proxy.wait_for("the destination's Ready", WAIT, |p| p.reply_held);
            let q = query(src);
            assert_eq!(q["status"], "setup", "{q}");
        }
        State::FirstPass => {
            proxy.wait_for("the 3rd RAM section", WAIT, |p| {
                p.held_before == Some(SectionId::RamPages)
            });
            let q = query(src);
            assert_eq!(q["status"], "active", "{q}");
            assert_eq!(q["passes"], 0, "still in the first pass: {q}");
        }
        State::LaterPass => {
            wait_query(src, "pass 2", |q| q["passes"].as_u64().unwrap_or(0) >= 2);
            proxy.hold(Hold::NextSection);
            proxy.wait_for("a RAM section of a later pass", WAIT, |p| {
                p.held_before == Some(SectionId::RamPages)
            });
            let q = query(src);
            assert_eq!(q["status"], "active", "{q}");
            assert_eq!(q["cpu-throttle-percentage"], 0, "{q}");
        }
        State::Throttled => {
            wait_query(src, "pass 1", |q| q["passes"].as_u64().unwrap_or(0) >= 1);
            // A link slower than the guest's dirty rate: the throttle must engage.
            src.ok("migrate-set max-bandwidth=33554432");
            wait_query(src, "a throttle", |q| {
                q["cpu-throttle-percentage"].as_u64().unwrap_or(0) > 0
            });
            proxy.hold(Hold::NextSection);
            proxy.wait_for("a RAM section while throttled", WAIT, |p| {
                p.held_before == Some(SectionId::RamPages)
            });
            let q = query(src);
            assert_eq!(q["status"], "active", "{q}");
        }
        State::PreSwitchover => {
            // (The control socket answers `status` only between migrations; the
            // paused state is checked after the fault.)
            wait_query(src, "pre-switchover", |q| q["status"] == "pre-switchover");
        }
        State::DeviceStateSent => {
            proxy.wait_for("End, after the state sections", WAIT, |p| {
                p.held_before == Some(SectionId::End)
            });
            proxy.with_state(|p| {
                for id in [SectionId::Vcpus, SectionId::Vm, SectionId::Devices] {
                    assert_eq!(p.count(id), 1, "{id} went through: {p:?}");
                }
            });
        }
        State::BeforeConfirmation => {
            proxy.wait_for("the destination's Loaded", WAIT, |p| {
                p.count(SectionId::End) == 1 && p.reply_held && p.replies_seen >= 2
            });
        }
    }
    t
}

fn inject(fault: Fault, state: State, src: &VmProcess, dst: &mut VmProcess, proxy: &Proxy) {
    match fault {
        Fault::KillDestination => {
            dst.child.kill().expect("kill the destination");
            let _ = dst.child.wait();
        }
        Fault::CloseConnection => proxy.close(),
        Fault::CutLink => proxy.cut(Duration::from_millis(500)),
        Fault::Cancel => {
            src.ok("migrate-cancel");
            if matches!(
                state,
                State::FirstPass | State::LaterPass | State::Throttled
            ) {
                // The source is blocked writing into the held link; cancel is
                // noticed at the next batch, so the link goes on (see
                // cancel_on_a_stalled_link_returns_promptly for a dead link).
                proxy.release();
            }
        }
    }
    if state == State::PreSwitchover && fault != Fault::Cancel {
        // libvirt continues once it is ready; only then can the source notice.
        src.ok("migrate-continue");
    }
}

/// A paused VM stays paused: no heartbeat in a while.
fn assert_stays_paused(vm: &VmProcess) {
    let status = vm.ok("status");
    assert_eq!(status["status"], "paused", "{status}");
    let before = vm.serial_output().len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        vm.serial_output().len(),
        before,
        "a paused copy printed heartbeats"
    );
}

/// The copy that is the VM: heartbeats go on, the oracle passes, and it runs on.
fn assert_the_one(vm: &VmProcess, s: &Scratch, tag: &str) {
    let status = vm.ok("status");
    assert_eq!(status["status"], "running", "{status}");
    vm.wait_heartbeats(50, WAIT);
    let report = vm.oracle(s, tag);
    assert!(report.passes > 0, "{report:?}");
    vm.ok("resume");
}

/// One case; returns the process that carries the VM on.
fn case(s: &Scratch, src: VmProcess, state: State, fault: Fault, n: usize) -> VmProcess {
    let t0 = Instant::now();
    let tag = format!("dst{n}");
    let (mut dst, addr) = start_destination(s, &tag);
    let proxy = Proxy::start(addr);
    let migration = drive_to(state, &src, &proxy);
    inject(fault, state, &src, &mut dst, &proxy);
    if (state, fault) == (State::DeviceStateSent, Fault::Cancel) {
        // Once the source gave up, what was in flight arrives: End goes through.
        let deadline = Instant::now() + WAIT;
        while !migration.is_finished() {
            assert!(
                Instant::now() < deadline,
                "cancel after End did not end the migration"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        proxy.release();
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    while !migration.is_finished() {
        assert!(
            Instant::now() < deadline,
            "{state:?} x {fault:?}: the migration did not end; source {}, proxy {}; source \
             stderr: {}",
            query(&src),
            proxy.with_state(|p| format!("{p:?}")),
            src.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let reply = migration.join().expect("migrate thread");
    let want = expected(state, fault);
    assert_eq!(reply["ok"], false, "{state:?} x {fault:?}: {reply}");
    let error = reply["error"].as_str().unwrap_or_default().to_string();
    let q = query(&src);
    let survivor = match want {
        Survivor::SourceRunning => {
            // A clear error: what failed, and that the source keeps the VM.
            let clear = match fault {
                Fault::Cancel => error.contains("cancelled"),
                _ => ["destination", "stream", "connection", "return path"]
                    .iter()
                    .any(|w| error.contains(w)),
            };
            assert!(clear, "{state:?} x {fault:?}: unclear error {error:?}");
            assert_eq!(reply["status"], "running", "{reply}");
            let want_status = if fault == Fault::Cancel {
                "cancelled"
            } else {
                "failed"
            };
            assert_eq!(q["status"], want_status, "{q}");
            // The destination never ran the VM: it exits with an error (or was killed).
            if fault != Fault::KillDestination {
                assert_eq!(dst.wait_exit(WAIT), Some(1), "{}", dst.stderr_text());
                let why = dst.stderr_text();
                assert!(
                    why.contains("stream") && !dst.control.exists(),
                    "{state:?} x {fault:?}: the destination's error: {why}"
                );
            }
            assert_the_one(&src, s, &format!("src-after-{n}"));
            drop(dst);
            src
        }
        Survivor::SourcePausedOperatorResumes | Survivor::Destination => {
            assert!(
                error.contains("did not confirm") && error.contains("stays paused"),
                "{state:?} x {fault:?}: {error:?}"
            );
            assert_eq!(reply["status"], "paused", "{reply}");
            assert_eq!(q["status"], "failed", "{q}");
            if want == Survivor::Destination {
                // The destination got End: it loaded the VM and runs it.
                dst.wait_for_control();
                assert_the_one(&dst, s, &format!("dst-after-{n}"));
                assert_stays_paused(&src);
                // The operator destroys the stale source.
                src.quit();
                dst
            } else {
                if fault != Fault::KillDestination {
                    assert_eq!(dst.wait_exit(WAIT), Some(1), "{}", dst.stderr_text());
                    let why = dst.stderr_text();
                    assert!(why.contains("stream"), "{state:?} x {fault:?}: {why}");
                } else {
                    assert!(dst.child.try_wait().expect("try_wait").is_some());
                }
                assert_stays_paused(&src);
                // As the error says: the destination is gone, so resume the source.
                src.ok("resume");
                assert_the_one(&src, s, &format!("src-resumed-{n}"));
                drop(dst);
                src
            }
        }
    };
    drop(proxy);
    eprintln!(
        "{state:?} x {fault:?}: {want:?} in {:.1} s; error: {error}",
        t0.elapsed().as_secs_f64()
    );
    survivor
}

fn row(state: State) {
    require_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = Scratch::new();
    let mut vm = start_source(&s, "src");
    for (i, fault) in FAULTS.into_iter().enumerate() {
        vm = case(&s, vm, state, fault, i);
    }
    vm.quit();
}

#[test]
fn faults_in_setup() {
    row(State::Setup);
}

#[test]
fn faults_in_first_pass() {
    row(State::FirstPass);
}

#[test]
fn faults_in_later_pass() {
    row(State::LaterPass);
}

#[test]
fn faults_while_throttled() {
    row(State::Throttled);
}

#[test]
fn faults_in_pre_switchover() {
    row(State::PreSwitchover);
}

#[test]
fn faults_after_device_state() {
    row(State::DeviceStateSent);
}

#[test]
fn faults_before_confirmation() {
    row(State::BeforeConfirmation);
}

/// A small tmpfs mounted for one test, unmounted (lazily) on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(bytes: u64) -> Self {
        let dir = tempfile::tempdir().expect("mount point");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes},mode=0700"),
                "ferry-test",
            ])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a {bytes}-byte tmpfs on {}: the disk-full cases need root",
            dir.path().display()
        );
        Self { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Disk full while checkpointing to a file: during the RAM pages of a live
/// migration into a file, during the RAM of a `checkpoint`, and in its last
/// pages (the state sections and End). The source runs on, the error names the
/// full disk, and nothing restorable is left under the checkpoint's name.
#[test]
fn disk_full_checkpoint_to_file() {
    require_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = Scratch::new();
    let src = start_source(&s, "src");

    // The size of a whole checkpoint of this guest (every page is filled, so it
    // does not change while the guest runs).
    let full = s.path("full.ckpt");
    src.ok(&format!("checkpoint {}", full.display()));
    let size = std::fs::metadata(&full).expect("checkpoint size").len();
    std::fs::remove_file(&full).expect("remove");

    let cases: [(&str, u64, bool); 3] = [
        ("live migration into a file, first pass", 8 << 20, true),
        ("checkpoint, RAM pages", 8 << 20, false),
        // Room for all but the last page or two: it fails writing the state or End.
        (
            "checkpoint, state sections / End",
            (size / 4096 - 1) * 4096,
            false,
        ),
    ];
    for (what, bytes, live) in cases {
        let t0 = Instant::now();
        let fs = Tmpfs::mount(bytes);
        let file = fs.path("vm.ckpt");
        let cmd = if live {
            format!("migrate file:{}", file.display())
        } else {
            format!("checkpoint {}", file.display())
        };
        let reply = src.command(&cmd);
        assert_eq!(reply["ok"], false, "{what}: {reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(error.contains("No space left on device"), "{what}: {error}");
        if live {
            assert_eq!(query(&src)["status"], "failed", "{what}");
        }
        // Nothing that could be mistaken for a checkpoint: `checkpoint` and a live
        // migration into a file write a temporary file and rename it when whole,
        // so nothing is left. (Before, a live migration into a file left what it
        // wrote under the final name.)
        let left: Vec<_> = std::fs::read_dir(fs.dir.path()).expect("list").collect();
        assert!(left.is_empty(), "{what}: files left: {left:?}");
        assert_the_one(&src, &s, &format!("src-{}", t0.elapsed().as_micros()));
        drop(fs);
        eprintln!(
            "disk full, {what}: {:.1} s; error: {error}",
            t0.elapsed().as_secs_f64()
        );
    }
    src.quit();
}

/// Cancel on a link that moves nothing (the source blocked in a write) must
/// still end the migration promptly and resume the source, as QEMU's
/// migrate_cancel does by shutting the socket down.
#[test]
fn cancel_on_a_stalled_link_returns_promptly() {
    require_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = Scratch::new();
    let src = start_source(&s, "src");
    let (mut dst, addr) = start_destination(&s, "dst");
    let proxy = Proxy::start(addr);
    let migration = drive_to(State::FirstPass, &src, &proxy);
    proxy.stall();
    let t0 = Instant::now();
    src.ok("migrate-cancel");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !migration.is_finished() {
        assert!(
            Instant::now() < deadline,
            "migrate-cancel on a stalled link did not end the migration in 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let reply = migration.join().expect("migrate thread");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cancelled"),
        "{reply}"
    );
    eprintln!("cancel on a stalled link: {:?}", t0.elapsed());
    assert_the_one(&src, &s, "src-after");
    drop(proxy);
    let _ = dst.wait_exit(WAIT);
    src.quit();
}

/// A destination that refuses in the middle of the page stream says why on the
/// return path and closes: the source's next write then fails (connection
/// reset), but what the operator reads is the destination's reason. The
/// destination here is a stand-in that accepts the handshake, reads a little of
/// the stream, refuses and closes with the rest unread (as a real one does on a
/// bad page), and the source keeps running.
#[test]
fn a_destination_refusing_mid_stream_is_heard() {
    use ferry_format::{Limits, StreamReader, StreamWriter};
    use std::io::Read;
    require_kvm();
    let s = Scratch::new();
    let src = start_source(&s, "src");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let reason = "the stand-in destination refuses page 0x1000 (a test)";
    let dest = std::thread::spawn(move || {
        let (conn, _) = listener.accept().expect("the source connects");
        let mut out =
            StreamWriter::new(conn.try_clone().expect("clone"), "ferry-test").expect("preamble");
        let (mut reader, _) = StreamReader::new(conn, Limits::default()).expect("its preamble");
        let mut buf = Vec::new();
        loop {
            let h = reader.next_section(&mut buf).expect("a section");
            if h.id == SectionId::Shape {
                break;
            }
        }
        out.write_cbor(
            SectionId::Reply,
            SectionId::Reply.current_version(),
            "Ready",
        )
        .expect("send Ready");
        let mut conn = reader.into_inner();
        let mut chunk = vec![0u8; 1 << 20];
        conn.read_exact(&mut chunk).expect("1 MiB of the stream");
        let refusal = serde_json::json!({ "Error": { "message": reason } });
        out.write_cbor(
            SectionId::Reply,
            SectionId::Reply.current_version(),
            &refusal,
        )
        .expect("send the refusal");
        // Closed with the stream's rest unread: the kernel resets the connection.
    });
    let reply = src.command(&format!("migrate tcp:{addr}"));
    dest.join().expect("the stand-in destination");
    assert_eq!(reply["ok"], false, "{reply}");
    let err = reply["error"].as_str().unwrap_or_default();
    assert!(
        err.contains(reason) && err.contains("refused"),
        "the source did not report the destination's reason: {err}"
    );
    src.wait_heartbeats(50, WAIT);
    src.quit();
}
