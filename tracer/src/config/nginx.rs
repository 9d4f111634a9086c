//! nginx's configuration, as the running master uses it.
//!
//! droptrace never runs the watched nginx (`nginx -T` as root would load a
//! user's `load_module`): the files are read as the master could read them
//! (see [`super::files`]), following `include`s the way nginx does, from
//! the paths of its command line and the defaults compiled into its binary
//! (read from the binary's bytes).
use std::{
    cell::Cell,
    io::{self, Read},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{
    files::{self, View},
    Origin, Problem, Setting,
};

/// nginx's defaults (ngx_event.c, ngx_http_core_module.c on Linux).
pub const DEFAULT_WORKER_CONNECTIONS: u32 = 512;
pub const DEFAULT_LISTEN_BACKLOG: u32 = 511;
/// Includes nested deeper than this are a loop.
const MAX_INCLUDE_DEPTH: usize = 16;
/// Files read for one configuration (an include fan-out is bounded too).
const MAX_FILES: usize = 1_000;
/// Bytes read for one configuration, over all its files.
const MAX_TOTAL_BYTES: usize = 16 << 20;
/// Words quoted in a problem are cut to this many characters.
const MAX_QUOTED: usize = 40;

/// One directive: `name args...;` or `name args... { block }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Directive {
    pub name: String,
    pub args: Vec<String>,
    pub origin: Origin,
    pub block: Option<Vec<Directive>>,
}

/// Where configuration files come from.
pub trait Files {
    fn read(&self, path: &Path) -> io::Result<String>;
    /// The files an `include` pattern names, in nginx's (sorted) order.
    fn expand(&self, pattern: &Path) -> Vec<PathBuf>;
    /// True when no more files will be read (a budget ran out).
    fn exhausted(&self) -> bool {
        false
    }
}

/// Files on disk, seen the way a process sees them (see [`super::files`]).
pub struct Disk {
    pub view: View,
}

impl Files for Disk {
    fn read(&self, path: &Path) -> io::Result<String> {
        self.view.read(path)
    }

    fn expand(&self, pattern: &Path) -> Vec<PathBuf> {
        self.view.glob(pattern)
    }
}

/// Any `Files`, with a budget of files and bytes for one configuration.
struct Budgeted<'a> {
    files: &'a dyn Files,
    reads: Cell<usize>,
    bytes: Cell<usize>,
    /// A read was refused for want of budget (and said so, once).
    exhausted: Cell<bool>,
}

impl Files for Budgeted<'_> {
    fn read(&self, path: &Path) -> io::Result<String> {
        if self.reads.get() >= MAX_FILES || self.bytes.get() >= MAX_TOTAL_BYTES {
            // Said once: later includes are skipped (see `exhausted`).
            self.exhausted.set(true);
            return Err(io::Error::other(format!(
                "more than {MAX_FILES} files or {} MiB read for this configuration; not read",
                MAX_TOTAL_BYTES >> 20
            )));
        }
        self.reads.set(self.reads.get() + 1);
        let text = self.files.read(path)?;
        self.bytes.set(self.bytes.get() + text.len());
        Ok(text)
    }

    fn expand(&self, pattern: &Path) -> Vec<PathBuf> {
        self.files.expand(pattern)
    }

    fn exhausted(&self) -> bool {
        self.exhausted.get()
    }
}

/// `word` for a problem message: at most MAX_QUOTED characters.
fn quoted(word: &str) -> String {
    match word.char_indices().nth(MAX_QUOTED) {
        Some((at, _)) => format!("{}...", &word[..at]),
        None => word.to_string(),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Token {
    Word(String),
    Semicolon,
    Open,
    Close,
}

/// nginx's lexer: words, quoted strings, `;`, `{`, `}`, `#` comments.
fn tokenize(text: &str) -> Result<Vec<(Token, usize)>, (usize, String)> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            c if c.is_whitespace() => {}
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        break;
                    }
                }
            }
            ';' => tokens.push((Token::Semicolon, line)),
            '{' => tokens.push((Token::Open, line)),
            '}' => tokens.push((Token::Close, line)),
            '"' | '\'' => {
                let start = line;
                let mut word = String::new();
                loop {
                    match chars.next() {
                        None => return Err((start, format!("unterminated {c}quoted string{c}"))),
                        Some('\\') => match chars.next() {
                            Some('n') => word.push('\n'),
                            Some('t') => word.push('\t'),
                            Some('r') => word.push('\r'),
                            Some(escaped) => word.push(escaped),
                            None => return Err((start, "unterminated string".into())),
                        },
                        Some(q) if q == c => break,
                        Some(other) => {
                            if other == '\n' {
                                line += 1;
                            }
                            word.push(other)
                        }
                    }
                }
                tokens.push((Token::Word(word), start));
            }
            first => {
                let mut word = String::from(first);
                let mut escaped = first == '\\';
                if escaped {
                    word.pop();
                }
                while let Some(&c) = chars.peek() {
                    if escaped {
                        word.push(c);
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c.is_whitespace() || c == ';' || c == '}' {
                        break;
                    } else if c == '{' {
                        // "${var}" is a variable, not a block.
                        if !word.ends_with('$') {
                            break;
                        }
                        word.push(c);
                    } else {
                        word.push(c);
                    }
                    chars.next();
                }
                tokens.push((Token::Word(word), line));
            }
        }
    }
    Ok(tokens)
}

