//! What libvirt asks about a started guest's devices: vCPUs
//! (query-hotpluggable-cpus, query-cpus-fast), iothreads, the balloon, block
//! devices and jobs. ferry has one vCPU type, no iothreads, virtio-blk disks
//! on raw images and at most one virtio-balloon, and answers as QEMU 7.2 does
//! for such a machine (the disk replies are shaped like those QEMU 7.2 gave
//! libvirt 9.0 when it started a guest with a disk, recorded in the libvirt lab).
//!
//! Block jobs, NBD exports and runtime `blockdev-add`/`device_add` are not
//! implemented and so absent from `query-commands` and the schema: libvirt
//! then knows it cannot copy storage or hot-plug.

use serde_json::{json, Value};

use super::types::*;
use super::{Command, Ctx};
use crate::backend::{balloon_actual_bytes, BackendError, DiskConfig};
use crate::qmp::error::CommandError;
use crate::qmp::schema::{opt, req, CommandSchema, Ty};
use crate::vmm::vcpu_thread_id;
use ferry_vmm::devices::virtio::balloon::BALLOON_PAGE;

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
/// balloon".
fn no_balloon() -> CommandError {
    CommandError::Backend(BackendError::NoBalloon)
}

/// Guest RAM in bytes, if the guest has a balloon.
pub(super) fn balloon_ram(ctx: &Ctx<'_>) -> Result<u64, CommandError> {
    match &ctx.vm.config {
        Some(c) if c.balloon.is_some() => Ok(c.mem_bytes),
        _ => Err(no_balloon()),
    }
}

/// QEMU's `balloon`: `value` is the guest's memory target in bytes; above
/// RAM it is RAM (QEMU clamps too), so the balloon holds the difference.
pub static BALLOON: Command = Command {
    schema: CommandSchema {
        name: "balloon",
        args: &[req("value", Ty::Int)],
        ret: None,
    },
    handler: |ctx, args| {
        let target = args.get("value").and_then(Value::as_i64).unwrap_or(0);
        if target <= 0 {
            return Err(CommandError::Parameter(
                "Parameter 'target' expects a size".into(),
            ));
        }
        let ram = balloon_ram(ctx)?;
        let target = (target as u64).min(ram);
        ctx.vm
            .backend
            .set_balloon_target((ram - target) / BALLOON_PAGE)?;
        Ok(json!({}))
    },
};

pub static QUERY_BALLOON: Command = Command {
    schema: CommandSchema {
        name: "query-balloon",
        args: &[],
        ret: Some(Ty::Object(&BALLOON_INFO)),
    },
    handler: |ctx, _| {
        let ram = balloon_ram(ctx)?;
        let info = ctx.vm.backend.balloon_info()?;
        Ok(json!({"actual": balloon_actual_bytes(ram, info.actual)}))
    },
};

/// The disks of this guest (none for the probe).
fn disks<'a>(ctx: &'a Ctx<'_>) -> &'a [DiskConfig] {
    ctx.vm.config.as_ref().map_or(&[], |c| c.disks.as_slice())
}

/// `(virtual-size, actual-size)` of the image as it is now.
fn image_sizes(d: &DiskConfig) -> (u64, Option<u64>) {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::MetadataExt;
    let Ok(mut f) = d.image.open(true) else {
        return (0, None);
    };
    let virtual_size = f.seek(SeekFrom::End(0)).unwrap_or(0);
    let actual = f
        .metadata()
        .ok()
        .filter(std::fs::Metadata::is_file)
        .map(|m| m.blocks() * 512);
    (virtual_size, actual)
}

/// QEMU's `BlockDeviceInfo` of one node of disk `d`: the format node
/// (`drv` raw) or the protocol node (`drv` file/host_device).
fn node_info(d: &DiskConfig, node: Option<&str>, drv: &str) -> Value {
    let (virtual_size, actual) = image_sizes(d);
    let mut image = json!({
        "virtual-size": virtual_size,
        "filename": d.filename,
        "format": drv,
        "dirty-flag": false,
    });
    if let Some(a) = actual {
        image["actual-size"] = json!(a);
    }
    let mut info = json!({
        "iops_rd": 0, "detect_zeroes": "off", "image": image, "iops_wr": 0,
        "ro": d.read_only, "backing_file_depth": 0, "drv": drv, "iops": 0,
        "bps_wr": 0, "write_threshold": 0, "encrypted": false, "bps": 0,
        "bps_rd": 0,
        // What ferry does: the host page cache, flushed when the guest asks.
        "cache": {"no-flush": false, "direct": false, "writeback": true},
        "file": d.filename,
    });
    if let Some(n) = node {
        info["node-name"] = json!(n);
    }
    info
}

/// The node a disk's device sits on (`query-block` → `inserted`).
fn top_node(d: &DiskConfig) -> Value {
    match &d.format_node {
        Some(f) => node_info(d, Some(f), "raw"),
        None => node_info(d, Some(&d.storage_node), &d.storage_driver),
    }
}

