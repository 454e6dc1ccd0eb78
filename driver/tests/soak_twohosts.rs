//! Soak and load between two real libvirt hosts (tests/twohosts/): a dirtier
//! domain of ferry-qemu migrated live A -> B -> A -> ... many times (plain
//! `virsh migrate` one way, `--p2p` the other), checked after every hop
//! (heartbeats, the memory oracle, one running copy) while libvirtd's and the
//! emulator's file descriptors, threads and memory are watched for leaks;
//! then four domains migrated A -> B at once, and one over two connections
//! (`virsh migrate --parallel --parallel-connections 2`, QEMU's multifd).
//!
//! `FERRY_SOAK_ROUNDS` sets the number of hops (default 4: A -> B -> A -> B
//! -> A). Figures are printed as `SOAK` / `CONCURRENT` lines (run with
//! `--nocapture` to see them).
//!
//! Skipped, with the reason printed, where the hosts cannot be brought up;
//! in CI (`CI` set) that is a failure.

mod twohosts;

use std::time::{Duration, Instant};

use twohosts::lab::{ms, Lab, MAX_PASSES};
use twohosts::{text, ProcStats, DEST_A, DEST_B};

/// How many #[test]s share the hosts: the last one to finish tears them down.
const TESTS: usize = 3;

fn lab() -> Option<twohosts::lab::LabGuard> {
    twohosts::lab::lab(TESTS)
}

/// Growth of libvirtd between the end of the warm-up (the first round trip,
/// during which its worker pool and caches fill) and the end of the soak that
/// is still not a leak. Measured over 100 hops: no fd, no thread, about
/// 1 MiB of RSS on each host (10 KiB a hop: 1000 hops would fail this).
const LIBVIRTD_FDS: usize = 2;
const LIBVIRTD_THREADS: u64 = 2;
const LIBVIRTD_RSS_KIB: u64 = 4 << 10;
/// Spread of the destination emulator's fds and threads across hops.
const EMULATOR_FDS: usize = 2;
const EMULATOR_THREADS: u64 = 2;

/// The number of hops: `FERRY_SOAK_ROUNDS`, default 4.
fn hops() -> usize {
    std::env::var("FERRY_SOAK_ROUNDS").map_or(4, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("FERRY_SOAK_ROUNDS={v:?} is not a number of hops"))
    })
}

/// Both hosts' libvirtd, now.
fn daemons(lab: &Lab) -> [ProcStats; 2] {
    ["A", "B"].map(|h| {
        let pid = lab.hosts.libvirtd_pid(h);
        ProcStats::of(pid).unwrap_or_else(|| panic!("libvirtd {pid} on host {h} is gone"))
    })
}

