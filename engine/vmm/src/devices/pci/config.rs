//! A type-0 PCI configuration space: 64 dwords with a per-bit write mask, so
//! read-only fields, BAR sizing (write all ones, read the size mask back) and the
//! command register behave as the PCI spec says without per-register code.

use crate::devices::DeviceStateError;

/// Dword index of BAR0.
pub const BAR0_REG: usize = 4;
const COMMAND_REG: usize = 1;
const CAPABILITIES_REG: usize = 13;
const INTERRUPT_REG: usize = 15;
/// Command register: memory space decoding.
const COMMAND_MEMORY: u32 = 1 << 1;
/// Status register bit (in dword 1's high half): a capability list exists.
const STATUS_CAP_LIST: u32 = 1 << (16 + 4);
/// BAR type bits of a 64-bit, prefetchable memory BAR.
const BAR_MEM64_PREFETCH: u32 = 0b1100;

/// The configuration registers of one function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSpace {
    regs: [u32; 64],
    wmask: [u32; 64],
    /// Next free byte for a capability (capabilities start at 0x40).
    cap_next_free: usize,
    /// Offset of the last capability added (its `next` byte is patched).
    cap_last: usize,
}

impl ConfigSpace {
    /// A function with these IDs and 24-bit class code; the command register's I/O,
    /// memory, bus-master and INTx-disable bits are writable.
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut regs = [0u32; 64];
        let mut wmask = [0u32; 64];
        regs[0] = u32::from(vendor) | (u32::from(device) << 16);
        regs[2] = (class << 8) | u32::from(revision);
        wmask[COMMAND_REG] = 0x0407;
        // Interrupt line is scratch space for the OS; the pin stays 0 (no INTx).
        wmask[INTERRUPT_REG] = 0xff;
        Self {
            regs,
            wmask,
            cap_next_free: 0x40,
            cap_last: 0,
        }
    }

    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.regs[11] = u32::from(vendor) | (u32::from(id) << 16);
    }

    /// Makes BAR0/BAR1 one 64-bit prefetchable memory BAR of `size` bytes (a power
    /// of two, at least 16), placed at `address`.
    pub fn set_bar0_mem64(&mut self, size: u64, address: u64) {
        debug_assert!(size.is_power_of_two() && size >= 16);
        let mask = !(size - 1);
        self.wmask[BAR0_REG] = (mask as u32) & !0xf;
        self.wmask[BAR0_REG + 1] = (mask >> 32) as u32;
        self.regs[BAR0_REG] = (address as u32 & !0xf) | BAR_MEM64_PREFETCH;
        self.regs[BAR0_REG + 1] = (address >> 32) as u32;
    }

    /// The address BAR0 decodes, when memory decoding is on.
    pub fn bar0(&self) -> Option<u64> {
        if self.regs[COMMAND_REG] & COMMAND_MEMORY == 0 {
            return None;
        }
        let low = u64::from(self.regs[BAR0_REG] & !0xf);
        Some(low | (u64::from(self.regs[BAR0_REG + 1]) << 32))
    }

    /// Appends a capability: `body` starts with the capability ID; its `next` byte is
    /// filled in. `writable` lists (byte offset in the capability, mask) pairs.
    /// Returns the capability's offset.
    pub fn add_capability(&mut self, body: &[u8], writable: &[(usize, u8)]) -> usize {
        let at = self.cap_next_free;
        assert!(
            at + body.len() <= 256,
            "PCI capabilities overflow config space"
        );
        for (i, &b) in body.iter().enumerate() {
            self.set_byte(at + i, b);
        }
        self.set_byte(at + 1, 0);
        for &(off, mask) in writable {
            self.set_wmask_byte(at + off, mask);
        }
        if self.cap_last == 0 {
            self.regs[CAPABILITIES_REG] = at as u32;
            self.regs[COMMAND_REG] |= STATUS_CAP_LIST;
        } else {
            self.set_byte(self.cap_last + 1, at as u8);
        }
        self.cap_last = at;
        // Keep capabilities dword aligned.
        self.cap_next_free = (at + body.len() + 3) & !3;
        at
    }

    pub fn read(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// A guest write of `data` at byte `offset` of dword `reg`; read-only bits keep
    /// their value.
    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let (Some(&old), Some(&mask)) = (self.regs.get(reg), self.wmask.get(reg)) else {
            return;
        };
        let mut bytes = old.to_le_bytes();
        for (i, &b) in data.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(offset + i) {
                *slot = b;
            }
        }
        let new = u32::from_le_bytes(bytes);
        self.regs[reg] = (old & !mask) | (new & mask);
    }

    pub fn byte(&self, offset: usize) -> u8 {
        (self.regs[offset / 4] >> ((offset % 4) * 8)) as u8
    }

    pub fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let r = &mut self.regs[offset / 4];
        *r = (*r & !(0xff << shift)) | (u32::from(value) << shift);
    }

    /// Makes the bits of `mask` in byte `offset` writable by the guest.
    pub fn set_writable(&mut self, offset: usize, mask: u8) {
        self.set_wmask_byte(offset, mask);
    }

    fn set_wmask_byte(&mut self, offset: usize, mask: u8) {
        let shift = (offset % 4) * 8;
        let r = &mut self.wmask[offset / 4];
        *r = (*r & !(0xff << shift)) | (u32::from(mask) << shift);
    }

    /// The registers, for checkpoints.
    pub fn registers(&self) -> Vec<u32> {
        self.regs.to_vec()
    }

    /// Loads registers saved by [`Self::registers`] into a space built the same way:
    /// only bits the guest could have written are taken; the rest must match.
    pub fn restore(&mut self, saved: &[u32]) -> Result<(), DeviceStateError> {
        if saved.len() != self.regs.len() {
            return Err(DeviceStateError::ConfigRegisterCount {
                count: saved.len(),
                expected: self.regs.len(),
            });
        }
        for (reg, (&s, (&cur, &mask))) in saved
            .iter()
            .zip(self.regs.iter().zip(self.wmask.iter()))
            .enumerate()
        {
            // BAR type bits are read-only but part of the register, so compare only
            // read-only bits.
            if s & !mask != cur & !mask {
                return Err(DeviceStateError::ConfigReadOnly {
                    reg,
                    saved: s,
                    ours: cur,
                });
            }
        }
        self.regs.copy_from_slice(saved);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_sizing_and_read_only_ids() {
        let mut c = ConfigSpace::new(0x1af4, 0x1042, 0x01_00_00, 1);
        c.set_bar0_mem64(0x8000, 0xe010_0000);
        assert_eq!(c.bar0(), None, "memory decoding starts off");
        c.write(COMMAND_REG, 0, &[0x06, 0]);
        assert_eq!(c.bar0(), Some(0xe010_0000));
        c.write(BAR0_REG, 0, &[0xff; 4]);
        c.write(BAR0_REG + 1, 0, &[0xff; 4]);
        assert_eq!(c.read(BAR0_REG), 0xffff_8000 | BAR_MEM64_PREFETCH);
        assert_eq!(c.read(BAR0_REG + 1), 0xffff_ffff);
        c.write(BAR0_REG, 0, &0xd000_0000u32.to_le_bytes());
        c.write(BAR0_REG + 1, 0, &[0; 4]);
        assert_eq!(c.bar0(), Some(0xd000_0000));
        c.write(0, 0, &[0; 4]);
        assert_eq!(c.read(0), 0x1042_1af4);
    }

    #[test]
    fn capabilities_chain_and_restore_checks_read_only_bits() {
        let mut c = ConfigSpace::new(0x1af4, 0x1041, 0x02_00_00, 1);
        let a = c.add_capability(&[0x11, 0, 0, 0], &[(3, 0xc0)]);
        let b = c.add_capability(&[0x09, 0, 16, 1], &[]);
        assert_eq!((a, b), (0x40, 0x44));
        assert_eq!(c.read(CAPABILITIES_REG) & 0xff, 0x40);
        assert_eq!(c.byte(0x41), 0x44);
        assert_eq!(c.byte(0x45), 0);
        assert_ne!(c.read(COMMAND_REG) & STATUS_CAP_LIST, 0);
        c.write(0x40 / 4, 3, &[0xff]);
        assert_eq!(c.byte(0x43), 0xc0);
        let saved = c.registers();
        let mut d = ConfigSpace::new(0x1af4, 0x1041, 0x02_00_00, 1);
        d.add_capability(&[0x11, 0, 0, 0], &[(3, 0xc0)]);
        d.add_capability(&[0x09, 0, 16, 1], &[]);
        d.restore(&saved).unwrap();
        assert_eq!(d, c);
        let mut other = ConfigSpace::new(0x1af4, 0x1042, 0x01_00_00, 1);
        assert!(other
            .restore(&saved)
            .unwrap_err()
            .to_string()
            .contains("register 0x0"));
    }
}
