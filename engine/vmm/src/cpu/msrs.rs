//! The MSRs that travel with a guest: derived from the guest's CPU (its CPUID),
//! not from the host's KVM, so that a checkpoint or stream made on one kernel
//! loads on another (QEMU's `kvm_put_msrs` works the same way: a fixed list,
//! each MSR gated on the guest feature that brings it).
//!
//! On restore, an MSR the destination's KVM refuses is only an error where the
//! guest could see the difference: its value differs from what the destination
//! gives a fresh vCPU, and the guest's CPUID announces the feature it belongs to.

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use super::model::cpuid_bit;

/// What a guest must have for an MSR to exist for it.
#[derive(Debug, Clone, Copy)]
enum Needs {
    /// Every x86-64 vCPU under KVM.
    Always,
    /// Any of these CPUID bits: (leaf, subleaf, register 0-3 for EAX-EDX, bit).
    Any(&'static [(u32, u32, u8, u32)]),
}

/// One MSR ferry migrates.
#[derive(Debug)]
struct MsrDef {
    index: u32,
    name: &'static str,
    needs: Needs,
}

const fn def(index: u32, name: &'static str, needs: Needs) -> MsrDef {
    MsrDef { index, name, needs }
}

const EAX: u8 = 0;
const EBX: u8 = 1;
const ECX: u8 = 2;
const EDX: u8 = 3;
const KVM: u32 = 0x4000_0001;

const TSC: Needs = Needs::Any(&[(1, 0, EDX, 4)]);
const MCE: Needs = Needs::Any(&[(1, 0, EDX, 7)]);
const SEP: Needs = Needs::Any(&[(1, 0, EDX, 11)]);
const MTRR: Needs = Needs::Any(&[(1, 0, EDX, 12)]);
const PAT: Needs = Needs::Any(&[(1, 0, EDX, 16)]);
const VMX: Needs = Needs::Any(&[(1, 0, ECX, 5)]);
const TSC_DEADLINE: Needs = Needs::Any(&[(1, 0, ECX, 24)]);
const TSC_ADJUST: Needs = Needs::Any(&[(7, 0, EBX, 1)]);
const MPX: Needs = Needs::Any(&[(7, 0, EBX, 14)]);
const WAITPKG: Needs = Needs::Any(&[(7, 0, ECX, 5)]);
const PKS: Needs = Needs::Any(&[(7, 0, ECX, 31)]);
const CET: Needs = Needs::Any(&[(7, 0, ECX, 7), (7, 0, EDX, 20)]);
const ARCH_CAPABILITIES: Needs = Needs::Any(&[(7, 0, EDX, 29)]);
const SPEC_CTRL: Needs = Needs::Any(&[
    (7, 0, EDX, 26),
    (0x8000_0008, 0, EBX, 14),
    (0x8000_0008, 0, EBX, 15),
    (0x8000_0008, 0, EBX, 24),
]);
const XSAVES: Needs = Needs::Any(&[(0xd, 1, EAX, 3)]);
const XFD: Needs = Needs::Any(&[(0xd, 1, EAX, 4)]);
const SYSCALL: Needs = Needs::Any(&[(0x8000_0001, 0, EDX, 11), (0x8000_0001, 0, EDX, 29)]);
const LM: Needs = Needs::Any(&[(0x8000_0001, 0, EDX, 29)]);
const SVM: Needs = Needs::Any(&[(0x8000_0001, 0, ECX, 2)]);
const TSC_AUX: Needs = Needs::Any(&[(0x8000_0001, 0, EDX, 27), (7, 0, ECX, 22)]);
const VIRT_SSBD: Needs = Needs::Any(&[(0x8000_0008, 0, EBX, 25)]);
const KVMCLOCK: Needs = Needs::Any(&[(KVM, 0, EAX, 0)]);
const KVMCLOCK2: Needs = Needs::Any(&[(KVM, 0, EAX, 3)]);
const ASYNC_PF: Needs = Needs::Any(&[(KVM, 0, EAX, 4)]);
const STEAL_TIME: Needs = Needs::Any(&[(KVM, 0, EAX, 5)]);
const PV_EOI: Needs = Needs::Any(&[(KVM, 0, EAX, 6)]);
const POLL_CONTROL: Needs = Needs::Any(&[(KVM, 0, EAX, 12)]);
const ASYNC_PF_INT: Needs = Needs::Any(&[(KVM, 0, EAX, 14)]);
const MIGRATION_CONTROL: Needs = Needs::Any(&[(KVM, 0, EAX, 17)]);

/// The MSRs a guest's state is made of (besides EFER and APIC_BASE, which
/// travel in the special registers), in the order they are loaded.
const MSRS: &[MsrDef] = &[
    def(0x10, "IA32_TSC", TSC),
    def(0x3a, "IA32_FEATURE_CONTROL", VMX),
    def(0x3b, "IA32_TSC_ADJUST", TSC_ADJUST),
    def(0x48, "IA32_SPEC_CTRL", SPEC_CTRL),
    def(0x10a, "IA32_ARCH_CAPABILITIES", ARCH_CAPABILITIES),
    def(0x140, "MISC_FEATURES_ENABLES", Needs::Always),
    def(0x174, "IA32_SYSENTER_CS", SEP),
    def(0x175, "IA32_SYSENTER_ESP", SEP),
    def(0x176, "IA32_SYSENTER_EIP", SEP),
    def(0x17a, "IA32_MCG_STATUS", MCE),
    def(0x17b, "IA32_MCG_CTL", MCE),
    def(0x1a0, "IA32_MISC_ENABLE", Needs::Always),
    def(0x1c4, "IA32_XFD", XFD),
    def(0x1c5, "IA32_XFD_ERR", XFD),
    def(0x200, "MTRRphysBase0", MTRR),
    def(0x201, "MTRRphysMask0", MTRR),
    def(0x202, "MTRRphysBase1", MTRR),
    def(0x203, "MTRRphysMask1", MTRR),
    def(0x204, "MTRRphysBase2", MTRR),
    def(0x205, "MTRRphysMask2", MTRR),
    def(0x206, "MTRRphysBase3", MTRR),
    def(0x207, "MTRRphysMask3", MTRR),
    def(0x208, "MTRRphysBase4", MTRR),
    def(0x209, "MTRRphysMask4", MTRR),
    def(0x20a, "MTRRphysBase5", MTRR),
    def(0x20b, "MTRRphysMask5", MTRR),
    def(0x20c, "MTRRphysBase6", MTRR),
    def(0x20d, "MTRRphysMask6", MTRR),
    def(0x20e, "MTRRphysBase7", MTRR),
    def(0x20f, "MTRRphysMask7", MTRR),
    def(0x250, "MTRRfix64K_00000", MTRR),
    def(0x258, "MTRRfix16K_80000", MTRR),
    def(0x259, "MTRRfix16K_A0000", MTRR),
    def(0x268, "MTRRfix4K_C0000", MTRR),
    def(0x269, "MTRRfix4K_C8000", MTRR),
    def(0x26a, "MTRRfix4K_D0000", MTRR),
    def(0x26b, "MTRRfix4K_D8000", MTRR),
    def(0x26c, "MTRRfix4K_E0000", MTRR),
    def(0x26d, "MTRRfix4K_E8000", MTRR),
    def(0x26e, "MTRRfix4K_F0000", MTRR),
    def(0x26f, "MTRRfix4K_F8000", MTRR),
    def(0x277, "IA32_PAT", PAT),
    def(0x2ff, "MTRRdefType", MTRR),
    def(0x6a0, "IA32_U_CET", CET),
    def(0x6a2, "IA32_S_CET", CET),
    def(0x6a4, "IA32_PL0_SSP", CET),
    def(0x6a5, "IA32_PL1_SSP", CET),
    def(0x6a6, "IA32_PL2_SSP", CET),
    def(0x6a7, "IA32_PL3_SSP", CET),
    def(0x6a8, "IA32_INT_SSP_TAB", CET),
    def(0x6e0, "IA32_TSC_DEADLINE", TSC_DEADLINE),
    def(0x6e1, "IA32_PKRS", PKS),
    def(0xd90, "IA32_BNDCFGS", MPX),
    def(0xda0, "IA32_XSS", XSAVES),
    def(0xe1, "IA32_UMWAIT_CONTROL", WAITPKG),
    def(0x11, "KVM_WALL_CLOCK", KVMCLOCK),
    def(0x12, "KVM_SYSTEM_TIME", KVMCLOCK),
    def(0x4b56_4d00, "KVM_WALL_CLOCK_NEW", KVMCLOCK2),
    def(0x4b56_4d01, "KVM_SYSTEM_TIME_NEW", KVMCLOCK2),
    def(0x4b56_4d02, "KVM_ASYNC_PF_EN", ASYNC_PF),
    def(0x4b56_4d03, "KVM_STEAL_TIME", STEAL_TIME),
    def(0x4b56_4d04, "KVM_PV_EOI_EN", PV_EOI),
    def(0x4b56_4d05, "KVM_POLL_CONTROL", POLL_CONTROL),
    def(0x4b56_4d06, "KVM_ASYNC_PF_INT", ASYNC_PF_INT),
    def(0x4b56_4d07, "KVM_ASYNC_PF_ACK", ASYNC_PF_INT),
    def(0x4b56_4d08, "KVM_MIGRATION_CONTROL", MIGRATION_CONTROL),
    def(0xc000_0081, "STAR", SYSCALL),
    def(0xc000_0082, "LSTAR", LM),
    def(0xc000_0083, "CSTAR", LM),
    def(0xc000_0084, "SYSCALL_MASK", SYSCALL),
    def(0xc000_0102, "KERNEL_GS_BASE", LM),
    def(0xc000_0103, "TSC_AUX", TSC_AUX),
    def(0xc001_0117, "VM_HSAVE_PA", SVM),
    def(0xc001_011f, "VIRT_SPEC_CTRL", VIRT_SSBD),
];

fn lookup(index: u32) -> Option<&'static MsrDef> {
    MSRS.iter().find(|d| d.index == index)
}

