//! Building, running, pausing and tearing down a VM.

use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, RwLock};

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use ferry_kvm::{Backing, GuestRam};

use crate::cpu::model::{self, CpuModel, CpuidLeaf};
use crate::cpu::{checkpoint_msrs, supported_cpuid, vcpu_cpuid, VcpuState};
use crate::devices::acpi_pm::{AcpiPm, AcpiPmState};
use crate::devices::disk_image::Mode;
use crate::devices::fw_cfg::{FwCfg, FwCfgConfig, FwCfgState};
use crate::devices::i8042::{I8042State, I8042};
use crate::devices::ide::{IdeDriveConfig, IdeError, IdeState, KvmIrqLine, Piix3, PIIX3_SLOT};
use crate::devices::pci::{PciBus, MAX_SLOT};
use crate::devices::rtc::{Rtc, RtcConfig, RtcState};
use crate::devices::serial::{Com1, SerialDeviceState, SerialSink, SinkSpec, COM1_IRQ};
use crate::devices::virtio::balloon::{Balloon, BalloonConfig, BalloonInfo};
use crate::devices::virtio::blk::{Block, BlockConfig, DeviceDiskError, DiskError};
use crate::devices::virtio::net::{AnnounceSchedule, Net, NetConfig};
use crate::devices::virtio::rng::{Rng, RngConfig};
use crate::devices::virtio::{VirtioDevice, VirtioPci, VirtioPciState, STOP_HELD, STOP_PAUSED};
use crate::firmware::{Firmware, FirmwareConfig, FirmwareState};
use crate::throttle::ThrottleState;
use crate::vcpu::{GuestExit, VcpuContext, VcpuHandle};
use crate::VmmError;

/// Most vCPUs a ferry VM may have.
pub const MAX_VCPUS: u32 = 64;

/// What the user asks for.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub backing: Backing,
    pub serial: SinkSpec,
    /// The CPU the guest sees.
    pub cpu: CpuModel,
    /// Virtio devices on PCI bus 0.
    pub virtio: Vec<VirtioSpec>,
    /// Drives on the PIIX3's IDE controller (PCI 00:01.1); with none, the VM
    /// has no PIIX3 and slot 1 is free.
    pub ide: Vec<IdeDriveConfig>,
    /// QEMU's fw_cfg device (ports 0x510, 0x511, 0x514), with what it
    /// offers; `None` for none.
    pub fw_cfg: Option<FwCfgConfig>,
    /// Firmware to boot through (QEMU's `-bios`); `None` for a VM booted
    /// with a kernel ([`Vm::boot`]). A VM with firmware needs fw_cfg.
    pub firmware: Option<FirmwareConfig>,
    /// The MC146818 RTC and CMOS (ports 0x70, 0x71, IRQ 8), with its clock
    /// and boot order; `None` for none.
    pub rtc: Option<RtcConfig>,
}

/// This host's side of a VM that arrives (restore, incoming migration): how
/// its RAM is backed, where COM1 goes, and its devices (disk paths, taps,
/// firmware image), which must match the stream's.
#[derive(Debug, Clone)]
pub struct HostDevices {
    pub backing: Backing,
    pub serial: SinkSpec,
    pub virtio: Vec<VirtioSpec>,
    pub ide: Vec<IdeDriveConfig>,
    pub fw_cfg: Option<FwCfgConfig>,
    pub firmware: Option<FirmwareConfig>,
    pub rtc: Option<RtcConfig>,
}

/// A virtio device and where it sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioSpec {
    /// PCI slot on bus 0 (1 to 31; 0 is the host bridge).
    pub slot: u8,
    /// Names the device in logs and errors (libvirt's device id).
    pub id: String,
    pub device: VirtioDeviceSpec,
}

/// Which virtio device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VirtioDeviceSpec {
    Block(BlockConfig),
    /// A NIC on an open tap.
    Net(NetConfig),
    /// An entropy device; its source is opened when the VM is built.
    Rng(RngConfig),
    /// The memory balloon (one per VM).
    Balloon(BalloonConfig),
}

/// Whether a new VM's disks take their image locks at once, or (incoming
/// migration, restore) only once the state is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disks {
    Active,
    Inactive,
}

impl VirtioSpec {
    fn build(&self, disks: Disks, ram: &Arc<GuestRam>) -> Result<Box<dyn VirtioDevice>, VmmError> {
        Ok(match &self.device {
            VirtioDeviceSpec::Block(c) => {
                // Opened once, as it will run; locked below, with its own error.
                let mode = match disks {
                    Disks::Active => Mode::Active,
                    Disks::Inactive => Mode::Inactive,
                };
                let mut disk =
                    Block::open_as(c, mode).map_err(|e| VmmError::DiskOpen(e.of(&self.id)))?;
                if disks == Disks::Active {
                    disk.activate()
                        .map_err(|e| VmmError::DiskLock(e.of(&self.id)))?;
                }
                Box::new(disk)
            }
            VirtioDeviceSpec::Net(c) => Box::new(Net::new(c).map_err(|source| VmmError::Net {
                id: self.id.clone(),
                source,
            })?),
            VirtioDeviceSpec::Rng(c) => Box::new(Rng::new(c).map_err(|source| VmmError::Rng {
                id: self.id.clone(),
                source,
            })?),
            VirtioDeviceSpec::Balloon(c) => Box::new(Balloon::new(*c, ram.clone())),
        })
    }
}

