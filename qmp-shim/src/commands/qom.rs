//! What the capability probe asks about types: qom-list-types,
//! device-list-properties, qom-list-properties, query-machines,
//! query-command-line-options. The data describes ferry truthfully: the
//! machines and devices it models, plus the devices libvirt adds by default
//! that ferry accepts and models as absent (see argv/config.rs).

use serde_json::{json, Map, Value};

use super::types::*;
use super::{arg_str, Command, Ctx};
use crate::argv::{
    MachineDef, IDE_DEVICES, MACHINES, MODELLED_AS_ABSENT, MODELLED_DEVICES, VIRTIO_BALLOON,
    VIRTIO_BLK, VIRTIO_NET, VIRTIO_RNG,
};
use crate::backend::MachineType;
use crate::qmp::error::CommandError;
use crate::qmp::schema::{opt, req, CommandSchema, Ty};
use ferry_vmm::devices::virtio::balloon::STAT_NAMES;

/// `(type, parent, abstract)`; the machine types ferry builds follow, from
/// [`MACHINES`] (see [`types`]).
const TYPES: &[(&str, &str, bool)] = &[
    ("machine", "object", true),
    ("x86-machine", "machine", true),
    ("generic-pc-machine", "x86-machine", true),
    ("none-machine", "machine", false),
    ("device", "object", true),
    ("cpu", "device", true),
    ("x86_64-cpu", "cpu", true),
    ("max-x86_64-cpu", "x86_64-cpu", false),
    ("host-x86_64-cpu", "max-x86_64-cpu", false),
    ("qemu64-x86_64-cpu", "x86_64-cpu", false),
    ("kvm64-x86_64-cpu", "x86_64-cpu", false),
    ("base-x86_64-cpu", "x86_64-cpu", false),
    ("isa-serial", "device", false),
    ("virtio-blk-pci", "device", false),
    ("virtio-blk-pci-non-transitional", "device", false),
    ("virtio-net-pci", "device", false),
    ("virtio-net-pci-non-transitional", "device", false),
    // libvirt's <rng model='virtio'> needs virtio-rng-pci and the backend's
    // type (rng-random, rng-builtin); rng-egd is left out, so libvirt refuses
    // <backend model='egd'> itself.
    ("virtio-rng-pci-base", "device", true),
    ("virtio-rng-pci", "virtio-rng-pci-base", false),
    (
        "virtio-rng-pci-non-transitional",
        "virtio-rng-pci-base",
        false,
    ),
    ("rng-backend", "object", true),
    ("rng-random", "rng-backend", false),
    ("rng-builtin", "rng-backend", false),
    // PIIX3's IDE controller and its drives (argv/ide.rs).
    ("piix3-ide", "device", false),
    // fw_cfg's etc/vmcoreinfo (libvirt's <vmcoreinfo/>; argv/config.rs).
    ("vmcoreinfo", "device", false),
    ("ide-device", "device", true),
    ("ide-hd", "ide-device", false),
    ("ide-cd", "ide-device", false),
    ("piix3-usb-uhci", "device", false),
    ("piix4-usb-uhci", "device", false),
    ("qemu-xhci", "device", false),
    ("ich9-usb-ehci1", "device", false),
    ("ich9-usb-uhci1", "device", false),
    ("ich9-usb-uhci2", "device", false),
    ("ich9-usb-uhci3", "device", false),
    ("virtio-balloon-pci", "device", false),
    ("virtio-balloon-pci-non-transitional", "device", false),
    ("virtio-balloon-device", "device", false),
    ("memory-backend", "object", true),
    ("memory-backend-ram", "memory-backend", false),
    ("secret", "object", false),
    // object-add (commands/objects.rs): libvirt's --tls looks for tls-creds-x509.
    ("tls-creds", "object", true),
    ("tls-creds-x509", "tls-creds", false),
    ("tls-creds-psk", "tls-creds", false),
];

/// A machine's QOM parent, as in QEMU.
fn machine_parent(m: &MachineDef) -> &'static str {
    match m.family {
        MachineType::Pc => "generic-pc-machine",
        MachineType::Microvm => "x86-machine",
    }
}

/// Every QOM type ferry shows: [`TYPES`], then one per machine type.
fn types() -> impl Iterator<Item = (&'static str, &'static str, bool)> {
    TYPES.iter().copied().chain(
        MACHINES
            .iter()
            .map(|m| (m.qom_type, machine_parent(m), false)),
    )
}

