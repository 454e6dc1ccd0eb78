//! Guest physical memory layout: RAM ranges, the E820 / PVH memory map and
//! the fixed guest addresses of the boot structures.
//!
//! ```text
//! 0x0000_0500  boot GDT (4 entries)          (Linux 64-bit and PVH)
//! 0x0000_0520  boot IDT (one null entry)     (Linux 64-bit and PVH)
//! 0x0000_6000  hvm_start_info                (PVH)
//! 0x0000_6040  PVH memory map, 24 bytes/entry (PVH)
//! 0x0000_6f00  PVH module list (the initrd)  (PVH)
//! 0x0000_7000  boot_params ("zero page")     (Linux 64-bit)
//! 0x0000_8ff0  initial stack pointer         (Linux 64-bit)
//! 0x0000_9000  PML4, 0xa000 PDPTE, 0xb000 PDE: identity map of the first 1 GiB
//! 0x0002_0000  kernel command line (at most 4096 bytes with its NUL)
//! 0x0009_fc00  reserved up to 1 MiB (EBDA, VGA, BIOS): MP floating pointer
//! 0x000f_0000  MP configuration table (at most 1.5 KiB)
//! 0x000f_1000  SMBIOS 2.1 entry point (_SM_), 0x000f_1020 its structure table
//! 0x0010_0000  kernel (bzImage protected-mode code; ELF segments at their p_paddr)
//!   ...        initrd at the top of low RAM
//! 0xc000_0000  MMIO hole (no RAM) up to 4 GiB
//! 0x1_0000_0000 RAM above 3 GiB continues here
//! ```

use vm_memory::GuestAddress;

use crate::BootError;

/// Start of the 32-bit MMIO hole: low RAM never extends past this address.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// Where RAM beyond the first 3 GiB continues, above the MMIO hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Smallest guest RAM size [`MemoryLayout::new`] accepts.
pub const MIN_RAM_BYTES: u64 = 8 << 20;
/// Largest guest RAM size [`MemoryLayout::new`] accepts.
pub const MAX_RAM_BYTES: u64 = 64 << 30;
/// Guest RAM sizes are a multiple of this.
pub const RAM_ALIGN: u64 = 4 << 10;

/// Start of the reserved area below 1 MiB (the traditional EBDA start).
pub const EBDA_START: u64 = 0x9_fc00;
/// First address above the legacy 1 MiB area; bzImage kernels are loaded here.
pub const HIMEM_START: u64 = 0x10_0000;

/// Guest address of the boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Guest address of the (empty) boot IDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// Guest address of the PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// Guest address of the PVH memory map (`hvm_memmap_table_entry` array).
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Guest address of the PVH module list (`hvm_modlist_entry` array).
pub const PVH_MODLIST_START: u64 = 0x6f00;
/// Guest address of the Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer (RSP and RBP) for the Linux 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Guest address of the boot PML4 table.
pub const PML4_START: u64 = 0x9000;
/// Guest address of the boot PDPTE table.
pub const PDPTE_START: u64 = 0xa000;
/// Guest address of the boot PDE table (512 2-MiB pages: the first 1 GiB).
pub const PDE_START: u64 = 0xb000;
/// Guest address of the kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Room for the kernel command line, its terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Highest initrd address (inclusive) when the kernel does not say
/// (the setup header's `initrd_addr_max` default).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37FF_FFFF;

/// Guest RAM size and where that RAM sits in the guest physical address space.
///
/// RAM fills `[0, low_end)` with `low_end = min(ram_bytes, 3 GiB)`; the rest,
/// if any, sits at `[4 GiB, 4 GiB + ram_bytes - low_end)`, leaving the
/// `[3 GiB, 4 GiB)` hole for MMIO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLayout {
    ram_bytes: u64,
}

/// The type of a memory map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// Usable RAM (E820 type 1).
    Ram,
    /// Reserved: not for the guest OS to use (E820 type 2).
    Reserved,
}

impl MemoryKind {
    /// The E820 type number, which is also the PVH `XEN_HVM_MEMMAP_TYPE_*` value.
    pub fn e820_type(self) -> u32 {
        match self {
            MemoryKind::Ram => 1,
            MemoryKind::Reserved => 2,
        }
    }
}

/// One entry of the memory map handed to the guest (E820 or PVH memmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// First guest physical address of the range.
    pub addr: u64,
    /// Length of the range in bytes.
    pub size: u64,
    /// What the guest may do with it.
    pub kind: MemoryKind,
}

impl MemoryLayout {
    /// A layout for `ram_bytes` of guest RAM.
    ///
    /// # Errors
    /// [`BootError::InvalidRamSize`] unless `ram_bytes` is a multiple of 4 KiB
    /// between 8 MiB and 64 GiB.
    pub fn new(ram_bytes: u64) -> Result<Self, BootError> {
        let problem = if ram_bytes < MIN_RAM_BYTES {
            Some("smaller than the 8 MiB minimum")
        } else if ram_bytes > MAX_RAM_BYTES {
            Some("larger than the 64 GiB maximum")
        } else if ram_bytes % RAM_ALIGN != 0 {
            Some("not a multiple of 4 KiB")
        } else {
            None
        };
        match problem {
            Some(problem) => Err(BootError::InvalidRamSize { ram_bytes, problem }),
            None => Ok(MemoryLayout { ram_bytes }),
        }
    }