/// Parse one file's text (includes are left as `include` directives).
pub fn parse(text: &str, file: &Path) -> Result<Vec<Directive>, Problem> {
    let problem = |line: usize, reason: String| Problem {
        file: file.to_path_buf(),
        reason: format!("line {line}: {reason}"),
    };
    let tokens = tokenize(text).map_err(|(line, reason)| problem(line, reason))?;
    let mut stack: Vec<(Directive, Vec<Directive>)> = Vec::new();
    let mut done: Vec<Directive> = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut first_line = 0;
    for (token, line) in tokens {
        match token {
            Token::Word(word) => {
                if words.is_empty() {
                    first_line = line;
                }
                words.push(word);
            }
            Token::Semicolon | Token::Open => {
                if words.is_empty() {
                    return Err(problem(
                        line,
                        format!(
                            "unexpected \"{}\"",
                            if token == Token::Open { "{" } else { ";" }
                        ),
                    ));
                }
                let mut args = std::mem::take(&mut words);
                let directive = Directive {
                    name: args.remove(0),
                    args,
                    origin: Origin {
                        file: file.to_path_buf(),
                        line: first_line,
                    },
                    block: None,
                };
                if token == Token::Open {
                    stack.push((directive, Vec::new()));
                } else {
                    match stack.last_mut() {
                        Some((_, children)) => children.push(directive),
                        None => done.push(directive),
                    }
                }
            }
            Token::Close => {
                if !words.is_empty() {
                    return Err(problem(
                        line,
                        format!("\"{}\" is not terminated by \";\"", quoted(&words[0])),
                    ));
                }
                let Some((mut directive, children)) = stack.pop() else {
                    return Err(problem(line, "unexpected \"}\"".into()));
                };
                directive.block = Some(children);
                match stack.last_mut() {
                    Some((_, siblings)) => siblings.push(directive),
                    None => done.push(directive),
                }
            }
        }
    }
    if let Some((open, _)) = stack.last() {
        return Err(problem(
            open.origin.line,
            format!(
                "\"{}\" block is not closed (unexpected end of file, expecting \"}}\")",
                quoted(&open.name)
            ),
        ));
    }
    if let Some(word) = words.first() {
        return Err(problem(
            first_line,
            format!(
                "\"{}\" is not terminated by \";\" (unexpected end of file)",
                quoted(word)
            ),
        ));
    }
    Ok(done)
}

/// Parse `main` and every file it includes, includes spliced in place.
pub fn load(files: &dyn Files, main: &Path) -> (Vec<Directive>, Vec<Problem>) {
    let conf_prefix = main.parent().unwrap_or(Path::new("/")).to_path_buf();
    let mut problems = Vec::new();
    let files = Budgeted {
        files,
        reads: Cell::new(0),
        bytes: Cell::new(0),
        exhausted: Cell::new(false),
    };
    let directives = load_file(&files, main, &conf_prefix, 0, &mut problems);
    (directives, problems)
}

fn load_file(
    files: &dyn Files,
    path: &Path,
    conf_prefix: &Path,
    depth: usize,
    problems: &mut Vec<Problem>,
) -> Vec<Directive> {
    let text = match files.read(path) {
        Ok(text) => text,
        Err(err) => {
            problems.push(Problem {
                file: path.to_path_buf(),
                reason: format!("cannot read it: {err}"),
            });
            return Vec::new();
        }
    };
    match parse(&text, path) {
        Ok(directives) => splice_includes(files, directives, conf_prefix, depth, problems),
        Err(problem) => {
            problems.push(problem);
            Vec::new()
        }
    }
}

