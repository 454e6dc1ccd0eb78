//! The host side of the dirtier's network card, for tests (root): a tap device
//! the test creates and deletes, and an `AF_PACKET` socket on it (or on any
//! interface, such as a bridge the guest's tap is a port of, also in another
//! network namespace) that sees the guest's frames, pings the guest and
//! watches for its RARP announcements.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::ifaddrs::getifaddrs;
use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{
    bind, recvfrom, sendto, setsockopt, socket, sockopt, AddressFamily, LinkAddr, MsgFlags,
    SockFlag, SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

use crate::{NET_ETHERTYPE, NET_PASS_MAGIC, NET_PING_MAGIC, NET_PONG_MAGIC};

/// The MAC the tests give the guest's card (QEMU's and ferry's first default).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The test's own (locally administered) MAC on the tap.
pub const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// Ethertype of a RARP frame (what a VMM sends for the guest after a migration).
pub const RARP_ETHERTYPE: u16 = 0x8035;

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
#[derive(Debug)]
pub struct Tap {
    pub name: String,
}

impl Tap {
    /// Creates and brings up tap `name` (`ip tuntap add`; needs root).
    pub fn create(name: String) -> Self {
        // A leftover from a killed run with the same name would block the add.
        let _ = ip(&["link", "del", &name]);
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"])
            .unwrap_or_else(|e| panic!("cannot create tap {name} (needs root): {e}"));
        let tap = Self { name };
        ip(&["link", "set", &tap.name, "up"]).unwrap_or_else(|e| panic!("{e}"));
        tap
    }

    /// A tap name unique to this process: `<prefix><index><pid>`, at most 15 bytes.
    pub fn unique_name(prefix: &str, index: u32) -> String {
        format!("{prefix}{index}{}", std::process::id() % 100_000)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Err(e) = ip(&["link", "del", &self.name]) {
            eprintln!("warning: {e}");
        }
    }
}

/// An `AF_PACKET` socket bound to interface `name` of this thread's network
/// namespace (all protocols), with a large receive buffer: the guest's frames
/// queue up while the test does other things (a migration), and other links'
/// traffic never reaches it. Also returns the interface's index.
fn packet_socket(name: &str) -> (OwnedFd, usize) {
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::EthAll,
    )
    .expect("open an AF_PACKET socket (needs root)");
    setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 20_000)).expect("set SO_RCVTIMEO");
    setsockopt(&fd, sockopt::RcvBufForce, &(8 << 20)).expect("set SO_RCVBUFFORCE");
    // The link-layer address (its ifindex), protocol 0: keep ETH_P_ALL.
    // (getifaddrs asks over netlink, which sees this thread's namespace;
    // /sys/class/net shows the one sysfs was mounted in.)
    let link = getifaddrs()
        .expect("list the network interfaces")
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address.and_then(|a| a.as_link_addr().copied()))
        .unwrap_or_else(|| panic!("no link-layer address for {name}"));
    bind(fd.as_raw_fd(), &link).unwrap_or_else(|e| panic!("bind to {name}: {e}"));
    (fd, link.ifindex())
}

/// A dirtier frame from the test: `magic` + `value`, padded to 60 bytes.
pub fn frame(dst: [u8; 6], magic: [u8; 8], value: u64) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&NET_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&magic);
    f.extend_from_slice(&value.to_le_bytes());
    f.resize(60, 0);
    f
}

