//! TCP listeners that dropped connection attempts. Counts are exact: they
//! come from the kernel's per-CPU counters (by listener inode and stage).
//! Details come from the records the kernel samples (at most one per
//! listener per 10 ms): address, queue, backlog, namespace, last peer.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use tracer_common::{stage, ListenRecord, TcpOverflowKey, TcpOverflowRecord, AF_INET6};

use crate::families::counted::Shown;
use crate::host::{
    listeners::LISTEN_MAX_REQUEST,
    owners::{Owned, Owner, OwnerScans},
    Host,
};

/// What we know of one TCP listener.
#[derive(Clone, Debug)]
pub struct TcpListener {
    pub inode: u64,
    /// The latest sampled record, of any stage; None until one arrived
    /// (the count can be known before).
    pub sample: Option<TcpOverflowRecord>,
    /// The latest sampled record of each stage: a batch of SYN-time drops
    /// is explained by a SYN-time record, not by an ACK that came later.
    pub by_stage: HashMap<u32, TcpOverflowRecord>,
    /// The listen() argument, when droptrace saw the call.
    pub requested: Option<u32>,
    pub owner: Option<Owner>,
}

impl TcpListener {
    pub fn netns(&self) -> Option<u32> {
        self.sample.map(|s| s.netns)
    }

    pub fn local(&self) -> Option<(IpAddr, u16)> {
        self.sample
            .map(|s| (ip(s.family, &s.local_addr), s.local_port))
    }
}

impl Owned for TcpListener {
    fn inode(&self) -> u64 {
        self.inode
    }

    fn owner_slot(&mut self) -> &mut Option<Owner> {
        &mut self.owner
    }
}

pub fn ip(family: u16, raw: &[u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(*raw))
    } else {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    }
}

/// The peer of a sampled drop.
pub fn peer(sample: &TcpOverflowRecord) -> (IpAddr, u16) {
    (ip(sample.family, &sample.remote_addr), sample.remote_port)
}

/// The local process that sent a sampled dropped packet, when known.
pub fn local_client(sample: &TcpOverflowRecord) -> Option<u32> {
    (sample.client_pid != 0).then_some(sample.client_pid)
}

/// New drops of one listener at one stage since the last poll.
#[derive(Clone, Debug)]
pub struct Batch {
    pub listener: TcpListener,
    pub stage: u32,
    pub count: u64,
    /// The record that explains them: the latest of their stage.
    pub sample: Option<TcpOverflowRecord>,
}

/// Stages that the kernel counts as TcpExtListenOverflows.
pub fn is_accept_queue_stage(stage: u32) -> bool {
    matches!(stage, stage::SYN | stage::ACK | stage::ACK_SYNCOOKIE)
}

#[derive(Default)]
pub struct TcpListeners {
    listeners: HashMap<u64, TcpListener>,
    /// listen() calls seen: socket inode -> (requested backlog, pid).
    listens: HashMap<u64, (u32, u32)>,
    /// Counter totals already turned into batches, and when each grew.
    reported: HashMap<TcpOverflowKey, Shown>,
    /// Accept-queue overflows of retired keys, by network namespace.
    retired_overflows: HashMap<u32, u64>,
    owner_scans: OwnerScans,
}

impl TcpListeners {
    pub fn on_listen(&mut self, record: &ListenRecord) {
        if self.listens.len() > 65_536 {
            self.listens.clear();
        }
        // listen() takes an int; a negative one means "as large as allowed".
        let requested = record.requested_backlog.min(LISTEN_MAX_REQUEST);
        self.listens
            .insert(record.sock_inode, (requested, record.pid));
    }

    pub fn on_sample(&mut self, record: &TcpOverflowRecord, host: &mut dyn Host) {
        let listener = self.entry(record.inode, host);
        listener.sample = Some(*record);
        listener.by_stage.insert(record.stage, *record);
    }

    fn entry(&mut self, inode: u64, host: &mut dyn Host) -> &mut TcpListener {
        let listens = &self.listens;
        self.listeners.entry(inode).or_insert_with(|| {
            let listen = listens.get(&inode);
            let owner = listen
                .and_then(|&(_, pid)| host.process(pid))
                .map(|process| host.owner(process));
            TcpListener {
                inode,
                sample: None,
                by_stage: HashMap::new(),
                requested: listen.map(|&(requested, _)| requested),
                owner,
            }
        })
    }

