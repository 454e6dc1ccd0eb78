//! A raw disk image that boots the dirtier through a BIOS: [`boot_disk`].
//!
//! The loader ([`BOOT_LOADER`], `guest/bootsect.S`, assembled and linked by
//! `build.rs`) is a PVH loader in a boot sector. Image layout, in 512-byte
//! sectors:
//!
//! | LBA | content |
//! |-----|---------|
//! | 0 | boot sector: loader code, parameter block at byte 0x198, `0x55 0xAA` at 0x1fe |
//! | 1 .. L-1 | rest of the loader (`L` = [`loader_sectors`]) |
//! | L .. L+7 | command line, NUL-terminated, at most [`CMDLINE_MAX`] bytes before the NUL |
//! | L+8 .. | payload: the ELF's `PT_LOAD` segment, its file bytes only |
//! | .. end | zeros, up to the image size (at least 1 MiB) |
//!
//! Parameter block (little-endian u32s): 0x198 `FBL1`, 0x19c sectors to read
//! after sector 0, 0x1a0 load address, 0x1a4 file size, 0x1a8 memory size,
//! 0x1ac PVH entry (the ELF's Xen `PHYS32_ENTRY` note); the assembler
//! writes 0x1b0 and 0x1b4, the addresses where the loader expects the
//! command line and the payload once read (`0x7c00 + 512 * LBA`).
//!
//! What the loader asks of the firmware: INT 13h AH=42h (extended read, a
//! disk address packet with a segment:offset buffer, at most 127 sectors a
//! call) on the drive the BIOS passed in DL; INT 15h EAX=E820h (20- or
//! 24-byte entries; at least one); port 0x92 fast A20 (or A20 already on);
//! COM1 at 0x3f8 for its error lines (`bootdisk: ERR read|e820|a20`). It
//! reads the image to `0x7e00` up (so the whole image must end below
//! [`LOW_LOAD_LIMIT`]), builds the memory map at `0x6040` (at most 64
//! entries) and `hvm_start_info` at `0x6000`, with `cmdline_paddr` pointing
//! at the command line where it was read, copies the payload to its load
//! address, zeroes the rest of the segment, and enters the PVH entry in
//! 32-bit protected mode (flat CS 0x08, data 0x10, paging off, IF 0) with
//! `%ebx` = `0x6000`.
//!
//! **Disks of the dirtier's own.** `blk=K` writes sectors `0..K` of the
//! first modern virtio-blk function (device `0x1042`) on bus 0, and
//! `cdrom=` reads the first ATAPI unit: a boot disk on IDE (a hard disk,
//! not ATAPI) or on a transitional virtio-blk (`0x1001`) is never one of
//! them. A boot disk on a modern-only virtio-blk must sit in a later PCI
//! slot than the `blk=` disk, or `blk=` overwrites the loader (harmless to
//! the running guest, fatal to its next boot).

use std::path::{Path, PathBuf};

/// Bytes per sector.
pub const SECTOR: usize = 512;
/// The loader, a flat binary run at `0x7c00`, a whole number of sectors.
pub const BOOT_LOADER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bootsect.bin"));
/// Room for the command line, its NUL included.
pub const CMDLINE_AREA: usize = 4096;
/// The longest command line, in bytes (without its NUL).
pub const CMDLINE_MAX: usize = CMDLINE_AREA - 1;
/// The smallest image [`boot_disk`] writes.
pub const MIN_IMAGE_BYTES: u64 = 1 << 20;
/// The loader reads the image to `0x7c00 ..` this address.
pub const LOW_LOAD_LIMIT: u64 = 0x9_0000;
/// Where the BIOS loads sector 0.
pub const BOOT_SECTOR_ADDR: u64 = 0x7c00;

/// Byte offsets in sector 0 of the loader's parameter block.
mod param {
    pub const MAGIC: usize = 0x198;
    pub const SECTORS: usize = 0x19c;
    pub const LOAD: usize = 0x1a0;
    pub const FILESZ: usize = 0x1a4;
    pub const MEMSZ: usize = 0x1a8;
    pub const ENTRY: usize = 0x1ac;
    /// Filled in by the assembler: where the loader expects the command
    /// line and the payload in memory.
    #[cfg(test)]
    pub const CMDLINE_ADDR: usize = 0x1b0;
    #[cfg(test)]
    pub const PAYLOAD_ADDR: usize = 0x1b4;
}

