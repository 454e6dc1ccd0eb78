//! A stream-aware TCP proxy for fault injection between a migration source and
//! its destination.
//!
//! It forwards one connection and parses both directions with ferry-format's
//! framing: source to destination it sees the preamble and every section
//! header (so it can stop *exactly* before the n-th RamPages section, before
//! End once the vCPU and device state went through, ...), destination to
//! source it sees each Reply section (Ready, then Loaded or Error). A test
//! holds a direction at such a boundary, waits until the migration sits there,
//! injects its fault (kill a process, [`Proxy::close`], [`Proxy::cut`],
//! cancel) and may [`Proxy::release`] what was held.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_format::{SectionId, PREAMBLE_LEN, SECTION_HEADER_LEN};

/// The fields of a section header the proxy needs (the layout of ferry-format's
/// section header: id at 0..4, length at 8..16, little-endian).
struct Header {
    id: SectionId,
    length: u64,
}

fn decode_header(raw: &[u8; SECTION_HEADER_LEN]) -> Result<Header, String> {
    let id = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let mut len = [0u8; 8];
    len.copy_from_slice(&raw[8..16]);
    if id == 0 {
        return Err("section id 0".into());
    }
    Ok(Header {
        id: SectionId::from_u32(id),
        length: u64::from_le_bytes(len),
    })
}

/// Where the source-to-destination direction stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Forward everything.
    None,
    /// Stop before the `n`-th (1-based) section with this id; nothing of it passes.
    Before(SectionId, usize),
    /// Stop before the next section header, whatever it is.
    NextSection,
}

/// What the proxy saw and did; shared with the test.
#[derive(Debug, Default)]
pub struct ProxyState {
    /// Section ids forwarded to the destination, in order.
    pub forwarded: Vec<SectionId>,
    /// The section the source-to-destination direction is holding before.
    pub held_before: Option<SectionId>,
    /// Reply sections seen from the destination / forwarded to the source.
    pub replies_seen: usize,
    pub replies_forwarded: usize,
    /// Whether a reply is being held.
    pub reply_held: bool,
    /// Bytes forwarded source to destination.
    pub bytes_up: u64,
    /// No byte moves in either direction (a dead link).
    pub stalled: bool,
    /// The connection is over (closed by the test or by an end).
    pub closed: bool,
    /// A pump ended; why.
    pub ended: Vec<String>,
    hold: Option<Hold>,
    hold_replies_from: Option<usize>,
}

impl ProxyState {
    /// Sections of `id` forwarded so far.
    pub fn count(&self, id: SectionId) -> usize {
        self.forwarded.iter().filter(|&&s| s == id).count()
    }
}

#[derive(Debug, Default)]
struct ProxyShared {
    state: Mutex<ProxyState>,
    changed: Condvar,
    sockets: Mutex<Vec<TcpStream>>,
}

