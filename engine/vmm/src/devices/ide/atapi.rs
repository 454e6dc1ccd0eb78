//! ATAPI packets of a CD-ROM: the SCSI/MMC commands firmware and Linux's
//! `sr` send. Data goes to the host in DRQ chunks of at most the byte-count
//! limit the host put in the cylinder registers (whole 2048-byte sectors
//! when the limit allows); every command ends with an interrupt and the
//! interrupt reason "I/O, command" (3). A failed command ends with CHECK
//! CONDITION: ERR in the status, the sense key in the error register's top
//! half, and sense data for REQUEST SENSE.

use super::drive::Drive;
use super::persist::{Sense, Transfer};
use super::status::{DRDY, DRQ, DSC, ERR};
use super::{CD_SECTOR, MAX_CHUNK};

const TEST_UNIT_READY: u8 = 0x00;
const REQUEST_SENSE: u8 = 0x03;
const INQUIRY: u8 = 0x12;
const START_STOP_UNIT: u8 = 0x1b;
const PREVENT_ALLOW: u8 = 0x1e;
const READ_CAPACITY: u8 = 0x25;
const READ_10: u8 = 0x28;
const SEEK_10: u8 = 0x2b;
const READ_TOC: u8 = 0x43;
const GET_CONFIGURATION: u8 = 0x46;
const GET_EVENT_STATUS: u8 = 0x4a;
const MODE_SENSE_10: u8 = 0x5a;
const READ_12: u8 = 0xa8;
const SET_CD_SPEED: u8 = 0xbb;

/// Sense keys.
pub(super) const MEDIUM_ERROR: u8 = 0x03;
pub(super) const ILLEGAL_REQUEST: u8 = 0x05;
/// Additional sense codes.
const ASC_UNRECOVERED_READ: u8 = 0x11;
const ASC_INVALID_OPCODE: u8 = 0x20;
const ASC_LBA_OUT_OF_RANGE: u8 = 0x21;
const ASC_INVALID_FIELD: u8 = 0x24;
const ASC_SAVING_NOT_SUPPORTED: u8 = 0x39;

/// More CD sectors than a CD holds: QEMU reports such an image as a DVD.
const CD_MAX_SECTORS: u64 = 80 * 60 * 75;

/// Interrupt reasons (the sector count register during a packet command).
const REASON_DATA_IN: u8 = 0x02;
const REASON_STATUS: u8 = 0x03;

fn be16(p: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([p[0], p[1]]))
}

fn be32(p: &[u8]) -> u32 {
    u32::from_be_bytes([p[0], p[1], p[2], p[3]])
}

/// `lba` as minute, second, frame (with the 2-second pregap).
fn msf(lba: u64) -> [u8; 4] {
    let x = lba + 150;
    [
        0,
        (x / (75 * 60)) as u8,
        ((x / 75) % 60) as u8,
        (x % 75) as u8,
    ]
}

