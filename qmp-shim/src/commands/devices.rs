//! What libvirt asks about a started guest's devices: vCPUs
//! (query-hotpluggable-cpus, query-cpus-fast), iothreads, the balloon, block
//! devices and jobs. ferry has one vCPU type, no iothreads, virtio-blk disks
//! on raw or qcow2 images and at most one virtio-balloon, and answers as QEMU 7.2 does
//! for such a machine (the disk replies are shaped like those QEMU 7.2 gave
//! libvirt 9.0 when it started a guest with a disk, recorded in the libvirt lab,
//! and, for qcow2 backing chains, like QEMU 7.2's own answers for the same
//! -blockdev chain: every node of the chain, `backing-image` nested in
//! `query-block`, none with `flat`).
//!
//! Block jobs, NBD exports and runtime `blockdev-add`/`device_add` are not
//! implemented and so absent from `query-commands` and the schema: libvirt
//! then knows it cannot copy storage or hot-plug.

use serde_json::{json, Value};

use super::image::{full_backing_filename, is_qcow2, qemu_json, Qcow2Header};
use super::types::*;
use super::{Command, Ctx};
use crate::backend::{balloon_actual_bytes, BackendError, DiskConfig};
use crate::qmp::error::CommandError;
use crate::qmp::schema::{opt, req, CommandSchema, Ty};
use crate::vmm::vcpu_thread_id;
use ferry_vmm::devices::disk_image::MAX_CHAIN;
use ferry_vmm::devices::virtio::balloon::BALLOON_PAGE;
use ferry_vmm::devices::virtio::blk::{Backing, BlockImage, ImageFormat};

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

/// `(size, actual-size)` of an image file as it is now: its length and the
/// bytes allocated to it (a regular file's).
fn file_sizes(image: &BlockImage) -> (u64, Option<u64>) {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::MetadataExt;
    let Ok(mut f) = image.open(true) else {
        return (0, None);
    };
    let len = f.seek(SeekFrom::End(0)).unwrap_or(0);
    let actual = f
        .metadata()
        .ok()
        .filter(std::fs::Metadata::is_file)
        .map(|m| m.blocks() * 512);
    (len, actual)
}

/// How a qcow2 image's backing image was given (see [`Backing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Not qcow2: nothing below.
    Raw,
    FromHeader,
    Null,
    Node,
}

/// One image of a disk's chain as QMP shows it: its format node (none when
/// the device sits on the protocol node) over its protocol node.
#[derive(Debug)]
struct Level {
    format_node: Option<String>,
    storage_node: String,
    storage_driver: String,
    /// The image as given (QMP's `filename` of the protocol node).
    filename: String,
    image: BlockImage,
    /// `raw` or `qcow2`.
    format: &'static str,
    /// The format node's `ro` (a backing image's is always read-only).
    ro: bool,
    storage_ro: bool,
    /// The qcow2 header (none for raw, or when it cannot be read).
    header: Option<Qcow2Header>,
    link: Link,
}

impl Level {
    fn new(format: &ImageFormat, image: BlockImage, filename: String) -> Self {
        let header = match format {
            ImageFormat::Raw => None,
            ImageFormat::Qcow2 { .. } => image
                .open(true)
                .ok()
                .and_then(|f| Qcow2Header::read(&f).ok()),
        };
        let link = match format {
            ImageFormat::Raw => Link::Raw,
            ImageFormat::Qcow2 { backing } => match backing {
                Backing::FromHeader => Link::FromHeader,
                Backing::None => Link::Null,
                Backing::Image(_) => Link::Node,
            },
        };
        Self {
            format_node: None,
            storage_node: String::new(),
            storage_driver: "file".into(),
            filename,
            image,
            format: format.name(),
            ro: true,
            storage_ro: true,
            header,
            link,
        }
    }

    /// The header's backing file, if it names one.
    fn header_backing(&self) -> Option<&str> {
        self.header.as_ref()?.backing_file.as_deref()
    }
}

/// The nodes QEMU names itself for the backing files it opens from a
/// header (`#blockNNN`; QEMU's numbers are random, these only unique).
fn implicit_node(disk: usize, depth: usize, storage: bool) -> String {
    format!(
        "#block{}",
        300 + 40 * disk + 2 * depth + usize::from(storage)
    )
}

