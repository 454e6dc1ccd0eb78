//! Serial device state as it travels in checkpoints and migration streams.

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

/// The 16550's registers and receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    #[serde(default)]
    pub in_buffer: Vec<u8>,
}

impl From<&SerialState> for SerialDeviceState {
    fn from(s: &SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EventFd;

    use super::SerialDeviceState;
    use crate::devices::serial::device::Com1;
    use crate::devices::serial::sink::{SerialSink, SinkSpec};

    fn com1(state: Option<&SerialDeviceState>) -> Com1 {
        let irq = EventFd::new(0).expect("eventfd");
        let sink = SerialSink::open(&SinkSpec::Null).expect("null sink");
        match state {
            Some(s) => Com1::from_state(s, irq, sink).expect("restore"),
            None => Com1::new(irq, sink),
        }
    }

    #[test]
    fn the_uart_round_trips_and_an_oversized_fifo_is_refused() {
        let mut uart = com1(None);
        // 8N1 at 9600 baud (DLAB on, divisor 12), FIFO on, scratch set.
        uart.write(3, 0x83);
        uart.write(0, 12);
        uart.write(1, 0);
        uart.write(3, 0x03);
        uart.write(1, 0x01);
        uart.write(4, 0x0b);
        uart.write(7, 0x5a);
        let saved = uart.state();
        assert_eq!(saved.baud_divisor_low, 12);
        assert_eq!(saved.line_control, 0x03);
        let mut back = com1(Some(&saved));
        assert_eq!(back.state(), saved);
        assert_eq!(back.read(7), 0x5a, "the guest reads its scratch back");
        assert_eq!(back.read(1), 0x01, "interrupt enable survives");

        let hostile = SerialDeviceState {
            in_buffer: vec![0; 1 << 16],
            ..saved
        };
        let irq = EventFd::new(0).expect("eventfd");
        let sink = SerialSink::open(&SinkSpec::Null).expect("null sink");
        assert!(Com1::from_state(&hostile, irq, sink).is_err());
    }
}
