//! Winograd's minimal filtering, F(2×2, 3×3), for the 3×3 stride-1
//! convolutions with one pixel of padding that make up most of a ResNet
//! (and whose input gradients are such convolutions too, see `conv.rs`).
//!
//! Each output plane is cut into 2×2 tiles. A tile's outputs depend on a
//! 4×4 patch `d` of each input plane; with the kernel `g` transformed once
//! into `U = G·g·Gᵀ` (4×4) and each patch into `V = Bᵀ·d·B`, the tile is
//! `Aᵀ·(Σ_c U ⊙ V)·A`. The sum over input channels is, for each of the 16
//! positions `ξ` of the 4×4, a product `[tiles, C] × [C, O]`: 16
//! multiplications per tile and channel pair where the definition needs
//! 36 for the tile's four outputs, 2.25 times fewer. The transforms are
//! additions and subtractions (and halvings in `G`), linear in the number
//! of values.
//!
//! The products run on the direct kernel (`direct.rs`) as 1×1
//! convolutions, pixel-major. The input transform reads each tile row's
//! patches straight from the image, its zero padding supplied by masked
//! loads, and writes all 16 positions of a channel side by side; the output
//! transform reads each tile's 16 rows of `O` values as vectors and writes
//! the output planes directly, eight tiles × eight channels at a time
//! turned by register transposes. A task's tiles are handled in chunks of
//! whole tile rows whose transformed inputs and products stay in L2.
//!
//! Rounding differs from the definition's: inputs and kernel are combined
//! before they are multiplied, and each output is a combination of 16
//! sums. In `tests/direct_conv.rs` the largest error is 1.5–2.2e-7 of the
//! largest output, where im2col + `gemm` gives 2.5–7.6e-7 on the same
//! cases (the test's bound is 1e-5 for every kernel). The transforms are
//! the same additions in the same order at every SIMD level, and the
//! products the direct kernel's, so AVX2 and AVX-512 give the same bits.
//! [`set_winograd`] (or `MULTILABEL_WINOGRAD=0`) turns the path off,
//! leaving these convolutions to the direct kernel or im2col + `gemm`.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU8, Ordering};

use super::block::add_into;
use super::conv::Geometry;
use super::direct::{self, Direct, NP, Task};
use super::simd::simd_kernel;

/// Tiles per convolution below which im2col + `gemm` or the direct kernel
/// is kept: the kernel's transform costs as much whatever the batch, and
/// the saving grows with the tiles. Measured on two cores (AVX-512, batch
/// 64 unless said; forward, Winograd against the other path, two runs):
/// 512 → 512 channels at 2×2 (64 tiles) 4.35 / 4.52 against 4.26 / 4.34
/// ms; at 4×4 (256 tiles) 11.0 / 10.4 against 12.1 / 13.0; 256 → 256 at
/// 4×4 3.0 / 3.0 against 3.3 / 3.3; at 8×8, batch 16 (256 tiles) 2.8 /
/// 2.9 against 3.2 / 3.5; 512 → 512 at 7×7, batch 32 (512 tiles) 20.5 /
/// 20.9 against 23.7 / 21.6.
const MIN_TOTAL_TILES: usize = 256;

/// Tiles per task at least, where the batch has images enough: a task's
/// transformed kernel (`16·C·O` values) is read once per chunk of tiles,
/// so few tiles per chunk would make the products wait on memory.
const MIN_TILES: usize = 96;

/// Bytes of transformed inputs and products per chunk of tiles: about
/// half of a core's L2.
const CHUNK_BYTES: usize = 1 << 20;

/// Tiles per chunk at least, even where their transformed inputs and
/// products outgrow L2 (wide layers): each position's transformed kernel
/// is read once per chunk.
const MIN_CHUNK_TILES: usize = 96;

/// Positions of the 4×4 transformed tile.
const XI: usize = 16;

/// 0: not yet read from the environment; 1: on; 2: off.
static ENABLED: AtomicU8 = AtomicU8::new(0);

/// Whether 3×3 stride-1 convolutions take the Winograd path (at AVX2 and
/// AVX-512): on unless `MULTILABEL_WINOGRAD` is `0`, `off` or `false`, or
/// [`set_winograd`] turned it off.
pub fn winograd_enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let off = std::env::var("MULTILABEL_WINOGRAD")
                .is_ok_and(|v| matches!(v.trim(), "0" | "off" | "false"));
            ENABLED.store(if off { 2 } else { 1 }, Ordering::Relaxed);
            !off
        }
    }
}

/// Turns the Winograd path on or off (for comparisons and tests); returns
/// whether it was on.
pub fn set_winograd(on: bool) -> bool {
    let before = winograd_enabled();
    ENABLED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    before
}

/// 0: not yet read from the environment; 1: on; 2: off.
static LARGE_TILES: AtomicU8 = AtomicU8::new(0);

/// Whether the Winograd path may take F(4×4, 3×3) (`winograd4.rs`) where
/// its tiles fit the planes: on unless `MULTILABEL_WINOGRAD_4X4` is `0`,
/// `off` or `false`, or [`set_winograd_large_tiles`] turned it off.
pub(super) fn large_tiles_enabled() -> bool {
    match LARGE_TILES.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let off = std::env::var("MULTILABEL_WINOGRAD_4X4")
                .is_ok_and(|v| matches!(v.trim(), "0" | "off" | "false"));
            LARGE_TILES.store(if off { 2 } else { 1 }, Ordering::Relaxed);
            !off
        }
    }
}

/// Lets the Winograd path take F(4×4, 3×3) or keeps it to F(2×2, 3×3)
/// (for comparisons and tests); returns whether it was allowed.
pub fn set_winograd_large_tiles(on: bool) -> bool {
    let before = large_tiles_enabled();
    LARGE_TILES.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    before
}

/// Whether the convolution takes this path, with output channels in
/// blocks of `block`.
pub(super) fn applies(g: &Geometry, block: usize) -> bool {
    (g.kh, g.kw, g.stride, g.padding) == (3, 3, 1, 1)
        && g.c >= direct::MIN_CHANNELS
        && g.o.is_multiple_of(block)
        && g.n * tiles_per_image(g) >= MIN_TOTAL_TILES
        && winograd_enabled()
}

/// Tiles per image.
fn tiles_per_image(g: &Geometry) -> usize {
    let (th, tw) = tile_grid(g);
    th * tw
}

/// Tile rows and columns of a plane (the last ones cut off where the plane
/// is odd).
fn tile_grid(g: &Geometry) -> (usize, usize) {
    (g.oh.div_ceil(2), g.ow.div_ceil(2))
}

