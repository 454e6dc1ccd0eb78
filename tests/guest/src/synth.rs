//! Synthetic dirtier memory images, built the way the guest writes memory.
//! For oracle tests here and in other crates.

use crate::{
    header, FILL_SIGNATURE, HEADER_GPA, HEADER_MAGIC, HEADER_VERSION, PAGE_SIZE, PAGE_TAIL_OFFSET,
};

/// A dirtier configuration: usable ranges, working set, stride, fill.
#[derive(Debug, Clone)]
pub struct SyntheticGuest {
    /// (start GPA, length in bytes), ascending, page aligned, from 2 MiB.
    pub ranges: Vec<(u64, u64)>,
    pub ws_pages: u64,
    pub stride: u64,
    pub fill: bool,
    pub tsc_khz: u64,
}

/// The guest's stride rule: 1 for seq or `n <= 1`, else the first `s` from
/// `n * 618 / 1000` with `gcd(s, n) == 1`.
pub fn dirtier_stride(n: u64, random: bool) -> u64 {
    if !random || n <= 1 {
        return 1;
    }
    let gcd = |mut a: u64, mut b: u64| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let mut s = (n * 618 / 1000).max(1);
    while gcd(s, n) != 1 {
        s += 1;
    }
    s
}

impl SyntheticGuest {
    pub fn new(ranges: &[(u64, u64)], ws_pages: u64, random: bool, fill: bool) -> Self {
        Self {
            ranges: ranges.to_vec(),
            ws_pages,
            stride: dirtier_stride(ws_pages, random),
            fill,
            tsc_khz: 2_000_000,
        }
    }

    pub fn total_pages(&self) -> u64 {
        self.ranges.iter().map(|&(_, len)| len / PAGE_SIZE).sum()
    }

    /// GPA of usable page `index`.
    pub fn gpa_at_index(&self, mut index: u64) -> u64 {
        for &(start, len) in &self.ranges {
            if index < len / PAGE_SIZE {
                return start + index * PAGE_SIZE;
            }
            index -= len / PAGE_SIZE;
        }
        panic!("page index beyond usable RAM")
    }

    /// GPA of the page written at sweep index `j`.
    pub fn gpa_at_sweep(&self, j: u64) -> u64 {
        self.gpa_at_index(j * self.stride % self.ws_pages)
    }

    /// The memory image (from GPA 0) of a guest that completed `passes`
    /// passes and wrote sweep indices `0..cursor` of the next one.
    pub fn image(&self, passes: u64, cursor: u64, fill_done: bool) -> Vec<u8> {
        let end = self.ranges.iter().map(|&(s, l)| s + l).max().unwrap_or(0);
        let mut image = vec![0u8; end.max(HEADER_GPA + PAGE_SIZE) as usize];
        let mut put = |gpa: u64, offset: usize, value: u64| {
            let at = gpa as usize + offset;
            image[at..at + 8].copy_from_slice(&value.to_le_bytes());
        };
        let h = HEADER_GPA;
        put(h, header::VERSION, HEADER_VERSION);
        put(h, header::WS_PAGES, self.ws_pages);
        put(h, header::STRIDE, self.stride);
        put(h, header::PASSES, passes);
        put(h, header::FILL, u64::from(self.fill));
        put(h, header::FILL_DONE, u64::from(fill_done));
        put(h, header::TSC_KHZ, self.tsc_khz);
        put(h, header::NRANGES, self.ranges.len() as u64);
        for (k, &(start, len)) in self.ranges.iter().enumerate() {
            put(h, header::RANGES + 16 * k, start);
            put(h, header::RANGES + 16 * k + 8, len);
        }
        put(h, header::MAGIC, HEADER_MAGIC);
        if self.fill && fill_done {
            for index in self.ws_pages..self.total_pages() {
                let gpa = self.gpa_at_index(index);
                put(gpa, 0, gpa);
                put(gpa, 8, u64::from_le_bytes(FILL_SIGNATURE));
                put(gpa, PAGE_TAIL_OFFSET, !gpa);
            }
        }
        for j in 0..self.ws_pages {
            let value = if j < cursor { passes + 1 } else { passes };
            if value == 0 {
                continue;
            }
            let gpa = self.gpa_at_sweep(j);
            put(gpa, PAGE_TAIL_OFFSET, value);
            put(gpa, 8, gpa);
            put(gpa, 0, value);
        }
        image
    }
}
