//! QEMU-compatible command line: `argv` → typed [`Invocation`].
//!
//! Two stages, so that the syntax and the policy are tested apart:
//! * [`parse`] accepts every option spelling that QEMU 7.2 accepts for the
//!   options listed in [`OPTIONS`] (`-opt` and `--opt`, key=value with `,,`
//!   escapes, the JSON forms). It refuses unknown options and malformed values.
//! * [`Invocation::machine_config`] (in `config.rs`) decides what ferry can
//!   honour and refuses the rest with a message naming it.

mod balloons;
mod config;
mod disks;
mod ide;
mod nics;
pub mod opts;
mod rngs;
mod size;

use std::path::PathBuf;

use serde_json::{Map, Value};

pub use balloons::{BalloonDeviceConfig, VIRTIO_BALLOON};
pub use config::{
    machine_def, ChardevFds, MachineDef, SerialConfig, CPU_MODELS, MACHINES, MODELLED_AS_ABSENT,
    MODELLED_DEVICES, UNSUPPORTED_HINT,
};
pub use disks::VIRTIO_BLK;
pub use ide::{IDE_DEVICES, PIIX3_SLOT};
pub use nics::{NicConfig, TapSource, VIRTIO_NET};
pub use opts::Opts;
pub use rngs::{RngDeviceConfig, DEFAULT_RNG_FILE, RNG_BACKENDS, VIRTIO_RNG};
pub use size::parse_size;

/// A command-line error; `Display` is the text QEMU-style tools print after
/// the program name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgvError {
    /// The option does not exist (in QEMU or in ferry-qemu).
    #[error("{option}: invalid option")]
    UnknownOption { option: String },
    /// The option needs an argument and none followed.
    #[error("{option}: requires an argument")]
    MissingArgument { option: String },
    /// The option's argument is malformed.
    #[error("{option} {value}: {reason}")]
    Invalid {
        option: String,
        value: String,
        reason: String,
    },
    /// The option parsed, but ferry cannot honour it.
    #[error("{option}: {what} is not supported by ferry-qemu")]
    Unsupported { option: String, what: String },
    /// As `Unsupported`, with what to do instead.
    #[error("{option}: {what} is not supported by ferry-qemu: {fix}")]
    UnsupportedBecause {
        option: String,
        what: String,
        fix: String,
    },
    /// A bare argument (QEMU would take it as a disk image).
    #[error("{arg}: disk images given as positional arguments are not supported by ferry-qemu")]
    Positional { arg: String },
}

impl ArgvError {
    pub(crate) fn invalid(option: &str, value: &str, reason: &str) -> Self {
        Self::Invalid {
            option: option.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn unsupported(option: &str, what: impl Into<String>) -> Self {
        Self::Unsupported {
            option: option.to_string(),
            what: what.into(),
        }
    }

    pub(crate) fn unsupported_because(
        option: &str,
        what: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self::UnsupportedBecause {
            option: option.to_string(),
            what: what.into(),
            fix: fix.into(),
        }
    }
}

/// What the process is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Run a machine (or the `-machine none` probe).
    #[default]
    Run,
    /// `-version`: print the version and exit.
    Version,
    /// `-help`/`-h`: print usage and exit.
    Help,
}

/// An accelerator named by `-accel`, `-enable-kvm` or `-machine accel=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
    Other(String),
}

impl Accel {
    fn from_name(s: &str) -> Self {
        match s {
            "kvm" => Self::Kvm,
            "tcg" => Self::Tcg,
            other => Self::Other(other.to_string()),
        }
    }
}

/// `-m`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryOpts {
    pub size_bytes: u64,
    pub slots: Option<u64>,
    pub maxmem_bytes: Option<u64>,
}

/// `-smp`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SmpOpts {
    pub cpus: Option<u64>,
    pub sockets: Option<u64>,
    pub dies: Option<u64>,
    pub cores: Option<u64>,
    pub threads: Option<u64>,
    pub maxcpus: Option<u64>,
}

