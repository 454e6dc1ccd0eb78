//! Soak and load between `ferry-vm` processes on /dev/kvm: consecutive ping-pong
//! migrations of a dirtying guest, a source that lives through many failed and
//! cancelled migrations without growing in fds, threads or memory, and four
//! migrations at once. CI runs a short soak (`FERRY_SOAK_ROUNDS`, default 10);
//! the full one is `FERRY_SOAK_ROUNDS=100`.

use std::time::{Duration, Instant};

use ferry_tests::{free_port, require_kvm, Scratch, VmProcess};

const BOOT: Duration = Duration::from_secs(30);

fn rounds() -> usize {
    std::env::var("FERRY_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

fn boot(s: &Scratch, tag: &str, mem: &str, append: &str) -> VmProcess {
    let dirtier = s.dirtier.display().to_string();
    let vm = VmProcess::start(
        s,
        tag,
        &["run", "--kernel", &dirtier, "-m", mem, "--append", append],
    );
    vm.wait_serial("dirtier: ready", BOOT);
    vm.wait_heartbeats(100, BOOT);
    vm
}

/// What /proc says of a process: open fds, threads, resident KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Footprint {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

fn footprint(vm: &VmProcess) -> Footprint {
    let pid = vm.child.id();
    let count = |dir: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{dir}"))
            .map(|d| d.count())
            .unwrap_or_else(|e| panic!("/proc/{pid}/{dir}: {e}"))
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    Footprint {
        fds: count("fd"),
        threads: count("task"),
        rss_kib,
    }
}

/// The guest's progress as the oracle counts it.
type Progress = (u64, u64);

/// Migrates `src` to a new process `next` over `uri`; returns the destination
/// once it runs, with heartbeats, a passing oracle and progress beyond `before`.
fn hop(
    s: &Scratch,
    mut src: VmProcess,
    next: &str,
    uri: &str,
    before: Progress,
) -> (VmProcess, Progress, u64) {
    let mut dst = VmProcess::spawn(s, next, &["incoming", uri, "-m", &src.mem]);
    std::thread::sleep(Duration::from_millis(200));
    let reply = src.ok(&format!("migrate {uri}"));
    let stats = &reply["migration"];
    assert_eq!(stats["status"], "completed", "{stats}");
    let downtime = stats["downtime"].as_u64().unwrap_or(0);
    assert_eq!(
        src.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        src.stderr_text()
    );
    dst.wait_for_control();
    dst.wait_heartbeats(30, Duration::from_secs(10));
    let report = dst.oracle(s, next);
    assert!(report.fill_done, "{report:?}");
    let now = (report.passes, report.cursor);
    assert!(
        now > before,
        "{next}: the guest did not go on: {before:?} then {report:?}"
    );
    dst.ok("resume");
    (dst, now, downtime)
}

/// `FERRY_SOAK_ROUNDS` consecutive migrations of one dirtying guest, alternating
/// unix and TCP: every hop completes, the guest runs on with its memory intact.
#[test]
fn ping_pong_soak() {
    require_kvm();
    let s = Scratch::new();
    let n = rounds();
    let mut vm = boot(&s, "g0", "128M", "ws=16M fill=1");
    let start = Instant::now();
    let mut downtimes = Vec::new();
    let mut progress = (0, 0);
    for i in 1..=n {
        let uri = if i % 2 == 0 {
            format!("tcp:127.0.0.1:{}", free_port())
        } else {
            format!("unix:{}", s.path(&format!("hop{i}.sock")).display())
        };
        let (next, now, downtime) = hop(&s, vm, &format!("g{i}"), &uri, progress);
        downtimes.push(downtime);
        progress = now;
        vm = next;
    }
    downtimes.sort_unstable();
    eprintln!(
        "soak: {n} hops in {:.1} s, engine downtime min/median/max {}/{}/{} ms",
        start.elapsed().as_secs_f64(),
        downtimes[0],
        downtimes[downtimes.len() / 2],
        downtimes[downtimes.len() - 1]
    );
    vm.quit();
}

/// One slow migration from `src` to a fresh destination on a unix socket, in a
/// thread; returns the destination and the thread answering `migrate`.
fn slow_start(
    s: &Scratch,
    src: &VmProcess,
    tag: &str,
) -> (VmProcess, std::thread::JoinHandle<serde_json::Value>) {
    let uri = format!("unix:{}", s.path(&format!("{tag}.sock")).display());
    let dst = VmProcess::spawn(s, tag, &["incoming", &uri, "-m", &src.mem]);
    std::thread::sleep(Duration::from_millis(200));
    let t = src.command_in_thread(&format!("migrate {uri}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let q = src.ok("query-migrate");
        if q["status"] == "active" && q["ram"]["transferred"].as_u64().unwrap_or(0) > (8 << 20) {
            break;
        }
        assert!(Instant::now() < deadline, "pages never flowed: {q}");
        std::thread::sleep(Duration::from_millis(10));
    }
    (dst, t)
}

/// One source lives through cancelled migrations, killed destinations and
/// refusals, in turn: each time it runs on with intact memory, and after the
/// first rounds its open fds and threads stay exactly the same and its
/// resident memory grows by less than 8 MiB.
#[test]
fn failed_migrations_leak_nothing_in_the_source() {
    require_kvm();
    let s = Scratch::new();
    let src = boot(&s, "src", "256M", "ws=16M fill=1");
    src.ok("migrate-set max-bandwidth=33554432");
    let n = rounds().max(6);
    let (mut warm, mut last) = (None, None);
    for i in 0..n {
        let tag = format!("d{i}");
        match i % 3 {
            0 => {
                let (mut dst, t) = slow_start(&s, &src, &tag);
                src.ok("migrate-cancel");
                let r = t.join().expect("migrate thread");
                assert_eq!(r["ok"], false, "{r}");
                assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(1));
            }
            1 => {
                let (mut dst, t) = slow_start(&s, &src, &tag);
                dst.child.kill().expect("kill destination");
                let _ = dst.child.wait();
                let r = t.join().expect("migrate thread");
                assert_eq!(r["ok"], false, "{r}");
            }
            _ => {
                let uri = format!("unix:{}", s.path(&format!("{tag}.sock")).display());
                let mut dst = VmProcess::spawn(&s, &tag, &["incoming", &uri, "-m", "512M"]);
                dst.wait_listening();
                let r = src.command(&format!("migrate {uri}"));
                assert_eq!(r["ok"], false, "{r}");
                // Refused; the destination waits on for its right source.
                assert_eq!(dst.child.try_wait().ok().flatten(), None);
                let _ = dst.child.kill();
                let _ = dst.child.wait();
            }
        }
        let status = src.ok("status");
        assert_eq!(status["status"], "running", "round {i}: {status}");
        src.wait_heartbeats(20, Duration::from_secs(10));
        // Let the threads of the failed migration finish.
        std::thread::sleep(Duration::from_millis(300));
        let fp = footprint(&src);
        eprintln!("round {i}: {fp:?}");
        if i == 2 {
            warm = Some(fp);
        }
        last = Some(fp);
    }
    let report = src.oracle(&s, "src-end");
    assert!(report.fill_done && report.passes > 0, "{report:?}");
    src.ok("resume");
    let (warm, end) = (warm.expect("warm footprint"), last.expect("footprint"));
    assert_eq!(
        (end.fds, end.threads),
        (warm.fds, warm.threads),
        "fds/threads grew: {warm:?} -> {end:?}"
    );
    assert!(
        end.rss_kib < warm.rss_kib + 8 * 1024,
        "resident memory grew: {warm:?} -> {end:?}"
    );
    src.quit();
}

/// Four guests migrate at once, each to its own destination: all complete and
/// every destination runs with its memory intact.
#[test]
fn four_concurrent_migrations() {
    require_kvm();
    let s = Scratch::new();
    let sources: Vec<VmProcess> = (0..4)
        .map(|i| boot(&s, &format!("c{i}"), "128M", "ws=8M fill=1"))
        .collect();
    let start = Instant::now();
    let moved: Vec<(VmProcess, u64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = sources
            .into_iter()
            .enumerate()
            .map(|(i, src)| {
                let s = &s;
                scope.spawn(move || {
                    let uri = format!("unix:{}", s.path(&format!("c{i}.sock")).display());
                    let (dst, _, downtime) = hop(s, src, &format!("c{i}-dst"), &uri, (0, 0));
                    (dst, downtime)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("migration thread"))
            .collect()
    });
    eprintln!(
        "4 concurrent migrations in {:.2} s, downtimes {:?} ms",
        start.elapsed().as_secs_f64(),
        moved.iter().map(|m| m.1).collect::<Vec<_>>()
    );
    for (vm, _) in moved {
        vm.quit();
    }
}
