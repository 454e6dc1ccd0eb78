//! IDE drives on the PIIX3 IDE controller of a `pc` machine (PCI 00:01.1):
//! `-device ide-hd|ide-cd,bus=ide.N,unit=U,drive=NODE` as libvirt 9.0 writes
//! `<disk bus='ide'>` (Nova's config drive is an ISO on an IDE CD-ROM), and
//! `-drive if=ide[,media=cdrom][,index=N]`. Two channels (`ide.0`,
//! `ide.1`) of two drives each; a CD-ROM is read-only and holds its medium
//! from the start (an empty drive is refused).

use std::collections::HashSet;

use serde_json::Value;

use super::disks::{
    backing_of_node, check_error_policy, disk_config, write_through, Backing, Drive, IdeDrive,
    Node, SERIAL_BYTES,
};
use super::opts::{json_text, parse_bool, parse_u64, Opts};
use super::{ArgvError, Invocation};
use crate::backend::{DiskConfig, IdePosition};

/// The `-device` drivers of IDE drives.
pub const IDE_DEVICES: &[&str] = &["ide-hd", "ide-cd"];

/// PIIX3's PCI slot on `pc` (ISA bridge 00:01.0, IDE 00:01.1).
pub const PIIX3_SLOT: u8 = 1;

/// Channels and drives per channel.
const BUSES: u8 = 2;
const UNITS: u8 = 2;

/// An IDE drive before its place is known.
struct Request {
    id: Option<String>,
    /// Names the drive in errors.
    name: String,
    option: &'static str,
    bus: Option<u8>,
    unit: Option<u8>,
    cdrom: bool,
    backing: Backing,
    serial: Option<String>,
    bootindex: Option<u32>,
}

/// `-drive if=ide`'s place: `index=N`, or `bus=`/`unit=`, or none (the
/// first free one).
pub(super) fn drive_position(o: &Opts, id: &str, cdrom: bool) -> Result<IdeDrive, ArgvError> {
    let num = |key: &str, max: u64| -> Result<Option<u8>, ArgvError> {
        o.get(key)
            .map(|v| {
                parse_u64(v)
                    .filter(|n| *n < max)
                    .map(|n| n as u8)
                    .ok_or_else(|| {
                        ArgvError::invalid("-drive", v, &format!("{key} must be below {max}"))
                    })
            })
            .transpose()
    };
    let index = num("index", u64::from(BUSES * UNITS))?;
    let (bus, unit) = (
        num("bus", u64::from(BUSES))?,
        num("unit", u64::from(UNITS))?,
    );
    if index.is_some() && (bus.is_some() || unit.is_some()) {
        return Err(ArgvError::invalid(
            "-drive",
            id,
            "index cannot be used with bus and unit",
        ));
    }
    Ok(match index {
        Some(i) => IdeDrive {
            bus: Some(i / UNITS),
            unit: Some(i % UNITS),
            cdrom,
        },
        None => IdeDrive { bus, unit, cdrom },
    })
}

/// `ide.0` / `ide.1`.
fn parse_bus(name: &str, text: &str) -> Result<u8, ArgvError> {
    match text {
        "ide.0" => Ok(0),
        "ide.1" => Ok(1),
        other => Err(ArgvError::unsupported_because(
            "-device",
            format!("bus '{other}' ({name})"),
            "ferry's IDE drives sit on the PIIX3 controller's channels ide.0 and ide.1",
        )),
    }
}

/// Checks a property of an `ide-hd`/`ide-cd` device ferry must honour or
/// refuse.
fn check_prop(name: &str, key: &str, value: &Value) -> Result<(), ArgvError> {
    let text = json_text(value);
    match key {
        "bus" | "unit" | "drive" | "serial" | "bootindex" | "share-rw" => Ok(()),
        "logical_block_size" | "physical_block_size" if parse_u64(&text) == Some(512) => Ok(()),
        "write-cache" => match text.as_str() {
            "on" | "auto" => Ok(()),
            _ => Err(write_through("-device", "write-cache=off")),
        },
        "werror" | "rerror" => check_error_policy("-device", key, Some(&text)),
        _ => Err(ArgvError::unsupported(
            "-device",
            format!("IDE drive property '{key}={text}' ({name})"),
        )),
    }
}

