//! QAPI-like type descriptions: one source for argument validation and for
//! the `query-qmp-schema` reply (so the schema describes exactly what the
//! dispatcher implements).

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::error::CommandError;

/// A type in the schema.
#[derive(Debug, Clone, Copy)]
pub enum Ty {
    Str,
    Int,
    Bool,
    Number,
    /// Any JSON value.
    Any,
    Enum(&'static EnumDef),
    Object(&'static ObjectDef),
    Array(&'static Ty),
}

/// A named enumeration.
#[derive(Debug)]
pub struct EnumDef {
    pub name: &'static str,
    pub values: &'static [&'static str],
}

/// A named struct.
#[derive(Debug)]
pub struct ObjectDef {
    pub name: &'static str,
    pub members: &'static [Member],
}

/// A struct member or command argument.
#[derive(Debug)]
pub struct Member {
    pub name: &'static str,
    pub ty: Ty,
    pub optional: bool,
}

/// Required member.
pub const fn req(name: &'static str, ty: Ty) -> Member {
    Member {
        name,
        ty,
        optional: false,
    }
}

/// Optional member.
pub const fn opt(name: &'static str, ty: Ty) -> Member {
    Member {
        name,
        ty,
        optional: true,
    }
}

/// An event and its data members.
#[derive(Debug)]
pub struct EventDef {
    pub name: &'static str,
    pub data: &'static [Member],
}

/// What a command looks like in the schema.
#[derive(Debug)]
pub struct CommandSchema {
    pub name: &'static str,
    pub args: &'static [Member],
    /// `None` = returns `{}` (an empty object).
    pub ret: Option<Ty>,
}

fn json_type(ty: &Ty) -> &'static str {
    match ty {
        Ty::Str | Ty::Enum(_) => "string",
        Ty::Int => "integer",
        Ty::Bool => "boolean",
        Ty::Number => "number",
        Ty::Any => "any",
        Ty::Object(_) => "object",
        Ty::Array(_) => "array",
    }
}

/// Validates `args` against `members` with QEMU 7.2's messages.
pub fn validate(args: &Map<String, Value>, members: &[Member]) -> Result<(), CommandError> {
    validate_in(args, members, "")
}

fn validate_in(
    args: &Map<String, Value>,
    members: &[Member],
    prefix: &str,
) -> Result<(), CommandError> {
    for key in args.keys() {
        if !members.iter().any(|m| m.name == key) {
            return Err(CommandError::Parameter(format!(
                "Parameter '{prefix}{key}' is unexpected"
            )));
        }
    }
    for m in members {
        let path = format!("{prefix}{}", m.name);
        match args.get(m.name) {
            None if m.optional => {}
            None => {
                return Err(CommandError::Parameter(format!(
                    "Parameter '{path}' is missing"
                )))
            }
            Some(v) => check_value(v, &m.ty, &path)?,
        }
    }
    Ok(())
}

fn check_value(v: &Value, ty: &Ty, path: &str) -> Result<(), CommandError> {
    let bad = || {
        CommandError::Parameter(format!(
            "Invalid parameter type for '{path}', expected: {}",
            json_type(ty)
        ))
    };
    match ty {
        Ty::Any => Ok(()),
        Ty::Str => v.as_str().map(|_| ()).ok_or_else(bad),
        Ty::Int => {
            if v.is_i64() || v.is_u64() {
                Ok(())
            } else {
                Err(bad())
            }
        }
        Ty::Bool => v.as_bool().map(|_| ()).ok_or_else(bad),
        Ty::Number => v.as_f64().map(|_| ()).ok_or_else(bad),
        Ty::Enum(e) => {
            let s = v.as_str().ok_or_else(bad)?;
            if e.values.contains(&s) {
                Ok(())
            } else {
                Err(CommandError::Parameter(format!(
                    "Parameter '{path}' does not accept value '{s}'"
                )))
            }
        }
        Ty::Object(o) => {
            let map = v.as_object().ok_or_else(bad)?;
            validate_in(map, o.members, &format!("{path}."))
        }
        Ty::Array(elem) => {
            let items = v.as_array().ok_or_else(bad)?;
            for (i, item) in items.iter().enumerate() {
                check_value(item, elem, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
    }
}

/// Builds the `query-qmp-schema` reply. Non-builtin types get QEMU-style
/// masked names ("0", "1", ...); the empty object is "0".
pub fn generate(commands: &[CommandSchema], events: &[EventDef]) -> Vec<Value> {
    let mut g = Gen::default();
    g.intern_members("", &[]); // "0": the empty object
    let mut out = Vec::new();
    for c in commands {
        let arg = g.intern_members(&format!("q_obj_{}-arg", c.name), c.args);
        let ret = match &c.ret {
            Some(t) => g.intern(t),
            None => "0".to_string(),
        };
        out.push(json!({"name": c.name, "meta-type": "command", "arg-type": arg, "ret-type": ret}));
    }
    for e in events {
        let arg = g.intern_members(&format!("q_obj_{}-arg", e.name), e.data);
        out.push(json!({"name": e.name, "meta-type": "event", "arg-type": arg}));
    }
    out.extend(g.entities);
    for (name, json_type) in [
        ("str", "string"),
        ("int", "int"),
        ("bool", "boolean"),
        ("number", "number"),
        ("any", "value"),
    ] {
        out.push(json!({"name": name, "meta-type": "builtin", "json-type": json_type}));
    }
    out
}

#[derive(Default)]
struct Gen {
    names: HashMap<String, String>,
    entities: Vec<Value>,
}

impl Gen {
    fn fresh(&mut self, key: &str) -> (String, bool) {
        if let Some(n) = self.names.get(key) {
            return (n.clone(), false);
        }
        let n = self.names.len().to_string();
        self.names.insert(key.to_string(), n.clone());
        (n, true)
    }

    fn intern_members(&mut self, key: &str, members: &[Member]) -> String {
        let key = if members.is_empty() { "" } else { key };
        let (name, new) = self.fresh(key);
        if new {
            let ms: Vec<Value> = members
                .iter()
                .map(|m| {
                    let ty = self.intern(&m.ty);
                    if m.optional {
                        json!({"name": m.name, "type": ty, "default": null})
                    } else {
                        json!({"name": m.name, "type": ty})
                    }
                })
                .collect();
            self.entities
                .push(json!({"name": name, "meta-type": "object", "members": ms}));
        }
        name
    }

    fn intern(&mut self, ty: &Ty) -> String {
        match ty {
            Ty::Str => "str".into(),
            Ty::Int => "int".into(),
            Ty::Bool => "bool".into(),
            Ty::Number => "number".into(),
            Ty::Any => "any".into(),
            Ty::Enum(e) => {
                let (name, new) = self.fresh(e.name);
                if new {
                    let members: Vec<Value> = e.values.iter().map(|v| json!({"name": v})).collect();
                    self.entities.push(json!({
                        "name": name, "meta-type": "enum",
                        "values": e.values, "members": members,
                    }));
                }
                name
            }
            Ty::Object(o) => self.intern_members(o.name, o.members),
            Ty::Array(elem) => {
                let elem_name = self.intern(elem);
                let name = format!("[{elem_name}]");
                if !self.names.contains_key(&name) {
                    self.names.insert(name.clone(), name.clone());
                    self.entities.push(json!({
                        "name": name, "meta-type": "array", "element-type": elem_name,
                    }));
                }
                name
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static COLOR: EnumDef = EnumDef {
        name: "Color",
        values: &["red", "blue"],
    };
    static INNER: ObjectDef = ObjectDef {
        name: "Inner",
        members: &[req("name", Ty::Str), opt("props", Ty::Any)],
    };
    static INNER_TY: Ty = Ty::Object(&INNER);
    static ARGS: &[Member] = &[
        req("type", Ty::Enum(&COLOR)),
        req("model", Ty::Object(&INNER)),
        opt("n", Ty::Int),
        opt("list", Ty::Array(&Ty::Str)),
    ];

    fn check(v: Value) -> Result<(), String> {
        validate(v.as_object().expect("object"), ARGS).map_err(|e| e.to_string())
    }

    #[test]
    fn validation_messages_are_qemus() {
        assert_eq!(
            check(json!({"type": "red", "model": {"name": "x"}})),
            Ok(())
        );
        assert_eq!(
            check(json!({"model": {"name": "x"}})),
            Err("Parameter 'type' is missing".into())
        );
        assert_eq!(
            check(json!({"type": 1, "model": {"name": "x"}})),
            Err("Invalid parameter type for 'type', expected: string".into())
        );
        assert_eq!(
            check(json!({"type": "green", "model": {"name": "x"}})),
            Err("Parameter 'type' does not accept value 'green'".into())
        );
        assert_eq!(
            check(json!({"type": "red", "model": {"name": 3}})),
            Err("Invalid parameter type for 'model.name', expected: string".into())
        );
        assert_eq!(
            check(json!({"type": "red", "model": {"name": "x"}, "bogus": 1})),
            Err("Parameter 'bogus' is unexpected".into())
        );
        assert_eq!(
            check(json!({"type": "red", "model": {"name": "x"}, "n": 1.5})),
            Err("Invalid parameter type for 'n', expected: integer".into())
        );
        assert_eq!(
            check(json!({"type": "red", "model": {"name": "x"}, "list": ["a", 2]})),
            Err("Invalid parameter type for 'list[1]', expected: string".into())
        );
    }

    #[test]
    fn generated_schema_resolves() {
        let cmds = [
            CommandSchema {
                name: "frob",
                args: ARGS,
                ret: Some(Ty::Array(&INNER_TY)),
            },
            CommandSchema {
                name: "nop",
                args: &[],
                ret: None,
            },
        ];
        let schema = generate(
            &cmds,
            &[EventDef {
                name: "STOP",
                data: &[],
            }],
        );
        let by_name: HashMap<&str, &Value> = schema
            .iter()
            .map(|e| (e["name"].as_str().expect("name"), e))
            .collect();
        // Every referenced type exists.
        for e in &schema {
            for key in ["arg-type", "ret-type", "element-type"] {
                if let Some(t) = e.get(key) {
                    assert!(by_name.contains_key(t.as_str().expect("str")), "{t}");
                }
            }
            for m in e
                .get("members")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(t) = m.get("type") {
                    assert!(by_name.contains_key(t.as_str().expect("str")), "{t}");
                }
            }
        }
        assert_eq!(by_name["nop"]["arg-type"], "0");
        assert_eq!(by_name["STOP"]["arg-type"], "0");
        let arg = by_name[by_name["frob"]["arg-type"].as_str().expect("s")];
        assert_eq!(
            arg["members"][2],
            json!({"name": "n", "type": "int", "default": null})
        );
    }
}