/// Builds the PCI bus with `specs` and, with IDE drives or `acpi`, the
/// PIIX3 (with `acpi`, also the PIIX4 PM function beside it), checking their
/// slots.
fn build_pci(
    specs: &[VirtioSpec],
    ide: &[IdeDriveConfig],
    acpi: bool,
    ram: &Arc<GuestRam>,
    vm: &Arc<VmFd>,
    disks: Disks,
) -> Result<PciBus, VmmError> {
    let mut devices: Vec<(u8, Arc<Mutex<VirtioPci>>)> = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        if spec.slot == 0 || spec.slot > MAX_SLOT {
            return Err(VmmError::Config(format!(
                "{}: PCI slot {} is out of range (1 to {MAX_SLOT}; 0 is the host bridge)",
                spec.id, spec.slot
            )));
        }
        if spec.slot == PIIX3_SLOT && (!ide.is_empty() || acpi) {
            return Err(VmmError::Config(format!(
                "{}: PCI slot {PIIX3_SLOT:#x} holds the PIIX3 (IDE controller, ACPI power \
                 management) on a VM with IDE drives or ACPI",
                spec.id
            )));
        }
        if let Some(other) = specs[..i].iter().find(|o| o.slot == spec.slot) {
            return Err(VmmError::Config(format!(
                "{} and {} are both in PCI slot {:#x}",
                other.id, spec.id, spec.slot
            )));
        }
        let is_balloon = |s: &VirtioSpec| matches!(s.device, VirtioDeviceSpec::Balloon(_));
        if is_balloon(spec) && specs[..i].iter().any(is_balloon) {
            // QEMU's words: the host's target is one number.
            return Err(VmmError::Config(format!(
                "{}: Only one balloon device is supported",
                spec.id
            )));
        }
    }
    for spec in specs {
        let dev = VirtioPci::new(
            spec.slot,
            spec.id.clone(),
            spec.build(disks, ram)?,
            ram.clone(),
            vm.clone(),
        );
        devices.push((spec.slot, Arc::new(Mutex::new(dev))));
    }
    devices.sort_by_key(|(slot, _)| *slot);
    let piix3 = if ide.is_empty() && !acpi {
        None
    } else {
        let piix3 = Piix3::new(
            ide,
            disks == Disks::Active,
            Arc::new(KvmIrqLine(vm.clone())),
        )
        .map_err(|e| match e {
            IdeError::Drive(d) if matches!(d.source, DiskError::InUse { .. }) => {
                VmmError::DiskLock(d)
            }
            e => VmmError::Ide(e),
        })?;
        Some(Arc::new(Mutex::new(piix3)))
    };
    let pm = acpi.then(|| Arc::new(Mutex::new(AcpiPm::new(Arc::new(KvmIrqLine(vm.clone()))))));
    let bus = PciBus::new(devices, piix3, pm);
    bus.start_workers().map_err(VmmError::Workers)?;
    Ok(bus)
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct KernelConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// SMBIOS tables to put below 1 MiB (QEMU's `pc` machine always has
    /// them); `None` for none. The type 4 processor ID is filled in from the
    /// guest's CPUID.
    pub smbios: Option<ferry_boot::SmbiosConfig>,
}

/// A stream's VM is not the VM this side was configured to receive.
///
/// The `Display` text is for this side's operator and names both sides' values;
/// [`ShapeMismatch::public`] is what the peer of a migration is told, and names only
/// what its own stream said: a stranger learns nothing of this side's
/// configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeMismatch {
    #[error(
        "the VM in this stream has {} MiB of RAM but {} MiB were asked for: use -m {}M or \
         the stream of another VM",
        .stream >> 20, .configured >> 20, .stream >> 20
    )]
    Memory { stream: u64, configured: u64 },
    #[error(
        "the VM in this stream has {stream} vCPUs but {configured} were asked for: use \
         -smp {stream} or the stream of another VM"
    )]
    Vcpus { stream: u32, configured: u32 },
    #[error(
        "the VM has devices {stream:?}; this side was given {configured:?} (give it the same \
         disks, NICs and entropy devices in the same PCI slots, with the same sizes)"
    )]
    Devices {
        stream: Vec<String>,
        configured: Vec<String>,
    },
    #[error(
        "this host's CPU lacks features the guest's CPU has: {}; the guest could crash on \
         its next use of one: migrate it to a host with these features, or start it with a \
         CPU model both hosts support (-cpu qemu64, kvm64)",
        .missing.join(", ")
    )]
    CpuFeatures { missing: Vec<String> },
}

impl ShapeMismatch {
    /// What the source of a migration is told: its own values only (the
    /// destination's are in the destination's log).
    pub fn public(&self) -> String {
        let log = "(the destination's log says what it was configured with)";
        match self {
            Self::Memory { stream, .. } => format!(
                "the destination is not configured for a VM with {} MiB of RAM {log}",
                stream >> 20
            ),
            Self::Vcpus { stream, .. } => {
                format!("the destination is not configured for a VM with {stream} vCPUs {log}")
            }
            Self::Devices { stream, .. } => {
                format!("the destination is not configured with this VM's devices {stream:?} {log}")
            }
            // The guest's own features; the operator needs them to choose a host.
            Self::CpuFeatures { .. } => self.to_string(),
        }
    }
}

/// The VM's shape: what a destination must match before any state is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmShape {
    /// RAM ranges as (guest physical base, bytes), one per KVM slot.
    pub ram_ranges: Vec<(u64, u64)>,
    pub vcpus: u32,
    /// Devices by name, in a stable order.
    pub devices: Vec<String>,
    /// The guest's CPU (without per-vCPU fields): a destination sets exactly this,
    /// and refuses it if its host lacks a feature. Empty in streams from before
    /// CPU models: the destination's host CPU then.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpuid: Vec<CpuidLeaf>,
}

/// VM-wide KVM state: clock, interrupt controllers, PIT.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub clock: kvm_bindings::kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_bindings::kvm_pit_state2,
}

/// State of every emulated device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    pub com1: SerialDeviceState,
    /// Virtio devices by slot (absent in streams from before PCI devices).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtio: Vec<VirtioPciState>,
    /// The PIIX3 and its IDE drives (absent on a VM without IDE, and in
    /// streams from before IDE: the shape check refuses those for a VM
    /// with IDE drives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ide: Option<IdeState>,
    /// fw_cfg (absent on a VM without it, and in streams from before it:
    /// the shape check refuses those for a VM with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fw_cfg: Option<FwCfgState>,
    /// The i440FX host bridge's configuration registers (PAM, SMRAM); absent
    /// in streams from before firmware boot, which keep the reset values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_host: Option<Vec<u32>>,
    /// The i8042 (absent on a VM booted with a kernel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub i8042: Option<I8042State>,
    /// The PIIX4 PM function (absent on a VM without ACPI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acpi_pm: Option<AcpiPmState>,
    /// The firmware ROM (absent on a VM booted with a kernel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<FirmwareState>,
    /// The RTC (absent on a VM without it, and in streams from before it:
    /// the shape check refuses those for a VM with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtc: Option<RtcState>,
}

/// A VM on /dev/kvm.
#[derive(Debug)]
pub struct Vm {
    config: VmConfig,
    // Field order matters for Drop: vCPU threads stop first, then the VM fd closes, and
    // guest RAM (registered with the VM) is unmapped last.
    vcpus: Vec<VcpuHandle>,
    com1: Arc<Mutex<Com1>>,
    com1_irq: EventFd,
    pci: Arc<PciBus>,
    fw_cfg: Option<Arc<Mutex<FwCfg>>>,
    i8042: Option<Arc<Mutex<I8042>>>,
    rtc: Option<Arc<Rtc>>,
    vm: Arc<VmFd>,
    _kvm: Kvm,
    /// The firmware ROM, mapped into `vm` (dropped after it).
    firmware: Option<Firmware>,
    ram: Arc<GuestRam>,
    exits: Receiver<GuestExit>,
    running: bool,
    sink: SerialSink,
    throttle: Arc<ThrottleState>,
    /// The guest's CPUID (without per-vCPU fields), for the migration shape.
    cpuid: Vec<CpuidLeaf>,
    /// The VM arrived (incoming migration or restore): its first resume
    /// announces its NICs.
    announce_on_resume: bool,
    /// The schedule of that announce (QEMU's `announce-*` migration
    /// parameters).
    announce_schedule: AnnounceSchedule,
    /// Measures the guest's dirty rate on request (`calc-dirty-rate`).
    dirty_rate: crate::dirty_rate::DirtyRateMeter,
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Device threads first: they hold the devices, which hold guest RAM.
        self.pci.shutdown();
        if let Some(rtc) = &self.rtc {
            rtc.shutdown();
        }
    }
}

