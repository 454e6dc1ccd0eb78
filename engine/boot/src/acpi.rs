//! ACPI tables for QEMU's `pc` machine (i440FX + PIIX3/PIIX4), built with
//! rust-vmm's `acpi_tables`, delivered as QEMU delivers them to SeaBIOS.
//!
//! # Delivery through fw_cfg (firmware boot)
//!
//! [`AcpiFwCfg::new`] returns the three fw_cfg files QEMU 7.2 offers:
//!
//! | file | what |
//! |------|------|
//! | [`ACPI_RSDP_FILE`] `etc/acpi/rsdp` | the RSDP (revision 2, 36 bytes) |
//! | [`ACPI_TABLES_FILE`] `etc/acpi/tables` | FACS, DSDT, FADT, MADT, WAET, RSDT, XSDT back to back; every pointer holds the offset of its target in this file |
//! | [`ACPI_TABLE_LOADER_FILE`] `etc/table-loader` | QEMU's BIOS linker/loader script: 128-byte commands |
//!
//! SeaBIOS (`romfile_loader_execute("etc/table-loader")`) runs the script:
//! ALLOCATE places the tables in high memory (64-byte aligned, for the FACS)
//! and the RSDP in the F segment (16-byte aligned, where an OS scans for it),
//! ADD_POINTER adds the address a file landed at to each pointer, ADD_CHECKSUM
//! fixes each table's checksum. The command format is QEMU's
//! `hw/acpi/bios-linker-loader.c`, see [`LoaderCommand`].
//! [`execute_table_loader`] runs a script the same way, for tests and for
//! [`write_acpi_tables`].
//!
//! # Without firmware
//!
//! [`write_acpi_tables`] runs the same script with the RSDP at
//! [`ACPI_RSDP_START`] (a 16-byte boundary in `0xE0000..0xFFFFF`, where Linux
//! scans) and the tables where the caller says, e.g. [`ACPI_TABLES_START`].
//!
//! # The tables
//!
//! - FADT revision 3 (ACPI 2.0, 244 bytes; QEMU 7.2's piix FADT is revision 1,
//!   116 bytes, without the reset register and the 64-bit fields): PM1a event block at
//!   `pm_base`, PM1a control at `pm_base + 4`, PM timer at `pm_base + 8`, GPE0
//!   at `0xafe0` (4 bytes), SCI on IRQ 9, reset register `0xcf9` value 6,
//!   century at CMOS `0x32`; flags WBINVD, PROC_C1, SLP_BUTTON (no sleep
//!   button), RTC_S4, RESET_REG_SUP, USE_PLATFORM_CLOCK and, above 8 vCPUs,
//!   FORCE_APIC_CLUSTER_MODEL; PWR_BUTTON clear: the power button is the fixed
//!   feature (PM1 status bit 8), as in QEMU. SMI_CMD is `0xb2` with ACPI
//!   enable/disable values `0xf1`/`0xf0` when [`AcpiConfig::smi_cmd`] is set
//!   (QEMU's: the PIIX4 PM sets or clears SCI_EN on those APM writes), 0
//!   otherwise (the PM must then start with SCI_EN set).
//! - MADT: a local APIC per vCPU (processor UID = APIC ID = index), the I/O
//!   APIC (ID = vCPU count, as in ferry's MP table) at `0xfec00000`, GSI base
//!   0; overrides IRQ 0 -> GSI 2 and IRQs 5, 9, 10, 11 level/active-high; local
//!   APIC NMI on LINT1 for all processors.
//! - DSDT: `\_SB.PCI0` (PNP0A03) with `_CRS` and `_PRT`, the PIIX3 ISA bridge
//!   with the keyboard, COM1 and RTC, the IDE function, the given PCI
//!   functions, a processor device (ACPI0007) per vCPU, `\_GPE` and `\_S5`.
//! - WAET (Windows: the PM timer is good), as QEMU.
//!
//! # PCI interrupts
//!
//! `_PRT` routes every slot 1..31, pins A-D, straight to a GSI
//! ([`pci_intx_gsi`]): PIRQ `(slot + pin - 1) mod 4` of the PIIX3, with PIRQA-D
//! on IRQs 10, 10, 11, 11, the values SeaBIOS programs into the PIIX3 and
//! writes into each function's Interrupt Line register; 00:01 pin A (the PIIX4
//! PM) is the SCI, as QEMU's `LNKS`. QEMU routes through link devices
//! (LNKA-LNKD, PNP0C0F) that read and write the PIIX3 PIRQ registers; the GSIs
//! here are what those links hold after SeaBIOS, and the VMM need not emulate
//! the PIRQ registers.
//!
//! # Compared with QEMU 7.2's `pc`
//!
//! Linux derives the same machine from these tables as from QEMU's (PM timer,
//! interrupt overrides, CPUs, PCI windows, COM1, RTC, PCI INTx IRQs; see the
//! `real_kernel` test). The differences, on purpose:
//! - RSDP revision 2 with an XSDT beside the RSDT (QEMU: revision 0, RSDT
//!   only); FADT revision 3 with the reset register and X_ fields (QEMU: 1).
//! - No HPET table (Nova turns the HPET off), no HPET, floppy, parallel port
//!   or PS/2 mouse devices, no PCI or CPU hotplug AML, no `_S3`/`_S4` (ferry
//!   does not emulate sleep states; QEMU offers them unless `disable_s3/s4`).
//! - `_PRT` to GSIs instead of LNKA-LNKD/LNKS link devices (see above).
//! - No `_ADR` on PCI0 beside its `_HID` (ACPI allows one of them).
//! - The I/O APIC ID is the vCPU count, as in ferry's MP table (QEMU: 0).
//! - Processor devices (ACPI0007) instead of QEMU's `Processor` objects.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{MemoryLayout, HIGH_RAM_START};
use crate::mptable::{APIC_ADDR, IOAPIC_ADDR, MPTABLE_MAX_CPUS};
use crate::BootError;

