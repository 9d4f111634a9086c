//! nginx ran out of connection slots: `ngx_get_connection()` returned NULL
//! (it logs "worker_connections are not enough"). No kernel event marks
//! it: accept4() succeeded and nginx closes the socket itself. The
//! uretprobe is attached by userspace to each nginx binary it finds.
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    programs::RetProbeContext,
};
use tracer_common::{NoConnectionRecord, RecordKind, COMM_LEN};

use crate::maps::emit;

pub fn on_get_connection_return(ctx: &RetProbeContext) {
    let connection: u64 = ctx.ret();
    if connection != 0 {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let record = NoConnectionRecord {
        kind: RecordKind::NoConnection as u32,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        _pad: 0,
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    };
    emit(&record);
}
