//! UNIX socket addresses as users write them: "/run/app.sock" or "@name".
use std::{fmt, path::PathBuf};

use std::os::unix::ffi::OsStrExt;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum UnixAddress {
    /// Bound in the filesystem (the path as the process passed it).
    Path(PathBuf),
    /// Linux abstract namespace, per network namespace; the name without the
    /// leading NUL.
    Abstract(Vec<u8>),
}

impl UnixAddress {
    /// From a raw `sun_path` and its meaningful length.
    pub fn from_sun_path(raw: &[u8]) -> Option<Self> {
        match raw.split_first() {
            None => None,
            Some((0, name)) => Some(Self::Abstract(name.to_vec())),
            Some(_) => {
                let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                Some(Self::Path(PathBuf::from(std::ffi::OsStr::from_bytes(
                    &raw[..end],
                ))))
            }
        }
    }

    /// The filesystem path, for a path-bound address.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            Self::Path(path) => Some(path),
            Self::Abstract(_) => None,
        }
    }
}

impl fmt::Display for UnixAddress {
    /// Abstract names print as ss(8) prints them: '@' then the name, with
    /// NULs inside the name shown as '@' too.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(path) => write!(f, "{}", path.display()),
            Self::Abstract(name) => {
                f.write_str("@")?;
                for chunk in name.utf8_chunks() {
                    f.write_str(&chunk.valid().replace('\0', "@"))?;
                    for byte in chunk.invalid() {
                        write!(f, "\\x{byte:02x}")?;
                    }
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stop_at_the_first_nul_and_abstract_names_keep_theirs() {
        assert_eq!(
            UnixAddress::from_sun_path(b"/run/app.sock\0\0junk")
                .unwrap()
                .to_string(),
            "/run/app.sock"
        );
        assert_eq!(
            UnixAddress::from_sun_path(b"\0app\0x").unwrap().to_string(),
            "@app@x"
        );
        assert_eq!(UnixAddress::from_sun_path(b""), None);
    }
}
