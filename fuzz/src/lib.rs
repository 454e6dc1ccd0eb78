//! ferry's fuzz targets, on the stable toolchain.
//!
//! One target per surface that takes input from outside:
//!
//! | target       | surface                                          | module        |
//! |--------------|--------------------------------------------------|---------------|
//! | `receiver`   | the migration-stream receiver (`migration::receive`, return path included) | [`stream`] |
//! | `streams`    | the receiver's page streams (`migration::receive_streams`: Join sections on extra connections to a real listener) | [`streams`] |
//! | `checkpoint` | the checkpoint loader (`persist::restore`)    | [`stream`]    |
//! | `devices`    | virtio-pci device state in a migration stream (`VirtioPci::restore`, then the devices driven) | [`devices`] |
//! | `qmp`        | the QMP framing, parser and dispatcher           | [`qmp`]       |
//! | `argv`       | the QEMU command-line parser                     | [`argv`]      |
//!
//! nightly and cargo-fuzz are not available, so [`Fuzzer`] is a small
//! coverage-less mutation fuzzer: it starts from the committed corpus
//! (`fuzz/corpus/<target>/`; every file is also run unmutated, which makes the
//! regression seeds there regression tests), applies structure-aware mutations
//! (see each target), and keeps a mutated input in its working pool when the
//! outcome class it produced (the kind of error, with numbers stripped) was not
//! seen before: a cheap stand-in for coverage feedback.
//!
//! A crash is a panic (on any thread: a panic hook records it), a run longer
//! than the target's time bound, a peak RSS growth over its memory bound, or a
//! broken target property (e.g. the receiver's return path not ending with the
//! reply that matches the result). The input is written to `fuzz/crashes/` and
//! the failure names the seed and iteration: `FERRY_FUZZ_SEED=<seed>
//! FERRY_FUZZ_ITERS=<iteration+1>` replays the same sequence, and
//! `FERRY_FUZZ_REPLAY=<file>` runs one input.
//!
//! Settings (environment): `FERRY_FUZZ_SECS` (time per target, default 15),
//! `FERRY_FUZZ_SEED` (default: from the clock, printed), `FERRY_FUZZ_ITERS`
//! (stop after this many mutated inputs), `FERRY_FUZZ_CLASSES=1` (print the
//! outcome classes seen at the end).

pub mod argv;
pub mod devices;
pub mod qmp;
pub mod stream;
pub mod streams;

use std::collections::BTreeSet;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

/// A small deterministic generator (splitmix64): the same seed gives the same
/// mutations on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// True `num` times out of `den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next_u64() % den.max(1) < num
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            items.get(self.below(items.len()))
        }
    }

    /// An integer chosen to hit boundaries: 0, ±1, powers of two and their
    /// neighbours, type extremes.
    pub fn interesting_u64(&mut self) -> u64 {
        const FIXED: [u64; 14] = [
            0,
            1,
            2,
            63,
            64,
            65,
            4095,
            4096,
            0x7fff_ffff,
            0xffff_ffff,
            0x1_0000_0000,
            0x7fff_ffff_ffff_ffff,
            u64::MAX,
            u64::MAX - 4095,
        ];
        match self.below(3) {
            0 => FIXED[self.below(FIXED.len())],
            1 => {
                let p = 1u64 << self.below(64);
                match self.below(3) {
                    0 => p,
                    1 => p.wrapping_sub(1),
                    _ => p.wrapping_add(1),
                }
            }
            _ => self.next_u64() >> self.below(64),
        }
    }
}

/// Byte-level mutations any target can use: bit flips, interesting bytes,
/// inserts, deletes, duplicated runs, splices from another input, truncation.
pub fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, pool: &[Vec<u8>]) {
    let ops = 1 + rng.below(4);
    for _ in 0..ops {
        let len = data.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = *rng
                    .pick(&[
                        0u8, 0xff, 0x7f, 0x80, b'{', b'}', b'"', b'\\', b',', b'=', b'\n',
                    ])
                    .unwrap_or(&0);
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                data.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                data.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(256));
                let run = data[i..i + n].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, run);
            }
            5 => {
                if let Some(other) = rng.pick(pool) {
                    if !other.is_empty() {
                        let from = rng.below(other.len());
                        let n = 1 + rng.below((other.len() - from).min(512));
                        let at = rng.below(len + 1);
                        data.splice(at..at, other[from..from + n].iter().copied());
                    }
                }
            }
            6 if len > 0 => data.truncate(rng.below(len)),
            _ if len >= 8 => {
                let i = rng.below(len - 7);
                let v = rng.interesting_u64().to_le_bytes();
                data[i..i + 8].copy_from_slice(&v);
            }
            _ => data.push(rng.next_u64() as u8),
        }
    }
}

/// What one execution produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handled (accepted or refused cleanly); the string is the outcome class
    /// used for feedback, e.g. "refused: checksum mismatch".
    Handled(String),
    /// A target property failed: a bug even without a panic.
    Violation(String),
}

