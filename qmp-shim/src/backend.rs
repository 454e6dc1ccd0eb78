//! The VM operations the QMP layer needs, as a trait the engine implements.
//!
//! The QMP layer never holds the engine's VM: it hands a [`MachineConfig`]
//! to [`Backend::create`] and drives the VM through the methods below (the
//! engine's plain data types, such as its stats, pass through). Events
//! (STOP, RESUME, MIGRATION, ...) flow back through the [`EventSink`] given at
//! construction. Guests run on [`crate::vmm::FerryBackend`] (ferry-vmm); the
//! capability probe (`-machine none`) has no guest and uses [`NoVm`].

use ferry_vmm::devices::virtio::balloon::BalloonInfo;
use ferry_vmm::devices::virtio::net::AnnounceSchedule;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use crate::argv::{Incoming, SerialConfig};
use crate::qmp::events::EventSink;

/// The machine family (what `-machine` named).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineType {
    /// `pc` / `pc-i440fx-*`: ferry's x86 machine (PCI slot 1 is PIIX3's).
    Pc,
    /// `microvm`.
    Microvm,
}

/// Everything the engine needs to build the VM, decided from argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    pub machine: MachineType,
    /// `-device vmcoreinfo`: fw_cfg offers `etc/vmcoreinfo`.
    pub vmcoreinfo: bool,
    /// The MC146818 RTC and CMOS every `pc` machine has (`-rtc base=`,
    /// `-boot order=`); `None` on machines without it.
    pub rtc: Option<ferry_vmm::devices::rtc::RtcConfig>,
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub cpu_model: Option<String>,
    /// `(feature, value)` from `-cpu model,feat=on`.
    pub cpu_features: Vec<(String, String)>,
    /// The CPU the guest sees: `-cpu` resolved (host without `-cpu`).
    pub cpu: ferry_vmm::cpu::model::CpuModel,
    pub kernel: Option<PathBuf>,
    /// Without `-kernel`, the guest boots through this BIOS image (`-bios`, or
    /// SeaBIOS's `bios-256k.bin`, QEMU's default for `pc`); `None` with `-kernel`.
    pub firmware: Option<PathBuf>,
    /// `-boot strict=on`: the firmware boots only the devices that have a
    /// `bootindex` (the `bootorder` file ends in `HALT`).
    pub boot_strict: bool,
    /// ACPI (the PIIX4 power management and the tables), unless `-no-acpi`
    /// or `-machine acpi=off`: only a guest booted through firmware has it.
    pub acpi: bool,
    pub initrd: Option<PathBuf>,
    pub append: String,
    /// 16550 ports with their chardev (pty, file, socket, stdio, fdset log).
    pub serials: Vec<SerialConfig>,
    /// Device ids accepted on the command line but modelled as absent.
    pub absent_devices: Vec<String>,
    /// virtio-blk disks on PCI bus 0 (`-blockdev`/`-drive` + `-device`).
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs on PCI bus 0 (`-netdev tap` + `-device virtio-net-pci`).
    pub nics: Vec<crate::argv::NicConfig>,
    /// Their taps, opened at startup (`process::open_taps`), in `nics` order:
    /// every boot of the guest and an incoming migration use these.
    pub taps: Vec<ferry_vmm::devices::virtio::net::NetConfig>,
    /// virtio-rng entropy devices on PCI bus 0 (`-object rng-random|rng-builtin`
    /// + `-device virtio-rng-pci`); their sources are opened with the VM.
    pub rngs: Vec<crate::argv::RngDeviceConfig>,
    /// The memory balloon on PCI bus 0 (`-device virtio-balloon-pci`).
    pub balloon: Option<crate::argv::BalloonDeviceConfig>,
    pub name: Option<String>,
    pub uuid: Option<String>,
    /// The SMBIOS tables the guest gets (`-smbios`, `-uuid`); `None` for
    /// machines without them (microvm).
    pub smbios: Option<ferry_boot::SmbiosConfig>,
    /// `-S`: build paused ("prelaunch"); `cont` starts the vCPUs.
    pub start_paused: bool,
    pub no_shutdown: bool,
    pub no_reboot: bool,
    /// `-incoming`: restore from this source instead of booting.
    pub incoming: Option<Incoming>,
}

