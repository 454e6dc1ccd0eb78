//! End-to-end harness: start real `ferry-vm` processes on /dev/kvm, talk to their control
//! sockets, watch the serial heartbeats of the test guest, and let the memory oracle
//! judge the guest's RAM.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod bootbench;
pub mod diskbench;
pub mod heartbeat;
pub mod migrate;
pub mod pki;
pub mod proxy;

/// Path of a binary of this workspace, built in the same profile as the tests.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // Tests live in target/<profile>/deps/, binaries in target/<profile>/.
    let mut dir = exe.parent().expect("executable has a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// Fails loudly when /dev/kvm is missing, so KVM tests cannot pass by skipping.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests need KVM"
    );
}

/// A scratch directory with the dirtier image written into it.
#[derive(Debug)]
pub struct Scratch {
    pub dir: tempfile::TempDir,
    pub dirtier: PathBuf,
}

impl Scratch {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let dirtier = dir.path().join("dirtier.elf");
        std::fs::write(&dirtier, ferry_testguest::DIRTIER_ELF).expect("write dirtier");
        Self { dir, dirtier }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// A running `ferry-vm` with a control socket and its serial output in a file.
#[derive(Debug)]
pub struct VmProcess {
    pub child: Child,
    pub control: PathBuf,
    pub serial: PathBuf,
    pub stderr: PathBuf,
    /// Guest RAM as its `-m` gave it (ferry-vm's default when none did): a
    /// migration destination must be started with the same.
    pub mem: String,
}

impl VmProcess {
    /// Starts `ferry-vm` with `args` (a subcommand and its options); adds --control,
    /// --serial file: and captures stderr.
    pub fn start(scratch: &Scratch, tag: &str, args: &[&str]) -> Self {
        let mut vm = Self::spawn(scratch, tag, args);
        vm.wait_for_control();
        vm
    }

    /// Like `start`, without waiting for the control socket (an incoming migration
    /// opens it only once the VM has arrived).
    pub fn spawn(scratch: &Scratch, tag: &str, args: &[&str]) -> Self {
        let serial = scratch.path(&format!("{tag}.serial"));
        Self::spawn_serial(scratch, tag, args, &format!("file:{}", serial.display()))
    }

    /// Like `spawn`, with COM1 going to `serial_spec` (e.g. `unix:PATH` to time heartbeats).
    pub fn spawn_serial(scratch: &Scratch, tag: &str, args: &[&str], serial_spec: &str) -> Self {
        let control = scratch.path(&format!("{tag}.ctl"));
        let serial = scratch.path(&format!("{tag}.serial"));
        let stderr = scratch.path(&format!("{tag}.stderr"));
        let mut cmd = Command::new(bin("ferry-vm"));
        cmd.args(args)
            .arg("--control")
            .arg(&control)
            .arg("--serial")
            .arg(serial_spec)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        let child = cmd.spawn().expect("spawn ferry-vm");
        let mem = args
            .windows(2)
            .find(|w| w[0] == "-m" || w[0] == "--mem")
            .map_or("256M", |w| w[1])
            .to_string();
        Self {
            child,
            control,
            serial,
            stderr,
            mem,
        }
    }

