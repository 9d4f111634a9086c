//! A drop, attributed and explained: what every sink prints.
use std::{fmt, time::SystemTime};

use serde::{Deserialize, Serialize};

use super::limit::{LimitName, Verdict};

/// Drop kinds are part of the JSON contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DropKind {
    /// connect() to a UNIX stream socket refused with EAGAIN: queue full.
    UnixBacklog,
    /// A TCP connection attempt dropped because the accept queue was full
    /// (at SYN or at ACK time: see `Drop::stage`).
    TcpAcceptQueue,
    /// A SYN dropped because the SYN queue was full (syncookies off).
    TcpSynQueue,
    /// accept/socket/open failed with EMFILE: the process's RLIMIT_NOFILE.
    Nofile,
    /// The same with ENFILE: fs.file-max, for the whole system.
    FileMax,
    /// nginx had no free connection slot ("worker_connections are not enough").
    WorkerConnections,
    /// connect() failed with EADDRNOTAVAIL: no ephemeral port left.
    EphemeralPorts,
}

impl DropKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnixBacklog => "unix_backlog",
            Self::TcpAcceptQueue => "tcp_accept_queue",
            Self::TcpSynQueue => "tcp_syn_queue",
            Self::Nofile => "nofile",
            Self::FileMax => "file_max",
            Self::WorkerConnections => "worker_connections",
            Self::EphemeralPorts => "ephemeral_ports",
        }
    }
}

contract_names! {
    /// What part a process plays in the stack, recognised from its
    /// executable and its place in the process tree.
    Role {
        NginxMaster => "nginx-master",
        NginxWorker => "nginx-worker",
        UwsgiMaster => "uwsgi-master",
        UwsgiWorker => "uwsgi-worker",
        Other => "other",
    }
}

impl Role {
    pub fn is_uwsgi(self) -> bool {
        matches!(self, Role::UwsgiMaster | Role::UwsgiWorker)
    }

    pub fn is_nginx(self) -> bool {
        matches!(self, Role::NginxMaster | Role::NginxWorker)
    }
}

contract_names! {
    /// Where a TCP connection attempt was dropped.
    Stage {
        /// The SYN, consumed silently by tcp_conn_request.
        Syn => "syn",
        /// The handshake's last ACK (TCP_LISTEN_OVERFLOW).
        Ack => "ack",
        /// An ACK carrying a SYN cookie (cookie_v4_check).
        AckSyncookie => "ack_syncookie",
    }
}

contract_names! {
    /// The syscall that needed a file descriptor and failed.
    Syscall {
        Accept => "accept",
        Accept4 => "accept4",
        Socket => "socket",
        Open => "open",
        Openat => "openat",
    }
}

impl Syscall {
    pub fn is_accept(self) -> bool {
        matches!(self, Self::Accept | Self::Accept4)
    }
}

contract_names! {
    /// A listener's address family.
    Family {
        // In the order of their names: listener tables sort by it.
        Tcp => "tcp",
        Tcp6 => "tcp6",
        Unix => "unix",
    }
}

/// Who was refused: a local process (UNIX; TCP from this machine) and/or
/// a remote address (TCP). Absent fields are left out of the JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default)]
pub struct Client {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// nofile and file_max: the syscall that failed ("accept4", "socket").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syscall: Option<Syscall>,
}

impl Client {
    /// "nginx[3363] nginx-worker", "127.0.0.1:53412", or both.
    pub fn label(&self) -> String {
        let process = match (&self.comm, self.pid, self.role) {
            (Some(comm), Some(pid), Some(role)) => Some(format!("{comm}[{pid}] {}", role.as_str())),
            _ => None,
        };
        let address = match (&self.addr, self.port) {
            (Some(addr), Some(port)) => Some(socket_label(addr, port)),
            _ => None,
        };
        match (process, address) {
            (Some(p), Some(a)) => format!("{p} from {a}"),
            (Some(p), None) => p,
            (None, Some(a)) => a,
            (None, None) => "unknown client".into(),
        }
    }
}

/// "127.0.0.1:80", "[::1]:80".
pub fn socket_label(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// The socket whose queue was full, and who owns it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ListenerView {
    pub family: Family,
    /// UNIX listeners: the path, or "@name" for abstract ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// TCP listeners: the bound address and port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub netns: Option<u32>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub role: Option<Role>,
    /// Accept-queue length sampled when droptrace handled the drop.
    pub queue: Option<u32>,
    /// Effective backlog (what the kernel compares the queue with).
    pub backlog: Option<u32>,
}

