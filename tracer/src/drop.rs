//! A drop, attributed and explained: what every sink prints.
use std::time::SystemTime;

use serde::Serialize;

use crate::{attribution::process::Role, limits::Verdict};

/// Drop kinds are part of the JSON contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropKind {
    /// connect() to a UNIX stream socket refused with EAGAIN: queue full.
    UnixBacklog,
}

impl DropKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnixBacklog => "unix_backlog",
        }
    }
}

/// The process that was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Client {
    pub pid: u32,
    pub comm: String,
    pub role: Role,
}

/// The socket whose queue was full, and who owns it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ListenerView {
    pub family: &'static str,
    pub path: String,
    pub netns: Option<u32>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub role: Option<Role>,
    /// Accept-queue length sampled when droptrace handled the drop.
    pub queue: Option<u32>,
    /// Effective backlog (what the kernel compares the queue with).
    pub backlog: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct Drop {
    pub time: SystemTime,
    pub kind: DropKind,
    pub client: Client,
    pub listener: ListenerView,
    pub limit: Verdict,
}

impl ListenerView {
    /// "uwsgi[4242] uwsgi-master", or "owner unknown".
    pub fn owner_label(&self) -> String {
        match (&self.comm, self.pid, self.role) {
            (Some(comm), Some(pid), Some(role)) => format!("{comm}[{pid}] {}", role.as_str()),
            _ => "owner unknown".into(),
        }
    }
}
