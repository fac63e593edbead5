//! `oakestra-package-assets OUT`: man pages and completions under
//! `OUT/share` (laid out as below /usr/share), the default conf.json under
//! `OUT/etc`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1) else {
        eprintln!("usage: oakestra-package-assets OUT_DIR");
        return ExitCode::from(2);
    };
    match oakestra_package_assets::write_all(std::path::Path::new(&out)) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("oakestra-package-assets: {e:#}");
            ExitCode::FAILURE
        }
    }
}
