//! The Learner: fastai's training loop over any [`Trainable`] model and
//! two [`BatchSource`]s.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device, Tensor, TensorId, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::error::{CandleContext, Error, Result};
use crate::events::{EpochRecord, Event, Sink, SmoothedLoss};
use crate::host;
use crate::loss::bce_with_logits;
use crate::metrics::accuracy_multi;
use crate::optim::{Adam, AdamConfig, AdamState, OptGroup, OptParam, StepHypers};
use crate::run::{ModelMeta, RunDir, TrainState};
use crate::schedule::{FineTune, OneCycle};
use crate::source::{Batch, BatchSource};
use crate::trainable::{ParamGroup, Trainable, trains};

/// Settings of the Learner that are not per-fit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LearnerConfig {
    /// Seeds the dropout masks (per step); the loaders carry their own seed.
    pub seed: u64,
    /// Threshold of the accuracy_multi metric reported each epoch (fastai recipe: 0.2).
    pub metric_thresh: f32,
    pub adam: AdamConfig,
    /// Optional per-class weight of the positive term of the loss.
    pub pos_weight: Option<Vec<f32>>,
    /// Training steps between reads of the loss from the device (0: every
    /// step on the CPU, where a read costs nothing, and every
    /// [`GPU_READ_EVERY`] steps elsewhere, where each read waits for the
    /// queued work). Progress events, the smoothed loss and the check for a
    /// non-finite loss follow these reads: with 1 a non-finite loss stops
    /// training before the optimizer steps on it; with more, at the next
    /// read, before anything is written to the run folder.
    #[serde(default)]
    pub read_every: usize,
}

/// Steps between loss reads on a GPU when [`LearnerConfig::read_every`] is 0.
pub const GPU_READ_EVERY: usize = 20;

impl Default for LearnerConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            metric_thresh: 0.2,
            adam: AdamConfig::default(),
            pos_weight: None,
            read_every: 0,
        }
    }
}

/// The result of one pass over the validation set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    /// Batch-size-weighted mean of the batch losses (fastai's `AvgLoss`).
    pub valid_loss: f64,
    pub accuracy_multi: f64,
}

/// Predictions in dataset order, as fastai's `get_preds`.
#[derive(Clone, Debug, PartialEq)]
pub struct Preds {
    /// Sigmoid probabilities, row-major `[n_items, n_classes]`.
    pub probs: Vec<f32>,
    /// 0/1 targets, same layout.
    pub targets: Vec<f32>,
    pub n_classes: usize,
    /// Batch-size-weighted mean loss over the set.
    pub loss: f64,
}

impl Preds {
    pub fn n_items(&self) -> usize {
        self.probs.len() / self.n_classes.max(1)
    }
}

/// Trains any [`Trainable`] model as fastai's `Learner` does: one-cycle
/// fits, `fine_tune`, freezing with `train_bn`, discriminative learning
/// rates over the model's param groups, per-epoch validation, events to
/// [`Sink`]s, checkpoints to a [`RunDir`], cancellation and resume.
pub struct Learner<M: Trainable> {
    model: M,
    varmap: VarMap,
    train: Box<dyn BatchSource>,
    valid: Box<dyn BatchSource>,
    /// The model's param groups as they were when the Learner was built.
    groups: Vec<ParamGroup>,
    /// How many leading groups are frozen.
    frozen_groups: usize,
    optimizer: Adam,
    config: LearnerConfig,
    device: Device,
    pos_weight: Option<Tensor>,
    sinks: Vec<Box<dyn Sink>>,
    run: Option<RunDir>,
    cancel: Option<Arc<AtomicBool>>,
    /// Parameters that must not move under the current freezing.
    frozen_vars: Vec<Var>,
    /// Fits started in this session; matched against a checkpoint's `fit`.
    fits_started: usize,
    /// Epochs of the fits before the current one: epochs are numbered
    /// globally for the loader, so that every epoch of a session gets its
    /// own shuffle and crops.
    epoch_offset: usize,
    global_step: u64,
    resume: Option<TrainState>,
    pending_optimizer: Option<AdamState>,
    /// The predictions of the last validation pass, until anything that
    /// moves the weights (a step, a resume, a restore) drops them.
    last_valid: Option<Preds>,
    /// The state of the checkpoint this Learner last wrote to its run.
    last_checkpoint: Option<TrainState>,
}

