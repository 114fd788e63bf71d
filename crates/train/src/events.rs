//! Typed training events and the sinks that render or record them.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::run::atomic_write;

/// What the Learner reports while it trains. Libraries never print: a
/// front end turns these into progress bars, tables and logs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A one-cycle fit starts (fine_tune has two: `frozen`, then `unfrozen`).
    FitBegin {
        phase: String,
        n_epochs: usize,
        n_batches: usize,
        lr_max: Vec<f64>,
        /// The fit continues an interrupted run from this epoch and batch.
        resumed_at: Option<(usize, usize)>,
    },
    EpochBegin {
        phase: String,
        epoch: usize,
        n_epochs: usize,
    },
    /// After each optimizer step.
    BatchEnd {
        phase: String,
        epoch: usize,
        batch: usize,
        n_batches: usize,
        loss: f32,
        smooth_loss: f64,
        lrs: Vec<f64>,
        mom: f64,
    },
    /// After each validation batch (for progress bars).
    ValidBatchEnd {
        batch: usize,
        n_batches: usize,
    },
    EpochEnd(EpochRecord),
    FitEnd {
        phase: String,
    },
    /// Training state was written to a run folder.
    Checkpoint {
        path: PathBuf,
        epoch: usize,
        batch: usize,
    },
}

/// One row of fastai's epoch table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub phase: String,
    /// Epoch within the fit, from 0 as fastai prints it.
    pub epoch: usize,
    /// fastai's smoothed training loss at the end of the epoch.
    pub train_loss: f64,
    pub valid_loss: f64,
    /// Metric names and values in table order (`accuracy_multi`, ...).
    pub metrics: Vec<(String, f64)>,
    /// Wall-clock seconds of training plus validation.
    pub seconds: f64,
}

/// Receives every event. Sinks that write files report I/O errors, which
/// stop training rather than losing the record silently.
pub trait Sink {
    fn on_event(&mut self, event: &Event) -> Result<()>;
}

/// fastai's displayed `train_loss`: an exponential moving average of the
/// batch losses with β = 0.98, divided by `1 − β^count` to remove the bias
/// towards zero of the first steps. fastai resets it at the start of every
/// fit (so once per fine_tune phase), not every epoch.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SmoothedLoss {
    pub beta: f64,
    pub average: f64,
    pub count: u64,
}

impl Default for SmoothedLoss {
    fn default() -> Self {
        Self {
            beta: 0.98,
            average: 0.0,
            count: 0,
        }
    }
}

impl SmoothedLoss {
    /// Adds a batch loss and returns the debiased average.
    pub fn push(&mut self, loss: f64) -> f64 {
        self.count += 1;
        self.average = self.beta * self.average + (1.0 - self.beta) * loss;
        self.value()
    }

    /// The debiased average (NaN before the first batch).
    pub fn value(&self) -> f64 {
        self.average / (1.0 - self.beta.powi(self.count as i32))
    }
}

/// Formats seconds as fastai does: `mm:ss`, or `h:mm:ss` past an hour.
pub fn format_time(seconds: f64) -> String {
    let t = seconds.max(0.0) as u64;
    let (h, m, s) = (t / 3600, (t / 60) % 60, t % 60);
    if h != 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m:02}:{s:02}")
    }
}

/// Prints fastai's epoch table (`epoch train_loss valid_loss accuracy_multi time`)
/// with fastprogress's console layout: names padded to 8 characters and
/// joined by two spaces, values left-aligned under them. One header per fit.
pub struct EpochTable<W: Write> {
    out: W,
    names: Option<Vec<String>>,
}