fn splice_includes(
    files: &dyn Files,
    directives: Vec<Directive>,
    conf_prefix: &Path,
    depth: usize,
    problems: &mut Vec<Problem>,
) -> Vec<Directive> {
    let mut out = Vec::with_capacity(directives.len());
    for mut directive in directives {
        if directive.name == "include" && directive.block.is_none() {
            let Some(pattern) = directive.args.first() else {
                continue;
            };
            if depth >= MAX_INCLUDE_DEPTH {
                let problem = Problem {
                    file: directive.origin.file.clone(),
                    reason: format!(
                        "line {}: includes nested more than {MAX_INCLUDE_DEPTH} deep (a loop?)",
                        directive.origin.line
                    ),
                };
                // A loop meets the same include again and again: say it once.
                if !problems.contains(&problem) {
                    problems.push(problem);
                }
                continue;
            }
            let pattern = conf_prefix.join(pattern);
            let is_glob = pattern
                .to_str()
                .is_some_and(|p| p.contains(['*', '?', '[']));
            let paths = if is_glob {
                files.expand(&pattern)
            } else {
                vec![pattern]
            };
            for path in paths {
                if files.exhausted() {
                    break;
                }
                out.extend(load_file(files, &path, conf_prefix, depth + 1, problems));
            }
            continue;
        }
        if let Some(block) = directive.block.take() {
            directive.block = Some(splice_includes(files, block, conf_prefix, depth, problems));
        }
        out.push(directive);
    }
    out
}

/// A `listen` directive of an http or stream server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Listen {
    /// As written: "80", "127.0.0.1:8080", "[::]:443", "unix:/run/x.sock".
    pub address: String,
    pub backlog: Setting<u32>,
}

impl Listen {
    /// The TCP port this listen directive binds, if it is a TCP one.
    pub fn port(&self) -> Option<u16> {
        if self.address.starts_with("unix:") {
            return None;
        }
        // "[::]:443" and "127.0.0.1:80" end in their port; "80" is one.
        let port = self
            .address
            .rsplit_once(':')
            .map_or(self.address.as_str(), |(_, port)| port);
        port.parse().ok().or_else(|| {
            // "listen localhost;" or "listen 127.0.0.1;": port 80.
            (!self.address.chars().all(|c| c.is_ascii_digit())).then_some(80)
        })
    }

    pub fn unix_path(&self) -> Option<&Path> {
        self.address.strip_prefix("unix:").map(Path::new)
    }
}

/// Where nginx sends requests: a `*_pass` target, expanded through
/// `upstream` blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UpstreamTarget {
    /// "uwsgi_pass", "proxy_pass", "fastcgi_pass", ...
    pub directive: String,
    /// "unix:/run/app.sock" or "127.0.0.1:3031".
    pub server: String,
    pub origin: Origin,
    /// `keepalive N` of the upstream block (connections kept for reuse).
    pub keepalive: Option<u32>,
}

/// What droptrace needs to know of an nginx configuration.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NginxConfig {
    pub main_file: PathBuf,
    /// "the files on disk", or "nothing" when they could not be read.
    pub method: String,
    /// "auto" or a number.
    pub worker_processes: Setting<String>,
    pub worker_connections: Setting<u32>,
    pub worker_rlimit_nofile: Option<Setting<u64>>,
    pub listens: Vec<Listen>,
    pub upstreams: Vec<UpstreamTarget>,
    /// `error_log` files (not stderr, syslog or memory).
    pub error_logs: Vec<PathBuf>,
    pub problems: Vec<Problem>,
}

const PASS_DIRECTIVES: &[&str] = &[
    "uwsgi_pass",
    "proxy_pass",
    "fastcgi_pass",
    "scgi_pass",
    "grpc_pass",
    "memcached_pass",
];

fn all<'a>(directives: &'a [Directive], out: &mut Vec<&'a Directive>) {
    for directive in directives {
        out.push(directive);
        if let Some(block) = &directive.block {
            all(block, out);
        }
    }
}

