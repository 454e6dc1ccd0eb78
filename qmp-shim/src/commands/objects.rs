//! `object-add` / `object-del` for the objects migration needs: QEMU's
//! `tls-creds-x509` and `tls-creds-psk` (what libvirt's `virsh migrate --tls` adds,
//! and what a QEMU user puts on the command line with `-object`), and how the
//! `tls-creds` migration parameter resolves to them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Map, Value};

use super::types::TLS_CREDS_ENDPOINT;
use super::{arg_str, Command, Ctx};
use crate::argv::{ArgvError, Typed};
use crate::backend::MigrationTls;
use crate::qmp::error::CommandError;
use crate::qmp::schema::{opt, req, CommandSchema, Ty};
use ferry_vmm::migration::{CredsSpec, Endpoint, TlsCreds};

/// The object types `object-add` creates.
pub const TLS_TYPES: &[&str] = &["tls-creds-x509", "tls-creds-psk"];

/// A user-created object.
#[derive(Debug, Clone)]
pub struct TlsObject {
    pub qom_type: &'static str,
    pub creds: TlsCreds,
}

/// The TLS migration parameters (`tls-creds`, `tls-hostname`, `tls-authz`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsParameters {
    pub creds: String,
    pub hostname: String,
    pub authz: String,
}

/// Why a TLS credentials object cannot be created; the texts are QEMU's
/// where it has one.
#[derive(Debug, thiserror::Error)]
pub enum TlsObjectError {
    /// A boolean property given as text other than on or off.
    #[error("Parameter '{name}' expects 'on' or 'off'")]
    NotOnOff {
        /// The property.
        name: String,
    },
    /// A boolean property given as something else than a boolean or text.
    #[error("Invalid parameter type for '{name}', expected: boolean")]
    NotBoolean {
        /// The property.
        name: String,
    },
    /// An object type other than the TLS credentials.
    #[error("object type '{qom_type}' is not supported by ferry-qemu")]
    UnsupportedType {
        /// The type asked for.
        qom_type: String,
    },
    /// An encrypted private key (`passwordid`).
    #[error(
        "Property '{qom_type}.passwordid': encrypted private keys are not supported \
         by ferry-qemu; give the key unencrypted (mode 0600) instead ({value})"
    )]
    EncryptedKey {
        /// The object's type.
        qom_type: &'static str,
        /// The value given.
        value: Value,
    },
    /// A property the object type does not have.
    #[error("Property '{qom_type}.{name}' not found")]
    UnknownProperty {
        /// The object's type.
        qom_type: &'static str,
        /// The property.
        name: String,
    },
    /// A GnuTLS priority string.
    #[error(
        "Property '{qom_type}.priority': GnuTLS priority strings are not supported by \
         ferry-qemu (it uses OpenSSL's TLS 1.2/1.3 defaults)"
    )]
    Priority {
        /// The object's type.
        qom_type: &'static str,
    },
    /// No `dir`.
    #[error("Missing 'dir' property value")]
    NoDir,
    /// An endpoint other than client or server.
    #[error("Parameter 'endpoint' does not accept value '{0}'")]
    Endpoint(String),
    /// The credentials cannot be loaded from their directory (the engine's
    /// message names the file and embeds its cause).
    #[error(transparent)]
    Load(ferry_vmm::migration::TlsError),
}

fn bool_prop(
    props: &Map<String, Value>,
    name: &str,
    default: bool,
) -> Result<bool, TlsObjectError> {
    match props.get(name) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        // The command-line form (-object tls-creds-x509,verify-peer=off) is text.
        Some(Value::String(s)) => match s.as_str() {
            "on" | "yes" | "true" | "y" => Ok(true),
            "off" | "no" | "false" | "n" => Ok(false),
            _ => Err(TlsObjectError::NotOnOff {
                name: name.to_string(),
            }),
        },
        Some(_) => Err(TlsObjectError::NotBoolean {
            name: name.to_string(),
        }),
    }
}

fn str_prop<'a>(props: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    props.get(name).and_then(Value::as_str)
}

