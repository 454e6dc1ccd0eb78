//! Encrypted, authenticated migration between two `ferry-vm` processes on /dev/kvm:
//! x509 certificates laid out as QEMU's tls-creds-x509 reads them, and PSK as
//! tls-creds-psk reads it. A successful migration is checked like every other one
//! (heartbeats and the memory oracle on the destination); a peer without valid
//! credentials is refused before a single page moves, the source runs on with its
//! memory intact, and a waiting destination keeps waiting for the real source.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::pki::{psk_dir, Ca};
use ferry_tests::{complete_migration, dirtier_source, free_port, require_kvm, Scratch, VmProcess};

fn x509(dir: &Path) -> String {
    format!("x509:{}", dir.display())
}

/// A destination for `src` waiting with `creds` on `uri`.
fn destination(s: &Scratch, src: &VmProcess, uri: &str, creds: &str) -> VmProcess {
    let mut dst = VmProcess::spawn(
        s,
        "dst",
        &["incoming", uri, "-m", &src.mem, "--tls-creds", creds],
    );
    dst.wait_listening();
    dst
}

/// A migration that must fail at the TLS handshake: returns the source's error after
/// checking that no page moved and the source runs on with its memory intact.
fn refused(s: &Scratch, src: &VmProcess, uri: &str) -> String {
    let reply = src.command(&format!("migrate {uri}"));
    assert_eq!(reply["ok"], false, "{reply}");
    let err = reply["error"].as_str().unwrap_or_default().to_string();
    let q = src.ok("query-migrate");
    assert_eq!(q["status"], "failed", "{q}");
    assert_eq!(
        q["ram"]["transferred"].as_u64().unwrap_or(0),
        0,
        "bytes moved before the handshake failed: {q}"
    );
    let status = src.ok("status");
    assert_eq!(status["status"], "running", "{status}");
    src.wait_heartbeats(20, Duration::from_secs(10));
    // The oracle reads memory with the guest paused.
    let report = src.oracle(s, "src-after");
    assert!(report.passes + report.cursor > 0, "{report:?}");
    src.ok("resume");
    eprintln!("refused as expected: {err}");
    err
}

/// Waits until the destination's stderr says it refused a connection.
fn wait_refusal(dst: &VmProcess) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = dst.stderr_text();
        if text.contains("refused a connection") {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "the destination did not log a refusal: {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn x509_with_peer_verification_and_two_streams_over_tcp() {
    require_kvm();
    let s = Scratch::new();
    let ca = Ca::new(&s.path("ca"), "ferry test CA");
    let server = ca.issue(
        &s.path("server"),
        "server",
        "dst",
        &["127.0.0.1", "localhost"],
    );
    let client = ca.issue(&s.path("client"), "client", "src", &[]);
    let src = dirtier_source(&s, "256M", "ws=32M fill=1", &[]);
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let dst = destination(&s, &src, &uri, &x509(&server));
    src.ok(&format!(
        "migrate-set tls-creds={} multifd-channels=2",
        x509(&client)
    ));
    let stats = complete_migration(&s, src, dst, &uri);
    assert_eq!(stats["streams"], 2, "{stats}");
    assert!(
        stats["ram"]["normal"].as_u64().unwrap_or(0) >= 8_000,
        "{stats}"
    );
}

#[test]
fn x509_by_hostname_over_unix_socket() {
    require_kvm();
    let s = Scratch::new();
    let ca = Ca::new(&s.path("ca"), "ferry test CA");
    let server = ca.issue(&s.path("server"), "server", "hostb", &["hostb.example"]);
    let client = ca.issue(&s.path("client"), "client", "hosta", &[]);
    let src = dirtier_source(&s, "128M", "ws=16M", &[]);
    let uri = format!("unix:{}", s.path("mig.sock").display());
    let dst = destination(&s, &src, &uri, &x509(&server));
    // A unix: URI names no host: without tls-hostname the source cannot check the
    // destination's certificate, and says so.
    src.ok(&format!("migrate-set tls-creds={}", x509(&client)));
    let err = refused(&s, &src, &uri);
    assert!(err.contains("tls-hostname"), "{err}");
    src.ok("migrate-set tls-hostname=hostb.example");
    complete_migration(&s, src, dst, &uri);
}

