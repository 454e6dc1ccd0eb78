//! The dirtier's virtio drivers against QEMU's devices: boots the guest under
//! `qemu-system-x86_64 -M pc -accel kvm` with `blk=8 net=1`, a virtio-blk
//! disk and a virtio-net card on a tap device this test creates (root),
//! pings the guest through the tap, then stops QEMU, saves guest memory and
//! runs the memory oracle and the disk oracle.
//!
//! Skips (and says why) only when QEMU or `/dev/kvm` is missing.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_testguest::disk::check_disk;
use ferry_testguest::{
    check, FileImage, DIRTIER_ELF, NET_ETHERTYPE, NET_PASS_MAGIC, NET_PING_MAGIC, NET_PONG_MAGIC,
};
use nix::sys::socket::{
    recvfrom, sendto, setsockopt, socket, sockopt, AddressFamily, LinkAddr, MsgFlags, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The test's own (locally administered) MAC on the tap.
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const BLK_SECTORS: u64 = 8;
const DISK_BYTES: u64 = 1 << 20;
const MEM_MIB: u64 = 128;

fn qemu_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("qemu-system-x86_64"))
        .find(|candidate| candidate.is_file())
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A tap device, deleted on drop (also when the test panics).
struct Tap {
    name: String,
}

impl Tap {
    fn create(name: String) -> Self {
        // A leftover from a killed run with the same pid would block the add.
        let _ = ip(&["link", "del", &name]);
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"])
            .unwrap_or_else(|e| panic!("cannot create tap {name} (needs root): {e}"));
        let tap = Self { name };
        ip(&["link", "set", &tap.name, "up"]).unwrap_or_else(|e| panic!("{e}"));
        tap
    }

    fn ifindex(&self) -> usize {
        let path = format!("/sys/class/net/{}/ifindex", self.name);
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .trim()
            .parse()
            .expect("ifindex is a number")
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Err(e) = ip(&["link", "del", &self.name]) {
            eprintln!("warning: {e}");
        }
    }
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

/// A minimal QMP client: one command at a time, events skipped.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
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
        };
        qmp.reply(); // greeting
        qmp.execute("qmp_capabilities", serde_json::json!({}));
        qmp
    }

    fn reply(&mut self) -> serde_json::Value {
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read from QMP");
            assert!(n > 0, "QMP closed the connection");
            let value: serde_json::Value = serde_json::from_str(&line).expect("QMP sends JSON");
            if value.get("event").is_none() {
                return value;
            }
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

fn packet_socket() -> OwnedFd {
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::EthAll,
    )
    .expect("open an AF_PACKET socket (needs root)");
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &TimeVal::new(0, 100_000), // 100 ms
    )
    .expect("set SO_RCVTIMEO");
    fd
}

fn frame(dst: [u8; 6], magic: [u8; 8], value: u64) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&NET_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&magic);
    f.extend_from_slice(&value.to_le_bytes());
    f.resize(60, 0);
    f
}

/// A guest frame of ours seen on the tap: (destination, magic, value, link address).
fn guest_frame(fd: &OwnedFd, buf: &mut [u8]) -> Option<([u8; 6], [u8; 8], u64, LinkAddr)> {
    let (len, addr) = recvfrom::<LinkAddr>(fd.as_raw_fd(), buf).ok()?;
    let f = &buf[..len];
    if len < 30 || f[6..12] != GUEST_MAC || f[12..14] != NET_ETHERTYPE.to_be_bytes() {
        return None;
    }
    let dst = f[..6].try_into().expect("6 bytes");
    let magic = f[14..22].try_into().expect("8 bytes");
    let value = u64::from_le_bytes(f[22..30].try_into().expect("8 bytes"));
    Some((dst, magic, value, addr?))
}

