//! The virtio-pci transport and virtio-blk driven the way a guest driver drives
//! them: config cycles on ports 0xcf8/0xcfc, BAR accesses, rings in guest RAM.

use std::path::Path;
use std::sync::Arc;

use ferry_kvm::Backing;

use super::status;
use crate::devices::pci::{PciBus, CONFIG_ADDRESS, CONFIG_DATA};
use crate::devices::serial::SinkSpec;
use crate::devices::virtio::blk::BlockConfig;
use crate::vm::{VirtioDeviceSpec, VirtioSpec, Vm, VmConfig};

const SLOT: u8 = 4;
const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;
const HEADER: u64 = 0x20000;
const DATA: u64 = 0x21000;
const STATUS: u64 = 0x22000;

fn disk_spec(path: &Path, read_only: bool) -> VirtioSpec {
    VirtioSpec {
        slot: SLOT,
        id: "virtio-disk0".into(),
        device: VirtioDeviceSpec::Block(BlockConfig {
            path: path.to_path_buf(),
            read_only,
            serial: Some("ferry-serial".into()),
        }),
    }
}

fn vm_with(spec: VirtioSpec) -> Vm {
    Vm::create(VmConfig {
        mem_bytes: 16 << 20,
        vcpus: 1,
        backing: Backing::Anonymous,
        serial: SinkSpec::Null,
        cpu: crate::cpu::model::CpuModel::Host,
        virtio: vec![spec],
    })
    .expect("VM with a disk")
}

/// A guest driver's view: config cycles, the BAR, the rings.
struct Driver<'a> {
    vm: &'a Vm,
    bus: Arc<PciBus>,
    bar: u64,
    common: u64,
    notify: u64,
    device: u64,
    avail_idx: u16,
}

impl<'a> Driver<'a> {
    fn cfg_read(bus: &PciBus, reg: u8) -> u32 {
        let addr = 0x8000_0000u32 | (u32::from(SLOT) << 11) | (u32::from(reg) & 0xfc);
        bus.io_write(CONFIG_ADDRESS, &addr.to_le_bytes());
        let mut d = [0u8; 4];
        bus.io_read(CONFIG_DATA, &mut d);
        u32::from_le_bytes(d)
    }

    fn cfg_write(bus: &PciBus, reg: u8, value: u32) {
        let addr = 0x8000_0000u32 | (u32::from(SLOT) << 11) | (u32::from(reg) & 0xfc);
        bus.io_write(CONFIG_ADDRESS, &addr.to_le_bytes());
        bus.io_write(CONFIG_DATA, &value.to_le_bytes());
    }

    /// Finds the device, enables it and walks the virtio capabilities.
    fn probe(vm: &'a Vm) -> Self {
        let bus = vm.pci().clone();
        assert_eq!(Self::cfg_read(&bus, 0), 0x1042_1af4, "virtio-blk at slot 4");
        Self::cfg_write(&bus, 4, 0x6);
        let bar = u64::from(Self::cfg_read(&bus, 0x10) & !0xf)
            | (u64::from(Self::cfg_read(&bus, 0x14)) << 32);
        let mut caps = std::collections::HashMap::new();
        let mut at = (Self::cfg_read(&bus, 0x34) & 0xff) as u8;
        while at != 0 {
            let head = Self::cfg_read(&bus, at);
            if head & 0xff == 0x09 {
                let cfg_type = (head >> 24) as u8;
                caps.insert(cfg_type, u64::from(Self::cfg_read(&bus, at + 8)));
            }
            at = (head >> 8) as u8;
        }
        Self {
            vm,
            bar,
            common: bar + caps[&1],
            notify: bar + caps[&2],
            device: bar + caps[&4],
            bus,
            avail_idx: 0,
        }
    }

    fn read(&self, addr: u64, len: usize) -> u64 {
        let mut d = [0u8; 8];
        assert!(
            self.bus.mmio_read(addr, &mut d[..len]),
            "{addr:#x} unclaimed"
        );
        u64::from_le_bytes(d)
    }

    fn write(&self, addr: u64, len: usize, value: u64) {
        assert!(self.bus.mmio_write(addr, &value.to_le_bytes()[..len]));
    }

    fn status(&self) -> u8 {
        self.read(self.common + 0x14, 1) as u8
    }

    /// Reset, features, one queue of 16, DRIVER_OK.
    fn init(&mut self) {
        self.write(self.common + 0x14, 1, 0);
        self.write(self.common + 0x14, 1, 3);
        self.write(self.common, 4, 1);
        let high = self.read(self.common + 4, 4);
        assert_eq!(high & 1, 1, "VERSION_1 offered");
        self.write(self.common + 8, 4, 1);
        self.write(self.common + 0xc, 4, 1);
        self.write(self.common + 0x14, 1, 0xb);
        assert_eq!(self.status() & status::FEATURES_OK, status::FEATURES_OK);
        self.write(self.common + 0x16, 2, 0);
        assert_eq!(self.read(self.common + 0x18, 2), 256, "queue max size");
        self.write(self.common + 0x18, 2, 16);
        self.write(self.common + 0x20, 8, DESC);
        self.write(self.common + 0x28, 8, AVAIL);
        self.write(self.common + 0x30, 8, USED);
        self.write(self.common + 0x1c, 2, 1);
        self.write(self.common + 0x14, 1, 0xf);
        assert_eq!(self.status(), 0xf);
    }

