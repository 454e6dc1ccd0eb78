//! TLS for migration channels, configured the way QEMU's `tls-creds-x509` and
//! `tls-creds-psk` objects are (and so libvirt's `--tls`):
//!
//! - x509: a directory with `ca-cert.pem` (always), `server-cert.pem` +
//!   `server-key.pem` (a server, i.e. the destination) or `client-cert.pem` +
//!   `client-key.pem` (a client, i.e. the source: optional unless the server verifies
//!   its peer), and optionally `ca-crl.pem`. `verify-peer` (default on) makes a server
//!   demand a client certificate signed by the CA and a client check the server's
//!   certificate and its name (the `tls-hostname` parameter, or the host of the
//!   `tcp:` URI).
//! - PSK: a directory with `keys.psk`, lines `USERNAME:HEXKEY`; the client presents
//!   `username` (default `qemu`) and its key, the server looks the name up.
//!
//! Every connection of a migration (the main one and each extra page stream)
//! completes a handshake before a byte of the migration stream moves: a peer without
//! valid credentials is refused before it learns anything about the VM.
//!
//! A TLS session cannot be read and written through two independent descriptors, and
//! the migration engine reads the return path on one thread while it writes pages on
//! another. So after the handshake the socket turns non-blocking, both halves share the
//! session behind a mutex held only for one non-blocking `SSL_read`/`SSL_write`, and
//! each half waits for the socket with `poll(2)` outside the lock.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::{TimeVal, TimeValLike};
use openssl::error::ErrorStack;
use openssl::pkey::PKey;
use openssl::ssl::{
    ErrorCode, HandshakeError, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslMode,
    SslOptions, SslStream, SslVerifyMode, SslVersion,
};
use openssl::x509::store::{X509Lookup, X509StoreBuilder};
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::{X509Crl, X509};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which side of a connection credentials are for (QEMU's `endpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// Connects: the migration source.
    Client,
    /// Listens: the migration destination.
    Server,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

/// What a set of credentials is made of, as QEMU's objects describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredsSpec {
    /// `tls-creds-x509`: certificates in `dir`.
    X509 { dir: PathBuf, verify_peer: bool },
    /// `tls-creds-psk`: `dir/keys.psk`; `username` is what a client presents.
    Psk { dir: PathBuf, username: String },
}

impl CredsSpec {
    /// Parses ferry-vm's form: `x509:DIR[,verify-peer=on|off]` or
    /// `psk:DIR[,username=NAME]`.
    pub fn parse(s: &str) -> Result<Self, TlsError> {
        let bad = |why: &str| {
            TlsError::Spec(format!(
                "'{s}': {why}; use x509:DIR[,verify-peer=on|off] or psk:DIR[,username=NAME]"
            ))
        };
        let (kind, rest) = s.split_once(':').ok_or_else(|| bad("no kind"))?;
        let mut parts = rest.split(',');
        let dir = PathBuf::from(parts.next().unwrap_or_default());
        if dir.as_os_str().is_empty() {
            return Err(bad("no directory"));
        }
        let mut spec = match kind {
            "x509" => Self::X509 {
                dir,
                verify_peer: true,
            },
            "psk" => Self::Psk {
                dir,
                username: "qemu".into(),
            },
            _ => return Err(bad("unknown kind")),
        };
        for opt in parts {
            let (k, v) = opt
                .split_once('=')
                .ok_or_else(|| bad("option without '='"))?;
            match (&mut spec, k) {
                (Self::X509 { verify_peer, .. }, "verify-peer") => {
                    *verify_peer = match v {
                        "on" | "yes" | "true" => true,
                        "off" | "no" | "false" => false,
                        _ => return Err(bad("verify-peer takes on or off")),
                    }
                }
                (Self::Psk { username, .. }, "username") if !v.is_empty() => {
                    *username = v.to_string();
                }
                _ => return Err(bad("unknown option")),
            }
        }
        Ok(spec)
    }
}

