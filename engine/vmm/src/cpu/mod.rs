//! vCPU configuration (CPUID, MSRs) and the vCPU state captured in a checkpoint.

pub mod model;
pub mod msrs;

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::VmmError;

/// KVM's paravirtual leaf that reports the TSC frequency in kHz (EAX).
const CPUID_TSC_LEAF: u32 = 0x4000_0010;
const CPUID_HV_BASE: u32 = 0x4000_0000;

/// What KVM supports on this host.
pub fn supported_cpuid(kvm: &Kvm) -> Result<Vec<kvm_bindings::kvm_cpuid_entry2>, VmmError> {
    Ok(kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?
        .as_slice()
        .to_vec())
}

/// The CPUID table a vCPU gets: the guest's CPU (`base`, from [`model::resolve`]),
/// with per-vCPU APIC ids, the hypervisor bit, and the TSC frequency leaf.
pub fn vcpu_cpuid(
    base: &[kvm_bindings::kvm_cpuid_entry2],
    index: u32,
    vcpus: u32,
    tsc_khz: u32,
) -> Result<CpuId, VmmError> {
    let mut entries: Vec<kvm_bindings::kvm_cpuid_entry2> = base.to_vec();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24);
                e.ebx = (e.ebx & 0xff00_ffff) | (vcpus.min(255) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
            }
            0xb | 0x1f => e.edx = index,
            CPUID_HV_BASE => e.eax = e.eax.max(CPUID_TSC_LEAF),
            _ => {}
        }
    }
    if tsc_khz != 0 && !entries.iter().any(|e| e.function == CPUID_TSC_LEAF) {
        entries.push(kvm_bindings::kvm_cpuid_entry2 {
            function: CPUID_TSC_LEAF,
            eax: tsc_khz,
            ..Default::default()
        });
    }
    CpuId::from_entries(&entries).map_err(|e| VmmError::Config(format!("CPUID table: {e:?}")))
}

/// The MSRs a checkpoint carries for a vCPU with CPUID `cpuid` ([`msrs::guest_msrs`]).
pub fn checkpoint_msrs(
    kvm: &Kvm,
    probe: &VcpuFd,
    cpuid: &[kvm_bindings::kvm_cpuid_entry2],
    host_cpu: bool,
) -> Result<Vec<u32>, VmmError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| VmmError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?;
    Ok(msrs::guest_msrs(list.as_slice(), probe, cpuid, host_cpu))
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u32,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debug_regs: kvm_debugregs,
    pub tsc_khz: u32,
}

