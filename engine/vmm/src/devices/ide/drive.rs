//! One drive: its task file, ATA commands and PIO blocks. ATAPI packets are
//! in [`super::atapi`].

use crate::devices::disk_image::Mode;
use crate::devices::virtio::blk::{Block, BlockStats, DeviceDiskError, DiskError};
use crate::devices::virtio::{DeviceStats, VirtioDevice};

use super::persist::{DriveState, Transfer, ATA_SECTOR};
use super::status::{DRDY, DRQ, DSC, ERR};
use super::{IdeDriveConfig, IdeMedia, ATAPI_PACKET_LEN, CD_SECTOR};

/// Error register: command aborted.
pub(super) const ABRT: u8 = 0x04;

pub(super) const CMD_DEVICE_RESET: u8 = 0x08;
const CMD_RECALIBRATE: u8 = 0x10;
const CMD_READ: u8 = 0x20;
const CMD_READ_NORETRY: u8 = 0x21;
const CMD_READ_EXT: u8 = 0x24;
const CMD_WRITE: u8 = 0x30;
const CMD_WRITE_NORETRY: u8 = 0x31;
const CMD_WRITE_EXT: u8 = 0x34;
const CMD_VERIFY: u8 = 0x40;
const CMD_VERIFY_NORETRY: u8 = 0x41;
const CMD_VERIFY_EXT: u8 = 0x42;
const CMD_DIAGNOSE: u8 = 0x90;
const CMD_INIT_PARAMS: u8 = 0x91;
const CMD_PACKET: u8 = 0xa0;
const CMD_IDENTIFY_PACKET: u8 = 0xa1;
const CMD_STANDBY_IMMEDIATE: u8 = 0xe0;
const CMD_IDLE_IMMEDIATE: u8 = 0xe1;
const CMD_CHECK_POWER: u8 = 0xe5;
const CMD_FLUSH: u8 = 0xe7;
const CMD_FLUSH_EXT: u8 = 0xea;
const CMD_IDENTIFY: u8 = 0xec;
const CMD_SET_FEATURES: u8 = 0xef;

/// CHS geometry a disk reports (what QEMU picks for disks up to 8 GiB).
const HEADS: u64 = 16;
const SECTORS_PER_TRACK: u64 = 63;

/// A drive at one position.
#[derive(Debug)]
pub(super) struct Drive {
    pub id: String,
    pub media: IdeMedia,
    pub disk: Block,
    /// Capacity in the drive's sectors (512 bytes; 2048 for a CD-ROM).
    pub sectors: u64,
    pub read_only: bool,
    pub s: DriveState,
}

impl Drive {
    pub fn open(cfg: &IdeDriveConfig, active: bool) -> Result<Self, DiskError> {
        let mut config = cfg.config.clone();
        if cfg.media == IdeMedia::Cdrom {
            config.read_only = true;
        }
        let mode = if active { Mode::Active } else { Mode::Inactive };
        let mut disk = Block::open_as(&config, mode)?;
        if active {
            disk.activate()?;
        }
        let sectors = match cfg.media {
            IdeMedia::Disk => disk.sectors(),
            IdeMedia::Cdrom => disk.sectors() / (CD_SECTOR / ATA_SECTOR) as u64,
        };
        if sectors == 0 {
            return Err(DiskError::CdromTooSmall {
                image: config.image.to_string(),
            });
        }
        let mut d = Self {
            id: cfg.id.clone(),
            media: cfg.media,
            disk,
            sectors,
            read_only: config.read_only,
            s: DriveState::default(),
        };
        d.reset();
        d.s.write_cache = true;
        Ok(d)
    }

    pub fn is_cd(&self) -> bool {
        self.media == IdeMedia::Cdrom
    }

