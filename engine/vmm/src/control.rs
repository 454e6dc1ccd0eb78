//! The `ferry-vm` control socket and the loop that runs a VM until it exits.
//!
//! One command per line, one JSON object per reply:
//! `status`, `pause`, `resume`, `checkpoint PATH`, `dump PATH`, `peek HEXGPA` (a u64 of
//! guest RAM), `announce` (the NICs' RARP frames), `dirty-rate [SECONDS [PAGES-PER-GIB]]`
//! (QEMU's calc-dirty-rate), `balloon [PAGES | stats SECONDS]` (the balloon's target
//! and stats polling), `devices` (each virtio device's counters), `powerdown` (the ACPI power
//! button), `quit`,
//! `migrate URI`, `query-migrate`, `migrate-cancel`, `migrate-continue`,
//! `migrate-start-postcopy`,
//! `migrate-set KEY=VALUE...` (downtime-limit ms, max-bandwidth bytes/s, verify 0|1,
//! auto-converge 0|1, max-total-time ms, on-timeout cancel|switchover, pause-before-switchover
//! 0|1, multifd-channels 1..16, clear-dirty-log 0|1, postcopy 0|1, postcopy-bandwidth
//! bytes/s, tls-creds
//! x509:DIR[,verify-peer=on|off] or psk:DIR[,username=NAME] or none, tls-hostname NAME).
//! The QEMU-compatible QMP monitor is `ferry-qemu`'s; this is the thin local entry.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use ferry_kvm::{GuestRam, PAGE_SIZE};

use crate::migration::{self, MigrationControl, MigrationUri, TimeoutPolicy};
use crate::persist;
use crate::private_file::PrivateFile;
use crate::vcpu::GuestExit;
use crate::vm::Vm;
use crate::VmmError;

/// Longest command line the control socket accepts.
const MAX_COMMAND: usize = 4096;

/// How a VM's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// `quit` on the control socket.
    Quit,
    Guest(GuestExit),
    /// The VM moved to another host.
    Migrated,
}

struct Request {
    line: String,
    reply: Sender<Value>,
    /// Signalled once the reply is on the socket: a process about to exit (quit, the
    /// VM migrated away) waits for it, or the client would read EOF instead.
    written: Receiver<()>,
}

/// How long an exiting process waits for its last reply to be written.
const LAST_REPLY_WAIT: Duration = Duration::from_secs(2);

/// Writes guest RAM as a raw image whose file offset is the guest physical address
/// (zero pages and the MMIO hole are left as holes: the file is sparse).
pub fn dump_memory(ram: &GuestRam, path: &Path) -> Result<u64, VmmError> {
    let io = |e| VmmError::Io(format!("cannot write memory image {}", path.display()), e);
    let out = PrivateFile::create(path).map_err(io)?;
    let file = out.file();
    let mut page = vec![0u8; PAGE_SIZE];
    let mut end = 0;
    for (base, size) in ram.ranges() {
        let mut gpa = base;
        while gpa < base + size {
            if !ram.is_zero_page(gpa)? {
                ram.read(gpa, &mut page)?;
                file.write_all_at(&page, gpa).map_err(io)?;
            }
            gpa += PAGE_SIZE as u64;
        }
        end = base + size;
    }
    file.set_len(end).map_err(io)?;
    out.commit().map_err(io)?;
    Ok(end)
}

/// Writes a checkpoint to `path` atomically and for its owner alone
/// ([`PrivateFile`]), so a failure (a full disk) never leaves a half-written
/// checkpoint under that name, nor over the checkpoint that was there.
pub fn checkpoint_to_file(vm: &Vm, path: &Path) -> Result<persist::CheckpointStats, VmmError> {
    let io = |e| VmmError::Io(format!("cannot write checkpoint {}", path.display()), e);
    let mut out = PrivateFile::create(path).map_err(io)?;
    let (w, stats) = persist::save(
        vm,
        std::io::BufWriter::with_capacity(1 << 20, out.file_mut()),
    )?;
    w.into_inner().map_err(|e| io(e.into_error()))?;
    out.commit().map_err(io)?;
    Ok(stats)
}

/// Control connections served at once; one more is told so and closed.
const MAX_CONNECTIONS: usize = 16;

