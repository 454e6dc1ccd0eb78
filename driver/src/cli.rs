//! The command line: the one definition behind `--help`, man pages and completions.

use clap::{Args, Parser, Subcommand};

/// Exit status: success (all checks passed, migration completed).
pub const EXIT_OK: i32 = 0;
/// Exit status: an error (cannot connect, no such domain, migration failed).
pub const EXIT_ERROR: i32 = 1;
/// Exit status: bad usage (clap's own code).
pub const EXIT_USAGE: i32 = 2;
/// Exit status: blocked, a pre-flight check failed; nothing was changed.
pub const EXIT_BLOCKED: i32 = 3;

const EXIT_STATUS: &str = "\
EXIT STATUS:
  0  success: every check passed / the migration completed / the job was read or aborted
  1  error: cannot connect, no such domain, the migration failed or was cancelled
  2  usage: bad command line
  3  blocked: a pre-flight check failed; the domain was not touched";

/// Live migration of ferry guests through libvirt: pre-flight checks, migrate,
/// watch and cancel.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, after_help = EXIT_STATUS)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct SourceArgs {
    /// libvirt URI of the source host (default: libvirt's default URI)
    #[arg(short = 'c', long = "connect", value_name = "SRC-URI")]
    pub connect: Option<String>,
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Machine-readable output: one JSON object (check, status) or JSON lines (migrate)
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pre-flight checks: would DOMAIN migrate to DEST-URI? Reads the domain's XML
    /// and asks the destination; never touches the running domain.
    #[command(after_help = EXIT_STATUS)]
    Check {
        /// Domain name on the source host
        domain: String,
        /// libvirt URI of the destination host, e.g. qemu+tcp://hostb/system
        #[arg(value_name = "DEST-URI")]
        dest_uri: String,
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        output: OutputArgs,
        /// Accept storage that is not shared (like virsh migrate --unsafe)
        #[arg(long = "unsafe")]
        allow_unsafe: bool,
    },
    /// Show the progress of DOMAIN's running job (a migration), or the last completed one
    #[command(after_help = EXIT_STATUS)]
    Status {
        domain: String,
        /// The statistics of the last completed job instead of the running one
        #[arg(long)]
        completed: bool,
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Abort DOMAIN's running job (a migration); the guest keeps running on the source
    #[command(after_help = EXIT_STATUS)]
    Cancel {
        domain: String,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Live-migrate DOMAIN to DEST-URI after the pre-flight checks pass
    #[command(after_help = EXIT_STATUS)]
    Migrate(MigrateArgs),
    /// libvirt qemu hook: install as /etc/libvirt/hooks/qemu.d/ferry
    /// (a script running `exec ferry hook "$@"`, or a symlink to ferry).
    /// On `GUEST migrate begin -` it runs the destination-side checks on the
    /// domain XML from stdin and exits 1 with the reasons on stderr, which
    /// makes libvirt refuse the migration with that text. It acts only on
    /// domains whose emulator is a ferry-qemu (known by its file, which it
    /// reads and never runs); other domains (QEMU's) pass untouched.
    #[command(after_help = "EXIT STATUS:\n  0  allow\n  1  refuse (reason on stderr)")]
    Hook {
        /// libvirt's arguments: GUEST OPERATION SUB-OPERATION EXTRA
        #[arg(num_args = 0.., allow_hyphen_values = true, trailing_var_arg = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Domain name on the source host
    pub domain: String,
    /// libvirt URI of the destination host, e.g. qemu+tcp://hostb/system
    #[arg(value_name = "DEST-URI")]
    pub dest_uri: String,
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Peer-to-peer: the source libvirtd connects to the destination itself
    #[arg(long)]
    pub p2p: bool,
    /// Send the migration stream through libvirtd's connection (implies --p2p)
    #[arg(long)]
    pub tunnelled: bool,
    /// Bandwidth limit in MiB/s
    #[arg(long, value_name = "MiB/s")]
    pub bandwidth: Option<u64>,
    /// Maximum tolerable downtime in milliseconds
    #[arg(long, value_name = "ms")]
    pub max_downtime: Option<u64>,
    /// Define the domain persistently on the destination
    #[arg(long)]
    pub persistent: bool,
    /// Undefine the domain on the source after success (requires --persistent)
    #[arg(long, requires = "persistent")]
    pub undefinesource: bool,
    /// Accept storage that is not shared (passes VIR_MIGRATE_UNSAFE)
    #[arg(long = "unsafe")]
    pub allow_unsafe: bool,
    /// Encrypt and authenticate the migration stream with TLS (VIR_MIGRATE_TLS,
    /// as `virsh migrate --tls`): both hosts need migrate_tls_x509_cert_dir (or
    /// default_tls_x509_cert_dir) in qemu.conf; without it, only a network you
    /// trust should carry the guest's memory
    #[arg(long)]
    pub tls: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_documents_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("3  blocked"), "{help}");
    }

    #[test]
    fn hook_takes_libvirt_arguments_verbatim() {
        let cli = Cli::try_parse_from(["ferry", "hook", "g", "migrate", "begin", "-"]).unwrap();
        let Command::Hook { args } = cli.command else {
            panic!()
        };
        assert_eq!(args, ["g", "migrate", "begin", "-"]);
    }

    #[test]
    fn undefinesource_requires_persistent() {
        assert!(Cli::try_parse_from(["ferry", "migrate", "d", "u", "--undefinesource"]).is_err());
    }
}
