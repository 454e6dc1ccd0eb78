//! Post-copy on the destination: the guest runs before all of its RAM is
//! here. The pages still to come are missing (userfaultfd); a touch of one,
//! by a vCPU (through KVM) or by a device thread, waits while the page is
//! asked for on the return path, and goes on once it arrived. A missing page
//! the source will not send was zero there, and is zero-filled at once.
//!
//! ```text
//!  fault thread                         receiving thread(s)
//!  wait for a touch ◀── vCPU / device   RamPages of the rest, requested
//!  gpa still to come?                     pages first
//!    yes: ask once (PageRequest)  ───▶  place: UFFDIO_COPY, then clear
//!         (the toucher sleeps)            the bit (that order: a touch
//!    no:  UFFDIO_ZEROPAGE                 in between finds it still to
//!                                         come, never zero-fills it)
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_kvm::{GuestRam, Placed, UffdError, Userfault, PAGE_SIZE};

/// How often the fault thread looks at its stop flag while nothing faults.
const FAULT_POLL: Duration = Duration::from_millis(50);

/// One bit per page of guest RAM, shared between threads.
#[derive(Debug)]
pub(crate) struct PageBits {
    /// Per RAM range: guest-physical base, pages, bits.
    slots: Vec<(u64, u64, Vec<AtomicU64>)>,
}

impl PageBits {
    /// The bits of `words` (per RAM range, bit i of word w = page w*64+i of
    /// the range, as KVM's dirty log), checked against `ram`'s ranges.
    pub fn from_words(ram: &GuestRam, words: &[Vec<u64>]) -> Result<Self, PostcopyError> {
        let ranges = ram.ranges();
        if words.len() != ranges.len() {
            return Err(PostcopyError::BadPageList {
                why: format!("{} ranges, guest RAM has {}", words.len(), ranges.len()),
            });
        }
        let mut slots = Vec::with_capacity(ranges.len());
        for (i, (&(base, size), w)) in ranges.iter().zip(words).enumerate() {
            let pages = size / PAGE_SIZE as u64;
            if w.len() as u64 != pages.div_ceil(64) {
                return Err(PostcopyError::BadPageList {
                    why: format!("range {i} has {} words for {pages} pages", w.len()),
                });
            }
            if pages % 64 != 0 && w.last().is_some_and(|l| l >> (pages % 64) != 0) {
                return Err(PostcopyError::BadPageList {
                    why: format!("range {i} names pages past its end"),
                });
            }
            slots.push((base, pages, w.iter().map(|&x| AtomicU64::new(x)).collect()));
        }
        Ok(Self { slots })
    }

    fn locate(&self, gpa: u64) -> Option<(&AtomicU64, u64)> {
        self.slots.iter().find_map(|(base, pages, bits)| {
            let page = gpa.checked_sub(*base)? / PAGE_SIZE as u64;
            (page < *pages).then(|| (&bits[(page / 64) as usize], 1u64 << (page % 64)))
        })
    }

    pub fn test(&self, gpa: u64) -> bool {
        self.locate(gpa)
            .is_some_and(|(w, bit)| w.load(Ordering::Acquire) & bit != 0)
    }

    /// Clears the bit; whether it was set before.
    pub fn clear(&self, gpa: u64) -> bool {
        self.locate(gpa)
            .is_some_and(|(w, bit)| w.fetch_and(!bit, Ordering::AcqRel) & bit != 0)
    }

