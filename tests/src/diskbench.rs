//! Guest disk throughput (`ferry-bench --disk`): the dirtier's `blkbench=M`
//! writes M MiB to its virtio-blk disk in 64 KiB requests, flushes, and reads
//! them back, printing a line on COM1 as each phase ends. The host times the
//! phases from those lines, for ferry-vm and for QEMU 7.2 (`-M pc`, KVM) on
//! the same kind of image: a raw file (every block allocated beforehand) and
//! a fresh qcow2 image (the writes allocate its clusters).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::migrate::qemu_cpu;
use crate::{bin, Scratch};

/// Which VMM runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Ferry,
    Qemu,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ferry => "ferry",
            Self::Qemu => "qemu-7.2",
        }
    }
}

/// The image a run's disk is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// One run's phases, in seconds.
#[derive(Debug, Clone, Copy)]
pub struct DiskRun {
    pub write_s: f64,
    pub read_s: f64,
}

/// The serial lines that end each phase, in order.
const MARKS: [&str; 3] = ["blkbench: start", "blkbench: written", "blkbench: read"];

/// Runs `blkbench=mib` once under `engine` on an image of `format` in
/// `scratch`; the image is made (qcow2) or reused (raw) here.
pub fn run(scratch: &Scratch, engine: Engine, format: Format, mib: u64) -> Result<DiskRun, String> {
    let image = prepare(scratch, format, mib)?;
    let serial = scratch.path(&format!("blkbench-{}.serial", engine.name()));
    let _ = std::fs::remove_file(&serial);
    let append = format!("ws=0 hb=0 blkbench={mib}");
    let guest = scratch.dirtier.display().to_string();
    let img = image.display().to_string();
    let mut cmd = match engine {
        Engine::Ferry => {
            let mut c = Command::new(bin("ferry-vm"));
            let disk = match format {
                Format::Raw => img,
                Format::Qcow2 => format!("{img},format=qcow2"),
            };
            c.args(["run", "--kernel", &guest, "-m", "256M", "--append", &append])
                .args(["--disk", &disk, "--serial"])
                .arg(format!("file:{}", serial.display()));
            c
        }
        Engine::Qemu => {
            let qemu = crate::migrate::qemu_binary().ok_or("QEMU is not installed")?;
            let cpu = qemu_cpu(&qemu);
            let mut c = Command::new(qemu);
            c.args(["-M", "pc", "-accel", "kvm", "-cpu", cpu.arg, "-m", "256"])
                .args(["-nodefaults", "-display", "none", "-monitor", "none"])
                .args(["-kernel", &guest, "-append", &append, "-drive"])
                .arg(format!(
                    "file={img},format={},if=none,id=d0,cache=writeback",
                    format.name()
                ))
                .args(["-device", "virtio-blk-pci,drive=d0,disable-legacy=on"])
                .arg("-serial")
                .arg(format!("file:{}", serial.display()));
            c
        }
    };
    let stderr = scratch.path(&format!("blkbench-{}.stderr", engine.name()));
    // Boot (SeaBIOS under QEMU) and a 1 GiB run fit easily.
    let (_, at) = crate::time_serial_marks(
        &mut cmd,
        engine.name(),
        &serial,
        &stderr,
        &MARKS,
        Duration::from_secs(300),
        "finished blkbench",
    )?;
    let secs = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64();
    Ok(DiskRun {
        write_s: secs(at[0], at[1]),
        read_s: secs(at[1], at[2]),
    })
}

/// The image: a raw file written once in full (so no run pays for block
/// allocation), or a fresh qcow2 image.
fn prepare(scratch: &Scratch, format: Format, mib: u64) -> Result<PathBuf, String> {
    let bytes = (mib + 1) << 20;
    match format {
        Format::Raw => {
            let p = scratch.path("blkbench.raw");
            let full = std::fs::metadata(&p).is_ok_and(|m| m.len() == bytes);
            if !full {
                std::fs::write(&p, vec![0x5au8; bytes as usize]).map_err(|e| e.to_string())?;
            }
            Ok(p)
        }
        Format::Qcow2 => {
            let p = scratch.path("blkbench.qcow2");
            let _ = std::fs::remove_file(&p);
            qemu_img_create(&p, bytes)?;
            Ok(p)
        }
    }
}

fn qemu_img_create(p: &Path, bytes: u64) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(p)
        .arg(bytes.to_string())
        .output()
        .map_err(|e| format!("run qemu-img (install qemu-utils): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
