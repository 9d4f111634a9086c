//! A capture read back: every record of a `droptrace record` file, and
//! whether (and why) it ends early. Never panics, whatever the bytes.
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize};

use crate::contract::{
    CountersRecord, Header, Line, Notice, QueuesRecord, Record, SummaryRecord, FORMAT,
    FORMAT_VERSION,
};

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
        match typed(line, number)? {
            Record::Drop(line) => self.drops.push(line),
            Record::Notice(notice) => self.notices.push(notice),
            Record::Counters(counters) => self.counters.push(counters),
            Record::Queues(queues) => self.queues.push(queues),
            Record::Summary(summary) => self.summary = Some(summary),
            Record::Header(_) => bail!("line {number} is a second header"),
            Record::Unknown => self.unknown_records += 1,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use proptest::prelude::*;

    use super::*;
    use crate::{
        contract::{DropKind, HostFacts, Lost, NetnsState, Snapshot, TotalRecord},
        sinks::write_record,
    };

    fn snapshot() -> Snapshot {
        Snapshot {
            time: "2026-11-26T10:00:00.000Z".into(),
            host: HostFacts {
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
        let mut drop = crate::contract::sample();
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
        write_record(&mut out, &Record::Header(header)).unwrap();
        write_record(&mut out, &Record::Drop(line(1, 0))).unwrap();
        write_record(&mut out, &Record::Drop(line(40, 250))).unwrap();
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
            details_dropped: 0,
            lost_by_cause: Lost::default(),
            kernel_listen_overflows: Vec::new(),
            duration_s: 1.0,
        };
        write_record(&mut out, &Record::Summary(summary)).unwrap();
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

        /// The analysis, its text and the HTML page take any counts and
        /// times a capture may claim (near 1970, centuries ahead, sums past
        /// u64): no panic, and the total saturates rather than wraps.
        #[test]
        fn any_counts_and_times_are_analysed_and_rendered(
            drops in proptest::collection::vec((any::<u64>(), 0u64..(1u64 << 45)), 0..8),
        ) {
            let mut out = Vec::new();
            let header = Header {
                format: FORMAT.into(),
                format_version: FORMAT_VERSION,
                droptrace_version: "0.1.0".into(),
                command: vec!["droptrace".into()],
                snapshot: snapshot(),
            };
            write_record(&mut out, &Record::Header(header)).unwrap();
            for &(count, millis) in &drops {
                let mut drop = line(count, 0);
                drop.drop.time = SystemTime::UNIX_EPOCH + Duration::from_millis(millis);
                write_record(&mut out, &Record::Drop(drop)).unwrap();
            }
            let capture = Capture::parse(&out).unwrap();
            let analysis = super::super::analysis::Analysis::from_captures(
                &[std::path::PathBuf::from("capture")],
                vec![capture],
            );
            let page = super::super::html::page(&analysis);
            prop_assert!(page.ends_with("</html>\n") || page.ends_with("</html>"));
            let mut text = Vec::new();
            analysis.write_text(&mut text).unwrap();
            let total = drops.iter().fold(0u64, |sum, (count, _)| sum.saturating_add(*count));
            prop_assert_eq!(analysis.json.drops, total);
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
