//! QMP errors: internal failures → QMP error classes, in one function.

use serde_json::{json, Value};

use crate::backend::BackendError;

/// QAPI `QapiErrorClass`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KVMMissingCap,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GenericError => "GenericError",
            Self::CommandNotFound => "CommandNotFound",
            Self::DeviceNotActive => "DeviceNotActive",
            Self::DeviceNotFound => "DeviceNotFound",
            Self::KVMMissingCap => "KVMMissingCap",
        }
    }
}

/// A QMP error reply body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    /// `{"error":{"class":..,"desc":..}}` (the caller adds `id`).
    pub fn to_json(&self) -> Value {
        json!({"error": {"class": self.class.as_str(), "desc": self.desc}})
    }
}

/// Why a QMP request failed, before it is shown to the client.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("The command {name} has not been found")]
    CommandNotFound { name: String },
    #[error("Expecting capabilities negotiation with 'qmp_capabilities'")]
    NotNegotiated,
    #[error("Capabilities negotiation is already complete, command ignored")]
    AlreadyNegotiated,
    /// Malformed request framing (JSON, members): the text is QEMU's.
    #[error("{0}")]
    Input(String),
    /// Argument validation: the text is QEMU's (`Parameter 'x' ...`).
    #[error("{0}")]
    Parameter(String),
    #[error("{0}")]
    DeviceNotFound(String),
    #[error("{0}")]
    DeviceNotActive(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Generic(String),
}

/// The one mapping from internal errors to QMP error classes.
pub fn to_qmp(err: &CommandError) -> QmpError {
    let class = match err {
        CommandError::CommandNotFound { .. }
        | CommandError::NotNegotiated
        | CommandError::AlreadyNegotiated => ErrorClass::CommandNotFound,
        CommandError::DeviceNotFound(_) => ErrorClass::DeviceNotFound,
        CommandError::DeviceNotActive(_) | CommandError::Backend(BackendError::NoBalloon) => {
            ErrorClass::DeviceNotActive
        }
        CommandError::Input(_)
        | CommandError::Parameter(_)
        | CommandError::Backend(_)
        | CommandError::Generic(_) => ErrorClass::GenericError,
    };
    QmpError {
        class,
        desc: err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let e = to_qmp(&CommandError::CommandNotFound { name: "x".into() });
        assert_eq!(e.class, ErrorClass::CommandNotFound);
        assert_eq!(e.desc, "The command x has not been found");
        assert_eq!(
            to_qmp(&CommandError::NotNegotiated).class,
            ErrorClass::CommandNotFound
        );
        let b = to_qmp(&CommandError::Backend(BackendError::NotYetSupported {
            operation: "stop",
        }));
        assert_eq!(b.class, ErrorClass::GenericError);
        assert_eq!(b.desc, "stop is not yet supported by ferry-qemu");
        assert_eq!(
            to_qmp(&CommandError::DeviceNotFound("Device 'x' not found".into())).to_json(),
            json!({"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}})
        );
    }
}
