//! The capture file: what `droptrace record` writes and `droptrace report`
//! reads, on another machine, later.
//!
//! JSON Lines, one record per line, each `{"type": ...}`:
//! - `header` first: format name and version, droptrace's version, the
//!   command line, and a [`Snapshot`] of the host;
//! - `drop` and `notice` records exactly as `droptrace --json` prints them;
//! - `counters` every second: the kernel's listen-queue counters per netns;
//! - `queues` every second: queue length and backlog of watched listeners;
//! - `summary` last (the footer): totals, lost events, kernel reconciliation.
//!
//! Every record is written with one write(2) and flushed, so a capture cut
//! by SIGKILL, a crash or a full disk is readable up to its last complete
//! line; a capture without its `summary` is reported as truncated.
use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{
    attribution::sock_diag::ListenCounters,
    drop::{wall_time, Notice},
    sinks::{aggregate::Line, SummaryRecord},
    snapshot::Snapshot,
};

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

/// A capture file being written: created 0600, never through a symlink,
/// never over an existing file.
pub struct CaptureWriter {
    file: File,
    path: PathBuf,
    /// The record being assembled; written out whole on flush().
    pending: Vec<u8>,
    written: u64,
}

impl CaptureWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|err| match err.kind() {
                io::ErrorKind::AlreadyExists => anyhow::anyhow!(
                    "{} already exists: droptrace never overwrites a file (nor follows a symlink); remove it or choose another name",
                    path.display()
                ),
                _ => anyhow::Error::new(err).context(format!("cannot create {}", path.display())),
            })?;
        Ok(Self {
            file,
            path: path.to_owned(),
            pending: Vec::new(),
            written: 0,
        })
    }

    pub fn header(&mut self, command: Vec<String>, snapshot: Snapshot) -> Result<()> {
        let header = Header {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            droptrace_version: env!("CARGO_PKG_VERSION").into(),
            command,
            snapshot,
        };
        crate::sinks::write_record(self, "header", &header)
            .with_context(|| format!("cannot write to {}", self.path.display()))
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.written
    }

    /// Push what was written to the disk (once a second: a power cut then
    /// loses at most that much).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl Write for CaptureWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    /// One record, one write: a reader never sees half of one unless the
    /// disk filled or the machine stopped mid-write.
    fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = self.file.write_all(&self.pending);
        self.written += self.pending.len() as u64;
        self.pending.clear();
        result.map_err(|err| {
            io::Error::new(
                err.kind(),
                format!(
                    "cannot write to {} after {} bytes: {err}",
                    self.path.display(),
                    self.written
                ),
            )
        })
    }
}

/// A capture read back.
#[derive(Debug)]
pub struct Capture {
    pub header: Header,
    pub drops: Vec<Line>,
    pub notices: Vec<Notice>,
    pub counters: Vec<CountersRecord>,
    pub queues: Vec<QueuesRecord>,
    pub summary: Option<SummaryRecord>,
    /// Why the capture ends early, when it does.
    pub truncated: Option<String>,
    /// Records of types this droptrace does not know (skipped).
    pub unknown_records: usize,
}

#[derive(Deserialize, schemars::JsonSchema)]
struct Tag {
    #[serde(rename = "type")]
    record: String,
}

/// The first line's fields that say whether it can be read at all.
#[derive(Deserialize, schemars::JsonSchema)]
struct Preamble {
    #[serde(rename = "type")]
    record: String,
    format: Option<String>,
    format_version: Option<u32>,
}

fn typed<T: DeserializeOwned>(line: &str, number: usize) -> Result<T> {
    serde_json::from_str(line).with_context(|| format!("line {number} is not a valid record"))
}

impl Capture {
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&bytes).with_context(|| path.display().to_string())
    }

    /// Parse a whole capture. Never panics, whatever the bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        // Every complete record ends in a newline; what follows the last
        // one is a record cut in the middle.
        let (complete, tail) = match bytes.iter().rposition(|&b| b == b'\n') {
            Some(end) => (&bytes[..end], &bytes[end + 1..]),
            None => (&b""[..], bytes),
        };
        let mut lines = complete.split(|&b| b == b'\n').enumerate();
        let Some((_, first)) = lines.next().filter(|_| !complete.is_empty()) else {
            if tail.starts_with(b"{\"type\":\"header\"") {
                bail!("the capture was cut inside its header: there is nothing to report");
            }
            bail!("not a droptrace capture (empty, or no complete first line)");
        };
        let header = Self::header(first)?;
        let mut capture = Capture {
            header,
            drops: Vec::new(),
            notices: Vec::new(),
            counters: Vec::new(),
            queues: Vec::new(),
            summary: None,
            truncated: None,
            unknown_records: 0,
        };
        // A line that cannot be read is corruption if good records follow
        // it, and the end of a cut capture (zeros after a power cut) if not.
        let mut unreadable: Option<(usize, anyhow::Error)> = None;
        for (index, raw) in lines {
            let number = index + 1;
            match capture.add(raw, number) {
                Ok(()) => {
                    if let Some((bad, err)) = unreadable.take() {
                        return Err(err.context(format!(
                            "line {bad} is damaged but line {number} after it is not"
                        )));
                    }
                }
                Err(err) => {
                    unreadable.get_or_insert((number, err));
                }
            }
        }
        if let Some((bad, err)) = unreadable {
            capture.truncated = Some(format!(
                "the capture is unreadable from line {bad} on ({err:#})"
            ));
        } else if !tail.is_empty() {
            capture.truncated = Some(format!(
                "its last record is cut after {} bytes",
                tail.len()
            ));
        } else if capture.summary.is_none() {
            capture.truncated = Some("it has no summary record".into());
        }
        Ok(capture)
    }

    fn header(line: &[u8]) -> Result<Header> {
        let not_a_capture = "not a droptrace capture (its first line is not a capture header)";
        let text = std::str::from_utf8(line).map_err(|_| anyhow::anyhow!(not_a_capture))?;
        let preamble: Preamble =
            serde_json::from_str(text).map_err(|_| anyhow::anyhow!(not_a_capture))?;
        if preamble.record != "header" || preamble.format.as_deref() != Some(FORMAT) {
            bail!(not_a_capture);
        }
        match preamble.format_version {
            Some(version) if version > FORMAT_VERSION => bail!(
                "written by a newer droptrace (capture format version {version}; this droptrace reads up to {FORMAT_VERSION}): read it with a newer droptrace"
            ),
            Some(_) => {}
            None => bail!(not_a_capture),
        }
        serde_json::from_str(text).context("its header is damaged")
    }

    fn add(&mut self, raw: &[u8], number: usize) -> Result<()> {
        let line = std::str::from_utf8(raw)
            .map_err(|_| anyhow::anyhow!("line {number} holds bytes that are not UTF-8"))?;
        let tag: Tag = typed(line, number)?;
        match tag.record.as_str() {
            "drop" => self.drops.push(typed(line, number)?),
            "notice" => self.notices.push(typed(line, number)?),
            "counters" => self.counters.push(typed(line, number)?),
            "queues" => self.queues.push(typed(line, number)?),
            "summary" => self.summary = Some(typed(line, number)?),
            "header" => bail!("line {number} is a second header"),
            _ => self.unknown_records += 1,
        }
        Ok(())
    }
}