    pub fn count(&self) -> u64 {
        self.slots
            .iter()
            .flat_map(|s| s.2.iter())
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Every page whose bit is set, in address order.
    pub fn pages(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (base, _, bits) in &self.slots {
            for (wi, w) in bits.iter().enumerate() {
                let mut word = w.load(Ordering::Acquire);
                while word != 0 {
                    let b = u64::from(word.trailing_zeros());
                    word &= word - 1;
                    out.push(base + (wi as u64 * 64 + b) * PAGE_SIZE as u64);
                }
            }
        }
        out
    }
}

/// Errors of post-copy on the destination.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    #[error(transparent)]
    Userfault(#[from] UffdError),
    #[error("the source's list of pages to come is malformed: {why}")]
    BadPageList { why: String },
    #[error("cannot drop the stale copy of the page at {gpa:#x}")]
    Discard {
        gpa: u64,
        #[source]
        source: ferry_kvm::MemoryError,
    },
    #[error("the source sent the page at {gpa:#x}, which it had not listed to come")]
    Unlisted { gpa: u64 },
    #[error("cannot ask the source for the page at {gpa:#x}")]
    Request {
        gpa: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the source ended with {left} page(s) of guest RAM still missing")]
    Incomplete { left: u64 },
    #[error("cannot start the post-copy fault thread")]
    StartThread(#[source] std::io::Error),
    #[error("the post-copy fault thread panicked")]
    FaultThread,
}

/// What post-copy measured on the destination (QEMU's `postcopy-requests`
/// and `postcopy-blocktime`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PostcopyStats {
    /// Pages asked for because something touched them before they came.
    pub requests: u64,
    /// Touches of pages still to come, each counted once.
    pub faults: u64,
    /// Time those touches waited, summed, in ms.
    pub blocktime_ms: u64,
    /// Missing pages the source never listed, zero-filled on touch.
    pub zero_filled: u64,
}

/// Asks the source for one page (a PageRequest on the return path).
pub(crate) type RequestPage = Box<dyn Fn(u64) -> std::io::Result<()> + Send + Sync>;

#[derive(Default)]
struct Waits {
    /// Touched and not yet placed: since when.
    since: HashMap<u64, Instant>,
    stats: PostcopyStats,
}

/// The destination's missing pages while post-copy runs.
pub(crate) struct PostcopyPages {
    ram: Arc<GuestRam>,
    uffd: Arc<Userfault>,
    missing: Arc<PageBits>,
    waits: Arc<Mutex<Waits>>,
    stop: Arc<AtomicBool>,
    faults: Mutex<Option<JoinHandle<Result<(), PostcopyError>>>>,
}

impl std::fmt::Debug for PostcopyPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostcopyPages")
            .field("missing", &self.missing.count())
            .finish_non_exhaustive()
    }
}

impl PostcopyPages {
    /// Makes the pages of `missing` missing (a copy received during
    /// pre-copy is stale: the guest wrote the page since), registers RAM
    /// with userfaultfd and starts the fault thread, which asks for pages
    /// through `request`. From here, RAM is written only through
    /// [`Self::place`].
    pub fn start(
        ram: Arc<GuestRam>,
        missing: PageBits,
        request: RequestPage,
    ) -> Result<Self, PostcopyError> {
        let uffd = Arc::new(Userfault::new()?);
        // One madvise per run of contiguous pages, not one per page: the
        // guest is paused meanwhile.
        let one_range = |start: u64, len: usize| ram.contains(start, len);
        for (gpa, len) in runs(&missing.pages(), one_range) {
            ram.discard(gpa, len)
                .map_err(|source| PostcopyError::Discard { gpa, source })?;
        }
        uffd.register(&ram)?;
        let missing = Arc::new(missing);
        let waits = Arc::new(Mutex::new(Waits::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (ram, uffd, missing, waits, stop) = (
                Arc::clone(&ram),
                Arc::clone(&uffd),
                Arc::clone(&missing),
                Arc::clone(&waits),
                Arc::clone(&stop),
            );
            std::thread::Builder::new()
                .name("postcopy-faults".into())
                .spawn(move || serve_faults(&ram, &uffd, &missing, &waits, &stop, &request))
                .map_err(PostcopyError::StartThread)?
        };
        Ok(Self {
            ram,
            uffd,
            missing,
            waits,
            stop,
            faults: Mutex::new(Some(thread)),
        })
    }

    /// Places a page the source sent (`None`: a zero page); whoever waits on
    /// it runs on. A page placed already (requested and streamed both) is
    /// left as it is: the source's copy no longer changes.
    pub fn place(&self, gpa: u64, data: Option<&[u8]>) -> Result<(), PostcopyError> {
        if !self.missing.test(gpa) {
            // Sent twice (requested while it was on the wire): nothing to do.
            return if self.ram.contains(gpa, PAGE_SIZE) {
                Ok(())
            } else {
                Err(PostcopyError::Unlisted { gpa })
            };
        }
        let placed = match data {
            Some(d) => self.uffd.copy(&self.ram, gpa, d)?,
            None => self.uffd.zero(&self.ram, gpa)?,
        };
        // Only now: a touch before this line still finds it to come.
        self.missing.clear(gpa);
        if placed == Placed::Already {
            tracing::debug!("post-copy: page {gpa:#x} was there already");
        }
        if let Ok(mut w) = self.waits.lock() {
            if let Some(t) = w.since.remove(&gpa) {
                w.stats.blocktime_ms += t.elapsed().as_millis() as u64;
            }
        }
        Ok(())
    }

    /// Pages still to come.
    pub fn left(&self) -> u64 {
        self.missing.count()
    }

    pub fn stats(&self) -> PostcopyStats {
        self.waits.lock().map(|w| w.stats).unwrap_or_default()
    }

    /// Ends post-copy once every page came: the fault thread stops and RAM
    /// is an ordinary mapping again.
    pub fn finish(&self) -> Result<PostcopyStats, PostcopyError> {
        let left = self.left();
        if left > 0 {
            return Err(PostcopyError::Incomplete { left });
        }
        self.stop_faults()?;
        self.uffd.unregister(&self.ram)?;
        Ok(self.stats())
    }

    fn stop_faults(&self) -> Result<(), PostcopyError> {
        self.stop.store(true, Ordering::Release);
        let thread = self.faults.lock().ok().and_then(|mut f| f.take());
        match thread.map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(PostcopyError::FaultThread),
            None => Ok(()),
        }
    }
}

