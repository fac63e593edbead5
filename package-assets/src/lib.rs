//! What the packages ship that is generated from the code, so it never
//! drifts from it: man pages (section 8: all three binaries are
//! administration commands) and shell completions from the clap definitions
//! the binaries parse with, and NodeEngine's default conf.json. `cargo xtask
//! man` and `cargo xtask package` run this crate's binary.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::{Generator, Shell};

/// Every binary's command line, named as installed.
pub fn commands() -> Vec<clap::Command> {
    vec![
        netmanager::cli::Cli::command(),
        nodeengine::cli::Cli::command(),
        nodeengine::daemon::DaemonArgs::command(),
    ]
}

/// The shells we ship completions for, and where Debian puts them
/// (relative to `/usr/share`).
pub const SHELLS: &[(Shell, &str)] = &[
    (Shell::Bash, "bash-completion/completions"),
    (Shell::Zsh, "zsh/vendor-completions"),
    (Shell::Fish, "fish/vendor_completions.d"),
];

/// Writes `man/man8/<bin>[-<subcommand>].8` and the completions under
/// `out/share` (laid out as below `/usr/share`) and the default
/// `out/etc/oakestra/conf.json`; returns the files written.
pub fn write_all(out: &Path) -> Result<Vec<PathBuf>> {
    let mut written = vec![write_default_conf(out)?];
    let out = &out.join("share");
    for cmd in commands() {
        written.extend(write_man(out, cmd.clone())?);
        for (shell, dir) in SHELLS {
            written.push(write_completion(out, cmd.clone(), *shell, dir)?);
        }
    }
    Ok(written)
}

/// NodeEngine's default configuration as `NodeEngine config default` writes
/// it (upstream's compact format); the package marks it a conffile.
fn write_default_conf(out: &Path) -> Result<PathBuf> {
    let path = out.join("etc/oakestra/conf.json");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    nodeengine::config::Config::default()
        .save(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The command's page and one per (visible) subcommand, e.g.
/// `NetManager-config-check.8`, which the parent's page refers to.
fn write_man(out: &Path, cmd: clap::Command) -> Result<Vec<PathBuf>> {
    fn pages(cmd: clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            pages(sub, dir, written)?;
        }
        let man = clap_mangen::Man::new(cmd)
            .section("8")
            .manual("Oakestra worker");
        let path = dir.join(man.get_filename());
        let mut buf = Vec::new();
        man.render(&mut buf).context("rendering a man page")?;
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
        Ok(())
    }
    let dir = out.join("man/man8");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Built, so subcommands carry their full names (`NetManager-config`).
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    pages(cmd, &dir, &mut written)?;
    Ok(written)
}

fn write_completion(
    out: &Path,
    mut cmd: clap::Command,
    shell: Shell,
    dir: &str,
) -> Result<PathBuf> {
    let dir = out.join(dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = cmd.get_name().to_string();
    // bash-completion loads a command's completions on demand from a file
    // named exactly like the command.
    let file = match shell {
        Shell::Bash => name.clone(),
        _ => shell.file_name(&name),
    };
    let path = dir.join(file);
    let mut f =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    clap_complete::generate(shell, &mut cmd, &name, &mut f);
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every page renders with man(1) and names every subcommand and flag;
    /// every completion script is valid for its shell.
    #[test]
    fn pages_and_completions_cover_every_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = write_all(dir.path()).expect("generate");
        let man = dir.path().join("share/man/man8");
        for page in [
            "NetManager.8",
            "NetManager-config-check.8",
            "NetManager-teardown.8",
            "NetManager-logs.8",
            "NodeEngine.8",
            "NodeEngine-config-check.8",
            "NodeEngine-config-network-manual.8",
            "nodeengined.8",
        ] {
            assert!(man.join(page).is_file(), "{page} missing: {files:?}");
        }
        let rendered = |page: &str| {
            let out = std::process::Command::new("man")
                .arg("-l")
                .arg(man.join(page))
                .env("MANWIDTH", "200")
                .output()
                .expect("man");
            assert!(out.status.success(), "man -l {page}");
            // groff typesets hyphens as U+2010 in UTF-8 locales.
            String::from_utf8_lossy(&out.stdout).replace(['\u{2010}', '\u{2212}'], "-")
        };
        let nm = rendered("NetManager.8");
        for text in ["NetManager-teardown(8)", "--log-format", "--bpf-dir"] {
            assert!(nm.contains(text), "{text:?} not in NetManager(8):\n{nm}");
        }
        let check = rendered("NodeEngine-config-check.8");
        assert!(check.contains("--mqtt-port"), "{check}");
        assert!(rendered("nodeengined.8").contains("CONTAINERD_NAMESPACE"));

        let conf = dir.path().join("etc/oakestra/conf.json");
        let text = std::fs::read_to_string(&conf).expect("conf.json");
        assert_eq!(
            nodeengine::config::Config::parse(&text, &conf).expect("parses"),
            nodeengine::config::Config::default()
        );
        assert!(
            !text.contains('\n') || text.trim_end().lines().count() == 1,
            "compact: {text}"
        );

        for (shell, dir_name) in SHELLS {
            for bin in ["NetManager", "NodeEngine", "nodeengined"] {
                let file = match shell {
                    Shell::Bash => bin.to_string(),
                    _ => shell.file_name(bin),
                };
                let path = dir.path().join("share").join(dir_name).join(file);
                let text = std::fs::read_to_string(&path).expect("completion");
                assert!(text.contains("teardown") || bin != "NetManager", "{path:?}");
                if *shell == Shell::Bash {
                    let ok = std::process::Command::new("bash")
                        .arg("-n")
                        .arg(&path)
                        .status()
                        .expect("bash");
                    assert!(ok.success(), "bash -n {}", path.display());
                }
            }
        }
    }
}