/// Why a boot disk could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum BootDiskError {
    #[error("command line is {len} bytes; a boot disk holds at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("command line contains a NUL byte at {at}")]
    CmdlineNul { at: usize },
    #[error("payload is not a PVH ELF the loader can boot: {reason}")]
    BadElf { reason: String },
    #[error(
        "boot image is {bytes} bytes; the loader reads it below {limit:#x}, \
         at most {max} bytes"
    )]
    TooLarge { bytes: u64, max: u64, limit: u64 },
    #[error("disk size {size} is not a whole number of {SECTOR}-byte sectors")]
    UnalignedSize { size: u64 },
    #[error("disk size {size} is smaller than the boot image ({need} bytes)")]
    TooSmall { size: u64, need: u64 },
    #[error("write boot disk {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The part of a PVH ELF the loader needs: its one `PT_LOAD` segment and
/// its PVH entry point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload<'a> {
    /// Physical load address (`p_paddr`).
    pub load: u32,
    /// The segment's file bytes (`p_filesz` of them).
    pub bytes: &'a [u8],
    /// Bytes in memory (`p_memsz`): the rest past `bytes` is zeroed.
    pub memsz: u32,
    /// The Xen `XEN_ELFNOTE_PHYS32_ENTRY` note's address.
    pub entry: u32,
}

fn bad(reason: impl Into<String>) -> BootDiskError {
    BootDiskError::BadElf {
        reason: reason.into(),
    }
}

fn field<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], BootDiskError> {
    b.get(at..at + N)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| bad(format!("truncated at byte {at}")))
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, BootDiskError> {
    field(b, at).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], at: usize) -> Result<u32, BootDiskError> {
    field(b, at).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], at: usize) -> Result<u64, BootDiskError> {
    field(b, at).map(u64::from_le_bytes)
}

fn below_4g(value: u64, what: &str) -> Result<u32, BootDiskError> {
    u32::try_from(value).map_err(|_| bad(format!("{what} {value:#x} is above 4 GiB")))
}

/// Finds the `PT_LOAD` segment (exactly one) and the PVH entry note of an
/// ELF64 x86-64 image.
pub fn pvh_payload(elf: &[u8]) -> Result<Payload<'_>, BootDiskError> {
    if elf.get(..5) != Some(b"\x7fELF\x02".as_slice()) || u16_at(elf, 18)? != 62 {
        return Err(bad("not an ELF64 x86-64 image"));
    }
    let phoff = usize::try_from(u64_at(elf, 32)?).map_err(|_| bad("program headers"))?;
    let (phentsize, phnum) = (usize::from(u16_at(elf, 54)?), u16_at(elf, 56)?);
    let mut load = None;
    let mut entry = None;
    for k in 0..usize::from(phnum) {
        let ph = phoff + k * phentsize;
        let (offset, paddr) = (u64_at(elf, ph + 8)?, u64_at(elf, ph + 24)?);
        let (filesz, memsz) = (u64_at(elf, ph + 32)?, u64_at(elf, ph + 40)?);
        let range = |len: u64| -> Result<&[u8], BootDiskError> {
            usize::try_from(offset)
                .ok()
                .zip(usize::try_from(len).ok())
                .and_then(|(o, n)| elf.get(o..o.checked_add(n)?))
                .ok_or_else(|| bad(format!("segment at {offset:#x} is outside the file")))
        };
        match u32_at(elf, ph)? {
            1 => {
                if load.is_some() {
                    return Err(bad("more than one PT_LOAD segment"));
                }
                if memsz < filesz {
                    return Err(bad("PT_LOAD memsz is below filesz"));
                }
                let end = paddr
                    .checked_add(memsz)
                    .ok_or_else(|| bad("PT_LOAD wraps"))?;
                below_4g(end, "PT_LOAD end")?;
                load = Some(Payload {
                    load: below_4g(paddr, "PT_LOAD address")?,
                    bytes: range(filesz)?,
                    memsz: below_4g(memsz, "PT_LOAD size")?,
                    entry: 0,
                });
            }
            4 => {
                let mut notes = range(filesz)?;
                while notes.len() >= 12 {
                    let (namesz, descsz, ntype) =
                        (u32_at(notes, 0)?, u32_at(notes, 4)?, u32_at(notes, 8)?);
                    let name_end = 12 + (namesz as usize).next_multiple_of(4);
                    let desc_end = name_end + (descsz as usize).next_multiple_of(4);
                    if notes.get(12..12 + namesz as usize) == Some(b"Xen\0".as_slice())
                        && ntype == 18
                    {
                        entry = Some(u32_at(notes, name_end)?);
                    }
                    notes = notes.get(desc_end..).unwrap_or_default();
                }
            }
            _ => {}
        }
    }
    let mut payload = load.ok_or_else(|| bad("no PT_LOAD segment"))?;
    payload.entry = entry.ok_or_else(|| bad("no Xen PHYS32_ENTRY note"))?;
    if payload.load < 0x10_0000 {
        return Err(bad(format!(
            "PT_LOAD at {:#x} is below 1 MiB, where the loader and the BIOS live",
            payload.load
        )));
    }
    Ok(payload)
}

