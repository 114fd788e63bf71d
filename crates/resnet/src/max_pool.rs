//! The stem's 3×3, stride-2, padding-1 max-pool, with a backward pass.
//!
//! candle's `max_pool2d` has no backward when the kernel and stride differ
//! (candle issues #1593 and #1851), but fastai trains every BatchNorm even
//! with the body frozen, so gradients must cross the stem's pool. Like
//! PyTorch, padding never wins (it acts as -∞), the first maximum of a window
//! in row-major order takes the whole gradient, and a NaN counts as a maximum.
//!
//! On the CPU this is a custom op with a direct kernel. Other devices use a
//! composition of candle ops with the same forward value and gradient routing.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

const KERNEL: usize = 3;
const STRIDE: usize = 2;
const PADDING: usize = 1;

/// Output side length of the pool for an input side of `len`.
pub fn pooled_len(len: usize) -> usize {
    (len + 2 * PADDING - KERNEL) / STRIDE + 1
}

/// Max-pool `x` `[N, C, H, W]` with a 3×3 window, stride 2 and padding 1.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    let cpu_kernel = matches!(x.dtype(), DType::F32 | DType::F64);
    if x.device().is_cpu() && cpu_kernel {
        x.contiguous()?.apply_op1(MaxPool)
    } else {
        max_pool_composed(x)
    }
}

/// The same pool built from candle ops, for devices without a custom kernel.
///
/// The forward value is the element-wise maximum of the nine shifted, strided
/// views of the padded input. The gradient goes through `Σ mask_k · view_k`,
/// where `mask_k` (detached) marks where view `k` is the first maximum, so it
/// reaches exactly one input element per output element, as in PyTorch (a NaN
/// window, which PyTorch routes to the NaN, gets no gradient here).
pub fn max_pool_composed(x: &Tensor) -> Result<Tensor> {
    let (_, _, height, width) = x.dims4()?;
    let (out_h, out_w) = (pooled_len(height), pooled_len(width));
    let padded = pad_lowest(x, 2, STRIDE * out_h + 1 - height)?;
    let padded = pad_lowest(&padded, 3, STRIDE * out_w + 1 - width)?;
    let mut views = Vec::with_capacity(KERNEL * KERNEL);
    for dy in 0..KERNEL {
        for dx in 0..KERNEL {
            views.push(strided_view(&padded, dy, dx, out_h, out_w)?);
        }
    }
    let mut best = views[0].detach();
    for view in &views[1..] {
        best = best.maximum(&view.detach())?;
    }
    if !x.track_op() {
        return Ok(best);
    }
    let mut taken = best.zeros_like()?;
    let mut routed: Option<Tensor> = None;
    for view in &views {
        let is_max = view.detach().eq(&best)?.to_dtype(x.dtype())?;
        let first = (is_max * (1.0 - &taken)?)?;
        taken = (taken + &first)?;
        let term = view.mul(&first)?;
        routed = Some(match routed {
            None => term,
            Some(sum) => (sum + term)?,
        });
    }
    let routed = routed.expect("a 3x3 window has nine views");
    // `routed - routed.detach()` is exactly zero but carries the gradient, so
    // the value stays the exact maximum.
    best + (routed.detach() - routed)?.neg()?
}

/// `padded[.., dy + 2i, dx + 2j]` for `i < out_h`, `j < out_w`.
fn strided_view(
    padded: &Tensor,
    dy: usize,
    dx: usize,
    out_h: usize,
    out_w: usize,
) -> Result<Tensor> {
    let (n, c, _, _) = padded.dims4()?;
    let rows = padded.narrow(2, dy, STRIDE * out_h)?;
    let rows = rows
        .reshape((n, c, out_h, STRIDE, rows.dim(3)?))?
        .narrow(3, 0, 1)?
        .squeeze(3)?;
    let cols = rows.narrow(3, dx, STRIDE * out_w)?;
    cols.reshape((n, c, out_h, out_w, STRIDE))?
        .narrow(4, 0, 1)?
        .squeeze(4)
}

/// The most negative finite value of `dtype`: padding that never wins and
/// whose product with a zero mask is zero, not NaN.
fn lowest(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -3.38e38,
        DType::F64 => f64::MIN,
        _ => f64::from(f32::MIN),
    }
}

/// One row/column of the lowest value before `dim` and `right` after it.
fn pad_lowest(x: &Tensor, dim: usize, right: usize) -> Result<Tensor> {
    let value = lowest(x.dtype());
    let mut dims = x.dims().to_vec();
    dims[dim] = 1;
    let left = (Tensor::zeros(dims.as_slice(), x.dtype(), x.device())? + value)?;
    dims[dim] = right;
    let right = (Tensor::zeros(dims.as_slice(), x.dtype(), x.device())? + value)?;
    Tensor::cat(&[&left, x, &right], dim)
}

struct MaxPool;

struct MaxPoolBackward;

/// The input rows (or columns) `start..end` that output row (or column)
/// `o` pools, on a side of `len`: the window clipped to the plane, since
/// padding never wins.
#[inline(always)]
fn span(o: usize, len: usize) -> (usize, usize) {
    (
        (o * STRIDE).saturating_sub(PADDING),
        (o * STRIDE + KERNEL - PADDING).min(len),
    )
}

