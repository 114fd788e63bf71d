//! Direct convolution for AVX2 and AVX-512: no im2col, no packing of the
//! input.
//!
//! im2col + `gemm` moves every input value `kh·kw` times into `col`, and
//! `gemm` then repacks `col` before its microkernel reads it. For the
//! 3×3 convolutions that make up most of a ResNet-18 (and whose stride-1
//! input gradients are forward convolutions too, see `conv.rs`), those
//! passes cost about as much as the arithmetic on two cores.
//!
//! Here each image is first copied once into a zero-padded layout, rows
//! `W + 2·pad` wide, so that the input a kernel tap `(i, j)` reads for an
//! output pixel is that pixel's offset (its top-left tap, `stride` apart)
//! plus a constant per tap. The kernel is packed once as `[O/B, C, kh·kw,
//! B]`: for every input channel and tap, the weights of a block of `B`
//! output channels side by side. The microkernel keeps `NP` output pixels
//! × `B` output channels in vector registers (6 × 64 with AVX-512, 6 × 16
//! with AVX2) and, for every input channel and tap, loads the block's
//! weights as whole vectors and multiplies them by each pixel's input
//! value, broadcast. Vectors run along output channels, so no load
//! straddles two cache lines and no lane is wasted on padding; the
//! results, pixel-major, are transposed into the `[O, OH, OW]` output at
//! the end. Pixels are only offsets, so a task may hold several small
//! images side by side, their tiles sharing each block's weights.
//!
//! Every output value is one fused multiply-add chain over
//! `(input channel, i, j)` in that order, starting from zero, whatever the
//! vector width, so the AVX2 and AVX-512 builds give the same bits. The
//! baseline (SSE2) build has no FMA and keeps im2col + `gemm`.
//!
//! The exact variant, for the image's few channels (`forward_exact` in
//! `conv.rs`), runs the same scheme in `f64` (blocks of 32 or 8 output
//! channels), every sum over all input channels in registers and rounded
//! to `f32` once as it is stored.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::Uninit;
use super::conv::Geometry;
use super::simd::{SimdLevel, simd_level};

/// Output pixels per microkernel tile.
pub(super) const NP: usize = 6;

/// Input channels per pass over an image, at least: a block's weights for
/// them (`16·9·B` floats, 36 KiB at AVX-512's `B` = 64 for a 3×3 kernel)
/// stay in L1 while every tile of the plane goes by. Partial sums wait in
/// the scratch buffer between passes, stored and reloaded exactly, so the
/// sums are the same as in one pass.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const CHANNEL_CHUNK: usize = 16;

/// Channel × tap steps per pass: kernels with fewer taps than a 3×3 (the
/// 1×1 products of `winograd.rs`) take more channels per pass, so that
/// the partial sums are not stored and reloaded every few steps.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const CHUNK_STEPS: usize = 144;

/// Input channels per pass for a kernel of `taps` taps.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn channel_chunk(taps: usize) -> usize {
    CHANNEL_CHUNK.max(CHUNK_STEPS / taps.max(1))
}

/// Input channels below which the direct path is not taken (the image's
/// planes take the exact `f64` path in `conv.rs`).
pub(super) const MIN_CHANNELS: usize = 5;

/// Output pixels per task below which im2col + `gemm` is kept: images
/// are grouped into a task up to this many (see [`images_per_task`]).
const MIN_PIXELS: usize = 256;

/// Output pixels per plane below which im2col + `gemm` is kept even with
/// images grouped. Measured on two cores (AVX-512, 3×3 kernels, forward):
/// against im2col + `gemm`, 20.4 against 20.9 ms at 14×14 (two images a
/// task, batch 32), 11.1 against 12.1 ms for stride 2 onto 14×14, 3.5
/// against 3.9 ms at 16×16 with 64 channels; but slower at 8×8 (12.9
/// against 12.6 ms), 7×7 (22.3 against 21.8) and 4×4 (14.1 against 12.3),
/// where each weight serves too few pixels between loads.
const MIN_PLANE_PIXELS: usize = 128;

/// On planes below the direct kernel's sizes, the share of the taps
/// `(output pixel, i, j)` that read the image rather than its padding at
/// or below which [`Kind::ValidTaps`] replaces im2col + `gemm`, which
/// multiplies the padding's zeros too. Measured on two cores (AVX-512,
/// forward / input gradient, ms, against im2col + `gemm`): 512 → 512
/// channels of 3×3 on 2×2 pixels (a share of 0.44), batch 64, 3.6 / 3.8
/// against 4.6 / 5.5; but at a share of 0.69, 256 → 256 on 4×4 at batch
/// 32 took 1.96 / 2.02 against 1.87 / 2.13, and 256 → 512 with stride 2
/// onto 2×2 2.56 against 2.29 (forward).
const MAX_VALID_TAP_SHARE: f64 = 0.5;

/// Output channels per block at `level`: four vectors.
fn block_channels(level: SimdLevel) -> usize {
    match level {
        SimdLevel::Avx512 => 64,
        _ => 16,
    }
}

/// Output channels per block of the exact kernel at `level`: four
/// vectors of `f64` (AVX-512) or two (AVX2, whose 16 registers hold 6 × 2
/// sums, two weight vectors and a broadcast).
fn exact_block_channels(level: SimdLevel) -> usize {
    match level {
        SimdLevel::Avx512 => 32,
        _ => 8,
    }
}

/// A convolution the direct path computes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Direct {
    g: Geometry,
    level: SimdLevel,
    /// Images per task, side by side in its tiles: enough that small
    /// planes still give a task [`MIN_PIXELS`] output pixels, each block's
    /// weights then serving all of them.
    group: usize,
    kind: Kind,
}

/// Which kernel a [`Direct`] convolution runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// The `f32` direct kernel.
    Direct,
    /// The exact kernel (`f64` sums rounded once, for an image's few
    /// channels; see `forward_exact` in `conv.rs`).
    Exact,
    /// Winograd's F(2×2, 3×3) (`winograd.rs`), whose products run on the
    /// direct kernel.
    Winograd,
    /// Winograd's F(4×4, 3×3) (`winograd4.rs`), likewise, where its tiles
    /// cover the planes with little waste.
    Winograd4,
    /// The `f32` direct kernel over each output pixel's valid taps only,
    /// the ones that read the image and not its padding: for planes so
    /// small that most taps fall in the padding (a 3×3 kernel on 2×2
    /// pixels reads the image with 16 of its 36 taps).
    ValidTaps,
}

impl Direct {
    /// The SIMD level of the kernel that runs.
    pub(super) fn level(&self) -> SimdLevel {
        self.level
    }

    /// Which kernel runs.
    pub(super) fn kind(&self) -> Kind {
        self.kind
    }

    /// The convolution's shapes.
    pub(super) fn geometry(&self) -> &Geometry {
        &self.g
    }