    /// Power-on, SRST or DEVICE RESET: the registers hold the signature.
    pub fn reset(&mut self) {
        let cd = self.is_cd();
        let s = &mut self.s;
        s.feature = 0;
        s.hob_feature = 0;
        s.hob_nsector = 0;
        s.hob_sector = 0;
        s.hob_lcyl = 0;
        s.hob_hcyl = 0;
        s.select = 0xa0 | (s.select & 0x10);
        s.error = 0x01;
        s.status = if cd { 0 } else { DRDY | DSC };
        s.buffer.clear();
        s.pos = 0;
        s.transfer = Transfer::Idle;
        s.sense = Default::default();
        self.set_signature();
    }

    /// The device signature (ATA: 0/0, ATAPI: 0x14/0xeb).
    fn set_signature(&mut self) {
        let cd = self.is_cd();
        let s = &mut self.s;
        s.select &= 0xf0;
        s.nsector = 1;
        s.sector = 1;
        (s.lcyl, s.hcyl) = if cd { (0x14, 0xeb) } else { (0, 0) };
    }

    pub fn identity(&self) -> String {
        self.disk.identity()
    }

    pub fn stats(&self) -> BlockStats {
        match self.disk.stats() {
            DeviceStats::Block(s) => s,
            _ => BlockStats::default(),
        }
    }

    pub fn flush(&mut self) -> Result<(), DeviceDiskError> {
        VirtioDevice::flush(&mut self.disk).map_err(|e| e.of(&self.id))
    }

    pub fn activate(&mut self) -> Result<(), DeviceDiskError> {
        self.disk.activate().map_err(|e| e.of(&self.id))
    }

    pub fn deactivate(&mut self) -> Result<(), DeviceDiskError> {
        self.disk.deactivate().map_err(|e| e.of(&self.id))
    }

    pub fn after_restore(&mut self) -> Result<(), DiskError> {
        self.disk.after_restore()
    }

    /// Ends a command with ABRT; returns that it interrupts.
    pub fn abort(&mut self) -> bool {
        self.s.transfer = Transfer::Idle;
        self.s.buffer.clear();
        self.s.pos = 0;
        self.s.error = ABRT;
        self.s.status = DRDY | ERR;
        true
    }

    /// Ends a command without data; returns that it interrupts.
    fn done(&mut self) -> bool {
        self.s.error = 0;
        self.s.status = DRDY | DSC;
        true
    }

    /// Runs command `cmd`; returns whether the drive interrupts now.
    pub fn command(&mut self, cmd: u8) -> bool {
        if self.is_cd() {
            return self.atapi_command(cmd);
        }
        match cmd {
            CMD_IDENTIFY => {
                let id = self.identify();
                self.send_block(id, Transfer::AtaRead { lba: 0, left: 0 })
            }
            CMD_READ | CMD_READ_NORETRY | CMD_READ_EXT => {
                let Some((lba, n)) = self.range(cmd == CMD_READ_EXT) else {
                    return self.abort();
                };
                self.s.transfer = Transfer::AtaRead { lba, left: n };
                self.next_read()
            }
            CMD_WRITE | CMD_WRITE_NORETRY | CMD_WRITE_EXT => {
                let Some((lba, n)) = self.range(cmd == CMD_WRITE_EXT) else {
                    return self.abort();
                };
                if self.read_only {
                    return self.abort();
                }
                self.s.transfer = Transfer::AtaWrite { lba, left: n };
                self.s.buffer = vec![0; ATA_SECTOR];
                self.s.pos = 0;
                self.s.error = 0;
                self.s.status = DRDY | DSC | DRQ;
                false
            }
            CMD_VERIFY | CMD_VERIFY_NORETRY | CMD_VERIFY_EXT => {
                if self.range(cmd == CMD_VERIFY_EXT).is_none() {
                    return self.abort();
                }
                self.done()
            }
            CMD_FLUSH | CMD_FLUSH_EXT => match self.disk.flush_image() {
                Ok(()) => self.done(),
                Err(e) => {
                    tracing::warn!("IDE {}: flush: {e}", self.id);
                    self.abort()
                }
            },
            CMD_SET_FEATURES => self.set_features(),
            CMD_DEVICE_RESET => self.abort(),
            CMD_DIAGNOSE => {
                self.set_signature();
                self.s.error = 0x01;
                self.s.status = DRDY | DSC;
                true
            }
            CMD_RECALIBRATE | CMD_INIT_PARAMS | CMD_STANDBY_IMMEDIATE | CMD_IDLE_IMMEDIATE => {
                self.done()
            }
            CMD_CHECK_POWER => {
                self.s.nsector = 0xff;
                self.done()
            }
            _ => self.abort(),
        }
    }

