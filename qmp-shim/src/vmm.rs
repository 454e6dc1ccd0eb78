//! The [`Backend`] on ferry-vmm: one KVM guest per process, driven through
//! QEMU's run states and events.
//!
//! * Boot: `-kernel` (PVH ELF, ELF vmlinux, bzImage) with `-append`/`-initrd`;
//!   `-S` leaves it in `prelaunch` until `cont`.
//! * Save (`migrate` of a *paused* guest to `fd:`, `file:` or `exec:`): the
//!   checkpoint stream of the engine's `CheckpointSink`, written by a thread;
//!   MIGRATION events `setup` → `active` → `completed`/`failed` as QEMU sends
//!   them (libvirt's `virsh save` waits for them).
//! * Restore (`-incoming fd:N|file:PATH`, or `-incoming defer` +
//!   `migrate-incoming`): the engine's `Destination` on a thread; the
//!   guest starts afterwards unless `-S` (then `cont` starts it, as libvirt does).
//!   A stream that fails to load ends the process with status 1, like QEMU.
//! * Guest exits: poweroff → SHUTDOWN (process exits unless `-no-shutdown`),
//!   reset → RESET and a fresh boot (SHUTDOWN with `-no-reboot`), KVM failure →
//!   `internal-error` + STOP.
//!
//! * Live migration (a running guest, or any guest to `tcp:`, `unix:` or a
//!   socket `fd:`): the engine's pre-copy on a thread that owns the guest
//!   meanwhile; see [`live`]. `stop`/`cont` meanwhile hold and release its
//!   vCPUs through a `VcpuHold`, as QEMU stops a migrating guest without ending
//!   the migration. The destination reads every stream with the engine's
//!   `Destination`, answering on the return path
//!   when the stream is a socket; with the multifd capability on and a
//!   `tcp:`/`unix:` listener it takes up to `multifd-channels` page streams,
//!   the extra connections arriving on the same listener.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_kvm::{Backing, GuestRam};
use ferry_vmm::cpu::model::CpuidLeaf;
use ferry_vmm::devices::fw_cfg::FwCfgConfig;
use ferry_vmm::devices::ide::{IdeDriveConfig, IdeMedia};
use ferry_vmm::devices::serial::SinkSpec;
use ferry_vmm::devices::virtio::balloon::BalloonInfo;
use ferry_vmm::devices::virtio::blk::BlockConfig;
use ferry_vmm::devices::virtio::net::AnnounceSchedule;
use ferry_vmm::devices::SharedFd;
use ferry_vmm::dirty_rate::DirtyRateMeter;
use ferry_vmm::firmware::FirmwareConfig;
use ferry_vmm::migration::{
    self, CheckpointSink, Destination, MigrationError, MigrationUri, Target,
};
use ferry_vmm::persist::RestoreOptions;
use ferry_vmm::private_file::PrivateFile;
use ferry_vmm::vm::{VirtioDeviceSpec, VirtioSpec};
use ferry_vmm::{GuestExit, KernelConfig, Vm as Guest, VmConfig};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use serde_json::json;

use crate::argv::Incoming;
use crate::backend::*;
use crate::qmp::events::EventSink;
use crate::qmp::server::FdSets;
use crate::serial::SerialTee;

mod live;

/// How long events get to reach the monitors before the process exits.
const EVENT_FLUSH: Duration = Duration::from_millis(100);

/// Waits for queued events to be written, then exits.
pub fn exit_after_events(code: i32) -> ! {
    std::thread::sleep(EVENT_FLUSH);
    std::process::exit(code)
}

/// The guest and its QEMU-visible state.
#[derive(Debug)]
struct Inner {
    guest: Option<Guest>,
    state: RunState,
    config: Option<MachineConfig>,
    serial: Option<SerialTee>,
    /// Start the guest once an incoming stream is loaded (`cont` during
    /// `inmigrate` sets it, as in QEMU).
    autostart: bool,
    /// An incoming stream is being read.
    incoming_started: bool,
    /// A live migration owns the guest (`guest` is `None` meanwhile).
    migrating: bool,
    /// TLS for the next migration (`tls-creds`), set before it starts.
    tls: Option<MigrationTls>,
    /// The CPUID of the last guest built or received (kept while a live
    /// migration owns the guest).
    cpuid: Option<Vec<CpuidLeaf>>,
    /// The announce schedule every guest gets (the `announce-*` parameters).
    announce: AnnounceSchedule,
    /// The balloon's stats polling interval (`guest-stats-polling-interval`),
    /// which every guest built or received here gets.
    balloon_interval: u32,
    /// The balloon as last seen, for `query-balloon` while a live migration
    /// owns the guest.
    balloon_seen: Option<BalloonInfo>,
}

impl Inner {
    /// Makes `guest` this process's guest.
    fn set_guest(&mut self, mut guest: Guest) {
        guest.set_announce_schedule(self.announce);
        if guest.balloon_info().is_some() {
            if let Err(e) = guest.set_balloon_stats_interval(self.balloon_interval) {
                tracing::warn!("cannot set the balloon's stats interval: {e}");
            }
        }
        self.cpuid = Some(guest.cpuid().to_vec());
        self.guest = Some(guest);
    }

    /// Refuses `operation` while a live migration owns the guest.
    fn not_migrating(&self, operation: &'static str) -> Result<(), BackendError> {
        if self.migrating {
            return Err(BackendError::Migration(format!(
                "{operation} is not possible while a live migration runs: \
                 wait for it or cancel it (migrate_cancel)"
            )));
        }
        Ok(())
    }

    /// The guest, for `operation`: refused while a live migration owns it or
    /// while there is none (an incoming migration not loaded yet).
    fn guest_for(&self, operation: &'static str) -> Result<&Guest, BackendError> {
        self.not_migrating(operation)?;
        self.guest.as_ref().ok_or(BackendError::BadState {
            operation,
            state: state_name(self.state),
        })
    }
}

#[derive(Debug)]
struct BackendShared {
    inner: Mutex<Inner>,
    /// Apart from `inner` so `query-migrate` answers while a save runs.
    migration: Mutex<MigrationInfo>,
    /// The live migration in flight, or the last one.
    outgoing: Mutex<Option<live::Outgoing>>,
    /// The page streams an incoming migration takes: `Some(multifd-channels)`
    /// with the multifd capability on, `None` (one stream) without.
    incoming_multifd: Mutex<Option<u32>>,
    /// An incoming post-copy runs the guest before it is ours: `cont` and
    /// `stop` hold and release its vCPUs through this until it arrives whole.
    incoming_hold: Mutex<Option<ferry_vmm::throttle::VcpuHold>>,
    /// `calc-dirty-rate` measurements.
    dirty_rate: DirtyRateMeter,
    events: EventSink,
}

