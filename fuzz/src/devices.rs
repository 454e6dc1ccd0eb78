//! The virtio-pci device state in migration streams: the receiver of a VM
//! with a virtio-blk disk (`VirtioPci::restore`'s validation, then the device
//! driven with whatever the stream left in guest RAM).
//!
//! Seeds are streams written with the real writers (`persist::save`, which
//! the receiver takes as a migration without digest) from a small VM whose
//! disk was driven by the engine's test driver
//! (`ferry_vmm::devices::virtio::test_driver`): config cycles, BAR writes,
//! rings in guest RAM, a few requests, one left posted but not notified.
//!
//! Mutations, most of the time, change one field of a `VirtioPciState` in the
//! Devices section (queue sizes, ring addresses and indices, features, status,
//! selectors, config registers, the MSI-X table and vectors, slot and kind,
//! the number of queues or vectors) or a value in a ring page, and fix the
//! lengths and CRCs; otherwise the receiver target's stream mutator runs.
//!
//! Properties: no panic or hang; a refused stream gets the error on its return
//! path (checked as for `receiver`); a loaded VM holds exactly the device state
//! that was sent; and a loaded VM's devices, let run and kicked on every queue
//! through the PCI bus, with their MSI-X vectors unmasked and finally reset,
//! must not panic or hang.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use ciborium::Value;
use ferry_format::{SectionId, PAGE_SIZE};
use ferry_kvm::Backing;
use ferry_vmm::devices::pci::{PciBus, CONFIG_ADDRESS, CONFIG_DATA};
use ferry_vmm::devices::serial::SinkSpec;
use ferry_vmm::devices::virtio::test_driver::{self, Driver};
use ferry_vmm::devices::virtio::{VirtioPciState, STOP_PAUSED};
use ferry_vmm::persist;
use ferry_vmm::vm::{DevicesState, VirtioDeviceSpec, VirtioSpec};
use ferry_vmm::{Vm, VmConfig};

use crate::stream::{edge_gpa, mutate_stream, mutate_value, receive_checked, RawStream};
use crate::{class_of, Outcome, Rng, Target};

/// The disk's PCI slot and size, on the source and on the destination.
pub const SLOT: u8 = 4;
pub const SECTORS: u64 = 64;
const RAM_BYTES: u64 = 8 << 20;

/// The disk image every VM of this process uses: an unlinked temporary file,
/// reached through `/proc/self/fd` (nothing is left behind).
fn image() -> Result<PathBuf, String> {
    static IMAGE: OnceLock<Result<std::fs::File, String>> = OnceLock::new();
    let file = IMAGE
        .get_or_init(|| {
            let f = tempfile::tempfile().map_err(|e| format!("cannot create a disk image: {e}"))?;
            f.set_len(SECTORS * 512)
                .map_err(|e| format!("cannot size the disk image: {e}"))?;
            Ok(f)
        })
        .as_ref()
        .map_err(Clone::clone)?;
    Ok(PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())))
}

/// The disk as both sides are given it.
pub fn disk_spec() -> Result<VirtioSpec, String> {
    Ok(VirtioSpec {
        slot: SLOT,
        id: "virtio-disk0".into(),
        device: VirtioDeviceSpec::Block(ferry_vmm::devices::virtio::blk::BlockConfig {
            serial: Some("ferry-fuzz".into()),
            ..ferry_vmm::devices::virtio::blk::BlockConfig::new(
                ferry_vmm::devices::virtio::blk::BlockImage::Path(image()?),
            )
        }),
    })
}

/// How the seed VM's driver left the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedState {
    /// Never touched by a driver (the device as built).
    Fresh,
    /// Set up, a write, a read, a flush and a get-id done, a read posted but
    /// not notified (the destination's first kick finds it).
    Busy,
    /// Broken by a descriptor outside guest RAM: DEVICE_NEEDS_RESET.
    NeedsReset,
}

