//! Every QMP conversation the libvirt lab recorded between libvirt 9.0 and
//! QEMU 7.2 (`tests/fixtures/conversations.jsonl`, made from the lab's
//! `logs/conversations/*.full.txt` by `conversations.py`), replayed against
//! ferry-qemu: each command in its recorded order, after the migration and
//! run-state events QEMU had sent before it; every reply must be of the
//! recorded kind (a return of the same JSON type, or an error of the same
//! class). Recorded values (addresses, timings, thread ids) cannot match
//! another process and are not compared.
//!
//! What ferry-qemu runs for each monitor: the capability probe
//! (`-machine none`) for probe monitors; otherwise a dirtier domain started
//! the way libvirt starts one (`-S`, `pc`, 256 MiB, `-incoming defer` where
//! the conversation migrates in), already running for monitors the lab
//! caught open. A source and its destination are replayed together, each on
//! its own thread, so `migrate` really moves the guest. Host-specific URIs
//! (the listening port, an fd libvirt inherited to QEMU) are rewritten to a
//! loopback TCP endpoint, and the `getfd` socket is one this test connects to
//! the destination, as libvirtd does.
//!
//! libvirt adapts its conversation to what the emulator advertises, and the
//! replay does the same: it sends the migration capabilities ferry-qemu
//! lists and sends back the migration parameters ferry-qemu reported. A
//! reply of another kind is accepted only where libvirt would never have
//! asked ferry-qemu: a command missing from its `query-commands`, a device
//! type missing from its `qom-list-types`, a property missing from its
//! `qom-list` of that path; or where [`DIVERGENCES`] gives the reason. Every
//! other difference fails the test, and so does a documented divergence that
//! no longer happens.
//!
//! Conversations of domains with disks, NICs or host devices happen with
//! ferry-qemu only up to the start: ferry-qemu refuses their command lines,
//! naming the device (the argv tests replay those lines). Their monitors are
//! still replayed on a diskless domain, so the block and device commands in
//! them meet ferry-qemu.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use super::{kvm_usable, wait_for_serial, Qemu, Qmp, BIN};

const CONVERSATIONS: &str = include_str!("../fixtures/conversations.jsonl");

#[derive(Debug, Deserialize)]
struct Monitor {
    conv: String,
    mon: u32,
    open: String,
    steps: Vec<Step>,
}

#[derive(Debug, Deserialize)]
struct Step {
    cmd: Value,
    fd: bool,
    reply: String,
    #[serde(default)]
    desc: String,
    events: Vec<String>,
}

impl Monitor {
    fn is_probe(&self) -> bool {
        self.steps.iter().any(|s| {
            matches!(
                s.cmd["execute"].as_str(),
                Some("query-qmp-schema" | "query-kvm")
            )
        })
    }

    fn migrates_in(&self) -> bool {
        self.steps
            .iter()
            .any(|s| s.cmd["execute"] == "migrate-incoming")
    }

    fn migrates_out(&self) -> bool {
        self.steps.iter().any(|s| s.cmd["execute"] == "migrate")
    }

    fn name(&self) -> String {
        format!("{}#{}", self.conv, self.mon)
    }
}

/// Replies of ferry-qemu that differ from QEMU's on purpose:
/// (command, recorded reply, ferry-qemu's reply, why). None now: the
/// balloon, the last one (modelled as absent), is a real device.
const DIVERGENCES: &[(&str, &str, &str, &str)] = &[];

/// The events a step waits for: run-state and migration-state changes, which
/// order a conversation. Others (MIGRATION_PASS counts, balloon, NIC filter)
/// depend on the guest and the engine, not on the conversation.
fn ordering_event(e: &str) -> bool {
    e.starts_with("MIGRATION:") || matches!(e, "STOP" | "RESUME")
}

