//! Metrics against scikit-learn (fixtures/make_golden.py, `metrics_case`):
//! 60 images × 6 classes, scores rounded to two decimals (many ties), one
//! class without positives, one score exactly on a threshold.

mod common;

use common::{flat_f32, golden};
use multilabel_train::metrics::*;

fn case() -> (Vec<f32>, Vec<f32>, usize, serde_json::Value) {
    let g = golden()["metrics"].clone();
    (
        flat_f32(&g["probs"]),
        flat_f32(&g["targets"]),
        g["n_classes"].as_u64().unwrap() as usize,
        g,
    )
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn ap_and_voc07_ap_match_sklearn_and_devkit() {
    let (probs, targets, c, g) = case();
    let map = mean_average_precision(&probs, &targets, c).unwrap();
    for j in 0..c {
        let expected = g["ap"][j].as_f64();
        let expected07 = g["ap_voc07"][j].as_f64();
        match (map.per_class[j], expected) {
            (Some(a), Some(e)) => assert!(close(a, e, 1e-9), "class {j}: {a} vs {e}"),
            (None, None) => {}
            other => panic!("class {j}: {other:?}"),
        }
        match (map.per_class_voc07[j], expected07) {
            (Some(a), Some(e)) => assert!(close(a, e, 1e-9), "voc07 class {j}: {a} vs {e}"),
            (None, None) => {}
            other => panic!("voc07 class {j}: {other:?}"),
        }
    }
    assert!(close(map.map, g["map"].as_f64().unwrap(), 1e-9));
    assert!(close(map.map_voc07, g["map_voc07"].as_f64().unwrap(), 1e-9));
}

#[test]
fn sweep_matches_and_best_threshold_is_its_maximum() {
    let (probs, targets, _, g) = case();
    let thresholds = default_thresholds();
    assert_eq!(thresholds.len(), 30);
    let expected_t = flat_f32(&g["sweep_thresh"]);
    for (a, e) in thresholds.iter().zip(&expected_t) {
        assert!((a - e).abs() <= 1e-7, "{a} vs {e}");
    }
    let sweep = threshold_sweep(&probs, &targets, &thresholds).unwrap();
    let expected: Vec<f64> = g["sweep_accuracy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (p, e) in sweep.iter().zip(&expected) {
        assert!(
            close(p.accuracy_multi, *e, 1e-12),
            "at {}: {} vs {e}",
            p.thresh,
            p.accuracy_multi
        );
    }
    let best = best_threshold(&sweep).unwrap();
    let max = expected.iter().cloned().fold(0.0, f64::max);
    assert_eq!(best.accuracy_multi, max);
    let first = expected.iter().position(|&v| v == max).unwrap();
    assert_eq!(best.thresh, thresholds[first], "lowest threshold wins ties");
}

#[test]
fn f1_exact_match_and_accuracy_at_threshold_match_sklearn() {
    let (probs, targets, c, g) = case();
    for key in ["0.2", "0.5"] {
        let e = &g["at"][key];
        let t = e["thresh"].as_f64().unwrap() as f32;
        let s = scores_at(&probs, &targets, c, t).unwrap();
        assert!(
            close(
                s.accuracy_multi,
                e["accuracy_multi"].as_f64().unwrap(),
                1e-12
            ),
            "{key}"
        );
        assert!(
            close(s.f1_micro, e["f1_micro"].as_f64().unwrap(), 1e-12),
            "{key}"
        );
        assert!(
            close(s.f1_macro, e["f1_macro"].as_f64().unwrap(), 1e-12),
            "{key}"
        );
        assert!(
            close(s.exact_match, e["exact_match"].as_f64().unwrap(), 1e-12),
            "{key}"
        );
        for (a, b) in s
            .f1_per_class
            .iter()
            .zip(e["f1_per_class"].as_array().unwrap())
        {
            assert!(close(*a, b.as_f64().unwrap(), 1e-12), "{key}");
        }
        assert_eq!(s.support[5], 0);
    }
}

#[test]
fn accuracy_multi_uses_strict_greater_than() {
    // 0.5 is not above 0.5: a positive scored exactly at the threshold is a miss.
    assert_eq!(accuracy_multi(&[0.5, 0.5], &[1.0, 0.0], 0.5).unwrap(), 0.5);
    assert_eq!(accuracy_multi(&[0.51, 0.5], &[1.0, 0.0], 0.5).unwrap(), 1.0);
    assert!(accuracy_multi(&[0.5], &[1.0, 0.0], 0.5).is_err());
}

#[test]
fn perfect_and_reversed_rankings() {
    let targets = [1.0, 0.0, 1.0, 0.0];
    assert_eq!(
        average_precision(&[0.9, 0.1, 0.8, 0.2], &targets).unwrap(),
        Some(1.0)
    );
    assert_eq!(
        average_precision_voc07(&[0.9, 0.1, 0.8, 0.2], &targets).unwrap(),
        Some(1.0)
    );
    // Positives ranked last: precision 1/3 then 2/4.
    let ap = average_precision(&[0.1, 0.9, 0.2, 0.8], &targets)
        .unwrap()
        .unwrap();
    assert!(close(ap, 0.5 * (1.0 / 3.0) + 0.5 * 0.5, 1e-12));
    // All scores tied: one threshold, AP = prevalence.
    assert_eq!(average_precision(&[0.3; 4], &targets).unwrap(), Some(0.5));
    assert_eq!(average_precision(&[0.3; 4], &[0.0; 4]).unwrap(), None);
    assert!(average_precision(&[f32::NAN], &[1.0]).is_err());
}

#[test]
fn linspace_endpoints_are_exact() {
    let t = linspace(0.05, 0.95, 29);
    assert_eq!((t[0], t[28]), (0.05, 0.95));
    assert!((t[14] - 0.5).abs() < 1e-7);
}

/// Per-class thresholds (each class's F1-best sweep threshold, a class
/// without positives keeping the fallback), their scores, and the held-out
/// estimate of both kinds of threshold, against `per_class_case` in the
/// golden script (scikit-learn's F1 and subset accuracy).
#[test]
fn per_class_thresholds_and_held_out_scores_match_sklearn() {
    let (probs, targets, c, g) = case();
    let e = &g["per_class"];
    let sweep = flat_f32(&g["sweep_thresh"]);
    let fallback = e["fallback"].as_f64().unwrap() as f32;
    let chosen = per_class_thresholds(&probs, &targets, c, &sweep, fallback).unwrap();
    assert_eq!(chosen, flat_f32(&e["thresholds"]));
    assert_eq!(chosen[5], fallback, "the class without positives");

    let check = |what: &str, got: [f64; 4], want: &serde_json::Value| {
        for (value, key) in
            got.iter()
                .zip(["accuracy_multi", "f1_micro", "f1_macro", "exact_match"])
        {
            let w = want[key].as_f64().unwrap();
            assert!(close(*value, w, 1e-12), "{what} {key}: {value} vs {w}");
        }
    };
    let all = scores_per_class(&probs, &targets, c, &chosen).unwrap();
    check(
        "all",
        [
            all.accuracy_multi,
            all.f1_micro,
            all.f1_macro,
            all.exact_match,
        ],
        &e["all"],
    );
    let (single, each) = held_out_scores(&probs, &targets, c, &sweep).unwrap();
    let pack = |h: HeldOutScores| [h.accuracy_multi, h.f1_micro, h.f1_macro, h.exact_match];
    check("held-out single", pack(single), &e["held_out_single"]);
    check("held-out per class", pack(each), &e["held_out_per_class"]);

    // One threshold for every class is `scores_at`.
    let same = scores_per_class(&probs, &targets, c, &[0.2; 6]).unwrap();
    let at = scores_at(&probs, &targets, c, 0.2).unwrap();
    assert_eq!(same.f1_per_class, at.f1_per_class);
    assert!(close(same.accuracy_multi, at.accuracy_multi, 1e-15));
    assert_eq!(same.exact_match, at.exact_match);
    assert!(scores_per_class(&probs, &targets, c, &[0.2; 5]).is_err());
    assert!(held_out_scores(&probs[..c], &targets[..c], c, &sweep).is_err());
}