    fn put(&self, gpa: u64, bytes: &[u8]) {
        self.vm.ram().write(gpa, bytes).expect("guest RAM");
    }

    fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.vm.ram().read(gpa, &mut b).expect("guest RAM");
        b
    }

    /// Submits a 3-descriptor request (header, data, status) and returns the
    /// status byte and the used length.
    fn request(&mut self, kind: u32, sector: u64, data_len: u32, data_addr: u64) -> (u8, u32) {
        let mut header = kind.to_le_bytes().to_vec();
        header.extend_from_slice(&[0; 4]);
        header.extend_from_slice(&sector.to_le_bytes());
        self.put(HEADER, &header);
        self.put(STATUS, &[0xee]);
        let data_flags: u16 = if kind == 0 || kind == 8 { 2 | 1 } else { 1 };
        let descs = [
            (HEADER, 16u32, 1u16, 1u16),
            (data_addr, data_len, data_flags, 2),
            (STATUS, 1, 2, 0),
        ];
        for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
            let mut d = addr.to_le_bytes().to_vec();
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&next.to_le_bytes());
            self.put(DESC + 16 * i as u64, &d);
        }
        let slot = u64::from(self.avail_idx % 16);
        self.put(AVAIL + 4 + 2 * slot, &0u16.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.put(AVAIL + 2, &self.avail_idx.to_le_bytes());
        self.write(self.notify, 2, 0);
        let used_idx = u16::from_le_bytes(self.get(USED + 2, 2).try_into().unwrap());
        assert_eq!(used_idx, self.avail_idx, "request completed synchronously");
        let elem = self.get(USED + 4 + 8 * slot, 8);
        let len = u32::from_le_bytes(elem[4..8].try_into().unwrap());
        (self.get(STATUS, 1)[0], len)
    }
}

fn disk(sectors: usize) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(sectors as u64 * 512).unwrap();
    f
}

#[test]
fn blk_reads_writes_flushes_and_reports_its_config() {
    let img = disk(64);
    let vm = vm_with(disk_spec(img.path(), false));
    let mut d = Driver::probe(&vm);
    assert!(d.bar >= crate::devices::pci::BAR_WINDOW);
    d.init();
    assert_eq!(d.read(d.device, 8), 64, "capacity in sectors");

    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    d.put(DATA, &pattern);
    assert_eq!(d.request(1, 3, 1024, DATA), (0, 1));
    let on_disk = std::fs::read(img.path()).unwrap();
    assert_eq!(&on_disk[3 * 512..5 * 512], &pattern[..]);

    d.put(DATA, &[0u8; 1024]);
    assert_eq!(d.request(0, 3, 1024, DATA), (0, 1025));
    assert_eq!(d.get(DATA, 1024), pattern);

    assert_eq!(d.request(4, 0, 0, DATA).0, 0, "flush");
    assert_eq!(d.request(8, 0, 20, DATA), (0, 21), "get-id");
    assert_eq!(&d.get(DATA, 12), b"ferry-serial");

    // Past the end, unaligned, unknown: the request fails, the device goes on.
    assert_eq!(d.request(0, 63, 1024, DATA).0, 1);
    assert_eq!(d.request(1, 0, 100, DATA).0, 1);
    assert_eq!(d.request(99, 0, 512, DATA).0, 2);
    assert_eq!(d.status(), 0xf);
}