impl<M: Trainable> Learner<M> {
    /// A Learner over `model`, whose variables (parameters and buffers such
    /// as BatchNorm running statistics) all live in `varmap`, which is what
    /// checkpoints save and resumes restore. The optimizer takes the
    /// model's param groups. Refused: a parameter outside `varmap`, one in
    /// two groups, a variable of `varmap` that is neither a parameter nor a
    /// buffer (it would silently never train), and sources that disagree
    /// on the number of classes.
    pub fn new(
        model: M,
        varmap: VarMap,
        train: impl BatchSource + 'static,
        valid: impl BatchSource + 'static,
        config: LearnerConfig,
        device: Device,
    ) -> Result<Self> {
        let n_classes = train.n_classes();
        if valid.n_classes() != n_classes {
            return Err(Error::Invalid(format!(
                "the training source has {n_classes} classes but the validation source has {}",
                valid.n_classes()
            )));
        }
        let groups = model.param_groups();
        check_variables(&groups, &model.buffers(), &varmap)?;
        let optimizer = Adam::new(opt_groups_of(&groups), config.adam)?;
        let pos_weight = match &config.pos_weight {
            None => None,
            Some(w) if w.len() == n_classes => {
                Some(Tensor::from_slice(w, n_classes, &device).ctx(|| "pos_weight".into())?)
            }
            Some(w) => {
                return Err(Error::Invalid(format!(
                    "pos_weight has {} values but the model has {n_classes} classes",
                    w.len()
                )));
            }
        };
        let mut learner = Self {
            model,
            varmap,
            train: Box::new(train),
            valid: Box::new(valid),
            groups,
            frozen_groups: 0,
            optimizer,
            config,
            device,
            pos_weight,
            sinks: Vec::new(),
            run: None,
            cancel: None,
            frozen_vars: Vec::new(),
            fits_started: 0,
            epoch_offset: 0,
            global_step: 0,
            last_valid: None,
            last_checkpoint: None,
            resume: None,
            pending_optimizer: None,
        };
        learner.refresh_frozen();
        Ok(learner)
    }

    /// Sends every event to `sink` too.
    pub fn add_sink(&mut self, sink: Box<dyn Sink>) {
        self.sinks.push(sink);
    }

    /// Saves a checkpoint to `run` after every epoch and on cancellation.
    pub fn set_run(&mut self, run: RunDir) {
        self.run = Some(run);
        self.last_checkpoint = None;
    }

    /// Checked after every batch: when set, training saves its state and
    /// returns [`Error::Interrupted`].
    pub fn set_cancel_flag(&mut self, flag: Arc<AtomicBool>) {
        self.cancel = Some(flag);
    }

