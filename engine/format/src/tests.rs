//! Whole-stream tests: round trips and one test per way a stream is refused.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::preamble::encode_fixed;
use crate::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ShapeState {
    mem_mib: u64,
    vcpus: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct VcpuState {
    regs: Vec<u64>,
}

fn page(fill: u8) -> [u8; PAGE_SIZE] {
    let mut p = [fill; PAGE_SIZE];
    p[0] = fill.wrapping_add(1);
    p
}

/// A stream with one section of every kind (4 RAM pages in 2 batches).
fn sample_stream() -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new(), "ferry 0.1.0").unwrap();
    w.write_cbor(
        SectionId::Shape,
        1,
        &ShapeState {
            mem_mib: 64,
            vcpus: 2,
        },
    )
    .unwrap();
    let mut b = RamBatchBuilder::new();
    b.push_zero(0).unwrap();
    b.push_data(0x1000, &page(1)).unwrap();
    b.push_data(0x2000, &page(2)).unwrap();
    w.write_ram_batch(&b).unwrap();
    b.clear();
    b.push_zero(0x3000).unwrap();
    w.write_ram_batch(&b).unwrap();
    w.write_cbor(SectionId::Vcpus, 1, &vec![VcpuState { regs: vec![1, 2] }])
        .unwrap();
    w.write_cbor(SectionId::Vm, 1, &"clock").unwrap();
    w.write_cbor(SectionId::Devices, 1, &[7u8; 3]).unwrap();
    assert_eq!(w.sections_written(), 6);
    assert_eq!(w.ram_pages_written(), 4);
    let written = w.bytes_written();
    let out = w.finish().unwrap();
    assert_eq!(written + 24 + 24, out.len() as u64);
    out
}

/// Reads a whole stream; returns every section with its payload.
fn read_all(bytes: &[u8]) -> Result<Vec<(SectionHeader, Vec<u8>)>> {
    read_all_with(bytes, Limits::default())
}

fn read_all_with(bytes: &[u8], limits: Limits) -> Result<Vec<(SectionHeader, Vec<u8>)>> {
    let (mut r, _) = StreamReader::new(bytes, limits)?;
    let mut out = Vec::new();
    let mut buf = Vec::new();
    loop {
        let h = r.next_section(&mut buf)?;
        out.push((h, buf.clone()));
        if h.is_end() {
            return Ok(out);
        }
    }
}

fn preamble(producer: &str) -> Vec<u8> {
    let mut v = encode_fixed(producer.len() as u16).to_vec();
    v.extend_from_slice(producer.as_bytes());
    v
}

