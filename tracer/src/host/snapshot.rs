//! The host at one moment: sysctls and listen-queue counters per network
//! namespace, the watched processes with their open-file limits and
//! configurations, and the listener table with queues and backlogs.
//! `record` writes one at the head of a capture; `doctor` reads risks off
//! one. Nothing here needs eBPF.
use std::{
    collections::{HashMap, HashSet},
    fs,
    time::SystemTime,
};

use anyhow::Result;

use super::{
    configs, owners,
    process::{self, PidFilter},
    rlimits,
    sock_diag::{self, in_netns, Netns, NetnsView},
};
use crate::contract::{
    rfc3339, Family, HostFacts, ListenerView, NetnsState, ProcessState, Role, Snapshot,
};

impl Snapshot {
    /// Look at the host now. With a filter, only the covered processes and
    /// the listeners they own; without, every listener and its owner, and
    /// every nginx and uWSGI process. Also returns the views of the
    /// namespaces it lists, to read their counters again later.
    pub fn take(filter: &mut PidFilter) -> (Self, HashMap<u32, NetnsView>) {
        let mut listeners: Vec<(u64, ListenerView)> = Vec::new();
        let mut states: HashMap<u32, NetnsState> = HashMap::new();
        let mut views: HashMap<u32, NetnsView> = HashMap::new();
        for netns in sock_diag::namespaces() {
            match look_into(&netns) {
                Ok((view, state)) => {
                    listeners.extend(listener_table(netns.inode, &view));
                    states.insert(netns.inode, state);
                    views.insert(netns.inode, view);
                }
                Err(err) => {
                    tracing::warn!("skipping network namespace {}: {err:#}", netns.inode);
                    states.insert(
                        netns.inode,
                        NetnsState {
                            netns: netns.inode,
                            ..NetnsState::default()
                        },
                    );
                }
            }
        }

        let inodes: HashSet<u64> = listeners.iter().map(|(inode, _)| *inode).collect();
        let owners = owners::owners_of(&inodes);
        let mut owner_pids = HashSet::new();
        for (inode, view) in &mut listeners {
            if let Some(owner) = owners.get(inode) {
                view.pid = Some(owner.pid);
                view.comm = Some(owner.comm.clone());
                view.role = Some(owner.role);
                owner_pids.insert(owner.pid);
            }
        }
        let watches_everything = filter.watches_everything();
        let mut listeners: Vec<ListenerView> = listeners
            .into_iter()
            .map(|(_, view)| view)
            .filter(|view| watches_everything || view.pid.is_some_and(|pid| filter.covers(pid)))
            .collect();
        listeners.sort_by_key(|l| (l.netns, l.family, l.label()));

        let mut processes: Vec<ProcessState> = process::all_pids()
            .into_iter()
            .filter_map(process::inspect)
            .filter(|p| {
                if watches_everything {
                    p.role != Role::Other || owner_pids.contains(&p.pid)
                } else {
                    filter.covers(p.pid)
                }
            })
            .map(|p| ProcessState {
                ppid: process::parent_of(p.pid),
                netns: sock_diag::netns_inode(format!("/proc/{}/ns/net", p.pid).as_ref()),
                nofile: rlimits::nofile_of(p.pid),
                nginx: (p.role == Role::NginxMaster)
                    .then(|| configs::nginx_of(&p))
                    .flatten()
                    .map(|c| (*c).clone()),
                uwsgi: (p.role == Role::UwsgiMaster).then(|| configs::uwsgi_of(&p)),
                pid: p.pid,
                comm: p.comm,
                role: p.role,
                cmdline: p.cmdline,
            })
            .collect();
        processes.sort_by_key(|p| p.pid);

        // The namespaces the table above lives in.
        let wanted: HashSet<u32> = listeners
            .iter()
            .filter_map(|l| l.netns)
            .chain(processes.iter().filter_map(|p| p.netns))
            .collect();
        let mut namespaces: Vec<NetnsState> = states
            .into_values()
            .filter(|s| wanted.contains(&s.netns))
            .collect();
        namespaces.sort_by_key(|s| s.netns);
        views.retain(|netns, _| wanted.contains(netns));

        let snapshot = Snapshot {
            time: rfc3339(SystemTime::now()),
            host: HostFacts::now(),
            namespaces,
            processes,
            listeners,
        };
        (snapshot, views)
    }

    pub fn netns(&self, netns: Option<u32>) -> Option<&NetnsState> {
        self.namespaces.iter().find(|s| Some(s.netns) == netns)
    }

    pub fn process(&self, pid: u32) -> Option<&ProcessState> {
        self.processes.iter().find(|p| p.pid == pid)
    }
}

impl HostFacts {
    fn now() -> Self {
        let text = |path: &str| {
            fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        let (file_max, files_open) = super::file_max();
        // SAFETY: sysconf has no memory effects.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        HostFacts {
            hostname: text("/proc/sys/kernel/hostname"),
            kernel: text("/proc/sys/kernel/osrelease"),
            cpus: u32::try_from(cpus).unwrap_or(1),
            file_max,
            files_open,
        }
    }
}

/// A view of a namespace and its queue-related sysctls, both read inside
/// it on one thread.
fn look_into(netns: &Netns) -> Result<(NetnsView, NetnsState)> {
    let inode = netns.inode;
    in_netns(netns, move || -> Result<(NetnsView, NetnsState)> {
        let view = NetnsView::open_here()?;
        let number = |name: &str| -> Option<u32> {
            fs::read_to_string(format!("/proc/sys/net/{name}"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let state = NetnsState {
            netns: inode,
            somaxconn: view.somaxconn,
            tcp_max_syn_backlog: number("ipv4/tcp_max_syn_backlog"),
            tcp_syncookies: number("ipv4/tcp_syncookies"),
            tcp_abort_on_overflow: number("ipv4/tcp_abort_on_overflow"),
            ip_local_port_range: view.ip_local_port_range(),
            counters: view.counters(),
        };
        Ok((view, state))
    })?
}

/// Every UNIX and TCP listener of a namespace, by socket inode, without
/// owners.
pub fn listener_table(netns: u32, view: &NetnsView) -> Vec<(u64, ListenerView)> {
    let blank = |family| ListenerView {
        family,
        path: None,
        addr: None,
        port: None,
        netns: Some(netns),
        pid: None,
        comm: None,
        role: None,
        queue: None,
        backlog: None,
    };
    let mut table = Vec::new();
    match view.unix_listeners() {
        Ok(entries) => table.extend(entries.into_iter().map(|entry| {
            let mut listener = blank(Family::Unix);
            listener.path = entry.address.map(|a| a.to_string());
            listener.queue = Some(entry.queue);
            listener.backlog = Some(entry.backlog);
            (entry.inode, listener)
        })),
        Err(err) => tracing::warn!("netns {netns}: cannot list UNIX listeners: {err:#}"),
    }
    match view.tcp_listeners() {
        Ok(entries) => table.extend(entries.into_iter().map(|entry| {
            let (ip, port) = entry.address;
            let mut listener = blank(if ip.is_ipv6() {
                Family::Tcp6
            } else {
                Family::Tcp
            });
            listener.addr = Some(ip.to_string());
            listener.port = Some(port);
            listener.queue = Some(entry.queue);
            listener.backlog = Some(entry.backlog);
            (entry.inode, listener)
        })),
        Err(err) => tracing::warn!("netns {netns}: cannot list TCP listeners: {err:#}"),
    }
    table
}
