//! In a test target with `harness = false`, `#[test]` compiles to nothing:
//! such a test would silently never run. Every workspace test target on the
//! kit's harness must list its tests in `testkit::main!` instead.

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// (crate directory, test name) of every `[[test]]` with `harness = false`.
fn harnessless_targets(root: &Path) -> Vec<(PathBuf, String)> {
    let top = std::fs::read_to_string(root.join("Cargo.toml")).expect("workspace Cargo.toml");
    let members = top
        .split("members = [")
        .nth(1)
        .and_then(|r| r.split(']').next())
        .expect("workspace members");
    let mut found = Vec::new();
    for m in members.split(',').map(|m| m.trim().trim_matches('"')) {
        let dir = root.join(m);
        let Ok(manifest) = std::fs::read_to_string(dir.join("Cargo.toml")) else {
            continue;
        };
        for block in manifest.split("[[test]]").skip(1) {
            let block = block.split("\n[").next().unwrap_or("");
            if !block.contains("harness = false") {
                continue;
            }
            let name = block
                .lines()
                .find_map(|l| l.trim().strip_prefix("name = "))
                .map(|n| n.trim_matches('"').to_string())
                .expect("a [[test]] with a name");
            found.push((dir.clone(), name));
        }
    }
    found
}

#[test]
fn kit_harness_files_declare_their_tests_in_main() {
    let targets = harnessless_targets(&workspace());
    assert!(
        !targets.is_empty(),
        "no harness = false targets found: is the scan broken?"
    );
    for (dir, name) in targets {
        let file = dir.join("tests").join(format!("{name}.rs"));
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            text.contains("testkit::main!"),
            "{} has harness = false but no testkit::main!",
            file.display()
        );
        for attr in ["#[test]", "#[tokio::test"] {
            assert!(
                !text.contains(attr),
                "{} uses {attr}, which never runs without the standard harness: \
                 list the test in testkit::main! instead",
                file.display()
            );
        }
    }
}
