//! Test credentials made with the `openssl` command, the way an operator makes them
//! for QEMU: a CA, and x509 directories laid out as `tls-creds-x509` reads them
//! (`ca-cert.pem`, `server-cert.pem` + `server-key.pem`, `client-cert.pem` +
//! `client-key.pem`), or `keys.psk` files for `tls-creds-psk`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (install the openssl package: scripts/deps --tests)");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

/// A certificate authority in `dir`.
#[derive(Debug)]
pub struct Ca {
    dir: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Self {
        std::fs::create_dir_all(dir).expect("create the CA directory");
        let mut args = vec!["req", "-x509", "-nodes", "-days", "2"];
        args.extend(EC);
        let subj = format!("/CN={name}");
        args.extend([
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(dir, &args);
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// Issues `role`-cert.pem/-key.pem (role: server or client) into a new directory
    /// `out` that also holds this CA's certificate: a `tls-creds-x509` directory.
    /// `names` go into subjectAltName (DNS names, or IP addresses).
    pub fn issue(&self, out: &Path, role: &str, cn: &str, names: &[&str]) -> PathBuf {
        std::fs::create_dir_all(out).expect("create the credentials directory");
        std::fs::copy(self.dir.join("ca-cert.pem"), out.join("ca-cert.pem")).expect("copy CA");
        let key = out.join(format!("{role}-key.pem"));
        let cert = out.join(format!("{role}-cert.pem"));
        let csr = out.join(format!("{role}.csr"));
        let (key_s, cert_s, csr_s) = (
            key.display().to_string(),
            cert.display().to_string(),
            csr.display().to_string(),
        );
        let subj = format!("/CN={cn}");
        let mut args = vec!["req", "-new", "-nodes"];
        args.extend(EC);
        args.extend(["-keyout", &key_s, "-out", &csr_s, "-subj", &subj]);
        openssl(&self.dir, &args);
        let san: Vec<String> = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(_) => format!("IP:{n}"),
                Err(_) => format!("DNS:{n}"),
            })
            .collect();
        let usage = if role == "server" {
            "serverAuth"
        } else {
            "clientAuth"
        };
        let mut ext = format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage={usage}\n"
        );
        if !san.is_empty() {
            ext.push_str(&format!("subjectAltName={}\n", san.join(",")));
        }
        let ext_path = out.join(format!("{role}.ext"));
        std::fs::write(&ext_path, ext).expect("write extensions");
        let ext_s = ext_path.display().to_string();
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr_s,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &cert_s,
                "-extfile",
                &ext_s,
            ],
        );
        out.to_path_buf()
    }
}

/// Writes `dir/keys.psk` with `USERNAME:HEXKEY` lines.
pub fn psk_dir(dir: &Path, keys: &[(&str, &str)]) -> PathBuf {
    std::fs::create_dir_all(dir).expect("create the PSK directory");
    let text: String = keys.iter().map(|(u, k)| format!("{u}:{k}\n")).collect();
    std::fs::write(dir.join("keys.psk"), text).expect("write keys.psk");
    dir.to_path_buf()
}
