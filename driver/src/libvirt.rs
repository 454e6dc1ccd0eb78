//! Everything that talks to libvirt. The only file that uses the `virt` crate.
//!
//! `virt` 0.4 has no binding for virDomainAbortJob and this crate forbids
//! `unsafe`, so [`Conn::abort_job`] runs `virsh domjobabort` (libvirt-clients)
//! against the same URI. Replace it once the bindings grow `abort_job`.

use std::process::Command;
use std::time::Duration;

use thiserror::Error;
use virt::connect::Connect;
use virt::domain::{Domain, JobStats, MigrateParameters};
use virt::error::ErrorNumber;
use virt::interface::Interface;
use virt::network::Network;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::sys;

use crate::checks::{DestProbe, EmulatorProbe, Probe, SourceProbe};
use crate::domxml::DomainXml;
use crate::hostfs;
use crate::job::JobSnapshot;

/// A libvirt call that failed, with libvirt's own message.
#[derive(Debug, Error)]
pub enum LibvirtError {
    #[error("Cannot connect to {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("Domain {name} not found on {uri}: {message}")]
    LookupDomain {
        name: String,
        uri: String,
        message: String,
    },
    #[error("Cannot read the XML of domain {name}: {message}")]
    GetXml { name: String, message: String },
    #[error("Cannot read the job of domain {name}: {message}")]
    GetJobStats { name: String, message: String },
    #[error("Cannot set the maximum downtime of {name}: {message}")]
    SetMaxDowntime { name: String, message: String },
    #[error("Migration of {name} failed: {message}")]
    Migrate { name: String, message: String },
    #[error("Cannot abort the job of domain {name}: {message}")]
    AbortJob { name: String, message: String },
}

/// libvirt prints every error to stderr unless told otherwise; ferry reports
/// the errors it cares about itself.
pub fn quiet_errors() {
    virt::error::clear_error_callback();
}

/// Whether a connection URI names the local host (`qemu:///system`,
/// `qemu+unix:///system?socket=...`), as opposed to `qemu+tcp://hostb/system`.
pub fn uri_is_local(uri: &str) -> bool {
    match uri.split_once("://") {
        Some((_, rest)) => {
            let authority = rest.split(['/', '?']).next().unwrap_or("");
            let host = authority.rsplit('@').next().unwrap_or("");
            host.is_empty() || host == "localhost"
        }
        None => true,
    }
}

/// An open libvirt connection and the URI it was opened with.
#[derive(Debug)]
pub struct Conn {
    inner: Connect,
    uri: String,
}

/// What `ferry migrate` asks libvirt for.
#[derive(Debug, Clone, Default)]
pub struct MigrateRequest {
    pub p2p: bool,
    pub tunnelled: bool,
    pub persistent: bool,
    pub undefine_source: bool,
    pub allow_unsafe: bool,
    /// Encrypt and authenticate the migration stream (VIR_MIGRATE_TLS).
    pub tls: bool,
    /// MiB/s.
    pub bandwidth: Option<u64>,
    /// Milliseconds.
    pub max_downtime: Option<u64>,
}

impl MigrateRequest {
    fn flags(&self) -> u32 {
        let mut f = sys::VIR_MIGRATE_LIVE;
        if self.p2p || self.tunnelled {
            f |= sys::VIR_MIGRATE_PEER2PEER;
        }
        if self.tunnelled {
            f |= sys::VIR_MIGRATE_TUNNELLED;
        }
        if self.persistent {
            f |= sys::VIR_MIGRATE_PERSIST_DEST;
        }
        if self.undefine_source {
            f |= sys::VIR_MIGRATE_UNDEFINE_SOURCE;
        }
        if self.allow_unsafe {
            f |= sys::VIR_MIGRATE_UNSAFE;
        }
        if self.tls {
            f |= sys::VIR_MIGRATE_TLS;
        }
        f
    }
}

fn element<'a>(xml: &'a str, path: &[&str]) -> Option<&'a str> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let mut node = doc.root_element();
    for name in path {
        node = node
            .children()
            .find(|c| c.is_element() && c.has_tag_name(*name))?;
    }
    // Map the node range back into the borrowed input.
    Some(&xml[node.range()])
}

fn element_text(xml: &str, path: &[&str]) -> Option<String> {
    let el = element(xml, path)?;
    let doc = roxmltree::Document::parse(el).ok()?;
    doc.root_element().text().map(|t| t.trim().to_owned())
}