/// Sectors the loader itself takes (`L`).
pub fn loader_sectors() -> usize {
    BOOT_LOADER.len() / SECTOR
}

/// The first LBA of the command line.
pub fn cmdline_lba() -> usize {
    loader_sectors()
}

/// The first LBA of the payload.
pub fn payload_lba() -> usize {
    loader_sectors() + CMDLINE_AREA / SECTOR
}

/// The boot image for `elf` with `cmdline`, padded to `size_bytes` (a whole
/// number of sectors) or, by default, to [`MIN_IMAGE_BYTES`] or the next
/// sector.
pub fn boot_image(
    elf: &[u8],
    cmdline: &str,
    size_bytes: Option<u64>,
) -> Result<Vec<u8>, BootDiskError> {
    if cmdline.len() > CMDLINE_MAX {
        return Err(BootDiskError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX,
        });
    }
    if let Some(at) = cmdline.bytes().position(|b| b == 0) {
        return Err(BootDiskError::CmdlineNul { at });
    }
    let payload = pvh_payload(elf)?;

    let mut image = BOOT_LOADER.to_vec();
    debug_assert_eq!(&image[param::MAGIC..param::MAGIC + 4], b"FBL1");
    image.extend_from_slice(cmdline.as_bytes());
    image.resize(payload_lba() * SECTOR, 0);
    image.extend_from_slice(payload.bytes);
    image.resize(image.len().next_multiple_of(SECTOR), 0);

    let need = image.len() as u64;
    let max = LOW_LOAD_LIMIT - BOOT_SECTOR_ADDR;
    if need > max {
        return Err(BootDiskError::TooLarge {
            bytes: need,
            max,
            limit: LOW_LOAD_LIMIT,
        });
    }
    let size = match size_bytes {
        Some(size) if size % SECTOR as u64 != 0 => {
            return Err(BootDiskError::UnalignedSize { size })
        }
        Some(size) if size < need => return Err(BootDiskError::TooSmall { size, need }),
        Some(size) => size,
        None => need.max(MIN_IMAGE_BYTES),
    };

    let sectors_after_0 = u32::try_from(need / SECTOR as u64 - 1).expect("below LOW_LOAD_LIMIT");
    let filesz = u32::try_from(payload.bytes.len()).expect("below LOW_LOAD_LIMIT");
    for (at, value) in [
        (param::SECTORS, sectors_after_0),
        (param::LOAD, payload.load),
        (param::FILESZ, filesz),
        (param::MEMSZ, payload.memsz),
        (param::ENTRY, payload.entry),
    ] {
        image[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }
    image.resize(
        usize::try_from(size).expect("a boot image fits in memory"),
        0,
    );
    Ok(image)
}

