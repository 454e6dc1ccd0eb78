//! ferry-qemu(1). Its command line is parsed by hand (`qmp-shim/src/argv/`), so
//! the prose lives here, but every list comes from ferry-qemu's own tables: the
//! options (`argv::OPTIONS`), devices, machine types, CPU models, the QMP
//! commands (`commands::COMMANDS`) and events. An option without a description
//! here stops the generator, so the page cannot fall behind the parser.

use ferry_qemu::argv::{self, CPU_MODELS, MACHINES, MODELLED_AS_ABSENT, MODELLED_DEVICES};
use ferry_qemu::backend::MachineType;
use ferry_qemu::commands::{COMMANDS, EVENTS};
use ferry_qemu::process::EXIT_FAILURE;

use crate::roff::{esc, Doc};

/// Options parsed only so that the refusal can name them.
const REFUSED: &[&str] = &["spice", "vga", "vnc", "L", "numa", "fw_cfg"];

/// (option, argument synopsis, description) for every option in `argv::OPTIONS`.
const DESCRIPTIONS: &[(&str, &str, &str)] = &[
    ("S", "", "Do not start the vCPUs; QMP `cont` starts them."),
    (
        "daemonize",
        "",
        "Run in the background. The foreground process exits 0 once the monitor sockets \
         exist and the pid file is written, or 1 with the daemon's error.",
    ),
    (
        "no-user-config",
        "",
        "Accepted: ferry-qemu reads no configuration files.",
    ),
    (
        "nodefaults",
        "",
        "Accepted: ferry-qemu creates no default devices.",
    ),
    ("nographic", "", "Accepted: ferry-qemu has no display."),
    (
        "no-shutdown",
        "",
        "When the guest powers off, stay in the `shutdown` state instead of exiting.",
    ),
    ("no-reboot", "", "Treat a guest reset as a power-off."),
    (
        "no-acpi",
        "",
        "A guest booted through firmware gets no ACPI: no PIIX4 power management function \
         and no ACPI tables (as `-machine acpi=off`, which libvirt writes when \
         <features><acpi/> is absent).",
    ),
    (
        "no-hpet",
        "",
        "Accepted: ferry has no HPET (what libvirt writes for <timer name='hpet' present='no'/>).",
    ),
    ("enable-kvm", "", "The same as `-accel kvm`."),
    (
        "version",
        "",
        "Print the QEMU version ferry-qemu implements (for libvirt) and its own, and exit.",
    ),
    ("help", "", "List the options and exit."),
    ("h", "", "The same as `-help`."),
    (
        "machine",
        "TYPE[,PROP=VALUE...]",
        "The machine type (see DEVICES); `none` is libvirt's capability probe, which \
         runs no guest. Properties: `accel`, `usb`, `dump-guest-core`, \
         `memory-backend`, `graphics`, `vmport`; others are refused.",
    ),
    ("M", "TYPE[,PROP=VALUE...]", "The same as `-machine`."),
    (
        "accel",
        "kvm",
        "The accelerator: KVM only (`kvm:tcg` is accepted and means KVM). TCG alone is \
         refused: use `<domain type='kvm'>`.",
    ),
    (
        "m",
        "SIZE",
        "Guest RAM (default 128 MiB; a plain number is MiB). Memory hotplug \
         (`slots=`, `maxmem=`) is refused.",
    ),
    (
        "smp",
        "N[,PROP=VALUE...]",
        "The number of vCPUs. CPU hotplug (`maxcpus` above the boot CPUs) is refused.",
    ),
    (
        "cpu",
        "MODEL[,FEATURE...]",
        "The CPU the guest sees: `qemu64` (the default without -cpu, as in QEMU) or \
         `kvm64` (QEMU 7.2's definitions: vendor, family/model, model id and feature set, \
         masked by what this host offers, with a warning for what it lacks, or an error \
         with `enforce`; under KVM qemu64 has no svm, and named models get no PMU and \
         only QEMU's default KVM paravirtual features, so they migrate between kernels \
         and CPUs), `host` or `max` (everything KVM offers here: such a guest moves only \
         to hosts with its CPU features and kernel MSRs), then `+FEATURE`, \
         `-FEATURE` or `FEATURE=on|off` by QEMU's feature names. An unknown model or \
         feature is refused. The guest keeps this CPU when it migrates: a destination \
         whose host lacks one of its features refuses the migration before any page \
         moves, naming the features.",
    ),
    (
        "kernel",
        "FILE",
        "The kernel to boot directly (no option ROM in between): a PVH ELF image, an ELF \
         vmlinux or a bzImage. Without -kernel, a pc guest boots from its disks through \
         the firmware (see -bios).",
    ),
    ("initrd", "FILE", "An initial ramdisk."),
    ("append", "CMDLINE", "The kernel command line."),
    (
        "name",
        "guest=NAME[,...]",
        "The guest's name, as `query-name` reports it.",
    ),
    (
        "uuid",
        "UUID",
        "The guest's UUID, as `query-uuid` reports it and the SMBIOS system UUID.",
    ),
    ("pidfile", "FILE", "Write the process id to FILE."),
    ("display", "none", "Only `none`: ferry-qemu has no display."),
    (
        "boot",
        "OPTS",
        "Accepted: the kernel is booted directly; order= (a, c, d, n; three at most) \
         goes into the RTC's CMOS as on QEMU's pc.",
    ),
    (
        "rtc",
        "base=utc|localtime|DATE[,clock=host|rt|vm][,driftfix=slew|none]",
        "The pc machine's MC146818 RTC: its clock starts at the host's UTC, local time or \
         DATE (2006-06-17 or 2006-06-17T16:01:21) and always runs with the host's wall \
         clock (QEMU's clock=host; rt and vm are accepted and run the same); lost \
         periodic interrupts are dropped (driftfix=slew is accepted and does not \
         reinject them). Other parameters are refused.",
    ),
    (
        "global",
        "DRIVER.PROP=VALUE",
        "Only the S3/S4 and PIT settings libvirt writes for devices ferry models as \
         absent; others are refused.",
    ),
    (
        "overcommit",
        "mem-lock=off|cpu-pm=off",
        "Only the `off` settings are accepted.",
    ),
    ("msg", "timestamp=on|off", "Accepted."),
    (
        "sandbox",
        "on|off[,...]",
        "Accepted but not enforced; a warning says so.",
    ),
    (
        "qmp",
        "unix:PATH,server=on,wait=off",
        "A QMP monitor on a listening unix socket.",
    ),
    (
        "chardev",
        "BACKEND,id=ID[,...]",
        "A character device: `socket` (a listening unix socket, or an inherited fd), \
         `pty`, `file`, `stdio` or `null`; other backends are refused.",
    ),
    (
        "mon",
        "chardev=ID,mode=control",
        "A QMP monitor on chardev ID (a listening unix socket). The human monitor \
         (`mode=readline`) and TCP monitors are refused.",
    ),
    (
        "serial",
        "chardev:ID|pty|stdio|null|file:PATH|none",
        "The next 16550 serial port (COM1 first) and where its output goes.",
    ),
    (
        "add-fd",
        "fd=N,set=N[,opaque=TEXT]",
        "Add an inherited file descriptor to fd set N, for `/dev/fdset/N` paths (a chardev's \
         `path` and `logfile`, a disk's `filename`): ferry-qemu uses the descriptor as passed \
         and never opens the file again, as QEMU.",
    ),
    (
        "object",
        "TYPE,id=ID[,...]",
        "Only `memory-backend-ram` (the `-machine memory-backend`, with `size`), \
         `secret`, and the migration TLS credentials `tls-creds-x509` (`dir`, `endpoint`, \
         `verify-peer`) and `tls-creds-psk` (`dir`, `endpoint`, `username`), loaded at \
         startup as QEMU does and also creatable with QMP `object-add`; name them with \
         the `tls-creds` migration parameter (libvirt's `virsh migrate --tls`). Encrypted \
         keys (`passwordid`), GnuTLS `priority` strings and `tls-authz` are refused; \
         other object types are refused.",
    ),
    (
        "blockdev",
        "OPTS",
        "A block node, in the JSON or `key=value` form: `file` or `host_device` \
         (`filename`, also `/dev/fdset/N` from `-add-fd`), optionally under a `raw` or \
         `qcow2` format node (`file` names it or holds it inline), as libvirt writes them. \
         A `qcow2` node's `backing` names the backing image's `raw` or `qcow2` node (a \
         chain, as libvirt writes it), is `null` (no backing image) or is left out (the \
         backing file the image's header names). Options that change only how the host \
         does I/O (`cache`, `aio`, `discard`, `detect-zeroes`, `locking`, \
         `auto-read-only`, and qcow2's cache sizes, `lazy-refcounts`, `pass-discard-*`, \
         `overlap-check`) are accepted; `read-only` makes the disk read-only. qcow2 \
         external data files (`data-file`) and encryption (`encrypt`) are refused, other \
         formats (`vmdk`, `vdi`, ...) with the fix (`qemu-img convert -O qcow2`), network \
         protocols (`iscsi`, `nbd`, `rbd`, `gluster`, ...) with theirs (attach the storage \
         on the host and give the block device).",
    ),
    (
        "drive",
        "OPTS",
        "A raw or qcow2 image: `file=PATH,format=raw|qcow2` (a qcow2's backing file as \
         its header names it) with `if=none,id=ID` (attached by `-device \
         virtio-blk-pci|ide-hd|ide-cd,drive=ID`), `if=virtio[,addr=SLOT]` or `if=ide` \
         (QEMU's default; `index=N` or `bus=`/`unit=`, `media=cdrom` for a CD-ROM); \
         `readonly`, `cache=none|writeback|unsafe`, `aio`, `discard`, `detect-zeroes`, \
         `file.locking`. A drive without `format=` (ferry does not guess) or without \
         `file=` (an empty CD-ROM), other formats, other interfaces, write-through cache \
         modes and `snapshot=on` are refused.",
    ),
    (
        "device",
        "DRIVER[,PROP=VALUE...]",
        "A device (see DEVICES); any other driver is refused by name.",
    ),
    (
        "netdev",
        "OPTS",
        "`tap` with `fd=N` (what libvirt passes; `vhost=on` and `vhostfd=` are accepted and \
         the vhost fd closed: ferry has no vhost-net and the guest cannot tell) or \
         `ifname=TAP,script=no,downscript=no` (ferry runs no scripts), for `-device \
         virtio-net-pci,netdev=ID`. `user` (ferry has no slirp), the bridge helper, \
         multi-queue taps and other backends are refused with the fix.",
    ),
    (
        "incoming",
        "URI",
        "Wait for an incoming migration: `tcp:HOST:PORT`, `unix:PATH`, `fd:N`, \
         `file:PATH`, `exec:CMD` (the stream is CMD's standard output), or `defer` \
         (then QMP `migrate-incoming`).",
    ),
    ("audiodev", "none,id=ID", "Only the `none` driver."),
    (
        "smbios",
        "type=N,KEY=VALUE[,...]",
        "SMBIOS fields, as libvirt writes them from <sysinfo type='smbios'> with <smbios \
         mode='sysinfo'/>: `type=0` (`vendor`, `version`, `date`, `release`, `uefi`), \
         `type=1` (`manufacturer`, `product`, `version`, `serial`, `uuid`, `sku`, \
         `family`; `uuid` is also the guest's UUID), `type=2` (`manufacturer`, `product`, \
         `version`, `serial`, `asset`, `location`), `type=3` (`manufacturer`, `version`, \
         `serial`, `asset`, `sku`), `type=11` (`value`, repeated). A pc guest always gets \
         the SMBIOS 2.8 tables QEMU 7.2 builds for pc-i440fx-7.2 (booted through \
         firmware: as fw_cfg's etc/smbios files, which SeaBIOS installs; with -kernel: \
         the entry point at 0xf1000, where Linux finds it without EFI), unset fields keeping QEMU's defaults (type 1: \
         QEMU, Standard PC (i440FX + PIIX, 1996) and the machine type as started, \
         pc-i440fx-7.2 for pc, which is also the type 2, 3 and 4 version; type 0: \
         SeaBIOS's); microvm guests get none and refuse the option. Unknown keys are \
         refused with QEMU's error; `file=`, `type=11,path=` and `type=4` or `type=17` \
         fields are refused, named.",
    ),
    ("spice", "OPTS", "Refused, by name."),
    ("vga", "TYPE", "Refused, by name."),
    ("vnc", "DISPLAY", "Refused, by name."),
    (
        "bios",
        "FILE",
        "The firmware a pc guest without -kernel boots through: a path, or a name found \
         in /usr/share/qemu or /usr/share/seabios as QEMU finds it; without -bios, \
         Debian's SeaBIOS (bios-256k.bin), QEMU's default. The image is a read-only ROM \
         ending at 4 GiB, its last 128 KiB also at 0xe0000; fw_cfg gives the firmware the \
         memory map, `bootorder` (from the devices' bootindex, HALT last with -boot \
         strict=on), the SMBIOS tables and, unless -no-acpi, the ACPI tables with QEMU's \
         table loader: RSDP 2.0, RSDT, XSDT, FADT 3, FACS, MADT, DSDT (PCI root bridge \
         with _CRS and _PRT, COM1, RTC, IDE, \\_S5) and WAET, for the PIIX4 power \
         management function at 00:01.3 (PM block at 0x600, where SeaBIOS 1.16 puts it, \
         SCI on IRQ 9). system_powerdown presses its power button; system_reset and a \
         guest reset boot the guest through the firmware again. The ROM migrates with \
         the guest.",
    ),
    ("L", "DIR", "Refused, by name: ferry finds -bios by path or in Debian's directories."),
    ("numa", "OPTS", "Refused, by name."),
    ("fw_cfg", "OPTS", "Refused, by name."),
];

