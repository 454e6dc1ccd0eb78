//! Pre-flight rules: what stops a guest from migrating, decided before the
//! migration starts and without touching the running domain.
//!
//! The rules read a [`DomainXml`] and ask two probes about the hosts: a
//! [`SourceProbe`] (filesystem types, host identity) and a [`DestProbe`]
//! (storage, networks, emulator, CPU). `libvirt.rs` implements the probes over
//! libvirt's remote API for `ferry check`/`ferry migrate`; `hook.rs`
//! implements the destination probe with local lookups for the libvirt hook
//! (a hook must not call back into libvirtd). The unit tests use fakes.
//!
//! Rules (ids are stable, they appear in `--json`):
//! * `passthrough-disk`: `<disk device='lun'>` passes a raw host LUN through.
//! * `host-device`: every `<hostdev>` (PCI, USB, SCSI, mdev...) is a device of
//!   the source host; it is attached to the source host only.
//! * `client-device`: USB redirection (`<redirdev>`), smartcards in host or
//!   passthrough mode and host CD-ROM/floppy drives (`type='block'`) are
//!   attached to the source host or to a client connected to it.
//! * `shared-storage`: a file disk on a local filesystem; libvirt refuses it
//!   with "Migration without shared storage is unsafe".
//! * `disk-on-destination`: a disk's source must exist on the destination.
//! * `network-on-destination`: the bridge, libvirt network or host interface an
//!   `<interface>` uses must exist on the destination.
//! * `emulator-on-destination`: the destination must have the emulator
//!   (ferry-qemu) at the same path, with the domain's machine type.
//! * `ferry-version`: a ferry-qemu on the destination must be this ferry's version.
//! * `cpu`: the destination must provide the guest CPU model and features.
//! * `distinct-hosts`: source and destination must not be the same host.

use serde::Serialize;

use crate::domxml::DomainXml;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    /// Could not be decided here; does not block.
    Skip,
}

/// One line of a pre-flight report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable rule id, e.g. `host-device`.
    pub id: &'static str,
    pub status: Status,
    /// The device the result is about, named as in the domain XML.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// What was found, and for a failure which rule it breaks.
    pub message: String,
    /// How to get past a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn pass(id: &'static str, message: impl Into<String>) -> Self {
        Check {
            id,
            status: Status::Pass,
            device: None,
            message: message.into(),
            fix: None,
        }
    }

    fn skip(id: &'static str, device: Option<String>, message: impl Into<String>) -> Self {
        Check {
            id,
            status: Status::Skip,
            device,
            message: message.into(),
            fix: None,
        }
    }

    fn fail(
        id: &'static str,
        device: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Check {
            id,
            status: Status::Fail,
            device: Some(device.into()),
            message: message.into(),
            fix: Some(fix.into()),
        }
    }
}

/// The whole pre-flight result.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub domain: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// True when at least one check failed.
    pub blocked: bool,
    pub checks: Vec<Check>,
}

impl CheckReport {
    pub fn new(
        domain: &str,
        source: Option<String>,
        destination: Option<String>,
        checks: Vec<Check>,
    ) -> Self {
        CheckReport {
            domain: domain.to_owned(),
            source,
            destination,
            blocked: checks.iter().any(|c| c.status == Status::Fail),
            checks,
        }
    }

    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status == Status::Fail)
    }
}

/// Answer of a probe about one thing on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// It is there; the string says what was found.
    Present(String),
    /// It is not there; the string says why we know.
    Missing(String),
    /// Could not be determined; the string says why.
    Unknown(String),
}

/// Questions about the source host.
pub trait SourceProbe {
    /// Whether `path` lies on a filesystem libvirt treats as shared
    /// (NFS, GFS2, OCFS2, CIFS, Ceph, GlusterFS...). `None`: cannot tell here.
    fn is_shared_fs(&mut self, path: &str) -> Option<Result<bool, String>>;
    /// The host UUID libvirt puts in the migration cookie.
    fn host_uuid(&mut self) -> Option<String>;
    /// The host CPU, as `<cpu>` XML, for host-passthrough guests.
    fn host_cpu_xml(&mut self) -> Option<String>;
}