/// Writes a raw disk image at `path` that boots the dirtier
/// ([`crate::DIRTIER_ELF`]) with `cmdline` through a BIOS; `size_bytes` as
/// for [`boot_image`].
pub fn boot_disk(path: &Path, cmdline: &str, size_bytes: Option<u64>) -> Result<(), BootDiskError> {
    let image = boot_image(crate::DIRTIER_ELF, cmdline, size_bytes)?;
    std::fs::write(path, image).map_err(|source| BootDiskError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DIRTIER_ELF;

    fn u32_in(image: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(image[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn loader_is_a_boot_sector_with_its_parameter_block() {
        assert!(BOOT_LOADER.len() >= 2 * SECTOR, "sector 0 reads the rest");
        assert_eq!(BOOT_LOADER.len() % SECTOR, 0);
        assert_eq!(&BOOT_LOADER[510..512], &[0x55, 0xaa]);
        assert_eq!(&BOOT_LOADER[param::MAGIC..param::MAGIC + 4], b"FBL1");
        for at in [
            param::SECTORS,
            param::LOAD,
            param::FILESZ,
            param::MEMSZ,
            param::ENTRY,
        ] {
            assert_eq!(u32_in(BOOT_LOADER, at), 0, "unfilled parameter at {at:#x}");
        }
        // The loader and this builder agree on the layout.
        let addr = |lba: usize| BOOT_SECTOR_ADDR + (lba * SECTOR) as u64;
        let cmdline = u64::from(u32_in(BOOT_LOADER, param::CMDLINE_ADDR));
        let payload = u64::from(u32_in(BOOT_LOADER, param::PAYLOAD_ADDR));
        assert_eq!(cmdline, addr(cmdline_lba()));
        assert_eq!(payload, addr(payload_lba()));
    }

    #[test]
    fn dirtier_payload_is_its_load_segment_and_pvh_entry() {
        let payload = pvh_payload(DIRTIER_ELF).unwrap();
        assert_eq!(u64::from(payload.load), crate::HEADER_GPA);
        assert_eq!(
            u64::from(payload.entry),
            u64::from_le_bytes(DIRTIER_ELF[24..32].try_into().unwrap())
        );
        assert!(payload.bytes.len() <= payload.memsz as usize);
        assert!(u64::from(payload.load) + u64::from(payload.memsz) <= crate::USABLE_RAM_START);
    }

    #[test]
    fn image_layout() {
        let image = boot_image(DIRTIER_ELF, "ws=1M hb=100", None).unwrap();
        let payload = pvh_payload(DIRTIER_ELF).unwrap();
        assert_eq!(image.len() as u64, MIN_IMAGE_BYTES);
        assert_eq!(image[..param::MAGIC], BOOT_LOADER[..param::MAGIC]);
        assert_eq!(
            image[param::ENTRY + 4..BOOT_LOADER.len()],
            BOOT_LOADER[param::ENTRY + 4..]
        );
        let cmdline = &image[cmdline_lba() * SECTOR..payload_lba() * SECTOR];
        assert_eq!(&cmdline[..13], b"ws=1M hb=100\0");
        assert!(cmdline.iter().skip(13).all(|b| *b == 0));
        let start = payload_lba() * SECTOR;
        assert_eq!(&image[start..start + payload.bytes.len()], payload.bytes);
        let sectors = (start + payload.bytes.len()).div_ceil(SECTOR) - 1;
        assert_eq!(u32_in(&image, param::SECTORS) as usize, sectors);
        assert_eq!(u32_in(&image, param::LOAD), payload.load);
        assert_eq!(u32_in(&image, param::FILESZ) as usize, payload.bytes.len());
        assert_eq!(u32_in(&image, param::MEMSZ), payload.memsz);
        assert_eq!(u32_in(&image, param::ENTRY), payload.entry);
        assert!(image[(sectors + 1) * SECTOR..].iter().all(|b| *b == 0));
        // Everything the loader reads lands below the limit.
        assert!(BOOT_SECTOR_ADDR + ((sectors + 1) * SECTOR) as u64 <= LOW_LOAD_LIMIT);
    }

    #[test]
    fn sizes_and_command_lines_are_checked() {
        let longest = "x".repeat(CMDLINE_MAX);
        let image = boot_image(DIRTIER_ELF, &longest, Some(2 << 20)).unwrap();
        assert_eq!(image.len(), 2 << 20);
        assert_eq!(image[cmdline_lba() * SECTOR + CMDLINE_MAX], 0);
        let err = boot_image(DIRTIER_ELF, &format!("{longest}y"), None).unwrap_err();
        assert!(
            matches!(
                err,
                BootDiskError::CmdlineTooLong {
                    len: 4096,
                    max: 4095
                }
            ),
            "{err}"
        );
        let err = boot_image(DIRTIER_ELF, "ws=1M\0hb=1", None).unwrap_err();
        assert!(matches!(err, BootDiskError::CmdlineNul { at: 5 }), "{err}");
        let err = boot_image(DIRTIER_ELF, "", Some(1000)).unwrap_err();
        assert!(
            matches!(err, BootDiskError::UnalignedSize { size: 1000 }),
            "{err}"
        );
        let err = boot_image(DIRTIER_ELF, "", Some(4096)).unwrap_err();
        assert!(
            matches!(err, BootDiskError::TooSmall { size: 4096, .. }),
            "{err}"
        );
        // A small disk is fine when the image fits.
        let need = (payload_lba() * SECTOR + pvh_payload(DIRTIER_ELF).unwrap().bytes.len())
            .next_multiple_of(SECTOR) as u64;
        assert_eq!(
            boot_image(DIRTIER_ELF, "", Some(need)).unwrap().len() as u64,
            need
        );
    }

    #[test]
    fn non_pvh_payloads_are_refused() {
        assert!(matches!(
            pvh_payload(b"not an elf"),
            Err(BootDiskError::BadElf { .. })
        ));
        // The dirtier without its Xen note.
        let mut elf = DIRTIER_ELF.to_vec();
        let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
        let phnum = u16::from_le_bytes(elf[56..58].try_into().unwrap()) as usize;
        for k in 0..phnum {
            let ph = phoff + k * 56;
            if u32_in(&elf, ph) == 4 {
                elf[ph..ph + 4].copy_from_slice(&0u32.to_le_bytes());
            }
        }
        let err = pvh_payload(&elf).unwrap_err();
        assert!(err.to_string().contains("PHYS32_ENTRY"), "{err}");
    }
}
