//! Winograd's F(4×4, 3×3): the larger tiles of the same idea as
//! `winograd.rs`, for the 3×3 stride-1 convolutions with one pixel of
//! padding whose planes it covers with little waste.
//!
//! Each output plane is cut into 4×4 tiles. A tile's 16 outputs depend on
//! a 6×6 patch `d` of each input plane; with the kernel `g` transformed once
//! into `U = G·g·Gᵀ` (6×6) and each patch into `V = Bᵀ·d·B`, the tile is
//! `Aᵀ·(Σ_c U ⊙ V)·A`, with
//!
//! ```text
//! Bᵀ = [4  0 -5  0 1 0]   G = [ 1/4     0    0 ]   Aᵀ = [1 1  1 1  1 0]
//!      [0 -4 -4  1 1 0]       [-1/6 -1/6 -1/6 ]        [0 1 -1 2 -2 0]
//!      [0  4 -4 -1 1 0]       [-1/6  1/6 -1/6 ]        [0 1  1 4  4 0]
//!      [0 -2 -1  2 1 0]       [1/24 1/12  1/6 ]        [0 1 -1 8 -8 1]
//!      [0  2 -1 -2 1 0]       [1/24 -1/12 1/6 ]
//!      [0  4  0 -5 0 1]       [   0    0    1 ]
//! ```
//!
//! (the points 0, ±1, ±2 and ∞). The sum over input channels is, for each
//! of the 36 positions, a product `[tiles, C] × [C, O]` on the direct
//! kernel, as in F(2×2, 3×3): 36 multiplications per tile and channel
//! pair for 16 outputs, where F(2×2, 3×3) needs 64 and the definition
//! 144.
//!
//! The price is rounding: the transforms' coefficients reach 8 and 1/24,
//! so each output is a combination of 36 sums with larger weights. In
//! `tests/direct_conv.rs` the largest error is 2.5–7.2e-6 of the largest
//! output, about ten times F(2×2, 3×3)'s, inside the test's bound of 1e-5.
//!
//! The transforms are plain loops that the compiler vectorises, the same
//! operations in the same order at every SIMD level, so AVX2 and AVX-512
//! give the same bits. The input transform takes [`LANES`] tiles at a
//! time, each patch value gathered through a table, made once per chunk
//! of tiles, of offsets and keep-masks (all zeros where the patch reaches
//! past the plane, so no padded copy of the input is needed); the output
//! transform takes [`LANES`] output channels of one tile at a time and
//! writes its rows into the planes through 8 × 8 register transposes.

use std::mem::MaybeUninit;

use super::conv::Geometry;
use super::direct::{self, Direct, NP, Task};
use super::simd::simd_kernel;
use super::winograd::MAX_BLOCK;

/// Positions of the 6×6 transformed tile.
const XI: usize = 36;

/// Tiles (input transform) or output channels (output transform) per
/// step of the transforms' loops: one AVX-512 vector, two of AVX2.
const LANES: usize = 16;

/// Bytes of transformed inputs and products per chunk of tiles: about
/// half of a core's L2.
const CHUNK_BYTES: usize = 1 << 20;

/// Tiles per chunk at least, even where their transformed inputs and
/// products outgrow L2 (wide layers): each position's transformed kernel
/// is read once per chunk.
const MIN_CHUNK_TILES: usize = 48;

/// Tiles per task at least, where the batch has images enough.
const MIN_TILES: usize = 48;

/// Tile rows and columns of a plane (the last ones cut off where the plane
/// is not a multiple of 4).
pub(super) fn tile_grid(g: &Geometry) -> (usize, usize) {
    (g.oh.div_ceil(4), g.ow.div_ceil(4))
}

/// Output pixels per plane above which F(2×2, 3×3) is kept: its
/// transforms, hand-written for AVX2 (`winograd.rs`), stream large planes
/// faster than these.
const MAX_PLANE_PIXELS: usize = 32 * 32;

/// Whether F(4×4, 3×3) beats F(2×2, 3×3) on this convolution's planes
/// (the caller has checked that Winograd applies): at most three quarters
/// of F(2×2, 3×3)'s products, since its transforms cost more per tile,
/// on planes of at most [`MAX_PLANE_PIXELS`]. 16×16, 8×8, 4×4 and 7×7
/// planes need 0.56 times the products, 14×14 0.73; 2×2 planes 2.25
/// times, 5×5 or 6×6 as many. Measured on two cores (AVX-512, forward,
/// F(4×4, 3×3) against F(2×2, 3×3), ms): 64 → 64 channels at 16×16,
/// batch 64, 2.06 against 2.70; 128 → 128 at 8×8 2.28 against 3.18; 256
/// → 256 at 4×4 2.99 against 3.43; 512 → 512 at 7×7 32.0 against 42.4;
/// 256 → 256 at 14×14 28.2 against 31.4; at batch 32, 128 → 128 at 28×28
/// 16.3 against 17.4, but 64 → 64 at 56×56 20.9 against 18.5.
pub(super) fn beats_small_tiles(g: &Geometry) -> bool {
    let (th, tw) = tile_grid(g);
    let small = g.oh.div_ceil(2) * g.ow.div_ceil(2);
    g.p() <= MAX_PLANE_PIXELS && 4 * XI * th * tw <= 3 * 16 * small
}

