//! virtio-blk on a raw image file, a block device or a qcow2 chain
//! ([`crate::devices::disk_image`]) (virtio 1.1 section 5.2): read, write,
//! flush and get-ID, with the write cache the driver negotiates
//! (VIRTIO_BLK_F_FLUSH: writes land in the host page cache and a flush makes them
//! durable; without it every write is synced before it completes).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::PathBuf;

use ferry_kvm::memory::GuestMemory;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::{QueueError, VirtioDevice, F_VERSION_1};
pub use crate::devices::disk_image::{Backing, ImageFormat, Layer};
use crate::devices::disk_image::{DiskImage, DiskImageError, Mode};
use crate::devices::image_lock::ImageLockError;
use crate::devices::SharedFd;

const SECTOR: u64 = 512;

/// A disk (virtio-blk, an IDE drive) that could not open, lock, flush or let
/// go of its image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk serial {serial:?} is longer than {ID_BYTES} bytes")]
    SerialTooLong { serial: String },
    /// Opening the image (or its qcow2 chain) failed; the image layer's text.
    #[error(transparent)]
    Open(#[from] DiskImageError),
    #[error("disk image {image} holds {bytes} bytes; a disk needs at least one 512-byte sector")]
    TooSmall { image: String, bytes: u64 },
    #[error("CD-ROM image {image} is shorter than one 2048-byte sector")]
    CdromTooSmall { image: String },
    #[error("disk image {image} changed size ({before} to {after} sectors)")]
    Resized {
        image: String,
        before: u64,
        after: u64,
    },
    #[error("disk image {image} changed size during the migration ({before} to {after} sectors)")]
    ResizedInMigration {
        image: String,
        before: u64,
        after: u64,
    },
    /// Another VM (or QEMU) holds a conflicting lock. The lock error is part
    /// of the text, before the advice, so it is not a `source`.
    #[error(
        "disk image {image} is in use: {conflict}; is another VM using it? Stop it, or share \
         the disk: read-only in both (readonly=on, <readonly/>) or writable by both \
         (share-rw=on, <shareable/>)"
    )]
    InUse {
        image: String,
        conflict: ImageLockError,
    },
    /// The file system refused the byte-range lock (its text and its `io`
    /// cause are part of the message, before the advice).
    #[error(
        "cannot lock disk image {image}: {lock}: {} (its file system needs byte-range locks)",
        std::error::Error::source(lock).map(ToString::to_string).unwrap_or_default()
    )]
    Lock { image: String, lock: ImageLockError },
    #[error("cannot flush {image}: {source}")]
    Flush {
        image: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot unlock disk image {image}: {source}")]
    Unlock {
        image: String,
        #[source]
        source: DiskImageError,
    },
}

/// The disk of device `id` (`-device ...,id=`, an IDE drive's id) failed.
#[derive(Debug, thiserror::Error)]
#[error("{id}: {source}")]
pub struct DeviceDiskError {
    pub id: String,
    #[source]
    pub source: DiskError,
}

impl DiskError {
    /// This error, of the disk of device `id`.
    pub fn of(self, id: &str) -> DeviceDiskError {
        DeviceDiskError {
            id: id.to_string(),
            source: self,
        }
    }
}

/// What a lock failure tells the operator.
fn lock_error(e: DiskImageError) -> DiskError {
    match e {
        DiskImageError::Lock {
            image,
            source: conflict @ ImageLockError::Conflict { .. },
        } => DiskError::InUse { image, conflict },
        DiskImageError::Lock {
            image,
            source: lock @ ImageLockError::Fcntl { .. },
        } => DiskError::Lock { image, lock },
        e => DiskError::Open(e),
    }
}
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Entries per queue.
const QUEUE_SIZE: u16 = 256;
/// Largest request accepted (bytes of data).
const MAX_REQUEST: usize = 4 << 20;
/// Length of the serial returned by GET_ID.
const ID_BYTES: usize = 20;

/// How to build a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    pub image: BlockImage,
    /// Raw, or qcow2 with its backing chain.
    pub format: ImageFormat,
    pub read_only: bool,
    /// Up to 20 bytes returned by GET_ID (`/dev/disk/by-id/virtio-<serial>`).
    pub serial: Option<String>,
    /// Other VMs may write the image meanwhile (QEMU's `share-rw=on`,
    /// libvirt's `<shareable/>`): the image lock shares writing.
    pub shared: bool,
    /// Take QEMU-compatible image locks ([`image_lock`]); off only where
    /// asked (`locking=off`).
    pub locking: bool,
}