#[test]
fn psk_over_unix_socket() {
    require_kvm();
    let s = Scratch::new();
    let key = "9f1c2e5d7a3b4c6d8e0f1a2b3c4d5e6f";
    let dst_keys = psk_dir(&s.path("dst-psk"), &[("other", "00ff"), ("qemu", key)]);
    let src_keys = psk_dir(&s.path("src-psk"), &[("qemu", key)]);
    let src = dirtier_source(&s, "128M", "ws=16M fill=1", &[]);
    let uri = format!("unix:{}", s.path("mig.sock").display());
    let dst = destination(&s, &src, &uri, &format!("psk:{}", dst_keys.display()));
    src.ok(&format!("migrate-set tls-creds=psk:{}", src_keys.display()));
    complete_migration(&s, src, dst, &uri);
}

/// Strangers of every kind try one waiting destination in turn: each is refused
/// before any page moves, the source runs on, and the destination keeps waiting;
/// then the real source migrates to it.
#[test]
fn peers_without_valid_credentials_are_refused_before_any_page_moves() {
    require_kvm();
    let s = Scratch::new();
    let ca = Ca::new(&s.path("ca"), "ferry test CA");
    let rogue = Ca::new(&s.path("rogue-ca"), "rogue CA");
    let server = ca.issue(&s.path("server"), "server", "dst", &["127.0.0.1"]);
    let client = ca.issue(&s.path("client"), "client", "src", &[]);
    // Signed by a rogue CA, but trusting the right one (so only the server can object).
    let rogue_client = rogue.issue(&s.path("rogue-client"), "client", "src", &[]);
    std::fs::copy(server.join("ca-cert.pem"), rogue_client.join("ca-cert.pem")).expect("copy");
    // Trusts the right CA but has no certificate of its own to show.
    let anonymous = s.path("anonymous");
    std::fs::create_dir_all(&anonymous).expect("mkdir");
    std::fs::copy(server.join("ca-cert.pem"), anonymous.join("ca-cert.pem")).expect("copy");

    let src = dirtier_source(&s, "128M", "ws=16M fill=1", &[]);
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let mut dst = destination(&s, &src, &uri, &x509(&server));

    src.ok(&format!("migrate-set tls-creds={}", x509(&rogue_client)));
    let err = refused(&s, &src, &uri);
    assert!(err.contains("TLS"), "{err}");
    let log = wait_refusal(&dst);
    assert!(
        log.contains("source's certificate is not accepted"),
        "{log}"
    );

    src.ok(&format!("migrate-set tls-creds={}", x509(&anonymous)));
    let err = refused(&s, &src, &uri);
    assert!(err.contains("TLS"), "{err}");

    // A source without TLS: its plain stream is no TLS handshake.
    src.ok("migrate-set tls-creds=none");
    let reply = src.command(&format!("migrate {uri}"));
    assert_eq!(reply["ok"], false, "{reply}");
    let q = src.ok("query-migrate");
    assert_eq!(q["status"], "failed", "{q}");
    assert_eq!(src.ok("status")["status"], "running");

    // The wrong name: the certificate says 127.0.0.1, the source expects another.
    src.ok(&format!(
        "migrate-set tls-creds={} tls-hostname=hostb.example",
        x509(&client)
    ));
    let err = refused(&s, &src, &uri);
    assert!(
        err.contains("not accepted") && err.contains("hostname"),
        "{err}"
    );

    assert!(
        dst.child.try_wait().expect("try_wait").is_none(),
        "the destination gave up waiting: {}",
        dst.stderr_text()
    );
    // The real source, at last.
    src.ok("migrate-set tls-hostname=");
    complete_migration(&s, src, dst, &uri);
}

