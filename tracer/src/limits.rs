//! Which limit a drop hit, its value, where that value came from, and the
//! fix. Pure logic: everything it needs arrives in `BacklogFacts`.
use serde::{Deserialize, Serialize};

use crate::{attribution::process::Role, config::Setting};

/// Limit names are part of the JSON contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LimitName {
    /// net.core.somaxconn clamped the backlog the owner asked for.
    Somaxconn,
    /// uWSGI's `listen` option.
    UwsgiListen,
    /// nginx's `listen ... backlog=` (511 by default on Linux).
    NginxListenBacklog,
    /// Any other program's listen() backlog.
    AppBacklog,
    /// The effective backlog equals somaxconn but the requested one was not
    /// seen: either could be the limit.
    BacklogAmbiguous,
    /// net.ipv4.tcp_max_syn_backlog, with syncookies off.
    TcpMaxSynBacklog,
    /// RLIMIT_NOFILE of the process (EMFILE).
    RlimitNofile,
    /// fs.file-max, the system-wide open-file limit (ENFILE).
    FileMax,
    /// nginx's worker_connections.
    WorkerConnections,
    /// net.ipv4.ip_local_port_range: no ephemeral port left.
    IpLocalPortRange,
    /// The listener could not be found (it closed before we looked).
    Unknown,
}

impl LimitName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Somaxconn => "somaxconn",
            Self::UwsgiListen => "uwsgi_listen",
            Self::NginxListenBacklog => "nginx_listen_backlog",
            Self::AppBacklog => "app_backlog",
            Self::BacklogAmbiguous => "backlog_ambiguous",
            Self::TcpMaxSynBacklog => "tcp_max_syn_backlog",
            Self::RlimitNofile => "rlimit_nofile",
            Self::FileMax => "file_max",
            Self::WorkerConnections => "worker_connections",
            Self::IpLocalPortRange => "ip_local_port_range",
            Self::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Verdict {
    pub name: LimitName,
    /// The number that was hit.
    pub value: Option<u64>,
    /// rlimit_nofile: the hard limit beside the soft one that was hit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard: Option<u64>,
    /// Where that number came from.
    pub source: String,
    /// One line: what to change.
    pub fix: String,
}

/// How clients reach the listener: it changes what they see of a drop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
}

/// What we know about a listener whose queue overflowed.
#[derive(Clone, Debug)]
pub struct BacklogFacts {
    pub transport: Transport,
    pub owner_role: Role,
    /// "uwsgi[4242]": how the fix names the owner.
    pub owner: String,
    /// sk_max_ack_backlog: the backlog the kernel enforced.
    pub effective: u32,
    /// The listen() argument, when droptrace saw the call.
    pub requested: Option<u32>,
    /// uWSGI's configured `listen`, when the owner is uWSGI.
    pub uwsgi_listen: Option<Setting>,
    /// net.core.somaxconn of the listener's network namespace.
    pub somaxconn: Option<u32>,
    /// nginx's `listen ... backlog=` for this listener, from its config.
    pub nginx_backlog: Option<Setting>,
}

/// What a negative listen() backlog becomes in `BacklogFacts::requested`.
pub const LISTEN_MAX_REQUEST: u32 = i32::MAX as u32;

/// A backlog worth suggesting: at least 1024, four times the current one,
/// rounded up to a power of two.
pub fn suggested_backlog(current: u32) -> u32 {
    current.saturating_mul(4).max(1024).next_power_of_two()
}

/// "(net.core.somaxconn=4096 allows it)" or the instruction to raise it first.
fn somaxconn_clause(target: u32, somaxconn: Option<u32>) -> String {
    match somaxconn {
        Some(s) if s >= target => format!("(net.core.somaxconn={s} allows it)"),
        Some(s) => format!("and first raise net.core.somaxconn to {target} (now {s}; the kernel clamps listen() to it)"),
        None => format!("(net.core.somaxconn must be at least {target})"),
    }
}

