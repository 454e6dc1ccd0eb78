//! Migration: capabilities, parameters, migrate, migrate-incoming,
//! migrate_cancel, migrate-continue, query-migrate.

use std::os::fd::OwnedFd;

use ferry_vmm::migration::Endpoint;
use serde_json::{json, Map, Value};

use super::objects::migration_tls;
use super::types::*;
use super::{arg_str, Command, Ctx};
use crate::argv::Incoming;
use crate::backend::{
    MigrationInfo, MigrationStatus, MigrationTarget, RunState, MAX_MULTIFD_CHANNELS,
};
use crate::qmp::error::CommandError;
use crate::qmp::schema::{opt, req, CommandSchema, ObjectDef, Ty};

pub static QUERY_MIGRATE_CAPABILITIES: Command = Command {
    schema: CommandSchema {
        name: "query-migrate-capabilities",
        args: &[],
        ret: Some(Ty::Array(&Ty::Object(&MIGRATION_CAPABILITY_STATUS))),
    },
    handler: |ctx, _| {
        let c = &ctx.vm.migrate_caps;
        Ok(json!([
            {"capability": "events", "state": c.events},
            {"capability": "pause-before-switchover", "state": c.pause_before_switchover},
            {"capability": "return-path", "state": c.return_path},
            {"capability": "late-block-activate", "state": c.late_block_activate},
            {"capability": "multifd", "state": c.multifd},
            {"capability": "auto-converge", "state": c.auto_converge},
            {"capability": "postcopy-ram", "state": c.postcopy_ram},
        ]))
    },
};

pub static MIGRATE_SET_CAPABILITIES: Command = Command {
    schema: CommandSchema {
        name: "migrate-set-capabilities",
        args: &[req(
            "capabilities",
            Ty::Array(&Ty::Object(&MIGRATION_CAPABILITY_STATUS)),
        )],
        ret: None,
    },
    handler: migrate_set_capabilities,
};

fn migrate_set_capabilities(
    ctx: &mut Ctx<'_>,
    args: &Map<String, Value>,
) -> Result<Value, CommandError> {
    if migration_running(&ctx.vm.backend.query_migrate()) {
        return Err(CommandError::Generic(
            "There's a migration process in progress".into(),
        ));
    }
    let mut caps = ctx.vm.migrate_caps;
    for c in args
        .get("capabilities")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let state = c.get("state").and_then(Value::as_bool).unwrap_or(false);
        match c
            .get("capability")
            .and_then(Value::as_str)
            .unwrap_or_default()
        {
            "events" => caps.events = state,
            "pause-before-switchover" => caps.pause_before_switchover = state,
            "return-path" => caps.return_path = state,
            "late-block-activate" => caps.late_block_activate = state,
            "multifd" => caps.multifd = state,
            "auto-converge" => caps.auto_converge = state,
            "postcopy-ram" => caps.postcopy_ram = state,
            other => {
                return Err(CommandError::Parameter(format!(
                    "Parameter 'capability' does not accept value '{other}'"
                )))
            }
        }
    }
    // QEMU 7.2 (migrate_caps_check): an incoming side must be able to serve
    // missing pages, or libvirt's `virsh migrate --postcopy` fails here, at once.
    if caps.postcopy_ram
        && !ctx.vm.migrate_caps.postcopy_ram
        && ctx.vm.backend.status() == RunState::InMigrate
    {
        ctx.vm.backend.postcopy_supported()?;
    }
    // QEMU 7.2 (migrate_caps_check): post-copy moves RAM over one stream.
    if caps.postcopy_ram && caps.multifd {
        return Err(CommandError::Generic(
            "Postcopy is not yet compatible with multifd: turn the multifd capability off, or \
             postcopy-ram off"
                .into(),
        ));
    }
    // QEMU 7.2 (migrate_caps_check): a destination reading fd: or exec:
    // cannot take page streams.
    if caps.multifd && ctx.vm.incoming_one_stream && ctx.vm.backend.status() == RunState::InMigrate
    {
        return Err(multifd_needs_sockets("the incoming migration's URI"));
    }
    ctx.vm.backend.set_incoming_multifd(
        caps.multifd
            .then_some(ctx.vm.migrate_params.multifd_channels),
    )?;
    ctx.vm.migrate_caps = caps;
    Ok(json!({}))
}

/// QEMU's refusal of multifd where the URI carries one stream, with the fix.
fn multifd_needs_sockets(what: &str) -> CommandError {
    CommandError::Generic(format!(
        "multifd is not supported by current protocol: {what} carries one stream; page \
         streams need a tcp: or unix: URI, or turn the multifd capability off"
    ))
}

