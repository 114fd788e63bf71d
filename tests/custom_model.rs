//! The custom-model example (`examples/custom_model.rs`) trains and learns:
//! a user's candle-nn CNN with its own two parameter groups, fine-tuned by
//! the generic Learner from a `TensorDataset`. The run is deterministic
//! (seeded data, initial weights, shuffles and dropout).

#[path = "../examples/custom_model.rs"]
mod example;

#[test]
fn the_custom_model_example_learns() {
    let outcome = example::run(&example::Settings {
        n_train: 512,
        n_valid: 256,
        epochs: 3,
        seed: 3,
        verbose: false,
    })
    .unwrap();
    // One frozen epoch, then three unfrozen ones.
    assert_eq!(outcome.losses.len(), 4, "{:?}", outcome.losses);
    let (first_train, first_valid) = outcome.losses[0];
    let (last_train, last_valid) = *outcome.losses.last().unwrap();
    assert!(
        last_train < first_train - 0.05 && last_valid < first_valid - 0.05,
        "the losses did not fall: {:?}",
        outcome.losses
    );
    // A model with no skill scores the share of positives (about 0.35).
    assert!(
        outcome.map > outcome.chance_map + 0.3,
        "mAP {} vs chance {}",
        outcome.map,
        outcome.chance_map
    );
    // Predicting "absent" everywhere scores 1 − the share of positives.
    assert!(
        outcome.accuracy > 1.0 - outcome.chance_map + 0.05,
        "accuracy_multi {} vs {} for all-absent",
        outcome.accuracy,
        1.0 - outcome.chance_map
    );
}