impl ProxyShared {
    fn lock(&self) -> MutexGuard<'_, ProxyState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut ProxyState)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    /// Blocks while `blocked` holds (and the proxy is open); false once closed.
    fn wait_while(&self, blocked: impl Fn(&ProxyState) -> bool) -> bool {
        let mut g = self.lock();
        while !g.closed && blocked(&g) {
            g = self
                .changed
                .wait_timeout(g, Duration::from_millis(50))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        !g.closed
    }

    /// Ends both connections: shut down, then the proxy's descriptors closed
    /// once the pumps let go of theirs (closing with unread data resets the
    /// connection, so a peer blocked writing to a held direction fails at once,
    /// as it would if the other end's host had gone).
    /// Like `wait_while`, for at most `limit`: true while still blocked and open.
    fn wait_while_for(&self, blocked: &impl Fn(&ProxyState) -> bool, limit: Duration) -> bool {
        let g = self.lock();
        if g.closed || !blocked(&g) {
            return false;
        }
        let g = self
            .changed
            .wait_timeout(g, limit)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
        !g.closed && blocked(&g)
    }

    fn close_all(&self) {
        self.update(|s| s.closed = true);
        if let Ok(mut socks) = self.sockets.lock() {
            for s in socks.drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// A one-connection proxy in front of `upstream`.
#[derive(Debug)]
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<ProxyShared>,
    threads: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a loopback port; the first connection is forwarded to `upstream`
    /// (connected with retries: the destination may still be starting).
    pub fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(ProxyShared::default());
        let sh = shared.clone();
        let main = std::thread::spawn(move || {
            let Ok((src, _)) = listener.accept() else {
                sh.update(|s| s.ended.push("accept failed".into()));
                return;
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            let dst = loop {
                match TcpStream::connect(upstream) {
                    Ok(d) => break d,
                    Err(e) if Instant::now() > deadline => {
                        sh.update(|s| s.ended.push(format!("cannot reach {upstream}: {e}")));
                        let _ = src.shutdown(Shutdown::Both);
                        return;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            let _ = src.set_nodelay(true);
            let _ = dst.set_nodelay(true);
            let clones = (src.try_clone(), dst.try_clone());
            let (Ok(src2), Ok(dst2)) = clones else {
                sh.update(|s| s.ended.push("cannot clone the sockets".into()));
                return;
            };
            if let Ok(mut socks) = sh.sockets.lock() {
                socks.extend(src.try_clone().ok());
                socks.extend(dst.try_clone().ok());
            }
            if sh.lock().closed {
                // Closed before the connection arrived.
                let _ = src.shutdown(Shutdown::Both);
                let _ = dst.shutdown(Shutdown::Both);
                return;
            }
            let up_sh = sh.clone();
            let up = std::thread::spawn(move || pump_up(src, dst, &up_sh));
            pump_down(dst2, src2, &sh);
            let _ = up.join();
        });
        Self {
            addr,
            shared,
            threads: vec![main],
        }
    }

    /// `tcp:127.0.0.1:PORT` of the proxy, for `migrate`.
    pub fn uri(&self) -> String {
        format!("tcp:{}", self.addr)
    }

    /// Holds the source-to-destination direction at `hold`.
    pub fn hold(&self, hold: Hold) {
        self.shared.update(|s| s.hold = Some(hold));
    }

    /// Holds every reply from the `n`-th (0-based: 0 = Ready, 1 = Loaded/Error) on.
    pub fn hold_replies_from(&self, n: usize) {
        self.shared.update(|s| s.hold_replies_from = Some(n));
    }

    /// Lets everything held go on.
    pub fn release(&self) {
        self.shared.update(|s| {
            s.hold = None;
            s.hold_replies_from = None;
            s.stalled = false;
        });
    }

    /// Stops moving bytes in both directions, as a dead link does (nothing is
    /// read, so the senders' buffers fill up and they block).
    pub fn stall(&self) {
        self.shared.update(|s| s.stalled = true);
    }

    /// Closes both connections (each peer sees the end of its stream).
    pub fn close(&self) {
        self.shared.close_all();
    }

    /// A cut link: nothing moves for `stall`, then both connections end.
    pub fn cut(&self, stall: Duration) {
        self.stall();
        std::thread::sleep(stall);
        self.close();
    }

    /// Waits until `pred` holds; panics with the state after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&ProxyState) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.lock();
        while !pred(&g) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "proxy: {what} did not happen in {timeout:?}: {g:?}"
            );
            g = self
                .shared
                .changed
                .wait_timeout(g, left.min(Duration::from_millis(50)))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// A look at the state.
    pub fn with_state<T>(&self, f: impl FnOnce(&ProxyState) -> T) -> T {
        f(&self.shared.lock())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.close_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Reads exactly `buf.len()` bytes; false at the end of the stream.
fn read_full(r: &mut TcpStream, buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => done += n,
        }
    }
    true
}

/// Copies `len` bytes, pausing while the link is stalled.
fn copy_payload(from: &mut TcpStream, to: &mut TcpStream, mut len: u64, sh: &ProxyShared) -> bool {
    let mut buf = vec![0u8; 64 << 10];
    while len > 0 {
        if !sh.wait_while(|s| s.stalled) {
            return false;
        }
        let want = buf.len().min(usize::try_from(len).unwrap_or(usize::MAX));
        let n = match from.read(&mut buf[..want]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            return false;
        }
        len -= n as u64;
        sh.update(|s| s.bytes_up += n as u64);
    }
    true
}

fn forward_preamble(from: &mut TcpStream, to: &mut TcpStream, sh: &ProxyShared) -> bool {
    let mut fixed = [0u8; PREAMBLE_LEN];
    if !read_full(from, &mut fixed) || to.write_all(&fixed).is_err() {
        return false;
    }
    let producer = u64::from(u16::from_le_bytes([fixed[16], fixed[17]]));
    copy_payload(from, to, producer, sh)
}

fn end_pump(sh: &ProxyShared, why: &str, from: &TcpStream, to: &TcpStream) {
    sh.update(|s| s.ended.push(why.to_string()));
    // The other side sees the end too (a half-close, as a relaying router would).
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// Source to destination: preamble, then section by section, honouring holds.
fn pump_up(mut from: TcpStream, mut to: TcpStream, sh: &ProxyShared) {
    if !forward_preamble(&mut from, &mut to, sh) {
        return end_pump(sh, "source stream ended in the preamble", &from, &to);
    }
    let mut seen: Vec<SectionId> = Vec::new();
    loop {
        let mut raw = [0u8; SECTION_HEADER_LEN];
        if !read_full(&mut from, &mut raw) {
            return end_pump(sh, "source stream ended between sections", &from, &to);
        }
        let header = match decode_header(&raw) {
            Ok(h) => h,
            Err(e) => return end_pump(sh, &format!("bad section header: {e}"), &from, &to),
        };
        let nth = seen.iter().filter(|&&s| s == header.id).count() + 1;
        let held = |s: &ProxyState| match s.hold {
            Some(Hold::Before(id, n)) => id == header.id && nth >= n,
            Some(Hold::NextSection) => true,
            _ => false,
        } || s.stalled;
        if held(&sh.lock()) {
            sh.update(|s| s.held_before = Some(header.id));
            let open = sh.wait_while(held);
            sh.update(|s| s.held_before = None);
            if !open {
                return end_pump(sh, "closed while holding", &from, &to);
            }
        }
        if to.write_all(&raw).is_err() || !copy_payload(&mut from, &mut to, header.length, sh) {
            return end_pump(sh, "destination or source went away", &from, &to);
        }
        seen.push(header.id);
        sh.update(|s| s.forwarded.push(header.id));
        if header.id == SectionId::End {
            // Nothing follows End; keep the connection until the source closes it.
            let mut rest = [0u8; 1];
            let _ = from.read(&mut rest);
            return end_pump(sh, "source closed after End", &from, &to);
        }
    }
}

/// Destination to source: the return path's preamble, then Reply sections.
///
/// When the destination's side ends (it exited, or was killed) the whole
/// connection is closed, as the destination's kernel resets it: a source
/// blocked writing into a held direction sees the error at once.
fn pump_down(from: TcpStream, to: TcpStream, sh: &ProxyShared) {
    pump_down_inner(from, to, sh);
    sh.close_all();
}

fn pump_down_inner(mut from: TcpStream, mut to: TcpStream, sh: &ProxyShared) {
    if !forward_preamble(&mut from, &mut to, sh) {
        return end_pump(sh, "return path ended in the preamble", &from, &to);
    }
    loop {
        let mut raw = [0u8; SECTION_HEADER_LEN];
        if !read_full(&mut from, &mut raw) {
            return end_pump(sh, "return path ended", &from, &to);
        }
        let Ok(header) = decode_header(&raw) else {
            return end_pump(sh, "bad reply header", &from, &to);
        };
        let mut payload = vec![0u8; usize::try_from(header.length).unwrap_or(0).min(1 << 20)];
        if !read_full(&mut from, &mut payload) {
            return end_pump(sh, "return path ended inside a reply", &from, &to);
        }
        let index = {
            let mut g = sh.lock();
            g.replies_seen += 1;
            g.replies_seen - 1
        };
        sh.changed.notify_all();
        let held = |s: &ProxyState| s.hold_replies_from.is_some_and(|n| index >= n) || s.stalled;
        if held(&sh.lock()) {
            sh.update(|s| s.reply_held = true);
            // Hold, but notice the destination going away meanwhile.
            let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
            let mut gone = false;
            while !gone && sh.wait_while_for(&held, Duration::from_millis(20)) {
                gone = match from.peek(&mut [0u8; 1]) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(e) => !matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ),
                };
            }
            let _ = from.set_read_timeout(None);
            sh.update(|s| s.reply_held = false);
            if gone {
                return end_pump(
                    sh,
                    "the destination went away while a reply was held",
                    &from,
                    &to,
                );
            }
            if sh.lock().closed {
                return end_pump(sh, "closed while holding a reply", &from, &to);
            }
        }
        if to.write_all(&raw).is_err() || to.write_all(&payload).is_err() {
            return end_pump(sh, "source went away", &from, &to);
        }
        sh.update(|s| s.replies_forwarded += 1);
    }
}