impl Vm {
    /// Creates the VM, its RAM, irqchip, PIT, COM1 and stopped vCPUs (not booted yet).
    pub fn create(config: VmConfig) -> Result<Self, VmmError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmmError::Config(format!(
                "{} vCPUs requested; ferry supports 1 to {MAX_VCPUS}",
                config.vcpus
            )));
        }
        let layout = ferry_boot::MemoryLayout::new(config.mem_bytes)
            .map_err(|e| VmmError::Config(e.to_string()))?;
        let ranges: Vec<(u64, u64)> = layout.ranges().iter().map(|(a, s)| (a.0, *s)).collect();
        Self::create_with_ranges(config, &ranges, Disks::Active)
    }

    fn create_with_ranges(
        config: VmConfig,
        ranges: &[(u64, u64)],
        disks: Disks,
    ) -> Result<Self, VmmError> {
        if config.firmware.is_some() && config.fw_cfg.is_none() {
            return Err(VmmError::Config(
                "a VM booted through firmware needs fw_cfg, which SeaBIOS reads its \
                 configuration from: give it one (ferry-vm --fw-cfg)"
                    .into(),
            ));
        }
        // The devices that describe guest RAM (fw_cfg, the RTC's CMOS, the
        // firmware's tables) describe it as the boot paths lay it out.
        let layout = ferry_boot::MemoryLayout::new(config.mem_bytes)
            .map_err(|e| VmmError::Config(e.to_string()))?;
        ferry_kvm::install_kick_handler().map_err(|e| VmmError::Config(e.to_string()))?;
        let kvm = Kvm::new().map_err(|e| {
            VmmError::NoKvm(format!(
                "cannot open /dev/kvm ({e}): load the kvm module and give this user access to /dev/kvm"
            ))
        })?;
        let vm = Arc::new(
            kvm.create_vm()
                .map_err(|e| VmmError::Kvm("KVM_CREATE_VM", e))?,
        );
        let ram = Arc::new(GuestRam::new(ranges, config.backing)?);
        ram.register(&vm, false)?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(|e| VmmError::Kvm("KVM_SET_TSS_ADDR", e))?;
        vm.set_identity_map_address(0xfffb_c000)
            .map_err(|e| VmmError::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        vm.create_irq_chip()
            .map_err(|e| VmmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(|e| VmmError::Kvm("KVM_CREATE_PIT2", e))?;

        let com1_irq = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmmError::Io("cannot create an eventfd".into(), e))?;
        vm.register_irqfd(&com1_irq, COM1_IRQ)
            .map_err(|e| VmmError::Kvm("KVM_IRQFD", e))?;
        let sink = SerialSink::open(&config.serial).map_err(|e| VmmError::Config(e.to_string()))?;
        let irq = com1_irq
            .try_clone()
            .map_err(|e| VmmError::Io("cannot clone an eventfd".into(), e))?;
        let com1 = Arc::new(Mutex::new(Com1::new(irq, sink.clone())));
        let acpi = config.firmware.as_ref().is_some_and(|f| f.acpi);
        let pci = Arc::new(build_pci(
            &config.virtio,
            &config.ide,
            acpi,
            &ram,
            &vm,
            disks,
        )?);
        let firmware = match &config.firmware {
            Some(fw) => {
                let firmware = Firmware::load(fw).map_err(VmmError::Firmware)?;
                firmware.register(&vm).map_err(VmmError::Firmware)?;
                firmware.copy_isa_bios(&ram).map_err(VmmError::Firmware)?;
                Some(firmware)
            }
            None => None,
        };
        let debugcon = match config.firmware.as_ref().and_then(|f| f.debugcon.as_ref()) {
            Some(path) => Some(Arc::new(Mutex::new(
                std::os::unix::fs::OpenOptionsExt::mode(
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true),
                    0o600,
                )
                .open(path)
                .map_err(|e| {
                    VmmError::Io(
                        format!("cannot create the debug console {}", path.display()),
                        e,
                    )
                })?,
            ))),
            None => None,
        };
        // QEMU's pc has an i8042; ferry gives one to the guests that boot as a
        // pc does, through firmware.
        let i8042 = firmware
            .as_ref()
            .map(|_| Arc::new(Mutex::new(I8042::new(Arc::new(KvmIrqLine(vm.clone()))))));
        let fw_cfg = match &config.fw_cfg {
            Some(c) => {
                let vcpus = u16::try_from(config.vcpus).unwrap_or(u16::MAX);
                let dev = FwCfg::for_vm(c, ram.clone(), &layout, vcpus)
                    .map_err(|e| VmmError::Config(e.to_string()))?;
                Some(Arc::new(Mutex::new(dev)))
            }
            None => None,
        };
        let rtc = match &config.rtc {
            Some(c) => {
                let dev = Rtc::for_vm(c, &layout, config.vcpus, Arc::new(KvmIrqLine(vm.clone())))
                    .map_err(|e| VmmError::Config(crate::error_chain(&e)))?;
                Some(Arc::new(dev))
            }
            None => None,
        };

        let base = model::resolve(&supported_cpuid(&kvm)?, &config.cpu)?;
        let cpuid: Vec<CpuidLeaf> = base.iter().map(Into::into).collect();
        let mut fds: Vec<VcpuFd> = Vec::new();
        for i in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(i))
                .map_err(|e| VmmError::Kvm("KVM_CREATE_VCPU", e))?;
            let tsc_khz = fd.get_tsc_khz().unwrap_or(0);
            let table = vcpu_cpuid(&base, i, config.vcpus, tsc_khz)?;
            fd.set_cpuid2(&table)
                .map_err(|e| VmmError::Kvm("KVM_SET_CPUID2", e))?;
            fds.push(fd);
        }
        if let (Some(fw), Some(dev)) = (&config.firmware, &fw_cfg) {
            let mut dev = dev
                .lock()
                .map_err(|_| VmmError::Config("fw_cfg device lock poisoned".into()))?;
            firmware_files(fw, &layout, &cpuid, &config, &mut dev)?;
        }
        let host_cpu = matches!(config.cpu, CpuModel::Host);
        let msr_indices = Arc::new(RwLock::new(checkpoint_msrs(
            &kvm, &fds[0], &base, host_cpu,
        )?));
        let (exit_tx, exit_rx) = mpsc::channel();
        let throttle = Arc::new(ThrottleState::default());
        let ctx = VcpuContext {
            com1: com1.clone(),
            pci: pci.clone(),
            fw_cfg: fw_cfg.clone(),
            i8042: i8042.clone(),
            debugcon,
            rtc: rtc.clone(),
            exits: exit_tx,
            msr_indices,
            cpuid: Arc::new(base),
            throttle: throttle.clone(),
        };
        let mut vcpus = Vec::with_capacity(fds.len());
        for (i, fd) in fds.into_iter().enumerate() {
            vcpus.push(VcpuHandle::spawn(i as u32, fd, ctx.clone())?);
        }
        Ok(Self {
            config,
            vcpus,
            com1,
            com1_irq,
            pci,
            fw_cfg,
            i8042,
            rtc,
            vm,
            _kvm: kvm,
            firmware,
            ram,
            exits: exit_rx,
            running: false,
            sink,
            throttle,
            cpuid,
            announce_on_resume: false,
            announce_schedule: AnnounceSchedule::default(),
            dirty_rate: crate::dirty_rate::DirtyRateMeter::default(),
        })
    }

    /// Loads a kernel (PVH ELF, ELF vmlinux or bzImage) and sets up the boot
    /// vCPU; on a VM with firmware, the firmware boots it instead (see
    /// [`Self::boot_through_firmware`]).
    pub fn boot(&mut self, kernel: &KernelConfig) -> Result<(), VmmError> {
        if self.firmware.is_some() {
            return self.boot_through_firmware(kernel);
        }
        let layout = ferry_boot::MemoryLayout::new(self.config.mem_bytes)
            .map_err(|e| VmmError::Config(e.to_string()))?;
        let mut image = File::open(&kernel.kernel).map_err(|e| {
            VmmError::Io(format!("cannot open kernel {}", kernel.kernel.display()), e)
        })?;
        let mut initrd = match &kernel.initrd {
            Some(p) => Some(
                File::open(p)
                    .map_err(|e| VmmError::Io(format!("cannot open initrd {}", p.display()), e))?,
            ),
            None => None,
        };
        let info = ferry_boot::load_kernel(
            self.ram.memory(),
            &layout,
            &mut image,
            initrd.as_mut().map(|f| f as &mut dyn ferry_boot::ReadSeek),
            &kernel.cmdline,
        )
        .map_err(|e| VmmError::Boot(format!("kernel {}: {e}", kernel.kernel.display())))?;
        // Without firmware or ACPI, the MP table is how a Linux guest finds its other
        // vCPUs and the I/O APIC.
        ferry_boot::write_mptable(self.ram.memory(), self.config.vcpus)
            .map_err(|e| VmmError::Boot(e.to_string()))?;
        // SMBIOS lives in guest RAM: a migration or checkpoint carries it, and an
        // incoming VM, which is never booted, keeps the source's.
        if let Some(smbios) = &kernel.smbios {
            let mut smbios = smbios.clone();
            if let Some(leaf1) = self.cpuid.iter().find(|l| l.function == 1) {
                smbios.processor_id = u64::from(leaf1.eax) | (u64::from(leaf1.edx) << 32);
            }
            ferry_boot::write_smbios(self.ram.memory(), &layout, &smbios)
                .map_err(|e| VmmError::Boot(crate::error_chain(&e)))?;
        }
        let boot = BootVcpu { info };
        let state = boot.initial_state(self)?;
        self.vcpus[0].restore(state)?;
        Ok(())
    }

    /// A PVH kernel booted through the firmware, as QEMU boots `-kernel` on
    /// its `pc` machine: the kernel's segments in guest RAM, its entry and
    /// command line in fw_cfg, and QEMU's `pvh.bin` option ROM (from
    /// Debian's `qemu-system-data`) first in `bootorder`. SeaBIOS sets the
    /// machine up (ACPI, SMBIOS, PCI, the E820 map), then runs the ROM, which
    /// builds the PVH start info (with the RSDP) and jumps to the kernel. The
    /// vCPU starts at the reset vector.
    fn boot_through_firmware(&mut self, kernel: &KernelConfig) -> Result<(), VmmError> {
        if kernel.initrd.is_some() {
            return Err(VmmError::Config(
                "an initrd through firmware is not supported (QEMU's pvh.bin passes none): \
                 boot the kernel directly, without --firmware"
                    .into(),
            ));
        }
        let layout = ferry_boot::MemoryLayout::new(self.config.mem_bytes)
            .map_err(|e| VmmError::Config(e.to_string()))?;
        let mut image = File::open(&kernel.kernel).map_err(|e| {
            VmmError::Io(format!("cannot open kernel {}", kernel.kernel.display()), e)
        })?;
        let info = ferry_boot::load_kernel(
            self.ram.memory(),
            &layout,
            &mut image,
            None,
            &kernel.cmdline,
        )
        .map_err(|e| VmmError::Boot(format!("kernel {}: {e}", kernel.kernel.display())))?;
        if !matches!(info.protocol, ferry_boot::BootProtocol::Pvh { .. }) {
            return Err(VmmError::Boot(format!(
                "kernel {}: through firmware ferry boots PVH ELF kernels (QEMU's pvh.bin); \
                 boot a bzImage or vmlinux directly, without --firmware",
                kernel.kernel.display()
            )));
        }
        let entry = u32::try_from(info.entry)
            .map_err(|_| VmmError::Boot(format!("PVH entry {:#x} is above 4 GiB", info.entry)))?;
        let rom_path = std::path::Path::new(crate::firmware::QEMU_ROM_DIR).join("pvh.bin");
        let rom = std::fs::read(&rom_path).map_err(|e| {
            VmmError::Io(
                format!(
                    "cannot read {} (QEMU's PVH option ROM, in Debian's qemu-system-data: \
                     install it, or boot the kernel without --firmware)",
                    rom_path.display()
                ),
                e,
            )
        })?;
        let fw_cfg = self
            .fw_cfg
            .as_ref()
            .ok_or_else(|| VmmError::Config("a VM booted through firmware needs fw_cfg".into()))?;
        let mut dev = fw_cfg
            .lock()
            .map_err(|_| VmmError::Config("fw_cfg device lock poisoned".into()))?;
        use crate::devices::fw_cfg::key;
        let mut cmdline = kernel.cmdline.clone().into_bytes();
        cmdline.push(0);
        dev.add_item(key::KERNEL_ENTRY, entry.to_le_bytes().to_vec());
        dev.add_item(
            key::CMDLINE_SIZE,
            (cmdline.len() as u32).to_le_bytes().to_vec(),
        );
        dev.add_item(key::CMDLINE_DATA, cmdline);
        dev.add_item(key::SETUP_SIZE, 0u32.to_le_bytes().to_vec());
        dev.add_item(key::SETUP_DATA, Vec::new());
        let err = |e: crate::devices::fw_cfg::FwCfgError| VmmError::Config(e.to_string());
        dev.add_file(crate::firmware::PVH_ROM_FILE, rom)
            .map_err(err)?;
        let old = dev.file("bootorder").unwrap_or_default().to_vec();
        let mut order = format!("{}\n", crate::firmware::PVH_ROM_BOOT_PATH).into_bytes();
        if old.is_empty() {
            *order.last_mut().unwrap_or(&mut 0) = 0;
        } else {
            order.extend_from_slice(&old);
        }
        dev.replace_file("bootorder", order).map_err(err)?;
        Ok(())
    }

    /// Lets every vCPU and device run. The first resume of a VM that arrived
    /// by incoming migration or restore also announces its NICs (see
    /// [`Self::announce`]): this is the one hook every way of starting such a VM
    /// goes through (incoming autostart, the control socket's and QMP's `cont`).
    pub fn resume(&mut self) -> Result<(), VmmError> {
        // Disks that let go of their images (a migration's switch-over) take
        // them back first: refused while another VM (the destination) holds
        // them, so the guest never runs on two hosts at once.
        self.activate_disks()?;
        self.pci.set_stopped(STOP_PAUSED, false);
        if let Some(rtc) = &self.rtc {
            rtc.set_stopped(STOP_PAUSED, false);
        }
        for v in &self.vcpus {
            v.resume()?;
        }
        self.running = true;
        if std::mem::take(&mut self.announce_on_resume) {
            self.announce();
        }
        Ok(())
    }

    /// Stops every vCPU and waits until none is inside the guest; then stops the
    /// devices, so that from the return on nothing writes guest memory (a
    /// migration's final dirty sync and device capture, checkpoints). Frames that
    /// arrive meanwhile wait in the tap.
    pub fn pause(&mut self) -> Result<(), VmmError> {
        for v in &self.vcpus {
            v.request_pause();
        }
        for v in &self.vcpus {
            v.wait_paused()?;
        }
        self.pci.set_stopped(STOP_PAUSED, true);
        if let Some(rtc) = &self.rtc {
            rtc.set_stopped(STOP_PAUSED, true);
        }
        self.running = false;
        Ok(())
    }

    /// Whether the next resume announces the NICs (the VM arrived by incoming
    /// migration or restore and has not run since).
    pub fn will_announce(&self) -> bool {
        self.announce_on_resume
    }

    /// Tells the network where the VM now is, as QEMU's `announce_self` and
    /// vMotion do after a switch-over: each NIC sends RARP frames from its MAC
    /// on the VM's announce schedule (QEMU's default: 5 frames, gaps of 50,
    /// 150, 250 and 350 ms, about 0.8 s in all) from its device thread; this
    /// returns at once.
    pub fn announce(&self) {
        self.pci.announce(self.announce_schedule, None);
    }

    /// QEMU's `announce-self`: the NICs named in `only` (by device id; all if
    /// `None`) announce on `schedule`. Returns the ids of those that do.
    pub fn announce_with(
        &self,
        schedule: AnnounceSchedule,
        only: Option<&[String]>,
    ) -> Vec<String> {
        self.pci.announce(schedule, only)
    }

    /// This VM's dirty-rate meter (one measurement at a time).
    pub fn dirty_rate(&self) -> &crate::dirty_rate::DirtyRateMeter {
        &self.dirty_rate
    }

    /// The schedule of the announce an arrived VM sends on its first resume
    /// (QEMU's `announce-*` migration parameters).
    pub fn set_announce_schedule(&mut self, schedule: AnnounceSchedule) {
        self.announce_schedule = schedule;
    }

    /// A handle that stops and restarts the vCPUs from another thread while a
    /// migration owns the VM.
    pub fn hold_handle(&self) -> crate::throttle::VcpuHold {
        let threads = self.vcpus.iter().filter_map(VcpuHandle::pthread).collect();
        let pci = self.pci.clone();
        let rtc = self.rtc.clone();
        let stop_devices = move |on: bool| {
            pci.set_stopped(STOP_HELD, on);
            if let Some(rtc) = &rtc {
                rtc.set_stopped(STOP_HELD, on);
            }
        };
        crate::throttle::VcpuHold::new(self.throttle.clone(), threads, Arc::new(stop_devices))
    }

    /// Turns a hold (see [`Self::hold_handle`]) into a real pause, for whoever
    /// gets the VM back from a migration: returns whether the VM was held.
    pub fn take_hold(&mut self) -> Result<bool, VmmError> {
        let hold = self.hold_handle();
        if !hold.is_held() {
            return Ok(false);
        }
        self.pause()?;
        hold.release();
        Ok(true)
    }

    /// Starts throttling this VM's vCPUs (percent set on the returned handle).
    pub fn throttle(&self) -> crate::throttle::Throttle {
        let threads: Vec<libc::pthread_t> =
            self.vcpus.iter().filter_map(VcpuHandle::pthread).collect();
        crate::throttle::Throttle::start(self.throttle.clone(), move || {
            for &t in &threads {
                let _ = ferry_kvm::kick(t);
            }
        })
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Guest exits reported by vCPU threads.
    pub fn exits(&self) -> &Receiver<GuestExit> {
        &self.exits
    }

    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Each virtio device's id and I/O counters, by slot.
    pub fn device_stats(&self) -> Vec<(String, crate::devices::virtio::DeviceStats)> {
        let mut stats = Vec::new();
        self.pci
            .for_each(|d| stats.push((d.id().to_string(), d.stats())));
        stats
    }

    /// Each IDE drive's id and I/O counters, by position.
    pub fn ide_stats(&self) -> Vec<(String, crate::devices::virtio::blk::BlockStats)> {
        self.pci
            .ide()
            .and_then(|p| p.lock().ok().map(|p| p.stats()))
            .unwrap_or_default()
    }

    /// Runs `f` on the balloon's function; `None` without a balloon.
    fn with_balloon<R>(&self, f: impl FnOnce(&mut VirtioPci) -> R) -> Option<R> {
        let mut f = Some(f);
        let mut out = None;
        self.pci.for_each(|dev| {
            if dev.balloon().is_some() {
                if let Some(f) = f.take() {
                    out = Some(f(dev));
                }
            }
        });
        out
    }

    /// The balloon as the guest left it (target, actual, stats); `None`
    /// without a balloon.
    pub fn balloon_info(&self) -> Option<BalloonInfo> {
        self.with_balloon(|dev| dev.balloon().map(|b| b.info()))
            .flatten()
    }

    /// Asks the guest to give back `pages` 4 KiB pages (the balloon's size,
    /// not the guest's): a configuration change tells the driver.
    pub fn set_balloon_target(&self, pages: u64) -> Result<(), VmmError> {
        self.with_balloon(|dev| {
            let changed = dev
                .balloon()
                .map_or(Ok(false), |b| b.set_target(pages))
                .map_err(VmmError::Balloon)?;
            if changed {
                dev.config_changed();
            }
            Ok(())
        })
        .unwrap_or(Err(VmmError::NoBalloon))
    }

    /// Gives the guest's stats buffer back every `secs` seconds for fresh
    /// values (0: never).
    pub fn set_balloon_stats_interval(&self, secs: u32) -> Result<(), VmmError> {
        self.with_balloon(|dev| {
            if let Some(b) = dev.balloon() {
                b.set_poll_interval(secs);
            }
            dev.timer_changed();
        })
        .ok_or(VmmError::NoBalloon)
    }

    /// The balloon's `actual` (pages the driver says the balloon holds) if
    /// the driver changed it since the last call: QEMU's BALLOON_CHANGE.
    pub fn take_balloon_change(&self) -> Option<u32> {
        self.with_balloon(|dev| dev.balloon().and_then(|b| b.take_actual_change()))
            .flatten()
    }

    /// PCI bus 0 and its virtio devices.
    pub fn pci(&self) -> &Arc<PciBus> {
        &self.pci
    }

    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn serial_pty(&self) -> Option<&std::path::Path> {
        self.sink.pty_path.as_deref()
    }

    /// The guest's CPUID (without per-vCPU fields): what its CPU model
    /// resolved to on this host, or the CPU it brought along.
    pub fn cpuid(&self) -> &[CpuidLeaf] {
        &self.cpuid
    }

    pub fn shape(&self) -> VmShape {
        VmShape {
            ram_ranges: self.ram.ranges(),
            vcpus: self.config.vcpus,
            devices: self.device_names(),
            cpuid: self.cpuid.clone(),
        }
    }

    /// The devices a destination must provide, in a stable order.
    fn device_names(&self) -> Vec<String> {
        let mut names = vec!["com1".to_string()];
        self.pci.for_each(|dev| names.push(dev.shape_name()));
        if let Some(ide) = self.pci.ide() {
            if let Ok(ide) = ide.lock() {
                names.extend(ide.shape_names());
            }
        }
        if let Some(fw_cfg) = &self.fw_cfg {
            if let Ok(fw_cfg) = fw_cfg.lock() {
                names.extend(fw_cfg.shape_names());
            }
        }
        if let Some(rtc) = &self.rtc {
            names.extend(rtc.shape_names());
        }
        if self.pci.pm().is_some() {
            names.push(format!("piix4-pm@{PIIX3_SLOT:02x}.3"));
        }
        if self.i8042.is_some() {
            names.push("i8042".to_string());
        }
        if let Some(fw) = &self.firmware {
            names.push(fw.shape_name());
        }
        names
    }

    /// State of every vCPU; the VM must be paused.
    pub fn capture_vcpus(&self) -> Result<Vec<VcpuState>, VmmError> {
        self.vcpus.iter().map(|v| v.capture()).collect()
    }

    /// VM-wide state; the VM must be paused.
    pub fn capture_vm(&self) -> Result<VmState, VmmError> {
        let chip = |id| {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut c)
                .map_err(|e| VmmError::Kvm("KVM_GET_IRQCHIP", e))?;
            Ok::<_, VmmError>(c)
        };
        Ok(VmState {
            clock: self
                .vm
                .get_clock()
                .map_err(|e| VmmError::Kvm("KVM_GET_CLOCK", e))?,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self
                .vm
                .get_pit2()
                .map_err(|e| VmmError::Kvm("KVM_GET_PIT2", e))?,
        })
    }

    pub fn capture_devices(&self) -> Result<DevicesState, VmmError> {
        let com1 = self
            .com1
            .lock()
            .map_err(|_| VmmError::Config("serial device lock poisoned".into()))?;
        let mut virtio = Vec::new();
        for (_, dev) in self.pci.devices() {
            let mut dev = dev
                .lock()
                .map_err(|_| VmmError::Config("virtio device lock poisoned".into()))?;
            // What the guest wrote must be on the disk before another host reads it.
            dev.flush().map_err(VmmError::DiskFlush)?;
            virtio.push(dev.state());
        }
        let ide = match self.pci.ide() {
            Some(ide) => {
                let mut ide = ide
                    .lock()
                    .map_err(|_| VmmError::Config("IDE controller lock poisoned".into()))?;
                ide.flush().map_err(VmmError::DiskFlush)?;
                Some(ide.state())
            }
            None => None,
        };
        let fw_cfg = match &self.fw_cfg {
            Some(dev) => Some(
                dev.lock()
                    .map_err(|_| VmmError::Config("fw_cfg device lock poisoned".into()))?
                    .state(),
            ),
            None => None,
        };
        Ok(DevicesState {
            com1: com1.state(),
            virtio,
            ide,
            fw_cfg,
            pci_host: Some(self.pci.bridge_registers()),
            i8042: match &self.i8042 {
                Some(k) => Some(
                    k.lock()
                        .map_err(|_| VmmError::Config("i8042 lock poisoned".into()))?
                        .state(),
                ),
                None => None,
            },
            acpi_pm: match self.pci.pm() {
                Some(pm) => Some(
                    pm.lock()
                        .map_err(|_| VmmError::Config("PIIX4 PM lock poisoned".into()))?
                        .state(),
                ),
                None => None,
            },
            firmware: self.firmware.as_ref().map(Firmware::state),
            rtc: self.rtc.as_ref().map(|r| r.state()),
        })
    }

    /// Takes every disk's image locks (see [`VirtioDevice::activate`]); a
    /// no-op for disks that hold them.
    pub fn activate_disks(&self) -> Result<(), VmmError> {
        self.each_disk_lock(VirtioPci::activate, Piix3::activate)
    }

    /// Lets go of every disk's image locks, for a migration's destination to
    /// take (see [`VirtioDevice::deactivate`]); the VM is paused and its disks
    /// flushed. [`Vm::resume`] takes them back.
    pub fn deactivate_disks(&self) -> Result<(), VmmError> {
        self.each_disk_lock(VirtioPci::deactivate, Piix3::deactivate)
    }

    /// Runs `step` (take or release image locks) on every virtio device, in
    /// slot order, then `ide_step` on the IDE drives, stopping at the first
    /// failure.
    fn each_disk_lock(
        &self,
        step: impl Fn(&mut VirtioPci) -> Result<(), DeviceDiskError>,
        ide_step: impl Fn(&mut Piix3) -> Result<(), DeviceDiskError>,
    ) -> Result<(), VmmError> {
        for (_, dev) in self.pci.devices() {
            let mut dev = dev
                .lock()
                .map_err(|_| VmmError::Config("virtio device lock poisoned".into()))?;
            step(&mut dev).map_err(VmmError::DiskLock)?;
        }
        if let Some(ide) = self.pci.ide() {
            let mut ide = ide
                .lock()
                .map_err(|_| VmmError::Config("IDE controller lock poisoned".into()))?;
            ide_step(&mut ide).map_err(VmmError::DiskLock)?;
        }
        Ok(())
    }

    /// Creates a VM of exactly `shape` (for restore and incoming migration)
    /// with this host's side of it, `host`, whose devices must match the
    /// shape's.
    pub fn create_for_shape(shape: &VmShape, host: HostDevices) -> Result<Self, VmmError> {
        let mem_bytes = shape.ram_ranges.iter().map(|r| r.1).sum();
        let config = VmConfig {
            mem_bytes,
            vcpus: shape.vcpus,
            backing: host.backing,
            serial: host.serial,
            cpu: if shape.cpuid.is_empty() {
                CpuModel::Host
            } else {
                CpuModel::Exact(shape.cpuid.clone())
            },
            virtio: host.virtio,
            ide: host.ide,
            fw_cfg: host.fw_cfg,
            firmware: host.firmware,
            rtc: host.rtc,
        };
        // The disks take their locks when the state is loaded: a migration's
        // source still runs on them now.
        let vm = Self::create_with_ranges(config, &shape.ram_ranges, Disks::Inactive)?;
        let ours = vm.device_names();
        if shape.devices != ours {
            return Err(ShapeMismatch::Devices {
                stream: shape.devices.clone(),
                configured: ours,
            }
            .into());
        }
        Ok(vm)
    }

    /// Loads captured state into this (never run) VM. All of it was validated by the
    /// caller's decoding; KVM may still refuse values, which is reported.
    pub fn restore_state(
        &mut self,
        vcpus: Vec<VcpuState>,
        vm: &VmState,
        devices: &DevicesState,
    ) -> Result<(), VmmError> {
        if vcpus.len() != self.vcpus.len() {
            return Err(VmmError::Restore(format!(
                "state for {} vCPUs, VM has {}",
                vcpus.len(),
                self.vcpus.len()
            )));
        }
        // The IDE state is checked before anything changes (its restore
        // below checks it again, and applies it all or nothing).
        self.check_ide_state(devices.ide.as_ref())?;
        self.check_fw_cfg_state(devices.fw_cfg.as_ref())?;
        self.check_firmware_state(devices.firmware.as_ref())?;
        if let Some(regs) = &devices.pci_host {
            self.pci.check_bridge(regs).map_err(VmmError::DeviceState)?;
        }
        self.check_pm_state(devices.acpi_pm.as_ref())?;
        match (&self.i8042, &devices.i8042) {
            (None, None) => {}
            (Some(_), Some(state)) => I8042::check(state).map_err(VmmError::DeviceState)?,
            (ours, _) => {
                return Err(presence_mismatch(
                    ours.is_some(),
                    "i8042 state",
                    "has an i8042",
                    "has no i8042",
                ))
            }
        }
        self.check_rtc_state(devices.rtc.as_ref())?;
        let mut clock = vm.clock;
        clock.flags = 0;
        self.vm
            .set_clock(&clock)
            .map_err(|e| VmmError::Kvm("KVM_SET_CLOCK", e))?;
        for chip in [&vm.pic_master, &vm.pic_slave, &vm.ioapic] {
            self.vm
                .set_irqchip(chip)
                .map_err(|e| VmmError::Kvm("KVM_SET_IRQCHIP", e))?;
        }
        self.vm
            .set_pit2(&vm.pit)
            .map_err(|e| VmmError::Kvm("KVM_SET_PIT2", e))?;
        for (handle, state) in self.vcpus.iter().zip(vcpus) {
            if state.index != handle.index {
                return Err(VmmError::Restore(format!(
                    "vCPU state {} arrived in slot {}",
                    state.index, handle.index
                )));
            }
            handle.restore(state)?;
        }
        let irq = self
            .com1_irq
            .try_clone()
            .map_err(|e| VmmError::Io("cannot clone an eventfd".into(), e))?;
        let com1 = Com1::from_state(&devices.com1, irq, self.sink.clone())
            .map_err(VmmError::DeviceState)?;
        if devices.virtio.len() != self.pci.devices().len() {
            return Err(VmmError::Restore(format!(
                "state for {} virtio devices, VM has {}",
                devices.virtio.len(),
                self.pci.devices().len()
            )));
        }
        for (state, (_, dev)) in devices.virtio.iter().zip(self.pci.devices()) {
            dev.lock()
                .map_err(|_| VmmError::Config("virtio device lock poisoned".into()))?
                .restore(state)
                .map_err(VmmError::DeviceState)?;
        }
        if let (Some(ide), Some(state)) = (self.pci.ide(), &devices.ide) {
            ide.lock()
                .map_err(|_| VmmError::Config("IDE controller lock poisoned".into()))?
                .restore(state)
                .map_err(VmmError::DeviceState)?;
        }
        if let (Some(dev), Some(state)) = (&self.fw_cfg, &devices.fw_cfg) {
            dev.lock()
                .map_err(|_| VmmError::Config("fw_cfg device lock poisoned".into()))?
                .restore(state)
                .map_err(VmmError::DeviceState)?;
        }
        if let Some(regs) = &devices.pci_host {
            self.pci
                .restore_bridge(regs)
                .map_err(VmmError::DeviceState)?;
        }
        if let (Some(k), Some(state)) = (&self.i8042, &devices.i8042) {
            k.lock()
                .map_err(|_| VmmError::Config("i8042 lock poisoned".into()))?
                .restore(state)
                .map_err(VmmError::DeviceState)?;
        }
        if let (Some(pm), Some(state)) = (self.pci.pm(), &devices.acpi_pm) {
            pm.lock()
                .map_err(|_| VmmError::Config("PIIX4 PM lock poisoned".into()))?
                .restore(state)
                .map_err(VmmError::DeviceState)?;
        }
        if let (Some(fw), Some(state)) = (&self.firmware, &devices.firmware) {
            fw.restore(state).map_err(VmmError::Firmware)?;
        }
        if let (Some(dev), Some(state)) = (&self.rtc, &devices.rtc) {
            dev.restore(state).map_err(VmmError::DeviceState)?;
        }
        *self
            .com1
            .lock()
            .map_err(|_| VmmError::Config("serial device lock poisoned".into()))? = com1;
        self.announce_on_resume = true;
        Ok(())
    }
}

