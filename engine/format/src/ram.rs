//! RamPages sections: guest RAM in batches, never through serde.

use std::fmt;

use crate::error::{FormatError, Result};
use crate::section::{le_u32, le_u64, Limits};

/// Size of a guest page as carried by the format.
pub const PAGE_SIZE: usize = 4096;

/// Entry flag: the page is all zeroes and carries no data.
pub const RAM_ENTRY_ZERO: u64 = 1 << 0;

/// Low bits of an entry that hold flags (the rest is the page-aligned GPA).
pub const RAM_ENTRY_FLAG_MASK: u64 = PAGE_SIZE as u64 - 1;

/// Length of the batch header (`count u32`, `reserved u32`).
pub const RAM_BATCH_HEADER_LEN: usize = 8;

const ENTRY_LEN: usize = 8;

/// Payload length of a batch of `count` entries of which `data_pages` carry data.
pub(crate) fn payload_len(count: u64, data_pages: u64) -> u64 {
    RAM_BATCH_HEADER_LEN as u64 + ENTRY_LEN as u64 * count + PAGE_SIZE as u64 * data_pages
}

/// Checks a batch header (`count`, `reserved`); returns the page count.
pub(crate) fn check_batch_head(head: &[u8; RAM_BATCH_HEADER_LEN], limits: &Limits) -> Result<u32> {
    let count = le_u32(&head[0..4]);
    let reserved = le_u32(&head[4..8]);
    if reserved != 0 {
        return Err(malformed(format!(
            "the reserved header field is {reserved:#x}, expected 0"
        )));
    }
    if count == 0 {
        return Err(malformed("the batch holds no pages"));
    }
    if count > limits.max_batch_pages {
        return Err(malformed(format!(
            "the batch holds {count} pages, over the limit of {}",
            limits.max_batch_pages
        )));
    }
    Ok(count)
}

/// What [`scan_entries`] found in a batch's entries.
pub(crate) struct EntryScan {
    pub data_pages: u64,
    pub max_gpa_end: u64,
}

/// Validates a batch's entries (known flags, pages inside the address space).
pub(crate) fn scan_entries(entries: &[u8]) -> Result<EntryScan> {
    let mut data_pages: u64 = 0;
    let mut max_gpa_end: u64 = 0;
    for (i, raw) in entries.chunks_exact(ENTRY_LEN).enumerate() {
        let entry = le_u64(raw);
        let flags = entry & RAM_ENTRY_FLAG_MASK;
        let gpa = entry & !RAM_ENTRY_FLAG_MASK;
        if flags & !RAM_ENTRY_ZERO != 0 {
            return Err(malformed(format!(
                "entry {i} (GPA {gpa:#x}) has unknown flag bits {:#x}",
                flags & !RAM_ENTRY_ZERO
            )));
        }
        let end = gpa.checked_add(PAGE_SIZE as u64).ok_or_else(|| {
            malformed(format!(
                "entry {i}: the page at GPA {gpa:#x} extends past the 64-bit address space"
            ))
        })?;
        max_gpa_end = max_gpa_end.max(end);
        if flags & RAM_ENTRY_ZERO == 0 {
            data_pages += 1;
        }
    }
    Ok(EntryScan {
        data_pages,
        max_gpa_end,
    })
}

/// The (GPA, is-zero) of each entry of validated `entries`.
pub(crate) fn entries(entries: &[u8]) -> impl Iterator<Item = (u64, bool)> + '_ {
    entries.chunks_exact(ENTRY_LEN).map(|raw| {
        let entry = le_u64(raw);
        (entry & !RAM_ENTRY_FLAG_MASK, entry & RAM_ENTRY_ZERO != 0)
    })
}

fn malformed(reason: impl Into<String>) -> FormatError {
    FormatError::MalformedRamBatch {
        reason: reason.into(),
    }
}

fn invalid_write(reason: impl Into<String>) -> FormatError {
    FormatError::InvalidWrite {
        reason: reason.into(),
    }
}