/// Errors of TLS credentials.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("bad TLS credentials {0}")]
    Spec(String),
    #[error("cannot read TLS credentials {}: {source}{hint}", path.display())]
    Read {
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("TLS credentials {}: {what}: {detail}", path.display())]
    Invalid {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("cannot set up TLS: {0}")]
    Setup(#[from] ErrorStack),
}

/// Why a TLS session could not be set up on one connection (the
/// credentials loaded; [`TlsError`] is for those).
#[derive(Debug, thiserror::Error)]
pub enum TlsSessionError {
    #[error("cannot start TLS: {0}")]
    Start(#[source] ErrorStack),
    #[error(
        "no hostname to check the destination's certificate against: set the tls-hostname \
         parameter (a unix: or fd: URI names no host)"
    )]
    NoHostname,
    #[error("cannot check the destination's certificate against '{name}': {source}")]
    Hostname {
        name: String,
        #[source]
        source: ErrorStack,
    },
    #[error("cannot configure the socket: {0}")]
    Socket(#[source] io::Error),
    #[error("the {peer} did not complete the TLS handshake within {secs} s")]
    Timeout { peer: &'static str, secs: u64 },
    #[error("TLS handshake failed: the {peer}'s certificate is not accepted: {verify} ({detail})")]
    CertificateRefused {
        peer: &'static str,
        verify: String,
        detail: String,
    },
    #[error(
        "TLS handshake failed: {detail}{}",
        if *psk { " (with PSK: do both ends hold the same key for the same username in keys.psk?)" } else { "" }
    )]
    Handshake { detail: String, psk: bool },
    #[error("cannot confirm the TLS session: {0}")]
    Confirm(String),
    #[error("the destination is not a ferry TLS endpoint")]
    NotFerry,
    #[error("the destination refused the TLS session: {0}")]
    Refused(String),
    #[error(
        "TLS needs a socket; this is a file or a pipe (use tcp:, unix: or an fd: socket, or \
         turn TLS off)"
    )]
    NotASocket,
    #[error("TLS needs a socket; a file: migration cannot use it")]
    FileListener,
    #[error("the TLS credentials are for a {have} endpoint; the {side} needs endpoint={want}")]
    WrongEndpoint {
        have: &'static str,
        side: &'static str,
        want: &'static str,
    },
    #[error("cannot duplicate the socket: {0}")]
    Dup(#[source] io::Error),
}

const X509_HINT: &str = " (an x509 credentials directory holds ca-cert.pem, and \
server-cert.pem + server-key.pem for the destination or client-cert.pem + client-key.pem \
for the source, as QEMU's tls-creds-x509 expects)";
const PSK_HINT: &str = " (a PSK credentials directory holds keys.psk with lines \
USERNAME:HEXKEY, as QEMU's tls-creds-psk expects)";

/// Loaded credentials for one endpoint: cheap to clone, shared by every connection
/// of a migration.
#[derive(Clone)]
pub struct TlsCreds(Arc<Inner>);

struct Inner {
    spec: CredsSpec,
    endpoint: Endpoint,
    ctx: SslContext,
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCreds")
            .field("spec", &self.0.spec)
            .field("endpoint", &self.0.endpoint)
            .finish_non_exhaustive()
    }
}

impl PartialEq for TlsCreds {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

fn read_file(path: &Path, hint: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        hint,
        source,
    })
}

fn invalid<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(ErrorStack) -> TlsError + 'a {
    move |e| TlsError::Invalid {
        path: path.to_path_buf(),
        what,
        detail: e.to_string(),
    }
}