/// Field names are the JSON contract (README, `droptrace schema`).
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Drop {
    #[serde(with = "wall_time")]
    #[schemars(with = "String")]
    pub time: SystemTime,
    pub kind: DropKind,
    /// TCP accept-queue drops: where in the handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    pub client: Client,
    /// The socket whose queue was full; for ephemeral_ports the destination.
    /// None for nofile, file_max and worker_connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<ListenerView>,
    pub limit: Verdict,
    /// An earlier drop that made this one happen: a listener overflows
    /// while its owner, out of descriptors, stopped accepting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caused_by: Option<Cause>,
}

/// The root cause of a drop, to fix first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Cause {
    pub kind: DropKind,
    pub time: String,
    pub pid: u32,
    pub comm: String,
    #[serde(default)]
    pub syscall: Option<Syscall>,
    pub limit: LimitName,
    pub value: Option<u64>,
}

impl Drop {
    /// What identifies a drop in a storm and in the summary: the listener,
    /// or for drops without one, the process (by name and role) and syscall.
    pub fn subject(&self) -> String {
        match &self.listener {
            Some(listener) => listener.label(),
            None => format!(
                "{} {}{}",
                self.client.comm.as_deref().unwrap_or("?"),
                self.client.role.map_or("other", Role::as_str),
                self.client
                    .syscall
                    .map_or(String::new(), |s| format!(" {s}()"))
            ),
        }
    }
}

impl Drop {
    /// The listener that refused, if the drop has one of its own: not for
    /// ephemeral_ports, whose "listener" is the far end.
    pub fn refusing_listener(&self) -> Option<&ListenerView> {
        self.listener
            .as_ref()
            .filter(|_| self.kind != DropKind::EphemeralPorts)
    }

    /// Who a summary row names beside the subject: the refusing listener's
    /// owner, or else the process that failed.
    pub fn owner_or_client(&self) -> String {
        match self.refusing_listener() {
            Some(listener) => listener.owner_label(),
            None => self.client.label(),
        }
    }

    /// The role of that same process, when known.
    pub fn owner_or_client_role(&self) -> Option<Role> {
        match self.refusing_listener() {
            Some(listener) => listener.role,
            None => self.client.role,
        }
    }
}

impl ListenerView {
    /// "/run/app.sock", "127.0.0.1:19090", or "listener unknown".
    pub fn label(&self) -> String {
        match (&self.path, &self.addr, self.port) {
            (Some(path), _, _) => path.clone(),
            (None, Some(addr), Some(port)) => socket_label(addr, port),
            _ => "listener unknown".into(),
        }
    }

    /// "uwsgi[4242] uwsgi-master", or "owner unknown".
    pub fn owner_label(&self) -> String {
        match (&self.comm, self.pid, self.role) {
            (Some(comm), Some(pid), Some(role)) => format!("{comm}[{pid}] {}", role.as_str()),
            _ => "owner unknown".into(),
        }
    }
}

/// What an operator should know before any drop happens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    /// listen() asked for more than net.core.somaxconn; the kernel clamped it.
    BacklogClamped,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Notice {
    #[serde(with = "wall_time")]
    #[schemars(with = "String")]
    pub time: SystemTime,
    pub kind: NoticeKind,
    pub listener: ListenerView,
    pub requested: u32,
    pub effective: u32,
    pub somaxconn: u32,
    pub fix: String,
}

/// RFC 3339 in UTC with milliseconds, as every record writes times.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// Times in JSON: RFC 3339 in UTC with milliseconds.
pub mod wall_time {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_millis(*time))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

/// A uWSGI listen-queue drop as the tests of several modules need one.
#[cfg(test)]
pub fn sample() -> Drop {
    Drop {
        time: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_790_000_000_123),
        kind: DropKind::UnixBacklog,
        stage: None,
        client: Client {
            pid: Some(3363),
            comm: Some("nginx".into()),
            role: Some(Role::NginxWorker),
            ..Client::default()
        },
        listener: Some(ListenerView {
            family: Family::Unix,
            path: Some("/run/app.sock".into()),
            addr: None,
            port: None,
            netns: Some(4026531840),
            pid: Some(3300),
            comm: Some("uwsgi".into()),
            role: Some(Role::UwsgiMaster),
            queue: Some(101),
            backlog: Some(100),
        }),
        limit: Verdict {
            name: LimitName::UwsgiListen,
            value: Some(100),
            hard: None,
            source: "uWSGI default, no listen option set".into(),
            fix: "set listen".into(),
        },
        caused_by: None,
    }
}
