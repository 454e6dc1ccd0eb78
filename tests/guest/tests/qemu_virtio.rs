//! The dirtier's virtio drivers against QEMU's devices: boots the guest under
//! `qemu-system-x86_64 -M pc -accel kvm` with `blk=8 net=1`, a virtio-blk
//! disk and a virtio-net card on a tap device this test creates (root),
//! pings the guest through the tap, then stops QEMU, saves guest memory and
//! runs the memory oracle and the disk oracle; once as it is, once after a
//! QEMU-to-QEMU live migration (same disk file, the destination on a second
//! tap, as if on another host).
//!
//! Also boots the dirtier from a disk through SeaBIOS (`-bios`, no
//! `-kernel`): the boot loader of [`ferry_testguest::bootdisk`] on an IDE,
//! a virtio-blk (transitional) and a modern-only virtio-blk disk, then the
//! memory oracle. And `virsh shutdown` from an IDE boot disk: QMP
//! `system_powerdown` powers the dirtier off with `acpi=1` (the `SHUTDOWN`
//! event says `guest`, QEMU exits 0) and is ignored without it.
//!
//! Skips (and says why) only when QEMU, `/dev/kvm` or SeaBIOS is missing.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

use ferry_testguest::bootdisk::{boot_disk, boot_image, cmdline_lba, SECTOR};
use ferry_testguest::disk::{check_disk, DiskReport};
use ferry_testguest::link::{Link, Tap};
use ferry_testguest::{check, FileImage, OracleReport, PhysMem, DIRTIER_ELF};

const BLK_SECTORS: u64 = 8;
const DISK_BYTES: u64 = 1 << 20;
const MEM_MIB: u64 = 128;

fn qemu_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("qemu-system-x86_64"))
        .find(|candidate| candidate.is_file())
}

/// QEMU, killed on drop unless it already exited.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn serial_text(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// Waits until the serial log contains `want`; panics on a guest error line.
fn wait_serial(path: &Path, want: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = serial_text(path);
        if let Some(line) = text
            .lines()
            .find(|l| l.contains(": ERR ") || l.starts_with("EXC "))
        {
            panic!("guest failed: {line:?}; serial:\n{text}");
        }
        if text.contains(want) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {want:?} on the guest's serial within {timeout:?}; serial:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A minimal QMP client: one command at a time; events are kept in
/// `events`, in the order they came.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<serde_json::Value>,
}

impl Qmp {
    fn connect(path: &Path) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot connect to QMP at {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("set a QMP read timeout");
        let mut qmp = Self {
            reader: BufReader::new(stream.try_clone().expect("clone the QMP socket")),
            writer: stream,
            events: Vec::new(),
        };
        qmp.reply(); // greeting
        qmp.execute("qmp_capabilities", serde_json::json!({}));
        qmp
    }

    fn reply(&mut self) -> serde_json::Value {
        loop {
            let value = self.message();
            if value.get("event").is_none() {
                return value;
            }
            self.events.push(value);
        }
    }

    /// The next message, reply or event.
    fn message(&mut self) -> serde_json::Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read from QMP");
        assert!(n > 0, "QMP closed the connection");
        serde_json::from_str(&line).expect("QMP sends JSON")
    }

    /// Waits for the event `name` (perhaps already received) until
    /// `deadline`; returns it.
    fn wait_event(&mut self, name: &str, deadline: Instant) -> serde_json::Value {
        loop {
            if let Some(event) = self.events.iter().find(|e| e["event"] == name) {
                return event.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no QMP {name} event in time: {:?}",
                self.events
            );
            self.writer
                .set_read_timeout(Some(left))
                .expect("set a QMP read timeout");
            let value = self.message();
            assert!(
                value.get("event").is_some(),
                "a QMP reply with no command: {value}"
            );
            self.events.push(value);
        }
    }

    fn execute(&mut self, command: &str, arguments: serde_json::Value) -> serde_json::Value {
        let request = serde_json::json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{request}").expect("write to QMP");
        let reply = self.reply();
        assert!(
            reply.get("return").is_some(),
            "QMP {command} failed: {reply}"
        );
        reply
    }
}

