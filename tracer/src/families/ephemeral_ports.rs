//! ephemeral_ports: connect() to an IPv4/IPv6 address failed with
//! EADDRNOTAVAIL: no local port of net.ipv4.ip_local_port_range was free
//! towards that destination. The drop's "listener" is the destination.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tracer_common::{ConnectFailure, AF_INET, AF_INET6, FAST_PATH_INET_CONNECT};

use super::{
    comm_of, listener_view, Families, VerdictKey, CONNECT_EXIT_WITH_REGS, CONNECT_TRACEPOINTS,
    SYSCALL_EXIT,
};
use crate::{
    contract::{socket_label, Drop, DropKind, Family, LimitName, Verdict},
    probes::hooks::{FamilyHooks, Mechanism, Program},
};

pub const HOOKS: FamilyHooks = FamilyHooks {
    family: "ephemeral_ports",
    mechanisms: &[
        Mechanism {
            name: "fexit/inet_hash_connect + inet6_hash_connect",
            programs: &[
                Program::fexit("hash_connect_fexit", "inet_hash_connect"),
                Program::fexit("hash_connect6_fexit", "inet6_hash_connect"),
            ],
            needs: &[],
            fast_path: Some(FAST_PATH_INET_CONNECT),
            extras: &[],
        },
        CONNECT_EXIT_WITH_REGS,
        SYSCALL_EXIT,
        CONNECT_TRACEPOINTS,
    ],
};

/// The destination of a connect(): the sockaddr bytes after the family.
fn destination(family: u16, addr: &[u8]) -> Option<(IpAddr, u16)> {
    let port = u16::from_be_bytes(addr.get(..2)?.try_into().ok()?);
    let ip = match family {
        AF_INET => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(addr.get(2..6)?).ok()?)),
        AF_INET6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(addr.get(6..22)?).ok()?)),
        _ => return None,
    };
    Some((ip, port))
}

impl Families {
    /// connect() to an IPv4/IPv6 address found no free local port.
    pub(super) fn ephemeral_ports(&mut self, record: &ConnectFailure) -> Option<Drop> {
        if !self.filter.covers(record.pid) {
            return None;
        }
        let raw = &record.addr[..(record.addr_len as usize).min(record.addr.len())];
        let (ip, port) = destination(record.family, raw)?;
        let client = self.client(record.pid, comm_of(&record.comm));
        let mut view = listener_view(
            if ip.is_ipv4() {
                Family::Tcp
            } else {
                Family::Tcp6
            },
            Some(record.netns),
            None,
        );
        view.addr = Some(ip.to_string());
        view.port = Some(port);
        let (pid, netns) = (record.pid, record.netns);
        let key = VerdictKey::EphemeralPorts {
            pid,
            netns,
            destination: (ip, port),
        };
        let limit = self.cached_verdict(key, |this| {
            let server = socket_label(&ip.to_string(), port);
            let process = this.host.process(pid);
            let keepalive = process
                .as_ref()
                .and_then(|p| this.host.nginx_config(p))
                .and_then(|c| {
                    c.upstreams
                        .iter()
                        .find(|u| u.server == server)
                        .map(|u| u.keepalive.is_some())
                });
            let range = this.host.ip_local_port_range(netns);
            ephemeral_ports_verdict(range, netns, keepalive)
        });
        Some(Drop {
            time: self.clock.wall(record.ktime_ns),
            kind: DropKind::EphemeralPorts,
            stage: None,
            client,
            listener: Some(view),
            limit,
            caused_by: None,
        })
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

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tracer_common::{RecordKind, UNIX_PATH_MAX};

    use super::super::testing::*;
    use super::*;
    use crate::{contract::Role, host::fake::FakeHost};

    #[test]
    fn connect_destinations_decode_from_the_sockaddr_bytes() {
        let v4 = [0x1f, 0x90, 127, 0, 0, 1];
        assert_eq!(
            destination(AF_INET, &v4),
            Some((IpAddr::V4(Ipv4Addr::LOCALHOST), 8080))
        );
        let mut v6 = [0u8; 22];
        v6[..2].copy_from_slice(&443u16.to_be_bytes());
        v6[21] = 1;
        assert_eq!(
            destination(AF_INET6, &v6),
            Some((IpAddr::V6(Ipv6Addr::LOCALHOST), 443))
        );
        assert_eq!(destination(AF_INET, &v4[..4]), None);
    }

    #[test]
    fn ephemeral_ports_names_the_range_and_keepalive() {
        let v = ephemeral_ports_verdict(Some((40000, 40001)), 7, None);
        assert_eq!((v.name, v.value), (LimitName::IpLocalPortRange, Some(2)));
        assert!(
            v.fix.contains("keepalive 32;") && v.fix.contains("ip_local_port_range=\"1024 65535\""),
            "{}",
            v.fix
        );
    }

    #[test]
    fn an_eaddrnotavail_connect_becomes_the_exact_json_drop_line() {
        let mut host = FakeHost::default();
        host.add_process(5150, "nginx", Role::NginxWorker, Some(5149));
        host.port_ranges.insert(4026531840, (40000, 40001));
        let mut families = families(host);
        let mut addr = [0u8; UNIX_PATH_MAX];
        addr[..6].copy_from_slice(&[0x1f, 0x90, 127, 0, 0, 2]);
        let record = ConnectFailure {
            kind: RecordKind::ConnectFailure as u32,
            pid: 5150,
            tid: 5150,
            ret: -99,
            ktime_ns: 1_000_000,
            family: AF_INET,
            addr_len: 14,
            netns: 4026531840,
            comm: comm("nginx"),
            addr,
            _pad: [0; 4],
        };
        let line = drop_line(&mut families, &super::super::bytes_of(&record), 1);
        assert_eq!(
            line,
            json!({
                "type": "drop",
                "time": "2026-09-21T14:13:20.001Z",
                "kind": "ephemeral_ports",
                "count": 1,
                "client": {"pid": 5150, "comm": "nginx", "role": "nginx-worker"},
                "listener": {"family": "tcp", "addr": "127.0.0.2", "port": 8080, "netns": 4026531840u64,
                             "pid": null, "comm": null, "role": null, "queue": null, "backlog": null},
                "limit": {"name": "ip_local_port_range", "value": 2,
                          "source": "net.ipv4.ip_local_port_range 40000 40001 of netns 4026531840: every port to that destination was in use (TIME-WAIT included)",
                          "fix": "reuse upstream connections (nginx: \"keepalive 32;\" in the upstream block, with proxy_http_version 1.1 and proxy_set_header Connection \"\"; or a UNIX socket to the backend); or widen the range: sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\""}
            })
        );
    }
}
