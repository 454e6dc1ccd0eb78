//! `ferry cancel DOMAIN`.

use crate::cli::EXIT_OK;
use crate::libvirt::Conn;

pub fn run(domain: &str, src_uri: Option<&str>) -> i32 {
    match Conn::open(src_uri).and_then(|c| c.abort_job(domain)) {
        Ok(()) => {
            println!("{domain}: job aborted; the domain keeps running on the source");
            EXIT_OK
        }
        Err(e) => super::fail(&e, false),
    }
}
