//! tcp_accept_queue and tcp_syn_queue: TCP connection attempts dropped at a
//! full listener. Counts are exact: the kernel's own per-CPU
//! LINUX_MIB_LISTENOVERFLOWS / LISTENDROPS increments, charged per call
//! (fentry kernels) or per packet to the listener and stage in a per-CPU
//! map (see tracer-ebpf's tcp_listen/). Details (addresses, queue,
//! backlog, the local process that sent the SYN) come from records sampled
//! at most once per listener per 10 ms.
mod frees;
mod listeners;

use std::{collections::HashMap, time::SystemTime};

use tracer_common::{stage, TcpOverflowKey, TcpOverflowRecord};

use super::{
    backlog::{self, backlog_facts, nginx_backlog, Transport},
    listener_view, Families,
};
use crate::{
    contract::{Client, Drop, DropKind, Family, Reconciliation, Stage},
    probes::hooks::{FamilyHooks, Mechanism, Need, Program},
};
pub use frees::FreeWatch;
pub use listeners::{Batch, TcpListeners};

/// Ingress, consume and the ACK-time free: what every mechanism shares but
/// the kfree_skb program.
/// Each free program is attached twice: the kernel skips a tracing program
/// already running on this CPU (a softirq freeing our packet inside a
/// task's consume_skb), never both copies. They are attached only while a
/// listener is near full (`FreeWatch`).
macro_rules! tcp_programs {
    ($kfree:literal) => {
        &[
            Program::cgroup_ingress("tcp_syn_ingress"),
            Program::btf_tracepoint("tcp_syn_done", "consume_skb").on_demand(),
            Program::btf_tracepoint("tcp_syn_done_nested", "consume_skb").on_demand(),
            Program::btf_tracepoint($kfree, "kfree_skb").on_demand(),
            Program::btf_tracepoint(concat!($kfree, "_nested"), "kfree_skb").on_demand(),
        ]
    };
}

/// Names the local process that sent a dropped SYN, for the packet
/// programs; without it, drops name the client's address only. Both
/// remember every connect by its socket (tracer-ebpf's
/// tcp_listen/clients.rs); the connect hooks run once per TCP connect(),
/// the state tracepoint on every state change of every TCP socket.
const CLIENTS_BY_SOCKET: &[Mechanism] = &[
    Mechanism {
        name: "cgroup/connect4 + cgroup/connect6 (local TCP clients)",
        programs: &[
            Program::cgroup_connect("tcp_client_connect4"),
            Program::cgroup_connect("tcp_client_connect6"),
        ],
        needs: &[],
        fast_path: None,
        extras: &[],
    },
    Mechanism {
        name: "tp_btf/inet_sock_set_state (local TCP clients)",
        programs: &[Program::btf_tracepoint(
            "tcp_client_connect",
            "inet_sock_set_state",
        )],
        needs: &[],
        fast_path: None,
        extras: &[],
    },
];

/// Counting never depends on a drop reason: it is the kernel's own MIB
/// increments, charged per call or per packet. The reason only tells a
/// SYN-cookie ACK from a plain one, where kfree_skb has it (5.17+); the
/// calls tell it by their arguments.
pub const HOOKS: FamilyHooks = FamilyHooks {
    family: "tcp_accept_queue/tcp_syn_queue",
    mechanisms: &[
        // Per connection: only SYNs and final ACKs to listeners, and TCP
        // connect()s, run a program (tracer-ebpf's tcp_listen/calls.rs).
        Mechanism {
            name: "fentry+fexit tcp_conn_request + tcp_check_req + cookie_v4_check + cookie_v6_check, fentry/tcp_connect (local TCP clients)",
            programs: &[
                Program::fentry("tcp_conn_request_entry", "tcp_conn_request"),
                Program::fexit("tcp_conn_request_exit", "tcp_conn_request"),
                Program::fentry("tcp_check_req_entry", "tcp_check_req"),
                Program::fexit("tcp_check_req_exit", "tcp_check_req"),
                Program::fentry("tcp_cookie_check4_entry", "cookie_v4_check"),
                Program::fexit("tcp_cookie_check4_exit", "cookie_v4_check"),
                Program::fentry("tcp_cookie_check6_entry", "cookie_v6_check"),
                Program::fexit("tcp_cookie_check6_exit", "cookie_v6_check"),
                Program::fentry("tcp_client_connect_entry", "tcp_connect"),
            ],
            needs: &[],
            fast_path: None,
            extras: &[],
        },
        // Per packet, where fentry is refused.
        Mechanism {
            name: "cgroup_skb/ingress + tp_btf/consume_skb + tp_btf/kfree_skb with drop reasons",
            programs: tcp_programs!("tcp_ack_drop"),
            // kfree_skb has its reason argument since 5.17, with the enum.
            needs: &[Need::EnumValue {
                enumeration: "skb_drop_reason",
                value: "SKB_DROP_REASON_NO_SOCKET",
            }],
            fast_path: None,
            extras: CLIENTS_BY_SOCKET,
        },
        Mechanism {
            name: "cgroup_skb/ingress + tp_btf/consume_skb + tp_btf/kfree_skb (no drop reasons: SYN-cookie ACKs counted as ack)",
            programs: tcp_programs!("tcp_ack_drop_noreason"),
            needs: &[],
            fast_path: None,
            extras: CLIENTS_BY_SOCKET,
        },
    ],
};

