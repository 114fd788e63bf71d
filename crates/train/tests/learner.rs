//! The Learner end to end on a generated dataset with a narrow ResNet-18:
//! training lowers the loss, get_preds keeps dataset order, cancellation
//! saves a checkpoint, and resuming from it ends with the same weights as an
//! uninterrupted run.

#![cfg(feature = "learner")]

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use multilabel_data::{Dataset, DatasetConfig, Loader, LoaderConfig, SynthConfig, TransformConfig};
use multilabel_resnet::{Arch, Kernels, ResNet, ResNetConfig};
use multilabel_train::{
    Error, Event, FineTune, Learner, LearnerConfig, Recorder, RunDir, Sink, host_reads, metrics,
};

const SIZE: usize = 32;

fn dataset(root: &Path) -> Dataset {
    multilabel_data::synth(&SynthConfig {
        out: root.to_path_buf(),
        n_train: 96,
        n_valid: 40,
        classes: 4,
        seed: 3,
        image_size: None,
    })
    .unwrap();
    Dataset::load(&DatasetConfig::new(root)).unwrap()
}

fn learner(data: &Dataset) -> Learner<ResNet> {
    learner_with(data, LearnerConfig::default())
}

fn learner_with(data: &Dataset, config: LearnerConfig) -> Learner<ResNet> {
    learner_on_path(data, config, Kernels::Auto)
}

/// A learner whose model runs its ops with `kernels`.
fn learner_on_path(data: &Dataset, config: LearnerConfig, kernels: Kernels) -> Learner<ResNet> {
    let device = Device::Cpu;
    let n_classes = data.vocab().len();
    let transform = TransformConfig {
        size: SIZE,
        min_scale: 0.75,
        ..TransformConfig::default()
    };
    let train = Loader::new(
        data.train().to_vec(),
        n_classes,
        transform.clone(),
        LoaderConfig::train(16, 11),
        device.clone(),
    );
    let valid = Loader::new(
        data.valid().to_vec(),
        n_classes,
        transform,
        LoaderConfig::valid(16),
        device.clone(),
    );
    let varmap = VarMap::new();
    let mut model_config = ResNetConfig::new(Arch::ResNet18, n_classes);
    model_config.base_width = 8;
    model_config.head.hidden = vec![32];
    model_config.head.ps = 0.1;
    model_config.kernels = kernels;
    let model = ResNet::new(
        &model_config,
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
        5,
    )
    .unwrap();
    Learner::new(model, varmap, train, valid, config, device).unwrap()
}

fn plan() -> FineTune {
    let mut plan = FineTune::new(2, 1e-2);
    plan.freeze_epochs = 1;
    plan
}

