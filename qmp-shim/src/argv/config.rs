//! Policy: which parsed options ferry can honour. Everything the guest would
//! notice and ferry cannot provide is refused with the option and the thing
//! named. A few devices libvirt adds by default are accepted and *modelled as
//! absent* (listed in [`MODELLED_AS_ABSENT`]): the guest sees no such device,
//! which for these is indistinguishable from an idle one for the guests ferry
//! targets (direct kernel boot, serial console).

use std::path::PathBuf;

use ferry_boot::{SmbiosConfig, SmbiosError};
use ferry_vmm::cpu::model::CpuModel;
use ferry_vmm::devices::rtc::{RtcBase, RtcConfig};
use ferry_vmm::devices::SharedFd;
use serde_json::Value;

use super::opts::json_text;
use super::{Accel, ArgvError, Chardev, ChardevBackend, Invocation, SerialSpec, SocketEndpoint};
use crate::backend::{MachineConfig, MachineType};

/// Printed after a refusal, for the operator.
/// Where QEMU finds a `-bios` given by name (Debian's QEMU data directory,
/// and SeaBIOS's own).
const BIOS_DIRS: &[&str] = &["/usr/share/qemu", "/usr/share/seabios"];

pub const UNSUPPORTED_HINT: &str =
    "ferry-qemu models KVM x86_64 guests with RAM, vCPUs, direct kernel boot or SeaBIOS firmware boot, fw_cfg, an MC146818 RTC with CMOS, 16550 serial ports, virtio-blk disks on raw and qcow2 images, IDE disks and CD-ROMs, virtio-net NICs on taps, virtio-rng entropy devices and a virtio-balloon";

/// `-device` drivers accepted but not modelled (libvirt adds them by default).
pub const MODELLED_AS_ABSENT: &[&str] = &[
    "piix3-usb-uhci",
    "piix4-usb-uhci",
    "qemu-xhci",
    "ich9-usb-ehci1",
    "ich9-usb-uhci1",
    "ich9-usb-uhci2",
    "ich9-usb-uhci3",
    // The bus-less balloon of virtio-mmio and s390 machines; the PCI one is
    // real (argv/balloons.rs).
    "virtio-balloon-device",
];

/// `-device` drivers ferry models.
pub const MODELLED_DEVICES: &[&str] = &[
    "isa-serial",
    "virtio-blk-pci",
    "virtio-blk-pci-non-transitional",
    "virtio-net-pci",
    "virtio-net-pci-non-transitional",
    "virtio-rng-pci",
    "virtio-rng-pci-non-transitional",
    "virtio-balloon-pci",
    "virtio-balloon-pci-non-transitional",
    "ide-hd",
    "ide-cd",
    "vmcoreinfo",
];

/// A machine type ferry builds, as QEMU 7.2 lists it (`-M help`,
/// `query-machines`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineDef {
    /// The name (`-machine TYPE`, `<type machine='TYPE'>`).
    pub name: &'static str,
    /// Its QOM type (`NAME-machine`).
    pub qom_type: &'static str,
    /// Another name for it (`pc` for `pc-i440fx-7.2`).
    pub alias: Option<&'static str>,
    /// The default machine (`-machine` left out).
    pub is_default: bool,
    /// QEMU 7.2 marks it deprecated (pc-i440fx-1.4 to 1.7).
    pub deprecated: bool,
    /// What ferry builds for it.
    pub family: MachineType,
}

/// A `pc-i440fx-VERSION` row: ferry's one i440FX machine under QEMU's name.
macro_rules! i440fx {
    ($version:literal) => {
        i440fx!($version, false)
    };
    ($version:literal, $deprecated:literal) => {
        MachineDef {
            name: concat!("pc-i440fx-", $version),
            qom_type: concat!("pc-i440fx-", $version, "-machine"),
            alias: None,
            is_default: false,
            deprecated: $deprecated,
            family: MachineType::Pc,
        }
    };
}

