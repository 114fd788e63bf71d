//! A 2-D convolution whose backward pass computes only the gradients that
//! something needs.
//!
//! candle's own `Conv2D` backward always computes both the input gradient and
//! the kernel gradient. With the body frozen (fastai's `freeze()`), the conv
//! kernels are detached but BatchNorm layers below them still train, so
//! candle would compute a kernel gradient per conv only to throw it away; and
//! for the stem it would compute a gradient for the input image. Here the
//! forward value comes from candle's conv on detached operands, and a custom
//! op carries the graph edge: its backward looks at which operands track
//! gradients and computes only those.

use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, Layout, MetalStorage, Result, Shape, Tensor,
};

use crate::generic::Precomputed;

/// `conv2d(x, kernel)` with square `padding` and `stride`, no dilation, one
/// group, through [`Ops`](crate::Ops)' default choice: the CPU kernels for
/// `f32` on the CPU, the generic op (candle's convolution with this module's
/// backward) elsewhere.
pub fn conv2d(x: &Tensor, kernel: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    crate::Ops::default().conv2d(x, kernel, padding, stride)
}

/// The generic convolution: candle's forward, this module's backward.
pub(crate) fn conv2d_generic(
    x: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let out = x.detach().conv2d(&kernel.detach(), padding, stride, 1, 1)?;
    if !x.track_op() && !kernel.track_op() {
        return Ok(out);
    }
    let op = ConvGrad {
        padding,
        stride,
        output: Precomputed::new(out)?,
    };
    x.apply_op2(kernel, op)
}

/// The graph node of [`conv2d_generic`]. Its forward hands over the output
/// candle's convolution already computed, which the op gives up in doing
/// so: the graph then holds only `x` and the kernel, never a second copy of
/// the output.
struct ConvGrad {
    padding: usize,
    stride: usize,
    output: Precomputed,
}

impl CustomOp2 for ConvGrad {
    fn name(&self) -> &'static str {
        "conv2d-needed-grads"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.output.metal()
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_x = if x.track_op() {
            Some(input_grad(
                grad,
                &kernel.detach(),
                x.dims4()?,
                self.padding,
                self.stride,
            )?)
        } else {
            None
        };
        let grad_kernel = if kernel.track_op() {
            Some(kernel_grad(
                &x.detach(),
                grad,
                kernel.dims4()?,
                self.padding,
                self.stride,
            )?)
        } else {
            None
        };
        Ok((grad_x, grad_kernel))
    }
}

/// Gradient with respect to the conv input of shape `x_dims`.
///
/// It is the correlation of the (zero-dilated, for stride > 1) output
/// gradient with the spatially flipped, channel-transposed kernel, so it runs
/// on candle's im2col conv rather than its much slower direct transposed conv.
pub(crate) fn input_grad(
    grad: &Tensor,
    kernel: &Tensor,
    x_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (_, _, height, width) = x_dims;
    let (c_out, c_in, k_h, k_w) = kernel.dims4()?;
    let (n, _, out_h, out_w) = grad.dims4()?;
    if k_h == 1 && k_w == 1 && padding == 0 && stride == 1 {
        // A 1×1 conv is a matmul over channels: dx[n] = Wᵀ · g[n].
        let kernel_t = kernel.reshape((c_out, c_in))?.t()?.contiguous()?;
        let grad = grad.reshape((n, c_out, out_h * out_w))?;
        return kernel_t
            .broadcast_left(n)?
            .matmul(&grad)?
            .reshape((n, c_in, height, width));
    }
    let flipped = flip_transpose_kernel(kernel)?;
    let grad = if stride > 1 {
        dilate(grad, stride)?
    } else {
        grad.clone()
    };
    // After dilation by inserting stride-1 zeros after every element, the
    // gradient is `out * stride` long; the full correlation needs `k-1-p`
    // zeros on the left and whatever makes the result `height` long on the right.
    let grad = pad_to(grad, 2, k_h - 1 - padding, height + k_h - 1)?;
    let grad = pad_to(grad, 3, k_w - 1 - padding, width + k_w - 1)?;
    grad.conv2d(&flipped, 0, 1, 1, 1)
}

/// Gradient with respect to the kernel of shape `k_dims`.
pub(crate) fn kernel_grad(
    x: &Tensor,
    grad: &Tensor,
    k_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (c_out, c_in, k_h, k_w) = k_dims;
    let (n, _, out_h, out_w) = grad.dims4()?;
    if k_h == 1 && k_w == 1 && padding == 0 && stride == 1 {
        // dW = Σₙ g[n] · x[n]ᵀ over pixels.
        let grad = grad.reshape((n, c_out, out_h * out_w))?;
        let x = x.reshape((n, c_in, out_h * out_w))?;
        return grad.matmul(&x.t()?)?.sum(0)?.reshape((c_out, c_in, 1, 1));
    }
    // Correlate the input (batch as channels) with the output gradient used
    // as a kernel dilated by the stride; the result may overhang the kernel
    // by up to stride-1 rows/columns, which are cut.
    // Both operands are made contiguous: candle's cuDNN path sends strided
    // operands to its naive kernel.
    let result = x
        .transpose(0, 1)?
        .contiguous()?
        .conv2d(&grad.transpose(0, 1)?.contiguous()?, padding, 1, stride, 1)?
        .transpose(0, 1)?;
    result.narrow(2, 0, k_h)?.narrow(3, 0, k_w)?.contiguous()
}