/// The QOM path of a disk's virtio backend, as QEMU names it.
fn disk_qdev(d: &DiskConfig, anon: usize) -> String {
    match &d.id {
        Some(id) => format!("/machine/peripheral/{id}/virtio-backend"),
        None => format!("/machine/peripheral-anon/device[{anon}]/virtio-backend"),
    }
}

pub static QUERY_NAMED_BLOCK_NODES: Command = Command {
    schema: CommandSchema {
        name: "query-named-block-nodes",
        args: &[opt("flat", Ty::Bool)],
        ret: Some(Ty::Array(&Ty::Object(&BLOCK_DEVICE_INFO))),
    },
    handler: |ctx, _| {
        // The format node, then its protocol node, per disk (QEMU's order).
        let mut out = Vec::new();
        for d in disks(ctx) {
            if let Some(f) = &d.format_node {
                out.push(node_info(d, Some(f), "raw"));
            }
            out.push(node_info(d, Some(&d.storage_node), &d.storage_driver));
        }
        Ok(Value::Array(out))
    },
};

pub static QUERY_BLOCK: Command = Command {
    schema: CommandSchema {
        name: "query-block",
        args: &[],
        ret: Some(Ty::Array(&Ty::Object(&BLOCK_INFO))),
    },
    handler: |ctx, _| {
        let mut anon = 0;
        let mut out = Vec::new();
        for d in disks(ctx) {
            let qdev = disk_qdev(d, anon);
            if d.id.is_none() {
                anon += 1;
            }
            out.push(json!({
                "io-status": "ok", "device": d.backend_name, "locked": false,
                "removable": false, "inserted": top_node(d), "qdev": qdev,
                "type": "unknown",
            }));
        }
        Ok(Value::Array(out))
    },
};

/// `BlockDeviceStats` with every counter 0 (the protocol node's: ferry
/// counts requests per device).
fn uncounted_stats() -> Value {
    let mut m = serde_json::Map::new();
    for member in BLOCK_DEVICE_STATS.members {
        let v = match member.ty {
            Ty::Bool => json!(false),
            _ => json!(0),
        };
        m.insert(member.name.to_string(), v);
    }
    Value::Object(m)
}

/// The device's counters from the engine (`virsh domblkstat`; libvirt also
/// needs the reply for `domblkinfo` and `domstats --block`). Times, merges
/// and `wr_highest_offset` are not measured: 0. While a live migration owns
/// the guest the counters read 0.
fn counted_stats(s: Option<&ferry_vmm::devices::virtio::blk::BlockStats>) -> Value {
    let mut v = uncounted_stats();
    if let Some(s) = s {
        for (k, n) in [
            ("rd_bytes", s.rd_bytes),
            ("wr_bytes", s.wr_bytes),
            ("rd_operations", s.rd_operations),
            ("wr_operations", s.wr_operations),
            ("flush_operations", s.flush_operations),
            ("failed_rd_operations", s.failed_rd_operations),
            ("failed_wr_operations", s.failed_wr_operations),
            ("failed_flush_operations", s.failed_flush_operations),
            ("invalid_rd_operations", s.invalid_operations),
        ] {
            v[k] = json!(n);
        }
    }
    v
}

pub static QUERY_BLOCKSTATS: Command = Command {
    schema: CommandSchema {
        name: "query-blockstats",
        args: &[opt("query-nodes", Ty::Bool)],
        ret: Some(Ty::Array(&Ty::Object(&BLOCK_STATS))),
    },
    handler: |ctx, args| {
        let nodes = args.get("query-nodes").and_then(Value::as_bool) == Some(true);
        let counters = ctx.vm.backend.disk_stats();
        let of = |d: &DiskConfig| {
            let id = crate::vmm::disk_device_id(d);
            counted_stats(counters.iter().find(|(i, _)| *i == id).map(|(_, s)| s))
        };
        let storage =
            |d: &DiskConfig| json!({"node-name": d.storage_node, "stats": uncounted_stats()});
        let mut anon = 0;
        let mut out = Vec::new();
        for d in disks(ctx) {
            if nodes {
                // One entry per named node, as QEMU's query-nodes=true.
                if let Some(f) = &d.format_node {
                    out.push(json!({"node-name": f, "stats": of(d),
                                    "parent": storage(d)}));
                }
                out.push(storage(d));
                continue;
            }
            let qdev = disk_qdev(d, anon);
            if d.id.is_none() {
                anon += 1;
            }
            let mut entry = json!({"device": d.backend_name, "qdev": qdev,
                                   "stats": of(d)});
            match &d.format_node {
                Some(f) => {
                    entry["node-name"] = json!(f);
                    entry["parent"] = storage(d);
                }
                None => entry["node-name"] = json!(d.storage_node),
            }
            out.push(entry);
        }
        Ok(Value::Array(out))
    },
};

pub static QUERY_JOBS: Command = Command {
    schema: CommandSchema {
        name: "query-jobs",
        args: &[],
        ret: Some(Ty::Array(&Ty::Object(&JOB_INFO))),
    },
    handler: |_, _| Ok(json!([])),
};
