//! QMP: JSON framing, negotiation, dispatch, errors, events, schema.

pub mod error;
pub mod events;
pub mod json;
pub mod schema;
pub mod server;
