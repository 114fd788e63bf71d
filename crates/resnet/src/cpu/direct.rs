//! Direct stride-1 convolution for AVX2 and AVX-512: no im2col, no packing
//! of the input.
//!
//! im2col + `gemm` moves every input value `kh·kw` times into `col`, and
//! `gemm` then repacks `col` before its microkernel reads it. For the
//! 3×3 stride-1 convolutions that make up most of a ResNet-18 (and whose
//! input gradients are forward convolutions too, see `conv.rs`), those
//! passes cost about as much as the arithmetic on two cores.
//!
//! Here each image is first copied once into a zero-padded layout, rows
//! `W + 2·pad` wide, so that the input a kernel tap `(i, j)` reads for an
//! output pixel is that pixel's offset plus a constant per tap. The kernel
//! is packed once as `[O/B, C, kh·kw, B]`: for every input channel and tap,
//! the weights of a block of `B` output channels side by side. The
//! microkernel keeps `NP` output pixels × `B` output channels in vector
//! registers (6 × 64 with AVX-512, 6 × 16 with AVX2) and, for every input
//! channel and tap, loads the block's weights as whole vectors and
//! multiplies them by each pixel's input value, broadcast. Vectors run
//! along output channels, so no load straddles two cache lines and no lane
//! is wasted on padding; the results, pixel-major, are transposed into the
//! `[O, OH, OW]` output at the end.
//!
//! Every output value is one fused multiply-add chain over
//! `(input channel, i, j)` in that order, starting from zero, whatever the
//! vector width, so the AVX2 and AVX-512 builds give the same bits. The
//! baseline (SSE2) build has no FMA and keeps im2col + `gemm`.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::Uninit;
use super::conv::Geometry;
use super::simd::{SimdLevel, simd_level};

/// Output pixels per microkernel tile.
const NP: usize = 6;

/// Input channels per pass over an image: a block's weights for them
/// (`16·9·B` floats, 36 KiB at AVX-512's `B` = 64 for a 3×3 kernel) stay
/// in L1 while every tile of the plane goes by. Partial sums wait in the
/// scratch buffer between passes, stored and reloaded exactly, so the sums
/// are the same as in one pass.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const CHANNEL_CHUNK: usize = 16;

/// Input channels below which the direct path is not taken (the image's
/// planes take the exact `f64` path in `conv.rs`).
const MIN_CHANNELS: usize = 5;

/// Output pixels below which im2col + `gemm` is kept. Measured on two
/// cores (AVX-512, batch 64): at 32×32 the direct path took 20 ms where
/// im2col + `gemm` took 26 (their `col` outgrows L2), at 16×16 they were
/// even, and at 8×8 the direct path was slower (22 against 18 ms).
const MIN_PIXELS: usize = 256;

/// Output channels per block at `level`: four vectors.
fn block_channels(level: SimdLevel) -> usize {
    match level {
        SimdLevel::Avx512 => 64,
        _ => 16,
    }
}

/// A stride-1 convolution the direct path computes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Direct {
    g: Geometry,
    level: SimdLevel,
}

impl Direct {
    /// The SIMD level of the kernel that runs.
    pub(super) fn level(&self) -> SimdLevel {
        self.level
    }

    /// The direct path for this convolution, or `None` where im2col +
    /// `gemm` is used: a stride above 1, a 1×1 kernel without padding
    /// (which needs no im2col), no FMA at this SIMD level, output channels
    /// not a multiple of 16, an image's few channels or a small plane.
    pub(super) fn plan(g: &Geometry) -> Option<Self> {
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
        let pointwise = g.kh == 1 && g.kw == 1 && g.padding == 0;
        let takes = g.stride == 1
            && !pointwise
            && g.o.is_multiple_of(block_channels(level))
            && g.c >= MIN_CHANNELS
            && g.p() >= MIN_PIXELS;
        takes.then_some(Self { g: *g, level })
    }

    /// Width of a padded row.
    fn wp(&self) -> usize {
        self.g.w + 2 * self.g.padding
    }

    /// Values per padded input plane.
    fn plane(&self) -> usize {
        (self.g.h + 2 * self.g.padding) * self.wp()
    }

    /// Output pixels per plane rounded up to whole tiles.
    fn p_tiles(&self) -> usize {
        self.g.p().next_multiple_of(NP)
    }

    /// Each output pixel's offset in the padded plane (its top-left tap),
    /// the last one repeated up to whole tiles (computing it again and
    /// storing it past the plane's end, where nothing reads it).
    fn pixels(&self) -> Vec<usize> {
        let (ow, wp) = (self.g.ow, self.wp());
        let mut v: Vec<usize> = (0..self.g.p()).map(|q| q / ow * wp + q % ow).collect();
        let last = *v.last().expect("a plane has at least one output pixel");
        v.resize(self.p_tiles(), last);
        v
    }
}

