//! Multi-label metrics as pure functions over row-major `[N, C]` slices.
//!
//! `probs` are probabilities (after the sigmoid) and `targets` are 0/1, both
//! laid out row by row: element `i * n_classes + j` is image `i`, class `j`.
//! A prediction is positive when `prob > thresh`, strictly, as in fastai's
//! `accuracy_multi`.
//!
//! A class with no positive target has no defined average precision: its AP
//! is `None` and it is left out of the mean AP (scikit-learn would report 0
//! and a warning). Its F1 is 0, as scikit-learn's `zero_division=0`.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// fastai's `accuracy_multi(..., sigmoid=False)`: the fraction of all N×C
/// elements where `(prob > thresh) == target`.
pub fn accuracy_multi(probs: &[f32], targets: &[f32], thresh: f32) -> Result<f64> {
    check_same_len(probs, targets)?;
    if probs.is_empty() {
        return Err(Error::Invalid("accuracy_multi of zero predictions".into()));
    }
    let correct = probs
        .iter()
        .zip(targets)
        .filter(|&(&p, &t)| (p > thresh) == (t > 0.5))
        .count();
    Ok(correct as f64 / probs.len() as f64)
}

/// `n` evenly spaced values from `start` to `end` inclusive, computed like
/// `torch.linspace` in float32 (the first half counts up from `start`, the
/// second half down from `end`).
pub fn linspace(start: f32, end: f32, n: usize) -> Vec<f32> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f32;
            let half = n / 2;
            (0..n)
                .map(|i| {
                    if i < half {
                        start + step * i as f32
                    } else {
                        end - step * (n - 1 - i) as f32
                    }
                })
                .collect()
        }
    }
}

/// The default sweep: 30 thresholds from 0.05 to 0.95.
pub fn default_thresholds() -> Vec<f32> {
    linspace(0.05, 0.95, 30)
}

/// accuracy_multi at one threshold of a sweep.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    pub thresh: f32,
    pub accuracy_multi: f64,
}

/// accuracy_multi at each threshold.
pub fn threshold_sweep(
    probs: &[f32],
    targets: &[f32],
    thresholds: &[f32],
) -> Result<Vec<SweepPoint>> {
    thresholds
        .iter()
        .map(|&thresh| {
            Ok(SweepPoint {
                thresh,
                accuracy_multi: accuracy_multi(probs, targets, thresh)?,
            })
        })
        .collect()
}

/// The point with the highest accuracy; the lowest threshold wins a tie.
pub fn best_threshold(sweep: &[SweepPoint]) -> Option<SweepPoint> {
    sweep.iter().copied().fold(None, |best, p| match best {
        Some(b) if b.accuracy_multi >= p.accuracy_multi => Some(b),
        _ => Some(p),
    })
}

/// Non-interpolated average precision of one class, equal to scikit-learn's
/// `average_precision_score`: Σ (Rₙ − Rₙ₋₁)·Pₙ over the distinct scores,
/// highest first, tied scores forming one threshold. `None` without positives.
pub fn average_precision(scores: &[f32], targets: &[f32]) -> Result<Option<f64>> {
    let Some(curve) = pr_curve(scores, targets)? else {
        return Ok(None);
    };
    let mut ap = 0.0;
    let mut previous_recall = 0.0;
    for (precision, recall) in curve {
        ap += (recall - previous_recall) * precision;
        previous_recall = recall;
    }
    Ok(Some(ap))
}

/// PASCAL VOC2007's 11-point interpolated AP of one class (the devkit's
/// `VOCevalcls.m`): the mean over t ∈ {0, 0.1, …, 1} of the highest precision
/// at recall ≥ t. Tied scores form one threshold, so the result does not
/// depend on their order. `None` without positives.
pub fn average_precision_voc07(scores: &[f32], targets: &[f32]) -> Result<Option<f64>> {
    let Some(curve) = pr_curve(scores, targets)? else {
        return Ok(None);
    };
    let mut total = 0.0;
    for k in 0..=10 {
        let t = k as f64 / 10.0;
        let best = curve
            .iter()
            .filter(|&&(_, recall)| recall >= t)
            .map(|&(precision, _)| precision)
            .fold(0.0f64, f64::max);
        total += best;
    }
    Ok(Some(total / 11.0))
}

