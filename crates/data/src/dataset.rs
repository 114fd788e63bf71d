//! Reading `train.csv`, checking the image files, building the vocab and the
//! train/valid split.

use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

use polars::prelude::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::DataError;
use crate::decode::decode_rgb;

/// Where a dataset lives and how its CSV is laid out.
///
/// The default matches fastai's PASCAL 2007 folder: `root/train.csv` with
/// columns `fname`, `labels` (space separated) and `is_valid`, images in
/// `root/train`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DatasetConfig {
    pub root: PathBuf,
    /// The CSV file; `root/train.csv` when `None`.
    pub csv: Option<PathBuf>,
    /// The folder `fname` is relative to; `root/train` when `None`.
    pub image_dir: Option<PathBuf>,
    pub fname_col: String,
    pub labels_col: String,
    pub label_delim: String,
    pub split: SplitConfig,
    /// Build the vocab from every row instead of the training rows only
    /// (fastai uses the training rows, so a label seen only in validation is
    /// an error by default).
    pub vocab_from_all: bool,
    /// Decode every image while loading and drop the ones that fail instead
    /// of failing later in the loader. Costs one full decoding pass.
    pub skip_bad_images: bool,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        DatasetConfig {
            root: PathBuf::from("data/pascal_2007"),
            csv: None,
            image_dir: None,
            fname_col: "fname".into(),
            labels_col: "labels".into(),
            label_delim: " ".into(),
            split: SplitConfig::default(),
            vocab_from_all: false,
            skip_bad_images: false,
        }
    }
}

impl DatasetConfig {
    /// The default layout rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DatasetConfig {
            root: root.into(),
            ..Default::default()
        }
    }

    /// The CSV file this config reads.
    pub fn csv_path(&self) -> PathBuf {
        self.csv
            .clone()
            .unwrap_or_else(|| self.root.join("train.csv"))
    }

    /// The folder image names are relative to.
    pub fn image_dir_path(&self) -> PathBuf {
        self.image_dir
            .clone()
            .unwrap_or_else(|| self.root.join("train"))
    }
}

/// How rows are divided into training and validation sets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitConfig {
    /// Rows whose boolean column is true are validation (fastai's
    /// `ColSplitter('is_valid')`).
    Column(String),
    /// A deterministic random fraction of the rows is validation.
    Random { valid_pct: f64, seed: u64 },
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig::Column("is_valid".into())
    }
}

/// One image and its labels as indices into the vocab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub path: PathBuf,
    pub labels: Vec<usize>,
}

/// An image that `skip_bad_images` dropped, and why.
#[derive(Debug, Clone)]
pub struct SkippedImage {
    pub path: PathBuf,
    pub reason: String,
}

/// A loaded dataset: the vocab and the two splits, every image file checked.
#[derive(Debug, Clone)]
pub struct Dataset {
    vocab: Vec<String>,
    train: Vec<Item>,
    valid: Vec<Item>,
    skipped: Vec<SkippedImage>,
}

