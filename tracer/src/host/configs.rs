//! The configuration a running nginx or uWSGI uses, read from its files.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::process::{self, Process};
use crate::{
    config::{nginx, uwsgi},
    contract::Role,
};

/// A running nginx's configuration is read again after this long (a reload
/// may have changed it).
const NGINX_CONFIG_TTL: Duration = Duration::from_secs(30);

struct Cached {
    started: u64,
    read_at: Instant,
    config: Arc<nginx::NginxConfig>,
}

static NGINX_CONFIGS: Mutex<Option<HashMap<u32, Cached>>> = Mutex::new(None);

/// The nginx master of an nginx process (itself, or a worker's parent).
pub fn nginx_master(process: &Process) -> Option<Process> {
    match process.role {
        Role::NginxMaster => Some(process.clone()),
        Role::NginxWorker => process::inspect(process::parent_of(process.pid)?),
        _ => None,
    }
}

/// The configuration an nginx process runs with, read once per master (and
/// again after NGINX_CONFIG_TTL). What could not be read is logged once.
pub fn nginx_of(process: &Process) -> Option<Arc<nginx::NginxConfig>> {
    let master = nginx_master(process)?;
    let started = process::start_time(master.pid)?;
    let mut guard = NGINX_CONFIGS.lock().unwrap_or_else(|e| e.into_inner());
    let cache = guard.get_or_insert_with(HashMap::new);
    if let Some(cached) = cache.get(&master.pid) {
        if cached.started == started && cached.read_at.elapsed() < NGINX_CONFIG_TTL {
            return Some(cached.config.clone());
        }
    }
    let config = Arc::new(nginx::of_master(
        master.pid,
        &master.cmdline,
        &process::cwd_of(master.pid),
    ));
    let is_new = cache.get(&master.pid).is_none_or(|c| c.started != started);
    if is_new {
        tracing::info!(
            "nginx[{}]: configuration {} read through {}",
            master.pid,
            config.main_file.display(),
            config.method
        );
        for problem in &config.problems {
            tracing::warn!("nginx[{}] configuration: {problem}; droptrace falls back to nginx's defaults and what the kernel shows", master.pid);
        }
    }
    cache.insert(
        master.pid,
        Cached {
            started,
            read_at: Instant::now(),
            config: config.clone(),
        },
    );
    Some(config)
}

/// The configuration a uWSGI process runs with (its command line and the
/// files it names). Problems are logged.
pub fn uwsgi_of(process: &Process) -> uwsgi::UwsgiConfig {
    let root = std::path::PathBuf::from(format!("/proc/{}/root", process.pid));
    let cwd = process::cwd_of(process.pid);
    let config = uwsgi::read(process.cmdline.get(1..).unwrap_or_default(), &cwd, &root);
    for problem in &config.problems {
        tracing::warn!("uwsgi[{}] configuration: {problem}", process.pid);
    }
    config
}
