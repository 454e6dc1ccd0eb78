//! Loading the kernel, initrd and command line, and writing the boot
//! protocol's structures (`boot_params` or `hvm_start_info`).

use std::io::{self, Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, CAN_USE_HEAP, E820_MAX_ENTRIES_ZEROPAGE,
    LOADED_HIGH, XLF_KERNEL_64,
};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::{Elf, KernelLoader, PvhBootCapability};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile, VolatileMemoryError,
    VolatileSlice,
};

use crate::layout::*;
use crate::BootError;

/// Anything the initrd can be read from: a `File`, a `Cursor<Vec<u8>>`, ...
///
/// Implemented for every `Read + Seek` type; it exists so that the initrd
/// argument of [`load_kernel`] can be a plain `None` without a type annotation.
pub trait ReadSeek: Read + Seek {}
impl<T: Read + Seek + ?Sized> ReadSeek for T {}

/// How the vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// Xen PVH: 32-bit protected mode, `EBX` = guest address of `hvm_start_info`.
    Pvh {
        /// Guest address of the `hvm_start_info` structure.
        start_info_gpa: u64,
    },
    /// Linux 64-bit boot protocol: long mode, `RSI` = guest address of `boot_params`.
    Linux64 {
        /// Guest address of the `boot_params` zero page.
        boot_params_gpa: u64,
    },
}

/// What [`load_kernel`] placed in guest memory; the input of [`crate::boot_regs`]
/// and [`crate::boot_sregs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    /// Guest physical address of the first instruction.
    pub entry: u64,
    /// Boot protocol and where its parameter block is.
    pub protocol: BootProtocol,
    /// First guest address past the memory the kernel claims at boot (for an
    /// ELF the end of its highest segment, for a bzImage the end of its
    /// decompression area, `init_size` bytes from its run-time address).
    pub kernel_end: u64,
    /// Guest address and size of the initrd, if one was loaded.
    pub initrd: Option<(u64, u64)>,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const HDRS_OFFSET: usize = 0x202;
const SETUP_HEADER_OFFSET: usize = 0x1f1;
const SETUP_HEADER_SIZE: usize = std::mem::size_of::<setup_header>();
/// Offset of the 64-bit entry point from the protected-mode kernel's start.
const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;
/// `type_of_loader` for a boot loader without an assigned id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Classic `heap_end_ptr`: the setup heap ends 0x200 below the command line
/// at real-mode offset 0x10000. Unused by the 64-bit entry, but set as the
/// protocol asks for `CAN_USE_HEAP`.
const HEAP_END_PTR: u16 = 0xfe00;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const VMLINUX_KERNEL_ALIGNMENT: u32 = 0x100_0000;
const PAGE_SIZE: u64 = 4096;

const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const ELF64_EHDR_SIZE: usize = 64;
const ELF64_PHDR_SIZE: usize = 56;

/// Loads `kernel` (and `initrd`, and `cmdline`) into `mem` for the layout
/// `layout` and writes the boot protocol's parameter block.
///
/// The image kind is detected from its content:
/// - ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note: PVH boot, entry from the note;
///   `hvm_start_info` (version 1) at [`PVH_INFO_START`], memmap at
///   [`PVH_MEMMAP_START`], the initrd as one module at [`PVH_MODLIST_START`];
/// - ELF without that note (a `vmlinux`): Linux 64-bit boot, entry = ELF entry;
/// - bzImage: Linux 64-bit boot with the protected-mode kernel at
///   [`HIMEM_START`], entry 0x200 past it, `boot_params` built from the
///   image's setup header.
///
/// ELF segments load at their `p_paddr`, which must be at or above 1 MiB.
/// The command line goes to [`CMDLINE_START`]; the initrd goes to the highest
/// page-aligned address below `min(low_end, initrd_addr_max + 1)` that lies
/// above the kernel. Guest memory is expected to be freshly zeroed (ELF bss is
/// not cleared again) and to cover [`MemoryLayout::ranges`].
///
/// # Errors
/// See [`BootError`]: the image is not bootable, the command line is too long,
/// the kernel or initrd does not fit, reading a file or writing guest memory
/// failed. Size checks happen before anything is written.
pub fn load_kernel<M, K>(
    mem: &M,
    layout: &MemoryLayout,
    kernel: &mut K,
    initrd: Option<&mut dyn ReadSeek>,
    cmdline: &str,
) -> Result<BootInfo, BootError>
where
    M: GuestMemoryBackend,
    K: Read + Seek + ?Sized,
{
    if let Some(offset) = cmdline.bytes().position(|b| b == 0) {
        return Err(BootError::CmdlineHasNul { offset });
    }
    check_cmdline_len(cmdline, CMDLINE_MAX_SIZE - 1)?;

    let kernel_len = kernel
        .seek(SeekFrom::End(0))
        .map_err(BootError::ReadKernel)?;
    kernel.rewind().map_err(BootError::ReadKernel)?;
    let head = read_head(kernel, 4096).map_err(BootError::ReadKernel)?;

    let plan = if head.starts_with(ELF_MAGIC) {
        KernelPlan::Elf(plan_elf(kernel, &head, kernel_len, layout)?)
    } else if read_u32(&head, HDRS_OFFSET) == Some(HDRS_MAGIC) {
        KernelPlan::BzImage(plan_bzimage(&head, kernel_len, layout)?)
    } else {
        let (found, fix) = describe_unknown(&head);
        return Err(BootError::NotBootable { found, fix });
    };

    let (kernel_end, initrd_addr_max) = match &plan {
        KernelPlan::Elf(elf) => (elf.kernel_end, DEFAULT_INITRD_ADDR_MAX),
        KernelPlan::BzImage(bz) => {
            check_cmdline_len(cmdline, bz.cmdline_max)?;
            (bz.kernel_end, bz.initrd_addr_max)
        }
    };

    let initrd = match initrd {
        Some(file) => {
            let size = file.seek(SeekFrom::End(0)).map_err(BootError::ReadInitrd)?;
            file.rewind().map_err(BootError::ReadInitrd)?;
            let gpa = place_initrd(layout, kernel_end, initrd_addr_max, size)?;
            Some((file, gpa, size))
        }
        None => None,
    };

    // Everything fits: write.
    let (entry, pvh) = match &plan {
        KernelPlan::Elf(elf) => load_elf(mem, kernel, elf)?,
        KernelPlan::BzImage(bz) => {
            kernel
                .seek(SeekFrom::Start(bz.setup_size))
                .map_err(BootError::ReadKernel)?;
            copy_stream(
                mem,
                kernel,
                HIMEM_START,
                bz.protected_mode_size,
                "kernel",
                BootError::ReadKernel,
            )?;
            (HIMEM_START + BZIMAGE_ENTRY64_OFFSET, false)
        }
    };

    let initrd = match initrd {
        Some((file, gpa, size)) => {
            copy_stream(mem, file, gpa, size, "initrd", BootError::ReadInitrd)?;
            Some((gpa, size))
        }
        None => None,
    };

    let mut cmdline_bytes = Vec::with_capacity(cmdline.len() + 1);
    cmdline_bytes.extend_from_slice(cmdline.as_bytes());
    cmdline_bytes.push(0);
    write_bytes(mem, CMDLINE_START, &cmdline_bytes, "kernel command line")?;

    let protocol = if pvh {
        write_pvh_start_info(mem, layout, initrd)?;
        BootProtocol::Pvh {
            start_info_gpa: PVH_INFO_START,
        }
    } else {
        let params = match &plan {
            KernelPlan::BzImage(bz) => bzimage_boot_params(bz),
            KernelPlan::Elf(_) => vmlinux_boot_params(),
        };
        write_boot_params(mem, layout, params, initrd)?;
        BootProtocol::Linux64 {
            boot_params_gpa: ZERO_PAGE_START,
        }
    };

    Ok(BootInfo {
        entry,
        protocol,
        kernel_end,
        initrd,
    })
}

