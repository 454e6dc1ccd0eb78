//! The memory oracle: is this memory image a state the dirtier could be in?
//!
//! Rules, with `P` = the header's completed passes and `N` its working set:
//!
//! 1. The header at [`HEADER_GPA`] has the magic and layout version 1, and is
//!    self-consistent: at most 8 page-aligned, ascending, non-overlapping
//!    ranges in `[2 MiB, 64 GiB)`, `N` no more than their pages, a stride
//!    coprime with `N` (1 when `N <= 1`), flags 0 or 1.
//! 2. In sweep order the counters (offset 0) read `(P+1)* P*`: pass `P+1`
//!    stopped somewhere. When `P == 0` the tail pages were never written and
//!    are zero at offsets 0, 8 and 4088.
//! 3. Every written page holds its own GPA at offset 8 ([`OracleError::MisplacedPage`])
//!    and the same counter at offset 4088 as at offset 0
//!    ([`OracleError::TornPage`]). One exception: the guest writes offset
//!    4088 first, so the page at the cursor may be caught mid-write with
//!    `P+1` at 4088 and `P` at offset 0.
//! 4. Once the header says the fill is done, every usable page outside the
//!    working set carries the fill signature ([`OracleError::FillLost`]).
//!
//! Without a fill, pages past the working set are not read: that is where
//! a `balloon=1` guest takes its balloon pages from (and it refuses
//! `fill=1`), so pages the host discarded, which read zero, and pages given
//! back never reach these rules.
//!
//! A write lost on the very last page before the cursor looks exactly like a
//! guest stopped one page earlier; callers that know where the guest stopped
//! can compare [`OracleReport::cursor`].
//!
//! The image is read range by range in GPA order, in large chunks; sweep
//! positions come from the modular inverse of the stride, so a 4 GiB image is
//! one sequential read.

use serde::Serialize;

use crate::{
    header, PhysMem, FILL_SIGNATURE, HEADER_GPA, HEADER_MAGIC, HEADER_VERSION, IDENTITY_MAP_LIMIT,
    MAX_RANGES, PAGE_SIZE, PAGE_TAIL_OFFSET, USABLE_RAM_START,
};

/// Pages read per chunk (4 MiB).
const CHUNK_PAGES: u64 = 1024;

/// A usable RAM range, as recorded in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UsableRange {
    pub start: u64,
    pub len: u64,
}

/// What a passing image says about the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OracleReport {
    /// Completed passes `P` (header).
    pub passes: u64,
    pub working_set_pages: u64,
    pub stride: u64,
    /// Sweep index where counters drop from `P+1` to `P`; `N` when all equal.
    pub cursor: u64,
    pub fill: bool,
    pub fill_done: bool,
    /// Fill pages carrying an intact signature.
    pub filled_pages: u64,
    pub tsc_khz: u64,
    pub ranges: Vec<UsableRange>,
}

/// Why an image is not a state the dirtier could be in.
#[derive(Debug, thiserror::Error)]
pub enum OracleError {
    #[error(
        "no dirtier header at GPA {HEADER_GPA:#x}: not a dirtier memory image, \
         or the guest had not finished booting"
    )]
    NoHeader,
    #[error("dirtier header has layout version {found}, expected {HEADER_VERSION}")]
    UnsupportedVersion { found: u64 },
    #[error("dirtier header is inconsistent: {reason}")]
    BadHeader { reason: String },
    #[error(
        "stale page at GPA {gpa:#x} (sweep index {index}): counter {found}, expected {expected} \
         (header passes {passes})"
    )]
    StalePage {
        gpa: u64,
        index: u64,
        found: u64,
        expected: u64,
        passes: u64,
    },
    #[error(
        "torn page at GPA {gpa:#x} (sweep index {index}): counter {head} at offset 0 \
         but {tail} at offset 4088, expected {head}"
    )]
    TornPage {
        gpa: u64,
        index: u64,
        head: u64,
        tail: u64,
    },
    #[error(
        "misplaced page at GPA {gpa:#x} (sweep index {index}): offset 8 holds {found:#x}, \
         expected {expected:#x}"
    )]
    MisplacedPage {
        gpa: u64,
        index: u64,
        found: u64,
        expected: u64,
    },
    #[error(
        "fill lost at GPA {gpa:#x} (usable page {index}): offset {offset} holds {found:#x}, \
         expected {expected:#x}"
    )]
    FillLost {
        gpa: u64,
        index: u64,
        offset: usize,
        found: u64,
        expected: u64,
    },
    #[error("cannot read guest memory at GPA {gpa:#x}, {len:#x} bytes")]
    ReadMemory {
        gpa: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
}

