//! ferry-oracle: check a dirtier guest memory image (and, with `--disk`, the
//! disk its `blk=K` driver wrote).
//!
//! EXIT STATUS: 0 the image (and disk) pass; 1 the oracle rejects one of them
//! (including "no dirtier header"); 2 usage error or an image cannot be read.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ferry_testguest::disk::{check_disk, DiskReport, SECTOR_SIZE};
use ferry_testguest::{check, FileImage, OracleError, OracleReport};

/// Check a raw memory image of the dirtier test guest (file offset = GPA - base).
#[derive(Debug, Parser)]
#[command(name = "ferry-oracle", version)]
struct Cli {
    /// Raw guest memory image, e.g. from QEMU's `pmemsave 0 SIZE FILE`.
    image: PathBuf,
    /// GPA of the image's first byte (decimal or 0x hex); at most 0x100000.
    #[arg(long, default_value = "0", value_parser = parse_u64)]
    base: u64,
    /// Print one JSON object instead of a one-line verdict.
    #[arg(long)]
    json: bool,
    /// Also check this raw disk image, written by the guest's `blk=K` driver,
    /// against the memory image's pass count (take both while the guest is stopped).
    #[arg(long, requires = "blk")]
    disk: Option<PathBuf>,
    /// The guest's `blk=K`: the records' sectors are 0..K.
    #[arg(long, requires = "disk", value_parser = clap::value_parser!(u64).range(1..))]
    blk: Option<u64>,
}

fn parse_u64(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|e| format!("not a number: {e}"))
}

fn verdict(report: &OracleReport) -> String {
    format!(
        "PASS: {} passes over {} pages (stride {}), cursor {}, fill {}, {} fill pages intact, \
         {} usable ranges, tsc {} kHz",
        report.passes,
        report.working_set_pages,
        report.stride,
        report.cursor,
        match (report.fill, report.fill_done) {
            (false, _) => "off",
            (true, false) => "running",
            (true, true) => "done",
        },
        report.filled_pages,
        report.ranges.len(),
        report.tsc_khz,
    )
}

fn disk_verdict(report: &DiskReport) -> String {
    format!(
        "; disk PASS: {} records in {} sectors{}",
        report.records,
        report.sectors,
        if report.ahead {
            ", next pass's record already written"
        } else {
            ""
        }
    )
}

/// The first `k` sectors of the disk image at `path`.
fn read_disk(path: &std::path::Path, k: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut disk = Vec::new();
    file.take(k.saturating_mul(SECTOR_SIZE as u64))
        .read_to_end(&mut disk)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(disk)
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = FileImage::open(&cli.image, cli.base)
        .map_err(|e| format!("cannot open {}: {e}", cli.image.display()))
        .map(|image| check(&image));
    let (code, json, line) = match result {
        Err(open) => (
            2,
            serde_json::json!({ "verdict": "error", "error": open }),
            format!("error: {open}"),
        ),
        Ok(Ok(report)) => match (&cli.disk, cli.blk) {
            (Some(path), Some(k)) => match read_disk(path, k) {
                Err(open) => (
                    2,
                    serde_json::json!({ "verdict": "error", "report": report, "error": open }),
                    format!("error: {open}"),
                ),
                Ok(disk) => match check_disk(&disk, k, report.passes) {
                    Ok(disk) => (
                        0,
                        serde_json::json!({ "verdict": "pass", "report": report, "disk": disk }),
                        verdict(&report) + &disk_verdict(&disk),
                    ),
                    Err(error) => (
                        1,
                        serde_json::json!({
                            "verdict": "fail", "report": report,
                            "kind": error.kind(), "error": error.to_string(),
                        }),
                        format!("FAIL: disk: {error}"),
                    ),
                },
            },
            _ => (
                0,
                serde_json::json!({ "verdict": "pass", "report": report }),
                verdict(&report),
            ),
        },
        Ok(Err(error)) => {
            let text = error_chain(&error);
            let (code, verdict) = if error.is_io() {
                (2, "error")
            } else {
                (1, "fail")
            };
            let json =
                serde_json::json!({ "verdict": verdict, "kind": error.kind(), "error": text });
            let line = match error {
                OracleError::ReadMemory { .. } => format!("error: {text}"),
                _ => format!("FAIL: {text}"),
            };
            (code, json, line)
        }
    };
    if cli.json {
        println!("{json}");
    } else {
        println!("ferry-oracle: {line}");
    }
    ExitCode::from(code)
}
