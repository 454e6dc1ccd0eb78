//! Builders for synthetic kernel images used by the unit tests.

use linux_loader::loader::bootparam::{setup_header, LOADED_HIGH, XLF_KERNEL_64};
use vm_memory::{ByteValued, GuestMemoryMmap};

use crate::MemoryLayout;

pub const MIB: u64 = 1 << 20;

/// Guest memory built the way the VMM builds it: from `layout.ranges()`.
pub fn guest_memory(layout: &MemoryLayout) -> GuestMemoryMmap<()> {
    let ranges: Vec<_> = layout
        .ranges()
        .into_iter()
        .map(|(start, len)| (start, len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("test guest memory")
}

/// Bytes that differ at every position, so misplaced copies show.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// One loadable segment of a test ELF.
pub struct Segment {
    pub paddr: u64,
    pub data: Vec<u8>,
    pub memsz: u64,
}

/// One ELF note.
pub struct Note {
    pub name: &'static [u8],
    pub note_type: u32,
    pub desc: Vec<u8>,
}

/// The Xen note that makes an ELF a PVH kernel.
pub fn pvh_note(entry: u32) -> Note {
    Note {
        name: b"Xen\0",
        note_type: 18, // XEN_ELFNOTE_PHYS32_ENTRY
        desc: entry.to_le_bytes().to_vec(),
    }
}

fn pad4(buf: &mut Vec<u8>) {
    while buf.len() % 4 != 0 {
        buf.push(0);
    }
}

/// A minimal ELF64 x86_64 executable: header, program headers, one PT_NOTE
/// (if any notes), then the PT_LOAD segments' bytes.
pub fn build_elf(entry: u64, segments: &[Segment], notes: &[Note]) -> Vec<u8> {
    let phnum = segments.len() + usize::from(!notes.is_empty());
    let mut notes_blob = Vec::new();
    for note in notes {
        notes_blob.extend_from_slice(&(note.name.len() as u32).to_le_bytes());
        notes_blob.extend_from_slice(&(note.desc.len() as u32).to_le_bytes());
        notes_blob.extend_from_slice(&note.note_type.to_le_bytes());
        notes_blob.extend_from_slice(note.name);
        pad4(&mut notes_blob);
        notes_blob.extend_from_slice(&note.desc);
        pad4(&mut notes_blob);
    }

    let mut out = vec![0u8; 64 + 56 * phnum];
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = 2; // ELFCLASS64
    out[5] = 1; // little endian
    out[6] = 1; // EV_CURRENT
    out[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    out[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
    out[0x18..0x20].copy_from_slice(&entry.to_le_bytes());
    out[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    out[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    out[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    out[0x38..0x3a].copy_from_slice(&(phnum as u16).to_le_bytes());

    let mut phdrs = Vec::new();
    if !notes.is_empty() {
        let offset = out.len() as u64;
        out.extend_from_slice(&notes_blob);
        phdrs.push((4u32, offset, 0u64, notes_blob.len() as u64, 0u64));
    }
    for seg in segments {
        while out.len() % 16 != 0 {
            out.push(0);
        }
        let offset = out.len() as u64;
        out.extend_from_slice(&seg.data);
        phdrs.push((1u32, offset, seg.paddr, seg.data.len() as u64, seg.memsz));
    }
    for (i, (p_type, offset, paddr, filesz, memsz)) in phdrs.into_iter().enumerate() {
        let ph = &mut out[64 + 56 * i..64 + 56 * (i + 1)];
        ph[0..4].copy_from_slice(&p_type.to_le_bytes());
        ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        ph[8..16].copy_from_slice(&offset.to_le_bytes());
        ph[0x10..0x18].copy_from_slice(&(paddr | 0xffff_ffff_8000_0000).to_le_bytes());
        ph[0x18..0x20].copy_from_slice(&paddr.to_le_bytes());
        ph[0x20..0x28].copy_from_slice(&filesz.to_le_bytes());
        ph[0x28..0x30].copy_from_slice(&memsz.to_le_bytes());
        ph[0x30..0x38].copy_from_slice(&0x1000u64.to_le_bytes());
    }
    out
}

/// The setup header of a modern (2.15) relocatable 64-bit bzImage.
pub fn bzimage_header(setup_sects: u8) -> setup_header {
    setup_header {
        setup_sects,
        boot_flag: 0xaa55,
        jump: 0x6aeb, // jmp over the header: it ends at 0x202 + 0x6a = 0x26c
        header: 0x5372_6448,
        version: 0x020f,
        loadflags: LOADED_HIGH,
        code32_start: 0x10_0000,
        kernel_alignment: 0x20_0000,
        relocatable_kernel: 1,
        min_alignment: 21,
        xloadflags: XLF_KERNEL_64,
        initrd_addr_max: 0x7fff_ffff,
        cmdline_size: 2047,
        pref_address: 0x100_0000,
        init_size: 0x100_0000,
        vid_mode: 0xffff,
        ..Default::default()
    }
}

/// A bzImage: setup sectors (with `header` at 0x1f1), then `protected_mode`.
pub fn build_bzimage(header: &setup_header, protected_mode: &[u8]) -> Vec<u8> {
    let sects = match header.setup_sects {
        0 => 4,
        n => usize::from(n),
    };
    let mut out = vec![0u8; (sects + 1) * 512];
    out[0..2].copy_from_slice(b"MZ");
    let bytes = header.as_slice();
    out[0x1f1..0x1f1 + bytes.len()].copy_from_slice(bytes);
    out.extend_from_slice(protected_mode);
    out
}
