//! fastai's learning-rate finder: train on an exponentially growing learning
//! rate, record the smoothed loss, stop when it diverges, suggest a rate, and
//! put the weights back as they were.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::events::SmoothedLoss;
use crate::learner::Learner;
use crate::optim::StepHypers;

/// Settings of [`Learner::lr_find`]; the defaults are fastai's.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrFindConfig {
    pub start_lr: f64,
    pub end_lr: f64,
    pub num_it: usize,
    /// Stop once the smoothed loss exceeds 4× the best seen (or is not finite).
    pub stop_div: bool,
    /// Momentum (β1) of Adam while searching: fastai leaves its default, 0.9.
    pub mom: f64,
}

impl Default for LrFindConfig {
    fn default() -> Self {
        Self {
            start_lr: 1e-7,
            end_lr: 10.0,
            num_it: 100,
            stop_div: true,
            mom: 0.9,
        }
    }
}

/// What the finder recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrFindResult {
    /// Learning rate of each step taken.
    pub lrs: Vec<f64>,
    /// Smoothed training loss after each step.
    pub losses: Vec<f64>,
    /// fastai's `valley` suggestion; `None` when too few steps were recorded.
    pub suggestion: Option<f64>,
    /// Whether the search stopped early because the loss diverged.
    pub diverged: bool,
}

/// The learning rate of step `iteration` of `num_it`: exponential from
/// `start` to `end` (fastai's `SchedExp` at `pos = iteration / num_it`).
pub fn exp_lr(start: f64, end: f64, iteration: usize, num_it: usize) -> f64 {
    let pos = iteration as f64 / num_it.max(1) as f64;
    start * (end / start).powf(pos)
}

/// fastai's `valley` suggestion: the longest run of decreasing losses, then a
/// point a half past its first third. fastai (like us) drops the first tenth
/// and the last five points of the record before looking.
pub fn valley(lrs: &[f64], losses: &[f64]) -> Option<f64> {
    let n_all = lrs.len().min(losses.len());
    let skip = n_all / 10;
    if n_all < skip + 5 + 2 {
        return None;
    }
    let lrs = &lrs[skip..n_all - 5];
    let losses = &losses[skip..n_all - 5];
    let n = losses.len();
    let mut longest = vec![1usize; n];
    // fastai's `max_start` is one before the run's first point, so it is -1
    // for a run that starts at the first point: keep it signed.
    let (mut max_start, mut max_end) = (0isize, 0usize);
    for i in 1..n {
        for j in 0..i {
            if losses[i] < losses[j] && longest[i] < longest[j] + 1 {
                longest[i] = longest[j] + 1;
            }
            if longest[max_end] < longest[i] {
                max_end = i;
                max_start = max_end as isize - longest[max_end] as isize;
            }
        }
    }
    let sections = (max_end as isize - max_start) as f64 / 3.0;
    let index = max_start + sections as isize + (sections / 2.0) as isize;
    lrs.get(index.clamp(0, n as isize - 1) as usize).copied()
}

impl<M: crate::trainable::Trainable> Learner<M> {
    /// Runs the finder on the training set with the model as it is (fastai
    /// runs it frozen right after building the Learner), then restores the
    /// weights, running statistics and optimizer state.
    pub fn lr_find(&mut self, config: &LrFindConfig) -> Result<LrFindResult> {
        let snapshot = self.snapshot()?;
        let outcome = self.lr_find_steps(config);
        self.restore(&snapshot)?;
        outcome
    }

    fn lr_find_steps(&mut self, config: &LrFindConfig) -> Result<LrFindResult> {
        let n_groups = self.optimizer().groups().len();
        let mut smooth = SmoothedLoss::default();
        let (mut lrs, mut losses) = (Vec::new(), Vec::new());
        let mut best = f64::INFINITY;
        let mut diverged = false;
        let mut epoch = 0;
        'search: while lrs.len() < config.num_it {
            let n_batches = self.train_batches();
            if n_batches == 0 {
                break;
            }
            for batch in self.train_epoch(epoch) {
                let batch = batch?;
                let lr = exp_lr(config.start_lr, config.end_lr, lrs.len(), config.num_it);
                let hypers = StepHypers {
                    lrs: vec![lr; n_groups],
                    mom: config.mom,
                };
                let loss = self.train_step(&batch, &hypers)?;
                let smoothed = smooth.push(f64::from(loss));
                lrs.push(lr);
                losses.push(smoothed);
                best = best.min(smoothed);
                if config.stop_div && (!smoothed.is_finite() || smoothed > 4.0 * best) {
                    diverged = true;
                    break 'search;
                }
                if lrs.len() >= config.num_it {
                    break 'search;
                }
                if self.is_cancelled() {
                    return Err(crate::error::Error::Interrupted {
                        epoch,
                        batch: lrs.len(),
                    });
                }
            }
            epoch += 1;
        }
        let suggestion = valley(&lrs, &losses);
        Ok(LrFindResult {
            lrs,
            losses,
            suggestion,
            diverged,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_lr_spans_start_to_end() {
        assert!((exp_lr(1e-7, 10.0, 0, 100) - 1e-7).abs() < 1e-20);
        assert!((exp_lr(1e-7, 10.0, 50, 100) - 1e-7 * 1e4).abs() < 1e-12);
        assert!((exp_lr(1e-7, 10.0, 100, 100) - 10.0).abs() < 1e-9);
    }

    #[test]
    fn valley_points_into_the_longest_descent() {
        // 100 points: flat, then a long descent over lrs[40..80], then a blow-up.
        let lrs: Vec<f64> = (0..100).map(|i| exp_lr(1e-7, 10.0, i, 100)).collect();
        let losses: Vec<f64> = (0..100)
            .map(|i| match i {
                0..40 => 1.0 + 0.001 * (i % 2) as f64,
                40..80 => 1.0 - (i - 40) as f64 * 0.02,
                _ => 0.2 + (i - 80) as f64 * 0.5,
            })
            .collect();
        let lr = valley(&lrs, &losses).unwrap();
        // After dropping the first 10 points, the longest strictly decreasing
        // run ends at point 80 (local 70) with length 42 (1.001, 1.0, then the
        // descent, then 0.2), so fastai's start is 70 - 42 = 28; sections = 14
        // → local index 28 + 14 + 7 = 49 → point 59.
        assert_eq!(lr, lrs[59]);
    }

    #[test]
    fn valley_of_a_loss_falling_from_the_start() {
        // Strictly falling over the kept points: the run starts at the first
        // kept point (fastai's max_start = -1) and the index stays in range.
        let lrs: Vec<f64> = (0..30).map(|i| exp_lr(1e-7, 10.0, i, 30)).collect();
        let losses: Vec<f64> = (0..30).map(|i| 10.0 - i as f64 * 0.1).collect();
        // Kept: points 3..25 (22 points); run -1..21 → sections 22/3 = 7.33
        // → index -1 + 7 + 3 = 9 → point 12.
        assert_eq!(valley(&lrs, &losses), Some(lrs[12]));
    }

    #[test]
    fn valley_needs_enough_points() {
        assert_eq!(valley(&[1.0; 6], &[1.0; 6]), None);
    }
}
