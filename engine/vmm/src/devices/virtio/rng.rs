//! virtio-rng, the entropy device (virtio 1.1 section 5.4): one request queue
//! of device-writable buffers, which the device fills with bytes from its
//! backend. The backend is a file opened when the VM is built (QEMU's
//! `rng-random`: `/dev/urandom` by default, `/dev/random` or any `filename`)
//! or the host's `getrandom` (QEMU's `rng-builtin`).
//!
//! QEMU's rate limit (`hw/virtio/virtio-rng.c`): at most `max-bytes` bytes per
//! `period` milliseconds. The window opens with the first request served
//! after the last one ended (QEMU arms its timer then, not on a fixed clock);
//! when it ends the quota is full again and waiting requests are served. A
//! request larger than what is left of the quota gets what is left (a short
//! used length, as QEMU does); requests that find the quota spent wait, and
//! the device thread (see `worker.rs`) sleeps until the window ends: no
//! polling. Defaults are QEMU's: `max-bytes` 2^63 - 1, `period` 65536 ms.
//!
//! Requests run on the vCPU thread that notified the queue, or on the device
//! thread when a window ends; every byte goes into guest memory through
//! vm-memory, so it lands in the dirty log a migration reads. A request with a
//! device-readable buffer, or outside guest memory, is the driver's fault: the
//! device needs a reset, the VMM carries on.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_kvm::memory::GuestMemory;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::{DeviceStateError, QueueError, VirtioDevice, F_VERSION_1};

/// A virtio-rng configuration refused (in QEMU's words), or an entropy
/// source that cannot open.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("'period' parameter expects a positive integer")]
    Period,
    #[error("'max-bytes' parameter must be non-negative, and less than 2^63")]
    MaxBytes,
    /// The advice follows the cause, so the cause is in the text.
    #[error(
        "cannot open the entropy source {}: {source} (give a readable file, e.g. \
         /dev/urandom, or use rng-builtin)",
        path.display()
    )]
    OpenSource {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The request queue.
pub const REQUEST_QUEUE: usize = 0;
const QUEUE_SIZE: u16 = 256;
/// QEMU's default `max-bytes` (INT64_MAX: no limit).
pub const DEFAULT_MAX_BYTES: u64 = i64::MAX as u64;
/// QEMU's default `period` in milliseconds (1 << 16).
pub const DEFAULT_PERIOD_MS: u32 = 1 << 16;
/// Most bytes one request gets: bounds the work of one notification (a short
/// used length is allowed by the specification; Linux asks for 64 bytes).
pub const MAX_REQUEST: usize = 64 << 10;

/// Where the bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RngSource {
    /// A file read in order (QEMU's `rng-random,filename=`).
    File(PathBuf),
    /// The host's `getrandom(2)` (QEMU's `rng-builtin`).
    Builtin,
}

/// How to build a virtio-rng device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RngConfig {
    pub source: RngSource,
    /// Bytes per period (QEMU's `max-bytes`); at most 2^63 - 1.
    pub max_bytes: u64,
    /// The rate limit's window in milliseconds (QEMU's `period`); above 0.
    pub period_ms: u32,
}

impl RngConfig {
    /// `source` with QEMU's defaults: no rate limit.
    pub fn new(source: RngSource) -> Self {
        Self {
            source,
            max_bytes: DEFAULT_MAX_BYTES,
            period_ms: DEFAULT_PERIOD_MS,
        }
    }

    /// Refuses what QEMU's `virtio_rng_device_realize` refuses, in its words.
    pub fn check(&self) -> Result<(), RngError> {
        if self.period_ms == 0 {
            return Err(RngError::Period);
        }
        if self.max_bytes > DEFAULT_MAX_BYTES {
            return Err(RngError::MaxBytes);
        }
        Ok(())
    }
}

/// The rate limit's progress, as it travels in checkpoints and migrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Bytes the current window still allows.
    pub quota_remaining: u64,
    /// Milliseconds until the current window ends; `None`: no window open
    /// (the next request opens one).
    pub window_left_ms: Option<u64>,
}

/// Counters of one virtio-rng device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RngStats {
    /// Bytes given to the guest.
    pub bytes: u64,
    pub requests: u64,
    /// Times a request found the quota spent and waited for the next window.
    pub throttled: u64,
}

/// A virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    config: RngConfig,
    /// The open backend file; `None` for the builtin source.
    file: Option<File>,
    quota_remaining: u64,
    /// When the current window ends (QEMU's armed rate-limit timer).
    window_end: Option<Instant>,
    /// A request waits for the window to end.
    waiting: bool,
    buf: Vec<u8>,
    stats: RngStats,
}