    /// Turn the kernel's counter totals into batches of new drops.
    ///
    /// The kernel bumps a counter just before it sends the record that
    /// explains it: counts of a listener not sampled yet wait for its record,
    /// except on the `last` poll (its record was lost: shown unexplained).
    pub fn poll(
        &mut self,
        totals: impl IntoIterator<Item = (TcpOverflowKey, u64)>,
        last: bool,
        host: &mut dyn Host,
    ) -> Vec<Batch> {
        let mut batches = Vec::new();
        for (key, total) in totals {
            let sampled = self
                .listeners
                .get(&key.inode)
                .is_some_and(|l| l.sample.is_some());
            if !sampled && !last {
                continue;
            }
            let reported = self.reported.get(&key).map_or(0, |shown| shown.total);
            if total <= reported {
                continue;
            }
            let count = total - reported;
            self.reported.insert(key, Shown::now(total));
            let listener = self.entry(key.inode, host).clone();
            let sample = listener
                .by_stage
                .get(&key.stage)
                .copied()
                .or(listener.sample);
            batches.push(Batch {
                listener,
                stage: key.stage,
                count,
                sample,
            });
        }
        if batches.iter().any(|b| b.listener.owner.is_none()) {
            self.owner_scans.fill_from(&mut self.listeners, |wanted| {
                let owners = host.socket_owners(wanted);
                owners
                    .into_iter()
                    .map(|(inode, p)| (inode, host.owner(p)))
                    .collect()
            });
            for batch in &mut batches {
                if let Some(known) = self.listeners.get(&batch.listener.inode) {
                    batch.listener.owner = known.owner.clone();
                }
            }
        }
        batches
    }

    /// Every accept-queue overflow counted so far, by network namespace,
    /// whatever --pid says: what TcpExtListenOverflows counts too.
    pub fn accept_queue_overflows_by_netns(&self) -> HashMap<u32, u64> {
        let mut by_netns = self.retired_overflows.clone();
        for (key, shown) in &self.reported {
            if is_accept_queue_stage(key.stage) {
                *by_netns.entry(self.netns_of(key.inode)).or_insert(0) += shown.total;
            }
        }
        by_netns
    }

    fn netns_of(&self, inode: u64) -> u32 {
        self.listeners
            .get(&inode)
            .and_then(TcpListener::netns)
            .unwrap_or(0)
    }

    /// Keys of listeners that closed (no namespace lists the socket as
    /// listening) and did not grow for `after`: forgotten here, with their listener, to be
    /// deleted from the kernel's table by the caller. A closed listener
    /// drops nothing more, so deleting its keys loses no count; their
    /// overflows still count in the namespace's total.
    pub fn retire(&mut self, after: Duration, host: &mut dyn Host) -> Vec<TcpOverflowKey> {
        let idle: Vec<TcpOverflowKey> = self
            .reported
            .iter()
            .filter(|(_, shown)| shown.idle_for(after))
            .map(|(key, _)| *key)
            .collect();
        if idle.is_empty() {
            return idle;
        }
        // A table that could not be read would make open listeners look
        // closed: retire nothing then.
        let Some(open) = host.open_tcp_listeners() else {
            return Vec::new();
        };
        let retired: Vec<TcpOverflowKey> = idle
            .into_iter()
            .filter(|key| !open.contains(&key.inode))
            .collect();
        for key in &retired {
            let netns = self.netns_of(key.inode);
            if let Some(shown) = self.reported.remove(key) {
                if is_accept_queue_stage(key.stage) {
                    *self.retired_overflows.entry(netns).or_insert(0) += shown.total;
                }
            }
        }
        crate::host::shrink(&mut self.reported);
        let held: HashSet<u64> = self.reported.keys().map(|key| key.inode).collect();
        for key in &retired {
            if !held.contains(&key.inode) {
                self.listeners.remove(&key.inode);
                self.listens.remove(&key.inode);
            }
        }
        crate::host::shrink(&mut self.listeners);
        retired
    }

    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        (self.listeners.len(), self.reported.len())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::host::fake::FakeHost;

    fn key(inode: u64, stage: u32) -> TcpOverflowKey {
        TcpOverflowKey {
            inode,
            stage,
            _pad: 0,
        }
    }

    /// A SYN-time sample of listener `inode` at 127.0.0.1:19090, from
    /// 127.0.0.1:40000.
    pub fn sample(inode: u64, netns: u32) -> TcpOverflowRecord {
        TcpOverflowRecord {
            kind: 3,
            stage: stage::SYN,
            ktime_ns: 0,
            inode,
            netns,
            family: tracer_common::AF_INET,
            local_port: 19090,
            remote_port: 40000,
            _pad0: 0,
            backlog: 100,
            queue: 101,
            somaxconn: 4096,
            max_syn_backlog: 512,
            local_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            remote_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            client_pid: 0,
        }
    }

