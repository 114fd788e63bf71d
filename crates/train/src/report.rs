//! The evaluation report behind `multilabel eval`: every metric of a set of
//! predictions at one threshold, the threshold sweep and per-class scores.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::learner::{Preds, TtaConfig};
use crate::metrics::{
    HeldOutScores, SweepPoint, best_threshold, held_out_scores, mean_average_precision,
    per_class_thresholds, scores_at, scores_per_class, threshold_sweep,
};

/// Scores of one class.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassReport {
    pub name: String,
    /// Non-interpolated AP (scikit-learn's); `None` when the class has no positives.
    pub ap: Option<f64>,
    /// VOC2007 11-point interpolated AP; `None` when the class has no positives.
    pub ap_voc07: Option<f64>,
    /// F1 at the report's threshold.
    pub f1: f64,
    /// Positive targets of the class.
    pub support: usize,
}

/// Everything `multilabel eval` prints and writes as JSON. Field names are
/// the JSON keys users script against: keep them stable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub thresh: f32,
    pub accuracy_multi: f64,
    pub valid_loss: f64,
    pub map: f64,
    pub map_voc07: f64,
    pub f1_micro: f64,
    pub f1_macro: f64,
    pub exact_match: f64,
    pub best: SweepPoint,
    pub sweep: Vec<SweepPoint>,
    pub per_class: Vec<ClassReport>,
    pub n_images: usize,
    /// With `eval --per-class`: one threshold per class and what it gives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_class_thresholds: Option<PerClassReport>,
    /// With `eval --tta`: the same figures for test-time-augmented predictions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tta: Option<TtaReport>,
}

/// The headline figures of test-time-augmented predictions ([`crate::tta`]),
/// at the report's threshold and over the same sweep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TtaReport {
    pub config: TtaConfig,
    pub accuracy_multi: f64,
    pub valid_loss: f64,
    pub map: f64,
    pub map_voc07: f64,
    pub f1_macro: f64,
    pub best: SweepPoint,
}

/// One threshold per class, each maximising its class's F1 over the sweep's
/// thresholds, with the scores it gives next to the single threshold's.
///
/// Chosen and scored on the same images, those scores flatter both kinds of
/// threshold; `held_out_*` are the honest figures: thresholds chosen on half
/// of the images (even rows, then odd rows) and scored on the other half,
/// averaged over both ways.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PerClassReport {
    /// Each class's threshold and F1 with it, in vocab order.
    pub classes: Vec<ClassThreshold>,
    /// accuracy_multi with the per-class thresholds, on every image.
    pub accuracy_multi: f64,
    pub f1_micro: f64,
    pub f1_macro: f64,
    pub exact_match: f64,
    /// The single threshold of the sweep, chosen and scored on held-out halves.
    pub held_out_single: HeldOutScores,
    /// The per-class thresholds, chosen and scored on held-out halves.
    pub held_out_per_class: HeldOutScores,
}

/// A class's own threshold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassThreshold {
    pub name: String,
    pub thresh: f32,
    /// F1 of the class at its threshold.
    pub f1: f64,
}

impl EvalReport {
    /// Scores `preds` at `thresh` and over `thresholds`; `vocab` names the columns.
    pub fn compute(
        preds: &Preds,
        vocab: &[String],
        thresh: f32,
        thresholds: &[f32],
    ) -> Result<Self> {
        if vocab.len() != preds.n_classes {
            return Err(Error::Invalid(format!(
                "the vocab has {} names but the predictions have {} classes",
                vocab.len(),
                preds.n_classes
            )));
        }
        let at = scores_at(&preds.probs, &preds.targets, preds.n_classes, thresh)?;
        let ap = mean_average_precision(&preds.probs, &preds.targets, preds.n_classes)?;
        let sweep = threshold_sweep(&preds.probs, &preds.targets, thresholds)?;
        let best = best_threshold(&sweep)
            .ok_or_else(|| Error::Invalid("the threshold sweep has no thresholds".into()))?;
        let per_class = vocab
            .iter()
            .enumerate()
            .map(|(j, name)| ClassReport {
                name: name.clone(),
                ap: ap.per_class[j],
                ap_voc07: ap.per_class_voc07[j],
                f1: at.f1_per_class[j],
                support: at.support[j],
            })
            .collect();
        Ok(Self {
            thresh,
            accuracy_multi: at.accuracy_multi,
            valid_loss: preds.loss,
            map: ap.map,
            map_voc07: ap.map_voc07,
            f1_micro: at.f1_micro,
            f1_macro: at.f1_macro,
            exact_match: at.exact_match,
            best,
            sweep,
            per_class,
            n_images: preds.n_items(),
            per_class_thresholds: None,
            tta: None,
        })
    }

