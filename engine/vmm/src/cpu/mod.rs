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
        ferry_kvm::set_xsave(vcpu, &self.xsave).map_err(k("KVM_SET_XSAVE"))?;
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
