//! fastai's Adam: parameter groups, scheduled β1, decoupled weight decay.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{CandleContext, Error, Result};

/// One trainable tensor as the optimizer sees it.
#[derive(Clone, Debug)]
pub struct OptParam {
    /// Unique name (the tensor name in the model's `VarMap`); keys the state.
    pub name: String,
    pub var: Var,
    /// BatchNorm parameters and biases: no weight decay (fastai's `wd_bn_bias=False`).
    pub no_decay: bool,
}

/// A parameter group: every parameter in it uses the group's learning rate.
#[derive(Clone, Debug)]
pub struct OptGroup {
    pub name: String,
    pub params: Vec<OptParam>,
}

/// The hyperparameters that stay fixed over a fit (fastai's `Adam` defaults).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    /// β2 of the squared-gradient average (0.99, not PyTorch's 0.999).
    pub sqr_mom: f64,
    /// Added outside the square root (1e-5).
    pub eps: f64,
    /// Decoupled weight decay (0.01), applied as `p *= 1 − lr·wd`.
    pub wd: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            sqr_mom: 0.99,
            eps: 1e-5,
            wd: 0.01,
        }
    }
}

/// The hyperparameters that change every step: one lr per group and the
/// momentum, which is β1 of the gradient average and of its bias correction.
#[derive(Clone, Debug, PartialEq)]
pub struct StepHypers {
    pub lrs: Vec<f64>,
    pub mom: f64,
}

/// The moments of one parameter.
#[derive(Clone, Debug)]
pub struct ParamState {
    pub grad_avg: Tensor,
    pub sqr_avg: Tensor,
    pub step: u64,
}

/// Optimizer state in a form that can be saved: tensors named
/// `<param>.grad_avg` / `<param>.sqr_avg` (for safetensors) and step counts.
#[derive(Clone, Debug, Default)]
pub struct AdamState {
    pub tensors: BTreeMap<String, Tensor>,
    pub steps: BTreeMap<String, u64>,
}

/// [`Adam`]'s settings as a [`candle_nn::Optimizer`]: one group, with the
/// learning rate and β1 (`mom`) that [`candle_nn::Optimizer::step`] uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamParams {
    pub lr: f64,
    /// β1 of the gradient average and of its bias correction.
    pub mom: f64,
    pub adam: AdamConfig,
}

impl Default for AdamParams {
    /// fastai's defaults: lr 1e-3, β1 0.9, and [`AdamConfig::default`].
    fn default() -> Self {
        Self {
            lr: 1e-3,
            mom: 0.9,
            adam: AdamConfig::default(),
        }
    }
}

/// fastai's `Adam` (optimizer.py in fastai 2.x), step for step:
///
/// ```text
/// if do_wd: p *= 1 − lr·wd
/// grad_avg = mom·grad_avg + (1 − mom)·g
/// sqr_avg  = sqr_mom·sqr_avg + (1 − sqr_mom)·g²
/// step += 1
/// p −= lr / (1 − mom^step) · grad_avg / (sqrt(sqr_avg / (1 − sqr_mom^step)) + eps)
/// ```
///
/// Only parameters that have a gradient in the `GradStore` are touched, so
/// frozen tensors (which the model detaches) keep their values and state.
///
/// It is also a [`candle_nn::Optimizer`], so it drops into a candle training
/// loop: `<Adam as Optimizer>::new(varmap.all_vars(), AdamParams::default())`
/// makes one group in which every tensor of rank 0 or 1 (biases, norm
/// weights) gets no weight decay, as fastai's default; the trait's `step`
/// uses the learning rate of `set_learning_rate` and [`AdamParams::mom`].
/// On the concrete type the inherent `step` and `new` take precedence, so
/// call the trait's through the trait (`Optimizer::step(&mut adam, &grads)`)
/// or from generic code.
#[derive(Debug)]
pub struct Adam {
    groups: Vec<OptGroup>,
    config: AdamConfig,
    state: BTreeMap<String, ParamState>,
    /// What [`candle_nn::Optimizer::step`] steps with.
    trait_hypers: StepHypers,
}

impl Adam {
    /// Builds the optimizer; parameter names must be unique across groups.
    pub fn new(groups: Vec<OptGroup>, config: AdamConfig) -> Result<Self> {
        let mut seen = std::collections::BTreeSet::new();
        for p in groups.iter().flat_map(|g| &g.params) {
            if !seen.insert(p.name.clone()) {
                return Err(Error::Invalid(format!(
                    "parameter {} appears twice in the optimizer's groups",
                    p.name
                )));
            }
        }
        let defaults = AdamParams::default();
        let trait_hypers = StepHypers {
            lrs: vec![defaults.lr; groups.len()],
            mom: defaults.mom,
        };
        Ok(Self {
            groups,
            config,
            state: BTreeMap::new(),
            trait_hypers,
        })
    }

    pub fn groups(&self) -> &[OptGroup] {
        &self.groups
    }

    pub fn config(&self) -> &AdamConfig {
        &self.config
    }

    /// The moments of one parameter, if it has been stepped since the last clear.
    pub fn param_state(&self, name: &str) -> Option<&ParamState> {
        self.state.get(name)
    }

