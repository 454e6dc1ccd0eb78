//! A PCI bus 0 reached through configuration mechanism #1 (ports 0xcf8-0xcff), as
//! on QEMU's `pc` machine: an i440FX host bridge at 00.0 and the virtio devices at
//! the slots their configuration names. Memory BARs are placed by the VMM (as
//! firmware would) in the 32-bit hole; a guest may move them, and MMIO follows.
//! A VM with IDE drives has the PIIX3 in slot 1 (ISA bridge at function 0, IDE
//! at function 1, [`crate::devices::ide`]).

mod config;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

pub use config::{ConfigSpace, BAR0_REG};

use crate::devices::acpi_pm::{AcpiPm, PM_FUNCTION};
use crate::devices::ide::{Piix3, PIIX3_SLOT};
use crate::devices::virtio::{VirtioPci, Worker, WorkerError};
use crate::devices::DeviceStateError;

/// CONFIG_ADDRESS register (a dword at 0xcf8).
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// CONFIG_DATA window (0xcfc-0xcff).
pub const CONFIG_DATA: u16 = 0xcfc;
/// Base of the window BARs are placed in (QEMU's `pc` machine uses the same hole).
pub const BAR_WINDOW: u64 = 0xe000_0000;
/// Each slot gets this much of the window for its BAR.
pub const BAR_STRIDE: u64 = 0x10_0000;
/// Highest device number on a bus.
pub const MAX_SLOT: u8 = 31;

/// i440FX PAM registers: PAM0 (0x59, the BIOS segment 0xf0000 in its high
/// nibble) and PAM1-6 (0x5a-0x5f, two 16 KiB segments each from 0xc0000).
pub const I440FX_PAM: usize = 0x59;
/// Number of PAM registers.
pub const I440FX_PAM_REGS: usize = 7;
/// i440FX SMRAM control register.
pub const I440FX_SMRAM: usize = 0x72;
/// Its reset value: SMRAM closed and disabled, C_BASE_SEG = 0xa0000.
const SMRAM_RESET: u8 = 0x02;

/// The i440FX host bridge's configuration. The guest may write the PAM and
/// SMRAM registers, as the firmware programs them; their values are kept and
/// migrated but change no memory mapping: 0xc0000-0xfffff is always RAM (see
/// [`crate::firmware`]), and ferry has no SMM, so SMRAM never opens.
fn host_bridge() -> ConfigSpace {
    let mut c = ConfigSpace::new(0x8086, 0x1237, 0x06_00_00, 0x02);
    c.set_subsystem(0x1af4, 0x1100);
    c.set_writable(I440FX_PAM, 0x30);
    for i in 1..I440FX_PAM_REGS {
        c.set_writable(I440FX_PAM + i, 0x33);
    }
    c.set_byte(I440FX_SMRAM, SMRAM_RESET);
    // D_OPEN, D_CLS, D_LCK, G_SMRAME (QEMU's mask).
    c.set_writable(I440FX_SMRAM, 0x78);
    c
}

/// Bus 0: the host bridge and the virtio functions (function 0 of their slot).
#[derive(Debug)]
pub struct PciBus {
    address: AtomicU32,
    bridge: Mutex<ConfigSpace>,
    devices: Vec<(u8, Arc<Mutex<VirtioPci>>)>,
    /// The PIIX3 in slot 1, on a VM with IDE drives or ACPI.
    ide: Option<Arc<Mutex<Piix3>>>,
    /// The PIIX4 PM function (00:01.3), on a VM with ACPI (and then a PIIX3).
    pm: Option<Arc<Mutex<AcpiPm>>>,
    /// Device threads (virtio-net receive); emptied by [`Self::shutdown`].
    workers: Mutex<Vec<Worker>>,
}

