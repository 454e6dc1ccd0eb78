//! Run control: stop, cont, quit, system_reset, system_powerdown, pmemsave,
//! query-chardev, rtc-reset-reinjection.

use std::path::Path;

use serde_json::{json, Map, Value};

use super::types::*;
use super::{arg_str, Command, Ctx};
use crate::qmp::error::CommandError;
use crate::qmp::schema::{req, CommandSchema, Ty};

pub static STOP: Command = Command {
    schema: CommandSchema {
        name: "stop",
        args: &[],
        ret: None,
    },
    handler: |ctx, _| {
        ctx.vm.backend.stop()?;
        Ok(json!({}))
    },
};

pub static CONT: Command = Command {
    schema: CommandSchema {
        name: "cont",
        args: &[],
        ret: None,
    },
    handler: |ctx, _| {
        ctx.vm.backend.cont()?;
        Ok(json!({}))
    },
};

pub static QUIT: Command = Command {
    schema: CommandSchema {
        name: "quit",
        args: &[],
        ret: None,
    },
    handler: |ctx, _| {
        ctx.vm.backend.quit()?;
        ctx.vm.quit = true;
        Ok(json!({}))
    },
};

pub static SYSTEM_RESET: Command = Command {
    schema: CommandSchema {
        name: "system_reset",
        args: &[],
        ret: None,
    },
    handler: |ctx, _| {
        ctx.vm.backend.system_reset()?;
        Ok(json!({}))
    },
};

pub static SYSTEM_POWERDOWN: Command = Command {
    schema: CommandSchema {
        name: "system_powerdown",
        args: &[],
        ret: None,
    },
    handler: |ctx, _| {
        ctx.vm.backend.system_powerdown()?;
        Ok(json!({}))
    },
};

/// QEMU 7.2's x86 `rtc-reset-reinjection`: forget the periodic RTC
/// interrupts `driftfix=slew` still owes the guest (libvirt sends it after
/// setting the guest's time). ferry's RTC drops lost ticks and owes none:
/// nothing to do, as for QEMU without slew.
pub static RTC_RESET_REINJECTION: Command = Command {
    schema: CommandSchema {
        name: "rtc-reset-reinjection",
        args: &[],
        ret: None,
    },
    handler: |_, _| Ok(json!({})),
};

pub static PMEMSAVE: Command = Command {
    schema: CommandSchema {
        name: "pmemsave",
        args: &[
            req("val", Ty::Int),
            req("size", Ty::Int),
            req("filename", Ty::Str),
        ],
        ret: None,
    },
    handler: pmemsave,
};

fn pmemsave(ctx: &mut Ctx<'_>, args: &Map<String, Value>) -> Result<Value, CommandError> {
    let num = |k: &str| {
        args.get(k).and_then(Value::as_u64).ok_or_else(|| {
            CommandError::Parameter(format!("Parameter '{k}' expects a non-negative integer"))
        })
    };
    let (addr, size) = (num("val")?, num("size")?);
    ctx.vm
        .backend
        .pmemsave(addr, size, Path::new(arg_str(args, "filename")))?;
    Ok(json!({}))
}

pub static QUERY_CHARDEV: Command = Command {
    schema: CommandSchema {
        name: "query-chardev",
        args: &[],
        ret: Some(Ty::Array(&Ty::Object(&CHARDEV_INFO))),
    },
    handler: |ctx, _| {
        Ok(Value::Array(
            ctx.vm
                .chardevs
                .iter()
                .map(|c| json!({"label": c.label, "filename": c.filename, "frontend-open": true}))
                .collect(),
        ))
    },
};