/// Index (within the plane) of the first maximum of output cell (oy, ox).
#[inline]
fn arg_max<T: WithDType>(plane: &[T], height: usize, width: usize, oy: usize, ox: usize) -> usize {
    let (y0, y1) = span(oy, height);
    let (x0, x1) = span(ox, width);
    let mut best_idx = y0 * width + x0;
    let mut best: Option<T> = None;
    for y in y0..y1 {
        for x in x0..x1 {
            let v = plane[y * width + x];
            #[allow(clippy::eq_op)]
            let is_nan = v != v;
            let better = match best {
                None => true,
                Some(b) => v > b || is_nan,
            };
            if better {
                best = Some(v);
                best_idx = y * width + x;
                if is_nan {
                    return best_idx;
                }
            }
        }
    }
    best_idx
}

fn dims_of(layout: &Layout) -> Result<(usize, usize, usize, usize)> {
    layout.shape().dims4()
}

fn contiguous_slice<'a, T: WithDType>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&T::cpu_storage_as_slice(storage)?[start..end]),
        None => candle_core::bail!("max-pool: input must be contiguous"),
    }
}

/// `xs` as `f32`, if that is what `T` is.
fn as_f32<T: WithDType>(xs: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: `T` is `f32`.
        .then(|| unsafe { std::slice::from_raw_parts(xs.as_ptr().cast(), xs.len()) })
}

fn as_f32_mut<T: WithDType>(xs: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: `T` is `f32`.
        .then(|| unsafe { std::slice::from_raw_parts_mut(xs.as_mut_ptr().cast(), xs.len()) })
}

crate::cpu::simd::simd_kernel! {
    /// [`pool_plane_f32_body`] built for the CPU's SIMD level.
    fn pool_plane_f32 => pool_plane_f32_body(
        plane: &[f32],
        height: usize,
        width: usize,
        out: &mut [f32],
        out_w: usize,
    )
}

/// The forward pool of one `f32` plane without NaN: the same windows,
/// scanned in the same row-major order and keeping the first maximum as
/// [`arg_max`] does, so the values are identical, but without its per-value
/// NaN and `Option` handling, which made the pool several times slower.
#[inline(always)]
fn pool_plane_f32_body(plane: &[f32], height: usize, width: usize, out: &mut [f32], out_w: usize) {
    for (oy, out_row) in out.chunks_exact_mut(out_w).enumerate() {
        let (y0, y1) = span(oy, height);
        for (ox, dst) in out_row.iter_mut().enumerate() {
            let (x0, x1) = span(ox, width);
            let mut best = plane[y0 * width + x0];
            for y in y0..y1 {
                for &v in &plane[y * width + x0..y * width + x1] {
                    best = if v > best { v } else { best };
                }
            }
            *dst = best;
        }
    }
}

crate::cpu::simd::simd_kernel! {
    /// [`unpool_plane_f32_body`] built for the CPU's SIMD level.
    fn unpool_plane_f32 => unpool_plane_f32_body(
        plane: &[f32],
        height: usize,
        width: usize,
        grad: &[f32],
        out_w: usize,
        out: &mut [f32],
    )
}

/// The backward pool of one `f32` plane without NaN: each output's gradient
/// added to its window's first maximum, found by the same row-major scan
/// as [`arg_max`] and added in the same output order, so the sums are
/// identical, without its per-value NaN and `Option` handling (which made
/// the backward several times slower than the forward). `out` starts at zero.
#[inline(always)]
fn unpool_plane_f32_body(
    plane: &[f32],
    height: usize,
    width: usize,
    grad: &[f32],
    out_w: usize,
    out: &mut [f32],
) {
    for (oy, grad_row) in grad.chunks_exact(out_w).enumerate() {
        let (y0, y1) = span(oy, height);
        for (ox, &g) in grad_row.iter().enumerate() {
            let (x0, x1) = span(ox, width);
            let mut at = y0 * width + x0;
            let mut best = plane[at];
            for y in y0..y1 {
                for x in x0..x1 {
                    let v = plane[y * width + x];
                    if v > best {
                        best = v;
                        at = y * width + x;
                    }
                }
            }
            out[at] += g;
        }
    }
}

fn pool_forward<T: WithDType>(
    storage: &CpuStorage,
    layout: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (n, c, height, width) = dims_of(layout)?;
    let (out_h, out_w) = (pooled_len(height), pooled_len(width));
    let input = contiguous_slice::<T>(storage, layout)?;
    let mut out = vec![T::zero(); n * c * out_h * out_w];
    out.par_chunks_mut(out_h * out_w)
        .zip(input.par_chunks(height * width))
        .for_each(|(out_plane, plane)| {
            if let (Some(plane), Some(out_plane)) = (as_f32(plane), as_f32_mut(out_plane))
                && !plane.iter().any(|v| v.is_nan())
            {
                pool_plane_f32(plane, height, width, out_plane, out_w);
                return;
            }
            for oy in 0..out_h {
                for ox in 0..out_w {
                    out_plane[oy * out_w + ox] = plane[arg_max(plane, height, width, oy, ox)];
                }
            }
        });
    Ok((
        T::to_cpu_storage_owned(out),
        Shape::from((n, c, out_h, out_w)),
    ))
}