    pub fn model(&self) -> &M {
        &self.model
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    pub fn optimizer(&self) -> &Adam {
        &self.optimizer
    }

    pub fn config(&self) -> &LearnerConfig {
        &self.config
    }

    pub fn global_step(&self) -> u64 {
        self.global_step
    }

    /// fastai's `freeze()`: only the last group (the head) and the norm
    /// parameters train; optimizer state cleared.
    pub fn freeze(&mut self) {
        self.freeze_to(self.groups.len().saturating_sub(1));
    }

    /// fastai's `unfreeze()`: everything trains; optimizer state cleared.
    pub fn unfreeze(&mut self) {
        self.freeze_to(0);
    }

    /// fastai's `freeze_to(n)`: the parameters of the first `n` groups stop
    /// training, except the [`ParamKind::Norm`](crate::ParamKind::Norm) ones
    /// (fastai's `train_bn`); `n` past the last group freezes them all.
    /// Optimizer state cleared, as fastai's freezing recreates it.
    pub fn freeze_to(&mut self, n: usize) {
        self.frozen_groups = n.min(self.groups.len());
        self.model.freeze_to(self.frozen_groups);
        self.refresh_frozen();
        self.optimizer.clear_state();
    }

    /// How many leading param groups are frozen.
    pub fn frozen_groups(&self) -> usize {
        self.frozen_groups
    }

    /// Loads the checkpoint of `run` (weights now, optimizer state and
    /// position when the matching fit starts). Call the same sequence of
    /// fits as the interrupted session; fits already done are skipped and
    /// the result is the same as an uninterrupted run.
    pub fn resume_from(&mut self, run: &RunDir) -> Result<TrainState> {
        let checkpoint = run.load_checkpoint(&self.device)?.ok_or_else(|| {
            Error::Invalid(format!(
                "{} has no training state to resume; start a new run instead",
                run.path().display()
            ))
        })?;
        if checkpoint.state.seed != self.config.seed {
            return Err(Error::Invalid(format!(
                "the run was trained with seed {} but this Learner has seed {}; resume with the run's config.json",
                checkpoint.state.seed, self.config.seed
            )));
        }
        let data = self.varmap.data().lock().expect("VarMap lock poisoned");
        for (name, var) in data.iter() {
            let saved = checkpoint
                .weights
                .get(name)
                .ok_or_else(|| Error::StateMismatch {
                    name: name.clone(),
                    reason: "missing from the checkpoint".into(),
                })?;
            if saved.dims() != var.dims() {
                return Err(Error::StateMismatch {
                    name: name.clone(),
                    reason: format!("shape {:?}, model has {:?}", saved.dims(), var.dims()),
                });
            }
            var.set(saved).ctx(|| format!("restoring {name}"))?;
        }
        drop(data);
        self.last_valid = None;
        self.pending_optimizer = Some(checkpoint.optimizer);
        self.resume = Some(checkpoint.state.clone());
        Ok(checkpoint.state)
    }

    /// fastai's `fine_tune`: freeze, one cycle of `freeze_epochs` at
    /// `slice(base_lr)` with pct_start 0.99, unfreeze, one cycle of `epochs`
    /// at `slice(base_lr/2/lr_mult, base_lr/2)`.
    pub fn fine_tune(&mut self, plan: &FineTune) -> Result<()> {
        let n_groups = self.optimizer.groups().len();
        let [frozen, unfrozen] = plan.phases(n_groups, self.train.n_batches());
        self.freeze();
        if plan.freeze_epochs > 0 {
            self.fit_one_cycle(&frozen, "frozen")?;
        }
        self.unfreeze();
        self.fit_one_cycle(&unfrozen, "unfrozen")
    }

    /// One one-cycle fit; `phase` labels its events.
    pub fn fit_one_cycle(&mut self, cycle: &OneCycle, phase: &str) -> Result<()> {
        let fit = self.fits_started;
        self.fits_started += 1;
        let n_batches = self.train.n_batches();
        if cycle.n_batches != n_batches {
            return Err(Error::Invalid(format!(
                "the schedule has {} batches per epoch but the training loader has {n_batches}",
                cycle.n_batches
            )));
        }
        if cycle.lr_max.len() != self.optimizer.groups().len() {
            return Err(Error::Invalid(format!(
                "{} learning rates for {} parameter groups",
                cycle.lr_max.len(),
                self.optimizer.groups().len()
            )));
        }
        if n_batches == 0 {
            return Err(Error::Invalid(
                "the training source has no full batch; use fewer images per batch or more images"
                    .into(),
            ));
        }
        let epoch_offset = self.epoch_offset;
        self.epoch_offset += cycle.epochs;
        let mut smooth = SmoothedLoss::default();
        let (mut start_epoch, mut start_batch) = (0, 0);
        let mut resumed_at = None;
        if let Some(state) = self.resume.clone() {
            if state.fit > fit {
                return Ok(());
            }
            self.resume = None;
            if let Some(optimizer) = self.pending_optimizer.take() {
                self.optimizer.import_state(&optimizer)?;
            }
            self.global_step = state.global_step;
            smooth = state.smooth_loss;
            (start_epoch, start_batch) = (state.epoch, state.batch);
            resumed_at = Some((state.epoch, state.batch));
        }
        self.emit(Event::FitBegin {
            phase: phase.into(),
            n_epochs: cycle.epochs,
            n_batches,
            lr_max: cycle.lr_max.clone(),
            resumed_at,
        })?;
        for epoch in start_epoch..cycle.epochs {
            self.emit(Event::EpochBegin {
                phase: phase.into(),
                epoch,
                n_epochs: cycle.epochs,
            })?;
            let started = Instant::now();
            let first = if epoch == start_epoch { start_batch } else { 0 };
            if first < n_batches {
                let batches = self.train.epoch(epoch_offset + epoch);
                let read_every = self.read_every();
                let mut pending: Vec<PendingStep> = Vec::with_capacity(read_every);
                for (index, batch) in batches.enumerate().skip(first) {
                    let batch = batch?;
                    let hypers = cycle.at(epoch, index);
                    let loss = match self.train_step_deferred(&batch, &hypers, read_every == 1) {
                        Err(Error::NonFiniteLoss { loss, .. }) => {
                            // Nothing is written: the last checkpoint is the last good state.
                            return Err(Error::NonFiniteLoss {
                                epoch,
                                batch: index,
                                loss,
                            });
                        }
                        other => other?,
                    };
                    pending.push(PendingStep {
                        batch: index,
                        hypers,
                        loss,
                    });
                    // The events a flush emits may cancel (a sink, Ctrl-C):
                    // look again after it, and flush what is left before
                    // the checkpoint.
                    if pending.len() >= read_every || index + 1 == n_batches || self.cancelled() {
                        self.flush_steps(&mut pending, &mut smooth, phase, epoch, n_batches)?;
                    }
                    if self.cancelled() {
                        self.flush_steps(&mut pending, &mut smooth, phase, epoch, n_batches)?;
                        self.checkpoint(fit, epoch, index + 1, smooth)?;
                        return Err(Error::Interrupted {
                            epoch,
                            batch: index + 1,
                        });
                    }
                }
            }
            let validation = self.validate()?;
            let last = epoch + 1 == cycle.epochs;
            self.checkpoint(fit, epoch + 1, 0, smooth)?;
            self.emit(Event::EpochEnd(EpochRecord {
                phase: phase.into(),
                epoch,
                train_loss: smooth.value(),
                valid_loss: validation.valid_loss,
                metrics: vec![("accuracy_multi".into(), validation.accuracy_multi)],
                seconds: started.elapsed().as_secs_f64(),
            }))?;
            if self.cancelled() && !last {
                return Err(Error::Interrupted {
                    epoch: epoch + 1,
                    batch: 0,
                });
            }
        }
        self.emit(Event::FitEnd {
            phase: phase.into(),
        })
    }

    /// valid_loss and accuracy_multi (at `metric_thresh`) on the validation loader.
    /// Keeps the predictions for [`Learner::take_valid_preds`].
    pub fn validate(&mut self) -> Result<Validation> {
        let preds = self.predict_loader(true)?;
        let validation = Validation {
            valid_loss: preds.loss,
            accuracy_multi: accuracy_multi(
                &preds.probs,
                &preds.targets,
                self.config.metric_thresh,
            )?,
        };
        self.last_valid = Some(preds);
        Ok(validation)
    }

    /// fastai's `get_preds` on the validation set: eval mode, sigmoid
    /// probabilities, rows in dataset order. Always a fresh pass.
    pub fn get_preds(&mut self) -> Result<Preds> {
        self.predict_loader(false)
    }

    /// What [`Learner::get_preds`] would return, without the pass when the
    /// last validation (the end of a fit's last epoch, or a
    /// [`Learner::validate`]) already made those predictions and no step,
    /// resume or restore has run since. The Learner cannot see weights
    /// changed from outside (through [`Learner::varmap`] or the model's
    /// variables); after such a change call [`Learner::get_preds`].
    pub fn take_valid_preds(&mut self) -> Result<Preds> {
        match self.last_valid.take() {
            Some(preds) => Ok(preds),
            None => self.get_preds(),
        }
    }

    /// Writes `model.safetensors` and `model.json` to the run folder.
    pub fn save_model(&self, meta: &ModelMeta) -> Result<()> {
        let run = self.run.as_ref().ok_or_else(|| {
            Error::Invalid("no run folder set; call set_run before save_model".into())
        })?;
        run.save_model(&self.varmap, meta)
    }

    /// Marks the checkpoint of the run as finished (nothing left to resume)
    /// with [`RunDir::mark_finished`]'s small marker file. When this Learner
    /// wrote that checkpoint and has not stepped since, its state comes
    /// from memory instead of a read of the whole file.
    pub fn finish(&mut self) -> Result<()> {
        let Some(run) = &self.run else {
            return Ok(());
        };
        let state = match &self.last_checkpoint {
            Some(state) if state.global_step == self.global_step => Some(state.clone()),
            _ => run.load_checkpoint(&self.device)?.map(|c| c.state),
        };
        match state {
            Some(state) => run.mark_finished(&state),
            None => Ok(()),
        }
    }

    fn predict_loader(&mut self, emit_progress: bool) -> Result<Preds> {
        let mut events = Vec::new();
        let preds = predict(
            &self.model,
            self.valid.as_ref(),
            self.pos_weight.as_ref(),
            &mut |batch, n_batches| {
                if emit_progress {
                    events.push(Event::ValidBatchEnd { batch, n_batches });
                }
            },
        )?;
        for event in events {
            self.emit(event)?;
        }
        Ok(preds)
    }

    /// One optimizer step on `batch` with `hypers`; returns the batch loss.
    /// A non-finite loss is an error before anything is updated.
    pub(crate) fn train_step(&mut self, batch: &Batch, hypers: &StepHypers) -> Result<f32> {
        match self.train_step_deferred(batch, hypers, true)? {
            StepLoss::Read(loss) => Ok(loss),
            StepLoss::OnDevice(_) => unreachable!("a checked step reads its loss"),
        }
    }

    /// One optimizer step on `batch` with `hypers`. With `check`, the loss
    /// is read first and a non-finite one is an error before anything is
    /// updated; without, it stays on the device for a later batched read.
    fn train_step_deferred(
        &mut self,
        batch: &Batch,
        hypers: &StepHypers,
        check: bool,
    ) -> Result<StepLoss> {
        // Even a failed step may have moved BatchNorm's running statistics.
        self.last_valid = None;
        self.model
            .set_dropout_seed(dropout_seed(self.config.seed, self.global_step));
        let logits = self
            .model
            .forward_t(&batch.images, true)
            .ctx(|| "the model's forward pass".into())?;
        let loss = bce_with_logits(&logits, &batch.targets, self.pos_weight.as_ref())?;
        let value = if check {
            let value = host::read_scalar(&loss).ctx(|| "reading the loss".into())?;
            if !value.is_finite() {
                return Err(Error::NonFiniteLoss {
                    epoch: 0,
                    batch: 0,
                    loss: value,
                });
            }
            StepLoss::Read(value)
        } else {
            StepLoss::OnDevice(loss.detach())
        };
        let mut grads = loss.backward().ctx(|| "backward pass".into())?;
        for var in &self.frozen_vars {
            grads.remove(var.as_tensor());
        }
        self.optimizer.step(&grads, hypers)?;
        self.global_step += 1;
        Ok(value)
    }

    /// Steps between loss reads: the configured value, or the device's default.
    fn read_every(&self) -> usize {
        match self.config.read_every {
            0 if self.device.is_cpu() => 1,
            0 => GPU_READ_EVERY,
            n => n,
        }
    }

    /// Reads the losses of `pending` steps in one transfer, checks them and
    /// emits their `BatchEnd` events in order.
    fn flush_steps(
        &mut self,
        pending: &mut Vec<PendingStep>,
        smooth: &mut SmoothedLoss,
        phase: &str,
        epoch: usize,
        n_batches: usize,
    ) -> Result<()> {
        let on_device: Vec<Tensor> = pending
            .iter()
            .filter_map(|step| match &step.loss {
                StepLoss::OnDevice(t) => Some(t.reshape(1)),
                StepLoss::Read(_) => None,
            })
            .collect::<candle_core::Result<_>>()
            .ctx(|| "gathering the losses".into())?;
        let mut read = if on_device.is_empty() {
            Vec::new()
        } else {
            let all = Tensor::cat(&on_device, 0).ctx(|| "gathering the losses".into())?;
            host::read_vec1(&all).ctx(|| "reading the losses".into())?
        }
        .into_iter();
        for step in pending.drain(..) {
            let loss = match step.loss {
                StepLoss::Read(value) => value,
                StepLoss::OnDevice(_) => read.next().unwrap_or(f32::NAN),
            };
            if !loss.is_finite() {
                return Err(Error::NonFiniteLoss {
                    epoch,
                    batch: step.batch,
                    loss,
                });
            }
            let smooth_loss = smooth.push(f64::from(loss));
            self.emit(Event::BatchEnd {
                phase: phase.into(),
                epoch,
                batch: step.batch,
                n_batches,
                loss,
                smooth_loss,
                lrs: step.hypers.lrs,
                mom: step.hypers.mom,
            })?;
        }
        Ok(())
    }

    /// Batches per training epoch.
    pub fn train_batches(&self) -> usize {
        self.train.n_batches()
    }

    /// Images in the training set.
    pub fn train_items(&self) -> usize {
        self.train.n_items()
    }

    /// Images in the validation set.
    pub fn valid_items(&self) -> usize {
        self.valid.n_items()
    }

    /// The training batches of source epoch `epoch`.
    pub(crate) fn train_epoch(&self, epoch: usize) -> Box<dyn Iterator<Item = Result<Batch>>> {
        self.train.epoch(epoch)
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled()
    }

    /// A copy of every variable (parameters and running statistics), the
    /// optimizer state and the step counter.
    pub(crate) fn snapshot(&self) -> Result<Snapshot> {
        let data = self.varmap.data().lock().expect("VarMap lock poisoned");
        let mut weights = Vec::with_capacity(data.len());
        for (name, var) in data.iter() {
            let copy = var.as_tensor().copy().ctx(|| format!("copying {name}"))?;
            weights.push((var.clone(), copy));
        }
        Ok(Snapshot {
            weights,
            optimizer: self.optimizer.export_state(),
            global_step: self.global_step,
        })
    }

    /// Puts back what [`Learner::snapshot`] copied.
    pub(crate) fn restore(&mut self, snapshot: &Snapshot) -> Result<()> {
        self.last_valid = None;
        for (var, saved) in &snapshot.weights {
            var.set(saved).ctx(|| "restoring a variable".into())?;
        }
        self.optimizer.clear_state();
        self.optimizer.import_state(&snapshot.optimizer)?;
        self.global_step = snapshot.global_step;
        Ok(())
    }

    fn checkpoint(
        &mut self,
        fit: usize,
        epoch: usize,
        batch: usize,
        smooth: SmoothedLoss,
    ) -> Result<()> {
        let Some(run) = &self.run else {
            return Ok(());
        };
        let state = TrainState {
            seed: self.config.seed,
            fit,
            epoch,
            batch,
            global_step: self.global_step,
            smooth_loss: smooth,
            frozen: self.frozen_groups > 0,
            finished: false,
        };
        run.save_checkpoint(&state, &self.varmap, &self.optimizer.export_state())?;
        self.last_checkpoint = Some(state);
        let path = run.state_path();
        self.emit(Event::Checkpoint { path, epoch, batch })
    }

    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::SeqCst))
    }

    fn emit(&mut self, event: Event) -> Result<()> {
        for sink in &mut self.sinks {
            sink.on_event(&event)?;
        }
        Ok(())
    }

    fn refresh_frozen(&mut self) {
        let frozen = self.frozen_groups;
        self.frozen_vars = self
            .groups
            .iter()
            .enumerate()
            .flat_map(|(g, group)| {
                group
                    .params
                    .iter()
                    .filter(move |p| !trains(p.kind, g, frozen))
            })
            .map(|p| p.var.clone())
            .collect();
    }
}

