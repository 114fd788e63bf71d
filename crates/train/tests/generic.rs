//! The Learner over a model and data of the caller's own: a small MLP with
//! a BatchNorm in its body, trained from a `TensorDataset`. Freezing keeps
//! norm parameters training (fastai's `train_bn`), the variable checks
//! refuse what would silently never train or never be saved, learning rates
//! spread over however many groups the model gives, and the in-memory
//! source shuffles deterministically.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{BatchNorm, Linear, VarBuilder, VarMap};
use multilabel_train::{
    BatchSource, Event, FineTune, Learner, LearnerConfig, OneCycle, ParamGroup, ParamKind,
    Recorder, TensorDataset, Trainable, TtaConfig, opt_groups, predict, tta_over, vars_under,
};

const N_IN: usize = 6;
const N_CLASSES: usize = 3;

/// body: Linear(6→16) + BatchNorm + ReLU; head: Linear(16→3). With
/// `three_groups`, the BatchNorm is a group of its own between them.
struct Mlp {
    lin: Linear,
    bn: BatchNorm,
    head: Linear,
    varmap: VarMap,
    three_groups: bool,
    /// What `buffers()` reports (the running statistics, unless a test drops them).
    report_buffers: bool,
    frozen_hint: Arc<Mutex<Vec<usize>>>,
}

fn kind(name: &str) -> Option<ParamKind> {
    if name.contains("running_") {
        None
    } else if name.contains(".bn.") {
        Some(ParamKind::Norm)
    } else if name.ends_with(".bias") {
        Some(ParamKind::Bias)
    } else {
        Some(ParamKind::Weight)
    }
}