impl Vm {
    /// Refuses IDE state this VM could not load: present without IDE
    /// drives, absent with them, or refused by the controller's checks.
    fn check_ide_state(&self, state: Option<&IdeState>) -> Result<(), VmmError> {
        match (self.pci.ide(), state) {
            (None, None) => Ok(()),
            (Some(ide), Some(state)) => ide
                .lock()
                .map_err(|_| VmmError::Config("IDE controller lock poisoned".into()))?
                .check(state)
                .map(drop)
                .map_err(VmmError::DeviceState),
            (ours, _) => Err(presence_mismatch(
                ours.is_some(),
                "IDE controller state",
                "has IDE drives",
                "has no IDE drives",
            )),
        }
    }
}

impl Vm {
    /// Refuses fw_cfg state this VM could not load: present without the
    /// device, absent with it, or refused by the device's checks.
    fn check_fw_cfg_state(&self, state: Option<&FwCfgState>) -> Result<(), VmmError> {
        match (&self.fw_cfg, state) {
            (None, None) => Ok(()),
            (Some(dev), Some(state)) => dev
                .lock()
                .map_err(|_| VmmError::Config("fw_cfg device lock poisoned".into()))?
                .check(state)
                .map_err(VmmError::DeviceState),
            (ours, _) => Err(presence_mismatch(
                ours.is_some(),
                "fw_cfg state",
                "has fw_cfg",
                "has no fw_cfg",
            )),
        }
    }

