//! Debian's kernels under QEMU: boot one (prepared by `cargo xtask test`
//! in $DROPTRACE_KERNELS), run a shell script inside it over the host's own
//! root (read-only, under a writable overlay in guest memory), and read
//! what it printed on the serial console.
//!
//! Nested KVM does not work on these machines; QEMU's emulation (TCG) does.
//! Timing inside a guest is not real-hardware timing.
use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The kernels of the matrix, as `cargo xtask test --kernel` names them.
pub const MATRIX: &[&str] = &["5.10", "6.1", "6.12"];

const MEMORY_MB: u32 = 1536;

/// Where xtask put the kernel of `series`; panics with xtask's own line
/// when that kernel could not be had.
pub fn kernel_dir(series: &str) -> PathBuf {
    let root = std::env::var_os("DROPTRACE_KERNELS")
        .expect("DROPTRACE_KERNELS is unset: run the kernel matrix through `cargo xtask test`");
    let dir = PathBuf::from(root).join(series);
    if let Ok(error) = fs::read_to_string(dir.join("error")) {
        panic!("{error}");
    }
    assert!(
        dir.join("vmlinuz").exists() && dir.join("initramfs.cpio").exists(),
        "Linux {series}: no kernel prepared in {} (`cargo xtask test --kernel {series}` prepares it)",
        dir.display()
    );
    dir
}

/// What a guest printed, and the exit code of its script.
pub struct Run {
    pub console: String,
    pub exit: Option<i32>,
}

/// A child process stopped by its PID when dropped.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How a boot failed.
enum Failed {
    /// The kernel died in its own boot, before its init ran anything of
    /// ours (under emulation this happens, rarely: CI once saw 6.12 oops
    /// on an int3 while patching its own code, 1.1 s into its boot).
    Boot(String),
    Other(String),
}

impl From<String> for Failed {
    fn from(why: String) -> Self {
        Failed::Other(why)
    }
}

/// Boot the kernel in `dir`, run `script` (bash/sh text) in it as root,
/// and return its console. Fails naming the kernel and the cause when the
/// guest does not boot, cannot reach the host's root, or runs past
/// `timeout`. A kernel that dies before its init is booted once more: it
/// ran nothing of droptrace's, and the first console's tail is printed.
pub fn run(series: &str, dir: &Path, script: &str, timeout: Duration) -> Result<Run, String> {
    match boot(series, dir, script, timeout) {
        Err(Failed::Boot(first)) => {
            eprintln!("{first}\nLinux {series}: booting it once more");
            boot(series, dir, script, timeout).map_err(|failed| match failed {
                Failed::Boot(why) | Failed::Other(why) => why,
            })
        }
        Err(Failed::Other(why)) => Err(why),
        Ok(run) => Ok(run),
    }
}

fn boot(series: &str, dir: &Path, script: &str, timeout: Duration) -> Result<Run, Failed> {
    let work = tempfile::Builder::new()
        .prefix("droptrace-guest-")
        .tempdir()
        .map_err(|e| format!("Linux {series}: cannot make a work directory: {e}"))?;
    let script_path = work.path().join("run.sh");
    fs::write(&script_path, script).map_err(|e| e.to_string())?;
    let socket = work.path().join("virtiofs.sock");
    let console = work.path().join("console.log");
    let virtiofsd = Command::new("/usr/lib/qemu/virtiofsd")
        .arg(format!("--socket-path={}", socket.display()))
        .args(["-o", "source=/", "-o", "cache=auto", "-o", "sandbox=chroot"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("Linux {series}: cannot start virtiofsd: {e}"))?;
    let _virtiofsd = Owned(virtiofsd);
    let started = Instant::now();
    while !socket.exists() {
        if started.elapsed() > Duration::from_secs(10) {
            return Err(format!("Linux {series}: virtiofsd did not open its socket").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = fs::File::create(&console).map_err(|e| e.to_string())?;
    let qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg,thread=multi", "-cpu", "max,la57=off"])
        .args(["-m", &MEMORY_MB.to_string(), "-smp", "2"])
        .args([
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
            "-monitor",
            "none",
        ])
        .arg("-kernel")
        .arg(dir.join("vmlinuz"))
        .arg("-initrd")
        .arg(dir.join("initramfs.cpio"))
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet loglevel=3 droptrace.run={}",
            script_path.display()
        ))
        .arg("-chardev")
        .arg(format!("socket,id=hostroot,path={}", socket.display()))
        .args(["-device", "vhost-user-fs-pci,chardev=hostroot,tag=hostroot"])
        .arg("-object")
        .arg(format!(
            "memory-backend-memfd,id=mem,size={MEMORY_MB}M,share=on"
        ))
        .args(["-numa", "node,memdev=mem"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("Linux {series}: cannot start qemu-system-x86_64: {e}"))?;
    let mut qemu = Owned(qemu);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match qemu.0.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            _ => break None,
        }
    };
    let mut text = String::new();
    let _ = fs::File::open(&console).and_then(|mut f| f.read_to_string(&mut text));
    let text = text.replace("\r\n", "\n");
    if status.is_none() {
        return Err(Failed::Other(format!(
            "Linux {series}: the guest ran past {} s and was stopped; its console ended with:\n{}",
            timeout.as_secs(),
            tail(&text, 40)
        )));
    }
    if let Some(error) = text.lines().find_map(|l| l.split("GUEST-ERROR ").nth(1)) {
        return Err(Failed::Other(format!("Linux {series}: {error}")));
    }
    if !text.contains("GUEST-START") {
        return Err(Failed::Boot(format!(
            "Linux {series}: the guest did not boot to its init; its console ended with:\n{}",
            tail(&text, 40)
        )));
    }
    let exit = text
        .lines()
        .find_map(|l| l.split("GUEST-EXIT ").nth(1)?.trim().parse().ok());
    Ok(Run {
        console: text,
        exit,
    })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// libtest's verdicts in a console: (passed, failed, failing test names).
pub fn libtest_results(console: &str) -> (usize, usize, Vec<String>) {
    let mut passed = 0;
    let mut failed = Vec::new();
    for line in console.lines() {
        let Some(rest) = line.trim().strip_prefix("test ") else {
            continue;
        };
        if let Some(name) = rest.strip_suffix(" ... ok") {
            let _ = name;
            passed += 1;
        } else if let Some(name) = rest.strip_suffix(" ... FAILED") {
            failed.push(name.to_string());
        }
    }
    (passed, failed.len(), failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_lines_are_counted() {
        let console = "running 2 tests\ntest a ... ok\ntest b ... FAILED\r\ntest result: FAILED. 1 passed; 1 failed\n";
        let (passed, failed, names) = libtest_results(&console.replace("\r\n", "\n"));
        assert_eq!((passed, failed), (1, 1));
        assert_eq!(names, ["b"]);
    }
}
