//! ferry-tuning(7): migration tuning, the stream/checkpoint format and its
//! compatibility rules. The defaults come from `MigrationParams::default()` and
//! the layout tables are read from `engine/format/src/lib.rs`'s documentation,
//! so the page changes when they do.

use ferry_format::{Limits, FORMAT_VERSION};
use ferry_vmm::migration::{MigrationParams, TimeoutPolicy};

use crate::roff::Doc;

/// The format crate's documentation, the source of the layout tables.
const FORMAT_DOC: &str = include_str!("../../engine/format/src/lib.rs");

/// Renders the `# Layout` part of the format crate's docs (up to the next
/// top-level heading): `##` headings, paragraphs and tables.
fn layout(doc: &mut Doc) -> Result<(), String> {
    let lines: Vec<&str> = FORMAT_DOC
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect();
    let start = lines
        .iter()
        .position(|l| *l == "# Layout")
        .ok_or("engine/format/src/lib.rs has no '# Layout' section")?;
    let body: Vec<&str> = lines[start + 1..]
        .iter()
        .copied()
        .take_while(|l| !(l.starts_with("# ")))
        .collect();
    let mut i = 0;
    let mut tables = 0;
    while i < body.len() {
        let l = body[i];
        if l.trim().is_empty() {
            i += 1;
        } else if let Some(h) = l.strip_prefix("## ") {
            doc.ss(h);
            i += 1;
        } else if l.starts_with('|') {
            let end = body[i..]
                .iter()
                .position(|l| !l.starts_with('|'))
                .map_or(body.len(), |n| i + n);
            doc.md_table(&body[i..end]);
            tables += 1;
            i = end;
        } else {
            let end = body[i..]
                .iter()
                .position(|l| l.trim().is_empty() || l.starts_with('|') || l.starts_with('#'))
                .map_or(body.len(), |n| i + n);
            doc.p(&body[i..end].join(" "));
            i = end;
        }
    }
    if tables < 4 {
        return Err(format!(
            "expected the layout tables in engine/format/src/lib.rs, found {tables}"
        ));
    }
    Ok(())
}

