//! The one error type of the format crate.

use std::io;

use crate::section::SectionId;

/// Everything that can go wrong while writing or reading a ferry stream.
///
/// Messages are meant for the operator: they name the problem and, where one
/// exists, the fix. The migration wire carries them back to the source as text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The stream does not start with the ferry magic.
    #[error(
        "not a ferry checkpoint or migration stream: the first bytes are {}, expected FERRYVM; \
         check the file path or the address of the peer",
        hex(.found)
    )]
    BadMagic {
        /// The bytes found where the magic should be (at most 8).
        found: Vec<u8>,
    },

    /// The stream was written by a newer ferry.
    #[error(
        "stream format version {found} is newer than this ferry supports ({supported}); \
         upgrade ferry on this side"
    )]
    UnsupportedFormatVersion {
        /// Version found in the preamble.
        found: u32,
        /// Newest version this build reads.
        supported: u32,
    },

    /// The preamble carries values this ferry refuses.
    #[error("the stream preamble is invalid: {reason}; the stream is corrupt or was not written by ferry")]
    BadPreamble {
        /// What is wrong.
        reason: String,
    },

    /// The stream ended before its End section.
    #[error(
        "the stream ended early (after {offset} bytes, {inside}): the other end died, \
         the link was cut or the file is truncated"
    )]
    Truncated {
        /// Bytes of the stream consumed before the end was hit.
        offset: u64,
        /// Where the end was hit, as a phrase ("inside section RamPages (id 2)").
        inside: String,
    },

    /// A section declares (or a writer was given) more bytes than the limit allows.
    #[error(
        "section {section} is {length} bytes, over the limit of {limit} bytes; the stream is \
         corrupt, or it comes from a producer with larger limits (raise the limit only if the \
         source is trusted)"
    )]
    SectionTooLarge {
        /// The section.
        section: SectionId,
        /// Its declared length.
        length: u64,
        /// The limit that applies to it.
        limit: u64,
    },

    /// The payload does not match the CRC in its header.
    #[error(
        "section {section} failed its checksum (header says {expected:#010x}, payload gives \
         {actual:#010x}): the data was corrupted in transit or on disk; retry the migration or \
         use another copy of the checkpoint"
    )]
    ChecksumMismatch {
        /// The section.
        section: SectionId,
        /// CRC-32 recorded in the section header.
        expected: u32,
        /// CRC-32 computed over the payload received.
        actual: u32,
    },

    /// A section marked critical is unknown to this build.
    #[error(
        "section id {id} version {version} is required by this stream but unknown to this \
         ferry; upgrade ferry on the receiving side"
    )]
    UnknownCriticalSection {
        /// Raw section id.
        id: u32,
        /// Section version.
        version: u16,
    },

    /// A known section comes in a version this build cannot read.
    #[error(
        "section {section} has version {version}, but this ferry reads only version(s) {}; \
         use a ferry release that matches the producer",
        list(.supported)
    )]
    UnsupportedSectionVersion {
        /// The section.
        section: SectionId,
        /// Version found.
        version: u16,
        /// Versions this build reads.
        supported: &'static [u16],
    },

    /// A section header or a fixed-layout payload is malformed.
    #[error("section {section} is malformed: {reason}; the stream is corrupt or was not written by ferry")]
    MalformedSection {
        /// The section.
        section: SectionId,
        /// What is wrong.
        reason: String,
    },

    /// A RAM batch payload is malformed; no page of it may be applied.
    #[error("a RAM page batch is malformed: {reason}; the stream is corrupt or was not written by ferry")]
    MalformedRamBatch {
        /// What is wrong.
        reason: String,
    },

    /// A CBOR payload could not be encoded or decoded.
    #[error("the CBOR payload of section {section} could not be processed: {reason}")]
    Cbor {
        /// The section.
        section: SectionId,
        /// What the CBOR codec reported.
        reason: String,
    },

    /// The End section's counts disagree with what was read.
    #[error(
        "the End section declares {declared} {what}, but {counted} were read: a section was lost \
         or the stream was altered; retry the migration or use another copy of the checkpoint"
    )]
    EndMismatch {
        /// What was counted ("sections", "RAM pages").
        what: &'static str,
        /// The count the End section carries.
        declared: u64,
        /// The count the reader arrived at.
        counted: u64,
    },

    /// `next_section` was called after the End section was returned.
    #[error("the stream already ended with its End section; no more sections can be read")]
    ReadAfterEnd,

    /// `next_section` was called after an earlier call failed.
    #[error(
        "an earlier error left the stream at an unknown position; no more sections can be read \
         (start the migration or the restore again)"
    )]
    ReadAfterError,

    /// The caller asked the writer to produce something the format forbids.
    #[error("refusing to write an invalid stream: {reason}")]
    InvalidWrite {
        /// What is wrong.
        reason: String,
    },

    /// Any other I/O error of the underlying reader or writer. An unexpected
    /// end of input is reported as [`FormatError::Truncated`] instead.
    ///
    /// The OS error is part of the message, not a `#[source]`: these messages
    /// travel as text (on the return path, in migration errors), and "I/O error
    /// on the stream" alone hid whether the disk was full or the peer reset the
    /// connection (found by the fault-matrix tests, tests/tests/faults.rs).
    #[error("I/O error on the stream: {0}")]
    Io(io::Error),
}

impl From<io::Error> for FormatError {
    fn from(e: io::Error) -> Self {
        FormatError::Io(e)
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;

fn hex(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "(none)".to_owned();
    }
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn list(versions: &[u16]) -> String {
    versions
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_magic_message_shows_hex() {
        let e = FormatError::BadMagic {
            found: b"\x7fELF\x02\x01\x01\x00".to_vec(),
        };
        let msg = e.to_string();
        assert!(msg.starts_with(
            "not a ferry checkpoint or migration stream: the first bytes are \
             7f 45 4c 46 02 01 01 00, expected FERRYVM"
        ));
    }

    #[test]
    fn unsupported_version_lists_supported() {
        let e = FormatError::UnsupportedSectionVersion {
            section: SectionId::Vcpus,
            version: 9,
            supported: &[1, 2],
        };
        assert!(e.to_string().contains("reads only version(s) 1, 2"));
    }
}