/// Questions about the destination host.
pub trait DestProbe {
    /// A disk source path (file or block device).
    fn path(&mut self, path: &str) -> Probe;
    /// A libvirt network by name (must be active).
    fn network(&mut self, name: &str) -> Probe;
    /// A host interface (bridge, direct-attach device) by name.
    fn host_interface(&mut self, name: &str) -> Probe;
    /// The emulator at `path` with the domain's arch, machine and virt type.
    /// `Missing` says whether the binary or the machine type is missing.
    fn emulator(&mut self, dom: &DomainXml, path: &str) -> EmulatorProbe;
    /// Whether the destination can run the guest CPU `cpu_xml`: compared with the
    /// CPU the domain's emulator can give there (virsh hypervisor-cpu-compare), or
    /// else with the destination's host CPU (virConnectCompareCPU).
    fn compare_cpu(&mut self, dom: &DomainXml, cpu_xml: &str) -> Probe;
    fn host_uuid(&mut self) -> Option<String>;
}

/// What the destination knows about the domain's emulator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmulatorProbe {
    /// Present, with the machine type and (when known) the ferry-qemu version.
    Present {
        machine: Option<String>,
        ferry_version: Option<String>,
    },
    /// The binary is not there (or libvirt cannot probe it).
    NoBinary(String),
    /// The binary is there but does not offer the domain's machine type.
    NoMachine(String),
    Unknown(String),
}

/// Options that relax rules.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Like `virsh migrate --unsafe`: local storage does not block.
    pub allow_unsafe: bool,
}

/// The ferry-qemu version from `--version` output:
/// `QEMU emulator version 7.2.0 (ferry-qemu 0.1.0)` -> `0.1.0`.
pub fn ferry_qemu_version(version_output: &str) -> Option<String> {
    let rest = &version_output[version_output.find("ferry-qemu ")? + "ferry-qemu ".len()..];
    let v: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+'))
        .collect();
    (!v.is_empty()).then_some(v)
}

/// Versions that can migrate to each other: same major, and for 0.x the same minor.
pub fn versions_compatible(a: &str, b: &str) -> bool {
    let key = |v: &str| {
        let mut it = v.split(['.', '-', '+']);
        let major = it.next().unwrap_or("").to_owned();
        let minor = it.next().unwrap_or("").to_owned();
        if major == "0" {
            (major, minor)
        } else {
            (major, String::new())
        }
    };
    key(a) == key(b)
}

/// Rules that need nothing but the XML: devices bound to the source host or
/// to its clients.
pub fn device_checks(dom: &DomainXml) -> Vec<Check> {
    let mut out = Vec::new();

    let mut luns = false;
    for d in dom.disks.iter().filter(|d| d.device == "lun") {
        luns = true;
        let src = d
            .path
            .as_deref()
            .or(d.remote.as_deref())
            .unwrap_or("(no source)");
        out.push(Check::fail(
            "passthrough-disk",
            d.name(),
            format!(
                "{} passes the raw LUN {src} through (device='lun', SCSI commands go to the host's device); \
                 rule: passthrough disks are attached to the source host only",
                d.name()
            ),
            "use device='disk' (emulated disk on the same storage) or detach the LUN before migrating",
        ));
    }
    if !luns {
        out.push(Check::pass(
            "passthrough-disk",
            "no passthrough (device='lun') disks",
        ));
    }

    if dom.hostdevs.is_empty() {
        out.push(Check::pass("host-device", "no host devices"));
    }
    for h in &dom.hostdevs {
        out.push(Check::fail(
            "host-device",
            h.name(),
            format!(
                "<hostdev type='{}'> {} is a device of the source host; \
                 rule: host devices are attached to the source host only",
                h.kind,
                h.name()
            ),
            "detach it (virsh detach-device) before migrating and attach the destination's own device afterwards",
        ));
    }

    let mut client = false;
    for r in &dom.redirdevs {
        client = true;
        out.push(Check::fail(
            "client-device",
            r.name(),
            format!(
                "{} redirects a USB device from a client of the source; \
                 rule: client-attached devices (USB redirection) are attached to the source host only",
                r.name()
            ),
            "remove the <redirdev> (virsh detach-device) before migrating; the client can redirect again afterwards",
        ));
    }
    for s in dom.smartcards.iter().filter(|s| {
        matches!(
            s.mode.as_str(),
            "host" | "host-certificates" | "passthrough"
        )
    }) {
        client = true;
        let name = format!("smartcard #{} (mode='{}')", s.index, s.mode);
        out.push(Check::fail(
            "client-device",
            name.clone(),
            format!(
                "{name} reads a card reader of the source host or client; \
                 rule: smartcard passthrough is attached to the source host only"
            ),
            "remove the <smartcard> before migrating",
        ));
    }
    for d in dom
        .disks
        .iter()
        .filter(|d| matches!(d.device.as_str(), "cdrom" | "floppy") && d.disk_type == "block")
        .filter(|d| d.path.is_some())
    {
        client = true;
        out.push(Check::fail(
            "client-device",
            d.name(),
            format!(
                "{} is the host drive {} (type='block'); \
                 rule: host CD-ROM/floppy drives are attached to the source host only",
                d.name(),
                d.path.as_deref().unwrap_or("")
            ),
            "eject the medium (virsh change-media --eject) or use an image file on shared storage",
        ));
    }
    if !client {
        out.push(Check::pass(
            "client-device",
            "no USB redirection, smartcard passthrough or host CD-ROM/floppy",
        ));
    }
    out
}