/// A temporary directory with the guest ELF and a blank disk.
struct Setup {
    qemu: PathBuf,
    dir: TempDir,
    elf: PathBuf,
    disk: PathBuf,
}

fn setup() -> Option<Setup> {
    let Some(qemu) = qemu_binary() else {
        eprintln!("skipped: qemu-system-x86_64 is not on PATH");
        return None;
    };
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is missing");
        return None;
    }
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let elf = dir.path().join("dirtier.elf");
    let disk = dir.path().join("disk.img");
    std::fs::write(&elf, DIRTIER_ELF).expect("write the guest");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(DISK_BYTES))
        .expect("create the disk");
    Some(Setup {
        qemu,
        dir,
        elf,
        disk,
    })
}

fn tap_name(index: u32) -> String {
    Tap::unique_name("ferrytg", index)
}

/// A running QEMU with the dirtier (blk=8 net=1) and its files.
struct Guest {
    vm: Qemu,
    serial: PathBuf,
    qmp: PathBuf,
}

fn start(setup: &Setup, name: &str, tap: &Tap, incoming: Option<&Path>) -> Guest {
    let serial = setup.dir.path().join(format!("{name}.serial"));
    let qmp = setup.dir.path().join(format!("{name}.qmp"));
    let stderr = std::fs::File::create(setup.dir.path().join(format!("{name}.stderr")))
        .expect("create a log");
    let mut command = Command::new(&setup.qemu);
    command
        .args(["-M", "pc", "-accel", "kvm", "-m"])
        .arg(MEM_MIB.to_string())
        .args(["-nodefaults", "-display", "none"])
        .args(["-monitor", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&setup.elf)
        .arg("-append")
        .arg(format!("ws=1M hb=100 pause=5 blk={BLK_SECTORS} net=1"))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=d0",
            setup.disk.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d0,disable-legacy=on"])
        .arg("-netdev")
        .arg(format!(
            "tap,id=n0,ifname={},script=no,downscript=no",
            tap.name
        ))
        .args([
            "-device",
            "virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:12:34:56",
        ])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    if let Some(path) = incoming {
        command
            .arg("-incoming")
            .arg(format!("unix:{}", path.display()));
    }
    Guest {
        vm: Qemu(command.spawn().expect("start QEMU")),
        serial,
        qmp,
    }
}

/// Waits for the boot lines of a freshly booted guest.
fn wait_boot(guest: &mut Guest, stderr: &Path) {
    let deadline = Instant::now() + Duration::from_secs(40);
    let text = loop {
        if let Ok(Some(status)) = guest.vm.0.try_wait() {
            panic!(
                "QEMU exited ({status}) before the guest was ready: {}",
                String::from_utf8_lossy(&std::fs::read(stderr).unwrap_or_default())
            );
        }
        let text = wait_serial(&guest.serial, "", Duration::ZERO);
        if text.contains("dirtier: ready") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no \"dirtier: ready\" on the guest's serial within 40 s; serial:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        text.contains(&format!("blk: capacity={}\n", DISK_BYTES / 512)),
        "{text}"
    );
    assert!(text.contains("net: mac=52:54:00:12:34:56\n"), "{text}");
}

/// Stops the guest, saves its memory, quits QEMU; then both oracles, and
/// the FERRYNET frames seen must fit the pass count.
fn stop_and_check(setup: &Setup, mut guest: Guest, link: &mut Link) -> (OracleReport, DiskReport) {
    let memory = setup.dir.path().join("memory.img");
    let mut qmp = Qmp::connect(&guest.qmp);
    qmp.execute("stop", serde_json::json!({}));
    qmp.execute(
        "pmemsave",
        serde_json::json!({ "val": 0, "size": MEM_MIB << 20, "filename": memory }),
    );
    qmp.execute("quit", serde_json::json!({}));
    let _ = guest.vm.0.wait();
    link.drain();
    // No error line while it ran.
    wait_serial(&guest.serial, "", Duration::ZERO);

    let image = FileImage::open(&memory, 0).expect("open the memory image");
    let report = check(&image).unwrap_or_else(|e| panic!("memory oracle: {e}"));
    let disk = std::fs::read(&setup.disk).expect("read the disk");
    let disk_report = check_disk(&disk, BLK_SECTORS, report.passes)
        .unwrap_or_else(|e| panic!("disk oracle (header passes {}): {e}", report.passes));
    let last = *link.passes.last().expect("FERRYNET frames were seen");
    assert!(
        last <= report.passes + 1,
        "header passes {}, but a FERRYNET frame for pass {last}",
        report.passes
    );
    (report, disk_report)
}

const PINGS: [u64; 4] = [0xfe00_0000_0000_0000, 1, 2, u64::MAX];

#[test]
fn dirtier_drives_virtio_blk_and_net_under_qemu() {
    let Some(setup) = setup() else { return };
    let started = Instant::now();
    let tap = Tap::create(tap_name(0));
    let mut link = Link::new(&tap);
    let mut guest = start(&setup, "vm", &tap, None);
    wait_boot(&mut guest, &setup.dir.path().join("vm.stderr"));
    let booted = started.elapsed();
    // Until the disk has wrapped a few times; then pings.
    link.wait_pass(3 * BLK_SECTORS, &guest.serial);
    link.ping(&PINGS);
    let (report, disk) = stop_and_check(&setup, guest, &mut link);
    eprintln!(
        "booted in {booted:.1?}; {} passes, {} FERRYNET frames seen, {} disk records \
         (next pass's written: {}) after {:.1?}",
        report.passes,
        link.passes.len(),
        disk.records,
        disk.ahead,
        started.elapsed(),
    );
}

#[test]
fn dirtier_virtio_survives_qemu_live_migration() {
    let Some(setup) = setup() else { return };
    let started = Instant::now();
    let (tap_src, tap_dst) = (Tap::create(tap_name(1)), Tap::create(tap_name(2)));
    let (mut src_link, mut dst_link) = (Link::new(&tap_src), Link::new(&tap_dst));
    let mut src = start(&setup, "src", &tap_src, None);
    wait_boot(&mut src, &setup.dir.path().join("src.stderr"));
    src_link.wait_pass(2 * BLK_SECTORS, &src.serial);
    src_link.ping(&PINGS[..2]);

    let channel = setup.dir.path().join("migration.sock");
    let dst = start(&setup, "dst", &tap_dst, Some(&channel));
    let mut dst_qmp = Qmp::connect(&dst.qmp);
    let mut src_qmp = Qmp::connect(&src.qmp);
    src_qmp.execute(
        "migrate",
        serde_json::json!({ "uri": format!("unix:{}", channel.display()) }),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = src_qmp.execute("query-migrate", serde_json::json!({}));
        match status["return"]["status"].as_str() {
            Some("completed") => break,
            Some("failed" | "cancelled") => panic!("migration failed: {status}"),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "migration not done in 30 s: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The source says "completed" before the destination has loaded the state.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = dst_qmp.execute("query-status", serde_json::json!({}));
        if status["return"]["running"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "destination not running 10 s after the migration: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    src_qmp.execute("quit", serde_json::json!({}));
    let _ = src.vm.0.wait();
    src_link.drain();
    drop(dst_qmp);
    let last_src = *src_link.passes.last().expect("frames from the source");

    // The destination carries on: later passes, on its own tap, and pings.
    dst_link.wait_pass(last_src + 2 * BLK_SECTORS, &dst.serial);
    dst_link.ping(&PINGS[2..]);
    let first_dst = *dst_link
        .passes
        .first()
        .expect("frames from the destination");
    let (report, disk) = stop_and_check(&setup, dst, &mut dst_link);
    // Every pass sent its frame, on one tap or the other.
    let last = *dst_link.passes.last().expect("frames from the destination");
    let missing: Vec<u64> = (1..=last)
        .filter(|p| !src_link.passes.contains(p) && !dst_link.passes.contains(p))
        .collect();
    assert!(
        missing.is_empty(),
        "no FERRYNET frame for passes {missing:?} (source's last {last_src}, destination's \
         first {first_dst})"
    );
    // The destination's serial has no boot lines: the guest did not restart.
    let text = serial_text(&setup.dir.path().join("dst.serial"));
    assert!(!text.contains("dirtier:"), "{text}");
    eprintln!(
        "source passes up to {last_src}, destination from {first_dst} to {}; {} disk records \
         (next pass's written: {}) after {:.1?}",
        report.passes,
        disk.records,
        disk.ahead,
        started.elapsed(),
    );
}

/// Debian's SeaBIOS, as QEMU's `-M pc` uses it.
const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";
/// Boot through SeaBIOS on a loaded 2-core host: SeaBIOS alone takes ~6 s.
const FIRMWARE_BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Heartbeats (`hb=100`) to see after `dirtier: ready` before the oracle.
const BEATS_AFTER_READY: usize = 5;

/// The guest's serial output as QEMU writes it to its stdout, each chunk
/// with the moment it arrived.
struct Serial {
    chunks: mpsc::Receiver<(Instant, Vec<u8>)>,
    text: String,
    first_byte: Option<Instant>,
}

impl Serial {
    fn new(mut out: impl Read + Send + 'static) -> Self {
        let (send, chunks) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = out.read(&mut buf) {
                if send.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        });
        Self {
            chunks,
            text: String::new(),
            first_byte: None,
        }
    }

    /// Reads until `done(text)` holds; panics on a guest error line, when
    /// QEMU closes the serial, or at `deadline`.
    fn wait(&mut self, what: &str, deadline: Instant, done: impl Fn(&str) -> bool) {
        self.read_until(what, deadline, |text| {
            let mut lines = text.split_inclusive('\n').filter(|l| l.ends_with('\n'));
            if let Some(line) = lines.find(|l| l.contains(": ERR ") || l.starts_with("EXC ")) {
                panic!("guest failed: {line:?}; serial:\n{text}");
            }
            done(text)
        });
    }

    /// Reads until `done(text)` holds; panics when QEMU closes the serial
    /// or at `deadline`.
    fn read_until(&mut self, what: &str, deadline: Instant, done: impl Fn(&str) -> bool) {
        while !done(&self.text) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok((at, bytes)) => {
                    self.first_byte.get_or_insert(at);
                    self.text.push_str(&String::from_utf8_lossy(&bytes));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "no {what} on the guest's serial in time; serial:\n{}",
                        self.text
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "QEMU closed the serial before {what}; serial:\n{}",
                        self.text
                    )
                }
            }
        }
    }
}