fn raw_section(id: u32, version: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    v.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

fn raw_end(sections: u64, ram_pages: u64) -> Vec<u8> {
    let summary = EndSummary {
        sections,
        ram_pages,
    };
    raw_section(6, 1, 1, &summary.encode())
}

/// Preamble, the given sections, and an End that counts them (no RAM).
fn stream_of(sections: &[Vec<u8>]) -> Vec<u8> {
    let mut v = preamble("test");
    for s in sections {
        v.extend_from_slice(s);
    }
    v.extend(raw_end(sections.len() as u64, 0));
    v
}

fn cbor(value: &impl Serialize) -> Vec<u8> {
    encode_cbor(SectionId::Vm, value, &Limits::default()).unwrap()
}

#[test]
fn round_trip_every_section_kind() {
    let bytes = sample_stream();
    let limits = Limits::default();
    let (mut r, pre) = StreamReader::new(&bytes[..], limits).unwrap();
    assert_eq!(
        pre,
        Preamble {
            format_version: 1,
            flags: 0,
            producer: "ferry 0.1.0".into()
        }
    );
    let mut buf = Vec::new();

    let h = r.next_section(&mut buf).unwrap();
    assert_eq!(h.id, SectionId::Shape);
    assert!(h.critical);
    let shape: ShapeState = decode_cbor(h.id, &buf, &limits).unwrap();
    assert_eq!(shape.mem_mib, 64);

    let h = r.next_section(&mut buf).unwrap();
    assert_eq!(h.id, SectionId::RamPages);
    let batch = RamBatch::parse(&buf).unwrap();
    let pages: Vec<_> = batch
        .iter()
        .map(|p| (p.gpa, p.data.map(<[u8]>::to_vec)))
        .collect();
    assert_eq!(
        pages,
        vec![
            (0, None),
            (0x1000, Some(page(1).to_vec())),
            (0x2000, Some(page(2).to_vec())),
        ]
    );

    let h = r.next_section(&mut buf).unwrap();
    assert_eq!(h.id, SectionId::RamPages);
    let batch = RamBatch::parse(&buf).unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(batch.max_gpa_end(), 0x4000);

    let h = r.next_section(&mut buf).unwrap();
    assert_eq!(h.id, SectionId::Vcpus);
    let v: Vec<VcpuState> = decode_cbor(h.id, &buf, &limits).unwrap();
    assert_eq!(v[0].regs, [1, 2]);

    let h = r.next_section(&mut buf).unwrap();
    assert_eq!(h.id, SectionId::Vm);
    assert_eq!(decode_cbor::<String>(h.id, &buf, &limits).unwrap(), "clock");

    let h = r.next_section(&mut buf).unwrap();
    assert_eq!(h.id, SectionId::Devices);
    assert_eq!(decode_cbor::<[u8; 3]>(h.id, &buf, &limits).unwrap(), [7; 3]);

    let h = r.next_section(&mut buf).unwrap();
    assert!(h.is_end());
    assert_eq!(
        EndSummary::decode(&buf).unwrap(),
        EndSummary {
            sections: 6,
            ram_pages: 4
        }
    );
    assert!(r.is_finished());
    assert_eq!(r.end_summary().unwrap().ram_pages, 4);
    assert_eq!(r.sections_read(), 6);
    assert_eq!(r.ram_pages_read(), 4);
    assert_eq!(r.bytes_read(), bytes.len() as u64);
}

#[test]
fn raw_write_section_round_trips_and_validates_ram() {
    let mut w = StreamWriter::new(Vec::new(), "").unwrap();
    w.write_section(SectionId::Unknown(1000), 3, false, b"extra")
        .unwrap();
    let mut b = RamBatchBuilder::new();
    b.push_zero(0x1000).unwrap();
    b.push_zero(0x2000).unwrap();
    let (head, entries, data) = b.parts();
    let payload = [&head[..], entries, data].concat();
    w.write_section(SectionId::RamPages, 1, true, &payload)
        .unwrap();
    assert_eq!(w.ram_pages_written(), 2);
    let e = w
        .write_section(SectionId::RamPages, 1, true, &payload[..payload.len() - 1])
        .unwrap_err();
    assert!(matches!(e, FormatError::MalformedRamBatch { .. }));
    let bytes = w.finish().unwrap();
    let sections = read_all(&bytes).unwrap();
    // The unknown optional section is skipped.
    assert_eq!(sections.len(), 2);
    assert_eq!(sections[0].0.id, SectionId::RamPages);
}

#[test]
fn truncated_at_every_offset() {
    let bytes = sample_stream();
    for len in 0..bytes.len() {
        match read_all(&bytes[..len]) {
            Err(e @ FormatError::Truncated { .. }) => {
                let msg = e.to_string();
                assert!(msg.starts_with("the stream ended early (after "), "{msg}");
                assert!(msg.contains(&format!("after {len} bytes")), "{msg}");
                assert!(msg.ends_with("the file is truncated"), "{msg}");
            }
            other => panic!("prefix of {len} bytes: expected Truncated, got {other:?}"),
        }
    }
    // Spot-check the location phrases.
    let msg = read_all(&bytes[..3]).unwrap_err().to_string();
    assert!(msg.contains("inside the preamble"), "{msg}");
    let first_section = PREAMBLE_LEN + "ferry 0.1.0".len();
    let msg = read_all(&bytes[..first_section]).unwrap_err().to_string();
    assert!(
        msg.contains("between sections, before the End section"),
        "{msg}"
    );
    let msg = read_all(&bytes[..first_section + 5])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("inside the header of section #1"), "{msg}");
    let msg = read_all(&bytes[..first_section + 30])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("inside section Shape (id 1)"), "{msg}");
}