/// `[O, C, kh, kw]` → `[C, O, kh, kw]` reversed along both spatial axes.
fn flip_transpose_kernel(kernel: &Tensor) -> Result<Tensor> {
    let (_, _, k_h, k_w) = kernel.dims4()?;
    let device = kernel.device();
    let rev_h: Vec<u32> = (0..k_h as u32).rev().collect();
    let rev_w: Vec<u32> = (0..k_w as u32).rev().collect();
    kernel
        .transpose(0, 1)?
        .contiguous()?
        .index_select(&Tensor::new(rev_h.as_slice(), device)?, 2)?
        .contiguous()?
        .index_select(&Tensor::new(rev_w.as_slice(), device)?, 3)?
        .contiguous()
}

/// Inserts `stride - 1` zeros after every element along both spatial axes.
fn dilate(grad: &Tensor, stride: usize) -> Result<Tensor> {
    let (n, c, h, w) = grad.dims4()?;
    let grad = grad.reshape((n, c, h, 1, w, 1))?;
    let zeros_w = Tensor::zeros((n, c, h, 1, w, stride - 1), grad.dtype(), grad.device())?;
    let grad = Tensor::cat(&[&grad, &zeros_w], 5)?;
    let zeros_h = Tensor::zeros(
        (n, c, h, stride - 1, w, stride),
        grad.dtype(),
        grad.device(),
    )?;
    Tensor::cat(&[&grad, &zeros_h], 3)?.reshape((n, c, h * stride, w * stride))
}

/// Pads `left` zeros before `dim`, then pads or cuts after it to reach `total`.
fn pad_to(t: Tensor, dim: usize, left: usize, total: usize) -> Result<Tensor> {
    let t = t.pad_with_zeros(dim, left, 0)?;
    let len = t.dim(dim)?;
    if len < total {
        t.pad_with_zeros(dim, 0, total - len)
    } else {
        t.narrow(dim, 0, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{linear_loss_grads, max_abs_diff};
    use candle_core::{Device, Var};

    fn values(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut rng = crate::init::rng_for(seed, "conv-test");
        let v = crate::init::normal_values(&mut rng, n, 1.0);
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Our gradients equal candle's own Conv2D backward for every conv shape a ResNet uses.
    #[test]
    fn gradients_match_candle_conv_backward() {
        let cases = [
            // (c_in, c_out, k, stride, padding, size)
            (3, 4, 7, 2, 3, 16),
            (4, 6, 3, 1, 1, 8),
            (4, 6, 3, 2, 1, 8),
            (4, 6, 3, 2, 1, 9),
            (4, 6, 1, 1, 0, 8),
            (4, 6, 1, 2, 0, 8),
            (4, 6, 1, 2, 0, 7),
        ];
        for (i, &(c_in, c_out, k, stride, padding, size)) in cases.iter().enumerate() {
            let x = Var::from_tensor(&values(&[2, c_in, size, size], i as u64)).unwrap();
            let w = Var::from_tensor(&values(&[c_out, c_in, k, k], 100 + i as u64)).unwrap();
            let r = values(&[2, c_out, size.div_ceil(stride), size.div_ceil(stride)], 7);
            let ours = conv2d(&x, &w, padding, stride).unwrap();
            let theirs = x.conv2d(&w, padding, stride, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "case {i}");
            // On the CPU ours is the im2col + gemm kernel of `crate::cpu`,
            // which sums in another order than candle: equal up to rounding.
            let d = max_abs_diff(&ours, &theirs);
            assert!(d < 1e-4, "case {i} forward: max diff {d}");
            let (g_ours, g_theirs) = (linear_loss_grads(&ours, &r), linear_loss_grads(&theirs, &r));
            for (name, var) in [("x", &x), ("w", &w)] {
                let a = g_ours.get(var).unwrap();
                let b = g_theirs.get(var).unwrap();
                let d = max_abs_diff(a, b);
                assert!(d < 1e-4, "case {i} grad {name}: max diff {d}");
            }
        }
    }

    /// A detached kernel gets no gradient, and an input that tracks nothing gets none either.
    #[test]
    fn skips_unneeded_gradients() {
        let x = Var::from_tensor(&values(&[1, 2, 6, 6], 1)).unwrap();
        let w = Var::from_tensor(&values(&[3, 2, 3, 3], 2)).unwrap();
        let out = conv2d(x.as_tensor(), &w.as_detached_tensor(), 1, 1).unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_some());
        assert!(grads.get(&w).is_none());
        let image = x.as_detached_tensor();
        let out = conv2d(&image, w.as_tensor(), 1, 1).unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_some());
        assert!(grads.get(&image).is_none());
        assert_eq!(grads.get_ids().count(), 1);
    }
}