/// What QEMU calls the balloon's `actual` (`query-balloon`, BALLOON_CHANGE):
/// guest RAM less the pages in the balloon (`actual_pages`, as the driver
/// says).
pub fn balloon_actual_bytes(ram: u64, actual_pages: u32) -> u64 {
    ram.saturating_sub(u64::from(actual_pages) * ferry_vmm::devices::virtio::balloon::BALLOON_PAGE)
}

/// A disk on a raw or qcow2 image or a block device (a virtio-blk-pci
/// disk, or an IDE disk or CD-ROM), and the names QEMU would give it (for
/// `query-block`, `query-named-block-nodes`, `qom-list`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The qdev id (`virtio-disk0`); `None` for an anonymous device.
    pub id: Option<String>,
    /// PCI slot on bus 0 (an IDE drive's is PIIX3's, 1).
    pub slot: u8,
    /// Where an IDE drive sits; `None` for a virtio-blk disk.
    pub ide: Option<IdePosition>,
    /// The image as given (may be `/dev/fdset/N`): what QMP reports.
    pub filename: String,
    /// What the engine uses: the path, or for `/dev/fdset/N` the fd set's
    /// descriptor itself (`process::resolve_fdsets`), never reopened.
    pub image: ferry_vmm::devices::virtio::blk::BlockImage,
    /// Raw, or qcow2 with its backing chain.
    pub format: ferry_vmm::devices::virtio::blk::ImageFormat,
    /// The nodes of the backing images `format` names explicitly
    /// (`"backing":"libvirt-2-format"`), top first: one per
    /// `Backing::Image` layer, for QMP.
    pub backing_nodes: Vec<BackingNodes>,
    pub read_only: bool,
    pub serial: Option<String>,
    /// `share-rw=on` (libvirt's `<shareable/>`): the image lock shares writing.
    pub shared: bool,
    /// QEMU's image locks, unless the protocol node says `locking=off`.
    pub locking: bool,
    /// The BlockBackend name: `-drive id=` (`drive-virtio-disk0`); `""` for
    /// `-blockdev` disks, as QEMU reports them.
    pub backend_name: String,
    /// The format node (`libvirt-1-format`), or the protocol node when the
    /// device sits on it directly.
    pub format_node: Option<String>,
    /// The protocol node (`libvirt-1-storage`).
    pub storage_node: String,
    /// `bootindex=N` (libvirt's `<boot order='N'/>`, or `<os><boot dev='hd'/>`
    /// on the first disk): the firmware tries lower numbers first.
    pub bootindex: Option<u32>,
    /// `file` or `host_device`.
    pub storage_driver: String,
}

/// An IDE drive's place on the PIIX3 IDE controller, and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdePosition {
    /// Channel: 0 primary (`ide.0`), 1 secondary (`ide.1`).
    pub bus: u8,
    /// 0 master, 1 slave.
    pub unit: u8,
    /// An ATAPI CD-ROM (`ide-cd`), else an ATA disk (`ide-hd`).
    pub cdrom: bool,
}

/// The -blockdev nodes of one backing image of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingNodes {
    /// The `raw` or `qcow2` node (`libvirt-2-format`).
    pub format_node: String,
    /// Its protocol node (`libvirt-2-storage`).
    pub storage_node: String,
    /// `file` or `host_device`.
    pub storage_driver: String,
    /// The image as given (may be `/dev/fdset/N`).
    pub filename: String,
    /// The protocol node's `read-only` (the format node is read-only, as a
    /// backing image is in QEMU).
    pub storage_read_only: bool,
}

/// QEMU's RunState values that ferry can be in (`query-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Prelaunch,
    Running,
    Paused,
    Shutdown,
    InMigrate,
    PostMigrate,
    FinishMigrate,
    InternalError,
}

impl RunState {
    /// The QAPI `RunState` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prelaunch => "prelaunch",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Shutdown => "shutdown",
            Self::InMigrate => "inmigrate",
            Self::PostMigrate => "postmigrate",
            Self::FinishMigrate => "finish-migrate",
            Self::InternalError => "internal-error",
        }
    }
}

