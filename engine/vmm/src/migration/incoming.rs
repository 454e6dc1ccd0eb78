//! The destination side (and checkpoint restore): validate the shape, build the VM,
//! apply pages and state, verify, answer on the return path.

use std::io::{BufReader, BufWriter, Write};

use ferry_format::{RamBatch, SectionId, StreamReader, StreamWriter};
use ferry_kvm::Backing;

use super::precopy::ram_digest;
use super::{Handshake, MigrationError, Reply, REPLY_VERSION};
use crate::checkpoint::{apply_ram_batch, check_shape, producer, RestoreOptions};
use crate::cpu::VcpuState;
use crate::devices::serial::SinkSpec;
use crate::vm::{DevicesState, Vm, VmState};
use crate::VmmError;

use super::transport::{ReadHalf, WriteHalf};

/// How the destination builds and starts the VM.
#[derive(Debug, Clone)]
pub struct IncomingOptions {
    pub backing: Backing,
    pub serial: SinkSpec,
    /// The stream's RAM size must equal this, when set (the user's `-m`).
    pub expect_mem_bytes: Option<u64>,
    /// Resume the VM once loaded (otherwise it stays paused, like QEMU with `-S`).
    pub autostart: bool,
}

struct ReturnPath {
    out: Option<StreamWriter<BufWriter<Box<dyn WriteHalf>>>>,
}

impl ReturnPath {
    fn send(&mut self, reply: &Reply) {
        if let Some(out) = &mut self.out {
            let sent = out
                .write_cbor(SectionId::Reply, REPLY_VERSION, reply)
                .map_err(|e| e.to_string())
                .and_then(|_| out.get_mut().flush().map_err(|e| e.to_string()));
            if let Err(e) = sent {
                tracing::warn!("cannot answer the source: {e}");
            }
        }
    }
}

/// Receives a VM from `reader`; with `writer`, answers the source on the return path.
/// Returns the VM loaded (and running if `autostart`). On any error the VM is dropped
/// before it ever ran, and the source is told why.
pub fn receive(
    reader: Box<dyn ReadHalf>,
    writer: Option<Box<dyn WriteHalf>>,
    opts: &IncomingOptions,
) -> Result<Vm, MigrationError> {
    let mut ret = ReturnPath { out: None };
    if let Some(w) = writer {
        match StreamWriter::new(BufWriter::with_capacity(64 << 10, w), &producer()) {
            Ok(mut out) => {
                let _ = out.get_mut().flush();
                ret.out = Some(out);
            }
            Err(e) => tracing::warn!("cannot open the return path: {e}"),
        }
    }
    let result = load(reader, opts, &mut ret);
    match result {
        Ok(vm) => {
            ret.send(&Reply::Loaded {
                running: vm.is_running(),
            });
            Ok(vm)
        }
        Err(e) => {
            ret.send(&Reply::Error {
                message: e.to_string(),
            });
            Err(e)
        }
    }
}

fn load(
    reader: Box<dyn ReadHalf>,
    opts: &IncomingOptions,
    ret: &mut ReturnPath,
) -> Result<Vm, MigrationError> {
    let limits = ferry_format::Limits::default();
    let (mut reader, _preamble) =
        StreamReader::new(BufReader::with_capacity(1 << 20, reader), limits)?;
    let mut buf = Vec::new();
    let header = reader.next_section(&mut buf)?;
    if header.id != SectionId::Shape {
        return Err(VmmError::Restore(format!(
            "the stream starts with section {}, not the VM shape: it is not a ferry VM stream",
            header.id
        ))
        .into());
    }
    let hs: Handshake = ferry_format::decode_cbor(SectionId::Shape, &buf, &limits)?;
    let restore_opts = RestoreOptions {
        backing: opts.backing,
        serial: opts.serial.clone(),
        expect_mem_bytes: opts.expect_mem_bytes,
    };
    check_shape(&hs.shape, &restore_opts)?;
    let mut vm = Vm::create_for_shape(&hs.shape, opts.backing, opts.serial.clone())?;
    ret.send(&Reply::Ready);

    let mut vcpus: Option<Vec<VcpuState>> = None;
    let mut vm_state: Option<VmState> = None;
    let mut devices: Option<DevicesState> = None;
    let mut digest: Option<Vec<u32>> = None;
    loop {
        let header = reader.next_section(&mut buf)?;
        match header.id {
            SectionId::RamPages => {
                let batch = RamBatch::parse_with_limits(&buf, &limits)?;
                apply_ram_batch(vm.ram(), &batch)?;
            }
            SectionId::Vcpus => vcpus = Some(ferry_format::decode_cbor(header.id, &buf, &limits)?),
            SectionId::Vm => vm_state = Some(ferry_format::decode_cbor(header.id, &buf, &limits)?),
            SectionId::Devices => {
                devices = Some(ferry_format::decode_cbor(header.id, &buf, &limits)?)
            }
            SectionId::Digest => {
                digest = Some(ferry_format::decode_cbor(header.id, &buf, &limits)?)
            }
            SectionId::End => break,
            other => {
                return Err(
                    VmmError::Restore(format!("unexpected section {other} in a VM stream")).into(),
                )
            }
        }
    }
    let missing = |what: &str| -> MigrationError {
        VmmError::Restore(format!(
            "the stream ended without the {what} section: the sender was interrupted or is broken"
        ))
        .into()
    };
    let vcpus = vcpus.ok_or_else(|| missing("vCPU"))?;
    let vm_state = vm_state.ok_or_else(|| missing("VM state"))?;
    let devices = devices.ok_or_else(|| missing("device"))?;
    if hs.digest {
        let want = digest.ok_or_else(|| missing("RAM digest"))?;
        let have = ram_digest(vm.ram())?;
        if let Some(i) = want.iter().zip(&have).position(|(a, b)| a != b) {
            return Err(VmmError::Restore(format!(
                "guest RAM differs from the source in MiB {i} of RAM (digest mismatch): the \
                 migration is aborted and the source keeps running"
            ))
            .into());
        }
        if want.len() != have.len() {
            return Err(VmmError::Restore("the RAM digest has the wrong length".into()).into());
        }
    }
    vm.restore_state(vcpus, &vm_state, &devices)?;
    if opts.autostart {
        vm.resume()?;
    }
    Ok(vm)
}
