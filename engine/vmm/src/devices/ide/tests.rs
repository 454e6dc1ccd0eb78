//! The controller driven through its ports, as a guest driver does: ATA
//! and ATAPI commands by PIO, interrupts, state round trips and the image
//! locks. No KVM: the interrupt lines are recorded.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::status::{BSY, DRDY, DRQ, ERR};
use super::*;
use crate::devices::virtio::blk::{BlockImage, DiskError};

/// Interrupt lines that remember their level.
#[derive(Debug, Default)]
struct Lines(Mutex<[bool; 16]>);

impl IrqLine for Lines {
    fn set_level(&self, irq: u32, level: bool) {
        self.0.lock().expect("lines")[irq as usize] = level;
    }
}

/// A host driver on one channel of a controller.
struct Host {
    ide: Piix3,
    lines: Arc<Lines>,
    bus: usize,
    unit: u8,
}

/// A CD image of `sectors` 2048-byte sectors: each byte names its sector
/// and place.
fn cd_byte(lba: usize, i: usize) -> u8 {
    (lba * 31 + i * 7 + i / 256) as u8
}

fn make_image(bytes: usize, byte: impl Fn(usize) -> u8) -> tempfile::NamedTempFile {
    let img = tempfile::NamedTempFile::new().expect("temp image");
    let data: Vec<u8> = (0..bytes).map(byte).collect();
    std::fs::write(img.path(), data).expect("write the image");
    img
}

fn cd_image(sectors: usize) -> tempfile::NamedTempFile {
    make_image(sectors * CD_SECTOR, |i| {
        cd_byte(i / CD_SECTOR, i % CD_SECTOR)
    })
}

fn drive(path: &Path, media: IdeMedia, bus: u8, unit: u8) -> IdeDriveConfig {
    IdeDriveConfig {
        bus,
        unit,
        media,
        id: format!("ide{bus}-{unit}"),
        config: BlockConfig::new(BlockImage::Path(path.to_path_buf())),
    }
}

impl Host {
    fn new(drives: &[IdeDriveConfig]) -> Self {
        let lines = Arc::new(Lines::default());
        let ide = Piix3::new(drives, true, lines.clone()).expect("build the controller");
        Self {
            ide,
            lines,
            bus: 0,
            unit: 0,
        }
    }

    fn port(&self, reg: u16) -> u16 {
        COMMAND_PORTS[self.bus] + reg
    }

    fn outb(&mut self, reg: u16, v: u8) {
        let port = self.port(reg);
        self.ide.io_write(port, &[v]);
    }

    fn inb(&mut self, reg: u16) -> u8 {
        let mut b = [0u8];
        let port = self.port(reg);
        self.ide.io_read(port, &mut b);
        b[0]
    }

    fn irq(&self) -> bool {
        self.lines.0.lock().expect("lines")[IDE_IRQS[self.bus] as usize]
    }

    fn alt_status(&mut self) -> u8 {
        let mut b = [0u8];
        self.ide.io_read(CONTROL_PORTS[self.bus], &mut b);
        b[0]
    }

    /// Waits for the interrupt and acknowledges it (reads the status).
    fn interrupt(&mut self) -> u8 {
        assert!(self.irq(), "the drive interrupts");
        let status = self.inb(7);
        assert!(!self.irq(), "reading the status lowers the line");
        status
    }

    /// `rep insw` of `n` bytes, as KVM hands it over (one exit).
    fn read_data(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        let port = self.port(0);
        for chunk in v.chunks_mut(2) {
            self.ide.io_read(port, chunk);
        }
        v
    }

    fn write_data(&mut self, data: &[u8]) {
        let port = self.port(0);
        for chunk in data.chunks(2) {
            self.ide.io_write(port, chunk);
        }
    }

    fn select(&mut self, unit: u8) {
        self.unit = unit;
        self.outb(6, 0xa0 | 0x40 | (unit << 4));
    }

    /// Sets an LBA48 address and count (high bytes first), then `cmd`.
    fn ata48(&mut self, cmd: u8, lba: u64, count: u16) {
        for (count_shift, lba_shift) in [(8u32, 24u32), (0, 0)] {
            self.outb(2, (count >> count_shift) as u8);
            self.outb(3, (lba >> lba_shift) as u8);
            self.outb(4, (lba >> (lba_shift + 8)) as u8);
            self.outb(5, (lba >> (lba_shift + 16)) as u8);
        }
        self.outb(7, cmd);
    }

