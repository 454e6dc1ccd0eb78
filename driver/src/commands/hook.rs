//! `ferry hook GUEST OPERATION SUB-OPERATION EXTRA` (libvirt qemu hook).

use std::io::Read;

use crate::cli::{EXIT_ERROR, EXIT_OK};
use crate::hook::{self, HookVerdict};

pub fn run(args: &[String]) -> i32 {
    // libvirt always writes the domain XML; read it all so it never sees EPIPE.
    let mut xml = String::new();
    let _ = std::io::stdin().read_to_string(&mut xml);
    match hook::run(args, &xml) {
        HookVerdict::Allow => EXIT_OK,
        HookVerdict::Refuse(reason) => {
            eprintln!("{reason}");
            EXIT_ERROR
        }
    }
}
