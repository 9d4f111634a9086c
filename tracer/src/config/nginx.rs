//! nginx's configuration, as the running master uses it.
//!
//! The most faithful source is `nginx -T` run with the master's own `-p`,
//! `-c` and `-g`: nginx itself resolves the includes and prints every file
//! it read. When that is not possible (another mount namespace, a config
//! that no longer tests clean) the files are read from disk, through the
//! process's root, following `include`s the way nginx does.
use std::{
    collections::BTreeMap,
    io::{self, Read},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{Origin, Problem, Setting};

/// nginx's defaults (ngx_event.c, ngx_http_core_module.c on Linux).
pub const DEFAULT_WORKER_CONNECTIONS: u32 = 512;
pub const DEFAULT_LISTEN_BACKLOG: u32 = 511;
/// Includes nested deeper than this are a loop.
const MAX_INCLUDE_DEPTH: usize = 16;
/// `nginx -T` normally answers in milliseconds; it may hang resolving
/// upstream host names.
const DUMP_TIMEOUT: Duration = Duration::from_secs(5);

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
}

/// Files on disk, seen through a process's root directory.
pub struct Disk {
    pub root: PathBuf,
}

impl Disk {
    fn real(&self, path: &Path) -> PathBuf {
        super::under_root(&self.root, path)
    }
}

impl Files for Disk {
    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(self.real(path))
    }

    fn expand(&self, pattern: &Path) -> Vec<PathBuf> {
        let Some(real) = self.real(pattern).to_str().map(str::to_owned) else {
            return Vec::new();
        };
        let mut paths: Vec<PathBuf> = glob::glob(&real)
            .map(|paths| paths.flatten().collect())
            .unwrap_or_default();
        paths.sort();
        paths
            .into_iter()
            .filter_map(|p| Some(Path::new("/").join(p.strip_prefix(&self.root).ok()?)))
            .collect()
    }
}

/// The files `nginx -T` printed, each after a `# configuration file PATH:` line.
#[derive(Debug, Default)]
pub struct Dump {
    files: BTreeMap<PathBuf, String>,
}

impl Dump {
    pub fn parse(text: &str) -> Self {
        let mut files = BTreeMap::new();
        let mut current: Option<(PathBuf, String)> = None;
        for line in text.split_inclusive('\n') {
            let header = line
                .trim_end()
                .strip_prefix("# configuration file ")
                .and_then(|rest| rest.strip_suffix(':'));
            if let Some(path) = header {
                files.extend(current.take());
                current = Some((PathBuf::from(path), String::new()));
            } else if let Some((_, text)) = current.as_mut() {
                text.push_str(line);
            }
        }
        files.extend(current);
        Self { files }
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

impl Files for Dump {
    fn read(&self, path: &Path) -> io::Result<String> {
        self.files
            .get(path)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not in nginx -T's output"))
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
                        format!("\"{}\" is not terminated by \";\"", words[0]),
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
                open.name
            ),
        ));
    }
    if let Some(word) = words.first() {
        return Err(problem(
            first_line,
            format!("\"{word}\" is not terminated by \";\" (unexpected end of file)"),
        ));
    }
    Ok(done)
}

/// Parse `main` and every file it includes, includes spliced in place.
pub fn load(files: &dyn Files, main: &Path) -> (Vec<Directive>, Vec<Problem>) {
    let conf_prefix = main.parent().unwrap_or(Path::new("/")).to_path_buf();
    let mut problems = Vec::new();
    let directives = load_file(files, main, &conf_prefix, 0, &mut problems);
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
                problems.push(Problem {
                    file: directive.origin.file.clone(),
                    reason: format!(
                        "line {}: includes nested more than {MAX_INCLUDE_DEPTH} deep (a loop?)",
                        directive.origin.line
                    ),
                });
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
    /// "nginx -T" or "the files on disk".
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

/// The defaults compiled into an nginx binary (`nginx -V`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildDefaults {
    pub prefix: Option<String>,
    pub conf_path: Option<String>,
}

impl BuildDefaults {
    pub fn parse(version_output: &str) -> Self {
        let option = |name: &str| {
            version_output
                .split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_owned)
        };
        Self {
            prefix: option("--prefix="),
            conf_path: option("--conf-path="),
        }
    }
}

/// Run a command with a time limit; its stdout, or why it failed.
fn run(command: &mut Command, limit: Duration) -> Result<String, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("cannot run it: {err}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s", limit.as_secs()));
            }
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if status.success() {
        // nginx -V prints to stderr; -T prints the files to stdout and its
        // "syntax is ok" lines to stderr, which are no part of any file.
        Ok(if stdout.is_empty() { stderr } else { stdout })
    } else {
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        Err(format!("{status}: {last}"))
    }
}