/// fw_cfg file holding the RSDP.
pub const ACPI_RSDP_FILE: &str = "etc/acpi/rsdp";
/// fw_cfg file holding all the other tables.
pub const ACPI_TABLES_FILE: &str = "etc/acpi/tables";
/// fw_cfg file holding the BIOS linker/loader script.
pub const ACPI_TABLE_LOADER_FILE: &str = "etc/table-loader";

/// Where SeaBIOS 1.16 programs the PIIX4 PM I/O base (PMBASE, config 0x40 of
/// 8086:7113): its `acpi_pm_base`, 0x600. (Old SeaBIOS used 0xb000.) A guest
/// of QEMU 7.2 `pc` with Debian's SeaBIOS 1.16.2 reports `ACPI: PM-Timer IO
/// Port: 0x608`. QEMU builds its FADT after the firmware programmed PMBASE;
/// ferry builds the tables first, so they name where SeaBIOS will put it.
pub const ACPI_PM_BASE: u16 = 0x600;
/// QEMU's PIIX4 GPE0 block.
pub const ACPI_GPE0_BASE: u16 = 0xafe0;
/// Length of the GPE0 block in bytes.
pub const ACPI_GPE0_LEN: u8 = 4;
/// The SCI's ISA IRQ.
pub const ACPI_SCI_IRQ: u8 = 9;
/// QEMU's SMI command port (the APM control port).
pub const ACPI_SMI_CMD: u16 = 0xb2;
/// Value written to [`ACPI_SMI_CMD`] to enable ACPI (sets SCI_EN).
pub const ACPI_ENABLE: u8 = 0xf1;
/// Value written to [`ACPI_SMI_CMD`] to disable ACPI.
pub const ACPI_DISABLE: u8 = 0xf0;
/// The reset register (PIIX3 reset control) and the value that resets.
pub const ACPI_RESET_PORT: u16 = 0xcf9;
/// Value written to [`ACPI_RESET_PORT`] for a reset (hard reset + reset CPU).
pub const ACPI_RESET_VALUE: u8 = 0x06;
/// CMOS index of the RTC century.
pub const ACPI_RTC_CENTURY: u8 = 0x32;
/// Last address of the 32-bit PCI hole (the I/O APIC follows).
pub const ACPI_PCI_HOLE_END: u32 = 0xfebf_ffff;
/// Size of the 64-bit PCI window: the i440FX's default `pci-hole64-size`
/// (2 GiB; the Q35's is 32 GiB). A 512 MiB QEMU 7.2 `pc` guest reports
/// `root bus resource [mem 0x100000000-0x17fffffff window]`.
pub const ACPI_PCI_HOLE64_SIZE: u64 = 2 << 30;
/// Most vCPUs the tables describe (ferry's vCPU limit, as the MP table).
pub const ACPI_MAX_CPUS: u32 = MPTABLE_MAX_CPUS;
/// Where [`write_acpi_tables`] puts the RSDP: 16-byte aligned in the BIOS
/// area Linux scans (`0xE0000..0xFFFFF`), below the MP configuration table.
pub const ACPI_RSDP_START: u64 = 0xe_0000;
/// A place for the tables without firmware: after the RSDP, below the MP
/// configuration table at 0xF0000 (the room is [`ACPI_TABLES_MAX`]).
pub const ACPI_TABLES_START: u64 = 0xe_0040;
/// Most bytes the tables may take at [`ACPI_TABLES_START`].
pub const ACPI_TABLES_MAX: usize = (crate::mptable::MP_CONFIG_START - ACPI_TABLES_START) as usize;

/// QEMU's OEM ID.
pub const ACPI_OEM_ID: [u8; 6] = *b"BOCHS ";
/// QEMU's OEM table ID.
pub const ACPI_OEM_TABLE_ID: [u8; 8] = *b"BXPC    ";
const CREATOR_ID: [u8; 4] = *b"BXPC";

/// Size of one linker/loader command.
pub const LOADER_COMMAND_LEN: usize = 128;
/// Longest file name a loader command holds (QEMU's `FW_CFG_MAX_FILE_PATH`
/// less the NUL).
pub const LOADER_FILE_NAME_MAX: usize = 55;

const FACS_LEN: usize = 64;
const FADT_REV3_LEN: usize = 244;
const HEADER_LEN: usize = 36;

/// Why ACPI tables could not be built or linked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcpiError {
    /// The vCPU count is out of range.
    #[error("{vcpus} vCPUs asked for; the ACPI tables describe 1 to {max} (-smp)")]
    TooManyCpus {
        /// What was asked for.
        vcpus: u32,
        /// The most the tables take.
        max: u32,
    },
    /// A PCI function that cannot be on bus 0 beside the host bridge and PIIX3.
    #[error(
        "PCI function 00:{slot:02x}.{function} cannot be described: devices go in slots 2 \
         to 31 (0 is the host bridge, 1 the PIIX3), functions 0 to 7"
    )]
    PciAddress {
        /// The slot given.
        slot: u8,
        /// The function given.
        function: u8,
    },
    /// The same PCI function given twice.
    #[error("PCI function 00:{slot:02x}.{function} is given twice")]
    DuplicatePciFunction {
        /// The slot.
        slot: u8,
        /// The function.
        function: u8,
    },
    /// RAM below 4 GiB reaches the I/O APIC: no 32-bit PCI hole is left.
    #[error("RAM below 4 GiB ends at {low_end:#x}, past the 32-bit PCI hole's end {ACPI_PCI_HOLE_END:#x}")]
    NoPciHole {
        /// End of RAM below 4 GiB.
        low_end: u64,
    },
    /// A linker/loader script cannot be run.
    #[error("table-loader command {index}: {problem}")]
    TableLoader {
        /// Index of the command in the script.
        index: usize,
        /// What is wrong with it.
        problem: String,
    },
    /// Where the tables were asked to go does not suit them.
    #[error("cannot put the ACPI tables at {addr:#x}: {problem}")]
    TablesPlacement {
        /// The address asked for.
        addr: u64,
        /// Why not.
        problem: String,
    },
}

/// An INTx pin of a PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntxPin {
    /// INTA# (Interrupt Pin register 1).
    A,
    /// INTB#.
    B,
    /// INTC#.
    C,
    /// INTD#.
    D,
}

