//! The destination's multi-stream path (QEMU's multifd): a handshake that
//! proposes N page streams, then extra connections that open with a Join
//! section (session token, index, count) and carry the pages of their
//! stripes, all arriving on the listener the main connection came in on
//! (`migration::receive_streams` with `ExtraStreams`, as `ferry-vm incoming`
//! and ferry-qemu with multifd run it).
//!
//! An input is a [`Bundle`]: the destination's stream limit and the bytes of
//! every connection, in the order they connect (the first one is the main
//! connection, as for the real destination). The seeds are real: a real
//! source (`migration::migrate` of a small VM, 2 and 4 streams) recorded
//! through a proxy on its way to a real destination. Mutations are
//! structural: the Join's token, index and count; the handshake's proposal
//! and token; the destination's limit; connections duplicated, dropped,
//! reordered, truncated (mid-Join, right after it, before End), sent late;
//! RAM sections moved to another connection (pages on the wrong stream);
//! strangers added; and the single-stream mutator of [`crate::stream`] on
//! one connection.
//!
//! Each input runs against the real engine code on a real TCP listener on
//! loopback, every connection written by its own thread and closed after its
//! bytes. A destination still waiting for connections that will never come
//! (its own limit is 30 s) is ended by shutting its listener down, which it
//! must notice; after that it must return within [`SETTLE`]: a hang is a
//! failure. Properties checked besides "no panic, no hang":
//!
//! * an input that cannot load (the main stream incomplete or with pages of
//!   another stripe, a stream index with no connection presenting the right
//!   token, index and count and carrying only its own stripes to End) is
//!   refused with an error;
//! * a loaded VM is paused (no autostart) and its RAM holds exactly the pages
//!   the streams carried, for every stream whose connection is known;
//! * the main return path is a valid stream of replies: `Accepted`/`Ready`
//!   first; after a load, `Loaded` last and no `Error`; after a failure, an
//!   `Error` and no `Loaded`.
//!
//! This target found an engine bug (fixed): see [`is_known_late_join_bug`].

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ciborium::Value;
use ferry_format::{Limits, RamBatch, SectionId, StreamReader, PAGE_SIZE};
use ferry_kvm::Backing;
use ferry_vmm::devices::serial::SinkSpec;
use ferry_vmm::migration::{
    self, Channel, ExtraStreams, Listener, MigrationControl, MigrationParams, MigrationUri, Reply,
    MAX_STREAMS,
};
use ferry_vmm::persist::{Handshake, RestoreOptions, StreamJoin};

use crate::stream::{mutate_stream, replies, RawSection, RawStream};
use crate::{class_of, mutate_bytes, Outcome, Rng, Target};

/// The first bytes of an encoded [`Bundle`].
pub const MAGIC: &[u8; 8] = b"FRYMULT1";
/// Connection flag: write only after the main connection's bytes are written,
/// and after a further [`delay_of`] the flags give.
pub const LATE: u32 = 1;

/// The pause a [`LATE`] connection makes after the main connection's bytes
/// are written: bits 8 to 15 of its flags, in units of 100 µs (0 to 25.5 ms,
/// about the time a destination takes to load a seed).
pub fn delay_of(flags: u32) -> Duration {
    Duration::from_micros(100 * u64::from((flags >> 8) & 0xff))
}
/// Most connections one input opens: the most streams, the strangers the
/// destination reads, and a few it closes unread.
pub const MAX_CONNS: usize = MAX_STREAMS as usize + 12;
/// The stripe of guest memory that travels on one stream: 256 KiB (the
/// engine's `STRIPE_SHIFT`; the valid seeds stop loading if it changes).
const STRIPE_SHIFT: u32 = 18;
/// Extra connections beyond the agreed streams that the destination reads
/// before closing further ones unread (the engine's `MAX_STRANGERS`).
const MAX_STRANGERS: usize = 8;
/// How long a destination that can load gets before its listener is shut.
const GRACE_LOADABLE: Duration = Duration::from_secs(3);
/// The same for an input that cannot load (it may wait for joins that never come).
const GRACE_DOOMED: Duration = Duration::from_millis(300);
/// How long the destination gets to return once every connection and its
/// listener are closed.
pub const SETTLE: Duration = Duration::from_secs(10);
/// Longest a [`LATE`] connection waits for the main one to be written (its
/// bytes after End may fill the socket buffers and never be read).
const LATE_WAIT: Duration = Duration::from_secs(1);
/// A return path the destination reset: its replies are unknown (see
/// `read_replies`).
const RESET: &str = "reset by the destination";
/// How long reading back all the return paths may take.
const REPLIES_WAIT: Duration = Duration::from_secs(3);
/// Guest RAM up to which a loaded VM is checked page by page (beyond, only
/// the pages the streams carried).
const FULL_CHECK_RAM: u64 = 64 << 20;

