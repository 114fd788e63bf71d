//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong between a dataset folder and a batch.
///
/// Each variant carries the file, row, column or URL that failed, so a
/// message alone is enough to find the problem.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: the CSV file does not exist; check the dataset root or pass the CSV path")]
    CsvMissing { path: PathBuf },

    #[error("{path}: the CSV file has no rows; it needs a header and at least one row")]
    EmptyCsv { path: PathBuf },

    #[error("{path}: cannot parse the CSV file ({message})")]
    CsvParse { path: PathBuf, message: String },

    #[error(
        "{path}: column `{column}` is missing (columns found: {found}); rename it or configure the column name"
    )]
    MissingColumn {
        path: PathBuf,
        column: String,
        found: String,
    },

    #[error(
        "{path}: row {row}, column `{column}`: `{value}` is not a boolean; use True/False, true/false or 1/0"
    )]
    BadBool {
        path: PathBuf,
        row: usize,
        column: String,
        value: String,
    },

    #[error("{path}: row {row}, column `{column}`: the file name is empty")]
    EmptyFileName {
        path: PathBuf,
        row: usize,
        column: String,
    },

    #[error(
        "{path}: row {row}, column `{column}`: `{name}` is absolute or leaves the image folder; use a path relative to it without `..`"
    )]
    UnsafeFileName {
        path: PathBuf,
        row: usize,
        column: String,
        name: String,
    },

    #[error("{dir}: {count} image file(s) listed in the CSV are missing, first: {first}")]
    MissingImages {
        dir: PathBuf,
        count: usize,
        first: String,
    },

    #[error(
        "{path}: row {row}, column `{column}`: validation label `{label}` does not occur in the training rows; fix the label or build the vocab from all rows"
    )]
    UnknownLabel {
        path: PathBuf,
        row: usize,
        column: String,
        label: String,
    },

    #[error("{path}: the {split} split is empty; check the split column or valid_pct")]
    EmptySplit { path: PathBuf, split: &'static str },

    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("{path}: the image file is empty")]
    EmptyImage { path: PathBuf },

    #[error(
        "{path}: cannot decode the image ({message}); replace the file or enable skip_bad_images"
    )]
    Decode { path: PathBuf, message: String },

    #[error("{path}: the image is too large to decode safely ({message})")]
    ImageTooLarge { path: PathBuf, message: String },

    #[error("{path}: cannot write the image ({message})")]
    Encode { path: PathBuf, message: String },

    #[error("tensor operation failed while {context}: {source}")]
    Tensor {
        context: String,
        #[source]
        source: candle_core::Error,
    },

    #[error("the loader's worker thread stopped unexpectedly")]
    LoaderStopped,

    #[error("{url}: download failed ({message}); check the connection and retry")]
    Download { url: String, message: String },

    #[error(
        "{url}: expected {expected} bytes but received {actual}; the download was cut short or the file changed, retry"
    )]
    SizeMismatch {
        url: String,
        expected: u64,
        actual: u64,
    },

    #[error("{url}: md5 is {actual} but {expected} was expected; the download is corrupt, retry")]
    ChecksumMismatch {
        url: String,
        expected: String,
        actual: String,
    },

    #[error(
        "{archive}: entry `{entry}` would be written outside the destination folder; refusing to extract it"
    )]
    UnsafeArchiveEntry { archive: PathBuf, entry: String },

    #[error("{archive}: cannot extract the archive ({message})")]
    Extract { archive: PathBuf, message: String },

    #[error(
        "{path}: already exists but is not a verified copy of the archive; remove it or choose another destination"
    )]
    DestinationExists { path: PathBuf },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn tensor(context: impl Into<String>, source: candle_core::Error) -> Self {
        DataError::Tensor {
            context: context.into(),
            source,
        }
    }
}