impl IntxPin {
    /// All pins, A to D.
    pub const ALL: [IntxPin; 4] = [IntxPin::A, IntxPin::B, IntxPin::C, IntxPin::D];

    /// 0 for A to 3 for D (the `_PRT` pin field; the Interrupt Pin register is this + 1).
    pub fn index(self) -> u8 {
        self as u8
    }
}

/// A PCI function on bus 0 for the DSDT (virtio devices: function 0, pin A).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciFunction {
    /// Slot (device number), 2 to 31.
    pub slot: u8,
    /// Function, 0 to 7.
    pub function: u8,
    /// Its INTx pin, if it has one. The `_PRT` routes every slot and pin, so
    /// the tables do not depend on it; [`PciFunction::gsi`] says where the
    /// VMM must wire it.
    pub pin: Option<IntxPin>,
}

impl PciFunction {
    /// The GSI the function's INTx raises ([`pci_intx_gsi`]), if it has a pin.
    pub fn gsi(&self) -> Option<u8> {
        self.pin.map(|pin| pci_intx_gsi(self.slot, pin))
    }
}

/// What the ACPI tables describe. [`AcpiConfig::new`] gives QEMU's `pc`
/// values; the VMM then sets what its machine has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// vCPUs (1 to [`ACPI_MAX_CPUS`]); APIC IDs are 0 to `vcpus - 1`.
    pub vcpus: u32,
    /// PCI functions on bus 0 besides the host bridge (00:00.0) and the PIIX
    /// functions (00:01.x), each declared as a device with its `_ADR`.
    pub pci: Vec<PciFunction>,
    /// The PIIX3 IDE function at 00:01.1.
    pub ide: bool,
    /// COM1 (PNP0501, I/O 0x3f8, IRQ 4).
    pub com1: bool,
    /// The RTC (PNP0B00, I/O 0x70-0x71, IRQ 8).
    pub rtc: bool,
    /// An i8042 with a keyboard (PNP0303, I/O 0x60/0x64, IRQ 1); also sets
    /// the FADT's 8042 boot flag. SeaBIOS skips its PS/2 setup when the DSDT
    /// has no PNP0303.
    pub keyboard: bool,
    /// PIIX4 PM I/O base ([`ACPI_PM_BASE`]).
    pub pm_base: u16,
    /// GPE0 block base ([`ACPI_GPE0_BASE`]).
    pub gpe0_base: u16,
    /// GPE0 block length in bytes ([`ACPI_GPE0_LEN`]).
    pub gpe0_len: u8,
    /// The SCI's IRQ ([`ACPI_SCI_IRQ`]).
    pub sci_irq: u8,
    /// Whether the FADT names QEMU's SMI command port and ACPI enable/disable
    /// values (the VMM's PIIX4 PM then sets SCI_EN on a write of 0xf1 to
    /// 0xb2, as QEMU's APM does); without, SMI_CMD is 0 and the PM must come
    /// up with SCI_EN set.
    pub smi_cmd: bool,
    /// End (exclusive) of RAM below 4 GiB: the 32-bit PCI hole runs from here
    /// to [`ACPI_PCI_HOLE_END`].
    pub low_ram_end: u64,
    /// Bytes of RAM above 4 GiB: the 64-bit PCI window starts at the next
    /// GiB boundary past it.
    pub high_ram_bytes: u64,
    /// Size of the 64-bit PCI window (0: none), [`ACPI_PCI_HOLE64_SIZE`].
    pub pci_hole64_size: u64,
    /// OEM ID of every table and the RSDP.
    pub oem_id: [u8; 6],
    /// OEM table ID of every table.
    pub oem_table_id: [u8; 8],
}

impl AcpiConfig {
    /// QEMU's `pc` defaults for `vcpus` and the RAM of `layout`: IDE, COM1,
    /// RTC and keyboard present, no PCI devices, SMI command port on.
    pub fn new(vcpus: u32, layout: &MemoryLayout) -> Self {
        AcpiConfig {
            vcpus,
            pci: Vec::new(),
            ide: true,
            com1: true,
            rtc: true,
            keyboard: true,
            pm_base: ACPI_PM_BASE,
            gpe0_base: ACPI_GPE0_BASE,
            gpe0_len: ACPI_GPE0_LEN,
            sci_irq: ACPI_SCI_IRQ,
            smi_cmd: true,
            low_ram_end: layout.low_end(),
            high_ram_bytes: layout.high_bytes(),
            pci_hole64_size: ACPI_PCI_HOLE64_SIZE,
            oem_id: ACPI_OEM_ID,
            oem_table_id: ACPI_OEM_TABLE_ID,
        }
    }

    /// The 64-bit PCI window `(first, last)`, if any: from the first GiB
    /// boundary at or above the end of high RAM, [`Self::pci_hole64_size`] long.
    pub fn pci_hole64(&self) -> Option<(u64, u64)> {
        if self.pci_hole64_size == 0 {
            return None;
        }
        let start = (HIGH_RAM_START + self.high_ram_bytes).next_multiple_of(1 << 30);
        Some((start, start + self.pci_hole64_size - 1))
    }

    fn validate(&self) -> Result<(), AcpiError> {
        if self.vcpus == 0 || self.vcpus > ACPI_MAX_CPUS {
            return Err(AcpiError::TooManyCpus {
                vcpus: self.vcpus,
                max: ACPI_MAX_CPUS,
            });
        }
        for (i, f) in self.pci.iter().enumerate() {
            if !(2..32).contains(&f.slot) || f.function > 7 {
                return Err(AcpiError::PciAddress {
                    slot: f.slot,
                    function: f.function,
                });
            }
            if self.pci[..i]
                .iter()
                .any(|g| g.slot == f.slot && g.function == f.function)
            {
                return Err(AcpiError::DuplicatePciFunction {
                    slot: f.slot,
                    function: f.function,
                });
            }
        }
        if self.low_ram_end > u64::from(ACPI_PCI_HOLE_END) {
            return Err(AcpiError::NoPciHole {
                low_end: self.low_ram_end,
            });
        }
        Ok(())
    }
}