/// The MSR's name where ferry knows it, else its index.
pub fn msr_name(index: u32) -> String {
    lookup(index).map_or_else(|| format!("MSR {index:#x}"), |d| d.name.to_string())
}

/// Whether the guest whose CPUID is `cpuid` has MSR `index`: `None` for an
/// MSR ferry does not know.
fn guest_has(cpuid: &[kvm_cpuid_entry2], index: u32) -> Option<bool> {
    lookup(index).map(|d| match d.needs {
        Needs::Always => true,
        Needs::Any(bits) => bits
            .iter()
            .any(|&(leaf, sub, reg, bit)| cpuid_bit(cpuid, leaf, sub, reg, bit)),
    })
}

/// Reads one MSR of `vcpu`; `None` where KVM refuses it.
pub fn read_msr(vcpu: &VcpuFd, index: u32) -> Option<u64> {
    let mut one = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .ok()?;
    match vcpu.get_msrs(&mut one) {
        Ok(1) => Some(one.as_slice()[0].data),
        _ => None,
    }
}

/// Writes one MSR of `vcpu`; whether KVM took it.
fn write_msr(vcpu: &VcpuFd, entry: kvm_msr_entry) -> bool {
    Msrs::from_entries(&[entry]).is_ok_and(|m| matches!(vcpu.set_msrs(&m), Ok(1)))
}

