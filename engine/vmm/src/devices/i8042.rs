//! The i8042 keyboard controller of QEMU's `pc` machine (ports 0x60 and
//! 0x64), with a PS/2 keyboard and mouse that answer the commands firmware
//! and an OS send while probing them. There are no keys to press and no mouse
//! to move: ferry has no display. What matters is that SeaBIOS and Linux find
//! the controller they expect, and that its reset line resets the machine:
//! command 0xfe (pulse output line 0), or output port bit 0 cleared through
//! command 0xd1, as QEMU's `pckbd`.
//!
//! Replies queue in the controller's output buffer; IRQ 1 (keyboard) or 12
//! (mouse) follows it while the command byte enables that interrupt.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::devices::ide::IrqLine;
use crate::devices::DeviceStateError;

/// Data port (output buffer reads, keyboard writes).
pub const DATA_PORT: u16 = 0x60;
/// Status (reads) and command (writes) port.
pub const COMMAND_PORT: u16 = 0x64;
pub const KBD_IRQ: u32 = 1;
pub const AUX_IRQ: u32 = 12;

/// Status register bits.
mod status {
    pub const OBF: u8 = 0x01;
    pub const SYSTEM: u8 = 0x04;
    pub const CMD: u8 = 0x08;
    pub const UNLOCKED: u8 = 0x10;
    pub const AUX_OBF: u8 = 0x20;
}

/// Command byte bits.
mod mode {
    pub const KBD_INT: u8 = 0x01;
    pub const AUX_INT: u8 = 0x02;
    pub const SYSTEM: u8 = 0x04;
    pub const DISABLE_KBD: u8 = 0x10;
    pub const DISABLE_AUX: u8 = 0x20;
    pub const XLATE: u8 = 0x40;
}

/// Output port bit 0: the CPU's reset line (active low).
const OUTPORT_RESET: u8 = 0x01;
/// QEMU's output port at reset: A20 on, reset high, buffers empty.
const OUTPORT_RESET_VALUE: u8 = 0x03 | 0x0c;
/// Most bytes the output buffer holds (QEMU's PS/2 queue is 16 per device).
const QUEUE_MAX: usize = 32;
const ACK: u8 = 0xfa;

/// What the guest asked of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum I8042Action {
    None,
    /// The reset line was pulsed.
    Reset,
}

/// The data byte the controller waits for after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pending {
    None,
    /// 0x60: the next data byte is the command byte.
    CommandByte,
    /// 0xd1: the next data byte is the output port.
    OutputPort,
    /// 0xd2: the next data byte appears as if from the keyboard.
    KbdOutput,
    /// 0xd3: the next data byte appears as if from the mouse.
    AuxOutput,
    /// 0xd4: the next data byte goes to the mouse.
    AuxInput,
    /// A keyboard command that takes an argument (LEDs, rate, scan set).
    KbdArgument,
    /// A mouse command that takes an argument (rate, resolution).
    AuxArgument,
}

/// One queued byte and whether the mouse sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queued {
    pub byte: u8,
    pub aux: bool,
}

/// The controller's state in checkpoints and streams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub mode: u8,
    pub status: u8,
    pub outport: u8,
    pub pending: Pending,
    pub queue: Vec<Queued>,
}

/// The controller.
#[derive(Debug)]
pub struct I8042 {
    mode: u8,
    status: u8,
    outport: u8,
    pending: Pending,
    queue: VecDeque<Queued>,
    irq: Arc<dyn IrqLine>,
    lines: (bool, bool),
}

impl I8042 {
    pub fn new(irq: Arc<dyn IrqLine>) -> Self {
        Self {
            mode: mode::KBD_INT | mode::SYSTEM | mode::XLATE,
            status: status::CMD | status::UNLOCKED,
            outport: OUTPORT_RESET_VALUE,
            pending: Pending::None,
            queue: VecDeque::new(),
            irq,
            lines: (false, false),
        }
    }

    pub fn claims_port(port: u16) -> bool {
        port == DATA_PORT || port == COMMAND_PORT
    }

    pub fn io_read(&mut self, port: u16) -> u8 {
        let value = if port == COMMAND_PORT {
            let mut s = self.status & !(status::OBF | status::AUX_OBF);
            if let Some(q) = self.queue.front() {
                s |= status::OBF | if q.aux { status::AUX_OBF } else { 0 };
            }
            s
        } else {
            self.queue.pop_front().map_or(0, |q| q.byte)
        };
        self.update_irq();
        value
    }

    pub fn io_write(&mut self, port: u16, value: u8) -> I8042Action {
        let action = if port == COMMAND_PORT {
            self.status |= status::CMD;
            self.command(value)
        } else {
            self.status &= !status::CMD;
            self.data(value)
        };
        self.update_irq();
        action
    }

    fn push(&mut self, byte: u8, aux: bool) {
        if self.queue.len() < QUEUE_MAX {
            self.queue.push_back(Queued { byte, aux });
        }
    }