/// Images per task: enough for [`MIN_TILES`] tiles, in a number of tasks
/// that is a multiple of the threads, and one where there are fewer
/// images than threads (see `winograd::images_per_task`).
pub(super) fn images_per_task(g: &Geometry, threads: usize) -> usize {
    let (th, tw) = tile_grid(g);
    super::winograd::images_per_task_of(g.n, th * tw, MIN_TILES, threads)
}

/// The kernel `[O, C, 3, 3]` transformed, `U = G·g·Gᵀ`, laid out `[36,
/// O/B, C, B]` (for each position, the direct kernel's packing of a 1×1
/// kernel) in a cache-line aligned buffer: the buffer and the offset of
/// its start. With `flipped`, the kernel is the `W` of a stride-1 input
/// gradient and its turned kernel is transformed (see
/// `direct::forward_flipped`).
pub(super) fn transform_kernel(d: &Direct, kernel: &[f32], flipped: bool) -> (Vec<f32>, usize) {
    let scratch = [[[0f32; MAX_BLOCK]; 6]; 3];
    super::winograd::transform_kernel_with::<XI, _>(d, kernel, flipped, scratch, kernel_channel)
}

simd_kernel!(
    /// One input channel of one block: `taps` is `[9, B]`; position `ξ`'s
    /// `B` values go to `u[ξ]`; `rows` is scratch.
    fn kernel_channel => kernel_channel_body(
        taps: &[f32],
        b: usize,
        rows: &mut [[[f32; MAX_BLOCK]; 6]; 3],
        u: [&mut [f32]; XI],
    )
);

/// Row `r` of `G` applied to `(v0, v1, v2)`, lane by lane.
#[inline(always)]
fn g_row(r: usize, v0: &[f32], v1: &[f32], v2: &[f32], out: &mut [f32]) {
    let lanes = out.iter_mut().zip(v0).zip(v1).zip(v2);
    match r {
        0 => lanes.for_each(|(((o, &a), _), _)| *o = a * 0.25),
        1 => lanes.for_each(|(((o, &a), &b), &c)| *o = -(a + b + c) / 6.0),
        2 => lanes.for_each(|(((o, &a), &b), &c)| *o = -(a - b + c) / 6.0),
        3 => lanes.for_each(|(((o, &a), &b), &c)| *o = a / 24.0 + b / 12.0 + c / 6.0),
        4 => lanes.for_each(|(((o, &a), &b), &c)| *o = a / 24.0 - b / 12.0 + c / 6.0),
        _ => lanes.for_each(|(((o, _), _), &c)| *o = c),
    }
}

#[inline(always)]
fn kernel_channel_body(
    taps: &[f32],
    b: usize,
    rows: &mut [[[f32; MAX_BLOCK]; 6]; 3],
    u: [&mut [f32]; XI],
) {
    super::winograd::separable_kernel(taps, b, rows, u, g_row);
}

/// `Bᵀ·(d0, …, d5)` for lane `l` of six rows of lanes, into six rows.
#[inline(always)]
fn bt(d: [&[f32; LANES]; 6], l: usize) -> [f32; 6] {
    let (d0, d1, d2, d3, d4, d5) = (d[0][l], d[1][l], d[2][l], d[3][l], d[4][l], d[5][l]);
    [
        4.0 * d0 - 5.0 * d2 + d4,
        -4.0 * d1 - 4.0 * d2 + d3 + d4,
        4.0 * d1 - 4.0 * d2 - d3 + d4,
        -2.0 * d1 - d2 + 2.0 * d3 + d4,
        2.0 * d1 - d2 - 2.0 * d3 + d4,
        4.0 * d1 - 5.0 * d3 + d5,
    ]
}

