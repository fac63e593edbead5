//! `oakestra-cli-docs OUT`: man pages and completions under OUT, laid out as
//! below /usr/share.

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1) else {
        eprintln!("usage: oakestra-cli-docs OUT_DIR");
        return ExitCode::from(2);
    };
    match oakestra_cli_docs::write_all(std::path::Path::new(&out)) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("oakestra-cli-docs: {e:#}");
            ExitCode::FAILURE
        }
    }
}
