//! The eBPF toolchain: find it, or install it.
//!
//! Two routes build Rust for bpfel-unknown-none:
//! - Debian/Ubuntu's `rustc-web` with `libstd-rust-web-dev-bpf`, whose
//!   sysroot has a precompiled libcore for the target (used here and in CI);
//! - a rustup nightly with `rust-src` and `-Z build-std=core`.
//!
//! Both link with bpf-linker, built against the system's LLVM 22.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::check;

const DEBIAN_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const TARGET: &str = "bpfel-unknown-none";

pub enum Route {
    /// Debian's rustc and cargo, with the target's libcore in /usr.
    Debian,
    /// rustup's nightly, building libcore from rust-src.
    NightlyBuildStd,
}

fn cargo_home_bin() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
        .join("bin")
}

fn debian_route_present() -> bool {
    Path::new("/usr/bin/rustc").exists()
        && Path::new("/usr/bin/cargo").exists()
        && Path::new("/usr/lib/rustlib").join(TARGET).exists()
}

fn nightly_route_present() -> bool {
    Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.starts_with("rust-src"))
        })
        .unwrap_or(false)
}

fn bpf_linker() -> Option<PathBuf> {
    let installed = cargo_home_bin().join("bpf-linker");
    if installed.exists() {
        return Some(installed);
    }
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.exists())
}

fn is_debian_like() -> bool {
    Path::new("/etc/debian_version").exists()
}

fn privileged(program: &str) -> Command {
    if Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
    {
        Command::new(program)
    } else {
        let mut sudo = Command::new("sudo");
        sudo.arg(program);
        sudo
    }
}

/// Find a route, installing the Debian one when none is there.
pub fn ensure() -> Result<Route> {
    let route = if debian_route_present() {
        Route::Debian
    } else if nightly_route_present() && bpf_linker().is_some() {
        Route::NightlyBuildStd
    } else if is_debian_like() {
        install_debian_packages()?;
        Route::Debian
    } else {
        bail!(
            "no eBPF toolchain found. On Debian/Ubuntu `cargo xtask` installs it itself; elsewhere install a Rust nightly with rust-src \
             (`rustup toolchain install nightly --component rust-src`) and bpf-linker (`cargo install bpf-linker`)"
        );
    };
    if bpf_linker().is_none() {
        install_bpf_linker()?;
    }
    Ok(route)
}

fn install_debian_packages() -> Result<()> {
    eprintln!(
        "xtask: installing the eBPF Rust toolchain from Debian: {}",
        DEBIAN_PACKAGES.join(" ")
    );
    let update = privileged("apt-get")
        .args(["update", "-qq"])
        .status()
        .context("cannot run apt-get (needs root or sudo)")?;
    check(update, "apt-get update")?;
    let install = privileged("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(DEBIAN_PACKAGES)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    check(install, &format!("apt-get install {} (these packages need Debian 13/bookworm-backports or Ubuntu 24.04+)", DEBIAN_PACKAGES.join(" ")))
}

fn install_bpf_linker() -> Result<()> {
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        if !is_debian_like() {
            bail!(
                "bpf-linker needs LLVM 22 development files at {LLVM_PREFIX}: install llvm-22-dev"
            );
        }
        install_debian_packages()?;
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 80 s, once)");
    // The default feature targets LLVM 23, which then fails at link time.
    let status = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env_remove("RUSTUP_TOOLCHAIN")
        .status()
        .context("cannot run cargo install")?;
    check(status, "cargo install bpf-linker")
}

impl Route {
    /// `cargo build` of the eBPF crate in `dir`, environment cleaned of
    /// everything the host build sets.
    pub fn cargo_build(&self, dir: &Path) -> Result<Command> {
        let arch = format!("--cfg=bpf_target_arch=\"{}\"", env::consts::ARCH);
        // bpf-linker's default --bpf-expand-memcpy-in-order sets LLVM's
        // store limits for memset to zero: every zeroed key or padding then
        // became a call to a byte-at-a-time loop (108 rounds for a UNIX
        // path), on the hot paths. Without it LLVM writes them inline, in
        // words (no memset, memcpy or memmove call is left in the object).
        let flags = [
            arch.as_str(),
            "-Cdebuginfo=2",
            "-Clink-arg=--btf",
            "-Clink-arg=--disable-expand-memcpy-in-order",
        ];
        let mut command = match self {
            Route::Debian => {
                let mut command = Command::new("/usr/bin/cargo");
                command.env("RUSTC", "/usr/bin/rustc");
                // aya-ebpf enables one unstable feature on the bpf target;
                // RUSTC_BOOTSTRAP=1 would make it ask for build-std.
                command.env("RUSTC_BOOTSTRAP", "aya_ebpf");
                command
            }
            Route::NightlyBuildStd => {
                let mut command = Command::new("cargo");
                command.args(["+nightly"]);
                command
            }
        };
        command
            .current_dir(dir)
            .args(["build", "--release", "--target", TARGET]);
        if let Route::NightlyBuildStd = self {
            command.args(["-Z", "build-std=core"]);
        }
        for var in [
            "RUSTUP_TOOLCHAIN",
            "RUSTFLAGS",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
        ] {
            command.env_remove(var);
        }
        if let Route::Debian = self {
            command.env_remove("CARGO");
        }
        command.env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
        let path = env::join_paths(
            std::iter::once(cargo_home_bin())
                .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
        )?;
        command.env("PATH", path);
        Ok(command)
    }
}