/// Collects pages for one RamPages section.
///
/// Entries and page data live in two contiguous buffers that are written
/// as-is (vectored) by [`crate::StreamWriter::write_ram_batch`]; no copy of
/// the batch is ever assembled. [`clear`](Self::clear) keeps the buffers, so a
/// builder reused across batches allocates only once.
pub struct RamBatchBuilder {
    entries: Vec<u8>,
    /// Page contents; only `..data_len` belong to the batch. The rest is kept
    /// from earlier batches, so in-place pushes neither allocate nor zero it.
    data: Vec<u8>,
    data_len: usize,
    max_pages: u32,
}

impl fmt::Debug for RamBatchBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamBatchBuilder")
            .field("pages", &self.len())
            .field("data_pages", &self.data_pages())
            .field("max_pages", &self.max_pages)
            .finish()
    }
}

impl Default for RamBatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl RamBatchBuilder {
    /// A builder holding at most [`Limits::DEFAULT_MAX_BATCH_PAGES`] pages.
    pub fn new() -> Self {
        Self::with_max_pages(Limits::DEFAULT_MAX_BATCH_PAGES)
    }

    /// A builder holding at most `max_pages` pages (at least 1). Keep it at
    /// or under the receiver's [`Limits::max_batch_pages`].
    pub fn with_max_pages(max_pages: u32) -> Self {
        RamBatchBuilder {
            entries: Vec::new(),
            data: Vec::new(),
            data_len: 0,
            max_pages: max_pages.max(1),
        }
    }

    /// Most pages this builder holds.
    pub fn max_pages(&self) -> u32 {
        self.max_pages
    }

    /// Pages (zero and data) pushed so far.
    pub fn len(&self) -> usize {
        self.entries.len() / ENTRY_LEN
    }

    /// Whether no page was pushed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether another push would be refused.
    pub fn is_full(&self) -> bool {
        self.len() >= self.max_pages as usize
    }

    /// Pages pushed with data.
    pub fn data_pages(&self) -> usize {
        self.data_len / PAGE_SIZE
    }

    /// Length of the RamPages payload this batch produces.
    pub fn payload_len(&self) -> u64 {
        (RAM_BATCH_HEADER_LEN + self.entries.len() + self.data_len) as u64
    }

    /// Empties the builder, keeping its buffers.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.data_len = 0;
    }

    /// Adds an all-zero page at `gpa` (4096-aligned).
    pub fn push_zero(&mut self, gpa: u64) -> Result<()> {
        self.push_entry(gpa, RAM_ENTRY_ZERO)
    }

    /// Adds a page at `gpa` (4096-aligned) with its contents.
    pub fn push_data(&mut self, gpa: u64, page: &[u8; PAGE_SIZE]) -> Result<()> {
        self.push_data_with(gpa, |buf| {
            buf.copy_from_slice(page);
            Ok::<(), FormatError>(())
        })
    }

    /// Adds a page with data at `gpa` whose contents `fill` writes straight into
    /// the batch (e.g. from guest memory), saving a copy through a page buffer. If
    /// `fill` fails, the batch is left as it was.
    pub fn push_data_with<E: From<FormatError>>(
        &mut self,
        gpa: u64,
        fill: impl FnOnce(&mut [u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        self.push_entry(gpa, 0)?;
        let start = self.data_len;
        if self.data.len() < start + PAGE_SIZE {
            self.data.resize(start + PAGE_SIZE, 0);
        }
        if let Err(e) = fill(&mut self.data[start..start + PAGE_SIZE]) {
            self.entries.truncate(self.entries.len() - ENTRY_LEN);
            return Err(e);
        }
        self.data_len = start + PAGE_SIZE;
        Ok(())
    }

    /// Like [`push_data`](Self::push_data), for a slice that must be exactly
    /// one page long.
    pub fn push_data_slice(&mut self, gpa: u64, page: &[u8]) -> Result<()> {
        let page: &[u8; PAGE_SIZE] = page.try_into().map_err(|_| {
            invalid_write(format!(
                "the page for GPA {gpa:#x} is {} bytes, expected {PAGE_SIZE}",
                page.len()
            ))
        })?;
        self.push_data(gpa, page)
    }

    fn push_entry(&mut self, gpa: u64, flags: u64) -> Result<()> {
        if gpa & RAM_ENTRY_FLAG_MASK != 0 {
            return Err(invalid_write(format!(
                "GPA {gpa:#x} is not aligned to {PAGE_SIZE} bytes"
            )));
        }
        if gpa.checked_add(PAGE_SIZE as u64).is_none() {
            return Err(invalid_write(format!(
                "the page at GPA {gpa:#x} extends past the 64-bit address space"
            )));
        }
        if self.is_full() {
            return Err(invalid_write(format!(
                "the RAM batch already holds {} pages, its maximum; write it and clear() the \
                 builder",
                self.max_pages
            )));
        }
        self.entries.extend_from_slice(&(gpa | flags).to_le_bytes());
        Ok(())
    }

    /// The batch header, then the entries and the data: the payload is
    /// their concatenation.
    pub(crate) fn parts(&self) -> ([u8; RAM_BATCH_HEADER_LEN], &[u8], &[u8]) {
        let count = u32::try_from(self.len()).expect("len() is bounded by max_pages, a u32");
        let mut header = [0u8; RAM_BATCH_HEADER_LEN];
        header[0..4].copy_from_slice(&count.to_le_bytes());
        // 4..8: reserved, zero.
        (header, &self.entries, &self.data[..self.data_len])
    }
}

/// One page of a parsed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamPage<'a> {
    /// Guest physical address, 4096-aligned.
    pub gpa: u64,
    /// The page contents (exactly [`PAGE_SIZE`] bytes), or `None` for a zero page.
    pub data: Option<&'a [u8]>,
}

