//! `NodeEngine`: the operator's command line.

fn main() {
    std::process::exit(nodeengine::cli::main_with(std::env::args_os()));
}
