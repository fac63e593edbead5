//! App logs in a directory that is already private (root-owned, not
//! writable by others): used as is. Needs root to own the directory, so it
//! runs on the kit's harness (not run, never passed, without).

use std::os::unix::fs::PermissionsExt;

use nodeengine::app_logs::{AppLogs, DEFAULT_MAX_BYTES};

testkit::main! {
    a_private_directory_is_used_as_is: [Root],
}

fn a_private_directory_is_used_as_is() {
    let dir = testkit::temp_dir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let logs = AppLogs::open(dir.path(), DEFAULT_MAX_BYTES).expect("open");
    assert_eq!(logs.dir(), dir.path());
}
