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

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu::{Uninit, zeroed};

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
        let winners = x.track_op().then(|| Arc::new(Mutex::new(None)));
        x.contiguous()?.apply_op1(MaxPool { winners })
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

/// The forward op. With `winners`, set when the input tracks gradients, the
/// forward pass records where each output's maximum came from, so the
/// backward pass scatters the gradient without scanning the windows again.
struct MaxPool {
    winners: Option<Arc<Mutex<Option<Vec<u8>>>>>,
}

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

/// An input position within output (oy, ox)'s window as one byte,
/// `3·dy + dx` from the window's (padded) top-left corner: what the
/// forward pass records per output for the backward pass.
#[inline(always)]
fn window_code(y: usize, x: usize, oy: usize, ox: usize) -> u8 {
    ((y + PADDING - oy * STRIDE) * KERNEL + (x + PADDING - ox * STRIDE)) as u8
}

/// The plane index that [`window_code`] `code` of output (oy, ox) names.
#[inline(always)]
fn code_index(code: u8, oy: usize, ox: usize, width: usize) -> usize {
    let (dy, dx) = (usize::from(code) / KERNEL, usize::from(code) % KERNEL);
    (oy * STRIDE + dy - PADDING) * width + ox * STRIDE + dx - PADDING
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
    /// Whether `plane` holds a NaN: a fold without an early exit, so that
    /// it vectorises (`Iterator::any` compiled to a scalar loop, 3% of a
    /// ResNet-18 @ 64 inference).
    fn any_nan => any_nan_body(plane: &[f32]) -> bool
}

#[inline(always)]
fn any_nan_body(plane: &[f32]) -> bool {
    plane.iter().fold(false, |seen, v| seen | v.is_nan())
}

crate::cpu::simd::simd_kernel! {
    /// [`pool_plane_f32_body`] built for the CPU's SIMD level.
    fn pool_plane_f32 => pool_plane_f32_body(
        plane: &[f32],
        height: usize,
        width: usize,
        out: &mut [f32],
        winners: Option<&mut [u8]>,
    )
}

/// The forward pool of one `f32` plane without NaN, and with `winners`
/// the [`window_code`] of each output's maximum. It visits each window's
/// values in the row-major order of [`arg_max`] and keeps the first
/// maximum (a later value wins only when strictly greater), so values and
/// winners are [`arg_max`]'s, without its per-value NaN and `Option`
/// handling. Input rows are taken whole, one after another, so that the
/// interior columns vectorise.
#[inline(always)]
fn pool_plane_f32_body(
    plane: &[f32],
    height: usize,
    width: usize,
    out: &mut [f32],
    winners: Option<&mut [u8]>,
) {
    let out_w = pooled_len(width);
    match winners {
        Some(winners) => {
            for (oy, (best, codes)) in out
                .chunks_exact_mut(out_w)
                .zip(winners.chunks_exact_mut(out_w))
                .enumerate()
            {
                let (y0, y1) = span(oy, height);
                for y in y0..y1 {
                    let row = &plane[y * width..(y + 1) * width];
                    let dy = ((y + PADDING - oy * STRIDE) * KERNEL) as u8;
                    if y == y0 {
                        pool_row::<true>(row, best, codes, dy);
                    } else {
                        pool_row::<false>(row, best, codes, dy);
                    }
                }
            }
        }
        None => {
            for (oy, best) in out.chunks_exact_mut(out_w).enumerate() {
                let (y0, y1) = span(oy, height);
                for y in y0..y1 {
                    let row = &plane[y * width..(y + 1) * width];
                    if y == y0 {
                        max_row::<true>(row, best);
                    } else {
                        max_row::<false>(row, best);
                    }
                }
            }
        }
    }
}

/// [`pool_row`] without the codes, for a pass that records no winners:
/// the same maxima, since only a strictly greater value replaces one.
#[inline(always)]
fn max_row<const FIRST: bool>(row: &[f32], best: &mut [f32]) {
    let width = row.len();
    let out_w = best.len();
    let interior_end = interior_end(width, out_w);
    for ox in (0..1).chain(interior_end..out_w) {
        let (x0, x1) = span(ox, width);
        let mut m = if FIRST { row[x0] } else { best[ox] };
        for &v in &row[x0..x1] {
            m = if v > m { v } else { m };
        }
        best[ox] = m;
    }
    let row = &row[..(STRIDE * interior_end).min(width)];
    let best = &mut best[..interior_end];
    for ox in 1..interior_end {
        let (a, b, c) = (row[2 * ox - 1], row[2 * ox], row[2 * ox + 1]);
        let mut m = if FIRST { a } else { best[ox] };
        m = if a > m { a } else { m };
        m = if b > m { b } else { m };
        m = if c > m { c } else { m };
        best[ox] = m;
    }
}

