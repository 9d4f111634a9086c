//! `--prometheus ADDR`: droptrace's metrics over HTTP, and the periodic
//! look at the host behind the risk and listener gauges.
//!
//! The server runs on the thread that waits for signals, never on the
//! watcher: a scrape reads the metrics as they are, whatever the watcher is
//! doing, and a slow or silent scraper holds only its own connection (at
//! most MAX_CONNECTIONS at once, each for at most CONNECTION_LIMIT).
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Result};
use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{ACCEPT, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

use crate::{
    cli::Watch,
    config::files::is_stopping,
    contract::Snapshot,
    doctor,
    host::process::PidFilter,
    probes::hooks::Choice,
    sinks::prometheus::{Metrics, OPENMETRICS, PROMETHEUS_TEXT},
};

const MAX_CONNECTIONS: usize = 16;
/// A connection's whole life: its request line and headers must come
/// within HEADER_LIMIT.
const CONNECTION_LIMIT: Duration = Duration::from_secs(10);
const HEADER_LIMIT: Duration = Duration::from_secs(2);
/// How often risks and listener gauges are refreshed.
const LOOK_EVERY: Duration = Duration::from_secs(30);

/// The listening socket, bound before anything else is started so that an
/// address in use is one line and exit 1.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).map_err(|err| {
        anyhow!("cannot serve metrics on {addr}: {err} (--prometheus wants a free address, e.g. 127.0.0.1:9464)")
    })?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The metrics for these hooks, served at `endpoint` from now on (a task
/// on this thread's runtime) and refreshed every LOOK_EVERY for what
/// `watch` covers.
pub fn start(
    endpoint: std::net::TcpListener,
    watch: &Watch,
    hooks: &[Choice],
) -> Result<Arc<Metrics>> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let metrics = Arc::new(Metrics::new(kernel.trim(), hooks));
    look_periodically(metrics.clone(), PidFilter::new(&watch.pids, &watch.names)?);
    tracing::info!(
        "serving metrics at http://{}/metrics",
        endpoint.local_addr()?
    );
    let served = metrics.clone();
    tokio::spawn(async move {
        if let Err(err) = serve(endpoint, served).await {
            tracing::error!("metrics: the server stopped: {err:#}");
        }
    });
    Ok(metrics)
}

/// Answer scrapes for as long as droptrace runs.
async fn serve(listener: std::net::TcpListener, metrics: Arc<Metrics>) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of fds, say: try again shortly rather than spin.
            Err(err) => {
                tracing::warn!("metrics: cannot accept a connection: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Past MAX_CONNECTIONS, a new connection is closed at once.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_LIMIT)
                .keep_alive(true)
                .serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |request| answer(request, metrics.clone())),
                );
            let _ = tokio::time::timeout(CONNECTION_LIMIT, connection).await;
            drop(slot);
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    metrics: Arc<Metrics>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = |status: StatusCode, kind: &'static str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(kind) = kind.parse() {
            response.headers_mut().insert(CONTENT_TYPE, kind);
        }
        Ok(response)
    };
    let text = "text/plain; charset=utf-8";
    match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let openmetrics = request
                .headers()
                .get_all(ACCEPT)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .any(|value| value.contains("application/openmetrics-text"));
            let kind = if openmetrics {
                OPENMETRICS
            } else {
                PROMETHEUS_TEXT
            };
            response(StatusCode::OK, kind, metrics.encode(openmetrics))
        }
        (&Method::GET | &Method::HEAD, "/") => response(
            StatusCode::OK,
            text,
            "droptrace: metrics at /metrics\n".into(),
        ),
        (_, "/metrics" | "/") => response(
            StatusCode::METHOD_NOT_ALLOWED,
            text,
            "GET or HEAD only\n".into(),
        ),
        _ => response(
            StatusCode::NOT_FOUND,
            text,
            "not found: metrics are at /metrics\n".into(),
        ),
    }
}

/// Every LOOK_EVERY, on a thread of its own, look at the host as doctor
/// does: its risks replace the last ones, and the watched listeners'
/// queues and backlogs are set.
fn look_periodically(metrics: Arc<Metrics>, mut filter: PidFilter) {
    let spawned = std::thread::Builder::new()
        .name("risks".into())
        .spawn(move || {
            let mut last: Option<(Instant, Snapshot)> = None;
            while !is_stopping() {
                let (snapshot, _) = Snapshot::take(&mut filter);
                let growth = last.as_ref().map_or_else(Vec::new, |(at, before)| {
                    let now = snapshot
                        .namespaces
                        .iter()
                        .filter_map(|n| Some((n.netns, n.counters?.listen_overflows)))
                        .collect();
                    doctor::growth(before, &now, at.elapsed())
                });
                let risks = doctor::risks(&snapshot, &growth);
                metrics.risks(risks.iter().map(|r| (r.kind.as_str(), r.subject.as_str())));
                for listener in &snapshot.listeners {
                    metrics.listener(listener);
                }
                last = Some((Instant::now(), snapshot));
                std::thread::sleep(LOOK_EVERY);
            }
        });
    if let Err(err) = spawned {
        tracing::warn!("metrics: no risks or listener gauges: cannot start a thread: {err}");
    }
}
