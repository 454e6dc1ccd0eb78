//! The device driven through its ports, as SeaBIOS and Linux's
//! `qemu_fw_cfg` drive it.

use std::sync::Arc;

use ferry_kvm::{Backing, GuestRam};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::*;

const RAM: u64 = 16 << 20;
/// Where tests put their `FWCfgDmaAccess`, and their buffers.
const ACCESS: u64 = 0x10_0000;
const BUF: u64 = 0x20_0000;

fn ram() -> Arc<GuestRam> {
    Arc::new(GuestRam::new(&[(0, RAM)], Backing::Anonymous).expect("RAM"))
}

fn device(vmcoreinfo: bool) -> FwCfg {
    let layout = ferry_boot::MemoryLayout::new(RAM).expect("layout");
    let config = FwCfgConfig {
        vmcoreinfo,
        bootorder: vec!["/pci@i0cf8/ide@1,1/drive@0/disk@0".into()],
    };
    FwCfg::for_vm(&config, ram(), &layout, 2).expect("fw_cfg")
}

fn select(dev: &mut FwCfg, key: u16) {
    dev.io_write(SELECTOR_PORT, &key.to_le_bytes());
}

fn read(dev: &mut FwCfg, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            let mut b = [0u8];
            dev.io_read(DATA_PORT, &mut b);
            b[0]
        })
        .collect()
}

/// Directory entries: (size, select, name).
fn directory(dev: &mut FwCfg) -> Vec<(u32, u16, String)> {
    select(dev, key::FILE_DIR);
    let count = u32::from_be_bytes(read(dev, 4).try_into().unwrap());
    (0..count)
        .map(|_| {
            let e = read(dev, DIR_ENTRY_LEN);
            let size = u32::from_be_bytes(e[0..4].try_into().unwrap());
            let sel = u16::from_be_bytes(e[4..6].try_into().unwrap());
            let name = &e[8..];
            let end = name.iter().position(|&b| b == 0).unwrap();
            (size, sel, String::from_utf8(name[..end].to_vec()).unwrap())
        })
        .collect()
}

/// Writes an access at [`ACCESS`] and triggers it (high half, then low).
fn dma(dev: &mut FwCfg, control: u32, length: u32, address: u64) -> u32 {
    let mut access = Vec::new();
    access.extend_from_slice(&control.to_be_bytes());
    access.extend_from_slice(&length.to_be_bytes());
    access.extend_from_slice(&address.to_be_bytes());
    let mem = dev.ram.memory();
    mem.write_slice(&access, GuestAddress(ACCESS)).unwrap();
    dev.io_write(DMA_PORT, &((ACCESS >> 32) as u32).to_be_bytes());
    dev.io_write(DMA_PORT + 4, &(ACCESS as u32).to_be_bytes());
    let mut back = [0u8; 4];
    dev.ram
        .memory()
        .read_slice(&mut back, GuestAddress(ACCESS))
        .unwrap();
    u32::from_be_bytes(back)
}

fn guest(dev: &FwCfg, at: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    dev.ram
        .memory()
        .read_slice(&mut v, GuestAddress(at))
        .unwrap();
    v
}

#[test]
fn signature_id_and_dma_signature_read_as_qemus() {
    let mut dev = device(false);
    select(&mut dev, key::SIGNATURE);
    assert_eq!(read(&mut dev, 4), b"QEMU");
    assert_eq!(read(&mut dev, 2), [0, 0], "past the end reads 0");
    select(&mut dev, key::ID);
    assert_eq!(read(&mut dev, 4), [3, 0, 0, 0], "traditional and DMA");
    let mut sig = [0u8; 8];
    for (i, b) in sig.iter_mut().enumerate() {
        let mut one = [0u8];
        dev.io_read(DMA_PORT + i as u16, &mut one);
        *b = one[0];
    }
    assert_eq!(&sig, b"QEMU CFG");
    // Selecting again rewinds; unknown and arch-local keys read 0.
    select(&mut dev, key::SIGNATURE);
    assert_eq!(read(&mut dev, 1), b"Q");
    select(&mut dev, 0x0018);
    assert_eq!(read(&mut dev, 2), [0, 0]);
    select(&mut dev, key::ARCH_LOCAL | key::SIGNATURE);
    assert_eq!(read(&mut dev, 1), [0]);
    select(&mut dev, key::NB_CPUS);
    assert_eq!(read(&mut dev, 2), [2, 0]);
}

