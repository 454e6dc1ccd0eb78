//! ferry-qemu: parses a QEMU command line, sets up the QMP monitors and runs
//! the QMP loop over the backend chosen at startup (`process::select_backend`).

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("FERRY_QEMU_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    std::process::exit(ferry_qemu::process::run(&args));
}