/// Where a migration stream goes to or comes from.
#[derive(Debug)]
pub enum MigrationTarget {
    Tcp(String),
    Unix(PathBuf),
    /// An fd received with `getfd` or inherited (`fd:N`).
    Fd(OwnedFd),
    File(PathBuf),
    Exec(String),
}

/// QAPI `MigrationStatus`: the engine's, which names its states as QEMU does.
pub use ferry_vmm::migration::MigrationStatus;

/// RAM transfer counters (`query-migrate` → `ram`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MigrationRamStats {
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    pub duplicate: u64,
    pub normal: u64,
    pub normal_bytes: u64,
    pub dirty_sync_count: u64,
    pub page_size: u64,
    pub mbps: f64,
    pub dirty_pages_rate: u64,
    pub pages_per_second: u64,
    /// Bytes sent while the guest ran (pre-copy passes).
    pub precopy_bytes: u64,
    /// Bytes sent while the guest was stopped (switch-over).
    pub downtime_bytes: u64,
    /// Bytes of pages sent over page streams (QEMU's multifd): all of
    /// `transferred` when the migration used more than one stream, else 0.
    pub multifd_bytes: u64,
    /// Bytes sent after the switch to post-copy.
    pub postcopy_bytes: u64,
    /// Pages the destination asked for in post-copy.
    pub postcopy_requests: u64,
}

/// `query-migrate`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrationInfo {
    /// `None` = no migration ever ran (QEMU replies `{}`).
    pub status: Option<MigrationStatus>,
    pub ram: Option<MigrationRamStats>,
    pub total_time_ms: Option<u64>,
    pub setup_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub expected_downtime_ms: Option<u64>,
    pub error_desc: Option<String>,
    /// Percent of vCPU time taken away to make a live migration converge.
    pub cpu_throttle_percentage: Option<u64>,
    /// Why the VM cannot migrate now (libvirt refuses in Begin if set).
    pub blocked_reasons: Vec<String>,
    /// ferry's own (`x-switchover-returns`): switch-overs that would have
    /// overrun the downtime limit and went back to pre-copy.
    pub switchover_returns: Option<u64>,
}

/// Migration tunables ferry honours (`migrate-set-parameters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationParameters {
    /// Bytes per second.
    pub max_bandwidth: u64,
    /// Milliseconds.
    pub downtime_limit_ms: u64,
    /// Page streams of a migration with the `multifd` capability on (QEMU's
    /// `multifd-channels`): the source opens this many connections, the
    /// destination takes at most this many. 1 to
    /// [`MAX_MULTIFD_CHANNELS`].
    pub multifd_channels: u32,
    /// QEMU's auto-converge steps (used with the `auto-converge` capability):
    /// percent of vCPU time to take away first, then more per step, or with
    /// `tailslow` only what the rates call for; at most `max_cpu_throttle`; a
    /// step when a pass dirtied more than `throttle_trigger_threshold` percent
    /// of what it sent, twice.
    pub cpu_throttle_initial: u8,
    pub cpu_throttle_increment: u8,
    pub cpu_throttle_tailslow: bool,
    pub max_cpu_throttle: u8,
    pub throttle_trigger_threshold: u8,
    /// QEMU's `announce-initial`, `-max`, `-rounds`, `-step`: the RARP
    /// schedule of a guest that arrived, and of HMP `announce_self`.
    pub announce: AnnounceSchedule,
    /// QEMU's `multifd-zlib-level` (0-9) and `multifd-zstd-level` (0-20): kept
    /// and reported as QEMU does; they would apply only to compressed page
    /// streams, and ferry takes only `multifd-compression` none.
    pub multifd_zlib_level: u8,
    pub multifd_zstd_level: u8,
    /// QEMU's `max-postcopy-bandwidth` (bytes/s, 0 = no cap): the cap on
    /// post-copy's rest instead of `max_bandwidth` (libvirt's
    /// `--postcopy-bandwidth`).
    pub max_postcopy_bandwidth: u64,
}

