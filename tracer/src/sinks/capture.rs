//! The capture file as `droptrace record` writes it (`report/capture.rs`
//! reads it back, on another machine, later).
//!
//! JSON Lines, one record per line, each `{"type": ...}`:
//! - `header` first: format name and version, droptrace's version, the
//!   command line, and a [`Snapshot`] of the host;
//! - `drop` and `notice` records exactly as `droptrace --json` prints them;
//! - `counters` every second: the kernel's listen-queue counters per netns;
//! - `queues` every second: queue length and backlog of watched listeners;
//! - `summary` last (the footer): totals, lost events, kernel reconciliation.
//!
//! Every record is written with one write(2) and flushed, so a capture cut
//! by SIGKILL, a crash or a full disk is readable up to its last complete
//! line; a capture without its `summary` is reported as truncated.
use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use super::write_record;
use crate::contract::{Header, Record, Snapshot, FORMAT, FORMAT_VERSION};

/// A capture file being written: created 0600, never through a symlink,
/// never over an existing file.
pub struct CaptureWriter {
    file: File,
    path: PathBuf,
    /// The record being assembled; written out whole on flush().
    pending: Vec<u8>,
    written: u64,
}

/// A new file at `path`, mode 0600, for droptrace's own output (captures,
/// reports): droptrace runs as root, so an existing file or a symlink
/// planted there is refused, never overwritten or followed.
pub fn create_new(path: &Path) -> Result<std::fs::File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|err| match err.kind() {
            io::ErrorKind::AlreadyExists => anyhow::anyhow!(
                "{} already exists: droptrace never overwrites a file (nor follows a symlink); remove it or choose another name",
                path.display()
            ),
            _ => anyhow::Error::new(err).context(format!("cannot create {}", path.display())),
        })
}

impl CaptureWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let file = create_new(path)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            pending: Vec::new(),
            written: 0,
        })
    }

    pub fn header(&mut self, command: Vec<String>, snapshot: Snapshot) -> Result<()> {
        let header = Header {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            droptrace_version: env!("CARGO_PKG_VERSION").into(),
            command,
            snapshot,
        };
        write_record(self, &Record::Header(header))
            .with_context(|| format!("cannot write to {}", self.path.display()))
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.written
    }

    /// Push what was written to the disk (once a second: a power cut then
    /// loses at most that much).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl Write for CaptureWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    /// One record, one write: a reader never sees half of one unless the
    /// disk filled or the machine stopped mid-write.
    fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = self.file.write_all(&self.pending);
        self.written += self.pending.len() as u64;
        self.pending.clear();
        result.map_err(|err| {
            io::Error::new(
                err.kind(),
                format!(
                    "cannot write to {} after {} bytes: {err}",
                    self.path.display(),
                    self.written
                ),
            )
        })
    }
}