fn serial_text(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// The guest's frames on one interface (its tap, or a bridge), seen through
/// an `AF_PACKET` socket of its own.
#[derive(Debug)]
pub struct Link {
    sock: OwnedFd,
    /// The interface's name, for messages.
    name: String,
    ifindex: usize,
    buf: Vec<u8>,
    /// The interface's link address, from the guest's first frame on it.
    addr: Option<LinkAddr>,
    /// Passes of the FERRYNET frames seen.
    pub passes: BTreeSet<u64>,
    /// RARP frames from the guest's MAC seen, with when they arrived.
    pub rarps: Vec<Instant>,
}

impl Link {
    pub fn new(tap: &Tap) -> Self {
        Self::on(&tap.name)
    }

    /// A link on interface `name` of this thread's network namespace (with
    /// a bridge, frames to the test's [`HOST_MAC`] reach it only when the
    /// bridge is promiscuous or has that address).
    pub fn on(name: &str) -> Self {
        let (sock, ifindex) = packet_socket(name);
        Self {
            sock,
            name: name.to_owned(),
            ifindex,
            buf: vec![0u8; 2048],
            addr: None,
            passes: BTreeSet::new(),
            rarps: Vec::new(),
        }
    }

    /// [`Link::on`] interface `name` of the network namespace bound at
    /// `netns` (a file such as `ip netns` or `unshare --net=FILE` keeps): a
    /// thread of its own enters the namespace and opens the socket there,
    /// which stays in that namespace whichever thread uses it.
    pub fn in_netns(netns: &Path, name: &str) -> Self {
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns =
                    File::open(netns).unwrap_or_else(|e| panic!("open {}: {e}", netns.display()));
                setns(&ns, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("enter {}: {e}", netns.display()));
                Self::on(name)
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// The next dirtier frame from the guest on this interface within about 100 ms:
    /// its destination, payload magic and value. FERRYNET passes and RARP
    /// frames from the guest's MAC are recorded on the way.
    pub fn next_frame(&mut self) -> Option<([u8; 6], [u8; 8], u64)> {
        let deadline = Instant::now() + Duration::from_millis(100);
        while Instant::now() < deadline {
            let (len, addr) = recvfrom::<LinkAddr>(self.sock.as_raw_fd(), &mut self.buf).ok()?;
            let Some(addr) = addr else { continue };
            let f = &self.buf[..len];
            if addr.ifindex() != self.ifindex || len < 30 || f[6..12] != GUEST_MAC {
                continue;
            }
            if f[12..14] == RARP_ETHERTYPE.to_be_bytes() {
                self.rarps.push(Instant::now());
                continue;
            }
            if f[12..14] != NET_ETHERTYPE.to_be_bytes() {
                continue;
            }
            let dst: [u8; 6] = f[..6].try_into().expect("6 bytes");
            let magic: [u8; 8] = f[14..22].try_into().expect("8 bytes");
            let value = u64::from_le_bytes(f[22..30].try_into().expect("8 bytes"));
            if magic == NET_PASS_MAGIC {
                assert_eq!(dst, [0xff; 6], "FERRYNET is a broadcast");
                self.passes.insert(value);
            }
            self.addr = Some(addr);
            return Some((dst, magic, value));
        }
        None
    }

    /// Waits for a FERRYNET frame of pass `min` or later; `serial` (the
    /// guest's COM1 log) is shown if none comes.
    pub fn wait_pass(&mut self, min: u64, serial: &Path) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.passes.last().is_none_or(|&p| p < min) {
            assert!(
                Instant::now() < deadline,
                "no FERRYNET frame for pass {min} or later on {} within 15 s (seen {:?}); \
                 serial:\n{}",
                self.name,
                self.passes.last(),
                serial_text(serial)
            );
            self.next_frame();
        }
    }

    /// Sends FERRYPNG frames and waits for every FERRYPON answer.
    pub fn ping(&mut self, pings: &[u64]) {
        let addr = self.addr.expect("the guest sent a frame on this interface");
        for &n in pings {
            sendto(
                self.sock.as_raw_fd(),
                &frame(GUEST_MAC, NET_PING_MAGIC, n),
                &addr,
                MsgFlags::empty(),
            )
            .expect("send a ping into the interface");
        }
        let mut pongs = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pongs.len() < pings.len() {
            assert!(
                Instant::now() < deadline,
                "answers to {pings:x?} on {}: only {pongs:x?} within 10 s",
                self.name
            );
            if let Some((dst, magic, value)) = self.next_frame() {
                if magic == NET_PONG_MAGIC {
                    assert_eq!(dst, HOST_MAC, "FERRYPON goes to the ping's source");
                    assert!(pings.contains(&value), "FERRYPON for {value:#x}");
                    pongs.insert(value);
                }
            }
        }
    }

    /// Reads what is left in the socket (after the guest stopped).
    pub fn drain(&mut self) {
        while self.next_frame().is_some() {}
    }
}
