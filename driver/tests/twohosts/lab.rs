//! The shared test lab: the two hosts, the emulator under test, and what the
//! tests do with the dirtier guest's domains there (start, migrate, heartbeats,
//! the memory oracle, job statistics). Shared by the test binaries that use
//! the two hosts; each one uses a part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ferry_testguest::{check, FileImage, OracleReport};

use super::{text, TwoHosts};

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
/// The dirtier's command line in the fixtures.
pub const CMDLINE: &str = "ws=16M fill=1";

/// The passes a migration of the lab's guests (downtime limit 300 ms) may take
/// before a test calls it non-converging, on any host and under any load: the
/// engine's throttle reaches 99% in at most 20 passes (5 points a pass at
/// least), its dirty limit then halves the vCPUs' time at least every pass
/// (about 6 more down to 0.02%), and at most 5 passes shrink the rest after it
/// fits; with room for the passes a link outage restarts. (A pass that does not
/// converge lasts at least the downtime limit: the count measures the policy,
/// not the machine's speed.)
pub const MAX_PASSES: u64 = 60;

/// The emulator under test and the two hosts its domains run on.
#[derive(Debug)]
pub struct Lab {
    pub hosts: TwoHosts,
    pub emu: String,
}

static LAB: Mutex<Option<Result<Lab, String>>> = Mutex::new(None);
static FINISHED: AtomicUsize = AtomicUsize::new(0);

/// The shared hosts, held by one test at a time.
/// The second field is how many tests of this binary share the hosts: the last
/// one to finish tears them down.
pub struct LabGuard(MutexGuard<'static, Option<Result<Lab, String>>>, usize);

impl Deref for LabGuard {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        match self.0.as_ref() {
            Some(Ok(lab)) => lab,
            _ => unreachable!("a guard is only handed out for hosts that are up"),
        }
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Some(Ok(lab)) = self.0.as_ref() {
            if std::thread::panicking() {
                lab.hosts
                    .keep_logs
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                eprintln!(
                    "libvirt logs of both hosts are kept in {}.logs",
                    lab.hosts.dir.display()
                );
            }
        }
        if FINISHED.fetch_add(1, Ordering::SeqCst) + 1 == self.1 {
            self.0.take(); // TwoHosts::drop tears the hosts down
        }
    }
}

/// The shared hosts, brought up by the first caller of the `tests` tests of
/// this binary (each one calls it once); `None` where this machine cannot run
/// them (outside CI). Each test binary has its own pair of hosts, in its own
/// state dir.
pub fn lab(tests: usize) -> Option<LabGuard> {
    if let Some(why) = super::unavailable() {
        super::skip_or_fail(&why);
        return None;
    }
    let Some(emu) = super::emulator() else {
        super::skip_or_fail(
            "neither ferry-qemu (cargo build --bins) nor qemu-system-x86_64 is there",
        );
        return None;
    };
    let mut g = LAB.lock().unwrap_or_else(PoisonError::into_inner);
    if g.is_none() {
        let dir =
            std::env::temp_dir().join(concat!("ferry-driver-twohosts-", env!("CARGO_CRATE_NAME")));
        let up = TwoHosts::up(&dir, Some(env!("CARGO_BIN_EXE_ferry"))).map(|hosts| {
            hosts.down_when_this_process_exits();
            std::fs::write(
                hosts.shared().join("dirtier.elf"),
                ferry_testguest::DIRTIER_ELF,
            )
            .expect("write the dirtier into the shared dir");
            eprintln!("two libvirt hosts up in {}, emulator {emu}", dir.display());
            Lab { hosts, emu }
        });
        *g = Some(up);
    }
    if let Some(Err(why)) = g.as_ref() {
        let why = why.clone();
        drop(LabGuard(g, tests)); // counts this test as finished
        panic!("{why}");
    }
    Some(LabGuard(g, tests))
}