enum KernelPlan {
    Elf(ElfPlan),
    BzImage(BzImagePlan),
}

struct ElfPlan {
    entry: u64,
    load_start: u64,
    kernel_end: u64,
}

struct BzImagePlan {
    header: setup_header,
    setup_size: u64,
    protected_mode_size: u64,
    kernel_end: u64,
    initrd_addr_max: u64,
    cmdline_max: usize,
}

fn check_cmdline_len(cmdline: &str, max: usize) -> Result<(), BootError> {
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    Ok(())
}

/// Reads up to `max` bytes from the start of `src`.
fn read_head<R: Read + ?Sized>(src: &mut R, max: u64) -> io::Result<Vec<u8>> {
    let mut head = Vec::new();
    src.take(max).read_to_end(&mut head)?;
    Ok(head)
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes(bytes.try_into().ok()?))
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn read_u64(buf: &[u8], at: usize) -> Option<u64> {
    let bytes = buf.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

fn not_bootable(found: impl Into<String>, fix: impl Into<String>) -> BootError {
    BootError::NotBootable {
        found: found.into(),
        fix: fix.into(),
    }
}

fn corrupt_elf(what: &str) -> BootError {
    not_bootable(
        format!("a truncated or corrupt ELF file ({what})"),
        "copy or rebuild the kernel image (vmlinux)",
    )
}

/// Checks the ELF headers and the placement of its loadable segments.
fn plan_elf<K: Read + Seek + ?Sized>(
    kernel: &mut K,
    head: &[u8],
    kernel_len: u64,
    layout: &MemoryLayout,
) -> Result<ElfPlan, BootError> {
    if head.len() < ELF64_EHDR_SIZE {
        return Err(corrupt_elf("the ELF header is cut short"));
    }
    match head[4] {
        2 => {}
        1 => {
            return Err(not_bootable(
                "a 32-bit ELF file",
                "build the kernel as a 64-bit ELF (its PVH entry point may still be 32-bit code)",
            ))
        }
        class => return Err(corrupt_elf(&format!("unknown ELF class {class}"))),
    }
    if head[5] != 1 {
        return Err(not_bootable(
            "a big-endian ELF file",
            "boot an x86_64 kernel (vmlinux or bzImage)",
        ));
    }
    let machine = read_u16(head, 0x12).unwrap_or_default();
    if machine != EM_X86_64 {
        return Err(not_bootable(
            format!("an ELF file for machine type {machine}, not x86_64 (62)"),
            "boot an x86_64 kernel (vmlinux or bzImage)",
        ));
    }
    let entry = read_u64(head, 0x18).unwrap_or_default();
    let phoff = read_u64(head, 0x20).unwrap_or_default();
    let phentsize = read_u16(head, 0x36).unwrap_or_default();
    let phnum = read_u16(head, 0x38).unwrap_or_default();
    if phnum == 0 {
        return Err(not_bootable(
            "an ELF file without program headers (an object file?)",
            "boot the linked kernel (vmlinux) or its bzImage",
        ));
    }
    if usize::from(phentsize) != ELF64_PHDR_SIZE {
        return Err(corrupt_elf(&format!("program header size {phentsize}")));
    }
    let table_len = u64::from(phnum) * ELF64_PHDR_SIZE as u64;
    if phoff < ELF64_EHDR_SIZE as u64
        || phoff
            .checked_add(table_len)
            .is_none_or(|end| end > kernel_len)
    {
        return Err(corrupt_elf("the program headers lie outside the file"));
    }
    kernel
        .seek(SeekFrom::Start(phoff))
        .map_err(BootError::ReadKernel)?;
    let mut table = vec![0u8; table_len as usize];
    kernel
        .read_exact(&mut table)
        .map_err(BootError::ReadKernel)?;

    let mut load_start = u64::MAX;
    let mut kernel_end = 0u64;
    for phdr in table.chunks_exact(ELF64_PHDR_SIZE) {
        let p_type = read_u32(phdr, 0).unwrap_or_default();
        let offset = read_u64(phdr, 0x08).unwrap_or_default();
        let paddr = read_u64(phdr, 0x18).unwrap_or_default();
        let filesz = read_u64(phdr, 0x20).unwrap_or_default();
        let memsz = read_u64(phdr, 0x28).unwrap_or_default();
        if p_type != PT_LOAD && p_type != PT_NOTE {
            continue;
        }
        if offset
            .checked_add(filesz)
            .is_none_or(|end| end > kernel_len)
        {
            return Err(corrupt_elf("a segment extends past the end of the file"));
        }
        // linux-loader copies only PT_LOAD segments with file content.
        if p_type != PT_LOAD || filesz == 0 {
            continue;
        }
        let size = memsz.max(filesz);
        if paddr < HIMEM_START {
            return Err(BootError::KernelBelowHimem { paddr, size });
        }
        let end = paddr.checked_add(size).ok_or(BootError::KernelTooLarge {
            needed_end: u64::MAX,
            low_end: layout.low_end(),
        })?;
        if end > layout.low_end() {
            return Err(BootError::KernelTooLarge {
                needed_end: end,
                low_end: layout.low_end(),
            });
        }
        load_start = load_start.min(paddr);
        kernel_end = kernel_end.max(end);
    }
    if kernel_end == 0 {
        return Err(not_bootable(
            "an ELF file without loadable segments",
            "boot the linked kernel (vmlinux) or its bzImage",
        ));
    }
    Ok(ElfPlan {
        entry,
        load_start,
        kernel_end,
    })
}

/// Copies the ELF segments with linux-loader and picks the entry point.
/// Returns `(entry, is_pvh)`.
fn load_elf<M, K>(mem: &M, kernel: &mut K, plan: &ElfPlan) -> Result<(u64, bool), BootError>
where
    M: GuestMemoryBackend,
    K: Read + Seek + ?Sized,
{
    let mut reader = VolatileReader::new(kernel);
    let result = Elf::load(mem, None, &mut reader, None).map_err(BootError::LoadElf)?;
    let (entry, pvh) = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => (addr.0, true),
        PvhBootCapability::PvhEntryNotPresent | PvhBootCapability::PvhEntryIgnored => {
            (plan.entry, false)
        }
    };
    if entry < plan.load_start || entry >= plan.kernel_end {
        let which = if pvh {
            "PVH entry point"
        } else {
            "ELF entry point"
        };
        return Err(not_bootable(
            format!(
                "an ELF file whose {which} {entry:#x} lies outside its loaded segments \
                 {:#x}..{:#x}",
                plan.load_start, plan.kernel_end
            ),
            "boot an x86_64 vmlinux whose entry is a physical address, or its bzImage",
        ));
    }
    Ok((entry, pvh))
}