impl Drive {
    /// The host wrote the whole command packet: run it.
    pub(super) fn packet(&mut self) -> bool {
        let p: [u8; 12] = self.s.buffer[..12]
            .try_into()
            .expect("packet buffer is 12 bytes");
        // The byte-count limit the host set before PACKET (0xffff means
        // 0xfffe: chunks stay even).
        let limit = match u16::from(self.s.lcyl) | u16::from(self.s.hcyl) << 8 {
            0 | 1 | 0xffff => MAX_CHUNK as u16,
            l => l,
        };
        self.s.buffer.clear();
        self.s.pos = 0;
        let sense = std::mem::take(&mut self.s.sense);
        match p[0] {
            TEST_UNIT_READY | START_STOP_UNIT | SEEK_10 | SET_CD_SPEED => self.atapi_ok(),
            REQUEST_SENSE => {
                let mut r = vec![0u8; 18];
                r[0] = 0x70;
                r[2] = sense.key;
                r[7] = 10;
                r[12] = sense.asc;
                r[13] = sense.ascq;
                self.reply(r, usize::from(p[4]), limit)
            }
            INQUIRY => {
                if p[1] & 1 != 0 {
                    return self.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD);
                }
                let mut r = vec![0u8; 36];
                r[0] = 0x05;
                r[1] = 0x80;
                r[3] = 0x21;
                r[4] = 31;
                r[8..16].copy_from_slice(b"QEMU    ");
                r[16..32].copy_from_slice(b"QEMU DVD-ROM    ");
                r[32..36].copy_from_slice(b"2.5+");
                self.reply(r, be16(&p[3..5]), limit)
            }
            PREVENT_ALLOW => {
                self.s.locked = p[4] & 1 != 0;
                self.atapi_ok()
            }
            READ_CAPACITY => {
                let last = (self.sectors - 1).min(u64::from(u32::MAX)) as u32;
                let mut r = last.to_be_bytes().to_vec();
                r.extend_from_slice(&(CD_SECTOR as u32).to_be_bytes());
                self.reply(r, 8, limit)
            }
            READ_10 => self.read(be32(&p[2..6]), be16(&p[7..9]) as u32, limit),
            READ_12 => self.read(be32(&p[2..6]), be32(&p[6..10]), limit),
            READ_TOC => self.read_toc(&p, limit),
            MODE_SENSE_10 => self.mode_sense(&p, limit),
            GET_CONFIGURATION => {
                let dvd = self.sectors > CD_MAX_SECTORS;
                let profile: u16 = if dvd { 0x0010 } else { 0x0008 };
                let mut r = vec![0u8; 8];
                r[6..8].copy_from_slice(&profile.to_be_bytes());
                if be16(&p[2..4]) == 0 {
                    // Feature 0, the profile list: DVD-ROM, CD-ROM.
                    r.extend_from_slice(&[0, 0, 0x03, 8, 0, 0x10, u8::from(dvd), 0]);
                    r.extend_from_slice(&[0, 0x08, u8::from(!dvd), 0]);
                }
                let len = (r.len() - 4) as u32;
                r[0..4].copy_from_slice(&len.to_be_bytes());
                self.reply(r, be16(&p[7..9]), limit)
            }
            GET_EVENT_STATUS => {
                if p[1] & 1 == 0 {
                    // Only polled operation.
                    return self.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD);
                }
                let r = if p[4] & 0x10 != 0 {
                    // Media class: no change, media present.
                    vec![0, 6, 0x04, 0x10, 0, 0x02, 0, 0]
                } else {
                    // No event available of a requested class.
                    vec![0, 2, 0x80, 0x10]
                };
                self.reply(r, be16(&p[7..9]), limit)
            }
            _ => self.check(ILLEGAL_REQUEST, ASC_INVALID_OPCODE),
        }
    }

    /// READ(10)/READ(12): `n` sectors from `lba`.
    fn read(&mut self, lba: u32, n: u32, limit: u16) -> bool {
        if u64::from(lba) + u64::from(n) > self.sectors {
            return self.check(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE);
        }
        if n == 0 {
            return self.atapi_ok();
        }
        self.s.transfer = Transfer::AtapiIn {
            lba,
            sectors: n,
            pending: Vec::new(),
            limit,
        };
        self.next_chunk()
    }

    fn read_toc(&mut self, p: &[u8; 12], limit: u16) -> bool {
        let time = p[1] & 2 != 0;
        let format = match p[2] & 0x0f {
            0 => p[9] >> 6,
            f => f,
        };
        let addr = |lba: u64| {
            if time {
                msf(lba)
            } else {
                (lba as u32).to_be_bytes()
            }
        };
        let mut r = vec![0u8, 0, 1, 1];
        match format {
            0 => {
                let start = p[6];
                if start > 1 && start != 0xaa {
                    return self.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD);
                }
                if start <= 1 {
                    r.extend_from_slice(&[0, 0x14, 1, 0]);
                    r.extend_from_slice(&addr(0));
                }
                r.extend_from_slice(&[0, 0x16, 0xaa, 0]);
                r.extend_from_slice(&addr(self.sectors));
            }
            1 => {
                // Multi-session information: one session, track 1 at 0.
                r.extend_from_slice(&[0, 0x14, 1, 0]);
                r.extend_from_slice(&addr(0));
            }
            _ => return self.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD),
        }
        let len = (r.len() - 2) as u16;
        r[0..2].copy_from_slice(&len.to_be_bytes());
        self.reply(r, be16(&p[7..9]), limit)
    }

    fn mode_sense(&mut self, p: &[u8; 12], limit: u16) -> bool {
        let control = p[2] >> 6;
        let page = p[2] & 0x3f;
        if control == 3 {
            return self.check(ILLEGAL_REQUEST, ASC_SAVING_NOT_SUPPORTED);
        }
        let error_recovery = [0x01u8, 0x06, 0x00, 0x05, 0, 0, 0, 0];
        let capabilities = [
            0x2au8,
            0x12,
            0x70,
            0x00,
            0x71,
            0x60 | if self.s.locked { 0x02 } else { 0 },
            0x29,
            0x00,
            0x02,
            0xc2,
            0x00,
            0x02,
            0x02,
            0x00,
            0x02,
            0xc2,
            0,
            0,
            0,
            0,
        ];
        let mut r = vec![0u8, 0, 0x70, 0, 0, 0, 0, 0];
        match page {
            0x01 => r.extend_from_slice(&error_recovery),
            0x2a => r.extend_from_slice(&capabilities),
            0x3f => {
                r.extend_from_slice(&error_recovery);
                r.extend_from_slice(&capabilities);
            }
            _ => return self.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD),
        }
        let len = (r.len() - 2) as u16;
        r[0..2].copy_from_slice(&len.to_be_bytes());
        self.reply(r, be16(&p[7..9]), limit)
    }

    /// Sends `data` (cut to the allocation length `alloc`) to the host.
    fn reply(&mut self, mut data: Vec<u8>, alloc: usize, limit: u16) -> bool {
        data.truncate(alloc);
        self.s.transfer = Transfer::AtapiIn {
            lba: 0,
            sectors: 0,
            pending: data,
            limit,
        };
        self.next_chunk()
    }

    /// Offers the next DRQ chunk, or ends the command when all went.
    pub(super) fn next_chunk(&mut self) -> bool {
        let sectors_total = self.sectors;
        let Transfer::AtapiIn {
            lba,
            sectors,
            pending,
            limit,
        } = &mut self.s.transfer
        else {
            return false;
        };
        let left = pending.len() as u64 + u64::from(*sectors) * CD_SECTOR as u64;
        if left == 0 {
            return self.atapi_ok();
        }
        let mut chunk = u64::from(*limit).min(left);
        if *sectors > 0 && chunk >= CD_SECTOR as u64 {
            chunk -= chunk % CD_SECTOR as u64;
        } else if chunk < left && chunk % 2 == 1 {
            chunk -= 1;
        }
        let chunk = chunk as usize;
        let mut failed = false;
        while pending.len() < chunk {
            let start = pending.len();
            pending.resize(start + CD_SECTOR, 0);
            let at = u64::from(*lba) * CD_SECTOR as u64;
            let read = if u64::from(*lba) < sectors_total {
                self.disk.read_at(&mut pending[start..], at)
            } else {
                Err(std::io::Error::other("past the end of the disc"))
            };
            if let Err(e) = read {
                tracing::warn!("IDE {}: read of CD sector {lba}: {e}", self.id);
                failed = true;
                break;
            }
            *lba += 1;
            *sectors -= 1;
        }
        if failed {
            return self.check(MEDIUM_ERROR, ASC_UNRECOVERED_READ);
        }
        let data: Vec<u8> = pending.drain(..chunk).collect();
        self.s.buffer = data;
        self.s.pos = 0;
        self.s.lcyl = chunk as u8;
        self.s.hcyl = (chunk >> 8) as u8;
        self.s.nsector = REASON_DATA_IN;
        self.s.error = 0;
        self.s.status = DRDY | DSC | DRQ;
        true
    }

    /// Ends the packet command with GOOD status.
    fn atapi_ok(&mut self) -> bool {
        self.s.transfer = Transfer::Idle;
        self.s.buffer.clear();
        self.s.pos = 0;
        self.s.error = 0;
        self.s.nsector = REASON_STATUS;
        self.s.status = DRDY | DSC;
        true
    }

    /// Ends the packet command with CHECK CONDITION and sense `key`/`asc`.
    pub(super) fn check(&mut self, key: u8, asc: u8) -> bool {
        self.s.transfer = Transfer::Idle;
        self.s.buffer.clear();
        self.s.pos = 0;
        self.s.sense = Sense { key, asc, ascq: 0 };
        self.s.error = key << 4;
        self.s.nsector = REASON_STATUS;
        self.s.status = DRDY | ERR;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::msf;

    #[test]
    fn msf_counts_the_pregap() {
        assert_eq!(msf(0), [0, 0, 2, 0]);
        assert_eq!(msf(75 * 60 - 150), [0, 1, 0, 0]);
    }
}