#[test]
fn dirtier_drives_virtio_blk_and_net_under_qemu() {
    let Some(qemu) = qemu_binary() else {
        eprintln!("skipped: qemu-system-x86_64 is not on PATH");
        return;
    };
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is missing");
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let elf = dir.path().join("dirtier.elf");
    let disk = dir.path().join("disk.img");
    let serial = dir.path().join("serial.log");
    let qmp_path = dir.path().join("qmp.sock");
    let memory = dir.path().join("memory.img");
    std::fs::write(&elf, DIRTIER_ELF).expect("write the guest");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(DISK_BYTES))
        .expect("create the disk");

    let tap = Tap::create(format!("ferrytg{}", std::process::id() % 100_000));
    let sock = packet_socket();
    let stderr = std::fs::File::create(dir.path().join("qemu.stderr")).expect("create a log");
    let mut command = Command::new(&qemu);
    command
        .args(["-M", "pc", "-accel", "kvm", "-m"])
        .arg(MEM_MIB.to_string())
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&elf)
        .arg("-append")
        .arg(format!("ws=1M hb=100 pause=5 blk={BLK_SECTORS} net=1"))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=none,id=d0", disk.display()))
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
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let mut vm = Qemu(command.spawn().expect("start QEMU"));

    let text = wait_serial(&serial, "dirtier: ready", Duration::from_secs(40));
    assert!(
        text.contains(&format!("blk: capacity={}\n", DISK_BYTES / 512)),
        "{text}"
    );
    assert!(text.contains("net: mac=52:54:00:12:34:56\n"), "{text}");
    let booted = started.elapsed();

    // FERRYNET broadcasts, one per pass, from the tap, until the disk has
    // wrapped a few times; then pings.
    let mut buf = vec![0u8; 2048];
    let mut passes_seen = BTreeSet::new();
    let mut tap_addr = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while passes_seen.last().is_none_or(|&p| p < 3 * BLK_SECTORS) {
        assert!(
            Instant::now() < deadline,
            "FERRYNET frames seen within 10 s: {passes_seen:?}; serial:\n{}",
            serial_text(&serial)
        );
        if let Some((dst, magic, value, addr)) = guest_frame(&sock, &mut buf) {
            if magic == NET_PASS_MAGIC {
                assert_eq!(dst, [0xff; 6], "FERRYNET is a broadcast");
                assert_eq!(addr.ifindex(), tap.ifindex(), "frame from another link");
                passes_seen.insert(value);
                tap_addr = Some(addr);
            }
        }
    }
    let tap_addr = tap_addr.expect("a FERRYNET frame was seen");
    let pings: Vec<u64> = (0..4).map(|i| 0xfe00_0000_0000_0000 | i).collect();
    for &n in &pings {
        sendto(
            sock.as_raw_fd(),
            &frame(GUEST_MAC, NET_PING_MAGIC, n),
            &tap_addr,
            MsgFlags::empty(),
        )
        .expect("send a ping into the tap");
    }
    let mut pongs = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pongs.len() < pings.len() {
        assert!(
            Instant::now() < deadline,
            "answers to {pings:x?}: only {pongs:x?} within 10 s"
        );
        if let Some((dst, magic, value, _)) = guest_frame(&sock, &mut buf) {
            if magic == NET_PONG_MAGIC {
                assert_eq!(dst, HOST_MAC, "FERRYPON goes to the ping's source");
                assert!(pings.contains(&value), "FERRYPON for {value:#x}");
                pongs.insert(value);
            } else if magic == NET_PASS_MAGIC {
                passes_seen.insert(value);
            }
        }
    }

    // Stop the guest, save its memory, quit; then both oracles.
    let mut qmp = Qmp::connect(&qmp_path);
    qmp.execute("stop", serde_json::json!({}));
    qmp.execute(
        "pmemsave",
        serde_json::json!({ "val": 0, "size": MEM_MIB << 20, "filename": memory }),
    );
    let _ = qmp.execute("quit", serde_json::json!({}));
    let _ = vm.0.wait();
    while let Some((_, magic, value, _)) = guest_frame(&sock, &mut buf) {
        if magic == NET_PASS_MAGIC {
            passes_seen.insert(value);
        }
    }

    let image = FileImage::open(&memory, 0).expect("open the memory image");
    let report = check(&image).unwrap_or_else(|e| panic!("memory oracle: {e}"));
    let disk_bytes = std::fs::read(&disk).expect("read the disk");
    let disk_report = check_disk(&disk_bytes, BLK_SECTORS, report.passes)
        .unwrap_or_else(|e| panic!("disk oracle (header passes {}): {e}", report.passes));
    let last_frame = *passes_seen.last().expect("frames were seen");
    assert!(
        last_frame >= 3 * BLK_SECTORS && last_frame <= report.passes + 1,
        "header passes {}, last FERRYNET frame for pass {last_frame}",
        report.passes
    );
    eprintln!(
        "booted in {booted:.1?}, {} passes in {:.1?} in all ({} FERRYNET frames seen, \
         disk {} records, ahead {})",
        report.passes,
        started.elapsed(),
        passes_seen.len(),
        disk_report.records,
        disk_report.ahead
    );
}
