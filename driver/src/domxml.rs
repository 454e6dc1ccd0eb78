//! The parts of a libvirt domain XML that decide whether a guest can migrate.
//!
//! Pure parsing, no libvirt: the pre-flight rules in `checks` and the libvirt
//! hook both work on [`DomainXml`], and the unit tests feed it fixtures.

use thiserror::Error;

/// Why a domain XML could not be read.
#[derive(Debug, Error)]
pub enum DomainXmlError {
    #[error("Domain XML is not well-formed")]
    Parse(#[from] roxmltree::Error),
    #[error("Root element is <{0}>, expected <domain>")]
    NotADomain(String),
}

/// A `<disk>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// `type=`: file, block, network, volume, dir, nvme, vhostuser.
    pub disk_type: String,
    /// `device=`: disk, cdrom, floppy, lun.
    pub device: String,
    /// Host path for file/block/dir disks (`<source file|dev|dir>`).
    pub path: Option<String>,
    /// `protocol:name` for network disks, `pool/volume` for volume disks.
    pub remote: Option<String>,
    /// `<target dev=>`, e.g. `vda`.
    pub target: Option<String>,
    pub readonly: bool,
    pub shareable: bool,
    /// `<driver cache=>`.
    pub cache: Option<String>,
    pub alias: Option<String>,
}

impl Disk {
    /// How messages name this disk: the guest-visible target, else its alias.
    pub fn name(&self) -> String {
        match (&self.target, &self.alias) {
            (Some(t), _) => format!("{} {t}", self.device),
            (None, Some(a)) => format!("{} {a}", self.device),
            (None, None) => format!("{} (no target)", self.device),
        }
    }

    /// A disk with no medium (empty CD-ROM / floppy drive).
    pub fn is_empty(&self) -> bool {
        self.path.is_none() && self.remote.is_none()
    }
}

/// A `<hostdev>`: a device of the source host handed to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hostdev {
    /// `mode=`: subsystem or capabilities.
    pub mode: String,
    /// `type=`: usb, pci, scsi, scsi_host, mdev, storage, misc, net.
    pub kind: String,
    /// What identifies the device on the host, e.g. `0000:03:00.0`, `0x1d6b:0x0002`.
    pub ident: String,
    pub alias: Option<String>,
}

impl Hostdev {
    pub fn name(&self) -> String {
        let base = format!("{} host device {}", self.kind, self.ident);
        match &self.alias {
            Some(a) => format!("{base} ({a})"),
            None => base,
        }
    }
}

/// A `<redirdev>`: USB redirected from a client (SPICE viewer or a TCP peer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirdev {
    pub bus: String,
    /// `type=`: spicevmc, tcp, ...
    pub kind: String,
    /// For tcp: `host:service`.
    pub peer: Option<String>,
    pub alias: Option<String>,
    /// 0-based position among the domain's redirdevs (libvirt names them redir0, redir1...).
    pub index: usize,
}

impl Redirdev {
    pub fn name(&self) -> String {
        let alias = self
            .alias
            .clone()
            .unwrap_or_else(|| format!("redir{}", self.index));
        match &self.peer {
            Some(p) => format!("{} redirdev {alias} (type='{}', {p})", self.bus, self.kind),
            None => format!("{} redirdev {alias} (type='{}')", self.bus, self.kind),
        }
    }
}

/// A `<smartcard>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Smartcard {
    /// `mode=`: host, host-certificates, passthrough.
    pub mode: String,
    /// For passthrough: the character device type (spicevmc, tcp...).
    pub kind: Option<String>,
    pub index: usize,
}

/// An `<interface>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// `type=`: bridge, network, direct, user, ethernet, ...
    pub kind: String,
    /// The bridge name, network name or host device the interface attaches to.
    pub source: Option<String>,
    pub mac: Option<String>,
    pub index: usize,
}

impl Interface {
    pub fn name(&self) -> String {
        match &self.mac {
            Some(m) => format!("interface {m}"),
            None => format!("interface #{}", self.index),
        }
    }
}

