//! `exec:` migration URIs: the one place where ferry-qemu starts a process,
//! and where `-sandbox on,spawn=deny` is enforced.
//!
//! QEMU 7.2's seccomp filter makes fork/exec fail under spawn=deny (libvirt
//! passes `-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,
//! resourcecontrol=deny`), so an `exec:` URI fails with "Failed to fork
//! process". ferry-qemu installs no seccomp filter: it refuses here, before
//! forking, with QEMU's text and the cause.

use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::argv::{ArgvError, Opts};

/// Set once at startup by [`apply_sandbox`] for `-sandbox on,spawn=deny`.
static SPAWN_DENIED: AtomicBool = AtomicBool::new(false);

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
        SPAWN_DENIED.store(true, Ordering::SeqCst);
    }
}

/// Which end of the command the migration stream is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// We write the stream to the command's stdin (`migrate exec:`).
    Stdin,
    /// We read the stream from the command's stdout (`-incoming exec:`).
    Stdout,
}

/// Why an `exec:` command could not be started, with QEMU's wording.
pub fn spawn_refusal(cmd: &str, policy: SandboxPolicy) -> Option<String> {
    policy.deny_spawn.then(|| {
        format!(
            "exec:{cmd}: Failed to fork process: Operation not permitted: -sandbox \
             spawn=deny forbids ferry-qemu to start processes; use an fd: or file: URI, or \
             allow spawning (-sandbox spawn=allow; libvirt: seccomp_sandbox = 0 in qemu.conf)"
        )
    })
}

/// Refuses `exec:CMD` now if the sandbox forbids spawning, for callers that
/// start the command later (a live migration opens its channel on its own
/// thread): the `migrate` command then fails, as in QEMU.
pub fn check_spawn(cmd: &str) -> Result<(), String> {
    let policy = SandboxPolicy {
        deny_spawn: SPAWN_DENIED.load(Ordering::SeqCst),
    };
    spawn_refusal(cmd, policy).map_or(Ok(()), Err)
}

/// Runs `/bin/sh -c CMD` (QEMU's `exec:`) with the stream's end of it on a
/// pipe; returns the child (to wait for) and our end of the pipe.
pub fn spawn_exec(cmd: &str, end: StreamEnd) -> Result<(Child, OwnedFd), String> {
    check_spawn(cmd)?;
    let mut c = Command::new("/bin/sh");
    c.arg("-c").arg(cmd);
    match end {
        StreamEnd::Stdin => c.stdin(Stdio::piped()),
        StreamEnd::Stdout => c.stdin(Stdio::null()).stdout(Stdio::piped()),
    };
    let mut child = c.spawn().map_err(|e| format!("exec:{cmd}: {e}"))?;
    let pipe = match end {
        StreamEnd::Stdin => child.stdin.take().map(OwnedFd::from),
        StreamEnd::Stdout => child.stdout.take().map(OwnedFd::from),
    };
    match pipe {
        Some(fd) => Ok((child, fd)),
        None => Err(format!("exec:{cmd}: no pipe")),
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
        let why = spawn_refusal("cat", SandboxPolicy { deny_spawn: true }).expect("refused");
        assert!(why.starts_with("exec:cat: Failed to fork process"), "{why}");
        assert!(spawn_refusal("cat", SandboxPolicy::default()).is_none());
    }
}