/// QEMU running SeaBIOS with one disk, its serial on a pipe.
struct Firmware {
    vm: Qemu,
    serial: Serial,
    qmp: PathBuf,
    started: Instant,
}

/// Starts QEMU `-M pc` with SeaBIOS and the disk image at `image` (`drive`
/// names it: `drive[0]` follows `file=...,format=raw,`, the rest are more
/// arguments).
fn start_firmware(setup: &Setup, name: &str, image: &Path, drive: &[&str]) -> Firmware {
    let qmp = setup.dir.path().join(format!("{name}.qmp"));
    let stderr = std::fs::File::create(setup.dir.path().join(format!("{name}.stderr")))
        .expect("create a log");
    let mut drive_args = vec![
        "-drive".to_owned(),
        format!("file={},format=raw,{}", image.display(), drive[0]),
    ];
    drive_args.extend(drive[1..].iter().map(|arg| (*arg).to_owned()));
    let started = Instant::now();
    let mut vm = Qemu(
        Command::new(&setup.qemu)
            .args(["-M", "pc", "-accel", "kvm", "-m"])
            .arg(MEM_MIB.to_string())
            .args(["-nodefaults", "-display", "none"])
            .args(["-monitor", "none", "-no-reboot"])
            .args(["-bios", SEABIOS])
            .args(&drive_args)
            .args(["-serial", "stdio"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start QEMU"),
    );
    let serial = Serial::new(vm.0.stdout.take().expect("QEMU's stdout is piped"));
    Firmware {
        vm,
        serial,
        qmp,
        started,
    }
}

fn seabios_setup() -> Option<Setup> {
    let setup = setup()?;
    if !Path::new(SEABIOS).is_file() {
        eprintln!("skipped: {SEABIOS} is missing (apt-get install seabios)");
        return None;
    }
    Some(setup)
}

/// Boots the dirtier from a boot disk through SeaBIOS, waits for its
/// heartbeats, then saves memory and runs the oracle.
fn boot_through_seabios(name: &str, drive: &[&str]) {
    boot_through_seabios_reading(name, drive, 0);
}

/// Offset of the loader's "sectors to read after sector 0" (u32), in its
/// parameter block (see `bootdisk`).
const LOADER_SECTORS_PARAM: usize = 0x19c;

/// [`boot_through_seabios`], with `extra` sectors of a pattern (u64 words
/// `lba << 32 | word index`) after the payload for the loader to read as
/// well. The loader leaves what it read in low memory from 0x7e00 up,
/// where the dirtier never writes: the memory image must hold every sector
/// read from the command line on, in its place.
fn boot_through_seabios_reading(name: &str, drive: &[&str], extra: u32) {
    let Some(setup) = seabios_setup() else { return };
    let image = setup.dir.path().join(format!("{name}.img"));
    let mut bytes =
        boot_image(DIRTIER_ELF, "ws=1M hb=100 pause=5 fill=1", None).expect("build the boot disk");
    let param = LOADER_SECTORS_PARAM..LOADER_SECTORS_PARAM + 4;
    let after_0 = u32::from_le_bytes(bytes[param.clone()].try_into().expect("4 bytes"));
    for lba in after_0 + 1..after_0 + 1 + extra {
        let sector = &mut bytes[lba as usize * SECTOR..][..SECTOR];
        for (k, word) in sector.chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&(u64::from(lba) << 32 | k as u64).to_le_bytes());
        }
    }
    let read = (after_0 + extra) as usize * SECTOR;
    bytes[param].copy_from_slice(&(after_0 + extra).to_le_bytes());
    std::fs::write(&image, &bytes).expect("write the boot disk");
    let Firmware {
        mut vm,
        mut serial,
        qmp,
        started,
    } = start_firmware(&setup, name, &image, drive);
    let deadline = started + FIRMWARE_BOOT_TIMEOUT;
    let ready_line = "dirtier: ready\n";
    serial.wait("first line", deadline, |text| text.contains('\n'));
    let first = serial.first_byte.expect("a line came") - started;
    serial.wait("\"dirtier: ready\"", deadline, |text| {
        text.contains(ready_line)
    });
    let ready = started.elapsed();
    let beats = |text: &str| {
        text.split_once(ready_line)
            .is_some_and(|(_, after)| after.matches('.').count() >= BEATS_AFTER_READY)
    };
    serial.wait(
        "heartbeats",
        Instant::now() + Duration::from_secs(30),
        beats,
    );
    assert!(
        serial.text.starts_with("dirtier: ws=256 stride=1 fill=1\n"),
        "the loader passed the command line; serial:\n{}",
        serial.text
    );

    let memory = setup.dir.path().join(format!("{name}.mem"));
    let mut qmp = Qmp::connect(&qmp);
    qmp.execute("stop", serde_json::json!({}));
    qmp.execute(
        "pmemsave",
        serde_json::json!({ "val": 0, "size": MEM_MIB << 20, "filename": memory }),
    );
    qmp.execute("quit", serde_json::json!({}));
    let _ = vm.0.wait();
    // The loader's own sectors hold its variables: from the command line on.
    let from = cmdline_lba() * SECTOR;
    let mut low = vec![0u8; SECTOR + read - from];
    FileImage::open(&memory, 0)
        .and_then(|image| image.read_phys(0x7c00 + from as u64, &mut low))
        .expect("read low memory");
    if let Some(at) = (0..low.len()).find(|&at| low[at] != bytes[from + at]) {
        panic!(
            "the loader's read of LBA {} is not at {:#x}",
            (from + at) / SECTOR,
            0x7c00 + (from + at) / SECTOR * SECTOR
        );
    }
    let image = FileImage::open(&memory, 0).expect("open the memory image");
    let report = check(&image).unwrap_or_else(|e| panic!("memory oracle: {e}"));
    assert!(report.passes >= 1, "{report:?}");
    assert!(report.fill_done, "{report:?}");
    // SeaBIOS's E820 map through the loader: RAM from 1 MiB to just below
    // the top, where SeaBIOS keeps a reserved zone.
    let [range] = report.ranges.as_slice() else {
        panic!("one usable range expected: {report:?}");
    };
    assert_eq!(range.start, ferry_testguest::USABLE_RAM_START, "{report:?}");
    let end = range.start + range.len;
    assert!(
        ((MEM_MIB - 4) << 20..=MEM_MIB << 20).contains(&end),
        "{report:?}"
    );
    eprintln!(
        "{name}: first serial line {first:.1?} after QEMU started, \"dirtier: ready\" at \
         {ready:.1?}; {} sectors read; {} passes, {} fill pages, usable {:#x}..{end:#x}",
        read / SECTOR + 1,
        report.passes,
        report.filled_pages,
        range.start,
    );
}

