//! The memory balloon: `-device virtio-balloon-pci`, as libvirt 9.0 writes it
//! for every domain's `<memballoon model='virtio'>`
//! (`{"driver":"virtio-balloon-pci","id":"balloon0","bus":"pci.0","addr":"0x5"}`,
//! with `"free-page-reporting":true` for `<memballoon freePageReporting='on'>`
//! and `"deflate-on-oom":true` for `autodeflate='on'`) and as people type it.
//!
//! * One balloon per guest, as in QEMU ("Only one balloon device is
//!   supported").
//! * `free-page-reporting` and `deflate-on-oom` offer their features (QEMU's
//!   defaults: off); `guest-stats-polling-interval` sets the stats period
//!   from the start, as `qom-set` does later. `free-page-hint` (migration
//!   hinting), `iothread` and `page-poison=on` are refused with the reason.

use ferry_vmm::devices::virtio::balloon::BalloonConfig;
use serde_json::Value;

use super::disks::{modern_only, no_rom, not_offered, parse_addr, SlotClaim, VERSION_1_ONLY};
use super::opts::{json_text, parse_bool, parse_u64};
use super::{ArgvError, Invocation};

/// `-device` drivers that become ferry's virtio-balloon (modern-only, as for
/// virtio-blk).
pub const VIRTIO_BALLOON: &[&str] = &["virtio-balloon-pci", "virtio-balloon-pci-non-transitional"];

/// The virtio-balloon-pci device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalloonDeviceConfig {
    /// The qdev id (`balloon0`): its QOM path is `/machine/peripheral/ID`.
    pub id: Option<String>,
    pub slot: u8,
    pub config: BalloonConfig,
    /// `guest-stats-polling-interval` in seconds (0: off, QEMU's default).
    pub stats_interval: u32,
}

/// A virtio-balloon-pci property besides the ones [`Invocation::balloon`]
/// reads.
fn check_balloon_prop(key: &str, value: &Value) -> Result<(), ArgvError> {
    let text = json_text(value);
    let flag = |v: &str| parse_bool("-device", key, v);
    let refuse = |what: String| Err(ArgvError::unsupported("-device", what));
    match key {
        "romfile" => no_rom(&text),
        "disable-legacy" | "disable-modern" => modern_only(key, &text),
        "free-page-hint" if flag(&text)? => Err(ArgvError::unsupported_because(
            "-device",
            "virtio-balloon free-page-hint=on",
            "ferry's migration finds free pages by their zeroes: use free-page-reporting=on",
        )),
        "page-poison" if flag(&text)? => refuse(
            "virtio-balloon page-poison=on (ferry's balloon does not offer page poisoning)".into(),
        ),
        "free-page-hint" | "page-poison" => Ok(()),
        k if VERSION_1_ONLY.contains(&k) => {
            not_offered("virtio-balloon", "VERSION_1 only", key, &text)
        }
        other => refuse(format!("virtio-balloon-pci property '{other}'")),
    }
}

impl Invocation {
    /// The balloon with its slot, if the command line has one; `placed` are
    /// the slots the other virtio devices already have.
    pub(super) fn balloon(
        &self,
        pc: bool,
        placed: &[(u8, String)],
    ) -> Result<Option<BalloonDeviceConfig>, ArgvError> {
        let mut found: Vec<_> = self
            .devices
            .iter()
            .filter(|d| VIRTIO_BALLOON.contains(&d.kind.as_str()))
            .collect();
        if found.len() > 1 {
            let name = found[1].id.clone().unwrap_or_else(|| found[1].kind.clone());
            return Err(ArgvError::invalid(
                "-device",
                &name,
                "Only one balloon device is supported",
            ));
        }
        let Some(d) = found.pop() else {
            return Ok(None);
        };
        let name = d.id.clone().unwrap_or_else(|| d.kind.clone());
        let mut balloon = BalloonDeviceConfig {
            id: d.id.clone(),
            slot: 0,
            config: BalloonConfig::default(),
            stats_interval: 0,
        };
        for (k, v) in &d.props {
            let text = json_text(v);
            match k.as_str() {
                "free-page-reporting" => {
                    balloon.config.free_page_reporting = parse_bool("-device", k, &text)?
                }
                "deflate-on-oom" => {
                    balloon.config.deflate_on_oom = parse_bool("-device", k, &text)?
                }
                "guest-stats-polling-interval" => {
                    balloon.stats_interval = parse_u64(&text)
                        .filter(|&n| n <= u64::from(u32::MAX))
                        .ok_or_else(|| {
                            ArgvError::invalid("-device", &name, "timer value is too big")
                        })? as u32
                }
                "bus" => {
                    if text != "pci.0" {
                        return Err(ArgvError::unsupported_because(
                            "-device",
                            format!("bus '{text}' ({name})"),
                            "ferry has one PCI bus, pci.0 (use machine type pc, not q35)",
                        ));
                    }
                }
                "addr" => {}
                other => check_balloon_prop(other, v)?,
            }
        }
        let addr = d
            .props
            .get("addr")
            .map(|a| {
                parse_addr(a).ok_or_else(|| {
                    ArgvError::invalid("-device", &json_text(a), "invalid PCI address")
                })
            })
            .transpose()?;
        let claims = [SlotClaim { name, addr }];
        balloon.slot = self.assign_slots(&claims, pc, VIRTIO_BALLOON, placed)?[0];
        Ok(Some(balloon))
    }
}