impl<W: Write> EpochTable<W> {
    pub fn new(out: W) -> Self {
        Self { out, names: None }
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write> Sink for EpochTable<W> {
    fn on_event(&mut self, event: &Event) -> Result<()> {
        let line = match event {
            Event::FitBegin { .. } => {
                self.names = None;
                return Ok(());
            }
            Event::EpochEnd(record) => {
                let mut text = String::new();
                if self.names.is_none() {
                    let mut names = vec![
                        "epoch".to_string(),
                        "train_loss".into(),
                        "valid_loss".into(),
                    ];
                    names.extend(record.metrics.iter().map(|(n, _)| n.clone()));
                    names.push("time".into());
                    let padded: Vec<String> = names.iter().map(|n| format!("{n:<8}")).collect();
                    text.push_str(&padded.join("  "));
                    text.push('\n');
                    self.names = Some(padded);
                }
                let mut values = vec![
                    record.epoch.to_string(),
                    format!("{:.6}", record.train_loss),
                    format!("{:.6}", record.valid_loss),
                ];
                values.extend(record.metrics.iter().map(|(_, v)| format!("{v:.6}")));
                values.push(format_time(record.seconds));
                let names = self.names.as_ref().expect("set above");
                for (value, name) in values.iter().zip(names) {
                    text.push_str(&format!("{value:<width$}", width = name.len() + 2));
                }
                text.truncate(text.trim_end().len());
                text
            }
            _ => return Ok(()),
        };
        writeln!(self.out, "{line}").map_err(|source| Error::Io {
            path: PathBuf::from("<epoch table>"),
            source,
        })
    }
}

/// `history.csv`: one row per epoch, `phase,epoch,train_loss,valid_loss,<metrics>,seconds`.
/// The whole file is rewritten atomically after each epoch, so a reader
/// never sees half a row; rows already in the file (from an interrupted
/// run being resumed) are kept.
pub struct HistoryCsv {
    path: PathBuf,
    header: Option<String>,
    rows: Vec<String>,
}

impl HistoryCsv {
    /// Opens `path`, keeping the rows of an existing file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let (header, rows) = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mut lines = text.lines().map(str::to_string);
                (lines.next(), lines.collect())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, Vec::new()),
            Err(source) => return Err(Error::Io { path, source }),
        };
        Ok(Self { path, header, rows })
    }

    /// Keeps only the rows for which `keep(phase, epoch)` is true; used on
    /// resume to drop epochs recorded after the checkpoint.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, usize) -> bool) {
        self.rows.retain(|row| {
            let mut cells = row.split(',');
            let phase = cells.next().unwrap_or("");
            let epoch = cells.next().and_then(|e| e.parse().ok()).unwrap_or(0);
            keep(phase, epoch)
        });
    }
}

impl Sink for HistoryCsv {
    fn on_event(&mut self, event: &Event) -> Result<()> {
        let Event::EpochEnd(record) = event else {
            return Ok(());
        };
        if self.header.is_none() {
            let mut header = "phase,epoch,train_loss,valid_loss".to_string();
            for (name, _) in &record.metrics {
                header.push(',');
                header.push_str(name);
            }
            header.push_str(",seconds");
            self.header = Some(header);
        }
        let mut row = format!(
            "{},{},{},{}",
            record.phase, record.epoch, record.train_loss, record.valid_loss
        );
        for (_, value) in &record.metrics {
            row.push_str(&format!(",{value}"));
        }
        row.push_str(&format!(",{:.3}", record.seconds));
        self.rows.push(row);
        let mut text = self.header.clone().unwrap_or_default();
        text.push('\n');
        for row in &self.rows {
            text.push_str(row);
            text.push('\n');
        }
        atomic_write(&self.path, text.as_bytes())
    }
}

/// `events.jsonl`: every event as one JSON object per line, appended. It is
/// a log, so it grows line by line instead of being replaced; each line is
/// written with one call and flushed.
pub struct EventsJsonl {
    path: PathBuf,
    file: File,
}

impl EventsJsonl {
    /// Opens `path` for appending, creating it if needed.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Self { path, file })
    }
}

impl Sink for EventsJsonl {
    fn on_event(&mut self, event: &Event) -> Result<()> {
        let mut line = serde_json::to_string(event).map_err(|source| Error::Json {
            path: self.path.clone(),
            source,
        })?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })
    }
}

/// Collects events in memory (tests, and callers that render at the end).
#[derive(Default)]
pub struct Recorder {
    pub events: Vec<Event>,
}

impl Sink for Recorder {
    fn on_event(&mut self, event: &Event) -> Result<()> {
        self.events.push(event.clone());
        Ok(())
    }
}

/// A shared sink, so the caller can keep a handle (e.g. to a [`Recorder`])
/// while the Learner owns a boxed clone.
impl<S: Sink> Sink for std::sync::Arc<std::sync::Mutex<S>> {
    fn on_event(&mut self, event: &Event) -> Result<()> {
        self.lock()
            .map_err(|_| Error::Invalid("a sink panicked earlier".into()))?
            .on_event(event)
    }
}