    fn command(&mut self, cmd: u8) -> I8042Action {
        self.pending = Pending::None;
        match cmd {
            0x20 => self.push(self.mode, false),
            0x60 => self.pending = Pending::CommandByte,
            0xa7 => self.mode |= mode::DISABLE_AUX,
            0xa8 => self.mode &= !mode::DISABLE_AUX,
            // Interface tests: no fault.
            0xa9 | 0xab => self.push(0x00, false),
            0xaa => {
                self.status |= status::SYSTEM;
                self.push(0x55, false);
            }
            0xad => self.mode |= mode::DISABLE_KBD,
            0xae => self.mode &= !mode::DISABLE_KBD,
            0xc0 => self.push(0x00, false),
            0xd0 => {
                let mut out = self.outport & !0x30;
                if let Some(q) = self.queue.front() {
                    out |= if q.aux { 0x20 } else { 0x10 };
                }
                self.push(out, false);
            }
            0xd1 => self.pending = Pending::OutputPort,
            0xd2 => self.pending = Pending::KbdOutput,
            0xd3 => self.pending = Pending::AuxOutput,
            0xd4 => self.pending = Pending::AuxInput,
            // Pulse output lines 0-3 (low bits clear = pulsed): line 0 is reset.
            0xf0..=0xff if cmd & OUTPORT_RESET == 0 => return I8042Action::Reset,
            _ => {}
        }
        I8042Action::None
    }

    fn data(&mut self, value: u8) -> I8042Action {
        let pending = std::mem::replace(&mut self.pending, Pending::None);
        match pending {
            Pending::CommandByte => {
                self.mode = value;
                if value & mode::SYSTEM != 0 {
                    self.status |= status::SYSTEM;
                } else {
                    self.status &= !status::SYSTEM;
                }
            }
            Pending::OutputPort => {
                self.outport = value;
                if value & OUTPORT_RESET == 0 {
                    return I8042Action::Reset;
                }
            }
            Pending::KbdOutput => self.push(value, false),
            Pending::AuxOutput => self.push(value, true),
            Pending::AuxInput => self.aux_command(value),
            Pending::AuxArgument => self.push(ACK, true),
            Pending::KbdArgument => self.push(ACK, false),
            Pending::None => self.kbd_command(value),
        }
        I8042Action::None
    }

    /// A byte sent to the keyboard (QEMU's `ps2_write_keyboard`).
    fn kbd_command(&mut self, cmd: u8) {
        match cmd {
            // Set LEDs, typematic rate, scan code set: an argument follows.
            0xed | 0xf3 | 0xf0 => {
                self.push(ACK, false);
                self.pending = Pending::KbdArgument;
            }
            0xee => self.push(0xee, false),
            // Identify: an MF2 keyboard (translated, as the command byte says).
            0xf2 => {
                self.push(ACK, false);
                self.push(0xab, false);
                self.push(
                    if self.mode & mode::XLATE != 0 {
                        0x41
                    } else {
                        0x83
                    },
                    false,
                );
            }
            0xff => {
                self.push(ACK, false);
                self.push(0xaa, false);
            }
            _ => self.push(ACK, false),
        }
    }

    /// A byte sent to the mouse (QEMU's `ps2_write_mouse`).
    fn aux_command(&mut self, cmd: u8) {
        match cmd {
            // Sample rate, resolution: an argument follows.
            0xf3 | 0xe8 => {
                self.push(ACK, true);
                self.pending = Pending::AuxArgument;
            }
            // Identify: a standard PS/2 mouse.
            0xf2 => {
                self.push(ACK, true);
                self.push(0x00, true);
            }
            // Status request: three bytes.
            0xe9 => {
                self.push(ACK, true);
                for _ in 0..3 {
                    self.push(0x00, true);
                }
            }
            0xff => {
                self.push(ACK, true);
                self.push(0xaa, true);
                self.push(0x00, true);
            }
            _ => self.push(ACK, true),
        }
    }

    fn update_irq(&mut self) {
        let front = self.queue.front().copied();
        let kbd = front.is_some_and(|q| !q.aux) && self.mode & mode::KBD_INT != 0;
        let aux = front.is_some_and(|q| q.aux) && self.mode & mode::AUX_INT != 0;
        if kbd != self.lines.0 {
            self.lines.0 = kbd;
            self.irq.set_level(KBD_IRQ, kbd);
        }
        if aux != self.lines.1 {
            self.lines.1 = aux;
            self.irq.set_level(AUX_IRQ, aux);
        }
    }

    /// The state to save.
    pub fn state(&self) -> I8042State {
        I8042State {
            mode: self.mode,
            status: self.status,
            outport: self.outport,
            pending: self.pending,
            queue: self.queue.iter().copied().collect(),
        }
    }

    /// Refuses a state the controller could never hold (a queue past its
    /// size).
    pub fn check(s: &I8042State) -> Result<(), DeviceStateError> {
        if s.queue.len() > QUEUE_MAX {
            return Err(DeviceStateError::I8042Queue {
                len: s.queue.len(),
                max: QUEUE_MAX,
            });
        }
        Ok(())
    }

