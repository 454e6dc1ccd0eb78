//! IDE state as it travels in checkpoints and migration streams: the PIIX3's
//! two PCI functions, each channel's control register and interrupt line, and
//! each drive's task file, PIO transfer in flight and sense data. Everything
//! is checked as hostile before any of it is applied.

use serde::{Deserialize, Serialize};

use super::{IdeMedia, ATAPI_PACKET_LEN, CD_SECTOR, MAX_CHUNK};
use crate::devices::DeviceStateError;

/// Largest ATA PIO block (one sector).
pub(super) const ATA_SECTOR: usize = 512;

/// The controller: both PCI functions and both channels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdeState {
    /// The 64 dwords of the ISA bridge's (00:01.0) config space.
    pub isa_config: Vec<u32>,
    /// The 64 dwords of the IDE function's (00:01.1) config space.
    pub ide_config: Vec<u32>,
    /// Primary, then secondary.
    pub channels: Vec<ChannelState>,
}

/// One channel (bus): which drive is selected, the device control register,
/// the interrupt line, and its two positions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelState {
    /// The selected unit (0 or 1).
    pub unit: u8,
    /// Device control register (nIEN, SRST, HOB).
    pub control: u8,
    /// Whether the channel's interrupt line is raised.
    pub irq: bool,
    /// Unit 0, then unit 1; `None` where no drive sits.
    pub drives: Vec<Option<DriveState>>,
}

/// One drive's registers and transfer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveState {
    pub feature: u8,
    pub nsector: u8,
    pub sector: u8,
    pub lcyl: u8,
    pub hcyl: u8,
    /// The previous values (read with HOB set; the high half of LBA48).
    pub hob_feature: u8,
    pub hob_nsector: u8,
    pub hob_sector: u8,
    pub hob_lcyl: u8,
    pub hob_hcyl: u8,
    /// Device/head register.
    pub select: u8,
    pub status: u8,
    pub error: u8,
    /// The data of the PIO block in flight (a sector, a packet, an ATAPI
    /// chunk), and the position of the next byte in it.
    pub buffer: Vec<u8>,
    pub pos: u32,
    pub transfer: Transfer,
    /// ATAPI sense data of the last command.
    pub sense: Sense,
    /// ATAPI PREVENT MEDIUM REMOVAL.
    #[serde(default)]
    pub locked: bool,
    /// ATA write cache on (SET FEATURES 02h/82h); writes flush when off.
    #[serde(default)]
    pub write_cache: bool,
}

/// The PIO transfer a drive is in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transfer {
    /// None: the buffer is empty.
    #[default]
    Idle,
    /// ATA read: the buffer holds a sector; `left` more follow from `lba`.
    AtaRead { lba: u64, left: u32 },
    /// ATA write: the buffer fills the sector at `lba`; `left` sectors
    /// remain, this one included.
    AtaWrite { lba: u64, left: u32 },
    /// ATAPI: the buffer receives the 12-byte command packet.
    Packet,
    /// ATAPI data to the host: the buffer holds one DRQ chunk; `pending`
    /// bytes and `sectors` CD sectors from `lba` follow, in chunks of at
    /// most `limit` bytes.
    AtapiIn {
        lba: u32,
        sectors: u32,
        pending: Vec<u8>,
        limit: u16,
    },
}

/// SCSI sense data (key, additional sense code and qualifier).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl DriveState {
    /// Refuses a state this drive (of `media`, `sectors` long in its own
    /// sector size, writable unless `read_only`) could never have been in.
    pub(super) fn check(
        &self,
        media: IdeMedia,
        sectors: u64,
        read_only: bool,
    ) -> Result<(), DeviceStateError> {
        let len = self.buffer.len();
        if self.pos as usize > len {
            return Err(DeviceStateError::PioPosition { pos: self.pos, len });
        }
        let in_range = |lba: u64, n: u64| lba.checked_add(n).is_some_and(|end| end <= sectors);
        let ata = media == IdeMedia::Disk;
        let ok = match &self.transfer {
            Transfer::Idle => len == 0,
            Transfer::AtaRead { lba, left } => {
                ata && len == ATA_SECTOR && in_range(*lba, u64::from(*left))
            }
            Transfer::AtaWrite { lba, left } => {
                ata && !read_only
                    && len == ATA_SECTOR
                    && *left >= 1
                    && in_range(*lba, u64::from(*left))
            }
            Transfer::Packet => !ata && len == ATAPI_PACKET_LEN,
            Transfer::AtapiIn {
                lba,
                sectors: n,
                pending,
                limit,
            } => {
                !ata && len <= MAX_CHUNK
                    && pending.len() <= MAX_CHUNK + CD_SECTOR
                    && *limit >= 2
                    && (*n == 0 || in_range(u64::from(*lba), u64::from(*n)))
            }
        };
        if !ok {
            return Err(DeviceStateError::PioTransfer {
                media: media.name(),
                transfer: self.transfer_kind(),
                len,
            });
        }
        Ok(())
    }

    fn transfer_kind(&self) -> &'static str {
        match self.transfer {
            Transfer::Idle => "none",
            Transfer::AtaRead { .. } => "ATA read",
            Transfer::AtaWrite { .. } => "ATA write",
            Transfer::Packet => "ATAPI packet",
            Transfer::AtapiIn { .. } => "ATAPI data in",
        }
    }
}