/// The machine types ferry accepts: every `pc-i440fx-*` QEMU 7.2 has
/// (`qemu-system-x86_64 -M help`) and microvm. All the `pc-i440fx-*` build
/// the same machine: ferry has one guest ABI, and QEMU's per-version compat
/// properties have no counterpart in ferry's devices; only the SMBIOS
/// version string carries the name, as in QEMU. argv parsing,
/// `query-machines` and `qom-list-types` all read this table. Q35 is left
/// out on purpose: libvirt offers what `query-machines` lists.
pub const MACHINES: &[MachineDef] = &[
    MachineDef {
        alias: Some("pc"),
        is_default: true,
        ..i440fx!("7.2")
    },
    i440fx!("7.1"),
    i440fx!("7.0"),
    i440fx!("6.2"),
    i440fx!("6.1"),
    i440fx!("6.0"),
    i440fx!("5.2"),
    i440fx!("5.1"),
    i440fx!("5.0"),
    i440fx!("4.2"),
    i440fx!("4.1"),
    i440fx!("4.0"),
    i440fx!("3.1"),
    i440fx!("3.0"),
    i440fx!("2.12"),
    i440fx!("2.11"),
    i440fx!("2.10"),
    i440fx!("2.9"),
    i440fx!("2.8"),
    i440fx!("2.7"),
    i440fx!("2.6"),
    i440fx!("2.5"),
    i440fx!("2.4"),
    i440fx!("2.3"),
    i440fx!("2.2"),
    i440fx!("2.1"),
    i440fx!("2.0"),
    i440fx!("1.7", true),
    i440fx!("1.6", true),
    i440fx!("1.5", true),
    i440fx!("1.4", true),
    MachineDef {
        name: "microvm",
        qom_type: "microvm-machine",
        alias: None,
        is_default: false,
        deprecated: false,
        family: MachineType::Microvm,
    },
];

/// The machine `name` names (a name or an alias), if ferry builds it.
pub fn machine_def(name: &str) -> Option<&'static MachineDef> {
    MACHINES
        .iter()
        .find(|m| m.name == name || m.alias == Some(name))
}

/// Why ferry-qemu refuses machine type `name` (not in [`MACHINES`]), with
/// what to use instead.
fn machine_refusal(name: &str) -> ArgvError {
    const OPT: &str = "-machine";
    let what = format!("machine type '{name}'");
    if name == "q35" || name.starts_with("pc-q35-") {
        return ArgvError::unsupported_because(
            OPT,
            what,
            "ferry has only the i440FX + PIIX chipset (no ICH9 LPC, PCIe root complex or \
             MCFG): use machine='pc' or a pc-i440fx-* type (Nova: image property \
             hw_machine_type=pc, or [libvirt] hw_machine_type = x86_64=pc in nova.conf)",
        );
    }
    if name == "isapc" {
        return ArgvError::unsupported_because(
            OPT,
            what,
            "ferry has no ISA-only machine, only the i440FX + PIIX PC: use machine='pc' \
             or a pc-i440fx-* type",
        );
    }
    if name.starts_with("pc-i440fx-") {
        return ArgvError::unsupported_because(
            OPT,
            what,
            "ferry-qemu has QEMU 7.2's i440FX machine types, pc-i440fx-7.2 down to \
             pc-i440fx-1.4, all the same machine: use one of those or machine='pc'",
        );
    }
    ArgvError::unsupported(OPT, what)
}

/// CPU models accepted by `-cpu` (features are passed on to the engine).
pub const CPU_MODELS: &[&str] = ferry_vmm::cpu::model::MODELS;

/// `-global` settings accepted (they configure devices ferry models as absent).
const GLOBALS: &[&str] = &[
    "PIIX4_PM.disable_s3",
    "PIIX4_PM.disable_s4",
    "ICH9-LPC.disable_s3",
    "ICH9-LPC.disable_s4",
    "kvm-pit.lost_tick_policy",
];

/// A serial port and the chardev behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialConfig {
    /// COM index (0 = ttyS0 at 0x3f8).
    pub index: u32,
    pub chardev: Chardev,
    /// The chardev's `/dev/fdset/N` outputs, filled at startup.
    pub fds: ChardevFds,
}

