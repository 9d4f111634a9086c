//! unix_backlog: connect() to a UNIX stream socket refused with EAGAIN, the
//! listener's queue holding backlog + 1 connections (`unix_recvq_full` in
//! `unix_stream_connect`). nginx logs `(11: Resource temporarily
//! unavailable)` and answers 502. The refused connect does not reach the
//! listener, so the host's listener table names it from the address.
use std::time::{Duration, Instant};

use tracer_common::{ConnectFailure, FAST_PATH_UNIX_CONNECT};

use super::{
    backlog::{self, backlog_facts, nginx_backlog, Transport},
    comm_of, listener_view, Families, CONNECT_EXIT_WITH_REGS, CONNECT_TRACEPOINTS, SYSCALL_EXIT,
};
use crate::{
    contract::{Drop, DropKind, Family},
    host::{
        address::UnixAddress,
        listeners::{Listener, Task},
    },
    probes::hooks::{FamilyHooks, Mechanism, Program},
};

/// How long a sampled queue length is reused under a storm.
const QUEUE_SAMPLE_TTL: Duration = Duration::from_millis(100);

/// fexit on the kernel's connect (`__sys_connect_file`, which the syscall
/// and io_uring call, with the address in a typed copy) costs nothing to
/// other syscalls; the syscall tracepoints put every syscall of every
/// process on the traced path, and are the fallback where fexit is refused.
pub const HOOKS: FamilyHooks = FamilyHooks {
    family: "unix_backlog",
    mechanisms: &[
        Mechanism {
            name: "fexit/__sys_connect_file",
            programs: &[Program::fexit("unix_connect_refused", "__sys_connect_file")],
            needs: &[],
            fast_path: Some(FAST_PATH_UNIX_CONNECT),
            extras: &[],
        },
        CONNECT_EXIT_WITH_REGS,
        SYSCALL_EXIT,
        CONNECT_TRACEPOINTS,
    ],
};

/// Queue lengths sampled recently, by listener inode.
#[derive(Default)]
pub struct UnixBacklog {
    queue_samples: std::collections::HashMap<u64, (Instant, Option<u32>)>,
}

impl Families {
    fn unix_queue(&mut self, listener: &Listener) -> Option<u32> {
        let now = Instant::now();
        if let Some(&(at, queue)) = self.unix.queue_samples.get(&listener.inode) {
            if now.duration_since(at) < QUEUE_SAMPLE_TTL {
                return queue;
            }
        }
        let queue = self.host.unix_queue(listener);
        if self.unix.queue_samples.len() >= super::MAX_REMEMBERED {
            self.unix
                .queue_samples
                .retain(|_, (at, _)| now.duration_since(*at) < QUEUE_SAMPLE_TTL);
        }
        self.unix.queue_samples.insert(listener.inode, (now, queue));
        queue
    }

    pub(super) fn unix_connect_refused(&mut self, record: &ConnectFailure) -> Option<Drop> {
        let raw = &record.addr[..(record.addr_len as usize).min(record.addr.len())];
        let address = UnixAddress::from_sun_path(raw)?;
        let task = Task {
            pid: record.pid,
            tid: record.tid,
            netns: record.netns,
        };
        let listener = self.host.unix_listener(task, &address);
        let owner = listener.as_ref().and_then(|l| l.owner.clone());
        if !self.filter.covers(record.pid)
            && !owner
                .as_ref()
                .is_some_and(|o| self.filter.covers(o.process.pid))
        {
            return None;
        }
        let client = self.client(record.pid, comm_of(&record.comm));
        let mut view = listener_view(Family::Unix, None, owner.as_ref());
        view.path = Some(address.to_string());
        let limit = match &listener {
            Some(listener) => {
                view.netns = Some(listener.netns);
                view.queue = self.unix_queue(listener);
                view.backlog = Some(listener.backlog);
                let mut facts = backlog_facts(
                    Transport::Unix,
                    owner.as_ref(),
                    listener.backlog,
                    listener.requested,
                    listener.somaxconn,
                );
                facts.nginx_backlog = nginx_backlog(owner.as_ref(), None, address.path());
                backlog::backlog_verdict(&facts)
            }
            None => backlog::unknown_listener_verdict(),
        };
        let time = self.clock.wall(record.ktime_ns);
        Some(Drop {
            time,
            kind: DropKind::UnixBacklog,
            stage: None,
            client,
            caused_by: owner
                .as_ref()
                .and_then(|o| self.cause_for(o.process.pid, time)),
            listener: Some(view),
            limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tracer_common::{ConnectFailure, RecordKind, AF_UNIX, UNIX_PATH_MAX};

    use super::super::{bytes_of, testing::*};
    use crate::{
        config::Setting,
        contract::Role,
        host::fake::{FakeHost, FakeListener},
    };

    fn refused(path: &str) -> ConnectFailure {
        let mut addr = [0u8; UNIX_PATH_MAX];
        addr[..path.len()].copy_from_slice(path.as_bytes());
        ConnectFailure {
            kind: RecordKind::ConnectFailure as u32,
            pid: 3363,
            tid: 3363,
            ret: -11,
            ktime_ns: 123_000_000,
            family: AF_UNIX,
            addr_len: path.len() as u16,
            netns: 4026531840,
            comm: comm("nginx"),
            addr,
            _pad: [0; 4],
        }
    }

    #[test]
    fn a_refused_connect_to_uwsgi_becomes_the_exact_json_drop_line() {
        let mut host = FakeHost::default();
        host.add_process(3363, "nginx", Role::NginxWorker, Some(3362));
        let uwsgi = host.add_process(3300, "uwsgi", Role::UwsgiMaster, Some(1));
        host.uwsgi_listen.insert(
            3300,
            Setting::default_value(100, "uWSGI default, no listen option set"),
        );
        host.unix_listeners.push(FakeListener {
            path: "/run/app.sock".into(),
            inode: 77,
            netns: 4026531840,
            backlog: 100,
            requested: Some(100),
            somaxconn: Some(4096),
            owner: Some(uwsgi),
            queue: Some(101),
        });
        let mut families = families(host);
        let line = drop_line(&mut families, &bytes_of(&refused("/run/app.sock")), 1);
        assert_eq!(
            line,
            json!({
                "type": "drop",
                "time": "2026-09-21T14:13:20.123Z",
                "kind": "unix_backlog",
                "count": 1,
                "client": {"pid": 3363, "comm": "nginx", "role": "nginx-worker"},
                "listener": {"family": "unix", "path": "/run/app.sock", "netns": 4026531840u64,
                             "pid": 3300, "comm": "uwsgi", "role": "uwsgi-master",
                             "queue": 101, "backlog": 100},
                "limit": {"name": "uwsgi_listen", "value": 100,
                          "source": "uWSGI default, no listen option set",
                          "fix": "uWSGI listen=100 (default): set \"listen = 1024\" in the uWSGI ini (net.core.somaxconn=4096 allows it); more uWSGI workers if the queue stays full"}
            })
        );
    }

    #[test]
    fn a_listener_the_host_does_not_know_is_counted_as_unknown() {
        let mut families = families(FakeHost::default());
        let line = drop_line(&mut families, &bytes_of(&refused("/run/gone.sock")), 1);
        assert_eq!(line["kind"], "unix_backlog");
        assert_eq!(line["listener"]["path"], "/run/gone.sock");
        assert_eq!(line["limit"]["name"], "unknown");
        assert_eq!(
            line["client"],
            json!({"pid": 3363, "comm": "nginx", "role": "other"})
        );
    }
}