    /// Refuses PIIX4 PM state this VM could not load: present without ACPI,
    /// absent with it, or refused by the device's checks.
    fn check_pm_state(&self, state: Option<&AcpiPmState>) -> Result<(), VmmError> {
        match (self.pci.pm(), state) {
            (None, None) => Ok(()),
            (Some(pm), Some(state)) => pm
                .lock()
                .map_err(|_| VmmError::Config("PIIX4 PM lock poisoned".into()))?
                .check(state)
                .map_err(VmmError::DeviceState),
            (ours, _) => Err(presence_mismatch(
                ours.is_some(),
                "ACPI power management state",
                "has ACPI",
                "has no ACPI",
            )),
        }
    }

    /// Presses the ACPI power button (QEMU's `system_powerdown`): true when
    /// the guest enabled it and sees the event; false when it has no ACPI or
    /// did not enable the button (then nothing happens, as in QEMU).
    pub fn press_power_button(&self) -> bool {
        self.pci
            .pm()
            .and_then(|pm| pm.lock().ok())
            .is_some_and(|mut pm| pm.press_power_button())
    }

    /// Refuses firmware state this VM could not load: a ROM without
    /// firmware, none with it, or a ROM of another size.
    fn check_firmware_state(&self, state: Option<&FirmwareState>) -> Result<(), VmmError> {
        match (&self.firmware, state) {
            (None, None) => Ok(()),
            (Some(fw), Some(state)) => fw.check(state).map_err(VmmError::Firmware),
            (ours, _) => Err(presence_mismatch(
                ours.is_some(),
                "a firmware ROM",
                "is booted through firmware",
                "is not booted through firmware",
            )),
        }
    }

