//! The training ops of the network, each with two implementations side by
//! side: the CPU kernels of [`crate::cpu`] and a generic one built from
//! candle tensor ops that every backend implements (CPU, CUDA, Metal).
//!
//! [`Ops`] picks one per call: the CPU kernels for `f32` tensors on the CPU
//! unless the model config asks for [`Kernels::Generic`], the generic ops
//! otherwise. The generic path computes in the tensors' own dtype (never
//! `f64`, which Metal lacks), and is what runs on a GPU until device kernels
//! land. Forcing it on the CPU is how the tests check, on a machine without a
//! GPU, that the GPU path computes what the CPU kernels compute.

use std::sync::Mutex;

use candle_core::{DType, Result, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{cpu, generic};

/// Whether `x` holds half-precision activations and `param` is `f32`: the
/// mixed-precision body, whose per-channel arithmetic runs in `f32`.
fn is_half_over_f32(x: &Tensor, param: &Tensor) -> bool {
    matches!(x.dtype(), DType::BF16 | DType::F16) && param.dtype() == DType::F32
}

/// Which implementation runs the model's ops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// The fastest available: the CPU kernels for `f32` on the CPU; on CUDA
    /// (with the `cuda` feature) the fused BatchNorm and max-pool kernels for
    /// `f32` and, with the `cudnn` feature, cuDNN's convolutions for `f32`,
    /// `bf16` and `f16`; the generic ops for the rest.
    #[default]
    Auto,
    /// The generic candle ops everywhere, also on the CPU (what CUDA and
    /// Metal run): slower there, but the same maths.
    Generic,
}

impl Kernels {
    pub fn is_auto(&self) -> bool {
        *self == Kernels::Auto
    }
}

/// The network's ops, dispatched to the CPU kernels or the generic ops.
///
/// Every op takes and returns ordinary tensors, tracks gradients only for
/// the operands that track them (a frozen kernel passed detached gets no
/// kernel gradient, the input image none), and returns the same values on
/// either path up to the summation order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ops {
    kernels: Kernels,
    tf32: bool,
    half: Option<DType>,
}

impl Ops {
    /// `kernels`, with `f32` convolutions in exact `f32`.
    pub fn new(kernels: Kernels) -> Self {
        Self {
            kernels,
            tf32: false,
            half: None,
        }
    }

    /// The same, the body computing in the half dtype `half` (`bf16` or
    /// `f16`; `None`: the parameters' dtype): see
    /// [`Precision`](crate::Precision).
    pub fn with_half(self, half: Option<DType>) -> Self {
        Self { half, ..self }
    }

    pub fn half(&self) -> Option<DType> {
        self.half
    }

    /// `x` in the dtype the body computes in: the half dtype if one is set.
    pub fn to_compute(&self, x: &Tensor) -> Result<Tensor> {
        match self.half {
            Some(half) if x.dtype() != half => x.to_dtype(half),
            _ => Ok(x.clone()),
        }
    }

    /// The body's output back in `f32` for the head, if the body computed
    /// in a half dtype.
    pub fn to_master(&self, x: &Tensor) -> Result<Tensor> {
        match self.half {
            Some(half) if x.dtype() == half => x.to_dtype(DType::F32),
            _ => Ok(x.clone()),
        }
    }

