//! The configuration of the programs behind the sockets: nginx and uWSGI
//! files and command lines, read the way the programs themselves read them.
//!
//! Readers never fail as a whole: a file that cannot be read or parsed is
//! recorded as a [`Problem`] (which file, why) and the rest is still used,
//! so droptrace falls back to what the kernel shows.
pub mod nginx;
pub mod uwsgi;

use std::{fmt, path::PathBuf};

use serde::{Deserialize, Serialize};

/// A configured value and where it came from, in words an operator can act on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Setting<T = u32> {
    pub value: T,
    pub source: String,
    /// True when nothing configured it and the program's default applies.
    pub is_default: bool,
}

impl<T> Setting<T> {
    pub fn default_value(value: T, source: impl Into<String>) -> Self {
        Self {
            value,
            source: source.into(),
            is_default: true,
        }
    }

    pub fn configured(value: T, source: impl Into<String>) -> Self {
        Self {
            value,
            source: source.into(),
            is_default: false,
        }
    }
}

/// A place in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A configuration file droptrace could not use, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Problem {
    pub file: PathBuf,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.reason)
    }
}

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::attribution::process::{self, Process, Role};

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
    let config = Arc::new(nginx::of_master(master.pid, &master.cmdline));
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