fn listen(path: &Path, ctl: Arc<MigrationControl>) -> Result<Receiver<Request>, VmmError> {
    let listener = crate::private_file::bind_socket(path)
        .map_err(|e| VmmError::Io(format!("cannot listen on {}", path.display()), e))?;
    let (tx, rx) = mpsc::channel();
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            use std::sync::atomic::Ordering;
            for mut stream in listener.incoming().flatten() {
                if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    open.fetch_sub(1, Ordering::AcqRel);
                    let _ = writeln!(
                        stream,
                        "{}",
                        json!({"ok": false, "error": format!(
                            "{MAX_CONNECTIONS} control connections are open: close one"
                        )})
                    );
                    continue;
                }
                let tx = tx.clone();
                let ctl = ctl.clone();
                let done = open.clone();
                let spawned = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        serve_connection(stream, tx, ctl);
                        done.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    open.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })
        .map_err(|e| VmmError::Io("cannot start the control thread".into(), e))?;
    Ok(rx)
}

fn serve_connection(stream: UnixStream, tx: Sender<Request>, ctl: Arc<MigrationControl>) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream).take(u64::MAX);
    loop {
        let mut line = String::new();
        reader.set_limit(MAX_COMMAND as u64 + 1);
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) if n > MAX_COMMAND => {
                let _ = writeln!(out, "{}", json!({"ok": false, "error": "command too long"}));
                return;
            }
            Ok(_) => {}
        }
        // Migration queries and steering are answered here, so they work while the
        // main loop runs a migration.
        if let Some(reply) = migration_command(&ctl, line.trim()) {
            if writeln!(out, "{reply}").is_err() {
                return;
            }
            continue;
        }
        let (reply_tx, reply_rx) = mpsc::channel();
        let (written_tx, written_rx) = mpsc::channel();
        if tx
            .send(Request {
                line: line.trim().to_string(),
                reply: reply_tx,
                written: written_rx,
            })
            .is_err()
        {
            return;
        }
        let Ok(reply) = reply_rx.recv() else { return };
        let sent = writeln!(out, "{reply}").and_then(|_| out.flush());
        let _ = written_tx.send(());
        if sent.is_err() {
            return;
        }
    }
}

/// Runs `vm` (already booted or restored; started if `start` is set) until the guest
/// exits or `quit` arrives on the control socket at `control`.
pub fn run(mut vm: Vm, control: Option<&Path>, start: bool) -> Result<RunOutcome, VmmError> {
    let ctl = MigrationControl::new(migration::MigrationParams::default());
    let requests = match control {
        Some(p) => Some(listen(p, ctl.clone())?),
        None => None,
    };
    if start {
        vm.resume()?;
    }
    loop {
        if let Ok(exit) = vm.exits().try_recv() {
            let _ = vm.pause();
            return Ok(RunOutcome::Guest(exit));
        }
        let Some(requests) = &requests else {
            match vm.exits().recv_timeout(Duration::from_secs(3600)) {
                Ok(exit) => {
                    let _ = vm.pause();
                    return Ok(RunOutcome::Guest(exit));
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(VmmError::Config("every vCPU thread has exited".into()))
                }
            }
        };
        match requests.recv_timeout(Duration::from_millis(20)) {
            Ok(req) => {
                if let Some(uri) = req.line.strip_prefix("migrate ") {
                    let (back, reply, moved) = migrate(vm, uri.trim(), &ctl)?;
                    vm = back;
                    let _ = req.reply.send(reply);
                    if moved {
                        let _ = req.written.recv_timeout(LAST_REPLY_WAIT);
                        return Ok(RunOutcome::Migrated);
                    }
                    continue;
                }
                let (reply, quit) = handle(&mut vm, &req.line);
                let _ = req.reply.send(reply);
                if quit {
                    let _ = req.written.recv_timeout(LAST_REPLY_WAIT);
                    let _ = vm.pause();
                    return Ok(RunOutcome::Quit);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(VmmError::Config(
                    "the control socket thread has exited".into(),
                ))
            }
        }
    }
}

fn status(vm: &Vm) -> &'static str {
    if vm.is_running() {
        "running"
    } else {
        "paused"
    }
}

