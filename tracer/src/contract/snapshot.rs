//! The host at one moment, as a capture's header holds it.
use serde::{Deserialize, Serialize};

use super::drop::{ListenerView, Role};
use crate::config::{nginx::NginxConfig, uwsgi::UwsgiConfig};

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Snapshot {
    pub time: String,
    pub host: HostFacts,
    pub namespaces: Vec<NetnsState>,
    pub processes: Vec<ProcessState>,
    pub listeners: Vec<ListenerView>,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HostFacts {
    pub hostname: String,
    /// `uname -r`.
    pub kernel: String,
    /// Online CPUs: what nginx's `worker_processes auto` starts.
    pub cpus: u32,
    /// fs.file-max, and the files open on the whole system (fs.file-nr).
    pub file_max: Option<u64>,
    pub files_open: Option<u64>,
}

/// The sysctls of one network namespace that bound its queues and ports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NetnsState {
    pub netns: u32,
    pub somaxconn: Option<u32>,
    pub tcp_max_syn_backlog: Option<u32>,
    pub tcp_syncookies: Option<u32>,
    pub tcp_abort_on_overflow: Option<u32>,
    /// net.ipv4.ip_local_port_range: [low, high].
    pub ip_local_port_range: Option<(u32, u32)>,
    pub counters: Option<ListenCounters>,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ProcessState {
    pub pid: u32,
    pub ppid: Option<u32>,
    pub comm: String,
    pub role: Role,
    pub cmdline: Vec<String>,
    pub netns: Option<u32>,
    pub nofile: Option<Nofile>,
    /// nginx masters: the configuration they run with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nginx: Option<NginxConfig>,
    /// uWSGI masters: the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uwsgi: Option<UwsgiConfig>,
}

/// Soft and hard RLIMIT_NOFILE ("unlimited" is u64::MAX).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Nofile {
    pub soft: u64,
    pub hard: u64,
}

/// TcpExt counters of one namespace that count listen-queue drops.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub struct ListenCounters {
    /// Accept queue full (at SYN or ACK time).
    #[serde(rename = "ListenOverflows")]
    pub listen_overflows: u64,
    /// Every drop at a listener, overflows included.
    #[serde(rename = "ListenDrops")]
    pub listen_drops: u64,
    /// SYN queue full, syncookies off: SYN dropped.
    #[serde(rename = "TCPReqQFullDrop")]
    pub req_q_full_drop: u64,
    /// SYN queue full, answered with a syncookie.
    #[serde(rename = "TCPReqQFullDoCookies")]
    pub req_q_full_do_cookies: u64,
}