impl NginxConfig {
    /// Read what matters from parsed directives. `prefix` resolves relative
    /// log paths, as nginx does.
    pub fn from_directives(
        directives: &[Directive],
        main_file: PathBuf,
        method: &'static str,
        prefix: &Path,
        problems: Vec<Problem>,
    ) -> Self {
        let mut config = Self {
            main_file,
            method: method.into(),
            worker_processes: Setting::default_value(
                "1".into(),
                "nginx default (1), no worker_processes set",
            ),
            worker_connections: Setting::default_value(
                DEFAULT_WORKER_CONNECTIONS,
                format!("nginx default ({DEFAULT_WORKER_CONNECTIONS}), no worker_connections set"),
            ),
            worker_rlimit_nofile: None,
            listens: Vec::new(),
            upstreams: Vec::new(),
            error_logs: Vec::new(),
            problems,
        };
        let mut every = Vec::new();
        all(directives, &mut every);
        let upstream_blocks: Vec<&Directive> = every
            .iter()
            .copied()
            .filter(|d| d.name == "upstream" && d.block.is_some())
            .collect();
        for directive in every {
            let arg = directive.args.first().map(String::as_str).unwrap_or("");
            let at = &directive.origin;
            match directive.name.as_str() {
                "worker_processes" => {
                    config.worker_processes =
                        Setting::configured(arg.into(), format!("worker_processes {arg} at {at}"))
                }
                "worker_connections" => match arg.parse() {
                    Ok(n) => {
                        config.worker_connections =
                            Setting::configured(n, format!("worker_connections {n} at {at}"))
                    }
                    Err(_) => config.problems.push(bad_number(directive)),
                },
                "worker_rlimit_nofile" => match arg.parse() {
                    Ok(n) => {
                        config.worker_rlimit_nofile = Some(Setting::configured(
                            n,
                            format!("worker_rlimit_nofile {n} at {at}"),
                        ))
                    }
                    Err(_) => config.problems.push(bad_number(directive)),
                },
                "listen" => config.listens.push(listen_of(directive)),
                "error_log" if !arg.is_empty() => {
                    let special = ["stderr", "syslog:", "memory:"]
                        .iter()
                        .any(|s| arg.starts_with(s));
                    if !special {
                        config.error_logs.push(prefix.join(arg));
                    }
                }
                name if PASS_DIRECTIVES.contains(&name) && !arg.is_empty() => {
                    config
                        .upstreams
                        .extend(targets_of(directive, arg, &upstream_blocks));
                }
                _ => {}
            }
        }
        config.error_logs.dedup();
        // A file included many times repeats its problems: each is said once.
        let mut seen = std::collections::HashSet::new();
        config
            .problems
            .retain(|p| seen.insert((p.file.clone(), p.reason.clone())));
        config
    }

    /// The configured backlog of the listen directive for a TCP port or a
    /// UNIX path.
    pub fn listen_backlog(&self, port: Option<u16>, path: Option<&Path>) -> Option<&Setting<u32>> {
        self.listens
            .iter()
            .find(|l| {
                (port.is_some() && l.port() == port) || (path.is_some() && l.unix_path() == path)
            })
            .map(|l| &l.backlog)
    }
}

fn bad_number(directive: &Directive) -> Problem {
    Problem {
        file: directive.origin.file.clone(),
        reason: format!(
            "line {}: \"{}\" has no valid number ({:?}); using nginx's default",
            directive.origin.line, directive.name, directive.args
        ),
    }
}

fn listen_of(directive: &Directive) -> Listen {
    let address = directive.args.first().cloned().unwrap_or_default();
    let configured = directive
        .args
        .iter()
        .find_map(|a| a.strip_prefix("backlog=")?.parse::<u32>().ok());
    let backlog = match configured {
        Some(n) => Setting::configured(n, format!("listen {address} backlog={n} at {}", directive.origin)),
        None => Setting::default_value(
            DEFAULT_LISTEN_BACKLOG,
            format!("listen {address} at {} has no backlog=, nginx's default is {DEFAULT_LISTEN_BACKLOG}", directive.origin),
        ),
    };
    Listen { address, backlog }
}

/// "unix:/run/app.sock", "http://unix:/run/a.sock:/uri", "http://backend/",
/// "127.0.0.1:3031" -> servers, through upstream blocks by name.
fn targets_of(directive: &Directive, arg: &str, upstreams: &[&Directive]) -> Vec<UpstreamTarget> {
    let without_scheme = arg.split_once("://").map_or(arg, |(_, rest)| rest);
    let server = match without_scheme.strip_prefix("unix:") {
        // proxy_pass http://unix:/path:/uri
        Some(path) => format!("unix:{}", path.split_once(':').map_or(path, |(p, _)| p)),
        None => without_scheme.split('/').next().unwrap_or("").to_string(),
    };
    let target = |server: String, keepalive| UpstreamTarget {
        directive: directive.name.clone(),
        server,
        origin: directive.origin.clone(),
        keepalive,
    };
    let block = upstreams
        .iter()
        .find(|u| u.args.first().map(String::as_str) == Some(server.as_str()));
    match block.and_then(|u| u.block.as_ref()) {
        Some(children) => {
            let keepalive = children
                .iter()
                .find(|d| d.name == "keepalive")
                .and_then(|d| d.args.first()?.parse().ok());
            children
                .iter()
                .filter(|d| d.name == "server")
                .filter_map(|d| d.args.first())
                .map(|s| target(s.clone(), keepalive))
                .collect()
        }
        None => vec![target(server, None)],
    }
}

/// How an nginx master was started: its -p, -c, -g and -e.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandLine {
    pub prefix: Option<String>,
    pub conf: Option<String>,
    pub globals: Option<String>,
    pub error_log: Option<String>,
}