fn handle(vm: &mut Vm, line: &str) -> (Value, bool) {
    let (cmd, arg) = match line.split_once(' ') {
        Some((c, a)) => (c, a.trim()),
        None => (line, ""),
    };
    let result: Result<Value, VmmError> = match cmd {
        "status" => Ok(json!({"status": status(vm)})),
        "pause" | "stop" => vm.pause().map(|_| json!({"status": status(vm)})),
        "resume" | "cont" => vm.resume().map(|_| json!({"status": status(vm)})),
        "quit" => return (json!({"ok": true}), true),
        "peek" => u64::from_str_radix(arg.trim_start_matches("0x"), 16)
            .map_err(|_| VmmError::Command(format!("peek needs a hex guest address, not '{arg}'")))
            .and_then(|gpa| {
                let mut b = [0u8; 8];
                vm.ram().read(gpa, &mut b)?;
                Ok(json!({"gpa": gpa, "value": u64::from_le_bytes(b)}))
            }),
        "checkpoint" | "dump" if arg.is_empty() => Err(VmmError::Command(format!(
            "'{cmd}' needs a file path: {cmd} PATH"
        ))),
        "checkpoint" => with_paused(vm, |vm| {
            let start = Instant::now();
            let stats = checkpoint_to_file(vm, Path::new(arg))?;
            let secs = start.elapsed().as_secs_f64();
            Ok(json!({
                "path": arg,
                "bytes": stats.bytes,
                "ram_pages": stats.ram_pages,
                "zero_pages_skipped": stats.zero_pages_skipped,
                "seconds": secs,
            }))
        }),
        "dump" => with_paused(vm, |vm| {
            let size = dump_memory(vm.ram(), Path::new(arg))?;
            Ok(json!({"path": arg, "size": size}))
        }),
        "announce" => Ok(json!({"nics": vm.announce_with(
            crate::devices::virtio::net::AnnounceSchedule::default(),
            None
        )})),
        "dirty-rate" => dirty_rate(vm, arg),
        "balloon" => balloon(vm, arg),
        "devices" => Ok(devices(vm)),
        "powerdown" => Ok(json!({"pressed": vm.press_power_button()})),
        _ => Err(VmmError::Command(format!(
            "unknown command '{cmd}': use status, pause, resume, checkpoint PATH, dump PATH, \
             announce, dirty-rate [SECONDS [PAGES-PER-GIB]], balloon [PAGES|stats SECONDS], \
             devices, powerdown or quit"
        ))),
    };
    match result {
        Ok(mut v) => {
            v["ok"] = json!(true);
            (v, false)
        }
        Err(e) => (json!({"ok": false, "error": crate::error_chain(&e)}), false),
    }
}

/// `balloon PAGES` sets the balloon's target (pages for the guest to give
/// back), `balloon stats SECONDS` its stats polling interval; every form
/// reports the balloon: target, actual, the guest's statistics.
fn balloon(vm: &Vm, arg: &str) -> Result<Value, VmmError> {
    let number = |w: &str| {
        w.parse::<u64>().map_err(|_| {
            VmmError::Command(format!(
                "balloon takes PAGES or stats SECONDS as numbers, not '{w}'"
            ))
        })
    };
    match arg.split_whitespace().collect::<Vec<_>>().as_slice() {
        [] => {}
        ["stats", secs] => {
            let secs = u32::try_from(number(secs)?).map_err(|_| {
                VmmError::Command(format!("balloon stats takes at most {} s", u32::MAX))
            })?;
            vm.set_balloon_stats_interval(secs)?;
        }
        [pages] => vm.set_balloon_target(number(pages)?)?,
        _ => {
            return Err(VmmError::Command(
                "balloon takes PAGES, stats SECONDS or nothing".into(),
            ))
        }
    }
    let info = vm.balloon_info().ok_or(VmmError::NoBalloon)?;
    let stats: serde_json::Map<String, Value> = crate::devices::virtio::balloon::STAT_NAMES
        .iter()
        .zip(info.stats)
        .filter_map(|(name, v)| Some((name.to_string(), json!(v?))))
        .collect();
    Ok(json!({
        "target_pages": info.num_pages,
        "actual_pages": info.actual,
        "held_pages": info.counters.held_pages,
        "reported_pages": info.counters.reported_pages,
        "stats": stats,
        "stats_last_update": info.stats_last_update,
        "stats_interval": info.poll_interval,
    }))
}

