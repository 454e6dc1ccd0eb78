//! QEMU's firmware configuration device (`fw_cfg_io`), as the x86 `pc`
//! machine has it and QEMU's `docs/specs/fw_cfg.rst` describes it: a
//! selector port (0x510, 16-bit writes pick an item and rewind it), a data
//! port (0x511, byte reads stream the item; past its end they read 0) and
//! the DMA address port (0x514, a big-endian 64-bit address written as two
//! 32-bit halves, high then low; the low write runs the transfer).
//!
//! Items: the signature `QEMU` (0x0000), the interface ID (0x0001:
//! traditional and DMA), a few numbers SeaBIOS reads, the file directory
//! (0x0019) and the named files from 0x0020 on, sorted by name as QEMU
//! sorts them (byte order). Firmware, Linux's `qemu_fw_cfg` and kdump's
//! `etc/vmcoreinfo` read them; only files added as writable take guest
//! writes, and only through DMA.
//!
//! DMA writes into guest RAM go through vm-memory, which marks the pages in
//! the VMM's dirty bitmap: a migration sends them like pages the guest wrote.
//! All work runs on the vCPU thread that touched a port, under the device's
//! lock: a paused VM has no transfer in flight beyond what [`FwCfgState`]
//! carries.

mod persist;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;

use ferry_kvm::GuestRam;
use vm_memory::{Bytes, GuestAddress};

pub use persist::{FwCfgFileState, FwCfgState};

/// The selector port (16-bit writes; reads stream data, as QEMU's
/// combined port does).
pub const SELECTOR_PORT: u16 = 0x510;
/// The data port (byte reads).
pub const DATA_PORT: u16 = 0x511;
/// The DMA address port: 8 bytes, big-endian.
pub const DMA_PORT: u16 = 0x514;
const DMA_PORT_LEN: u16 = 8;

/// Item keys (QEMU's `FW_CFG_*`).
pub mod key {
    pub const SIGNATURE: u16 = 0x0000;
    pub const ID: u16 = 0x0001;
    pub const RAM_SIZE: u16 = 0x0003;
    pub const NB_CPUS: u16 = 0x0005;
    pub const MAX_CPUS: u16 = 0x000f;
    /// The kernel's entry (QEMU's PVH path: `pvh.bin` jumps there).
    pub const KERNEL_ENTRY: u16 = 0x0010;
    pub const CMDLINE_SIZE: u16 = 0x0014;
    pub const CMDLINE_DATA: u16 = 0x0015;
    pub const SETUP_SIZE: u16 = 0x0017;
    pub const SETUP_DATA: u16 = 0x0018;
    pub const FILE_DIR: u16 = 0x0019;
    pub const FILE_FIRST: u16 = 0x0020;
    /// Set in a key written by old guests that wrote through the data port;
    /// ignored when looking the item up.
    pub const WRITE_CHANNEL: u16 = 0x4000;
    /// Architecture-specific items: ferry has none.
    pub const ARCH_LOCAL: u16 = 0x8000;
    /// The key bits that name an item.
    pub const ENTRY_MASK: u16 = !(WRITE_CHANNEL | ARCH_LOCAL);
}

/// Interface ID bits (item 0x0001).
pub const ID_TRADITIONAL: u32 = 1 << 0;
pub const ID_DMA: u32 = 1 << 1;

/// `FWCfgDmaAccess.control` bits.
pub mod dma {
    pub const ERROR: u32 = 0x01;
    pub const READ: u32 = 0x02;
    pub const SKIP: u32 = 0x04;
    pub const SELECT: u32 = 0x08;
    pub const WRITE: u32 = 0x10;
    /// Bytes of `FWCfgDmaAccess`: control (BE32), length (BE32), address (BE64).
    pub const ACCESS_LEN: usize = 16;
}