/// One past the last output column whose window (columns 2·ox − 1 to
/// 2·ox + 1) lies wholly in a row of `width`, and at least 1: the first
/// output (ox = 0) and those from here on are clipped by the padding.
#[inline(always)]
fn interior_end(width: usize, out_w: usize) -> usize {
    if width >= 2 { (width - 2) / 2 + 1 } else { 1 }
        .min(out_w)
        .max(1)
}

/// Folds one input row into the running maxima `best` of an output row
/// (`FIRST`: the window's first row, which starts them) and their codes;
/// `dy` is the row's code offset (3 · its row within the windows).
#[inline(always)]
fn pool_row<const FIRST: bool>(row: &[f32], best: &mut [f32], codes: &mut [u8], dy: u8) {
    let width = row.len();
    let out_w = best.len();
    // One value: start with it, or take it when strictly greater.
    let fold = |m: &mut f32, k: &mut u8, v: f32, code: u8, first: bool| {
        if first || v > *m {
            *m = v;
            *k = code;
        }
    };
    let interior_end = interior_end(width, out_w);
    for ox in (0..1).chain(interior_end..out_w) {
        let (x0, x1) = span(ox, width);
        for (x, &v) in row.iter().enumerate().take(x1).skip(x0) {
            let code = dy + (x + PADDING - ox * STRIDE) as u8;
            fold(&mut best[ox], &mut codes[ox], v, code, FIRST && x == x0);
        }
    }
    // The bound helps the compiler drop the checks; a one-column row has
    // no interior.
    let row = &row[..(STRIDE * interior_end).min(width)];
    let best = &mut best[..interior_end];
    let codes = &mut codes[..interior_end];
    for ox in 1..interior_end {
        let (a, b, c) = (row[2 * ox - 1], row[2 * ox], row[2 * ox + 1]);
        let (mut m, mut k) = if FIRST {
            (a, dy)
        } else {
            (best[ox], codes[ox])
        };
        if !FIRST && a > m {
            (m, k) = (a, dy);
        }
        if b > m {
            (m, k) = (b, dy + 1);
        }
        if c > m {
            (m, k) = (c, dy + 2);
        }
        best[ox] = m;
        codes[ox] = k;
    }
}

/// Pools every plane; with `winners`, also records each output's
/// [`window_code`].
fn pool_forward<T: WithDType + Default>(
    storage: &CpuStorage,
    layout: &Layout,
    winners: bool,
) -> Result<(CpuStorage, Shape, Option<Vec<u8>>)> {
    let (n, c, height, width) = dims_of(layout)?;
    let (out_h, out_w) = (pooled_len(height), pooled_len(width));
    let input = contiguous_slice::<T>(storage, layout)?;
    let plane_out = out_h * out_w;
    // Both are written in full, plane by plane: no zeroing up front.
    let mut out = Uninit::<T>::new(n * c * plane_out);
    let mut codes = Uninit::<u8>::new(if winners { n * c * plane_out } else { 0 });
    let code_chunks: Vec<Option<&mut [MaybeUninit<u8>]>> = if winners {
        codes
            .as_mut_slice()
            .chunks_mut(plane_out)
            .map(Some)
            .collect()
    } else {
        (0..n * c).map(|_| None).collect()
    };
    out.as_mut_slice()
        .par_chunks_mut(plane_out)
        .zip(input.par_chunks(height * width))
        .zip(code_chunks)
        .for_each(|((out_plane, plane), codes)| {
            // Zeroed here, in cache, then overwritten: the kernels below
            // write every output and code.
            let out_plane = zeroed(out_plane);
            let mut codes = codes.map(zeroed);
            if let (Some(plane), Some(out_plane)) = (as_f32(plane), as_f32_mut(out_plane))
                && !any_nan(plane)
            {
                pool_plane_f32(plane, height, width, out_plane, codes);
                return;
            }
            for oy in 0..out_h {
                for ox in 0..out_w {
                    let at = arg_max(plane, height, width, oy, ox);
                    out_plane[oy * out_w + ox] = plane[at];
                    if let Some(codes) = codes.as_deref_mut() {
                        codes[oy * out_w + ox] = window_code(at / width, at % width, oy, ox);
                    }
                }
            }
        });
    // SAFETY: every plane of both was initialised in the loop above.
    let (out, codes) = unsafe { (out.finish(), codes.finish()) };
    Ok((
        T::to_cpu_storage_owned(out),
        Shape::from((n, c, out_h, out_w)),
        winners.then_some(codes),
    ))
}

