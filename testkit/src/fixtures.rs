//! Upstream's own documents (nodeengine's fixtures) and what the tests of
//! nodeengined build from them: the configuration pointed at the cluster
//! double, deploy documents, and the offline test image.

use std::path::Path;

use serde_json::Value;

use crate::image::ImageSpec;
use crate::runners::nodeengine::conf;

/// An upstream-written /etc/oakestra/conf.json (compact JSON, `null` lists,
/// a unikernel virtualization and the FLOps addon).
pub const NODE_CONF: &str = include_str!("../../nodeengine/tests/fixtures/conf.json");

pub use crate::cluster::JOB_TEMPLATE;

/// The image nodeengined's containerd tests run.
pub const TEST_IMAGE: &str = "docker.io/library/nodeengine-test:latest";

/// Busybox applets nodeengined's tests call in their containers.
pub const TEST_APPLETS: &[&str] = &[
    "sh", "sleep", "echo", "cat", "env", "hostname", "ls", "true", "false", "id", "unshare",
    "head", "tail", "wc", "seq", "dd",
];

/// The busybox image under [`TEST_IMAGE`], with a variable of its own.
pub fn test_image() -> ImageSpec<'static> {
    test_image_named(TEST_IMAGE)
}

/// The test image under another name; change `cmd`, `entrypoint`,
/// `files` or `user` with struct update syntax.
pub fn test_image_named(name: &str) -> ImageSpec<'_> {
    ImageSpec {
        name,
        applets: TEST_APPLETS,
        env: &["PATH=/bin", "IMAGE_VAR=from-image"],
        ..ImageSpec::default()
    }
}

/// [`NODE_CONF`] pointed at a cluster on 127.0.0.1:`cluster_port`, the
/// overlay off, app logs in `app_logs`.
pub fn node_conf(cluster_port: u16, app_logs: &Path, containerd: bool) -> Value {
    let base = serde_json::from_str(NODE_CONF).expect("the conf.json fixture is JSON");
    conf(
        base,
        "127.0.0.1",
        cluster_port,
        app_logs,
        "disabled",
        containerd,
    )
}

/// Upstream's deploy document for instance `instance` of `job_name`,
/// running `cmd` in [`TEST_IMAGE`] with 64 MiB and one vCPU.
pub fn deploy_document(job_name: &str, instance: u64, cmd: &[&str], one_shot: bool) -> Value {
    let mut v: Value = serde_json::from_str(JOB_TEMPLATE).expect("the deploy fixture is JSON");
    v["job_name"] = job_name.into();
    v["instance_number"] = instance.into();
    v["image"] = TEST_IMAGE.into();
    v["cmd"] = cmd.iter().map(|s| Value::from(*s)).collect();
    v["one_shot"] = one_shot.into();
    v["memory"] = 64.into();
    v["vcpus"] = 1.into();
    v
}
