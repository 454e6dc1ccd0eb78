//! NICs: `-netdev tap` attached by `-device virtio-net-pci`, as libvirt 9.0
//! writes them (`{"type":"tap","fd":"N","vhost":true,"vhostfd":"M",...}`)
//! and as people type them (`tap,id=X,ifname=tapN,script=no,downscript=no`).
//!
//! The taps are opened at startup (`process::open_taps`) and become the
//! engine's virtio-net devices.
//!
//! * `vhost=on`/`vhostfd=`: accepted; ferry has no vhost-net, the guest
//!   cannot tell (vhost only moves the host side into the kernel). The fd
//!   libvirt opened for it is recorded in [`NicConfig::vhost_fds`] so the
//!   process can close it.
//! * `-netdev user` (slirp), `bridge`/`helper`, `socket`, `vhost-user`, ...:
//!   refused with the fix (a tap: `<interface type='bridge'|'network'|
//!   'ethernet'>`).
//! * ferry runs no scripts: a tap by name needs `script=no,downscript=no`.

use serde_json::Value;

use super::disks::{modern_only, no_rom, not_offered, parse_addr, SlotClaim};
use super::opts::{json_text, parse_bool, parse_u64};
use super::{ArgvError, Invocation};

/// `-device` drivers that become a ferry virtio-net NIC (modern-only, as
/// for virtio-blk).
pub const VIRTIO_NET: &[&str] = &["virtio-net-pci", "virtio-net-pci-non-transitional"];

/// Where a NIC's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// An open tap fd (libvirt's `fd=N`).
    Fd(i32),
    /// A tap opened by name (`ifname=`).
    Ifname(String),
}

/// A virtio-net-pci NIC on a tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicConfig {
    /// The qdev id (`net0`).
    pub id: Option<String>,
    pub slot: u8,
    /// The `-netdev` id (`hostnet0`).
    pub netdev: String,
    pub tap: TapSource,
    /// `52:54:00:12:34:56`.
    pub mac: String,
    /// vhost-net fds libvirt opened (`vhostfd=`), unused by ferry.
    pub vhost_fds: Vec<i32>,
}

const NO_SLIRP: &str = "ferry has no slirp: use a bridge or tap interface \
     (<interface type='bridge'|'network'|'ethernet'>)";
const USE_A_TAP: &str = "ferry's NICs sit on a tap: use <interface type='bridge'|'network'|\
     'ethernet'> (-netdev tap,fd=N or tap,ifname=TAP,script=no,downscript=no)";

fn fd_value(key: &str, v: &str) -> Result<i32, ArgvError> {
    v.parse::<i32>()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| ArgvError::invalid("-netdev", v, &format!("invalid '{key}'")))
}