/// `(name, type, description)`.
type Prop = (&'static str, &'static str, &'static str);

const ISA_SERIAL_PROPS: &[Prop] = &[
    ("index", "uint32", ""),
    ("iobase", "uint32", ""),
    ("irq", "uint32", ""),
    ("chardev", "str", "ID of a chardev to use as a backend"),
];

/// The ide-hd/ide-cd properties ferry accepts (argv/ide.rs).
const IDE_PROPS: &[Prop] = &[
    (
        "drive",
        "str",
        "Node name or ID of a block device to use as a backend",
    ),
    ("unit", "uint32", ""),
    ("serial", "str", ""),
    ("bootindex", "int32", ""),
    ("write-cache", "OnOffAuto", "on/off/auto"),
    (
        "logical_block_size",
        "size",
        "A power of two between 512 B and 2 MiB",
    ),
    ("werror", "BlockdevOnError", ""),
    ("rerror", "BlockdevOnError", ""),
];

/// The virtio-blk-pci properties ferry accepts (argv/disks.rs; some only
/// with the value ferry has, e.g. num-queues=1).
const VIRTIO_BLK_PROPS: &[Prop] = &[
    (
        "drive",
        "str",
        "Node name or ID of a block device to use as a backend",
    ),
    ("serial", "str", ""),
    ("write-cache", "OnOffAuto", "on/off/auto"),
    ("share-rw", "bool", ""),
    ("bootindex", "int32", ""),
    (
        "addr",
        "int32",
        "Slot and optional function number, example: 06.0 or 06",
    ),
    ("num-queues", "uint16", ""),
    ("queue-size", "uint16", ""),
    (
        "logical_block_size",
        "size",
        "A power of two between 512 B and 2 MiB",
    ),
    (
        "physical_block_size",
        "size",
        "A power of two between 512 B and 2 MiB",
    ),
    (
        "werror",
        "BlockdevOnError",
        "Error handling policy, report/ignore/enospc/stop/auto",
    ),
    (
        "rerror",
        "BlockdevOnError",
        "Error handling policy, report/ignore/enospc/stop/auto",
    ),
    ("disable-legacy", "OnOffAuto", "on/off/auto"),
];

/// The virtio-net-pci properties ferry accepts (argv/nics.rs).
const VIRTIO_NET_PROPS: &[Prop] = &[
    ("netdev", "str", "ID of a netdev to use as a backend"),
    (
        "mac",
        "str",
        "Ethernet 6-byte MAC Address, example: 52:54:00:12:34:56",
    ),
    ("bootindex", "int32", ""),
    (
        "addr",
        "int32",
        "Slot and optional function number, example: 06.0 or 06",
    ),
    ("romfile", "str", ""),
    ("disable-legacy", "OnOffAuto", "on/off/auto"),
];

/// The virtio-rng-pci properties ferry accepts (argv/rngs.rs).
const VIRTIO_RNG_PROPS: &[Prop] = &[
    ("rng", "link<rng-backend>", ""),
    ("max-bytes", "uint64", ""),
    ("period", "uint32", ""),
    (
        "addr",
        "int32",
        "Slot and optional function number, example: 06.0 or 06",
    ),
    ("disable-legacy", "OnOffAuto", "on/off/auto"),
];

/// The virtio-balloon-pci properties ferry accepts (argv/balloons.rs) and
/// the QOM ones libvirt reads and sets.
const VIRTIO_BALLOON_PROPS: &[Prop] = &[
    ("deflate-on-oom", "bool", ""),
    ("free-page-reporting", "bool", ""),
    ("guest-stats", "any", ""),
    ("guest-stats-polling-interval", "int", ""),
    (
        "addr",
        "int32",
        "Slot and optional function number, example: 06.0 or 06",
    ),
    ("disable-legacy", "OnOffAuto", "on/off/auto"),
];

const CPU_PROPS: &[Prop] = &[
    ("type", "string", ""),
    ("realized", "bool", ""),
    ("hotpluggable", "bool", ""),
    // -cpu host,migratable=on|off (CpuModel::from_qemu).
    ("migratable", "bool", ""),
];

const MACHINE_PROPS: &[Prop] = &[
    ("type", "string", ""),
    ("kernel", "string", "Linux kernel image file"),
    ("initrd", "string", "Linux initial ramdisk file"),
    ("append", "string", "Linux kernel command line"),
    ("memory-backend", "link<memory-backend>", "Set RAM backend"),
    ("usb", "bool", "Set on/off to enable/disable usb"),
    (
        "dump-guest-core",
        "bool",
        "Include guest memory in a core dump",
    ),
    (
        "graphics",
        "bool",
        "Set on/off to enable/disable graphics emulation",
    ),
];

const MEMORY_BACKEND_PROPS: &[Prop] = &[
    ("type", "string", ""),
    ("size", "int", "Size of the memory region (ex: 500M)"),
];

const RNG_RANDOM_PROPS: &[Prop] = &[("type", "string", ""), ("filename", "string", "")];

const SECRET_PROPS: &[Prop] = &[
    ("type", "string", ""),
    ("format", "QCryptoSecretFormat", ""),
    ("file", "string", ""),
    ("data", "string", ""),
];

fn props_json(props: &[Prop]) -> Value {
    Value::Array(
        props
            .iter()
            .map(|(n, t, d)| {
                if d.is_empty() {
                    json!({"name": n, "type": t})
                } else {
                    json!({"name": n, "type": t, "description": d})
                }
            })
            .collect(),
    )
}

fn is_a(ty: &str, ancestor: &str) -> bool {
    let mut cur = ty;
    loop {
        if cur == ancestor {
            return true;
        }
        match types().find(|(n, _, _)| *n == cur) {
            Some((_, parent, _)) => cur = parent,
            None => return false,
        }
    }
}

pub static QOM_LIST_TYPES: Command = Command {
    schema: CommandSchema {
        name: "qom-list-types",
        args: &[opt("implements", Ty::Str), opt("abstract", Ty::Bool)],
        ret: Some(Ty::Array(&Ty::Object(&OBJECT_TYPE_INFO))),
    },
    handler: qom_list_types,
};

fn qom_list_types(_: &mut Ctx<'_>, args: &Map<String, Value>) -> Result<Value, CommandError> {
    let implements = args.get("implements").and_then(Value::as_str);
    let want_abstract = args
        .get("abstract")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(Value::Array(
        types()
            .filter(|(_, _, abs)| want_abstract || !abs)
            .filter(|(n, _, _)| implements.is_none_or(|i| is_a(n, i)))
            .map(|(n, p, abs)| {
                if abs {
                    json!({"name": n, "parent": p, "abstract": true})
                } else {
                    json!({"name": n, "parent": p})
                }
            })
            .collect(),
    ))
}

pub static DEVICE_LIST_PROPERTIES: Command = Command {
    schema: CommandSchema {
        name: "device-list-properties",
        args: &[req("typename", Ty::Str)],
        ret: Some(Ty::Array(&Ty::Object(&OBJECT_PROPERTY_INFO))),
    },
    handler: device_list_properties,
};

fn device_list_properties(
    _: &mut Ctx<'_>,
    args: &Map<String, Value>,
) -> Result<Value, CommandError> {
    let name = arg_str(args, "typename");
    if name == "isa-serial" {
        return Ok(props_json(ISA_SERIAL_PROPS));
    }
    if VIRTIO_BLK.contains(&name) {
        return Ok(props_json(VIRTIO_BLK_PROPS));
    }
    if IDE_DEVICES.contains(&name) {
        return Ok(props_json(IDE_PROPS));
    }
    if VIRTIO_NET.contains(&name) {
        return Ok(props_json(VIRTIO_NET_PROPS));
    }
    if VIRTIO_RNG.contains(&name) {
        return Ok(props_json(VIRTIO_RNG_PROPS));
    }
    if VIRTIO_BALLOON.contains(&name) {
        return Ok(props_json(VIRTIO_BALLOON_PROPS));
    }
    debug_assert!(MODELLED_DEVICES.contains(&"isa-serial"));
    if MODELLED_AS_ABSENT.contains(&name) {
        // Accepted on the command line, no guest-visible properties.
        return Ok(json!([]));
    }
    // libvirt tolerates DeviceNotFound here (it is what QEMU answers for
    // devices it lacks).
    Err(CommandError::DeviceNotFound(format!(
        "Device '{name}' not found"
    )))
}

pub static QOM_LIST_PROPERTIES: Command = Command {
    schema: CommandSchema {
        name: "qom-list-properties",
        args: &[req("typename", Ty::Str)],
        ret: Some(Ty::Array(&Ty::Object(&OBJECT_PROPERTY_INFO))),
    },
    handler: qom_list_properties,
};

/// Never an error for a class ferry lacks: libvirt 9.0 asks about
/// `memory-backend-file`/`-memfd` whether or not `qom-list-types` lists them,
/// segfaults on DeviceNotFound (seen in the libvirt lab) and fails the probe on any other
/// error. A class ferry does not have has no properties: `[]`.
fn qom_list_properties(_: &mut Ctx<'_>, args: &Map<String, Value>) -> Result<Value, CommandError> {
    let name = arg_str(args, "typename");
    if !types().any(|(n, _, _)| n == name) {
        return Ok(json!([]));
    }
    if is_a(name, "cpu") {
        let features: Vec<Prop> = super::cpu::cpu_properties()
            .map(|(n, t)| (n, t, ""))
            .collect();
        return Ok(props_json(&[CPU_PROPS, &features].concat()));
    }
    let props = if is_a(name, "machine") {
        MACHINE_PROPS
    } else if name == "isa-serial" {
        ISA_SERIAL_PROPS
    } else if VIRTIO_BLK.contains(&name) {
        VIRTIO_BLK_PROPS
    } else if IDE_DEVICES.contains(&name) {
        IDE_PROPS
    } else if VIRTIO_NET.contains(&name) {
        VIRTIO_NET_PROPS
    } else if VIRTIO_RNG.contains(&name) {
        VIRTIO_RNG_PROPS
    } else if VIRTIO_BALLOON.contains(&name) {
        VIRTIO_BALLOON_PROPS
    } else if name == "rng-random" {
        RNG_RANDOM_PROPS
    } else if is_a(name, "memory-backend") {
        MEMORY_BACKEND_PROPS
    } else if name == "secret" {
        SECRET_PROPS
    } else {
        &[("type", "string", "")]
    };
    Ok(props_json(props))
}

pub static QUERY_MACHINES: Command = Command {
    schema: CommandSchema {
        name: "query-machines",
        args: &[],
        ret: Some(Ty::Array(&Ty::Object(&MACHINE_INFO))),
    },
    handler: |_, _| Ok(query_machines()),
};

/// [`MACHINES`] as QEMU 7.2 describes them, then the probe's `none`. No
/// `q35`: libvirt offers a domain the machine types listed here, and ferry
/// cannot build that one.
fn query_machines() -> Value {
    let mut out: Vec<Value> = MACHINES
        .iter()
        .map(|m| {
            let ram_id = match m.family {
                MachineType::Pc => "pc.ram",
                MachineType::Microvm => "microvm.ram",
            };
            let mut v = json!({"name": m.name, "cpu-max": 255, "hotpluggable-cpus": false,
                "numa-mem-supported": false, "deprecated": m.deprecated,
                "default-cpu-type": "qemu64-x86_64-cpu", "default-ram-id": ram_id});
            if let Some(alias) = m.alias {
                v["alias"] = json!(alias);
            }
            if m.is_default {
                v["is-default"] = json!(true);
            }
            v
        })
        .collect();
    out.push(
        json!({"name": "none", "cpu-max": 1, "hotpluggable-cpus": false,
         "numa-mem-supported": false, "deprecated": false, "default-ram-id": "ram"}),
    );
    Value::Array(out)
}

/// `(option, [(parameter, type)])` for the options libvirt asks about.
const CLI_OPTIONS: &[(&str, &[(&str, &str)])] = &[
    (
        "machine",
        &[
            ("type", "string"),
            ("accel", "string"),
            ("usb", "boolean"),
            ("dump-guest-core", "boolean"),
            ("memory-backend", "string"),
            ("kernel", "string"),
            ("initrd", "string"),
            ("append", "string"),
        ],
    ),
    (
        "overcommit",
        &[("mem-lock", "boolean"), ("cpu-pm", "boolean")],
    ),
    (
        "name",
        &[
            ("guest", "string"),
            ("debug-threads", "boolean"),
            ("process", "string"),
        ],
    ),
    ("msg", &[("timestamp", "boolean")]),
    ("boot-opts", &[("strict", "boolean"), ("order", "string")]),
    (
        "smp-opts",
        &[
            ("cpus", "number"),
            ("sockets", "number"),
            ("dies", "number"),
            ("cores", "number"),
            ("threads", "number"),
            ("maxcpus", "number"),
        ],
    ),
    (
        "rtc",
        &[
            ("base", "string"),
            ("clock", "string"),
            ("driftfix", "string"),
        ],
    ),
];

pub static QUERY_COMMAND_LINE_OPTIONS: Command = Command {
    schema: CommandSchema {
        name: "query-command-line-options",
        args: &[opt("option", Ty::Str)],
        ret: Some(Ty::Array(&Ty::Object(&CLI_OPTION_INFO))),
    },
    handler: query_command_line_options,
};

fn query_command_line_options(
    _: &mut Ctx<'_>,
    args: &Map<String, Value>,
) -> Result<Value, CommandError> {
    let only = args.get("option").and_then(Value::as_str);
    let out: Vec<Value> = CLI_OPTIONS
        .iter()
        .filter(|(o, _)| only.is_none_or(|w| w == *o))
        .map(|(o, params)| {
            let ps: Vec<Value> = params
                .iter()
                .map(|(n, t)| json!({"name": n, "type": t}))
                .collect();
            json!({"option": o, "parameters": ps})
        })
        .collect();
    if let (Some(w), true) = (only, out.is_empty()) {
        return Err(CommandError::Generic(format!("Invalid option name: {w}")));
    }
    Ok(Value::Array(out))
}

/// One QOM object ferry shows: its properties as `(name, type, value)`.
fn qom_object(ctx: &Ctx<'_>, path: &str) -> Option<Vec<(String, String, Value)>> {
    let path = path.trim_end_matches('/');
    let entry = |n: &str, t: &str, v: Value| (n.to_string(), t.to_string(), v);
    let peripherals = || -> Vec<(String, String)> {
        ctx.vm
            .invocation
            .devices
            .iter()
            .filter(|d| MODELLED_DEVICES.contains(&d.kind.as_str()))
            .filter_map(|d| d.id.clone().map(|id| (id, d.kind.clone())))
            .collect()
    };
    if let Some(i) = path
        .strip_prefix("/machine/unattached/device[")
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|n| n.parse::<u32>().ok())
    {
        if i >= super::devices::vcpu_count(ctx) {
            return None;
        }
        let ty = super::devices::cpu_type(ctx);
        let mut props = vec![
            entry("type", "string", json!(ty)),
            entry("realized", "bool", json!(true)),
            entry("hotpluggable", "bool", json!(false)),
        ];
        // The features the vCPU really has and what -cpu asked for in vain:
        // libvirt reads both after start and fixes the live XML from them.
        if let Some(cpuid) = super::cpu::vcpu_cpuid(ctx, i) {
            let unavailable = super::cpu::vcpu_unavailable_features(ctx);
            props.extend(
                super::cpu::cpu_properties()
                    .map(|(n, t)| entry(n, t, super::cpu::cpu_property(&cpuid, &unavailable, n))),
            );
        }
        return Some(props);
    }
    match path {
        "" => Some(vec![
            entry("type", "string", json!("container")),
            entry("machine", "child<machine>", Value::Null),
        ]),
        "/machine" => Some(vec![
            entry(
                "type",
                "string",
                json!(ctx
                    .vm
                    .invocation
                    .machine_def()
                    .map_or("none-machine", |m| m.qom_type)),
            ),
            entry("peripheral", "child<container>", Value::Null),
            entry("unattached", "child<container>", Value::Null),
        ]),
        "/machine/peripheral" => {
            let mut v = vec![entry("type", "string", json!("container"))];
            v.extend(
                peripherals()
                    .into_iter()
                    .map(|(id, kind)| entry(&id, &format!("child<{kind}>"), Value::Null)),
            );
            Some(v)
        }
        _ => {
            let id = path.strip_prefix("/machine/peripheral/")?;
            let (_, kind) = peripherals().into_iter().find(|(i, _)| i == id)?;
            let mut props = vec![
                entry("type", "string", json!(kind)),
                entry("realized", "bool", json!(true)),
            ];
            if VIRTIO_BALLOON.contains(&kind.as_str()) {
                // Read from the guest by `qom-get` (see balloon_property).
                props.push(entry("guest-stats", "any", Value::Null));
                props.push(entry("guest-stats-polling-interval", "int", Value::Null));
            }
            Some(props)
        }
    }
}

