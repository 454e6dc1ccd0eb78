//! The CPU a guest sees: a CPU model (QEMU's `-cpu host`, `max`, `qemu64`, `kvm64`
//! with `+feature`/`feature=off` changes) resolved against what KVM supports on this
//! host, and the exact CPUID a migrated guest brings along, checked against this
//! host before anything else is built (a guest must never lose a CPU feature it may
//! be using: it would crash on the next instruction that needs it).

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

use crate::VmmError;

/// One CPUID leaf of a guest CPU, as the migration stream carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidLeaf {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidLeaf {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        Self {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&CpuidLeaf> for kvm_cpuid_entry2 {
    fn from(l: &CpuidLeaf) -> Self {
        Self {
            function: l.function,
            index: l.index,
            flags: l.flags,
            eax: l.eax,
            ebx: l.ebx,
            ecx: l.ecx,
            edx: l.edx,
            ..Default::default()
        }
    }
}

/// Why a `-cpu` model and its properties are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuModelError {
    /// The model is not one ferry knows.
    #[error("CPU model '{model}' is not supported; use one of {}", MODELS.join(", "))]
    UnknownModel {
        /// The model asked for.
        model: String,
    },
    /// A TSC frequency was asked for.
    #[error(
        "CPU property '{key}={value}' is not supported: ferry cannot fix the guest's TSC \
         frequency (KVM_SET_TSC_KHZ) when it creates the vCPUs; leave it out (a \
         guest with invtsc then cannot migrate, as in QEMU)"
    )]
    TscFrequency {
        /// The property's name as given.
        key: String,
        /// Its value.
        value: String,
    },
    /// A property's value is not on or off.
    #[error("CPU property '{key}={value}': expected on or off")]
    NotOnOff {
        /// The property.
        key: String,
        /// Its value.
        value: String,
    },
    /// A feature name ferry does not know.
    #[error("CPU feature '{name}' is unknown to ferry")]
    UnknownFeature {
        /// The feature's name.
        name: String,
    },
}

/// What CPU a guest gets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CpuModel {
    /// Everything KVM supports on this host (`-cpu host`, `-cpu max`).
    #[default]
    Host,
    /// A named model with features switched on (`true`) or off by name; with
    /// `enforce`, a model feature this host lacks is an error instead of a warning
    /// (QEMU's `enforce`).
    Named {
        name: String,
        features: Vec<(String, bool)>,
        enforce: bool,
    },
    /// Exactly these leaves: the CPU an incoming guest had at its source.
    Exact(Vec<CpuidLeaf>),
}

impl CpuModel {
    /// From QEMU's `-cpu` pieces: the model name and `(feature, value)` pairs
    /// (`+f` is `(f, on)`, `-f` is `(f, off)`); `enforce`, `check` and
    /// `migratable` are options. As in QEMU, `host` and `max` leave out the
    /// features that cannot migrate (invtsc) unless `migratable=off` or the
    /// feature is asked for by name.
    pub fn from_qemu(model: &str, features: &[(String, String)]) -> Result<Self, CpuModelError> {
        if !MODELS.contains(&model) {
            return Err(CpuModelError::UnknownModel {
                model: model.to_string(),
            });
        }
        let mut changes = Vec::new();
        let mut enforce = false;
        let mut migratable = true;
        for (k, v) in features {
            if matches!(k.as_str(), "tsc-frequency" | "tsc_frequency") {
                return Err(CpuModelError::TscFrequency {
                    key: k.clone(),
                    value: v.clone(),
                });
            }
            let on = match v.as_str() {
                "on" | "true" | "yes" => true,
                "off" | "false" | "no" => false,
                _ => {
                    return Err(CpuModelError::NotOnOff {
                        key: k.clone(),
                        value: v.clone(),
                    })
                }
            };
            match k.as_str() {
                "enforce" => enforce = on,
                "check" => {}
                "migratable" => migratable = on,
                _ => {
                    if feature_by_name(k).is_none() {
                        return Err(CpuModelError::UnknownFeature { name: k.clone() });
                    }
                    changes.push((k.clone(), on));
                }
            }
        }
        if matches!(model, "host" | "max") {
            for &f in UNMIGRATABLE {
                let named = changes
                    .iter()
                    .any(|(k, _)| feature_by_name(k).is_some_and(|n| n.4 == f));
                if migratable && !named {
                    changes.insert(0, (f.to_string(), false));
                }
            }
            if changes.is_empty() {
                return Ok(Self::Host);
            }
        }
        Ok(Self::Named {
            name: model.to_string(),
            features: changes,
            enforce,
        })
    }

    /// Parses `MODEL[,+feature][,-feature][,feature=on|off][,enforce]`.
    pub fn parse(s: &str) -> Result<Self, CpuModelError> {
        let mut parts = s.split(',');
        let model = parts.next().unwrap_or_default();
        let features: Vec<(String, String)> =
            parts.filter(|p| !p.is_empty()).map(parse_feature).collect();
        Self::from_qemu(model, &features)
    }
}

/// One `-cpu` property: `+f` is `(f, on)`, `-f` is `(f, off)`, `f` is `(f, on)`,
/// `k=v` is `(k, v)`.
pub fn parse_feature(p: &str) -> (String, String) {
    if let Some((k, v)) = p.split_once('=') {
        (k.to_string(), v.to_string())
    } else if let Some(k) = p.strip_prefix('+') {
        (k.to_string(), "on".into())
    } else if let Some(k) = p.strip_prefix('-') {
        (k.to_string(), "off".into())
    } else {
        (p.to_string(), "on".into())
    }
}

