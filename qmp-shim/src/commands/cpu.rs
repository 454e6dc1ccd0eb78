//! The CPU models ferry-qemu offers, as QEMU 7.2 describes them
//! (query-cpu-definitions, query-cpu-model-expansion), computed from what KVM
//! supports on this host, and the migration blocker a guest CPU can bring
//! (invtsc without a fixed TSC frequency, as QEMU's target/i386/kvm/kvm.c).
//!
//! libvirt 9.0 segfaults when an advertised query-cpu-definitions returns an
//! error (seen in the libvirt lab's capability probe), so that handler never fails; expansion errors are
//! GenericError, which libvirt tolerates.

use std::sync::OnceLock;

use ferry_vmm::cpu::model::{self, CpuModel};
use kvm_bindings::kvm_cpuid_entry2;
use serde_json::{json, Map, Value};

use super::{arg_str, Command, Ctx};
use crate::qmp::error::CommandError;
use crate::qmp::schema::{opt, req, CommandSchema, EnumDef, ObjectDef, Ty};

/// QEMU's text for the invtsc blocker (query-migrate `blocked-reasons` and
/// the `migrate` error).
pub const INVTSC_BLOCKER: &str = "State blocked by non-migratable CPU device (invtsc flag)";

/// What KVM supports on this host, read once; `None` without a usable /dev/kvm.
pub fn host_cpuid() -> Option<&'static [kvm_cpuid_entry2]> {
    static HOST: OnceLock<Option<Vec<kvm_cpuid_entry2>>> = OnceLock::new();
    HOST.get_or_init(|| {
        let kvm = kvm_ioctls::Kvm::new().ok()?;
        ferry_vmm::cpu::supported_cpuid(&kvm).ok()
    })
    .as_deref()
}

/// Why this VM cannot migrate because of its CPU (QEMU's wording), if it
/// cannot: its CPU has invtsc (ferry does not fix a TSC frequency).
pub fn cpu_migration_blockers(ctx: &Ctx<'_>) -> Vec<String> {
    let Some(config) = ctx.vm.config.as_ref() else {
        return Vec::new();
    };
    let has_invtsc = match &config.cpu {
        CpuModel::Exact(leaves) => {
            let entries: Vec<kvm_cpuid_entry2> = leaves.iter().map(Into::into).collect();
            model::has_feature(&entries, "invtsc")
        }
        m => host_cpuid()
            .and_then(|host| model::resolve(host, m).ok())
            .is_some_and(|entries| model::has_feature(&entries, "invtsc")),
    };
    if has_invtsc {
        vec![INVTSC_BLOCKER.to_string()]
    } else {
        Vec::new()
    }
}

/// The CPUID vCPU `index` really has: the guest's CPU as ferry gave it to
/// the vCPU (with its per-vCPU fields and the hypervisor bit). Before a
/// guest exists (`-incoming defer`, nothing received yet) it is what `-cpu`
/// resolves to on this host, as QEMU builds its CPU objects from `-cpu`
/// alone. `None` without a VM or without KVM.
pub fn vcpu_cpuid(ctx: &Ctx<'_>, index: u32) -> Option<Vec<kvm_cpuid_entry2>> {
    let config = ctx.vm.config.as_ref()?;
    let base: Vec<kvm_cpuid_entry2> = match ctx.vm.backend.guest_cpuid() {
        Some(leaves) => leaves.iter().map(Into::into).collect(),
        None => model::resolve(host_cpuid()?, &config.cpu).ok()?,
    };
    Some(
        match ferry_vmm::cpu::vcpu_cpuid(&base, index, config.vcpus, 0) {
            Ok(table) => table.as_slice().to_vec(),
            Err(_) => base,
        },
    )
}

