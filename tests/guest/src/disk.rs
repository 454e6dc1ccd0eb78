//! The disk oracle: is this disk image one the dirtier (`blk=K`) could have
//! written?
//!
//! In pass `p` the guest writes [`record`]`(p, K)` to sector `p mod K` (and
//! reads it back) before the header's pass count becomes `p`. So with `P` =
//! the header's completed passes, from a memory image taken at the same
//! moment as the disk image:
//!
//! 1. Every sector in `0..K` is all zeros (never written) or a well-formed
//!    record: magic, `!p` and the pattern all match its pass `p >= 1`
//!    ([`DiskError::MalformedRecord`]: a torn or mixed write), and it sits in
//!    sector `p mod K`, the sector it names ([`DiskError::MisplacedRecord`]).
//! 2. No record claims a pass above `P + 1` ([`DiskError::FutureRecord`]):
//!    pass `P + 1` may have written its record before the header update.
//! 3. For every `j` in `max(1, P-K+1)..=P`, sector `j mod K` holds the record
//!    of pass `j`, or of pass `j + K` when `j + K == P + 1`
//!    ([`DiskError::StaleRecord`]: a lost or stale write).

use serde::Serialize;

/// Bytes per sector (virtio-blk's fixed unit).
pub const SECTOR_SIZE: usize = 512;
/// The record's first 8 bytes.
pub const BLK_MAGIC: [u8; 8] = *b"FERRYBLK";
/// Word `k` (4..63) of pass `p`'s record is `(p + k) * PATTERN_MULTIPLIER`.
pub const PATTERN_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

/// The 512-byte record pass `pass` writes with `blk=k` (`k >= 1`).
pub fn record(pass: u64, k: u64) -> [u8; SECTOR_SIZE] {
    let mut words = [0u64; SECTOR_SIZE / 8];
    words[0] = u64::from_le_bytes(BLK_MAGIC);
    words[1] = pass;
    words[2] = pass % k;
    words[3] = !pass;
    for (i, word) in words.iter_mut().enumerate().skip(4) {
        *word = pass.wrapping_add(i as u64).wrapping_mul(PATTERN_MULTIPLIER);
    }
    let mut bytes = [0u8; SECTOR_SIZE];
    for (chunk, word) in bytes.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    bytes
}

/// The disk image (`k` sectors) of a guest that completed `passes` passes,
/// plus the next pass's record when `ahead`. For tests here and elsewhere.
pub fn image(k: u64, passes: u64, ahead: bool) -> Vec<u8> {
    let mut disk = vec![0u8; k as usize * SECTOR_SIZE];
    let last = passes + u64::from(ahead);
    for p in (last + 1).saturating_sub(k).max(1)..=last {
        let at = (p % k) as usize * SECTOR_SIZE;
        disk[at..at + SECTOR_SIZE].copy_from_slice(&record(p, k));
    }
    disk
}

/// What a passing disk image says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskReport {
    /// Completed passes `P`, from the memory image.
    pub passes: u64,
    /// Sectors in use (`K`).
    pub sectors: u64,
    /// Well-formed records found.
    pub records: u64,
    /// Pass `P + 1` had already written its record.
    pub ahead: bool,
}

/// Why a disk image is not one the dirtier could have written.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("blk=0: the guest writes no disk records")]
    NoSectors,
    #[error("disk image has {len} bytes, blk={k} needs {needed}")]
    ShortDisk { len: usize, k: u64, needed: usize },
    #[error("malformed record in sector {sector}: {reason}")]
    MalformedRecord { sector: u64, reason: String },
    #[error(
        "sector {sector} holds the record of pass {pass}, which belongs in sector \
         {expected_sector} (the record names sector {named})"
    )]
    MisplacedRecord {
        sector: u64,
        pass: u64,
        expected_sector: u64,
        named: u64,
    },
    #[error(
        "sector {sector} holds the record of pass {pass}, but the header says {passes} passes"
    )]
    FutureRecord { sector: u64, pass: u64, passes: u64 },
    #[error(
        "sector {sector} should hold the record of pass {expected} (header passes {passes}), \
         but holds {}",
        found.map_or("no record".to_owned(), |p| format!("that of pass {p}"))
    )]
    StaleRecord {
        sector: u64,
        expected: u64,
        found: Option<u64>,
        passes: u64,
    },
}