fn weights(learner: &Learner<ResNet>) -> Vec<(String, Vec<f32>)> {
    let data = learner.varmap().data().lock().unwrap();
    let mut all: Vec<_> = data
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// Sets the cancel flag when a given global batch has been reported.
struct CancelAt {
    flag: Arc<AtomicBool>,
    at: usize,
    seen: usize,
}

impl Sink for CancelAt {
    fn on_event(&mut self, event: &Event) -> multilabel_train::Result<()> {
        if let Event::BatchEnd { .. } = event {
            self.seen += 1;
            if self.seen == self.at {
                self.flag.store(true, Ordering::SeqCst);
            }
        }
        Ok(())
    }
}

/// Makes `learner` cancel itself once `at` batches have been reported.
fn cancel_after(learner: &mut Learner<ResNet>, at: usize) {
    let flag = Arc::new(AtomicBool::new(false));
    learner.set_cancel_flag(flag.clone());
    learner.add_sink(Box::new(CancelAt { flag, at, seen: 0 }));
}

#[test]
fn fine_tune_lowers_loss_and_reports_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(&dir.path().join("data"));
    let mut learner = learner(&data);
    let before = learner.validate().unwrap();
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    learner.add_sink(Box::new(recorder.clone()));
    let mut plan = FineTune::new(7, 1e-2);
    plan.freeze_epochs = 1;
    learner.fine_tune(&plan).unwrap();
    let events = recorder.lock().unwrap().events.clone();
    let epochs: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::EpochEnd(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(epochs.len(), 8);
    assert_eq!(
        (epochs[0].phase.as_str(), epochs[3].phase.as_str()),
        ("frozen", "unfrozen")
    );
    let batches = events
        .iter()
        .filter(|e| matches!(e, Event::BatchEnd { .. }))
        .count();
    assert_eq!(batches, 8 * 6);
    assert!(
        epochs[7].train_loss < epochs[0].train_loss * 0.8,
        "{epochs:?}"
    );
    let after = learner.validate().unwrap();
    assert!(
        after.valid_loss < before.valid_loss * 0.9,
        "valid loss {} -> {}",
        before.valid_loss,
        after.valid_loss
    );
    // get_preds: rows in dataset order, probabilities, the same numbers as validate.
    let preds = learner.get_preds().unwrap();
    assert_eq!(preds.n_items(), 40);
    let n_classes = preds.n_classes;
    for (i, item) in data.valid().iter().enumerate() {
        for j in 0..n_classes {
            let expected = if item.labels.contains(&j) { 1.0 } else { 0.0 };
            assert_eq!(
                preds.targets[i * n_classes + j],
                expected,
                "item {i} class {j}"
            );
        }
    }
    assert!(preds.probs.iter().all(|p| (0.0..=1.0).contains(p)));
    let acc = metrics::accuracy_multi(&preds.probs, &preds.targets, 0.2).unwrap();
    assert!((acc - after.accuracy_multi).abs() < 1e-12);
    assert!((preds.loss - after.valid_loss).abs() < 1e-9);
    // The ranking is better than chance: mAP above the positives' share.
    let map = metrics::mean_average_precision(&preds.probs, &preds.targets, n_classes).unwrap();
    let prevalence = preds.targets.iter().sum::<f32>() as f64 / preds.targets.len() as f64;
    assert!(
        map.map > prevalence + 0.1,
        "mAP {} vs prevalence {prevalence}",
        map.map
    );
}

/// `take_valid_preds` hands over the last validation's predictions only
/// while no step has moved the weights since; otherwise it predicts again.
#[test]
fn take_valid_preds_reuses_only_an_up_to_date_validation() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(&dir.path().join("data"));
    let mut learner = learner(&data);
    let plan = FineTune {
        freeze_epochs: 1,
        ..FineTune::new(1, 1e-2)
    };
    learner.fine_tune(&plan).unwrap();
    // The fit ended with a validation: the same predictions, to the bit.
    let fresh = learner.get_preds().unwrap();
    assert_eq!(learner.take_valid_preds().unwrap(), fresh);

    // Two steps into another fit, then cancelled: no validation since.
    cancel_after(&mut learner, 2);
    learner.validate().unwrap();
    match learner.fine_tune(&plan) {
        Err(Error::Interrupted { epoch: 0, batch: 2 }) => {}
        other => panic!("expected an interruption, got {other:?}"),
    }
    let taken = learner.take_valid_preds().unwrap();
    assert_ne!(taken.probs, fresh.probs, "the steps moved the predictions");
    assert_eq!(taken, learner.get_preds().unwrap());
}

#[test]
fn frozen_fit_moves_only_head_and_batchnorm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(&dir.path().join("data"));
    let mut learner = learner(&data);
    let before = weights(&learner);
    learner.freeze();
    let cycle = FineTune::new(1, 1e-2).phases(3, 6)[0].clone();
    learner.fit_one_cycle(&cycle, "frozen").unwrap();
    let after = weights(&learner);
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        let moved = a != b;
        let is_conv = name.contains("conv") || name.contains("downsample.0");
        if is_conv {
            assert!(!moved, "{name} moved while frozen");
        } else if name.starts_with("head.") || name.ends_with("bias") || name.contains("running") {
            assert!(moved, "{name} did not move");
        }
    }
}