impl SmpOpts {
    /// The vCPU count QEMU would boot with.
    pub fn boot_cpus(&self) -> u64 {
        self.cpus.unwrap_or_else(|| {
            let topo = self.sockets.unwrap_or(1)
                * self.dies.unwrap_or(1)
                * self.cores.unwrap_or(1)
                * self.threads.unwrap_or(1);
            self.maxcpus.map_or(topo, |m| m.min(topo).max(1))
        })
    }
}

/// `-cpu model[,feat=on|off|+feat|-feat]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuOpts {
    pub model: String,
    /// `(feature, enabled)` in order.
    pub features: Vec<(String, String)>,
}

/// `-name guest=N,debug-threads=on` (or `-name N`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameOpts {
    pub guest: Option<String>,
    pub debug_threads: bool,
    pub process: Option<String>,
}

/// A `-chardev` (or the implicit one behind `-qmp`/`-serial`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chardev {
    pub id: String,
    pub backend: ChardevBackend,
    /// `logfile=` (may be `/dev/fdset/N`).
    pub logfile: Option<String>,
    pub logappend: bool,
}

/// Chardev backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChardevBackend {
    /// A listening or connecting socket.
    Socket(SocketAddr),
    Pty,
    Stdio,
    Null,
    File {
        path: String,
    },
    /// Anything else that parsed (`spicevmc`, `pipe`, ...), kept by name.
    Other {
        kind: String,
        opts: Opts,
    },
}

/// Where a socket chardev lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketAddr {
    pub endpoint: SocketEndpoint,
    pub server: bool,
    pub wait: bool,
}

/// Socket chardev endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketEndpoint {
    Unix(PathBuf),
    /// An inherited socket; for `server=on` it is already listening.
    Fd(i32),
    Tcp {
        host: String,
        port: String,
    },
}

/// A monitor (`-mon` or `-qmp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorSpec {
    pub chardev: String,
    pub control: bool,
    pub pretty: bool,
}

/// `-serial`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialSpec {
    /// Uses this chardev id (implicit chardevs are named `serialN`).
    Chardev(String),
    /// `-serial none`.
    None,
}

/// `-add-fd set=N,fd=M[,opaque=S]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddFd {
    pub set: u64,
    pub fd: i32,
    pub opaque: Option<String>,
}

/// `-object`, `-device`, `-netdev`, `-blockdev`, `-audiodev`: a typed head
/// plus the remaining properties as JSON (key=value values are strings).
#[derive(Debug, Clone, PartialEq)]
pub struct Typed {
    /// `qom-type`, `driver`, `type` or `driver` (blockdev/audiodev).
    pub kind: String,
    pub id: Option<String>,
    pub props: Map<String, Value>,
}

/// `-incoming`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Defer,
    Tcp(String),
    Unix(PathBuf),
    Fd(i32),
    File(PathBuf),
    Exec(String),
}

impl Incoming {
    /// Parses a migration URI (also used by `migrate-incoming`).
    pub fn parse(s: &str) -> Option<Self> {
        if s == "defer" {
            return Some(Self::Defer);
        }
        let (scheme, rest) = s.split_once(':')?;
        Some(match scheme {
            "tcp" => Self::Tcp(rest.to_string()),
            "unix" => Self::Unix(PathBuf::from(rest)),
            "fd" => Self::Fd(rest.parse().ok()?),
            "file" => Self::File(PathBuf::from(rest)),
            "exec" => Self::Exec(rest.to_string()),
            _ => return None,
        })
    }
}