/// A disk whose contents must be reachable on the destination: it has a host
/// path and libvirt would not copy it.
fn needs_path_on_dest(d: &crate::domxml::Disk) -> bool {
    d.path.is_some() && d.device != "lun"
}

/// Shared-storage rule, as `qemuMigrationSrcIsSafe` in libvirt 9.0 applies it:
/// empty and read-only disks are safe, network disks are safe, block devices are
/// not checked, a file disk must be on a shared/cluster filesystem.
pub fn storage_checks(
    dom: &DomainXml,
    src: &mut dyn SourceProbe,
    opts: CheckOptions,
) -> Vec<Check> {
    let mut out = Vec::new();
    for d in &dom.disks {
        if d.is_empty() || d.readonly || d.disk_type != "file" {
            continue;
        }
        let Some(path) = d.path.as_deref() else {
            continue;
        };
        match src.is_shared_fs(path) {
            Some(Ok(true)) => out.push(Check::pass(
                "shared-storage",
                format!("{}: {path} is on shared storage", d.name()),
            )),
            Some(Ok(false)) if opts.allow_unsafe => out.push(Check::skip(
                "shared-storage",
                Some(d.name()),
                format!(
                    "{}: {path} is on a local filesystem; allowed by --unsafe \
                     (the destination must see the same data at the same path)",
                    d.name()
                ),
            )),
            Some(Ok(false)) => out.push(Check::fail(
                "shared-storage",
                d.name(),
                format!(
                    "{}: {path} is on a local filesystem, not shared storage; \
                     rule: libvirt refuses with \"Migration without shared storage is unsafe\"",
                    d.name()
                ),
                "put the image on NFS/GlusterFS/Ceph/CIFS storage mounted on both hosts, \
                 or pass --unsafe if the same file really is visible on both",
            )),
            Some(Err(e)) => out.push(Check::skip(
                "shared-storage",
                Some(d.name()),
                format!("{}: cannot tell the filesystem of {path}: {e}", d.name()),
            )),
            None => out.push(Check::skip(
                "shared-storage",
                Some(d.name()),
                format!(
                    "{}: the source host is remote, its filesystem types are not visible here; \
                     libvirt checks {path} when the migration starts",
                    d.name()
                ),
            )),
        }
    }
    if out.is_empty() {
        out.push(Check::pass(
            "shared-storage",
            "no writable file disks (network, block and read-only disks need no shared filesystem)",
        ));
    }
    out
}