impl Drop for PostcopyPages {
    fn drop(&mut self) {
        // A failed post-copy: the guest cannot go on (its pages are at the
        // source); the fault thread stops and the VM is dropped with it.
        let _ = self.stop_faults();
    }
}

/// Runs of contiguous pages in `pages` (ascending): (first, bytes); a run
/// grows only while `one_range(start, bytes)` holds (one RAM range).
fn runs(pages: &[u64], one_range: impl Fn(u64, usize) -> bool) -> Vec<(u64, usize)> {
    let mut out: Vec<(u64, usize)> = Vec::new();
    for &gpa in pages {
        match out.last_mut() {
            Some((start, len))
                if *start + *len as u64 == gpa && one_range(*start, *len + PAGE_SIZE) =>
            {
                *len += PAGE_SIZE
            }
            _ => out.push((gpa, PAGE_SIZE)),
        }
    }
    out
}

/// The fault thread: a touch of a page to come asks for it once; a touch of
/// another missing page zero-fills it.
fn serve_faults(
    ram: &GuestRam,
    uffd: &Userfault,
    missing: &PageBits,
    waits: &Mutex<Waits>,
    stop: &AtomicBool,
    request: &RequestPage,
) -> Result<(), PostcopyError> {
    while !stop.load(Ordering::Acquire) {
        let Some(fault) = uffd.wait(ram, FAULT_POLL)? else {
            continue;
        };
        let gpa = fault.gpa;
        if missing.test(gpa) {
            let first = waits.lock().map_or(true, |mut w| {
                let first = !w.since.contains_key(&gpa);
                if first {
                    w.since.insert(gpa, Instant::now());
                    w.stats.faults += 1;
                    w.stats.requests += 1;
                }
                first
            });
            if first {
                request(gpa).map_err(|source| PostcopyError::Request { gpa, source })?;
            }
        } else {
            // Zero at the source (never sent), or placed since the touch.
            if uffd.zero(ram, gpa)? == Placed::Now {
                if let Ok(mut w) = waits.lock() {
                    w.stats.zero_filled += 1;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_kvm::Backing;
    use std::sync::mpsc;

    fn ram() -> Arc<GuestRam> {
        // Three ranges of a transparent huge page each: a write backs its whole
        // range, so the third, never written, is where untouched pages are.
        let ranges = [(0, 2 << 20), (4 << 20, 2 << 20), (8 << 20, 2 << 20)];
        Arc::new(GuestRam::new(&ranges, Backing::Anonymous).expect("ram"))
    }

    fn words(ram: &GuestRam, pages: &[u64]) -> Vec<Vec<u64>> {
        let mut out: Vec<Vec<u64>> = ram
            .ranges()
            .iter()
            .map(|&(_, s)| vec![0; (s / PAGE_SIZE as u64).div_ceil(64) as usize])
            .collect();
        for &gpa in pages {
            let (slot, &(base, _)) = ram
                .ranges()
                .iter()
                .enumerate()
                .find(|(_, &(b, s))| gpa >= b && gpa < b + s)
                .expect("inside");
            let page = (gpa - base) / PAGE_SIZE as u64;
            out[slot][(page / 64) as usize] |= 1 << (page % 64);
        }
        out
    }

    /// A reader of a page still to come waits while it is asked for, and
    /// reads what the source sent; a stale pre-copy copy is never seen; a
    /// page not listed reads as zero at once; finishing needs every page.
    #[test]
    fn touches_wait_for_requested_pages_and_unlisted_ones_read_zero() {
        let ram = ram();
        // Pre-copy sent these two; the guest then rewrote 0x4_1000.
        ram.write(0x2000, b"clean").expect("write");
        ram.write(0x40_1000, b"stale").expect("write");
        let to_come = [0x40_1000u64, 0x3000, 0x10_0000];
        let bits = PageBits::from_words(&ram, &words(&ram, &to_come)).expect("bits");
        assert_eq!(bits.count(), 3);
        let (tx, rx) = mpsc::channel::<u64>();
        let tx = Mutex::new(tx);
        let pages = PostcopyPages::start(
            Arc::clone(&ram),
            bits,
            Box::new(move |gpa| {
                tx.lock()
                    .expect("lock")
                    .send(gpa)
                    .map_err(|_| std::io::ErrorKind::BrokenPipe.into())
            }),
        )
        .expect("start");
        let reader = {
            let ram = Arc::clone(&ram);
            std::thread::spawn(move || {
                let mut clean = [0u8; 5];
                ram.read(0x2000, &mut clean).expect("clean");
                let mut unlisted = [9u8; 4];
                ram.read(0x80_5000, &mut unlisted).expect("unlisted");
                let mut fresh = [0u8; 5];
                ram.read(0x40_1000, &mut fresh).expect("to come");
                (clean, unlisted, fresh)
            })
        };
        let asked = rx.recv_timeout(Duration::from_secs(30)).expect("a request");
        assert_eq!(asked, 0x40_1000);
        let mut page = vec![0u8; PAGE_SIZE];
        page[..5].copy_from_slice(b"fresh");
        pages.place(asked, Some(&page)).expect("place");
        let (clean, unlisted, fresh) = reader.join().expect("reader");
        assert_eq!(&clean, b"clean");
        assert_eq!(unlisted, [0; 4]);
        assert_eq!(&fresh, b"fresh");
        // Streamed again after the request: already there, kept.
        pages.place(asked, Some(&[7u8; PAGE_SIZE])).expect("twice");
        assert!(matches!(
            pages.place(0xc0_0000, None),
            Err(PostcopyError::Unlisted { .. })
        ));
        assert_eq!(pages.left(), 2);
        assert!(matches!(
            pages.finish(),
            Err(PostcopyError::Incomplete { left: 2 })
        ));
        pages.place(0x3000, Some(&[1u8; PAGE_SIZE])).expect("third");
        pages.place(0x10_0000, None).expect("zero");
        let stats = pages.finish().expect("finish");
        assert_eq!(stats.requests, 1);
        assert_eq!(stats.faults, 1);
        assert!(stats.zero_filled >= 1, "{stats:?}");
    }

    #[test]
    fn a_complete_post_copy_ends_with_ordinary_ram() {
        let ram = ram();
        let bits = PageBits::from_words(&ram, &words(&ram, &[0x1000, 0x40_0000])).expect("bits");
        let pages =
            PostcopyPages::start(Arc::clone(&ram), bits, Box::new(|_| Ok(()))).expect("start");
        pages.place(0x1000, Some(&[3u8; PAGE_SIZE])).expect("data");
        pages.place(0x40_0000, None).expect("zero");
        let stats = pages.finish().expect("finish");
        assert_eq!(stats.requests, 0);
        let mut b = [0u8; 2];
        ram.read(0x1000, &mut b).expect("read");
        assert_eq!(b, [3, 3]);
        // Ordinary RAM again: a never-written page reads zero, no thread serves it.
        ram.read(0x90_0000, &mut b).expect("read");
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn contiguous_pages_are_dropped_in_runs() {
        let p = PAGE_SIZE as u64;
        let any = |_, _| true;
        assert_eq!(
            runs(&[0, p, 2 * p, 5 * p, 6 * p, 9 * p], any),
            vec![
                (0, 3 * PAGE_SIZE),
                (5 * p, 2 * PAGE_SIZE),
                (9 * p, PAGE_SIZE)
            ]
        );
        assert!(runs(&[], any).is_empty());
        // Adjacent RAM ranges are dropped apart.
        let below_2 = |start: u64, len: usize| start + len as u64 <= 2 * p || start >= 2 * p;
        assert_eq!(
            runs(&[0, p, 2 * p, 3 * p], below_2),
            vec![(0, 2 * PAGE_SIZE), (2 * p, 2 * PAGE_SIZE)]
        );
    }

    #[test]
    fn a_hostile_page_list_is_refused() {
        let ram = ram();
        let mut w = words(&ram, &[]);
        w.pop();
        assert!(PageBits::from_words(&ram, &w).is_err());
        let mut w = words(&ram, &[]);
        w[0].push(0);
        assert!(PageBits::from_words(&ram, &w).is_err());
    }
}
