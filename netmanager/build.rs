//! Embeds the eBPF object built by `cargo xtask build-ebpf`, so the
//! NetManager binary is self-contained and nobody copies files around.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=NETMANAGER_EBPF_OBJECT");
    let object = match std::env::var_os("NETMANAGER_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../netmanager-ebpf/target/bpfel-unknown-none/release/netmanager"),
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "the eBPF object {} is missing: run `cargo xtask build-ebpf` first \
             (or point NETMANAGER_EBPF_OBJECT at one)",
            object.display()
        );
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::copy(&object, out.join("netmanager.bpf.o")).expect("copying the eBPF object");
}