    /// Adds [`TtaReport`]: `tta` scored as this report scored the plain
    /// predictions.
    pub fn with_tta(mut self, tta: &Preds, config: TtaConfig, thresholds: &[f32]) -> Result<Self> {
        let vocab: Vec<String> = self.per_class.iter().map(|c| c.name.clone()).collect();
        let scored = EvalReport::compute(tta, &vocab, self.thresh, thresholds)?;
        self.tta = Some(TtaReport {
            config,
            accuracy_multi: scored.accuracy_multi,
            valid_loss: scored.valid_loss,
            map: scored.map,
            map_voc07: scored.map_voc07,
            f1_macro: scored.f1_macro,
            best: scored.best,
        });
        Ok(self)
    }

    /// Adds [`PerClassReport`]: per-class thresholds chosen among
    /// `thresholds` (a class without positives keeps the report's
    /// threshold), and the held-out estimate, which needs two images or more.
    pub fn with_per_class(mut self, preds: &Preds, thresholds: &[f32]) -> Result<Self> {
        let n = preds.n_classes;
        let chosen =
            per_class_thresholds(&preds.probs, &preds.targets, n, thresholds, self.thresh)?;
        let scores = scores_per_class(&preds.probs, &preds.targets, n, &chosen)?;
        let (held_out_single, held_out_per_class) =
            held_out_scores(&preds.probs, &preds.targets, n, thresholds)?;
        let classes = self
            .per_class
            .iter()
            .zip(&chosen)
            .zip(&scores.f1_per_class)
            .map(|((class, &thresh), &f1)| ClassThreshold {
                name: class.name.clone(),
                thresh,
                f1,
            })
            .collect();
        self.per_class_thresholds = Some(PerClassReport {
            classes,
            accuracy_multi: scores.accuracy_multi,
            f1_micro: scores.f1_micro,
            f1_macro: scores.f1_macro,
            exact_match: scores.exact_match,
            held_out_single,
            held_out_per_class,
        });
        Ok(self)
    }

