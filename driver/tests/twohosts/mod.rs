//! Two libvirt hosts on this machine for integration tests: a Rust handle over
//! `twohosts.sh` (namespaces, daemons, veth 10.77.0.1 <-> 10.77.0.2, shared dir).
//! `TwoHosts::up()` tears down leftovers first; dropping the handle tears down.
//! Shared by several test binaries, each of which uses a part of it.
#![allow(dead_code)]

pub mod lab;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/twohosts/twohosts.sh");
pub const DEST_B: &str = "qemu+tcp://hostb/system";
pub const DEST_A: &str = "qemu+tcp://hosta/system";

/// Host `h`'s end of the veth pair between the hosts (twohosts.sh's `VETH`).
pub fn veth(h: &str) -> &'static str {
    match h {
        "A" => "fdrvA",
        "B" => "fdrvB",
        _ => panic!("no host {h}: A or B"),
    }
}

/// What a process holds, from /proc/PID/{fd,status}.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStats {
    pub fds: usize,
    pub threads: u64,
    pub rss_kib: u64,
}

impl ProcStats {
    /// `None` once the process is gone.
    pub fn of(pid: u32) -> Option<ProcStats> {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |key: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            line[key.len()..].split_whitespace().next()?.parse().ok()
        };
        Some(ProcStats {
            fds,
            threads: field("Threads:")?,
            rss_kib: field("VmRSS:")?,
        })
    }
}

impl std::fmt::Display for ProcStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fds {} threads {} rss {} KiB",
            self.fds, self.threads, self.rss_kib
        )
    }
}