/// Register of a CPUID leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// A feature bit: (leaf, subleaf, register, bit, QEMU's name).
type Feature = (u32, u32, Reg, u32, &'static str);

use Reg::{Eax, Ebx, Ecx, Edx};

/// The feature bits ferry knows by name (QEMU's names). Every bit of these
/// registers is checked on migration; known ones are named in errors.
const FEATURES: &[Feature] = &[
    (1, 0, Edx, 0, "fpu"),
    (1, 0, Edx, 1, "vme"),
    (1, 0, Edx, 2, "de"),
    (1, 0, Edx, 3, "pse"),
    (1, 0, Edx, 4, "tsc"),
    (1, 0, Edx, 5, "msr"),
    (1, 0, Edx, 6, "pae"),
    (1, 0, Edx, 7, "mce"),
    (1, 0, Edx, 8, "cx8"),
    (1, 0, Edx, 9, "apic"),
    (1, 0, Edx, 11, "sep"),
    (1, 0, Edx, 12, "mtrr"),
    (1, 0, Edx, 13, "pge"),
    (1, 0, Edx, 14, "mca"),
    (1, 0, Edx, 15, "cmov"),
    (1, 0, Edx, 16, "pat"),
    (1, 0, Edx, 17, "pse36"),
    (1, 0, Edx, 19, "clflush"),
    (1, 0, Edx, 21, "ds"),
    (1, 0, Edx, 22, "acpi"),
    (1, 0, Edx, 23, "mmx"),
    (1, 0, Edx, 24, "fxsr"),
    (1, 0, Edx, 25, "sse"),
    (1, 0, Edx, 26, "sse2"),
    (1, 0, Edx, 27, "ss"),
    (1, 0, Edx, 28, "ht"),
    (1, 0, Ecx, 0, "pni"),
    (1, 0, Ecx, 1, "pclmulqdq"),
    (1, 0, Ecx, 3, "monitor"),
    (1, 0, Ecx, 5, "vmx"),
    (1, 0, Ecx, 9, "ssse3"),
    (1, 0, Ecx, 12, "fma"),
    (1, 0, Ecx, 13, "cx16"),
    (1, 0, Ecx, 15, "pdcm"),
    (1, 0, Ecx, 17, "pcid"),
    (1, 0, Ecx, 19, "sse4.1"),
    (1, 0, Ecx, 20, "sse4.2"),
    (1, 0, Ecx, 21, "x2apic"),
    (1, 0, Ecx, 22, "movbe"),
    (1, 0, Ecx, 23, "popcnt"),
    (1, 0, Ecx, 24, "tsc-deadline"),
    (1, 0, Ecx, 25, "aes"),
    (1, 0, Ecx, 26, "xsave"),
    (1, 0, Ecx, 28, "avx"),
    (1, 0, Ecx, 29, "f16c"),
    (1, 0, Ecx, 30, "rdrand"),
    (1, 0, Ecx, 31, "hypervisor"),
    (7, 0, Ebx, 0, "fsgsbase"),
    (7, 0, Ebx, 3, "bmi1"),
    (7, 0, Ebx, 4, "hle"),
    (7, 0, Ebx, 5, "avx2"),
    (7, 0, Ebx, 7, "smep"),
    (7, 0, Ebx, 8, "bmi2"),
    (7, 0, Ebx, 9, "erms"),
    (7, 0, Ebx, 10, "invpcid"),
    (7, 0, Ebx, 11, "rtm"),
    (7, 0, Ebx, 16, "avx512f"),
    (7, 0, Ebx, 17, "avx512dq"),
    (7, 0, Ebx, 18, "rdseed"),
    (7, 0, Ebx, 19, "adx"),
    (7, 0, Ebx, 20, "smap"),
    (7, 0, Ebx, 21, "avx512ifma"),
    (7, 0, Ebx, 23, "clflushopt"),
    (7, 0, Ebx, 24, "clwb"),
    (7, 0, Ebx, 28, "avx512cd"),
    (7, 0, Ebx, 29, "sha-ni"),
    (7, 0, Ebx, 30, "avx512bw"),
    (7, 0, Ebx, 31, "avx512vl"),
    (7, 0, Ecx, 1, "avx512vbmi"),
    (7, 0, Ecx, 2, "umip"),
    (7, 0, Ecx, 3, "pku"),
    (7, 0, Ecx, 6, "avx512vbmi2"),
    (7, 0, Ecx, 8, "gfni"),
    (7, 0, Ecx, 9, "vaes"),
    (7, 0, Ecx, 10, "vpclmulqdq"),
    (7, 0, Ecx, 11, "avx512vnni"),
    (7, 0, Ecx, 12, "avx512bitalg"),
    (7, 0, Ecx, 14, "avx512-vpopcntdq"),
    (7, 0, Ecx, 22, "rdpid"),
    (7, 0, Ecx, 27, "movdiri"),
    (7, 0, Ecx, 28, "movdir64b"),
    (7, 0, Edx, 4, "fsrm"),
    (7, 0, Edx, 8, "avx512-vp2intersect"),
    (7, 0, Edx, 10, "md-clear"),
    (7, 0, Edx, 14, "serialize"),
    (7, 0, Edx, 16, "tsx-ldtrk"),
    (7, 0, Edx, 22, "amx-bf16"),
    (7, 0, Edx, 23, "avx512-fp16"),
    (7, 0, Edx, 24, "amx-tile"),
    (7, 0, Edx, 25, "amx-int8"),
    (7, 0, Edx, 26, "spec-ctrl"),
    (7, 0, Edx, 27, "stibp"),
    (7, 0, Edx, 29, "arch-capabilities"),
    (7, 0, Edx, 31, "ssbd"),
    (7, 1, Eax, 4, "avx-vnni"),
    (7, 1, Eax, 5, "avx512-bf16"),
    (0xd, 1, Eax, 0, "xsaveopt"),
    (0xd, 1, Eax, 1, "xsavec"),
    (0xd, 1, Eax, 2, "xgetbv1"),
    (0xd, 1, Eax, 3, "xsaves"),
    (0x8000_0001, 0, Ecx, 0, "lahf-lm"),
    (0x8000_0001, 0, Ecx, 2, "svm"),
    (0x8000_0001, 0, Ecx, 5, "abm"),
    (0x8000_0001, 0, Ecx, 6, "sse4a"),
    (0x8000_0001, 0, Ecx, 7, "misalignsse"),
    (0x8000_0001, 0, Ecx, 8, "3dnowprefetch"),
    (0x8000_0001, 0, Ecx, 11, "xop"),
    (0x8000_0001, 0, Ecx, 16, "fma4"),
    (0x8000_0001, 0, Ecx, 21, "tbm"),
    (0x8000_0001, 0, Edx, 11, "syscall"),
    (0x8000_0001, 0, Edx, 20, "nx"),
    (0x8000_0001, 0, Edx, 26, "pdpe1gb"),
    (0x8000_0001, 0, Edx, 27, "rdtscp"),
    (0x8000_0001, 0, Edx, 29, "lm"),
    (0x8000_0007, 0, Edx, 8, "invtsc"),
    (0x8000_0008, 0, Ebx, 0, "clzero"),
    (0x8000_0008, 0, Ebx, 9, "wbnoinvd"),
    (0x8000_0008, 0, Ebx, 12, "ibpb"),
    (0x8000_0008, 0, Ebx, 24, "amd-ssbd"),
    (0x8000_0008, 0, Ebx, 25, "virt-ssbd"),
];

/// Registers whose every set bit a guest may rely on (feature flags).
const FEATURE_REGS: &[(u32, u32, Reg)] = &[
    (1, 0, Ecx),
    (1, 0, Edx),
    (7, 0, Ebx),
    (7, 0, Ecx),
    (7, 0, Edx),
    (7, 1, Eax),
    (0xd, 1, Eax),
    (0x8000_0001, 0, Ecx),
    (0x8000_0001, 0, Edx),
    (0x8000_0007, 0, Edx),
    (0x8000_0008, 0, Ebx),
    (CPUID_KVM_FEATURES, 0, Eax),
];

/// KVM's paravirtual feature leaf (EAX: KVM_FEATURE_* bits).
const CPUID_KVM_FEATURES: u32 = 0x4000_0001;

/// KVM's paravirtual features by bit, as QEMU names them (`kvmclock` is both
/// the old and the new clock MSRs; ferry calls the new one `kvmclock2`).
const KVM_FEATURES: &[(u32, &str)] = &[
    (0, "kvmclock"),
    (1, "kvm-nopiodelay"),
    (2, "kvm-mmu"),
    (3, "kvmclock2"),
    (4, "kvm-asyncpf"),
    (5, "kvm-steal-time"),
    (6, "kvm-pv-eoi"),
    (7, "kvm-pv-unhalt"),
    (9, "kvm-pv-tlb-flush"),
    (10, "kvm-asyncpf-vmexit"),
    (11, "kvm-pv-ipi"),
    (12, "kvm-poll-control"),
    (13, "kvm-pv-sched-yield"),
    (14, "kvm-asyncpf-int"),
    (15, "kvm-msi-ext-dest-id"),
    (16, "kvm-hc-map-gpa-range"),
    (17, "kvm-migration-control"),
    (24, "kvmclock-stable-bit"),
];

/// The paravirtual features a named model gets under KVM (QEMU's
/// `kvm_default_props`: kvmclock, kvm-nopiodelay, kvm-asyncpf, kvm-steal-time,
/// kvm-pv-eoi, kvmclock-stable-bit), whatever else this host's kernel offers:
/// a newer kernel's additions would tie the guest to kernels that have them.
const KVM_DEFAULT_FEATURES: u32 = 1 | 1 << 1 | 1 << 3 | 1 << 4 | 1 << 5 | 1 << 6 | 1 << 24;

/// Whether bit `bit` of register `reg` (0 EAX, 1 EBX, 2 ECX, 3 EDX) of leaf
/// `function`, subleaf `index` is set in `entries`.
pub fn cpuid_bit(
    entries: &[kvm_cpuid_entry2],
    function: u32,
    index: u32,
    reg: u8,
    bit: u32,
) -> bool {
    let reg = match reg {
        0 => Eax,
        1 => Ebx,
        2 => Ecx,
        _ => Edx,
    };
    find(entries, function, index).is_some_and(|e| reg_of(e, reg) & (1 << bit) != 0)
}

/// Features a guest cannot take to another host (QEMU's unmigratable flags):
/// the invariant TSC promises a TSC rate the destination may not have.
pub const UNMIGRATABLE: &[&str] = &["invtsc"];

/// Bits that ferry sets itself or that follow guest state, never host support:
/// leaf 1 ECX hypervisor (31) and OSXSAVE (27).
fn ferry_owned(function: u32, index: u32, reg: Reg, bit: u32) -> bool {
    (function, index, reg) == (1, 0, Ecx) && (bit == 31 || bit == 27)
}

fn reg_of(e: &kvm_cpuid_entry2, reg: Reg) -> u32 {
    match reg {
        Eax => e.eax,
        Ebx => e.ebx,
        Ecx => e.ecx,
        Edx => e.edx,
    }
}

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Eax => &mut e.eax,
        Ebx => &mut e.ebx,
        Ecx => &mut e.ecx,
        Edx => &mut e.edx,
    }
}