#[test]
fn blk_refuses_writes_when_read_only() {
    let img = disk(8);
    let vm = vm_with(disk_spec(img.path(), true));
    let mut d = Driver::probe(&vm);
    d.init();
    d.write(d.common, 4, 0);
    assert_ne!(d.read(d.common + 4, 4) & (1 << 5), 0, "VIRTIO_BLK_F_RO");
    d.put(DATA, &[0xab; 512]);
    assert_eq!(d.request(1, 0, 512, DATA).0, 1);
    assert!(std::fs::read(img.path()).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn a_buffer_outside_guest_memory_breaks_the_device_not_the_vmm() {
    let img = disk(8);
    let vm = vm_with(disk_spec(img.path(), false));
    let mut d = Driver::probe(&vm);
    d.init();
    d.put(HEADER, &[0; 16]);
    // Data descriptor far beyond the 16 MiB of RAM.
    let mut desc = Vec::new();
    for (addr, len, flags, next) in [
        (HEADER, 16u32, 1u16, 1u16),
        (1u64 << 40, 512, 3, 2),
        (STATUS, 1, 2, 0),
    ] {
        desc.extend_from_slice(&addr.to_le_bytes());
        desc.extend_from_slice(&len.to_le_bytes());
        desc.extend_from_slice(&flags.to_le_bytes());
        desc.extend_from_slice(&next.to_le_bytes());
    }
    d.put(DESC, &desc);
    d.put(AVAIL + 2, &1u16.to_le_bytes());
    d.write(d.notify, 2, 0);
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    // A reset brings it back.
    d.avail_idx = 0;
    d.put(AVAIL + 2, &0u16.to_le_bytes());
    d.put(USED + 2, &0u16.to_le_bytes());
    d.init();
    d.put(DATA, &[1; 512]);
    assert_eq!(d.request(1, 0, 512, DATA).0, 0);
}

#[test]
fn device_writes_land_in_the_dirty_log() {
    let img = disk(8);
    let vm = vm_with(disk_spec(img.path(), false));
    let mut d = Driver::probe(&vm);
    d.init();
    vm.ram().register(vm.vm_fd(), true).unwrap();
    let _ = vm.ram().get_dirty_log(vm.vm_fd()).unwrap();
    assert_eq!(d.request(0, 0, 512, DATA).0, 0);
    let log = vm.ram().get_dirty_log(vm.vm_fd()).unwrap();
    let dirty = |gpa: u64| log[0][(gpa / 4096 / 64) as usize] & (1 << ((gpa / 4096) % 64)) != 0;
    assert!(dirty(DATA), "data read from disk into the guest");
    assert!(dirty(USED), "used ring");
    assert!(dirty(STATUS), "status byte");
    assert!(!dirty(0x30000), "an untouched page");
    let again = vm.ram().get_dirty_log(vm.vm_fd()).unwrap();
    assert!(again[0].iter().all(|&w| w == 0), "the log was reset");
}

#[test]
fn state_round_trips_and_hostile_state_is_refused() {
    let img = disk(8);
    let vm = vm_with(disk_spec(img.path(), false));
    let mut d = Driver::probe(&vm);
    d.init();
    d.put(DATA, &[5; 512]);
    assert_eq!(d.request(1, 1, 512, DATA).0, 0);
    let saved = vm.capture_devices().unwrap();
    assert_eq!(saved.virtio.len(), 1);

    let mut other = vm_with(disk_spec(img.path(), false));
    let vcpus = vm.capture_vcpus().unwrap();
    let vmstate = vm.capture_vm().unwrap();
    let mut bad = saved.clone();
    bad.virtio[0].queues[0].size = 3;
    let err = other
        .restore_state(vm.capture_vcpus().unwrap(), &vmstate, &bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("queue 0: size 3"), "{err}");
    let mut bad = saved.clone();
    bad.virtio[0].driver_features |= 1 << 60;
    assert!(other
        .restore_state(vm.capture_vcpus().unwrap(), &vmstate, &bad)
        .unwrap_err()
        .to_string()
        .contains("never offered"));
    let mut bad = saved.clone();
    bad.virtio[0].config[0] = 0x1041_1af4;
    assert!(other
        .restore_state(vm.capture_vcpus().unwrap(), &vmstate, &bad)
        .unwrap_err()
        .to_string()
        .contains("read-only bits"));

    other.restore_state(vcpus, &vmstate, &saved).unwrap();
    assert_eq!(other.capture_devices().unwrap().virtio, saved.virtio);
    // The restored device carries on where the other stopped: the next request
    // completes at used index 2.
    for g in [DESC, AVAIL, USED, HEADER, DATA, STATUS] {
        let mut page = vec![0u8; 4096];
        vm.ram().read(g, &mut page).unwrap();
        other.ram().write(g, &page).unwrap();
    }
    let mut d2 = Driver::probe(&other);
    d2.avail_idx = 1;
    assert_eq!(d2.request(0, 1, 512, DATA), (0, 513));
    assert_eq!(d2.get(DATA, 512), vec![5; 512]);
}

#[test]
fn bad_device_configuration_is_refused_with_the_reason() {
    let img = disk(8);
    let mut spec = disk_spec(img.path(), false);
    spec.slot = 0;
    let err = Vm::create(VmConfig {
        mem_bytes: 16 << 20,
        vcpus: 1,
        backing: Backing::Anonymous,
        serial: SinkSpec::Null,
        cpu: crate::cpu::model::CpuModel::Host,
        virtio: vec![spec],
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("slot 0 is out of range"), "{err}");
    let missing = disk_spec(Path::new("/nonexistent/disk.img"), false);
    let err = Vm::create(VmConfig {
        mem_bytes: 16 << 20,
        vcpus: 1,
        backing: Backing::Anonymous,
        serial: SinkSpec::Null,
        cpu: crate::cpu::model::CpuModel::Host,
        virtio: vec![missing.clone(), missing],
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("both in PCI slot"), "{err}");
}
