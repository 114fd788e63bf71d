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
//! convolutions, pixel-major, so the output transform reads each tile's 16
//! rows of `O` values as vectors and writes the tile's four pixels into
//! the same pixel-major scratch as the direct kernel's tiles, transposed
//! and finished by the same code. A task's tiles are handled in chunks of
//! whole tile rows whose transformed inputs and products stay in L2.
//!
//! Rounding differs from the definition's: inputs and kernel are combined
//! before they are multiplied, so each output carries the rounding of a few
//! more additions (the relative error stays near 1e-6 of the largest
//! output, see `tests/direct_conv.rs`). The transforms are the same
//! additions in the same order at every SIMD level, and the products the
//! direct kernel's, so AVX2 and AVX-512 give the same bits. [`set_winograd`]
//! (or `MULTILABEL_WINOGRAD=0`) turns the path off, leaving these
//! convolutions to the direct kernel or im2col + `gemm`.

use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};

use super::conv::Geometry;
use super::direct::{self, Direct, NP};
use super::simd::simd_kernel;

/// Tiles per convolution below which im2col + `gemm` or the direct kernel
/// is kept: the kernel's transform costs as much whatever the batch, and
/// the saving grows with the tiles. Measured on two cores (AVX-512, batch
/// 64 unless said; forward, Winograd against the other path): 512 → 512
/// channels at 2×2 (64 tiles) 5.4 against 4.3 ms; at 4×4 (256 tiles) 12.3
/// against 12.5; at 7×7 (batch 32, 512 tiles) 21.9 against 22.5; 256 →
/// 256 at 8×8 (1,024 tiles) 10.7 against 12.9; at 14×14 (batch 32, 1,568
/// tiles) 15.3 against 20.9.
const MIN_TOTAL_TILES: usize = 512;

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
/// are then shared out, see `direct::run_tasks`).
pub(super) fn images_per_task(g: &Geometry, threads: usize) -> usize {
    let (th, tw) = tile_grid(g);
    let most = MIN_TILES.div_ceil(th * tw).max(1);
    let tasks = g.n.div_ceil(most).next_multiple_of(threads.max(1));
    g.n.div_ceil(tasks).max(1)
}

/// The kernel `[O, C, 3, 3]` transformed, `U = G·g·Gᵀ` with `G = [[1, 0,
/// 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]`, laid out `[16, O/B, C, B]` (for
/// each position, the direct kernel's packing of a 1×1 kernel) in a
/// cache-line aligned buffer: the buffer and the offset of its start.
pub(super) fn transform_kernel(d: &Direct, kernel: &[f32]) -> (Vec<f32>, usize) {
    use rayon::prelude::*;
    let g = d.geometry();
    let (o, c, b) = (g.o, g.c, d.block());
    assert!(b <= MAX_BLOCK);
    // `[O/B, C, 9, B]`: each channel's nine taps, B output channels side by side.
    let (packed, offset) = direct::pack_kernel(d, kernel);
    let packed = &packed[offset..offset + kernel.len()];
    let blocks = o / b;
    let parts = c.div_ceil(KERNEL_CHANNELS);
    // SAFETY: the tasks below write every value: task `(block, part)`
    // writes `U[ξ, block, ci, ..]` for every `ξ` and each of its channels.
    unsafe {
        direct::aligned(XI * o * c, |out| {
            let out = SharedOut(out.as_mut_ptr().cast::<f32>());
            (0..blocks * parts).into_par_iter().for_each(|i| {
                let (block, part) = (i / parts, i % parts);
                let first = part * KERNEL_CHANNELS;
                for ci in first..(first + KERNEL_CHANNELS).min(c) {
                    let taps = &packed[(block * c + ci) * 9 * b..(block * c + ci + 1) * 9 * b];
                    let at = (block * c + ci) * b;
                    // SAFETY: the 16 runs `ξ·O·C + at .. + b` lie in the
                    // buffer (`at + b ≤ O·C`), and no other task writes them.
                    kernel_channel(taps, b, out.at(at), o * c);
                }
            });
        })
    }
}

/// Input channels per task of [`transform_kernel`].
const KERNEL_CHANNELS: usize = 32;

/// The transformed kernel's buffer, shared by tasks that write disjoint runs.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: only used by tasks that write disjoint runs (see `transform_kernel`).
unsafe impl Sync for SharedOut {}
// SAFETY: as above.
unsafe impl Send for SharedOut {}