/// Whether `e` is leaf `function`, subleaf `index` (a leaf without significant
/// subleaves, KVM_CPUID_FLAG_SIGNIFCANT_INDEX clear, answers for subleaf 0).
fn is_leaf(e: &kvm_cpuid_entry2, function: u32, index: u32) -> bool {
    e.function == function && (e.index == index || index == 0 && e.flags & 1 == 0)
}

fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries.iter().find(|e| is_leaf(e, function, index))
}

fn find_mut(
    entries: &mut [kvm_cpuid_entry2],
    function: u32,
    index: u32,
) -> Option<&mut kvm_cpuid_entry2> {
    entries.iter_mut().find(|e| is_leaf(e, function, index))
}

fn feature_name(function: u32, index: u32, reg: Reg, bit: u32) -> String {
    if (function, index, reg) == (CPUID_KVM_FEATURES, 0, Eax) {
        if let Some((_, name)) = KVM_FEATURES.iter().find(|(b, _)| *b == bit) {
            return (*name).to_string();
        }
    }
    FEATURES
        .iter()
        .find(|f| (f.0, f.1, f.2, f.3) == (function, index, reg, bit))
        .map_or_else(
            || format!("CPUID.{function:#x}.{index}:{reg:?}[bit {bit}]").to_lowercase(),
            |f| f.4.to_string(),
        )
}

