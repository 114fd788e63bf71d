//! BatchNorm (train and eval) fused with the ReLU after it, and the residual
//! `relu(a + b)`, as parallel CPU ops.
//!
//! Activations are `[N, C, ...]`: `C` channels of `M = N·(H·W)` values each.
//! Train-mode BatchNorm works on blocks of channels, so a block's values
//! are read for the mean, again for the variance and once more for the
//! output while they are still in cache; its backward needs two passes.
//! Within a block each pass goes image by image, and an image's rows of the
//! block are one contiguous run of memory: reading one channel's rows, one
//! image (`C·H·W` values) apart, had every row of a large plane fall in the
//! same cache sets. Blocks run in parallel on rayon's pool.
//!
//! The sums behind the statistics and the gradients are `f64`. On planes
//! of 8×8 and more the forward adds each row in `f32` lanes first; on
//! smaller planes, and throughout the backward, each position of an
//! image's run gets its images' terms in `f64`, then each channel adds its
//! positions. Either way a channel's arithmetic does not depend on the
//! block it is in, so neither does the result on the thread count.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::Uninit;
use super::conv::supported;
use super::simd::simd_kernel;

/// Elements per parallel task in element-wise ops.
const CHUNK: usize = 1 << 15;

/// `(N, C, H·W)` of an `[N, C, ...]` activation.
fn dims(shape: &Shape, what: &str) -> Result<(usize, usize, usize)> {
    let d = shape.dims();
    if d.len() < 2 {
        candle_core::bail!("cpu {what}: expects [N, C, ...], got {d:?}")
    }
    Ok((d[0], d[1], d[2..].iter().product()))
}

fn data<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("cpu {what}: operands must be contiguous; call .contiguous() first")
    };
    match storage {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        other => candle_core::bail!("cpu {what}: operands must be f32, got {:?}", other.dtype()),
    }
}

/// A pointer to an output buffer whose disjoint parts parallel tasks write.
#[derive(Clone, Copy)]
struct OutPtr(*mut MaybeUninit<f32>);
// SAFETY: every task writes only its own channel's rows.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `at..at + len` lies in the buffer and no other task touches it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, at: usize, len: usize) -> &mut [MaybeUninit<f32>] {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), len) }
    }
}

/// Values per channel block that the BatchNorm passes aim at: three `f32`
/// streams of this many values (384 KiB) stay in a core's L2 cache between
/// a block's passes.
const BLOCK_VALUES: usize = 1 << 15;

/// Channels per parallel task of the train-mode BatchNorm kernels: about
/// [`BLOCK_VALUES`] values, but at least four tasks per thread where there
/// are enough channels. Each channel's arithmetic is the same whatever the
/// block, so the result does not depend on it.
fn channel_block(n: usize, c: usize, hw: usize) -> usize {
    let by_cache = BLOCK_VALUES / (n * hw).max(1);
    let by_tasks = c.div_ceil(4 * rayon::current_num_threads());
    by_cache.min(by_tasks).max(1)
}

/// `Σ xs` over eight independent `f64` lanes, then the lanes in order and
/// the tail: a long row's sum is not one chain of dependent additions.
#[inline(always)]
fn sum_f64(xs: &[f64]) -> f64 {
    const L: usize = 8;
    let (chunks, rest) = xs.as_chunks::<L>();
    let mut acc = [0f64; L];
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    let mut total = 0f64;
    for a in acc {
        total += a;
    }
    for &v in rest {
        total += v;
    }
    total
}

/// Plane sizes from which the forward sums each row in `f32` lanes (see
/// [`lane_sum`]) rather than each position of a block in `f64`. On these
/// rows the lanes are the cheaper; on smaller ones, 2×2 to 7×7, one loop
/// over a block's positions is (two to three times, for the sums alone).
const LANE_SUM_MIN: usize = 64;

const LANES: usize = 16;

/// Adds `f(x)` over a row into a channel's `f64` lanes: the row's whole
/// chunks summed lane by lane in `f32` (independent chains, so the loop
/// vectorises), those sums added to the lanes, and the tail's values to
/// the first lanes one each. Each channel's lanes are summed once, at the
/// end ([`sum_f64`]), not per row: sixteen dependent `f64` additions per
/// row cost more than an 8×8 row itself.
#[inline(always)]
fn add_row_lanes(xs: &[f32], lanes: &mut [f64; LANES], f: impl Fn(f32) -> f32) {
    let mut acc = [0f32; LANES];
    let (chunks, rest) = xs.as_chunks::<LANES>();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += f(x);
        }
    }
    for (l, a) in lanes.iter_mut().zip(acc) {
        *l += f64::from(a);
    }
    for (l, &x) in lanes.iter_mut().zip(rest) {
        *l += f64::from(f(x));
    }
}

/// Each channel's total of a block's position sums (`channels × hw`
/// values, channel after channel).
fn channel_sums(positions: &[f64], hw: usize) -> Vec<f64> {
    positions.chunks_exact(hw).map(sum_f64).collect()
}

/// Each of `values` (one per channel of a block) repeated along its row of
/// `hw`, so that an image's rows of the block go through one loop: rows of
/// 4 or 16 values one at a time cost several times their arithmetic.
fn along_rows<T: Copy>(values: impl Iterator<Item = T>, hw: usize) -> Vec<T> {
    values.flat_map(|v| std::iter::repeat_n(v, hw)).collect()
}