impl Rng {
    /// Checks `config` and opens its backend (non-blocking: a `/dev/random`
    /// without entropy yet makes requests wait, never a vCPU).
    pub fn new(config: &RngConfig) -> Result<Self, RngError> {
        config.check()?;
        let file = match &config.source {
            RngSource::Builtin => None,
            RngSource::File(path) => Some(
                OpenOptions::new()
                    .read(true)
                    .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                    .open(path)
                    .map_err(|source| RngError::OpenSource {
                        path: path.clone(),
                        source,
                    })?,
            ),
        };
        Ok(Self {
            config: config.clone(),
            file,
            quota_remaining: config.max_bytes,
            window_end: None,
            waiting: false,
            buf: vec![0; MAX_REQUEST],
            stats: RngStats::default(),
        })
    }

    pub fn stats(&self) -> RngStats {
        self.stats
    }

    /// Ends the window if its time is up: the quota is full again (QEMU's
    /// `check_rate_limit`).
    fn roll_window(&mut self, now: Instant) {
        if self.window_end.is_some_and(|end| now >= end) {
            self.window_end = None;
            self.quota_remaining = self.config.max_bytes;
        }
    }

    /// Reads up to `n` bytes from the backend into `self.buf`; returns how many.
    fn fill(&mut self, n: usize) -> Result<usize, QueueError> {
        let buf = &mut self.buf[..n];
        match &mut self.file {
            None => getrandom::fill(buf)
                .map(|()| n)
                .map_err(QueueError::Getrandom),
            Some(f) => loop {
                match f.read(buf) {
                    Ok(got) => return Ok(got),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(0),
                    Err(e) => return Err(QueueError::ReadEntropy(e)),
                }
            },
        }
    }

    /// Serves the requests the driver queued while the quota and the backend
    /// last (QEMU's `virtio_rng_process` and `chr_read`).
    fn serve(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, QueueError> {
        let now = Instant::now();
        self.roll_window(now);
        let mut used = false;
        self.waiting = false;
        loop {
            let Some(chain) = queue.iter(mem).map_err(QueueError::AvailRing)?.next() else {
                return Ok(used);
            };
            let head = chain.head_index();
            if self.quota_remaining == 0 {
                queue.go_to_previous_position();
                self.waiting = true;
                self.stats.throttled += 1;
                return Ok(used);
            }
            if self.window_end.is_none() {
                self.window_end = Some(now + Duration::from_millis(self.config.period_ms.into()));
            }
            if chain.clone().any(|d| !d.is_write_only()) {
                return Err(QueueError::EntropyReadable { head });
            }
            let mut writer = chain
                .writer(mem)
                .map_err(|e| QueueError::buffer("request", head, e))?;
            let room = writer.available_bytes();
            if room == 0 {
                return Err(QueueError::NoRoom { head });
            }
            let want = room
                .min(MAX_REQUEST)
                .min(usize::try_from(self.quota_remaining).unwrap_or(usize::MAX));
            let got = self.fill(want)?;
            if got == 0 {
                // The backend has nothing now (a file at its end, /dev/random
                // before the host has entropy): the request waits.
                tracing::debug!("virtio-rng: the entropy source gave no bytes");
                queue.go_to_previous_position();
                return Ok(used);
            }
            writer
                .write_all(&self.buf[..got])
                .map_err(|e| QueueError::buffer("request", head, e))?;
            queue
                .add_used(mem, head, got as u32)
                .map_err(QueueError::UsedRing)?;
            self.quota_remaining -= got as u64;
            self.stats.bytes += got as u64;
            self.stats.requests += 1;
            used = true;
        }
    }

    /// The rate limit's progress at `now`, for a checkpoint.
    pub fn save(&self, now: Instant) -> RngState {
        RngState {
            quota_remaining: self.quota_remaining,
            window_left_ms: self
                .window_end
                .map(|end| end.saturating_duration_since(now).as_millis() as u64),
        }
    }

    /// Takes the rate limit's progress from a stream at `now`. The stream's
    /// values are checked as hostile; this device's own `max-bytes` and
    /// `period` bound them (a destination may be configured differently).
    pub fn load(&mut self, s: &RngState, now: Instant) -> Result<(), DeviceStateError> {
        if s.quota_remaining > DEFAULT_MAX_BYTES {
            return Err(DeviceStateError::RngQuota {
                quota: s.quota_remaining,
            });
        }
        if s.window_left_ms.is_some_and(|ms| ms > u64::from(u32::MAX)) {
            return Err(DeviceStateError::RngWindow {
                ms: s.window_left_ms.unwrap_or(0),
            });
        }
        self.quota_remaining = s.quota_remaining.min(self.config.max_bytes);
        let period = u64::from(self.config.period_ms);
        self.window_end = s
            .window_left_ms
            .map(|ms| now + Duration::from_millis(ms.min(period)));
        Ok(())
    }
}

impl VirtioDevice for Rng {
    fn kind(&self) -> &'static str {
        "virtio-rng"
    }

    fn device_id(&self) -> u16 {
        4
    }