/// The function that runs one input.
pub type ExecFn = Arc<dyn Fn(&[u8]) -> Outcome + Send + Sync>;
/// The function that derives a new input from a pool entry.
pub type MutateFn = Box<dyn Fn(&mut Rng, &[u8], &[Vec<u8>]) -> Vec<u8>>;

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    pub exec: ExecFn,
    pub mutate: MutateFn,
    /// Longest one input may run.
    pub time_bound: Duration,
    /// Largest growth of the process's peak RSS one input may cause.
    pub mem_bound: u64,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("time_bound", &self.time_bound)
            .field("mem_bound", &self.mem_bound)
            .finish_non_exhaustive()
    }
}

/// What a fuzz run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub seed: u64,
    pub corpus_inputs: usize,
    pub executions: u64,
    pub elapsed: Duration,
    pub outcome_classes: usize,
    pub pool: usize,
    pub slowest: Duration,
}

impl Report {
    pub fn per_second(&self) -> f64 {
        self.executions as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A failed run: the input, where it was saved, and how to reproduce it.
#[derive(Debug)]
pub struct Crash {
    pub message: String,
    pub input: Vec<u8>,
    pub saved: Option<PathBuf>,
}

impl std::fmt::Display for Crash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)?;
        if let Some(p) = &self.saved {
            write!(
                f,
                " (input saved to {}; run it alone with FERRY_FUZZ_REPLAY={0})",
                p.display()
            )?;
        }
        Ok(())
    }
}

static PANICKED: AtomicBool = AtomicBool::new(false);
static PANIC_MESSAGE: Mutex<String> = Mutex::new(String::new());
static HOOK: Once = Once::new();

/// Records panics on every thread (vCPU threads included), then prints them as usual.
fn install_panic_hook() {
    HOOK.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            if let Ok(mut m) = PANIC_MESSAGE.lock() {
                let thread = std::thread::current();
                *m = format!("panic on thread {:?}: {info}", thread.name().unwrap_or("?"));
            }
            default(info);
        }));
    });
}

/// The fuzz tests of one process run one at a time: timing and RSS are per process.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// Peak RSS in bytes since the last [`reset_peak_rss`] (VmHWM).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

fn current_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// Resets VmHWM to the current RSS (Linux: "5" into clear_refs).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Runs inputs on a worker thread so that a hang is detected, not suffered.
struct Worker {
    tx: mpsc::Sender<Vec<u8>>,
    rx: mpsc::Receiver<Outcome>,
}

impl Worker {
    fn new(exec: ExecFn) -> Self {
        let (tx, in_rx) = mpsc::channel::<Vec<u8>>();
        let (out_tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("fuzz-exec".into())
            .spawn(move || {
                for input in in_rx {
                    let outcome = panic::catch_unwind(AssertUnwindSafe(|| exec(&input)))
                        .unwrap_or_else(|_| Outcome::Violation("panicked".into()));
                    if out_tx.send(outcome).is_err() {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            // Without a worker every run reports a hang: say why instead.
            eprintln!("cannot start the fuzz worker thread: {e}");
        }
        Self { tx, rx }
    }
}

fn seed_from_env_or_clock() -> u64 {
    if let Some(s) = std::env::var("FERRY_FUZZ_SEED")
        .ok()
        .and_then(|s| parse_u64(&s))
    {
        return s;
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
}

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Seconds each target fuzzes (`FERRY_FUZZ_SECS`, default 15).
pub fn budget() -> Duration {
    let secs = std::env::var("FERRY_FUZZ_SECS")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(15.0);
    Duration::from_secs_f64(secs.max(0.0))
}

/// The committed corpus of `target`: every file of `fuzz/corpus/<target>/`, sorted by name.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

pub fn load_corpus(target: &str) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            std::fs::read(&p).map(|b| (name, b))
        })
        .collect()
}

/// The outcome class of an error message: its plain words (letters, `-`,
/// `'`), at most `words` of them. Numbers, paths and quoted input are left out,
/// so the class names the kind of error, not the input that caused it.
pub fn class_of(prefix: &str, message: &str, words: usize) -> String {
    let cleaned: Vec<&str> = message
        .split(|c: char| c.is_whitespace() || matches!(c, ':' | '(' | ')' | ';' | '.'))
        .filter(|w| {
            !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphabetic() || c == '-' || c == '\'')
        })
        .take(words)
        .collect();
    format!("{prefix}: {}", cleaned.join(" "))
}

/// The fuzzer: runs the corpus unmutated, then mutates for the time budget.
#[derive(Debug)]
pub struct Fuzzer {
    pub target: Target,
    pub seed: u64,
    pub budget: Duration,
    pub max_iterations: Option<u64>,
}

impl Fuzzer {
    /// A fuzzer for `target` with the settings of the environment.
    pub fn from_env(target: Target) -> Self {
        Self {
            target,
            seed: seed_from_env_or_clock(),
            budget: budget(),
            max_iterations: std::env::var("FERRY_FUZZ_ITERS")
                .ok()
                .and_then(|s| parse_u64(&s)),
        }
    }

