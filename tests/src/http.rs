//! A bounded burst of HTTP requests with exact per-request outcomes.
use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Semaphore,
};

use crate::netns::Netns;

/// Responses by status code; `failed` counts requests with no response.
#[derive(Debug, Default)]
pub struct Outcomes {
    pub by_status: BTreeMap<u16, usize>,
    pub failed: usize,
}

impl Outcomes {
    pub fn count(&self, status: u16) -> usize {
        self.by_status.get(&status).copied().unwrap_or(0)
    }
}

async fn one(addr: SocketAddr) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: droptrace-test\r\n\r\n")
        .await
        .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let status_line = String::from_utf8_lossy(&response[..response.len().min(32)]).into_owned();
    status_line.split(' ').nth(1)?.parse().ok()
}

/// Wait until something accepts TCP connections at `addr`.
async fn wait_listening(addr: SocketAddr) {
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens at {addr} after 10 s");
}

/// The end-to-end tests' burst: enough concurrent clients to fill uWSGI's
/// and nginx's queues against a 100 ms app, bounded in count and time.
pub const CONCURRENCY: usize = 1000;
pub const REQUESTS: usize = 2000;
pub const PER_REQUEST: Duration = Duration::from_secs(30);

/// REQUESTS GETs to `addr`, CONCURRENCY at a time, each bounded by
/// PER_REQUEST; run from inside `netns` when given.
pub fn burst(addr: SocketAddr, netns: Option<&Netns>) -> Outcomes {
    raise_nofile_limit();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(netns) = netns {
                    netns.enter_on_this_thread();
                }
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    wait_listening(addr).await;
                    let permits = Arc::new(Semaphore::new(CONCURRENCY));
                    let mut tasks = Vec::with_capacity(REQUESTS);
                    for _ in 0..REQUESTS {
                        let permit = permits.clone().acquire_owned().await.unwrap();
                        tasks.push(tokio::spawn(async move {
                            let outcome = tokio::time::timeout(PER_REQUEST, one(addr))
                                .await
                                .ok()
                                .flatten();
                            drop(permit);
                            outcome
                        }));
                    }
                    let mut outcomes = Outcomes::default();
                    for task in tasks {
                        match task.await.unwrap() {
                            Some(status) => *outcomes.by_status.entry(status).or_default() += 1,
                            None => outcomes.failed += 1,
                        }
                    }
                    outcomes
                })
            })
            .join()
            .unwrap()
    })
}

/// A thousand concurrent clients need more than the usual 1024 fds.
fn raise_nofile_limit() {
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}