/// Minimum, median and maximum of `v` (not empty).
fn spread(v: &[u64]) -> (u64, u64, u64) {
    let mut v = v.to_vec();
    v.sort_unstable();
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// One hop of the soak.
#[derive(Debug)]
struct Hop {
    wall: Duration,
    job_ms: u64,
    downtime_ms: u64,
    emulator: ProcStats,
}

/// `FERRY_SOAK_ROUNDS` live migrations of a 128 MiB dirtier (16 MiB working
/// set), alternately A -> B (plain) and B -> A (`--p2p`). After every hop:
/// the guest runs on the destination only, its heartbeats go on there, its
/// memory passes the oracle and its passes went on. libvirtd on both hosts
/// holds no more fds, threads and memory at the end than after the first
/// round trip (within the tolerances above), and every hop's destination
/// emulator has as many fds and threads as the first one's.
#[test]
fn ping_pong_live_migrations_leak_nothing() {
    let Some(lab) = lab() else { return };
    let dom = "ferry-soak";
    let mib = 128;
    let n = hops();
    assert!(n >= 2, "FERRY_SOAK_ROUNDS={n}: at least one round trip");
    lab.start("A", dom, &lab.dirtier(dom, mib, "ws=16M fill=1"));
    let initial = daemons(&lab);
    let mut warm = initial;
    let mut hops: Vec<Hop> = Vec::new();
    let mut last = lab.oracle("A", dom, mib);
    let t0 = Instant::now();
    for i in 0..n {
        let (from, to, dest, extra): (_, _, _, &[&str]) = if i % 2 == 0 {
            ("A", "B", DEST_B, &[])
        } else {
            ("B", "A", DEST_A, &["--p2p"])
        };
        let wall = lab.migrate(from, dom, dest, extra);
        // The destination's statistics (those of the source are gone with B's
        // transient copy): the same figures, the source's sent in libvirt's cookie.
        let st = lab.jobinfo(to, dom, true);
        let (Some(job_ms), Some(downtime_ms)) =
            (ms(&st, "Time elapsed"), ms(&st, "Total downtime"))
        else {
            panic!(
                "hop {}: no completed job statistics on {from}: {st:?}",
                i + 1
            );
        };
        lab.assert_runs_only_on(to, dom);
        lab.heartbeats(to, dom);
        let report = lab.oracle(to, dom, mib);
        assert!(
            (report.passes, report.cursor) > (last.passes, last.cursor),
            "hop {}: the guest did not go on: {last:?} then {report:?}",
            i + 1
        );
        last = report;
        let pid = lab.hosts.emulator_pids(to, dom)[0];
        let emulator = ProcStats::of(pid).expect("the running emulator");
        eprintln!(
            "SOAK hop {}/{n} {from}->{to}{}: virsh {} ms, job {job_ms} ms, downtime \
             {downtime_ms} ms, setup {} ms, {} iterations; ferry-qemu {pid}: {emulator}",
            i + 1,
            if extra.is_empty() { "" } else { " p2p" },
            wall.as_millis(),
            ms(&st, "Setup time").map_or("?".to_owned(), |v| v.to_string()),
            st.get("Iteration").map_or("?", String::as_str),
        );
        hops.push(Hop {
            wall,
            job_ms,
            downtime_ms,
            emulator,
        });
        if i == 1 {
            warm = daemons(&lab);
        }
    }
    let total = t0.elapsed();
    let end = daemons(&lab);
    lab.forget(dom);

    let walls: Vec<u64> = hops.iter().map(|h| h.wall.as_millis() as u64).collect();
    let jobs: Vec<u64> = hops.iter().map(|h| h.job_ms).collect();
    let downs: Vec<u64> = hops.iter().map(|h| h.downtime_ms).collect();
    let (fds, threads): (Vec<u64>, Vec<u64>) = hops
        .iter()
        .map(|h| (h.emulator.fds as u64, h.emulator.threads))
        .unzip();
    eprintln!(
        "SOAK {n} hops, 0 failed, {} ms in all; virsh migrate ms min/median/max {:?}; job ms \
         {:?}; downtime ms {:?}; destination ferry-qemu fds {:?}, threads {:?}",
        total.as_millis(),
        spread(&walls),
        spread(&jobs),
        spread(&downs),
        spread(&fds),
        spread(&threads),
    );
    for (k, h) in ["A", "B"].iter().enumerate() {
        eprintln!(
            "SOAK libvirtd {h}: before {} | after the first round trip {} | after {n} hops {}",
            initial[k], warm[k], end[k]
        );
    }
    for (k, h) in ["A", "B"].iter().enumerate() {
        let (w, e) = (warm[k], end[k]);
        assert!(
            e.fds <= w.fds + LIBVIRTD_FDS
                && e.threads <= w.threads + LIBVIRTD_THREADS
                && e.rss_kib <= w.rss_kib + LIBVIRTD_RSS_KIB,
            "libvirtd on host {h} grew over {n} hops: {w} -> {e} (tolerance fds \
             {LIBVIRTD_FDS}, threads {LIBVIRTD_THREADS}, rss {LIBVIRTD_RSS_KIB} KiB)"
        );
    }
    let first = hops[0].emulator;
    for (i, h) in hops.iter().enumerate() {
        assert!(
            h.emulator.fds <= first.fds + EMULATOR_FDS
                && h.emulator.threads <= first.threads + EMULATOR_THREADS,
            "hop {}: the destination ferry-qemu holds more than the first hop's: {} vs {first}",
            i + 1,
            h.emulator
        );
    }
}

/// Four 64 MiB dirtier domains migrated A -> B (`--p2p`) at once, from four
/// threads: all complete, each runs on B only and passes the oracle there.
#[test]
fn four_concurrent_live_migrations_all_complete() {
    let Some(lab) = lab() else { return };
    let lab: &Lab = &lab;
    let mib = 64;
    let doms: Vec<String> = (0..4).map(|i| format!("ferry-conc{i}")).collect();
    let started = Instant::now();
    std::thread::scope(|s| {
        for d in &doms {
            s.spawn(move || lab.start("A", d, &lab.dirtier(d, mib, "ws=8M fill=1")));
        }
    });
    let started = started.elapsed();
    let t0 = Instant::now();
    let walls: Vec<Duration> = std::thread::scope(|s| {
        let running: Vec<_> = doms
            .iter()
            .map(|d| s.spawn(move || lab.migrate("A", d, DEST_B, &["--p2p"])))
            .collect();
        running
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let total = t0.elapsed();
    let checked = Instant::now();
    let mut lines = Vec::new();
    for (d, wall) in doms.iter().zip(&walls) {
        let st = lab.jobinfo("A", d, true);
        lab.assert_runs_only_on("B", d);
        lab.heartbeats("B", d);
        lab.oracle("B", d, mib);
        // Four spinning guests on a small machine slow everything down: one
        // fewer for the next check.
        lab.forget(d);
        lines.push(format!(
            "{d}: virsh {} ms, job {} ms, downtime {} ms, {} iterations",
            wall.as_millis(),
            ms(&st, "Time elapsed").map_or("?".to_owned(), |v| v.to_string()),
            ms(&st, "Total downtime").map_or("?".to_owned(), |v| v.to_string()),
            st.get("Iteration").map_or("?", String::as_str),
        ));
    }
    let checked = checked.elapsed();
    eprintln!(
        "CONCURRENT 4 x {mib} MiB A->B --p2p: all done in {} ms; {} (starting the 4 took {} \
         ms, checking them {} ms)",
        total.as_millis(),
        lines.join("; "),
        started.as_millis(),
        checked.as_millis(),
    );
}

/// The established TCP connections on host `h` whose local port is one
/// libvirt gives incoming migrations (its `migration_port_min`..`max`).
fn migration_connections(lab: &Lab, h: &str) -> usize {
    let out = lab.hosts.sh(h, &["ss", "-Htn", "state", "established"]);
    assert!(out.status.success(), "ss on host {h}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(2)?
                .rsplit_once(':')?
                .1
                .parse::<u16>()
                .ok()
        })
        .filter(|port| (49152..=49215).contains(port))
        .count()
}

/// `virsh migrate --live --parallel --parallel-connections 2`: ferry-qemu
/// takes the multifd capability and 2 channels from libvirt on both sides,
/// the source opens two connections to the destination's migration port (seen
/// there with `ss` while the migration runs, capped at 32 MiB/s so that it
/// lasts), the pages go over the page streams (multifd-bytes) and the guest
/// arrives whole; then back with `--p2p --parallel`, uncapped.
#[test]
fn parallel_connections_migrate_over_two_streams() {
    let Some(lab) = lab() else { return };
    let dom = "ferry-parallel";
    let mib = 128;
    lab.start("A", dom, &lab.dirtier(dom, mib, "ws=16M fill=1"));
    let log_from = lab.daemon_log_len("A");
    let parallel = ["--parallel", "--parallel-connections", "2"];
    let mut args = parallel.to_vec();
    args.extend(["--bandwidth", "32"]);
    let t0 = Instant::now();
    let child = lab.migrate_spawn("A", dom, DEST_B, &args);
    // B's connections, counted while the migration runs.
    let counting = std::sync::atomic::AtomicBool::new(true);
    let (seen, (out, _)) = std::thread::scope(|scope| {
        let counter = scope.spawn(|| {
            let mut seen = 0;
            while counting.load(std::sync::atomic::Ordering::Acquire) {
                seen = seen.max(migration_connections(&lab, "B"));
                std::thread::sleep(Duration::from_millis(100));
            }
            seen
        });
        let end = lab.wait_migration_end("A", dom, child, MAX_PASSES);
        counting.store(false, std::sync::atomic::Ordering::Release);
        (counter.join().expect("the connection counter"), end)
    });
    let wall = t0.elapsed();
    assert!(
        out.status.success(),
        "virsh migrate --parallel: {}\n{}",
        text(&out),
        lab.diagnose(dom)
    );
    assert_eq!(
        seen, 2,
        "B did not take the migration over 2 connections (at most {seen} at once)"
    );
    let st = lab.jobinfo("A", dom, true);
    lab.assert_moved(dom, "A", "B", mib);
    lab.assert_runs_only_on("B", dom);
    let log = lab.daemon_log_since("A", log_from);
    assert!(
        log.contains("\"multifd-channels\":2"),
        "A's libvirtd did not set 2 multifd channels"
    );
    let multifd = log
        .split("\"multifd-bytes\":")
        .skip(1)
        .filter_map(|r| {
            r.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    assert!(
        multifd >= (mib << 20) / 2,
        "the pages did not go over the page streams: multifd-bytes {multifd}"
    );
    let back = lab.migrate("B", dom, DEST_A, &[&["--p2p"][..], &parallel].concat());
    lab.assert_moved(dom, "B", "A", mib);
    lab.assert_runs_only_on("A", dom);
    eprintln!(
        "PARALLEL 2 connections {mib} MiB A->B at 32 MiB/s: virsh {} ms, job {} ms, downtime \
         {} ms, {} connections seen on B, multifd-bytes {multifd}; back B->A --p2p uncapped: \
         virsh {} ms",
        wall.as_millis(),
        ms(&st, "Time elapsed").map_or("?".to_owned(), |v| v.to_string()),
        ms(&st, "Total downtime").map_or("?".to_owned(), |v| v.to_string()),
        seen,
        back.as_millis(),
    );
    lab.forget(dom);
}