#[test]
fn truncated_inside_skipped_section() {
    let mut bytes = preamble("t");
    bytes.extend(raw_section(77, 1, 0, &[5; 100]));
    bytes.truncate(bytes.len() - 10);
    let msg = read_all(&bytes).unwrap_err().to_string();
    assert!(msg.contains("inside section unknown (id 77)"), "{msg}");
}

#[test]
fn bad_magic() {
    let e = read_all(b"\x7fELF\x02\x01\x01\x00 and more bytes of an ELF file").unwrap_err();
    assert!(matches!(e, FormatError::BadMagic { .. }));
    assert!(e
        .to_string()
        .contains("the first bytes are 7f 45 4c 46 02 01 01 00, expected FERRYVM"));
    // Short foreign input is foreign, not truncated.
    let e = read_all(b"abc").unwrap_err();
    assert!(matches!(e, FormatError::BadMagic { ref found } if found == b"abc"));
}

#[test]
fn newer_format_version() {
    let mut bytes = sample_stream();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    let e = read_all(&bytes).unwrap_err();
    assert_eq!(
        e.to_string(),
        "stream format version 2 is newer than this ferry supports (1); upgrade ferry on this side"
    );
    bytes[8..12].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(
        read_all(&bytes).unwrap_err(),
        FormatError::BadPreamble { .. }
    ));
}

#[test]
fn bad_preamble_fields() {
    let base = sample_stream();
    let bad = |edit: &dyn Fn(&mut Vec<u8>), needle: &str| {
        let mut b = base.clone();
        edit(&mut b);
        match read_all(&b) {
            Err(e @ FormatError::BadPreamble { .. }) => {
                assert!(e.to_string().contains(needle), "{e}")
            }
            other => panic!("expected BadPreamble ({needle}), got {other:?}"),
        }
    };
    bad(&|b| b[12] = 1, "unknown stream flags");
    bad(&|b| b[20] = 1, "reserved");
    bad(
        &|b| b[16..18].copy_from_slice(&300u16.to_le_bytes()),
        "over the limit",
    );
    bad(&|b| b[24] = 0xff, "not UTF-8");
    bad(&|b| b[24] = 0x1b, "control characters");
}

