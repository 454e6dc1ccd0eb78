//! Emulated devices. Each device owns its `XState` DTO in `persist.rs`.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

pub mod acpi_pm;
pub mod disk_image;
pub mod fw_cfg;
pub mod i8042;
pub mod ide;
pub mod image_lock;
pub mod pci;
pub mod rtc;
pub mod serial;
pub mod virtio;

/// A device's saved state (checkpoint, migration stream) that a check or a
/// load refuses; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    /// A refusal about one part of a device (`who`: "virtio-blk@03", "PIIX3
    /// IDE", "queue 1").
    #[error("{who}: {source}")]
    In {
        who: String,
        #[source]
        source: Box<DeviceStateError>,
    },
    #[error("device state of another kind for {kind}")]
    OtherKind { kind: &'static str },
    #[error("no {kind} state in the stream")]
    Missing { kind: &'static str },
    #[error("{what} lock poisoned")]
    LockPoisoned { what: &'static str },
    #[error("PCI config space has {count} registers, expected {expected}")]
    ConfigRegisterCount { count: usize, expected: usize },
    #[error(
        "PCI config register {reg:#x} holds {saved:#010x}; this device has {ours:#010x} in its \
         read-only bits (a different device model)"
    )]
    ConfigReadOnly { reg: usize, saved: u32, ours: u32 },
    #[error("device state for {kind}@{slot:02x} arrived for {who}")]
    WrongDevice { kind: String, slot: u8, who: String },
    #[error(
        "{queues} queues and {vectors} MSI-X vectors in the state, the device has {our_queues} \
         and {our_vectors}"
    )]
    QueueCount {
        queues: usize,
        vectors: usize,
        our_queues: usize,
        our_vectors: usize,
    },
    #[error("driver features {features:#x} were never offered (device offers {offered:#x})")]
    FeaturesNotOffered { features: u64, offered: u64 },
    #[error("FEATURES_OK without VERSION_1 (this device refuses that)")]
    NoVersion1,
    #[error("an MSI-X vector past the {vectors}-entry table")]
    VectorPastTable { vectors: usize },
    #[error("MSI-X table or pending bits no driver could have set")]
    MsixBits,
    #[error("size {size} (must be a power of two up to {max})")]
    QueueSize { size: u16, max: u16 },
    #[error(transparent)]
    Queue(virtio_queue::Error),
    #[error("queue {index} does not fit in guest memory")]
    QueueOutsideRam { index: usize },
    /// The device's backend did not take the restored state (a disk
    /// opening its image again).
    #[error(transparent)]
    Reopen(#[from] virtio::DiskError),
    #[error("virtio-rng quota of {quota} bytes (at most 2^63 - 1)")]
    RngQuota { quota: u64 },
    #[error(
        "virtio-rng window ending in {ms} ms (a period is at most {} ms)",
        u32::MAX
    )]
    RngWindow { ms: u64 },
    #[error("virtio-balloon target of {pages} pages (guest RAM has {ram_pages})")]
    BalloonTarget { pages: u32, ram_pages: u64 },
    #[error("virtio-balloon stats buffer {head} (a queue holds at most {max})")]
    BalloonStatsHead { head: u16, max: u16 },
    #[error("virtio-balloon state with {count} statistics (ferry keeps {keeps})")]
    BalloonStatCount { count: usize, keeps: usize },
    #[error("virtio-balloon statistics from before 1970 ({0})")]
    BalloonStatsTime(i64),
    #[error("IDE state has {0} channels, not 2")]
    IdeChannels(usize),
    #[error("IDE channel {bus}: unit {unit} and {positions} positions (unit 0 or 1, 2 positions)")]
    IdeChannel {
        bus: usize,
        unit: u8,
        positions: usize,
    },
    #[error(
        "IDE state {} a drive at bus {bus} unit {unit}; this VM {}",
        if *.in_state { "has" } else { "lacks" },
        if *.in_vm { "has one" } else { "has none" }
    )]
    IdeDrivePresence {
        bus: usize,
        unit: usize,
        in_state: bool,
        in_vm: bool,
    },
    #[error("PIO position {pos} past its {len}-byte buffer")]
    PioPosition { pos: u32, len: usize },
    #[error("a PIO transfer no {media} drive makes ({transfer:?} with a {len}-byte buffer)")]
    PioTransfer {
        media: &'static str,
        transfer: &'static str,
        len: usize,
    },
    /// vm-superio's refusal (a receive FIFO larger than the UART's), as it
    /// names it.
    #[error("serial state is invalid: {0:?}")]
    Serial(vm_superio::serial::Error<std::io::Error>),
    #[error("i8042 output buffer of {len} bytes; it holds {max}")]
    I8042Queue { len: usize, max: usize },
    #[error("PIIX4 PM timer {0:#x} is wider than its 24 bits")]
    PmTimer(u32),
    #[error("PIIX4 PM1 control {0:#06x} has SLP_EN, which never stays set")]
    PmSleep(u16),
    #[error("fw_cfg position {offset} past the end of item {selector:#06x} ({len} bytes here)")]
    FwCfgOffset {
        offset: u32,
        selector: u16,
        len: usize,
    },
    #[error("RTC state has {len} bytes of CMOS; the device has {expected}")]
    RtcCmosLength { len: usize, expected: usize },
    #[error("RTC index {index:#x} is past the CMOS's {len} bytes")]
    RtcIndex { index: u8, len: usize },
    #[error("RTC register A {0:#04x} has UIP stored; it is only ever computed")]
    RtcUip(u8),
    #[error("RTC register C {0:#04x} has bits no RTC sets")]
    RtcRegisterC(u8),
    #[error("RTC register D {value:#04x} is read-only {expected:#04x}")]
    RtcRegisterD { value: u8, expected: u8 },
    #[error("RTC clock offset has {0} ns past a second")]
    RtcSubsecond(u32),
    #[error("RTC clock offset of {0} s is beyond any date the RTC can hold")]
    RtcOffset(i64),
    #[error("fw_cfg DMA address {0:#x} has a low half, which no guest leaves behind")]
    FwCfgDmaAddress(u64),
    #[error("fw_cfg writable files {theirs:?} (name, bytes) in the stream; this VM has {ours:?}")]
    FwCfgFiles {
        theirs: Vec<(String, usize)>,
        ours: Vec<(String, usize)>,
    },
}

impl DeviceStateError {
    /// This refusal, about `who`.
    pub fn of(self, who: impl Into<String>) -> Self {
        Self::In {
            who: who.into(),
            source: Box::new(self),
        }
    }
}

/// An open file, pipe or socket this process was handed (libvirt's
/// `-add-fd`), shared by every device built on it: each build writes to a
/// duplicate ([`SharedFd::dup`]), never to a reopen by path. A reopen through
/// `/proc/self/fd/N` checks the file's permissions again, and the emulator's
/// user (libvirt's `libvirt-qemu`) may not pass them for a file libvirt or
/// virtlogd opened for it. Equal only to itself.
#[derive(Debug, Clone)]
pub struct SharedFd(Arc<OwnedFd>);

impl SharedFd {
    pub fn new(fd: OwnedFd) -> Self {
        Self(Arc::new(fd))
    }

    /// A new descriptor for the same open file (`dup`): same access mode,
    /// flags and offset.
    pub fn dup(&self) -> io::Result<File> {
        self.0.try_clone().map(File::from)
    }
}

impl From<OwnedFd> for SharedFd {
    fn from(fd: OwnedFd) -> Self {
        Self::new(fd)
    }
}

impl AsFd for SharedFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl PartialEq for SharedFd {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SharedFd {}
