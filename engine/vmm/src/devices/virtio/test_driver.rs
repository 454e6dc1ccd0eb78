//! A guest driver's side of virtio-pci, for tests and fuzz seeds only: config
//! cycles on ports 0xcf8/0xcfc, BAR accesses, split rings in guest RAM. The
//! engine's device tests drive virtio-blk and virtio-net with it, and ferry-fuzz
//! uses it to give the devices of its seed VMs realistic driver state. It
//! asserts what a working device must do, so it panics where a test should
//! fail; nothing in the VMM uses it.

use std::sync::Arc;

use super::{status, STOP_PAUSED};
use crate::devices::pci::{PciBus, CONFIG_ADDRESS, CONFIG_DATA};
use crate::vm::Vm;

/// Where [`Driver`] puts things in guest RAM: queue 0's rings (queue `i`'s
/// are 16 KiB further per queue, see [`Ring::new`]), then a virtio-blk
/// request's header, data and status byte.
pub const DESC: u64 = 0x10000;
pub const AVAIL: u64 = 0x11000;
pub const USED: u64 = 0x12000;
pub const HEADER: u64 = 0x20000;
pub const DATA: u64 = 0x21000;
pub const STATUS: u64 = 0x22000;

/// Where queue `i`'s rings live: 16 KiB apart from 0x10000 (queue 0 at DESC).
#[derive(Debug, Clone, Copy)]
pub struct Ring {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Entries the driver made available, and used entries it has seen.
    pub avail_idx: u16,
    pub used_seen: u16,
}

impl Ring {
    pub fn new(i: u64) -> Self {
        let base = DESC + i * 0x4000;
        Self {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            avail_idx: 0,
            used_seen: 0,
        }
    }
}

/// A guest driver's view: config cycles, the BAR, the rings (16 entries each,
/// up to 4 chains of up to 4 descriptors in flight).
#[derive(Debug)]
pub struct Driver<'a> {
    pub vm: &'a Vm,
    pub bus: Arc<PciBus>,
    pub bar: u64,
    pub common: u64,
    pub notify: u64,
    pub device: u64,
    pub rings: Vec<Ring>,
}

impl<'a> Driver<'a> {
    pub fn cfg_read(bus: &PciBus, slot: u8, reg: u8) -> u32 {
        let addr = 0x8000_0000u32 | (u32::from(slot) << 11) | (u32::from(reg) & 0xfc);
        bus.io_write(CONFIG_ADDRESS, &addr.to_le_bytes());
        let mut d = [0u8; 4];
        bus.io_read(CONFIG_DATA, &mut d);
        u32::from_le_bytes(d)
    }

    pub fn cfg_write(bus: &PciBus, slot: u8, reg: u8, value: u32) {
        let addr = 0x8000_0000u32 | (u32::from(slot) << 11) | (u32::from(reg) & 0xfc);
        bus.io_write(CONFIG_ADDRESS, &addr.to_le_bytes());
        bus.io_write(CONFIG_DATA, &value.to_le_bytes());
    }

    /// Finds virtio device `device_id` at `slot`, enables it and walks the virtio
    /// capabilities. The VM counts as running: its devices are let run.
    pub fn probe(vm: &'a Vm, slot: u8, device_id: u16) -> Self {
        vm.pci().set_stopped(STOP_PAUSED, false);
        Self::attach(vm, slot, device_id)
    }

    /// [`Self::probe`] leaving the devices stopped or running as they are.
    pub fn attach(vm: &'a Vm, slot: u8, device_id: u16) -> Self {
        let bus = vm.pci().clone();
        assert_eq!(
            Self::cfg_read(&bus, slot, 0),
            (u32::from(0x1040 + device_id) << 16) | 0x1af4,
            "virtio device {device_id} at slot {slot}"
        );
        Self::cfg_write(&bus, slot, 4, 0x6);
        let bar = u64::from(Self::cfg_read(&bus, slot, 0x10) & !0xf)
            | (u64::from(Self::cfg_read(&bus, slot, 0x14)) << 32);
        let mut caps = std::collections::HashMap::new();
        let mut at = (Self::cfg_read(&bus, slot, 0x34) & 0xff) as u8;
        while at != 0 {
            let head = Self::cfg_read(&bus, slot, at);
            if head & 0xff == 0x09 {
                let cfg_type = (head >> 24) as u8;
                caps.insert(cfg_type, u64::from(Self::cfg_read(&bus, slot, at + 8)));
            }
            at = (head >> 8) as u8;
        }
        let mut d = Self {
            vm,
            bar,
            common: bar + caps[&1],
            notify: bar + caps[&2],
            device: bar + caps[&4],
            bus,
            rings: Vec::new(),
        };
        let n = d.read(d.common + 0x12, 2);
        d.rings = (0..n).map(Ring::new).collect();
        d
    }

    pub fn read(&self, addr: u64, len: usize) -> u64 {
        let mut d = [0u8; 8];
        assert!(
            self.bus.mmio_read(addr, &mut d[..len]),
            "{addr:#x} unclaimed"
        );
        u64::from_le_bytes(d)
    }

    pub fn write(&self, addr: u64, len: usize, value: u64) {
        assert!(self.bus.mmio_write(addr, &value.to_le_bytes()[..len]));
    }

    pub fn status(&self) -> u8 {
        self.read(self.common + 0x14, 1) as u8
    }

