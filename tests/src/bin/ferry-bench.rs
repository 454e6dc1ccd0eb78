//! `ferry-bench`: migrates the dirtier over loopback TCP for a matrix of RAM sizes and
//! working sets, with ferry and (where installed) QEMU in the same run, and prints
//! min/median/max of total time, engine downtime, guest-observed downtime (largest gap
//! between heartbeats timed on the host), bytes sent, passes, throttle and the share of
//! time the guest was stalled, plus ferry/QEMU ratios.

use std::process::ExitCode;
use std::time::Duration;

use ferry_tests::migrate::{
    qemu_binary, run_ferry, run_ferry_qemu, run_qemu, RunConfig, RunResult, POSTCOPY_AFTER_SYNCS,
};
use ferry_tests::pki::{psk_dir, Ca};
use ferry_tests::Scratch;

const USAGE: &str = "usage: ferry-bench [--ram 256M,1G,4G] [--ws idle,filled,64M,50%,100% (WS+fill: every page written first)] [--repeats N] [--max-bandwidth|--bandwidth MiB/s] [--streams 1,2,4] [--tls none,x509,psk] [--memory] [--set KEY=VALUE]... [--no-qemu] [--no-ferry-qemu] [--downtime-limit MS] [--settle MS (pause before each run, default 1000)] [--host-memory warm|as-is] | --postcopy [--ram 1G] [--ws 100%,64M] [--bandwidth 128] [--repeats N] [--downtime-limit MS] | --checkpoint [--repeats N] | --disk [--disk-mib M] [--repeats N] | --boot [--repeats N]";

/// The pause before each run (the last run's processes are gone, their memory
/// freed); the order of the engines rotates per repeat as well.
const SETTLE: Duration = Duration::from_millis(1000);

/// Machines of this project's kind are VMs whose kernel hands free memory back
/// to the hypervisor under them (virtio-balloon free page reporting, of free
/// blocks of 2 MiB and up, within seconds). The next process to touch such
/// memory waits for the hypervisor to back it again: about 1.4 s per GiB here,
/// against 0.03-0.1 s for memory still backed. Which kind a destination gets
/// depends on what ran before and when, and it moves a 1 GiB migration's time by
/// seconds, for QEMU as for ferry. Unless `--host-memory as-is`, the bench turns
/// reporting off while it runs (the kernel's `page_reporting_order` past the
/// largest block) and touches once as much memory as the runs will use, so
/// every run's first touch costs what it does on a host with its own memory.
const PAGE_REPORTING_ORDER: &str = "/sys/module/page_reporting/parameters/page_reporting_order";

/// Turns free page reporting off for its lifetime (see [`PAGE_REPORTING_ORDER`]).
struct HostMemory {
    restore: Option<String>,
}

impl HostMemory {
    /// Reporting off and `bytes` of memory touched once; says what it did.
    fn warm(bytes: u64) -> Self {
        let restore = std::fs::read_to_string(PAGE_REPORTING_ORDER)
            .ok()
            .map(|s| s.trim().to_string());
        let Some(order) = restore else {
            println!(
                "host memory: this kernel does not report free pages; first touch as it comes"
            );
            return Self { restore: None };
        };
        if let Err(e) = std::fs::write(PAGE_REPORTING_ORDER, "11") {
            println!(
                "host memory: cannot turn free page reporting off ({PAGE_REPORTING_ORDER}: {e}; \
                 run as root): first touch may wait for the hypervisor, times vary by seconds"
            );
            return Self { restore: None };
        }
        // Touch every page once, then free it: backed, and no longer reported.
        let mut chunks = Vec::new();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(1 << 30) as usize;
            let mut v = vec![0u8; n];
            for b in v.iter_mut().step_by(4096) {
                *b = 1;
            }
            chunks.push(v);
            left -= n as u64;
        }
        let touched: u64 = std::hint::black_box(&chunks)
            .iter()
            .map(|c| c.len() as u64)
            .sum();
        drop(chunks);
        println!(
            "host memory: free page reporting off for the run (was order {order}), {} MiB touched \
             once: first touch costs what it costs on a host with its own memory",
            touched >> 20
        );
        Self {
            restore: Some(order),
        }
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        if let Some(order) = &self.restore {
            if let Err(e) = std::fs::write(PAGE_REPORTING_ORDER, order) {
                eprintln!("ferry-bench: cannot restore {PAGE_REPORTING_ORDER} to {order}: {e}");
            }
        }
    }
}

