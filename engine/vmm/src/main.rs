//! `ferry-vm`: run a VM on /dev/kvm, checkpoint it over a control socket, restore it.
//!
//! Exit status: 0 guest powered off or `quit`; 1 error; 2 usage; 3 guest reset or
//! triple fault; 4 KVM could not run the guest.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use ferry_kvm::Backing;
use ferry_vmm::checkpoint::{self, RestoreOptions};
use ferry_vmm::control::{self, RunOutcome};
use ferry_vmm::devices::serial::SinkSpec;
use ferry_vmm::migration::{self, IncomingOptions, Listener, MigrationUri};

fn migration_err(e: migration::TransportError) -> ferry_vmm::VmmError {
    ferry_vmm::VmmError::Config(e.to_string())
}
use ferry_vmm::{GuestExit, KernelConfig, Vm, VmConfig};

#[derive(Parser, Debug)]
#[command(
    name = "ferry-vm",
    version,
    about = "Run, checkpoint and restore a KVM virtual machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug)]
struct Common {
    /// Where COM1's output goes: stdio, file:PATH, unix:PATH[,server], pty or null.
    #[arg(long, default_value = "stdio")]
    serial: SinkSpec,
    /// Control socket (commands: status, pause, resume, checkpoint PATH, dump PATH, quit).
    #[arg(long)]
    control: Option<PathBuf>,
    /// How guest RAM is backed.
    #[arg(long, value_enum, default_value_t = BackingArg::Anonymous)]
    backing: BackingArg,
    /// Do not start the vCPUs (like QEMU's -S); `resume` on the control socket starts them.
    #[arg(long)]
    paused: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a kernel: a PVH ELF image, an ELF vmlinux or a bzImage.
    Run {
        /// The kernel image.
        #[arg(long)]
        kernel: PathBuf,
        /// An initial ramdisk.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// The kernel command line.
        #[arg(long, default_value = "")]
        append: String,
        /// Guest RAM, e.g. 256M or 1G.
        #[arg(short = 'm', long, default_value = "256M", value_parser = parse_size)]
        mem: u64,
        /// Number of vCPUs.
        #[arg(long, default_value_t = 1)]
        smp: u32,
        #[command(flatten)]
        common: Common,
    },
    /// Wait for an incoming live migration on URI (tcp:HOST:PORT, unix:PATH, file:PATH),
    /// then run the VM.
    Incoming {
        /// Where to listen.
        uri: String,
        /// Expected guest RAM; refused if the incoming VM's differs.
        #[arg(short = 'm', long, value_parser = parse_size)]
        mem: Option<u64>,
        #[command(flatten)]
        common: Common,
    },
    /// Restore a VM from a checkpoint and run it.
    Restore {
        /// The checkpoint file.
        file: PathBuf,
        /// Expected guest RAM; refused if the checkpoint's differs.
        #[arg(short = 'm', long, value_parser = parse_size)]
        mem: Option<u64>,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum BackingArg {
    Anonymous,
    Shared,
    Memfd,
    Hugepages,
}

impl From<BackingArg> for Backing {
    fn from(b: BackingArg) -> Self {
        match b {
            BackingArg::Anonymous => Backing::Anonymous,
            BackingArg::Shared => Backing::Shared,
            BackingArg::Memfd => Backing::Memfd,
            BackingArg::Hugepages => Backing::HugePages,
        }
    }
}

/// Parses sizes the way QEMU's -m does: a number with an optional K/M/G/T suffix;
/// a plain number means MiB.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(format!(
                        "unknown size suffix '{c}' in '{s}': use K, M, G or T"
                    ))
                }
            };
            (&s[..i], m)
        }
        _ => (s, 1 << 20),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size: use e.g. 256M or 1G"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let mut msg = format!("ferry-vm: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("{msg}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, ferry_vmm::VmmError> {
    let (vm, common) = match cli.command {
        Command::Run {
            kernel,
            initrd,
            append,
            mem,
            smp,
            common,
        } => {
            let mut vm = Vm::create(VmConfig {
                mem_bytes: mem,
                vcpus: smp,
                backing: common.backing.into(),
                serial: common.serial.clone(),
            })?;
            vm.boot(&KernelConfig {
                kernel,
                initrd,
                cmdline: append,
            })?;
            (vm, common)
        }
        Command::Incoming { uri, mem, common } => {
            let uri: MigrationUri = uri.parse().map_err(migration_err)?;
            let listener = Listener::bind(&uri).map_err(migration_err)?;
            if let Some(port) = listener.local_port() {
                eprintln!("ferry-vm: listening on port {port}");
            }
            let ch = listener.accept().map_err(migration_err)?;
            let reader = ch.reader;
            let writer = ch.has_return_path.then_some(ch.writer);
            let vm = migration::receive(
                reader,
                writer,
                &IncomingOptions {
                    backing: common.backing.into(),
                    serial: common.serial.clone(),
                    expect_mem_bytes: mem,
                    autostart: !common.paused,
                },
            )
            .map_err(|e| match e {
                migration::MigrationError::Vmm(v) => v,
                other => ferry_vmm::VmmError::Restore(format!("incoming migration: {other}")),
            })?;
            (vm, common)
        }
        Command::Restore { file, mem, common } => {
            let f = std::fs::File::open(&file).map_err(|e| {
                ferry_vmm::VmmError::Io(format!("cannot open checkpoint {}", file.display()), e)
            })?;
            let vm = checkpoint::restore(
                std::io::BufReader::with_capacity(1 << 20, f),
                &RestoreOptions {
                    backing: common.backing.into(),
                    serial: common.serial.clone(),
                    expect_mem_bytes: mem,
                },
            )
            .map_err(|e| match e {
                ferry_vmm::VmmError::Restore(m) => {
                    ferry_vmm::VmmError::Restore(format!("{}: {m}", file.display()))
                }
                other => other,
            })?;
            (vm, common)
        }
    };
    let start = !common.paused && !vm.is_running();
    if let Some(p) = vm.serial_pty() {
        eprintln!("ferry-vm: serial console on {}", p.display());
    }
    let outcome = control::run(vm, common.control.as_deref(), start)?;
    Ok(match outcome {
        RunOutcome::Quit | RunOutcome::Guest(GuestExit::Poweroff) => ExitCode::SUCCESS,
        RunOutcome::Migrated => {
            eprintln!("ferry-vm: the VM migrated away");
            ExitCode::SUCCESS
        }
        RunOutcome::Guest(GuestExit::Reset(why)) => {
            eprintln!("ferry-vm: guest reset: {why}");
            ExitCode::from(3)
        }
        RunOutcome::Guest(GuestExit::Crashed(why)) => {
            eprintln!("ferry-vm: {why}");
            ExitCode::from(4)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512k").unwrap(), 512 << 10);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