/// Images per task: enough for [`MIN_TILES`] tiles, in a number of tasks
/// that is a multiple of the threads (so none waits on a last one), and
/// one where there are fewer images than threads (their channel blocks
/// are then shared out, see `direct::for_each_task`).
pub(super) fn images_per_task(g: &Geometry, threads: usize) -> usize {
    let (th, tw) = tile_grid(g);
    images_per_task_of(g.n, th * tw, MIN_TILES, threads)
}

/// [`images_per_task`] for `n` images of `tiles` tiles each and at least
/// `min_tiles` per task.
pub(super) fn images_per_task_of(
    n: usize,
    tiles: usize,
    min_tiles: usize,
    threads: usize,
) -> usize {
    let most = min_tiles.div_ceil(tiles).max(1);
    let tasks = n.div_ceil(most).next_multiple_of(threads.max(1));
    n.div_ceil(tasks).max(1)
}

/// The kernel `[O, C, 3, 3]` transformed, `U = G·g·Gᵀ` with `G = [[1, 0,
/// 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]`, laid out `[16, O/B, C, B]` (for
/// each position, the direct kernel's packing of a 1×1 kernel) in a
/// cache-line aligned buffer: the buffer and the offset of its start.
/// With `flipped`, the kernel is the `W` of a stride-1 input gradient and
/// its turned kernel is transformed (see `direct::forward_flipped`).
pub(super) fn transform_kernel(d: &Direct, kernel: &[f32], flipped: bool) -> (Vec<f32>, usize) {
    transform_kernel_with::<XI, _>(
        d,
        kernel,
        flipped,
        [[[0f32; MAX_BLOCK]; 4]; 3],
        kernel_channel,
    )
}

/// The kernel `[O, C, 3, 3]` (with `flipped`, see [`transform_kernel`])
/// transformed into `P` positions, laid out `[P, O/B, C, B]` in a
/// cache-line aligned buffer: the buffer and the offset of its start.
/// `channel(taps, B, scratch, runs)` transforms one input channel of one
/// block, `taps` `[9, B]`, into its `P` runs of `B` values; each task
/// starts from a copy of `scratch`.
pub(super) fn transform_kernel_with<const P: usize, S: Clone + Send + Sync>(
    d: &Direct,
    kernel: &[f32],
    flipped: bool,
    scratch: S,
    channel: impl Fn(&[f32], usize, &mut S, [&mut [f32]; P]) + Sync,
) -> (Vec<f32>, usize) {
    use rayon::prelude::*;
    let g = d.geometry();
    let (o, c, b) = (g.o, g.c, d.block());
    assert!(b <= MAX_BLOCK && kernel.len() == o * c * 9);
    // `[O/B, C, 9, B]`: each channel's nine taps, B output channels side by side.
    let (packed, offset) = direct::pack_any_kernel(d, kernel, flipped);
    let packed = &packed[offset..offset + kernel.len()];
    let blocks = o / b;
    let parts = c.div_ceil(KERNEL_CHANNELS);
    let fill = |out: &mut [MaybeUninit<f32>]| {
        let out = SharedOut(out.as_mut_ptr().cast::<f32>());
        (0..blocks * parts).into_par_iter().for_each(|i| {
            let (block, part) = (i / parts, i % parts);
            let first = part * KERNEL_CHANNELS;
            let mut scratch = scratch.clone();
            for ci in first..(first + KERNEL_CHANNELS).min(c) {
                let taps = &packed[(block * c + ci) * 9 * b..(block * c + ci + 1) * 9 * b];
                let at = (block * c + ci) * b;
                // SAFETY: the runs `ξ·O·C + at .. + b` lie in the buffer
                // (`at + b ≤ O·C`), are disjoint, and no other task writes
                // them.
                let runs = std::array::from_fn(|xi| unsafe { out.run(xi * o * c + at, b) });
                channel(taps, b, &mut scratch, runs);
            }
        });
    };
    // SAFETY: `fill` writes every value: task `(block, part)` writes
    // `U[ξ, block, ci, ..]` for every `ξ` and each of its channels.
    unsafe { direct::aligned(P * o * c, fill) }
}

/// Input channels per task of [`transform_kernel_with`].
const KERNEL_CHANNELS: usize = 32;

/// The transformed kernel's buffer, shared by tasks that write disjoint runs.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: only used by tasks that write disjoint runs (see
// `transform_kernel_with`).
unsafe impl Sync for SharedOut {}
// SAFETY: as above.
unsafe impl Send for SharedOut {}

impl SharedOut {
    /// The run of `len` values from position `at`.
    ///
    /// # Safety
    /// `at .. at + len` lies in the buffer and no other reference to it
    /// lives meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn run<'a>(self, at: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: per this function's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), len) }
    }
}

simd_kernel!(
    /// One input channel of one block: `taps` is `[9, B]`; position `ξ`'s
    /// `B` values go to `u[ξ]`; `r` is scratch.
    fn kernel_channel => kernel_channel_body(
        taps: &[f32],
        b: usize,
        r: &mut [[[f32; MAX_BLOCK]; 4]; 3],
        u: [&mut [f32]; XI],
    )
);

/// `G·(v0, v1, v2)` for every lane: row `r` of `G`, one loop per row so
/// that each is a plain vector loop.
#[inline(always)]
fn g_rows(r: usize, v0: &[f32], v1: &[f32], v2: &[f32], out: &mut [f32]) {
    let lanes = out.iter_mut().zip(v0).zip(v1).zip(v2);
    match r {
        0 => lanes.for_each(|(((o, &a), _), _)| *o = a),
        1 => lanes.for_each(|(((o, &a), &b), &c)| *o = (a + b + c) * 0.5),
        2 => lanes.for_each(|(((o, &a), &b), &c)| *o = (a - b + c) * 0.5),
        _ => lanes.for_each(|(((o, _), _), &c)| *o = c),
    }
}

/// Lanes of a block at most (AVX-512's 64 output channels).
pub(super) const MAX_BLOCK: usize = 64;

#[inline(always)]
fn kernel_channel_body(
    taps: &[f32],
    b: usize,
    r: &mut [[[f32; MAX_BLOCK]; 4]; 3],
    u: [&mut [f32]; XI],
) {
    separable_kernel(taps, b, r, u, g_rows);
}

