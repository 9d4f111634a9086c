//! Command-line interface: the live view (no subcommand), `record`,
//! `report`, `doctor` and `schema`.
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// droptrace: which connection was refused, at which socket, by which
/// process, because of which limit, and what to change.
///
/// Watches refused connects to UNIX stream sockets (nginx -> uWSGI
/// "connect() ... failed (11: Resource temporarily unavailable)", the 502
/// behind a full listen queue), TCP connection attempts dropped by a full
/// accept or SYN queue (the silent 504s and 499s), processes out of file
/// descriptors ("Too many open files": RLIMIT_NOFILE, fs.file-max), nginx
/// out of worker_connections, and connects out of ephemeral ports. It names
/// the listener, its owner, the limit that was hit with its value and where
/// that value was set (nginx and uWSGI configs, the process's launcher), and
/// the fix; listen() backlogs clamped by net.core.somaxconn are reported
/// before any drop.
///
/// Without a subcommand it watches live. Needs root (it loads eBPF
/// programs). Stop it with Ctrl-C for a summary.
#[derive(Debug, Parser)]
#[command(
    name = "droptrace",
    version,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub watch: Watch,

    /// Print JSON Lines on stdout: one {"type":"drop"} object per line,
    /// {"type":"notice"} for backlogs clamped by somaxconn, and a
    /// {"type":"summary"} object last (schema: `droptrace schema`).
    #[arg(long)]
    pub json: bool,
}

/// Which processes to watch, and for how long.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Watch {
    /// Watch only this process and its descendants, on either side of a drop
    /// (the refused client or the listener's owner; for TCP drops, the owner;
    /// for open-file, worker_connections and ephemeral-port drops, the process
    /// that failed). Repeat for several processes, e.g. --pid $(cat
    /// /run/nginx.pid) --pid $(pgrep -o uwsgi).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Watch processes with this name (their command name or executable,
    /// e.g. nginx, uwsgi, gunicorn) and their descendants, including ones
    /// started after droptrace: survives restarts, unlike --pid. Repeatable;
    /// combines with --pid.
    #[arg(long = "process", value_name = "NAME")]
    pub names: Vec<String>,

    /// Stop after this many seconds and print the summary.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub duration: Option<u64>,

    /// See nginx's worker_connections shortages through a uretprobe on
    /// ngx_get_connection instead of nginx's error log. By default the log
    /// is read (nginx writes an [alert] for every shortage, at no cost to
    /// nginx); the uretprobe costs a trap on every connection nginx opens,
    /// and is used anyway when nginx logs to no file.
    #[arg(long)]
    pub nginx_uretprobe: bool,

    /// Also serve Prometheus metrics at http://ADDR/metrics, e.g.
    /// 127.0.0.1:9464: droptrace_drops_total{kind,limit,listener,owner_role}
    /// (the summary's counts), listener queue and backlog gauges, the limit
    /// values hit, doctor's risks (refreshed every 30 s), lost events and
    /// build info. Bind to a private address: the metrics name sockets and
    /// processes.
    #[arg(long, value_name = "ADDR")]
    pub prometheus: Option<std::net::SocketAddr>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a capture to analyse later, anywhere, with `droptrace report`
    /// (needs root)
    ///
    /// The capture holds a snapshot of
    /// the host (sysctls per network namespace, the watched processes with
    /// their limits and configuration, the listener table), every drop and
    /// notice, the kernel's listen-queue counters and the watched queues
    /// each second, and a summary when droptrace stops (Ctrl-C, SIGTERM,
    /// --duration, --max-size). A capture cut short (SIGKILL, full disk) is
    /// still readable up to its last complete record.
    Record(RecordArgs),
    /// Explain captures, without root or eBPF, on any machine
    ///
    /// It prints the incident window, drops per listener, limit and kind with counts, the first and
    /// the worst second, the verdict and fix for each, and the kernel's
    /// counters beside them.
    Report(ReportArgs),
    /// List what will refuse connections under load, now, without eBPF
    ///
    /// It checks listen queues smaller than what nginx can
    /// send, worker_connections above the open-file limit, queues full now,
    /// backlogs clamped by somaxconn, listen overflows growing. Exits 1 when
    /// it finds a risk, 0 when none, 2 when it cannot look.
    Doctor(DoctorArgs),
    /// Print the JSON Schema of captures, --json and report --json
    Schema,
}