#[test]
fn directory_lists_files_sorted_and_a_selector_reads_each() {
    let mut dev = device(true);
    dev.add_file("etc/a-first", b"abc".to_vec()).unwrap();
    dev.add_file("Zebra", vec![1]).unwrap();
    assert_eq!(
        dev.add_file("bootorder", vec![]),
        Err(FwCfgError::DuplicateFile {
            name: "bootorder".into()
        })
    );
    assert!(dev.add_file(&"x".repeat(56), vec![]).is_err());
    let dir = directory(&mut dev);
    let names: Vec<&str> = dir.iter().map(|e| e.2.as_str()).collect();
    // strcmp order: capitals before lower case.
    assert_eq!(
        names,
        [
            "Zebra",
            "bootorder",
            "etc/a-first",
            "etc/e820",
            "etc/vmcoreinfo"
        ]
    );
    for (i, (size, sel, name)) in dir.iter().enumerate() {
        assert_eq!(*sel, key::FILE_FIRST + i as u16);
        assert_eq!(*size as usize, dev.file(name).unwrap().len());
        select(&mut dev, *sel);
        assert_eq!(read(&mut dev, *size as usize), dev.file(name).unwrap());
    }
    let boot = dev.file("bootorder").unwrap();
    assert_eq!(boot, b"/pci@i0cf8/ide@1,1/drive@0/disk@0\0");
    // etc/e820: 20-byte entries from the boot memory map.
    let e820 = dev.file("etc/e820").unwrap().to_vec();
    let layout = ferry_boot::MemoryLayout::new(RAM).unwrap();
    assert_eq!(e820.len(), layout.memory_map().len() * 20);
    let last = &e820[e820.len() - 20..];
    let m = layout.memory_map();
    let end = m.last().unwrap();
    assert_eq!(u64::from_le_bytes(last[..8].try_into().unwrap()), end.addr);
    assert_eq!(
        u64::from_le_bytes(last[8..16].try_into().unwrap()),
        end.size
    );
    assert_eq!(u32::from_le_bytes(last[16..].try_into().unwrap()), 1);
    // The write-channel bit is ignored on selection.
    select(&mut dev, key::WRITE_CHANNEL | key::SIGNATURE);
    assert_eq!(read(&mut dev, 4), b"QEMU");
}

#[test]
fn dma_read_fills_guest_memory_clears_control_and_marks_pages_dirty() {
    let mut dev = device(false);
    dev.ram.reset_vmm_dirty();
    let ctl = dma::SELECT | dma::READ | (u32::from(key::SIGNATURE) << 16);
    // Two bytes past the end come back as zeroes.
    dev.ram
        .memory()
        .write_slice(&[0xaa; 8], GuestAddress(BUF))
        .unwrap();
    assert_eq!(dma(&mut dev, ctl, 6, BUF), 0);
    assert_eq!(guest(&dev, BUF, 8), b"QEMU\0\0\xaa\xaa");
    let mem = dev.ram.memory();
    let region = mem.find_region(GuestAddress(BUF)).unwrap();
    assert!(
        region.bitmap().dirty_at(BUF as usize),
        "DMA target page dirty"
    );
    // A second read goes on from the position: past the end, zeroes.
    assert_eq!(dma(&mut dev, dma::READ, 2, BUF), 0);
    assert_eq!(guest(&dev, BUF, 2), [0, 0]);
    // No operation bit: nothing moves, control cleared.
    assert_eq!(dma(&mut dev, 0, 4, BUF), 0);
}

#[test]
fn dma_skip_and_select_move_the_position() {
    let mut dev = device(false);
    let ctl = dma::SELECT | dma::SKIP | (u32::from(key::SIGNATURE) << 16);
    assert_eq!(dma(&mut dev, ctl, 2, 0), 0);
    assert_eq!(read(&mut dev, 2), b"MU");
    // SELECT alone rewinds; then a DMA read of the directory's count.
    let ctl = dma::SELECT | (u32::from(key::FILE_DIR) << 16);
    assert_eq!(dma(&mut dev, ctl, 4, BUF), 0);
    assert_eq!(dma(&mut dev, dma::READ, 4, BUF), 0);
    assert_eq!(guest(&dev, BUF, 4), 2u32.to_be_bytes());
}