    /// Runs one input under the bounds.
    fn run_one(
        &self,
        worker: &Worker,
        input: &[u8],
        what: &str,
    ) -> Result<(Outcome, Duration), Crash> {
        let crash = |message: String| {
            let saved = save_crash(self.target.name, input);
            Crash {
                message: format!("fuzz target {}: {what}: {message}", self.target.name),
                input: input.to_vec(),
                saved,
            }
        };
        PANICKED.store(false, Ordering::SeqCst);
        let rss_before = current_rss();
        reset_peak_rss();
        let t = Instant::now();
        worker
            .tx
            .send(input.to_vec())
            .map_err(|_| crash("the worker thread is gone".into()))?;
        let outcome = match worker.rx.recv_timeout(self.target.time_bound) {
            Ok(o) => o,
            Err(_) => {
                return Err(crash(format!(
                    "no result within the bound of {:?} (a hang)",
                    self.target.time_bound
                )))
            }
        };
        let took = t.elapsed();
        if PANICKED.load(Ordering::SeqCst) {
            let msg = PANIC_MESSAGE.lock().map(|m| m.clone()).unwrap_or_default();
            return Err(crash(msg));
        }
        if let Outcome::Violation(v) = &outcome {
            return Err(crash(format!("property violated: {v}")));
        }
        if let (Some(before), Some(peak)) = (rss_before, peak_rss()) {
            let grew = peak.saturating_sub(before);
            if grew > self.target.mem_bound {
                return Err(crash(format!(
                    "peak RSS grew by {} MiB, over the bound of {} MiB",
                    grew >> 20,
                    self.target.mem_bound >> 20
                )));
            }
        }
        Ok((outcome, took))
    }

    /// Runs the whole campaign.
    pub fn run(&self) -> Result<Report, Crash> {
        install_panic_hook();
        let corpus = load_corpus(self.target.name).map_err(|e| Crash {
            message: format!(
                "cannot read the corpus {}: {e}",
                corpus_dir(self.target.name).display()
            ),
            input: Vec::new(),
            saved: None,
        })?;
        eprintln!(
            "fuzz {}: seed {:#x} ({} corpus inputs, {:?}); reproduce with FERRY_FUZZ_SEED={:#x}",
            self.target.name,
            self.seed,
            corpus.len(),
            self.budget,
            self.seed
        );
        let worker = Worker::new(self.target.exec.clone());
        let mut classes = BTreeSet::new();
        let mut pool: Vec<Vec<u8>> = Vec::new();
        let mut report = Report {
            seed: self.seed,
            corpus_inputs: corpus.len(),
            ..Report::default()
        };
        for (name, input) in &corpus {
            let (outcome, took) = self.run_one(&worker, input, &format!("corpus file {name}"))?;
            report.slowest = report.slowest.max(took);
            if let Outcome::Handled(c) = outcome {
                classes.insert(c);
            }
            pool.push(input.clone());
        }
        if pool.is_empty() {
            pool.push(Vec::new());
        }
        let mut rng = Rng::new(self.seed);
        let start = Instant::now();
        let mut iteration = 0u64;
        while start.elapsed() < self.budget && self.max_iterations.is_none_or(|m| iteration < m) {
            let base = rng.below(pool.len());
            let input = (self.target.mutate)(&mut rng, &pool[base], &pool);
            let what = format!(
                "seed {:#x} iteration {iteration} (replay: FERRY_FUZZ_SEED={:#x} FERRY_FUZZ_ITERS={})",
                self.seed,
                self.seed,
                iteration + 1
            );
            let (outcome, took) = self.run_one(&worker, &input, &what)?;
            report.slowest = report.slowest.max(took);
            if let Outcome::Handled(c) = outcome {
                // New behaviour: keep the input to mutate further (bounded pool).
                if classes.insert(c) && pool.len() < 512 {
                    pool.push(input);
                }
            }
            iteration += 1;
        }
        report.executions = iteration;
        report.elapsed = start.elapsed();
        report.outcome_classes = classes.len();
        report.pool = pool.len();
        if std::env::var("FERRY_FUZZ_CLASSES").as_deref() == Ok("1") {
            for c in &classes {
                eprintln!("  class: {c}");
            }
        }
        eprintln!(
            "fuzz {}: {} executions in {:.1} s ({:.0}/s), {} outcome classes, pool {}, slowest input {:?}",
            self.target.name,
            report.executions,
            report.elapsed.as_secs_f64(),
            report.per_second(),
            report.outcome_classes,
            report.pool,
            report.slowest
        );
        Ok(report)
    }

    /// Runs one input (a crash file) under the bounds.
    pub fn replay(&self, input: &[u8]) -> Result<Outcome, Crash> {
        install_panic_hook();
        let worker = Worker::new(self.target.exec.clone());
        self.run_one(&worker, input, "replayed input")
            .map(|(o, _)| o)
    }
}

fn save_crash(target: &str, input: &[u8]) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crashes");
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join(format!("{target}-{:08x}.bin", crc32fast::hash(input)));
    std::fs::write(&path, input).ok()?;
    Some(path)
}