/// The input gradient: each output's gradient added to the input its
/// [`window_code`] names, in output order (as PyTorch's scatter does).
fn unpool<T: WithDType + Default>(
    codes: &[u8],
    grad: &[T],
    (n, c, height, width): (usize, usize, usize, usize),
) -> Vec<T> {
    let (out_h, out_w) = (pooled_len(height), pooled_len(width));
    let mut out = Uninit::<T>::new(n * c * height * width);
    out.as_mut_slice()
        .par_chunks_mut(height * width)
        .zip(grad.par_chunks(out_h * out_w))
        .zip(codes.par_chunks(out_h * out_w))
        .for_each(|((out, grad), codes)| {
            // Zeroed by the task that adds into it, while in cache.
            let out = zeroed(out);
            for (oy, (grad, codes)) in grad
                .chunks_exact(out_w)
                .zip(codes.chunks_exact(out_w))
                .enumerate()
            {
                for (ox, (&g, &code)) in grad.iter().zip(codes).enumerate() {
                    out[code_index(code, oy, ox, width)] += g;
                }
            }
        });
    // SAFETY: every plane was zeroed, then added into, above.
    unsafe { out.finish() }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let want = self.winners.is_some();
        let (out, shape, codes) = match storage {
            CpuStorage::F32(_) => pool_forward::<f32>(storage, layout, want)?,
            CpuStorage::F64(_) => pool_forward::<f64>(storage, layout, want)?,
            other => candle_core::bail!("max-pool: unsupported dtype {:?}", other.dtype()),
        };
        if let Some(winners) = &self.winners {
            *winners.lock().unwrap_or_else(|e| e.into_inner()) = codes;
        }
        Ok((out, shape))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let winners = self
            .winners
            .as_ref()
            .map(|w| w.lock().unwrap_or_else(|e| e.into_inner()));
        let Some(codes) = winners.as_ref().and_then(|w| w.as_ref()) else {
            candle_core::bail!("max-pool: backward through a forward pass that recorded no winners")
        };
        let dims = x.dims4()?;
        let grad = grad.contiguous()?;
        let (storage, layout) = grad.storage_and_layout();
        let candle_core::Storage::Cpu(storage) = &*storage else {
            candle_core::bail!("max-pool: the gradient is not on the CPU")
        };
        if layout.shape().dims4()? != (dims.0, dims.1, pooled_len(dims.2), pooled_len(dims.3)) {
            candle_core::bail!("max-pool backward: gradient shape {:?}", layout.shape())
        }
        let dx = match storage {
            CpuStorage::F32(_) => {
                let g = contiguous_slice::<f32>(storage, layout)?;
                Tensor::from_vec(unpool(codes, g, dims), dims, x.device())?
            }
            CpuStorage::F64(_) => {
                let g = contiguous_slice::<f64>(storage, layout)?;
                Tensor::from_vec(unpool(codes, g, dims), dims, x.device())?
            }
            other => candle_core::bail!("max-pool backward: unsupported dtype {:?}", other.dtype()),
        };
        Ok(Some(dx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `f32` fast path gives the values and winners of the generic
    /// first-maximum scan (odd and even sides, many ties), the backward
    /// scatter adds in the generic order, and a NaN still wins its windows.
    #[test]
    fn fast_paths_equal_generic_scan_and_nan_wins() {
        for (h, w) in [
            (7, 9),
            (8, 8),
            (5, 4),
            (1, 3),
            (12, 10),
            (2, 2),
            (3, 1),
            (6, 7),
        ] {
            // Values from a small set, so windows are full of ties.
            let plane: Vec<f32> = (0..h * w).map(|i| ((i * 7919) % 5) as f32 - 2.0).collect();
            let (oh, ow) = (pooled_len(h), pooled_len(w));
            let winners: Vec<usize> = (0..oh * ow)
                .map(|i| arg_max(&plane, h, w, i / ow, i % ow))
                .collect();
            let generic: Vec<f32> = winners.iter().map(|&at| plane[at]).collect();
            let mut fast = vec![0f32; oh * ow];
            pool_plane_f32(&plane, h, w, &mut fast, None);
            assert_eq!(fast, generic, "{h}x{w}");
            let mut codes = vec![0u8; oh * ow];
            let mut fast = vec![0f32; oh * ow];
            pool_plane_f32(&plane, h, w, &mut fast, Some(&mut codes));
            assert_eq!(fast, generic, "{h}x{w} with winners");
            let decoded: Vec<usize> = (0..oh * ow)
                .map(|i| code_index(codes[i], i / ow, i % ow, w))
                .collect();
            assert_eq!(decoded, winners, "{h}x{w} winners");

            // The backward: the same window maxima take the same gradients,
            // added in the same order (gradients that round differently
            // when summed in another order).
            let grad: Vec<f32> = (0..oh * ow)
                .map(|i| 1.0 + (i as f32) * 1e-7 + 1e-3 / (i as f32 + 1.0))
                .collect();
            let scattered = unpool(&codes, &grad, (1, 1, h, w));
            let mut generic = vec![0f32; h * w];
            for (&at, &g) in winners.iter().zip(&grad) {
                generic[at] += g;
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&scattered), bits(&generic), "backward {h}x{w}");
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