impl PciBus {
    /// A bus with `devices` at their slots (1..=31, distinct; checked by the
    /// caller) and the PIIX3 `ide` in slot 1 (no virtio device may be there
    /// then), with the PM function `pm` beside it (only with a PIIX3: its
    /// function 0 makes the slot multi-function).
    pub fn new(
        devices: Vec<(u8, Arc<Mutex<VirtioPci>>)>,
        ide: Option<Arc<Mutex<Piix3>>>,
        pm: Option<Arc<Mutex<AcpiPm>>>,
    ) -> Self {
        debug_assert!(pm.is_none() || ide.is_some(), "PIIX4 PM without a PIIX3");
        Self {
            address: AtomicU32::new(0),
            bridge: Mutex::new(host_bridge()),
            devices,
            ide,
            pm,
            workers: Mutex::new(Vec::new()),
        }
    }

    /// The PIIX4 PM function, if the VM has ACPI.
    pub fn pm(&self) -> Option<&Arc<Mutex<AcpiPm>>> {
        self.pm.as_ref()
    }

    /// Starts the device threads of the devices that have host input. The
    /// devices start stopped ([`crate::devices::virtio::STOP_PAUSED`]): the threads
    /// touch nothing until the VM first runs.
    pub fn start_workers(&self) -> Result<(), WorkerError> {
        let mut workers = self.workers.lock().map_err(|_| WorkerError::LockPoisoned {
            what: "device thread list",
        })?;
        for (_, dev) in &self.devices {
            if let Some(w) = Worker::spawn(dev)? {
                workers.push(w);
            }
        }
        Ok(())
    }

    /// Stops and joins every device thread (also done when the bus is dropped).
    pub fn shutdown(&self) {
        let workers = self
            .workers
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default();
        drop(workers);
    }

    /// Stops (`on`) or lets run every device for reason `why` (a `STOP_*` bit of
    /// [`crate::devices::virtio`]). Once this returns with `on`, no device
    /// touches guest memory until the last reason is lifted: each device checks
    /// under its lock.
    pub fn set_stopped(&self, why: u8, on: bool) {
        self.for_each(|dev| dev.set_stopped(why, on));
    }

    /// Makes the NICs announce themselves (RARP) on `schedule`, from their
    /// device threads: those whose id is in `only`, or every one if `None`
    /// (ids no NIC has are ignored, as QEMU ignores them). Returns the ids of
    /// the NICs that announce.
    pub fn announce(
        &self,
        schedule: crate::devices::virtio::net::AnnounceSchedule,
        only: Option<&[String]>,
    ) -> Vec<String> {
        let mut announced = Vec::new();
        self.for_each(|dev| {
            if dev.kind() == "virtio-net"
                && only.is_none_or(|ids| ids.iter().any(|i| i == dev.id()))
            {
                dev.announce(schedule);
                announced.push(dev.id().to_string());
            }
        });
        announced
    }

    /// Runs `f` on every virtio function in slot order, each under its lock (a
    /// device whose lock is poisoned is skipped).
    pub fn for_each(&self, mut f: impl FnMut(&mut VirtioPci)) {
        for (_, dev) in &self.devices {
            if let Ok(mut dev) = dev.lock() {
                f(&mut dev);
            }
        }
    }

    /// The virtio functions, by slot.
    pub fn devices(&self) -> &[(u8, Arc<Mutex<VirtioPci>>)] {
        &self.devices
    }

    /// The PIIX3 and its IDE drives, if the VM has them.
    pub fn ide(&self) -> Option<&Arc<Mutex<Piix3>>> {
        self.ide.as_ref()
    }

    /// The host bridge's registers (PAM and SMRAM are the guest's), for
    /// checkpoints and streams.
    pub fn bridge_registers(&self) -> Vec<u32> {
        self.bridge
            .lock()
            .map(|c| c.registers())
            .unwrap_or_default()
    }

    /// Refuses host bridge registers this bridge could not hold (another
    /// length, other read-only bits); changes nothing.
    pub fn check_bridge(&self, saved: &[u32]) -> Result<(), DeviceStateError> {
        let mut probe = host_bridge();
        probe.restore(saved)
    }

    /// Loads registers saved by [`Self::bridge_registers`], all or nothing.
    pub fn restore_bridge(&self, saved: &[u32]) -> Result<(), DeviceStateError> {
        let mut c = self
            .bridge
            .lock()
            .map_err(|_| DeviceStateError::LockPoisoned {
                what: "PCI host bridge",
            })?;
        c.restore(saved)
    }

