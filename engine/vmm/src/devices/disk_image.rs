//! A disk's image as the guest sees it: a raw file or block device, or a
//! qcow2 image (v2 or v3) with its backing chain (qcow2 over a raw `_base`
//! image, qcow2 over qcow2), read and written through `imago`.
//!
//! An image is opened in one of two modes. [`Mode::Active`] is the running
//! disk: it writes as its configuration allows. [`Mode::Inactive`] is a disk
//! another process may be writing (a migration's destination before the
//! switch-over, or its source after it): the files are opened as the disk will
//! use them, so a missing or unwritable image is found early, but the qcow2
//! layers are read-only, so nothing (metadata included) is written. Going
//! from one mode to the other opens the chain again: what the other side
//! wrote (L2 tables, refcounts) is read fresh, never served from a cache.
//!
//! Every file of the chain can hold QEMU-compatible image locks
//! ([`super::image_lock`]): the top image as the disk uses it, backing images
//! as readers that let nobody write them, as QEMU locks them.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    format::gate::ImplicitOpenGate, DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder,
    StorageOpenOptions,
};

use super::image_lock::{self, ImageAccess, ImageLockError};
use super::virtio::blk::{BlockConfig, BlockImage};

/// Images in one chain at most (the top included): a chain that loops (an
/// image naming itself as its backing file, maybe through others) stops here.
pub const MAX_CHAIN: usize = 16;

/// The format of a disk image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ImageFormat {
    /// Raw: the file is the disk, byte for byte.
    #[default]
    Raw,
    /// qcow2 (version 2 or 3), with the backing image `backing` says.
    Qcow2 { backing: Backing },
}

impl ImageFormat {
    /// QEMU's name for the format (`query-block`'s `format`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 { .. } => "qcow2",
        }
    }
}

/// Where a qcow2 image's backing image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// As the image header names it (file, relative to the image's
    /// directory, and format): QEMU's `-drive` and a `-blockdev` without
    /// `backing`.
    FromHeader,
    /// No backing image, whatever the header says (libvirt's
    /// `"backing":null`): unallocated clusters read as zeroes.
    None,
    /// This image (libvirt's `"backing":"libvirt-2-format"`).
    Image(Box<Layer>),
}

/// One image of a backing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub image: BlockImage,
    pub format: ImageFormat,
}

/// How an image is opened (see the module's text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Active,
    Inactive,
}

/// Why an image could not be opened, read or locked.
#[derive(Debug, thiserror::Error)]
pub enum DiskImageError {
    #[error("cannot open disk image {image} {how}: {source}")]
    Open {
        image: String,
        how: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot size disk image {image}: {source}")]
    Size {
        image: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "disk image {image} is not a usable {format} image: {source} (check it with \
         `qemu-img check {image}`, and that the format given is the image's)"
    )]
    Format {
        image: String,
        format: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "the backing chain of disk image {image} is longer than {MAX_CHAIN} images: does it \
         loop? (`qemu-img info --backing-chain {image}` shows it)"
    )]
    ChainTooLong { image: String },
    #[error("disk image {image}: {source}")]
    Lock {
        image: String,
        #[source]
        source: ImageLockError,
    },
}

/// One file of an open chain: kept to lock it.
#[derive(Debug)]
struct ChainFile {
    name: String,
    /// A duplicate of what the format layer reads: the same open file
    /// description, so its locks are the image's.
    file: File,
    access: ImageAccess,
}

/// The guest-visible data of an open image.
enum Data {
    Raw(File),
    Qcow2(Box<FormatAccess<imago::file::File>>),
}

impl std::fmt::Debug for Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Raw(file) => f.debug_tuple("Raw").field(file).finish(),
            Self::Qcow2(_) => f.write_str("Qcow2"),
        }
    }
}

/// An open image with its chain.
#[derive(Debug)]
pub struct DiskImage {
    data: Data,
    /// Every file of the chain, top first.
    files: Vec<ChainFile>,
    /// Guest-visible size in bytes.
    size: u64,
    mode: Mode,
    locked: bool,
}

