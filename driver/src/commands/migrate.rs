//! `ferry migrate DOMAIN DEST-URI`: pre-flight checks, then
//! virDomainMigrate3/ToURI3 in a thread while the job is polled for progress.

use std::sync::mpsc;

use serde_json::json;

use crate::checks::CheckOptions;
use crate::cli::{MigrateArgs, EXIT_BLOCKED, EXIT_ERROR, EXIT_OK};
use crate::libvirt::{Conn, MigrateRequest, POLL_INTERVAL};
use crate::output::{self, Progress};

pub fn run(a: &MigrateArgs) -> i32 {
    let json = a.output.json;
    let (src, dst) = match Conn::open(a.source.connect.as_deref())
        .and_then(|s| Conn::open(Some(&a.dest_uri)).map(|d| (s, d)))
    {
        Ok(c) => c,
        Err(e) => return super::fail(&e, json),
    };

    let opts = CheckOptions {
        allow_unsafe: a.allow_unsafe,
    };
    let report = match super::check::preflight(&a.domain, &src, &dst, opts) {
        Ok(r) => r,
        Err(e) => return super::fail(&e, json),
    };
    if report.blocked {
        if json {
            output::json_line(&json!({"event": "blocked", "report": report}));
        } else {
            eprint!("{}", output::report_text(&report));
        }
        return EXIT_BLOCKED;
    }

    if let Some(ms) = a.max_downtime {
        if let Err(e) = src.set_max_downtime(&a.domain, ms) {
            return super::fail(&e, json);
        }
    }
    let req = MigrateRequest {
        p2p: a.p2p,
        tunnelled: a.tunnelled,
        persistent: a.persistent,
        undefine_source: a.undefinesource,
        allow_unsafe: a.allow_unsafe,
        tls: a.tls,
        bandwidth: a.bandwidth,
        max_downtime: a.max_downtime,
    };

    let mut progress = Progress::new(json);
    progress.event(
        "started",
        json!({"domain": a.domain, "source": src.uri(), "destination": dst.uri()}),
    );
    let (done_tx, done_rx) = mpsc::channel();
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            let r = src.migrate(&a.domain, &dst, &req);
            let _ = done_tx.send(r);
        });
        loop {
            match done_rx.recv_timeout(POLL_INTERVAL) {
                Ok(r) => break r,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(stats) = src.job_stats(&a.domain, false) {
                        progress.update(&stats);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // The migrate thread panicked; scope() re-raises it.
                    break Ok(());
                }
            }
        }
    });
    progress.finish();

    match result {
        Ok(()) => {
            // The source domain is gone (or inactive) now; the completed
            // statistics live on the destination.
            let stats = dst
                .job_stats(&a.domain, true)
                .or_else(|_| src.job_stats(&a.domain, true));
            if json {
                output::json_line(&json!({"event": "completed", "domain": a.domain,
                    "stats": stats.as_ref().ok()}));
            } else {
                println!("{}: migrated to {}", a.domain, dst.uri());
                if let Ok(s) = stats {
                    println!("{}", output::job_text(&a.domain, &s));
                }
            }
            EXIT_OK
        }
        Err(e) => {
            let code = super::fail(&e, json);
            debug_assert_eq!(code, EXIT_ERROR);
            code
        }
    }
}