/// What reads of the DMA port return (`QEMU CFG`, big-endian).
const DMA_SIGNATURE: &[u8; 8] = b"QEMU CFG";
/// Bytes of a file name in a directory entry, the terminating NUL included.
pub const FILE_NAME_LEN: usize = 56;
/// Bytes of a directory entry: size (BE32), select (BE16), reserved (2), name.
pub const DIR_ENTRY_LEN: usize = 64;
/// Most files: keys 0x0020 to 0x3fff.
pub const MAX_FILES: usize = (key::ENTRY_MASK - key::FILE_FIRST + 1) as usize;
/// The file kdump's `etc/vmcoreinfo` note address goes into.
pub const VMCOREINFO_FILE: &str = "etc/vmcoreinfo";
/// Bytes of `etc/vmcoreinfo`.
pub const VMCOREINFO_LEN: usize = 16;
/// `host_format`/`guest_format` value of an ELF note.
pub const VMCOREINFO_FORMAT_ELF: u16 = 1;
/// Largest zero fill written at once (reads past an item's end).
const ZERO_CHUNK: usize = 4096;

/// Why a file cannot be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FwCfgError {
    #[error("fw_cfg file {name:?} exists already")]
    DuplicateFile { name: String },
    #[error("fw_cfg file name {name:?} is empty, has a NUL or is longer than 55 bytes")]
    BadName { name: String },
    #[error("fw_cfg file {name:?} is larger than 4 GiB")]
    FileTooLarge { name: String },
    #[error("fw_cfg has no room for file {name:?} ({MAX_FILES} files at most)")]
    TooManyFiles { name: String },
}

/// Which fw_cfg a VM gets (`ferry-vm --fw-cfg`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FwCfgConfig {
    /// Offer `etc/vmcoreinfo` for the guest's kdump note (QEMU's `-device
    /// vmcoreinfo`).
    pub vmcoreinfo: bool,
    /// The `bootorder` file's OpenFirmware device paths, in order; empty for
    /// an empty file.
    pub bootorder: Vec<String>,
}

/// One named file.
#[derive(Debug, Clone)]
struct File {
    name: String,
    data: Vec<u8>,
    writable: bool,
}

/// The guest's `etc/vmcoreinfo`, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmcoreInfo {
    pub host_format: u16,
    pub guest_format: u16,
    pub size: u32,
    pub paddr: u64,
}

/// The device.
#[derive(Debug)]
pub struct FwCfg {
    ram: Arc<GuestRam>,
    /// Numbered items other than the directory and the files.
    items: BTreeMap<u16, Vec<u8>>,
    /// Sorted by name; file `i` has key `FILE_FIRST + i`.
    files: Vec<File>,
    /// The directory (item 0x0019), rebuilt with each file.
    dir: Vec<u8>,
    /// The key last selected, as written.
    selector: u16,
    /// Position of the next byte in the selected item.
    offset: u32,
    /// The DMA address being written (its high half, until the low one).
    dma_address: u64,
}

impl FwCfg {
    /// A device with the signature, the interface ID and an empty directory;
    /// DMA reaches `ram`.
    pub fn new(ram: Arc<GuestRam>) -> Self {
        let mut items = BTreeMap::new();
        items.insert(key::SIGNATURE, b"QEMU".to_vec());
        items.insert(key::ID, (ID_TRADITIONAL | ID_DMA).to_le_bytes().to_vec());
        let mut dev = Self {
            ram,
            items,
            files: Vec::new(),
            dir: Vec::new(),
            selector: key::SIGNATURE,
            offset: 0,
            dma_address: 0,
        };
        dev.rebuild_dir();
        dev
    }