    /// Total guest RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram_bytes
    }

    /// End (exclusive) of the RAM below the MMIO hole: `min(ram, 3 GiB)`.
    pub fn low_end(&self) -> u64 {
        self.ram_bytes.min(MMIO_HOLE_START)
    }

    /// Bytes of RAM above 4 GiB (zero for guests with at most 3 GiB).
    pub fn high_bytes(&self) -> u64 {
        self.ram_bytes - self.low_end()
    }

    /// The RAM ranges `(start, length)` to build the guest memory from, in
    /// address order: `[0, low_end)` and, for more than 3 GiB, the rest at 4 GiB.
    pub fn ranges(&self) -> Vec<(GuestAddress, u64)> {
        let mut ranges = vec![(GuestAddress(0), self.low_end())];
        if self.high_bytes() > 0 {
            ranges.push((GuestAddress(HIGH_RAM_START), self.high_bytes()));
        }
        ranges
    }

    /// The memory map given to the guest, used by both boot paths (the E820
    /// table in `boot_params` and the PVH memmap):
    /// RAM `[0, 0x9fc00)`, reserved `[0x9fc00, 1 MiB)`, RAM `[1 MiB, low_end)`,
    /// and RAM `[4 GiB, 4 GiB + high)` when there is RAM above the hole.
    pub fn memory_map(&self) -> Vec<MemoryMapEntry> {
        let mut map = vec![
            MemoryMapEntry {
                addr: 0,
                size: EBDA_START,
                kind: MemoryKind::Ram,
            },
            MemoryMapEntry {
                addr: EBDA_START,
                size: HIMEM_START - EBDA_START,
                kind: MemoryKind::Reserved,
            },
            MemoryMapEntry {
                addr: HIMEM_START,
                size: self.low_end() - HIMEM_START,
                kind: MemoryKind::Ram,
            },
        ];
        if self.high_bytes() > 0 {
            map.push(MemoryMapEntry {
                addr: HIGH_RAM_START,
                size: self.high_bytes(),
                kind: MemoryKind::Ram,
            });
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn sizes_outside_the_limits_are_rejected() {
        for (bytes, words) in [
            (0, "8 MiB minimum"),
            (8 * MIB - 4096, "8 MiB minimum"),
            (64 * GIB + 4096, "64 GiB maximum"),
            (512 * MIB + 1, "4 KiB"),
        ] {
            let err = MemoryLayout::new(bytes).expect_err("size must be refused");
            let text = err.to_string();
            assert!(text.contains(words), "{text}");
            assert!(text.contains("-m"), "{text}");
        }
        assert!(MemoryLayout::new(8 * MIB).is_ok());
        assert!(MemoryLayout::new(64 * GIB).is_ok());
    }

    #[test]
    fn small_guest_has_one_range_and_no_high_entry() {
        let layout = MemoryLayout::new(512 * MIB).expect("valid size");
        assert_eq!(layout.ranges(), vec![(GuestAddress(0), 512 * MIB)]);
        assert_eq!(layout.low_end(), 512 * MIB);
        assert_eq!(
            layout.memory_map(),
            vec![
                MemoryMapEntry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: MemoryKind::Ram
                },
                MemoryMapEntry {
                    addr: 0x9fc00,
                    size: 0x100000 - 0x9fc00,
                    kind: MemoryKind::Reserved
                },
                MemoryMapEntry {
                    addr: 0x100000,
                    size: 512 * MIB - 0x100000,
                    kind: MemoryKind::Ram
                },
            ]
        );
    }

    #[test]
    fn exactly_three_gib_stays_below_the_hole() {
        let layout = MemoryLayout::new(3 * GIB).expect("valid size");
        assert_eq!(layout.ranges(), vec![(GuestAddress(0), 3 * GIB)]);
        assert_eq!(layout.memory_map().len(), 3);
    }

    #[test]
    fn large_guest_continues_above_four_gib() {
        let layout = MemoryLayout::new(6 * GIB).expect("valid size");
        assert_eq!(
            layout.ranges(),
            vec![
                (GuestAddress(0), MMIO_HOLE_START),
                (GuestAddress(HIGH_RAM_START), 3 * GIB)
            ]
        );
        let map = layout.memory_map();
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[2],
            MemoryMapEntry {
                addr: 0x100000,
                size: MMIO_HOLE_START - 0x100000,
                kind: MemoryKind::Ram
            }
        );
        assert_eq!(
            map[3],
            MemoryMapEntry {
                addr: 0x1_0000_0000,
                size: 3 * GIB,
                kind: MemoryKind::Ram
            }
        );
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == MemoryKind::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, 6 * GIB - (0x100000 - 0x9fc00));
    }
}