impl BlockConfig {
    /// A disk on `image`: writable, not shared, locked.
    pub fn new(image: BlockImage) -> Self {
        Self {
            image,
            format: ImageFormat::Raw,
            read_only: false,
            serial: None,
            shared: false,
            locking: true,
        }
    }
}

/// A disk's image file or block device (one layer of a chain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockImage {
    /// Opened by path.
    Path(PathBuf),
    /// Handed to this process open (libvirt's `-add-fd`): used through
    /// duplicates, never reopened. `name` is what errors call it
    /// (`/dev/fdset/3`).
    Fd { fd: SharedFd, name: String },
}

impl BlockImage {
    /// The image opened for reading, and for writing unless `read_only`; a
    /// passed image must have been opened that way.
    pub fn open(&self, read_only: bool) -> io::Result<File> {
        match self {
            Self::Path(p) => OpenOptions::new().read(true).write(!read_only).open(p),
            Self::Fd { fd, .. } => {
                let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
                let mode = OFlag::from_bits_truncate(flags) & OFlag::O_ACCMODE;
                let fits = mode == OFlag::O_RDWR || (read_only && mode == OFlag::O_RDONLY);
                if !fits {
                    let how = if mode == OFlag::O_RDONLY {
                        "for reading only"
                    } else {
                        "for writing only"
                    };
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("it was passed open {how}"),
                    ));
                }
                fd.dup()
            }
        }
    }
}

impl std::fmt::Display for BlockImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Path(p) => write!(f, "{}", p.display()),
            Self::Fd { name, .. } => f.write_str(name),
        }
    }
}

/// Request counters of one disk (QEMU's `query-blockstats` names).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockStats {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    pub failed_rd_operations: u64,
    pub failed_wr_operations: u64,
    pub failed_flush_operations: u64,
    /// Requests refused as malformed or unsupported (out of range, bad type).
    pub invalid_operations: u64,
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Block {
    config: BlockConfig,
    image: DiskImage,
    /// Capacity in 512-byte sectors.
    sectors: u64,
    stats: BlockStats,
}

impl Block {
    /// Opens the image and takes its locks; errors name the file and what to
    /// do.
    pub fn open(config: &BlockConfig) -> Result<Self, DiskError> {
        let mut block = Self::open_as(config, Mode::Active)?;
        block.activate_image()?;
        Ok(block)
    }

    /// Opens the image without taking its locks or writing to it, as the
    /// destination of a migration does while the source still runs on it:
    /// the locks come when the migrated state is loaded
    /// ([`VirtioDevice::after_restore`]).
    pub fn open_inactive(config: &BlockConfig) -> Result<Self, DiskError> {
        Self::open_as(config, Mode::Inactive)
    }

    /// Opens the image in `mode`, taking no locks: [`Block::activate_image`]
    /// takes them (and opens an inactive image again, to write).
    pub(crate) fn open_as(config: &BlockConfig, mode: Mode) -> Result<Self, DiskError> {
        if config.serial.as_ref().is_some_and(|s| s.len() > ID_BYTES) {
            return Err(DiskError::SerialTooLong {
                serial: config.serial.clone().unwrap_or_default(),
            });
        }
        let image = DiskImage::open(config, mode)?;
        let bytes = image.size();
        if bytes < SECTOR {
            return Err(DiskError::TooSmall {
                image: config.image.to_string(),
                bytes,
            });
        }
        Ok(Self {
            config: config.clone(),
            image,
            sectors: bytes / SECTOR,
            stats: BlockStats::default(),
        })
    }

    /// Makes the image the running disk: opened to write (a qcow2 chain is
    /// read again from the files) and locked. A no-op when it is.
    fn activate_image(&mut self) -> Result<(), DiskError> {
        if self.image.mode() == Mode::Inactive {
            let image = DiskImage::open(&self.config, Mode::Active)?;
            if image.size() / SECTOR != self.sectors {
                return Err(DiskError::Resized {
                    image: self.config.image.to_string(),
                    before: self.sectors,
                    after: image.size() / SECTOR,
                });
            }
            self.image = image;
        }
        if self.config.locking {
            self.image.lock().map_err(lock_error)?;
        }
        Ok(())
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// How the disk was configured.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Fills `buf` from byte `offset` of the disk: the way in for the other
    /// front-ends on a disk (IDE), which share its image handling.
    pub(crate) fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let done = self.image.read_at(buf, offset);
        match done {
            Ok(()) => {
                self.stats.rd_operations += 1;
                self.stats.rd_bytes += buf.len() as u64;
            }
            Err(_) => self.stats.failed_rd_operations += 1,
        }
        done
    }