/// The GSI that INTx `pin` of a function in `slot` (1 to 31) raises on
/// ferry's `pc`, as the DSDT's `_PRT` says: the PIIX3 PIRQ
/// `(slot + pin - 1) mod 4`, PIRQA-D on IRQs 10, 10, 11, 11 (SeaBIOS's
/// routing, also what it writes into the Interrupt Line register); 00:01 pin
/// A is the SCI (IRQ 9), as QEMU routes the PIIX4 PM. The VMM wires INTx
/// there, level-triggered, active high.
pub fn pci_intx_gsi(slot: u8, pin: IntxPin) -> u8 {
    const PIRQ_IRQS: [u8; 4] = [10, 10, 11, 11];
    if slot == 1 && pin == IntxPin::A {
        return ACPI_SCI_IRQ;
    }
    PIRQ_IRQS[usize::from(slot.wrapping_add(pin.index()).wrapping_sub(1) & 3)]
}

/// Where a loader ALLOCATE puts a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoaderZone {
    /// Anywhere in RAM (SeaBIOS: high memory below 4 GiB).
    High,
    /// The F segment, `0xE0000..0xFFFFF` (SeaBIOS: `malloc_fseg`).
    FSeg,
}

impl LoaderZone {
    fn code(self) -> u8 {
        match self {
            LoaderZone::High => 1,
            LoaderZone::FSeg => 2,
        }
    }
}

/// One QEMU BIOS linker/loader command (`hw/acpi/bios-linker-loader.c`).
///
/// Encoded in 128 bytes, little endian: `u32 command`, then
/// - ALLOCATE (1): `char file[56]`, `u32 align`, `u8 zone` (1 high, 2 FSEG);
/// - ADD_POINTER (2): `char dest_file[56]`, `char src_file[56]`,
///   `u32 offset`, `u8 size`: the `size`-byte little-endian value at
///   `offset` in `dest_file` gets the address `src_file` was allocated at
///   added to it;
/// - ADD_CHECKSUM (3): `char file[56]`, `u32 offset`, `u32 start`,
///   `u32 length`: the byte at `offset` gets the sum of
///   `[start, start + length)` subtracted from it;
///
/// the rest zero. File names are NUL-terminated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoaderCommand {
    /// Load a fw_cfg file into guest memory.
    Allocate {
        /// The fw_cfg file.
        file: String,
        /// Alignment of its address (a power of two).
        align: u32,
        /// Where.
        zone: LoaderZone,
    },
    /// Turn an offset into `src_file` inside `dest_file` into an address.
    AddPointer {
        /// The file holding the pointer.
        dest_file: String,
        /// The file pointed into.
        src_file: String,
        /// Offset of the pointer in `dest_file`.
        offset: u32,
        /// Its size: 1, 2, 4 or 8 bytes.
        size: u8,
    },
    /// Fix a checksum byte.
    AddChecksum {
        /// The file.
        file: String,
        /// Offset of the checksum byte.
        offset: u32,
        /// First byte summed.
        start: u32,
        /// Bytes summed.
        length: u32,
    },
}

fn put_name(entry: &mut [u8], at: usize, name: &str) {
    entry[at..at + name.len()].copy_from_slice(name.as_bytes());
}

/// Why a table-loader command cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoaderDecodeError {
    /// A file name field has no terminating NUL.
    #[error("file name without a NUL")]
    NameWithoutNul,
    /// A file name is not UTF-8.
    #[error("file name not UTF-8")]
    NameNotUtf8,
    /// An ALLOCATE command names a zone this build does not know.
    #[error("unknown zone {zone}")]
    UnknownZone {
        /// The zone byte.
        zone: u8,
    },
}

fn get_name(entry: &[u8], at: usize) -> Result<String, LoaderDecodeError> {
    let field = &entry[at..at + LOADER_FILE_NAME_MAX + 1];
    let len = field
        .iter()
        .position(|&b| b == 0)
        .ok_or(LoaderDecodeError::NameWithoutNul)?;
    String::from_utf8(field[..len].to_vec()).map_err(|_| LoaderDecodeError::NameNotUtf8)
}

fn u32_at(entry: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(entry[at..at + 4].try_into().expect("4 bytes"))
}

impl LoaderCommand {
    /// The 128-byte encoding. File names longer than
    /// [`LOADER_FILE_NAME_MAX`] are a bug of the caller (ferry's are fixed).
    pub fn encode(&self) -> [u8; LOADER_COMMAND_LEN] {
        let mut e = [0u8; LOADER_COMMAND_LEN];
        match self {
            LoaderCommand::Allocate { file, align, zone } => {
                e[0] = 1;
                put_name(&mut e, 4, file);
                e[60..64].copy_from_slice(&align.to_le_bytes());
                e[64] = zone.code();
            }
            LoaderCommand::AddPointer {
                dest_file,
                src_file,
                offset,
                size,
            } => {
                e[0] = 2;
                put_name(&mut e, 4, dest_file);
                put_name(&mut e, 60, src_file);
                e[116..120].copy_from_slice(&offset.to_le_bytes());
                e[120] = *size;
            }
            LoaderCommand::AddChecksum {
                file,
                offset,
                start,
                length,
            } => {
                e[0] = 3;
                put_name(&mut e, 4, file);
                e[60..64].copy_from_slice(&offset.to_le_bytes());
                e[64..68].copy_from_slice(&start.to_le_bytes());
                e[68..72].copy_from_slice(&length.to_le_bytes());
            }
        }
        e
    }

