//! The virtio-pci modern transport: PCI config space with the virtio vendor
//! capabilities and MSI-X, and the BAR's registers.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

use ferry_kvm::GuestRam;
use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use virtio_queue::{Queue, QueueT};

use super::persist::{QueueSnapshot, VirtioPciState};
use super::{status, DeviceDiskError, DeviceStateError, VirtioDevice, F_VERSION_1};
use crate::devices::pci::{ConfigSpace, BAR_STRIDE, BAR_WINDOW};

/// BAR0 layout.
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u64 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;
/// Size of BAR0.
pub const BAR_SIZE: u64 = 0x8000;
/// Why a device is stopped (bits of `stopped`): the VMM paused the VM (also at
/// a migration's switch-over, and before a new VM first runs), or a `stop`
/// holds the vCPUs while a migration owns the VM. A stopped device touches no
/// guest memory; notifications wait until it runs again.
pub const STOP_PAUSED: u8 = 1;
pub const STOP_HELD: u8 = 2;
/// "No MSI-X vector".
const NO_VECTOR: u16 = 0xffff;
/// MSI-X message control bits (in the capability's dword 0, upper half).
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_MASKALL: u16 = 1 << 14;

/// A virtio device on PCI, with its registers and queues.
#[derive(Debug)]
pub struct VirtioPci {
    slot: u8,
    id: String,
    config: ConfigSpace,
    msix_cap: usize,
    device: Box<dyn VirtioDevice>,
    ram: Arc<GuestRam>,
    vm: Arc<VmFd>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    msix_config: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<Queue>,
    queue_vectors: Vec<u16>,
    isr: u8,
    msix_table: Vec<[u32; 4]>,
    msix_pba: u64,
    /// `STOP_*` bits; 0 = running.
    stopped: u8,
    /// Queues notified while stopped, processed when the device runs again.
    pending_kicks: u64,
    /// Wakes the device thread (see `worker.rs`), if the device has one.
    waker: Option<UnixStream>,
    /// The device thread is servicing the input queue (it needs no wake-up).
    in_service: bool,
    /// A configuration change came while stopped: its interrupt waits.
    pending_config: bool,
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len = if extra.is_some() { 20 } else { 16 };
    let mut cap = vec![0x09, 0, len, cfg_type, 0, 0, 0, 0];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        cap.extend_from_slice(&x.to_le_bytes());
    }
    cap
}