pub fn backlog_verdict(facts: &BacklogFacts) -> Verdict {
    let effective = facts.effective;
    let clamped_by_somaxconn =
        facts.somaxconn == Some(effective) && facts.requested.is_some_and(|r| r > effective);
    // uWSGI is never clamped: it refuses to start when listen > somaxconn.
    if clamped_by_somaxconn && !facts.owner_role.is_uwsgi() {
        let requested = facts.requested.unwrap_or_default();
        // listen(fd, -1) asks for "as large as allowed" (Rust's std does).
        let (asked, target) = if requested >= LISTEN_MAX_REQUEST {
            (
                "the largest backlog allowed (listen(-1))".to_string(),
                suggested_backlog(effective),
            )
        } else {
            (format!("listen({requested})"), requested)
        };
        return Verdict {
            name: LimitName::Somaxconn,
            value: Some(effective.into()),
            hard: None,
            source: format!(
                "net.core.somaxconn of the listener's network namespace: {} asked {asked}, the kernel clamped it to {effective}",
                facts.owner
            ),
            fix: clamp_fix(&facts.owner, target),
        };
    }
    if facts.owner_role.is_uwsgi() {
        let setting = facts.uwsgi_listen.clone().unwrap_or(Setting {
            value: facts.requested.unwrap_or(effective),
            source: "uWSGI's listen() call".into(),
            is_default: false,
        });
        let target = suggested_backlog(effective);
        let default_note = if setting.is_default { " (default)" } else { "" };
        return Verdict {
            name: LimitName::UwsgiListen,
            value: Some(effective.into()),
            hard: None,
            source: setting.source,
            fix: format!(
                "uWSGI listen={effective}{default_note}: set \"listen = {target}\" in the uWSGI ini {}; more uWSGI workers if the queue stays full{}",
                somaxconn_clause(target, facts.somaxconn),
                match facts.transport {
                    Transport::Tcp => " (over TCP, nginx shows 504 or 499 for these, not 502)",
                    Transport::Unix => "",
                }
            ),
        };
    }
    if facts.requested.is_none() && facts.somaxconn == Some(effective) {
        let target = suggested_backlog(effective);
        return Verdict {
            name: LimitName::BacklogAmbiguous,
            value: Some(effective.into()),
            hard: None,
            source: format!("backlog {effective} equals net.core.somaxconn, and {} listened before droptrace started, so its requested backlog is unknown", facts.owner),
            fix: format!("raise net.core.somaxconn and the backlog {} asks for together, to {target}, then restart it", facts.owner),
        };
    }
    let target = suggested_backlog(effective);
    if facts.owner_role.is_nginx() {
        let source = match (facts.requested, &facts.nginx_backlog) {
            (_, Some(configured)) if configured.value == effective => configured.source.clone(),
            (Some(r), _) => format!(
                "nginx called listen({r}) (backlog= on its listen directive, 511 by default)"
            ),
            (None, _) => {
                "nginx's listen socket (backlog= on its listen directive, 511 by default)".into()
            }
        };
        return Verdict {
            name: LimitName::NginxListenBacklog,
            value: Some(effective.into()),
            hard: None,
            source,
            fix: format!(
                "add \"backlog={target}\" to nginx's listen directive {} and reload nginx; more worker_processes if the queue stays full",
                somaxconn_clause(target, facts.somaxconn)
            ),
        };
    }
    let source = match facts.requested {
        Some(r) => format!("{} called listen(fd, {r})", facts.owner),
        None => format!(
            "{}'s listening socket (its listen() call was before droptrace started)",
            facts.owner
        ),
    };
    Verdict {
        name: LimitName::AppBacklog,
        value: Some(effective.into()),
        hard: None,
        source,
        fix: format!(
            "raise the backlog {} passes to listen() to {target} (gunicorn --backlog, php-fpm listen.backlog, Python socket.listen(n)) {}; accept faster (more workers) if the queue stays full",
            facts.owner,
            somaxconn_clause(target, facts.somaxconn)
        ),
    }
}

