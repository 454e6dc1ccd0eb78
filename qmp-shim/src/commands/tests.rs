use std::collections::HashSet;
use std::io::{BufRead, BufReader, IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::{json, Value};

use super::*;
use crate::argv;
use crate::backend::NoVm;
use crate::qmp::events::EventSink;
use crate::qmp::server::{handle_message, serve_connection, MonitorState, Session};
use crate::testing::FakeBackend;

fn vm(args: &str, fake: bool) -> Mutex<Vm> {
    let inv = argv::parse(&args.split_whitespace().collect::<Vec<_>>()).expect("argv");
    let events = EventSink::new();
    let backend: Box<dyn crate::backend::Backend> = if fake {
        Box::new(FakeBackend::new(events.clone()))
    } else {
        Box::new(NoVm::new(inv.is_probe(), events.clone()))
    };
    Mutex::new(Vm::new(backend, inv, None, events))
}

struct Client {
    vm: Mutex<Vm>,
    mon: MonitorState,
    session: Session,
}

impl Client {
    fn new(args: &str, fake: bool) -> Self {
        Self {
            vm: vm(args, fake),
            mon: MonitorState::default(),
            session: Session::default(),
        }
    }
    fn raw(&mut self, text: &str) -> Value {
        let out = handle_message(
            &self.vm,
            &mut self.mon,
            &mut self.session,
            text.as_bytes(),
            &mut Vec::new(),
        );
        out.reply.expect("reply")
    }
    fn cmd(&mut self, v: Value) -> Value {
        self.raw(&v.to_string())
    }
    fn negotiated(args: &str, fake: bool) -> Self {
        let mut c = Self::new(args, fake);
        assert_eq!(
            c.cmd(json!({"execute": "qmp_capabilities"})),
            json!({"return": {}})
        );
        c
    }
}

const PROBE: &str = "-S -no-user-config -nodefaults -nographic -machine none,accel=kvm:tcg";

#[test]
fn schema_and_dispatch_agree() {
    let schema = qmp_schema();
    let in_schema: HashSet<&str> = schema
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .map(|e| e["name"].as_str().expect("name"))
        .collect();
    let dispatched: HashSet<&str> = COMMANDS.iter().map(|c| c.schema.name).collect();
    assert_eq!(dispatched.len(), COMMANDS.len(), "duplicate command");
    assert_eq!(in_schema, dispatched);
    for name in &dispatched {
        assert!(find(name).is_some());
    }
    // Every type reference resolves.
    let names: HashSet<&str> = schema
        .iter()
        .map(|e| e["name"].as_str().expect("n"))
        .collect();
    for e in &schema {
        for k in ["arg-type", "ret-type", "element-type"] {
            if let Some(t) = e.get(k) {
                assert!(names.contains(t.as_str().expect("s")), "{e}");
            }
        }
    }
    // libvirt reads this path to ask QEMU for migration blockers.
    let qm = schema
        .iter()
        .find(|e| e["name"] == "query-migrate")
        .expect("query-migrate");
    let ret = schema
        .iter()
        .find(|e| e["name"] == qm["ret-type"])
        .expect("ret");
    assert!(ret["members"]
        .as_array()
        .expect("m")
        .iter()
        .any(|m| m["name"] == "blocked-reasons"));
    // libvirt 9.0 segfaults when an advertised query-cpu-definitions fails:
    // it is described as data and answers a list on any host.
    let defs = schema
        .iter()
        .find(|e| e["name"] == "query-cpu-definitions")
        .expect("query-cpu-definitions");
    let ret = schema
        .iter()
        .find(|e| e["name"] == defs["ret-type"])
        .expect("ret");
    assert_eq!(ret["meta-type"], "array", "{ret}");
    let mut c = Client::new(PROBE, false);
    c.cmd(json!({"execute": "qmp_capabilities"}));
    let r = c.cmd(json!({"execute": "query-cpu-definitions"}));
    let names: Vec<&str> = r["return"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(names, ["max", "host", "qemu64", "kvm64"]);
}

#[test]
fn negotiation_state_machine() {
    let mut c = Client::new(PROBE, false);
    assert_eq!(
        c.cmd(json!({"execute": "query-version", "id": "libvirt-1"})),
        json!({"error": {"class": "CommandNotFound",
                         "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
               "id": "libvirt-1"})
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities", "id": 7})),
        json!({"return": {}, "id": 7})
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities"}))["error"]["desc"],
        "Capabilities negotiation is already complete, command ignored"
    );
    let v = c.cmd(json!({"execute": "query-version", "id": {"any": ["json"]}}));
    assert_eq!(v["id"], json!({"any": ["json"]}));
    assert_eq!(
        v["return"]["qemu"],
        json!({"major": 7, "minor": 2, "micro": 0})
    );
    assert_eq!(v["return"]["package"], "ferry 0.1.0");
}

#[test]
fn hostile_input_gets_qemu_errors() {
    let mut c = Client::negotiated(PROBE, false);
    let desc = |v: Value| v["error"]["desc"].as_str().expect("desc").to_string();
    let class = |v: &Value| v["error"]["class"].as_str().expect("class").to_string();
    let r = c.raw("{\"execute\": ");
    assert_eq!(class(&r), "GenericError");
    assert!(desc(r).starts_with("JSON parse error"));
    assert_eq!(desc(c.raw("[1,2]")), "QMP input must be a JSON object");
    assert_eq!(desc(c.raw("42")), "QMP input must be a JSON object");
    assert_eq!(
        desc(c.cmd(json!({"id": 1}))),
        "QMP input lacks member 'execute'"
    );
    assert_eq!(
        desc(c.cmd(json!({"execute": 5}))),
        "QMP input member 'execute' must be a string"
    );
    assert_eq!(
        desc(c.cmd(json!({"execute": "query-kvm", "arguments": []}))),
        "QMP input member 'arguments' must be an object"
    );
    assert_eq!(
        desc(c.cmd(json!({"execute": "query-kvm", "x": 1}))),
        "QMP input member 'x' is unexpected"
    );
    let r = c.cmd(json!({"execute": "no-such-thing"}));
    assert_eq!(class(&r), "CommandNotFound");
    assert_eq!(desc(r), "The command no-such-thing has not been found");
    assert_eq!(
        desc(c.cmd(json!({"execute": "device-list-properties", "arguments": {"typename": 3}}))),
        "Invalid parameter type for 'typename', expected: string"
    );
    assert_eq!(
        desc(c.cmd(json!({"execute": "device-list-properties"}))),
        "Parameter 'typename' is missing"
    );
    assert_eq!(
        desc(c.cmd(json!({"execute": "migrate-continue", "arguments": {"state": "bogus"}}))),
        "Parameter 'state' does not accept value 'bogus'"
    );
    // Still serving.
    assert_eq!(
        c.cmd(json!({"execute": "query-target"}))["return"]["arch"],
        "x86_64"
    );
}

#[test]
fn probe_answers() {
    let mut c = Client::negotiated(PROBE, false);
    let machines = c.cmd(json!({"execute": "query-machines"}))["return"].clone();
    let default: Vec<&Value> = machines
        .as_array()
        .expect("list")
        .iter()
        .filter(|m| m["is-default"] == true)
        .collect();
    assert_eq!(default.len(), 1);
    assert_eq!(default[0]["alias"], "pc");
    // The classes libvirt 9.0 asks about must yield lists, never DeviceNotFound.
    for t in [
        "memory-backend-file",
        "memory-backend-memfd",
        "max-x86_64-cpu",
        "none-machine",
        "nonexistent",
    ] {
        let r = c.cmd(json!({"execute": "qom-list-properties", "arguments": {"typename": t}}));
        assert!(r["return"].is_array(), "{t}: {r}");
    }
    let r =
        c.cmd(json!({"execute": "device-list-properties", "arguments": {"typename": "vfio-pci"}}));
    assert_eq!(r["error"]["class"], "DeviceNotFound");
    let r = c
        .cmd(json!({"execute": "device-list-properties", "arguments": {"typename": "isa-serial"}}));
    assert!(r["return"]
        .as_array()
        .expect("l")
        .iter()
        .any(|p| p["name"] == "chardev"));
    let types = c.cmd(json!({"execute": "qom-list-types"}))["return"].clone();
    let names: Vec<&str> = types
        .as_array()
        .expect("l")
        .iter()
        .map(|t| t["name"].as_str().expect("n"))
        .collect();
    assert!(
        names.contains(&"isa-serial")
            && !names.contains(&"sev-guest")
            && !names.contains(&"vfio-pci")
    );
    // What libvirt checks for <rng model='virtio'> with a random or builtin
    // backend (QEMU_CAPS_DEVICE_VIRTIO_RNG, _OBJECT_RNG_RANDOM, _RNG_BUILTIN);
    // without rng-egd, libvirt itself refuses <backend model='egd'>.
    for t in ["virtio-rng-pci", "rng-random", "rng-builtin"] {
        assert!(names.contains(&t), "{t} missing from {names:?}");
    }
    assert!(!names.contains(&"rng-egd"));
    let backends = c.cmd(json!({"execute": "qom-list-types",
        "arguments": {"implements": "rng-backend"}}))["return"]
        .clone();
    assert_eq!(
        backends,
        json!([{"name": "rng-random", "parent": "rng-backend"},
               {"name": "rng-builtin", "parent": "rng-backend"}])
    );
    let r = c.cmd(
        json!({"execute": "device-list-properties", "arguments": {"typename": "virtio-rng-pci"}}),
    );
    let props: Vec<&str> = r["return"]
        .as_array()
        .expect("l")
        .iter()
        .map(|p| p["name"].as_str().expect("n"))
        .collect();
    for p in ["rng", "max-bytes", "period"] {
        assert!(props.contains(&p), "{p}: {props:?}");
    }
    let caps = c.cmd(json!({"execute": "query-migrate-capabilities"}))["return"].clone();
    assert!(caps
        .as_array()
        .expect("l")
        .iter()
        .any(|c| c["capability"] == "pause-before-switchover"));
    assert!(c.cmd(json!({"execute": "query-command-line-options"}))["return"].is_array());
    let stop = c.cmd(json!({"execute": "stop"}));
    assert_eq!(stop["error"]["class"], "GenericError");
    assert_eq!(
        c.cmd(json!({"execute": "query-migrate"})),
        json!({"return": {}})
    );
}

#[test]
fn rtc_reset_reinjection_answers_as_without_slew() {
    let mut c = Client::negotiated(
        "-machine pc -accel kvm -m 128 -rtc base=utc,driftfix=slew",
        true,
    );
    assert_eq!(
        c.cmd(json!({"execute": "rtc-reset-reinjection"})),
        json!({"return": {}})
    );
}

#[test]
fn no_vm_says_not_yet_supported() {
    let mut c = Client::negotiated("-machine pc -accel kvm -m 128", false);
    assert_eq!(
        c.cmd(json!({"execute": "cont"}))["error"],
        json!({"class": "GenericError", "desc": "cont is not yet supported by ferry-qemu"})
    );
}

#[test]
fn migration_flow_on_fake_backend() {
    let mut c = Client::negotiated("-machine pc -accel kvm -m 128 -incoming defer", true);
    let caps = json!({"capabilities": [
        {"capability": "events", "state": true},
        {"capability": "pause-before-switchover", "state": true},
        {"capability": "return-path", "state": true}]});
    assert_eq!(
        c.cmd(json!({"execute": "migrate-set-capabilities", "arguments": caps})),
        json!({"return": {}})
    );
    let bad = json!({"capabilities": [{"capability": "xbzrle", "state": true}]});
    assert_eq!(
        c.cmd(json!({"execute": "migrate-set-capabilities", "arguments": bad}))["error"]["desc"],
        "Parameter 'capabilities[0].capability' does not accept value 'xbzrle'"
    );
    let p = json!({"tls-creds": "", "tls-hostname": "", "max-bandwidth": 10485760});
    assert_eq!(
        c.cmd(json!({"execute": "migrate-set-parameters", "arguments": p})),
        json!({"return": {}})
    );
    assert_eq!(
        c.cmd(json!({"execute": "query-migrate-parameters"}))["return"]["max-bandwidth"],
        10485760
    );
    // Credentials are looked up when a migration starts, as in QEMU.
    let tls = json!({"tls-creds": "tls0"});
    assert_eq!(
        c.cmd(json!({"execute": "migrate-set-parameters", "arguments": tls})),
        json!({"return": {}})
    );
    let r = c.cmd(json!({"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4444"}}));
    assert_eq!(r["error"]["desc"], "No TLS credentials with id 'tls0'");
    let authz = json!({"tls-authz": "authz0"});
    let r = c.cmd(json!({"execute": "migrate-set-parameters", "arguments": authz}));
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap_or_default()
            .contains("tls-authz"),
        "{r}"
    );
    // What newer libvirt and `virsh migrate --postcopy-bandwidth` set: kept and
    // reported as QEMU does; compression is refused with the reason.
    let more = json!({"multifd-compression": "none", "multifd-zlib-level": 9,
                      "multifd-zstd-level": 20, "max-postcopy-bandwidth": 104857600});
    assert_eq!(
        c.cmd(json!({"execute": "migrate-set-parameters", "arguments": more})),
        json!({"return": {}})
    );
    let q = c.cmd(json!({"execute": "query-migrate-parameters"}))["return"].clone();
    assert_eq!(
        (
            &q["multifd-compression"],
            &q["multifd-zlib-level"],
            &q["multifd-zstd-level"],
            &q["max-postcopy-bandwidth"]
        ),
        (&json!("none"), &json!(9), &json!(20), &json!(104857600)),
        "{q}"
    );
    let zlib = json!({"multifd-compression": "zlib"});
    let r = c.cmd(json!({"execute": "migrate-set-parameters", "arguments": zlib}));
    assert!(
        r["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("does not compress page streams")),
        "{r}"
    );
    let r = c.cmd(json!({"execute": "migrate-set-parameters",
                         "arguments": {"multifd-zstd-level": 21}}));
    assert_eq!(
        r["error"]["desc"],
        "Parameter 'multifd_zstd_level' expects a value between 0 and 20"
    );
    let r = c.cmd(json!({"execute": "migrate-set-parameters",
                         "arguments": {"multifd-compression": "lz4"}}));
    assert!(
        r["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("lz4")),
        "{r}"
    );
    let off = json!({"tls-creds": ""});
    assert_eq!(
        c.cmd(json!({"execute": "migrate-set-parameters", "arguments": off})),
        json!({"return": {}})
    );
    let r =
        c.cmd(json!({"execute": "migrate", "arguments": {"uri": "fd:migrate", "detach": true}}));
    assert_eq!(
        r["error"]["desc"],
        "File descriptor named 'migrate' has not been found"
    );
    let r = c.cmd(
        json!({"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4444", "detach": true}}),
    );
    assert_eq!(r, json!({"return": {}}));
    assert_eq!(
        c.cmd(json!({"execute": "query-migrate"}))["return"]["status"],
        "pre-switchover"
    );
    let r = c.cmd(json!({"execute": "migrate-continue", "arguments": {"state": "pre-switchover"}}));
    assert_eq!(r, json!({"return": {}}));
    assert_eq!(
        c.cmd(json!({"execute": "query-migrate"}))["return"]["status"],
        "completed"
    );
    let r = c.cmd(json!({"execute": "migrate-incoming", "arguments": {"uri": "tcp:[::]:49152"}}));
    assert_eq!(r, json!({"return": {}}));
    assert_eq!(
        c.cmd(json!({"execute": "query-status"}))["return"]["status"],
        "paused"
    );
}

fn read_json(r: &mut impl BufRead) -> Value {
    let mut line = String::new();
    r.read_line(&mut line).expect("read");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// A client on one end of a socket pair, the server's connection on the
/// other (in a thread that returns the monitor state); greeting read.
fn connect_pair(
    vm: &Arc<Mutex<Vm>>,
) -> (
    BufReader<UnixStream>,
    UnixStream,
    std::thread::JoinHandle<MonitorState>,
) {
    let (server, client) = UnixStream::pair().expect("pair");
    let vm2 = Arc::clone(vm);
    let t = std::thread::spawn(move || {
        let mut st = MonitorState::default();
        let _ = serve_connection(server, &vm2, &mut st);
        st
    });
    client
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("timeout");
    let mut r = BufReader::new(client.try_clone().expect("clone"));
    assert_eq!(read_json(&mut r)["QMP"]["capabilities"], json!(["oob"]));
    (r, client, t)
}

#[test]
fn socket_session_events_getfd_and_reconnect() {
    let vm = Arc::new(vm("-machine pc -accel kvm -m 128", true));
    let (mut r, mut w, t) = connect_pair(&vm);
    w.write_all(b"{\"execute\":\"qmp_capabilities\",\"id\":1}{\"execute\":\"stop\",\"id\":2}\r\n")
        .expect("w");
    let mut got = [read_json(&mut r), read_json(&mut r), read_json(&mut r)];
    got.sort_by_key(|v| v.to_string());
    assert_eq!(got[0]["event"], "STOP");
    assert!(got[0]["timestamp"]["seconds"].is_u64());
    assert_eq!(got[1], json!({"id": 1, "return": {}}));
    assert_eq!(got[2], json!({"id": 2, "return": {}}));
    // getfd: pass a pipe end with SCM_RIGHTS alongside the request.
    let (rd, _wr) = nix::unistd::pipe().expect("pipe");
    let msg = b"{\"execute\":\"getfd\",\"arguments\":{\"fdname\":\"migrate\"},\"id\":3}";
    let fds = [rd.as_fd().as_raw_fd()];
    sendmsg::<()>(
        w.as_raw_fd(),
        &[IoSlice::new(msg)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg");
    assert_eq!(read_json(&mut r), json!({"id": 3, "return": {}}));
    w.write_all(b"{\"execute\":\"getfd\",\"arguments\":{\"fdname\":\"x\"},\"id\":4}")
        .expect("w");
    assert_eq!(read_json(&mut r)["error"]["class"], "GenericError");
    // A message over the limit is refused and the session goes on.
    let mut big = b"{\"execute\":\"".to_vec();
    big.extend(std::iter::repeat_n(b'a', crate::qmp::json::MAX_MESSAGE + 1));
    big.extend_from_slice(b"\"}\n{\"execute\":\"query-status\",\"id\":5}");
    w.write_all(&big).expect("w");
    assert!(read_json(&mut r)["error"]["desc"]
        .as_str()
        .expect("d")
        .contains("exceeds"));
    assert_eq!(read_json(&mut r)["id"], 5);
    drop(w);
    drop(r);
    let st = t.join().expect("server thread");
    assert!(
        st.named_fds.contains_key("migrate"),
        "getfd fd kept on the monitor"
    );
}

/// The multifd capability and `multifd-channels`, as QEMU 7.2 takes them:
/// listed, set on both sides, QEMU's range errors (and ferry's limit of 16),
/// and refused with URIs that carry one stream.
#[test]
fn multifd_capability_and_channels() {
    let mut c = Client::negotiated("-machine pc -accel kvm -m 128 -incoming defer", true);
    let caps = c.cmd(json!({"execute": "query-migrate-capabilities"}))["return"].clone();
    assert!(
        caps.as_array()
            .expect("list")
            .contains(&json!({"capability": "multifd", "state": false})),
        "{caps}"
    );
    let params =
        |c: &mut Client| c.cmd(json!({"execute": "query-migrate-parameters"}))["return"].clone();
    // QEMU's default, which libvirt reads and restores.
    assert_eq!(params(&mut c)["multifd-channels"], 2);
    let set = |c: &mut Client, v: Value| {
        c.cmd(json!({"execute": "migrate-set-parameters", "arguments": {"multifd-channels": v}}))
    };
    for (v, want) in [
        (
            json!(0),
            "Parameter 'multifd_channels' expects a value between 1 and 255",
        ),
        (json!(256), "Parameter 'multifd-channels' expects uint8_t"),
        (json!(-1), "Parameter 'multifd-channels' expects uint8_t"),
        (
            json!("4"),
            "Invalid parameter type for 'multifd-channels', expected: integer",
        ),
    ] {
        let r = set(&mut c, v.clone());
        assert_eq!(
            r["error"],
            json!({"class": "GenericError", "desc": want}),
            "multifd-channels {v}"
        );
    }
    let r = set(&mut c, json!(17));
    let e = r["error"]["desc"].as_str().expect("refused");
    assert!(e.contains("at most 16 page streams, not 17"), "{e}");
    assert_eq!(
        params(&mut c)["multifd-channels"],
        2,
        "a refused value is not kept"
    );
    assert_eq!(set(&mut c, json!(4)), json!({"return": {}}));
    assert_eq!(params(&mut c)["multifd-channels"], 4);

    let on = json!({"capabilities": [{"capability": "multifd", "state": true}]});
    assert_eq!(
        c.cmd(json!({"execute": "migrate-set-capabilities", "arguments": on})),
        json!({"return": {}})
    );
    let caps = c.cmd(json!({"execute": "query-migrate-capabilities"}))["return"].clone();
    assert!(caps
        .as_array()
        .expect("list")
        .contains(&json!({"capability": "multifd", "state": true})));

    // One-stream URIs are refused on both sides, before anything starts.
    for uri in ["exec:cat >/dev/null", "file:/nonexistent/x"] {
        for cmd in ["migrate", "migrate-incoming"] {
            let r = c.cmd(json!({"execute": cmd, "arguments": {"uri": uri}}));
            let e = r["error"]["desc"].as_str().unwrap_or_default();
            assert!(
                e.starts_with("multifd is not supported by current protocol")
                    && e.contains("tcp: or unix:"),
                "{cmd} {uri}: {r}"
            );
        }
    }
    let r = c.cmd(json!({"execute": "migrate-incoming", "arguments": {"uri": "unix:/tmp/m.sock"}}));
    assert_eq!(r, json!({"return": {}}));
}

/// QEMU 7.2 refuses the multifd capability on a destination already reading
/// a one-stream URI (`-incoming fd:`), and takes it for `-incoming tcp:`.
#[test]
fn multifd_refused_while_reading_an_fd() {
    let inmigrate = |args: &str| {
        let inv = argv::parse(&args.split_whitespace().collect::<Vec<_>>()).expect("argv");
        let events = EventSink::new();
        let mut fake = FakeBackend::new(events.clone());
        fake.state = crate::backend::RunState::InMigrate;
        let mut c = Client::new(args, true);
        c.vm = Mutex::new(Vm::new(Box::new(fake), inv, None, events));
        assert_eq!(
            c.cmd(json!({"execute": "qmp_capabilities"})),
            json!({"return": {}})
        );
        c
    };
    let on = json!({"capabilities": [{"capability": "multifd", "state": true}]});
    let mut c = inmigrate("-machine pc -accel kvm -m 128 -incoming fd:3");
    let r = c.cmd(json!({"execute": "migrate-set-capabilities", "arguments": on.clone()}));
    let e = r["error"]["desc"].as_str().unwrap_or_default();
    assert!(
        e.starts_with("multifd is not supported by current protocol"),
        "{r}"
    );
    let mut c = inmigrate("-machine pc -accel kvm -m 128 -incoming tcp:127.0.0.1:4444");
    let r = c.cmd(json!({"execute": "migrate-set-capabilities", "arguments": on}));
    assert_eq!(r, json!({"return": {}}));
}

/// Issue 15: `migrate fd:N` with a number ferry-qemu was never given (here
/// a file it opened itself, as it opens a guest's disk image) is refused,
/// not written into and then closed under its owner.
#[test]
fn migrate_fd_takes_only_descriptors_passed_to_ferry_qemu() {
    use nix::fcntl::{fcntl, FcntlArg};
    let mut disk = tempfile::tempfile().expect("disk image");
    disk.write_all(b"guest disk").expect("write");
    let n = disk.as_raw_fd();
    let want = format!("fd {n} was not passed to ferry-qemu: pass it with getfd or add-fd");
    let mut c = Client::negotiated("-machine pc -accel kvm -m 128", true);
    let r = c.cmd(json!({"execute": "migrate", "arguments": {"uri": format!("fd:{n}")}}));
    assert_eq!(r["error"], json!({"class": "GenericError", "desc": want}));
    let mut c = Client::negotiated("-machine pc -accel kvm -m 128 -incoming defer", true);
    let r = c.cmd(json!({"execute": "migrate-incoming", "arguments": {"uri": format!("fd:{n}")}}));
    assert_eq!(r["error"], json!({"class": "GenericError", "desc": want}));
    assert!(
        fcntl(disk.as_fd(), FcntlArg::F_GETFD).is_ok(),
        "the disk's fd is still open"
    );
}

/// Issue 15: 64 KiB of random bytes (a stray `"` among them) used to wedge
/// the monitor until 1 MiB had passed. Like QEMU's JSON streamer, the
/// framing now recovers: one error for the garbage, and the command on the
/// next line is served.
#[test]
fn garbage_gets_one_error_and_the_next_line_is_served() {
    let vm = Arc::new(vm("-machine pc -accel kvm -m 128", true));
    let (mut r, mut w, _t) = connect_pair(&vm);
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .expect("w");
    assert_eq!(read_json(&mut r), json!({"return": {}}));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut garbage: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .map(|b| if b == b'\n' { b'"' } else { b })
        .collect();
    garbage.extend_from_slice(b"\n{\"execute\":\"query-status\",\"id\":\"after\"}\n");
    // Written from a thread: the server answers while it reads.
    let writer = std::thread::spawn(move || w.write_all(&garbage).map(|()| w));
    let first = read_json(&mut r);
    assert_eq!(first["error"]["class"], "GenericError", "{first}");
    let second = read_json(&mut r);
    assert_eq!(
        second["id"], "after",
        "one error, then the command: {second}"
    );
    assert_eq!(second["return"]["status"], "prelaunch");
    writer.join().expect("writer").expect("written");
}

/// Issue 15: a client that connects and never negotiates is dropped after
/// the negotiation timeout, so the next client is served (one at a time,
/// as in QEMU). A negotiated client may stay idle.
#[test]
fn a_client_that_never_negotiates_does_not_block_the_next() {
    use crate::qmp::server::{serve_monitor_with, ConnectionLimits};
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("qmp.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let vm = Arc::new(vm("-machine pc -accel kvm -m 128", true));
    let limits = ConnectionLimits {
        negotiation_timeout: Duration::from_millis(300),
        ..ConnectionLimits::default()
    };
    std::thread::spawn(move || serve_monitor_with(listener, vm, limits));
    let connect = || {
        let s = UnixStream::connect(&path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        (BufReader::new(s.try_clone().expect("clone")), s)
    };
    let (mut idle_r, _idle_w) = connect();
    assert!(read_json(&mut idle_r).get("QMP").is_some());
    let (mut r, mut w) = connect();
    assert!(
        read_json(&mut r).get("QMP").is_some(),
        "the second client is greeted once the idle one is dropped"
    );
    let mut rest = String::new();
    assert_eq!(idle_r.read_line(&mut rest).expect("EOF"), 0, "{rest}");
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .expect("w");
    assert_eq!(read_json(&mut r), json!({"return": {}}));
    std::thread::sleep(Duration::from_millis(600));
    w.write_all(b"{\"execute\":\"query-status\",\"id\":1}\n")
        .expect("w");
    assert_eq!(read_json(&mut r)["id"], 1, "negotiated: never timed out");
}

/// Issue 15: events used to be written by the thread that emits them, with
/// a 10 s timeout: a client that does not read stalled the emitter (a
/// migration's switch-over) for 10 s. Now `emit` only queues; the
/// connection's own thread writes, and a client whose queue overflows is
/// disconnected.
#[test]
fn events_never_wait_for_a_client_that_does_not_read() {
    let vm = Arc::new(vm("-machine pc -accel kvm -m 128", true));
    let (mut r, mut w, t) = connect_pair(&vm);
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .expect("w");
    assert_eq!(read_json(&mut r), json!({"return": {}}));
    let events = vm.lock().expect("vm").events.clone();
    let pad = "x".repeat(200);
    let start = std::time::Instant::now();
    for n in 0..20_000 {
        events.emit("MIGRATION_PASS", Some(json!({"pass": n, "pad": pad})));
    }
    let took = start.elapsed();
    assert!(
        took < std::time::Duration::from_secs(3),
        "emit blocked {took:?}"
    );
    // The client is disconnected: what it reads now ends.
    let mut line = String::new();
    while r.read_line(&mut line).expect("read until EOF") > 0 {
        line.clear();
    }
    drop(w);
    t.join().expect("connection ended");
}

/// `qemu-system-x86_64 -M help` of QEMU 7.2 (Debian 12), its i440FX lines
/// in its order: 7.2 (alias `pc`, the default) down to 2.0, then 1.7 to 1.4
/// marked deprecated.
const QEMU_7_2_I440FX: &[&str] = &[
    "pc-i440fx-7.2",
    "pc-i440fx-7.1",
    "pc-i440fx-7.0",
    "pc-i440fx-6.2",
    "pc-i440fx-6.1",
    "pc-i440fx-6.0",
    "pc-i440fx-5.2",
    "pc-i440fx-5.1",
    "pc-i440fx-5.0",
    "pc-i440fx-4.2",
    "pc-i440fx-4.1",
    "pc-i440fx-4.0",
    "pc-i440fx-3.1",
    "pc-i440fx-3.0",
    "pc-i440fx-2.9",
    "pc-i440fx-2.8",
    "pc-i440fx-2.7",
    "pc-i440fx-2.6",
    "pc-i440fx-2.5",
    "pc-i440fx-2.4",
    "pc-i440fx-2.3",
    "pc-i440fx-2.2",
    "pc-i440fx-2.12",
    "pc-i440fx-2.11",
    "pc-i440fx-2.10",
    "pc-i440fx-2.1",
    "pc-i440fx-2.0",
    "pc-i440fx-1.7",
    "pc-i440fx-1.6",
    "pc-i440fx-1.5",
    "pc-i440fx-1.4",
];

/// Issue 17: query-machines lists exactly QEMU 7.2's pc-i440fx types (so
/// libvirt accepts a domain pinned to any of them), marks what QEMU marks,
/// and lists no Q35 (libvirt would offer it); qom-list-types has their QOM
/// types and `/machine` is the one the guest was started with.
#[test]
fn query_machines_lists_qemu_7_2_i440fx_types_and_no_q35() {
    let mut c = Client::negotiated(PROBE, false);
    let machines = c.cmd(json!({"execute": "query-machines"}))["return"].clone();
    let machines = machines.as_array().expect("list");
    let mut i440fx: Vec<&str> = machines
        .iter()
        .filter_map(|m| m["name"].as_str())
        .filter(|n| n.starts_with("pc-i440fx-"))
        .collect();
    let mut want = QEMU_7_2_I440FX.to_vec();
    i440fx.sort_unstable();
    want.sort_unstable();
    assert_eq!(i440fx, want);
    let names: Vec<&str> = machines.iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(names.len(), QEMU_7_2_I440FX.len() + 2, "{names:?}");
    assert!(names.contains(&"microvm") && names.contains(&"none"));
    for m in machines {
        let name = m["name"].as_str().expect("name");
        let (alias, default) = if name == "pc-i440fx-7.2" {
            (json!("pc"), json!(true))
        } else {
            (Value::Null, Value::Null)
        };
        assert_eq!((&m["alias"], &m["is-default"]), (&alias, &default), "{m}");
        let deprecated = ["1.4", "1.5", "1.6", "1.7"]
            .iter()
            .any(|v| name == format!("pc-i440fx-{v}"));
        assert_eq!(m["deprecated"], deprecated, "{m}");
        if name.starts_with("pc-i440fx-") {
            assert_eq!(
                (&m["cpu-max"], &m["default-ram-id"], &m["default-cpu-type"]),
                (&json!(255), &json!("pc.ram"), &json!("qemu64-x86_64-cpu")),
                "{m}"
            );
        }
    }
    let r = c.cmd(json!({"execute": "qom-list-types",
        "arguments": {"implements": "generic-pc-machine"}}));
    let mut qom: Vec<String> = r["return"]
        .as_array()
        .expect("l")
        .iter()
        .map(|t| t["name"].as_str().expect("n").to_string())
        .collect();
    let mut want: Vec<String> = QEMU_7_2_I440FX
        .iter()
        .map(|n| format!("{n}-machine"))
        .collect();
    qom.sort_unstable();
    want.sort_unstable();
    assert_eq!(qom, want);
    let r = c.cmd(json!({"execute": "qom-list-types", "arguments": {"implements": "machine"}}));
    let all = r.to_string();
    assert!(!all.contains("q35") && !all.contains("isapc"), "{all}");

    for (machine, qom_type) in [
        ("pc-i440fx-4.2", "pc-i440fx-4.2-machine"),
        ("pc", "pc-i440fx-7.2-machine"),
        ("microvm", "microvm-machine"),
    ] {
        let mut c = Client::negotiated(&format!("-machine {machine} -accel kvm -m 128"), true);
        let r = c.cmd(json!({"execute": "qom-get",
            "arguments": {"path": "/machine", "property": "type"}}));
        assert_eq!(r["return"], qom_type, "{machine}: {r}");
    }
    let r = c.cmd(json!({"execute": "qom-get",
        "arguments": {"path": "/machine", "property": "type"}}));
    assert_eq!(r["return"], "none-machine", "the probe: {r}");
}

/// A client of a guest with `args`' devices on the fake backend, whose
/// balloon is `balloon`.
fn guest_client(args: &str, balloon: ferry_vmm::devices::virtio::balloon::BalloonInfo) -> Client {
    let inv = argv::parse(&args.split_whitespace().collect::<Vec<_>>()).expect("argv");
    let config = inv.machine_config().expect("config");
    let events = EventSink::new();
    let mut fake = FakeBackend::new(events.clone());
    fake.balloon = balloon;
    let mut c = Client {
        vm: Mutex::new(Vm::new(Box::new(fake), inv, config, events)),
        mon: MonitorState::default(),
        session: Session::default(),
    };
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities"})),
        json!({"return": {}})
    );
    c
}

const BALLOON_GUEST: &str = "-machine pc -m 256 -kernel /k \
                             -device virtio-balloon-pci,id=balloon0,bus=pci.0,addr=0x5";

/// query-balloon, balloon, and the balloon's QOM properties libvirt reads
/// and sets, with QEMU's answers and error texts.
#[test]
fn balloon_commands_answer_as_qemu_does() {
    use ferry_vmm::devices::virtio::balloon::BalloonInfo;
    let err = |class: &str, desc: &str| json!({"error": {"class": class, "desc": desc}});
    let mut c = guest_client(BALLOON_GUEST, BalloonInfo::default());
    let exec =
        |c: &mut Client, cmd: &str, args: Value| c.cmd(json!({"execute": cmd, "arguments": args}));
    assert_eq!(
        exec(&mut c, "query-balloon", json!({})),
        json!({"return": {"actual": 256u64 << 20}})
    );
    for bad in [0, -5] {
        assert_eq!(
            exec(&mut c, "balloon", json!({"value": bad})),
            err("GenericError", "Parameter 'target' expects a size")
        );
    }
    assert_eq!(
        exec(&mut c, "balloon", json!({"value": 192u64 << 20})),
        json!({"return": {}})
    );
    let pages = |c: &mut Client| {
        let vm = c.vm.lock().unwrap();
        let info = vm.backend.balloon_info().unwrap();
        info.num_pages
    };
    assert_eq!(pages(&mut c), (64 << 20) / 4096);
    // Above RAM: QEMU takes RAM, an empty balloon.
    exec(&mut c, "balloon", json!({"value": 1u64 << 40}));
    assert_eq!(pages(&mut c), 0);

    let path = "/machine/peripheral/balloon0";
    let listed = exec(&mut c, "qom-list", json!({"path": "/machine/peripheral"}));
    assert!(
        listed["return"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "balloon0" && p["type"] == "child<virtio-balloon-pci>"),
        "{listed}"
    );
    let get = |c: &mut Client, prop: &str| {
        c.cmd(json!({"execute": "qom-get", "arguments": {"path": path, "property": prop}}))
    };
    assert_eq!(
        get(&mut c, "guest-stats"),
        err("GenericError", "guest hasn't updated any stats yet")
    );
    let set = |c: &mut Client, prop: &str, value: Value| {
        c.cmd(json!({"execute": "qom-set",
                     "arguments": {"path": path, "property": prop, "value": value}}))
    };
    for (value, want) in [
        (json!(-1), "timer value must be greater than zero"),
        (json!(1u64 << 32), "timer value is too big"),
        (
            json!("ten"),
            "Invalid parameter type for 'guest-stats-polling-interval', expected: integer",
        ),
    ] {
        assert_eq!(
            set(&mut c, "guest-stats-polling-interval", value),
            err("GenericError", want)
        );
    }
    assert_eq!(
        set(&mut c, "guest-stats-polling-interval", json!(10)),
        json!({"return": {}})
    );
    assert_eq!(
        get(&mut c, "guest-stats-polling-interval"),
        json!({"return": 10})
    );
    assert_eq!(
        set(&mut c, "realized", json!(false)),
        err(
            "GenericError",
            "Insufficient permission to perform this operation"
        )
    );
    assert_eq!(
        set(&mut c, "colour", json!(1)),
        err(
            "GenericError",
            "Property 'virtio-balloon-pci.colour' not found"
        )
    );

    // A guest that sent stats (free and total only) and inflated 1000 pages.
    let mut stats = [None; 10];
    stats[4] = Some(100 << 20);
    stats[5] = Some(250 << 20);
    let mut c = guest_client(
        BALLOON_GUEST,
        BalloonInfo {
            actual: 1000,
            stats,
            stats_last_update: 1_700_000_000,
            ..BalloonInfo::default()
        },
    );
    assert_eq!(
        exec(&mut c, "query-balloon", json!({})),
        json!({"return": {"actual": (256u64 << 20) - 1000 * 4096}})
    );
    let none = u64::MAX;
    assert_eq!(
        get(&mut c, "guest-stats"),
        json!({"return": {"stats": {
            "stat-swap-in": none, "stat-swap-out": none, "stat-major-faults": none,
            "stat-minor-faults": none, "stat-free-memory": 100u64 << 20,
            "stat-total-memory": 250u64 << 20, "stat-available-memory": none,
            "stat-disk-caches": none, "stat-htlb-pgalloc": none, "stat-htlb-pgfail": none,
        }, "last-update": 1_700_000_000}})
    );

    // Without a balloon: QEMU's DeviceNotActive, and no such property.
    let mut c = guest_client("-machine pc -m 256 -kernel /k", BalloonInfo::default());
    let none = err("DeviceNotActive", "No balloon device has been activated");
    assert_eq!(exec(&mut c, "query-balloon", json!({})), none);
    assert_eq!(exec(&mut c, "balloon", json!({"value": 1})), none);
}

/// `v` with what depends on the host's file system left out: `actual-size`
/// (allocated bytes) and a protocol node's `virtual-size` (the file's
/// length, which qemu-img's layout decides); node names QEMU makes up
/// (`#block147`) are `#block`.
fn host_independent(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let file = m.get("format").is_some_and(|f| f == "file");
            Value::Object(
                m.iter()
                    .filter(|(k, _)| *k != "actual-size" && !(file && *k == "virtual-size"))
                    .map(|(k, x)| (k.clone(), host_independent(x)))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(host_independent).collect()),
        Value::String(s) if s.starts_with("#block") => json!("#block"),
        other => other.clone(),
    }
}

/// `v` with every `stats` left out (the fixture keeps only the nodes).
fn without_stats(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| *k != "stats")
                .map(|(k, x)| (k.clone(), without_stats(x)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_stats).collect()),
        other => other.clone(),
    }
}

/// An array's elements in a fixed order (QEMU lists nodes in the order it
/// made them, ferry disk by disk down each chain).
fn sorted(v: Value) -> Value {
    let mut a = v.as_array().expect("array").clone();
    a.sort_by_key(Value::to_string);
    Value::Array(a)
}

/// qcow2 chains made with qemu-img as QEMU 7.2 was given them (recorded in
/// tests/fixtures/qemu-7.2-qcow2-chain.json by the .py beside it):
/// libvirt's -blockdev chain of a qcow2 over a raw base, a qcow2 over
/// qcow2 over raw, `"backing":null` and `-drive format=qcow2`. query-block,
/// query-named-block-nodes (nested and flat) and query-blockstats answer as
/// QEMU's did, and the sizes libvirt's domblkinfo reads are the qcow2's.
#[test]
fn qcow2_chains_answer_as_qemu_7_2() {
    let qemu_tool = |tool: &str, args: &[&str]| {
        let out = std::process::Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("run {tool}: {e}: install qemu-utils (scripts/deps --tests)")
            });
        assert!(out.status.success(), "{tool} {args:?}: {out:?}");
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("UTF-8 temp path");
    let (base, top, over) = (
        format!("{d}/base.raw"),
        format!("{d}/top.qcow2"),
        format!("{d}/over.qcow2"),
    );
    qemu_tool("qemu-img", &["create", "-q", "-f", "raw", &base, "64M"]);
    qemu_tool(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "raw", &top,
        ],
    );
    qemu_tool("qemu-io", &["-f", "qcow2", "-c", "write -P 1 0 1M", &top]);
    qemu_tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "top.qcow2",
            "-F",
            "qcow2",
            &over,
        ],
    );
    let fixture: Value = serde_json::from_str(
        &include_str!("../../tests/fixtures/qemu-7.2-qcow2-chain.json")
            .replace("DIR/", &format!("{d}/")),
    )
    .expect("fixture");
    let ask = |c: &mut Client, cmd: &str, args: Value| {
        c.cmd(json!({"execute": cmd, "arguments": args}))["return"].clone()
    };
    for scenario in ["explicit", "explicit-three", "null", "drive"] {
        let qemu = &fixture[scenario];
        let args: Vec<&str> = qemu["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().expect("arg"))
            .collect();
        let mut c = guest_client(
            &format!("-machine pc -m 256 -kernel /k {}", args.join(" ")),
            Default::default(),
        );
        // -drive's backing nodes are made as QEMU opens them, bottom first.
        let order = |v: Value| if scenario == "drive" { sorted(v) } else { v };
        for (key, cmd, args) in [
            ("query-block", "query-block", json!({})),
            (
                "query-named-block-nodes",
                "query-named-block-nodes",
                json!({}),
            ),
            (
                "query-named-block-nodes flat",
                "query-named-block-nodes",
                json!({"flat": true}),
            ),
        ] {
            assert_eq!(
                order(host_independent(&ask(&mut c, cmd, args))),
                order(host_independent(&qemu[key])),
                "{scenario}: {key}"
            );
        }
        assert_eq!(
            host_independent(&without_stats(&ask(&mut c, "query-blockstats", json!({})))),
            host_independent(&qemu["query-blockstats"]),
            "{scenario}: query-blockstats"
        );
        assert_eq!(
            sorted(host_independent(&without_stats(&ask(
                &mut c,
                "query-blockstats",
                json!({"query-nodes": true})
            )))),
            sorted(host_independent(&qemu["query-blockstats query-nodes"])),
            "{scenario}: query-blockstats query-nodes"
        );
        // domblkinfo: capacity is the qcow2's virtual size; the allocation
        // is what the qcow2 file holds (less than the disk).
        let image = &ask(&mut c, "query-block", json!({}))[0]["inserted"]["image"];
        assert_eq!(image["virtual-size"], 64 << 20, "{scenario}");
        let actual = image["actual-size"].as_u64().expect("actual-size");
        assert!((4096..64 << 20).contains(&actual), "{scenario}: {actual}");
    }
}