/// A seed stream: a small VM with the disk in `state`, written by `persist::save`.
pub fn generate_seed(state: SeedState) -> Result<Vec<u8>, String> {
    let vm = Vm::create(VmConfig {
        mem_bytes: RAM_BYTES,
        vcpus: 1,
        backing: Backing::Anonymous,
        serial: SinkSpec::Null,
        cpu: ferry_vmm::cpu::model::CpuModel::parse("qemu64").expect("qemu64 is a model"),
        virtio: vec![disk_spec()?],
        ide: Vec::new(),
        fw_cfg: None,
        firmware: None,
        rtc: None,
    })
    .map_err(|e| format!("cannot create the seed VM: {e}"))?;
    match state {
        SeedState::Fresh => {}
        SeedState::Busy => {
            let mut d = Driver::probe(&vm, SLOT, 2);
            d.init();
            let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
            d.put(test_driver::DATA, &pattern);
            let write = d.request(1, 2, 1024, test_driver::DATA);
            let read = d.request(0, 2, 1024, test_driver::DATA);
            let flush = d.request(4, 0, 0, test_driver::DATA);
            let id = d.request(8, 0, 20, test_driver::DATA);
            if (write.0, read.0, flush.0, id.0) != (0, 0, 0, 0) {
                return Err(format!(
                    "the seed disk failed a request: {write:?} {read:?} {flush:?} {id:?}"
                ));
            }
            let mut header = 0u32.to_le_bytes().to_vec();
            header.extend_from_slice(&[0; 4]);
            header.extend_from_slice(&1u64.to_le_bytes());
            d.put(test_driver::HEADER, &header);
            d.post(
                0,
                &[
                    (test_driver::HEADER, 16, false),
                    (test_driver::DATA, 512, true),
                    (test_driver::STATUS, 1, true),
                ],
            );
        }
        SeedState::NeedsReset => {
            let mut d = Driver::probe(&vm, SLOT, 2);
            d.init();
            d.post(
                0,
                &[
                    (test_driver::HEADER, 16, false),
                    (1 << 40, 512, true),
                    (test_driver::STATUS, 1, true),
                ],
            );
            d.notify(0);
            if d.status() & 0x40 == 0 {
                return Err("the seed disk did not need a reset".into());
            }
        }
    }
    // Stopped again, as at a switch-over.
    vm.pci().set_stopped(STOP_PAUSED, true);
    let (bytes, _) = persist::save(&vm, Vec::new()).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// The seeds, by corpus file name.
pub fn generate_seeds() -> Result<Vec<(String, Vec<u8>)>, String> {
    [
        ("seed-blk-fresh.mig", SeedState::Fresh),
        ("seed-blk-busy.mig", SeedState::Busy),
        ("seed-blk-needs-reset.mig", SeedState::NeedsReset),
    ]
    .into_iter()
    .map(|(name, s)| generate_seed(s).map(|b| (name.to_string(), b)))
    .collect()
}

/// The target.
pub fn devices_target() -> Target {
    Target {
        name: "devices",
        exec: Arc::new(exec_devices),
        mutate: Box::new(mutate_devices),
        time_bound: std::time::Duration::from_secs(20),
        mem_bound: 768 << 20,
    }
}

/// The virtio state of the (one, decodable) Devices section of `input`.
pub fn sent_virtio(input: &[u8]) -> Option<Vec<VirtioPciState>> {
    let raw = RawStream::split(input);
    let mut devices = raw
        .sections
        .iter()
        .filter(|s| s.id == SectionId::Devices.as_u32());
    let sec = devices.next()?;
    if devices.next().is_some() {
        return None;
    }
    ciborium::from_reader::<DevicesState, _>(&sec.payload[..])
        .ok()
        .map(|d| d.virtio)
}

pub fn exec_devices(input: &[u8]) -> Outcome {
    let spec = match disk_spec() {
        Ok(s) => s,
        Err(e) => return Outcome::Violation(e),
    };
    let vm = match receive_checked(input, vec![spec]) {
        Err(violation) => return Outcome::Violation(violation),
        Ok(Err(message)) => return Outcome::Handled(class_of("devices", &message, 14)),
        Ok(Ok(vm)) => vm,
    };
    let got = match vm.capture_devices() {
        Ok(d) => d.virtio,
        Err(e) => return Outcome::Violation(format!("loaded, but its devices: {e}")),
    };
    match sent_virtio(input) {
        Some(sent) if sent == got => {}
        Some(sent) => {
            return Outcome::Violation(format!(
                "loaded device state differs from the stream's: sent {sent:?}, got {got:?}"
            ))
        }
        None => {
            return Outcome::Violation(
                "loaded without exactly one decodable Devices section".into(),
            )
        }
    }
    let active = got.iter().all(|s| s.status & 0x44 == 4);
    let used = drive(&vm);
    Outcome::Handled(format!(
        "devices: loaded, driven (active: {active}, used entries added: {used})"
    ))
}

fn cfg_addr(bus: &PciBus, slot: u8, reg: u8) {
    let addr = 0x8000_0000u32 | (u32::from(slot) << 11) | (u32::from(reg) & 0xfc);
    bus.io_write(CONFIG_ADDRESS, &addr.to_le_bytes());
}

fn cfg_read(bus: &PciBus, slot: u8, reg: u8) -> u32 {
    cfg_addr(bus, slot, reg);
    let mut d = [0u8; 4];
    bus.io_read(CONFIG_DATA, &mut d);
    u32::from_le_bytes(d)
}

fn cfg_write(bus: &PciBus, slot: u8, reg: u8, value: u32) {
    cfg_addr(bus, slot, reg);
    bus.io_write(CONFIG_DATA, &value.to_le_bytes());
}

/// Lets the loaded VM's devices run and pokes them the way a guest resuming
/// after the switch-over could, with whatever the stream left in the rings:
/// every queue notified (and one past the last), the ISR and the common
/// configuration read, MSI-X enabled and every vector unmasked (pending
/// interrupts delivered to the stream's addresses), then the device reset
/// and notified again. The VM's vCPUs never run. Returns whether the first
/// start and round of notifications made a device add used entries.
fn drive(vm: &Vm) -> bool {
    let mut progressed = false;
    let bus = vm.pci().clone();
    let next_used = |dev: &std::sync::Mutex<ferry_vmm::devices::virtio::VirtioPci>| -> Vec<u16> {
        dev.lock()
            .map(|d| d.state().queues.iter().map(|q| q.next_used).collect())
            .unwrap_or_else(|_| Vec::new())
    };
    // Before the first start, which looks at every queue (a request the source
    // had pending is served then).
    let first: Vec<Vec<u16>> = bus.devices().iter().map(|(_, d)| next_used(d)).collect();
    bus.set_stopped(STOP_PAUSED, false);
    for ((slot, dev), before) in bus.devices().iter().zip(first) {
        let slot = *slot;
        // Memory decoding on (the stream may have left it off), where the BAR is.
        cfg_write(&bus, slot, 0x04, cfg_read(&bus, slot, 0x04) | 0x6);
        let bar = u64::from(cfg_read(&bus, slot, 0x10) & !0xf)
            | (u64::from(cfg_read(&bus, slot, 0x14)) << 32);
        let queues = before.len() as u64;
        let at = |offset: u64| bar.wrapping_add(offset);
        let mut scratch = [0u8; 8];
        for q in 0..=queues {
            bus.mmio_write(at(0x3000 + 4 * q), &(q as u16).to_le_bytes());
        }
        progressed |= next_used(dev) != before;
        bus.mmio_read(at(0x1000), &mut scratch[..1]);
        for offset in (0..0x38).step_by(4) {
            bus.mmio_read(at(offset), &mut scratch[..4]);
        }
        // MSI-X: enable (message control, in the capability at 0x40), unmask all.
        let msix = cfg_read(&bus, slot, 0x40);
        if msix & 0xff == 0x11 {
            cfg_write(&bus, slot, 0x40, (msix | 1 << 31) & !(1 << 30));
        }
        for vector in 0..=queues {
            bus.mmio_write(at(0x4000 + 16 * vector + 12), &0u32.to_le_bytes());
        }
        bus.mmio_read(at(0x6000), &mut scratch);
        // Reset, then notify again (nothing may happen).
        bus.mmio_write(at(0x14), &[0]);
        for q in 0..queues {
            bus.mmio_write(at(0x3000 + 4 * q), &(q as u16).to_le_bytes());
        }
    }
    bus.set_stopped(STOP_PAUSED, true);
    progressed
}

fn map_get<'a>(v: &'a mut Value, key: &str) -> Option<&'a mut Value> {
    match v {
        Value::Map(items) => items
            .iter_mut()
            .find(|(k, _)| k.as_text() == Some(key))
            .map(|(_, v)| v),
        _ => None,
    }
}

