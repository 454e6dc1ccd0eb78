//! Virtio 1.x devices on PCI (the modern, non-transitional interface of virtio 1.1
//! section 4.1): one 64-bit memory BAR holds the common configuration, ISR, device
//! configuration, notification area and the MSI-X table and PBA. Interrupts are
//! MSI-X only (the interrupt pin is 0), which every virtio driver of the last
//! decade uses. Queues are rust-vmm's `virtio-queue` split rings; every write the
//! devices make to guest memory goes through vm-memory and so lands in the dirty
//! log a migration reads.
//!
//! Device work runs on the vCPU thread that wrote the notification (virtio-blk),
//! or on a device thread (virtio-net receive, virtio-rng requests that waited
//! for the rate limit's next window, virtio-balloon's stats buffer going back
//! to the driver), always under the device's lock,
//! so a paused VM with its device threads parked has no request in flight.

pub mod balloon;
pub mod blk;
pub mod net;
mod persist;
pub mod rng;
pub mod test_driver;
#[cfg(test)]
mod tests;
mod transport;
mod worker;

pub use crate::devices::DeviceStateError;
pub use blk::{DeviceDiskError, DiskError};
pub use persist::{DeviceState, QueueSnapshot, VirtioPciState};
pub use transport::{VirtioPci, BAR_SIZE, STOP_HELD, STOP_PAUSED};
pub use worker::{Worker, WorkerError};

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use ferry_kvm::memory::GuestMemory;
use virtio_queue::Queue;

