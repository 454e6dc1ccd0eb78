//! Writing a stream.

use std::io::{self, IoSlice, Write};

use serde::Serialize;

use crate::cbor::encode_cbor;
use crate::error::{FormatError, Result};
use crate::preamble::{check_producer, encode_fixed};
use crate::ram::{RamBatch, RamBatchBuilder};
use crate::section::{EndSummary, Limits, SectionHeader, SectionId};

/// Writes a ferry stream: the preamble on creation, then sections, then End
/// on [`finish`](Self::finish).
///
/// The writer refuses to produce anything a reader with the same [`Limits`]
/// would refuse. It does no buffering of its own: wrap a socket or file in a
/// `BufWriter` (RAM batches are written with one vectored write and gain
/// nothing from it). After an I/O error the stream is incomplete and must be
/// abandoned.
pub struct StreamWriter<W: Write> {
    inner: W,
    limits: Limits,
    sections: u64,
    ram_pages: u64,
    bytes: u64,
}

impl<W: Write> std::fmt::Debug for StreamWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("limits", &self.limits)
            .field("sections", &self.sections)
            .field("ram_pages", &self.ram_pages)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl<W: Write> StreamWriter<W> {
    /// Writes the preamble, naming `producer` (e.g. "ferry 0.1.0"), with
    /// the default [`Limits`].
    pub fn new(inner: W, producer: &str) -> Result<Self> {
        Self::with_limits(inner, producer, Limits::default())
    }

    /// Like [`new`](Self::new), checking sections against `limits`.
    pub fn with_limits(inner: W, producer: &str, limits: Limits) -> Result<Self> {
        check_producer(producer).map_err(|e| FormatError::InvalidWrite {
            reason: e.to_string(),
        })?;
        let len = u16::try_from(producer.len()).expect("check_producer bounds the length");
        let mut w = StreamWriter {
            inner,
            limits,
            sections: 0,
            ram_pages: 0,
            bytes: 0,
        };
        w.write_parts(&[&encode_fixed(len), producer.as_bytes()])?;
        Ok(w)
    }

    /// Writes one section with `payload` as-is.
    ///
    /// A RamPages payload is validated as a batch; End is refused (it is
    /// written by [`finish`](Self::finish)).
    pub fn write_section(
        &mut self,
        id: SectionId,
        version: u16,
        critical: bool,
        payload: &[u8],
    ) -> Result<()> {
        let id = self.check_section(id, version, payload.len() as u64)?;
        let mut pages = 0;
        if id == SectionId::RamPages {
            pages = RamBatch::parse_with_limits(payload, &self.limits)?.len() as u64;
        }
        let header = SectionHeader {
            id,
            version,
            critical,
            length: payload.len() as u64,
            crc32: crc32fast::hash(payload),
        };
        self.write_parts(&[&header.encode(), payload])?;
        self.sections += 1;
        self.ram_pages += pages;
        Ok(())
    }

    /// Writes a KeepAlive section: nothing, so the reader knows the writer is
    /// alive while it has nothing else to send. Readers skip it.
    pub fn write_keepalive(&mut self) -> Result<()> {
        let id = SectionId::KeepAlive;
        self.write_section(id, id.current_version(), false, &[])
    }

    /// Encodes `value` as CBOR and writes it as a critical section.
    pub fn write_cbor<T: Serialize + ?Sized>(
        &mut self,
        id: SectionId,
        version: u16,
        value: &T,
    ) -> Result<()> {
        let id = SectionId::from_u32(id.as_u32());
        let payload = encode_cbor(id, value, &self.limits)?;
        self.write_section(id, version, true, &payload)
    }

    /// Writes `batch` as a critical RamPages section (current version),
    /// straight from the builder's buffers. Clearing the builder is the
    /// caller's choice.
    pub fn write_ram_batch(&mut self, batch: &RamBatchBuilder) -> Result<()> {
        let id = SectionId::RamPages;
        if batch.is_empty() {
            return Err(FormatError::InvalidWrite {
                reason: "the RAM batch holds no pages".into(),
            });
        }
        if batch.len() > self.limits.max_batch_pages as usize {
            return Err(FormatError::InvalidWrite {
                reason: format!(
                    "the RAM batch holds {} pages, over the limit of {}",
                    batch.len(),
                    self.limits.max_batch_pages
                ),
            });
        }
        let length = batch.payload_len();
        let version = id.current_version();
        self.check_section(id, version, length)?;
        let pages = batch.len() as u64;
        let (head, entries, data) = batch.parts();
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&head);
        hasher.update(entries);
        hasher.update(data);
        let header = SectionHeader {
            id,
            version,
            critical: true,
            length,
            crc32: hasher.finalize(),
        };
        self.write_parts(&[&header.encode(), &head, entries, data])?;
        self.sections += 1;
        self.ram_pages += pages;
        Ok(())
    }

    /// Writes the End section, flushes, and returns the inner writer.
    pub fn finish(mut self) -> Result<W> {
        let payload = EndSummary {
            sections: self.sections,
            ram_pages: self.ram_pages,
        }
        .encode();
        let header = SectionHeader {
            id: SectionId::End,
            version: SectionId::End.current_version(),
            critical: true,
            length: payload.len() as u64,
            crc32: crc32fast::hash(&payload),
        };
        self.write_parts(&[&header.encode(), &payload])?;
        self.inner.flush()?;
        Ok(self.inner)
    }

    /// Sections written so far (End not included).
    pub fn sections_written(&self) -> u64 {
        self.sections
    }

    /// Bytes written so far, preamble included.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// RAM pages (zero and data) written so far.
    pub fn ram_pages_written(&self) -> u64 {
        self.ram_pages
    }

    /// The limits sections are checked against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The inner writer (to flush it, or to inspect it).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// The inner writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Normalises the id and checks everything but the payload contents.
    fn check_section(&self, id: SectionId, version: u16, length: u64) -> Result<SectionId> {
        let id = SectionId::from_u32(id.as_u32());
        let invalid = |reason: String| FormatError::InvalidWrite { reason };
        match id {
            SectionId::Unknown(0) => return Err(invalid("section id 0 is reserved".into())),
            SectionId::End => return Err(invalid("the End section is written by finish()".into())),
            _ => {}
        }
        if id.is_known() && !id.supported_versions().contains(&version) {
            return Err(FormatError::UnsupportedSectionVersion {
                section: id,
                version,
                supported: id.supported_versions(),
            });
        }
        self.limits.check(id, length)?;
        Ok(id)
    }

    /// Writes all parts, with vectored writes, counting bytes.
    fn write_parts(&mut self, parts: &[&[u8]]) -> Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut slices = &mut slices[..];
        // Drop leading empty slices so `advance_slices` and the zero-write
        // check see real data only.
        IoSlice::advance_slices(&mut slices, 0);
        while !slices.is_empty() {
            match self.inner.write_vectored(slices) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the stream accepted no more bytes",
                    )
                    .into())
                }
                Ok(n) => IoSlice::advance_slices(&mut slices, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.bytes += total as u64;
        Ok(())
    }
}