/// A parsed command line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Invocation {
    pub mode: Mode,
    /// `-machine`/`-M` type (`none`, `pc`, ...); `None` = the default.
    pub machine: Option<String>,
    /// `-machine` properties other than `type` and `accel`.
    pub machine_props: Opts,
    /// Accelerators in order of preference (`accel=kvm:tcg` → `[Kvm, Tcg]`).
    pub accel: Vec<Accel>,
    pub memory: Option<MemoryOpts>,
    pub smp: Option<SmpOpts>,
    pub cpu: Option<CpuOpts>,
    pub kernel: Option<PathBuf>,
    /// `-bios FILE`: the firmware a guest without `-kernel` boots through.
    pub bios: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    pub name: Option<NameOpts>,
    pub uuid: Option<String>,
    /// `-S`: do not start the vCPUs.
    pub start_paused: bool,
    pub daemonize: bool,
    pub pidfile: Option<PathBuf>,
    pub no_user_config: bool,
    pub nodefaults: bool,
    pub nographic: bool,
    pub display: Option<String>,
    pub no_shutdown: bool,
    pub no_reboot: bool,
    pub no_acpi: bool,
    /// `-no-hpet` (ferry has no HPET either way).
    pub no_hpet: bool,
    /// `-smbios`, in order: the argument as given and its pairs (checked in
    /// config.rs, where QEMU checks them: at machine creation).
    pub smbios: Vec<(String, Opts)>,
    pub boot: Option<Opts>,
    pub rtc: Option<Opts>,
    pub globals: Vec<String>,
    pub overcommit: Vec<Opts>,
    pub msg_timestamp: bool,
    pub sandbox: Option<Opts>,
    pub chardevs: Vec<Chardev>,
    pub monitors: Vec<MonitorSpec>,
    pub serials: Vec<SerialSpec>,
    pub add_fds: Vec<AddFd>,
    pub objects: Vec<Typed>,
    pub blockdevs: Vec<Typed>,
    /// `-drive` (key=value only, as QEMU).
    pub drives: Vec<Opts>,
    pub devices: Vec<Typed>,
    pub netdevs: Vec<Typed>,
    pub audiodevs: Vec<Typed>,
    /// Options ferry parses but refuses at the policy stage, verbatim.
    pub refused_options: Vec<(String, String)>,
    pub incoming: Option<Incoming>,
}

/// Every option ferry-qemu knows, and whether it takes an argument.
pub const OPTIONS: &[(&str, bool)] = &[
    ("S", false),
    ("daemonize", false),
    ("no-user-config", false),
    ("nodefaults", false),
    ("nographic", false),
    ("no-shutdown", false),
    ("no-reboot", false),
    ("no-acpi", false),
    ("no-hpet", false),
    ("enable-kvm", false),
    ("version", false),
    ("help", false),
    ("h", false),
    ("machine", true),
    ("M", true),
    ("accel", true),
    ("m", true),
    ("smp", true),
    ("cpu", true),
    ("kernel", true),
    ("initrd", true),
    ("append", true),
    ("name", true),
    ("uuid", true),
    ("pidfile", true),
    ("display", true),
    ("boot", true),
    ("rtc", true),
    ("global", true),
    ("overcommit", true),
    ("msg", true),
    ("sandbox", true),
    ("qmp", true),
    ("chardev", true),
    ("mon", true),
    ("serial", true),
    ("add-fd", true),
    ("object", true),
    ("blockdev", true),
    ("drive", true),
    ("device", true),
    ("netdev", true),
    ("incoming", true),
    ("audiodev", true),
    ("smbios", true),
    // Parsed so that the refusal can name them (see config.rs).
    ("spice", true),
    ("vga", true),
    ("vnc", true),
    ("bios", true),
    ("L", true),
    ("numa", true),
    ("fw_cfg", true),
];

