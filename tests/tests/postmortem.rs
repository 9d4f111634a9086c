//! Postmortem: `record` during a real nginx + uWSGI burst, `report` on the
//! capture (whole, cut short, as HTML), and `doctor` on a mis-configured
//! and a sound stack.
use std::{
    collections::BTreeMap, fs, net::SocketAddr, os::unix::fs::PermissionsExt, path::Path,
    process::Command,
};

use droptrace_tests::{
    droptrace::{self, Droptrace, Recording},
    http,
    netns::Netns,
    require_root,
    stack::{self, Stack, StackConfig},
};
use serde_json::Value;

const EAGAIN_LINE: &str = "(11: Resource temporarily unavailable) while connecting to upstream";

/// (kind, listener, limit) -> count, from `totals` objects.
fn totals(totals: &Value) -> BTreeMap<String, u64> {
    totals
        .as_array()
        .expect("totals is an array")
        .iter()
        .map(|t| {
            let key = format!(
                "{} {} {} {}",
                t["kind"], t["listener"]["path"], t["listener"]["port"], t["limit"]["name"]
            );
            (key, t["count"].as_u64().unwrap())
        })
        .collect()
}

fn report_json(args: &[&str]) -> (Value, String) {
    let report = droptrace::run(args);
    assert_eq!(report.code, Some(0), "{report:?}");
    (report.json(), report.stderr)
}

