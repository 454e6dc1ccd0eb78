//! What QMP reports of a disk's images: the qcow2 header's fields QEMU 7.2
//! shows in `ImageInfo` (virtual size, cluster size, backing file and its
//! format, `format-specific`), read from the header itself: a query must
//! not open the whole chain the engine serves.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// `QFI\xfb`.
const MAGIC: u32 = 0x5146_49fb;
/// The header extension naming the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Bytes of the first cluster read for the header and its extensions.
const HEADER_READ: usize = 64 << 10;

/// The fields of a qcow2 header QMP reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    pub version: u32,
    pub cluster_size: u64,
    /// The guest-visible size.
    pub size: u64,
    /// The backing file as the header spells it (maybe relative).
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub dirty: bool,
    pub corrupt: bool,
    pub extended_l2: bool,
    pub lazy_refcounts: bool,
    pub refcount_bits: u64,
    /// 0 zlib, 1 zstd.
    pub compression_type: u8,
}

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_be_bytes(s.try_into().expect("4 bytes")))
}

fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_be_bytes(s.try_into().expect("8 bytes")))
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

impl Qcow2Header {
    /// Reads the header of the qcow2 image in `file`.
    pub fn read(file: &File) -> io::Result<Self> {
        let mut buf = vec![0u8; HEADER_READ];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], got as u64)? {
                0 => break,
                n => got += n,
            }
        }
        buf.truncate(got);
        if got < 72 || be32(&buf, 0) != MAGIC {
            return Err(bad("not a qcow2 image"));
        }
        let version = be32(&buf, 4);
        let cluster_bits = be32(&buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad("bad cluster size"));
        }
        let (incompatible, compatible, refcount_order, header_len) = if version >= 3 {
            (
                be64(&buf, 72),
                be64(&buf, 80),
                be32(&buf, 96),
                be32(&buf, 100) as usize,
            )
        } else {
            (0, 0, 4, 72)
        };
        let compression_type = if incompatible & (1 << 3) != 0 && header_len > 104 {
            buf.get(104).copied().unwrap_or(0)
        } else {
            0
        };
        let mut backing_format = None;
        let mut at = header_len;
        while at + 8 <= buf.len() {
            let (kind, len) = (be32(&buf, at), be32(&buf, at + 4) as usize);
            if kind == 0 {
                break;
            }
            let data = buf
                .get(at + 8..at + 8 + len)
                .ok_or_else(|| bad("bad extension"))?;
            if kind == EXT_BACKING_FORMAT {
                backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            at += 8 + len.div_ceil(8) * 8;
        }
        let (offset, len) = (be64(&buf, 8), be32(&buf, 16) as usize);
        let backing_file = if offset != 0 && len > 0 && len <= 1023 {
            let mut name = vec![0u8; len];
            file.read_exact_at(&mut name, offset)?;
            Some(String::from_utf8_lossy(&name).into_owned())
        } else {
            None
        };
        Ok(Self {
            version,
            cluster_size: 1 << cluster_bits,
            size: be64(&buf, 24),
            backing_file,
            backing_format,
            dirty: incompatible & 1 != 0,
            corrupt: incompatible & (1 << 1) != 0,
            extended_l2: incompatible & (1 << 4) != 0,
            lazy_refcounts: compatible & 1 != 0,
            refcount_bits: 1 << refcount_order.min(6),
            compression_type,
        })
    }

    /// QEMU's `format-specific` for this image (`ImageInfoSpecificQCow2`).
    pub fn format_specific(&self) -> serde_json::Value {
        let compression = if self.compression_type == 1 {
            "zstd"
        } else {
            "zlib"
        };
        let data = if self.version >= 3 {
            serde_json::json!({
                "compat": "1.1", "compression-type": compression,
                "lazy-refcounts": self.lazy_refcounts, "refcount-bits": self.refcount_bits,
                "corrupt": self.corrupt, "extended-l2": self.extended_l2,
            })
        } else {
            serde_json::json!({
                "compat": "0.10", "compression-type": compression,
                "refcount-bits": self.refcount_bits,
            })
        };
        serde_json::json!({"type": "qcow2", "data": data})
    }
}

/// Whether `file` starts as a qcow2 image does (QEMU's probe, for a backing
/// file whose header names no format).
pub fn is_qcow2(file: &File) -> bool {
    let mut magic = [0u8; 4];
    file.read_exact_at(&mut magic, 0).is_ok() && u32::from_be_bytes(magic) == MAGIC
}

/// `name` resolved as QEMU resolves a backing file name: relative to the
/// directory of the image that names it (`of`).
pub fn full_backing_filename(of: &str, name: &str) -> String {
    if name.starts_with('/') || name.contains(':') {
        return name.to_string();
    }
    match of.rfind('/') {
        Some(i) => format!("{}{name}", &of[..=i]),
        None => name.to_string(),
    }
}

/// A JSON value as QEMU writes a `json:` filename: keys sorted, `", "` and
/// `": "` between items.
pub fn qemu_json(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let items: Vec<String> = keys
                .iter()
                .map(|k| format!("{}: {}", Value::String((*k).clone()), qemu_json(&m[*k])))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(qemu_json).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}