/// Parses `args` (without `argv[0]`).
pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Invocation, ArgvError> {
    let mut inv = Invocation::default();
    let mut i = 0;
    let mut serial_index = 0usize;
    while i < args.len() {
        let raw = args[i].as_ref();
        i += 1;
        let Some(name) = raw.strip_prefix("--").or_else(|| raw.strip_prefix('-')) else {
            return Err(ArgvError::Positional {
                arg: raw.to_string(),
            });
        };
        let option = format!("-{name}");
        let Some(&(_, takes_arg)) = OPTIONS.iter().find(|(n, _)| *n == name) else {
            return Err(ArgvError::UnknownOption { option });
        };
        let arg = if takes_arg {
            let a = args.get(i).ok_or_else(|| ArgvError::MissingArgument {
                option: option.clone(),
            })?;
            i += 1;
            a.as_ref()
        } else {
            ""
        };
        apply(&mut inv, name, &option, arg, &mut serial_index)?;
    }
    Ok(inv)
}

fn apply(
    inv: &mut Invocation,
    name: &str,
    option: &str,
    arg: &str,
    serial_index: &mut usize,
) -> Result<(), ArgvError> {
    match name {
        "S" => inv.start_paused = true,
        "daemonize" => inv.daemonize = true,
        "no-user-config" => inv.no_user_config = true,
        "nodefaults" => inv.nodefaults = true,
        "nographic" => inv.nographic = true,
        "no-shutdown" => inv.no_shutdown = true,
        "no-reboot" => inv.no_reboot = true,
        "no-acpi" => inv.no_acpi = true,
        "no-hpet" => inv.no_hpet = true,
        "smbios" => inv
            .smbios
            .push((arg.to_string(), Opts::parse(option, arg, None)?)),
        "enable-kvm" => inv.accel = vec![Accel::Kvm],
        "version" => inv.mode = Mode::Version,
        "help" | "h" => inv.mode = Mode::Help,
        "machine" | "M" => {
            let o = Opts::parse(option, arg, Some("type"))?;
            for (k, v) in o.pairs() {
                match k.as_str() {
                    "type" => inv.machine = Some(v.clone()),
                    "accel" => inv.accel = v.split(':').map(Accel::from_name).collect(),
                    _ => inv.machine_props.push(k, v),
                }
            }
        }
        "accel" => {
            let o = Opts::parse(option, arg, Some("accel"))?;
            let accel = o
                .get("accel")
                .ok_or_else(|| ArgvError::invalid(option, arg, "missing accelerator name"))?;
            inv.accel = vec![Accel::from_name(accel)];
        }
        "m" => inv.memory = Some(parse_memory(option, arg)?),
        "smp" => inv.smp = Some(parse_smp(option, arg)?),
        "cpu" => {
            let mut parts = arg.split(',');
            let model = parts.next().unwrap_or_default().to_string();
            if model.is_empty() {
                return Err(ArgvError::invalid(option, arg, "missing CPU model name"));
            }
            let features = parts
                .filter(|f| !f.is_empty())
                .map(ferry_vmm::cpu::model::parse_feature)
                .collect();
            inv.cpu = Some(CpuOpts { model, features });
        }
        "kernel" => inv.kernel = Some(PathBuf::from(arg)),
        "bios" => inv.bios = Some(PathBuf::from(arg)),
        "initrd" => inv.initrd = Some(PathBuf::from(arg)),
        "append" => inv.append = Some(arg.to_string()),
        "name" => {
            let o = Opts::parse(option, arg, Some("guest"))?;
            if let Some(bad) = o
                .unknown_keys(&["guest", "debug-threads", "process"])
                .first()
            {
                return Err(ArgvError::invalid(
                    option,
                    arg,
                    &format!("invalid parameter '{bad}'"),
                ));
            }
            inv.name = Some(NameOpts {
                guest: o.get("guest").map(str::to_string),
                debug_threads: o.get_bool(option, "debug-threads")?.unwrap_or(false),
                process: o.get("process").map(str::to_string),
            });
        }
        "uuid" => {
            if !is_uuid(arg) {
                return Err(ArgvError::invalid(option, arg, "invalid UUID"));
            }
            inv.uuid = Some(arg.to_string());
        }
        "pidfile" => inv.pidfile = Some(PathBuf::from(arg)),
        "display" => inv.display = Some(arg.to_string()),
        "boot" => inv.boot = Some(Opts::parse(option, arg, Some("order"))?),
        "rtc" => inv.rtc = Some(Opts::parse(option, arg, None)?),
        "global" => inv.globals.push(arg.to_string()),
        "overcommit" => inv.overcommit.push(Opts::parse(option, arg, None)?),
        "msg" => {
            let o = Opts::parse(option, arg, None)?;
            inv.msg_timestamp = o.get_bool(option, "timestamp")?.unwrap_or(false);
        }
        "sandbox" => inv.sandbox = Some(Opts::parse(option, arg, Some("enable"))?),
        "qmp" => {
            let id = format!("compat_monitor{}", inv.monitors.len());
            let backend = parse_socket_shorthand(option, arg)?;
            inv.chardevs.push(Chardev {
                id: id.clone(),
                backend,
                logfile: None,
                logappend: false,
            });
            inv.monitors.push(MonitorSpec {
                chardev: id,
                control: true,
                pretty: false,
            });
        }
        "chardev" => {
            let c = parse_chardev(option, arg)?;
            if inv.chardevs.iter().any(|x| x.id == c.id) {
                return Err(ArgvError::invalid(
                    option,
                    arg,
                    &format!("duplicate chardev id '{}'", c.id),
                ));
            }
            inv.chardevs.push(c);
        }
        "mon" => {
            let o = Opts::parse(option, arg, Some("chardev"))?;
            let chardev = o
                .get("chardev")
                .ok_or_else(|| ArgvError::invalid(option, arg, "parameter 'chardev' is missing"))?
                .to_string();
            let mode = o.get("mode").unwrap_or("readline");
            if mode != "control" && mode != "readline" {
                return Err(ArgvError::invalid(
                    option,
                    arg,
                    &format!("invalid monitor mode '{mode}'"),
                ));
            }
            inv.monitors.push(MonitorSpec {
                chardev,
                control: mode == "control",
                pretty: o.get_bool(option, "pretty")?.unwrap_or(false),
            });
        }
        "serial" => {
            if arg == "none" {
                inv.serials.push(SerialSpec::None);
            } else if let Some(id) = arg.strip_prefix("chardev:") {
                inv.serials.push(SerialSpec::Chardev(id.to_string()));
            } else {
                let id = format!("serial{}", *serial_index);
                let backend = match arg {
                    "stdio" => ChardevBackend::Stdio,
                    "pty" => ChardevBackend::Pty,
                    "null" => ChardevBackend::Null,
                    _ => {
                        if let Some(path) = arg.strip_prefix("file:") {
                            ChardevBackend::File {
                                path: path.to_string(),
                            }
                        } else {
                            parse_socket_shorthand(option, arg)?
                        }
                    }
                };
                inv.chardevs.push(Chardev {
                    id: id.clone(),
                    backend,
                    logfile: None,
                    logappend: false,
                });
                inv.serials.push(SerialSpec::Chardev(id));
            }
            *serial_index += 1;
        }
        "add-fd" => {
            let o = Opts::parse(option, arg, None)?;
            let fd = o
                .get_u64(option, "fd")?
                .ok_or_else(|| ArgvError::invalid(option, arg, "parameter 'fd' is missing"))?;
            let set = o
                .get_u64(option, "set")?
                .ok_or_else(|| ArgvError::invalid(option, arg, "parameter 'set' is missing"))?;
            let fd = i32::try_from(fd)
                .ok()
                .filter(|fd| *fd > 2)
                .ok_or_else(|| ArgvError::invalid(option, arg, "fd must be above 2"))?;
            inv.add_fds.push(AddFd {
                set,
                fd,
                opaque: o.get("opaque").map(str::to_string),
            });
        }
        "object" => inv.objects.push(typed(option, arg, "qom-type")?),
        "device" => inv.devices.push(typed(option, arg, "driver")?),
        "netdev" => inv.netdevs.push(typed(option, arg, "type")?),
        "audiodev" => inv.audiodevs.push(typed(option, arg, "driver")?),
        "blockdev" => {
            let props = if arg.trim_start().starts_with('{') {
                opts::parse_json_object(option, arg)?
            } else {
                Opts::parse(option, arg, None)?.to_json()
            };
            inv.blockdevs
                .push(from_props(option, arg, "driver", props, "node-name")?);
        }
        "drive" => inv.drives.push(Opts::parse(option, arg, None)?),
        "incoming" => {
            inv.incoming = Some(
                Incoming::parse(arg)
                    .ok_or_else(|| ArgvError::invalid(option, arg, "unknown migration URI"))?,
            );
        }
        // Known spellings ferry refuses later, with the option named.
        _ => inv
            .refused_options
            .push((option.to_string(), arg.to_string())),
    }
    Ok(())
}