/// `migrate-set-parameters` `multifd-channels`: QEMU's uint8 and range
/// errors, then ferry's own limit.
fn multifd_channels(v: &Value) -> Result<u32, CommandError> {
    let n = v.as_u64().filter(|n| *n <= 255).ok_or_else(|| {
        CommandError::Parameter("Parameter 'multifd-channels' expects uint8_t".into())
    })?;
    if n == 0 {
        return Err(CommandError::Parameter(
            "Parameter 'multifd_channels' expects a value between 1 and 255".into(),
        ));
    }
    if n > u64::from(MAX_MULTIFD_CHANNELS) {
        return Err(CommandError::Parameter(format!(
            "Parameter 'multifd-channels': ferry-qemu opens at most {MAX_MULTIFD_CHANNELS} page \
             streams, not {n}; set 1 to {MAX_MULTIFD_CHANNELS} (virsh migrate \
             --parallel-connections)"
        )));
    }
    Ok(n as u32)
}

fn migration_running(info: &MigrationInfo) -> bool {
    matches!(
        info.status,
        Some(
            MigrationStatus::Setup
                | MigrationStatus::Active
                | MigrationStatus::PreSwitchover
                | MigrationStatus::Device
                | MigrationStatus::Cancelling
        )
    )
}

pub static QUERY_MIGRATE_PARAMETERS: Command = Command {
    schema: CommandSchema {
        name: "query-migrate-parameters",
        args: &[],
        ret: Some(Ty::Object(&MIGRATION_PARAMETERS)),
    },
    handler: |ctx, _| {
        let p = &ctx.vm.migrate_params;
        Ok(json!({
            "max-bandwidth": p.max_bandwidth,
            "downtime-limit": p.downtime_limit_ms,
            "multifd-channels": p.multifd_channels,
            "cpu-throttle-initial": p.cpu_throttle_initial,
            "cpu-throttle-increment": p.cpu_throttle_increment,
            "cpu-throttle-tailslow": p.cpu_throttle_tailslow,
            "max-cpu-throttle": p.max_cpu_throttle,
            "throttle-trigger-threshold": p.throttle_trigger_threshold,
            "announce-initial": p.announce.initial.as_millis() as u64,
            "announce-max": p.announce.max.as_millis() as u64,
            "announce-rounds": p.announce.rounds,
            "announce-step": p.announce.step.as_millis() as u64,
            "multifd-compression": "none",
            "multifd-zlib-level": p.multifd_zlib_level,
            "multifd-zstd-level": p.multifd_zstd_level,
            "max-postcopy-bandwidth": p.max_postcopy_bandwidth,
            "tls-creds": ctx.vm.tls_params.creds,
            "tls-hostname": ctx.vm.tls_params.hostname,
            "tls-authz": ctx.vm.tls_params.authz,
        }))
    },
};

static MIGRATE_SET_PARAMETERS_ARGS: ObjectDef = ObjectDef {
    name: "MigrateSetParameters",
    members: MIGRATION_PARAMETERS_MEMBERS,
};

pub static MIGRATE_SET_PARAMETERS: Command = Command {
    schema: CommandSchema {
        name: "migrate-set-parameters",
        args: MIGRATE_SET_PARAMETERS_ARGS.members,
        ret: None,
    },
    handler: migrate_set_parameters,
};