/// QEMU's other names of the features above, `(alias, name)`: the CPU object
/// has a property by each (target/i386/cpu.c, x86_cpu_initfn), and `-cpu`
/// takes them.
const ALIASES: &[(&str, &str)] = &[
    ("sse3", "pni"),
    ("pclmuldq", "pclmulqdq"),
    ("sse4-1", "sse4.1"),
    ("sse4_1", "sse4.1"),
    ("sse4-2", "sse4.2"),
    ("sse4_2", "sse4.2"),
    ("lahf_lm", "lahf-lm"),
    ("i64", "lm"),
    ("xd", "nx"),
];

/// QEMU's aliases of the features ferry knows, as `(alias, name)`.
pub fn feature_aliases() -> impl Iterator<Item = (&'static str, &'static str)> {
    ALIASES.iter().copied()
}

fn feature_by_name(name: &str) -> Option<&'static Feature> {
    // `-cpu` also takes `_` for `-` (tsc_deadline).
    let norm = name.replace('_', "-");
    let alias = ALIASES
        .iter()
        .find(|(a, _)| *a == name || *a == norm)
        .map_or(norm.as_str(), |(_, n)| n);
    FEATURES.iter().find(|f| f.4 == alias)
}

/// The feature bits of `guest` that `host` lacks, by name.
pub fn missing_features(host: &[kvm_cpuid_entry2], guest: &[kvm_cpuid_entry2]) -> Vec<String> {
    let mut missing = Vec::new();
    for &(function, index, reg) in FEATURE_REGS {
        let Some(g) = find(guest, function, index) else {
            continue;
        };
        let have = find(host, function, index).map_or(0, |h| reg_of(h, reg));
        let want = reg_of(g, reg);
        for bit in 0..32 {
            if want & (1 << bit) != 0
                && have & (1 << bit) == 0
                && !ferry_owned(function, index, reg, bit)
            {
                missing.push(feature_name(function, index, reg, bit));
            }
        }
    }
    missing
}

/// QEMU's names of the features ferry knows, in table order.
pub fn feature_names() -> impl Iterator<Item = &'static str> {
    FEATURES.iter().map(|f| f.4)
}

/// Whether feature `name` (QEMU's name or one of its aliases) is set in `entries`.
pub fn has_feature(entries: &[kvm_cpuid_entry2], name: &str) -> bool {
    feature_by_name(name).is_some_and(|&(f, i, reg, bit, _)| {
        find(entries, f, i).is_some_and(|e| reg_of(e, reg) & (1 << bit) != 0)
    })
}

/// The features of model `name` that a host supporting `supported` cannot give
/// a guest (QEMU's `unavailable-features`); none for `host`, `max` and `base`.
pub fn unavailable_features(supported: &[kvm_cpuid_entry2], name: &str) -> Vec<&'static str> {
    let Some((_, wanted)) = named(name) else {
        return Vec::new();
    };
    wanted
        .into_iter()
        .filter_map(feature_by_name)
        .filter(|&&(f, i, reg, bit, _)| {
            !ferry_owned(f, i, reg, bit)
                && find(supported, f, i).is_none_or(|e| reg_of(e, reg) & (1 << bit) == 0)
        })
        .map(|f| f.4)
        .collect()
}

