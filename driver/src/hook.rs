//! `ferry hook`: libvirt's qemu hook (`/etc/libvirt/hooks/qemu.d/`).
//!
//! libvirt runs every executable in `/etc/libvirt/hooks/qemu.d/` as
//! `HOOK GUEST OPERATION SUB-OPERATION EXTRA` with the domain XML on stdin.
//! On the destination of a migration the call is `GUEST migrate begin -`,
//! before the destination emulator starts; a non-zero exit makes libvirt refuse
//! the migration and show what the hook wrote to stderr. Anything on stdout
//! would *replace* the domain XML, so the hook never writes to stdout.
//! A hook must not call back into libvirtd (it would deadlock), so the checks
//! here use local lookups only.

use std::path::Path;
use std::process::Command;

use crate::checks::{self, Check, DestProbe, EmulatorProbe, Probe, Status};
use crate::domxml::DomainXml;

/// Destination probe with local lookups (files, netns interfaces, libvirt's
/// network status files, the emulator binary).
#[derive(Debug, Default)]
pub struct LocalDest {
    /// libvirt's run dir, where active networks leave `network/NAME.xml`.
    pub run_dir: Option<std::path::PathBuf>,
}

impl DestProbe for LocalDest {
    fn path(&mut self, path: &str) -> Probe {
        match std::fs::metadata(path) {
            Ok(_) => Probe::Present(format!("{path} exists")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Probe::Missing("no such file or directory".into())
            }
            Err(e) => Probe::Unknown(e.to_string()),
        }
    }

    fn network(&mut self, name: &str) -> Probe {
        let dir = self
            .run_dir
            .clone()
            .unwrap_or_else(|| "/run/libvirt".into())
            .join("network");
        if !dir.is_dir() {
            return Probe::Unknown(format!("{} does not exist", dir.display()));
        }
        if dir.join(format!("{name}.xml")).exists() {
            Probe::Present("active".into())
        } else {
            Probe::Missing("no active network with that name".into())
        }
    }

    fn host_interface(&mut self, name: &str) -> Probe {
        // if_nametoindex looks in this process's network namespace, which is
        // the one libvirtd (and the destination emulator) runs in.
        match nix::net::if_::if_nametoindex(name) {
            Ok(_) => Probe::Present("present".into()),
            Err(_) => Probe::Missing("no interface with that name".into()),
        }
    }

    fn emulator(&mut self, dom: &DomainXml, path: &str) -> EmulatorProbe {
        if !Path::new(path).exists() {
            return EmulatorProbe::NoBinary("no such file".into());
        }
        match Command::new(path).arg("--version").output() {
            Ok(out) => EmulatorProbe::Present {
                machine: dom.machine.clone(),
                ferry_version: checks::ferry_qemu_version(&String::from_utf8_lossy(&out.stdout)),
            },
            Err(e) => EmulatorProbe::NoBinary(format!("cannot run it: {e}")),
        }
    }

    fn compare_cpu(&mut self, _dom: &DomainXml, _cpu_xml: &str) -> Probe {
        Probe::Unknown("not available inside a hook".into())
    }

    fn host_uuid(&mut self) -> Option<String> {
        None
    }
}

/// What the hook decided.
#[derive(Debug)]
pub enum HookVerdict {
    /// Not a call ferry acts on, or everything passed.
    Allow,
    /// Refuse, with the text for libvirt's error message.
    Refuse(String),
}

/// The destination-side rules for `GUEST migrate begin -`: devices bound to the
/// source and what the destination must have (disks, networks, emulator).
pub fn destination_verdict(xml: &str, dest: &mut dyn DestProbe) -> HookVerdict {
    let dom = match DomainXml::parse(xml) {
        Ok(d) => d,
        Err(e) => return HookVerdict::Refuse(format!("ferry: cannot read the domain XML: {e}")),
    };
    let mut all: Vec<Check> = checks::device_checks(&dom);
    all.extend(checks::destination_checks(&dom, dest));
    let failed: Vec<String> = all
        .iter()
        .filter(|c| c.status == Status::Fail)
        .map(|c| format!("ferry: {}: {}", c.id, c.message))
        .collect();
    if failed.is_empty() {
        HookVerdict::Allow
    } else {
        HookVerdict::Refuse(failed.join("\n"))
    }
}

/// Acts on one hook call. `args` are libvirt's: guest, operation, sub-operation, extra.
pub fn run(args: &[String], stdin_xml: &str) -> HookVerdict {
    match (
        args.get(1).map(String::as_str),
        args.get(2).map(String::as_str),
    ) {
        (Some("migrate"), Some("begin")) => {
            destination_verdict(stdin_xml, &mut LocalDest::default())
        }
        _ => HookVerdict::Allow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_operations_are_allowed_without_looking() {
        for op in [["prepare", "begin"], ["start", "begin"], ["stopped", "end"]] {
            let args: Vec<String> = ["g", op[0], op[1], "-"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            assert!(matches!(run(&args, "not xml"), HookVerdict::Allow));
        }
    }

    #[test]
    fn migrate_begin_refuses_with_device_and_rule() {
        let args: Vec<String> = ["ferry-usb-hostdev", "migrate", "begin", "-"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let HookVerdict::Refuse(msg) =
            run(&args, include_str!("../tests/fixtures/usb-hostdev.xml"))
        else {
            panic!("usb hostdev was allowed");
        };
        assert!(msg.contains("host-device"), "{msg}");
        assert!(msg.contains("0x1d6b:0x0002"), "{msg}");
        assert!(msg.contains("attached to the source host only"), "{msg}");
    }

    #[test]
    fn missing_disk_and_bridge_are_refused_locally() {
        let mut dest = LocalDest::default();
        let HookVerdict::Refuse(msg) =
            destination_verdict(include_str!("../tests/fixtures/shared-disk.xml"), &mut dest)
        else {
            panic!("missing disk was allowed");
        };
        assert!(
            msg.contains("/shared/disk.raw does not exist on the destination"),
            "{msg}"
        );
        let HookVerdict::Refuse(msg) = destination_verdict(
            include_str!("../tests/fixtures/missing-bridge.xml"),
            &mut dest,
        ) else {
            panic!("missing bridge was allowed");
        };
        assert!(msg.contains("bridge ferrybr-missing is missing"), "{msg}");
    }
}