    /// Decodes one command; `None` for a command number SeaBIOS skips
    /// (0, padding, and ones it does not know, e.g. WRITE_POINTER).
    pub fn decode(entry: &[u8; LOADER_COMMAND_LEN]) -> Result<Option<Self>, LoaderDecodeError> {
        Ok(Some(match u32_at(entry, 0) {
            1 => LoaderCommand::Allocate {
                file: get_name(entry, 4)?,
                align: u32_at(entry, 60),
                zone: match entry[64] {
                    1 => LoaderZone::High,
                    2 => LoaderZone::FSeg,
                    zone => return Err(LoaderDecodeError::UnknownZone { zone }),
                },
            },
            2 => LoaderCommand::AddPointer {
                dest_file: get_name(entry, 4)?,
                src_file: get_name(entry, 60)?,
                offset: u32_at(entry, 116),
                size: entry[120],
            },
            3 => LoaderCommand::AddChecksum {
                file: get_name(entry, 4)?,
                offset: u32_at(entry, 60),
                start: u32_at(entry, 64),
                length: u32_at(entry, 68),
            },
            _ => return Ok(None),
        }))
    }
}

/// The three fw_cfg files QEMU gives SeaBIOS for ACPI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiFwCfg {
    /// `etc/acpi/rsdp`.
    pub rsdp: Vec<u8>,
    /// `etc/acpi/tables`.
    pub tables: Vec<u8>,
    /// `etc/table-loader`.
    pub table_loader: Vec<u8>,
}

/// Where each table sits in [`AcpiFwCfg::tables`]: `(signature, offset, length)`.
pub type TableOffsets = Vec<([u8; 4], usize, usize)>;

impl AcpiFwCfg {
    /// Builds the tables for `config`.
    pub fn new(config: &AcpiConfig) -> Result<Self, AcpiError> {
        Ok(build_acpi_tables(config)?.0)
    }

    /// The files as `(fw_cfg name, contents)`, in the order QEMU adds them:
    /// pass each to the fw_cfg device's `add_file`.
    pub fn into_files(self) -> [(&'static str, Vec<u8>); 3] {
        [
            (ACPI_TABLES_FILE, self.tables),
            (ACPI_RSDP_FILE, self.rsdp),
            (ACPI_TABLE_LOADER_FILE, self.table_loader),
        ]
    }
}

/// A table's 36-byte header fields set as QEMU does (creator "BXPC" 1), the
/// length, and a checksum valid for the blob as it stands.
fn finish_table(t: &mut [u8], revision: u8, config: &AcpiConfig) {
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[8] = revision;
    t[10..16].copy_from_slice(&config.oem_id);
    t[16..24].copy_from_slice(&config.oem_table_id);
    t[24..28].copy_from_slice(&1u32.to_le_bytes());
    t[28..32].copy_from_slice(&CREATOR_ID);
    t[32..36].copy_from_slice(&1u32.to_le_bytes());
    set_checksum(t, 9, 0, t.len());
}

fn set_checksum(t: &mut [u8], at: usize, start: usize, len: usize) {
    t[at] = 0;
    let sum = t[start..start + len]
        .iter()
        .fold(0u8, |s, &b| s.wrapping_add(b));
    t[at] = sum.wrapping_neg();
}

fn header(signature: &[u8; 4]) -> Vec<u8> {
    let mut t = vec![0u8; HEADER_LEN];
    t[..4].copy_from_slice(signature);
    t
}

fn aml_bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// Already-serialized AML.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// The small IRQ descriptor without flags (ASL `IRQNoFlags`), as QEMU uses
/// for ISA devices; `acpi_tables` has only the extended one.
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(0x22);
        sink.word(1u16 << self.0);
    }
}

fn name(path: &str, value: &dyn Aml) -> Raw {
    Raw(aml_bytes(&aml::Name::new(path.into(), value)))
}

fn device(path: &str, children: Vec<Raw>) -> Raw {
    let refs: Vec<&dyn Aml> = children.iter().map(|c| c as &dyn Aml).collect();
    Raw(aml_bytes(&aml::Device::new(path.into(), refs)))
}

fn resources(children: Vec<&dyn Aml>) -> Raw {
    Raw(aml_bytes(&aml::ResourceTemplate::new(children)))
}

fn isa_device(path: &str, hid: &str, uid: Option<u8>, crs: Raw) -> Raw {
    let mut children = vec![name("_HID", &aml::EISAName::new(hid))];
    if let Some(uid) = uid {
        children.push(name("_UID", &uid));
    }
    children.push(name("_CRS", &crs));
    device(path, children)
}

fn pci0_crs(config: &AcpiConfig) -> Raw {
    let bus = aml::AddressSpace::new_bus_number(0u16, 0xffu16);
    let cf8 = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = aml::AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_high = aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let vga = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::Cacheable,
        true,
        0xa_0000u32,
        0xb_ffffu32,
        None,
    );
    let hole = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        config.low_ram_end as u32,
        ACPI_PCI_HOLE_END,
        None,
    );
    let hole64 = config.pci_hole64().map(|(first, last)| {
        aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::Cacheable,
            true,
            first,
            last,
            None,
        )
    });
    let mut children: Vec<&dyn Aml> = vec![&bus, &cf8, &io_low, &io_high, &vga, &hole];
    if let Some(h) = &hole64 {
        children.push(h);
    }
    resources(children)
}

fn pci0_prt(config: &AcpiConfig) -> Raw {
    let mut entries = Vec::new();
    for slot in 1u8..32 {
        for pin in IntxPin::ALL {
            let addr = (u32::from(slot) << 16) | 0xffff;
            let gsi = if slot == 1 && pin == IntxPin::A {
                config.sci_irq
            } else {
                pci_intx_gsi(slot, pin)
            };
            let pin = pin.index();
            entries.push(Raw(aml_bytes(&aml::Package::new(vec![
                &addr,
                &pin,
                &aml::ZERO,
                &gsi,
            ]))));
        }
    }
    let refs: Vec<&dyn Aml> = entries.iter().map(|c| c as &dyn Aml).collect();
    Raw(aml_bytes(&aml::Package::new(refs)))
}

