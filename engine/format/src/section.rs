//! Section ids, section headers, limits and the End section.

use std::fmt;

use crate::error::{FormatError, Result};
use crate::ram;

/// Length of the fixed section header.
pub const SECTION_HEADER_LEN: usize = 24;

/// Section flag: the reader must understand this section or refuse the stream.
pub const SECTION_FLAG_CRITICAL: u16 = 1 << 0;

/// Section flag bits this build knows; any other bit set is refused.
pub const SECTION_KNOWN_FLAGS: u16 = SECTION_FLAG_CRITICAL;

/// Length of the End section payload.
pub const END_PAYLOAD_LEN: usize = 24;

/// What a section carries. Ids are stable on the wire; 0 is reserved as invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SectionId {
    /// 1: the VM's shape (memory layout, vCPU count, devices present); CBOR.
    Shape,
    /// 2: a batch of guest RAM pages; binary, see [`crate::RamBatch`].
    RamPages,
    /// 3: vCPU state; CBOR.
    Vcpus,
    /// 4: VM-wide state (irqchip, clock); CBOR.
    Vm,
    /// 5: device state; CBOR.
    Devices,
    /// 6: the last section; carries counts the reader checks.
    End,
    /// 7: a message on a migration's return path (destination to source); CBOR.
    Reply,
    /// 8: a digest of all guest RAM, compared by the destination before it
    /// resumes the VM; CBOR.
    Digest,
    /// 9: the first section of an extra page stream of a multi-stream migration:
    /// which migration it belongs to and which stream it is; CBOR.
    Join,
    /// 10: nothing, sent by a source that has nothing else to send for a while (a
    /// migration paused before its switch-over), so the destination can tell a live
    /// source from a dead one; empty, never critical: readers skip it.
    KeepAlive,
    /// 11: the switch to post-copy: the pages still to come, as one bitmap per
    /// RAM range; the vCPU and device state follow, then the rest of RAM while
    /// the destination already runs the VM; CBOR.
    Postcopy,
    /// Any id this build does not know (including the invalid id 0). Build
    /// ids with [`SectionId::from_u32`]; an `Unknown(n)` holding a known `n`
    /// is treated as that known id everywhere except by `==`.
    Unknown(u32),
}

impl SectionId {
    /// Every id this build knows, in id order.
    pub const KNOWN: [SectionId; 11] = [
        SectionId::Shape,
        SectionId::RamPages,
        SectionId::Vcpus,
        SectionId::Vm,
        SectionId::Devices,
        SectionId::End,
        SectionId::Reply,
        SectionId::Digest,
        SectionId::Join,
        SectionId::KeepAlive,
        SectionId::Postcopy,
    ];

    /// Maps a wire id to a `SectionId`.
    pub fn from_u32(id: u32) -> Self {
        match id {
            1 => SectionId::Shape,
            2 => SectionId::RamPages,
            3 => SectionId::Vcpus,
            4 => SectionId::Vm,
            5 => SectionId::Devices,
            6 => SectionId::End,
            7 => SectionId::Reply,
            8 => SectionId::Digest,
            9 => SectionId::Join,
            10 => SectionId::KeepAlive,
            11 => SectionId::Postcopy,
            other => SectionId::Unknown(other),
        }
    }

    /// The wire id.
    pub fn as_u32(self) -> u32 {
        match self {
            SectionId::Shape => 1,
            SectionId::RamPages => 2,
            SectionId::Vcpus => 3,
            SectionId::Vm => 4,
            SectionId::Devices => 5,
            SectionId::End => 6,
            SectionId::Reply => 7,
            SectionId::Digest => 8,
            SectionId::Join => 9,
            SectionId::KeepAlive => 10,
            SectionId::Postcopy => 11,
            SectionId::Unknown(id) => id,
        }
    }

    /// The name used in messages, `None` for unknown ids.
    pub fn name(self) -> Option<&'static str> {
        match SectionId::from_u32(self.as_u32()) {
            SectionId::Shape => Some("Shape"),
            SectionId::RamPages => Some("RamPages"),
            SectionId::Vcpus => Some("Vcpus"),
            SectionId::Vm => Some("Vm"),
            SectionId::Devices => Some("Devices"),
            SectionId::End => Some("End"),
            SectionId::Reply => Some("Reply"),
            SectionId::Digest => Some("Digest"),
            SectionId::Join => Some("Join"),
            SectionId::KeepAlive => Some("KeepAlive"),
            SectionId::Postcopy => Some("Postcopy"),
            SectionId::Unknown(_) => None,
        }
    }

    /// Whether this build knows the id.
    pub fn is_known(self) -> bool {
        self.name().is_some()
    }

    /// Whether the payload is CBOR (read with [`crate::decode_cbor`]).
    pub fn is_cbor(self) -> bool {
        matches!(
            SectionId::from_u32(self.as_u32()),
            SectionId::Shape
                | SectionId::Vcpus
                | SectionId::Vm
                | SectionId::Devices
                | SectionId::Reply
                | SectionId::Digest
                | SectionId::Join
                | SectionId::Postcopy
        )
    }

    /// Section versions this build reads; empty for unknown ids.
    ///
    /// Bumping a section's version means adding it here together with the
    /// upgrade function in the crate that owns the payload type.
    pub fn supported_versions(self) -> &'static [u16] {
        if self.is_known() {
            &[1]
        } else {
            &[]
        }
    }

    /// The version a writer uses by default: the newest supported one.
    pub fn current_version(self) -> u16 {
        self.supported_versions().last().copied().unwrap_or(1)
    }
}