    /// Writes `buf` at byte `offset` of the disk (refused on a read-only
    /// one); see [`Self::read_at`].
    pub(crate) fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.config.read_only {
            self.stats.invalid_operations += 1;
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the disk is read-only",
            ));
        }
        let done = self.image.write_at(buf, offset);
        match done {
            Ok(()) => {
                self.stats.wr_operations += 1;
                self.stats.wr_bytes += buf.len() as u64;
            }
            Err(_) => self.stats.failed_wr_operations += 1,
        }
        done
    }

    /// Makes what was written durable (a guest's FLUSH CACHE).
    pub(crate) fn flush_image(&mut self) -> io::Result<()> {
        let done = self.image.flush();
        match done {
            Ok(()) => self.stats.flush_operations += 1,
            Err(_) => self.stats.failed_flush_operations += 1,
        }
        done
    }

    /// Whether the image's locks are held.
    pub fn locked(&self) -> bool {
        self.image.locked()
    }

    fn config_bytes(&self) -> [u8; 0x40] {
        let mut c = [0u8; 0x40];
        c[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        // size_max (8) stays 0: no limit per segment.
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        c
    }

    /// Runs one request; returns the status byte and the data bytes written to
    /// the guest. `Err` when the chain cannot carry a status at all.
    fn execute(
        &mut self,
        reader: &mut impl Read,
        readable: usize,
        data_out: &mut Vec<u8>,
        writable: usize,
        driver_features: u64,
    ) -> Result<u8, QueueError> {
        let mut header = [0u8; 16];
        if readable < header.len() {
            return Err(QueueError::ShortHeader { readable });
        }
        if writable == 0 {
            return Err(QueueError::NoStatus);
        }
        reader
            .read_exact(&mut header)
            .map_err(QueueError::ReadHeader)?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let in_range = |len: usize| {
            (len as u64) % SECTOR == 0
                && len <= MAX_REQUEST
                && sector
                    .checked_add(len as u64 / SECTOR)
                    .is_some_and(|end| end <= self.sectors)
        };
        Ok(match kind {
            T_IN => {
                let len = writable - 1;
                if !in_range(len) {
                    self.stats.invalid_operations += 1;
                    return Ok(S_IOERR);
                }
                data_out.resize(len, 0);
                match self.read_at(data_out, sector * SECTOR) {
                    Ok(()) => S_OK,
                    Err(e) => {
                        tracing::warn!("virtio-blk: read of {len} bytes at sector {sector}: {e}");
                        data_out.clear();
                        S_IOERR
                    }
                }
            }
            T_OUT => {
                // The length is the guest's claim (up to 256 descriptors of 4 GiB
                // each): checked against the limit before anything is allocated.
                let len = readable - header.len();
                if self.config.read_only || !in_range(len) {
                    self.stats.invalid_operations += 1;
                    return Ok(S_IOERR);
                }
                let mut data = vec![0u8; len];
                if reader.read_exact(&mut data).is_err() {
                    self.stats.invalid_operations += 1;
                    return Ok(S_IOERR);
                }
                let written = self.image.write_at(&data, sector * SECTOR).and_then(|()| {
                    if driver_features & F_FLUSH == 0 {
                        self.image.flush()
                    } else {
                        Ok(())
                    }
                });
                match written {
                    Ok(()) => {
                        self.stats.wr_operations += 1;
                        self.stats.wr_bytes += len as u64;
                        S_OK
                    }
                    Err(e) => {
                        tracing::warn!("virtio-blk: write of {len} bytes at sector {sector}: {e}");
                        self.stats.failed_wr_operations += 1;
                        S_IOERR
                    }
                }
            }
            T_FLUSH => match self.flush_image() {
                Ok(()) => S_OK,
                Err(e) => {
                    tracing::warn!("virtio-blk: flush: {e}");
                    S_IOERR
                }
            },
            T_GET_ID => {
                let mut id = [0u8; ID_BYTES];
                if let Some(s) = &self.config.serial {
                    id[..s.len()].copy_from_slice(s.as_bytes());
                }
                let len = (writable - 1).min(ID_BYTES);
                data_out.extend_from_slice(&id[..len]);
                S_OK
            }
            _ => {
                self.stats.invalid_operations += 1;
                S_UNSUPP
            }
        })
    }
}