    /// The device a VM with `config`, `vcpus` vCPUs and the RAM of `layout`
    /// gets: RAM size and CPU counts, `bootorder`, `etc/e820` (the memory
    /// map both boot paths give the guest) and, when asked for,
    /// `etc/vmcoreinfo`.
    pub fn for_vm(
        config: &FwCfgConfig,
        ram: Arc<GuestRam>,
        layout: &ferry_boot::MemoryLayout,
        vcpus: u16,
    ) -> Result<Self, FwCfgError> {
        let mut dev = Self::new(ram);
        dev.add_item(key::RAM_SIZE, layout.ram_bytes().to_le_bytes().to_vec());
        dev.add_item(key::NB_CPUS, vcpus.to_le_bytes().to_vec());
        dev.add_item(key::MAX_CPUS, vcpus.to_le_bytes().to_vec());
        let mut bootorder = config.bootorder.join("\n").into_bytes();
        if !bootorder.is_empty() {
            bootorder.push(0);
        }
        dev.add_file("bootorder", bootorder)?;
        dev.add_file("etc/e820", e820(layout))?;
        if config.vmcoreinfo {
            let mut info = vec![0u8; VMCOREINFO_LEN];
            info[..2].copy_from_slice(&VMCOREINFO_FORMAT_ELF.to_le_bytes());
            dev.add_writable_file(VMCOREINFO_FILE, info)?;
        }
        Ok(dev)
    }

    /// Sets numbered item `key` (below 0x0020, not the directory).
    pub fn add_item(&mut self, key: u16, data: Vec<u8>) {
        debug_assert!(key < key::FILE_FIRST && key != key::FILE_DIR);
        self.items.insert(key, data);
    }

