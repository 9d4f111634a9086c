//! Where drops go: the terminal (one short line each), JSON Lines, or a
//! capture file. Terminal and JSON write results to stdout only;
//! diagnostics go to stderr through tracing.
pub mod aggregate;
pub mod capture;
pub mod prometheus;
pub mod terminal;

use std::{
    io::{self, Write},
    time::Duration,
};

use crate::contract::{Line, Lost, Notice, Reconciliation, Record, SummaryRecord, TotalRecord};
use aggregate::Total;
use capture::CaptureWriter;
use terminal::{cause_label, clock, kind_label, limit_label, total_row, what_label, TOTALS_HEADER};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Human,
    Json,
}

pub struct Sink<W: Write> {
    format: Format,
    out: W,
}

/// What the live loop writes to: the terminal, or a capture file that
/// also takes counters and queue samples.
pub trait Destination: Write {
    fn capture(&mut self) -> Option<&mut CaptureWriter> {
        None
    }
}

impl Destination for io::StdoutLock<'_> {}

impl Destination for CaptureWriter {
    fn capture(&mut self) -> Option<&mut CaptureWriter> {
        Some(self)
    }
}

/// Write one record as one line: `{"type": ..., ...}`.
pub fn write_record<W: Write>(out: &mut W, record: &Record) -> io::Result<()> {
    let mut line = serde_json::to_vec(record)?;
    line.push(b'\n');
    out.write_all(&line)?;
    out.flush()
}

impl<W: Write> Sink<W> {
    pub fn new(format: Format, out: W) -> Self {
        Self { format, out }
    }

    pub fn out_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// One line of human output, its text escaped for the terminal (it
    /// carries names and paths other processes chose).
    fn put(&mut self, line: std::fmt::Arguments) -> io::Result<()> {
        writeln!(self.out, "{}", terminal::escape(&line.to_string()))
    }

    pub fn line(&mut self, line: &Line) -> io::Result<()> {
        let drop = &line.drop;
        match self.format {
            Format::Json => return write_record(&mut self.out, &Record::Drop(line.clone())),
            Format::Human => {
                let time = crate::contract::rfc3339(drop.time);
                let clock = clock(&time);
                let fix = if line.first {
                    format!("; fix: {}", drop.limit.fix)
                } else {
                    String::new()
                };
                self.put(format_args!(
                    "{clock} {kind} x{count} {what}: {limit}{cause}{fix}",
                    kind = kind_label(drop),
                    count = line.count,
                    what = what_label(drop),
                    limit = limit_label(&drop.limit),
                    cause = drop.caused_by.as_ref().map_or(String::new(), cause_label),
                ))?;
            }
        }
        self.out.flush()
    }

    pub fn notice(&mut self, notice: &Notice) -> io::Result<()> {
        match self.format {
            Format::Json => return write_record(&mut self.out, &Record::Notice(notice.clone())),
            Format::Human => {
                let time = crate::contract::rfc3339(notice.time);
                self.put(format_args!("{clock} NOTICE backlog_clamped {listener}, owner {owner}: listen({requested}) was clamped to {effective} by net.core.somaxconn={somaxconn} (netns {netns}); fix: {fix}",
                    clock = clock(&time),
                    listener = notice.listener.label(),
                    owner = notice.listener.owner_label(),
                    requested = notice.requested,
                    effective = notice.effective,
                    somaxconn = notice.somaxconn,
                    netns = notice.listener.netns.map_or("?".into(), |n| n.to_string()),
                    fix = notice.fix,
                ))?;
            }
        }
        self.out.flush()
    }

