//! Disks: `-blockdev` node graphs and `-drive`, attached to the guest by
//! `-device virtio-blk-pci` (or `-drive if=virtio`), decided into
//! [`DiskConfig`]s for the engine's virtio-blk.
//!
//! ferry serves raw and qcow2 images and block devices: a `file`/`host_device`
//! protocol node, optionally under a `raw` or `qcow2` format node, as libvirt
//! 9.0 writes them. A qcow2 node's `backing` is another `raw` or `qcow2` node
//! (libvirt's explicit chain, resolved here into the engine's
//! [`ImageFormat`]), `null` (no backing image, whatever the header says) or
//! absent (the header's backing file, as `-drive format=qcow2` has it).
//! External data files, encryption, other formats and network protocols are
//! refused with what to do instead. Options that only change how the host does I/O (cache mode,
//! `aio`, `discard` passing) are accepted; `locking=off` on the protocol node
//! and `share-rw` on the device shape the image lock (see the engine's
//! `devices::image_lock`), as in QEMU; options the guest would
//! notice and ferry's virtio-blk cannot do (more queues, packed rings,
//! EVENT_IDX, DISCARD, other block sizes, ...) are refused, never dropped.

use std::collections::{BTreeMap, HashSet};

use ferry_vmm::devices::disk_image::MAX_CHAIN;
use ferry_vmm::devices::virtio::blk::{Backing as ImageBacking, BlockImage, ImageFormat, Layer};
use serde_json::{Map, Value};

use super::opts::{json_text, parse_bool, parse_u64, Opts};
use super::{ArgvError, Invocation};
use crate::backend::{BackingNodes, DiskConfig, IdePosition};

/// `-device` drivers that become a ferry virtio-blk disk. Plain
/// `virtio-blk-pci` is transitional in QEMU (legacy + modern); ferry's is
/// modern-only, which every virtio 1.0 driver (Linux 4.0 and later) uses.
pub const VIRTIO_BLK: &[&str] = &["virtio-blk-pci", "virtio-blk-pci-non-transitional"];

/// First PCI slot given to a device without `addr=` (QEMU's pc has the host
/// bridge in 0, PIIX3 in 1 and, without -nodefaults, VGA in 2).
const FIRST_FREE_SLOT: u8 = 3;
/// Highest PCI slot on bus 0.
const MAX_SLOT: u8 = 31;
/// Bytes virtio-blk's GET_ID carries.
pub(super) const SERIAL_BYTES: usize = 20;

/// The fix printed for images ferry cannot serve as they are.
const CONVERT_FIX: &str = "ferry serves raw and qcow2 images and block devices only: convert \
     the image with `qemu-img convert -O qcow2 IMAGE IMAGE.qcow2` and use \
     <driver name='qemu' type='qcow2'/> (format=qcow2)";

/// The fix printed for a qcow2 image with an external data file.
const DATA_FILE_FIX: &str = "ferry serves qcow2 images that hold their own data: merge the \
     data file into a new image with `qemu-img convert -O qcow2 IMAGE NEW.qcow2` and leave out \
     <dataStore>";

/// The fix printed for an encrypted qcow2 image.
const ENCRYPT_FIX: &str = "ferry reads no encrypted images: give the guest an unencrypted \
     copy (`qemu-img convert --object secret,... --image-opts ... -O qcow2`) and leave out \
     <encryption>";

/// The fix printed for a backing image given inline or as a protocol node.
const BACKING_NODE_FIX: &str = "give the backing image its own `raw` or `qcow2` -blockdev \
     node and name that node in `backing` (as libvirt does)";

/// The fix printed for network storage.
const NETWORK_FIX: &str = "ferry serves local raw and qcow2 images and block devices only: \
     attach the storage on the host (iscsiadm for iSCSI, rbd map for Ceph, nbd-client for NBD, a mount for NFS or \
     Gluster) and give the block device or file (<disk type='block'> or <disk type='file'>)";

/// Image formats QEMU knows that are neither raw nor qcow2.
const OTHER_FORMATS: &[&str] = &[
    "qcow",
    "qed",
    "vmdk",
    "vdi",
    "vhdx",
    "vpc",
    "luks",
    "parallels",
    "dmg",
    "bochs",
    "cloop",
    "vvfat",
    "preallocate",
    "compress",
];

/// Network protocols QEMU knows.
const NETWORK_PROTOCOLS: &[&str] = &[
    "iscsi", "nbd", "rbd", "gluster", "ssh", "http", "https", "ftp", "ftps", "nfs", "nvme", "curl",
    "vxhs", "sheepdog",
];

/// `-blockdev` properties of a `file`/`host_device` node that change only how
/// the host does I/O.
const PROTOCOL_KEYS: &[&str] = &[
    "filename",
    "cache.direct",
    "cache.no-flush",
    "auto-read-only",
    "read-only",
    "discard",
    "detect-zeroes",
    "aio",
    "aio-max-batch",
    "locking",
    "force-share",
    "drop-cache",
    "x-check-cache-dropped",
];

