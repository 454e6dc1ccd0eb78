//! `-sandbox`: what of it ferry-qemu enforces.
//!
//! libvirt passes `-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,
//! resourcecontrol=deny`. Under QEMU 7.2's seccomp filter spawn=deny makes an
//! `exec:` migration URI fail with "Failed to fork process"; ferry-qemu installs
//! no seccomp filter and has the engine refuse `exec:` instead
//! (`ferry_vmm::migration::exec`), before forking, with QEMU's text.

use crate::argv::{ArgvError, Opts};

/// What `-sandbox` asks for that ferry-qemu enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SandboxPolicy {
    pub deny_spawn: bool,
}

impl SandboxPolicy {
    /// Reads `-sandbox` as QEMU does: the `spawn` setting only counts with
    /// `on`; its values are `allow` and `deny`.
    pub fn from_opts(opts: &Opts) -> Result<Self, ArgvError> {
        let on = opts.get_bool("-sandbox", "enable")?.unwrap_or(false);
        let deny = match opts.get("spawn") {
            None | Some("allow") => false,
            Some("deny") => true,
            Some(v) => {
                return Err(ArgvError::Invalid {
                    option: "-sandbox".into(),
                    value: format!("spawn={v}"),
                    reason: "invalid argument for spawn (allow or deny)".into(),
                })
            }
        };
        Ok(Self {
            deny_spawn: on && deny,
        })
    }
}

/// Makes `policy` the process's (once, at startup; it is never relaxed).
pub fn apply_sandbox(policy: SandboxPolicy) {
    if policy.deny_spawn {
        ferry_vmm::migration::exec::deny_spawn();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_policy_as_qemu_reads_it() {
        let p = |s: &str| {
            SandboxPolicy::from_opts(&Opts::parse("-sandbox", s, Some("enable")).expect("opts"))
        };
        assert!(
            p("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
                .expect("libvirt's")
                .deny_spawn
        );
        assert!(!p("off,spawn=deny").expect("off").deny_spawn);
        assert!(!p("on").expect("on").deny_spawn);
        assert!(p("on,spawn=maybe").is_err());
    }
}
