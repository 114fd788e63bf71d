//! BatchNorm over `[N, C]` or `[N, C, H, W]` with PyTorch's train/eval semantics.
//!
//! The affine weight and bias and the running mean and variance are all
//! variables of the model's `VarMap`, so `VarMap::save` writes the running
//! statistics that training produced. Only the affine pair is a parameter
//! (it appears in a param group); the running statistics are buffers that
//! train mode overwrites: `new = (1 - momentum)·old + momentum·batch`, with
//! the unbiased batch variance, as `torch.nn.BatchNorm2d` does. All four stay
//! f32 whatever the dtype of the activations. The arithmetic is an op of
//! [`Ops`]: the CPU kernels (sums in f64) or the generic ops (in the
//! activations' dtype, with blocked sums).

use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::error::{ResNetError, WithName};
use crate::init;
use crate::ops::Ops;

/// PyTorch's defaults.
pub(crate) const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

#[derive(Debug, Clone)]
pub(crate) struct BatchNorm {
    pub(crate) name: String,
    pub(crate) weight: Var,
    pub(crate) bias: Var,
    pub(crate) running_mean: Var,
    pub(crate) running_var: Var,
}

/// Builds a variable of `vb` (a `VarMap` one when training) and whether it is fresh.
pub(crate) fn get_var(
    vb: &VarBuilder,
    shape: &[usize],
    name: &str,
    dtype: DType,
) -> std::result::Result<(Var, bool), ResNetError> {
    let full = join(&vb.prefix(), name);
    let tensor = vb
        .get_with_hints_dtype(shape, name, Init::Const(0.), dtype)
        .with_name(&full)?;
    // A VarMap hands out the variable itself; any other backend (safetensors,
    // for inference) hands out a plain tensor, which keeps its loaded value.
    let fresh = tensor.is_variable();
    Ok((Var::from_tensor(&tensor).with_name(&full)?, fresh))
}

pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

impl BatchNorm {
    /// A BatchNorm of `channels` with affine weight `weight_init` and bias `bias_init`.
    pub(crate) fn new(
        vb: VarBuilder,
        channels: usize,
        weight_init: f64,
        bias_init: f64,
    ) -> std::result::Result<Self, ResNetError> {
        let name = vb.prefix();
        let mut vars = Vec::with_capacity(4);
        for (tensor, value) in [
            ("weight", weight_init),
            ("bias", bias_init),
            ("running_mean", 0.0),
            ("running_var", 1.0),
        ] {
            let (var, fresh) = get_var(&vb, &[channels], tensor, DType::F32)?;
            if fresh {
                init::fill_var(&var, value).with_name(&join(&name, tensor))?;
            }
            vars.push(var);
        }
        let mut vars = vars.into_iter();
        let mut next = || vars.next().expect("four batch-norm variables");
        Ok(Self {
            weight: next(),
            bias: next(),
            running_mean: next(),
            running_var: next(),
            name,
        })
    }

    /// `forward_t`, then ReLU if `relu`.
    pub(crate) fn forward_relu_t(
        &self,
        ops: &Ops,
        x: &Tensor,
        train: bool,
        relu: bool,
    ) -> Result<Tensor> {
        let (w, b) = (self.weight.as_tensor(), self.bias.as_tensor());
        if train {
            let count = self.train_count(x)?;
            let (y, mean, var) = ops
                .batch_norm_train(x, w, b, EPS, relu)
                .map_err(|e| e.context(format!("batch-norm {}", self.name)))?;
            self.update_running(ops, &mean, &var, count)?;
            return Ok(y);
        }
        let (scale, shift) = self.eval_affine()?;
        // `ops` brings them to `x`'s dtype (or computes in f32 for half
        // activations).
        ops.scale_shift(x, &scale, &shift, relu)
    }

    /// PyTorch's BatchNorm: batch statistics (and a running-statistics
    /// update) in train mode, running statistics in eval mode.
    pub(crate) fn forward_t(&self, ops: &Ops, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_relu_t(ops, x, train, false)
    }

    /// Values per channel in train mode; BatchNorm needs at least two.
    fn train_count(&self, x: &Tensor) -> Result<usize> {
        let rank = x.rank();
        if rank != 2 && rank != 4 {
            candle_core::bail!("batch-norm {}: expects rank 2 or 4, got {rank}", self.name)
        }
        let count = x.elem_count() / self.weight.dim(0)?;
        if count < 2 {
            candle_core::bail!(
                "batch-norm {}: train mode needs more than one value per channel, got {:?}; use a larger batch",
                self.name,
                x.dims()
            )
        }
        Ok(count)
    }

    /// Train mode `relu?(self(conv2d(x, kernel)))`, or with a residual
    /// `relu(self(conv2d(x, kernel)) + residual)`, as one op of `ops`;
    /// updates the running statistics.
    pub(crate) fn conv_forward_train(
        &self,
        ops: &Ops,
        x: &Tensor,
        kernel: &Tensor,
        conv: (usize, usize),
        relu: bool,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (w, b) = (self.weight.as_tensor(), self.bias.as_tensor());
        let (y, mean, var) = match residual {
            None => ops.conv2d_batch_norm_train(x, kernel, conv, w, b, EPS, relu),
            Some(r) => ops.conv2d_batch_norm_add_relu_train(x, kernel, conv, w, b, EPS, r),
        }
        .map_err(|e| e.context(format!("batch-norm {}", self.name)))?;
        let count = self.train_count(&y)?;
        self.update_running(ops, &mean, &var, count)?;
        Ok(y)
    }

    /// Eval mode as a per-channel affine `x · scale + shift` (`[C]` each):
    /// `scale = w / sqrt(running_var + eps)`, `shift = b - running_mean · scale`.
    pub(crate) fn eval_affine(&self) -> Result<(Tensor, Tensor)> {
        let inv_std = (self.running_var.as_detached_tensor() + EPS)?
            .sqrt()?
            .recip()?;
        let scale = (self.weight.as_tensor() * inv_std)?;
        let shift = (self.bias.as_tensor() - (self.running_mean.as_detached_tensor() * &scale)?)?;
        Ok((scale, shift))
    }

    /// Updates the running statistics from a train-mode batch's `mean`
    /// and biased variance over `count` values per channel.
    pub(crate) fn update_running(
        &self,
        ops: &Ops,
        mean: &Tensor,
        biased_var: &Tensor,
        count: usize,
    ) -> Result<()> {
        if count < 2 {
            candle_core::bail!(
                "batch-norm {}: train mode needs more than one value per channel, got {count}; use a larger batch",
                self.name
            )
        }
        let unbias = count as f64 / (count - 1) as f64;
        ops.update_running(&self.running_mean, mean, MOMENTUM, 1.0)?;
        ops.update_running(&self.running_var, biased_var, MOMENTUM, unbias)
    }
}