/// The access a backing image is locked with: read, and nobody writes it.
const BACKING_ACCESS: ImageAccess = ImageAccess {
    write: false,
    share_write: false,
};

impl DiskImage {
    /// Opens `config`'s image and its chain in `mode`; takes no locks.
    pub fn open(config: &BlockConfig, mode: Mode) -> Result<Self, DiskImageError> {
        let top_name = config.image.to_string();
        let access = ImageAccess {
            write: !config.read_only,
            share_write: config.shared,
        };
        let file = open_file(&config.image, config.read_only)?;
        let files = Rc::new(RefCell::new(vec![chain_file(&file, &top_name, access)?]));
        let (data, size) = match &config.format {
            ImageFormat::Raw => {
                let mut file = file;
                let size = file
                    .seek(SeekFrom::End(0))
                    .map_err(|source| DiskImageError::Size {
                        image: top_name.clone(),
                        source,
                    })?;
                (Data::Raw(file), size)
            }
            ImageFormat::Qcow2 { backing } => {
                let writable = mode == Mode::Active && !config.read_only;
                let chain = Chain {
                    files: Rc::clone(&files),
                    depth: 1,
                    top: top_name.clone(),
                };
                let access = chain.qcow2(file, &config.image, writable, backing)?;
                let size = access.size();
                (Data::Qcow2(Box::new(access)), size)
            }
        };
        let files = Rc::try_unwrap(files)
            .map(RefCell::into_inner)
            .unwrap_or_else(|rc| rc.borrow_mut().drain(..).collect());
        Ok(Self {
            data,
            files,
            size,
            mode,
            locked: false,
        })
    }

    /// Guest-visible size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The files of the chain, top first, as errors name them.
    pub fn chain(&self) -> impl Iterator<Item = &str> {
        self.files.iter().map(|f| f.name.as_str())
    }

    /// Fills `buf` from guest offset `offset` (unallocated qcow2 clusters
    /// read from the backing chain, or as zeroes).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.data {
            Data::Raw(f) => f.read_exact_at(buf, offset),
            Data::Qcow2(q) => q.read(buf, offset),
        }
    }

    /// Writes `buf` at guest offset `offset`; a qcow2 image allocates (and
    /// copies from its backing image) what it must.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.data {
            Data::Raw(f) => f.write_all_at(buf, offset),
            Data::Qcow2(q) => q.write(buf, offset),
        }
    }

    /// Makes every completed write durable: qcow2's cached metadata is
    /// written, then the files are synced.
    pub fn flush(&self) -> io::Result<()> {
        match &self.data {
            Data::Raw(f) => f.sync_data(),
            Data::Qcow2(q) => {
                q.flush()?;
                q.sync()
            }
        }
    }

    /// Takes every file's locks (a no-op when held).
    pub fn lock(&mut self) -> Result<(), DiskImageError> {
        if self.locked {
            return Ok(());
        }
        for (i, f) in self.files.iter().enumerate() {
            if let Err(source) = image_lock::lock(&f.file, f.access) {
                for taken in &self.files[..i] {
                    let _ = image_lock::unlock(&taken.file);
                }
                return Err(DiskImageError::Lock {
                    image: f.name.clone(),
                    source,
                });
            }
        }
        self.locked = true;
        Ok(())
    }

    /// Lets go of every file's locks.
    pub fn unlock(&mut self) -> Result<(), DiskImageError> {
        if !self.locked {
            return Ok(());
        }
        for f in &self.files {
            image_lock::unlock(&f.file).map_err(|source| DiskImageError::Lock {
                image: f.name.clone(),
                source,
            })?;
        }
        self.locked = false;
        Ok(())
    }

    pub fn locked(&self) -> bool {
        self.locked
    }
}

impl Drop for DiskImage {
    /// A passed image's open file outlives this disk (the process keeps the
    /// descriptor libvirt gave it), and so would its locks.
    fn drop(&mut self) {
        let _ = self.unlock();
    }
}

/// `image` opened for reading, and for writing unless `read_only`.
fn open_file(image: &BlockImage, read_only: bool) -> Result<File, DiskImageError> {
    image
        .open(read_only)
        .map_err(|source| DiskImageError::Open {
            image: image.to_string(),
            how: if read_only {
                "for reading"
            } else {
                "for reading and writing (mark it read-only if it must not change)"
            },
            source,
        })
}

