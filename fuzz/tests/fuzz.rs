//! The fuzz campaigns as tests: each target runs its committed corpus
//! unmutated (regression seeds included), then mutates for `FERRY_FUZZ_SECS`
//! (default 15 s) from a printed seed. `FERRY_FUZZ_REGEN=1` rewrites the
//! generated seeds of the corpus first.

use ferry_fuzz::{argv, load_corpus, qmp, stream, Fuzzer, Outcome, Target, SERIAL};

fn campaign(target: Target) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let fuzzer = Fuzzer::from_env(target);
    if let Ok(path) = std::env::var("FERRY_FUZZ_REPLAY") {
        let input = std::fs::read(&path).expect("read the input to replay");
        match fuzzer.replay(&input) {
            Ok(o) => eprintln!("replayed {path}: {o:?}"),
            Err(c) => panic!("{c}"),
        }
        return;
    }
    match fuzzer.run() {
        Ok(report) => assert!(
            report.corpus_inputs > 0,
            "the corpus of {} is empty",
            fuzzer.target.name
        ),
        Err(crash) => panic!("{crash}"),
    }
}

#[test]
fn fuzz_receiver() {
    let kvm = stream::require_kvm_or_skip();
    campaign(stream::receiver_target(kvm));
}

#[test]
fn fuzz_checkpoint() {
    let kvm = stream::require_kvm_or_skip();
    campaign(stream::checkpoint_target(kvm));
}

#[test]
fn fuzz_qmp() {
    campaign(qmp::qmp_target());
}

#[test]
fn fuzz_argv() {
    campaign(argv::argv_target());
}

/// The valid seeds must be accepted whole: a target that refused everything
/// would fuzz nothing.
#[test]
fn valid_seeds_are_accepted() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    regenerate_if_asked();
    let kvm = stream::require_kvm_or_skip();
    for (name, input) in load_corpus("receiver").expect("receiver corpus") {
        if name.starts_with("seed-") {
            assert_eq!(
                stream::read_format_only(&input).map(|_| ()),
                Ok(()),
                "{name}"
            );
            if kvm {
                let o = (stream::receiver_target(true).exec)(&input);
                assert_eq!(o, Outcome::Handled("receiver: loaded".into()), "{name}");
            }
        }
    }
    for (name, input) in load_corpus("checkpoint").expect("checkpoint corpus") {
        if name.starts_with("seed-") && kvm {
            let o = (stream::checkpoint_target(true).exec)(&input);
            assert_eq!(o, Outcome::Handled("checkpoint: restored".into()), "{name}");
        }
    }
    let mut returned = 0;
    for (name, input) in load_corpus("qmp").expect("qmp corpus") {
        if let Outcome::Handled(c) = qmp::exec_qmp(&input) {
            if name.starts_with("seed-") && c.split('|').any(|p| p == "return") {
                returned += 1;
            }
        } else {
            panic!("{name}: a seed violates a QMP property");
        }
    }
    assert!(returned > 0, "no QMP seed produced a successful return");
    let mut machines = 0;
    for (name, input) in load_corpus("argv").expect("argv corpus") {
        match argv::exec_argv(&input) {
            Outcome::Handled(c) if c == "machine" || c == "probe" => machines += 1,
            Outcome::Handled(_) => {}
            Outcome::Violation(v) => panic!("{name}: {v}"),
        }
    }
    assert!(machines > 0, "no argv seed parsed into a machine");
}

/// A change to a stream's handshake, for a hand-made regression seed.
type ShapeEdit = fn(&mut ferry_vmm::migration::Handshake);