fn migrate_set_parameters(
    ctx: &mut Ctx<'_>,
    args: &Map<String, Value>,
) -> Result<Value, CommandError> {
    if !arg_str(args, "tls-authz").is_empty() {
        return Err(CommandError::Generic(
            "Parameter 'tls-authz': authorization objects are not supported by ferry-qemu; \
             with tls-creds-x509 and verify-peer, the CA decides which sources may connect"
                .into(),
        ));
    }
    let mut tls = ctx.vm.tls_params.clone();
    if let Some(v) = args.get("tls-creds").and_then(Value::as_str) {
        // Resolved when a migration starts, as QEMU does.
        tls.creds = v.to_string();
    }
    if let Some(v) = args.get("tls-hostname").and_then(Value::as_str) {
        tls.hostname = v.to_string();
    }
    let mut p = ctx.vm.migrate_params;
    if let Some(v) = args.get("max-bandwidth") {
        p.max_bandwidth = v.as_u64().ok_or_else(|| {
            CommandError::Parameter(
                "Parameter 'max-bandwidth' expects an integer in the range of 0 to 2^63-1 bytes/second"
                    .into(),
            )
        })?;
    }
    if let Some(v) = args.get("downtime-limit") {
        p.downtime_limit_ms = v.as_u64().filter(|d| *d <= 2_000_000).ok_or_else(|| {
            CommandError::Parameter(
                "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 milliseconds"
                    .into(),
            )
        })?;
    }
    if let Some(v) = args.get("multifd-channels") {
        p.multifd_channels = multifd_channels(v)?;
    }
    // QEMU 7.2's ranges and texts (migrate_params_check).
    let percent = |name: &str, low: u64, high: u64| -> Result<Option<u8>, CommandError> {
        args.get(name)
            .map(|v| {
                v.as_u64()
                    .filter(|n| (low..=high).contains(n))
                    .map(|n| n as u8)
                    .ok_or_else(|| {
                        CommandError::Parameter(format!(
                            "Parameter '{}' expects an integer in the range of {low} to {high}",
                            name.replace('-', "_")
                        ))
                    })
            })
            .transpose()
    };
    if let Some(n) = percent("cpu-throttle-initial", 1, 99)? {
        p.cpu_throttle_initial = n;
    }
    if let Some(n) = percent("cpu-throttle-increment", 1, 99)? {
        p.cpu_throttle_increment = n;
    }
    if let Some(n) = percent("max-cpu-throttle", 1, 99)? {
        p.max_cpu_throttle = n;
    }
    if let Some(n) = percent("throttle-trigger-threshold", 1, 100)? {
        p.throttle_trigger_threshold = n;
    }
    if let Some(v) = args.get("cpu-throttle-tailslow").and_then(Value::as_bool) {
        p.cpu_throttle_tailslow = v;
    }
    if let Some(method) = args
        .get("multifd-compression")
        .and_then(Value::as_str)
        .filter(|m| *m != "none")
    {
        return Err(CommandError::Generic(format!(
            "Parameter 'multifd-compression': ferry-qemu does not compress page streams \
             ({method} asked): it sends no zero page and each other page once per pass, \
             so compression would cost the guest's CPU for little; migrate without a \
             compression method (virsh migrate without --compression-methods)"
        )));
    }
    // QEMU 7.2's texts for the levels differ from the throttle's.
    let level = |name: &str, high: u64| -> Result<Option<u8>, CommandError> {
        args.get(name)
            .map(|v| {
                v.as_u64()
                    .filter(|n| *n <= high)
                    .map(|n| n as u8)
                    .ok_or_else(|| {
                        CommandError::Parameter(format!(
                            "Parameter '{}' expects a value between 0 and {high}",
                            name.replace('-', "_")
                        ))
                    })
            })
            .transpose()
    };
    if let Some(n) = level("multifd-zlib-level", 9)? {
        p.multifd_zlib_level = n;
    }
    if let Some(n) = level("multifd-zstd-level", 20)? {
        p.multifd_zstd_level = n;
    }
    if let Some(v) = args.get("max-postcopy-bandwidth") {
        p.max_postcopy_bandwidth = v.as_u64().ok_or_else(|| {
            CommandError::Parameter(
                "Parameter 'max-postcopy-bandwidth' expects an integer in the range of 0 to \
                 2^63-1 bytes/second"
                    .into(),
            )
        })?;
    }
    p.announce = super::monitor::announce_schedule(args, "announce-", p.announce)?;
    ctx.vm.backend.set_migrate_parameters(&p)?;
    let caps = ctx.vm.migrate_caps;
    ctx.vm
        .backend
        .set_incoming_multifd(caps.multifd.then_some(p.multifd_channels))?;
    ctx.vm.migrate_params = p;
    ctx.vm.tls_params = tls;
    Ok(json!({}))
}

/// Whether page streams (more connections to the same address) can go over
/// `t`: `tcp:` and `unix:` only, as in QEMU 7.2.
fn carries_streams(t: &MigrationTarget) -> bool {
    matches!(t, MigrationTarget::Tcp(_) | MigrationTarget::Unix(_))
}