impl Dataset {
    /// Reads the CSV, checks that every image exists, builds the vocab and
    /// splits the rows. Every problem found in the CSV is reported before
    /// any image is decoded. Blank lines are skipped (as pandas does); a file
    /// name listed twice is an error naming both rows, as is a split that
    /// leaves no training row.
    pub fn load(cfg: &DatasetConfig) -> Result<Dataset, DataError> {
        let csv = cfg.csv_path();
        let rows = read_rows(cfg, &csv)?;
        let image_dir = cfg.image_dir_path();
        check_files_exist(&image_dir, &rows)?;

        let is_valid = split_rows(cfg, &csv, &rows)?;
        if is_valid.iter().all(|&valid| valid) {
            return Err(no_training_rows(cfg, &csv, rows.len()));
        }
        let vocab: Vec<String> = rows
            .iter()
            .zip(&is_valid)
            .filter(|(_, valid)| cfg.vocab_from_all || !**valid)
            .flat_map(|(row, _)| row.labels.iter().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let index: HashMap<&str, usize> = vocab
            .iter()
            .enumerate()
            .map(|(i, name)| (name.as_str(), i))
            .collect();

        let mut train = Vec::new();
        let mut valid = Vec::new();
        for (row, valid_row) in rows.iter().zip(&is_valid) {
            let mut labels = Vec::with_capacity(row.labels.len());
            for label in &row.labels {
                match index.get(label.as_str()) {
                    Some(&i) => labels.push(i),
                    None => {
                        return Err(DataError::UnknownLabel {
                            path: csv.clone(),
                            row: row.row,
                            column: cfg.labels_col.clone(),
                            label: shorten(label, EXCERPT_CHARS),
                        });
                    }
                }
            }
            labels.sort_unstable();
            labels.dedup();
            let item = Item {
                path: image_dir.join(&row.fname),
                labels,
            };
            if *valid_row {
                valid.push(item);
            } else {
                train.push(item);
            }
        }

        let mut skipped = Vec::new();
        if cfg.skip_bad_images {
            train = drop_bad_images(train, &mut skipped);
            valid = drop_bad_images(valid, &mut skipped);
        }
        if train.is_empty() {
            return Err(DataError::EmptySplit {
                path: csv,
                split: "training",
            });
        }
        Ok(Dataset {
            vocab,
            train,
            valid,
            skipped,
        })
    }

    /// Sorted label names; a target's column `i` is `vocab()[i]`.
    pub fn vocab(&self) -> &[String] {
        &self.vocab
    }

    pub fn train(&self) -> &[Item] {
        &self.train
    }

    pub fn valid(&self) -> &[Item] {
        &self.valid
    }

    /// Images dropped by `skip_bad_images` (empty otherwise).
    pub fn skipped(&self) -> &[SkippedImage] {
        &self.skipped
    }
}

/// One CSV row after parsing; `row` is 1-based, counting data rows and blank
/// lines (so row `n` is line `n + 1` when no value spans lines).
struct Row {
    row: usize,
    fname: String,
    labels: Vec<String>,
    flag: Option<String>,
}

fn read_rows(cfg: &DatasetConfig, csv: &Path) -> Result<Vec<Row>, DataError> {
    let bytes = std::fs::read(csv).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            DataError::CsvMissing {
                path: csv.to_path_buf(),
            }
        } else {
            DataError::io(csv, source)
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(DataError::EmptyCsv {
            path: csv.to_path_buf(),
        });
    }
    // Syntax is checked here first, as pandas would, so that an error names
    // the line at fault instead of quoting the rest of the file.
    if let Some(problem) = find_csv_problem(&bytes) {
        return Err(DataError::CsvSyntax {
            path: csv.to_path_buf(),
            line: problem.line,
            problem: problem.problem,
            excerpt: shorten(&line_text(&bytes, problem.line), EXCERPT_CHARS),
        });
    }
    // Every column is read as text (schema inference off) so that `is_valid`
    // spellings and numeric-looking file names are interpreted by us, with
    // errors that name the row.
    let frame = CsvReadOptions::default()
        .with_has_header(true)
        .with_infer_schema_length(Some(0))
        .try_into_reader_with_file_path(Some(csv.to_path_buf()))
        .and_then(|reader| reader.finish())
        .map_err(|err| csv_parse_error(csv, &err.to_string()))?;
    if frame.height() == 0 {
        return Err(DataError::EmptyCsv {
            path: csv.to_path_buf(),
        });
    }
    let found = frame
        .get_column_names()
        .iter()
        .map(|name| name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let column = |name: &str| -> Result<Vec<Option<String>>, DataError> {
        let col = frame.column(name).map_err(|_| DataError::MissingColumn {
            path: csv.to_path_buf(),
            column: name.to_string(),
            found: found.clone(),
        })?;
        let text = col
            .str()
            .map_err(|err| csv_parse_error(csv, &err.to_string()))?;
        Ok(text.iter().map(|v| v.map(str::to_string)).collect())
    };
    let fnames = column(&cfg.fname_col)?;
    let labels = column(&cfg.labels_col)?;
    let flags = match &cfg.split {
        SplitConfig::Column(name) => Some(column(name)?),
        SplitConfig::Random { .. } => None,
    };
    if cfg.label_delim.is_empty() {
        return Err(DataError::Config("label_delim must not be empty".into()));
    }

    let blank = blank_rows(&frame, csv)?;
    let mut rows = Vec::with_capacity(fnames.len());
    // The first row of each file name, to refuse contradictory duplicates.
    let mut first_rows: HashMap<PathBuf, usize> = HashMap::new();
    let cells = fnames.into_iter().zip(labels).zip(blank);
    for (i, ((fname, labels), blank)) in cells.enumerate() {
        let row = i + 1;
        // Blank lines (often left at the end by hand edits) are skipped, as
        // pandas and fastai do; row numbers still count them, so row `n` stays
        // line `n + 1` of the file.
        if blank {
            continue;
        }
        let fname = fname.unwrap_or_default().trim().to_string();
        if fname.is_empty() {
            return Err(DataError::EmptyFileName {
                path: csv.to_path_buf(),
                row,
                column: cfg.fname_col.clone(),
            });
        }
        if !is_safe_relative(Path::new(&fname)) {
            return Err(DataError::UnsafeFileName {
                path: csv.to_path_buf(),
                row,
                column: cfg.fname_col.clone(),
                name: shorten(&fname, EXCERPT_CHARS),
            });
        }
        let key: PathBuf = Path::new(&fname)
            .components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect();
        if let Some(&first_row) = first_rows.get(&key) {
            return Err(DataError::DuplicateFileName {
                path: csv.to_path_buf(),
                name: shorten(&fname, EXCERPT_CHARS),
                first_row,
                row,
            });
        }
        first_rows.insert(key, row);
        // An empty labels cell is an image with no object: an all-zero
        // target, as in fastai.
        let labels = labels
            .unwrap_or_default()
            .split(cfg.label_delim.as_str())
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        let flag = flags
            .as_ref()
            .map(|f| f.get(i).cloned().flatten().unwrap_or_default());
        rows.push(Row {
            row,
            fname,
            labels,
            flag,
        });
    }
    if rows.is_empty() {
        return Err(DataError::EmptyCsv {
            path: csv.to_path_buf(),
        });
    }
    Ok(rows)
}

/// `true` for each row whose cells are all missing or whitespace: a blank line.
fn blank_rows(frame: &DataFrame, csv: &Path) -> Result<Vec<bool>, DataError> {
    let mut blank = vec![true; frame.height()];
    for column in frame.columns() {
        let text = column
            .str()
            .map_err(|err| csv_parse_error(csv, &err.to_string()))?;
        for (is_blank, value) in blank.iter_mut().zip(text.iter()) {
            *is_blank &= value.is_none_or(|v| v.trim().is_empty());
        }
    }
    Ok(blank)
}

/// The error for a file every row of which is a validation row.
fn no_training_rows(cfg: &DatasetConfig, csv: &Path, n_rows: usize) -> DataError {
    let reason = match &cfg.split {
        SplitConfig::Column(name) => format!(
            "column `{name}` is true on all {n_rows} rows; set it to False on the rows to train on"
        ),
        SplitConfig::Random { valid_pct, .. } => format!(
            "valid_pct {valid_pct} of {n_rows} rows leaves none for training; lower it or add rows"
        ),
    };
    DataError::NoTrainingRows {
        path: csv.to_path_buf(),
        reason,
    }
}

/// A short error for a CSV the reader refused although [`find_csv_problem`]
/// found nothing: the first line of the reader's message, shortened. The
/// whole message can run to hundreds of lines (it quotes the rest of the
/// file and gives Python-API hints).
fn csv_parse_error(csv: &Path, reader_message: &str) -> DataError {
    let first_line = reader_message
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or("unknown error");
    DataError::CsvParse {
        path: csv.to_path_buf(),
        message: shorten(first_line, EXCERPT_CHARS),
    }
}

/// The most characters of a CSV line an error message shows.
const EXCERPT_CHARS: usize = 60;

/// A syntax problem found by [`find_csv_problem`], on a 1-based line.
#[derive(Debug, PartialEq)]
struct CsvProblem {
    line: usize,
    problem: String,
}

/// Scans comma-separated `bytes` (RFC 4180 quoting) for the first problem a
/// CSV reader stops at: a line that is not UTF-8, a record with more fields
/// than the header, or a quote that is never closed.
fn find_csv_problem(bytes: &[u8]) -> Option<CsvProblem> {
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if std::str::from_utf8(line).is_err() {
            return Some(CsvProblem {
                line: i + 1,
                problem: "the text is not UTF-8; save the file as UTF-8".into(),
            });
        }
    }
    let mut line = 1;
    let mut record_line = 1;
    let mut fields = 1;
    let mut record_empty = true;
    let mut header_fields = None;
    let mut in_quotes = false;
    let mut quote_line = 0;
    let mut field_start = true;
    let mut at = 0;
    while at < bytes.len() {
        let byte = bytes[at];
        at += 1;
        if in_quotes {
            match byte {
                b'"' if bytes.get(at) == Some(&b'"') => at += 1,
                b'"' => in_quotes = false,
                b'\n' => line += 1,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' if field_start => {
                in_quotes = true;
                quote_line = line;
                record_empty = false;
            }
            b',' => {
                fields += 1;
                record_empty = false;
                field_start = true;
                continue;
            }
            b'\n' => {
                if !record_empty {
                    match header_fields {
                        None => header_fields = Some(fields),
                        Some(expected) if fields > expected => {
                            return Some(too_many_fields(record_line, fields, expected));
                        }
                        Some(_) => {}
                    }
                }
                line += 1;
                record_line = line;
                fields = 1;
                record_empty = true;
                field_start = true;
                continue;
            }
            b'\r' => {}
            _ => record_empty = false,
        }
        field_start = false;
    }
    if in_quotes {
        return Some(CsvProblem {
            line: quote_line,
            problem: "a double quote opens a value that is never closed; \
                      close it, or write a literal quote as two (\"\")"
                .into(),
        });
    }
    match header_fields {
        Some(expected) if !record_empty && fields > expected => {
            Some(too_many_fields(record_line, fields, expected))
        }
        _ => None,
    }
}