    /// The same, letting cuDNN run `f32` convolutions in TF32 (see
    /// [`ResNetConfig::tf32`](crate::ResNetConfig::tf32)).
    pub fn with_tf32(self, tf32: bool) -> Self {
        Self { tf32, ..self }
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    pub fn tf32(&self) -> bool {
        self.tf32
    }

    /// Whether the CPU kernels take these operands.
    fn cpu(&self, operands: &[&Tensor]) -> bool {
        self.kernels == Kernels::Auto && operands.iter().all(|t| cpu::supported(t))
    }

    /// Train-mode BatchNorm off the CPU: the fused CUDA kernels for `f32`
    /// on CUDA (with the `cuda` feature), the generic ops otherwise.
    fn batch_norm_device(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        eps: f64,
        relu: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if self.kernels == Kernels::Auto && crate::cuda::supported(&[x], &[weight, bias]) {
            return crate::cuda::batch_norm_train(x, weight, bias, eps, relu);
        }
        if is_half_over_f32(x, weight) {
            // Half activations, f32 parameters: the statistics in f32 (the
            // activations widened for them), the output in the activations'
            // dtype; the casts carry the gradients. (An f64 network keeps
            // its f32 BatchNorm parameters and computes in f64.)
            let wide = x.to_dtype(weight.dtype())?;
            let (y, mean, var) = self.batch_norm_device(&wide, weight, bias, eps, relu)?;
            return Ok((y.to_dtype(x.dtype())?, mean, var));
        }
        generic::batch_norm_train(x, weight, bias, eps, relu)
    }

    /// `conv2d(x, kernel)` with square `padding` and `stride`, one group.
    pub fn conv2d(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        padding: usize,
        stride: usize,
    ) -> Result<Tensor> {
        // In a half-precision body: the f32 master kernel (and an input not
        // yet in the body's dtype) cast for the product; gradients flow back
        // through the casts.
        let (x, kernel) = (&self.to_compute(x)?, &self.to_compute(kernel)?);
        if self.cpu(&[x, kernel]) {
            return cpu::conv2d(x, kernel, padding, stride);
        }
        #[cfg(feature = "cudnn")]
        if self.kernels == Kernels::Auto && crate::cuda::cudnn::supported(&[x, kernel]) {
            let math = if self.tf32 {
                crate::cuda::cudnn::F32Math::Tf32
            } else {
                crate::cuda::cudnn::F32Math::Exact
            };
            return crate::cuda::cudnn::conv2d(x, kernel, padding, stride, math);
        }
        crate::conv::conv2d_generic(x, kernel, padding, stride)
    }

    /// Train-mode BatchNorm over `[N, C, ...]` (+ ReLU): `(y, mean, biased var)`.
    pub fn batch_norm_train(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        eps: f64,
        relu: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        if self.cpu(&[x, weight, bias]) {
            cpu::batch_norm_train(x, weight, bias, eps, relu)
        } else {
            self.batch_norm_device(x, weight, bias, eps, relu)
        }
    }

    /// Train mode `relu?(batch_norm(conv2d(x, kernel)))`: `(y, mean, biased var)`.
    #[allow(clippy::too_many_arguments)]
    pub fn conv2d_batch_norm_train(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        (padding, stride): (usize, usize),
        weight: &Tensor,
        bias: &Tensor,
        eps: f64,
        relu: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        if self.cpu(&[x, kernel, weight, bias]) {
            cpu::conv2d_batch_norm_train(x, kernel, padding, stride, weight, bias, eps, relu)
        } else {
            let conv = self.conv2d(x, kernel, padding, stride)?;
            self.batch_norm_device(&conv, weight, bias, eps, relu)
        }
    }

    /// Train mode `relu(batch_norm(conv2d(x, kernel)) + residual)`, the end of
    /// a residual block: `(y, mean, biased var)`.
    #[allow(clippy::too_many_arguments)]
    pub fn conv2d_batch_norm_add_relu_train(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        (padding, stride): (usize, usize),
        weight: &Tensor,
        bias: &Tensor,
        eps: f64,
        residual: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        if self.cpu(&[x, kernel, weight, bias, residual]) {
            cpu::conv2d_batch_norm_add_relu_train(
                x, kernel, padding, stride, weight, bias, eps, residual,
            )
        } else {
            #[cfg(feature = "cuda")]
            if self.kernels == Kernels::Auto
                && crate::cuda::supported(&[x, residual], &[weight, bias])
            {
                let conv = self.conv2d(x, kernel, padding, stride)?;
                return crate::cuda::batch_norm_add_relu_train(&conv, weight, bias, eps, residual);
            }
            let (y, mean, var) = self.conv2d_batch_norm_train(
                x,
                kernel,
                (padding, stride),
                weight,
                bias,
                eps,
                false,
            )?;
            Ok((generic::add_relu(&y, residual)?, mean, var))
        }
    }

    /// Train mode residual block, `relu(bn(conv(…relu(bn(conv(x)))…)) +
    /// r)` with `r` the input or the `downsample` layer's `bn(conv(x))`:
    /// the output and each BatchNorm's `(mean, biased var, values per
    /// channel)`, main path first (see [`cpu::residual_block_train`]). On
    /// the CPU one graph node; elsewhere one op per layer.
    pub fn residual_block_train(
        &self,
        x: &Tensor,
        layers: &[cpu::BlockLayer],
        downsample: Option<&cpu::BlockLayer>,
        eps: f64,
    ) -> Result<(Tensor, Vec<cpu::LayerStats>)> {
        let operands = layers
            .iter()
            .chain(downsample)
            .flat_map(|l| [l.kernel, l.weight, l.bias]);
        let operands: Vec<&Tensor> = std::iter::once(x).chain(operands).collect();
        if self.cpu(&operands) {
            return cpu::residual_block_train(x, layers, downsample, eps);
        }
        cpu::block_per_layer(x, layers, downsample, eps, &|x, l, eps, after| {
            let (conv, w, b) = ((l.padding, l.stride), l.weight, l.bias);
            match after {
                cpu::After::Relu(relu) => {
                    self.conv2d_batch_norm_train(x, l.kernel, conv, w, b, eps, relu)
                }
                cpu::After::AddRelu(r) => {
                    self.conv2d_batch_norm_add_relu_train(x, l.kernel, conv, w, b, eps, r)
                }
            }
        })
    }

    /// `relu?(x · scale[c] + shift[c])`: eval-mode BatchNorm.
    pub fn scale_shift(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        relu: bool,
    ) -> Result<Tensor> {
        if self.cpu(&[x, scale, shift]) {
            return cpu::scale_shift(x, scale, shift, relu);
        }
        if is_half_over_f32(x, scale) {
            // Half activations, f32 affine (eval BatchNorm in a bf16 body):
            // computed in f32 and rounded once, as in train mode.
            let y = generic::scale_shift(&x.to_dtype(scale.dtype())?, scale, shift, relu)?;
            return y.to_dtype(x.dtype());
        }
        let dtype = x.dtype();
        generic::scale_shift(x, &scale.to_dtype(dtype)?, &shift.to_dtype(dtype)?, relu)
    }

    /// BatchNorm's running statistic in place, as `torch.nn.BatchNorm2d`
    /// updates it: `running = running·(1 − momentum) + batch·factor·momentum`
    /// (`factor` 1 for the mean, `n/(n−1)` for the variance). One kernel on
    /// CUDA; candle ops elsewhere, the batch statistic scaled in its own
    /// dtype before it is cast to the statistic's `f32`.
    pub fn update_running(
        &self,
        running: &Var,
        batch: &Tensor,
        momentum: f64,
        factor: f64,
    ) -> Result<()> {
        let batch = batch.flatten_all()?;
        #[cfg(feature = "cuda")]
        if self.kernels == Kernels::Auto
            && batch.dtype() == DType::F32
            && crate::cuda::supported(&[&batch], &[running.as_tensor()])
        {
            return crate::cuda::blend_running(running.as_tensor(), &batch, momentum, factor);
        }
        let batch = if factor == 1.0 {
            batch.to_dtype(DType::F32)?
        } else {
            (batch * factor)?.to_dtype(DType::F32)?
        };
        let new = ((running.as_detached_tensor() * (1.0 - momentum))? + (batch * momentum)?)?;
        running.set(&new)
    }

    /// `relu(a + b)`: a residual connection.
    pub fn add_relu(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if self.cpu(&[a, b]) {
            cpu::add_relu(a, b)
        } else {
            generic::add_relu(a, b)
        }
    }

    /// The stem's 3×3, stride 2, padding 1 max-pool, with its backward.
    pub fn max_pool_3x3_s2(&self, x: &Tensor) -> Result<Tensor> {
        if self.cpu(&[x]) {
            return crate::max_pool::max_pool_3x3_s2(x);
        }
        #[cfg(feature = "cuda")]
        if self.kernels == Kernels::Auto && crate::cuda::supported(&[x], &[]) {
            return crate::cuda::max_pool_3x3_s2(x);
        }
        crate::max_pool::max_pool_composed(x)
    }

    /// fastai's concat pool: `[N, C, H, W]` → `[N, 2C]`, per-channel maxima
    /// then means (see [`crate::concat_pool`]).
    pub fn concat_pool(&self, x: &Tensor) -> Result<Tensor> {
        if self.cpu(&[x]) {
            return crate::concat_pool::concat_pool_op(x);
        }
        #[cfg(feature = "cuda")]
        if self.kernels == Kernels::Auto
            && x.dtype() == DType::F32
            && crate::cuda::supported(&[x], &[])
        {
            return crate::concat_pool::concat_pool_op(x);
        }
        crate::concat_pool::concat_pool_composed(x)
    }

    /// Inference: `relu?(conv2d(x, kernel) · scale + shift (+ residual))`
    /// with no gradient graph.
    #[allow(clippy::too_many_arguments)]
    pub fn conv2d_affine(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        (padding, stride): (usize, usize),
        scale: &Tensor,
        shift: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor> {
        if self.cpu(&[x, kernel]) {
            cpu::conv2d_affine(x, kernel, padding, stride, scale, shift, residual, relu)
        } else {
            // The device's convolution (cuDNN where it applies) on
            // detached operands, so no graph is built.
            let y = self.conv2d(&x.detach(), &kernel.detach(), padding, stride)?;
            if is_half_over_f32(&y, scale) {
                // As in `scale_shift`: the affine, residual and ReLU in
                // f32, rounded once.
                let wide = |t: &Tensor| t.to_dtype(scale.dtype());
                let residual = residual.map(wide).transpose()?;
                let out =
                    generic::affine_after_conv(&wide(&y)?, scale, shift, residual.as_ref(), relu)?;
                return out.to_dtype(y.dtype());
            }
            let dtype = y.dtype();
            let (scale, shift) = (scale.to_dtype(dtype)?, shift.to_dtype(dtype)?);
            generic::affine_after_conv(&y, &scale, &shift, residual, relu)
        }
    }

    /// Inverted dropout with probability `p`, its mask drawn from `rng`.
    ///
    /// On the CPU the mask is drawn on the host (it is the device); on a GPU
    /// the host only draws a seed from `rng` and the mask is drawn on the
    /// device, so nothing is uploaded per step. Either way the masks are a
    /// pure function of the state of `rng`.
    pub fn dropout(&self, x: &Tensor, p: f32, rng: &Mutex<ChaCha8Rng>) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let mut rng = rng.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if x.device().is_cpu() {
            let scale = 1.0 / (1.0 - p);
            let mask: Vec<f32> = (0..x.elem_count())
                .map(|_| if rng.random::<f32>() < p { 0.0 } else { scale })
                .collect();
            let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
            x.mul(&mask)
        } else {
            generic::dropout_on_device(x, p, rng.random::<u64>())
        }
    }
}