    /// Reset, VERSION_1 only, every queue with 16 entries, DRIVER_OK.
    pub fn init(&mut self) {
        self.init_features(super::F_VERSION_1);
    }

    /// [`Self::init`] accepting `features` (VERSION_1 and bits the device
    /// offers).
    pub fn init_features(&mut self, features: u64) {
        self.write(self.common + 0x14, 1, 0);
        self.write(self.common + 0x14, 1, 3);
        self.write(self.common, 4, 1);
        let high = self.read(self.common + 4, 4);
        assert_eq!(high & 1, 1, "VERSION_1 offered");
        self.write(self.common, 4, 0);
        let low = self.read(self.common + 4, 4);
        assert_eq!(
            low & features & 0xffff_ffff,
            features & 0xffff_ffff,
            "features offered"
        );
        self.write(self.common + 8, 4, 0);
        self.write(self.common + 0xc, 4, features & 0xffff_ffff);
        self.write(self.common + 8, 4, 1);
        self.write(self.common + 0xc, 4, features >> 32);
        self.write(self.common + 0x14, 1, 0xb);
        assert_eq!(self.status() & status::FEATURES_OK, status::FEATURES_OK);
        for i in 0..self.rings.len() {
            let r = Ring::new(i as u64);
            self.rings[i] = r;
            for g in [r.avail, r.used] {
                self.put(g, &[0; 4]);
            }
            self.write(self.common + 0x16, 2, i as u64);
            assert_eq!(self.read(self.common + 0x18, 2), 256, "queue max size");
            self.write(self.common + 0x18, 2, 16);
            self.write(self.common + 0x20, 8, r.desc);
            self.write(self.common + 0x28, 8, r.avail);
            self.write(self.common + 0x30, 8, r.used);
            self.write(self.common + 0x1c, 2, 1);
        }
        self.write(self.common + 0x14, 1, 0xf);
        assert_eq!(self.status(), 0xf);
    }

    pub fn put(&self, gpa: u64, bytes: &[u8]) {
        self.vm.ram().write(gpa, bytes).expect("guest RAM");
    }

    pub fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.vm.ram().read(gpa, &mut b).expect("guest RAM");
        b
    }

    /// Makes a chain of `(address, length, device-writable)` buffers available
    /// on queue `q` (without notifying); returns its head.
    pub fn post(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        assert!((1..=4).contains(&bufs.len()));
        let r = self.rings[q];
        let head = (r.avail_idx % 4) * 4;
        for (k, &(addr, len, writable)) in bufs.iter().enumerate() {
            let last = k + 1 == bufs.len();
            let flags = u16::from(!last) | if writable { 2 } else { 0 };
            let next = if last { 0 } else { head + k as u16 + 1 };
            let mut d = addr.to_le_bytes().to_vec();
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&next.to_le_bytes());
            self.put(r.desc + 16 * u64::from(head + k as u16), &d);
        }
        let slot = u64::from(r.avail_idx % 16);
        self.put(r.avail + 4 + 2 * slot, &head.to_le_bytes());
        let idx = r.avail_idx.wrapping_add(1);
        self.put(r.avail + 2, &idx.to_le_bytes());
        self.rings[q].avail_idx = idx;
        head
    }

    pub fn notify(&self, q: usize) {
        self.write(self.notify + 4 * q as u64, 2, q as u64);
    }

    /// The next used entry of queue `q` (head, length), if the device added one.
    pub fn used(&mut self, q: usize) -> Option<(u32, u32)> {
        let r = self.rings[q];
        let idx = u16::from_le_bytes(self.get(r.used + 2, 2).try_into().expect("2 bytes"));
        if idx == r.used_seen {
            return None;
        }
        let e = self.get(r.used + 4 + 8 * u64::from(r.used_seen % 16), 8);
        self.rings[q].used_seen = r.used_seen.wrapping_add(1);
        Some((
            u32::from_le_bytes(e[0..4].try_into().expect("4 bytes")),
            u32::from_le_bytes(e[4..8].try_into().expect("4 bytes")),
        ))
    }

    /// Waits up to `ms` for the next used entry of queue `q`.
    pub fn wait_used(&mut self, q: usize, ms: u64) -> Option<(u32, u32)> {
        let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
        loop {
            if let Some(u) = self.used(q) {
                return Some(u);
            }
            if std::time::Instant::now() > until {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// virtio-blk: submits a 3-descriptor request (header, data, status) and
    /// returns the status byte and the used length.
    /// Posts a virtio-blk request on queue 0 (header, data, status), without
    /// notifying the device.
    pub fn post_request(&mut self, kind: u32, sector: u64, data_len: u32, data_addr: u64) {
        let mut header = kind.to_le_bytes().to_vec();
        header.extend_from_slice(&[0; 4]);
        header.extend_from_slice(&sector.to_le_bytes());
        self.put(HEADER, &header);
        self.put(STATUS, &[0xee]);
        let to_guest = kind == 0 || kind == 8;
        self.post(
            0,
            &[
                (HEADER, 16, false),
                (data_addr, data_len, to_guest),
                (STATUS, 1, true),
            ],
        );
    }

    pub fn request(&mut self, kind: u32, sector: u64, data_len: u32, data_addr: u64) -> (u8, u32) {
        self.post_request(kind, sector, data_len, data_addr);
        self.notify(0);
        let (_, len) = self.used(0).expect("request completed synchronously");
        (self.get(STATUS, 1)[0], len)
    }
}
