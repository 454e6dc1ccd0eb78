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
//!
//! The hook runs as root for every QEMU domain of the host, ferry's or not. It
//! acts only on domains whose `<emulator>` is a ferry-qemu ([`ferry_emulator`]),
//! and it never runs anything named in the domain XML: whoever may define a
//! domain would otherwise run a program of their choosing as root.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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
        // Read, never run: the version is the one the binary prints for
        // `-version`, found in its file.
        match ferry_emulator(Path::new(path)) {
            Some(found) => EmulatorProbe::Present {
                machine: dom.machine.clone(),
                ferry_version: found.version,
            },
            None => EmulatorProbe::NoBinary("not a ferry-qemu".into()),
        }
    }

    fn compare_cpu(&mut self, _dom: &DomainXml, _cpu_xml: &str) -> Probe {
        Probe::Unknown("not available inside a hook".into())
    }

    fn host_uuid(&mut self) -> Option<String> {
        None
    }
}

/// Where the ferry package installs ferry-qemu.
const INSTALLED_FERRY_QEMU: &[&str] = &[
    "/usr/libexec/ferry/ferry-qemu",
    "/usr/local/libexec/ferry/ferry-qemu",
];

/// What `ferry-qemu -version` prints before the version; its binary carries the
/// line as a string.
const VERSION_MARKER: &[u8] = b"(ferry-qemu ";

/// The most of an emulator file searched for [`VERSION_MARKER`].
const MAX_EMULATOR_BYTES: u64 = 512 << 20;

/// A domain's emulator found to be a ferry-qemu.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FerryEmulator {
    /// The file, symlinks resolved.
    pub path: PathBuf,
    /// The release its version line names, where the file carries one.
    pub version: Option<String>,
}

/// The ferry-qemu paths this ferry knows: the installed ones and the one next to
/// the running `ferry` (a build tree, or a package's bin dir).
fn known_ferry_qemu() -> Vec<PathBuf> {
    let mut known: Vec<PathBuf> = INSTALLED_FERRY_QEMU.iter().map(PathBuf::from).collect();
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| {
        e.canonicalize()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
    }) {
        known.push(dir.join("ferry-qemu"));
        known.push(dir.join("../libexec/ferry/ferry-qemu"));
    }
    known
}

/// Whether the emulator at `path` is a ferry-qemu, decided without running
/// anything: the same file (device and inode, so through symlinks, hard links
/// and bind mounts) as a ferry-qemu this ferry knows, or a regular file that
/// carries ferry-qemu's version line (another release, or a wrapper that
/// prints it). Anything else (QEMU, a missing file, a FIFO or device) is not.
pub fn ferry_emulator(path: &Path) -> Option<FerryEmulator> {
    let path = path.canonicalize().ok()?;
    // O_NONBLOCK: a FIFO swapped in after the check below must not hang the
    // hook at open; it is refused once open as not a regular file.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(&path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let known = known_ferry_qemu().iter().any(|k| {
        std::fs::metadata(k).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
    });
    let version = version_in(&mut file);
    (known || version.is_some()).then_some(FerryEmulator { path, version })
}

