//! Firmware boot: a BIOS image (Debian's SeaBIOS, `bios-256k.bin`) mapped as
//! QEMU's `pc` machine maps it, so the guest starts at the reset vector and
//! boots from its disks as a libvirt or Nova guest does.
//!
//! - The whole image is a read-only ROM ending at 4 GiB (`pc.bios`), where the
//!   reset vector 0xfffffff0 is.
//! - Its last 128 KiB (the "isa-bios") also appear at 0xe0000-0xfffff. QEMU
//!   shows them there through the i440FX PAM registers (ROM until the firmware
//!   makes the segment writable RAM and copies itself into it). ferry keeps that
//!   range plain RAM holding the same bytes from the start: SeaBIOS's shadowing
//!   copy then copies the bytes onto themselves, and the PAM registers are kept
//!   and migrated (see [`crate::devices::pci`]) without remapping memory.
//!
//! The ROM travels with the guest in checkpoints and migration streams, as
//! QEMU migrates `pc.bios`: a destination with another build of the firmware
//! file runs the source's, and a reset after the move runs the same firmware.

use std::path::{Path, PathBuf};

use ferry_kvm::{GuestRam, GuestRom, RomError};
use serde::{Deserialize, Serialize};

/// QEMU's default BIOS for the `pc` machine, from Debian's `seabios` package.
pub const DEFAULT_BIOS: &str = "/usr/share/seabios/bios-256k.bin";
/// Most of the image that also appears below 1 MiB (QEMU's `isa-bios`).
pub const ISA_BIOS_MAX: usize = 128 << 10;
/// Image sizes are a multiple of this (QEMU's rule for `-bios`).
pub const BIOS_ALIGN: usize = 64 << 10;
/// Largest image: 16 MiB below 4 GiB (QEMU's flash limit for `pc`).
pub const BIOS_MAX: usize = 16 << 20;
/// Where QEMU's option ROMs are (Debian's `qemu-system-data`): `pvh.bin`
/// boots a PVH kernel through the firmware.
pub const QEMU_ROM_DIR: &str = "/usr/share/qemu";
/// The fw_cfg file SeaBIOS runs the PVH loader from, and its boot path.
pub const PVH_ROM_FILE: &str = "genroms/pvh.bin";
pub const PVH_ROM_BOOT_PATH: &str = "/rom@genroms/pvh.bin";

/// The debug console port (QEMU's `isa-debugcon` at SeaBIOS's address).
pub const DEBUGCON_PORT: u16 = 0x402;
/// What reading it returns (QEMU's `readback` default).
pub const DEBUGCON_READBACK: u8 = 0xe9;
/// End of the legacy BIOS area (1 MiB).
const ISA_BIOS_END: u64 = 0x10_0000;

/// Which firmware a VM boots (`ferry-vm --firmware`, QEMU's `-bios`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareConfig {
    /// The BIOS image.
    pub path: PathBuf,
    /// The SMBIOS tables fw_cfg offers the firmware (QEMU's
    /// `etc/smbios/smbios-anchor` and `etc/smbios/smbios-tables`); `None` for
    /// none. The type 4 processor ID is filled in from the guest's CPUID.
    pub smbios: Option<ferry_boot::SmbiosConfig>,
    /// ACPI (QEMU's default; `-no-acpi` turns it off): the PIIX4 PM function
    /// at 00:01.3 with its power button, and the ACPI tables fw_cfg offers
    /// the firmware (`etc/acpi/tables`, `etc/acpi/rsdp`, `etc/table-loader`).
    pub acpi: bool,
    /// Where the bytes the firmware writes to port 0x402 go (SeaBIOS's debug
    /// log; QEMU's `-debugcon`); `None`: dropped.
    pub debugcon: Option<PathBuf>,
}

impl Default for FirmwareConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from(DEFAULT_BIOS),
            smbios: None,
            acpi: true,
            debugcon: None,
        }
    }
}

/// Why the firmware cannot be loaded or its state applied.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error(
        "cannot read the firmware {}: {source} (Debian's SeaBIOS is in the `seabios` \
         package: apt-get install seabios)", path.display()
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the firmware {} is {len} bytes: a BIOS image must be a multiple of 64 KiB, \
         at most 16 MiB (QEMU's rule)", path.display()
    )]
    Size { path: PathBuf, len: usize },
    #[error("cannot map the firmware ROM")]
    Rom(#[from] RomError),
    #[error("cannot copy the firmware below 1 MiB: {0}")]
    Ram(#[source] ferry_kvm::MemoryError),
    #[error(
        "the stream's firmware ROM is {stream} bytes, this VM's {ours}: start the \
         destination with a firmware of the source's size"
    )]
    StateSize { stream: usize, ours: usize },
}

/// The firmware ROM's state in checkpoints and streams: its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareState {
    #[serde(with = "serde_bytes")]
    pub bios: Vec<u8>,
}

/// A VM's firmware: the ROM below 4 GiB.
#[derive(Debug)]
pub struct Firmware {
    rom: GuestRom,
}