fn no_device(path: &str) -> CommandError {
    CommandError::DeviceNotFound(format!("Device '{path}' not found"))
}

pub static QOM_LIST: Command = Command {
    schema: CommandSchema {
        name: "qom-list",
        args: &[req("path", Ty::Str)],
        ret: Some(Ty::Array(&Ty::Object(&OBJECT_PROPERTY_INFO))),
    },
    handler: |ctx, args| {
        let path = arg_str(args, "path");
        let props = qom_object(ctx, path).ok_or_else(|| no_device(path))?;
        Ok(Value::Array(
            props
                .into_iter()
                .map(|(n, t, _)| json!({"name": n, "type": t}))
                .collect(),
        ))
    },
};

/// Whether `path` is the balloon's QOM path (`/machine/peripheral/ID`).
fn is_balloon_path(ctx: &Ctx<'_>, path: &str) -> bool {
    let id = ctx
        .vm
        .config
        .as_ref()
        .and_then(|c| c.balloon.as_ref())
        .and_then(|b| b.id.as_deref());
    id.is_some_and(|id| {
        path.trim_end_matches('/')
            .strip_prefix("/machine/peripheral/")
            .is_some_and(|p| p == id)
    })
}

/// The balloon's `guest-stats` as QEMU's `balloon_stats_get_all` gives them:
/// every statistic by QEMU's name, those the guest never sent as QEMU's -1
/// (a uint64, so 18446744073709551615 on the wire, which libvirt skips), and
/// when they came. Before the guest sent any, QEMU's error (which libvirt
/// turns into "the guest hasn't updated any stats yet").
fn balloon_property(ctx: &mut Ctx<'_>, prop: &str) -> Option<Result<Value, CommandError>> {
    let info = match prop {
        "guest-stats" | "guest-stats-polling-interval" => ctx.vm.backend.balloon_info(),
        _ => return None,
    };
    Some(info.map_err(CommandError::from).and_then(|info| {
        if prop == "guest-stats-polling-interval" {
            return Ok(json!(info.poll_interval));
        }
        if info.stats_last_update == 0 {
            return Err(CommandError::Generic(
                "guest hasn't updated any stats yet".into(),
            ));
        }
        let stats: Map<String, Value> = STAT_NAMES
            .iter()
            .zip(info.stats)
            .map(|(name, v)| (name.to_string(), json!(v.unwrap_or(u64::MAX))))
            .collect();
        Ok(json!({"stats": stats, "last-update": info.stats_last_update}))
    }))
}

