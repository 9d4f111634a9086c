//! nofile and file_max: a syscall that needed a new file descriptor
//! (accept, accept4, socket, open, openat) failed with EMFILE, the process's
//! RLIMIT_NOFILE (nginx: `(24: Too many open files)`), or ENFILE, the whole
//! system's fs.file-max. The kernel side reads the soft and hard limits from
//! the task at that moment; userspace finds who set them.
use tracer_common::{fd_syscall, FdLimitRecord, FAST_PATH_FD_LIMITS};

use super::{comm_of, Families, VerdictKey, CAUSE_WINDOW, MAX_REMEMBERED, SYSCALL_EXIT};
use crate::{
    config::{self, Setting},
    contract::{rfc3339, Cause, Drop, DropKind, LimitName, Role, Syscall, Verdict},
    host::Host,
    probes::hooks::{FamilyHooks, Mechanism, Program},
};

const ENFILE: i32 = -23;

pub const HOOKS: FamilyHooks = FamilyHooks {
    family: "nofile/file_max",
    mechanisms: &[
        Mechanism {
            name: FEXIT,
            programs: &[
                Program::fexit("accept_fexit", "__x64_sys_accept"),
                Program::fexit("accept4_fexit", "__x64_sys_accept4"),
                Program::fexit("socket_fexit", "__x64_sys_socket"),
                Program::fexit("open_fexit", "__x64_sys_open"),
                Program::fexit("openat_fexit", "__x64_sys_openat"),
            ],
            needs: &[],
            fast_path: Some(FAST_PATH_FD_LIMITS),
            extras: &[],
        },
        // Where tp_btf/sys_exit runs anyway for another family, the fast
        // path keeps it from counting these twice.
        Mechanism {
            name:
                "tracepoints syscalls/sys_exit_{accept,accept4,socket,open,openat} (64-bit callers)",
            programs: &[
                Program::tracepoint("accept_exit", "syscalls", "sys_exit_accept"),
                Program::tracepoint("accept4_exit", "syscalls", "sys_exit_accept4"),
                Program::tracepoint("socket_exit", "syscalls", "sys_exit_socket"),
                Program::tracepoint("open_exit", "syscalls", "sys_exit_open"),
                Program::tracepoint("openat_exit", "syscalls", "sys_exit_openat"),
            ],
            needs: &[],
            fast_path: Some(FAST_PATH_FD_LIMITS),
            extras: &[],
        },
        SYSCALL_EXIT,
    ],
};

/// fexit on the syscalls' own entry points: only those calls pay. (Not
/// do_sys_open: openat calls an inlined copy of it, which fexit never sees.)
const FEXIT: &str = "fexit/__x64_sys_{accept,accept4,socket,open,openat}";

fn syscall_of(raw: u32) -> Option<Syscall> {
    Some(match raw {
        fd_syscall::ACCEPT => Syscall::Accept,
        fd_syscall::ACCEPT4 => Syscall::Accept4,
        fd_syscall::SOCKET => Syscall::Socket,
        fd_syscall::OPEN => Syscall::Open,
        fd_syscall::OPENAT => Syscall::Openat,
        _ => return None,
    })
}

/// Where a process's soft RLIMIT_NOFILE came from, in words. `own` is the
/// program's own setting (nginx's worker_rlimit_nofile, uWSGI's max-fd)
/// and what it does; `unset` says it is absent, when that is worth saying.
fn nofile_source(
    host: &mut dyn Host,
    pid: u32,
    soft: u64,
    own: Option<(config::Setting<u64>, &str)>,
    unset: &str,
) -> String {
    let no_directive = match own {
        Some((setting, effect)) if setting.value == soft => {
            return format!("{} ({effect})", setting.source)
        }
        _ => unset,
    };
    let Some(setter) = host.nofile_setter(pid, soft) else {
        return format!(
            "RLIMIT_NOFILE of pid {pid}, which exited before droptrace looked{no_directive}"
        );
    };
    let who = format!("{}[{}]", setter.process.comm, setter.process.pid);
    let inherited = if setter.process.pid != pid {
        format!(", inherited by pid {pid}")
    } else {
        String::new()
    };
    match setter.parent {
        Some((parent, _)) if parent.pid == 1 => match host.systemd_unit(setter.process.pid) {
            Some(unit) => format!("LimitNOFILE= of systemd unit {unit} ({who}{inherited}){no_directive}"),
            None => format!("set on {who} when it was started (its parent is init){inherited}{no_directive}"),
        },
        Some((parent, limit)) => format!(
            "set on {who} by prlimit, ulimit -n or setrlimit (its parent {}[{}] has {}){inherited}{no_directive}",
            parent.comm, parent.pid, limit.soft
        ),
        None => format!("the system default, inherited from {who}{inherited}{no_directive}"),
    }
}