/// The `<cpu>` element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpu {
    /// `mode=`: custom (default), host-model, host-passthrough, maximum.
    pub mode: String,
    pub model: Option<String>,
    /// `check=`: none, partial or full (libvirt's own CPU checking).
    pub check: Option<String>,
    /// Features with policy require/force (the ones the destination must provide).
    pub required_features: Vec<String>,
    /// The element verbatim, as virConnectCompareCPU wants it.
    pub xml: String,
}

/// What the migration rules need from a domain XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainXml {
    pub name: String,
    pub uuid: Option<String>,
    /// `<domain type=>`: kvm or qemu (TCG).
    pub virt_type: String,
    pub arch: Option<String>,
    pub machine: Option<String>,
    pub emulator: Option<String>,
    pub cpu: Option<Cpu>,
    pub disks: Vec<Disk>,
    pub hostdevs: Vec<Hostdev>,
    pub redirdevs: Vec<Redirdev>,
    pub smartcards: Vec<Smartcard>,
    pub interfaces: Vec<Interface>,
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.has_tag_name(name))
}

fn children<'a, 'i: 'a>(
    n: roxmltree::Node<'a, 'i>,
    name: &'a str,
) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> + 'a {
    n.children()
        .filter(move |c| c.is_element() && c.has_tag_name(name))
}

fn attr(n: Option<roxmltree::Node<'_, '_>>, name: &str) -> Option<String> {
    n.and_then(|n| n.attribute(name)).map(str::to_owned)
}