/// One connection of an input: flags and the bytes it sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conn {
    pub flags: u32,
    pub bytes: Vec<u8>,
}

/// An input: the destination's stream limit, then the connections in the
/// order they connect (the first is the main one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub max_streams: u32,
    pub conns: Vec<Conn>,
}

fn le_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(..4)?.try_into().ok()?))
}

impl Bundle {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&self.max_streams.to_le_bytes());
        out.extend_from_slice(&(self.conns.len() as u32).to_le_bytes());
        for c in &self.conns {
            out.extend_from_slice(&c.flags.to_le_bytes());
            out.extend_from_slice(&(c.bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(&c.bytes);
        }
        out
    }

    /// Leniently: bytes without the magic are one main connection to a
    /// destination taking 4 streams; counts and lengths past the end are cut
    /// to what is there; at most [`MAX_CONNS`] connections.
    pub fn parse(input: &[u8]) -> Self {
        let Some(rest) = input.strip_prefix(MAGIC.as_slice()) else {
            return Self {
                max_streams: 4,
                conns: vec![Conn {
                    flags: 0,
                    bytes: input.to_vec(),
                }],
            };
        };
        let max_streams = le_u32(rest).unwrap_or(4);
        let count = le_u32(rest.get(4..).unwrap_or_default()).unwrap_or(0) as usize;
        let mut at = rest.get(8..).unwrap_or_default();
        let mut conns = Vec::new();
        while conns.len() < count.min(MAX_CONNS) && at.len() >= 8 {
            let flags = le_u32(at).unwrap_or(0);
            let len = le_u32(&at[4..]).unwrap_or(0) as usize;
            let body = &at[8..];
            let n = len.min(body.len());
            conns.push(Conn {
                flags,
                bytes: body[..n].to_vec(),
            });
            at = &body[n..];
        }
        Self { max_streams, conns }
    }
}

/// The stream that carries the page at `gpa` with `streams` streams.
pub fn stream_of(gpa: u64, streams: u32) -> u32 {
    if streams <= 1 {
        0
    } else {
        ((gpa >> STRIPE_SHIFT) % u64::from(streams)) as u32
    }
}

/// The pages of a RAM section, in order (`None` data: a zero page).
type Pages = Vec<(u64, Option<Vec<u8>>)>;

/// What a connection's bytes are, read as the destination would.
#[derive(Debug, Default)]
struct Parsed {
    /// The first section's id, if the preamble and it read.
    first: Option<SectionId>,
    /// Its payload.
    first_payload: Vec<u8>,
    /// Every RAM page after the first section, in order.
    pages: Pages,
    /// Sections after the first that are neither RAM nor End.
    other_sections: usize,
    /// Everything read to End without an error.
    complete: bool,
}

fn parse_conn(bytes: &[u8]) -> Parsed {
    let limits = Limits::default();
    let mut p = Parsed::default();
    let Ok((mut r, _)) = StreamReader::new(bytes, limits) else {
        return p;
    };
    let mut buf = Vec::new();
    let Ok(h) = r.next_section(&mut buf) else {
        return p;
    };
    p.first = Some(h.id);
    p.first_payload = buf.clone();
    if h.is_end() {
        p.complete = true;
        return p;
    }
    loop {
        match r.next_section(&mut buf) {
            Ok(h) if h.is_end() => {
                p.complete = true;
                return p;
            }
            Ok(h) if h.id == SectionId::RamPages => {
                let Ok(batch) = RamBatch::parse_with_limits(&buf, &limits) else {
                    return p;
                };
                p.pages
                    .extend(batch.iter().map(|pg| (pg.gpa, pg.data.map(<[u8]>::to_vec))));
            }
            Ok(_) => p.other_sections += 1,
            Err(_) => return p,
        }
    }
}

/// What the input must lead to, worked out from its bytes alone.
#[derive(Debug, Default)]
pub struct Expect {
    /// Why the input cannot load, if it cannot.
    pub cannot_load: Option<String>,
    /// The agreed number of streams (1 if the handshake does not decode).
    pub streams: u32,
    /// Per stream: the pages its one possible connection carries, when there
    /// is exactly one (the main stream for 0); `None` when it is not known.
    known: Vec<Option<Pages>>,
}

