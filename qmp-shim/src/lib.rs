//! ferry-qemu: a QEMU-compatible command line and QMP monitor in front of
//! ferry's VMM, so that libvirt can drive ferry as its `<emulator>`.
//!
//! * [`argv`]: QEMU command line → [`argv::Invocation`] → [`backend::MachineConfig`].
//! * [`qmp`]: the monitor protocol (framing, negotiation, dispatch, events).
//! * [`commands`]: one file per QMP area; the table there is also the
//!   source of `query-qmp-schema` and `query-commands`.
//! * [`backend`]: the VM operations behind QMP, implemented by the engine.
//! * [`vmm`]: the backend on ferry-vmm; [`serial`]: chardev outputs of COM1.
//! * [`exec`]: `exec:` URIs' commands and `-sandbox spawn=deny`.
//! * [`process`]: startup (monitors, `-daemonize`, `-pidfile`, signals).

pub mod argv;
pub mod backend;
pub mod commands;
pub mod exec;
use ferry_kvm::fd;
pub mod process;
pub mod qmp;
pub mod serial;
pub mod vmm;

#[cfg(test)]
mod testing;