simd_kernel! {
    /// A block of channels of [`bn_train_forward`]: their statistics
    /// `(mean, var, inv_std)`, and their rows of the output.
    fn bn_forward_block => bn_forward_block_body(
        x: &[f32],
        dims: (usize, usize, usize),
        w: &[f32],
        b: &[f32],
        eps: f64,
        relu: bool,
        residual: Option<&[f32]>,
        ptr: &OutPtr,
        channels: Range<usize>,
    ) -> Vec<ChannelStats>
}

/// One channel's statistics and affine map from [`bn_forward_block`].
struct ChannelStats {
    mean: f32,
    var: f32,
    inv_std: f32,
    scale: f32,
    shift: f32,
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bn_forward_block_body(
    x: &[f32],
    (n, c, hw): (usize, usize, usize),
    w: &[f32],
    b: &[f32],
    eps: f64,
    relu: bool,
    residual: Option<&[f32]>,
    ptr: &OutPtr,
    channels: Range<usize>,
) -> Vec<ChannelStats> {
    let count = (n * hw) as f64;
    let row = |ni: usize, ci: usize| (ni * c + ci) * hw..(ni * c + ci + 1) * hw;
    let (c0, c1) = (channels.start, channels.end);
    // Image by image, the block's rows are one contiguous run of memory (see
    // `bn_backward_block_body`). Each position of the run gets its images'
    // values summed in `f64`, in image order; then each channel adds its
    // positions. Whole runs go through one loop whatever the plane size.
    let run = |ni: usize| row(ni, c0).start..row(ni, c1 - 1).end;
    let (means, sums) = if hw >= LANE_SUM_MIN {
        let mut lanes = vec![[0f64; LANES]; channels.len()];
        for ni in 0..n {
            for (l, xr) in lanes.iter_mut().zip(x[run(ni)].chunks_exact(hw)) {
                add_row_lanes(xr, l, |v| v);
            }
        }
        let means: Vec<f64> = lanes.iter().map(|l| sum_f64(l) / count).collect();
        lanes.fill([0.0; LANES]);
        for ni in 0..n {
            let rows = x[run(ni)].chunks_exact(hw);
            for ((l, xr), &m) in lanes.iter_mut().zip(rows).zip(&means) {
                let m = m as f32;
                add_row_lanes(xr, l, |v| (v - m) * (v - m));
            }
        }
        (means, lanes.iter().map(|l| sum_f64(l)).collect())
    } else {
        let mut acc = vec![0f64; run(0).len()];
        for ni in 0..n {
            for (a, &v) in acc.iter_mut().zip(&x[run(ni)]) {
                *a += f64::from(v);
            }
        }
        let means: Vec<f64> = channel_sums(&acc, hw).iter().map(|&s| s / count).collect();
        let along = along_rows(means.iter().copied(), hw);
        acc.fill(0.0);
        for ni in 0..n {
            for ((a, &v), &m) in acc.iter_mut().zip(&x[run(ni)]).zip(&along) {
                let d = f64::from(v) - m;
                *a += d * d;
            }
        }
        (means, channel_sums(&acc, hw))
    };
    let mut stats = Vec::with_capacity(channels.len());
    let mut affine = Vec::with_capacity(channels.len());
    for ((ci, &sum), &mean) in channels.clone().zip(&sums).zip(&means) {
        let var = sum / count;
        let inv_std = 1.0 / (var + eps).sqrt();
        let scale = (f64::from(w[ci]) * inv_std) as f32;
        let shift = (f64::from(b[ci]) - mean * f64::from(scale)) as f32;
        stats.push(ChannelStats {
            mean: mean as f32,
            var: var as f32,
            inv_std: inv_std as f32,
            scale,
            shift,
        });
        affine.push((scale, shift));
    }
    let scales = along_rows(affine.iter().map(|&(a, _)| a), hw);
    let shifts = along_rows(affine.iter().map(|&(_, b)| b), hw);
    for ni in 0..n {
        let r = run(ni);
        // SAFETY: image ni's rows of this block belong to this task only.
        let dst = unsafe { ptr.slice(r.start, r.len()) };
        let src = &x[r.clone()];
        let affine = scales.iter().zip(&shifts);
        if let Some(res) = residual {
            for ((d, &v), (&r, (&scale, &shift))) in
                dst.iter_mut().zip(src).zip(res[r].iter().zip(affine))
            {
                let y = v * scale + shift + r;
                d.write(if relu { y.max(0.0) } else { y });
            }
        } else if relu {
            for ((d, &v), (&scale, &shift)) in dst.iter_mut().zip(src).zip(affine) {
                d.write((v * scale + shift).max(0.0));
            }
        } else {
            for ((d, &v), (&scale, &shift)) in dst.iter_mut().zip(src).zip(affine) {
                d.write(v * scale + shift);
            }
        }
    }
    stats
}

/// Per-channel batch statistics kept for the backward pass.
#[derive(Debug, Clone)]
pub(crate) struct Stats {
    pub(crate) mean: Vec<f32>,
    /// Biased variance, as used for normalising.
    pub(crate) var: Vec<f32>,
    pub(crate) inv_std: Vec<f32>,
    /// The forward's `y = x·scale + shift` (before a residual and ReLU),
    /// per channel, as it computed them.
    pub(crate) scale: Vec<f32>,
    pub(crate) shift: Vec<f32>,
}

/// Train-mode BatchNorm (+ residual) (+ ReLU) of `x` `[N, C, HW]` with its
/// batch statistics: the output and the statistics, channels in parallel.
/// With a residual `r` (of `x`'s shape) the output is `relu?(x̂·w + b + r)`,
/// the same operations in the same order as BatchNorm then [`add_relu`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_train_forward(
    x: &[f32],
    (n, c, hw): (usize, usize, usize),
    w: &[f32],
    b: &[f32],
    eps: f64,
    relu: bool,
    residual: Option<&[f32]>,
) -> (Vec<f32>, Stats) {
    let mut out = Uninit::new(x.len());
    let ptr = OutPtr(out.as_mut_slice().as_mut_ptr());
    let block = channel_block(n, c, hw);
    let per_channel: Vec<ChannelStats> = (0..c.div_ceil(block))
        .into_par_iter()
        .flat_map_iter(|blk| {
            let channels = blk * block..((blk + 1) * block).min(c);
            bn_forward_block(x, (n, c, hw), w, b, eps, relu, residual, &ptr, channels)
        })
        .collect();
    let stats = Stats {
        mean: per_channel.iter().map(|s| s.mean).collect(),
        var: per_channel.iter().map(|s| s.var).collect(),
        inv_std: per_channel.iter().map(|s| s.inv_std).collect(),
        scale: per_channel.iter().map(|s| s.scale).collect(),
        shift: per_channel.iter().map(|s| s.shift).collect(),
    };
    // SAFETY: every channel's task wrote all of its rows.
    (unsafe { out.finish() }, stats)
}

