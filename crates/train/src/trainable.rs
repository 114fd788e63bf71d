//! What a model implements to be trained by the [`Learner`](crate::Learner):
//! a forward pass to logits, its parameters in ordered groups (the last one
//! the head) and the variables that are state but not parameters.

use candle_core::{Tensor, Var};
use candle_nn::VarMap;

/// What a parameter is, for the two fastai rules that depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// A weight: weight decay applies, and it stops training when its group is frozen.
    Weight,
    /// A bias outside a normalisation layer: no weight decay (fastai's
    /// `wd_bn_bias=False`), frozen with its group.
    Bias,
    /// A weight or bias of a normalisation layer (BatchNorm, LayerNorm…):
    /// no weight decay, and it keeps training when its group is frozen
    /// (fastai's `train_bn=True`).
    Norm,
}

impl ParamKind {
    /// Whether fastai's Adam skips weight decay for it.
    pub fn no_decay(self) -> bool {
        self != ParamKind::Weight
    }
}

/// One trainable variable of a model.
#[derive(Clone, Debug)]
pub struct Param {
    /// Its name in the model's `VarMap` (it keys the optimizer state in checkpoints).
    pub name: String,
    pub var: Var,
    pub kind: ParamKind,
}

/// Parameters that share one learning rate (one of fastai's splitter groups).
#[derive(Clone, Debug)]
pub struct ParamGroup {
    pub name: String,
    pub params: Vec<Param>,
}

impl ParamGroup {
    /// Every variable of `varmap` whose name starts with `prefix`, in name
    /// order, that `kind` calls a parameter; a name `kind` maps to `None`
    /// (running statistics, say) is left out.
    pub fn from_varmap(
        name: impl Into<String>,
        varmap: &VarMap,
        prefix: &str,
        kind: impl Fn(&str) -> Option<ParamKind>,
    ) -> Self {
        let params = vars_under(varmap, prefix)
            .into_iter()
            .filter_map(|(name, var)| {
                kind(&name).map(|kind| Param {
                    name: name.clone(),
                    var,
                    kind,
                })
            })
            .collect();
        Self {
            name: name.into(),
            params,
        }
    }
}

/// The variables of `varmap` whose names start with `prefix`, in name order.
pub fn vars_under(varmap: &VarMap, prefix: &str) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
    let mut vars: Vec<(String, Var)> = data
        .iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .map(|(name, var)| (name.clone(), var.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// A model the [`Learner`](crate::Learner) can train with fastai's recipe.
///
/// The Learner owns the freezing: with `n` groups frozen, every parameter
/// of the first `n` groups stops training except the [`ParamKind::Norm`]
/// ones, and [`Trainable::freeze_to`] tells the model so it can skip work.
/// All variables (parameters and [`Trainable::buffers`]) must live in the
/// `VarMap` given to the Learner, which saves and restores them.
pub trait Trainable {
    /// Logits `[batch, n_classes]`. `train` selects training behaviour
    /// (batch statistics that update the running ones, active dropout).
    fn forward_t(&self, images: &Tensor, train: bool) -> candle_core::Result<Tensor>;

    /// Logits in eval mode for prediction. The default is
    /// `forward_t(images, false)`; a model may override it with a faster
    /// path that gives the same values.
    fn forward_infer(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.forward_t(images, false)?.detach())
    }

    /// The parameters in ordered groups, the head last (fastai's splitter:
    /// 2 or 3 groups usually, one learning rate each). Called when the
    /// Learner is built; the same variables every call.
    fn param_groups(&self) -> Vec<ParamGroup>;

    /// Variables that are state but not parameters, such as BatchNorm
    /// running statistics: saved and restored with the model, never trained.
    fn buffers(&self) -> Vec<Var> {
        Vec::new()
    }

    /// Told when the first `n` groups freeze (0: none). Only a hint: the
    /// Learner already withholds their updates; a model can use it to skip
    /// gradient work for frozen weights.
    fn freeze_to(&mut self, _n: usize) {}

    /// Restarts the model's dropout masks from `seed`; the Learner calls it
    /// before every training step with a seed that depends only on the run
    /// seed and the step, so that a resumed run draws the same masks.
    fn set_dropout_seed(&self, _seed: u64) {}
}

impl<T: Trainable + ?Sized> Trainable for Box<T> {
    fn forward_t(&self, images: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        (**self).forward_t(images, train)
    }
    fn forward_infer(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        (**self).forward_infer(images)
    }
    fn param_groups(&self) -> Vec<ParamGroup> {
        (**self).param_groups()
    }
    fn buffers(&self) -> Vec<Var> {
        (**self).buffers()
    }
    fn freeze_to(&mut self, n: usize) {
        (**self).freeze_to(n)
    }
    fn set_dropout_seed(&self, seed: u64) {
        (**self).set_dropout_seed(seed)
    }
}

/// Whether a parameter of `kind` in group `group` trains with the first
/// `frozen` groups frozen (fastai's freezing with `train_bn=True`).
pub fn trains(kind: ParamKind, group: usize, frozen: usize) -> bool {
    group >= frozen || kind == ParamKind::Norm
}