/// `U = G·g·Gᵀ` of one input channel of one block, `G` with `N` rows
/// (`g_row(r, v0, v1, v2, out)` applies row `r` lane by lane) and `P = N²`
/// positions: `taps` is `[9, B]`, position `ξ = N·row + col` goes to
/// `u[ξ]`, `rows` is scratch. Each kernel row along its columns first
/// (`rows[i][col]`), then down the rows. For F(2×2, 3×3) and F(4×4, 3×3).
#[inline(always)]
pub(super) fn separable_kernel<const N: usize, const P: usize>(
    taps: &[f32],
    b: usize,
    rows: &mut [[[f32; MAX_BLOCK]; N]; 3],
    u: [&mut [f32]; P],
    g_row: impl Fn(usize, &[f32], &[f32], &[f32], &mut [f32]),
) {
    assert!(b <= MAX_BLOCK && taps.len() == 9 * b && P == N * N);
    let tap = |t: usize| &taps[t * b..(t + 1) * b];
    for (i, r) in rows.iter_mut().enumerate() {
        for (col, r) in r.iter_mut().enumerate() {
            g_row(col, tap(3 * i), tap(3 * i + 1), tap(3 * i + 2), &mut r[..b]);
        }
    }
    for (xi, u) in u.into_iter().enumerate() {
        let (row, col) = (xi / N, xi % N);
        g_row(
            row,
            &rows[0][col][..b],
            &rows[1][col][..b],
            &rows[2][col][..b],
            u,
        );
    }
}

thread_local! {
    /// This thread's transformed inputs, products and a row of zeros.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
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
    let p = g.p();
    let b = d.block();
    let oc = blocks.len() * b;
    let image_len = c * h * w;
    assert!(x.len() >= images.end * image_len && dst.len() == images.len() * oc * p);
    assert_eq!(u.len(), XI * o * c);
    let rows_total = images.len() * th;
    let chunk_tiles = (CHUNK_BYTES / (4 * XI * (c + oc))).max(MIN_CHUNK_TILES);
    let chunks = rows_total.div_ceil(chunk_tiles.div_ceil(tw));
    let rows_per_chunk = rows_total.div_ceil(chunks);
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let (v, m, zeros) = &mut *s;
        zeros.resize(w + 1, 0.0);
        for r0 in (0..rows_total).step_by(rows_per_chunk) {
            let r1 = (r0 + rows_per_chunk).min(rows_total);
            let tiles = (r1 - r0) * tw;
            // Whole tiles for the kernel: the last tile's offset repeated,
            // computed again into rows nothing reads.
            let padded_tiles = tiles.next_multiple_of(NP);
            let pixels: Vec<usize> = (0..padded_tiles).map(|t| t.min(tiles - 1)).collect();
            v.resize(XI * c * padded_tiles, 0.0);
            m.resize(XI * padded_tiles * oc, 0.0);
            for r in r0..r1 {
                let image = images.start + r / th;
                let image = &x[image * image_len..(image + 1) * image_len];
                input_row(
                    image,
                    (c, h, w),
                    r % th,
                    zeros,
                    v,
                    Runs::channel_major(padded_tiles),
                    (r - r0) * tw,
                );
            }
            for xi in 0..XI {
                let weights = &u[xi * o * c..(xi + 1) * o * c];
                direct::products(
                    d.level(),
                    c,
                    XI * padded_tiles,
                    oc,
                    // Position ξ of every channel: from ξ on, 16 rows apart.
                    &v[xi * padded_tiles..],
                    &weights[blocks.start * c * b..blocks.end * c * b],
                    &pixels,
                    &mut m[xi * padded_tiles * oc..(xi + 1) * padded_tiles * oc],
                );
            }
            for r in r0..r1 {
                let image = r / th;
                let planes = &mut dst[image * oc * p..(image + 1) * oc * p];
                output_row(m, padded_tiles, oc, (r - r0) * tw, (r % th, h, w), planes);
            }
        }
    });
}

/// Where a transform's runs of tiles go: value `(ci, ξ, t)` at `ci·channel
/// + ξ·position + t`.
#[derive(Clone, Copy, Debug)]
struct Runs {
    channel: usize,
    position: usize,
}

impl Runs {
    /// The 16 positions of a channel side by side, `stride` apart: `[C, 16, stride]`.
    fn channel_major(stride: usize) -> Self {
        Self {
            channel: XI * stride,
            position: stride,
        }
    }

    /// One `[C, stride]` block per position, each a cache line longer
    /// than it needs (so that a channel's 16 stores do not land 4 KiB
    /// apart, in one cache set).
    fn position_major(channels: usize, stride: usize) -> Self {
        Self {
            channel: stride,
            position: channels * stride + 16,
        }
    }

    /// Values spanned by `c` channels' runs of `stride` tiles.
    fn len(self, c: usize, stride: usize) -> usize {
        (c - 1) * self.channel + (XI - 1) * self.position + stride
    }

    /// Asserts that `c` channels' runs of `end` tiles lie in `len` values
    /// and do not overlap.
    fn check(self, c: usize, end: usize, len: usize) {
        let (lo, hi) = (
            self.channel.min(self.position),
            self.channel.max(self.position),
        );
        let inner = if lo == self.channel { c } else { XI };
        assert!(c > 0 && end <= lo && inner * lo <= hi);
        assert!((c - 1) * self.channel + (XI - 1) * self.position + end <= len);
    }
}

/// Tiles per step of the input transform.
const TB: usize = 8;

