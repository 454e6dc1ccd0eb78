//! ferry(1), from `ferry_driver::cli` (the driver's clap definitions).

use clap::CommandFactory;
use ferry_driver::cli::Cli;

use crate::clapman;
use crate::roff::Doc;

pub fn page() -> Result<String, String> {
    let mut cmd = Cli::command();
    cmd.build();
    let mut doc = Doc::new("ferry", "1", false);
    clapman::header(&mut doc, &cmd);
    doc.p(
        "`ferry` is the operator's tool for ferry guests: libvirt domains whose emulator \
         is ferry-qemu(1). It checks whether a domain can migrate to another host, \
         migrates it with a live progress display, shows and cancels the job, and runs \
         as libvirt's qemu hook so that a destination refuses what it cannot run.",
    );
    clapman::options(&mut doc, &cmd);
    clapman::commands(&mut doc, &cmd);

    doc.sh("EXIT STATUS");
    let after = cmd
        .get_after_help()
        .map(|s| s.to_string())
        .ok_or("ferry's clap Cli has no after_help with its exit status")?;
    let codes = clapman::exit_codes(&after);
    if codes.is_empty() {
        return Err("no exit codes found in ferry's after_help".into());
    }
    for (code, what) in &codes {
        doc.tp(code, what);
    }

    doc.sh("FILES");
    doc.tp(
        "/etc/libvirt/hooks/qemu.d/ferry",
        "The libvirt hook the package installs: a script running `ferry hook \"$@\"`. \
         libvirtd reads its hooks when it starts: restart it after installing ferry.",
    );

    doc.sh("ENVIRONMENT");
    doc.tp(
        "LIBVIRT_DEFAULT_URI",
        "The source host's libvirt URI when `--connect` is not given (libvirt's own default).",
    );

    doc.sh("EXAMPLES");
    doc.example(&[
        "ferry check demo qemu+ssh://hostb/system",
        "ferry migrate demo qemu+ssh://hostb/system --max-downtime 100 --bandwidth 1024",
        "ferry status demo --json",
        "ferry cancel demo",
    ]);

    doc.sh("SEE ALSO");
    doc.raw(r"\fBferry\-vm\fR(1), \fBferry\-qemu\fR(1), \fBferry\-tuning\fR(7), \fBvirsh\fR(1)");
    Ok(doc.finish())
}
