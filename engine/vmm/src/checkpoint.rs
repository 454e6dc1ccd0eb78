//! Checkpoints: a paused VM written as a ferry stream (a migration into a file), and
//! the restore that builds a new VM from one.
//!
//! Order in the stream: Shape, RAM pages (zero pages are not stored: a new VM's RAM is
//! zero), vCPUs, VM state, devices, End. A restore validates every section before the
//! VM runs; a stream that fails anywhere leaves a VM that never ran and is dropped.

use std::io::Write;

use ferry_format::{RamBatchBuilder, SectionId, StreamWriter};
use ferry_kvm::{Backing, GuestRam, PAGE_SIZE};

use crate::devices::serial::SinkSpec;
use crate::vm::{Vm, VmShape};
use crate::VmmError;

/// Pages per RAM section.
const BATCH_PAGES: usize = 4096;

/// What a checkpoint wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointStats {
    pub bytes: u64,
    pub ram_pages: u64,
    pub zero_pages_skipped: u64,
}

/// The producer string written into every stream.
pub fn producer() -> String {
    format!("ferry {}", env!("CARGO_PKG_VERSION"))
}

/// Writes every non-zero page of `ram` as RAM sections.
pub fn write_ram<W: Write>(
    ram: &GuestRam,
    out: &mut StreamWriter<W>,
    stats: &mut CheckpointStats,
) -> Result<(), VmmError> {
    let mut batch = RamBatchBuilder::with_max_pages(BATCH_PAGES as u32);
    let mut page = [0u8; PAGE_SIZE];
    for (base, size) in ram.ranges() {
        let mut gpa = base;
        while gpa < base + size {
            if ram.is_zero_page(gpa)? {
                stats.zero_pages_skipped += 1;
            } else {
                ram.read(gpa, &mut page)?;
                batch.push_data(gpa, &page)?;
                stats.ram_pages += 1;
                if batch.len() >= BATCH_PAGES {
                    out.write_ram_batch(&batch)?;
                    batch.clear();
                }
            }
            gpa += PAGE_SIZE as u64;
        }
    }
    if !batch.is_empty() {
        out.write_ram_batch(&batch)?;
    }
    Ok(())
}

/// Writes the state of a paused VM besides its RAM: vCPUs, VM-wide state, devices.
/// Checkpoints and migrations at switch-over both end with these sections.
pub fn write_state<W: Write>(vm: &Vm, out: &mut StreamWriter<W>) -> Result<(), VmmError> {
    out.write_cbor(
        SectionId::Vcpus,
        SectionId::Vcpus.current_version(),
        &vm.capture_vcpus()?,
    )?;
    out.write_cbor(
        SectionId::Vm,
        SectionId::Vm.current_version(),
        &vm.capture_vm()?,
    )?;
    out.write_cbor(
        SectionId::Devices,
        SectionId::Devices.current_version(),
        &vm.capture_devices()?,
    )?;
    Ok(())
}

/// Writes a checkpoint of a paused VM.
pub fn save<W: Write>(vm: &Vm, w: W) -> Result<(W, CheckpointStats), VmmError> {
    if vm.is_running() {
        return Err(VmmError::Config(
            "the VM is running; pause it before taking a checkpoint".into(),
        ));
    }
    let mut stats = CheckpointStats::default();
    let mut out = StreamWriter::new(w, &producer())?;
    out.write_cbor(
        SectionId::Shape,
        SectionId::Shape.current_version(),
        &crate::migration::Handshake {
            shape: vm.shape(),
            digest: false,
            streams: 1,
            session: 0,
        },
    )?;
    write_ram(vm.ram(), &mut out, &mut stats)?;
    write_state(vm, &mut out)?;
    stats.bytes = out.bytes_written();
    let mut w = out.finish()?;
    w.flush()
        .map_err(|e| VmmError::Io("cannot flush the checkpoint".into(), e))?;
    Ok((w, stats))
}