    /// The report as text tables, for a terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let line = |out: &mut String, text: String| {
            out.push_str(&text);
            out.push('\n');
        };
        line(&mut out, format!("images          {}", self.n_images));
        line(&mut out, format!("valid_loss      {:.6}", self.valid_loss));
        line(
            &mut out,
            format!(
                "accuracy_multi  {:.6}  (thresh {:.4})",
                self.accuracy_multi, self.thresh
            ),
        );
        line(
            &mut out,
            format!("mAP             {:.4}  (non-interpolated)", self.map),
        );
        line(
            &mut out,
            format!("mAP VOC07       {:.4}  (11-point)", self.map_voc07),
        );
        line(
            &mut out,
            format!(
                "F1 micro/macro  {:.4} / {:.4}",
                self.f1_micro, self.f1_macro
            ),
        );
        line(&mut out, format!("exact match     {:.4}", self.exact_match));
        line(&mut out, String::new());
        line(&mut out, "thresh  accuracy_multi".into());
        for point in &self.sweep {
            let mark = if point.thresh == self.best.thresh {
                "  <- best"
            } else {
                ""
            };
            line(
                &mut out,
                format!("{:<6.4}  {:.6}{mark}", point.thresh, point.accuracy_multi),
            );
        }
        line(
            &mut out,
            format!(
                "best threshold {:.4}: accuracy_multi {:.6}",
                self.best.thresh, self.best.accuracy_multi
            ),
        );
        line(&mut out, String::new());
        let width = self
            .per_class
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        line(
            &mut out,
            format!(
                "{:<width$}  {:>6}  {:>8}  {:>6}  {:>7}",
                "class", "AP", "AP VOC07", "F1", "support"
            ),
        );
        let show = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
        for class in &self.per_class {
            line(
                &mut out,
                format!(
                    "{:<width$}  {:>6}  {:>8}  {:>6.4}  {:>7}",
                    class.name,
                    show(class.ap),
                    show(class.ap_voc07),
                    class.f1,
                    class.support
                ),
            );
        }
        if let Some(t) = &self.tta {
            line(&mut out, String::new());
            line(
                &mut out,
                format!(
                    "{:<26}  {:>6}  {:>8}  {:>14}  {:>8}  {:>10}  {:>9}",
                    "predictions",
                    "mAP",
                    "mAP VOC07",
                    "accuracy_multi",
                    "F1 macro",
                    "valid_loss",
                    "best"
                ),
            );
            let row = |out: &mut String, what: String, v: [f64; 5], best: SweepPoint| {
                line(
                    out,
                    format!(
                        "{what:<26}  {:>6.4}  {:>9.4}  {:>14.4}  {:>8.4}  {:>10.4}  {:.4}@{:.2}",
                        v[0], v[1], v[2], v[3], v[4], best.accuracy_multi, best.thresh
                    ),
                );
            };
            row(
                &mut out,
                "plain".into(),
                [
                    self.map,
                    self.map_voc07,
                    self.accuracy_multi,
                    self.f1_macro,
                    self.valid_loss,
                ],
                self.best,
            );
            row(
                &mut out,
                format!("TTA (n={}, beta={})", t.config.n, t.config.beta),
                [
                    t.map,
                    t.map_voc07,
                    t.accuracy_multi,
                    t.f1_macro,
                    t.valid_loss,
                ],
                t.best,
            );
            line(
                &mut out,
                format!(
                    "(accuracy_multi and F1 at {:.4}; best: the sweep's highest accuracy_multi @ its threshold)",
                    self.thresh
                ),
            );
        }
        if let Some(p) = &self.per_class_thresholds {
            line(&mut out, String::new());
            line(
                &mut out,
                format!("{:<width$}  {:>6}  {:>6}", "class", "thresh", "F1"),
            );
            for c in &p.classes {
                line(
                    &mut out,
                    format!("{:<width$}  {:>6.4}  {:>6.4}", c.name, c.thresh, c.f1),
                );
            }
            line(&mut out, String::new());
            line(
                &mut out,
                format!(
                    "{:<34}  {:>14}  {:>8}  {:>8}  {:>11}",
                    "thresholds", "accuracy_multi", "F1 micro", "F1 macro", "exact match"
                ),
            );
            let row = |out: &mut String, what: &str, v: [f64; 4]| {
                line(
                    out,
                    format!(
                        "{what:<34}  {:>14.4}  {:>8.4}  {:>8.4}  {:>11.4}",
                        v[0], v[1], v[2], v[3]
                    ),
                );
            };
            row(
                &mut out,
                &format!("one ({:.4}), all images", self.thresh),
                [
                    self.accuracy_multi,
                    self.f1_micro,
                    self.f1_macro,
                    self.exact_match,
                ],
            );
            row(
                &mut out,
                "per class, all images",
                [p.accuracy_multi, p.f1_micro, p.f1_macro, p.exact_match],
            );
            let held =
                |h: &HeldOutScores| [h.accuracy_multi, h.f1_micro, h.f1_macro, h.exact_match];
            row(
                &mut out,
                "one (best), held-out halves",
                held(&p.held_out_single),
            );
            row(
                &mut out,
                "per class, held-out halves",
                held(&p.held_out_per_class),
            );
            line(
                &mut out,
                "(held-out: chosen on half the images, scored on the other half, both ways, averaged)"
                    .into(),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preds() -> Preds {
        // Two classes, four images: class "a" perfectly ranked; "b" has
        // positives at the highest and the lowest score.
        Preds {
            probs: vec![0.9, 0.1, 0.8, 0.2, 0.3, 0.7, 0.2, 0.6],
            targets: vec![1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0],
            n_classes: 2,
            loss: 0.5,
        }
    }

    #[test]
    fn report_agrees_with_the_metric_functions() {
        let preds = preds();
        let vocab = vec!["a".to_string(), "b".to_string()];
        let report = EvalReport::compute(&preds, &vocab, 0.5, &[0.25, 0.5, 0.75]).unwrap();
        assert_eq!(report.n_images, 4);
        assert_eq!(report.per_class[0].ap, Some(1.0));
        assert_eq!(report.per_class[0].support, 2);
        assert_eq!(report.per_class[1].support, 2);
        // b ranked 0.7 (pos), 0.6, 0.2, 0.1 (pos): precision 1/1 and 2/4 → AP 0.75.
        assert_eq!(report.per_class[1].ap, Some(0.75));
        assert!((report.map - 0.875).abs() < 1e-12);
        // At 0.5, a is all right; b predicts (0,0,1,1) for (1,0,1,0): 2 of 4 → 6 of 8.
        assert!((report.accuracy_multi - 6.0 / 8.0).abs() < 1e-12);
        // Exact match: rows 1 and 2 are fully right.
        assert!((report.exact_match - 0.5).abs() < 1e-12);
        assert_eq!(report.sweep.len(), 3);
        assert!(
            report
                .sweep
                .iter()
                .all(|p| p.accuracy_multi <= report.best.accuracy_multi)
        );
        let json = serde_json::to_value(&report).unwrap();
        for key in [
            "thresh",
            "accuracy_multi",
            "valid_loss",
            "map",
            "map_voc07",
            "f1_micro",
            "f1_macro",
            "exact_match",
            "best",
            "sweep",
            "per_class",
            "n_images",
        ] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        assert!(report.render().contains("best threshold"));
    }

    #[test]
    fn vocab_must_match_the_columns() {
        let err = EvalReport::compute(&preds(), &["a".to_string()], 0.5, &[0.5]).unwrap_err();
        assert!(err.to_string().contains("vocab"));
    }
}
