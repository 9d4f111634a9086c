//! A host made of facts a test sets: what the families see, without /proc,
//! sock_diag or root.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use tracer_common::ListenRecord;

use super::{
    address::UnixAddress,
    listeners::{Listener, Task},
    owners::Owner,
    process::Process,
    rlimits::Setter,
    Host,
};
use crate::{
    config::{nginx::NginxConfig, uwsgi::UwsgiConfig, Setting},
    contract::Role,
};

/// A UNIX listener as a test describes it.
#[derive(Clone, Debug)]
pub struct FakeListener {
    pub path: String,
    pub inode: u64,
    pub netns: u32,
    pub backlog: u32,
    pub requested: Option<u32>,
    pub somaxconn: Option<u32>,
    pub owner: Option<Process>,
    pub queue: Option<u32>,
}

#[derive(Default)]
pub struct FakeHost {
    pub processes: HashMap<u32, Process>,
    pub parents: HashMap<u32, u32>,
    /// uWSGI masters' `listen` setting, by pid.
    pub uwsgi_listen: HashMap<u32, Setting>,
    /// nginx configurations, by master pid.
    pub nginx: HashMap<u32, Arc<NginxConfig>>,
    pub setters: HashMap<u32, Setter>,
    pub units: HashMap<u32, String>,
    pub file_max: (Option<u64>, Option<u64>),
    pub port_ranges: HashMap<u32, (u32, u32)>,
    pub unix_listeners: Vec<FakeListener>,
    /// Socket inode -> owning pid.
    pub socket_owners: HashMap<u64, u32>,
    pub tcp_addresses: HashMap<u64, (IpAddr, u16)>,
    pub listen_overflows: HashMap<u32, u64>,
    /// listen() records the host was told about.
    pub listens: Vec<ListenRecord>,
}

impl FakeHost {
    /// A running process; returns it for use as an owner.
    pub fn add_process(&mut self, pid: u32, comm: &str, role: Role, ppid: Option<u32>) -> Process {
        let process = Process {
            pid,
            comm: comm.into(),
            cmdline: vec![comm.into()],
            role,
        };
        self.processes.insert(pid, process.clone());
        if let Some(ppid) = ppid {
            self.parents.insert(pid, ppid);
        }
        process
    }

    fn uwsgi(&self, pid: u32) -> UwsgiConfig {
        let mut config = UwsgiConfig::default();
        if let Some(listen) = self.uwsgi_listen.get(&pid) {
            config.listen = listen.clone();
        }
        config
    }
}

impl Host for FakeHost {
    fn process(&mut self, pid: u32) -> Option<Process> {
        self.processes.get(&pid).cloned()
    }

    fn parent_of(&mut self, pid: u32) -> Option<u32> {
        self.parents.get(&pid).copied()
    }

    fn owner(&mut self, process: Process) -> Owner {
        let uwsgi = process.role.is_uwsgi().then(|| self.uwsgi(process.pid));
        let nginx = self.nginx_config(&process);
        Owner {
            process,
            uwsgi,
            nginx,
        }
    }

    fn nginx_master(&mut self, process: &Process) -> Option<Process> {
        match process.role {
            Role::NginxMaster => Some(process.clone()),
            Role::NginxWorker => {
                let parent = self.parent_of(process.pid)?;
                self.process(parent)
            }
            _ => None,
        }
    }

    fn nginx_config(&mut self, process: &Process) -> Option<Arc<NginxConfig>> {
        let master = self.nginx_master(process)?;
        self.nginx.get(&master.pid).cloned()
    }

    fn uwsgi_config(&mut self, process: &Process) -> UwsgiConfig {
        self.uwsgi(process.pid)
    }

    fn nofile_setter(&mut self, pid: u32, _soft: u64) -> Option<Setter> {
        self.setters.get(&pid).cloned()
    }

    fn systemd_unit(&mut self, pid: u32) -> Option<String> {
        self.units.get(&pid).cloned()
    }

    fn file_max(&mut self) -> (Option<u64>, Option<u64>) {
        self.file_max
    }

    fn ip_local_port_range(&mut self, netns: u32) -> Option<(u32, u32)> {
        self.port_ranges.get(&netns).copied()
    }

    fn unix_listener(&mut self, _client: Task, address: &UnixAddress) -> Option<Listener> {
        let wanted = address.to_string();
        let fake = self
            .unix_listeners
            .iter()
            .find(|l| l.path == wanted)?
            .clone();
        Some(Listener {
            inode: fake.inode,
            netns: fake.netns,
            address: address.clone(),
            file: None,
            backlog: fake.backlog,
            requested: fake.requested,
            somaxconn: fake.somaxconn,
            owner: fake.owner.map(|p| self.owner(p)),
        })
    }

    fn unix_queue(&mut self, listener: &Listener) -> Option<u32> {
        self.unix_listeners
            .iter()
            .find(|l| l.inode == listener.inode)?
            .queue
    }

    fn unix_listen(&mut self, record: &ListenRecord) {
        self.listens.push(*record);
    }

    fn socket_owners(&mut self, inodes: &HashSet<u64>) -> HashMap<u64, Process> {
        inodes
            .iter()
            .filter_map(|inode| {
                let pid = self.socket_owners.get(inode)?;
                Some((*inode, self.processes.get(pid)?.clone()))
            })
            .collect()
    }

    fn tcp_local_address(&mut self, _pid: u32, _tid: u32, inode: u64) -> Option<(IpAddr, u16)> {
        self.tcp_addresses.get(&inode).copied()
    }

    fn listen_overflows(&mut self) -> HashMap<u32, u64> {
        self.listen_overflows.clone()
    }

    /// The sockets some process holds stand for the listening ones.
    fn open_tcp_listeners(&mut self) -> Option<HashSet<u64>> {
        Some(self.socket_owners.keys().copied().collect())
    }
}
