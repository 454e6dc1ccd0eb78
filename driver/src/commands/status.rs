//! `ferry status DOMAIN [--completed]`.

use crate::cli::EXIT_OK;
use crate::libvirt::Conn;
use crate::output;

pub fn run(domain: &str, completed: bool, src_uri: Option<&str>, json: bool) -> i32 {
    let stats = Conn::open(src_uri).and_then(|c| c.job_stats(domain, completed));
    match stats {
        Ok(s) => {
            output::print_job(domain, &s, json);
            EXIT_OK
        }
        Err(e) => super::fail(&e, json),
    }
}
