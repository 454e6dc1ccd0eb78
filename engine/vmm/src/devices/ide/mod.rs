//! The PIIX3's IDE controller, as QEMU's `pc` machine has it: the ISA bridge
//! at 00:01.0 (8086:7000, the function 0 the slot needs) and the IDE function
//! at 00:01.1 (8086:7010, class 0x010180) with both channels in legacy mode:
//! primary at ports 0x1f0-0x1f7 and 0x3f6 on IRQ 14, secondary at
//! 0x170-0x177 and 0x376 on IRQ 15. Each channel has two positions (unit 0
//! and 1) for an ATA disk or an ATAPI CD-ROM.
//!
//! Transfers are PIO only: BAR4 (bus-master DMA) is absent, which Linux's
//! `ata_piix` answers with "BAR4 is zero, falling back to PIO". The
//! registers behave as ATA/ATAPI-6 and QEMU's `hw/ide` say; ATAPI answers
//! the MMC commands firmware and Linux send (see [`atapi`]).
//!
//! Each drive's image is a [`crate::devices::virtio::blk::Block`] on a
//! [`BlockConfig`]: opened, locked, activated and deactivated exactly as a
//! virtio disk's. A CD-ROM is always read-only, so its lock shares the image
//! with other readers.
//! All work runs on the vCPU thread that touched a port, under the
//! controller's lock: a paused VM has no transfer in flight beyond what
//! [`IdeState`] carries.

mod atapi;
mod drive;
mod persist;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use kvm_ioctls::VmFd;

pub use persist::{ChannelState, DriveState, IdeState, Sense, Transfer};

use crate::devices::pci::ConfigSpace;
#[cfg(test)]
use crate::devices::virtio::blk::Block;
use crate::devices::virtio::blk::BlockConfig;
use crate::devices::virtio::blk::DeviceDiskError;
use crate::devices::DeviceStateError;
use drive::Drive;

/// PCI slot of the PIIX3 (function 0: ISA bridge, 1: IDE).
pub const PIIX3_SLOT: u8 = 1;
/// ISA interrupt of each channel.
pub const IDE_IRQS: [u32; 2] = [14, 15];
/// First command-block port of each channel.
pub const COMMAND_PORTS: [u16; 2] = [0x1f0, 0x170];
/// Device control / alternate status port of each channel.
pub const CONTROL_PORTS: [u16; 2] = [0x3f6, 0x376];
/// Bytes in a CD-ROM sector.
pub const CD_SECTOR: usize = 2048;
/// Bytes in an ATAPI command packet.
pub(crate) const ATAPI_PACKET_LEN: usize = 12;
/// Largest ATAPI DRQ chunk (the byte-count limit 0xffff rounds down to it).
pub(crate) const MAX_CHUNK: usize = 0xfffe;

/// Status register bits.
pub mod status {
    pub const BSY: u8 = 0x80;
    pub const DRDY: u8 = 0x40;
    pub const DSC: u8 = 0x10;
    pub const DRQ: u8 = 0x08;
    pub const ERR: u8 = 0x01;
}

/// Device control register bits.
const CONTROL_NIEN: u8 = 0x02;
const CONTROL_SRST: u8 = 0x04;
const CONTROL_HOB: u8 = 0x80;

/// What sits at an IDE position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdeMedia {
    /// An ATA disk (read and write unless its image is read-only).
    Disk,
    /// An ATAPI CD-ROM (read-only, 2048-byte sectors).
    Cdrom,
}

impl IdeMedia {
    /// QEMU's device name (`ide-hd`, `ide-cd`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Disk => "ide-hd",
            Self::Cdrom => "ide-cd",
        }
    }
}

/// A drive on the IDE controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdeDriveConfig {
    /// Channel: 0 primary, 1 secondary.
    pub bus: u8,
    /// Position on the channel: 0 master, 1 slave.
    pub unit: u8,
    pub media: IdeMedia,
    /// Names the drive in logs and errors (libvirt's device id).
    pub id: String,
    /// The image; `read_only` is forced on for a CD-ROM, and `serial`
    /// (up to 20 bytes) is what IDENTIFY reports.
    pub config: BlockConfig,
}