/// Checks a bzImage's setup header and where its kernel will sit.
fn plan_bzimage(
    head: &[u8],
    kernel_len: u64,
    layout: &MemoryLayout,
) -> Result<BzImagePlan, BootError> {
    // The setup header ends at 0x202 + the byte at 0x201 (its jump offset).
    let declared_end = HDRS_OFFSET + usize::from(head[0x201]);
    let end = declared_end
        .min(SETUP_HEADER_OFFSET + SETUP_HEADER_SIZE)
        .min(head.len());
    let mut header = setup_header::default();
    header.as_mut_slice()[..end - SETUP_HEADER_OFFSET]
        .copy_from_slice(&head[SETUP_HEADER_OFFSET..end]);

    let version = header.version;
    let xloadflags = header.xloadflags;
    if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(not_bootable(
            format!(
                "a bzImage with boot protocol {}.{:02} and no 64-bit entry point \
                 (XLF_KERNEL_64 not set)",
                version >> 8,
                version & 0xff
            ),
            "ferry enters kernels through the 64-bit boot protocol: boot an x86_64 kernel, \
             Linux 3.8 or later",
        ));
    }
    if header.loadflags & LOADED_HIGH == 0 {
        return Err(not_bootable(
            "a zImage that loads below 1 MiB (LOADED_HIGH not set)",
            "boot an x86_64 bzImage",
        ));
    }
    let setup_sects = match header.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    if kernel_len <= setup_size {
        return Err(not_bootable(
            format!(
                "a truncated bzImage ({kernel_len} bytes, but its setup code alone takes \
                 {setup_size})"
            ),
            "copy or rebuild the kernel image",
        ));
    }
    let protected_mode_size = kernel_len - setup_size;
    let load_end = HIMEM_START + protected_mode_size;

    // The decompressor runs the kernel at its load address rounded up to
    // kernel_alignment but not below pref_address (LOAD_PHYSICAL_ADDR), and
    // needs init_size bytes there before it looks at the memory map.
    let alignment = u64::from(header.kernel_alignment).max(1);
    let pref_address = header.pref_address;
    let run_start = if header.relocatable_kernel != 0 {
        HIMEM_START
            .div_ceil(alignment)
            .saturating_mul(alignment)
            .max(pref_address)
    } else {
        pref_address.max(HIMEM_START)
    };
    let run_end = run_start.saturating_add(u64::from(header.init_size));
    let kernel_end = load_end.max(run_end);
    if kernel_end > layout.low_end() {
        return Err(BootError::KernelTooLarge {
            needed_end: kernel_end,
            low_end: layout.low_end(),
        });
    }

    let initrd_addr_max = match header.initrd_addr_max {
        0 => DEFAULT_INITRD_ADDR_MAX,
        max => u64::from(max),
    };
    let cmdline_max = usize::try_from(header.cmdline_size)
        .unwrap_or(usize::MAX)
        .min(CMDLINE_MAX_SIZE - 1);
    Ok(BzImagePlan {
        header,
        setup_size,
        protected_mode_size,
        kernel_end,
        initrd_addr_max,
        cmdline_max,
    })
}