impl SharedOut {
    /// The position `at` in the buffer (in bounds per the caller).
    fn at(self, at: usize) -> Dst {
        // SAFETY: callers pass offsets inside the buffer.
        Dst(unsafe { self.0.add(at) })
    }
}

/// Where one channel's 16 transformed runs go: `ξ · stride` on.
#[derive(Clone, Copy)]
struct Dst(*mut f32);

simd_kernel!(
    /// One input channel of one block: `taps` is `[9, B]`; position `ξ`'s
    /// `B` values go to `dst + ξ · stride`.
    fn kernel_channel => kernel_channel_body(taps: &[f32], b: usize, dst: Dst, stride: usize)
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
const MAX_BLOCK: usize = 64;

#[inline(always)]
fn kernel_channel_body(taps: &[f32], b: usize, dst: Dst, stride: usize) {
    assert!(b <= MAX_BLOCK && taps.len() == 9 * b);
    let tap = |t: usize| &taps[t * b..(t + 1) * b];
    // Each kernel row along its columns first (`r[i][col]`), then down the
    // rows.
    let mut r = [[[0f32; MAX_BLOCK]; 4]; 3];
    for (i, r) in r.iter_mut().enumerate() {
        for (col, r) in r.iter_mut().enumerate() {
            g_rows(col, tap(3 * i), tap(3 * i + 1), tap(3 * i + 2), &mut r[..b]);
        }
    }
    for xi in 0..XI {
        let (row, col) = (xi / 4, xi % 4);
        // SAFETY: per `transform_kernel`, the run `ξ · stride .. + b` from
        // `dst` is this task's to write.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.0.add(xi * stride), b) };
        g_rows(row, &r[0][col][..b], &r[1][col][..b], &r[2][col][..b], out);
    }
}

thread_local! {
    /// This thread's transformed inputs, products and row buffers.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// One task of `direct::run_tasks`: images `images` of `x` (`[N, C, H,
/// W]`), output channel blocks `blocks`, with the transformed kernel `u`
/// (see [`transform_kernel`]), into `tmp`, pixel-major `[image · P + q,
/// channels]`.
pub(super) fn task(
    d: &Direct,
    x: &[f32],
    u: &[f32],
    images: Range<usize>,
    blocks: Range<usize>,
    tmp: &mut [f32],
) {
    let g = d.geometry();
    let (c, h, w, o) = (g.c, g.h, g.w, g.o);
    let (th, tw) = tile_grid(g);
    let p = g.p();
    let b = d.block();
    let oc = blocks.len() * b;
    let image_len = c * h * w;
    assert!(x.len() >= images.end * image_len && tmp.len() >= images.len() * p * oc);
    assert_eq!(u.len(), XI * o * c);
    let rows_total = images.len() * th;
    let chunk_tiles = (CHUNK_BYTES / (4 * XI * (c + oc))).max(MIN_CHUNK_TILES);
    let chunks = rows_total.div_ceil(chunk_tiles.div_ceil(tw));
    let rows_per_chunk = rows_total.div_ceil(chunks);
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let (v, m, rows) = &mut *s;
        rows.resize(4 * padded_row(w) + w, 0.0);
        for r0 in (0..rows_total).step_by(rows_per_chunk) {
            let r1 = (r0 + rows_per_chunk).min(rows_total);
            let tiles = (r1 - r0) * tw;
            // Whole tiles for the kernel: the last tile's offset repeated,
            // computed again into rows nothing reads.
            let padded = tiles.next_multiple_of(NP);
            let pixels: Vec<usize> = (0..padded).map(|t| t.min(tiles - 1)).collect();
            v.resize(XI * c * padded, 0.0);
            m.resize(XI * padded * oc, 0.0);
            for r in r0..r1 {
                let image = images.start + r / th;
                input_row(
                    &x[image * image_len..(image + 1) * image_len],
                    c,
                    h,
                    w,
                    r % th,
                    v,
                    padded,
                    (r - r0) * tw,
                    rows,
                );
            }
            for xi in 0..XI {
                let weights = &u[xi * o * c..(xi + 1) * o * c];
                direct::products(
                    d.level(),
                    c,
                    padded,
                    oc,
                    &v[xi * c * padded..(xi + 1) * c * padded],
                    &weights[blocks.start * c * b..blocks.end * c * b],
                    &pixels,
                    &mut m[xi * padded * oc..(xi + 1) * padded * oc],
                );
            }
            for r in r0..r1 {
                let image = r / th;
                output_row(
                    m,
                    padded,
                    oc,
                    (r - r0) * tw,
                    r % th,
                    h,
                    w,
                    &mut tmp[image * p * oc..(image + 1) * p * oc],
                );
            }
        }
    });
}