/// The images of disk `d` (the `disk`-th), top first: the explicit chain
/// as the -blockdev nodes give it, then what the headers name.
fn chain(d: &DiskConfig, disk: usize) -> Vec<Level> {
    let mut top = Level::new(&d.format, d.image.clone(), d.filename.clone());
    top.format_node = d.format_node.clone();
    top.storage_node = d.storage_node.clone();
    top.storage_driver = d.storage_driver.clone();
    top.ro = d.read_only;
    top.storage_ro = d.read_only;
    if top.format_node.is_none() {
        top.format = "raw";
        top.link = Link::Raw;
        top.header = None;
    }
    let mut levels = vec![top];
    let mut format = &d.format;
    let mut named = d.backing_nodes.iter();
    while levels.len() < MAX_CHAIN {
        let last = levels.last().expect("the top is there");
        let next = match (format, last.link) {
            (
                ImageFormat::Qcow2 {
                    backing: Backing::Image(layer),
                },
                Link::Node,
            ) => {
                let Some(n) = named.next() else { break };
                format = &layer.format;
                let mut l = Level::new(&layer.format, layer.image.clone(), n.filename.clone());
                l.format_node = Some(n.format_node.clone());
                l.storage_node = n.storage_node.clone();
                l.storage_driver = n.storage_driver.clone();
                l.storage_ro = n.storage_read_only;
                l
            }
            (_, Link::FromHeader) => {
                let Some(name) = last.header_backing() else {
                    break;
                };
                let full = full_backing_filename(&last.filename, name);
                let image = BlockImage::Path(full.clone().into());
                let qcow2 = match last
                    .header
                    .as_ref()
                    .and_then(|h| h.backing_format.as_deref())
                {
                    Some("qcow2") => true,
                    Some(_) => false,
                    None => image.open(true).is_ok_and(|f| is_qcow2(&f)),
                };
                let below = if qcow2 {
                    ImageFormat::Qcow2 {
                        backing: Backing::FromHeader,
                    }
                } else {
                    ImageFormat::Raw
                };
                let depth = levels.len();
                let mut l = Level::new(&below, image, full);
                l.format_node = Some(implicit_node(disk, depth, false));
                l.storage_node = implicit_node(disk, depth, true);
                l
            }
            _ => break,
        };
        levels.push(next);
    }
    levels
}

/// Whether level `i`'s backing differs from what its header names (QEMU's
/// `bdrv_backing_overridden`): then its filename is a `json:` one.
fn overridden(levels: &[Level], i: usize) -> bool {
    match levels[i].link {
        Link::Null => levels[i].header_backing().is_some(),
        Link::Node => match (levels[i].header_backing(), levels.get(i + 1)) {
            (Some(name), Some(_)) => name != filename(levels, i + 1),
            (None, Some(_)) => true,
            _ => false,
        },
        Link::Raw | Link::FromHeader => false,
    }
}

/// The open options QEMU writes into a `json:` filename.
fn open_options(levels: &[Level], i: usize) -> Value {
    let l = &levels[i];
    let mut v = json!({"driver": l.format,
                       "file": {"driver": l.storage_driver, "filename": l.filename}});
    if overridden(levels, i) {
        v["backing"] = match levels.get(i + 1) {
            Some(_) if l.link == Link::Node => open_options(levels, i + 1),
            _ => Value::Null,
        };
    }
    v
}

/// QEMU's `filename` of level `i`'s format node.
fn filename(levels: &[Level], i: usize) -> String {
    if overridden(levels, i) {
        format!("json:{}", qemu_json(&open_options(levels, i)))
    } else {
        levels[i].filename.clone()
    }
}

/// `ImageInfo` of level `i`'s format node; with the levels below nested as
/// `backing-image` when `deep`.
fn image_info(levels: &[Level], i: usize, deep: bool) -> Value {
    let l = &levels[i];
    let (len, actual) = file_sizes(&l.image);
    let mut image = json!({
        "virtual-size": len,
        "filename": filename(levels, i),
        "format": l.format,
        "dirty-flag": false,
    });
    if let Some(a) = actual {
        image["actual-size"] = json!(a);
    }
    if let Some(h) = &l.header {
        image["virtual-size"] = json!(h.size);
        image["cluster-size"] = json!(h.cluster_size);
        image["dirty-flag"] = json!(h.dirty);
        image["format-specific"] = h.format_specific();
        if let Some(name) = &h.backing_file {
            image["backing-filename"] = json!(name);
            image["full-backing-filename"] = json!(match levels.get(i + 1) {
                Some(_) if l.link == Link::Node => filename(levels, i + 1),
                _ => full_backing_filename(&l.filename, name),
            });
            if let Some(f) = &h.backing_format {
                image["backing-filename-format"] = json!(f);
            }
        }
    }
    if deep && i + 1 < levels.len() {
        image["backing-image"] = image_info(levels, i + 1, true);
    }
    image
}

/// QEMU's `BlockDeviceInfo` of a node: `image`, `drv`, `ro`, `file`, ...
fn block_device_info(node: &str, drv: &str, ro: bool, file: String, image: Value) -> Value {
    json!({
        "iops_rd": 0, "detect_zeroes": "off", "image": image, "iops_wr": 0,
        "ro": ro, "backing_file_depth": 0, "drv": drv, "iops": 0,
        "bps_wr": 0, "write_threshold": 0, "encrypted": false, "bps": 0,
        "bps_rd": 0,
        // What ferry does: the host page cache, flushed when the guest asks.
        "cache": {"no-flush": false, "direct": false, "writeback": true},
        "file": file, "node-name": node,
    })
}