/// `-blockdev` properties of a `raw` node ferry honours (`file` is the child).
const RAW_KEYS: &[&str] = &[
    "file",
    "cache.direct",
    "cache.no-flush",
    "auto-read-only",
    "read-only",
    "discard",
    "detect-zeroes",
    "force-share",
];

/// `-blockdev` properties of a `qcow2` node ferry honours (`file` is the
/// child, `backing` the backing node) or that change only how the host does
/// I/O and caches metadata (`overlap-check.*` too): ferry's qcow2 writes
/// refcounts eagerly and keeps its own caches.
const QCOW2_KEYS: &[&str] = &[
    "file",
    "backing",
    "cache.direct",
    "cache.no-flush",
    "auto-read-only",
    "read-only",
    "discard",
    "detect-zeroes",
    "force-share",
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "cache-size",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
    "cache-clean-interval",
    "overlap-check",
];

/// A JSON object flattened to dotted keys with text values
/// (`{"cache":{"direct":true}}` → `cache.direct=on`), so the JSON and the
/// key=value forms are checked alike.
type Flat = BTreeMap<String, String>;

fn flatten(prefix: &str, map: &Map<String, Value>, out: &mut Flat) {
    for (k, v) in map {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Object(inner) => flatten(&key, inner, out),
            // QEMU reads `null` as the empty reference (`"backing":null`).
            Value::Null => {
                out.insert(key, String::new());
            }
            other => {
                out.insert(key, json_text(other));
            }
        }
    }
}

/// A node of the block graph (from `-blockdev`, or made for a `-drive`).
#[derive(Debug, Clone)]
pub(super) struct Node {
    name: String,
    driver: String,
    props: Flat,
}

/// What a `drive=` reference leads to.
#[derive(Debug, Clone)]
pub(super) struct Backing {
    filename: String,
    storage_driver: String,
    pub(super) read_only: bool,
    /// The protocol node's own `read-only`.
    storage_read_only: bool,
    /// Raw, or qcow2 with its chain.
    format: ImageFormat,
    /// The nodes of the chain's explicit backing images, top first.
    backing_nodes: Vec<BackingNodes>,
    /// QEMU's image locks (`locking=off` on the protocol node turns them off).
    locking: bool,
    format_node: Option<String>,
    storage_node: String,
    backend_name: String,
}

/// A protocol node's `locking` (on, off or auto: QEMU takes the locks unless
/// it is off).
fn locking(option: &str, value: Option<&str>) -> Result<bool, ArgvError> {
    match value {
        None | Some("auto") => Ok(true),
        Some(v) => parse_bool(option, "locking", v),
    }
}

fn bool_prop(option: &str, props: &Flat, key: &str) -> Result<bool, ArgvError> {
    props
        .get(key)
        .map_or(Ok(false), |v| parse_bool(option, key, v))
}

/// Refuses a driver ferry cannot serve, with the fix.
fn refuse_driver(option: &str, node: &str, driver: &str) -> ArgvError {
    let (what, fix) = if OTHER_FORMATS.contains(&driver) {
        (format!("disk format '{driver}'"), CONVERT_FIX)
    } else if NETWORK_PROTOCOLS.contains(&driver) {
        (format!("network storage (driver '{driver}')"), NETWORK_FIX)
    } else {
        (
            format!("block driver '{driver}'"),
            "ferry serves raw and qcow2 images and block devices only: a `file` or \
             `host_device` node, optionally under a `raw` or `qcow2` one (no filters such as \
             copy-on-read or throttle)",
        )
    };
    ArgvError::unsupported_because(option, format!("{what} of block node '{node}'"), fix)
}

/// Checks a `file`/`host_device` node; returns whether it is read-only.
fn check_protocol(option: &str, node: &Node) -> Result<bool, ArgvError> {
    if let Some(k) = node
        .props
        .keys()
        .find(|k| !PROTOCOL_KEYS.contains(&k.as_str()))
    {
        return Err(ArgvError::unsupported(
            option,
            format!(
                "property '{k}' of block node '{}' (driver '{}')",
                node.name, node.driver
            ),
        ));
    }
    if !node.props.contains_key("filename") {
        return Err(ArgvError::invalid(
            option,
            &node.name,
            "parameter 'filename' is missing",
        ));
    }
    bool_prop(option, &node.props, "read-only")
}

/// Checks a `raw` node's properties.
fn check_raw(option: &str, node: &Node) -> Result<(), ArgvError> {
    if let Some(k) = node
        .props
        .keys()
        .find(|k| !RAW_KEYS.contains(&k.as_str()) && !k.starts_with("file."))
    {
        let what = match k.as_str() {
            "offset" | "size" => format!(
                "raw '{k}' of block node '{}' (a window of the image; give the guest a whole \
                 image or block device)",
                node.name
            ),
            _ => format!(
                "property '{k}' of block node '{}' (driver 'raw')",
                node.name
            ),
        };
        return Err(ArgvError::unsupported(option, what));
    }
    Ok(())
}

