//! The stream preamble: magic, format version, producer.

use crate::error::{FormatError, Result};
use crate::section::{le_u16, le_u32};

/// The first 8 bytes of every ferry stream.
pub const MAGIC: [u8; 8] = *b"FERRYVM\0";

/// The stream format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

/// Length of the fixed part of the preamble (the producer string follows).
pub const PREAMBLE_LEN: usize = 24;

/// Longest producer string, in bytes.
pub const MAX_PRODUCER_LEN: usize = 256;

/// Preamble flag bits this build knows (none yet); any other bit is refused.
pub const PREAMBLE_KNOWN_FLAGS: u32 = 0;

/// What the preamble of a stream says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preamble {
    /// Stream format version.
    pub format_version: u32,
    /// Stream flags (always 0 in version 1).
    pub flags: u32,
    /// Who wrote the stream, e.g. "ferry 0.1.0".
    pub producer: String,
}

/// Why a producer string is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProducerError {
    /// The string is longer than [`MAX_PRODUCER_LEN`] bytes.
    #[error("the producer string is {len} bytes, over the limit of {MAX_PRODUCER_LEN}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The string contains control characters.
    #[error("the producer string contains control characters")]
    ControlCharacters,
}

/// Checks a producer string.
pub(crate) fn check_producer(producer: &str) -> std::result::Result<(), ProducerError> {
    if producer.len() > MAX_PRODUCER_LEN {
        return Err(ProducerError::TooLong {
            len: producer.len(),
        });
    }
    if producer.chars().any(char::is_control) {
        return Err(ProducerError::ControlCharacters);
    }
    Ok(())
}

pub(crate) fn encode_fixed(producer_len: u16) -> [u8; PREAMBLE_LEN] {
    let mut b = [0u8; PREAMBLE_LEN];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    // 12..16: flags, zero.
    b[16..18].copy_from_slice(&producer_len.to_le_bytes());
    // 18..24: reserved, zero.
    b
}

/// Checks the magic alone, on however many bytes arrived (at most 8).
/// `Ok(())` means the bytes are a prefix of the magic.
pub(crate) fn check_magic(first: &[u8]) -> Result<()> {
    let n = first.len().min(MAGIC.len());
    if first[..n] != MAGIC[..n] {
        return Err(FormatError::BadMagic {
            found: first[..n].to_vec(),
        });
    }
    Ok(())
}

/// Validates the fixed preamble; returns the flags and the producer length.
pub(crate) fn decode_fixed(b: &[u8; PREAMBLE_LEN]) -> Result<(u32, usize)> {
    check_magic(&b[0..8])?;
    let version = le_u32(&b[8..12]);
    let bad = |reason: String| FormatError::BadPreamble { reason };
    if version == 0 {
        return Err(bad("format version 0 is invalid".into()));
    }
    if version > FORMAT_VERSION {
        return Err(FormatError::UnsupportedFormatVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let flags = le_u32(&b[12..16]);
    if flags & !PREAMBLE_KNOWN_FLAGS != 0 {
        return Err(bad(format!(
            "unknown stream flags {:#x} are set",
            flags & !PREAMBLE_KNOWN_FLAGS
        )));
    }
    let producer_len = usize::from(le_u16(&b[16..18]));
    if producer_len > MAX_PRODUCER_LEN {
        return Err(bad(format!(
            "the producer string is {producer_len} bytes, over the limit of {MAX_PRODUCER_LEN}"
        )));
    }
    if b[18..24].iter().any(|&x| x != 0) {
        return Err(bad("the reserved bytes are not zero".into()));
    }
    Ok((flags, producer_len))
}

pub(crate) fn decode_producer(bytes: &[u8]) -> Result<String> {
    let s = std::str::from_utf8(bytes).map_err(|_| FormatError::BadPreamble {
        reason: "the producer string is not UTF-8".into(),
    })?;
    // The reason travels as text, like every FormatError message.
    check_producer(s).map_err(|e| FormatError::BadPreamble {
        reason: e.to_string(),
    })?;
    Ok(s.to_owned())
}
