//! ferry-qemu: parses a QEMU command line, sets up the QMP monitors and runs
//! the QMP loop over the backend chosen at startup (`process::select_backend`).

fn main() {
    // First, before anything opens a file: which fds were passed to us at
    // exec; `fd=N`, `-add-fd fd=N`, `-incoming fd:N`, `migrate fd:N` take
    // only those.
    if let Err(e) = ferry_kvm::fd::record_inherited() {
        eprintln!("ferry-qemu: cannot list inherited file descriptors in /proc/self/fd: {e}");
        std::process::exit(ferry_qemu::process::EXIT_FAILURE);
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("FERRY_QEMU_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    std::process::exit(ferry_qemu::process::run(&args));
}
