//! TLS migration between two real libvirt hosts (tests/twohosts/): `virsh
//! migrate --live --tls` of a ferry-qemu dirtier domain, peer to peer and
//! plain, with each host's certificates in its own directory
//! (`migrate_tls_x509_cert_dir` in its qemu.conf, `TwoHosts::tls_dir`).
//!
//! libvirt adds `tls-creds-x509` objects (the destination's endpoint=server,
//! verify-peer on, as `migrate_tls_x509_verify` defaults to; the source's
//! endpoint=client) and sets the `tls-creds` and `tls-hostname` migration
//! parameters; the destination's migration URI is `tcp:hostb:PORT` (libvirt
//! names the destination by its hostname), so `tls-hostname` is `hostb`, and
//! each host's server certificate names its host (and its address). The tests
//! check on the wire (a packet socket on host A's end of the link) that the
//! migration stream is TLS (a ClientHello, no ferry stream magic) where the
//! same migration without `--tls` shows ferry's stream in clear, that a
//! source whose certificate another CA signed and a destination whose
//! certificate names another host are refused, the guest running on at the
//! source, and print what encryption costs (wall time, downtime).
//!
//! Skipped, with the reason printed, where the hosts cannot be brought up;
//! in CI (`CI` set) that is a failure.

mod twohosts;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Output};
use std::time::Duration;

use ferry_tests::pki::Ca;
use twohosts::lab::{ms, JobInfo, Lab, CMDLINE};
use twohosts::{text, DEST_A, DEST_B};

/// How many #[test]s share the hosts: the last one to finish tears them down.
const TESTS: usize = 2;

fn lab() -> Option<twohosts::lab::LabGuard> {
    twohosts::lab::lab(TESTS)
}

/// Each host as the other one names it: its hostname (what libvirt puts in
/// the migration URI and so in `tls-hostname`) and its address on the link.
const NAMES: [(&str, &str, &str); 2] = [("A", "hosta", "10.77.0.1"), ("B", "hostb", "10.77.0.2")];

/// The ports libvirt picks an incoming migration's from
/// (`migration_port_min`/`_max` in qemu.conf, defaults).
const MIGRATION_PORTS: (u16, u16) = (49152, 49215);

/// ferry's migration stream starts with this (engine/format, preamble.rs).
const FERRY_MAGIC: &[u8] = b"FERRYVM\0";

/// The test PKI: one CA whose certificates both hosts trust, in the lab's
/// state dir (gone with it).
struct Pki {
    dir: PathBuf,
    ca: Ca,
}

impl Pki {
    /// A fresh CA, and good credentials in both hosts' directories: a server
    /// certificate naming the host and its address, a client certificate.
    fn install(lab: &Lab) -> Pki {
        let dir = lab.hosts.dir.join("pki");
        let _ = std::fs::remove_dir_all(&dir);
        let ca = Ca::new(&dir.join("ca"), "ferry lab CA");
        let pki = Pki { dir, ca };
        for (h, _, _) in NAMES {
            pki.good(lab, h);
        }
        pki
    }

    /// Host `h`'s good credentials, issued again into its directory.
    fn good(&self, lab: &Lab, h: &str) {
        let (_, name, ip) = NAMES
            .into_iter()
            .find(|(host, _, _)| *host == h)
            .expect("host A or B");
        let out = lab.hosts.tls_dir(h);
        self.ca.issue(&out, "server", name, &[name, ip]);
        self.ca.issue(&out, "client", name, &[name]);
        keys_for_the_emulator(&out);
    }

    /// Puts `role`'s certificate and key from `from` (issued elsewhere) into
    /// host `h`'s directory, in place of its good ones.
    fn replace(&self, lab: &Lab, h: &str, role: &str, from: &Path) {
        for f in ["cert", "key"] {
            let name = format!("{role}-{f}.pem");
            std::fs::copy(from.join(&name), lab.hosts.tls_dir(h).join(&name))
                .unwrap_or_else(|e| panic!("install {name} on host {h}: {e}"));
        }
        keys_for_the_emulator(&lab.hosts.tls_dir(h));
    }
}