#[test]
fn interrupted_then_resumed_run_matches_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(&dir.path().join("data"));

    let mut straight = learner(&data);
    straight.set_run(RunDir::create(dir.path().join("runs/straight")).unwrap());
    straight.fine_tune(&plan()).unwrap();

    // Interrupt inside the unfrozen phase's first epoch: the 9th of 18 steps is
    // its batch 2 (the frozen phase has 6), so training resumes at batch 3.
    let run = RunDir::create(dir.path().join("runs/interrupted")).unwrap();
    let mut first = learner(&data);
    cancel_after(&mut first, 9);
    first.set_run(run.clone());
    match first.fine_tune(&plan()) {
        Err(Error::Interrupted { epoch: 0, batch: 3 }) => {}
        other => panic!("expected an interruption, got {other:?}"),
    }
    let state = run.load_checkpoint(&Device::Cpu).unwrap().unwrap().state;
    assert_eq!(
        (state.fit, state.epoch, state.batch, state.global_step),
        (1, 0, 3, 9)
    );
    drop(first);

    let mut resumed = learner(&data);
    resumed.set_run(run.clone());
    resumed.resume_from(&run).unwrap();
    resumed.fine_tune(&plan()).unwrap();
    assert_eq!(resumed.global_step(), straight.global_step());
    let (a, b) = (weights(&straight), weights(&resumed));
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!(x, y, "{name} differs after resume");
    }
}

/// `finish` marks the run's checkpoint finished and keeps its state and
/// weights, whether the Learner wrote that checkpoint itself or resumed it;
/// the mark is a small file beside the checkpoint, which stays as it was,
/// and it vouches only for the checkpoint it was written for.
#[test]
fn finish_marks_the_checkpoint_finished() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(&dir.path().join("data"));
    let run = RunDir::create(dir.path().join("runs/a")).unwrap();
    let mut learner = learner(&data);
    learner.set_run(run.clone());
    learner.fine_tune(&plan()).unwrap();
    let before = run.load_checkpoint(&Device::Cpu).unwrap().unwrap();
    assert!(!before.state.finished);
    let bytes = std::fs::read(run.state_path()).unwrap();
    learner.finish().unwrap();
    assert_eq!(std::fs::read(run.state_path()).unwrap(), bytes);
    assert!(run.finished_path().exists());
    let after = run.load_checkpoint(&Device::Cpu).unwrap().unwrap();
    assert_eq!(
        after.state,
        multilabel_train::TrainState {
            finished: true,
            ..before.state.clone()
        }
    );
    for (name, w) in &before.weights {
        let (a, b) = (
            w.flatten_all().unwrap(),
            after.weights[name].flatten_all().unwrap(),
        );
        assert_eq!(
            a.to_vec1::<f32>().unwrap(),
            b.to_vec1::<f32>().unwrap(),
            "{name}"
        );
    }

    // A mark written for another state does not count; a corrupt one is an
    // error that names it; a new checkpoint removes the mark.
    let other = multilabel_train::TrainState {
        global_step: before.state.global_step + 1,
        ..before.state.clone()
    };
    run.mark_finished(&other).unwrap();
    assert!(
        !run.load_checkpoint(&Device::Cpu)
            .unwrap()
            .unwrap()
            .state
            .finished
    );
    std::fs::write(run.finished_path(), "{").unwrap();
    let err = run.load_checkpoint(&Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("finished.json"), "{err}");
    run.mark_finished(&before.state).unwrap();
    assert!(
        run.load_checkpoint(&Device::Cpu)
            .unwrap()
            .unwrap()
            .state
            .finished
    );
    run.save_checkpoint(&before.state, learner.varmap(), &Default::default())
        .unwrap();
    assert!(!run.finished_path().exists());
    assert!(
        !run.load_checkpoint(&Device::Cpu)
            .unwrap()
            .unwrap()
            .state
            .finished
    );

    // A resumed Learner has written nothing: it reads the state back.
    let run = RunDir::create(dir.path().join("runs/b")).unwrap();
    let mut first = learner_with(&data, LearnerConfig::default());
    first.set_run(run.clone());
    first.fine_tune(&plan()).unwrap();
    drop(first);
    let mut resumed = learner_with(&data, LearnerConfig::default());
    resumed.set_run(run.clone());
    let state = resumed.resume_from(&run).unwrap();
    resumed.finish().unwrap();
    let after = run.load_checkpoint(&Device::Cpu).unwrap().unwrap().state;
    assert_eq!(
        after,
        multilabel_train::TrainState {
            finished: true,
            ..state
        }
    );
}