/// Train-mode BatchNorm: `x.apply_op3(weight, bias, BatchNormTrain { .. })`.
struct BatchNormTrain {
    eps: f64,
    relu: bool,
    /// Written by the forward pass; read by the caller (running statistics)
    /// and by the backward pass.
    stats: Arc<Mutex<Option<Stats>>>,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "cpu-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "batch-norm";
        let (n, c, hw) = dims(xl.shape(), what)?;
        let x = data(xs, xl, what)?;
        let (w, b) = (data(ws, wl, what)?, data(bs, bl, what)?);
        if w.len() != c || b.len() != c {
            candle_core::bail!(
                "cpu batch-norm: {c} channels but weight/bias have {}/{} values",
                w.len(),
                b.len()
            )
        }
        if n * hw < 2 {
            candle_core::bail!(
                "cpu batch-norm: train mode needs more than one value per channel, got {:?}; use a larger batch",
                xl.shape().dims()
            )
        }
        let (out, stats) = bn_train_forward(x, (n, c, hw), w, b, self.eps, self.relu, None);
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need_x = x.track_op();
        if !need_x && !weight.track_op() && !bias.track_op() {
            return Ok((None, None, None));
        }
        let Some(stats) = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            candle_core::bail!("cpu batch-norm: backward before forward")
        };
        let c = stats.mean.len();
        let op = BatchNormGrad {
            mean: stats.mean,
            inv_std: stats.inv_std,
            weight: weight.detach().to_vec1::<f32>()?,
            relu: self.relu,
            relu_from_input: None,
            need_x,
        };
        let flat = x
            .detach()
            .apply_op3_no_bwd(&y.detach(), &grad.detach().contiguous()?, &op)?;
        let dw = weight
            .track_op()
            .then(|| flat.narrow(0, 0, c))
            .transpose()?;
        let db = bias.track_op().then(|| flat.narrow(0, c, c)).transpose()?;
        let dx = if need_x {
            Some(flat.narrow(0, 2 * c, x.elem_count())?.reshape(x.shape())?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// Backward of [`BatchNormTrain`]: `x.apply_op3_no_bwd(y, grad, ..)` gives
/// `[dweight (C), dbias (C), dx (N·C·H·W, if need_x)]` flattened.
pub(crate) struct BatchNormGrad {
    pub(crate) mean: Vec<f32>,
    pub(crate) inv_std: Vec<f32>,
    pub(crate) weight: Vec<f32>,
    pub(crate) relu: bool,
    /// With `relu` and no residual: the forward's per-channel `scale` and
    /// `shift` (see [`Stats`]), so that the ReLU's mask comes from `x`
    /// and `y` is never read (the caller may pass `x` for it).
    pub(crate) relu_from_input: Option<(Vec<f32>, Vec<f32>)>,
    pub(crate) need_x: bool,
}

impl BatchNormGrad {
    /// `[dweight (C), dbias (C), dx (N·C·HW, if need_x)]` from the BatchNorm
    /// input `x`, its output `y` and the output gradient `g`, channels in parallel.
    pub(crate) fn run(
        &self,
        x: &[f32],
        y: &[f32],
        g: &[f32],
        dims: (usize, usize, usize),
    ) -> Vec<f32> {
        self.run_with_mask(x, y, g, dims, false).0
    }

    /// [`run`](Self::run) and, with `mask` (and `relu`), the gradient
    /// through the ReLU, `g` where `y > 0`, as a second buffer: what a
    /// residual branch added before the ReLU receives, written in the
    /// same pass as `dx` rather than one of its own.
    pub(crate) fn run_with_mask(
        &self,
        x: &[f32],
        y: &[f32],
        g: &[f32],
        (n, c, hw): (usize, usize, usize),
        mask: bool,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        assert!(
            !mask || (self.relu && self.relu_from_input.is_none()),
            "a ReLU mask needs the ReLU and its output"
        );
        let len = 2 * c + if self.need_x { x.len() } else { 0 };
        let mut out = Uninit::new(len);
        let ptr = OutPtr(out.as_mut_slice().as_mut_ptr());
        let mut masked = mask.then(|| Uninit::new(g.len()));
        let mask_ptr = masked
            .as_mut()
            .map(|m| OutPtr(m.as_mut_slice().as_mut_ptr()));
        let block = channel_block(n, c, hw);
        (0..c.div_ceil(block)).into_par_iter().for_each(|blk| {
            let channels = blk * block..((blk + 1) * block).min(c);
            let outs = (&ptr, mask_ptr.as_ref());
            bn_backward_block(self, x, y, g, (n, c, hw), outs, channels);
        });
        // SAFETY: every channel's task wrote its dweight and dbias entries
        // and, with `need_x`, all of its dx rows, and with `mask` all of
        // its rows of the masked gradient.
        unsafe { (out.finish(), masked.map(|m| m.finish())) }
    }
}

/// The gradient through a ReLU whose output was `y`: `g` where `y > 0` (or
/// NaN), else `+0`. As a bit mask rather than a branch: LLVM compiled the
/// branch to scalar code, which made the BatchNorm backward cost 12% of a
/// small-image training step.
#[inline(always)]
fn relu_grad_of(y: f32, g: f32) -> f32 {
    let keep = u32::from(y > 0.0 || y.is_nan()).wrapping_neg();
    f32::from_bits(g.to_bits() & keep)
}

/// The gradient through `relu(z)` (Rust's `max`, which gives `0` for a
/// NaN `z`) from `z` itself: `g` where `z > 0`, else `+0`; the same as
/// [`relu_grad_of`] on that ReLU's output.
#[inline(always)]
fn relu_grad_pre(z: f32, g: f32) -> f32 {
    let keep = u32::from(z > 0.0).wrapping_neg();
    f32::from_bits(g.to_bits() & keep)
}

/// Where the BatchNorm backward's ReLU mask comes from, for a block's rows.
#[derive(Clone, Copy)]
enum Mask<'a> {
    /// No ReLU.
    Off,
    /// From the output `y`.
    Output,
    /// From the input, `z = x·scale + shift` as the forward computed it
    /// (each channel's repeated along its row), without reading `y`: for a
    /// BatchNorm + ReLU with no residual.
    Input { scale: &'a [f32], shift: &'a [f32] },
}

/// Adds, at each position of one image's run of a block, `g'` to `sum_g`
/// and `g'·(x − m)` to `sum_gx` in `f64`, `g'` the gradient through the
/// ReLU that `mask` says (`m` is the channel's mean along its row). One
/// loop per kind of mask, over zipped slices, so that each vectorises.
#[inline(always)]
fn add_grad_sums(
    (sum_g, sum_gx): (&mut [f64], &mut [f64]),
    (x, y, g): (&[f32], &[f32], &[f32]),
    means: &[f64],
    mask: Mask,
) {
    #[inline(always)]
    fn add(sg: &mut f64, sgx: &mut f64, gv: f32, xv: f32, m: f64) {
        let gv = f64::from(gv);
        *sg += gv;
        *sgx += gv * (f64::from(xv) - m);
    }
    let sums = sum_g.iter_mut().zip(sum_gx.iter_mut());
    let xm = x.iter().zip(means);
    match mask {
        Mask::Off => {
            for ((sg, sgx), ((&xv, &m), &gv)) in sums.zip(xm.zip(g)) {
                add(sg, sgx, gv, xv, m);
            }
        }
        Mask::Output => {
            for ((sg, sgx), ((&xv, &m), (&yv, &gv))) in sums.zip(xm.zip(y.iter().zip(g))) {
                add(sg, sgx, relu_grad_of(yv, gv), xv, m);
            }
        }
        Mask::Input { scale, shift } => {
            let affine = scale.iter().zip(shift);
            for ((sg, sgx), (((&xv, &m), &gv), (&sc, &sh))) in sums.zip(xm.zip(g).zip(affine)) {
                add(sg, sgx, relu_grad_pre(xv * sc + sh, gv), xv, m);
            }
        }
    }
}

simd_kernel! {
    /// A block of channels of [`BatchNormGrad::run`]: their dweight, dbias and dx rows.
    fn bn_backward_block => bn_backward_block_body(
        op: &BatchNormGrad,
        x: &[f32],
        y: &[f32],
        g: &[f32],
        dims: (usize, usize, usize),
        outs: (&OutPtr, Option<&OutPtr>),
        channels: Range<usize>,
    )
}

#[inline(always)]
fn bn_backward_block_body(
    op: &BatchNormGrad,
    x: &[f32],
    y: &[f32],
    g: &[f32],
    (n, c, hw): (usize, usize, usize),
    (ptr, masked_out): (&OutPtr, Option<&OutPtr>),
    channels: Range<usize>,
) {
    let count = (n * hw) as f64;
    let affine = op.relu_from_input.as_ref().map(|(scale, shift)| {
        (
            along_rows(scale[channels.clone()].iter().copied(), hw),
            along_rows(shift[channels.clone()].iter().copied(), hw),
        )
    });
    let mask = match (op.relu, &affine) {
        (false, _) => Mask::Off,
        (true, None) => Mask::Output,
        (true, Some((scale, shift))) => Mask::Input { scale, shift },
    };
    let row = |ni: usize, ci: usize| (ni * c + ci) * hw..(ni * c + ci + 1) * hw;
    // Image by image, the block's rows are one contiguous run of memory:
    // read in that order rather than a channel's rows one image apart.
    // Each position of the run sums its images' terms in `f64` in image
    // order, then each channel adds its positions (as the forward does).
    let (c0, c1) = (channels.start, channels.end);
    // Image `ni`'s rows of the block, one contiguous run.
    let run = |ni: usize| row(ni, c0).start..row(ni, c1 - 1).end;
    let means = &op.mean[channels.clone()];
    let means_along = along_rows(means.iter().map(|&m| f64::from(m)), hw);
    let mut sum_g = vec![0f64; run(0).len()];
    let mut sum_gx = sum_g.clone();
    for ni in 0..n {
        let r = run(ni);
        let rows = (&x[r.clone()], &y[r.clone()], &g[r]);
        add_grad_sums((&mut sum_g, &mut sum_gx), rows, &means_along, mask);
    }
    let sums = channel_sums(&sum_g, hw)
        .into_iter()
        .zip(channel_sums(&sum_gx, hw));
    // dx = w·σ⁻¹·(g − db/M − x̂·dw/M), x̂ = (x − mean)·σ⁻¹.
    let mut coefs = Vec::with_capacity(channels.len());
    for (ci, (sum_g, sum_gx)) in channels.clone().zip(sums) {
        let inv_std = f64::from(op.inv_std[ci]);
        let dw = sum_gx * inv_std;
        let db = sum_g;
        // SAFETY: entries ci and c + ci belong to this task only.
        unsafe {
            ptr.slice(ci, 1)[0].write(dw as f32);
            ptr.slice(c + ci, 1)[0].write(db as f32);
        }
        let k1 = f64::from(op.weight[ci]) * inv_std;
        let k2 = (k1 * db / count) as f32;
        let k3 = (k1 * inv_std * dw / count) as f32;
        coefs.push((k1 as f32, k2, k3));
    }
    if let (Some(out), false) = (masked_out, op.need_x) {
        for ni in 0..n {
            let r = run(ni);
            // SAFETY: image ni's rows of this block belong to this task only.
            let dst = unsafe { out.slice(r.start, r.len()) };
            for (d, (&yv, &gv)) in dst.iter_mut().zip(y[r.clone()].iter().zip(&g[r])) {
                d.write(relu_grad_of(yv, gv));
            }
        }
    }
    if !op.need_x {
        return;
    }
    // Each channel's coefficients and mean repeated along its row (see
    // `along_rows`).
    let k1s = along_rows(coefs.iter().map(|c| c.0), hw);
    let k2s = along_rows(coefs.iter().map(|c| c.1), hw);
    let k3s = along_rows(coefs.iter().map(|c| c.2), hw);
    let ms = along_rows(means.iter().copied(), hw);
    if let Mask::Input { scale, shift } = mask {
        for ni in 0..n {
            let r = run(ni);
            // SAFETY: image ni's rows of this block of dx belong to this
            // task only.
            let dst = unsafe { ptr.slice(2 * c + r.start, r.len()) };
            let (xr, gr) = (&x[r.clone()], &g[r]);
            let coef = k1s.iter().zip(&k2s).zip(k3s.iter().zip(&ms));
            let affine = scale.iter().zip(shift);
            for ((d, (&xv, &gv)), (((&k1, &k2), (&k3, &m)), (&sc, &sh))) in
                dst.iter_mut().zip(xr.iter().zip(gr)).zip(coef.zip(affine))
            {
                let gv = relu_grad_pre(xv * sc + sh, gv);
                d.write(k1 * gv - k2 - k3 * (xv - m));
            }
        }
        return;
    }
    let relu = op.relu;
    for ni in 0..n {
        let r = run(ni);
        // SAFETY: image ni's rows of this block of dx belong to this task only.
        let dst = unsafe { ptr.slice(2 * c + r.start, r.len()) };
        let (xr, yr, gr) = (&x[r.clone()], &y[r.clone()], &g[r.clone()]);
        let coef = k1s.iter().zip(&k2s).zip(k3s.iter().zip(&ms));
        if let Some(out) = masked_out {
            // SAFETY: as above, for the masked gradient.
            let masked = unsafe { out.slice(r.start, r.len()) };
            for ((d, dm), ((&xv, (&yv, &gv)), ((&k1, &k2), (&k3, &m)))) in dst
                .iter_mut()
                .zip(masked.iter_mut())
                .zip(xr.iter().zip(yr.iter().zip(gr)).zip(coef))
            {
                let gv = relu_grad_of(yv, gv);
                dm.write(gv);
                d.write(k1 * gv - k2 - k3 * (xv - m));
            }
            continue;
        }
        for ((d, (&xv, (&yv, &gv))), ((&k1, &k2), (&k3, &m))) in dst
            .iter_mut()
            .zip(xr.iter().zip(yr.iter().zip(gr)))
            .zip(coef)
        {
            let gv = if relu { relu_grad_of(yv, gv) } else { gv };
            d.write(k1 * gv - k2 - k3 * (xv - m));
        }
    }
}

impl CustomOp3 for BatchNormGrad {
    fn name(&self) -> &'static str {
        "cpu-batch-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "batch-norm backward";
        let (n, c, hw) = dims(xl.shape(), what)?;
        let (x, y, g) = (
            data(xs, xl, what)?,
            data(ys, yl, what)?,
            data(gs, gl, what)?,
        );
        if y.len() != x.len() || g.len() != x.len() {
            candle_core::bail!("cpu batch-norm backward: operand shapes differ")
        }
        let out = self.run(x, y, g, (n, c, hw));
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// `relu?(x · scale[c] + shift[c])`: `x.apply_op3(scale, shift, ScaleShift { .. })`.
struct ScaleShift {
    relu: bool,
}

impl CustomOp3 for ScaleShift {
    fn name(&self) -> &'static str {
        "cpu-scale-shift"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "scale-shift";
        let (_, c, hw) = dims(xl.shape(), what)?;
        let x = data(xs, xl, what)?;
        let (scale, shift) = (data(ss, sl, what)?, data(bs, bl, what)?);
        if scale.len() != c || shift.len() != c {
            candle_core::bail!(
                "cpu scale-shift: {c} channels but scale/shift have {}/{} values",
                scale.len(),
                shift.len()
            )
        }
        let mut out = Uninit::new(x.len());
        let relu = self.relu;
        let rows_per_task = CHUNK.div_ceil(hw.max(1)).max(1);
        out.as_mut_slice()
            .par_chunks_mut(rows_per_task * hw.max(1))
            .enumerate()
            .for_each(|(t, dst)| {
                scale_shift_rows(x, scale, shift, (c, hw), relu, t * rows_per_task, dst)
            });
        // SAFETY: the chunks cover the buffer and each was written in full.
        let out = unsafe { out.finish() };
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Eval mode rarely needs gradients: plain tensor ops suffice.
        let grad = if self.relu {
            relu_grad(y, grad)?
        } else {
            grad.clone()
        };
        let mut bshape = vec![1; x.rank()];
        bshape[1] = x.dim(1)?;
        let reduce: Vec<usize> = (0..x.rank()).filter(|&d| d != 1).collect();
        let dx = x
            .track_op()
            .then(|| grad.broadcast_mul(&scale.detach().reshape(bshape.as_slice())?))
            .transpose()?;
        let dscale = scale
            .track_op()
            .then(|| (&grad * x.detach())?.sum(reduce.as_slice()))
            .transpose()?;
        let dshift = shift
            .track_op()
            .then(|| grad.sum(reduce.as_slice()))
            .transpose()?;
        Ok((dx, dscale, dshift))
    }
}

/// `relu(a + b)`: `a.apply_op2(b, AddRelu)`.
struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "cpu-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (data(s1, l1, "add-relu")?, data(s2, l2, "add-relu")?);
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "cpu add-relu: shapes {:?} and {:?} differ",
                l1.shape().dims(),
                l2.shape().dims()
            )
        }
        let mut out = Uninit::new(a.len());
        out.as_mut_slice()
            .par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(t, dst)| add_relu_chunk(&a[t * CHUNK..], &b[t * CHUNK..], dst));
        // SAFETY: the chunks cover the buffer and each was written in full.
        let out = unsafe { out.finish() };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !a.track_op() && !b.track_op() {
            return Ok((None, None));
        }
        let g = relu_grad(y, grad)?;
        Ok((a.track_op().then(|| g.clone()), b.track_op().then_some(g)))
    }
}

