//! The migration-stream receiver and the checkpoint loader: the same stream
//! format, two entry points.
//!
//! Mutations are structure-aware: the input is split into preamble and
//! sections (leniently, as the bytes say, not as a reader would accept them),
//! a section's header fields, payload, RAM entries or CBOR values are changed,
//! sections are dropped, duplicated, reordered or spliced from another input,
//! and most of the time the stream is reassembled with lengths, CRCs and the
//! End counts recomputed so that the mutation gets past the checksum to the
//! code that interprets the payload. Page addresses are aimed at the edges of
//! the guest's RAM (the last page, one past it, holes between ranges, the top
//! of the address space).

use std::io::{Cursor, Write};
use std::sync::{Arc, Mutex};

use ciborium::Value;
use ferry_format::{
    Limits, RamBatch, SectionId, StreamReader, StreamWriter, PAGE_SIZE, PREAMBLE_LEN,
    SECTION_HEADER_LEN,
};
use ferry_kvm::Backing;
use ferry_vmm::devices::serial::SinkSpec;
use ferry_vmm::migration::{self, Reply};
use ferry_vmm::persist::{self, Handshake, RestoreOptions};
use ferry_vmm::vm::VirtioSpec;

use crate::{class_of, mutate_bytes, Outcome, Rng, Target};

/// One section as the bytes say (fields unchecked).
#[derive(Debug, Clone)]
pub struct RawSection {
    pub id: u32,
    pub version: u16,
    pub flags: u16,
    pub length: u64,
    pub crc: u32,
    pub reserved: u32,
    pub payload: Vec<u8>,
}

/// A stream split leniently: whatever does not parse ends up in `tail`.
#[derive(Debug, Clone, Default)]
pub struct RawStream {
    pub preamble: Vec<u8>,
    pub sections: Vec<RawSection>,
    pub tail: Vec<u8>,
}

fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}
fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl RawStream {
    pub fn split(bytes: &[u8]) -> Self {
        if bytes.len() < PREAMBLE_LEN {
            return Self {
                tail: bytes.to_vec(),
                ..Self::default()
            };
        }
        let producer = usize::from(le_u16(&bytes[16..18]));
        let pre_end = (PREAMBLE_LEN + producer).min(bytes.len());
        let mut s = Self {
            preamble: bytes[..pre_end].to_vec(),
            ..Self::default()
        };
        let mut at = pre_end;
        while bytes.len() - at >= SECTION_HEADER_LEN {
            let h = &bytes[at..at + SECTION_HEADER_LEN];
            let length = le_u64(&h[8..16]);
            let start = at + SECTION_HEADER_LEN;
            let avail = (bytes.len() - start) as u64;
            if length > avail {
                break;
            }
            let end = start + length as usize;
            s.sections.push(RawSection {
                id: le_u32(&h[0..4]),
                version: le_u16(&h[4..6]),
                flags: le_u16(&h[6..8]),
                length,
                crc: le_u32(&h[16..20]),
                reserved: le_u32(&h[20..24]),
                payload: bytes[start..end].to_vec(),
            });
            at = end;
        }
        s.tail = bytes[at..].to_vec();
        s
    }

    /// The bytes; with `fix`, lengths, CRCs and the End counts are made right
    /// (`keep_length` leaves one section's declared length as it is).
    pub fn assemble(&self, fix: bool, keep_length: Option<usize>) -> Vec<u8> {
        let mut out = self.preamble.clone();
        let mut sections = 0u64;
        let mut pages = 0u64;
        for (i, s) in self.sections.iter().enumerate() {
            let mut payload = s.payload.clone();
            if fix && s.id == SectionId::End.as_u32() && payload.len() == 24 {
                payload[0..8].copy_from_slice(&sections.to_le_bytes());
                payload[8..16].copy_from_slice(&pages.to_le_bytes());
            }
            let length = if fix && keep_length != Some(i) {
                payload.len() as u64
            } else {
                s.length
            };
            let crc = if fix {
                crc32fast::hash(&payload)
            } else {
                s.crc
            };
            out.extend_from_slice(&s.id.to_le_bytes());
            out.extend_from_slice(&s.version.to_le_bytes());
            out.extend_from_slice(&s.flags.to_le_bytes());
            out.extend_from_slice(&length.to_le_bytes());
            out.extend_from_slice(&crc.to_le_bytes());
            out.extend_from_slice(&s.reserved.to_le_bytes());
            out.extend_from_slice(&payload);
            if s.id != SectionId::End.as_u32() {
                sections += 1;
            }
            if s.id == SectionId::RamPages.as_u32() && payload.len() >= 4 {
                pages += u64::from(le_u32(&payload[0..4]));
            }
        }
        out.extend_from_slice(&self.tail);
        out
    }

    /// The guest RAM ranges the Shape section names, if it decodes.
    pub fn ram_ranges(&self) -> Vec<(u64, u64)> {
        self.sections
            .iter()
            .find(|s| s.id == SectionId::Shape.as_u32())
            .and_then(|s| ciborium::from_reader::<Handshake, _>(&s.payload[..]).ok())
            .map(|h| h.shape.ram_ranges)
            .unwrap_or_default()
    }
}