impl CommandLine {
    /// nginx rewrites its title to "nginx: master process ARGV..." (one
    /// string); an unrewritten command line arrives as separate arguments.
    pub fn parse(cmdline: &[String]) -> Self {
        let from_title = cmdline.len() == 1;
        let words: Vec<String> = match cmdline {
            [title] => title
                .split_once("master process ")
                .map_or(title.as_str(), |(_, argv)| argv)
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            args => args.to_vec(),
        };
        let mut parsed = Self::default();
        let mut words = words.iter().skip(1);
        while let Some(word) = words.next() {
            let Some(flag) = word.strip_prefix('-') else {
                continue;
            };
            let mut chars = flag.chars();
            let Some(letter) = chars.next() else { continue };
            let rest = chars.as_str();
            let mut value = || {
                if rest.is_empty() {
                    words.next().cloned()
                } else {
                    Some(rest.to_string())
                }
            };
            match letter {
                'p' => parsed.prefix = value(),
                'c' => parsed.conf = value(),
                // A title lost the quotes: "-g daemon off; pid x;" runs
                // to the next flag.
                'g' if from_title && rest.is_empty() => {
                    let mut globals = Vec::new();
                    while let Some(next) = words.clone().next().filter(|w| !w.starts_with('-')) {
                        globals.push(next.clone());
                        words.next();
                    }
                    parsed.globals = Some(globals.join(" "));
                }
                'g' => parsed.globals = value(),
                'e' => parsed.error_log = value(),
                _ => {}
            }
        }
        parsed
    }
}

/// The defaults compiled into an nginx binary: the paths `nginx -V` would
/// print, read from the binary's own bytes (nginx embeds its configure
/// arguments as one string).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildDefaults {
    pub prefix: Option<String>,
    pub conf_path: Option<String>,
}

impl BuildDefaults {
    const MARKER: &'static [u8] = b"configure arguments:";
    /// No nginx binary is near this size; a larger file is not scanned further.
    const MAX_SCAN: u64 = 256 << 20;
    /// The configure arguments are a few KiB.
    const MAX_ARGUMENTS: usize = 64 << 10;

    pub fn parse(configure_arguments: &str) -> Self {
        let option = |name: &str| {
            configure_arguments
                .split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_owned)
        };
        Self {
            prefix: option("--prefix="),
            conf_path: option("--conf-path="),
        }
    }

    /// The configure arguments in a binary, if it has them.
    pub fn of_binary(binary: impl Read) -> io::Result<Option<Self>> {
        let mut binary = binary.take(Self::MAX_SCAN);
        let mut window: Vec<u8> = Vec::new();
        let mut chunk = vec![0; 1 << 20];
        let marker = memchr::memmem::Finder::new(Self::MARKER);
        let at = loop {
            let n = binary.read(&mut chunk)?;
            if n == 0 {
                return Ok(None);
            }
            window.extend_from_slice(&chunk[..n]);
            if let Some(at) = marker.find(&window) {
                break at;
            }
            // Keep what could be the start of a marker cut in two.
            window.drain(..window.len() - (Self::MARKER.len() - 1).min(window.len()));
        };
        window.drain(..at);
        let ends = |w: &[u8]| w.iter().position(|&b| b == 0 || b == b'\n');
        while ends(&window).is_none() && window.len() < Self::MAX_ARGUMENTS {
            let n = binary.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            window.extend_from_slice(&chunk[..n]);
        }
        let end = ends(&window)
            .unwrap_or(window.len())
            .min(Self::MAX_ARGUMENTS);
        Ok(Some(Self::parse(&String::from_utf8_lossy(&window[..end]))))
    }
}

/// The configuration the nginx master `pid` runs with, read as that master
/// could read it, within `deadline`. `cwd` is its working directory
/// (relative -p and -c start there).
pub fn of_master(pid: u32, cmdline: &[String], cwd: &Path, deadline: Duration) -> NginxConfig {
    let args = CommandLine::parse(cmdline);
    let guessed_conf = cwd.join(args.conf.as_deref().unwrap_or("/etc/nginx/nginx.conf"));
    let unread = |reason: String| {
        NginxConfig::from_directives(
            &[],
            guessed_conf.clone(),
            "nothing",
            cwd,
            vec![Problem {
                file: guessed_conf.clone(),
                reason,
            }],
        )
    };
    // Located before the thread takes the master's identity: /proc/PID/exe
    // of a process that is not dumpable opens for root only.
    let exe = match files::Located::exe_of(pid) {
        Ok(exe) => exe,
        Err(err) => return unread(format!("cannot see the process's files: {err}")),
    };
    let cwd = cwd.to_path_buf();
    files::as_process_of(pid, deadline, move |view| {
        read_config(view, &exe, &args, &cwd)
    })
    .unwrap_or_else(unread)
}