/// Level `i`'s format node; `flat` as `query-named-block-nodes` has it (no
/// `backing-image`, depth 0).
fn format_node_info(levels: &[Level], i: usize, flat: bool) -> Option<Value> {
    let l = &levels[i];
    let node = l.format_node.as_deref()?;
    let mut info = block_device_info(
        node,
        l.format,
        l.ro,
        filename(levels, i),
        image_info(levels, i, !flat),
    );
    if !flat {
        info["backing_file_depth"] = json!(levels.len() - 1 - i);
    }
    if levels.get(i + 1).is_some() {
        info["backing_file"] = json!(filename(levels, i + 1));
    }
    Some(info)
}

/// Level `i`'s protocol node.
fn storage_node_info(l: &Level) -> Value {
    let (len, actual) = file_sizes(&l.image);
    let mut image = json!({
        "virtual-size": len, "filename": l.filename, "format": l.storage_driver,
        "dirty-flag": false,
    });
    if let Some(a) = actual {
        image["actual-size"] = json!(a);
    }
    block_device_info(
        &l.storage_node,
        &l.storage_driver,
        l.storage_ro,
        l.filename.clone(),
        image,
    )
}

/// The node a disk's device sits on (`query-block` → `inserted`).
fn top_node(levels: &[Level]) -> Value {
    format_node_info(levels, 0, false).unwrap_or_else(|| storage_node_info(&levels[0]))
}

/// What QEMU calls the device a disk's backend is attached to: for
/// virtio-blk its backend's QOM path (the backend has no id); for an IDE
/// drive its id, or its path when it has none.
fn disk_qdev(d: &DiskConfig, anon: usize) -> String {
    match (&d.id, d.ide.is_some()) {
        (Some(id), true) => id.clone(),
        (None, true) => format!("/machine/peripheral-anon/device[{anon}]"),
        (Some(id), false) => format!("/machine/peripheral/{id}/virtio-backend"),
        (None, false) => format!("/machine/peripheral-anon/device[{anon}]/virtio-backend"),
    }
}

pub static QUERY_NAMED_BLOCK_NODES: Command = Command {
    schema: CommandSchema {
        name: "query-named-block-nodes",
        args: &[opt("flat", Ty::Bool)],
        ret: Some(Ty::Array(&Ty::Object(&BLOCK_DEVICE_INFO))),
    },
    handler: |ctx, args| {
        let flat = args.get("flat").and_then(Value::as_bool) == Some(true);
        // Per disk, down its chain: the format node, then its protocol node
        // (QEMU's order for libvirt's nodes).
        let mut out = Vec::new();
        for (n, d) in disks(ctx).iter().enumerate() {
            let levels = chain(d, n);
            for i in 0..levels.len() {
                out.extend(format_node_info(&levels, i, flat));
                out.push(storage_node_info(&levels[i]));
            }
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
        for (n, d) in disks(ctx).iter().enumerate() {
            let qdev = disk_qdev(d, anon);
            if d.id.is_none() {
                anon += 1;
            }
            let cdrom = d.ide.is_some_and(|i| i.cdrom);
            let mut entry = json!({
                "io-status": "ok", "device": d.backend_name, "locked": false,
                "removable": cdrom, "inserted": top_node(&chain(d, n)), "qdev": qdev,
                "type": "unknown",
            });
            if cdrom {
                // A CD-ROM has a tray, closed: ferry's hold their medium.
                entry["tray_open"] = json!(false);
            }
            out.push(entry);
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
        let storage = |l: &Level| json!({"node-name": l.storage_node, "stats": uncounted_stats()});
        // A backing image's format node, its protocol node as `parent`, and
        // (as QEMU's query-block form has it) the image below as `backing`.
        fn backing(levels: &[Level], i: usize, nested: bool) -> Option<Value> {
            let l = levels.get(i)?;
            let mut v = json!({"node-name": l.format_node.as_deref()?, "stats": uncounted_stats(),
                               "parent": {"node-name": l.storage_node, "stats": uncounted_stats()}});
            if nested {
                if let Some(b) = backing(levels, i + 1, true) {
                    v["backing"] = b;
                }
            }
            Some(v)
        }
        let mut anon = 0;
        let mut out = Vec::new();
        for (n, d) in disks(ctx).iter().enumerate() {
            let levels = chain(d, n);
            if nodes {
                // One entry per named node, as QEMU's query-nodes=true.
                if let Some(f) = &d.format_node {
                    out.push(json!({"node-name": f, "stats": of(d),
                                    "parent": storage(&levels[0])}));
                }
                out.push(storage(&levels[0]));
                for i in 1..levels.len() {
                    out.extend(backing(&levels, i, false));
                    out.push(storage(&levels[i]));
                }
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
                    entry["parent"] = storage(&levels[0]);
                    if let Some(b) = backing(&levels, 1, true) {
                        entry["backing"] = b;
                    }
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
