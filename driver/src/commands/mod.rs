//! One module per subcommand. Each returns the process exit status.

pub mod cancel;
pub mod check;
pub mod hook;
pub mod migrate;
pub mod status;

use crate::cli::{Command, EXIT_ERROR};
use crate::output;

pub fn dispatch(cmd: Command) -> i32 {
    match cmd {
        Command::Check {
            domain,
            dest_uri,
            source,
            output,
            allow_unsafe,
        } => check::run(
            &domain,
            &dest_uri,
            source.connect.as_deref(),
            output.json,
            allow_unsafe,
        ),
        Command::Status {
            domain,
            completed,
            source,
            output,
        } => status::run(&domain, completed, source.connect.as_deref(), output.json),
        Command::Cancel { domain, source } => cancel::run(&domain, source.connect.as_deref()),
        Command::Migrate(args) => migrate::run(&args),
        Command::Hook { args } => hook::run(&args),
    }
}

/// Reports an error the way the output mode wants it and returns [`EXIT_ERROR`].
pub fn fail(err: &dyn std::error::Error, json: bool) -> i32 {
    // Each source once: a message that already ends with its cause's text
    // does not repeat it (ferry_vmm::error_chain's rule).
    let mut msg = err.to_string();
    let mut src = err.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        src = s.source();
    }
    if json {
        output::json_line(&serde_json::json!({"event": "error", "error": msg}));
    } else {
        eprintln!("ferry: {msg}");
    }
    EXIT_ERROR
}