/// A checked `-netdev tap`: where its frames go and its vhost fds.
fn tap_netdev(
    id: &str,
    props: &serde_json::Map<String, Value>,
) -> Result<(TapSource, Vec<i32>), ArgvError> {
    let get = |k: &str| props.get(k).map(json_text);
    let option = "-netdev";
    let mut vhost_fds = Vec::new();
    for (k, v) in props {
        let text = json_text(v);
        match k.as_str() {
            "fd" | "ifname" | "script" | "downscript" | "sndbuf" | "poll-us" => {}
            "vhost" | "vhostforce" | "vnet_hdr" => {
                parse_bool(option, k, &text)?;
            }
            "vhostfd" => vhost_fds.push(fd_value(k, &text)?),
            "vhostfds" => {
                for f in text.split(':') {
                    vhost_fds.push(fd_value(k, f)?);
                }
            }
            "queues" if parse_u64(&text) == Some(1) => {}
            "fds" if !text.contains(':') => {}
            "queues" | "fds" => {
                return Err(ArgvError::unsupported(
                    option,
                    format!(
                    "a multi-queue tap ('{id}', {k}={text}; ferry's virtio-net has one queue pair)"
                ),
                ))
            }
            "br" | "helper" => {
                return Err(ArgvError::unsupported_because(
                    option,
                    format!("the bridge helper ('{id}')"),
                    "ferry runs no helpers: create the tap, add it to the bridge and give \
                     ifname=TAP,script=no,downscript=no (or let libvirt pass fd=N)",
                ))
            }
            other => {
                return Err(ArgvError::unsupported(
                    option,
                    format!("tap parameter '{other}' ('{id}')"),
                ))
            }
        }
    }
    let fd = get("fd").or_else(|| get("fds"));
    match (fd, get("ifname")) {
        (Some(_), Some(_)) => Err(ArgvError::invalid(
            option,
            id,
            "ifname= is invalid with fd=",
        )),
        (Some(fd), None) => Ok((TapSource::Fd(fd_value("fd", &fd)?), vhost_fds)),
        (None, Some(name)) => {
            for key in ["script", "downscript"] {
                if !matches!(get(key).as_deref(), Some("no" | "")) {
                    return Err(ArgvError::unsupported_because(
                        option,
                        format!(
                            "{key}={} ('{id}')",
                            get(key).unwrap_or_else(|| "the default /etc/qemu-if*".into())
                        ),
                        "ferry runs no scripts: set the tap up beforehand and add \
                         script=no,downscript=no",
                    ));
                }
            }
            Ok((TapSource::Ifname(name), vhost_fds))
        }
        (None, None) => Err(ArgvError::unsupported_because(
            option,
            format!("a tap without fd= or ifname= ('{id}')"),
            "ferry does not create taps: give ifname=TAP,script=no,downscript=no or fd=N",
        )),
    }
}

/// Checks a MAC as a NIC can have it.
fn check_mac(name: &str, mac: &str) -> Result<(), ArgvError> {
    let bytes: Vec<Option<u8>> = mac
        .split(':')
        .map(|p| {
            (p.len() == 2)
                .then(|| u8::from_str_radix(p, 16).ok())
                .flatten()
        })
        .collect();
    if bytes.len() != 6 || bytes.iter().any(Option::is_none) {
        return Err(ArgvError::invalid(
            "-device",
            mac,
            &format!("{name}: invalid MAC"),
        ));
    }
    if bytes[0].is_some_and(|b| b & 1 != 0) {
        return Err(ArgvError::invalid(
            "-device",
            mac,
            &format!("{name}: a multicast MAC"),
        ));
    }
    Ok(())
}

/// virtio-net-pci properties for features ferry's virtio-net does not offer:
/// `=off` is accepted (it is what the guest gets), `=on` refused.
const NOT_OFFERED: &[&str] = &[
    "csum",
    "guest_csum",
    "gso",
    "guest_tso4",
    "guest_tso6",
    "guest_ecn",
    "guest_ufo",
    "guest_announce",
    "host_tso4",
    "host_tso6",
    "host_ecn",
    "host_ufo",
    "mrg_rxbuf",
    "ctrl_vq",
    "ctrl_rx",
    "ctrl_vlan",
    "ctrl_rx_extra",
    "ctrl_mac_addr",
    "ctrl_guest_offloads",
    "mq",
    "rss",
    "hash",
    "event_idx",
    "indirect_desc",
    "packed",
    "iommu_platform",
    "ats",
    "page-per-vq",
    "failover",
    "multifunction",
];

/// `virtio-net-pci` properties and what ferry does with them.
fn check_net_prop(key: &str, value: &Value) -> Result<(), ArgvError> {
    let text = json_text(value);
    let flag = |v: &str| parse_bool("-device", key, v);
    let num = || parse_u64(&text);
    let refuse = |what: String| Err(ArgvError::unsupported("-device", what));
    match key {
        "netdev" | "mac" | "bus" | "addr" | "bootindex" | "x-txtimer" | "x-txburst" | "tx" => {
            Ok(())
        }
        "romfile" => no_rom(&text),
        "vectors" if num() == Some(3) => Ok(()),
        "rx_queue_size" | "tx_queue_size" if num() == Some(256) => Ok(()),
        "vectors" | "rx_queue_size" | "tx_queue_size" | "host_mtu" | "speed" | "duplex" => {
            refuse(format!("virtio-net {key}={text}"))
        }
        "status" if flag(&text)? => Ok(()),
        "status" => refuse("virtio-net status=off (ferry's NICs report their link)".into()),
        "multifunction" if flag(&text)? => {
            refuse("multifunction=on (ferry's virtio devices are single-function)".into())
        }
        "disable-legacy" | "disable-modern" => modern_only(key, &text),
        // Offloads and features ferry's virtio-net does not offer (it has MAC
        // and STATUS): "off" is what it does.
        k if NOT_OFFERED.contains(&k) => {
            not_offered("virtio-net", "VERSION_1, MAC and STATUS only", key, &text)
        }
        other => refuse(format!("virtio-net-pci property '{other}'")),
    }
}

