//! Generates the CSI client (Identity and Node services) from the vendored
//! `proto/csi.proto` with tonic-prost-build (needs `protoc`, as
//! containerd-client does). A second copy with the server side goes to
//! `$OUT_DIR/with_server/` for the tests' CSI node plugin; the daemon
//! compiles only the client.

use std::path::PathBuf;

const PROTO: &str = "proto/csi.proto";
const INCLUDE: &str = "proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={INCLUDE}");
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .compile_protos(&[PROTO], &[INCLUDE])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("with_server");
    std::fs::create_dir_all(&out)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .build_transport(false)
        .generate_default_stubs(true)
        .out_dir(&out)
        .compile_protos(&[PROTO], &[INCLUDE])?;
    Ok(())
}