/// `FERRY_FUZZ_REGEN=1`: writes the generated seeds into fuzz/corpus/.
fn regenerate_if_asked() {
    if std::env::var("FERRY_FUZZ_REGEN").as_deref() != Ok("1") {
        return;
    }
    let dir = |t: &str| ferry_fuzz::corpus_dir(t);
    let (ckpt, mig) = stream::generate_seeds().expect("generate stream seeds");
    std::fs::write(dir("checkpoint").join("seed-vm8m-2cpu.ckpt"), &ckpt).expect("write");
    std::fs::write(dir("receiver").join("seed-vm8m-2cpu-digest.mig"), &mig).expect("write");

    // Regression seeds for the shape checks (engine/vmm/src/checkpoint.rs, check_shape).
    for (target, seed) in [("checkpoint", &ckpt), ("receiver", &mig)] {
        let cases: [(&str, ShapeEdit); 4] = [
            ("regress-shape-zero-vcpus", |h| h.shape.vcpus = 0),
            ("regress-shape-65-vcpus", |h| h.shape.vcpus = 65),
            ("regress-shape-ram-sum-overflow", |h| {
                h.shape.ram_ranges = vec![(0, 1 << 63), (1 << 63, 1 << 63)]
            }),
            ("regress-shape-no-ram", |h| h.shape.ram_ranges.clear()),
        ];
        for (name, f) in cases {
            let bytes = stream::with_shape(seed, f).expect("a Shape section");
            std::fs::write(dir(target).join(format!("{name}.bin")), bytes).expect("write");
        }
    }

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let reference = std::path::Path::new("/work/shared/reference/libvirt/fake");
    for corpus in ["corpus-kvm.jsonl", "corpus-tcg.jsonl"] {
        let Ok(text) = std::fs::read_to_string(reference.join(corpus)) else {
            continue;
        };
        for (i, seed) in qmp::seeds_from_reference(&text, 12).into_iter().enumerate() {
            // Keep the corpus small: the schema dumps are large and say little.
            if seed.len() < 16 << 10 {
                let name = format!("seed-{}-{i:02}.jsonl", corpus.trim_end_matches(".jsonl"));
                std::fs::write(dir("qmp").join(name), seed).expect("write");
            }
        }
    }
    // libvirt's domain conversations (start, migrate, cancel, ...), the small ones.
    let convs = std::fs::read_to_string(root.join("qmp-shim/tests/fixtures/conversations.jsonl"))
        .expect("read conversations.jsonl");
    for line in convs.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("conversation line");
        let mut out = Vec::new();
        for (i, step) in v["steps"].as_array().into_iter().flatten().enumerate() {
            let mut cmd = step["cmd"].clone();
            cmd["id"] = serde_json::json!(format!("libvirt-{i}"));
            out.extend_from_slice(cmd.to_string().as_bytes());
            out.push(b'\n');
        }
        let name = v["conv"]
            .as_str()
            .unwrap_or("conv")
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_");
        if !out.is_empty() && out.len() < 8 << 10 {
            std::fs::write(dir("qmp").join(format!("seed-conv-{name}.jsonl")), out).expect("write");
        }
    }

    let argv_lines =
        std::fs::read_to_string(root.join("qmp-shim/tests/fixtures/libvirt-argv.jsonl"))
            .expect("read libvirt-argv.jsonl");
    for (i, line) in argv_lines.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).expect("argv line");
        let args: Vec<String> = v["argv"]
            .as_array()
            .expect("argv array")
            .iter()
            .skip(1)
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        std::fs::write(
            dir("argv").join(format!("seed-libvirt-{i:02}.args")),
            argv::input_of(&args),
        )
        .expect("write");
    }
}

/// Oversized frames are refused from the header alone, before any payload is
/// read or allocated: a stream with nothing after the header must fail with
/// "too large", not "truncated".
#[test]
fn oversized_sections_are_refused_before_reading() {
    use ferry_format::{FormatError, Limits, SectionId, StreamReader, StreamWriter};
    let limits = Limits::default();
    let preamble = StreamWriter::new(Vec::new(), "ferry-fuzz")
        .expect("writer")
        .get_ref()
        .clone();
    let ids = SectionId::KNOWN.into_iter().chain([SectionId::Unknown(99)]);
    for id in ids {
        for length in [limits.max_payload_len(id) + 1, u64::MAX] {
            for flags in [0u16, 1] {
                let mut bytes = preamble.clone();
                bytes.extend_from_slice(&id.as_u32().to_le_bytes());
                bytes.extend_from_slice(&1u16.to_le_bytes());
                bytes.extend_from_slice(&flags.to_le_bytes());
                bytes.extend_from_slice(&length.to_le_bytes());
                bytes.extend_from_slice(&[0u8; 8]);
                let (mut r, _) = StreamReader::new(&bytes[..], limits).expect("preamble");
                let mut buf = Vec::new();
                match r.next_section(&mut buf) {
                    Err(FormatError::SectionTooLarge { .. }) => {}
                    // An unknown critical section is refused even before its length.
                    Err(FormatError::UnknownCriticalSection { .. }) if !id.is_known() => {}
                    other => panic!("{id} of {length} bytes (flags {flags}): {other:?}"),
                }
                assert!(
                    buf.capacity() < 1 << 20,
                    "{id}: allocated {}",
                    buf.capacity()
                );
            }
        }
    }
}

/// Every page address from the wire is checked against the guest's RAM: a
/// valid stream with one RAM entry moved to each edge is refused by name.
#[test]
fn pages_outside_guest_ram_are_refused() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !stream::require_kvm_or_skip() {
        return;
    }
    let (_, seed) = load_corpus("receiver")
        .expect("receiver corpus")
        .into_iter()
        .find(|(n, _)| n.starts_with("seed-"))
        .expect("a valid receiver seed");
    let raw = stream::RawStream::split(&seed);
    let ranges = raw.ram_ranges();
    let end = ranges.iter().map(|r| r.0 + r.1).max().expect("RAM ranges");
    let ram_index = raw
        .sections
        .iter()
        .position(|s| s.id == ferry_format::SectionId::RamPages.as_u32())
        .expect("a RAM section");
    for gpa in [end, end + 0x1000, 1 << 40, !0xfff, 0xfffb_c000] {
        let mut m = raw.clone();
        let entry = &mut m.sections[ram_index].payload[8..16];
        let flags = u64::from_le_bytes(entry.try_into().expect("8 bytes")) & 0xfff;
        entry.copy_from_slice(&(gpa | flags).to_le_bytes());
        let input = m.assemble(true, None);
        if let Outcome::Violation(v) = (stream::receiver_target(true).exec)(&input) {
            panic!("GPA {gpa:#x}: {v}");
        }
        let e = stream::restore_error(&input).expect("a page outside RAM is refused");
        assert!(
            e.contains("outside this VM's RAM") || e.contains("extends past"),
            "GPA {gpa:#x}: {e}"
        );
    }
}
