//! `ferry check DOMAIN DEST-URI`.

use crate::checks::{self, CheckOptions, CheckReport};
use crate::cli::{EXIT_BLOCKED, EXIT_OK};
use crate::domxml::DomainXml;
use crate::libvirt::{Conn, LibvirtDest, LibvirtError, LibvirtSource};
use crate::output;

/// Why a pre-flight run could not produce a report.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error("Cannot analyse the XML of domain {name}")]
    DomainXml {
        name: String,
        #[source]
        source: crate::domxml::DomainXmlError,
    },
}

/// Runs every rule for `domain` (on `src`) against `dst`. Read-only on the source.
pub fn preflight(
    domain: &str,
    src: &Conn,
    dst: &Conn,
    opts: CheckOptions,
) -> Result<CheckReport, CheckError> {
    let (xml, _active) = src.domain_xml(domain)?;
    let dom = DomainXml::parse(&xml).map_err(|source| CheckError::DomainXml {
        name: domain.to_owned(),
        source,
    })?;
    let checks = checks::run_all(
        &dom,
        &mut LibvirtSource { conn: src },
        &mut LibvirtDest { conn: dst },
        opts,
    );
    Ok(CheckReport::new(
        domain,
        Some(src.uri().to_owned()),
        Some(dst.uri().to_owned()),
        checks,
    ))
}

pub fn run(
    domain: &str,
    dest_uri: &str,
    src_uri: Option<&str>,
    json: bool,
    allow_unsafe: bool,
) -> i32 {
    let result = (|| {
        let src = Conn::open(src_uri)?;
        let dst = Conn::open(Some(dest_uri))?;
        preflight(domain, &src, &dst, CheckOptions { allow_unsafe })
    })();
    match result {
        Ok(report) => {
            output::print_report(&report, json);
            if report.blocked {
                EXIT_BLOCKED
            } else {
                EXIT_OK
            }
        }
        Err(e) => super::fail(&e, json),
    }
}