    /// Waits until the control socket exists.
    pub fn wait_for_control(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.control.exists() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "ferry-vm exited early ({status}): {}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "ferry-vm control socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until a `ferry-vm incoming` on a socket listens (its "listening
    /// on" line): a source may connect from then on.
    pub fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.stderr_text().contains("ferry-vm: listening on ") {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "ferry-vm exited before it listened ({status}): {}",
                    self.stderr_text()
                );
            }
            assert!(Instant::now() < deadline, "ferry-vm never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends one control command and returns the JSON reply.
    pub fn command(&self, line: &str) -> serde_json::Value {
        control_command(&self.control, line)
    }

    /// Sends one control command on its own connection in a thread (a
    /// `migrate` that answers only when it ends); join it for the reply.
    pub fn command_in_thread(&self, line: &str) -> std::thread::JoinHandle<serde_json::Value> {
        let (control, line) = (self.control.clone(), line.to_string());
        std::thread::spawn(move || control_command(&control, &line))
    }

    /// Like `command`, but the reply must say ok.
    pub fn ok(&self, line: &str) -> serde_json::Value {
        let v = self.command(line);
        assert_eq!(v["ok"], true, "{line}: {v}");
        v
    }

    /// Bytes of serial output so far.
    pub fn serial_output(&self) -> Vec<u8> {
        std::fs::read(&self.serial).unwrap_or_default()
    }

    /// Waits until the serial output contains `needle`.
    pub fn wait_serial(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.serial_output();
            if String::from_utf8_lossy(&out).contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "serial output never showed {needle:?}; got {:?}; stderr: {}",
                String::from_utf8_lossy(&out[out.len().saturating_sub(300)..]),
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until `n` more heartbeat bytes than now have arrived; returns the time taken.
    pub fn wait_heartbeats(&self, n: usize, timeout: Duration) -> Duration {
        let start = Instant::now();
        let count = |out: &[u8]| out.iter().filter(|&&b| b == b'.').count();
        let base = count(&self.serial_output());
        loop {
            if count(&self.serial_output()) >= base + n {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "no {n} heartbeats within {timeout:?}; stderr: {}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends `quit` and waits for the process to exit successfully.
    pub fn quit(mut self) {
        self.ok("quit");
        let status = self.child.wait().expect("wait ferry-vm");
        assert!(status.success(), "ferry-vm exited with {status}");
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the memory oracle on a raw memory image (file offset == guest physical address).
pub fn oracle(image: &Path) -> ferry_testguest::OracleReport {
    let mem = ferry_testguest::FileImage::open(image, 0).expect("open memory image");
    ferry_testguest::check(&mem).unwrap_or_else(|e| panic!("memory oracle failed: {e}"))
}

impl VmProcess {
    /// Standard error so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "ferry-vm did not exit; stderr: {}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Pauses the VM, dumps its RAM and runs the oracle on it (the VM stays paused).
    pub fn oracle(&self, scratch: &Scratch, tag: &str) -> ferry_testguest::OracleReport {
        let image = scratch.path(&format!("{tag}.img"));
        self.ok("pause");
        self.ok(&format!("dump {}", image.display()));
        let report = oracle(&image);
        let _ = std::fs::remove_file(&image);
        report
    }
}

/// Boots the dirtier with `ferry-vm run -m MEM --append APPEND EXTRA...` (tag
/// `src`) and waits until it is ready and beating.
pub fn dirtier_source(scratch: &Scratch, mem: &str, append: &str, extra: &[&str]) -> VmProcess {
    let boot = Duration::from_secs(30);
    let dirtier = scratch.dirtier.display().to_string();
    let mut args = vec!["run", "--kernel", &dirtier, "-m", mem, "--append", append];
    args.extend(extra);
    let vm = VmProcess::start(scratch, "src", &args);
    vm.wait_serial("dirtier: ready", boot);
    vm.wait_heartbeats(200, boot);
    vm
}

/// Migrates `src` to `dst` (a `ferry-vm incoming` listening on `uri`): the
/// migration must complete, the source exit 0, and the guest beat on the
/// destination with its memory passing the oracle. Returns the statistics.
pub fn complete_migration(
    scratch: &Scratch,
    src: VmProcess,
    dst: VmProcess,
    uri: &str,
) -> serde_json::Value {
    let reply = src.ok(&format!("migrate {uri}"));
    check_completed(scratch, src, dst, &reply)
}

/// After `migrate`'s `reply`: it says completed, the source exits 0, and the
/// guest beats on the destination with its memory passing the oracle.
/// Returns the statistics.
pub fn check_completed(
    scratch: &Scratch,
    mut src: VmProcess,
    mut dst: VmProcess,
    reply: &serde_json::Value,
) -> serde_json::Value {
    let stats = reply["migration"].clone();
    assert_eq!(stats["status"], "completed", "{stats}");
    assert_eq!(
        src.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        src.stderr_text()
    );
    dst.wait_for_control();
    dst.wait_heartbeats(50, Duration::from_secs(10));
    let report = dst.oracle(scratch, "dst");
    assert!(
        report.working_set_pages == 0 || report.passes + report.cursor > 0,
        "{report:?}"
    );
    dst.quit();
    stats
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Sends `line` on a new connection to the control socket at `control` and
/// returns the JSON reply.
fn control_command(control: &Path, line: &str) -> serde_json::Value {
    // The socket file appears at bind(), an instant before listen(): retry refusals.
    let mut tries = 0;
    let mut s = loop {
        match UnixStream::connect(control) {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("connect control socket {}: {e}", control.display()),
        }
    };
    // No command (a whole migration included) may hang a test.
    s.set_read_timeout(Some(Duration::from_secs(300)))
        .expect("set timeout");
    writeln!(s, "{line}").expect("send command");
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).expect("read reply");
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("bad reply {reply:?}: {e}"))
}

/// Runs a VMM for a benchmark: `cmd` with its stderr to `stderr`, watching its
/// guest's serial output in the file `serial` until each of `marks` has
/// appeared in it. Returns the spawn time and when each mark first appeared.
/// Fails when the guest prints `ERR`, the VMM exits, or `timeout` passes
/// (`name` and `what` word the error: "NAME never WHAT"). The VMM is killed
/// however this ends.
pub fn time_serial_marks(
    cmd: &mut Command,
    name: &str,
    serial: &Path,
    stderr: &Path,
    marks: &[&str],
    timeout: Duration,
    what: &str,
) -> Result<(Instant, Vec<Instant>), String> {
    /// Kills the VMM when the run ends, however it ends.
    struct Running(Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("start {name}: {e}"))?;
    let mut vm = Running(child);
    let mut at = vec![None::<Instant>; marks.len()];
    let deadline = start + timeout;
    while at.iter().any(Option::is_none) {
        let text = String::from_utf8_lossy(&std::fs::read(serial).unwrap_or_default()).into_owned();
        if text.contains("ERR") {
            // Heartbeat dots left out.
            return Err(format!("the guest failed: {}", text.replace('.', "")));
        }
        for (i, mark) in marks.iter().enumerate() {
            if at[i].is_none() && text.contains(mark) {
                at[i] = Some(Instant::now());
            }
        }
        if let Ok(Some(status)) = vm.0.try_wait() {
            return Err(format!(
                "{name} exited ({status}): {}",
                std::fs::read_to_string(stderr).unwrap_or_default()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!("{name} never {what}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(vm);
    Ok((start, at.into_iter().flatten().collect()))
}