/// The features `model` asks for that a host supporting `supported` cannot
/// give, so the guest runs without them (QEMU's `filtered-features`, the CPU
/// object's `unavailable-features`): the named model's features and those
/// switched on by name, less those switched off. Empty for an exact CPU,
/// which [`resolve`] refuses rather than filter.
pub fn filtered_features(supported: &[kvm_cpuid_entry2], model: &CpuModel) -> Vec<&'static str> {
    let (name, changes) = match model {
        CpuModel::Host | CpuModel::Exact(_) => return Vec::new(),
        CpuModel::Named { name, features, .. } => (name.as_str(), features.as_slice()),
    };
    let mut wanted: Vec<&'static Feature> = named(name)
        .map(|(_, w)| w.into_iter().filter_map(feature_by_name).collect())
        .unwrap_or_default();
    for (k, on) in changes {
        let Some(f) = feature_by_name(k) else {
            continue;
        };
        wanted.retain(|w| w.4 != f.4);
        if *on {
            wanted.push(f);
        }
    }
    FEATURES
        .iter()
        .filter(|f| wanted.iter().any(|w| w.4 == f.4))
        .filter(|&&(f, i, reg, bit, _)| {
            !ferry_owned(f, i, reg, bit)
                && find(supported, f, i).is_none_or(|e| reg_of(e, reg) & (1 << bit) == 0)
        })
        .map(|f| f.4)
        .collect()
}

/// What identifies a CPU besides its features, as QEMU's CPU properties name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuIdentity {
    pub vendor: String,
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
    pub model_id: String,
    /// Highest basic leaf (QEMU's `level`).
    pub level: u32,
    /// Highest extended leaf (QEMU's `xlevel`).
    pub xlevel: u32,
}

/// The identity of the CPU `entries` describe.
pub fn identity(entries: &[kvm_cpuid_entry2]) -> CpuIdentity {
    let l0 = find(entries, 0, 0).copied().unwrap_or_default();
    let mut vendor = Vec::with_capacity(12);
    for r in [l0.ebx, l0.edx, l0.ecx] {
        vendor.extend_from_slice(&r.to_le_bytes());
    }
    let eax = find(entries, 1, 0).map_or(0, |e| e.eax);
    let base_family = (eax >> 8) & 0xf;
    let family = if base_family == 0xf {
        base_family + ((eax >> 20) & 0xff)
    } else {
        base_family
    };
    let mut model = (eax >> 4) & 0xf;
    if base_family == 6 || base_family == 0xf {
        model |= ((eax >> 16) & 0xf) << 4;
    }
    let mut id = Vec::with_capacity(48);
    for function in 0x8000_0002u32..=0x8000_0004 {
        if let Some(e) = find(entries, function, 0) {
            for r in [e.eax, e.ebx, e.ecx, e.edx] {
                id.extend_from_slice(&r.to_le_bytes());
            }
        }
    }
    let end = id.iter().position(|&b| b == 0).unwrap_or(id.len());
    CpuIdentity {
        vendor: String::from_utf8_lossy(&vendor)
            .trim_end_matches('\0')
            .to_string(),
        family,
        model,
        stepping: eax & 0xf,
        model_id: String::from_utf8_lossy(&id[..end]).trim().to_string(),
        level: l0.eax,
        xlevel: find(entries, 0x8000_0000, 0).map_or(0, |e| e.eax),
    }
}

/// A named model's definition (QEMU 7.2's, target/i386/cpu.c).
struct NamedModel {
    vendor: &'static [u8; 12],
    family: u32,
    model: u32,
    stepping: u32,
    model_id: &'static str,
    level: u32,
    xlevel: u32,
}

/// QEMU's PPRO_FEATURES, the base of both 64-bit models.
const PPRO: &[&str] = &[
    "fpu", "de", "pse", "tsc", "msr", "mce", "cx8", "pge", "cmov", "pat", "fxsr", "mmx", "sse",
    "sse2", "pae", "sep", "apic",
];

fn named(name: &str) -> Option<(NamedModel, Vec<&'static str>)> {
    let common = [
        "mtrr", "clflush", "mca", "pse36", "pni", "cx16", "lm", "syscall", "nx",
    ];
    // What QEMU changes under KVM (kvm_default_props): x2apic and the hypervisor
    // bit on, svm off (qemu64 defines it, but nested state does not migrate).
    let kvm = ["x2apic", "hypervisor"];
    let mut features: Vec<&'static str> = PPRO.iter().chain(&common).chain(&kvm).copied().collect();
    let model = match name {
        "qemu64" => {
            features.push("lahf-lm");
            NamedModel {
                vendor: b"AuthenticAMD",
                family: 15,
                model: 107,
                stepping: 1,
                model_id: "QEMU Virtual CPU version 2.5+",
                level: 0xd,
                xlevel: 0x8000_000a,
            }
        }
        "kvm64" => {
            features.push("vme");
            NamedModel {
                vendor: b"GenuineIntel",
                family: 15,
                model: 6,
                stepping: 1,
                model_id: "Common KVM processor",
                level: 0xd,
                xlevel: 0x8000_0008,
            }
        }
        _ => return None,
    };
    Some((model, features))
}

/// The CPU models ferry offers, as `-cpu` names them.
pub const MODELS: &[&str] = &["host", "max", "qemu64", "kvm64"];

/// The base CPUID table (no per-vCPU fields) for `model` on a host that
/// supports `supported`.
pub fn resolve(
    supported: &[kvm_cpuid_entry2],
    model: &CpuModel,
) -> Result<Vec<kvm_cpuid_entry2>, VmmError> {
    match model {
        CpuModel::Host => Ok(supported.to_vec()),
        CpuModel::Exact(leaves) => {
            let guest: Vec<kvm_cpuid_entry2> = leaves.iter().map(Into::into).collect();
            let missing = missing_features(supported, &guest);
            if !missing.is_empty() {
                return Err(crate::vm::ShapeMismatch::CpuFeatures { missing }.into());
            }
            Ok(guest)
        }
        CpuModel::Named {
            name,
            features,
            enforce,
        } => resolve_named(supported, name, features, *enforce),
    }
}