impl Invocation {
    /// The virtio-net NICs with their slots; `placed` are the slots the
    /// disks already have.
    pub(super) fn nics(
        &self,
        pc: bool,
        placed: &[(u8, String)],
    ) -> Result<Vec<NicConfig>, ArgvError> {
        let mut taps = Vec::new();
        for n in &self.netdevs {
            let id = n.id.clone().ok_or_else(|| {
                ArgvError::invalid("-netdev", &n.kind, "parameter 'id' is missing")
            })?;
            match n.kind.as_str() {
                "tap" => taps.push((id.clone(), tap_netdev(&id, &n.props)?)),
                "user" => {
                    return Err(ArgvError::unsupported_because(
                        "-netdev",
                        format!("user-mode networking ('{id}')"),
                        NO_SLIRP,
                    ))
                }
                other => {
                    return Err(ArgvError::unsupported_because(
                        "-netdev",
                        format!("network backend '{other}' ('{id}')"),
                        USE_A_TAP,
                    ))
                }
            }
        }
        let mut pending = Vec::new();
        let mut claims = Vec::new();
        for (index, d) in self
            .devices
            .iter()
            .filter(|d| VIRTIO_NET.contains(&d.kind.as_str()))
            .enumerate()
        {
            let name = d.id.clone().unwrap_or_else(|| d.kind.clone());
            for (k, v) in &d.props {
                check_net_prop(k, v)?;
            }
            if let Some(bus) = d.props.get("bus").map(json_text) {
                if bus != "pci.0" {
                    return Err(ArgvError::unsupported_because(
                        "-device",
                        format!("bus '{bus}' ({name})"),
                        "ferry has one PCI bus, pci.0 (use machine type pc, not q35)",
                    ));
                }
            }
            let netdev = d.props.get("netdev").map(json_text).ok_or_else(|| {
                ArgvError::unsupported("-device", format!("a NIC without netdev= ({name})"))
            })?;
            let (tap, vhost_fds) = taps
                .iter()
                .find(|(id, _)| *id == netdev)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| {
                    ArgvError::invalid(
                        "-device",
                        &name,
                        &format!("Property 'netdev' can't find value '{netdev}'"),
                    )
                })?;
            if pending.iter().any(|n: &NicConfig| n.netdev == netdev) {
                return Err(ArgvError::invalid(
                    "-device",
                    &name,
                    &format!("netdev '{netdev}' is already in use by another NIC"),
                ));
            }
            // QEMU's default MAC: 52:54:00:12:34:56 and up.
            let mac = d
                .props
                .get("mac")
                .map_or_else(|| format!("52:54:00:12:34:{:02x}", 0x56 + index), json_text);
            check_mac(&name, &mac)?;
            let addr = d
                .props
                .get("addr")
                .map(|a| {
                    parse_addr(a).ok_or_else(|| {
                        ArgvError::invalid("-device", &json_text(a), "invalid PCI address")
                    })
                })
                .transpose()?;
            claims.push(SlotClaim {
                name: name.clone(),
                addr,
            });
            pending.push(NicConfig {
                id: d.id.clone(),
                slot: 0,
                netdev,
                tap,
                mac: mac.to_ascii_lowercase(),
                vhost_fds,
            });
        }
        let slots = self.assign_slots(&claims, pc, VIRTIO_NET, placed)?;
        for (n, slot) in pending.iter_mut().zip(slots) {
            n.slot = slot;
        }
        Ok(pending)
    }
}
