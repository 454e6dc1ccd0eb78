//! ferry's test guests, assembled from source, and the memory oracle that
//! checks them.
//!
//! # The dirtier guest
//!
//! [`DIRTIER_ELF`] is a tiny PVH-bootable x86-64 guest (`guest/dirtier.S`,
//! assembled and linked by `build.rs` with the system `as` and `ld`). It boots
//! under `qemu-system-x86_64 -M microvm -kernel`, under ferry's loader, and
//! from a disk through a BIOS (SeaBIOS; [`bootdisk`] writes the disk, its
//! boot loader is `guest/bootsect.S`), switches to long mode, drops to ring 3 (IOPL 3, IF 0) and keeps rewriting a
//! working set of guest pages so that a live migration always has dirty pages
//! to chase. Every byte of the image lies in `[1 MiB, 2 MiB)`; the VMM must
//! keep its boot structures (start info, memory map, command line) out of RAM
//! from 2 MiB up, which belongs to the guest's working set and fill.
//!
//! Command line (space separated `key=value`, unknown keys ignored):
//!
//! | key | meaning | default |
//! |-----|---------|---------|
//! | `ws=<N>[K\|M\|G]`, `ws=<P>%` | working-set size in bytes (or percent of usable RAM), rounded down to pages, clamped to usable RAM | `0` (idle) |
//! | `pattern=seq\|random` | sweep order: sequential, or a constant stride coprime with N, starting near 0.618 N | `seq` |
//! | `pause=<ms>` | busy-wait after each pass | `0` |
//! | `hb=<ms>` | heartbeat period: a `.` on COM1 at most this often (`0` = none) | `1` |
//! | `poweroff=<n>` | power off (ACPI PM1a SLP_EN, port 0x604) after pass n | never |
//! | `reset=<n>` | reset (port 0xcf9) after pass n | never |
//! | `fill=0\|1` | once at boot, write the fill signature into every other usable page | `0` |
//! | `blk=<K>` | drive a virtio-blk disk: every pass writes a record to one of sectors `0..K` and reads it back (`0` = no disk driver) | `0` |
//! | `blkbench=<M>` | at boot, before the first pass: write M MiB to the virtio-blk disk from sector 0 in 64 KiB requests (negotiating `VIRTIO_BLK_F_FLUSH`), flush, read them back, printing `blkbench: start`, `blkbench: written` and `blkbench: read` as each phase ends (`ferry-bench --disk` times them); implies `blk=1` when `blk=` is 0 | `0` |
//! | `net=0\|1` | drive a virtio-net card: every pass broadcasts a frame and answers pings | `0` |
//! | `rng=0\|1` | drive a virtio-rng device: every pass asks for 64 random bytes and checks them | `0` |
//! | `balloon=0\|1` | drive a virtio-balloon: every pass follows the host's target with pages past the working set, and answers stats requests (refused with `fill=1`) | `0` |
//! | `cdrom=<LBA>` | read the 2048-byte sector LBA of the first ATAPI CD-ROM on the legacy IDE channels at boot and print its first 16 bytes; every pass reads it again and compares | none |
//! | `acpi=0\|1` | handle the ACPI power button as an OS does: find the PIIX4 PM block that firmware set up, turn ACPI on, and power off (S5) when the button is pressed (QMP `system_powerdown`); see [ACPI power button](#acpi-power-button) | `0` |
//!
//! Serial output (COM1): `dirtier: ws=<pages> stride=<s> fill=<0|1>`, then
//! with `acpi=1` one `dirtier: acpi: ...` line (see
//! [ACPI power button](#acpi-power-button)), then
//! heartbeat dots (also during the fill), `blk: capacity=<sectors>`,
//! `net: mac=<xx:xx:xx:xx:xx:xx>`, `rng: ok` and
//! `balloon: pool=<pages> stats=<0|1>` and `cdrom: lba=<LBA> data=<32 hex
//! digits>` when those drivers are on (in that order), `dirtier: ready` just
//! before the first pass, then heartbeat dots
//! only. A CPU exception prints `EXC <vector>` and halts. A virtio failure
//! prints `<dev>: ERR <reason>` (`blk`, `net`, `rng`, `balloon`) and stops
//! (ring 3 spins without heartbeats): see [Virtio devices](#virtio-devices);
//! so does an IDE failure (`cdrom`, see [IDE CD-ROM](#ide-cd-rom)).
//!
//! # IDE CD-ROM
//!
//! With `cdrom=<LBA>` the guest drives an ATAPI CD-ROM by polled PIO from
//! ring 3, interrupts off (nIEN): it resets both legacy channels (SRST through
//! 0x3f6 and 0x376), takes the first unit whose cylinder registers hold the
//! ATAPI signature (0x14, 0xeb; primary before secondary, unit 0 before 1),
//! and reads sector LBA with PACKET + READ(10), byte-count limit 2048,
//! taking each DRQ chunk the drive offers (`rep insw` of the count in the
//! cylinder registers). At boot it prints `cdrom: lba=<LBA> data=<hex>`
//! (the sector's first 16 bytes); in every pass, after the virtio work, it
//! reads the sector again and compares all 2048 bytes. Failures print
//! `cdrom: ERR <reason>` and stop the guest: `no device`, `status <n>` (ERR
//! in the status register), `timeout` (30 s of TSC time), `length <n>` (the
//! drive offered more or fewer than 2048 bytes), `readback` (the sector
//! changed).
//!
//! # ACPI power button
//!
//! With `acpi=1` the guest does, from ring 3 and polled, what an ACPI OS does
//! on QEMU's `pc` machine with the PM I/O block as SeaBIOS leaves it:
//!
//! 1. PCI configuration mechanism #1, bus 0, device 1, function 3 (the
//!    PIIX4 power-management function): vendor:device must be `8086:7113`,
//!    else `dirtier: acpi: no PIIX4 PM` and the guest carries on without
//!    ACPI. Bit 0 of config byte 0x80 (PMREGMISC, PM I/O enable) must be set
//!    and config dword 0x40 (PMBA, base in bits 15:6) nonzero, else
//!    `dirtier: acpi: PM I/O disabled` and the same. SeaBIOS sets base
//!    0x600 (QEMU 7.2's `pc` with Debian's SeaBIOS 1.16): PM1_STS at base+0,
//!    PM1_EN at base+2, PM1_CNT at base+4 (16-bit registers).
//! 2. `dirtier: acpi: pm at 0x<base>` (lower-case hex, no leading zeros),
//!    and the 64-port block is opened in the guest's TSS I/O bitmap.
//! 3. If SCI_EN (PM1_CNT bit 0) is clear: ACPI_ENABLE (0xf1) to SMI_CMD
//!    (port 0xb2), then up to 1 s (TSC) for SCI_EN, else
//!    `dirtier: acpi: SCI_EN never set` (and it goes on anyway).
//! 4. A stale PWRBTN_STS (PM1_STS bit 8) is cleared (write 1), PWRBTN_EN
//!    (PM1_EN bit 8) is set.
//! 5. At every heartbeat (every 10 ms of TSC time with `hb=0`) one 16-bit
//!    read of PM1_STS. When PWRBTN_STS is set: `dirtier: power button` on
//!    COM1, PWRBTN_STS cleared (write 1), then S5 as an OS enters it: PM1_CNT
//!    = (PM1_CNT & !(SLP_TYP | SLP_EN)) | SLP_TYP(S5) << 10 | SLP_EN (bit
//!    13), SLP_TYP(S5) = 0 from QEMU's `\_S5` package. If the machine stays
//!    on, the guest carries on (and a later press starts over).
//!
//! Interrupts stay off: the SCI (IRQ 9) is never taken.
//!
//! Usable RAM is the PVH memory map's RAM ranges clipped to `[2 MiB, 64 GiB)`,
//! whole pages, first 8 ranges, sorted by address. Usable page index `i` maps
//! to a GPA through that range list. The header page at [`HEADER_GPA`] holds
//! little-endian u64 fields at the `header::*` offsets; the magic is written
//! last. Pass `p` (from 1) writes, for sweep index `j` in `0..N`, the page
//! `i = j * stride mod N`: u64 `p` at offset 4088, the page's GPA at offset 8,
//! then u64 `p` at offset 0, and after the sweep sets the header's pass count
//! to `p`. Fill pages carry their GPA at offset 0, `FERRYFIL` at offset 8 and
//! the bitwise-not GPA at offset 4088.
//!
//! # Virtio devices
//!
//! With `blk=`, `net=`, `rng=` or `balloon=` the guest drives virtio 1.0 PCI
//! devices (modern transport only: vendor `0x1af4`, device `0x1042` for blk,
//! `0x1041` for net, `0x1044` for rng, `0x1045` for the balloon, the first
//! such function on bus 0), polled, from ring 3. It uses PCI
//! configuration mechanism #1 (ports `0xcf8`/`0xcfc`, dword accesses only),
//! sets Memory Space, Bus Master and INTx Disable in the command register
//! (BARs must already be assigned, as firmware would), reads the BARs (32- or
//! 64-bit memory, below 64 GiB) and walks the capability list for the common,
//! notify, ISR and device configuration structures (the first of each type).
//! Then: reset (and wait for status 0), ACKNOWLEDGE, DRIVER, features
//! (`VIRTIO_F_VERSION_1`, plus `VIRTIO_NET_F_MAC` for net, plus
//! `VIRTIO_BALLOON_F_STATS_VQ` for the balloon if the device offers it;
//! nothing else), FEATURES_OK and re-read, `config_msix_vector = 0xffff`, per queue
//! `queue_size = min(max, 16)` rounded down to a power of 2,
//! `queue_msix_vector = 0xffff`, ring addresses (two 32-bit writes each),
//! `queue_enable = 1`; device configuration; DRIVER_OK. MSI-X stays disabled
//! and IF stays 0: completions are found by polling the used ring's `idx`,
//! notifications write the queue index (16 bits) to the queue's notify
//! address. Rings and buffers live in the image's `.bss`, below 2 MiB.
//!
//! Failures print `<dev>: ERR <reason>` and stop the guest: `no device`,
//! `bar`, `capabilities`, `reset timeout`, `no VERSION_1`,
//! `feature not offered`, `FEATURES_OK not kept`, `queue unavailable`,
//! `timeout` (no completion within 30 s of TSC time), `DEVICE_NEEDS_RESET`,
//! `used ring` (an unexpected used id), `status <n>` (a blk request's status
//! byte), `capacity` (K sectors do not fit the disk), `readback`, `length <n>`
//! (an rng used length of 0 or above 64), `zero bytes`, `repeated bytes`
//! (rng), `fill=1` (balloon: the fill owns every page the balloon could use).
//!
//! **Disk (`blk=K`).** At boot `blk: capacity=<sectors>` (device
//! configuration `capacity`). In pass `p`, after the sweep and before the
//! header's pass count becomes `p`, the guest writes one 512-byte record to
//! sector `p mod K`, waits for completion, reads the sector back into
//! another buffer and compares all 512 bytes ([`disk::record`] builds one):
//!
//! | offset | bytes | content (little-endian) |
//! |--------|-------|-------------------------|
//! | 0 | 8 | `FERRYBLK` |
//! | 8 | 8 | pass `p` |
//! | 16 | 8 | sector `p mod K` |
//! | 24 | 8 | `!p` |
//! | `8k`, k = 4..63 | 8 | `(p + k) * 0x9e3779b97f4a7c15` (wrapping) |
//!
//! [`disk::check_disk`] decides whether a disk image is one the guest could
//! have written by the time its header said `P` passes.
//!
//! **Network (`net=1`).** At boot `net: mac=<mac>` (device configuration).
//! Receive queue 0 holds 8 posted buffers of 2048 bytes (one device-writable
//! descriptor each); transmit queue 1 sends one descriptor: a 12-byte zero
//! `virtio_net_hdr_v1` and a 60-byte frame. Frames (all ethertype
//! [`NET_ETHERTYPE`] `0x88b5`, payload padded with zeros to 60 bytes):
//!
//! | frame | destination | source | payload |
//! |-------|-------------|--------|---------|
//! | every pass `p`, after the disk record | `ff:ff:ff:ff:ff:ff` | device MAC | `FERRYNET`, u64 `p` (LE) |
//! | ping, to the guest | any | sender | `FERRYPNG`, u64 `n` |
//! | reply to a ping | the ping's source | device MAC | `FERRYPON`, the same 8 bytes `n` |
//!
//! The guest polls its receive queue once per pass and while waiting for a
//! transmit to complete; every used receive buffer is posted again. Up to 16
//! pings wait for their replies (more are dropped); replies go out after the
//! pass's `FERRYNET`.
//!
//! **Entropy (`rng=1`).** At boot `rng: ok`. In every pass, after the frames,
//! the guest zeroes a 64-byte buffer, posts it as one device-writable
//! descriptor on request queue 0 and waits for it. The used length must be 1
//! to 64 (`length <n>`); when it is 8 or more the 64 bytes must not be all
//! zero (`zero bytes`) nor equal to the previous pass's 64 bytes
//! (`repeated bytes`).
//!
//! **Balloon (`balloon=1`).** Refused with `fill=1`. The balloon's pool is
//! every usable page past the working set, `pool = total - N` pages; balloon
//! page `k` (the `k`-th page inflated, from 0) is usable page
//! `total - 1 - k`, so the balloon grows down from the top of usable RAM and
//! never holds a page of the working set, the header or anything below
//! 2 MiB. Queues: inflateq 0, deflateq 1 and, when `VIRTIO_BALLOON_F_STATS_VQ`
//! was negotiated, statsq 2. At boot `balloon: pool=<pages> stats=<0|1>`,
//! then (with stats) one stats buffer goes on statsq. In every pass, after
//! the rng request:
//!
//! 1. If the device gave the stats buffer back, the guest refills it and
//!    posts it again: three `(le16 tag, le64 value)` entries,
//!    `VIRTIO_BALLOON_S_MEMTOT` (5) = usable RAM in bytes,
//!    `S_MEMFREE` (4) and `S_AVAIL` (6) = `(pool - actual) * 4096`.
//! 2. It reads `num_pages` from the device configuration; the target is
//!    `min(num_pages, pool)` (a larger target leaves `actual` short of it).
//!    While `actual` < target it inflates: for balloon pages `actual`,
//!    `actual + 1`, ... it writes [`BALLOON_STALE_MAGIC`] at offset 0 of the
//!    page (stale data that must be gone once the host took the page: the
//!    page reads zero afterwards), puts its 32-bit PFN in a buffer of at most
//!    256, sends the buffer on inflateq, waits for it, and writes `actual`.
//!    While `actual` > target it deflates pages `actual - 1`, `actual - 2`,
//!    ... the same way on deflateq, and never touches them again.
//!
//! blk, net, rng and the balloon act once per pass, so they need `ws` > 0.
//!
//! # The oracle
//!
//! [`check`] reads a memory image through [`PhysMem`] and decides whether it
//! is a state the guest could have been in: see [`oracle`] for the rules.
//! Balloon pages (`balloon=1`) are never pages it checks: they lie past the
//! working set, and the fill, which would own them, is refused with a
//! balloon.
//! [`disk::check_disk`] does the same for the `blk=K` disk.