    /// Adds a read-only file.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        self.insert_file(name, data, false)
    }

    /// Replaces read-only file `name`'s contents (it keeps its key), or adds
    /// it.
    pub fn replace_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        match self.file_index(name) {
            Some(i) if !self.files[i].writable => {
                self.files[i].data = data;
                self.rebuild_dir();
                Ok(())
            }
            Some(_) => Err(FwCfgError::DuplicateFile {
                name: name.to_string(),
            }),
            None => self.add_file(name, data),
        }
    }

    /// Adds a file the guest may write through DMA (never past its end).
    pub fn add_writable_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        self.insert_file(name, data, true)
    }

    fn insert_file(&mut self, name: &str, data: Vec<u8>, writable: bool) -> Result<(), FwCfgError> {
        let name_err = || name.to_string();
        if name.is_empty() || name.len() >= FILE_NAME_LEN || name.contains('\0') {
            return Err(FwCfgError::BadName { name: name_err() });
        }
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::FileTooLarge { name: name_err() });
        }
        if self.files.len() >= MAX_FILES {
            return Err(FwCfgError::TooManyFiles { name: name_err() });
        }
        // QEMU sorts with strcmp: byte order, which `str`'s order is.
        match self.files.binary_search_by(|f| f.name.as_str().cmp(name)) {
            Ok(_) => Err(FwCfgError::DuplicateFile { name: name_err() }),
            Err(at) => {
                self.files.insert(
                    at,
                    File {
                        name: name.to_string(),
                        data,
                        writable,
                    },
                );
                self.rebuild_dir();
                Ok(())
            }
        }
    }

    fn rebuild_dir(&mut self) {
        let mut dir = Vec::with_capacity(4 + self.files.len() * DIR_ENTRY_LEN);
        dir.extend_from_slice(&(self.files.len() as u32).to_be_bytes());
        for (i, f) in self.files.iter().enumerate() {
            dir.extend_from_slice(&(f.data.len() as u32).to_be_bytes());
            dir.extend_from_slice(&(key::FILE_FIRST + i as u16).to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut name = [0u8; FILE_NAME_LEN];
            name[..f.name.len()].copy_from_slice(f.name.as_bytes());
            dir.extend_from_slice(&name);
        }
        self.dir = dir;
    }

    /// The key of file `name`, if there is one.
    pub fn file_key(&self, name: &str) -> Option<u16> {
        self.file_index(name).map(|i| key::FILE_FIRST + i as u16)
    }

    fn file_index(&self, name: &str) -> Option<usize> {
        self.files
            .binary_search_by(|f| f.name.as_str().cmp(name))
            .ok()
    }

    /// The contents of file `name`.
    pub fn file(&self, name: &str) -> Option<&[u8]> {
        self.file_index(name).map(|i| self.files[i].data.as_slice())
    }

    /// What the guest wrote into `etc/vmcoreinfo`, if the device has it.
    pub fn vmcoreinfo(&self) -> Option<VmcoreInfo> {
        let d = self.file(VMCOREINFO_FILE)?;
        let b: &[u8; VMCOREINFO_LEN] = d.try_into().ok()?;
        Some(VmcoreInfo {
            host_format: u16::from_le_bytes([b[0], b[1]]),
            guest_format: u16::from_le_bytes([b[2], b[3]]),
            size: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            paddr: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        })
    }

    /// The names a migration destination must offer: the device, and its
    /// writable files (whose contents travel in [`FwCfgState`]).
    pub fn shape_names(&self) -> Vec<String> {
        let mut names = vec!["fw_cfg".to_string()];
        names.extend(
            self.files
                .iter()
                .filter(|f| f.writable)
                .map(|f| format!("fw_cfg:{}", f.name)),
        );
        names
    }

    /// Whether a port belongs to the device.
    pub fn claims_port(port: u16) -> bool {
        port == SELECTOR_PORT
            || port == DATA_PORT
            || (DMA_PORT..DMA_PORT + DMA_PORT_LEN).contains(&port)
    }

    /// The item `selector` names, or `None` (nothing: reads return 0).
    fn item(&self, selector: u16) -> Option<&[u8]> {
        if selector & key::ARCH_LOCAL != 0 {
            return None;
        }
        match selector & key::ENTRY_MASK {
            key::FILE_DIR => Some(&self.dir),
            k if k >= key::FILE_FIRST => self
                .files
                .get(usize::from(k - key::FILE_FIRST))
                .map(|f| f.data.as_slice()),
            k => self.items.get(&k).map(Vec::as_slice),
        }
    }

    fn select(&mut self, selector: u16) {
        self.selector = selector;
        self.offset = 0;
    }

    /// The next byte of the selected item (0 past its end).
    fn read_byte(&mut self) -> u8 {
        let offset = self.offset as usize;
        match self
            .item(self.selector)
            .and_then(|d| d.get(offset))
            .copied()
        {
            Some(b) => {
                self.offset += 1;
                b
            }
            None => 0,
        }
    }

    /// A guest read of `port`.
    pub fn io_read(&mut self, port: u16, data: &mut [u8]) {
        match port {
            // QEMU's port 0x510 is one region with 0x511: reads stream data.
            SELECTOR_PORT | DATA_PORT => {
                for b in data.iter_mut() {
                    *b = self.read_byte();
                }
            }
            _ if (DMA_PORT..DMA_PORT + DMA_PORT_LEN).contains(&port) => {
                let start = usize::from(port - DMA_PORT);
                for (i, b) in data.iter_mut().enumerate() {
                    *b = DMA_SIGNATURE.get(start + i).copied().unwrap_or(0);
                }
            }
            _ => data.fill(0xff),
        }
    }

    /// A guest write of `port`. Data-port writes are ignored (as in QEMU
    /// since 2.4): files are written through DMA.
    pub fn io_write(&mut self, port: u16, data: &[u8]) {
        match (port, data.len()) {
            (SELECTOR_PORT, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            (DMA_PORT, 4) => {
                let high = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                self.dma_address = u64::from(high) << 32;
            }
            (p, 4) if p == DMA_PORT + 4 => {
                let low = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let address = self.dma_address | u64::from(low);
                self.dma_address = 0;
                self.dma(address);
            }
            _ => tracing::trace!(
                "fw_cfg: {}-byte write of port {port:#x} ignored",
                data.len()
            ),
        }
    }

    /// Runs the `FWCfgDmaAccess` at guest address `at` and writes its
    /// control word back: 0 when done, ERROR when it failed.
    fn dma(&mut self, at: u64) {
        let mut access = [0u8; dma::ACCESS_LEN];
        let mem = self.ram.memory();
        if mem.read_slice(&mut access, GuestAddress(at)).is_err() {
            tracing::debug!("fw_cfg: DMA access at {at:#x} is outside guest RAM");
            // QEMU tries to flag the error where the access should be.
            let _ = mem.write_slice(&dma::ERROR.to_be_bytes(), GuestAddress(at));
            return;
        }
        let control = u32::from_be_bytes([access[0], access[1], access[2], access[3]]);
        let length = u32::from_be_bytes([access[4], access[5], access[6], access[7]]);
        let address = u64::from_be_bytes([
            access[8], access[9], access[10], access[11], access[12], access[13], access[14],
            access[15],
        ]);
        let result = self.transfer(control, length, address);
        let _ = self
            .ram
            .memory()
            .write_slice(&result.to_be_bytes(), GuestAddress(at));
    }

    /// One access: SELECT first, then READ, WRITE or SKIP of `length` bytes
    /// at `address`. Returns the control word to write back.
    fn transfer(&mut self, control: u32, length: u32, address: u64) -> u32 {
        if control & dma::SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        enum Op {
            Read,
            Write,
            Skip,
        }
        let op = if control & dma::READ != 0 {
            Op::Read
        } else if control & dma::WRITE != 0 {
            Op::Write
        } else if control & dma::SKIP != 0 {
            Op::Skip
        } else {
            return 0;
        };
        let ram = self.ram.clone();
        let mem = ram.memory();
        let len = length as usize;
        let start = self.offset as usize;
        let selector = self.selector;
        let (item_len, writable) = match self.item(selector) {
            Some(d) => (d.len(), self.is_writable(selector)),
            None => (0, false),
        };
        // Bytes the item still has for this access.
        let avail = item_len.saturating_sub(start).min(len);
        let error = match op {
            Op::Skip => false,
            Op::Read => {
                let data = self.item(selector).unwrap_or(&[]);
                let ok = fits(&ram, address, len)
                    && mem
                        .write_slice(&data[start..start + avail], GuestAddress(address))
                        .is_ok()
                    && zero_fill(mem, address + avail as u64, len - avail);
                !ok
            }
            Op::Write => {
                if !writable || avail != len || !fits(&ram, address, len) {
                    true
                } else {
                    let mut buf = vec![0u8; len];
                    if mem.read_slice(&mut buf, GuestAddress(address)).is_err() {
                        true
                    } else {
                        let idx = usize::from((selector & key::ENTRY_MASK) - key::FILE_FIRST);
                        self.files[idx].data[start..start + len].copy_from_slice(&buf);
                        false
                    }
                }
            }
        };
        // The position moves over what the item had, as in QEMU, even when
        // the guest side failed.
        self.offset += avail as u32;
        if error {
            dma::ERROR
        } else {
            0
        }
    }

    fn is_writable(&self, selector: u16) -> bool {
        let k = selector & key::ENTRY_MASK;
        selector & key::ARCH_LOCAL == 0
            && k >= key::FILE_FIRST
            && self
                .files
                .get(usize::from(k - key::FILE_FIRST))
                .is_some_and(|f| f.writable)
    }
}

/// Whether `address..address+len` lies in guest RAM (one range).
fn fits(ram: &GuestRam, address: u64, len: usize) -> bool {
    len == 0 || ram.contains(address, len)
}

/// Writes `len` zero bytes at `address`, a page at most at a time.
fn zero_fill(mem: &ferry_kvm::memory::GuestMemory, mut address: u64, mut len: usize) -> bool {
    let zeros = [0u8; ZERO_CHUNK];
    while len > 0 {
        let n = len.min(ZERO_CHUNK);
        if mem.write_slice(&zeros[..n], GuestAddress(address)).is_err() {
            return false;
        }
        address += n as u64;
        len -= n;
    }
    true
}

/// `etc/e820`: QEMU's `struct e820_entry` (address LE64, length LE64, type
/// LE32) for each entry of the memory map the boot paths give the guest.
pub fn e820(layout: &ferry_boot::MemoryLayout) -> Vec<u8> {
    let mut out = Vec::new();
    for e in layout.memory_map() {
        out.extend_from_slice(&e.addr.to_le_bytes());
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&e.kind.e820_type().to_le_bytes());
    }
    out
}