fn pool_backward<T: WithDType>(
    x: &CpuStorage,
    x_layout: &Layout,
    grad: &CpuStorage,
    grad_layout: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (n, c, height, width) = dims_of(x_layout)?;
    let (out_h, out_w) = (pooled_len(height), pooled_len(width));
    if grad_layout.shape().dims4()? != (n, c, out_h, out_w) {
        candle_core::bail!(
            "max-pool backward: gradient shape {:?}",
            grad_layout.shape()
        )
    }
    let input = contiguous_slice::<T>(x, x_layout)?;
    let grad = contiguous_slice::<T>(grad, grad_layout)?;
    let mut out = vec![T::zero(); n * c * height * width];
    out.par_chunks_mut(height * width)
        .zip(input.par_chunks(height * width))
        .zip(grad.par_chunks(out_h * out_w))
        .for_each(|((out_plane, plane), grad_plane)| {
            if let (Some(plane), Some(grad_plane), Some(out_plane)) =
                (as_f32(plane), as_f32(grad_plane), as_f32_mut(out_plane))
                && !plane.iter().any(|v| v.is_nan())
            {
                unpool_plane_f32(plane, height, width, grad_plane, out_w, out_plane);
                return;
            }
            for oy in 0..out_h {
                for ox in 0..out_w {
                    out_plane[arg_max(plane, height, width, oy, ox)] += grad_plane[oy * out_w + ox];
                }
            }
        });
    Ok((
        T::to_cpu_storage_owned(out),
        Shape::from((n, c, height, width)),
    ))
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match storage {
            CpuStorage::F32(_) => pool_forward::<f32>(storage, layout),
            CpuStorage::F64(_) => pool_forward::<f64>(storage, layout),
            other => candle_core::bail!("max-pool: unsupported dtype {:?}", other.dtype()),
        }
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(x.detach().apply_op2(&grad, MaxPoolBackward)?))
    }
}

impl CustomOp2 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match x {
            CpuStorage::F32(_) => pool_backward::<f32>(x, x_layout, grad, grad_layout),
            CpuStorage::F64(_) => pool_backward::<f64>(x, x_layout, grad, grad_layout),
            other => candle_core::bail!("max-pool backward: unsupported dtype {:?}", other.dtype()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `f32` fast path gives the values of the generic first-maximum
    /// scan (odd and even sides, many ties), and a NaN still wins its windows.
    #[test]
    fn fast_paths_equal_generic_scan_and_nan_wins() {
        for (h, w) in [(7, 9), (8, 8), (5, 4), (1, 3)] {
            // Values from a small set, so windows are full of ties.
            let plane: Vec<f32> = (0..h * w).map(|i| ((i * 7919) % 5) as f32 - 2.0).collect();
            let (oh, ow) = (pooled_len(h), pooled_len(w));
            let mut fast = vec![0f32; oh * ow];
            pool_plane_f32(&plane, h, w, &mut fast, ow);
            let generic: Vec<f32> = (0..oh * ow)
                .map(|i| plane[arg_max(&plane, h, w, i / ow, i % ow)])
                .collect();
            assert_eq!(fast, generic, "{h}x{w}");
        }
        // The backward: the same window maxima take the same gradients, added
        // in the same order (gradients that round differently when summed in
        // another order).
        for (h, w) in [(7, 9), (8, 8), (5, 4), (1, 3), (12, 10)] {
            let plane: Vec<f32> = (0..h * w).map(|i| ((i * 7919) % 5) as f32 - 2.0).collect();
            let (oh, ow) = (pooled_len(h), pooled_len(w));
            let grad: Vec<f32> = (0..oh * ow)
                .map(|i| 1.0 + (i as f32) * 1e-7 + 1e-3 / (i as f32 + 1.0))
                .collect();
            let mut fast = vec![0f32; h * w];
            unpool_plane_f32(&plane, h, w, &grad, ow, &mut fast);
            let mut generic = vec![0f32; h * w];
            for (i, &g) in grad.iter().enumerate() {
                generic[arg_max(&plane, h, w, i / ow, i % ow)] += g;
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&generic), "backward {h}x{w}");
            assert!(fast.iter().filter(|&&v| v != 0.0).count() > 0);
        }
        let mut plane = vec![1f32; 6 * 6];
        plane[2 * 6 + 2] = f32::NAN;
        let x = Tensor::from_vec(plane, (1, 1, 6, 6), &candle_core::Device::Cpu).unwrap();
        let y: Vec<f32> = max_pool_3x3_s2(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Only the outputs whose window covers input (2, 2) are NaN.
        for (i, v) in y.iter().enumerate() {
            let (oy, ox) = (i / 3, i % 3);
            let covers = |o: usize| (o * 2).saturating_sub(1) <= 2 && 2 < o * 2 + 2;
            assert_eq!(v.is_nan(), covers(oy) && covers(ox), "output ({oy}, {ox})");
        }
    }
}
