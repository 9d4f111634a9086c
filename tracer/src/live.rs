//! The live view: read records from the kernel, attribute and classify
//! them, print them, summarise at the end.
use std::{
    collections::HashMap,
    io::Write,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{anyhow, Result};
use aya::maps::{MapData, PerCpuHashMap};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};
use tracer_common::{
    stage, ConnectFailure, ListenRecord, RecordKind, TcpOverflowKey, TcpOverflowRecord, AF_INET,
    AF_INET6, AF_UNIX,
};

use crate::{
    attribution::{
        address::UnixAddress,
        listeners::{Listener, Registry, Task},
        owners::Owner,
        process::{self, PidFilter, Role},
        tcp::{self, Batch as TcpBatch, TcpListeners},
    },
    cli::Args,
    drop::{Client, Drop, DropKind, ListenerView},
    limits::{self, BacklogFacts, Transport},
    probes,
    sinks::{aggregate::Aggregator, Format, Reconciliation, Sink},
};

/// At most this many lines per second per (kind, listener, limit).
const LINE_INTERVAL: Duration = Duration::from_millis(250);
/// How long a sampled queue length is reused under a storm.
const QUEUE_SAMPLE_TTL: Duration = Duration::from_millis(100);

/// Converts bpf_ktime_get_ns (CLOCK_MONOTONIC) to wall-clock time.
struct Clock {
    wall_at_zero: SystemTime,
}

impl Clock {
    fn new() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid pointer to a timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let mono = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        Self {
            wall_at_zero: SystemTime::now() - mono,
        }
    }

    fn wall(&self, ktime_ns: u64) -> SystemTime {
        self.wall_at_zero + Duration::from_nanos(ktime_ns)
    }
}

/// Everything that turns kernel records into drops.
struct Attributor {
    registry: Registry,
    tcp: TcpListeners,
    filter: PidFilter,
    clock: Clock,
    client_roles: HashMap<u32, Role>,
    queue_samples: HashMap<u64, (Instant, Option<u32>)>,
    /// A TCP sample arrived: read the counters now rather than at the tick.
    tcp_pending: bool,
}

/// The verdict inputs common to every listener.
fn backlog_facts(
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
        uwsgi_listen: owner.and_then(|o| o.uwsgi_listen.clone()),
        somaxconn,
    }
}

/// A listener as the sinks show it, before the family-specific fields.
fn listener_view(family: &'static str, netns: Option<u32>, owner: Option<&Owner>) -> ListenerView {
    let owner = owner.map(|o| &o.process);
    ListenerView {
        family,
        path: None,
        addr: None,
        port: None,
        netns,
        pid: owner.map(|o| o.pid),
        comm: owner.map(|o| o.comm.clone()),
        role: owner.map(|o| o.role),
        queue: None,
        backlog: None,
    }
}

impl Attributor {
    fn client(&mut self, pid: u32, comm: String) -> Client {
        let role = *self
            .client_roles
            .entry(pid)
            // An exited client cannot be placed in the process tree.
            .or_insert_with(|| process::inspect(pid).map_or(Role::Other, |p| p.role));
        Client {
            pid: Some(pid),
            comm: Some(comm),
            role: Some(role),
            ..Client::default()
        }
    }

    fn queue(&mut self, listener: &Listener) -> Option<u32> {
        let now = Instant::now();
        if let Some(&(at, queue)) = self.queue_samples.get(&listener.inode) {
            if now.duration_since(at) < QUEUE_SAMPLE_TTL {
                return queue;
            }
        }
        let queue = self.registry.queue_now(listener);
        self.queue_samples.insert(listener.inode, (now, queue));
        queue
    }

    fn unix_connect_refused(&mut self, record: &ConnectFailure) -> Option<Drop> {
        let raw = &record.path[..(record.path_len as usize).min(record.path.len())];
        let address = UnixAddress::from_sun_path(raw)?;
        let task = Task {
            pid: record.pid,
            tid: record.tid,
            netns: record.netns,
        };
        let listener = self.registry.find(task, &address).cloned();
        let owner = listener.as_ref().and_then(|l| l.owner.clone());
        if !self.filter.covers(record.pid)
            && !owner
                .as_ref()
                .is_some_and(|o| self.filter.covers(o.process.pid))
        {
            return None;
        }
        let client = self.client(record.pid, comm_of(&record.comm));
        let mut view = listener_view("unix", None, owner.as_ref());
        view.path = Some(address.to_string());
        let limit = match &listener {
            Some(listener) => {
                view.netns = Some(listener.netns);
                view.queue = self.queue(listener);
                view.backlog = Some(listener.backlog);
                limits::backlog_verdict(&backlog_facts(
                    Transport::Unix,
                    owner.as_ref(),
                    listener.backlog,
                    listener.requested,
                    listener.somaxconn,
                ))
            }
            None => limits::unknown_listener_verdict(),
        };
        Some(Drop {
            time: self.clock.wall(record.ktime_ns),
            kind: DropKind::UnixBacklog,
            stage: None,
            client,
            listener: view,
            limit,
        })
    }

