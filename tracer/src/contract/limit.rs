//! Which limit a drop hit: part of the JSON contract.
use std::fmt;

use serde::{Deserialize, Serialize};

contract_names! {
    /// The limit behind a drop.
    LimitName {
        /// net.core.somaxconn clamped the backlog the owner asked for.
        Somaxconn => "somaxconn",
        /// uWSGI's `listen` option.
        UwsgiListen => "uwsgi_listen",
        /// nginx's `listen ... backlog=` (511 by default on Linux).
        NginxListenBacklog => "nginx_listen_backlog",
        /// Any other program's listen() backlog.
        AppBacklog => "app_backlog",
        /// The effective backlog equals somaxconn but the requested one was not
        /// seen: either could be the limit.
        BacklogAmbiguous => "backlog_ambiguous",
        /// net.ipv4.tcp_max_syn_backlog, with syncookies off.
        TcpMaxSynBacklog => "tcp_max_syn_backlog",
        /// RLIMIT_NOFILE of the process (EMFILE).
        RlimitNofile => "rlimit_nofile",
        /// fs.file-max, the system-wide open-file limit (ENFILE).
        FileMax => "file_max",
        /// nginx's worker_connections.
        WorkerConnections => "worker_connections",
        /// net.ipv4.ip_local_port_range: no ephemeral port left.
        IpLocalPortRange => "ip_local_port_range",
        /// The listener could not be found (it closed before we looked).
        Unknown => "unknown",
    }
}

/// The limit a drop hit, its value, where that value came from, and the fix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Verdict {
    pub name: LimitName,
    /// The number that was hit.
    pub value: Option<u64>,
    /// rlimit_nofile: the hard limit beside the soft one that was hit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard: Option<u64>,
    /// Where that number came from.
    pub source: String,
    /// One line: what to change.
    pub fix: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_serialise_as_the_json_contract_says() {
        for name in [
            LimitName::Somaxconn,
            LimitName::UwsgiListen,
            LimitName::NginxListenBacklog,
            LimitName::AppBacklog,
            LimitName::BacklogAmbiguous,
            LimitName::TcpMaxSynBacklog,
            LimitName::RlimitNofile,
            LimitName::FileMax,
            LimitName::WorkerConnections,
            LimitName::IpLocalPortRange,
            LimitName::Unknown,
        ] {
            assert_eq!(serde_json::to_value(name).unwrap(), name.as_str());
        }
    }
}
