//! Initial vCPU register state for the two boot protocols, as plain
//! kvm-bindings structs for the VMM to apply.
//!
//! | | PVH | Linux 64-bit |
//! |---|---|---|
//! | mode | 32-bit protected, paging off | long mode, 4-level paging |
//! | CR0 | PE \| ET | PE \| ET \| PG |
//! | CR3 / CR4 / EFER | 0 / 0 / 0 | PML4 / PAE / LME \| LMA |
//! | CS (0x08) | flat 4 GiB, 32-bit, type 0xb | flat, L=1, type 0xb |
//! | DS ES FS GS SS (0x10) | flat 4 GiB data, type 0x3 | same |
//! | TR (0x18) | busy TSS, type 0xb, limit 0x67 | same |
//! | GPRs | EBX = `hvm_start_info` | RSI = `boot_params`, RSP = RBP = 0x8ff0 |
//!
//! Both protocols get the GDT at [`BOOT_GDT_START`] and a null IDT at
//! [`BOOT_IDT_START`] in guest memory so that GDTR/IDTR describe real tables;
//! the Linux 64-bit path also gets page tables identity-mapping the first GiB
//! with 2 MiB pages.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::GuestMemoryBackend;

use crate::layout::*;
use crate::loader::{write_bytes, write_obj};
use crate::{BootError, BootInfo, BootProtocol};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// Page-table entry bits: present, writable, (PDE) 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_PAGE_2M: u64 = 0x80;

/// Descriptor flags: bits 0-7 the access byte (P, DPL, S, type), bits 12-15
/// the flags nibble (G, D/B, L, AVL).
const CODE64_FLAGS: u16 = 0xa09b; // P, S, type 0xb; G, L
const CODE32_FLAGS: u16 = 0xc09b; // P, S, type 0xb; G, D/B
const DATA_FLAGS: u16 = 0xc093; // P, S, type 0x3; G, D/B
const TSS_FLAGS: u16 = 0x008b; // P, type 0xb (busy TSS)
const FLAT_LIMIT: u32 = 0xfffff; // with G: 4 GiB
const TSS_LIMIT: u32 = 0x67;

const CODE_INDEX: u16 = 1;
const DATA_INDEX: u16 = 2;
const TSS_INDEX: u16 = 3;

/// x87 control word after FNINIT: all exceptions masked, 64-bit precision.
const FPU_CONTROL_WORD: u16 = 0x37f;
/// MXCSR after reset: all SSE exceptions masked.
const MXCSR_DEFAULT: u32 = 0x1f80;

/// Encodes a segment descriptor from its flags (access byte in bits 0-7,
/// G/DB/L/AVL in bits 12-15), base and 20-bit limit.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | ((flags & 0xff) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((flags >> 12) & 0xf) << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// The KVM view of the descriptor `entry` loaded from GDT slot `index`.
fn segment_from_gdt_entry(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let raw_limit = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16);
    let granular = bit(55) == 1;
    let limit = if granular {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: limit as u32,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        s: bit(44),
        dpl: ((entry >> 45) & 0x3) as u8,
        present,
        avl: bit(52),
        l: bit(53),
        db: bit(54),
        g: bit(55),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT: null, code, data, TSS.
fn boot_gdt(protocol: BootProtocol) -> [u64; 4] {
    let code = match protocol {
        BootProtocol::Pvh { .. } => CODE32_FLAGS,
        BootProtocol::Linux64 { .. } => CODE64_FLAGS,
    };
    [
        0,
        gdt_entry(code, 0, FLAT_LIMIT),
        gdt_entry(DATA_FLAGS, 0, FLAT_LIMIT),
        gdt_entry(TSS_FLAGS, 0, TSS_LIMIT),
    ]
}

/// General-purpose registers at the kernel entry.
///
/// PVH: `RIP` = entry, `RBX` = `hvm_start_info`, `RFLAGS` = 0x2.
/// Linux 64-bit: `RIP` = entry, `RSI` = `boot_params`, `RSP` = `RBP` =
/// [`BOOT_STACK_POINTER`], `RFLAGS` = 0x2. All other registers are zero.
pub fn boot_regs(info: &BootInfo) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: info.entry,
        ..Default::default()
    };
    match info.protocol {
        BootProtocol::Pvh { start_info_gpa } => regs.rbx = start_info_gpa,
        BootProtocol::Linux64 { boot_params_gpa } => {
            regs.rsi = boot_params_gpa;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
    }
    regs
}