    /// New TCP drops from the kernel's counters, one Drop per listener and
    /// stage with the number of drops it stands for.
    /// `last`: droptrace is stopping, show even counts whose record was lost.
    fn tcp_drops(&mut self, totals: Vec<(TcpOverflowKey, u64)>, last: bool) -> Vec<(Drop, u64)> {
        self.tcp_pending = false;
        let batches = self.tcp.poll(totals, last);
        batches
            .iter()
            .filter_map(|batch| Some((self.tcp_drop(batch)?, batch.count)))
            .collect()
    }

    fn tcp_drop(&mut self, batch: &TcpBatch) -> Option<Drop> {
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
        let (kind, stage_name) = match batch.stage {
            stage::SYN => (DropKind::TcpAcceptQueue, "syn"),
            stage::ACK => (DropKind::TcpAcceptQueue, "ack"),
            stage::ACK_SYNCOOKIE => (DropKind::TcpAcceptQueue, "ack_syncookie"),
            stage::SYN_QUEUE | stage::SYN_QUEUE_BACKLOG => (DropKind::TcpSynQueue, "syn"),
            _ => return None,
        };
        let mut view = listener_view(listener.family(), listener.netns(), owner);
        if let Some((addr, port)) = listener.local() {
            view.addr = Some(addr.to_string());
            view.port = Some(port);
        }
        let mut client = Client::default();
        if let Some(sample) = &batch.sample {
            if let Some((pid, comm)) = tcp::local_client(sample) {
                client = self.client(pid, comm);
            }
            let (addr, port) = tcp::peer(sample);
            client.addr = Some(addr.to_string());
            client.port = Some(port);
        }
        let (time, limit) = match batch.sample {
            Some(sample) => {
                view.queue = Some(sample.queue);
                view.backlog = Some(sample.backlog);
                let facts = backlog_facts(
                    Transport::Tcp,
                    owner,
                    sample.backlog,
                    listener.requested,
                    Some(sample.somaxconn),
                );
                let limit = match batch.stage {
                    stage::SYN_QUEUE => limits::syn_queue_verdict(sample.max_syn_backlog),
                    stage::SYN_QUEUE_BACKLOG => limits::syn_queue_backlog_verdict(&facts),
                    _ => limits::backlog_verdict(&facts),
                };
                (self.clock.wall(sample.ktime_ns), limit)
            }
            // Counted, but its details were never sampled (ring buffer full).
            None => (SystemTime::now(), limits::unknown_listener_verdict()),
        };
        Some(Drop {
            time,
            kind,
            stage: Some(stage_name),
            client,
            listener: view,
            limit,
        })
    }

    /// Decode one ring-buffer record; returns a drop when it is one.
    fn handle(&mut self, bytes: &[u8]) -> Option<Drop> {
        let tag = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
        match RecordKind::from_u32(tag)? {
            RecordKind::ConnectFailure => {
                let record: ConnectFailure = read_record(bytes)?;
                (record.family == AF_UNIX).then(|| self.unix_connect_refused(&record))?
            }
            RecordKind::Listen => {
                let record: ListenRecord = read_record(bytes)?;
                match record.family {
                    AF_UNIX => self.registry.on_listen(&record),
                    AF_INET | AF_INET6 => self.tcp.on_listen(&record),
                    _ => {}
                }
                None
            }
            RecordKind::TcpOverflow => {
                let record: TcpOverflowRecord = read_record(bytes)?;
                self.tcp.on_sample(&record);
                self.tcp_pending = true;
                None
            }
        }
    }

    /// droptrace's accept-queue overflows next to the kernel's counter,
    /// per namespace where either saw any.
    fn reconcile(&mut self, baseline: &HashMap<u32, u64>) -> Vec<Reconciliation> {
        let now = self.registry.listen_overflows();
        let ours = self.tcp.accept_queue_overflows_by_netns();
        let mut namespaces: Vec<u32> = now.keys().chain(ours.keys()).copied().collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        namespaces
            .into_iter()
            .map(|netns| Reconciliation {
                netns,
                droptrace: ours.get(&netns).copied().unwrap_or(0),
                // A namespace created after droptrace started counted from 0.
                kernel: now.get(&netns).copied().unwrap_or(0)
                    - baseline.get(&netns).copied().unwrap_or(0),
            })
            .filter(|r| r.droptrace > 0 || r.kernel > 0)
            .collect()
    }
}