#[derive(Default)]
pub struct TcpQueue {
    pub listeners: TcpListeners,
}

/// The stage names of the kernel's stages, and the kind they count as.
fn kind_of(kernel_stage: u32) -> Option<(DropKind, Stage)> {
    Some(match kernel_stage {
        stage::SYN => (DropKind::TcpAcceptQueue, Stage::Syn),
        stage::ACK => (DropKind::TcpAcceptQueue, Stage::Ack),
        stage::ACK_SYNCOOKIE => (DropKind::TcpAcceptQueue, Stage::AckSyncookie),
        stage::SYN_QUEUE | stage::SYN_QUEUE_BACKLOG => (DropKind::TcpSynQueue, Stage::Syn),
        _ => return None,
    })
}

impl Families {
    pub(super) fn tcp_sample(&mut self, record: &TcpOverflowRecord) {
        self.tcp.listeners.on_sample(record, self.host.as_mut());
    }

    /// New TCP drops from the kernel's counters, one Drop per listener and
    /// stage with the number of drops it stands for.
    /// `last`: droptrace is stopping, show even counts whose record was lost.
    pub fn tcp_drops(
        &mut self,
        totals: Vec<(TcpOverflowKey, u64)>,
        last: bool,
    ) -> Vec<(Drop, u64)> {
        let batches = self.tcp.listeners.poll(totals, last, self.host.as_mut());
        batches
            .iter()
            .filter_map(|batch| Some((self.tcp_drop(batch)?, batch.count)))
            .collect()
    }

    fn tcp_drop(&mut self, batch: &Batch) -> Option<Drop> {
        let listener = &batch.listener;
        let owner = listener.owner.as_ref();
        // Remote clients have no pid: --pid selects TCP drops by owner.
        tracing::debug!(
            inode = listener.inode,
            stage = batch.stage,
            count = batch.count,
            owner = ?owner.map(|o| o.process.pid),
            sampled = batch.sample.is_some(),
            "TCP drops"
        );
        if !self.filter.watches_everything()
            && !owner.is_some_and(|o| self.filter.covers(o.process.pid))
        {
            return None;
        }
        let (kind, stage_name) = kind_of(batch.stage)?;
        let mut view = listener_view(listener.family(), listener.netns(), owner);
        if let Some((addr, port)) = listener.local() {
            view.addr = Some(addr.to_string());
            view.port = Some(port);
        }
        let mut client = Client::default();
        if let Some(sample) = &batch.sample {
            if let Some(pid) = listeners::local_client(sample) {
                client = self.client_by_pid(pid);
            }
            let (addr, port) = listeners::peer(sample);
            client.addr = Some(addr.to_string());
            client.port = Some(port);
        }
        let (time, limit) = match batch.sample {
            Some(sample) => {
                view.queue = Some(sample.queue);
                view.backlog = Some(sample.backlog);
                let mut facts = backlog_facts(
                    Transport::Tcp,
                    owner,
                    sample.backlog,
                    listener.requested,
                    Some(sample.somaxconn),
                );
                facts.nginx_backlog = nginx_backlog(owner, view.port, None);
                let limit = match batch.stage {
                    stage::SYN_QUEUE => backlog::syn_queue_verdict(sample.max_syn_backlog),
                    stage::SYN_QUEUE_BACKLOG => backlog::syn_queue_backlog_verdict(&facts),
                    _ => backlog::backlog_verdict(&facts),
                };
                (self.clock.wall(sample.ktime_ns), limit)
            }
            // Counted, but its details were never sampled (ring buffer full).
            None => (SystemTime::now(), backlog::unknown_listener_verdict()),
        };
        Some(Drop {
            time,
            kind,
            stage: Some(stage_name),
            client,
            caused_by: owner.and_then(|o| self.cause_for(o.process.pid, time)),
            listener: Some(view),
            limit,
        })
    }

