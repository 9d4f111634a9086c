//! The live view and the recorder's loop: read records from the kernel,
//! hand them to the drop families, print what they become, summarise at
//! the end.
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, Signal, SignalKind},
};

use crate::{
    cli::Watch,
    config,
    contract::Notice,
    contract::{Drop, Snapshot},
    exporter,
    families::{self, Clock, Families},
    host::{process::PidFilter, LiveHost},
    probes,
    record::{Recorder, Recording},
    sinks::{
        aggregate::Aggregator, capture::CaptureWriter, prometheus::Metrics, Destination, Format,
        Sink,
    },
};

/// At most this many lines per second per (kind, listener, limit).
const LINE_INTERVAL: Duration = Duration::from_millis(250);

/// Count drops (each standing for `count`) and print the lines now due.
fn show<W: Destination>(
    aggregator: &mut Aggregator,
    sink: &mut Sink<W>,
    metrics: Option<&Metrics>,
    drops: impl IntoIterator<Item = (Drop, u64)>,
) -> std::io::Result<()> {
    for (drop, count) in drops {
        progressed();
        if let Some(metrics) = metrics {
            metrics.add(&drop, count);
        }
        if let Some(line) = aggregator.add(drop, count, Instant::now()) {
            sink.line(&line)?;
        }
    }
    Ok(())
}