impl Expect {
    pub fn of(b: &Bundle) -> Self {
        let mut e = Self {
            streams: 1,
            ..Self::default()
        };
        let Some(main) = b.conns.first() else {
            e.cannot_load = Some("there is no connection".into());
            return e;
        };
        let main = parse_conn(&main.bytes);
        let limits = Limits::default();
        let hs = (main.first == Some(SectionId::Shape))
            .then(|| {
                ferry_format::decode_cbor::<Handshake>(
                    SectionId::Shape,
                    &main.first_payload,
                    &limits,
                )
                .ok()
            })
            .flatten();
        let Some(hs) = hs else {
            e.cannot_load = Some("the main connection does not open with a valid Shape".into());
            return e;
        };
        let proposed = hs.streams.max(1);
        let limit = b.max_streams.clamp(1, MAX_STREAMS);
        let n = proposed.min(limit);
        e.streams = n;
        let mut why = Vec::new();
        if !main.complete {
            why.push("the main stream does not read to its End".to_string());
        }
        if proposed > 1 && hs.session == 0 {
            why.push("the handshake proposes streams without a token".into());
        }
        if let Some((gpa, _)) = main.pages.iter().find(|(g, _)| stream_of(*g, n) != 0) {
            why.push(format!(
                "the main stream carries the page at {gpa:#x} of another stream"
            ));
        }
        e.known = vec![None; n as usize];
        e.known[0] = Some(main.pages.clone());
        // Only this many connections after the main one are ever read.
        let read = (n as usize - 1) + MAX_STRANGERS;
        let extras: Vec<(Parsed, Option<StreamJoin>)> = if n > 1 {
            b.conns
                .iter()
                .skip(1)
                .take(read)
                .map(|c| {
                    let p = parse_conn(&c.bytes);
                    let join = (p.first == Some(SectionId::Join))
                        .then(|| {
                            ferry_format::decode_cbor::<StreamJoin>(
                                SectionId::Join,
                                &p.first_payload,
                                &limits,
                            )
                            .ok()
                        })
                        .flatten();
                    (p, join)
                })
                .collect()
        } else {
            Vec::new()
        };
        for k in 1..n {
            let candidates: Vec<&Parsed> = extras
                .iter()
                .filter(|(_, j)| {
                    j.as_ref()
                        .is_some_and(|j| j.session == hs.session && j.index == k && j.streams == n)
                })
                .map(|(p, _)| p)
                .collect();
            let good = candidates.iter().any(|p| {
                p.complete
                    && p.other_sections == 0
                    && p.pages.iter().all(|(g, _)| stream_of(*g, n) == k)
            });
            if !good {
                why.push(format!(
                    "no connection joins as stream {k} of {n} and carries its pages to End"
                ));
            }
            if let [only] = candidates.as_slice() {
                e.known[k as usize] = Some(only.pages.clone());
            }
        }
        if !why.is_empty() {
            e.cannot_load = Some(why.join("; "));
        }
        e
    }
}

/// What one run of an input did.
#[derive(Debug)]
pub struct Run {
    /// The destination's result: its error text if it failed.
    pub result: Result<(), String>,
    /// The listener had to be shut for the destination to stop waiting.
    pub listener_shut: bool,
    /// The replies on each connection's return path, as read back.
    pub replies: Vec<Result<Vec<Reply>, String>>,
    /// Broken properties found on the destination side (RAM, run state).
    pub violations: Vec<String>,
}

/// Opens `b`'s connections to a fresh destination in order, writes each on
/// its own thread, and waits for the destination (see the module docs).
pub fn run_bundle(b: &Bundle, expect: &Expect) -> Run {
    let tcp = match TcpListener::bind(("127.0.0.1", 0)) {
        Ok(t) => t,
        Err(e) => return harness_error(format!("cannot listen on loopback: {e}")),
    };
    let (addr, shut) = match (tcp.local_addr(), tcp.try_clone()) {
        (Ok(a), Ok(s)) => (a, s),
        (Err(e), _) | (_, Err(e)) => return harness_error(format!("listener: {e}")),
    };
    let listener = match Listener::from_tcp(tcp) {
        Ok(l) => l,
        Err(e) => return harness_error(e.to_string()),
    };
    let (tx, rx) = mpsc::channel();
    let max_streams = b.max_streams;
    let known = expect.known.clone();
    let streams = expect.streams;
    let spawned = std::thread::Builder::new()
        .name("fuzz-destination".into())
        .spawn(move || {
            let _ = tx.send(destination(&listener, max_streams, streams, &known));
        });
    if let Err(e) = spawned {
        return harness_error(format!("cannot start the destination thread: {e}"));
    }
    let conns: Vec<Conn> = if b.conns.is_empty() {
        // The destination waits for a main connection: give it an empty one.
        vec![Conn {
            flags: 0,
            bytes: Vec::new(),
        }]
    } else {
        b.conns.iter().take(MAX_CONNS).cloned().collect()
    };
    let (writers, readers) = match connect_and_write(addr, conns) {
        Ok(w) => w,
        Err(e) => {
            let _ = shut.shutdown_listener();
            return harness_error(e);
        }
    };
    let grace = if expect.cannot_load.is_some() {
        GRACE_DOOMED
    } else {
        GRACE_LOADABLE
    };
    let mut listener_shut = false;
    let outcome = match rx.recv_timeout(grace) {
        Ok(o) => Some(o),
        Err(_) => {
            listener_shut = true;
            let _ = shut.shutdown_listener();
            rx.recv_timeout(SETTLE).ok()
        }
    };
    // Connections the destination never accepted are reset, so their
    // writers stop (the harness holds the listener too).
    let _ = shut.shutdown_listener();
    drop(shut);
    let Some((result, mut violations)) = outcome else {
        return Run {
            result: Err("hang".into()),
            listener_shut,
            replies: Vec::new(),
            violations: vec![format!(
                "the destination did not return within {SETTLE:?} after every connection \
                 and its listener were closed (a hang)"
            )],
        };
    };
    let deadline = std::time::Instant::now() + REPLIES_WAIT;
    let replies = readers
        .into_iter()
        .map(|r| read_replies(r.as_ref(), deadline))
        .collect();
    for w in writers {
        if w.join().is_err() {
            violations.push("a writer thread panicked".into());
        }
    }
    Run {
        result,
        listener_shut,
        replies,
        violations,
    }
}