/// Tile row `ty` of one image `image` (`c` planes `h × w`): for each
/// channel `ci` and position `ξ = 4a + b`, `V = Bᵀ·d·B` with `Bᵀ = [[1, 0,
/// -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]` (down the patch's
/// rows first, then along them), `d` the tile's 4×4 patch of input rows
/// `2·ty - 1 ..= 2·ty + 2` and columns `2·tx - 1 ..= 2·tx + 2`, zero
/// outside the plane; into `v[ci·runs.channel + ξ·runs.position + first
/// ..][..tw]`. `zeros` (at least `w + 1`
/// zeros) stands for the rows above and below the plane.
#[allow(clippy::too_many_arguments)]
fn input_row(
    image: &[f32],
    (c, h, w): (usize, usize, usize),
    ty: usize,
    zeros: &[f32],
    v: &mut [f32],
    runs: Runs,
    first: usize,
) {
    let tw = w.div_ceil(2);
    assert!(image.len() >= c * h * w && ty < h.div_ceil(2) && w > 0);
    assert!(zeros.len() > w && zeros.iter().all(|&z| z == 0.0));
    runs.check(c, first + tw, v.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the Winograd path runs at AVX2 or AVX-512 only (see
    // `Direct::plan`), at most the detected level; the asserts above bound
    // every write, and every read is masked to the plane's columns.
    unsafe {
        if super::simd::simd_level() == super::simd::SimdLevel::Avx512 {
            x86::input_row_avx512(image, (c, h, w), ty, zeros, v, runs, first);
        } else {
            x86::input_row_avx2(image, (c, h, w), ty, zeros, v, runs, first);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // The plane's edge is tested value by value here.
        let _ = zeros;
        for ci in 0..c {
            let plane = &image[ci * h * w..(ci + 1) * h * w];
            let d = |k: usize, col: usize| -> f32 {
                let (y, x) = ((2 * ty + k).wrapping_sub(1), col.wrapping_sub(1));
                if y < h && x < w {
                    plane[y * w + x]
                } else {
                    0.0
                }
            };
            for t in 0..tw {
                let mut down = [[0f32; 4]; 4];
                for (j, down) in down.iter_mut().enumerate() {
                    let (d0, d1, d2, d3) = (
                        d(0, 2 * t + j),
                        d(1, 2 * t + j),
                        d(2, 2 * t + j),
                        d(3, 2 * t + j),
                    );
                    *down = [d0 - d2, d1 + d2, d2 - d1, d1 - d3];
                }
                for a in 0..4 {
                    let (e0, e1, e2, e3) = (down[0][a], down[1][a], down[2][a], down[3][a]);
                    for (b, value) in [e0 - e2, e1 + e2, e2 - e1, e1 - e3].into_iter().enumerate() {
                        v[ci * runs.channel + (a * 4 + b) * runs.position + first + t] = value;
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::direct::x86::transpose8;
    use super::{TB, XI};
    use std::arch::x86_64::*;

    /// The even and odd columns of the sixteen values from `p`, in order;
    /// lanes outside the masks `lo` (the first eight) and `hi` (the next
    /// eight) read as zero.
    ///
    /// # Safety
    /// The CPU must have AVX2; every lane inside the masks must be readable.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn split(p: *const f32, lo: __m256i, hi: __m256i) -> (__m256, __m256) {
        // SAFETY: per this function's contract.
        let (a, b) = unsafe {
            (
                _mm256_maskload_ps(p, lo),
                _mm256_maskload_ps(p.wrapping_add(8), hi),
            )
        };
        let even = _mm256_shuffle_ps::<0x88>(a, b);
        let odd = _mm256_shuffle_ps::<0xDD>(a, b);
        (
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(even))),
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(odd))),
        )
    }

    /// Planes ahead whose values the transforms ask the CPU to fetch: the
    /// planes lie 4 KiB apart or more, a page each, which the CPU's own
    /// prefetchers do not cross, so each row would otherwise wait for memory.
    const PREFETCH_PLANES: usize = 4;

    /// Asks for the sixteen values from `p` (and the two after them) of
    /// the plane [`PREFETCH_PLANES`] on (`plane` values apart); a hint that
    /// reads nothing, wherever it points.
    #[inline(always)]
    fn prefetch_ahead(p: *const f32, plane: usize) {
        let ahead = p.wrapping_add(PREFETCH_PLANES * plane).cast::<i8>();
        // SAFETY: a prefetch is a hint; it does not fault or read.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(4 * 17));
        }
    }

    /// The 16 positions' values of [`TB`] tiles into their runs, from
    /// `dst` on, `step` values apart: whole, or the first `n` lanes
    /// (`mask`) at a row's end.
    ///
    /// # Safety
    /// The CPU must have AVX2; the lanes stored must lie in the buffer.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn store_runs(
        mut dst: *mut f32,
        step: usize,
        values: [__m256; XI],
        n: usize,
        mask: __m256i,
    ) {
        for value in values {
            // SAFETY: per this function's contract.
            unsafe {
                if n == TB {
                    _mm256_storeu_ps(dst, value);
                } else {
                    _mm256_maskstore_ps(dst, mask, value);
                }
            }
            dst = dst.wrapping_add(step);
        }
    }

    /// Lanes `0 .. 8` with `from + lane` in `0 .. w` set.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn inside(from: i32, w: usize) -> __m256i {
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let col = _mm256_add_epi32(lane, _mm256_set1_epi32(from));
        _mm256_and_si256(
            _mm256_cmpgt_epi32(col, _mm256_set1_epi32(-1)),
            _mm256_cmpgt_epi32(_mm256_set1_epi32(w as i32), col),
        )
    }

    /// [`super::input_row`], [`TB`] tiles at a time: each of the patch's
    /// four rows loaded as sixteen values from the tiles' first column and
    /// from two columns on (masked to the plane's columns, the rest zero),
    /// split into even and odd columns (columns 0, 1, 2 and 3 of the tiles'
    /// patches), combined down the rows, then along them. The same AVX2
    /// instructions at both levels; AVX-512's 32 registers hold the step's
    /// values without spilling them.
    ///
    /// # Safety
    /// The CPU must have the features; the bounds [`super::input_row`]
    /// asserts.
    macro_rules! input_row_impl {
        ($name:ident, $features:literal) => {
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $name(
                image: &[f32],
                (c, h, w): (usize, usize, usize),
                ty: usize,
                zeros: &[f32],
                v: &mut [f32],
                runs: super::Runs,
                first: usize,
            ) {
                let tw = w.div_ceil(2);
                // Lanes whose column `from + lane` lies in the plane.
                let inside = |from: i32| inside(from, w);
                // SAFETY: only lanes inside the plane's row (or the zero
                // row) are read.
                let split = |p: *const f32, lo: __m256i, hi: __m256i| unsafe { split(p, lo, hi) };
                // `Bᵀ` down four rows.
                let down = |x: [__m256; 4]| {
                    [
                        _mm256_sub_ps(x[0], x[2]),
                        _mm256_add_ps(x[1], x[2]),
                        _mm256_sub_ps(x[2], x[1]),
                        _mm256_sub_ps(x[1], x[3]),
                    ]
                };
                // The patch rows' starts in plane 0 (input rows 2·ty - 1 ..=
                // 2·ty + 2), or `None` outside the plane.
                let rows: [Option<usize>; 4] = std::array::from_fn(|k| {
                    (2 * ty + k)
                        .checked_sub(1)
                        .filter(|&y| y < h)
                        .map(|y| y * w)
                });
                let vp = v.as_mut_ptr();
                let lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                // Channel by channel, the whole tile row each: a plane's
                // rows are read in one sweep and each run of `v` written in
                // order (on 56×56 planes 7–18% faster than channels inside
                // the steps of eight tiles).
                for ci in 0..c {
                    for t0 in (0..tw).step_by(TB) {
                        // Column 2·t0 - 1 (the patch's first) and two on.
                        let from = 2 * t0 as i32 - 1;
                        let (m0, m1) = (inside(from), inside(from + 8));
                        let (m2, m3) = (inside(from + 2), inside(from + 10));
                        let n = TB.min(tw - t0);
                        // Lanes below `n` set: the last step stops at the row's end.
                        let store_mask =
                            _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane_index);
                        let zero = _mm256_setzero_ps();
                        let (mut c0, mut c1, mut c2, mut c3) =
                            ([zero; 4], [zero; 4], [zero; 4], [zero; 4]);
                        for (k, row) in rows.iter().enumerate() {
                            // Column 0 of the row (of the zero row, one on,
                            // so that column -1 is inside it too); pointers
                            // only, every read is masked.
                            let start = match row {
                                Some(at) => image.as_ptr().wrapping_add(ci * h * w + at),
                                None => zeros.as_ptr().wrapping_add(1),
                            };
                            let p = start.wrapping_offset(from as isize);
                            if row.is_some() {
                                prefetch_ahead(p, h * w);
                            }
                            (c0[k], c1[k]) = split(p, m0, m1);
                            (c2[k], c3[k]) = split(p.wrapping_add(2), m2, m3);
                        }
                        let (c0, c1, c2, c3) = (down(c0), down(c1), down(c2), down(c3));
                        let mut out = [zero; XI];
                        for a in 0..4 {
                            out[a * 4] = _mm256_sub_ps(c0[a], c2[a]);
                            out[a * 4 + 1] = _mm256_add_ps(c1[a], c2[a]);
                            out[a * 4 + 2] = _mm256_sub_ps(c2[a], c1[a]);
                            out[a * 4 + 3] = _mm256_sub_ps(c1[a], c3[a]);
                        }
                        let dst = vp.wrapping_add(ci * runs.channel + first + t0);
                        // SAFETY: tiles t0 .. t0 + n of the channel's 16 runs
                        // lie in `v` (see `input_row`).
                        unsafe { store_runs(dst, runs.position, out, n, store_mask) };
                    }
                }
            }
        };
    }

    input_row_impl!(input_row_avx2, "avx2");
    input_row_impl!(input_row_avx512, "avx2,avx512f,avx512vl");

    /// [`super::grad_row`], [`TB`] tiles at a time: the tile row's two
    /// output-gradient rows loaded as sixteen values from the tiles' first
    /// column (masked to the plane's columns; the second row zero below
    /// the plane), split into even and odd columns, combined down the rows,
    /// then along them. The same AVX2 instructions at both levels.
    ///
    /// # Safety
    /// The CPU must have the features; the bounds [`super::grad_row`]
    /// asserts.
    macro_rules! grad_row_impl {
        ($name:ident, $features:literal) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(
                grad: &[f32],
                (c, h, w): (usize, usize, usize),
                ty: usize,
                m: &mut [f32],
                runs: super::Runs,
                first: usize,
            ) {
                let tw = w.div_ceil(2);
                let lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let second = 2 * ty + 1 < h;
                let sign = _mm256_set1_ps(-0.0);
                let mp = m.as_mut_ptr();
                // Channel by channel, as in `input_row`.
                for ci in 0..c {
                    for t0 in (0..tw).step_by(TB) {
                        let from = 2 * t0;
                        let (m0, m1) = (inside(from as i32, w), inside(from as i32 + 8, w));
                        let n = TB.min(tw - t0);
                        let store_mask =
                            _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane_index);
                        let p = grad.as_ptr().wrapping_add(ci * h * w + 2 * ty * w + from);
                        prefetch_ahead(p, h * w);
                        if second {
                            prefetch_ahead(p.wrapping_add(w), h * w);
                        }
                        // SAFETY: only lanes inside the plane's rows are read.
                        let (a0, b0) = unsafe { split(p, m0, m1) };
                        let (a1, b1) = if second {
                            // SAFETY: as above, one row down (inside the plane).
                            unsafe { split(p.wrapping_add(w), m0, m1) }
                        } else {
                            (_mm256_setzero_ps(), _mm256_setzero_ps())
                        };
                        // `A` down the two rows: r0 = row 0, r1 = row 0 +
                        // row 1, r2 = row 0 - row 1, r3 = -row 1.
                        let rows = [
                            (a0, b0),
                            (_mm256_add_ps(a0, a1), _mm256_add_ps(b0, b1)),
                            (_mm256_sub_ps(a0, a1), _mm256_sub_ps(b0, b1)),
                            (_mm256_xor_ps(a1, sign), _mm256_xor_ps(b1, sign)),
                        ];
                        // Then `Aᵀ` along each: (a, a + b, a - b, -b).
                        let out: [__m256; XI] = std::array::from_fn(|xi| {
                            let (a, b) = rows[xi / 4];
                            match xi % 4 {
                                0 => a,
                                1 => _mm256_add_ps(a, b),
                                2 => _mm256_sub_ps(a, b),
                                _ => _mm256_xor_ps(b, sign),
                            }
                        });
                        let dst = mp.wrapping_add(ci * runs.channel + first + t0);
                        // SAFETY: tiles t0 .. t0 + n of the channel's 16 runs
                        // lie in `m` (see `grad_row`).
                        unsafe { store_runs(dst, runs.position, out, n, store_mask) };
                    }
                }
            }
        };
    }

    grad_row_impl!(grad_row_avx2, "avx2");
    grad_row_impl!(grad_row_avx512, "avx2,avx512f,avx512vl");

    /// [`super::output_row`], eight tiles × eight output channels at a
    /// time: each tile's four outputs for the eight channels, the same
    /// additions in the same order as the scalar definition, then turned
    /// (8 × 8 transposes) into each channel's two output rows of sixteen
    /// pixels, the even and odd columns interleaved, stored with the
    /// plane's edge masked off. The same AVX2 instructions at both levels.
    ///
    /// # Safety
    /// The CPU must have the features; the bounds [`super::output_row`]
    /// asserts.
    macro_rules! output_row_impl {
        ($name:ident, $features:literal) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(
                m: &[f32],
                stride: usize,
                oc: usize,
                first: usize,
                (ty, h, w): (usize, usize, usize),
                out: &mut [std::mem::MaybeUninit<f32>],
            ) {
                let tw = w.div_ceil(2);
                let p = h * w;
                let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let mp = m.as_ptr();
                let op = out.as_mut_ptr().cast::<f32>();
                let rows = if 2 * ty + 1 < h { 2 } else { 1 };
                // Eight channels at a time, the whole tile row each: each
                // plane's two rows are written in one sweep (as `input_row`
                // reads them).
                for k in (0..oc).step_by(TB) {
                    for t0 in (0..tw).step_by(TB) {
                        let tiles = TB.min(tw - t0);
                        // Lanes whose column 2·t0 + `from` + lane is inside the plane.
                        let inside = |from: usize| {
                            let col =
                                _mm256_add_epi32(lane, _mm256_set1_epi32((2 * t0 + from) as i32));
                            _mm256_cmpgt_epi32(_mm256_set1_epi32(w as i32), col)
                        };
                        let whole = 2 * t0 + 2 * TB <= w;
                        let (lo_mask, hi_mask) = (inside(0), inside(TB));
                        let zero = _mm256_setzero_ps();
                        // y[q][t]: output q (00, 01, 10, 11) of tile t for
                        // channels k .. k + 8.
                        let mut y = [[zero; TB]; 4];
                        for t in 0..TB {
                            // Tiles past the row's end repeat its last one,
                            // whose columns the stores mask off.
                            let tile = first + t0 + t.min(tiles - 1);
                            // SAFETY: tile < stride, so every read is
                            // inside `m` (see `output_row`).
                            let at = |a: usize, col: usize| unsafe {
                                _mm256_loadu_ps(mp.add(((a * 4 + col) * stride + tile) * oc + k))
                            };
                            let mut s0 = [zero; 4];
                            let mut s1 = [zero; 4];
                            for col in 0..4 {
                                let (m0, m1, m2, m3) =
                                    (at(0, col), at(1, col), at(2, col), at(3, col));
                                s0[col] = _mm256_add_ps(_mm256_add_ps(m0, m1), m2);
                                s1[col] = _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3);
                            }
                            for (q, s) in [s0, s0, s1, s1].iter().enumerate() {
                                y[q][t] = if q % 2 == 0 {
                                    _mm256_add_ps(_mm256_add_ps(s[0], s[1]), s[2])
                                } else {
                                    _mm256_sub_ps(_mm256_sub_ps(s[1], s[2]), s[3])
                                };
                            }
                        }
                        // Per channel: eight tiles' outputs side by side.
                        // SAFETY: AVX is part of this function's features.
                        let y = unsafe {
                            [
                                transpose8(y[0]),
                                transpose8(y[1]),
                                transpose8(y[2]),
                                transpose8(y[3]),
                            ]
                        };
                        for row in 0..rows {
                            let (even, odd) = (&y[2 * row], &y[2 * row + 1]);
                            for ch in 0..TB {
                                let lo = _mm256_unpacklo_ps(even[ch], odd[ch]);
                                let hi = _mm256_unpackhi_ps(even[ch], odd[ch]);
                                let first8 = _mm256_permute2f128_ps::<0x20>(lo, hi);
                                let next8 = _mm256_permute2f128_ps::<0x31>(lo, hi);
                                let dst =
                                    op.wrapping_add((k + ch) * p + (2 * ty + row) * w + 2 * t0);
                                // SAFETY: the row's columns 2·t0 .. 2·t0 + 16
                                // inside the plane, no other.
                                unsafe {
                                    if whole {
                                        _mm256_storeu_ps(dst, first8);
                                        _mm256_storeu_ps(dst.wrapping_add(TB), next8);
                                    } else {
                                        _mm256_maskstore_ps(dst, lo_mask, first8);
                                        _mm256_maskstore_ps(dst.wrapping_add(TB), hi_mask, next8);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        };
    }

    output_row_impl!(output_row_avx2, "avx2");
    output_row_impl!(output_row_avx512, "avx2,avx512f,avx512vl");
}

/// Tile row `ty`: for each of its tiles (`first + tx` in the chunk's
/// products `m`, `[16, stride, oc]`), `Aᵀ·M·A` with `Aᵀ = [[1, 1, 1, 0],
/// [0, 1, -1, -1]]` (down the rows first, then along them), written into
/// the image's output planes `out` (`[oc, H·W]`); the tiles' pixels past
/// the plane's edge are dropped.
fn output_row(
    m: &[f32],
    stride: usize,
    oc: usize,
    first: usize,
    (ty, h, w): (usize, usize, usize),
    out: &mut [MaybeUninit<f32>],
) {
    let tw = w.div_ceil(2);
    assert!(oc.is_multiple_of(TB) && first + tw <= stride && ty < h.div_ceil(2));
    assert!(m.len() >= XI * stride * oc && out.len() == oc * h * w);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the Winograd path runs at AVX2 or AVX-512 only (see
    // `Direct::plan`), at most the detected level; the asserts above bound
    // every read, and every write is masked to the plane's columns and
    // rows.
    unsafe {
        if super::simd::simd_level() == super::simd::SimdLevel::Avx512 {
            x86::output_row_avx512(m, stride, oc, first, (ty, h, w), out);
        } else {
            x86::output_row_avx2(m, stride, oc, first, (ty, h, w), out);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    for tx in 0..tw {
        let t = first + tx;
        for k in 0..oc {
            let at = |a: usize, col: usize| m[((a * 4 + col) * stride + t) * oc + k];
            let s0: [f32; 4] = std::array::from_fn(|col| at(0, col) + at(1, col) + at(2, col));
            let s1: [f32; 4] = std::array::from_fn(|col| at(1, col) - at(2, col) - at(3, col));
            for (i, s) in [s0, s1].iter().enumerate() {
                let (y, x) = (2 * ty + i, 2 * tx);
                if y < h {
                    out[k * h * w + y * w + x].write(s[0] + s[1] + s[2]);
                    if x + 1 < w {
                        out[k * h * w + y * w + x + 1].write(s[1] - s[2] - s[3]);
                    }
                }
            }
        }
    }
}

/// Tiles per convolution below which a kernel gradient keeps im2col +
/// `gemm` (see [`kernel_grad`]), whatever the channels.
const MIN_KERNEL_GRAD_TILES: usize = 64;

/// Tiles × channels (the fewer of input and output) below which a kernel
/// gradient keeps im2col + `gemm`: the saving per tile grows with the
/// product of the channel counts, the transforms with their sum. Measured
/// on two cores (AVX-512; Winograd against im2col + `gemm`, ms): 64 → 64
/// channels at 8×8, batch 16 (256 tiles) 0.41 against 0.34, batch 64
/// 1.09 against 1.27; 128 → 128 at 8×8, batch 16 (256 tiles) 1.08 against
/// 1.20; 256 → 256 at 4×4, batch 16 (64 tiles) 1.11 against 1.38; 512 →
/// 512 at 2×2, batch 32 (32 tiles) 2.36 against 2.15, batch 64 4.10
/// against 4.51.
const MIN_KERNEL_GRAD_WORK: usize = 32 * 1024;

/// Tasks of a kernel gradient whose partial sums are small enough (see
/// [`PARTIAL_BYTES`]): each sums a contiguous range of the batch's tile
/// rows into its own `[16, O, C]`, and the partial sums are added in task
/// order.
const KERNEL_GRAD_TASKS: usize = 8;

/// Bytes of one task's partial sum up to which a kernel gradient is split
/// into [`KERNEL_GRAD_TASKS`] tasks, each on one thread with its chunks in
/// its own cache; wider layers sum every chunk into one `[16, O, C]`, the
/// chunk's transforms and its 16 products each spread over the threads.
const PARTIAL_BYTES: usize = 1 << 20;

/// Bytes of transformed inputs and output gradients per chunk of a task.
const TASK_CHUNK_BYTES: usize = 1 << 20;

/// Bytes of transformed inputs and output gradients per chunk shared by
/// the threads.
const SHARED_CHUNK_BYTES: usize = 2 << 20;

/// Tiles per chunk of a kernel gradient at least, even where the chunk
/// outgrows its bytes (wide layers): each chunk adds its products to the
/// whole `[16, O, C]` sum, which should cost little next to them.
const MIN_KERNEL_GRAD_CHUNK_TILES: usize = 128;

/// Channels per task of a shared chunk's transforms.
const TRANSFORM_CHANNELS: usize = 16;

/// Whether the kernel gradient of `g` takes [`kernel_grad`].
pub(super) fn takes_kernel_grad(g: &Geometry) -> bool {
    (g.kh, g.kw, g.stride, g.padding) == (3, 3, 1, 1)
        && super::simd::simd_level() >= super::simd::SimdLevel::Avx2
        && g.n * tiles_per_image(g) >= MIN_KERNEL_GRAD_TILES
        && g.n * tiles_per_image(g) * g.c.min(g.o) >= MIN_KERNEL_GRAD_WORK
        && winograd_enabled()
}

thread_local! {
    /// This thread's chunk of transformed inputs and output gradients for
    /// [`kernel_grad`].
    static GRAD_SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// The gradient `[O, C, 3, 3]` of the convolution `g` with respect to its
/// kernel, given its input `x` (`[N, C, H, W]`) and output gradient `grad`
/// (`[N, O, H, W]`): the adjoint of the forward pass's F(2×2, 3×3). With
/// each input patch transformed as in the forward pass (`V = Bᵀ·d·B`) and
/// each tile's 2×2 output gradient `m` into `M = A·m·Aᵀ`, the gradient with
/// respect to the transformed kernel is, for each position `ξ`, `dU_ξ =
/// Σ_tiles M_ξ ⊗ V_ξ`, a product `[O, tiles] × [tiles, C]`, and the
/// kernel's gradient is `Gᵀ·dU·G`. As in the forward pass that is 16
/// multiplications per tile and channel pair where im2col + `gemm` needs
/// 36; both are sums over every tile of the batch, in `f32`.
///
/// The batch's tile rows are split into tasks (see [`PARTIAL_BYTES`]) and
/// each task's into chunks whose transforms stay in cache; each chunk's 16
/// products are added by `gemm` to the task's `dU_ξ`. The tasks, chunks
/// and the order of every sum depend only on the shapes, so the result
/// does not depend on the number of threads.
pub(super) fn kernel_grad(g: &Geometry, x: &[f32], grad: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    let (n, c, h, w, o) = (g.n, g.c, g.h, g.w, g.o);
    assert!((g.oh, g.ow) == (h, w) && n > 0);
    assert!(x.len() == n * c * h * w && grad.len() == n * o * h * w);
    let (th, tw) = tile_grid(g);
    let rows_total = n * th;
    let shared = 4 * XI * o * c > PARTIAL_BYTES;
    let tasks = if shared {
        1
    } else {
        KERNEL_GRAD_TASKS.min(rows_total)
    };
    let rows_per_task = rows_total.div_ceil(tasks);
    let tasks = rows_total.div_ceil(rows_per_task);
    let chunk_bytes = if shared {
        SHARED_CHUNK_BYTES
    } else {
        TASK_CHUNK_BYTES
    };
    let chunk_tiles = (chunk_bytes / (4 * XI * (c + o))).max(MIN_KERNEL_GRAD_CHUNK_TILES);
    let partial = |t: usize| -> Vec<f32> {
        let rows = t * rows_per_task..((t + 1) * rows_per_task).min(rows_total);
        let mut du = super::Uninit::new(XI * o * c);
        let chunks = rows.len().div_ceil(chunk_tiles.div_ceil(tw));
        let rows_per_chunk = rows.len().div_ceil(chunks);
        for r0 in rows.clone().step_by(rows_per_chunk) {
            let chunk = r0..(r0 + rows_per_chunk).min(rows.end);
            chunk_products(
                g,
                x,
                grad,
                chunk,
                du.as_mut_slice(),
                r0 > rows.start,
                shared,
            );
        }
        // SAFETY: the task's first chunk wrote every value.
        unsafe { du.finish() }
    };
    let parts: Vec<Vec<f32>> = if tasks > 1 {
        (0..tasks).into_par_iter().map(partial).collect()
    } else {
        vec![partial(0)]
    };
    let mut dw = super::Uninit::new(o * c * 9);
    dw.as_mut_slice()
        .par_chunks_mut(c * 9)
        .enumerate()
        .for_each(|(oc, dst)| {
            let row = |xi: usize| (xi * o + oc) * c..(xi * o + oc + 1) * c;
            if let [part] = &parts[..] {
                kernel_grad_rows(std::array::from_fn(|xi| &part[row(xi)]), dst);
                return;
            }
            // The output channel's rows summed over the parts, in part order.
            let mut rows = vec![0f32; XI * c];
            for (xi, sum) in rows.chunks_exact_mut(c).enumerate() {
                sum.copy_from_slice(&parts[0][row(xi)]);
                for part in &parts[1..] {
                    add_into(sum, &part[row(xi)]);
                }
            }
            kernel_grad_rows(std::array::from_fn(|xi| &rows[xi * c..(xi + 1) * c]), dst);
        });
    // SAFETY: each output channel's `C·9` values were written.
    unsafe { dw.finish() }
}

/// Tile rows `rows` of the batch: their input patches and output
/// gradients transformed into this thread's scratch, then for each
/// position `ξ`, `du_ξ (+)= M_ξ · V_ξᵀ` (`du` is `[16, O, C]`, overwritten
/// unless `accumulate`). `shared`: the transforms and the products spread
/// over the threads; otherwise all on this one.
fn chunk_products(
    g: &Geometry,
    x: &[f32],
    grad: &[f32],
    rows: std::ops::Range<usize>,
    du: &mut [MaybeUninit<f32>],
    accumulate: bool,
    shared: bool,
) {
    use super::conv::{Mat, matmul, out_ptr};
    use rayon::prelude::*;
    let (c, h, w, o) = (g.c, g.h, g.w, g.o);
    let tiles = rows.len() * tile_grid(g).1;
    // On one thread, each position's runs form one block (`[16, C,
    // stride]`), an odd number of cache lines apart, so that the rows
    // `gemm` reads across do not fall in the same cache sets. Shared, the
    // threads transform channels of their own (`[C, 16, stride]`).
    let stride = if shared {
        tiles.next_multiple_of(16)
    } else {
        tiles.next_multiple_of(16) | 16
    };
    let layout = |channels: usize| {
        if shared {
            Runs::channel_major(stride)
        } else {
            Runs::position_major(channels, stride)
        }
    };
    let (v_runs, m_runs) = (layout(c), layout(o));
    GRAD_SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let (v, m) = &mut *s;
        v.resize(v_runs.len(c, stride), 0.0);
        m.resize(m_runs.len(o, stride), 0.0);
        let zeros = vec![0f32; w + 1];
        let inputs = |v: &mut [f32]| {
            transform_rows(
                x,
                (c, h, w),
                rows.clone(),
                v,
                v_runs,
                |image, dims, ty, out, runs, first| {
                    input_row(image, dims, ty, &zeros, out, runs, first)
                },
            )
        };
        let grads =
            |m: &mut [f32]| transform_rows(grad, (o, h, w), rows.clone(), m, m_runs, grad_row);
        if shared {
            rayon::join(|| inputs(v), || grads(m));
        } else {
            inputs(v);
            grads(m);
        }
        let (v, m) = (&v[..], &m[..]);
        let product = |(xi, dst): (usize, &mut [MaybeUninit<f32>])| {
            // M_ξ as `[O, tiles]` and V_ξᵀ as `[tiles, C]`.
            let lhs = Mat {
                ptr: m[xi * m_runs.position..].as_ptr(),
                rs: m_runs.channel as isize,
                cs: 1,
            };
            let rhs = Mat {
                ptr: v[xi * v_runs.position..].as_ptr(),
                rs: 1,
                cs: v_runs.channel as isize,
            };
            // SAFETY: `dst` is `[O, C]`; the views lie in `m` and `v`
            // (see `Runs::check`).
            unsafe { matmul(o, c, tiles, out_ptr(dst), c, accumulate, lhs, rhs, 1) };
        };
        if shared {
            du.par_chunks_mut(o * c).enumerate().for_each(product);
        } else {
            du.chunks_mut(o * c).enumerate().for_each(product);
        }
    });
}

/// A chunk's tile rows `rows` (of the whole batch's, image by image) of
/// `planes` (`[N, c, h, w]`) transformed by `row` (`input_row` or
/// `grad_row`) into `out`, laid out as `runs` says; channel-major, the
/// channels are spread over the threads in groups.
fn transform_rows(
    planes: &[f32],
    (c, h, w): (usize, usize, usize),
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    runs: Runs,
    row: impl Fn(&[f32], (usize, usize, usize), usize, &mut [f32], Runs, usize) + Sync,
) {
    use rayon::prelude::*;
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let plane = h * w;
    let channel_major = runs.channel > runs.position;
    let part = |(part, out): (usize, &mut [f32])| {
        let first = part * TRANSFORM_CHANNELS;
        let count = if channel_major {
            out.len() / runs.channel
        } else {
            c
        };
        for r in rows.clone() {
            let (image, ty) = (r / th, r % th);
            let at = (image * c + first) * plane;
            let planes = &planes[at..at + count * plane];
            row(planes, (count, h, w), ty, out, runs, (r - rows.start) * tw);
        }
    };
    let out = &mut out[..runs.len(c, runs.channel.min(runs.position))];
    if channel_major {
        out.par_chunks_mut(TRANSFORM_CHANNELS * runs.channel)
            .enumerate()
            .for_each(part);
    } else {
        part((0, out));
    }
}

simd_kernel!(
    /// One output channel's kernel gradient `[C, 3, 3]` from its 16 rows
    /// `du[ξ]` (`[C]` each): `Gᵀ·dU·G` for every input channel, down the
    /// rows first, then along them.
    fn kernel_grad_rows => kernel_grad_rows_body(du: [&[f32]; XI], dst: &mut [MaybeUninit<f32>])
);

#[inline(always)]
fn kernel_grad_rows_body(du: [&[f32]; XI], dst: &mut [MaybeUninit<f32>]) {
    let c = du[0].len();
    assert!(du.iter().all(|r| r.len() == c) && dst.len() == 9 * c);
    // `Gᵀ` applied to (u0, u1, u2, u3): (u0 + h, (u1 - u2)·½, h + u3), h = (u1 + u2)·½.
    let gt = |u0: f32, u1: f32, u2: f32, u3: f32| {
        let half = (u1 + u2) * 0.5;
        [u0 + half, (u1 - u2) * 0.5, half + u3]
    };
    const LANES: usize = 16;
    for c0 in (0..c).step_by(LANES) {
        let lanes = LANES.min(c - c0);
        let mut out = [[0f32; LANES]; 9];
        for l in 0..lanes {
            let u = |xi: usize| du[xi][c0 + l];
            // s[a][col] = Σ_row G[row][a]·dU[row][col].
            let s: [[f32; 3]; 4] =
                std::array::from_fn(|col| gt(u(col), u(4 + col), u(8 + col), u(12 + col)));
            for a in 0..3 {
                let d = gt(s[0][a], s[1][a], s[2][a], s[3][a]);
                for b in 0..3 {
                    out[a * 3 + b][l] = d[b];
                }
            }
        }
        for l in 0..lanes {
            for (t, out) in out.iter().enumerate() {
                dst[(c0 + l) * 9 + t].write(out[l]);
            }
        }
    }
}

/// Tile row `ty` of one image's output gradient `grad` (`c` planes `h ×
/// w`): for each channel `ci` and position `ξ = 4a + b`, `M = A·m·Aᵀ`
/// with `A = [[1, 0], [1, 1], [1, -1], [0, -1]]` (down the rows first,
/// then along them), `m` the tile's 2×2 gradient at rows `2·ty ..= 2·ty +
/// 1` and columns `2·tx ..= 2·tx + 1`, zero outside the plane; into
/// `m[ci·runs.channel + ξ·runs.position + first ..][..tw]`.
fn grad_row(
    grad: &[f32],
    (c, h, w): (usize, usize, usize),
    ty: usize,
    m: &mut [f32],
    runs: Runs,
    first: usize,
) {
    let tw = w.div_ceil(2);
    assert!(grad.len() >= c * h * w && ty < h.div_ceil(2) && w > 0);
    runs.check(c, first + tw, m.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the kernel gradient takes this path at AVX2 or AVX-512 only
    // (see `takes_kernel_grad`), at most the detected level; the asserts
    // above bound every write, and every read is masked to the plane.
    unsafe {
        if super::simd::simd_level() == super::simd::SimdLevel::Avx512 {
            x86::grad_row_avx512(grad, (c, h, w), ty, m, runs, first);
        } else {
            x86::grad_row_avx2(grad, (c, h, w), ty, m, runs, first);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    for ci in 0..c {
        let plane = &grad[ci * h * w..(ci + 1) * h * w];
        let at = |y: usize, x: usize| {
            if y < h && x < w {
                plane[y * w + x]
            } else {
                0.0
            }
        };
        for t in 0..tw {
            let (y, x) = (2 * ty, 2 * t);
            let (a0, b0, a1, b1) = (at(y, x), at(y, x + 1), at(y + 1, x), at(y + 1, x + 1));
            let rows = [(a0, b0), (a0 + a1, b0 + b1), (a0 - a1, b0 - b1), (-a1, -b1)];
            for (i, (a, b)) in rows.into_iter().enumerate() {
                for (j, value) in [a, a + b, a - b, -b].into_iter().enumerate() {
                    m[ci * runs.channel + (i * 4 + j) * runs.position + first + t] = value;
                }
            }
        }
    }
}
