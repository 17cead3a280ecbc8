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
    /// A setting out of its domain: a flag value, a model spec, a configuration field. The message
    /// names the flag or field and says what is allowed.
    #[error("{0}")]
    Setting(String),
    /// Inputs that do not go together: runs of different architectures or masks, a model that
    /// does not fit the data, a ticket or mask for another model, parameter layouts that differ.
    #[error("{0}")]
    Incompatible(String),
    /// Data that cannot be used as it is: an empty split, labels beyond the class count, pixels
    /// stored in the wrong form, non-finite parameters.
    #[error("{0}")]
    Data(String),
    /// The work was stopped before it finished (an observer asked to stop, or the process is
    /// being interrupted); what was done is checkpointed where the stage checkpoints.
    #[error("{0}")]
    Interrupted(String),
    /// Another process holds the lock of an output (see `artifact::OutputLock`): it is writing
    /// that output now, and a second writer would silently lose one of the two results.
    #[error("{} is being written by {}; wait for it to finish, or choose another output", path.display(), holder(*pid))]
    Locked {
        /// The output (file or folder) being written.
        path: PathBuf,
        /// The process holding its lock, when the lock file names one.
        pid: Option<u32>,
    },
    /// Training produced a non-finite loss, a loss above `fit::DIVERGED_LOSS`, or non-finite
    /// weights. The last good state was kept
    /// (see `checkpoint`).
    #[error("training diverged at epoch {epoch}, step {step}: {}{}", diverged_what(*loss), checkpoint.as_ref().map(|p| format!("; last good checkpoint kept at {}", p.display())).unwrap_or_default())]
    Diverged {
        /// Epoch in which it happened, from 1 as training curves count (distillation: the
        /// outer iteration).
        epoch: usize,
        /// Step within the epoch, from 1.
        step: usize,
        /// The offending loss value; a finite one at most `fit::DIVERGED_LOSS` means the loss
        /// was fine but the step made some weight infinite or NaN.
        loss: f32,
        /// Where the last good state was saved, if checkpointing was on.
        checkpoint: Option<PathBuf>,
    },
}

/// Who holds an output's lock, for [`Error::Locked`]'s message.
fn holder(pid: Option<u32>) -> String {
    pid.map_or_else(|| "another process".to_string(), |p| format!("process {p}"))
}

/// What went non-finite, for [`Error::Diverged`]'s message.
fn diverged_what(loss: f32) -> String {
    let limit = crate::fit::DIVERGED_LOSS;
    if !loss.is_finite() {
        format!("loss is {loss}")
    } else if loss > limit {
        format!("the epoch's mean loss {loss:e} is above {limit:e}, the divergence limit")
    } else {
        format!("the step made weights non-finite (loss before it {loss})")
    }
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
    /// A setting out of its domain.
    pub fn setting(msg: impl Into<String>) -> Self {
        Error::Setting(msg.into())
    }
    /// Inputs that do not go together.
    pub fn incompatible(msg: impl Into<String>) -> Self {
        Error::Incompatible(msg.into())
    }
    /// Data that cannot be used.
    pub fn data(msg: impl Into<String>) -> Self {
        Error::Data(msg.into())
    }
    /// Work stopped before it finished.
    pub fn interrupted(msg: impl Into<String>) -> Self {
        Error::Interrupted(msg.into())
    }
}
