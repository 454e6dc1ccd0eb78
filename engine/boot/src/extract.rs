//! Getting the ELF `vmlinux` out of a bzImage, as the kernel's
//! `scripts/extract-vmlinux` does.
//!
//! A bzImage is real-mode setup code, then the protected-mode part: a small
//! decompressor with the compressed kernel (`vmlinux.bin`, a stripped ELF,
//! possibly followed by relocation data) embedded in it. Since boot protocol
//! 2.08 the setup header says where that payload is (`payload_offset`,
//! `payload_length`, relative to the protected-mode part). Its last four bytes
//! are the uncompressed size: the gzip trailer's ISIZE, or the size the
//! kernel build appends after xz, zstd, lzma, bzip2 and lz4 data.

use std::io::Read;

use crate::BootError;

/// Refuse to produce more than this from one payload.
const MAX_VMLINUX_BYTES: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Xz,
    Zstd,
    Lzma,
    Bzip2,
    Lzo,
    Lz4,
}

impl Compression {
    fn detect(payload: &[u8]) -> Option<Compression> {
        const MAGICS: [(&[u8], Compression); 8] = [
            (b"\x7fELF", Compression::None),
            (&[0x1f, 0x8b], Compression::Gzip),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0], Compression::Xz),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
            (&[0x5d, 0, 0], Compression::Lzma),
            (b"BZh", Compression::Bzip2),
            (&[0x89, b'L', b'Z', b'O'], Compression::Lzo),
            (&[0x02, 0x21, 0x4c, 0x18], Compression::Lz4),
        ];
        MAGICS
            .iter()
            .find(|(magic, _)| payload.starts_with(magic))
            .map(|(_, kind)| *kind)
    }

    fn name(self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Lzma => "lzma",
            Compression::Bzip2 => "bzip2",
            Compression::Lzo => "lzo",
            Compression::Lz4 => "lz4",
        }
    }
}

fn extract_error(problem: impl Into<String>) -> BootError {
    BootError::Extract {
        problem: problem.into(),
    }
}

/// Decompresses the ELF `vmlinux` embedded in `bzimage`.
///
/// Handles gzip, xz (including the x86 BCJ filter the kernel build uses) and
/// zstd payloads, and uncompressed ones. The result is the kernel's
/// `vmlinux.bin`: a stripped ELF (with the Xen PVH note when the kernel was
/// built with `CONFIG_PVH=y`), possibly followed by relocation data, which
/// [`crate::load_kernel`] boots like any ELF.
///
/// # Errors
/// [`BootError::Extract`] if `bzimage` is not a bzImage of boot protocol 2.08
/// or later, the payload is compressed with another method (lzma, bzip2,
/// lzo, lz4), is corrupt, or does not decompress to an ELF of the size the
/// image records.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, BootError> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            bzimage.get(at..at + 4)?.try_into().ok()?,
        ))
    };
    if u32_at(0x202) != Some(0x5372_6448) {
        return Err(extract_error(
            "it is not a bzImage (no \"HdrS\" setup header at offset 0x202)",
        ));
    }
    let version = u32_at(0x206).unwrap_or_default() & 0xffff;
    if version < 0x0208 {
        return Err(extract_error(format!(
            "boot protocol {}.{:02} predates the payload fields (2.08); use the kernel's \
             scripts/extract-vmlinux",
            version >> 8,
            version & 0xff
        )));
    }
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    let payload_offset = u32_at(0x248).unwrap_or_default() as usize;
    let payload_length = u32_at(0x24c).unwrap_or_default() as usize;
    let start = setup_size.saturating_add(payload_offset);
    let end = start.saturating_add(payload_length);
    let payload: &[u8] = bzimage
        .get(start..end)
        .filter(|payload| payload.len() >= 4)
        .ok_or_else(|| {
            extract_error(format!(
                "its payload ({payload_length} bytes at offset {payload_offset:#x} past the \
                 {setup_size}-byte setup code) lies outside the {}-byte file; the image is \
                 truncated",
                bzimage.len()
            ))
        })?;

    let (body, size_field) = payload.split_at(payload.len() - 4);
    let expected =
        u32::from_le_bytes(size_field.try_into().map_err(|_| {
            extract_error("the payload is too short to hold its uncompressed size")
        })?);
    let compression = Compression::detect(payload).ok_or_else(|| {
        let first: Vec<String> = payload.iter().take(8).map(|b| format!("{b:02x}")).collect();
        extract_error(format!(
            "its payload has an unknown compression format (first bytes {})",
            first.join(" ")
        ))
    })?;

    let limit = u64::from(expected).clamp(1, MAX_VMLINUX_BYTES);
    let mut out = Vec::with_capacity(limit as usize);
    let result = match compression {
        Compression::None => {
            out.extend_from_slice(payload);
            Ok(())
        }
        // gzip carries its size in its own trailer: decode the whole member.
        Compression::Gzip => read_limited(flate2::read::GzDecoder::new(payload), limit, &mut out),
        // XzReader wants an owned ('static) source.
        Compression::Xz => read_limited(
            xz4rust::XzReader::new(std::io::Cursor::new(body.to_vec())),
            limit,
            &mut out,
        ),
        Compression::Zstd => match ruzstd::decoding::StreamingDecoder::new(body) {
            Ok(decoder) => read_limited(decoder, limit, &mut out),
            Err(e) => Err(DecompressError::ZstdHeader(e)),
        },
        other => {
            return Err(extract_error(format!(
                "its payload is {}-compressed, which ferry cannot decompress; use the \
                 kernel's scripts/extract-vmlinux",
                other.name()
            )))
        }
    };
    result.map_err(|e| {
        extract_error(format!(
            "its {} payload is corrupt: {e}",
            compression.name()
        ))
    })?;

    if !out.starts_with(b"\x7fELF") {
        return Err(extract_error(format!(
            "its {} payload did not decompress to an ELF file",
            compression.name()
        )));
    }
    if compression != Compression::None && out.len() as u64 != u64::from(expected) {
        return Err(extract_error(format!(
            "its {} payload decompressed to {} bytes, but the image records {expected}",
            compression.name(),
            out.len()
        )));
    }
    Ok(out)
}