/// A validated RamPages payload, borrowing the payload buffer.
///
/// Parsing checks the whole batch before returning, so a caller that applies
/// pages only after a successful parse never applies half a bad batch.
/// Whether the addresses fall inside guest memory is the caller's check; see
/// [`max_gpa_end`](Self::max_gpa_end). Later entries for the same GPA win.
#[derive(Debug, Clone, Copy)]
pub struct RamBatch<'a> {
    entries: &'a [u8],
    data: &'a [u8],
    max_gpa_end: u64,
}

impl<'a> RamBatch<'a> {
    /// Parses and validates a RamPages payload under the default [`Limits`].
    pub fn parse(payload: &'a [u8]) -> Result<Self> {
        Self::parse_with_limits(payload, &Limits::default())
    }

    /// Parses and validates a RamPages payload under `limits`.
    pub fn parse_with_limits(payload: &'a [u8], limits: &Limits) -> Result<Self> {
        if payload.len() < RAM_BATCH_HEADER_LEN {
            return Err(malformed(format!(
                "the payload is {} bytes, shorter than the {RAM_BATCH_HEADER_LEN}-byte batch \
                 header",
                payload.len()
            )));
        }
        let mut head = [0u8; RAM_BATCH_HEADER_LEN];
        head.copy_from_slice(&payload[..RAM_BATCH_HEADER_LEN]);
        let count = check_batch_head(&head, limits)?;
        // count <= u32::MAX, so this cannot overflow a usize on 64-bit hosts;
        // use checked arithmetic anyway for 32-bit ones.
        let entries_end = (count as usize)
            .checked_mul(ENTRY_LEN)
            .and_then(|n| n.checked_add(RAM_BATCH_HEADER_LEN))
            .filter(|&end| end <= payload.len())
            .ok_or_else(|| {
                malformed(format!(
                    "the payload is {} bytes, too short for {count} entries",
                    payload.len()
                ))
            })?;
        let entries = &payload[RAM_BATCH_HEADER_LEN..entries_end];
        let EntryScan {
            data_pages,
            max_gpa_end,
        } = scan_entries(entries)?;
        let expected = payload_len(u64::from(count), data_pages);
        if payload.len() as u64 != expected {
            return Err(malformed(format!(
                "the payload is {} bytes, but {count} entries with {data_pages} data pages need \
                 exactly {expected}",
                payload.len()
            )));
        }
        Ok(RamBatch {
            entries,
            data: &payload[entries_end..],
            max_gpa_end,
        })
    }

