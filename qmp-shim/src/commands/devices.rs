//! What libvirt asks about a started guest's devices: vCPUs
//! (query-hotpluggable-cpus, query-cpus-fast), iothreads, the balloon, block
//! devices and jobs. ferry has one vCPU type, no iothreads, no disks and no
//! balloon, and answers as QEMU does for a machine without them.

use serde_json::{json, Value};

use super::types::*;
use super::{Command, Ctx};
use crate::qmp::error::CommandError;
use crate::qmp::schema::{opt, req, CommandSchema, Ty};
use crate::vmm::vcpu_thread_id;

/// The QOM path of vCPU `i` (QEMU's for CPUs created by -smp).
pub fn cpu_qom_path(i: u32) -> String {
    format!("/machine/unattached/device[{i}]")
}

/// The QOM type of the vCPUs (`<model>-x86_64-cpu`).
pub fn cpu_type(ctx: &Ctx<'_>) -> String {
    let model = ctx
        .vm
        .config
        .as_ref()
        .and_then(|c| c.cpu_model.clone())
        .unwrap_or_else(|| "qemu64".into());
    format!("{model}-x86_64-cpu")
}

/// The number of vCPUs (0 for the probe).
pub fn vcpu_count(ctx: &Ctx<'_>) -> u32 {
    ctx.vm.config.as_ref().map_or(0, |c| c.vcpus)
}

/// `-smp N` topology as QEMU lays it out: one socket, N cores, one thread.
fn cpu_props(i: u32) -> Value {
    json!({"core-id": i, "thread-id": 0, "socket-id": 0})
}

pub static QUERY_HOTPLUGGABLE_CPUS: Command = Command {
    schema: CommandSchema {
        name: "query-hotpluggable-cpus",
        args: &[],
        ret: Some(Ty::Array(&Ty::Object(&HOTPLUGGABLE_CPU))),
    },
    handler: |ctx, _| {
        let ty = cpu_type(ctx);
        Ok(Value::Array(
            (0..vcpu_count(ctx))
                .rev()
                .map(|i| {
                    json!({"props": cpu_props(i), "vcpus-count": 1,
                           "qom-path": cpu_qom_path(i), "type": ty})
                })
                .collect(),
        ))
    },
};

pub static QUERY_CPUS_FAST: Command = Command {
    schema: CommandSchema {
        name: "query-cpus-fast",
        args: &[],
        ret: Some(Ty::Array(&Ty::Object(&CPU_INFO_FAST))),
    },
    handler: |ctx, _| {
        Ok(Value::Array(
            (0..vcpu_count(ctx))
                .map(|i| {
                    json!({"thread-id": vcpu_thread_id(i), "props": cpu_props(i),
                           "qom-path": cpu_qom_path(i), "cpu-index": i, "target": "x86_64"})
                })
                .collect(),
        ))
    },
};

pub static QUERY_IOTHREADS: Command = Command {
    schema: CommandSchema {
        name: "query-iothreads",
        args: &[],
        ret: Some(Ty::Array(&Ty::Object(&IOTHREAD_INFO))),
    },
    handler: |_, _| Ok(json!([])),
};

/// QEMU's answer when no balloon device exists; libvirt treats it as "no
/// balloon" (ferry models `virtio-balloon-pci` as absent).
fn no_balloon() -> CommandError {
    CommandError::DeviceNotActive("No balloon device has been activated".into())
}

pub static BALLOON: Command = Command {
    schema: CommandSchema {
        name: "balloon",
        args: &[req("value", Ty::Int)],
        ret: None,
    },
    handler: |_, _| Err(no_balloon()),
};

pub static QUERY_BALLOON: Command = Command {
    schema: CommandSchema {
        name: "query-balloon",
        args: &[],
        ret: Some(Ty::Object(&BALLOON_INFO)),
    },
    handler: |_, _| Err(no_balloon()),
};

pub static QUERY_NAMED_BLOCK_NODES: Command = Command {
    schema: CommandSchema {
        name: "query-named-block-nodes",
        args: &[opt("flat", Ty::Bool)],
        ret: Some(Ty::Array(&Ty::Object(&BLOCK_DEVICE_INFO))),
    },
    handler: |_, _| Ok(json!([])),
};

pub static QUERY_BLOCK: Command = Command {
    schema: CommandSchema {
        name: "query-block",
        args: &[],
        ret: Some(Ty::Array(&Ty::Object(&BLOCK_INFO))),
    },
    handler: |_, _| Ok(json!([])),
};

pub static QUERY_JOBS: Command = Command {
    schema: CommandSchema {
        name: "query-jobs",
        args: &[],
        ret: Some(Ty::Array(&Ty::Object(&JOB_INFO))),
    },
    handler: |_, _| Ok(json!([])),
};
