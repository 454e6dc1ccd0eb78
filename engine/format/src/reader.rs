//! Reading a stream from an untrusted source.

use std::io::{self, Read};

use crate::error::{FormatError, Result};
use crate::preamble::{check_magic, decode_fixed, decode_producer, Preamble, PREAMBLE_LEN};
use crate::ram::RamBatch;
use crate::section::{EndSummary, Limits, SectionHeader, SectionId, SECTION_HEADER_LEN};

/// Chunk size used to checksum skipped sections without buffering them whole.
const SKIP_CHUNK: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Ended,
    Failed,
}

/// Reads a ferry stream section by section, validating everything.
///
/// Each [`next_section`](Self::next_section) returns a section whose header
/// is well formed, whose length is within [`Limits`], whose version is
/// supported and whose checksum matches; RamPages payloads are also checked
/// to parse as a [`RamBatch`]. Unknown optional sections are skipped. The
/// stream is complete once the End section is returned; any error leaves the
/// reader unusable. The reader does many small reads: wrap a socket or file in
/// a `BufReader`.
pub struct StreamReader<R: Read> {
    inner: R,
    limits: Limits,
    bytes: u64,
    sections: u64,
    skipped: u64,
    ram_pages: u64,
    end: Option<EndSummary>,
    state: State,
}