impl Firmware {
    /// Reads the image `config` names and maps it into a ROM ending at 4 GiB.
    pub fn load(config: &FirmwareConfig) -> Result<Self, FirmwareError> {
        let image = std::fs::read(&config.path).map_err(|source| FirmwareError::Read {
            path: config.path.clone(),
            source,
        })?;
        Self::from_image(&config.path, &image)
    }

    fn from_image(path: &Path, image: &[u8]) -> Result<Self, FirmwareError> {
        let len = image.len();
        if len == 0 || len % BIOS_ALIGN != 0 || len > BIOS_MAX {
            return Err(FirmwareError::Size {
                path: path.to_path_buf(),
                len,
            });
        }
        let rom = GuestRom::new((1u64 << 32) - len as u64, image)?;
        Ok(Self { rom })
    }

    /// Maps the ROM into `vm` (read-only).
    pub fn register(&self, vm: &kvm_ioctls::VmFd) -> Result<(), FirmwareError> {
        Ok(self.rom.register(vm)?)
    }

    /// Copies the image's last 128 KiB to 0xe0000-0xfffff of `ram`, where the
    /// firmware's real-mode entry and its shadow copy run (at creation, and
    /// again on a reset).
    pub fn copy_isa_bios(&self, ram: &GuestRam) -> Result<(), FirmwareError> {
        let image = self.rom.bytes();
        let isa = &image[image.len() - image.len().min(ISA_BIOS_MAX)..];
        ram.write(ISA_BIOS_END - isa.len() as u64, isa)
            .map_err(FirmwareError::Ram)
    }

    /// The name a destination must match: the ROM and its size.
    pub fn shape_name(&self) -> String {
        format!("rom:pc.bios:{}", self.rom.len())
    }

    /// The state to save.
    pub fn state(&self) -> FirmwareState {
        FirmwareState {
            bios: self.rom.bytes(),
        }
    }

    /// Refuses a ROM of another size (nothing is applied).
    pub fn check(&self, state: &FirmwareState) -> Result<(), FirmwareError> {
        let ours = self.rom.len();
        if state.bios.len() != ours {
            return Err(FirmwareError::StateSize {
                stream: state.bios.len(),
                ours,
            });
        }
        Ok(())
    }

    /// Takes the source's ROM.
    pub fn restore(&self, state: &FirmwareState) -> Result<(), FirmwareError> {
        self.check(state)?;
        Ok(self.rom.write(&state.bios)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_must_be_whole_64k_blocks_up_to_16m() {
        for len in [0, 4096, BIOS_ALIGN + 4096, BIOS_MAX + BIOS_ALIGN] {
            let err = Firmware::from_image(Path::new("x.bin"), &vec![0u8; len]).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("multiple of 64 KiB"), "{len}: {text}");
        }
        let fw = Firmware::from_image(Path::new("x.bin"), &vec![7u8; 256 << 10]).unwrap();
        assert_eq!(fw.shape_name(), "rom:pc.bios:262144");
    }

    #[test]
    fn the_isa_bios_is_the_images_tail_below_1m() {
        let mut image = vec![0u8; 256 << 10];
        for (i, b) in image.iter_mut().enumerate() {
            *b = (i / 4096) as u8;
        }
        let fw = Firmware::from_image(Path::new("x.bin"), &image).unwrap();
        let ram = GuestRam::new(&[(0, 8 << 20)], ferry_kvm::Backing::Anonymous).unwrap();
        fw.copy_isa_bios(&ram).unwrap();
        let mut low = vec![0u8; ISA_BIOS_MAX];
        ram.read(0xe0000, &mut low).unwrap();
        assert_eq!(low, image[image.len() - ISA_BIOS_MAX..]);
        let mut below = [0u8; 16];
        ram.read(0xdfff0, &mut below).unwrap();
        assert_eq!(below, [0u8; 16], "nothing below the isa-bios");

        // A 64 KiB image appears whole at 0xf0000.
        let small = Firmware::from_image(Path::new("x.bin"), &image[..64 << 10]).unwrap();
        small.copy_isa_bios(&ram).unwrap();
        let mut f = vec![0u8; 64 << 10];
        ram.read(0xf0000, &mut f).unwrap();
        assert_eq!(f, image[..64 << 10]);
    }

    #[test]
    fn a_rom_of_another_size_is_refused_before_anything_changes() {
        let fw = Firmware::from_image(Path::new("x.bin"), &vec![1u8; 128 << 10]).unwrap();
        let err = fw
            .restore(&FirmwareState {
                bios: vec![2u8; 64 << 10],
            })
            .unwrap_err();
        assert!(err.to_string().contains("65536 bytes"), "{err}");
        assert_eq!(fw.state().bios, vec![1u8; 128 << 10]);
        fw.restore(&FirmwareState {
            bios: vec![3u8; 128 << 10],
        })
        .unwrap();
        assert_eq!(fw.state().bios, vec![3u8; 128 << 10]);
    }
}