/// `out[n, o, :, :] = Σ_c,i,j kernel[o, c, i, j] · x[n, c, y+i-pad, x+j-pad]`
/// with zero padding, written in full; `finish(row, planes)` then runs on
/// each task's output planes (`row` = `image·O + first channel`: all of an
/// image's, or a share of them when there are fewer images than threads)
/// while they are in cache.
pub(super) fn forward(
    d: &Direct,
    x: &[f32],
    kernel: &[f32],
    out: &mut [MaybeUninit<f32>],
    finish: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) {
    let plane = d.plane();
    let padded = pad_input(d, x, plane);
    let (weights, offset) = pack_kernel(d, kernel);
    let weights = &weights[offset..offset + kernel.len()];
    let taps: Vec<usize> = (0..d.g.kh)
        .flat_map(|i| (0..d.g.kw).map(move |j| i * d.wp() + j))
        .collect();
    let pixels = d.pixels();
    let p = d.g.p();
    // One task per image, or, with fewer images than threads (inference
    // on a few images), each image's blocks of output channels shared out.
    let bc = block_channels(d.level);
    let blocks = d.g.o / bc;
    let per_image = rayon::current_num_threads()
        .div_ceil(d.g.n)
        .clamp(1, blocks);
    let task_blocks = blocks.div_ceil(per_image);
    let per_block = d.g.c * taps.len() * bc;
    out.par_chunks_mut(d.g.o * p)
        .enumerate()
        .for_each(|(b, image_out)| {
            let image = &padded[b * d.g.c * plane..(b + 1) * d.g.c * plane];
            // The image's last share may hold fewer blocks.
            image_out
                .par_chunks_mut(task_blocks * bc * p)
                .enumerate()
                .for_each(|(share, dst)| {
                    let first = share * task_blocks;
                    let channels = dst.len() / p;
                    let w = &weights[first * per_block..][..channels / bc * per_block];
                    with_tile_scratch(d.p_tiles() * channels, |tmp| {
                        tiles(d, image, channels, w, &taps, &pixels, tmp);
                        transpose(d.level, tmp, channels, p, dst);
                    });
                    finish(b * d.g.o + first * bc, dst);
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

/// Each image's planes with `pad` zero rows and columns around them.
fn pad_input(d: &Direct, x: &[f32], plane: usize) -> Vec<f32> {
    let (h, w, pad, wp) = (d.g.h, d.g.w, d.g.padding, d.wp());
    let mut out = Uninit::new(d.g.n * d.g.c * plane);
    out.as_mut_slice()
        .par_chunks_mut(plane)
        .zip(x.par_chunks(h * w))
        .for_each(|(dst, src)| {
            let (top, rest) = dst.split_at_mut(pad * wp);
            let (rows, bottom) = rest.split_at_mut(h * wp);
            top.iter_mut().chain(bottom.iter_mut()).for_each(|v| {
                v.write(0.0);
            });
            for (dst, src) in rows.chunks_mut(wp).zip(src.chunks(w)) {
                let (left, rest) = dst.split_at_mut(pad);
                let (mid, right) = rest.split_at_mut(w);
                left.iter_mut().chain(right.iter_mut()).for_each(|v| {
                    v.write(0.0);
                });
                for (v, &s) in mid.iter_mut().zip(src) {
                    v.write(s);
                }
            }
        });
    // SAFETY: every plane's values were written: padding rows, then each
    // row's padding and pixels.
    unsafe { out.finish() }
}

/// Floats per 64-byte cache line.
const LINE: usize = 16;

/// `len` floats starting on a cache line: a buffer and the offset of the
/// aligned start in it. With `B` a multiple of 16, every weight vector the
/// microkernel loads is then one line, never two.
fn aligned(len: usize) -> (Vec<f32>, usize) {
    let buf = vec![0f32; len + LINE];
    let offset = buf.as_ptr().align_offset(LINE * std::mem::size_of::<f32>());
    assert!(
        offset < LINE,
        "an f32 buffer can be aligned to a cache line"
    );
    (buf, offset)
}

/// The kernel `[O, C, kh, kw]` as `[O/B, C, kh·kw, B]`, in an aligned buffer
/// (see [`aligned`]).
fn pack_kernel(d: &Direct, kernel: &[f32]) -> (Vec<f32>, usize) {
    let taps = d.g.kh * d.g.kw;
    let bc = block_channels(d.level);
    let (mut buf, offset) = aligned(kernel.len());
    buf[offset..offset + kernel.len()]
        .par_chunks_mut(d.g.c * taps * bc)
        .enumerate()
        .for_each(|(block, dst)| {
            for (i, v) in dst.iter_mut().enumerate() {
                let (ct, co) = (i / bc, i % bc);
                let o = block * bc + co;
                *v = kernel[o * d.g.c * taps + ct];
            }
        });
    (buf, offset)
}

/// One image: every tile of [`NP`] output pixels for each block of the
/// `channels` output channels whose weights `w` holds, into `tmp` (`[P
/// rounded up to tiles, channels]`, pixel-major).
fn tiles(
    d: &Direct,
    image: &[f32],
    channels: usize,
    w: &[f32],
    taps: &[usize],
    pixels: &[usize],
    tmp: &mut [f32],
) {
    let plane = d.plane();
    assert_eq!(image.len(), d.g.c * plane);
    assert_eq!(channels % block_channels(d.level), 0);
    assert_eq!(w.len(), channels * d.g.c * taps.len());
    assert_eq!(pixels.len() % NP, 0);
    assert_eq!(tmp.len(), pixels.len() * channels);
    let tap_max = taps.iter().max().copied().unwrap_or(0);
    // Every pixel's reads stay inside its padded plane.
    assert!(pixels.iter().all(|&q| q + tap_max < plane));
    let args = (d.g.c, plane, channels, image, w, taps, pixels);
    #[cfg(target_arch = "x86_64")]
    match d.level {
        // SAFETY: the level was detected on this CPU; the asserts above
        // bound every read, and `tmp` has a row of `channels` values per pixel.
        SimdLevel::Avx512 => unsafe { x86::tiles_avx512(args, tmp) },
        // SAFETY: as above.
        SimdLevel::Avx2 => unsafe { x86::tiles_avx2(args, tmp) },
        SimdLevel::Baseline => unreachable!("Direct::plan refuses the baseline level"),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (args, tmp);
        unreachable!("Direct::plan refuses the baseline level")
    }
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

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CHANNEL_CHUNK, NP, TileArgs, transpose_scalar};
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
        for q0 in (0..full).step_by(8) {
            for o0 in (0..channels).step_by(8) {
                // SAFETY: rows q0..q0 + 8 of `src` and columns q0..q0 + 8
                // of rows o0..o0 + 8 of `dst` lie inside them (see above).
                unsafe {
                    let s = src.as_ptr().add(q0 * channels + o0);
                    let r = |i: usize| _mm256_loadu_ps(s.add(i * channels));
                    let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
                    let (r4, r5, r6, r7) = (r(4), r(5), r(6), r(7));
                    // Pairs of rows interleaved, then pairs of pairs: each
                    // 128-bit lane holds four rows' values of one channel.
                    let t0 = _mm256_unpacklo_ps(r0, r1);
                    let t1 = _mm256_unpackhi_ps(r0, r1);
                    let t2 = _mm256_unpacklo_ps(r2, r3);
                    let t3 = _mm256_unpackhi_ps(r2, r3);
                    let t4 = _mm256_unpacklo_ps(r4, r5);
                    let t5 = _mm256_unpackhi_ps(r4, r5);
                    let t6 = _mm256_unpacklo_ps(r6, r7);
                    let t7 = _mm256_unpackhi_ps(r6, r7);
                    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                    let d = out.add(o0 * p + q0);
                    // Low lanes are channels 0..4, high lanes 4..8.
                    _mm256_storeu_ps(d, _mm256_permute2f128_ps::<0x20>(s0, s4));
                    _mm256_storeu_ps(d.add(p), _mm256_permute2f128_ps::<0x20>(s1, s5));
                    _mm256_storeu_ps(d.add(2 * p), _mm256_permute2f128_ps::<0x20>(s2, s6));
                    _mm256_storeu_ps(d.add(3 * p), _mm256_permute2f128_ps::<0x20>(s3, s7));
                    _mm256_storeu_ps(d.add(4 * p), _mm256_permute2f128_ps::<0x31>(s0, s4));
                    _mm256_storeu_ps(d.add(5 * p), _mm256_permute2f128_ps::<0x31>(s1, s5));
                    _mm256_storeu_ps(d.add(6 * p), _mm256_permute2f128_ps::<0x31>(s2, s6));
                    _mm256_storeu_ps(d.add(7 * p), _mm256_permute2f128_ps::<0x31>(s3, s7));
                }
            }
        }
        transpose_scalar(src, channels, full, p, dst);
    }

    /// [`NP`] pixels × `$nv` vectors of output channels at a time: 6 × 4
    /// with AVX-512's 32 registers, 6 × 2 with AVX2's 16.
    macro_rules! tiles_impl {
        ($name:ident, $feature:literal, $reg:ty, $lanes:literal, $nv:literal, $zero:ident, $load:ident, $set1:ident, $fmadd:ident, $store:ident) => {
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
                for first in (0..c).step_by(CHANNEL_CHUNK) {
                    let chunk = CHANNEL_CHUNK.min(c - first);
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
                            for ci in first..first + chunk {
                                // SAFETY: per the contract, every read below
                                // stays inside plane `ci`.
                                let base = unsafe { image.as_ptr().add(ci * plane) };
                                for &tap in taps {
                                    unsafe {
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
                                        wp = wp.add(B);
                                    }
                                }
                            }
                            for (k, acc) in acc.iter().enumerate() {
                                for v in 0..NV {
                                    unsafe { $store(out.add(k * o + v * L), acc[v]) };
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