    /// Sets an LBA28 address and count, then `cmd`.
    fn ata28(&mut self, cmd: u8, lba: u32, count: u8) {
        self.outb(2, count);
        self.outb(3, lba as u8);
        self.outb(4, (lba >> 8) as u8);
        self.outb(5, (lba >> 16) as u8);
        self.outb(6, 0xe0 | (self.unit << 4) | ((lba >> 24) as u8 & 0x0f));
        self.outb(7, cmd);
    }

    /// Reads `sectors` PIO blocks after a read command.
    fn read_blocks(&mut self, sectors: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..sectors {
            let st = self.interrupt();
            assert_eq!(st & (BSY | DRQ | ERR), DRQ, "status {st:#x}");
            out.extend(self.read_data(512));
        }
        assert_eq!(self.alt_status() & (DRQ | BSY), 0, "the read ended");
        out
    }

    /// Sends an ATAPI packet with byte-count limit `limit`; returns the
    /// data, or the error register of a CHECK CONDITION.
    fn packet(&mut self, cdb: &[u8], limit: u16) -> Result<Vec<u8>, u8> {
        let mut p = [0u8; 12];
        p[..cdb.len()].copy_from_slice(cdb);
        self.outb(1, 0);
        self.outb(4, limit as u8);
        self.outb(5, (limit >> 8) as u8);
        self.outb(7, 0xa0);
        let st = self.alt_status();
        assert_eq!(st & (BSY | DRQ), DRQ, "the drive asks for the packet");
        assert_eq!(self.inb(2) & 3, 1, "interrupt reason: command out");
        self.write_data(&p);
        let mut data = Vec::new();
        loop {
            let st = self.interrupt();
            let reason = self.inb(2) & 3;
            if st & DRQ != 0 {
                assert_eq!(reason, 2, "interrupt reason: data in");
                let n = usize::from(self.inb(4)) | usize::from(self.inb(5)) << 8;
                assert!(
                    n > 0 && n <= usize::from(limit),
                    "chunk of {n} bytes, limit {limit}"
                );
                data.extend(self.read_data(n));
                continue;
            }
            assert_eq!(reason, 3, "interrupt reason: status");
            if st & ERR != 0 {
                return Err(self.inb(1));
            }
            assert_eq!(st & DRDY, DRDY);
            return Ok(data);
        }
    }

    fn sense(&mut self) -> (u8, u8) {
        let s = self
            .packet(&[0x03, 0, 0, 0, 18], 0xfffe)
            .expect("REQUEST SENSE");
        (s[2] & 0x0f, s[12])
    }
}

fn cd(s: &mut IdeState) -> &mut DriveState {
    s.channels[0].drives[0].as_mut().expect("a drive")
}

fn word(id: &[u8], w: usize) -> u16 {
    u16::from_le_bytes([id[2 * w], id[2 * w + 1]])
}

fn ata_string(id: &[u8], from: usize, to: usize) -> String {
    let mut s = String::new();
    for w in from..to {
        let v = word(id, w);
        s.push((v >> 8) as u8 as char);
        s.push(v as u8 as char);
    }
    s.trim_end().to_string()
}

#[test]
fn a_cdrom_has_the_atapi_signature_and_identifies_by_packet() {
    let iso = cd_image(16);
    let mut h = Host::new(&[drive(iso.path(), IdeMedia::Cdrom, 0, 0)]);
    assert_eq!((h.inb(4), h.inb(5)), (0x14, 0xeb), "signature after reset");
    h.select(0);
    h.outb(4, 0);
    h.outb(5, 0);
    h.outb(7, 0xec);
    let st = h.interrupt();
    assert_eq!(st & (ERR | DRQ), ERR, "IDENTIFY DEVICE is aborted");
    assert_eq!(h.inb(1), 0x04);
    assert_eq!((h.inb(4), h.inb(5)), (0x14, 0xeb), "with the signature");
    h.outb(7, 0xa1);
    let id = h.read_blocks(1);
    assert_eq!(word(&id, 0), 0x85c0);
    assert_eq!(ata_string(&id, 27, 47), "QEMU DVD-ROM");
    assert_eq!(ata_string(&id, 10, 20), "QM00001");

    // The other unit is empty: its registers read 0 and commands do nothing.
    h.select(1);
    assert_eq!(h.inb(7), 0);
    h.outb(7, 0xa1);
    assert!(!h.irq());

    // SRST: busy while held, the signature after.
    h.select(0);
    h.ide.io_write(CONTROL_PORTS[0], &[0x04]);
    assert_ne!(h.alt_status() & BSY, 0);
    h.ide.io_write(CONTROL_PORTS[0], &[0x00]);
    assert_eq!(h.alt_status(), 0, "a packet device reads 0 after reset");
    assert_eq!((h.inb(4), h.inb(5)), (0x14, 0xeb));
    assert_eq!(h.inb(1), 0x01, "diagnostics passed");
}