    /// The fw_cfg device, where the VM has one.
    pub fn fw_cfg(&self) -> Option<&Arc<Mutex<FwCfg>>> {
        self.fw_cfg.as_ref()
    }

    /// What the guest wrote into fw_cfg's `etc/vmcoreinfo` (kdump's note),
    /// where the VM offers it.
    pub fn vmcoreinfo(&self) -> Option<crate::devices::fw_cfg::VmcoreInfo> {
        self.fw_cfg.as_ref()?.lock().ok()?.vmcoreinfo()
    }
}

/// The refusal of a stream that carries state for a device this VM lacks
/// (`vm_has` false), or none for one it has: "the stream has (no) `what`;
/// this VM `yes`/`no`".
fn presence_mismatch(vm_has: bool, what: &str, yes: &str, no: &str) -> VmmError {
    VmmError::Restore(format!(
        "the stream {} {what}; this VM {}",
        if vm_has { "has no" } else { "has" },
        if vm_has { yes } else { no }
    ))
}

/// The fw_cfg files a VM booted through firmware `fw` gets besides the
/// device's own: the SMBIOS entry point and tables SeaBIOS installs (QEMU's
/// `etc/smbios/smbios-anchor` and `etc/smbios/smbios-tables`).
fn firmware_files(
    fw: &FirmwareConfig,
    layout: &ferry_boot::MemoryLayout,
    cpuid: &[CpuidLeaf],
    config: &VmConfig,
    dev: &mut FwCfg,
) -> Result<(), VmmError> {
    if fw.acpi {
        let mut acpi = ferry_boot::AcpiConfig::new(config.vcpus, layout);
        // The virtio functions interrupt through MSI-X only (no INTx pin).
        acpi.pci = config
            .virtio
            .iter()
            .map(|v| ferry_boot::PciFunction {
                slot: v.slot,
                function: 0,
                pin: None,
            })
            .collect();
        acpi.pci.sort_by_key(|f| f.slot);
        // The i8042 (PNP0303 in the DSDT, the FADT's 8042 flag).
        acpi.keyboard = true;
        let files = ferry_boot::AcpiFwCfg::new(&acpi)
            .map_err(|e| VmmError::Boot(crate::error_chain(&e)))?
            .into_files();
        for (name, data) in files {
            dev.add_file(name, data)
                .map_err(|e| VmmError::Config(e.to_string()))?;
        }
    }
    if let Some(smbios) = &fw.smbios {
        let mut smbios = smbios.clone();
        if let Some(leaf1) = cpuid.iter().find(|l| l.function == 1) {
            smbios.processor_id = u64::from(leaf1.eax) | (u64::from(leaf1.edx) << 32);
        }
        let tables = ferry_boot::smbios_tables(&smbios, layout)
            .map_err(|e| VmmError::Boot(crate::error_chain(&e)))?;
        for (name, data) in [
            ("etc/smbios/smbios-anchor", tables.entry_point),
            ("etc/smbios/smbios-tables", tables.table),
        ] {
            dev.add_file(name, data)
                .map_err(|e| VmmError::Config(e.to_string()))?;
        }
    }
    Ok(())
}