/// Most `multifd-channels` ferry-qemu takes: the engine's stream limit
/// (QEMU takes up to 255).
pub const MAX_MULTIFD_CHANNELS: u32 = ferry_vmm::migration::MAX_STREAMS;

impl Default for MigrationParameters {
    fn default() -> Self {
        // QEMU 7.2's defaults, which libvirt reads and restores.
        Self {
            max_bandwidth: 134_217_728,
            downtime_limit_ms: 300,
            multifd_channels: 2,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            cpu_throttle_tailslow: false,
            max_cpu_throttle: 99,
            throttle_trigger_threshold: 50,
            multifd_zlib_level: 1,
            multifd_zstd_level: 1,
            max_postcopy_bandwidth: 0,
            announce: AnnounceSchedule::default(),
        }
    }
}

impl MigrationParameters {
    /// The engine's throttle: QEMU's auto-converge steps with the capability
    /// on; without it, ferry's own adaptive throttle (QEMU would not throttle
    /// at all: ferry keeps its guarantee that a pre-copy ends). Either way the
    /// dirty limit carries on past `max-cpu-throttle`.
    pub fn throttle(&self, caps: &MigrationCapabilities) -> ferry_vmm::migration::ThrottlePolicy {
        if caps.auto_converge {
            ferry_vmm::migration::ThrottlePolicy::Qemu {
                initial: self.cpu_throttle_initial,
                increment: self.cpu_throttle_increment,
                tailslow: self.cpu_throttle_tailslow,
                trigger_threshold: self.throttle_trigger_threshold,
            }
        } else {
            ferry_vmm::migration::ThrottlePolicy::Adaptive
        }
    }

    /// The page streams a migration uses with these capabilities: the
    /// `multifd-channels` with `multifd` on, one stream without.
    pub fn streams(&self, caps: &MigrationCapabilities) -> u32 {
        if caps.multifd {
            self.multifd_channels
        } else {
            1
        }
    }
}

/// TLS for the next migration: the credentials the `tls-creds` parameter names
/// (client ones on the source, server ones on the destination) and
/// `tls-hostname`.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationTls {
    pub creds: ferry_vmm::migration::TlsCreds,
    pub hostname: Option<String>,
}

/// Migration capabilities that change behaviour (`migrate-set-capabilities`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrationCapabilities {
    pub events: bool,
    pub pause_before_switchover: bool,
    pub return_path: bool,
    pub late_block_activate: bool,
    /// Page streams over several connections (`tcp:` and `unix:` only), as
    /// many as `multifd-channels`.
    pub multifd: bool,
    /// QEMU's auto-converge throttle steps (see [`MigrationParameters`]).
    pub auto_converge: bool,
    /// QEMU's postcopy-ram: `migrate-start-postcopy` may switch the
    /// migration to post-copy.
    pub postcopy_ram: bool,
}

/// Why a backend operation failed; mapped to QMP classes in
/// `qmp::error::to_qmp` only.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The operation needs the engine, which is not wired in yet.
    #[error("{operation} is not yet supported by ferry-qemu")]
    NotYetSupported { operation: &'static str },
    /// There is no VM (the `-machine none` probe).
    #[error("there is no guest in this ferry-qemu process (-machine none)")]
    NoMachine,
    /// The VM is in a state where the operation makes no sense.
    #[error("{operation} is not possible while the guest is {state}")]
    BadState {
        operation: &'static str,
        state: &'static str,
    },
    /// A migration is already running / none is running.
    #[error("{0}")]
    Migration(String),
    /// An engine failure, with its message.
    #[error("{0}")]
    Engine(String),
    /// The guest has no balloon (QEMU's words; class DeviceNotActive).
    #[error("No balloon device has been activated")]
    NoBalloon,
}

