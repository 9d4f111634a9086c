//! uWSGI's `listen` setting, read from its command line and `--ini` files.
//!
//! uWSGI applies options in order, the last one wins; an ini file given on
//! the command line counts at the place it appears.
use std::{fs, path::Path};

/// The listen queue size uWSGI uses when none is configured.
pub const DEFAULT_LISTEN: u32 = 100;

/// A configured value and where it came from, in words an operator can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub value: u32,
    pub source: String,
    /// True when nothing configured it and the program's default applies.
    pub is_default: bool,
}

/// `listen` for a uWSGI process started with `args` (argv without argv0),
/// with relative ini paths resolved against `cwd`.
pub fn listen_setting(args: &[String], cwd: &Path) -> Setting {
    let mut setting = Setting {
        value: DEFAULT_LISTEN,
        source: "uWSGI default, no listen option set".into(),
        is_default: true,
    };
    let mut args = args.iter().peekable();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with('-') => (flag, Some(value.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || inline.clone().or_else(|| args.next().cloned());
        match flag {
            "--listen" | "-l" => {
                if let Some(n) = value().and_then(|v| v.trim().parse().ok()) {
                    setting = Setting {
                        value: n,
                        source: format!("--listen {n} on the uWSGI command line"),
                        is_default: false,
                    };
                }
            }
            "--ini" => {
                if let Some(file) = value() {
                    apply_ini(&cwd.join(file), &mut setting);
                }
            }
            // `uwsgi app.ini` loads the file by its extension.
            bare if !bare.starts_with('-') && bare.ends_with(".ini") => {
                apply_ini(&cwd.join(bare), &mut setting)
            }
            _ => {}
        }
    }
    setting
}

/// `listen = N` in the [uwsgi] section of an ini file.
fn apply_ini(file: &Path, setting: &mut Setting) {
    let Ok(text) = fs::read_to_string(file) else {
        tracing::warn!(
            "cannot read uWSGI ini {}: its listen setting is unknown",
            file.display()
        );
        return;
    };
    if let Some(n) = ini_listen(&text) {
        *setting = Setting {
            value: n,
            source: format!("listen = {n} in {}", file.display()),
            is_default: false,
        };
    }
}

fn ini_listen(text: &str) -> Option<u32> {
    let mut in_uwsgi = true; // options before any section header count
    let mut found = None;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_uwsgi = line.trim_matches(|c| c == '[' || c == ']').trim() == "uwsgi";
            continue;
        }
        if !in_uwsgi || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            if key.trim() == "listen" {
                found = value.trim().trim_matches('"').parse().ok().or(found);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn default_is_100_when_nothing_says_otherwise() {
        let s = listen_setting(
            &args("--plugin python3 --master --socket /run/app.sock"),
            Path::new("/"),
        );
        assert_eq!(
            s,
            Setting {
                value: 100,
                source: "uWSGI default, no listen option set".into(),
                is_default: true,
            }
        );
    }

    #[test]
    fn command_line_forms() {
        for line in [
            "--listen 64",
            "--listen=64",
            "-l 64",
            "--master --listen 10 --listen 64",
        ] {
            assert_eq!(
                listen_setting(&args(line), Path::new("/")).value,
                64,
                "{line}"
            );
        }
        assert_eq!(
            listen_setting(&args("--listen 64"), Path::new("/")).source,
            "--listen 64 on the uWSGI command line"
        );
    }

    #[test]
    fn ini_files_count_where_they_appear() {
        let dir = std::env::temp_dir().join(format!("droptrace-uwsgi-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("app.ini"), "[other]\nlisten = 5\n\n[uwsgi]\n; listen = 7\nsocket = /run/a.sock\n  listen =  512  \n").unwrap();
        let from_ini = listen_setting(&args("--ini app.ini"), &dir);
        assert_eq!(from_ini.value, 512);
        assert_eq!(
            from_ini.source,
            format!("listen = 512 in {}", dir.join("app.ini").display())
        );
        assert_eq!(listen_setting(&args("app.ini --listen 9"), &dir).value, 9);
        assert_eq!(
            listen_setting(&args("--listen 9 --ini=app.ini"), &dir).value,
            512
        );
        // An unreadable ini leaves what was known.
        assert_eq!(
            listen_setting(&args("--listen 9 --ini missing.ini"), &dir).value,
            9
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