    /// The kernel's TcpExtListenOverflows of every namespace now: the
    /// baseline `reconcile` compares with.
    pub fn listen_overflows(&mut self) -> HashMap<u32, u64> {
        self.host.listen_overflows()
    }

    /// droptrace's accept-queue overflows next to the kernel's counter,
    /// per namespace where either saw any.
    pub fn reconcile(&mut self, baseline: &HashMap<u32, u64>) -> Vec<Reconciliation> {
        let now = self.host.listen_overflows();
        let ours = self.tcp.listeners.accept_queue_overflows_by_netns();
        let mut namespaces: Vec<u32> = now.keys().chain(ours.keys()).copied().collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        namespaces
            .into_iter()
            .map(|netns| Reconciliation {
                netns,
                droptrace: ours.get(&netns).copied().unwrap_or(0),
                // A namespace created after droptrace started counted from 0;
                // one whose inode was reused may read lower than its baseline.
                kernel: now
                    .get(&netns)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(baseline.get(&netns).copied().unwrap_or(0)),
            })
            .filter(|r| r.droptrace > 0 || r.kernel > 0)
            .collect()
    }
}

impl listeners::TcpListener {
    pub fn family(&self) -> Family {
        match self.sample {
            Some(s) if s.family == tracer_common::AF_INET6 => Family::Tcp6,
            _ => Family::Tcp,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{bytes_of, testing::*};
    use super::*;
    use crate::{contract::Role, host::fake::FakeHost};

    fn sample(stage: u32) -> TcpOverflowRecord {
        let mut sample = listeners::tests::sample(9001, 4026531840);
        sample.stage = stage;
        sample.ktime_ns = 500_000_000;
        sample.client_pid = 4242;
        sample
    }

    fn key(stage: u32) -> TcpOverflowKey {
        TcpOverflowKey {
            inode: 9001,
            stage,
            _pad: 0,
        }
    }

    #[test]
    fn counted_syn_drops_at_an_apps_listener_become_one_exact_json_line() {
        let mut host = FakeHost::default();
        host.add_process(700, "python3", Role::Other, Some(1));
        host.add_process(4242, "curl", Role::Other, Some(1));
        host.socket_owners.insert(9001, 700);
        host.listen_overflows.insert(4026531840, 17);
        let mut families = families(host);
        assert!(families.handle(&bytes_of(&sample(stage::SYN))).is_none());
        let drops = families.tcp_drops(vec![(key(stage::SYN), 17)], false);
        assert_eq!(drops.len(), 1);
        let (drop, count) = drops.into_iter().next().unwrap();
        assert_eq!(count, 17);
        let line = serde_json::to_value(crate::contract::Record::Drop(crate::contract::Line {
            drop,
            count,
            first: true,
        }))
        .unwrap();
        assert_eq!(
            line,
            json!({
                "type": "drop",
                "time": "2026-09-21T14:13:20.500Z",
                "kind": "tcp_accept_queue",
                "stage": "syn",
                "count": 17,
                "client": {"pid": 4242, "comm": "curl", "role": "other", "addr": "127.0.0.1", "port": 40000},
                "listener": {"family": "tcp", "addr": "127.0.0.1", "port": 19090, "netns": 4026531840u64,
                             "pid": 700, "comm": "python3", "role": "other", "queue": 101, "backlog": 100},
                "limit": {"name": "app_backlog", "value": 100,
                          "source": "python3[700]'s listening socket (its listen() call was before droptrace started)",
                          "fix": "raise the backlog python3[700] passes to listen() to 1024 (gunicorn --backlog, php-fpm listen.backlog, Python socket.listen(n)) (net.core.somaxconn=4096 allows it); accept faster (more workers) if the queue stays full"}
            })
        );
        // The kernel's counter grew by 17 since a baseline of 0.
        let kernel = families.reconcile(&HashMap::new());
        assert_eq!(
            kernel,
            [Reconciliation {
                netns: 4026531840,
                droptrace: 17,
                kernel: 17
            }]
        );
    }

    #[test]
    fn a_counter_that_reads_lower_than_its_baseline_does_not_wrap() {
        let mut host = FakeHost::default();
        host.listen_overflows.insert(7, 5);
        let mut families = families(host);
        // A reused namespace inode: the baseline was taken from another one.
        let kernel = families.reconcile(&HashMap::from([(7, 50)]));
        assert!(kernel.is_empty(), "{kernel:?}");
    }
}