impl VirtioPci {
    /// Puts `device` in PCI `slot` (1..=31) with its BAR placed for that slot.
    /// `id` names it in logs (libvirt's device id, or the kind and slot).
    pub fn new(
        slot: u8,
        id: String,
        device: Box<dyn VirtioDevice>,
        ram: Arc<GuestRam>,
        vm: Arc<VmFd>,
    ) -> Self {
        let mut config =
            ConfigSpace::new(0x1af4, 0x1040 + device.device_id(), device.pci_class(), 1);
        config.set_subsystem(0x1af4, 0x1100);
        config.set_bar0_mem64(BAR_SIZE, BAR_WINDOW + u64::from(slot) * BAR_STRIDE);
        let vectors = device.queue_count() as u16 + 1;
        let mut msix = vec![0x11, 0];
        msix.extend_from_slice(&(vectors - 1).to_le_bytes());
        msix.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes());
        msix.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        let msix_cap = config.add_capability(&msix, &[(3, 0xc0)]);
        config.add_capability(&virtio_cap(1, COMMON, 0x1000, None), &[]);
        config.add_capability(&virtio_cap(3, ISR, 0x1000, None), &[]);
        config.add_capability(&virtio_cap(4, DEVICE_CFG, DEVICE_CFG_LEN, None), &[]);
        config.add_capability(
            &virtio_cap(2, NOTIFY, 0x1000, Some(NOTIFY_MULTIPLIER as u32)),
            &[],
        );
        let max = device.queue_max_size();
        let queues = (0..device.queue_count())
            .map(|_| Queue::new(max).expect("queue_max_size is a power of two"))
            .collect();
        Self {
            slot,
            id,
            config,
            msix_cap,
            queue_vectors: vec![NO_VECTOR; device.queue_count()],
            msix_table: vec![[0, 0, 0, 1]; usize::from(vectors)],
            device,
            ram,
            vm,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            msix_config: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues,
            isr: 0,
            msix_pba: 0,
            stopped: STOP_PAUSED,
            pending_kicks: 0,
            waker: None,
            in_service: false,
            pending_config: false,
        }
    }

    pub fn slot(&self) -> u8 {
        self.slot
    }

    pub fn kind(&self) -> &'static str {
        self.device.kind()
    }

    /// The id the device was configured with (libvirt's device id).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The device's I/O counters.
    pub fn stats(&self) -> super::DeviceStats {
        self.device.stats()
    }

    /// `kind@slot:identity`: what a migration destination must provide.
    pub fn shape_name(&self) -> String {
        format!(
            "{}@{:02x}:{}",
            self.device.kind(),
            self.slot,
            self.device.identity()
        )
    }

    pub fn config_read(&self, reg: usize) -> u32 {
        self.config.read(reg)
    }

    pub fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data);
        if reg == self.msix_cap / 4 {
            self.deliver_pending();
        }
    }

    fn msix_control(&self) -> u16 {
        u16::from_le_bytes([
            self.config.byte(self.msix_cap + 2),
            self.config.byte(self.msix_cap + 3),
        ])
    }

    /// The offset in BAR0 of an access at guest address `addr`, if BAR0 decodes it.
    pub fn bar_offset(&self, addr: u64, len: usize) -> Option<u64> {
        let base = self.config.bar0()?;
        let offset = addr.checked_sub(base)?;
        (offset.checked_add(len as u64)? <= BAR_SIZE).then_some(offset)
    }

    pub fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < COMMON + COMMON_LEN => self.common_read(o, data),
            ISR => {
                // Reading the ISR clears it.
                data[0] = self.isr;
                self.isr = 0;
            }
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.device.read_config((o - DEVICE_CFG) as usize, data)
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) && data.len() == 4 => {
                let (entry, word) = (((o - MSIX_TABLE) / 16) as usize, ((o % 16) / 4) as usize);
                if let Some(e) = self.msix_table.get(entry) {
                    data.copy_from_slice(&e[word].to_le_bytes());
                }
            }
            o if (MSIX_PBA..MSIX_PBA + 8).contains(&o) => {
                let bytes = self.msix_pba.to_le_bytes();
                let start = (o - MSIX_PBA) as usize;
                let n = data.len().min(8 - start);
                data[..n].copy_from_slice(&bytes[start..start + n]);
            }
            _ => {}
        }
    }

    pub fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON + COMMON_LEN => self.common_write(o, data),
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config((o - DEVICE_CFG) as usize, data)
            }
            o if (NOTIFY..NOTIFY + 0x1000).contains(&o) => {
                let index = ((o - NOTIFY) / NOTIFY_MULTIPLIER) as usize;
                self.kick(index);
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) && data.len() == 4 => {
                let (entry, word) = (((o - MSIX_TABLE) / 16) as usize, ((o % 16) / 4) as usize);
                let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                if let Some(e) = self.msix_table.get_mut(entry) {
                    e[word] = if word == 3 { value & 1 } else { value };
                    if word == 3 {
                        self.deliver_pending();
                    }
                }
            }
            _ => {}
        }
    }

    fn selected_queue(&mut self) -> Option<(&mut Queue, &mut u16)> {
        let i = usize::from(self.queue_select);
        match (self.queues.get_mut(i), self.queue_vectors.get_mut(i)) {
            (Some(q), Some(v)) => Some((q, v)),
            _ => None,
        }
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let mut regs = [0u8; COMMON_LEN as usize];
        let put = |regs: &mut [u8], at: usize, bytes: &[u8]| {
            regs[at..at + bytes.len()].copy_from_slice(bytes)
        };
        put(&mut regs, 0x00, &self.device_feature_select.to_le_bytes());
        let features = match self.device_feature_select {
            0 => self.device.features() as u32,
            1 => (self.device.features() >> 32) as u32,
            _ => 0,
        };
        put(&mut regs, 0x04, &features.to_le_bytes());
        put(&mut regs, 0x08, &self.driver_feature_select.to_le_bytes());
        let driver = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(&mut regs, 0x0c, &driver.to_le_bytes());
        put(&mut regs, 0x10, &self.msix_config.to_le_bytes());
        put(&mut regs, 0x12, &(self.queues.len() as u16).to_le_bytes());
        regs[0x14] = self.status;
        regs[0x15] = self.config_generation;
        put(&mut regs, 0x16, &self.queue_select.to_le_bytes());
        let select = self.queue_select;
        if let Some((q, vector)) = self.selected_queue() {
            let (size, vector, enable) = (q.size(), *vector, u16::from(q.ready()));
            let (desc, avail, used) = (q.desc_table(), q.avail_ring(), q.used_ring());
            put(&mut regs, 0x18, &size.to_le_bytes());
            put(&mut regs, 0x1a, &vector.to_le_bytes());
            put(&mut regs, 0x1c, &enable.to_le_bytes());
            put(&mut regs, 0x1e, &select.to_le_bytes());
            put(&mut regs, 0x20, &desc.to_le_bytes());
            put(&mut regs, 0x28, &avail.to_le_bytes());
            put(&mut regs, 0x30, &used.to_le_bytes());
        }
        let at = offset as usize;
        let n = data.len().min(regs.len() - at);
        data[..n].copy_from_slice(&regs[at..at + n]);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        let v32 = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let v16 = v32 as u16;
        let ready = self
            .queues
            .get(usize::from(self.queue_select))
            .is_some_and(|q| q.ready());
        match offset {
            0x00 => self.device_feature_select = v32,
            0x08 => self.driver_feature_select = v32,
            0x0c if self.status & status::FEATURES_OK == 0 => match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v32),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v32) << 32)
                }
                _ => {}
            },
            0x10 => self.msix_config = v16,
            0x14 => self.write_status(bytes[0]),
            0x16 => self.queue_select = v16,
            0x18 if !ready => {
                if let Some((q, _)) = self.selected_queue() {
                    q.set_size(v16);
                }
            }
            0x1a => {
                if let Some((_, vector)) = self.selected_queue() {
                    *vector = v16;
                }
            }
            0x1c if v16 == 1 => {
                if let Some((q, _)) = self.selected_queue() {
                    q.set_ready(true);
                }
            }
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 if !ready => {
                let (low, high) = if offset % 8 == 0 {
                    (
                        Some(v32),
                        (data.len() == 8)
                            .then(|| u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]])),
                    )
                } else {
                    (None, Some(v32))
                };
                if let Some((q, _)) = self.selected_queue() {
                    match offset & !7 {
                        0x20 => q.set_desc_table_address(low, high),
                        0x28 => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            _ => {}
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0 || self.driver_features & F_VERSION_1 == 0 {
                tracing::warn!(
                    "{}: driver features {:#x} refused (offered {:#x}; VERSION_1 is required)",
                    self.id,
                    self.driver_features,
                    offered
                );
                value &= !status::FEATURES_OK;
            }
        }
        let newly_ok = value & status::DRIVER_OK != 0 && self.status & status::DRIVER_OK == 0;
        self.status = value | (self.status & status::DEVICE_NEEDS_RESET);
        if newly_ok {
            let mem = self.ram.memory();
            if let Some(i) = self
                .queues
                .iter()
                .position(|q| q.ready() && !q.is_valid(mem))
            {
                self.needs_reset(&format!("queue {i} does not fit in guest memory"));
                return;
            }
            for i in 0..self.queues.len() {
                self.kick(i);
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.pending_kicks = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_vectors.fill(NO_VECTOR);
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.msix_config = NO_VECTOR;
        self.queue_select = 0;
        self.status = 0;
        self.isr = 0;
        self.pending_config = false;
    }

    fn needs_reset(&mut self, why: &str) {
        if self.status & status::DEVICE_NEEDS_RESET == 0 {
            tracing::warn!(
                "{}: the driver broke the device ({why}); it needs a reset",
                self.id
            );
            self.status |= status::DEVICE_NEEDS_RESET;
            self.config_generation = self.config_generation.wrapping_add(1);
            self.isr |= 2;
            self.signal(self.msix_config);
        }
    }

    /// Whether the device is live: the driver finished setup and nothing broke.
    pub fn is_active(&self) -> bool {
        self.status & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET) == status::DRIVER_OK
    }

    /// Stops (`on`) or lets run the device for reason `why` (a `STOP_*` bit).
    /// Once no reason is left, the notifications that came meanwhile are
    /// processed and the device thread looks at its input again.
    pub fn set_stopped(&mut self, why: u8, on: bool) {
        let was = self.stopped;
        if on {
            self.stopped |= why;
        } else {
            self.stopped &= !why;
        }
        if was != 0 && self.stopped == 0 {
            if std::mem::take(&mut self.pending_config) {
                self.isr |= 2;
                self.signal(self.msix_config);
            }
            let pending = std::mem::take(&mut self.pending_kicks);
            for i in 0..self.queues.len().min(64) {
                if pending & (1 << i) != 0 {
                    self.kick(i);
                }
            }
            self.wake();
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped != 0
    }

    /// The device's host input (see [`VirtioDevice::input`]), for its thread.
    pub fn input(&self) -> Option<(Arc<std::os::fd::OwnedFd>, usize)> {
        self.device.input()
    }

    /// Whether the device needs a thread: host input or timed work.
    pub fn needs_thread(&self) -> bool {
        self.device.input().is_some() || self.device.timed_queue().is_some()
    }

    /// `kind@slot`: the name of the device's thread.
    pub fn name(&self) -> String {
        format!("{}@{:02x}", self.device.kind(), self.slot)
    }

    /// Where the device thread is woken (see `worker.rs`).
    pub fn attach_waker(&mut self, waker: UnixStream) {
        self.waker = Some(waker);
    }

    fn wake(&mut self) {
        if let Some(w) = &mut self.waker {
            // A full socket already holds a wake-up: nothing is lost.
            let _ = w.write(&[1]);
        }
    }

    /// One round of the device thread: due timed work, then (unless stopped)
    /// the queue that waits on time (virtio-rng) and the input queue. Returns
    /// whether the thread should poll the input fd and when it wants to be
    /// called next.
    pub fn service(&mut self, now: Instant) -> (bool, Option<Instant>) {
        let mut next = self.device.timer(now);
        if self.stopped != 0 {
            return (false, next);
        }
        if let Some(q) = self.device.timed_queue() {
            // Requests that waited for time (a new rate-limit window).
            self.in_service = true;
            self.kick(q);
            self.in_service = false;
            next = self.device.timer(Instant::now());
        }
        let Some((_, q)) = self.device.input() else {
            return (false, next);
        };
        if !self.device.can_take_input() {
            // Out of buffers: the driver's notify wakes the thread.
            return (false, next);
        }
        self.in_service = true;
        self.kick(q);
        self.in_service = false;
        let poll = self.is_active()
            && self.queues.get(q).is_some_and(|q| q.ready())
            && self.device.can_take_input();
        (poll, next)
    }

    /// The balloon behind this function, if it is one (see
    /// [`VirtioDevice::balloon`]).
    pub fn balloon(&mut self) -> Option<&mut super::balloon::Balloon> {
        self.device.balloon()
    }

    /// Tells the driver the device configuration changed (virtio 1.2 section
    /// 4.1.4.3: a new generation, ISR bit 1 and the configuration vector).
    /// While the device is stopped the interrupt waits until it runs again:
    /// a stopped VM's interrupt controllers may be captured already.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.stopped != 0 {
            self.pending_config = true;
            return;
        }
        self.isr |= 2;
        self.signal(self.msix_config);
    }

    /// Wakes the device thread to look at the device's timer again (the
    /// host changed it, e.g. the balloon's stats polling interval).
    pub fn timer_changed(&mut self) {
        self.wake();
    }

    /// Starts announcing the device (RARP for a NIC) from its thread.
    pub fn announce(&mut self, schedule: super::net::AnnounceSchedule) {
        self.device.announce(Instant::now(), schedule);
        self.wake();
    }

    /// Processes queue `index` and interrupts the driver if it wants to hear.
    /// While the device is stopped the notification waits.
    pub fn kick(&mut self, index: usize) {
        if self.stopped != 0 {
            if index < 64 {
                self.pending_kicks |= 1 << index;
            }
            return;
        }
        if !self.in_service && self.device.input().is_some_and(|(_, q)| q == index) {
            // The driver posted receive buffers: the thread may poll again.
            self.wake();
        }
        if !self.is_active() || !self.queues.get(index).is_some_and(|q| q.ready()) {
            return;
        }
        let mem = self.ram.memory();
        match self
            .device
            .process(index, &mut self.queues, mem, self.driver_features)
        {
            Ok(false) => {}
            Ok(true) => {
                let notify = self.queues[index].needs_notification(mem).unwrap_or(true);
                if notify {
                    self.isr |= 1;
                    self.signal(self.queue_vectors[index]);
                }
            }
            Err(why) => self.needs_reset(&format!("queue {index}: {why}")),
        }
        if !self.in_service
            && self.device.timed_queue() == Some(index)
            && self.device.timer(Instant::now()).is_some()
        {
            // A request now waits for time: the device thread sets its alarm.
            self.wake();
        }
    }

    fn signal(&mut self, vector: u16) {
        let control = self.msix_control();
        if vector == NO_VECTOR || control & MSIX_ENABLE == 0 {
            return;
        }
        let Some(entry) = self.msix_table.get(usize::from(vector)) else {
            return;
        };
        if control & MSIX_MASKALL != 0 || entry[3] & 1 != 0 {
            self.msix_pba |= 1 << vector;
            return;
        }
        let msi = kvm_msi {
            address_lo: entry[0],
            address_hi: entry[1],
            data: entry[2],
            ..Default::default()
        };
        if let Err(e) = self.vm.signal_msi(msi) {
            tracing::warn!("{}: cannot signal MSI-X vector {vector}: {e}", self.id);
        }
    }

    fn deliver_pending(&mut self) {
        let control = self.msix_control();
        if control & MSIX_ENABLE == 0 || control & MSIX_MASKALL != 0 {
            return;
        }
        for vector in 0..self.msix_table.len().min(64) {
            if self.msix_pba & (1 << vector) != 0 && self.msix_table[vector][3] & 1 == 0 {
                self.msix_pba &= !(1 << vector);
                self.signal(vector as u16);
            }
        }
    }

    /// Makes the device's writes durable (see [`VirtioDevice::flush`]).
    pub fn flush(&mut self) -> Result<(), DeviceDiskError> {
        self.device.flush().map_err(|e| e.of(&self.id))
    }

    /// See [`VirtioDevice::activate`].
    pub fn activate(&mut self) -> Result<(), DeviceDiskError> {
        self.device.activate().map_err(|e| e.of(&self.id))
    }

    /// See [`VirtioDevice::deactivate`].
    pub fn deactivate(&mut self) -> Result<(), DeviceDiskError> {
        self.device.deactivate().map_err(|e| e.of(&self.id))
    }

    /// The transport's state, for checkpoints; the VM must be paused.
    pub fn state(&self) -> VirtioPciState {
        VirtioPciState {
            slot: self.slot,
            kind: self.device.kind().to_string(),
            config: self.config.registers(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            msix_config: self.msix_config,
            status: self.status,
            config_generation: self.config_generation,
            queue_select: self.queue_select,
            isr: self.isr,
            queues: self
                .queues
                .iter()
                .zip(&self.queue_vectors)
                .map(|(q, &v)| QueueSnapshot::new(&q.state(), v))
                .collect(),
            msix_table: self.msix_table.clone(),
            msix_pba: self.msix_pba,
            device: self.device.save_state(),
        }
    }

    /// Loads `s` into this (never run) device, checking everything a hostile stream
    /// could get wrong before changing anything; the device then reopens its backend
    /// (a failure there leaves the VM unfit to run, which the caller discards).
    pub fn restore(&mut self, s: &VirtioPciState) -> Result<(), DeviceStateError> {
        let who = format!("{}@{:02x}", self.device.kind(), self.slot);
        if s.slot != self.slot || s.kind != self.device.kind() {
            return Err(DeviceStateError::WrongDevice {
                kind: s.kind.clone(),
                slot: s.slot,
                who,
            });
        }
        self.restore_checked(s).map_err(|e| e.of(who))
    }

    /// [`Self::restore`], once the state is known to be this device's.
    fn restore_checked(&mut self, s: &VirtioPciState) -> Result<(), DeviceStateError> {
        let mut config = self.config.clone();
        config.restore(&s.config)?;
        if s.queues.len() != self.queues.len() || s.msix_table.len() != self.msix_table.len() {
            return Err(DeviceStateError::QueueCount {
                queues: s.queues.len(),
                vectors: s.msix_table.len(),
                our_queues: self.queues.len(),
                our_vectors: self.msix_table.len(),
            });
        }
        let offered = self.device.features();
        if s.driver_features & !offered != 0 {
            return Err(DeviceStateError::FeaturesNotOffered {
                features: s.driver_features,
                offered,
            });
        }
        if s.status & status::FEATURES_OK != 0 && s.driver_features & F_VERSION_1 == 0 {
            return Err(DeviceStateError::NoVersion1);
        }
        let vectors = self.msix_table.len();
        let bad_vector = |v: u16| v != NO_VECTOR && usize::from(v) >= vectors;
        if bad_vector(s.msix_config) || s.queues.iter().any(|q| bad_vector(q.vector)) {
            return Err(DeviceStateError::VectorPastTable { vectors });
        }
        if s.msix_table.iter().any(|e| e[3] & !1 != 0)
            || s.msix_pba.checked_shr(vectors as u32).unwrap_or(0) != 0
        {
            return Err(DeviceStateError::MsixBits);
        }
        let max = self.device.queue_max_size();
        let mem = self.ram.memory();
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, snap) in s.queues.iter().enumerate() {
            let q = snap.to_queue(max).map_err(|e| e.of(format!("queue {i}")))?;
            if s.status & status::DRIVER_OK != 0 && q.ready() && !q.is_valid(mem) {
                return Err(DeviceStateError::QueueOutsideRam { index: i });
            }
            queues.push(q);
        }
        // Last of the checks, and itself all-or-nothing.
        self.device.restore_state(s.device.as_ref())?;
        self.config = config;
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.msix_config = s.msix_config;
        self.status = s.status;
        self.config_generation = s.config_generation;
        self.queue_select = s.queue_select;
        self.isr = s.isr;
        self.queue_vectors = s.queues.iter().map(|q| q.vector).collect();
        self.queues = queues;
        self.msix_table = s.msix_table.clone();
        self.msix_pba = s.msix_pba;
        // A notification that reached the source's device while it was stopped
        // (pending there, not part of the state) must not be lost: the first
        // start looks at every queue, as if each had been notified.
        let queues = self.queues.len().min(64) as u32;
        self.pending_kicks = u64::MAX.checked_shr(64 - queues).unwrap_or(0);
        Ok(self.device.after_restore()?)
    }
}