/// A model's param groups as optimizer groups, each parameter keeping its
/// no-weight-decay flag (norm parameters and biases).
pub fn opt_groups<M: Trainable + ?Sized>(model: &M) -> Vec<OptGroup> {
    opt_groups_of(&model.param_groups())
}

fn opt_groups_of(groups: &[ParamGroup]) -> Vec<OptGroup> {
    groups
        .iter()
        .map(|g| OptGroup {
            name: g.name.clone(),
            params: g
                .params
                .iter()
                .map(|p| OptParam {
                    name: p.name.clone(),
                    var: p.var.clone(),
                    no_decay: p.kind.no_decay(),
                })
                .collect(),
        })
        .collect()
}

/// Every parameter in `varmap` and in one group only, and every variable
/// of `varmap` a parameter or a buffer.
fn check_variables(groups: &[ParamGroup], buffers: &[Var], varmap: &VarMap) -> Result<()> {
    if groups.is_empty() || groups.iter().all(|g| g.params.is_empty()) {
        return Err(Error::Invalid(
            "the model has no parameters to train (param_groups is empty)".into(),
        ));
    }
    let data = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
    let names: HashMap<TensorId, &str> = data
        .iter()
        .map(|(name, var)| (var.as_tensor().id(), name.as_str()))
        .collect();
    let mut seen: HashMap<TensorId, &str> = HashMap::new();
    for group in groups {
        for param in &group.params {
            let id = param.var.as_tensor().id();
            if !names.contains_key(&id) {
                return Err(Error::Invalid(format!(
                    "parameter {} (group {}) is not in the Learner's VarMap, so it would not be saved; build the model from that VarMap",
                    param.name, group.name
                )));
            }
            if let Some(first) = seen.insert(id, &group.name) {
                return Err(Error::Invalid(format!(
                    "parameter {} is listed twice (groups {first} and {})",
                    param.name, group.name
                )));
            }
        }
    }
    let buffers: HashSet<TensorId> = buffers.iter().map(|b| b.as_tensor().id()).collect();
    let mut orphans: Vec<&str> = names
        .iter()
        .filter(|(id, _)| !seen.contains_key(*id) && !buffers.contains(*id))
        .map(|(_, name)| *name)
        .collect();
    if !orphans.is_empty() {
        orphans.sort_unstable();
        return Err(Error::Invalid(format!(
            "{} variable(s) of the VarMap are in no param group and not among the model's buffers, so they would never train: {}; add them to a group, or to buffers() if they are state",
            orphans.len(),
            orphans.join(", ")
        )));
    }
    Ok(())
}