impl Mlp {
    fn new(varmap: &VarMap) -> Self {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
        let mlp = Self {
            lin: candle_nn::linear(N_IN, 16, vb.pp("body.lin")).unwrap(),
            bn: candle_nn::batch_norm(16, 1e-5, vb.pp("body.bn")).unwrap(),
            head: candle_nn::linear(16, N_CLASSES, vb.pp("head")).unwrap(),
            varmap: varmap.clone(),
            three_groups: false,
            report_buffers: true,
            frozen_hint: Arc::default(),
        };
        // Deterministic weights (candle-nn draws them unseeded on the CPU).
        for (i, (_, var)) in vars_under(varmap, "").into_iter().enumerate() {
            if var.dims().len() == 2 {
                let n = var.elem_count();
                let values: Vec<f32> = (0..n)
                    .map(|k| (((k * 7 + i * 13) % 17) as f32 / 17.0 - 0.5) * 0.8)
                    .collect();
                var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        mlp
    }
}

impl Trainable for Mlp {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let x = self.lin.forward(x)?.apply_t(&self.bn, train)?.relu()?;
        self.head.forward(&x)
    }

    fn param_groups(&self) -> Vec<ParamGroup> {
        if self.three_groups {
            vec![
                ParamGroup::from_varmap("lin", &self.varmap, "body.lin.", kind),
                ParamGroup::from_varmap("bn", &self.varmap, "body.bn.", kind),
                ParamGroup::from_varmap("head", &self.varmap, "head.", kind),
            ]
        } else {
            vec![
                ParamGroup::from_varmap("body", &self.varmap, "body.", kind),
                ParamGroup::from_varmap("head", &self.varmap, "head.", kind),
            ]
        }
    }

    fn buffers(&self) -> Vec<Var> {
        if !self.report_buffers {
            return Vec::new();
        }
        vars_under(&self.varmap, "")
            .into_iter()
            .filter(|(name, _)| kind(name).is_none())
            .map(|(_, var)| var)
            .collect()
    }

    fn freeze_to(&mut self, n: usize) {
        self.frozen_hint.lock().unwrap().push(n);
    }
}

/// `n` rows whose class `c` is on when feature `c` is positive.
fn data(n: usize, salt: usize) -> (Tensor, Tensor) {
    let x: Vec<f32> = (0..n * N_IN)
        .map(|k| ((((k + salt) * 2_654_435_761) % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let y: Vec<f32> = (0..n)
        .flat_map(|i| (0..N_CLASSES).map(move |c| (i, c)))
        .map(|(i, c)| f32::from(u8::from(x[i * N_IN + c] > 0.0)))
        .collect();
    (
        Tensor::from_vec(x, (n, N_IN), &Device::Cpu).unwrap(),
        Tensor::from_vec(y, (n, N_CLASSES), &Device::Cpu).unwrap(),
    )
}

fn learner_for(model: Mlp, varmap: VarMap) -> multilabel_train::Result<Learner<Mlp>> {
    let (x, y) = data(96, 0);
    let train = TensorDataset::new(x, y, 16).unwrap().shuffled(4);
    let (x, y) = data(40, 1);
    let valid = TensorDataset::new(x, y, 16).unwrap();
    Learner::new(
        model,
        varmap,
        train,
        valid,
        LearnerConfig::default(),
        Device::Cpu,
    )
}

fn values(varmap: &VarMap) -> BTreeMap<String, Vec<f32>> {
    vars_under(varmap, "")
        .into_iter()
        .map(|(name, var)| (name, var.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

fn changed(before: &BTreeMap<String, Vec<f32>>, after: &BTreeMap<String, Vec<f32>>) -> Vec<String> {
    before
        .iter()
        .filter(|(name, v)| after[*name] != **v)
        .map(|(name, _)| name.clone())
        .collect()
}

#[test]
fn freezing_keeps_norm_parameters_training() {
    let varmap = VarMap::new();
    let model = Mlp::new(&varmap);
    let hint = model.frozen_hint.clone();
    let mut learner = learner_for(model, varmap.clone()).unwrap();
    let n_batches = learner.train_batches();
    assert_eq!(n_batches, 6);

    learner.freeze();
    let before = values(&varmap);
    learner
        .fit_one_cycle(&OneCycle::new(vec![1e-3, 1e-2], 1, n_batches), "frozen")
        .unwrap();
    let after = values(&varmap);
    assert_eq!(
        changed(&before, &after),
        [
            "body.bn.bias",
            "body.bn.running_mean",
            "body.bn.running_var",
            "body.bn.weight",
            "head.bias",
            "head.weight"
        ],
        "frozen: the body's linear layer must not move, its BatchNorm must"
    );

    // Frozen past the last group: only norm parameters (and statistics) move.
    learner.freeze_to(5);
    assert_eq!(learner.frozen_groups(), 2);
    let before = after;
    learner
        .fit_one_cycle(&OneCycle::new(vec![1e-3, 1e-2], 1, n_batches), "all frozen")
        .unwrap();
    let after = values(&varmap);
    assert_eq!(
        changed(&before, &after),
        [
            "body.bn.bias",
            "body.bn.running_mean",
            "body.bn.running_var",
            "body.bn.weight"
        ]
    );

    learner.unfreeze();
    let before = after;
    learner
        .fit_one_cycle(&OneCycle::new(vec![1e-3, 1e-2], 1, n_batches), "unfrozen")
        .unwrap();
    assert_eq!(changed(&before, &values(&varmap)).len(), before.len());
    // The model was told each freezing (built unfrozen, then 1, 2, 0).
    assert_eq!(*hint.lock().unwrap(), [1, 2, 0]);
}

#[test]
fn weight_decay_skips_norm_parameters_and_biases() {
    let varmap = VarMap::new();
    let model = Mlp::new(&varmap);
    let flags: Vec<(String, bool)> = opt_groups(&model)
        .into_iter()
        .flat_map(|g| g.params)
        .map(|p| (p.name, p.no_decay))
        .collect();
    assert_eq!(
        flags,
        [
            ("body.bn.bias".to_string(), true),
            ("body.bn.weight".to_string(), true),
            ("body.lin.bias".to_string(), true),
            ("body.lin.weight".to_string(), false),
            ("head.bias".to_string(), true),
            ("head.weight".to_string(), false),
        ]
    );
}

#[test]
fn fine_tune_spreads_learning_rates_over_the_models_groups_and_learns() {
    for three_groups in [false, true] {
        let varmap = VarMap::new();
        let mut model = Mlp::new(&varmap);
        model.three_groups = three_groups;
        let mut learner = learner_for(model, varmap).unwrap();
        let recorder = Arc::new(Mutex::new(Recorder::default()));
        learner.add_sink(Box::new(recorder.clone()));
        let before = learner.validate().unwrap().valid_loss;
        learner.fine_tune(&FineTune::new(6, 2e-2)).unwrap();
        let after = learner.validate().unwrap().valid_loss;
        assert!(after < before - 0.1, "valid loss {before} -> {after}");

        let lr_max: Vec<Vec<f64>> = recorder
            .lock()
            .unwrap()
            .events
            .iter()
            .filter_map(|e| match e {
                Event::FitBegin { lr_max, .. } => Some(lr_max.clone()),
                _ => None,
            })
            .collect();
        // fastai: slice(2e-2) then slice(1e-4, 1e-2), spread geometrically.
        let (frozen, unfrozen) = if three_groups {
            (vec![2e-3, 2e-3, 2e-2], vec![1e-4, 1e-3, 1e-2])
        } else {
            (vec![2e-3, 2e-2], vec![1e-4, 1e-2])
        };
        for (got, want) in lr_max.iter().zip([frozen, unfrozen]) {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-12 * w, "{got:?} vs {want:?}");
            }
        }
    }
}

#[test]
fn the_learner_refuses_variables_it_would_never_train_or_save() {
    // Running statistics not declared as buffers.
    let varmap = VarMap::new();
    let mut model = Mlp::new(&varmap);
    model.report_buffers = false;
    let message = learner_for(model, varmap).err().unwrap().to_string();
    assert!(
        message.contains("body.bn.running_mean") && message.contains("body.bn.running_var"),
        "{message}"
    );

    // Parameters that live in another VarMap.
    let other = VarMap::new();
    let model = Mlp::new(&other);
    let message = learner_for(model, VarMap::new()).err().unwrap().to_string();
    assert!(message.contains("not in the Learner's VarMap"), "{message}");

    // A parameter in two groups.
    struct Twice(Mlp);
    impl Trainable for Twice {
        fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
            self.0.forward_t(x, train)
        }
        fn param_groups(&self) -> Vec<ParamGroup> {
            let mut groups = self.0.param_groups();
            let first = groups[0].params[0].clone();
            groups[1].params.push(first);
            groups
        }
        fn buffers(&self) -> Vec<Var> {
            self.0.buffers()
        }
    }
    let varmap = VarMap::new();
    let model = Twice(Mlp::new(&varmap));
    let (x, y) = data(32, 0);
    let source = || TensorDataset::new(x.clone(), y.clone(), 8).unwrap();
    let message = Learner::new(
        model,
        varmap,
        source(),
        source(),
        LearnerConfig::default(),
        Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        message.contains("body.bn.bias is listed twice"),
        "{message}"
    );

    // Sources that disagree on the number of classes.
    let varmap = VarMap::new();
    let model = Mlp::new(&varmap);
    let narrow = TensorDataset::new(x.clone(), y.narrow(1, 0, 2).unwrap(), 8).unwrap();
    let message = Learner::new(
        model,
        varmap,
        source(),
        narrow,
        LearnerConfig::default(),
        Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        message.contains("3 classes") && message.contains("validation source has 2"),
        "{message}"
    );
}

#[test]
fn predictions_come_back_in_source_order_and_tta_of_identical_passes_is_the_plain_prediction() {
    let varmap = VarMap::new();
    let model = Mlp::new(&varmap);
    let (x, y) = data(37, 2);
    let plain = TensorDataset::new(x.clone(), y.clone(), 8).unwrap();
    // The same rows, visited in a shuffled order and cut into other batches.
    let shuffled = TensorDataset::new(x.clone(), y, 5)
        .unwrap()
        .shuffled(9)
        .drop_last(false);
    let a = predict(&model, &plain, None, &mut |_, _| {}).unwrap();
    let b = predict(&model, &shuffled, None, &mut |_, _| {}).unwrap();
    assert_eq!(a.n_items(), 37);
    assert_eq!(a.targets, b.targets);
    for (p, q) in a.probs.iter().zip(&b.probs) {
        assert!((p - q).abs() < 1e-6, "{p} vs {q}");
    }
    // Row 0's probabilities are the model's on row 0.
    let logits = model.forward_t(&x.narrow(0, 0, 1).unwrap(), false).unwrap();
    let direct: Vec<f32> = candle_nn::ops::sigmoid(&logits)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (p, q) in a.probs[..N_CLASSES].iter().zip(&direct) {
        assert!((p - q).abs() < 1e-6, "{p} vs {q}");
    }

    let both = tta_over(
        &model,
        &plain,
        &shuffled,
        &TtaConfig {
            n: 3,
            ..TtaConfig::default()
        },
        &mut |_, _| {},
    )
    .unwrap();
    for (p, q) in both.tta.probs.iter().zip(&both.plain.probs) {
        assert!((p - q).abs() < 1e-6, "{p} vs {q}");
    }
    let short = TensorDataset::new(x.narrow(0, 0, 30).unwrap(), a_targets(&x), 8).unwrap();
    assert!(
        tta_over(
            &model,
            &plain,
            &short,
            &TtaConfig::default(),
            &mut |_, _| {}
        )
        .is_err()
    );
}

fn a_targets(x: &Tensor) -> Tensor {
    Tensor::zeros((30, N_CLASSES), DType::F32, x.device()).unwrap()
}

#[test]
fn tensor_dataset_shuffles_by_seed_and_epoch_and_keeps_rows_together() {
    let (x, y) = data(50, 3);
    let train = TensorDataset::new(x.clone(), y.clone(), 16)
        .unwrap()
        .shuffled(7);
    assert_eq!(
        (train.n_items(), train.n_batches(), train.n_classes()),
        (50, 3, 3)
    );
    let order0 = train.order(0);
    let mut sorted = order0.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>(), "a permutation");
    assert_eq!(order0, train.order(0), "the same epoch, the same order");
    assert_ne!(order0, train.order(1), "another epoch, another order");
    let other_seed = TensorDataset::new(x.clone(), y.clone(), 16)
        .unwrap()
        .shuffled(8);
    assert_ne!(order0, other_seed.order(0));

    let rows: Vec<Vec<f32>> = x.to_vec2().unwrap();
    let targets: Vec<Vec<f32>> = y.to_vec2().unwrap();
    let batches: Vec<_> = train.epoch(0).map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 3, "the last short batch is dropped");
    for (k, batch) in batches.iter().enumerate() {
        assert_eq!(batch.indices, order0[k * 16..(k + 1) * 16]);
        let got: Vec<Vec<f32>> = batch.images.to_vec2().unwrap();
        let got_targets: Vec<Vec<f32>> = batch.targets.to_vec2().unwrap();
        for (row, &item) in batch.indices.iter().enumerate() {
            assert_eq!(got[row], rows[item]);
            assert_eq!(got_targets[row], targets[item]);
        }
    }

    let valid = TensorDataset::new(x.clone(), y.clone(), 16).unwrap();
    let indices: Vec<Vec<usize>> = valid.epoch(3).map(|b| b.unwrap().indices).collect();
    assert_eq!(indices.len(), 4);
    assert_eq!(indices.concat(), (0..50).collect::<Vec<_>>());

    for (result, needle) in [
        (
            TensorDataset::new(x.clone(), y.narrow(0, 0, 49).unwrap(), 16),
            "50 rows but targets have 49",
        ),
        (
            TensorDataset::new(x.clone(), y.flatten_all().unwrap(), 16),
            "targets must be [n, n_classes]",
        ),
        (
            TensorDataset::new(x.clone(), y.to_dtype(DType::U8).unwrap(), 16),
            "targets must be floats",
        ),
        (TensorDataset::new(x.clone(), y.clone(), 0), "batch_size"),
    ] {
        let message = result.err().unwrap().to_string();
        assert!(message.contains(needle), "{message}");
    }
}