#[test]
fn resume_without_state_or_with_other_seed_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(&dir.path().join("data"));
    let run = RunDir::create(dir.path().join("runs/empty")).unwrap();
    let mut l = learner(&data);
    let err = l.resume_from(&run).unwrap_err().to_string();
    assert!(err.contains("no training state"), "{err}");

    let state = multilabel_train::TrainState {
        seed: 7,
        fit: 0,
        epoch: 1,
        batch: 0,
        global_step: 6,
        smooth_loss: Default::default(),
        frozen: true,
        finished: false,
    };
    run.save_checkpoint(&state, l.varmap(), &Default::default())
        .unwrap();
    let err = l.resume_from(&run).unwrap_err().to_string();
    assert!(err.contains("seed 7"), "{err}");
}

/// A non-finite loss stops training with the epoch and batch where it
/// happened and writes nothing. Read every step (the CPU default), it stops
/// before the optimizer steps on it: no parameter moved. With reads batched
/// (`read_every` 4, as on a GPU) it is caught at the next read.
#[test]
fn non_finite_loss_stops_without_writing_state() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(&dir.path().join("data"));
    let n_classes = data.vocab().len();
    let base = learner(&data);
    let before = weights(&base);
    for read_every in [0, 4] {
        // A NaN positive weight makes the very first loss NaN.
        let config = LearnerConfig {
            pos_weight: Some(vec![f32::NAN; n_classes]),
            read_every,
            ..LearnerConfig::default()
        };
        let mut l = learner_with(&data, config);
        let run = RunDir::create(dir.path().join(format!("runs/nan-{read_every}"))).unwrap();
        l.set_run(run.clone());
        match l.fine_tune(&plan()) {
            Err(Error::NonFiniteLoss {
                epoch: 0,
                batch: 0,
                loss,
            }) => assert!(loss.is_nan()),
            other => panic!("read_every {read_every}: expected a NaN loss error, got {other:?}"),
        }
        assert!(!run.state_path().exists());
        if read_every == 0 {
            let after = weights(&l);
            let params = after.iter().filter(|(n, _)| !n.contains("running"));
            for (name, value) in params {
                let old = &before.iter().find(|(n, _)| n == name).unwrap().1;
                assert_eq!(value, old, "{name} changed");
            }
        }
    }
}

#[test]
fn lr_find_records_a_rising_lr_and_restores_everything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let mut learner = learner(&data);
    learner.freeze();
    let before = weights(&learner);
    let step_before = learner.global_step();
    let config = multilabel_train::LrFindConfig {
        num_it: 20,
        ..Default::default()
    };
    let result = learner.lr_find(&config).unwrap();
    // 96 images / 16 = 6 batches per epoch: the finder runs over several epochs.
    assert!(!result.lrs.is_empty() && result.lrs.len() <= 20);
    assert_eq!(result.lrs.len(), result.losses.len());
    assert!((result.lrs[0] - 1e-7).abs() < 1e-20);
    assert!(
        result.lrs.windows(2).all(|w| w[1] > w[0]),
        "exponential schedule"
    );
    if !result.diverged {
        assert_eq!(result.lrs.len(), 20);
        assert!(result.suggestion.is_some());
    }
    // Weights, running statistics, optimizer state and step count are back.
    assert_eq!(weights(&learner), before);
    assert_eq!(learner.global_step(), step_before);
    assert!(learner.optimizer().export_state().tensors.is_empty());
    // The restored learner still trains normally.
    learner.fine_tune(&plan()).unwrap();
}

