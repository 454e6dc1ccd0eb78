//! The QEMU command line: `argv::parse`, then the checks and conversions
//! ferry-qemu runs on a parsed command line (`machine_config`).
//!
//! An input is the argument list without `argv[0]`, NUL-separated (so any
//! bytes are an input). Mutations work on the arguments (drop, duplicate,
//! swap, an option from another command line) and inside one argument on its
//! `key=value,key=value` structure (values replaced by sizes and numbers at
//! the edges, empty keys, doubled commas, JSON where options are expected).

use std::sync::Arc;
use std::time::Duration;

use crate::{class_of, mutate_bytes, Outcome, Rng, Target};

/// Splits an input into arguments.
pub fn args_of(input: &[u8]) -> Vec<String> {
    if input.is_empty() {
        return Vec::new();
    }
    input
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Joins arguments into an input.
pub fn input_of(args: &[String]) -> Vec<u8> {
    args.join("\0").into_bytes()
}

pub fn exec_argv(input: &[u8]) -> Outcome {
    let args = args_of(input);
    match ferry_qemu::argv::parse(&args) {
        Err(e) => {
            let msg = e.to_string();
            if msg.is_empty() {
                return Outcome::Violation("an argv error with an empty message".into());
            }
            Outcome::Handled(class_of("parse", &msg, 4))
        }
        Ok(inv) => {
            let _ = inv.is_probe();
            match inv.machine_config() {
                Ok(Some(cfg)) => {
                    if cfg.vcpus == 0 || cfg.mem_bytes == 0 {
                        return Outcome::Violation(format!(
                            "a machine with {} vCPUs and {} bytes of RAM was accepted",
                            cfg.vcpus, cfg.mem_bytes
                        ));
                    }
                    Outcome::Handled("machine".into())
                }
                Ok(None) => Outcome::Handled("probe".into()),
                Err(e) => Outcome::Handled(class_of("config", &e.to_string(), 4)),
            }
        }
    }
}

fn edge_value(rng: &mut Rng) -> String {
    let n = rng.interesting_u64();
    match rng.below(12) {
        0 => String::new(),
        1 => n.to_string(),
        2 => format!("{n}G"),
        3 => format!("{n}T"),
        4 => format!("{n}E"),
        5 => format!("0x{n:x}"),
        6 => format!("-{}", n >> 1),
        7 => "99999999999999999999999".into(),
        8 => "1.5M".into(),
        9 => "{\"qom-type\":".into(),
        10 => "on,off".into(),
        _ => "\u{0}\u{202e}é".into(),
    }
}

fn mutate_arg(rng: &mut Rng, arg: &mut String) {
    let mut parts: Vec<String> = arg.split(',').map(str::to_string).collect();
    let i = rng.below(parts.len());
    match rng.below(5) {
        0 => {
            // Replace a value, keep the key.
            let key = parts[i].split('=').next().unwrap_or("").to_string();
            parts[i] = format!("{key}={}", edge_value(rng));
        }
        1 => parts[i] = edge_value(rng),
        2 => parts.insert(i, String::new()),
        3 => {
            let key = *rng
                .pick(&[
                    "size", "maxmem", "slots", "cpus", "sockets", "cores", "threads", "maxcpus",
                    "id", "fd", "path", "server", "wait", "set", "opaque", "chardev", "mode",
                    "type", "accel",
                ])
                .unwrap_or(&"x");
            parts.push(format!("{key}={}", edge_value(rng)));
        }
        _ => {
            parts.remove(i);
        }
    }
    *arg = parts.join(",");
}

pub fn mutate_argv(rng: &mut Rng, base: &[u8], pool: &[Vec<u8>]) -> Vec<u8> {
    if rng.chance(1, 5) {
        let mut bytes = base.to_vec();
        mutate_bytes(rng, &mut bytes, pool);
        return bytes;
    }
    let mut args = args_of(base);
    let rounds = 1 + rng.below(3);
    for _ in 0..rounds {
        let n = args.len();
        match rng.below(7) {
            0 if n > 0 => {
                args.remove(rng.below(n));
            }
            1 if n > 0 => {
                let i = rng.below(n);
                let dup = args[i].clone();
                args.insert(rng.below(n + 1), dup);
            }
            2 if n > 1 => {
                let (i, j) = (rng.below(n), rng.below(n));
                args.swap(i, j);
            }
            3 => {
                // An option and its value from another command line.
                if let Some(other) = rng.pick(pool) {
                    let o = args_of(other);
                    let opts: Vec<usize> =
                        (0..o.len()).filter(|&k| o[k].starts_with('-')).collect();
                    if let Some(&k) = rng.pick(&opts) {
                        let at = rng.below(n + 1);
                        let take: Vec<String> = o[k..(k + 2).min(o.len())].to_vec();
                        args.splice(at..at, take);
                    }
                }
            }
            _ if n > 0 => {
                // Values are where the parsing is: prefer the arguments after options.
                let vals: Vec<usize> = (0..n).filter(|&k| !args[k].starts_with('-')).collect();
                let i = rng.pick(&vals).copied().unwrap_or_else(|| rng.below(n));
                mutate_arg(rng, &mut args[i]);
            }
            _ => args.push(edge_value(rng)),
        }
    }
    input_of(&args)
}

pub fn argv_target() -> Target {
    Target {
        name: "argv",
        exec: Arc::new(exec_argv),
        mutate: Box::new(mutate_argv),
        time_bound: Duration::from_secs(5),
        mem_bound: 256 << 20,
    }
}
