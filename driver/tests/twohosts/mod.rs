//! Two libvirt hosts on this machine for integration tests: a Rust handle over
//! `twohosts.sh` (namespaces, daemons, veth 10.77.0.1 <-> 10.77.0.2, shared dir).
//! `TwoHosts::up()` tears down leftovers first; dropping the handle tears down.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/twohosts/twohosts.sh");
pub const DEST_B: &str = "qemu+tcp://hostb/system";
pub const DEST_A: &str = "qemu+tcp://hosta/system";

#[derive(Debug)]
pub struct TwoHosts {
    pub dir: PathBuf,
}

/// Why the two hosts cannot be brought up here, if they cannot.
pub fn unavailable() -> Option<String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    if uid.trim_ascii() != b"0" {
        return Some("needs root (namespaces, mounts, libvirtd)".into());
    }
    for bin in [
        "libvirtd", "virtlogd", "virsh", "nsenter", "unshare", "ip", "python3",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            return Some(format!("{bin} is not installed"));
        }
    }
    None
}

/// An emulator libvirt can probe: QEMU if installed, else the ferry-qemu shim.
pub fn emulator() -> Option<String> {
    let shim = [
        "/work/target-shim/debug/ferry-qemu".to_owned(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug/ferry-qemu").to_owned(),
    ];
    std::iter::once("/usr/bin/qemu-system-x86_64".to_owned())
        .chain(shim)
        .find(|p| Path::new(p).exists())
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

impl TwoHosts {
    pub fn up(dir: &Path, hook: Option<&str>) -> Result<TwoHosts, String> {
        let mut cmd = Command::new(SCRIPT);
        cmd.arg("up").env("FT", dir);
        if let Some(h) = hook {
            cmd.env("FERRY_HOOK", h);
        }
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {SCRIPT}: {e}"))?;
        if !out.status.success() {
            let _ = Command::new(SCRIPT).arg("down").env("FT", dir).output();
            return Err(format!("twohosts up failed:\n{}", text(&out)));
        }
        Ok(TwoHosts {
            dir: dir.to_owned(),
        })
    }

    /// Runs `args` inside host `h` ("A" or "B").
    pub fn sh(&self, h: &str, args: &[&str]) -> Output {
        Command::new(SCRIPT)
            .arg("sh")
            .arg(h)
            .args(args)
            .env("FT", &self.dir)
            .output()
            .expect("twohosts.sh runs")
    }

    pub fn virsh(&self, h: &str, args: &[&str]) -> Output {
        let mut v = vec!["virsh", "-c", "qemu:///system"];
        v.extend_from_slice(args);
        self.sh(h, &v)
    }

    /// Runs the ferry binary under test inside host `h`.
    pub fn ferry(&self, h: &str, args: &[&str]) -> Output {
        let mut v = vec![env!("CARGO_BIN_EXE_ferry")];
        v.extend_from_slice(args);
        self.sh(h, &v)
    }

    /// Defines `xml` on host `h` (written to the shared dir first).
    pub fn define(&self, h: &str, name: &str, xml: &str) {
        let path = self.shared().join(format!("{name}.xml"));
        std::fs::write(&path, xml).expect("write domain xml");
        let out = self.virsh(h, &["define", path.to_str().expect("utf-8 path")]);
        assert!(out.status.success(), "define {name}: {}", text(&out));
    }

    pub fn shared(&self) -> PathBuf {
        self.dir.join("shared")
    }

    /// A host's private /var/lib/libvirt, seen from outside.
    pub fn private_var_lib(&self, h: &str) -> PathBuf {
        self.dir.join("hosts").join(h).join("var-lib-libvirt")
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        let keep = if std::thread::panicking() { "1" } else { "0" };
        let _ = Command::new(SCRIPT)
            .arg("down")
            .env("FT", &self.dir)
            .env("KEEP_LOGS", keep)
            .output();
    }
}
