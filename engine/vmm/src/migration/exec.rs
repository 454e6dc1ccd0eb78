//! `exec:` migration URIs (QEMU's `exec:CMD`): the one place where the engine
//! starts a process, and where a front-end's ban on spawning is enforced.
//!
//! QEMU 7.2's seccomp filter makes fork/exec fail under `-sandbox spawn=deny`
//! (libvirt passes it), so an `exec:` URI fails with "Failed to fork process".
//! ferry installs no seccomp filter: [`deny_spawn`] makes every later `exec:`
//! fail here, before forking, with QEMU's text and the cause.

use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once at startup by [`deny_spawn`]; never cleared.
static SPAWN_DENIED: AtomicBool = AtomicBool::new(false);

/// Forbids `exec:` URIs for the rest of the process's life (ferry-qemu's
/// `-sandbox on,spawn=deny`).
pub fn deny_spawn() {
    SPAWN_DENIED.store(true, Ordering::SeqCst);
}

/// Which end of the command the migration stream is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// We write the stream to the command's stdin (`migrate exec:`).
    Stdin,
    /// We read the stream from the command's stdout (`-incoming exec:`).
    Stdout,
}

/// Why an `exec:` command was not started.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(
        "exec:{cmd}: Failed to fork process: Operation not permitted: -sandbox spawn=deny \
         forbids ferry-qemu to start processes; use an fd: or file: URI, or allow spawning \
         (-sandbox spawn=allow; libvirt: seccomp_sandbox = 0 in qemu.conf)"
    )]
    SpawnDenied { cmd: String },
    #[error("exec:{cmd}: cannot start /bin/sh")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("exec:{cmd}: the command has no pipe")]
    NoPipe { cmd: String },
}

/// Refuses `exec:CMD` now if spawning is denied, for callers that start the
/// command later (a live migration opens its channel on its own thread): the
/// front-end's `migrate` then fails at once, as QEMU's does.
pub fn check_spawn(cmd: &str) -> Result<(), ExecError> {
    if SPAWN_DENIED.load(Ordering::SeqCst) {
        return Err(ExecError::SpawnDenied { cmd: cmd.into() });
    }
    Ok(())
}

/// Runs `/bin/sh -c CMD` with the stream's end of it on a pipe; returns the
/// child (to wait for) and our end of the pipe.
pub fn spawn(cmd: &str, end: StreamEnd) -> Result<(Child, OwnedFd), ExecError> {
    check_spawn(cmd)?;
    let mut c = Command::new("/bin/sh");
    c.arg("-c").arg(cmd);
    match end {
        StreamEnd::Stdin => c.stdin(Stdio::piped()),
        StreamEnd::Stdout => c.stdin(Stdio::null()).stdout(Stdio::piped()),
    };
    let mut child = c.spawn().map_err(|source| ExecError::Spawn {
        cmd: cmd.into(),
        source,
    })?;
    let pipe = match end {
        StreamEnd::Stdin => child.stdin.take().map(OwnedFd::from),
        StreamEnd::Stdout => child.stdout.take().map(OwnedFd::from),
    };
    match pipe {
        Some(fd) => Ok((child, fd)),
        None => Err(ExecError::NoPipe { cmd: cmd.into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_command_reads_and_writes_the_stream() {
        let (mut child, fd) = spawn("printf ferry", StreamEnd::Stdout).expect("spawn");
        let mut out = String::new();
        std::fs::File::from(fd)
            .read_to_string(&mut out)
            .expect("read");
        assert_eq!(out, "ferry");
        assert!(child.wait().expect("wait").success());
    }

    #[test]
    fn the_ban_names_the_sandbox_and_the_fix() {
        // Only this test bans: it runs in its own process (cargo test runs
        // the lib's tests in one process, so check the text without the ban).
        let e = ExecError::SpawnDenied { cmd: "cat".into() }.to_string();
        assert!(e.starts_with("exec:cat: Failed to fork process"), "{e}");
        assert!(e.contains("spawn=allow"), "{e}");
    }
}
