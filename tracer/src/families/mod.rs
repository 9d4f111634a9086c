//! The drop families: one module each, holding the decoding of its kernel
//! records, its attribution (which listener, owner, client), its verdict
//! (which limit, its value and source, the fix) and the declaration of its
//! kernel hooks. A new family is one module here, one eBPF module in
//! `tracer-ebpf`, and one record type in `tracer-common`.
//!
//! [`Families`] holds what the families share: the host they ask for facts,
//! the --pid filter, the kernel clock, client roles, cached verdicts, and
//! the failed accepts that explain later overflows (`caused_by`).
pub mod backlog;
mod backlog_clamped;
mod counted;
mod ephemeral_ports;
mod fd_limits;
pub mod tcp_queue;
mod unix_backlog;
pub mod worker_connections;

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant, SystemTime},
};

use tracer_common::{
    ConnectFailure, FdLimitRecord, ListenRecord, NoConnectionRecord, RecordKind, AF_UNIX,
    FAST_PATH_CONNECT_EXIT,
};

use crate::{
    config::files::monotonic,
    contract::{Cause, Client, Drop, Family, ListenerView, Notice, Role, Verdict},
    host::{
        owners::Owner,
        process::{PerProcess, PidFilter},
        Host,
    },
    probes::{
        hooks::{FamilyHooks, Mechanism, Program},
        Retired, Totals,
    },
};
use counted::{Batch, Counted};

/// The syscall tracepoints several families share (attached once).
const CONNECT_ENTER: Program =
    Program::tracepoint("connect_enter", "syscalls", "sys_enter_connect");
const CONNECT_EXIT: Program = Program::tracepoint("connect_exit", "syscalls", "sys_exit_connect");
const LISTEN_ENTER: Program = Program::tracepoint("listen_enter", "syscalls", "sys_enter_listen");
const LISTEN_EXIT: Program = Program::tracepoint("listen_exit", "syscalls", "sys_exit_listen");

/// Where fexit is refused, the exit tracepoints of the syscalls a family
/// watches, without enter programs: the arguments come from the caller's
/// registers (bpf_task_pt_regs, 5.15+). Other syscalls run no program: the
/// kernel tests one bit for them (a getppid() took 31 ns more under these,
/// 80 ns more under tp_btf/sys_exit). Closing them is slow (each perf event
/// waits for RCU grace periods, partly under a kernel-wide mutex: 0.3 s
/// for the seven here, each on a thread), so they are closed as soon as
/// Ctrl-C comes, while the watcher finishes (probes::Tracepoints). Like
/// every syscall tracepoint on x86-64, they never fire for 32-bit (i386)
/// callers, which tp_btf/sys_exit would see: their names say so on the
/// start-up line.
const CONNECT_EXIT_WITH_REGS: Mechanism = Mechanism {
    name: "tracepoint syscalls/sys_exit_connect (64-bit callers, arguments from their registers)",
    programs: &[Program::tracepoint(
        "connect_exit_regs",
        "syscalls",
        "sys_exit_connect",
    )],
    needs: &[],
    fast_path: Some(FAST_PATH_CONNECT_EXIT),
    extras: &[],
};

/// Where neither fexit nor the exit tracepoints can be had (before 5.15,
/// for connect and listen), the families that watch syscalls share one
/// program on the raw tracepoint every syscall passes on its way out: a
/// call that succeeds costs one comparison, no trace record is built, and
/// the arguments come from the caller's registers. The exit tracepoints'
/// mechanisms set fast paths, so that where both run (one family got
/// this, another those), nothing is counted twice.
const SYSCALL_EXIT: Mechanism = Mechanism {
    name: "tp_btf/sys_exit",
    programs: &[Program::btf_tracepoint("syscall_exit", "sys_exit")],
    needs: &[],
    fast_path: None,
    extras: &[],
};

