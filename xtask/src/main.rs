//! droptrace's build system: `cargo xtask build | run | test | bench`.
//!
//! The eBPF programs are built by Debian's rustc for bpfel-unknown-none
//! (it ships a precompiled libcore for that target, so no nightly or
//! build-std is needed) and linked by bpf-linker built against LLVM 22.
//! Everything missing is installed on the first run, saying what it does.
mod kernels;
mod prerequisites;
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run and test droptrace")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object (installing the toolchain if missing).
    BuildEbpf,
    /// Build the eBPF object and the droptrace binary that embeds it.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build the release profile, then run droptrace as root (through sudo
    /// when not root): what an operator runs during a storm.
    /// Example: cargo xtask run -- --pid 4242 --json
    Run {
        /// Build and run the unoptimised debug profile instead (faster to
        /// build while developing).
        #[arg(long)]
        debug: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then run every test: unit, kernel integration (on this kernel
    /// and on Debian's 5.10, 6.1 and 6.12 under QEMU) and end to end. As root
    /// on Debian it installs what the tests drive; what cannot be had is
    /// left out and counted as skipped.
    Test {
        /// Run only the kernel matrix, on this Debian kernel (5.10, 6.1 or
        /// 6.12; repeat for several): the kernel integration tests inside
        /// Debian's own kernel under QEMU. Without it, every test runs,
        /// the host's and the whole matrix.
        #[arg(long = "kernel", value_name = "SERIES")]
        kernels: Vec<String>,
        /// Extra arguments for `cargo test` after `--`, e.g. a test name.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fetch Debian's kernels of the matrix (cached) and build their guest
    /// initramfs in target/kernels, without running anything.
    Kernels {
        #[arg(long = "kernel", value_name = "SERIES")]
        kernels: Vec<String>,
    },
    /// Measure droptrace's cost side by side with bpftrace and with no
    /// tracer, in one run, as ratios (needs root; installs bpftrace, wrk,
    /// nginx and uWSGI on Debian): the storm of refused UNIX connects, nginx
    /// → uWSGI requests under wrk, each program's time per run, start-up
    /// time and memory. Prints figures; asserts only exactness.
    Bench {
        /// Refused connects per storm round.
        #[arg(long, default_value_t = 1_000_000)]
        connects: u64,
        /// Only these parts, comma-separated: storm, wrk, programs,
        /// startup, connect, and (not by default: it takes two minutes)
        /// soak: 100,000 listeners and 10,000 processes come and go under
        /// droptrace; its RSS and kernel tables must stay flat.
        #[arg(long, default_value = "storm,wrk,programs,startup,connect")]
        only: String,
        /// Run the storm, the wrk comparison and the programs' costs inside
        /// this kernel of the matrix (5.10, 6.1, 6.12) under QEMU, where
        /// fexit is allowed; emulation makes the absolute figures slow, the
        /// ratios hold.
        #[arg(long, value_name = "SERIES")]
        kernel: Option<String>,
    },
}

fn main() {
    if let Err(err) = run(Cli::parse().command) {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::BuildEbpf => build_ebpf().map(drop),
        Task::Build { release } => build(release).map(drop),
        Task::Run { debug, args } => {
            warn_if_disk_is_short(RUN_NEEDS_GIB);
            let binary = build(!debug)?;
            run_as_root(&binary, &args)
        }
        Task::Test { kernels, args } => test(&kernels, &args),
        Task::Kernels { kernels } => {
            let series = kernels::chosen(&kernels)?;
            kernels::prepare(&series, &workspace_root().join("target/kernels"))
        }
        Task::Bench {
            connects,
            only,
            kernel,
        } => {
            warn_if_disk_is_short(RUN_NEEDS_GIB);
            let binary = build(true)?;
            prerequisites::ensure_bench(is_root());
            let kernel_dir = workspace_root().join("target/kernels");
            if let Some(series) = &kernel {
                let series = kernels::chosen(std::slice::from_ref(series))?;
                kernels::prepare(&series, &kernel_dir)?;
            }
            // The soak runs the exhaust helper beside the benchmark.
            let built = cargo()
                .args([
                    "build",
                    "--release",
                    "--quiet",
                    "-p",
                    "droptrace-tests",
                    "--bins",
                ])
                .status()?;
            check(built, "building the benchmark")?;
            let status = cargo()
                .args([
                    "run",
                    "--release",
                    "--quiet",
                    "-p",
                    "droptrace-tests",
                    "--bin",
                    "bench",
                    "--",
                ])
                .arg(connects.to_string())
                .arg(only)
                .args(kernel)
                .env("DROPTRACE_BIN", &binary)
                .env("DROPTRACE_KERNELS", &kernel_dir)
                .status()?;
            check(status, "the benchmark")
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The cargo that runs xtask (rustup's), for the host crates.
fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

pub fn check(status: std::process::ExitStatus, what: &str) -> Result<()> {
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Build tracer-ebpf; returns the object's path.
fn build_ebpf() -> Result<PathBuf> {
    let route = toolchain::ensure()?;
    let dir = workspace_root().join("tracer-ebpf");
    let status = route
        .cargo_build(&dir)?
        .status()
        .context("cannot run cargo for the eBPF build")?;
    check(status, "the eBPF build")?;
    let object = dir.join("target/bpfel-unknown-none/release/tracer-ebpf");
    if !object.exists() {
        bail!("the eBPF build did not produce {}", object.display());
    }
    Ok(object)
}

/// Build droptrace with the eBPF object embedded; returns the binary's path.
fn build(release: bool) -> Result<PathBuf> {
    let object = build_ebpf()?;
    let mut command = cargo();
    command
        .args(["build", "-p", "tracer"])
        .env("DROPTRACE_EBPF_OBJECT", &object);
    if release {
        command.arg("--release");
    }
    check(command.status()?, "the droptrace build")?;
    Ok(workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("droptrace"))
}

/// What a whole `cargo xtask test` from a clean clone writes, rounded up:
/// the debug, release and eBPF builds and the guests' kernels (2.4 GiB
/// measured), Debian's packages for the tests, and the toolchain pieces.
const TEST_NEEDS_GIB: f64 = 5.0;

/// What `cargo xtask run` or `bench` writes from a clean clone, rounded
/// up: the release and eBPF builds (1.1 GiB measured) and the toolchain.
const RUN_NEEDS_GIB: f64 = 2.0;

/// Says so, before hours of building, when the disk under target/ has less
/// free space than `need_gib`: out of space, rustc and LLVM fail with an
/// I/O error deep in the build that does not say what to do.
fn warn_if_disk_is_short(need_gib: f64) {
    let target = workspace_root();
    let Some(free) = free_gib(&target) else {
        return;
    };
    if free < need_gib {
        eprintln!(
            "xtask: warning: {free:.1} GiB free under {}; this task needs about \
             {need_gib:.0} GiB. Free some (old clones' target/, /tmp) or the build may \
             fail with \"No space left on device\".",
            target.display()
        );
    }
}

/// Free space for root on the filesystem holding `path`, from df(1).
fn free_gib(path: &Path) -> Option<f64> {
    let out = Command::new("df").args(["-Pk"]).arg(path).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    // POSIX format: a header, then "fs blocks used available capacity mount".
    let kib: f64 = text
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some(kib / (1024.0 * 1024.0))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn run_as_root(binary: &Path, args: &[String]) -> Result<()> {
    let mut command = if is_root() {
        Command::new(binary)
    } else {
        eprintln!("xtask: droptrace needs root; running it through sudo");
        let mut sudo = Command::new("sudo");
        sudo.arg("--preserve-env=RUST_LOG").arg(binary);
        sudo
    };
    let status = command
        .args(args)
        .status()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    // droptrace prints its own error; pass its exit code on.
    std::process::exit(status.code().unwrap_or(1));
}

fn test(only_kernels: &[String], args: &[String]) -> Result<()> {
    warn_if_disk_is_short(TEST_NEEDS_GIB);
    let binary = build(false)?;
    let object = build_ebpf()?;
    let root = is_root();
    let mut filter = prerequisites::ensure(root)?;
    let series = kernels::chosen(only_kernels)?;
    let kernel_dir = workspace_root().join("target/kernels");
    // Without root or QEMU the matrix tests are left out (see above).
    let (guest_tests, guest_e2e_tests) = if root && kernels::can_boot() {
        kernels::prepare(&series, &kernel_dir)?;
        (
            test_binaries(&["unix_backlog", "tcp_backlog", "resource_limits"])?,
            test_binaries(&["nginx_uwsgi_tcp"])?,
        )
    } else {
        (String::new(), String::new())
    };
    if !only_kernels.is_empty() {
        // Only the chosen kernels' matrix tests.
        let chosen: Vec<String> = series
            .iter()
            .map(|s| format!("test(/^linux_{}(_|$)/)", s.name.replace('.', "_")))
            .collect();
        filter = Some(format!("binary(kernels) & ({})", chosen.join(" | ")));
    }
    // nextest ends with one summary line for the whole suite, and runs the
    // kernel tests one at a time (.config/nextest.toml). Without it, cargo
    // test, all serial.
    let mut command = cargo();
    if has_nextest() {
        command.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
        if let Some(filter) = &filter {
            command.args(["-E", filter]);
        }
        command.args(args);
    } else {
        if filter.is_some() {
            bail!("tests must be left out and only cargo-nextest can count them as skipped: `cargo install cargo-nextest`");
        }
        eprintln!("xtask: cargo-nextest not found; using cargo test (`cargo install cargo-nextest` for a single summary line)");
        command
            .args([
                "test",
                "--workspace",
                "--no-fail-fast",
                "--",
                "--test-threads=1",
            ])
            .args(args);
    }
    let status = command
        .env("DROPTRACE_EBPF_OBJECT", &object)
        .env("DROPTRACE_BIN", &binary)
        .env("DROPTRACE_KERNELS", &kernel_dir)
        .env("DROPTRACE_GUEST_TESTS", &guest_tests)
        .env("DROPTRACE_GUEST_E2E_TESTS", &guest_e2e_tests)
        .status()?;
    check(status, "the tests")
}

/// The paths of the test binaries `names`, which the kernel matrix runs in
/// its guests (built already by the build above; cargo says where).
fn test_binaries(names: &[&str]) -> Result<String> {
    let output = cargo()
        .args([
            "test",
            "-p",
            "droptrace-tests",
            "--tests",
            "--no-run",
            "--message-format=json",
        ])
        .output()
        .context("cannot run cargo test --no-run")?;
    if !output.status.success() {
        bail!(
            "cargo test --no-run failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = message["target"]["name"].as_str().unwrap_or_default();
        if let (true, Some(executable)) = (names.contains(&name), message["executable"].as_str()) {
            found.push(executable.to_string());
        }
    }
    if found.len() != names.len() {
        bail!("cargo did not report the test binaries {names:?} (found {found:?})");
    }
    Ok(found.join(" "))
}

fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}