    /// Pages in the batch (zero and data); never 0.
    pub fn len(&self) -> usize {
        self.entries.len() / ENTRY_LEN
    }

    /// Always false: a valid batch holds at least one page.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Pages carrying data.
    pub fn data_pages(&self) -> usize {
        self.data.len() / PAGE_SIZE
    }

    /// Zero pages.
    pub fn zero_pages(&self) -> usize {
        self.len() - self.data_pages()
    }

    /// One past the highest byte any page of the batch touches; compare it
    /// with the end of guest memory before applying anything.
    pub fn max_gpa_end(&self) -> u64 {
        self.max_gpa_end
    }

    /// The pages, in entry order.
    pub fn iter(&self) -> RamPageIter<'a> {
        RamPageIter {
            entries: self.entries.chunks_exact(ENTRY_LEN),
            data: self.data.chunks_exact(PAGE_SIZE),
        }
    }
}

impl<'a> IntoIterator for &RamBatch<'a> {
    type Item = RamPage<'a>;
    type IntoIter = RamPageIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Iterator over the pages of a [`RamBatch`].
#[derive(Debug, Clone)]
pub struct RamPageIter<'a> {
    entries: std::slice::ChunksExact<'a, u8>,
    data: std::slice::ChunksExact<'a, u8>,
}

impl<'a> Iterator for RamPageIter<'a> {
    type Item = RamPage<'a>;

    fn next(&mut self) -> Option<RamPage<'a>> {
        let entry = le_u64(self.entries.next()?);
        let gpa = entry & !RAM_ENTRY_FLAG_MASK;
        let data = if entry & RAM_ENTRY_ZERO != 0 {
            None
        } else {
            // parse() checked there is one data page per non-zero entry.
            self.data.next()
        };
        Some(RamPage { gpa, data })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.entries.size_hint()
    }
}

impl ExactSizeIterator for RamPageIter<'_> {}

#[cfg(test)]
mod tests {
    #[test]
    fn in_place_pushes_roll_back_on_failure_and_reuse_the_buffer() {
        let mut b = RamBatchBuilder::with_max_pages(4);
        b.push_data_with(0x1000, |buf| {
            buf.fill(0x11);
            Ok::<(), FormatError>(())
        })
        .unwrap();
        let failed = b.push_data_with(0x2000, |buf| {
            buf.fill(0x22);
            Err(invalid_write("the source page could not be read"))
        });
        assert!(failed.is_err());
        assert_eq!((b.len(), b.data_pages()), (1, 1));
        b.push_data(0x3000, &[0x33; PAGE_SIZE]).unwrap();
        let (head, entries, data) = b.parts();
        let payload = [&head[..], entries, data].concat();
        let batch = RamBatch::parse(&payload).unwrap();
        let pages: Vec<_> = batch
            .iter()
            .map(|p| (p.gpa, p.data.map(|d| d[0])))
            .collect();
        assert_eq!(pages, [(0x1000, Some(0x11)), (0x3000, Some(0x33))]);
        // After clear() the kept buffer is overwritten, never read as stale data.
        b.clear();
        b.push_zero(0x4000).unwrap();
        assert_eq!(b.payload_len(), (RAM_BATCH_HEADER_LEN + ENTRY_LEN) as u64);
        let (_, _, data) = b.parts();
        assert!(data.is_empty());
    }

    use super::*;

    fn assemble(b: &RamBatchBuilder) -> Vec<u8> {
        let (head, entries, data) = b.parts();
        [&head[..], entries, data].concat()
    }

    fn page(fill: u8) -> [u8; PAGE_SIZE] {
        [fill; PAGE_SIZE]
    }