/// A SYN dropped because the SYN queue neared tcp_max_syn_backlog with
/// syncookies off (tcp_conn_request).
pub fn syn_queue_verdict(max_syn_backlog: u32) -> Verdict {
    Verdict {
        name: LimitName::TcpMaxSynBacklog,
        value: Some(max_syn_backlog.into()),
        hard: None,
        source: "net.ipv4.tcp_max_syn_backlog of the listener's network namespace, with net.ipv4.tcp_syncookies=0".into(),
        fix: format!(
            "sysctl -w net.ipv4.tcp_syncookies=1 (answers SYN floods without queueing), or raise net.ipv4.tcp_max_syn_backlog to {}",
            max_syn_backlog.saturating_mul(4)
        ),
    }
}

/// A SYN dropped, with syncookies off, because the SYN queue held more than
/// the backlog: the backlog is the limit, and cookies are the other way out.
pub fn syn_queue_backlog_verdict(facts: &BacklogFacts) -> Verdict {
    let mut verdict = backlog_verdict(facts);
    verdict.fix.push_str(
        "; or sysctl -w net.ipv4.tcp_syncookies=1 so a full SYN queue answers with cookies",
    );
    verdict
}

/// A refused connect whose listener droptrace could not find.
pub fn unknown_listener_verdict() -> Verdict {
    Verdict {
        name: LimitName::Unknown,
        value: None,
        hard: None,
        source:
            "the listener was not in the socket table when droptrace looked (it may have closed)"
                .into(),
        fix: "run `ss -xlp` to find the listening process and its backlog".into(),
    }
}

/// An open-file limit worth suggesting: four times the current one, at
/// least 65536 (what busy proxies run with), a power of two.
fn suggested_nofile(current: u64) -> u64 {
    current.saturating_mul(4).max(65536).next_power_of_two()
}

/// What is known of a process that hit its RLIMIT_NOFILE.
#[derive(Clone, Debug)]
pub struct NofileFacts {
    /// "nginx[4242]"
    pub process: String,
    pub role: Role,
    pub soft: u64,
    pub hard: u64,
    /// Where the soft limit came from, in words (see attribution::rlimits).
    pub source: String,
    /// nginx: its worker_connections and configuration file.
    pub nginx: Option<(Setting, std::path::PathBuf)>,
}

pub fn nofile_verdict(facts: &NofileFacts) -> Verdict {
    let hard_note = |target: u64| {
        if target > facts.hard {
            format!("; the hard limit is {}: raise LimitNOFILE= (systemd) or `ulimit -Hn` where it starts", facts.hard)
        } else {
            String::new()
        }
    };
    let fix = match (&facts.nginx, facts.role) {
        (Some((connections, conf)), _) => {
            // A proxied request holds two descriptors: client and upstream.
            let target =
                (u64::from(connections.value) * 2).max(suggested_nofile(facts.soft).min(65536));
            format!(
                "set \"worker_rlimit_nofile {target};\" in the main context of {} (at least 2 x worker_connections {}: a proxied request holds 2 descriptors) and reload nginx",
                conf.display(),
                connections.value
            )
        }
        (None, role) if role.is_uwsgi() => {
            let target = suggested_nofile(facts.soft);
            format!(
                "set \"max-fd = {target}\" in the uWSGI ini and restart it{}",
                hard_note(target)
            )
        }
        _ => {
            let target = suggested_nofile(facts.soft);
            format!(
                "raise the open-file limit of {} to {target}: LimitNOFILE={target} in its systemd unit, or `ulimit -n {target}` in the script that starts it (nofile in /etc/security/limits.conf for login sessions), then restart it{}",
                facts.process,
                hard_note(target)
            )
        }
    };
    Verdict {
        name: LimitName::RlimitNofile,
        value: Some(facts.soft),
        hard: Some(facts.hard),
        source: facts.source.clone(),
        fix,
    }
}

/// ENFILE: the whole system ran out of file handles.
pub fn file_max_verdict(file_max: Option<u64>, allocated: Option<u64>) -> Verdict {
    let allocated = allocated.map_or(String::new(), |n| format!("; {n} allocated now"));
    Verdict {
        name: LimitName::FileMax,
        value: file_max,
        hard: None,
        source: format!("fs.file-max, the system-wide limit on open files{allocated}"),
        fix: format!(
            "sysctl -w fs.file-max={} (persist it in /etc/sysctl.d/), and look for the process holding most descriptors (ls /proc/*/fd | wc -l per process)",
            file_max.map_or(2_097_152, |n| n.saturating_mul(2))
        ),
    }
}