/// Why `fd:N` was refused, with the way to pass a descriptor that works.
/// Only a number inherited at exec and not yet used (by an `-add-fd` set, a
/// chardev, a NIC, an earlier migration) is taken: any other number is one
/// of ferry-qemu's own files (a disk image, a socket), or nothing.
fn adopt_error(n: i32, e: &std::io::Error) -> CommandError {
    CommandError::Generic(match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            format!("fd {n} was not passed to ferry-qemu: pass it with getfd or add-fd")
        }
        std::io::ErrorKind::AlreadyExists => format!(
            "fd {n} is already in use by ferry-qemu (an fd set, a chardev, a NIC or an \
             earlier migration): pass a new descriptor with getfd"
        ),
        _ => format!("fd {n}: {e}: pass a descriptor with getfd or add-fd"),
    })
}

/// Resolves a migration URI; `fd:NAME` takes a `getfd` fd, `fd:N` an
/// inherited one nothing has claimed (see [`adopt_error`]).
fn target(ctx: &mut Ctx<'_>, uri: &str) -> Result<MigrationTarget, CommandError> {
    if let Some(name) = uri.strip_prefix("fd:") {
        if let Some(fd) = ctx.monitor_fds.remove(name) {
            return Ok(MigrationTarget::Fd(fd));
        }
        let n: i32 = name.parse().map_err(|_| {
            CommandError::Generic(format!("File descriptor named '{name}' has not been found"))
        })?;
        let fd: OwnedFd = crate::fd::adopt_inherited(n).map_err(|e| adopt_error(n, &e))?;
        return Ok(MigrationTarget::Fd(fd));
    }
    match Incoming::parse(uri) {
        Some(Incoming::Tcp(a)) => Ok(MigrationTarget::Tcp(a)),
        Some(Incoming::Unix(p)) => Ok(MigrationTarget::Unix(p)),
        Some(Incoming::File(p)) => Ok(MigrationTarget::File(p)),
        Some(Incoming::Exec(c)) => Ok(MigrationTarget::Exec(c)),
        _ => Err(CommandError::Parameter(format!(
            "Parameter 'uri' expects a valid migration protocol, got '{uri}'"
        ))),
    }
}

pub static MIGRATE: Command = Command {
    schema: CommandSchema {
        name: "migrate",
        args: &[
            req("uri", Ty::Str),
            opt("blk", Ty::Bool),
            opt("inc", Ty::Bool),
            opt("detach", Ty::Bool),
            opt("resume", Ty::Bool),
        ],
        ret: None,
    },
    handler: migrate,
};

fn migrate(ctx: &mut Ctx<'_>, args: &Map<String, Value>) -> Result<Value, CommandError> {
    for k in ["blk", "inc", "resume"] {
        if args.get(k).and_then(Value::as_bool) == Some(true) {
            return Err(CommandError::Generic(format!(
                "Parameter '{k}': this migration mode is not supported by ferry-qemu"
            )));
        }
    }
    // QEMU's migrate_prepare: a blocker refuses before anything starts.
    if let Some(reason) = super::cpu::cpu_migration_blockers(ctx).into_iter().next() {
        return Err(CommandError::Generic(reason));
    }
    let tls = migration_tls(ctx, Endpoint::Client)?;
    let t = target(ctx, arg_str(args, "uri"))?;
    let (params, caps) = (ctx.vm.migrate_params, ctx.vm.migrate_caps);
    if caps.multifd && !carries_streams(&t) {
        return Err(multifd_needs_sockets(&format!(
            "'{}'",
            arg_str(args, "uri")
        )));
    }
    ctx.vm.backend.set_migration_tls(tls)?;
    ctx.vm.backend.migrate(t, &params, &caps)?;
    Ok(json!({}))
}

pub static MIGRATE_INCOMING: Command = Command {
    schema: CommandSchema {
        name: "migrate-incoming",
        args: &[req("uri", Ty::Str)],
        ret: None,
    },
    handler: |ctx, args| {
        if ctx.vm.invocation.incoming != Some(Incoming::Defer) {
            return Err(CommandError::Generic(
                "The incoming migration has not been configured with '-incoming defer'".into(),
            ));
        }
        let tls = migration_tls(ctx, Endpoint::Server)?;
        let t = target(ctx, arg_str(args, "uri"))?;
        let caps = ctx.vm.migrate_caps;
        let one_stream = !carries_streams(&t);
        if caps.multifd && one_stream {
            return Err(multifd_needs_sockets(&format!(
                "'{}'",
                arg_str(args, "uri")
            )));
        }
        ctx.vm.backend.set_migration_tls(tls)?;
        ctx.vm.backend.migrate_incoming(t, &caps)?;
        ctx.vm.incoming_one_stream = one_stream;
        Ok(json!({}))
    },
};

