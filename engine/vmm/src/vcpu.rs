//! vCPU threads: run loop, port I/O dispatch, pause/resume and state commands.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::cpu::VcpuState;
use crate::devices::acpi_pm::PmAction;
use crate::devices::fw_cfg::FwCfg;
use crate::devices::i8042::{I8042Action, I8042};
use crate::devices::ide::Piix3;
use crate::devices::pci::PciBus;
use crate::devices::rtc::Rtc;
use crate::devices::serial::{Com1, COM1_BASE, COM1_LEN};
use crate::VmmError;

/// Why a VM stopped running by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered off (ACPI PM1a sleep, port 0x604).
    Poweroff,
    /// The guest asked for a reset (port 0xcf9, keyboard controller 0xfe) or
    /// triple-faulted (`KVM_EXIT_SHUTDOWN`).
    Reset(String),
    /// KVM could not run the vCPU.
    Crashed(String),
}

pub(crate) enum VcpuCmd {
    Resume,
    Capture(Sender<Result<VcpuState, VmmError>>),
    Restore(Box<VcpuState>, Sender<Result<(), VmmError>>),
    Stop,
}

/// Shared with every vCPU thread: the devices it dispatches I/O to and where it reports
/// guest exits.
#[derive(Clone)]
pub(crate) struct VcpuContext {
    pub com1: Arc<Mutex<Com1>>,
    pub pci: Arc<PciBus>,
    /// QEMU's fw_cfg, where the VM has it.
    pub fw_cfg: Option<Arc<Mutex<FwCfg>>>,
    /// The firmware's debug console (port 0x402), where it is asked for.
    pub debugcon: Option<Arc<Mutex<std::fs::File>>>,
    /// The i8042 keyboard controller, where the VM has it (booted through
    /// firmware); elsewhere only its reset command is decoded.
    pub i8042: Option<Arc<Mutex<I8042>>>,
    /// The MC146818 RTC and CMOS, where the VM has it.
    pub rtc: Option<Arc<Rtc>>,
    pub exits: Sender<GuestExit>,
    /// The MSRs a capture reads: the guest CPU's, and those a restore loaded.
    pub msr_indices: Arc<RwLock<Vec<u32>>>,
    /// The guest's CPUID (without per-vCPU fields).
    pub cpuid: Arc<Vec<kvm_bindings::kvm_cpuid_entry2>>,
    pub throttle: Arc<crate::throttle::ThrottleState>,
}

/// The VMM's handle on one vCPU thread.
#[derive(Debug)]
pub(crate) struct VcpuHandle {
    pub index: u32,
    thread: Option<JoinHandle<()>>,
    cmds: Sender<VcpuCmd>,
    acks: Receiver<()>,
    pause: Arc<AtomicBool>,
    /// Whether the VMM let this vCPU run and has not seen it stop since.
    running: AtomicBool,
}

