//! worker_connections: nginx had no free connection slot ("worker_connections
//! are not enough"). No kernel event marks it: accept4() succeeded and nginx
//! closes the socket itself. `watch` finds the way to see it per nginx
//! master: nginx's own error log, or a uretprobe on ngx_get_connection
//! returning NULL.
mod watch;

use std::time::SystemTime;

use super::{Families, VerdictKey};
use crate::{
    config::Setting,
    contract::{Drop, DropKind, LimitName, Verdict},
    families::backlog::suggested_backlog,
    probes::hooks::{FamilyHooks, Mechanism, Program},
};
pub use watch::WorkerConnections;

pub const HOOKS: FamilyHooks = FamilyHooks {
    family: "worker_connections",
    mechanisms: &[Mechanism {
        name: "nginx's error log (a uretprobe on ngx_get_connection where nginx logs to no file, or with --nginx-uretprobe)",
        programs: &[Program::uretprobe(watch::NGINX_PROGRAM, watch::NGINX_SYMBOL)],
        needs: &[],
        fast_path: None,
        extras: &[],
    }],
};

impl Families {
    /// An nginx worker found no free connection slot.
    pub(super) fn no_connection(
        &mut self,
        pid: u32,
        comm: String,
        time: SystemTime,
    ) -> Option<Drop> {
        if !self.filter.covers(pid) {
            return None;
        }
        let client = self.client(pid, comm);
        let limit = self.cached_verdict(VerdictKey::WorkerConnections { pid }, |this| {
            let process = this.host.process(pid);
            let method = process
                .as_ref()
                .and_then(|p| this.host.nginx_master(p))
                .and_then(|m| this.worker_connections.method_of(m.pid))
                .map_or("a uretprobe on ngx_get_connection".to_string(), |m| {
                    m.describe()
                });
            let config = process.as_ref().and_then(|p| this.host.nginx_config(p));
            worker_connections_verdict(
                config.as_ref().map(|c| &c.worker_connections),
                config.as_ref().map(|c| c.main_file.as_path()),
                &method,
            )
        });
        Some(Drop {
            time,
            kind: DropKind::WorkerConnections,
            stage: None,
            client,
            listener: None,
            limit,
            caused_by: None,
        })
    }

    /// worker_connections alerts read from nginx error logs (binaries
    /// without the ngx_get_connection symbol).
    pub fn logged_shortages(&mut self) -> Vec<(Drop, u64)> {
        let pids = self.worker_connections.logged_alerts();
        pids.into_iter()
            .filter_map(|pid| {
                let comm = self
                    .host
                    .process(pid)
                    .map_or_else(|| "nginx".into(), |p| p.comm);
                Some((self.no_connection(pid, comm, SystemTime::now())?, 1))
            })
            .collect()
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

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tracer_common::{NoConnectionRecord, RecordKind};

    use super::super::{bytes_of, testing::*};
    use super::*;
    use crate::{contract::Role, host::fake::FakeHost};

    #[test]
    fn worker_connections_names_the_setting_and_how_it_was_seen() {
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
    }

    #[test]
    fn a_null_ngx_get_connection_becomes_the_exact_json_drop_line() {
        let mut host = FakeHost::default();
        host.add_process(29115, "nginx", Role::NginxMaster, Some(1));
        host.add_process(29116, "nginx", Role::NginxWorker, Some(29115));
        let mut families = families(host);
        let record = NoConnectionRecord {
            kind: RecordKind::NoConnection as u32,
            pid: 29116,
            tid: 29116,
            _pad: 0,
            ktime_ns: 22_000_000,
            comm: comm("nginx"),
        };
        let line = drop_line(&mut families, &bytes_of(&record), 1);
        assert_eq!(
            line,
            json!({
                "type": "drop",
                "time": "2026-09-21T14:13:20.022Z",
                "kind": "worker_connections",
                "count": 1,
                "client": {"pid": 29116, "comm": "nginx", "role": "nginx-worker"},
                "limit": {"name": "worker_connections", "value": null,
                          "source": "worker_connections of this nginx (its configuration could not be read) (seen through a uretprobe on ngx_get_connection)",
                          "fix": "raise worker_connections to 2048 in the events block of nginx's configuration (each proxied request holds 2: client and upstream) with worker_rlimit_nofile at least 4096, and reload nginx"}
            })
        );
    }
}
