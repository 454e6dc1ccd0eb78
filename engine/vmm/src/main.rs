//! `ferry-vm`: run a VM on /dev/kvm, checkpoint it over a control socket, restore it.
//!
//! The command line is in [`ferry_vmm::cli`] (also the source of the man page).
//! Exit status ([`ferry_vmm::cli::EXIT_STATUS`]): 0 guest powered off, `quit`, or
//! migrated away; 1 error; 2 usage; 3 guest reset or triple fault; 4 KVM could not
//! run the guest.

use std::process::ExitCode;

use clap::Parser;

use ferry_vmm::cli::{Cli, Command, EXIT_ERROR, EXIT_GUEST_RESET, EXIT_KVM_FAILED};
use ferry_vmm::control::{self, RunOutcome};
use ferry_vmm::migration::{CredsSpec, Destination, Endpoint, MigrationError, Target, TlsCreds};
use ferry_vmm::persist::{self, RestoreOptions};
use ferry_vmm::{GuestExit, KernelConfig, Vm, VmConfig, VmmError};

/// Why ferry-vm stopped with an error.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("incoming migration")]
    Incoming(#[source] MigrationError),
}

impl From<MigrationError> for RunError {
    /// The VM's own refusals read as they do for a restore.
    fn from(e: MigrationError) -> Self {
        match e {
            MigrationError::Vmm(v) => Self::Vmm(v),
            other => Self::Incoming(other),
        }
    }
}

fn main() -> ExitCode {
    // First, before anything opens a file: `--net fd=N` takes only an fd
    // inherited at exec.
    if let Err(e) = ferry_kvm::fd::record_inherited() {
        eprintln!("ferry-vm: cannot list inherited file descriptors in /proc/self/fd: {e}");
        return ExitCode::from(EXIT_ERROR);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("ferry-vm: {}", ferry_vmm::error_chain(&e));
            eprintln!("{msg}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, RunError> {
    let (vm, common) = match cli.command {
        Command::Run {
            kernel,
            initrd,
            append,
            mem,
            smp,
            cpu,
            smbios,
            common,
        } => {
            let mut tables = ferry_boot::SmbiosConfig::for_vcpus(smp);
            for arg in &smbios {
                arg.apply(&mut tables)
                    .map_err(|e| VmmError::Config(format!("--smbios: {e}")))?;
            }
            // Through firmware, the SMBIOS tables are fw_cfg files the firmware
            // installs; with a kernel, ferry writes them below 1 MiB.
            let firmware = common
                .firmware_config()
                .map(|fw| ferry_vmm::firmware::FirmwareConfig {
                    smbios: Some(tables.clone()),
                    ..fw
                });
            let mut vm = Vm::create(VmConfig {
                mem_bytes: mem,
                vcpus: smp,
                backing: common.backing.into(),
                serial: common.serial.clone(),
                cpu,
                virtio: common.virtio()?,
                ide: common.ide()?,
                fw_cfg: common.fw_cfg_config(),
                firmware,
                rtc: common.rtc_config(),
            })?;
            if let Some(kernel) = kernel {
                vm.boot(&KernelConfig {
                    kernel,
                    initrd,
                    cmdline: append,
                    smbios: Some(tables),
                })?;
            }
            (vm, common)
        }
        Command::Incoming {
            uri,
            mem,
            smp,
            max_streams,
            tls_creds,
            common,
        } => {
            let tls = tls_creds
                .map(|spec| {
                    CredsSpec::parse(&spec).and_then(|s| TlsCreds::load(s, Endpoint::Server))
                })
                .transpose()
                .map_err(|e| VmmError::Config(e.to_string()))?;
            let target: Target = uri.parse()?;
            let destination = Destination::open(target, tls)?;
            if let Some(port) = destination.local_port() {
                eprintln!("ferry-vm: listening on port {port}");
            }
            if destination.listens() {
                // A source may connect from now on (scripts and tests wait for this line).
                eprintln!("ferry-vm: listening on {uri}");
            }
            let vm = destination.serve(
                &RestoreOptions {
                    backing: common.backing.into(),
                    serial: common.serial.clone(),
                    expect_mem_bytes: Some(mem),
                    expect_vcpus: Some(smp),
                    autostart: !common.paused,
                    virtio: common.virtio()?,
                    ide: common.ide()?,
                    fw_cfg: common.fw_cfg_config(),
                    firmware: common.firmware_config(),
                    rtc: common.rtc_config(),
                    on_postcopy: None,
                },
                &mut || {},
                // A file or a pipe carries one stream.
                &|| max_streams,
            )?;
            (vm, common)
        }
        Command::Restore { file, mem, common } => {
            let f = std::fs::File::open(&file).map_err(|e| {
                VmmError::Io(format!("cannot open checkpoint {}", file.display()), e)
            })?;
            let vm = persist::restore(
                std::io::BufReader::with_capacity(1 << 20, f),
                &RestoreOptions {
                    backing: common.backing.into(),
                    serial: common.serial.clone(),
                    expect_mem_bytes: mem,
                    expect_vcpus: None,
                    autostart: false,
                    virtio: common.virtio()?,
                    ide: common.ide()?,
                    fw_cfg: common.fw_cfg_config(),
                    firmware: common.firmware_config(),
                    rtc: common.rtc_config(),
                    on_postcopy: None,
                },
            )
            .map_err(|e| match e {
                VmmError::Restore(m) => VmmError::Restore(format!("{}: {m}", file.display())),
                VmmError::Load(e) => VmmError::Restore(format!("{}: {e}", file.display())),
                // The device's refusal, named with the file (as the text above).
                VmmError::DeviceState(e) => VmmError::Restore(format!("{}: {e}", file.display())),
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
            ExitCode::from(EXIT_GUEST_RESET)
        }
        RunOutcome::Guest(GuestExit::Crashed(why)) => {
            eprintln!("ferry-vm: {why}");
            ExitCode::from(EXIT_KVM_FAILED)
        }
    })
}