#[test]
fn flipped_payload_byte_fails_checksum() {
    let mut bytes = sample_stream();
    let first_payload = PREAMBLE_LEN + "ferry 0.1.0".len() + SECTION_HEADER_LEN;
    bytes[first_payload + 2] ^= 0x40;
    match read_all(&bytes).unwrap_err() {
        e @ FormatError::ChecksumMismatch {
            section: SectionId::Shape,
            expected,
            actual,
        } => {
            assert_ne!(expected, actual);
            assert!(e.to_string().contains("failed its checksum"), "{e}");
        }
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
}

#[test]
fn oversized_length_refused_before_allocating() {
    for (id, length) in [
        (1u32, u64::MAX),
        (1, (16 << 20) + 1),
        (2, 8 + 8 * 8192 + 4096 * 8192 + 1),
        (6, 25),
        (99, (64 << 20) + 1),
    ] {
        let mut bytes = preamble("t");
        let mut h = raw_section(id, 1, 0, &[]);
        h[8..16].copy_from_slice(&length.to_le_bytes());
        bytes.extend(h);
        // No payload follows: a reader that allocated or read first would
        // report truncation instead.
        match read_all(&bytes).unwrap_err() {
            FormatError::SectionTooLarge {
                length: l, limit, ..
            } => {
                assert_eq!(l, length);
                assert!(limit < length);
            }
            other => panic!("id {id}: expected SectionTooLarge, got {other:?}"),
        }
    }
    // Custom limits apply.
    let bytes = stream_of(&[raw_section(4, 1, 1, &cbor(&vec![0u8; 100]))]);
    let limits = Limits {
        max_cbor_len: 50,
        ..Limits::default()
    };
    assert!(matches!(
        read_all_with(&bytes, limits).unwrap_err(),
        FormatError::SectionTooLarge { limit: 50, .. }
    ));
}

#[test]
fn unknown_critical_section_refused() {
    let bytes = stream_of(&[raw_section(42, 3, 1, b"future")]);
    let e = read_all(&bytes).unwrap_err();
    assert_eq!(
        e.to_string(),
        "section id 42 version 3 is required by this stream but unknown to this ferry; \
         upgrade ferry on the receiving side"
    );
}

#[test]
fn unknown_optional_section_skipped_but_checked() {
    let bytes = stream_of(&[
        raw_section(4, 1, 1, &cbor(&1u8)),
        raw_section(42, 3, 0, &[9; 200_000]),
        raw_section(5, 1, 1, &cbor(&2u8)),
    ]);
    let (mut r, _) = StreamReader::new(&bytes[..], Limits::default()).unwrap();
    let mut buf = Vec::new();
    assert_eq!(r.next_section(&mut buf).unwrap().id, SectionId::Vm);
    assert_eq!(r.next_section(&mut buf).unwrap().id, SectionId::Devices);
    assert_eq!(buf, cbor(&2u8));
    assert!(r.next_section(&mut buf).unwrap().is_end());
    assert_eq!(r.sections_skipped(), 1);
    assert_eq!(r.sections_read(), 3);

    // A corrupted optional section is still refused.
    let mut bad = raw_section(42, 3, 0, &[9; 200_000]);
    bad[SECTION_HEADER_LEN + 150_000] ^= 1;
    let bytes = stream_of(&[bad]);
    assert!(matches!(
        read_all(&bytes).unwrap_err(),
        FormatError::ChecksumMismatch {
            section: SectionId::Unknown(42),
            ..
        }
    ));
}

#[test]
fn keepalives_are_skipped_counted_and_carry_nothing() {
    let mut w = StreamWriter::new(Vec::new(), "t").unwrap();
    w.write_cbor(SectionId::Vm, 1, &1u8).unwrap();
    w.write_keepalive().unwrap();
    w.write_keepalive().unwrap();
    w.write_cbor(SectionId::Devices, 1, &2u8).unwrap();
    let bytes = w.finish().unwrap();
    let (mut r, _) = StreamReader::new(&bytes[..], Limits::default()).unwrap();
    let mut buf = Vec::new();
    assert_eq!(r.next_section(&mut buf).unwrap().id, SectionId::Vm);
    assert_eq!(r.next_section(&mut buf).unwrap().id, SectionId::Devices);
    assert!(r.next_section(&mut buf).unwrap().is_end());
    assert_eq!(r.sections_skipped(), 2);

    // A keep-alive with a payload is refused.
    let bytes = stream_of(&[raw_section(10, 1, 0, b"x")]);
    assert!(matches!(
        read_all(&bytes).unwrap_err(),
        FormatError::SectionTooLarge {
            section: SectionId::KeepAlive,
            ..
        }
    ));
}

#[test]
fn unsupported_section_version_refused() {
    let bytes = stream_of(&[raw_section(3, 2, 1, &cbor(&1u8))]);
    let e = read_all(&bytes).unwrap_err();
    assert!(matches!(
        e,
        FormatError::UnsupportedSectionVersion {
            section: SectionId::Vcpus,
            version: 2,
            ..
        }
    ));
    assert!(e.to_string().contains("Vcpus (id 3) has version 2"), "{e}");
    assert!(e.to_string().contains("version(s) 1"), "{e}");
}

#[test]
fn malformed_section_header_refused() {
    for (edit, needle) in [
        ((0usize, 0u8), "id 0"),
        ((6, 2), "unknown flag"),
        ((21, 1), "reserved"),
    ] {
        let mut s = raw_section(4, 1, 1, &cbor(&1u8));
        if edit.0 == 0 {
            s[0] = 0;
        } else {
            s[edit.0] = edit.1;
        }
        let e = read_all(&stream_of(&[s])).unwrap_err();
        assert!(matches!(e, FormatError::MalformedSection { .. }), "{e:?}");
        assert!(e.to_string().contains(needle), "{e}");
    }
}

#[test]
fn malformed_ram_batches_refused() {
    fn batch(count: u32, reserved: u32, entries: &[u64], data_bytes: usize) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&count.to_le_bytes());
        v.extend_from_slice(&reserved.to_le_bytes());
        for e in entries {
            v.extend_from_slice(&e.to_le_bytes());
        }
        v.resize(v.len() + data_bytes, 0x33);
        v
    }
    let cases = [
        batch(0, 0, &[], 0),
        batch(1, 7, &[1], 0),
        batch(2, 0, &[1], 0),
        batch(1, 0, &[0x1000 | 4], 4096),
        batch(1, 0, &[0x1000], 4095),
        batch(1, 0, &[0x1000 | 1], 4096),
        batch(8193, 0, &[1; 8193], 0),
        vec![1, 0, 0],
    ];
    for payload in cases {
        let bytes = stream_of(&[raw_section(2, 1, 1, &payload)]);
        match read_all(&bytes) {
            Err(FormatError::MalformedRamBatch { .. }) => {}
            other => panic!("expected MalformedRamBatch, got {other:?}"),
        }
    }
}