/// The emulator reads the keys in `dir` (libvirt gives QEMU the directory)
/// as its user, libvirt-qemu: as libvirt asks of an operator, they are
/// readable by that group (0640 root:libvirt-qemu), not by everyone.
fn keys_for_the_emulator(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir).expect("read the x509 dir").flatten() {
        let path = entry.path();
        if !path.to_string_lossy().ends_with("-key.pem") {
            continue;
        }
        let out = std::process::Command::new("chgrp")
            .arg("libvirt-qemu")
            .arg(&path)
            .output()
            .expect("run chgrp");
        assert!(
            out.status.success(),
            "chgrp {}: {}",
            path.display(),
            text(&out)
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640))
            .expect("chmod the key");
    }
}

/// The first bytes of the TCP connections that one host opened to the other
/// host's migration ports, as seen on its end of the link.
const SNIFF_PY: &str = r#"import json, os, socket, struct, sys, time
iface, src_ip, lo, hi, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
KEEP = 16384
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))  # ETH_P_ALL
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((iface, 0))
s.settimeout(0.2)
print("ready", flush=True)
conns, checked = {}, time.monotonic()
# Ends once a connection's first KEEP bytes are in (the stream need not be
# watched further), or when the stop file appears.
while not any(len(c["buf"]) >= KEEP for c in conns.values()):
    if time.monotonic() - checked > 0.2:
        checked = time.monotonic()
        if os.path.exists(stop):
            break
    try:
        p = s.recv(1 << 18)
    except socket.timeout:
        continue
    if len(p) < 54 or p[12:14] != b"\x08\x00" or p[23] != 6:
        continue
    ihl, tot = (p[14] & 15) * 4, struct.unpack("!H", p[16:18])[0]
    if socket.inet_ntoa(p[26:30]) != src_ip:
        continue
    t = 14 + ihl
    sport, dport, seq = struct.unpack("!HHI", p[t:t + 8])
    if not lo <= dport <= hi:
        continue
    key = (sport, dport)
    if p[t + 13] & 2:  # SYN: the stream starts after its sequence number
        conns.setdefault(key, {"isn": seq, "buf": bytearray()})
        continue
    c = conns.get(key)
    end = min(len(p), 14 + tot) if tot else len(p)
    data = p[t + (p[t + 12] >> 4) * 4:end]
    if c is None or not data:
        continue
    off = (seq - c["isn"] - 1) & 0xffffffff
    if off < KEEP:
        data = data[:KEEP - off]
        buf = c["buf"]
        if len(buf) < off:
            buf.extend(bytes(off - len(buf)))
        buf[off:off + len(data)] = data
for (sport, dport), c in sorted(conns.items()):
    print(json.dumps({"sport": sport, "dport": dport, "head": bytes(c["buf"]).hex()}), flush=True)
"#;

/// A packet capture on host `h`'s end of the link: the first bytes of the
/// migration connections `h` opens.
struct Sniffer {
    child: Child,
    out: BufReader<ChildStdout>,
    stop: PathBuf,
}

/// A migration connection's first bytes (up to 16 KiB).
#[derive(Debug)]
struct Stream {
    dport: u16,
    head: Vec<u8>,
}

impl Stream {
    fn has_magic(&self) -> bool {
        self.head
            .windows(FERRY_MAGIC.len())
            .any(|w| w == FERRY_MAGIC)
    }

