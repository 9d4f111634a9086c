//! A process's open-file limit (RLIMIT_NOFILE) and where it came from.
//!
//! Limits are inherited at fork and exec, so the place that set one is the
//! highest ancestor that still has it: a shell's `ulimit -n`, `prlimit`, a
//! systemd unit's LimitNOFILE=, or the program itself (nginx's
//! worker_rlimit_nofile, uWSGI's max-fd).
use std::fs;

use super::process::{self, Process};
use crate::contract::Nofile;

/// "Max open files  1024  524288  files" in /proc/PID/limits.
pub fn nofile_of(pid: u32) -> Option<Nofile> {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    parse_limits(&limits)
}

fn parse_limits(text: &str) -> Option<Nofile> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut numbers = line["Max open files".len()..].split_whitespace();
    let value = |v: &str| {
        if v == "unlimited" {
            Some(u64::MAX)
        } else {
            v.parse().ok()
        }
    };
    Some(Nofile {
        soft: value(numbers.next()?)?,
        hard: value(numbers.next()?)?,
    })
}

/// The systemd unit a process runs in ("nginx.service"), from its cgroup.
pub fn systemd_unit(pid: u32) -> Option<String> {
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    unit_of_cgroup(&cgroup)
}

fn unit_of_cgroup(text: &str) -> Option<String> {
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    path.rsplit('/')
        .find(|part| part.ends_with(".service"))
        .map(str::to_owned)
}

/// The ancestor that set `pid`'s current soft limit: the highest one in the
/// chain of parents with the same soft limit, and its parent (which has a
/// different one), if any.
#[derive(Clone, Debug)]
pub struct Setter {
    pub process: Process,
    pub parent: Option<(Process, Nofile)>,
}

pub fn setter_of(pid: u32, soft: u64) -> Option<Setter> {
    let mut current = process::inspect(pid)?;
    loop {
        let Some(parent_pid) = process::parent_of(current.pid).filter(|&p| p > 0) else {
            return Some(Setter {
                process: current,
                parent: None,
            });
        };
        let parent = process::inspect(parent_pid);
        let parent_limit = nofile_of(parent_pid);
        match (parent, parent_limit) {
            (Some(parent), Some(limit)) if limit.soft == soft => current = parent,
            (Some(parent), Some(limit)) => {
                return Some(Setter {
                    process: current,
                    parent: Some((parent, limit)),
                })
            }
            _ => {
                return Some(Setter {
                    process: current,
                    parent: None,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_limits_lines() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \nMax cpu time              unlimited            unlimited            seconds   \nMax open files            1024                 524288               files     \n";
        assert_eq!(
            parse_limits(text),
            Some(Nofile {
                soft: 1024,
                hard: 524288
            })
        );
        assert_eq!(
            parse_limits(
                "Max open files            unlimited            unlimited            files\n"
            ),
            Some(Nofile {
                soft: u64::MAX,
                hard: u64::MAX
            })
        );
        assert_eq!(parse_limits("nothing"), None);
    }

    #[test]
    fn units_come_from_the_cgroup_path() {
        assert_eq!(
            unit_of_cgroup("0::/system.slice/nginx.service\n").as_deref(),
            Some("nginx.service")
        );
        assert_eq!(
            unit_of_cgroup("0::/user.slice/user-0.slice/session-1.scope\n"),
            None
        );
    }

    #[test]
    fn our_own_limit_is_set_by_an_ancestor() {
        let me = std::process::id();
        let mine = nofile_of(me).unwrap();
        let setter = setter_of(me, mine.soft).unwrap();
        assert_eq!(nofile_of(setter.process.pid).unwrap().soft, mine.soft);
        if let Some((_, limit)) = setter.parent {
            assert_ne!(limit.soft, mine.soft);
        }
    }
}