#[test]
fn end_mismatch_refused() {
    // Declares one section too many: a section was dropped.
    let mut bytes = preamble("t");
    bytes.extend(raw_section(4, 1, 1, &cbor(&1u8)));
    bytes.extend(raw_end(2, 0));
    let e = read_all(&bytes).unwrap_err();
    assert!(matches!(
        e,
        FormatError::EndMismatch {
            what: "sections",
            declared: 2,
            counted: 1
        }
    ));
    assert!(
        e.to_string()
            .contains("declares 2 sections, but 1 were read"),
        "{e}"
    );

    // RAM page count off.
    let mut bytes = preamble("t");
    bytes.extend(raw_end(0, 5));
    assert!(matches!(
        read_all(&bytes).unwrap_err(),
        FormatError::EndMismatch {
            what: "RAM pages",
            ..
        }
    ));

    // A whole section cut out of a real stream.
    let full = sample_stream();
    let first = PREAMBLE_LEN + "ferry 0.1.0".len();
    let shape_len = SECTION_HEADER_LEN
        + u64::from_le_bytes(full[first + 8..first + 16].try_into().unwrap()) as usize;
    let mut cut = full[..first].to_vec();
    cut.extend_from_slice(&full[first + shape_len..]);
    assert!(matches!(
        read_all(&cut).unwrap_err(),
        FormatError::EndMismatch { .. }
    ));

    // End with bad payload.
    let mut bytes = preamble("t");
    bytes.extend(raw_section(6, 1, 1, &[0; 16]));
    assert!(read_all(&bytes).is_err());
}

#[test]
fn read_after_end_refused_and_trailing_bytes_left_alone() {
    let mut bytes = sample_stream();
    let len = bytes.len();
    bytes.extend_from_slice(b"trailing garbage");
    let (mut r, _) = StreamReader::new(&bytes[..], Limits::default()).unwrap();
    let mut buf = Vec::new();
    while !r.next_section(&mut buf).unwrap().is_end() {}
    assert_eq!(r.bytes_read(), len as u64);
    let e = r.next_section(&mut buf).unwrap_err();
    assert!(matches!(e, FormatError::ReadAfterEnd));
    // The rest of the transport is the caller's.
    let mut rest = Vec::new();
    r.into_inner().read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"trailing garbage");
}

#[test]
fn read_after_error_refused() {
    let mut bad = raw_section(4, 1, 1, &cbor(&1u8));
    let n = bad.len();
    bad[n - 1] ^= 1;
    let bytes = stream_of(&[bad, raw_section(4, 1, 1, &cbor(&1u8))]);
    let (mut r, _) = StreamReader::new(&bytes[..], Limits::default()).unwrap();
    let mut buf = Vec::new();
    assert!(matches!(
        r.next_section(&mut buf).unwrap_err(),
        FormatError::ChecksumMismatch { .. }
    ));
    assert!(matches!(
        r.next_section(&mut buf).unwrap_err(),
        FormatError::ReadAfterError
    ));
}

