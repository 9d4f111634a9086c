//! Listen backlogs, shared by the families whose drops are a full listen
//! queue (unix_backlog, tcp_accept_queue, tcp_syn_queue) and by the
//! backlog_clamped notice: which limit the queue hit (somaxconn, uWSGI's
//! listen, nginx's backlog=, the application's own listen() argument), its
//! value, where that value came from, and the fix. Pure logic: everything
//! it needs arrives in `BacklogFacts`.
use crate::{
    config::Setting,
    contract::{LimitName, Role, Verdict},
    host::owners::Owner,
};

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

pub use crate::host::listeners::LISTEN_MAX_REQUEST;

/// The verdict inputs common to every listener.
pub fn backlog_facts(
    transport: Transport,
    owner: Option<&Owner>,
    effective: u32,
    requested: Option<u32>,
    somaxconn: Option<u32>,
) -> BacklogFacts {
    BacklogFacts {
        transport,
        owner_role: owner.map_or(Role::Other, |o| o.process.role),
        owner: owner.map_or_else(|| "the listener's owner".into(), Owner::label),
        effective,
        requested,
        uwsgi_listen: owner.and_then(Owner::uwsgi_listen),
        somaxconn,
        nginx_backlog: None,
    }
}

/// nginx's configured backlog for a listener, by its port or path.
pub fn nginx_backlog(
    owner: Option<&Owner>,
    port: Option<u16>,
    path: Option<&std::path::Path>,
) -> Option<Setting> {
    owner?.nginx.as_ref()?.listen_backlog(port, path).cloned()
}

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
}