/// Fine-tunes with a recorder attached; returns every `BatchEnd` loss and
/// the epoch records.
fn recorded_fine_tune(
    learner: &mut Learner<ResNet>,
) -> (Vec<f32>, Vec<multilabel_train::EpochRecord>) {
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    learner.add_sink(Box::new(recorder.clone()));
    learner.fine_tune(&plan()).unwrap();
    let events = recorder.lock().unwrap().events.clone();
    let mut losses = Vec::new();
    let mut epochs = Vec::new();
    for event in events {
        match event {
            Event::BatchEnd { loss, .. } => losses.push(loss),
            Event::EpochEnd(record) => epochs.push(record),
            _ => {}
        }
    }
    (losses, epochs)
}

/// Losses are read from the device in batches of `read_every` steps and
/// the validation set in one read per pass, and batching the reads changes
/// nothing: the same losses, events and weights as reading every step.
#[test]
fn host_reads_are_batched_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(&dir.path().join("data"));
    // 96 training images in batches of 16: 6 steps per epoch; 40
    // validation images: 3 batches; plan(): 1 frozen + 2 unfrozen epochs.
    let (steps, epochs) = (6u64, 3u64);
    let mut runs = Vec::new();
    for read_every in [1usize, 4] {
        let config = LearnerConfig {
            read_every,
            ..LearnerConfig::default()
        };
        let mut learner = learner_with(&data, config);
        let before = host_reads();
        let (losses, records) = recorded_fine_tune(&mut learner);
        let reads = host_reads() - before;
        let train_reads = steps.div_ceil(read_every as u64);
        assert_eq!(
            reads,
            epochs * (train_reads + 1),
            "read_every {read_every}: {reads} reads for {epochs} epochs of {steps} steps"
        );
        assert_eq!(losses.len() as u64, epochs * steps);
        assert!(losses.iter().all(|l| l.is_finite()));
        runs.push((losses, records, weights(&learner)));
    }
    let (losses_1, records_1, weights_1) = &runs[0];
    let (losses_4, records_4, weights_4) = &runs[1];
    assert_eq!(losses_1, losses_4);
    for (a, b) in records_1.iter().zip(records_4) {
        assert_eq!((a.train_loss, a.valid_loss), (b.train_loss, b.valid_loss));
        assert_eq!(a.metrics, b.metrics);
    }
    assert!(weights_1 == weights_4, "the weights differ");
}

/// The generic ops (what a GPU runs) forced on the CPU learn the same way
/// as the CPU kernels: the same loss curve within float tolerance (1e-3
/// relative per step: the two paths sum in different orders, and 18 steps
/// of training carry that difference along), the same validation losses.
#[test]
fn generic_path_learns_like_the_cpu_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(&dir.path().join("data"));
    let mut cpu = learner_on_path(&data, LearnerConfig::default(), Kernels::Auto);
    let mut generic = learner_on_path(&data, LearnerConfig::default(), Kernels::Generic);
    let (cpu_losses, cpu_epochs) = recorded_fine_tune(&mut cpu);
    let (generic_losses, generic_epochs) = recorded_fine_tune(&mut generic);
    assert_eq!(cpu_losses.len(), generic_losses.len());
    for (step, (a, b)) in generic_losses.iter().zip(&cpu_losses).enumerate() {
        let relative = (a - b).abs() / b.abs();
        assert!(relative < 1e-3, "step {step}: generic {a}, cpu {b}");
    }
    for (a, b) in generic_epochs.iter().zip(&cpu_epochs) {
        let relative = (a.valid_loss - b.valid_loss).abs() / b.valid_loss.abs();
        assert!(
            relative < 1e-3,
            "epoch {}: valid loss generic {}, cpu {}",
            a.epoch,
            a.valid_loss,
            b.valid_loss
        );
    }
    // And they learn: the last epoch's training loss is below the first's.
    let first = generic_epochs.first().unwrap().train_loss;
    let last = generic_epochs.last().unwrap().train_loss;
    assert!(last < first, "generic path: train loss {first} -> {last}");
}