fn chain_file(file: &File, name: &str, access: ImageAccess) -> Result<ChainFile, DiskImageError> {
    Ok(ChainFile {
        name: name.to_string(),
        file: file.try_clone().map_err(|source| DiskImageError::Open {
            image: name.to_string(),
            how: "again",
            source,
        })?,
        access,
    })
}

/// Opens the images of one chain, keeping every file it opens.
#[derive(Clone)]
struct Chain {
    files: Rc<RefCell<Vec<ChainFile>>>,
    /// Images opened so far on the way down, this one included.
    depth: usize,
    /// The top image, which errors name.
    top: String,
}

impl Chain {
    fn deeper(&self) -> Result<Self, DiskImageError> {
        if self.depth >= MAX_CHAIN {
            return Err(DiskImageError::ChainTooLong {
                image: self.top.clone(),
            });
        }
        Ok(Self {
            depth: self.depth + 1,
            ..self.clone()
        })
    }

    /// A qcow2 image on `file` with `backing`.
    fn qcow2(
        &self,
        file: File,
        image: &BlockImage,
        writable: bool,
        backing: &Backing,
    ) -> Result<FormatAccess<imago::file::File>, DiskImageError> {
        let format_error = |source| DiskImageError::Format {
            image: image.to_string(),
            format: "qcow2",
            source,
        };
        let storage = storage(file, image, writable)?;
        let builder = Qcow2::<imago::file::File>::builder(storage).write(writable);
        let builder = match backing {
            Backing::FromHeader => builder,
            Backing::None => builder.backing(None),
            Backing::Image(layer) => builder.backing(Some(self.deeper()?.layer(layer)?)),
        };
        let gate = Gate {
            chain: self.clone(),
        };
        let qcow2 = builder.open(gate).map_err(format_error)?;
        Ok(FormatAccess::new(qcow2))
    }

    /// A backing image given explicitly: opened read-only, locked as a
    /// backing image.
    fn layer(&self, layer: &Layer) -> Result<FormatAccess<imago::file::File>, DiskImageError> {
        let name = layer.image.to_string();
        let file = open_file(&layer.image, true)?;
        self.files
            .borrow_mut()
            .push(chain_file(&file, &name, BACKING_ACCESS)?);
        match &layer.format {
            ImageFormat::Raw => {
                let storage = storage(file, &layer.image, false)?;
                let raw = Raw::builder(storage)
                    .write(false)
                    .open(DenyImplicitOpenGate::default())
                    .map_err(|source| DiskImageError::Format {
                        image: name,
                        format: "raw",
                        source,
                    })?;
                Ok(FormatAccess::new(raw))
            }
            ImageFormat::Qcow2 { backing } => self.qcow2(file, &layer.image, false, backing),
        }
    }
}