    /// The direct path for this convolution, or `None` where im2col +
    /// `gemm` is used: a 1×1 kernel with stride 1 and no padding (which
    /// needs no im2col), no FMA at this SIMD level, output channels not a
    /// multiple of 16, an image's few channels, a plane of fewer than
    /// [`MIN_PLANE_PIXELS`] output pixels, or fewer than [`MIN_PIXELS`] per
    /// task even with images grouped.
    pub(super) fn plan(g: &Geometry) -> Option<Self> {
        if g.exact() {
            return Self::plan_exact(g);
        }
        // AVX-512's kernel needs 64 output channels per block; where they
        // do not divide, AVX2's (16 per block) runs on the same CPU, with
        // the same bits.
        let level = match simd_level() {
            SimdLevel::Avx512 if g.o.is_multiple_of(block_channels(SimdLevel::Avx512)) => {
                SimdLevel::Avx512
            }
            SimdLevel::Avx512 | SimdLevel::Avx2 => SimdLevel::Avx2,
            SimdLevel::Baseline => return None,
        };
        let threads = rayon::current_num_threads();
        if super::winograd::applies(g, block_channels(level)) {
            if super::winograd::large_tiles_enabled() && super::winograd4::beats_small_tiles(g) {
                return Some(Self {
                    g: *g,
                    level,
                    group: super::winograd4::images_per_task(g, threads),
                    kind: Kind::Winograd4,
                });
            }
            return Some(Self {
                g: *g,
                level,
                group: super::winograd::images_per_task(g, threads),
                kind: Kind::Winograd,
            });
        }
        let group = images_per_task(g.n, g.p(), threads);
        let pointwise = g.kh == 1 && g.kw == 1 && g.padding == 0 && g.stride == 1;
        let fits = !pointwise && g.o.is_multiple_of(block_channels(level)) && g.c >= MIN_CHANNELS;
        let kind = if g.p() >= MIN_PLANE_PIXELS && group * g.p() >= MIN_PIXELS {
            Kind::Direct
        } else if valid_tap_share(g) <= MAX_VALID_TAP_SHARE {
            Kind::ValidTaps
        } else {
            return None;
        };
        fits.then_some(Self {
            g: *g,
            level,
            group,
            kind,
        })
    }

    /// The exact kernel for a convolution of an image's few channels: any
    /// stride and plane, output channels in blocks of 32 (AVX-512) or 8
    /// (AVX2); `None` at the baseline level or for other channel counts.
    fn plan_exact(g: &Geometry) -> Option<Self> {
        let level = match simd_level() {
            SimdLevel::Avx512 if g.o.is_multiple_of(exact_block_channels(SimdLevel::Avx512)) => {
                SimdLevel::Avx512
            }
            SimdLevel::Avx512 | SimdLevel::Avx2 => SimdLevel::Avx2,
            SimdLevel::Baseline => return None,
        };
        g.o.is_multiple_of(exact_block_channels(level))
            .then(|| Self {
                g: *g,
                level,
                group: images_per_task(g.n, g.p(), rayon::current_num_threads()),
                kind: Kind::Exact,
            })
    }

    /// Output channels per block of the kernel that runs.
    pub(super) fn block(&self) -> usize {
        match self.kind {
            Kind::Exact => exact_block_channels(self.level),
            Kind::Direct | Kind::Winograd | Kind::Winograd4 | Kind::ValidTaps => {
                block_channels(self.level)
            }
        }
    }

    /// Each tap's offset from a pixel's top-left tap in a padded plane.
    fn taps(&self) -> Vec<usize> {
        let wp = self.wp();
        (0..self.g.kh)
            .flat_map(|i| (0..self.g.kw).map(move |j| i * wp + j))
            .collect()
    }

    /// Values per padded image.
    fn image_in(&self) -> usize {
        self.g.c * self.plane()
    }

    /// Width of a padded row.
    fn wp(&self) -> usize {
        self.g.w + 2 * self.g.padding
    }

    /// Values per padded input plane.
    fn plane(&self) -> usize {
        (self.g.h + 2 * self.g.padding) * self.wp()
    }

    /// The offsets, in `count` images' padded planes side by side, of the
    /// top-left tap of each of their output pixels, image by image, the
    /// last one repeated up to whole tiles (computed again and stored past
    /// the last image's results, where nothing reads it).
    fn pixels(&self, count: usize) -> Vec<usize> {
        let (ow, wp, s) = (self.g.ow, self.wp(), self.g.stride);
        let image = self.image_in();
        let mut v: Vec<usize> = (0..count)
            .flat_map(|b| (0..self.g.p()).map(move |q| b * image + (q / ow * wp + q % ow) * s))
            .collect();
        let last = *v.last().expect("a plane has at least one output pixel");
        v.resize(v.len().next_multiple_of(NP), last);
        v
    }
}

/// Images per task for `n` images of `p` output pixels on `threads`
/// threads: enough for [`MIN_PIXELS`] pixels, but no fewer tasks than
/// threads while there are images for them.
fn images_per_task(n: usize, p: usize, threads: usize) -> usize {
    MIN_PIXELS
        .div_ceil(p)
        .min(n.div_ceil(threads.max(1)))
        .max(1)
}

/// The taps `i` (or `j`) of a `k`-tap kernel axis that read the image
/// rather than its padding, for output row (or column) `y`.
fn valid_range(
    y: usize,
    stride: usize,
    padding: usize,
    k: usize,
    len: usize,
) -> std::ops::Range<usize> {
    let top = y * stride;
    // Input row `top + i - padding` lies in `0..len`.
    padding.saturating_sub(top)..k.min((len + padding).saturating_sub(top))
}

/// The share of all taps `(output pixel, i, j)` that read the image.
fn valid_tap_share(g: &Geometry) -> f64 {
    let axis = |out: usize, k: usize, len: usize| -> usize {
        (0..out)
            .map(|y| valid_range(y, g.stride, g.padding, k, len).len())
            .sum()
    };
    let valid = axis(g.oh, g.kh, g.h) * axis(g.ow, g.kw, g.w);
    valid as f64 / (g.p() * g.kh * g.kw) as f64
}

/// Output pixels that share their valid taps ([`Kind::ValidTaps`]), for
/// a task's images: each tap as (offset from the pixel's top-left tap in
/// the padded plane, index among the kernel's `kh·kw`), and each pixel as
/// its offset (as in [`Direct::pixels`]) and its row in the task's
/// pixel-major results, the last one repeated up to whole tiles.
pub(super) struct TapClass {
    taps: Vec<(usize, usize)>,
    pixels: Vec<usize>,
    rows: Vec<usize>,
}