impl Conn {
    /// Opens `uri` (libvirt's default URI when `None`).
    pub fn open(uri: Option<&str>) -> Result<Self, LibvirtError> {
        let inner = Connect::open(uri).map_err(|e| LibvirtError::Connect {
            uri: uri.unwrap_or("(default)").to_owned(),
            message: e.message().to_owned(),
        })?;
        let uri = inner
            .get_uri()
            .unwrap_or_else(|_| uri.unwrap_or("").to_owned());
        Ok(Conn { inner, uri })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn is_local(&self) -> bool {
        uri_is_local(&self.uri)
    }

    fn domain(&self, name: &str) -> Result<Domain, LibvirtError> {
        Domain::lookup_by_name(&self.inner, name).map_err(|e| LibvirtError::LookupDomain {
            name: name.to_owned(),
            uri: self.uri.clone(),
            message: e.message().to_owned(),
        })
    }

    /// The domain's XML as libvirt would send it to a destination
    /// (VIR_DOMAIN_XML_MIGRATABLE) and whether it is running. Read-only.
    pub fn domain_xml(&self, name: &str) -> Result<(String, bool), LibvirtError> {
        let dom = self.domain(name)?;
        let xml = dom
            .get_xml_desc(sys::VIR_DOMAIN_XML_MIGRATABLE)
            .map_err(|e| LibvirtError::GetXml {
                name: name.to_owned(),
                message: e.message().to_owned(),
            })?;
        Ok((xml, dom.is_active().unwrap_or(false)))
    }

    /// The current job (`completed = false`) or the last completed one.
    pub fn job_stats(&self, name: &str, completed: bool) -> Result<JobSnapshot, LibvirtError> {
        let dom = self.domain(name)?;
        let err = |e: virt::error::Error| LibvirtError::GetJobStats {
            name: name.to_owned(),
            message: e.message().to_owned(),
        };
        // virt 0.4/0.5 build a Vec from the params pointer even when libvirt
        // returns none (NULL, 0: no job), which is undefined behaviour and
        // aborts debug builds. Ask virDomainGetJobInfo first whether a job
        // runs. Completed statistics have no such pre-check: callers ask for
        // them only where a job has completed (see `ferry status --completed`).
        if !completed {
            let info = dom.get_job_info().map_err(err)?;
            if info.r#type == sys::VIR_DOMAIN_JOB_NONE as i32 {
                return Ok(JobSnapshot::default());
            }
        }
        let flags = if completed {
            // KEEP_COMPLETED: reading must not discard them (a later
            // `ferry status --completed` still finds them).
            sys::VIR_DOMAIN_JOB_STATS_COMPLETED | sys::VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
        } else {
            0
        };
        dom.get_job_stats(flags).map(|s| snapshot(&s)).map_err(err)
    }

    /// Aborts the domain's current job (virsh domjobabort; see the module docs).
    pub fn abort_job(&self, name: &str) -> Result<(), LibvirtError> {
        self.domain(name)?;
        let out = Command::new("virsh")
            .args(["-q", "-c", &self.uri, "domjobabort", "--", name])
            .output()
            .map_err(|e| LibvirtError::AbortJob {
                name: name.to_owned(),
                message: format!("cannot run virsh: {e}"),
            })?;
        if out.status.success() {
            Ok(())
        } else {
            let msg = String::from_utf8_lossy(&out.stderr);
            Err(LibvirtError::AbortJob {
                name: name.to_owned(),
                message: msg.trim().trim_start_matches("error: ").to_owned(),
            })
        }
    }

    /// Sets the downtime limit of the next (or running) migration.
    pub fn set_max_downtime(&self, name: &str, ms: u64) -> Result<(), LibvirtError> {
        self.domain(name)?
            .migrate_set_max_downtime(ms, 0)
            .map(|_| ())
            .map_err(|e| LibvirtError::SetMaxDowntime {
                name: name.to_owned(),
                message: e.message().to_owned(),
            })
    }

