//! The configuration a running nginx or uWSGI uses, read from its files.
use std::{
    collections::HashMap,
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, Instant},
};

use super::process::{self, Process};
use crate::{
    config::{files, nginx, uwsgi},
    contract::Role,
};

/// A configuration is read again after this long (a reload may have
/// changed it).
const CONFIG_TTL: Duration = Duration::from_secs(30);
/// How long one reading may hold up the caller (the event loop): a file on a
/// filesystem that does not answer costs this, once per CONFIG_TTL.
pub const READ_DEADLINE: Duration = Duration::from_millis(500);
/// Configurations kept; past this, those older than CONFIG_TTL go.
const MAX_CACHED: usize = 1024;

/// Configurations by pid, each valid for one start of that pid.
struct Cache<T> {
    entries: HashMap<u32, Cached<T>>,
}

struct Cached<T> {
    started: u64,
    read_at: Instant,
    config: Arc<T>,
}

impl<T> Cache<T> {
    fn new() -> Self {
        Self {
            entries: HashMap::new(),
        }
    }

    /// The cached configuration of `pid` (started at `started`), or a new
    /// one from `read`; `first` is told of a new process's configuration.
    fn get(
        &mut self,
        pid: u32,
        started: u64,
        read: impl FnOnce() -> T,
        first: impl FnOnce(&T),
    ) -> Arc<T> {
        let known = self.entries.get(&pid).filter(|c| c.started == started);
        if let Some(cached) = known.filter(|c| c.read_at.elapsed() < CONFIG_TTL) {
            return cached.config.clone();
        }
        let is_new = known.is_none();
        let config = Arc::new(read());
        if is_new {
            first(&config);
        }
        if self.entries.len() >= MAX_CACHED {
            self.entries
                .retain(|_, cached| cached.read_at.elapsed() < CONFIG_TTL);
        }
        if self.entries.len() >= MAX_CACHED {
            self.entries.clear();
        }
        self.entries.insert(
            pid,
            Cached {
                started,
                read_at: Instant::now(),
                config: config.clone(),
            },
        );
        config
    }
}

static NGINX_CONFIGS: LazyLock<Mutex<Cache<nginx::NginxConfig>>> =
    LazyLock::new(|| Mutex::new(Cache::new()));
static UWSGI_CONFIGS: LazyLock<Mutex<Cache<uwsgi::UwsgiConfig>>> =
    LazyLock::new(|| Mutex::new(Cache::new()));

/// The nginx master of an nginx process (itself, or a worker's parent).
pub fn nginx_master(process: &Process) -> Option<Process> {
    match process.role {
        Role::NginxMaster => Some(process.clone()),
        Role::NginxWorker => process::inspect(process::parent_of(process.pid)?),
        _ => None,
    }
}

/// The configuration an nginx process runs with, read once per master (and
/// again after CONFIG_TTL). What could not be read is logged once.
pub fn nginx_of(process: &Process) -> Option<Arc<nginx::NginxConfig>> {
    let master = nginx_master(process)?;
    let started = process::start_time(master.pid)?;
    let mut cache = NGINX_CONFIGS.lock().unwrap_or_else(|e| e.into_inner());
    Some(cache.get(
        master.pid,
        started,
        || {
            nginx::of_master(
                master.pid,
                &master.cmdline,
                &process::cwd_of(master.pid),
                READ_DEADLINE,
            )
        },
        |config| {
            tracing::info!(
                "nginx[{}]: configuration {} read through {}",
                master.pid,
                config.main_file.display(),
                config.method
            );
            for problem in &config.problems {
                tracing::warn!("nginx[{}] configuration: {problem}; droptrace falls back to nginx's defaults and what the kernel shows", master.pid);
            }
        },
    ))
}

/// The configuration a uWSGI process runs with (its command line and the
/// files it names, read as it could read them). Problems are logged once.
pub fn uwsgi_of(process: &Process) -> uwsgi::UwsgiConfig {
    let pid = process.pid;
    let read = || {
        let args = process.cmdline.get(1..).unwrap_or_default().to_vec();
        let cwd = process::cwd_of(pid);
        let unread = |reason: String| uwsgi::UwsgiConfig {
            problems: vec![crate::config::Problem {
                file: "its configuration".into(),
                reason,
            }],
            ..Default::default()
        };
        files::as_process_of(pid, READ_DEADLINE, move |view| {
            uwsgi::read(&args, &cwd, &view)
        })
        .unwrap_or_else(unread)
    };
    let started = process::start_time(pid).unwrap_or_default();
    let mut cache = UWSGI_CONFIGS.lock().unwrap_or_else(|e| e.into_inner());
    let config = cache.get(pid, started, read, |config| {
        for problem in &config.problems {
            tracing::warn!("uwsgi[{pid}] configuration: {problem}");
        }
    });
    config.as_ref().clone()
}