fn harness_error(e: String) -> Run {
    Run {
        result: Err(format!("harness: {e}")),
        listener_shut: false,
        replies: Vec::new(),
        violations: Vec::new(),
    }
}

/// Shutting a TCP listener down makes a pending or later `accept` fail
/// (EINVAL): the destination's acceptor stops waiting.
trait ShutListener {
    fn shutdown_listener(&self) -> std::io::Result<()>;
}

impl ShutListener for TcpListener {
    fn shutdown_listener(&self) -> std::io::Result<()> {
        // A TcpListener has no shutdown of its own: a stream on the same
        // descriptor does the syscall.
        let s = TcpStream::from(std::os::fd::OwnedFd::from(self.try_clone()?));
        s.shutdown(Shutdown::Both)
    }
}

type Writers = Vec<std::thread::JoinHandle<()>>;

/// Connects every connection in order (so the destination accepts them in
/// that order), then writes each on its own thread and closes its sending
/// side. Returns the writers and a reading clone of each connection.
fn connect_and_write(
    addr: SocketAddr,
    conns: Vec<Conn>,
) -> Result<(Writers, Vec<Option<TcpStream>>), String> {
    let mut socks = Vec::new();
    for (i, _) in conns.iter().enumerate() {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connection {i}: {e}"))?;
        socks.push(s);
    }
    let main_written = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for (i, (c, s)) in conns.into_iter().zip(socks).enumerate() {
        readers.push(s.try_clone().ok());
        let gate = Arc::clone(&main_written);
        let w = std::thread::Builder::new()
            .name(format!("fuzz-conn-{i}"))
            .spawn(move || {
                let (lock, cv) = &*gate;
                if i > 0 && c.flags & LATE != 0 {
                    if let Ok(mut done) = lock.lock() {
                        while !*done {
                            done = match cv.wait_timeout(done, LATE_WAIT) {
                                Ok((d, t)) if !t.timed_out() => d,
                                _ => break,
                            };
                        }
                    }
                    std::thread::sleep(delay_of(c.flags));
                }
                let mut s = s;
                // The destination may close a connection first: not an error here.
                let _ = s.write_all(&c.bytes);
                let _ = s.shutdown(Shutdown::Write);
                if i == 0 {
                    if let Ok(mut done) = lock.lock() {
                        *done = true;
                        cv.notify_all();
                    }
                }
            })
            .map_err(|e| format!("cannot start a writer thread: {e}"))?;
        writers.push(w);
    }
    Ok((writers, readers))
}

/// The replies a connection's return path carried, read to its end.
fn read_replies(s: Option<&TcpStream>, deadline: std::time::Instant) -> Result<Vec<Reply>, String> {
    let Some(s) = s else {
        return Err("no reading side".into());
    };
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let mut r = s;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            // The destination closed with bytes of ours unread (it stopped
            // reading at the error): TCP resets, and the kernel drops what it
            // had received for us, replies included. What was said is unknown.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                let _ = s.shutdown(Shutdown::Both);
                return Err(RESET.into());
            }
            Err(_) => break,
        }
    }
    let _ = s.shutdown(Shutdown::Both);
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    replies(&bytes)
}

