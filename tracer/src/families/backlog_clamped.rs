//! backlog_clamped notices: a listen() asked for more than its network
//! namespace's net.core.somaxconn and the kernel silently clamped it. Told
//! before any drop, once per socket (nginx calls listen() twice on one).
use std::collections::HashSet;

use tracer_common::{ListenRecord, AF_INET6, AF_UNIX, FAST_PATH_LISTEN};

use super::{
    backlog::{clamp_fix, LISTEN_MAX_REQUEST},
    listener_view, Families, LISTEN_ENTER, LISTEN_EXIT, SYSCALL_EXIT,
};
use crate::{
    contract::{Family, Notice, NoticeKind},
    host::{address::UnixAddress, owners::Owner},
    probes::hooks::{FamilyHooks, Mechanism, Program},
};

/// listen() records also keep the UNIX and TCP listener tables current
/// (requested backlogs, owners), so these hooks serve every listen family.
pub const HOOKS: FamilyHooks = FamilyHooks {
    family: "listen (backlog_clamped, listener tables)",
    mechanisms: &[
        Mechanism {
            name: "fexit/__sys_listen",
            programs: &[Program::fexit("listen_fexit", "__sys_listen")],
            needs: &[],
            fast_path: Some(FAST_PATH_LISTEN),
            extras: &[],
        },
        // The fast path keeps tp_btf/sys_exit, if another family has it,
        // from reporting listeners twice.
        Mechanism {
            name: "tracepoint syscalls/sys_exit_listen (64-bit callers, arguments from their registers)",
            programs: &[Program::tracepoint(
                "listen_exit_regs",
                "syscalls",
                "sys_exit_listen",
            )],
            needs: &[],
            fast_path: Some(FAST_PATH_LISTEN),
            extras: &[],
        },
        SYSCALL_EXIT,
        Mechanism {
            name: "tracepoints syscalls/sys_{enter,exit}_listen (64-bit callers)",
            programs: &[LISTEN_ENTER, LISTEN_EXIT],
            needs: &[],
            fast_path: None,
            extras: &[],
        },
    ],
};

/// Sockets remembered as reported, at most.
const MAX_REPORTED: usize = 65_536;

/// Sockets whose clamped backlog was already reported.
#[derive(Default)]
pub struct BacklogClamped {
    reported: HashSet<u64>,
}

impl Families {
    /// A listen() whose backlog the kernel clamped to somaxconn: a notice,
    /// once per socket.
    pub(super) fn clamp_notice(&mut self, record: &ListenRecord) -> Option<Notice> {
        let requested = record.requested_backlog;
        let clamped = requested > record.effective_backlog
            && record.effective_backlog == record.somaxconn
            // listen(-1) asks for "as large as allowed": no surprise.
            && requested < LISTEN_MAX_REQUEST;
        if !clamped || !self.filter.covers(record.pid) {
            return None;
        }
        // Sockets come and go for weeks: past the cap, a socket seen long
        // ago may be told of once more, never missed.
        if self.clamps.reported.len() >= MAX_REPORTED {
            self.clamps.reported.clear();
        }
        if !self.clamps.reported.insert(record.sock_inode) {
            return None;
        }
        let owner = self.host.process(record.pid).map(|p| self.host.owner(p));
        let family = match record.family {
            AF_UNIX => Family::Unix,
            AF_INET6 => Family::Tcp6,
            _ => Family::Tcp,
        };
        let mut view = listener_view(family, Some(record.netns), owner.as_ref());
        view.backlog = Some(record.effective_backlog);
        if record.family == AF_UNIX {
            let raw = &record.path[..(record.path_len as usize).min(record.path.len())];
            view.path = UnixAddress::from_sun_path(raw).map(|a| a.to_string());
        } else if let Some((addr, port)) =
            self.host
                .tcp_local_address(record.pid, record.tid, record.sock_inode)
        {
            view.addr = Some(addr.to_string());
            view.port = Some(port);
        }
        let owner_label = owner
            .as_ref()
            .map_or(format!("pid {}", record.pid), Owner::label);
        Some(Notice {
            time: self.clock.wall(record.ktime_ns),
            kind: NoticeKind::BacklogClamped,
            listener: view,
            requested,
            effective: record.effective_backlog,
            somaxconn: record.somaxconn,
            fix: clamp_fix(&owner_label, requested),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tracer_common::{RecordKind, UNIX_PATH_MAX};

    use super::super::{bytes_of, testing::*};
    use super::*;
    use crate::{contract::Role, host::fake::FakeHost};

    fn listen(requested: u32) -> ListenRecord {
        let mut path = [0u8; UNIX_PATH_MAX];
        path[..10].copy_from_slice(b"/run/a.sck");
        ListenRecord {
            kind: RecordKind::Listen as u32,
            pid: 4200,
            tid: 4200,
            fd: 6,
            ktime_ns: 101_000_000,
            requested_backlog: requested,
            effective_backlog: 64,
            somaxconn: 64,
            netns: 4026531840,
            sock_inode: 55,
            family: AF_UNIX,
            path_len: 10,
            comm: comm("nginx"),
            path,
            _pad: [0; 8],
        }
    }

    #[test]
    fn a_clamped_listen_becomes_one_exact_json_notice_per_socket() {
        let mut host = FakeHost::default();
        host.add_process(4200, "nginx", Role::NginxMaster, Some(1));
        let mut families = families(host);
        let line = notice_line(families.handle(&bytes_of(&listen(511))));
        assert_eq!(
            line,
            json!({
                "type": "notice",
                "time": "2026-09-21T14:13:20.101Z",
                "kind": "backlog_clamped",
                "listener": {"family": "unix", "path": "/run/a.sck", "netns": 4026531840u64,
                             "pid": 4200, "comm": "nginx", "role": "nginx-master",
                             "queue": null, "backlog": 64},
                "requested": 511,
                "effective": 64,
                "somaxconn": 64,
                "fix": "sysctl -w net.core.somaxconn=511 in that namespace (persist it in /etc/sysctl.d/), then restart nginx[4200] so it listens again"
            })
        );
        // nginx listens twice on one socket: one notice.
        assert!(families.handle(&bytes_of(&listen(511))).is_none());
    }

    #[test]
    fn listen_minus_one_is_no_surprise() {
        let mut families = families(FakeHost::default());
        assert!(families.handle(&bytes_of(&listen(u32::MAX))).is_none());
    }
}
