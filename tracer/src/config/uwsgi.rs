//! uWSGI's options that decide how connections queue: `listen`, the
//! sockets, `processes` and `max-fd`, from its command line and the config
//! files it names (ini, yaml, xml, json).
//!
//! uWSGI applies options in order and the last one wins; a config file
//! counts at the place it appears on the command line (or in another file).
use std::path::{Path, PathBuf};

use super::{files::View, Problem, Setting};

/// The listen queue size uWSGI uses when none is configured.
pub const DEFAULT_LISTEN: u32 = 100;
/// Config files loading config files deeper than this are a loop.
const MAX_DEPTH: usize = 8;
/// A value after its placeholders are expanded is cut to this many bytes.
const MAX_VALUE: usize = 4096;
/// Bytes of expanded values kept for one file: `b = %(a)%(a)` doubles.
const MAX_EXPANDED: usize = 1 << 20;

/// What droptrace needs to know of a uWSGI instance's configuration.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct UwsgiConfig {
    pub listen: Setting<u32>,
    /// Every socket option: "/run/app.sock", "127.0.0.1:3031", ":8000".
    pub sockets: Vec<Setting<String>>,
    pub processes: Setting<u32>,
    pub max_fd: Option<Setting<u64>>,
    pub problems: Vec<Problem>,
}

impl Default for UwsgiConfig {
    fn default() -> Self {
        Self {
            listen: Setting::default_value(DEFAULT_LISTEN, "uWSGI default, no listen option set"),
            sockets: Vec::new(),
            processes: Setting::default_value(
                1,
                "uWSGI default (1 process), no processes option set",
            ),
            max_fd: None,
            problems: Vec::new(),
        }
    }
}

const SOCKET_OPTIONS: &[&str] = &[
    "socket",
    "uwsgi-socket",
    "http-socket",
    "https-socket",
    "fastcgi-socket",
    "scgi-socket",
    "shared-socket",
    "http",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Ini,
    Yaml,
    Xml,
    Json,
}

impl Format {
    /// uWSGI names a format the same way as an option (`--ini FILE`) and
    /// as a file extension (`app.ini`).
    fn named(name: &str) -> Option<Self> {
        match name {
            "ini" => Some(Self::Ini),
            "yaml" | "yml" => Some(Self::Yaml),
            "xml" => Some(Self::Xml),
            "json" | "js" => Some(Self::Json),
            _ => None,
        }
    }

    fn of_file(path: &str) -> Option<Self> {
        let path = path.split(':').next().unwrap_or(path);
        Self::named(Path::new(path).extension()?.to_str()?)
    }
}

/// Short command-line flags that take a value.
fn short_option(flag: &str) -> Option<&'static str> {
    match flag {
        "-l" => Some("listen"),
        "-s" => Some("socket"),
        "-p" => Some("processes"),
        "-d" => Some("daemonize"),
        "-x" => Some("xml"),
        "-y" => Some("yaml"),
        "-j" => Some("json"),
        _ => None,
    }
}

struct Reader<'a> {
    /// Files are read as the process sees them (see [`super::files`]).
    view: &'a View,
    config: UwsgiConfig,
}