/// A disk cut short after the loader: the BIOS fails the read, the loader
/// says so on COM1 and halts.
#[test]
fn boot_loader_reports_a_failed_read() {
    let Some(setup) = seabios_setup() else { return };
    let image = setup.dir.path().join("short.img");
    boot_disk(&image, "ws=1M", None).expect("write the boot disk");
    let loader = ferry_testguest::bootdisk::BOOT_LOADER.len() as u64;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .and_then(|f| f.set_len(loader))
        .expect("cut the disk short");
    let mut firmware = start_firmware(&setup, "short", &image, &["if=ide"]);
    let deadline = firmware.started + FIRMWARE_BOOT_TIMEOUT;
    firmware
        .serial
        .read_until("the read error", deadline, |t| t.contains('\n'));
    let text = &firmware.serial.text;
    assert_eq!(text, "bootdisk: ERR read\n");
}

#[test]
fn dirtier_boots_from_ide_disk_through_seabios() {
    boot_through_seabios("ide", &["if=ide"]);
}

#[test]
fn dirtier_boots_from_virtio_disk_through_seabios() {
    boot_through_seabios("virtio", &["if=virtio"]);
}

/// The modern-only virtio-blk that ferry-vm offers.
#[test]
fn dirtier_boots_from_modern_virtio_disk_through_seabios() {
    boot_through_seabios(
        "modern",
        &[
            "if=none,id=d0",
            "-device",
            "virtio-blk-pci,drive=d0,disable-legacy=on",
        ],
    );
}

