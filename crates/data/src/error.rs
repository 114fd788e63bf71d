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

    /// The CSV reader failed and no line could be blamed; `message` is the
    /// first line of the reader's error, shortened.
    #[error(
        "{path}: cannot parse the CSV file ({message}); it must be comma-separated UTF-8 text with a header row"
    )]
    CsvParse { path: PathBuf, message: String },

    /// A CSV syntax error on a known line; `excerpt` is that line, shortened.
    #[error("{path}: line {line}: {problem} (the line reads `{excerpt}`)")]
    CsvSyntax {
        path: PathBuf,
        line: usize,
        problem: String,
        excerpt: String,
    },

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

    #[error(
        "{path}: row {row}, column `{column}`: the file name is empty; fill it in or delete the row"
    )]
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
        "{path}: rows {first_row} and {row} both list `{name}`; keep one row per image, with all its labels"
    )]
    DuplicateFileName {
        path: PathBuf,
        name: String,
        first_row: usize,
        row: usize,
    },

    #[error(
        "{path}: row {row}, column `{column}`: validation label `{label}` does not occur in the training rows; fix the label or add a training row that has it"
    )]
    UnknownLabel {
        path: PathBuf,
        row: usize,
        column: String,
        label: String,
    },

    /// Every row went to validation: `reason` says why, and what to change.
    #[error("{path}: no training rows: {reason}")]
    NoTrainingRows { path: PathBuf, reason: String },

    #[error(
        "{path}: every image of the {split} split was unreadable and skipped; replace the files"
    )]
    EmptySplit { path: PathBuf, split: &'static str },

    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("{path}: the image file is empty")]
    EmptyImage { path: PathBuf },

    #[error("{path}: cannot decode the image ({message}); replace or remove the file")]
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
