//! Emulated devices. Each device owns its `XState` DTO in `persist.rs`.

pub mod pci;
pub mod serial;
pub mod virtio;