    /// Migrates `name`. Blocks until libvirt is done; poll [`Conn::job_stats`]
    /// from another thread meanwhile. Peer-to-peer uses virDomainMigrateToURI3
    /// (the source libvirtd connects to `dest_uri`); otherwise this process
    /// drives both daemons with virDomainMigrate3 over `dest`.
    pub fn migrate(
        &self,
        name: &str,
        dest: &Conn,
        req: &MigrateRequest,
    ) -> Result<(), LibvirtError> {
        let dom = self.domain(name)?;
        let params = MigrateParameters {
            bandwidth: req.bandwidth,
            ..Default::default()
        };
        let res = if req.p2p || req.tunnelled {
            dom.migrate_to_uri3(Some(dest.uri()), params, req.flags())
        } else {
            dom.migrate3(&dest.inner, params, req.flags()).map(|_| ())
        };
        res.map_err(|e| LibvirtError::Migrate {
            name: name.to_owned(),
            message: e.message().to_owned(),
        })
    }

    fn host_uuid(&self) -> Option<String> {
        let caps = self.inner.get_capabilities().ok()?;
        element_text(&caps, &["host", "uuid"])
    }
}

fn snapshot(s: &JobStats) -> JobSnapshot {
    JobSnapshot {
        job_type: s.r#type,
        operation: s.operation,
        time_elapsed_ms: s.time_elapsed,
        time_remaining_ms: s.time_remaining,
        data_total: s.data_total,
        data_processed: s.data_processed,
        data_remaining: s.data_remaining,
        mem_total: s.mem_total,
        mem_processed: s.mem_processed,
        mem_remaining: s.mem_remaining,
        mem_bps: s.mem_bps,
        mem_dirty_rate: s.mem_dirty_rate,
        mem_iteration: s.mem_iteration,
        downtime_ms: s.downtime,
        setup_time_ms: s.setup_time,
        auto_converge_throttle: s.auto_converge_throttle,
        error_message: s.error_message.clone(),
    }
}

/// The source side of the checks over a libvirt connection.
#[derive(Debug)]
pub struct LibvirtSource<'a> {
    pub conn: &'a Conn,
}

impl SourceProbe for LibvirtSource<'_> {
    fn is_shared_fs(&mut self, path: &str) -> Option<Result<bool, String>> {
        // Filesystem types are only visible from the host itself.
        self.conn.is_local().then(|| hostfs::is_shared_fs(path))
    }

    fn host_uuid(&mut self) -> Option<String> {
        self.conn.host_uuid()
    }

    fn host_cpu_xml(&mut self) -> Option<String> {
        let caps = self.conn.inner.get_capabilities().ok()?;
        element(&caps, &["host", "cpu"]).map(str::to_owned)
    }
}

/// The destination side of the checks over libvirt's remote API.
#[derive(Debug)]
pub struct LibvirtDest<'a> {
    pub conn: &'a Conn,
}

/// Name for the transient pools used to look up disk paths.
fn probe_pool_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "ferry-check-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

impl LibvirtDest<'_> {
    /// Looks `file` up in a pool that covers `dir`: an existing pool with that
    /// target, or a transient `dir` pool created for the lookup and destroyed after.
    fn path_via_pool(&self, dir: &str, file: &str, path: &str) -> Probe {
        let conn = &self.conn.inner;
        let lookup = |pool: &StoragePool| match StorageVol::lookup_by_name(pool, file) {
            Ok(_) => Probe::Present(format!("{path} exists on the destination")),
            Err(e) if e.code() == ErrorNumber::NoStorageVolume => {
                Probe::Missing(format!("no file {file} in {dir}"))
            }
            Err(e) => Probe::Unknown(e.message().to_owned()),
        };
        if let Ok(pool) = StoragePool::lookup_by_target_path(conn, dir) {
            if pool.is_active().unwrap_or(false) {
                let _ = pool.refresh(0);
                return lookup(&pool);
            }
        }
        let xml = format!(
            "<pool type='dir'><name>{}</name><target><path>{}</path></target></pool>",
            probe_pool_name(),
            xml_escape(dir)
        );
        match StoragePool::create_xml(conn, &xml, 0) {
            Ok(pool) => {
                let r = lookup(&pool);
                let _ = pool.destroy();
                r
            }
            Err(e) => {
                let m = e.message();
                if m.contains("No such file") || m.contains("cannot open") {
                    Probe::Missing(format!("directory {dir} does not exist there"))
                } else {
                    Probe::Unknown(m.to_owned())
                }
            }
        }
    }
}