/// Guest addresses worth aiming at, given the RAM ranges.
pub fn edge_gpa(rng: &mut Rng, ranges: &[(u64, u64)]) -> u64 {
    let mut candidates = vec![
        0,
        !0xfff,
        !0xfff - 0x1000,
        0xfffb_c000,
        0xc000_0000,
        0x1_0000_0000,
        1 << 46,
        1 << 52,
    ];
    for &(base, size) in ranges {
        let end = base.wrapping_add(size);
        candidates.extend([
            base,
            end.wrapping_sub(0x1000),
            end,
            end.wrapping_add(0x1000),
            base.wrapping_sub(0x1000),
            base.wrapping_add(size / 2),
        ]);
    }
    let gpa = *rng.pick(&candidates).unwrap_or(&0);
    if rng.chance(1, 4) {
        rng.interesting_u64() & !0xfff
    } else {
        gpa & !0xfff
    }
}

/// Mutates a RamPages payload while keeping it well-formed most of the time.
fn mutate_ram(rng: &mut Rng, payload: &mut Vec<u8>, ranges: &[(u64, u64)]) {
    if payload.len() < 8 {
        return;
    }
    let count = le_u32(&payload[0..4]) as usize;
    let entries_end = (8 + count * 8).min(payload.len());
    let n_entries = (entries_end - 8) / 8;
    match rng.below(7) {
        // An address at an edge of guest memory.
        0 | 1 if n_entries > 0 => {
            let i = rng.below(n_entries);
            let at = 8 + i * 8;
            let flags = le_u64(&payload[at..at + 8]) & 0xfff;
            let gpa = edge_gpa(rng, ranges);
            payload[at..at + 8].copy_from_slice(&(gpa | flags).to_le_bytes());
        }
        // Flag bits: unknown ones, or ZERO toggled (data left as it is).
        2 if n_entries > 0 => {
            let at = 8 + rng.below(n_entries) * 8;
            let bit = 1u64 << rng.below(12);
            let v = le_u64(&payload[at..at + 8]) ^ bit;
            payload[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        // The count field.
        3 => {
            let c = match rng.below(4) {
                0 => 0,
                1 => (count as u32).wrapping_add(1),
                2 => (count as u32).wrapping_sub(1),
                _ => rng.interesting_u64() as u32,
            };
            payload[0..4].copy_from_slice(&c.to_le_bytes());
        }
        // Many zero pages at once (up to the batch limit and one over).
        4 => {
            let n = *rng.pick(&[1usize, 2, 511, 8191, 8192, 8193]).unwrap_or(&1);
            let mut v = Vec::with_capacity(8 + n * 8);
            v.extend_from_slice(&(n as u32).to_le_bytes());
            v.extend_from_slice(&0u32.to_le_bytes());
            let base = edge_gpa(rng, ranges);
            for i in 0..n as u64 {
                let gpa = base.wrapping_add(i * PAGE_SIZE as u64) & !0xfff;
                v.extend_from_slice(&(gpa | 1).to_le_bytes());
            }
            *payload = v;
        }
        // The reserved field.
        5 => payload[4] = payload[4].wrapping_add(1),
        // A data page dropped or added (length no longer matches the entries).
        _ => {
            if rng.chance(1, 2) && payload.len() >= PAGE_SIZE {
                let l = payload.len() - PAGE_SIZE;
                payload.truncate(l);
            } else {
                payload.extend(std::iter::repeat_n(0xa5, PAGE_SIZE));
            }
        }
    }
}

/// Replaces one node of a CBOR value tree; returns false if there was nothing to do.
pub fn mutate_value(rng: &mut Rng, v: &mut Value, depth: usize) -> bool {
    let descend = rng.chance(3, 4) && depth < 32;
    match v {
        Value::Array(items) if descend && !items.is_empty() => {
            let i = rng.below(items.len());
            return mutate_value(rng, &mut items[i], depth + 1);
        }
        Value::Map(items) if descend && !items.is_empty() => {
            let i = rng.below(items.len());
            if rng.chance(1, 8) {
                // Rename a key (an unknown field, or a missing one).
                items[i].0 = Value::Text(format!("x{}", rng.below(100)));
                return true;
            }
            return mutate_value(rng, &mut items[i].1, depth + 1);
        }
        Value::Tag(_, inner) if descend => return mutate_value(rng, inner, depth + 1),
        _ => {}
    }
    match v {
        Value::Array(items) => match rng.below(3) {
            0 if !items.is_empty() => {
                let n = rng.below(items.len());
                items.truncate(n);
            }
            1 if !items.is_empty() => {
                let i = rng.below(items.len());
                let dup = items[i].clone();
                let times = *rng.pick(&[1usize, 2, 63, 64, 65, 1000]).unwrap_or(&1);
                items.extend(std::iter::repeat_n(dup, times));
            }
            _ => items.push(Value::Integer(rng.interesting_u64().into())),
        },
        Value::Map(items) => {
            if !items.is_empty() && rng.chance(1, 2) {
                let i = rng.below(items.len());
                items.remove(i);
            } else {
                items.push((Value::Text("extra".into()), Value::Bool(true)));
            }
        }
        Value::Integer(_) | Value::Float(_) => {
            let x = rng.interesting_u64();
            *v = match rng.below(6) {
                0 => Value::Integer((-(x as i64 & 0xffff)).into()),
                1 => Value::Float(f64::from_bits(x)),
                2 => Value::Text("1".into()),
                _ => Value::Integer(x.into()),
            };
        }
        Value::Bool(b) => *b = !*b,
        Value::Text(t) => {
            *t = match rng.below(4) {
                0 => String::new(),
                1 => "x".repeat(1 + rng.below(70_000)),
                2 => "com2".into(),
                _ => "\u{0}\u{fffd}".into(),
            };
        }
        Value::Bytes(b) => {
            if rng.chance(1, 2) {
                let n = rng.below(b.len() + 1);
                b.truncate(n);
            } else {
                b.extend(std::iter::repeat_n(0xff, 1 + rng.below(4096)));
            }
        }
        Value::Null => *v = Value::Integer(0.into()),
        _ => return false,
    }
    true
}

fn mutate_cbor(rng: &mut Rng, payload: &mut Vec<u8>) {
    let Ok(mut value) = ciborium::from_reader::<Value, _>(&payload[..]) else {
        mutate_bytes(rng, payload, &[]);
        return;
    };
    let rounds = 1 + rng.below(3);
    for _ in 0..rounds {
        mutate_value(rng, &mut value, 0);
    }
    let mut out = Vec::new();
    if ciborium::into_writer(&value, &mut out).is_ok() {
        *payload = out;
    }
}

fn is_cbor(id: u32) -> bool {
    SectionId::from_u32(id).is_cbor()
}

/// The structure-aware stream mutator.
pub fn mutate_stream(rng: &mut Rng, base: &[u8], pool: &[Vec<u8>]) -> Vec<u8> {
    let mut s = RawStream::split(base);
    let ranges = s.ram_ranges();
    let mut fix = rng.chance(17, 20);
    let mut keep_length = None;
    let rounds = 1 + rng.below(3);
    for _ in 0..rounds {
        let n = s.sections.len();
        match rng.below(16) {
            // Raw bytes anywhere; checksums left broken.
            0 => {
                let mut bytes = s.assemble(fix, None);
                mutate_bytes(rng, &mut bytes, pool);
                return bytes;
            }
            // Truncation at a random point.
            1 => {
                let bytes = s.assemble(fix, None);
                let at = rng.below(bytes.len() + 1);
                return bytes[..at].to_vec();
            }
            // Preamble fields.
            2 if s.preamble.len() >= PREAMBLE_LEN => {
                let at = *rng.pick(&[8usize, 12, 16, 18, 24]).unwrap_or(&8);
                if at < s.preamble.len() {
                    s.preamble[at] = rng.next_u64() as u8;
                }
            }
            // Header fields of one section.
            3 | 4 if n > 0 => {
                let i = rng.below(n);
                let sec = &mut s.sections[i];
                match rng.below(5) {
                    0 => {
                        sec.id = *rng
                            .pick(&[0u32, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0x8000_0000, u32::MAX])
                            .unwrap_or(&0)
                    }
                    1 => sec.flags ^= 1 << rng.below(16),
                    2 => sec.version = *rng.pick(&[0u16, 2, u16::MAX]).unwrap_or(&0),
                    3 => sec.reserved = 1,
                    _ => {
                        sec.length = match rng.below(4) {
                            0 => sec.length.wrapping_add(1),
                            1 => sec.length.wrapping_sub(1),
                            2 => u64::MAX,
                            _ => rng.interesting_u64(),
                        };
                        keep_length = Some(i);
                    }
                }
            }
            // Payload of a RAM section.
            5..=7 => {
                let rams: Vec<usize> = (0..n)
                    .filter(|&i| s.sections[i].id == SectionId::RamPages.as_u32())
                    .collect();
                if let Some(&i) = rng.pick(&rams) {
                    mutate_ram(rng, &mut s.sections[i].payload, &ranges);
                }
            }
            // Payload of a CBOR section (the Shape most often).
            8..=10 => {
                let cbor: Vec<usize> = (0..n).filter(|&i| is_cbor(s.sections[i].id)).collect();
                let shape = (0..n).find(|&i| s.sections[i].id == SectionId::Shape.as_u32());
                let pick = if rng.chance(1, 2) {
                    shape
                } else {
                    rng.pick(&cbor).copied()
                };
                if let Some(i) = pick {
                    mutate_cbor(rng, &mut s.sections[i].payload);
                }
            }
            // Bytes of one payload.
            11 if n > 0 => {
                let i = rng.below(n);
                mutate_bytes(rng, &mut s.sections[i].payload, pool);
            }
            // Drop, duplicate or move a section.
            12 if n > 0 => {
                let i = rng.below(n);
                match rng.below(3) {
                    0 => {
                        s.sections.remove(i);
                    }
                    1 => {
                        let dup = s.sections[i].clone();
                        s.sections.insert(rng.below(n + 1), dup);
                    }
                    _ => {
                        let j = rng.below(n);
                        s.sections.swap(i, j);
                    }
                }
            }
            // An unknown section, optional or critical (ids after the last one
            // ferry-format knows, Join = 9).
            13 => {
                let critical = rng.chance(1, 3);
                let payload: Vec<u8> = (0..rng.below(64)).map(|_| rng.next_u64() as u8).collect();
                s.sections.insert(
                    rng.below(n + 1),
                    RawSection {
                        id: 10 + rng.below(1000) as u32,
                        version: 1,
                        flags: u16::from(critical),
                        length: payload.len() as u64,
                        crc: 0,
                        reserved: 0,
                        payload,
                    },
                );
            }
            // A section from another input.
            14 => {
                if let Some(other) = rng.pick(pool) {
                    let o = RawStream::split(other);
                    if let Some(sec) = rng.pick(&o.sections) {
                        let sec = sec.clone();
                        s.sections.insert(rng.below(n + 1), sec);
                    }
                }
            }
            // Bytes after End.
            _ => s
                .tail
                .extend((0..1 + rng.below(32)).map(|_| rng.next_u64() as u8)),
        }
        if rng.chance(1, 10) {
            fix = !fix;
        }
    }
    s.assemble(fix, keep_length)
}

/// Reads a whole stream with the format crate alone (no KVM): every section,
/// every RAM batch, every CBOR payload as a generic value.
pub fn read_format_only(input: &[u8]) -> Result<u64, String> {
    let limits = Limits::default();
    let (mut r, _) = StreamReader::new(input, limits).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut pages = 0u64;
    loop {
        let h = r.next_section(&mut buf).map_err(|e| e.to_string())?;
        if h.id == SectionId::RamPages {
            let batch = RamBatch::parse_with_limits(&buf, &limits).map_err(|e| e.to_string())?;
            pages += batch.iter().count() as u64;
        } else if h.id.is_cbor() {
            ferry_format::decode_cbor::<Value>(h.id, &buf, &limits).map_err(|e| e.to_string())?;
        }
        if h.is_end() {
            return Ok(pages);
        }
    }
}

/// A writer whose bytes stay readable after the receiver dropped it.
#[derive(Debug, Clone, Default)]
pub struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The replies a return path carries (it has no End: the receiver never closes it).
pub fn replies(bytes: &[u8]) -> Result<Vec<Reply>, String> {
    let limits = Limits::default();
    let (mut r, _) = StreamReader::new(bytes, limits).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut out = Vec::new();
    while (r.bytes_read() as usize) < bytes.len() {
        let h = r.next_section(&mut buf).map_err(|e| e.to_string())?;
        if h.id != SectionId::Reply {
            return Err(format!("section {} on the return path", h.id));
        }
        out.push(ferry_format::decode_cbor(h.id, &buf, &limits).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Whether the KVM part of the stream targets can run; under `CI=true` a
/// missing /dev/kvm is a failure, never a silent skip.
pub fn require_kvm_or_skip() -> bool {
    if kvm_usable() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "/dev/kvm is not usable: the receiver and checkpoint fuzz targets need KVM"
    );
    eprintln!("/dev/kvm is not usable: fuzzing the stream format only (no VM is built)");
    false
}

/// The migration-stream receiver, with a return path whose replies are checked.
pub fn receiver_target(kvm: bool) -> Target {
    Target {
        name: "receiver",
        exec: Arc::new(move |input: &[u8]| exec_receiver(input, kvm)),
        mutate: Box::new(mutate_stream),
        time_bound: std::time::Duration::from_secs(20),
        mem_bound: 768 << 20,
    }
}

/// The checkpoint loader.
pub fn checkpoint_target(kvm: bool) -> Target {
    Target {
        name: "checkpoint",
        exec: Arc::new(move |input: &[u8]| exec_checkpoint(input, kvm)),
        mutate: Box::new(mutate_stream),
        time_bound: std::time::Duration::from_secs(20),
        mem_bound: 768 << 20,
    }
}

fn format_class(input: &[u8]) -> Outcome {
    match read_format_only(input) {
        Ok(_) => Outcome::Handled("format: complete".into()),
        Err(e) => Outcome::Handled(class_of("format", &e, 6)),
    }
}

fn exec_receiver(input: &[u8], kvm: bool) -> Outcome {
    let format = format_class(input);
    if !kvm {
        return format;
    }
    match receive_checked(input, Vec::new()) {
        Err(violation) => Outcome::Violation(violation),
        Ok(Ok(_)) => Outcome::Handled("receiver: loaded".into()),
        Ok(Err(message)) => Outcome::Handled(class_of("receiver", &message, 14)),
    }
}

/// Runs the migration receiver on `input` (no autostart) with `virtio` as
/// this host's devices, and checks the return path: it must be a valid stream
/// of replies ending with the one that matches the result (the source acts on
/// it), and a loaded VM must not run. `Ok(Ok(vm))`: loaded; `Ok(Err(message))`:
/// refused with `message`; `Err`: a broken property.
pub fn receive_checked(
    input: &[u8],
    virtio: Vec<VirtioSpec>,
) -> Result<Result<ferry_vmm::Vm, String>, String> {
    let out = SharedBuf::default();
    let opts = RestoreOptions {
        backing: Backing::Anonymous,
        serial: SinkSpec::Null,
        expect_mem_bytes: None,
        expect_vcpus: None,
        autostart: false,
        virtio,
        ide: Vec::new(),
        fw_cfg: None,
        firmware: None,
        rtc: None,
        on_postcopy: None,
    };
    let result = migration::receive(
        Box::new(Cursor::new(input.to_vec())),
        Some(Box::new(out.clone())),
        &opts,
    );
    let sent = out.0.lock().map(|b| b.clone()).unwrap_or_default();
    let replies = replies(&sent).map_err(|e| format!("the return path is malformed: {e}"))?;
    let last = replies.last().cloned();
    match result {
        Ok(vm) => {
            if vm.is_running() {
                return Err("the VM runs without autostart".into());
            }
            if last != Some(Reply::Loaded { running: false }) {
                return Err(format!("loaded, but the last reply is {last:?}"));
            }
            if replies.first() != Some(&Reply::Ready) {
                return Err(format!("loaded without Ready first: {replies:?}"));
            }
            Ok(Ok(vm))
        }
        Err(e) => {
            let message = e.to_string();
            match last {
                Some(Reply::Error { message: m }) if m == message => Ok(Err(message)),
                other => Err(format!(
                    "failed with {message:?}, but the last reply is {other:?}"
                )),
            }
        }
    }
}

/// The error `persist::restore` gives for `input`, `None` if it loads.
pub fn restore_error(input: &[u8]) -> Option<String> {
    let opts = RestoreOptions {
        backing: Backing::Anonymous,
        serial: SinkSpec::Null,
        expect_mem_bytes: None,
        expect_vcpus: None,
        autostart: false,
        virtio: Vec::new(),
        ide: Vec::new(),
        fw_cfg: None,
        firmware: None,
        rtc: None,
        on_postcopy: None,
    };
    persist::restore(Cursor::new(input.to_vec()), &opts)
        .err()
        .map(|e| e.to_string())
}

fn exec_checkpoint(input: &[u8], kvm: bool) -> Outcome {
    let format = format_class(input);
    if !kvm {
        return format;
    }
    let opts = RestoreOptions {
        backing: Backing::Anonymous,
        serial: SinkSpec::Null,
        expect_mem_bytes: None,
        expect_vcpus: None,
        autostart: false,
        virtio: Vec::new(),
        ide: Vec::new(),
        fw_cfg: None,
        firmware: None,
        rtc: None,
        on_postcopy: None,
    };
    match persist::restore(Cursor::new(input.to_vec()), &opts) {
        Ok(vm) if vm.is_running() => Outcome::Violation("a restored VM runs before resume".into()),
        Ok(_) => Outcome::Handled("checkpoint: restored".into()),
        Err(e) => Outcome::Handled(class_of("checkpoint", &e.to_string(), 14)),
    }
}

/// Seeds written with the real writers from a small real VM (8 MiB, 2 vCPUs,
/// never booted, a few pages written): a checkpoint (`persist::save`) and
/// a migration stream as the source sends it (Shape with digest, RAM batches
/// with zero and data pages, the state sections `persist::write_state`
/// writes at switch-over, Digest, End).
pub fn generate_seeds() -> Result<(Vec<u8>, Vec<u8>), String> {
    use ferry_vmm::{Vm, VmConfig};
    let vm = Vm::create(VmConfig {
        mem_bytes: 8 << 20,
        vcpus: 2,
        backing: Backing::Anonymous,
        serial: SinkSpec::Null,
        cpu: ferry_vmm::cpu::model::CpuModel::parse("qemu64").expect("qemu64 is a model"),
        virtio: Vec::new(),
        ide: Vec::new(),
        fw_cfg: None,
        firmware: None,
        rtc: None,
    })
    .map_err(|e| format!("cannot create the seed VM: {e}"))?;
    let ram = vm.ram();
    for (i, gpa) in [0x1000u64, 0x9_f000, 0x10_0000, 0x7f_f000]
        .into_iter()
        .enumerate()
    {
        let page = [0x40 + i as u8; PAGE_SIZE];
        ram.write(gpa, &page).map_err(|e| e.to_string())?;
    }
    let (ckpt, _) = persist::save(&vm, Vec::new()).map_err(|e| e.to_string())?;

    let mut w = StreamWriter::new(Vec::new(), &persist::producer()).map_err(|e| e.to_string())?;
    w.write_cbor(
        SectionId::Shape,
        SectionId::Shape.current_version(),
        &Handshake {
            shape: vm.shape(),
            digest: true,
            streams: 1,
            session: 0,
            postcopy: false,
        },
    )
    .map_err(|e| e.to_string())?;
    let mut batch = ferry_format::RamBatchBuilder::with_max_pages(64);
    let mut page = [0u8; PAGE_SIZE];
    for gpa in (0..16u64).map(|i| i * PAGE_SIZE as u64).chain([0x7f_f000]) {
        ram.read(gpa, &mut page).map_err(|e| e.to_string())?;
        if page.iter().all(|&b| b == 0) {
            batch.push_zero(gpa).map_err(|e| e.to_string())?;
        } else {
            batch.push_data(gpa, &page).map_err(|e| e.to_string())?;
        }
    }
    w.write_ram_batch(&batch).map_err(|e| e.to_string())?;
    batch.clear();
    for gpa in [0x9_f000u64, 0x10_0000] {
        ram.read(gpa, &mut page).map_err(|e| e.to_string())?;
        batch.push_data(gpa, &page).map_err(|e| e.to_string())?;
    }
    w.write_ram_batch(&batch).map_err(|e| e.to_string())?;
    persist::write_state(&vm, &mut w).map_err(|e| e.to_string())?;
    // The digest the source computes: CRC-32 of every MiB of RAM, in order.
    let mut digest = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    for (base, size) in ram.ranges() {
        let mut gpa = base;
        while gpa < base + size {
            let n = (1u64 << 20).min(base + size - gpa) as usize;
            ram.read(gpa, &mut chunk[..n]).map_err(|e| e.to_string())?;
            digest.push(crc32fast::hash(&chunk[..n]));
            gpa += n as u64;
        }
    }
    w.write_cbor(SectionId::Digest, 1, &digest)
        .map_err(|e| e.to_string())?;
    let stream = w.finish().map_err(|e| e.to_string())?;
    Ok((ckpt, stream))
}

/// `input` with its Shape section decoded, changed by `f` and re-encoded
/// (lengths, CRCs and End counts fixed): for hand-made regression seeds.
pub fn with_shape(input: &[u8], f: impl FnOnce(&mut Handshake)) -> Option<Vec<u8>> {
    let mut raw = RawStream::split(input);
    let sec = raw
        .sections
        .iter_mut()
        .find(|s| s.id == SectionId::Shape.as_u32())?;
    let mut hs: Handshake = ciborium::from_reader(&sec.payload[..]).ok()?;
    f(&mut hs);
    let mut payload = Vec::new();
    ciborium::into_writer(&hs, &mut payload).ok()?;
    sec.payload = payload;
    Some(raw.assemble(true, None))
}