/// imago's storage on an open file; its path (when it has one) resolves a
/// relative backing file name.
fn storage(
    file: File,
    image: &BlockImage,
    writable: bool,
) -> Result<imago::file::File, DiskImageError> {
    let mut opts = StorageOpenOptions::new().write(writable);
    if let BlockImage::Path(p) = image {
        opts = opts.filename(absolute(p));
    }
    imago::file::File::from_open_file(file, opts).map_err(|source| DiskImageError::Open {
        image: image.to_string(),
        how: "as storage",
        source,
    })
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// What the image headers name (backing files, external data files) is
/// opened here: by path, kept for locking, and no deeper than [`MAX_CHAIN`].
struct Gate {
    chain: Chain,
}

impl ImplicitOpenGate<imago::file::File> for Gate {
    fn open_format<F: FormatDriverBuilder<imago::file::File>>(
        &mut self,
        builder: F,
    ) -> io::Result<FormatAccess<imago::file::File>> {
        let deeper = self.chain.deeper().map_err(io::Error::other)?;
        let instance = builder.open(Gate { chain: deeper })?;
        Ok(FormatAccess::new(instance))
    }

    fn open_storage(&mut self, opts: StorageOpenOptions) -> io::Result<imago::file::File> {
        let path = opts
            .get_filename()
            .ok_or_else(|| io::Error::other("an image names a file without a path"))?
            .to_path_buf();
        let writable = opts.get_writable();
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        // A file the header names for writing is an external data file: the
        // top image's own data, locked as it is.
        let access = if writable {
            self.chain
                .files
                .borrow()
                .first()
                .map_or(BACKING_ACCESS, |top| top.access)
        } else {
            BACKING_ACCESS
        };
        let kept =
            chain_file(&file, &path.display().to_string(), access).map_err(io::Error::other)?;
        self.chain.files.borrow_mut().push(kept);
        imago::file::File::from_open_file(file, opts)
    }
}

/// Runs `qemu-img` (qemu-utils): the tests make their images with it and
/// check what ferry wrote with it.
#[cfg(test)]
pub(crate) fn qemu_img(args: &[&str]) -> std::process::Output {
    qemu_tool("qemu-img", args)
}

/// Runs `tool` of qemu-utils (`qemu-img`, `qemu-io`), which must succeed.
#[cfg(test)]
pub(crate) fn qemu_tool(tool: &str, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}: install qemu-utils (scripts/deps --tests)"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn path_str(p: &Path) -> &str {
        p.to_str().expect("UTF-8 temp path")
    }

    /// A raw image of `len` bytes whose every byte is `seed` plus its
    /// sector's number.
    fn raw_base(dir: &Path, name: &str, len: u64, seed: u8) -> PathBuf {
        let p = dir.join(name);
        let data: Vec<u8> = (0..len)
            .map(|i| seed.wrapping_add((i / 512) as u8))
            .collect();
        std::fs::write(&p, data).unwrap();
        p
    }

    fn qcow2_over(dir: &Path, name: &str, backing: Option<(&Path, &str)>, len: u64) -> PathBuf {
        let p = dir.join(name);
        let size = len.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if let Some((b, fmt)) = backing {
            args.extend(["-b", path_str(b), "-F", fmt]);
        }
        args.extend([path_str(&p), &size]);
        qemu_img(&args);
        p
    }

    fn config(path: &Path, format: ImageFormat) -> BlockConfig {
        BlockConfig {
            format,
            ..BlockConfig::new(BlockImage::Path(path.to_path_buf()))
        }
    }

    fn qcow2(backing: Backing) -> ImageFormat {
        ImageFormat::Qcow2 { backing }
    }

    fn read(img: &DiskImage, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        img.read_at(&mut buf, offset).unwrap();
        buf
    }

    /// qcow2 over qcow2 over raw, given explicitly as libvirt gives it:
    /// each layer shows through where the ones above have nothing, a write
    /// lands in the top only, and `"backing":null` hides the chain.
    #[test]
    fn an_explicit_chain_reads_through_and_writes_the_top() {
        let dir = tempfile::tempdir().unwrap();
        let base = raw_base(dir.path(), "base.raw", 4 * MIB, 7);
        let mid = qcow2_over(dir.path(), "mid.qcow2", Some((&base, "raw")), 4 * MIB);
        qemu_tool(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x55 1M 64k", path_str(&mid)],
        );
        let top = qcow2_over(dir.path(), "top.qcow2", Some((&mid, "qcow2")), 4 * MIB);
        let chain = qcow2(Backing::Image(Box::new(Layer {
            image: BlockImage::Path(mid.clone()),
            format: qcow2(Backing::Image(Box::new(Layer {
                image: BlockImage::Path(base.clone()),
                format: ImageFormat::Raw,
            }))),
        })));
        let img = DiskImage::open(&config(&top, chain), Mode::Active).unwrap();
        assert_eq!(img.size(), 4 * MIB);
        assert_eq!(img.chain().count(), 3);
        assert_eq!(read(&img, 512, 4), vec![8; 4], "the raw base shows through");
        assert_eq!(
            read(&img, MIB, 4),
            vec![0x55; 4],
            "the middle layer's write"
        );
        img.write_at(&[0xaa; 4096], 2 * MIB).unwrap();
        assert_eq!(read(&img, 2 * MIB, 4096), vec![0xaa; 4096]);
        img.flush().unwrap();
        drop(img);
        qemu_img(&["check", "-q", path_str(&top)]);
        qemu_img(&["check", "-q", path_str(&mid)]);
        let base_now = std::fs::read(&base).unwrap();
        assert_eq!(
            base_now[2 * MIB as usize],
            7u8.wrapping_add((2 * MIB / 512) as u8),
            "base untouched"
        );

        let alone = DiskImage::open(&config(&top, qcow2(Backing::None)), Mode::Active).unwrap();
        assert_eq!(read(&alone, 512, 4), vec![0; 4], "no backing: zeroes");
        assert_eq!(read(&alone, 2 * MIB, 4), vec![0xaa; 4]);
    }

    /// A version 2 image (qemu-img's `compat=0.10`, as old clouds made them)
    /// reads and writes as a version 3 one does, and stays version 2.
    #[test]
    fn a_version_2_image_reads_and_writes() {
        let dir = tempfile::tempdir().unwrap();
        let base = raw_base(dir.path(), "base.raw", MIB, 3);
        let v2 = dir.path().join("v2.qcow2");
        let (b, t) = (path_str(&base), path_str(&v2));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            b,
            "-F",
            "raw",
            t,
        ]);
        let img = DiskImage::open(&config(&v2, qcow2(Backing::FromHeader)), Mode::Active).unwrap();
        assert_eq!(read(&img, 1024, 4), vec![5; 4], "the base shows through");
        img.write_at(&[0x77; 8192], 65536).unwrap();
        img.flush().unwrap();
        drop(img);
        qemu_img(&["check", "-q", t]);
        let info = String::from_utf8(qemu_img(&["info", t]).stdout).unwrap();
        assert!(info.contains("compat: 0.10"), "{info}");
        let again =
            DiskImage::open(&config(&v2, qcow2(Backing::FromHeader)), Mode::Active).unwrap();
        assert_eq!(read(&again, 65536, 8192), vec![0x77; 8192]);
    }

    /// An inactive image (a migration's other side) writes nothing, not even
    /// to a qcow2 image it could open for writing.
    #[test]
    fn an_inactive_qcow2_image_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let top = qcow2_over(dir.path(), "top.qcow2", None, MIB);
        let before = std::fs::read(&top).unwrap();
        let img =
            DiskImage::open(&config(&top, qcow2(Backing::FromHeader)), Mode::Inactive).unwrap();
        img.write_at(&[1; 512], 0)
            .expect_err("an inactive qcow2 image refuses writes");
        img.flush().unwrap();
        drop(img);
        assert_eq!(std::fs::read(&top).unwrap(), before);
    }

    /// A chain that loops (a over b over a) is refused by name, not followed
    /// until the stack runs out; so is a backing file that is not there.
    #[test]
    fn a_looping_or_broken_chain_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.qcow2");
        let b = dir.path().join("b.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            path_str(&b),
            "-F",
            "qcow2",
            path_str(&a),
            "1M",
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            path_str(&a),
            "-F",
            "qcow2",
            path_str(&b),
            "1M",
        ]);
        let e = DiskImage::open(&config(&a, qcow2(Backing::FromHeader)), Mode::Active)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("longer than 16 images") && e.contains("a.qcow2"),
            "{e}"
        );

        let c = dir.path().join("c.qcow2");
        let gone = dir.path().join("gone.raw");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            path_str(&gone),
            "-F",
            "raw",
            path_str(&c),
            "1M",
        ]);
        let e = DiskImage::open(&config(&c, qcow2(Backing::FromHeader)), Mode::Active)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gone.raw") && e.contains("c.qcow2"), "{e}");

        let e = DiskImage::open(
            &config(&gone.with_extension("x"), ImageFormat::Raw),
            Mode::Active,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot open disk image"), "{e}");
        let raw = raw_base(dir.path(), "plain.raw", MIB, 0);
        let e = DiskImage::open(&config(&raw, qcow2(Backing::FromHeader)), Mode::Active)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a usable qcow2 image") && e.contains("plain.raw"),
            "{e}"
        );
    }
}