fn too_many_fields(line: usize, fields: usize, expected: usize) -> CsvProblem {
    CsvProblem {
        line,
        problem: format!(
            "{fields} fields where the header has {expected}; \
             put double quotes around values that contain commas"
        ),
    }
}

/// Line `line` (1-based) of `bytes` as text, without its line ending.
fn line_text(bytes: &[u8], line: usize) -> String {
    let text = bytes
        .split(|&b| b == b'\n')
        .nth(line.saturating_sub(1))
        .unwrap_or_default();
    String::from_utf8_lossy(text).trim_end().to_string()
}

/// At most `max` characters of `text`, with `...` when cut.
fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut short: String = text.chars().take(max).collect();
    short.push_str("...");
    short
}

/// True for a non-empty relative path without `..`, root or drive prefix.
pub(crate) fn is_safe_relative(path: &Path) -> bool {
    path.components().next().is_some()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

fn check_files_exist(image_dir: &Path, rows: &[Row]) -> Result<(), DataError> {
    let missing: Vec<&str> = rows
        .par_iter()
        .filter(|row| !image_dir.join(&row.fname).is_file())
        .map(|row| row.fname.as_str())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut first = missing
        .iter()
        .take(5)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if missing.len() > 5 {
        first.push_str(", ...");
    }
    Err(DataError::MissingImages {
        dir: image_dir.to_path_buf(),
        count: missing.len(),
        first,
    })
}

/// `true` for validation rows.
fn split_rows(cfg: &DatasetConfig, csv: &Path, rows: &[Row]) -> Result<Vec<bool>, DataError> {
    match &cfg.split {
        SplitConfig::Column(name) => rows
            .iter()
            .map(|row| {
                let value = row.flag.as_deref().unwrap_or("").trim();
                parse_bool(value).ok_or_else(|| DataError::BadBool {
                    path: csv.to_path_buf(),
                    row: row.row,
                    column: name.clone(),
                    value: shorten(value, EXCERPT_CHARS),
                })
            })
            .collect(),
        SplitConfig::Random { valid_pct, seed } => {
            if !(0.0..1.0).contains(valid_pct) {
                return Err(DataError::Config(format!(
                    "valid_pct must be in [0, 1), got {valid_pct}"
                )));
            }
            Ok(random_split(rows.len(), *valid_pct, *seed))
        }
    }
}

/// Marks `round(n * valid_pct)` rows as validation, chosen by a seeded
/// shuffle (the same rows for the same `n`, `valid_pct` and `seed`).
pub fn random_split(n: usize, valid_pct: f64, seed: u64) -> Vec<bool> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let n_valid = (n as f64 * valid_pct).round() as usize;
    let mut is_valid = vec![false; n];
    for &i in &order[..n_valid] {
        is_valid[i] = true;
    }
    is_valid
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "True" | "true" | "TRUE" | "1" => Some(true),
        "False" | "false" | "FALSE" | "0" => Some(false),
        _ => None,
    }
}