    /// Checks `s` ([`Self::check`]), then applies all of it.
    pub fn restore(&mut self, s: &I8042State) -> Result<(), DeviceStateError> {
        Self::check(s)?;
        self.mode = s.mode;
        self.status = s.status & !(status::OBF | status::AUX_OBF);
        self.outport = s.outport;
        self.pending = s.pending;
        self.queue = s.queue.iter().copied().collect();
        self.lines = (false, false);
        self.update_irq();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Debug, Default)]
    struct Line(Mutex<Vec<(u32, bool)>>);

    impl IrqLine for Line {
        fn set_level(&self, irq: u32, level: bool) {
            self.0.lock().unwrap().push((irq, level));
        }
    }

    fn controller() -> (I8042, Arc<Line>) {
        let line = Arc::new(Line::default());
        (I8042::new(line.clone()), line)
    }

    fn read_all(k: &mut I8042) -> Vec<u8> {
        let mut out = Vec::new();
        while k.io_read(COMMAND_PORT) & status::OBF != 0 {
            out.push(k.io_read(DATA_PORT));
        }
        out
    }

    #[test]
    fn firmware_probes_find_a_controller_keyboard_and_mouse() {
        let (mut k, _) = controller();
        assert_eq!(k.io_read(COMMAND_PORT) & status::OBF, 0, "empty at reset");
        k.io_write(COMMAND_PORT, 0xaa);
        assert_eq!(read_all(&mut k), [0x55], "self test");
        assert_ne!(k.io_read(COMMAND_PORT) & status::SYSTEM, 0);
        k.io_write(COMMAND_PORT, 0xab);
        assert_eq!(read_all(&mut k), [0x00], "keyboard interface test");
        k.io_write(DATA_PORT, 0xff);
        assert_eq!(read_all(&mut k), [ACK, 0xaa], "keyboard reset");
        k.io_write(DATA_PORT, 0xf2);
        assert_eq!(read_all(&mut k), [ACK, 0xab, 0x41], "translated MF2");
        k.io_write(DATA_PORT, 0xed);
        k.io_write(DATA_PORT, 0x07);
        assert_eq!(read_all(&mut k), [ACK, ACK], "LEDs and their argument");
        k.io_write(COMMAND_PORT, 0xd4);
        k.io_write(DATA_PORT, 0xff);
        assert_eq!(k.io_read(COMMAND_PORT) & status::AUX_OBF, status::AUX_OBF);
        assert_eq!(read_all(&mut k), [ACK, 0xaa, 0x00], "mouse reset");
    }

    #[test]
    fn the_command_byte_reads_back_and_gates_irq1() {
        let (mut k, line) = controller();
        k.io_write(COMMAND_PORT, 0x60);
        k.io_write(DATA_PORT, 0x45);
        k.io_write(COMMAND_PORT, 0x20);
        assert_eq!(read_all(&mut k), [0x45]);
        assert_eq!(
            *line.0.lock().unwrap(),
            [(KBD_IRQ, true), (KBD_IRQ, false)],
            "IRQ 1 while the byte waited"
        );
        k.io_write(COMMAND_PORT, 0x60);
        k.io_write(DATA_PORT, 0x44);
        line.0.lock().unwrap().clear();
        k.io_write(DATA_PORT, 0xee);
        assert_eq!(read_all(&mut k), [0xee]);
        assert!(line.0.lock().unwrap().is_empty(), "interrupt disabled");
    }

    #[test]
    fn the_reset_line_resets_the_machine() {
        let (mut k, _) = controller();
        assert_eq!(k.io_write(COMMAND_PORT, 0xfe), I8042Action::Reset);
        assert_eq!(k.io_write(COMMAND_PORT, 0xff), I8042Action::None);
        k.io_write(COMMAND_PORT, 0xd1);
        assert_eq!(k.io_write(DATA_PORT, 0xde), I8042Action::Reset);
        k.io_write(COMMAND_PORT, 0xd1);
        assert_eq!(k.io_write(DATA_PORT, 0xdf), I8042Action::None);
        k.io_write(COMMAND_PORT, 0xd0);
        assert_eq!(read_all(&mut k), [0xdf & !0x30]);
    }

    #[test]
    fn the_state_round_trips_and_an_oversized_queue_is_refused() {
        let (mut k, _) = controller();
        k.io_write(COMMAND_PORT, 0x60);
        k.io_write(DATA_PORT, 0x47);
        k.io_write(DATA_PORT, 0xf2);
        k.io_write(COMMAND_PORT, 0xd1);
        let saved = k.state();
        let (mut other, line) = controller();
        other.restore(&saved).unwrap();
        assert_eq!(other.state(), saved);
        assert_eq!(*line.0.lock().unwrap(), [(KBD_IRQ, true)]);
        assert_eq!(other.io_write(DATA_PORT, 0x00), I8042Action::Reset);
        let bad = I8042State {
            queue: vec![
                Queued {
                    byte: 0,
                    aux: false
                };
                QUEUE_MAX + 1
            ],
            ..saved
        };
        let (mut fresh, _) = controller();
        assert!(fresh.restore(&bad).is_err());
        assert_eq!(fresh.state(), controller().0.state());
    }
}