/// The destination: accepts the main connection, then `receive_streams`
/// with `max_streams`; on a load, checks the VM against `known`.
fn destination(
    listener: &Listener,
    max_streams: u32,
    streams: u32,
    known: &[Option<Pages>],
) -> (Result<(), String>, Vec<String>) {
    let ch = match listener.accept_next() {
        Ok(c) => c,
        Err(e) => return (Err(format!("accept: {e}")), Vec::new()),
    };
    let main_breaker = ch.breaker().ok();
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
    let extra = ExtraStreams {
        listener,
        max_streams,
        main_breaker,
    };
    match migration::receive_streams(ch.reader, Some(ch.writer), Some(extra), &opts) {
        Ok(vm) => {
            let mut v = Vec::new();
            if vm.is_running() {
                v.push("the VM runs without autostart".into());
            }
            v.extend(check_ram(&vm, streams, known));
            (Ok(()), v)
        }
        Err(e) => (Err(e.to_string()), Vec::new()),
    }
}

/// Every page of a known stream holds what that stream carried last (zero if
/// it carried nothing for it).
fn check_ram(vm: &ferry_vmm::Vm, streams: u32, known: &[Option<Pages>]) -> Vec<String> {
    let mut want: BTreeMap<u64, Option<&[u8]>> = BTreeMap::new();
    for pages in known.iter().flatten() {
        for (gpa, data) in pages {
            want.insert(*gpa, data.as_deref());
        }
    }
    let ram = vm.ram();
    let mut page = vec![0u8; PAGE_SIZE];
    let mut bad = Vec::new();
    if ram.total_bytes() > FULL_CHECK_RAM {
        for (&gpa, data) in &want {
            if ram.read(gpa, &mut page).is_ok()
                && known
                    .get(stream_of(gpa, streams) as usize)
                    .is_some_and(Option::is_some)
                && data.map_or(page.iter().any(|&b| b != 0), |d| page != d)
            {
                bad.push(format!(
                    "after the load, the page at {gpa:#x} is not what its stream carried"
                ));
            }
        }
        return bad;
    }
    for (base, size) in ram.ranges() {
        let mut gpa = base;
        while gpa < base + size {
            let s = stream_of(gpa, streams) as usize;
            if known.get(s).is_some_and(Option::is_some) {
                if let Err(e) = ram.read(gpa, &mut page) {
                    bad.push(format!("cannot read the page at {gpa:#x}: {e}"));
                    return bad;
                }
                let ok = match want.get(&gpa).copied().flatten() {
                    Some(data) => page == data,
                    None => page.iter().all(|&b| b == 0),
                };
                if !ok {
                    bad.push(format!(
                        "after the load, the page at {gpa:#x} (stream {s} of {streams}) is not \
                         what its stream carried"
                    ));
                    if bad.len() > 3 {
                        return bad;
                    }
                }
            }
            gpa += PAGE_SIZE as u64;
        }
    }
    bad
}

/// The engine bug this target found (fixed: `Incoming::fail` does nothing once
/// the outcome is decided; regression inputs
/// `corpus/streams/regress-streams-*-after-load.bin` and the test
/// `late_bad_join_does_not_fail_a_loaded_migration`): a connection with the
/// right token whose Join was refused only after every stream reached its End
/// failed the migration the destination had already loaded, so the source was
/// told `Error` (and never `Loaded`) while the destination ran the VM: two
/// running copies. Matches that exact symptom: the main return path is
/// `Accepted`, then one join-check `Error`.
pub fn is_known_late_join_bug(replies: &[Reply]) -> bool {
    match replies {
        [Reply::Accepted { .. }, Reply::Error { message }] => {
            message.starts_with("page stream ")
                && ["joined twice", "there is no such stream", "were agreed"]
                    .iter()
                    .any(|m| message.contains(m))
        }
        _ => false,
    }
}

/// Judges a run: the properties of the module docs.
pub fn judge(expect: &Expect, run: &Run) -> Outcome {
    if let Some(v) = run.violations.first() {
        return Outcome::Violation(v.clone());
    }
    // A reset return path tells nothing either way.
    let main_replies = run
        .replies
        .first()
        .filter(|r| !matches!(r, Err(m) if m == RESET));
    match &run.result {
        Ok(()) => {
            if let Some(why) = &expect.cannot_load {
                return Outcome::Violation(format!("loaded, but {why}"));
            }
            match main_replies {
                Some(Ok(r)) => {
                    let first_ok = matches!(r.first(), Some(Reply::Ready | Reply::Accepted { .. }));
                    if !first_ok
                        || r.last() != Some(&Reply::Loaded { running: false })
                        || r.iter().any(|x| matches!(x, Reply::Error { .. }))
                    {
                        return Outcome::Violation(format!(
                            "loaded, but the main return path says {r:?}"
                        ));
                    }
                }
                Some(Err(e)) => {
                    return Outcome::Violation(format!(
                        "loaded, but the main return path is malformed: {e}"
                    ))
                }
                None => return Outcome::Violation("loaded, but no return path was read".into()),
            }
            Outcome::Handled(format!("streams: loaded {}", expect.streams))
        }
        Err(e) if e.starts_with("harness:") => Outcome::Handled(class_of("harness", e, 6)),
        Err(e) => {
            if e.is_empty() {
                return Outcome::Violation("refused with an empty message".into());
            }
            if let Some(Ok(r)) = main_replies {
                if r.iter().any(|x| matches!(x, Reply::Loaded { .. })) {
                    return Outcome::Violation(format!(
                        "failed with {e:?}, but the main return path says {r:?}"
                    ));
                }
                let told = r.iter().any(|x| matches!(x, Reply::Error { .. }));
                if !told && !r.is_empty() {
                    return Outcome::Violation(format!(
                        "failed with {e:?}, but the source was not told: {r:?}"
                    ));
                }
            }
            if let Some(Err(m)) = main_replies {
                return Outcome::Violation(format!(
                    "failed with {e:?}, and the main return path is malformed: {m}"
                ));
            }
            let prefix = if run.listener_shut {
                "streams (listener shut)"
            } else {
                "streams"
            };
            Outcome::Handled(class_of(prefix, e, 14))
        }
    }
}

