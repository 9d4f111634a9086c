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
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
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
            capture.truncated = Some(format!("its last record is cut after {} bytes", tail.len()));
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::{
        drop::DropKind,
        probes::Lost,
        sinks::{write_record, TotalRecord},
        snapshot::{Host, NetnsState},
    };

    fn snapshot() -> Snapshot {
        Snapshot {
            time: "2026-11-26T10:00:00.000Z".into(),
            host: Host {
                hostname: "web1".into(),
                kernel: "6.18.0".into(),
                cpus: 2,
                file_max: Some(1 << 20),
                files_open: Some(1000),
            },
            namespaces: vec![NetnsState {
                netns: 7,
                somaxconn: Some(4096),
                ..NetnsState::default()
            }],
            processes: Vec::new(),
            listeners: Vec::new(),
        }
    }

    fn line(count: u64, millis: u64) -> Line {
        let mut drop = crate::drop::sample();
        drop.time = at(millis);
        Line {
            drop,
            count,
            first: false,
        }
    }

    fn at(millis: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_000 + millis)
    }

    /// A capture as `record` writes it: header, two drops, a summary.
    fn capture_bytes() -> Vec<u8> {
        let mut out = Vec::new();
        let header = Header {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            droptrace_version: "0.1.0".into(),
            command: vec!["droptrace".into(), "record".into()],
            snapshot: snapshot(),
        };
        write_record(&mut out, "header", &header).unwrap();
        write_record(&mut out, "drop", &line(1, 0)).unwrap();
        write_record(&mut out, "drop", &line(40, 250)).unwrap();
        let summary = SummaryRecord {
            totals: vec![TotalRecord {
                kind: DropKind::UnixBacklog,
                stage: None,
                listener: line(1, 0).drop.listener,
                client: None,
                limit: line(1, 0).drop.limit,
                count: 41,
            }],
            lost: 0,
            lost_by_cause: Lost::default(),
            kernel_listen_overflows: Vec::new(),
            duration_s: 1.0,
        };
        write_record(&mut out, "summary", &summary).unwrap();
        out
    }

    #[test]
    fn a_whole_capture_reads_back() {
        let capture = Capture::parse(&capture_bytes()).unwrap();
        assert_eq!(capture.truncated, None);
        assert_eq!(capture.header.snapshot.host.hostname, "web1");
        let counts: Vec<u64> = capture.drops.iter().map(|l| l.count).collect();
        assert_eq!(counts, [1, 40]);
        assert_eq!(capture.drops[1].drop.time, at(250));
        assert_eq!(capture.summary.unwrap().totals[0].count, 41);
    }

    #[test]
    fn a_cut_capture_is_read_up_to_its_last_complete_record() {
        let bytes = capture_bytes();
        let without_summary = &bytes[..bytes.len() - 10];
        let capture = Capture::parse(without_summary).unwrap();
        assert_eq!(capture.drops.len(), 2);
        assert!(capture.summary.is_none());
        assert!(capture.truncated.unwrap().contains("cut after"));
        // Zeros where a power cut left blocks unwritten.
        let mut zeros = bytes[..bytes.len() - 10].to_vec();
        zeros.extend([0u8; 4096]);
        zeros.push(b'\n');
        let capture = Capture::parse(&zeros).unwrap();
        assert!(capture
            .truncated
            .unwrap()
            .contains("unreadable from line 4"));
    }

    #[test]
    fn bad_input_is_one_clear_error() {
        let cases: [(&[u8], &str); 5] = [
            (b"", "not a droptrace capture"),
            (b"hello\n", "not a droptrace capture"),
            (b"{\"type\":\"drop\"}\n", "not a droptrace capture"),
            (
                b"{\"type\":\"header\",\"format\":\"droptrace-capture\",\"format_version\":9}\n",
                "written by a newer droptrace (capture format version 9",
            ),
            (b"{\"type\":\"header\",\"form", "cut inside its header"),
        ];
        for (bytes, expected) in cases {
            let err = format!("{:#}", Capture::parse(bytes).unwrap_err());
            assert!(err.contains(expected), "{bytes:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        // Damage in the middle, with good records after it.
        let bytes = capture_bytes();
        let text = String::from_utf8(bytes).unwrap();
        let damaged = text.replacen("\"type\":\"drop\"", "\"type\":\"drop\",,", 1);
        let err = format!("{:#}", Capture::parse(damaged.as_bytes()).unwrap_err());
        assert!(
            err.contains("line 2 is damaged but line 3 after it is not"),
            "{err}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The fuzz target: whatever the bytes, an answer and no panic.
        #[test]
        fn any_bytes_are_read_or_refused_without_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Capture::parse(&bytes);
        }

        /// A capture cut anywhere after its header is truncated, never bad
        /// input, and never reports more drops than it holds.
        #[test]
        fn a_capture_cut_anywhere_is_reported_as_truncated(cut in 0usize..2000) {
            let bytes = capture_bytes();
            let cut = cut.min(bytes.len());
            let header_end = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
            match Capture::parse(&bytes[..cut]) {
                Ok(capture) => {
                    prop_assert!(cut >= header_end);
                    prop_assert_eq!(capture.truncated.is_none(), cut == bytes.len());
                    prop_assert!(capture.drops.iter().map(|l| l.count).sum::<u64>() <= 41);
                }
                Err(_) => prop_assert!(cut < header_end),
            }
        }

        /// Bytes flipped inside a capture: read, truncated or refused, no panic.
        #[test]
        fn a_damaged_capture_never_panics(at in 0usize..2000, byte in any::<u8>()) {
            let mut bytes = capture_bytes();
            let at = at % bytes.len();
            bytes[at] = byte;
            let _ = Capture::parse(&bytes);
        }
    }
}