/// Why a compressed payload did not decompress.
///
/// The decoder's error is part of the message, not a `#[source]`: it ends up
/// in [`BootError::Extract`]'s problem text, after "its ... payload is corrupt: ".
#[derive(Debug, thiserror::Error)]
enum DecompressError {
    /// The decoder failed while reading the payload.
    #[error("{0}")]
    Read(std::io::Error),
    /// The zstd decoder refused the frame header.
    #[error("{0}")]
    ZstdHeader(ruzstd::decoding::errors::FrameDecoderError),
    /// The payload decompresses to more than it should.
    #[error("it decompresses to more than {limit} bytes")]
    TooLarge {
        /// The most bytes allowed.
        limit: u64,
    },
}

/// Reads `reader` to its end into `out`, failing past `limit` bytes.
fn read_limited<R: Read>(reader: R, limit: u64, out: &mut Vec<u8>) -> Result<(), DecompressError> {
    reader
        .take(limit + 1)
        .read_to_end(out)
        .map_err(DecompressError::Read)?;
    if out.len() as u64 > limit {
        return Err(DecompressError::TooLarge { limit });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::testutil::{build_bzimage, build_elf, bzimage_header, pattern, pvh_note, Segment};

    fn vmlinux() -> Vec<u8> {
        build_elf(
            0x100_0000,
            &[Segment {
                paddr: 0x100_0000,
                data: pattern(200_000, 9),
                memsz: 200_000,
            }],
            &[pvh_note(0x100_0000)],
        )
    }

    /// A bzImage whose protected-mode part is 0x400 bytes of "decompressor"
    /// followed by `payload` (+ the appended size when `append_size`).
    fn bzimage_with_payload(payload: &[u8], size: u32, append_size: bool) -> Vec<u8> {
        let mut body = payload.to_vec();
        if append_size {
            body.extend_from_slice(&size.to_le_bytes());
        }
        let mut header = bzimage_header(4);
        header.payload_offset = 0x400;
        header.payload_length = body.len() as u32;
        let mut protected_mode = vec![0xcc; 0x400];
        protected_mode.extend_from_slice(&body);
        protected_mode.extend_from_slice(&[0u8; 100]); // trailing decompressor data
        build_bzimage(&header, &protected_mode)
    }

    #[test]
    fn gzip_payload_is_extracted() {
        let elf = vmlinux();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf).expect("gzip");
        let gz = gz.finish().expect("gzip");
        // gzip ends with ISIZE: no extra size is appended by the kernel build.
        let image = bzimage_with_payload(&gz, 0, false);
        assert_eq!(extract_vmlinux(&image).expect("extract"), elf);
    }

    #[test]
    fn xz_payload_is_extracted() {
        let elf = vmlinux();
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &elf[..], &mut xz).expect("xz");
        let image = bzimage_with_payload(&xz, elf.len() as u32, true);
        assert_eq!(extract_vmlinux(&image).expect("extract"), elf);
    }

    #[test]
    fn zstd_payload_is_extracted() {
        let elf = vmlinux();
        let zst = ruzstd::encoding::compress_to_vec(
            &elf[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let image = bzimage_with_payload(&zst, elf.len() as u32, true);
        assert_eq!(extract_vmlinux(&image).expect("extract"), elf);
    }

    #[test]
    fn uncompressed_payload_is_returned_as_is() {
        let elf = vmlinux();
        let image = bzimage_with_payload(&elf, 0, false);
        assert_eq!(extract_vmlinux(&image).expect("extract"), elf);
    }

    #[test]
    fn size_mismatch_is_reported() {
        let elf = vmlinux();
        let zst = ruzstd::encoding::compress_to_vec(
            &elf[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let image = bzimage_with_payload(&zst, elf.len() as u32 + 1, true);
        let text = extract_vmlinux(&image).expect_err("mismatch").to_string();
        assert!(text.contains("but the image records"), "{text}");
    }

    #[test]
    fn unsupported_and_corrupt_payloads_are_reported() {
        let image = bzimage_with_payload(b"BZh91AY&SY....", 1000, true);
        let text = extract_vmlinux(&image).expect_err("bzip2").to_string();
        assert!(text.contains("bzip2-compressed"), "{text}");
        assert!(text.contains("scripts/extract-vmlinux"), "{text}");

        let image = bzimage_with_payload(&[0x1f, 0x8b, 8, 0, 1, 2, 3, 4, 5, 6, 7], 0, false);
        let text = extract_vmlinux(&image).expect_err("corrupt").to_string();
        assert!(text.contains("gzip payload is corrupt"), "{text}");

        let image = bzimage_with_payload(b"what is this?", 0, false);
        let text = extract_vmlinux(&image).expect_err("unknown").to_string();
        assert!(text.contains("unknown compression format"), "{text}");
    }

    #[test]
    fn non_bzimage_and_truncated_bzimage_are_reported() {
        let text = extract_vmlinux(&[0u8; 1024])
            .expect_err("no HdrS")
            .to_string();
        assert!(text.contains("not a bzImage"), "{text}");
        let image = bzimage_with_payload(&vmlinux(), 0, false);
        let text = extract_vmlinux(&image[..4096])
            .expect_err("truncated")
            .to_string();
        assert!(text.contains("truncated"), "{text}");
    }
}