    fn pci_class(&self) -> u32 {
        // Unclassified device (QEMU's PCI_CLASS_OTHERS).
        0xff_00_00
    }

    fn features(&self) -> u64 {
        F_VERSION_1
    }

    fn queue_count(&self) -> usize {
        1
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn read_config(&self, _offset: usize, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn process(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
        _driver_features: u64,
    ) -> Result<bool, QueueError> {
        match (index, queues.get_mut(index)) {
            (REQUEST_QUEUE, Some(queue)) => self.serve(queue, mem),
            _ => Err(QueueError::NoQueue { index }),
        }
    }

    fn reset(&mut self) {
        // QEMU keeps the rate limit across a reset: so does ferry.
        self.waiting = false;
    }

    fn identity(&self) -> String {
        // The source and the rate limit are the host's business: a
        // destination may use another file; the guest cannot tell.
        "entropy".into()
    }

    fn timed_queue(&self) -> Option<usize> {
        Some(REQUEST_QUEUE)
    }

    fn timer(&mut self, now: Instant) -> Option<Instant> {
        self.roll_window(now);
        // Woken at the window's end only while a request waits for it.
        self.window_end.filter(|_| self.waiting)
    }

    fn save_state(&self) -> Option<super::DeviceState> {
        Some(super::DeviceState::Rng(self.save(Instant::now())))
    }

    fn restore_state(
        &mut self,
        state: Option<&super::DeviceState>,
    ) -> Result<(), DeviceStateError> {
        match state {
            Some(super::DeviceState::Rng(s)) => self.load(s, Instant::now()),
            None => {
                // A stream without it: a fresh window, as a new device.
                self.quota_remaining = self.config.max_bytes;
                self.window_end = None;
                Ok(())
            }
            Some(_) => Err(DeviceStateError::OtherKind { kind: "virtio-rng" }),
        }
    }

    fn stats(&self) -> super::DeviceStats {
        super::DeviceStats::Rng(self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rate limit's progress survives a save and a load, relative to the
    /// time of each, and a stream's values are bounded by this device.
    #[test]
    fn rng_state_round_trips_and_hostile_state_is_refused() {
        let config = RngConfig {
            max_bytes: 100,
            period_ms: 1000,
            ..RngConfig::new(RngSource::Builtin)
        };
        let mut a = Rng::new(&config).unwrap();
        let t0 = Instant::now();
        a.quota_remaining = 40;
        a.window_end = Some(t0 + Duration::from_millis(700));
        let saved = a.save(t0);
        assert_eq!(
            saved,
            RngState {
                quota_remaining: 40,
                window_left_ms: Some(700)
            }
        );
        // Through a self-describing encoding (the stream's is CBOR; the
        // migration test in virtio/tests.rs carries it in a real stream).
        let back: RngState = serde_json::from_slice(&serde_json::to_vec(&saved).unwrap()).unwrap();
        assert_eq!(back, saved);

        let mut b = Rng::new(&config).unwrap();
        let t1 = t0 + Duration::from_secs(5);
        b.load(&saved, t1).unwrap();
        assert_eq!(b.save(t1), saved);
        assert_eq!(b.window_end, Some(t1 + Duration::from_millis(700)));

        // Bounded by the destination's own configuration.
        let small = RngConfig {
            max_bytes: 10,
            period_ms: 100,
            ..config.clone()
        };
        let mut c = Rng::new(&small).unwrap();
        c.load(&saved, t1).unwrap();
        assert_eq!(
            c.save(t1),
            RngState {
                quota_remaining: 10,
                window_left_ms: Some(100)
            }
        );

        // Values no ferry could have written.
        let err = b
            .load(
                &RngState {
                    quota_remaining: u64::MAX,
                    window_left_ms: None,
                },
                t1,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("quota"), "{err}");
        let err = b
            .load(
                &RngState {
                    quota_remaining: 1,
                    window_left_ms: Some(u64::MAX),
                },
                t1,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("window"), "{err}");
        assert_eq!(b.save(t1), saved, "a refused state changed nothing");
    }

    #[test]
    fn rng_config_is_checked_as_qemu_checks_it() {
        let bad = |max_bytes, period_ms| {
            Rng::new(&RngConfig {
                max_bytes,
                period_ms,
                ..RngConfig::new(RngSource::Builtin)
            })
            .unwrap_err()
        };
        assert_eq!(
            bad(1, 0).to_string(),
            "'period' parameter expects a positive integer"
        );
        assert_eq!(
            bad(u64::MAX, 1).to_string(),
            "'max-bytes' parameter must be non-negative, and less than 2^63"
        );
        let err = Rng::new(&RngConfig::new(RngSource::File("/nonexistent/rng".into())))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/rng") && err.contains("rng-builtin"),
            "{err}"
        );
        assert!(Rng::new(&RngConfig::new(RngSource::File("/dev/urandom".into()))).is_ok());
    }
}