/// The last fallback of the families that see failed connect() calls: the
/// address is kept from entry to exit.
const CONNECT_TRACEPOINTS: Mechanism = Mechanism {
    name: "tracepoints syscalls/sys_{enter,exit}_connect (64-bit callers)",
    programs: &[CONNECT_ENTER, CONNECT_EXIT],
    needs: &[],
    fast_path: None,
    extras: &[],
};

/// Every family's hooks, in the order the start-up line names them.
pub const HOOKS: &[FamilyHooks] = &[
    unix_backlog::HOOKS,
    tcp_queue::HOOKS,
    fd_limits::HOOKS,
    worker_connections::HOOKS,
    ephemeral_ports::HOOKS,
    backlog_clamped::HOOKS,
];

/// After accept() fails with EMFILE or ENFILE nginx stops accepting for
/// accept_mutex_delay (500 ms by default) and its listeners overflow: drops
/// at a listener this soon after its owner's failed accept are its effect.
const CAUSE_WINDOW: Duration = Duration::from_millis(1000);
/// How long a nofile or worker_connections verdict is reused in a storm.
const VERDICT_TTL: Duration = Duration::from_secs(5);
/// Verdicts and failed accepts kept for reuse: beyond this many, the stale
/// ones are forgotten (a long run sees many short-lived processes).
const MAX_REMEMBERED: usize = 4096;
/// How often keys are looked at for retirement (a TCP look dumps every
/// namespace's listening sockets).
const RETIRE_CHECK: Duration = Duration::from_secs(10);

/// Converts bpf_ktime_get_ns (CLOCK_MONOTONIC) to wall-clock time.
pub struct Clock {
    wall_at_zero: SystemTime,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            wall_at_zero: SystemTime::now() - monotonic(),
        }
    }

    /// A clock whose kernel time 0 is `wall_at_zero` (tests).
    #[cfg(test)]
    pub fn at(wall_at_zero: SystemTime) -> Self {
        Self { wall_at_zero }
    }

    fn wall(&self, ktime_ns: u64) -> SystemTime {
        self.wall_at_zero + Duration::from_nanos(ktime_ns)
    }

    /// The kernel's bpf_ktime_get_ns now.
    fn ktime_now(&self) -> u64 {
        monotonic().as_nanos() as u64
    }
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

/// Everything that turns kernel records into drops and notices.
pub struct Families {
    host: Box<dyn Host>,
    filter: PidFilter,
    clock: Clock,
    client_roles: PerProcess<Role>,
    /// Verdicts whose facts come from /proc and configs, reused in a storm.
    verdicts: HashMap<VerdictKey, (Instant, Verdict)>,
    /// The latest failed accept() of each process and of its parent.
    accept_failures: HashMap<u32, (SystemTime, Cause)>,
    /// A sample arrived: read the kernel's counts now rather than at the tick.
    pub pending: bool,
    connects: Counted<ConnectFailure>,
    fd_limits: Counted<FdLimitRecord>,
    no_connections: Counted<NoConnectionRecord>,
    unix: unix_backlog::UnixBacklog,
    pub tcp: tcp_queue::TcpQueue,
    clamps: backlog_clamped::BacklogClamped,
    pub worker_connections: worker_connections::WorkerConnections,
    /// Keys idle this long, of a process or listener gone, are retired.
    pub retire_after: Duration,
    last_retire: Instant,
}

impl Families {
    pub fn new(host: Box<dyn Host>, filter: PidFilter, clock: Clock) -> Self {
        Self {
            host,
            filter,
            clock,
            client_roles: PerProcess::new(MAX_REMEMBERED),
            verdicts: HashMap::new(),
            accept_failures: HashMap::new(),
            pending: false,
            connects: Default::default(),
            fd_limits: Default::default(),
            no_connections: Default::default(),
            unix: Default::default(),
            tcp: Default::default(),
            clamps: Default::default(),
            worker_connections: Default::default(),
            retire_after: counted::RETIRE_AFTER,
            last_retire: Instant::now(),
        }
    }

