//! Virtio-pci device state as it travels in checkpoints and migration streams.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use crate::devices::DeviceStateError;

/// One split virtqueue: what the driver configured and where the device is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    /// MSI-X vector (0xffff = none).
    pub vector: u16,
}

impl QueueSnapshot {
    pub fn new(s: &QueueState, vector: u16) -> Self {
        Self {
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
            vector,
        }
    }

    /// The queue, for a device whose queues hold at most `max_size` entries;
    /// refuses sizes and addresses no driver could have set.
    pub fn to_queue(&self, max_size: u16) -> Result<Queue, DeviceStateError> {
        if self.size == 0 || self.size > max_size || !self.size.is_power_of_two() {
            return Err(DeviceStateError::QueueSize {
                size: self.size,
                max: max_size,
            });
        }
        let state = QueueState {
            max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        Queue::try_from(state).map_err(DeviceStateError::Queue)
    }
}

/// A virtio-pci function: config space, common configuration, queues, MSI-X.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub slot: u8,
    pub kind: String,
    /// The 64 dwords of PCI config space.
    pub config: Vec<u32>,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub msix_config: u16,
    pub status: u8,
    pub config_generation: u8,
    pub queue_select: u16,
    pub isr: u8,
    pub queues: Vec<QueueSnapshot>,
    /// Entries of (address low, address high, data, vector control).
    pub msix_table: Vec<[u32; 4]>,
    pub msix_pba: u64,
    /// The device's own state (absent for devices without one, and in
    /// streams from before virtio-rng).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceState>,
}

/// A device's own state beyond the transport's, by device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// virtio-rng: the rate limit's window.
    Rng(super::rng::RngState),
    /// virtio-balloon: target, actual, the held stats buffer, counters.
    Balloon(super::balloon::BalloonState),
}
