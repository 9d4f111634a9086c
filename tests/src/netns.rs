//! Private network namespaces made by a test, deleted when dropped.
use std::{fs::File, os::fd::AsRawFd, process::Command};

pub struct Netns {
    pub name: String,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("cannot run ip (install iproute2)");
    assert!(status.success(), "ip {} failed", args.join(" "));
}

impl Netns {
    /// `ip netns add NAME` with loopback up and the given sysctls.
    pub fn create(tag: &str, sysctls: &[(&str, &str)]) -> Self {
        let name = format!("droptrace-{tag}-{}", std::process::id());
        // A namespace left behind by a killed run of this test.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        let netns = Self { name };
        ip(&["-n", &netns.name, "link", "set", "lo", "up"]);
        for (key, value) in sysctls {
            let status = netns
                .command("sysctl")
                .args(["-q", "-w", &format!("{key}={value}")])
                .status()
                .unwrap();
            assert!(status.success(), "sysctl {key}={value} in {}", netns.name);
        }
        netns
    }

    /// A command that runs inside the namespace (`ip netns exec` execs it,
    /// so the child's pid is the program's pid).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// The namespace's inode, as droptrace reports it.
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .unwrap()
            .ino()
    }

    /// Move the calling thread into the namespace (sockets it creates from
    /// now on live there). Use on a thread of its own.
    pub fn enter_on_this_thread(&self) {
        let ns = File::open(format!("/run/netns/{}", self.name)).unwrap();
        // SAFETY: valid fd; affects the calling thread only.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
