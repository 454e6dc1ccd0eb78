//! CBOR helpers for the serde-encoded sections (Shape, Vcpus, Vm, Devices).

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{FormatError, Result};
use crate::section::{Limits, SectionId};

/// Deepest nesting accepted when decoding; VM state is far shallower, and a
/// hostile stream must not exhaust the stack.
pub const MAX_CBOR_DEPTH: usize = 64;

/// Encodes `value` as the CBOR payload of `section`, refusing a payload over
/// the CBOR limit (a receiver with the same limits would refuse it).
pub fn encode_cbor<T: Serialize + ?Sized>(
    section: SectionId,
    value: &T,
    limits: &Limits,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).map_err(|e| FormatError::Cbor {
        section,
        reason: match e {
            ciborium::ser::Error::Io(io) => format!("writing failed: {io}"),
            ciborium::ser::Error::Value(msg) => msg,
        },
    })?;
    limits.check(section, out.len() as u64)?;
    Ok(out)
}

/// Decodes the CBOR payload of `section`. The payload must hold exactly one
/// value: trailing bytes are refused.
pub fn decode_cbor<T: DeserializeOwned>(
    section: SectionId,
    payload: &[u8],
    limits: &Limits,
) -> Result<T> {
    limits.check(section, payload.len() as u64)?;
    let mut rest = payload;
    let value =
        ciborium::de::from_reader_with_recursion_limit(&mut rest, MAX_CBOR_DEPTH).map_err(|e| {
            FormatError::Cbor {
                section,
                reason: match e {
                    ciborium::de::Error::Io(_) => "the payload ends inside a value".to_owned(),
                    ciborium::de::Error::Syntax(at) => format!("malformed CBOR at byte {at}"),
                    ciborium::de::Error::Semantic(Some(at), msg) => format!("{msg} (at byte {at})"),
                    ciborium::de::Error::Semantic(None, msg) => msg,
                    ciborium::de::Error::RecursionLimitExceeded => {
                        format!("values are nested deeper than {MAX_CBOR_DEPTH} levels")
                    }
                },
            }
        })?;
    if !rest.is_empty() {
        return Err(FormatError::Cbor {
            section,
            reason: format!(
                "{} bytes follow the value; the payload must hold exactly one",
                rest.len()
            ),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct ShapeState {
        mem_mib: u64,
        vcpus: u32,
        name: String,
        #[serde(default)]
        added_later: Option<u32>,
    }

    fn shape() -> ShapeState {
        ShapeState {
            mem_mib: 512,
            vcpus: 2,
            name: "guest".into(),
            added_later: None,
        }
    }

    #[test]
    fn round_trip() {
        let l = Limits::default();
        let bytes = encode_cbor(SectionId::Shape, &shape(), &l).unwrap();
        let back: ShapeState = decode_cbor(SectionId::Shape, &bytes, &l).unwrap();
        assert_eq!(back, shape());
    }

    #[test]
    fn errors_name_the_section() {
        let l = Limits::default();
        let e = decode_cbor::<ShapeState>(SectionId::Vcpus, &[0xff, 0x00], &l).unwrap_err();
        assert!(matches!(
            e,
            FormatError::Cbor {
                section: SectionId::Vcpus,
                ..
            }
        ));
        assert!(e.to_string().contains("Vcpus (id 3)"), "{e}");
        let e = decode_cbor::<String>(SectionId::Vm, &[0x63, b'a'], &l).unwrap_err();
        assert!(e.to_string().contains("ends inside"), "{e}");
        let e = decode_cbor::<u32>(SectionId::Vm, &[0x61, b'a'], &l).unwrap_err();
        assert!(matches!(e, FormatError::Cbor { .. }), "{e}");
    }

    #[test]
    fn trailing_bytes_refused() {
        let l = Limits::default();
        let mut bytes = encode_cbor(SectionId::Vm, &7u32, &l).unwrap();
        bytes.push(0);
        let e = decode_cbor::<u32>(SectionId::Vm, &bytes, &l).unwrap_err();
        assert!(e.to_string().contains("1 bytes follow"), "{e}");
    }

    #[test]
    fn deep_nesting_refused() {
        let l = Limits::default();
        // 10_000 nested one-element arrays around 0.
        let mut bytes = vec![0x81u8; 10_000];
        bytes.push(0);
        let e = decode_cbor::<serde_json_free::Any>(SectionId::Devices, &bytes, &l).unwrap_err();
        assert!(e.to_string().contains("nested"), "{e}");
    }

    #[test]
    fn limit_enforced_both_ways() {
        let l = Limits {
            max_cbor_len: 4,
            ..Limits::default()
        };
        let e = encode_cbor(SectionId::Shape, &shape(), &l).unwrap_err();
        assert!(matches!(e, FormatError::SectionTooLarge { .. }));
        let e = decode_cbor::<u8>(SectionId::Shape, &[0; 5], &l).unwrap_err();
        assert!(matches!(e, FormatError::SectionTooLarge { .. }));
    }

    /// A self-describing "any value" sink, to feed arbitrary CBOR through serde.
    mod serde_json_free {
        use serde::de::{Deserialize, Deserializer, IgnoredAny};

        #[derive(Debug)]
        pub struct Any;

        impl<'de> Deserialize<'de> for Any {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                IgnoredAny::deserialize(d).map(|_| Any)
            }
        }
    }
}