/// Names what an unrecognised image looks like, and what to boot instead.
fn describe_unknown(head: &[u8]) -> (String, String) {
    if head.is_empty() {
        return (
            "the file is empty".into(),
            "pass a bzImage or vmlinux".into(),
        );
    }
    let first: Vec<String> = head.iter().take(16).map(|b| format!("{b:02x}")).collect();
    let first = first.join(" ");
    let neither = "neither an ELF vmlinux/PVH image nor a bzImage";
    let compressed = |format: &str, tool: &str| {
        (
            format!("{neither}: {format}-compressed data (first bytes {first})"),
            format!(
                "this looks like a compressed vmlinux; decompress it first ({tool}) or boot \
                 the bzImage (arch/x86/boot/bzImage, /boot/vmlinuz-*)"
            ),
        )
    };
    if head.starts_with(&[0x1f, 0x8b]) {
        return compressed("gzip", "gunzip");
    }
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        return compressed("xz", "unxz");
    }
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return compressed("zstd", "unzstd");
    }
    if head.starts_with(b"BZh") {
        return compressed("bzip2", "bunzip2");
    }
    if head.starts_with(&[0x02, 0x21, 0x4c, 0x18]) || head.starts_with(&[0x04, 0x22, 0x4d, 0x18]) {
        return compressed("lz4", "unlz4");
    }
    if head.starts_with(&[0x5d, 0, 0]) {
        return compressed("lzma", "unlzma");
    }
    if head.get(0x38..0x3c) == Some(b"ARM\x64") {
        return (
            format!("{neither}: an arm64 kernel Image (first bytes {first})"),
            "boot an x86_64 kernel".into(),
        );
    }
    if head.starts_with(b"MZ") {
        return (
            format!(
                "{neither}: a PE/COFF (EFI) executable without the Linux x86 setup header \
                 (first bytes {first})"
            ),
            "ferry does not run EFI applications or unified kernel images; boot the kernel's \
             bzImage or vmlinux"
                .into(),
        );
    }
    if head.starts_with(b"#!") || head.iter().take(64).all(|b| b.is_ascii()) {
        return (
            format!("{neither}: it looks like text (first bytes {first})"),
            "pass the kernel image itself (bzImage or vmlinux), not a script or config".into(),
        );
    }
    (
        format!("{neither} (first bytes {first})"),
        "pass a bzImage (arch/x86/boot/bzImage, /boot/vmlinuz-*) or an ELF vmlinux".into(),
    )
}

/// Picks the initrd's guest address: as high as possible, page aligned,
/// below `min(low_end, initrd_addr_max + 1)` and above the kernel.
fn place_initrd(
    layout: &MemoryLayout,
    kernel_end: u64,
    initrd_addr_max: u64,
    size: u64,
) -> Result<u64, BootError> {
    if size == 0 {
        return Err(BootError::EmptyInitrd);
    }
    let limit = layout.low_end().min(initrd_addr_max.saturating_add(1));
    let floor = kernel_end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    match limit
        .checked_sub(size)
        .map(|start| start & !(PAGE_SIZE - 1))
    {
        Some(start) if start >= floor => Ok(start),
        _ => Err(BootError::InitrdTooLarge {
            size,
            room: limit.saturating_sub(floor),
            kernel_end: floor,
            limit,
        }),
    }
}

pub(crate) fn write_bytes<M: GuestMemoryBackend>(
    mem: &M,
    gpa: u64,
    bytes: &[u8],
    what: &'static str,
) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(gpa))
        .map_err(|source| BootError::GuestMemory { what, gpa, source })
}

pub(crate) fn write_obj<M: GuestMemoryBackend, T: ByteValued>(
    mem: &M,
    gpa: u64,
    value: T,
    what: &'static str,
) -> Result<(), BootError> {
    mem.write_obj(value, GuestAddress(gpa))
        .map_err(|source| BootError::GuestMemory { what, gpa, source })
}

/// Copies `len` bytes from `src` to guest address `gpa`, 1 MiB at a time.
fn copy_stream<M, R>(
    mem: &M,
    src: &mut R,
    gpa: u64,
    len: u64,
    what: &'static str,
    read_error: fn(io::Error) -> BootError,
) -> Result<(), BootError>
where
    M: GuestMemoryBackend,
    R: Read + ?Sized,
{
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0u64;
    while done < len {
        let n = CHUNK.min(len - done) as usize;
        src.read_exact(&mut buf[..n]).map_err(read_error)?;
        write_bytes(mem, gpa + done, &buf[..n], what)?;
        done += n as u64;
    }
    Ok(())
}

/// Feeds a plain `Read + Seek` source to linux-loader, which reads through
/// vm-memory's `ReadVolatile`.
struct VolatileReader<'a, R: ?Sized> {
    inner: &'a mut R,
    bounce: Vec<u8>,
}

impl<'a, R: ?Sized> VolatileReader<'a, R> {
    fn new(inner: &'a mut R) -> Self {
        VolatileReader {
            inner,
            bounce: Vec::new(),
        }
    }
}

impl<R: Read + ?Sized> Read for VolatileReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<R: Seek + ?Sized> Seek for VolatileReader<'_, R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

impl<R: Read + ?Sized> ReadVolatile for VolatileReader<'_, R> {
    /// Fills `buf` completely unless the source ends first: vm-memory's
    /// `read_exact_volatile_from` makes one call per guest memory region and
    /// treats a short read as an error.
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let total = buf.len();
        let mut done = 0;
        while done < total {
            let want = (total - done).min(1 << 20);
            self.bounce.resize(want, 0);
            let n = match self.inner.read(&mut self.bounce[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(VolatileMemoryError::IOError(e)),
            };
            buf.offset(done)?.copy_from(&self.bounce[..n]);
            done += n;
        }
        Ok(done)
    }
}

/// `boot_params` for a bzImage: its own setup header plus what the loader fills in.
fn bzimage_boot_params(plan: &BzImagePlan) -> boot_params {
    let mut params = boot_params {
        hdr: plan.header,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = HEAP_END_PTR;
    params.hdr.code32_start = HIMEM_START as u32;
    params
}

/// `boot_params` for an ELF vmlinux, which has no setup header of its own.
fn vmlinux_boot_params() -> boot_params {
    let mut params = boot_params::default();
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.kernel_alignment = VMLINUX_KERNEL_ALIGNMENT;
    params.hdr.cmdline_size = (CMDLINE_MAX_SIZE - 1) as u32;
    params
}

/// Fills in the command line, initrd and E820 table and writes the zero page.
fn write_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    layout: &MemoryLayout,
    mut params: boot_params,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.ext_cmd_line_ptr = (CMDLINE_START >> 32) as u32;
    if let Some((gpa, size)) = initrd {
        params.hdr.ramdisk_image = gpa as u32;
        params.ext_ramdisk_image = (gpa >> 32) as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    let map = layout.memory_map();
    debug_assert!(map.len() <= E820_MAX_ENTRIES_ZEROPAGE);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind.e820_type(),
        };
    }
    params.e820_entries = map.len() as u8;
    write_obj(mem, ZERO_PAGE_START, params, "boot_params zero page")
}