/// A number for a field of `bits` bits: boundaries, sometimes too wide for it.
fn number(rng: &mut Rng, bits: u32) -> Value {
    let x = rng.interesting_u64();
    let v = if rng.chance(1, 8) || bits >= 64 {
        x
    } else {
        x & ((1u64 << bits) - 1)
    };
    Value::Integer(v.into())
}

/// A ring address: in guest RAM, at its edges, unaligned, or far away.
fn ring_address(rng: &mut Rng, ranges: &[(u64, u64)]) -> Value {
    let a = match rng.below(4) {
        0 => test_driver::DESC + 0x1000 * rng.below(4) as u64,
        1 => edge_gpa(rng, ranges).wrapping_sub(rng.below(64) as u64),
        2 => (edge_gpa(rng, ranges) | 1 << rng.below(12)).wrapping_sub(8),
        _ => rng.interesting_u64(),
    };
    Value::Integer(a.into())
}

/// Changes one field of one queue snapshot.
fn mutate_queue(rng: &mut Rng, q: &mut Value, ranges: &[(u64, u64)]) {
    let field = *rng
        .pick(&[
            "size",
            "ready",
            "desc_table",
            "avail_ring",
            "used_ring",
            "next_avail",
            "next_used",
            "event_idx",
            "vector",
        ])
        .unwrap_or(&"size");
    let Some(v) = map_get(q, field) else {
        return;
    };
    *v = match field {
        "size" => {
            let s = *rng
                .pick(&[
                    0u64, 1, 2, 3, 8, 15, 16, 32, 128, 255, 256, 257, 512, 0x8000,
                ])
                .unwrap_or(&0);
            Value::Integer(s.into())
        }
        "ready" | "event_idx" => Value::Bool(rng.chance(1, 2)),
        "desc_table" | "avail_ring" | "used_ring" => ring_address(rng, ranges),
        "vector" => {
            let v = *rng
                .pick(&[0u64, 1, 2, 3, 63, 64, 0xfffe, 0xffff])
                .unwrap_or(&0);
            Value::Integer(v.into())
        }
        _ => number(rng, 16),
    };
}