/// The MSRs a vCPU with CPUID `cpuid` carries in checkpoints and streams: those
/// of [`MSRS`] its CPU has and this host's KVM can read on `probe` (a vCPU with
/// that CPUID; KVM_GET_MSR_INDEX_LIST leaves out some, the MTRRs). `host_cpu`
/// adds every other MSR KVM lists in `listed` and can read (`-cpu host`: such a
/// guest is tied to hosts like this one anyway, and may use the PMU or
/// whatever else the host offers).
pub fn guest_msrs(
    listed: &[u32],
    probe: &VcpuFd,
    cpuid: &[kvm_cpuid_entry2],
    host_cpu: bool,
) -> Vec<u32> {
    let mut out: Vec<u32> = MSRS
        .iter()
        .filter(|d| guest_has(cpuid, d.index) == Some(true))
        .map(|d| d.index)
        .filter(|&i| read_msr(probe, i).is_some())
        .collect();
    if host_cpu {
        for &i in listed {
            if !out.contains(&i) && read_msr(probe, i).is_some() {
                out.push(i);
            }
        }
    }
    out
}

/// An MSR of a guest that this host's KVM would not load, and that the guest
/// could tell apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedMsr {
    pub index: u32,
    pub value: u64,
    /// What a fresh vCPU here has (`None`: KVM has no such MSR here).
    pub here: Option<u64>,
}

