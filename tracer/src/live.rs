//! The live view: read records from the kernel, attribute and classify
//! them, print them, summarise at the end.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{anyhow, Result};
use aya::maps::{MapData, PerCpuHashMap};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};
use tracer_common::{
    fd_syscall, stage, ConnectFailure, FdLimitRecord, ListenRecord, NoConnectionRecord, RecordKind,
    TcpOverflowKey, TcpOverflowRecord, AF_INET, AF_INET6, AF_UNIX,
};

use crate::{
    attribution::{
        address::UnixAddress,
        listeners::{Listener, Registry, Task},
        owners::Owner,
        process::{self, PidFilter, Role},
        rlimits,
        tcp::{self, Batch as TcpBatch, TcpListeners},
    },
    capture::CaptureWriter,
    cli::Watch,
    config,
    drop::{Cause, Client, Drop, DropKind, ListenerView, Notice, NoticeKind},
    limits::{self, BacklogFacts, NofileFacts, Transport, Verdict, LISTEN_MAX_REQUEST},
    probes,
    record::{Recorder, Recording},
    sinks::{aggregate::Aggregator, Destination, Format, Reconciliation, Sink},
    snapshot::Snapshot,
    worker_connections::WorkerConnections,
};

/// At most this many lines per second per (kind, listener, limit).
const LINE_INTERVAL: Duration = Duration::from_millis(250);
/// How long a sampled queue length is reused under a storm.
const QUEUE_SAMPLE_TTL: Duration = Duration::from_millis(100);
/// After accept() fails with EMFILE or ENFILE nginx stops accepting for
/// accept_mutex_delay (500 ms by default) and its listeners overflow: drops
/// at a listener this soon after its owner's failed accept are its effect.
const CAUSE_WINDOW: Duration = Duration::from_millis(1000);
/// How long a nofile or worker_connections verdict is reused in a storm.
const VERDICT_TTL: Duration = Duration::from_secs(5);
const ENFILE: i32 = -23;
/// Verdicts and failed accepts kept for reuse: beyond this many, the stale
/// ones are forgotten (a long run sees many short-lived processes).
const MAX_REMEMBERED: usize = 4096;

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
    /// Sockets whose clamped backlog was already reported.
    clamp_notices: HashSet<u64>,
    /// The latest failed accept() of each process and of its parent.
    accept_failures: HashMap<u32, (SystemTime, Cause)>,
    /// Verdicts whose facts come from /proc and configs, reused in a storm.
    verdicts: HashMap<VerdictKey, (Instant, Verdict)>,
    worker_connections: WorkerConnections,
}

/// What a reusable verdict depends on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum VerdictKey {
    Nofile {
        pid: u32,
        soft: u64,
        hard: u64,
    },
    /// Per worker: its master's configuration decides.
    WorkerConnections {
        pid: u32,
    },
    EphemeralPorts {
        pid: u32,
        netns: u32,
        destination: (IpAddr, u16),
    },
}

/// What a record becomes.
enum Event {
    Drop(Box<Drop>),
    Notice(Notice),
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
        uwsgi_listen: owner.and_then(Owner::uwsgi_listen),
        somaxconn,
        nginx_backlog: None,
    }
}