/// Changes something in one `VirtioPciState` (a CBOR map).
fn mutate_device(rng: &mut Rng, dev: &mut Value, ranges: &[(u64, u64)]) {
    match rng.below(14) {
        0..=3 => {
            if let Some(Value::Array(queues)) = map_get(dev, "queues") {
                if rng.chance(1, 8) {
                    // Another number of queues.
                    if rng.chance(1, 2) || queues.is_empty() {
                        let dup = queues.first().cloned().unwrap_or(Value::Null);
                        queues.push(dup);
                    } else {
                        queues.pop();
                    }
                } else if !queues.is_empty() {
                    let i = rng.below(queues.len());
                    mutate_queue(rng, &mut queues[i], ranges);
                }
            }
        }
        4 => {
            if let Some(Value::Array(regs)) = map_get(dev, "config") {
                if rng.chance(1, 8) {
                    if rng.chance(1, 2) {
                        regs.pop();
                    } else {
                        regs.push(Value::Integer(0.into()));
                    }
                } else if !regs.is_empty() {
                    // The command register and BAR0/1 most often: the rest is read-only.
                    let i = match rng.below(3) {
                        0 => 1,
                        1 => 4 + rng.below(2),
                        _ => rng.below(regs.len()),
                    };
                    if let Some(r) = regs.get_mut(i) {
                        *r = number(rng, 32);
                    }
                }
            }
        }
        5 => {
            if let Some(Value::Array(table)) = map_get(dev, "msix_table") {
                if rng.chance(1, 6) {
                    if rng.chance(1, 2) {
                        table.pop();
                    } else {
                        let dup = table.first().cloned().unwrap_or(Value::Null);
                        table.push(dup);
                    }
                } else if !table.is_empty() {
                    let i = rng.below(table.len());
                    if let Value::Array(words) = &mut table[i] {
                        if !words.is_empty() {
                            let w = rng.below(words.len());
                            words[w] = number(rng, 32);
                        }
                    }
                }
            }
        }
        6 => {
            let field = *rng
                .pick(&["driver_features", "msix_pba"])
                .unwrap_or(&"msix_pba");
            if let Some(v) = map_get(dev, field) {
                let old = match v {
                    Value::Integer(i) => u64::try_from(i128::from(*i)).unwrap_or(0),
                    _ => 0,
                };
                let new = match rng.below(3) {
                    0 => old ^ 1 << rng.below(64),
                    1 => old & !(1 << 32),
                    _ => rng.interesting_u64(),
                };
                *v = Value::Integer(new.into());
            }
        }
        7 => {
            if let Some(v) = map_get(dev, "status") {
                let s = *rng
                    .pick(&[0u64, 1, 3, 0xb, 0xf, 0x7, 0x4, 0x4f, 0x8f, 0xff, 0x100])
                    .unwrap_or(&0);
                *v = Value::Integer(s.into());
            }
        }
        8 => {
            let (field, bits) = *rng
                .pick(&[
                    ("device_feature_select", 32),
                    ("driver_feature_select", 32),
                    ("msix_config", 16),
                    ("queue_select", 16),
                    ("config_generation", 8),
                    ("isr", 8),
                ])
                .unwrap_or(&("isr", 8));
            if let Some(v) = map_get(dev, field) {
                *v = number(rng, bits);
            }
        }
        9 => {
            if let Some(v) = map_get(dev, "slot") {
                let s = *rng.pick(&[0u64, 3, 5, 31, 32, 255, 256]).unwrap_or(&0);
                *v = Value::Integer(s.into());
            }
        }
        10 => {
            if let Some(v) = map_get(dev, "kind") {
                let k = *rng
                    .pick(&["virtio-net", "virtio-blk ", "", "virtio-BLK"])
                    .unwrap_or(&"");
                *v = Value::Text(k.into());
            }
        }
        _ => {
            mutate_value(rng, dev, 0);
        }
    }
}