/// Rules that ask the destination.
pub fn destination_checks(dom: &DomainXml, dst: &mut dyn DestProbe) -> Vec<Check> {
    let mut out = Vec::new();

    // Disks.
    let mut any = false;
    for d in dom.disks.iter().filter(|d| needs_path_on_dest(d)) {
        any = true;
        let path = d.path.as_deref().unwrap_or_default();
        match dst.path(path) {
            Probe::Present(what) => out.push(Check::pass(
                "disk-on-destination",
                format!("{}: {what}", d.name()),
            )),
            Probe::Missing(why) => out.push(Check::fail(
                "disk-on-destination",
                d.name(),
                format!(
                    "{}: {path} does not exist on the destination ({why}); \
                     rule: every disk must be reachable from the destination at the same path",
                    d.name()
                ),
                "put the image on storage both hosts mount at the same path, \
                 or copy it there first (virsh migrate --copy-storage-all)",
            )),
            Probe::Unknown(why) => out.push(Check::skip(
                "disk-on-destination",
                Some(d.name()),
                format!(
                    "{}: cannot look up {path} on the destination: {why}",
                    d.name()
                ),
            )),
        }
    }
    if !any {
        out.push(Check::pass(
            "disk-on-destination",
            "no disks with a host path",
        ));
    }

    // Networks.
    let mut any = false;
    for i in &dom.interfaces {
        let Some(src) = i.source.as_deref() else {
            continue;
        };
        let (what, probe) = match i.kind.as_str() {
            "bridge" => ("bridge", dst.host_interface(src)),
            "direct" => ("host interface", dst.host_interface(src)),
            "network" => ("libvirt network", dst.network(src)),
            _ => continue,
        };
        any = true;
        match probe {
            Probe::Present(found) => out.push(Check::pass(
                "network-on-destination",
                format!("{}: {what} {src}: {found}", i.name()),
            )),
            Probe::Missing(why) => out.push(Check::fail(
                "network-on-destination",
                format!("{} ({what} {src})", i.name()),
                format!(
                    "{}: {what} {src} is missing on the destination ({why}); \
                     rule: the network an interface uses must exist on the destination",
                    i.name()
                ),
                format!("create {what} {src} on the destination (and start it) before migrating"),
            )),
            Probe::Unknown(why) => out.push(Check::skip(
                "network-on-destination",
                Some(i.name()),
                format!(
                    "{}: cannot look up {what} {src} on the destination: {why}",
                    i.name()
                ),
            )),
        }
    }
    if !any {
        out.push(Check::pass(
            "network-on-destination",
            "no interfaces attached to bridges, networks or host interfaces",
        ));
    }

    // Emulator and version.
    match dom.emulator.as_deref() {
        None => out.push(Check::skip(
            "emulator-on-destination",
            None,
            "the domain names no <emulator>; libvirt picks the destination's default",
        )),
        Some(emu) => match dst.emulator(dom, emu) {
            EmulatorProbe::Present {
                machine,
                ferry_version,
            } => {
                out.push(Check::pass(
                    "emulator-on-destination",
                    format!(
                        "{emu} is there{}",
                        machine
                            .map(|m| format!(" and offers machine type {m}"))
                            .unwrap_or_default()
                    ),
                ));
                match ferry_version {
                    Some(v) if !versions_compatible(&v, env!("CARGO_PKG_VERSION")) => {
                        out.push(Check::fail(
                            "ferry-version",
                            format!("emulator {emu}"),
                            format!(
                                "the destination's ferry-qemu is version {v}, this ferry is {}; \
                                 rule: both ends must run a compatible ferry version",
                                env!("CARGO_PKG_VERSION")
                            ),
                            "install the same ferry release on both hosts",
                        ))
                    }
                    Some(v) => out.push(Check::pass(
                        "ferry-version",
                        format!("destination ferry-qemu {v} is compatible"),
                    )),
                    // Over libvirt's remote API no emulator version is visible;
                    // the destination's hook (`ferry hook`) compares it.
                    None => out.push(Check::skip(
                        "ferry-version",
                        Some(format!("emulator {emu}")),
                        format!(
                            "the version of the destination's {emu} is not visible from here; \
                             ferry's hook on the destination compares it when the migration starts"
                        ),
                    )),
                }
            }
            EmulatorProbe::NoBinary(why) => out.push(Check::fail(
                "emulator-on-destination",
                format!("emulator {emu}"),
                format!(
                    "the destination has no usable emulator {emu} ({why}); \
                     rule: the destination must run the same emulator (ferry-qemu) at the same path"
                ),
                format!("install ferry (ferry-qemu at {emu}) on the destination"),
            )),
            EmulatorProbe::NoMachine(why) => out.push(Check::fail(
                "ferry-version",
                format!("emulator {emu}"),
                format!(
                    "the destination's {emu} does not offer machine type {} ({why}); \
                     rule: both ends must run a compatible ferry version",
                    dom.machine.as_deref().unwrap_or("(default)")
                ),
                "install the same ferry release on both hosts",
            )),
            EmulatorProbe::Unknown(why) => out.push(Check::skip(
                "emulator-on-destination",
                Some(format!("emulator {emu}")),
                format!("cannot ask the destination about {emu}: {why}"),
            )),
        },
    }
    out
}

