//! A convolution and the train-mode BatchNorm (and ReLU) after it as one
//! graph node.
//!
//! As two nodes, candle's backward hands the BatchNorm's input gradient to
//! the convolution through its gradient store: it allocates a zeroed tensor
//! of the conv output's size, adds the gradient into it (a new tensor
//! again), and only then runs the convolution's backward. A ResNet-50 has 53
//! such pairs, so at batch 64 that was gigabytes of memory traffic per step
//! for nothing. As one node the BatchNorm's input gradient goes straight
//! into the convolution's input and kernel gradients.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::conv::{Geometry, data, forward, input_grad, kernel_grad, supported, with_data};
use super::norm::{BatchNormGrad, Stats, add_relu, batch_norm_train, bn_train_forward};

/// What the forward pass keeps for the backward pass and the caller.
struct Saved {
    /// The convolution's output: the BatchNorm's input.
    conv: Vec<f32>,
    stats: Stats,
}

/// `x.apply_op3(kernel, cat([weight, bias]), ConvBnTrain { .. })`.
struct ConvBnTrain {
    padding: usize,
    stride: usize,
    eps: f64,
    relu: bool,
    saved: Arc<Mutex<Option<Saved>>>,
}

impl ConvBnTrain {
    fn geometry(&self, x: &Layout, kernel: &Layout) -> Result<Geometry> {
        Geometry::new(
            x.shape().dims4()?,
            kernel.shape().dims4()?,
            self.padding,
            self.stride,
        )
    }
}

impl CustomOp3 for ConvBnTrain {
    fn name(&self) -> &'static str {
        "cpu-conv2d-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(xl, kl)?;
        let (n, o, oh, ow) = g.out_dims();
        let params = data(ps, pl, "batch-norm weight and bias")?;
        if params.len() != 2 * o {
            candle_core::bail!(
                "cpu conv-batch-norm: {o} channels but {} weight and bias values (expected {})",
                params.len(),
                2 * o
            )
        }
        if n * oh * ow < 2 {
            candle_core::bail!(
                "cpu conv-batch-norm: train mode needs more than one value per channel, got {:?}; use a larger batch",
                g.out_dims()
            )
        }
        let conv = forward(&g, data(xs, xl, "input")?, data(ks, kl, "kernel")?, None);
        let (y, stats) = bn_train_forward(
            &conv,
            (n, o, oh * ow),
            &params[..o],
            &params[o..],
            self.eps,
            self.relu,
            None,
        );
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved { conv, stats });
        Ok((CpuStorage::F32(y), Shape::from(g.out_dims())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        params: &Tensor,
        // The output is not needed: the ReLU's mask comes from the conv
        // output saved by the forward pass.
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (need_x, need_k, need_p) = (x.track_op(), kernel.track_op(), params.track_op());
        if !need_x && !need_k && !need_p {
            return Ok((None, None, None));
        }
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(saved) = saved.as_ref() else {
            candle_core::bail!("cpu conv-batch-norm: backward before forward")
        };
        let (x, kernel) = (x.detach().contiguous()?, kernel.detach().contiguous()?);
        let g = self.geometry(x.layout(), kernel.layout())?;
        let (n, o, oh, ow) = g.out_dims();
        let weight: Vec<f32> = params.detach().narrow(0, 0, o)?.to_vec1()?;
        let bn = BatchNormGrad {
            mean: saved.stats.mean.clone(),
            inv_std: saved.stats.inv_std.clone(),
            weight,
            relu: self.relu,
            // The ReLU's mask from the conv output and the forward's affine
            // map: `y` is not read.
            relu_from_input: self
                .relu
                .then(|| (saved.stats.scale.clone(), saved.stats.shift.clone())),
            // The conv output's gradient feeds both conv gradients.
            need_x: need_x || need_k,
        };
        let grad = grad.detach().contiguous()?;
        let flat = with_data(&grad, "output gradient", |g| {
            Ok(bn.run(&saved.conv, &saved.conv, g, (n, o, oh * ow)))
        })?;
        let device = x.device();
        let dparams = need_p
            .then(|| Tensor::from_slice(&flat[..2 * o], 2 * o, device))
            .transpose()?;
        let dconv = &flat[2 * o..];
        let dx = if need_x {
            let dx = with_data(&kernel, "kernel", |k| Ok(input_grad(&g, dconv, k)))?;
            Some(Tensor::from_vec(dx, x.shape(), device)?)
        } else {
            None
        };
        let dk = if need_k {
            let dk = with_data(&x, "input", |x| Ok(kernel_grad(&g, x, dconv)))?;
            Some(Tensor::from_vec(dk, kernel.shape(), device)?)
        } else {
            None
        };
        Ok((dx, dk, dparams))
    }
}