/// The line a channel raises its interrupt on.
pub trait IrqLine: Send + Sync + std::fmt::Debug {
    /// Sets ISA interrupt `irq` to `level`.
    fn set_level(&self, irq: u32, level: bool);
}

/// The in-kernel irqchip's lines (KVM_IRQ_LINE): the PIC and I/O APIC see
/// the level, as they would a PIIX3's.
#[derive(Debug)]
pub struct KvmIrqLine(pub Arc<VmFd>);

impl IrqLine for KvmIrqLine {
    fn set_level(&self, irq: u32, level: bool) {
        if let Err(e) = self.0.set_irq_line(irq, level) {
            tracing::warn!("IDE: cannot set IRQ {irq} to {level}: {e}");
        }
    }
}

/// One channel: two positions, the selected unit, the control register.
#[derive(Debug)]
struct Channel {
    drives: [Option<Drive>; 2],
    unit: usize,
    control: u8,
    /// An interrupt is pending (the status register was not read since).
    pending: bool,
    /// The level last put on the line.
    line: bool,
    irq: u32,
}

impl Channel {
    fn selected(&mut self) -> Option<&mut Drive> {
        self.drives[self.unit].as_mut()
    }

    fn any(&self) -> Option<&Drive> {
        self.drives.iter().flatten().next()
    }

    fn update_line(&mut self, irq: &dyn IrqLine) {
        let level = self.pending && self.control & CONTROL_NIEN == 0;
        if level != self.line {
            self.line = level;
            irq.set_level(self.irq, level);
        }
    }

    fn interrupt(&mut self, raise: bool, irq: &dyn IrqLine) {
        if raise {
            self.pending = true;
            self.update_line(irq);
        }
    }

    fn read(&mut self, reg: u16, irq: &dyn IrqLine) -> u8 {
        let hob = self.control & CONTROL_HOB != 0;
        if reg == 6 {
            return self.any().map_or(0, |d| d.s.select);
        }
        if reg == 7 {
            self.pending = false;
            self.update_line(irq);
        }
        let Some(d) = self.selected() else {
            return 0;
        };
        let s = &d.s;
        match (reg, hob) {
            (1, false) => s.error,
            (1, true) => s.hob_feature,
            (2, false) => s.nsector,
            (2, true) => s.hob_nsector,
            (3, false) => s.sector,
            (3, true) => s.hob_sector,
            (4, false) => s.lcyl,
            (4, true) => s.hob_lcyl,
            (5, false) => s.hcyl,
            (5, true) => s.hob_hcyl,
            _ => s.status,
        }
    }

    fn write(&mut self, reg: u16, v: u8, irq: &dyn IrqLine) {
        // Writing any command-block register clears HOB.
        self.control &= !CONTROL_HOB;
        match reg {
            1..=5 => {
                for d in self.drives.iter_mut().flatten() {
                    let s = &mut d.s;
                    let (cur, hob) = match reg {
                        1 => (&mut s.feature, &mut s.hob_feature),
                        2 => (&mut s.nsector, &mut s.hob_nsector),
                        3 => (&mut s.sector, &mut s.hob_sector),
                        4 => (&mut s.lcyl, &mut s.hob_lcyl),
                        _ => (&mut s.hcyl, &mut s.hob_hcyl),
                    };
                    *hob = *cur;
                    *cur = v;
                }
            }
            6 => {
                for d in self.drives.iter_mut().flatten() {
                    d.s.select = v | 0xa0;
                }
                self.unit = usize::from((v >> 4) & 1);
            }
            _ => {
                let Some(d) = self.selected() else { return };
                if d.s.status & status::BSY != 0 && v != drive::CMD_DEVICE_RESET {
                    return;
                }
                let raise = d.command(v);
                self.pending = false;
                self.update_line(irq);
                self.interrupt(raise, irq);
            }
        }
    }