fn typed(option: &str, arg: &str, head: &str) -> Result<Typed, ArgvError> {
    let props = opts::parse_json_or_opts(option, arg, head)?;
    from_props(option, arg, head, props, "id")
}

fn from_props(
    option: &str,
    arg: &str,
    head: &str,
    mut props: Map<String, Value>,
    id_key: &str,
) -> Result<Typed, ArgvError> {
    let kind = match props.remove(head) {
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(_) => {
            return Err(ArgvError::invalid(
                option,
                arg,
                &format!("parameter '{head}' expects a string"),
            ))
        }
        None => {
            return Err(ArgvError::invalid(
                option,
                arg,
                &format!("parameter '{head}' is missing"),
            ))
        }
    };
    let id = match props.remove(id_key) {
        Some(Value::String(s)) => Some(s),
        Some(_) => {
            return Err(ArgvError::invalid(
                option,
                arg,
                &format!("parameter '{id_key}' expects a string"),
            ))
        }
        None => None,
    };
    Ok(Typed { kind, id, props })
}

fn parse_memory(option: &str, arg: &str) -> Result<MemoryOpts, ArgvError> {
    let o = Opts::parse(option, arg, Some("size"))?;
    if let Some(bad) = o.unknown_keys(&["size", "slots", "maxmem"]).first() {
        return Err(ArgvError::invalid(
            option,
            arg,
            &format!("invalid parameter '{bad}'"),
        ));
    }
    let size = o
        .get("size")
        .ok_or_else(|| ArgvError::invalid(option, arg, "missing 'size'"))?;
    // A bare number is MiB (QEMU's default suffix for -m).
    let size_bytes = parse_size(size, 1 << 20)
        .filter(|s| *s > 0)
        .ok_or_else(|| ArgvError::invalid(option, arg, "invalid RAM size"))?;
    let maxmem_bytes = o
        .get("maxmem")
        .map(|m| {
            parse_size(m, 1).ok_or_else(|| ArgvError::invalid(option, arg, "invalid 'maxmem' size"))
        })
        .transpose()?;
    Ok(MemoryOpts {
        size_bytes,
        slots: o.get_u64(option, "slots")?,
        maxmem_bytes,
    })
}

