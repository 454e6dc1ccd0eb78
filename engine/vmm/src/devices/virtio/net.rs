//! virtio-net on a tap device (virtio 1.1 section 5.1): one receive and one
//! transmit queue, the MAC in the configuration space, link always up, no
//! offloads. The tap is an open fd (libvirt passes one, as to QEMU's
//! `-netdev tap,fd=N`), or one opened by name with [`Tap::open`].
//!
//! Transmit runs on the vCPU thread that notified queue 1: each chain is one
//! frame, written to the non-blocking tap; when the tap is full the frame is
//! dropped and counted, as a NIC would, and the vCPU never blocks. Receive runs
//! on the NIC's device thread (see `worker.rs`), which polls the tap while the
//! receive queue has buffers and stops polling it until the driver notifies
//! queue 0 when it has none: frames then wait in the tap, none is dropped.
//!
//! Each frame in a buffer is preceded by the 12-byte `virtio_net_hdr_v1`. With
//! no offloads negotiated it is all zero but `num_buffers` (1 on receive). When
//! the tap has IFF_VNET_HDR (as libvirt's do), its header size is set to 12 and
//! headers pass through; otherwise the device strips it on transmit and makes
//! one up on receive.
//!
//! After an incoming migration or a restore, the first resume announces the
//! NIC's MAC as QEMU's `qemu_announce_self` does (vMotion sends the same
//! RARP): by default 5 RARP frames from the guest's MAC, 50 ms apart and then
//! 100 ms more each time (capped at 550 ms), so switches learn the new port at
//! once. [`AnnounceSchedule`] holds QEMU's parameters of that schedule;
//! `announce-self` sends one on demand.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_kvm::memory::GuestMemory;
use ferry_kvm::tap;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::{QueueError, VirtioDevice, F_VERSION_1};

/// A tap that cannot be opened or set up for virtio-net.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The advice follows the cause, so the cause is in the text.
    #[error(
        "cannot open tap {ifname} through /dev/net/tun: {source} (creating a tap needs \
         CAP_NET_ADMIN; an existing one must be free and owned by this user)"
    )]
    OpenTap {
        ifname: String,
        source: std::io::Error,
    },
    #[error("MAC {mac:?} must be six hex bytes like 52:54:00:12:34:56")]
    MacFormat { mac: String },
    #[error("MAC {mac} is a multicast address")]
    MacMulticast { mac: String },
    #[error("the NIC's fd is not a tap (TUNGETIFF: {0})")]
    NotTap(#[source] std::io::Error),
    #[error("the NIC's fd is a tun device with flags {flags:#x}; it needs IFF_TAP | IFF_NO_PI")]
    TunFlags { flags: u16 },
    #[error("cannot set the tap's header size (TUNSETVNETHDRSZ): {0}")]
    HeaderSize(#[source] std::io::Error),
    #[error("cannot turn the tap's offloads off (TUNSETOFFLOAD): {0}")]
    Offloads(#[source] std::io::Error),
    #[error("cannot read the tap's file flags: {0}")]
    GetFlags(#[source] nix::Error),
    #[error("cannot make the tap non-blocking: {0}")]
    NonBlocking(#[source] nix::Error),
}

/// VIRTIO_NET_F_MAC: the device has a MAC in its configuration space.
const F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_STATUS: the configuration space has a link status.
const F_STATUS: u64 = 1 << 16;
/// VIRTIO_NET_S_LINK_UP.
const S_LINK_UP: u16 = 1;
/// `virtio_net_hdr_v1` (VERSION_1 always has `num_buffers`).
pub const HEADER_LEN: usize = 12;
/// Largest frame (without the header): 64 KiB plus an Ethernet and VLAN header,
/// QEMU's limit too.
pub const MAX_FRAME: usize = 65550;
/// Queues: receive, transmit.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// Ethertype of RARP.
pub const ETH_P_RARP: u16 = 0x8035;

/// How to build a virtio-net device.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// An open tap (IFF_TAP | IFF_NO_PI; IFF_VNET_HDR or not).
    pub tap: Arc<OwnedFd>,
    pub mac: [u8; 6],
}

impl PartialEq for NetConfig {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.tap, &other.tap) && self.mac == other.mac
    }
}

impl Eq for NetConfig {}

/// Opening taps by name, for use by hand (libvirt passes open fds instead).
#[derive(Debug)]
pub struct Tap;

impl Tap {
    /// Opens (creating it if this process may) tap `ifname` with IFF_VNET_HDR.
    pub fn open(ifname: &str) -> Result<Arc<OwnedFd>, NetError> {
        tap::open_tap(ifname, true)
            .map(Arc::new)
            .map_err(|source| NetError::OpenTap {
                ifname: ifname.to_string(),
                source,
            })
    }
}

/// `52:54:00:12:34:56` for printing and parsing.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `52:54:00:12:34:56`; refuses multicast addresses, which no NIC has.
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    let malformed = || NetError::MacFormat { mac: s.to_string() };
    if parts.len() != 6 {
        return Err(malformed());
    }
    for (b, p) in mac.iter_mut().zip(&parts) {
        *b = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .ok_or_else(malformed)?;
    }
    if mac[0] & 1 != 0 {
        return Err(NetError::MacMulticast { mac: s.to_string() });
    }
    Ok(mac)
}

