//! Negotiation and introspection: qmp_capabilities, query-version,
//! query-commands, query-qmp-schema, query-target, query-kvm, query-status,
//! query-name, query-uuid.

use serde_json::{json, Map, Value};

use super::types::*;
use super::{Command, Ctx, COMMANDS};
use crate::argv::Accel;
use crate::backend::RunState;
use crate::qmp::error::CommandError;
use crate::qmp::schema::{opt, CommandSchema, Ty};
use crate::qmp::server::{PACKAGE, QEMU_VERSION};

/// Handled by the dispatcher itself (negotiation state); here for the table.
pub static QMP_CAPABILITIES: Command = Command {
    schema: CommandSchema {
        name: "qmp_capabilities",
        args: &[opt("enable", Ty::Array(&Ty::Enum(&QMP_CAPABILITY)))],
        ret: None,
    },
    handler: |_, _| Ok(json!({})),
};

pub static QUERY_VERSION: Command = Command {
    schema: CommandSchema {
        name: "query-version",
        args: &[],
        ret: Some(Ty::Object(&VERSION_INFO)),
    },
    handler: query_version,
};

fn query_version(_: &mut Ctx<'_>, _: &Map<String, Value>) -> Result<Value, CommandError> {
    let (major, minor, micro) = QEMU_VERSION;
    Ok(json!({"qemu": {"major": major, "minor": minor, "micro": micro}, "package": PACKAGE}))
}

pub static QUERY_COMMANDS: Command = Command {
    schema: CommandSchema {
        name: "query-commands",
        args: &[],
        ret: Some(Ty::Array(&Ty::Object(&COMMAND_INFO))),
    },
    handler: |_, _| {
        Ok(Value::Array(
            COMMANDS
                .iter()
                .map(|c| json!({"name": c.schema.name}))
                .collect(),
        ))
    },
};

pub static QUERY_QMP_SCHEMA: Command = Command {
    schema: CommandSchema {
        name: "query-qmp-schema",
        args: &[],
        ret: Some(Ty::Array(&Ty::Any)),
    },
    handler: |_, _| Ok(Value::Array(super::qmp_schema())),
};

pub static QUERY_TARGET: Command = Command {
    schema: CommandSchema {
        name: "query-target",
        args: &[],
        ret: Some(Ty::Object(&TARGET_INFO)),
    },
    handler: |_, _| Ok(json!({"arch": "x86_64"})),
};

pub static QUERY_KVM: Command = Command {
    schema: CommandSchema {
        name: "query-kvm",
        args: &[],
        ret: Some(Ty::Object(&KVM_INFO)),
    },
    handler: query_kvm,
};

/// `present`: /dev/kvm exists; `enabled`: this process may use it and the
/// command line allows KVM (ferry has no other accelerator).
fn query_kvm(ctx: &mut Ctx<'_>, _: &Map<String, Value>) -> Result<Value, CommandError> {
    let present = std::path::Path::new("/dev/kvm").exists();
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let accel = &ctx.vm.invocation.accel;
    let wanted = accel.is_empty() || accel.contains(&Accel::Kvm);
    Ok(json!({"enabled": present && usable && wanted, "present": present}))
}

pub static QUERY_STATUS: Command = Command {
    schema: CommandSchema {
        name: "query-status",
        args: &[],
        ret: Some(Ty::Object(&STATUS_INFO)),
    },
    handler: |ctx, _| {
        let s = ctx.vm.backend.status();
        Ok(json!({"status": s.as_str(), "running": s == RunState::Running, "singlestep": false}))
    },
};

pub static QUERY_NAME: Command = Command {
    schema: CommandSchema {
        name: "query-name",
        args: &[],
        ret: Some(Ty::Object(&NAME_INFO)),
    },
    handler: |ctx, _| {
        Ok(
            match ctx
                .vm
                .invocation
                .name
                .as_ref()
                .and_then(|n| n.guest.as_ref())
            {
                Some(n) => json!({"name": n}),
                None => json!({}),
            },
        )
    },
};

pub static QUERY_UUID: Command = Command {
    schema: CommandSchema {
        name: "query-uuid",
        args: &[],
        ret: Some(Ty::Object(&UUID_INFO)),
    },
    handler: |ctx, _| {
        let uuid = ctx
            .vm
            .invocation
            .uuid
            .clone()
            .unwrap_or_else(|| "00000000-0000-0000-0000-000000000000".into());
        Ok(json!({"UUID": uuid}))
    },
};