/// `Aᵀ·(m0, …, m5)` for lane `l` of six rows of lanes.
#[inline(always)]
fn at(m: [&[f32; LANES]; 6], l: usize) -> [f32; 4] {
    let (m0, m1, m2, m3, m4, m5) = (m[0][l], m[1][l], m[2][l], m[3][l], m[4][l], m[5][l]);
    [
        m0 + m1 + m2 + m3 + m4,
        m1 - m2 + 2.0 * m3 - 2.0 * m4,
        m1 + m2 + 4.0 * m3 + 4.0 * m4,
        m1 - m2 + 8.0 * m3 - 8.0 * m4 + m5,
    ]
}

/// The reads of one group of [`LANES`] tiles' patches, the same in every
/// input channel: for position `k = 6·a + col` of the 6×6 patch and lane
/// `l`, the offset of the value in the channel's plane from the task's
/// first image (any value inside the plane where the patch's lies
/// outside), and all ones where it lies inside (all zeros outside).
#[derive(Clone, Copy)]
struct Gather {
    at: [[i32; LANES]; XI],
    keep: [[u32; LANES]; XI],
}

impl Gather {
    /// The reads of `tiles` (`LANES` of them at most; the last one
    /// repeated after them) in images `h × w`, `image` values apart.
    fn new(tiles: &[TilePos], (h, w): (usize, usize), image: usize) -> Self {
        let mut g = Self {
            at: [[0; LANES]; XI],
            keep: [[0; LANES]; XI],
        };
        for l in 0..LANES {
            let t = tiles[l.min(tiles.len() - 1)];
            for a in 0..6 {
                for col in 0..6 {
                    let (y, x) = (
                        (4 * t.ty + a).wrapping_sub(1),
                        (4 * t.tx + col).wrapping_sub(1),
                    );
                    let inside = y < h && x < w;
                    let at = t.image * image + if inside { y * w + x } else { 0 };
                    g.at[a * 6 + col][l] =
                        i32::try_from(at).expect("a task's images within i32 offsets");
                    g.keep[a * 6 + col][l] = if inside { u32::MAX } else { 0 };
                }
            }
        }
        g
    }
}

simd_kernel!(
    /// The input transform of one chunk's tiles: for each input channel
    /// `ci` and tile `t` (its reads `gathers[t / LANES]`, in the images
    /// `x`, channels `plane` apart), `V = Bᵀ·d·B`, with zeros for the
    /// patch's values outside the plane, into `v[ci·36·stride + ξ·stride +
    /// t]` (the last group's repeated tiles too, up to `stride`).
    fn input_tiles => input_tiles_body(
        x: &[f32],
        gathers: &[Gather],
        channels: (usize, usize),
        v: &mut [f32],
        stride: usize,
    )
);

// The lane loops write lane `l` of several rows at once.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn input_tiles_body(
    x: &[f32],
    gathers: &[Gather],
    (c, plane): (usize, usize),
    v: &mut [f32],
    stride: usize,
) {
    assert!(gathers.len() <= stride.div_ceil(LANES) && v.len() >= c * XI * stride);
    // Every read lies in `x`, the last channel's too.
    let most = gathers
        .iter()
        .flat_map(|g| g.at.iter().flatten())
        .map(|&at| at as usize)
        .max()
        .unwrap_or(0);
    assert!(c == 0 || (c - 1) * plane + most < x.len());
    // Scratch for one group: written in full before each read.
    let mut down = [[0f32; LANES]; XI];
    let mut rows = [[0f32; LANES]; 6];
    let mut out = [[0f32; LANES]; 6];
    for ci in 0..c {
        let xc = x[ci * plane..].as_ptr();
        for (group, g) in gathers.iter().enumerate() {
            // Down the patch's rows, column by column, then along them.
            for col in 0..6 {
                for (a, row) in rows.iter_mut().enumerate() {
                    let (at, keep) = (&g.at[a * 6 + col], &g.keep[a * 6 + col]);
                    for ((d, &at), &keep) in row.iter_mut().zip(at).zip(keep) {
                        // SAFETY: `at ≤ most`, inside this channel's share
                        // of `x` (asserted above).
                        let value = unsafe { *xc.add(at as usize) };
                        *d = f32::from_bits(value.to_bits() & keep);
                    }
                }
                let rows = std::array::from_fn(|a| &rows[a]);
                for l in 0..LANES {
                    let r = bt(rows, l);
                    for (a, r) in r.into_iter().enumerate() {
                        down[a * 6 + col][l] = r;
                    }
                }
            }
            let first = ci * XI * stride + group * LANES;
            let n = LANES.min(stride - group * LANES);
            for a in 0..6 {
                let cols = std::array::from_fn(|col| &down[a * 6 + col]);
                for l in 0..LANES {
                    let r = bt(cols, l);
                    for (col, r) in r.into_iter().enumerate() {
                        out[col][l] = r;
                    }
                }
                for (col, out) in out.iter().enumerate() {
                    let at = first + (a * 6 + col) * stride;
                    if n == LANES {
                        let dst: &mut [f32; LANES] =
                            (&mut v[at..at + LANES]).try_into().expect("a whole group");
                        *dst = *out;
                    } else {
                        v[at..at + n].copy_from_slice(&out[..n]);
                    }
                }
            }
        }
    }
}