/// Checks that `DESCRIPTIONS` covers `argv::OPTIONS` exactly, in order.
pub fn check_descriptions() -> Result<(), String> {
    let parsed: Vec<&str> = argv::OPTIONS.iter().map(|(n, _)| *n).collect();
    let described: Vec<&str> = DESCRIPTIONS.iter().map(|(n, _, _)| *n).collect();
    for n in &parsed {
        if !described.contains(n) {
            return Err(format!(
                "ferry-qemu option -{n} has no description: add one to DESCRIPTIONS in xtask/src/ferry_qemu.rs"
            ));
        }
    }
    for n in &described {
        if !parsed.contains(n) {
            return Err(format!(
                "xtask/src/ferry_qemu.rs describes -{n}, which ferry-qemu's argv::OPTIONS no longer has"
            ));
        }
    }
    for (name, takes_arg) in argv::OPTIONS {
        let synopsis = DESCRIPTIONS
            .iter()
            .find(|(n, _, _)| n == name)
            .map_or("", |(_, s, _)| *s);
        if *takes_arg == synopsis.is_empty() {
            return Err(format!(
                "-{name}: argv::OPTIONS says it takes an argument: {takes_arg}; fix its synopsis in xtask/src/ferry_qemu.rs"
            ));
        }
    }
    if let Some(r) = REFUSED.iter().find(|r| !parsed.contains(r)) {
        return Err(format!("-{r} is listed as refused but is not parsed"));
    }
    Ok(())
}