/// nginx's ngx_get_connection() found no free connection slot.
pub fn worker_connections_verdict(
    connections: Option<&Setting>,
    conf: Option<&std::path::Path>,
    method: &str,
) -> Verdict {
    let value = connections.map(|c| c.value);
    let target = suggested_backlog(value.unwrap_or(512));
    let conf = conf.map_or("nginx's configuration".to_string(), |c| {
        c.display().to_string()
    });
    Verdict {
        name: LimitName::WorkerConnections,
        value: value.map(u64::from),
        hard: None,
        source: format!(
            "{} (seen through {method})",
            connections.map_or("worker_connections of this nginx (its configuration could not be read)", |c| c.source.as_str())
        ),
        fix: format!(
            "raise worker_connections to {target} in the events block of {conf} (each proxied request holds 2: client and upstream) with worker_rlimit_nofile at least {}, and reload nginx",
            u64::from(target) * 2
        ),
    }
}

/// connect() found no free local port for the destination.
pub fn ephemeral_ports_verdict(
    range: Option<(u32, u32)>,
    netns: u32,
    upstream_keepalive: Option<bool>,
) -> Verdict {
    let reuse = match upstream_keepalive {
        Some(true) => "reuse upstream connections (the upstream block has keepalive: check proxy_http_version 1.1 and proxy_set_header Connection \"\" are set too)",
        _ => "reuse upstream connections (nginx: \"keepalive 32;\" in the upstream block, with proxy_http_version 1.1 and proxy_set_header Connection \"\"; or a UNIX socket to the backend)",
    };
    let (value, source) = match range {
        Some((low, high)) => (
            Some(u64::from(high.saturating_sub(low)) + 1),
            format!("net.ipv4.ip_local_port_range {low} {high} of netns {netns}: every port to that destination was in use (TIME-WAIT included)"),
        ),
        None => (None, format!("net.ipv4.ip_local_port_range of netns {netns} (could not be read)")),
    };
    Verdict {
        name: LimitName::IpLocalPortRange,
        value,
        hard: None,
        source,
        fix: format!(
            "{reuse}; or widen the range: sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\""
        ),
    }
}