/// The [`TapClass`]es of `count` images of `d`'s geometry, in the order
/// of their first pixel.
fn tap_classes(d: &Direct, count: usize) -> Vec<TapClass> {
    let g = &d.g;
    let (wp, image, p) = (d.wp(), d.image_in(), g.p());
    let mut classes: Vec<(std::ops::Range<usize>, std::ops::Range<usize>, TapClass)> = Vec::new();
    for q in 0..p {
        let (y, x) = (q / g.ow, q % g.ow);
        let rows = valid_range(y, g.stride, g.padding, g.kh, g.h);
        let cols = valid_range(x, g.stride, g.padding, g.kw, g.w);
        let at = match classes
            .iter()
            .position(|(r, c, _)| *r == rows && *c == cols)
        {
            Some(at) => at,
            None => {
                let taps = rows
                    .clone()
                    .flat_map(|i| cols.clone().map(move |j| (i * wp + j, i * g.kw + j)))
                    .collect();
                let class = TapClass {
                    taps,
                    pixels: Vec::new(),
                    rows: Vec::new(),
                };
                classes.push((rows, cols, class));
                classes.len() - 1
            }
        };
        let class = &mut classes[at].2;
        for b in 0..count {
            class.pixels.push(b * image + (y * wp + x) * g.stride);
            class.rows.push(b * p + q);
        }
    }
    classes
        .into_iter()
        .map(|(_, _, mut class)| {
            let len = class.pixels.len().next_multiple_of(NP);
            let (last, row) = (
                class.pixels[class.pixels.len() - 1],
                class.rows[class.rows.len() - 1],
            );
            class.pixels.resize(len, last);
            class.rows.resize(len, row);
            class
        })
        .collect()
}

/// `out[n, o, :, :] = Σ_c,i,j kernel[o, c, i, j] · x[n, c, y·s+i-pad, x·s+j-pad]`
/// with zero padding, written in full; `finish(row, planes)` then runs on
/// each task's output planes (`row` = `image·O + first channel`: a group
/// of whole images, or a share of one image's channels when there are
/// fewer images than threads) while they are in cache.
pub(super) fn forward(
    d: &Direct,
    x: &[f32],
    kernel: &[f32],
    out: &mut [MaybeUninit<f32>],
    finish: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) {
    forward_with(d, x, kernel, false, out, finish);
}

/// Whether [`forward_flipped`] takes this convolution: the `f32` kernels,
/// whose packing of the kernel can turn it as it goes.
pub(super) fn packs_kernel(d: &Direct) -> bool {
    d.kind != Kind::Exact
}

/// [`forward`] with the kernel `W'[c, o, i, j] = W[o, c, kh−1−i, kw−1−j]`
/// of a stride-1 input gradient, given `W` `[d.C, d.O, kh, kw]` itself:
/// turned as it is packed, without a copy of the turned kernel first.
/// Only for convolutions [`packs_kernel`] takes.
pub(super) fn forward_flipped(
    d: &Direct,
    x: &[f32],
    kernel: &[f32],
    out: &mut [MaybeUninit<f32>],
    finish: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) {
    assert!(packs_kernel(d));
    forward_with(d, x, kernel, true, out, finish);
}

/// The kernel `[O, C, kh, kw]`, or with `flipped` the turned kernel of
/// [`forward_flipped`] from its `W`, packed as [`pack_kernel`] does.
pub(super) fn pack_any_kernel(d: &Direct, kernel: &[f32], flipped: bool) -> (Vec<f32>, usize) {
    if flipped {
        pack_flipped_kernel(d, kernel)
    } else {
        pack_kernel(d, kernel)
    }
}

/// [`forward`] or, with `flipped`, [`forward_flipped`].
fn forward_with(
    d: &Direct,
    x: &[f32],
    kernel: &[f32],
    flipped: bool,
    out: &mut [MaybeUninit<f32>],
    finish: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) {
    let taps = d.taps();
    if d.kind == Kind::Winograd {
        let (weights, offset) = super::winograd::transform_kernel(d, kernel, flipped);
        let weights = &weights[offset..offset + 16 * d.g.o * d.g.c];
        for_each_task(d, out, |task, dst| {
            super::winograd::task(d, x, weights, task, dst);
            finish(task.first_row(d), dst);
        });
    } else if d.kind == Kind::Winograd4 {
        let (weights, offset) = super::winograd4::transform_kernel(d, kernel, flipped);
        let weights = &weights[offset..offset + 36 * d.g.o * d.g.c];
        for_each_task(d, out, |task, dst| {
            super::winograd4::task(d, x, weights, task, dst);
            finish(task.first_row(d), dst);
        });
    } else if d.kind == Kind::Exact {
        assert!(!flipped, "the exact kernel packs the kernel as it is");
        let padded = pad_input::<f64>(d, x);
        let weights = pack_kernel_f64(d, kernel);
        run_tasks(d, out, finish, |task, tmp| {
            let (images, w) = task.operands(d, &padded, &weights);
            tiles_exact(d, images, task.channels(d), w, &taps, task.pixels, tmp);
        });
    } else {
        let (weights, offset) = pack_any_kernel(d, kernel, flipped);
        forward_packed(d, x, &weights[offset..offset + kernel.len()], out, finish);
    }
}

/// [`forward`] for the `f32` direct kernels, from weights packed by
/// [`pack_kernel`] or [`pack_flipped_kernel`].
fn forward_packed(
    d: &Direct,
    x: &[f32],
    weights: &[f32],
    out: &mut [MaybeUninit<f32>],
    finish: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) {
    let padded = pad_input::<f32>(d, x);
    if d.kind == Kind::ValidTaps {
        // A task holds `group` images, or one (see `for_each_task`).
        let full = tap_classes(d, d.group);
        let tail = tap_classes(d, (d.g.n % d.group).max(1));
        let one = tap_classes(d, 1);
        run_tasks(d, out, finish, |task, tmp| {
            let (images, w) = task.operands(d, &padded, weights);
            let classes = match task.images.len() {
                n if n == d.group => &full,
                1 => &one,
                _ => &tail,
            };
            valid_tiles(d, images, task.channels(d), w, classes, tmp);
        });
    } else {
        let taps = d.taps();
        run_tasks(d, out, finish, |task, tmp| {
            let (images, w) = task.operands(d, &padded, weights);
            tiles(d, images, task.channels(d), w, &taps, task.pixels, tmp);
        });
    }
}

/// One task's share of a convolution: whole images, or one image's blocks
/// of output channels, and the offsets of its output pixels.
pub(super) struct Task<'a> {
    pub(super) images: std::ops::Range<usize>,
    pub(super) blocks: std::ops::Range<usize>,
    pixels: &'a [usize],
}

impl Task<'_> {
    /// The output row (`image·O + channel`) the task's planes start at.
    fn first_row(&self, d: &Direct) -> usize {
        self.images.start * d.g.o + self.blocks.start * d.block()
    }

    pub(super) fn channels(&self, d: &Direct) -> usize {
        self.blocks.len() * d.block()
    }

    /// The task's padded images and its blocks' packed weights.
    fn operands<'a, T>(&self, d: &Direct, padded: &'a [T], weights: &'a [T]) -> (&'a [T], &'a [T]) {
        let per_block = d.g.c * d.g.kh * d.g.kw * d.block();
        (
            &padded[self.images.start * d.image_in()..self.images.end * d.image_in()],
            &weights[self.blocks.start * per_block..self.blocks.end * per_block],
        )
    }
}

