//! Operator tools around a migration: `announce-self` (Nova's
//! `enable_qemu_monitor_announce_self` sends it after a migration),
//! `calc-dirty-rate`/`query-dirty-rate` (`virsh domdirtyrate-calc`, `virsh
//! domstats --dirtyrate`), and `human-monitor-command` with the HMP commands
//! of the same tools (`virsh qemu-monitor-command --hmp`).

use std::time::Duration;

use ferry_vmm::devices::virtio::net::AnnounceSchedule;
use ferry_vmm::dirty_rate::{Measurement, DEFAULT_SAMPLE_PAGES};
use serde_json::{json, Map, Value};

use super::{arg_str, Command, Ctx};
use crate::backend::RunState;
use crate::qmp::error::CommandError;
use crate::qmp::schema::{opt, req, CommandSchema, EnumDef, ObjectDef, Ty};

/// QEMU's ranges of the announce parameters (`migrate_params_check`), as
/// `(name, highest)`; a step is at least 1 ms. ferry applies them to
/// `announce-self` too, so a hostile monitor cannot make a NIC send for
/// ever.
const ANNOUNCE_RANGES: [(&str, u64); 4] = [
    ("initial", 100_000),
    ("max", 100_000),
    ("rounds", 1000),
    ("step", 10_000),
];

/// Reads the four announce parameters named `{prefix}initial` ... from
/// `args`, each `base`'s where absent; QEMU's error texts name them with
/// underscores (`announce_initial` for the migration parameters, `initial`
/// for `announce-self`).
pub(crate) fn announce_schedule(
    args: &Map<String, Value>,
    prefix: &str,
    base: AnnounceSchedule,
) -> Result<AnnounceSchedule, CommandError> {
    let mut values = [
        base.initial.as_millis() as u64,
        base.max.as_millis() as u64,
        u64::from(base.rounds),
        base.step.as_millis() as u64,
    ];
    for ((name, high), value) in ANNOUNCE_RANGES.iter().zip(&mut values) {
        let key = format!("{prefix}{name}");
        let Some(v) = args.get(&key) else {
            continue;
        };
        let low = u64::from(*name == "step");
        *value = v
            .as_u64()
            .filter(|n| (low..=*high).contains(n))
            .ok_or_else(|| {
                CommandError::Parameter(format!(
                    "Parameter '{}' expects a value between 0 and {high}",
                    key.replace('-', "_")
                ))
            })?;
    }
    let [initial, max, rounds, step] = values;
    Ok(AnnounceSchedule {
        initial: Duration::from_millis(initial),
        max: Duration::from_millis(max),
        rounds: rounds as u32,
        step: Duration::from_millis(step),
    })
}

pub static ANNOUNCE_SELF: Command = Command {
    schema: CommandSchema {
        name: "announce-self",
        args: &[
            req("initial", Ty::Int),
            req("max", Ty::Int),
            req("rounds", Ty::Int),
            req("step", Ty::Int),
            opt("interfaces", Ty::Array(&Ty::Str)),
            opt("id", Ty::Str),
        ],
        ret: None,
    },
    handler: announce_self,
};

fn announce_self(ctx: &mut Ctx<'_>, args: &Map<String, Value>) -> Result<Value, CommandError> {
    let schedule = announce_schedule(args, "", AnnounceSchedule::default())?;
    let interfaces: Option<Vec<String>> =
        args.get("interfaces").and_then(Value::as_array).map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        });
    // `id` names QEMU's timer, so that announces with other ids run side by
    // side; here a new announce of a NIC replaces the one it was sending.
    ctx.vm
        .backend
        .announce_self(schedule, interfaces.as_deref())?;
    Ok(json!({}))
}

static DIRTY_RATE_MODE: EnumDef = EnumDef {
    name: "DirtyRateMeasureMode",
    values: &["page-sampling", "dirty-ring", "dirty-bitmap"],
};

static DIRTY_RATE_STATUS: EnumDef = EnumDef {
    name: "DirtyRateStatus",
    values: &["unstarted", "measuring", "measured"],
};

static DIRTY_RATE_INFO: ObjectDef = ObjectDef {
    name: "DirtyRateInfo",
    members: &[
        opt("dirty-rate", Ty::Int),
        req("status", Ty::Enum(&DIRTY_RATE_STATUS)),
        req("start-time", Ty::Int),
        req("calc-time", Ty::Int),
        req("sample-pages", Ty::Int),
        req("mode", Ty::Enum(&DIRTY_RATE_MODE)),
    ],
};

pub static CALC_DIRTY_RATE: Command = Command {
    schema: CommandSchema {
        name: "calc-dirty-rate",
        args: &[
            req("calc-time", Ty::Int),
            opt("sample-pages", Ty::Int),
            opt("mode", Ty::Enum(&DIRTY_RATE_MODE)),
        ],
        ret: None,
    },
    handler: calc_dirty_rate,
};

fn calc_dirty_rate(ctx: &mut Ctx<'_>, args: &Map<String, Value>) -> Result<Value, CommandError> {
    let mode = args
        .get("mode")
        .and_then(Value::as_str)
        .unwrap_or("page-sampling");
    start_dirty_rate(
        ctx,
        args.get("calc-time").and_then(Value::as_i64).unwrap_or(0),
        args.get("sample-pages").map(|v| v.as_i64().unwrap_or(0)),
        mode,
    )?;
    Ok(json!({}))
}