/// More than 127 sectors, SeaBIOS's limit for one INT 13h call: the loader
/// reads in several calls, each to its place.
#[test]
fn boot_loader_reads_in_several_calls() {
    // The image must end below 0x90000: 0x7c00 + 512 * 1000 does.
    boot_through_seabios_reading("big-ide", &["if=ide"], 900);
    boot_through_seabios_reading(
        "big-modern",
        &[
            "if=none,id=d0",
            "-device",
            "virtio-blk-pci,drive=d0,disable-legacy=on",
        ],
        900,
    );
}

/// Heartbeats (`hb=100`) the guest keeps beating after a `system_powerdown`
/// it must ignore.
const BEATS_AFTER_POWERDOWN: usize = 20;

/// Boots the dirtier from an IDE boot disk through SeaBIOS with `cmdline`
/// and waits for `dirtier: ready` and [`BEATS_AFTER_READY`] heartbeats.
fn boot_beating(setup: &Setup, name: &str, cmdline: &str) -> Firmware {
    let image = setup.dir.path().join(format!("{name}.img"));
    boot_disk(&image, cmdline, None).expect("write the boot disk");
    let mut firmware = start_firmware(setup, name, &image, &["if=ide"]);
    let deadline = firmware.started + FIRMWARE_BOOT_TIMEOUT;
    let ready_line = "dirtier: ready\n";
    firmware
        .serial
        .wait("\"dirtier: ready\" and heartbeats", deadline, |text| {
            text.split_once(ready_line)
                .is_some_and(|(_, after)| after.matches('.').count() >= BEATS_AFTER_READY)
        });
    firmware
}