impl Vm {
    /// Refuses RTC state this VM could not load: present without the
    /// device, absent with it, or refused by the device's checks.
    fn check_rtc_state(&self, state: Option<&RtcState>) -> Result<(), VmmError> {
        match (&self.rtc, state) {
            (None, None) => Ok(()),
            (Some(dev), Some(state)) => dev.check(state).map_err(VmmError::DeviceState),
            (ours, _) => Err(presence_mismatch(
                ours.is_some(),
                "RTC state",
                "has an RTC",
                "has no RTC",
            )),
        }
    }

    /// The RTC and its CMOS, where the VM has them.
    pub fn rtc(&self) -> Option<&Arc<Rtc>> {
        self.rtc.as_ref()
    }
}

/// Initial register state of the boot vCPU for a loaded kernel.
struct BootVcpu {
    info: ferry_boot::BootInfo,
}

impl BootVcpu {
    fn initial_state(&self, vm: &Vm) -> Result<VcpuState, VmmError> {
        let mut state = vm.vcpus[0].capture()?;
        state.regs = ferry_boot::boot_regs(&self.info);
        ferry_boot::boot_sregs(&self.info, vm.ram.memory(), &mut state.sregs)
            .map_err(|e| VmmError::Boot(e.to_string()))?;
        let fpu = ferry_boot::boot_fpu();
        // The legacy XSAVE area starts with the FXSAVE image: FCW at byte 0, MXCSR at 24.
        let region = &mut state.xsave.region;
        region[0] = (region[0] & !0xffff) | u32::from(fpu.fcw);
        region[6] = fpu.mxcsr;
        Ok(state)
    }
}