/// Checks a `qcow2` node's properties: what ferry's qcow2 cannot do is
/// refused with the fix.
fn check_qcow2(option: &str, node: &Node) -> Result<(), ArgvError> {
    for k in node.props.keys() {
        let head = k.split('.').next().unwrap_or(k);
        match head {
            "data-file" => {
                return Err(ArgvError::unsupported_because(
                    option,
                    format!(
                        "an external data file ('{k}' of block node '{}')",
                        node.name
                    ),
                    DATA_FILE_FIX,
                ))
            }
            "encrypt" => {
                return Err(ArgvError::unsupported_because(
                    option,
                    format!(
                        "an encrypted qcow2 image ('{k}' of block node '{}')",
                        node.name
                    ),
                    ENCRYPT_FIX,
                ))
            }
            "backing" if k != "backing" => {
                return Err(ArgvError::unsupported_because(
                    option,
                    format!(
                        "an inline backing image ('{k}' of block node '{}')",
                        node.name
                    ),
                    BACKING_NODE_FIX,
                ))
            }
            "file" | "overlap-check" => {}
            "lazy-refcounts"
            | "pass-discard-request"
            | "pass-discard-snapshot"
            | "pass-discard-other" => {
                parse_bool(option, k, &node.props[k])?;
            }
            _ if QCOW2_KEYS.contains(&k.as_str()) => {}
            _ => {
                return Err(ArgvError::unsupported(
                    option,
                    format!(
                        "property '{k}' of block node '{}' (driver 'qcow2')",
                        node.name
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// The protocol node under a format node: a node-name, or an inline object
/// (`"file":{"driver":"file","filename":...}`, `file.filename=...`).
fn format_child(option: &str, node: &Node, nodes: &[Node]) -> Result<Node, ArgvError> {
    if let Some(name) = node.props.get("file") {
        return nodes
            .iter()
            .find(|n| &n.name == name)
            .cloned()
            .ok_or_else(|| {
                ArgvError::invalid(
                    option,
                    &node.name,
                    &format!("Cannot find device='' nor node-name='{name}'"),
                )
            });
    }
    let inline: Flat = node
        .props
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("file.").map(|k| (k.to_string(), v.clone())))
        .collect();
    if inline.is_empty() {
        return Err(ArgvError::invalid(
            option,
            &node.name,
            "parameter 'file' is missing",
        ));
    }
    let mut props = inline;
    let driver = props.remove("driver").unwrap_or_else(|| "file".into());
    Ok(Node {
        name: format!("{}-file", node.name),
        driver,
        props,
    })
}

/// Resolves node `name` into what a device would use.
pub(super) fn backing_of_node(
    option: &str,
    name: &str,
    nodes: &[Node],
) -> Result<Backing, ArgvError> {
    let node = nodes.iter().find(|n| n.name == name).ok_or_else(|| {
        ArgvError::invalid(
            "-device",
            name,
            &format!("Cannot find device='{name}' nor node-name='{name}'"),
        )
    })?;
    resolve_node(option, node, nodes, &mut Vec::new())
}

/// Resolves `node` (a format or protocol node) into its image and chain;
/// `above` holds the qcow2 nodes whose backing chain leads here, to find a
/// cycle.
fn resolve_node(
    option: &str,
    node: &Node,
    nodes: &[Node],
    above: &mut Vec<String>,
) -> Result<Backing, ArgvError> {
    let mut backing_nodes = Vec::new();
    let (format_node, storage, format_ro, format) = match node.driver.as_str() {
        "raw" => {
            check_raw(option, node)?;
            (
                Some(node.name.clone()),
                format_child(option, node, nodes)?,
                bool_prop(option, &node.props, "read-only")?,
                ImageFormat::Raw,
            )
        }
        "qcow2" => {
            check_qcow2(option, node)?;
            let child = format_child(option, node, nodes)?;
            let (backing, names) = qcow2_backing(option, node, nodes, above)?;
            backing_nodes = names;
            (
                Some(node.name.clone()),
                child,
                bool_prop(option, &node.props, "read-only")?,
                ImageFormat::Qcow2 { backing },
            )
        }
        _ => (None, node.clone(), false, ImageFormat::Raw),
    };
    match storage.driver.as_str() {
        "file" | "host_device" => {}
        "raw" | "qcow2" => {
            return Err(ArgvError::unsupported(
                option,
                format!(
                    "a {} node on a {} node ('{}' on '{}')",
                    node.driver, storage.driver, node.name, storage.name
                ),
            ))
        }
        other => return Err(refuse_driver(option, &storage.name, other)),
    }
    let storage_ro = check_protocol(option, &storage)?;
    Ok(Backing {
        filename: storage.props.get("filename").cloned().unwrap_or_default(),
        storage_driver: storage.driver.clone(),
        read_only: format_ro || storage_ro,
        storage_read_only: storage_ro,
        format,
        backing_nodes,
        locking: locking(option, storage.props.get("locking").map(String::as_str))?,
        format_node,
        storage_node: storage.name,
        backend_name: String::new(),
    })
}

/// A qcow2 node's backing image: the header's (no `backing`), none
/// (`"backing":null`), or the `raw`/`qcow2` node it names, resolved as a
/// device's node is; with the names of the nodes of an explicit chain.
fn qcow2_backing(
    option: &str,
    node: &Node,
    nodes: &[Node],
    above: &mut Vec<String>,
) -> Result<(ImageBacking, Vec<BackingNodes>), ArgvError> {
    let name = match node.props.get("backing").map(String::as_str) {
        None => return Ok((ImageBacking::FromHeader, Vec::new())),
        Some("") => return Ok((ImageBacking::None, Vec::new())),
        Some(name) => name,
    };
    if name == node.name || above.iter().any(|a| a == name) {
        return Err(ArgvError::invalid(
            option,
            &node.name,
            &format!(
                "Making '{name}' a backing child of '{}' would create a cycle",
                node.name
            ),
        ));
    }
    let child = nodes.iter().find(|n| n.name == name).ok_or_else(|| {
        ArgvError::invalid(
            option,
            &node.name,
            &format!(
                "Could not open backing file: Cannot find device='{name}' nor node-name='{name}'"
            ),
        )
    })?;
    match child.driver.as_str() {
        "raw" | "qcow2" => {}
        "file" | "host_device" => {
            return Err(ArgvError::unsupported_because(
                option,
                format!(
                    "protocol node '{name}' as the backing image of block node '{}'",
                    node.name
                ),
                BACKING_NODE_FIX,
            ))
        }
        other => return Err(refuse_driver(option, name, other)),
    }
    if above.len() + 2 > MAX_CHAIN {
        return Err(ArgvError::unsupported(
            option,
            format!(
                "a backing chain of more than {MAX_CHAIN} images (under block node '{}')",
                node.name
            ),
        ));
    }
    above.push(node.name.clone());
    let below = resolve_node(option, child, nodes, above)?;
    above.pop();
    let layer = Layer {
        image: BlockImage::Path(below.filename.clone().into()),
        format: below.format,
    };
    let mut names = vec![BackingNodes {
        format_node: child.name.clone(),
        storage_node: below.storage_node,
        storage_driver: below.storage_driver,
        filename: below.filename,
        storage_read_only: below.storage_read_only,
    }];
    names.extend(below.backing_nodes);
    Ok((ImageBacking::Image(Box::new(layer)), names))
}

/// `-drive` keys ferry honours (`file.locking` etc.: see PROTOCOL_KEYS).
const DRIVE_KEYS: &[&str] = &[
    "file",
    "format",
    "if",
    "id",
    "readonly",
    "cache",
    "aio",
    "discard",
    "detect-zeroes",
    "media",
    "snapshot",
    "werror",
    "rerror",
    "addr",
    "index",
    "bus",
    "unit",
    "node-name",
    "auto-read-only",
    "force-share",
];

/// One `-drive`: its id, the backing, and the device QEMU creates for it.
#[derive(Debug)]
pub(super) struct Drive {
    pub(super) id: String,
    pub(super) backing: Backing,
    /// `if=virtio`: the device QEMU creates itself, with `addr=` if given.
    virtio_addr: Option<Option<Value>>,
    /// `if=ide`: the IDE drive QEMU creates itself.
    pub(super) ide: Option<IdeDrive>,
}

/// Where `-drive if=ide` puts its drive: `index=` (bus = index / 2, unit =
/// index % 2), or `bus=`/`unit=`, or the first free place; a CD-ROM with
/// `media=cdrom`.
#[derive(Debug, Clone, Copy)]
pub(super) struct IdeDrive {
    pub(super) bus: Option<u8>,
    pub(super) unit: Option<u8>,
    pub(super) cdrom: bool,
}

fn parse_drive(o: &Opts, index: usize) -> Result<Drive, ArgvError> {
    let option = "-drive";
    if let Some(k) = o.pairs().iter().map(|(k, _)| k.as_str()).find(|k| {
        !DRIVE_KEYS.contains(k)
            && !k
                .strip_prefix("file.")
                .is_some_and(|f| PROTOCOL_KEYS.contains(&f))
    }) {
        return Err(ArgvError::unsupported(option, format!("parameter '{k}'")));
    }
    let iface = o.get("if").unwrap_or("ide");
    let file = o.get("file").ok_or_else(|| {
        ArgvError::unsupported_because(
            option,
            "a drive without file= (an empty drive)",
            "ferry's drives hold their image from the start: give the drive its image (a \
             CD-ROM its ISO, <source file=...>)",
        )
    })?;
    let id = o
        .get("id")
        .map_or_else(|| format!("{iface}{index}-hd0"), str::to_string);
    let virtio_addr = match iface {
        "none" | "ide" => None,
        "virtio" => Some(o.get("addr").map(|a| Value::String(a.to_string()))),
        other => {
            return Err(ArgvError::unsupported_because(
                option,
                format!("interface '{other}' (drive '{id}')"),
                "ferry's disks are virtio-blk or IDE: use if=virtio, if=ide, or if=none \
                 with -device virtio-blk-pci|ide-hd|ide-cd,drive=ID",
            ))
        }
    };
    let cdrom = match o.get("media") {
        None | Some("disk") => false,
        Some("cdrom") if iface == "ide" => true,
        Some("cdrom") => {
            return Err(ArgvError::unsupported_because(
                option,
                format!("media 'cdrom' on interface '{iface}' (drive '{id}')"),
                "ferry's CD-ROMs are IDE: use if=ide (<target bus='ide'/>)",
            ))
        }
        Some(m) => return Err(ArgvError::invalid(option, m, "invalid media")),
    };
    let ide = if iface == "ide" {
        Some(super::ide::drive_position(o, &id, cdrom)?)
    } else {
        for key in ["index", "bus", "unit"] {
            if o.get(key).is_some() && iface != "none" {
                return Err(ArgvError::invalid(
                    option,
                    &id,
                    &format!("{key}= is for if=ide drives"),
                ));
            }
        }
        None
    };
    if iface == "none" && o.get("addr").is_some() {
        return Err(ArgvError::invalid(option, &id, "addr= needs if=virtio"));
    }
    let format = match o.get("format") {
        Some("raw") => ImageFormat::Raw,
        // The backing file the header names, as QEMU's -drive opens it.
        Some("qcow2") => ImageFormat::Qcow2 {
            backing: ImageBacking::FromHeader,
        },
        Some(f) => return Err(refuse_driver(option, &id, f)),
        None => {
            return Err(ArgvError::unsupported_because(
                option,
                format!("a drive without format= ('{id}'; QEMU would guess the format)"),
                "ferry does not guess an image's format: add format=raw or format=qcow2",
            ))
        }
    };
    if let Some((proto, _)) = file.split_once(':') {
        if NETWORK_PROTOCOLS.contains(&proto) || proto == "json" {
            return Err(refuse_driver(option, &id, proto));
        }
    }
    if o.get_bool(option, "snapshot")? == Some(true) {
        return Err(ArgvError::unsupported(
            option,
            "snapshot=on (a temporary overlay)",
        ));
    }
    for key in ["werror", "rerror"] {
        check_error_policy(option, key, o.get(key))?;
    }
    match o.get("cache") {
        None | Some("none" | "writeback" | "unsafe") => {}
        Some(c @ ("writethrough" | "directsync")) => return Err(write_through(option, c)),
        Some(c) => return Err(ArgvError::invalid(option, c, "invalid cache option")),
    }
    let read_only = o.get_bool(option, "readonly")?.unwrap_or(false) || cdrom;
    Ok(Drive {
        backing: Backing {
            filename: file.to_string(),
            storage_driver: if file.starts_with("/dev/") && !file.starts_with("/dev/fdset/") {
                "host_device".into()
            } else {
                "file".into()
            },
            read_only,
            storage_read_only: read_only,
            format,
            backing_nodes: Vec::new(),
            locking: locking(option, o.get("file.locking"))?,
            // QEMU names the nodes of a -drive itself.
            format_node: Some(format!("#block{}", 100 + 2 * index)),
            storage_node: format!("#block{}", 101 + 2 * index),
            backend_name: id.clone(),
        },
        id,
        virtio_addr,
        ide,
    })
}

pub(super) fn check_error_policy(
    option: &str,
    key: &str,
    value: Option<&str>,
) -> Result<(), ArgvError> {
    match value {
        None | Some("report") => Ok(()),
        Some(v) => Err(ArgvError::unsupported_because(
            option,
            format!("{key}={v}"),
            "ferry reports I/O errors to the guest: use error_policy='report' (or leave it out)",
        )),
    }
}

pub(super) fn write_through(option: &str, what: &str) -> ArgvError {
    ArgvError::unsupported_because(
        option,
        format!("a write-through disk ({what})"),
        "ferry's virtio-blk shows the guest a write-back cache it flushes: use \
         cache='none' or 'writeback'",
    )
}

/// The disk a device gets on `backing`: at PCI `slot`, or at `ide` on the
/// PIIX3 IDE controller.
pub(super) fn disk_config(
    id: Option<String>,
    slot: u8,
    ide: Option<IdePosition>,
    backing: Backing,
    serial: Option<String>,
    shared: bool,
    bootindex: Option<u32>,
) -> DiskConfig {
    DiskConfig {
        bootindex,
        id,
        slot,
        ide,
        image: BlockImage::Path(backing.filename.clone().into()),
        format: backing.format,
        backing_nodes: backing.backing_nodes,
        filename: backing.filename,
        read_only: backing.read_only,
        serial,
        shared,
        locking: backing.locking,
        backend_name: backing.backend_name,
        format_node: backing.format_node,
        storage_node: backing.storage_node,
        storage_driver: backing.storage_driver,
    }
}

/// A device's `bootindex` (a number, as JSON or text).
pub(super) fn bootindex(props: &Map<String, Value>) -> Result<Option<u32>, ArgvError> {
    props
        .get("bootindex")
        .map(|v| {
            let text = json_text(v);
            text.parse::<u32>().map_err(|_| {
                ArgvError::invalid("-device", &text, "bootindex is not a number from 0")
            })
        })
        .transpose()
}

/// A PCI address: `"0x4"`, `"4"`, `"0x4.0"`, `"0x1.0x2"`, or a devfn number.
pub(super) fn parse_addr(v: &Value) -> Option<(u8, u8)> {
    let (slot, func) = match v {
        Value::Number(n) => {
            let devfn = n.as_u64()?;
            (devfn >> 3, devfn & 7)
        }
        Value::String(s) => {
            let hex = |t: &str| {
                let t = t
                    .strip_prefix("0x")
                    .or_else(|| t.strip_prefix("0X"))
                    .unwrap_or(t);
                u64::from_str_radix(t, 16).ok()
            };
            match s.split_once('.') {
                Some((a, b)) => (hex(a)?, hex(b)?),
                None => (hex(s)?, 0),
            }
        }
        _ => return None,
    };
    (slot <= u64::from(MAX_SLOT) && func < 8).then_some((slot as u8, func as u8))
}

/// `virtio-blk-pci` properties and what ferry does with them.
fn check_blk_prop(key: &str, value: &Value) -> Result<(), ArgvError> {
    let text = json_text(value);
    let flag = |v: &str| parse_bool("-device", key, v);
    let refuse = |what: String| Err(ArgvError::unsupported("-device", what));
    let num = || parse_u64(&text);
    match key {
        // Host-side only, or handled elsewhere.
        "bus" | "addr" | "drive" | "serial" | "bootindex" | "share-rw" | "ioeventfd" => Ok(()),
        "write-cache" => match text.as_str() {
            "on" | "auto" => Ok(()),
            _ => Err(write_through("-device", "write-cache=off")),
        },
        "werror" | "rerror" => check_error_policy("-device", key, Some(&text)),
        "num-queues" if num() == Some(1) => Ok(()),
        "num-queues" => refuse(format!(
            "virtio-blk num-queues={text} (ferry's virtio-blk has one request queue)"
        )),
        "queue-size" if num() == Some(256) => Ok(()),
        "queue-size" => refuse(format!(
            "virtio-blk queue-size={text} (ferry's queues hold 256 entries)"
        )),
        "vectors" if num() == Some(2) => Ok(()),
        "vectors" => refuse(format!(
            "virtio-blk vectors={text} (ferry gives it 2 MSI-X vectors)"
        )),
        "logical_block_size" | "physical_block_size" if num() == Some(512) => Ok(()),
        "logical_block_size" | "physical_block_size" => {
            refuse(format!("{key}={text} (ferry's disks have 512-byte blocks)"))
        }
        "min_io_size" | "opt_io_size" | "discard_granularity" if num() == Some(0) => Ok(()),
        "multifunction" if flag(&text)? => {
            refuse("multifunction=on (ferry's virtio devices are single-function)".into())
        }
        "disable-legacy" | "disable-modern" => modern_only(key, &text),
        // Features ferry's virtio-blk does not offer: "off" is what it does.
        "event_idx"
        | "indirect_desc"
        | "packed"
        | "discard"
        | "write-zeroes"
        | "config-wce"
        | "scsi"
        | "multifunction"
        | "page-per-vq"
        | "iommu_platform"
        | "ats"
        | "x-pcie-lnksta-dllla"
            if !flag(&text)? =>
        {
            Ok(())
        }
        "event_idx" | "indirect_desc" | "packed" | "discard" | "write-zeroes" | "config-wce"
        | "scsi" | "page-per-vq" | "iommu_platform" | "ats" => refuse(format!(
            "virtio-blk {key}=on (ferry's virtio-blk offers VERSION_1, SEG_MAX, BLK_SIZE, \
             FLUSH and RO only)"
        )),
        "iothread" => Err(ArgvError::unsupported_because(
            "-device",
            format!("iothread '{text}'"),
            "ferry runs disk requests without iothreads: remove <driver iothread=...> and \
             <iothreads>",
        )),
        other => refuse(format!("virtio-blk-pci property '{other}'")),
    }
}

/// A device that wants a PCI slot on bus 0.
pub(super) struct SlotClaim {
    /// Names it in errors (its id, else its driver).
    pub name: String,
    /// `addr=` as (slot, function).
    pub addr: Option<(u8, u8)>,
}

/// A disk device before its slot is known.
struct Pending {
    id: Option<String>,
    addr: Option<(u8, u8)>,
    backing: Backing,
    serial: Option<String>,
    /// `share-rw=on`: other VMs may write the image meanwhile.
    shared: bool,
    bootindex: Option<u32>,
}

impl Invocation {
    /// The virtio-blk disks, with their PCI slots; `pc` reserves slot 1
    /// (PIIX3).
    pub(super) fn disks(&self, pc: bool) -> Result<Vec<DiskConfig>, ArgvError> {
        let mut nodes = Vec::new();
        for b in &self.blockdevs {
            let name = b.id.clone().ok_or_else(|| {
                ArgvError::invalid("-blockdev", &b.kind, "parameter 'node-name' is missing")
            })?;
            let mut props = Flat::new();
            flatten("", &b.props, &mut props);
            nodes.push(Node {
                name,
                driver: b.kind.clone(),
                props,
            });
        }
        // Every node is opened by QEMU, used or not: check them all.
        for n in &nodes {
            match n.driver.as_str() {
                "file" | "host_device" => {
                    check_protocol("-blockdev", n)?;
                }
                "raw" | "qcow2" => {
                    backing_of_node("-blockdev", &n.name, &nodes)?;
                }
                other => return Err(refuse_driver("-blockdev", &n.name, other)),
            }
        }
        let drives = self
            .drives
            .iter()
            .enumerate()
            .map(|(i, o)| parse_drive(o, i))
            .collect::<Result<Vec<_>, _>>()?;

        let mut pending = Vec::new();
        let mut used: HashSet<String> = HashSet::new();
        for d in self
            .devices
            .iter()
            .filter(|d| VIRTIO_BLK.contains(&d.kind.as_str()))
        {
            let name = d.id.as_deref().unwrap_or(&d.kind);
            for (k, v) in &d.props {
                check_blk_prop(k, v)?;
            }
            if let Some(bus) = d.props.get("bus").map(json_text) {
                if bus != "pci.0" {
                    return Err(ArgvError::unsupported_because(
                        "-device",
                        format!("bus '{bus}' ({name})"),
                        "ferry has one PCI bus, pci.0 (use machine type pc, not q35)",
                    ));
                }
            }
            let drive = d
                .props
                .get("drive")
                .map(json_text)
                .ok_or_else(|| ArgvError::invalid("-device", name, "drive property not set"))?;
            if !used.insert(drive.clone()) {
                return Err(ArgvError::invalid(
                    "-device",
                    name,
                    &format!("drive '{drive}' is already in use by another device"),
                ));
            }
            let backing = match drives.iter().find(|dr| dr.id == drive) {
                Some(dr) if dr.virtio_addr.is_some() || dr.ide.is_some() => {
                    return Err(ArgvError::invalid(
                        "-device",
                        name,
                        &format!("drive '{drive}' is if=virtio or if=ide: it has its own device"),
                    ))
                }
                Some(dr) => dr.backing.clone(),
                None => backing_of_node("-blockdev", &drive, &nodes)?,
            };
            let serial = d.props.get("serial").map(json_text);
            if serial.as_ref().is_some_and(|s| s.len() > SERIAL_BYTES) {
                return Err(ArgvError::unsupported(
                    "-device",
                    format!(
                        "serial '{}' ({name}; virtio-blk carries {SERIAL_BYTES} bytes)",
                        serial.unwrap_or_default()
                    ),
                ));
            }
            pending.push(Pending {
                id: d.id.clone(),
                addr: d
                    .props
                    .get("addr")
                    .map(|a| {
                        parse_addr(a).ok_or_else(|| {
                            ArgvError::invalid("-device", &json_text(a), "invalid PCI address")
                        })
                    })
                    .transpose()?,
                backing,
                serial,
                shared: d
                    .props
                    .get("share-rw")
                    .map(|v| parse_bool("-device", "share-rw", &json_text(v)))
                    .transpose()?
                    .unwrap_or(false),
                bootindex: bootindex(&d.props)?,
            });
        }
        for dr in &drives {
            if let Some(addr) = &dr.virtio_addr {
                pending.push(Pending {
                    id: None,
                    addr: addr
                        .as_ref()
                        .map(|a| {
                            parse_addr(a).ok_or_else(|| {
                                ArgvError::invalid("-drive", &json_text(a), "invalid PCI address")
                            })
                        })
                        .transpose()?,
                    backing: dr.backing.clone(),
                    serial: None,
                    shared: false,
                    bootindex: None,
                });
            }
        }
        let mut disks = self.place(pending, pc)?;
        disks.extend(self.ide_drives(&drives, &nodes, &mut used, pc)?);
        Ok(disks)
    }

    /// Gives every disk its slot (see [`Invocation::assign_slots`]).
    fn place(&self, pending: Vec<Pending>, pc: bool) -> Result<Vec<DiskConfig>, ArgvError> {
        let claims: Vec<SlotClaim> = pending
            .iter()
            .map(|p| SlotClaim {
                name: p.id.clone().unwrap_or_else(|| "virtio-blk-pci".into()),
                addr: p.addr,
            })
            .collect();
        let slots = self.assign_slots(&claims, pc, VIRTIO_BLK, &[])?;
        Ok(pending
            .into_iter()
            .zip(slots)
            .map(|(p, slot)| {
                disk_config(p.id, slot, None, p.backing, p.serial, p.shared, p.bootindex)
            })
            .collect())
    }

    /// PCI slots for `claims` (the `-device`s of kinds `claimants`, and
    /// devices QEMU would create itself, in order): `addr=` as given
    /// (function 0 only, not a slot another device names), else the first
    /// free slot from 3. Slots other `-device`s on pci.0 name (the balloon,
    /// USB, ...) and `placed` (devices already given theirs) are left alone.
    pub(super) fn assign_slots(
        &self,
        claims: &[SlotClaim],
        pc: bool,
        claimants: &[&str],
        placed: &[(u8, String)],
    ) -> Result<Vec<u8>, ArgvError> {
        let mut taken: Vec<(u8, String)> = vec![(0, "the host bridge".into())];
        if pc {
            taken.push((1, "PIIX3".into()));
        }
        taken.extend(placed.iter().cloned());
        for d in &self.devices {
            if claimants.contains(&d.kind.as_str()) {
                continue;
            }
            if let Some((slot, _)) = d.props.get("addr").and_then(parse_addr) {
                let who =
                    d.id.as_deref()
                        .map_or(d.kind.clone(), |id| format!("{},id={id}", d.kind));
                taken.push((slot, who));
            }
        }
        for c in claims {
            let Some((slot, func)) = c.addr else { continue };
            if func != 0 {
                return Err(ArgvError::unsupported(
                    "-device",
                    format!(
                        "PCI function {func} for {} (ferry's virtio devices are single-function: \
                         use function 0)",
                        c.name
                    ),
                ));
            }
            if let Some((_, who)) = taken.iter().find(|(s, _)| *s == slot) {
                return Err(ArgvError::invalid(
                    "-device",
                    &c.name,
                    &format!("PCI: slot {slot} function 0 not available, in use by {who}"),
                ));
            }
            taken.push((slot, c.name.clone()));
        }
        let mut out = Vec::new();
        for c in claims {
            let slot = match c.addr {
                Some((slot, _)) => slot,
                None => {
                    let slot = (FIRST_FREE_SLOT..=MAX_SLOT)
                        .find(|s| taken.iter().all(|(t, _)| t != s))
                        .ok_or_else(|| {
                            ArgvError::unsupported("-device", "more than 29 PCI devices")
                        })?;
                    taken.push((slot, c.name.clone()));
                    slot
                }
            };
            out.push(slot);
        }
        Ok(out)
    }
}

/// `disable-legacy`/`disable-modern` of any ferry virtio-pci device: they are
/// modern-only (virtio 1.0), so only `disable-legacy=on` and
/// `disable-modern=off` describe them.
pub(super) fn modern_only(key: &str, text: &str) -> Result<(), ArgvError> {
    if parse_bool("-device", key, text)? == (key == "disable-legacy") {
        return Ok(());
    }
    Err(ArgvError::unsupported(
        "-device",
        format!("{key}={text} (ferry's virtio devices are modern-only, virtio 1.0)"),
    ))
}

/// Transport and ring properties of a virtio-pci device that ferry's
/// VERSION_1-only rng and balloon do not offer (see [`not_offered`]).
pub(super) const VERSION_1_ONLY: &[&str] = &[
    "multifunction",
    "iommu_platform",
    "ats",
    "packed",
    "event_idx",
    "indirect_desc",
    "page-per-vq",
];

/// A virtio feature or transport property `device` (`virtio-rng`, ...) does
/// not offer: `key=off` is what it does, `key=on` is refused naming what it
/// offers (`offers`, e.g. "VERSION_1 only").
pub(super) fn not_offered(
    device: &str,
    offers: &str,
    key: &str,
    text: &str,
) -> Result<(), ArgvError> {
    if !parse_bool("-device", key, text)? {
        return Ok(());
    }
    Err(ArgvError::unsupported(
        "-device",
        format!("{device} {key}=on (ferry's {device} offers {offers})"),
    ))
}

/// `romfile` of a ferry virtio-pci device: empty (no option ROM) or refused.
pub(super) fn no_rom(text: &str) -> Result<(), ArgvError> {
    if text.is_empty() {
        return Ok(());
    }
    Err(ArgvError::unsupported(
        "-device",
        format!("romfile '{text}' (ferry boots kernels directly: no option ROMs)"),
    ))
}
