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
        (" -machine q35", "q35"),
        (" -global foo.bar=1", "foo.bar"),
        (" -vnc :0", "-vnc"),
        (" -netdev tap,fd=3,id=n0", "tap"),
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
        "lab2" | "lab3" | "lab4" | "lab5" | "lab6" => "-blockdev",
        "lab8spice" => "-spice",
        "lab9tcp" => "usb-redir",
        "lab10" => "nvme",
        other => panic!("no expectation for {other}"),
    }
}
