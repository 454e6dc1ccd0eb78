//! ferry: the operator's tool for migrating ferry guests through libvirt.
//!
//! `main.rs` is a thin wrapper over [`run`]. The rules (`checks`) and the XML
//! analysis (`domxml`) need no libvirt and are unit-tested with fixtures;
//! `libvirt.rs` is the only module that talks to libvirt.

pub mod checks;
pub mod cli;
pub mod commands;
pub mod domxml;
pub mod hook;
pub mod hostfs;
pub mod job;
pub mod libvirt;
pub mod output;

use clap::Parser;

pub use cli::{EXIT_BLOCKED, EXIT_ERROR, EXIT_OK, EXIT_USAGE};

/// Whether ferry was started as a libvirt hook through a symlink
/// (`/etc/libvirt/hooks/qemu` or `/etc/libvirt/hooks/qemu.d/...`).
fn invoked_as_hook(argv0: &str) -> bool {
    argv0.contains("/hooks/qemu")
}

/// Runs ferry with `args` (including argv\[0\]) and returns the exit status.
pub fn run(args: Vec<String>) -> i32 {
    if args.first().is_some_and(|a| invoked_as_hook(a)) {
        return commands::hook::run(&args[1..]);
    }
    let cli = match cli::Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
        }
    };
    libvirt::quiet_errors();
    commands::dispatch(cli.command)
}