/// `grad · (y > 0)`: `y.apply_op2_no_bwd(grad, ReluGrad)`.
struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "cpu-relu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (data(s1, l1, "relu-grad")?, data(s2, l2, "relu-grad")?);
        if y.len() != g.len() {
            candle_core::bail!("cpu relu-grad: operand shapes differ")
        }
        Ok((CpuStorage::F32(relu_mask(y, g)), l1.shape().clone()))
    }
}

/// `g` where `y > 0`, zero elsewhere, in parallel: the ReLU backward from its output.
pub(crate) fn relu_mask(y: &[f32], g: &[f32]) -> Vec<f32> {
    let mut out = Uninit::new(y.len());
    out.as_mut_slice()
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(t, dst)| relu_mask_chunk(&y[t * CHUNK..], &g[t * CHUNK..], dst));
    // SAFETY: the chunks cover the buffer and each was written in full.
    unsafe { out.finish() }
}

/// `grad` where `y > 0`, zero elsewhere (the ReLU backward from its output).
fn relu_grad(y: &Tensor, grad: &Tensor) -> Result<Tensor> {
    if supported(y) && supported(grad) {
        y.detach()
            .contiguous()?
            .apply_op2_no_bwd(&grad.detach().contiguous()?, &ReluGrad)
    } else {
        grad.mul(&y.detach().gt(0.0)?.to_dtype(grad.dtype())?)
    }
}