/// Reads `keys.psk`: `USERNAME:HEXKEY` per line.
fn read_psk_keys(path: &Path) -> Result<Vec<(String, Vec<u8>)>, TlsError> {
    let text = read_file(path, PSK_HINT)?;
    let text = String::from_utf8_lossy(&text);
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |detail: String| TlsError::Invalid {
            path: path.to_path_buf(),
            what: "not a PSK key file",
            detail: format!("line {}: {detail}; expected USERNAME:HEXKEY", n + 1),
        };
        let (user, hex) = line.split_once(':').ok_or_else(|| bad("no ':'".into()))?;
        let key = decode_hex(hex).ok_or_else(|| bad("the key is not hexadecimal".into()))?;
        if user.is_empty() || key.is_empty() || key.len() > 256 {
            return Err(bad("empty name, or a key empty or over 256 bytes".into()));
        }
        keys.push((user.to_string(), key));
    }
    Ok(keys)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl TlsCreds {
    /// Loads and checks credentials for `endpoint` (QEMU loads them when the object is
    /// created, so a bad directory fails there, not mid-migration).
    pub fn load(spec: CredsSpec, endpoint: Endpoint) -> Result<Self, TlsError> {
        let mut b = SslContext::builder(SslMethod::tls())?;
        b.set_options(SslOptions::NO_TICKET | SslOptions::IGNORE_UNEXPECTED_EOF);
        // Whole writes (one SSL_write encrypts a whole buffer into records, not one
        // record per call) and read-ahead (fewer read(2) calls per record). On this
        // project's 2-core machine TLS is CPU-bound anyway (see README, Measured).
        b.set_mode(SslMode::AUTO_RETRY | SslMode::ACCEPT_MOVING_WRITE_BUFFER);
        b.set_read_ahead(true);
        match &spec {
            CredsSpec::X509 { dir, verify_peer } => {
                b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
                load_x509(&mut b, dir, endpoint, *verify_peer)?;
            }
            CredsSpec::Psk { dir, username } => {
                // TLS 1.3 runs the PSK callbacks with TLS_AES_128_GCM_SHA256.
                b.set_min_proto_version(Some(SslVersion::TLS1_3))?;
                load_psk(&mut b, dir, endpoint, username)?;
            }
        }
        Ok(Self(Arc::new(Inner {
            spec,
            endpoint,
            ctx: b.build(),
        })))
    }

    pub fn endpoint(&self) -> Endpoint {
        self.0.endpoint
    }

    pub fn spec(&self) -> &CredsSpec {
        &self.0.spec
    }

    /// Runs the handshake on `sock` (blocking, bounded by [`HANDSHAKE_TIMEOUT`]) and
    /// returns the two halves of the session. `hostname` is the name a client checks
    /// the server's certificate against.
    pub(crate) fn handshake(
        &self,
        sock: OwnedFd,
        hostname: Option<&str>,
    ) -> Result<(TlsReader, TlsWriter), TlsSessionError> {
        let mut ssl = Ssl::new(&self.0.ctx).map_err(TlsSessionError::Start)?;
        let verify_name = matches!(
            self.0.spec,
            CredsSpec::X509 {
                verify_peer: true,
                ..
            }
        ) && self.0.endpoint == Endpoint::Client;
        if verify_name {
            let name = hostname
                .filter(|h| !h.is_empty())
                .ok_or(TlsSessionError::NoHostname)?;
            let hostname_error = |source| TlsSessionError::Hostname {
                name: name.to_string(),
                source,
            };
            match name.parse::<IpAddr>() {
                Ok(ip) => ssl.param_mut().set_ip(ip),
                Err(_) => {
                    ssl.set_hostname(name).map_err(hostname_error)?;
                    ssl.param_mut().set_host(name)
                }
            }
            .map_err(hostname_error)?;
        }
        let timeout = TimeVal::milliseconds(HANDSHAKE_TIMEOUT.as_millis() as i64);
        let set_timeouts = |t: TimeVal| {
            setsockopt(&sock, sockopt::ReceiveTimeout, &t)
                .and_then(|()| setsockopt(&sock, sockopt::SendTimeout, &t))
                .map_err(|e| TlsSessionError::Socket(e.into()))
        };
        set_timeouts(timeout)?;
        let file = File::from(sock.try_clone().map_err(TlsSessionError::Socket)?);
        let done = match self.0.endpoint {
            Endpoint::Client => ssl.connect(file),
            Endpoint::Server => ssl.accept(file),
        };
        let psk = matches!(self.0.spec, CredsSpec::Psk { .. });
        let mut stream = done.map_err(|e| handshake_error(e, self.0.endpoint, psk))?;
        // In TLS 1.3 a server checks the client's certificate after the client has
        // finished its part of the handshake: the server's first byte tells the client
        // that it was accepted, so a refusal shows here and not as a broken stream.
        match self.0.endpoint {
            Endpoint::Server => stream
                .write_all(&[ACCEPTED])
                .map_err(|e| TlsSessionError::Confirm(io_reason(&e)))?,
            Endpoint::Client => {
                let mut b = [0u8; 1];
                match stream.read_exact(&mut b) {
                    Ok(()) if b[0] == ACCEPTED => {}
                    Ok(()) => return Err(TlsSessionError::NotFerry),
                    Err(e) => return Err(TlsSessionError::Refused(io_reason(&e))),
                }
            }
        }
        set_timeouts(TimeVal::zero())?;
        let socket_error = |e: nix::Error| TlsSessionError::Socket(e.into());
        let flags = fcntl(&sock, FcntlArg::F_GETFL).map_err(socket_error)?;
        fcntl(
            &sock,
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        )
        .map_err(socket_error)?;
        let shared = Arc::new(Session {
            ssl: Mutex::new(stream),
            sock,
        });
        Ok((TlsReader(Arc::clone(&shared)), TlsWriter(shared)))
    }
}

