//! The kernel matrix: Debian's own cloud kernels (what servers run), fetched
//! from Debian's archive, cached, and made bootable under QEMU with a small
//! initramfs that mounts the host's root read-only over virtiofs (with a
//! writable overlay in guest memory), so the guest runs the host's test
//! binaries, droptrace, nginx and uWSGI as they are.
//!
//! xtask prepares each kernel and writes `<dir>/<series>/{vmlinuz,
//! initramfs.cpio}`, or `<dir>/<series>/error` saying in one line why that
//! kernel cannot be had; the `kernels` tests boot them.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context, Result};

/// A kernel of the matrix: the series, the Debian release that ships it.
pub struct Series {
    pub name: &'static str,
    pub release: &'static str,
}

pub const MATRIX: &[Series] = &[
    Series {
        name: "5.10",
        release: "bullseye (Debian 11)",
    },
    Series {
        name: "6.1",
        release: "bookworm (Debian 12)",
    },
    Series {
        name: "6.12",
        release: "trixie (Debian 13)",
    },
];

/// The series named by `--kernel` (all of them when none is named).
pub fn chosen(names: &[String]) -> Result<Vec<&'static Series>> {
    if names.is_empty() {
        return Ok(MATRIX.iter().collect());
    }
    names
        .iter()
        .map(|name| {
            MATRIX.iter().find(|s| s.name == name).ok_or_else(|| {
                let known: Vec<&str> = MATRIX.iter().map(|s| s.name).collect();
                anyhow!("--kernel {name}: the matrix has {}", known.join(", "))
            })
        })
        .collect()
}

const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
";

/// Modules the guest loads (those built in are simply absent): virtio and
/// virtiofs to reach the host's root, overlay to write over it, sock_diag
/// for droptrace's listener tables, veth for namespaces with links.
const MODULES: &[&str] = &[
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "fs/fuse/fuse.ko",
    "fs/fuse/virtiofs.ko",
    "fs/overlayfs/overlay.ko",
    "net/unix/unix_diag.ko",
    "net/ipv4/inet_diag.ko",
    "net/ipv4/tcp_diag.ko",
    "drivers/net/veth.ko",
];