/// VIRTIO_F_VERSION_1: the modern interface (required by this transport).
pub const F_VERSION_1: u64 = 1 << 32;
/// Driver status bits (virtio 1.1 section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// A device behind the transport: its identity, features, configuration space
/// and queue work.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// `virtio-blk`, `virtio-net`: names the device in logs, shapes and errors.
    fn kind(&self) -> &'static str;
    /// Virtio device ID (1 = network, 2 = block, 4 = entropy, 5 = balloon); the PCI device ID
    /// is 0x1040 + it.
    fn device_id(&self) -> u16;
    /// 24-bit PCI class code.
    fn pci_class(&self) -> u32;
    /// Feature bits offered, including [`F_VERSION_1`].
    fn features(&self) -> u64;
    fn queue_count(&self) -> usize;
    fn queue_max_size(&self) -> u16 {
        256
    }
    /// Reads the device-specific configuration at `offset` (out of range reads 0).
    fn read_config(&self, offset: usize, data: &mut [u8]);
    /// Writes to the device-specific configuration (ignored where read-only).
    fn write_config(&mut self, _offset: usize, _data: &[u8]) {}
    /// Does the work queue `index` has (driver notified it, or input arrived).
    /// Returns whether used-ring entries were added. An error is the driver's
    /// fault (a malformed request the device cannot even answer): the transport
    /// then sets DEVICE_NEEDS_RESET.
    fn process(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
        driver_features: u64,
    ) -> Result<bool, QueueError>;
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// Makes everything written so far durable and visible to another host (before
    /// a migration's switch-over or a checkpoint).
    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
    /// Takes the device's hold on its backend back (disk image locks), before
    /// the VM runs: after [`VirtioDevice::deactivate`], or on a device built
    /// inactive. A no-op when held.
    fn activate(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
    /// Lets go of the device's hold on its backend (disk image locks) once
    /// everything is flushed, so that a migration's destination can take it.
    fn deactivate(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
    /// The device's state was just restored (migration destination, restore): let
    /// go of anything read before the source's last writes, e.g. cached disk data
    /// on shared storage.
    fn after_restore(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
    /// A fingerprint of how the device is configured that a destination must match
    /// (e.g. capacity, read-only, MAC): part of the migration shape.
    fn identity(&self) -> String;
    /// For a device with input from the host (virtio-net: the tap), the fd its
    /// device thread polls and the queue that input fills; `None`: no thread.
    fn input(&self) -> Option<(Arc<OwnedFd>, usize)> {
        None
    }
    /// Whether the input queue may have room: false once it ran out of buffers,
    /// until the driver notifies it (polling the input is useless meanwhile).
    fn can_take_input(&self) -> bool {
        false
    }
    /// For a device whose queue work waits on time rather than on host input
    /// (virtio-rng's rate limit): that queue. The device thread processes it
    /// whenever it runs, and sleeps until [`VirtioDevice::timer`] says.
    fn timed_queue(&self) -> Option<usize> {
        None
    }
    /// The device's own state beyond the transport's (virtio-rng's rate-limit
    /// window), for checkpoints and migrations; the VM is paused.
    fn save_state(&self) -> Option<DeviceState> {
        None
    }
    /// Loads what [`VirtioDevice::save_state`] gave on the source, checking it
    /// as hostile and changing nothing when it refuses it.
    fn restore_state(&mut self, state: Option<&DeviceState>) -> Result<(), DeviceStateError> {
        match state {
            None => Ok(()),
            Some(_) => Err(DeviceStateError::OtherKind { kind: self.kind() }),
        }
    }
    /// Starts announcing the device on the network (virtio-net: RARP frames
    /// on `schedule`).
    fn announce(&mut self, _now: Instant, _schedule: net::AnnounceSchedule) {}
    /// Timed work (the announce rounds), called by the device thread; returns
    /// when it next wants to be called.
    fn timer(&mut self, _now: Instant) -> Option<Instant> {
        None
    }
    /// The device's I/O counters (what `query-blockstats` and domstats show).
    fn stats(&self) -> DeviceStats;
    /// The balloon, for the host's requests (target, stats polling): only
    /// virtio-balloon answers.
    fn balloon(&mut self) -> Option<&mut balloon::Balloon> {
        None
    }
}

/// I/O counters of one device, since it was created on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStats {
    Block(blk::BlockStats),
    Net(net::NetStats),
    Rng(rng::RngStats),
    Balloon(balloon::BalloonStats),
}

/// A source error of any type, for the buffer accesses whose errors come
/// from several layers (descriptor chains, guest memory, `io`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a device could not do a queue's work: the driver's fault (a malformed
/// request the device cannot even answer), or the host's (the entropy source).
/// The transport then sets DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("no queue {index}")]
    NoQueue { index: usize },
    #[error("available ring: {0}")]
    AvailRing(#[source] virtio_queue::Error),
    #[error("used ring: {0}")]
    UsedRing(#[source] virtio_queue::Error),
    /// Reading or writing a buffer of the chain at `head` failed; `what`
    /// names it ("request", "receive buffer").
    #[error("{what} {head}: {source}")]
    Buffer {
        what: &'static str,
        head: u16,
        #[source]
        source: BoxError,
    },
    #[error("request header of {readable} bytes (needs 16)")]
    ShortHeader { readable: usize },
    #[error("request without a writable status byte")]
    NoStatus,
    #[error("cannot read the request header: {0}")]
    ReadHeader(#[source] std::io::Error),
    #[error(
        "request {head} has a device-readable buffer (entropy requests are device-writable only)"
    )]
    EntropyReadable { head: u16 },
    #[error("request {head} has no room for a byte")]
    NoRoom { head: u16 },
    #[error("getrandom failed: {0}")]
    Getrandom(#[source] getrandom::Error),
    #[error("cannot read the entropy source: {0}")]
    ReadEntropy(#[source] std::io::Error),
    #[error("{what} {head} is device-writable (the device only reads it)")]
    InputWritable { what: &'static str, head: u16 },
    #[error("{what} {head} of {len} bytes (a multiple of {entry}, at most {max})")]
    InputLength {
        what: &'static str,
        head: u16,
        len: usize,
        entry: usize,
        max: usize,
    },
    #[error("report buffer {head} is device-readable (free pages are reported device-writable)")]
    ReportReadable { head: u16 },
    #[error("report buffer {head} at {gpa:#x}+{len:#x} is not whole pages")]
    ReportNotPages { head: u16, gpa: u64, len: u64 },
    #[error("report buffer {head} at {gpa:#x}+{len:#x} is outside guest RAM")]
    ReportOutsideRam { head: u16, gpa: u64, len: u64 },
    #[error("receive buffer {head} of {room} bytes cannot hold the {header}-byte header")]
    ReceiveTooSmall {
        head: u16,
        room: usize,
        header: usize,
    },
    #[error(
        "transmit buffer {head} of {len} bytes (a header and a frame of at most {max_frame} \
         bytes is {header} to {} bytes)",
        header + max_frame
    )]
    TransmitLength {
        head: u16,
        len: usize,
        header: usize,
        max_frame: usize,
    },
}

impl QueueError {
    /// A failed access to the buffers of the chain at `head`.
    pub fn buffer(what: &'static str, head: u16, source: impl Into<BoxError>) -> Self {
        Self::Buffer {
            what,
            head,
            source: source.into(),
        }
    }
}