/// Shares the output out among tasks (a group of images each, or, with
/// fewer images than threads, an image's blocks of output channels each),
/// runs `tiles(task, tmp)` for each into this thread's pixel-major scratch
/// `[pixels, channels]`, transposes that into the task's output planes
/// and calls `finish` on them.
fn run_tasks(
    d: &Direct,
    out: &mut [MaybeUninit<f32>],
    finish: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
    tiles: impl Fn(&Task, &mut [f32]) + Sync,
) {
    let p = d.g.p();
    for_each_task(d, out, |task, dst| {
        let channels = task.channels(d);
        with_tile_scratch(task.pixels.len() * channels, |tmp| {
            tiles(task, tmp);
            for (b, dst) in dst.chunks_mut(channels * p).enumerate() {
                transpose(d.level, &tmp[b * p * channels..], channels, p, dst);
            }
        });
        finish(task.first_row(d), dst);
    });
}

/// Shares the output out among tasks: with images grouped ([`Direct`]'s
/// `group` > 1), a group of whole images each; otherwise one image each,
/// or, with fewer images than threads (inference on a few images), each
/// image's blocks of output channels shared out. Calls `work(task, dst)`
/// with the task's output, `[images, channels, P]`, in parallel.
pub(super) fn for_each_task(
    d: &Direct,
    out: &mut [MaybeUninit<f32>],
    work: impl Fn(&Task, &mut [MaybeUninit<f32>]) + Sync,
) {
    let (o, p) = (d.g.o, d.g.p());
    let group = d.group;
    let pixels = d.pixels(group);
    // The last group may hold fewer images.
    let tail_pixels = d.pixels((d.g.n % group).max(1));
    let blocks = o / d.block();
    if group > 1 {
        out.par_chunks_mut(group * o * p)
            .enumerate()
            .for_each(|(gi, dst)| {
                let count = dst.len() / (o * p);
                let first = gi * group;
                let task = Task {
                    images: first..first + count,
                    blocks: 0..blocks,
                    pixels: if count == group {
                        &pixels
                    } else {
                        &tail_pixels
                    },
                };
                work(&task, dst);
            });
        return;
    }
    let per_image = rayon::current_num_threads()
        .div_ceil(d.g.n)
        .clamp(1, blocks);
    let task_blocks = blocks.div_ceil(per_image);
    let bc = d.block();
    out.par_chunks_mut(o * p)
        .enumerate()
        .for_each(|(b, image_out)| {
            // The image's last share may hold fewer blocks.
            image_out
                .par_chunks_mut(task_blocks * bc * p)
                .enumerate()
                .for_each(|(share, dst)| {
                    let first = share * task_blocks;
                    let channels = dst.len() / p;
                    let task = Task {
                        images: b..b + 1,
                        blocks: first..first + channels / bc,
                        pixels: &pixels,
                    };
                    work(&task, dst);
                });
        });
}

/// `dst[o][q] = src[q][o]` for `o < channels`, `q < p`: the pixel-major
/// tiles into channel planes. A copy, so every path gives the same bits;
/// with AVX (part of every level the direct path runs at) in 8 × 8 blocks
/// of registers, which took this pass from about 6% of a ResNet-18
/// inference to under 2%.
fn transpose(
    level: SimdLevel,
    src: &[f32],
    channels: usize,
    p: usize,
    dst: &mut [MaybeUninit<f32>],
) {
    assert!(src.len() >= p * channels && dst.len() >= channels * p);
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && channels.is_multiple_of(8) {
        // SAFETY: AVX is part of the detected level; the assert above
        // bounds every read and write.
        unsafe { x86::transpose_avx(src, channels, p, dst) };
        return;
    }
    let _ = level;
    transpose_scalar(src, channels, 0, p, dst);
}

/// [`transpose`] of pixels `q_start..p`, in cache-sized blocks.
fn transpose_scalar(
    src: &[f32],
    channels: usize,
    q_start: usize,
    p: usize,
    dst: &mut [MaybeUninit<f32>],
) {
    const T: usize = 16;
    for q0 in (q_start..p).step_by(T) {
        let q1 = (q0 + T).min(p);
        for o0 in (0..channels).step_by(T) {
            for o in o0..(o0 + T).min(channels) {
                let row = &mut dst[o * p + q0..o * p + q1];
                for (v, q) in row.iter_mut().zip(q0..q1) {
                    v.write(src[q * channels + o]);
                }
            }
        }
    }
}

/// This thread's buffer for one image's pixel-major results, kept between calls.
fn with_tile_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    use std::cell::RefCell;
    thread_local! {
        static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }
    TILE.with(|t| {
        let mut t = t.borrow_mut();
        if t.len() < len {
            t.resize(len, 0.0);
        }
        f(&mut t[..len])
    })
}

/// Each image's planes with `pad` zero rows and columns around them, as `T`.
fn pad_input<T: From<f32> + Default + Copy + Send>(d: &Direct, x: &[f32]) -> Vec<T> {
    let (h, w, pad, wp, plane) = (d.g.h, d.g.w, d.g.padding, d.wp(), d.plane());
    let mut out = Uninit::<T>::new(d.g.n * d.g.c * plane);
    out.as_mut_slice()
        .par_chunks_mut(plane)
        .zip(x.par_chunks(h * w))
        .for_each(|(dst, src)| {
            let (top, rest) = dst.split_at_mut(pad * wp);
            let (rows, bottom) = rest.split_at_mut(h * wp);
            top.iter_mut().chain(bottom.iter_mut()).for_each(|v| {
                v.write(T::default());
            });
            for (dst, src) in rows.chunks_mut(wp).zip(src.chunks(w)) {
                let (left, rest) = dst.split_at_mut(pad);
                let (mid, right) = rest.split_at_mut(w);
                left.iter_mut().chain(right.iter_mut()).for_each(|v| {
                    v.write(T::default());
                });
                for (v, &s) in mid.iter_mut().zip(src) {
                    v.write(T::from(s));
                }
            }
        });
    // SAFETY: every plane's values were written: padding rows, then each
    // row's padding and pixels.
    unsafe { out.finish() }
}

/// Floats per 64-byte cache line.
const LINE: usize = 16;