impl BackendShared {
    fn lock(&self) -> Result<MutexGuard<'_, Inner>, BackendError> {
        self.inner
            .lock()
            .map_err(|_| BackendError::Engine("internal error: VM state poisoned".into()))
    }

    fn set_migration(&self, f: impl FnOnce(&mut MigrationInfo)) {
        if let Ok(mut m) = self.migration.lock() {
            f(&mut m);
        }
    }

    fn migration_status(&self, status: MigrationStatus) {
        self.set_migration(|m| m.status = Some(status));
        self.events
            .emit("MIGRATION", Some(json!({"status": status.as_str()})));
    }
}

/// ferry-vmm behind QMP.
#[derive(Debug)]
pub struct FerryBackend {
    shared: Arc<BackendShared>,
}

impl FerryBackend {
    pub fn new(events: EventSink) -> Self {
        Self {
            shared: Arc::new(BackendShared {
                inner: Mutex::new(Inner {
                    guest: None,
                    state: RunState::Prelaunch,
                    config: None,
                    serial: None,
                    autostart: false,
                    incoming_started: false,
                    migrating: false,
                    tls: None,
                    cpuid: None,
                    announce: AnnounceSchedule::default(),
                    balloon_interval: 0,
                    balloon_seen: None,
                }),
                migration: Mutex::new(MigrationInfo::default()),
                outgoing: Mutex::new(None),
                incoming_multifd: Mutex::new(None),
                incoming_hold: Mutex::new(None),
                dirty_rate: DirtyRateMeter::default(),
                events,
            }),
        }
    }
}

fn engine(e: impl std::fmt::Display) -> BackendError {
    BackendError::Engine(e.to_string())
}

fn state_name(s: RunState) -> &'static str {
    s.as_str()
}

fn sink(inner: &Inner) -> SinkSpec {
    inner
        .serial
        .as_ref()
        .map_or(SinkSpec::Null, SerialTee::sink)
}

/// The engine's id of disk `d`: its qdev id, else its kind and slot.
pub fn disk_device_id(d: &DiskConfig) -> String {
    d.id.clone().unwrap_or_else(|| match d.ide {
        Some(at) => format!("ide0-{}-{}", at.bus, at.unit),
        None => format!("virtio-blk@{:02x}", d.slot),
    })
}

/// The engine's virtio devices for `config`'s disks, NICs, entropy devices
/// and balloon. A
/// destination must be given the same ones: the engine's shape check
/// refuses a stream from a VM with other devices.
fn virtio_specs(config: &MachineConfig) -> Vec<VirtioSpec> {
    let nics = config
        .nics
        .iter()
        .zip(&config.taps)
        .map(|(n, tap)| VirtioSpec {
            slot: n.slot,
            id: n
                .id
                .clone()
                .unwrap_or_else(|| format!("virtio-net@{:02x}", n.slot)),
            device: VirtioDeviceSpec::Net(tap.clone()),
        });
    let rngs = config.rngs.iter().map(|r| VirtioSpec {
        slot: r.slot,
        id: r
            .id
            .clone()
            .unwrap_or_else(|| format!("virtio-rng@{:02x}", r.slot)),
        device: VirtioDeviceSpec::Rng(r.config.clone()),
    });
    let balloon = config.balloon.iter().map(|b| VirtioSpec {
        slot: b.slot,
        id: b
            .id
            .clone()
            .unwrap_or_else(|| format!("virtio-balloon@{:02x}", b.slot)),
        device: VirtioDeviceSpec::Balloon(b.config),
    });
    config
        .disks
        .iter()
        .filter(|d| d.ide.is_none())
        .map(|d| VirtioSpec {
            slot: d.slot,
            id: disk_device_id(d),
            device: VirtioDeviceSpec::Block(block_config(d)),
        })
        .chain(nics)
        .chain(rngs)
        .chain(balloon)
        .collect()
}

/// What the engine opens for disk `d`.
fn block_config(d: &DiskConfig) -> BlockConfig {
    BlockConfig {
        image: d.image.clone(),
        format: d.format.clone(),
        read_only: d.read_only,
        serial: d.serial.clone(),
        shared: d.shared,
        locking: d.locking,
    }
}

/// The engine's IDE drives for `config`'s IDE disks and CD-ROMs (on the
/// PIIX3); a destination must be given the same ones.
fn ide_drives(config: &MachineConfig) -> Vec<IdeDriveConfig> {
    config
        .disks
        .iter()
        .filter_map(|d| {
            let at = d.ide?;
            Some(IdeDriveConfig {
                bus: at.bus,
                unit: at.unit,
                media: if at.cdrom {
                    IdeMedia::Cdrom
                } else {
                    IdeMedia::Disk
                },
                id: disk_device_id(d),
                config: block_config(d),
            })
        })
        .collect()
}

/// QEMU's fw_cfg, which every `pc` machine has (with `etc/vmcoreinfo` for
/// `-device vmcoreinfo`); a destination must have the same.
fn fw_cfg(config: &MachineConfig) -> Option<FwCfgConfig> {
    (config.machine == MachineType::Pc).then(|| FwCfgConfig {
        vmcoreinfo: config.vmcoreinfo,
        bootorder: bootorder(config),
    })
}

/// The `bootorder` file QEMU builds: the OpenFirmware path of every disk
/// with a `bootindex`, lowest first, then `HALT` under `-boot strict=on`.
fn bootorder(config: &MachineConfig) -> Vec<String> {
    let mut disks: Vec<(u32, String)> = config
        .disks
        .iter()
        .filter_map(|d| {
            let path = match d.ide {
                Some(at) => format!("/pci@i0cf8/ide@1,1/drive@{}/disk@{}", at.bus, at.unit),
                None => format!("/pci@i0cf8/scsi@{:x}/disk@0,0", d.slot),
            };
            d.bootindex.map(|i| (i, path))
        })
        .collect();
    disks.sort();
    let mut order: Vec<String> = disks.into_iter().map(|(_, p)| p).collect();
    if config.boot_strict {
        order.push("HALT".into());
    }
    order
}

/// The firmware a guest without `-kernel` boots through, with the SMBIOS
/// tables it installs.
fn firmware(config: &MachineConfig) -> Option<FirmwareConfig> {
    config.firmware.as_ref().map(|path| FirmwareConfig {
        path: path.clone(),
        smbios: config.smbios.clone(),
        acpi: config.acpi,
        debugcon: None,
    })
}

/// Builds and boots a fresh guest from `config` (stopped): its kernel
/// loaded, or its vCPUs at the firmware's reset vector.
fn boot(config: &MachineConfig, sink: SinkSpec) -> Result<Guest, BackendError> {
    let mut guest = Guest::create(VmConfig {
        mem_bytes: config.mem_bytes,
        vcpus: config.vcpus,
        backing: Backing::Anonymous,
        serial: sink,
        cpu: config.cpu.clone(),
        virtio: virtio_specs(config),
        ide: ide_drives(config),
        fw_cfg: fw_cfg(config),
        firmware: firmware(config),
        rtc: config.rtc.clone(),
    })
    .map_err(engine)?;
    if let Some(kernel) = &config.kernel {
        guest
            .boot(&KernelConfig {
                kernel: kernel.clone(),
                initrd: config.initrd.clone(),
                cmdline: config.append.clone(),
                smbios: config.smbios.clone(),
            })
            .map_err(engine)?;
    }
    Ok(guest)
}