impl<R: Read> std::fmt::Debug for StreamReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("limits", &self.limits)
            .field("bytes", &self.bytes)
            .field("sections", &self.sections)
            .field("skipped", &self.skipped)
            .field("ram_pages", &self.ram_pages)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl<R: Read> StreamReader<R> {
    /// Reads and validates the preamble.
    pub fn new(inner: R, limits: Limits) -> Result<(Self, Preamble)> {
        let mut r = StreamReader {
            inner,
            limits,
            bytes: 0,
            sections: 0,
            skipped: 0,
            ram_pages: 0,
            end: None,
            state: State::Open,
        };
        let preamble = r.read_preamble()?;
        Ok((r, preamble))
    }

    fn read_preamble(&mut self) -> Result<Preamble> {
        let truncated = |offset| FormatError::Truncated {
            offset,
            inside: "inside the preamble".into(),
        };
        let mut fixed = [0u8; PREAMBLE_LEN];
        // The magic first, so a short foreign file reads as foreign, not truncated.
        let n = self.fill(&mut fixed[..8])?;
        check_magic(&fixed[..n])?;
        if n < 8 || self.fill(&mut fixed[8..])? < PREAMBLE_LEN - 8 {
            return Err(truncated(self.bytes));
        }
        let (flags, producer_len) = decode_fixed(&fixed)?;
        let mut producer = vec![0u8; producer_len];
        if self.fill(&mut producer)? < producer_len {
            return Err(truncated(self.bytes));
        }
        Ok(Preamble {
            format_version: u32::from_le_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]),
            flags,
            producer: decode_producer(&producer)?,
        })
    }

    /// Reads the next section the caller must handle; its payload replaces the
    /// contents of `buf` (whose allocation is reused).
    ///
    /// Returns the End header (with its payload in `buf`) once the stream is
    /// complete; calling again after that is [`FormatError::ReadAfterEnd`].
    pub fn next_section(&mut self, buf: &mut Vec<u8>) -> Result<SectionHeader> {
        match self.state {
            State::Open => {}
            State::Ended => return Err(FormatError::ReadAfterEnd),
            State::Failed => return Err(FormatError::ReadAfterError),
        }
        let result = self.next_section_inner(buf);
        match &result {
            Ok(h) if h.is_end() => self.state = State::Ended,
            Ok(_) => {}
            Err(_) => self.state = State::Failed,
        }
        result
    }

    fn next_section_inner(&mut self, buf: &mut Vec<u8>) -> Result<SectionHeader> {
        let header = self.next_known_header(buf)?;
        self.read_payload(&header, buf)?;
        self.account(&header, buf)?;
        Ok(header)
    }

    /// Reads headers, skipping unknown optional sections and keep-alives, up to
    /// the header of the next section the caller must handle (checked against
    /// the supported versions and the limits; its payload not read yet).
    fn next_known_header(&mut self, buf: &mut Vec<u8>) -> Result<SectionHeader> {
        loop {
            let header = self.read_header()?;
            // A keep-alive carries nothing: skipped like an unknown section, so
            // a reader never sees one (and an older reader skips it too).
            if !header.id.is_known() || header.id == SectionId::KeepAlive {
                self.limits.check(header.id, header.length)?;
                if header.critical {
                    return Err(FormatError::UnknownCriticalSection {
                        id: header.id.as_u32(),
                        version: header.version,
                    });
                }
                self.skip_payload(&header, buf)?;
                self.sections += 1;
                self.skipped += 1;
                continue;
            }
            let supported = header.id.supported_versions();
            if !supported.contains(&header.version) {
                return Err(FormatError::UnsupportedSectionVersion {
                    section: header.id,
                    version: header.version,
                    supported,
                });
            }
            self.limits.check(header.id, header.length)?;
            return Ok(header);
        }
    }

    /// Counts a section whose payload (in `buf`) was read and checksummed, and
    /// checks End against the counts.
    fn account(&mut self, header: &SectionHeader, buf: &[u8]) -> Result<()> {
        match header.id {
            SectionId::RamPages => {
                let batch = RamBatch::parse_with_limits(buf, &self.limits)?;
                self.ram_pages += batch.len() as u64;
                self.sections += 1;
            }
            SectionId::End => {
                let end = EndSummary::decode(buf)?;
                check_count("sections", end.sections, self.sections)?;
                check_count("RAM pages", end.ram_pages, self.ram_pages)?;
                self.end = Some(end);
            }
            _ => self.sections += 1,
        }
        Ok(())
    }

    fn read_header(&mut self) -> Result<SectionHeader> {
        let mut raw = [0u8; SECTION_HEADER_LEN];
        let n = self.fill(&mut raw)?;
        if n < SECTION_HEADER_LEN {
            let inside = if n == 0 {
                "between sections, before the End section".to_owned()
            } else {
                format!("inside the header of section #{}", self.sections + 1)
            };
            return Err(FormatError::Truncated {
                offset: self.bytes,
                inside,
            });
        }
        SectionHeader::decode(&raw)
    }

    /// Reads a payload whose length was checked against the limits.
    fn read_payload(&mut self, header: &SectionHeader, buf: &mut Vec<u8>) -> Result<()> {
        buf.clear();
        let len = usize::try_from(header.length).map_err(|_| FormatError::SectionTooLarge {
            section: header.id,
            length: header.length,
            limit: usize::MAX as u64,
        })?;
        buf.reserve(len);
        let read = (&mut self.inner).take(header.length).read_to_end(buf);
        self.bytes += buf.len() as u64;
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e.into()),
        }
        if buf.len() < len {
            return Err(truncated_in(self.bytes, header.id));
        }
        let actual = crc32fast::hash(buf);
        check_crc(header, actual)
    }

    /// Consumes and checksums a payload without keeping it.
    fn skip_payload(&mut self, header: &SectionHeader, scratch: &mut Vec<u8>) -> Result<()> {
        let chunk = usize::try_from(header.length)
            .unwrap_or(usize::MAX)
            .min(SKIP_CHUNK);
        scratch.clear();
        scratch.resize(chunk, 0);
        let mut hasher = crc32fast::Hasher::new();
        let mut left = header.length;
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(chunk);
            let n = self.fill(&mut scratch[..want])?;
            hasher.update(&scratch[..n]);
            if n < want {
                return Err(truncated_in(self.bytes, header.id));
            }
            left -= n as u64;
        }
        check_crc(header, hasher.finalize())
    }

    /// Reads until `buf` is full or the input ends; returns the bytes read.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => break,
                Ok(n) => {
                    // A misbehaving reader may claim more than it was given.
                    let n = n.min(buf.len() - done);
                    done += n;
                    self.bytes += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(done)
    }

    /// Bytes consumed so far, preamble included.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// Sections read before End, skipped ones included.
    pub fn sections_read(&self) -> u64 {
        self.sections
    }

    /// Unknown optional sections skipped.
    pub fn sections_skipped(&self) -> u64 {
        self.skipped
    }

    /// RAM pages (zero and data) in the RamPages sections read so far.
    pub fn ram_pages_read(&self) -> u64 {
        self.ram_pages
    }

    /// The End section's contents, once it was read.
    pub fn end_summary(&self) -> Option<EndSummary> {
        self.end
    }

    /// Whether the End section was read (the stream is complete).
    pub fn is_finished(&self) -> bool {
        self.state == State::Ended
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The inner reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The inner reader (e.g. to carry on with another protocol after End).
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Where the pages of a RamPages section go as
/// [`StreamReader::next_section_into`] reads them.
pub trait PageSink {
    /// The caller's error; a format error converts into it.
    type Error: From<FormatError>;
    /// Checks a batch before any of its page data is read: `gpas` are its
    /// pages' guest-physical addresses (page-aligned), in entry order.
    fn check(&mut self, gpas: &[u64]) -> std::result::Result<(), Self::Error>;
    /// Takes one page of the batch: its 4096 bytes, or `None` for a zero page.
    fn page(&mut self, gpa: u64, data: Option<&[u8]>) -> std::result::Result<(), Self::Error>;
}

impl<R: io::BufRead> StreamReader<R> {
    /// [`next_section`](Self::next_section), except that the pages of a
    /// RamPages section go to `sink` as they are read, straight from the
    /// input's buffer, instead of into `buf` (which then holds the batch header
    /// and entries only): no copy of the batch is made, and each page is still
    /// in the cache when it is checksummed.
    ///
    /// The batch header and entries are validated (and shown to
    /// [`PageSink::check`]) before any page is handed out, but the checksum
    /// covers the whole section and is known only after its last page: a
    /// RamPages section that fails it, or ends early, has already handed pages
    /// to `sink`. Use this where pages go into memory that nothing runs from yet
    /// (a VM being received) and that the caller discards on any error.
    pub fn next_section_into<S: PageSink>(
        &mut self,
        buf: &mut Vec<u8>,
        sink: &mut S,
    ) -> std::result::Result<SectionHeader, S::Error> {
        match self.state {
            State::Open => {}
            State::Ended => return Err(FormatError::ReadAfterEnd.into()),
            State::Failed => return Err(FormatError::ReadAfterError.into()),
        }
        let result = (|| {
            let header = self.next_known_header(buf)?;
            if header.id == SectionId::RamPages {
                self.read_pages(&header, buf, sink)?;
            } else {
                self.read_payload(&header, buf)?;
                self.account(&header, buf)?;
            }
            Ok(header)
        })();
        match &result {
            Ok(h) if h.is_end() => self.state = State::Ended,
            Ok(_) => {}
            Err(_) => self.state = State::Failed,
        }
        result
    }

    /// Reads a RamPages payload into `sink`: header and entries into `buf`,
    /// validated; then each page.
    fn read_pages<S: PageSink>(
        &mut self,
        header: &SectionHeader,
        buf: &mut Vec<u8>,
        sink: &mut S,
    ) -> std::result::Result<(), S::Error> {
        let mut hasher = crc32fast::Hasher::new();
        let head_len = crate::ram::RAM_BATCH_HEADER_LEN;
        let mut head = [0u8; crate::ram::RAM_BATCH_HEADER_LEN];
        let have = usize::try_from(header.length).unwrap_or(usize::MAX);
        if have < head_len {
            // Too short for the batch header: parsing the payload says so.
            self.read_payload(header, buf)?;
            return Err(RamBatch::parse_with_limits(buf, &self.limits)
                .err()
                .unwrap_or_else(|| truncated_in(self.bytes, header.id))
                .into());
        }
        if self.fill(&mut head)? < head_len {
            return Err(truncated_in(self.bytes, header.id).into());
        }
        let count = crate::ram::check_batch_head(&head, &self.limits)?;
        let entries_len = count as usize * 8;
        buf.clear();
        buf.extend_from_slice(&head);
        buf.resize(head_len + entries_len, 0);
        if self.fill(&mut buf[head_len..])? < entries_len {
            return Err(truncated_in(self.bytes, header.id).into());
        }
        hasher.update(buf);
        let scan = crate::ram::scan_entries(&buf[head_len..])?;
        let expected = crate::ram::payload_len(u64::from(count), scan.data_pages);
        if header.length != expected {
            return Err(FormatError::MalformedRamBatch {
                reason: format!(
                    "the payload is {} bytes, but {count} entries with {} data pages need \
                     exactly {expected}",
                    header.length, scan.data_pages
                ),
            }
            .into());
        }
        let gpas: Vec<u64> = crate::ram::entries(&buf[head_len..])
            .map(|(gpa, _)| gpa)
            .collect();
        sink.check(&gpas)?;
        let mut scratch = [0u8; crate::ram::PAGE_SIZE];
        for (gpa, zero) in crate::ram::entries(&buf[head_len..]) {
            if zero {
                sink.page(gpa, None)?;
                continue;
            }
            let avail = match self.inner.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => &[],
                Err(e) => return Err(FormatError::from(e).into()),
            };
            if avail.len() >= crate::ram::PAGE_SIZE {
                let page = &avail[..crate::ram::PAGE_SIZE];
                hasher.update(page);
                sink.page(gpa, Some(page))?;
                self.inner.consume(crate::ram::PAGE_SIZE);
                self.bytes += crate::ram::PAGE_SIZE as u64;
            } else {
                // The page straddles the end of the input's buffer.
                if self.fill(&mut scratch)? < crate::ram::PAGE_SIZE {
                    return Err(truncated_in(self.bytes, header.id).into());
                }
                hasher.update(&scratch);
                sink.page(gpa, Some(&scratch))?;
            }
        }
        check_crc(header, hasher.finalize())?;
        self.ram_pages += u64::from(count);
        self.sections += 1;
        Ok(())
    }
}

fn truncated_in(offset: u64, id: SectionId) -> FormatError {
    FormatError::Truncated {
        offset,
        inside: format!("inside section {id}"),
    }
}

fn check_crc(header: &SectionHeader, actual: u32) -> Result<()> {
    if actual != header.crc32 {
        return Err(FormatError::ChecksumMismatch {
            section: header.id,
            expected: header.crc32,
            actual,
        });
    }
    Ok(())
}

fn check_count(what: &'static str, declared: u64, counted: u64) -> Result<()> {
    if declared != counted {
        return Err(FormatError::EndMismatch {
            what,
            declared,
            counted,
        });
    }
    Ok(())
}
