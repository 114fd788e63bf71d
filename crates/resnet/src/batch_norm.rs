//! BatchNorm over `[N, C]` or `[N, C, H, W]` with PyTorch's train/eval semantics.
//!
//! The affine weight and bias and the running mean and variance are all
//! variables of the model's `VarMap`, so `VarMap::save` writes the running
//! statistics that training produced. Only the affine pair is a parameter
//! (it appears in a param group); the running statistics are buffers that
//! train mode overwrites: `new = (1 - momentum)·old + momentum·batch`, with
//! the unbiased batch variance, as `torch.nn.BatchNorm2d` does. All four stay
//! f32 whatever the dtype of the activations.

use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::error::{ResNetError, WithName};
use crate::init;

/// PyTorch's defaults.
const EPS: f64 = 1e-5;
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

    /// `forward_t`, then ReLU if `relu`: one fused pass on the CPU.
    pub(crate) fn forward_relu_t(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if crate::cpu::supported(x) && x.rank() == 4 {
            let channels = self.weight.dim(0)?;
            if train {
                let count = x.elem_count() / channels;
                if count < 2 {
                    candle_core::bail!(
                        "batch-norm {}: train mode needs more than one value per channel, got {:?}; use a larger batch",
                        self.name,
                        x.dims()
                    )
                }
                let (y, mean, var) = crate::cpu::batch_norm_train(
                    x,
                    self.weight.as_tensor(),
                    self.bias.as_tensor(),
                    EPS,
                    relu,
                )?;
                self.update_running(&mean, &var, count)?;
                return Ok(y);
            }
            let (scale, shift) = self.eval_affine()?;
            return crate::cpu::scale_shift(x, &scale, &shift, relu);
        }
        let y = self.forward_t(x, train)?;
        if relu { y.relu() } else { Ok(y) }
    }

    /// Train mode `relu?(self(conv2d(x, kernel)))`, or with a residual
    /// `relu(self(conv2d(x, kernel)) + residual)`, as one graph node on the
    /// CPU ([`crate::cpu::conv2d_batch_norm_train`],
    /// [`crate::cpu::conv2d_batch_norm_add_relu_train`]); updates the
    /// running statistics.
    pub(crate) fn conv_forward_train(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        (padding, stride): (usize, usize),
        relu: bool,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (w, b) = (self.weight.as_tensor(), self.bias.as_tensor());
        let (y, mean, var) = match residual {
            None => {
                crate::cpu::conv2d_batch_norm_train(x, kernel, padding, stride, w, b, EPS, relu)
            }
            Some(r) => crate::cpu::conv2d_batch_norm_add_relu_train(
                x, kernel, padding, stride, w, b, EPS, r,
            ),
        }
        .map_err(|e| e.context(format!("batch-norm {}", self.name)))?;
        let count = y.elem_count() / y.dim(1)?;
        self.update_running(&mean, &var, count)?;
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

    pub(crate) fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let dtype = x.dtype();
        // Batch statistics and their gradients are sums over up to millions
        // of terms that partly cancel; like PyTorch's CPU kernels (which
        // accumulate in double), compute them in f64 so the result does not
        // depend on the summation order.
        let compute = if train { DType::F64 } else { DType::F32 };
        let x = x.to_dtype(compute)?;
        let channels = self.weight.dim(0)?;
        let (reduce, bshape): (Vec<usize>, Vec<usize>) = match x.rank() {
            2 => (vec![0], vec![1, channels]),
            4 => (vec![0, 2, 3], vec![1, channels, 1, 1]),
            rank => candle_core::bail!("batch-norm {}: expects rank 2 or 4, got {rank}", self.name),
        };
        let weight = self
            .weight
            .as_tensor()
            .to_dtype(compute)?
            .reshape(bshape.as_slice())?;
        let bias = self
            .bias
            .as_tensor()
            .to_dtype(compute)?
            .reshape(bshape.as_slice())?;
        let y = if train {
            let count = x.elem_count() / channels;
            if count < 2 {
                candle_core::bail!(
                    "batch-norm {}: train mode needs more than one value per channel, got {:?}; use a larger batch",
                    self.name,
                    x.dims()
                )
            }
            let mean = x.mean_keepdim(reduce.as_slice())?;
            let centred = x.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean_keepdim(reduce.as_slice())?;
            let inv_std = (var.clone() + EPS)?.sqrt()?.recip()?;
            self.update_running(&mean.detach(), &var.detach(), count)?;
            centred
                .broadcast_mul(&inv_std)?
                .broadcast_mul(&weight)?
                .broadcast_add(&bias)?
        } else {
            // Buffers: no gradient flows into them.
            let running_mean = self
                .running_mean
                .as_detached_tensor()
                .reshape(bshape.as_slice())?;
            let running_var = self
                .running_var
                .as_detached_tensor()
                .reshape(bshape.as_slice())?;
            let scale = weight.broadcast_div(&(running_var + EPS)?.sqrt()?)?;
            x.broadcast_sub(&running_mean)?
                .broadcast_mul(&scale)?
                .broadcast_add(&bias)?
        };
        y.to_dtype(dtype)
    }

    fn update_running(&self, mean: &Tensor, biased_var: &Tensor, count: usize) -> Result<()> {
        let mean = mean.flatten_all()?.to_dtype(DType::F32)?;
        let unbiased = (biased_var.flatten_all()? * (count as f64 / (count - 1) as f64))?
            .to_dtype(DType::F32)?;
        let blend = |old: &Var, batch: &Tensor| -> Result<()> {
            let new = ((old.as_detached_tensor() * (1.0 - MOMENTUM))? + (batch * MOMENTUM)?)?;
            old.set(&new)
        };
        blend(&self.running_mean, &mean)?;
        blend(&self.running_var, &unbiased)
    }
}