/// Overwrites a few bytes of a data page holding the rings or the request
/// buffers (descriptors, ring indices, request headers).
fn mutate_ring_page(rng: &mut Rng, s: &mut RawStream) {
    let lo = test_driver::DESC;
    let hi = test_driver::STATUS + PAGE_SIZE as u64;
    let mut targets = Vec::new();
    for (si, sec) in s.sections.iter().enumerate() {
        if sec.id != SectionId::RamPages.as_u32() || sec.payload.len() < 8 {
            continue;
        }
        let count = u32::from_le_bytes([
            sec.payload[0],
            sec.payload[1],
            sec.payload[2],
            sec.payload[3],
        ]) as usize;
        let data_start = 8 + count * 8;
        let mut data_page = 0usize;
        for e in 0..count {
            let Some(raw) = sec.payload.get(8 + e * 8..16 + e * 8) else {
                break;
            };
            let entry = u64::from_le_bytes(raw.try_into().unwrap_or([0; 8]));
            if entry & 1 != 0 {
                continue;
            }
            let gpa = entry & !0xfff;
            if (lo..hi).contains(&gpa) {
                targets.push((si, data_start + data_page * PAGE_SIZE));
            }
            data_page += 1;
        }
    }
    let Some(&(si, page)) = rng.pick(&targets) else {
        return;
    };
    let payload = &mut s.sections[si].payload;
    for _ in 0..1 + rng.below(4) {
        // Descriptor fields and ring slots sit at small offsets.
        let at = page
            + if rng.chance(1, 2) {
                rng.below(64)
            } else {
                rng.below(PAGE_SIZE - 8)
            };
        let width = *rng.pick(&[1usize, 2, 4, 8]).unwrap_or(&2);
        let v = rng.interesting_u64().to_le_bytes();
        if let Some(dst) = payload.get_mut(at..at + width) {
            dst.copy_from_slice(&v[..width]);
        }
    }
}

/// The device-aware mutator (see the module documentation).
pub fn mutate_devices(rng: &mut Rng, base: &[u8], pool: &[Vec<u8>]) -> Vec<u8> {
    if rng.chance(1, 4) {
        return mutate_stream(rng, base, pool);
    }
    let mut s = RawStream::split(base);
    let ranges = s.ram_ranges();
    for _ in 0..1 + rng.below(2) {
        if rng.chance(1, 4) {
            mutate_ring_page(rng, &mut s);
            continue;
        }
        let Some(sec) = s
            .sections
            .iter_mut()
            .find(|x| x.id == SectionId::Devices.as_u32())
        else {
            break;
        };
        let Ok(mut value) = ciborium::from_reader::<Value, _>(&sec.payload[..]) else {
            break;
        };
        match map_get(&mut value, "virtio") {
            Some(Value::Array(devs)) if !devs.is_empty() && !rng.chance(1, 16) => {
                let i = rng.below(devs.len());
                mutate_device(rng, &mut devs[i], &ranges);
            }
            Some(Value::Array(devs)) => {
                // Another number of devices: none, or one twice.
                if devs.is_empty() || rng.chance(1, 2) {
                    devs.clear();
                } else {
                    let dup = devs[0].clone();
                    devs.push(dup);
                }
            }
            _ => {
                mutate_value(rng, &mut value, 0);
            }
        }
        let mut out = Vec::new();
        if ciborium::into_writer(&value, &mut out).is_ok() {
            sec.payload = out;
        }
    }
    s.assemble(true, None)
}