/// Train-mode BatchNorm over `x` `[N, C, ...]`, optionally followed by ReLU:
/// `relu?((x − mean) / sqrt(var + eps) · weight + bias)` with the batch's
/// per-channel mean and biased variance.
///
/// Returns `(y, mean, var)`: the output (with gradients for whichever of `x`,
/// `weight`, `bias` track them) and the detached batch mean and biased
/// variance `[C]`, for updating running statistics (PyTorch blends in the
/// unbiased variance: multiply by `M / (M − 1)`, `M = N·H·W`).
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    if supported(x) && supported(weight) && supported(bias) {
        let stats = Arc::new(Mutex::new(None));
        let op = BatchNormTrain {
            eps,
            relu,
            stats: stats.clone(),
        };
        let y = x
            .contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
        let Some(stats) = stats.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            candle_core::bail!("cpu batch-norm: the forward pass left no statistics")
        };
        let c = stats.mean.len();
        let mean = Tensor::from_vec(stats.mean, c, x.device())?;
        let var = Tensor::from_vec(stats.var, c, x.device())?;
        return Ok((y, mean, var));
    }
    crate::generic::batch_norm_train(x, weight, bias, eps, relu)
}

/// `relu?(x · scale[c] + shift[c])` over `x` `[N, C, ...]`: eval-mode
/// BatchNorm with `scale = weight / sqrt(running_var + eps)` and
/// `shift = bias − running_mean · scale`.
pub fn scale_shift(x: &Tensor, scale: &Tensor, shift: &Tensor, relu: bool) -> Result<Tensor> {
    if supported(x) && supported(scale) && supported(shift) {
        return x.contiguous()?.apply_op3(
            &scale.contiguous()?,
            &shift.contiguous()?,
            ScaleShift { relu },
        );
    }
    crate::generic::scale_shift(x, scale, shift, relu)
}

