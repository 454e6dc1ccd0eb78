use serde_json::Value;

use super::*;

fn argv(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

fn p(s: &str) -> Result<Invocation, ArgvError> {
    parse(&argv(s))
}

#[test]
fn probe_command_line() {
    let inv = p("-S -no-user-config -nodefaults -nographic -machine none,accel=kvm:tcg \
                 -qmp unix:/tmp/q/qmp.monitor,server=on,wait=off -pidfile /tmp/q/qmp.pid -daemonize")
    .expect("parses");
    assert!(inv.is_probe() && inv.daemonize && inv.start_paused && inv.nodefaults);
    assert_eq!(inv.accel, vec![Accel::Kvm, Accel::Tcg]);
    assert_eq!(
        inv.pidfile.as_deref(),
        Some(std::path::Path::new("/tmp/q/qmp.pid"))
    );
    assert_eq!(inv.monitors.len(), 1);
    let c = &inv.chardevs[0];
    assert_eq!(
        c.backend,
        ChardevBackend::Socket(SocketAddr {
            endpoint: SocketEndpoint::Unix("/tmp/q/qmp.monitor".into()),
            server: true,
            wait: false
        })
    );
    assert_eq!(inv.machine_config().expect("probe ok"), None);
}

#[test]
fn double_dash_spelling_and_errors() {
    let inv = p("--machine pc --m 1G --enable-kvm").expect("parses");
    assert_eq!(inv.memory.expect("mem").size_bytes, 1 << 30);
    assert_eq!(inv.accel, vec![Accel::Kvm]);
    assert_eq!(
        p("-frobnicate").unwrap_err(),
        ArgvError::UnknownOption {
            option: "-frobnicate".into()
        }
    );
    assert_eq!(
        p("-m").unwrap_err(),
        ArgvError::MissingArgument {
            option: "-m".into()
        }
    );
    assert!(matches!(
        p("disk.img").unwrap_err(),
        ArgvError::Positional { .. }
    ));
    assert!(p("-uuid nope").is_err());
    assert!(p("-m 0").is_err());
    assert!(p("-incoming bogus:x").is_err());
}

#[test]
fn memory_and_smp_forms() {
    let m = p("-m size=2G,slots=4,maxmem=8G")
        .expect("parses")
        .memory
        .expect("mem");
    assert_eq!(
        (m.size_bytes, m.slots, m.maxmem_bytes),
        (2 << 30, Some(4), Some(8 << 30))
    );
    assert_eq!(
        p("-m 256").expect("p").memory.expect("m").size_bytes,
        256 << 20
    );
    assert_eq!(
        p("-m 512M").expect("p").memory.expect("m").size_bytes,
        512 << 20
    );
    let s = p("-smp 4,sockets=1,cores=2,threads=2,maxcpus=4")
        .expect("p")
        .smp
        .expect("smp");
    assert_eq!((s.boot_cpus(), s.cores, s.threads), (4, Some(2), Some(2)));
    assert_eq!(
        p("-smp sockets=2,cores=2")
            .expect("p")
            .smp
            .expect("s")
            .boot_cpus(),
        4
    );
    assert!(p("-smp 2,bogus=1").is_err());
    // Hotplug forms parse but are refused by policy.
    let inv = p("-machine pc -accel kvm -m size=1G,slots=2,maxmem=4G");
    assert!(matches!(
        inv.expect("p").machine_config(),
        Err(ArgvError::Unsupported { .. })
    ));
}

#[test]
fn chardev_serial_mon_addfd_incoming() {
    let inv = parse(&[
        "-chardev",
        "socket,id=charmonitor,fd=30,server=on,wait=off",
        "-mon",
        "chardev=charmonitor,id=monitor,mode=control",
        "-chardev",
        "socket,id=s1,path=/tmp/s,,1,server=on,wait=off",
        "-serial",
        "stdio",
        "-serial",
        "file:/tmp/log",
        "-serial",
        "unix:/tmp/ser,server,nowait",
        "-serial",
        "chardev:s1",
        "-add-fd",
        "set=0,fd=31,opaque=serial0-log",
        "-incoming",
        "fd:26",
        "-name",
        "guest=lab1,debug-threads=on",
    ])
    .expect("parses");
    assert_eq!(
        inv.chardevs[0].backend,
        ChardevBackend::Socket(SocketAddr {
            endpoint: SocketEndpoint::Fd(30),
            server: true,
            wait: false
        })
    );
    assert_eq!(
        inv.chardevs[1].backend,
        ChardevBackend::Socket(SocketAddr {
            endpoint: SocketEndpoint::Unix("/tmp/s,1".into()),
            server: true,
            wait: false
        })
    );
    assert_eq!(
        inv.monitors[0],
        MonitorSpec {
            chardev: "charmonitor".into(),
            control: true,
            pretty: false
        }
    );
    assert_eq!(inv.serials.len(), 4);
    assert_eq!(inv.chardevs[2].backend, ChardevBackend::Stdio);
    assert_eq!(
        inv.chardevs[3].backend,
        ChardevBackend::File {
            path: "/tmp/log".into()
        }
    );
    assert_eq!(
        inv.add_fds,
        vec![AddFd {
            set: 0,
            fd: 31,
            opaque: Some("serial0-log".into())
        }]
    );
    assert_eq!(inv.incoming, Some(Incoming::Fd(26)));
    let name = inv.name.expect("name");
    assert_eq!(
        (name.guest.as_deref(), name.debug_threads),
        (Some("lab1"), true)
    );
    for (uri, want) in [
        ("defer", Incoming::Defer),
        ("tcp:[::]:49152", Incoming::Tcp("[::]:49152".into())),
        ("unix:/tmp/m", Incoming::Unix("/tmp/m".into())),
        ("file:/tmp/f", Incoming::File("/tmp/f".into())),
        ("exec:cat f", Incoming::Exec("cat f".into())),
    ] {
        assert_eq!(Incoming::parse(uri), Some(want));
    }
    assert!(p("-add-fd set=0,fd=1").is_err());
    assert!(p("-chardev socket,id=x").is_err());
    assert!(p("-chardev pty,id=a -chardev pty,id=a").is_err());
}

#[test]
fn json_and_keyval_objects() {
    let inv = parse(&[
        "-object",
        r#"{"qom-type":"memory-backend-ram","id":"pc.ram","size":268435456}"#,
        "-object",
        "secret,id=s0,format=raw,file=/k",
        "-device",
        r#"{"driver":"isa-serial","chardev":"c","id":"serial0","index":0}"#,
        "-device",
        "virtio-balloon-pci,id=balloon0",
        "-netdev",
        "tap,fd=33,id=hostnet0,vhost=on",
        "-netdev",
        r#"{"type":"user","id":"hostnet1"}"#,
        "-blockdev",
        r#"{"driver":"file","filename":"/x","node-name":"n1"}"#,
    ])
    .expect("parses");
    assert_eq!(inv.objects[0].kind, "memory-backend-ram");
    assert_eq!(inv.objects[0].props["size"], 268435456);
    assert_eq!(inv.objects[1].id.as_deref(), Some("s0"));
    assert_eq!(inv.devices[0].props["index"], 0);
    assert_eq!(inv.devices[1].kind, "virtio-balloon-pci");
    assert_eq!(inv.netdevs[0].props["fd"], "33");
    assert_eq!(inv.netdevs[1].kind, "user");
    assert_eq!(inv.blockdevs[0].id.as_deref(), Some("n1"));
    assert!(p(r#"-device {"id":"x"}"#).is_err(), "driver is required");
}

#[test]
fn policy_accepts_a_kvm_domain_and_refuses_what_guests_would_notice() {
    let base = "-name guest=t,debug-threads=on -S -machine pc-i440fx-7.2,usb=off,dump-guest-core=off \
                -accel kvm -cpu host -m 256 -smp 2,sockets=1,cores=2,threads=1 -display none \
                -no-user-config -nodefaults -chardev pty,id=charserial0 \
                -device isa-serial,chardev=charserial0,id=serial0,index=0 \
                -kernel /k -initrd /i -append console=ttyS0 -device piix3-usb-uhci,id=usb \
                -rtc base=utc -no-shutdown -boot strict=on -overcommit mem-lock=off -msg timestamp=on";
    let cfg = p(base)
        .expect("parses")
        .machine_config()
        .expect("ok")
        .expect("vm");
    assert_eq!((cfg.mem_bytes, cfg.vcpus), (256 << 20, 2));
    assert_eq!(cfg.serials.len(), 1);
    assert_eq!(cfg.serials[0].chardev.backend, ChardevBackend::Pty);
    assert_eq!(cfg.absent_devices, vec!["usb".to_string()]);
    assert!(cfg.start_paused);
    for (extra, names) in [
        (" -device vfio-pci,host=01:00.0", "vfio-pci"),
        (" -device nvme,serial=x", "nvme"),
        (" -accel tcg", "tcg"),
        (" -global foo.bar=1", "foo.bar"),
        (" -vnc :0", "-vnc"),
        (
            " -object memory-backend-file,id=m,mem-path=/x,size=1G",
            "memory-backend-file",
        ),
        (" -display gtk", "gtk"),
        (" -cpu Skylake-Server", "Skylake-Server"),
        (" -overcommit mem-lock=on", "mem-lock=on"),
    ] {
        let err = p(&format!("{base}{extra}"))
            .expect("parses")
            .machine_config()
            .unwrap_err();
        assert!(
            matches!(err, ArgvError::Unsupported { .. }) && err.to_string().contains(names),
            "{extra}: {err}"
        );
    }
}

/// Issue 17: a Nova instance keeps the machine type it was created with:
/// every pc-i440fx-* of QEMU 7.2 builds ferry's pc machine, its SMBIOS
/// versions naming the type as given (`pc` is pc-i440fx-7.2, as in QEMU).
#[test]
fn versioned_i440fx_machine_types_build_the_pc_machine() {
    for (machine, version) in [
        ("pc-i440fx-7.2", "pc-i440fx-7.2"),
        ("pc", "pc-i440fx-7.2"),
        ("pc-i440fx-4.2", "pc-i440fx-4.2"),
        ("pc-i440fx-2.12", "pc-i440fx-2.12"),
        ("pc-i440fx-2.0", "pc-i440fx-2.0"),
        ("pc-i440fx-1.4", "pc-i440fx-1.4"),
    ] {
        let inv = p(&format!(
            "-machine {machine},usb=off -accel kvm -m 256 -kernel /k"
        ))
        .expect("parses");
        let cfg = inv.machine_config().expect(machine).expect("vm");
        assert_eq!(cfg.machine, crate::backend::MachineType::Pc, "{machine}");
        assert_eq!(cfg.smbios.expect("pc has SMBIOS").machine, version);
        assert_eq!(inv.machine_def().expect("known").name, version);
    }
    let def = machine_def("pc-i440fx-1.4").expect("listed");
    assert!(def.deprecated && !def.is_default && def.alias.is_none());
    let def = machine_def("pc").expect("alias");
    assert!(def.is_default && !def.deprecated && def.name == "pc-i440fx-7.2");
    // A type field given wins over the machine's name, as in QEMU.
    let cfg = p("-machine pc-i440fx-4.2 -accel kvm -kernel /k -smbios type=1,version=9")
        .expect("parses")
        .machine_config()
        .expect("ok")
        .expect("vm");
    let s = cfg.smbios.expect("tables");
    assert_eq!(
        (s.system.version.as_deref(), s.machine.as_str()),
        (Some("9"), "pc-i440fx-4.2")
    );
    for m in MACHINES {
        assert_eq!(m.qom_type, format!("{}-machine", m.name));
    }
}

/// Q35 and isapc are refused at start, saying why and what to use; so is a
/// pc-i440fx-* QEMU 7.2 does not have (a newer QEMU's).
#[test]
fn q35_and_isapc_are_refused_with_the_reason_and_the_fix() {
    let q35 = "-machine: machine type 'MACHINE' is not supported by ferry-qemu: ferry has only \
               the i440FX + PIIX chipset (no ICH9 LPC, PCIe root complex or MCFG): use \
               machine='pc' or a pc-i440fx-* type (Nova: image property hw_machine_type=pc, \
               or [libvirt] hw_machine_type = x86_64=pc in nova.conf)";
    for (machine, want) in [
        ("q35", q35),
        ("pc-q35-7.2", q35),
        ("pc-q35-4.0.1", q35),
        (
            "isapc",
            "-machine: machine type 'isapc' is not supported by ferry-qemu: ferry has no \
             ISA-only machine",
        ),
        (
            "pc-i440fx-8.0",
            "-machine: machine type 'pc-i440fx-8.0' is not supported by ferry-qemu: \
             ferry-qemu has QEMU 7.2's i440FX machine types, pc-i440fx-7.2 down to \
             pc-i440fx-1.4",
        ),
        (
            "virt",
            "-machine: machine type 'virt' is not supported by ferry-qemu",
        ),
    ] {
        let inv = p(&format!(
            "-machine {machine},usb=off -accel kvm -m 256 -kernel /k"
        ))
        .expect("parses");
        let err = inv.machine_config().unwrap_err();
        let want = want.replace("MACHINE", machine);
        assert!(err.to_string().starts_with(&want), "{machine}: {err}");
        assert_eq!(inv.machine_def().unwrap_err(), err);
    }
    assert!(machine_def("q35").is_none() && machine_def("isapc").is_none());
}

/// Every command line libvirt 9.0 generated in the reference lab parses;
/// the policy outcome is pinned per line.
#[test]
fn reference_command_lines() {
    let fixtures = include_str!("../../tests/fixtures/libvirt-argv.jsonl");
    let mut n = 0;
    for line in fixtures.lines() {
        let v: Value = serde_json::from_str(line).expect("fixture JSON");
        let source = v["source"].as_str().expect("source");
        let args: Vec<String> = v["argv"]
            .as_array()
            .expect("argv")
            .iter()
            .map(|a| a.as_str().expect("str").to_string())
            .collect();
        let inv = parse(&args[1..]).unwrap_or_else(|e| panic!("{source}: {e}"));
        let outcome = match inv.machine_config() {
            Ok(None) => "probe".to_string(),
            Ok(Some(_)) => "accept".to_string(),
            Err(e) => e.to_string(),
        };
        if inv.is_probe() {
            assert_eq!(outcome, "probe", "{source}");
        } else {
            // The lab ran TCG domains (`-accel tcg`); ferry refuses TCG, and
            // with `-accel kvm` the lab1-style line is accepted.
            assert!(outcome.contains("accelerator 'tcg'"), "{source}: {outcome}");
            let kvm: Vec<String> = args[1..]
                .iter()
                .map(|a| if a == "tcg" { "kvm".into() } else { a.clone() })
                .collect();
            let kvm_outcome = match parse(&kvm).expect("parses").machine_config() {
                Ok(_) => "accept".to_string(),
                Err(e) => e.to_string(),
            };
            let want = expected_with_kvm(source);
            assert!(
                kvm_outcome.contains(want),
                "{source}: got {kvm_outcome}, want {want}"
            );
        }
        n += 1;
    }
    assert_eq!(n, 30);
}

/// What ferry says about each reference domain once it asks for KVM.
fn expected_with_kvm(source: &str) -> &'static str {
    let lab = source.split('/').nth(1).unwrap_or_default();
    match lab.split('.').next().unwrap_or_default() {
        // `argv` = wrap/argv.log#3, the lab11 domain started through the wrapper.
        "lab1" | "lab11" | "argv" => "accept",
        // The disk is fine; the NIC is user-mode networking.
        "lab2" => {
            "-netdev: user-mode networking ('hostnet0') is not supported by ferry-qemu: \
                   ferry has no slirp"
        }
        // A raw file / block device on virtio-blk.
        "lab3" => "accept",
        "lab4" if source == "hosta/lab4.log#1" => "device 'virtio-scsi-pci'",
        "lab4" => "accept",
        "lab5" | "lab6" => "network storage (driver 'iscsi') of block node",
        "lab8spice" => "-spice",
        "lab9tcp" => "usb-redir",
        "lab10" => "nvme",
        other => panic!("no expectation for {other}"),
    }
}

/// A KVM domain as libvirt 9.0 writes it, without disks (lab2's other lines).
const DOMAIN: &str = "-S -machine pc-i440fx-7.2,usb=off -accel kvm -cpu host -m 256 -nodefaults \
                      -kernel /k -device piix3-usb-uhci,id=usb,bus=pci.0,addr=0x1.0x2";

/// `DOMAIN` plus `extra` (whole arguments, JSON included) → the disks.
fn disks_of(extra: &[&str]) -> Result<Vec<crate::backend::DiskConfig>, ArgvError> {
    let mut args = argv(DOMAIN);
    args.extend(extra.iter().map(|s| s.to_string()));
    Ok(parse(&args)?.machine_config()?.expect("vm").disks)
}

const LAB2_STORAGE: &str = r#"{"driver":"file","filename":"/tmp/lab-libvirt/shared/lab2.raw","node-name":"libvirt-1-storage","cache":{"direct":true,"no-flush":false},"auto-read-only":true,"discard":"unmap"}"#;
const LAB2_FORMAT: &str = r#"{"node-name":"libvirt-1-format","read-only":false,"cache":{"direct":true,"no-flush":false},"driver":"raw","file":"libvirt-1-storage"}"#;
const LAB2_DEVICE: &str = r#"{"driver":"virtio-blk-pci","bus":"pci.0","addr":"0x3","drive":"libvirt-1-format","id":"virtio-disk0","bootindex":1,"write-cache":"on"}"#;
const BALLOON_AT_4: &str =
    r#"{"driver":"virtio-balloon-pci","id":"balloon0","bus":"pci.0","addr":"0x4"}"#;

#[test]
fn libvirt_blockdev_disk_as_in_the_lab() {
    let d = disks_of(&[
        "-blockdev",
        LAB2_STORAGE,
        "-blockdev",
        LAB2_FORMAT,
        "-device",
        LAB2_DEVICE,
        "-device",
        BALLOON_AT_4,
    ])
    .expect("accepted");
    assert_eq!(d.len(), 1);
    let d = &d[0];
    assert_eq!(d.id.as_deref(), Some("virtio-disk0"));
    assert_eq!(d.slot, 3);
    assert_eq!(d.filename, "/tmp/lab-libvirt/shared/lab2.raw");
    assert_eq!(
        d.image,
        ferry_vmm::devices::virtio::blk::BlockImage::Path(d.filename.clone().into())
    );
    assert!(!d.read_only);
    assert_eq!(d.serial, None);
    assert_eq!(d.backend_name, "");
    assert_eq!(d.format_node.as_deref(), Some("libvirt-1-format"));
    assert_eq!(d.storage_node, "libvirt-1-storage");
    assert_eq!(d.storage_driver, "file");
}

#[test]
fn block_devices_fdsets_read_only_serial_and_a_device_on_the_protocol_node() {
    let d = disks_of(&[
        "-blockdev",
        r#"{"driver":"host_device","filename":"/dev/loop0","node-name":"libvirt-2-storage","auto-read-only":true,"discard":"unmap","aio":"native","locking":"off"}"#,
        "-blockdev",
        r#"{"node-name":"libvirt-2-format","read-only":true,"driver":"raw","file":"libvirt-2-storage"}"#,
        "-device",
        r#"{"driver":"virtio-blk-pci","bus":"pci.0","addr":"0x5","drive":"libvirt-2-format","id":"virtio-disk1","serial":"DISK-1","share-rw":true,"num-queues":1,"queue-size":256,"event_idx":false}"#,
        "-add-fd",
        "set=3,fd=40",
        "-blockdev",
        "driver=file,filename=/dev/fdset/3,node-name=n3,cache.direct=on",
        "-device",
        "virtio-blk-pci-non-transitional,drive=n3,id=virtio-disk2,addr=06.0,write-cache=auto",
    ])
    .expect("accepted");
    assert_eq!(d.len(), 2);
    assert_eq!(
        (d[0].slot, d[0].read_only, d[0].serial.as_deref()),
        (5, true, Some("DISK-1"))
    );
    assert_eq!(d[0].storage_driver, "host_device");
    // share-rw (libvirt's <shareable/>) shares writing in the image lock;
    // locking=off takes none, as in QEMU; by default both lock, unshared.
    assert_eq!((d[0].shared, d[0].locking), (true, false));
    assert_eq!((d[1].shared, d[1].locking), (false, true));
    assert_eq!((d[1].slot, d[1].filename.as_str()), (6, "/dev/fdset/3"));
    assert_eq!(d[1].format_node, None);
    assert_eq!(d[1].storage_node, "n3");
    // An inline protocol node under raw, as hand-written JSON does it.
    let d = disks_of(&[
        "-blockdev",
        r#"{"driver":"raw","node-name":"disk","file":{"driver":"file","filename":"/img"}}"#,
        "-device",
        "virtio-blk-pci,drive=disk",
    ])
    .expect("accepted");
    assert_eq!((d[0].filename.as_str(), d[0].slot), ("/img", 3));
    assert_eq!(d[0].id, None);
}

#[test]
fn drive_forms_by_hand_and_slots_around_other_devices() {
    let d = disks_of(&[
        "-device",
        r#"{"driver":"virtio-balloon-pci","id":"balloon0","bus":"pci.0","addr":"0x3"}"#,
        "-drive",
        "file=/a,,b.img,format=raw,if=none,id=drive0,cache=none,aio=native,discard=unmap",
        "-device",
        "virtio-blk-pci,drive=drive0,id=disk0",
        "-drive",
        "file=/c.img,format=raw,if=virtio,readonly=on",
        "-drive",
        "file=/d.img,format=raw,if=virtio,addr=0x9",
    ])
    .expect("accepted");
    assert_eq!(d.len(), 3);
    // The balloon holds 3: the first free slots are 4 and 5.
    assert_eq!(
        (
            d[0].slot,
            d[0].filename.as_str(),
            d[0].backend_name.as_str()
        ),
        (4, "/a,b.img", "drive0")
    );
    assert_eq!(d[0].id.as_deref(), Some("disk0"));
    assert_eq!(
        (d[1].slot, d[1].read_only, d[1].id.as_deref()),
        (5, true, None)
    );
    assert_eq!(d[2].slot, 9);
    assert!(d.iter().all(|d| d.locking && !d.shared));
    let d = disks_of(&[
        "-drive",
        "file=/e.img,format=raw,if=none,id=drive0,file.locking=off",
        "-device",
        "virtio-blk-pci,drive=drive0,share-rw=on",
    ])
    .expect("accepted");
    assert_eq!((d[0].shared, d[0].locking), (true, false));
    assert!(d[0]
        .format_node
        .as_deref()
        .is_some_and(|n| n.starts_with("#block")));
}

/// Every refusal names the option and what to do.
/// libvirt 9.0's -blockdev nodes for a Nova disk: a qcow2 over a raw
/// `_base`, with `cache='none'`.
const NOVA_CHAIN: [&str; 4] = [
    r#"{"driver":"file","filename":"/var/lib/nova/instances/_base/abc","node-name":"libvirt-2-storage","cache":{"direct":true,"no-flush":false},"auto-read-only":true,"discard":"unmap"}"#,
    r#"{"node-name":"libvirt-2-format","read-only":true,"cache":{"direct":true,"no-flush":false},"driver":"raw","file":"libvirt-2-storage"}"#,
    r#"{"driver":"file","filename":"/var/lib/nova/instances/UUID/disk","node-name":"libvirt-1-storage","cache":{"direct":true,"no-flush":false},"auto-read-only":true,"discard":"unmap"}"#,
    r#"{"node-name":"libvirt-1-format","read-only":false,"cache":{"direct":true,"no-flush":false},"discard":"unmap","driver":"qcow2","file":"libvirt-1-storage","backing":"libvirt-2-format"}"#,
];
const NOVA_DEVICE: &str =
    "virtio-blk-pci,bus=pci.0,addr=0x3,drive=libvirt-1-format,id=virtio-disk0,bootindex=1";

/// `-blockdev` for each of `nodes`, then `-device` for each of `devices`.
fn blockdevs(
    nodes: &[&str],
    devices: &[&str],
) -> Result<Vec<crate::backend::DiskConfig>, ArgvError> {
    let mut args = Vec::new();
    for n in nodes {
        args.extend(["-blockdev", n]);
    }
    for d in devices {
        args.extend(["-device", d]);
    }
    disks_of(&args)
}

fn qcow2_over(backing: Backing) -> ImageFormat {
    ImageFormat::Qcow2 { backing }
}

fn layer(path: &str, format: ImageFormat) -> Backing {
    Backing::Image(Box::new(Layer {
        image: BlockImage::Path(path.into()),
        format,
    }))
}

use ferry_vmm::devices::virtio::blk::{Backing, BlockImage, ImageFormat, Layer};

#[test]
fn qcow2_chains_as_libvirt_and_by_hand() {
    // libvirt's explicit chain: qcow2 over raw.
    let d = blockdevs(&NOVA_CHAIN, &[NOVA_DEVICE]).expect("accepted");
    assert_eq!(d.len(), 1);
    let d = &d[0];
    assert_eq!(d.filename, "/var/lib/nova/instances/UUID/disk");
    assert_eq!(
        d.format,
        qcow2_over(layer("/var/lib/nova/instances/_base/abc", ImageFormat::Raw))
    );
    assert!(!d.read_only);
    assert_eq!(d.format_node.as_deref(), Some("libvirt-1-format"));
    assert_eq!(d.storage_node, "libvirt-1-storage");
    assert_eq!(
        d.backing_nodes,
        vec![crate::backend::BackingNodes {
            format_node: "libvirt-2-format".into(),
            storage_node: "libvirt-2-storage".into(),
            storage_driver: "file".into(),
            filename: "/var/lib/nova/instances/_base/abc".into(),
            storage_read_only: false,
        }]
    );

    // qcow2 over qcow2 over raw, with qcow2's host-only tuning.
    let d = blockdevs(
        &[
            "driver=file,filename=/b.raw,node-name=s3,read-only=on",
            "driver=raw,node-name=f3,file=s3,read-only=on",
            "driver=file,filename=/m.qcow2,node-name=s2",
            r#"{"driver":"qcow2","node-name":"f2","file":"s2","backing":"f3","read-only":true,"lazy-refcounts":true,"l2-cache-size":1048576,"overlap-check":{"template":"all"}}"#,
            r#"{"driver":"qcow2","node-name":"f1","file":{"driver":"file","filename":"/t.qcow2"},"backing":"f2","pass-discard-request":true,"cache-clean-interval":600,"refcount-cache-size":65536,"detect-zeroes":"unmap","force-share":false}"#,
        ],
        &["virtio-blk-pci,drive=f1,id=d0"],
    )
    .expect("accepted");
    assert_eq!(
        d[0].format,
        qcow2_over(layer(
            "/m.qcow2",
            qcow2_over(layer("/b.raw", ImageFormat::Raw))
        ))
    );
    assert_eq!(d[0].filename, "/t.qcow2");
    assert_eq!(d[0].storage_node, "f1-file");
    let names: Vec<_> = d[0]
        .backing_nodes
        .iter()
        .map(|n| {
            (
                n.format_node.as_str(),
                n.storage_node.as_str(),
                n.storage_read_only,
            )
        })
        .collect();
    assert_eq!(names, vec![("f2", "s2", false), ("f3", "s3", true)]);

    // "backing":null: no backing image; no backing at all: the header's.
    let mut alone = NOVA_CHAIN[2..].to_vec();
    let null = NOVA_CHAIN[3].replace(r#""backing":"libvirt-2-format""#, r#""backing":null"#);
    alone[1] = &null;
    let d = blockdevs(&alone, &[NOVA_DEVICE]).expect("accepted");
    assert_eq!(d[0].format, qcow2_over(Backing::None));
    assert!(d[0].backing_nodes.is_empty());
    let absent = NOVA_CHAIN[3].replace(r#","backing":"libvirt-2-format""#, "");
    alone[1] = &absent;
    let d = blockdevs(&alone, &[NOVA_DEVICE]).expect("accepted");
    assert_eq!(d[0].format, qcow2_over(Backing::FromHeader));
    // key=value: an empty backing is null, as in QEMU.
    let d = blockdevs(
        &["driver=qcow2,node-name=q,file.filename=/q.qcow2,backing="],
        &["virtio-blk-pci,drive=q"],
    )
    .expect("accepted");
    assert_eq!(d[0].format, qcow2_over(Backing::None));

    // -drive format=qcow2 follows the header, as QEMU's -drive does.
    let d = disks_of(&[
        "-drive",
        "file=/x.qcow2,format=qcow2,if=none,id=drive0,cache=none",
        "-device",
        "virtio-blk-pci,drive=drive0,id=disk0",
        "-drive",
        "file=/y.qcow2,format=qcow2,if=virtio,readonly=on",
    ])
    .expect("accepted");
    assert_eq!(d[0].format, qcow2_over(Backing::FromHeader));
    assert_eq!(d[1].format, qcow2_over(Backing::FromHeader));
    assert!(d[1].read_only);
    // raw stays raw.
    let d = blockdevs(&[LAB2_STORAGE, LAB2_FORMAT], &[LAB2_DEVICE]).expect("accepted");
    assert_eq!(d[0].format, ImageFormat::Raw);
}

#[test]
fn qcow2_refusals_name_the_node_and_the_fix() {
    let top = |extra: &str| {
        format!(
            r#"{{"node-name":"libvirt-1-format","driver":"qcow2","file":"libvirt-1-storage"{extra}}}"#
        )
    };
    let cases = [
        (
            top(r#","data-file":"libvirt-3-storage""#),
            "-blockdev: an external data file ('data-file' of block node 'libvirt-1-format') is \
             not supported by ferry-qemu: ferry serves qcow2 images that hold their own data",
        ),
        (
            top(
                r#","encrypt":{"format":"luks","key-secret":"libvirt-1-format-encryption-secret0"}"#,
            ),
            "-blockdev: an encrypted qcow2 image ('encrypt.format' of block node \
             'libvirt-1-format') is not supported by ferry-qemu: ferry reads no encrypted images",
        ),
        (
            top(r#","backing":"libvirt-9-format""#),
            "-blockdev libvirt-1-format: Could not open backing file: Cannot find \
             device='libvirt-9-format' nor node-name='libvirt-9-format'",
        ),
        (
            top(r#","backing":"libvirt-1-format""#),
            "-blockdev libvirt-1-format: Making 'libvirt-1-format' a backing child of \
             'libvirt-1-format' would create a cycle",
        ),
        (
            top(r#","backing":"libvirt-1-storage""#),
            "protocol node 'libvirt-1-storage' as the backing image of block node \
             'libvirt-1-format' is not supported by ferry-qemu: give the backing image its own",
        ),
        (
            top(r#","backing":{"driver":"raw","file":"libvirt-1-storage"}"#),
            "an inline backing image ('backing.driver' of block node 'libvirt-1-format')",
        ),
        (top(r#","lazy-refcounts":"maybe""#), "lazy-refcounts"),
        (
            top(r#","frobnicate":1"#),
            "property 'frobnicate' of block node 'libvirt-1-format' (driver 'qcow2')",
        ),
    ];
    for (node, want) in cases {
        let err = blockdevs(&[NOVA_CHAIN[2], &node], &[NOVA_DEVICE])
            .expect_err(want)
            .to_string();
        assert!(err.contains(want), "{node}:\n got  {err}\n want {want}");
    }
    // A cycle through two nodes, and a backing of another format.
    let a = r#"{"node-name":"a","driver":"qcow2","file":{"driver":"file","filename":"/a"},"backing":"b"}"#;
    let b = r#"{"node-name":"b","driver":"qcow2","file":{"driver":"file","filename":"/b"},"backing":"a"}"#;
    let err = blockdevs(&[a, b], &["virtio-blk-pci,drive=a"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a backing child of") && err.contains("would create a cycle"),
        "{err}"
    );
    let v = r#"{"node-name":"v","driver":"vmdk","file":{"driver":"file","filename":"/v"}}"#;
    let q = r#"{"node-name":"q","driver":"qcow2","file":{"driver":"file","filename":"/q"},"backing":"v"}"#;
    let err = blockdevs(&[v, q], &["virtio-blk-pci,drive=q"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("disk format 'vmdk' of block node 'v'"),
        "{err}"
    );
}

#[test]
fn disk_and_nic_refusals() {
    let vmdk = r#"{"node-name":"libvirt-1-format","read-only":false,"driver":"vmdk","file":"libvirt-1-storage"}"#;
    let iscsi = r#"{"driver":"iscsi","portal":"10.77.0.1:3260","target":"iqn.2026-11.lab:lun1","lun":1,"transport":"tcp","node-name":"libvirt-1-storage"}"#;
    let dev = |extra: &str| {
        format!(
            r#"{{"driver":"virtio-blk-pci","bus":"pci.0","drive":"libvirt-1-format","id":"virtio-disk0"{extra}}}"#
        )
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["-blockdev".into(), LAB2_STORAGE.into(), "-blockdev".into(), vmdk.into()],
            "-blockdev: disk format 'vmdk' of block node 'libvirt-1-format' is not supported by \
             ferry-qemu: ferry serves raw and qcow2 images and block devices only: convert the \
             image with `qemu-img convert -O qcow2 IMAGE IMAGE.qcow2`",
        ),
        (
            vec!["-blockdev".into(), iscsi.into()],
            "-blockdev: network storage (driver 'iscsi') of block node 'libvirt-1-storage' is not \
             supported by ferry-qemu: ferry serves local raw and qcow2 images and block devices \
             only: attach the storage on the host (iscsiadm for iSCSI",
        ),
        (
            vec![
                "-blockdev".into(),
                r#"{"driver":"copy-on-read","node-name":"cor","file":"libvirt-1-format"}"#.into(),
            ],
            "-blockdev: block driver 'copy-on-read' of block node 'cor' is not supported by \
             ferry-qemu: ferry serves raw and qcow2 images and block devices only: a `file` or \
             `host_device` node",
        ),
        (
            vec!["-drive".into(), "file=nbd:host:10809,format=raw,if=virtio".into()],
            "-drive: network storage (driver 'nbd')",
        ),
        (
            vec!["-drive".into(), "file=/x.vdi,format=vdi,if=virtio".into()],
            "-drive: disk format 'vdi' of block node 'virtio0-hd0'",
        ),
        (
            vec!["-drive".into(), "file=/x.img,if=virtio".into()],
            "add format=raw or format=qcow2",
        ),
        (
            vec!["-drive".into(), "file=/x.img,format=raw,if=scsi".into()],
            "-drive: interface 'scsi' (drive 'scsi0-hd0') is not supported by ferry-qemu: ferry's \
             disks are virtio-blk or IDE",
        ),
        (
            vec!["-drive".into(), "file=/x.img,format=raw,if=virtio,cache=writethrough".into()],
            "a write-through disk (writethrough) is not supported by ferry-qemu: ferry's \
             virtio-blk shows the guest a write-back cache it flushes: use cache='none' or \
             'writeback'",
        ),
        (
            vec!["-drive".into(), "file=/x.img,format=raw,if=virtio,snapshot=on".into()],
            "snapshot=on",
        ),
        (
            vec!["-drive".into(), "file=/x.img,format=raw,if=virtio,throttling.iops-total=5".into()],
            "-drive: parameter 'throttling.iops-total'",
        ),
        (
            vec![
                "-blockdev".into(),
                r#"{"driver":"raw","node-name":"f","offset":512,"file":{"driver":"file","filename":"/i"}}"#.into(),
            ],
            "raw 'offset' of block node 'f' (a window of the image",
        ),
    ];
    let lab2_with = |device: String| {
        vec![
            "-blockdev".to_string(),
            LAB2_STORAGE.into(),
            "-blockdev".into(),
            LAB2_FORMAT.into(),
            "-device".into(),
            device,
        ]
    };
    let device_cases = [
        (dev(r#","bus":"pci.1""#), "bus 'pci.1' (virtio-disk0) is not supported by ferry-qemu: ferry has one PCI bus, pci.0"),
        (dev(r#","addr":"0x4.0x1""#), "PCI function 1 for virtio-disk0"),
        (dev(r#","addr":"0x1""#), "slot 1 function 0 not available, in use by PIIX3"),
        (dev(r#","num-queues":4"#), "virtio-blk num-queues=4 (ferry's virtio-blk has one request queue)"),
        (dev(r#","packed":true"#), "virtio-blk packed=on"),
        (dev(r#","event_idx":"on""#), "virtio-blk event_idx=on"),
        (dev(r#","discard":true"#), "virtio-blk discard=on"),
        (dev(r#","queue-size":1024"#), "queue-size=1024"),
        (dev(r#","logical_block_size":4096"#), "logical_block_size=4096"),
        (dev(r#","iothread":"iothread1""#), "iothread 'iothread1' is not supported by ferry-qemu: ferry runs disk requests without iothreads"),
        (dev(r#","write-cache":"off""#), "a write-through disk (write-cache=off)"),
        (dev(r#","werror":"stop""#), "werror=stop is not supported by ferry-qemu: ferry reports I/O errors to the guest"),
        (dev(r#","serial":"123456789012345678901""#), "virtio-blk carries 20 bytes"),
        (dev(r#","multifunction":true"#), "multifunction=on"),
        (dev(r#","disable-modern":true"#), "modern-only"),
        (dev(r#","frobnicate":1"#), "virtio-blk-pci property 'frobnicate'"),
        (
            r#"{"driver":"virtio-blk-pci-transitional","drive":"libvirt-1-format"}"#.to_string(),
            "device 'virtio-blk-pci-transitional' is not supported by ferry-qemu: ferry's virtio \
             devices are modern-only",
        ),
    ];
    let mut all: Vec<(Vec<String>, String)> =
        cases.into_iter().map(|(a, w)| (a, w.to_string())).collect();
    all.extend(
        device_cases
            .into_iter()
            .map(|(d, w)| (lab2_with(d), w.to_string())),
    );
    // The balloon holds slot 4 (libvirt's lab2 layout): a disk may not.
    let mut taken = lab2_with(dev(r#","addr":"0x4""#));
    taken.extend(["-device".to_string(), BALLOON_AT_4.into()]);
    all.push((
        taken,
        "slot 4 function 0 not available, in use by virtio-balloon-pci,id=balloon0".into(),
    ));
    all.push((
        vec![
            "-netdev".into(),
            r#"{"type":"user","id":"hostnet0"}"#.into(),
        ],
        "-netdev: user-mode networking ('hostnet0') is not supported by ferry-qemu: ferry has \
         no slirp: use a bridge or tap interface (<interface type='bridge'|'network'|'ethernet'>)"
            .into(),
    ));
    for (extra, want) in all {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let err = disks_of(&extra).expect_err(&want).to_string();
        assert!(err.contains(&want), "{extra:?}:\n got  {err}\n want {want}");
        assert!(
            matches!(
                disks_of(&extra),
                Err(ArgvError::Unsupported { .. }
                    | ArgvError::UnsupportedBecause { .. }
                    | ArgvError::Invalid { .. })
            ),
            "{err}"
        );
    }
    // Dangling references and a drive used twice are command-line errors.
    assert!(disks_of(&["-device", "virtio-blk-pci,drive=nope"])
        .unwrap_err()
        .to_string()
        .contains("Cannot find device='nope' nor node-name='nope'"));
    assert!(disks_of(&["-device", "virtio-blk-pci,id=x"])
        .unwrap_err()
        .to_string()
        .contains("drive property not set"));
    let twice = disks_of(&[
        "-drive",
        "file=/x,format=raw,if=none,id=d0",
        "-device",
        "virtio-blk-pci,drive=d0",
        "-device",
        "virtio-blk-pci,drive=d0",
    ]);
    assert!(twice.unwrap_err().to_string().contains("already in use"));
}

/// `DOMAIN` plus `extra` → the NICs (checked, with slots), past the disks.
fn nics_of(extra: &[&str]) -> Result<Vec<super::NicConfig>, ArgvError> {
    let mut args = argv(DOMAIN);
    args.extend(extra.iter().map(|s| s.to_string()));
    let inv = parse(&args)?;
    let placed: Vec<(u8, String)> = inv
        .disks(true)?
        .iter()
        .map(|d| (d.slot, d.id.clone().unwrap_or_default()))
        .collect();
    inv.nics(true, &placed)
}

#[test]
fn nic_forms_libvirt_and_by_hand() {
    // lab2's layout with a tap instead of user networking.
    let n = nics_of(&[
        "-blockdev",
        LAB2_STORAGE,
        "-blockdev",
        LAB2_FORMAT,
        "-device",
        LAB2_DEVICE,
        "-netdev",
        r#"{"type":"tap","fd":"33","vhost":true,"vhostfd":"35","id":"hostnet0"}"#,
        "-device",
        r#"{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"52:54:00:12:34:56","bus":"pci.0","addr":"0x2"}"#,
        "-device",
        BALLOON_AT_4,
    ])
    .expect("accepted");
    assert_eq!(
        n,
        vec![super::NicConfig {
            id: Some("net0".into()),
            slot: 2,
            netdev: "hostnet0".into(),
            tap: super::TapSource::Fd(33),
            mac: "52:54:00:12:34:56".into(),
            vhost_fds: vec![35],
        }]
    );
    // By hand: the disk takes slot 3, the NIC the next free one, QEMU's MAC.
    let n = nics_of(&[
        "-drive",
        "file=/d.img,format=raw,if=virtio",
        "-netdev",
        "tap,id=n1,ifname=tap0,script=no,downscript=no,vnet_hdr=on",
        "-device",
        "virtio-net-pci,netdev=n1,csum=off,mrg_rxbuf=off",
    ])
    .expect("accepted");
    assert_eq!(
        (n[0].slot, &n[0].tap, n[0].mac.as_str()),
        (
            4,
            &super::TapSource::Ifname("tap0".into()),
            "52:54:00:12:34:56"
        )
    );
    for (extra, want) in [
        (
            vec!["-netdev", "tap,id=n1,ifname=tap0"],
            "script=the default /etc/qemu-if* ('n1') is not supported by ferry-qemu: ferry \
             runs no scripts",
        ),
        (vec!["-netdev", "tap,id=n1"], "a tap without fd= or ifname="),
        (
            vec!["-netdev", "tap,id=n1,fd=33,queues=2"],
            "a multi-queue tap",
        ),
        (vec!["-netdev", "tap,id=n1,fds=33:34"], "a multi-queue tap"),
        (vec!["-netdev", "tap,id=n1,br=virbr0"], "the bridge helper"),
        (
            vec!["-netdev", "tap,id=n1,fd=33,ifname=t"],
            "ifname= is invalid with fd=",
        ),
        (
            vec!["-netdev", "socket,id=n1,listen=:1234"],
            "network backend 'socket' ('n1') is not supported by ferry-qemu: ferry's NICs sit \
             on a tap",
        ),
        (
            vec![
                "-netdev",
                "tap,id=n1,fd=33",
                "-device",
                "virtio-net-pci,netdev=n1,mac=01:00:5e:00:00:01",
            ],
            "a multicast MAC",
        ),
        (
            vec![
                "-netdev",
                "tap,id=n1,fd=33",
                "-device",
                "virtio-net-pci,netdev=n1,csum=on",
            ],
            "virtio-net csum=on (ferry's virtio-net offers VERSION_1, MAC and STATUS only)",
        ),
        (
            vec![
                "-netdev",
                "tap,id=n1,fd=33",
                "-device",
                "virtio-net-pci,netdev=n1,mq=on",
            ],
            "virtio-net mq=on",
        ),
        (
            vec![
                "-netdev",
                "tap,id=n1,fd=33",
                "-device",
                "virtio-net-pci,netdev=n1,host_mtu=9000",
            ],
            "virtio-net host_mtu=9000",
        ),
        (
            vec!["-device", "virtio-net-pci,netdev=nope,id=net0"],
            "Property 'netdev' can't find value 'nope'",
        ),
        (
            vec![
                "-netdev",
                "tap,id=n1,fd=33",
                "-device",
                "virtio-net-pci,netdev=n1,addr=0x5",
                "-drive",
                "file=/d,format=raw,if=none,id=d0",
                "-device",
                "virtio-blk-pci,drive=d0,addr=0x5",
            ],
            "slot 5 function 0 not available, in use by virtio-net-pci",
        ),
    ] {
        let err = nics_of(&extra).expect_err(want).to_string();
        assert!(err.contains(want), "{extra:?}:\n got  {err}\n want {want}");
    }
}

/// `DOMAIN` plus `extra` → the entropy devices, through the whole policy.
fn rngs_of(extra: &[&str]) -> Result<Vec<super::RngDeviceConfig>, ArgvError> {
    let mut args = argv(DOMAIN);
    args.extend(extra.iter().map(|s| s.to_string()));
    Ok(parse(&args)?.machine_config()?.expect("vm").rngs)
}

#[test]
fn rng_forms_libvirt_and_by_hand() {
    use ferry_vmm::devices::virtio::rng::{RngConfig, RngSource};
    // libvirt 9.0's <rng model='virtio'><rate period='1000' bytes='1024'/>
    // <backend model='random'>/dev/urandom</backend></rng>, beside a NIC.
    let r = rngs_of(&[
        "-netdev",
        r#"{"type":"tap","fd":"33","id":"hostnet0"}"#,
        "-device",
        r#"{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"52:54:00:12:34:56","bus":"pci.0","addr":"0x3"}"#,
        "-object",
        r#"{"qom-type":"rng-random","id":"objrng0","filename":"/dev/urandom"}"#,
        "-device",
        r#"{"driver":"virtio-rng-pci","rng":"objrng0","id":"rng0","max-bytes":1024,"period":1000,"bus":"pci.0","addr":"0x6"}"#,
    ])
    .expect("accepted");
    assert_eq!(
        r,
        vec![super::RngDeviceConfig {
            id: Some("rng0".into()),
            slot: 6,
            backend: Some("objrng0".into()),
            config: RngConfig {
                source: RngSource::File("/dev/urandom".into()),
                max_bytes: 1024,
                period_ms: 1000,
            },
        }]
    );
    // What libvirt 9.0 really writes for ferry-qemu (key=value; seen in the
    // libvirt_runs_a_ferry_qemu_domain lab): the same device.
    let kv = rngs_of(&[
        "-object",
        "rng-random,id=objrng0,filename=/dev/urandom",
        "-device",
        "virtio-rng-pci,rng=objrng0,id=rng0,max-bytes=1024,period=1000,bus=pci.0,addr=0x6",
    ])
    .expect("accepted");
    assert_eq!(kv, r);
    // <backend model='builtin'/>, no <rate>: QEMU's defaults.
    let r = rngs_of(&[
        "-object",
        r#"{"qom-type":"rng-builtin","id":"objrng0"}"#,
        "-device",
        r#"{"driver":"virtio-rng-pci","rng":"objrng0","id":"rng0","bus":"pci.0","addr":"0x7"}"#,
    ])
    .expect("accepted");
    assert_eq!(
        (r[0].slot, &r[0].config),
        (7, &RngConfig::new(RngSource::Builtin))
    );
    // By hand, key=value: after the disk (slot 3) and the NIC (slot 4); the
    // default filename; a device without rng= gets QEMU 7.2's builtin.
    let r = rngs_of(&[
        "-drive",
        "file=/d.img,format=raw,if=virtio",
        "-netdev",
        "tap,id=n1,ifname=tap0,script=no,downscript=no",
        "-device",
        "virtio-net-pci,netdev=n1",
        "-object",
        "rng-random,id=r0",
        "-device",
        "virtio-rng-pci,rng=r0,max-bytes=0x100,period=50",
        "-device",
        "virtio-rng-pci-non-transitional,disable-legacy=on,iommu_platform=off",
    ])
    .expect("accepted");
    assert_eq!(
        r.iter().map(|r| r.slot).collect::<Vec<_>>(),
        [5, 6],
        "{r:?}"
    );
    assert_eq!(
        r[0].config,
        RngConfig {
            source: RngSource::File(super::DEFAULT_RNG_FILE.into()),
            max_bytes: 256,
            period_ms: 50,
        }
    );
    assert_eq!(r[1].config.source, RngSource::Builtin);
    assert_eq!(r[1].backend, None);

    // Refusals name the option and the thing; bad values get QEMU's words.
    let dev = |props: &str| {
        format!(r#"{{"driver":"virtio-rng-pci","rng":"objrng0","id":"rng0"{props}}}"#)
    };
    let random = r#"{"qom-type":"rng-random","id":"objrng0","filename":"/dev/urandom"}"#;
    for (extra, want) in [
        (
            vec![
                "-chardev".to_string(),
                "socket,id=charrng0,path=/run/egd.sock".into(),
                "-object".into(),
                r#"{"qom-type":"rng-egd","id":"objrng0","chardev":"charrng0"}"#.into(),
                "-device".into(),
                dev(""),
            ],
            "-object: entropy backend 'rng-egd' ('objrng0') is not supported by ferry-qemu: \
             ferry reads entropy from a file or the host's getrandom",
        ),
        (
            vec!["-object".into(), "rng-foo,id=objrng0".into()],
            "-object: entropy backend 'rng-foo' ('objrng0') is not supported",
        ),
        (
            vec![
                "-object".into(),
                "rng-random,id=r,filename=/dev/urandom,opened=on".into(),
            ],
            "-object: rng-random property 'opened' ('r') is not supported",
        ),
        (
            vec!["-device".into(), dev("")],
            "-device rng0: Property 'rng' can't find value 'objrng0'",
        ),
        (
            vec![
                "-object".into(),
                random.into(),
                "-device".into(),
                dev(r#","period":0"#),
            ],
            "-device rng0: 'period' parameter expects a positive integer",
        ),
        (
            vec![
                "-object".into(),
                random.into(),
                "-device".into(),
                dev(r#","max-bytes":9223372036854775808"#),
            ],
            "-device rng0: 'max-bytes' parameter must be non-negative, and less than 2^63",
        ),
        (
            vec![
                "-object".into(),
                random.into(),
                "-device".into(),
                dev(r#","period":4294967296"#),
            ],
            "-device rng0: Parameter 'period' expects uint32_t",
        ),
        (
            vec![
                "-object".into(),
                random.into(),
                "-device".into(),
                dev(r#","max-bytes":"lots""#),
            ],
            "-device rng0: Parameter 'max-bytes' expects uint64",
        ),
        (
            vec![
                "-object".into(),
                random.into(),
                "-device".into(),
                dev(r#","bus":"pcie.0""#),
            ],
            "-device: bus 'pcie.0' (rng0) is not supported by ferry-qemu",
        ),
        (
            vec![
                "-object".into(),
                random.into(),
                "-device".into(),
                dev(r#","packed":true"#),
            ],
            "-device: virtio-rng packed=on",
        ),
        (
            vec![
                "-object".into(),
                random.into(),
                "-device".into(),
                dev(r#","vectors":4"#),
            ],
            "-device: virtio-rng-pci property 'vectors' is not supported",
        ),
        (
            vec![
                "-object".into(),
                random.into(),
                "-device".into(),
                r#"{"driver":"virtio-rng-pci-transitional","rng":"objrng0"}"#.into(),
            ],
            "device 'virtio-rng-pci-transitional' is not supported by ferry-qemu: ferry's \
             virtio devices are modern-only",
        ),
        (
            vec![
                "-object".into(),
                random.into(),
                "-device".into(),
                dev(r#","addr":"0x1""#),
            ],
            "slot 1 function 0 not available, in use by PIIX3",
        ),
    ] {
        let refs: Vec<&str> = extra.iter().map(String::as_str).collect();
        let err = rngs_of(&refs).unwrap_err().to_string();
        assert!(err.contains(want), "{extra:?}: {err}");
    }
}

/// `<os><smbios mode='sysinfo'/>` with Nova's `<sysinfo>` and
/// `<timer name='hpet' present='no'/>`, as libvirt 9.0 writes them for QEMU 7.2.
#[test]
fn nova_sysinfo_and_no_hpet_become_smbios_tables() {
    const UUID: &str = "c7a5fdbd-cdaf-9455-926a-d65c16db1809";
    let mut args = argv(
        "-machine pc-i440fx-7.2,usb=off -accel kvm -m 256 -smp 4,sockets=2,dies=1,cores=2,threads=1 \
         -kernel /k -no-hpet -uuid c7a5fdbd-cdaf-9455-926a-d65c16db1809",
    );
    let type1 = format!(
        "type=1,manufacturer=OpenStack Foundation,product=OpenStack Nova,version=26.1.0,\
         serial=9b0e3a55,,x,uuid={UUID},family=Virtual Machine"
    );
    args.extend(["-smbios".into(), type1]);
    args.extend(["-smbios".into(), "type=0,vendor=Ferry,release=1.2".into()]);
    args.extend(["-smbios".into(), "type=11,value=a,value=b".into()]);
    let inv = parse(&args).expect("parses");
    assert!(inv.no_hpet);
    let cfg = inv.machine_config().expect("ok").expect("vm");
    let s = cfg.smbios.expect("pc has SMBIOS");
    assert_eq!(
        s.system.manufacturer.as_deref(),
        Some("OpenStack Foundation")
    );
    assert_eq!(s.system.product.as_deref(), Some("OpenStack Nova"));
    assert_eq!(
        s.system.serial.as_deref(),
        Some("9b0e3a55,x"),
        ",, is a comma"
    );
    assert_eq!(s.system.family.as_deref(), Some("Virtual Machine"));
    assert_eq!(s.system.uuid, Some(ferry_boot::parse_uuid(UUID).unwrap()));
    assert_eq!(s.bios.expect("type 0").release, Some((1, 2)));
    assert_eq!(s.oem_strings, vec!["a", "b"]);
    assert_eq!((s.sockets, s.cores, s.threads), (2, 2, 1));
    assert_eq!(cfg.uuid.as_deref(), Some(UUID));

    // -uuid alone is the system UUID; -smbios type=1,uuid= overrides it (QEMU).
    let cfg = p(
        "-machine pc -accel kvm -kernel /k -uuid 00112233-4455-6677-8899-aabbccddeeff \
                 -smbios type=1,uuid=00000000-0000-0000-0000-000000000001",
    )
    .expect("parses")
    .machine_config()
    .expect("ok")
    .expect("vm");
    assert_eq!(
        cfg.uuid.as_deref(),
        Some("00000000-0000-0000-0000-000000000001")
    );
    let cfg = p("-machine pc -accel kvm -kernel /k -uuid 00112233-4455-6677-8899-aabbccddeeff")
        .expect("parses")
        .machine_config()
        .expect("ok")
        .expect("vm");
    let s = cfg.smbios.expect("tables without -smbios too");
    assert_eq!(s.system.uuid.expect("uuid")[0], 0x00);
    assert_eq!(s.system.uuid.expect("uuid")[15], 0xff);
    assert!(s.bios.is_none() && s.baseboard.is_none());
}

/// What QEMU 7.2 refuses, with its words; what ferry cannot build, named.
#[test]
fn smbios_refusals() {
    let base = "-machine pc -accel kvm -kernel /k -smbios ";
    for (arg, want) in [
        (
            "type=1,colour=red",
            "-smbios type=1,colour=red: Invalid parameter 'colour'",
        ),
        ("type=1,uuid=nope", "-smbios type=1,uuid=nope: Invalid UUID"),
        (
            "type=0,release=x",
            "-smbios type=0,release=x: Invalid release",
        ),
        ("serial=x", "-smbios serial=x: Must specify type= or file="),
        ("type=5", "Don't know how to build fields for SMBIOS type 5"),
        ("type=300", "out of range!"),
        (
            "file=/tmp/t.bin",
            "-smbios: file= (binary SMBIOS structures) is not supported",
        ),
        ("type=11,path=/tmp/s", "type=11,path="),
        ("type=4,sock_pfx=S", "type=4 fields"),
        ("type=3,product=x", "Invalid parameter 'product'"),
    ] {
        let err = p(&format!("{base}{arg}"))
            .expect("parses")
            .machine_config()
            .unwrap_err();
        assert!(err.to_string().contains(want), "{arg}: {err}");
    }
    let err = p("-machine microvm -accel kvm -kernel /k -smbios type=1,serial=x")
        .expect("parses")
        .machine_config()
        .unwrap_err();
    assert!(err.to_string().contains("pc machine only"), "{err}");
    let cfg = p("-machine microvm -accel kvm -kernel /k")
        .expect("parses")
        .machine_config()
        .expect("ok")
        .expect("vm");
    assert_eq!(cfg.smbios, None);
}

fn balloon_of(extra: &[&str]) -> Result<Option<super::BalloonDeviceConfig>, ArgvError> {
    let mut args = argv(DOMAIN);
    args.extend(extra.iter().map(|s| s.to_string()));
    Ok(parse(&args)?.machine_config()?.expect("vm").balloon)
}

#[test]
fn balloon_forms_libvirt_and_by_hand() {
    use ferry_vmm::devices::virtio::balloon::BalloonConfig;
    // libvirt 9.0's <memballoon model='virtio'> on lab2's layout: a real
    // device, no longer one modelled as absent.
    let mut args = argv(DOMAIN);
    args.extend(
        [
            "-device",
            LAB2_DEVICE,
            "-blockdev",
            LAB2_STORAGE,
            "-blockdev",
            LAB2_FORMAT,
        ]
        .map(String::from),
    );
    args.extend(["-device".to_string(), BALLOON_AT_4.to_string()]);
    let config = parse(&args).unwrap().machine_config().unwrap().expect("vm");
    assert_eq!(
        config.balloon,
        Some(super::BalloonDeviceConfig {
            id: Some("balloon0".into()),
            slot: 4,
            config: BalloonConfig::default(),
            stats_interval: 0,
        })
    );
    assert!(config.absent_devices.iter().all(|d| d != "balloon0"));
    // freePageReporting='on' autodeflate='on', JSON and key=value.
    for dev in [
        r#"{"driver":"virtio-balloon-pci","id":"balloon0","deflate-on-oom":true,"free-page-reporting":true,"bus":"pci.0","addr":"0x5"}"#,
        "virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting=on,bus=pci.0,addr=0x5",
    ] {
        let b = balloon_of(&["-device", dev]).unwrap().expect("balloon");
        assert_eq!(
            (b.slot, b.config),
            (
                5,
                BalloonConfig {
                    deflate_on_oom: true,
                    free_page_reporting: true
                }
            ),
            "{dev}"
        );
    }
    // By hand: after the disk and the entropy device, QEMU's defaults; a
    // polling interval from the start.
    let b = balloon_of(&[
        "-drive",
        "file=/d.img,format=raw,if=virtio",
        "-device",
        "virtio-rng-pci",
        "-device",
        "virtio-balloon-pci-non-transitional,disable-legacy=on,guest-stats-polling-interval=10,free-page-hint=off",
    ])
    .unwrap()
    .expect("balloon");
    assert_eq!((b.id, b.slot, b.stats_interval), (None, 5, 10));
    assert_eq!(balloon_of(&[]).unwrap(), None);

    for (extra, want) in [
        (
            vec!["virtio-balloon-pci,id=b0", "virtio-balloon-pci,id=b1"],
            "-device b1: Only one balloon device is supported",
        ),
        (
            vec!["virtio-balloon-pci,free-page-hint=on"],
            "-device: virtio-balloon free-page-hint=on is not supported by ferry-qemu: ferry's \
             migration finds free pages by their zeroes",
        ),
        (
            vec!["virtio-balloon-pci,deflate-on-oom=maybe"],
            "parameter 'deflate-on-oom' expects 'on' or 'off'",
        ),
        (
            vec!["virtio-balloon-pci,iothread=io0"],
            "-device: virtio-balloon-pci property 'iothread' is not supported",
        ),
        (
            vec!["virtio-balloon-pci,bus=pcie.0"],
            "-device: bus 'pcie.0' (virtio-balloon-pci) is not supported",
        ),
        (
            vec!["virtio-balloon-pci,guest-stats-polling-interval=4294967296"],
            "timer value is too big",
        ),
        (vec!["virtio-balloon-pci-transitional"], "modern-only"),
        (vec!["virtio-balloon-pci,disable-legacy=off"], "modern-only"),
        (
            vec!["virtio-balloon-pci,addr=0x1"],
            "PCI: slot 1 function 0 not available, in use by PIIX3",
        ),
    ] {
        let args: Vec<&str> = extra.iter().flat_map(|d| ["-device", *d]).collect();
        let err = balloon_of(&args).unwrap_err().to_string();
        assert!(err.contains(want), "{extra:?}: {err}");
    }
}

/// libvirt 9.0's IDE disk and CD-ROMs (`<disk bus='ide'>` on `pc`, as
/// `virsh domxml-to-native` writes them for QEMU 7.2): the disk at ide.0
/// unit 0, the config drive's ISO read-only at ide.1 unit 1, on PIIX3's
/// slot; `-drive if=ide` by index; what cannot be is refused by name.
#[test]
fn ide_drives_as_libvirt_writes_them() {
    let d = blockdevs(
        &[
            r#"{"driver":"file","filename":"/i/disk.img","node-name":"libvirt-3-storage","cache":{"direct":true,"no-flush":false},"auto-read-only":true,"discard":"unmap"}"#,
            r#"{"node-name":"libvirt-3-format","read-only":false,"cache":{"direct":true,"no-flush":false},"driver":"raw","file":"libvirt-3-storage"}"#,
            r#"{"driver":"file","filename":"/i/disk.config","node-name":"libvirt-1-storage","cache":{"direct":true,"no-flush":false},"auto-read-only":true,"discard":"unmap"}"#,
            r#"{"node-name":"libvirt-1-format","read-only":true,"cache":{"direct":true,"no-flush":false},"driver":"raw","file":"libvirt-1-storage"}"#,
        ],
        &[
            r#"{"driver":"ide-hd","bus":"ide.0","unit":0,"drive":"libvirt-3-format","id":"ide0-0-0","bootindex":1,"write-cache":"on"}"#,
            r#"{"driver":"ide-cd","bus":"ide.1","unit":1,"drive":"libvirt-1-format","id":"ide0-1-1","write-cache":"on"}"#,
        ],
    )
    .expect("accepted");
    let at: Vec<_> = d
        .iter()
        .map(|d| (d.id.as_deref(), d.slot, d.ide, d.read_only))
        .collect();
    let ide = |bus, unit, cdrom| Some(crate::backend::IdePosition { bus, unit, cdrom });
    assert_eq!(
        at,
        vec![
            (Some("ide0-0-0"), PIIX3_SLOT, ide(0, 0, false), false),
            (Some("ide0-1-1"), PIIX3_SLOT, ide(1, 1, true), true),
        ]
    );
    assert_eq!(d[1].filename, "/i/disk.config");
    assert_eq!((d[0].bootindex, d[1].bootindex), (Some(1), None));

    // -drive if=ide: by index, or the first free place; a CD-ROM read-only.
    let d = disks_of(&[
        "-drive",
        "file=/a.img,format=raw,if=ide,index=1",
        "-drive",
        "file=/c.iso,format=raw,media=cdrom",
        "-drive",
        "file=/b.qcow2,format=qcow2,if=ide",
    ])
    .expect("accepted");
    let at: Vec<_> = d
        .iter()
        .map(|d| (d.filename.as_str(), d.ide, d.read_only))
        .collect();
    assert_eq!(
        at,
        vec![
            ("/a.img", ide(0, 1, false), false),
            ("/c.iso", ide(0, 0, true), true),
            ("/b.qcow2", ide(1, 0, false), false),
        ]
    );

    for (args, want) in [
        (
            vec!["-device", "ide-cd,bus=ide.1,unit=0,id=ide0-1-0"],
            "an empty CD-ROM drive (ide0-1-0) is not supported by ferry-qemu: ferry's CD-ROMs \
             hold their medium from the start",
        ),
        (
            vec![
                "-drive",
                "file=/a.img,format=raw,if=none,id=d0",
                "-device",
                "ide-hd,drive=d0,bus=ide.2",
            ],
            "bus 'ide.2' (ide-hd)",
        ),
        (
            vec![
                "-drive",
                "file=/a.img,format=raw,if=ide,index=0",
                "-drive",
                "file=/b.img,format=raw,if=ide,bus=0,unit=0",
            ],
            "IDE unit 0 is in use (bus ide.0)",
        ),
        (
            vec![
                "-drive",
                "file=/a.img,format=raw,if=none,id=d0",
                "-device",
                "ide-hd,drive=d0,model=FERRY",
            ],
            "IDE drive property 'model=FERRY' (ide-hd)",
        ),
        (
            vec!["-drive", "file=/c.iso,format=raw,if=virtio,media=cdrom"],
            "ferry's CD-ROMs are IDE",
        ),
    ] {
        let e = disks_of(&args).expect_err("refused").to_string();
        assert!(e.contains(want), "{args:?}: {e}");
    }
    let e = p("-M microvm -drive file=/a.img,format=raw,if=ide")
        .and_then(|i| i.machine_config())
        .expect_err("no IDE on microvm")
        .to_string();
    assert!(e.contains("IDE drives need the pc machine"), "{e}");
}

/// libvirt's `<vmcoreinfo state='on'/>` (Nova writes it into every x86
/// domain) is `-device vmcoreinfo`: fw_cfg's `etc/vmcoreinfo` on `pc`.
#[test]
fn vmcoreinfo_as_libvirt_writes_it() {
    let vm = |extra: &[&str]| -> Result<crate::backend::MachineConfig, ArgvError> {
        let mut args = argv(DOMAIN);
        args.extend(extra.iter().map(|s| s.to_string()));
        Ok(parse(&args)?.machine_config()?.expect("vm"))
    };
    assert!(!vm(&[]).expect("accepted").vmcoreinfo);
    assert!(
        vm(&["-device", r#"{"driver":"vmcoreinfo"}"#])
            .expect("accepted")
            .vmcoreinfo
    );
    let e = vm(&["-device", "vmcoreinfo", "-device", "vmcoreinfo"])
        .expect_err("two")
        .to_string();
    assert!(e.contains("at most one vmcoreinfo"), "{e}");
    let e = vm(&["-device", "vmcoreinfo,foo=1"])
        .expect_err("a property")
        .to_string();
    assert!(e.contains("vmcoreinfo property 'foo'"), "{e}");
}

/// A `pc` guest without `-kernel` boots through firmware: SeaBIOS's
/// `bios-256k.bin` by default, `-bios` by path or by the name QEMU finds in
/// its data directories; with `-kernel`, none. `-boot strict=on` is kept.
#[test]
fn without_a_kernel_a_pc_guest_boots_through_firmware() {
    let cfg = |args: &str| p(args).expect("parses").machine_config();
    let c = cfg("-machine pc -accel kvm -m 256 -boot strict=on")
        .expect("ok")
        .expect("vm");
    assert_eq!(
        c.firmware.as_deref(),
        Some(std::path::Path::new(ferry_vmm::firmware::DEFAULT_BIOS))
    );
    assert!(c.boot_strict && c.acpi);
    for no_acpi in [
        "-machine pc,acpi=off -accel kvm",
        "-machine pc -accel kvm -no-acpi",
    ] {
        let c = cfg(no_acpi).expect("ok").expect("vm");
        assert!(!c.acpi, "{no_acpi}");
    }
    let c = cfg("-machine pc -accel kvm -bios /x/my.bin")
        .expect("ok")
        .expect("vm");
    assert_eq!(
        c.firmware.as_deref(),
        Some(std::path::Path::new("/x/my.bin"))
    );
    assert!(!c.boot_strict);
    // By name, where Debian's QEMU keeps it (seabios is installed with it).
    let c = cfg("-machine pc -accel kvm -bios bios-256k.bin")
        .expect("ok")
        .expect("vm");
    let found = c.firmware.expect("found");
    assert!(
        found.is_absolute() && found.ends_with("bios-256k.bin"),
        "{found:?}"
    );
    let err = cfg("-machine pc -accel kvm -bios no-such-bios.bin").unwrap_err();
    assert!(
        err.to_string()
            .contains("could not find the BIOS in /usr/share/qemu"),
        "{err}"
    );
    let c = cfg("-machine pc -accel kvm -kernel /k -bios bios-256k.bin")
        .expect("ok")
        .expect("vm");
    assert_eq!(c.firmware, None, "a kernel boots directly");
    let err = cfg("-machine microvm -accel kvm").unwrap_err();
    assert!(err.to_string().contains("microvm has no firmware"), "{err}");
    assert!(cfg("-machine pc -accel kvm -boot strict=maybe").is_err());
}

/// Every `pc` guest has QEMU's MC146818 RTC: `-rtc` as libvirt 9.0 writes
/// it (`<clock offset='utc|localtime'>`, `<timer name='rtc'
/// tickpolicy='catchup'/>` as driftfix=slew) picks its base, `-boot order=`
/// its CMOS boot order.
#[test]
fn rtc_as_libvirt_writes_it() {
    use ferry_vmm::devices::rtc::{RtcBase, RtcConfig};
    let vm = |extra: &[&str]| -> Result<crate::backend::MachineConfig, ArgvError> {
        let mut args = argv(DOMAIN);
        args.extend(extra.iter().map(|s| s.to_string()));
        Ok(parse(&args)?.machine_config()?.expect("vm"))
    };
    assert_eq!(vm(&[]).expect("accepted").rtc, Some(RtcConfig::default()));
    let c = vm(&["-rtc", "base=localtime,clock=vm,driftfix=slew"]).expect("accepted");
    assert_eq!(c.rtc.expect("an RTC").base, RtcBase::LocalTime);
    let c = vm(&[
        "-rtc",
        "base=2006-06-17T16:01:21,clock=rt",
        "-boot",
        "order=dc",
    ])
    .expect("accepted")
    .rtc
    .expect("an RTC");
    assert_eq!(
        c,
        RtcConfig {
            base: RtcBase::Date {
                unix_secs: 1_150_560_081
            },
            boot_order: "dc".into(),
        }
    );
    for (extra, want) in [
        (["-rtc", "base=yesterday"], "base 'yesterday'"),
        (["-rtc", "base=utc,clock=guest"], "clock 'guest'"),
        (["-rtc", "base=utc,driftfix=fast"], "driftfix 'fast'"),
        (["-rtc", "base=utc,speed=2"], "parameter 'speed'"),
        (["-boot", "order=cx"], "invalid boot device for PC: 'x'"),
    ] {
        let e = vm(&extra).expect_err("refused").to_string();
        assert!(e.contains(want), "{extra:?}: {e}");
    }
}