impl DiskError {
    /// A stable snake_case name for the failure class (JSON output).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoSectors => "no_sectors",
            Self::ShortDisk { .. } => "short_disk",
            Self::MalformedRecord { .. } => "malformed_record",
            Self::MisplacedRecord { .. } => "misplaced_record",
            Self::FutureRecord { .. } => "future_record",
            Self::StaleRecord { .. } => "stale_record",
        }
    }
}

fn word(bytes: &[u8], index: usize) -> u64 {
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes[index * 8..index * 8 + 8]);
    u64::from_le_bytes(le)
}

/// The pass whose record sector `sector` holds; `None` when never written.
fn parse(bytes: &[u8], sector: u64, k: u64) -> Result<Option<u64>, DiskError> {
    if bytes.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let malformed = |reason: String| DiskError::MalformedRecord { sector, reason };
    if bytes[..8] != BLK_MAGIC {
        return Err(malformed(format!(
            "no FERRYBLK magic (starts {:02x?})",
            &bytes[..8]
        )));
    }
    let pass = word(bytes, 1);
    if pass == 0 {
        return Err(malformed("pass 0".to_owned()));
    }
    if word(bytes, 3) != !pass {
        return Err(malformed(format!(
            "offset 24 holds {:#x}, expected !{pass} (torn or mixed record)",
            word(bytes, 3)
        )));
    }
    let expected = record(pass, k);
    if let Some(i) = (4..SECTOR_SIZE / 8).find(|&i| word(bytes, i) != word(&expected, i)) {
        return Err(malformed(format!(
            "bytes {}..{} do not match pass {pass} (torn or mixed record)",
            i * 8,
            i * 8 + 8
        )));
    }
    let named = word(bytes, 2);
    if named != sector || pass % k != sector {
        return Err(DiskError::MisplacedRecord {
            sector,
            pass,
            expected_sector: pass % k,
            named,
        });
    }
    Ok(Some(pass))
}