pub static QOM_GET: Command = Command {
    schema: CommandSchema {
        name: "qom-get",
        args: &[req("path", Ty::Str), req("property", Ty::Str)],
        ret: Some(Ty::Any),
    },
    handler: |ctx, args| {
        let (path, prop) = (arg_str(args, "path"), arg_str(args, "property"));
        if is_balloon_path(ctx, path) {
            if let Some(answer) = balloon_property(ctx, prop) {
                return answer;
            }
        }
        let props = qom_object(ctx, path).ok_or_else(|| no_device(path))?;
        let type_name = props
            .first()
            .and_then(|p| p.2.as_str().map(str::to_string))
            .unwrap_or_default();
        props
            .into_iter()
            .find(|(n, _, v)| n == prop && !v.is_null())
            .map(|(_, _, v)| v)
            .ok_or_else(|| {
                CommandError::Generic(format!("Property '{type_name}.{prop}' not found"))
            })
    },
};

/// `qom-set`: the balloon's `guest-stats-polling-interval` (seconds, QEMU's
/// checks and words); every other property ferry shows is read-only.
pub static QOM_SET: Command = Command {
    schema: CommandSchema {
        name: "qom-set",
        args: &[
            req("path", Ty::Str),
            req("property", Ty::Str),
            req("value", Ty::Any),
        ],
        ret: None,
    },
    handler: |ctx, args| {
        let (path, prop) = (arg_str(args, "path"), arg_str(args, "property"));
        if is_balloon_path(ctx, path) && prop == "guest-stats-polling-interval" {
            let secs = args.get("value").and_then(Value::as_i64).ok_or_else(|| {
                CommandError::Parameter(format!(
                    "Invalid parameter type for '{prop}', expected: integer"
                ))
            })?;
            if secs < 0 {
                return Err(CommandError::Generic(
                    "timer value must be greater than zero".into(),
                ));
            }
            let secs = u32::try_from(secs)
                .map_err(|_| CommandError::Generic("timer value is too big".into()))?;
            ctx.vm.backend.set_balloon_stats_interval(secs)?;
            return Ok(json!({}));
        }
        let props = qom_object(ctx, path).ok_or_else(|| no_device(path))?;
        let type_name = props
            .first()
            .and_then(|p| p.2.as_str().map(str::to_string))
            .unwrap_or_default();
        if props.iter().any(|(n, _, _)| n == prop) {
            Err(CommandError::Generic(
                "Insufficient permission to perform this operation".into(),
            ))
        } else {
            Err(CommandError::Generic(format!(
                "Property '{type_name}.{prop}' not found"
            )))
        }
    },
};