    #[test]
    fn build_and_parse() {
        let mut b = RamBatchBuilder::new();
        assert!(b.is_empty());
        b.push_zero(0).unwrap();
        b.push_data(0x1000, &page(0xaa)).unwrap();
        b.push_zero(0x5000).unwrap();
        b.push_data_slice(0x3000, &page(0x55)).unwrap();
        assert_eq!(b.len(), 4);
        assert_eq!(b.data_pages(), 2);
        assert_eq!(b.payload_len(), 8 + 32 + 2 * 4096);
        let payload = assemble(&b);
        assert_eq!(payload.len() as u64, b.payload_len());

        let batch = RamBatch::parse(&payload).unwrap();
        assert_eq!(batch.len(), 4);
        assert_eq!(batch.zero_pages(), 2);
        assert_eq!(batch.data_pages(), 2);
        assert_eq!(batch.max_gpa_end(), 0x6000);
        let pages: Vec<_> = batch.iter().collect();
        assert_eq!(pages[0], RamPage { gpa: 0, data: None });
        assert_eq!(pages[1].gpa, 0x1000);
        assert_eq!(pages[1].data, Some(&page(0xaa)[..]));
        assert_eq!(
            pages[2],
            RamPage {
                gpa: 0x5000,
                data: None
            }
        );
        assert_eq!(pages[3].data, Some(&page(0x55)[..]));
        assert_eq!(batch.iter().len(), 4);

        b.clear();
        assert!(b.is_empty());
        assert_eq!(b.payload_len(), 8);
    }

    #[test]
    fn builder_refuses_bad_pushes() {
        let mut b = RamBatchBuilder::with_max_pages(2);
        assert!(b.push_zero(0x1001).is_err());
        assert!(b.push_zero(!0xfffu64).is_err());
        assert!(b.push_data_slice(0, &[0u8; 100]).is_err());
        b.push_zero(0).unwrap();
        b.push_zero(0x1000).unwrap();
        assert!(b.is_full());
        let e = b.push_zero(0x2000).unwrap_err();
        assert!(e.to_string().contains("clear()"), "{e}");
        assert_eq!(b.len(), 2);
    }

    fn raw(count: u32, reserved: u32, entries: &[u64], data_pages: usize) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&count.to_le_bytes());
        v.extend_from_slice(&reserved.to_le_bytes());
        for e in entries {
            v.extend_from_slice(&e.to_le_bytes());
        }
        v.resize(v.len() + data_pages * PAGE_SIZE, 0x11);
        v
    }

    fn reason(payload: &[u8]) -> String {
        match RamBatch::parse(payload) {
            Err(FormatError::MalformedRamBatch { reason }) => reason,
            other => panic!("expected MalformedRamBatch, got {other:?}"),
        }
    }

    #[test]
    fn parse_rejects_each_malformation() {
        assert!(reason(&[0; 7]).contains("shorter"));
        assert!(reason(&raw(1, 1, &[1], 0)).contains("reserved"));
        assert!(reason(&raw(0, 0, &[], 0)).contains("no pages"));
        assert!(reason(&raw(8193, 0, &[], 0)).contains("over the limit"));
        assert!(reason(&raw(3, 0, &[1, 1], 0)).contains("too short"));
        assert!(reason(&raw(u32::MAX, 0, &[], 0)).contains("over the limit"));
        assert!(reason(&raw(1, 0, &[0x1000 | 2], 1)).contains("unknown flag"));
        assert!(reason(&raw(1, 0, &[0x1000 | 0x800 | 1], 0)).contains("unknown flag"));
        assert!(reason(&raw(1, 0, &[(!0xfffu64) | 1], 0)).contains("64-bit"));
        // Data page missing, extra data page, stray bytes.
        assert!(reason(&raw(1, 0, &[0x1000], 0)).contains("exactly"));
        assert!(reason(&raw(1, 0, &[0x1000 | 1], 1)).contains("exactly"));
        let mut v = raw(1, 0, &[0x1000], 1);
        v.push(0);
        assert!(reason(&v).contains("exactly"));
        v.truncate(v.len() - 2);
        assert!(reason(&v).contains("exactly"));
    }

    #[test]
    fn parse_honours_custom_limit() {
        let v = raw(3, 0, &[1, 0x1001, 0x2001], 0);
        assert!(RamBatch::parse(&v).is_ok());
        let limits = Limits {
            max_batch_pages: 2,
            ..Limits::default()
        };
        assert!(RamBatch::parse_with_limits(&v, &limits).is_err());
    }
}
