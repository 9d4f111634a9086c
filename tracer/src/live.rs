//! The live view: read records from the kernel, attribute and classify
//! them, print them, summarise at the end.
use std::{
    collections::HashMap,
    io::Write,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{anyhow, Result};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};
use tracer_common::{ConnectFailure, ListenRecord, RecordKind, AF_UNIX};

use crate::{
    attribution::{
        address::UnixAddress,
        listeners::{Listener, Registry, Task},
        process::{self, PidFilter, Role},
    },
    cli::Args,
    drop::{Client, Drop, DropKind, ListenerView},
    limits::{self, BacklogFacts},
    probes,
    sinks::{aggregate::Aggregator, Format, Sink},
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
    filter: PidFilter,
    clock: Clock,
    client_roles: HashMap<u32, Role>,
    queue_samples: HashMap<u64, (Instant, Option<u32>)>,
}

impl Attributor {
    fn client(&mut self, pid: u32, comm: String) -> Client {
        let role = *self
            .client_roles
            .entry(pid)
            // An exited client cannot be placed in the process tree.
            .or_insert_with(|| process::inspect(pid).map_or(Role::Other, |p| p.role));
        Client { pid, comm, role }
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
        let listener = self
            .registry
            .find(
                Task {
                    pid: record.pid,
                    tid: record.tid,
                    netns: record.netns,
                },
                &address,
            )
            .cloned();
        let covered = self.filter.covers(record.pid)
            || listener
                .as_ref()
                .and_then(|l| l.owner.as_ref())
                .is_some_and(|owner| self.filter.covers(owner.pid));
        if !covered {
            return None;
        }
        let client = self.client(record.pid, comm_of(&record.comm));
        let (listener_view, limit) = match listener {
            Some(listener) => {
                let queue = self.queue(&listener);
                let owner = listener.owner.as_ref();
                let facts = BacklogFacts {
                    owner_role: owner.map_or(Role::Other, |o| o.role),
                    owner: owner.map_or_else(
                        || "the listener's owner".into(),
                        |o| format!("{}[{}]", o.comm, o.pid),
                    ),
                    effective: listener.backlog,
                    requested: listener.requested,
                    uwsgi_listen: listener.uwsgi_listen.clone(),
                    somaxconn: listener.somaxconn,
                };
                let view = ListenerView {
                    family: "unix",
                    path: address.to_string(),
                    netns: Some(listener.netns),
                    pid: owner.map(|o| o.pid),
                    comm: owner.map(|o| o.comm.clone()),
                    role: owner.map(|o| o.role),
                    queue,
                    backlog: Some(listener.backlog),
                };
                (view, limits::backlog_verdict(&facts))
            }
            None => {
                let view = ListenerView {
                    family: "unix",
                    path: address.to_string(),
                    netns: None,
                    pid: None,
                    comm: None,
                    role: None,
                    queue: None,
                    backlog: None,
                };
                (view, limits::unknown_listener_verdict())
            }
        };
        Some(Drop {
            time: self.clock.wall(record.ktime_ns),
            kind: DropKind::UnixBacklog,
            client,
            listener: listener_view,
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
                if record.family == AF_UNIX {
                    self.registry.on_listen(&record);
                }
                None
            }
        }
    }
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

pub async fn run(args: Args) -> Result<()> {
    let filter = PidFilter::new(&args.pids)?;
    let probes::Probes {
        ebpf: _attached,
        records,
        lost,
    } = probes::load()?;
    let started = Instant::now();
    let mut registry = Registry::default();
    registry.rescan();
    let mut attributor = Attributor {
        registry,
        filter,
        clock: Clock::new(),
        client_roles: HashMap::new(),
        queue_samples: HashMap::new(),
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
    tracing::info!("watching refused UNIX connects of {scope} (Ctrl-C for the summary)");

    loop {
        tokio::select! {
            guard = records.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if let Some(drop) = attributor.handle(&item) {
                        if let Some(line) = aggregator.add(drop, Instant::now()) {
                            sink.line(&line)?;
                        }
                    }
                }
                guard.clear_ready();
            }
            _ = tick.tick() => {
                for line in aggregator.due(Instant::now()) {
                    sink.line(&line)?;
                }
            }
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = &mut deadline => break,
        }
    }

    // What the kernel submitted before we stopped is still counted.
    let ring = records.get_mut();
    while let Some(item) = ring.next() {
        if let Some(drop) = attributor.handle(&item) {
            if let Some(line) = aggregator.add(drop, Instant::now()) {
                sink.line(&line)?;
            }
        }
    }
    for line in aggregator.drain() {
        sink.line(&line)?;
    }
    sink.summary(&aggregator.totals(), lost.read()?, started.elapsed())?;
    std::io::stdout().flush()?;
    Ok(())
}