fn resolve_named(
    supported: &[kvm_cpuid_entry2],
    name: &str,
    changes: &[(String, bool)],
    enforce: bool,
) -> Result<Vec<kvm_cpuid_entry2>, VmmError> {
    if name == "host" || name == "max" {
        let mut entries = supported.to_vec();
        apply_changes(&mut entries, supported, changes, enforce)?;
        return Ok(entries);
    }
    let (m, wanted) = named(name).ok_or_else(|| {
        VmmError::Config(format!(
            "CPU model '{name}' is not supported; use one of {}",
            MODELS.join(", ")
        ))
    })?;
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| {
            (e.function <= m.level)
                || (0x4000_0000..0x8000_0000).contains(&e.function)
                || (0x8000_0000..=m.xlevel).contains(&e.function)
        })
        .copied()
        .collect();
    // Clear every feature register, then set the model's features the host has.
    for e in entries.iter_mut() {
        for &(f, i, reg) in FEATURE_REGS {
            if is_leaf(e, f, i) {
                *reg_mut(e, reg) = 0;
            }
        }
    }
    let mut lacking = Vec::new();
    for feat in &wanted {
        let Some(&(f, i, reg, bit, fname)) = feature_by_name(feat) else {
            continue;
        };
        let has = find(supported, f, i).is_some_and(|h| reg_of(h, reg) & (1 << bit) != 0);
        if has || ferry_owned(f, i, reg, bit) {
            if let Some(e) = find_mut(&mut entries, f, i) {
                *reg_mut(e, reg) |= 1 << bit;
            }
        } else {
            lacking.push(fname);
        }
    }
    if !lacking.is_empty() {
        let msg = format!(
            "host doesn't support requested features of CPU model '{name}': {}",
            lacking.join(", ")
        );
        if enforce {
            return Err(VmmError::Config(msg));
        }
        // QEMU's default (check, not enforce): the feature is left out, with a warning.
        tracing::warn!("{msg}");
    }
    if let Some(e) = find_mut(&mut entries, 0, 0) {
        e.eax = e.eax.min(m.level);
        e.ebx = u32::from_le_bytes([m.vendor[0], m.vendor[1], m.vendor[2], m.vendor[3]]);
        e.edx = u32::from_le_bytes([m.vendor[4], m.vendor[5], m.vendor[6], m.vendor[7]]);
        e.ecx = u32::from_le_bytes([m.vendor[8], m.vendor[9], m.vendor[10], m.vendor[11]]);
    }
    if let Some(e) = find_mut(&mut entries, 1, 0) {
        // Family 15: extended family 0; model above 15 goes to the extended model.
        e.eax = (m.stepping & 0xf)
            | ((m.model & 0xf) << 4)
            | ((m.family.min(15) & 0xf) << 8)
            | (((m.model >> 4) & 0xf) << 16)
            | ((m.family.saturating_sub(15) & 0xff) << 20);
    }
    if let Some(e) = find_mut(&mut entries, 0x8000_0000, 0) {
        e.eax = e.eax.min(m.xlevel);
    }
    let mut id = [0u8; 48];
    let bytes = m.model_id.as_bytes();
    id[..bytes.len().min(47)].copy_from_slice(&bytes[..bytes.len().min(47)]);
    for (k, function) in (0x8000_0002u32..=0x8000_0004).enumerate() {
        let word = |w: usize| {
            let o = k * 16 + w * 4;
            u32::from_le_bytes([id[o], id[o + 1], id[o + 2], id[o + 3]])
        };
        let leaf = kvm_cpuid_entry2 {
            function,
            eax: word(0),
            ebx: word(1),
            ecx: word(2),
            edx: word(3),
            ..Default::default()
        };
        match find_mut(&mut entries, function, 0) {
            Some(e) => *e = leaf,
            None => entries.push(leaf),
        }
    }
    apply_changes(&mut entries, supported, changes, enforce)?;
    let pv = find(supported, CPUID_KVM_FEATURES, 0).map_or(0, |e| e.eax);
    if let Some(e) = find_mut(&mut entries, CPUID_KVM_FEATURES, 0) {
        e.eax |= pv & KVM_DEFAULT_FEATURES;
    }
    Ok(portable_leaves(entries))
}

/// XSAVE state components (bit of XCR0) and the feature that brings each.
const XSAVE_COMPONENTS: &[(u32, &str)] = &[
    (2, "avx"),
    (3, "mpx"),
    (4, "mpx"),
    (5, "avx512f"),
    (6, "avx512f"),
    (7, "avx512f"),
    (9, "pku"),
    (17, "amx-tile"),
    (18, "amx-tile"),
];

