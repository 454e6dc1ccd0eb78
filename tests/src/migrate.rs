//! One live migration of the dirtier between two local processes — ferry's
//! (`ferry-vm run` → `ferry-vm incoming`) or QEMU's — timed from the host: total time,
//! downtime as the engine reports it, and downtime as the guest saw it (the largest
//! gap between heartbeats), then the memory oracle on the destination.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::heartbeat::{socket_path, Heartbeats};
use crate::{free_port, Scratch, VmProcess};

/// What to migrate and how.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Guest RAM, e.g. "1G".
    pub mem: String,
    /// Dirtier command line, e.g. "ws=64M".
    pub append: String,
    /// `migrate-set` settings for ferry, e.g. "max-bandwidth=134217728".
    pub settings: Vec<String>,
    /// Bytes/s cap (0 = unlimited), applied to both engines.
    pub max_bandwidth: u64,
    pub downtime_limit_ms: u64,
    /// Sample both processes' memory outside guest RAM during the migration
    /// (`RunResult::memory`); costs a read of /proc/PID/smaps per sample.
    pub measure_memory: bool,
    /// More `ferry-vm incoming` arguments (e.g. `--tls-creds x509:DIR`).
    pub incoming_args: Vec<String>,
    /// QMP runs only: capabilities turned on on both sides before the migration
    /// (`auto-converge`, `postcopy-ram`); the destination then starts with
    /// `-incoming defer` to take them first. With `postcopy-ram` the source
    /// switches ([`POSTCOPY_AFTER_SYNCS`]) and `RunResult::postcopy` is set.
    pub capabilities: Vec<String>,
}

/// The post-copy switch rule of [`run_qmp`]: `migrate-start-postcopy` once the
/// source's `ram.dirty-sync-count` reaches this, i.e. once its first pass over
/// RAM is done (QEMU counts the sync before that pass and the one after it;
/// ferry counts passes + 1). Every page was offered once, so post-copy fetches
/// only what the guest dirtied since.
pub const POSTCOPY_AFTER_SYNCS: u64 = 2;

/// What one migration measured.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The engine's own statistics (query-migrate).
    pub stats: Value,
    /// Wall time of the migrate command, host-measured.
    pub wall_ms: f64,
    /// Largest gap between heartbeats around the migration.
    pub guest_downtime_ms: f64,
    /// Share of the migration during which the guest produced no heartbeats.
    pub guest_stalled_pct: f64,
    /// The oracle's verdict on the destination's memory.
    pub oracle: Result<ferry_testguest::OracleReport, String>,
    /// Memory outside guest RAM, when `RunConfig::measure_memory` is set.
    pub memory: Option<MemoryOverhead>,
    /// The switch and the guest's progress around it, for post-copy runs.
    pub postcopy: Option<PostcopyPhase>,
}

/// A post-copy run seen from the host. The guest's progress is its heartbeat
/// rate (it beats at most once per millisecond of running, so 1000/s means it
/// never waited a millisecond): on the source from `migrate` to the switch, on
/// the destination from the switch (the source's status `postcopy-active`,
/// polled every 20 ms; the switch's own pause counts in it) to `completed`.
#[derive(Debug, Clone, Copy)]
pub struct PostcopyPhase {
    /// From `migrate` to the source's `postcopy-active`.
    pub switch_ms: f64,
    /// Heartbeats per second before the switch and during post-copy.
    pub beats_before: f64,
    pub beats_during: f64,
}

/// Resident memory of the two processes outside guest RAM, in bytes: before the
/// migration (the VMM's own baseline), and the largest value sampled while it ran
/// (every 100 ms). The migration's overhead on a side is `peak - before`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryOverhead {
    pub src_before: u64,
    pub src_peak: u64,
    pub dst_before: u64,
    pub dst_peak: u64,
    /// The destination once the VM runs there (its steady state, buffers freed).
    pub dst_after: u64,
}

/// Guest RAM mappings are this large or larger; no other mapping of ferry-vm is
/// (thread arenas of the allocator reserve 64 MiB).
const GUEST_MAPPING_MIN: u64 = 128 << 20;

/// Resident bytes of process `pid` outside its guest RAM: the Rss of every mapping
/// in /proc/PID/smaps except the guest RAM ranges (mappings of
/// [`GUEST_MAPPING_MIN`] or more).
pub fn rss_outside_guest(pid: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let kb = |line: &str| -> u64 {
        line.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
            << 10
    };
    let (mut total, mut size) = (0u64, 0u64);
    for line in smaps.lines() {
        if line.starts_with("Size:") {
            size = kb(line);
        } else if line.starts_with("Rss:") && size < GUEST_MAPPING_MIN {
            total += kb(line);
        }
    }
    Some(total)
}