/// `relu(a + b)` for two tensors of the same shape (a residual connection).
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if supported(a) && supported(b) && a.dtype() == DType::F32 {
        return a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu);
    }
    crate::generic::add_relu(a, b)
}

simd_kernel! {
    /// Rows `first..` of [`ScaleShift`]'s output (`dst` holds whole rows).
    fn scale_shift_rows => scale_shift_rows_body(
        x: &[f32],
        scale: &[f32],
        shift: &[f32],
        dims: (usize, usize),
        relu: bool,
        first: usize,
        dst: &mut [MaybeUninit<f32>],
    )
}

#[inline(always)]
fn scale_shift_rows_body(
    x: &[f32],
    scale: &[f32],
    shift: &[f32],
    (c, hw): (usize, usize),
    relu: bool,
    first: usize,
    dst: &mut [MaybeUninit<f32>],
) {
    for (r, dst) in dst.chunks_mut(hw.max(1)).enumerate() {
        let row = first + r;
        let ci = row % c;
        let (a, b) = (scale[ci], shift[ci]);
        let src = &x[row * hw..(row + 1) * hw];
        if relu {
            for (d, &v) in dst.iter_mut().zip(src) {
                d.write((v * a + b).max(0.0));
            }
        } else {
            for (d, &v) in dst.iter_mut().zip(src) {
                d.write(v * a + b);
            }
        }
    }
}