fn parse_smp(option: &str, arg: &str) -> Result<SmpOpts, ArgvError> {
    let o = Opts::parse(option, arg, Some("cpus"))?;
    let known = ["cpus", "sockets", "dies", "cores", "threads", "maxcpus"];
    if let Some(bad) = o.unknown_keys(&known).first() {
        return Err(ArgvError::invalid(
            option,
            arg,
            &format!("invalid parameter '{bad}'"),
        ));
    }
    let smp = SmpOpts {
        cpus: o.get_u64(option, "cpus")?,
        sockets: o.get_u64(option, "sockets")?,
        dies: o.get_u64(option, "dies")?,
        cores: o.get_u64(option, "cores")?,
        threads: o.get_u64(option, "threads")?,
        maxcpus: o.get_u64(option, "maxcpus")?,
    };
    if smp.boot_cpus() == 0 {
        return Err(ArgvError::invalid(
            option,
            arg,
            "CPU count must be at least 1",
        ));
    }
    Ok(smp)
}

/// `unix:PATH[,server=on,wait=off]`, `tcp:HOST:PORT[,...]`, `stdio`.
fn parse_socket_shorthand(option: &str, arg: &str) -> Result<ChardevBackend, ArgvError> {
    if arg == "stdio" {
        return Ok(ChardevBackend::Stdio);
    }
    let (scheme, rest) = arg
        .split_once(':')
        .ok_or_else(|| ArgvError::invalid(option, arg, "expected unix:PATH or tcp:HOST:PORT"))?;
    let o = Opts::parse(option, rest, Some("addr"))?;
    let addr = o.get("addr").unwrap_or_default();
    let endpoint = match scheme {
        "unix" => SocketEndpoint::Unix(PathBuf::from(addr)),
        "tcp" => {
            let (host, port) = addr
                .rsplit_once(':')
                .ok_or_else(|| ArgvError::invalid(option, arg, "expected tcp:HOST:PORT"))?;
            SocketEndpoint::Tcp {
                host: host.to_string(),
                port: port.to_string(),
            }
        }
        _ => {
            return Err(ArgvError::invalid(
                option,
                arg,
                &format!("unknown chardev address type '{scheme}'"),
            ))
        }
    };
    Ok(ChardevBackend::Socket(SocketAddr {
        endpoint,
        server: o.get_bool(option, "server")?.unwrap_or(false),
        wait: o.get_bool(option, "wait")?.unwrap_or(true),
    }))
}