/// Waits until the dirtier completed at least `passes` passes (read through `peek`).
fn wait_passes(vm: &VmProcess, passes: u64, timeout: Duration) -> Result<(), String> {
    wait_header(vm, ferry_testguest::header::PASSES, passes, timeout)
        .map_err(|_| format!("the guest did not finish {passes} passes in {timeout:?}"))
}

/// Waits until the dirtier's header field at `offset` reaches `at_least`.
fn wait_header(vm: &VmProcess, offset: usize, at_least: u64, timeout: Duration) -> Result<(), ()> {
    let deadline = Instant::now() + timeout;
    let addr = ferry_testguest::HEADER_GPA + offset as u64;
    loop {
        let v = vm.command(&format!("peek {addr:x}"));
        if v["value"].as_u64().unwrap_or(0) >= at_least {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn guest_ws_pages(append: &str) -> bool {
    !append.split_whitespace().any(|w| w == "ws=0") && append.contains("ws=")
}

/// Migrates the dirtier with ferry; `progress` sees every query-migrate sample.
pub fn run_ferry(
    s: &Scratch,
    cfg: &RunConfig,
    mut progress: impl FnMut(&Value),
) -> Result<RunResult, String> {
    let hb = Heartbeats::new();
    let src_serial = hb
        .listen(&socket_path(s.dir.path(), "src"))
        .map_err(|e| e.to_string())?;
    let dst_serial = hb
        .listen(&socket_path(s.dir.path(), "dst"))
        .map_err(|e| e.to_string())?;
    let dirtier = s.dirtier.display().to_string();
    let args = [
        "run",
        "--kernel",
        &dirtier,
        "-m",
        &cfg.mem,
        "--append",
        &cfg.append,
    ];
    let mut src = VmProcess::spawn_serial(s, "src", &args, &src_serial);
    src.wait_for_control();
    if guest_ws_pages(&cfg.append) {
        wait_passes(&src, 2, Duration::from_secs(300))?;
    } else if cfg.append.split_whitespace().any(|w| w == "fill=1") {
        wait_header(
            &src,
            ferry_testguest::header::FILL_DONE,
            1,
            Duration::from_secs(300),
        )
        .map_err(|()| "the guest did not finish its fill in 300 s".to_string())?;
    } else {
        std::thread::sleep(Duration::from_millis(500));
    }
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let mut dst_args = vec!["incoming", uri.as_str(), "-m", &cfg.mem];
    dst_args.extend(cfg.incoming_args.iter().map(String::as_str));
    let mut dst = VmProcess::spawn_serial(s, "dst", &dst_args, &dst_serial);
    src.ok(&format!(
        "migrate-set downtime-limit={}",
        cfg.downtime_limit_ms
    ));
    src.ok(&format!("migrate-set max-bandwidth={}", cfg.max_bandwidth));
    for set in &cfg.settings {
        src.ok(&format!("migrate-set {set}"));
    }
    std::thread::sleep(Duration::from_millis(200));
    let (src_pid, dst_pid) = (src.child.id(), dst.child.id());
    let mut memory = cfg.measure_memory.then(|| MemoryOverhead {
        src_before: rss_outside_guest(src_pid).unwrap_or(0),
        dst_before: rss_outside_guest(dst_pid).unwrap_or(0),
        ..MemoryOverhead::default()
    });
    let control = src.control.clone();
    let t0 = Instant::now();
    let mig = std::thread::spawn(move || -> Result<Value, String> {
        let mut c = UnixStream::connect(control).map_err(|e| e.to_string())?;
        writeln!(c, "migrate {uri}").map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(c)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        serde_json::from_str(&line).map_err(|e| e.to_string())
    });
    while !mig.is_finished() {
        if let Some(m) = memory.as_mut() {
            let (a, b) = (rss_outside_guest(src_pid), rss_outside_guest(dst_pid));
            m.src_peak = m.src_peak.max(a.unwrap_or(0));
            m.dst_peak = m.dst_peak.max(b.unwrap_or(0));
        }
        if let Ok(mut c) = UnixStream::connect(&src.control) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            if writeln!(c, "query-migrate").is_ok() {
                let mut line = String::new();
                if BufReader::new(c).read_line(&mut line).is_ok() {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        progress(&v);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let reply = mig
        .join()
        .map_err(|_| "migrate thread panicked".to_string())??;
    let t1 = Instant::now();
    if reply["ok"] != true {
        return Err(format!("migration failed: {}", reply["error"]));
    }
    let stats = reply["migration"].clone();
    progress(&stats);
    if let Some(m) = memory.as_mut() {
        // The destination holds its buffers until it has loaded the VM.
        m.dst_peak = m.dst_peak.max(rss_outside_guest(dst_pid).unwrap_or(0));
    }
    let _ = src.wait_exit(Duration::from_secs(10));
    dst.wait_for_control();
    std::thread::sleep(Duration::from_millis(300));
    if let Some(m) = memory.as_mut() {
        m.dst_after = rss_outside_guest(dst_pid).unwrap_or(0);
    }
    let window_end = t1 + Duration::from_millis(200);
    let (guest_downtime_ms, stalled) = gap_figures(&hb, t0, t1, window_end);
    let oracle = oracle_of(&dst, s);
    dst.ok("quit");
    let _ = dst.wait_exit(Duration::from_secs(10));
    Ok(RunResult {
        stats,
        wall_ms: (t1 - t0).as_secs_f64() * 1e3,
        guest_downtime_ms,
        guest_stalled_pct: stalled,
        oracle,
        memory,
        postcopy: None,
    })
}

fn gap_figures(hb: &Heartbeats, t0: Instant, t1: Instant, end: Instant) -> (f64, f64) {
    let gap = hb.max_gap_ms(t0, end);
    let ms = (t1 - t0).as_secs_f64() * 1e3;
    // The dirtier beats every millisecond while it runs.
    let beats = hb.count_between(t0, t1) as f64;
    let stalled = if ms > 0.0 {
        (100.0 * (1.0 - beats / ms)).clamp(0.0, 100.0)
    } else {
        0.0
    };
    (gap, stalled)
}

fn oracle_of(dst: &VmProcess, s: &Scratch) -> Result<ferry_testguest::OracleReport, String> {
    let image = s.path("dst-oracle.img");
    dst.ok("pause");
    dst.ok(&format!("dump {}", image.display()));
    let r = ferry_testguest::FileImage::open(&image, 0)
        .map_err(|e| e.to_string())
        .and_then(|m| ferry_testguest::check(&m).map_err(|e| e.to_string()));
    let _ = std::fs::remove_file(&image);
    r
}

/// Where QEMU is, if installed.
pub fn qemu_binary() -> Option<PathBuf> {
    let p = PathBuf::from("/usr/bin/qemu-system-x86_64");
    p.exists().then_some(p)
}

/// A guest CPU for QEMU: as libvirt's `<cpu>` XML and as QEMU's `-cpu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuCpu {
    pub xml: &'static str,
    pub arg: &'static str,
}

/// The guest CPUs QEMU may get, best first: the host's own; the host's without
/// arch-capabilities (QEMU 7.2 aborts on kernels whose KVM refuses its value of
/// MSR 0x10a: "failed to set MSR 0x10a"); QEMU's portable default, qemu64.
pub const QEMU_CPUS: &[QemuCpu] = &[
    QemuCpu {
        xml: "<cpu mode='host-passthrough' check='none'/>",
        arg: "host",
    },
    QemuCpu {
        xml: "<cpu mode='host-passthrough' check='none'>\
              <feature policy='disable' name='arch-capabilities'/></cpu>",
        arg: "host,arch-capabilities=off",
    },
    QemuCpu {
        xml: "<cpu mode='custom' match='exact' check='none'>\
              <model fallback='forbid'>qemu64</model></cpu>",
        arg: "qemu64",
    },
];

/// The first of [`QEMU_CPUS`] that this host's QEMU (`qemu`) starts a KVM
/// guest with, probed once: QEMU set up, its vCPU registers loaded, `quit`.
pub fn qemu_cpu(qemu: &Path) -> QemuCpu {
    static CHOSEN: std::sync::OnceLock<QemuCpu> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        for &cpu in QEMU_CPUS {
            let mut child = Command::new(qemu)
                .args(["-accel", "kvm", "-M", "pc", "-cpu", cpu.arg, "-nodefaults"])
                .args(["-display", "none", "-S", "-monitor", "stdio"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run QEMU");
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(b"quit\n");
            }
            let out = child.wait_with_output().expect("wait for QEMU");
            if out.status.success() {
                return cpu;
            }
            eprintln!(
                "QEMU cannot run -cpu {} here: {}",
                cpu.arg,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        panic!("this host's QEMU runs none of the CPUs {QEMU_CPUS:?}");
    })
}

/// The `-cpu` a run of `bin` gets: ferry-qemu takes `host` on any host; QEMU
/// gets what this host's QEMU can run ([`qemu_cpu`], probed with QEMU's own
/// `-monitor`, which ferry-qemu does not have).
fn guest_cpu(bin: &Path) -> &'static str {
    if bin.file_name().is_some_and(|n| n == "ferry-qemu") {
        "host"
    } else {
        qemu_cpu(bin).arg
    }
}

/// A QEMU process with a QMP socket.
struct Qemu {
    child: Child,
    qmp: BufReader<UnixStream>,
}

impl Qemu {
    fn start(
        bin: &Path,
        s: &Scratch,
        tag: &str,
        cfg: &RunConfig,
        serial: &str,
        incoming: Option<&str>,
    ) -> Result<Self, String> {
        let qmp_path = s.path(&format!("{tag}.qmp"));
        let serial_path = serial.trim_start_matches("unix:");
        let mut cmd = Command::new(bin);
        cmd.args([
            "-M",
            "microvm",
            "-enable-kvm",
            "-cpu",
            guest_cpu(bin),
            "-m",
            &cfg.mem,
        ])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-kernel")
        .arg(&s.dirtier)
        .args(["-append", &cfg.append])
        .arg("-chardev")
        .arg(format!("socket,id=s0,path={serial_path}"))
        .args(["-serial", "chardev:s0"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if let Some(uri) = incoming {
            cmd.args(["-incoming", uri]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            if let Ok(c) = UnixStream::connect(&qmp_path) {
                break c;
            }
            if Instant::now() > deadline {
                return Err(format!("{}'s QMP socket never appeared", bin.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut q = Self {
            child,
            qmp: BufReader::new(stream),
        };
        q.read_reply()?; // greeting
        q.exec("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_reply(&mut self) -> Result<Value, String> {
        loop {
            let mut line = String::new();
            self.qmp.read_line(&mut line).map_err(|e| e.to_string())?;
            if line.is_empty() {
                return Err("QEMU closed QMP".into());
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    fn exec(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let msg = json!({"execute": cmd, "arguments": args});
        writeln!(self.qmp.get_mut(), "{msg}").map_err(|e| e.to_string())?;
        let v = self.read_reply()?;
        if let Some(e) = v.get("error") {
            return Err(format!("QEMU {cmd}: {e}"));
        }
        Ok(v["return"].clone())
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The same migration with QEMU (`-M microvm`, same guest, same limits).
pub fn run_qemu(s: &Scratch, cfg: &RunConfig) -> Result<RunResult, String> {
    let bin = qemu_binary().ok_or("qemu-system-x86_64 is not installed")?;
    run_qmp(&bin, s, cfg, |_| {})
}

/// The same migration between two `ferry-qemu` processes, driven over QMP exactly as
/// QEMU is.
pub fn run_ferry_qemu(
    s: &Scratch,
    cfg: &RunConfig,
    progress: impl FnMut(&Value),
) -> Result<RunResult, String> {
    run_qmp(&crate::bin("ferry-qemu"), s, cfg, progress)
}

/// Migrates the dirtier between two QEMU-compatible processes over QMP.
fn run_qmp(
    bin: &Path,
    s: &Scratch,
    cfg: &RunConfig,
    mut progress: impl FnMut(&Value),
) -> Result<RunResult, String> {
    let bin = bin.to_path_buf();
    let hb = Heartbeats::new();
    let src_serial = hb
        .listen(&socket_path(s.dir.path(), "qsrc"))
        .map_err(|e| e.to_string())?;
    let dst_serial = hb
        .listen(&socket_path(s.dir.path(), "qdst"))
        .map_err(|e| e.to_string())?;
    let mut src = Qemu::start(&bin, s, "qsrc", cfg, &src_serial, None)?;
    // Same warm-up as ferry: the fill done (the guest says it is ready), then
    // about two passes' worth of time.
    let warm = Instant::now();
    while hb.ready() == 0 {
        if warm.elapsed() > Duration::from_secs(300) {
            return Err(format!(
                "{} never said {:?}",
                bin.display(),
                "dirtier: ready"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1000));
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let mut dst = if cfg.capabilities.is_empty() {
        Qemu::start(&bin, s, "qdst", cfg, &dst_serial, Some(&uri))?
    } else {
        let caps: Vec<Value> = cfg
            .capabilities
            .iter()
            .map(|c| json!({"capability": c, "state": true}))
            .collect();
        let caps = json!({ "capabilities": caps });
        let mut dst = Qemu::start(&bin, s, "qdst", cfg, &dst_serial, Some("defer"))?;
        dst.exec("migrate-set-capabilities", caps.clone())?;
        dst.exec("migrate-incoming", json!({"uri": uri}))?;
        src.exec("migrate-set-capabilities", caps)?;
        dst
    };
    let postcopy = cfg.capabilities.iter().any(|c| c == "postcopy-ram");
    let bw = if cfg.max_bandwidth == 0 {
        1u64 << 40
    } else {
        cfg.max_bandwidth
    };
    // QEMU caps its post-copy phase with max-postcopy-bandwidth, ferry with
    // max-bandwidth: the same cap for both.
    src.exec(
        "migrate-set-parameters",
        json!({"max-bandwidth": bw, "max-postcopy-bandwidth": bw,
               "downtime-limit": cfg.downtime_limit_ms}),
    )?;
    let t0 = Instant::now();
    src.exec("migrate", json!({"uri": uri}))?;
    // 120 s, or 40 passes over RAM at the cap (QEMU's auto-converge takes
    // two passes per throttle step, from 20% to 99%).
    let passes_40 = 40.0 * parse_mem(&cfg.mem) as f64 / bw as f64;
    let deadline = t0 + Duration::from_secs(120).max(Duration::from_secs_f64(passes_40));
    let (mut switch_asked, mut switched) = (false, None);
    let stats = loop {
        let q = src.exec("query-migrate", json!({}))?;
        progress(&q);
        let synced = q["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
        if postcopy && !switch_asked && synced >= POSTCOPY_AFTER_SYNCS {
            src.exec("migrate-start-postcopy", json!({}))?;
            switch_asked = true;
        }
        if switched.is_none() && q["status"] == "postcopy-active" {
            switched = Some(Instant::now());
        }
        match q["status"].as_str() {
            Some("completed") => break q,
            Some("failed") | Some("cancelled") => {
                return Err(format!("QEMU migration failed: {q}"))
            }
            _ => {}
        }
        if Instant::now() > deadline {
            let _ = src.exec("migrate_cancel", json!({}));
            return Err(format!("QEMU did not converge in {:?}", deadline - t0));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let (guest_downtime_ms, stalled) = gap_figures(&hb, t0, t1, t1 + Duration::from_millis(200));
    let rate = |a: Instant, b: Instant| hb.count_between(a, b) as f64 / (b - a).as_secs_f64();
    let postcopy = switched.map(|ts| PostcopyPhase {
        switch_ms: (ts - t0).as_secs_f64() * 1e3,
        beats_before: rate(t0, ts),
        beats_during: rate(ts, t1),
    });
    if postcopy.is_none() && switch_asked {
        return Err("post-copy was asked for but never seen active".into());
    }
    let mem_bytes = crate::migrate::parse_mem(&cfg.mem);
    let oracle = if mem_bytes <= 3 << 30 {
        let image = s.path("qdst.img");
        dst.exec("stop", json!({}))?;
        dst.exec(
            "pmemsave",
            json!({"val": 0, "size": mem_bytes, "filename": image.display().to_string()}),
        )?;
        let r = ferry_testguest::FileImage::open(&image, 0)
            .map_err(|e| e.to_string())
            .and_then(|m| ferry_testguest::check(&m).map_err(|e| e.to_string()));
        let _ = std::fs::remove_file(&image);
        r
    } else {
        Err("not checked (RAM above 4 GiB is not dumped)".into())
    };
    Ok(RunResult {
        stats,
        wall_ms: (t1 - t0).as_secs_f64() * 1e3,
        guest_downtime_ms,
        guest_stalled_pct: stalled,
        oracle,
        memory: None,
        postcopy,
    })
}

/// "256M" / "1G" in bytes.
pub fn parse_mem(s: &str) -> u64 {
    let (n, m) = match s.chars().last() {
        Some('G') => (&s[..s.len() - 1], 1u64 << 30),
        Some('M') => (&s[..s.len() - 1], 1u64 << 20),
        _ => (s, 1u64 << 20),
    };
    n.parse::<u64>().unwrap_or(0) * m
}
