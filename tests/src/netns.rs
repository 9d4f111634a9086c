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

    /// The namespace's own TcpExt counters now, read by the test from
    /// /proc/thread-self/net/netstat of a thread inside it: the kernel's
    /// truth that droptrace's counts are held against.
    pub fn tcp_ext(&self) -> TcpExt {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter_on_this_thread();
                let text = std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap();
                TcpExt::parse(&text)
            })
            .join()
            .unwrap()
        })
    }

    /// Run `work` on a thread of its own inside the namespace; its result.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter_on_this_thread();
                work()
            })
            .join()
            .unwrap()
        })
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

/// The TcpExt counters of listen-queue drops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpExt {
    /// Accept queue full (at SYN or at ACK time).
    pub listen_overflows: u64,
    /// Every drop at a listener, overflows included.
    pub listen_drops: u64,
    /// SYN dropped by a full SYN queue, syncookies off.
    pub req_q_full_drop: u64,
    /// SYNs answered with a cookie.
    pub syncookies_sent: u64,
}

impl TcpExt {
    fn parse(text: &str) -> Self {
        let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
        let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
        let value = |wanted: &str| -> u64 {
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(name, _)| *name == wanted)
                .map(|(_, v)| v.parse().unwrap())
                .unwrap_or_else(|| panic!("no TcpExt {wanted} in /proc/net/netstat"))
        };
        Self {
            listen_overflows: value("ListenOverflows"),
            listen_drops: value("ListenDrops"),
            req_q_full_drop: value("TCPReqQFullDrop"),
            syncookies_sent: value("SyncookiesSent"),
        }
    }

    /// What grew from `before` to `self`.
    pub fn since(self, before: Self) -> Self {
        Self {
            listen_overflows: self.listen_overflows - before.listen_overflows,
            listen_drops: self.listen_drops - before.listen_drops,
            req_q_full_drop: self.req_q_full_drop - before.req_q_full_drop,
            syncookies_sent: self.syncookies_sent - before.syncookies_sent,
        }
    }
}

/// The network namespaces (by inode) of the sockets process `pid` holds,
/// as the kernel tells (SIOCGSKNS on a copy of each socket fd).
pub fn of_sockets(pid: u32) -> std::collections::HashSet<u64> {
    const SIOCGSKNS: libc::c_ulong = 0x894C;
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Default::default();
    };
    entries
        .flatten()
        .filter(|entry| {
            std::fs::read_link(entry.path())
                .is_ok_and(|link| link.to_string_lossy().starts_with("socket:"))
        })
        .filter_map(|entry| {
            let fd: i32 = entry.file_name().to_string_lossy().parse().ok()?;
            let socket = crate::fd_of(pid, fd)?;
            // SAFETY: an ioctl on a socket we own; it returns a new fd.
            let ns = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCGSKNS) };
            if ns < 0 {
                return None;
            }
            // SAFETY: ns was just returned to us and is owned by nobody else.
            let ns = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(ns) };
            use std::os::unix::fs::MetadataExt;
            Some(ns.metadata().ok()?.ino())
        })
        .collect()
}