/// The kind of a reply, as the fixture records it.
fn kind_of(reply: &Value) -> String {
    if let Some(e) = reply.get("error") {
        return format!("error:{}", e["class"].as_str().unwrap_or("?"));
    }
    let k = match &reply["return"] {
        Value::Object(_) => "object",
        Value::Array(_) => "array",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Null => "null",
    };
    format!("return:{k}")
}

/// What the ferry-qemu under replay advertises: libvirt sends no command
/// that `query-commands` lacks, and asks `device-list-properties` of types
/// that may be missing (QEMU answers those with DeviceNotFound too).
#[derive(Debug, Default)]
struct Advertised {
    commands: Vec<String>,
    types: Vec<String>,
    /// `query-migrate-capabilities` names.
    capabilities: Vec<String>,
    /// `query-migrate-parameters` keys.
    parameters: Vec<String>,
    /// What ferry-qemu's `qom-list` returned, by path (filled while replaying).
    listed: BTreeMap<String, Vec<String>>,
}

impl Advertised {
    fn of(q: &mut Qmp) -> Self {
        let names = |v: Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|c| c["name"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let commands = names(q.ok("query-commands", json!({})));
        let types = names(q.ok("qom-list-types", json!({})));
        let capabilities = q
            .ok("query-migrate-capabilities", json!({}))
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["capability"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let reply = q.cmd_with_fd("query-migrate-parameters", json!({}), None);
        let parameters = reply["return"]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        Self {
            commands,
            types,
            capabilities,
            parameters,
            listed: BTreeMap::new(),
        }
    }

    /// The arguments libvirt would send ferry-qemu where QEMU got `args`:
    /// libvirt sets only the migration capabilities the emulator listed, and
    /// sends back the parameters it read from it (plus the TLS pair it
    /// always resets).
    fn adapt(&self, name: &str, mut args: Value) -> Value {
        match name {
            "migrate-set-capabilities" => {
                if let Some(caps) = args["capabilities"].as_array_mut() {
                    caps.retain(|c| {
                        c["capability"]
                            .as_str()
                            .is_some_and(|n| self.capabilities.iter().any(|k| k == n))
                    });
                }
            }
            "migrate-set-parameters" => {
                if let Some(o) = args.as_object_mut() {
                    o.retain(|k, _| {
                        k.starts_with("tls-") || self.parameters.iter().any(|p| p == k)
                    });
                }
            }
            _ => {}
        }
        args
    }

    /// Why ferry-qemu's `got` for `name` is right although QEMU answered
    /// otherwise, if it is.
    fn explains(&self, name: &str, args: &Value, got: &str) -> Option<String> {
        if got == "error:CommandNotFound" && !self.commands.iter().any(|c| c == name) {
            return Some(format!(
                "ferry-qemu does not offer {name} (not in its query-commands, so libvirt does not send it)"
            ));
        }
        if name == "nbd-server-start" && got == "error:GenericError" {
            return Some(
                "ferry-qemu cannot copy storage: its nbd-server-start says why, and libvirt's \
                 --copy-storage-all stops there with the guest running on at the source"
                    .into(),
            );
        }
        if name == "qom-get" && got.starts_with("error:") {
            let path = args["path"].as_str().unwrap_or("");
            let prop = args["property"].as_str().unwrap_or("");
            let listed = self.listed.get(path);
            if listed.is_some_and(|l| !l.iter().any(|p| p == prop)) {
                return Some(format!(
                    "a property ferry-qemu's qom-list of {path} does not name (libvirt reads only listed ones)"
                ));
            }
        }
        let typename = args["typename"].as_str().unwrap_or("");
        if name == "device-list-properties"
            && got == "error:DeviceNotFound"
            && !self.types.iter().any(|t| t == typename)
        {
            return Some(format!(
                "ferry-qemu has no {typename} (not in its qom-list-types); QEMU answers the same for types it lacks"
            ));
        }
        None
    }
}

/// What one replayed monitor found.
#[derive(Debug, Default)]
struct Outcome {
    steps: usize,
    matched: usize,
    allowed: Vec<String>,
    mismatches: Vec<String>,
}

/// Where the destination of a pair listens once its `migrate-incoming` ran.
type PortTx = mpsc::Sender<u16>;
type PortRx = mpsc::Receiver<u16>;

fn spawn(dir: &Path, tag: &str, probe: bool, incoming: bool) -> Qemu {
    let qmp = dir.join(format!("{tag}.qmp"));
    let mut cmd = Command::new(BIN);
    cmd.args(["-S", "-no-user-config", "-nodefaults", "-nographic"]);
    if probe {
        cmd.args(["-machine", "none,accel=kvm:tcg"]);
    } else {
        cmd.args(["-machine", "pc-i440fx-7.2,usb=off", "-accel", "kvm"])
            .args(["-cpu", "qemu64", "-m", "256", "-smp", "1"])
            .args(["-device", "virtio-balloon-pci,id=balloon0"])
            .arg("-kernel")
            .arg(dir.join("dirtier.elf"))
            .args(["-append", "ws=4M hb=10"])
            .arg("-serial")
            .arg(format!(
                "file:{}",
                dir.join(format!("{tag}.serial")).display()
            ));
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
    }
    let child = cmd
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn ferry-qemu");
    Qemu { child, qmp }
}

/// Waits until ferry-qemu has sent `event` (`MIGRATION:status` or a name);
/// returns false after `timeout`.
fn wait_for(q: &mut Qmp, event: &str, timeout: Duration) -> bool {
    let (name, status) = match event.split_once(':') {
        Some((n, s)) => (n, Some(s)),
        None => (event, None),
    };
    let hit = |v: &Value| v["event"] == name && status.is_none_or(|s| v["data"]["status"] == s);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(i) = q.events.iter().position(hit) {
            q.events.drain(..=i);
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        // An idle command lets pending events arrive.
        let _ = q.cmd_with_fd("query-status", json!({}), None);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Replays `mon` on the ferry-qemu behind `q`. A destination sends its
/// listening port to `port_tx`; a source takes it from `port_rx` for `getfd`.
fn replay(q: &mut Qmp, mon: &Monitor, port_tx: Option<PortTx>, port_rx: Option<PortRx>) -> Outcome {
    let mut out = Outcome::default();
    let mut sockets = Vec::new();
    let mut adv = Advertised::of(q);
    for (i, step) in mon.steps.iter().enumerate() {
        let name = step.cmd["execute"].as_str().unwrap_or("?").to_string();
        let at = format!("{} step {i} ({name})", mon.name());
        for e in step.events.iter().filter(|e| ordering_event(e)) {
            if !wait_for(q, e, Duration::from_secs(30)) {
                let m = format!("{at}: QEMU had sent {e} before it; ferry-qemu did not");
                eprintln!("{m}");
                out.mismatches.push(m);
            }
        }
        if name == "qmp_capabilities" {
            // Negotiated by `Qmp::connect`; a second one must be refused the
            // QEMU way.
            let r = q.cmd_with_fd("qmp_capabilities", json!({}), None);
            assert_eq!(r["error"]["class"], "CommandNotFound", "{at}: {r}");
            out.steps += 1;
            out.matched += 1;
            continue;
        }
        let mut args = step.cmd.get("arguments").cloned().unwrap_or(json!({}));
        let mut fd = None;
        let mut listening = None;
        if name == "migrate-incoming" {
            let port = super::free_port();
            args["uri"] = json!(format!("tcp:127.0.0.1:{port}"));
            listening = Some(port);
        }
        if name == "getfd" && step.fd {
            let port = port_rx
                .as_ref()
                .and_then(|rx| rx.recv_timeout(Duration::from_secs(60)).ok());
            // No destination in this conversation: a socket nobody reads.
            let sock = match port {
                Some(p) => std::net::TcpStream::connect(("127.0.0.1", p))
                    .unwrap_or_else(|e| panic!("{at}: connect to the destination: {e}")),
                None => {
                    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                    let s = std::net::TcpStream::connect(l.local_addr().expect("addr"))
                        .expect("connect");
                    sockets.push(l);
                    s
                }
            };
            fd = Some(sock.as_raw_fd());
            let r = q.cmd_with_fd(&name, args.clone(), fd);
            drop(sock);
            judge(&mut out, &adv, &at, &name, step, &r);
            continue;
        }
        let args = adv.adapt(&name, args);
        let r = q.cmd_with_fd(&name, args.clone(), fd);
        // The source may connect once the destination has answered.
        if let (Some(port), Some(tx)) = (listening, &port_tx) {
            let _ = tx.send(port);
        }
        if name == "qom-list" {
            if let (Some(path), Some(props)) = (args["path"].as_str(), r["return"].as_array()) {
                let names = props
                    .iter()
                    .filter_map(|p| p["name"].as_str().map(str::to_string))
                    .collect();
                adv.listed.insert(path.to_string(), names);
            }
        }
        judge(&mut out, &adv, &at, &name, step, &r);
    }
    out
}

fn judge(out: &mut Outcome, adv: &Advertised, at: &str, name: &str, step: &Step, reply: &Value) {
    out.steps += 1;
    let got = kind_of(reply);
    let want = step.reply.as_str();
    let same = got == want
        // A truncated recorded return whose type the extractor could not tell.
        || (want == "return:other" && got.starts_with("return:"));
    if same {
        out.matched += 1;
        return;
    }
    let args = step.cmd.get("arguments").cloned().unwrap_or(json!({}));
    let why = DIVERGENCES
        .iter()
        .find(|(c, w, g, _)| *c == name && *w == want && *g == got)
        .map(|(_, _, _, why)| (*why).to_string())
        .or_else(|| adv.explains(name, &args, &got));
    match why {
        Some(why) => out.allowed.push(format!("{name}: {want} -> {got}: {why}")),
        None => {
            let m = format!("{at}: QEMU {want} {}, ferry-qemu {got}: {reply}", step.desc);
            eprintln!("{m}");
            out.mismatches.push(m);
        }
    }
}

/// Starts the ferry-qemu of `mon` in `dir` and connects to it; a monitor the
/// lab caught already open gets a running guest, as it had.
fn start(dir: &Path, mon: &Monitor, tag: &str) -> (Qemu, Qmp) {
    let qemu = spawn(dir, tag, mon.is_probe(), mon.migrates_in());
    let mut q = Qmp::connect(&qemu.qmp);
    if mon.open == "already" {
        q.ok(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
        );
        q.ok("cont", json!({}));
        wait_for_serial(&dir.join(format!("{tag}.serial")), "dirtier: ready");
        q.events.clear();
    }
    (qemu, q)
}

/// Source and destination of the same migration: `NN-x-SRC-host` and the
/// `DST` file numbered one higher.
fn pairs(monitors: &[Monitor]) -> (Vec<(usize, usize)>, Vec<usize>) {
    let mut pairs = Vec::new();
    let mut single = Vec::new();
    let mut used = vec![false; monitors.len()];
    for (i, m) in monitors.iter().enumerate() {
        if used[i] || !m.migrates_out() {
            continue;
        }
        let num: u32 = m.conv[..2].parse().expect("numbered conversation");
        let dst = monitors.iter().position(|d| {
            d.migrates_in()
                && d.conv.starts_with(&format!("{:02}-", num + 1))
                && d.conv.contains("-DST-")
        });
        if let Some(j) = dst {
            used[i] = true;
            used[j] = true;
            pairs.push((i, j));
        }
    }
    for (i, u) in used.iter().enumerate() {
        if !u {
            single.push(i);
        }
    }
    (pairs, single)
}

#[test]
fn every_recorded_libvirt_conversation_replays() {
    if !kvm_usable("every_recorded_libvirt_conversation_replays") {
        return;
    }
    let monitors: Vec<Monitor> = CONVERSATIONS
        .lines()
        .map(|l| serde_json::from_str(l).expect("conversations.jsonl line"))
        .collect();
    assert!(monitors.len() >= 40, "{} monitors", monitors.len());
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("dirtier.elf"), ferry_testguest::DIRTIER_ELF).expect("kernel");

    let mut outcomes: BTreeMap<String, Outcome> = BTreeMap::new();
    let (pairs, single) = pairs(&monitors);
    assert!(
        pairs.len() >= 10,
        "{} source/destination pairs",
        pairs.len()
    );
    // FERRY_REPLAY_ONLY=text replays the conversations whose names contain it.
    let only = std::env::var("FERRY_REPLAY_ONLY").unwrap_or_default();
    let chosen = |i: usize| monitors[i].conv.contains(&only);
    let (pairs, single): (Vec<_>, Vec<_>) = (
        pairs
            .into_iter()
            .filter(|(s, t)| chosen(*s) || chosen(*t))
            .collect(),
        single.into_iter().filter(|i| chosen(*i)).collect(),
    );
    for i in single {
        let m = &monitors[i];
        let tag = format!("m{i}");
        let t0 = Instant::now();
        let (_qemu, mut q) = start(d, m, &tag);
        outcomes.insert(m.name(), replay(&mut q, m, None, None));
        eprintln!("{}: {:?}", m.name(), t0.elapsed());
    }
    for (s, t) in pairs {
        let (src, dst) = (&monitors[s], &monitors[t]);
        let (tx, rx) = mpsc::channel();
        let t0 = Instant::now();
        let (so, dout) = std::thread::scope(|scope| {
            let dst_thread = scope.spawn(move || {
                let (qemu, mut q) = start(d, dst, &format!("m{t}"));
                let o = replay(&mut q, dst, Some(tx), None);
                (o, qemu, q)
            });
            let (_sq, mut q) = start(d, src, &format!("m{s}"));
            let so = replay(&mut q, src, None, Some(rx));
            let (dout, _dq, mut dqmp) = dst_thread.join().expect("destination thread");
            // A completed migration: the guest goes on at the destination.
            if src
                .steps
                .iter()
                .any(|s| s.cmd["execute"] == "migrate-continue")
            {
                let st = dqmp.status();
                assert_eq!(st, "running", "{}: destination {st}", dst.name());
            }
            (so, dout)
        });
        eprintln!("{} + {}: {:?}", src.name(), dst.name(), t0.elapsed());
        outcomes.insert(src.name(), so);
        outcomes.insert(dst.name(), dout);
    }

    let (mut steps, mut matched, mut allowed, mut bad) = (0, 0, 0, Vec::new());
    for (name, o) in &outcomes {
        eprintln!(
            "{name}: {} commands, {} as QEMU answered, {} documented divergences",
            o.steps,
            o.matched,
            o.allowed.len()
        );
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for a in &o.allowed {
            *reasons.entry(a.as_str()).or_default() += 1;
        }
        for (why, n) in reasons {
            eprintln!("  {n} x {why}");
        }
        steps += o.steps;
        matched += o.matched;
        allowed += o.allowed.len();
        bad.extend(o.mismatches.iter().cloned());
    }
    eprintln!(
        "replayed {} monitors: {steps} commands, {matched} answered as QEMU did, {allowed} documented divergences",
        outcomes.len()
    );
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
    if only.is_empty() {
        // Every documented divergence still happens: the list does not rot.
        for (cmd, want, got, _) in DIVERGENCES {
            let tag = format!("{cmd}: {want} -> {got}:");
            assert!(
                outcomes
                    .values()
                    .any(|o| o.allowed.iter().any(|a| a.starts_with(&tag))),
                "documented divergence never seen: {tag}"
            );
        }
    }
    if only.is_empty() {
        assert_eq!(outcomes.len(), monitors.len());
    }
}