/// A named model's leaves with nothing of this host's left that the model does
/// not define and a guest could depend on: no PMU (leaf 0xa, as QEMU's
/// `pmu=off`), leaf 7 without subleaves past 1, the XSAVE leaf describing only
/// the state components of the model's features (none without xsave), and no
/// SVM leaf without svm. What remains of the host's (cache and topology
/// descriptions, address sizes) travels with the guest and binds nothing.
fn portable_leaves(mut entries: Vec<kvm_cpuid_entry2>) -> Vec<kvm_cpuid_entry2> {
    let has = |entries: &[kvm_cpuid_entry2], name: &str| has_feature(entries, name);
    let xsave = has(&entries, "xsave");
    let svm = has(&entries, "svm");
    let mut components: u64 = if xsave { 0b11 } else { 0 };
    for &(bit, feature) in XSAVE_COMPONENTS {
        if xsave && has(&entries, feature) {
            components |= 1 << bit;
        }
    }
    let has_7_1 = find(&entries, 7, 1).is_some_and(|e| e.eax != 0);
    entries.retain(|e| match e.function {
        7 => e.index <= 1,
        0xd => e.index <= 1 || components & (1u64 << e.index.min(63)) != 0,
        _ => true,
    });
    let mut max_size = 576;
    for e in entries.iter().filter(|e| e.function == 0xd && e.index >= 2) {
        max_size = max_size.max(e.ebx + e.eax);
    }
    for e in entries.iter_mut() {
        match (e.function, e.index) {
            (7, 0) => e.eax = u32::from(has_7_1),
            (0xa, _) => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            (0xd, 0) => {
                e.eax = components as u32;
                e.edx = (components >> 32) as u32;
                e.ebx = 576.min(max_size);
                e.ecx = max_size;
                if !xsave {
                    (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
                }
            }
            (0xd, 1) => (e.ebx, e.ecx, e.edx) = (0, 0, 0),
            (0x8000_000a, _) if !svm => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            _ => {}
        }
    }
    entries
}

/// `+feature` / `feature=on|off` on top of a model.
fn apply_changes(
    entries: &mut [kvm_cpuid_entry2],
    supported: &[kvm_cpuid_entry2],
    changes: &[(String, bool)],
    enforce: bool,
) -> Result<(), VmmError> {
    for (name, on) in changes {
        let &(f, i, reg, bit, fname) = feature_by_name(name).ok_or_else(|| {
            VmmError::Config(format!(
                "CPU feature '{name}' is unknown to ferry; known: {}",
                FEATURES.iter().map(|f| f.4).collect::<Vec<_>>().join(" ")
            ))
        })?;
        let Some(e) = find_mut(entries, f, i) else {
            if *on {
                return Err(VmmError::Config(format!(
                    "CPU feature '{fname}' needs CPUID leaf {f:#x}, which this CPU model does not have"
                )));
            }
            continue;
        };
        if *on {
            let has = find(supported, f, i).is_some_and(|h| reg_of(h, reg) & (1 << bit) != 0)
                || ferry_owned(f, i, reg, bit);
            if !has {
                let msg = format!("host doesn't support requested feature: {fname}");
                if enforce {
                    return Err(VmmError::Config(msg));
                }
                tracing::warn!("{msg}");
                continue;
            }
            *reg_mut(e, reg) |= 1 << bit;
        } else {
            *reg_mut(e, reg) &= !(1 << bit);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            kvm_cpuid_entry2 {
                eax: 0x16,
                ..leaf(0, 0, 0, 0, 0)
            },
            leaf(1, 0, 0, !(1 << 31), 0xffff_ffff),
            kvm_cpuid_entry2 {
                flags: 1,
                ..leaf(7, 0, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff)
            },
            kvm_cpuid_entry2 {
                eax: 0x8000_0008,
                ..leaf(0x8000_0000, 0, 0, 0, 0)
            },
            leaf(0x8000_0001, 0, 0, !(1 << 2), 0xffff_ffff),
            leaf(0x14, 0, 1, 1, 1),
        ]
    }

    #[test]
    fn qemu64_masks_the_host_and_names_itself() {
        let h = host();
        let t = resolve(
            &h,
            &CpuModel::Named {
                name: "qemu64".into(),
                features: vec![],
                enforce: false,
            },
        )
        .unwrap();
        let l1 = find(&t, 1, 0).unwrap();
        assert_eq!(l1.ecx & (1 << 28), 0, "no avx in qemu64");
        assert_ne!(l1.ecx & 1, 0, "pni");
        assert_ne!(l1.ecx & (1 << 13), 0, "cx16");
        assert_eq!(find(&t, 7, 0).unwrap().ebx, 0);
        assert!(
            find(&t, 0x14, 0).is_none(),
            "leaves above level 0xd are gone"
        );
        let v = find(&t, 0, 0).unwrap();
        assert_eq!(&v.ebx.to_le_bytes(), b"Auth");
        // qemu64 under KVM has no svm (QEMU's kvm_default_props), so enforce passes;
        // asked for by name, svm (not on this host) is left out with a warning,
        // and an error when enforced.
        assert_eq!(find(&t, 0x8000_0001, 0).unwrap().ecx & (1 << 2), 0);
        let enforced = |features: Vec<(String, bool)>| {
            resolve(
                &h,
                &CpuModel::Named {
                    name: "qemu64".into(),
                    features,
                    enforce: true,
                },
            )
        };
        assert!(enforced(vec![]).is_ok());
        let e = enforced(vec![("svm".into(), true)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("svm"), "{e}");
        // Feature changes by QEMU name.
        let t = resolve(
            &h,
            &CpuModel::Named {
                name: "kvm64".into(),
                features: vec![
                    ("avx".into(), true),
                    ("lahf_lm".into(), true),
                    ("nx".into(), false),
                ],
                enforce: true,
            },
        )
        .unwrap();
        assert_ne!(find(&t, 1, 0).unwrap().ecx & (1 << 28), 0);
        assert_ne!(find(&t, 0x8000_0001, 0).unwrap().ecx & 1, 0);
        assert_eq!(find(&t, 0x8000_0001, 0).unwrap().edx & (1 << 20), 0);
        let e = resolve(
            &h,
            &CpuModel::Named {
                name: "pentium".into(),
                features: vec![],
                enforce: false,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("qemu64"), "{e}");
    }

    #[test]
    fn host_leaves_out_invtsc_unless_asked_as_qemu_does() {
        let mut h = host();
        h.push(leaf(0x8000_0007, 0, 0, 0, 1 << 8));
        let get = |m: &str| resolve(&h, &CpuModel::parse(m).unwrap()).unwrap();
        assert!(!has_feature(&get("host"), "invtsc"));
        assert!(!has_feature(&get("max,migratable=on"), "invtsc"));
        assert!(has_feature(&get("host,migratable=off"), "invtsc"));
        assert!(has_feature(&get("host,+invtsc"), "invtsc"));
        assert!(
            !has_feature(&get("kvm64"), "invtsc"),
            "named models clear it"
        );
        let e = CpuModel::parse("host,+invtsc,tsc-frequency=2000000000").unwrap_err();
        assert!(e.to_string().contains("KVM_SET_TSC_KHZ"), "{e}");
        assert!(unavailable_features(&h, "qemu64").is_empty());
        // What a CPU object lost: the model's, plus those named, less those off.
        let lost = |m: &str| filtered_features(&h, &CpuModel::parse(m).unwrap());
        assert!(lost("qemu64").is_empty());
        assert_eq!(lost("qemu64,+svm"), ["svm"]);
        assert!(lost("qemu64,svm=off").is_empty());
        assert!(lost("qemu64,-svm").is_empty());
        assert_eq!(lost("kvm64,+svm,lahf_lm=on"), ["svm"]);
        assert!(lost("host").is_empty());
        assert!(lost("host,+invtsc").is_empty());
        assert_eq!(lost("host,+svm"), ["svm"]);
        assert!(has_feature(&get("qemu64"), "sse3") && has_feature(&get("qemu64"), "i64"));
        assert!(unavailable_features(&h, "host").is_empty());
        let id = identity(&get("qemu64"));
        assert_eq!(
            (id.vendor.as_str(), id.family, id.model),
            ("AuthenticAMD", 15, 107)
        );
        assert_eq!(id.model_id, "QEMU Virtual CPU version 2.5+");
    }

    /// A named model keeps nothing of the host that the guest could come to
    /// depend on and another host's KVM may lack or refuse.
    #[test]
    fn named_models_leave_the_host_behind() {
        let mut h = host();
        let regs = |function, index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            flags: 1,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        h[2].eax = 2; // leaf 7 with subleaves 1 and 2
        h.extend([
            regs(7, 1, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff),
            regs(7, 2, 0, 0, 0, 0xffff_ffff),
            regs(0xa, 0, 0x0804_3004, 0, 0, 0x603),
            regs(0xd, 0, 0x6_02e7, 0x340, 0x2b00, 0),
            regs(0xd, 1, 0xf, 0, 0x1800, 0),
            regs(0xd, 2, 0x100, 0x240, 0, 0),
            regs(0xd, 17, 0x40, 0xac0, 2, 0),
            regs(0x4000_0001, 0, 0x0102_7eff, 0, 0, 0),
        ]);
        let t = resolve(&h, &CpuModel::parse("qemu64").unwrap()).unwrap();
        assert_eq!(find(&t, 7, 0).map(|e| e.eax), Some(0), "no subleaf of 7");
        assert!(find(&t, 7, 2).is_none());
        assert_eq!(find(&t, 7, 1).map(|e| e.eax), Some(0));
        let a = find(&t, 0xa, 0).unwrap();
        assert_eq!((a.eax, a.edx), (0, 0), "no PMU");
        assert!(t
            .iter()
            .filter(|e| e.function == 0xd)
            .all(|e| e.eax == 0 && e.ecx == 0));
        assert!(find(&t, 0xd, 17).is_none(), "no AMX state without amx-tile");
        assert_eq!(
            find(&t, 0x4000_0001, 0).map(|e| e.eax),
            Some(KVM_DEFAULT_FEATURES),
            "QEMU's default paravirtual features only"
        );
        // With xsave and avx, the XSAVE leaf lists x87, SSE and AVX state.
        let t = resolve(&h, &CpuModel::parse("qemu64,+xsave,+avx").unwrap()).unwrap();
        let d = find(&t, 0xd, 0).unwrap();
        assert_eq!((d.eax, d.edx, d.ecx), (0b111, 0, 0x340));
        assert!(find(&t, 0xd, 2).is_some() && find(&t, 0xd, 17).is_none());
        // A host CPU is the host's.
        let t = resolve(&h, &CpuModel::Host).unwrap();
        assert_eq!(find(&t, 0x4000_0001, 0).map(|e| e.eax), Some(0x0102_7eff));
    }

    #[test]
    fn an_incoming_cpu_must_fit_this_host() {
        let h = host();
        let mut guest: Vec<CpuidLeaf> = h.iter().map(Into::into).collect();
        assert!(resolve(&h, &CpuModel::Exact(guest.clone())).is_ok());
        // The source had svm and avx512f... this host has no svm.
        guest[4].ecx |= 1 << 2;
        guest[1].ecx |= 1 << 31; // the hypervisor bit is ferry's own
        let e = resolve(&h, &CpuModel::Exact(guest))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lacks features the guest's CPU has: svm;"),
            "{e}"
        );
    }
}
