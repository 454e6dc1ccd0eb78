//! The RAM digest: what a receiver compares its RAM with before it resumes.

use ferry_kvm::{GuestRam, MemoryError};

/// A digest of guest RAM: CRC-32 of every 1 MiB chunk, in address order.
pub fn ram_digest(ram: &GuestRam) -> Result<Vec<u32>, MemoryError> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut out = Vec::new();
    for (base, size) in ram.ranges() {
        let mut gpa = base;
        while gpa < base + size {
            let n = CHUNK.min(base + size - gpa) as usize;
            ram.read(gpa, &mut buf[..n])?;
            out.push(crc32fast::hash(&buf[..n]));
            gpa += n as u64;
        }
    }
    Ok(out)
}
