//! Command-line interface.
use clap::Parser;

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
/// Needs root (it loads eBPF programs). Stop it with Ctrl-C for a summary.
#[derive(Debug, Parser)]
#[command(name = "droptrace", version, after_help = EXAMPLES)]
pub struct Args {
    /// Watch only this process and its descendants, on either side of a drop
    /// (the refused client or the listener's owner; for TCP drops, the owner;
    /// for open-file, worker_connections and ephemeral-port drops, the process
    /// that failed). Repeat for several processes, e.g. --pid $(cat
    /// /run/nginx.pid) --pid $(pgrep -o uwsgi).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Print JSON Lines on stdout: one {"type":"drop"} object per line,
    /// {"type":"notice"} for backlogs clamped by somaxconn, and a
    /// {"type":"summary"} object last (schema in the README).
    #[arg(long)]
    pub json: bool,

    /// Stop after this many seconds and print the summary.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub duration: Option<u64>,
}

const EXAMPLES: &str = "\
Examples:
  sudo droptrace                          watch every process
  sudo droptrace --pid $(cat /run/nginx.pid) --duration 60
  sudo droptrace --json > drops.jsonl     for jq and dashboards

Output: one line per refused connection (identical ones are grouped, with a
count), NOTICE lines for clamped backlogs, then a summary per listener (or
process) and limit with the fix. Progress and
diagnostics go to stderr (RUST_LOG=debug for more).";

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
        assert_eq!(args.pids, vec![1, 2]);
        assert!(args.json);
        assert_eq!(args.duration, Some(5));
    }

    #[test]
    fn bad_arguments_are_refused_with_a_message() {
        for bad in [
            &["droptrace", "--pid", "nginx"][..],
            &["droptrace", "--duration", "0"],
            &["droptrace", "--bogus"],
        ] {
            let err = Args::try_parse_from(bad).unwrap_err();
            assert!(err.to_string().starts_with("error:"), "{bad:?}: {err}");
        }
    }
}