/// The byte a server sends once it accepted a client (see `handshake`).
const ACCEPTED: u8 = 0xf5;

/// The readable part of an I/O error that OpenSSL produced: its reason ("tlsv1
/// alert unknown ca", "certificate verify failed", ...) rather than the whole stack.
fn io_reason(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return "the connection closed (its credentials were not accepted, or it is not \
                a TLS endpoint)"
            .into();
    }
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<openssl::ssl::Error>())
        .map_or_else(|| e.to_string(), ssl_reason)
}

fn ssl_reason(e: &openssl::ssl::Error) -> String {
    e.ssl_error()
        .and_then(|stack| stack.errors().first())
        .and_then(|first| first.reason())
        .map_or_else(|| e.to_string(), str::to_string)
}

fn handshake_error(e: HandshakeError<File>, endpoint: Endpoint, psk: bool) -> TlsSessionError {
    let peer = match endpoint {
        Endpoint::Client => "destination",
        Endpoint::Server => "source",
    };
    match e {
        HandshakeError::SetupFailure(e) => TlsSessionError::Start(e),
        HandshakeError::WouldBlock(_) => TlsSessionError::Timeout {
            peer,
            secs: HANDSHAKE_TIMEOUT.as_secs(),
        },
        HandshakeError::Failure(mid) => {
            let verify = mid.ssl().verify_result();
            let detail = ssl_reason(mid.error());
            if verify.as_raw() != 0 {
                TlsSessionError::CertificateRefused {
                    peer,
                    verify: verify.error_string().to_string(),
                    detail,
                }
            } else {
                TlsSessionError::Handshake { detail, psk }
            }
        }
    }
}

