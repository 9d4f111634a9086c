//! The configuration of the programs behind the sockets: nginx and uWSGI
//! files and command lines, read the way the programs themselves read them.
//!
//! Readers never fail as a whole: a file that cannot be read or parsed is
//! recorded as a [`Problem`] (which file, why) and the rest is still used,
//! so droptrace falls back to what the kernel shows.
pub mod files;
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