    pub fn summary(
        &mut self,
        totals: &[Total],
        lost: Lost,
        kernel: &[Reconciliation],
        elapsed: Duration,
    ) -> io::Result<()> {
        match self.format {
            Format::Json => {
                let record = SummaryRecord {
                    totals: totals.iter().map(TotalRecord::from).collect(),
                    lost: lost.total(),
                    details_dropped: lost.ring_buffer_full,
                    lost_by_cause: lost,
                    kernel_listen_overflows: kernel.to_vec(),
                    duration_s: elapsed.as_secs_f64(),
                };
                return write_record(&mut self.out, &Record::Summary(record));
            }
            Format::Human => {
                let drops = totals.iter().map(|t| t.count).fold(0, u64::saturating_add);
                writeln!(self.out)?;
                self.put(format_args!(
                    "--- droptrace summary: {drops} drops in {:.1} s, {} lost ---",
                    elapsed.as_secs_f64(),
                    lost.total()
                ))?;
                if !totals.is_empty() {
                    self.put(format_args!("{TOTALS_HEADER}"))?;
                }
                for total in totals {
                    self.put(format_args!("{}", total_row(total)))?;
                    self.put(format_args!("{:>8}  fix: {}", "", total.drop.limit.fix))?;
                }
                for netns in kernel {
                    let verdict = if netns.droptrace == netns.kernel {
                        "match"
                    } else {
                        "MISMATCH"
                    };
                    self.put(format_args!("TCP listen overflows in netns {}: droptrace {}, kernel TcpExtListenOverflows {} ({verdict})",
                        netns.netns, netns.droptrace, netns.kernel
                    ))?;
                }
                if lost.total() > 0 {
                    self.put(format_args!("WARNING: {} drops could not be counted (syscall table full: {}, counter table full: {}); the counts above are short by that much",
                        lost.total(),
                        lost.pending_map_full,
                        lost.counter_map_full
                    ))?;
                }
                if lost.ring_buffer_full > 0 {
                    self.put(format_args!("note: {} sampled records found the ring buffer full; the counts are exact, some drops are named with fewer details",
                        lost.ring_buffer_full
                    ))?;
                }
            }
        }
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    use crate::contract::{
        sample, Cause, Client, Drop, DropKind, Family, LimitName, Stage, Syscall, Verdict,
    };
    use serde_json::json;

    #[test]
    fn json_drop_lines_follow_the_contract() {
        let mut sink = Sink::new(Format::Json, Vec::new());
        sink.line(&Line {
            drop: sample(),
            count: 37,
            first: true,
        })
        .unwrap();
        let text = String::from_utf8(sink.out).unwrap();
        assert_eq!(text.lines().count(), 1);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value,
            json!({
                "type": "drop",
                "time": "2026-09-21T14:13:20.123Z",
                "kind": "unix_backlog",
                "count": 37,
                "client": {"pid": 3363, "comm": "nginx", "role": "nginx-worker"},
                "listener": {"family": "unix", "path": "/run/app.sock", "netns": 4026531840u64, "pid": 3300,
                             "comm": "uwsgi", "role": "uwsgi-master", "queue": 101, "backlog": 100},
                "limit": {"name": "uwsgi_listen", "value": 100, "source": "uWSGI default, no listen option set", "fix": "set listen"}
            })
        );
    }

    #[test]
    fn json_summary_is_last_and_counts_lost_events() {
        let mut sink = Sink::new(Format::Json, Vec::new());
        let totals = vec![Total {
            drop: sample(),
            count: 1891,
        }];
        sink.summary(
            &totals,
            Lost {
                ring_buffer_full: 3,
                pending_map_full: 1,
                counter_map_full: 1,
            },
            &[Reconciliation {
                netns: 4026531840,
                droptrace: 7,
                kernel: 7,
            }],
            Duration::from_secs(2),
        )
        .unwrap();
        let value: serde_json::Value = serde_json::from_slice(&sink.out).unwrap();
        assert_eq!(value["type"], "summary");
        assert_eq!(
            value["lost"], 2,
            "drops not counted: the sampled records are not drops"
        );
        assert_eq!(value["details_dropped"], 3);
        assert_eq!(
            value["kernel_listen_overflows"],
            json!([{"netns": 4026531840u64, "droptrace": 7, "kernel": 7}])
        );
        assert_eq!(value["totals"][0]["count"], 1891);
        assert_eq!(value["totals"][0]["kind"], "unix_backlog");
        assert_eq!(value["totals"][0]["listener"]["path"], "/run/app.sock");
        assert_eq!(value["totals"][0]["limit"]["name"], "uwsgi_listen");
    }