/// `len` floats starting on a cache line, written by `fill`: a buffer and
/// the offset of the aligned start in it. With `B` a multiple of 16, every
/// weight vector the microkernel loads is then one line, never two. The
/// values around the aligned ones are zeros; those are not written twice.
///
/// # Safety
/// `fill` must write every value of the slice it is given.
pub(super) unsafe fn aligned(
    len: usize,
    fill: impl FnOnce(&mut [MaybeUninit<f32>]),
) -> (Vec<f32>, usize) {
    let mut buf = Vec::<f32>::with_capacity(len + LINE);
    let offset = buf.as_ptr().align_offset(LINE * std::mem::size_of::<f32>());
    assert!(
        offset < LINE,
        "an f32 buffer can be aligned to a cache line"
    );
    let spare = &mut buf.spare_capacity_mut()[..len + LINE];
    let (head, rest) = spare.split_at_mut(offset);
    let (body, tail) = rest.split_at_mut(len);
    head.iter_mut().chain(tail.iter_mut()).for_each(|v| {
        v.write(0.0);
    });
    fill(body);
    // SAFETY: the head and tail were written above, the body by `fill`
    // (the caller's promise).
    unsafe { buf.set_len(len + LINE) };
    (buf, offset)
}

/// The kernel `[O, C, kh, kw]` as `[O/B, C, kh·kw, B]`, in an aligned buffer
/// (see [`aligned`]): each block of `B` output channels' rows, `[B, C·kh·kw]`,
/// transposed (for 512 → 512 channels of 3×3 a gather of 2.4 M values from
/// lines 18 KiB apart took a tenth of the convolution at 4×4 pixels).
pub(super) fn pack_kernel(d: &Direct, kernel: &[f32]) -> (Vec<f32>, usize) {
    let k = d.g.c * d.g.kh * d.g.kw;
    let bc = block_channels(d.level);
    // SAFETY: the transposes write every value: each block's `k · bc`.
    unsafe {
        aligned(kernel.len(), |out| {
            out.par_chunks_mut(k * bc)
                .zip(kernel.par_chunks(k * bc))
                .for_each(|(dst, src)| transpose(d.level, src, k, bc, dst));
        })
    }
}

/// [`pack_kernel`]'s layout `[O/B, C, kh·kw, B]` for the turned kernel
/// `W'[o, c, i, j] = W[c, o, kh−1−i, kw−1−j]` (`O` and `C` being `d`'s),
/// read from `W` `[C, O, kh, kw]`: each `W[c, block, :, :]`, `[B, kh·kw]`
/// in a row, becomes the block's `[kh·kw, B]` of input channel `c`, taps
/// in reverse.
fn pack_flipped_kernel(d: &Direct, kernel: &[f32]) -> (Vec<f32>, usize) {
    let taps = d.g.kh * d.g.kw;
    let bc = block_channels(d.level);
    let (c, o) = (d.g.c, d.g.o);
    assert_eq!(kernel.len(), c * o * taps);
    // SAFETY: each block's `c` chunks of `taps · bc` values are written.
    unsafe {
        aligned(kernel.len(), |out| {
            out.par_chunks_mut(c * taps * bc)
                .enumerate()
                .for_each(|(block, dst)| {
                    for (ci, dst) in dst.chunks_mut(taps * bc).enumerate() {
                        let start = (ci * o + block * bc) * taps;
                        turn_taps(d.level, &kernel[start..start + bc * taps], taps, bc, dst);
                    }
                });
        })
    }
}

/// `dst[t][b] = src[b][taps − 1 − t]` for `b < bc`, `t < taps`: with AVX
/// and a 3×3 kernel, eight rows at a time through an 8 × 8 register
/// transpose (taps 0 to 7) and the ninth tap's column gathered; a copy,
/// so the same values either way.
fn turn_taps(level: SimdLevel, src: &[f32], taps: usize, bc: usize, dst: &mut [MaybeUninit<f32>]) {
    assert!(src.len() >= taps * bc && dst.len() >= taps * bc);
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && taps == 9 && bc.is_multiple_of(8) {
        // SAFETY: AVX is part of the detected level; the assert above
        // bounds every read and write.
        unsafe { x86::turn_taps9_avx(src, bc, dst) };
        return;
    }
    let _ = level;
    for (t, row) in dst.chunks_mut(bc).take(taps).enumerate() {
        let tap = taps - 1 - t;
        for (b, v) in row.iter_mut().enumerate() {
            v.write(src[b * taps + tap]);
        }
    }
}

/// The kernel `[O, C, kh, kw]` in `f64` as `[O/B, C, kh·kw, B]` for the
/// exact kernel (an image's few channels: a few thousand values).
fn pack_kernel_f64(d: &Direct, kernel: &[f32]) -> Vec<f64> {
    let k = d.g.c * d.g.kh * d.g.kw;
    let bc = d.block();
    let mut out = vec![0f64; kernel.len()];
    for (dst, src) in out.chunks_mut(k * bc).zip(kernel.chunks(k * bc)) {
        for (co, row) in src.chunks(k).enumerate() {
            for (ct, &v) in row.iter().enumerate() {
                dst[ct * bc + co] = f64::from(v);
            }
        }
    }
    out
}

/// [`tiles`] for the exact kernel: every output a fused multiply-add chain
/// in `f64` over `(input channel, i, j)` from zero (each product of two
/// `f32` is exact in `f64`), rounded to `f32` once, into `tmp`.
fn tiles_exact(
    d: &Direct,
    image: &[f64],
    channels: usize,
    w: &[f64],
    taps: &[usize],
    pixels: &[usize],
    tmp: &mut [f32],
) {
    check_tiles(d, image.len(), channels, w.len(), taps, pixels, tmp.len());
    let args = (d.g.c, d.plane(), channels, image, w, taps, pixels);
    #[cfg(target_arch = "x86_64")]
    match d.level {
        // SAFETY: the level was detected on this CPU; `check_tiles` bounds
        // every read, and `tmp` has a row of `channels` values per pixel.
        SimdLevel::Avx512 => unsafe { x86::tiles_exact_avx512(args, tmp) },
        // SAFETY: as above.
        SimdLevel::Avx2 => unsafe { x86::tiles_exact_avx2(args, tmp) },
        SimdLevel::Baseline => unreachable!("Direct::plan refuses the baseline level"),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (args, tmp);
        unreachable!("Direct::plan refuses the baseline level")
    }
}

/// The bounds [`tiles`] and [`tiles_exact`] rely on: whole blocks and
/// tiles, and every pixel's reads inside its own image's padded first plane
/// (the kernels add whole planes for the other channels).
fn check_tiles(
    d: &Direct,
    image_len: usize,
    channels: usize,
    w_len: usize,
    taps: &[usize],
    pixels: &[usize],
    tmp_len: usize,
) {
    let (plane, image_in) = (d.plane(), d.image_in());
    assert!(image_len > 0 && image_len.is_multiple_of(image_in));
    assert_eq!(channels % d.block(), 0);
    assert_eq!(w_len, channels * d.g.c * taps.len());
    assert_eq!(pixels.len() % NP, 0);
    assert_eq!(tmp_len, pixels.len() * channels);
    let tap_max = taps.iter().max().copied().unwrap_or(0);
    assert!(
        pixels
            .iter()
            .all(|&q| q < image_len && q % image_in + tap_max < plane)
    );
}