#[test]
fn atapi_reads_an_images_sectors_in_chunks_the_host_allows() {
    let iso = cd_image(16);
    let mut h = Host::new(&[drive(iso.path(), IdeMedia::Cdrom, 1, 0)]);
    h.bus = 1;
    h.select(0);
    h.packet(&[0x00], 0xfffe).expect("TEST UNIT READY");

    let inq = h.packet(&[0x12, 0, 0, 0, 36], 0xfffe).expect("INQUIRY");
    assert_eq!(inq.len(), 36);
    assert_eq!(inq[0], 5, "a CD/DVD device");
    assert_eq!(inq[1], 0x80, "removable");
    assert_eq!(&inq[8..16], b"QEMU    ");
    assert_eq!(&inq[16..28], b"QEMU DVD-ROM");
    let short = h.packet(&[0x12, 0, 0, 0, 5], 0xfffe).expect("INQUIRY");
    assert_eq!(short.len(), 5, "cut to the allocation length");

    let cap = h.packet(&[0x25], 0xfffe).expect("READ CAPACITY");
    assert_eq!(cap, [0, 0, 0, 15, 0, 0, 8, 0]);

    let expect = |lba: usize, n: usize| -> Vec<u8> {
        (lba * CD_SECTOR..(lba + n) * CD_SECTOR)
            .map(|i| cd_byte(i / CD_SECTOR, i % CD_SECTOR))
            .collect()
    };
    let data = h
        .packet(&[0x28, 0, 0, 0, 0, 3, 0, 0, 2], 0xfffe)
        .expect("READ(10)");
    assert_eq!(data, expect(3, 2));
    // A limit below a sector: chunks of it (rounded down to even).
    let data = h
        .packet(&[0xa8, 0, 0, 0, 0, 14, 0, 0, 0, 2], 1001)
        .expect("READ(12)");
    assert_eq!(data, expect(14, 2));
    let data = h
        .packet(&[0x28, 0, 0, 0, 0, 0, 0, 0, 16], 0xffff)
        .expect("READ(10) of the whole disc");
    assert_eq!(data, expect(0, 16));
    h.packet(&[0x28, 0, 0, 0, 0, 0, 0, 0, 0], 0xfffe)
        .expect("READ(10) of no sectors");

    // Past the end: CHECK CONDITION, ILLEGAL REQUEST, LBA out of range.
    let err = h
        .packet(&[0x28, 0, 0, 0, 0, 15, 0, 0, 2], 0xfffe)
        .unwrap_err();
    assert_eq!(err >> 4, 5);
    assert_eq!(h.sense(), (5, 0x21));
    assert_eq!(h.sense(), (0, 0), "REQUEST SENSE clears the sense");
    let err = h.packet(&[0xff], 0xfffe).unwrap_err();
    assert_eq!(err >> 4, 5, "an unknown command");
    assert_eq!(h.sense(), (5, 0x20));

    let toc = h
        .packet(&[0x43, 0, 0, 0, 0, 0, 0, 0, 100], 0xfffe)
        .expect("READ TOC");
    assert_eq!(&toc[..4], &[0, 18, 1, 1]);
    assert_eq!(&toc[4..12], &[0, 0x14, 1, 0, 0, 0, 0, 0], "track 1 at 0");
    assert_eq!(&toc[12..20], &[0, 0x16, 0xaa, 0, 0, 0, 0, 16], "lead-out");
    let toc = h
        .packet(&[0x43, 2, 0, 0, 0, 0, 0, 0, 100], 0xfffe)
        .expect("READ TOC, MSF");
    assert_eq!(&toc[8..12], &[0, 0, 2, 0]);
    let mode = h
        .packet(&[0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 100], 0xfffe)
        .expect("MODE SENSE(10)");
    assert_eq!(usize::from(mode[1]) + 2, mode.len());
    assert_eq!(mode[8], 0x2a);
    let err = h
        .packet(&[0x5a, 0, 0x05, 0, 0, 0, 0, 0, 100], 0xfffe)
        .unwrap_err();
    assert_eq!(err >> 4, 5, "an unknown mode page");
    let conf = h
        .packet(&[0x46, 0, 0, 0, 0, 0, 0, 0, 100], 0xfffe)
        .expect("GET CONFIGURATION");
    assert_eq!(&conf[6..8], &[0, 8], "current profile: CD-ROM");
    let ev = h
        .packet(&[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8], 0xfffe)
        .expect("GET EVENT STATUS NOTIFICATION");
    assert_eq!(ev, [0, 6, 4, 0x10, 0, 2, 0, 0]);
    let err = h
        .packet(&[0x4a, 0, 0, 0, 0x10, 0, 0, 0, 8], 0xfffe)
        .unwrap_err();
    assert_eq!(err >> 4, 5, "asynchronous event status is refused");
    h.packet(&[0x1e, 0, 0, 0, 1], 0xfffe)
        .expect("PREVENT MEDIUM REMOVAL");
    h.packet(&[0x1b, 0, 0, 0, 1], 0xfffe)
        .expect("START STOP UNIT");

    // Interrupts off (nIEN): the work goes on, the line stays low.
    h.ide.io_write(CONTROL_PORTS[1], &[0x02]);
    h.outb(7, 0xa1);
    assert!(!h.irq());
    assert_ne!(h.alt_status() & DRQ, 0);
}