impl Reader<'_> {
    fn apply(&mut self, key: &str, value: &str, source: String, base: &Path, depth: usize) {
        let key = key.trim().replace('_', "-");
        let value = value.trim().trim_matches('"');
        match key.as_str() {
            "listen" => match value.parse() {
                Ok(n) => self.config.listen = Setting::configured(n, source),
                Err(_) => self.bad_value(&source),
            },
            "processes" | "workers" => match value.parse() {
                Ok(n) => self.config.processes = Setting::configured(n, source),
                Err(_) => self.bad_value(&source),
            },
            "max-fd" => match value.parse() {
                Ok(n) => self.config.max_fd = Some(Setting::configured(n, source)),
                Err(_) => self.bad_value(&source),
            },
            key if SOCKET_OPTIONS.contains(&key) => self
                .config
                .sockets
                .push(Setting::configured(value.to_string(), source)),
            key => {
                if let Some(format) = Format::named(key) {
                    self.load(value, format, base, depth + 1);
                }
            }
        }
    }

    fn bad_value(&mut self, source: &str) {
        self.config.problems.push(Problem {
            file: PathBuf::from("uWSGI option"),
            reason: format!("{source}: not a number; ignored"),
        });
    }

    /// Load "file.ini" or "file.ini:section" relative to `base`.
    fn load(&mut self, spec: &str, format: Format, base: &Path, depth: usize) {
        let (file, section) = match spec.rsplit_once(':') {
            Some((file, section)) if !section.contains('/') => (file, section),
            _ => (spec, "uwsgi"),
        };
        let path = base.join(file);
        if depth > MAX_DEPTH {
            self.config.problems.push(Problem {
                file: path,
                reason: format!(
                    "config files nested more than {MAX_DEPTH} deep (a loop?); ignored"
                ),
            });
            return;
        }
        let text = match self.view.read(&path) {
            Ok(text) => text,
            Err(err) => {
                self.config.problems.push(Problem {
                    file: path,
                    reason: format!("cannot read it: {err}; its options are unknown"),
                });
                return;
            }
        };
        let options = match format {
            Format::Ini => Ok(ini_options(&text, section, &path)),
            Format::Yaml => Ok(yaml_options(&text, section)),
            Format::Xml => xml_options(&text, section),
            Format::Json => json_options(&text, section),
        };
        let options = match options {
            Ok(options) => options,
            Err(reason) => {
                self.config.problems.push(Problem { file: path, reason });
                return;
            }
        };
        let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        for (key, value, line) in options {
            let source = format!("{key} = {value} in {}:{line}", path.display());
            self.apply(&key, &value, source, &dir, depth);
        }
    }
}

/// The configuration of a uWSGI process started with `args` (argv without
/// argv0), relative paths resolved against `cwd`, files read through `view`.
pub fn read(args: &[String], cwd: &Path, view: &View) -> UwsgiConfig {
    let mut reader = Reader {
        view,
        config: UwsgiConfig::default(),
    };
    let mut args = args.iter().peekable();
    while let Some(arg) = args.next() {
        if let Some(long) = arg.strip_prefix("--") {
            let (key, inline) = match long.split_once('=') {
                Some((key, value)) => (key, Some(value.to_string())),
                None => (long, None),
            };
            let key = key.replace('_', "-");
            let wanted = ["listen", "processes", "workers", "max-fd"].contains(&key.as_str())
                || SOCKET_OPTIONS.contains(&key.as_str())
                || Format::named(&key).is_some();
            if !wanted {
                continue;
            }
            let Some(value) = inline.or_else(|| args.next().cloned()) else {
                continue;
            };
            let source = format!("--{key} {value} on the uWSGI command line");
            reader.apply(&key, &value, source, cwd, 0);
        } else if let Some(key) = short_option(arg) {
            if let Some(value) = args.next() {
                let source = format!("--{key} {value} on the uWSGI command line");
                reader.apply(key, value, source, cwd, 0);
            }
        } else if let Some(format) = Format::of_file(arg).filter(|_| !arg.starts_with('-')) {
            // `uwsgi app.ini` loads the file by its extension.
            reader.load(arg, format, cwd, 1);
        }
    }
    reader.config
}

/// (key, value, line) of one ini section, with uWSGI's placeholders
/// expanded: %d (the file's directory), %n (its name without extension),
/// %p (its path) and %(option) (an option set earlier).
fn ini_options(text: &str, section: &str, path: &Path) -> Vec<(String, String, usize)> {
    let mut in_section = false;
    let mut options: Vec<(String, String, usize)> = Vec::new();
    let mut expanded = 0;
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            in_section = line.trim_matches(|c| c == '[' || c == ']').trim() == section;
            continue;
        }
        if !in_section || line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            let value = if expanded < MAX_EXPANDED {
                expand(value.trim(), path, &options)
            } else {
                value.trim().to_string()
            };
            expanded += value.len();
            options.push((key.trim().to_string(), value, index + 1));
        }
    }
    options
}