    /// Whether an access of `len` bytes at `port` belongs to the configuration
    /// mechanism: CONFIG_ADDRESS only as a dword (a byte at 0xcf9 is the reset
    /// control register), CONFIG_DATA at any width.
    pub fn claims_port(port: u16, len: usize) -> bool {
        (port == CONFIG_ADDRESS && len == 4) || (CONFIG_DATA..CONFIG_DATA + 4).contains(&port)
    }

    pub fn io_write(&self, port: u16, data: &[u8]) {
        if port == CONFIG_ADDRESS && data.len() == 4 {
            let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.address.store(value, Ordering::Release);
            return;
        }
        if let Some((reg, offset)) = self.data_target(port, data.len()) {
            self.with_function(reg, |f| match f {
                Function::Bridge(c) => c.write(reg.register, offset, data),
                Function::Virtio(dev) => dev.config_write(reg.register, offset, data),
                Function::Piix3(p, function) => {
                    p.config_write(function, reg.register, offset, data)
                }
                Function::Pm(pm) => pm.config_write(reg.register, offset, data),
            });
        }
    }

    pub fn io_read(&self, port: u16, data: &mut [u8]) {
        if port == CONFIG_ADDRESS && data.len() == 4 {
            data.copy_from_slice(&self.address.load(Ordering::Acquire).to_le_bytes());
            return;
        }
        data.fill(0xff);
        let Some((reg, offset)) = self.data_target(port, data.len()) else {
            return;
        };
        let mut value = None;
        self.with_function(reg, |f| {
            value = Some(match f {
                Function::Bridge(c) => c.read(reg.register),
                Function::Virtio(dev) => dev.config_read(reg.register),
                Function::Piix3(p, function) => p
                    .config(function)
                    .map_or(0xffff_ffff, |c| c.read(reg.register)),
                Function::Pm(pm) => pm.config().read(reg.register),
            })
        });
        if let Some(v) = value {
            let bytes = v.to_le_bytes();
            data.copy_from_slice(&bytes[offset..offset + data.len()]);
        }
    }