/// An incoming post-copy started: the guest runs here (held until `cont`
/// unless `cont` came already), its MIGRATION event says postcopy-active.
fn postcopy_hook(shared: &Arc<BackendShared>) -> ferry_vmm::persist::PostcopyHook {
    let weak = Arc::downgrade(shared);
    ferry_vmm::persist::PostcopyHook(Arc::new(move |hold| {
        let Some(shared) = weak.upgrade() else { return };
        let Ok(mut inner) = shared.inner.lock() else {
            return;
        };
        if inner.autostart {
            hold.release();
            inner.state = RunState::Running;
        } else {
            inner.state = RunState::Paused;
        }
        if let Ok(mut h) = shared.incoming_hold.lock() {
            *h = Some(hold);
        }
        shared.migration_status(MigrationStatus::PostcopyActive);
        if inner.state == RunState::Running {
            shared.events.emit("RESUME", None);
        }
    }))
}

impl FerryBackend {
    /// `cont` (`run`) or `stop` while an incoming post-copy runs the guest
    /// here before it is whole: releases or holds its vCPUs. False when no
    /// post-copy is under way.
    fn hold_incoming(&self, inner: &mut Inner, run: bool) -> bool {
        let Some(hold) = self
            .shared
            .incoming_hold
            .lock()
            .ok()
            .and_then(|h| h.clone())
        else {
            return false;
        };
        inner.autostart = run;
        let (now, event) = if run {
            (RunState::Running, "RESUME")
        } else {
            (RunState::Paused, "STOP")
        };
        if inner.state != now {
            if run {
                hold.release();
            } else {
                hold.hold();
            }
            inner.state = now;
            self.shared.events.emit(event, None);
        }
        true
    }

    /// Reads a guest (a checkpoint or a live migration stream) on a thread;
    /// see the module docs.
    fn start_incoming(&self, source: Target) -> Result<(), BackendError> {
        let tls = self.shared.lock()?.tls.clone();
        let destination = Destination::open(source, tls.map(|t| t.creds))
            .map_err(|e| live::migration_error(&e))?;
        let opts = {
            let mut inner = self.shared.lock()?;
            if inner.incoming_started || inner.guest.is_some() {
                return Err(BackendError::Migration(
                    "The incoming migration has already been started".into(),
                ));
            }
            inner.incoming_started = true;
            inner.state = RunState::InMigrate;
            RestoreOptions {
                backing: Backing::Anonymous,
                serial: sink(&inner),
                expect_mem_bytes: inner.config.as_ref().map(|c| c.mem_bytes),
                expect_vcpus: inner.config.as_ref().map(|c| c.vcpus),
                // Started below, under the lock, if `cont` came meanwhile.
                autostart: false,
                virtio: inner.config.as_ref().map(virtio_specs).unwrap_or_default(),
                ide: inner.config.as_ref().map(ide_drives).unwrap_or_default(),
                fw_cfg: inner.config.as_ref().and_then(fw_cfg),
                firmware: inner.config.as_ref().and_then(firmware),
                rtc: inner.config.as_ref().and_then(|c| c.rtc.clone()),
                on_postcopy: Some(postcopy_hook(&self.shared)),
            }
        };
        self.shared.migration_status(MigrationStatus::Setup);
        let shared = Arc::clone(&self.shared);
        std::thread::Builder::new()
            .name("incoming".into())
            .spawn(move || {
                let mut start = Instant::now();
                let result = destination.serve(
                    &opts,
                    &mut || {
                        start = Instant::now();
                        shared.migration_status(MigrationStatus::Active);
                    },
                    // Read once the source is here: `-incoming tcp:` listens
                    // before QMP can turn multifd on. Without multifd nobody
                    // else may connect, as in QEMU.
                    &|| {
                        let multifd = shared.incoming_multifd.lock().map_or(None, |m| *m);
                        if let Some(channels) = multifd {
                            tracing::info!("incoming migration: multifd, up to {channels} streams");
                        }
                        multifd.unwrap_or(1)
                    },
                );
                let guest = match result {
                    Ok(g) => g,
                    Err(e) => {
                        let e = ferry_vmm::error_chain(&e);
                        eprintln!("ferry-qemu: load of migration failed: {e}");
                        shared.set_migration(|m| m.error_desc = Some(e));
                        shared.migration_status(MigrationStatus::Failed);
                        exit_after_events(1);
                    }
                };
                let total = start.elapsed().as_millis() as u64;
                shared.set_migration(|m| {
                    m.total_time_ms = Some(total);
                    m.setup_time_ms = Some(0);
                });
                let Ok(mut inner) = shared.inner.lock() else {
                    exit_after_events(1);
                };
                let mut guest = guest;
                // Post-copy ran it already: held (stopped) it is a real pause now.
                let postcopy = shared
                    .incoming_hold
                    .lock()
                    .ok()
                    .and_then(|mut h| h.take())
                    .is_some();
                if let Err(e) = guest.take_hold() {
                    tracing::warn!("cannot pause the held guest: {e}");
                }
                let running = guest.is_running();
                inner.set_guest(guest);
                inner.state = if running {
                    RunState::Running
                } else {
                    RunState::Paused
                };
                shared.migration_status(MigrationStatus::Completed);
                if postcopy {
                    // `cont` and `stop` reached the guest while it came.
                    return;
                }
                if inner.autostart {
                    let resumed = inner.guest.as_mut().map(Guest::resume);
                    if let Some(Err(e)) = resumed {
                        eprintln!("ferry-qemu: cannot start the restored guest: {e}");
                        inner.state = RunState::InternalError;
                    } else {
                        inner.state = RunState::Running;
                        shared.events.emit("RESUME", None);
                    }
                }
            })
            .map_err(engine)?;
        Ok(())
    }