/// Render the page in headless Chromium: it must load and paint. Skips
/// (loudly) where Chromium is not installed; CI installs it.
fn render_in_chromium(page: &Path) {
    // cargo xtask test installs chromium, or leaves this test out (skipped).
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("the HTML report is rendered in Chromium: apt-get install chromium");
    let profile = tempfile::tempdir().unwrap();
    let shot = page.with_extension("png");
    let output = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1100,1600",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("cannot run chromium");
    assert!(
        output.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let png = fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    // A blank page compresses to a few KB; charts and tables do not.
    assert!(
        png.len() > 20_000,
        "the rendered page looks empty: {} bytes",
        png.len()
    );
    // The DOM Chromium built holds both charts and the table.
    let dom = Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("cannot run chromium");
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert_eq!(dom.matches("<svg class=\"chart\"").count(), 2, "{dom}");
    assert!(dom.contains("Drops by listener, limit and kind"));
}

#[test]
fn a_capture_of_a_real_burst_reports_the_live_totals_even_when_cut_short() {
    let test = "a_capture_of_a_real_burst_reports_the_live_totals_even_when_cut_short";
    require_root(test);
    stack::require(test);
    let port = stack::free_port();
    let stack = Stack::start(StackConfig {
        port,
        ..StackConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let capture = dir.path().join("incident.dtc");
    let (nginx_pid, uwsgi_pid) = (stack.nginx.id().to_string(), stack.uwsgi.id().to_string());
    let filters = ["--pid", &nginx_pid, "--pid", &uwsgi_pid];
    // The live view and the recorder watch the same burst.
    let live = Droptrace::start(&filters);
    let recording = Recording::start(&capture, &filters);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let outcomes = http::burst(addr, None);
    let live = live.stop();
    recording.stop();

    let logged = stack.error_lines_with(EAGAIN_LINE) as u64;
    assert!(logged > 0, "the burst refused nothing: {outcomes:?}");
    let mode = fs::metadata(&capture).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "captures are private");

    let capture_arg = capture.to_str().unwrap();
    let (report, stderr) = report_json(&["report", "--json", capture_arg]);
    assert!(!stderr.contains("truncated"), "{stderr}");
    let live_totals = totals(&live.summary["totals"]);
    let report_totals = totals(&report["totals"]);
    eprintln!("nginx logged {logged}; live {live_totals:?}; report {report_totals:?}");
    assert_eq!(report_totals, live_totals, "report vs live summary");
    assert_eq!(report["lost"], 0);
    assert_eq!(report["files"][0]["truncated"], Value::Null);
    let at_socket: Vec<&Value> = report["totals"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["listener"]["path"] == stack.socket_path())
        .collect();
    assert_eq!(at_socket.len(), 1, "{at_socket:#?}");
    let socket_total = at_socket[0];
    assert_eq!(socket_total["count"], logged, "report vs nginx's error log");
    assert_eq!(socket_total["limit"]["name"], "uwsgi_listen");
    assert_eq!(socket_total["limit"]["value"], 100);
    assert!(report["worst_second"]["drops"].as_u64().unwrap() > 0);
    // The header's snapshot knew the trap before the burst sprang it.
    let risks = report["risks_at_start"].as_array().unwrap();
    assert!(
        risks.iter().any(|r| r["kind"] == "listen_queue_below_nginx"
            && r["subject"]
                .as_str()
                .unwrap()
                .starts_with(&stack.socket_path())),
        "{risks:#?}"
    );

    // The human report names the window, the listener, the limit and the fix.
    let text = droptrace::run(&["report", capture_arg]);
    assert_eq!(text.code, Some(0), "{text:?}");
    assert!(text.stdout.contains("Incident window:"), "{}", text.stdout);
    let all = report["drops"].as_u64().unwrap();
    assert!(
        text.stdout.contains(&format!("{all} drops, 0 lost")),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("uwsgi_listen=100"), "{}", text.stdout);
    assert!(
        text.stdout.contains("fix: uWSGI listen=100"),
        "{}",
        text.stdout
    );

    // Cut before its summary, as SIGKILL leaves it: still a report, flagged.
    let bytes = fs::read(&capture).unwrap();
    let last_line = bytes[..bytes.len() - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .unwrap()
        + 1;
    let cut = dir.path().join("cut.dtc");
    fs::write(&cut, &bytes[..last_line + 20]).unwrap();
    let (cut_report, stderr) = report_json(&["report", "--json", cut.to_str().unwrap()]);
    assert!(stderr.contains("is truncated"), "{stderr}");
    assert!(cut_report["files"][0]["truncated"]
        .as_str()
        .unwrap()
        .contains("cut after 20 bytes"));
    assert_eq!(
        cut_report["lost"],
        Value::Null,
        "without a summary, losses are unknown"
    );
    assert_eq!(
        totals(&cut_report["totals"]),
        live_totals,
        "only the summary was cut"
    );
    // Cut halfway through the records after the header: fewer, never more.
    let header_end = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
    let middle = dir.path().join("middle.dtc");
    fs::write(
        &middle,
        &bytes[..header_end + (bytes.len() - header_end) / 2],
    )
    .unwrap();
    let (middle_report, _) = report_json(&["report", "--json", middle.to_str().unwrap()]);
    assert!(middle_report["drops"].as_u64().unwrap() <= all);
    assert!(middle_report["files"][0]["truncated"].is_string());

    // The page for the incident ticket.
    let page = dir.path().join("incident.html");
    let html = droptrace::run(&["report", capture_arg, "--html", page.to_str().unwrap()]);
    assert_eq!(html.code, Some(0), "{html:?}");
    let text = fs::read_to_string(&page).unwrap();
    assert!(text.contains(&stack.socket_path()));
    assert!(
        !text.contains("<script") && !text.contains("http://") && !text.contains("https://"),
        "self-contained"
    );
    render_in_chromium(&page);
}

#[test]
fn record_stops_cleanly_at_max_size_and_never_overwrites() {
    let test = "record_stops_cleanly_at_max_size_and_never_overwrites";
    require_root(test);
    let dir = tempfile::tempdir().unwrap();
    let capture = dir.path().join("small.dtc");
    // The header alone is larger than 1 KB: it stops at its first check.
    let stderr = Recording::start(&capture, &["--max-size", "1K", "--pid", "1"]).wait();
    assert!(stderr.contains("reached --max-size"), "{stderr}");
    let (report, _) = report_json(&["report", "--json", capture.to_str().unwrap()]);
    assert_eq!(
        report["files"][0]["truncated"],
        Value::Null,
        "stopped cleanly, with its summary"
    );

    // An existing file and a symlink are refused, and left alone.
    let again = droptrace::run(&["record", "-o", capture.to_str().unwrap(), "--duration", "1"]);
    assert_eq!(again.code, Some(1));
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);
    let target = dir.path().join("target");
    fs::write(&target, "precious").unwrap();
    let link = dir.path().join("link.dtc");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let through_link = droptrace::run(&["record", "-o", link.to_str().unwrap(), "--duration", "1"]);
    assert_eq!(through_link.code, Some(1), "{through_link:?}");
    assert_eq!(fs::read_to_string(&target).unwrap(), "precious");

    // The same for report --html, which root may run too: a planted
    // symlink is not followed, an existing page not overwritten.
    let capture_arg = capture.to_str().unwrap();
    let page_link = dir.path().join("page.html");
    std::os::unix::fs::symlink(&target, &page_link).unwrap();
    let html = droptrace::run(&["report", capture_arg, "--html", page_link.to_str().unwrap()]);
    assert_eq!(html.code, Some(1), "{html:?}");
    assert!(html.stderr.contains("already exists"), "{}", html.stderr);
    assert_eq!(fs::read_to_string(&target).unwrap(), "precious");
    let page = dir.path().join("fresh.html");
    let html = droptrace::run(&["report", capture_arg, "--html", page.to_str().unwrap()]);
    assert_eq!(html.code, Some(0), "{html:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&page).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = droptrace::run(&["report", capture_arg, "--html", page.to_str().unwrap()]);
    assert_eq!(again.code, Some(1), "{again:?}");
}

/// `droptrace doctor --json --pid NGINX --pid UWSGI`: its risks by kind.
fn doctor(stack: &Stack) -> (Option<i32>, Vec<Value>) {
    let (nginx, uwsgi) = (stack.nginx.id().to_string(), stack.uwsgi.id().to_string());
    let started = std::time::Instant::now();
    let result = droptrace::run(&["doctor", "--json", "--pid", &nginx, "--pid", &uwsgi]);
    eprintln!(
        "doctor took {:?}: {}\n{}",
        started.elapsed(),
        result.stdout,
        result.stderr
    );
    let risks = result.json()["risks"].as_array().unwrap().clone();
    (result.code, risks)
}

#[test]
fn doctor_finds_both_traps_in_a_misconfigured_stack_and_none_in_a_sound_one() {
    let test = "doctor_finds_both_traps_in_a_misconfigured_stack_and_none_in_a_sound_one";
    require_root(test);
    stack::require(test);
    // A private namespace: its counters and sysctls are the test's alone.
    let netns = Netns::create("doctor", &[]);
    {
        // uWSGI's default listen 100 behind 2 workers × 8192 connections,
        // and worker_connections 8192 above an open-file limit of 1024.
        let stack = Stack::start(StackConfig {
            netns: Some(&netns),
            worker_rlimit_nofile: None,
            prlimit_nofile: Some(1024),
            ..StackConfig::default()
        });
        let (code, risks) = doctor(&stack);
        assert_eq!(code, Some(1), "a risk found exits 1: {risks:#?}");
        let kinds: Vec<&str> = risks.iter().map(|r| r["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "listen_queue_below_nginx",
                "worker_connections_above_nofile"
            ],
            "{risks:#?}"
        );
        let queue = &risks[0];
        assert!(
            queue["subject"]
                .as_str()
                .unwrap()
                .starts_with(&stack.socket_path()),
            "{queue}"
        );
        let finding = queue["finding"].as_str().unwrap();
        assert!(
            finding.contains("uWSGI listen 100 (uWSGI default, no listen option set)"),
            "{finding}"
        );
        assert!(
            finding.contains("2 × 8192 worker_connections / 2 = 8192 upstream connections"),
            "{finding}"
        );
        assert!(
            queue["fix"]
                .as_str()
                .unwrap()
                .starts_with("raise uWSGI's listen to 8192"),
            "{queue}"
        );
        assert!(
            queue["fix"]
                .as_str()
                .unwrap()
                .contains("net.core.somaxconn to 8192 (now 4096)"),
            "{queue}"
        );
        let nofile = &risks[1];
        assert_eq!(
            nofile["subject"],
            format!("nginx[{}] nginx-master", stack.nginx.id())
        );
        let finding = nofile["finding"].as_str().unwrap();
        assert!(
            finding.contains("worker_connections 8192 (")
                && finding.contains("open-file limit 1024"),
            "{finding}"
        );
        assert!(
            nofile["fix"]
                .as_str()
                .unwrap()
                .starts_with("set worker_rlimit_nofile 16384"),
            "{nofile}"
        );
    }
    {
        // 2 workers × 512 / 2 upstream connections fit uWSGI's listen 1024, and
        // worker_rlimit_nofile covers worker_connections.
        let stack = Stack::start(StackConfig {
            netns: Some(&netns),
            uwsgi_listen: Some(1024),
            worker_connections: 512,
            ..StackConfig::default()
        });
        let (code, risks) = doctor(&stack);
        assert_eq!(risks, Vec::<Value>::new());
        assert_eq!(code, Some(0));
        // The human form says what it looked at.
        let text = droptrace::run(&[
            "doctor",
            "--pid",
            &stack.nginx.id().to_string(),
            "--pid",
            &stack.uwsgi.id().to_string(),
        ]);
        assert!(
            text.stdout
                .starts_with("droptrace doctor: no risk found on "),
            "{}",
            text.stdout
        );
        assert!(text.stdout.contains("1 nginx, 1 uWSGI"), "{}", text.stdout);
    }
}

/// Needs no root: bad input is one line on stderr and exit 1, never a panic.
#[test]
fn report_refuses_what_is_not_a_capture_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8], &str); 4] = [
        ("text", b"hello\n", "not a droptrace capture"),
        (
            "garbage",
            &[0xff, 0xfe, 0x00, 0x12, b'\n', 0x80],
            "not a droptrace capture",
        ),
        (
            "newer",
            b"{\"type\":\"header\",\"format\":\"droptrace-capture\",\"format_version\":99}\n",
            "written by a newer droptrace",
        ),
        ("missing", b"", "cannot read"),
    ];
    for (name, bytes, expected) in cases {
        let path = dir.path().join(name);
        if name != "missing" {
            fs::write(&path, bytes).unwrap();
        }
        let result = droptrace::run(&["report", path.to_str().unwrap()]);
        assert_eq!(result.code, Some(1), "{name}: {result:?}");
        assert_eq!(
            result.stderr.lines().count(),
            1,
            "{name}: {}",
            result.stderr
        );
        assert!(
            result.stderr.starts_with("droptrace: error: "),
            "{}",
            result.stderr
        );
        assert!(
            result.stderr.contains(expected),
            "{name}: {}",
            result.stderr
        );
        assert!(result.stdout.is_empty());
    }
    let schema = droptrace::run(&["schema"]);
    assert_eq!(schema.code, Some(0));
    let records = schema.json()["oneOf"].as_array().unwrap().len();
    assert_eq!(
        records, 6,
        "header, drop, notice, counters, queues, summary"
    );
}