impl Invocation {
    /// The IDE drives (`-device ide-hd|ide-cd`, `-drive if=ide`), each at its
    /// place; `used` holds the drives devices took already. Refused on
    /// machines without PIIX3 (`pc` only).
    pub(super) fn ide_drives(
        &self,
        drives: &[Drive],
        nodes: &[Node],
        used: &mut HashSet<String>,
        pc: bool,
    ) -> Result<Vec<DiskConfig>, ArgvError> {
        let mut requests = Vec::new();
        for d in self
            .devices
            .iter()
            .filter(|d| IDE_DEVICES.contains(&d.kind.as_str()))
        {
            let name = d.id.clone().unwrap_or_else(|| d.kind.clone());
            for (k, v) in &d.props {
                check_prop(&name, k, v)?;
            }
            let cdrom = d.kind == "ide-cd";
            let drive = d.props.get("drive").map(json_text).ok_or_else(|| {
                if cdrom {
                    ArgvError::unsupported_because(
                        "-device",
                        format!("an empty CD-ROM drive ({name})"),
                        "ferry's CD-ROMs hold their medium from the start: give the drive its \
                         ISO (<source file=...>)",
                    )
                } else {
                    ArgvError::invalid("-device", &name, "drive property not set")
                }
            })?;
            if !used.insert(drive.clone()) {
                return Err(ArgvError::invalid(
                    "-device",
                    &name,
                    &format!("drive '{drive}' is already in use by another device"),
                ));
            }
            let backing = match drives.iter().find(|dr| dr.id == drive) {
                Some(dr) if dr.ide.is_some() => {
                    return Err(ArgvError::invalid(
                        "-device",
                        &name,
                        &format!("drive '{drive}' is if=ide: it has its own device"),
                    ))
                }
                Some(dr) => dr.backing.clone(),
                None => backing_of_node("-blockdev", &drive, nodes)?,
            };
            let serial = d.props.get("serial").map(json_text);
            if serial.as_ref().is_some_and(|s| s.len() > SERIAL_BYTES) {
                return Err(ArgvError::unsupported(
                    "-device",
                    format!("serial longer than {SERIAL_BYTES} bytes ({name})"),
                ));
            }
            let unit = d
                .props
                .get("unit")
                .map(|v| {
                    parse_u64(&json_text(v))
                        .filter(|u| *u < u64::from(UNITS))
                        .map(|u| u as u8)
                        .ok_or_else(|| ArgvError::invalid("-device", &name, "bad IDE unit"))
                })
                .transpose()?;
            if d.props
                .get("share-rw")
                .is_some_and(|v| parse_bool("-device", "share-rw", &json_text(v)).unwrap_or(false))
            {
                return Err(ArgvError::unsupported(
                    "-device",
                    format!("share-rw=on on an IDE drive ({name})"),
                ));
            }
            requests.push(Request {
                id: d.id.clone(),
                option: "-device",
                bus: d
                    .props
                    .get("bus")
                    .map(|b| parse_bus(&name, &json_text(b)))
                    .transpose()?,
                unit,
                cdrom,
                backing,
                serial,
                bootindex: super::disks::bootindex(&d.props)?,
                name,
            });
        }
        for dr in drives {
            if let Some(at) = dr.ide {
                requests.push(Request {
                    id: None,
                    name: dr.id.clone(),
                    option: "-drive",
                    bus: at.bus,
                    unit: at.unit,
                    cdrom: at.cdrom,
                    backing: dr.backing.clone(),
                    serial: None,
                    bootindex: None,
                });
            }
        }
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        if !pc {
            return Err(ArgvError::unsupported_because(
                requests[0].option,
                format!(
                    "an IDE drive ({}) on a machine without IDE",
                    requests[0].name
                ),
                "IDE drives need the pc machine's PIIX3 controller: use machine type pc \
                 (or a virtio disk, <target bus='virtio'/>)",
            ));
        }
        place(requests)
    }
}

/// Gives every request its place: explicit places first (two on one place
/// are refused, as QEMU refuses them), then the others the first free place
/// on their bus (or on any bus), in order.
fn place(requests: Vec<Request>) -> Result<Vec<DiskConfig>, ArgvError> {
    let mut taken = [[false; UNITS as usize]; BUSES as usize];
    let mut at: Vec<Option<(u8, u8)>> = vec![None; requests.len()];
    for (i, r) in requests.iter().enumerate() {
        if let (Some(b), Some(u)) = (r.bus, r.unit) {
            if std::mem::replace(&mut taken[b as usize][u as usize], true) {
                return Err(ArgvError::invalid(
                    r.option,
                    &r.name,
                    &format!("IDE unit {u} is in use (bus ide.{b})"),
                ));
            }
            at[i] = Some((b, u));
        }
    }
    for (i, r) in requests.iter().enumerate() {
        if at[i].is_some() {
            continue;
        }
        let buses: Vec<u8> = r.bus.map_or_else(|| (0..BUSES).collect(), |b| vec![b]);
        let free = buses.iter().find_map(|&b| {
            (0..UNITS)
                .find(|&u| !taken[b as usize][u as usize] && r.unit.is_none_or(|want| want == u))
                .map(|u| (b, u))
        });
        let Some((b, u)) = free else {
            return Err(ArgvError::invalid(
                r.option,
                &r.name,
                "no free IDE place (two channels of two drives)",
            ));
        };
        taken[b as usize][u as usize] = true;
        at[i] = Some((b, u));
    }
    Ok(requests
        .into_iter()
        .zip(at)
        .map(|(r, at)| {
            let (bus, unit) = at.unwrap_or_default();
            let mut backing = r.backing;
            backing.read_only |= r.cdrom;
            disk_config(
                r.id,
                PIIX3_SLOT,
                Some(IdePosition {
                    bus,
                    unit,
                    cdrom: r.cdrom,
                }),
                backing,
                r.serial,
                false,
                r.bootindex,
            )
        })
        .collect())
}