fn dsdt(config: &AcpiConfig) -> Vec<u8> {
    let mut isa = vec![name("_ADR", &0x0001_0000u32)];
    if config.keyboard {
        let (data, cmd, irq) = (
            aml::IO::new(0x60, 0x60, 1, 1),
            aml::IO::new(0x64, 0x64, 1, 1),
            IrqNoFlags(1),
        );
        isa.push(isa_device(
            "KBD_",
            "PNP0303",
            None,
            resources(vec![&data, &cmd, &irq]),
        ));
    }
    if config.com1 {
        let (io, irq) = (aml::IO::new(0x3f8, 0x3f8, 0, 8), IrqNoFlags(4));
        isa.push(isa_device(
            "COM1",
            "PNP0501",
            Some(1),
            resources(vec![&io, &irq]),
        ));
    }
    if config.rtc {
        let (io, irq) = (aml::IO::new(0x70, 0x70, 1, 2), IrqNoFlags(8));
        isa.push(isa_device(
            "RTC_",
            "PNP0B00",
            None,
            resources(vec![&io, &irq]),
        ));
    }

    let mut pci0 = vec![
        name("_HID", &aml::EISAName::new("PNP0A03")),
        // No `_ADR 0` beside the `_HID` as QEMU has: a device has one or the
        // other (ACPI 6.5 6.1; iasl warns).
        // QEMU's pc-i440fx-7.2 (pci_root_uid; 8.0 machines use 0).
        name("_UID", &aml::ONE),
        name("_CRS", &pci0_crs(config)),
        name("_PRT", &pci0_prt(config)),
        device("ISA_", isa),
    ];
    if config.ide {
        pci0.push(device("IDE_", vec![name("_ADR", &0x0001_0001u32)]));
    }
    for f in &config.pci {
        let devfn = (f.slot << 3) | f.function;
        let adr = (u32::from(f.slot) << 16) | u32::from(f.function);
        pci0.push(device(&format!("S{devfn:02X}_"), vec![name("_ADR", &adr)]));
    }

    let mut sb = vec![device("PCI0", pci0)];
    for i in 0..config.vcpus {
        sb.push(device(
            &format!("C{i:03X}"),
            vec![name("_HID", &"ACPI0007"), name("_UID", &i)],
        ));
    }
    let sb_refs: Vec<&dyn Aml> = sb.iter().map(|c| c as &dyn Aml).collect();
    let gpe_hid = name("_HID", &"ACPI0006");

    let mut t = header(b"DSDT");
    // SLP_TYP 0 is soft-off on QEMU's PIIX4 PM (acpi_pm1_cnt_write).
    aml::Name::new(
        "\\_S5_".into(),
        &aml::Package::new(vec![&aml::ZERO, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut t);
    aml::Scope::new("\\_GPE".into(), vec![&gpe_hid]).to_aml_bytes(&mut t);
    aml::Scope::new("\\_SB_".into(), sb_refs).to_aml_bytes(&mut t);
    finish_table(&mut t, 1, config);
    t
}

fn io_gas(bits: u8, port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        bits,
        0,
        AccessSize::Undefined,
        u64::from(port),
    )
}

/// FADT revision 3. `facs` and `dsdt` are offsets into the tables file.
fn fadt(config: &AcpiConfig, facs: u32, dsdt: u32) -> Vec<u8> {
    let mut f = FADTBuilder::new(config.oem_id, config.oem_table_id, 1)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::SlpButton)
        .flag(Flags::RtcS4)
        .flag(Flags::ResetRegSup)
        .flag(Flags::UsePlatformClock)
        .firmware_ctrl_32(facs);
    if config.vcpus > 8 {
        // Flat logical APIC mode addresses at most 8 CPUs.
        f = f.flag(Flags::ForceApicClusterModel);
    }
    let pm = u32::from(config.pm_base);
    f.dsdt = dsdt.into();
    f.x_dsdt = u64::from(dsdt).into();
    f.sci_int = u16::from(config.sci_irq).into();
    if config.smi_cmd {
        f.smi_cmd = u32::from(ACPI_SMI_CMD).into();
        f.acpi_enable = ACPI_ENABLE;
        f.acpi_disable = ACPI_DISABLE;
    }
    f.pm1a_evt_blk = pm.into();
    f.pm1a_cnt_blk = (pm + 4).into();
    f.pm_tmr_blk = (pm + 8).into();
    f.gpe0_blk = u32::from(config.gpe0_base).into();
    f.pm1_evt_len = 4;
    f.pm1_cnt_len = 2;
    f.pm_tmr_len = 4;
    f.gpe0_blk_len = config.gpe0_len;
    f.p_lvl2_lat = 0xfffu16.into(); // C2 not supported
    f.p_lvl3_lat = 0xfffu16.into(); // C3 not supported
    f.century = ACPI_RTC_CENTURY;
    // LEGACY_DEVICES (ISA devices: COM1, RTC), 8042.
    f.iapc_boot_arch = (1u16 | if config.keyboard { 2 } else { 0 }).into();
    f.reset_reg = io_gas(8, ACPI_RESET_PORT);
    f.reset_value = ACPI_RESET_VALUE;
    f.fadt_minor_version = 0;
    f.x_pm1a_evt_blk = io_gas(32, config.pm_base);
    f.x_pm1a_cnt_blk = io_gas(16, config.pm_base + 4);
    f.x_pm_tmr_blk = io_gas(32, config.pm_base + 8);
    f.x_gpe0_blk = io_gas(config.gpe0_len * 8, config.gpe0_base);
    let mut t = aml_bytes(&f.finalize());
    t.truncate(FADT_REV3_LEN);
    // Byte 44: INT_MODEL in ACPI 1.0, reserved since; QEMU writes 1 (multiple APIC).
    t[44] = 1;
    finish_table(&mut t, 3, config);
    t
}

