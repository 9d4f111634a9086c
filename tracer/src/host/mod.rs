//! Everything droptrace reads of the machine: processes and their roles
//! (/proc), open-file limits, sysctls and socket tables per network
//! namespace (sock_diag), and the nginx and uWSGI configurations of running
//! processes. The drop families see it only through [`Host`], which hands
//! them facts, never paths; [`LiveHost`] is the machine itself, and unit
//! tests drive the families with a fake one.
pub mod address;
pub mod configs;
pub mod listeners;
pub mod owners;
pub mod process;
pub mod rlimits;
pub mod snapshot;
pub mod sock_diag;
pub mod tcp;

#[cfg(test)]
pub mod fake;

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use tracer_common::ListenRecord;

use crate::config::{nginx::NginxConfig, uwsgi::UwsgiConfig};
use address::UnixAddress;
use listeners::{Listener, Registry, Task};
use owners::Owner;
use process::Process;
use rlimits::Setter;

/// What the drop families ask of the machine.
pub trait Host {
    /// A running process and its role; None once it has exited.
    fn process(&mut self, pid: u32) -> Option<Process>;
    fn parent_of(&mut self, pid: u32) -> Option<u32>;
    /// A process as the owner of a listener, with its configuration.
    fn owner(&mut self, process: Process) -> Owner;
    /// The nginx master of an nginx process (itself, or a worker's parent).
    fn nginx_master(&mut self, process: &Process) -> Option<Process>;
    /// The configuration an nginx process (master or worker) runs with.
    fn nginx_config(&mut self, process: &Process) -> Option<Arc<NginxConfig>>;
    /// The configuration a uWSGI process runs with.
    fn uwsgi_config(&mut self, process: &Process) -> UwsgiConfig;
    /// The ancestor of `pid` that set its soft RLIMIT_NOFILE `soft`.
    fn nofile_setter(&mut self, pid: u32, soft: u64) -> Option<Setter>;
    /// The systemd unit a process runs in.
    fn systemd_unit(&mut self, pid: u32) -> Option<String>;
    /// fs.file-max and the files allocated now (fs.file-nr).
    fn file_max(&mut self) -> (Option<u64>, Option<u64>);
    /// net.ipv4.ip_local_port_range of a network namespace.
    fn ip_local_port_range(&mut self, netns: u32) -> Option<(u32, u32)>;
    /// The UNIX listener behind `address` as thread `client` reaches it.
    fn unix_listener(&mut self, client: Task, address: &UnixAddress) -> Option<Listener>;
    /// A UNIX listener's queue length now.
    fn unix_queue(&mut self, listener: &Listener) -> Option<u32>;
    /// A listen() the kernel reported: the UNIX listener table learns it.
    fn unix_listen(&mut self, record: &ListenRecord);
    /// The owning processes of socket inodes (the topmost holder of each).
    fn socket_owners(&mut self, inodes: &HashSet<u64>) -> HashMap<u64, Process>;
    /// The local address of TCP socket `inode` of thread `tid`.
    fn tcp_local_address(&mut self, pid: u32, tid: u32, inode: u64) -> Option<(IpAddr, u16)>;
    /// TcpExtListenOverflows of every network namespace, by inode.
    fn listen_overflows(&mut self) -> HashMap<u32, u64>;
    /// The inodes of every listening TCP socket of every network namespace
    /// now; None when a namespace's table could not be read.
    fn open_tcp_listeners(&mut self) -> Option<HashSet<u64>>;
    /// Let go of what is gone (closed listeners, namespaces), looking at
    /// most every `every`.
    fn maintain(&mut self, _every: Duration) {}
}

/// The machine droptrace runs on.
#[derive(Default)]
pub struct LiveHost {
    registry: Registry,
}

impl LiveHost {
    /// Start with every UNIX listener of every network namespace known.
    pub fn new() -> Self {
        let mut host = Self::default();
        host.registry.rescan();
        host
    }
}

/// Give back a table's room once it holds far less than it has room for
/// (a burst of processes or listeners leaves no lasting memory behind).
pub fn shrink<K: Eq + std::hash::Hash, V>(table: &mut HashMap<K, V>) {
    if table.capacity() > 4 * table.len().max(256) {
        table.shrink_to_fit();
    }
}

/// The first number of a /proc file ("1234\t0\t9223..." -> 1234).
fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// fs.file-max, and the files allocated now (the first field of fs.file-nr).
pub fn file_max() -> (Option<u64>, Option<u64>) {
    (
        read_number("/proc/sys/fs/file-max"),
        read_number("/proc/sys/fs/file-nr"),
    )
}

impl Host for LiveHost {
    fn maintain(&mut self, every: Duration) {
        self.registry.maintain(every);
    }

    fn process(&mut self, pid: u32) -> Option<Process> {
        process::inspect(pid)
    }

    fn parent_of(&mut self, pid: u32) -> Option<u32> {
        process::parent_of(pid)
    }

    fn owner(&mut self, process: Process) -> Owner {
        Owner::of(process)
    }

    fn nginx_master(&mut self, process: &Process) -> Option<Process> {
        configs::nginx_master(process)
    }

    fn nginx_config(&mut self, process: &Process) -> Option<Arc<NginxConfig>> {
        configs::nginx_of(process)
    }

    fn uwsgi_config(&mut self, process: &Process) -> UwsgiConfig {
        configs::uwsgi_of(process)
    }

    fn nofile_setter(&mut self, pid: u32, soft: u64) -> Option<Setter> {
        rlimits::setter_of(pid, soft)
    }

    fn systemd_unit(&mut self, pid: u32) -> Option<String> {
        rlimits::systemd_unit(pid)
    }

    fn file_max(&mut self) -> (Option<u64>, Option<u64>) {
        file_max()
    }

    fn ip_local_port_range(&mut self, netns: u32) -> Option<(u32, u32)> {
        self.registry.ip_local_port_range(netns)
    }

    fn unix_listener(&mut self, client: Task, address: &UnixAddress) -> Option<Listener> {
        self.registry.find(client, address).cloned()
    }

    fn unix_queue(&mut self, listener: &Listener) -> Option<u32> {
        self.registry.queue_now(listener)
    }

    fn unix_listen(&mut self, record: &ListenRecord) {
        self.registry.on_listen(record)
    }

    fn socket_owners(&mut self, inodes: &HashSet<u64>) -> HashMap<u64, Process> {
        owners::owners_of(inodes)
    }

    fn tcp_local_address(&mut self, pid: u32, tid: u32, inode: u64) -> Option<(IpAddr, u16)> {
        tcp::local_address_of(pid, tid, inode)
    }

    fn listen_overflows(&mut self) -> HashMap<u32, u64> {
        self.registry.listen_overflows()
    }

    fn open_tcp_listeners(&mut self) -> Option<HashSet<u64>> {
        self.registry.open_tcp_listeners()
    }
}