pub mod bootdisk;
pub mod disk;
pub mod image;
pub mod iso;
pub mod link;
pub mod oracle;
pub mod synth;

pub use image::{FileImage, PhysMem, SliceImage};
pub use oracle::{check, OracleError, OracleReport, UsableRange};

/// The dirtier guest: an ELF64 PVH image linked at 1 MiB.
pub const DIRTIER_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/dirtier.elf"));

/// Guest-physical address of the dirtier header page (the image's first page).
pub const HEADER_GPA: u64 = 0x10_0000;
/// `FERRYDRT` read as a little-endian u64.
pub const HEADER_MAGIC: u64 = 0x5452_4459_5252_4546;
/// Header layout version written by this guest.
pub const HEADER_VERSION: u64 = 1;
/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;
/// Usable RAM for the working set and fill starts here.
pub const USABLE_RAM_START: u64 = 0x20_0000;
/// The guest identity-maps (and so can use) RAM below this address.
pub const IDENTITY_MAP_LIMIT: u64 = 64 << 30;
/// At most this many usable RAM ranges.
pub const MAX_RANGES: usize = 8;
/// Bytes at offset 8 of every fill page.
pub const FILL_SIGNATURE: [u8; 8] = *b"FERRYFIL";
/// Offset of the trailing counter (working set) or `!GPA` (fill) in a page.
pub const PAGE_TAIL_OFFSET: usize = 4088;
/// Ethertype of every frame the guest sends or answers (`net=1`).
pub const NET_ETHERTYPE: u16 = 0x88b5;
/// Payload magic of the frame the guest broadcasts every pass.
pub const NET_PASS_MAGIC: [u8; 8] = *b"FERRYNET";
/// Payload magic of a ping to the guest.
pub const NET_PING_MAGIC: [u8; 8] = *b"FERRYPNG";
/// Payload magic of the guest's reply to a ping.
pub const NET_PONG_MAGIC: [u8; 8] = *b"FERRYPON";
/// Written at offset 0 of a page just before the guest inflates the balloon
/// with it (`balloon=1`): once the host has taken the page it reads zero.
pub const BALLOON_STALE_MAGIC: [u8; 8] = *b"FERRYBAL";