/// `calc-dirty-rate`'s checks in QEMU 7.2's order and texts, then the start.
fn start_dirty_rate(
    ctx: &mut Ctx<'_>,
    calc_time: i64,
    sample_pages: Option<i64>,
    mode: &str,
) -> Result<(), CommandError> {
    match mode {
        "page-sampling" => {}
        // ferry does not give KVM a dirty ring.
        "dirty-ring" => {
            return Err(CommandError::Generic(
                "mode dirty-ring is not enabled, use other method instead.".into(),
            ))
        }
        _ => {
            return Err(CommandError::Generic(format!(
                "mode {mode} is not supported by ferry-qemu: use page-sampling (the default), \
                 which reads guest memory and leaves the dirty log to migrations"
            )))
        }
    }
    let calc_time = u64::try_from(calc_time).unwrap_or(0);
    let sample_pages = match sample_pages {
        Some(n) => u64::try_from(n).unwrap_or(0),
        None => DEFAULT_SAMPLE_PAGES,
    };
    ctx.vm.backend.calc_dirty_rate(calc_time, sample_pages)?;
    Ok(())
}

pub static QUERY_DIRTY_RATE: Command = Command {
    schema: CommandSchema {
        name: "query-dirty-rate",
        args: &[],
        ret: Some(Ty::Object(&DIRTY_RATE_INFO)),
    },
    handler: |ctx, _| Ok(dirty_rate_info(ctx.vm.backend.query_dirty_rate())),
};

fn dirty_rate_info(m: Option<Measurement>) -> Value {
    let Some(m) = m else {
        return json!({
            "status": "unstarted", "start-time": 0, "calc-time": 0,
            "sample-pages": DEFAULT_SAMPLE_PAGES, "mode": "page-sampling",
        });
    };
    let mut info = json!({
        "status": m.status.as_str(),
        "start-time": m.start_time_s,
        "calc-time": m.calc_time_s,
        "sample-pages": m.sample_pages,
        "mode": "page-sampling",
    });
    if let Some(rate) = m.dirty_rate {
        info["dirty-rate"] = json!(rate);
    }
    info
}

pub static HUMAN_MONITOR_COMMAND: Command = Command {
    schema: CommandSchema {
        name: "human-monitor-command",
        args: &[req("command-line", Ty::Str), opt("cpu-index", Ty::Int)],
        ret: Some(Ty::Str),
    },
    handler: hmp,
};

/// The HMP commands ferry-qemu runs; any other gets HMP's own answer (a text
/// reply, not a QMP error), as QEMU gives for a command it does not know.
const HMP_HELP: &str = "announce_self [interfaces] [id] -- Trigger GARP/RARP announcements\r\n\
calc_dirty_rate second [sample_pages_per_GB] -- start a round of guest dirty rate measurement\r\n\
info dirty_rate -- show dirty rate information\r\n\
info status -- show the current VM status (running|paused)\r\n";

fn hmp(ctx: &mut Ctx<'_>, args: &Map<String, Value>) -> Result<Value, CommandError> {
    let line = arg_str(args, "command-line");
    let words: Vec<&str> = line.split_whitespace().collect();
    let out = match words.as_slice() {
        [] => String::new(),
        ["help" | "?"] => HMP_HELP.to_string(),
        ["announce_self", rest @ ..] if rest.len() <= 2 => {
            let interfaces: Option<Vec<String>> = rest
                .first()
                .map(|list| list.split(',').map(str::to_string).collect());
            let schedule = ctx.vm.migrate_params.announce;
            ctx.vm
                .backend
                .announce_self(schedule, interfaces.as_deref())?;
            String::new()
        }
        ["calc_dirty_rate", secs, rest @ ..] if rest.len() <= 1 => {
            let number = |w: &str| {
                w.parse::<i64>()
                    .map_err(|_| format!("invalid number: '{w}'\r\n"))
            };
            let parsed =
                number(secs).and_then(|s| Ok((s, rest.first().map(|w| number(w)).transpose()?)));
            match parsed {
                Err(text) => text,
                Ok((secs, sample)) => match start_dirty_rate(ctx, secs, sample, "page-sampling") {
                    Ok(()) => format!(
                        "Starting dirty rate measurement with period {secs} seconds\r\n\
                         [Please use 'info dirty_rate' to check results]\r\n"
                    ),
                    Err(e) => format!("Error: {e}\r\n"),
                },
            }
        }
        ["info", "dirty_rate"] => hmp_dirty_rate(ctx.vm.backend.query_dirty_rate()),
        ["info", "status"] => hmp_status(ctx.vm.backend.status()),
        [cmd, ..] => format!("unknown command: '{cmd}'\r\n"),
    };
    Ok(Value::String(out))
}

/// HMP's `info status`: running, or paused with the state when it is not
/// plain `paused`.
fn hmp_status(state: RunState) -> String {
    match state {
        RunState::Running => "VM status: running\r\n".into(),
        RunState::Paused => "VM status: paused\r\n".into(),
        other => format!("VM status: paused ({})\r\n", other.as_str()),
    }
}

/// HMP's `info dirty_rate` report.
fn hmp_dirty_rate(m: Option<Measurement>) -> String {
    let Some(m) = m else {
        return "Status: unstarted\r\n".into();
    };
    let rate = match m.dirty_rate {
        Some(r) if m.status == ferry_vmm::dirty_rate::Status::Measured => format!("{r} (MB/s)"),
        _ => "(not ready)".into(),
    };
    format!(
        "Status: {}\r\nStart Time: {} (ms)\r\nSample Pages: {} (per GB)\r\nPeriod: {} (sec)\r\n\
         Mode: page-sampling\r\nDirty rate: {rate}\r\n",
        m.status.as_str(),
        m.start_time_s * 1000,
        m.sample_pages,
        m.calc_time_s,
    )
}