/// fastai's `tta()`: with one pass the result is `aug + beta·(plain − aug)`
/// of a plain prediction and a prediction under the training crops (the
/// same crops a training-augmenting loader with the TTA seed gives);
/// `beta = 1` is the plain prediction; the seed decides the crops; the
/// targets are the set's.
#[test]
fn tta_blends_augmented_and_plain_predictions_as_fastai() {
    use multilabel_data::Augment;
    use multilabel_train::{TtaConfig, predict, tta};

    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let learner = learner(&data);
    let model = learner.model();
    let n_classes = data.vocab().len();
    let transform = TransformConfig {
        size: SIZE,
        min_scale: 0.35,
        flip: true,
        ..TransformConfig::default()
    };
    let valid = Loader::new(
        data.valid().to_vec(),
        n_classes,
        transform.clone(),
        LoaderConfig::valid(16),
        Device::Cpu,
    );
    let config = TtaConfig {
        n: 1,
        beta: 0.25,
        seed: 9,
    };
    let mut passes = Vec::new();
    let both = tta(model, &valid, &transform, &config, &mut |k, n| {
        passes.push((k, n))
    })
    .unwrap();
    assert_eq!(passes, [(0, 2), (1, 2)]);

    let plain = predict(model, &valid, None, &mut |_, _| {}).unwrap();
    let augmenting = Loader::new(
        data.valid().to_vec(),
        n_classes,
        transform.clone(),
        LoaderConfig {
            augment: Augment::Train,
            shuffle: false,
            drop_last: false,
            seed: 9,
            ..LoaderConfig::valid(16)
        },
        Device::Cpu,
    );
    let aug = predict(model, &augmenting, None, &mut |_, _| {}).unwrap();
    assert_eq!(both.plain.probs, plain.probs);
    assert_eq!(both.tta.targets, plain.targets);
    assert_ne!(
        aug.probs, plain.probs,
        "the crops must change the predictions"
    );
    for ((&t, &a), &p) in both.tta.probs.iter().zip(&aug.probs).zip(&plain.probs) {
        let want = f64::from(a) + 0.25 * (f64::from(p) - f64::from(a));
        assert!((f64::from(t) - want).abs() < 1e-6, "{t} vs {want}");
    }
    assert!(both.tta.loss.is_finite() && both.tta.loss > 0.0);

    let with = |n, beta, seed| {
        tta(
            model,
            &valid,
            &transform,
            &TtaConfig { n, beta, seed },
            &mut |_, _| {},
        )
        .unwrap()
        .tta
        .probs
    };
    assert_eq!(with(3, 1.0, 9), plain.probs);
    assert_eq!(with(3, 0.25, 9), with(3, 0.25, 9));
    assert_ne!(with(3, 0.25, 9), with(3, 0.25, 10));
    assert!(
        tta(
            model,
            &valid,
            &transform,
            &TtaConfig { n: 0, ..config },
            &mut |_, _| {}
        )
        .is_err()
    );
    assert!(
        tta(
            model,
            &valid,
            &transform,
            &TtaConfig {
                beta: 1.5,
                ..config
            },
            &mut |_, _| {}
        )
        .is_err()
    );
}

/// The Learner's freezing (from the kinds `Trainable` reports) agrees with
/// the ResNet's own, which decides which kernel gradients it computes.
#[test]
fn resnet_freezing_agrees_with_the_learner() {
    use multilabel_train::{ParamKind, Trainable};
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let mut learner = learner(&data);
    for n in [2, 1, 0, 3] {
        learner.freeze_to(n);
        let frozen = learner.frozen_groups();
        let expected: Vec<String> = Trainable::param_groups(learner.model())
            .into_iter()
            .enumerate()
            .flat_map(|(g, group)| {
                group
                    .params
                    .into_iter()
                    .filter(move |p| g >= frozen || p.kind == ParamKind::Norm)
                    .map(|p| p.name)
            })
            .collect();
        let resnet: Vec<String> = learner
            .model()
            .trainable_params()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(expected, resnet, "freeze_to({n})");
    }
}
