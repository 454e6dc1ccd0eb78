//! Entropy devices: `-object rng-random`/`rng-builtin` attached by
//! `-device virtio-rng-pci`, as libvirt 9.0 writes them for
//! `<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>`
//! (`{"qom-type":"rng-random","id":"objrng0","filename":"/dev/urandom"}` and
//! `{"driver":"virtio-rng-pci","rng":"objrng0","id":"rng0","max-bytes":N,
//! "period":MS,"bus":"pci.0","addr":"0x7"}`) and as people type them
//! (`rng-random,id=r,filename=/dev/urandom`, `virtio-rng-pci,rng=r`).
//!
//! * `rng-random` reads its `filename` (QEMU's default `/dev/urandom`),
//!   opened when the VM is built; `rng-builtin` is the host's getrandom, as
//!   is a `virtio-rng-pci` without `rng=` (QEMU 7.2's default backend).
//! * `rng-egd` (a chardev to an entropy daemon) and other backends are
//!   refused with the fix.
//! * `max-bytes`/`period` are QEMU's rate limit, with QEMU's defaults and
//!   checks (`hw/virtio/virtio-rng.c`).

use ferry_vmm::devices::virtio::rng::{RngConfig, RngSource};
use serde_json::Value;

use super::disks::{modern_only, no_rom, not_offered, parse_addr, SlotClaim, VERSION_1_ONLY};
use super::opts::{json_text, parse_u64};
use super::{ArgvError, Invocation};

/// `-device` drivers that become a ferry virtio-rng device (modern-only, as
/// for virtio-blk).
pub const VIRTIO_RNG: &[&str] = &["virtio-rng-pci", "virtio-rng-pci-non-transitional"];

/// `-object` types ferry takes as an entropy source.
pub const RNG_BACKENDS: &[&str] = &["rng-random", "rng-builtin"];

/// QEMU's `rng-random` default `filename`.
pub const DEFAULT_RNG_FILE: &str = "/dev/urandom";

const USE_RANDOM_OR_BUILTIN: &str = "ferry reads entropy from a file or the host's getrandom: \
     use <backend model='random'>/dev/urandom</backend> or <backend model='builtin'/> \
     (-object rng-random,filename=/dev/urandom or rng-builtin)";

/// A virtio-rng-pci device and its backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RngDeviceConfig {
    /// The qdev id (`rng0`).
    pub id: Option<String>,
    pub slot: u8,
    /// The backend object's id (`objrng0`); `None`: QEMU's default backend.
    pub backend: Option<String>,
    /// What the engine builds.
    pub config: RngConfig,
}

/// Checks the `-object rng-*` objects: `Ok(())` for the kinds ferry takes,
/// the refusal for `rng-egd` and for properties ferry does not know.
pub(super) fn check_rng_object(
    kind: &str,
    id: &str,
    props: &serde_json::Map<String, Value>,
) -> Result<(), ArgvError> {
    match kind {
        "rng-random" => {
            for (k, v) in props {
                match k.as_str() {
                    "filename" if matches!(v, Value::String(s) if !s.is_empty()) => {}
                    "filename" => {
                        return Err(ArgvError::invalid(
                            "-object",
                            &json_text(v),
                            &format!("rng-random '{id}': 'filename' expects a path"),
                        ))
                    }
                    other => {
                        return Err(ArgvError::unsupported(
                            "-object",
                            format!("rng-random property '{other}' ('{id}')"),
                        ))
                    }
                }
            }
            Ok(())
        }
        "rng-builtin" => match props.keys().next() {
            Some(k) => Err(ArgvError::unsupported(
                "-object",
                format!("rng-builtin property '{k}' ('{id}')"),
            )),
            None => Ok(()),
        },
        other => Err(ArgvError::unsupported_because(
            "-object",
            format!("entropy backend '{other}' ('{id}')"),
            USE_RANDOM_OR_BUILTIN,
        )),
    }
}

