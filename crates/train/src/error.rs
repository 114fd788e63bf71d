//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while training, evaluating or saving a run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed; `context` names the tensor or step.
    #[error("tensor operation failed in {context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },
    /// Reading or writing a file of the run failed.
    #[error("cannot access {path}: {source}; check the path and its permissions")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file of the run could not be written or parsed.
    #[error(
        "invalid JSON in {path}: {source}; the run folder may be from another version, start a new run"
    )]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// Inputs that do not fit together (lengths, shapes, values out of range).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The optimizer state in a run does not match the model's parameters.
    #[error(
        "optimizer state for tensor {name} does not match: {reason}; resume with the same model configuration"
    )]
    StateMismatch { name: String, reason: String },
    /// The training loss became NaN or infinite; the last good state was kept.
    #[error(
        "loss is {loss} at epoch {epoch}, batch {batch}; training stopped and the last good state was kept, try a lower learning rate"
    )]
    NonFiniteLoss {
        epoch: usize,
        batch: usize,
        loss: f32,
    },
    /// Training was cancelled (Ctrl-C); the state was saved when a run folder was set.
    #[error("training interrupted at epoch {epoch}, batch {batch}; resume it with --resume")]
    Interrupted { epoch: usize, batch: usize },
    /// The data crate failed to load or transform a batch.
    #[error("data: {0}")]
    Data(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The model crate failed.
    #[error("model: {0}")]
    Model(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Attaches a context string to candle errors.
pub(crate) trait CandleContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Candle {
            context: context(),
            source,
        })
    }
}