    /// An MMIO access at `addr`: true when a BAR claimed it.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let len = data.len();
        self.at_bar(addr, len, |dev, offset| dev.bar_read(offset, data))
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.at_bar(addr, data.len(), |dev, offset| dev.bar_write(offset, data))
    }

    /// Runs `f` with the function whose BAR decodes `len` bytes at `addr` and the
    /// offset in that BAR; false when no BAR does.
    fn at_bar(&self, addr: u64, len: usize, f: impl FnOnce(&mut VirtioPci, u64)) -> bool {
        for (_, dev) in &self.devices {
            let Ok(mut dev) = dev.lock() else { continue };
            if let Some(offset) = dev.bar_offset(addr, len) {
                f(&mut dev, offset);
                return true;
            }
        }
        false
    }

    /// The register addressed by CONFIG_ADDRESS for an access to `port`, and the
    /// byte offset in it; `None` when the enable bit is clear or the access is
    /// misaligned.
    fn data_target(&self, port: u16, len: usize) -> Option<(Target, usize)> {
        if !(CONFIG_DATA..CONFIG_DATA + 4).contains(&port) {
            return None;
        }
        let offset = usize::from(port - CONFIG_DATA);
        if !matches!(len, 1 | 2 | 4) || offset % len != 0 {
            return None;
        }
        let a = self.address.load(Ordering::Acquire);
        if a & 0x8000_0000 == 0 {
            return None;
        }
        Some((
            Target {
                bus: ((a >> 16) & 0xff) as u8,
                slot: ((a >> 11) & 0x1f) as u8,
                function: ((a >> 8) & 0x7) as u8,
                register: ((a >> 2) & 0x3f) as usize,
            },
            offset,
        ))
    }

    fn with_function(&self, t: Target, f: impl FnOnce(Function<'_>)) {
        if t.bus != 0 {
            return;
        }
        if let Some(ide) = self.ide.as_ref().filter(|_| t.slot == PIIX3_SLOT) {
            if t.function == PM_FUNCTION {
                if let Some(Ok(mut pm)) = self.pm.as_ref().map(|p| p.lock()) {
                    f(Function::Pm(&mut pm));
                }
            } else if t.function <= 1 {
                if let Ok(mut p) = ide.lock() {
                    f(Function::Piix3(&mut p, t.function));
                }
            }
            return;
        }
        if t.function != 0 {
            return;
        }
        if t.slot == 0 {
            if let Ok(mut c) = self.bridge.lock() {
                f(Function::Bridge(&mut c));
            }
            return;
        }
        if let Some((_, dev)) = self.devices.iter().find(|(s, _)| *s == t.slot) {
            if let Ok(mut dev) = dev.lock() {
                f(Function::Virtio(&mut dev));
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Target {
    bus: u8,
    slot: u8,
    function: u8,
    register: usize,
}

enum Function<'a> {
    Bridge(&'a mut ConfigSpace),
    Virtio(&'a mut VirtioPci),
    /// The PIIX3, and which of its functions.
    Piix3(&'a mut Piix3, u8),
    /// The PIIX4 PM function.
    Pm(&'a mut AcpiPm),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reset_register_at_0xcf9_is_not_the_config_address() {
        assert!(PciBus::claims_port(0xcf8, 4));
        assert!(!PciBus::claims_port(0xcf8, 1));
        assert!(!PciBus::claims_port(0xcf9, 1));
        assert!(PciBus::claims_port(0xcfd, 1));
        assert!(!PciBus::claims_port(0xd00, 4));
    }

    fn config_write(bus: &PciBus, register: u32, byte: usize, data: &[u8]) {
        let address = 0x8000_0000u32 | (register & 0xfc);
        bus.io_write(CONFIG_ADDRESS, &address.to_le_bytes());
        bus.io_write(CONFIG_DATA + byte as u16, data);
    }

    fn config_read(bus: &PciBus, register: u32) -> u32 {
        let address = 0x8000_0000u32 | (register & 0xfc);
        bus.io_write(CONFIG_ADDRESS, &address.to_le_bytes());
        let mut data = [0u8; 4];
        bus.io_read(CONFIG_DATA, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn the_firmware_programs_pam_and_smram_and_they_migrate() {
        let bus = PciBus::new(Vec::new(), None, None);
        // SeaBIOS's make_bios_writable: two dword writes over PAM0-6.
        config_write(&bus, 0x58, 0, &0x3000_0000u32.to_le_bytes());
        config_write(&bus, 0x5c, 0, &0x3333_3333u32.to_le_bytes());
        assert_eq!(
            config_read(&bus, 0x58),
            0x3000_0000,
            "PAM0's low nibble is reserved"
        );
        assert_eq!(config_read(&bus, 0x5c), 0x3333_3333);
        // The IDs stay read-only.
        config_write(&bus, 0x00, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(config_read(&bus, 0x00), 0x1237_8086);
        // SMRAM: reset value 0x02, only QEMU's bits writable.
        assert_eq!(config_read(&bus, 0x70) >> 16 & 0xff, 0x02);
        config_write(&bus, 0x70, 2, &[0xff]);
        assert_eq!(config_read(&bus, 0x70) >> 16 & 0xff, 0x7a);

        let saved = bus.bridge_registers();
        let other = PciBus::new(Vec::new(), None, None);
        other.check_bridge(&saved).unwrap();
        other.restore_bridge(&saved).unwrap();
        assert_eq!(config_read(&other, 0x5c), 0x3333_3333);

        // Another device's registers are refused and change nothing.
        let mut bad = saved.clone();
        bad[0] = 0x7000_8086;
        assert!(other
            .check_bridge(&bad)
            .unwrap_err()
            .to_string()
            .contains("read-only"));
        assert!(other.restore_bridge(&bad[..4]).is_err());
        assert_eq!(config_read(&other, 0x00), 0x1237_8086);
    }
}