/// CPU rule: the destination must provide the guest CPU.
pub fn cpu_check(dom: &DomainXml, src: &mut dyn SourceProbe, dst: &mut dyn DestProbe) -> Check {
    if dom.virt_type != "kvm" {
        return Check::pass(
            "cpu",
            format!(
                "<domain type='{}'>: the CPU is emulated and does not depend on the host",
                dom.virt_type
            ),
        );
    }
    let xml = match &dom.cpu {
        None => {
            return Check::pass("cpu", "no <cpu> element: the emulator's default model");
        }
        Some(c) if c.mode == "host-passthrough" || c.mode == "maximum" => {
            match src.host_cpu_xml() {
                Some(x) => x,
                None => {
                    return Check::skip(
                        "cpu",
                        Some("cpu".into()),
                        format!(
                            "mode='{}': the source host CPU is not known, cannot compare",
                            c.mode
                        ),
                    )
                }
            }
        }
        Some(c) if c.mode == "host-model" => {
            return Check::skip(
                "cpu",
                Some("cpu".into()),
                "mode='host-model' on an inactive domain: compared when the domain runs \
                 (libvirt then expands the model)",
            );
        }
        Some(c) => c.xml.clone(),
    };
    let model = dom
        .cpu
        .as_ref()
        .and_then(|c| c.model.clone())
        .unwrap_or_else(|| "host CPU".into());
    match dst.compare_cpu(dom, &xml) {
        Probe::Present(r) => Check::pass("cpu", format!("destination provides CPU {model}: {r}")),
        Probe::Missing(why) if model_default_only(dom, &why) => Check::skip(
            "cpu",
            Some(format!("cpu {model}")),
            format!(
                "check='none' (libvirt's default CPU for the machine type): the \
                     destination lacks part of {model} ({why}), and libvirt does not \
                     check it; the emulator leaves out what a host lacks, as QEMU does, \
                     and ferry's destination compares the running guest's CPU at the \
                     migration handshake, refusing by name any feature it lacks"
            ),
        ),
        Probe::Missing(why) => Check::fail(
            "cpu",
            format!("cpu {model}"),
            format!(
                "the destination cannot provide the guest CPU {model}: {why}; \
                 rule: the destination host must offer every CPU feature the guest uses"
            ),
            "use a CPU model both hosts support (virsh hypervisor-cpu-baseline), \
             or migrate to a host with a newer CPU",
        ),
        Probe::Unknown(why) => Check::skip(
            "cpu",
            Some(format!("cpu {model}")),
            format!("cannot compare the CPU on the destination: {why}"),
        ),
    }
}

/// Whether a CPU comparison failed only on features of the named model under
/// libvirt's `check='none'` (features the guest does not explicitly require):
/// libvirt does not check those, and the emulator leaves out what the host lacks.
fn model_default_only(dom: &DomainXml, why: &str) -> bool {
    let Some(cpu) = dom
        .cpu
        .as_ref()
        .filter(|c| c.check.as_deref() == Some("none"))
    else {
        return false;
    };
    let Some((_, list)) = why.split_once("required features: ") else {
        return false;
    };
    list.split(',')
        .map(str::trim)
        .all(|f| !cpu.required_features.iter().any(|r| r == f))
}

/// Same-host rule (libvirt: "Attempt to migrate guest to the same host").
pub fn distinct_hosts_check(src: &mut dyn SourceProbe, dst: &mut dyn DestProbe) -> Check {
    match (src.host_uuid(), dst.host_uuid()) {
        (Some(a), Some(b)) if a.eq_ignore_ascii_case(&b) => Check::fail(
            "distinct-hosts",
            "host",
            format!(
                "source and destination are the same host (host UUID {a}); \
                 rule: libvirt refuses \"Attempt to migrate guest to the same host\""
            ),
            "pick another destination, or give each host its own host_uuid in libvirtd.conf",
        ),
        (Some(a), Some(b)) => Check::pass("distinct-hosts", format!("host {a} -> host {b}")),
        _ => Check::skip("distinct-hosts", None, "host UUIDs not available"),
    }
}