/// `devices`: each virtio device's id, kind and counters (since it was
/// created on this host), by slot.
fn devices(vm: &Vm) -> Value {
    use crate::devices::virtio::DeviceStats;
    let devices: Vec<Value> = vm
        .device_stats()
        .into_iter()
        .map(|(id, stats)| match stats {
            DeviceStats::Block(b) => json!({
                "id": id,
                "kind": "virtio-blk",
                "rd_bytes": b.rd_bytes,
                "wr_bytes": b.wr_bytes,
                "rd_operations": b.rd_operations,
                "wr_operations": b.wr_operations,
                "flush_operations": b.flush_operations,
                "failed_rd_operations": b.failed_rd_operations,
                "failed_wr_operations": b.failed_wr_operations,
                "failed_flush_operations": b.failed_flush_operations,
                "invalid_operations": b.invalid_operations,
            }),
            DeviceStats::Net(n) => json!({
                "id": id,
                "kind": "virtio-net",
                "tx_frames": n.tx_frames,
                "tx_dropped": n.tx_dropped,
                "rx_frames": n.rx_frames,
                "rx_dropped": n.rx_dropped,
                "announces": n.announces,
            }),
            DeviceStats::Rng(r) => json!({
                "id": id,
                "kind": "virtio-rng",
                "bytes": r.bytes,
                "requests": r.requests,
                "throttled": r.throttled,
            }),
            DeviceStats::Balloon(b) => json!({
                "id": id,
                "kind": "virtio-balloon",
                "held_pages": b.held_pages,
                "inflated_pages": b.inflated_pages,
                "deflated_pages": b.deflated_pages,
                "reported_pages": b.reported_pages,
                "refused_pfns": b.refused_pfns,
                "discard_failures": b.discard_failures,
            }),
        })
        .collect();
    json!({ "devices": devices })
}

/// `dirty-rate SECONDS [PAGES-PER-GIB]` starts measuring the guest's dirty
/// rate (QEMU's calc-dirty-rate, page-sampling); `dirty-rate` alone reports
/// the last measurement.
fn dirty_rate(vm: &Vm, arg: &str) -> Result<Value, VmmError> {
    let meter = vm.dirty_rate();
    let words: Vec<&str> = arg.split_whitespace().collect();
    if let [secs, rest @ ..] = words.as_slice() {
        let number = |w: &str| {
            w.parse::<u64>().map_err(|_| {
                VmmError::Command(format!(
                    "dirty-rate takes SECONDS [PAGES-PER-GIB] as numbers, not '{w}'"
                ))
            })
        };
        let sample = match rest {
            [] => crate::dirty_rate::DEFAULT_SAMPLE_PAGES,
            [n] => number(n)?,
            _ => {
                return Err(VmmError::Command(
                    "dirty-rate takes at most SECONDS and PAGES-PER-GIB".into(),
                ))
            }
        };
        meter.start(vm.ram().clone(), number(secs)?, sample)?;
    }
    let m = meter.last();
    Ok(json!({
        "status": m.status.as_str(),
        "calc-time": m.calc_time_s,
        "sample-pages": m.sample_pages,
        "dirty-rate": m.dirty_rate,
    }))
}

/// Runs `f` with the VM paused, and resumes it afterwards if it was running — also when
/// `f` fails, so a failed checkpoint never stops the guest.
fn with_paused(
    vm: &mut Vm,
    f: impl FnOnce(&Vm) -> Result<Value, VmmError>,
) -> Result<Value, VmmError> {
    let was_running = vm.is_running();
    if was_running {
        vm.pause()?;
    }
    let result = f(vm);
    if was_running {
        vm.resume()?;
    }
    result
}

/// Runs an outgoing migration to `uri` and waits for its end: the VM back,
/// the reply, and whether the VM has moved.
fn migrate(vm: Vm, uri: &str, ctl: &Arc<MigrationControl>) -> Result<(Vm, Value, bool), VmmError> {
    let failed = |vm: &Vm, e: &migration::MigrationError| json!({"ok": false, "error": crate::error_chain(e), "status": status(vm)});
    let target = match uri.parse::<migration::Target>() {
        Ok(t) => t,
        Err(e) => {
            let reply = failed(&vm, &e);
            return Ok((vm, reply, false));
        }
    };
    // After a migration into a file the VM stays, paused, as QEMU's does
    // (`resume` runs it on); after a live one it runs elsewhere.
    let to_file = matches!(target, migration::Target::Uri(MigrationUri::File(_)));
    let source = match migration::Source::start(vm, target, ctl, |vm, r| (vm, r)) {
        Ok(s) => s,
        Err(not) => {
            let reply = failed(&not.vm, &not.error);
            return Ok((not.vm, reply, false));
        }
    };
    let (vm, result) = source.wait().map_err(|_| VmmError::MigrationLost)?;
    Ok(match result {
        Ok(stats) => (
            vm,
            json!({"ok": true, "migration": serde_json::to_value(&stats).unwrap_or_default()}),
            !to_file,
        ),
        Err(e) => {
            let reply = failed(&vm, &e);
            (vm, reply, false)
        }
    })
}

