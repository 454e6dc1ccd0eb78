//! ferry-vm(1), from `ferry_vmm::cli`.

use clap::CommandFactory;
use ferry_vmm::cli::{Cli, CONTROL_COMMANDS, EXIT_STATUS};

use crate::clapman;
use crate::roff::Doc;

pub fn page() -> String {
    let cmd = Cli::command();
    let mut doc = Doc::new("ferry-vm", "1", false);
    clapman::header(&mut doc, &cmd);
    doc.p(
        "`ferry-vm` runs one KVM virtual machine: it boots a kernel directly (`run`), \
         restores a checkpoint (`restore`), or waits for a live migration (`incoming`), \
         then runs the guest until it powers off, resets, is told to `quit` on the \
         control socket, or migrates away. Guests get RAM, vCPUs, a 16550 serial \
         port (COM1) and, on PCI bus 0, virtio-blk disks (`--disk`, raw images or \
         block devices), virtio-net cards on tap devices (`--net`) and virtio-rng \
         entropy devices (`--rng`, from a file or the host's getrandom, with QEMU's \
         rate limit); there is no firmware.",
    );
    doc.p(
        "Disks, NICs and entropy devices are virtio 1.x PCI devices (modern interface, \
         MSI-X). A migration destination or a restore must be given the same disks \
         (shared storage: the same image, the same size), NICs (same MAC) and entropy \
         devices in the same PCI slots; otherwise it refuses the VM before any page moves, naming the devices. \
         The source flushes its disks before the switch-over and the destination \
         reopens them; after a migration or restore, each NIC announces the guest's MAC \
         with 5 RARP frames over about 0.8 s (QEMU's schedule), so switches learn its new port.",
    );
    doc.p(
        "A checkpoint is a migration into a file: both use the same versioned, \
         checksummed stream format, described in ferry-tuning(7).",
    );
    clapman::options(&mut doc, &cmd);
    clapman::commands(&mut doc, &cmd);

    doc.sh("CONTROL SOCKET");
    doc.p(
        "With `--control PATH`, `ferry-vm` listens on a unix socket at PATH. Each line \
         is one command; each reply is one line of JSON with `\"ok\": true` and the \
         result, or `\"ok\": false` and an `\"error\"` text.",
    );
    for (synopsis, what) in CONTROL_COMMANDS {
        doc.tp(synopsis, what);
    }
    doc.p("For example:");
    doc.example(&[
        "echo status | socat - UNIX-CONNECT:/tmp/a.sock",
        "echo \"migrate-set downtime-limit=100 max-bandwidth=268435456\" | socat - UNIX-CONNECT:/tmp/a.sock",
        "echo \"migrate tcp:hostb:4444\" | socat - UNIX-CONNECT:/tmp/a.sock",
    ]);

    doc.sh("MIGRATION URIS");
    doc.tp(
        "tcp:HOST:PORT",
        "A TCP connection; `incoming` listens on HOST:PORT (port 0 picks one and prints it).",
    );
    doc.tp("unix:PATH", "A unix socket at PATH.");
    doc.tp(
        "file:PATH",
        "A file: `migrate file:PATH` writes a checkpoint, `incoming file:PATH` reads one.",
    );

    doc.sh("EXIT STATUS");
    for (code, what) in EXIT_STATUS {
        doc.tp(&code.to_string(), what);
    }

    doc.sh("ENVIRONMENT");
    doc.tp(
        "FERRY_LOG",
        "Log filter (tracing syntax, default `info`); `FERRY_LOG=debug` shows every pre-copy pass.",
    );

    doc.sh("EXAMPLES");
    doc.p("Boot a guest on one side and migrate it to a second `ferry-vm`:");
    doc.example(&[
        "ferry-vm run --kernel dirtier.elf -m 1G --append ws=64M --control /tmp/a.sock",
        "ferry-vm incoming tcp:192.0.2.7:4444 -m 1G --serial file:/tmp/b.log --control /tmp/b.sock",
        "echo \"migrate tcp:192.0.2.7:4444\" | socat - UNIX-CONNECT:/tmp/a.sock",
    ]);
    doc.p(
        "Over a network that is not yours alone, with TLS (DIR holds ca-cert.pem and the \
         server's or client's cert and key):",
    );
    doc.example(&[
        "ferry-vm incoming tcp:192.0.2.7:4444 -m 1G --tls-creds x509:/etc/ferry/tls --control /tmp/b.sock",
        "echo \"migrate-set tls-creds=x509:/etc/ferry/tls-client\" | socat - UNIX-CONNECT:/tmp/a.sock",
    ]);
    doc.p("The same guest with a disk on shared storage and a NIC on a tap:");
    doc.example(&[
        "ferry-vm run --kernel dirtier.elf --append \"ws=64M blk=8 net=1\" --disk /nfs/vm.img --net tap=tap0 --control /tmp/a.sock",
        "ferry-vm incoming tcp:192.0.2.7:4444 --disk /nfs/vm.img --net tap=tap1 --control /tmp/b.sock",
    ]);
    doc.p("Checkpoint a running guest and restore it later:");
    doc.example(&[
        "echo \"checkpoint /var/tmp/vm.ckpt\" | socat - UNIX-CONNECT:/tmp/a.sock",
        "ferry-vm restore /var/tmp/vm.ckpt --control /tmp/a.sock",
    ]);

    doc.sh("SEE ALSO");
    doc.raw(r"\fBferry\fR(1), \fBferry\-qemu\fR(1), \fBferry\-tuning\fR(7)");
    doc.finish()
}