/// QEMU's announce frame (`announce_self_create`): a broadcast RARP "reverse
/// request" from `mac` about `mac`, padded to 60 bytes.
pub fn rarp_frame(mac: &[u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].fill(0xff);
    f[6..12].copy_from_slice(mac);
    f[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    f[22..28].copy_from_slice(mac);
    f[32..38].copy_from_slice(mac);
    f
}

/// Frame counters of one NIC.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    /// Frames dropped on transmit because the tap was full or refused them.
    pub tx_dropped: u64,
    pub rx_frames: u64,
    /// Frames dropped on receive because they did not fit the driver's buffer.
    pub rx_dropped: u64,
    pub announces: u64,
}

/// When a NIC sends its announce frames (QEMU's `AnnounceParameters`, its
/// `announce-initial`, `-max`, `-rounds` and `-step` migration parameters):
/// `rounds` frames, the first at once, then gaps of `initial`, `initial +
/// step`, `initial + 2 step`, ... each at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnounceSchedule {
    pub initial: Duration,
    pub max: Duration,
    pub rounds: u32,
    pub step: Duration,
}

impl Default for AnnounceSchedule {
    /// QEMU's defaults: 5 rounds, gaps of 50, 150, 250 and 350 ms.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(550),
            rounds: 5,
            step: Duration::from_millis(100),
        }
    }
}

impl AnnounceSchedule {
    /// The gap after frame `sent` (0-based) of the schedule.
    fn gap(&self, sent: u32) -> Duration {
        self.initial
            .saturating_add(self.step.saturating_mul(sent))
            .min(self.max)
    }
}

#[derive(Debug)]
struct Announce {
    schedule: AnnounceSchedule,
    /// Rounds sent so far.
    sent: u32,
    next: Instant,
}

/// A virtio-net device.
#[derive(Debug)]
pub struct Net {
    tap: Arc<OwnedFd>,
    mac: [u8; 6],
    /// The tap reads and writes a 12-byte virtio-net header before each frame.
    vnet_hdr: bool,
    /// The receive queue had no buffer: wait for the driver's notify.
    starved: bool,
    buf: Vec<u8>,
    stats: NetStats,
    announce: Option<Announce>,
}