#[derive(Debug)]
pub struct TwoHosts {
    pub dir: PathBuf,
    /// Keep the libvirt logs (in `<dir>.logs`) when tearing down.
    pub keep_logs: AtomicBool,
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

/// The emulator the domains use: ferry-qemu built next to this test's `ferry` binary
/// (the product under test), else QEMU when installed.
pub fn emulator() -> Option<String> {
    let sibling = Path::new(env!("CARGO_BIN_EXE_ferry")).with_file_name("ferry-qemu");
    [
        sibling.display().to_string(),
        "/usr/bin/qemu-system-x86_64".to_owned(),
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
}

/// In CI the environment is set up to run everything: a missing piece is a failure,
/// not a skip.
pub fn skip_or_fail(why: &str) {
    assert!(std::env::var_os("CI").is_none(), "CI cannot skip: {why}");
    eprintln!("SKIP: {why}");
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
            keep_logs: AtomicBool::new(false),
        })
    }

    /// Tears the hosts down once this process has exited, unless they were
    /// torn down (or brought up again by another run) before: for a shared
    /// fixture that no test is left to drop.
    pub fn down_when_this_process_exits(&self) {
        let pid = std::process::id().to_string();
        let owner = self.dir.join("owner");
        std::fs::write(&owner, &pid).expect("write the owner file");
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             [ \"$(cat '{}' 2>/dev/null)\" = {pid} ] && KEEP_LOGS=1 exec '{SCRIPT}' down",
            owner.display()
        );
        let _ = Command::new("setsid")
            .args(["sh", "-c", &script])
            .env("FT", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    /// Starts `args` inside host `h` without waiting for it.
    pub fn spawn(&self, h: &str, args: &[&str]) -> Child {
        Command::new(SCRIPT)
            .arg("sh")
            .arg(h)
            .args(args)
            .env("FT", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("twohosts.sh runs")
    }

    /// A host's /var/log/libvirt, seen from outside.
    pub fn log_dir(&self, h: &str) -> PathBuf {
        self.dir.join("hosts").join(h).join("var-log-libvirt")
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
        let out = self.try_define(h, name, xml);
        assert!(out.status.success(), "define {name}: {}", text(&out));
    }

    /// `virsh define` of `xml` on host `h`, which may fail.
    pub fn try_define(&self, h: &str, name: &str, xml: &str) -> Output {
        let path = self.shared().join(format!("{name}.xml"));
        std::fs::write(&path, xml).expect("write domain xml");
        self.virsh(h, &["define", path.to_str().expect("utf-8 path")])
    }

    pub fn shared(&self) -> PathBuf {
        self.dir.join("shared")
    }

    /// A dir in the shared one that the emulator's user (libvirt-qemu, which
    /// writes pmemsave dumps) may write to.
    pub fn dumps(&self) -> PathBuf {
        self.shared().join("dumps")
    }

    /// Host `h`'s x509 directory for TLS migration (its qemu.conf's
    /// `migrate_tls_x509_cert_dir`): empty until a test puts credentials there.
    pub fn tls_dir(&self, h: &str) -> PathBuf {
        self.dir.join("hosts").join(h).join("migrate-pki")
    }

    /// A host's private /var/lib/libvirt, seen from outside.
    pub fn private_var_lib(&self, h: &str) -> PathBuf {
        self.dir.join("hosts").join(h).join("var-lib-libvirt")
    }

    /// Brings host `h`'s end of the link between the hosts down or up: with
    /// one end down nothing passes either way, and TCP connections over it
    /// stall (they do not break) until it is up again.
    pub fn set_link(&self, h: &str, up: bool) {
        let state = if up { "up" } else { "down" };
        let out = self.sh(h, &["ip", "link", "set", veth(h), state]);
        assert!(
            out.status.success(),
            "ip link set {} {state} on host {h}: {}",
            veth(h),
            text(&out)
        );
    }

    /// Takes host `h`'s end of the link down until [`LinkDown::restore`] (or
    /// the drop of what this returns, also when a test fails).
    pub fn cut_link(&self, h: &'static str) -> LinkDown<'_> {
        self.set_link(h, false);
        LinkDown {
            hosts: self,
            h,
            since: Instant::now(),
            restored: false,
        }
    }

    /// The file that holds host `h`'s network namespace (for `setns`).
    pub fn netns(&self, h: &str) -> PathBuf {
        self.dir.join(format!("ns/{h}.net"))
    }

    /// A bridge `name` in host `h`'s network namespace, up and promiscuous
    /// (its own end, where a test listens, gets every frame, also unicast to
    /// MACs it has not learnt), deleted on drop (also when a test fails).
    pub fn bridge(&self, h: &'static str, name: &'static str) -> Bridge<'_> {
        // A leftover of a killed run would block the add.
        let _ = self.sh(h, &["ip", "link", "del", name]);
        for args in [
            &["ip", "link", "add", name, "type", "bridge"][..],
            &["ip", "link", "set", name, "promisc", "on", "up"],
        ] {
            let out = self.sh(h, args);
            assert!(out.status.success(), "{args:?} on host {h}: {}", text(&out));
        }
        Bridge {
            hosts: self,
            h,
            name,
        }
    }

    /// The pid of host `h`'s libvirtd.
    pub fn libvirtd_pid(&self, h: &str) -> u32 {
        let file = self.dir.join(format!("hosts/{h}/run-libvirt/libvirtd.pid"));
        let pid = std::fs::read_to_string(&file).unwrap_or_default();
        pid.trim()
            .parse()
            .unwrap_or_else(|_| panic!("no libvirtd pid in {}: {pid:?}", file.display()))
    }

    /// The live processes of host `h` (in its network namespace) whose
    /// command line contains `needle`.
    pub fn pids_with(&self, h: &str, needle: &str) -> Vec<u32> {
        use std::os::unix::fs::MetadataExt;
        let ns = std::fs::metadata(self.netns(h))
            .map(|m| format!("net:[{}]", m.ino()))
            .expect("host namespace file");
        let mut pids: Vec<u32> = std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/ns/net"))
                    .is_ok_and(|l| l.to_string_lossy() == ns)
            })
            .filter(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                // Zombies have an empty command line: they are not running.
                String::from_utf8_lossy(&cmd).contains(needle)
            })
            .collect();
        pids.sort_unstable();
        pids
    }

    /// The emulator processes of domain `dom` on host `h` (libvirt names the
    /// guest on the command line: `-name guest=DOM,...`).
    pub fn emulator_pids(&self, h: &str, dom: &str) -> Vec<u32> {
        self.pids_with(h, &format!("guest={dom},"))
    }
}

/// The link between the hosts, held down by [`TwoHosts::cut_link`].
#[derive(Debug)]
pub struct LinkDown<'a> {
    hosts: &'a TwoHosts,
    h: &'static str,
    since: Instant,
    restored: bool,
}

impl LinkDown<'_> {
    /// Brings the link up again; returns how long it was down.
    pub fn restore(mut self) -> Duration {
        self.hosts.set_link(self.h, true);
        self.restored = true;
        self.since.elapsed()
    }
}

impl Drop for LinkDown<'_> {
    fn drop(&mut self) {
        if !self.restored {
            // No assert here: this also runs while a failed test unwinds.
            let _ = self
                .hosts
                .sh(self.h, &["ip", "link", "set", veth(self.h), "up"]);
        }
    }
}

/// A bridge in one host's network namespace, made by [`TwoHosts::bridge`].
#[derive(Debug)]
pub struct Bridge<'a> {
    hosts: &'a TwoHosts,
    pub h: &'static str,
    pub name: &'static str,
}

impl Drop for Bridge<'_> {
    fn drop(&mut self) {
        // No assert here: this also runs while a failed test unwinds.
        let _ = self.hosts.sh(self.h, &["ip", "link", "del", self.name]);
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        let keep = std::thread::panicking() || self.keep_logs.load(Ordering::Relaxed);
        let keep = if keep { "1" } else { "0" };
        let _ = Command::new(SCRIPT)
            .arg("down")
            .env("FT", &self.dir)
            .env("KEEP_LOGS", keep)
            .output();
    }
}