/// The guest's /init: load modules, mount the host's root (read-only)
/// under a writable overlay, run the script named by `droptrace.run=` in
/// it, print its exit code and power off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
RUN=$(sed -n 's/.*droptrace.run=\([^ ]*\).*/\1/p' /proc/cmdline)
fail() { echo "GUEST-ERROR $*"; poweroff -f; }
[ -n "$RUN" ] || fail "no droptrace.run= script on the kernel command line"
for round in 1 2 3 4; do
  for m in /modules/*.ko; do
    n=$(basename "$m" .ko)
    grep -q "^$n " /proc/modules || insmod "$m" 2>/dev/null
  done
done
for m in /modules/*.ko; do
  n=$(basename "$m" .ko)
  grep -q "^$n " /proc/modules || fail "module $n did not load: $(insmod "$m" 2>&1)"
done
mount -t virtiofs hostroot /lower -o ro || fail "cannot mount the host's root over virtiofs"
mount -t tmpfs rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || fail "cannot mount an overlay over the host's root"
for d in proc sys dev; do mount --move /$d /newroot/$d; done
mount -t tmpfs run /newroot/run
mount -t tracefs tracefs /newroot/sys/kernel/tracing
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup
mount -t bpf bpf /newroot/sys/fs/bpf
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs shm /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
echo "GUEST-START $(uname -r)"
chroot /newroot /bin/sh -c "ip link set lo up; exec /bin/sh $RUN" </newroot/dev/null
echo "GUEST-EXIT $?"
poweroff -f
"#;

/// Whether this machine has what booting a guest takes.
pub fn can_boot() -> bool {
    TOOLS.iter().all(|tool| Path::new(tool).exists())
}

const TOOLS: &[&str] = &[
    "/usr/bin/qemu-system-x86_64",
    "/usr/lib/qemu/virtiofsd",
    "/usr/bin/busybox",
    "/usr/bin/cpio",
    "/usr/bin/xz",
];

/// Where downloaded kernels are kept across clones and runs.
fn cache_dir() -> PathBuf {
    env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("droptrace/kernels")
}

/// apt-get and apt-cache against Debian's archive with a private list, so
/// the machine's own sources and package state stay untouched.
fn apt(program: &str, state: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .arg("-q")
        .arg(format!(
            "-o=Dir::Etc::SourceList={}",
            state.join("sources.list").display()
        ))
        .arg("-o=Dir::Etc::SourceParts=/dev/null")
        .arg(format!(
            "-o=Dir::State::Lists={}",
            state.join("lists").display()
        ))
        .arg(format!("-o=Dir::Cache={}", state.join("cache").display()))
        .arg("-o=Acquire::Languages=none")
        .arg("-o=APT::Sandbox::User=root")
        .env("DEBIAN_FRONTEND", "noninteractive");
    command
}

fn output(mut command: Command, what: &str) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
        bail!("{what} failed ({}): {last}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Numbers of a Debian version, for ordering: "6.1.192-3" -> [6, 1, 192, 3].
fn version_key(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The newest linux-image-*-cloud-amd64 of `series` the archive has: the
/// dependency of the linux-image-cloud-amd64 stanza of that version.
fn package_of(show: &str, series: &str) -> Option<String> {
    show.split("\n\n")
        .filter_map(|stanza| {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(str::trim))
            };
            let version = field("Version:")?;
            version.starts_with(&format!("{series}.")).then_some(())?;
            let depends = field("Depends:")?;
            let package = depends
                .split([' ', ','])
                .find(|p| p.starts_with("linux-image-"))?;
            Some((version_key(version), package.to_string()))
        })
        .max()
        .map(|(_, package)| package)
}

/// Fetch (or find in the cache) every kernel of `wanted` and build its
/// initramfs under `out`. A kernel that cannot be had gets an `error` file
/// and a line on stderr; the others are still prepared.
pub fn prepare(wanted: &[&Series], out: &Path) -> Result<()> {
    let cache = cache_dir();
    let state = cache.join("apt");
    for dir in ["lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(state.join(dir))?;
    }
    fs::write(state.join("sources.list"), SOURCES)?;
    let mut updated = false;
    for series in wanted {
        let dir = out.join(series.name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        if let Err(err) = prepare_one(series, &cache, &state, &dir, &mut updated) {
            let line = format!("Linux {} of {}: {err:#}", series.name, series.release);
            eprintln!("xtask: kernel matrix: {line}");
            fs::write(dir.join("error"), line)?;
        }
    }
    Ok(())
}

fn prepare_one(
    series: &Series,
    cache: &Path,
    state: &Path,
    dir: &Path,
    updated: &mut bool,
) -> Result<()> {
    let extracted = cache.join(series.name);
    let kernel = find_file(&extracted, "boot", "vmlinuz-");
    let kernel = match kernel {
        Some(kernel) => kernel,
        None => {
            if !*updated {
                eprintln!("xtask: kernel matrix: reading Debian's package lists (bullseye, bookworm, trixie)");
                output(
                    {
                        let mut c = apt("apt-get", state);
                        c.arg("update");
                        c
                    },
                    "apt-get update of Debian's archive",
                )?;
                *updated = true;
            }
            let mut show = apt("apt-cache", state);
            show.args(["show", "linux-image-cloud-amd64"]);
            let show = output(show, "apt-cache show linux-image-cloud-amd64")?;
            let package = package_of(&show, series.name).ok_or_else(|| {
                anyhow!(
                    "Debian's archive has no linux-image-cloud-amd64 {}.x",
                    series.name
                )
            })?;
            eprintln!("xtask: kernel matrix: downloading {package}");
            let download = cache.join("debs");
            fs::create_dir_all(&download)?;
            let mut get = apt("apt-get", state);
            get.args(["download", &package]).current_dir(&download);
            output(get, &format!("apt-get download {package}"))?;
            let deb = fs::read_dir(&download)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{package}_")))
                })
                .ok_or_else(|| anyhow!("apt-get download left no {package} package"))?;
            let partial = cache.join(format!("{}.partial", series.name));
            let _ = fs::remove_dir_all(&partial);
            let mut extract = Command::new("dpkg-deb");
            extract.arg("-x").arg(&deb).arg(&partial);
            output(extract, &format!("dpkg-deb -x {}", deb.display()))?;
            let _ = fs::remove_file(&deb);
            let _ = fs::remove_dir_all(&extracted);
            fs::rename(&partial, &extracted)?;
            find_file(&extracted, "boot", "vmlinuz-")
                .ok_or_else(|| anyhow!("{package} holds no boot/vmlinuz-*"))?
        }
    };
    fs::copy(&kernel, dir.join("vmlinuz"))?;
    build_initramfs(&extracted, &dir.join("initramfs.cpio"))
}

fn find_file(root: &Path, sub: &str, prefix: &str) -> Option<PathBuf> {
    fs::read_dir(root.join(sub))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
}

/// busybox, the modules of MODULES this kernel has as modules (xz ones
/// decompressed: busybox's insmod takes plain .ko), and INIT.
fn build_initramfs(extracted: &Path, out: &Path) -> Result<()> {
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .filter_map(|sub| fs::read_dir(extracted.join(sub)).ok()?.flatten().next())
        .map(|e| e.path().join("kernel"))
        .next()
        .ok_or_else(|| anyhow!("the kernel package has no lib/modules"))?;
    let root = out.with_extension("root");
    let _ = fs::remove_dir_all(&root);
    for dir in [
        "bin", "proc", "sys", "dev", "lower", "rw", "newroot", "modules",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    fs::copy("/usr/bin/busybox", root.join("bin/busybox"))?;
    for module in MODULES {
        let plain = modules.join(module);
        let target = root
            .join("modules")
            .join(plain.file_name().expect("a file name"));
        if plain.exists() {
            fs::copy(&plain, &target)?;
        } else if plain.with_extension("ko.xz").exists() {
            let text = Command::new("xz")
                .arg("-dc")
                .arg(plain.with_extension("ko.xz"))
                .output()
                .context("cannot run xz (apt-get install xz-utils)")?;
            if !text.status.success() {
                bail!("xz could not decompress {module}");
            }
            fs::write(&target, text.stdout)?;
        }
    }
    let init = root.join("init");
    fs::write(&init, INIT)?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    let archive = fs::File::create(out)?;
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet")
        .current_dir(&root)
        .stdout(archive)
        .status()
        .context("cannot run cpio")?;
    if !status.success() {
        bail!("cpio could not build the initramfs");
    }
    fs::remove_dir_all(&root)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_package_of_a_series_is_chosen() {
        let show = "Package: linux-image-cloud-amd64\nVersion: 6.1.176-1\nDepends: linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)\n\n\
                    Package: linux-image-cloud-amd64\nVersion: 6.1.192-3\nDepends: linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)\n\n\
                    Package: linux-image-cloud-amd64\nVersion: 6.12.117-1\nDepends: linux-image-6.12.117+deb13-cloud-amd64 (= 6.12.117-1)\n";
        assert_eq!(
            package_of(show, "6.1").as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64")
        );
        assert_eq!(
            package_of(show, "6.12").as_deref(),
            Some("linux-image-6.12.117+deb13-cloud-amd64")
        );
        assert_eq!(package_of(show, "5.10"), None);
    }
}