    /// One update of every parameter that has a gradient in `grads`.
    pub fn step(&mut self, grads: &GradStore, hypers: &StepHypers) -> Result<()> {
        if hypers.lrs.len() != self.groups.len() {
            return Err(Error::Invalid(format!(
                "{} learning rates given for {} parameter groups",
                hypers.lrs.len(),
                self.groups.len()
            )));
        }
        let AdamConfig { sqr_mom, eps, wd } = self.config;
        let mom = hypers.mom;
        for (group, &lr) in self.groups.iter().zip(&hypers.lrs) {
            for param in &group.params {
                let Some(grad) = grads.get(param.var.as_tensor()) else {
                    continue;
                };
                let ctx = || format!("Adam step of {}", param.name);
                // Detach so that the update does not extend the autograd graph.
                let grad = grad.detach();
                let mut value = param.var.as_tensor().detach();
                if !param.no_decay && wd != 0.0 {
                    value = value.affine(1.0 - lr * wd, 0.0).ctx(ctx)?;
                }
                let entry = match self.state.remove(&param.name) {
                    Some(s) => s,
                    None => ParamState {
                        grad_avg: value.zeros_like().ctx(ctx)?,
                        sqr_avg: value.zeros_like().ctx(ctx)?,
                        step: 0,
                    },
                };
                let grad_avg = (entry.grad_avg.affine(mom, 0.0).ctx(ctx)?
                    + grad.affine(1.0 - mom, 0.0).ctx(ctx)?)
                .ctx(ctx)?;
                let sqr_avg = (entry.sqr_avg.affine(sqr_mom, 0.0).ctx(ctx)?
                    + grad.sqr().ctx(ctx)?.affine(1.0 - sqr_mom, 0.0).ctx(ctx)?)
                .ctx(ctx)?;
                let step = entry.step + 1;
                let debias1 = 1.0 - mom.powi(step as i32);
                let debias2 = 1.0 - sqr_mom.powi(step as i32);
                let denom = sqr_avg
                    .affine(1.0 / debias2, 0.0)
                    .ctx(ctx)?
                    .sqrt()
                    .ctx(ctx)?
                    .affine(1.0, eps)
                    .ctx(ctx)?;
                let update = grad_avg
                    .div(&denom)
                    .ctx(ctx)?
                    .affine(lr / debias1, 0.0)
                    .ctx(ctx)?;
                param.var.set(&(value - update).ctx(ctx)?).ctx(ctx)?;
                self.state.insert(
                    param.name.clone(),
                    ParamState {
                        grad_avg,
                        sqr_avg,
                        step,
                    },
                );
            }
        }
        Ok(())
    }

    /// Forgets every moment and step count, as fastai does on freeze/unfreeze.
    pub fn clear_state(&mut self) {
        self.state.clear();
    }

    /// The state as named tensors plus step counts, for saving with a run.
    pub fn export_state(&self) -> AdamState {
        let mut out = AdamState::default();
        for (name, s) in &self.state {
            out.tensors
                .insert(format!("{name}.grad_avg"), s.grad_avg.clone());
            out.tensors
                .insert(format!("{name}.sqr_avg"), s.sqr_avg.clone());
            out.steps.insert(name.clone(), s.step);
        }
        out
    }

    /// Replaces the state with one saved by [`Adam::export_state`]; every
    /// entry must name a parameter of this optimizer with the same shape.
    pub fn import_state(&mut self, state: &AdamState) -> Result<()> {
        let mut new_state = BTreeMap::new();
        for (name, &step) in &state.steps {
            let param = self
                .groups
                .iter()
                .flat_map(|g| &g.params)
                .find(|p| &p.name == name)
                .ok_or_else(|| Error::StateMismatch {
                    name: name.clone(),
                    reason: "no parameter of that name".into(),
                })?;
            let get = |suffix: &str| -> Result<Tensor> {
                let key = format!("{name}.{suffix}");
                let t = state
                    .tensors
                    .get(&key)
                    .ok_or_else(|| Error::StateMismatch {
                        name: key.clone(),
                        reason: "tensor missing".into(),
                    })?;
                if t.dims() != param.var.dims() {
                    return Err(Error::StateMismatch {
                        name: key,
                        reason: format!(
                            "shape {:?}, parameter has {:?}",
                            t.dims(),
                            param.var.dims()
                        ),
                    });
                }
                t.to_device(param.var.device())
                    .and_then(|t| t.to_dtype(param.var.dtype()))
                    .ctx(|| format!("loading optimizer state {key}"))
            };
            let grad_avg = get("grad_avg")?;
            let sqr_avg = get("sqr_avg")?;
            new_state.insert(
                name.clone(),
                ParamState {
                    grad_avg,
                    sqr_avg,
                    step,
                },
            );
        }
        self.state = new_state;
        Ok(())
    }
}

impl candle_nn::Optimizer for Adam {
    type Config = AdamParams;

    /// One group named `all`; parameter `i` is named `param.{i}` in the
    /// state ([`Adam::export_state`]), so state saved from one process
    /// fits another only if `vars` come in the same order: `VarMap::all_vars`
    /// follows a hash map's order, so sort them (by name, from
    /// `VarMap::data`) before saving or restoring state.
    fn new(vars: Vec<Var>, config: AdamParams) -> candle_core::Result<Self> {
        let params = vars
            .into_iter()
            .enumerate()
            .map(|(i, var)| OptParam {
                name: format!("param.{i}"),
                no_decay: var.rank() <= 1,
                var,
            })
            .collect();
        let group = OptGroup {
            name: "all".into(),
            params,
        };
        let mut adam = Adam::new(vec![group], config.adam).map_err(candle_core::Error::wrap)?;
        adam.trait_hypers = StepHypers {
            lrs: vec![config.lr],
            mom: config.mom,
        };
        Ok(adam)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        let hypers = self.trait_hypers.clone();
        Adam::step(self, grads, &hypers).map_err(candle_core::Error::wrap)
    }

    fn learning_rate(&self) -> f64 {
        self.trait_hypers.lrs.first().copied().unwrap_or(0.0)
    }

    /// Sets the learning rate of every group.
    fn set_learning_rate(&mut self, lr: f64) {
        self.trait_hypers.lrs = vec![lr; self.groups.len()];
    }
}