#[derive(Default)]
struct Series {
    total: Vec<f64>,
    downtime: Vec<f64>,
    guest_gap: Vec<f64>,
    mib: Vec<f64>,
    passes: Vec<f64>,
    throttle: Vec<f64>,
    stalled: Vec<f64>,
    /// MiB outside guest RAM: source peak - before, destination peak - after, and
    /// destination peak - before (with the VM's own baseline).
    src_mem: Vec<f64>,
    /// Milliseconds in KVM_GET_DIRTY_LOG and KVM_CLEAR_DIRTY_LOG, whole migration.
    sync_ms: Vec<f64>,
    clear_ms: Vec<f64>,
    dst_mem: Vec<f64>,
    dst_mem_total: Vec<f64>,
    failures: Vec<String>,
    /// Runs whose destination memory the oracle passed.
    intact: usize,
    /// Post-copy runs: ms to the switch, heartbeats/s before and during
    /// post-copy (see `PostcopyPhase`), MiB sent after the switch.
    switch_ms: Vec<f64>,
    beats_before: Vec<f64>,
    beats_during: Vec<f64>,
    postcopy_mib: Vec<f64>,
}

impl Series {
    fn add(&mut self, r: &RunResult) {
        let st = &r.stats;
        self.total
            .push(st["total-time"].as_f64().unwrap_or(r.wall_ms));
        self.downtime
            .push(st["downtime"].as_f64().unwrap_or(f64::NAN));
        self.guest_gap.push(r.guest_downtime_ms);
        self.mib
            .push(st["ram"]["transferred"].as_f64().unwrap_or(0.0) / 1048576.0);
        self.passes.push(
            st["passes"]
                .as_f64()
                .or_else(|| st["ram"]["dirty-sync-count"].as_f64())
                .unwrap_or(0.0),
        );
        self.throttle
            .push(st["cpu-throttle-percentage"].as_f64().unwrap_or(0.0));
        self.stalled.push(r.guest_stalled_pct);
        if let Some(us) = st["dirty-sync-us"].as_f64() {
            self.sync_ms.push(us / 1e3);
            self.clear_ms
                .push(st["dirty-clear-us"].as_f64().unwrap_or(0.0) / 1e3);
        }
        if let Some(m) = &r.memory {
            let mib = |a: u64, b: u64| a.saturating_sub(b) as f64 / 1048576.0;
            self.src_mem.push(mib(m.src_peak, m.src_before));
            self.dst_mem.push(mib(m.dst_peak, m.dst_after));
            self.dst_mem_total.push(mib(m.dst_peak, m.dst_before));
        }
        match &r.oracle {
            Ok(_) => self.intact += 1,
            Err(e) if !e.starts_with("not checked") => self.failures.push(format!("oracle: {e}")),
            Err(_) => {}
        }
        if let Some(p) = &r.postcopy {
            self.switch_ms.push(p.switch_ms);
            self.beats_before.push(p.beats_before);
            self.beats_during.push(p.beats_during);
            self.postcopy_mib
                .push(st["ram"]["postcopy-bytes"].as_f64().unwrap_or(f64::NAN) / 1048576.0);
        }
    }
}

/// The dirtier's command line for a `--ws` value.
fn dirtier_append(ws: &str) -> String {
    match ws {
        "idle" => "ws=0".to_string(),
        // Every page written once, then idle: pure page throughput.
        "filled" => "ws=0 fill=1".to_string(),
        // A working set over RAM whose every page was written once.
        _ => match ws.strip_suffix("+fill") {
            Some(ws) => format!("ws={ws} fill=1"),
            None => format!("ws={ws}"),
        },
    }
}

/// Bytes of the largest guest of `rams`; the host memory warmed is three times
/// that: source and destination of the largest guest, and as much again.
fn largest_ram(rams: &[String]) -> u64 {
    rams.iter()
        .map(|r| ferry_tests::migrate::parse_mem(r))
        .max()
        .unwrap_or(0)
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    s.sort_by(|a, b| a.total_cmp(b));
    (s[0], s[s.len() / 2], s[s.len() - 1])
}

fn fmt3(v: &[f64]) -> String {
    let (a, m, b) = stats(v);
    format!("{a:.0}/{m:.0}/{b:.0}")
}

fn fmt3_1(v: &[f64]) -> String {
    let (a, m, b) = stats(v);
    format!("{a:.1}/{m:.1}/{b:.1}")
}

fn median(v: &[f64]) -> f64 {
    stats(v).1
}