/// All rules, in the order they are printed.
pub fn run_all(
    dom: &DomainXml,
    src: &mut dyn SourceProbe,
    dst: &mut dyn DestProbe,
    opts: CheckOptions,
) -> Vec<Check> {
    let mut checks = device_checks(dom);
    checks.extend(storage_checks(dom, src, opts));
    checks.extend(destination_checks(dom, dst));
    checks.push(cpu_check(dom, src, dst));
    checks.push(distinct_hosts_check(src, dst));
    checks
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Source host where everything under /shared is NFS and the rest is ext4.
    struct FakeSource;
    impl SourceProbe for FakeSource {
        fn is_shared_fs(&mut self, path: &str) -> Option<Result<bool, String>> {
            Some(Ok(path.starts_with("/shared/")))
        }
        fn host_uuid(&mut self) -> Option<String> {
            Some("a0a0a0a0-0000-4000-8000-00000000000a".into())
        }
        fn host_cpu_xml(&mut self) -> Option<String> {
            Some("<cpu><model>Skylake-Server</model></cpu>".into())
        }
    }

    #[derive(Default)]
    struct FakeDest {
        paths: Vec<&'static str>,
        nets: Vec<&'static str>,
        ifaces: Vec<&'static str>,
        emulators: HashMap<&'static str, Option<&'static str>>,
        cpu_missing: Option<&'static str>,
        uuid: Option<&'static str>,
    }
    impl FakeDest {
        fn good() -> Self {
            FakeDest {
                paths: vec!["/shared/disk.raw"],
                nets: vec!["default"],
                ifaces: vec!["br0"],
                emulators: HashMap::from([
                    ("/usr/bin/qemu-system-x86_64", None),
                    ("/usr/bin/ferry-qemu", Some(env!("CARGO_PKG_VERSION"))),
                ]),
                cpu_missing: None,
                uuid: Some("b0b0b0b0-0000-4000-8000-00000000000b"),
            }
        }
    }
    impl DestProbe for FakeDest {
        fn path(&mut self, path: &str) -> Probe {
            if self.paths.contains(&path) {
                Probe::Present("volume found".into())
            } else {
                Probe::Missing("no such volume".into())
            }
        }
        fn network(&mut self, name: &str) -> Probe {
            if self.nets.contains(&name) {
                Probe::Present("active".into())
            } else {
                Probe::Missing("no network with matching name".into())
            }
        }
        fn host_interface(&mut self, name: &str) -> Probe {
            if self.ifaces.contains(&name) {
                Probe::Present("up".into())
            } else {
                Probe::Missing("no interface with matching name".into())
            }
        }
        fn emulator(&mut self, dom: &DomainXml, path: &str) -> EmulatorProbe {
            match self.emulators.get(path) {
                Some(v) => EmulatorProbe::Present {
                    machine: dom.machine.clone(),
                    ferry_version: v.map(str::to_owned),
                },
                None => EmulatorProbe::NoBinary("no such file".into()),
            }
        }
        fn compare_cpu(&mut self, _dom: &DomainXml, _cpu_xml: &str) -> Probe {
            match self.cpu_missing {
                Some(f) => {
                    Probe::Missing(format!("Host CPU does not provide required features: {f}"))
                }
                None => Probe::Present("identical".into()),
            }
        }
        fn host_uuid(&mut self) -> Option<String> {
            self.uuid.map(str::to_owned)
        }
    }

    fn run(xml: &str, dst: &mut FakeDest) -> CheckReport {
        let dom = DomainXml::parse(xml).unwrap();
        let checks = run_all(&dom, &mut FakeSource, dst, CheckOptions::default());
        CheckReport::new(&dom.name, None, None, checks)
    }

    /// The single failure of a report, which must be of rule `id`.
    fn only_failure(r: &CheckReport, id: &str) -> Check {
        let f: Vec<_> = r.failures().cloned().collect();
        assert_eq!(f.len(), 1, "expected exactly one failure, got {f:#?}");
        assert_eq!(f[0].id, id, "{f:#?}");
        assert!(r.blocked);
        f[0].clone()
    }

    #[test]
    fn clean_domain_passes_everything() {
        let r = run(
            include_str!("../tests/fixtures/base.xml"),
            &mut FakeDest::good(),
        );
        assert!(!r.blocked, "{:#?}", r.checks);
        let ids: Vec<_> = r.checks.iter().map(|c| c.id).collect();
        for id in [
            "passthrough-disk",
            "host-device",
            "client-device",
            "shared-storage",
            "disk-on-destination",
            "network-on-destination",
            "emulator-on-destination",
            "cpu",
            "distinct-hosts",
        ] {
            assert!(ids.contains(&id), "{id} missing from {ids:?}");
        }
    }

    #[test]
    fn lun_is_refused_naming_the_disk() {
        let mut dst = FakeDest::good();
        dst.paths.push("/dev/loop0");
        let r = run(include_str!("../tests/fixtures/lun.xml"), &mut dst);
        let f = only_failure(&r, "passthrough-disk");
        assert_eq!(f.device.as_deref(), Some("lun sda"));
        assert!(f.message.contains("/dev/loop0"));
        assert!(f.message.contains("attached to the source host only"));
    }

    #[test]
    fn every_hostdev_kind_is_refused() {
        for (fixture, ident) in [
            (
                include_str!("../tests/fixtures/scsi-hostdev.xml"),
                "iscsi:iqn.2026-11.lab:lun1/1",
            ),
            (
                include_str!("../tests/fixtures/usb-hostdev.xml"),
                "0x1d6b:0x0002",
            ),
            (
                include_str!("../tests/fixtures/usb-hostdev-addr.xml"),
                "bus 1 device 2",
            ),
            (
                include_str!("../tests/fixtures/pci-hostdev.xml"),
                "0000:03:00.0",
            ),
        ] {
            let r = run(fixture, &mut FakeDest::good());
            let f = only_failure(&r, "host-device");
            assert!(f.device.as_deref().unwrap().contains(ident), "{f:?}");
            assert!(f.message.contains(ident), "{f:?}");
            assert!(
                f.message.contains("attached to the source host only"),
                "{f:?}"
            );
        }
    }

    #[test]
    fn client_devices_are_refused() {
        for (fixture, name) in [
            (include_str!("../tests/fixtures/redirdev-tcp.xml"), "redir0"),
            (
                include_str!("../tests/fixtures/redirdev-spice.xml"),
                "redir0",
            ),
            (
                include_str!("../tests/fixtures/cdrom-host.xml"),
                "cdrom hdc",
            ),
            (
                include_str!("../tests/fixtures/smartcard.xml"),
                "smartcard #0",
            ),
        ] {
            let mut dst = FakeDest::good();
            dst.paths.push("/dev/sr0");
            let r = run(fixture, &mut dst);
            let f = only_failure(&r, "client-device");
            assert!(f.device.as_deref().unwrap().contains(name), "{f:?}");
            assert!(
                f.message.contains("attached to the source host only"),
                "{f:?}"
            );
        }
    }

    #[test]
    fn cdrom_image_on_shared_storage_is_fine() {
        let mut dst = FakeDest::good();
        dst.paths.push("/shared/boot.iso");
        let r = run(include_str!("../tests/fixtures/cdrom-image.xml"), &mut dst);
        assert!(!r.blocked, "{:#?}", r.checks);
    }

    #[test]
    fn local_disk_is_unsafe_unless_allowed() {
        let xml = include_str!("../tests/fixtures/local-disk.xml");
        let mut dst = FakeDest::good();
        dst.paths.push("/var/lib/libvirt/images/local.raw");
        let r = run(xml, &mut dst);
        let f = only_failure(&r, "shared-storage");
        assert_eq!(f.device.as_deref(), Some("disk vda"));
        assert!(f
            .message
            .contains("Migration without shared storage is unsafe"));

        let dom = DomainXml::parse(xml).unwrap();
        let checks = run_all(
            &dom,
            &mut FakeSource,
            &mut dst,
            CheckOptions { allow_unsafe: true },
        );
        assert!(
            checks.iter().all(|c| c.status != Status::Fail),
            "{checks:#?}"
        );
    }

    #[test]
    fn disk_missing_on_destination_is_refused() {
        let mut dst = FakeDest::good();
        dst.paths.clear();
        let r = run(include_str!("../tests/fixtures/shared-disk.xml"), &mut dst);
        let f = only_failure(&r, "disk-on-destination");
        assert_eq!(f.device.as_deref(), Some("disk vda"));
        assert!(f
            .message
            .contains("/shared/disk.raw does not exist on the destination"));
    }

    #[test]
    fn missing_bridge_and_network_are_refused() {
        let r = run(
            include_str!("../tests/fixtures/missing-bridge.xml"),
            &mut FakeDest::good(),
        );
        let f = only_failure(&r, "network-on-destination");
        assert!(f.device.as_deref().unwrap().contains("ferrybr-missing"));
        assert!(f
            .message
            .contains("bridge ferrybr-missing is missing on the destination"));

        let r = run(
            include_str!("../tests/fixtures/missing-network.xml"),
            &mut FakeDest::good(),
        );
        let f = only_failure(&r, "network-on-destination");
        assert!(f.message.contains("libvirt network ferrynet-missing"));
    }

    #[test]
    fn emulator_missing_or_incompatible_is_refused() {
        let xml = include_str!("../tests/fixtures/ferry-qemu.xml");
        let mut dst = FakeDest::good();
        dst.emulators.clear();
        let r = run(xml, &mut dst);
        let f = only_failure(&r, "emulator-on-destination");
        assert_eq!(f.device.as_deref(), Some("emulator /usr/bin/ferry-qemu"));

        let mut dst = FakeDest::good();
        dst.emulators.insert("/usr/bin/ferry-qemu", Some("9.0.0"));
        let r = run(xml, &mut dst);
        let f = only_failure(&r, "ferry-version");
        assert!(f.message.contains("version 9.0.0"));
    }

    #[test]
    fn cpu_the_destination_lacks_is_refused() {
        let mut dst = FakeDest::good();
        dst.cpu_missing = Some("avx512f");
        let r = run(include_str!("../tests/fixtures/kvm-cpu.xml"), &mut dst);
        let f = only_failure(&r, "cpu");
        assert!(f.message.contains("avx512f") && f.message.contains("Skylake-Server"));
        // TCG guests do not depend on the host CPU.
        let r = run(include_str!("../tests/fixtures/base.xml"), &mut dst);
        assert!(!r.blocked);
    }

    /// libvirt's default CPU (check='none') on a destination without some of the
    /// model's features is not blocked: libvirt does not check it, and the guest
    /// runs without what its host lacks; ferry's handshake compares the real CPU.
    #[test]
    fn a_default_cpu_with_check_none_is_not_blocked() {
        let xml = r#"<domain type='kvm'><name>g</name><os><type arch='x86_64'>hvm</type></os>
          <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>qemu64</model></cpu>
          <devices><emulator>/usr/bin/ferry-qemu</emulator></devices></domain>"#;
        let mut dst = FakeDest::good();
        dst.cpu_missing = Some("pni, svm");
        let r = run(xml, &mut dst);
        assert!(!r.blocked, "{r:?}");
        let cpu = r.checks.iter().find(|c| c.id == "cpu").expect("cpu check");
        assert_eq!(cpu.status, Status::Skip);
        assert!(cpu.message.contains("pni, svm"), "{}", cpu.message);
        // With libvirt's checking on, the same answer blocks.
        let r = run(&xml.replace("check='none'", "check='partial'"), &mut dst);
        only_failure(&r, "cpu");
        // So does a feature the guest requires by name.
        let required = xml.replace("</model>", "</model><feature policy='require' name='svm'/>");
        only_failure(&run(&required, &mut dst), "cpu");
    }

    #[test]
    fn same_host_is_refused() {
        let mut dst = FakeDest::good();
        dst.uuid = Some("A0A0A0A0-0000-4000-8000-00000000000A");
        let r = run(include_str!("../tests/fixtures/base.xml"), &mut dst);
        only_failure(&r, "distinct-hosts");
    }

    #[test]
    fn ferry_qemu_version_is_parsed_and_compared() {
        assert_eq!(
            ferry_qemu_version("QEMU emulator version 7.2.0 (ferry-qemu 0.1.0)\n").as_deref(),
            Some("0.1.0")
        );
        assert_eq!(
            ferry_qemu_version("QEMU emulator version 7.2.22 (Debian)"),
            None
        );
        assert!(versions_compatible("0.1.0", "0.1.7"));
        assert!(!versions_compatible("0.1.0", "0.2.0"));
        assert!(versions_compatible("1.2.0", "1.9.3"));
        assert!(!versions_compatible("1.2.0", "2.0.0"));
    }

    #[test]
    fn report_serializes_as_one_object() {
        let r = run(
            include_str!("../tests/fixtures/lun.xml"),
            &mut FakeDest::good(),
        );
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["blocked"], true);
        assert!(v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["status"] == "fail"
                && c["id"] == "passthrough-disk"
                && c["device"] == "lun sda"));
    }
}
