//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is built by a different compiler (Debian's rustc for
//! bpfel-unknown-none), so cargo cannot build it as a dependency. xtask
//! passes its path in DROPTRACE_EBPF_OBJECT; a plain `cargo build` without it
//! embeds an empty object and the binary says how to build it properly.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=DROPTRACE_EBPF_OBJECT");
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("tracer-ebpf.o");
    match env::var_os("DROPTRACE_EBPF_OBJECT") {
        Some(object) => {
            println!(
                "cargo:rerun-if-changed={}",
                PathBuf::from(&object).display()
            );
            fs::copy(&object, &out).unwrap_or_else(|err| {
                panic!(
                    "cannot copy the eBPF object {}: {err}",
                    PathBuf::from(&object).display()
                )
            });
        }
        None => {
            println!("cargo:warning=DROPTRACE_EBPF_OBJECT unset: building droptrace without its eBPF programs (use `cargo xtask build`)");
            fs::write(&out, b"").unwrap();
        }
    }
}