#[test]
fn dma_write_fills_vmcoreinfo_and_read_only_items_refuse_it() {
    let mut dev = device(true);
    assert_eq!(
        dev.vmcoreinfo(),
        Some(VmcoreInfo {
            host_format: VMCOREINFO_FORMAT_ELF,
            guest_format: 0,
            size: 0,
            paddr: 0
        })
    );
    let sel = dev.file_key(VMCOREINFO_FILE).unwrap();
    let mut note = Vec::new();
    note.extend_from_slice(&1u16.to_le_bytes());
    note.extend_from_slice(&1u16.to_le_bytes());
    note.extend_from_slice(&0x1000u32.to_le_bytes());
    note.extend_from_slice(&0x12_3000u64.to_le_bytes());
    dev.ram
        .memory()
        .write_slice(&note, GuestAddress(BUF))
        .unwrap();
    let ctl = dma::SELECT | dma::WRITE | (u32::from(sel) << 16);
    assert_eq!(dma(&mut dev, ctl, 16, BUF), 0);
    assert_eq!(
        dev.vmcoreinfo(),
        Some(VmcoreInfo {
            host_format: 1,
            guest_format: 1,
            size: 0x1000,
            paddr: 0x12_3000
        })
    );
    // Past the end of the writable file: refused, nothing written.
    let ctl = dma::SELECT | dma::WRITE | (u32::from(sel) << 16);
    assert_eq!(dma(&mut dev, ctl, 17, BUF), dma::ERROR);
    assert_eq!(dev.file(VMCOREINFO_FILE).unwrap(), &note[..]);
    // Read-only items and files refuse writes.
    let ctl = dma::SELECT | dma::WRITE | (u32::from(key::SIGNATURE) << 16);
    assert_eq!(dma(&mut dev, ctl, 4, BUF), dma::ERROR);
    let boot = dev.file_key("bootorder").unwrap();
    let ctl = dma::SELECT | dma::WRITE | (u32::from(boot) << 16);
    assert_eq!(dma(&mut dev, ctl, 4, BUF), dma::ERROR);
    select(&mut dev, key::SIGNATURE);
    assert_eq!(read(&mut dev, 4), b"QEMU");
    // Data-port writes are ignored.
    select(&mut dev, sel);
    dev.io_write(DATA_PORT, &[9]);
    assert_eq!(read(&mut dev, 2), [1, 0]);
}

#[test]
fn dma_outside_ram_sets_the_error_bit() {
    let mut dev = device(true);
    let ctl = dma::SELECT | dma::READ | (u32::from(key::FILE_DIR) << 16);
    assert_eq!(dma(&mut dev, ctl, 64, RAM - 8), dma::ERROR);
    assert_eq!(dma(&mut dev, ctl, 4, u64::MAX - 1), dma::ERROR);
    let sel = dev.file_key(VMCOREINFO_FILE).unwrap();
    let ctl = dma::SELECT | dma::WRITE | (u32::from(sel) << 16);
    assert_eq!(dma(&mut dev, ctl, 16, RAM + 0x1000), dma::ERROR);
    // An access structure outside RAM: nothing to answer, no panic.
    dev.io_write(DMA_PORT, &0xffff_ffffu32.to_be_bytes());
    dev.io_write(DMA_PORT + 4, &0xffff_fff8u32.to_be_bytes());
    assert_eq!(dev.vmcoreinfo().unwrap().guest_format, 0);
}

#[test]
fn state_round_trips_mid_read_and_mid_address() {
    let mut dev = device(true);
    let sel = dev.file_key(VMCOREINFO_FILE).unwrap();
    dev.ram
        .memory()
        .write_slice(&[7u8; 16], GuestAddress(BUF))
        .unwrap();
    let ctl = dma::SELECT | dma::WRITE | (u32::from(sel) << 16);
    assert_eq!(dma(&mut dev, ctl, 16, BUF), 0);
    select(&mut dev, key::FILE_DIR);
    let head = read(&mut dev, 10);
    dev.io_write(DMA_PORT, &1u32.to_be_bytes());
    let state = dev.state();
    assert_eq!(state.dma_address, 1 << 32);
    assert_eq!(state.files.len(), 1);

    let mut other = device(true);
    other.restore(&state).unwrap();
    assert_eq!(other.state(), state);
    assert_eq!(other.file(VMCOREINFO_FILE).unwrap(), &[7u8; 16]);
    let mut whole = head;
    whole.extend(read(&mut other, 4 + 2 * DIR_ENTRY_LEN - 10));
    select(&mut dev, key::FILE_DIR);
    assert_eq!(whole, read(&mut dev, 4 + 2 * DIR_ENTRY_LEN));
}