/// What [`Learner::snapshot`] saved.
pub(crate) struct Snapshot {
    weights: Vec<(Var, Tensor)>,
    optimizer: AdamState,
    global_step: u64,
}

/// fastai's `get_preds` over any source: eval mode
/// ([`Trainable::forward_infer`]), sigmoid probabilities, rows placed in
/// source order by the batches' indices, and the batch-size-weighted mean
/// loss. `on_batch(done, total)` follows progress. The source must yield
/// every item (no `drop_last`).
pub fn predict<M: Trainable + ?Sized>(
    model: &M,
    source: &dyn BatchSource,
    pos_weight: Option<&Tensor>,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<Preds> {
    predict_epoch(model, source, 0, pos_weight, on_batch)
}

/// Test-time augmentation settings: fastai's `Learner.tta(n=4, beta=0.25)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TtaConfig {
    /// Augmented passes over the set.
    pub n: usize,
    /// Weight of the plain prediction: `aug_mean + beta · (plain − aug_mean)`.
    pub beta: f32,
    /// Seed of the augmented crops; pass `k` uses the augmented source's epoch `k`.
    pub seed: u64,
}

impl Default for TtaConfig {
    fn default() -> Self {
        Self {
            n: 4,
            beta: 0.25,
            seed: 0,
        }
    }
}