simd_kernel! {
    /// `dst = relu(a + b)` over `dst`'s length.
    fn add_relu_chunk => add_relu_chunk_body(a: &[f32], b: &[f32], dst: &mut [MaybeUninit<f32>])
}

#[inline(always)]
fn add_relu_chunk_body(a: &[f32], b: &[f32], dst: &mut [MaybeUninit<f32>]) {
    for ((d, &u), &v) in dst.iter_mut().zip(a).zip(b) {
        d.write((u + v).max(0.0));
    }
}

simd_kernel! {
    /// `dst = g where y > 0, else 0` over `dst`'s length.
    fn relu_mask_chunk => relu_mask_chunk_body(y: &[f32], g: &[f32], dst: &mut [MaybeUninit<f32>])
}

#[inline(always)]
fn relu_mask_chunk_body(y: &[f32], g: &[f32], dst: &mut [MaybeUninit<f32>]) {
    for ((d, &u), &v) in dst.iter_mut().zip(y).zip(g) {
        d.write(if u > 0.0 { v } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bit-mask ReLU gradient is the branch it replaced, value for
    /// value: `g` where `y > 0` or `y` is NaN, else `+0`.
    #[test]
    fn relu_grad_matches_the_branch() {
        let ys = [
            1.0,
            1e-30,
            0.0,
            -0.0,
            -1.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        let gs = [2.5, -3.0, -0.0, f32::NAN, 1e-38];
        for &y in &ys {
            for &g in &gs {
                let want = if y <= 0.0 { 0.0f32 } else { g };
                assert_eq!(relu_grad_of(y, g).to_bits(), want.to_bits(), "y {y}, g {g}");
            }
        }
    }

    /// Deterministic values of both signs over forty orders of magnitude
    /// (so that `f64` sums round, and the order of additions shows), with
    /// zeros of both signs among them.
    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761) | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        };
        (0..len)
            .map(|i| match i % 11 {
                3 => 0.0,
                7 => -0.0,
                _ => {
                    let mantissa = (next() as f32 / u32::MAX as f32) * 4.0 - 2.0;
                    mantissa * 10f32.powi((next() % 41) as i32 - 20)
                }
            })
            .collect()
    }

    /// Runs the forward and backward block kernels over `[n, c, hw]` with
    /// the channels split into blocks of `block`: the statistics, the
    /// output, and for each kind of ReLU mask the backward's output (and
    /// the masked gradient with the output's mask), all as bits.
    fn block_results(x: &[f32], (n, c, hw): (usize, usize, usize), block: usize) -> Vec<u32> {
        let (w, b) = (values(c, 5), values(c, 6));
        let (y, g) = (values(x.len(), 7), values(x.len(), 8));
        let mut bits = Vec::new();
        let mut out = Uninit::new(x.len());
        let ptr = OutPtr(out.as_mut_slice().as_mut_ptr());
        let mut stats = Vec::new();
        for c0 in (0..c).step_by(block) {
            let channels = c0..(c0 + block).min(c);
            stats.extend(bn_forward_block(
                x,
                (n, c, hw),
                &w,
                &b,
                1e-5,
                true,
                None,
                &ptr,
                channels,
            ));
        }
        // SAFETY: the blocks cover every channel.
        bits.extend(unsafe { out.finish() }.iter().map(|v| v.to_bits()));
        for s in &stats {
            bits.extend([s.mean, s.var, s.inv_std, s.scale, s.shift].map(f32::to_bits));
        }
        let affine = (
            stats.iter().map(|s| s.scale).collect::<Vec<_>>(),
            stats.iter().map(|s| s.shift).collect::<Vec<_>>(),
        );
        for (relu, from_input, mask) in [
            (false, false, false),
            (true, false, true),
            (true, true, false),
        ] {
            let op = BatchNormGrad {
                mean: stats.iter().map(|s| s.mean).collect(),
                inv_std: stats.iter().map(|s| s.inv_std).collect(),
                weight: w.clone(),
                relu,
                relu_from_input: from_input.then(|| affine.clone()),
                need_x: true,
            };
            let mut out = Uninit::new(2 * c + x.len());
            let mut masked = Uninit::new(x.len());
            let ptr = OutPtr(out.as_mut_slice().as_mut_ptr());
            let mask_ptr = OutPtr(masked.as_mut_slice().as_mut_ptr());
            for c0 in (0..c).step_by(block) {
                let channels = c0..(c0 + block).min(c);
                let outs = (&ptr, mask.then_some(&mask_ptr));
                bn_backward_block(&op, x, &y, &g, (n, c, hw), outs, channels);
            }
            // SAFETY: the blocks cover every channel's entries and rows.
            bits.extend(unsafe { out.finish() }.iter().map(|v| v.to_bits()));
            if mask {
                // SAFETY: as above, with the mask.
                bits.extend(unsafe { masked.finish() }.iter().map(|v| v.to_bits()));
            }
        }
        bits
    }

    /// A channel's statistics and gradients are the same bits whichever
    /// block it is computed in (so whatever the thread count), on planes
    /// summed by position and by lanes, with and without a tail; and the
    /// statistics are those of `f64` arithmetic, to `f32` rounding.
    #[test]
    fn block_kernels_do_not_depend_on_the_block() {
        for hw in [1, 3, 4, 16, 49, 63, 64, 81, 256] {
            let (n, c) = (5, 7);
            // An offset mean checks that the variance is computed stably.
            let x: Vec<f32> = values(n * c * hw, hw as u32)
                .iter()
                .map(|v| v.clamp(-1e3, 1e3) + 30.0)
                .collect();
            let whole = block_results(&x, (n, c, hw), c);
            for block in [1, 2, 3] {
                assert!(
                    block_results(&x, (n, c, hw), block) == whole,
                    "hw {hw}, block {block}"
                );
            }
            let mut out = Uninit::new(x.len());
            let ptr = OutPtr(out.as_mut_slice().as_mut_ptr());
            let ones = vec![1.0; c];
            let stats =
                bn_forward_block(&x, (n, c, hw), &ones, &ones, 1e-5, false, None, &ptr, 0..c);
            for (ci, s) in stats.iter().enumerate() {
                let vals: Vec<f64> = (0..n)
                    .flat_map(|ni| &x[(ni * c + ci) * hw..(ni * c + ci + 1) * hw])
                    .map(|&v| f64::from(v))
                    .collect();
                let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
                let close = |a: f32, b: f64| (f64::from(a) - b).abs() <= 1e-6 * b.abs().max(1.0);
                assert!(
                    close(s.mean, mean),
                    "hw {hw} channel {ci}: mean {} against {mean}",
                    s.mean
                );
                assert!(
                    close(s.var, var),
                    "hw {hw} channel {ci}: var {} against {var}",
                    s.var
                );
            }
        }
    }
}
