//! Guest RAM: allocation, registration with KVM, dirty log, bulk copies.

use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_enable_cap,
    kvm_userspace_memory_region, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileMemory};
use vmm_sys_util::ioctl::ioctl_with_ref;

/// Size of a guest page: ferry tracks, sends and checks memory in 4 KiB pages.
pub const PAGE_SIZE: usize = 4096;

// KVM_CLEAR_DIRTY_LOG, which kvm-ioctls 0.25 does not wrap (linux/kvm.h).
vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// How guest RAM is backed on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backing {
    /// Private anonymous memory (the default, like QEMU without memory-backend options).
    #[default]
    Anonymous,
    /// Shared anonymous memory (`MAP_SHARED`), e.g. for vhost-user style sharing.
    Shared,
    /// A memfd per RAM range, mapped shared.
    Memfd,
    /// Private anonymous memory on huge pages (`MAP_HUGETLB`); needs reserved huge pages.
    HugePages,
}

/// Errors of guest memory handling.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "cannot allocate {size} bytes of guest RAM at {gpa:#x} ({backing:?} backing): {source}"
    )]
    Allocate {
        gpa: u64,
        size: u64,
        backing: Backing,
        #[source]
        source: std::io::Error,
    },
    #[error("guest RAM ranges are invalid: {0}")]
    Layout(String),
    #[error("KVM refused memory slot {slot} at {gpa:#x} (+{size:#x}): {source}")]
    SetUserMemoryRegion {
        slot: u32,
        gpa: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot read the dirty log of memory slot {slot}: {source}")]
    GetDirtyLog {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot clear the dirty log of memory slot {slot} from page {first_page}: {source}")]
    ClearDirtyLog {
        slot: u32,
        first_page: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot switch manual dirty-log protection {}: {source}", if *.on { "on" } else { "off" })]
    ManualDirtyProtect {
        on: bool,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest physical range {gpa:#x}+{len:#x} is not inside guest RAM")]
    OutOfRange { gpa: u64, len: u64 },
    #[error("guest physical range {gpa:#x}+{len:#x} is not whole pages")]
    Unaligned { gpa: u64, len: u64 },
    #[error("cannot give guest RAM {gpa:#x}+{len:#x} back to the host: {source}")]
    Discard {
        gpa: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot back guest RAM {gpa:#x}+{len:#x} with memory: {source}")]
    Populate {
        gpa: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Guest memory as ferry maps it: every write made through vm-memory (by devices,
/// loaders) marks its pages in a per-region bitmap, which [`GuestRam::get_dirty_log`]
/// merges into KVM's dirty log, so pages the VMM writes migrate like pages the guest
/// writes.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of [`GuestMemory`].
pub type GuestRegion = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Guest RAM: the vm-memory mapping plus the KVM slot numbering ferry uses
/// (slot N = the N-th RAM range in ascending guest-physical order).
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemory,
    backing: Backing,
    /// Per slot: (guest physical base, size in bytes, host address).
    slots: Vec<(u64, u64, usize)>,
}

impl GuestRam {
    /// Allocates RAM for `ranges` (ascending, non-overlapping, page-aligned).
    pub fn new(ranges: &[(u64, u64)], backing: Backing) -> Result<Self, MemoryError> {
        let mut regions = Vec::with_capacity(ranges.len());
        let mut prev_end = 0u64;
        for (i, &(gpa, size)) in ranges.iter().enumerate() {
            if size == 0 || gpa % PAGE_SIZE as u64 != 0 || size % PAGE_SIZE as u64 != 0 {
                return Err(MemoryError::Layout(format!(
                    "range {i} ({gpa:#x}+{size:#x}) is empty or not page-aligned"
                )));
            }
            if i > 0 && gpa < prev_end {
                return Err(MemoryError::Layout(format!(
                    "range {i} ({gpa:#x}) overlaps or precedes the range before it"
                )));
            }
            prev_end = gpa
                .checked_add(size)
                .ok_or_else(|| MemoryError::Layout(format!("range {i} wraps around")))?;
            let region = map_region(gpa, size, backing)?;
            regions.push(region);
        }
        let mem =
            GuestMemory::from_regions(regions).map_err(|e| MemoryError::Layout(e.to_string()))?;
        if backing != Backing::HugePages {
            for r in mem.iter() {
                // SAFETY: the range is a mapping we own; MADV_HUGEPAGE only changes how
                // the kernel backs it (transparent huge pages), never its contents. It
                // matters for migration: a first read of untouched RAM then maps one
                // 2 MiB zero page instead of faulting 512 times, and the destination
                // fills RAM in 2 MiB steps.
                // The result is ignored on purpose: THP may be disabled on this host,
                // which only costs speed.
                unsafe { libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_HUGEPAGE) };
            }
        }
        let slots = mem
            .iter()
            .map(|r| {
                let host = r.as_ptr() as usize;
                (r.start_addr().0, r.len(), host)
            })
            .collect();
        Ok(Self {
            mem,
            backing,
            slots,
        })
    }

    /// The vm-memory view, for loaders and devices.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// How this RAM is backed.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The RAM ranges as (guest physical base, size), one per KVM slot.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.slots.iter().map(|&(g, s, _)| (g, s)).collect()
    }

    /// Total RAM in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.slots.iter().map(|s| s.1).sum()
    }

    /// Registers every range with KVM as slots 0.., with or without dirty logging.
    /// Calling it again with another `log_dirty` toggles logging on the same slots
    /// (turning logging on also resets the log).
    pub fn register(&self, vm: &VmFd, log_dirty: bool) -> Result<(), MemoryError> {
        if log_dirty {
            self.reset_vmm_dirty();
        }
        for (slot, &(gpa, size, host)) in self.slots.iter().enumerate() {
            let slot = slot as u32;
            let region = kvm_userspace_memory_region {
                slot,
                flags: if log_dirty {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: host as u64,
            };
            // SAFETY: `host..host+size` is a live mapping owned by `self.mem`, which outlives
            // every VM it is registered with: the VMM drops the VmFd (and with it the slots)
            // before the GuestRam, and the slot never points anywhere else.
            unsafe { vm.set_user_memory_region(region) }.map_err(|source| {
                MemoryError::SetUserMemoryRegion {
                    slot,
                    gpa,
                    size,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Reads and resets KVM's dirty bitmap of every slot: one `Vec<u64>` per slot, bit i of
    /// word w = page w*64+i of that slot.
    /// Pages the VMM wrote through [`GuestRam::memory`] since the last call are
    /// included (and reset) too.
    pub fn get_dirty_log(&self, vm: &VmFd) -> Result<Vec<Vec<u64>>, MemoryError> {
        self.slots
            .iter()
            .zip(self.mem.iter())
            .enumerate()
            .map(|(slot, (&(_, size, _), region))| {
                let mut words = vm
                    .get_dirty_log(slot as u32, size as usize)
                    .map_err(|source| MemoryError::GetDirtyLog {
                        slot: slot as u32,
                        source,
                    })?;
                for (w, vmm) in words
                    .iter_mut()
                    .zip(std::ops::Deref::deref(region).bitmap().get_and_reset())
                {
                    *w |= vmm;
                }
                Ok(words)
            })
            .collect()
    }

    /// Forgets which pages the VMM wrote (dirty tracking starts afresh).
    pub fn reset_vmm_dirty(&self) {
        for region in self.mem.iter() {
            std::ops::Deref::deref(region).bitmap().reset();
        }
    }

    /// Switches KVM's manual dirty-log protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
    /// on or off for `vm`; returns whether it is on. While on, KVM_GET_DIRTY_LOG only
    /// reports dirty pages and [`GuestRam::clear_dirty_log`] resets (and write-protects
    /// again) the pages the caller is about to copy; a slot whose logging is turned on
    /// starts with every page dirty and none write-protected, where the kernel offers
    /// that (KVM_DIRTY_LOG_INITIALLY_SET). A kernel without the capability answers
    /// `Ok(false)` to `on`: the classic mode, where reading the log resets it, stays.
    pub fn set_manual_dirty_protect(&self, vm: &VmFd, on: bool) -> Result<bool, MemoryError> {
        let offered =
            vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
        let offered = u64::try_from(offered).unwrap_or(0);
        if offered & u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) == 0 {
            return Ok(false);
        }
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        if on {
            cap.args[0] = offered
                & u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET);
        }
        vm.enable_cap(&cap)
            .map_err(|source| MemoryError::ManualDirtyProtect { on, source })?;
        Ok(on)
    }

    /// Resets the dirty bits set in `bitmap` for the pages of `slot` from `first_page`
    /// on (a multiple of 64; bit i of word w = page first_page + w*64 + i) and
    /// write-protects those pages again, so a later write marks them dirty anew: call
    /// it before copying the pages. Needs manual dirty-log protection
    /// ([`GuestRam::set_manual_dirty_protect`]).
    pub fn clear_dirty_log(
        &self,
        vm: &VmFd,
        slot: u32,
        first_page: u64,
        bitmap: &[u64],
    ) -> Result<(), MemoryError> {
        let pages = self
            .slots
            .get(slot as usize)
            .map(|&(_, size, _)| size / PAGE_SIZE as u64)
            .unwrap_or(0);
        if first_page % 64 != 0 || first_page >= pages || bitmap.is_empty() {
            return Err(MemoryError::Layout(format!(
                "cannot clear the dirty log of slot {slot} from page {first_page}: not a \
                 multiple of 64 inside the slot's {pages} pages"
            )));
        }
        // Whole words only, except for the slot's last, partial word (KVM's rule).
        let num_pages = (bitmap.len() as u64 * 64).min(pages - first_page);
        let num_pages = u32::try_from(num_pages).map_err(|_| {
            MemoryError::Layout(format!(
                "cannot clear the dirty log of {num_pages} pages in one call"
            ))
        })?;
        let arg = kvm_clear_dirty_log {
            slot,
            num_pages,
            first_page,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.as_ptr().cast_mut().cast(),
            },
        };
        // SAFETY: `vm` is a VM fd and `arg` is the kvm_clear_dirty_log the ioctl number
        // is built from. KVM only reads the bitmap (copy_from_user of num_pages bits,
        // rounded up to 64), and `bitmap` holds at least that many: num_pages is at most
        // bitmap.len() * 64. It is borrowed for the whole call.
        let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
        if ret < 0 {
            return Err(MemoryError::ClearDirtyLog {
                slot,
                first_page,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Host address of `gpa..gpa+len`, which must lie inside one RAM range.
    /// Per RAM range: guest-physical base, size, host address (for
    /// userfaultfd registration).
    pub(crate) fn host_slots(&self) -> Vec<(u64, u64, usize)> {
        self.slots.clone()
    }

    /// The host address of `gpa..gpa+len`, if it lies inside one RAM range.
    pub(crate) fn host_address(&self, gpa: u64, len: usize) -> Option<usize> {
        self.host_range(gpa, len).ok()
    }

    /// The guest-physical address of host address `host`, if it is guest RAM.
    pub(crate) fn gpa_of_host(&self, host: usize) -> Option<u64> {
        self.slots.iter().find_map(|&(base, size, start)| {
            (host >= start && ((host - start) as u64) < size).then(|| base + (host - start) as u64)
        })
    }

    fn host_range(&self, gpa: u64, len: usize) -> Result<usize, MemoryError> {
        let len64 = len as u64;
        for &(base, size, host) in &self.slots {
            if gpa >= base && gpa - base <= size && len64 <= size - (gpa - base) {
                return Ok(host + (gpa - base) as usize);
            }
        }
        Err(MemoryError::OutOfRange { gpa, len: len64 })
    }

    /// Copies guest memory at `gpa` into `dst`. The guest may write the same memory
    /// concurrently; the copy then holds a mix of old and new bytes, which the dirty log
    /// accounts for (the page is dirty again and is sent again).
    pub fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        let host = self.host_range(gpa, dst.len())?;
        // SAFETY: host_range checked that `host..host+dst.len()` lies inside a live mapping
        // of `self.mem`; `dst` is a distinct Rust buffer, so the ranges do not overlap. The
        // source may change under us (the guest runs), which only makes the bytes stale,
        // never invalid: every bit pattern is a valid u8.
        unsafe { std::ptr::copy_nonoverlapping(host as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        let host = self.host_range(gpa, src.len())?;
        // SAFETY: as in `read`: the destination lies inside a live mapping of guest RAM,
        // which Rust code never borrows as a reference, and `src` is a distinct buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), host as *mut u8, src.len()) };
        Ok(())
    }

    /// Backs `gpa..gpa+len` (page-aligned, inside one RAM range) with memory now:
    /// the kernel allocates and zeroes it here (MADV_POPULATE_WRITE) instead of at
    /// the first write, so a thread can pay for it ahead of the writer. Contents
    /// are unchanged: populating a page already there does nothing.
    pub fn populate(&self, gpa: u64, len: usize) -> Result<(), MemoryError> {
        let host = self.host_range(gpa, len)?;
        // SAFETY: host_range checked that the range lies inside a live mapping of
        // guest RAM. MADV_POPULATE_WRITE only faults the pages in (writable), as a
        // write of their current contents would; it never changes what they hold.
        let rc =
            unsafe { libc::madvise(host as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
        if rc != 0 {
            return Err(MemoryError::Populate {
                gpa,
                len: len as u64,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Whether `gpa..gpa+len` lies inside one RAM range.
    pub fn contains(&self, gpa: u64, len: usize) -> bool {
        self.host_range(gpa, len).is_ok()
    }

    /// Gives `gpa..gpa+len` (page-aligned, inside one RAM range) back to the
    /// host: the memory is freed and the range reads as zeroes afterwards (a
    /// later touch faults in fresh zeroed pages). Private anonymous RAM drops
    /// its pages (MADV_DONTNEED); shared and memfd RAM also punches them out
    /// of the shared object (MADV_REMOVE), which MADV_DONTNEED alone would
    /// leave holding the old bytes. Huge-page RAM can only give back whole
    /// huge pages: a smaller range is refused by the kernel and reported.
    /// A virtio-balloon inflate and free page reporting use it.
    pub fn discard(&self, gpa: u64, len: usize) -> Result<(), MemoryError> {
        if gpa % PAGE_SIZE as u64 != 0 || len % PAGE_SIZE != 0 {
            return Err(MemoryError::Unaligned {
                gpa,
                len: len as u64,
            });
        }
        let host = self.host_range(gpa, len)?;
        let advice = match self.backing {
            Backing::Anonymous | Backing::HugePages => libc::MADV_DONTNEED,
            Backing::Shared | Backing::Memfd => libc::MADV_REMOVE,
        };
        // SAFETY: host_range checked that the range lies inside a live mapping of
        // guest RAM, which Rust code never borrows as a reference (every access
        // copies through raw pointers, see `read`). Dropping its pages only makes
        // them read as zeroes later; the mapping itself stays, so every later
        // access (KVM's, through its MMU notifier, or ours) faults in a fresh page.
        let rc = unsafe { libc::madvise(host as *mut libc::c_void, len, advice) };
        if rc != 0 {
            return Err(MemoryError::Discard {
                gpa,
                len: len as u64,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Whether the page at `gpa` (page-aligned, inside RAM) is all zeroes.
    ///
    /// Like [`GuestRam::read`], it never makes a Rust reference to guest memory
    /// (which the guest may write meanwhile): it copies one 64-byte block at a
    /// time out of it and tests the copy.
    pub fn is_zero_page(&self, gpa: u64) -> Result<bool, MemoryError> {
        let host = self.host_range(gpa, PAGE_SIZE)?;
        let mut block = [0u64; 8];
        for offset in (0..PAGE_SIZE).step_by(64) {
            // SAFETY: host_range checked that the page lies inside a live mapping of
            // guest RAM, so `host + offset .. + 64` does; `block` is a distinct local
            // buffer of 64 bytes. The bytes may change while we copy them; the answer
            // is then stale, as documented for `read`.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (host + offset) as *const u8,
                    block.as_mut_ptr().cast::<u8>(),
                    64,
                )
            };
            if !is_zero(&block) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Whether all words are zero (an OR-reduction the compiler turns into vector code).
fn is_zero(words: &[u64]) -> bool {
    words.iter().fold(0u64, |acc, &w| acc | w) == 0
}

/// KVM slot of the firmware ROM: far above any RAM slot (one per RAM range).
pub const ROM_SLOT: u32 = 0x100;

/// Why a firmware ROM cannot be mapped or changed.
#[derive(Debug, thiserror::Error)]
pub enum RomError {
    #[error("a ROM of {len} bytes at {gpa:#x} is empty, not page-sized or crosses 4 GiB")]
    Layout { gpa: u64, len: usize },
    #[error("cannot allocate {len} bytes for the ROM at {gpa:#x}: {source}")]
    Allocate {
        gpa: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "this host's KVM cannot map read-only memory (KVM_CAP_READONLY_MEM), which \
         firmware ROMs need: use a kernel with it, or boot the guest with a kernel instead"
    )]
    NoReadonlyMemory,
    #[error("KVM refused the ROM slot at {gpa:#x} (+{len:#x}): {source}")]
    SetUserMemoryRegion {
        gpa: u64,
        len: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("a ROM image of {got} bytes cannot replace this VM's ROM of {len} bytes")]
    Size { got: usize, len: usize },
}

/// A firmware ROM (QEMU's `pc.bios`): guest-physical `gpa..gpa + len`, read-only to
/// the guest (KVM_MEM_READONLY: its writes exit as MMIO and are dropped), written
/// only by the VMM. It is not guest RAM: no dirty log, and a migration carries its
/// contents as device state.
#[derive(Debug)]
pub struct GuestRom {
    region: vm_memory::MmapRegion<()>,
    gpa: u64,
}

impl GuestRom {
    /// A ROM at `gpa` holding `image` (its length a multiple of the page size).
    pub fn new(gpa: u64, image: &[u8]) -> Result<Self, RomError> {
        let len = image.len();
        let layout = || RomError::Layout { gpa, len };
        let end = gpa.checked_add(len as u64).ok_or_else(layout)?;
        if len == 0 || len % PAGE_SIZE != 0 || gpa % PAGE_SIZE as u64 != 0 || end > 1 << 32 {
            return Err(layout());
        }
        let region = vm_memory::MmapRegion::new(len).map_err(|e| RomError::Allocate {
            gpa,
            len,
            source: std::io::Error::other(e.to_string()),
        })?;
        let rom = Self { region, gpa };
        rom.write(image)?;
        Ok(rom)
    }

    /// Guest-physical base.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Bytes of the ROM.
    pub fn len(&self) -> usize {
        self.region.size()
    }

    /// Whether the ROM is empty (never: [`GuestRom::new`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.region.size() == 0
    }

    /// The ROM's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.region.size()];
        self.region.as_volatile_slice().copy_to(&mut out[..]);
        out
    }

    /// Replaces the ROM's contents with `image`, of the same length (a migration or
    /// restore brings the source's ROM, as QEMU migrates `pc.bios`).
    pub fn write(&self, image: &[u8]) -> Result<(), RomError> {
        let len = self.region.size();
        if image.len() != len {
            return Err(RomError::Size {
                got: image.len(),
                len,
            });
        }
        self.region.as_volatile_slice().copy_from(image);
        Ok(())
    }

    /// Maps the ROM into `vm` as slot [`ROM_SLOT`], read-only.
    pub fn register(&self, vm: &VmFd) -> Result<(), RomError> {
        let len = self.region.size();
        let readonly = vm.check_extension(kvm_ioctls::Cap::ReadonlyMem);
        if !readonly {
            return Err(RomError::NoReadonlyMemory);
        }
        let region = kvm_userspace_memory_region {
            slot: ROM_SLOT,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: self.gpa,
            memory_size: len as u64,
            userspace_addr: self.region.as_ptr() as u64,
        };
        // SAFETY: the mapping is owned by `self.region`, which outlives every VM it is
        // registered with (the VMM drops the VmFd before the ROM), and the slot never
        // points anywhere else.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| {
            RomError::SetUserMemoryRegion {
                gpa: self.gpa,
                len,
                source,
            }
        })
    }
}

fn map_region(gpa: u64, size: u64, backing: Backing) -> Result<GuestRegion, MemoryError> {
    let err = |source: std::io::Error| MemoryError::Allocate {
        gpa,
        size,
        backing,
        source,
    };
    let len = usize::try_from(size).map_err(|_| err(std::io::ErrorKind::InvalidInput.into()))?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let builder =
        MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len)).with_mmap_prot(prot);
    let builder = match backing {
        Backing::Anonymous => {
            builder.with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        }
        Backing::Shared => {
            builder.with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_SHARED | libc::MAP_NORESERVE)
        }
        Backing::HugePages => builder
            .with_mmap_flags(
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE | libc::MAP_HUGETLB,
            )
            .with_hugetlbfs(true),
        Backing::Memfd => {
            let file = memfd(&format!("ferry-ram-{gpa:x}")).map_err(err)?;
            file.set_len(size).map_err(err)?;
            builder
                .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                .with_file_offset(FileOffset::new(file, 0))
        }
    };
    let region = builder
        .build()
        .map_err(|e| err(std::io::Error::other(e.to_string())))?;
    GuestRegion::new(region, GuestAddress(gpa))
        .ok_or_else(|| MemoryError::Layout(format!("range {gpa:#x}+{size:#x} wraps around")))
}

fn memfd(name: &str) -> std::io::Result<File> {
    let cname = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_round_trip_and_bounds() {
        for backing in [Backing::Anonymous, Backing::Shared, Backing::Memfd] {
            let ram = GuestRam::new(&[(0, 1 << 20), (4 << 20, 1 << 20)], backing).unwrap();
            assert_eq!(ram.total_bytes(), 2 << 20);
            ram.write(4 << 20, b"hello").unwrap();
            let mut buf = [0u8; 5];
            ram.read(4 << 20, &mut buf).unwrap();
            assert_eq!(&buf, b"hello");
            assert!(ram.is_zero_page(0).unwrap());
            assert!(!ram.is_zero_page(4 << 20).unwrap());
            // Crossing the end of a range or touching the gap is refused.
            assert!(ram.read((1 << 20) - 2, &mut buf).is_err());
            assert!(ram.read(2 << 20, &mut buf).is_err());
            assert!(ram.write(u64::MAX - 2, b"xx").is_err());
        }
    }

    #[test]
    fn discard_gives_pages_back_and_they_read_zero() {
        for backing in [Backing::Anonymous, Backing::Shared, Backing::Memfd] {
            let ram = GuestRam::new(&[(0, 1 << 20), (4 << 20, 1 << 20)], backing).unwrap();
            ram.write(4 << 20, &[7; 3 * PAGE_SIZE]).unwrap();
            ram.discard((4 << 20) + PAGE_SIZE as u64, PAGE_SIZE)
                .unwrap();
            let mut buf = vec![0u8; 3 * PAGE_SIZE];
            ram.read(4 << 20, &mut buf).unwrap();
            assert_eq!(&buf[..PAGE_SIZE], &[7; PAGE_SIZE][..], "{backing:?}");
            assert!(
                buf[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|&b| b == 0),
                "{backing:?}"
            );
            assert_eq!(&buf[2 * PAGE_SIZE..], &[7; PAGE_SIZE][..], "{backing:?}");
            // The page comes back on touch.
            ram.write((4 << 20) + PAGE_SIZE as u64, b"x").unwrap();
            assert!(!ram.is_zero_page((4 << 20) + PAGE_SIZE as u64).unwrap());
            // Outside RAM, across a range's end or unaligned: refused.
            assert!(matches!(
                ram.discard(2 << 20, PAGE_SIZE),
                Err(MemoryError::OutOfRange { .. })
            ));
            assert!(ram
                .discard((1 << 20) - PAGE_SIZE as u64, 2 * PAGE_SIZE)
                .is_err());
            assert!(matches!(
                ram.discard(1, PAGE_SIZE),
                Err(MemoryError::Unaligned { .. })
            ));
            assert!(matches!(
                ram.discard(0, 100),
                Err(MemoryError::Unaligned { .. })
            ));
            assert!(ram.contains(0, PAGE_SIZE) && !ram.contains(1 << 20, 1));
        }
    }

    #[test]
    fn bad_layouts_are_refused() {
        assert!(GuestRam::new(&[(0, 100)], Backing::Anonymous).is_err());
        assert!(GuestRam::new(&[(0, 8192), (4096, 8192)], Backing::Anonymous).is_err());
    }
}