/// Writes `hvm_start_info`, its memory map and (for an initrd) its module list.
fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    layout: &MemoryLayout,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let map = layout.memory_map();
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    debug_assert!(PVH_MEMMAP_START + map.len() as u64 * entry_size <= PVH_MODLIST_START);
    for (i, entry) in map.iter().enumerate() {
        let value = hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind.e820_type(),
            reserved: 0,
        };
        let gpa = PVH_MEMMAP_START + i as u64 * entry_size;
        write_obj(mem, gpa, value, "PVH memory map")?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        write_obj(mem, PVH_MODLIST_START, module, "PVH module list")?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    write_obj(mem, PVH_INFO_START, info, "PVH start info")
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::testutil::*;

    fn read_vec(mem: &GuestMemoryMmap<()>, gpa: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(gpa))
            .expect("read guest memory");
        buf
    }

    fn load(
        mem: &GuestMemoryMmap<()>,
        layout: &MemoryLayout,
        image: &[u8],
        initrd: Option<&[u8]>,
        cmdline: &str,
    ) -> Result<BootInfo, BootError> {
        let mut kernel = Cursor::new(image);
        let mut initrd = initrd.map(Cursor::new);
        load_kernel(
            mem,
            layout,
            &mut kernel,
            initrd.as_mut().map(|i| i as &mut dyn ReadSeek),
            cmdline,
        )
    }

    fn e820(params: &boot_params) -> Vec<(u64, u64, u32)> {
        let table = params.e820_table;
        table[..usize::from(params.e820_entries)]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect()
    }

    fn expected_e820(layout: &MemoryLayout) -> Vec<(u64, u64, u32)> {
        layout
            .memory_map()
            .iter()
            .map(|e| (e.addr, e.size, e.kind.e820_type()))
            .collect()
    }

    fn read_cmdline(mem: &GuestMemoryMmap<()>, len: usize) -> Vec<u8> {
        read_vec(mem, CMDLINE_START, len + 1)
    }

    #[test]
    fn bzimage_gets_boot_params_from_its_setup_header() {
        let layout = MemoryLayout::new(512 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        let payload = pattern(300_000, 7);
        let image = build_bzimage(&bzimage_header(27), &payload);
        let initrd = pattern(100_000, 99);
        let cmdline = "console=ttyS0 reboot=k panic=1";

        let info = load(&mem, &layout, &image, Some(&initrd), cmdline).expect("load");

        assert_eq!(info.entry, 0x100200);
        assert_eq!(
            info.protocol,
            BootProtocol::Linux64 {
                boot_params_gpa: 0x7000
            }
        );
        // The decompressor needs init_size bytes at pref_address (16 MiB).
        assert_eq!(info.kernel_end, 0x100_0000 + 0x100_0000);
        assert_eq!(read_vec(&mem, 0x100000, payload.len()), payload);

        let (initrd_gpa, initrd_size) = info.initrd.expect("initrd placed");
        assert_eq!(initrd_size, initrd.len() as u64);
        assert_eq!(initrd_gpa % 4096, 0);
        assert!(initrd_gpa + initrd_size <= 512 * MIB);
        assert!(
            512 * MIB - (initrd_gpa + initrd_size) < 4096,
            "as high as possible"
        );
        assert_eq!(read_vec(&mem, initrd_gpa, initrd.len()), initrd);

        let params: boot_params = mem.read_obj(GuestAddress(0x7000)).expect("zero page");
        let hdr = params.hdr;
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!(hdr.loadflags, LOADED_HIGH | CAN_USE_HEAP);
        assert_eq!({ hdr.heap_end_ptr }, 0xfe00);
        assert_eq!({ hdr.code32_start }, 0x100000);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ params.ext_cmd_line_ptr }, 0);
        assert_eq!({ hdr.ramdisk_image } as u64, initrd_gpa);
        assert_eq!({ hdr.ramdisk_size } as u64, initrd_size);
        assert_eq!({ params.ext_ramdisk_image }, 0);
        assert_eq!({ params.ext_ramdisk_size }, 0);
        assert_eq!({ hdr.init_size }, 0x100_0000);
        assert_eq!({ hdr.xloadflags }, XLF_KERNEL_64);
        assert_eq!(params.sentinel, 0);
        assert_eq!(
            e820(&params),
            vec![
                (0, 0x9fc00, 1),
                (0x9fc00, 0x100000 - 0x9fc00, 2),
                (0x100000, 512 * MIB - 0x100000, 1)
            ]
        );

        let mut expected = cmdline.as_bytes().to_vec();
        expected.push(0);
        assert_eq!(read_cmdline(&mem, cmdline.len()), expected);
    }

    #[test]
    fn bzimage_initrd_stays_below_initrd_addr_max() {
        let layout = MemoryLayout::new(1024 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        let mut header = bzimage_header(4);
        header.initrd_addr_max = 0x1fff_ffff;
        let image = build_bzimage(&header, &pattern(4096, 1));
        let info = load(&mem, &layout, &image, Some(&pattern(10_000, 2)), "").expect("load");
        let (gpa, size) = info.initrd.expect("initrd");
        assert_eq!(gpa, (0x2000_0000 - size) & !0xfff);
    }

    #[test]
    fn bzimage_with_setup_sects_zero_means_four() {
        let layout = MemoryLayout::new(64 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        let payload = pattern(5000, 3);
        let image = build_bzimage(&bzimage_header(0), &payload);
        assert_eq!(image.len(), 5 * 512 + payload.len());
        load(&mem, &layout, &image, None, "").expect("load");
        assert_eq!(read_vec(&mem, 0x100000, payload.len()), payload);
    }

    #[test]
    fn bzimage_header_extent_follows_the_jump_byte() {
        // A 2.12 header ends at 0x268: the bytes after it belong to setup code
        // and must not leak into boot_params.
        let layout = MemoryLayout::new(64 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        let mut header = bzimage_header(4);
        header.version = 0x020c;
        header.jump = 0x66eb;
        let mut image = build_bzimage(&header, &pattern(4096, 1));
        image[0x268..0x26c].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        load(&mem, &layout, &image, None, "").expect("load");
        let params: boot_params = mem.read_obj(GuestAddress(0x7000)).expect("zero page");
        assert_eq!({ params.hdr.kernel_info_offset }, 0);
    }

    #[test]
    fn bzimage_limits_the_cmdline_to_its_cmdline_size() {
        let layout = MemoryLayout::new(64 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        let mut header = bzimage_header(4);
        header.cmdline_size = 255;
        let image = build_bzimage(&header, &pattern(4096, 1));
        let cmdline = "x".repeat(256);
        match load(&mem, &layout, &image, None, &cmdline) {
            Err(BootError::CmdlineTooLong { len: 256, max: 255 }) => {}
            other => panic!("expected CmdlineTooLong, got {other:?}"),
        }
        load(&mem, &layout, &image, None, &cmdline[..255]).expect("255 bytes fit");
    }

    #[test]
    fn bzimage_without_64_bit_entry_is_refused() {
        let layout = MemoryLayout::new(64 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        let mut header = bzimage_header(4);
        header.xloadflags = 0;
        let image = build_bzimage(&header, &pattern(4096, 1));
        let err = load(&mem, &layout, &image, None, "").expect_err("refused");
        let text = err.to_string();
        assert!(matches!(err, BootError::NotBootable { .. }), "{err:?}");
        assert!(text.contains("XLF_KERNEL_64"), "{text}");
        assert!(text.contains("64-bit boot protocol"), "{text}");

        let mut header = bzimage_header(4);
        header.loadflags = 0;
        let image = build_bzimage(&header, &pattern(4096, 1));
        let text = load(&mem, &layout, &image, None, "")
            .expect_err("refused")
            .to_string();
        assert!(text.contains("zImage"), "{text}");
    }

    #[test]
    fn bzimage_whose_init_size_exceeds_ram_is_refused() {
        // The kernel runs at 16 MiB and needs init_size (16 MiB) there.
        let image = build_bzimage(&bzimage_header(4), &pattern(4096, 1));
        let layout = MemoryLayout::new(32 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        load(&mem, &layout, &image, None, "").expect("32 MiB is just enough");

        let layout = MemoryLayout::new(24 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        let err = load(&mem, &layout, &image, None, "").expect_err("refused");
        let text = err.to_string();
        assert!(
            matches!(
                err,
                BootError::KernelTooLarge {
                    needed_end: 0x200_0000,
                    low_end: 0x180_0000
                }
            ),
            "{err:?}"
        );
        assert!(text.contains("(32 MiB)"), "{text}");
        assert!(text.contains("give the VM more memory (-m)"), "{text}");
    }

    #[test]
    fn truncated_bzimage_is_refused() {
        let layout = MemoryLayout::new(64 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        let image = build_bzimage(&bzimage_header(10), &[]);
        let text = load(&mem, &layout, &image[..0x400], None, "")
            .expect_err("refused")
            .to_string();
        assert!(text.contains("truncated bzImage"), "{text}");
    }

    fn pvh_image(entry: u32) -> (Vec<u8>, Vec<u8>) {
        let code = pattern(20_000, 5);
        let image = build_elf(
            0x100_0000,
            &[Segment {
                paddr: 0x100_0000,
                data: code.clone(),
                memsz: 0x10_0000,
            }],
            &[
                Note {
                    name: b"GNU\0",
                    note_type: 3,
                    desc: vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
                },
                pvh_note(entry),
            ],
        );
        (image, code)
    }

    #[test]
    fn elf_with_xen_note_boots_pvh() {
        let layout = MemoryLayout::new(256 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        let (image, code) = pvh_image(0x100_0040);
        let initrd = pattern(70_000, 42);
        let cmdline = "console=hvc0 root=/dev/vda";

        let info = load(&mem, &layout, &image, Some(&initrd), cmdline).expect("load");

        assert_eq!(info.entry, 0x100_0040);
        assert_eq!(
            info.protocol,
            BootProtocol::Pvh {
                start_info_gpa: 0x6000
            }
        );
        assert_eq!(info.kernel_end, 0x110_0000);
        assert_eq!(read_vec(&mem, 0x100_0000, code.len()), code);

        let start: hvm_start_info = mem.read_obj(GuestAddress(0x6000)).expect("start info");
        assert_eq!(start.magic, 0x336e_c578);
        assert_eq!(start.version, 1);
        assert_eq!(start.flags, 0);
        assert_eq!(start.cmdline_paddr, 0x20000);
        assert_eq!(start.rsdp_paddr, 0);
        assert_eq!(start.memmap_paddr, 0x6040);
        assert_eq!(start.memmap_entries, 3);
        assert_eq!(start.nr_modules, 1);
        assert_eq!(start.modlist_paddr, PVH_MODLIST_START);

        let module: hvm_modlist_entry = mem
            .read_obj(GuestAddress(PVH_MODLIST_START))
            .expect("module");
        let (gpa, size) = info.initrd.expect("initrd");
        assert_eq!((module.paddr, module.size), (gpa, size));
        assert_eq!(module.cmdline_paddr, 0);
        assert_eq!(size, initrd.len() as u64);
        assert_eq!(read_vec(&mem, gpa, initrd.len()), initrd);
        assert!(gpa >= info.kernel_end);

        let map: Vec<(u64, u64, u32)> = (0..3)
            .map(|i| {
                let e: hvm_memmap_table_entry = mem
                    .read_obj(GuestAddress(0x6040 + 24 * i))
                    .expect("memmap entry");
                (e.addr, e.size, e.type_)
            })
            .collect();
        assert_eq!(map, expected_e820(&layout));
        // Raw layout of the first entry: addr u64, size u64, type u32, reserved u32.
        let raw = read_vec(&mem, 0x6040, 24);
        assert_eq!(&raw[8..16], &0x9fc00u64.to_le_bytes());
        assert_eq!(&raw[16..20], &1u32.to_le_bytes());

        let mut expected = cmdline.as_bytes().to_vec();
        expected.push(0);
        assert_eq!(read_cmdline(&mem, cmdline.len()), expected);
        // No zero page for PVH.
        assert_eq!(read_vec(&mem, 0x7000, 4096), vec![0; 4096]);
    }

    #[test]
    fn pvh_without_initrd_has_no_modules() {
        let layout = MemoryLayout::new(64 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        let (image, _) = pvh_image(0x100_0000);
        load(&mem, &layout, &image, None, "").expect("load");
        let start: hvm_start_info = mem.read_obj(GuestAddress(0x6000)).expect("start info");
        assert_eq!(start.nr_modules, 0);
        assert_eq!(start.modlist_paddr, 0);
        assert_eq!(read_vec(&mem, 0x20000, 1), vec![0]);
    }

    #[test]
    fn pvh_entry_outside_the_image_is_refused() {
        let layout = MemoryLayout::new(64 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        let (image, _) = pvh_image(0x20_0000);
        let text = load(&mem, &layout, &image, None, "")
            .expect_err("refused")
            .to_string();
        assert!(text.contains("PVH entry point 0x200000"), "{text}");
    }

    fn vmlinux_image() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let text = pattern(50_000, 11);
        let data = pattern(8_000, 13);
        let image = build_elf(
            0x100_0000,
            &[
                Segment {
                    paddr: 0x100_0000,
                    data: text.clone(),
                    memsz: text.len() as u64,
                },
                Segment {
                    paddr: 0x120_0000,
                    data: data.clone(),
                    memsz: 0x4_0000,
                },
            ],
            &[Note {
                name: b"Linux\0",
                note_type: 6,
                desc: b"6.1.0".to_vec(),
            }],
        );
        (image, text, data)
    }

    #[test]
    fn elf_without_xen_note_boots_linux_64() {
        let layout = MemoryLayout::new(128 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        let (image, text, data) = vmlinux_image();
        let initrd = pattern(30_000, 17);

        let info = load(&mem, &layout, &image, Some(&initrd), "quiet").expect("load");

        assert_eq!(info.entry, 0x100_0000);
        assert_eq!(
            info.protocol,
            BootProtocol::Linux64 {
                boot_params_gpa: 0x7000
            }
        );
        assert_eq!(info.kernel_end, 0x124_0000);
        assert_eq!(read_vec(&mem, 0x100_0000, text.len()), text);
        assert_eq!(read_vec(&mem, 0x120_0000, data.len()), data);

        let params: boot_params = mem.read_obj(GuestAddress(0x7000)).expect("zero page");
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        let (gpa, size) = info.initrd.expect("initrd");
        assert_eq!(
            ({ hdr.ramdisk_image } as u64, { hdr.ramdisk_size } as u64),
            (gpa, size)
        );
        assert_eq!(gpa, (128 * MIB - size) & !0xfff);
        assert_eq!(e820(&params), expected_e820(&layout));
        assert_eq!(read_cmdline(&mem, 5), b"quiet\0");
        // No PVH start info.
        assert_eq!(read_vec(&mem, 0x6000, 64), vec![0; 64]);
    }

    #[test]
    fn elf_segments_larger_than_the_copy_chunk_load_whole() {
        let layout = MemoryLayout::new(64 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        let big = pattern(3 * MIB as usize + 12345, 21);
        let image = build_elf(
            0x100_0000,
            &[Segment {
                paddr: 0x100_0000,
                data: big.clone(),
                memsz: big.len() as u64,
            }],
            &[pvh_note(0x100_0000)],
        );
        load(&mem, &layout, &image, None, "").expect("load");
        assert_eq!(read_vec(&mem, 0x100_0000, big.len()), big);
    }

    #[test]
    fn large_guest_gets_the_high_range_in_both_memory_maps() {
        let layout = MemoryLayout::new(3 * 1024 * MIB + 512 * MIB).expect("layout");
        let mem = guest_memory(&layout);

        let image = build_bzimage(&bzimage_header(4), &pattern(4096, 1));
        let info = load(&mem, &layout, &image, Some(&pattern(5000, 3)), "").expect("load");
        let params: boot_params = mem.read_obj(GuestAddress(0x7000)).expect("zero page");
        assert_eq!(
            e820(&params),
            vec![
                (0, 0x9fc00, 1),
                (0x9fc00, 0x100000 - 0x9fc00, 2),
                (0x100000, 0xc000_0000 - 0x100000, 1),
                (0x1_0000_0000, 512 * MIB, 1),
            ]
        );
        // initrd_addr_max 0x7fffffff caps the initrd below 2 GiB.
        let (gpa, size) = info.initrd.expect("initrd");
        assert_eq!(gpa, (0x8000_0000 - size) & !0xfff);

        let (pvh, _) = pvh_image(0x100_0000);
        let info = load(&mem, &layout, &pvh, Some(&pattern(5000, 3)), "").expect("load");
        let start: hvm_start_info = mem.read_obj(GuestAddress(0x6000)).expect("start info");
        assert_eq!(start.memmap_entries, 4);
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(0x6040 + 3 * 24))
            .expect("memmap entry");
        assert_eq!(
            (last.addr, last.size, last.type_),
            (0x1_0000_0000, 512 * MIB, 1)
        );
        // Without a setup header the default initrd_addr_max 0x37ffffff applies.
        let (gpa, size) = info.initrd.expect("initrd");
        assert_eq!(gpa, (0x3800_0000 - size) & !0xfff);
    }

    fn not_bootable_text(image: &[u8]) -> String {
        let layout = MemoryLayout::new(64 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        match load(&mem, &layout, image, None, "") {
            Err(err @ BootError::NotBootable { .. }) => err.to_string(),
            other => panic!("expected NotBootable, got {other:?}"),
        }
    }

    #[test]
    fn random_bytes_are_not_bootable() {
        let text = not_bootable_text(&[0xc3, 0x90, 0x12, 0x34, 0x00, 0xff, 0x80, 0x81]);
        assert!(
            text.contains("neither an ELF vmlinux/PVH image nor a bzImage"),
            "{text}"
        );
        assert!(
            text.contains("first bytes c3 90 12 34 00 ff 80 81"),
            "{text}"
        );
        assert!(text.contains("bzImage"), "{text}");
    }

    #[test]
    fn empty_file_is_not_bootable() {
        let text = not_bootable_text(&[]);
        assert!(text.contains("empty"), "{text}");
    }

    #[test]
    fn compressed_vmlinux_is_not_bootable_and_says_how_to_fix_it() {
        let text = not_bootable_text(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 3]);
        assert!(text.contains("gzip-compressed"), "{text}");
        assert!(text.contains("gunzip"), "{text}");
        let text = not_bootable_text(&[0x28, 0xb5, 0x2f, 0xfd, 0, 0]);
        assert!(text.contains("zstd"), "{text}");
    }

    #[test]
    fn efi_only_pe_is_not_bootable() {
        let mut image = vec![0u8; 1024];
        image[..2].copy_from_slice(b"MZ");
        let text = not_bootable_text(&image);
        assert!(text.contains("PE/COFF (EFI)"), "{text}");
    }

    #[test]
    fn truncated_elf_is_not_bootable() {
        let (image, _, _) = vmlinux_image();
        let text = not_bootable_text(&image[..image.len() - 100]);
        assert!(text.contains("truncated or corrupt ELF"), "{text}");
        assert!(text.contains("past the end of the file"), "{text}");
        let text = not_bootable_text(&image[..40]);
        assert!(text.contains("ELF header is cut short"), "{text}");
        let text = not_bootable_text(&image[..100]);
        assert!(
            text.contains("program headers lie outside the file"),
            "{text}"
        );
    }

    #[test]
    fn elf_for_another_machine_or_class_is_not_bootable() {
        let (mut image, _, _) = vmlinux_image();
        image[0x12] = 183; // EM_AARCH64
        let text = not_bootable_text(&image);
        assert!(text.contains("machine type 183"), "{text}");
        image[4] = 1;
        let text = not_bootable_text(&image);
        assert!(text.contains("32-bit ELF"), "{text}");
    }

    #[test]
    fn elf_segment_below_one_mib_is_refused() {
        let layout = MemoryLayout::new(64 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        let image = build_elf(
            0x8000,
            &[Segment {
                paddr: 0x8000,
                data: vec![0x90; 16],
                memsz: 16,
            }],
            &[],
        );
        let err = load(&mem, &layout, &image, None, "").expect_err("refused");
        assert!(
            matches!(
                err,
                BootError::KernelBelowHimem {
                    paddr: 0x8000,
                    size: 16
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn elf_larger_than_ram_is_refused() {
        let layout = MemoryLayout::new(16 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        let (image, _, _) = vmlinux_image();
        let err = load(&mem, &layout, &image, None, "").expect_err("refused");
        assert!(
            matches!(
                err,
                BootError::KernelTooLarge {
                    needed_end: 0x100_c350,
                    low_end: 0x100_0000
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn cmdline_longer_than_4095_bytes_is_refused() {
        let layout = MemoryLayout::new(64 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        let (image, _, _) = vmlinux_image();
        let long = "a".repeat(4096);
        let err = load(&mem, &layout, &image, None, &long).expect_err("refused");
        assert!(
            matches!(
                err,
                BootError::CmdlineTooLong {
                    len: 4096,
                    max: 4095
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("shorten it"));
        load(&mem, &layout, &image, None, &long[..4095]).expect("4095 bytes fit");
        assert_eq!(read_vec(&mem, 0x20000 + 4094, 2), b"a\0");

        let err = load(&mem, &layout, &image, None, "a\0b").expect_err("refused");
        assert!(
            matches!(err, BootError::CmdlineHasNul { offset: 1 }),
            "{err:?}"
        );
    }

    #[test]
    fn initrd_too_large_is_refused_before_anything_is_written() {
        let layout = MemoryLayout::new(64 * MIB).expect("layout");
        let mem = guest_memory(&layout);
        let (image, _, _) = vmlinux_image();
        // The kernel ends at 0x124_0000; 64 MiB - that is about 45.7 MiB.
        let initrd = vec![1u8; 46 * MIB as usize];
        let err = load(&mem, &layout, &image, Some(&initrd), "x").expect_err("refused");
        let text = err.to_string();
        assert!(
            matches!(
                err,
                BootError::InitrdTooLarge {
                    size,
                    room,
                    kernel_end: 0x124_0000,
                    limit: 0x400_0000
                } if size == 46 * MIB && room == 0x400_0000 - 0x124_0000
            ),
            "{err:?}"
        );
        assert!(text.contains("give the VM more memory (-m)"), "{text}");
        assert_eq!(read_vec(&mem, 0x100_0000, 64), vec![0; 64]);
        assert_eq!(read_vec(&mem, 0x20000, 1), vec![0]);

        let err = load(&mem, &layout, &image, Some(&[]), "").expect_err("refused");
        assert!(matches!(err, BootError::EmptyInitrd), "{err:?}");
    }

    #[test]
    fn memory_that_does_not_cover_the_layout_is_reported() {
        let layout = MemoryLayout::new(64 * MIB).expect("layout");
        let small = MemoryLayout::new(32 * MIB).expect("layout");
        let mem = guest_memory(&small);
        let (image, _) = pvh_image(0x100_0000);
        let err = load(&mem, &layout, &image, Some(&pattern(4096, 1)), "").expect_err("refused");
        assert!(
            matches!(err, BootError::GuestMemory { what: "initrd", .. }),
            "{err:?}"
        );
    }
}