    /// Writes the stopped guest to `target` on a thread; see the module docs.
    fn start_save(&self, target: Target) -> Result<(), BackendError> {
        {
            let inner = self.shared.lock()?;
            if inner.tls.is_some() {
                return Err(live::migration_error(&MigrationError::TlsNeedsSocket));
            }
            if inner.guest.is_none() {
                return Err(BackendError::BadState {
                    operation: "migrate",
                    state: state_name(inner.state),
                });
            }
            if inner.state == RunState::Running {
                return Err(BackendError::Migration(
                    "a checkpoint is taken of a stopped guest: stop it first".into(),
                ));
            }
        }
        if let Ok(m) = self.shared.migration.lock() {
            if m.status.is_some_and(MigrationStatus::in_progress) {
                return Err(BackendError::Migration(
                    "There's a migration process in progress".into(),
                ));
            }
        }
        let target = CheckpointSink::open(target).map_err(|e| live::migration_error(&e))?;
        self.shared.set_migration(|m| *m = MigrationInfo::default());
        self.shared.migration_status(MigrationStatus::Setup);
        let shared = Arc::clone(&self.shared);
        std::thread::Builder::new()
            .name("save".into())
            .spawn(move || {
                let start = Instant::now();
                let Ok(mut inner) = shared.inner.lock() else {
                    return;
                };
                shared.migration_status(MigrationStatus::Active);
                let before = inner.state;
                inner.state = RunState::FinishMigrate;
                let result = match &inner.guest {
                    Some(g) => target
                        .write(g)
                        .map(|s| (s, g.ram().total_bytes()))
                        .map_err(|e| ferry_vmm::error_chain(&e)),
                    None => Err("the guest went away".into()),
                };
                let ms = start.elapsed().as_millis() as u64;
                match result {
                    Ok((stats, total)) => {
                        inner.state = RunState::PostMigrate;
                        let secs = start.elapsed().as_secs_f64().max(1e-6);
                        shared.set_migration(|m| {
                            m.total_time_ms = Some(ms);
                            m.setup_time_ms = Some(0);
                            m.downtime_ms = Some(ms);
                            m.ram = Some(MigrationRamStats {
                                transferred: stats.bytes,
                                remaining: 0,
                                total,
                                duplicate: stats.zero_pages_skipped,
                                normal: stats.ram_pages,
                                normal_bytes: stats.ram_pages * 4096,
                                dirty_sync_count: 1,
                                page_size: 4096,
                                mbps: stats.bytes as f64 * 8.0 / secs / 1e6,
                                dirty_pages_rate: 0,
                                pages_per_second: (stats.ram_pages as f64 / secs) as u64,
                                precopy_bytes: 0,
                                downtime_bytes: stats.bytes,
                                multifd_bytes: 0,
                                postcopy_bytes: 0,
                                postcopy_requests: 0,
                            });
                        });
                        shared.migration_status(MigrationStatus::Completed);
                    }
                    Err(e) => {
                        inner.state = before;
                        tracing::warn!("save failed: {e}");
                        shared.set_migration(|m| m.error_desc = Some(e));
                        shared.migration_status(MigrationStatus::Failed);
                    }
                }
            })
            .map_err(engine)?;
        Ok(())
    }

    /// Watches the guest's exits (poweroff, reset, KVM failure).
    fn start_watcher(&self) -> Result<(), BackendError> {
        let shared = Arc::clone(&self.shared);
        std::thread::Builder::new()
            .name("guest-exits".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(20));
                let Ok(mut inner) = shared.inner.lock() else {
                    return;
                };
                let exit = inner.guest.as_ref().and_then(|g| g.exits().try_recv().ok());
                if let Some(exit) = exit {
                    on_guest_exit(&shared, &mut inner, exit);
                }
                balloon_watch(&shared, &mut inner);
                rtc_watch(&shared, &inner);
            })
            .map_err(engine)?;
        Ok(())
    }
}

fn on_guest_exit(shared: &BackendShared, inner: &mut Inner, exit: GuestExit) {
    if let Some(g) = inner.guest.as_mut() {
        let _ = g.pause();
    }
    let (no_shutdown, no_reboot) = inner
        .config
        .as_ref()
        .map_or((false, false), |c| (c.no_shutdown, c.no_reboot));
    let shutdown = |inner: &mut Inner, reason: &str| {
        inner.state = RunState::Shutdown;
        shared
            .events
            .emit("SHUTDOWN", Some(json!({"guest": true, "reason": reason})));
        if !no_shutdown {
            exit_after_events(0);
        }
    };
    match exit {
        GuestExit::Poweroff => shutdown(inner, "guest-shutdown"),
        GuestExit::Reset(why) if no_reboot => {
            tracing::info!("guest reset ({why}) with -no-reboot");
            shutdown(inner, "guest-reset");
        }
        GuestExit::Reset(why) => {
            tracing::info!("guest reset: {why}");
            shared.events.emit(
                "RESET",
                Some(json!({"guest": true, "reason": "guest-reset"})),
            );
            if let Err(e) = reboot(inner, true) {
                eprintln!("ferry-qemu: cannot reboot the guest: {e}");
                inner.state = RunState::InternalError;
                shared.events.emit("STOP", None);
            }
        }
        GuestExit::Crashed(why) => {
            eprintln!("ferry-qemu: {why}");
            inner.state = RunState::InternalError;
            shared.events.emit("STOP", None);
        }
    }
}

/// QEMU 7.2's RTC_CHANGE when the guest set its RTC: `offset`, the guest's
/// time less `-rtc base=`'s in seconds (libvirt keeps it for `<clock
/// offset='variable'>`). Polled with the guest's exits, so settings closer
/// together than that come as one event (QEMU rate-limits it to one a
/// second).
fn rtc_watch(shared: &BackendShared, inner: &Inner) {
    let change = inner
        .guest
        .as_ref()
        .and_then(|g| g.rtc())
        .and_then(|r| r.take_time_change());
    if let Some(offset) = change {
        shared
            .events
            .emit("RTC_CHANGE", Some(json!({ "offset": offset })));
    }
}

/// QEMU's BALLOON_CHANGE when the guest's driver changed `actual` (checked
/// with the guest's exits), and the balloon as last seen.
fn balloon_watch(shared: &BackendShared, inner: &mut Inner) {
    let Some(guest) = inner.guest.as_ref() else {
        return;
    };
    let ram = inner.config.as_ref().map_or(0, |c| c.mem_bytes);
    if let Some(actual) = guest.take_balloon_change() {
        shared.events.emit(
            "BALLOON_CHANGE",
            Some(json!({
                "actual": balloon_actual_bytes(ram, actual)
            })),
        );
    }
    inner.balloon_seen = guest.balloon_info();
}

/// Replaces the guest with a freshly booted one (running if `run`).
fn reboot(inner: &mut Inner, run: bool) -> Result<(), BackendError> {
    let config = inner.config.clone().ok_or(BackendError::NoMachine)?;
    // The balloon's target outlives a reset, as in QEMU.
    let target = inner
        .guest
        .as_ref()
        .and_then(Guest::balloon_info)
        .map(|b| b.num_pages);
    // The RTC's clock (which the guest may have set) and NVRAM outlive a
    // reset, as in QEMU.
    let rtc = inner
        .guest
        .as_ref()
        .and_then(|g| g.rtc().map(|r| r.state()));
    // The old guest must release its RAM and vCPUs before the new one exists.
    inner.guest = None;
    let mut guest = boot(&config, sink(inner))?;
    if let (Some(state), Some(dev)) = (rtc, guest.rtc()) {
        dev.restore(&state)
            .map_err(|e| BackendError::Engine(e.to_string()))?;
        dev.reset();
    }
    if let Some(pages) = target.filter(|&p| p > 0) {
        guest.set_balloon_target(pages.into()).map_err(engine)?;
    }
    if run {
        guest.resume().map_err(engine)?;
        inner.state = RunState::Running;
    }
    inner.set_guest(guest);
    Ok(())
}