#[derive(Debug, clap::Args)]
pub struct RecordArgs {
    /// The capture file to create (created 0600; never overwritten, never
    /// through a symlink).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,

    /// Stop cleanly, with the summary written, once the capture reaches
    /// about this size: 500K, 100M, 2G (plain numbers are bytes).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_size: Option<u64>,

    #[command(flatten)]
    pub watch: Watch,
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Capture files from `droptrace record` (several are read as one).
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,

    /// Print one JSON object with the same `totals` as the live summary.
    #[arg(long)]
    pub json: bool,

    /// Also write a self-contained HTML page (timeline charts and tables)
    /// to attach to an incident ticket.
    #[arg(long, value_name = "OUT")]
    pub html: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Look only at this process, its descendants and the sockets they own
    /// (repeatable). Without it, every nginx, uWSGI and listener.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Print the risks as one JSON object.
    #[arg(long)]
    pub json: bool,

    /// Stop looking after this many seconds and report what was seen,
    /// saying that the look was cut short (a slow /proc or filesystem).
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
}

/// "100M" -> 104857600.
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 500K, 100M or 2G"))?;
    let scale: u64 = match unit.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use K, M or G)")),
    };
    match number.checked_mul(scale) {
        Some(0) => Err("the size must be above 0".into()),
        Some(bytes) => Ok(bytes),
        None => Err(format!("{text:?} is too large")),
    }
}

const EXAMPLES: &str = "\
Examples:
  sudo droptrace                          watch every process
  sudo droptrace --pid $(cat /run/nginx.pid) --duration 60
  sudo droptrace --json > drops.jsonl     for jq and dashboards
  sudo droptrace --prometheus 127.0.0.1:9464 --process nginx --process uwsgi
                                          for Prometheus (deploy/ has a unit, alerts, a dashboard)
  sudo droptrace record -o /var/tmp/incident.dtc --process nginx --process uwsgi --max-size 100M
  droptrace report /var/tmp/incident.dtc --html incident.html
  droptrace doctor                        what will break under load, before it does

Output: one line per refused connection (identical ones are grouped, with a
count), NOTICE lines for clamped backlogs, then a summary per listener (or
process) and limit with the fix. Progress and diagnostics go to stderr
(RUST_LOG=debug for more).";

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn several_pids_json_and_duration() {
        let args = Args::try_parse_from([
            "droptrace",
            "--pid",
            "1",
            "--pid",
            "2",
            "--json",
            "--duration",
            "5",
        ])
        .unwrap();
        assert!(args.command.is_none());
        assert_eq!(args.watch.pids, vec![1, 2]);
        assert!(args.json);
        assert_eq!(args.watch.duration, Some(5));
    }

    #[test]
    fn bad_arguments_are_refused_with_a_message() {
        for bad in [
            &["droptrace", "--pid", "nginx"][..],
            &["droptrace", "--duration", "0"],
            &["droptrace", "--bogus"],
            &["droptrace", "record"],
            &["droptrace", "record", "-o", "x", "--max-size", "12Q"],
            &["droptrace", "report"],
            &["droptrace", "--pid", "1", "doctor"],
        ] {
            let err = Args::try_parse_from(bad).unwrap_err();
            assert!(err.to_string().starts_with("error:"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn subcommands_take_their_own_options() {
        let args = Args::try_parse_from([
            "droptrace",
            "record",
            "-o",
            "cap",
            "--max-size",
            "100M",
            "--process",
            "nginx",
            "--pid",
            "7",
        ])
        .unwrap();
        let Some(Command::Record(record)) = args.command else {
            panic!("{args:?}")
        };
        assert_eq!(record.output, PathBuf::from("cap"));
        assert_eq!(record.max_size, Some(100 << 20));
        assert_eq!(record.watch.names, vec!["nginx"]);
        assert_eq!(record.watch.pids, vec![7]);
        let args =
            Args::try_parse_from(["droptrace", "report", "a", "b", "--html", "o.html"]).unwrap();
        let Some(Command::Report(report)) = args.command else {
            panic!("{args:?}")
        };
        assert_eq!(report.files.len(), 2);
        assert_eq!(report.html, Some(PathBuf::from("o.html")));
    }

    #[test]
    fn sizes_read_like_an_operator_writes_them() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("500K"), Ok(500 << 10));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }
}