    #[test]
    fn tcp_lines_name_the_stage_the_address_and_the_peer() {
        let mut drop = sample();
        drop.kind = DropKind::TcpAcceptQueue;
        drop.stage = Some(Stage::Syn);
        let listener = drop.listener.as_mut().unwrap();
        listener.family = Family::Tcp;
        listener.path = None;
        listener.addr = Some("127.0.0.1".into());
        listener.port = Some(19090);
        drop.client = Client {
            addr: Some("127.0.0.1".into()),
            port: Some(40000),
            ..Client::default()
        };
        let mut sink = Sink::new(Format::Json, Vec::new());
        sink.line(&Line {
            drop: drop.clone(),
            count: 3,
            first: true,
        })
        .unwrap();
        let value: serde_json::Value = serde_json::from_slice(&sink.out).unwrap();
        assert_eq!(value["kind"], "tcp_accept_queue");
        assert_eq!(value["stage"], "syn");
        assert_eq!(value["client"], json!({"addr": "127.0.0.1", "port": 40000}));
        assert_eq!(value["listener"]["addr"], "127.0.0.1");
        assert_eq!(value["listener"]["port"], 19090);
        assert!(value["listener"].get("path").is_none());

        let mut sink = Sink::new(Format::Human, Vec::new());
        sink.line(&Line {
            drop,
            count: 3,
            first: false,
        })
        .unwrap();
        let text = String::from_utf8(sink.out).unwrap();
        assert!(
            text.starts_with("14:13:20.123 tcp_accept_queue[syn] x3 127.0.0.1:19090 queue 101/100, owner uwsgi[3300] uwsgi-master, refused 127.0.0.1:40000:"),
            "{text}"
        );
    }