/// Where a tile's outputs go: its image among the task's, and its tile
/// row and column.
#[derive(Clone, Copy, Debug)]
struct TilePos {
    image: usize,
    ty: usize,
    tx: usize,
}

simd_kernel!(
    /// The output transform of one chunk's tiles: for tile `t` at
    /// `tiles[t]` and each output channel, `Aᵀ·M·A` of the products `m`
    /// (`[36, stride, oc]`, pixel-major) into the task's planes `dst`
    /// (`[images, oc, h·w]`), the tile's rows and columns past the plane
    /// left out. `avx`: the CPU has AVX (for the stores' transposes).
    fn output_tiles => output_tiles_body(
        m: &[f32],
        stride: usize,
        oc: usize,
        tiles: &[TilePos],
        plane: (usize, usize),
        dst: &mut [MaybeUninit<f32>],
        avx: bool,
    )
);

// The lane loops write lane `l` of several rows at once.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn output_tiles_body(
    m: &[f32],
    stride: usize,
    oc: usize,
    tiles: &[TilePos],
    (h, w): (usize, usize),
    dst: &mut [MaybeUninit<f32>],
    avx: bool,
) {
    assert!(oc.is_multiple_of(LANES) && tiles.len() <= stride);
    assert!(m.len() >= XI * stride * oc);
    let p = h * w;
    // Scratch: written in full before each read.
    let mut along = [[0f32; LANES]; 24];
    let mut y = [[0f32; LANES]; 16];
    for (t, pos) in tiles.iter().enumerate() {
        let (y0, x0) = (4 * pos.ty, 4 * pos.tx);
        let (rows, cols) = ((h - y0).min(4), (w - x0).min(4));
        assert!(rows > 0 && cols > 0 && (pos.image + 1) * oc * p <= dst.len());
        for o0 in (0..oc).step_by(LANES) {
            // Position ξ's `LANES` products, read in place.
            let mm = |xi: usize| -> &[f32; LANES] {
                let at = (xi * stride + t) * oc + o0;
                (&m[at..at + LANES]).try_into().expect("LANES values")
            };
            // Along each row of M (its columns), then down.
            for a in 0..6 {
                let cols = std::array::from_fn(|col| mm(a * 6 + col));
                for l in 0..LANES {
                    let r = at(cols, l);
                    for (x, r) in r.into_iter().enumerate() {
                        along[a * 4 + x][l] = r;
                    }
                }
            }
            for x in 0..4 {
                let rows = std::array::from_fn(|a| &along[a * 4 + x]);
                for l in 0..LANES {
                    let r = at(rows, l);
                    for (yy, r) in r.into_iter().enumerate() {
                        y[yy * 4 + x][l] = r;
                    }
                }
            }
            let first = (pos.image * oc + o0) * p + y0 * w + x0;
            // The `LANES` planes' runs of the tile: `first + l·p + yy·w ..
            // + cols` for `l < LANES`, `yy < rows`.
            let span = (LANES - 1) * p + (rows - 1) * w + cols;
            let out = &mut dst[first..first + span];
            #[cfg(target_arch = "x86_64")]
            if avx {
                // SAFETY: the caller saw AVX on this CPU; every store lies
                // in `out` (see `store_tile`).
                unsafe { x86::store_tile(&y, out, p, w, rows, cols) };
                continue;
            }
            let _ = avx;
            for l in 0..LANES {
                for yy in 0..rows {
                    let row = l * p + yy * w;
                    for (x, d) in out[row..row + cols].iter_mut().enumerate() {
                        d.write(y[yy * 4 + x][l]);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::LANES;
    use crate::cpu::direct::x86::transpose8;
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// One tile's outputs `y` (`[16 pixels, LANES channels]`, pixels row by
    /// row) into `out`: channel `l`'s row `yy` at `l·p + yy·w`, its first
    /// `cols` values, for `yy < rows`; in 8 × 8 register transposes (eight
    /// pixels, two rows of the tile, of eight channels at a time).
    ///
    /// # Safety
    /// The CPU must have AVX; `out` holds `(LANES − 1)·p + (rows − 1)·w +
    /// cols` values, `rows` and `cols` are 1 to 4.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn store_tile(
        y: &[[f32; LANES]; 16],
        out: &mut [MaybeUninit<f32>],
        p: usize,
        w: usize,
        rows: usize,
        cols: usize,
    ) {
        assert!((1..=4).contains(&rows) && (1..=4).contains(&cols));
        assert!(out.len() >= (LANES - 1) * p + (rows - 1) * w + cols);
        let base = out.as_mut_ptr().cast::<f32>();
        for half in 0..LANES / 8 {
            for pair in 0..rows.div_ceil(2) {
                // SAFETY: each row of `y` holds `LANES` values.
                let pixels: [__m256; 8] = std::array::from_fn(|i| unsafe {
                    _mm256_loadu_ps(y[8 * pair + i].as_ptr().add(8 * half))
                });
                // SAFETY: AVX, per this function's contract.
                let channels = unsafe { transpose8(pixels) };
                for (j, v) in channels.into_iter().enumerate() {
                    let halves = [_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v)];
                    for (k, half_row) in halves.into_iter().enumerate() {
                        let yy = 2 * pair + k;
                        if yy >= rows {
                            break;
                        }
                        let at = (8 * half + j) * p + yy * w;
                        // SAFETY: `at + cols ≤ out.len()` (asserted above).
                        unsafe {
                            if cols == 4 {
                                _mm_storeu_ps(base.add(at), half_row);
                            } else {
                                let mut tmp = [0f32; 4];
                                _mm_storeu_ps(tmp.as_mut_ptr(), half_row);
                                std::ptr::copy_nonoverlapping(tmp.as_ptr(), base.add(at), cols);
                            }
                        }
                    }
                }
            }
        }
    }
}

thread_local! {
    /// This thread's transformed inputs and products.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// One task of `direct::for_each_task`: images `task.images` of `x` (`[N,
/// C, H, W]`), output channel blocks `task.blocks`, with the transformed
/// kernel `u` (see [`transform_kernel`]), into `dst`, the task's output
/// planes `[images, channels, H·W]`, every value written.
pub(super) fn task(d: &Direct, x: &[f32], u: &[f32], task: &Task, dst: &mut [MaybeUninit<f32>]) {
    let (images, blocks) = (task.images.clone(), task.blocks.clone());
    let g = d.geometry();
    let (c, h, w, o) = (g.c, g.h, g.w, g.o);
    let (th, tw) = tile_grid(g);
    let plane = h * w;
    let b = d.block();
    let oc = blocks.len() * b;
    let image_len = c * plane;
    assert!(x.len() >= images.end * image_len);
    assert_eq!(dst.len(), images.len() * oc * g.p());
    assert_eq!(u.len(), XI * o * c);
    let x = &x[images.start * image_len..images.end * image_len];
    let total = images.len() * th * tw;
    let chunk_tiles = (CHUNK_BYTES / (4 * XI * (c + oc))).max(MIN_CHUNK_TILES);
    let chunks = total.div_ceil(chunk_tiles);
    let per_chunk = total.div_ceil(chunks);
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let (v, m) = &mut *s;
        for t0 in (0..total).step_by(per_chunk) {
            let tiles = per_chunk.min(total - t0);
            // Whole tiles for the kernel: the last tile's offset repeated,
            // computed again into rows nothing reads.
            let stride = tiles.next_multiple_of(NP);
            let pixels: Vec<usize> = (0..stride).map(|t| t.min(tiles - 1)).collect();
            let pos: Vec<TilePos> = (t0..t0 + tiles)
                .map(|t| TilePos {
                    image: t / (th * tw),
                    ty: t / tw % th,
                    tx: t % tw,
                })
                .collect();
            let gathers: Vec<Gather> = pos
                .chunks(LANES)
                .map(|tiles| Gather::new(tiles, (h, w), image_len))
                .collect();
            v.resize(XI * c * stride, 0.0);
            m.resize(XI * stride * oc, 0.0);
            input_tiles(x, &gathers, (c, plane), v, stride);
            for xi in 0..XI {
                let weights = &u[xi * o * c..(xi + 1) * o * c];
                direct::products(
                    d.level(),
                    c,
                    XI * stride,
                    oc,
                    // Position ξ of every channel: from ξ on, 36 rows apart.
                    &v[xi * stride..],
                    &weights[blocks.start * c * b..blocks.end * c * b],
                    &pixels,
                    &mut m[xi * stride * oc..(xi + 1) * stride * oc],
                );
            }
            let avx = d.level() >= super::simd::SimdLevel::Avx2;
            output_tiles(m, stride, oc, &pos, (g.oh, g.ow), dst, avx);
        }
    });
}