/// The VM operations the QMP layer needs.
pub trait Backend: Send + std::fmt::Debug {
    /// Builds the VM (paused if `config.start_paused` or `config.incoming`).
    fn create(&mut self, config: &MachineConfig) -> Result<(), BackendError>;
    fn cont(&mut self) -> Result<(), BackendError>;
    fn stop(&mut self) -> Result<(), BackendError>;
    fn status(&self) -> RunState;
    /// Ends the process's VM; the QMP layer exits after replying.
    fn quit(&mut self) -> Result<(), BackendError>;
    fn system_reset(&mut self) -> Result<(), BackendError>;
    fn system_powerdown(&mut self) -> Result<(), BackendError>;
    /// Writes guest-physical `[addr, addr+size)` to `path`.
    fn pmemsave(
        &mut self,
        addr: u64,
        size: u64,
        path: &std::path::Path,
    ) -> Result<(), BackendError>;
    /// Starts an outgoing live migration (returns once started; progress via
    /// MIGRATION events).
    fn migrate(
        &mut self,
        target: MigrationTarget,
        params: &MigrationParameters,
        caps: &MigrationCapabilities,
    ) -> Result<(), BackendError>;
    /// Starts listening/reading an incoming migration (`-incoming defer` +
    /// `migrate-incoming`, or `-incoming URI` at startup).
    fn migrate_incoming(
        &mut self,
        source: MigrationTarget,
        caps: &MigrationCapabilities,
    ) -> Result<(), BackendError>;
    fn migrate_cancel(&mut self) -> Result<(), BackendError>;
    /// Leaves the paused state `state` (e.g. `pre-switchover`).
    fn migrate_continue(&mut self, state: MigrationStatus) -> Result<(), BackendError>;
    /// Whether this host can be a post-copy destination (QEMU checks it when
    /// postcopy-ram is set on an incoming side).
    fn postcopy_supported(&self) -> Result<(), BackendError> {
        Ok(())
    }
    /// `migrate-start-postcopy`: switches the migration in flight to
    /// post-copy (it needs the postcopy-ram capability).
    fn migrate_start_postcopy(&mut self) -> Result<(), BackendError> {
        Err(BackendError::Migration(
            "Postcopy must be started after migration has been started".into(),
        ))
    }
    fn query_migrate(&self) -> MigrationInfo;
    /// Applies new parameters (also to a running migration).
    fn set_migrate_parameters(&mut self, params: &MigrationParameters) -> Result<(), BackendError>;
    /// The page streams an incoming migration accepted from now on takes:
    /// `Some(multifd-channels)` with the `multifd` capability on, `None`
    /// with it off (one stream). Read when the source connects, so it also
    /// applies to `-incoming tcp:`/`unix:` given at startup. Backends
    /// without an incoming side ignore it.
    fn set_incoming_multifd(&mut self, _channels: Option<u32>) -> Result<(), BackendError> {
        Ok(())
    }
    /// TLS for the migrations started from now on (`migrate`, `migrate-incoming`);
    /// `None`: plain. Backends that cannot encrypt refuse credentials.
    fn set_migration_tls(&mut self, tls: Option<MigrationTls>) -> Result<(), BackendError> {
        match tls {
            Some(_) => Err(BackendError::NotYetSupported {
                operation: "TLS migration",
            }),
            None => Ok(()),
        }
    }
    /// Saves the (paused) VM to `target` (a checkpoint, QEMU's
    /// `migrate "exec:cat > file"` / `file:` use).
    fn save(&mut self, target: MigrationTarget) -> Result<(), BackendError>;
    /// The CPUID the guest's vCPUs were given (without per-vCPU fields), once
    /// a guest was built or received; `None` before.
    fn guest_cpuid(&self) -> Option<Vec<ferry_vmm::cpu::model::CpuidLeaf>> {
        None
    }
    /// `announce-self`: the NICs named in `interfaces` (all if `None`) send
    /// RARP frames on `schedule`.
    fn announce_self(
        &mut self,
        _schedule: AnnounceSchedule,
        _interfaces: Option<&[String]>,
    ) -> Result<(), BackendError> {
        Err(BackendError::NoMachine)
    }
    /// `calc-dirty-rate` in page-sampling mode: starts measuring the guest's
    /// dirty rate over `calc_time_s` seconds; returns at once.
    fn calc_dirty_rate(
        &mut self,
        _calc_time_s: u64,
        _sample_pages: u64,
    ) -> Result<(), BackendError> {
        Err(BackendError::NoMachine)
    }
    /// The last (or running) dirty-rate measurement; `None`: none ever started.
    fn query_dirty_rate(&self) -> Option<ferry_vmm::dirty_rate::Measurement> {
        None
    }
    /// Each disk's request counters, by engine device id (see
    /// `vmm::disk_device_id`); empty while no guest is held.
    fn disk_stats(&self) -> Vec<(String, ferry_vmm::devices::virtio::blk::BlockStats)> {
        Vec::new()
    }
    /// The balloon as the guest left it (`query-balloon`, `guest-stats`).
    fn balloon_info(&self) -> Result<BalloonInfo, BackendError> {
        Err(BackendError::NoBalloon)
    }
    /// Asks the guest to give back `pages` 4 KiB pages (`balloon`).
    fn set_balloon_target(&mut self, _pages: u64) -> Result<(), BackendError> {
        Err(BackendError::NoBalloon)
    }
    /// Gives the guest's stats buffer back every `secs` seconds (0: never),
    /// QEMU's `guest-stats-polling-interval`.
    fn set_balloon_stats_interval(&mut self, _secs: u32) -> Result<(), BackendError> {
        Err(BackendError::NoBalloon)
    }
    /// The serial ports' chardevs as `(label, filename)` for `query-chardev`
    /// (`pty:/dev/pts/N` tells libvirt where the console is).
    fn serial_chardevs(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// The backend without a guest (the `-machine none` probe): every VM
/// operation refused honestly.
#[derive(Debug)]
pub struct NoVm {
    probe: bool,
    _events: EventSink,
}

impl NoVm {
    /// `probe` = `-machine none` (then operations say there is no guest).
    pub fn new(probe: bool, events: EventSink) -> Self {
        Self {
            probe,
            _events: events,
        }
    }

    fn refuse(&self, operation: &'static str) -> BackendError {
        if self.probe {
            BackendError::NoMachine
        } else {
            BackendError::NotYetSupported { operation }
        }
    }
}

impl Backend for NoVm {
    fn create(&mut self, _config: &MachineConfig) -> Result<(), BackendError> {
        Err(BackendError::NotYetSupported {
            operation: "running a guest",
        })
    }
    fn cont(&mut self) -> Result<(), BackendError> {
        Err(self.refuse("cont"))
    }
    fn stop(&mut self) -> Result<(), BackendError> {
        Err(self.refuse("stop"))
    }
    fn status(&self) -> RunState {
        RunState::Prelaunch
    }
    fn quit(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    fn system_reset(&mut self) -> Result<(), BackendError> {
        Err(self.refuse("system_reset"))
    }
    fn system_powerdown(&mut self) -> Result<(), BackendError> {
        Err(self.refuse("system_powerdown"))
    }
    fn pmemsave(&mut self, _: u64, _: u64, _: &std::path::Path) -> Result<(), BackendError> {
        Err(self.refuse("pmemsave"))
    }
    fn migrate(
        &mut self,
        _: MigrationTarget,
        _: &MigrationParameters,
        _: &MigrationCapabilities,
    ) -> Result<(), BackendError> {
        Err(self.refuse("migrate"))
    }
    fn migrate_incoming(
        &mut self,
        _: MigrationTarget,
        _: &MigrationCapabilities,
    ) -> Result<(), BackendError> {
        Err(self.refuse("migrate-incoming"))
    }
    fn migrate_cancel(&mut self) -> Result<(), BackendError> {
        // Nothing is running: QEMU's migrate_cancel is a no-op then.
        Ok(())
    }
    fn migrate_continue(&mut self, _: MigrationStatus) -> Result<(), BackendError> {
        Err(self.refuse("migrate-continue"))
    }
    fn query_migrate(&self) -> MigrationInfo {
        MigrationInfo::default()
    }
    fn set_migrate_parameters(&mut self, _: &MigrationParameters) -> Result<(), BackendError> {
        // Stored by the QMP layer; nothing to apply without a VM.
        Ok(())
    }
    fn save(&mut self, _: MigrationTarget) -> Result<(), BackendError> {
        Err(self.refuse("saving the guest"))
    }
}