    fn write_control(&mut self, v: u8, irq: &dyn IrqLine) {
        let was = self.control & CONTROL_SRST != 0;
        let now = v & CONTROL_SRST != 0;
        if !was && now {
            for d in self.drives.iter_mut().flatten() {
                d.s.status = status::BSY | status::DSC;
                d.s.error = 0x01;
            }
        } else if was && !now {
            for d in self.drives.iter_mut().flatten() {
                d.reset();
            }
            self.unit = 0;
        }
        self.control = v;
        self.update_line(irq);
    }
}

/// The PIIX3: ISA bridge and IDE function, and the drives.
#[derive(Debug)]
pub struct Piix3 {
    isa: ConfigSpace,
    ide: ConfigSpace,
    channels: [Channel; 2],
    irq: Arc<dyn IrqLine>,
}

/// The ISA bridge's configuration space (multi-function header).
fn isa_bridge() -> ConfigSpace {
    let mut c = ConfigSpace::new(0x8086, 0x7000, 0x06_01_00, 0);
    c.set_subsystem(0x1af4, 0x1100);
    c.set_byte(0x04, 0x07);
    c.set_byte(0x0e, 0x80);
    // PIRQ route control: all disabled, writable (firmware routes them).
    for off in 0x60..0x64 {
        c.set_byte(off, 0x80);
        c.set_writable(off, 0x8f);
    }
    c
}

/// The IDE function's configuration space: legacy mode, no BAR4, both
/// channels' decode enabled in IDETIM as firmware leaves them.
fn ide_function() -> ConfigSpace {
    let mut c = ConfigSpace::new(0x8086, 0x7010, 0x01_01_80, 0);
    c.set_subsystem(0x1af4, 0x1100);
    for off in 0x40..0x44 {
        c.set_writable(off, 0xff);
    }
    c.set_byte(0x41, 0x80);
    c.set_byte(0x43, 0x80);
    c
}

/// An IDE configuration the PIIX3 refuses, or a drive that cannot open.
#[derive(Debug, thiserror::Error)]
pub enum IdeError {
    #[error("{id}: IDE position bus {bus} unit {unit} does not exist (bus 0 or 1, unit 0 or 1)")]
    NoPosition { id: String, bus: u8, unit: u8 },
    #[error("{first} and {second} are both at IDE bus {bus} unit {unit}")]
    SamePosition {
        first: String,
        second: String,
        bus: u8,
        unit: u8,
    },
    #[error("{0}")]
    Drive(#[source] DeviceDiskError),
}

impl Piix3 {
    /// The controller with `drives` at their positions, opened inactive
    /// unless `active` (as [`Block::open_inactive`] and activate do).
    pub fn new(
        drives: &[IdeDriveConfig],
        active: bool,
        irq: Arc<dyn IrqLine>,
    ) -> Result<Self, IdeError> {
        let mut channels = [0, 1].map(|i| Channel {
            drives: [None, None],
            unit: 0,
            control: 0,
            pending: false,
            line: false,
            irq: IDE_IRQS[i],
        });
        for cfg in drives {
            if cfg.bus > 1 || cfg.unit > 1 {
                return Err(IdeError::NoPosition {
                    id: cfg.id.clone(),
                    bus: cfg.bus,
                    unit: cfg.unit,
                });
            }
            let slot = &mut channels[usize::from(cfg.bus)].drives[usize::from(cfg.unit)];
            if let Some(other) = slot {
                return Err(IdeError::SamePosition {
                    first: other.id.clone(),
                    second: cfg.id.clone(),
                    bus: cfg.bus,
                    unit: cfg.unit,
                });
            }
            *slot = Some(Drive::open(cfg, active).map_err(|e| IdeError::Drive(e.of(&cfg.id)))?);
        }
        Ok(Self {
            isa: isa_bridge(),
            ide: ide_function(),
            channels,
            irq,
        })
    }

    /// Whether `port` is one of the controller's.
    pub fn claims_port(port: u16) -> bool {
        COMMAND_PORTS
            .iter()
            .any(|&base| (base..base + 8).contains(&port))
            || CONTROL_PORTS.contains(&port)
    }