impl DestProbe for LibvirtDest<'_> {
    fn path(&mut self, path: &str) -> Probe {
        if StorageVol::lookup_by_path(&self.conn.inner, path).is_ok() {
            return Probe::Present(format!("{path} is a storage volume on the destination"));
        }
        let p = std::path::Path::new(path);
        let (Some(dir), Some(file)) = (p.parent(), p.file_name()) else {
            return Probe::Unknown(format!("{path} is not an absolute file path"));
        };
        if dir.starts_with("/dev") {
            // A dir pool over /dev would open every device node; libvirt
            // checks block devices itself when the destination starts.
            return Probe::Unknown(
                "block devices are checked by libvirt when the destination starts".into(),
            );
        }
        self.path_via_pool(&dir.to_string_lossy(), &file.to_string_lossy(), path)
    }

    fn network(&mut self, name: &str) -> Probe {
        match Network::lookup_by_name(&self.conn.inner, name) {
            Ok(n) if n.is_active().unwrap_or(false) => Probe::Present("active".into()),
            Ok(_) => Probe::Missing("defined but not active".into()),
            Err(e) if e.code() == ErrorNumber::NoNetwork => Probe::Missing(e.message().to_owned()),
            Err(e) => Probe::Unknown(e.message().to_owned()),
        }
    }

    fn host_interface(&mut self, name: &str) -> Probe {
        match Interface::lookup_by_name(&self.conn.inner, name) {
            Ok(i) if i.is_active().unwrap_or(true) => Probe::Present("present".into()),
            Ok(_) => Probe::Missing("present but down".into()),
            Err(e) if e.code() == ErrorNumber::NoInterface => {
                Probe::Missing(e.message().to_owned())
            }
            Err(e) => Probe::Unknown(e.message().to_owned()),
        }
    }

    fn emulator(&mut self, dom: &DomainXml, path: &str) -> EmulatorProbe {
        let conn = &self.conn.inner;
        let arch = dom.arch.as_deref();
        let virt_type = Some(dom.virt_type.as_str());
        // First the binary alone, then with the domain's machine type.
        if let Err(e) = conn.get_domain_capabilities(Some(path), arch, None, virt_type, 0) {
            return EmulatorProbe::NoBinary(e.message().to_owned());
        }
        let Some(machine) = dom.machine.as_deref() else {
            return EmulatorProbe::Present {
                machine: None,
                ferry_version: None,
            };
        };
        match conn.get_domain_capabilities(Some(path), arch, Some(machine), virt_type, 0) {
            Ok(caps) => EmulatorProbe::Present {
                machine: element_text(&caps, &["machine"]).or(Some(machine.to_owned())),
                // libvirt does not expose the emulator's version string; the
                // machine type list is what tells ferry releases apart here,
                // and the destination hook compares `--version` exactly.
                ferry_version: None,
            },
            Err(e) => EmulatorProbe::NoMachine(e.message().to_owned()),
        }
    }

    fn compare_cpu(&mut self, dom: &DomainXml, cpu_xml: &str) -> Probe {
        if let Some(p) = hypervisor_cpu_compare(&self.conn.uri, dom, cpu_xml) {
            return p;
        }
        match self
            .conn
            .inner
            .compare_cpu(cpu_xml, sys::VIR_CONNECT_COMPARE_CPU_FAIL_INCOMPATIBLE)
        {
            Ok(sys::VIR_CPU_COMPARE_IDENTICAL) => Probe::Present("identical".into()),
            Ok(sys::VIR_CPU_COMPARE_SUPERSET) => Probe::Present("host CPU is a superset".into()),
            Ok(_) => Probe::Missing("incompatible".into()),
            Err(e) if e.code() == ErrorNumber::CpuIncompatible => {
                Probe::Missing(e.message().to_owned())
            }
            Err(e) => Probe::Unknown(e.message().to_owned()),
        }
    }

    fn host_uuid(&mut self) -> Option<String> {
        self.conn.host_uuid()
    }
}