#[test]
fn writer_refuses_invalid_sections() {
    let mut w = StreamWriter::new(Vec::new(), "t").unwrap();
    let invalid = |r: Result<()>| matches!(r, Err(FormatError::InvalidWrite { .. }));
    assert!(invalid(w.write_section(SectionId::End, 1, true, &[0; 24])));
    assert!(invalid(w.write_section(
        SectionId::Unknown(6),
        1,
        true,
        &[0; 24]
    )));
    assert!(invalid(w.write_section(
        SectionId::Unknown(0),
        1,
        true,
        b"x"
    )));
    assert!(invalid(w.write_ram_batch(&RamBatchBuilder::new())));
    assert!(matches!(
        w.write_section(SectionId::Vm, 9, true, b"x"),
        Err(FormatError::UnsupportedSectionVersion { .. })
    ));
    assert!(matches!(
        w.write_section(SectionId::Vm, 1, true, &vec![0; (16 << 20) + 1]),
        Err(FormatError::SectionTooLarge { .. })
    ));
    assert_eq!(w.sections_written(), 0);
    // Nothing was written by the refused calls.
    assert_eq!(w.bytes_written(), (PREAMBLE_LEN + 1) as u64);
    assert_eq!(w.get_ref().len(), PREAMBLE_LEN + 1);

    // Batch over the writer's limit.
    let limits = Limits {
        max_batch_pages: 1,
        ..Limits::default()
    };
    let mut w = StreamWriter::with_limits(Vec::new(), "t", limits).unwrap();
    let mut b = RamBatchBuilder::new();
    b.push_zero(0).unwrap();
    b.push_zero(0x1000).unwrap();
    assert!(invalid(w.write_ram_batch(&b)));

    // Producer checks.
    assert!(matches!(
        StreamWriter::new(Vec::new(), &"x".repeat(257)),
        Err(FormatError::InvalidWrite { .. })
    ));
    assert!(StreamWriter::new(Vec::new(), &"x".repeat(256)).is_ok());
    assert!(StreamWriter::new(Vec::new(), "a\nb").is_err());
}

/// A reader that hands out at most 3 bytes per call and interrupts often.
struct Trickle<'a> {
    data: &'a [u8],
    calls: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.calls % 3 == 0 {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = buf.len().min(3).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// A writer that accepts at most 7 bytes per call and interrupts often.
struct Choke {
    out: Vec<u8>,
    calls: usize,
}

impl Write for Choke {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.calls % 4 == 0 {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = buf.len().min(7);
        self.out.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn short_reads_and_writes() {
    let expected = sample_stream();
    // Same stream through a choking writer.
    let mut w = StreamWriter::new(
        Choke {
            out: Vec::new(),
            calls: 0,
        },
        "ferry 0.1.0",
    )
    .unwrap();
    w.write_cbor(
        SectionId::Shape,
        1,
        &ShapeState {
            mem_mib: 64,
            vcpus: 2,
        },
    )
    .unwrap();
    let mut b = RamBatchBuilder::new();
    b.push_zero(0).unwrap();
    b.push_data(0x1000, &page(1)).unwrap();
    b.push_data(0x2000, &page(2)).unwrap();
    w.write_ram_batch(&b).unwrap();
    b.clear();
    b.push_zero(0x3000).unwrap();
    w.write_ram_batch(&b).unwrap();
    w.write_cbor(SectionId::Vcpus, 1, &vec![VcpuState { regs: vec![1, 2] }])
        .unwrap();
    w.write_cbor(SectionId::Vm, 1, &"clock").unwrap();
    w.write_cbor(SectionId::Devices, 1, &[7u8; 3]).unwrap();
    assert_eq!(w.finish().unwrap().out, expected);

    let r = Trickle {
        data: &expected,
        calls: 0,
    };
    let (mut r, _) = StreamReader::new(r, Limits::default()).unwrap();
    let mut buf = Vec::new();
    let mut n = 0;
    while !r.next_section(&mut buf).unwrap().is_end() {
        n += 1;
    }
    assert_eq!(n, 6);
}

#[test]
fn writer_reports_a_closed_stream() {
    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Ok(0)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    match StreamWriter::new(Closed, "t") {
        Err(FormatError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::WriteZero),
        other => panic!("expected Io(WriteZero), got {other:?}"),
    }
}

#[test]
fn full_batch_round_trips() {
    let mut b = RamBatchBuilder::new();
    for i in 0..Limits::DEFAULT_MAX_BATCH_PAGES as u64 {
        if i % 3 == 0 {
            b.push_zero(i << 12).unwrap();
        } else {
            b.push_data(i << 12, &page(i as u8)).unwrap();
        }
    }
    assert!(b.is_full());
    let mut w = StreamWriter::new(Vec::new(), "t").unwrap();
    w.write_ram_batch(&b).unwrap();
    let bytes = w.finish().unwrap();
    let sections = read_all(&bytes).unwrap();
    let batch = RamBatch::parse(&sections[0].1).unwrap();
    assert_eq!(batch.len(), 8192);
    for (i, p) in batch.iter().enumerate() {
        assert_eq!(p.gpa, (i as u64) << 12);
        assert_eq!(p.data.is_none(), i % 3 == 0);
        if let Some(d) = p.data {
            assert_eq!(d, &page(i as u8)[..]);
        }
    }
}

/// Tiny deterministic PRNG (xorshift64*), so the sweeps need no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Reads the stream and decodes every payload the way a receiver would.
fn consume(bytes: &[u8]) -> Result<()> {
    let limits = Limits::default();
    for (h, payload) in read_all(bytes)? {
        match h.id {
            SectionId::RamPages => {
                let batch = RamBatch::parse(&payload)?;
                for p in &batch {
                    assert!(p.gpa + PAGE_SIZE as u64 <= batch.max_gpa_end());
                    assert!(p.data.is_none_or(|d| d.len() == PAGE_SIZE));
                }
            }
            id if id.is_cbor() => {
                decode_cbor::<ciborium::Value>(id, &payload, &limits)?;
            }
            _ => {}
        }
    }
    Ok(())
}

#[test]
fn byte_flip_sweep_never_panics() {
    let bytes = sample_stream();
    let producer = PREAMBLE_LEN..PREAMBLE_LEN + "ferry 0.1.0".len();
    // Fields no checksum covers and whose flip can still name something
    // valid: the producer string, a section id's low byte (Vm <-> Devices)
    // and the CRITICAL flag of a known section.
    let mut uncovered: Vec<usize> = producer.clone().collect();
    let mut at = producer.end;
    while at < bytes.len() {
        uncovered.extend([at, at + 6]);
        let len = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap());
        at += SECTION_HEADER_LEN + len as usize;
    }
    let mut accepted = 0;
    for i in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] ^= mask;
            if consume(&b).is_ok() {
                accepted += 1;
                assert!(uncovered.contains(&i), "flip {mask:#x} at {i} accepted");
            }
        }
    }
    assert!(accepted < 40, "{accepted} flips accepted");
}