/// A fixture as a domain of `emulator`: KVM, booting the dirtier from the
/// shared dir directly, its serial port logged to
/// /var/log/libvirt/qemu/NAME-serial.log.
pub fn fixture(name: &str, emulator: &str, shared: &Path) -> String {
    let xml = std::fs::read_to_string(format!("{FIXTURES}/{name}.xml")).expect("fixture");
    let dom = xml
        .split_once("<name>")
        .and_then(|(_, r)| r.split_once("</name>"))
        .map(|(n, _)| n.to_owned())
        .expect("fixture has a <name>");
    for piece in [
        "<domain type='qemu'>",
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>",
        "<boot dev='hd'/>",
        "<serial type='pty'>\n",
    ] {
        assert!(xml.contains(piece), "{name}.xml lacks {piece:?}");
    }
    xml.replacen("<domain type='qemu'>", "<domain type='kvm'>", 1)
        .replace("/usr/bin/qemu-system-x86_64", emulator)
        .replace(
            "<boot dev='hd'/>",
            &format!(
                "<kernel>{}</kernel>\n    <cmdline>{CMDLINE}</cmdline>",
                shared.join("dirtier.elf").display()
            ),
        )
        .replace(
            "<serial type='pty'>\n",
            &format!(
                "<serial type='pty'>\n      \
                 <log file='/var/log/libvirt/qemu/{dom}-serial.log' append='on'/>\n"
            ),
        )
}

/// Completed or current job statistics as virsh prints them: "Total downtime" -> "104 ms".
pub type JobInfo = BTreeMap<String, String>;

pub fn ms(info: &JobInfo, key: &str) -> Option<u64> {
    info.get(key)?.split_whitespace().next()?.parse().ok()
}

impl Lab {
    pub fn shared(&self) -> PathBuf {
        self.hosts.shared()
    }

    /// The base fixture as dirtier domain `name` with `mib` of RAM.
    pub fn dirtier(&self, name: &str, mib: u64, cmdline: &str) -> String {
        self.dirtier_on(&self.emu, name, mib, cmdline)
    }

    /// The base fixture as domain `name` with `mib` of RAM that boots from
    /// its disks through the firmware: `<boot dev='hd'/>`, no `<kernel>`.
    pub fn firmware_domain(&self, name: &str, mib: u64) -> String {
        let xml = self.dirtier(name, mib, CMDLINE);
        let start = xml.find("<kernel>").expect("the fixture boots a kernel");
        let end = xml.find("</cmdline>").expect("with a command line") + "</cmdline>".len();
        format!("{}<boot dev='hd'/>{}", &xml[..start], &xml[end..])
    }

    /// Waits until `dom`'s serial log on `h` shows `needle` after byte `from`.
    pub fn wait_serial_from(&self, h: &str, dom: &str, from: u64, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let log = std::fs::read(self.serial_log(h, dom)).unwrap_or_default();
            if log
                .get(from as usize..)
                .is_some_and(|l| String::from_utf8_lossy(l).contains(needle))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{dom} on {h}: no {needle:?} in its serial log\n{}",
                self.diagnose(dom)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`Lab::dirtier`] on another emulator.
    pub fn dirtier_on(&self, emu: &str, name: &str, mib: u64, cmdline: &str) -> String {
        let xml = fixture("base", emu, &self.shared());
        assert!(xml.contains("<memory unit='MiB'>64</memory>"));
        xml.replace("ferry-base", name)
            .replace(
                "<memory unit='MiB'>64</memory>",
                &format!("<memory unit='MiB'>{mib}</memory>"),
            )
            .replace(CMDLINE, cmdline)
    }

    /// A libvirt URI for host `h`'s daemon from this process (outside the
    /// hosts' namespaces): its unix socket, seen from outside.
    pub fn unix_uri(&self, h: &str) -> String {
        let sock = self
            .hosts
            .dir
            .join(format!("hosts/{h}/run-libvirt/libvirt-sock"));
        format!("qemu+unix:///system?socket={}", sock.display())
    }