impl VirtioDevice for Block {
    fn kind(&self) -> &'static str {
        "virtio-blk"
    }

    fn device_id(&self) -> u16 {
        2
    }

    fn pci_class(&self) -> u32 {
        // Mass storage, SCSI (what QEMU's virtio-blk-pci reports).
        0x01_00_00
    }

    fn features(&self) -> u64 {
        let ro = if self.config.read_only { F_RO } else { 0 };
        F_VERSION_1 | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | ro
    }

    fn queue_count(&self) -> usize {
        1
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(offset + i).copied().unwrap_or(0);
        }
    }

    fn process(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
        driver_features: u64,
    ) -> Result<bool, QueueError> {
        let queue = queues.get_mut(index).ok_or(QueueError::NoQueue { index })?;
        let chains: Vec<_> = queue.iter(mem).map_err(QueueError::AvailRing)?.collect();
        let mut used = false;
        let mut data = Vec::new();
        for chain in chains {
            let head = chain.head_index();
            let mut reader = chain
                .clone()
                .reader(mem)
                .map_err(|e| QueueError::buffer("request", head, e))?;
            let mut writer = chain
                .writer(mem)
                .map_err(|e| QueueError::buffer("request", head, e))?;
            let (readable, writable) = (reader.available_bytes(), writer.available_bytes());
            data.clear();
            let status =
                self.execute(&mut reader, readable, &mut data, writable, driver_features)?;
            let mut status_part = writer
                .split_at(writable - 1)
                .map_err(|e| QueueError::buffer("request", head, e))?;
            let mut written = 0;
            if !data.is_empty() {
                writer
                    .write_all(&data)
                    .map_err(|e| QueueError::buffer("request", head, e))?;
                written = data.len();
            }
            status_part
                .write_all(&[status])
                .map_err(|e| QueueError::buffer("request", head, e))?;
            queue
                .add_used(mem, head, (written + 1) as u32)
                .map_err(QueueError::UsedRing)?;
            used = true;
        }
        Ok(used)
    }

    /// Opens the image again: the source flushed its last writes after this side
    /// first opened it, and a new open is what makes NFS-style shared storage
    /// (close-to-open consistency) show them, and a qcow2 chain's metadata the
    /// source wrote. A passed image ([`BlockImage::Fd`]) has no path to open
    /// again: it is duplicated. Here the disk takes its image locks: the source
    /// let go of them once it had flushed, before it sent the state this load
    /// comes from.
    fn after_restore(&mut self) -> Result<(), DiskError> {
        // A disk that held its locks (restored over a VM that was created
        // active) lets go first, and stops writing: the new open file would
        // conflict with its locks, and must read what it wrote.
        self.deactivate()?;
        let mut again = Self::open_as(&self.config, Mode::Active)?;
        if again.sectors != self.sectors {
            return Err(DiskError::ResizedInMigration {
                image: self.config.image.to_string(),
                before: self.sectors,
                after: again.sectors,
            });
        }
        again.activate_image()?;
        again.stats = self.stats;
        *self = again;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        self.image.flush().map_err(|source| DiskError::Flush {
            image: self.config.image.to_string(),
            source,
        })
    }

    fn activate(&mut self) -> Result<(), DiskError> {
        self.activate_image()
    }

    /// Lets go of the image locks, and stops writing: a qcow2 chain is opened
    /// again read-only, so no cached metadata can reach the files once the
    /// destination owns them. The caller flushed first.
    fn deactivate(&mut self) -> Result<(), DiskError> {
        self.image.unlock().map_err(|source| DiskError::Unlock {
            image: self.config.image.to_string(),
            source,
        })?;
        if self.image.mode() == Mode::Active {
            self.flush()?;
            self.image = DiskImage::open(&self.config, Mode::Inactive)?;
        }
        Ok(())
    }

    fn stats(&self) -> super::DeviceStats {
        super::DeviceStats::Block(self.stats)
    }

    fn identity(&self) -> String {
        format!(
            "{}s-{}",
            self.sectors,
            if self.config.read_only { "ro" } else { "rw" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write request whose descriptors claim the most a 256-entry chain can
    /// (256 buffers of 4 GiB - 1) is refused before its data is allocated: the
    /// allocation alone used to abort the VMM.
    #[test]
    fn a_write_claiming_a_huge_length_is_refused_before_allocating() {
        let img = tempfile::NamedTempFile::new().expect("temp image");
        img.as_file().set_len(64 * SECTOR).expect("size the image");
        let mut blk = Block::open(&BlockConfig::new(BlockImage::Path(
            img.path().to_path_buf(),
        )))
        .expect("open the image");
        let mut header = T_OUT.to_le_bytes().to_vec();
        header.extend_from_slice(&[0; 12]);
        let claimed = 256 * u32::MAX as usize;
        let mut data = Vec::new();
        let status = blk
            .execute(&mut header.as_slice(), claimed, &mut data, 1, F_FLUSH)
            .expect("the request carries a status");
        assert_eq!(status, S_IOERR);
        assert_eq!(blk.stats.invalid_operations, 1);
        assert!(data.is_empty());
    }
}