/// Train mode `relu?(batch_norm(conv2d(x, kernel)))` as one graph node.
///
/// The convolution is [`conv2d`](super::conv2d)'s (square `padding` and
/// `stride`, one group), the BatchNorm [`batch_norm_train`]'s with the
/// batch's statistics. Returns `(y, mean, var)` as `batch_norm_train` does.
/// Backward computes the input gradient only if `x` tracks gradients, the
/// kernel gradient only if `kernel` does (a frozen kernel is passed
/// detached), and the weight and bias gradients if either tracks them.
/// Elsewhere than the CPU in `f32` it is the two ops.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_batch_norm_train(
    x: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    if ![x, kernel, weight, bias].into_iter().all(supported) {
        let conv = crate::conv::conv2d(x, kernel, padding, stride)?;
        return batch_norm_train(&conv, weight, bias, eps, relu);
    }
    let saved = Arc::new(Mutex::new(None));
    let op = ConvBnTrain {
        padding,
        stride,
        eps,
        relu,
        saved: saved.clone(),
    };
    let params = Tensor::cat(&[weight, bias], 0)?;
    let y = x
        .contiguous()?
        .apply_op3(&kernel.contiguous()?, &params, op)?;
    let (mean, var) = batch_stats(&saved, x.device())?;
    Ok((y, mean, var))
}

/// The batch mean and biased variance `[C]` a forward pass left in `saved`.
fn batch_stats(
    saved: &Mutex<Option<Saved>>,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let guard = saved.lock().unwrap_or_else(|e| e.into_inner());
    let Some(saved) = guard.as_ref() else {
        candle_core::bail!("cpu conv-batch-norm: the forward pass left no statistics")
    };
    let c = saved.stats.mean.len();
    Ok((
        Tensor::from_slice(&saved.stats.mean, c, device)?,
        Tensor::from_slice(&saved.stats.var, c, device)?,
    ))
}

/// The last conv of a residual block with its BatchNorm, the residual add
/// and the ReLU: `x.apply_op3(cat([kernel, weight, bias]), residual, ..)`.
/// A trainable kernel travels with the BatchNorm parameters because a node
/// has at most three operands (that copy is small next to the activations);
/// a frozen one is no operand at all and the op holds it.
struct ConvBnAddReluTrain {
    padding: usize,
    stride: usize,
    eps: f64,
    kernel_dims: (usize, usize, usize, usize),
    /// The kernel when it is frozen (detached): not in the graph.
    frozen_kernel: Option<Tensor>,
    saved: Arc<Mutex<Option<Saved>>>,
}

impl ConvBnAddReluTrain {
    /// Kernel values at the start of the packed operand: all or none.
    fn kernel_len(&self) -> usize {
        let (o, c, kh, kw) = self.kernel_dims;
        if self.frozen_kernel.is_some() {
            0
        } else {
            o * c * kh * kw
        }
    }

    /// Runs `f` on the kernel: the op's own, or the head of `packed`.
    fn with_kernel<R>(&self, packed: &[f32], f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        match &self.frozen_kernel {
            Some(k) => with_data(k, "kernel", f),
            None => f(&packed[..self.kernel_len()]),
        }
    }
}

