//! Emulated devices. Each device owns its `XState` DTO in `persist.rs`.

pub mod serial;
