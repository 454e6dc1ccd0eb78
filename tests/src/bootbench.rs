//! Firmware boot time (`ferry-bench --boot`): the dirtier's boot disk (its
//! own loader, read through the BIOS disk services) booted by Debian's
//! SeaBIOS under ferry-vm (`--firmware`), ferry-qemu (`-machine pc` without
//! `-kernel`) and QEMU 7.2 (`-M pc`, KVM), from an IDE disk and from a
//! virtio-blk disk. The host times, from the VMM's start, the dirtier's first
//! serial line (the firmware's work and the loader's) and its `ready` line.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::migrate::qemu_cpu;
use crate::{bin, Scratch};

/// Which VMM boots the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    FerryVm,
    FerryQemu,
    Qemu,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Self::FerryVm => "ferry-vm",
            Self::FerryQemu => "ferry-qemu",
            Self::Qemu => "qemu-7.2",
        }
    }
}

/// The bus the boot disk is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    Ide,
    Virtio,
}

impl Bus {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ide => "ide",
            Self::Virtio => "virtio",
        }
    }
}

/// One boot, in seconds from the VMM's start.
#[derive(Debug, Clone, Copy)]
pub struct BootRun {
    pub first_line_s: f64,
    pub ready_s: f64,
}

/// Boots `disk` once under `engine` with the disk on `bus`.
pub fn run(scratch: &Scratch, engine: Engine, bus: Bus, disk: &Path) -> Result<BootRun, String> {
    let serial = scratch.path(&format!("boot-{}.serial", engine.name()));
    let _ = std::fs::remove_file(&serial);
    let img = disk.display().to_string();
    let serial_arg = format!("file:{}", serial.display());
    let qemu_drive = |c: &mut Command| {
        match bus {
            Bus::Ide => c.args(["-drive", &format!("file={img},format=raw,if=ide")]),
            Bus::Virtio => c
                .args(["-drive", &format!("file={img},format=raw,if=none,id=d0")])
                .args([
                    "-device",
                    "virtio-blk-pci,drive=d0,disable-legacy=on,bootindex=1",
                ]),
        };
    };
    let mut cmd = match engine {
        Engine::FerryVm => {
            let mut c = Command::new(bin("ferry-vm"));
            c.args(["run", "--firmware", "-m", "128M"])
                .arg(match bus {
                    Bus::Ide => "--ide-disk",
                    Bus::Virtio => "--disk",
                })
                .arg(&img)
                .args(["--serial", &serial_arg]);
            c
        }
        Engine::FerryQemu => {
            let mut c = Command::new(bin("ferry-qemu"));
            c.args(["-machine", "pc", "-accel", "kvm", "-m", "128"])
                .args(["-nodefaults", "-display", "none"])
                .args(["-serial", &serial_arg]);
            qemu_drive(&mut c);
            c
        }
        Engine::Qemu => {
            let qemu = crate::migrate::qemu_binary().ok_or("QEMU is not installed")?;
            let cpu = qemu_cpu(&qemu);
            let mut c = Command::new(qemu);
            c.args(["-M", "pc", "-accel", "kvm", "-cpu", cpu.arg, "-m", "128"])
                .args(["-nodefaults", "-display", "none", "-monitor", "none"])
                .args(["-serial", &serial_arg]);
            qemu_drive(&mut c);
            c
        }
    };
    let stderr = scratch.path(&format!("boot-{}.stderr", engine.name()));
    let (start, at) = crate::time_serial_marks(
        &mut cmd,
        engine.name(),
        &serial,
        &stderr,
        &["dirtier:", "dirtier: ready"],
        Duration::from_secs(120),
        "booted the dirtier",
    )?;
    let s = |at: Instant| at.duration_since(start).as_secs_f64();
    Ok(BootRun {
        first_line_s: s(at[0]),
        ready_s: s(at[1]),
    })
}
