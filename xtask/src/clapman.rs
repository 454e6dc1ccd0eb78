//! Man page sections from clap definitions, through clap_mangen.

use clap_mangen::Man;

use crate::roff::{inline, Doc};

/// clap_mangen's output for one section, without the apostrophe preamble it
/// writes before every render and, with `drop_heading`, without the `.SH` line.
fn render(f: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>, drop_heading: bool) -> String {
    let mut buf = Vec::new();
    f(&mut buf).expect("writing to a Vec cannot fail");
    let text = String::from_utf8(buf).expect("clap_mangen writes UTF-8");
    let mut lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with(".ie \\n(.g .ds Aq") && !l.starts_with(".el .ds Aq"))
        .collect();
    if drop_heading && lines.first().is_some_and(|l| l.starts_with(".SH ")) {
        lines.remove(0);
    }
    lines.join("\n")
}

/// The strings roff's `\*(Aq` needs (once per page, before any apostrophe).
pub const APOSTROPHE_PREAMBLE: &str = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '";

/// NAME, SYNOPSIS, DESCRIPTION and OPTIONS of `cmd`.
pub fn header(doc: &mut Doc, cmd: &clap::Command) {
    let man = Man::new(cmd.clone());
    doc.raw(APOSTROPHE_PREAMBLE);
    doc.raw(&render(|w| man.render_name_section(w), false));
    doc.raw(&render(|w| man.render_synopsis_section(w), false));
    doc.raw(&render(|w| man.render_description_section(w), false));
}

/// The OPTIONS section of `cmd`.
pub fn options(doc: &mut Doc, cmd: &clap::Command) {
    let man = Man::new(cmd.clone());
    doc.raw(&render(|w| man.render_options_section(w), false));
}

/// One subsection per subcommand: its synopsis, description, options, and its
/// exit status where that differs from the command's.
pub fn commands(doc: &mut Doc, cmd: &clap::Command) {
    let mut cmd = cmd.clone();
    cmd.build();
    doc.sh("COMMANDS");
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        let name = format!("{} {}", cmd.get_name(), sub.get_name());
        doc.ss(&name);
        let man = Man::new(sub.clone().bin_name(&name));
        doc.raw(&render(|w| man.render_synopsis_section(w), true));
        doc.raw(".PP");
        doc.raw(&render(|w| man.render_description_section(w), true));
        let opts = render(|w| man.render_options_section(w), true);
        if !opts.trim().is_empty() {
            doc.raw(&opts);
        }
        let own = sub.get_after_help().map(|s| s.to_string());
        let parent = cmd.get_after_help().map(|s| s.to_string());
        if own.is_some() && own != parent {
            if let Some(text) = own {
                doc.raw(".PP");
                for line in text.lines() {
                    doc.raw(&inline(line.trim()));
                    doc.raw(".br");
                }
            }
        }
    }
}

/// `N  meaning` lines of an `EXIT STATUS:` block in an after-help text.
pub fn exit_codes(after_help: &str) -> Vec<(String, String)> {
    after_help
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let (code, text) = l.split_once(char::is_whitespace)?;
            code.parse::<u8>().ok()?;
            Some((code.to_string(), text.trim().to_string()))
        })
        .collect()
}