fn main() -> ExitCode {
    let mut rams = None;
    let mut wss = None;
    let mut postcopy = false;
    let mut repeats = 3;
    let mut qemu = true;
    let mut bw = None;
    let mut limit = 300u64;
    let mut checkpoint = false;
    let mut disk = false;
    let mut boot = false;
    let mut disk_mib = 256u64;
    let mut streams = vec![1u32];
    let mut tls_modes = vec!["none".to_string()];
    let mut memory = false;
    let mut ferry_qemu = true;
    let mut settings = Vec::new();
    let mut settle = SETTLE;
    let mut host_warm = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_default();
        match a.as_str() {
            "--ram" => rams = Some(val().split(',').map(String::from).collect()),
            "--ws" => wss = Some(val().split(',').map(String::from).collect()),
            "--postcopy" => postcopy = true,
            "--repeats" => repeats = val().parse().unwrap_or(1),
            "--max-bandwidth" | "--bandwidth" => bw = Some(val().parse::<u64>().unwrap_or(0) << 20),
            "--streams" => streams = val().split(',').map(|n| n.parse().unwrap_or(1)).collect(),
            "--tls" => tls_modes = val().split(',').map(String::from).collect(),
            "--memory" => memory = true,
            "--set" => settings.push(val()),
            "--no-ferry-qemu" => ferry_qemu = false,
            "--downtime-limit" => limit = val().parse().unwrap_or(300),
            "--no-qemu" => qemu = false,
            "--settle" => settle = Duration::from_millis(val().parse().unwrap_or(0)),
            "--host-memory" => {
                match val().as_str() {
                    "warm" => host_warm = true,
                    "as-is" => host_warm = false,
                    other => {
                        eprintln!("ferry-bench: --host-memory takes warm or as-is, not '{other}'\n{USAGE}");
                        return ExitCode::from(2);
                    }
                }
            }
            "--checkpoint" => checkpoint = true,
            "--disk" => disk = true,
            "--boot" => boot = true,
            "--disk-mib" => disk_mib = val().parse().unwrap_or(256),
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if checkpoint {
        return checkpoint_bench(repeats);
    }
    if disk {
        return disk_bench(disk_mib, repeats, settle);
    }
    if boot {
        return boot_bench(repeats, settle);
    }
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    if postcopy {
        let rams = rams.unwrap_or_else(|| strings(&["1G"]));
        let wss = wss.unwrap_or_else(|| strings(&["100%", "64M"]));
        let bw = bw.unwrap_or(128 << 20);
        let _host = host_warm.then(|| HostMemory::warm(largest_ram(&rams) * 3));
        return postcopy_bench(&rams, &wss, bw, limit, repeats, settle);
    }
    let rams = rams.unwrap_or_else(|| strings(&["256M", "1G", "4G"]));
    let wss = wss.unwrap_or_else(|| strings(&["idle", "64M", "50%", "100%"]));
    let bw = bw.unwrap_or(0);
    if let Some(bad) = tls_modes
        .iter()
        .find(|m| !["none", "x509", "psk"].contains(&m.as_str()))
    {
        eprintln!("ferry-bench: --tls takes none, x509 and psk, not '{bad}'\n{USAGE}");
        return ExitCode::from(2);
    }
    // Credentials for the TLS series, made once (kept until the end).
    let pki = Scratch::new();
    let tls = |mode: &str| -> (Vec<String>, Vec<String>) {
        match mode {
            "x509" => {
                let ca = Ca::new(&pki.path("ca"), "ferry-bench CA");
                let server = ca.issue(&pki.path("server"), "server", "dst", &["127.0.0.1"]);
                let client = ca.issue(&pki.path("client"), "client", "src", &[]);
                (
                    vec![format!("tls-creds=x509:{}", client.display())],
                    vec!["--tls-creds".into(), format!("x509:{}", server.display())],
                )
            }
            "psk" => {
                let dir = psk_dir(
                    &pki.path("psk"),
                    &[("qemu", "5e2d7c1f9a8b3e4d6c0f1a2b3c4d5e6f")],
                );
                (
                    vec![format!("tls-creds=psk:{}", dir.display())],
                    vec!["--tls-creds".into(), format!("psk:{}", dir.display())],
                )
            }
            _ => (vec![], vec![]),
        }
    };
    let tls_cfg: Vec<(String, Vec<String>, Vec<String>)> = tls_modes
        .iter()
        .map(|m| {
            let (set, inc) = tls(m);
            (m.clone(), set, inc)
        })
        .collect();
    let qemu = qemu && qemu_binary().is_some();
    let _host = host_warm.then(|| HostMemory::warm(largest_ram(&rams) * 3));
    println!(
        "ferry-bench: dirtier over loopback TCP, downtime limit {limit} ms, bandwidth {}, {repeats} repeat(s), QEMU {}",
        if bw == 0 { "unlimited".into() } else { format!("{} MiB/s", bw >> 20) },
        if qemu { "7.2 (-M microvm) in the same run" } else { "not run" }
    );
    println!(
        "figures: min/median/max; times in ms; guest gap = largest heartbeat gap seen by the guest"
    );
    println!(
        "{:<11} {:<5} {:<6} {:>16} {:>14} {:>14} {:>16} {:>9} {:>9} {:>10} {:>7}",
        "engine",
        "ram",
        "ws",
        "total",
        "downtime",
        "guest-gap",
        "MiB-sent",
        "passes",
        "throttle",
        "stalled%",
        "MB/s"
    );
    let mut failed = false;
    for ram in &rams {
        for ws in &wss {
            let append = dirtier_append(ws);
            let cfg = RunConfig {
                mem: ram.clone(),
                append,
                settings: settings.clone(),
                max_bandwidth: bw,
                downtime_limit_ms: limit,
                measure_memory: memory,
                incoming_args: vec![],
                capabilities: vec![],
            };
            // One ferry series per stream count (multifd-channels) and TLS mode.
            let mut fers: Vec<(u32, usize, Series)> = tls_cfg
                .iter()
                .enumerate()
                .flat_map(|(t, _)| streams.iter().map(move |&n| (n, t, Series::default())))
                .collect();
            let series_name = |n: u32, t: usize| {
                let mut name = if streams == [1] {
                    "ferry".to_string()
                } else {
                    format!("ferry{n}")
                };
                if tls_cfg[t].0 != "none" {
                    name = format!("{name}+{}", tls_cfg[t].0);
                }
                name
            };
            let mut fq = Series::default();
            let mut qem = Series::default();
            // Runs in a rotating order, each after the host settled (see SETTLE).
            let engines = fers.len() + usize::from(ferry_qemu) + usize::from(qemu);
            for r in 0..repeats {
                for k in 0..engines {
                    let e = (k + r) % engines;
                    std::thread::sleep(settle);
                    let s = Scratch::new();
                    if let Some((n, t, fer)) = fers.get_mut(e) {
                        let mut cfg = cfg.clone();
                        cfg.settings.push(format!("multifd-channels={n}"));
                        cfg.settings.extend(tls_cfg[*t].1.iter().cloned());
                        cfg.incoming_args.extend(tls_cfg[*t].2.iter().cloned());
                        match run_ferry(&s, &cfg, |_| {}) {
                            Ok(r) => fer.add(&r),
                            Err(e) => fer.failures.push(e),
                        }
                    } else if ferry_qemu && e == fers.len() {
                        match run_ferry_qemu(&s, &cfg, |_| {}) {
                            Ok(r) => fq.add(&r),
                            Err(e) => fq.failures.push(e),
                        }
                    } else {
                        match run_qemu(&s, &cfg) {
                            Ok(r) => qem.add(&r),
                            Err(e) => qem.failures.push(e),
                        }
                    }
                }
            }
            let mut rows: Vec<(String, &Series)> = fers
                .iter()
                .map(|(n, t, s)| (series_name(*n, *t), s))
                .collect();
            if ferry_qemu {
                rows.push(("f-qemu".into(), &fq));
            }
            if qemu {
                rows.push(("qemu".into(), &qem));
            }
            for (name, ser) in rows {
                // Bytes sent over the whole migration's time (median run of each).
                let mb_s = median(&ser.mib) * 1.048576 / (median(&ser.total) / 1000.0);
                println!(
                    "{:<11} {:<5} {:<6} {:>16} {:>14} {:>14} {:>16} {:>9} {:>9} {:>10} {:>7.0}",
                    name,
                    ram,
                    ws,
                    fmt3(&ser.total),
                    fmt3(&ser.downtime),
                    fmt3(&ser.guest_gap),
                    fmt3(&ser.mib),
                    fmt3(&ser.passes),
                    fmt3(&ser.throttle),
                    fmt3(&ser.stalled),
                    mb_s,
                );
                if !ser.sync_ms.is_empty() {
                    println!(
                        "dirty  {:<5} {:<6} {name}: ms in KVM_GET_DIRTY_LOG {}, in KVM_CLEAR_DIRTY_LOG {}",
                        ram,
                        ws,
                        fmt3_1(&ser.sync_ms),
                        fmt3_1(&ser.clear_ms),
                    );
                }
                if !ser.src_mem.is_empty() {
                    let ram_mib = ferry_tests::migrate::parse_mem(ram) as f64 / 1048576.0;
                    println!(
                        "memory {:<5} {:<6} {name}: MiB outside guest RAM, migration overhead: source {} (peak - before), destination {} (peak - after; {} with the VM's own baseline); target < {:.0}",
                        ram,
                        ws,
                        fmt3(&ser.src_mem),
                        fmt3(&ser.dst_mem),
                        fmt3(&ser.dst_mem_total),
                        ram_mib * 0.03 + 64.0,
                    );
                }
                for f in &ser.failures {
                    println!("       ! {name} {ram} {ws}: {f}");
                }
            }
            failed |=
                fers.iter().any(|(_, _, f)| !f.failures.is_empty()) || !fq.failures.is_empty();
            // The cost of encryption: each TLS series against the plain one with the
            // same stream count.
            for (n, t, fer) in fers
                .iter()
                .filter(|(_, t, f)| tls_cfg[*t].0 != "none" && !f.total.is_empty())
            {
                let Some((_, u, plain)) = fers
                    .iter()
                    .find(|(m, u, p)| m == n && tls_cfg[*u].0 == "none" && !p.total.is_empty())
                else {
                    continue;
                };
                let rate = |s: &Series| median(&s.mib) / (median(&s.total) / 1000.0);
                println!(
                    "tls    {:<5} {:<6} {}/{}: total {:.2}x, downtime {:.2}x, guest gap {:.2}x; {:.0} against {:.0} MiB/s sent",
                    ram,
                    ws,
                    series_name(*n, *t),
                    series_name(*n, *u),
                    median(&fer.total) / median(&plain.total),
                    median(&fer.downtime) / median(&plain.downtime),
                    median(&fer.guest_gap) / median(&plain.guest_gap),
                    rate(fer),
                    rate(plain),
                );
            }
            if !qemu || qem.total.is_empty() {
                continue;
            }
            // One ratio line per stream count, then ferry-qemu's.
            for (n, t, fer) in fers.iter().filter(|(_, _, f)| !f.total.is_empty()) {
                let name = series_name(*n, *t);
                println!(
                    "ratio  {:<5} {:<6} {name}/QEMU: total {:.2}x, guest-observed downtime {:.2}x, engine downtime {:.2}x",
                    ram,
                    ws,
                    median(&fer.total) / median(&qem.total),
                    median(&fer.guest_gap) / median(&qem.guest_gap),
                    median(&fer.downtime) / median(&qem.downtime),
                );
            }
            if !fq.total.is_empty() {
                println!(
                    "ratio  {:<5} {:<6} ferry-qemu/QEMU: total {:.2}x, guest-observed downtime {:.2}x",
                    ram,
                    ws,
                    median(&fq.total) / median(&qem.total),
                    median(&fq.guest_gap) / median(&qem.guest_gap),
                );
            }
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// One series of `--postcopy`: which program, which capabilities.
struct PostcopyMode {
    name: &'static str,
    qemu: bool,
    capabilities: &'static [&'static str],
}

/// Post-copy against a throttled pre-copy, ferry-qemu and QEMU. ferry's
/// pre-copy has no capability: its own adaptive throttle is its default (with
/// `auto-converge` it would take QEMU's steps); QEMU's throttles only with
/// `auto-converge`.
const POSTCOPY_MODES: [PostcopyMode; 4] = [
    PostcopyMode {
        name: "ferry post",
        qemu: false,
        capabilities: &["postcopy-ram"],
    },
    PostcopyMode {
        name: "ferry pre",
        qemu: false,
        capabilities: &[],
    },
    PostcopyMode {
        name: "qemu post",
        qemu: true,
        capabilities: &["postcopy-ram"],
    },
    PostcopyMode {
        name: "qemu pre+ac",
        qemu: true,
        capabilities: &["auto-converge"],
    },
];

/// `--postcopy`: the dirtier between two ferry-qemu processes and between two
/// QEMU 7.2 processes over QMP, post-copy and pre-copy, the series alternating
/// per repeat, same guest, same cap on both phases. Post-copy switches once the
/// first pass is done ([`POSTCOPY_AFTER_SYNCS`]).
fn postcopy_bench(
    rams: &[String],
    wss: &[String],
    bw: u64,
    limit: u64,
    repeats: usize,
    settle: Duration,
) -> ExitCode {
    let qemu = qemu_binary().is_some();
    let modes: Vec<usize> = (0..POSTCOPY_MODES.len())
        .filter(|&m| qemu || !POSTCOPY_MODES[m].qemu)
        .collect();
    println!(
        "ferry-bench --postcopy: dirtier over loopback TCP via QMP, bandwidth {} MiB/s (both phases), \
         downtime limit {limit} ms, switch after the first pass (dirty-sync-count {POSTCOPY_AFTER_SYNCS}), \
         {repeats} repeat(s), QEMU {}",
        bw >> 20,
        if qemu { "7.2 (-M microvm) in the same run" } else { "not run" }
    );
    println!(
        "figures: min/median/max; times in ms; guest gap = largest heartbeat gap; beats/s = the guest's \
         heartbeats per second (1000 = never held 1 ms) before the switch and during post-copy; \
         downtime = the source's"
    );
    println!(
        "{:<11} {:<5} {:<5} {:>17} {:>12} {:>12} {:>17} {:>13} {:>13} {:>14} {:>14} {:>6}",
        "engine",
        "ram",
        "ws",
        "total",
        "downtime",
        "guest-gap",
        "switch-at",
        "beats/s pre",
        "beats/s post",
        "MiB-sent",
        "MiB-postcopy",
        "intact"
    );
    let or_dash = |v: &[f64]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            fmt3(v)
        }
    };
    let mut failed = false;
    for ram in rams {
        for ws in wss {
            let cfg = RunConfig {
                mem: ram.clone(),
                append: dirtier_append(ws),
                settings: vec![],
                max_bandwidth: bw,
                downtime_limit_ms: limit,
                measure_memory: false,
                incoming_args: vec![],
                capabilities: vec![],
            };
            let mut series: Vec<Series> =
                POSTCOPY_MODES.iter().map(|_| Series::default()).collect();
            let runs = alternate(&modes, repeats, settle, |m| {
                let mode = &POSTCOPY_MODES[m];
                let s = Scratch::new();
                let mut cfg = cfg.clone();
                cfg.capabilities = mode.capabilities.iter().map(|c| c.to_string()).collect();
                let r = if mode.qemu {
                    run_qemu(&s, &cfg)
                } else {
                    run_ferry_qemu(&s, &cfg, |_| {})
                }
                .map_err(|e| format!("{} {ram} {ws}: {e}", mode.name))?;
                series[m].add(&r);
                Ok((r.wall_ms, r.guest_downtime_ms))
            });
            failed |= runs.iter().any(|r| !r.ok);
            for &m in &modes {
                let ser = &series[m];
                let name = POSTCOPY_MODES[m].name;
                println!(
                    "{:<11} {:<5} {:<5} {:>17} {:>12} {:>12} {:>17} {:>13} {:>13} {:>14} {:>14} {:>6}",
                    name,
                    ram,
                    ws,
                    fmt3(&ser.total),
                    fmt3(&ser.downtime),
                    fmt3(&ser.guest_gap),
                    or_dash(&ser.switch_ms),
                    or_dash(&ser.beats_before),
                    or_dash(&ser.beats_during),
                    fmt3(&ser.mib),
                    or_dash(&ser.postcopy_mib),
                    format!("{}/{}", ser.intact, ser.total.len()),
                );
                for f in &ser.failures {
                    println!("       ! {name} {ram} {ws}: {f}");
                }
                failed |= !ser.failures.is_empty();
            }
            for (f, q, what) in [(0, 2, "post-copy"), (1, 3, "pre-copy")] {
                let (f, q) = (&series[f], &series[q]);
                if f.total.is_empty() || q.total.is_empty() {
                    continue;
                }
                // A side that reports no downtime (0) has no ratio.
                let ratio = |a: &[f64], b: &[f64]| {
                    let (a, b) = (median(a), median(b));
                    if a > 0.0 && b > 0.0 {
                        format!("{:.2}x", a / b)
                    } else {
                        format!("- ({a:.0} against {b:.0} ms)")
                    }
                };
                println!(
                    "ratio  {ram:<5} {ws:<5} ferry/QEMU {what}: total {:.2}x, downtime {}, guest gap {:.2}x{}",
                    median(&f.total) / median(&q.total),
                    ratio(&f.downtime, &q.downtime),
                    median(&f.guest_gap) / median(&q.guest_gap),
                    if f.beats_during.is_empty() || q.beats_during.is_empty() {
                        String::new()
                    } else {
                        format!(
                            ", guest progress during post-copy {:.2}x",
                            median(&f.beats_during) / median(&q.beats_during)
                        )
                    },
                );
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Checkpoint size against touched memory, and save/restore throughput, for a 1 GiB
/// guest with several amounts of touched RAM.
fn checkpoint_bench(repeats: usize) -> ExitCode {
    use ferry_tests::{Scratch, VmProcess};
    use std::time::{Duration, Instant};
    println!("ferry-bench --checkpoint: 1 GiB dirtier, checkpoint to a file on this disk, restore in a new process");
    println!(
        "{:<20} {:>12} {:>14} {:>14} {:>16} {:>16}",
        "guest", "touched MiB", "ckpt MiB", "save ms", "save GB/s", "restore ms (GB/s)"
    );
    for append in ["ws=0", "ws=64M", "ws=256M", "ws=64M fill=1"] {
        for _ in 0..repeats {
            let s = Scratch::new();
            let dirtier = s.dirtier.display().to_string();
            let vm = VmProcess::start(
                &s,
                "src",
                &["run", "--kernel", &dirtier, "-m", "1G", "--append", append],
            );
            vm.wait_serial("dirtier: ready", Duration::from_secs(60));
            // Let the working set and the fill be written once.
            std::thread::sleep(Duration::from_secs(if append.contains("fill") {
                8
            } else {
                3
            }));
            vm.ok("pause");
            let ckpt = s.path("bench.ckpt");
            let r = vm.ok(&format!("checkpoint {}", ckpt.display()));
            vm.quit();
            let bytes = r["bytes"].as_f64().unwrap_or(0.0);
            let secs = r["seconds"].as_f64().unwrap_or(f64::NAN);
            let touched = r["ram_pages"].as_f64().unwrap_or(0.0) * 4096.0;
            let t = Instant::now();
            let dst = VmProcess::start(
                &s,
                "dst",
                &["restore", ckpt.to_str().unwrap_or_default(), "--paused"],
            );
            dst.ok("status");
            let restore = t.elapsed().as_secs_f64();
            dst.quit();
            println!(
                "{:<20} {:>12.1} {:>14.1} {:>14.0} {:>16.2} {:>10.0} ({:.2})",
                append,
                touched / 1048576.0,
                bytes / 1048576.0,
                secs * 1e3,
                bytes / secs / 1e9,
                restore * 1e3,
                bytes / restore / 1e9
            );
        }
    }
    ExitCode::SUCCESS
}

/// One engine's figures from [`alternate`]: two per run, and whether every
/// run succeeded.
struct EngineRuns<E> {
    engine: E,
    ok: bool,
    a: Vec<f64>,
    b: Vec<f64>,
}

/// Runs `run` `repeats` times for each engine, the engines' order rotating
/// per repeat, `settle` before each run; collects each run's two figures per
/// engine. A failed run is printed and leaves its engine's `ok` false.
fn alternate<E: Copy>(
    engines: &[E],
    repeats: usize,
    settle: Duration,
    mut run: impl FnMut(E) -> Result<(f64, f64), String>,
) -> Vec<EngineRuns<E>> {
    let mut by_engine: Vec<EngineRuns<E>> = engines
        .iter()
        .map(|&engine| EngineRuns {
            engine,
            ok: true,
            a: vec![],
            b: vec![],
        })
        .collect();
    for r in 0..repeats {
        for k in 0..by_engine.len() {
            let series = &mut by_engine[(k + r) % engines.len()];
            std::thread::sleep(settle);
            match run(series.engine) {
                Ok((a, b)) => {
                    series.a.push(a);
                    series.b.push(b);
                }
                Err(e) => {
                    eprintln!("ferry-bench: {e}");
                    series.ok = false;
                }
            }
        }
    }
    by_engine
}

/// `--boot`: firmware boot time, ferry-vm and ferry-qemu against QEMU 7.2
/// (see [`ferry_tests::bootbench`]); engines alternate per repeat.
fn boot_bench(repeats: usize, settle: Duration) -> ExitCode {
    use ferry_tests::bootbench::{run, Bus, Engine};
    let qemu = qemu_binary().is_some();
    println!(
        "ferry-bench --boot: SeaBIOS boots the dirtier's boot disk (128 MiB guest); \
         {repeats} repeat(s); QEMU {}",
        if qemu {
            "7.2 -M pc in the same run"
        } else {
            "not run"
        }
    );
    println!("figures: seconds from the VMM's start, min/median/max");
    println!(
        "{:<11} {:<7} {:>20} {:>20}",
        "engine", "disk", "first line s", "dirtier ready s"
    );
    let mut engines = vec![Engine::FerryVm, Engine::FerryQemu];
    if qemu {
        engines.push(Engine::Qemu);
    }
    let s = Scratch::new();
    let disk = s.path("boot.img");
    if let Err(e) = ferry_testguest::bootdisk::boot_disk(&disk, "ws=4M", None) {
        eprintln!("ferry-bench: the boot disk: {e}");
        return ExitCode::FAILURE;
    }
    let mut failed = false;
    for bus in [Bus::Ide, Bus::Virtio] {
        let by_engine = alternate(&engines, repeats, settle, |engine| {
            run(&s, engine, bus, &disk)
                .map(|run| (run.first_line_s, run.ready_s))
                .map_err(|e| format!("{} from {}: {e}", engine.name(), bus.name()))
        });
        failed |= by_engine.iter().any(|r| !r.ok);
        let by_engine: Vec<_> = by_engine
            .into_iter()
            .map(|r| (r.engine, r.a, r.b))
            .collect();
        for (engine, first, ready) in &by_engine {
            println!(
                "{:<11} {:<7} {:>20} {:>20}",
                engine.name(),
                bus.name(),
                fmt3_2(first),
                fmt3_2(ready)
            );
        }
        if let Some((_, qf, qr)) = by_engine.iter().find(|(e, ..)| *e == Engine::Qemu) {
            for (engine, f, r) in by_engine.iter().filter(|(e, ..)| *e != Engine::Qemu) {
                println!(
                    "{:<11} {:<7} {:>20.2} {:>20.2}",
                    format!("ratio {}", &engine.name()[6..]),
                    bus.name(),
                    median(f) / median(qf),
                    median(r) / median(qr)
                );
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn fmt3_2(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let (a, m, b) = stats(v);
    format!("{a:.2}/{m:.2}/{b:.2}")
}

/// `--disk`: guest disk throughput, ferry against QEMU on raw and qcow2
/// images (see [`ferry_tests::diskbench`]); engines alternate per repeat.
fn disk_bench(mib: u64, repeats: usize, settle: Duration) -> ExitCode {
    use ferry_tests::diskbench::{run, Engine, Format};
    let qemu = qemu_binary().is_some();
    println!(
        "ferry-bench --disk: the guest writes {mib} MiB in 64 KiB virtio-blk requests, \
         flushes, reads them back; {repeats} repeat(s); QEMU {}",
        if qemu {
            "7.2 -M pc in the same run"
        } else {
            "not run"
        }
    );
    println!("figures: MB/s (10^6 bytes), min/median/max; raw: every block allocated before; qcow2: a fresh image");
    println!(
        "{:<9} {:<6} {:>22} {:>22}",
        "engine", "image", "write+flush MB/s", "read MB/s"
    );
    let engines: Vec<Engine> = if qemu {
        vec![Engine::Ferry, Engine::Qemu]
    } else {
        vec![Engine::Ferry]
    };
    let s = Scratch::new();
    let bytes = (mib << 20) as f64;
    let mut failed = false;
    for format in [Format::Raw, Format::Qcow2] {
        let by_engine = alternate(&engines, repeats, settle, |engine| {
            run(&s, engine, format, mib)
                .map(|run| (bytes / run.write_s / 1e6, bytes / run.read_s / 1e6))
                .map_err(|e| format!("{} on {}: {e}", engine.name(), format.name()))
        });
        failed |= by_engine.iter().any(|r| !r.ok);
        let by_engine: Vec<_> = by_engine
            .into_iter()
            .map(|r| (r.engine, r.a, r.b))
            .collect();
        for (engine, w, r) in &by_engine {
            println!(
                "{:<9} {:<6} {:>22} {:>22}",
                engine.name(),
                format.name(),
                fmt3(w),
                fmt3(r)
            );
        }
        if let [(_, fw, fr), (_, qw, qr)] = &by_engine[..] {
            println!(
                "{:<9} {:<6} {:>22.2} {:>22.2}",
                "ratio",
                format.name(),
                median(fw) / median(qw),
                median(fr) / median(qr)
            );
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