    pub fn virsh_ok(&self, h: &str, args: &[&str]) -> String {
        let out = self.hosts.virsh(h, args);
        let t = text(&out);
        assert!(out.status.success(), "virsh {args:?} on host {h}: {t}");
        t
    }

    pub fn serial_log(&self, h: &str, dom: &str) -> PathBuf {
        self.hosts.log_dir(h).join(format!("qemu/{dom}-serial.log"))
    }

    pub fn serial_len(&self, h: &str, dom: &str) -> u64 {
        std::fs::metadata(self.serial_log(h, dom)).map_or(0, |m| m.len())
    }

    /// The emulator's log (command line, stderr) and libvirtd's errors on both
    /// hosts, for failure messages.
    pub fn diagnose(&self, dom: &str) -> String {
        let mut s = String::new();
        for h in ["A", "B"] {
            let log =
                std::fs::read_to_string(self.hosts.log_dir(h).join(format!("qemu/{dom}.log")))
                    .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            s.push_str(&format!(
                "--- host {h}: /var/log/libvirt/qemu/{dom}.log (end)\n"
            ));
            for l in tail.iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
            let daemon = std::fs::read_to_string(self.hosts.log_dir(h).join("libvirtd.log"))
                .unwrap_or_default();
            s.push_str(&format!("--- host {h}: libvirtd.log errors\n"));
            for l in daemon
                .lines()
                .filter(|l| {
                    l.contains(" error : ") && !l.contains("cgroup") && !l.contains("GDBus")
                })
                .rev()
                .take(10)
            {
                s.push_str(&l.chars().take(400).collect::<String>());
                s.push('\n');
            }
        }
        s
    }

    /// Destroys and undefines `dom` on both hosts, whatever its state.
    pub fn forget(&self, dom: &str) {
        for h in ["A", "B"] {
            self.hosts.virsh(h, &["destroy", dom]);
            self.hosts.virsh(h, &["undefine", dom]);
        }
    }

    /// Defines and starts `dom` on `h`; returns once the dirtier is ready.
    pub fn start(&self, h: &str, dom: &str, xml: &str) {
        self.forget(dom);
        self.hosts.define(h, dom, xml);
        let from = self.serial_len(h, dom) as usize;
        let out = self.hosts.virsh(h, &["start", dom]);
        assert!(
            out.status.success(),
            "start {dom}: {}\n{}",
            text(&out),
            self.diagnose(dom)
        );
        self.assert_packaged_defaults(h, dom);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = std::fs::read(self.serial_log(h, dom)).unwrap_or_default();
            if log
                .get(from..)
                .is_some_and(|l| String::from_utf8_lossy(l).contains("dirtier: ready"))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{dom} on {h}: no 'dirtier: ready' in its serial log\n{}",
                self.diagnose(dom)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `dom`'s emulator on `h` runs as libvirt runs it by default: as its
    /// unprivileged user (libvirt-qemu), in a mount namespace of its own
    /// (the private /dev of `namespaces = [ "mount" ]`).
    pub fn assert_packaged_defaults(&self, h: &str, dom: &str) {
        let pids = self.hosts.emulator_pids(h, dom);
        assert!(!pids.is_empty(), "no emulator of {dom} on {h}");
        let mnt = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
        let daemon = mnt(self.hosts.libvirtd_pid(h));
        for pid in pids {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().next())
                .unwrap_or("?");
            assert!(
                uid != "0" && uid != "?",
                "{dom} on {h}: emulator {pid} runs as uid {uid}, not libvirt's user"
            );
            assert_ne!(
                mnt(pid),
                daemon,
                "{dom} on {h}: emulator {pid} shares libvirtd's /dev (namespaces off?)"
            );
        }
    }