/// A stream's VM is not the VM this side was configured to receive.
///
/// The `Display` text is for this side's operator and names both sides' values;
/// [`ShapeMismatch::public`] is what the peer of a migration is told, and names only
/// what its own stream said: a stranger learns nothing of this side's
/// configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeMismatch {
    #[error(
        "the VM in this stream has {} MiB of RAM but {} MiB were asked for: use -m {}M or \
         the stream of another VM",
        .stream >> 20, .configured >> 20, .stream >> 20
    )]
    Memory { stream: u64, configured: u64 },
    #[error(
        "the VM in this stream has {stream} vCPUs but {configured} were asked for: use \
         -smp {stream} or the stream of another VM"
    )]
    Vcpus { stream: u32, configured: u32 },
    #[error(
        "the VM has devices {stream:?}; this side was given {configured:?} (give it the same \
         disks, NICs and entropy devices in the same PCI slots, with the same sizes)"
    )]
    Devices {
        stream: Vec<String>,
        configured: Vec<String>,
    },
    #[error(
        "this host's CPU lacks features the guest's CPU has: {}; the guest could crash on \
         its next use of one: migrate it to a host with these features, or start it with a \
         CPU model both hosts support (-cpu qemu64, kvm64)",
        .missing.join(", ")
    )]
    CpuFeatures { missing: Vec<String> },
}

impl ShapeMismatch {
    /// What the source of a migration is told: its own values only (the
    /// destination's are in the destination's log).
    pub fn public(&self) -> String {
        let log = "(the destination's log says what it was configured with)";
        match self {
            Self::Memory { stream, .. } => format!(
                "the destination is not configured for a VM with {} MiB of RAM {log}",
                stream >> 20
            ),
            Self::Vcpus { stream, .. } => {
                format!("the destination is not configured for a VM with {stream} vCPUs {log}")
            }
            Self::Devices { stream, .. } => {
                format!("the destination is not configured with this VM's devices {stream:?} {log}")
            }
            // The guest's own features; the operator needs them to choose a host.
            Self::CpuFeatures { .. } => self.to_string(),
        }
    }
}

/// Options for building a VM from a stream.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub backing: Backing,
    pub serial: SinkSpec,
    /// When set, the stream's RAM size must equal this (the user's `-m`).
    pub expect_mem_bytes: Option<u64>,
    /// When set, the stream's vCPU count must equal this (the user's `-smp`).
    pub expect_vcpus: Option<u32>,
    /// This host's virtio devices; they must match the checkpoint's.
    pub virtio: Vec<crate::vm::VirtioSpec>,
    /// This host's IDE drives; they must match the checkpoint's.
    pub ide: Vec<crate::devices::ide::IdeDriveConfig>,
    /// This host's fw_cfg; it must match the checkpoint's.
    pub fw_cfg: Option<crate::devices::fw_cfg::FwCfgConfig>,
    /// This host's firmware; the checkpoint's ROM replaces it, of the same size.
    pub firmware: Option<crate::firmware::FirmwareConfig>,
    /// This host's RTC; the checkpoint must have one exactly when this
    /// does (its clock and CMOS come from the checkpoint).
    pub rtc: Option<crate::devices::rtc::RtcConfig>,
}

/// Checks that the page at `gpa` lies inside guest RAM (`ranges`).
pub(crate) fn check_inside(ranges: &[(u64, u64)], gpa: u64) -> Result<(), VmmError> {
    let inside = ranges
        .iter()
        .any(|&(b, s)| gpa >= b && gpa - b < s && s - (gpa - b) >= PAGE_SIZE as u64);
    if inside {
        Ok(())
    } else {
        Err(VmmError::Restore(format!(
            "the stream carries a page at guest address {gpa:#x}, outside this VM's RAM \
             {ranges:x?}"
        )))
    }
}

/// Most RAM ranges (KVM memory slots) a stream may ask for; ferry's layout uses
/// at most two (below the PCI hole and above 4 GiB).
pub const MAX_RAM_RANGES: usize = 32;

