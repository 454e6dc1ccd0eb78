//! The committed man pages are what the sources generate, and they render.

use std::path::Path;
use std::process::Command;

#[test]
fn committed_pages_are_fresh() {
    let stale = xtask::stale(&xtask::man_dir()).expect("the pages generate");
    assert!(
        stale.is_empty(),
        "{}\nrun `{}` and commit man/",
        stale.join("\n"),
        xtask::REFRESH
    );
}

/// Every command that control.rs documents is in ferry-vm(1)'s CONTROL SOCKET.
#[test]
fn control_socket_commands_match_control_rs() {
    let src = include_str!("../../engine/vmm/src/control.rs");
    let doc: String = src
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let documented: Vec<&str> = doc
        .split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|s| s.split_whitespace().next())
        .filter(|w| !w.starts_with("ferry")) // `ferry-vm`, `ferry-qemu`: not commands
        .collect();
    let listed: Vec<&str> = ferry_vmm::cli::CONTROL_COMMANDS
        .iter()
        .filter_map(|(s, _)| s.split_whitespace().next())
        .collect();
    for c in &documented {
        assert!(
            listed.contains(c),
            "control.rs documents `{c}`: add it to CONTROL_COMMANDS in engine/vmm/src/cli.rs"
        );
    }
    for c in &listed {
        assert!(
            documented.contains(c),
            "CONTROL_COMMANDS lists `{c}`, which control.rs does not document"
        );
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Renders every page (with `man -l` where man-db is installed, else groff)
/// and fails on any warning.
#[test]
fn pages_render_without_warnings() {
    let dir = tempfile_dir();
    let pages = xtask::pages().expect("the pages generate");
    for page in &pages {
        let path = dir.join(page.file);
        std::fs::write(&path, &page.text).expect("write the page");
        let out = if have("man") {
            Command::new("man")
                .args(["--warnings=all", "-l", "-Tutf8"])
                .arg(&path)
                .env("MANWIDTH", "80")
                .output()
        } else if have("groff") {
            Command::new("groff")
                .args(["-t", "-man", "-Tutf8", "-ww", "-z"])
                .arg(&path)
                .output()
        } else {
            panic!("neither man nor groff is installed: apt-get install man-db groff-base");
        };
        let out = out.expect("run the renderer");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{} does not render cleanly:\n{stderr}",
            page.file
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-man-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

#[test]
fn qemu_page_lists_every_qmp_command() {
    let pages = xtask::pages().expect("the pages generate");
    let qemu = pages
        .iter()
        .find(|p| p.file == "ferry-qemu.1")
        .expect("ferry-qemu.1 is generated");
    for c in ferry_qemu::commands::COMMANDS {
        let name = xtask::roff::esc(c.schema.name);
        assert!(qemu.text.contains(&name), "ferry-qemu.1 lacks {name}");
    }
    assert!(Path::new(&xtask::man_dir()).ends_with("man"));
}