impl Families {
    /// accept/socket/open failed with EMFILE or ENFILE.
    pub(super) fn fd_limit(&mut self, record: &FdLimitRecord) -> Option<Drop> {
        if !self.filter.covers(record.pid) {
            return None;
        }
        let syscall = syscall_of(record.syscall)?;
        let time = self.clock.wall(record.ktime_ns);
        let mut client = self.client(record.pid, comm_of(&record.comm));
        client.syscall = Some(syscall);
        let (kind, limit) = if record.ret == ENFILE {
            let (file_max, allocated) = self.host.file_max();
            let verdict = file_max_verdict(file_max, allocated);
            (DropKind::FileMax, verdict)
        } else {
            let (pid, soft, hard) = (record.pid, record.nofile_soft, record.nofile_hard);
            let key = VerdictKey::Nofile { pid, soft, hard };
            let verdict = self.cached_verdict(key, |this| {
                let host = this.host.as_mut();
                let process = host.process(pid);
                let nginx = process.as_ref().and_then(|p| host.nginx_config(p));
                let uwsgi = process
                    .as_ref()
                    .filter(|p| p.role.is_uwsgi())
                    .map(|p| host.uwsgi_config(p));
                let own = match (&nginx, &uwsgi) {
                    (Some(c), _) => c
                        .worker_rlimit_nofile
                        .clone()
                        .map(|s| (s, "nginx sets it in each worker")),
                    (_, Some(c)) => c
                        .max_fd
                        .clone()
                        .map(|s| (s, "uWSGI sets it when it starts")),
                    _ => None,
                };
                let unset = nginx.as_ref().map_or(String::new(), |c| {
                    format!("; no worker_rlimit_nofile in {}", c.main_file.display())
                });
                nofile_verdict(&NofileFacts {
                    process: process
                        .as_ref()
                        .map_or(format!("pid {pid}"), |p| format!("{}[{pid}]", p.comm)),
                    role: process.as_ref().map_or(Role::Other, |p| p.role),
                    soft,
                    hard,
                    source: nofile_source(host, pid, soft, own, &unset),
                    nginx: nginx.map(|c| (c.worker_connections.clone(), c.main_file.clone())),
                })
            });
            (DropKind::Nofile, verdict)
        };
        if syscall.is_accept() {
            let cause = Cause {
                kind,
                time: rfc3339(time),
                pid: record.pid,
                comm: comm_of(&record.comm),
                syscall: Some(syscall),
                limit: limit.name,
                value: limit.value,
            };
            if self.accept_failures.len() >= MAX_REMEMBERED {
                self.accept_failures.retain(|_, (at, _)| {
                    time.duration_since(*at)
                        .is_ok_and(|age| age <= CAUSE_WINDOW)
                });
            }
            let parent = self.host.parent_of(record.pid);
            for pid in std::iter::once(record.pid).chain(parent) {
                self.accept_failures.insert(pid, (time, cause.clone()));
            }
        }
        Some(Drop {
            time,
            kind,
            stage: None,
            client,
            listener: None,
            limit,
            caused_by: None,
        })
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

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tracer_common::RecordKind;

    use super::super::{bytes_of, testing::*};
    use super::*;
    use crate::host::{
        fake::FakeHost,
        rlimits::{self, Setter},
        LiveHost,
    };

    #[test]
    fn a_programs_own_nofile_setting_is_the_source_when_it_is_the_value_hit() {
        let max_fd = config::Setting::configured(32, "max-fd = 32 in /etc/uwsgi/app.ini:4");
        assert_eq!(
            nofile_source(
                &mut LiveHost::default(),
                std::process::id(),
                32,
                Some((max_fd.clone(), "uWSGI sets it when it starts")),
                ""
            ),
            "max-fd = 32 in /etc/uwsgi/app.ini:4 (uWSGI sets it when it starts)"
        );
        // A setting that is not the value hit is not blamed.
        let mine = rlimits::nofile_of(std::process::id()).unwrap().soft;
        let source = nofile_source(
            &mut LiveHost::default(),
            std::process::id(),
            mine,
            Some((max_fd, "uWSGI sets it")),
            "; no max-fd",
        );
        assert!(!source.starts_with("max-fd"), "{source}");
        assert!(source.ends_with("; no max-fd"), "{source}");
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
    fn file_max_names_the_sysctl_and_doubles_it() {
        let v = file_max_verdict(Some(1000), Some(990));
        assert_eq!((v.name, v.value), (LimitName::FileMax, Some(1000)));
        assert!(v.fix.starts_with("sysctl -w fs.file-max=2000"), "{}", v.fix);
    }

    fn failed(syscall: u32, ret: i32) -> FdLimitRecord {
        FdLimitRecord {
            kind: RecordKind::FdLimit as u32,
            pid: 29006,
            tid: 29006,
            ret,
            ktime_ns: 310_000_000,
            syscall,
            netns: 4026531840,
            nofile_soft: 64,
            nofile_hard: 64,
            comm: comm("nginx"),
        }
    }

    #[test]
    fn an_nginx_accept4_at_its_rlimit_becomes_the_exact_json_drop_line() {
        let mut host = FakeHost::default();
        let master = host.add_process(29005, "nginx", Role::NginxMaster, Some(1));
        host.add_process(29006, "nginx", Role::NginxWorker, Some(29005));
        let init = host.add_process(1, "systemd", Role::Other, None);
        host.setters.insert(
            29006,
            Setter {
                process: master,
                parent: Some((
                    init,
                    crate::contract::Nofile {
                        soft: 1024,
                        hard: 524288,
                    },
                )),
            },
        );
        let mut families = families(host);
        let line = drop_line(
            &mut families,
            &bytes_of(&failed(fd_syscall::ACCEPT4, -24)),
            1,
        );
        assert_eq!(
            line,
            json!({
                "type": "drop",
                "time": "2026-09-21T14:13:20.310Z",
                "kind": "nofile",
                "count": 1,
                "client": {"pid": 29006, "comm": "nginx", "role": "nginx-worker", "syscall": "accept4"},
                "limit": {"name": "rlimit_nofile", "value": 64, "hard": 64,
                          "source": "set on nginx[29005] when it was started (its parent is init), inherited by pid 29006",
                          "fix": "raise the open-file limit of nginx[29006] to 65536: LimitNOFILE=65536 in its systemd unit, or `ulimit -n 65536` in the script that starts it (nofile in /etc/security/limits.conf for login sessions), then restart it; the hard limit is 64: raise LimitNOFILE= (systemd) or `ulimit -Hn` where it starts"}
            })
        );
    }

    #[test]
    fn enfile_becomes_a_file_max_drop() {
        let mut host = FakeHost::default();
        host.add_process(29006, "nginx", Role::Other, Some(1));
        host.file_max = (Some(1000), Some(990));
        let mut families = families(host);
        let line = drop_line(
            &mut families,
            &bytes_of(&failed(fd_syscall::SOCKET, -23)),
            1,
        );
        assert_eq!(
            line,
            json!({
                "type": "drop",
                "time": "2026-09-21T14:13:20.310Z",
                "kind": "file_max",
                "count": 1,
                "client": {"pid": 29006, "comm": "nginx", "role": "other", "syscall": "socket"},
                "limit": {"name": "file_max", "value": 1000,
                          "source": "fs.file-max, the system-wide limit on open files; 990 allocated now",
                          "fix": "sysctl -w fs.file-max=2000 (persist it in /etc/sysctl.d/), and look for the process holding most descriptors (ls /proc/*/fd | wc -l per process)"}
            })
        );
    }
}