/// `input` with its Devices section decoded, changed by `f` and re-encoded
/// (lengths, CRCs and End counts fixed): for hand-made regression seeds.
pub fn with_devices(input: &[u8], f: impl FnOnce(&mut DevicesState)) -> Option<Vec<u8>> {
    let mut raw = RawStream::split(input);
    let sec = raw
        .sections
        .iter_mut()
        .find(|s| s.id == SectionId::Devices.as_u32())?;
    let mut d: DevicesState = ciborium::from_reader(&sec.payload[..]).ok()?;
    f(&mut d);
    let mut payload = Vec::new();
    ciborium::into_writer(&d, &mut payload).ok()?;
    sec.payload = payload;
    Some(raw.assemble(true, None))
}

/// A change to the state of the seed's disk.
type DeviceEdit = fn(&mut VirtioPciState);

/// Hand-made regression seeds from the busy seed, one per rule of
/// `VirtioPci::restore`: (name, input, `Some(text)`: refused with an error
/// containing it; `None`: loads).
pub fn regressions(busy: &[u8]) -> Vec<(&'static str, Vec<u8>, Option<&'static str>)> {
    let cases: [(&str, DeviceEdit, Option<&str>); 15] = [
        (
            "regress-devices-wrong-slot",
            |s| s.slot = 5,
            Some("device state for virtio-blk@05 arrived for virtio-blk@04"),
        ),
        (
            "regress-devices-wrong-kind",
            |s| s.kind = "virtio-net".into(),
            Some("device state for virtio-net@04 arrived for virtio-blk@04"),
        ),
        (
            "regress-devices-config-read-only",
            |s| s.config[0] = 0x1041_1af4,
            Some("read-only bits"),
        ),
        (
            "regress-devices-config-short",
            |s| {
                s.config.pop();
            },
            Some("PCI config space has 63 registers, expected 64"),
        ),
        (
            "regress-devices-two-queues",
            |s| s.queues.push(s.queues[0].clone()),
            Some("2 queues and 2 MSI-X vectors in the state, the device has 1 and 2"),
        ),
        (
            "regress-devices-msix-vectors",
            |s| s.msix_table.push([0, 0, 0, 1]),
            Some("1 queues and 3 MSI-X vectors in the state"),
        ),
        (
            "regress-devices-feature-not-offered",
            |s| s.driver_features |= 1 << 60,
            Some("were never offered"),
        ),
        (
            "regress-devices-queue-size-3",
            |s| s.queues[0].size = 3,
            Some("queue 0: size 3 (must be a power of two up to 256)"),
        ),
        (
            "regress-devices-queue-size-512",
            |s| s.queues[0].size = 512,
            Some("queue 0: size 512"),
        ),
        (
            "regress-devices-ring-outside-ram",
            |s| s.queues[0].used_ring = RAM_BYTES - 0x40,
            Some("queue 0 does not fit in guest memory"),
        ),
        (
            "regress-devices-desc-misaligned",
            |s| s.queues[0].desc_table += 8,
            Some("queue 0: virtio queue descriptor table breaks alignment constraints"),
        ),
        (
            "regress-devices-features-ok-without-version-1",
            |s| s.driver_features &= !(1 << 32),
            Some("FEATURES_OK without VERSION_1"),
        ),
        (
            "regress-devices-vector-past-table",
            |s| s.queues[0].vector = 7,
            Some("an MSI-X vector past the 2-entry table"),
        ),
        (
            "regress-devices-msix-control-bits",
            |s| s.msix_table[0][3] = 0x8001,
            Some("MSI-X table or pending bits no driver could have set"),
        ),
        // Not yet DRIVER_OK: the rings are checked when the driver sets it.
        (
            "regress-devices-ring-outside-ram-before-driver-ok",
            |s| {
                s.status &= !4;
                s.queues[0].used_ring = RAM_BYTES - 0x40;
            },
            None,
        ),
    ];
    let mut out: Vec<_> = cases
        .into_iter()
        .filter_map(|(name, f, want)| {
            with_devices(busy, |d| {
                if let Some(s) = d.virtio.first_mut() {
                    f(s)
                }
            })
            .map(|b| (name, b, want))
        })
        .collect();
    if let Some(b) = with_devices(busy, |d| d.virtio.clear()) {
        out.push((
            "regress-devices-none",
            b,
            Some("state for 0 virtio devices, VM has 1"),
        ));
    }
    out
}