fn load_x509(
    b: &mut SslContextBuilder,
    dir: &Path,
    endpoint: Endpoint,
    verify_peer: bool,
) -> Result<(), TlsError> {
    let ca_path = dir.join("ca-cert.pem");
    let ca_pem = read_file(&ca_path, X509_HINT)?;
    let cas = X509::stack_from_pem(&ca_pem).map_err(invalid(&ca_path, "not a PEM certificate"))?;
    if cas.is_empty() {
        return Err(TlsError::Invalid {
            path: ca_path,
            what: "not a PEM certificate",
            detail: "no certificate in the file".into(),
        });
    }
    let mut store = X509StoreBuilder::new()?;
    for ca in cas {
        store.add_cert(ca)?;
    }
    let crl_path = dir.join("ca-crl.pem");
    if crl_path.exists() {
        // Parsed first for a readable error; the store loads it from the file.
        let crl_pem = read_file(&crl_path, X509_HINT)?;
        X509Crl::from_pem(&crl_pem).map_err(invalid(&crl_path, "not a PEM CRL"))?;
        store
            .add_lookup(X509Lookup::file())?
            .load_crl_file(&crl_path, SslFiletype::PEM)
            .map_err(invalid(&crl_path, "not a PEM CRL"))?;
        store.set_flags(X509VerifyFlags::CRL_CHECK)?;
    }
    b.set_verify_cert_store(store.build())?;
    let (cert_name, key_name) = match endpoint {
        Endpoint::Server => ("server-cert.pem", "server-key.pem"),
        Endpoint::Client => ("client-cert.pem", "client-key.pem"),
    };
    let (cert_path, key_path) = (dir.join(cert_name), dir.join(key_name));
    // A client's own certificate is optional unless the server asks for one.
    let own = endpoint == Endpoint::Server || cert_path.exists() || key_path.exists();
    if own {
        let cert_pem = read_file(&cert_path, X509_HINT)?;
        let mut chain = X509::stack_from_pem(&cert_pem)
            .map_err(invalid(&cert_path, "not a PEM certificate"))?
            .into_iter();
        let leaf = chain.next().ok_or_else(|| TlsError::Invalid {
            path: cert_path.clone(),
            what: "not a PEM certificate",
            detail: "no certificate in the file".into(),
        })?;
        b.set_certificate(&leaf)?;
        for extra in chain {
            b.add_extra_chain_cert(extra)?;
        }
        let key_pem = read_file(&key_path, X509_HINT)?;
        let key = PKey::private_key_from_pem(&key_pem).map_err(invalid(
            &key_path,
            "not an unencrypted PEM private key (encrypted keys are not supported)",
        ))?;
        b.set_private_key(&key)?;
        b.check_private_key().map_err(|e| TlsError::Invalid {
            path: key_path.clone(),
            what: "does not match its certificate",
            detail: format!("{} ({e})", cert_path.display()),
        })?;
    }
    b.set_verify(match (endpoint, verify_peer) {
        (_, false) => SslVerifyMode::NONE,
        (Endpoint::Client, true) => SslVerifyMode::PEER,
        (Endpoint::Server, true) => SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
    });
    Ok(())
}

fn load_psk(
    b: &mut SslContextBuilder,
    dir: &Path,
    endpoint: Endpoint,
    username: &str,
) -> Result<(), TlsError> {
    let path = dir.join("keys.psk");
    let keys = read_psk_keys(&path)?;
    match endpoint {
        Endpoint::Client => {
            let key = keys
                .into_iter()
                .find(|(u, _)| u == username)
                .map(|(_, k)| k)
                .ok_or_else(|| TlsError::Invalid {
                    path: path.clone(),
                    what: "has no key for this username",
                    detail: format!("no line starts with '{username}:'"),
                })?;
            let identity = username.as_bytes().to_vec();
            b.set_psk_client_callback(move |_, _, id_out, key_out| {
                if identity.len() >= id_out.len() || key.len() > key_out.len() {
                    return Ok(0);
                }
                id_out[..identity.len()].copy_from_slice(&identity);
                id_out[identity.len()] = 0;
                key_out[..key.len()].copy_from_slice(&key);
                Ok(key.len())
            });
        }
        Endpoint::Server => {
            b.set_psk_server_callback(move |_, identity, key_out| {
                let Some(id) = identity else { return Ok(0) };
                let found = keys.iter().find(|(u, _)| u.as_bytes() == id);
                match found {
                    Some((_, k)) if k.len() <= key_out.len() => {
                        key_out[..k.len()].copy_from_slice(k);
                        Ok(k.len())
                    }
                    // An unknown name: the handshake fails.
                    _ => Ok(0),
                }
            });
        }
    }
    Ok(())
}

/// One TLS session shared by its two halves.
struct Session {
    ssl: Mutex<SslStream<File>>,
    sock: OwnedFd,
}