#[test]
fn random_corruption_never_panics() {
    let bytes = sample_stream();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..3000 {
        let mut b = bytes.clone();
        match rng.below(4) {
            // Several random byte changes.
            0 => {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(b.len());
                    b[i] = rng.next() as u8;
                }
            }
            // A random u64 dropped over a random place (hits lengths, counts).
            1 => {
                let i = rng.below(b.len() - 8);
                let v = match rng.below(3) {
                    0 => rng.next(),
                    1 => rng.next() % 70_000_000,
                    _ => u64::MAX - rng.next() % 8,
                };
                b[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            // Truncate and append garbage.
            2 => {
                let n = rng.below(b.len());
                b.truncate(n);
                for _ in 0..rng.below(64) {
                    b.push(rng.next() as u8);
                }
            }
            // A valid preamble followed by garbage.
            _ => {
                b.truncate(PREAMBLE_LEN + "ferry 0.1.0".len());
                for _ in 0..rng.below(4096) {
                    b.push(rng.next() as u8);
                }
            }
        }
        let _ = consume(&b);
    }
}

#[test]
fn random_garbage_sections_with_valid_crc_never_panic() {
    // Headers and payloads made up at random but with correct CRCs, so the
    // fuzzing reaches past the checksum into the payload parsers.
    let mut rng = Rng(42);
    for _ in 0..2000 {
        let mut b = preamble("fuzz");
        for _ in 0..rng.below(4) {
            let id = 1 + rng.below(7) as u32;
            let len = rng.below(300);
            let mut payload: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if id == 2 && len >= 16 && rng.below(2) == 0 {
                // Plausible batch header: small count, zero reserved.
                let count = 1 + rng.below(((len - 8) / 8).max(1)) as u32;
                payload[0..4].copy_from_slice(&count.to_le_bytes());
                payload[4..8].fill(0);
            }
            b.extend(raw_section(id, 1, rng.below(2) as u16, &payload));
        }
        let _ = consume(&b);
    }
}

/// A [`PageSink`] that keeps what it is handed, and may refuse batches.
#[derive(Default)]
struct Collect {
    checked: Vec<Vec<u64>>,
    pages: Vec<(u64, Option<Vec<u8>>)>,
    refuse_above: Option<u64>,
}

impl PageSink for Collect {
    type Error = FormatError;
    fn check(&mut self, gpas: &[u64]) -> Result<()> {
        if let Some(limit) = self.refuse_above {
            if let Some(g) = gpas.iter().find(|&&g| g >= limit) {
                return Err(FormatError::MalformedRamBatch {
                    reason: format!("page {g:#x} refused by the sink"),
                });
            }
        }
        self.checked.push(gpas.to_vec());
        Ok(())
    }
    fn page(&mut self, gpa: u64, data: Option<&[u8]>) -> Result<()> {
        self.pages.push((gpa, data.map(<[u8]>::to_vec)));
        Ok(())
    }
}

/// Reads a whole stream with `next_section_into` through a `capacity`-byte
/// buffer: the non-RAM sections with their payloads, and the sink.
fn read_into(
    bytes: &[u8],
    capacity: usize,
    sink: &mut Collect,
) -> Result<Vec<(SectionId, Vec<u8>)>> {
    let input = io::BufReader::with_capacity(capacity, bytes);
    let (mut r, _) = StreamReader::new(input, Limits::default())?;
    let mut out = Vec::new();
    let mut buf = Vec::new();
    loop {
        let h = r.next_section_into(&mut buf, sink)?;
        if h.id != SectionId::RamPages {
            out.push((h.id, buf.clone()));
        }
        if h.is_end() {
            return Ok(out);
        }
    }
}

/// Pages read in place equal the pages a whole-section read parses, whatever
/// the input buffer's size (pages straddling its end included), and End's
/// counts hold.
#[test]
fn pages_read_in_place_equal_the_parsed_ones() {
    let bytes = sample_stream();
    let mut want = Vec::new();
    let mut other = Vec::new();
    for (h, payload) in read_all(&bytes).unwrap() {
        if h.id == SectionId::RamPages {
            for p in RamBatch::parse(&payload).unwrap().iter() {
                want.push((p.gpa, p.data.map(<[u8]>::to_vec)));
            }
        } else {
            other.push((h.id, payload));
        }
    }
    for capacity in [1, 100, 4095, 4096, 5000, 1 << 20] {
        let mut sink = Collect::default();
        let got = read_into(&bytes, capacity, &mut sink).unwrap();
        assert_eq!(sink.pages, want, "capacity {capacity}");
        assert_eq!(sink.checked, vec![vec![0, 0x1000, 0x2000], vec![0x3000]]);
        assert_eq!(got, other, "capacity {capacity}");
    }
}

/// A batch the sink refuses hands out no page; a flipped data byte fails the
/// checksum (after the pages were handed out, as documented); a stream cut
/// anywhere fails, never panics.
#[test]
fn pages_read_in_place_are_refused_like_parsed_ones() {
    let bytes = sample_stream();
    let mut sink = Collect {
        refuse_above: Some(0x2000),
        ..Collect::default()
    };
    let e = read_into(&bytes, 1 << 20, &mut sink).unwrap_err();
    assert!(e.to_string().contains("refused by the sink"), "{e}");
    assert!(sink.pages.is_empty());

    let at = bytes.windows(PAGE_SIZE).position(|w| w == page(2)).unwrap();
    let mut bad = bytes.clone();
    bad[at + 100] ^= 1;
    let e = read_into(&bad, 1 << 20, &mut Collect::default()).unwrap_err();
    assert!(matches!(e, FormatError::ChecksumMismatch { .. }), "{e}");

    for cut in 0..bytes.len() {
        assert!(
            read_into(&bytes[..cut], 4096, &mut Collect::default()).is_err(),
            "cut at {cut}"
        );
    }
}