fn madt(config: &AcpiConfig) -> Vec<u8> {
    let mut m = MADT::new(
        config.oem_id,
        config.oem_table_id,
        1,
        LocalInterruptController::Address(APIC_ADDR),
    );
    for id in 0..config.vcpus as u8 {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(config.vcpus as u8, IOAPIC_ADDR, 0));
    let mut t = aml_bytes(&m);
    // Flags: PCAT_COMPAT (there are 8259 PICs).
    t[40..44].copy_from_slice(&1u32.to_le_bytes());
    // Interrupt source overrides: ISA bus, IRQ, GSI, flags.
    let iso = |irq: u8, gsi: u32, flags: u16| {
        let mut e = vec![2, 10, 0, irq];
        e.extend_from_slice(&gsi.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        e
    };
    t.extend(iso(0, 2, 0));
    for irq in [5, 9, 10, 11] {
        // Active high (1), level triggered (3 << 2).
        t.extend(iso(irq, u32::from(irq), 0xd));
    }
    // Local APIC NMI: all processors, flags conforming, LINT1.
    t.extend([4, 6, 0xff, 0, 0, 1]);
    finish_table(&mut t, 1, config);
    t
}

/// Windows ACPI Emulated devices Table, as QEMU's: "ACPI PM timer good"
/// (one read of the PM timer gives a reliable value; Windows then skips
/// re-reading it). Other guests ignore it.
fn waet(config: &AcpiConfig) -> Vec<u8> {
    let mut t = header(b"WAET");
    t.extend((1u32 << 1).to_le_bytes());
    finish_table(&mut t, 1, config);
    t
}

struct Linker {
    blob: Vec<u8>,
    commands: Vec<LoaderCommand>,
    checksums: Vec<LoaderCommand>,
    offsets: TableOffsets,
}

impl Linker {
    fn add(&mut self, table: Vec<u8>) -> u32 {
        let at = self.blob.len();
        let sig: [u8; 4] = table[..4].try_into().expect("a table has a signature");
        if &sig != b"FACS" {
            self.checksums.push(LoaderCommand::AddChecksum {
                file: ACPI_TABLES_FILE.into(),
                offset: (at + 9) as u32,
                start: at as u32,
                length: table.len() as u32,
            });
        }
        self.offsets.push((sig, at, table.len()));
        self.blob.extend(table);
        at as u32
    }

    /// Declares the `size`-byte field at offset `at` of file `dest` a pointer
    /// into the tables file.
    fn pointer(&mut self, dest: &str, at: u32, size: u8) {
        self.commands.push(LoaderCommand::AddPointer {
            dest_file: dest.into(),
            src_file: ACPI_TABLES_FILE.into(),
            offset: at,
            size,
        });
    }
}

/// Builds the files and says where each table is in the tables file.
pub fn build_acpi_tables(config: &AcpiConfig) -> Result<(AcpiFwCfg, TableOffsets), AcpiError> {
    config.validate()?;
    let mut l = Linker {
        blob: Vec::new(),
        commands: vec![
            LoaderCommand::Allocate {
                file: ACPI_TABLES_FILE.into(),
                align: 64,
                zone: LoaderZone::High,
            },
            LoaderCommand::Allocate {
                file: ACPI_RSDP_FILE.into(),
                align: 16,
                zone: LoaderZone::FSeg,
            },
        ],
        checksums: Vec::new(),
        offsets: Vec::new(),
    };

    // The FACS first: at the start of a 64-byte aligned allocation, it is 64-byte aligned.
    let mut facs = aml_bytes(&acpi_tables::facs::FACS::new());
    facs.resize(FACS_LEN, 0);
    facs[32] = 0; // version 0: QEMU's (ACPI 1.0) FACS
    let facs_at = l.add(facs);
    let dsdt_at = l.add(dsdt(config));
    let fadt_at = l.add(fadt(config, facs_at, dsdt_at));
    l.pointer(ACPI_TABLES_FILE, fadt_at + 36, 4); // FIRMWARE_CTRL
    l.pointer(ACPI_TABLES_FILE, fadt_at + 40, 4); // DSDT
    l.pointer(ACPI_TABLES_FILE, fadt_at + 140, 8); // X_DSDT
    let madt_at = l.add(madt(config));
    let waet_at = l.add(waet(config));
    let entries = [fadt_at, madt_at, waet_at];

    let mut rsdt = header(b"RSDT");
    for e in entries {
        rsdt.extend(e.to_le_bytes());
    }
    finish_table(&mut rsdt, 1, config);
    let rsdt_at = l.add(rsdt);
    for i in 0..entries.len() as u32 {
        l.pointer(ACPI_TABLES_FILE, rsdt_at + 36 + 4 * i, 4);
    }

    let mut xsdt = header(b"XSDT");
    for e in entries {
        xsdt.extend(u64::from(e).to_le_bytes());
    }
    finish_table(&mut xsdt, 1, config);
    let xsdt_at = l.add(xsdt);
    for i in 0..entries.len() as u32 {
        l.pointer(ACPI_TABLES_FILE, xsdt_at + 36 + 8 * i, 8);
    }

    let mut rsdp = aml_bytes(&Rsdp::new(config.oem_id, u64::from(xsdt_at)));
    rsdp[16..20].copy_from_slice(&rsdt_at.to_le_bytes());
    set_checksum(&mut rsdp, 8, 0, 20);
    let rsdp_len = rsdp.len();
    set_checksum(&mut rsdp, 32, 0, rsdp_len);
    l.pointer(ACPI_RSDP_FILE, 16, 4); // RSDT
    l.pointer(ACPI_RSDP_FILE, 24, 8); // XSDT

    let mut commands = l.commands;
    commands.extend(l.checksums);
    // The RSDP's checksum (first 20 bytes) before its extended one (all 36).
    commands.push(LoaderCommand::AddChecksum {
        file: ACPI_RSDP_FILE.into(),
        offset: 8,
        start: 0,
        length: 20,
    });
    commands.push(LoaderCommand::AddChecksum {
        file: ACPI_RSDP_FILE.into(),
        offset: 32,
        start: 0,
        length: rsdp.len() as u32,
    });
    let table_loader = commands.iter().flat_map(|c| c.encode()).collect();
    Ok((
        AcpiFwCfg {
            rsdp,
            tables: l.blob,
            table_loader,
        },
        l.offsets,
    ))
}

/// A file as a loader script left it: where it was allocated and its
/// patched contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedFile {
    /// The fw_cfg name.
    pub name: String,
    /// Guest address it was allocated at.
    pub addr: u64,
    /// Where it was allocated.
    pub zone: LoaderZone,
    /// Its contents after every command ran.
    pub data: Vec<u8>,
}