/// Current totals of the kernel's per-CPU TCP drop counters.
fn counter_totals(
    counters: &PerCpuHashMap<MapData, TcpOverflowKey, u64>,
) -> Vec<(TcpOverflowKey, u64)> {
    counters
        .iter()
        .filter_map(|entry| entry.ok())
        .map(|(key, per_cpu)| (key, per_cpu.iter().sum()))
        .collect()
}

fn read_record<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        tracing::warn!(
            "short record ({} bytes): eBPF object and droptrace disagree",
            bytes.len()
        );
        return None;
    }
    // SAFETY: T is a #[repr(C)] POD record (tracer-common), length checked.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn comm_of(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Count drops (each standing for `count`) and print the lines now due.
fn show<W: Write>(
    aggregator: &mut Aggregator,
    sink: &mut Sink<W>,
    drops: impl IntoIterator<Item = (Drop, u64)>,
) -> std::io::Result<()> {
    for (drop, count) in drops {
        if let Some(line) = aggregator.add(drop, count, Instant::now()) {
            sink.line(&line)?;
        }
    }
    Ok(())
}

pub async fn run(args: Args) -> Result<()> {
    let filter = PidFilter::new(&args.pids)?;
    let probes::Probes {
        ebpf: _attached,
        records,
        lost,
        tcp_overflows,
    } = probes::load()?;
    let started = Instant::now();
    let mut registry = Registry::default();
    registry.rescan();
    let baseline = registry.listen_overflows();
    let mut attributor = Attributor {
        registry,
        tcp: TcpListeners::default(),
        filter,
        clock: Clock::new(),
        client_roles: HashMap::new(),
        queue_samples: HashMap::new(),
        tcp_pending: false,
    };
    let format = if args.json {
        Format::Json
    } else {
        Format::Human
    };
    let mut sink = Sink::new(format, std::io::stdout().lock());
    let mut aggregator = Aggregator::new(LINE_INTERVAL);

    // SAFETY: the ring buffer owns its fd and keeps it open until dropped.
    let mut records = unsafe { AsyncFd::register(records) }
        .map_err(|err| anyhow!("cannot poll the ring buffer: {err}"))?;
    let mut tick = tokio::time::interval(LINE_INTERVAL);
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let deadline = tokio::time::sleep(args.duration.map_or(Duration::MAX / 4, Duration::from_secs));
    tokio::pin!(deadline);
    let scope = if attributor.filter.watches_everything() {
        "every process".to_string()
    } else {
        format!("pids {:?} and their descendants", args.pids)
    };
    tracing::info!(
        "watching refused UNIX connects and TCP listen-queue drops of {scope} (Ctrl-C for the summary)"
    );

    loop {
        tokio::select! {
            guard = records.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    let drop = attributor.handle(&item);
                    show(&mut aggregator, &mut sink, drop.map(|d| (d, 1)))?;
                }
                guard.clear_ready();
                if attributor.tcp_pending {
                    show(&mut aggregator, &mut sink, attributor.tcp_drops(counter_totals(&tcp_overflows), false))?;
                }
            }
            _ = tick.tick() => {
                show(&mut aggregator, &mut sink, attributor.tcp_drops(counter_totals(&tcp_overflows), false))?;
                for line in aggregator.due(Instant::now()) {
                    sink.line(&line)?;
                }
            }
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = &mut deadline => break,
        }
    }

    // What the kernel submitted or counted before we stopped still counts.
    let ring = records.get_mut();
    while let Some(item) = ring.next() {
        let drop = attributor.handle(&item);
        show(&mut aggregator, &mut sink, drop.map(|d| (d, 1)))?;
    }
    show(
        &mut aggregator,
        &mut sink,
        attributor.tcp_drops(counter_totals(&tcp_overflows), true),
    )?;
    for line in aggregator.drain() {
        sink.line(&line)?;
    }
    let kernel = attributor.reconcile(&baseline);
    sink.summary(
        &aggregator.totals(),
        lost.read()?,
        &kernel,
        started.elapsed(),
    )?;
    std::io::stdout().flush()?;
    Ok(())
}