impl fmt::Display for SectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} (id {})", self.as_u32()),
            None => write!(f, "unknown (id {})", self.as_u32()),
        }
    }
}

/// A decoded section header, as returned by [`crate::StreamReader::next_section`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionHeader {
    /// What the section carries.
    pub id: SectionId,
    /// Version of the payload layout.
    pub version: u16,
    /// Whether the producer marked the section critical.
    pub critical: bool,
    /// Payload length in bytes.
    pub length: u64,
    /// CRC-32 (IEEE) of the payload.
    pub crc32: u32,
}

impl SectionHeader {
    /// Whether this is the End section (the stream is complete).
    pub fn is_end(&self) -> bool {
        self.id == SectionId::End
    }

    pub(crate) fn encode(&self) -> [u8; SECTION_HEADER_LEN] {
        let flags = if self.critical {
            SECTION_FLAG_CRITICAL
        } else {
            0
        };
        let mut b = [0u8; SECTION_HEADER_LEN];
        b[0..4].copy_from_slice(&self.id.as_u32().to_le_bytes());
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.length.to_le_bytes());
        b[16..20].copy_from_slice(&self.crc32.to_le_bytes());
        // 20..24: reserved, zero.
        b
    }

    /// Decodes and validates the fixed fields (not the limits, not the version).
    pub(crate) fn decode(b: &[u8; SECTION_HEADER_LEN]) -> Result<Self> {
        let id = SectionId::from_u32(le_u32(&b[0..4]));
        let version = le_u16(&b[4..6]);
        let flags = le_u16(&b[6..8]);
        let length = le_u64(&b[8..16]);
        let crc32 = le_u32(&b[16..20]);
        let reserved = le_u32(&b[20..24]);
        let malformed = |reason: String| FormatError::MalformedSection {
            section: id,
            reason,
        };
        if id.as_u32() == 0 {
            return Err(malformed("section id 0 is reserved as invalid".into()));
        }
        if flags & !SECTION_KNOWN_FLAGS != 0 {
            return Err(malformed(format!(
                "unknown flag bits {:#06x} are set",
                flags & !SECTION_KNOWN_FLAGS
            )));
        }
        if reserved != 0 {
            return Err(malformed(format!(
                "the reserved header field is {reserved:#x}, expected 0"
            )));
        }
        Ok(SectionHeader {
            id,
            version,
            critical: flags & SECTION_FLAG_CRITICAL != 0,
            length,
            crc32,
        })
    }
}

/// Size limits applied to everything read from (and written to) a stream.
///
/// Every length is checked against these before anything is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload of any section, in bytes.
    pub max_section_len: u64,
    /// Largest payload of a CBOR section (Shape, Vcpus, Vm, Devices), in bytes.
    pub max_cbor_len: u64,
    /// Most pages one RAM batch may carry.
    pub max_batch_pages: u32,
}

impl Limits {
    /// Default largest section: 64 MiB.
    pub const DEFAULT_MAX_SECTION_LEN: u64 = 64 << 20;
    /// Default largest CBOR section: 16 MiB.
    pub const DEFAULT_MAX_CBOR_LEN: u64 = 16 << 20;
    /// Default most pages per RAM batch: 8192 (32 MiB of data).
    pub const DEFAULT_MAX_BATCH_PAGES: u32 = 8192;

    /// The largest payload accepted for `id` under these limits.
    pub fn max_payload_len(&self, id: SectionId) -> u64 {
        match SectionId::from_u32(id.as_u32()) {
            SectionId::RamPages => self.max_section_len.min(ram::payload_len(
                u64::from(self.max_batch_pages),
                u64::from(self.max_batch_pages),
            )),
            SectionId::End => END_PAYLOAD_LEN as u64,
            SectionId::KeepAlive => 0,
            id if id.is_cbor() => self.max_cbor_len.min(self.max_section_len),
            _ => self.max_section_len,
        }
    }

