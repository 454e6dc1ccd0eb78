//! fw_cfg state as it travels in checkpoints and migration streams: the
//! selected item, the position in it, the half-written DMA address and the
//! contents of the writable files (`etc/vmcoreinfo`). Read-only items are
//! rebuilt from the destination's own configuration. Everything is checked
//! as hostile before any of it is applied.

use serde::{Deserialize, Serialize};

use super::FwCfg;
use crate::devices::DeviceStateError;

/// The device's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgState {
    /// The key last written to the selector port.
    pub selector: u16,
    /// Position of the next byte in the selected item.
    pub offset: u32,
    /// The DMA address being written (its high half, until the low one).
    pub dma_address: u64,
    /// Each writable file, in name order.
    #[serde(default)]
    pub files: Vec<FwCfgFileState>,
}

/// One writable file's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgFileState {
    pub name: String,
    pub data: Vec<u8>,
}

impl FwCfg {
    /// The state to save; the VM must be paused.
    pub fn state(&self) -> FwCfgState {
        FwCfgState {
            selector: self.selector,
            offset: self.offset,
            dma_address: self.dma_address,
            files: self
                .files
                .iter()
                .filter(|f| f.writable)
                .map(|f| FwCfgFileState {
                    name: f.name.clone(),
                    data: f.data.clone(),
                })
                .collect(),
        }
    }

    /// Refuses a state this device could never have been in: a position
    /// past the selected item's end, writable files other than this
    /// device's, or of another size.
    pub fn check(&self, state: &FwCfgState) -> Result<(), DeviceStateError> {
        let len = self.item(state.selector).map_or(0, <[u8]>::len);
        if state.offset as usize > len {
            return Err(DeviceStateError::FwCfgOffset {
                offset: state.offset,
                selector: state.selector,
                len,
            });
        }
        if state.dma_address & 0xffff_ffff != 0 {
            return Err(DeviceStateError::FwCfgDmaAddress(state.dma_address));
        }
        let ours: Vec<(&str, usize)> = self
            .files
            .iter()
            .filter(|f| f.writable)
            .map(|f| (f.name.as_str(), f.data.len()))
            .collect();
        let theirs: Vec<(&str, usize)> = state
            .files
            .iter()
            .map(|f| (f.name.as_str(), f.data.len()))
            .collect();
        if ours != theirs {
            let owned = |v: Vec<(&str, usize)>| -> Vec<(String, usize)> {
                v.into_iter().map(|(n, l)| (n.to_string(), l)).collect()
            };
            return Err(DeviceStateError::FwCfgFiles {
                theirs: owned(theirs),
                ours: owned(ours),
            });
        }
        Ok(())
    }

    /// Checks `state` ([`Self::check`]) and applies all of it, or nothing.
    pub fn restore(&mut self, state: &FwCfgState) -> Result<(), DeviceStateError> {
        self.check(state)?;
        self.selector = state.selector;
        self.offset = state.offset;
        self.dma_address = state.dma_address;
        for f in &state.files {
            if let Some(i) = self.file_index(&f.name) {
                self.files[i].data.clone_from(&f.data);
            }
        }
        Ok(())
    }
}