fn list(items: &[&str]) -> String {
    items
        .iter()
        .map(|i| format!("`{i}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The machine types from ferry-qemu's table, and what a versioned one means.
fn machine_types() -> String {
    let name = |m: &argv::MachineDef| match (m.alias, m.is_default, m.deprecated) {
        (Some(alias), true, _) => format!("`{}` (`{alias}`, the default)", m.name),
        (_, _, true) => format!("`{}` (deprecated)", m.name),
        _ => format!("`{}`", m.name),
    };
    let names: Vec<String> = MACHINES.iter().map(name).collect();
    let i440fx = MACHINES
        .iter()
        .filter(|m| m.family == MachineType::Pc)
        .count();
    format!(
        "{}. The {i440fx} `pc-i440fx-*` types are QEMU 7.2's, marked as QEMU marks them, \
         so that a domain pinned to the machine type of the QEMU it was created on (Nova \
         keeps it per instance) starts here. They all give the same machine: ferry has one \
         guest ABI, and QEMU's per-version compatibility properties have no counterpart in \
         ferry's devices; only the SMBIOS versions (types 1, 2, 3 and 4) name the type the \
         guest was started with, as QEMU's do. A guest that ran on QEMU with an older type \
         sees ferry's devices when it starts here, not that QEMU version's: it cannot be \
         migrated from QEMU to ferry anyway (the migration streams differ), so it is started \
         afresh. `q35`, `pc-q35-*` and `isapc` are refused at start: ferry has only the \
         i440FX + PIIX chipset (no ICH9 LPC, PCIe root complex or MCFG); use `pc` (Nova: \
         image property `hw_machine_type=pc`, or `[libvirt] hw_machine_type = x86_64=pc`). \
         `query-machines` does not list them, so libvirt does not offer them.",
        names.join(", ")
    )
}

pub fn page() -> Result<String, String> {
    check_descriptions()?;
    let mut doc = Doc::new("ferry-qemu", "1", false);
    doc.sh("NAME");
    doc.raw(
        r"ferry\-qemu \- a QEMU\-compatible command line and QMP monitor over ferry, for libvirt",
    );
    doc.sh("SYNOPSIS");
    doc.raw(r"\fB/usr/libexec/ferry/ferry\-qemu\fR [\fIOPTION\fR [\fIARG\fR]]...");
    doc.sh("DESCRIPTION");
    doc.p(
        "`ferry-qemu` accepts the command line that libvirt writes for QEMU 7.2 and \
         speaks QMP on the monitor sockets libvirt asks for, so that a libvirt domain \
         whose `<emulator>` is `/usr/libexec/ferry/ferry-qemu` runs on ferry's KVM \
         engine. It is installed outside `PATH` so that it never stands in for a real \
         QEMU by accident.",
    );
    doc.p(
        "ferry is not a general-purpose QEMU: guests boot from their disks through \
         SeaBIOS, or a kernel directly, and get RAM, vCPUs, ACPI, 16550 serial ports, virtio-blk disks on raw and qcow2 images, virtio-net \
         NICs on taps, virtio-rng entropy devices and a virtio-balloon. Every option, \
         device or value that \
         ferry-qemu cannot honour is refused with a message naming it; the guest never \
         runs with something silently missing. Options take one dash or two, and the \
         `key=value` and JSON forms QEMU accepts.",
    );
    doc.p("Domains must be `type='kvm'`:");
    doc.example(&[
        "<domain type='kvm'>",
        "  <os><type arch='x86_64' machine='pc'>hvm</type>",
        "    <boot dev='hd'/></os>",
        "  <features><acpi/></features>",
        "  <devices><emulator>/usr/libexec/ferry/ferry-qemu</emulator>",
        "    <disk type='file' device='disk'><source file='/var/lib/ferry/disk.qcow2'/>",
        "      <driver name='qemu' type='qcow2'/><target dev='vda' bus='virtio'/></disk>",
        "    <serial type='pty'/></devices>",
        "</domain>",
    ]);

    doc.sh("OPTIONS");
    for (name, synopsis, what) in DESCRIPTIONS {
        let tag = if synopsis.is_empty() {
            format!(r"\fB\-{}\fR", esc(name))
        } else {
            format!(r"\fB\-{}\fR \fI{}\fR", esc(name), esc(synopsis))
        };
        doc.tp_raw(&tag, what);
    }

    doc.sh("DEVICES");
    doc.tp("Machine types", &machine_types());
    doc.tp("CPU models", &list(CPU_MODELS));
    doc.tp("Modelled devices", &list(MODELLED_DEVICES));
    doc.tp(
        "Accepted and modelled as absent",
        &format!(
            "{}: libvirt adds these by default; the guest sees no such device.",
            list(MODELLED_AS_ABSENT)
        ),
    );
    doc.tp(
        "Disks",
        "`virtio-blk-pci` (modern-only, virtio 1.0) on bus `pci.0` at `addr=SLOT` \
         (function 0), else in the first free slot from 3; `drive`, `serial` (up to 20 \
         bytes), `write-cache=on`, `share-rw`, `bootindex` are accepted. The guest sees \
         VERSION_1, SEG_MAX, BLK_SIZE, FLUSH and RO: asking for more queues, other queue or \
         block sizes, packed rings, EVENT_IDX, DISCARD, WRITE_ZEROES, `write-cache=off`, \
         iothreads or an error policy other than `report` is refused. A migration \
         destination needs the same disks in the same slots (shared storage): the stream \
         is refused otherwise and the source runs on. `query-blockstats` has the requests, \
         bytes and failures the engine counts (times and merges read 0). Images are locked \
         as QEMU locks them (byte-range locks at 100 and 200), so ferry-qemu, ferry-vm, QEMU \
         and `qemu-img` never write one image at once: a disk that writes refuses to share \
         writing unless `share-rw=on` (libvirt's `<shareable/>`), a read-only disk refuses \
         a writer that does not share, and `locking=off` on the protocol node takes no \
         locks. A migration destination takes the locks when it loads the guest, after the \
         source flushed and let go of them; a source that resumes after a failed migration \
         takes them back, and `cont` on a source whose guest runs on the destination fails.",
    );
    doc.tp(
        "IDE drives",
        "`ide-hd` and `ide-cd` on the PIIX3 IDE controller of a `pc` machine (PCI 00:01.1, \
         legacy ports, IRQ 14 and 15, PIO): `bus=ide.0|ide.1`, `unit=0|1` (else the first \
         free place), `drive`, `serial`, `bootindex`, `write-cache=on`. libvirt's `<disk \
         bus='ide'>` becomes one: Nova's config drive is an ISO on an `ide-cd`, read-only, \
         its image locked as a reader. A CD-ROM holds its medium from the start: an empty \
         drive, eject and media change are refused or not offered. The drives, their \
         registers and any transfer in flight migrate with the guest; a destination needs \
         the same drives at the same places.",
    );
    doc.tp(
        "NICs",
        "`virtio-net-pci` (modern-only) on a tap, slots as for disks; `mac` (QEMU's \
         default 52:54:00:12:34:56 and up without it), `bootindex`. The guest sees \
         VERSION_1, MAC and STATUS: offloads, `mq`, other queue sizes, `host_mtu` and \
         option ROMs are refused. A migration destination needs the same NICs in the same \
         slots.",
    );
    doc.tp(
        "Entropy devices",
        "`virtio-rng-pci` (modern-only), slots as for disks, with `rng=ID` naming an \
         `-object rng-random,id=ID[,filename=PATH]` (a file read in order, QEMU's default \
         `/dev/urandom`, opened when the VM is built) or `rng-builtin,id=ID` (the host's \
         getrandom, also what a device without `rng=` gets, as in QEMU 7.2): libvirt's \
         `<rng model='virtio'>` with `<backend model='random'|'builtin'>`. `max-bytes` and \
         `period` are QEMU's rate limit (at most max-bytes bytes per period ms; defaults \
         2^63-1 and 65536), with QEMU's error texts for bad values; the window's state \
         migrates with the guest. `rng-egd` and other backends are refused with the fix. \
         A migration destination needs the device in the same slot (its source file may \
         differ).",
    );
    doc.tp(
        "Balloon",
        "`virtio-balloon-pci` (modern-only, one per guest), slots as for disks: libvirt's \
         `<memballoon model='virtio'>`, with `deflate-on-oom` (`autodeflate`) and \
         `free-page-reporting` (`freePageReporting`) offering their features (QEMU's \
         defaults: off) and `guest-stats-polling-interval`. QMP `balloon` sets the target \
         (QEMU's check and text for a value of 0 or less; above RAM means RAM), \
         `query-balloon` and `BALLOON_CHANGE` report what the guest's driver holds, \
         `qom-get PATH guest-stats` has the guest's statistics by QEMU's names (-1, as a \
         uint64, for those it never sent) and `qom-set PATH guest-stats-polling-interval` \
         sets how often the guest refreshes them, PATH being `/machine/peripheral/ID`. \
         Pages the guest puts in the balloon or reports free go back to the host and read \
         as zeroes, so a migration does not send them. `free-page-hint=on` and \
         `page-poison=on` are refused. The balloon's state migrates with the guest; a \
         destination needs it in the same slot with the same features.",
    );
    doc.tp(
        "Refused",
        "Every other `-device` driver, naming it: host devices (`vfio-pci`, `usb-host`), \
         SCSI controllers and passthrough, USB redirection and displays.",
    );

    doc.sh("QMP COMMANDS");
    doc.p(
        "The monitor implements these commands; `query-commands` and `query-qmp-schema` \
         report the same list. Any other command gets a `CommandNotFound` error.",
    );
    let names: Vec<&str> = COMMANDS.iter().map(|c| c.schema.name).collect();
    doc.raw(".PP");
    doc.raw(&crate::roff::inline(&list(&names)));
    doc.p("Events:");
    let events: Vec<&str> = EVENTS.iter().map(|e| e.name).collect();
    doc.raw(&crate::roff::inline(&list(&events)));

    doc.sh("EXIT STATUS");
    doc.tp(
        "0",
        "The guest powered off or, with `-no-reboot`, reset (both without \
         `-no-shutdown`); QMP `quit`; a termination signal (SIGTERM, SIGINT, SIGHUP: a \
         `SHUTDOWN` event first); `-version` or `-help`. Like QEMU, a guest reset \
         otherwise reboots the guest, and a guest KVM cannot run stops in the \
         `internal-error` state (a `STOP` event) without ending the process.",
    );
    doc.tp(
        &EXIT_FAILURE.to_string(),
        "A command-line or startup error (an unsupported option is named, with a hint), \
         a failed incoming migration, or the `-daemonize` child failed before it was ready.",
    );

    doc.sh("ENVIRONMENT");
    doc.tp(
        "FERRY_QEMU_LOG",
        "Log filter (tracing syntax); logs go to standard error, which libvirt keeps in \
         /var/log/libvirt/qemu/DOMAIN.log.",
    );

    doc.sh("SEE ALSO");
    doc.raw(r"\fBferry\fR(1), \fBferry\-vm\fR(1), \fBferry\-tuning\fR(7), \fBvirsh\fR(1), \fBqemu\fR(1)");
    Ok(doc.finish())
}