impl VcpuHandle {
    /// Starts the thread of vCPU `index`, stopped; `resume` lets it run.
    pub fn spawn(index: u32, vcpu: VcpuFd, ctx: VcpuContext) -> Result<Self, VmmError> {
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (ack_tx, ack_rx) = mpsc::channel();
        let pause = Arc::new(AtomicBool::new(true));
        let flag = pause.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || vcpu_loop(index, vcpu, ctx, cmd_rx, ack_tx, flag))
            .map_err(|e| VmmError::Io("cannot start a vCPU thread".into(), e))?;
        Ok(Self {
            index,
            thread: Some(thread),
            cmds: cmd_tx,
            acks: ack_rx,
            pause,
            running: AtomicBool::new(false),
        })
    }

    fn send(&self, cmd: VcpuCmd) -> Result<(), VmmError> {
        self.cmds
            .send(cmd)
            .map_err(|_| VmmError::VcpuGone(self.index))
    }

    pub fn resume(&self) -> Result<(), VmmError> {
        // Drop an acknowledgement left by a stop the vCPU made on its own (guest exit),
        // so the next pause waits for a fresh one.
        while self.acks.try_recv().is_ok() {}
        self.running.store(true, Ordering::Release);
        self.pause.store(false, Ordering::Release);
        self.send(VcpuCmd::Resume)
    }

    /// Asks the vCPU to stop (does not wait).
    pub fn request_pause(&self) {
        self.pause.store(true, Ordering::Release);
    }

    /// Waits until the vCPU has left KVM_RUN, kicking it out of the guest as needed.
    pub fn wait_paused(&self) -> Result<(), VmmError> {
        if !self.running.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(thread) = &self.thread else {
            return Err(VmmError::VcpuGone(self.index));
        };
        let pthread = std::os::unix::thread::JoinHandleExt::as_pthread_t(thread);
        loop {
            if thread.is_finished() {
                return Err(VmmError::VcpuGone(self.index));
            }
            // A kick can land just before the thread enters KVM_RUN and be lost; kicking
            // again after a short wait covers that window.
            ferry_kvm::kick(pthread).map_err(|e| VmmError::Config(e.to_string()))?;
            match self.acks.recv_timeout(Duration::from_millis(2)) {
                Ok(()) => {
                    self.running.store(false, Ordering::Release);
                    return Ok(());
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Err(VmmError::VcpuGone(self.index)),
            }
        }
    }

    /// The pthread of this vCPU, for kicks.
    pub fn pthread(&self) -> Option<libc::pthread_t> {
        self.thread
            .as_ref()
            .map(std::os::unix::thread::JoinHandleExt::as_pthread_t)
    }

    pub fn capture(&self) -> Result<VcpuState, VmmError> {
        let (tx, rx) = mpsc::channel();
        self.send(VcpuCmd::Capture(tx))?;
        rx.recv().map_err(|_| VmmError::VcpuGone(self.index))?
    }

    pub fn restore(&self, state: VcpuState) -> Result<(), VmmError> {
        let (tx, rx) = mpsc::channel();
        self.send(VcpuCmd::Restore(Box::new(state), tx))?;
        rx.recv().map_err(|_| VmmError::VcpuGone(self.index))?
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.request_pause();
        let _ = self.wait_paused();
        let _ = self.cmds.send(VcpuCmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn vcpu_loop(
    index: u32,
    mut vcpu: VcpuFd,
    ctx: VcpuContext,
    cmds: Receiver<VcpuCmd>,
    acks: Sender<()>,
    pause: Arc<AtomicBool>,
) {
    let mut running = false;
    loop {
        if running {
            if pause.load(Ordering::Acquire) {
                running = false;
                if acks.send(()).is_err() {
                    return;
                }
                continue;
            }
            if ctx.throttle.is_held() {
                // Held (stopped during a migration): stay out of the guest.
                ctx.throttle.nap(&pause);
                continue;
            }
            match vcpu.run() {
                Ok(exit) => {
                    if let Some(guest_exit) = handle_exit(index, exit, &ctx) {
                        let _ = ctx.exits.send(guest_exit);
                        // Stay stopped until the VMM decides what to do.
                        pause.store(true, Ordering::Release);
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // A kick: a pause request (checked above) or a throttle nap.
                    ctx.throttle.nap(&pause);
                }
                Err(e) => {
                    let _ = ctx.exits.send(GuestExit::Crashed(format!(
                        "vCPU {index}: KVM_RUN failed: {e}"
                    )));
                    pause.store(true, Ordering::Release);
                }
            }
            continue;
        }
        match cmds.recv() {
            Ok(VcpuCmd::Resume) => running = true,
            Ok(VcpuCmd::Capture(reply)) => {
                let indices = ctx
                    .msr_indices
                    .read()
                    .map(|l| l.clone())
                    .unwrap_or_default();
                let _ = reply.send(VcpuState::capture(index, &vcpu, &indices));
            }
            Ok(VcpuCmd::Restore(state, reply)) => {
                let result = state.restore(&vcpu, &ctx.cpuid).map(|loaded| {
                    if let Ok(mut list) = ctx.msr_indices.write() {
                        for i in loaded {
                            if !list.contains(&i) {
                                list.push(i);
                            }
                        }
                    }
                });
                let _ = reply.send(result);
            }
            Ok(VcpuCmd::Stop) | Err(_) => return,
        }
    }
}

fn handle_exit(index: u32, exit: VcpuExit<'_>, ctx: &VcpuContext) -> Option<GuestExit> {
    match exit {
        VcpuExit::IoOut(port, data) => io_out(port, data, ctx),
        VcpuExit::IoIn(port, data) => {
            io_in(port, data, ctx);
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            if ctx.pci.mmio_read(addr, data) {
                return None;
            }
            tracing::trace!("vCPU {index}: unclaimed MMIO read at {addr:#x}");
            data.fill(0xff);
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            if ctx.pci.mmio_write(addr, data) {
                return None;
            }
            tracing::trace!("vCPU {index}: unclaimed MMIO write at {addr:#x}");
            None
        }
        VcpuExit::Shutdown => Some(GuestExit::Reset(format!(
            "vCPU {index} triple-faulted (KVM_EXIT_SHUTDOWN)"
        ))),
        VcpuExit::Hlt => None,
        VcpuExit::SystemEvent(kind, _) => Some(GuestExit::Reset(format!(
            "vCPU {index}: system event {kind}"
        ))),
        VcpuExit::FailEntry(reason, cpu) => Some(GuestExit::Crashed(format!(
            "vCPU {index}: KVM could not enter the guest (hardware reason {reason:#x} on host CPU {cpu})"
        ))),
        VcpuExit::InternalError => Some(GuestExit::Crashed(format!(
            "vCPU {index}: KVM internal error (emulation failure)"
        ))),
        other => Some(GuestExit::Crashed(format!(
            "vCPU {index}: unexpected exit {other:?}"
        ))),
    }
}

/// On a VM without ACPI (booted with a kernel), the PM1a control port where
/// SeaBIOS 1.16 puts it: writing SLP_EN powers off (the dirtier's poweroff=N).
const PM1A_CNT: u16 = 0x604;
const SLP_EN: u16 = 1 << 13;
/// Reset control register.
const RESET_CF9: u16 = 0xcf9;
/// i8042 command port; command 0xfe pulses the reset line.
const I8042_CMD: u16 = 0x64;

fn io_out(port: u16, data: &[u8], ctx: &VcpuContext) -> Option<GuestExit> {
    if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&port) {
        if let Ok(mut com1) = ctx.com1.lock() {
            for &b in data {
                com1.write((port - COM1_BASE) as u8, b);
            }
        }
        return None;
    }
    if PciBus::claims_port(port, data.len()) {
        ctx.pci.io_write(port, data);
        return None;
    }
    if let Some(ide) = ctx.pci.ide().filter(|_| Piix3::claims_port(port)) {
        if let Ok(mut ide) = ide.lock() {
            ide.io_write(port, data);
        }
        return None;
    }
    if let Some(fw_cfg) = ctx.fw_cfg.as_ref().filter(|_| FwCfg::claims_port(port)) {
        if let Ok(mut fw_cfg) = fw_cfg.lock() {
            fw_cfg.io_write(port, data);
        }
        return None;
    }
    if let Some(con) = ctx
        .debugcon
        .as_ref()
        .filter(|_| port == crate::firmware::DEBUGCON_PORT)
    {
        if let Ok(mut con) = con.lock() {
            // A debug log: a failed write loses log bytes, never the guest.
            let _ = std::io::Write::write_all(&mut *con, data);
        }
        return None;
    }
    if let Some(kbd) = ctx.i8042.as_ref().filter(|_| I8042::claims_port(port)) {
        let mut kbd = kbd.lock().ok()?;
        let reset = data
            .iter()
            .map(|&b| kbd.io_write(port, b))
            .any(|a| a == I8042Action::Reset);
        return reset.then(|| GuestExit::Reset("reset through the keyboard controller".into()));
    }
    if let Some(Ok(mut pm)) = ctx.pci.pm().map(|pm| pm.lock()) {
        if pm.claims_port(port) {
            return match pm.io_write(port, data) {
                PmAction::PowerOff => Some(GuestExit::Poweroff),
                PmAction::None => None,
            };
        }
    }
    if let Some(rtc) = ctx.rtc.as_ref().filter(|_| Rtc::claims_port(port)) {
        rtc.io_write(port, data);
        return None;
    }
    let value = data
        .iter()
        .rev()
        .fold(0u32, |acc, &b| (acc << 8) | u32::from(b));
    match port {
        PM1A_CNT if value & u32::from(SLP_EN) != 0 => Some(GuestExit::Poweroff),
        RESET_CF9 if value & 0x4 != 0 => Some(GuestExit::Reset("reset through port 0xcf9".into())),
        I8042_CMD if value == 0xfe => Some(GuestExit::Reset(
            "reset through the keyboard controller".into(),
        )),
        _ => None,
    }
}

fn io_in(port: u16, data: &mut [u8], ctx: &VcpuContext) {
    if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&port) {
        if let Ok(mut com1) = ctx.com1.lock() {
            for b in data.iter_mut() {
                *b = com1.read((port - COM1_BASE) as u8);
            }
        }
        return;
    }
    if PciBus::claims_port(port, data.len()) {
        ctx.pci.io_read(port, data);
        return;
    }
    if let Some(ide) = ctx.pci.ide().filter(|_| Piix3::claims_port(port)) {
        match ide.lock() {
            Ok(mut ide) => ide.io_read(port, data),
            Err(_) => data.fill(0xff),
        }
        return;
    }
    if let Some(fw_cfg) = ctx.fw_cfg.as_ref().filter(|_| FwCfg::claims_port(port)) {
        match fw_cfg.lock() {
            Ok(mut fw_cfg) => fw_cfg.io_read(port, data),
            Err(_) => data.fill(0xff),
        }
        return;
    }
    if ctx.debugcon.is_some() && port == crate::firmware::DEBUGCON_PORT {
        // QEMU's isa-debugcon reads back 0xe9: SeaBIOS logs only where it does.
        data.fill(crate::firmware::DEBUGCON_READBACK);
        return;
    }
    if let Some(kbd) = ctx.i8042.as_ref().filter(|_| I8042::claims_port(port)) {
        match kbd.lock() {
            Ok(mut kbd) => data.iter_mut().for_each(|b| *b = kbd.io_read(port)),
            Err(_) => data.fill(0xff),
        }
        return;
    }
    if let Some(Ok(mut pm)) = ctx.pci.pm().map(|pm| pm.lock()) {
        if pm.claims_port(port) {
            pm.io_read(port, data);
            return;
        }
    }
    if let Some(rtc) = ctx.rtc.as_ref().filter(|_| Rtc::claims_port(port)) {
        rtc.io_read(port, data);
        return;
    }
    // Nothing else is decoded: an open bus reads all ones.
    data.fill(0xff);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::fw_cfg::{key, FwCfgConfig, DATA_PORT, DMA_PORT, SELECTOR_PORT};
    use crate::devices::rtc::{reg, RtcConfig, DATA_PORT as CMOS_DATA, INDEX_PORT as CMOS_INDEX};
    use crate::devices::serial::{SerialSink, SinkSpec};

    #[derive(Debug)]
    struct NoLine;

    impl crate::devices::ide::IrqLine for NoLine {
        fn set_level(&self, _: u32, _: bool) {}
    }

    fn context(fw_cfg: bool) -> VcpuContext {
        context_with(fw_cfg, false)
    }

    fn context_with(fw_cfg: bool, rtc: bool) -> VcpuContext {
        let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let sink = SerialSink::open(&SinkSpec::Null).expect("sink");
        let ram = Arc::new(
            ferry_kvm::GuestRam::new(&[(0, 16 << 20)], ferry_kvm::Backing::Anonymous).expect("RAM"),
        );
        let layout = ferry_boot::MemoryLayout::new(16 << 20).expect("layout");
        let fw_cfg = fw_cfg.then(|| {
            let dev = FwCfg::for_vm(&FwCfgConfig::default(), ram, &layout, 1).expect("fw_cfg");
            Arc::new(Mutex::new(dev))
        });
        VcpuContext {
            com1: Arc::new(Mutex::new(Com1::new(irq, sink))),
            pci: Arc::new(PciBus::new(Vec::new(), None, None)),
            fw_cfg,
            i8042: None,
            debugcon: None,
            rtc: rtc.then(|| {
                let line = Arc::new(NoLine);
                let dev = Rtc::for_vm(&RtcConfig::default(), &layout, 1, line).expect("RTC");
                Arc::new(dev)
            }),
            exits: mpsc::channel().0,
            msr_indices: Arc::new(RwLock::new(Vec::new())),
            cpuid: Arc::new(Vec::new()),
            throttle: Arc::new(Default::default()),
        }
    }

    #[test]
    fn fw_cfg_ports_reach_the_device_only_where_the_vm_has_it() {
        let ctx = context(true);
        assert!(io_out(SELECTOR_PORT, &key::SIGNATURE.to_le_bytes(), &ctx).is_none());
        let mut sig = [0u8; 4];
        for b in &mut sig {
            let mut one = [0u8];
            io_in(DATA_PORT, &mut one, &ctx);
            *b = one[0];
        }
        assert_eq!(&sig, b"QEMU");
        let mut dma = [0u8; 4];
        io_in(DMA_PORT, &mut dma, &ctx);
        assert_eq!(&dma, b"QEMU");

        let ctx = context(false);
        io_out(SELECTOR_PORT, &key::SIGNATURE.to_le_bytes(), &ctx);
        let mut one = [0u8];
        io_in(DATA_PORT, &mut one, &ctx);
        assert_eq!(one, [0xff], "an open bus");
    }

    #[test]
    fn rtc_ports_reach_the_device_only_where_the_vm_has_it() {
        let cmos = |ctx: &VcpuContext, index: u8| {
            assert!(io_out(CMOS_INDEX, &[index], ctx).is_none());
            let mut one = [0u8];
            io_in(CMOS_DATA, &mut one, ctx);
            one[0]
        };
        let ctx = context_with(false, true);
        assert_eq!(cmos(&ctx, reg::D), 0x80);
        assert_eq!(cmos(&ctx, reg::B), 0x02);
        // 16 MiB: 15 MiB of extended memory, in KiB.
        assert_eq!(cmos(&ctx, 0x17), 0x00);
        assert_eq!(cmos(&ctx, 0x18), 0x3c);
        io_out(CMOS_INDEX, &[0x40], &ctx);
        io_out(CMOS_DATA, &[0x5a], &ctx);
        assert_eq!(cmos(&ctx, 0x40), 0x5a);
        let mut one = [0u8];
        io_in(CMOS_INDEX, &mut one, &ctx);
        assert_eq!(one, [0xff], "the index port is write-only");

        let ctx = context(true);
        assert_eq!(cmos(&ctx, reg::D), 0xff, "an open bus");
    }
}
