//! One-cycle learning-rate and momentum schedules, and fine_tune's phases.
//!
//! Pure functions over numbers, following fastai's `callback/schedule.py`
//! (see `shared/reference/fastai-recipe.md` §3–§4).

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

use crate::optim::StepHypers;

/// Cosine from `start` to `end` as `pos` goes from 0 to 1 (fastai's `sched_cos`).
pub fn sched_cos(start: f64, end: f64, pos: f64) -> f64 {
    start + (1.0 + (PI * (1.0 - pos)).cos()) * (end - start) / 2.0
}

/// fastai's `combined_cos(pct, start, middle, end)` at `pos` ∈ [0, 1]: a
/// cosine from `start` to `middle` over the first `pct_start`, then from
/// `middle` to `end`.
///
/// fastai keeps the phase boundaries in a float32 tensor, compares `pos` to
/// them in float32 and computes the position inside the phase in float32;
/// this does the same so that steps next to a boundary match.
pub fn combined_cos(pct_start: f64, start: f64, middle: f64, end: f64, pos: f64) -> f64 {
    let boundaries = [
        0.0f32,
        pct_start as f32,
        pct_start as f32 + (1.0 - pct_start) as f32,
    ];
    let pos32 = pos as f32;
    let phase = if pos32 >= boundaries[1] { 1 } else { 0 };
    let local = (pos32 - boundaries[phase]) / (boundaries[phase + 1] - boundaries[phase]);
    let local = f64::from(local);
    if phase == 0 {
        sched_cos(start, middle, local)
    } else {
        sched_cos(middle, end, local)
    }
}

/// `n` values spread geometrically from `start` to `stop` (fastcore's `even_mults`).
pub fn even_mults(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n <= 1 {
        return vec![stop];
    }
    let step = (stop / start).powf(1.0 / (n - 1) as f64);
    (0..n).map(|i| start * step.powf(i as f64)).collect()
}

/// A learning rate for the parameter groups, as fastai's `slice`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum LrSpec {
    /// The same lr for every group (a plain float in fastai).
    All(f64),
    /// `slice(stop)`: `stop/10` for every group but the last, `stop` for the last.
    Slice(f64),
    /// `slice(start, stop)`: geometric from `start` (first group) to `stop` (last).
    Range(f64, f64),
}

impl LrSpec {
    /// One learning rate per group.
    pub fn spread(&self, n_groups: usize) -> Vec<f64> {
        match *self {
            LrSpec::All(lr) => vec![lr; n_groups],
            LrSpec::Slice(stop) => {
                let mut lrs = vec![stop / 10.0; n_groups.saturating_sub(1)];
                lrs.push(stop);
                lrs
            }
            LrSpec::Range(start, stop) => even_mults(start, stop, n_groups),
        }
    }
}

/// `fit_one_cycle`'s parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OneCycle {
    /// Peak learning rate of each group.
    pub lr_max: Vec<f64>,
    pub epochs: usize,
    /// Training batches per epoch.
    pub n_batches: usize,
    pub pct_start: f64,
    /// The cycle starts at `lr_max / div` (fastai default 25).
    pub div: f64,
    /// The cycle ends at `lr_max / div_final` (fastai default 1e5).
    pub div_final: f64,
    /// Momentum at the start, at the peak lr, and at the end (0.95, 0.85, 0.95).
    pub moms: (f64, f64, f64),
}

impl OneCycle {
    /// fastai's defaults: pct_start 0.25, div 25, div_final 1e5, moms (0.95, 0.85, 0.95).
    pub fn new(lr_max: Vec<f64>, epochs: usize, n_batches: usize) -> Self {
        Self {
            lr_max,
            epochs,
            n_batches,
            pct_start: 0.25,
            div: 25.0,
            div_final: 1e5,
            moms: (0.95, 0.85, 0.95),
        }
    }

    /// Number of optimizer steps in the whole fit.
    pub fn total_steps(&self) -> usize {
        self.epochs * self.n_batches
    }

    /// Learning rates and momentum at a training position in [0, 1).
    pub fn at_pos(&self, pos: f64) -> StepHypers {
        let lrs = self
            .lr_max
            .iter()
            .map(|&lr| combined_cos(self.pct_start, lr / self.div, lr, lr / self.div_final, pos))
            .collect();
        let (m0, m1, m2) = self.moms;
        StepHypers {
            lrs,
            mom: combined_cos(self.pct_start, m0, m1, m2, pos),
        }
    }

    /// Hyperparameters for batch `batch` of epoch `epoch`.
    pub fn at(&self, epoch: usize, batch: usize) -> StepHypers {
        self.at_pos(train_position(epoch, batch, self.n_batches, self.epochs))
    }
}

/// fastai's `pct_train` before batch `batch` of epoch `epoch`: set to
/// `epoch / n_epochs` at the start of each epoch, then incremented by
/// `1 / (n_batches · n_epochs)` after each batch, in float64. Accumulating
/// the same way keeps the float32 comparison in [`combined_cos`] identical.
pub fn train_position(epoch: usize, batch: usize, n_batches: usize, n_epochs: usize) -> f64 {
    let mut pos = epoch as f64 / n_epochs as f64;
    let increment = 1.0 / (n_batches * n_epochs) as f64;
    for _ in 0..batch {
        pos += increment;
    }
    pos
}

/// `fine_tune`'s arguments (fastai's defaults in [`FineTune::new`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FineTune {
    pub epochs: usize,
    pub base_lr: f64,
    pub freeze_epochs: usize,
    pub lr_mult: f64,
    pub pct_start: f64,
    pub div: f64,
}

impl FineTune {
    /// `fine_tune(epochs, base_lr, freeze_epochs=1, lr_mult=100, pct_start=0.3, div=5)`.
    pub fn new(epochs: usize, base_lr: f64) -> Self {
        Self {
            epochs,
            base_lr,
            freeze_epochs: 1,
            lr_mult: 100.0,
            pct_start: 0.3,
            div: 5.0,
        }
    }

    /// The two one-cycle fits: frozen (`slice(base_lr)`, pct_start 0.99,
    /// default div) then unfrozen (`slice(base_lr/2/lr_mult, base_lr/2)`).
    pub fn phases(&self, n_groups: usize, n_batches: usize) -> [OneCycle; 2] {
        let mut frozen = OneCycle::new(
            LrSpec::Slice(self.base_lr).spread(n_groups),
            self.freeze_epochs,
            n_batches,
        );
        frozen.pct_start = 0.99;
        let half = self.base_lr / 2.0;
        let mut unfrozen = OneCycle::new(
            LrSpec::Range(half / self.lr_mult, half).spread(n_groups),
            self.epochs,
            n_batches,
        );
        unfrozen.pct_start = self.pct_start;
        unfrozen.div = self.div;
        [frozen, unfrozen]
    }
}
