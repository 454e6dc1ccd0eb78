//! Assembles and links the dirtier test guest and its BIOS boot loader with
//! the system `as` and `ld` (Debian's binutils). No prebuilt blobs: the ELF
//! is rebuilt from `guest/dirtier.S` and `guest/dirtier.ld`, the loader (a
//! flat binary run at 0x7c00) from `guest/bootsect.S` and `guest/bootsect.ld`,
//! whenever they change.

use std::env;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(tool: &str, args: &[&std::ffi::OsStr]) {
    let status = match Command::new(tool).args(args).status() {
        Ok(status) => status,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "`{tool}` not found: the dirtier test guest is built with GNU binutils \
             (`as` and `ld`); install them with `apt-get install binutils`"
        ),
        Err(e) => panic!("cannot run `{tool}`: {e}"),
    };
    assert!(
        status.success(),
        "`{tool}` failed building the dirtier test guest: {status}"
    );
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let source = manifest.join("guest/dirtier.S");
    let script = manifest.join("guest/dirtier.ld");
    let boot_source = manifest.join("guest/bootsect.S");
    let boot_script = manifest.join("guest/bootsect.ld");
    for path in [&source, &script, &boot_source, &boot_script] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let object = out.join("dirtier.o");
    let elf = out.join("dirtier.elf");
    run(
        "as",
        &[
            "--64".as_ref(),
            "-o".as_ref(),
            object.as_os_str(),
            source.as_os_str(),
        ],
    );
    run(
        "ld",
        &[
            "-nostdlib".as_ref(),
            "-static".as_ref(),
            "--build-id=none".as_ref(),
            "-z".as_ref(),
            "max-page-size=0x1000".as_ref(),
            "--no-warn-rwx-segments".as_ref(),
            "-T".as_ref(),
            script.as_os_str(),
            "-o".as_ref(),
            elf.as_os_str(),
            object.as_os_str(),
        ],
    );
    assert!(Path::new(&elf).exists(), "ld produced no {}", elf.display());

    let boot_object = out.join("bootsect.o");
    let boot_bin = out.join("bootsect.bin");
    run(
        "as",
        &[
            "--32".as_ref(),
            "-o".as_ref(),
            boot_object.as_os_str(),
            boot_source.as_os_str(),
        ],
    );
    run(
        "ld",
        &[
            "-m".as_ref(),
            "elf_i386".as_ref(),
            "-nostdlib".as_ref(),
            "-static".as_ref(),
            "--build-id=none".as_ref(),
            "-T".as_ref(),
            boot_script.as_os_str(),
            "-o".as_ref(),
            boot_bin.as_os_str(),
            boot_object.as_os_str(),
        ],
    );
    assert!(
        Path::new(&boot_bin).exists(),
        "ld produced no {}",
        boot_bin.display()
    );
}