/// The fix for a listen() backlog the kernel clamped to
/// net.core.somaxconn: raise it to `target` and listen again (drops and
/// backlog_clamped notices alike).
pub fn clamp_fix(owner: &str, target: u32) -> String {
    format!("sysctl -w net.core.somaxconn={target} in that namespace (persist it in /etc/sysctl.d/), then restart {owner} so it listens again")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(
        role: Role,
        effective: u32,
        requested: Option<u32>,
        somaxconn: Option<u32>,
    ) -> BacklogFacts {
        BacklogFacts {
            transport: Transport::Unix,
            owner_role: role,
            owner: "proc[42]".into(),
            effective,
            requested,
            uwsgi_listen: None,
            somaxconn,
            nginx_backlog: None,
        }
    }

    #[test]
    fn clamped_request_blames_somaxconn() {
        let v = backlog_verdict(&facts(Role::NginxMaster, 64, Some(511), Some(64)));
        assert_eq!(v.name, LimitName::Somaxconn);
        assert_eq!(v.value, Some(64));
        assert!(
            v.source
                .contains("asked listen(511), the kernel clamped it to 64"),
            "{}",
            v.source
        );
        assert!(
            v.fix.starts_with("sysctl -w net.core.somaxconn=511"),
            "{}",
            v.fix
        );
    }

    #[test]
    fn listen_minus_one_is_clamped_by_somaxconn_and_the_fix_stays_sane() {
        let v = backlog_verdict(&facts(
            Role::Other,
            128,
            Some(LISTEN_MAX_REQUEST),
            Some(128),
        ));
        assert_eq!(v.name, LimitName::Somaxconn);
        assert!(
            v.source
                .contains("asked the largest backlog allowed (listen(-1))"),
            "{}",
            v.source
        );
        assert!(
            v.fix.starts_with("sysctl -w net.core.somaxconn=1024 "),
            "{}",
            v.fix
        );
    }

    #[test]
    fn uwsgi_default_names_the_ini_option_and_the_room_somaxconn_leaves() {
        let mut f = facts(Role::UwsgiMaster, 100, Some(100), Some(4096));
        f.uwsgi_listen = Some(Setting {
            value: 100,
            source: "uWSGI default, no listen option set".into(),
            is_default: true,
        });
        let v = backlog_verdict(&f);
        assert_eq!(v.name, LimitName::UwsgiListen);
        assert_eq!(v.value, Some(100));
        assert_eq!(v.source, "uWSGI default, no listen option set");
        assert_eq!(
            v.fix,
            "uWSGI listen=100 (default): set \"listen = 1024\" in the uWSGI ini (net.core.somaxconn=4096 allows it); more uWSGI workers if the queue stays full"
        );
    }

    #[test]
    fn uwsgi_at_somaxconn_is_still_uwsgi_listen_and_says_to_raise_both() {
        let mut f = facts(Role::UwsgiWorker, 64, None, Some(64));
        f.uwsgi_listen = Some(Setting {
            value: 64,
            source: "--listen 64 on the uWSGI command line".into(),
            is_default: false,
        });
        let v = backlog_verdict(&f);
        assert_eq!(v.name, LimitName::UwsgiListen);
        assert_eq!(v.value, Some(64));
        assert!(
            v.fix
                .contains("first raise net.core.somaxconn to 1024 (now 64"),
            "{}",
            v.fix
        );
    }

    #[test]
    fn uwsgi_over_tcp_warns_that_nginx_shows_504_not_502() {
        let mut f = facts(Role::UwsgiMaster, 100, Some(100), Some(4096));
        f.transport = Transport::Tcp;
        let v = backlog_verdict(&f);
        assert_eq!(v.name, LimitName::UwsgiListen);
        assert!(
            v.fix
                .ends_with("(over TCP, nginx shows 504 or 499 for these, not 502)"),
            "{}",
            v.fix
        );
    }

    #[test]
    fn syn_queue_drops_name_tcp_max_syn_backlog_or_the_backlog() {
        let v = syn_queue_verdict(512);
        assert_eq!((v.name, v.value), (LimitName::TcpMaxSynBacklog, Some(512)));
        assert!(
            v.fix.starts_with("sysctl -w net.ipv4.tcp_syncookies=1"),
            "{}",
            v.fix
        );
        let v = syn_queue_backlog_verdict(&facts(Role::Other, 2, Some(2), Some(4096)));
        assert_eq!(v.name, LimitName::AppBacklog);
        assert!(
            v.fix.ends_with("so a full SYN queue answers with cookies"),
            "{}",
            v.fix
        );
    }

    #[test]
    fn unknown_request_at_somaxconn_is_ambiguous_not_a_guess() {
        let v = backlog_verdict(&facts(Role::Other, 4096, None, Some(4096)));
        assert_eq!(v.name, LimitName::BacklogAmbiguous);
        assert_eq!(v.value, Some(4096));
    }

    #[test]
    fn request_equal_to_somaxconn_is_the_apps_own_choice() {
        let v = backlog_verdict(&facts(Role::Other, 128, Some(128), Some(128)));
        assert_eq!(v.name, LimitName::AppBacklog);
    }

    #[test]
    fn nginx_and_other_owners() {
        let v = backlog_verdict(&facts(Role::NginxMaster, 511, Some(511), Some(4096)));
        assert_eq!(v.name, LimitName::NginxListenBacklog);
        assert_eq!(v.value, Some(511));
        assert!(v.fix.starts_with("add \"backlog=2048\" to nginx's listen directive (net.core.somaxconn=4096 allows it)"), "{}", v.fix);

        let v = backlog_verdict(&facts(Role::Other, 1, Some(1), Some(4096)));
        assert_eq!(v.name, LimitName::AppBacklog);
        assert_eq!(v.value, Some(1));
        assert_eq!(v.source, "proc[42] called listen(fd, 1)");
    }

    #[test]
    fn suggestions_grow_and_stay_powers_of_two() {
        assert_eq!(suggested_backlog(1), 1024);
        assert_eq!(suggested_backlog(511), 2048);
        assert_eq!(suggested_backlog(4096), 16384);
    }

    #[test]
    fn names_serialise_as_the_json_contract_says() {
        for name in [
            LimitName::Somaxconn,
            LimitName::UwsgiListen,
            LimitName::NginxListenBacklog,
            LimitName::AppBacklog,
            LimitName::BacklogAmbiguous,
            LimitName::TcpMaxSynBacklog,
            LimitName::RlimitNofile,
            LimitName::FileMax,
            LimitName::WorkerConnections,
            LimitName::IpLocalPortRange,
            LimitName::Unknown,
        ] {
            assert_eq!(serde_json::to_value(name).unwrap(), name.as_str());
        }
    }

    fn nofile(role: Role, soft: u64, hard: u64, nginx: Option<u32>) -> NofileFacts {
        NofileFacts {
            process: "proc[42]".into(),
            role,
            soft,
            hard,
            source: "somewhere".into(),
            nginx: nginx.map(|n| {
                (
                    Setting::configured(n, "worker_connections"),
                    "/etc/nginx/nginx.conf".into(),
                )
            }),
        }
    }

    #[test]
    fn nofile_names_the_soft_and_hard_values_and_the_knob_of_the_program() {
        let v = nofile_verdict(&nofile(Role::NginxWorker, 64, 64, Some(1024)));
        assert_eq!(
            (v.name, v.value, v.hard),
            (LimitName::RlimitNofile, Some(64), Some(64))
        );
        assert!(
            v.fix.starts_with(
                "set \"worker_rlimit_nofile 65536;\" in the main context of /etc/nginx/nginx.conf"
            ),
            "{}",
            v.fix
        );
        let v = nofile_verdict(&nofile(Role::NginxWorker, 64, 64, Some(65536)));
        assert!(
            v.fix.starts_with("set \"worker_rlimit_nofile 131072;\""),
            "{}",
            v.fix
        );
        let v = nofile_verdict(&nofile(Role::UwsgiMaster, 1024, 4096, None));
        assert!(
            v.fix.starts_with("set \"max-fd = 65536\" in the uWSGI ini")
                && v.fix.contains("the hard limit is 4096"),
            "{}",
            v.fix
        );
        let v = nofile_verdict(&nofile(Role::Other, 1024, 1_048_576, None));
        assert!(
            v.fix
                .starts_with("raise the open-file limit of proc[42] to 65536: LimitNOFILE=65536"),
            "{}",
            v.fix
        );
        assert!(!v.fix.contains("hard limit"), "{}", v.fix);
    }

    #[test]
    fn worker_connections_ephemeral_ports_and_file_max() {
        let connections = Setting::configured(64, "worker_connections 64 at /t/nginx.conf:3");
        let v = worker_connections_verdict(
            Some(&connections),
            Some(std::path::Path::new("/t/nginx.conf")),
            "a uretprobe on ngx_get_connection",
        );
        assert_eq!(v.value, Some(64));
        assert_eq!(v.source, "worker_connections 64 at /t/nginx.conf:3 (seen through a uretprobe on ngx_get_connection)");
        assert!(
            v.fix.starts_with(
                "raise worker_connections to 1024 in the events block of /t/nginx.conf"
            ),
            "{}",
            v.fix
        );

        let v = ephemeral_ports_verdict(Some((40000, 40001)), 7, None);
        assert_eq!((v.name, v.value), (LimitName::IpLocalPortRange, Some(2)));
        assert!(
            v.fix.contains("keepalive 32;") && v.fix.contains("ip_local_port_range=\"1024 65535\""),
            "{}",
            v.fix
        );

        let v = file_max_verdict(Some(1000), Some(990));
        assert_eq!((v.name, v.value), (LimitName::FileMax, Some(1000)));
        assert!(v.fix.starts_with("sysctl -w fs.file-max=2000"), "{}", v.fix);
    }
}