fn ms(v: u64, zero: &str) -> String {
    if v == 0 {
        zero.to_string()
    } else {
        format!("{v} ms")
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

pub fn page() -> Result<String, String> {
    let d = MigrationParams::default();
    let mut doc = Doc::new("ferry-tuning", "7", true);
    doc.sh("NAME");
    doc.raw(r"ferry\-tuning \- ferry live migration tuning, the stream and checkpoint format, and its compatibility rules");

    doc.sh("DESCRIPTION");
    doc.p(
        "ferry migrates a running guest by iterative pre-copy over one versioned, \
         checksummed stream, which is also its checkpoint format:",
    );
    for (n, step) in [
        "Handshake: the VM's shape (RAM layout, vCPUs, devices) goes first; the \
         destination refuses a mismatch before any page moves, and its error text \
         travels back to the source.",
        "Pass 1 sends every non-zero page (zero pages are skipped: the destination's \
         RAM is fresh); dirty logging is on from there.",
        "Each later pass sends what the guest dirtied during the previous one.",
        "After each pass, expected downtime = (dirty bytes + device state) / measured \
         bandwidth. Within the downtime limit, ferry switches over.",
        "Switch-over: the vCPUs stop, a final dirty sync, the remaining pages, vCPU, VM \
         and device state, an optional digest of all RAM, then End. The destination \
         verifies, loads, resumes (or waits) and confirms; only then is the source \
         freed. A failure before that leaves the source running.",
    ]
    .iter()
    .enumerate()
    {
        doc.tp(&format!("{}.", n + 1), step);
    }

    doc.sh("TUNING");
    doc.p(
        "Each knob is set on `ferry-vm`'s control socket with `migrate-set KEY=VALUE` \
         (also while a migration runs), through QMP on `ferry-qemu` where QEMU has the \
         same parameter (which is how libvirt and `virsh` set them), or with `ferry \
         migrate` options.",
    );
    let header: Vec<String> = ["migrate-set KEY", "VALUE", "default"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let timeout = match d.on_timeout {
        TimeoutPolicy::Cancel => "cancel",
        TimeoutPolicy::ForceSwitchover => "switchover",
    };
    let rows: Vec<Vec<String>> = [
        [
            "downtime-limit",
            "milliseconds",
            &ms(d.downtime_limit_ms, "none"),
        ],
        [
            "max-bandwidth",
            "bytes/s, 0 = unlimited",
            if d.max_bandwidth == 0 {
                "unlimited"
            } else {
                "capped"
            },
        ],
        ["auto-converge", "on, off", on_off(d.auto_converge)],
        ["dirty-limit", "on, off", on_off(d.dirty_limit)],
        ["verify", "on, off", on_off(d.verify_digest)],
        [
            "max-total-time",
            "milliseconds, 0 = none",
            &ms(d.max_total_time_ms, "none"),
        ],
        ["on-timeout", "cancel, switchover", timeout],
        [
            "pause-before-switchover",
            "on, off (then `migrate-continue`)",
            on_off(d.pause_before_switchover),
        ],
        [
            "multifd-channels",
            "page streams, 1-16",
            &d.multifd_channels.to_string(),
        ],
        ["clear-dirty-log", "on, off", on_off(d.clear_dirty_log)],
        ["postcopy", "on, off (below)", on_off(d.postcopy)],
        ["tls-creds", "x509:DIR, psk:DIR, none (below)", "none"],
        ["tls-hostname", "a name", "the tcp: host"],
    ]
    .iter()
    .map(|[key, value, default]| vec![format!("`{key}`"), value.to_string(), default.to_string()])
    .collect();
    doc.table(&header, &rows, &[false; 3]);
    doc.p(
        "Through ferry-qemu (QMP), libvirt and `ferry migrate`, only the downtime limit, \
         the bandwidth cap and pause-before-switchover can be set (see each knob), and \
         through ferry-qemu and libvirt also the page streams (QMP's `multifd` \
         capability and `multifd-channels`) and the throttle: QMP's `auto-converge` \
         capability (`virsh migrate --auto-converge`, Nova's \
         live_migration_permit_auto_converge) switches from ferry's adaptive throttle to \
         QEMU's steps, `cpu-throttle-initial` (20), `cpu-throttle-increment` (10), \
         `cpu-throttle-tailslow`, `max-cpu-throttle` (99) and \
         `throttle-trigger-threshold` (50) as QEMU defines them (libvirt's \
         `--auto-converge-initial` and `--auto-converge-increment`); the dirty limit \
         carries on past `max-cpu-throttle` either way. QMP's `postcopy-ram` capability \
         (`virsh migrate --postcopy`) is `postcopy`, and `migrate-start-postcopy` \
         (`virsh migrate-postcopy`, `--postcopy-after-precopy`) switches. The others keep \
         their defaults there. `multifd-compression` takes only `none` (ferry sends no \
         zero page and each other page once per pass; `zlib` and `zstd` are refused with \
         that reason); `multifd-zlib-level` and `multifd-zstd-level` are kept and \
         reported as QEMU does, and change nothing: they apply to compression. \
         `max-postcopy-bandwidth` (`virsh migrate --postcopy-bandwidth`; ferry-vm's \
         `postcopy-bandwidth`) caps post-copy's rest instead of `max-bandwidth`, 0 \
         unlimited, as in QEMU.",
    );

    doc.ss("Post-copy");
    doc.p(
        "With `postcopy` on (before the migration starts), `migrate-start-postcopy` \
         switches the migration in flight at its next batch: the guest stops on the \
         source, its vCPU and device state go ahead of the pages still to come, and the \
         destination runs it at once (ferry-qemu under `-S`: at `cont`, as libvirt sends \
         it). A page the guest, a device or KVM touches before it came waits while the \
         destination asks for it (`postcopy-requests`); the source sends such pages ahead \
         of the rest, which it sends in address order (`postcopy-bytes`). A missing page \
         the source never listed was zero there and is zero-filled at once. The \
         destination needs userfaultfd (CAP_SYS_PTRACE, `vm.unprivileged_userfaultfd`, or \
         /dev/userfaultfd) and checks it at the handshake; post-copy takes one page \
         stream and no `verify`. libvirt 9.0 (Debian 12) runs the emulator unprivileged \
         and without /dev/userfaultfd, so its destination hosts need \
         `sysctl vm.unprivileged_userfaultfd=1`, as QEMU's do; without it `virsh migrate \
         --postcopy` fails at once, the guest running on, with QEMU's \"Postcopy is not \
         supported\" and this fix.",
    );
    doc.p(
        "The price is the failure case: from the switch on, the only whole copy of the \
         guest is split between the hosts. If the link or the destination fails, the \
         source stays paused (never running twice) and the guest is lost unless the \
         destination comes back; ferry has no post-copy recovery yet \
         (`postcopy-paused`, `migrate-recover`). Use it where a guest outruns its link \
         and the dirty limit's slowdown is worse than that risk.",
    );

    doc.ss("Downtime limit");
    doc.p(
        "The longest the guest may be paused at switch-over. Once a pass's expected \
         downtime is within it, ferry makes up to five more passes while each still \
         shrinks the rest by a quarter (the guest keeps running meanwhile), then switches \
         over; the pause is then usually far below the limit. A lower limit means more \
         passes; a guest that dirties memory faster than the link drains it never gets \
         under a low limit without throttling.",
    );
    doc.p(
        "Also: QMP `migrate-set-parameters` `downtime-limit`; `virsh \
         migrate-setmaxdowntime`; `ferry migrate --max-downtime MS`.",
    );
    doc.ss("Bandwidth");
    doc.p(
        "A cap on the migration stream, applied from the moment it is set. Unlimited by \
         default; cap it to leave room for other traffic on the link. The expected \
         downtime is computed from the bandwidth measured, not the cap.",
    );
    doc.p(
        "Also: QMP `migrate-set-parameters` `max-bandwidth` (bytes/s); `virsh \
         migrate-setspeed` and `ferry migrate --bandwidth` (MiB/s).",
    );
    doc.ss("Throttling (auto-converge, dirty-limit)");
    doc.p(&format!(
        "If the guest dirties memory faster than half the bandwidth for two passes in a \
         row, ferry takes away just enough vCPU time that the dirty rate falls to half \
         the bandwidth, and at least 5 points or half the time left more after each pass \
         that still outruns the link (up to {}%: QEMU's max-cpu-throttle). Throttled \
         vCPUs nap in periods of 20 ms, so the guest stalls no longer than that. The \
         throttle is lifted at switch-over.",
        d.max_throttle_pct
    ));
    doc.p(
        "A percentage does not bound a dirty rate: how many pages a guest rewrites in \
         its last 1% of the time depends on the host (the cost of a dirty-logging write \
         fault differs between kernels). With `dirty-limit` on (the default), a \
         throttle at its maximum that still does not converge goes on halving the \
         vCPUs' time, down to 0.02% (runs of 200 us, naps of up to 1 s), until the \
         dirty rate fits the link: every migration then ends, within about six passes \
         past the maximum. query-migrate reports the nap per cycle past the maximum as \
         `dirty-limit-throttle-time-per-round` (us). `dirty-limit=off` stops at the \
         maximum, as QEMU does; a migration may then never end (set `max-total-time`).",
    );
    doc.ss("Digest verify");
    doc.p(
        "With `verify` on, the source sends a digest of all guest RAM after the final \
         pages, and the destination compares it with its own before it resumes the \
         guest; a mismatch fails the migration and the source keeps running. It costs \
         one read of all RAM on each side during the downtime.",
    );
    doc.ss("Time cap");
    doc.p(
        "With `max-total-time`, a migration that has not converged by then is cancelled \
         (`on-timeout=cancel`, the source keeps running) or switched over whatever the \
         downtime (`on-timeout=switchover`).",
    );
    doc.ss("Parallel streams (multifd-channels)");
    doc.p(&format!(
        "With `multifd-channels=N`, the source proposes N connections in the handshake \
         (at most {}); the destination takes at most its `ferry-vm incoming \
         --max-streams` and the source opens the extra connections to the same `tcp:` \
         or `unix:` address, each naming the session token of the handshake and its \
         number. Pages are split by address into 256 KiB stripes, so a page always \
         travels on the same stream; the destination refuses a page on the wrong stream \
         and a connection with a wrong token, and loads the vCPU and device state only \
         after every stream has ended. More streams shorten the migration of a guest \
         that rewrites all its memory where there are cores to spare.",
        ferry_vmm::migration::MAX_STREAMS
    ));
    doc.p(&format!(
        "Also: QMP `migrate-set-capabilities` `multifd` with `migrate-set-parameters` \
         `multifd-channels` (1 to {}; QEMU's default of 2) on both ferry-qemu processes, \
         which is what `virsh migrate --parallel --parallel-connections N` sends. The \
         source proposes `multifd-channels` streams and fails the migration, naming both \
         numbers, if the destination takes fewer (multifd off there, or fewer channels), \
         as QEMU does; the source keeps running. A destination takes at most its \
         `multifd-channels`, and as many as a source with fewer offers. With multifd on, \
         `fd:`, `exec:` and `file:` URIs are refused on both sides (`multifd is not \
         supported by current protocol`), as in QEMU 7.2.",
        ferry_vmm::migration::MAX_STREAMS
    ));
    doc.ss("Encryption and authentication (tls-creds)");
    doc.p(
        "With `tls-creds`, every connection of the migration (the main one and each \
         extra page stream) completes a TLS handshake before any byte of the stream \
         moves; the destination demands the same with `ferry-vm incoming --tls-creds` \
         (through ferry-qemu: a `tls-creds-x509` or `tls-creds-psk` object named by the \
         `tls-creds` migration parameter, which is what libvirt's `--tls` sets up). The \
         credentials are laid out as QEMU reads them. x509: DIR holds `ca-cert.pem` \
         (optionally `ca-crl.pem`), `server-cert.pem` and `server-key.pem` on the \
         destination, `client-cert.pem` and `client-key.pem` on the source; with \
         `verify-peer` (the default) the destination refuses a source without a \
         certificate signed by the CA, and the source refuses a destination whose \
         certificate the CA did not sign or that does not name `tls-hostname` (or the \
         host of the `tcp:` URI; `unix:` and `fd:` need `tls-hostname`). PSK: \
         DIR/keys.psk holds `USERNAME:HEXKEY` lines; the source presents `username` \
         (default `qemu`) and both ends must hold the same key (TLS 1.3). A destination \
         refuses a connection whose handshake fails, logs it and keeps waiting for the \
         real source; the source's migration fails before any page moves and the guest \
         runs on. Encrypted private keys are not supported; `file:` and pipes cannot \
         carry TLS. ferry-bench --tls none,x509,psk measures the cost.",
    );
    doc.ss("Dead links");
    doc.p(&format!(
        "TCP migration connections carry TCP_USER_TIMEOUT and keep-alive probes: a link \
         that stops carrying packets (a cut cable, a host gone) fails the migration after \
         about {} s instead of the kernel's default of about 15 minutes, and the source \
         runs on (or stays paused, if the destination may already run the guest).",
        ferry_vmm::migration::transport::DEAD_LINK_TIMEOUT.as_secs()
    ));
    doc.ss("Manual dirty-log protection (clear-dirty-log)");
    doc.p("With `clear-dirty-log` on, where the kernel offers \
         KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, reading the dirty log no longer re-protects \
         guest memory; each 8 MiB chunk is re-protected right before its pages are read, \
         so a page written between the dirty sync and the copy is sent once, not again \
         in the next pass. It is off by default: on an idle machine it made \
         whole-memory-dirtying guests slower to migrate here; on a loaded one it \
         shortened them.");
    doc.ss("Pause before switch-over");
    doc.p(
        "With `pause-before-switchover`, the source stops its vCPUs and waits in the \
         `pre-switchover` state until `migrate-continue`, so that the management layer \
         can act (libvirt uses this) before the final state is sent.",
    );
    doc.p(
        "Also: the QMP migration capability `pause-before-switchover` and QMP \
         `migrate-continue`; libvirt turns it on for its own migrations.",
    );

    doc.sh("STREAM AND CHECKPOINT FORMAT");
    doc.p(
        "A checkpoint is a migration into a file: the same stream, read by `ferry-vm \
         restore` or `ferry-vm incoming file:PATH`. The layout, from ferry's format \
         crate:",
    );
    layout(&mut doc)?;

    doc.sh("COMPATIBILITY");
    doc.p(&format!(
        "This ferry writes and reads stream format version {FORMAT_VERSION}. The rules \
         that let streams and checkpoints outlive releases:"
    ));
    for (tag, rule) in [
        (
            "Format version",
            "A stream with a newer format version than the reader knows, or any preamble \
             flag set, is refused before anything is read. A new format version is only \
             for changes the section rules below cannot express.",
        ),
        (
            "Unknown critical sections",
            "A section whose id the reader does not know and whose CRITICAL flag is set \
             is refused, naming the id: the writer said the VM cannot run correctly \
             without it.",
        ),
        (
            "Unknown optional sections",
            "A section whose id is unknown and CRITICAL is clear is skipped (its checksum \
             still verified and it still counts towards End), so a newer writer can add \
             information an older reader may ignore.",
        ),
        (
            "Per-section versions",
            "Every section carries its own payload layout version. A known section in a \
             version the reader does not support is refused. Payloads are field-keyed \
             CBOR: fields added with defaults do not bump the version; a breaking change \
             does, with an explicit upgrade of the old version where it can be read.",
        ),
        (
            "Damage",
            "A bad checksum, a length over its limit, a truncated stream, trailing data \
             after End or counts in End that do not match what was read are refused \
             with a message naming them, and nothing is applied to a VM that then runs.",
        ),
    ] {
        doc.tp(tag, rule);
    }
    doc.p(&format!(
        "Default limits: {} MiB for any section, {} MiB for a CBOR section, {} pages per \
         RAM batch.",
        Limits::DEFAULT_MAX_SECTION_LEN >> 20,
        Limits::DEFAULT_MAX_CBOR_LEN >> 20,
        Limits::DEFAULT_MAX_BATCH_PAGES
    ));

    doc.sh("SEE ALSO");
    doc.raw(r"\fBferry\fR(1), \fBferry\-vm\fR(1), \fBferry\-qemu\fR(1)");
    Ok(doc.finish())
}
