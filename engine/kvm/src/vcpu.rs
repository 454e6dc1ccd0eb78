//! vCPU helpers that need `unsafe`: the kick signal and XSAVE restore.

use kvm_bindings::kvm_xsave;
use kvm_ioctls::VcpuFd;

/// Errors of vCPU helpers.
#[derive(Debug, thiserror::Error)]
pub enum KickError {
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Install(std::io::Error),
    #[error("cannot signal vCPU thread: {0}")]
    Signal(std::io::Error),
}

/// The real-time signal ferry uses to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivery alone makes KVM_RUN return EINTR.
}

/// Installs a no-op handler for the kick signal (once per process), so that signalling a
/// vCPU thread interrupts `KVM_RUN` instead of killing the process.
pub fn install_kick_handler() -> Result<(), KickError> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| KickError::Install(std::io::Error::from_raw_os_error(e.errno())))
}

/// Sends the kick signal to the thread `thread` (a `pthread_t` from
/// `JoinHandle::as_pthread_t`).
pub fn kick(thread: libc::pthread_t) -> Result<(), KickError> {
    // SAFETY: pthread_kill only reads its arguments; the caller passes the pthread_t of a
    // thread it has spawned and not yet joined, so the id is valid.
    let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
    if rc != 0 {
        return Err(KickError::Signal(std::io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

/// Restores the legacy 4 KiB XSAVE area of a vCPU.
pub fn set_xsave(vcpu: &VcpuFd, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: `kvm_xsave` is the fixed 4 KiB legacy structure; kvm-ioctls marks set_xsave
    // unsafe only because a larger XSAVE2 area could be expected when AMX state is enabled,
    // which ferry never enables (it does not request XSTATE permissions), so the kernel
    // reads exactly size_of::<kvm_xsave>() bytes.
    unsafe { vcpu.set_xsave(xsave) }
}
