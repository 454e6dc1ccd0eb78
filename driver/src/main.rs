//! `ferry`: see `ferry --help`.

fn main() {
    std::process::exit(ferry_driver::run(std::env::args().collect()));
}