/// Per-class and mean average precision, both kinds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MeanAp {
    pub per_class: Vec<Option<f64>>,
    pub per_class_voc07: Vec<Option<f64>>,
    /// Mean over the classes that have positives.
    pub map: f64,
    pub map_voc07: f64,
}

/// Average precision of every column, and the means.
pub fn mean_average_precision(probs: &[f32], targets: &[f32], n_classes: usize) -> Result<MeanAp> {
    let n = rows(probs, targets, n_classes)?;
    let mut per_class = Vec::with_capacity(n_classes);
    let mut per_class_voc07 = Vec::with_capacity(n_classes);
    for j in 0..n_classes {
        let scores: Vec<f32> = (0..n).map(|i| probs[i * n_classes + j]).collect();
        let truth: Vec<f32> = (0..n).map(|i| targets[i * n_classes + j]).collect();
        per_class.push(average_precision(&scores, &truth)?);
        per_class_voc07.push(average_precision_voc07(&scores, &truth)?);
    }
    Ok(MeanAp {
        map: mean_some(&per_class),
        map_voc07: mean_some(&per_class_voc07),
        per_class,
        per_class_voc07,
    })
}

/// F1 scores and exact-match accuracy at one threshold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThresholdScores {
    pub thresh: f32,
    pub accuracy_multi: f64,
    /// 2·ΣTP / (2·ΣTP + ΣFP + ΣFN) over all classes.
    pub f1_micro: f64,
    /// Mean of the per-class F1 over all classes.
    pub f1_macro: f64,
    pub f1_per_class: Vec<f64>,
    /// Fraction of images whose whole label set is predicted exactly.
    pub exact_match: f64,
    /// Positive targets per class.
    pub support: Vec<usize>,
}

/// F1 (micro, macro, per class), exact match and accuracy_multi at `thresh`.
pub fn scores_at(
    probs: &[f32],
    targets: &[f32],
    n_classes: usize,
    thresh: f32,
) -> Result<ThresholdScores> {
    let counts = Counts::new(probs, targets, n_classes, |_| thresh)?;
    Ok(ThresholdScores {
        thresh,
        accuracy_multi: accuracy_multi(probs, targets, thresh)?,
        f1_micro: counts.f1_micro(),
        f1_macro: counts.f1_macro(),
        f1_per_class: counts.f1_per_class(),
        exact_match: counts.exact_match(),
        support: counts.support(),
    })
}

/// Scores with one threshold per class (see [`per_class_thresholds`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PerClassScores {
    /// The threshold of each class, in class order.
    pub thresholds: Vec<f32>,
    /// The fraction of all N×C elements where `(prob > thresh[class]) == target`.
    pub accuracy_multi: f64,
    pub f1_micro: f64,
    pub f1_macro: f64,
    pub f1_per_class: Vec<f64>,
    pub exact_match: f64,
}

/// accuracy_multi, F1 and exact match with class `j` positive when
/// `prob > thresholds[j]`.
pub fn scores_per_class(
    probs: &[f32],
    targets: &[f32],
    n_classes: usize,
    thresholds: &[f32],
) -> Result<PerClassScores> {
    if thresholds.len() != n_classes {
        return Err(Error::Invalid(format!(
            "{} thresholds for {n_classes} classes",
            thresholds.len()
        )));
    }
    let counts = Counts::new(probs, targets, n_classes, |j| thresholds[j])?;
    Ok(PerClassScores {
        thresholds: thresholds.to_vec(),
        accuracy_multi: counts.correct as f64 / probs.len() as f64,
        f1_micro: counts.f1_micro(),
        f1_macro: counts.f1_macro(),
        f1_per_class: counts.f1_per_class(),
        exact_match: counts.exact_match(),
    })
}

