//! The library's error type. Every variant prints one sentence a user can act on, naming the file
//! or option at fault; the `lmc` binary prints it and exits non-zero.

use std::path::PathBuf;

/// Everything that can go wrong in `lmc-train` (and the stages built on it).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error while reading or writing `path`.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file exists but its content is not what it should be (truncated, corrupted, wrong kind...).
    #[error("{}: {msg}", path.display())]
    BadFile {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// An invalid setting (a flag value, a model spec, a config field). The message names it.
    #[error("{0}")]
    Invalid(String),
    /// Training produced a non-finite loss. The last good state was kept (see `checkpoint`).
    #[error("training diverged at epoch {epoch}, step {step}: loss is {loss}{}", checkpoint.as_ref().map(|p| format!("; last good checkpoint kept at {}", p.display())).unwrap_or_default())]
    Diverged {
        /// Epoch (0-based) in which the loss became non-finite.
        epoch: usize,
        /// Step within the epoch.
        step: usize,
        /// The offending loss value.
        loss: f32,
        /// Where the last good state was saved, if checkpointing was on.
        checkpoint: Option<PathBuf>,
    },
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    /// A file whose content is wrong.
    pub fn bad_file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadFile { path: path.into(), msg: msg.into() }
    }
    /// An invalid setting.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}