/// Read as the master (on a thread with its credentials).
fn read_config(view: View, exe: &files::Located, args: &CommandLine, cwd: &Path) -> NginxConfig {
    let mut problems = Vec::new();
    let built = exe
        .open()
        .and_then(BuildDefaults::of_binary)
        .unwrap_or_else(|err| {
            problems.push(Problem {
                file: PathBuf::from("the nginx binary"),
                reason: format!("cannot read its compiled-in paths ({err}); assuming Debian's"),
            });
            None
        });
    // Without configure arguments, Debian's paths; with them, nginx's own
    // defaults for what they leave out.
    let (default_prefix, default_conf) = match built {
        Some(built) => (
            built.prefix.unwrap_or_else(|| "/usr/local/nginx".into()),
            built.conf_path.unwrap_or_else(|| "conf/nginx.conf".into()),
        ),
        None => ("/usr/share/nginx".into(), "/etc/nginx/nginx.conf".into()),
    };
    let prefix = cwd.join(args.prefix.clone().unwrap_or(default_prefix));
    let conf = prefix.join(args.conf.clone().unwrap_or(default_conf));
    let (mut directives, more) = load(&Disk { view }, &conf);
    problems.extend(more);
    // -g directives apply as if written at the top of the main file.
    if let Some(globals) = &args.globals {
        match parse(globals, Path::new("-g on the command line")) {
            Ok(global) => directives.extend(global),
            Err(problem) => problems.push(problem),
        }
    }
    let mut config =
        NginxConfig::from_directives(&directives, conf, "the files on disk", &prefix, problems);
    // Without an error_log directive, -e (or the built-in path) is the log.
    if config.error_logs.is_empty() {
        if let Some(log) = args.error_log.clone().filter(|log| log != "stderr") {
            config.error_logs.push(prefix.join(log));
        }
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files held in memory, by path.
    struct Memory {
        files: std::collections::BTreeMap<PathBuf, String>,
    }

    impl Files for Memory {
        fn read(&self, path: &Path) -> io::Result<String> {
            self.files
                .get(path)
                .cloned()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))
        }

        fn expand(&self, pattern: &Path) -> Vec<PathBuf> {
            let Some(pattern) = pattern.to_str().and_then(|p| glob::Pattern::new(p).ok()) else {
                return Vec::new();
            };
            // BTreeMap keys come sorted.
            self.files
                .keys()
                .filter(|path| pattern.matches_path(path))
                .cloned()
                .collect()
        }
    }

    fn dump(files: &[(&str, &str)]) -> Memory {
        Memory {
            files: files
                .iter()
                .map(|(p, t)| (PathBuf::from(p), t.to_string()))
                .collect(),
        }
    }

    fn config_of(files: &[(&str, &str)]) -> NginxConfig {
        let files = dump(files);
        let main = Path::new("/etc/nginx/nginx.conf");
        let (directives, problems) = load(&files, main);
        NginxConfig::from_directives(
            &directives,
            main.into(),
            "test",
            Path::new("/usr/share/nginx"),
            problems,
        )
    }

    const REAL_WORLD: &str = r#"
