//! `NodeEngine config csi add|remove|list` edits conf.json's `csi_drivers`
//! in upstream's format, exactly, starting from the upstream-written fixture.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const FIXTURE: &str = include_str!("fixtures/conf.json");

fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("conf.json");
    std::fs::write(&conf, FIXTURE).expect("copy fixture");
    (dir, conf)
}

fn ne(conf: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_NodeEngine"))
        .arg("--config")
        .arg(conf)
        .args(args)
        .output()
        .expect("run NodeEngine")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fixture_with(drivers: &str) -> String {
    FIXTURE.trim_end().replace(
        "\"csi_drivers\":null",
        &format!("\"csi_drivers\":{drivers}"),
    )
}

#[test]
fn add_list_update_remove_round_trip_exactly() {
    let (_d, conf) = setup();
    let empty = ne(&conf, &["config", "csi", "list"]);
    assert!(empty.status.success());
    assert!(stdout(&empty).contains("no CSI drivers configured"));

    let add = ne(
        &conf,
        &[
            "config",
            "csi",
            "add",
            "csi.oakestra.io/hostpath",
            "unix:///var/lib/oakestra/csi/hostpath.sock",
        ],
    );
    assert!(add.status.success(), "{}", stderr(&add));
    assert_eq!(
        std::fs::read_to_string(&conf).expect("conf"),
        fixture_with(
            r#"[{"csi_driver_name":"csi.oakestra.io/hostpath","csi_driver_endpoint":"unix:///var/lib/oakestra/csi/hostpath.sock"}]"#
        )
    );
    assert!(
        ne(
            &conf,
            &["config", "csi", "add", "nfs.csi.k8s.io", "/run/nfs.sock"]
        )
        .status
        .success()
    );
    // Adding an existing name changes its endpoint, in place.
    let update = ne(
        &conf,
        &[
            "config",
            "csi",
            "add",
            "csi.oakestra.io/hostpath",
            "/run/hp.sock",
        ],
    );
    assert!(update.status.success());
    assert!(stdout(&update).contains("updated"));
    assert_eq!(
        std::fs::read_to_string(&conf).expect("conf"),
        fixture_with(
            r#"[{"csi_driver_name":"csi.oakestra.io/hostpath","csi_driver_endpoint":"/run/hp.sock"},{"csi_driver_name":"nfs.csi.k8s.io","csi_driver_endpoint":"/run/nfs.sock"}]"#
        )
    );
    // Bare `config csi` lists too.
    for args in [&["config", "csi", "list"][..], &["config", "csi"]] {
        let list = ne(&conf, args);
        assert!(list.status.success());
        let text = stdout(&list);
        assert!(
            text.lines()
                .any(|l| l.starts_with("csi.oakestra.io/hostpath") && l.ends_with("/run/hp.sock")),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("nfs.csi.k8s.io") && l.ends_with("/run/nfs.sock")),
            "{text}"
        );
    }

    assert!(
        ne(&conf, &["config", "csi", "remove", "nfs.csi.k8s.io"])
            .status
            .success()
    );
    assert!(
        ne(
            &conf,
            &["config", "csi", "remove", "csi.oakestra.io/hostpath"]
        )
        .status
        .success()
    );
    assert_eq!(
        std::fs::read_to_string(&conf).expect("conf"),
        fixture_with("[]")
    );
}

#[test]
fn bad_input_changes_nothing() {
    let (_d, conf) = setup();
    for args in [
        &["config", "csi", "add", "x", "tcp://10.0.0.1:9000"][..],
        &["config", "csi", "add", "x", "relative.sock"],
        &["config", "csi", "add", " ", "/run/x.sock"],
        &["config", "csi", "remove", "not-there"],
    ] {
        let out = ne(&conf, args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(!stderr(&out).is_empty());
        assert_eq!(
            std::fs::read_to_string(&conf).expect("conf"),
            FIXTURE,
            "{args:?}"
        );
    }
}