simd_kernel!(
    /// Tile row `ty` of one image `xi` (`[C, H, W]`): for each channel `ci`
    /// and position `ξ`, `V` into `v[(ξ·C + ci)·stride + first ..][..tw]`.
    /// `rows` holds four padded rows and a row of zeros.
    fn input_row => input_row_body(
        xi: &[f32],
        c: usize,
        h: usize,
        w: usize,
        ty: usize,
        v: &mut [f32],
        stride: usize,
        first: usize,
        rows: &mut [f32]
    )
);

/// Tiles per step of [`horizontal`].
const TB: usize = 8;

/// Values per padded row of [`input_row`]: one zero, the `w` values (or
/// their combinations), zeros up to whole steps of [`TB`] tiles.
fn padded_row(w: usize) -> usize {
    2 * w.div_ceil(2).next_multiple_of(TB) + 2
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn input_row_body(
    xi: &[f32],
    c: usize,
    h: usize,
    w: usize,
    ty: usize,
    v: &mut [f32],
    stride: usize,
    first: usize,
    rows: &mut [f32],
) {
    let tw = w.div_ceil(2);
    let pw = padded_row(w);
    let (combined, zero) = rows.split_at_mut(4 * pw);
    let zero = &mut zero[..w];
    zero.fill(0.0);
    for ci in 0..c {
        let plane = &xi[ci * h * w..(ci + 1) * h * w];
        // Input rows 2·ty - 1 ..= 2·ty + 2, zero outside the plane.
        let row = |k: usize| -> &[f32] {
            match (2 * ty + k).checked_sub(1) {
                Some(y) if y < h => &plane[y * w..(y + 1) * w],
                _ => &zero[..],
            }
        };
        let (d0, d1, d2, d3) = (row(0), row(1), row(2), row(3));
        // Bᵀ·d: the rows combined, `Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0],
        // [0, -1, 1, 0], [0, 1, 0, -1]]`.
        for (a, out) in combined.chunks_exact_mut(pw).enumerate() {
            let (left, rest) = out.split_at_mut(1);
            let (mid, right) = rest.split_at_mut(w);
            left[0] = 0.0;
            right.fill(0.0);
            match a {
                0 => sub(mid, d0, d2),
                1 => add(mid, d1, d2),
                2 => sub(mid, d2, d1),
                _ => sub(mid, d1, d3),
            }
        }
        // (Bᵀ·d)·B: along each combined row, tile by tile (two columns
        // apart).
        for (a, e) in combined.chunks_exact(pw).enumerate() {
            let at = |col: usize| ((a * 4 + col) * c + ci) * stride + first;
            horizontal(e, tw, v, [at(0), at(1), at(2), at(3)]);
        }
    }
}

/// `(Bᵀ·d)·B` along one combined row `e` (a padded row, see
/// [`padded_row`]): for each tile `t < tw`, from the row's values `e[2t
/// ..= 2t + 3]`, `v[at[0] + t] = e0 - e2`, `v[at[1] + t] = e1 + e2`,
/// `v[at[2] + t] = e2 - e1` and `v[at[3] + t] = e1 - e3`.
#[inline(always)]
fn horizontal(e: &[f32], tw: usize, v: &mut [f32], at: [usize; 4]) {
    assert!(e.len() >= 2 * tw.next_multiple_of(TB) + 2);
    let mut runs = at.map(|a| a..a + tw);
    runs.sort_by_key(|r| r.start);
    assert!(runs.windows(2).all(|w| w[0].end <= w[1].start) && runs[3].end <= v.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the Winograd path runs at AVX2 or AVX-512 only (see
    // `Direct::plan`); the asserts above bound every read and write and
    // keep the four runs apart.
    unsafe {
        x86::horizontal_avx2(e, tw, v, at);
    }
    #[cfg(not(target_arch = "x86_64"))]
    for t in 0..tw {
        let (e0, e1, e2, e3) = (e[2 * t], e[2 * t + 1], e[2 * t + 2], e[2 * t + 3]);
        v[at[0] + t] = e0 - e2;
        v[at[1] + t] = e1 + e2;
        v[at[2] + t] = e2 - e1;
        v[at[3] + t] = e1 - e3;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::TB;
    use std::arch::x86_64::*;

    /// [`super::horizontal`], [`TB`] tiles at a time: two loads of sixteen
    /// values (one of them two values on) split into even and odd columns.
    ///
    /// # Safety
    /// The CPU must have AVX2; `e` holds `2·tw` rounded up to whole steps,
    /// plus 2, values; the runs `at[i] .. at[i] + tw` lie inside `v` and
    /// apart.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn horizontal_avx2(e: &[f32], tw: usize, v: &mut [f32], at: [usize; 4]) {
        let ep = e.as_ptr();
        let vp = v.as_mut_ptr();
        // Even and odd columns of the sixteen values at `p`, in order.
        let split = |p: *const f32| {
            // SAFETY: per the contract, 2·t0 + 18 values lie inside `e`.
            let (lo, hi) = unsafe { (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) };
            let even = _mm256_shuffle_ps::<0x88>(lo, hi);
            let odd = _mm256_shuffle_ps::<0xDD>(lo, hi);
            (
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(even))),
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(odd))),
            )
        };
        let lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for t0 in (0..tw).step_by(TB) {
            // SAFETY: see the contract.
            let (e0, e1) = split(unsafe { ep.add(2 * t0) });
            let (e2, e3) = split(unsafe { ep.add(2 * t0 + 2) });
            let out = [
                _mm256_sub_ps(e0, e2),
                _mm256_add_ps(e1, e2),
                _mm256_sub_ps(e2, e1),
                _mm256_sub_ps(e1, e3),
            ];
            let n = TB.min(tw - t0);
            // Lanes below `n` set: the last step's stores stop at the run's end.
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane_index);
            for (col, out) in out.into_iter().enumerate() {
                // SAFETY: tiles t0 .. t0 + n of run `col` lie inside `v`.
                unsafe {
                    let dst = vp.add(at[col] + t0);
                    if n == TB {
                        _mm256_storeu_ps(dst, out);
                    } else {
                        _mm256_maskstore_ps(dst, mask, out);
                    }
                }
            }
        }
    }
}