impl std::fmt::Display for RefusedMsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({:#x}) = {:#x}",
            msr_name(self.index),
            self.index,
            self.value
        )?;
        match self.here {
            Some(v) => write!(f, " (this host's KVM keeps {v:#x})"),
            None => write!(f, " (this host's KVM has no such MSR)"),
        }
    }
}

/// What loading a guest's MSRs into a vCPU did.
#[derive(Debug, Default)]
pub struct MsrLoad {
    /// The MSRs loaded: they travel on from here.
    pub loaded: Vec<u32>,
    /// Not loaded, and invisible to the guest (same value here, or an MSR of a
    /// feature the guest's CPU does not have): skipped.
    pub skipped: Vec<u32>,
    /// Not loaded, and the guest could tell.
    pub refused: Vec<RefusedMsr>,
}

/// Loads `msrs` into `vcpu` (CPUID `cpuid` already set) one by one, sorting
/// out what this host's KVM will not take.
pub fn load_msrs(vcpu: &VcpuFd, cpuid: &[kvm_cpuid_entry2], msrs: &[kvm_msr_entry]) -> MsrLoad {
    let mut out = MsrLoad::default();
    for &m in msrs {
        if write_msr(vcpu, m) {
            out.loaded.push(m.index);
            continue;
        }
        // A refused write leaves the fresh vCPU's value: read it only then.
        let here = read_msr(vcpu, m.index);
        if here == Some(m.data) || guest_has(cpuid, m.index) == Some(false) {
            out.skipped.push(m.index);
        } else {
            out.refused.push(RefusedMsr {
                index: m.index,
                value: m.data,
                here,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn an_msr_exists_for_a_guest_only_with_its_feature() {
        let plain = vec![leaf(1, 0, 1 << 4 | 1 << 11), leaf(7, 0, 0)];
        assert_eq!(guest_has(&plain, 0x10), Some(true), "tsc");
        assert_eq!(guest_has(&plain, 0x174), Some(true), "sep");
        assert_eq!(guest_has(&plain, 0x1a0), Some(true), "misc enable: always");
        assert_eq!(
            guest_has(&plain, 0x10a),
            Some(false),
            "no arch-capabilities"
        );
        assert_eq!(guest_has(&plain, 0x6e0), Some(false), "no tsc-deadline");
        assert_eq!(guest_has(&plain, 0x4b56_4d01), Some(false), "no kvmclock");
        assert_eq!(guest_has(&plain, 0x38f), None, "PMU MSRs are not ferry's");
        let rich = vec![
            leaf(1, 1 << 24, 0),
            leaf(7, 0, 1 << 29),
            kvm_cpuid_entry2 {
                function: KVM,
                eax: 1 << 3,
                ..Default::default()
            },
        ];
        assert_eq!(guest_has(&rich, 0x10a), Some(true));
        assert_eq!(guest_has(&rich, 0x6e0), Some(true));
        assert_eq!(guest_has(&rich, 0x4b56_4d01), Some(true));
        assert_eq!(guest_has(&rich, 0x12), Some(false), "old kvmclock is bit 0");
    }

    #[test]
    fn refusals_name_the_msr_and_both_values() {
        let r = RefusedMsr {
            index: 0x10a,
            value: 0x69,
            here: None,
        };
        assert_eq!(
            r.to_string(),
            "IA32_ARCH_CAPABILITIES (0x10a) = 0x69 (this host's KVM has no such MSR)"
        );
        assert_eq!(msr_name(0xc000_0100), "MSR 0xc0000100");
    }
}