impl Backend for FerryBackend {
    fn create(&mut self, config: &MachineConfig) -> Result<(), BackendError> {
        let mut serial = None;
        for s in &config.serials {
            if s.index != 0 {
                return Err(BackendError::Engine(format!(
                    "serial port {} (chardev '{}'): ferry models only COM1 (ttyS0)",
                    s.index, s.chardev.id
                )));
            }
            serial = Some(SerialTee::open(&s.chardev, &s.fds).map_err(engine)?);
        }
        {
            let mut inner = self.shared.lock()?;
            inner.config = Some(config.clone());
            inner.serial = serial;
            inner.balloon_interval = config.balloon.as_ref().map_or(0, |b| b.stats_interval);
            inner.autostart = !config.start_paused;
        }
        self.start_watcher()?;
        match &config.incoming {
            None => {
                let mut inner = self.shared.lock()?;
                let mut guest = boot(config, sink(&inner))?;
                if config.start_paused {
                    inner.state = RunState::Prelaunch;
                } else {
                    guest.resume().map_err(engine)?;
                    inner.state = RunState::Running;
                }
                inner.set_guest(guest);
                Ok(())
            }
            Some(Incoming::Defer) => {
                self.shared.lock()?.state = RunState::InMigrate;
                Ok(())
            }
            Some(Incoming::Fd(n)) => {
                let fd = crate::fd::adopt_inherited(*n)
                    .map_err(|e| BackendError::Migration(format!("-incoming fd:{n}: {e}")))?;
                self.start_incoming(Target::Fd(fd))
            }
            Some(Incoming::File(p)) => {
                self.start_incoming(Target::Uri(MigrationUri::File(p.clone())))
            }
            Some(Incoming::Tcp(a)) => self.start_incoming(Target::Uri(live::tcp_uri(a)?)),
            Some(Incoming::Unix(p)) => {
                self.start_incoming(Target::Uri(MigrationUri::Unix(p.clone())))
            }
            Some(Incoming::Exec(c)) => self.start_incoming(Target::Exec(c.clone())),
        }
    }

    fn cont(&mut self) -> Result<(), BackendError> {
        let mut inner = self.shared.lock()?;
        if inner.migrating {
            drop(inner);
            return self.cont_live();
        }
        if self.hold_incoming(&mut inner, true) {
            return Ok(());
        }
        match inner.state {
            RunState::InMigrate => {
                inner.autostart = true;
                Ok(())
            }
            RunState::Running => Ok(()),
            RunState::Shutdown | RunState::InternalError => Err(BackendError::Engine(
                "Resetting the Virtual Machine is required".into(),
            )),
            RunState::FinishMigrate => Err(BackendError::BadState {
                operation: "cont",
                state: state_name(inner.state),
            }),
            RunState::Prelaunch | RunState::Paused | RunState::PostMigrate => {
                let g = inner.guest.as_mut().ok_or(BackendError::NoMachine)?;
                g.resume().map_err(engine)?;
                inner.state = RunState::Running;
                self.shared.events.emit("RESUME", None);
                Ok(())
            }
        }
    }

