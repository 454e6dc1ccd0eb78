//! `cargo run -p xtask -- man [--check]`: write the man pages under `man/`, or
//! with `--check` only report the stale ones (exit 1).

use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!("usage: cargo run -p xtask -- man [--check]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let check = match args.as_slice() {
        ["man"] => false,
        ["man", "--check"] => true,
        _ => return usage(),
    };
    let dir = xtask::man_dir();
    if check {
        return match xtask::stale(&dir) {
            Ok(s) if s.is_empty() => ExitCode::SUCCESS,
            Ok(s) => {
                for m in s {
                    eprintln!("xtask: {m}");
                }
                eprintln!("xtask: run `{}` and commit man/", xtask::REFRESH);
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("xtask: {e}");
                ExitCode::from(1)
            }
        };
    }
    let pages = match xtask::pages() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("xtask: {e}");
            return ExitCode::from(1);
        }
    };
    for page in pages {
        let path = dir.join(page.file);
        if let Err(e) = std::fs::write(&path, &page.text) {
            eprintln!("xtask: cannot write {}: {e}", path.display());
            return ExitCode::from(1);
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