/// Commands on a migration in flight; `None` for anything else.
fn migration_command(ctl: &MigrationControl, line: &str) -> Option<Value> {
    let (cmd, args) = line.split_once(' ').unwrap_or((line, ""));
    let reply = match cmd {
        // The main loop is busy migrating: answer here rather than after it.
        "status" => {
            let state = ctl.stats().status;
            if !state.in_progress() {
                return None;
            }
            json!({"ok": true, "status": "migrating", "migration": state.as_str()})
        }
        "query-migrate" => {
            let mut v = serde_json::to_value(ctl.stats()).unwrap_or_default();
            v["ok"] = json!(true);
            v
        }
        "migrate-cancel" => {
            ctl.cancel();
            json!({"ok": true})
        }
        "migrate-continue" => {
            ctl.resume_switchover();
            json!({"ok": true})
        }
        "migrate-start-postcopy" => match ctl.start_postcopy() {
            Ok(()) => json!({"ok": true}),
            Err(e) => json!({"ok": false, "error": crate::error_chain(&e)}),
        },
        "migrate-set" => match set_params(ctl, args) {
            Ok(()) => json!({"ok": true}),
            // The TLS errors embed their causes: their text is the whole story.
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        _ => return None,
    };
    Some(reply)
}

/// States in which `migrate` has not returned yet.
/// Why `migrate-set` refuses its arguments; nothing was changed.
#[derive(Debug, thiserror::Error)]
enum SetParamsError {
    #[error("'{0}' is not KEY=VALUE")]
    NotKeyValue(String),
    #[error("{key}: '{value}' is not a number")]
    NotANumber { key: String, value: String },
    #[error("{key}: '{value}' is not on/off")]
    NotOnOff { key: String, value: String },
    #[error("multifd-channels: '{value}' is not 1 to {max}")]
    ChannelCount { value: String, max: u32 },
    #[error("on-timeout: '{0}' is not cancel or switchover")]
    OnTimeout(String),
    #[error("unknown migration parameter '{0}'")]
    UnknownParameter(String),
    /// `tls-creds` does not parse.
    #[error(transparent)]
    ParseTlsCreds(migration::TlsError),
    /// The credentials `tls-creds` names cannot be loaded.
    #[error(transparent)]
    LoadTlsCreds(migration::TlsError),
}

fn set_params(ctl: &MigrationControl, args: &str) -> Result<(), SetParamsError> {
    let mut p = ctl.params();
    for kv in args.split_whitespace() {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| SetParamsError::NotKeyValue(kv.to_string()))?;
        let num = || {
            v.parse::<u64>().map_err(|_| SetParamsError::NotANumber {
                key: k.to_string(),
                value: v.to_string(),
            })
        };
        let flag = || match v {
            "1" | "on" | "true" => Ok(true),
            "0" | "off" | "false" => Ok(false),
            _ => Err(SetParamsError::NotOnOff {
                key: k.to_string(),
                value: v.to_string(),
            }),
        };
        match k {
            "downtime-limit" => p.downtime_limit_ms = num()?,
            "max-bandwidth" => p.max_bandwidth = num()?,
            "max-total-time" => p.max_total_time_ms = num()?,
            "verify" => p.verify_digest = flag()?,
            "auto-converge" => p.auto_converge = flag()?,
            "dirty-limit" => p.dirty_limit = flag()?,
            "pause-before-switchover" => p.pause_before_switchover = flag()?,
            "clear-dirty-log" => p.clear_dirty_log = flag()?,
            "postcopy" => p.postcopy = flag()?,
            "postcopy-bandwidth" => p.max_postcopy_bandwidth = num()?,
            "tls-creds" if v == "none" || v.is_empty() => p.tls = None,
            "tls-creds" => {
                let spec = migration::CredsSpec::parse(v).map_err(SetParamsError::ParseTlsCreds)?;
                p.tls = Some(
                    migration::TlsCreds::load(spec, migration::Endpoint::Client)
                        .map_err(SetParamsError::LoadTlsCreds)?,
                );
            }
            "tls-hostname" => p.tls_hostname = (!v.is_empty()).then(|| v.to_string()),
            "multifd-channels" => {
                let max = migration::MAX_STREAMS;
                p.multifd_channels = match u32::try_from(num()?) {
                    Ok(n) if (1..=max).contains(&n) => n,
                    _ => {
                        return Err(SetParamsError::ChannelCount {
                            value: v.to_string(),
                            max,
                        })
                    }
                }
            }
            "on-timeout" => {
                p.on_timeout = match v {
                    "cancel" => TimeoutPolicy::Cancel,
                    "switchover" => TimeoutPolicy::ForceSwitchover,
                    _ => return Err(SetParamsError::OnTimeout(v.to_string())),
                }
            }
            _ => return Err(SetParamsError::UnknownParameter(k.to_string())),
        }
    }
    ctl.set_params(|q| *q = p);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::SinkSpec;
    use crate::devices::virtio::balloon::BalloonConfig;
    use crate::vm::{VirtioDeviceSpec, VirtioSpec, VmConfig};

    fn vm(virtio: Vec<VirtioSpec>) -> Vm {
        Vm::create(VmConfig {
            mem_bytes: 16 << 20,
            vcpus: 1,
            backing: ferry_kvm::Backing::Anonymous,
            serial: SinkSpec::Null,
            cpu: crate::cpu::model::CpuModel::Host,
            virtio,
            ide: Vec::new(),
            fw_cfg: None,
            firmware: None,
            rtc: None,
        })
        .expect("VM")
    }

    #[test]
    fn balloon_command_sets_and_reports_the_balloon() {
        let mut v = vm(vec![VirtioSpec {
            slot: 5,
            id: "balloon0".into(),
            device: VirtioDeviceSpec::Balloon(BalloonConfig::default()),
        }]);
        let (r, _) = handle(&mut v, "balloon 1000");
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(
            (r["target_pages"].as_u64(), r["actual_pages"].as_u64()),
            (Some(1000), Some(0))
        );
        let (r, _) = handle(&mut v, "balloon stats 5");
        assert_eq!(r["stats_interval"], 5, "{r}");
        assert_eq!(r["stats"], json!({}), "the guest sent none");
        let (r, _) = handle(&mut v, "balloon");
        assert_eq!(r["target_pages"], 1000, "{r}");
        for (bad, words) in [
            ("balloon lots", "as numbers"),
            ("balloon 99999999", "larger than guest RAM"),
            ("balloon 1 2", "PAGES, stats SECONDS or nothing"),
        ] {
            let (r, _) = handle(&mut v, bad);
            assert_eq!(r["ok"], false, "{bad}");
            assert!(r["error"].as_str().unwrap().contains(words), "{bad}: {r}");
        }
        let (r, _) = handle(&mut vm(vec![]), "balloon");
        assert_eq!(r["error"], "the VM has no balloon device", "{r}");
    }

    #[test]
    fn devices_command_lists_each_device_with_its_counters() {
        use crate::devices::virtio::rng::{RngConfig, RngSource};
        let mut v = vm(vec![
            VirtioSpec {
                slot: 4,
                id: "rng0".into(),
                device: VirtioDeviceSpec::Rng(RngConfig::new(RngSource::Builtin)),
            },
            VirtioSpec {
                slot: 5,
                id: "balloon0".into(),
                device: VirtioDeviceSpec::Balloon(BalloonConfig::default()),
            },
        ]);
        let (r, _) = handle(&mut v, "devices");
        assert_eq!(r["ok"], true, "{r}");
        let d = &r["devices"];
        assert_eq!(
            (&d[0]["id"], &d[0]["kind"]),
            (&json!("rng0"), &json!("virtio-rng"))
        );
        assert_eq!(d[0]["bytes"], 0, "{r}");
        assert_eq!(d[1]["kind"], "virtio-balloon", "{r}");
        assert_eq!(d[1]["discard_failures"], 0, "{r}");
        let (r, _) = handle(&mut vm(vec![]), "devices");
        assert_eq!(r["devices"], json!([]), "{r}");
    }
}