/// For each class, the candidate threshold that maximises that class's F1
/// (the lowest such candidate on a tie). A class without a positive target
/// has no F1 to maximise and keeps `fallback` (for example the single
/// threshold chosen for all classes).
pub fn per_class_thresholds(
    probs: &[f32],
    targets: &[f32],
    n_classes: usize,
    candidates: &[f32],
    fallback: f32,
) -> Result<Vec<f32>> {
    if candidates.is_empty() {
        return Err(Error::Invalid("no candidate thresholds".into()));
    }
    let f1s: Vec<Vec<f64>> = candidates
        .iter()
        .map(|&t| Ok(Counts::new(probs, targets, n_classes, |_| t)?.f1_per_class()))
        .collect::<Result<_>>()?;
    let support = Counts::new(probs, targets, n_classes, |_| fallback)?.support();
    Ok((0..n_classes)
        .map(|j| {
            if support[j] == 0 {
                return fallback;
            }
            let mut best = 0;
            for (k, f1) in f1s.iter().enumerate() {
                if f1[j] > f1s[best][j] {
                    best = k;
                }
            }
            candidates[best]
        })
        .collect())
}

/// Validation figures with thresholds chosen on other images: the rows are
/// split into two halves (even and odd row numbers), thresholds are chosen
/// on one half and scored on the other, both ways, and the two scores are
/// averaged.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeldOutScores {
    pub accuracy_multi: f64,
    pub f1_micro: f64,
    pub f1_macro: f64,
    pub exact_match: f64,
}

/// [`HeldOutScores`] of both ways of choosing thresholds: one for all
/// classes (the best accuracy_multi of the sweep over `candidates`, as
/// `eval` picks it) and one per class ([`per_class_thresholds`]).
/// Returns `(single, per_class)`; needs at least two rows.
pub fn held_out_scores(
    probs: &[f32],
    targets: &[f32],
    n_classes: usize,
    candidates: &[f32],
) -> Result<(HeldOutScores, HeldOutScores)> {
    let n = rows(probs, targets, n_classes)?;
    if n < 2 {
        return Err(Error::Invalid(
            "choosing thresholds on held-out rows needs at least two rows".into(),
        ));
    }
    let half = |parity: usize, values: &[f32]| -> Vec<f32> {
        values
            .chunks(n_classes)
            .enumerate()
            .filter(|(i, _)| i % 2 == parity)
            .flat_map(|(_, row)| row.iter().copied())
            .collect()
    };
    let mut single = [0f64; 4];
    let mut each = [0f64; 4];
    for (choose, score) in [(0, 1), (1, 0)] {
        let (cp, ct) = (half(choose, probs), half(choose, targets));
        let (sp, st) = (half(score, probs), half(score, targets));
        let sweep = threshold_sweep(&cp, &ct, candidates)?;
        let best = best_threshold(&sweep)
            .ok_or_else(|| Error::Invalid("no candidate thresholds".into()))?;
        let one = scores_at(&sp, &st, n_classes, best.thresh)?;
        let chosen = per_class_thresholds(&cp, &ct, n_classes, candidates, best.thresh)?;
        let per = scores_per_class(&sp, &st, n_classes, &chosen)?;
        for (acc, v) in single.iter_mut().zip([
            one.accuracy_multi,
            one.f1_micro,
            one.f1_macro,
            one.exact_match,
        ]) {
            *acc += v / 2.0;
        }
        for (acc, v) in each.iter_mut().zip([
            per.accuracy_multi,
            per.f1_micro,
            per.f1_macro,
            per.exact_match,
        ]) {
            *acc += v / 2.0;
        }
    }
    let pack = |v: [f64; 4]| HeldOutScores {
        accuracy_multi: v[0],
        f1_micro: v[1],
        f1_macro: v[2],
        exact_match: v[3],
    };
    Ok((pack(single), pack(each)))
}

/// Confusion counts per class, with class `j` predicted positive when
/// `prob > thresh(j)`.
struct Counts {
    tp: Vec<usize>,
    fp: Vec<usize>,
    fn_: Vec<usize>,
    /// Images whose whole label set is predicted exactly.
    exact: usize,
    /// Elements predicted correctly.
    correct: usize,
    rows: usize,
}

