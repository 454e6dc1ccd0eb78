//! QMP commands, one file per area. [`COMMANDS`] is the single table the
//! dispatcher, `query-commands` and `query-qmp-schema` are built from.
//!
//! Commands that need a VM go through [`crate::backend::Backend`]; the probe
//! commands answer from static data describing what ferry really has.

mod cpu;
mod devices;
mod fds;
mod image;
mod machine;
mod meta;
mod migration;
mod monitor;
mod objects;
mod qom;
pub mod types;

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use serde_json::{Map, Value};

pub use objects::{load_objects, TlsObject, TlsParameters, TLS_TYPES};

use crate::qmp::error::CommandError;
use crate::qmp::schema::{self, CommandSchema, EventDef};
use crate::qmp::server::Vm;

/// What a handler gets.
#[derive(Debug)]
pub struct Ctx<'a> {
    pub vm: &'a mut Vm,
    /// `getfd` fds of this monitor, by name.
    pub monitor_fds: &'a mut HashMap<String, OwnedFd>,
    /// Fds that came with this request (SCM_RIGHTS).
    pub received: &'a mut Vec<OwnedFd>,
}

/// A handler: validated arguments in, `return` value out.
pub type Handler = fn(&mut Ctx<'_>, &Map<String, Value>) -> Result<Value, CommandError>;

/// One command: its schema and its handler.
#[derive(Debug)]
pub struct Command {
    pub schema: CommandSchema,
    pub handler: Handler,
}

/// Every command ferry-qemu implements.
pub static COMMANDS: &[&Command] = &[
    &meta::QMP_CAPABILITIES,
    &meta::QUERY_VERSION,
    &meta::QUERY_COMMANDS,
    &meta::QUERY_QMP_SCHEMA,
    &meta::QUERY_TARGET,
    &meta::QUERY_KVM,
    &meta::QUERY_STATUS,
    &meta::QUERY_NAME,
    &meta::QUERY_UUID,
    &qom::QOM_LIST_TYPES,
    &qom::DEVICE_LIST_PROPERTIES,
    &qom::QOM_LIST_PROPERTIES,
    &qom::QUERY_MACHINES,
    &qom::QUERY_COMMAND_LINE_OPTIONS,
    &qom::QOM_LIST,
    &qom::QOM_GET,
    &qom::QOM_SET,
    &cpu::QUERY_CPU_DEFINITIONS,
    &cpu::QUERY_CPU_MODEL_EXPANSION,
    &devices::QUERY_HOTPLUGGABLE_CPUS,
    &devices::QUERY_CPUS_FAST,
    &devices::QUERY_IOTHREADS,
    &devices::BALLOON,
    &devices::QUERY_BALLOON,
    &devices::QUERY_NAMED_BLOCK_NODES,
    &devices::QUERY_BLOCK,
    &devices::QUERY_BLOCKSTATS,
    &devices::QUERY_JOBS,
    &machine::STOP,
    &machine::CONT,
    &machine::QUIT,
    &machine::SYSTEM_RESET,
    &machine::SYSTEM_POWERDOWN,
    &machine::PMEMSAVE,
    &machine::RTC_RESET_REINJECTION,
    &machine::QUERY_CHARDEV,
    &migration::QUERY_MIGRATE_CAPABILITIES,
    &migration::MIGRATE_SET_CAPABILITIES,
    &migration::QUERY_MIGRATE_PARAMETERS,
    &migration::MIGRATE_SET_PARAMETERS,
    &migration::MIGRATE,
    &migration::MIGRATE_INCOMING,
    &migration::MIGRATE_CANCEL,
    &migration::NBD_SERVER_START,
    &migration::MIGRATE_CONTINUE,
    &migration::MIGRATE_START_POSTCOPY,
    &migration::QUERY_MIGRATE,
    &monitor::ANNOUNCE_SELF,
    &monitor::CALC_DIRTY_RATE,
    &monitor::QUERY_DIRTY_RATE,
    &monitor::HUMAN_MONITOR_COMMAND,
    &objects::OBJECT_ADD,
    &objects::OBJECT_DEL,
    &fds::GETFD,
    &fds::CLOSEFD,
    &fds::ADD_FD,
    &fds::REMOVE_FD,
    &fds::QUERY_FDSETS,
];

/// Events ferry-qemu can emit (for the schema).
pub static EVENTS: &[EventDef] = types::EVENTS;

/// Looks a command up by name.
pub fn find(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().copied().find(|c| c.schema.name == name)
}

/// The `query-qmp-schema` reply.
pub fn qmp_schema() -> Vec<Value> {
    let schemas: Vec<CommandSchema> = COMMANDS
        .iter()
        .map(|c| CommandSchema {
            name: c.schema.name,
            args: c.schema.args,
            ret: c.schema.ret,
        })
        .collect();
    schema::generate(&schemas, EVENTS)
}

/// A string argument the schema already checked (`""` if absent).
pub(crate) fn arg_str<'a>(args: &'a Map<String, Value>, name: &str) -> &'a str {
    args.get(name).and_then(Value::as_str).unwrap_or_default()
}

#[cfg(test)]
mod tests;