fn parse_chardev(option: &str, arg: &str) -> Result<Chardev, ArgvError> {
    let o = Opts::parse(option, arg, Some("backend"))?;
    let backend_name = o
        .get("backend")
        .ok_or_else(|| ArgvError::invalid(option, arg, "missing backend"))?;
    let id = o
        .get("id")
        .filter(|id| !id.is_empty())
        .ok_or_else(|| ArgvError::invalid(option, arg, "parameter 'id' is missing"))?
        .to_string();
    let backend = match backend_name {
        "socket" => {
            let endpoint = if let Some(path) = o.get("path") {
                SocketEndpoint::Unix(PathBuf::from(path))
            } else if let Some(fd) = o.get("fd") {
                SocketEndpoint::Fd(
                    fd.parse()
                        .ok()
                        .filter(|fd: &i32| *fd > 2)
                        .ok_or_else(|| ArgvError::invalid(option, arg, "invalid 'fd'"))?,
                )
            } else if let (Some(host), Some(port)) = (o.get("host"), o.get("port")) {
                SocketEndpoint::Tcp {
                    host: host.to_string(),
                    port: port.to_string(),
                }
            } else {
                return Err(ArgvError::invalid(
                    option,
                    arg,
                    "socket chardev needs 'path', 'fd' or 'host'+'port'",
                ));
            };
            ChardevBackend::Socket(SocketAddr {
                endpoint,
                server: o.get_bool(option, "server")?.unwrap_or(false),
                wait: o.get_bool(option, "wait")?.unwrap_or(true),
            })
        }
        "pty" => ChardevBackend::Pty,
        "stdio" => ChardevBackend::Stdio,
        "null" => ChardevBackend::Null,
        "file" => ChardevBackend::File {
            path: o
                .get("path")
                .ok_or_else(|| ArgvError::invalid(option, arg, "parameter 'path' is missing"))?
                .to_string(),
        },
        other => ChardevBackend::Other {
            kind: other.to_string(),
            opts: o.clone(),
        },
    };
    Ok(Chardev {
        id,
        backend,
        logfile: o.get("logfile").map(str::to_string),
        logappend: o.get_bool(option, "logappend")?.unwrap_or(false),
    })
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests;