impl Counts {
    fn new(
        probs: &[f32],
        targets: &[f32],
        n_classes: usize,
        thresh: impl Fn(usize) -> f32,
    ) -> Result<Self> {
        let n = rows(probs, targets, n_classes)?;
        let thresholds: Vec<f32> = (0..n_classes).map(thresh).collect();
        let mut c = Counts {
            tp: vec![0; n_classes],
            fp: vec![0; n_classes],
            fn_: vec![0; n_classes],
            exact: 0,
            correct: 0,
            rows: n,
        };
        for i in 0..n {
            let mut all_right = true;
            for (j, &t) in thresholds.iter().enumerate() {
                let predicted = probs[i * n_classes + j] > t;
                let actual = targets[i * n_classes + j] > 0.5;
                match (predicted, actual) {
                    (true, true) => c.tp[j] += 1,
                    (true, false) => c.fp[j] += 1,
                    (false, true) => c.fn_[j] += 1,
                    (false, false) => {}
                }
                all_right &= predicted == actual;
                c.correct += usize::from(predicted == actual);
            }
            c.exact += usize::from(all_right);
        }
        Ok(c)
    }

    fn f1(tp: usize, fp: usize, fn_: usize) -> f64 {
        let denominator = 2 * tp + fp + fn_;
        if denominator == 0 {
            0.0
        } else {
            2.0 * tp as f64 / denominator as f64
        }
    }

    fn f1_per_class(&self) -> Vec<f64> {
        (0..self.tp.len())
            .map(|j| Self::f1(self.tp[j], self.fp[j], self.fn_[j]))
            .collect()
    }

    fn f1_micro(&self) -> f64 {
        Self::f1(
            self.tp.iter().sum(),
            self.fp.iter().sum(),
            self.fn_.iter().sum(),
        )
    }

    fn f1_macro(&self) -> f64 {
        self.f1_per_class().iter().sum::<f64>() / self.tp.len() as f64
    }

    fn exact_match(&self) -> f64 {
        self.exact as f64 / self.rows as f64
    }

    fn support(&self) -> Vec<usize> {
        (0..self.tp.len())
            .map(|j| self.tp[j] + self.fn_[j])
            .collect()
    }
}

/// (precision, recall) at each distinct score, highest score first.
fn pr_curve(scores: &[f32], targets: &[f32]) -> Result<Option<Vec<(f64, f64)>>> {
    check_same_len(scores, targets)?;
    if let Some(bad) = scores.iter().find(|s| !s.is_finite()) {
        return Err(Error::Invalid(format!("score {bad} is not finite")));
    }
    let n_positive = targets.iter().filter(|&&t| t > 0.5).count();
    if n_positive == 0 {
        return Ok(None);
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut curve = Vec::new();
    let (mut tp, mut seen) = (0usize, 0usize);
    for (k, &i) in order.iter().enumerate() {
        seen += 1;
        tp += usize::from(targets[i] > 0.5);
        let last_of_group = order
            .get(k + 1)
            .is_none_or(|&next| scores[next] != scores[i]);
        if last_of_group {
            curve.push((tp as f64 / seen as f64, tp as f64 / n_positive as f64));
        }
    }
    Ok(Some(curve))
}

fn mean_some(values: &[Option<f64>]) -> f64 {
    let present: Vec<f64> = values.iter().flatten().copied().collect();
    if present.is_empty() {
        f64::NAN
    } else {
        present.iter().sum::<f64>() / present.len() as f64
    }
}

fn check_same_len(a: &[f32], b: &[f32]) -> Result<()> {
    if a.len() != b.len() {
        return Err(Error::Invalid(format!(
            "{} predictions but {} targets",
            a.len(),
            b.len()
        )));
    }
    Ok(())
}

fn rows(probs: &[f32], targets: &[f32], n_classes: usize) -> Result<usize> {
    check_same_len(probs, targets)?;
    if n_classes == 0 || !probs.len().is_multiple_of(n_classes) || probs.is_empty() {
        return Err(Error::Invalid(format!(
            "{} predictions do not form rows of {n_classes} classes",
            probs.len()
        )));
    }
    Ok(probs.len() / n_classes)
}
