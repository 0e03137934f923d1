//! The one error type of qfuse's library crates.
use crate::{DType, Shape};

/// Everything that can go wrong in a backend op, in loading, or in the model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two operands (or an operand and what the op needs) have incompatible shapes.
    #[error("{op}: shape mismatch: {lhs} vs {rhs}")]
    ShapeMismatch {
        /// The op that found the mismatch.
        op: &'static str,
        /// The first shape involved.
        lhs: Shape,
        /// The second shape involved.
        rhs: Shape,
    },
    /// The op does not support this element type.
    #[error("{op}: unsupported dtype {dtype}")]
    UnsupportedDType {
        /// The op.
        op: &'static str,
        /// The dtype it was given.
        dtype: DType,
    },
    /// An argument outside its valid range (a token id beyond the vocabulary, a bad block table, ...).
    #[error("{op}: {msg}")]
    InvalidArgument {
        /// The op or function that rejected it.
        op: &'static str,
        /// What was wrong, with the offending value.
        msg: String,
    },
    /// The KV cache has no free block left.
    #[error("KV cache is full: {needed} more blocks needed, {free} free")]
    CacheFull {
        /// Blocks the request needs.
        needed: usize,
        /// Blocks still free.
        free: usize,
    },
    /// No device of the backend's kind is present (no driver, no GPU).
    #[error("no device: {0}")]
    NoDevice(String),
    /// A model file or configuration is missing, malformed or inconsistent.
    #[error("{0}")]
    Model(String),
    /// An I/O error, with the path involved.
    #[error("{path}: {err}")]
    Io {
        /// The file or directory.
        path: String,
        /// The underlying error (printed in the message, so not chained as a source).
        err: std::io::Error,
    },
    /// A backend-specific failure (driver, compiler, library).
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            msg: msg.into(),
        }
    }

    /// Shorthand for [`Error::ShapeMismatch`].
    pub fn shape(op: &'static str, lhs: &Shape, rhs: &Shape) -> Self {
        Error::ShapeMismatch {
            op,
            lhs: lhs.clone(),
            rhs: rhs.clone(),
        }
    }
}

/// `Result` with qfuse's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
