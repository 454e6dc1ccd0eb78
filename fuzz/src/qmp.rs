//! The QMP monitor: the byte stream goes through the real framing
//! ([`Splitter`]), parser and dispatcher ([`handle_message`]) with every
//! command handler, over an in-memory backend (no VM, no files written).
//!
//! Mutations work on the JSON when the input parses as JSON lines (command
//! names from the command table, values replaced by extremes, members added,
//! renamed or dropped, deep nesting) and on the raw bytes otherwise.
//!
//! Properties checked: every complete message and every framing problem gets
//! exactly one reply, an object with `return` or `error` (with `class` and
//! `desc` strings), that echoes the request's `id`.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_qemu::backend::{
    Backend, BackendError, MachineConfig, MigrationCapabilities, MigrationInfo,
    MigrationParameters, MigrationStatus, MigrationTarget, RunState,
};
use ferry_qemu::commands::COMMANDS;
use ferry_qemu::qmp::events::EventSink;
use ferry_qemu::qmp::json::{Piece, Splitter};
use ferry_qemu::qmp::server::{framing_error, handle_message, MonitorState, Session, Vm};
use serde_json::{json, Value};

use crate::{class_of, mutate_bytes, Outcome, Rng, Target};

/// A backend that keeps a run state and a migration state in memory and
/// emits the events the real one emits; it never touches files or sockets.
#[derive(Debug)]
pub struct MemoryBackend {
    state: RunState,
    events: EventSink,
    migration: MigrationInfo,
}

impl MemoryBackend {
    pub fn new(events: EventSink) -> Self {
        Self {
            state: RunState::Prelaunch,
            events,
            migration: MigrationInfo::default(),
        }
    }
}