/// Check the first `k` sectors of `disk` against a guest whose header says
/// `passes` completed passes. See the module documentation for the rules.
pub fn check_disk(disk: &[u8], k: u64, passes: u64) -> Result<DiskReport, DiskError> {
    if k == 0 {
        return Err(DiskError::NoSectors);
    }
    let needed = usize::try_from(k)
        .ok()
        .and_then(|k| k.checked_mul(SECTOR_SIZE))
        .filter(|&n| n <= disk.len())
        .ok_or(DiskError::ShortDisk {
            len: disk.len(),
            k,
            needed: (k as usize).saturating_mul(SECTOR_SIZE),
        })?;
    let next = passes.saturating_add(1);
    let mut found = Vec::with_capacity(k as usize);
    for (sector, bytes) in (0u64..).zip(disk[..needed].chunks_exact(SECTOR_SIZE)) {
        let pass = parse(bytes, sector, k)?;
        if let Some(pass) = pass.filter(|&p| p > next) {
            return Err(DiskError::FutureRecord {
                sector,
                pass,
                passes,
            });
        }
        found.push(pass);
    }
    for j in (passes + 1).saturating_sub(k).max(1)..=passes {
        let sector = j % k;
        match found[sector as usize] {
            Some(p) if p == j => {}
            Some(p) if p == j + k && p == next => {}
            other => {
                return Err(DiskError::StaleRecord {
                    sector,
                    expected: j,
                    found: other,
                    passes,
                })
            }
        }
    }
    Ok(DiskReport {
        passes,
        sectors: k,
        records: found.iter().flatten().count() as u64,
        ahead: found.contains(&Some(next)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sector(disk: &mut [u8], s: u64) -> &mut [u8] {
        let at = s as usize * SECTOR_SIZE;
        &mut disk[at..at + SECTOR_SIZE]
    }

    #[test]
    fn record_layout() {
        let r = record(21, 8);
        assert_eq!(&r[..8], b"FERRYBLK");
        assert_eq!(word(&r, 1), 21);
        assert_eq!(word(&r, 2), 5);
        assert_eq!(word(&r, 3), !21);
        assert_eq!(word(&r, 4), 25u64.wrapping_mul(PATTERN_MULTIPLIER));
        assert_eq!(word(&r, 63), 84u64.wrapping_mul(PATTERN_MULTIPLIER));
    }

    #[test]
    fn full_window_passes() {
        let report = check_disk(&image(8, 20, false), 8, 20).unwrap();
        assert_eq!((report.records, report.ahead), (8, false));
    }

    #[test]
    fn next_pass_written_early_passes() {
        // Pass 21 overwrote pass 13's sector before the header said 21.
        let report = check_disk(&image(8, 20, true), 8, 20).unwrap();
        assert_eq!((report.records, report.ahead), (8, true));
        // Before the disk wrapped: pass 4 wrote sector 4, the rest untouched.
        let report = check_disk(&image(8, 3, true), 8, 3).unwrap();
        assert_eq!((report.records, report.ahead), (4, true));
        let report = check_disk(&image(8, 3, false), 8, 3).unwrap();
        assert_eq!((report.records, report.ahead), (3, false));
    }

    #[test]
    fn fresh_disk_and_one_sector_pass() {
        assert_eq!(check_disk(&image(8, 0, false), 8, 0).unwrap().records, 0);
        assert!(check_disk(&image(8, 0, true), 8, 0).unwrap().ahead);
        assert!(check_disk(&image(1, 9, true), 1, 9).unwrap().ahead);
        assert!(!check_disk(&image(1, 9, false), 1, 9).unwrap().ahead);
        // A larger disk: sectors past K are not looked at.
        let mut disk = image(8, 20, false);
        disk.extend_from_slice(&[0xa5; 4096]);
        check_disk(&disk, 8, 20).unwrap();
    }

    #[test]
    fn torn_record_fails_naming_its_sector() {
        let mut disk = image(8, 20, false);
        // The second half of sector 4 still holds pass 12's record.
        sector(&mut disk, 4)[256..].copy_from_slice(&record(12, 8)[256..]);
        let err = check_disk(&disk, 8, 20).unwrap_err();
        assert!(
            matches!(err, DiskError::MalformedRecord { sector: 4, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("bytes 256..264"), "{err}");

        let mut disk = image(8, 20, false);
        sector(&mut disk, 6)[24] ^= 1;
        let err = check_disk(&disk, 8, 20).unwrap_err();
        assert!(
            matches!(err, DiskError::MalformedRecord { sector: 6, .. }),
            "{err}"
        );

        let mut disk = image(8, 20, false);
        sector(&mut disk, 2)[0] = b'X';
        let err = check_disk(&disk, 8, 20).unwrap_err();
        assert!(err.to_string().contains("no FERRYBLK magic"), "{err}");
    }

    #[test]
    fn misplaced_record_fails() {
        let mut disk = image(8, 20, false);
        let pass19 = record(19, 8);
        sector(&mut disk, 4).copy_from_slice(&pass19);
        let err = check_disk(&disk, 8, 20).unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::MisplacedRecord {
                    sector: 4,
                    pass: 19,
                    expected_sector: 3,
                    named: 3
                }
            ),
            "{err}"
        );
        // Checked with the wrong K, every record is misplaced.
        let err = check_disk(&image(8, 20, false), 3, 20).unwrap_err();
        assert!(matches!(err, DiskError::MisplacedRecord { .. }), "{err}");
    }

    #[test]
    fn stale_or_missing_record_fails() {
        // Pass 18's write lost: sector 2 still holds pass 10.
        let mut disk = image(8, 20, false);
        sector(&mut disk, 2).copy_from_slice(&record(10, 8));
        let err = check_disk(&disk, 8, 20).unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::StaleRecord {
                    sector: 2,
                    expected: 18,
                    found: Some(10),
                    passes: 20
                }
            ),
            "{err}"
        );
        // Pass 2's write never reached the disk.
        let mut disk = image(8, 3, false);
        sector(&mut disk, 2).fill(0);
        let err = check_disk(&disk, 8, 3).unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::StaleRecord {
                    sector: 2,
                    expected: 2,
                    found: None,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().ends_with("but holds no record"), "{err}");
        // The disk went back in time: its newest record is older than the window.
        let err = check_disk(&image(8, 12, false), 8, 20).unwrap_err();
        assert!(
            matches!(err, DiskError::StaleRecord { expected: 13, .. }),
            "{err}"
        );
    }

    #[test]
    fn future_record_fails() {
        // The memory image is older than the disk: pass 22 cannot be there yet.
        let err = check_disk(&image(8, 22, false), 8, 20).unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::FutureRecord {
                    pass: 22,
                    passes: 20,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn bad_arguments_fail() {
        assert!(matches!(
            check_disk(&image(8, 3, false), 0, 3),
            Err(DiskError::NoSectors)
        ));
        let err = check_disk(&image(8, 3, false), 9, 3).unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::ShortDisk {
                    len: 4096,
                    k: 9,
                    needed: 4608
                }
            ),
            "{err}"
        );
    }
}