    /// ATA commands a packet device takes.
    fn atapi_command(&mut self, cmd: u8) -> bool {
        match cmd {
            CMD_IDENTIFY => {
                // Aborted with the signature: how a host tells ATAPI apart.
                self.set_signature();
                self.abort()
            }
            CMD_IDENTIFY_PACKET => {
                let id = self.identify_packet();
                self.send_block(id, Transfer::AtaRead { lba: 0, left: 0 })
            }
            CMD_PACKET => {
                self.s.transfer = Transfer::Packet;
                self.s.buffer = vec![0; ATAPI_PACKET_LEN];
                self.s.pos = 0;
                self.s.error = 0;
                // Interrupt reason: command (CoD), to the device.
                self.s.nsector = 0x01;
                self.s.status = DRDY | DSC | DRQ;
                false
            }
            CMD_DEVICE_RESET => {
                self.reset();
                false
            }
            CMD_DIAGNOSE => {
                self.set_signature();
                self.s.error = 0x01;
                self.s.status = 0;
                true
            }
            CMD_SET_FEATURES => self.set_features(),
            CMD_CHECK_POWER => {
                self.s.nsector = 0xff;
                self.done()
            }
            CMD_STANDBY_IMMEDIATE | CMD_IDLE_IMMEDIATE => self.done(),
            _ => self.abort(),
        }
    }

    fn set_features(&mut self) -> bool {
        match self.s.feature {
            0x02 => self.s.write_cache = true,
            0x82 => self.s.write_cache = false,
            // Transfer mode (PIO modes are all the same here), read
            // look-ahead, reverting to power-on defaults.
            0x03 | 0xaa | 0x55 | 0x66 | 0xcc => {}
            _ => return self.abort(),
        }
        self.done()
    }

    /// The first sector and the count of a read or write, when the disk
    /// holds them.
    fn range(&self, lba48: bool) -> Option<(u64, u32)> {
        let s = &self.s;
        let (lba, n) = if lba48 {
            let lba = u64::from(s.sector)
                | u64::from(s.lcyl) << 8
                | u64::from(s.hcyl) << 16
                | u64::from(s.hob_sector) << 24
                | u64::from(s.hob_lcyl) << 32
                | u64::from(s.hob_hcyl) << 40;
            let n = u32::from(s.nsector) | u32::from(s.hob_nsector) << 8;
            (lba, if n == 0 { 65536 } else { n })
        } else {
            let lba = if s.select & 0x40 != 0 {
                u64::from(s.sector)
                    | u64::from(s.lcyl) << 8
                    | u64::from(s.hcyl) << 16
                    | u64::from(s.select & 0x0f) << 24
            } else {
                // CHS, with the geometry IDENTIFY reports.
                let cyl = u64::from(s.lcyl) | u64::from(s.hcyl) << 8;
                let head = u64::from(s.select & 0x0f);
                let sect = u64::from(s.sector);
                if sect == 0 || sect > SECTORS_PER_TRACK {
                    return None;
                }
                (cyl * HEADS + head) * SECTORS_PER_TRACK + sect - 1
            };
            let n = u32::from(s.nsector);
            (lba, if n == 0 { 256 } else { n })
        };
        lba.checked_add(u64::from(n))
            .is_some_and(|end| end <= self.sectors)
            .then_some((lba, n))
    }

    /// Puts the address of sector `lba` in the task file (where a read or
    /// write got to).
    fn set_lba(&mut self, lba: u64) {
        let s = &mut self.s;
        s.sector = lba as u8;
        s.lcyl = (lba >> 8) as u8;
        s.hcyl = (lba >> 16) as u8;
        s.hob_sector = (lba >> 24) as u8;
        s.hob_lcyl = (lba >> 32) as u8;
        s.hob_hcyl = (lba >> 40) as u8;
        if s.select & 0x40 != 0 {
            s.select = (s.select & 0xf0) | ((lba >> 24) as u8 & 0x0f);
        }
    }

