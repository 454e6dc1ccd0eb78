//! `ferry-demo`: boots the dirtier test guest under one `ferry-qemu` (driven over QMP
//! exactly as libvirt drives QEMU), live-migrates it over TCP to a second one with a
//! progress bar (or JSON lines with `--json`), then prints the statistics and the
//! memory oracle's verdict on the destination. `--engine ferry-vm` uses ferry's own
//! control socket instead.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use ferry_tests::migrate::{run_ferry, run_ferry_qemu, RunConfig};
use ferry_tests::Scratch;
use serde_json::{json, Value};

const USAGE: &str =
    "usage: ferry-demo [--json] [--engine ferry-qemu|ferry-vm] [--mem SIZE] [--ws SIZE] [--max-bandwidth MiB/s (0 = unlimited)]";

fn main() -> ExitCode {
    let mut json_out = false;
    let mut cfg = RunConfig {
        mem: "1G".into(),
        append: String::new(),
        settings: vec![],
        max_bandwidth: 256 << 20,
        downtime_limit_ms: 300,
        measure_memory: false,
        incoming_args: vec![],
        capabilities: vec![],
    };
    let mut ws = "128M".to_string();
    let mut engine = "ferry-qemu".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json_out = true,
            "--engine" => engine = args.next().unwrap_or_default(),
            "--mem" => cfg.mem = args.next().unwrap_or_default(),
            "--ws" => ws = args.next().unwrap_or_default(),
            "--max-bandwidth" => {
                cfg.max_bandwidth = args
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(|m| m << 20)
                    .unwrap_or(u64::MAX)
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => {
                eprintln!("ferry-demo: unknown argument '{a}'\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if engine != "ferry-qemu" && engine != "ferry-vm" {
        eprintln!("ferry-demo: unknown engine '{engine}'\n{USAGE}");
        return ExitCode::from(2);
    }
    if cfg.max_bandwidth == u64::MAX {
        eprintln!("ferry-demo: --max-bandwidth needs a number of MiB/s\n{USAGE}");
        return ExitCode::from(2);
    }
    cfg.append = format!("ws={ws} fill=1");
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("ferry-demo: /dev/kvm is missing: ferry needs KVM");
        return ExitCode::from(1);
    }
    let tty = std::io::stderr().is_terminal() && !json_out;
    let cap = if cfg.max_bandwidth == 0 {
        "unlimited".to_string()
    } else {
        format!("{} MiB/s", cfg.max_bandwidth >> 20)
    };
    if !json_out {
        eprintln!(
            "ferry-demo: booting the dirtier ({} RAM, working set {ws}, all RAM filled) in \
             {engine} and migrating it live to a second {engine} over TCP on loopback, link \
             capped at {cap}",
            cfg.mem
        );
    }
    let s = Scratch::new();
    let mut last = None;
    let mut show = |v: &Value| progress(v, tty, json_out, &mut last);
    let result = if engine == "ferry-qemu" {
        run_ferry_qemu(&s, &cfg, &mut show)
    } else {
        run_ferry(&s, &cfg, &mut show)
    };
    if tty {
        eprintln!();
    }
    let r = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry-demo: {e}");
            return ExitCode::from(1);
        }
    };
    let st = &r.stats;
    let verdict = match &r.oracle {
        Ok(o) => format!(
            "PASS ({} passes over {} pages, {} filled pages intact)",
            o.passes, o.working_set_pages, o.filled_pages
        ),
        Err(e) => format!("FAIL: {e}"),
    };
    if json_out {
        println!(
            "{}",
            json!({"event": "completed", "stats": st, "wall-ms": r.wall_ms,
                   "guest-downtime-ms": r.guest_downtime_ms, "oracle": verdict})
        );
    } else {
        println!("migration completed");
        println!("  total time        {} ms", st["total-time"]);
        println!("  downtime          {} ms (engine), {:.1} ms (largest heartbeat gap seen by the guest)", st["downtime"], r.guest_downtime_ms);
        println!(
            "  bytes sent        {:.1} MiB ({} data pages, {} zero pages)",
            st["ram"]["transferred"].as_f64().unwrap_or(0.0) / 1048576.0,
            st["ram"]["normal"],
            st["ram"]["duplicate"]
        );
        println!("  passes            {}", passes(st));
        println!("  throttle at end   {}%", st["cpu-throttle-percentage"]);
        println!("  memory oracle     {verdict}");
    }
    if r.oracle.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Draws the bar on a TTY; into a log or a pipe, prints a line per pass and
/// state (not one per update: hundreds for one migration); JSON lines with
/// `--json`. `last` is the (status, pass) of the last plain line.
fn progress(v: &Value, tty: bool, json_out: bool, last: &mut Option<(String, u64)>) {
    if json_out {
        println!("{}", json!({"event": "progress", "stats": v}));
        return;
    }
    let now = (v["status"].as_str().unwrap_or("?").to_string(), passes(v));
    if !tty && last.as_ref() == Some(&now) {
        return;
    }
    *last = Some(now);
    let total = v["ram"]["total"].as_f64().unwrap_or(0.0);
    let remaining = v["ram"]["remaining"].as_f64().unwrap_or(0.0);
    let sent = v["ram"]["transferred"].as_f64().unwrap_or(0.0);
    let frac = if total > 0.0 {
        (sent / total).min(1.0)
    } else {
        0.0
    };
    let width = 30;
    let filled = (frac * width as f64) as usize;
    let line = format!(
        "[{}{}] {:<10} pass {:>3}  sent {:>7.1} MiB  remaining {:>7.1} MiB  {:>6.0} Mbit/s  expected downtime {:>4} ms  throttle {:>2}%",
        "#".repeat(filled),
        "-".repeat(width - filled),
        v["status"].as_str().unwrap_or("?"),
        passes(v),
        sent / 1048576.0,
        remaining / 1048576.0,
        v["ram"]["mbps"].as_f64().unwrap_or(0.0),
        v["expected-downtime"]
            .as_u64()
            .map_or_else(|| "-".to_string(), |x| x.to_string()),
        v["cpu-throttle-percentage"],
    );
    if tty {
        eprint!("\r{line}");
        let _ = std::io::stderr().flush();
    } else {
        eprintln!("{line}");
    }
}

/// Passes over memory: ferry-vm reports `passes`, QMP reports `ram.dirty-sync-count`.
fn passes(v: &Value) -> u64 {
    v["passes"]
        .as_u64()
        .or_else(|| v["ram"]["dirty-sync-count"].as_u64())
        .unwrap_or(0)
}