/// Decodes the Shape section that opens every stream and checks it against the
/// options.
///
/// The shape comes from the wire, so it is validated as hostile before anything
/// is built from it: the vCPU count and the RAM ranges must be ones this ferry
/// could have created itself (`Vm::create` enforces the same bounds). Found by
/// fuzzing (fuzz/corpus/{receiver,checkpoint}/regress-*): a shape with 0 vCPUs
/// made the VM builder index an empty vCPU list and panic, and RAM ranges whose
/// sizes add up past 2^64 overflowed the sum below (a panic in debug builds, a
/// wrapped size in release ones).
pub fn check_shape(shape: &VmShape, opts: &RestoreOptions) -> Result<(), VmmError> {
    let refuse =
        |why: String| VmmError::Restore(format!("the stream's VM shape is invalid: {why}"));
    if shape.cpuid.len() > kvm_bindings::KVM_MAX_CPUID_ENTRIES {
        return Err(refuse(format!(
            "{} CPUID leaves; KVM takes at most {}",
            shape.cpuid.len(),
            kvm_bindings::KVM_MAX_CPUID_ENTRIES
        )));
    }
    if shape.vcpus == 0 || shape.vcpus > crate::vm::MAX_VCPUS {
        return Err(refuse(format!(
            "{} vCPUs; ferry supports 1 to {}",
            shape.vcpus,
            crate::vm::MAX_VCPUS
        )));
    }
    if shape.ram_ranges.is_empty() || shape.ram_ranges.len() > MAX_RAM_RANGES {
        return Err(refuse(format!(
            "{} RAM ranges; ferry supports 1 to {MAX_RAM_RANGES}",
            shape.ram_ranges.len()
        )));
    }
    let mut total: u64 = 0;
    let mut prev_end: u64 = 0;
    for (i, &(base, size)) in shape.ram_ranges.iter().enumerate() {
        let end = base.checked_add(size);
        let aligned = base % PAGE_SIZE as u64 == 0 && size % PAGE_SIZE as u64 == 0;
        match end {
            Some(end) if size > 0 && aligned && (i == 0 || base >= prev_end) => prev_end = end,
            _ => {
                return Err(refuse(format!(
                    "RAM range {i} ({base:#x}+{size:#x}) is empty, unaligned, overlapping or \
                     past the end of the address space"
                )))
            }
        }
        total = total.saturating_add(size);
    }
    if !(ferry_boot::MIN_RAM_BYTES..=ferry_boot::MAX_RAM_BYTES).contains(&total) {
        return Err(refuse(format!(
            "{total} bytes of RAM; ferry supports {} MiB to {} GiB",
            ferry_boot::MIN_RAM_BYTES >> 20,
            ferry_boot::MAX_RAM_BYTES >> 30
        )));
    }
    if let Some(want) = opts.expect_mem_bytes.filter(|&w| w != total) {
        return Err(ShapeMismatch::Memory {
            stream: total,
            configured: want,
        }
        .into());
    }
    if let Some(want) = opts.expect_vcpus.filter(|&w| w != shape.vcpus) {
        return Err(ShapeMismatch::Vcpus {
            stream: shape.vcpus,
            configured: want,
        }
        .into());
    }
    Ok(())
}

/// Reads a whole checkpoint and returns a paused VM ready to resume.
pub fn restore<R: std::io::Read + Send + std::fmt::Debug + 'static>(
    r: R,
    opts: &RestoreOptions,
) -> Result<Vm, VmmError> {
    let incoming = crate::migration::IncomingOptions {
        backing: opts.backing,
        serial: opts.serial.clone(),
        expect_mem_bytes: opts.expect_mem_bytes,
        expect_vcpus: opts.expect_vcpus,
        autostart: false,
        virtio: opts.virtio.clone(),
        ide: opts.ide.clone(),
        fw_cfg: opts.fw_cfg.clone(),
        firmware: opts.firmware.clone(),
        rtc: opts.rtc.clone(),
    };
    crate::migration::receive(Box::new(r), None, &incoming).map_err(|e| match e {
        crate::migration::MigrationError::Vmm(v) => v,
        other => VmmError::Restore(other.to_string()),
    })
}