/// Byte offsets of the header's little-endian u64 fields.
pub mod header {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const WS_PAGES: usize = 16;
    pub const STRIDE: usize = 24;
    pub const PASSES: usize = 32;
    pub const FILL: usize = 40;
    pub const FILL_DONE: usize = 48;
    pub const TSC_KHZ: usize = 56;
    pub const NRANGES: usize = 64;
    /// `NRANGES` pairs of (start GPA, length in bytes).
    pub const RANGES: usize = 72;
}

#[cfg(test)]
mod elf_tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn dirtier_is_a_pvh_elf_below_2mib() {
        let elf = DIRTIER_ELF;
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELF64");
        assert_eq!(u16_at(elf, 18), 62, "x86-64");
        let entry = u64_at(elf, 24);
        let phoff = u64_at(elf, 32) as usize;
        let phentsize = u16_at(elf, 54) as usize;
        let phnum = u16_at(elf, 56) as usize;
        let mut loads = 0;
        let mut pvh_entry = None;
        let mut covers_header = false;
        for k in 0..phnum {
            let ph = &elf[phoff + k * phentsize..];
            let (p_type, offset, paddr) = (u32_at(ph, 0), u64_at(ph, 8), u64_at(ph, 24));
            let (filesz, memsz, align) = (u64_at(ph, 32), u64_at(ph, 40), u64_at(ph, 48));
            match p_type {
                1 => {
                    loads += 1;
                    assert!(
                        paddr >= 0x10_0000 && paddr + memsz <= 0x20_0000,
                        "PT_LOAD {paddr:#x}+{memsz:#x}"
                    );
                    covers_header |= paddr == HEADER_GPA;
                }
                4 => {
                    assert_eq!(align, 4, "QEMU computes note padding from p_align");
                    let note = &elf[offset as usize..(offset + filesz) as usize];
                    let (namesz, descsz, ntype) =
                        (u32_at(note, 0), u32_at(note, 4), u32_at(note, 8));
                    assert_eq!((namesz, descsz, ntype), (4, 4, 18));
                    assert_eq!(&note[12..16], b"Xen\0");
                    pvh_entry = Some(u64::from(u32_at(note, 16)));
                    // QEMU reads the descriptor as a host size_t: the next 4 bytes must be 0.
                    assert_eq!(u32_at(note, 20), 0);
                }
                _ => {}
            }
        }
        assert!(loads >= 1 && covers_header);
        assert_eq!(pvh_entry, Some(entry), "PVH note names the ELF entry point");
    }
}