/// What libvirt's `virsh migrate --copy-storage-all|--copy-storage-inc`
/// hears: its destination starts an NBD server first (libvirt 9.0's migration
/// protocol, recorded in the libvirt lab). ferry-qemu
/// has no NBD server, block mirror or runtime `blockdev-add`; this one command
/// is present so that libvirt's error says why instead of "command not found".
/// The destination's Prepare fails with it and the guest runs on at the
/// source.
pub const NO_STORAGE_COPY: &str = "ferry-qemu cannot copy disks during a migration (it has no \
     NBD server and no block mirror): put the disks on storage both hosts see and migrate \
     without --copy-storage-all/--copy-storage-inc";

pub static NBD_SERVER_START: Command = Command {
    schema: CommandSchema {
        name: "nbd-server-start",
        args: &[
            req("addr", Ty::Any),
            opt("tls-creds", Ty::Str),
            opt("tls-authz", Ty::Str),
            opt("max-connections", Ty::Int),
        ],
        ret: None,
    },
    handler: |_, _| Err(CommandError::Generic(NO_STORAGE_COPY.into())),
};

pub static MIGRATE_CANCEL: Command = Command {
    schema: CommandSchema {
        name: "migrate_cancel",
        args: &[],
        ret: None,
    },
    handler: |ctx, _| {
        ctx.vm.backend.migrate_cancel()?;
        Ok(json!({}))
    },
};

pub static MIGRATE_CONTINUE: Command = Command {
    schema: CommandSchema {
        name: "migrate-continue",
        args: &[req("state", Ty::Enum(&MIGRATION_STATUS))],
        ret: None,
    },
    handler: |ctx, args| {
        let state = MigrationStatus::from_name(arg_str(args, "state")).ok_or_else(|| {
            CommandError::Generic(format!(
                "Migration not in expected state: {}",
                arg_str(args, "state")
            ))
        })?;
        ctx.vm.backend.migrate_continue(state)?;
        Ok(json!({}))
    },
};

pub static MIGRATE_START_POSTCOPY: Command = Command {
    schema: CommandSchema {
        name: "migrate-start-postcopy",
        args: &[],
        ret: None,
    },
    handler: |ctx, _| {
        ctx.vm.backend.migrate_start_postcopy()?;
        Ok(json!({}))
    },
};

pub static QUERY_MIGRATE: Command = Command {
    schema: CommandSchema {
        name: "query-migrate",
        args: &[],
        ret: Some(Ty::Object(&MIGRATION_INFO)),
    },
    handler: |ctx, _| {
        let mut info = ctx.vm.backend.query_migrate();
        info.blocked_reasons
            .extend(super::cpu::cpu_migration_blockers(ctx));
        Ok(migration_info_json(&info))
    },
};

/// `MigrationInfo` as QEMU shows it (absent fields left out).
pub fn migration_info_json(info: &MigrationInfo) -> Value {
    let mut m = Map::new();
    if let Some(s) = info.status {
        m.insert("status".into(), json!(s.as_str()));
    }
    if let Some(r) = &info.ram {
        m.insert(
            "ram".into(),
            json!({
                "transferred": r.transferred, "remaining": r.remaining, "total": r.total,
                "duplicate": r.duplicate, "skipped": 0, "normal": r.normal,
                "normal-bytes": r.normal_bytes, "dirty-pages-rate": r.dirty_pages_rate,
                "mbps": r.mbps, "dirty-sync-count": r.dirty_sync_count, "page-size": r.page_size,
                "pages-per-second": r.pages_per_second, "precopy-bytes": r.precopy_bytes,
                "downtime-bytes": r.downtime_bytes, "postcopy-bytes": r.postcopy_bytes,
                "postcopy-requests": r.postcopy_requests,
                "multifd-bytes": r.multifd_bytes, "dirty-sync-missed-zero-copy": 0,
            }),
        );
    }
    for (k, v) in [
        ("total-time", info.total_time_ms),
        ("setup-time", info.setup_time_ms),
        ("downtime", info.downtime_ms),
        ("expected-downtime", info.expected_downtime_ms),
        ("cpu-throttle-percentage", info.cpu_throttle_percentage),
        ("x-switchover-returns", info.switchover_returns),
    ] {
        if let Some(v) = v {
            m.insert(k.into(), json!(v));
        }
    }
    if let Some(e) = &info.error_desc {
        m.insert("error-desc".into(), json!(e));
    }
    if !info.blocked_reasons.is_empty() {
        m.insert("blocked-reasons".into(), json!(info.blocked_reasons));
    }
    Value::Object(m)
}