/// What `-cpu` asked for that this host cannot give, so the guest runs
/// without it (QEMU's `unavailable-features` of a CPU object: the filtered
/// features, with a warning unless `enforce`).
pub fn vcpu_unavailable_features(ctx: &Ctx<'_>) -> Vec<&'static str> {
    match (ctx.vm.config.as_ref(), host_cpuid()) {
        (Some(config), Some(host)) => model::filtered_features(host, &config.cpu),
        _ => Vec::new(),
    }
}

/// The identity properties of QEMU's x86 CPU objects, `(name, type)`.
const IDENTITY_PROPS: &[(&str, &str)] = &[
    ("vendor", "string"),
    ("family", "int"),
    ("model", "int"),
    ("stepping", "int"),
    ("model-id", "string"),
    ("level", "uint32"),
    ("xlevel", "uint32"),
];

/// The properties of ferry's CPU objects beyond `type`, `realized` and
/// `hotpluggable`, as `(name, type)`: a bool per feature ferry knows and per
/// QEMU alias of one (libvirt reads every bool after start), the identity,
/// and `unavailable-features`.
pub fn cpu_properties() -> impl Iterator<Item = (&'static str, &'static str)> {
    model::feature_names()
        .chain(model::feature_aliases().map(|(alias, _)| alias))
        .map(|n| (n, "bool"))
        .chain(IDENTITY_PROPS.iter().copied())
        .chain([("unavailable-features", "strList")])
}

/// The value of CPU property `name` (one of [`cpu_properties`]) of a vCPU
/// with CPUID `entries` that lost `unavailable`.
pub fn cpu_property(entries: &[kvm_cpuid_entry2], unavailable: &[&str], name: &str) -> Value {
    let id = || model::identity(entries);
    match name {
        "vendor" => json!(id().vendor),
        "family" => json!(id().family),
        "model" => json!(id().model),
        "stepping" => json!(id().stepping),
        "model-id" => json!(id().model_id),
        "level" => json!(id().level),
        "xlevel" => json!(id().xlevel),
        "unavailable-features" => json!(unavailable),
        feature => json!(model::has_feature(entries, feature)),
    }
}

/// The non-feature properties of a static expansion.
const IDENTITY: &[&str] = &[
    "vendor",
    "family",
    "model",
    "stepping",
    "model-id",
    "min-level",
    "min-xlevel",
];

/// `(name, migration-safe)` of the models `-cpu` takes, in QEMU's order.
const DEFINITIONS: &[(&str, bool)] = &[
    ("max", false),
    ("host", false),
    ("qemu64", true),
    ("kvm64", true),
];

static CPU_DEFINITION_INFO: ObjectDef = ObjectDef {
    name: "CpuDefinitionInfo",
    members: &[
        req("name", Ty::Str),
        opt("migration-safe", Ty::Bool),
        req("static", Ty::Bool),
        opt("unavailable-features", Ty::Array(&Ty::Str)),
        req("typename", Ty::Str),
        opt("alias-of", Ty::Str),
        req("deprecated", Ty::Bool),
    ],
};

static CPU_MODEL_INFO: ObjectDef = ObjectDef {
    name: "CpuModelInfo",
    members: &[req("name", Ty::Str), opt("props", Ty::Any)],
};

static CPU_MODEL_EXPANSION_TYPE: EnumDef = EnumDef {
    name: "CpuModelExpansionType",
    values: &["static", "full"],
};

static CPU_MODEL_EXPANSION_INFO: ObjectDef = ObjectDef {
    name: "CpuModelExpansionInfo",
    members: &[req("model", Ty::Object(&CPU_MODEL_INFO))],
};

pub static QUERY_CPU_DEFINITIONS: Command = Command {
    schema: CommandSchema {
        name: "query-cpu-definitions",
        args: &[],
        ret: Some(Ty::Array(&Ty::Object(&CPU_DEFINITION_INFO))),
    },
    handler: |_, _| Ok(cpu_definitions(host_cpuid())),
};

/// Never fails: without KVM every model is unavailable for want of `kvm`
/// (ferry has no other accelerator), as QEMU says of `host` under TCG.
fn cpu_definitions(host: Option<&[kvm_cpuid_entry2]>) -> Value {
    Value::Array(
        DEFINITIONS
            .iter()
            .map(|&(name, migration_safe)| {
                let unavailable = match host {
                    Some(h) => model::unavailable_features(h, name),
                    None => vec!["kvm"],
                };
                json!({"name": name, "typename": format!("{name}-x86_64-cpu"),
                       "unavailable-features": unavailable, "static": false,
                       "migration-safe": migration_safe, "deprecated": false})
            })
            .collect(),
    )
}

pub static QUERY_CPU_MODEL_EXPANSION: Command = Command {
    schema: CommandSchema {
        name: "query-cpu-model-expansion",
        args: &[
            req("type", Ty::Enum(&CPU_MODEL_EXPANSION_TYPE)),
            req("model", Ty::Object(&CPU_MODEL_INFO)),
        ],
        ret: Some(Ty::Object(&CPU_MODEL_EXPANSION_INFO)),
    },
    handler: query_cpu_model_expansion,
};

fn query_cpu_model_expansion(
    _: &mut Ctx<'_>,
    args: &Map<String, Value>,
) -> Result<Value, CommandError> {
    let host = host_cpuid().ok_or_else(|| {
        CommandError::Generic(
            "ferry-qemu needs a usable /dev/kvm to expand CPU models (it has no TCG)".into(),
        )
    })?;
    let full = arg_str(args, "type") == "full";
    let empty = Map::new();
    let m = args
        .get("model")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let name = arg_str(m, "name");
    let props = match m.get("props") {
        None => &empty,
        Some(Value::Object(p)) => p,
        Some(_) => {
            return Err(CommandError::Generic(
                "Invalid parameter type for 'model.props', expected: object".into(),
            ))
        }
    };
    // The QMP text is the expansion error's own message.
    expand(host, name, props, full).map_err(|e| CommandError::Generic(e.to_string()))
}

/// Why a CPU model cannot be expanded; the texts are QEMU's where QEMU has one.
#[derive(Debug, thiserror::Error)]
enum ExpandError {
    /// The model is not one of the definitions.
    #[error("The CPU definition '{name}' cannot be found")]
    UnknownDefinition {
        /// The model asked for.
        name: String,
    },
    /// An identity property (family, model-id...) was given for a named model.
    #[error(
        "Property '{name}-x86_64-cpu.{prop}' cannot be changed: ferry-qemu runs \
         model {name} as this host's KVM defines it"
    )]
    IdentityProperty {
        /// The model.
        name: String,
        /// The property.
        prop: String,
    },
    /// A feature property's value is not a boolean.
    #[error("Invalid parameter type for '{prop}', expected: boolean")]
    NotBoolean {
        /// The property.
        prop: String,
    },
    /// A feature ferry does not know was switched on.
    #[error("Property '{name}-x86_64-cpu.{prop}' not found")]
    UnknownProperty {
        /// The model.
        name: String,
        /// The property.
        prop: String,
    },
    /// The engine refused the model.
    #[error(transparent)]
    Model(#[from] model::CpuModelError),
    /// The model cannot be resolved against this host.
    #[error(transparent)]
    Resolve(#[from] ferry_vmm::VmmError),
}

/// The expansion of model `name` with `props` on a host supporting `host`.
fn expand(
    host: &[kvm_cpuid_entry2],
    name: &str,
    props: &Map<String, Value>,
    full: bool,
) -> Result<Value, ExpandError> {
    if name != "base" && !DEFINITIONS.iter().any(|(n, _)| *n == name) {
        return Err(ExpandError::UnknownDefinition {
            name: name.to_string(),
        });
    }
    let mut features = Vec::new();
    // The identity properties a static expansion returns: libvirt 9.0 sends
    // them back in a full expansion of `base` (its STATIC_FULL).
    let mut identity = Map::new();
    for (k, v) in props {
        if IDENTITY.contains(&k.as_str()) {
            if name != "base" {
                return Err(ExpandError::IdentityProperty {
                    name: name.to_string(),
                    prop: k.clone(),
                });
            }
            identity.insert(k.clone(), v.clone());
            continue;
        }
        let on = v
            .as_bool()
            .ok_or_else(|| ExpandError::NotBoolean { prop: k.clone() })?;
        match k.as_str() {
            // ferry has no Hyper-V enlightenments: nothing to pass through.
            "hv-passthrough" => {}
            "migratable" => features.push((k.clone(), if on { "on" } else { "off" }.into())),
            // A feature by QEMU's name or an alias of it (lahf_lm, sse4-1).
            _ if CpuModel::from_qemu("host", &[(k.clone(), "on".into())]).is_ok() => {
                features.push((k.clone(), if on { "on" } else { "off" }.into()));
            }
            // A feature ferry does not know is never given to a guest: off
            // is what it already is, and `base` (the static expansion's model)
            // only describes a CPU, as libvirt sends QEMU's expansions back.
            _ if !on || name == "base" => {}
            _ => {
                return Err(ExpandError::UnknownProperty {
                    name: name.to_string(),
                    prop: k.clone(),
                })
            }
        }
    }
    if name == "base" {
        // QEMU's static base model: no features but the ones asked for.
        let mut props: Map<String, Value> = model::feature_names()
            .map(|f| {
                let on = features.iter().any(|(k, v)| k == f && v == "on");
                (f.to_string(), Value::Bool(on))
            })
            .collect();
        props.extend(identity);
        return Ok(json!({"model": {"name": "base", "props": props}}));
    }
    let cpu = CpuModel::from_qemu(name, &features)?;
    let entries = model::resolve(host, &cpu)?;
    let id = model::identity(&entries);
    // The hypervisor bit is ferry's own, set in every vCPU.
    let mut out: Map<String, Value> = model::feature_names()
        .map(|f| {
            let set = f == "hypervisor" || model::has_feature(&entries, f);
            (f.to_string(), Value::Bool(set))
        })
        .collect();
    for (k, v) in [
        ("vendor", json!(id.vendor)),
        ("family", json!(id.family)),
        ("model", json!(id.model)),
        ("stepping", json!(id.stepping)),
        ("model-id", json!(id.model_id)),
        ("min-level", json!(id.level)),
        ("min-xlevel", json!(id.xlevel)),
    ] {
        out.insert(k.into(), v);
    }
    if full {
        out.insert("level".into(), json!(id.level));
        out.insert("xlevel".into(), json!(id.xlevel));
        let migratable = !features
            .iter()
            .any(|(k, v)| k == "migratable" && v == "off");
        out.insert("migratable".into(), json!(migratable));
        Ok(json!({"model": {"name": name, "props": out}}))
    } else {
        Ok(json!({"model": {"name": "base", "props": out}}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// An Intel host without pni (sse3) or svm, with or without invtsc.
    fn host(invtsc: bool) -> Vec<kvm_cpuid_entry2> {
        let v = |s: &[u8]| u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        vec![
            leaf(0, 0xd, v(b"Genu"), v(b"ntel"), v(b"ineI")),
            leaf(
                1,
                0x0006_06a6,
                0,
                (1 << 13) | (1 << 21) | (1 << 28),
                0xffff_ffff,
            ),
            leaf(0x8000_0000, 0x8000_0008, 0, 0, 0),
            leaf(0x8000_0001, 0, 0, 1, (1 << 11) | (1 << 20) | (1 << 29)),
            leaf(0x8000_0007, 0, 0, 0, u32::from(invtsc) << 8),
        ]
    }

    #[test]
    fn definitions_name_what_this_host_lacks() {
        let d = cpu_definitions(Some(&host(false)));
        let by = |n: &str| {
            d.as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == n)
                .unwrap()
                .clone()
        };
        assert_eq!(by("host")["unavailable-features"], json!([]));
        assert_eq!(by("host")["migration-safe"], json!(false));
        // QEMU 7.2 under KVM answers the same on such a host (recorded: qemu64's
        // unavailable-features ["pni"]): its kvm_default_props turn svm off.
        assert_eq!(by("qemu64")["unavailable-features"], json!(["pni"]));
        assert_eq!(by("kvm64")["unavailable-features"], json!(["pni"]));
        assert_eq!(by("kvm64")["typename"], json!("kvm64-x86_64-cpu"));
        assert_eq!(by("kvm64")["migration-safe"], json!(true));
        // Without KVM nothing can run; still an answer, never an error.
        assert_eq!(
            cpu_definitions(None)[0]["unavailable-features"],
            json!(["kvm"])
        );
    }

    #[test]
    fn a_cpu_object_shows_what_the_vcpu_got_and_what_it_lost() {
        let h = host(false);
        let cpu = CpuModel::parse("qemu64").unwrap();
        let entries = model::resolve(&h, &cpu).unwrap();
        let lost = model::filtered_features(&h, &cpu);
        assert_eq!(lost, ["pni"]);
        let props: Vec<(&str, &str)> = cpu_properties().collect();
        let get = |n: &str| {
            assert!(props.iter().any(|(p, _)| *p == n), "{n} not listed");
            cpu_property(&entries, &lost, n)
        };
        assert_eq!(get("lm"), json!(true));
        assert_eq!(get("i64"), json!(true), "QEMU's alias of lm");
        assert_eq!(get("pni"), json!(false));
        assert_eq!(get("sse3"), json!(false));
        assert_eq!(get("svm"), json!(false));
        assert_eq!(get("avx"), json!(false), "not in qemu64");
        assert_eq!(get("unavailable-features"), json!(["pni"]));
        assert_eq!(get("vendor"), json!("AuthenticAMD"));
        assert_eq!(get("model-id"), json!("QEMU Virtual CPU version 2.5+"));
        // Every feature the engine knows is a bool property, once.
        for f in model::feature_names() {
            assert_eq!(props.iter().filter(|(p, _)| *p == f).count(), 1, "{f}");
            assert_eq!(props.iter().find(|(p, _)| *p == f).unwrap().1, "bool");
        }
        assert!(props.contains(&("unavailable-features", "strList")));
    }

    fn one(k: &str, v: bool) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert(k.into(), Value::Bool(v));
        m
    }

    #[test]
    fn static_host_expansion_leaves_out_invtsc_unless_not_migratable() {
        let h = host(true);
        let none = Map::new();
        let e = expand(&h, "host", &none, false).unwrap();
        let p = &e["model"]["props"];
        assert_eq!(e["model"]["name"], "base");
        assert_eq!(p["avx"], json!(true));
        assert_eq!(p["pni"], json!(false));
        assert_eq!(p["invtsc"], json!(false));
        assert_eq!(p["hypervisor"], json!(true));
        assert_eq!(p["vendor"], json!("GenuineIntel"));
        assert_eq!(
            (p["family"].clone(), p["model"].clone()),
            (json!(6), json!(106))
        );
        let nm = one("migratable", false);
        assert_eq!(
            expand(&h, "host", &nm, false).unwrap()["model"]["props"]["invtsc"],
            json!(true)
        );
        // Full keeps the name; feature props apply; unknown ones are refused.
        let off = one("avx", false);
        let f = expand(&h, "host", &off, true).unwrap();
        assert_eq!(f["model"]["name"], "host");
        assert_eq!(f["model"]["props"]["avx"], json!(false));
        let bad = one("frob", true);
        assert!(expand(&h, "host", &bad, false)
            .unwrap_err()
            .to_string()
            .contains("host-x86_64-cpu.frob"));
        assert!(expand(&h, "Skylake-Client", &none, false).is_err());
        // libvirt's STATIC_FULL: the static answer, fully expanded, is itself.
        let p = e["model"]["props"].as_object().unwrap();
        let again = expand(&h, "base", p, true).unwrap();
        assert_eq!(&again["model"]["props"], &e["model"]["props"]);
        // A named model shows what it really gets here: no svm, no pni.
        let q = expand(&h, "qemu64", &none, false).unwrap();
        assert_eq!(q["model"]["props"]["svm"], json!(false));
        assert_eq!(q["model"]["props"]["lm"], json!(true));
        assert_eq!(q["model"]["props"]["vendor"], json!("AuthenticAMD"));
    }
}