impl Net {
    /// Takes the tap: makes it non-blocking and, when it has IFF_VNET_HDR, sets
    /// its header size to ours and turns its offloads off.
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        let fd = config.tap.as_fd();
        let flags = tap::tun_get_iff(fd).map_err(NetError::NotTap)?;
        if flags & tap::IFF_TAP == 0 || flags & tap::IFF_NO_PI == 0 {
            return Err(NetError::TunFlags { flags });
        }
        let vnet_hdr = flags & tap::IFF_VNET_HDR != 0;
        if vnet_hdr {
            tap::tun_set_vnet_hdr_sz(fd, HEADER_LEN as i32).map_err(NetError::HeaderSize)?;
            tap::tun_set_offload(fd, 0).map_err(NetError::Offloads)?;
        }
        let fl = fcntl(fd, FcntlArg::F_GETFL).map_err(NetError::GetFlags)?;
        fcntl(
            fd,
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK),
        )
        .map_err(NetError::NonBlocking)?;
        Ok(Self {
            tap: config.tap.clone(),
            mac: config.mac,
            vnet_hdr,
            starved: false,
            buf: vec![0; HEADER_LEN + MAX_FRAME],
            stats: NetStats::default(),
            announce: None,
        })
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Moves frames from the tap into receive buffers until either runs out.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, QueueError> {
        let mut used = false;
        self.starved = false;
        loop {
            let Some(chain) = queue.iter(mem).map_err(QueueError::AvailRing)?.next() else {
                self.starved = true;
                return Ok(used);
            };
            let head = chain.head_index();
            let n = match nix::unistd::read(self.tap.as_fd(), &mut self.buf) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => {
                    queue.go_to_previous_position();
                    return Ok(used);
                }
                Err(e) => {
                    tracing::warn!("virtio-net: cannot read the tap: {e}");
                    queue.go_to_previous_position();
                    return Ok(used);
                }
            };
            let mut header = [0u8; HEADER_LEN];
            let frame = if self.vnet_hdr {
                if n < HEADER_LEN {
                    queue.go_to_previous_position();
                    continue;
                }
                header.copy_from_slice(&self.buf[..HEADER_LEN]);
                &self.buf[HEADER_LEN..n]
            } else {
                &self.buf[..n]
            };
            header[10..12].copy_from_slice(&1u16.to_le_bytes());
            let mut writer = chain
                .writer(mem)
                .map_err(|e| QueueError::buffer("receive buffer", head, e))?;
            let room = writer.available_bytes();
            if room < HEADER_LEN {
                return Err(QueueError::ReceiveTooSmall {
                    head,
                    room,
                    header: HEADER_LEN,
                });
            }
            if room < HEADER_LEN + frame.len() {
                // The driver posted buffers smaller than the link's frames (it did
                // not negotiate a mergeable or big-packet mode): a NIC drops those.
                tracing::debug!(
                    "virtio-net: {}-byte frame does not fit {room} bytes",
                    frame.len()
                );
                self.stats.rx_dropped += 1;
                queue.go_to_previous_position();
                continue;
            }
            use std::io::Write;
            writer
                .write_all(&header)
                .and_then(|()| writer.write_all(frame))
                .map_err(|e| QueueError::buffer("receive buffer", head, e))?;
            queue
                .add_used(mem, head, (HEADER_LEN + frame.len()) as u32)
                .map_err(QueueError::UsedRing)?;
            self.stats.rx_frames += 1;
            used = true;
        }
    }

    /// Sends every frame the driver queued; a full tap drops them.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, QueueError> {
        let chains: Vec<_> = queue.iter(mem).map_err(QueueError::AvailRing)?.collect();
        let mut used = false;
        for chain in chains {
            let head = chain.head_index();
            let mut reader = chain
                .reader(mem)
                .map_err(|e| QueueError::buffer("transmit buffer", head, e))?;
            let len = reader.available_bytes();
            if !(HEADER_LEN..=HEADER_LEN + MAX_FRAME).contains(&len) {
                return Err(QueueError::TransmitLength {
                    head,
                    len,
                    header: HEADER_LEN,
                    max_frame: MAX_FRAME,
                });
            }
            reader
                .read_exact(&mut self.buf[..len])
                .map_err(|e| QueueError::buffer("transmit buffer", head, e))?;
            let out = if self.vnet_hdr {
                &self.buf[..len]
            } else {
                &self.buf[HEADER_LEN..len]
            };
            match nix::unistd::write(self.tap.as_fd(), out) {
                Ok(_) => self.stats.tx_frames += 1,
                Err(e) => {
                    if e != Errno::EAGAIN {
                        tracing::debug!("virtio-net: tap refused a frame: {e}");
                    }
                    self.stats.tx_dropped += 1;
                }
            }
            queue.add_used(mem, head, 0).map_err(QueueError::UsedRing)?;
            used = true;
        }
        Ok(used)
    }

    fn send_rarp(&mut self) {
        let frame = rarp_frame(&self.mac);
        let mut out = [0u8; HEADER_LEN + 60];
        let out: &[u8] = if self.vnet_hdr {
            out[HEADER_LEN..].copy_from_slice(&frame);
            &out
        } else {
            &frame
        };
        match nix::unistd::write(self.tap.as_fd(), out) {
            Ok(_) => self.stats.announces += 1,
            Err(e) => tracing::debug!("virtio-net: cannot send an announce: {e}"),
        }
    }
}

impl VirtioDevice for Net {
    fn kind(&self) -> &'static str {
        "virtio-net"
    }

    fn device_id(&self) -> u16 {
        1
    }

    fn pci_class(&self) -> u32 {
        // Network controller, Ethernet.
        0x02_00_00
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_MAC | F_STATUS
    }

    fn queue_count(&self) -> usize {
        2
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(offset + i).copied().unwrap_or(0);
        }
    }

    fn process(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
        _driver_features: u64,
    ) -> Result<bool, QueueError> {
        let queue = queues.get_mut(index).ok_or(QueueError::NoQueue { index })?;
        match index {
            RX_QUEUE => self.receive(queue, mem),
            TX_QUEUE => self.transmit(queue, mem),
            _ => Err(QueueError::NoQueue { index }),
        }
    }

    fn reset(&mut self) {
        self.starved = false;
    }

    fn stats(&self) -> super::DeviceStats {
        super::DeviceStats::Net(self.stats)
    }

    fn identity(&self) -> String {
        format!("mac={}", format_mac(&self.mac))
    }

    fn input(&self) -> Option<(Arc<OwnedFd>, usize)> {
        Some((self.tap.clone(), RX_QUEUE))
    }

    fn can_take_input(&self) -> bool {
        !self.starved
    }

    fn announce(&mut self, now: Instant, schedule: AnnounceSchedule) {
        // A new announce replaces one under way, as QEMU restarts its timer.
        self.announce = (schedule.rounds > 0).then_some(Announce {
            schedule,
            sent: 0,
            next: now,
        });
    }

    fn timer(&mut self, now: Instant) -> Option<Instant> {
        let a = self.announce.as_mut()?;
        if now < a.next {
            return Some(a.next);
        }
        let delay = a.schedule.gap(a.sent);
        a.sent += 1;
        a.next = now + delay;
        let done = a.sent >= a.schedule.rounds;
        let next = a.next;
        self.send_rarp();
        if done {
            self.announce = None;
            return None;
        }
        Some(next)
    }
}