impl CustomOp3 for ConvBnAddReluTrain {
    fn name(&self) -> &'static str {
        "cpu-conv2d-batch-norm-add-relu-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(
            xl.shape().dims4()?,
            self.kernel_dims,
            self.padding,
            self.stride,
        )?;
        let (n, o, oh, ow) = g.out_dims();
        let kn = self.kernel_len();
        let packed = data(ps, pl, "kernel, batch-norm weight and bias")?;
        if packed.len() != kn + 2 * o {
            candle_core::bail!(
                "cpu conv-batch-norm-add-relu: expected {} kernel, weight and bias values, got {}",
                kn + 2 * o,
                packed.len()
            )
        }
        if rl.shape().dims() != [n, o, oh, ow] {
            candle_core::bail!(
                "cpu conv-batch-norm-add-relu: residual {:?} does not match the output {:?}",
                rl.shape().dims(),
                g.out_dims()
            )
        }
        if n * oh * ow < 2 {
            candle_core::bail!(
                "cpu conv-batch-norm-add-relu: train mode needs more than one value per channel, got {:?}; use a larger batch",
                g.out_dims()
            )
        }
        let x = data(xs, xl, "input")?;
        let conv = self.with_kernel(packed, |k| Ok(forward(&g, x, k, None)))?;
        let (y, stats) = bn_train_forward(
            &conv,
            (n, o, oh * ow),
            &packed[kn..kn + o],
            &packed[kn + o..],
            self.eps,
            true,
            Some(data(rs, rl, "residual")?),
        );
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved { conv, stats });
        Ok((CpuStorage::F32(y), Shape::from(g.out_dims())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        residual: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (need_x, need_p, need_r) = (x.track_op(), packed.track_op(), residual.track_op());
        if !need_x && !need_p && !need_r {
            return Ok((None, None, None));
        }
        let need_k = need_p && self.frozen_kernel.is_none();
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(saved) = saved.as_ref() else {
            candle_core::bail!("cpu conv-batch-norm-add-relu: backward before forward")
        };
        let x = x.detach().contiguous()?;
        let g = Geometry::new(x.dims4()?, self.kernel_dims, self.padding, self.stride)?;
        let (n, o, oh, ow) = g.out_dims();
        let kn = self.kernel_len();
        let packed = packed.detach().contiguous()?;
        let weight: Vec<f32> = packed.narrow(0, kn, o)?.to_vec1()?;
        // The ReLU after the add masks the gradient of both branches; with
        // `y` the block's output, BatchNormGrad's ReLU mask is that mask.
        let bn = BatchNormGrad {
            mean: saved.stats.mean.clone(),
            inv_std: saved.stats.inv_std.clone(),
            weight,
            relu: true,
            relu_from_input: None,
            need_x: need_x || need_k,
        };
        let grad = grad.detach().contiguous()?;
        let y = y.detach();
        let device = x.device();
        // The residual's gradient (the ReLU's mask on `grad`) comes out of
        // the BatchNorm's backward pass, which computes it anyway.
        let (flat, dres) = with_data(&y, "output", |y| {
            with_data(&grad, "output gradient", |gr| {
                Ok(bn.run_with_mask(&saved.conv, y, gr, (n, o, oh * ow), need_r))
            })
        })?;
        let dres = dres
            .map(|d| Tensor::from_vec(d, residual.shape(), device))
            .transpose()?;
        let dconv = &flat[2 * o..];
        let dx = if need_x {
            let dx = with_data(&packed, "kernel", |p| {
                self.with_kernel(p, |k| Ok(input_grad(&g, dconv, k)))
            })?;
            Some(Tensor::from_vec(dx, x.shape(), device)?)
        } else {
            None
        };
        let dpacked = if need_p {
            let mut d = if need_k {
                with_data(&x, "input", |xv| Ok(kernel_grad(&g, xv, dconv)))?
            } else {
                Vec::with_capacity(2 * o)
            };
            d.extend_from_slice(&flat[..2 * o]);
            Some(Tensor::from_vec(d, kn + 2 * o, device)?)
        } else {
            None
        };
        Ok((dx, dpacked, dres))
    }
}

/// Train mode `relu(batch_norm(conv2d(x, kernel)) + residual)`, the end of
/// a residual block, as one graph node: [`conv2d_batch_norm_train`] without
/// ReLU followed by [`add_relu`](super::add_relu), without the two gradient
/// hand-overs between them. Returns `(y, mean, var)`.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_batch_norm_add_relu_train(
    x: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    residual: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    if ![x, kernel, weight, bias, residual]
        .into_iter()
        .all(supported)
    {
        let (y, mean, var) =
            conv2d_batch_norm_train(x, kernel, padding, stride, weight, bias, eps, false)?;
        return Ok((add_relu(&y, residual)?, mean, var));
    }
    let saved = Arc::new(Mutex::new(None));
    let frozen = !kernel.track_op();
    let packed = if frozen {
        Tensor::cat(&[weight, bias], 0)?
    } else {
        Tensor::cat(&[&kernel.flatten_all()?, weight, bias], 0)?
    };
    let op = ConvBnAddReluTrain {
        padding,
        stride,
        eps,
        kernel_dims: kernel.dims4()?,
        frozen_kernel: frozen.then(|| kernel.contiguous()).transpose()?,
        saved: saved.clone(),
    };
    let y = x
        .contiguous()?
        .apply_op3(&packed, &residual.contiguous()?, op)?;
    let (mean, var) = batch_stats(&saved, x.device())?;
    Ok((y, mean, var))
}