    #[test]
    fn human_lines_carry_the_fix_only_the_first_time() {
        let mut sink = Sink::new(Format::Human, Vec::new());
        sink.line(&Line {
            drop: sample(),
            count: 1,
            first: true,
        })
        .unwrap();
        sink.line(&Line {
            drop: sample(),
            count: 40,
            first: false,
        })
        .unwrap();
        let text = String::from_utf8(sink.out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "14:13:20.123 unix_backlog x1 /run/app.sock queue 101/100, owner uwsgi[3300] uwsgi-master, refused nginx[3363] nginx-worker: uwsgi_listen=100 (uWSGI default, no listen option set); fix: set listen"
        );
        assert!(
            lines[1].contains(" x40 ") && !lines[1].contains("fix:"),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn human_summary_warns_about_lost_events() {
        let mut sink = Sink::new(Format::Human, Vec::new());
        sink.summary(
            &[Total {
                drop: sample(),
                count: 5,
            }],
            Lost {
                ring_buffer_full: 7,
                pending_map_full: 0,
                counter_map_full: 2,
            },
            &[Reconciliation {
                netns: 1,
                droptrace: 3,
                kernel: 4,
            }],
            Duration::from_secs(1),
        )
        .unwrap();
        let text = String::from_utf8(sink.out).unwrap();
        assert!(text.contains("5 drops in 1.0 s, 2 lost"), "{text}");
        assert!(
            text.contains("TCP listen overflows in netns 1: droptrace 3, kernel TcpExtListenOverflows 4 (MISMATCH)"),
            "{text}"
        );
        assert!(
            text.contains("WARNING: 2 drops could not be counted"),
            "{text}"
        );
        assert!(
            text.contains(
                "note: 7 sampled records found the ring buffer full; the counts are exact"
            ),
            "{text}"
        );
    }

    fn nofile_drop() -> Drop {
        let mut drop = sample();
        drop.kind = DropKind::Nofile;
        drop.listener = None;
        drop.client.syscall = Some(Syscall::Accept4);
        drop.limit = Verdict {
            name: LimitName::RlimitNofile,
            value: Some(64),
            hard: Some(64),
            source: "worker_rlimit_nofile 64 at /etc/nginx/nginx.conf:4".into(),
            fix: "set worker_rlimit_nofile".into(),
        };
        drop
    }

    #[test]
    fn drops_without_a_listener_name_the_process_and_the_syscall() {
        let mut sink = Sink::new(Format::Json, Vec::new());
        sink.line(&Line {
            drop: nofile_drop(),
            count: 2,
            first: true,
        })
        .unwrap();
        let value: serde_json::Value = serde_json::from_slice(&sink.out).unwrap();
        assert_eq!(value["kind"], "nofile");
        assert_eq!(value["client"]["syscall"], "accept4");
        assert_eq!(value["limit"]["hard"], 64);
        assert!(value.get("listener").is_none(), "{value}");
        assert!(value.get("caused_by").is_none(), "{value}");

        let mut sink = Sink::new(Format::Human, Vec::new());
        sink.line(&Line {
            drop: nofile_drop(),
            count: 2,
            first: false,
        })
        .unwrap();
        let text = String::from_utf8(sink.out).unwrap();
        assert_eq!(
            text.trim_end(),
            "14:13:20.123 nofile x2 nginx[3363] nginx-worker accept4() failed: rlimit_nofile=64 hard 64 (worker_rlimit_nofile 64 at /etc/nginx/nginx.conf:4)"
        );
    }

    #[test]
    fn an_overflow_caused_by_a_failed_accept_says_so() {
        let mut drop = sample();
        drop.caused_by = Some(Cause {
            kind: DropKind::Nofile,
            time: "2026-09-21T14:13:20.001Z".into(),
            pid: 3363,
            comm: "nginx".into(),
            syscall: Some(Syscall::Accept4),
            limit: LimitName::RlimitNofile,
            value: Some(64),
        });
        let mut sink = Sink::new(Format::Human, Vec::new());
        sink.line(&Line {
            drop: drop.clone(),
            count: 1,
            first: false,
        })
        .unwrap();
        let text = String::from_utf8(sink.out).unwrap();
        assert!(
            text.contains(" [caused by nofile at 14:13:20.001: nginx[3363] accept4() hit rlimit_nofile=64; fix that first]"),
            "{text}"
        );
        let mut sink = Sink::new(Format::Json, Vec::new());
        sink.line(&Line {
            drop,
            count: 1,
            first: false,
        })
        .unwrap();
        let value: serde_json::Value = serde_json::from_slice(&sink.out).unwrap();
        assert_eq!(
            value["caused_by"],
            json!({"kind": "nofile", "time": "2026-09-21T14:13:20.001Z", "pid": 3363, "comm": "nginx",
                   "syscall": "accept4", "limit": "rlimit_nofile", "value": 64})
        );
    }

    #[test]
    fn notices_are_one_line_with_the_fix() {
        let notice = Notice {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_790_000_000_123),
            kind: crate::contract::NoticeKind::BacklogClamped,
            listener: sample().listener.unwrap(),
            requested: 511,
            effective: 64,
            somaxconn: 64,
            fix: "sysctl -w net.core.somaxconn=511".into(),
        };
        let mut sink = Sink::new(Format::Json, Vec::new());
        sink.notice(&notice).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&sink.out).unwrap();
        assert_eq!(value["type"], "notice");
        assert_eq!(value["kind"], "backlog_clamped");
        assert_eq!(value["time"], "2026-09-21T14:13:20.123Z");
        assert_eq!(
            (value["requested"].as_u64(), value["effective"].as_u64()),
            (Some(511), Some(64))
        );
        let mut sink = Sink::new(Format::Human, Vec::new());
        sink.notice(&notice).unwrap();
        let text = String::from_utf8(sink.out).unwrap();
        assert_eq!(
            text.trim_end(),
            "14:13:20.123 NOTICE backlog_clamped /run/app.sock, owner uwsgi[3300] uwsgi-master: listen(511) was clamped to 64 by net.core.somaxconn=64 (netns 4026531840); fix: sysctl -w net.core.somaxconn=511"
        );
    }
}