#[test]
fn ata_reads_and_writes_a_disk_by_lba28_and_lba48() {
    let img = make_image(64 * 512, |i| (i / 512) as u8 ^ (i % 251) as u8);
    let mut h = Host::new(&[drive(img.path(), IdeMedia::Disk, 0, 1)]);
    h.select(1);
    assert_eq!((h.inb(4), h.inb(5)), (0, 0), "no ATAPI signature");
    assert_eq!(h.inb(7) & DRDY, DRDY);
    h.outb(7, 0xec);
    let id = h.read_blocks(1);
    assert_eq!(word(&id, 60), 64);
    assert_eq!(word(&id, 100), 64);
    assert_ne!(word(&id, 83) & (1 << 10), 0, "LBA48");
    assert_eq!(ata_string(&id, 27, 47), "QEMU HARDDISK");

    let original = std::fs::read(img.path()).unwrap();
    h.ata28(0x20, 5, 3);
    assert_eq!(h.read_blocks(3), original[5 * 512..8 * 512]);
    h.ata48(0x24, 62, 2);
    assert_eq!(h.read_blocks(2), original[62 * 512..64 * 512]);
    assert_eq!(h.inb(3), 63, "the task file holds the last sector read");

    let new: Vec<u8> = (0..1024).map(|i| (i * 13) as u8).collect();
    h.ata48(0x34, 10, 2);
    for block in new.chunks(512) {
        assert_eq!(h.alt_status() & (DRQ | BSY), DRQ, "the drive asks for data");
        assert!(!h.irq());
        h.write_data(block);
        let st = h.interrupt();
        assert_eq!(st & ERR, 0);
    }
    assert_eq!(h.alt_status() & DRQ, 0, "the write ended");
    h.outb(7, 0xe7);
    assert_eq!(h.interrupt() & ERR, 0, "FLUSH CACHE");
    let on_disk = std::fs::read(img.path()).unwrap();
    assert_eq!(on_disk[10 * 512..12 * 512], new[..]);
    assert_eq!(on_disk[..10 * 512], original[..10 * 512]);

    // Past the end, and an unknown command: ABRT.
    h.ata28(0x20, 63, 2);
    assert_eq!(h.interrupt() & ERR, ERR);
    assert_eq!(h.inb(1), 0x04);
    h.outb(7, 0xc8);
    assert_eq!(h.interrupt() & ERR, ERR, "no DMA");
    h.outb(1, 0x03);
    h.outb(7, 0xef);
    assert_eq!(h.interrupt() & ERR, 0, "SET FEATURES transfer mode");
}