/// `virsh hypervisor-cpu-compare` on the destination: the guest CPU against the
/// CPU the domain's emulator can create there (what decides whether the guest can
/// run), rather than against the host CPU libvirt reads itself, which knows
/// nothing of the features KVM and the emulator leave out. The `virt` crate has
/// no binding for virConnectCompareHypervisorCPU, hence virsh. `None` when virsh
/// is not installed.
fn hypervisor_cpu_compare(uri: &str, dom: &DomainXml, cpu_xml: &str) -> Option<Probe> {
    // A private file: random name, created O_EXCL and 0600, so nothing planted
    // in the shared temporary directory (a symlink at a guessable name) is
    // followed, and no other user reads or swaps the XML before virsh does.
    let file = match write_private_xml(cpu_xml) {
        Ok(f) => f,
        Err(e) => {
            return Some(Probe::Unknown(format!(
                "cannot write the guest CPU to a temporary file: {e}"
            )))
        }
    };
    let mut cmd = std::process::Command::new("virsh");
    cmd.args(["-q", "-c", uri, "hypervisor-cpu-compare", "--error"])
        .args(["--virttype", &dom.virt_type]);
    for (flag, value) in [
        ("--emulator", &dom.emulator),
        ("--arch", &dom.arch),
        ("--machine", &dom.machine),
    ] {
        if let Some(v) = value {
            cmd.args([flag, v]);
        }
    }
    let out = cmd.arg(file.path()).output();
    drop(file);
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Probe::Unknown(format!("cannot run virsh: {e}"))),
    };
    let said = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .map(|l| l.trim().trim_start_matches("error: ").to_owned())
            .filter(|l| !l.is_empty() && !l.starts_with("Failed to compare"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    Some(if out.status.success() {
        let text = said(&out.stdout);
        if text.contains("incompatible") {
            Probe::Missing(text)
        } else if text.contains("superset") {
            Probe::Present("the emulator's CPU there is a superset".into())
        } else {
            Probe::Present("the emulator's CPU there is identical".into())
        }
    } else {
        let text = said(&out.stderr);
        if text.contains("incompatible") {
            Probe::Missing(text)
        } else {
            Probe::Unknown(text)
        }
    })
}

/// `xml` in a new private file under the temporary directory, removed when
/// the handle drops.
fn write_private_xml(xml: &str) -> std::io::Result<tempfile::NamedTempFile> {
    use std::io::Write;
    let mut file = tempfile::Builder::new()
        .prefix("ferry-cpu-")
        .suffix(".xml")
        .tempfile()?;
    file.write_all(xml.as_bytes())?;
    file.flush()?;
    Ok(file)
}

/// How long to wait between two job-stats polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_and_remote_uris() {
        assert!(uri_is_local("qemu:///system"));
        assert!(uri_is_local("qemu+unix:///system?socket=/run/x.sock"));
        assert!(!uri_is_local("qemu+tcp://hostb/system"));
        assert!(!uri_is_local("qemu+ssh://root@10.77.0.2/system"));
    }

    /// The guest CPU XML for `virsh hypervisor-cpu-compare` never goes through
    /// a symlink planted at a name another user can guess: the file used to be
    /// `$TMPDIR/ferry-cpu-PID-N.xml`, written with a plain write that followed
    /// such a link and wrote the XML wherever it pointed.
    #[test]
    fn the_cpu_xml_file_follows_no_planted_symlink() {
        let victim_dir = tempfile::tempdir().unwrap();
        let victim = victim_dir.path().join("victim");
        let planted: Vec<_> = (0..16)
            .map(|n| {
                let link =
                    std::env::temp_dir().join(format!("ferry-cpu-{}-{n}.xml", std::process::id()));
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(&victim, &link).unwrap();
                link
            })
            .collect();
        let dom = DomainXml::parse("<domain type='kvm'><name>d</name></domain>").unwrap();
        let probe = hypervisor_cpu_compare("test:///nowhere", &dom, "<cpu>planted</cpu>");
        for link in &planted {
            let _ = std::fs::remove_file(link);
        }
        assert!(
            !victim.exists(),
            "the XML was written through a planted symlink ({probe:?})"
        );
        let file = write_private_xml("<cpu/>").unwrap();
        let meta = file.as_file().metadata().unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600
        );
        assert_eq!(std::fs::read_to_string(file.path()).unwrap(), "<cpu/>");
    }

    #[test]
    fn elements_are_found_by_path() {
        let caps = "<capabilities><host><uuid> a0 </uuid><cpu><arch>x86_64</arch></cpu></host></capabilities>";
        assert_eq!(element_text(caps, &["host", "uuid"]).as_deref(), Some("a0"));
        assert_eq!(
            element(caps, &["host", "cpu"]),
            Some("<cpu><arch>x86_64</arch></cpu>")
        );
    }
}
