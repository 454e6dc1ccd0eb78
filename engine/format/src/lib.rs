//! ferry's stream format: one format for checkpoints (a migration into a
//! file) and live migration (over TCP, a unix socket or a file descriptor).
//!
//! No KVM and no `unsafe` here: the crate is unit-tested on any machine and
//! every input is treated as hostile. Every length is checked against
//! [`Limits`] before anything is allocated, every field is validated before
//! use, and no input makes it panic.
//!
//! # Layout
//!
//! All integers are little-endian. A stream is a preamble followed by
//! sections; the last section is End.
//!
//! ## Preamble (24 bytes, then the producer string)
//!
//! | Offset | Size | Field        | Value                                               |
//! |-------:|-----:|--------------|-----------------------------------------------------|
//! |      0 |    8 | magic        | `"FERRYVM\0"`                                       |
//! |      8 |    4 | version      | stream format version, `1`; newer is refused        |
//! |     12 |    4 | flags        | `0`; any set bit is refused                         |
//! |     16 |    2 | producer_len | length of the producer string, at most 256          |
//! |     18 |    6 | reserved     | `0`                                                 |
//! |     24 |    n | producer     | UTF-8, no control characters, e.g. `"ferry 0.1.0"`  |
//!
//! ## Section (24-byte header, then `length` bytes of payload)
//!
//! | Offset | Size | Field    | Value                                                   |
//! |-------:|-----:|----------|---------------------------------------------------------|
//! |      0 |    4 | id       | section id (below); `0` is invalid                      |
//! |      4 |    2 | version  | payload layout version                                  |
//! |      6 |    2 | flags    | bit 0: CRITICAL; other bits `0`                         |
//! |      8 |    8 | length   | payload length in bytes                                 |
//! |     16 |    4 | crc32    | CRC-32 (IEEE) of the payload                            |
//! |     20 |    4 | reserved | `0`                                                     |
//!
//! An unknown id is refused if CRITICAL is set and skipped (still
//! checksummed) if not. A known id in an unsupported version is refused.
//!
//! | Id | Name     | Payload                                 | Limit (default)   |
//! |---:|----------|-----------------------------------------|-------------------|
//! |  1 | Shape    | CBOR: the VM's shape                    | 16 MiB            |
//! |  2 | RamPages | binary batch of guest pages (below)     | 8192 pages        |
//! |  3 | Vcpus    | CBOR: vCPU state                        | 16 MiB            |
//! |  4 | Vm       | CBOR: VM-wide state                     | 16 MiB            |
//! |  5 | Devices  | CBOR: device state                      | 16 MiB            |
//! |  6 | End      | counts (below); always last             | 24 bytes          |
//! |  7 | Reply    | CBOR: return-path message (dest to src) | 16 MiB            |
//! |  8 | Digest   | CBOR: digest of all guest RAM           | 16 MiB            |
//! |  9 | Join     | CBOR: opens an extra page stream        | 16 MiB            |
//! | 10 | KeepAlive| empty, never critical; readers skip it  | 0 bytes           |
//! | 11 | Postcopy | CBOR: the pages still to come           | 16 MiB            |
//! |  * | other    | unknown to this version                 | 64 MiB            |
//!
//! ## RamPages payload
//!
//! | Offset        | Size             | Field    | Value                                  |
//! |--------------:|-----------------:|----------|----------------------------------------|
//! |             0 |                4 | count    | number of entries, `1..=max_batch_pages` |
//! |             4 |                4 | reserved | `0`                                    |
//! |             8 |      8 × count   | entries  | `gpa \| flags`: GPA 4096-aligned; flag bit 0 = ZERO page (no data); other low 12 bits `0` |
//! | 8 + 8 × count | 4096 × data_pages| data     | contents of the non-ZERO pages, in entry order |
//!
//! The payload length is exactly `8 + 8 × count + 4096 × data_pages`. A batch
//! is validated whole before any page of it is handed out. Later entries for
//! the same GPA win.
//!
//! ## End payload (24 bytes)
//!
//! | Offset | Size | Field     | Value                                            |
//! |-------:|-----:|-----------|--------------------------------------------------|
//! |      0 |    8 | sections  | sections before End, skipped ones included       |
//! |      8 |    8 | ram_pages | RAM pages (zero and data) in all RamPages        |
//! |     16 |    8 | flags     | `0`                                              |
//!
//! The reader checks both counts against what it read, which catches a lost
//! section. Nothing may be read after End.
//!
//! ## Extra page streams
//!
//! A migration over several connections (multifd) opens each extra one with a
//! stream of its own: the preamble, a Join section (CBOR: the session token from
//! the main stream's Shape, the stream's number, the number of streams), RamPages
//! sections, and End, whose counts cover that stream only. Which pages a stream may
//! carry, and how the streams are ordered at switch-over, is the migration
//! engine's rule (`ferry-vmm`, `migration` module).
//!
//! # Use
//!
//! ```
//! use ferry_format::{
//!     decode_cbor, Limits, RamBatch, RamBatchBuilder, SectionId, StreamReader, StreamWriter,
//!     PAGE_SIZE,
//! };
//!
//! # fn main() -> Result<(), ferry_format::FormatError> {
//! let mut w = StreamWriter::new(Vec::new(), "ferry 0.1.0")?;
//! w.write_cbor(SectionId::Shape, 1, &vec![512u64, 2])?;
//! let mut batch = RamBatchBuilder::new();
//! batch.push_zero(0)?;
//! batch.push_data(0x1000, &[0xaa; PAGE_SIZE])?;
//! w.write_ram_batch(&batch)?;
//! let bytes = w.finish()?;
//!
//! let limits = Limits::default();
//! let (mut r, preamble) = StreamReader::new(&bytes[..], limits)?;
//! assert_eq!(preamble.producer, "ferry 0.1.0");
//! let mut buf = Vec::new();
//! loop {
//!     let section = r.next_section(&mut buf)?;
//!     match section.id {
//!         SectionId::Shape => {
//!             let shape: Vec<u64> = decode_cbor(section.id, &buf, &limits)?;
//!             assert_eq!(shape, [512, 2]);
//!         }
//!         SectionId::RamPages => {
//!             let batch = RamBatch::parse_with_limits(&buf, &limits)?;
//!             for page in &batch {
//!                 let _ = (page.gpa, page.data); // write into guest memory
//!             }
//!         }
//!         SectionId::End => break,
//!         _ => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

mod cbor;
mod error;
mod preamble;
mod ram;
mod reader;
mod section;
mod writer;

pub use cbor::{decode_cbor, encode_cbor, MAX_CBOR_DEPTH};
pub use error::{FormatError, Result};
pub use preamble::{Preamble, FORMAT_VERSION, MAGIC, MAX_PRODUCER_LEN, PREAMBLE_LEN};
pub use ram::{
    RamBatch, RamBatchBuilder, RamPage, RamPageIter, PAGE_SIZE, RAM_BATCH_HEADER_LEN,
    RAM_ENTRY_FLAG_MASK, RAM_ENTRY_ZERO,
};
pub use reader::{PageSink, StreamReader};
pub use section::{
    EndSummary, Limits, SectionHeader, SectionId, END_PAYLOAD_LEN, SECTION_FLAG_CRITICAL,
    SECTION_HEADER_LEN,
};
pub use writer::StreamWriter;

#[cfg(test)]
mod tests;