/// A chardev's outputs given as `/dev/fdset/N` (`path=` of a file backend,
/// `logfile=`): the descriptors libvirt passed in those sets (`-add-fd`),
/// used as passed, never reopened (`process::resolve_fdsets` fills them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChardevFds {
    /// The file backend's `path=`.
    pub path: Option<SharedFd>,
    pub logfile: Option<SharedFd>,
}

impl Invocation {
    /// True for the capability probe (`-machine none`): no VM is built.
    pub fn is_probe(&self) -> bool {
        self.machine.as_deref() == Some("none")
    }

    /// The machine `-machine` names (`pc` without it), or why ferry refuses
    /// it (the probe's `none` builds nothing and is not among them).
    pub fn machine_def(&self) -> Result<&'static MachineDef, ArgvError> {
        let name = self.machine.as_deref().unwrap_or("pc");
        machine_def(name).ok_or_else(|| machine_refusal(name))
    }

    /// The machine ferry should build, or the first thing it cannot honour.
    /// `Ok(None)` for `-machine none`.
    pub fn machine_config(&self) -> Result<Option<MachineConfig>, ArgvError> {
        self.check_monitors()?;
        if self.is_probe() {
            // The probe runs no guest; libvirt also probes with accel=tcg.
            return Ok(None);
        }
        self.check_accel()?;
        if let Some((option, _)) = self.refused_options.first() {
            return Err(ArgvError::unsupported(option, "this option"));
        }
        let def = self.machine_def()?;
        let machine = def.family;
        let mem_bytes = self.check_memory()?;
        let vcpus = self.check_smp()?;
        // Before the devices: a refused disk says more than its controller.
        let disks = self.disks(machine == MachineType::Pc)?;
        let placed: Vec<(u8, String)> = disks
            .iter()
            .map(|d| {
                (
                    d.slot,
                    d.id.clone().unwrap_or_else(|| "virtio-blk-pci".into()),
                )
            })
            .collect();
        let nics = self.nics(machine == MachineType::Pc, &placed)?;
        let placed: Vec<(u8, String)> = placed
            .into_iter()
            .chain(nics.iter().map(|n| {
                (
                    n.slot,
                    n.id.clone().unwrap_or_else(|| "virtio-net-pci".into()),
                )
            }))
            .collect();
        let rngs = self.rngs(machine == MachineType::Pc, &placed)?;
        let placed: Vec<(u8, String)> = placed
            .into_iter()
            .chain(rngs.iter().map(|r| {
                (
                    r.slot,
                    r.id.clone().unwrap_or_else(|| "virtio-rng-pci".into()),
                )
            }))
            .collect();
        let balloon = self.balloon(machine == MachineType::Pc, &placed)?;
        self.check_misc()?;
        let (smbios, uuid) = self.smbios(def, vcpus)?;
        let serials = self.serials()?;
        Ok(Some(MachineConfig {
            machine,
            mem_bytes,
            vcpus,
            cpu_model: self.cpu.as_ref().map(|c| c.model.clone()),
            cpu_features: self
                .cpu
                .as_ref()
                .map(|c| c.features.clone())
                .unwrap_or_default(),
            cpu: self.cpu_model()?,
            kernel: self.kernel.clone(),
            firmware: self.firmware(machine)?,
            boot_strict: self.boot_strict()?,
            acpi: self.acpi()?,
            initrd: self.initrd.clone(),
            append: self.append.clone().unwrap_or_default(),
            serials,
            vmcoreinfo: self.vmcoreinfo(machine)?,
            rtc: self.rtc_config(machine)?,
            absent_devices: self
                .devices
                .iter()
                .filter(|d| MODELLED_AS_ABSENT.contains(&d.kind.as_str()))
                .map(|d| d.id.clone().unwrap_or_else(|| d.kind.clone()))
                .collect(),
            disks,
            nics,
            taps: Vec::new(),
            rngs,
            balloon,
            name: self.name.as_ref().and_then(|n| n.guest.clone()),
            uuid,
            smbios,
            start_paused: self.start_paused,
            no_shutdown: self.no_shutdown,
            no_reboot: self.no_reboot,
            incoming: self.incoming.clone(),
        }))
    }

    /// The BIOS a guest without `-kernel` boots through: `-bios FILE` (a path,
    /// or a name QEMU finds in its data directories), else SeaBIOS's
    /// `bios-256k.bin`, QEMU's default for `pc`. With `-kernel`, ferry boots
    /// the kernel directly and needs none.
    fn firmware(&self, machine: MachineType) -> Result<Option<PathBuf>, ArgvError> {
        if self.kernel.is_some() {
            return Ok(None);
        }
        if machine != MachineType::Pc {
            return Err(ArgvError::unsupported_because(
                "-kernel",
                "a microvm guest without -kernel".to_string(),
                "microvm has no firmware: give it <os><kernel>",
            ));
        }
        let Some(bios) = &self.bios else {
            return Ok(Some(PathBuf::from(ferry_vmm::firmware::DEFAULT_BIOS)));
        };
        if bios.components().count() > 1 || bios.exists() {
            return Ok(Some(bios.clone()));
        }
        // QEMU looks a bare name up in its data directories (Debian's
        // /usr/share/qemu links SeaBIOS's images there).
        for dir in BIOS_DIRS {
            let p = std::path::Path::new(dir).join(bios);
            if p.exists() {
                return Ok(Some(p));
            }
        }
        Err(ArgvError::invalid(
            "-bios",
            &bios.display().to_string(),
            &format!(
                "could not find the BIOS in {} (install Debian's seabios, or give a path)",
                BIOS_DIRS.join(", ")
            ),
        ))
    }

    /// ACPI unless `-no-acpi` or `-machine acpi=off` (libvirt writes the
    /// latter or the former when `<features><acpi/>` is absent).
    fn acpi(&self) -> Result<bool, ArgvError> {
        let off = match self.machine_props.get("acpi") {
            None | Some("auto") => false,
            Some(v) => !super::opts::parse_bool("-machine", "acpi", v)?,
        };
        Ok(!(self.no_acpi || off))
    }

    /// `-boot strict=on|off` (libvirt writes `strict=on`); other `-boot`
    /// keys (order, once, menu, splash, reboot-timeout) are accepted as QEMU
    /// takes them: ferry's firmware boot follows the devices' `bootindex`.
    fn boot_strict(&self) -> Result<bool, ArgvError> {
        let Some(boot) = &self.boot else {
            return Ok(false);
        };
        match boot.get("strict") {
            None => Ok(false),
            Some(v) => super::opts::parse_bool("-boot", "strict", v),
        }
    }

    fn check_accel(&self) -> Result<(), ArgvError> {
        // `accel=kvm:tcg` means "kvm, else tcg": fine as long as kvm is in it.
        if self.accel.is_empty() || self.accel.contains(&Accel::Kvm) {
            return Ok(());
        }
        let names: Vec<String> = self
            .accel
            .iter()
            .map(|a| match a {
                Accel::Kvm => "kvm".to_string(),
                Accel::Tcg => "tcg".to_string(),
                Accel::Other(s) => s.clone(),
            })
            .collect();
        Err(ArgvError::unsupported(
            "-accel",
            format!(
                "accelerator '{}' (ferry runs guests on KVM only: use <domain type='kvm'>)",
                names.join(":")
            ),
        ))
    }

    fn check_monitors(&self) -> Result<(), ArgvError> {
        for m in &self.monitors {
            let Some(c) = self.chardevs.iter().find(|c| c.id == m.chardev) else {
                return Err(ArgvError::invalid(
                    "-mon",
                    &m.chardev,
                    &format!("chardev '{}' not found", m.chardev),
                ));
            };
            if !m.control {
                return Err(ArgvError::unsupported(
                    "-mon",
                    "the human monitor (mode=readline)",
                ));
            }
            match &c.backend {
                ChardevBackend::Socket(s) if s.server => {
                    if let SocketEndpoint::Tcp { .. } = s.endpoint {
                        return Err(ArgvError::unsupported("-chardev", "a TCP monitor socket"));
                    }
                }
                _ => {
                    return Err(ArgvError::unsupported(
                        "-mon",
                        format!("monitor chardev '{}' (only listening unix sockets)", c.id),
                    ))
                }
            }
        }
        Ok(())
    }

    fn check_memory(&self) -> Result<u64, ArgvError> {
        let mut size = self.memory.as_ref().map_or(128 << 20, |m| m.size_bytes);
        if let Some(m) = &self.memory {
            if m.slots.is_some() || m.maxmem_bytes.is_some() {
                return Err(ArgvError::unsupported(
                    "-m",
                    "memory hotplug (slots=/maxmem=)",
                ));
            }
        }
        let backend_id = self.machine_props.get("memory-backend");
        for o in &self.objects {
            match o.kind.as_str() {
                "secret" => {}
                // Checked with the devices that use them (argv/rngs.rs).
                t if t.starts_with("rng-") => {}
                // Loaded (once) at startup: commands::load_objects.
                t if crate::commands::TLS_TYPES.contains(&t) => {}
                "memory-backend-ram" if o.id.as_deref() == backend_id && backend_id.is_some() => {
                    let bytes = o
                        .props
                        .get("size")
                        .map(json_text)
                        .and_then(|s| super::parse_size(&s, 1));
                    match bytes {
                        Some(b) if self.memory.is_none() => size = b,
                        Some(b) if b == size => {}
                        _ => {
                            return Err(ArgvError::invalid(
                                "-object",
                                "memory-backend-ram",
                                "size does not match -m",
                            ))
                        }
                    }
                    if let Some(k) = o.props.keys().find(|k| {
                        !matches!(k.as_str(), "size" | "x-use-canonical-path-for-ramblock-id")
                    }) {
                        return Err(ArgvError::unsupported(
                            "-object",
                            format!("memory-backend-ram property '{k}'"),
                        ));
                    }
                }
                other => {
                    return Err(ArgvError::unsupported(
                        "-object",
                        format!("object type '{other}'"),
                    ))
                }
            }
        }
        Ok(size)
    }

    /// `-cpu` as the engine's CPU model; without `-cpu`, QEMU's default qemu64
    /// (what libvirt's domains without `<cpu>` get).
    fn cpu_model(&self) -> Result<CpuModel, ArgvError> {
        match &self.cpu {
            None => CpuModel::from_qemu("qemu64", &[])
                .map_err(|e| ArgvError::unsupported("-cpu", e.to_string())),
            Some(c) => CpuModel::from_qemu(&c.model, &c.features)
                .map_err(|e| ArgvError::unsupported("-cpu", e.to_string())),
        }
    }

    fn check_smp(&self) -> Result<u32, ArgvError> {
        let Some(smp) = &self.smp else { return Ok(1) };
        let cpus = smp.boot_cpus();
        if smp.maxcpus.is_some_and(|m| m > cpus) {
            return Err(ArgvError::unsupported(
                "-smp",
                "CPU hotplug (maxcpus above cpus)",
            ));
        }
        u32::try_from(cpus)
            .ok()
            .filter(|c| *c <= 255)
            .ok_or_else(|| ArgvError::unsupported("-smp", format!("{cpus} vCPUs")))
    }

    /// The RTC a `pc` machine has: `-rtc base=` (UTC without it) and the
    /// CMOS boot order of `-boot order=` (QEMU's default "cad" without it).
    fn rtc_config(&self, machine: MachineType) -> Result<Option<RtcConfig>, ArgvError> {
        if machine != MachineType::Pc {
            return Ok(None);
        }
        let mut config = RtcConfig::default();
        if let Some(base) = self.rtc.as_ref().and_then(|r| r.get("base")) {
            config.base = RtcBase::parse(base)
                .map_err(|_| ArgvError::unsupported("-rtc", format!("base '{base}'")))?;
        }
        if let Some(order) = self.boot.as_ref().and_then(|b| b.get("order")) {
            config.boot_order = order.to_string();
        }
        ferry_vmm::devices::rtc::check_boot_order(&config.boot_order).map_err(|e| {
            ArgvError::unsupported("-boot", format!("order '{}': {e}", config.boot_order))
        })?;
        Ok(Some(config))
    }

    /// `-device vmcoreinfo` (libvirt's `<vmcoreinfo state='on'/>`, which Nova
    /// writes into every x86 domain): fw_cfg's `etc/vmcoreinfo`, where the
    /// guest kernel leaves the address of its crash-dump note. One at most,
    /// without properties, on `pc` (whose fw_cfg carries it).
    fn vmcoreinfo(&self, machine: MachineType) -> Result<bool, ArgvError> {
        let mut found = self.devices.iter().filter(|d| d.kind == "vmcoreinfo");
        let Some(d) = found.next() else {
            return Ok(false);
        };
        if found.next().is_some() {
            return Err(ArgvError::invalid(
                "-device",
                "vmcoreinfo",
                "at most one vmcoreinfo device is supported by QEMU",
            ));
        }
        if let Some(k) = d.props.keys().find(|k| k.as_str() != "id") {
            return Err(ArgvError::unsupported(
                "-device",
                format!("vmcoreinfo property '{k}'"),
            ));
        }
        if machine != MachineType::Pc {
            return Err(ArgvError::unsupported_because(
                "-device",
                "vmcoreinfo on a machine without fw_cfg",
                "vmcoreinfo lives in the pc machine's fw_cfg: use machine type pc",
            ));
        }
        Ok(true)
    }

    fn check_misc(&self) -> Result<(), ArgvError> {
        let allowed_machine = [
            "acpi",
            "usb",
            "dump-guest-core",
            "memory-backend",
            "graphics",
            "vmport",
        ];
        if let Some(k) = self.machine_props.unknown_keys(&allowed_machine).first() {
            return Err(ArgvError::unsupported(
                "-machine",
                format!("property '{k}'"),
            ));
        }
        self.cpu_model()?;
        if let Some(d) = self.display.as_deref() {
            if d != "none" {
                return Err(ArgvError::unsupported("-display", format!("display '{d}'")));
            }
        }
        for g in &self.globals {
            let key = g.split_once('=').map_or(g.as_str(), |(k, _)| k);
            if !GLOBALS.contains(&key) {
                return Err(ArgvError::unsupported("-global", format!("'{g}'")));
            }
        }
        if let Some(rtc) = &self.rtc {
            if let Some(k) = rtc.unknown_keys(&["base", "clock", "driftfix"]).first() {
                return Err(ArgvError::unsupported("-rtc", format!("parameter '{k}'")));
            }
            if let Some(base) = rtc.get("base") {
                if RtcBase::parse(base).is_err() {
                    return Err(ArgvError::unsupported("-rtc", format!("base '{base}'")));
                }
            }
            // ferry's RTC always runs on the host's wall clock (QEMU's
            // clock=host); rt and vm are accepted as libvirt may write them.
            if let Some(clock) = rtc.get("clock") {
                if !["host", "rt", "vm"].contains(&clock) {
                    return Err(ArgvError::unsupported("-rtc", format!("clock '{clock}'")));
                }
            }
            // Lost periodic ticks are dropped either way (QEMU's slew
            // reinjects them).
            if let Some(fix) = rtc.get("driftfix") {
                if !["slew", "none"].contains(&fix) {
                    return Err(ArgvError::unsupported("-rtc", format!("driftfix '{fix}'")));
                }
            }
        }
        for o in &self.overcommit {
            for (k, v) in o.pairs() {
                if !((k == "mem-lock" || k == "cpu-pm") && v == "off") {
                    return Err(ArgvError::unsupported("-overcommit", format!("{k}={v}")));
                }
            }
        }
        for a in &self.audiodevs {
            if a.kind != "none" {
                return Err(ArgvError::unsupported(
                    "-audiodev",
                    format!("audio driver '{}'", a.kind),
                ));
            }
        }
        for d in &self.devices {
            if !MODELLED_DEVICES.contains(&d.kind.as_str())
                && !MODELLED_AS_ABSENT.contains(&d.kind.as_str())
                && !super::VIRTIO_NET.contains(&d.kind.as_str())
            {
                return Err(match d.kind.as_str() {
                    "virtio-blk-pci-transitional" => ArgvError::unsupported_because(
                        "-device",
                        format!("device '{}'", d.kind),
                        "ferry's virtio devices are modern-only (virtio 1.0): use \
                         model='virtio' or 'virtio-non-transitional'",
                    ),
                    k @ ("virtio-net-pci-transitional"
                    | "virtio-rng-pci-transitional"
                    | "virtio-balloon-pci-transitional") => ArgvError::unsupported_because(
                        "-device",
                        format!("device '{k}'"),
                        "ferry's virtio devices are modern-only (virtio 1.0): use \
                             model='virtio' or 'virtio-non-transitional'",
                    ),
                    k => ArgvError::unsupported("-device", format!("device '{k}'")),
                });
            }
        }
        for c in &self.chardevs {
            if let ChardevBackend::Other { kind, .. } = &c.backend {
                return Err(ArgvError::unsupported(
                    "-chardev",
                    format!("chardev backend '{kind}' ({})", c.id),
                ));
            }
        }
        Ok(())
    }

    /// The SMBIOS tables for `machine` from `-smbios` and `-uuid`, and the VM's
    /// UUID (`-smbios type=1,uuid=` sets it, as in QEMU). Errors carry QEMU
    /// 7.2's texts where QEMU refuses too. The versions default to the
    /// machine's name as QEMU writes it (`pc` is `pc-i440fx-7.2`).
    fn smbios(
        &self,
        machine: &MachineDef,
        vcpus: u32,
    ) -> Result<(Option<SmbiosConfig>, Option<String>), ArgvError> {
        const OPT: &str = "-smbios";
        let mut uuid = self.uuid.clone();
        if machine.family != MachineType::Pc {
            if let Some((arg, _)) = self.smbios.first() {
                return Err(ArgvError::unsupported_because(
                    OPT,
                    format!("'{arg}'"),
                    "ferry builds SMBIOS tables for the pc machine only",
                ));
            }
            return Ok((None, uuid));
        }
        let mut config = SmbiosConfig::for_vcpus(vcpus);
        config.machine = machine.name.to_string();
        if let Some(smp) = &self.smp {
            // QEMU 7.2's topology for pc-i440fx-7.2: cores preferred over sockets.
            let sockets = smp.sockets.unwrap_or(1).max(1);
            let threads = smp.threads.unwrap_or(1).max(1);
            let dies = smp.dies.unwrap_or(1).max(1);
            let cores = smp
                .cores
                .unwrap_or_else(|| (u64::from(vcpus) / (sockets * dies * threads)).max(1));
            config.sockets = u32::try_from(sockets).unwrap_or(u32::MAX);
            config.cores = u32::try_from(cores).unwrap_or(u32::MAX);
            config.threads = u32::try_from(threads).unwrap_or(u32::MAX);
        }
        for (arg, o) in &self.smbios {
            let invalid = |reason: &str| ArgvError::invalid(OPT, arg, reason);
            if o.get("file").is_some() {
                return Err(ArgvError::unsupported_because(
                    OPT,
                    "file= (binary SMBIOS structures)",
                    "give the fields as type=N,KEY=VALUE (<sysinfo type='smbios'> entries)",
                ));
            }
            let Some(table) = o.get("type") else {
                return Err(invalid("Must specify type= or file="));
            };
            let table = super::opts::parse_u64(table).ok_or_else(|| invalid("out of range!"))?;
            let keys: &[&str] = match table {
                0 => ferry_boot::TYPE0_KEYS,
                1 => ferry_boot::TYPE1_KEYS,
                2 => ferry_boot::TYPE2_KEYS,
                3 => ferry_boot::TYPE3_KEYS,
                11 => &["value", "path"],
                4 | 17 => {
                    return Err(ArgvError::unsupported_because(
                        OPT,
                        format!("type={table} fields"),
                        "ferry builds types 0, 1, 2, 3 and 11 from fields; drop the option",
                    ))
                }
                128.. => return Err(invalid("out of range!")),
                _ => {
                    return Err(invalid(&format!(
                        "Don't know how to build fields for SMBIOS type {table}"
                    )))
                }
            };
            for (k, v) in o.pairs() {
                if k == "type" {
                    continue;
                }
                if !keys.contains(&k.as_str()) {
                    return Err(invalid(&format!("Invalid parameter '{k}'")));
                }
                if table == 11 && k == "path" {
                    return Err(ArgvError::unsupported_because(
                        OPT,
                        "type=11,path= (OEM strings from a file)",
                        "give each string as value= (<oemStrings><entry>)",
                    ));
                }
                config.set(table, k, v).map_err(|e| match e {
                    SmbiosError::BadUuid { .. } => invalid("Invalid UUID"),
                    SmbiosError::BadRelease { .. } => invalid("Invalid release"),
                    SmbiosError::BadBool { key, .. } => {
                        invalid(&format!("Parameter '{key}' expects 'on' or 'off'"))
                    }
                    other => invalid(&other.to_string()),
                })?;
                if table == 1 && k == "uuid" {
                    uuid = Some(v.to_ascii_lowercase());
                }
            }
            config
                .add_table(table)
                .map_err(|e| invalid(&e.to_string()))?;
        }
        if config.system.uuid.is_none() {
            if let Some(u) = &uuid {
                config.system.uuid = Some(
                    ferry_boot::parse_uuid(u)
                        .map_err(|e| ArgvError::invalid("-uuid", u, &e.to_string()))?,
                );
            }
        }
        Ok((Some(config), uuid))
    }

    fn chardev(&self, option: &str, id: &str) -> Result<Chardev, ArgvError> {
        self.chardevs
            .iter()
            .find(|c| c.id == id)
            .cloned()
            .ok_or_else(|| ArgvError::invalid(option, id, &format!("chardev '{id}' not found")))
    }

    fn serials(&self) -> Result<Vec<SerialConfig>, ArgvError> {
        let mut out: Vec<SerialConfig> = Vec::new();
        for (next, s) in (0u32..).zip(&self.serials) {
            if let SerialSpec::Chardev(id) = s {
                out.push(SerialConfig {
                    index: next,
                    chardev: self.chardev("-serial", id)?,
                    fds: ChardevFds::default(),
                });
            }
        }
        for d in self.devices.iter().filter(|d| d.kind == "isa-serial") {
            let id = d.props.get("chardev").map(json_text).ok_or_else(|| {
                ArgvError::invalid("-device", "isa-serial", "'chardev' is missing")
            })?;
            let index = match d.props.get("index") {
                Some(v) => json_text(v)
                    .parse::<u32>()
                    .ok()
                    .filter(|i| *i < 4)
                    .ok_or_else(|| ArgvError::invalid("-device", "isa-serial", "bad 'index'"))?,
                None => (0..4)
                    .find(|i| out.iter().all(|s| s.index != *i))
                    .unwrap_or(4),
            };
            if index >= 4 || out.iter().any(|s| s.index == index) {
                return Err(ArgvError::invalid(
                    "-device",
                    "isa-serial",
                    &format!("serial port {index} unavailable"),
                ));
            }
            if let Some(k) = d
                .props
                .keys()
                .find(|k| !matches!(k.as_str(), "chardev" | "index"))
            {
                if !matches!(d.props.get(k.as_str()), Some(Value::Null)) {
                    return Err(ArgvError::unsupported(
                        "-device",
                        format!("isa-serial property '{k}'"),
                    ));
                }
            }
            out.push(SerialConfig {
                index,
                chardev: self.chardev("-device", &id)?,
                fds: ChardevFds::default(),
            });
        }
        // QEMU's default serial (without -nodefaults) is stdio with -nographic.
        if out.is_empty() && !self.nodefaults && self.nographic {
            out.push(SerialConfig {
                index: 0,
                chardev: Chardev {
                    id: "serial0".into(),
                    backend: ChardevBackend::Stdio,
                    logfile: None,
                    logappend: false,
                },
                fds: ChardevFds::default(),
            });
        }
        out.sort_by_key(|s| s.index);
        Ok(out)
    }
}
