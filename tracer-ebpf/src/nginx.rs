//! nginx ran out of connection slots: `ngx_get_connection()` returned NULL
//! (it logs "worker_connections are not enough"). No kernel event marks
//! it: accept4() succeeded and nginx closes the socket itself. The
//! uretprobe is attached by userspace to each nginx binary whose error log
//! it cannot read. Counted per worker in the kernel; a sample is sent.
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::map,
    maps::PerCpuHashMap,
    programs::RetProbeContext,
};
use tracer_common::{Counter, NoConnectionRecord, COMM_LEN};

use crate::maps::{count, emit};

/// Exact counts by worker pid (read by userspace).
#[map]
static NO_CONNECTION: PerCpuHashMap<u32, Counter> = PerCpuHashMap::with_max_entries(4096, 0);

pub fn on_get_connection_return(ctx: &RetProbeContext) {
    let connection: u64 = ctx.ret();
    if connection != 0 {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    if let Some(now) = count(&NO_CONNECTION, &pid) {
        let comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
        emit(&NoConnectionRecord::new(pid, pid_tgid as u32, now, comm));
    }
}