    /// Decode one ring-buffer record. A listen() may become a notice; a
    /// sample of counted drops is kept to explain the counts (`drops`).
    pub fn handle(&mut self, bytes: &[u8]) -> Option<Notice> {
        let tag = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
        match RecordKind::from_u32(tag)? {
            RecordKind::Listen => return self.on_listen(&read_record(bytes)?),
            RecordKind::ConnectFailure => self.connects.sample(read_record(bytes)?),
            RecordKind::TcpOverflow => self.tcp_sample(&read_record(bytes)?),
            RecordKind::FdLimit => self.fd_limits.sample(read_record(bytes)?),
            RecordKind::NoConnection => self.no_connections.sample(read_record(bytes)?),
        }
        self.pending = true;
        None
    }

    /// The drops the kernel counted since the last call, one per key with
    /// the number it stands for. `last`: droptrace is stopping; count
    /// everything now, even keys whose sample never came.
    pub fn drops(&mut self, totals: Totals, last: bool) -> Vec<(Drop, u64)> {
        self.pending = false;
        let now_ns = self.clock.ktime_now();
        let host = &mut self.host;
        let mut comm = |pid| {
            let name = host.process(pid).map(|p| p.comm).unwrap_or_default();
            let mut comm = [0u8; 16];
            let len = name.len().min(15);
            comm[..len].copy_from_slice(&name.as_bytes()[..len]);
            comm
        };
        let connects = self.connects.poll(totals.connects, last, now_ns, &mut comm);
        let fd_limits = self
            .fd_limits
            .poll(totals.fd_limits, last, now_ns, &mut comm);
        let no_connections =
            self.no_connections
                .poll(totals.no_connection, last, now_ns, &mut comm);
        let mut drops = self.tcp_drops(totals.tcp, last);
        let mut add = |drop: Option<Drop>, batch_count: u64| {
            if let Some(drop) = drop {
                drops.push((drop, batch_count));
            }
        };
        for Batch { record, count } in connects {
            add(
                match record.family {
                    AF_UNIX => self.unix_connect_refused(&record),
                    _ => self.ephemeral_ports(&record),
                },
                count,
            );
        }
        for Batch { record, count } in fd_limits {
            add(self.fd_limit(&record), count);
        }
        for Batch { record, count } in no_connections {
            let time = self.clock.wall(record.ktime_ns);
            add(
                self.no_connection(record.pid, comm_of(&record.comm), time),
                count,
            );
        }
        drops
    }

    /// What no longer needs holding, forgotten here (see
    /// `Counted::retire`, `TcpListeners::retire`); the caller deletes the
    /// same keys from the kernel's tables. Looked at every RETIRE_CHECK.
    pub fn retire(&mut self) -> Retired {
        // A scan cut short by Ctrl-C would make open listeners look closed.
        if crate::config::files::is_stopping()
            || self.last_retire.elapsed() < RETIRE_CHECK.min(self.retire_after)
        {
            return Retired::default();
        }
        self.last_retire = Instant::now();
        self.host.maintain(self.retire_after);
        let after = self.retire_after;
        let host = &mut self.host;
        let mut gone = |pid| host.process(pid).is_none();
        Retired {
            connects: self.connects.retire(after, &mut gone),
            fd_limits: self.fd_limits.retire(after, &mut gone),
            no_connection: self.no_connections.retire(after, &mut gone),
            tcp: self.tcp.listeners.retire(after, host.as_mut()),
        }
    }

    /// A listen() call: the listener tables learn it, and a clamped backlog
    /// becomes a notice.
    fn on_listen(&mut self, record: &ListenRecord) -> Option<Notice> {
        match record.family {
            AF_UNIX => self.host.unix_listen(record),
            _ => self.tcp.listeners.on_listen(record),
        }
        self.clamp_notice(record)
    }