#[test]
fn a_pio_transfer_survives_a_state_round_trip() {
    let iso = cd_image(8);
    let img = make_image(16 * 512, |_| 0);
    let drives = [
        drive(iso.path(), IdeMedia::Cdrom, 1, 1),
        drive(img.path(), IdeMedia::Disk, 0, 0),
    ];
    let mut h = Host::new(&drives);

    // A CD read stopped inside its second chunk.
    h.bus = 1;
    h.select(1);
    h.outb(4, 0);
    h.outb(5, 8);
    h.outb(7, 0xa0);
    h.write_data(&[0x28, 0, 0, 0, 0, 2, 0, 0, 3, 0, 0, 0]);
    h.interrupt();
    let mut data = h.read_data(2048);
    h.interrupt();
    data.extend(h.read_data(100));
    // And an ATA write inside its first sector.
    h.bus = 0;
    h.select(0);
    h.ata28(0x30, 4, 2);
    h.write_data(&[0xab; 300]);
    let state = h.ide.state();
    let bytes = serde_json::to_vec(&state).unwrap();
    let state: IdeState = serde_json::from_slice(&bytes).unwrap();
    drop(h);

    let lines = Arc::new(Lines::default());
    let mut ide = Piix3::new(&drives, false, lines.clone()).unwrap();
    ide.restore(&state).expect("restore");
    assert!(
        ide.block(0, 0).unwrap().locked(),
        "the restore took the locks"
    );
    assert_eq!(ide.state(), state);
    let mut h = Host {
        ide,
        lines,
        bus: 1,
        unit: 1,
    };
    data.extend(h.read_data(2048 - 100));
    h.interrupt();
    data.extend(h.read_data(2048));
    assert_eq!(h.interrupt() & (ERR | DRQ), 0);
    assert_eq!(h.inb(2) & 3, 3);
    let expect: Vec<u8> = (2 * CD_SECTOR..5 * CD_SECTOR)
        .map(|i| cd_byte(i / CD_SECTOR, i % CD_SECTOR))
        .collect();
    assert_eq!(data, expect);

    h.bus = 0;
    h.write_data(&[0xab; 212]);
    h.interrupt();
    h.write_data(&[0xcd; 512]);
    assert_eq!(h.interrupt() & ERR, 0);
    let disk = std::fs::read(img.path()).unwrap();
    assert!(disk[4 * 512..5 * 512].iter().all(|&b| b == 0xab));
    assert!(disk[5 * 512..6 * 512].iter().all(|&b| b == 0xcd));
}

#[test]
fn a_hostile_state_is_refused_and_changes_nothing() {
    let iso = cd_image(8);
    let drives = [drive(iso.path(), IdeMedia::Cdrom, 0, 0)];
    let mut h = Host::new(&drives);
    h.packet(&[0x12, 0, 0, 0, 36], 0xfffe).unwrap();
    let good = h.ide.state();
    let mut target = Piix3::new(&drives, false, Arc::new(Lines::default())).unwrap();
    let before = target.state();

    let mut cases: Vec<(&str, IdeState)> = Vec::new();
    let mut s = good.clone();
    cd(&mut s).pos = 13;
    cases.push(("position past the buffer", s));
    let mut s = good.clone();
    cd(&mut s).transfer = Transfer::AtaWrite { lba: 0, left: 1 };
    cd(&mut s).buffer = vec![0; 512];
    cases.push(("an ATA write on a CD-ROM", s));
    let mut s = good.clone();
    cd(&mut s).transfer = Transfer::AtapiIn {
        lba: 7,
        sectors: 2,
        pending: Vec::new(),
        limit: 2048,
    };
    cases.push(("a read past the disc", s));
    let mut s = good.clone();
    cd(&mut s).transfer = Transfer::AtapiIn {
        lba: 0,
        sectors: 0,
        pending: vec![0; 1 << 20],
        limit: 2048,
    };
    cases.push(("a huge pending reply", s));
    let mut s = good.clone();
    cd(&mut s).buffer = vec![0; 12];
    cases.push(("a buffer without a transfer", s));
    let mut s = good.clone();
    s.channels[1].drives[1] = Some(DriveState::default());
    cases.push(("a drive this VM lacks", s));
    let mut s = good.clone();
    s.channels[0].drives[0] = None;
    cases.push(("no state for a drive", s));
    let mut s = good.clone();
    s.channels.push(s.channels[0].clone());
    cases.push(("three channels", s));
    let mut s = good.clone();
    s.channels[0].unit = 2;
    cases.push(("unit 2", s));
    let mut s = good.clone();
    s.ide_config[0] = 0x7111_8086;
    cases.push(("another PCI device", s));
    for (what, s) in cases {
        assert!(target.restore(&s).is_err(), "{what} was accepted");
        assert_eq!(target.state(), before, "{what} changed the controller");
    }
    target.restore(&good).expect("the good state");
}