    fn first(&self) -> String {
        let n = self.head.len().min(8);
        self.head[..n].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl Sniffer {
    fn start(lab: &Lab, h: &str) -> Sniffer {
        let script = lab.shared().join("sniff.py");
        std::fs::write(&script, SNIFF_PY).expect("write sniff.py");
        let stop = lab.shared().join(format!("sniff-{h}.stop"));
        let _ = std::fs::remove_file(&stop);
        let ip = NAMES.iter().find(|n| n.0 == h).expect("host A or B").2;
        let (lo, hi) = (MIGRATION_PORTS.0.to_string(), MIGRATION_PORTS.1.to_string());
        let mut child = lab.hosts.spawn(
            h,
            &[
                "timeout",
                "120",
                "/usr/bin/python3",
                script.to_str().expect("utf-8 path"),
                twohosts::veth(h),
                ip,
                &lo,
                &hi,
                stop.to_str().expect("utf-8 path"),
            ],
        );
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        if line.trim() != "ready" {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            let _ = child.kill();
            panic!("the packet capture on host {h} did not start: {line}{err}");
        }
        Sniffer { child, out, stop }
    }

    /// Ends the capture; the one migration connection it saw.
    fn stream(mut self) -> Stream {
        std::fs::write(&self.stop, "").expect("write the stop file");
        let mut rest = String::new();
        let _ = self.out.read_to_string(&mut rest);
        let status = self.child.wait().expect("wait for the capture");
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        assert!(status.success(), "packet capture: {status}: {rest}{err}");
        let streams: Vec<Stream> = rest
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
                let hex = v["head"].as_str().expect("head");
                Stream {
                    dport: v["dport"].as_u64().expect("dport") as u16,
                    head: (0..hex.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                        .collect(),
                }
            })
            .collect();
        let mut streams = streams.into_iter();
        let one = streams
            .next()
            .unwrap_or_else(|| panic!("no migration connection seen on the link: {err}"));
        let more: Vec<Stream> = streams.collect();
        assert!(
            more.is_empty(),
            "more than one migration connection: {one:?} {more:?}"
        );
        assert!(!one.head.is_empty(), "no data seen on {one:?}");
        one
    }
}

impl Drop for Sniffer {
    /// Also when a test fails before [`Sniffer::stream`]: the capture ends.
    fn drop(&mut self) {
        let _ = std::fs::write(&self.stop, "");
        let _ = self.child.wait();
    }
}

/// `virsh migrate --live EXTRA DOM DEST` on `h`, which must fail; its error.
fn migrate_refused(lab: &Lab, h: &str, dom: &str, dest: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "timeout",
        "120",
        "virsh",
        "-c",
        "qemu:///system",
        "migrate",
        "--live",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[dom, dest]);
    let out: Output = lab.hosts.sh(h, &args);
    let t = text(&out).trim().to_owned();
    assert!(
        !out.status.success(),
        "virsh migrate {extra:?} {dom} was not refused: {t}\n{}",
        lab.diagnose(dom)
    );
    t
}

/// A migration's figures: virsh's wall time, the job's and its downtime.
fn figures(wall: Duration, st: &JobInfo) -> String {
    let n = |k: &str| ms(st, k).map_or("?".to_owned(), |v| v.to_string());
    format!(
        "wall {} ms, job {} ms, downtime {} ms, {} iterations, {} at {}",
        wall.as_millis(),
        n("Time elapsed"),
        n("Total downtime"),
        st.get("Iteration").map_or("?", String::as_str),
        st.get("Data processed").map_or("?", String::as_str),
        st.get("Memory bandwidth").map_or("?", String::as_str),
    )
}

/// `virsh migrate --live --p2p` A -> B without TLS, back, then with `--tls`:
/// on the wire the first shows ferry's stream magic, the last a TLS
/// ClientHello and no magic; the guest moves (heartbeats, oracle, one
/// running copy). Prints both migrations' wall time and downtime.
#[test]
fn virsh_migrate_p2p_tls_is_encrypted_on_the_wire_and_what_it_costs() {
    let Some(lab) = lab() else { return };
    let dom = "ferry-tls";
    let mib = 256;
    Pki::install(&lab);
    lab.start("A", dom, &lab.dirtier(dom, mib, CMDLINE));

    let sniff = Sniffer::start(&lab, "A");
    let wall = lab.migrate("A", dom, DEST_B, &["--p2p"]);
    let clear = sniff.stream();
    let plain = lab.jobinfo("A", dom, true);
    lab.assert_runs_only_on("B", dom);
    assert!(
        clear.head.starts_with(FERRY_MAGIC),
        "the capture does not show the plain migration's stream: {clear:?}"
    );
    let plain = figures(wall, &plain);

    lab.migrate("B", dom, DEST_A, &["--p2p"]);
    lab.assert_runs_only_on("A", dom);

    let sniff = Sniffer::start(&lab, "A");
    let wall = lab.migrate("A", dom, DEST_B, &["--p2p", "--tls"]);
    let tls = sniff.stream();
    let st = lab.jobinfo("A", dom, true);
    let report = lab.assert_moved(dom, "A", "B", mib);
    lab.assert_runs_only_on("B", dom);
    // A TLS record of type handshake (22), version 3.x: the ClientHello.
    assert!(
        tls.head.starts_with(&[0x16, 0x03]),
        "the --tls migration does not start with a TLS ClientHello: {} ({} bytes seen)",
        tls.first(),
        tls.head.len()
    );
    assert!(
        !tls.has_magic(),
        "ferry's stream magic in clear in the --tls migration's first {} bytes",
        tls.head.len()
    );
    eprintln!(
        "TLS wire: plain to port {} starts {} (ferry's magic); --tls to port {} starts {}, no \
         magic in its first {} bytes",
        clear.dport,
        clear.first(),
        tls.dport,
        tls.first(),
        tls.head.len()
    );
    eprintln!(
        "TLS cost, {mib} MiB dirtier ({CMDLINE}), virsh migrate --live --p2p A->B: plain {plain}; \
         --tls {}; oracle on B: {report:?}",
        figures(wall, &st)
    );
    lab.forget(dom);
}