/// A uint property as QEMU's qdev parses it, in QEMU's words.
fn uint_prop(name: &str, key: &str, v: &Value, max: u64, ty: &str) -> Result<u64, ArgvError> {
    let text = json_text(v);
    let n = parse_u64(&text).ok_or_else(|| {
        ArgvError::invalid(
            "-device",
            name,
            &format!("Parameter '{key}' expects uint64"),
        )
    })?;
    if n > max {
        return Err(ArgvError::invalid(
            "-device",
            name,
            &format!("Parameter '{key}' expects {ty}"),
        ));
    }
    Ok(n)
}

/// `virtio-rng-pci` properties besides rng, max-bytes, period, bus and addr.
fn check_rng_prop(key: &str, value: &Value) -> Result<(), ArgvError> {
    let text = json_text(value);
    let refuse = |what: String| Err(ArgvError::unsupported("-device", what));
    match key {
        "romfile" => no_rom(&text),
        "disable-legacy" | "disable-modern" => modern_only(key, &text),
        k if VERSION_1_ONLY.contains(&k) => not_offered("virtio-rng", "VERSION_1 only", key, &text),
        other => refuse(format!("virtio-rng-pci property '{other}'")),
    }
}

impl Invocation {
    /// The virtio-rng devices with their slots; `placed` are the slots the
    /// disks and NICs already have.
    pub(super) fn rngs(
        &self,
        pc: bool,
        placed: &[(u8, String)],
    ) -> Result<Vec<RngDeviceConfig>, ArgvError> {
        let mut backends = Vec::new();
        for o in &self.objects {
            if o.kind.starts_with("rng-") {
                let id = o.id.clone().ok_or_else(|| {
                    ArgvError::invalid("-object", &o.kind, "Parameter 'id' is missing")
                })?;
                check_rng_object(&o.kind, &id, &o.props)?;
                let source = match o.kind.as_str() {
                    "rng-random" => RngSource::File(
                        o.props
                            .get("filename")
                            .map_or_else(|| DEFAULT_RNG_FILE.to_string(), json_text)
                            .into(),
                    ),
                    _ => RngSource::Builtin,
                };
                backends.push((id, source));
            }
        }
        let mut pending = Vec::new();
        let mut claims = Vec::new();
        for d in self
            .devices
            .iter()
            .filter(|d| VIRTIO_RNG.contains(&d.kind.as_str()))
        {
            let name = d.id.clone().unwrap_or_else(|| d.kind.clone());
            let mut config = RngConfig::new(RngSource::Builtin);
            let mut backend = None;
            for (k, v) in &d.props {
                match k.as_str() {
                    "rng" => {
                        let id = json_text(v);
                        let source = backends
                            .iter()
                            .find(|(b, _)| *b == id)
                            .map(|(_, s)| s.clone())
                            .ok_or_else(|| {
                                ArgvError::invalid(
                                    "-device",
                                    &name,
                                    &format!("Property 'rng' can't find value '{id}'"),
                                )
                            })?;
                        config.source = source;
                        backend = Some(id);
                    }
                    "max-bytes" => config.max_bytes = uint_prop(&name, k, v, u64::MAX, "uint64")?,
                    "period" => {
                        config.period_ms =
                            uint_prop(&name, k, v, u32::MAX.into(), "uint32_t")? as u32
                    }
                    "bus" => {
                        let bus = json_text(v);
                        if bus != "pci.0" {
                            return Err(ArgvError::unsupported_because(
                                "-device",
                                format!("bus '{bus}' ({name})"),
                                "ferry has one PCI bus, pci.0 (use machine type pc, not q35)",
                            ));
                        }
                    }
                    "addr" => {}
                    other => check_rng_prop(other, v)?,
                }
            }
            // QEMU's realize checks, in its words.
            config
                .check()
                .map_err(|e| ArgvError::invalid("-device", &name, &e.to_string()))?;
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
            pending.push(RngDeviceConfig {
                id: d.id.clone(),
                slot: 0,
                backend,
                config,
            });
        }
        let slots = self.assign_slots(&claims, pc, VIRTIO_RNG, placed)?;
        for (r, slot) in pending.iter_mut().zip(slots) {
            r.slot = slot;
        }
        Ok(pending)
    }
}