/// Runs a linker/loader `script` as SeaBIOS's `romfile_loader_execute` does:
/// `files` are the fw_cfg files, `allocate(file, zone, align, size)` says
/// where an ALLOCATE puts a file (it must honour `align`). Unknown commands
/// are skipped, as SeaBIOS skips them.
pub fn execute_table_loader(
    script: &[u8],
    files: &[(&str, &[u8])],
    mut allocate: impl FnMut(&str, LoaderZone, u32, usize) -> u64,
) -> Result<Vec<LoadedFile>, AcpiError> {
    let mut loaded: Vec<LoadedFile> = Vec::new();
    if script.len() % LOADER_COMMAND_LEN != 0 {
        return Err(AcpiError::TableLoader {
            index: script.len() / LOADER_COMMAND_LEN,
            problem: format!("the script's {} bytes are not whole commands", script.len()),
        });
    }
    for (index, entry) in script.chunks_exact(LOADER_COMMAND_LEN).enumerate() {
        let fail = |problem: String| AcpiError::TableLoader { index, problem };
        let entry: &[u8; LOADER_COMMAND_LEN] = entry.try_into().expect("chunks_exact");
        let find = |loaded: &[LoadedFile], name: &str| {
            loaded
                .iter()
                .position(|f| f.name == name)
                .ok_or_else(|| format!("file {name} was not allocated"))
        };
        match LoaderCommand::decode(entry).map_err(|e| fail(e.to_string()))? {
            None => {}
            Some(LoaderCommand::Allocate { file, align, zone }) => {
                if !align.is_power_of_two() {
                    return Err(fail(format!("alignment {align} is not a power of two")));
                }
                if loaded.iter().any(|f| f.name == file) {
                    return Err(fail(format!("file {file} allocated twice")));
                }
                let data = files
                    .iter()
                    .find(|(n, _)| *n == file)
                    .ok_or_else(|| fail(format!("no fw_cfg file {file}")))?
                    .1
                    .to_vec();
                let addr = allocate(&file, zone, align, data.len());
                if addr % u64::from(align) != 0 {
                    return Err(fail(format!(
                        "{file} placed at {addr:#x}, not {align}-aligned"
                    )));
                }
                loaded.push(LoadedFile {
                    name: file,
                    addr,
                    zone,
                    data,
                });
            }
            Some(LoaderCommand::AddPointer {
                dest_file,
                src_file,
                offset,
                size,
            }) => {
                let src = loaded[find(&loaded, &src_file).map_err(fail)?].addr;
                let dest = find(&loaded, &dest_file).map_err(fail)?;
                let data = &mut loaded[dest].data;
                let (at, size) = (offset as usize, usize::from(size));
                if ![1, 2, 4, 8].contains(&size) || at + size > data.len() {
                    return Err(fail(format!(
                        "pointer of {size} bytes at {at} outside {dest_file} ({} bytes)",
                        data.len()
                    )));
                }
                let mut value = [0u8; 8];
                value[..size].copy_from_slice(&data[at..at + size]);
                let pointer = u64::from_le_bytes(value)
                    .checked_add(src)
                    .filter(|p| size == 8 || *p >> (size * 8) == 0)
                    .ok_or_else(|| {
                        fail(format!(
                            "{src_file} at {src:#x} does not fit a {size}-byte pointer"
                        ))
                    })?;
                data[at..at + size].copy_from_slice(&pointer.to_le_bytes()[..size]);
            }
            Some(LoaderCommand::AddChecksum {
                file,
                offset,
                start,
                length,
            }) => {
                let i = find(&loaded, &file).map_err(fail)?;
                let data = &mut loaded[i].data;
                let (at, start, end) = (
                    offset as usize,
                    start as usize,
                    start as usize + length as usize,
                );
                if at >= data.len() || end > data.len() {
                    return Err(fail(format!(
                        "checksum at {at} over {start}..{end} outside {file} ({} bytes)",
                        data.len()
                    )));
                }
                let sum = data[start..end].iter().fold(0u8, |s, &b| s.wrapping_add(b));
                data[at] = data[at].wrapping_sub(sum);
            }
        }
    }
    Ok(loaded)
}

/// Writes the ACPI tables for `config` straight into guest memory, for a
/// guest booted without firmware: the RSDP at [`ACPI_RSDP_START`], the other
/// tables at `tables_addr` (64-byte aligned, below 4 GiB, in memory the
/// memory map reserves, e.g. [`ACPI_TABLES_START`]). Returns the RSDP's
/// address (for `boot_params.acpi_rsdp_addr`; Linux also finds it by
/// scanning).
pub fn write_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    config: &AcpiConfig,
    tables_addr: u64,
) -> Result<u64, BootError> {
    let files = AcpiFwCfg::new(config)?;
    let placement = |problem: &str| AcpiError::TablesPlacement {
        addr: tables_addr,
        problem: problem.into(),
    };
    if tables_addr % 64 != 0 {
        return Err(placement("the FACS must be 64-byte aligned").into());
    }
    let end = tables_addr + files.tables.len() as u64;
    if end > 1 << 32 {
        return Err(placement("the tables must end below 4 GiB").into());
    }
    if tables_addr < ACPI_RSDP_START + files.rsdp.len() as u64 && end > ACPI_RSDP_START {
        return Err(placement("the tables would overlap the RSDP").into());
    }
    let loaded = execute_table_loader(
        &files.table_loader,
        &[
            (ACPI_RSDP_FILE, &files.rsdp),
            (ACPI_TABLES_FILE, &files.tables),
        ],
        |_, zone, _, _| match zone {
            LoaderZone::FSeg => ACPI_RSDP_START,
            LoaderZone::High => tables_addr,
        },
    )?;
    for f in &loaded {
        mem.write_slice(&f.data, GuestAddress(f.addr))
            .map_err(|source| BootError::GuestMemory {
                what: if f.zone == LoaderZone::FSeg {
                    "ACPI RSDP"
                } else {
                    "ACPI tables"
                },
                gpa: f.addr,
                source,
            })?;
    }
    Ok(ACPI_RSDP_START)
}

#[cfg(test)]
mod tests;