    /// A client the kernel names by its pid alone: its name and, when not
    /// known yet, its role, from one read of the process.
    fn client_by_pid(&mut self, pid: u32) -> Client {
        let process = self.host.process(pid);
        if self.client_roles.get(pid).is_none() {
            let role = process.as_ref().map_or(Role::Other, |p| p.role);
            self.client_roles.insert(pid, role);
        }
        self.client(pid, process.map(|p| p.comm).unwrap_or_default())
    }

    fn client(&mut self, pid: u32, comm: String) -> Client {
        let role = match self.client_roles.get(pid) {
            Some(role) => role,
            None => {
                // An exited client cannot be placed in the process tree.
                let role = self.host.process(pid).map_or(Role::Other, |p| p.role);
                self.client_roles.insert(pid, role);
                role
            }
        };
        Client {
            pid: Some(pid),
            comm: Some(comm),
            role: Some(role),
            ..Client::default()
        }
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

    pub fn describe_filter(&self) -> String {
        self.filter.describe()
    }
}

/// A listener as the sinks show it, before the family-specific fields.
fn listener_view(family: Family, netns: Option<u32>, owner: Option<&Owner>) -> ListenerView {
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

/// A record's bytes as the kernel hands them over (tests).
#[cfg(test)]
pub fn bytes_of<T: Copy>(record: &T) -> Vec<u8> {
    // SAFETY: T is a #[repr(C)] POD record; we read exactly its bytes.
    unsafe { std::slice::from_raw_parts((record as *const T).cast::<u8>(), size_of::<T>()) }
        .to_vec()
}

#[cfg(test)]
pub mod testing {
    //! Families driven by a fake host, as the family tests use them.
    use super::*;
    use crate::host::fake::FakeHost;

    /// Kernel time 0 is this wall time: 2026-09-21T14:13:20.000Z.
    pub const EPOCH_MS: u64 = 1_790_000_000_000;

    pub fn families(host: FakeHost) -> Families {
        Families::new(
            Box::new(host),
            PidFilter::new(&[], &[]).unwrap(),
            Clock::at(SystemTime::UNIX_EPOCH + Duration::from_millis(EPOCH_MS)),
        )
    }

    /// The JSON line a sink writes for a notice.
    pub fn notice_line(notice: Option<Notice>) -> serde_json::Value {
        let notice = notice.expect("the record became no notice");
        serde_json::to_value(crate::contract::Record::Notice(notice)).unwrap()
    }

    /// The JSON line a sink writes for `count` drops the kernel counted
    /// under `record`'s key, `record` being their sample.
    pub fn drop_line(families: &mut Families, record: &[u8], count: u64) -> serde_json::Value {
        assert!(families.handle(record).is_none());
        let tag = u32::from_ne_bytes(record[..4].try_into().unwrap());
        let mut totals = Totals::default();
        match RecordKind::from_u32(tag).unwrap() {
            RecordKind::ConnectFailure => {
                let record: ConnectFailure = read_record(record).unwrap();
                totals.connects.push((record.key(), count));
            }
            RecordKind::FdLimit => {
                let record: FdLimitRecord = read_record(record).unwrap();
                totals.fd_limits.push((record.key(), count));
            }
            RecordKind::NoConnection => {
                let record: NoConnectionRecord = read_record(record).unwrap();
                totals.no_connection.push((record.pid, count));
            }
            other => panic!("{other:?} is not a counted record"),
        }
        let mut drops = families.drops(totals, false);
        assert_eq!(drops.len(), 1, "one key, one drop");
        let (drop, count) = drops.remove(0);
        serde_json::to_value(crate::contract::Record::Drop(crate::contract::Line {
            drop,
            count,
            first: true,
        }))
        .unwrap()
    }

    pub fn comm(name: &str) -> [u8; 16] {
        let mut comm = [0u8; 16];
        comm[..name.len()].copy_from_slice(name.as_bytes());
        comm
    }
}