impl OracleError {
    /// A stable snake_case name for the failure class (JSON output).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoHeader => "no_header",
            Self::UnsupportedVersion { .. } => "unsupported_version",
            Self::BadHeader { .. } => "bad_header",
            Self::StalePage { .. } => "stale_page",
            Self::TornPage { .. } => "torn_page",
            Self::MisplacedPage { .. } => "misplaced_page",
            Self::FillLost { .. } => "fill_lost",
            Self::ReadMemory { .. } => "read_memory",
        }
    }

    /// True when the image could not be read, as opposed to read and rejected.
    pub fn is_io(&self) -> bool {
        matches!(self, Self::ReadMemory { .. })
    }
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(le)
}

fn read<M: PhysMem + ?Sized>(mem: &M, gpa: u64, buf: &mut [u8]) -> Result<(), OracleError> {
    mem.read_phys(gpa, buf)
        .map_err(|source| OracleError::ReadMemory {
            gpa,
            len: buf.len(),
            source,
        })
}

fn bad(reason: impl Into<String>) -> OracleError {
    OracleError::BadHeader {
        reason: reason.into(),
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Inverse of `s` modulo `n` (`gcd(s, n) == 1`, `n >= 1`).
fn mod_inverse(s: u64, n: u64) -> u64 {
    let (mut r0, mut r1) = (i128::from(n), i128::from(s % n));
    let (mut t0, mut t1) = (0i128, 1i128);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    t0.rem_euclid(i128::from(n)) as u64
}

/// The validated header.
#[derive(Debug)]
struct Header {
    ws_pages: u64,
    stride: u64,
    passes: u64,
    fill: bool,
    fill_done: bool,
    tsc_khz: u64,
    ranges: Vec<UsableRange>,
}

impl Header {
    fn read<M: PhysMem + ?Sized>(mem: &M) -> Result<Self, OracleError> {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        read(mem, HEADER_GPA, &mut page)?;
        if u64_at(&page, header::MAGIC) != HEADER_MAGIC {
            return Err(OracleError::NoHeader);
        }
        let version = u64_at(&page, header::VERSION);
        if version != HEADER_VERSION {
            return Err(OracleError::UnsupportedVersion { found: version });
        }
        let flag = |offset: usize, name: &str| match u64_at(&page, offset) {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(bad(format!("{name} flag is {other}, expected 0 or 1"))),
        };
        let fill = flag(header::FILL, "fill")?;
        let fill_done = flag(header::FILL_DONE, "fill done")?;
        if fill_done && !fill {
            return Err(bad("fill done without fill"));
        }
        let nranges = u64_at(&page, header::NRANGES);
        if nranges > MAX_RANGES as u64 {
            return Err(bad(format!(
                "{nranges} usable ranges, at most {MAX_RANGES}"
            )));
        }
        let mut ranges = Vec::with_capacity(nranges as usize);
        let mut total_pages = 0u64;
        let mut prev_end = USABLE_RAM_START;
        for k in 0..nranges as usize {
            let start = u64_at(&page, header::RANGES + 16 * k);
            let len = u64_at(&page, header::RANGES + 16 * k + 8);
            let end = start.saturating_add(len);
            if start % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 {
                return Err(bad(format!(
                    "range {k} ({start:#x}, {len:#x} bytes) is not whole pages"
                )));
            }
            if start < prev_end || end > IDENTITY_MAP_LIMIT {
                return Err(bad(format!(
                    "range {k} ({start:#x}..{end:#x}) overlaps, is out of order, or is outside \
                     [{USABLE_RAM_START:#x}, {IDENTITY_MAP_LIMIT:#x})"
                )));
            }
            prev_end = end;
            total_pages += len / PAGE_SIZE;
            ranges.push(UsableRange { start, len });
        }
        let ws_pages = u64_at(&page, header::WS_PAGES);
        if ws_pages > total_pages {
            return Err(bad(format!(
                "working set of {ws_pages} pages exceeds {total_pages} usable pages"
            )));
        }
        let stride = u64_at(&page, header::STRIDE);
        let stride_ok = if ws_pages <= 1 {
            stride == 1
        } else {
            stride >= 1 && stride < ws_pages && gcd(stride, ws_pages) == 1
        };
        if !stride_ok {
            return Err(bad(format!(
                "stride {stride} is not coprime with, and below, {ws_pages} pages"
            )));
        }
        Ok(Self {
            ws_pages,
            stride,
            passes: u64_at(&page, header::PASSES),
            fill,
            fill_done,
            tsc_khz: u64_at(&page, header::TSC_KHZ),
            ranges,
        })
    }

    /// GPA of usable page `index`.
    fn page_gpa(&self, mut index: u64) -> u64 {
        for range in &self.ranges {
            let pages = range.len / PAGE_SIZE;
            if index < pages {
                return range.start + index * PAGE_SIZE;
            }
            index -= pages;
        }
        unreachable!("page index checked against the usable pages")
    }
}

/// Working-set page state, indexed by sweep position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Class {
    /// Counter `P` (or never written when `P == 0`).
    Lo,
    /// Counter `P + 1`.
    Hi,
    /// Counter `P` at offset 0, `P + 1` at 4088: caught mid-write.
    InFlight,
    /// Any other counter.
    Other,
}

/// Check a dirtier memory image. See the module documentation for the rules.
pub fn check<M: PhysMem + ?Sized>(mem: &M) -> Result<OracleReport, OracleError> {
    let hdr = Header::read(mem)?;
    let n = hdr.ws_pages;
    let p = hdr.passes;
    let next = p.wrapping_add(1);
    let inverse = if n <= 1 {
        0
    } else {
        mod_inverse(hdr.stride, n)
    };

    let mut classes = vec![Class::Lo; n as usize];
    // The smallest sweep index holding an unexpected counter, and that counter.
    let mut first_other: Option<(u64, u64)> = None;
    let mut filled_pages = 0u64;
    let mut buf = vec![0u8; (CHUNK_PAGES * PAGE_SIZE) as usize];
    let mut index = 0u64; // usable page index
    let mut sweep = 0u64; // its sweep position, while index < n

    'ranges: for range in &hdr.ranges {
        let pages = range.len / PAGE_SIZE;
        let mut done = 0u64;
        while done < pages {
            // Without a fill, pages past the working set are not read at all.
            let limit = if hdr.fill {
                u64::MAX
            } else {
                n.saturating_sub(index)
            };
            if limit == 0 {
                break 'ranges;
            }
            let count = (pages - done).min(CHUNK_PAGES).min(limit);
            let gpa0 = range.start + done * PAGE_SIZE;
            let chunk = &mut buf[..(count * PAGE_SIZE) as usize];
            read(mem, gpa0, chunk)?;
            for (k, page) in chunk.chunks_exact(PAGE_SIZE as usize).enumerate() {
                let gpa = gpa0 + k as u64 * PAGE_SIZE;
                let head = u64_at(page, 0);
                let at8 = u64_at(page, 8);
                let tail = u64_at(page, PAGE_TAIL_OFFSET);
                if index < n {
                    let j = sweep;
                    let written = !(p == 0 && head == 0);
                    let class = if head == next {
                        if tail != next {
                            return Err(OracleError::TornPage {
                                gpa,
                                index: j,
                                head,
                                tail,
                            });
                        }
                        Class::Hi
                    } else if head == p && tail == p {
                        Class::Lo
                    } else if head == p && tail == next {
                        Class::InFlight
                    } else if head == p {
                        return Err(OracleError::TornPage {
                            gpa,
                            index: j,
                            head,
                            tail,
                        });
                    } else {
                        first_other = match first_other {
                            Some((j0, _)) if j0 < j => first_other,
                            _ => Some((j, head)),
                        };
                        Class::Other
                    };
                    // An in-flight page in pass 1 may not have its GPA yet.
                    let gpa_ok = if class == Class::InFlight && p == 0 {
                        at8 == gpa || at8 == 0
                    } else if written {
                        at8 == gpa
                    } else {
                        at8 == 0
                    };
                    if class != Class::Other && !gpa_ok {
                        let expected = if written || class == Class::InFlight {
                            gpa
                        } else {
                            0
                        };
                        return Err(OracleError::MisplacedPage {
                            gpa,
                            index: j,
                            found: at8,
                            expected,
                        });
                    }
                    classes[j as usize] = class;
                    sweep = if sweep >= n - inverse {
                        sweep - (n - inverse)
                    } else {
                        sweep + inverse
                    };
                } else {
                    let not_gpa = !gpa;
                    let lost = if head != gpa {
                        Some((0, head, gpa))
                    } else if page[8..16] != FILL_SIGNATURE {
                        Some((8, at8, u64::from_le_bytes(FILL_SIGNATURE)))
                    } else if tail != not_gpa {
                        Some((PAGE_TAIL_OFFSET, tail, not_gpa))
                    } else {
                        None
                    };
                    match lost {
                        None => filled_pages += 1,
                        Some((offset, found, expected)) if hdr.fill_done => {
                            return Err(OracleError::FillLost {
                                gpa,
                                index,
                                offset,
                                found,
                                expected,
                            });
                        }
                        Some(_) => {}
                    }
                }
                index += 1;
            }
            done += count;
        }
    }

    // Sweep order must read (P+1)* [in-flight] P*; the prefix length is the
    // number of P+1 pages, so a lost write shows up at its own sweep index.
    let hi = classes.iter().filter(|&&c| c == Class::Hi).count() as u64;
    for (j, &class) in classes.iter().enumerate() {
        let j = j as u64;
        let expected = if j < hi { next } else { p };
        let found = match class {
            Class::Hi if j < hi => continue,
            Class::Lo if j >= hi => continue,
            Class::InFlight if j == hi => continue,
            Class::InFlight => {
                let gpa =
                    hdr.page_gpa(((u128::from(j) * u128::from(hdr.stride)) % u128::from(n)) as u64);
                return Err(OracleError::TornPage {
                    gpa,
                    index: j,
                    head: p,
                    tail: next,
                });
            }
            Class::Hi => next,
            Class::Lo => p,
            Class::Other => first_other.map_or(0, |(_, found)| found),
        };
        let gpa = hdr.page_gpa(((u128::from(j) * u128::from(hdr.stride)) % u128::from(n)) as u64);
        return Err(OracleError::StalePage {
            gpa,
            index: j,
            found,
            expected,
            passes: p,
        });
    }

    Ok(OracleReport {
        passes: p,
        working_set_pages: n,
        stride: hdr.stride,
        cursor: if hi == 0 || hi == n { n } else { hi },
        fill: hdr.fill,
        fill_done: hdr.fill_done,
        filled_pages,
        tsc_khz: hdr.tsc_khz,
        ranges: hdr.ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::SyntheticGuest;

    const MIB: u64 = 1 << 20;

    /// Two ranges with a hole, like a guest with an MMIO gap.
    fn guest(ws_pages: u64, random: bool, fill: bool) -> SyntheticGuest {
        SyntheticGuest::new(
            &[(2 * MIB, MIB), (4 * MIB, 2 * MIB)],
            ws_pages,
            random,
            fill,
        )
    }

    fn put(image: &mut [u8], gpa: u64, offset: usize, value: u64) {
        let at = gpa as usize + offset;
        image[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    #[test]
    fn mod_inverse_inverts() {
        for (s, n) in [(1, 1), (1, 7), (3, 7), (235, 384), (5, 1 << 20)] {
            assert_eq!(mod_inverse(s, n) * s % n, 1 % n, "s={s} n={n}");
        }
    }

    #[test]
    fn sequential_mid_pass_passes() {
        let g = guest(300, false, false);
        let report = check(&g.image(3, 120, false)).unwrap();
        assert_eq!((report.passes, report.cursor, report.stride), (3, 120, 1));
        assert_eq!(report.working_set_pages, 300);
        assert_eq!(report.ranges.len(), 2);
    }

    #[test]
    fn pass_boundaries_pass() {
        let g = guest(300, true, false);
        // All pages at P (header just updated) and all at P + 1 (not yet).
        assert_eq!(check(&g.image(2, 0, false)).unwrap().cursor, 300);
        assert_eq!(check(&g.image(2, 300, false)).unwrap().cursor, 300);
    }

    #[test]
    fn stride_pattern_mid_pass_passes() {
        let g = guest(300, true, false);
        assert_eq!(g.stride, 187);
        let report = check(&g.image(1, 77, false)).unwrap();
        assert_eq!((report.stride, report.cursor), (187, 77));
    }

    #[test]
    fn first_pass_tail_is_never_written() {
        let g = guest(300, true, false);
        assert_eq!(check(&g.image(0, 10, false)).unwrap().cursor, 10);
        assert_eq!(check(&g.image(0, 0, false)).unwrap().cursor, 300);
    }

    #[test]
    fn page_caught_mid_write_passes() {
        let g = guest(300, true, false);
        for p in [0, 4] {
            let mut image = g.image(p, 50, false);
            let gpa = g.gpa_at_sweep(50);
            put(&mut image, gpa, PAGE_TAIL_OFFSET, p + 1);
            assert_eq!(check(&image).unwrap().cursor, 50, "p={p}");
        }
    }

    #[test]
    fn idle_guest_passes() {
        let g = guest(0, false, false);
        let report = check(&g.image(0, 0, false)).unwrap();
        assert_eq!(
            (report.working_set_pages, report.cursor, report.stride),
            (0, 0, 1)
        );
    }

    #[test]
    fn fill_passes_and_counts() {
        let g = guest(100, false, true);
        let report = check(&g.image(5, 0, true)).unwrap();
        assert_eq!(report.filled_pages, g.total_pages() - 100);
        assert!(report.fill_done);
    }

    #[test]
    fn stale_page_fails_at_its_sweep_index() {
        let g = guest(300, true, false);
        let mut image = g.image(3, 120, false);
        let gpa = g.gpa_at_sweep(40);
        put(&mut image, gpa, 0, 3);
        put(&mut image, gpa, PAGE_TAIL_OFFSET, 3);
        match check(&image).unwrap_err() {
            OracleError::StalePage {
                gpa: at,
                index,
                found,
                expected,
                passes,
            } => {
                assert_eq!((at, index, found, expected, passes), (gpa, 40, 3, 4, 3));
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn old_counter_fails_as_stale() {
        let g = guest(300, false, false);
        let mut image = g.image(3, 120, false);
        let gpa = g.gpa_at_sweep(200);
        put(&mut image, gpa, 0, 1);
        put(&mut image, gpa, PAGE_TAIL_OFFSET, 1);
        let err = check(&image).unwrap_err();
        assert!(
            matches!(
                err,
                OracleError::StalePage {
                    index: 200,
                    found: 1,
                    expected: 3,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn torn_page_fails() {
        let g = guest(300, false, false);
        let mut image = g.image(3, 120, false);
        let gpa = g.gpa_at_sweep(10);
        put(&mut image, gpa, PAGE_TAIL_OFFSET, 3);
        let err = check(&image).unwrap_err();
        assert!(
            matches!(
                err,
                OracleError::TornPage {
                    index: 10,
                    head: 4,
                    tail: 3,
                    ..
                }
            ),
            "{err}"
        );
        // Mid-write is only allowed at the cursor.
        let mut image = g.image(3, 120, false);
        put(&mut image, g.gpa_at_sweep(200), PAGE_TAIL_OFFSET, 4);
        let err = check(&image).unwrap_err();
        assert!(
            matches!(
                err,
                OracleError::TornPage {
                    index: 200,
                    head: 3,
                    tail: 4,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn misplaced_page_fails() {
        let g = guest(300, false, false);
        let mut image = g.image(3, 120, false);
        // The page at sweep index 7 copied over the page at sweep index 8.
        let (from, to) = (g.gpa_at_sweep(7), g.gpa_at_sweep(8));
        image.copy_within(from as usize..(from + PAGE_SIZE) as usize, to as usize);
        match check(&image).unwrap_err() {
            OracleError::MisplacedPage {
                gpa,
                index,
                found,
                expected,
            } => {
                assert_eq!((gpa, index, found, expected), (to, 8, from, to));
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn fill_lost_fails_once_done() {
        let g = guest(100, false, true);
        let gpa = g.gpa_at_index(150);
        let mut image = g.image(1, 0, true);
        put(&mut image, gpa, PAGE_TAIL_OFFSET, 0);
        let err = check(&image).unwrap_err();
        assert!(
            matches!(err, OracleError::FillLost { gpa: at, index: 150, offset: PAGE_TAIL_OFFSET, .. } if at == gpa),
            "{err}"
        );
        // While the fill runs, missing signatures are only counted.
        let mut image = g.image(0, 0, true);
        put(&mut image, HEADER_GPA, header::FILL_DONE, 0);
        put(&mut image, gpa, PAGE_TAIL_OFFSET, 0);
        let report = check(&image).unwrap();
        assert_eq!(report.filled_pages, g.total_pages() - 100 - 1);
    }

    #[test]
    fn missing_header_fails() {
        let image = vec![0u8; 4 * MIB as usize];
        let err = check(&image).unwrap_err();
        assert!(matches!(err, OracleError::NoHeader));
        assert!(err
            .to_string()
            .starts_with("no dirtier header at GPA 0x100000"));
        assert!(matches!(
            check(&vec![0u8; 4096]).unwrap_err(),
            OracleError::ReadMemory { .. }
        ));
    }

    #[test]
    fn insane_header_fails() {
        let g = guest(300, false, false);
        let mut image = g.image(1, 0, false);
        put(&mut image, HEADER_GPA, header::STRIDE, 2); // gcd(2, 300) != 1
        assert!(matches!(
            check(&image).unwrap_err(),
            OracleError::BadHeader { .. }
        ));
        let mut image = g.image(1, 0, false);
        put(&mut image, HEADER_GPA, header::RANGES, 0x10_0000); // below 2 MiB
        assert!(matches!(
            check(&image).unwrap_err(),
            OracleError::BadHeader { .. }
        ));
        let mut image = g.image(1, 0, false);
        put(&mut image, HEADER_GPA, header::VERSION, 2);
        assert!(matches!(
            check(&image).unwrap_err(),
            OracleError::UnsupportedVersion { found: 2 }
        ));
    }

    #[test]
    fn short_image_is_an_io_error() {
        let g = guest(300, false, false);
        let image = g.image(1, 0, false);
        let err = check(&image[..3 * MIB as usize]).unwrap_err();
        assert!(err.is_io(), "{err}");
    }
}