    /// The guest's heartbeats go on in `h`'s serial log of `dom`.
    pub fn heartbeats(&self, h: &str, dom: &str) {
        let before = self.serial_len(h, dom);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.serial_len(h, dom) < before + 3 {
            assert!(
                Instant::now() < deadline,
                "{dom} on {h}: no heartbeats in {} (size {before})\n{}",
                self.serial_log(h, dom).display(),
                self.diagnose(dom)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A pmemsave dump of `dom` on `h` (paused for it) judged by the oracle.
    pub fn oracle(&self, h: &str, dom: &str, mib: u64) -> OracleReport {
        self.oracle_then(h, dom, mib, || {})
    }

    /// [`Lab::oracle`], running `paused` while the guest is paused, after the
    /// dump (to take what must match the same moment: its disk). A guest whose
    /// command line says `fill=1` must have finished the fill.
    pub fn oracle_then(&self, h: &str, dom: &str, mib: u64, paused: impl FnOnce()) -> OracleReport {
        let dump = self.hosts.dumps().join(format!("{dom}-{h}.raw"));
        let cmd = format!(
            r#"{{"execute":"pmemsave","arguments":{{"val":0,"size":{},"filename":"{}"}}}}"#,
            mib << 20,
            dump.display()
        );
        self.virsh_ok(h, &["suspend", dom]);
        let saved = self.hosts.virsh(h, &["qemu-monitor-command", dom, &cmd]);
        paused();
        self.virsh_ok(h, &["resume", dom]);
        assert!(
            saved.status.success() && !text(&saved).contains("\"error\""),
            "pmemsave of {dom} on {h}: {}",
            text(&saved)
        );
        let report = check(&FileImage::open(&dump, 0).expect("open the dump"))
            .unwrap_or_else(|e| panic!("oracle on {dom} from host {h}: {e}"));
        let _ = std::fs::remove_file(&dump);
        let filled = self
            .virsh_ok(h, &["dumpxml", dom])
            .lines()
            .any(|l| l.contains("<cmdline>") && l.contains("fill=1"));
        assert!(
            report.fill_done || !filled,
            "{dom} on {h}: fill not done: {report:?}"
        );
        report
    }

    pub fn domstate(&self, h: &str, dom: &str) -> String {
        let out = self.hosts.virsh(h, &["domstate", dom]);
        text(&out).lines().next().unwrap_or("").trim().to_owned()
    }

    pub fn names(&self, h: &str, all: bool) -> Vec<String> {
        let mut args = vec!["list", "--name"];
        if all {
            args.push("--all");
        }
        self.virsh_ok(h, &args)
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// After a migration `from` -> `to`: the guest runs on `to` (heartbeats in
    /// its serial log there, its memory passes the oracle) and no longer on `from`.
    pub fn assert_moved(&self, dom: &str, from: &str, to: &str, mib: u64) -> OracleReport {
        assert_eq!(self.domstate(to, dom), "running", "{}", self.diagnose(dom));
        assert!(
            !self.names(from, false).iter().any(|n| n == dom),
            "{dom} still runs on host {from}"
        );
        self.heartbeats(to, dom);
        self.oracle(to, dom, mib)
    }

    pub fn jobinfo(&self, h: &str, dom: &str, completed: bool) -> JobInfo {
        let mut args = vec!["domjobinfo", dom];
        if completed {
            args.push("--completed");
        }
        parse_jobinfo(&self.virsh_ok(h, &args))
    }

    /// `virsh domjobinfo` of a running outgoing migration of `dom` on `h`, as a
    /// sample; `None` while there is none (not started yet, or over).
    pub fn sample(&self, h: &str, dom: &str) -> Option<Sample> {
        let out = self.hosts.virsh(h, &["domjobinfo", dom]);
        let at = Instant::now();
        if !out.status.success() {
            return None;
        }
        let info = parse_jobinfo(&text(&out));
        if info.get("Operation").map(String::as_str) != Some("Outgoing migration") {
            return None;
        }
        Some(Sample {
            at,
            processed: bytes(&info, "Data processed")?,
            remaining: bytes(&info, "Data remaining")?,
            iteration: info
                .get("Iteration")
                .and_then(|i| i.parse().ok())
                .unwrap_or(0),
        })
    }

    /// After a refused migration: `dom` still runs on `h` and on no other host,
    /// its heartbeats go on and its memory passes the oracle.
    pub fn assert_unharmed(&self, h: &str, dom: &str, mib: u64) {
        assert_eq!(self.domstate(h, dom), "running", "{}", self.diagnose(dom));
        let other = if h == "A" { "B" } else { "A" };
        assert!(
            !self.names(other, true).iter().any(|n| n == dom),
            "{dom} reached host {other} although its migration was refused"
        );
        self.heartbeats(h, dom);
        self.oracle(h, dom, mib);
    }

    /// `virsh migrate --live ARGS DOM DEST` run on `h`; returns its wall time.
    pub fn migrate(&self, h: &str, dom: &str, dest: &str, extra: &[&str]) -> Duration {
        let t0 = Instant::now();
        let out = self.hosts.sh(h, &migrate_args(dom, dest, extra));
        let wall = t0.elapsed();
        assert!(
            out.status.success(),
            "virsh migrate {extra:?} {dom} {dest} on host {h}: {}\n{}",
            text(&out),
            self.diagnose(dom)
        );
        wall
    }

    /// `virsh migrate --live ARGS DOM DEST` started on `h`, not waited for.
    pub fn migrate_spawn(&self, h: &str, dom: &str, dest: &str, extra: &[&str]) -> Child {
        self.hosts.spawn(h, &migrate_args(dom, dest, extra))
    }

    /// Waits up to `secs` for a `domjobinfo` reading of the outgoing
    /// migration of `dom` on `h` that `ok` accepts, while `child` (its
    /// `virsh migrate`) runs; panics naming `what` when none comes.
    pub fn wait_sample(
        &self,
        h: &str,
        dom: &str,
        child: &mut Child,
        secs: u64,
        what: &str,
        ok: impl Fn(&Sample) -> bool,
    ) -> Sample {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut last = None;
        loop {
            if let Some(s) = self.sample(h, dom) {
                if ok(&s) {
                    return s;
                }
                last = Some(s);
            }
            assert!(
                child.try_wait().expect("try_wait").is_none(),
                "the migration of {dom} ended before {what} (last reading {last:?})\n{}",
                self.diagnose(dom)
            );
            assert!(
                Instant::now() < deadline,
                "no {what} in {secs} s (last reading {last:?})\n{}",
                self.diagnose(dom)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for `child` (a `virsh migrate` of `dom` from `h`) to end, as long
    /// as the migration keeps its promise: it ends within `max_passes` passes
    /// (the engine's dirty limit bounds them whatever the host and its load),
    /// and data keeps moving (no reading of `domjobinfo` changes for
    /// `STALLED`: a hung job). Panics otherwise, after aborting the job.
    pub fn wait_migration_end(
        &self,
        h: &str,
        dom: &str,
        mut child: Child,
        max_passes: u64,
    ) -> (std::process::Output, Duration) {
        const STALLED: Duration = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut last: Option<Sample> = None;
        let mut moved_at = Instant::now();
        while child.try_wait().expect("try_wait").is_none() {
            let failure = match self.sample(h, dom) {
                Some(s) if s.iteration > max_passes => Some(format!(
                    "the migration of {dom} did not end in {max_passes} passes: {s:?}"
                )),
                Some(s) => {
                    if last.as_ref().is_none_or(|l| {
                        (l.processed, l.remaining, l.iteration)
                            != (s.processed, s.remaining, s.iteration)
                    }) {
                        moved_at = Instant::now();
                        last = Some(s);
                    }
                    None
                }
                None => None,
            };
            let failure = failure.or_else(|| {
                (moved_at.elapsed() > STALLED).then(|| {
                    format!(
                        "the migration of {dom} made no progress for {} s (last reading \
                         {last:?})",
                        STALLED.as_secs()
                    )
                })
            });
            if let Some(why) = failure {
                let diagnosis = self.diagnose(dom);
                // The job would go on in libvirtd and disturb the tests after this one.
                self.hosts.virsh(h, &["domjobabort", dom]);
                let _ = child.kill();
                panic!("{why}\n{diagnosis}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = child.wait_with_output().expect("virsh migrate output");
        (out, t0.elapsed())
    }

    /// `dom` runs on `h` and only there: running in libvirt's view with one
    /// emulator process, and on the other host no running domain of that
    /// name and no emulator process for it.
    pub fn assert_runs_only_on(&self, h: &str, dom: &str) {
        let other = if h == "A" { "B" } else { "A" };
        assert_eq!(self.domstate(h, dom), "running", "{}", self.diagnose(dom));
        assert_eq!(
            self.hosts.emulator_pids(h, dom).len(),
            1,
            "{dom} on host {h}: not one emulator process\n{}",
            self.diagnose(dom)
        );
        assert!(
            !self.names(other, false).iter().any(|n| n == dom),
            "{dom} also runs on host {other}\n{}",
            self.diagnose(dom)
        );
        let left = self.hosts.emulator_pids(other, dom);
        assert!(
            left.is_empty(),
            "{dom}: emulator processes {left:?} left on host {other}\n{}",
            self.diagnose(dom)
        );
    }

    /// Waits up to `secs` until host `h` has no trace of `dom`: not defined,
    /// no emulator process. Returns how long that took.
    pub fn wait_gone(&self, h: &str, dom: &str, secs: u64) -> Duration {
        let t0 = Instant::now();
        loop {
            let defined = self.names(h, true).iter().any(|n| n == dom);
            let pids = self.hosts.emulator_pids(h, dom);
            if !defined && pids.is_empty() {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(secs),
                "{dom} still on host {h} after {secs} s (defined: {defined}, emulator \
                 processes {pids:?})\n{}",
                self.diagnose(dom)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The length of `h`'s libvirtd.log, to read what it logs from here on
    /// with [`Lab::daemon_log_since`].
    pub fn daemon_log_len(&self, h: &str) -> u64 {
        std::fs::metadata(self.hosts.log_dir(h).join("libvirtd.log")).map_or(0, |m| m.len())
    }

    /// `h`'s libvirtd.log from byte `from` on.
    pub fn daemon_log_since(&self, h: &str, from: u64) -> String {
        let log = std::fs::read(self.hosts.log_dir(h).join("libvirtd.log")).unwrap_or_default();
        String::from_utf8_lossy(log.get(from as usize..).unwrap_or_default()).into_owned()
    }
}

/// The arguments of `virsh migrate --live EXTRA DOM DEST` (at most 4 minutes).
fn migrate_args<'a>(dom: &'a str, dest: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "timeout",
        "240",
        "virsh",
        "-c",
        "qemu:///system",
        "migrate",
        "--live",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[dom, dest]);
    args
}

pub fn parse_jobinfo(t: &str) -> JobInfo {
    t.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// A size or rate as virsh prints it ("12.345 MiB", "8.000 MiB/s") in bytes
/// (per second).
pub fn bytes(info: &JobInfo, key: &str) -> Option<u64> {
    let mut it = info.get(key)?.split_whitespace();
    let n: f64 = it.next()?.parse().ok()?;
    let unit: u64 = match it.next().unwrap_or("B").trim_end_matches("/s") {
        "B" | "bytes" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    Some((n * unit as f64) as u64)
}

/// One `virsh domjobinfo` reading of a running migration.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    pub processed: u64,
    pub remaining: u64,
    /// The pass ("Iteration"), 0 before the first dirty sync.
    pub iteration: u64,
}

/// MiB/s moved between two samples.
pub fn rate(a: &Sample, b: &Sample) -> f64 {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    b.processed.saturating_sub(a.processed) as f64 / (1u64 << 20) as f64 / secs.max(1e-3)
}
