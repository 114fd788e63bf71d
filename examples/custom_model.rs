//! fastai's recipe for your own candle model: a small CNN built from
//! candle-nn layers, with its own two parameter groups, fine-tuned with
//! `fine_tune` on generated images held in memory, then scored.
//!
//! Run with `cargo run --release --example custom_model`. The tests train
//! it too (`tests/custom_model.rs`) and check that it learns.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{BatchNorm, Conv2d, Conv2dConfig, Linear, VarBuilder, VarMap};
use multilabel_train::{
    EpochTable, Event, FineTune, Learner, LearnerConfig, ParamGroup, ParamKind, Recorder,
    TensorDataset, Trainable, metrics, vars_under,
};

/// Two conv–BatchNorm–ReLU stages, global average pooling and a linear head.
pub struct SmallCnn {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    head: Linear,
    varmap: VarMap,
}

impl SmallCnn {
    /// Every variable goes into `varmap`: `body.*` and `head.*`.
    pub fn new(varmap: &VarMap, n_classes: usize, device: &Device) -> candle_core::Result<Self> {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, device);
        let same = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            conv1: candle_nn::conv2d_no_bias(3, 16, 3, same, vb.pp("body.conv1"))?,
            bn1: candle_nn::batch_norm(16, 1e-5, vb.pp("body.bn1"))?,
            conv2: candle_nn::conv2d_no_bias(16, 32, 3, same, vb.pp("body.conv2"))?,
            bn2: candle_nn::batch_norm(32, 1e-5, vb.pp("body.bn2"))?,
            head: candle_nn::linear(32, n_classes, vb.pp("head"))?,
            varmap: varmap.clone(),
        })
    }
}

/// What each variable is: running statistics are state (not parameters),
/// BatchNorm weights and biases keep training while frozen, biases get no
/// weight decay.
fn kind(name: &str) -> Option<ParamKind> {
    if name.ends_with("running_mean") || name.ends_with("running_var") {
        None
    } else if name.contains(".bn") {
        Some(ParamKind::Norm)
    } else if name.ends_with(".bias") {
        Some(ParamKind::Bias)
    } else {
        Some(ParamKind::Weight)
    }
}

impl Trainable for SmallCnn {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let x = self.conv1.forward(x)?.apply_t(&self.bn1, train)?.relu()?;
        let x = x.max_pool2d(2)?;
        let x = self.conv2.forward(&x)?.apply_t(&self.bn2, train)?.relu()?;
        x.mean((2, 3))?.apply(&self.head)
    }

    /// The body, then the head: `fine_tune` freezes the body first.
    fn param_groups(&self) -> Vec<ParamGroup> {
        vec![
            ParamGroup::from_varmap("body", &self.varmap, "body.", kind),
            ParamGroup::from_varmap("head", &self.varmap, "head.", kind),
        ]
    }

    fn buffers(&self) -> Vec<Var> {
        let all = vars_under(&self.varmap, "");
        all.into_iter()
            .filter(|(name, _)| kind(name).is_none())
            .map(|(_, var)| var)
            .collect()
    }
}

/// Settings of [`run`].
pub struct Settings {
    pub n_train: usize,
    pub n_valid: usize,
    pub epochs: usize,
    pub seed: u64,
    /// Print the epoch table to stdout.
    pub verbose: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            n_train: 1024,
            n_valid: 256,
            epochs: 4,
            seed: 1,
            verbose: true,
        }
    }
}

/// What [`run`] measured.
pub struct Outcome {
    /// Per epoch, frozen then unfrozen: (smoothed train loss, valid loss).
    pub losses: Vec<(f64, f64)>,
    /// Mean average precision on the validation images.
    pub map: f64,
    /// The mAP a model with no skill gets: the share of positive labels.
    pub chance_map: f64,
    /// accuracy_multi at 0.5.
    pub accuracy: f64,
}