impl Backend for MemoryBackend {
    fn create(&mut self, _: &MachineConfig) -> Result<(), BackendError> {
        self.state = RunState::Prelaunch;
        Ok(())
    }
    fn cont(&mut self) -> Result<(), BackendError> {
        self.state = RunState::Running;
        self.events.emit("RESUME", None);
        Ok(())
    }
    fn stop(&mut self) -> Result<(), BackendError> {
        self.state = RunState::Paused;
        self.events.emit("STOP", None);
        Ok(())
    }
    fn status(&self) -> RunState {
        self.state
    }
    fn quit(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    fn system_reset(&mut self) -> Result<(), BackendError> {
        self.events.emit("RESET", Some(json!({"guest": false})));
        Ok(())
    }
    fn system_powerdown(&mut self) -> Result<(), BackendError> {
        self.events.emit("POWERDOWN", None);
        Ok(())
    }
    fn pmemsave(&mut self, _: u64, _: u64, _: &Path) -> Result<(), BackendError> {
        // Never writes: the fuzzer must not fill the disk.
        Ok(())
    }
    fn migrate(
        &mut self,
        _: MigrationTarget,
        _: &MigrationParameters,
        caps: &MigrationCapabilities,
    ) -> Result<(), BackendError> {
        self.state = RunState::Paused;
        self.migration.status = Some(if caps.pause_before_switchover {
            MigrationStatus::PreSwitchover
        } else {
            MigrationStatus::Completed
        });
        Ok(())
    }
    fn migrate_incoming(
        &mut self,
        _: MigrationTarget,
        _: &MigrationCapabilities,
    ) -> Result<(), BackendError> {
        self.migration.status = Some(MigrationStatus::Setup);
        Ok(())
    }
    fn migrate_cancel(&mut self) -> Result<(), BackendError> {
        self.migration.status = Some(MigrationStatus::Cancelled);
        Ok(())
    }
    fn migrate_continue(&mut self, state: MigrationStatus) -> Result<(), BackendError> {
        if self.migration.status != Some(state) {
            return Err(BackendError::Migration(format!(
                "Migration not in expected state: {}",
                state.as_str()
            )));
        }
        self.migration.status = Some(MigrationStatus::Completed);
        Ok(())
    }
    fn query_migrate(&self) -> MigrationInfo {
        self.migration.clone()
    }
    fn set_migrate_parameters(&mut self, _: &MigrationParameters) -> Result<(), BackendError> {
        Ok(())
    }
    fn save(&mut self, _: MigrationTarget) -> Result<(), BackendError> {
        Ok(())
    }
}

/// A command line libvirt writes (from the reference logs), so the QMP layer
/// sees a realistic machine.
const LIBVIRT_ARGV: &[&str] = &[
    "-name",
    "guest=fuzz,debug-threads=on",
    "-S",
    "-machine",
    "pc-i440fx-7.2,usb=off,dump-guest-core=off",
    "-accel",
    "kvm",
    "-cpu",
    "host",
    "-m",
    "256",
    "-smp",
    "1,sockets=1,cores=1,threads=1",
    "-uuid",
    "11111111-2222-3333-4444-555555555555",
    "-display",
    "none",
    "-no-user-config",
    "-nodefaults",
    "-chardev",
    "socket,id=charmonitor,fd=30,server=on,wait=off",
    "-mon",
    "chardev=charmonitor,id=monitor,mode=control",
    "-no-shutdown",
    "-kernel",
    "/nonexistent/vmlinuz",
    "-append",
    "console=ttyS0",
];

fn check_reply(reply: &Value, id: Option<&Value>) -> Result<(), String> {
    let obj = reply
        .as_object()
        .ok_or_else(|| format!("the reply is not an object: {reply}"))?;
    match (obj.get("return"), obj.get("error")) {
        (Some(_), None) => {}
        (None, Some(e)) => {
            if !e["class"].is_string() || !e["desc"].is_string() {
                return Err(format!("an error without class and desc: {reply}"));
            }
        }
        _ => {
            return Err(format!(
                "the reply has neither or both of return and error: {reply}"
            ))
        }
    }
    if obj.get("id") != id {
        return Err(format!("the reply does not echo the id {id:?}: {reply}"));
    }
    Ok(())
}

/// Runs a monitor byte stream; the outcome class lists the error classes seen.
pub fn exec_qmp(input: &[u8]) -> Outcome {
    let events = EventSink::new();
    let invocation = match ferry_qemu::argv::parse(LIBVIRT_ARGV) {
        Ok(i) => i,
        Err(e) => return Outcome::Violation(format!("the reference command line fails: {e}")),
    };
    let config = invocation.machine_config().ok().flatten();
    let vm = Mutex::new(Vm::new(
        Box::new(MemoryBackend::new(events.clone())),
        invocation,
        config,
        events,
    ));
    let mut monitor = MonitorState::default();
    let mut session = Session::default();
    let mut splitter = Splitter::new();
    let mut classes = Vec::new();
    // Deterministic read sizes, as a socket might deliver them.
    let mut rng = Rng::new(u64::from(crc32fast::hash(input)));
    let mut rest = input;
    while !rest.is_empty() {
        let n = (1 + rng.below(4096)).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        for piece in splitter.push(chunk) {
            if let Some(reply) = framing_error(&piece) {
                if let Err(v) = check_reply(&reply, None) {
                    return Outcome::Violation(v);
                }
                classes.push("framing".to_string());
                continue;
            }
            let Piece::Message(text) = piece else {
                return Outcome::Violation("a framing piece without a reply".into());
            };
            let id = serde_json::from_slice::<Value>(&text)
                .ok()
                .and_then(|v| v.get("id").cloned());
            let mut received = Vec::new();
            let outcome = handle_message(&vm, &mut monitor, &mut session, &text, &mut received);
            let Some(reply) = outcome.reply else {
                return Outcome::Violation("a request without a reply".into());
            };
            if let Err(v) = check_reply(&reply, id.as_ref()) {
                return Outcome::Violation(v);
            }
            match reply.get("error") {
                Some(e) => classes.push(class_of(
                    e["class"].as_str().unwrap_or("?"),
                    e["desc"].as_str().unwrap_or(""),
                    4,
                )),
                None => classes.push("return".into()),
            }
            if outcome.quit {
                return Outcome::Handled(format!("quit after {}", classes.join("|")));
            }
        }
    }
    classes.dedup();
    classes.truncate(6);
    Outcome::Handled(classes.join("|"))
}

fn command_names() -> Vec<&'static str> {
    COMMANDS.iter().map(|c| c.schema.name).collect()
}

fn extreme_value(rng: &mut Rng) -> Value {
    match rng.below(12) {
        0 => Value::Null,
        1 => json!(-1),
        2 => json!(u64::MAX),
        3 => json!(i64::MIN),
        4 => json!(1e308),
        5 => json!(-0.0),
        6 => json!(""),
        7 => json!("x".repeat(1 + rng.below(100_000))),
        8 => json!([]),
        9 => json!({}),
        10 => json!(true),
        _ => json!(rng.interesting_u64()),
    }
}