/// The version after the first [`VERSION_MARKER`] in `file`, read in chunks.
fn version_in(file: &mut File) -> Option<String> {
    let mut reader = file.take(MAX_EMULATOR_BYTES);
    let mut buf = vec![0u8; 1 << 20];
    // Bytes kept from the previous chunk so a marker across two chunks is found.
    let keep = VERSION_MARKER.len() + 32;
    let mut held = 0;
    loop {
        let n = reader.read(&mut buf[held..]).ok()?;
        let end = held + n;
        if let Some(at) = buf[..end]
            .windows(VERSION_MARKER.len())
            .position(|w| w == VERSION_MARKER)
        {
            let rest = &buf[at + VERSION_MARKER.len()..end];
            let v: String = rest
                .iter()
                .take(32)
                .map(|&b| char::from(b))
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+'))
                .collect();
            if v.starts_with(|c: char| c.is_ascii_digit()) {
                return Some(v);
            }
        }
        if n == 0 {
            return None;
        }
        held = keep.min(end);
        buf.copy_within(end - held..end, 0);
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
            let dom = match DomainXml::parse(stdin_xml) {
                Ok(d) => d,
                Err(e) => {
                    return HookVerdict::Refuse(format!("ferry: cannot read the domain XML: {e}"))
                }
            };
            // Another emulator's domain (QEMU's) is none of ferry's business.
            match dom.emulator.as_deref().map(Path::new) {
                Some(emu) if ferry_emulator(emu).is_some() => {
                    destination_verdict(stdin_xml, &mut LocalDest::default())
                }
                _ => HookVerdict::Allow,
            }
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

    fn migrate_begin() -> Vec<String> {
        ["ferry-usb-hostdev", "migrate", "begin", "-"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// A stand-in for a ferry-qemu binary: a file (not executable) that carries
    /// its version line.
    fn fake_ferry_qemu(dir: &Path, version: &str) -> PathBuf {
        let path = dir.join("ferry-qemu");
        let mut bytes = vec![0x7fu8, b'E', b'L', b'F'];
        bytes.extend(std::iter::repeat_n(0u8, 3 << 20));
        bytes.extend_from_slice(
            format!("QEMU emulator version 7.2.0 (ferry-qemu {version})\0").as_bytes(),
        );
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn usb_hostdev_on(emulator: &Path) -> String {
        include_str!("../tests/fixtures/usb-hostdev.xml").replace(
            "/usr/bin/qemu-system-x86_64",
            emulator.to_str().expect("UTF-8 path"),
        )
    }

    #[test]
    fn migrate_begin_refuses_with_device_and_rule() {
        let dir = tempfile::tempdir().unwrap();
        let emu = fake_ferry_qemu(dir.path(), env!("CARGO_PKG_VERSION"));
        let HookVerdict::Refuse(msg) = run(&migrate_begin(), &usb_hostdev_on(&emu)) else {
            panic!("usb hostdev was allowed");
        };
        assert!(msg.contains("host-device"), "{msg}");
        assert!(msg.contains("0x1d6b:0x0002"), "{msg}");
        assert!(msg.contains("attached to the source host only"), "{msg}");
    }

    /// On a host that runs QEMU domains too, the hook leaves them alone: a QEMU
    /// domain with a USB host device (which ferry refuses) migrates in as
    /// libvirt decides. The hook used to refuse it by ferry's rules.
    #[test]
    fn a_qemu_domain_passes_the_hook_untouched() {
        let xml = include_str!("../tests/fixtures/usb-hostdev.xml");
        assert!(xml.contains("<emulator>/usr/bin/qemu-system-x86_64</emulator>"));
        assert!(matches!(run(&migrate_begin(), xml), HookVerdict::Allow));
        assert_eq!(
            ferry_emulator(Path::new("/usr/bin/qemu-system-x86_64")),
            None
        );
    }

    /// The hook (root) never runs the `<emulator>` of a domain XML: here a
    /// script that would leave a marker file. It used to run it with
    /// `--version`.
    #[test]
    fn the_emulator_named_in_the_xml_is_never_run() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran-as-root");
        let script = dir.path().join("qemu-evil");
        std::fs::write(&script, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let verdict = run(&migrate_begin(), &usb_hostdev_on(&script));
        assert!(!marker.exists(), "the hook ran {}", script.display());
        assert!(matches!(verdict, HookVerdict::Allow), "{verdict:?}");
        // Also where the domain is ferry's: the version is read from the file.
        let mut dest = LocalDest::default();
        let dom = DomainXml::parse(&usb_hostdev_on(&script)).unwrap();
        let probe = dest.emulator(&dom, script.to_str().unwrap());
        assert!(!marker.exists(), "the probe ran {}", script.display());
        assert!(matches!(probe, EmulatorProbe::NoBinary(_)), "{probe:?}");
    }

    /// A ferry-qemu is known by its file: through a symlink, with the version
    /// its binary carries (also across the 1 MiB chunks it is read in), and a
    /// FIFO at the path is not read from.
    #[test]
    fn a_ferry_qemu_is_known_by_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let emu = fake_ferry_qemu(dir.path(), "9.9.0");
        let link = dir.path().join("qemu-kvm");
        std::os::unix::fs::symlink(&emu, &link).unwrap();
        let found = ferry_emulator(&link).expect("a ferry-qemu");
        assert_eq!(found.path, emu.canonicalize().unwrap());
        assert_eq!(found.version.as_deref(), Some("9.9.0"));
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(ferry_emulator(&fifo), None);
        assert_eq!(ferry_emulator(&dir.path().join("missing")), None);
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