/// Fine-tunes a [`SmallCnn`] on generated data (one frozen epoch, then
/// `epochs` unfrozen, fastai's `fine_tune`) and scores it.
pub fn run(settings: &Settings) -> anyhow::Result<Outcome> {
    let device = Device::Cpu;
    let (x, y) = generated(settings.n_train, settings.seed, &device)?;
    let train = TensorDataset::new(x, y, 32)?.shuffled(settings.seed);
    let (x, y) = generated(settings.n_valid, settings.seed + 1, &device)?;
    let valid = TensorDataset::new(x, y, 64)?;

    let varmap = VarMap::new();
    let model = SmallCnn::new(&varmap, COLOURS.len(), &device)?;
    seeded_init(&varmap, settings.seed)?;
    let config = LearnerConfig {
        seed: settings.seed,
        ..LearnerConfig::default()
    };
    let mut learner = Learner::new(model, varmap, train, valid, config, device)?;
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    learner.add_sink(Box::new(recorder.clone()));
    if settings.verbose {
        learner.add_sink(Box::new(EpochTable::new(std::io::stdout())));
    }
    learner.fine_tune(&FineTune::new(settings.epochs, 3e-2))?;

    let preds = learner.get_preds()?;
    let map = metrics::mean_average_precision(&preds.probs, &preds.targets, preds.n_classes)?;
    let accuracy = metrics::accuracy_multi(&preds.probs, &preds.targets, 0.5)?;
    let positives = preds.targets.iter().filter(|&&t| t > 0.5).count();
    let losses = recorder
        .lock()
        .expect("recorder")
        .events
        .iter()
        .filter_map(|event| match event {
            Event::EpochEnd(record) => Some((record.train_loss, record.valid_loss)),
            _ => None,
        })
        .collect();
    Ok(Outcome {
        losses,
        map: map.map,
        chance_map: positives as f64 / preds.targets.len() as f64,
        accuracy,
    })
}

/// candle-nn draws initial weights from an unseeded generator on the CPU;
/// for a run that repeats, redraw every weight and bias from `seed`
/// (PyTorch's default bound, `1/sqrt(fan_in)`).
fn seeded_init(varmap: &VarMap, seed: u64) -> candle_core::Result<()> {
    let mut uniform = xorshift(seed ^ 0x5EED);
    for (name, var) in vars_under(varmap, "") {
        if !matches!(kind(&name), Some(ParamKind::Weight | ParamKind::Bias)) {
            continue;
        }
        let fan_in = var.elem_count() / var.dims()[0];
        let fan_in = if name.ends_with(".bias") {
            // A bias takes the bound of its layer's weight.
            let weight = name.trim_end_matches("bias").to_string() + "weight";
            vars_under(varmap, &weight)
                .first()
                .map_or(1, |(_, w)| w.elem_count() / w.dims()[0])
        } else {
            fan_in
        };
        let bound = 1.0 / (fan_in as f32).sqrt();
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| (2.0 * uniform() - 1.0) * bound)
            .collect();
        var.set(&Tensor::from_vec(values, var.shape(), var.device())?)?;
    }
    Ok(())
}

/// A uniform generator on [0, 1) (xorshift64*), deterministic given `seed`.
fn xorshift(seed: u64) -> impl FnMut() -> f32 {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// The colour of each class's square.
const COLOURS: [[f32; 3]; 4] = [
    [1.0, 0.1, 0.1],
    [0.1, 1.0, 0.1],
    [0.1, 0.1, 1.0],
    [1.0, 1.0, 0.1],
];

/// `n` images `[n, 3, 24, 24]` of noise, each class present with
/// probability 0.35 as a 6×6 square of its colour somewhere, and their
/// 0/1 targets `[n, 4]`. Deterministic given `seed`.
pub fn generated(n: usize, seed: u64, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    const SIZE: usize = 24;
    const SIDE: usize = 6;
    let mut uniform = xorshift(seed);
    let mut pixels = vec![0f32; n * 3 * SIZE * SIZE];
    let mut targets = vec![0f32; n * COLOURS.len()];
    for i in 0..n {
        let image = &mut pixels[i * 3 * SIZE * SIZE..(i + 1) * 3 * SIZE * SIZE];
        for p in image.iter_mut() {
            *p = 0.4 * uniform();
        }
        for (class, colour) in COLOURS.iter().enumerate() {
            if uniform() >= 0.35 {
                continue;
            }
            targets[i * COLOURS.len() + class] = 1.0;
            let top = (uniform() * (SIZE - SIDE) as f32) as usize;
            let left = (uniform() * (SIZE - SIDE) as f32) as usize;
            for (c, &value) in colour.iter().enumerate() {
                for row in top..top + SIDE {
                    let at = c * SIZE * SIZE + row * SIZE + left;
                    image[at..at + SIDE].fill(value);
                }
            }
        }
    }
    Ok((
        Tensor::from_vec(pixels, (n, 3, SIZE, SIZE), device)?,
        Tensor::from_vec(targets, (n, COLOURS.len()), device)?,
    ))
}

#[allow(dead_code)] // the tests include this file for `run` alone
fn main() -> anyhow::Result<()> {
    let outcome = run(&Settings::default())?;
    println!(
        "mAP {:.4} (chance {:.4}), accuracy_multi@0.5 {:.4}",
        outcome.map, outcome.chance_map, outcome.accuracy
    );
    Ok(())
}