/// nginx's configured backlog for a listener, by its port or path.
fn nginx_backlog(
    owner: Option<&Owner>,
    port: Option<u16>,
    path: Option<&std::path::Path>,
) -> Option<config::Setting> {
    owner?.nginx.as_ref()?.listen_backlog(port, path).cloned()
}

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

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Where a process's soft RLIMIT_NOFILE came from, in words. `own` is the
/// program's own setting (nginx's worker_rlimit_nofile, uWSGI's max-fd)
/// and what it does; `unset` says it is absent, when that is worth saying.
fn nofile_source(
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
    let Some(setter) = rlimits::setter_of(pid, soft) else {
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
        Some((parent, _)) if parent.pid == 1 => match rlimits::systemd_unit(setter.process.pid) {
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
        let raw = &record.addr[..(record.addr_len as usize).min(record.addr.len())];
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
                let mut facts = backlog_facts(
                    Transport::Unix,
                    owner.as_ref(),
                    listener.backlog,
                    listener.requested,
                    listener.somaxconn,
                );
                facts.nginx_backlog = nginx_backlog(owner.as_ref(), None, address.path());
                limits::backlog_verdict(&facts)
            }
            None => limits::unknown_listener_verdict(),
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

    /// A failed accept() of `owner` (or of one of its workers) shortly
    /// before `time`: the reason its listener overflowed.
    fn cause_for(&self, owner: u32, time: SystemTime) -> Option<Cause> {
        let (at, cause) = self.accept_failures.get(&owner)?;
        let age = time.duration_since(*at).ok()?;
        (age <= CAUSE_WINDOW).then(|| cause.clone())
    }

    /// A verdict from the cache, or computed and cached.
    fn cached_verdict(
        &mut self,
        key: VerdictKey,
        compute: impl FnOnce(&mut Self) -> Verdict,
    ) -> Verdict {
        if let Some((at, verdict)) = self.verdicts.get(&key) {
            if at.elapsed() < VERDICT_TTL {
                return verdict.clone();
            }
        }
        let verdict = compute(self);
        if self.verdicts.len() >= MAX_REMEMBERED {
            self.verdicts
                .retain(|_, (at, _)| at.elapsed() < VERDICT_TTL);
        }
        self.verdicts.insert(key, (Instant::now(), verdict.clone()));
        verdict
    }

    /// accept/socket/open failed with EMFILE or ENFILE.
    fn fd_limit(&mut self, record: &FdLimitRecord) -> Option<Drop> {
        if !self.filter.covers(record.pid) {
            return None;
        }
        let syscall = fd_syscall::name(record.syscall);
        let time = self.clock.wall(record.ktime_ns);
        let mut client = self.client(record.pid, comm_of(&record.comm));
        client.syscall = Some(syscall);
        let (kind, limit) = if record.ret == ENFILE {
            let verdict = limits::file_max_verdict(
                read_number("/proc/sys/fs/file-max"),
                read_number("/proc/sys/fs/file-nr"),
            );
            (DropKind::FileMax, verdict)
        } else {
            let (pid, soft, hard) = (record.pid, record.nofile_soft, record.nofile_hard);
            let key = VerdictKey::Nofile { pid, soft, hard };
            let verdict = self.cached_verdict(key, |_| {
                let process = process::inspect(pid);
                let nginx = process.as_ref().and_then(config::nginx_of);
                let uwsgi = process
                    .as_ref()
                    .filter(|p| p.role.is_uwsgi())
                    .map(config::uwsgi_of);
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
                limits::nofile_verdict(&NofileFacts {
                    process: process
                        .as_ref()
                        .map_or(format!("pid {pid}"), |p| format!("{}[{pid}]", p.comm)),
                    role: process.as_ref().map_or(Role::Other, |p| p.role),
                    soft,
                    hard,
                    source: nofile_source(pid, soft, own, &unset),
                    nginx: nginx.map(|c| (c.worker_connections.clone(), c.main_file.clone())),
                })
            });
            (DropKind::Nofile, verdict)
        };
        if syscall.starts_with("accept") {
            let cause = Cause {
                kind,
                time: crate::sinks::rfc3339(time),
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
            let parent = process::parent_of(record.pid);
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

    /// An nginx worker found no free connection slot.
    fn no_connection(&mut self, pid: u32, comm: String, time: SystemTime) -> Option<Drop> {
        if !self.filter.covers(pid) {
            return None;
        }
        let client = self.client(pid, comm);
        let limit = self.cached_verdict(VerdictKey::WorkerConnections { pid }, |this| {
            let process = process::inspect(pid);
            let method = process
                .as_ref()
                .and_then(config::nginx_master)
                .and_then(|m| this.worker_connections.method_of(m.pid))
                .map_or("a uretprobe on ngx_get_connection".to_string(), |m| {
                    m.describe()
                });
            let config = process.as_ref().and_then(config::nginx_of);
            limits::worker_connections_verdict(
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

    /// connect() to an IPv4/IPv6 address found no free local port.
    fn ephemeral_ports(&mut self, record: &ConnectFailure) -> Option<Drop> {
        if !self.filter.covers(record.pid) {
            return None;
        }
        let raw = &record.addr[..(record.addr_len as usize).min(record.addr.len())];
        let (ip, port) = destination(record.family, raw)?;
        let client = self.client(record.pid, comm_of(&record.comm));
        let mut view = listener_view(
            if ip.is_ipv4() { "tcp" } else { "tcp6" },
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
            let server = crate::drop::socket_label(&ip.to_string(), port);
            let keepalive = process::inspect(pid)
                .as_ref()
                .and_then(config::nginx_of)
                .and_then(|c| {
                    c.upstreams
                        .iter()
                        .find(|u| u.server == server)
                        .map(|u| u.keepalive.is_some())
                });
            let range = this.registry.ip_local_port_range(netns);
            limits::ephemeral_ports_verdict(range, netns, keepalive)
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

    /// A listen() whose backlog the kernel clamped to somaxconn: a notice,
    /// once per socket.
    fn clamp_notice(&mut self, record: &ListenRecord) -> Option<Notice> {
        let requested = record.requested_backlog;
        let clamped = requested > record.effective_backlog
            && record.effective_backlog == record.somaxconn
            // listen(-1) asks for "as large as allowed": no surprise.
            && requested < LISTEN_MAX_REQUEST;
        if !clamped
            || !self.filter.covers(record.pid)
            || !self.clamp_notices.insert(record.sock_inode)
        {
            return None;
        }
        let owner = process::inspect(record.pid).map(Owner::of);
        let family = match record.family {
            AF_UNIX => "unix",
            AF_INET6 => "tcp6",
            _ => "tcp",
        };
        let mut view = listener_view(family, Some(record.netns), owner.as_ref());
        view.backlog = Some(record.effective_backlog);
        if record.family == AF_UNIX {
            let raw = &record.path[..(record.path_len as usize).min(record.path.len())];
            view.path = UnixAddress::from_sun_path(raw).map(|a| a.to_string());
        } else if let Some((addr, port)) =
            tcp::local_address_of(record.pid, record.tid, record.sock_inode)
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
            fix: limits::clamp_fix(&owner_label, requested),
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
                let mut facts = backlog_facts(
                    Transport::Tcp,
                    owner,
                    sample.backlog,
                    listener.requested,
                    Some(sample.somaxconn),
                );
                facts.nginx_backlog = nginx_backlog(owner, view.port, None);
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
            caused_by: owner.and_then(|o| self.cause_for(o.process.pid, time)),
            listener: Some(view),
            limit,
        })
    }

    /// Decode one ring-buffer record; returns what it means to the operator.
    fn handle(&mut self, bytes: &[u8]) -> Option<Event> {
        let tag = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
        match RecordKind::from_u32(tag)? {
            RecordKind::ConnectFailure => {
                let record: ConnectFailure = read_record(bytes)?;
                let drop = match record.family {
                    AF_UNIX => self.unix_connect_refused(&record),
                    _ => self.ephemeral_ports(&record),
                };
                drop.map(|d| Event::Drop(Box::new(d)))
            }
            RecordKind::Listen => {
                let record: ListenRecord = read_record(bytes)?;
                match record.family {
                    AF_UNIX => self.registry.on_listen(&record),
                    AF_INET | AF_INET6 => self.tcp.on_listen(&record),
                    _ => {}
                }
                self.clamp_notice(&record).map(Event::Notice)
            }
            RecordKind::TcpOverflow => {
                let record: TcpOverflowRecord = read_record(bytes)?;
                self.tcp.on_sample(&record);
                self.tcp_pending = true;
                None
            }
            RecordKind::FdLimit => {
                let record: FdLimitRecord = read_record(bytes)?;
                self.fd_limit(&record).map(|d| Event::Drop(Box::new(d)))
            }
            RecordKind::NoConnection => {
                let record: NoConnectionRecord = read_record(bytes)?;
                let time = self.clock.wall(record.ktime_ns);
                self.no_connection(record.pid, comm_of(&record.comm), time)
                    .map(|d| Event::Drop(Box::new(d)))
            }
        }
    }

    /// worker_connections alerts read from nginx error logs (binaries
    /// without the ngx_get_connection symbol).
    fn logged_shortages(&mut self) -> Vec<(Drop, u64)> {
        let pids = self.worker_connections.logged_alerts();
        pids.into_iter()
            .filter_map(|pid| {
                let comm = process::inspect(pid).map_or_else(|| "nginx".into(), |p| p.comm);
                Some((self.no_connection(pid, comm, SystemTime::now())?, 1))
            })
            .collect()
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
fn show<W: Destination>(
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

fn show_event<W: Destination>(
    aggregator: &mut Aggregator,
    sink: &mut Sink<W>,
    event: Option<Event>,
) -> std::io::Result<()> {
    match event {
        Some(Event::Drop(drop)) => show(aggregator, sink, [(*drop, 1)]),
        Some(Event::Notice(notice)) => sink.notice(&notice),
        None => Ok(()),
    }
}

/// Where the live view's results go.
pub enum Output {
    /// stdout: one line per drop, or JSON Lines.
    Terminal { json: bool },
    /// A capture file (`droptrace record`).
    Capture {
        path: std::path::PathBuf,
        max_size: Option<u64>,
    },
}

/// Load the probes, then watch until Ctrl-C, SIGTERM, --duration or (for
/// a capture) --max-size.
pub async fn run(watch: Watch, output: Output) -> Result<()> {
    let mut filter = PidFilter::new(&watch.pids, &watch.names)?;
    let probes = probes::load()?;
    let duration = watch.duration.map(Duration::from_secs);
    match output {
        Output::Terminal { json } => {
            let format = if json { Format::Json } else { Format::Human };
            let sink = Sink::new(format, std::io::stdout().lock());
            watch_until_stopped(probes, filter, sink, None, duration).await
        }
        Output::Capture { path, max_size } => {
            let mut writer = CaptureWriter::create(&path)?;
            let (snapshot, views) = Snapshot::take(&mut filter);
            let recorder = Recorder::new(&snapshot, views, max_size);
            writer.header(std::env::args().collect(), snapshot)?;
            tracing::info!("recording to {} (created 0600)", path.display());
            let sink = Sink::new(Format::Json, writer);
            let stopped_by =
                watch_until_stopped(probes, filter, sink, Some(recorder), duration).await;
            if stopped_by.is_ok() {
                tracing::info!(
                    "capture {} complete; read it anywhere with: droptrace report {}",
                    path.display(),
                    path.display()
                );
            }
            stopped_by
        }
    }
}

async fn watch_until_stopped<W: Destination>(
    probes: probes::Probes,
    filter: PidFilter,
    mut sink: Sink<W>,
    mut recorder: Option<Recorder>,
    duration: Option<Duration>,
) -> Result<()> {
    let probes::Probes {
        mut ebpf,
        records,
        lost,
        tcp_overflows,
    } = probes;
    let started = Instant::now();
    let mut registry = Registry::default();
    registry.rescan();
    let baseline = registry.listen_overflows();
    let scope = filter.describe();
    let mut attributor = Attributor {
        registry,
        tcp: TcpListeners::default(),
        filter,
        clock: Clock::new(),
        client_roles: HashMap::new(),
        queue_samples: HashMap::new(),
        tcp_pending: false,
        clamp_notices: HashSet::new(),
        accept_failures: HashMap::new(),
        verdicts: HashMap::new(),
        worker_connections: WorkerConnections::default(),
    };
    attributor.worker_connections.scan(&mut ebpf);
    let mut aggregator = Aggregator::new(LINE_INTERVAL);

    // SAFETY: the ring buffer owns its fd and keeps it open until dropped.
    let mut records = unsafe { AsyncFd::register(records) }
        .map_err(|err| anyhow!("cannot poll the ring buffer: {err}"))?;
    let mut tick = tokio::time::interval(LINE_INTERVAL);
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let deadline = tokio::time::sleep(duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);
    tracing::info!(
        "watching refused UNIX connects, TCP listen-queue drops, open-file limits, nginx worker_connections and ephemeral ports of {scope} (Ctrl-C for the summary)"
    );

    loop {
        tokio::select! {
            guard = records.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    let event = attributor.handle(&item);
                    show_event(&mut aggregator, &mut sink, event)?;
                }
                guard.clear_ready();
                if attributor.tcp_pending {
                    show(&mut aggregator, &mut sink, attributor.tcp_drops(counter_totals(&tcp_overflows), false))?;
                }
            }
            _ = tick.tick() => {
                show(&mut aggregator, &mut sink, attributor.tcp_drops(counter_totals(&tcp_overflows), false))?;
                attributor.worker_connections.scan(&mut ebpf);
                show(&mut aggregator, &mut sink, attributor.logged_shortages())?;
                for line in aggregator.due(Instant::now()) {
                    sink.line(&line)?;
                }
                if let (Some(recorder), Some(capture)) = (recorder.as_mut(), sink.out_mut().capture()) {
                    if recorder.tick(capture, aggregator.listeners())? == Recording::Full {
                        break;
                    }
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
        let event = attributor.handle(&item);
        show_event(&mut aggregator, &mut sink, event)?;
    }
    show(&mut aggregator, &mut sink, attributor.logged_shortages())?;
    show(
        &mut aggregator,
        &mut sink,
        attributor.tcp_drops(counter_totals(&tcp_overflows), true),
    )?;
    for line in aggregator.drain() {
        sink.line(&line)?;
    }
    if let (Some(recorder), Some(capture)) = (recorder.as_mut(), sink.out_mut().capture()) {
        recorder.sample(capture, aggregator.listeners())?;
    }
    let kernel = attributor.reconcile(&baseline);
    sink.summary(
        &aggregator.totals(),
        lost.read()?,
        &kernel,
        started.elapsed(),
    )?;
    if let Some(capture) = sink.out_mut().capture() {
        capture.sync()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_programs_own_nofile_setting_is_the_source_when_it_is_the_value_hit() {
        let max_fd = config::Setting::configured(32, "max-fd = 32 in /etc/uwsgi/app.ini:4");
        assert_eq!(
            nofile_source(
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
            std::process::id(),
            mine,
            Some((max_fd, "uWSGI sets it")),
            "; no max-fd",
        );
        assert!(!source.starts_with("max-fd"), "{source}");
        assert!(source.ends_with("; no max-fd"), "{source}");
    }

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
}