impl VcpuState {
    /// Reads the state of a stopped vCPU.
    pub fn capture(index: u32, vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self, VmmError> {
        let k = |what| move |e| VmmError::Kvm(what, e);
        let entries: Vec<kvm_msr_entry> = msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| VmmError::Config(format!("MSR list: {e:?}")))?;
        let read = vcpu.get_msrs(&mut msrs).map_err(k("KVM_GET_MSRS"))?;
        if read != entries.len() {
            return Err(VmmError::Config(format!(
                "KVM read {read} of {} MSRs of vCPU {index}; MSR {:#x} failed",
                entries.len(),
                entries[read].index
            )));
        }
        Ok(Self {
            index,
            regs: vcpu.get_regs().map_err(k("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(k("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(k("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(k("KVM_GET_XCRS"))?,
            lapic: vcpu.get_lapic().map_err(k("KVM_GET_LAPIC"))?,
            msrs: msrs.as_slice().to_vec(),
            events: vcpu.get_vcpu_events().map_err(k("KVM_GET_VCPU_EVENTS"))?,
            mp_state: vcpu.get_mp_state().map_err(k("KVM_GET_MP_STATE"))?,
            debug_regs: vcpu.get_debug_regs().map_err(k("KVM_GET_DEBUGREGS"))?,
            tsc_khz: vcpu.get_tsc_khz().unwrap_or(0),
        })
    }

    /// Loads this state into a vCPU that has its CPUID (`cpuid`) set and has
    /// not run; returns the MSRs it loaded.
    pub fn restore(
        &self,
        vcpu: &VcpuFd,
        cpuid: &[kvm_bindings::kvm_cpuid_entry2],
    ) -> Result<Vec<u32>, VmmError> {
        let k = |what| move |e| VmmError::Kvm(what, e);
        if self.tsc_khz != 0 {
            if let Ok(here) = vcpu.get_tsc_khz() {
                if here != self.tsc_khz {
                    // TSC scaling is best effort: a host without it keeps its own rate.
                    if let Err(e) = vcpu.set_tsc_khz(self.tsc_khz) {
                        tracing::warn!(
                            "vCPU {}: TSC runs at {here} kHz here, {} kHz at the source, and \
                             KVM cannot scale it ({e}); guest time may drift",
                            self.index,
                            self.tsc_khz
                        );
                    }
                }
            }
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(k("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(k("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs).map_err(k("KVM_SET_SREGS"))?;
        ferry_kvm::set_xsave(vcpu, &xsave_for_guest(&self.xsave, cpuid))
            .map_err(k("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(k("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(k("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic).map_err(k("KVM_SET_LAPIC"))?;
        let load = msrs::load_msrs(vcpu, cpuid, &self.msrs);
        if !load.refused.is_empty() {
            return Err(VmmError::MsrsRefused {
                vcpu: self.index,
                refused: load.refused,
            });
        }
        if !load.skipped.is_empty() {
            tracing::info!(
                "vCPU {}: MSRs this host's KVM does not load and the guest cannot tell apart, \
                 skipped: {}",
                self.index,
                load.skipped
                    .iter()
                    .map(|&i| msrs::msr_name(i))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(k("KVM_SET_VCPU_EVENTS"))?;
        Ok(load.loaded)
    }
}

/// XCR0 components x87 and SSE: in every XSAVE image, whatever the CPUID says.
const XFEATURES_FP_SSE: u64 = 0b11;

/// `xsave` with only the state components the guest's CPUID lets it enable
/// (leaf 0xD subleaf 0, EDX:EAX; x87 and SSE always). KVMs differ in what
/// they put in a guest's image: an AMD host's saved PKRU (XSTATE_BV bit 9) for
/// a qemu64 guest without PKU, and a KVM that gives the guest no PKRU refuses
/// that image (KVM_SET_XSAVE: EINVAL; seen loading an AMD host's checkpoint on
/// an Intel one). A guest cannot set an XCR0 bit its CPUID does not offer, so a
/// component outside them is invisible to it and dropping it changes nothing.
/// Only the standard (non-compacted) format KVM_GET_XSAVE writes is touched.
fn xsave_for_guest(xsave: &kvm_xsave, cpuid: &[kvm_bindings::kvm_cpuid_entry2]) -> kvm_xsave {
    let offered = cpuid
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map_or(0, |e| u64::from(e.eax) | (u64::from(e.edx) << 32));
    let mut out = kvm_xsave {
        region: xsave.region,
        ..Default::default()
    };
    // XSTATE_BV at byte 512, XCOMP_BV at byte 520 (u32 words 128-131).
    let word = |i: usize| u64::from(out.region[i]) | (u64::from(out.region[i + 1]) << 32);
    let (bv, comp) = (word(128), word(130));
    if comp & (1 << 63) != 0 {
        return out;
    }
    let kept = bv & (offered | XFEATURES_FP_SSE);
    if kept != bv {
        tracing::debug!(
            dropped = format_args!("{:#x}", bv & !kept),
            "XSAVE components the guest's CPUID does not offer"
        );
        out.region[128] = kept as u32;
        out.region[129] = (kept >> 32) as u32;
    }
    out
}

#[cfg(test)]
mod xsave_tests {
    use kvm_bindings::kvm_xsave;

    #[test]
    fn xsave_keeps_only_what_the_guest_cpuid_offers() {
        let mut x = kvm_xsave::default();
        x.region[128] = 0x203; // x87, SSE, PKRU
        x.region[6] = 0x1f80;
        let leaf = |eax: u32| kvm_bindings::kvm_cpuid_entry2 {
            function: 0xd,
            index: 0,
            eax,
            ..Default::default()
        };
        // qemu64: no XSAVE leaf at all: x87 and SSE stay, PKRU goes.
        let y = super::xsave_for_guest(&x, &[]);
        assert_eq!(
            (y.region[128], y.region[129], y.region[6]),
            (0x3, 0, 0x1f80)
        );
        // A guest with PKU keeps it.
        assert_eq!(
            super::xsave_for_guest(&x, &[leaf(0x207)]).region[128],
            0x203
        );
        // A compacted image is left as it is.
        x.region[131] = 1 << 31;
        assert_eq!(super::xsave_for_guest(&x, &[]).region[128], 0x203);
    }
}
