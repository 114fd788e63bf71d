//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while building a ResNet or loading its weights.
#[derive(Debug, thiserror::Error)]
pub enum ResNetError {
    /// An architecture name that is not one of resnet18, resnet34, resnet50,
    /// resnet101 or resnet152.
    #[error(
        "unknown architecture `{name}`: use one of resnet18, resnet34, resnet50, resnet101, resnet152"
    )]
    UnknownArch { name: String },

    /// A configuration value that cannot build a network.
    #[error("invalid resnet configuration: {reason}")]
    InvalidConfig { reason: String },

    /// A tensor operation on a named tensor failed.
    #[error("tensor `{name}`: {source}")]
    Tensor {
        name: String,
        #[source]
        source: candle_core::Error,
    },

    /// A tensor operation failed outside any one named tensor.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A weights file could not be read or parsed as safetensors.
    #[error("cannot read weights file {path}: {source}")]
    ReadWeights {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },

    /// [`crate::load_pretrained_at`] found no variable under its prefix.
    #[error(
        "no variable of the model is named `{prefix}.…`: pass the prefix the ResNet was built under (its VarBuilder's `prefix()`)"
    )]
    NoNetworkAt { prefix: String },

    /// The weights do not fit the network: every problem is listed.
    #[error(
        "weights in {origin} do not fit the network ({}): check the architecture and base width",
        describe_mismatch(missing, unexpected, mis_shaped)
    )]
    WeightsMismatch {
        /// Where the weights came from (a path or a hub repo id).
        origin: String,
        /// Tensors the network needs that the file lacks.
        missing: Vec<String>,
        /// Tensors in the file that the network does not have.
        unexpected: Vec<String>,
        /// Tensors whose shapes differ: name, shape in the network, shape in the file.
        mis_shaped: Vec<(String, Vec<usize>, Vec<usize>)>,
    },

    /// A download from the hub failed.
    #[error(
        "cannot fetch {file} from hub repo {repo}: {source}; check the repo id, the network, or HF_ENDPOINT"
    )]
    Hub {
        repo: String,
        file: String,
        #[source]
        source: Box<hf_hub::api::sync::ApiError>,
    },

    /// Offline loading was asked for and the file is not in the hub cache.
    #[error(
        "{file} of hub repo {repo} is not in the hub cache {cache}: download it once online (or set HF_HOME to the cache that has it)"
    )]
    NotCached {
        repo: String,
        file: String,
        cache: PathBuf,
    },
}

fn describe_mismatch(
    missing: &[String],
    unexpected: &[String],
    mis_shaped: &[(String, Vec<usize>, Vec<usize>)],
) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing: {}", missing.join(", ")));
    }
    if !unexpected.is_empty() {
        parts.push(format!("unexpected: {}", unexpected.join(", ")));
    }
    if !mis_shaped.is_empty() {
        let shapes: Vec<String> = mis_shaped
            .iter()
            .map(|(name, want, got)| format!("{name} network {want:?} file {got:?}"))
            .collect();
        parts.push(format!("mis-shaped: {}", shapes.join(", ")));
    }
    parts.join("; ")
}

/// Attaches a tensor name to a candle error.
pub(crate) trait WithName<T> {
    fn with_name(self, name: &str) -> Result<T, ResNetError>;
}

impl<T> WithName<T> for candle_core::Result<T> {
    fn with_name(self, name: &str) -> Result<T, ResNetError> {
        self.map_err(|source| ResNetError::Tensor {
            name: name.to_string(),
            source,
        })
    }
}
