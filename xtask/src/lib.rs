//! ferry's development tasks. `cargo run -p xtask -- man` regenerates the man
//! pages under `man/` from their sources: the clap definitions of `ferry-vm`
//! and `ferry`, ferry-qemu's option, device and QMP command tables, the
//! migration defaults and the format crate's layout tables. The integration
//! test `xtask/tests/man.rs` fails when a committed page is stale.

#![forbid(unsafe_code)]

mod clapman;
mod ferry;
mod ferry_qemu;
mod ferry_vm;
pub mod roff;
mod tuning;

use std::path::{Path, PathBuf};

/// The command that rewrites the pages.
pub const REFRESH: &str = "cargo run -p xtask -- man";

/// A generated page: its file name under `man/` and its roff source.
#[derive(Debug)]
pub struct Page {
    pub file: &'static str,
    pub text: String,
}

/// Every page, generated from its sources.
pub fn pages() -> Result<Vec<Page>, String> {
    Ok(vec![
        Page {
            file: "ferry.1",
            text: ferry::page()?,
        },
        Page {
            file: "ferry-vm.1",
            text: ferry_vm::page(),
        },
        Page {
            file: "ferry-qemu.1",
            text: ferry_qemu::page()?,
        },
        Page {
            file: "ferry-tuning.7",
            text: tuning::page()?,
        },
    ])
}

/// The workspace's `man/` directory.
pub fn man_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("man"), |root| root.join("man"))
}

/// Pages under `dir` that differ from what the sources generate (missing ones
/// included), as messages.
pub fn stale(dir: &Path) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for page in pages()? {
        let path = dir.join(page.file);
        match std::fs::read_to_string(&path) {
            Ok(text) if text == page.text => {}
            Ok(_) => out.push(format!("{} is stale", path.display())),
            Err(e) => out.push(format!("{} cannot be read: {e}", path.display())),
        }
    }
    Ok(out)
}