#[test]
fn hostile_state_is_refused_and_changes_nothing() {
    let dev = device(true);
    let good = dev.state();
    let mut past_end = good.clone();
    past_end.selector = key::SIGNATURE;
    past_end.offset = 5;
    let mut low_half = good.clone();
    low_half.dma_address = 0x1234;
    let mut resized = good.clone();
    resized.files[0].data.push(0);
    let mut renamed = good.clone();
    renamed.files[0].name = "bootorder".into();
    let mut extra = good.clone();
    extra.files.push(FwCfgFileState {
        name: "etc/other".into(),
        data: vec![],
    });
    let mut invalid_item = good.clone();
    invalid_item.selector = 0x3fff;
    invalid_item.offset = 1;
    for bad in [past_end, low_half, resized, renamed, extra, invalid_item] {
        let mut target = device(true);
        let before = target.state();
        assert!(target.restore(&bad).is_err(), "{bad:?} accepted");
        assert_eq!(target.state(), before);
    }
    // A state with vmcoreinfo does not fit a device without it.
    let mut plain = device(false);
    assert!(plain.restore(&good).is_err());
    // One without it does not fit a device with it.
    assert!(device(true).restore(&device(false).state()).is_err());
    // Shape names say which.
    assert_eq!(dev.shape_names(), ["fw_cfg", "fw_cfg:etc/vmcoreinfo"]);
    assert_eq!(device(false).shape_names(), ["fw_cfg"]);
}

/// A VM with fw_cfg names it in its shape (a destination without it is
/// refused by name) and carries its state through `capture_devices` and
/// `restore_state`, in the middle of a read.
#[test]
fn a_vm_carries_its_fw_cfg_in_shape_and_state() {
    use crate::devices::serial::SinkSpec;
    use crate::vm::{Vm, VmConfig};

    let fw_cfg = FwCfgConfig {
        vmcoreinfo: true,
        bootorder: Vec::new(),
    };
    let config = |fw_cfg: Option<FwCfgConfig>| VmConfig {
        mem_bytes: 16 << 20,
        vcpus: 1,
        backing: Backing::Anonymous,
        serial: SinkSpec::Null,
        cpu: crate::cpu::model::CpuModel::Host,
        virtio: Vec::new(),
        ide: Vec::new(),
        fw_cfg,
        firmware: None,
        rtc: None,
    };
    let vm = Vm::create(config(Some(fw_cfg.clone()))).expect("a VM with fw_cfg");
    let dev = vm.fw_cfg().expect("fw_cfg").clone();
    let sel = dev.lock().unwrap().file_key(VMCOREINFO_FILE).unwrap();
    select(&mut dev.lock().unwrap(), sel);
    assert_eq!(read(&mut dev.lock().unwrap(), 1), [1]);
    let saved = vm.capture_devices().unwrap();
    assert_eq!(saved.fw_cfg.as_ref().map(|s| s.offset), Some(1));
    assert_eq!(vm.vmcoreinfo().map(|v| v.host_format), Some(1));

    let names = vm.shape().devices;
    assert!(names.contains(&"fw_cfg".to_string()), "{names:?}");
    let shape_for = |fw_cfg| {
        Vm::create_for_shape(
            &vm.shape(),
            crate::vm::HostDevices {
                backing: Backing::Anonymous,
                serial: SinkSpec::Null,
                virtio: Vec::new(),
                ide: Vec::new(),
                fw_cfg,
                firmware: None,
                rtc: None,
            },
        )
    };
    let err = shape_for(None).unwrap_err().to_string();
    assert!(err.contains("fw_cfg"), "{err}");
    let err = shape_for(Some(FwCfgConfig::default()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("fw_cfg:etc/vmcoreinfo"), "{err}");

    let mut dest = shape_for(Some(fw_cfg)).expect("the same fw_cfg");
    let vmstate = dest.capture_vm().unwrap();
    let mut none = saved.clone();
    none.fw_cfg = None;
    let err = dest
        .restore_state(dest.capture_vcpus().unwrap(), &vmstate, &none)
        .unwrap_err();
    assert!(err.to_string().contains("fw_cfg"), "{err}");
    dest.restore_state(dest.capture_vcpus().unwrap(), &vmstate, &saved)
        .expect("restore");
    let dev = dest.fw_cfg().unwrap().clone();
    assert_eq!(dev.lock().unwrap().state(), saved.fw_cfg.unwrap());
    assert_eq!(
        read(&mut dev.lock().unwrap(), 1),
        [0],
        "host_format's high byte"
    );

    // Without --fw-cfg the ports are not decoded and the state is absent.
    let plain = Vm::create(config(None)).expect("a VM without fw_cfg");
    assert!(plain.fw_cfg().is_none());
    assert!(plain.capture_devices().unwrap().fw_cfg.is_none());
}
