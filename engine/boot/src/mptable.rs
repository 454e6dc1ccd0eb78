//! An Intel MultiProcessor Specification 1.4 table: the floating pointer at
//! [`MPTABLE_START`] (the last KiB of base memory, where Linux looks) and the
//! configuration table at [`MP_CONFIG_START`] (the reserved BIOS area). Without
//! firmware or ACPI it is how a Linux guest finds its application processors,
//! the I/O APIC and the ISA interrupt wiring (without it, Linux runs on the boot
//! CPU only and keeps the legacy PIC).
//!
//! The configuration table: header, one processor entry per vCPU (local APIC
//! ID = vCPU index, as KVM numbers them), ISA and PCI buses, the I/O APIC (ID =
//! vCPU count, at 0xfec0_0000), ISA IRQs 0-15 wired to I/O APIC pins 0-15 (KVM's
//! default routing), and LINT0 = ExtINT, LINT1 = NMI.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::EBDA_START;
use crate::BootError;

/// Where the floating pointer goes.
pub const MPTABLE_START: u64 = EBDA_START;
/// Where the configuration table goes (reserved in the memory map, like the EBDA).
pub const MP_CONFIG_START: u64 = 0xf_0000;
/// Most vCPUs the table describes (ferry's vCPU limit; APIC IDs fit a byte).
pub const MPTABLE_MAX_CPUS: u32 = 64;
/// The I/O APIC's MMIO base (KVM's in-kernel I/O APIC).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_ADDR: u32 = 0xfee0_0000;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const BUS_ISA: u8 = 0;
const BUS_PCI: u8 = 1;
const ISA_IRQS: u8 = 16;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, &b| sum.wrapping_add(b))
        .wrapping_neg()
}

/// The floating pointer (for [`MPTABLE_START`]) and the configuration table (for
/// [`MP_CONFIG_START`]) for `vcpus` processors.
pub fn mptable(vcpus: u32) -> Result<(Vec<u8>, Vec<u8>), BootError> {
    if vcpus == 0 || vcpus > MPTABLE_MAX_CPUS {
        return Err(BootError::TooManyCpus {
            vcpus,
            max: MPTABLE_MAX_CPUS,
        });
    }
    let table_addr = MP_CONFIG_START as u32;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        // Processor: type 0, APIC ID, version, flags (enabled, BSP), CPU
        // signature (family 6), feature flags (FPU, APIC), reserved.
        let flags = 1 | if id == 0 { 2 } else { 0 };
        entries.extend_from_slice(&[0, id as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    for (id, name) in [(BUS_ISA, b"ISA   "), (BUS_PCI, b"PCI   ")] {
        entries.extend_from_slice(&[1, id]);
        entries.extend_from_slice(name);
        count += 1;
    }
    let ioapic_id = vcpus as u8;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // I/O interrupt: type 3, INT, conforming polarity and trigger, source
        // bus and IRQ, destination I/O APIC and pin.
        entries.extend_from_slice(&[3, 0, 0, 0, BUS_ISA, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0 and NMI on LINT1 of every local APIC.
    for (kind, lint) in [(3u8, 0u8), (1, 1)] {
        entries.extend_from_slice(&[4, kind, 0, 0, BUS_ISA, 0, 0xff, lint]);
        count += 1;
    }

    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"FERRY   ");
    header.extend_from_slice(b"000000000000");
    header.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_ADDR.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // no extended table
    header.push(0);
    header.push(0);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(4);
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0; 5]); // feature bytes: the table is present
    floating[10] = checksum(&floating);

    Ok((floating, table))
}

/// Writes the MP table for `vcpus` processors into guest memory.
pub fn write_mptable<M: GuestMemoryBackend>(mem: &M, vcpus: u32) -> Result<(), BootError> {
    let (floating, table) = mptable(vcpus)?;
    for (what, gpa, bytes) in [
        ("MP floating pointer", MPTABLE_START, &floating),
        ("MP configuration table", MP_CONFIG_START, &table),
    ] {
        mem.write_slice(bytes, GuestAddress(gpa))
            .map_err(|source| BootError::GuestMemory { what, gpa, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses the table the way Linux's mpparse does and checks what it finds.
    #[test]
    fn linux_finds_every_cpu_the_ioapic_and_the_isa_irqs() {
        for vcpus in [1, 2, 8, MPTABLE_MAX_CPUS] {
            let (t, table) = mptable(vcpus).unwrap();
            assert_eq!((&t[..4], t.len()), (&b"_MP_"[..], 16));
            assert_eq!(checksum(&t), 0, "floating pointer checksum");
            let addr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(addr, MP_CONFIG_START);
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(checksum(&table), 0, "table checksum");
            assert!(MP_CONFIG_START + len as u64 <= 0x10_0000, "below 1 MiB");
            let count = u16::from_le_bytes([table[34], table[35]]);
            let (mut cpus, mut bsp, mut ioapics, mut irqs, mut at) = (0, 0, 0, 0, 44);
            for _ in 0..count {
                let size = if table[at] == 0 { 20 } else { 8 };
                match table[at] {
                    0 => {
                        assert_eq!(table[at + 1] as u32, cpus, "APIC IDs in order");
                        cpus += 1;
                        bsp += u32::from(table[at + 3] & 2 != 0);
                    }
                    2 => {
                        ioapics += 1;
                        assert_eq!(&table[at + 4..at + 8], &IOAPIC_ADDR.to_le_bytes());
                    }
                    3 => irqs += 1,
                    _ => {}
                }
                at += size;
            }
            assert_eq!(at, len, "entry count matches the length");
            assert_eq!((cpus, bsp, ioapics, irqs), (vcpus, 1, 1, 16));
        }
        assert!(mptable(0).is_err());
        assert!(mptable(MPTABLE_MAX_CPUS + 1)
            .unwrap_err()
            .to_string()
            .contains("64"));
    }
}