    fn stop(&mut self) -> Result<(), BackendError> {
        let mut inner = self.shared.lock()?;
        if inner.migrating {
            drop(inner);
            return self.stop_live();
        }
        if self.hold_incoming(&mut inner, false) {
            return Ok(());
        }
        match inner.state {
            RunState::InMigrate => {
                inner.autostart = false;
                Ok(())
            }
            RunState::Running => {
                let g = inner.guest.as_mut().ok_or(BackendError::NoMachine)?;
                g.pause().map_err(engine)?;
                inner.state = RunState::Paused;
                self.shared.events.emit("STOP", None);
                Ok(())
            }
            RunState::Prelaunch => {
                inner.state = RunState::Paused;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn status(&self) -> RunState {
        self.shared
            .inner
            .lock()
            .map_or(RunState::InternalError, |i| i.state)
    }

    fn quit(&mut self) -> Result<(), BackendError> {
        self.shared.events.emit(
            "SHUTDOWN",
            Some(json!({"guest": false, "reason": "host-qmp-quit"})),
        );
        Ok(())
    }

    fn system_reset(&mut self) -> Result<(), BackendError> {
        let mut inner = self.shared.lock()?;
        inner.not_migrating("system_reset")?;
        if inner.guest.is_none() {
            return Err(BackendError::BadState {
                operation: "system_reset",
                state: state_name(inner.state),
            });
        }
        let run = inner.state == RunState::Running;
        reboot(&mut inner, run)?;
        if matches!(inner.state, RunState::Shutdown | RunState::InternalError) {
            inner.state = RunState::Paused;
        }
        self.shared.events.emit(
            "RESET",
            Some(json!({"guest": false, "reason": "host-qmp-system-reset"})),
        );
        Ok(())
    }

    fn system_powerdown(&mut self) -> Result<(), BackendError> {
        // The ACPI power button of a guest booted through firmware; a guest
        // without ACPI, or one that did not enable the button, ignores it as
        // in QEMU: the event is all that happens.
        let inner = self.shared.lock()?;
        let pressed = inner.guest.as_ref().is_some_and(|g| g.press_power_button());
        tracing::info!(
            "system_powerdown: the guest {} the power button",
            if pressed { "sees" } else { "ignores" }
        );
        self.shared.events.emit("POWERDOWN", None);
        Ok(())
    }

    fn pmemsave(&mut self, addr: u64, size: u64, path: &Path) -> Result<(), BackendError> {
        // The RAM mapping outlives the lock (it is shared): the VM is not
        // held while the file is written, nor while a FIFO waits for its
        // reader.
        let ram = {
            let inner = self.shared.lock()?;
            Arc::clone(inner.guest_for("pmemsave")?.ram())
        };
        check_phys_range(&ram.ranges(), addr, size)
            .map_err(|e| BackendError::Engine(e.to_string()))?;
        write_phys(&ram, addr, size, path)
            .map_err(|e| BackendError::Engine(format!("pmemsave {}: {e}", path.display())))
    }

    fn migrate(
        &mut self,
        target: MigrationTarget,
        params: &MigrationParameters,
        caps: &MigrationCapabilities,
    ) -> Result<(), BackendError> {
        // A stopped guest into a file or pipe is a checkpoint; anything else
        // (a running guest, or a peer that answers) is a live migration.
        let target = live::target(target)?;
        if let Target::Exec(cmd) = &target {
            migration::exec::check_spawn(cmd).map_err(|e| live::migration_error(&e.into()))?;
        }
        let running = self.shared.lock()?.state == RunState::Running;
        if running || target.has_peer() {
            self.start_live(target, params, caps)
        } else {
            self.start_save(target)
        }
    }

    fn migrate_incoming(
        &mut self,
        source: MigrationTarget,
        _caps: &MigrationCapabilities,
    ) -> Result<(), BackendError> {
        if self.shared.lock()?.state != RunState::InMigrate {
            return Err(BackendError::Migration(
                "The incoming migration has already been started or completed".into(),
            ));
        }
        self.start_incoming(live::target(source)?)
    }

    fn migrate_cancel(&mut self) -> Result<(), BackendError> {
        // A save runs to its end (it is bounded by guest RAM); only a live
        // migration is cancelled.
        self.cancel_live();
        Ok(())
    }

    fn postcopy_supported(&self) -> Result<(), BackendError> {
        ferry_kvm::Userfault::new().map(drop).map_err(|e| {
            BackendError::Migration(format!(
                "Postcopy is not supported: Userfaultfd not available: {}",
                ferry_vmm::error_chain(&e)
            ))
        })
    }

    fn migrate_start_postcopy(&mut self) -> Result<(), BackendError> {
        self.start_postcopy()
    }

    fn migrate_continue(&mut self, state: MigrationStatus) -> Result<(), BackendError> {
        self.continue_live(state)
    }

    fn query_migrate(&self) -> MigrationInfo {
        let mut info = self
            .shared
            .migration
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        live::fill_info(&self.shared, &mut info);
        info
    }

    fn set_migration_tls(&mut self, tls: Option<MigrationTls>) -> Result<(), BackendError> {
        self.shared.lock()?.tls = tls;
        Ok(())
    }

    fn set_migrate_parameters(&mut self, params: &MigrationParameters) -> Result<(), BackendError> {
        // A save writes as fast as it can; a live migration takes them at
        // its next pass.
        live::set_params(&self.shared, params);
        let mut inner = self.shared.lock()?;
        inner.announce = params.announce;
        if let Some(g) = inner.guest.as_mut() {
            g.set_announce_schedule(params.announce);
        }
        Ok(())
    }

    fn announce_self(
        &mut self,
        schedule: AnnounceSchedule,
        interfaces: Option<&[String]>,
    ) -> Result<(), BackendError> {
        let inner = self.shared.lock()?;
        inner
            .guest_for("announce-self")?
            .announce_with(schedule, interfaces);
        Ok(())
    }

    fn calc_dirty_rate(&mut self, calc_time_s: u64, sample_pages: u64) -> Result<(), BackendError> {
        let ram = {
            let inner = self.shared.lock()?;
            Arc::clone(inner.guest_for("calc-dirty-rate")?.ram())
        };
        self.shared
            .dirty_rate
            .start(ram, calc_time_s, sample_pages)
            .map_err(engine)
    }

    fn query_dirty_rate(&self) -> Option<ferry_vmm::dirty_rate::Measurement> {
        let m = self.shared.dirty_rate.last();
        (m.status != ferry_vmm::dirty_rate::Status::Unstarted).then_some(m)
    }

    fn set_incoming_multifd(&mut self, channels: Option<u32>) -> Result<(), BackendError> {
        let mut m = self
            .shared
            .incoming_multifd
            .lock()
            .map_err(|_| BackendError::Engine("internal error: VM state poisoned".into()))?;
        *m = channels;
        Ok(())
    }

    fn save(&mut self, target: MigrationTarget) -> Result<(), BackendError> {
        self.start_save(live::target(target)?)
    }

    fn guest_cpuid(&self) -> Option<Vec<CpuidLeaf>> {
        self.shared.inner.lock().ok()?.cpuid.clone()
    }

    fn disk_stats(&self) -> Vec<(String, ferry_vmm::devices::virtio::blk::BlockStats)> {
        let Ok(inner) = self.shared.inner.lock() else {
            return Vec::new();
        };
        inner.guest.as_ref().map_or_else(Vec::new, |g| {
            g.device_stats()
                .into_iter()
                .filter_map(|(id, s)| match s {
                    ferry_vmm::devices::virtio::DeviceStats::Block(b) => Some((id, b)),
                    _ => None,
                })
                .chain(g.ide_stats())
                .collect()
        })
    }

    fn balloon_info(&self) -> Result<BalloonInfo, BackendError> {
        let inner = self.shared.lock()?;
        match (&inner.guest, &inner.balloon_seen) {
            (Some(g), _) => g.balloon_info().ok_or(BackendError::NoBalloon),
            (None, Some(seen)) if inner.migrating => Ok(seen.clone()),
            // An incoming guest not loaded yet: its balloon as QEMU's looks
            // before the state arrives (empty).
            (None, _) => Ok(BalloonInfo {
                poll_interval: inner.balloon_interval,
                ..BalloonInfo::default()
            }),
        }
    }

    fn set_balloon_target(&mut self, pages: u64) -> Result<(), BackendError> {
        let inner = self.shared.lock()?;
        inner.not_migrating("balloon")?;
        match &inner.guest {
            Some(g) => g.set_balloon_target(pages).map_err(engine),
            // The incoming stream brings the source's target, as in QEMU.
            None if inner.state == RunState::InMigrate => Ok(()),
            None => Err(BackendError::BadState {
                operation: "balloon",
                state: state_name(inner.state),
            }),
        }
    }

    fn set_balloon_stats_interval(&mut self, secs: u32) -> Result<(), BackendError> {
        let mut inner = self.shared.lock()?;
        inner.not_migrating("guest-stats-polling-interval")?;
        inner.balloon_interval = secs;
        if let Some(g) = &inner.guest {
            g.set_balloon_stats_interval(secs).map_err(engine)?;
        }
        Ok(())
    }

    fn serial_chardevs(&self) -> Vec<(String, String)> {
        self.shared
            .inner
            .lock()
            .map(|i| {
                i.serial
                    .iter()
                    .map(|s| (s.label.clone(), s.filename.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A pmemsave range outside guest RAM's span (QEMU's words for a bad range).
#[derive(Debug, thiserror::Error)]
#[error("Invalid addr 0x{addr:x}/size {size} specified: guest RAM ends at 0x{ram_end:x}")]
struct PhysRangeError {
    addr: u64,
    size: u64,
    ram_end: u64,
}

/// Refuses a pmemsave range that does not lie within guest RAM's span,
/// before anything is opened or written.
fn check_phys_range(ranges: &[(u64, u64)], addr: u64, size: u64) -> Result<(), PhysRangeError> {
    let ram_end = ranges.iter().map(|(b, s)| b + s).max().unwrap_or(0);
    match addr.checked_add(size) {
        Some(end) if end <= ram_end => Ok(()),
        _ => Err(PhysRangeError {
            addr,
            size,
            ram_end,
        }),
    }
}

/// Where a memory dump goes: a regular file is written privately and
/// atomically ([`PrivateFile`]); a FIFO or character device, which cannot
/// be renamed over, seeked or synced, is written as a stream.
enum DumpOut {
    Private(PrivateFile),
    Stream(File),
}

impl DumpOut {
    fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(path) {
            Ok(m) if m.file_type().is_fifo() || m.file_type().is_char_device() => {
                // No create, no truncate: the reader is on the other side.
                File::options().write(true).open(path).map(Self::Stream)
            }
            _ => PrivateFile::create(path).map(Self::Private),
        }
    }

    fn file(&mut self) -> &mut File {
        match self {
            Self::Private(p) => p.file_mut(),
            Self::Stream(f) => f,
        }
    }

    fn finish(self) -> std::io::Result<()> {
        match self {
            Self::Private(p) => p.commit(),
            Self::Stream(_) => Ok(()),
        }
    }
}

/// Writes guest-physical `[addr, addr+size)` to `path` (QEMU's pmemsave);
/// holes between RAM ranges read as zero. The range was checked with
/// [`check_phys_range`].
fn write_phys(ram: &GuestRam, addr: u64, size: u64, path: &Path) -> std::io::Result<()> {
    let end = addr
        .checked_add(size)
        .ok_or_else(|| std::io::Error::other("address range wraps around"))?;
    let ranges = ram.ranges();
    let mut out = DumpOut::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut gpa = addr;
    while gpa < end {
        let want = (end - gpa).min(buf.len() as u64);
        let n = match ranges.iter().find(|(b, s)| gpa >= *b && gpa - b < *s) {
            Some((b, s)) => {
                let n = want.min(b + s - gpa) as usize;
                ram.read(gpa, &mut buf[..n])
                    .map_err(std::io::Error::other)?;
                n
            }
            None => {
                let next = ranges
                    .iter()
                    .map(|r| r.0)
                    .filter(|b| *b > gpa)
                    .min()
                    .unwrap_or(end);
                let n = want.min(next - gpa) as usize;
                buf[..n].fill(0);
                n
            }
        };
        out.file().write_all(&buf[..n])?;
        gpa += n as u64;
    }
    out.finish()
}

/// The thread id of vCPU `index` (its thread is named `vcpu<index>`), or the
/// process id while no guest exists (before an incoming stream is loaded).
pub fn vcpu_thread_id(index: u32) -> i64 {
    let want = format!("vcpu{index}");
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim_end() == want {
                if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) {
                    return tid;
                }
            }
        }
    }
    i64::from(std::process::id())
}

/// What a file from an fd set is used for: the descriptor's access mode
/// must allow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdAccess {
    Read,
    Write,
    ReadWrite,
}

impl FdAccess {
    fn fits(self, mode: OFlag) -> bool {
        match self {
            Self::Read => mode == OFlag::O_RDONLY || mode == OFlag::O_RDWR,
            Self::Write => mode == OFlag::O_WRONLY || mode == OFlag::O_RDWR,
            Self::ReadWrite => mode == OFlag::O_RDWR,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Read => "reading",
            Self::Write => "writing",
            Self::ReadWrite => "reading and writing",
        }
    }
}

/// Why a `/dev/fdset/N` path has no descriptor to use.
#[derive(Debug, thiserror::Error)]
pub enum FdSetError {
    #[error("{path}: not an fd set: /dev/fdset/ takes a set number (-add-fd set=N,fd=M)")]
    BadSet { path: String },
    #[error("{path}: no such fd set: pass its descriptor with -add-fd set={set},fd=N")]
    NoSet { path: String, set: u64 },
    #[error(
        "{path}: fd set {set} holds no descriptor open for {}: pass one opened \
         that way with -add-fd set={set},fd=N",
        need.as_str()
    )]
    NoFit {
        path: String,
        set: u64,
        need: FdAccess,
    },
    #[error("{path}: cannot duplicate fd {fd} of set {set}: {source}")]
    Dup {
        path: String,
        set: u64,
        fd: i32,
        #[source]
        source: std::io::Error,
    },
}

/// For a `/dev/fdset/N` path, a descriptor of set N whose access mode allows
/// `need` (a duplicate: the set keeps its own, as in QEMU), to be used as
/// passed; `None` for any other path. Never a `/proc/self/fd/M` path:
/// opening one checks the file's permissions again, which the emulator's
/// user (libvirt-qemu) may not pass on virtlogd's pipe or a file libvirt
/// opened for it.
pub fn fdset_fd(
    path: &str,
    fdsets: &FdSets,
    need: FdAccess,
) -> Result<Option<SharedFd>, FdSetError> {
    let Some(n) = path.strip_prefix("/dev/fdset/") else {
        return Ok(None);
    };
    let set: u64 = n.parse().map_err(|_| FdSetError::BadSet {
        path: path.to_string(),
    })?;
    let entries = fdsets.get(&set).ok_or_else(|| FdSetError::NoSet {
        path: path.to_string(),
        set,
    })?;
    let entry = entries
        .iter()
        .find(|e| {
            fcntl(&e.fd, FcntlArg::F_GETFL)
                .is_ok_and(|f| need.fits(OFlag::from_bits_truncate(f) & OFlag::O_ACCMODE))
        })
        .ok_or(FdSetError::NoFit {
            path: path.to_string(),
            set,
            need,
        })?;
    let fd = entry.fd.try_clone().map_err(|source| FdSetError::Dup {
        path: path.to_string(),
        set,
        fd: entry.fd.as_raw_fd(),
        source,
    })?;
    Ok(Some(SharedFd::new(fd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend with a guest built (paused, `-S`) from `-machine pc -m 64
    /// EXTRA -kernel dirtier`, and the receiver of its QMP events; `None`
    /// (the test skips, except in CI) where /dev/kvm is not usable. Keep the
    /// directory: it holds the kernel.
    fn guest_on_kvm(
        extra: &str,
    ) -> Option<(
        tempfile::TempDir,
        FerryBackend,
        std::sync::mpsc::Receiver<serde_json::Value>,
    )> {
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            assert!(std::env::var_os("CI").is_none(), "CI must run every test");
            eprintln!("SKIP: /dev/kvm is not usable here");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = dir.path().join("dirtier.elf");
        std::fs::write(&kernel, ferry_testguest::DIRTIER_ELF).expect("kernel");
        let args = format!("-S -machine pc -m 64 {extra} -kernel {}", kernel.display());
        let inv = crate::argv::parse(&args.split_whitespace().collect::<Vec<_>>()).expect("argv");
        let config = inv.machine_config().expect("config").expect("a guest");
        let events = EventSink::new();
        let (tx, rx) = std::sync::mpsc::channel();
        events.subscribe(1, tx);
        let mut backend = FerryBackend::new(events);
        backend.create(&config).expect("guest");
        Some((dir, backend, rx))
    }

    /// QEMU's `bootorder` file: OpenFirmware paths by `bootindex` (a
    /// virtio-blk disk in slot 0xa, IDE drives by channel and unit), `HALT`
    /// last under `-boot strict=on`; drives without a bootindex are left out.
    #[test]
    fn bootorder_lists_the_disks_by_bootindex_as_qemu_names_them() {
        let args = "-machine pc -m 64 -boot strict=on \
             -blockdev driver=file,filename=/a.img,node-name=a \
             -blockdev driver=file,filename=/b.img,node-name=b \
             -blockdev driver=file,filename=/c.iso,node-name=c,read-only=on \
             -blockdev driver=file,filename=/d.img,node-name=d \
             -device virtio-blk-pci,drive=a,addr=0xa,bootindex=2 \
             -device ide-hd,drive=b,bus=ide.0,unit=1,bootindex=1 \
             -device ide-cd,drive=c,bus=ide.1,unit=0,bootindex=3 \
             -device virtio-blk-pci,drive=d,addr=0x5";
        let inv = crate::argv::parse(&args.split_whitespace().collect::<Vec<_>>()).expect("argv");
        let config = inv.machine_config().expect("config").expect("a guest");
        assert_eq!(
            bootorder(&config),
            [
                "/pci@i0cf8/ide@1,1/drive@0/disk@1",
                "/pci@i0cf8/scsi@a/disk@0,0",
                "/pci@i0cf8/ide@1,1/drive@1/disk@0",
                "HALT",
            ]
        );
        let fw = fw_cfg(&config).expect("pc has fw_cfg");
        assert_eq!(fw.bootorder, bootorder(&config));
        assert_eq!(
            firmware(&config).map(|f| f.path),
            Some(std::path::PathBuf::from(ferry_vmm::firmware::DEFAULT_BIOS))
        );
    }

    /// The balloon on ferry-vmm behind QMP: `balloon` reaches the guest's
    /// device (its configuration space), a driver's write of `actual` becomes
    /// one BALLOON_CHANGE with QEMU's value, and the polling interval set
    /// before the guest exists reaches it.
    #[test]
    fn balloon_reaches_the_guest_and_its_changes_come_back_as_events() {
        use ferry_vmm::devices::virtio::test_driver::Driver;
        let Some((_dir, mut backend, rx)) = guest_on_kvm(
            "-device virtio-balloon-pci,id=balloon0,bus=pci.0,addr=0x5,guest-stats-polling-interval=7",
        ) else {
            return;
        };
        assert_eq!(backend.balloon_info().expect("balloon").poll_interval, 7);
        backend.set_balloon_target(1000).expect("target");
        {
            let inner = backend.shared.lock().expect("lock");
            let guest = inner.guest.as_ref().expect("guest");
            let d = Driver::attach(guest, 5, 5);
            assert_eq!(d.read(d.device, 4), 1000, "num_pages in the guest");
            d.write(d.device + 4, 4, 1000);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let change = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = rx.recv_timeout(left).expect("BALLOON_CHANGE");
            if e["event"] == "BALLOON_CHANGE" {
                break e;
            }
        };
        assert_eq!(change["data"]["actual"], (64u64 << 20) - 1000 * 4096);
        assert_eq!(backend.balloon_info().expect("balloon").actual, 1000);
        // The watcher thread stays (as in a process); the guest goes.
        backend.shared.lock().expect("lock").guest = None;
    }

    /// A pc guest's RTC on ferry-vmm behind QMP: the guest setting its
    /// clock (under SET, as Linux's hwclock does) becomes one RTC_CHANGE
    /// with the new offset from `-rtc base=`, in seconds.
    #[test]
    fn a_guest_setting_its_rtc_is_an_rtc_change_event() {
        use ferry_vmm::devices::rtc::{b, reg, DATA_PORT, INDEX_PORT};
        let Some((_dir, backend, rx)) = guest_on_kvm("-rtc base=utc") else {
            return;
        };
        {
            let inner = backend.shared.lock().expect("lock");
            let rtc = inner.guest.as_ref().expect("guest").rtc().expect("an RTC");
            // One hour on: hours + 1 under SET (BCD, 24 h; a wrap past 23
            // normalises to the next day, an hour on all the same).
            rtc.io_write(INDEX_PORT, &[reg::B]);
            rtc.io_write(DATA_PORT, &[b::SET | b::H24]);
            rtc.io_write(INDEX_PORT, &[reg::HOURS]);
            let mut h = [0u8];
            rtc.io_read(DATA_PORT, &mut h);
            let hour = (h[0] >> 4) * 10 + (h[0] & 0x0f) + 1;
            rtc.io_write(DATA_PORT, &[((hour / 10) << 4) | (hour % 10)]);
            rtc.io_write(INDEX_PORT, &[reg::B]);
            rtc.io_write(DATA_PORT, &[b::H24]);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let change = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = rx.recv_timeout(left).expect("RTC_CHANGE");
            if e["event"] == "RTC_CHANGE" {
                break e;
            }
        };
        let offset = change["data"]["offset"].as_i64().expect("an offset");
        // The clock ticked on while the test wrote: 3600 less a second or two.
        assert!((3597..=3600).contains(&offset), "{change}");
        backend.shared.lock().expect("lock").guest = None;
    }

    #[test]
    fn pmemsave_ranges_stay_within_guest_ram() {
        // 128 MiB below the PCI hole, 64 MiB above 4 GiB.
        let ranges = [(0, 128 << 20), (4 << 30, 64 << 20)];
        assert!(check_phys_range(&ranges, 0, 128 << 20).is_ok());
        assert!(check_phys_range(&ranges, 0, (4 << 30) + (64 << 20)).is_ok());
        assert!(check_phys_range(&ranges, (4 << 30) + (64 << 20), 0).is_ok());
        let e = check_phys_range(&ranges, (4 << 30) + (64 << 20), 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("Invalid addr 0x104000000/size 1 specified"),
            "{e}"
        );
        assert!(check_phys_range(&ranges, u64::MAX, 2).is_err(), "wraps");
        assert!(check_phys_range(&[], 0, 1).is_err(), "no RAM");
    }

    #[test]
    fn fdset_paths_give_the_passed_fds() {
        use crate::qmp::server::FdSetEntry;
        use std::io::{Read, Write};
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let mut sets = FdSets::new();
        for (set, fd) in [(0, w), (1, r)] {
            sets.entry(set)
                .or_default()
                .push(FdSetEntry { fd, opaque: None });
        }
        assert!(fdset_fd("/var/log/x", &sets, FdAccess::Write)
            .expect("a path")
            .is_none());
        let log = fdset_fd("/dev/fdset/0", &sets, FdAccess::Write)
            .expect("set 0")
            .expect("an fd");
        log.dup().expect("dup").write_all(b"x").expect("write");
        let mut got = [0u8; 1];
        File::from(sets[&1][0].fd.try_clone().expect("dup"))
            .read_exact(&mut got)
            .expect("read");
        assert_eq!(&got, b"x", "the set's own pipe, not a reopen");
        let err = |p, need| fdset_fd(p, &sets, need).expect_err(p).to_string();
        assert_eq!(
            err("/dev/fdset/2", FdAccess::Write),
            "/dev/fdset/2: no such fd set: pass its descriptor with -add-fd set=2,fd=N"
        );
        assert!(err("/dev/fdset/x", FdAccess::Read).contains("not an fd set"));
        assert_eq!(
            err("/dev/fdset/1", FdAccess::ReadWrite),
            "/dev/fdset/1: fd set 1 holds no descriptor open for reading and writing: \
             pass one opened that way with -add-fd set=1,fd=N"
        );
        assert!(fdset_fd("/dev/fdset/1", &sets, FdAccess::Read)
            .expect("read end")
            .is_some());
    }
}