    fn decode(port: u16) -> Option<(usize, Option<u16>)> {
        for ch in 0..2 {
            if (COMMAND_PORTS[ch]..COMMAND_PORTS[ch] + 8).contains(&port) {
                return Some((ch, Some(port - COMMAND_PORTS[ch])));
            }
            if port == CONTROL_PORTS[ch] {
                return Some((ch, None));
            }
        }
        None
    }

    /// A guest read of `data.len()` bytes at `port` (the data register
    /// streams, the others repeat).
    pub fn io_read(&mut self, port: u16, data: &mut [u8]) {
        let Some((ch, reg)) = Self::decode(port) else {
            data.fill(0xff);
            return;
        };
        let irq = self.irq.clone();
        let c = &mut self.channels[ch];
        match reg {
            Some(0) => {
                let raise = match c.selected() {
                    Some(d) => d.read_data(data),
                    None => {
                        data.fill(0);
                        false
                    }
                };
                c.interrupt(raise, &*irq);
            }
            Some(r) => {
                for b in data.iter_mut() {
                    *b = c.read(r, &*irq);
                }
            }
            None => {
                let v = c.selected().map_or(0, |d| d.s.status);
                data.fill(v);
            }
        }
    }

    /// A guest write of `data` at `port`.
    pub fn io_write(&mut self, port: u16, data: &[u8]) {
        let Some((ch, reg)) = Self::decode(port) else {
            return;
        };
        let irq = self.irq.clone();
        let c = &mut self.channels[ch];
        match reg {
            Some(0) => {
                let raise = c.selected().is_some_and(|d| d.write_data(data));
                c.interrupt(raise, &*irq);
            }
            Some(r) => {
                for &b in data {
                    c.write(r, b, &*irq);
                }
            }
            None => {
                for &b in data {
                    c.write_control(b, &*irq);
                }
            }
        }
    }

    /// Config space of function `function` of slot [`PIIX3_SLOT`].
    pub fn config(&self, function: u8) -> Option<&ConfigSpace> {
        match function {
            0 => Some(&self.isa),
            1 => Some(&self.ide),
            _ => None,
        }
    }

    pub fn config_write(&mut self, function: u8, reg: usize, offset: usize, data: &[u8]) {
        match function {
            0 => self.isa.write(reg, offset, data),
            1 => self.ide.write(reg, offset, data),
            _ => {}
        }
    }

    fn drives(&self) -> impl Iterator<Item = &Drive> {
        self.channels.iter().flat_map(|c| c.drives.iter().flatten())
    }

    fn drives_mut(&mut self) -> impl Iterator<Item = &mut Drive> {
        self.channels
            .iter_mut()
            .flat_map(|c| c.drives.iter_mut().flatten())
    }

    /// The controller and each drive, as a destination must have them:
    /// `piix3-ide@01.1`, then `ide-cd@0.1:<sectors>s-ro` per drive.
    pub fn shape_names(&self) -> Vec<String> {
        let mut names = vec![format!("piix3-ide@{PIIX3_SLOT:02x}.1")];
        for (b, c) in self.channels.iter().enumerate() {
            for (u, d) in c.drives.iter().enumerate() {
                if let Some(d) = d {
                    names.push(format!("{}@{b}.{u}:{}", d.media.name(), d.identity()));
                }
            }
        }
        names
    }

    /// Each drive's id and I/O counters, by position.
    pub fn stats(&self) -> Vec<(String, crate::devices::virtio::blk::BlockStats)> {
        self.drives().map(|d| (d.id.clone(), d.stats())).collect()
    }

    /// Makes every write durable (before a switch-over or checkpoint).
    pub fn flush(&mut self) -> Result<(), DeviceDiskError> {
        self.drives_mut().try_for_each(Drive::flush)
    }

