//! fastai's `fine_tune` for candle: everything between a model plus two
//! loaders and a trained, evaluated run folder.
//!
//! The main types:
//!
//! - [`Learner`] trains any [`Trainable`] model (the crate's ResNet, or
//!   yours: logits, ordered param groups, buffers) on batches from any
//!   [`BatchSource`] (the data crate's `Loader`, a [`TensorDataset`] in
//!   memory, or yours): [`Learner::fine_tune`], [`Learner::fit_one_cycle`],
//!   [`Learner::freeze_to`], [`Learner::validate`], [`Learner::get_preds`]
//!   (or [`Learner::take_valid_preds`], which reuses the last validation's);
//!   it checkpoints to a [`RunDir`], stops on a cancellation flag and
//!   resumes bit for bit ([`Learner::resume_from`]). [`predict`] and
//!   [`tta_over`] work on any model and source.
//! - [`bce_with_logits`]: mean binary cross-entropy on logits in a form that
//!   stays finite for any logit.
//! - [`Adam`]: fastai's Adam (parameter groups, scheduled β1 also in the bias
//!   correction, β2 0.99, eps outside the square root, decoupled weight decay
//!   that skips BatchNorm parameters and biases), with exportable state.
//! - [`OneCycle`] and [`FineTune`]: the per-step learning rates and momentum
//!   of `fit_one_cycle` and `fine_tune`, as pure functions.
//! - [`metrics`]: `accuracy_multi`, the threshold sweep, AP (scikit-learn's
//!   and VOC2007's 11-point), F1 and exact match over plain slices.
//! - [`Event`] and [`Sink`]: what training reports, rendered by
//!   [`EpochTable`], [`HistoryCsv`] and [`EventsJsonl`].
//! - [`RunDir`]: `runs/<name>/` with the model bundle ([`ModelMeta`]) and the
//!   resumable [`TrainState`], every file written atomically.
//!
//! # Example
//!
//! (With the default `learner` feature.)

#![cfg_attr(
    feature = "learner",
    doc = r#"
Fine-tune a narrow ResNet-18 on a generated dataset, then score it:

```no_run
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use multilabel_data::{Dataset, DatasetConfig, Loader, LoaderConfig, SynthConfig, TransformConfig};
use multilabel_resnet::{Arch, ResNet, ResNetConfig};
use multilabel_train::{metrics, EpochTable, FineTune, Learner, LearnerConfig, RunDir};

# fn main() -> Result<(), Box<dyn std::error::Error>> {
let device = Device::Cpu;
let root = std::env::temp_dir().join("multilabel-example");
multilabel_data::synth(&SynthConfig { out: root.clone(), ..SynthConfig::default() })?;
let data = Dataset::load(&DatasetConfig::new(&root))?;
let n_classes = data.vocab().len();
let transform = TransformConfig { size: 64, ..TransformConfig::default() };
let train = Loader::new(data.train().to_vec(), n_classes, transform.clone(), LoaderConfig::train(32, 7), device.clone());
let valid = Loader::new(data.valid().to_vec(), n_classes, transform, LoaderConfig::valid(32), device.clone());

let varmap = VarMap::new();
let mut config = ResNetConfig::new(Arch::ResNet18, n_classes);
config.base_width = 8;
let model = ResNet::new(&config, VarBuilder::from_varmap(&varmap, DType::F32, &device), 7)?;

let mut learner = Learner::new(model, varmap, train, valid, LearnerConfig::default(), device)?;
learner.add_sink(Box::new(EpochTable::new(std::io::stdout())));
learner.set_run(RunDir::create(root.join("runs/example"))?);
let mut plan = FineTune::new(2, 3e-3);
plan.freeze_epochs = 1;
learner.fine_tune(&plan)?;

let preds = learner.take_valid_preds()?;
let sweep = metrics::threshold_sweep(&preds.probs, &preds.targets, &metrics::default_thresholds())?;
let best = metrics::best_threshold(&sweep).expect("30 thresholds");
let map = metrics::mean_average_precision(&preds.probs, &preds.targets, preds.n_classes)?;
println!("best accuracy_multi {:.4} at {:.2}, mAP {:.4}", best.accuracy_multi, best.thresh, map.map);
# Ok(())
# }
```
"#
)]

mod adam_fused;
pub mod error;
pub mod events;
pub mod host;
pub mod learner;
pub mod loss;
pub mod lr_find;
pub mod metrics;
pub mod optim;
pub mod report;
#[cfg(feature = "learner")]
pub mod resnet;
pub mod run;
pub mod schedule;
pub mod source;
pub mod trainable;

pub use error::{Error, Result};
pub use events::{
    EpochRecord, EpochTable, Event, EventsJsonl, HistoryCsv, Recorder, Sink, SmoothedLoss,
};
pub use host::host_reads;
pub use learner::{
    GPU_READ_EVERY, Learner, LearnerConfig, Preds, TtaConfig, TtaPreds, Validation, dropout_seed,
    opt_groups, predict, tta_over,
};
pub use loss::bce_with_logits;
pub use lr_find::{LrFindConfig, LrFindResult};
pub use optim::{Adam, AdamConfig, AdamParams, AdamState, OptGroup, OptParam, StepHypers};
pub use report::{ClassReport, ClassThreshold, EvalReport, PerClassReport, TtaReport};
#[cfg(feature = "learner")]
pub use resnet::{tta, tta_loader};
pub use run::{Checkpoint, ModelMeta, RunDir, TrainState, atomic_write};
pub use schedule::{FineTune, LrSpec, OneCycle};
pub use source::{Batch, BatchSource, TensorDataset};
pub use trainable::{Param, ParamGroup, ParamKind, Trainable, vars_under};