#[inline(always)]
fn sub(dst: &mut [f32], a: &[f32], b: &[f32]) {
    for ((d, &a), &b) in dst.iter_mut().zip(a).zip(b) {
        *d = a - b;
    }
}

#[inline(always)]
fn add(dst: &mut [f32], a: &[f32], b: &[f32]) {
    for ((d, &a), &b) in dst.iter_mut().zip(a).zip(b) {
        *d = a + b;
    }
}

simd_kernel!(
    /// Tile row `ty`: for each of its tiles (`first + tx` in the chunk's
    /// products `m`, `[16, stride, oc]`), `Aᵀ·M·A` with `Aᵀ = [[1, 1, 1,
    /// 0], [0, 1, -1, -1]]`, written into the image's pixel-major rows
    /// `out` (`[H·W, oc]`); the tile's pixels past the plane's edge are
    /// dropped.
    fn output_row => output_row_body(
        m: &[f32],
        stride: usize,
        oc: usize,
        first: usize,
        ty: usize,
        h: usize,
        w: usize,
        out: &mut [f32]
    )
);

/// Lanes per step of [`output_row`]: `oc` is a multiple of 16.
const LANES: usize = 16;

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn output_row_body(
    m: &[f32],
    stride: usize,
    oc: usize,
    first: usize,
    ty: usize,
    h: usize,
    w: usize,
    out: &mut [f32],
) {
    let tw = w.div_ceil(2);
    for tx in 0..tw {
        let t = first + tx;
        for k in (0..oc).step_by(LANES) {
            let mut s = [[[0f32; LANES]; 4]; 2];
            for col in 0..4 {
                let at = |a: usize| {
                    let i = ((a * 4 + col) * stride + t) * oc + k;
                    <&[f32; LANES]>::try_from(&m[i..i + LANES]).expect("LANES values")
                };
                let (m0, m1, m2, m3) = (at(0), at(1), at(2), at(3));
                for l in 0..LANES {
                    s[0][col][l] = m0[l] + m1[l] + m2[l];
                    s[1][col][l] = m1[l] - m2[l] - m3[l];
                }
            }
            for (i, s) in s.iter().enumerate() {
                let y = 2 * ty + i;
                if y >= h {
                    continue;
                }
                for j in 0..2 {
                    let x = 2 * tx + j;
                    if x >= w {
                        continue;
                    }
                    let at = (y * w + x) * oc + k;
                    let dst = &mut out[at..at + LANES];
                    for l in 0..LANES {
                        dst[l] = if j == 0 {
                            s[0][l] + s[1][l] + s[2][l]
                        } else {
                            s[1][l] - s[2][l] - s[3][l]
                        };
                    }
                }
            }
        }
    }
}