    /// Offers `data` to the host as one PIO block; interrupts.
    fn send_block(&mut self, data: Vec<u8>, then: Transfer) -> bool {
        self.s.buffer = data;
        self.s.pos = 0;
        self.s.transfer = then;
        self.s.error = 0;
        self.s.status = DRDY | DSC | DRQ;
        true
    }

    /// Loads the next sector of an ATA read, or ends it.
    fn next_read(&mut self) -> bool {
        let Transfer::AtaRead { lba, left } = self.s.transfer else {
            return false;
        };
        if left == 0 {
            self.s.transfer = Transfer::Idle;
            self.s.buffer.clear();
            self.s.pos = 0;
            self.s.status = DRDY | DSC;
            return false;
        }
        let mut buf = vec![0u8; ATA_SECTOR];
        if let Err(e) = self.disk.read_at(&mut buf, lba * ATA_SECTOR as u64) {
            tracing::warn!("IDE {}: read of sector {lba}: {e}", self.id);
            return self.abort();
        }
        self.set_lba(lba);
        self.send_block(
            buf,
            Transfer::AtaRead {
                lba: lba + 1,
                left: left - 1,
            },
        )
    }

    /// Writes the sector the host filled; asks for the next or ends.
    fn end_write(&mut self) -> bool {
        let Transfer::AtaWrite { lba, left } = self.s.transfer else {
            return false;
        };
        let written = self
            .disk
            .write_at(&self.s.buffer, lba * ATA_SECTOR as u64)
            .and_then(|()| {
                if self.s.write_cache {
                    Ok(())
                } else {
                    self.disk.flush_image()
                }
            });
        if let Err(e) = written {
            tracing::warn!("IDE {}: write of sector {lba}: {e}", self.id);
            return self.abort();
        }
        self.set_lba(lba);
        if left > 1 {
            self.s.transfer = Transfer::AtaWrite {
                lba: lba + 1,
                left: left - 1,
            };
            self.s.buffer.fill(0);
            self.s.pos = 0;
            self.s.status = DRDY | DSC | DRQ;
        } else {
            self.s.transfer = Transfer::Idle;
            self.s.buffer.clear();
            self.s.pos = 0;
            self.s.status = DRDY | DSC;
        }
        true
    }

    /// The host reads the data register; returns whether the drive
    /// interrupts (the next block is ready, or the command ended).
    pub fn read_data(&mut self, out: &mut [u8]) -> bool {
        let mut raise = false;
        for b in out.iter_mut() {
            let reading = matches!(
                self.s.transfer,
                Transfer::AtaRead { .. } | Transfer::AtapiIn { .. }
            );
            let pos = self.s.pos as usize;
            if !reading || self.s.status & DRQ == 0 || pos >= self.s.buffer.len() {
                *b = 0;
                continue;
            }
            *b = self.s.buffer[pos];
            self.s.pos += 1;
            if self.s.pos as usize == self.s.buffer.len() {
                raise |= match self.s.transfer {
                    Transfer::AtaRead { .. } => self.next_read(),
                    _ => self.next_chunk(),
                };
            }
        }
        raise
    }

    /// The host writes the data register; see [`Self::read_data`].
    pub fn write_data(&mut self, data: &[u8]) -> bool {
        let mut raise = false;
        for &b in data {
            let writing = matches!(
                self.s.transfer,
                Transfer::AtaWrite { .. } | Transfer::Packet
            );
            let pos = self.s.pos as usize;
            if !writing || self.s.status & DRQ == 0 || pos >= self.s.buffer.len() {
                continue;
            }
            self.s.buffer[pos] = b;
            self.s.pos += 1;
            if self.s.pos as usize == self.s.buffer.len() {
                raise |= match self.s.transfer {
                    Transfer::AtaWrite { .. } => self.end_write(),
                    _ => self.packet(),
                };
            }
        }
        raise
    }