#[test]
fn a_cdrom_image_is_opened_read_only_and_shared_with_readers() {
    let iso = cd_image(4);
    let cd = drive(iso.path(), IdeMedia::Cdrom, 0, 0);
    let a = Host::new(std::slice::from_ref(&cd));
    let b = Host::new(&[drive(iso.path(), IdeMedia::Cdrom, 1, 1)]);
    for block in [a.ide.block(0, 0), b.ide.block(1, 1)] {
        let block = block.expect("a drive");
        assert!(block.locked());
        assert!(block.config().read_only, "a CD-ROM is read-only");
    }
    let err = Piix3::new(
        &[drive(iso.path(), IdeMedia::Disk, 0, 0)],
        true,
        Arc::new(Lines::default()),
    )
    .unwrap_err();
    assert!(
        matches!(&err, IdeError::Drive(d) if matches!(d.source, DiskError::InUse { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("in use"), "{err}");
    // Inactive (a migration's destination): opened, but no locks yet.
    let inactive =
        Piix3::new(std::slice::from_ref(&cd), false, Arc::new(Lines::default())).unwrap();
    assert!(!inactive.block(0, 0).unwrap().locked());
}

#[test]
fn positions_are_checked_and_named_in_the_shape() {
    let iso = cd_image(4);
    let img = make_image(8 * 512, |_| 0);
    let err = Piix3::new(
        &[drive(iso.path(), IdeMedia::Cdrom, 2, 0)],
        false,
        Arc::new(Lines::default()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("bus 2 unit 0"), "{err}");
    let err = Piix3::new(
        &[
            drive(iso.path(), IdeMedia::Cdrom, 0, 1),
            drive(img.path(), IdeMedia::Disk, 0, 1),
        ],
        false,
        Arc::new(Lines::default()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("both at IDE bus 0 unit 1"), "{err}");
    let ide = Piix3::new(
        &[
            drive(img.path(), IdeMedia::Disk, 0, 0),
            drive(iso.path(), IdeMedia::Cdrom, 1, 0),
        ],
        false,
        Arc::new(Lines::default()),
    )
    .unwrap();
    assert_eq!(
        ide.shape_names(),
        ["piix3-ide@01.1", "ide-hd@0.0:8s-rw", "ide-cd@1.0:16s-ro"]
    );
    assert_eq!(ide.config(0).unwrap().read(0), 0x7000_8086);
    assert_eq!(ide.config(0).unwrap().byte(0x0e), 0x80, "multi-function");
    assert_eq!(ide.config(1).unwrap().read(0), 0x7010_8086);
    assert_eq!(ide.config(1).unwrap().read(2) >> 8, 0x01_01_80);
}

/// A VM with IDE drives: the PIIX3's functions answer config cycles in slot
/// 1, its drives are part of the shape (a destination with other drives is
/// refused by name), and its state goes through `capture_devices` and
/// `restore_state` with the rest, in the middle of a transfer.
#[test]
fn a_vm_carries_its_ide_drives_in_shape_and_state() {
    use crate::devices::pci::{CONFIG_ADDRESS, CONFIG_DATA};
    use crate::devices::serial::SinkSpec;
    use crate::vm::{Vm, VmConfig};

    let iso = cd_image(4);
    let cd = drive(iso.path(), IdeMedia::Cdrom, 1, 0);
    let config = |ide: Vec<IdeDriveConfig>| VmConfig {
        mem_bytes: 16 << 20,
        vcpus: 1,
        backing: ferry_kvm::Backing::Anonymous,
        serial: SinkSpec::Null,
        cpu: crate::cpu::model::CpuModel::Host,
        virtio: Vec::new(),
        ide,
        fw_cfg: None,
        firmware: None,
        rtc: None,
    };
    let vm = Vm::create(config(vec![cd.clone()])).expect("a VM with a CD-ROM");
    let bus = vm.pci().clone();
    let cfg_read = |function: u32, reg: u32| {
        let addr = 0x8000_0000u32 | (u32::from(PIIX3_SLOT) << 11) | (function << 8) | (reg << 2);
        bus.io_write(CONFIG_ADDRESS, &addr.to_le_bytes());
        let mut v = [0u8; 4];
        bus.io_read(CONFIG_DATA, &mut v);
        u32::from_le_bytes(v)
    };
    assert_eq!(cfg_read(0, 0), 0x7000_8086);
    assert_eq!(cfg_read(1, 0), 0x7010_8086);
    assert_eq!(cfg_read(2, 0), 0xffff_ffff, "no function 2");

    // Half a sector read through the ports, then the state is taken.
    let ide = vm.pci().ide().expect("the PIIX3").clone();
    let io = |port: u16, v: u8| ide.lock().unwrap().io_write(port, &[v]);
    for (reg, v) in [(6, 0xa0), (1, 0), (4, 0), (5, 8), (7, 0xa0)] {
        io(0x170 + reg, v);
    }
    for b in [0x28u8, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0] {
        io(0x170, b);
    }
    let mut first = vec![0u8; 1000];
    ide.lock().unwrap().io_read(0x170, &mut first);
    let saved = vm.capture_devices().unwrap();
    assert!(saved.ide.is_some());

    let names = vm.shape().devices;
    assert!(
        names.contains(&"ide-cd@1.0:16s-ro".to_string()),
        "{names:?}"
    );
    let other = drive(iso.path(), IdeMedia::Cdrom, 0, 0);
    let err = Vm::create_for_shape(
        &vm.shape(),
        crate::vm::HostDevices {
            backing: ferry_kvm::Backing::Anonymous,
            serial: SinkSpec::Null,
            virtio: Vec::new(),
            ide: vec![other],
            fw_cfg: None,
            firmware: None,
            rtc: None,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("ide-cd@0.0:16s-ro"), "{err}");
    let err = Vm::create_for_shape(
        &vm.shape(),
        crate::vm::HostDevices {
            backing: ferry_kvm::Backing::Anonymous,
            serial: SinkSpec::Null,
            virtio: Vec::new(),
            ide: Vec::new(),
            fw_cfg: None,
            firmware: None,
            rtc: None,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("piix3-ide@01.1"), "{err}");

    let mut dest = Vm::create_for_shape(
        &vm.shape(),
        crate::vm::HostDevices {
            backing: ferry_kvm::Backing::Anonymous,
            serial: SinkSpec::Null,
            virtio: Vec::new(),
            ide: vec![cd.clone()],
            fw_cfg: None,
            firmware: None,
            rtc: None,
        },
    )
    .expect("the same drives");
    let mut no_ide = saved.clone();
    no_ide.ide = None;
    let vmstate = dest.capture_vm().unwrap();
    let vcpus = dest.capture_vcpus().unwrap();
    let err = dest
        .restore_state(dest.capture_vcpus().unwrap(), &vmstate, &no_ide)
        .unwrap_err();
    assert!(err.to_string().contains("IDE"), "{err}");
    dest.restore_state(vcpus, &vmstate, &saved)
        .expect("restore");
    let ide = dest.pci().ide().unwrap().clone();
    let mut rest = vec![0u8; 1048];
    ide.lock().unwrap().io_read(0x170, &mut rest);
    first.extend(rest);
    let expect: Vec<u8> = (0..CD_SECTOR).map(|i| cd_byte(1, i)).collect();
    assert_eq!(first, expect);
    let mut st = [0u8];
    ide.lock().unwrap().io_read(0x177, &mut st);
    assert_eq!(st[0] & (DRQ | ERR), 0, "the read ended");

    // A virtio device may not take the PIIX3's slot.
    let mut clash = config(vec![cd]);
    clash.virtio.push(crate::vm::VirtioSpec {
        slot: PIIX3_SLOT,
        id: "balloon0".into(),
        device: crate::vm::VirtioDeviceSpec::Balloon(Default::default()),
    });
    let err = Vm::create(clash).unwrap_err().to_string();
    assert!(err.contains("PIIX3"), "{err}");
}
