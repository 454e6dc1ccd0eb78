//! The checks a stream's first section passes before anything is built from it.

use ferry_kvm::PAGE_SIZE;

use super::{LoadError, RestoreOptions};
use crate::vm::{ShapeMismatch, VmShape};
use crate::VmmError;

/// Checks that the page at `gpa` lies inside guest RAM (`ranges`).
pub(crate) fn check_inside(ranges: &[(u64, u64)], gpa: u64) -> Result<(), LoadError> {
    let inside = ranges
        .iter()
        .any(|&(b, s)| gpa >= b && gpa - b < s && s - (gpa - b) >= PAGE_SIZE as u64);
    if inside {
        Ok(())
    } else {
        Err(LoadError::PageOutside {
            gpa,
            ranges: ranges.to_vec(),
        })
    }
}

/// Most RAM ranges (KVM memory slots) a stream may ask for; ferry's layout uses
/// at most two (below the PCI hole and above 4 GiB).
pub const MAX_RAM_RANGES: usize = 32;

/// Decodes the Shape section that opens every stream and checks it against the
/// options.
///
/// The shape comes from the wire, so it is validated as hostile before anything
/// is built from it: the vCPU count and the RAM ranges must be ones this ferry
/// could have created itself (`Vm::create` enforces the same bounds). Found by
/// fuzzing (fuzz/corpus/{receiver,checkpoint}/regress-*): a shape with 0 vCPUs
/// made the VM builder index an empty vCPU list and panic, and RAM ranges whose
/// sizes add up past 2^64 overflowed the sum below (a panic in debug builds, a
/// wrapped size in release ones).
pub fn check_shape(shape: &VmShape, opts: &RestoreOptions) -> Result<(), VmmError> {
    let refuse = |why: String| VmmError::from(LoadError::InvalidShape(why));
    if shape.cpuid.len() > kvm_bindings::KVM_MAX_CPUID_ENTRIES {
        return Err(refuse(format!(
            "{} CPUID leaves; KVM takes at most {}",
            shape.cpuid.len(),
            kvm_bindings::KVM_MAX_CPUID_ENTRIES
        )));
    }
    if shape.vcpus == 0 || shape.vcpus > crate::vm::MAX_VCPUS {
        return Err(refuse(format!(
            "{} vCPUs; ferry supports 1 to {}",
            shape.vcpus,
            crate::vm::MAX_VCPUS
        )));
    }
    if shape.ram_ranges.is_empty() || shape.ram_ranges.len() > MAX_RAM_RANGES {
        return Err(refuse(format!(
            "{} RAM ranges; ferry supports 1 to {MAX_RAM_RANGES}",
            shape.ram_ranges.len()
        )));
    }
    let mut total: u64 = 0;
    let mut prev_end: u64 = 0;
    for (i, &(base, size)) in shape.ram_ranges.iter().enumerate() {
        let end = base.checked_add(size);
        let aligned = base % PAGE_SIZE as u64 == 0 && size % PAGE_SIZE as u64 == 0;
        match end {
            Some(end) if size > 0 && aligned && (i == 0 || base >= prev_end) => prev_end = end,
            _ => {
                return Err(refuse(format!(
                    "RAM range {i} ({base:#x}+{size:#x}) is empty, unaligned, overlapping or \
                     past the end of the address space"
                )))
            }
        }
        total = total.saturating_add(size);
    }
    if !(ferry_boot::MIN_RAM_BYTES..=ferry_boot::MAX_RAM_BYTES).contains(&total) {
        return Err(refuse(format!(
            "{total} bytes of RAM; ferry supports {} MiB to {} GiB",
            ferry_boot::MIN_RAM_BYTES >> 20,
            ferry_boot::MAX_RAM_BYTES >> 30
        )));
    }
    if let Some(want) = opts.expect_mem_bytes.filter(|&w| w != total) {
        return Err(ShapeMismatch::Memory {
            stream: total,
            configured: want,
        }
        .into());
    }
    if let Some(want) = opts.expect_vcpus.filter(|&w| w != shape.vcpus) {
        return Err(ShapeMismatch::Vcpus {
            stream: shape.vcpus,
            configured: want,
        }
        .into());
    }
    Ok(())
}