/// Waits until QEMU exits, at most until `deadline`.
fn wait_exit(vm: &mut Qemu, deadline: Instant) -> std::process::ExitStatus {
    loop {
        if let Some(status) = vm.0.try_wait().expect("wait for QEMU") {
            return status;
        }
        assert!(Instant::now() < deadline, "QEMU did not exit in time");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `virsh shutdown`: QMP `system_powerdown` presses the ACPI power button;
/// the dirtier (`acpi=1`) finds the PIIX4 PM block where SeaBIOS put it,
/// sees PWRBTN_STS and enters S5; QEMU reports a guest shutdown and exits 0.
#[test]
fn dirtier_powers_off_on_acpi_power_button() {
    let Some(setup) = seabios_setup() else { return };
    let Firmware {
        mut vm,
        mut serial,
        qmp,
        started,
    } = boot_beating(&setup, "acpi", "ws=1M hb=100 pause=5 acpi=1");
    let booted = started.elapsed();
    let mut qmp = Qmp::connect(&qmp);
    // The base the guest found is the one QEMU's PIIX4 PM decodes.
    let base = qmp.execute(
        "qom-get",
        serde_json::json!({ "path": "/machine/acpi-device", "property": "pm_io_base" }),
    )["return"]
        .as_u64()
        .expect("pm_io_base is a number");
    assert!(
        serial
            .text
            .contains(&format!("dirtier: acpi: pm at {base:#x}\n")),
        "PM base {base:#x}; serial:\n{}",
        serial.text
    );
    assert!(!serial.text.contains("SCI_EN never set"), "{}", serial.text);
    assert!(!serial.text.contains("power button"), "{}", serial.text);

    let pressed = Instant::now();
    let deadline = pressed + FIRMWARE_BOOT_TIMEOUT;
    qmp.execute("system_powerdown", serde_json::json!({}));
    serial.wait("\"dirtier: power button\"", deadline, |text| {
        text.contains("dirtier: power button\n")
    });
    let button = pressed.elapsed();
    let shutdown = qmp.wait_event("SHUTDOWN", deadline);
    assert_eq!(
        shutdown["data"],
        serde_json::json!({ "guest": true, "reason": "guest-shutdown" }),
        "{shutdown}"
    );
    let status = wait_exit(&mut vm, deadline);
    let exited = pressed.elapsed();
    assert!(status.success(), "QEMU exited with {status}");
    let events: Vec<_> = qmp.events.iter().map(|e| e["event"].clone()).collect();
    assert_eq!(
        events,
        [
            serde_json::json!("POWERDOWN"),
            serde_json::json!("SHUTDOWN")
        ],
        "{:?}",
        qmp.events
    );
    eprintln!(
        "acpi: booted with heartbeats in {booted:.1?}; PM at {base:#x}; after \
         system_powerdown: \"dirtier: power button\" in {button:.1?}, QEMU exited 0 in \
         {exited:.1?}"
    );
}

/// Without `acpi=1` the guest leaves the power button alone: after
/// `system_powerdown` it keeps beating and QEMU keeps running.
#[test]
fn dirtier_ignores_power_button_without_acpi() {
    let Some(setup) = seabios_setup() else { return };
    let Firmware {
        mut vm,
        mut serial,
        qmp,
        ..
    } = boot_beating(&setup, "noacpi", "ws=1M hb=100 pause=5");
    assert!(!serial.text.contains("acpi"), "{}", serial.text);
    let mut qmp = Qmp::connect(&qmp);
    let pressed = Instant::now();
    qmp.execute("system_powerdown", serde_json::json!({}));
    let seen = serial.text.len();
    serial.wait(
        "heartbeats after system_powerdown",
        pressed + FIRMWARE_BOOT_TIMEOUT,
        |text| text[seen..].matches('.').count() >= BEATS_AFTER_POWERDOWN,
    );
    assert!(!serial.text.contains("power button"), "{}", serial.text);
    assert!(
        serial.text[seen..].chars().all(|c| c == '.'),
        "only heartbeats after system_powerdown; serial:\n{}",
        serial.text
    );
    let status = qmp.execute("query-status", serde_json::json!({}));
    assert_eq!(status["return"]["status"], "running", "{status}");
    let events: Vec<_> = qmp.events.iter().map(|e| e["event"].clone()).collect();
    assert_eq!(events, [serde_json::json!("POWERDOWN")], "{:?}", qmp.events);
    assert!(matches!(vm.0.try_wait(), Ok(None)), "QEMU exited");
    qmp.execute("quit", serde_json::json!({}));
    let _ = vm.0.wait();
    eprintln!(
        "noacpi: {BEATS_AFTER_POWERDOWN} heartbeats in {:.1?} after system_powerdown, still running",
        pressed.elapsed()
    );
}