fn show_notice<W: Destination>(sink: &mut Sink<W>, notice: Option<Notice>) -> std::io::Result<()> {
    match notice {
        Some(notice) => sink.notice(&notice),
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

/// Ctrl-C and SIGTERM, watched once the probes are attached (a signal
/// before the loop ends it at its first turn). Each also tells the readers
/// at once, from the signal handler, that droptrace is stopping: a read
/// made for a watched process that is still waiting gives up within half a
/// second, even while the watcher is in it.
struct Stop {
    interrupt: Signal,
    terminate: Signal,
}

impl Stop {
    fn watch() -> Result<Self> {
        let stop = Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        };
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: the action reads the clock and stores an atomic, both
            // async-signal-safe.
            unsafe { signal_hook_registry::register(signal, config::files::stopping) }
                .map_err(|err| anyhow!("cannot watch signal {signal}: {err}"))?;
        }
        Ok(stop)
    }

    async fn signalled(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// From Ctrl-C or SIGTERM to the end of droptrace, in every state: the
/// watcher's reads give up after half a second (`config::files`), and its
/// summary takes milliseconds. Should the watcher make no progress for this
/// long (a read the kernel does not let go of), droptrace ends without it.
/// A slow machine that is still making progress (an emulated kernel) is
/// waited for.
const STOP_LIMIT: Duration = Duration::from_secs(1);

/// The watcher's steps so far: the signal thread tells a slow watcher from
/// a stuck one.
static PROGRESS: AtomicU64 = AtomicU64::new(0);

fn progressed() {
    PROGRESS.fetch_add(1, Ordering::Relaxed);
}

/// What the watcher thread sent when it ended.
fn watcher_result(sent: Result<Result<()>, tokio::sync::oneshot::error::RecvError>) -> Result<()> {
    sent.map_err(|_| anyhow!("the watcher thread ended without a result"))?
}

/// The watcher's result, waited for while it makes progress.
async fn watcher_finishing(
    done: &mut std::pin::Pin<&mut tokio::sync::oneshot::Receiver<Result<()>>>,
) -> Result<()> {
    let mut seen = PROGRESS.load(Ordering::Relaxed);
    loop {
        if let Ok(sent) = tokio::time::timeout(STOP_LIMIT, done.as_mut()).await {
            return watcher_result(sent);
        }
        let now = PROGRESS.load(Ordering::Relaxed);
        if now == seen {
            bail!("stopped without the summary: the watcher (reading /proc, socket tables or a configuration) made no progress for {STOP_LIMIT:?} after the signal");
        }
        seen = now;
    }
}

/// What the watcher thread writes to.
enum Target {
    Terminal {
        json: bool,
    },
    Capture {
        writer: CaptureWriter,
        recorder: Box<Recorder>,
        path: std::path::PathBuf,
    },
}

/// Load the probes, then watch until Ctrl-C, SIGTERM, --duration or (for
/// a capture) --max-size.
///
/// Two threads: this one only waits for signals (and is where anything that
/// must answer at once belongs); the watcher reads the kernel and the
/// machine (/proc, sock_diag, configurations), which may take a while, and
/// is told to stop from here.
pub async fn run(watch: Watch, output: Output) -> Result<()> {
    let mut filter = PidFilter::new(&watch.pids, &watch.names)?;
    let endpoint = watch.prometheus.map(exporter::bind).transpose()?;
    let probes = probes::load(families::HOOKS)?;
    let tracepoints = probes.tracepoints.clone();
    // Until here Ctrl-C ends droptrace at once: nothing was watched yet.
    let mut stop = Stop::watch()?;
    let metrics = match endpoint {
        Some(endpoint) => Some(exporter::start(endpoint, &watch, &probes.choices)?),
        None => None,
    };
    let destination = match output {
        Output::Terminal { json } => Target::Terminal { json },
        Output::Capture { path, max_size } => {
            let mut writer = CaptureWriter::create(&path)?;
            let (snapshot, views) = Snapshot::take(&mut filter);
            let recorder = Recorder::new(&snapshot, views, max_size);
            writer.header(
                std::env::args_os()
                    .map(|arg| arg.to_string_lossy().into_owned())
                    .collect(),
                snapshot,
            )?;
            tracing::info!("recording to {} (created 0600)", path.display());
            Target::Capture {
                writer,
                recorder: Box::new(recorder),
                path,
            }
        }
    };
    let watching = Watching {
        probes,
        filter,
        metrics,
        duration: watch.duration.map(Duration::from_secs),
        nginx_uretprobe: watch.nginx_uretprobe,
    };
    let (tell_stop, told_stop) = tokio::sync::watch::channel(false);
    let (finished, done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("watcher".into())
        .spawn(move || {
            let _ = finished.send(watching.run(destination, told_stop));
        })
        .map_err(|err| anyhow!("cannot start the watcher thread: {err}"))?;
    tokio::pin!(done);
    tokio::select! {
        sent = &mut done => watcher_result(sent),
        _ = stop.signalled() => {
            let _ = tell_stop.send(true);
            // Nothing after the signal is watched: the tracepoints are
            // detached while the watcher finishes (see Tracepoints).
            let detaching = tracepoints.detach();
            let finished = watcher_finishing(&mut done).await;
            detaching.wait();
            finished
        }
    }
}

/// What the watcher thread is given.
struct Watching {
    probes: probes::Probes,
    filter: PidFilter,
    metrics: Option<Arc<Metrics>>,
    duration: Option<Duration>,
    nginx_uretprobe: bool,
}

impl Watching {
    /// The watcher thread: its own runtime, the loop, the summary.
    fn run(self, destination: Target, told_stop: tokio::sync::watch::Receiver<bool>) -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| anyhow!("cannot start the watcher's runtime: {err}"))?;
        match destination {
            Target::Terminal { json } => {
                let format = if json { Format::Json } else { Format::Human };
                let sink = Sink::new(format, std::io::stdout().lock());
                runtime.block_on(watch_until_stopped(self, sink, None, told_stop))
            }
            Target::Capture {
                writer,
                recorder,
                path,
            } => {
                let sink = Sink::new(Format::Json, writer);
                let stopped_by =
                    runtime.block_on(watch_until_stopped(self, sink, Some(*recorder), told_stop));
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
}

async fn watch_until_stopped<W: Destination>(
    watching: Watching,
    mut sink: Sink<W>,
    mut recorder: Option<Recorder>,
    mut told_stop: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    let Watching {
        probes,
        filter,
        metrics,
        duration,
        nginx_uretprobe,
    } = watching;
    let probes::Probes {
        mut ebpf,
        tracepoints,
        records,
        lost,
        mut counters,
        choices,
    } = probes;
    tracing::info!(
        "hooks on this kernel: {}",
        choices
            .iter()
            .map(probes::hooks::Choice::describe)
            .collect::<Vec<_>>()
            .join("; ")
    );
    let started = Instant::now();
    let mut families = Families::new(Box::new(LiveHost::new()), filter, Clock::new());
    let baseline = families.listen_overflows();
    let scope = families.describe_filter();
    families.worker_connections.uretprobe_first = nginx_uretprobe;
    // Tests retire keys sooner than an operator needs to.
    if let Some(ms) = std::env::var("DROPTRACE_RETIRE_AFTER_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
    {
        families.retire_after = Duration::from_millis(ms);
    }
    families.worker_connections.scan(&mut ebpf);
    let mut tcp_frees = families::tcp_queue::FreeWatch::new(&choices);
    let mut aggregator = Aggregator::new(LINE_INTERVAL);

    // SAFETY: the ring buffer owns its fd and keeps it open until dropped.
    let mut records = unsafe { AsyncFd::register(records) }
        .map_err(|err| anyhow!("cannot poll the ring buffer: {err}"))?;
    let mut tick = tokio::time::interval(LINE_INTERVAL);
    let deadline = tokio::time::sleep(duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);
    tracing::info!(
        "watching refused UNIX connects, TCP listen-queue drops, open-file limits, nginx worker_connections and ephemeral ports of {scope} (Ctrl-C for the summary)"
    );

    loop {
        progressed();
        tokio::select! {
            guard = records.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    let notice = families.handle(&item);
                    show_notice(&mut sink, notice)?;
                }
                guard.clear_ready();
                if families.pending {
                    show(&mut aggregator, &mut sink, metrics.as_deref(), families.drops(counters.read(), false))?;
                }
            }
            _ = tick.tick() => {
                show(&mut aggregator, &mut sink, metrics.as_deref(), families.drops(counters.read(), false))?;
                counters.forget(&families.retire());
                families.worker_connections.scan(&mut ebpf);
                tcp_frees.tick(&mut ebpf, Instant::now());
                show(&mut aggregator, &mut sink, metrics.as_deref(), families.logged_shortages())?;
                if let Some(metrics) = &metrics {
                    metrics.lost(&lost.read()?);
                }
                for line in aggregator.due(Instant::now()) {
                    sink.line(&line)?;
                }
                if let (Some(recorder), Some(capture)) = (recorder.as_mut(), sink.out_mut().capture()) {
                    if recorder.tick(capture, aggregator.listeners())? == Recording::Full {
                        break;
                    }
                }
            }
            _ = told_stop.changed() => break,
            _ = &mut deadline => break,
        }
    }

    // Nothing after the loop is watched: the tracepoints are detached on
    // threads meanwhile (slow; at once if a signal ended the loop), and what
    // the kernel submitted or counted before we stopped still counts.
    progressed();
    let detaching = tracepoints.detach();
    let ring = records.get_mut();
    while let Some(item) = ring.next() {
        progressed();
        let notice = families.handle(&item);
        show_notice(&mut sink, notice)?;
    }
    show(
        &mut aggregator,
        &mut sink,
        metrics.as_deref(),
        families.logged_shortages(),
    )?;
    // A packet still in flight on a CPU may have cost drops no later
    // packet will catch up: count them now.
    progressed();
    probes::catch_up_tcp(&mut ebpf);
    progressed();
    show(
        &mut aggregator,
        &mut sink,
        metrics.as_deref(),
        families.drops(counters.read(), true),
    )?;
    for line in aggregator.drain() {
        sink.line(&line)?;
    }
    if let (Some(recorder), Some(capture)) = (recorder.as_mut(), sink.out_mut().capture()) {
        recorder.sample(capture, aggregator.listeners())?;
    }
    progressed();
    let kernel = families.reconcile(&baseline);
    progressed();
    sink.summary(
        &aggregator.totals(),
        lost.read()?,
        &kernel,
        started.elapsed(),
    )?;
    if let Some(capture) = sink.out_mut().capture() {
        capture.sync()?;
    }
    detaching.wait();
    // Closing a fentry/fexit link waits for the kernel's RCU-tasks grace
    // periods (seconds for the lot under emulation): on a thread of its
    // own, which the summary does not wait for (the process's exit closes
    // what is left).
    std::thread::spawn(move || drop(ebpf));
    Ok(())
}