/// The plain predictions and the test-time-augmented ones of one set.
#[derive(Clone, Debug)]
pub struct TtaPreds {
    pub plain: Preds,
    pub tta: Preds,
}

/// fastai's `Learner.tta()` over any model and sources: the mean of
/// `config.n` predictions from `augmented` (pass `k` is its epoch `k`, so
/// the source decides the augmentation and, through its seed, the crops),
/// blended with the plain prediction from `plain` as
/// `torch.lerp(aug_mean, plain, beta)`. Both sources must hold the same
/// items in the same positions. The TTA loss is the binary cross-entropy of
/// the blended probabilities (each log clamped at −100, as PyTorch's
/// `BCELoss`). `on_pass(k, n + 1)` is called after each of the `n + 1`
/// passes. (`config.seed` is for whoever builds `augmented`.)
pub fn tta_over<M: Trainable + ?Sized>(
    model: &M,
    plain: &dyn BatchSource,
    augmented: &dyn BatchSource,
    config: &TtaConfig,
    on_pass: &mut dyn FnMut(usize, usize),
) -> Result<TtaPreds> {
    if config.n == 0 {
        return Err(Error::Invalid(
            "test-time augmentation needs n >= 1 passes".into(),
        ));
    }
    if !(0.0..=1.0).contains(&config.beta) {
        return Err(Error::Invalid(format!(
            "the TTA weight beta must be between 0 and 1, got {}",
            config.beta
        )));
    }
    if augmented.n_items() != plain.n_items() || augmented.n_classes() != plain.n_classes() {
        return Err(Error::Invalid(format!(
            "the augmented source has {} items of {} classes but the plain one {} of {}",
            augmented.n_items(),
            augmented.n_classes(),
            plain.n_items(),
            plain.n_classes()
        )));
    }
    let passes = config.n + 1;
    let plain = predict(model, plain, None, &mut |_, _| {})?;
    on_pass(0, passes);
    let mut sum = vec![0f64; plain.probs.len()];
    for k in 0..config.n {
        let pass = predict_epoch(model, augmented, k, None, &mut |_, _| {})?;
        for (s, p) in sum.iter_mut().zip(&pass.probs) {
            *s += f64::from(*p);
        }
        on_pass(k + 1, passes);
    }
    let beta = f64::from(config.beta);
    let probs: Vec<f32> = sum
        .iter()
        .zip(&plain.probs)
        .map(|(s, &p)| {
            let mean = s / config.n as f64;
            (mean + beta * (f64::from(p) - mean)) as f32
        })
        .collect();
    let loss = binary_cross_entropy(&probs, &plain.targets);
    let tta = Preds {
        probs,
        targets: plain.targets.clone(),
        n_classes: plain.n_classes,
        loss,
    };
    Ok(TtaPreds { plain, tta })
}