/// One or more images side by side: every tile of [`NP`] of the output
/// pixels `pixels` (offsets into `image`, see [`Direct::pixels`]) for each
/// block of the `channels` output channels whose weights `w` holds, into
/// `tmp` (`[pixels, channels]`, pixel-major).
fn tiles(
    d: &Direct,
    image: &[f32],
    channels: usize,
    w: &[f32],
    taps: &[usize],
    pixels: &[usize],
    tmp: &mut [f32],
) {
    check_tiles(d, image.len(), channels, w.len(), taps, pixels, tmp.len());
    let args = (d.g.c, d.plane(), channels, image, w, taps, pixels);
    // SAFETY: `check_tiles` bounds every read, and `tmp` has a row of
    // `channels` values per pixel.
    unsafe { run_tiles(d.level, args, tmp) };
}

/// [`tiles`] over each class's valid taps only ([`Kind::ValidTaps`]),
/// into the rows of `tmp` (`[pixels, channels]`) the classes name.
fn valid_tiles(
    d: &Direct,
    image: &[f32],
    channels: usize,
    w: &[f32],
    classes: &[TapClass],
    tmp: &mut [f32],
) {
    let taps = d.g.kh * d.g.kw;
    let (plane, image_in) = (d.plane(), d.image_in());
    assert!(!image.is_empty() && image.len().is_multiple_of(image_in));
    assert_eq!(channels % d.block(), 0);
    assert_eq!(w.len(), channels * d.g.c * taps);
    assert!(tmp.len().is_multiple_of(channels));
    let rows = tmp.len() / channels;
    for class in classes {
        assert_eq!(class.pixels.len() % NP, 0);
        assert_eq!(class.rows.len(), class.pixels.len());
        assert!(class.rows.iter().all(|&r| r < rows));
        assert!(class.taps.iter().all(|&(_, t)| t < taps));
        let tap_max = class.taps.iter().map(|&(off, _)| off).max().unwrap_or(0);
        assert!(
            class
                .pixels
                .iter()
                .all(|&q| q < image.len() && q % image_in + tap_max < plane)
        );
    }
    let args = (d.g.c, plane, channels, image, w, taps, classes);
    #[cfg(target_arch = "x86_64")]
    match d.level {
        // SAFETY: the level was detected on this CPU; the asserts above
        // bound every read and write.
        SimdLevel::Avx512 => unsafe { x86::valid_tiles_avx512(args, tmp) },
        // SAFETY: as above.
        SimdLevel::Avx2 => unsafe { x86::valid_tiles_avx2(args, tmp) },
        SimdLevel::Baseline => unreachable!("Direct::plan refuses the baseline level"),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (args, tmp);
        unreachable!("Direct::plan refuses the baseline level")
    }
}

/// `(input channels, padded plane, output channels (a multiple of the
/// block), images, their packed weights, taps per channel in them, the
/// tap classes)`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
type ValidArgs<'a> = (
    usize,
    usize,
    usize,
    &'a [f32],
    &'a [f32],
    usize,
    &'a [TapClass],
);

/// The `f32` kernel at `level`.
///
/// # Safety
/// `level` was detected on this CPU (as every `Direct` plan's); the
/// arguments keep [`x86::tiles_avx512`]'s contract.
unsafe fn run_tiles(level: SimdLevel, args: TileArgs, tmp: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match level {
        // SAFETY: per this function's contract.
        SimdLevel::Avx512 => unsafe { x86::tiles_avx512(args, tmp) },
        // SAFETY: as above.
        SimdLevel::Avx2 => unsafe { x86::tiles_avx2(args, tmp) },
        SimdLevel::Baseline => unreachable!("Direct::plan refuses the baseline level"),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (level, args, tmp);
        unreachable!("Direct::plan refuses the baseline level")
    }
}

/// The direct kernel as a plain product, for `winograd.rs`: `tmp[t][o] =
/// Σ_ci v[ci·plane + pixels[t]] · w[o / B][ci][o % B]` (every pixel below
/// `plane`) for `o <
/// channels` (a multiple of the block `B` of `level`), every sum a fused
/// multiply-add chain over `ci` from zero.
#[allow(clippy::too_many_arguments)]
pub(super) fn products(
    level: SimdLevel,
    c: usize,
    plane: usize,
    channels: usize,
    v: &[f32],
    w: &[f32],
    pixels: &[usize],
    tmp: &mut [f32],
) {
    assert!(c > 0 && channels.is_multiple_of(block_channels(level)));
    assert_eq!(w.len(), channels * c);
    assert_eq!(pixels.len() % NP, 0);
    assert_eq!(tmp.len(), pixels.len() * channels);
    // Channel `ci` of pixel `q` is `v[ci·plane + q]`.
    let last = pixels.iter().max().map_or(0, |&q| (c - 1) * plane + q);
    assert!(pixels.iter().all(|&q| q < plane) && last < v.len());
    let args = (c, plane, channels, v, w, &[0][..], pixels);
    // SAFETY: the caller's level was detected on this CPU (as every
    // `Direct` plan's); the asserts above bound every read and write.
    unsafe { run_tiles(level, args, tmp) };
}

/// `(input channels, padded plane, output channels (a multiple of the
/// block), image, their packed weights, tap offsets, pixel offsets)`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
type TileArgs<'a> = (
    usize,
    usize,
    usize,
    &'a [f32],
    &'a [f32],
    &'a [usize],
    &'a [usize],
);