/// A destination whose certificate the source's CA did not sign cannot pull a VM.
#[test]
fn a_destination_with_a_foreign_certificate_gets_nothing() {
    require_kvm();
    let s = Scratch::new();
    let ca = Ca::new(&s.path("ca"), "ferry test CA");
    let rogue = Ca::new(&s.path("rogue-ca"), "rogue CA");
    let rogue_server = rogue.issue(&s.path("rogue-server"), "server", "dst", &["127.0.0.1"]);
    let client = ca.issue(&s.path("client"), "client", "src", &[]);
    let src = dirtier_source(&s, "128M", "ws=16M fill=1", &[]);
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    // The rogue destination does not even ask for a client certificate.
    let rogue_spec = format!("{},verify-peer=off", x509(&rogue_server));
    let mut dst = destination(&s, &src, &uri, &rogue_spec);
    src.ok(&format!("migrate-set tls-creds={}", x509(&client)));
    let err = refused(&s, &src, &uri);
    assert!(err.contains("certificate is not accepted"), "{err}");
    let _ = dst.child.kill();

    // PSK: a wrong key and an unknown name are refused too.
    let uri = format!("unix:{}", s.path("psk.sock").display());
    let dst_keys = psk_dir(
        &s.path("dst-psk"),
        &[("qemu", "00112233445566778899aabbccddeeff")],
    );
    let wrong_key = psk_dir(
        &s.path("wrong"),
        &[("qemu", "ffeeddccbbaa99887766554433221100")],
    );
    let wrong_name = psk_dir(
        &s.path("name"),
        &[("mallory", "00112233445566778899aabbccddeeff")],
    );
    let mut dst = destination(&s, &src, &uri, &format!("psk:{}", dst_keys.display()));
    src.ok(&format!(
        "migrate-set tls-creds=psk:{}",
        wrong_key.display()
    ));
    let err = refused(&s, &src, &uri);
    assert!(err.contains("TLS handshake failed"), "{err}");
    src.ok(&format!(
        "migrate-set tls-creds=psk:{},username=mallory",
        wrong_name.display()
    ));
    let err = refused(&s, &src, &uri);
    assert!(err.contains("TLS handshake failed"), "{err}");
    wait_refusal(&dst);
    let _ = dst.child.kill();
    src.quit();
}

#[test]
fn bad_credentials_are_named_when_set() {
    require_kvm();
    let s = Scratch::new();
    let src = dirtier_source(&s, "64M", "ws=0", &[]);
    let empty = s.path("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let reply = src.command(&format!("migrate-set tls-creds={}", x509(&empty)));
    let err = reply["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("ca-cert.pem") && err.contains("No such file"),
        "{reply}"
    );
    let reply = src.command("migrate-set tls-creds=tls:/x");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("x509:DIR"),
        "{reply}"
    );
    // A destination with unusable credentials exits at once, naming the file.
    let mut dst = VmProcess::spawn(
        &s,
        "dst",
        &[
            "incoming",
            "unix:/nonexistent/x.sock",
            "--tls-creds",
            &x509(&empty),
        ],
    );
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(1));
    let text = dst.stderr_text();
    assert!(
        text.contains("ca-cert.pem") && text.contains("No such file"),
        "{text}"
    );
    // TLS cannot protect a file.
    let ca = Ca::new(&s.path("ca"), "ferry test CA");
    let client = ca.issue(&s.path("client"), "client", "src", &[]);
    src.ok(&format!("migrate-set tls-creds={}", x509(&client)));
    let reply = src.command(&format!("migrate file:{}", s.path("ckpt").display()));
    let err = reply["error"].as_str().unwrap_or_default();
    assert!(err.contains("TLS needs a socket"), "{reply}");
    assert_eq!(src.ok("status")["status"], "running");
    src.quit();
}