fn mutate_json(rng: &mut Rng, v: &mut Value, names: &[&'static str], depth: usize) {
    let descend = rng.chance(2, 3) && depth < 16;
    match v {
        Value::Object(m) if descend && !m.is_empty() => {
            let keys: Vec<String> = m.keys().cloned().collect();
            if let Some(k) = rng.pick(&keys) {
                if let Some(child) = m.get_mut(k) {
                    mutate_json(rng, child, names, depth + 1);
                    return;
                }
            }
        }
        Value::Array(a) if descend && !a.is_empty() => {
            let i = rng.below(a.len());
            mutate_json(rng, &mut a[i], names, depth + 1);
            return;
        }
        _ => {}
    }
    match v {
        Value::Object(m) => match rng.below(4) {
            0 => {
                let keys: Vec<String> = m.keys().cloned().collect();
                if let Some(k) = rng.pick(&keys) {
                    m.remove(k);
                }
            }
            1 => {
                m.insert("id".into(), extreme_value(rng));
            }
            2 => {
                let key = *rng
                    .pick(&[
                        "execute",
                        "exec-oob",
                        "arguments",
                        "control",
                        "uri",
                        "val",
                        "size",
                    ])
                    .unwrap_or(&"x");
                m.insert(key.into(), extreme_value(rng));
            }
            _ => {
                let name = *rng.pick(names).unwrap_or(&"quit");
                m.insert("execute".into(), json!(name));
            }
        },
        Value::String(s) => {
            *s = match rng.below(3) {
                0 => rng.pick(names).unwrap_or(&"").to_string(),
                1 => format!("{s}\u{0}\u{202e}"),
                _ => String::new(),
            };
        }
        other => *other = extreme_value(rng),
    }
}

/// Structure-aware when the input is JSON lines, byte-level otherwise.
pub fn mutate_qmp(rng: &mut Rng, base: &[u8], pool: &[Vec<u8>]) -> Vec<u8> {
    let names = command_names();
    let text = String::from_utf8_lossy(base);
    let mut lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if lines.is_empty() || rng.chance(1, 4) {
        let mut bytes = base.to_vec();
        mutate_bytes(rng, &mut bytes, pool);
        if rng.chance(1, 16) {
            // Deep nesting, just under and over the limit.
            let depth = *rng.pick(&[1023usize, 1024, 1025, 5000]).unwrap_or(&1025);
            bytes.extend(std::iter::repeat_n(b'[', depth));
            bytes.extend(std::iter::repeat_n(b']', depth));
        }
        return bytes;
    }
    let rounds = 1 + rng.below(3);
    for _ in 0..rounds {
        match rng.below(6) {
            0 if lines.len() > 1 => {
                let i = rng.below(lines.len());
                lines.remove(i);
            }
            1 => {
                let i = rng.below(lines.len());
                let dup = lines[i].clone();
                lines.insert(rng.below(lines.len() + 1), dup);
            }
            2 => {
                let name = *rng.pick(&names).unwrap_or(&"query-status");
                let mut args = serde_json::Map::new();
                for _ in 0..rng.below(3) {
                    let key = *rng
                        .pick(&[
                            "uri",
                            "val",
                            "size",
                            "filename",
                            "fdname",
                            "fdset-id",
                            "value",
                            "path",
                            "typename",
                            "enable",
                            "capabilities",
                        ])
                        .unwrap_or(&"x");
                    args.insert(key.into(), extreme_value(rng));
                }
                lines.insert(
                    rng.below(lines.len() + 1),
                    json!({"execute": name, "arguments": args, "id": rng.below(1000)}),
                );
            }
            _ => {
                let i = rng.below(lines.len());
                mutate_json(rng, &mut lines[i], &names, 0);
            }
        }
    }
    let mut out = Vec::new();
    for l in &lines {
        out.extend_from_slice(l.to_string().as_bytes());
        out.push(if rng.chance(1, 8) { b' ' } else { b'\n' });
    }
    out
}

pub fn qmp_target() -> Target {
    Target {
        name: "qmp",
        exec: Arc::new(exec_qmp),
        mutate: Box::new(mutate_qmp),
        time_bound: Duration::from_secs(10),
        mem_bound: 256 << 20,
    }
}

/// Seeds from the reference transcripts: one file per libvirt conversation
/// chunk, each a monitor byte stream (JSON lines, `id` added as libvirt does).
pub fn seeds_from_reference(jsonl: &str, chunk: usize) -> Vec<Vec<u8>> {
    let mut requests = Vec::new();
    for (n, line) in jsonl.lines().enumerate() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(cmd) = v.get("execute") else {
            continue;
        };
        let mut req = json!({"execute": cmd, "id": format!("libvirt-{}", n + 1)});
        if let Some(args) = v.get("arguments").filter(|a| !a.is_null()) {
            req["arguments"] = args.clone();
        }
        requests.push(req);
    }
    let mut seeds = Vec::new();
    let mut i = 0;
    while i < requests.len() {
        let mut out = Vec::new();
        // Every monitor session starts with the negotiation.
        if i > 0 {
            out.extend_from_slice(b"{\"execute\":\"qmp_capabilities\",\"id\":\"libvirt-0\"}\n");
        }
        for r in &requests[i..(i + chunk).min(requests.len())] {
            out.extend_from_slice(r.to_string().as_bytes());
            out.push(b'\n');
        }
        seeds.push(out);
        i += chunk;
    }
    seeds
}
