//! The COM1 device: port I/O dispatch, interrupt line, save and restore.

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::persist::SerialDeviceState;
use super::sink::SerialSink;
use crate::devices::DeviceStateError;

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of I/O ports COM1 decodes.
pub const COM1_LEN: u16 = 8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt through an irqfd bound to GSI 4.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// COM1: a 16550 whose output goes to a [`SerialSink`].
#[derive(Debug)]
pub struct Com1 {
    uart: Serial<IrqLine, vm_superio::serial::NoEvents, SerialSink>,
}

impl Com1 {
    /// A UART in its reset state.
    pub fn new(irq: EventFd, sink: SerialSink) -> Self {
        Self {
            uart: Serial::new(IrqLine(irq), sink),
        }
    }

    /// A UART with registers restored from a checkpoint. Refuses a state whose receive
    /// FIFO is larger than the device's.
    pub fn from_state(
        state: &SerialDeviceState,
        irq: EventFd,
        sink: SerialSink,
    ) -> Result<Self, DeviceStateError> {
        let uart = Serial::from_state(
            &state.into(),
            IrqLine(irq),
            vm_superio::serial::NoEvents,
            sink,
        )
        .map_err(DeviceStateError::Serial)?;
        Ok(Self { uart })
    }

    /// The device's state, for a checkpoint.
    pub fn state(&self) -> SerialDeviceState {
        SerialDeviceState::from(&self.uart.state())
    }

    /// A guest read of port `COM1_BASE + offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// A guest write of port `COM1_BASE + offset`. Output errors are logged, never fatal
    /// to the guest.
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            tracing::debug!("serial output error: {e:?}");
        }
    }
}
