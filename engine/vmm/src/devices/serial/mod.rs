//! A 16550 UART on COM1 (I/O ports 0x3f8-0x3ff, IRQ 4), on vm-superio.

mod device;
mod persist;
mod sink;

pub use device::{Com1, COM1_BASE, COM1_IRQ, COM1_LEN};
pub use persist::SerialDeviceState;
pub use sink::{SerialSink, SinkError, SinkSpec};