    pub(crate) fn check(&self, id: SectionId, length: u64) -> Result<()> {
        let limit = self.max_payload_len(id);
        if length > limit {
            return Err(FormatError::SectionTooLarge {
                section: id,
                length,
                limit,
            });
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_section_len: Self::DEFAULT_MAX_SECTION_LEN,
            max_cbor_len: Self::DEFAULT_MAX_CBOR_LEN,
            max_batch_pages: Self::DEFAULT_MAX_BATCH_PAGES,
        }
    }
}

/// The payload of the End section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EndSummary {
    /// Sections written before End (skipped optional ones included).
    pub sections: u64,
    /// RAM pages (zero and data) written in all RamPages sections.
    pub ram_pages: u64,
}

impl EndSummary {
    /// Encodes the End payload.
    pub fn encode(&self) -> [u8; END_PAYLOAD_LEN] {
        let mut b = [0u8; END_PAYLOAD_LEN];
        b[0..8].copy_from_slice(&self.sections.to_le_bytes());
        b[8..16].copy_from_slice(&self.ram_pages.to_le_bytes());
        // 16..24: flags, zero.
        b
    }

    /// Decodes and validates an End payload.
    pub fn decode(payload: &[u8]) -> Result<Self> {
        let malformed = |reason: String| FormatError::MalformedSection {
            section: SectionId::End,
            reason,
        };
        if payload.len() != END_PAYLOAD_LEN {
            return Err(malformed(format!(
                "the payload is {} bytes, expected {END_PAYLOAD_LEN}",
                payload.len()
            )));
        }
        let flags = le_u64(&payload[16..24]);
        if flags != 0 {
            return Err(malformed(format!("unknown flags {flags:#x} are set")));
        }
        Ok(EndSummary {
            sections: le_u64(&payload[0..8]),
            ram_pages: le_u64(&payload[8..16]),
        })
    }
}

pub(crate) fn le_u16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_le_bytes(a)
}

pub(crate) fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

pub(crate) fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for id in SectionId::KNOWN {
            assert_eq!(SectionId::from_u32(id.as_u32()), id);
            assert!(id.is_known());
            assert_eq!(id.supported_versions(), &[1]);
        }
        assert_eq!(SectionId::from_u32(0), SectionId::Unknown(0));
        assert_eq!(SectionId::from_u32(9), SectionId::Join);
        assert_eq!(SectionId::from_u32(10), SectionId::KeepAlive);
        assert_eq!(SectionId::from_u32(11), SectionId::Postcopy);
        assert_eq!(SectionId::from_u32(12), SectionId::Unknown(12));
        // An Unknown spelling of a known id behaves as the known id.
        assert!(SectionId::Unknown(2).is_known());
        assert_eq!(SectionId::Unknown(2).to_string(), "RamPages (id 2)");
        assert_eq!(SectionId::Unknown(99).to_string(), "unknown (id 99)");
    }

    #[test]
    fn header_round_trip() {
        let h = SectionHeader {
            id: SectionId::Vm,
            version: 3,
            critical: true,
            length: 0x1234_5678_9abc,
            crc32: 0xdead_beef,
        };
        assert_eq!(SectionHeader::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn header_rejects_id_zero_flags_reserved() {
        let good = SectionHeader {
            id: SectionId::Vm,
            version: 1,
            critical: false,
            length: 0,
            crc32: 0,
        }
        .encode();
        let mut b = good;
        b[0..4].copy_from_slice(&0u32.to_le_bytes());
        assert!(SectionHeader::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("id 0"));
        let mut b = good;
        b[6] = 0x02;
        assert!(SectionHeader::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("flag"));
        let mut b = good;
        b[23] = 1;
        assert!(SectionHeader::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("reserved"));
    }

    #[test]
    fn limits_per_kind() {
        let l = Limits::default();
        assert_eq!(l.max_payload_len(SectionId::Shape), 16 << 20);
        assert_eq!(l.max_payload_len(SectionId::End), 24);
        assert_eq!(l.max_payload_len(SectionId::Unknown(77)), 64 << 20);
        assert_eq!(
            l.max_payload_len(SectionId::RamPages),
            8 + 8 * 8192 + 4096 * 8192
        );
    }

    #[test]
    fn end_summary_rejects_flags_and_length() {
        let e = EndSummary {
            sections: 3,
            ram_pages: 7,
        };
        assert_eq!(EndSummary::decode(&e.encode()).unwrap(), e);
        let mut b = e.encode();
        b[16] = 1;
        assert!(EndSummary::decode(&b).is_err());
        assert!(EndSummary::decode(&b[..23]).is_err());
    }
}