fn same_root(pid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &str| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    id(&format!("/proc/{pid}/root")).is_some() && id(&format!("/proc/{pid}/root")) == id("/")
}

/// The configuration the nginx master `pid` runs with.
/// `cwd` is its working directory (relative -p and -c start there).
pub fn of_master(pid: u32, cmdline: &[String], cwd: &Path) -> NginxConfig {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let exe = proc.join("exe");
    let args = CommandLine::parse(cmdline);
    let defaults = run(Command::new(&exe).arg("-V"), DUMP_TIMEOUT)
        .map(|text| BuildDefaults::parse(&text))
        .unwrap_or_default();
    let prefix = cwd.join(
        args.prefix
            .clone()
            .or(defaults.prefix)
            .unwrap_or_else(|| "/usr/share/nginx".into()),
    );
    let conf = prefix.join(
        args.conf
            .clone()
            .or(defaults.conf_path)
            .unwrap_or_else(|| "/etc/nginx/nginx.conf".into()),
    );
    let mut config = read_config(pid, &exe, &args, &prefix, &conf);
    // Without an error_log directive, -e (or the built-in path) is the log.
    if config.error_logs.is_empty() {
        if let Some(log) = args.error_log.filter(|log| log != "stderr") {
            config.error_logs.push(prefix.join(log));
        }
    }
    config
}

/// Through `nginx -T` when the master shares our root, else from disk.
fn read_config(
    pid: u32,
    exe: &Path,
    args: &CommandLine,
    prefix: &Path,
    conf: &Path,
) -> NginxConfig {
    let mut problems = Vec::new();
    if same_root(pid) {
        let mut dump = Command::new(exe);
        dump.arg("-T").arg("-p").arg(prefix).arg("-c").arg(conf);
        if let Some(globals) = &args.globals {
            dump.arg("-g").arg(globals);
        }
        let why = match run(&mut dump, DUMP_TIMEOUT).map(|text| Dump::parse(&text)) {
            Ok(files) if !files.is_empty() => {
                let (directives, problems) = load(&files, conf);
                return NginxConfig::from_directives(
                    &directives,
                    conf.into(),
                    "nginx -T",
                    prefix,
                    problems,
                );
            }
            Ok(_) => "nginx -T printed no configuration".to_string(),
            Err(reason) => format!("nginx -T failed ({reason})"),
        };
        problems.push(Problem {
            file: conf.into(),
            reason: format!("{why}; reading the files instead"),
        });
    }
    let disk = Disk {
        root: PathBuf::from(format!("/proc/{pid}/root")),
    };
    let (directives, more) = load(&disk, conf);
    problems.extend(more);
    NginxConfig::from_directives(
        &directives,
        conf.into(),
        "the files on disk",
        prefix,
        problems,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump(files: &[(&str, &str)]) -> Dump {
        Dump {
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
    fn nginx_dash_t_output_splits_into_files() {
        let text = "# configuration file /etc/nginx/nginx.conf:\nevents {}\ninclude /etc/nginx/a.conf;\n\n# configuration file /etc/nginx/a.conf:\n# a comment\nworker_rlimit_nofile 64;\n";
        let files = Dump::parse(text);
        assert_eq!(
            files.read(Path::new("/etc/nginx/a.conf")).unwrap(),
            "# a comment\nworker_rlimit_nofile 64;\n"
        );
        let (directives, problems) = load(&files, Path::new("/etc/nginx/nginx.conf"));
        assert!(problems.is_empty());
        let names: Vec<&str> = directives.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["events", "worker_rlimit_nofile"]);
        assert_eq!(directives[1].origin.to_string(), "/etc/nginx/a.conf:2");
    }

    #[test]
    fn files_on_disk_through_a_root() {
        let root = std::env::temp_dir().join(format!("droptrace-nginx-{}", std::process::id()));
        std::fs::create_dir_all(root.join("etc/nginx/sites")).unwrap();
        std::fs::write(root.join("etc/nginx/nginx.conf"), "include sites/*.conf;\n").unwrap();
        std::fs::write(root.join("etc/nginx/sites/b.conf"), "worker_processes 2;\n").unwrap();
        std::fs::write(root.join("etc/nginx/sites/a.conf"), "worker_processes 1;\n").unwrap();
        let (directives, problems) = load(
            &Disk { root: root.clone() },
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
        let defaults = BuildDefaults::parse("nginx version: nginx/1.22.1\nconfigure arguments: --with-cc-opt=x --prefix=/usr/share/nginx --conf-path=/etc/nginx/nginx.conf --error-log-path=stderr");
        assert_eq!(defaults.prefix.as_deref(), Some("/usr/share/nginx"));
        assert_eq!(defaults.conf_path.as_deref(), Some("/etc/nginx/nginx.conf"));
    }
}