    /// Takes every drive's image locks (see `VirtioDevice::activate`).
    pub fn activate(&mut self) -> Result<(), DeviceDiskError> {
        self.drives_mut().try_for_each(Drive::activate)
    }

    /// Lets go of every drive's image locks (see `VirtioDevice::deactivate`).
    pub fn deactivate(&mut self) -> Result<(), DeviceDiskError> {
        self.drives_mut().try_for_each(Drive::deactivate)
    }

    /// The controller's state, for checkpoints; the VM is paused.
    pub fn state(&self) -> IdeState {
        IdeState {
            isa_config: self.isa.registers(),
            ide_config: self.ide.registers(),
            channels: self
                .channels
                .iter()
                .map(|c| ChannelState {
                    unit: c.unit as u8,
                    control: c.control,
                    irq: c.pending,
                    drives: c
                        .drives
                        .iter()
                        .map(|d| d.as_ref().map(|d| d.s.clone()))
                        .collect(),
                })
                .collect(),
        }
    }

    /// Loads `s` into this (never run) controller: everything is checked
    /// first, as a hostile stream's, and nothing changes when it is refused.
    /// Then the drives open their images again and take their locks (see
    /// `VirtioDevice::after_restore`), and the interrupt lines are set.
    pub fn restore(&mut self, s: &IdeState) -> Result<(), DeviceStateError> {
        let (isa, ide) = self.check(s)?;
        self.isa = isa;
        self.ide = ide;
        for (c, cs) in self.channels.iter_mut().zip(&s.channels) {
            c.unit = usize::from(cs.unit);
            c.control = cs.control;
            c.pending = cs.irq;
            for (d, ds) in c.drives.iter_mut().zip(&cs.drives) {
                if let (Some(d), Some(ds)) = (d, ds) {
                    d.s = ds.clone();
                }
            }
        }
        for d in self.drives_mut() {
            d.after_restore()
                .map_err(|e| DeviceStateError::from(e).of(format!("IDE drive {}", d.id)))?;
        }
        let irq = self.irq.clone();
        for c in &mut self.channels {
            c.line = c.pending && c.control & CONTROL_NIEN == 0;
            irq.set_level(c.irq, c.line);
        }
        Ok(())
    }

    /// Whether this controller could load `s` (see [`Self::restore`]);
    /// returns the config spaces it would have. Changes nothing.
    pub fn check(&self, s: &IdeState) -> Result<(ConfigSpace, ConfigSpace), DeviceStateError> {
        let mut isa = self.isa.clone();
        isa.restore(&s.isa_config)
            .map_err(|e| e.of("PIIX3 ISA bridge"))?;
        let mut ide = self.ide.clone();
        ide.restore(&s.ide_config).map_err(|e| e.of("PIIX3 IDE"))?;
        if s.channels.len() != 2 {
            return Err(DeviceStateError::IdeChannels(s.channels.len()));
        }
        for (b, (c, cs)) in self.channels.iter().zip(&s.channels).enumerate() {
            if cs.unit > 1 || cs.drives.len() != 2 {
                return Err(DeviceStateError::IdeChannel {
                    bus: b,
                    unit: cs.unit,
                    positions: cs.drives.len(),
                });
            }
            for (u, (d, ds)) in c.drives.iter().zip(&cs.drives).enumerate() {
                match (d, ds) {
                    (None, None) => {}
                    (Some(d), Some(ds)) => ds
                        .check(d.media, d.sectors, d.read_only)
                        .map_err(|e| e.of(format!("IDE drive {} at {b}.{u}", d.id)))?,
                    _ => {
                        return Err(DeviceStateError::IdeDrivePresence {
                            bus: b,
                            unit: u,
                            in_state: ds.is_some(),
                            in_vm: d.is_some(),
                        })
                    }
                }
            }
        }
        Ok((isa, ide))
    }
}

/// The block device under a drive, for the lock tests.
#[cfg(test)]
impl Piix3 {
    fn block(&self, bus: usize, unit: usize) -> Option<&Block> {
        self.channels[bus].drives[unit].as_ref().map(|d| &d.disk)
    }
}