fn text(n: Option<roxmltree::Node<'_, '_>>) -> Option<String> {
    n.and_then(|n| n.text())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

fn alias(n: roxmltree::Node<'_, '_>) -> Option<String> {
    attr(child(n, "alias"), "name")
}

fn parse_disk(d: roxmltree::Node<'_, '_>) -> Disk {
    let disk_type = d.attribute("type").unwrap_or("file").to_owned();
    let source = child(d, "source");
    let path = match disk_type.as_str() {
        "file" => attr(source, "file"),
        "block" => attr(source, "dev"),
        "dir" => attr(source, "dir"),
        _ => None,
    };
    let remote = match disk_type.as_str() {
        "network" => source.map(|s| {
            let proto = s.attribute("protocol").unwrap_or("network");
            let name = s.attribute("name").unwrap_or("");
            let host = child(s, "host")
                .and_then(|h| h.attribute("name"))
                .map(|h| format!(" on {h}"))
                .unwrap_or_default();
            format!("{proto}:{name}{host}")
        }),
        "volume" => source.map(|s| {
            format!(
                "{}/{}",
                s.attribute("pool").unwrap_or("?"),
                s.attribute("volume").unwrap_or("?")
            )
        }),
        _ => None,
    };
    Disk {
        disk_type,
        device: d.attribute("device").unwrap_or("disk").to_owned(),
        path,
        remote,
        target: attr(child(d, "target"), "dev"),
        readonly: child(d, "readonly").is_some(),
        shareable: child(d, "shareable").is_some(),
        cache: attr(child(d, "driver"), "cache"),
        alias: alias(d),
    }
}

fn parse_hostdev(h: roxmltree::Node<'_, '_>) -> Hostdev {
    let kind = h.attribute("type").unwrap_or("?").to_owned();
    let source = child(h, "source");
    let ident = match kind.as_str() {
        "usb" => {
            let vendor = attr(source.and_then(|s| child(s, "vendor")), "id");
            let product = attr(source.and_then(|s| child(s, "product")), "id");
            let addr = source.and_then(|s| child(s, "address"));
            match (vendor, product, addr) {
                (Some(v), Some(p), _) => format!("{v}:{p}"),
                (_, _, Some(a)) => format!(
                    "bus {} device {}",
                    a.attribute("bus").unwrap_or("?"),
                    a.attribute("device").unwrap_or("?")
                ),
                _ => "(unspecified)".to_owned(),
            }
        }
        "pci" => source
            .and_then(|s| child(s, "address"))
            .map(|a| {
                let f = |k: &str| {
                    a.attribute(k)
                        .map(|v| v.trim_start_matches("0x").to_owned())
                        .unwrap_or_else(|| "0".to_owned())
                };
                format!(
                    "{}:{}:{}.{}",
                    f("domain"),
                    f("bus"),
                    f("slot"),
                    f("function")
                )
            })
            .unwrap_or_else(|| "(unspecified)".to_owned()),
        "scsi" => match source {
            Some(s) if s.attribute("protocol").is_some() => format!(
                "{}:{}",
                s.attribute("protocol").unwrap_or(""),
                s.attribute("name").unwrap_or("")
            ),
            Some(s) => {
                let adapter = attr(child(s, "adapter"), "name").unwrap_or_default();
                let a = child(s, "address");
                format!(
                    "{adapter} {}:{}:{}",
                    attr(a, "bus").unwrap_or_default(),
                    attr(a, "target").unwrap_or_default(),
                    attr(a, "unit").unwrap_or_default()
                )
            }
            None => "(unspecified)".to_owned(),
        },
        "scsi_host" => attr(source, "wwpn").unwrap_or_else(|| "(unspecified)".to_owned()),
        "mdev" => attr(source.and_then(|s| child(s, "address")), "uuid")
            .unwrap_or_else(|| "(unspecified)".to_owned()),
        _ => source
            .and_then(|s| s.children().find(|c| c.is_element()))
            .and_then(|c| c.text().map(|t| t.trim().to_owned()))
            .unwrap_or_else(|| "(unspecified)".to_owned()),
    };
    Hostdev {
        mode: h.attribute("mode").unwrap_or("subsystem").to_owned(),
        kind,
        ident,
        alias: alias(h),
    }
}

impl DomainXml {
    /// Parses a domain XML as `virsh dumpxml` or a libvirt hook prints it.
    pub fn parse(xml: &str) -> Result<Self, DomainXmlError> {
        let doc = roxmltree::Document::parse(xml)?;
        let root = doc.root_element();
        if !root.has_tag_name("domain") {
            return Err(DomainXmlError::NotADomain(
                root.tag_name().name().to_owned(),
            ));
        }
        let os_type = child(root, "os").and_then(|o| child(o, "type"));
        let devices = child(root, "devices");
        let cpu = child(root, "cpu").map(|c| Cpu {
            mode: c.attribute("mode").unwrap_or("custom").to_owned(),
            model: text(child(c, "model")),
            check: c.attribute("check").map(str::to_owned),
            required_features: children(c, "feature")
                .filter(|f| matches!(f.attribute("policy"), None | Some("require" | "force")))
                .filter_map(|f| f.attribute("name").map(str::to_owned))
                .collect(),
            xml: xml[c.range()].to_owned(),
        });
        let mut dom = DomainXml {
            name: text(child(root, "name")).unwrap_or_default(),
            uuid: text(child(root, "uuid")),
            virt_type: root.attribute("type").unwrap_or("kvm").to_owned(),
            arch: attr(os_type, "arch"),
            machine: attr(os_type, "machine"),
            emulator: devices.and_then(|d| text(child(d, "emulator"))),
            cpu,
            disks: Vec::new(),
            hostdevs: Vec::new(),
            redirdevs: Vec::new(),
            smartcards: Vec::new(),
            interfaces: Vec::new(),
        };
        let Some(devices) = devices else {
            return Ok(dom);
        };
        for d in devices.children().filter(|c| c.is_element()) {
            match d.tag_name().name() {
                "disk" => dom.disks.push(parse_disk(d)),
                "hostdev" => dom.hostdevs.push(parse_hostdev(d)),
                "redirdev" => {
                    let source = child(d, "source");
                    let peer = match (attr(source, "host"), attr(source, "service")) {
                        (Some(h), Some(s)) => Some(format!("{h}:{s}")),
                        (Some(h), None) => Some(h),
                        _ => None,
                    };
                    let index = dom.redirdevs.len();
                    dom.redirdevs.push(Redirdev {
                        bus: d.attribute("bus").unwrap_or("usb").to_owned(),
                        kind: d.attribute("type").unwrap_or("?").to_owned(),
                        peer,
                        alias: alias(d),
                        index,
                    });
                }
                "smartcard" => {
                    let index = dom.smartcards.len();
                    dom.smartcards.push(Smartcard {
                        mode: d.attribute("mode").unwrap_or("?").to_owned(),
                        kind: d.attribute("type").map(str::to_owned),
                        index,
                    });
                }
                "interface" => {
                    let kind = d.attribute("type").unwrap_or("?").to_owned();
                    let source = child(d, "source");
                    let src = match kind.as_str() {
                        "bridge" => attr(source, "bridge"),
                        "network" => attr(source, "network"),
                        "direct" | "hostdev" => attr(source, "dev"),
                        _ => None,
                    };
                    let index = dom.interfaces.len();
                    dom.interfaces.push(Interface {
                        kind,
                        source: src,
                        mac: attr(child(d, "mac"), "address"),
                        index,
                    });
                }
                _ => {}
            }
        }
        Ok(dom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_base_domain() {
        let d = DomainXml::parse(include_str!("../tests/fixtures/base.xml")).unwrap();
        assert_eq!(d.name, "ferry-base");
        assert_eq!(d.virt_type, "qemu");
        assert_eq!(d.arch.as_deref(), Some("x86_64"));
        assert_eq!(d.machine.as_deref(), Some("pc"));
        assert!(d.emulator.is_some());
        assert!(d.disks.is_empty() && d.hostdevs.is_empty() && d.redirdevs.is_empty());
    }

    #[test]
    fn parses_disks_hostdevs_and_interfaces() {
        let d = DomainXml::parse(include_str!("../tests/fixtures/lun.xml")).unwrap();
        assert_eq!(d.disks.len(), 1);
        assert_eq!(d.disks[0].device, "lun");
        assert_eq!(d.disks[0].path.as_deref(), Some("/dev/loop0"));
        assert_eq!(d.disks[0].name(), "lun sda");

        let d = DomainXml::parse(include_str!("../tests/fixtures/usb-hostdev.xml")).unwrap();
        assert_eq!(d.hostdevs[0].kind, "usb");
        assert_eq!(d.hostdevs[0].ident, "0x1d6b:0x0002");

        let d = DomainXml::parse(include_str!("../tests/fixtures/pci-hostdev.xml")).unwrap();
        assert_eq!(d.hostdevs[0].ident, "0000:03:00.0");

        let d = DomainXml::parse(include_str!("../tests/fixtures/redirdev-tcp.xml")).unwrap();
        assert_eq!(d.redirdevs[0].peer.as_deref(), Some("127.0.0.1:4000"));
        assert_eq!(
            d.redirdevs[0].name(),
            "usb redirdev redir0 (type='tcp', 127.0.0.1:4000)"
        );

        let d = DomainXml::parse(include_str!("../tests/fixtures/missing-bridge.xml")).unwrap();
        assert_eq!(d.interfaces[0].kind, "bridge");
        assert_eq!(d.interfaces[0].source.as_deref(), Some("ferrybr-missing"));
    }

    #[test]
    fn keeps_the_cpu_element_verbatim() {
        let d = DomainXml::parse(include_str!("../tests/fixtures/kvm-cpu.xml")).unwrap();
        let cpu = d.cpu.unwrap();
        assert_eq!(cpu.mode, "custom");
        assert_eq!(cpu.model.as_deref(), Some("Skylake-Server"));
        assert!(cpu.xml.starts_with("<cpu") && cpu.xml.ends_with("</cpu>"));
        assert_eq!(cpu.required_features, vec!["avx512f", "lahf_lm"]);
    }

    #[test]
    fn rejects_what_is_not_a_domain() {
        assert!(matches!(
            DomainXml::parse("<network/>"),
            Err(DomainXmlError::NotADomain(_))
        ));
        assert!(matches!(
            DomainXml::parse("<domain>"),
            Err(DomainXmlError::Parse(_))
        ));
    }
}