pub fn exec_streams(input: &[u8]) -> Outcome {
    let b = Bundle::parse(input);
    let expect = Expect::of(&b);
    let run = run_bundle(&b, &expect);
    judge(&expect, &run)
}

/// The multi-stream destination target.
pub fn streams_target() -> Target {
    Target {
        name: "streams",
        exec: Arc::new(exec_streams),
        mutate: Box::new(mutate_bundle),
        time_bound: Duration::from_secs(20),
        mem_bound: 768 << 20,
    }
}

/// The first section's CBOR of `bytes` (a Join or a Shape), changed by `f`.
fn edit_first_cbor(bytes: &[u8], f: impl FnOnce(&mut Value)) -> Option<Vec<u8>> {
    let mut raw = RawStream::split(bytes);
    let sec = raw.sections.first_mut()?;
    let mut v: Value = ciborium::from_reader(&sec.payload[..]).ok()?;
    f(&mut v);
    let mut payload = Vec::new();
    ciborium::into_writer(&v, &mut payload).ok()?;
    sec.payload = payload;
    Some(raw.assemble(true, None))
}

/// Sets field `key` of a CBOR map to `value`.
fn set_field(v: &mut Value, key: &str, value: u64) {
    if let Value::Map(items) = v {
        for (k, x) in items.iter_mut() {
            if k.as_text() == Some(key) {
                *x = Value::Integer(value.into());
                return;
            }
        }
        items.push((Value::Text(key.into()), Value::Integer(value.into())));
    }
}

fn get_field(v: &Value, key: &str) -> Option<u64> {
    if let Value::Map(items) = v {
        for (k, x) in items {
            if k.as_text() == Some(key) {
                return x.as_integer().and_then(|i| u64::try_from(i).ok());
            }
        }
    }
    None
}

/// The session token of the main connection's handshake (0 if it has none).
fn session_of(b: &Bundle) -> u64 {
    let Some(main) = b.conns.first() else {
        return 0;
    };
    let raw = RawStream::split(&main.bytes);
    raw.sections
        .first()
        .and_then(|s| ciborium::from_reader::<Value, _>(&s.payload[..]).ok())
        .and_then(|v| get_field(&v, "session"))
        .unwrap_or(0)
}

/// A number near `n` or at an edge.
fn near(rng: &mut Rng, n: u64) -> u64 {
    match rng.below(8) {
        0 => 0,
        1 => n.wrapping_add(1),
        2 => n.wrapping_sub(1),
        3 => 1,
        4 => u64::from(MAX_STREAMS),
        5 => u64::from(MAX_STREAMS) + 1,
        6 => u64::from(u32::MAX),
        _ => rng.interesting_u64(),
    }
}

/// A Join of `session` for stream `index` of `streams`, alone in a stream.
fn join_only(session: u64, index: u32, streams: u32) -> Vec<u8> {
    let mut w = match ferry_format::StreamWriter::new(Vec::new(), "ferry-fuzz") {
        Ok(w) => w,
        Err(_) => return Vec::new(),
    };
    let _ = w.write_cbor(
        SectionId::Join,
        SectionId::Join.current_version(),
        &StreamJoin {
            session,
            index,
            streams,
        },
    );
    w.get_ref().clone()
}

