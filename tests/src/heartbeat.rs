//! Host-side timing of the test guest's heartbeats: COM1 goes to a unix socket the
//! harness listens on, and every heartbeat byte is stamped as it arrives. The largest
//! gap across the source's and the destination's streams is the downtime the guest
//! itself experienced.

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Collects heartbeat arrival times from one or more guests' serial sockets.
#[derive(Debug, Clone, Default)]
pub struct Heartbeats {
    stamps: Arc<Mutex<Vec<Instant>>>,
    /// Guests that printed [`READY`] (it ends the fill: passes start then).
    ready: Arc<std::sync::atomic::AtomicUsize>,
}

/// What the dirtier prints just before its first pass, after any fill.
pub const READY: &[u8] = b"dirtier: ready";

impl Heartbeats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Listens on `path`; a `ferry-vm --serial unix:PATH` connects to it. Returns the
    /// serial spec to pass.
    pub fn listen(&self, path: &Path) -> std::io::Result<String> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let stamps = self.stamps.clone();
        let ready = self.ready.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let (stamps, ready) = (stamps.clone(), ready.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    // The line may arrive split over reads: keep its last bytes.
                    let mut tail: Vec<u8> = Vec::new();
                    let mut seen = false;
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 {
                            return;
                        }
                        let now = Instant::now();
                        let beats = buf[..n].iter().filter(|&&b| b == b'.').count();
                        if let Ok(mut s) = stamps.lock() {
                            s.extend(std::iter::repeat_n(now, beats));
                        }
                        if !seen {
                            tail.extend_from_slice(&buf[..n]);
                            if tail.windows(READY.len()).any(|w| w == READY) {
                                seen = true;
                                ready.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                            }
                            let keep = tail.len().saturating_sub(READY.len());
                            tail.drain(..keep);
                        }
                    }
                });
            }
        });
        Ok(format!("unix:{}", path.display()))
    }

    /// How many guests printed [`READY`] so far.
    pub fn ready(&self) -> usize {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn count(&self) -> usize {
        self.stamps.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Heartbeats that arrived in [from, to].
    pub fn count_between(&self, from: Instant, to: Instant) -> usize {
        self.stamps
            .lock()
            .map(|s| s.iter().filter(|&&t| t >= from && t <= to).count())
            .unwrap_or(0)
    }

    /// The largest gap (ms) between consecutive heartbeats in [from, to], counting
    /// the edges of the window.
    pub fn max_gap_ms(&self, from: Instant, to: Instant) -> f64 {
        let Ok(s) = self.stamps.lock() else {
            return f64::NAN;
        };
        let mut t: Vec<Instant> = s
            .iter()
            .copied()
            .filter(|&x| x >= from && x <= to)
            .collect();
        t.sort();
        let mut prev = from;
        let mut max = 0.0f64;
        for x in t.into_iter().chain(std::iter::once(to)) {
            max = max.max((x - prev).as_secs_f64() * 1e3);
            prev = x;
        }
        max
    }
}

/// A socket path for a guest's serial line.
pub fn socket_path(dir: &Path, tag: &str) -> PathBuf {
    dir.join(format!("{tag}.hb"))
}