    #[test]
    fn batches_carry_only_what_is_new_and_add_up_to_the_counters() {
        let mut tcp = TcpListeners::default();
        let mut host = FakeHost::default();
        tcp.on_sample(&sample(7, 42), &mut host);
        let first = tcp.poll(
            [(key(7, stage::SYN), 10), (key(7, stage::ACK), 3)],
            false,
            &mut host,
        );
        assert_eq!(first.iter().map(|b| b.count).sum::<u64>(), 13);
        let second = tcp.poll(
            [(key(7, stage::SYN), 15), (key(7, stage::ACK), 3)],
            false,
            &mut host,
        );
        assert_eq!(second.len(), 1);
        assert_eq!((second[0].stage, second[0].count), (stage::SYN, 5));
        assert_eq!(
            second[0].listener.local(),
            Some(("127.0.0.1".parse().unwrap(), 19090))
        );
        assert!(tcp
            .poll([(key(7, stage::SYN), 15)], false, &mut host)
            .is_empty());
    }

    #[test]
    fn a_closed_idle_listener_is_retired_and_still_counts_in_its_namespace() {
        let mut tcp = TcpListeners::default();
        let mut host = FakeHost::default();
        host.add_process(9, "app", crate::contract::Role::Other, None);
        host.socket_owners.insert(2, 9);
        tcp.on_sample(&sample(1, 42), &mut host);
        tcp.on_sample(&sample(2, 42), &mut host);
        tcp.poll(
            [(key(1, stage::SYN), 10), (key(2, stage::ACK), 3)],
            false,
            &mut host,
        );
        assert!(tcp.retire(Duration::from_secs(60), &mut host).is_empty());
        // Listener 1 is closed (nobody holds it), 2 is still open.
        assert_eq!(
            tcp.retire(Duration::ZERO, &mut host),
            vec![key(1, stage::SYN)]
        );
        assert_eq!(tcp.len(), (1, 1));
        assert_eq!(tcp.accept_queue_overflows_by_netns()[&42], 13);
        // Its inode counts again from zero should it come back.
        tcp.on_sample(&sample(1, 42), &mut host);
        let batches = tcp.poll([(key(1, stage::SYN), 4)], false, &mut host);
        assert_eq!(batches[0].count, 4);
        assert_eq!(tcp.accept_queue_overflows_by_netns()[&42], 17);
    }

    #[test]
    fn reconciliation_counts_accept_queue_stages_per_namespace() {
        let mut tcp = TcpListeners::default();
        let mut host = FakeHost::default();
        tcp.on_sample(&sample(1, 42), &mut host);
        tcp.on_sample(&sample(2, 43), &mut host);
        tcp.poll(
            [
                (key(1, stage::SYN), 10),
                (key(1, stage::ACK_SYNCOOKIE), 4),
                (key(1, stage::SYN_QUEUE), 100),
                (key(2, stage::ACK), 2),
            ],
            false,
            &mut host,
        );
        let by_netns = tcp.accept_queue_overflows_by_netns();
        assert_eq!(by_netns[&42], 14, "SYN-queue drops are not ListenOverflows");
        assert_eq!(by_netns[&43], 2);
    }

    #[test]
    fn a_batch_is_explained_by_a_sample_of_its_own_stage() {
        let mut tcp = TcpListeners::default();
        let mut host = FakeHost::default();
        let mut syn = sample(7, 42);
        syn.client_pid = 4242;
        let mut ack = sample(7, 42);
        ack.stage = stage::ACK;
        ack.remote_port = 50000;
        tcp.on_sample(&syn, &mut host);
        tcp.on_sample(&ack, &mut host);
        let batches = tcp.poll(
            [(key(7, stage::SYN), 3), (key(7, stage::ACK), 1)],
            false,
            &mut host,
        );
        let syn_batch = batches.iter().find(|b| b.stage == stage::SYN).unwrap();
        let sample = syn_batch.sample.as_ref().unwrap();
        assert_eq!(local_client(sample), Some(4242));
        let ack_batch = batches.iter().find(|b| b.stage == stage::ACK).unwrap();
        assert_eq!(peer(ack_batch.sample.as_ref().unwrap()).1, 50000);
        assert_eq!(local_client(ack_batch.sample.as_ref().unwrap()), None);
    }

    #[test]
    fn counts_wait_for_their_record_but_are_never_dropped() {
        let mut tcp = TcpListeners::default();
        let mut host = FakeHost::default();
        // Counted before its record was read: it waits...
        assert!(tcp
            .poll([(key(9, stage::SYN), 8)], false, &mut host)
            .is_empty());
        tcp.on_sample(&sample(9, 42), &mut host);
        let batches = tcp.poll([(key(9, stage::SYN), 8)], false, &mut host);
        assert_eq!((batches.len(), batches[0].count), (1, 8));
        assert!(batches[0].sample.is_some());
        // ...and a record that never came is still shown at the end.
        let batches = tcp.poll([(key(10, stage::ACK), 1)], true, &mut host);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].listener.local(), None);
    }
}