/// Sets the special registers in `sregs` (as read from KVM) for the entry
/// described by `info`, and writes the boot GDT and IDT (and for the Linux
/// 64-bit protocol the identity-mapping page tables) into `mem`.
///
/// Sets CR0, CR3, CR4, EFER, CS, DS, ES, FS, GS, SS, TR, GDTR and IDTR;
/// leaves everything else (APIC base, LDT, CR2, CR8, interrupt bitmap) as given.
///
/// # Errors
/// [`BootError::GuestMemory`] if the tables cannot be written.
pub fn boot_sregs<M: GuestMemoryBackend>(
    info: &BootInfo,
    mem: &M,
    sregs: &mut kvm_sregs,
) -> Result<(), BootError> {
    let gdt = boot_gdt(info.protocol);
    for (i, entry) in gdt.iter().enumerate() {
        write_obj(mem, BOOT_GDT_START + 8 * i as u64, *entry, "boot GDT")?;
    }
    write_obj(mem, BOOT_IDT_START, 0u64, "boot IDT")?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;

    let data = segment_from_gdt_entry(gdt[usize::from(DATA_INDEX)], DATA_INDEX);
    sregs.cs = segment_from_gdt_entry(gdt[usize::from(CODE_INDEX)], CODE_INDEX);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt_entry(gdt[usize::from(TSS_INDEX)], TSS_INDEX);

    match info.protocol {
        BootProtocol::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootProtocol::Linux64 { .. } => {
            write_identity_page_tables(mem)?;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    Ok(())
}

/// PML4 → PDPTE → PDE with 512 2-MiB pages: virtual = physical for the first GiB.
fn write_identity_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), BootError> {
    write_obj(mem, PML4_START, PDPTE_START | PTE_PRESENT_RW, "boot PML4")?;
    write_obj(mem, PDPTE_START, PDE_START | PTE_PRESENT_RW, "boot PDPTE")?;
    let mut pde = [0u8; 4096];
    for (i, slot) in pde.chunks_exact_mut(8).enumerate() {
        let entry = ((i as u64) << 21) | PDE_PAGE_2M | PTE_PRESENT_RW;
        slot.copy_from_slice(&entry.to_le_bytes());
    }
    write_bytes(mem, PDE_START, &pde, "boot PDE")
}

/// FPU state at the kernel entry: FCW 0x37f, MXCSR 0x1f80, the rest zero.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_CONTROL_WORD,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::testutil::{guest_memory, MIB};
    use crate::MemoryLayout;

    fn linux64() -> BootInfo {
        BootInfo {
            entry: 0x100200,
            protocol: BootProtocol::Linux64 {
                boot_params_gpa: 0x7000,
            },
            kernel_end: 0x200_0000,
            initrd: None,
        }
    }

    fn pvh() -> BootInfo {
        BootInfo {
            entry: 0x100_0040,
            protocol: BootProtocol::Pvh {
                start_info_gpa: 0x6000,
            },
            kernel_end: 0x110_0000,
            initrd: None,
        }
    }

    fn mem() -> GuestMemoryMmap<()> {
        guest_memory(&MemoryLayout::new(64 * MIB).expect("layout"))
    }

    fn read_u64(mem: &GuestMemoryMmap<()>, gpa: u64) -> u64 {
        mem.read_obj(GuestAddress(gpa)).expect("read guest memory")
    }

    #[test]
    fn descriptors_encode_like_the_well_known_values() {
        assert_eq!(
            gdt_entry(CODE64_FLAGS, 0, FLAT_LIMIT),
            0x00af_9b00_0000_ffff
        );
        assert_eq!(
            gdt_entry(CODE32_FLAGS, 0, FLAT_LIMIT),
            0x00cf_9b00_0000_ffff
        );
        assert_eq!(gdt_entry(DATA_FLAGS, 0, FLAT_LIMIT), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(TSS_FLAGS, 0, TSS_LIMIT), 0x0000_8b00_0000_0067);
        assert_eq!(
            gdt_entry(0x4092, 0x1234_5678, 0xabcde),
            0x124a_9234_5678_bcde
        );
    }

    #[test]
    fn descriptors_decode_into_kvm_segments() {
        let seg = segment_from_gdt_entry(0x124a_9234_5678_bcde, 5);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.selector, 0x28);
        assert_eq!((seg.type_, seg.s, seg.dpl, seg.present), (2, 1, 0, 1));
        assert_eq!(
            (seg.avl, seg.l, seg.db, seg.g, seg.unusable),
            (0, 0, 1, 0, 0)
        );
        assert_eq!(segment_from_gdt_entry(0, 0).unusable, 1);
    }

    #[test]
    fn linux64_regs() {
        let regs = boot_regs(&linux64());
        assert_eq!(regs.rip, 0x100200);
        assert_eq!(regs.rsi, 0x7000);
        assert_eq!(regs.rsp, 0x8ff0);
        assert_eq!(regs.rbp, 0x8ff0);
        assert_eq!(regs.rflags, 0x2);
        assert_eq!(regs.rbx, 0);
    }

    #[test]
    fn pvh_regs() {
        let regs = boot_regs(&pvh());
        assert_eq!(regs.rip, 0x100_0040);
        assert_eq!(regs.rbx, 0x6000);
        assert_eq!(regs.rflags, 0x2);
        assert_eq!((regs.rsi, regs.rsp), (0, 0));
    }

    #[test]
    fn linux64_sregs_enter_long_mode_with_an_identity_map() {
        let mem = mem();
        let mut sregs = kvm_sregs {
            cr0: 0x6000_0010, // KVM's reset value: CD | NW | ET
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        boot_sregs(&linux64(), &mem, &mut sregs).expect("sregs");

        assert_eq!(sregs.cr0, 0x8000_0011);
        assert_eq!(sregs.cr3, 0x9000);
        assert_eq!(sregs.cr4, 0x20);
        assert_eq!(sregs.efer, 0x500);
        assert_eq!(sregs.apic_base, 0xfee0_0900, "left alone");

        assert_eq!((sregs.cs.selector, sregs.cs.l, sregs.cs.db), (0x08, 1, 0));
        assert_eq!((sregs.cs.type_, sregs.cs.present, sregs.cs.s), (0xb, 1, 1));
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!((seg.selector, seg.type_, seg.db, seg.g), (0x10, 0x3, 1, 1));
            assert_eq!((seg.base, seg.limit), (0, 0xffff_ffff));
        }
        assert_eq!(
            (sregs.tr.selector, sregs.tr.type_, sregs.tr.s),
            (0x18, 0xb, 0)
        );
        assert_eq!((sregs.tr.limit, sregs.tr.present), (0x67, 1));

        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 31));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (0x520, 7));
        assert_eq!(read_u64(&mem, 0x500), 0);
        assert_eq!(read_u64(&mem, 0x508), 0x00af_9b00_0000_ffff);
        assert_eq!(read_u64(&mem, 0x510), 0x00cf_9300_0000_ffff);
        assert_eq!(read_u64(&mem, 0x518), 0x0000_8b00_0000_0067);
        assert_eq!(read_u64(&mem, 0x520), 0);

        assert_eq!(read_u64(&mem, 0x9000), 0xa003);
        assert_eq!(read_u64(&mem, 0xa000), 0xb003);
        assert_eq!(read_u64(&mem, 0xb000), 0x83);
        assert_eq!(read_u64(&mem, 0xb008), 0x20_0083);
        assert_eq!(read_u64(&mem, 0xb000 + 511 * 8), 0x3fe0_0083);
    }

    #[test]
    fn pvh_sregs_are_flat_protected_mode_without_paging() {
        let mem = mem();
        let mut sregs = kvm_sregs {
            cr0: 0x6000_0010,
            cr4: 0x20,
            efer: 0x500,
            ..Default::default()
        };
        boot_sregs(&pvh(), &mem, &mut sregs).expect("sregs");

        assert_eq!(sregs.cr0, 0x11);
        assert_eq!((sregs.cr3, sregs.cr4, sregs.efer), (0, 0, 0));
        let cs = sregs.cs;
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.db, cs.g),
            (0x08, 0xb, 0, 1, 1)
        );
        assert_eq!(
            (cs.base, cs.limit, cs.present, cs.s),
            (0, 0xffff_ffff, 1, 1)
        );
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!(
                (seg.selector, seg.type_, seg.db, seg.present),
                (0x10, 0x3, 1, 1)
            );
            assert_eq!((seg.base, seg.limit), (0, 0xffff_ffff));
        }
        let tr = sregs.tr;
        assert_eq!((tr.selector, tr.type_, tr.s, tr.present), (0x18, 0xb, 0, 1));
        assert_eq!((tr.limit, tr.unusable), (0x67, 0));
        assert_eq!(read_u64(&mem, 0x508), 0x00cf_9b00_0000_ffff);
        // No page tables for PVH.
        assert_eq!(read_u64(&mem, 0x9000), 0);
    }

    #[test]
    fn sregs_report_memory_that_cannot_hold_the_tables() {
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), 0x10_0000)]).expect("memory");
        let mut sregs = kvm_sregs::default();
        let err = boot_sregs(&linux64(), &mem, &mut sregs).expect_err("no low memory");
        assert!(
            matches!(
                err,
                BootError::GuestMemory {
                    what: "boot GDT",
                    gpa: 0x500,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn fpu_starts_with_exceptions_masked() {
        let fpu = boot_fpu();
        assert_eq!(fpu.fcw, 0x37f);
        assert_eq!(fpu.mxcsr, 0x1f80);
        assert_eq!(fpu.fsw, 0);
    }
}