/// The structure-aware bundle mutator.
pub fn mutate_bundle(rng: &mut Rng, base: &[u8], pool: &[Vec<u8>]) -> Vec<u8> {
    if rng.chance(1, 12) {
        let mut bytes = base.to_vec();
        mutate_bytes(rng, &mut bytes, pool);
        return bytes;
    }
    let mut b = Bundle::parse(base);
    if b.conns.is_empty() {
        b.conns.push(Conn {
            flags: 0,
            bytes: Vec::new(),
        });
    }
    let rounds = 1 + rng.below(3);
    for _ in 0..rounds {
        let n = b.conns.len();
        let extra = if n > 1 { 1 + rng.below(n - 1) } else { 0 };
        match rng.below(16) {
            // The destination's limit.
            0 => {
                b.max_streams = *rng
                    .pick(&[0u32, 1, 2, 3, 4, 5, 8, 15, 16, 17, 255, u32::MAX])
                    .unwrap_or(&4)
            }
            // A Join's token, index or count.
            1..=3 if extra > 0 => {
                let key = *rng
                    .pick(&["session", "index", "streams"])
                    .unwrap_or(&"index");
                let session = session_of(&b);
                let c = &mut b.conns[extra];
                let edited = edit_first_cbor(&c.bytes, |v| {
                    let cur = get_field(v, key).unwrap_or(0);
                    let new = match key {
                        "session" => match rng.below(3) {
                            0 => session ^ 1,
                            1 => 0,
                            _ => rng.next_u64(),
                        },
                        _ => near(rng, cur),
                    };
                    set_field(v, key, new);
                });
                if let Some(bytes) = edited {
                    c.bytes = bytes;
                }
            }
            // The handshake's proposal or token.
            4 => {
                let key = if rng.chance(3, 4) {
                    "streams"
                } else {
                    "session"
                };
                let edited = edit_first_cbor(&b.conns[0].bytes, |v| {
                    let cur = get_field(v, key).unwrap_or(1);
                    let new = if key == "session" {
                        [0, cur ^ 1][rng.below(2)]
                    } else {
                        near(rng, cur)
                    };
                    set_field(v, key, new);
                });
                if let Some(bytes) = edited {
                    b.conns[0].bytes = bytes;
                }
            }
            // Duplicate, drop, or move a connection.
            5 => {
                let i = rng.below(n);
                if b.conns.len() < MAX_CONNS {
                    let dup = b.conns[i].clone();
                    b.conns.insert(rng.below(n + 1), dup);
                }
            }
            6 if n > 1 => {
                b.conns.remove(rng.below(n));
            }
            7 if n > 1 => {
                let (i, j) = (rng.below(n), rng.below(n));
                b.conns.swap(i, j);
            }
            // A connection closing early: at a random point, inside or right
            // after the first section, or before its End.
            8 => {
                let c = &mut b.conns[rng.below(n)];
                let raw = RawStream::split(&c.bytes);
                let pre = raw.preamble.len();
                let first_end = raw
                    .sections
                    .first()
                    .map_or(pre, |s| pre + 24 + s.payload.len());
                let cut = match rng.below(4) {
                    0 => rng.below(c.bytes.len() + 1),
                    1 => pre + rng.below(first_end.saturating_sub(pre) + 1),
                    2 => first_end,
                    _ => {
                        let mut r = raw.clone();
                        r.sections.pop();
                        r.assemble(true, None).len()
                    }
                };
                c.bytes.truncate(cut);
            }
            // A RAM section moved or copied to another connection (pages on
            // the wrong stream).
            9 | 10 if n > 1 => {
                let (from, to) = (rng.below(n), rng.below(n));
                let mut src = RawStream::split(&b.conns[from].bytes);
                let rams: Vec<usize> = (0..src.sections.len())
                    .filter(|&i| src.sections[i].id == SectionId::RamPages.as_u32())
                    .collect();
                if let Some(&i) = rng.pick(&rams) {
                    let sec: RawSection = if rng.chance(1, 2) && from != to {
                        let s = src.sections.remove(i);
                        b.conns[from].bytes = src.assemble(true, None);
                        s
                    } else {
                        src.sections[i].clone()
                    };
                    let mut dst = RawStream::split(&b.conns[to].bytes);
                    let at = 1 + rng.below(dst.sections.len().max(1));
                    dst.sections.insert(at.min(dst.sections.len()), sec);
                    b.conns[to].bytes = dst.assemble(true, None);
                }
            }
            // The single-stream mutator on one connection.
            11 | 12 => {
                let i = rng.below(n);
                b.conns[i].bytes = mutate_stream(rng, &b.conns[i].bytes, pool);
            }
            // Sent late (after the main connection's bytes, then a pause),
            // or not.
            13 if extra > 0 => {
                let delay = rng.below(256) as u32;
                let c = &mut b.conns[extra];
                c.flags = (c.flags ^ LATE) & !0xff00 | delay << 8;
            }
            // A stranger: a Join with another token, a stream's Join alone,
            // nothing at all, or noise.
            14 if b.conns.len() < MAX_CONNS => {
                let session = session_of(&b);
                let streams = b.max_streams.min(MAX_STREAMS);
                let bytes = match rng.below(4) {
                    0 => join_only(session ^ (1 + rng.next_u64() % 7), 1, streams),
                    1 => join_only(session, 1 + rng.below(4) as u32, 1 + rng.below(5) as u32),
                    2 => Vec::new(),
                    _ => (0..rng.below(64)).map(|_| rng.next_u64() as u8).collect(),
                };
                let at = 1 + rng.below(n);
                b.conns.insert(
                    at,
                    Conn {
                        flags: if rng.chance(1, 3) {
                            LATE | (rng.below(256) as u32) << 8
                        } else {
                            0
                        },
                        bytes,
                    },
                );
            }
            _ => {
                let i = rng.below(n);
                let mut bytes = b.conns[i].bytes.clone();
                mutate_bytes(rng, &mut bytes, pool);
                b.conns[i].bytes = bytes;
            }
        }
    }
    b.encode()
}

