//! The one error type of this crate.

use std::io;

/// Why a kernel could not be prepared for boot.
///
/// Every message names the problem and, where the operator can do something
/// about it, the fix. The caller adds which file was involved, e.g.
/// `kernel image /path: {error}`.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The requested RAM size cannot be laid out.
    #[error(
        "guest RAM size of {ram_bytes} bytes is {problem}; choose a size that is a multiple \
         of 4 KiB between 8 MiB and 64 GiB (-m)"
    )]
    InvalidRamSize {
        /// The size that was asked for.
        ram_bytes: u64,
        /// What is wrong with it.
        problem: &'static str,
    },

    /// The kernel image is not something this crate can boot.
    #[error("not a bootable x86_64 kernel: {found}; {fix}")]
    NotBootable {
        /// What was found instead (image kind, first bytes).
        found: String,
        /// What to pass instead.
        fix: String,
    },

    /// Reading the kernel image failed.
    #[error("cannot read the kernel image")]
    ReadKernel(#[source] io::Error),

    /// Reading the initrd failed.
    #[error("cannot read the initrd")]
    ReadInitrd(#[source] io::Error),

    /// The initrd file has no content.
    #[error("the initrd is empty; pass a cpio archive (optionally compressed) or no initrd")]
    EmptyInitrd,

    /// The command line does not fit.
    #[error(
        "the kernel command line is {len} bytes, longer than the {max} bytes this kernel \
         accepts; shorten it"
    )]
    CmdlineTooLong {
        /// Length of the command line, without its NUL.
        len: usize,
        /// Most bytes allowed, without the NUL.
        max: usize,
    },

    /// The command line contains a NUL byte, which would cut it short.
    #[error("the kernel command line contains a NUL byte at offset {offset}; remove it")]
    CmdlineHasNul {
        /// Byte offset of the first NUL.
        offset: usize,
    },

    /// The kernel does not fit in low RAM.
    #[error(
        "the kernel needs guest memory up to {needed_end:#x} ({needed_mib} MiB) but RAM below \
         the MMIO hole ends at {low_end:#x}; give the VM more memory (-m)",
        needed_mib = needed_end.div_ceil(1 << 20)
    )]
    KernelTooLarge {
        /// First guest address past what the kernel needs.
        needed_end: u64,
        /// End of low RAM.
        low_end: u64,
    },

    /// An ELF segment would overwrite the boot structures below 1 MiB.
    #[error(
        "the ELF kernel has a segment at {paddr:#x}..{end:#x}, below 1 MiB where ferry keeps \
         its boot structures; link the kernel at or above 0x100000",
        end = paddr.saturating_add(*size)
    )]
    KernelBelowHimem {
        /// The segment's physical load address.
        paddr: u64,
        /// The segment's size in memory.
        size: u64,
    },

    /// The initrd does not fit between the kernel and the top of usable RAM.
    #[error(
        "the initrd is {size} bytes but only {room} bytes are free between the kernel end \
         {kernel_end:#x} and {limit:#x}; give the VM more memory (-m) or use a smaller initrd"
    )]
    InitrdTooLarge {
        /// Size of the initrd.
        size: u64,
        /// Bytes available for it.
        room: u64,
        /// End of the kernel (page aligned).
        kernel_end: u64,
        /// Highest address the initrd may end at (exclusive).
        limit: u64,
    },

    /// linux-loader refused or failed to copy the ELF image.
    #[error("cannot load the ELF kernel into guest memory")]
    LoadElf(#[source] linux_loader::loader::Error),

    /// More vCPUs than the MP table can describe.
    #[error("{vcpus} vCPUs asked for; the MP table describes 1 to {max} (-smp)")]
    TooManyCpus {
        /// What was asked for.
        vcpus: u32,
        /// The most the table takes.
        max: u32,
    },

    /// A write of boot data into guest memory failed.
    #[error(
        "cannot write the {what} at guest address {gpa:#x}; the guest memory must cover \
         MemoryLayout::ranges()"
    )]
    GuestMemory {
        /// What was being written.
        what: &'static str,
        /// Where.
        gpa: u64,
        /// The vm-memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },

    /// The compressed payload of a bzImage could not be extracted.
    #[error("cannot extract the vmlinux from the bzImage: {problem}")]
    Extract {
        /// What went wrong.
        problem: String,
    },

    /// The SMBIOS tables cannot be built from the configuration.
    #[error("cannot build the SMBIOS tables")]
    Smbios(#[from] crate::smbios::SmbiosError),

    /// The ACPI tables cannot be built or placed.
    #[error("cannot build the ACPI tables")]
    Acpi(#[from] crate::acpi::AcpiError),
}
