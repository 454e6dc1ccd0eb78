//! File descriptors passed over the monitor: getfd/closefd (named, per
//! monitor) and add-fd/remove-fd/query-fdsets (fd sets, shared).

use std::os::fd::{AsRawFd, OwnedFd};

use serde_json::{json, Map, Value};

use super::types::*;
use super::{arg_str, Command, Ctx};
use crate::qmp::error::CommandError;
use crate::qmp::schema::{opt, req, CommandSchema, Ty};
use crate::qmp::server::FdSetEntry;

fn take_received(ctx: &mut Ctx<'_>, command: &str) -> Result<OwnedFd, CommandError> {
    if ctx.received.is_empty() {
        return Err(CommandError::Generic(format!(
            "{command}: no file descriptor supplied via SCM_RIGHTS"
        )));
    }
    Ok(ctx.received.remove(0))
}

pub static GETFD: Command = Command {
    schema: CommandSchema {
        name: "getfd",
        args: &[req("fdname", Ty::Str)],
        ret: None,
    },
    handler: |ctx, args| {
        let name = arg_str(args, "fdname");
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(CommandError::Parameter(
                "Parameter 'fdname' expects a name not starting with a digit".into(),
            ));
        }
        let fd = take_received(ctx, "getfd")?;
        // Replacing a name closes the old fd, like QEMU.
        ctx.monitor_fds.insert(name.to_string(), fd);
        Ok(json!({}))
    },
};

pub static CLOSEFD: Command = Command {
    schema: CommandSchema {
        name: "closefd",
        args: &[req("fdname", Ty::Str)],
        ret: None,
    },
    handler: |ctx, args| {
        let name = arg_str(args, "fdname");
        match ctx.monitor_fds.remove(name) {
            Some(_) => Ok(json!({})),
            None => Err(CommandError::Generic(format!(
                "File descriptor named '{name}' not found"
            ))),
        }
    },
};

pub static ADD_FD: Command = Command {
    schema: CommandSchema {
        name: "add-fd",
        args: &[opt("fdset-id", Ty::Int), opt("opaque", Ty::Str)],
        ret: Some(Ty::Object(&ADDFD_INFO)),
    },
    handler: add_fd,
};

fn add_fd(ctx: &mut Ctx<'_>, args: &Map<String, Value>) -> Result<Value, CommandError> {
    let fd = take_received(ctx, "add-fd")?;
    let set = match args.get("fdset-id") {
        Some(v) => v.as_u64().ok_or_else(|| {
            CommandError::Parameter("Parameter 'fdset-id' expects a non-negative value".into())
        })?,
        None => (0..).find(|i| !ctx.vm.fdsets.contains_key(i)).unwrap_or(0),
    };
    let num = fd.as_raw_fd();
    ctx.vm.fdsets.entry(set).or_default().push(FdSetEntry {
        fd,
        opaque: args
            .get("opaque")
            .and_then(Value::as_str)
            .map(str::to_string),
    });
    Ok(json!({"fdset-id": set, "fd": num}))
}

pub static REMOVE_FD: Command = Command {
    schema: CommandSchema {
        name: "remove-fd",
        args: &[req("fdset-id", Ty::Int), opt("fd", Ty::Int)],
        ret: None,
    },
    handler: |ctx, args| {
        let set = args
            .get("fdset-id")
            .and_then(Value::as_u64)
            .unwrap_or(u64::MAX);
        let fd = args.get("fd").and_then(Value::as_i64);
        let missing = || {
            CommandError::Generic(match fd {
                Some(fd) => format!("File descriptor named 'fdset-id:{set}, fd:{fd}' not found"),
                None => format!("File descriptor named 'fdset-id:{set}' not found"),
            })
        };
        let entries = ctx.vm.fdsets.get_mut(&set).ok_or_else(missing)?;
        match fd {
            Some(fd) => {
                let before = entries.len();
                entries.retain(|e| i64::from(e.fd.as_raw_fd()) != fd);
                if entries.len() == before {
                    return Err(missing());
                }
            }
            None => entries.clear(),
        }
        if entries.is_empty() {
            ctx.vm.fdsets.remove(&set);
        }
        Ok(json!({}))
    },
};

pub static QUERY_FDSETS: Command = Command {
    schema: CommandSchema {
        name: "query-fdsets",
        args: &[],
        ret: Some(Ty::Array(&Ty::Object(&FDSET_INFO))),
    },
    handler: |ctx, _| {
        Ok(Value::Array(
            ctx.vm
                .fdsets
                .iter()
                .map(|(id, fds)| {
                    let fds: Vec<Value> = fds
                        .iter()
                        .map(|e| match &e.opaque {
                            Some(o) => json!({"fd": e.fd.as_raw_fd(), "opaque": o}),
                            None => json!({"fd": e.fd.as_raw_fd()}),
                        })
                        .collect();
                    json!({"fdset-id": id, "fds": fds})
                })
                .collect(),
        ))
    },
};