impl Session {
    /// Runs one non-blocking TLS operation under the lock, waiting for the socket
    /// outside it until the operation can complete.
    fn run(
        &self,
        mut op: impl FnMut(&mut SslStream<File>) -> Result<usize, openssl::ssl::Error>,
    ) -> io::Result<usize> {
        loop {
            let wait = {
                let mut ssl = self
                    .ssl
                    .lock()
                    .map_err(|_| io::Error::other("TLS session lock poisoned"))?;
                match op(&mut ssl) {
                    Ok(n) => return Ok(n),
                    Err(e) => match e.code() {
                        ErrorCode::WANT_READ => PollFlags::POLLIN,
                        ErrorCode::WANT_WRITE => PollFlags::POLLOUT,
                        ErrorCode::ZERO_RETURN => return Ok(0),
                        ErrorCode::SYSCALL if e.io_error().is_none() => return Ok(0),
                        _ => {
                            let reason = ssl_reason(&e);
                            return Err(match e.into_io_error() {
                                Ok(io) => io,
                                Err(_) => io::Error::other(format!("TLS: {reason}")),
                            });
                        }
                    },
                }
            };
            let mut fds = [PollFd::new(self.sock.as_fd(), wait)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(io::Error::from(e)),
            }
        }
    }
}

/// The reading half of a TLS channel.
pub struct TlsReader(Arc<Session>);
/// The writing half of a TLS channel.
pub struct TlsWriter(Arc<Session>);

impl std::fmt::Debug for TlsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsReader(fd {})", self.0.sock.as_raw_fd())
    }
}

impl std::fmt::Debug for TlsWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsWriter(fd {})", self.0.sock.as_raw_fd())
    }
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.0.run(|s| s.ssl_read(buf))
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.0.run(|s| s.ssl_write(buf))
    }

    /// Every completed `SSL_write` has handed its records to the socket.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            CredsSpec::parse("x509:/etc/pki/qemu").unwrap(),
            CredsSpec::X509 {
                dir: "/etc/pki/qemu".into(),
                verify_peer: true
            }
        );
        assert_eq!(
            CredsSpec::parse("x509:/d,verify-peer=off").unwrap(),
            CredsSpec::X509 {
                dir: "/d".into(),
                verify_peer: false
            }
        );
        assert_eq!(
            CredsSpec::parse("psk:/k,username=alice").unwrap(),
            CredsSpec::Psk {
                dir: "/k".into(),
                username: "alice".into()
            }
        );
        for bad in [
            "x509",
            "x509:",
            "tls:/d",
            "psk:/d,verify-peer=on",
            "x509:/d,verify-peer=maybe",
        ] {
            let e = CredsSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("x509:DIR"), "{bad}: {e}");
        }
    }

    #[test]
    fn psk_key_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.psk");
        std::fs::write(&path, "qemu:00112233\n\nalice:ff\n").unwrap();
        let keys = read_psk_keys(&path).unwrap();
        assert_eq!(keys[0], ("qemu".into(), vec![0, 0x11, 0x22, 0x33]));
        assert_eq!(keys[1], ("alice".into(), vec![0xff]));
        for bad in ["qemu", "qemu:xyz1", "qemu:123", ":00"] {
            std::fs::write(&path, bad).unwrap();
            let e = read_psk_keys(&path).unwrap_err().to_string();
            assert!(e.contains("USERNAME:HEXKEY"), "{bad}: {e}");
        }
        let e = TlsCreds::load(
            CredsSpec::Psk {
                dir: dir.path().join("missing"),
                username: "qemu".into(),
            },
            Endpoint::Client,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("keys.psk") && e.contains("No such file"), "{e}");
    }

    #[test]
    fn a_missing_x509_directory_names_the_file() {
        let e = TlsCreds::load(
            CredsSpec::X509 {
                dir: "/nonexistent/pki".into(),
                verify_peer: true,
            },
            Endpoint::Server,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/nonexistent/pki/ca-cert.pem") && e.contains("server-key.pem"),
            "{e}"
        );
    }
}