/// Seeds from a real migration: an 8 MiB, 2-vCPU VM (never booted, pages
/// written in every stripe of the first MiB and at the end of RAM) migrated
/// by `migration::migrate` with `streams` multifd channels to a real
/// destination, every connection recorded on the way by a proxy.
pub fn generate_seed(streams: u32, digest: bool) -> Result<Bundle, String> {
    use ferry_vmm::{Vm, VmConfig};
    let mut vm = Vm::create(VmConfig {
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
    let gpas = (0..8u64)
        .map(|i| (i << STRIPE_SHIFT) + 0x1000 * (i + 1))
        .chain([0x7f_f000]);
    for (i, gpa) in gpas.enumerate() {
        ram.write(gpa, &[0x50 + i as u8; PAGE_SIZE])
            .map_err(|e| e.to_string())?;
    }

    let dest = TcpListener::bind(("127.0.0.1", 0)).map_err(|e| e.to_string())?;
    let dest_addr = dest.local_addr().map_err(|e| e.to_string())?;
    let dest = Listener::from_tcp(dest).map_err(|e| e.to_string())?;
    let receiving = std::thread::spawn(move || -> Result<(), String> {
        let ch = dest.accept_next().map_err(|e| e.to_string())?;
        let main_breaker = ch.breaker().ok();
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
        let extra = ExtraStreams {
            listener: &dest,
            max_streams: MAX_STREAMS,
            main_breaker,
        };
        migration::receive_streams(ch.reader, Some(ch.writer), Some(extra), &opts)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });

    let proxy = TcpListener::bind(("127.0.0.1", 0)).map_err(|e| e.to_string())?;
    let proxy_addr = proxy.local_addr().map_err(|e| e.to_string())?;
    let recording = std::thread::spawn(move || -> Result<Vec<Vec<u8>>, String> {
        let mut pumps = Vec::new();
        for _ in 0..streams {
            let (from_src, _) = proxy.accept().map_err(|e| e.to_string())?;
            let to_dst = TcpStream::connect(dest_addr).map_err(|e| e.to_string())?;
            let (a, b) = (
                from_src.try_clone().map_err(|e| e.to_string())?,
                to_dst.try_clone().map_err(|e| e.to_string())?,
            );
            // Destination to source: the replies, passed on.
            std::thread::spawn(move || pump(b, a, None));
            let rec = Arc::new(Mutex::new(Vec::new()));
            let r = Arc::clone(&rec);
            let h = std::thread::spawn(move || pump(from_src, to_dst, Some(&r)));
            pumps.push((h, rec));
        }
        let mut out = Vec::new();
        for (h, rec) in pumps {
            h.join()
                .map_err(|_| "a proxy thread panicked".to_string())?;
            out.push(rec.lock().map(|b| b.clone()).unwrap_or_default());
        }
        Ok(out)
    });

    let ctl = MigrationControl::new(MigrationParams {
        multifd_channels: streams,
        verify_digest: digest,
        ..MigrationParams::default()
    });
    let channel = Channel::connect(
        &MigrationUri::Tcp(proxy_addr.to_string()),
        Duration::from_secs(10),
    )
    .map_err(|e| e.to_string())?;
    migration::migrate(&mut vm, channel, &ctl).map_err(|e| format!("seed migration: {e}"))?;
    receiving
        .join()
        .map_err(|_| "the seed destination panicked".to_string())??;
    let conns = recording
        .join()
        .map_err(|_| "the proxy panicked".to_string())??;
    Ok(Bundle {
        max_streams: streams,
        conns: conns
            .into_iter()
            .map(|bytes| Conn { flags: 0, bytes })
            .collect(),
    })
}

/// Copies `from` to `to` (recording what passes), then closes `to`'s
/// sending side.
fn pump(mut from: TcpStream, mut to: TcpStream, record: Option<&Mutex<Vec<u8>>>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(r) = record {
                    if let Ok(mut r) = r.lock() {
                        r.extend_from_slice(&buf[..n]);
                    }
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
