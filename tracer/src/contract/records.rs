//! The records of a JSON Lines stream (`--json`) and of a capture.
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{
    drop::{wall_time, Client, Drop, DropKind, ListenerView, Notice, Stage},
    limit::Verdict,
    snapshot::{ListenCounters, Snapshot},
};

/// One line of `--json` output or of a capture, told apart by `"type"`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Header(Header),
    Drop(Line),
    Notice(Notice),
    Counters(CountersRecord),
    Queues(QueuesRecord),
    Summary(SummaryRecord),
    /// A record of a type this droptrace does not know (a newer writer's):
    /// readers skip it.
    #[serde(other)]
    Unknown,
}

impl Record {
    /// The `"type"` of every record droptrace writes, in the order a capture
    /// holds them.
    pub const TYPES: [&'static str; 6] =
        ["header", "drop", "notice", "counters", "queues", "summary"];
}

pub const FORMAT: &str = "droptrace-capture";
/// Bumped when a reader of the previous version would misread a capture.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Header {
    pub format: String,
    pub format_version: u32,
    pub droptrace_version: String,
    /// droptrace's own command line.
    pub command: Vec<String>,
    pub snapshot: Snapshot,
}

/// The kernel's listen-queue counters of each watched namespace (absolute
/// values, as `nstat -a` shows them).
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CountersRecord {
    #[serde(with = "wall_time")]
    #[schemars(with = "String")]
    pub time: SystemTime,
    pub namespaces: Vec<NetnsCounters>,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NetnsCounters {
    pub netns: u32,
    #[serde(flatten)]
    pub counters: ListenCounters,
}

/// Queue length against backlog of the watched listeners, now.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct QueuesRecord {
    #[serde(with = "wall_time")]
    #[schemars(with = "String")]
    pub time: SystemTime,
    pub listeners: Vec<QueueSample>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct QueueSample {
    /// "/run/app.sock", "127.0.0.1:8080".
    pub listener: String,
    pub netns: Option<u32>,
    pub queue: u32,
    pub backlog: u32,
}

/// One line to print: the latest drop of its key and how many it stands
/// for (all of them happened after the previous line of the key).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Line {
    #[serde(flatten)]
    pub drop: Drop,
    pub count: u64,
    /// True for the first line of its key (the one that carries the fix).
    #[serde(skip)]
    pub first: bool,
}

/// A summary total: field names are the JSON contract (README).
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TotalRecord {
    pub kind: DropKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<ListenerView>,
    /// Drops without a listener are told apart by process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<Client>,
    pub limit: Verdict,
    pub count: u64,
}

/// `{"type":"summary"}`: the last record of a live JSON run and of a capture.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SummaryRecord {
    pub totals: Vec<TotalRecord>,
    /// Drops the kernel could not count (its tables were full): the totals
    /// are short by this much.
    pub lost: u64,
    /// Sampled records (who, when) and listen() records the ring buffer had
    /// no room for: the counts are exact all the same, some drops are
    /// explained with fewer details.
    #[serde(default)]
    pub details_dropped: u64,
    pub lost_by_cause: Lost,
    pub kernel_listen_overflows: Vec<Reconciliation>,
    pub duration_s: f64,
}

/// droptrace's TCP accept-queue overflows next to the kernel's own
/// counter, for one network namespace, over droptrace's run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Reconciliation {
    pub netns: u32,
    pub droptrace: u64,
    /// Delta of TcpExtListenOverflows over the same window.
    pub kernel: u64,
}

/// Everything the kernel could not hand over, by cause.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
pub struct Lost {
    /// Records, not drops: see `SummaryRecord::details_dropped`.
    pub ring_buffer_full: u64,
    /// Connects whose address could not be kept from entry to exit.
    pub pending_map_full: u64,
    /// Drops under a key the kernel's counter table had no room for.
    pub counter_map_full: u64,
}

impl Lost {
    /// Each cause with its count, named as in JSON.
    pub fn by_cause(&self) -> [(&'static str, u64); 3] {
        [
            ("ring_buffer_full", self.ring_buffer_full),
            ("pending_map_full", self.pending_map_full),
            ("counter_map_full", self.counter_map_full),
        ]
    }

    /// Drops that were not counted.
    pub fn total(&self) -> u64 {
        self.pending_map_full + self.counter_map_full
    }
}