    /// Serial number as IDENTIFY reports it.
    fn serial(&self) -> String {
        self.disk
            .config()
            .serial
            .clone()
            .unwrap_or_else(|| format!("QM{:05}", 1))
    }

    /// IDENTIFY DEVICE of an ATA disk (as QEMU's `ide-hd`, without DMA).
    fn identify(&self) -> Vec<u8> {
        let mut w = [0u16; 256];
        let total = self.sectors;
        let cyls = (total / (HEADS * SECTORS_PER_TRACK)).clamp(1, 16383);
        w[0] = 0x0040;
        w[1] = cyls as u16;
        w[3] = HEADS as u16;
        w[6] = SECTORS_PER_TRACK as u16;
        put_string(&mut w[10..20], &self.serial());
        put_string(&mut w[23..27], "2.5+");
        put_string(&mut w[27..47], "QEMU HARDDISK");
        w[47] = 0x8000;
        w[49] = (1 << 11) | (1 << 9);
        w[50] = 0x4000;
        w[51] = 0x200;
        w[52] = 0x200;
        w[53] = 0x0007;
        w[54] = cyls as u16;
        w[55] = HEADS as u16;
        w[56] = SECTORS_PER_TRACK as u16;
        let chs = cyls * HEADS * SECTORS_PER_TRACK;
        w[57] = chs as u16;
        w[58] = (chs >> 16) as u16;
        let lba28 = total.min(0x0fff_ffff);
        w[60] = lba28 as u16;
        w[61] = (lba28 >> 16) as u16;
        w[64] = 0x0003;
        w[65] = 120;
        w[66] = 120;
        w[67] = 120;
        w[68] = 120;
        w[80] = 0x00f0;
        w[81] = 0x0016;
        w[82] = (1 << 14) | (1 << 5);
        w[83] = (1 << 14) | (1 << 13) | (1 << 12) | (1 << 10);
        w[84] = 1 << 14;
        w[85] = (1 << 14) | if self.s.write_cache { 1 << 5 } else { 0 };
        w[86] = (1 << 13) | (1 << 12) | (1 << 10);
        w[87] = 1 << 14;
        for (i, word) in w[100..104].iter_mut().enumerate() {
            *word = (total >> (16 * i)) as u16;
        }
        words_to_bytes(&w)
    }

    /// IDENTIFY PACKET DEVICE of a CD-ROM (as QEMU's `ide-cd`, without DMA).
    fn identify_packet(&self) -> Vec<u8> {
        let mut w = [0u16; 256];
        // ATAPI, CD-ROM, removable, accelerated DRQ, 12-byte packets.
        w[0] = (2 << 14) | (5 << 8) | (1 << 7) | (2 << 5);
        put_string(&mut w[10..20], &self.serial());
        put_string(&mut w[23..27], "2.5+");
        put_string(&mut w[27..47], "QEMU DVD-ROM");
        w[48] = 1;
        w[49] = (1 << 11) | (1 << 9);
        w[53] = 7;
        w[64] = 3;
        w[65] = 0xb4;
        w[66] = 0xb4;
        w[67] = 0x12c;
        w[68] = 0xb4;
        w[71] = 30;
        w[72] = 30;
        w[80] = 0x1e;
        w[82] = (1 << 14) | (1 << 4);
        w[83] = 1 << 14;
        w[84] = 1 << 14;
        w[85] = (1 << 14) | (1 << 4);
        w[87] = 1 << 14;
        words_to_bytes(&w)
    }
}

/// An ATA string: space padded, two characters a word, first in the high
/// byte.
fn put_string(words: &mut [u16], s: &str) {
    let mut bytes = vec![b' '; words.len() * 2];
    for (d, c) in bytes.iter_mut().zip(s.bytes()) {
        *d = c;
    }
    for (w, pair) in words.iter_mut().zip(bytes.chunks(2)) {
        *w = u16::from(pair[0]) << 8 | u16::from(pair[1]);
    }
}

fn words_to_bytes(w: &[u16; 256]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}