/// One pass, left to right: what a placeholder brings in is not expanded
/// again, and the result is cut to MAX_VALUE bytes.
fn expand(value: &str, path: &Path, earlier: &[(String, String, usize)]) -> String {
    let dir = path
        .parent()
        .map(|d| format!("{}/", d.display()))
        .unwrap_or_default();
    let name = path
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let whole = path.display().to_string();
    let mut out = String::new();
    let mut rest = value;
    while let Some(at) = rest.find('%') {
        if out.len() > MAX_VALUE {
            break;
        }
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let (replacement, used) = match rest.as_bytes().get(1) {
            Some(b'd') => (dir.as_str(), 2),
            Some(b'n') => (name.as_str(), 2),
            Some(b'p') => (whole.as_str(), 2),
            Some(b'(') => match rest.find(')') {
                Some(end) => (
                    earlier
                        .iter()
                        .rev()
                        .find(|(k, _, _)| k == &rest[2..end])
                        .map_or("", |(_, v, _)| v.as_str()),
                    end + 1,
                ),
                None => ("%", 1),
            },
            _ => ("%", 1),
        };
        out.push_str(replacement);
        rest = &rest[used..];
    }
    out.push_str(rest);
    if out.len() > MAX_VALUE {
        let mut end = MAX_VALUE;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

/// `section:` then indented `key: value` or `key:` with `- value` items.
fn yaml_options(text: &str, section: &str) -> Vec<(String, String, usize)> {
    let mut in_section = false;
    let mut list_key: Option<String> = None;
    let mut options = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let without_comment = raw.split(" #").next().unwrap_or(raw);
        if without_comment.trim().is_empty() || without_comment.trim_start().starts_with('#') {
            continue;
        }
        let indented = raw.starts_with([' ', '\t']);
        let line = without_comment.trim();
        if !indented {
            in_section = line.trim_end_matches(':') == section;
            list_key = None;
            continue;
        }
        if !in_section {
            continue;
        }
        if let Some(item) = line.strip_prefix("- ") {
            if let Some(key) = &list_key {
                options.push((
                    key.clone(),
                    item.trim().trim_matches('"').to_string(),
                    index + 1,
                ));
            }
        } else if let Some((key, value)) = line.split_once(':') {
            let value = value.trim();
            if value.is_empty() {
                list_key = Some(key.trim().to_string());
            } else {
                list_key = None;
                options.push((
                    key.trim().to_string(),
                    value.trim_matches(['"', '\'']).to_string(),
                    index + 1,
                ));
            }
        }
    }
    options
}

/// `<uwsgi><key>value</key><flag/></uwsgi>`.
fn xml_options(text: &str, section: &str) -> Result<Vec<(String, String, usize)>, String> {
    let open = format!("<{section}");
    let start = text
        .find(&open)
        .ok_or_else(|| format!("no <{section}> element"))?;
    let body_start = start + text[start..].find('>').ok_or("unterminated <uwsgi> tag")? + 1;
    let end = text[body_start..]
        .find(&format!("</{section}>"))
        .map(|e| body_start + e)
        .ok_or_else(|| format!("<{section}> is not closed"))?;
    let mut options = Vec::new();
    let mut rest = &text[body_start..end];
    let mut offset = body_start;
    while let Some(lt) = rest.find('<') {
        let tag_end = rest[lt..].find('>').ok_or("unterminated tag")? + lt;
        let tag = rest[lt + 1..tag_end].trim();
        let line = text[..offset + lt].lines().count().max(1);
        if tag.starts_with('!') || tag.starts_with('?') || tag.starts_with('/') {
            // comment, declaration or a stray close tag
        } else if let Some(flag) = tag.strip_suffix('/') {
            options.push((flag.trim().to_string(), "true".to_string(), line));
        } else {
            let name = tag.split_whitespace().next().unwrap_or(tag);
            let close = format!("</{name}>");
            let value_end = rest[tag_end..]
                .find(&close)
                .ok_or_else(|| format!("<{name}> is not closed"))?
                + tag_end;
            options.push((
                name.to_string(),
                rest[tag_end + 1..value_end].trim().to_string(),
                line,
            ));
            let consumed = value_end + close.len();
            offset += consumed;
            rest = &rest[consumed..];
            continue;
        }
        offset += tag_end + 1;
        rest = &rest[tag_end + 1..];
    }
    Ok(options)
}

/// `{"uwsgi": {"key": value or [values]}}`.
fn json_options(text: &str, section: &str) -> Result<Vec<(String, String, usize)>, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|err| format!("not valid JSON: {err}"))?;
    let object = value
        .get(section)
        .and_then(|v| v.as_object())
        .ok_or_else(|| format!("no \"{section}\" object"))?;
    let scalar = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut options = Vec::new();
    for (key, value) in object {
        match value {
            serde_json::Value::Array(items) => {
                options.extend(items.iter().map(|i| (key.clone(), scalar(i), 1)))
            }
            other => options.push((key.clone(), scalar(other), 1)),
        }
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    fn on_cmdline(line: &str) -> UwsgiConfig {
        read(
            &args(line),
            Path::new("/"),
            &View::at(Path::new("/")).unwrap(),
        )
    }

    /// A scratch directory with files, removed when dropped.
    struct Dir(PathBuf);

    impl Dir {
        fn with(name: &str, files: &[(&str, &str)]) -> Self {
            let dir =
                std::env::temp_dir().join(format!("droptrace-uwsgi-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            for (file, text) in files {
                std::fs::write(dir.join(file), text).unwrap();
            }
            Self(dir)
        }

        fn read(&self, line: &str) -> UwsgiConfig {
            read(&args(line), &self.0, &View::at(Path::new("/")).unwrap())
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn placeholders_expand_once_and_stay_bounded() {
        // Each line doubles the last: 2^40 bytes if expanded naively.
        let mut text = String::from("[uwsgi]\na0 = xx\n");
        for n in 1..=40 {
            text.push_str(&format!("a{n} = %(a{})%(a{})\n", n - 1, n - 1));
        }
        // What a placeholder brings in is not expanded again (no loop).
        text.push_str("p = %(p\nq = %(p))\nlisten = 77\n");
        let started = std::time::Instant::now();
        let options = ini_options(&text, "uwsgi", Path::new("/etc/app.ini"));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(options.iter().all(|(_, v, _)| v.len() <= MAX_VALUE));
        let value = |key: &str| options.iter().find(|(k, _, _)| k == key).unwrap().1.clone();
        assert_eq!(value("a3").len(), 16);
        assert_eq!(value("q"), "%(p)");
        assert_eq!(value("listen"), "77");
        assert_eq!(
            expand("%d%n.sock at 50%", Path::new("/srv/app.ini"), &[]),
            "/srv/app.sock at 50%"
        );
    }

    #[test]
    fn defaults_when_nothing_says_otherwise() {
        let config = on_cmdline("--plugin python3 --master --socket /run/app.sock");
        assert_eq!(
            config.listen,
            Setting::default_value(100, "uWSGI default, no listen option set")
        );
        assert_eq!(config.processes.value, 1);
        assert_eq!(config.sockets[0].value, "/run/app.sock");
        assert_eq!(config.max_fd, None);
    }

    #[test]
    fn command_line_forms_and_the_last_one_wins() {
        for line in [
            "--listen 64",
            "--listen=64",
            "-l 64",
            "--master --listen 10 --listen 64",
        ] {
            assert_eq!(on_cmdline(line).listen.value, 64, "{line}");
        }
        assert_eq!(
            on_cmdline("--listen 64").listen.source,
            "--listen 64 on the uWSGI command line"
        );
        let config = on_cmdline("-M -p 4 --http-socket :8000 -s 127.0.0.1:3031 --max_fd 4096");
        assert_eq!(config.processes.value, 4);
        assert_eq!(config.max_fd.unwrap().value, 4096);
        let sockets: Vec<&str> = config.sockets.iter().map(|s| s.value.as_str()).collect();
        assert_eq!(sockets, [":8000", "127.0.0.1:3031"]);
        assert_eq!(on_cmdline("--workers 3").processes.value, 3);
    }

    #[test]
    fn ini_files_count_where_they_appear() {
        let dir = Dir::with(
            "ini",
            &[(
                "app.ini",
                "[other]\nlisten = 5\n\n[uwsgi]\n; listen = 7\n# a comment\nbase = /srv\nsocket = %(base)/app.sock\n  listen =  512  \nprocesses = 8\n",
            )],
        );
        let config = dir.read("--ini app.ini");
        assert_eq!(config.listen.value, 512);
        assert_eq!(
            config.listen.source,
            format!("listen = 512 in {}:9", dir.0.join("app.ini").display())
        );
        assert_eq!(config.processes.value, 8);
        assert_eq!(config.sockets[0].value, "/srv/app.sock");
        assert_eq!(dir.read("app.ini --listen 9").listen.value, 9);
        assert_eq!(dir.read("--listen 9 --ini=app.ini").listen.value, 512);
        assert_eq!(dir.read("--ini app.ini:other").listen.value, 5);
        // An unreadable file leaves what was known, and says so.
        let config = dir.read("--listen 9 --ini missing.ini");
        assert_eq!(config.listen.value, 9);
        assert_eq!(config.problems.len(), 1);
        assert!(
            config.problems[0]
                .to_string()
                .contains("missing.ini: cannot read it"),
            "{}",
            config.problems[0]
        );
    }

    #[test]
    fn ini_files_that_load_others_and_loops() {
        let dir = Dir::with(
            "nested",
            &[
                ("a.ini", "[uwsgi]\nini = %db.ini\nlisten = 200\n"),
                ("b.ini", "[uwsgi]\nlisten = 300\nmax-fd = 10000\n"),
                ("loop.ini", "[uwsgi]\nini = loop.ini\n"),
            ],
        );
        let config = dir.read("--ini a.ini");
        assert_eq!(config.listen.value, 200);
        assert_eq!(config.max_fd.unwrap().value, 10000);
        let config = dir.read("--ini loop.ini");
        assert!(
            config.problems.iter().any(|p| p.reason.contains("a loop")),
            "{:?}",
            config.problems
        );
    }

    #[test]
    fn yaml_xml_and_json() {
        let dir = Dir::with(
            "formats",
            &[
                ("app.yaml", "# comment\nuwsgi:\n  socket:\n    - /run/a.sock\n    - /run/b.sock\n  listen: 256  # queue\n  processes: 4\nother:\n  listen: 1\n"),
                ("app.xml", "<?xml version=\"1.0\"?>\n<uwsgi>\n  <!-- queue -->\n  <master/>\n  <listen>128</listen>\n  <socket>/run/x.sock</socket>\n</uwsgi>\n"),
                ("app.json", "{\"uwsgi\": {\"listen\": 333, \"socket\": [\"/run/j.sock\"]}}"),
                ("bad.xml", "<uwsgi><listen>1</listen>"),
                ("bad.json", "{\"uwsgi\": "),
            ],
        );
        let yaml = dir.read("--yaml app.yaml");
        assert_eq!(yaml.listen.value, 256);
        assert_eq!(yaml.processes.value, 4);
        assert_eq!(yaml.sockets.len(), 2);
        assert_eq!(dir.read("-x app.xml").listen.value, 128);
        let xml = dir.read("--xml app.xml");
        assert_eq!(xml.listen.value, 128);
        assert!(
            xml.listen.source.ends_with("app.xml:5"),
            "{}",
            xml.listen.source
        );
        assert_eq!(xml.sockets[0].value, "/run/x.sock");
        assert_eq!(dir.read("app.json").listen.value, 333);
        for bad in ["--xml bad.xml", "--json bad.json"] {
            let config = dir.read(bad);
            assert_eq!(config.listen.value, 100, "{bad}");
            assert_eq!(config.problems.len(), 1, "{bad}");
        }
    }

    #[test]
    fn bad_numbers_are_problems() {
        let config = on_cmdline("--listen lots");
        assert_eq!(config.listen.value, 100);
        assert!(config.problems[0].reason.contains("not a number"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

        /// Any text in any format: options or a problem, never a panic,
        /// never a value past MAX_VALUE.
        #[test]
        fn any_text_is_read_without_a_panic(
            text in "(\\[uwsgi\\]|uwsgi:|<uwsgi>|\\{\"uwsgi\":|[a-z%()=:<>/{}\"\\[\\] \n-]|listen|%\\(a\\)){0,80}",
        ) {
            let path = Path::new("/etc/app.ini");
            let options = ini_options(&text, "uwsgi", path);
            proptest::prop_assert!(options.iter().all(|(_, v, _)| v.len() <= MAX_VALUE));
            let _ = yaml_options(&text, "uwsgi");
            let _ = xml_options(&text, "uwsgi");
            let _ = json_options(&text, "uwsgi");
        }
    }
}
