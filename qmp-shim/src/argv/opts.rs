//! QemuOpts-style `key=value,key=value` strings, and the JSON form some
//! options (`-object`, `-device`, `-blockdev`, `-netdev`, `-audiodev`) take.

use serde_json::{Map, Value};

use super::ArgvError;

/// An ordered list of `key=value` pairs as QEMU's `QemuOpts` parses them.
///
/// Values keep their text; interpretation (bool, size, int) is done by the
/// option that owns them so that its error can name the option.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Opts {
    pairs: Vec<(String, String)>,
}

impl Opts {
    /// Parses `s`. A first element without `=` is the value of `implied`
    /// (`-machine none,...` → `type=none`); `,,` is a literal comma.
    /// Elements without `=` after the first are boolean flags
    /// (`server` → `server=on`, `nowait` → `wait=off`, `noX` → `X=off`),
    /// as QEMU 7.2 still accepts.
    pub fn parse(option: &str, s: &str, implied: Option<&str>) -> Result<Self, ArgvError> {
        let mut pairs = Vec::new();
        for (index, element) in split_commas(s).into_iter().enumerate() {
            if element.is_empty() {
                if index == 0 && implied.is_some() {
                    return Err(ArgvError::invalid(option, s, "empty value"));
                }
                continue;
            }
            match element.split_once('=') {
                Some((key, value)) => {
                    if key.is_empty() {
                        return Err(ArgvError::invalid(option, s, "empty parameter name"));
                    }
                    pairs.push((key.to_string(), value.to_string()));
                }
                None => match implied {
                    Some(key) if index == 0 => pairs.push((key.to_string(), element)),
                    _ => {
                        let (key, value) = match element.strip_prefix("no") {
                            Some(rest) if !rest.is_empty() => (rest.to_string(), "off"),
                            _ => (element, "on"),
                        };
                        pairs.push((key, value.to_string()));
                    }
                },
            }
        }
        Ok(Self { pairs })
    }

    /// The last value given for `key` (QEMU: later wins).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Appends a pair.
    pub fn push(&mut self, key: &str, value: &str) {
        self.pairs.push((key.to_string(), value.to_string()));
    }

    /// All pairs, in order.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }

    /// Keys not in `known`, for "unsupported parameter" errors.
    pub fn unknown_keys<'a>(&'a self, known: &[&str]) -> Vec<&'a str> {
        self.pairs
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| !known.contains(k))
            .collect()
    }

    /// `key` as an on/off boolean (`on|off|yes|no|true|false`).
    pub fn get_bool(&self, option: &str, key: &str) -> Result<Option<bool>, ArgvError> {
        self.get(key)
            .map(|v| parse_bool(option, key, v))
            .transpose()
    }

    /// `key` as an unsigned integer.
    pub fn get_u64(&self, option: &str, key: &str) -> Result<Option<u64>, ArgvError> {
        self.get(key)
            .map(|v| {
                parse_u64(v).ok_or_else(|| {
                    ArgvError::invalid(option, v, &format!("parameter '{key}' expects a number"))
                })
            })
            .transpose()
    }

    /// The pairs as a JSON object of strings (for `-device driver,k=v` etc.).
    pub fn to_json(&self) -> Map<String, Value> {
        self.pairs
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect()
    }
}

/// Splits on `,` where `,,` stands for a literal comma.
fn split_commas(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// QEMU's boolean spellings.
pub fn parse_bool(option: &str, key: &str, v: &str) -> Result<bool, ArgvError> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(ArgvError::invalid(
            option,
            v,
            &format!("parameter '{key}' expects 'on' or 'off'"),
        )),
    }
}

/// Decimal or `0x` hexadecimal.
pub fn parse_u64(v: &str) -> Option<u64> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Parses the JSON form (`-device '{"driver":...}'`): it must be an object.
pub fn parse_json_object(option: &str, s: &str) -> Result<Map<String, Value>, ArgvError> {
    match serde_json::from_str::<Value>(s) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ArgvError::invalid(
            option,
            s,
            "JSON argument must be an object",
        )),
        Err(e) => Err(ArgvError::invalid(
            option,
            s,
            &format!("JSON parse error: {e}"),
        )),
    }
}

/// `s` in JSON form if it starts with `{`, else key=value with `implied`
/// as the first element's key. Key=value values are JSON strings.
pub fn parse_json_or_opts(
    option: &str,
    s: &str,
    implied: &str,
) -> Result<Map<String, Value>, ArgvError> {
    if s.trim_start().starts_with('{') {
        parse_json_object(option, s)
    } else {
        Ok(Opts::parse(option, s, Some(implied))?.to_json())
    }
}

/// A JSON value as text for key=value comparisons: strings as is, others
/// as their JSON rendering (so `"fd":3` and `fd=3` compare equal).
pub fn json_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "on".into(),
        Value::Bool(false) => "off".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implied_key_and_escaped_comma() {
        let o =
            Opts::parse("-chardev", "file,id=c,path=/tmp/a,,b", Some("backend")).expect("valid");
        assert_eq!(o.get("backend"), Some("file"));
        assert_eq!(o.get("path"), Some("/tmp/a,b"));
    }

    #[test]
    fn legacy_flags() {
        let o = Opts::parse("-qmp", "unix:/x,server,nowait", Some("path")).expect("valid");
        assert_eq!(o.get("server"), Some("on"));
        assert_eq!(o.get("wait"), Some("off"));
    }

    #[test]
    fn later_value_wins_and_bools() {
        let o = Opts::parse("-machine", "pc,usb=on,usb=off", Some("type")).expect("valid");
        assert_eq!(o.get_bool("-machine", "usb").expect("bool"), Some(false));
        assert!(Opts::parse("-machine", "pc,usb=maybe", Some("type"))
            .expect("valid")
            .get_bool("-machine", "usb")
            .is_err());
    }

    #[test]
    fn json_form_must_be_object() {
        assert!(parse_json_object("-device", "[1]").is_err());
        assert!(parse_json_object("-device", "{\"driver\":").is_err());
        let m = parse_json_or_opts("-device", "isa-serial,chardev=c0", "driver").expect("ok");
        assert_eq!(m["driver"], "isa-serial");
    }
}