fn drop_bad_images(items: Vec<Item>, skipped: &mut Vec<SkippedImage>) -> Vec<Item> {
    let checked: Vec<(Item, Option<String>)> = items
        .into_par_iter()
        .map(|item| {
            let err = decode_rgb(&item.path).err().map(|e| e.to_string());
            (item, err)
        })
        .collect();
    let mut kept = Vec::with_capacity(checked.len());
    for (item, err) in checked {
        match err {
            None => kept.push(item),
            Some(reason) => skipped.push(SkippedImage {
                path: item.path,
                reason,
            }),
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_error_keeps_only_its_first_line_shortened() {
        // The shape of polars' message for a broken file: the rows it choked
        // on, then Python-API hints, over many lines.
        let rows = "x".repeat(500);
        let message = format!(
            "\n  could not parse `{rows}` as a row\n\n{rows}\n{rows}\n\
             You might want to try:\n- increasing `infer_schema_length`\n\
             - setting `ignore_errors` to `True`"
        );
        let err = csv_parse_error(Path::new("data/train.csv"), &message);
        let text = err.to_string();
        assert!(matches!(err, DataError::CsvParse { .. }), "{err:?}");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.starts_with("data/train.csv: cannot parse"), "{text}");
        assert!(text.len() < 250, "{text}");
        assert!(!text.contains("infer_schema_length"), "{text}");
    }
}
