//! One-cycle and fine_tune schedules against the reference step values in
//! shared/reference/fastai-recipe.md §4 (fine_tune(3, 3e-3, freeze_epochs=4),
//! N = 39 batches per epoch, three parameter groups).

use multilabel_train::schedule::{
    FineTune, LrSpec, OneCycle, combined_cos, even_mults, sched_cos, train_position,
};

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-12)
}

fn assert_lrs(actual: &[f64], expected: &[f64], rel: f64, what: &str) {
    assert_eq!(actual.len(), expected.len());
    for (a, e) in actual.iter().zip(expected) {
        assert!(close(*a, *e, rel), "{what}: {actual:?} vs {expected:?}");
    }
}

fn recipe() -> [OneCycle; 2] {
    let mut ft = FineTune::new(3, 3e-3);
    ft.freeze_epochs = 4;
    ft.phases(3, 39)
}

#[test]
fn fine_tune_spreads_lrs_like_fastai_slice() {
    let [frozen, unfrozen] = recipe();
    assert_lrs(&frozen.lr_max, &[3e-4, 3e-4, 3e-3], 1e-12, "phase 1 lr_max");
    assert_lrs(
        &unfrozen.lr_max,
        &[1.5e-5, 1.5e-4, 1.5e-3],
        1e-12,
        "phase 2 lr_max",
    );
    assert_eq!(
        (frozen.pct_start, frozen.div, frozen.div_final),
        (0.99, 25.0, 1e5)
    );
    assert_eq!((unfrozen.pct_start, unfrozen.div), (0.3, 5.0));
    assert_eq!((frozen.total_steps(), unfrozen.total_steps()), (156, 117));
}

#[test]
fn phase_one_reference_steps() {
    let [frozen, _] = recipe();
    let s0 = frozen.at(0, 0);
    assert_lrs(&s0.lrs, &[1.2e-5, 1.2e-5, 1.2e-4], 1e-9, "step 0");
    assert!(close(s0.mom, 0.95, 1e-12));
    // Step 154 = epoch 3, batch 37: pos 0.98718, still warming up.
    assert!(close(train_position(3, 37, 39, 4), 0.98718, 1e-5));
    let s154 = frozen.at(3, 37);
    assert_lrs(&s154.lrs, &[3.0e-4, 3.0e-4, 2.9999e-3], 1e-4, "step 154");
    assert!(close(s154.mom, 0.85, 1e-4));
    // Step 155: pos 0.99359 >= 0.99, annealing.
    let s155 = frozen.at(3, 38);
    assert!(close(s155.lrs[2], 2.1430e-3, 1e-4), "{:?}", s155.lrs);
    assert!(close(s155.mom, 0.87857, 1e-5), "{}", s155.mom);
}

#[test]
fn phase_two_reference_steps() {
    let [_, unfrozen] = recipe();
    let s0 = unfrozen.at(0, 0);
    assert_lrs(&s0.lrs, &[3e-6, 3e-5, 3e-4], 1e-9, "step 0");
    // Step 35 = epoch 0, batch 35: pos 0.29915.
    let s35 = unfrozen.at(0, 35);
    assert!(close(train_position(0, 35, 39, 3), 0.29915, 1e-4));
    assert_lrs(&s35.lrs, &[1.5e-5, 1.5e-4, 1.5e-3], 1e-3, "step 35");
    assert!(close(s35.mom, 0.85, 1e-3));
    // Step 116 = epoch 2, batch 38: the last step.
    let s116 = unfrozen.at(2, 38);
    assert_lrs(&s116.lrs, &[5.667e-9, 5.667e-8, 5.667e-7], 1e-3, "step 116");
    assert!(close(s116.mom, 0.94996, 1e-5), "{}", s116.mom);
}

#[test]
fn schedule_shape_invariants() {
    let cycle = OneCycle::new(vec![1e-3], 5, 20);
    let steps: Vec<_> = (0..5).flat_map(|e| (0..20).map(move |b| (e, b))).collect();
    let lrs: Vec<f64> = steps.iter().map(|&(e, b)| cycle.at(e, b).lrs[0]).collect();
    let moms: Vec<f64> = steps.iter().map(|&(e, b)| cycle.at(e, b).mom).collect();
    let peak = lrs.iter().cloned().fold(0.0, f64::max);
    let peak_at = lrs.iter().position(|&l| l == peak).unwrap();
    assert!(
        lrs[..=peak_at].windows(2).all(|w| w[0] <= w[1]),
        "warm-up rises"
    );
    assert!(
        lrs[peak_at..].windows(2).all(|w| w[0] >= w[1]),
        "anneal falls"
    );
    assert!((peak_at as f64 / 100.0 - 0.25).abs() <= 0.02);
    assert!(moms[peak_at] <= 0.8501 && moms[0] == 0.95);
    assert!(
        *lrs.last().unwrap() > 1e-3 / 1e5,
        "last step stops short of lr/div_final"
    );
    assert_eq!(sched_cos(1.0, 3.0, 0.0), 1.0);
    assert!((sched_cos(1.0, 3.0, 0.5) - 2.0).abs() < 1e-12);
    assert!((combined_cos(0.25, 1.0, 2.0, 0.0, 1.0) - 0.0).abs() < 1e-12);
}

#[test]
fn slice_spreading_and_even_mults() {
    assert_eq!(LrSpec::All(0.1).spread(3), vec![0.1; 3]);
    assert_eq!(LrSpec::Slice(1.0).spread(1), vec![1.0]);
    let lrs = even_mults(1e-5, 1e-3, 3);
    assert_lrs(&lrs, &[1e-5, 1e-4, 1e-3], 1e-12, "even_mults");
    assert_eq!(even_mults(1e-5, 1e-3, 1), vec![1e-3]);
}