user www-data;
worker_processes  auto ;   # one per core
worker_rlimit_nofile 65535;
error_log /var/log/nginx/error.log warn;
include /etc/nginx/modules-enabled/*.conf;

events {
	worker_connections 4096;   # per worker
	# worker_connections 1;
}

http {
	log_format main '$remote_addr "$request" ${status}';
	include /etc/nginx/conf.d/*.conf;
	upstream app {
		server unix:/run/app.sock;
		server 127.0.0.1:3031 weight=2;
		keepalive 16;
	}
}
"#;

    #[test]
    fn a_real_world_config_with_includes_comments_and_quotes() {
        let config = config_of(&[
            ("/etc/nginx/nginx.conf", REAL_WORLD),
            ("/etc/nginx/modules-enabled/50-mod.conf", "load_module modules/x.so;\n"),
            (
                "/etc/nginx/conf.d/site.conf",
                "server {\n  listen 80 default_server backlog=4096;\n  listen [::]:8080;\n  location / { uwsgi_pass app; }\n  location /api { proxy_pass http://unix:/run/api.sock:/v1; }\n  location /x { 'uwsgi_pass' \"127.0.0.1:9000\"; }\n}\n",
            ),
        ]);
        assert!(config.problems.is_empty(), "{:?}", config.problems);
        assert_eq!(config.worker_processes.value, "auto");
        assert_eq!(
            config.worker_connections,
            Setting::configured(4096, "worker_connections 4096 at /etc/nginx/nginx.conf:9")
        );
        assert_eq!(config.worker_rlimit_nofile.as_ref().unwrap().value, 65535);
        assert_eq!(
            config.error_logs,
            vec![PathBuf::from("/var/log/nginx/error.log")]
        );
        let listens: Vec<(&str, Option<u16>, u32, bool)> = config
            .listens
            .iter()
            .map(|l| {
                (
                    l.address.as_str(),
                    l.port(),
                    l.backlog.value,
                    l.backlog.is_default,
                )
            })
            .collect();
        assert_eq!(
            listens,
            vec![
                ("80", Some(80), 4096, false),
                ("[::]:8080", Some(8080), 511, true)
            ]
        );
        assert_eq!(
            config.listen_backlog(Some(80), None).unwrap().source,
            "listen 80 backlog=4096 at /etc/nginx/conf.d/site.conf:2"
        );
        let servers: Vec<(&str, &str, Option<u32>)> = config
            .upstreams
            .iter()
            .map(|u| (u.directive.as_str(), u.server.as_str(), u.keepalive))
            .collect();
        assert_eq!(
            servers,
            vec![
                ("uwsgi_pass", "unix:/run/app.sock", Some(16)),
                ("uwsgi_pass", "127.0.0.1:3031", Some(16)),
                ("proxy_pass", "unix:/run/api.sock", None),
                ("uwsgi_pass", "127.0.0.1:9000", None),
            ]
        );
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let config = config_of(&[(
            "/etc/nginx/nginx.conf",
            "events {}\nhttp { server { listen 127.0.0.1:18080; } }\n",
        )]);
        assert!(config.worker_connections.is_default);
        assert_eq!(config.worker_connections.value, 512);
        assert_eq!(config.worker_rlimit_nofile, None);
        assert_eq!(config.listens[0].port(), Some(18080));
        assert_eq!(config.listens[0].backlog.value, 511);
        assert!(
            config.listens[0].backlog.source.contains("has no backlog="),
            "{}",
            config.listens[0].backlog.source
        );
    }

    #[test]
    fn relative_includes_resolve_against_the_main_files_directory() {
        let config = config_of(&[
            ("/etc/nginx/nginx.conf", "include events.conf;\n"),
            (
                "/etc/nginx/events.conf",
                "events { worker_connections 64; }\n",
            ),
        ]);
        assert_eq!(config.worker_connections.value, 64);
        assert!(config
            .worker_connections
            .source
            .ends_with("/etc/nginx/events.conf:1"));
    }

    #[test]
    fn broken_files_are_problems_not_crashes() {
        for (text, expected) in [
            (
                "events { worker_connections 64;\n",
                "line 1: \"events\" block is not closed",
            ),
            (
                "worker_processes 2\n",
                "\"worker_processes\" is not terminated by \";\"",
            ),
            ("}\n", "unexpected \"}\""),
            ("error_log \"/var/log/x;\n", "unterminated"),
            ("events { worker_connections 64 }", "not terminated"),
        ] {
            let config = config_of(&[("/etc/nginx/nginx.conf", text)]);
            assert_eq!(config.problems.len(), 1, "{text}");
            assert!(
                config.problems[0].reason.contains(expected),
                "{text}: {}",
                config.problems[0]
            );
            assert!(config.worker_connections.is_default);
        }
        let config = config_of(&[(
            "/etc/nginx/nginx.conf",
            "events { worker_connections lots; }\ninclude missing.conf;\n",
        )]);
        let reasons: Vec<String> = config.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        // Unreadable files are found while loading, bad values after.
        assert!(
            reasons[0].starts_with("/etc/nginx/missing.conf: cannot read it"),
            "{reasons:?}"
        );
        assert!(reasons[1].contains("no valid number"), "{reasons:?}");
    }

    #[test]
    fn include_loops_stop() {
        let config = config_of(&[("/etc/nginx/nginx.conf", "include nginx.conf;\n")]);
        assert!(
            config
                .problems
                .iter()
                .any(|p| p.reason.contains("nested more than")),
            "{:?}",
            config.problems
        );
    }

    #[test]
    fn files_on_disk_through_a_root() {
        let root = std::env::temp_dir().join(format!("droptrace-nginx-{}", std::process::id()));
        std::fs::create_dir_all(root.join("etc/nginx/sites")).unwrap();
        std::fs::write(root.join("etc/nginx/nginx.conf"), "include sites/*.conf;\n").unwrap();
        std::fs::write(root.join("etc/nginx/sites/b.conf"), "worker_processes 2;\n").unwrap();
        std::fs::write(root.join("etc/nginx/sites/a.conf"), "worker_processes 1;\n").unwrap();
        let (directives, problems) = load(
            &Disk {
                view: View::at(&root).unwrap(),
            },
            Path::new("/etc/nginx/nginx.conf"),
        );
        assert!(problems.is_empty(), "{problems:?}");
        // Sorted like nginx's glob: a.conf first, b.conf last (and wins).
        let files: Vec<String> = directives.iter().map(|d| d.origin.to_string()).collect();
        assert_eq!(
            files,
            ["/etc/nginx/sites/a.conf:1", "/etc/nginx/sites/b.conf:1"]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn master_command_lines() {
        let title = vec!["nginx: master process /usr/sbin/nginx -p /tmp/t -c /tmp/t/nginx.conf -e /tmp/t/error.log -g daemon off;".to_string()];
        let parsed = CommandLine::parse(&title);
        assert_eq!(parsed.prefix.as_deref(), Some("/tmp/t"));
        assert_eq!(parsed.conf.as_deref(), Some("/tmp/t/nginx.conf"));
        assert_eq!(parsed.error_log.as_deref(), Some("/tmp/t/error.log"));
        assert_eq!(parsed.globals.as_deref(), Some("daemon off;"));
        let argv: Vec<String> = ["nginx", "-cconf/n.conf"].map(String::from).to_vec();
        assert_eq!(
            CommandLine::parse(&argv).conf.as_deref(),
            Some("conf/n.conf")
        );
    }

    #[test]
    fn compiled_in_paths_come_from_the_binary_bytes() {
        let arguments = b"configure arguments: --with-cc-opt=x --prefix=/usr/share/nginx --conf-path=/etc/nginx/nginx.conf --error-log-path=stderr\n\0more";
        // The marker cut across two 1 MiB reads, far into the file.
        let mut binary = vec![0x7f; (1 << 20) - 7];
        binary.extend_from_slice(arguments);
        let defaults = BuildDefaults::of_binary(&binary[..]).unwrap().unwrap();
        assert_eq!(defaults.prefix.as_deref(), Some("/usr/share/nginx"));
        assert_eq!(defaults.conf_path.as_deref(), Some("/etc/nginx/nginx.conf"));
        assert_eq!(BuildDefaults::of_binary(&[0u8; 4096][..]).unwrap(), None);
        // Debian's own binary, when this machine has it.
        if let Ok(nginx) = std::fs::File::open("/usr/sbin/nginx") {
            let defaults = BuildDefaults::of_binary(nginx).unwrap().unwrap();
            assert_eq!(defaults.conf_path.as_deref(), Some("/etc/nginx/nginx.conf"));
        }
    }

    #[test]
    fn an_include_fan_out_is_bounded() {
        // Each file includes the next twice: 2^16 reads without a budget.
        let mut files = Vec::new();
        for n in 0..16 {
            files.push((
                format!("/etc/nginx/{n}.conf"),
                format!("include {}.conf;\ninclude {}.conf;\n", n + 1, n + 1),
            ));
        }
        files.push(("/etc/nginx/16.conf".into(), "worker_processes 2;\n".into()));
        let files: Vec<(&str, &str)> = files
            .iter()
            .map(|(p, t)| (p.as_str(), t.as_str()))
            .collect();
        let (directives, problems) = load(&dump(&files), Path::new("/etc/nginx/0.conf"));
        assert!(directives.len() < MAX_FILES, "{}", directives.len());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].reason.contains("more than 1000 files"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_problem_quotes_a_word_cut_short() {
        let secret = "x".repeat(500);
        let problem = parse(&secret, Path::new("/etc/shadow")).unwrap_err();
        assert!(
            problem
                .reason
                .contains(&format!("\"{}...\"", "x".repeat(MAX_QUOTED))),
            "{}",
            problem.reason
        );
        assert!(!problem.reason.contains(&"x".repeat(MAX_QUOTED + 1)));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

        /// Any text, includes of itself included: directives or a problem,
        /// never a panic, and a bounded number of files read.
        #[test]
        fn any_text_is_read_without_a_panic(
            text in "(include n\\.conf;|include \\*;|events|http|server|listen|worker_connections|[0-9a-z{};#'\"\\\\$ \n]){0,80}",
        ) {
            let files = dump(&[("/etc/nginx/n.conf", &text), ("/etc/nginx/m.conf", &text)]);
            let (directives, problems) = load(&files, Path::new("/etc/nginx/n.conf"));
            let config = NginxConfig::from_directives(
                &directives,
                "/etc/nginx/n.conf".into(),
                "test",
                Path::new("/usr/share/nginx"),
                problems,
            );
            let mut seen = std::collections::HashSet::new();
            proptest::prop_assert!(config.problems.iter().all(|p| seen.insert(p.to_string())));
        }
    }
}
