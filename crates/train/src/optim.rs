//! fastai's Adam: parameter groups, scheduled β1, decoupled weight decay.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::adam_fused;
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
        let mut fused = Vec::new();
        for (group, &lr) in self.groups.iter().zip(&hypers.lrs) {
            for param in &group.params {
                let Some(grad) = grads.get(param.var.as_tensor()) else {
                    continue;
                };
                let ctx = || format!("Adam step of {}", param.name);
                let entry = match self.state.remove(&param.name) {
                    Some(s) => s,
                    None => ParamState {
                        grad_avg: param.var.as_tensor().zeros_like().ctx(ctx)?,
                        sqr_avg: param.var.as_tensor().zeros_like().ctx(ctx)?,
                        step: 0,
                    },
                };
                let decay = !param.no_decay && wd != 0.0;
                let hypers = UpdateHypers {
                    lr,
                    mom,
                    sqr_mom,
                    eps,
                    decay: decay.then_some(1.0 - lr * wd),
                    step: entry.step + 1,
                };
                // One interface, two implementations: in place on f32
                // memory (CPU, or CUDA with the `cuda` feature; all such
                // parameters together below), or candle ops on any device
                // and dtype.
                if adam_fused::supported(&[
                    param.var.as_tensor(),
                    grad,
                    &entry.grad_avg,
                    &entry.sqr_avg,
                ]) {
                    fused.push(Fused {
                        name: param.name.clone(),
                        param: param.var.as_tensor().clone(),
                        grad: grad.clone(),
                        state: entry,
                        hypers: hypers.rounded(),
                        step: hypers.step,
                    });
                    continue;
                }
                let (grad_avg, sqr_avg) =
                    update_composite(&param.var, grad, &entry, &hypers).ctx(ctx)?;
                let step = hypers.step;
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
        let items: Vec<adam_fused::Item<'_>> = fused
            .iter()
            .map(|f| adam_fused::Item {
                param: &f.param,
                grad_avg: &f.state.grad_avg,
                sqr_avg: &f.state.sqr_avg,
                grad: &f.grad,
                h: f.hypers,
            })
            .collect();
        let updated = adam_fused::update_many(&items);
        drop(items);
        let ok = updated.is_ok();
        for f in fused {
            let step = if ok { f.step } else { f.state.step };
            self.state.insert(f.name, ParamState { step, ..f.state });
        }
        updated.ctx(|| "Adam step (fused)".to_string())
    }

    /// Forgets every moment and step count, as fastai does on freeze/unfreeze.
    pub fn clear_state(&mut self) {
        self.state.clear();
    }

    /// The state as named tensors plus step counts, for saving with a run.
    /// The tensors are copies: the CPU update changes the moments in place,
    /// and an exported state (a snapshot to restore later) must not follow.
    pub fn export_state(&self) -> AdamState {
        let mut out = AdamState::default();
        for (name, s) in &self.state {
            let copy = |t: &Tensor| t.copy().unwrap_or_else(|_| t.clone());
            out.tensors
                .insert(format!("{name}.grad_avg"), copy(&s.grad_avg));
            out.tensors
                .insert(format!("{name}.sqr_avg"), copy(&s.sqr_avg));
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
                // A copy of its own: the CPU update writes the moments in place.
                t.to_device(param.var.device())
                    .and_then(|t| t.to_dtype(param.var.dtype()))
                    .and_then(|t| t.copy())
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

/// The scalars of one parameter's update.
struct UpdateHypers {
    lr: f64,
    mom: f64,
    sqr_mom: f64,
    eps: f64,
    /// `1 − lr·wd` when weight decay applies.
    decay: Option<f64>,
    /// The step being taken (1 for the first).
    step: u64,
}

impl UpdateHypers {
    fn debias1(&self) -> f64 {
        1.0 - self.mom.powi(self.step as i32)
    }

    fn debias2(&self) -> f64 {
        1.0 - self.sqr_mom.powi(self.step as i32)
    }

    /// The constants as candle's `affine` rounds them to `f32`.
    fn rounded(&self) -> adam_fused::Hypers {
        adam_fused::Hypers {
            decay: self.decay.map(|d| d as f32),
            mom: self.mom as f32,
            one_minus_mom: (1.0 - self.mom) as f32,
            sqr_mom: self.sqr_mom as f32,
            one_minus_sqr_mom: (1.0 - self.sqr_mom) as f32,
            inv_debias2: (1.0 / self.debias2()) as f32,
            eps: self.eps as f32,
            step_size: (self.lr / self.debias1()) as f32,
        }
    }
}

/// A parameter waiting for the fused update, with its moments.
struct Fused {
    name: String,
    param: Tensor,
    grad: Tensor,
    state: ParamState,
    hypers: adam_fused::Hypers,
    step: u64,
}

/// One update with candle ops (any device, any float dtype): returns the
/// new moments and sets the parameter.
fn update_composite(
    var: &Var,
    grad: &Tensor,
    state: &ParamState,
    h: &UpdateHypers,
) -> candle_core::Result<(Tensor, Tensor)> {
    // Detach so that the update does not extend the autograd graph.
    let grad = grad.detach();
    let mut value = var.as_tensor().detach();
    if let Some(decay) = h.decay {
        value = value.affine(decay, 0.0)?;
    }
    let grad_avg = (state.grad_avg.affine(h.mom, 0.0)? + grad.affine(1.0 - h.mom, 0.0)?)?;
    let sqr_avg =
        (state.sqr_avg.affine(h.sqr_mom, 0.0)? + grad.sqr()?.affine(1.0 - h.sqr_mom, 0.0)?)?;
    let denom = sqr_avg
        .affine(1.0 / h.debias2(), 0.0)?
        .sqrt()?
        .affine(1.0, h.eps)?;
    let update = grad_avg.div(&denom)?.affine(h.lr / h.debias1(), 0.0)?;
    var.set(&(value - update)?)?;
    Ok((grad_avg, sqr_avg))
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::{ParamState, UpdateHypers, adam_fused, update_composite};

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    }

    /// The in-place CPU update and the candle-op update give the same bits,
    /// step after step, with and without weight decay, over sizes that do
    /// and do not fill the parallel chunks.
    #[test]
    fn fused_cpu_update_equals_the_composite_one_to_the_bit() {
        let dev = Device::Cpu;
        for (n, decay) in [
            (7, None),
            (100_003, Some(1.0 - 3e-3 * 0.01)),
            (65_536, Some(0.97)),
        ] {
            let init = values(n, 1, 2.0);
            let fused = Var::from_vec(init.clone(), n, &dev).unwrap();
            let composite = Var::from_vec(init, n, &dev).unwrap();
            let zeros = || Tensor::zeros(n, candle_core::DType::F32, &dev).unwrap();
            let (ga, sa) = (zeros(), zeros());
            let mut state = ParamState {
                grad_avg: zeros(),
                sqr_avg: zeros(),
                step: 0,
            };
            for step in 1..=5u64 {
                let grad = Tensor::from_vec(values(n, step + 10, 0.1), n, &dev).unwrap();
                let h = UpdateHypers {
                    lr: 1e-3 * step as f64,
                    mom: 0.95 - 0.02 * step as f64,
                    sqr_mom: 0.99,
                    eps: 1e-5,
                    decay,
                    step,
                };
                adam_fused::update(fused.as_tensor(), &ga, &sa, &grad, h.rounded()).unwrap();
                let (g, s) = update_composite(&composite, &grad, &state, &h).unwrap();
                state = ParamState {
                    grad_avg: g,
                    sqr_avg: s,
                    step,
                };
                assert_eq!(
                    bits(&ga),
                    bits(&state.grad_avg),
                    "grad_avg, n {n}, step {step}"
                );
                assert_eq!(
                    bits(&sa),
                    bits(&state.sqr_avg),
                    "sqr_avg, n {n}, step {step}"
                );
                assert_eq!(
                    bits(fused.as_tensor()),
                    bits(composite.as_tensor()),
                    "parameter, n {n}, step {step}"
                );
            }
        }
    }
}