/// `virsh migrate --tls` refused: (i) the source's client certificate signed
/// by another CA (the destination verifies its peer), (ii) the destination's
/// server certificate naming another host than `hostb`. Each time the guest
/// runs on at the source (heartbeats, oracle) and nothing is left on the
/// destination. With the good credentials back, the plain (not peer to
/// peer) `virsh migrate --tls` completes.
#[test]
fn virsh_migrate_tls_refuses_a_foreign_ca_and_a_wrong_name_then_completes() {
    let Some(lab) = lab() else { return };
    let dom = "ferry-tls-refused";
    let mib = 64;
    let pki = Pki::install(&lab);
    lab.start("A", dom, &lab.dirtier(dom, mib, CMDLINE));

    let rogue = Ca::new(&pki.dir.join("rogue-ca"), "rogue CA");
    let stranger = rogue.issue(&pki.dir.join("rogue-client"), "client", "hosta", &["hosta"]);
    pki.replace(&lab, "A", "client", &stranger);
    let foreign = migrate_refused(&lab, "A", dom, DEST_B, &["--p2p", "--tls"]);
    assert!(
        foreign.contains("TLS") && (foreign.contains("refused") || foreign.contains("unknown ca")),
        "the error does not say that the TLS session was refused: {foreign}"
    );
    let gone = lab.wait_gone("B", dom, 30);
    lab.assert_runs_only_on("A", dom);
    lab.assert_unharmed("A", dom, mib);
    eprintln!(
        "TLS refused, source certificate from another CA: {foreign:?}; B clean {} ms later",
        gone.as_millis()
    );
    pki.good(&lab, "A");

    let wrong = pki.ca.issue(
        &pki.dir.join("wrong-name"),
        "server",
        "hostc",
        &["hostc", "10.77.0.3"],
    );
    pki.replace(&lab, "B", "server", &wrong);
    let mismatch = migrate_refused(&lab, "A", dom, DEST_B, &["--p2p", "--tls"]);
    assert!(
        mismatch.contains("TLS") && mismatch.contains("hostname mismatch"),
        "the error does not name the hostname mismatch: {mismatch}"
    );
    let gone = lab.wait_gone("B", dom, 30);
    lab.assert_runs_only_on("A", dom);
    lab.assert_unharmed("A", dom, mib);
    eprintln!(
        "TLS refused, destination certificate for hostc: {mismatch:?}; B clean {} ms later",
        gone.as_millis()
    );
    // `ferry migrate --tls` asks libvirt for the same: refused the same way.
    let out = lab.hosts.ferry("A", &["migrate", dom, DEST_B, "--tls"]);
    let said = text(&out);
    assert!(
        !out.status.success() && said.contains("hostname mismatch"),
        "ferry migrate --tls to a host with a certificate for hostc: {said}"
    );
    lab.wait_gone("B", dom, 30);
    lab.assert_runs_only_on("A", dom);
    pki.good(&lab, "B");

    let wall = lab.migrate("A", dom, DEST_B, &["--tls"]);
    let st = lab.jobinfo("A", dom, true);
    let report = lab.assert_moved(dom, "A", "B", mib);
    lab.assert_runs_only_on("B", dom);
    eprintln!(
        "TLS plain (not p2p) virsh migrate --tls A->B with the good credentials back: {}; \
         oracle on B: {report:?}",
        figures(wall, &st)
    );
    lab.forget(dom);
}
