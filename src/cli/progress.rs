//! Progress of training and validation on stderr: a bar on a terminal, a
//! plain line now and then otherwise (logs, CI, pipes).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use multilabel_train::{Event, Sink};

/// Renders `BatchEnd` / `ValidBatchEnd` events.
pub struct ProgressSink {
    bar: Option<ProgressBar>,
    terminal: bool,
    last_line: Instant,
}

impl ProgressSink {
    pub fn new() -> Self {
        Self {
            bar: None,
            terminal: std::io::stderr().is_terminal(),
            last_line: Instant::now(),
        }
    }

    fn bar(&mut self, total: usize, label: &str) -> &ProgressBar {
        let bar = self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>10} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})",
                )
                .expect("static progress template")
                .progress_chars("=> "),
            );
            bar
        });
        bar.set_length(total as u64);
        bar.set_prefix(label.to_string());
        bar
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    /// A plain line at most every 10 s, and at the last batch.
    fn line(&mut self, done: usize, total: usize, text: String) {
        if done == total || self.last_line.elapsed() >= Duration::from_secs(10) {
            eprintln!("{text}");
            self.last_line = Instant::now();
        }
    }
}

impl Default for ProgressSink {
    fn default() -> Self {
        Self::new()
    }
}

impl Sink for ProgressSink {
    fn on_event(&mut self, event: &Event) -> multilabel_train::Result<()> {
        match event {
            Event::BatchEnd {
                phase,
                epoch,
                batch,
                n_batches,
                smooth_loss,
                ..
            } => {
                let done = batch + 1;
                if self.terminal {
                    let bar = self.bar(*n_batches, phase);
                    bar.set_position(done as u64);
                    bar.set_message(format!("epoch {epoch} loss {smooth_loss:.4}"));
                } else {
                    self.line(
                        done,
                        *n_batches,
                        format!(
                            "{phase} epoch {epoch}: batch {done}/{n_batches} loss {smooth_loss:.4}"
                        ),
                    );
                }
            }
            Event::ValidBatchEnd { batch, n_batches } => {
                let done = batch + 1;
                if self.terminal {
                    let bar = self.bar(*n_batches, "valid");
                    bar.set_position(done as u64);
                    bar.set_message(String::new());
                    if done == *n_batches {
                        self.finish();
                    }
                } else {
                    self.line(done, *n_batches, format!("valid: batch {done}/{n_batches}"));
                }
            }
            Event::EpochEnd(_) | Event::FitEnd { .. } => self.finish(),
            _ => {}
        }
        Ok(())
    }
}