/// Mean binary cross-entropy of probabilities, each log clamped at −100.
fn binary_cross_entropy(probs: &[f32], targets: &[f32]) -> f64 {
    let total: f64 = probs
        .iter()
        .zip(targets)
        .map(|(&p, &t)| {
            let (p, t) = (f64::from(p), f64::from(t));
            -(t * p.ln().max(-100.0) + (1.0 - t) * (1.0 - p).ln().max(-100.0))
        })
        .sum();
    total / probs.len().max(1) as f64
}

/// [`predict`] over the source's epoch `epoch` (for an augmenting source,
/// other crops per epoch).
fn predict_epoch<M: Trainable + ?Sized>(
    model: &M,
    source: &dyn BatchSource,
    epoch: usize,
    pos_weight: Option<&Tensor>,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<Preds> {
    let n_items = source.n_items();
    let n_classes = source.n_classes();
    let n_batches = source.n_batches();
    // Each batch leaves `[probs | targets | loss]` rows on the device; they
    // are read in one transfer at the end.
    let mut rows_on_device = Vec::with_capacity(n_batches);
    let mut batch_indices = Vec::with_capacity(n_batches);
    for (index, batch) in source.epoch(epoch).enumerate() {
        let batch = batch?;
        let logits = model
            .forward_infer(&batch.images)
            .ctx(|| "the model's forward pass".into())?;
        let loss = bce_with_logits(&logits, &batch.targets, pos_weight)?;
        let rows = batch.indices.len();
        let packed = candle_nn::ops::sigmoid(&logits)
            .and_then(|p| p.to_dtype(DType::F32))
            .and_then(|p| {
                let targets = batch.targets.to_dtype(DType::F32)?;
                let loss = loss
                    .to_dtype(DType::F32)?
                    .reshape((1, 1))?
                    .repeat((rows, 1))?;
                Tensor::cat(&[&p, &targets, &loss], 1)
            })
            .ctx(|| "validation predictions".into())?;
        rows_on_device.push(packed);
        batch_indices.push(batch.indices);
        on_batch(index, n_batches);
    }
    let mut probs = vec![0f32; n_items * n_classes];
    let mut targets = vec![0f32; n_items * n_classes];
    let mut seen = vec![false; n_items];
    let mut loss_sum = 0f64;
    if !rows_on_device.is_empty() {
        let all = Tensor::cat(&rows_on_device, 0).ctx(|| "validation predictions".into())?;
        let read = host::read_vec2(&all).ctx(|| "reading the validation predictions".into())?;
        let mut read = read.iter();
        for indices in &batch_indices {
            for (row, &item) in indices.iter().enumerate() {
                let Some(values) = read.next() else {
                    return Err(Error::Invalid("the validation read came back short".into()));
                };
                if row == 0 {
                    // The batch's mean loss, weighted by its size (fastai's AvgLoss).
                    loss_sum += f64::from(values[2 * n_classes]) * indices.len() as f64;
                }
                let at = item * n_classes;
                probs[at..at + n_classes].copy_from_slice(&values[..n_classes]);
                targets[at..at + n_classes].copy_from_slice(&values[n_classes..2 * n_classes]);
                seen[item] = true;
            }
        }
    }
    if let Some(missing) = seen.iter().position(|s| !s) {
        return Err(Error::Invalid(format!(
            "the loader skipped item {missing}; predictions need every item (no drop_last)"
        )));
    }
    Ok(Preds {
        probs,
        targets,
        n_classes,
        loss: loss_sum / n_items.max(1) as f64,
    })
}

/// The dropout seed of one optimizer step: a SplitMix64 mix of the run seed
/// and the step, so masks differ between steps but are the same after a resume.
pub fn dropout_seed(seed: u64, step: u64) -> u64 {
    let mut z = seed ^ step.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A training step's loss: read already, or still on the device.
enum StepLoss {
    Read(f32),
    OnDevice(Tensor),
}

/// A step whose `BatchEnd` event waits for the next loss read.
struct PendingStep {
    batch: usize,
    hypers: StepHypers,
    loss: StepLoss,
}
