//! Writing a VM: its RAM and state sections, and whole checkpoints.

use std::io::Write;

use ferry_format::{RamBatchBuilder, SectionId, StreamWriter};
use ferry_kvm::{GuestRam, PAGE_SIZE};

use super::{producer, Handshake};
use crate::vm::Vm;
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
        &Handshake {
            shape: vm.shape(),
            digest: false,
            streams: 1,
            session: 0,
            postcopy: false,
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