/// [`TileArgs`] with the exact kernel's `f64` image and weights.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
type ExactArgs<'a> = (
    usize,
    usize,
    usize,
    &'a [f64],
    &'a [f64],
    &'a [usize],
    &'a [usize],
);

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::{ExactArgs, NP, TileArgs, ValidArgs, channel_chunk, transpose_scalar};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// [`super::transpose`] in 8 × 8 register blocks: eight pixels' rows of
    /// eight channels in, the eight channels' rows of eight pixels out; the
    /// last `p % 8` pixels scalar.
    ///
    /// # Safety
    /// The CPU must have AVX; `channels` is a multiple of 8, `src` holds
    /// `p · channels` values and `dst` `channels · p`.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn transpose_avx(
        src: &[f32],
        channels: usize,
        p: usize,
        dst: &mut [MaybeUninit<f32>],
    ) {
        let full = p / 8 * 8;
        let out = dst.as_mut_ptr().cast::<f32>();
        // Eight channels at a time, every pixel each: each plane is written
        // in one sweep (64 -> 128 channels, stride 2 onto 28×28, batch 32:
        // forward 14.4–15.0 -> 12.9–13.1 ms against pixels outside).
        for o0 in (0..channels).step_by(8) {
            for q0 in (0..full).step_by(8) {
                // SAFETY: rows q0..q0 + 8 of `src` and columns q0..q0 + 8
                // of rows o0..o0 + 8 of `dst` lie inside them (see above).
                unsafe {
                    let s = src.as_ptr().add(q0 * channels + o0);
                    let rows = std::array::from_fn(|i| _mm256_loadu_ps(s.add(i * channels)));
                    let d = out.add(o0 * p + q0);
                    for (i, column) in transpose8(rows).into_iter().enumerate() {
                        _mm256_storeu_ps(d.add(i * p), column);
                    }
                }
            }
        }
        transpose_scalar(src, channels, full, p, dst);
    }

    /// [`super::turn_taps`] for 3×3 kernels: `dst[t][b] = src[b][8 − t]`.
    ///
    /// # Safety
    /// The CPU must have AVX; `bc` is a multiple of 8, `src` and `dst`
    /// hold `9·bc` values.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn turn_taps9_avx(src: &[f32], bc: usize, dst: &mut [MaybeUninit<f32>]) {
        assert!(bc.is_multiple_of(8) && src.len() >= 9 * bc && dst.len() >= 9 * bc);
        let s = src.as_ptr();
        let d = dst.as_mut_ptr().cast::<f32>();
        for b0 in (0..bc).step_by(8) {
            // SAFETY (here and below): row `b0 + i` holds taps `(b0 + i)·9
            // .. + 9`, inside `src`; the stores stay inside `dst`.
            let rows: [__m256; 8] =
                std::array::from_fn(|i| unsafe { _mm256_loadu_ps(s.add((b0 + i) * 9)) });
            // `taps[k][i]` = tap `k` of row `b0 + i`.
            let taps = unsafe { transpose8(rows) };
            for (k, v) in taps.into_iter().enumerate() {
                unsafe { _mm256_storeu_ps(d.add((8 - k) * bc + b0), v) };
            }
            let last: [f32; 8] = std::array::from_fn(|i| unsafe { *s.add((b0 + i) * 9 + 8) });
            unsafe { _mm256_storeu_ps(d.add(b0), _mm256_loadu_ps(last.as_ptr())) };
        }
    }

    /// `out[j][i] = rows[i][j]` for eight vectors of eight values: pairs of
    /// rows interleaved, then pairs of pairs (each 128-bit lane then holds
    /// four rows' values of one column), then the lanes put together. Also
    /// turns `winograd.rs`'s tiles into output rows.
    ///
    /// # Safety
    /// The CPU must have AVX.
    #[target_feature(enable = "avx")]
    #[inline]
    pub(in crate::cpu) unsafe fn transpose8(rows: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(rows[0], rows[1]);
        let t1 = _mm256_unpackhi_ps(rows[0], rows[1]);
        let t2 = _mm256_unpacklo_ps(rows[2], rows[3]);
        let t3 = _mm256_unpackhi_ps(rows[2], rows[3]);
        let t4 = _mm256_unpacklo_ps(rows[4], rows[5]);
        let t5 = _mm256_unpackhi_ps(rows[4], rows[5]);
        let t6 = _mm256_unpacklo_ps(rows[6], rows[7]);
        let t7 = _mm256_unpackhi_ps(rows[6], rows[7]);
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        // Low lanes are columns 0..4, high lanes 4..8.
        [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ]
    }

    /// The heart of both kernels: for input channels `$channels` and every
    /// tap, the block's weight vectors at `$wp` (which moves past them)
    /// times each tile pixel's input value, broadcast, added into `$acc`
    /// (`[[vector; NV]; NP]`; `L`, `NV` and `B` are the caller's constants).
    /// Per the kernels' contracts, every read stays inside the pixel's
    /// image's plane `ci`.
    macro_rules! accumulate {
        ($acc:ident, $wp:ident, $image:ident, $plane:ident, $channels:expr, $taps:ident, $px:ident,
         $zero:ident, $load:ident, $set1:ident, $fmadd:ident) => {
            for ci in $channels {
                // SAFETY: see above.
                let base = unsafe { $image.as_ptr().add(ci * $plane) };
                for &tap in $taps {
                    // SAFETY: see above; the weights hold `B` values per
                    // channel and tap.
                    unsafe {
                        let mut wv = [$zero(); NV];
                        for v in 0..NV {
                            wv[v] = $load($wp.add(v * L));
                        }
                        for (k, acc) in $acc.iter_mut().enumerate() {
                            let xv = $set1(*base.add($px[k] + tap));
                            for v in 0..NV {
                                acc[v] = $fmadd(wv[v], xv, acc[v]);
                            }
                        }
                        $wp = $wp.add(B);
                    }
                }
            }
        };
    }

    /// [`NP`] pixels × `$nv` vectors of output channels at a time: 6 × 4
    /// with AVX-512's 32 registers, 6 × 2 with AVX2's 16. `$name` runs
    /// every tap; `$valid` each tap class's valid taps (the weights of tap
    /// `t` of channel `ci` at `(ci·taps + t)·B` in a block, each pixel's
    /// results in the row of `tmp` its class names).
    macro_rules! tiles_impl {
        ($name:ident, $valid:ident, $feature:literal, $reg:ty, $lanes:literal, $nv:literal, $zero:ident, $load:ident, $set1:ident, $fmadd:ident, $store:ident) => {
            /// # Safety
            /// The CPU must have the target features; the image holds `c`
            /// planes of `plane` values and every pixel offset plus every
            /// tap stays inside a plane; the weights are
            /// `[O/B, c, taps, B]`; `tmp` is `[pixels, O]`.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name(
                (c, plane, o, image, w, taps, pixels): TileArgs,
                tmp: &mut [f32],
            ) {
                const L: usize = $lanes;
                const NV: usize = $nv;
                const B: usize = L * NV;
                let per_block = c * taps.len() * B;
                let step = channel_chunk(taps.len());
                for first in (0..c).step_by(step) {
                    let chunk = step.min(c - first);
                    for block in 0..o / B {
                        // SAFETY: `w` holds `O/B` blocks of `c·taps·B` weights.
                        let w0 =
                            unsafe { w.as_ptr().add(block * per_block + first * taps.len() * B) };
                        for (t, px) in pixels.chunks_exact(NP).enumerate() {
                            let mut acc = [[$zero(); NV]; NP];
                            // SAFETY (here and below): `tmp` has a row of
                            // `o` values for each of the tile's pixels.
                            let out = unsafe { tmp.as_mut_ptr().add(t * NP * o + block * B) };
                            if first > 0 {
                                for (k, acc) in acc.iter_mut().enumerate() {
                                    for v in 0..NV {
                                        acc[v] = unsafe { $load(out.add(k * o + v * L)) };
                                    }
                                }
                            }
                            let mut wp = w0;
                            accumulate!(
                                acc,
                                wp,
                                image,
                                plane,
                                first..first + chunk,
                                taps,
                                px,
                                $zero,
                                $load,
                                $set1,
                                $fmadd
                            );
                            for (k, acc) in acc.iter().enumerate() {
                                for v in 0..NV {
                                    unsafe { $store(out.add(k * o + v * L), acc[v]) };
                                }
                            }
                        }
                    }
                }
            }

            /// # Safety
            /// The CPU must have the target features; the image holds `c`
            /// planes of `plane` values and every pixel offset plus every
            /// tap of its class stays inside a plane; the weights are
            /// `[O/B, c, taps, B]` and every class's tap index below
            /// `taps`; `tmp` is `[rows, O]` with every class's rows below
            /// `rows`.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $valid(
                (c, plane, o, image, w, taps, classes): ValidArgs,
                tmp: &mut [f32],
            ) {
                const L: usize = $lanes;
                const NV: usize = $nv;
                const B: usize = L * NV;
                let per_block = c * taps * B;
                let most = classes.iter().map(|k| k.taps.len()).max().unwrap_or(1);
                let step = channel_chunk(most);
                let tmp = tmp.as_mut_ptr();
                for first in (0..c).step_by(step) {
                    let chunk = step.min(c - first);
                    for block in 0..o / B {
                        // SAFETY: `w` holds `O/B` blocks of `c·taps·B` weights.
                        let wb = unsafe { w.as_ptr().add(block * per_block) };
                        for class in classes {
                            for (px, rows) in class
                                .pixels
                                .chunks_exact(NP)
                                .zip(class.rows.chunks_exact(NP))
                            {
                                // SAFETY (here and below): every row is in `tmp`.
                                let out: [*mut f32; NP] = std::array::from_fn(|k| unsafe {
                                    tmp.add(rows[k] * o + block * B)
                                });
                                let mut acc = [[$zero(); NV]; NP];
                                if first > 0 {
                                    for (k, acc) in acc.iter_mut().enumerate() {
                                        for v in 0..NV {
                                            acc[v] = unsafe { $load(out[k].add(v * L)) };
                                        }
                                    }
                                }
                                for ci in first..first + chunk {
                                    // SAFETY: see the contract.
                                    let base = unsafe { image.as_ptr().add(ci * plane) };
                                    let wc = unsafe { wb.add(ci * taps * B) };
                                    for &(tap, t) in &class.taps {
                                        unsafe {
                                            let wp = wc.add(t * B);
                                            let mut wv = [$zero(); NV];
                                            for v in 0..NV {
                                                wv[v] = $load(wp.add(v * L));
                                            }
                                            for (k, acc) in acc.iter_mut().enumerate() {
                                                let xv = $set1(*base.add(px[k] + tap));
                                                for v in 0..NV {
                                                    acc[v] = $fmadd(wv[v], xv, acc[v]);
                                                }
                                            }
                                        }
                                    }
                                }
                                for (k, acc) in acc.iter().enumerate() {
                                    for v in 0..NV {
                                        unsafe { $store(out[k].add(v * L), acc[v]) };
                                    }
                                }
                            }
                        }
                    }
                }
            }
        };
    }

    tiles_impl!(
        tiles_avx512,
        valid_tiles_avx512,
        "avx512f",
        __m512,
        16,
        4,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_storeu_ps
    );
    tiles_impl!(
        tiles_avx2,
        valid_tiles_avx2,
        "avx2,fma",
        __m256,
        8,
        2,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_storeu_ps
    );

    /// The exact kernel: [`NP`] pixels × `$nv` vectors of `f64` sums over
    /// all input channels at once (an image's few), rounded to `f32` as
    /// they are stored.
    macro_rules! tiles_exact_impl {
        ($name:ident, $feature:literal, $lanes:literal, $nv:literal, $zero:ident, $load:ident, $set1:ident, $fmadd:ident, $round:ident, $store:ident) => {
            /// # Safety
            /// The CPU must have the target features; the images hold `c`
            /// planes of `plane` values each and every pixel offset plus
            /// every tap stays inside its image's first plane; the weights
            /// are `[O/B, c, taps, B]`; `tmp` is `[pixels, O]`.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name(
                (c, plane, o, image, w, taps, pixels): ExactArgs,
                tmp: &mut [f32],
            ) {
                const L: usize = $lanes;
                const NV: usize = $nv;
                const B: usize = L * NV;
                let per_block = c * taps.len() * B;
                for (t, px) in pixels.chunks_exact(NP).enumerate() {
                    for block in 0..o / B {
                        // SAFETY: `w` holds `O/B` blocks of `c·taps·B`
                        // weights, `tmp` a row of `o` values per pixel.
                        let mut wp = unsafe { w.as_ptr().add(block * per_block) };
                        let out = unsafe { tmp.as_mut_ptr().add(t * NP * o + block * B) };
                        let mut acc = [[$zero(); NV]; NP];
                        accumulate!(
                            acc,
                            wp,
                            image,
                            plane,
                            0..c,
                            taps,
                            px,
                            $zero,
                            $load,
                            $set1,
                            $fmadd
                        );
                        for (k, acc) in acc.iter().enumerate() {
                            for v in 0..NV {
                                unsafe { $store(out.add(k * o + v * L), $round(acc[v])) };
                            }
                        }
                    }
                }
            }
        };
    }

    tiles_exact_impl!(
        tiles_exact_avx512,
        "avx512f",
        8,
        4,
        _mm512_setzero_pd,
        _mm512_loadu_pd,
        _mm512_set1_pd,
        _mm512_fmadd_pd,
        _mm512_cvtpd_ps,
        _mm256_storeu_ps
    );
    tiles_exact_impl!(
        tiles_exact_avx2,
        "avx2,fma",
        4,
        2,
        _mm256_setzero_pd,
        _mm256_loadu_pd,
        _mm256_set1_pd,
        _mm256_fmadd_pd,
        _mm256_cvtpd_ps,
        _mm_storeu_ps
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every level's transpose puts each value where the definition says,
    /// with whole and partial blocks of 8 pixels.
    #[test]
    fn transpose_matches_its_definition() {
        for channels in [8, 16, 64] {
            for p in [1, 7, 8, 13, 196, 256] {
                let src: Vec<f32> = (0..p * channels).map(|i| i as f32).collect();
                for level in [SimdLevel::Baseline, SimdLevel::Avx2, SimdLevel::Avx512] {
                    if level > super::super::simd::detected_simd_level() {
                        continue;
                    }
                    let mut dst = Uninit::new(channels * p);
                    transpose(level, &src, channels, p, dst.as_mut_slice());
                    // SAFETY: the transpose writes all `channels · p` values.
                    let dst = unsafe { dst.finish() };
                    for o in 0..channels {
                        for q in 0..p {
                            assert_eq!(
                                dst[o * p + q],
                                src[q * channels + o],
                                "{level:?}: channel {o}, pixel {q} of {p}"
                            );
                        }
                    }
                }
            }
        }
    }
}