/// The TLS credentials given with `-object`, by id, loaded once at startup as
/// QEMU does: a bad directory fails the start, naming the file.
pub fn load_objects(objects: &[Typed]) -> Result<BTreeMap<String, TlsObject>, ArgvError> {
    let mut loaded = BTreeMap::new();
    for o in objects
        .iter()
        .filter(|o| TLS_TYPES.contains(&o.kind.as_str()))
    {
        let bad = |why: &str| ArgvError::invalid("-object", &o.kind, why);
        let id =
            o.id.clone()
                .ok_or_else(|| bad("Parameter 'id' is missing"))?;
        let obj = create_tls(&o.kind, &o.props).map_err(|e| bad(&e.to_string()))?;
        if loaded.insert(id.clone(), obj).is_some() {
            return Err(bad(&format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
    }
    Ok(loaded)
}

/// Builds a TLS credentials object from its QOM properties (QMP arguments or the
/// `-object` option), loading the files now as QEMU does. The error texts are
/// QEMU's where it has one.
pub fn create_tls(qom_type: &str, props: &Map<String, Value>) -> Result<TlsObject, TlsObjectError> {
    let qom_type = TLS_TYPES
        .iter()
        .copied()
        .find(|t| *t == qom_type)
        .ok_or_else(|| TlsObjectError::UnsupportedType {
            qom_type: qom_type.to_string(),
        })?;
    for (k, v) in props {
        let known = match k.as_str() {
            "qom-type" | "id" | "dir" | "endpoint" | "priority" | "loaded" => true,
            "verify-peer" | "sanity-check" => qom_type == "tls-creds-x509",
            "username" => qom_type == "tls-creds-psk",
            "passwordid" => {
                return Err(TlsObjectError::EncryptedKey {
                    qom_type,
                    value: v.clone(),
                })
            }
            _ => false,
        };
        if !known {
            return Err(TlsObjectError::UnknownProperty {
                qom_type,
                name: k.clone(),
            });
        }
    }
    if props.contains_key("priority") && !str_prop(props, "priority").is_some_and(str::is_empty) {
        return Err(TlsObjectError::Priority { qom_type });
    }
    let dir = match str_prop(props, "dir") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => return Err(TlsObjectError::NoDir),
    };
    let endpoint = match str_prop(props, "endpoint").unwrap_or("client") {
        "client" => Endpoint::Client,
        "server" => Endpoint::Server,
        other => return Err(TlsObjectError::Endpoint(other.to_string())),
    };
    let spec = if qom_type == "tls-creds-x509" {
        // The checks sanity-check asks for are the ones the load always runs.
        bool_prop(props, "sanity-check", true)?;
        CredsSpec::X509 {
            dir,
            verify_peer: bool_prop(props, "verify-peer", true)?,
        }
    } else {
        CredsSpec::Psk {
            dir,
            username: str_prop(props, "username")
                .filter(|u| !u.is_empty())
                .unwrap_or("qemu")
                .to_string(),
        }
    };
    bool_prop(props, "loaded", true)?;
    let creds = TlsCreds::load(spec, endpoint).map_err(TlsObjectError::Load)?;
    Ok(TlsObject { qom_type, creds })
}

/// QEMU's rule for object ids: a letter, then letters, digits, '-', '.', '_'.
fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn object_add(ctx: &mut Ctx<'_>, args: &Map<String, Value>) -> Result<Value, CommandError> {
    let qom_type = arg_str(args, "qom-type");
    let id = arg_str(args, "id");
    if !id_wellformed(id) {
        return Err(CommandError::Parameter(
            "Parameter 'id' expects an identifier".into(),
        ));
    }
    if ctx.vm.objects.contains_key(id) {
        return Err(CommandError::Generic(format!(
            "attempt to add duplicate property '{id}' to object (type 'container')"
        )));
    }
    // libvirt wraps the properties in 'props' (object-add before QEMU 6.0),
    // which it does for any QEMU whose schema does not show a QAPI object-add.
    let mut flat = args.clone();
    if let Some(Value::Object(props)) = flat.remove("props") {
        flat.extend(props);
    }
    // The QMP text is the error's own (QEMU's where it has one).
    let obj = create_tls(qom_type, &flat).map_err(|e| CommandError::Generic(e.to_string()))?;
    ctx.vm.objects.insert(id.to_string(), obj);
    Ok(json!({}))
}

fn object_del(ctx: &mut Ctx<'_>, args: &Map<String, Value>) -> Result<Value, CommandError> {
    let id = arg_str(args, "id");
    match ctx.vm.objects.remove(id) {
        Some(_) => Ok(json!({})),
        None => Err(CommandError::Generic(format!("object '{id}' not found"))),
    }
}

pub static OBJECT_ADD: Command = Command {
    schema: CommandSchema {
        name: "object-add",
        args: &[
            req("qom-type", Ty::Str),
            req("id", Ty::Str),
            opt("dir", Ty::Str),
            opt("endpoint", Ty::Enum(&TLS_CREDS_ENDPOINT)),
            opt("verify-peer", Ty::Bool),
            opt("sanity-check", Ty::Bool),
            opt("username", Ty::Str),
            opt("priority", Ty::Str),
            opt("loaded", Ty::Bool),
            opt("passwordid", Ty::Str),
            opt("props", Ty::Any),
        ],
        ret: None,
    },
    handler: object_add,
};

pub static OBJECT_DEL: Command = Command {
    schema: CommandSchema {
        name: "object-del",
        args: &[req("id", Ty::Str)],
        ret: None,
    },
    handler: object_del,
};

/// The credentials the `tls-creds` parameter names, checked for `endpoint` (the
/// source is a client, the destination a server); `None` when TLS is off.
pub fn migration_tls(
    ctx: &Ctx<'_>,
    endpoint: Endpoint,
) -> Result<Option<MigrationTls>, CommandError> {
    let p = &ctx.vm.tls_params;
    if p.creds.is_empty() {
        return Ok(None);
    }
    let obj = ctx.vm.objects.get(&p.creds).ok_or_else(|| {
        CommandError::Generic(format!("No TLS credentials with id '{}'", p.creds))
    })?;
    if obj.creds.endpoint() != endpoint {
        return Err(CommandError::Generic(format!(
            "Expected TLS credentials for a {} endpoint",
            endpoint.as_str()
        )));
    }
    Ok(Some(MigrationTls {
        creds: obj.creds.clone(),
        hostname: (!p.hostname.is_empty()).then(|| p.hostname.clone()),
    }))
}
