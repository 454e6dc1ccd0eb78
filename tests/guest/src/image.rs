//! Guest memory images the oracle can read.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Read access to guest-physical memory.
pub trait PhysMem {
    /// Fill `buf` from guest-physical address `gpa`; every byte must exist.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> io::Result<()>;
}

fn outside(gpa: u64, len: usize, base: u64, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!(
            "GPA range {gpa:#x}..{:#x} is outside the image (GPA {base:#x}..{:#x})",
            gpa.saturating_add(len as u64),
            base.saturating_add(size)
        ),
    )
}

fn bounds(gpa: u64, len: usize, base: u64, size: u64) -> io::Result<u64> {
    let offset = gpa
        .checked_sub(base)
        .ok_or_else(|| outside(gpa, len, base, size))?;
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(offset),
        _ => Err(outside(gpa, len, base, size)),
    }
}

/// A raw memory image file: file offset `x` holds GPA `base + x` (QEMU's
/// `pmemsave BASE SIZE file`, or a dump of the VMM's guest memory).
#[derive(Debug)]
pub struct FileImage {
    file: File,
    base: u64,
    size: u64,
}

impl FileImage {
    /// Open an image whose first byte is GPA `base`.
    pub fn open(path: impl AsRef<Path>, base: u64) -> io::Result<Self> {
        Self::from_file(File::open(path)?, base)
    }

    /// Wrap an open image file whose first byte is GPA `base`.
    pub fn from_file(file: File, base: u64) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(Self { file, base, size })
    }
}

impl PhysMem for FileImage {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> io::Result<()> {
        let offset = bounds(gpa, buf.len(), self.base, self.size)?;
        self.file.read_exact_at(buf, offset)
    }
}

/// An in-memory image whose first byte is GPA `base`.
#[derive(Debug, Clone, Copy)]
pub struct SliceImage<'a> {
    pub data: &'a [u8],
    pub base: u64,
}

impl PhysMem for SliceImage<'_> {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> io::Result<()> {
        let offset = bounds(gpa, buf.len(), self.base, self.data.len() as u64)? as usize;
        buf.copy_from_slice(&self.data[offset..offset + buf.len()]);
        Ok(())
    }
}

/// A byte slice is an image starting at GPA 0.
impl PhysMem for [u8] {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> io::Result<()> {
        SliceImage {
            data: self,
            base: 0,
        }
        .read_phys(gpa, buf)
    }
}

impl PhysMem for Vec<u8> {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> io::Result<()> {
        self.as_slice().read_phys(gpa, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn file_image_honours_base_and_bounds() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[1, 2, 3, 4]).unwrap();
        let image = FileImage::from_file(file, 0x1000).unwrap();
        let mut buf = [0u8; 2];
        image.read_phys(0x1001, &mut buf).unwrap();
        assert_eq!(buf, [2, 3]);
        assert!(image.read_phys(0x0fff, &mut buf).is_err());
        assert!(image.read_phys(0x1003, &mut buf).is_err());
    }
}
