//! What the tests need beyond the toolchain: root, and Debian's nginx,
//! uWSGI, Chromium and Prometheus. On Debian as root the missing packages are
//! installed; what still cannot be had leaves its tests out through
//! nextest's filter, so the summary counts them as skipped, with one line
//! that says why. A test that runs without what it needs fails.
use std::{path::Path, process::Command};

use anyhow::{bail, Result};

/// Packages the end-to-end tests drive, and a file each one installs.
const PACKAGES: &[(&str, &str)] = &[
    ("nginx", "/usr/sbin/nginx"),
    ("uwsgi", "/usr/bin/uwsgi"),
    (
        "uwsgi-plugin-python3",
        "/usr/lib/uwsgi/plugins/python3_plugin.so",
    ),
    ("iproute2", "/usr/bin/ip"),
    ("procps", "/usr/sbin/sysctl"),
    ("chromium", "/usr/bin/chromium"),
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/usr/bin/busybox"),
    ("cpio", "/usr/bin/cpio"),
    ("xz-utils", "/usr/bin/xz"),
    ("prometheus", "/usr/bin/prometheus"),
    ("systemd", "/usr/bin/systemd-analyze"),
];

/// The tests that start nginx and uWSGI.
const STACK_TESTS: &str = "binary(nginx_uwsgi) | binary(nginx_uwsgi_tcp) | binary(nginx_limits) | binary(postmortem) | test(=prometheus_stores_what_nginx_logged_and_the_drop_alert_fires)";
/// The tests that run Prometheus or promtool, and systemd-analyze.
const PROMETHEUS_TESTS: &str = "test(=prometheus_stores_what_nginx_logged_and_the_drop_alert_fires) | test(=the_alert_rules_pass_promtool_and_their_unit_tests)";
const SYSTEMD_TESTS: &str = "test(=the_systemd_unit_s_capabilities_are_enough)";
/// The test that renders the HTML report in Chromium.
const CHROMIUM_TESTS: &str =
    "test(=a_capture_of_a_real_burst_reports_the_live_totals_even_when_cut_short)";

fn missing() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(package, _)| *package)
        .collect()
}

fn installed(package: &str) -> bool {
    PACKAGES
        .iter()
        .any(|(name, file)| *name == package && Path::new(file).exists())
}

/// Install what is missing where we can; returns the nextest filter of the
/// tests that must be left out, with why, or fails in CI where nothing may
/// be left out.
pub fn ensure(root: bool) -> Result<Option<String>> {
    let mut left_out: Vec<(&str, String)> = Vec::new();
    if !root {
        left_out.push((
            "package(droptrace-tests)",
            "not root: the kernel and end-to-end tests load eBPF (run `sudo -E cargo xtask test`)"
                .into(),
        ));
    } else {
        apt_install("the tests drive", &missing());
        let stack = ["nginx", "uwsgi", "uwsgi-plugin-python3", "iproute2"];
        if !stack.iter().all(|p| installed(p)) {
            left_out.push((
                STACK_TESTS,
                format!(
                    "{} not installed (not Debian, or apt-get failed)",
                    stack.join(", ")
                ),
            ));
        } else if !installed("chromium") {
            left_out.push((
                CHROMIUM_TESTS,
                "chromium not installed: the HTML report cannot be rendered".into(),
            ));
        }
        if !installed("prometheus") {
            left_out.push((
                PROMETHEUS_TESTS,
                "prometheus not installed (not Debian, or apt-get failed)".into(),
            ));
        }
        if !installed("systemd") {
            left_out.push((
                SYSTEMD_TESTS,
                "systemd-analyze not installed: the unit cannot be verified".into(),
            ));
        }
    }
    if left_out.is_empty() {
        return Ok(None);
    }
    for (filter, why) in &left_out {
        eprintln!("xtask: SKIPPING {filter}: {why}");
    }
    if std::env::var_os("CI").is_some() {
        bail!(
            "in CI every test must run: {}",
            left_out
                .iter()
                .map(|(_, why)| why.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    let filters: Vec<&str> = left_out.iter().map(|(filter, _)| *filter).collect();
    Ok(Some(format!("not ({})", filters.join(" | "))))
}

/// Install Debian `packages` (as root, where apt-get exists).
fn apt_install(why: &str, packages: &[&str]) {
    if packages.is_empty() || !Path::new("/usr/bin/apt-get").exists() {
        return;
    }
    eprintln!("xtask: installing what {why}: {}", packages.join(" "));
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(packages);
    // The package lists may be stale or absent: update once, retry.
    let done = apt(&install) || (apt(&["update", "-qq"]) && apt(&install));
    if !done {
        eprintln!("xtask: apt-get could not install {}", packages.join(" "));
    }
}

/// What the benchmark compares droptrace with, and drives: bpftrace, wrk,
/// nginx and uWSGI. Installed as root on Debian; the benchmark says what
/// it could not measure without them.
pub fn ensure_bench(root: bool) {
    let wanted: Vec<&str> = [
        ("bpftrace", "/usr/bin/bpftrace"),
        ("wrk", "/usr/bin/wrk"),
        ("nginx", "/usr/sbin/nginx"),
        ("uwsgi", "/usr/bin/uwsgi"),
        (
            "uwsgi-plugin-python3",
            "/usr/lib/uwsgi/plugins/python3_plugin.so",
        ),
    ]
    .into_iter()
    .filter(|(_, file)| !Path::new(file).exists())
    .map(|(package, _)| package)
    .collect();
    if root {
        apt_install("the benchmark compares and drives", &wanted);
    }
}
