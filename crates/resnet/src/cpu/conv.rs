//! 2-D convolution on the CPU: im2col + `gemm` (or, with AVX2/AVX-512, for
//! convolutions onto planes of 128 pixels and more and for the image's
//! `f64` convolution, the direct kernels in `direct.rs`), with a backward
//! pass that computes only the gradients something needs.
//!
//! Shapes: input `[N, C, H, W]`, kernel `[O, C, kh, kw]`, output
//! `[N, O, OH, OW]`, one group, no dilation, the same padding and stride on
//! both axes. Per image, with `K = C·kh·kw` and `P = OH·OW`:
//!
//! - forward: `Y[n] = W · col(X[n])`, `W` as `[O, K]`, `col` as `[K, P]`;
//! - input gradient: `dX[n] = col2im(Wᵀ · dY[n])`;
//! - kernel gradient: `dW = Σₙ dY[n] · col(X[n])ᵀ`.
//!
//! A 1×1 stride-1 convolution needs no `col`: `X[n]` already is `[C, P]`.
//! Where `P` is small (the last stages at 128 px have 4×4 pixels) several
//! images share one matrix product, so `gemm` sees a useful width. Images
//! (or groups of images) run in parallel on rayon's pool with single-threaded
//! products, which beats splitting each product across threads at these
//! sizes; when there are fewer groups than threads, the products are split
//! instead.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::Uninit;
use super::direct;
use super::simd::simd_kernel;
use super::winograd;

/// Shapes of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(super) n: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) o: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) padding: usize,
    pub(super) stride: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
}

/// Partial sums of a kernel gradient (see [`kernel_grad`]).
const KERNEL_GRAD_TASKS: usize = 8;

/// Matrix width below which images are grouped into one product.
const MIN_COLUMNS: usize = 256;

/// Input channels up to which the forward pass is computed in `f64` (see
/// [`forward_exact`]): an image's 1 to 4 planes (and any other convolution
/// that narrow, which is as cheap).
const EXACT_MAX_CHANNELS: usize = 4;

impl Geometry {
    pub(crate) fn new(
        x: (usize, usize, usize, usize),
        k: (usize, usize, usize, usize),
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let (n, c, h, w) = x;
        let (o, c_k, kh, kw) = k;
        if c != c_k {
            candle_core::bail!(
                "cpu conv2d: input has {c} channels but the kernel expects {c_k}; check the kernel shape"
            )
        }
        if stride == 0 {
            candle_core::bail!("cpu conv2d: stride must be at least 1")
        }
        if h + 2 * padding < kh || w + 2 * padding < kw {
            candle_core::bail!(
                "cpu conv2d: a {kh}x{kw} kernel does not fit a {h}x{w} input with padding {padding}"
            )
        }
        let oh = (h + 2 * padding - kh) / stride + 1;
        let ow = (w + 2 * padding - kw) / stride + 1;
        Ok(Self {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            padding,
            stride,
            oh,
            ow,
        })
    }

    /// Rows of `col`: `C·kh·kw`.
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output pixels per image.
    pub(super) fn p(&self) -> usize {
        self.oh * self.ow
    }

    /// Whether the input itself is `col` (1×1, stride 1, no padding).
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// Whether [`forward`] accumulates in `f64` and rounds once: for a
    /// convolution with at most [`EXACT_MAX_CHANNELS`] input channels (in a
    /// ResNet of the usual widths, only the stem, which reads the image).
    pub(super) fn exact(&self) -> bool {
        self.c <= EXACT_MAX_CHANNELS
    }

    /// The direct kernel for this convolution, where it applies (see
    /// [`direct::Direct::plan`]).
    fn direct(&self) -> Option<direct::Direct> {
        direct::Direct::plan(self)
    }

    /// Images per matrix product.
    fn group(&self) -> usize {
        MIN_COLUMNS.div_ceil(self.p()).clamp(1, self.n.max(1))
    }

    pub(crate) fn out_dims(&self) -> (usize, usize, usize, usize) {
        (self.n, self.o, self.oh, self.ow)
    }
}

/// Planes of at most this many output pixels take their `col` rows from a
/// gather table (see [`gather_table`]) rather than row by row.
const TABLE_MAX_PIXELS: usize = 64;

/// For a small output plane: for each kernel offset `(ki, kj)` and output
/// pixel `j`, the input pixel it reads (`usize::MAX` where that is
/// padding), `kh·kw·P` entries. Rows of 2×2 to 8×8 pixels make row-by-row
/// copies mostly bookkeeping; with the table each row of `col` is one short
/// loop, and `col2im` adds back in the same order as the row-by-row loop.
fn gather_table(g: &Geometry) -> Option<Vec<usize>> {
    (g.p() <= TABLE_MAX_PIXELS).then(|| table_of(g))
}

/// [`gather_table`] at any size.
fn table_of(g: &Geometry) -> Vec<usize> {
    let mut table = Vec::with_capacity(g.kh * g.kw * g.p());
    for ki in 0..g.kh {
        for kj in 0..g.kw {
            for y in 0..g.oh {
                for x in 0..g.ow {
                    let iy = (y * g.stride + ki)
                        .checked_sub(g.padding)
                        .filter(|&v| v < g.h);
                    let ix = (x * g.stride + kj)
                        .checked_sub(g.padding)
                        .filter(|&v| v < g.w);
                    table.push(match (iy, ix) {
                        (Some(iy), Some(ix)) => iy * g.w + ix,
                        _ => usize::MAX,
                    });
                }
            }
        }
    }
    table
}

/// Writes `col` of `count` consecutive images of `xs` (`[count, C, H, W]`)
/// into `col`, a `[K, ld]` row-major matrix, image `b` at columns `b·P..`.
/// With `par`, the input channels (each a block of `kh·kw` rows) are spread
/// over rayon's pool.
/// `table` is [`gather_table`]'s for `g`, made once per call of the op.
fn im2col_images(
    g: &Geometry,
    xs: &[f32],
    count: usize,
    col: &mut [f32],
    ld: usize,
    par: bool,
    table: Option<&[usize]>,
) {
    let plane = g.h * g.w;
    let img = g.c * plane;
    let block = g.kh * g.kw * ld;
    let run = |(ci, rows): (usize, &mut [f32])| {
        for b in 0..count {
            let x = &xs[b * img + ci * plane..b * img + (ci + 1) * plane];
            im2col_channel(g, x, rows, ld, b * g.p(), table);
        }
    };
    let blocks = &mut col[..g.c * block];
    if par {
        blocks.par_chunks_mut(block).enumerate().for_each(run);
    } else {
        blocks.chunks_mut(block).enumerate().for_each(run);
    }
}

simd_kernel! {
    /// Writes the `kh·kw` rows of `col` (`[kh·kw, ld]`, at column offset
    /// `at`) that read one input channel's plane `[H, W]`.
    fn im2col_channel => im2col_channel_body(
        g: &Geometry,
        plane: &[f32],
        rows: &mut [f32],
        ld: usize,
        at: usize,
        table: Option<&[usize]>,
    )
}

#[inline(always)]
fn im2col_channel_body(
    g: &Geometry,
    plane: &[f32],
    rows: &mut [f32],
    ld: usize,
    at: usize,
    table: Option<&[usize]>,
) {
    let (oh, ow, p, s) = (g.oh, g.ow, g.padding, g.stride);
    let n = oh * ow;
    if let Some(table) = table {
        for (kk, from) in table.chunks_exact(n).enumerate() {
            let row = &mut rows[kk * ld + at..kk * ld + at + n];
            for (d, &i) in row.iter_mut().zip(from) {
                *d = plane.get(i).copied().unwrap_or(0.0);
            }
        }
        return;
    }
    if s > 1 {
        return with_phases(|phases| {
            split_phases(g, plane, phases);
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let r = ki * g.kw + kj;
                    phase_rows(g, phases, &mut rows[r * ld + at..r * ld + at + n], ki, kj);
                }
            }
        });
    }
    for ki in 0..g.kh {
        for kj in 0..g.kw {
            let r = ki * g.kw + kj;
            let row = &mut rows[r * ld + at..r * ld + at + n];
            // Output columns whose input column `ow·s + kj − p` is inside.
            let lo = p.saturating_sub(kj).div_ceil(s).min(ow);
            let hi = if g.w + p > kj {
                ((g.w + p - kj - 1) / s + 1).min(ow)
            } else {
                0
            }
            .max(lo);
            if ow == g.w {
                shifted_rows(g, plane, row, ki, kj, lo, hi);
                continue;
            }
            for y in 0..oh {
                let out = &mut row[y * ow..(y + 1) * ow];
                let iy = (y + ki) as isize - p as isize;
                if iy < 0 || iy >= g.h as isize {
                    out.fill(0.0);
                    continue;
                }
                let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                out[..lo].fill(0.0);
                out[hi..].fill(0.0);
                if hi > lo {
                    let first = lo + kj - p;
                    out[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                }
            }
        }
    }
}

/// One row of `col` for a stride-1 convolution whose output is as wide as
/// its input ("same" padding): the output pixel `(y, x)` reads the input at
/// `(y + ki − p, x + kj − p)`, so the rows whose input row is inside are one
/// contiguous stretch of the plane, shifted. One copy moves it all, and the
/// columns outside `lo..hi` (whose reads wrapped into the neighbouring
/// rows) and the rows outside the input are zeroed. The same values as the
/// row-by-row loop, with one copy per row of `col` instead of one per output
/// row, which is what costs on small planes.
#[inline(always)]
fn shifted_rows(
    g: &Geometry,
    plane: &[f32],
    row: &mut [f32],
    ki: usize,
    kj: usize,
    lo: usize,
    hi: usize,
) {
    let (oh, ow, p, w) = (g.oh, g.ow, g.padding, g.w);
    // Output rows whose input row `y + ki − p` is in `0..h`.
    let y_lo = p.saturating_sub(ki).min(oh);
    let y_hi = (g.h + p).saturating_sub(ki).min(oh).max(y_lo);
    row[..y_lo * ow].fill(0.0);
    row[y_hi * ow..].fill(0.0);
    if y_hi == y_lo {
        return;
    }
    let inside = &mut row[y_lo * ow..y_hi * ow];
    // Index in `plane` of output pixel `(y_lo, 0)`; may be negative, and
    // the stretch may run past the plane's end, only where `x` is outside
    // `lo..hi`.
    let start = ((y_lo + ki - p) * w) as isize + kj as isize - p as isize;
    let first = start.max(0) as usize;
    let skip = (first as isize - start) as usize;
    let end = (start + inside.len() as isize).clamp(0, plane.len() as isize) as usize;
    if end > first {
        inside[skip..skip + (end - first)].copy_from_slice(&plane[first..end]);
    }
    if lo > 0 || hi < ow {
        for out in inside.chunks_exact_mut(ow) {
            out[..lo].fill(0.0);
            out[hi..].fill(0.0);
        }
    }
}

/// A strided convolution's input plane split into its `s × s` phases:
/// phase `(a, b)` holds the pixels `(r·s + a, c·s + b)` as a
/// `⌈h/s⌉ × ⌈w/s⌉` plane, zero where that runs past the input. Output pixel
/// `(y, x)` with kernel offset `(ki, kj)` reads input `(y·s + ki − p, x·s +
/// kj − p)`, which is one phase's pixel `(y + qi, x + qj)` with `ki − p =
/// qi·s + a`: so each row of `col` is, row by row, a contiguous copy out of
/// one phase instead of a gather with stride `s`, and the plane is read with
/// a stride once, not `kh·kw` times. The values copied are the same.
struct Phases {
    rows: usize,
    cols: usize,
}

impl Phases {
    fn of(g: &Geometry) -> Self {
        Self {
            rows: g.h.div_ceil(g.stride),
            cols: g.w.div_ceil(g.stride),
        }
    }

    /// The phase and the shift `(a, q)` along one axis for kernel offset `k`:
    /// `k − padding = q·s + a`, `0 ≤ a < s`.
    fn split(g: &Geometry, k: usize) -> (usize, isize) {
        let off = k as isize - g.padding as isize;
        let s = g.stride as isize;
        (off.rem_euclid(s) as usize, off.div_euclid(s))
    }

    /// For output coordinate range `0..out` reading phase index `o + q`:
    /// the outputs `lo..hi` whose read lands in `0..len`.
    fn valid(out: usize, len: usize, q: isize) -> (usize, usize) {
        let lo = (-q).clamp(0, out as isize) as usize;
        let hi = (len as isize - q).clamp(lo as isize, out as isize) as usize;
        (lo, hi)
    }
}

/// Runs `f` with this thread's phase buffer (see [`Phases`]).
#[inline(always)]
fn with_phases(f: impl FnOnce(&mut Vec<f32>)) {
    use std::cell::RefCell;
    thread_local! {
        static PHASES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }
    PHASES.with(|b| f(&mut b.borrow_mut()));
}

/// Splits one input plane `[H, W]` into its phases (see [`Phases`]).
#[inline(always)]
fn split_phases(g: &Geometry, plane: &[f32], phases: &mut Vec<f32>) {
    let ph = Phases::of(g);
    let s = g.stride;
    let size = ph.rows * ph.cols;
    phases.clear();
    phases.resize(s * s * size, 0.0);
    for a in 0..s {
        for b in 0..s {
            let phase = &mut phases[(a * s + b) * size..(a * s + b + 1) * size];
            for (r, iy) in (a..g.h).step_by(s).enumerate() {
                let src = &plane[iy * g.w..(iy + 1) * g.w];
                let dst = &mut phase[r * ph.cols..(r + 1) * ph.cols];
                for (d, v) in dst.iter_mut().zip(src[b.min(g.w)..].iter().step_by(s)) {
                    *d = *v;
                }
            }
        }
    }
}

/// One row of `col` (kernel offset `(ki, kj)`) of a strided convolution,
/// copied out of the phases.
#[inline(always)]
fn phase_rows(g: &Geometry, phases: &[f32], row: &mut [f32], ki: usize, kj: usize) {
    let ph = Phases::of(g);
    let (a, qi) = Phases::split(g, ki);
    let (b, qj) = Phases::split(g, kj);
    let size = ph.rows * ph.cols;
    let phase = &phases[(a * g.stride + b) * size..(a * g.stride + b + 1) * size];
    let (y_lo, y_hi) = Phases::valid(g.oh, ph.rows, qi);
    let (lo, hi) = Phases::valid(g.ow, ph.cols, qj);
    let ow = g.ow;
    row[..y_lo * ow].fill(0.0);
    row[y_hi * ow..].fill(0.0);
    for y in y_lo..y_hi {
        let out = &mut row[y * ow..(y + 1) * ow];
        out[..lo].fill(0.0);
        out[hi..].fill(0.0);
        let r = (y as isize + qi) as usize;
        let c = (lo as isize + qj) as usize;
        out[lo..hi].copy_from_slice(&phase[r * ph.cols + c..r * ph.cols + c + hi - lo]);
    }
}

/// The adjoint of [`phase_rows`]: adds one row of `col` into the phases.
/// Each phase pixel gets its terms in the same order as the strided loop
/// would add them into the plane.
#[inline(always)]
fn add_phase_rows(g: &Geometry, row: &[f32], ki: usize, kj: usize, phases: &mut [f32]) {
    let ph = Phases::of(g);
    let s = g.stride;
    let size = ph.rows * ph.cols;
    let (a, qi) = Phases::split(g, ki);
    let (b, qj) = Phases::split(g, kj);
    let phase = &mut phases[(a * s + b) * size..(a * s + b + 1) * size];
    let (y_lo, y_hi) = Phases::valid(g.oh, ph.rows, qi);
    let (lo, hi) = Phases::valid(g.ow, ph.cols, qj);
    for y in y_lo..y_hi {
        let src = &row[y * g.ow + lo..y * g.ow + hi];
        let r = (y as isize + qi) as usize;
        let c = (lo as isize + qj) as usize;
        for (d, v) in phase[r * ph.cols + c..r * ph.cols + c + hi - lo]
            .iter_mut()
            .zip(src)
        {
            *d += *v;
        }
    }
}

/// Adds the phases back into the plane's gradient `[H, W]`; the phase
/// pixels past the input's edge (padding) are dropped.
#[inline(always)]
fn merge_phases(g: &Geometry, phases: &[f32], plane: &mut [f32]) {
    let ph = Phases::of(g);
    let s = g.stride;
    let size = ph.rows * ph.cols;
    for a in 0..s {
        for b in 0..s.min(g.w) {
            let phase = &phases[(a * s + b) * size..(a * s + b + 1) * size];
            for (r, iy) in (a..g.h).step_by(s).enumerate() {
                let src = &phase[r * ph.cols..(r + 1) * ph.cols];
                let dst = &mut plane[iy * g.w + b..(iy + 1) * g.w];
                for (d, v) in dst.iter_mut().step_by(s).zip(src) {
                    *d += *v;
                }
            }
        }
    }
}

/// Adds `col` (`[K, ld]`, one image's columns at offset `at`) back into
/// that image's gradient `dx` (`[C, H, W]`): the adjoint of
/// [`im2col_images`]. Each pixel gets its terms in the order `(ki, kj, y,
/// x)`, whichever path runs, so into a zeroed `dx` the sums are the same
/// to the bit.
fn col2im(
    g: &Geometry,
    col: &[f32],
    ld: usize,
    at: usize,
    dx: &mut [f32],
    table: Option<&[usize]>,
) {
    let plane = g.h * g.w;
    let block = g.kh * g.kw * ld;
    for ci in 0..g.c {
        col2im_channel(
            g,
            &col[ci * block..(ci + 1) * block],
            ld,
            at,
            &mut dx[ci * plane..(ci + 1) * plane],
            table,
        );
    }
}

simd_kernel! {
    /// [`col2im`] for one input channel: its `kh·kw` rows into its plane.
    fn col2im_channel => col2im_channel_body(
        g: &Geometry,
        rows: &[f32],
        ld: usize,
        at: usize,
        dx: &mut [f32],
        table: Option<&[usize]>,
    )
}

#[inline(always)]
fn col2im_channel_body(
    g: &Geometry,
    rows: &[f32],
    ld: usize,
    at: usize,
    dx: &mut [f32],
    table: Option<&[usize]>,
) {
    let (oh, ow, p, s) = (g.oh, g.ow, g.padding, g.stride);
    let n = oh * ow;
    if let Some(table) = table {
        for (kk, to) in table.chunks_exact(n).enumerate() {
            let row = &rows[kk * ld + at..kk * ld + at + n];
            for (&v, &i) in row.iter().zip(to) {
                if let Some(d) = dx.get_mut(i) {
                    *d += v;
                }
            }
        }
        return;
    }
    if s > 1 {
        return with_phases(|phases| {
            let ph = Phases::of(g);
            phases.clear();
            phases.resize(s * s * ph.rows * ph.cols, 0.0);
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let r = ki * g.kw + kj;
                    add_phase_rows(g, &rows[r * ld + at..r * ld + at + n], ki, kj, phases);
                }
            }
            merge_phases(g, phases, dx);
        });
    }
    for ki in 0..g.kh {
        for kj in 0..g.kw {
            let r = ki * g.kw + kj;
            let row = &rows[r * ld + at..r * ld + at + n];
            let lo = p.saturating_sub(kj).min(ow);
            let hi = if g.w + p > kj {
                (g.w + p - kj).min(ow)
            } else {
                0
            }
            .max(lo);
            if hi == lo {
                continue;
            }
            for y in 0..oh {
                let iy = (y + ki) as isize - p as isize;
                if iy < 0 || iy >= g.h as isize {
                    continue;
                }
                let src = &row[y * ow + lo..y * ow + hi];
                let first = lo + kj - p;
                let dst = &mut dx[iy as usize * g.w + first..iy as usize * g.w + first + hi - lo];
                for (d, v) in dst.iter_mut().zip(src) {
                    *d += *v;
                }
            }
        }
    }
}

/// A row-major `rows × cols` view with leading dimension `ld`, possibly transposed.
#[derive(Clone, Copy)]
pub(super) struct Mat {
    pub(super) ptr: *const f32,
    /// Row stride (elements).
    pub(super) rs: isize,
    /// Column stride (elements).
    pub(super) cs: isize,
}

// SAFETY: a `Mat` only reads, from buffers that outlive the parallel loops using it.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

impl Mat {
    fn rows(ptr: *const f32, ld: usize) -> Self {
        Self {
            ptr,
            rs: ld as isize,
            cs: 1,
        }
    }

    fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]`; `dst` is row-major with leading dimension `ld`.
///
/// # Safety
/// The views must cover the stated shapes and `dst` must not alias them.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    ld: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    threads: usize,
) {
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller guarantees the shapes and strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            ld as isize,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// How to spread `groups` independent pieces of work over rayon's pool:
/// `(parallel over groups, threads inside each product)`.
fn plan(groups: usize) -> (bool, usize) {
    let threads = rayon::current_num_threads();
    if groups >= threads {
        (true, 1)
    } else {
        (false, threads)
    }
}

/// Runs `f` with this thread's two scratch buffers, kept between calls so
/// that im2col matrices are neither allocated nor zeroed per image.
fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>, &mut Vec<f32>) -> R) -> R {
    use std::cell::RefCell;
    thread_local! {
        static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let (a, b) = &mut *s;
        f(a, b)
    })
}

/// `col(xs)` of one image as a `[K, P]` matrix: the image itself for a
/// pointwise conv, else written into `col`.
fn image_col(
    g: &Geometry,
    xs: &[f32],
    col: &mut Vec<f32>,
    par: bool,
    table: Option<&[usize]>,
) -> Mat {
    if g.pointwise() {
        return Mat::rows(xs.as_ptr(), g.p());
    }
    col.resize(g.k() * g.p(), 0.0);
    im2col_images(g, xs, 1, col, g.p(), par, table);
    Mat::rows(col.as_ptr(), g.p())
}

/// A raw view of a `MaybeUninit` chunk as the `f32` pointer gemm writes to.
pub(super) fn out_ptr(chunk: &mut [MaybeUninit<f32>]) -> *mut f32 {
    chunk.as_mut_ptr().cast()
}

/// What [`forward`] applies to each output row `(image, channel)` while it
/// is still in cache: `relu?(v · scale[c] + shift[c] (+ residual))`, the
/// eval-mode BatchNorm, residual add and ReLU after a convolution. The same
/// operations in the same order as the separate ops, so the result is the
/// same to the bit.
pub(crate) struct Epilogue<'a> {
    pub(crate) scale: &'a [f32],
    pub(crate) shift: &'a [f32],
    /// `[N, O, OH, OW]`, like the output.
    pub(crate) residual: Option<&'a [f32]>,
    pub(crate) relu: bool,
}

impl Epilogue<'_> {
    /// Writes the epilogue of `src`, output row `row` (`image·O + channel`), into `dst`.
    #[inline(always)]
    fn apply(&self, row: usize, channels: usize, src: &[f32], dst: &mut [MaybeUninit<f32>]) {
        let c = row % channels;
        let (a, b) = (self.scale[c], self.shift[c]);
        let len = src.len();
        match (self.residual, self.relu) {
            (Some(r), true) => {
                let r = &r[row * len..(row + 1) * len];
                for ((d, &v), &r) in dst.iter_mut().zip(src).zip(r) {
                    d.write((v * a + b + r).max(0.0));
                }
            }
            (Some(r), false) => {
                let r = &r[row * len..(row + 1) * len];
                for ((d, &v), &r) in dst.iter_mut().zip(src).zip(r) {
                    d.write(v * a + b + r);
                }
            }
            (None, true) => {
                for (d, &v) in dst.iter_mut().zip(src) {
                    d.write((v * a + b).max(0.0));
                }
            }
            (None, false) => {
                for (d, &v) in dst.iter_mut().zip(src) {
                    d.write(v * a + b);
                }
            }
        }
    }
}

pub(crate) fn forward(
    g: &Geometry,
    x: &[f32],
    kernel: &[f32],
    epilogue: Option<&Epilogue>,
) -> Vec<f32> {
    if let Some(d) = g.direct() {
        let mut out = Uninit::new(g.n * g.o * g.p());
        let p = g.p();
        direct::forward(&d, x, kernel, out.as_mut_slice(), |first, planes| {
            if let Some(e) = epilogue {
                // SAFETY: the direct kernel wrote these planes.
                unsafe { epilogue_in_place(e, first, g.o, p, planes) };
            }
        });
        // SAFETY: the direct kernel writes every output value.
        return unsafe { out.finish() };
    }
    if g.exact() {
        return forward_exact(g, x, kernel, epilogue);
    }
    let (k, p, o) = (g.k(), g.p(), g.o);
    let img_in = g.c * g.h * g.w;
    let img_out = o * p;
    let group = g.group();
    let groups = g.n.div_ceil(group);
    let len = g.n * img_out;
    let mut out = Uninit::new(len);
    let (par, threads) = plan(groups);
    let table = gather_table(g);
    let table = table.as_deref();
    let run = |(gi, out): (usize, &mut [MaybeUninit<f32>])| {
        with_scratch(|col, tmp| {
            let first = gi * group;
            let count = out.len() / img_out;
            let lhs = Mat::rows(kernel.as_ptr(), k);
            if count == 1 {
                let rhs = image_col(
                    g,
                    &x[first * img_in..(first + 1) * img_in],
                    col,
                    !par,
                    table,
                );
                // SAFETY: `out` is `[O, P]`, `lhs` `[O, K]`, `rhs` `[K, P]`;
                // gemm writes every value without reading any.
                unsafe { matmul(o, p, k, out_ptr(out), p, false, lhs, rhs, threads) };
                if let Some(e) = epilogue {
                    // SAFETY: gemm wrote every value of the image's output.
                    unsafe { epilogue_in_place(e, first * o, o, p, out) };
                }
                return;
            }
            let ld = count * p;
            col.resize(k * ld, 0.0);
            let xs = &x[first * img_in..(first + count) * img_in];
            im2col_images(g, xs, count, col, ld, !par, table);
            tmp.resize(o * ld, 0.0);
            // SAFETY: `tmp` is `[O, ld]`, `col` `[K, ld]`.
            unsafe {
                matmul(
                    o,
                    ld,
                    k,
                    tmp.as_mut_ptr(),
                    ld,
                    false,
                    lhs,
                    Mat::rows(col.as_ptr(), ld),
                    threads,
                )
            };
            scatter_group(g, tmp, first, out, epilogue);
        })
    };
    for_each_group(&mut out, group * img_out, par, run);
    // SAFETY: each chunk was written in full above.
    unsafe { out.finish() }
}

/// Applies `e` in place to the consecutive output rows of `p` values in
/// `rows`, the first of them output row `first` (`image·O + channel`).
///
/// # Safety
/// Every value in `rows` has been written.
unsafe fn epilogue_in_place(
    e: &Epilogue,
    first: usize,
    channels: usize,
    p: usize,
    rows: &mut [MaybeUninit<f32>],
) {
    epilogue_rows(e, first, channels, p, rows)
}

simd_kernel! {
    /// The loop of [`epilogue_in_place`].
    fn epilogue_rows => epilogue_rows_body(
        e: &Epilogue,
        first: usize,
        channels: usize,
        p: usize,
        rows: &mut [MaybeUninit<f32>],
    )
}

#[inline(always)]
fn epilogue_rows_body(
    e: &Epilogue,
    first: usize,
    channels: usize,
    p: usize,
    rows: &mut [MaybeUninit<f32>],
) {
    for (i, row) in rows.chunks_mut(p).enumerate() {
        // SAFETY: the caller of `epilogue_in_place` wrote the row; the
        // epilogue rewrites it in place, value by value.
        let src = unsafe { std::slice::from_raw_parts(row.as_ptr().cast(), row.len()) };
        e.apply(first + i, channels, src, row);
    }
}

simd_kernel! {
    /// Writes one group's product `[O, count·P]` (its images side by side)
    /// into their outputs `[count, O, P]`, applying the epilogue if there
    /// is one.
    fn scatter_group => scatter_group_body(
        g: &Geometry,
        product: &[f32],
        first: usize,
        out: &mut [MaybeUninit<f32>],
        epilogue: Option<&Epilogue>,
    )
}

#[inline(always)]
fn scatter_group_body(
    g: &Geometry,
    product: &[f32],
    first: usize,
    out: &mut [MaybeUninit<f32>],
    epilogue: Option<&Epilogue>,
) {
    let (p, o) = (g.p(), g.o);
    let img_out = o * p;
    let count = out.len() / img_out;
    let ld = count * p;
    for b in 0..count {
        for oc in 0..o {
            let src = &product[oc * ld + b * p..oc * ld + (b + 1) * p];
            let dst = &mut out[b * img_out + oc * p..b * img_out + (oc + 1) * p];
            match epilogue {
                Some(e) => e.apply((first + b) * o + oc, o, src, dst),
                None => {
                    for (d, s) in dst.iter_mut().zip(src) {
                        d.write(*s);
                    }
                }
            }
        }
    }
}

/// Runs `run` on each group's output chunk (`(group index, chunk)`), on
/// rayon's pool when `par`.
fn for_each_group(
    out: &mut Uninit,
    chunk: usize,
    par: bool,
    run: impl Fn((usize, &mut [MaybeUninit<f32>])) + Send + Sync,
) {
    let chunks = out.as_mut_slice();
    if par {
        chunks.par_chunks_mut(chunk).enumerate().for_each(run);
    } else {
        chunks.chunks_mut(chunk).enumerate().for_each(run);
    }
}

/// [`forward`] for the convolution that reads the image (any convolution
/// with at most [`EXACT_MAX_CHANNELS`] input channels): products
/// accumulated in `f64` and rounded to `f32` once, so every output is
/// within half a unit in the last place of its dot product but for the
/// rare sum whose `f64` error straddles a rounding boundary, whatever the
/// summation order.
///
/// Why this one layer: its rounding is the first noise in the network, and a
/// deep network in train mode amplifies it through every BatchNorm after it
/// (at ResNet-50's depth with narrow layers, by about 1e4). With `f32`
/// accumulation our stem's outputs were 4.9e-7 from the `f64` truth and the
/// ResNet-50 parity case ended 6.5 times further from PyTorch's `f64`
/// reference than PyTorch's own `f32`; see `tests/parity.rs` for the figures
/// with this path. The cost is small: with 3 input channels `K` is 147 (7×7
/// kernel), about 5% of ResNet-50's forward work, and `f64` products take
/// about twice as long.
///
/// With AVX2 or AVX-512 and output channels in blocks of 8, [`forward`]
/// runs the direct kernel's `f64` variant instead (`direct.rs`), with the
/// same guarantee: no im2col, no `f64` copy of `col`, and on two cores
/// (AVX-512, batch 64 at 128 px) 30 ms where this path took 51 and
/// PyTorch's `f32` convolution 42. This one is for the baseline level and
/// other channel counts.
fn forward_exact(g: &Geometry, x: &[f32], kernel: &[f32], epilogue: Option<&Epilogue>) -> Vec<f32> {
    use std::cell::RefCell;
    thread_local! {
        static SCRATCH: RefCell<(Vec<f64>, Vec<f64>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }
    let (k, p, o) = (g.k(), g.p(), g.o);
    let img_in = g.c * g.h * g.w;
    let img_out = o * p;
    let group = g.group();
    let groups = g.n.div_ceil(group);
    let kernel64: Vec<f64> = kernel.iter().map(|&v| f64::from(v)).collect();
    let mut out = Uninit::new(g.n * img_out);
    let (par, threads) = plan(groups);
    let table = gather_table(g);
    let table = table.as_deref();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let run = |(gi, out): (usize, &mut [MaybeUninit<f32>])| {
        let first = gi * group;
        let count = out.len() / img_out;
        let ld = count * p;
        with_scratch(|col, rounded| {
            col.resize(k * ld, 0.0);
            let xs = &x[first * img_in..(first + count) * img_in];
            im2col_images(g, xs, count, col, ld, !par, table);
            SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                let (col64, acc) = &mut *s;
                col64.clear();
                col64.extend(col.iter().map(|&v| f64::from(v)));
                acc.resize(o * ld, 0.0);
                // SAFETY: `acc` is `[O, ld]`, `kernel64` `[O, K]`, `col64`
                // `[K, ld]`, all row-major and distinct.
                unsafe {
                    gemm::gemm(
                        o,
                        ld,
                        k,
                        acc.as_mut_ptr(),
                        1,
                        ld as isize,
                        false,
                        kernel64.as_ptr(),
                        1,
                        k as isize,
                        col64.as_ptr(),
                        1,
                        ld as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        parallelism,
                    )
                };
                rounded.clear();
                rounded.extend(acc.iter().map(|&v| v as f32));
            });
            scatter_group(g, rounded, first, out, epilogue);
        })
    };
    for_each_group(&mut out, group * img_out, par, run);
    // SAFETY: each chunk was written in full above.
    unsafe { out.finish() }
}

/// For a stride-1 convolution that is not pointwise, the geometry of its
/// input gradient as a forward convolution: `dx = conv(grad, W')` with
/// `W'[c, o, i, j] = W[o, c, kh−1−i, kw−1−j]` and padding `kh−1−p` (square
/// kernels only, so that one padding fits both sides).
fn input_grad_as_forward(g: &Geometry) -> Option<Geometry> {
    if g.stride != 1 || g.pointwise() || g.kh != g.kw || g.padding >= g.kh {
        return None;
    }
    let padding = g.kh - 1 - g.padding;
    let fwd = Geometry::new((g.n, g.o, g.oh, g.ow), (g.c, g.o, g.kh, g.kw), padding, 1).ok()?;
    // With stride 1 the result is the input's size (checked all the same);
    // with at most 4 output channels the forward would take its f64 path,
    // so those keep col2im.
    ((fwd.oh, fwd.ow) == (g.h, g.w) && !fwd.exact()).then_some(fwd)
}

/// `W'` of [`input_grad_as_forward`]: `[C, O, kh, kw]`, each kernel turned
/// by 180°.
fn flipped_kernel(g: &Geometry, kernel: &[f32]) -> Vec<f32> {
    let (kh, kw) = (g.kh, g.kw);
    let taps = kh * kw;
    let mut out = Uninit::new(kernel.len());
    out.as_mut_slice()
        .par_chunks_mut(g.o * taps)
        .enumerate()
        .for_each(|(c, dst)| {
            for (o, dst) in dst.chunks_mut(taps).enumerate() {
                let src = &kernel[(o * g.c + c) * taps..(o * g.c + c + 1) * taps];
                for (d, &v) in dst.iter_mut().zip(src.iter().rev()) {
                    d.write(v);
                }
            }
        });
    // SAFETY: each of the C chunks wrote its O·kh·kw values.
    unsafe { out.finish() }
}

pub(crate) fn input_grad(g: &Geometry, grad: &[f32], kernel: &[f32]) -> Vec<f32> {
    // A stride-1 gradient is a forward convolution: im2col of the output
    // gradient and one product, instead of a product into `col` form and
    // col2im's read-modify-write of every input pixel kh·kw times.
    if let Some(fwd) = input_grad_as_forward(g) {
        if let Some(d) = fwd.direct().filter(direct::packs_kernel) {
            let mut dx = Uninit::new(g.n * g.c * g.h * g.w);
            direct::forward_flipped(&d, grad, kernel, dx.as_mut_slice(), |_, _| {});
            // SAFETY: the direct kernel writes every output value.
            return unsafe { dx.finish() };
        }
        return forward(&fwd, grad, &flipped_kernel(g, kernel), None);
    }
    let (k, p, o) = (g.k(), g.p(), g.o);
    let img_in = g.c * g.h * g.w;
    let img_out = o * p;
    let group = g.group();
    let groups = g.n.div_ceil(group);
    let len = g.n * img_in;
    let mut dx = Uninit::new(len);
    let (par, threads) = plan(groups);
    let table = gather_table(g);
    let table = table.as_deref();
    // Wᵀ: `[K, O]`.
    let lhs = Mat::rows(kernel.as_ptr(), k).t();
    let run = |(gi, dx): (usize, &mut [MaybeUninit<f32>])| {
        with_scratch(|dcol, tmp| {
            let first = gi * group;
            let count = dx.len() / img_in;
            if count == 1 && g.pointwise() {
                let gs = &grad[first * img_out..(first + 1) * img_out];
                // SAFETY: `dx` is `[C, P]` = `[K, P]`; gemm writes every value.
                unsafe {
                    matmul(
                        k,
                        p,
                        o,
                        out_ptr(dx),
                        p,
                        false,
                        lhs,
                        Mat::rows(gs.as_ptr(), p),
                        threads,
                    )
                };
                return;
            }
            let (rhs, ld) = if count == 1 {
                let gs = &grad[first * img_out..(first + 1) * img_out];
                (Mat::rows(gs.as_ptr(), p), p)
            } else {
                let ld = count * p;
                tmp.resize(o * ld, 0.0);
                for b in 0..count {
                    let gs = &grad[(first + b) * img_out..(first + b + 1) * img_out];
                    for oc in 0..o {
                        tmp[oc * ld + b * p..oc * ld + (b + 1) * p]
                            .copy_from_slice(&gs[oc * p..(oc + 1) * p]);
                    }
                }
                (Mat::rows(tmp.as_ptr(), ld), ld)
            };
            dcol.resize(k * ld, 0.0);
            // SAFETY: `dcol` is `[K, ld]`, `lhs` `[K, O]`, `rhs` `[O, ld]`.
            unsafe { matmul(k, ld, o, dcol.as_mut_ptr(), ld, false, lhs, rhs, threads) };
            if g.pointwise() {
                // Images side by side (a lone image was written in place
                // above): each image's rows are copied out, where col2im
                // would add them into zeros.
                for (b, dx) in dx.chunks_mut(img_in).enumerate() {
                    for (c, row) in dx.chunks_mut(p).enumerate() {
                        let src = &dcol[c * ld + b * p..c * ld + (b + 1) * p];
                        for (d, &v) in row.iter_mut().zip(src) {
                            d.write(v);
                        }
                    }
                }
                return;
            }
            // col2im adds into `dx`: zero this chunk here, while it is
            // about to be used, rather than the whole buffer up front.
            for v in dx.iter_mut() {
                v.write(0.0);
            }
            // SAFETY: initialised just above.
            let dx: &mut [f32] =
                unsafe { std::slice::from_raw_parts_mut(dx.as_mut_ptr().cast(), dx.len()) };
            let image = |(b, dx): (usize, &mut [f32])| col2im(g, dcol, ld, b * p, dx, table);
            // When groups already run in parallel, this one stays on its
            // thread; a lone group spreads its images over the pool.
            if par {
                dx.chunks_mut(img_in).enumerate().for_each(image);
            } else {
                dx.par_chunks_mut(img_in).enumerate().for_each(image);
            }
        })
    };
    let chunks = dx.as_mut_slice();
    if par {
        chunks
            .par_chunks_mut(group * img_in)
            .enumerate()
            .for_each(run);
    } else {
        chunks.chunks_mut(group * img_in).enumerate().for_each(run);
    }
    // SAFETY: each chunk was written in full above.
    unsafe { dx.finish() }
}

pub(crate) fn kernel_grad(g: &Geometry, x: &[f32], grad: &[f32]) -> Vec<f32> {
    if winograd::takes_kernel_grad(g) {
        return winograd::kernel_grad(g, x, grad);
    }
    let (k, p, o) = (g.k(), g.p(), g.o);
    let img_in = g.c * g.h * g.w;
    let img_out = o * p;
    let group = g.group();
    let groups = g.n.div_ceil(group);
    let (par, threads) = plan(groups);
    let table = gather_table(g);
    let table = table.as_deref();
    // Each task sums a contiguous range of groups into its own `[O, K]`;
    // the partial sums are added in task order. The split depends only on
    // the shapes, so the result does not depend on the thread count or on
    // which thread ran what; several tasks per thread let a thread that
    // finishes early take over work instead of idling.
    let per_task = groups.div_ceil(KERNEL_GRAD_TASKS.min(groups));
    // Every task gets at least one group (e.g. 9 groups: 5 tasks of 2, not 8).
    let tasks = groups.div_ceil(per_task);
    // With few output channels, `gemm` runs faster with them as the short
    // side of dWᵀ = col · Gᵀ than as the rows of dW = G · colᵀ (measured on
    // the ResNet-50 shapes: up to 1.4× for the stem and the 64- and
    // 128-channel stages, a little for 256, slower for 512). dWᵀ is
    // transposed when the partial sums are added.
    let transposed = o <= 256 && o < k;
    let partial = |t: usize| -> Vec<f32> {
        // The first product overwrites it (gemm does not read `dst` then).
        let mut dw = Uninit::new(o * k);
        let dw_ptr = out_ptr(dw.as_mut_slice());
        with_scratch(|col, tmp| {
            let mut accumulate = false;
            for gi in t * per_task..((t + 1) * per_task).min(groups) {
                let first = gi * group;
                let count = group.min(g.n - first);
                let ld = count * p;
                let (lhs, rhs) = if count == 1 {
                    let gs = &grad[first * img_out..(first + 1) * img_out];
                    let rhs = image_col(
                        g,
                        &x[first * img_in..(first + 1) * img_in],
                        col,
                        !par,
                        table,
                    );
                    (Mat::rows(gs.as_ptr(), p), rhs)
                } else {
                    col.resize(k * ld, 0.0);
                    tmp.resize(o * ld, 0.0);
                    let xs = &x[first * img_in..(first + count) * img_in];
                    im2col_images(g, xs, count, col, ld, !par, table);
                    for b in 0..count {
                        let gs = &grad[(first + b) * img_out..(first + b + 1) * img_out];
                        for oc in 0..o {
                            tmp[oc * ld + b * p..oc * ld + (b + 1) * p]
                                .copy_from_slice(&gs[oc * p..(oc + 1) * p]);
                        }
                    }
                    (Mat::rows(tmp.as_ptr(), ld), Mat::rows(col.as_ptr(), ld))
                };
                if transposed {
                    // SAFETY: `dw` is `[K, O]`, `rhs` `[K, ld]`, `lhs`ᵀ `[ld, O]`.
                    unsafe { matmul(k, o, ld, dw_ptr, o, accumulate, rhs, lhs.t(), threads) };
                } else {
                    // SAFETY: `dw` is `[O, K]`, `lhs` `[O, ld]`, `rhs`ᵀ `[ld, K]`.
                    unsafe { matmul(o, k, ld, dw_ptr, k, accumulate, lhs, rhs.t(), threads) };
                }
                accumulate = true;
            }
        });
        // SAFETY: the task's first product (it has at least one group)
        // wrote every value.
        unsafe { dw.finish() }
    };
    let parts: Vec<Vec<f32>> = if par && tasks > 1 {
        (0..tasks).into_par_iter().map(partial).collect()
    } else {
        (0..tasks).map(partial).collect()
    };
    if parts.len() == 1 && !transposed {
        return parts.into_iter().next().expect("one part");
    }
    sum_parts(&parts, o, k, transposed)
}

/// Output channels per task of [`sum_parts`]: 16 values of a `[K, O]` row
/// are one cache line.
const SUM_BLOCK: usize = 16;

/// `Σ parts` as `[O, K]`, the parts being `[O, K]` or, `transposed`, `[K, O]`.
/// Each value is summed in part order (`((p₀ + p₁) + p₂) + …`), so the
/// result does not depend on how the blocks are spread over threads.
fn sum_parts(parts: &[Vec<f32>], o: usize, k: usize, transposed: bool) -> Vec<f32> {
    let mut out = Uninit::new(o * k);
    let rows = out.as_mut_slice().par_chunks_mut(SUM_BLOCK * k).enumerate();
    rows.for_each(|(blk, dst)| {
        let oc0 = blk * SUM_BLOCK;
        let n_oc = dst.len() / k;
        if transposed {
            // Row r of every part holds output channels oc0..oc0 + n_oc
            // side by side: one cache line in, n_oc values out.
            for r in 0..k {
                let mut acc = [0f32; SUM_BLOCK];
                let acc = &mut acc[..n_oc];
                acc.copy_from_slice(&parts[0][r * o + oc0..r * o + oc0 + n_oc]);
                for part in &parts[1..] {
                    for (a, &v) in acc.iter_mut().zip(&part[r * o + oc0..]) {
                        *a += v;
                    }
                }
                for (j, &a) in acc.iter().enumerate() {
                    dst[j * k + r].write(a);
                }
            }
        } else {
            let at = oc0 * k;
            for (i, d) in dst.iter_mut().enumerate() {
                let mut a = parts[0][at + i];
                for part in &parts[1..] {
                    a += part[at + i];
                }
                d.write(a);
            }
        }
    });
    // SAFETY: the blocks cover every row, and each block writes all of its values.
    unsafe { out.finish() }
}

/// Runs `f` on the contiguous `f32` data of a CPU tensor (`what` names
/// it in errors).
pub(crate) fn with_data<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => f(data(cpu, layout, what)?),
        _ => candle_core::bail!("cpu op: the {what} is not on the CPU"),
    }
}

/// The contiguous `f32` data of a CPU operand.
pub(crate) fn data<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("cpu conv2d: the {what} must be contiguous; call .contiguous() first")
    };
    match storage {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        other => candle_core::bail!(
            "cpu conv2d: the {what} must be f32, got {:?}",
            other.dtype()
        ),
    }
}

use candle_core::backend::BackendStorage;

/// The convolution as a graph node: `x.apply_op2(kernel, Conv2d { .. })`.
struct Conv2d {
    padding: usize,
    stride: usize,
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "cpu-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(
            xl.shape().dims4()?,
            kl.shape().dims4()?,
            self.padding,
            self.stride,
        )?;
        let out = forward(&g, data(xs, xl, "input")?, data(ks, kl, "kernel")?, None);
        Ok((CpuStorage::F32(out), Shape::from(g.out_dims())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // A detached (frozen) kernel and an input that tracks nothing (the
        // image) get no gradient: that work is skipped, not thrown away.
        let grad = grad.contiguous()?;
        let dx = if x.track_op() {
            Some(conv2d_input_grad(
                &grad,
                kernel,
                x.dims4()?,
                self.padding,
                self.stride,
            )?)
        } else {
            None
        };
        let dk = if kernel.track_op() {
            Some(conv2d_kernel_grad(
                x,
                &grad,
                kernel.dims4()?,
                self.padding,
                self.stride,
            )?)
        } else {
            None
        };
        Ok((dx, dk))
    }
}

/// `grad.apply_op2_no_bwd(kernel, InputGrad { .. })`.
struct InputGrad {
    x_h: usize,
    x_w: usize,
    padding: usize,
    stride: usize,
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "cpu-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, o, oh, ow) = gl.shape().dims4()?;
        let (o_k, c, kh, kw) = kl.shape().dims4()?;
        let g = Geometry::new(
            (n, c, self.x_h, self.x_w),
            (o_k, c, kh, kw),
            self.padding,
            self.stride,
        )?;
        if (g.o, g.oh, g.ow) != (o, oh, ow) {
            candle_core::bail!(
                "cpu conv2d input grad: gradient shape {:?} does not match the output {:?}",
                gl.shape().dims(),
                g.out_dims()
            )
        }
        let dx = input_grad(
            &g,
            data(gs, gl, "output gradient")?,
            data(ks, kl, "kernel")?,
        );
        Ok((CpuStorage::F32(dx), Shape::from((n, c, self.x_h, self.x_w))))
    }
}

/// `x.apply_op2_no_bwd(grad, KernelGrad { .. })`.
struct KernelGrad {
    kh: usize,
    kw: usize,
    padding: usize,
    stride: usize,
}

impl CustomOp2 for KernelGrad {
    fn name(&self) -> &'static str {
        "cpu-conv2d-kernel-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        let (n_g, o, oh, ow) = gl.shape().dims4()?;
        let g = Geometry::new(
            (n, c, h, w),
            (o, c, self.kh, self.kw),
            self.padding,
            self.stride,
        )?;
        if (n, g.oh, g.ow) != (n_g, oh, ow) {
            candle_core::bail!(
                "cpu conv2d kernel grad: gradient shape {:?} does not match the output {:?}",
                gl.shape().dims(),
                g.out_dims()
            )
        }
        let dw = kernel_grad(&g, data(xs, xl, "input")?, data(gs, gl, "output gradient")?);
        Ok((CpuStorage::F32(dw), Shape::from((o, c, self.kh, self.kw))))
    }
}

/// `conv2d` + per-channel affine (+ residual) (+ ReLU) for inference:
/// `x.apply_op2_no_bwd(kernel, ..)`, or `x.apply_op3_no_bwd(kernel, residual, ..)`.
struct ConvAffine {
    padding: usize,
    stride: usize,
    scale: Vec<f32>,
    shift: Vec<f32>,
    relu: bool,
}

impl ConvAffine {
    fn run(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        (ks, kl): (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(
            xl.shape().dims4()?,
            kl.shape().dims4()?,
            self.padding,
            self.stride,
        )?;
        if self.scale.len() != g.o || self.shift.len() != g.o {
            candle_core::bail!(
                "cpu conv2d-affine: {} output channels but scale/shift have {}/{} values",
                g.o,
                self.scale.len(),
                self.shift.len()
            )
        }
        let residual = match residual {
            Some((rs, rl)) => {
                if rl.shape().dims() != [g.n, g.o, g.oh, g.ow] {
                    candle_core::bail!(
                        "cpu conv2d-affine: residual {:?} does not match the output {:?}",
                        rl.shape().dims(),
                        g.out_dims()
                    )
                }
                Some(data(rs, rl, "residual")?)
            }
            None => None,
        };
        let epilogue = Epilogue {
            scale: &self.scale,
            shift: &self.shift,
            residual,
            relu: self.relu,
        };
        let out = forward(
            &g,
            data(xs, xl, "input")?,
            data(ks, kl, "kernel")?,
            Some(&epilogue),
        );
        Ok((CpuStorage::F32(out), Shape::from(g.out_dims())))
    }
}

impl CustomOp2 for ConvAffine {
    fn name(&self) -> &'static str {
        "cpu-conv2d-affine"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((xs, xl), (ks, kl), None)
    }
}

impl CustomOp3 for ConvAffine {
    fn name(&self) -> &'static str {
        "cpu-conv2d-affine-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((xs, xl), (ks, kl), Some((rs, rl)))
    }
}

/// Inference: `relu?(conv2d(x, kernel) · scale[c] + shift[c] (+ residual))`
/// in one pass, the eval-mode BatchNorm, residual add and ReLU applied to
/// each output row while the convolution's result is still in cache.
///
/// `scale` and `shift` are `[O]`; `residual`, if any, has the output's shape.
/// The result carries no gradient graph. Equal to the bit to
/// [`conv2d`] followed by [`scale_shift`](super::scale_shift) and
/// [`add_relu`](super::add_relu); elsewhere than the CPU in `f32` it is
/// those candle ops.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_affine(
    x: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
    scale: &Tensor,
    shift: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let (x, kernel) = (x.detach(), kernel.detach());
    let (scale, shift) = (scale.detach(), shift.detach());
    if !supported(&x) || !supported(&kernel) {
        let y = x.conv2d(&kernel, padding, stride, 1, 1)?;
        return crate::generic::affine_after_conv(&y, &scale, &shift, residual, relu);
    }
    let op = ConvAffine {
        padding,
        stride,
        scale: scale.flatten_all()?.to_vec1()?,
        shift: shift.flatten_all()?.to_vec1()?,
        relu,
    };
    let (x, kernel) = (x.contiguous()?, kernel.contiguous()?);
    match residual {
        Some(r) => x.apply_op3_no_bwd(&kernel, &r.detach().contiguous()?, &op),
        None => x.apply_op2_no_bwd(&kernel, &op),
    }
}

/// Whether the fast CPU kernels handle `t` (an `f32` tensor on the CPU).
pub fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// `conv2d(x, kernel)` with square `padding` and `stride`, no dilation, one
/// group, like `x.conv2d(kernel, padding, stride, 1, 1)`.
///
/// `x` is `[N, C, H, W]` and `kernel` `[O, C, kh, kw]`. On the CPU in `f32`
/// this runs [the im2col kernels](self); backward computes the input gradient
/// only if `x` tracks gradients and the kernel gradient only if `kernel` does
/// (pass `var.as_detached_tensor()` for a frozen kernel). Elsewhere it is
/// the generic convolution of [`Ops`](crate::Ops).
pub fn conv2d(x: &Tensor, kernel: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if !supported(x) || !supported(kernel) {
        return crate::conv::conv2d_generic(x, kernel, padding, stride);
    }
    x.contiguous()?
        .apply_op2(&kernel.contiguous()?, Conv2d { padding, stride })
}

/// Which CPU kernel [`conv2d`] runs for an input `[N, C, H, W]` and a kernel
/// `[O, C, kh, kw]` at the current SIMD level: for at most four input
/// channels, `"exact direct avx512"` or `"exact direct avx2"` (the direct
/// kernel summing in `f64`, output channels in blocks of 32 or 8) or
/// `"exact"` (im2col + an `f64` product); otherwise `"winograd avx512"` or
/// `"winograd avx2"` (3×3, stride 1, padding 1, at least 256 tiles of 2×2
/// outputs, see `cpu/winograd.rs`), `"winograd 4x4 avx512"` or
/// `"winograd 4x4 avx2"` (the same convolutions on planes of at most 32×32
/// that 4×4 tiles fit, see `cpu/winograd4.rs`), `"direct avx512"` or
/// `"direct avx2"` (output channels in blocks of 64 or 16, planes of at
/// least 128 pixels and tasks of at least 256, see `cpu/direct.rs`),
/// `"valid taps avx512"` or `"valid taps avx2"` (the direct kernel over
/// the taps that read the image, on smaller planes where at most half of
/// all taps do, such as 3×3 on 2×2 pixels), or
/// `"im2col"` (im2col + `gemm`; no im2col for 1×1 stride 1). For tests and
/// benchmarks; an error for shapes [`conv2d`] refuses.
pub fn conv2d_path(
    x_dims: (usize, usize, usize, usize),
    k_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
) -> Result<&'static str> {
    let g = Geometry::new(x_dims, k_dims, padding, stride)?;
    let Some(d) = g.direct() else {
        return Ok(if g.exact() { "exact" } else { "im2col" });
    };
    let avx512 = d.level() == super::SimdLevel::Avx512;
    Ok(match (d.kind(), avx512) {
        (direct::Kind::Exact, true) => "exact direct avx512",
        (direct::Kind::Exact, false) => "exact direct avx2",
        (direct::Kind::Direct, true) => "direct avx512",
        (direct::Kind::Direct, false) => "direct avx2",
        (direct::Kind::Winograd, true) => "winograd avx512",
        (direct::Kind::Winograd, false) => "winograd avx2",
        (direct::Kind::Winograd4, true) => "winograd 4x4 avx512",
        (direct::Kind::Winograd4, false) => "winograd 4x4 avx2",
        (direct::Kind::ValidTaps, true) => "valid taps avx512",
        (direct::Kind::ValidTaps, false) => "valid taps avx2",
    })
}

/// Which kernel computes the gradient of [`conv2d`] with respect to its
/// kernel: `"winograd"` (the adjoint of F(2×2, 3×3), for 3×3 stride-1
/// convolutions with one pixel of padding, at least 64 tiles of 2×2 and
/// 32768 tiles × channels (the fewer of input and output), at AVX2 and
/// AVX-512, see `cpu/winograd.rs`) or `"im2col"` (im2col + `gemm`).
/// For tests and benchmarks; an error for shapes [`conv2d`] refuses.
pub fn conv2d_kernel_grad_path(
    x_dims: (usize, usize, usize, usize),
    k_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
) -> Result<&'static str> {
    let g = Geometry::new(x_dims, k_dims, padding, stride)?;
    Ok(if winograd::takes_kernel_grad(&g) {
        "winograd"
    } else {
        "im2col"
    })
}

/// The gradient of [`conv2d`] with respect to an input of shape `x_dims`,
/// given the output gradient `grad` `[N, O, OH, OW]`. Carries no graph.
pub fn conv2d_input_grad(
    grad: &Tensor,
    kernel: &Tensor,
    x_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (_, _, x_h, x_w) = x_dims;
    grad.detach().contiguous()?.apply_op2_no_bwd(
        &kernel.detach().contiguous()?,
        &InputGrad {
            x_h,
            x_w,
            padding,
            stride,
        },
    )
}

/// The gradient of [`conv2d`] with respect to a kernel of shape `k_dims`,
/// given the input `x` and the output gradient `grad`. Carries no graph.
pub fn conv2d_kernel_grad(
    x: &Tensor,
    grad: &Tensor,
    k_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (_, _, kh, kw) = k_dims;
    x.detach().contiguous()?.apply_op2_no_bwd(
        &grad.detach().contiguous()?,
        &KernelGrad {
            kh,
            kw,
            padding,
            stride,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(h, w, kernel, padding, stride)`: strides 1 to 3, planes narrower
    /// than the stride or the kernel, padding wider than the kernel's reach.
    const GEOMETRIES: &[(usize, usize, usize, usize, usize)] = &[
        (5, 7, 3, 1, 2),
        (4, 4, 7, 3, 2),
        (6, 5, 1, 0, 2),
        (3, 3, 3, 0, 1),
        (8, 8, 3, 1, 1),
        (9, 11, 5, 2, 3),
        (1, 1, 3, 1, 2),
        (2, 1, 3, 2, 3),
        (7, 6, 2, 0, 2),
        (10, 10, 7, 3, 2),
        (3, 8, 1, 0, 3),
    ];

    /// Values that round differently when added in another order.
    fn noise(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// `col2im` adds each term where the definition puts it, in the order
    /// `(ki, kj, y, x)`, so the sums are the same to the bit: checked on
    /// values that round differently in another order, into a plane that
    /// already holds values (as the adjoint it must add, not overwrite).
    /// Both ways of walking the plane: row by row (shifted copies, or
    /// phases for a stride), and the gather table of small planes.
    fn tables(g: &Geometry) -> [Option<Vec<usize>>; 2] {
        [None, Some(table_of(g))]
    }

    /// `col2im` adds each term where the definition puts it, in the order
    /// `(ki, kj, y, x)`, so the sums are the same to the bit: checked on
    /// values that round differently in another order, for both paths,
    /// read at a column offset inside a wider matrix (as for a group of
    /// images), and into a plane that already holds values (the adjoint
    /// must add, not overwrite).
    #[test]
    fn col2im_matches_definition() {
        for (case, &(h, w, kh, p, s)) in GEOMETRIES.iter().enumerate() {
            let c = 2;
            let g = Geometry::new((1, c, h, w), (1, c, kh, kh), p, s).unwrap();
            let col = noise(g.k() * g.p(), case as u32);
            let mut want = vec![0.0f32; c * h * w];
            for ci in 0..c {
                for ki in 0..kh {
                    for kj in 0..kh {
                        let r = (ci * kh + ki) * kh + kj;
                        for y in 0..g.oh {
                            for xo in 0..g.ow {
                                let iy = (y * s + ki) as isize - p as isize;
                                let ix = (xo * s + kj) as isize - p as isize;
                                if iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize {
                                    want[ci * h * w + iy as usize * w + ix as usize] +=
                                        col[r * g.p() + y * g.ow + xo];
                                }
                            }
                        }
                    }
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let ld = g.p() + 3;
            let mut wide = vec![f32::NAN; g.k() * ld];
            for r in 0..g.k() {
                wide[r * ld + 2..r * ld + 2 + g.p()]
                    .copy_from_slice(&col[r * g.p()..(r + 1) * g.p()]);
            }
            for table in tables(&g) {
                let what = format!(
                    "case {case} {:?}, table {}",
                    (h, w, kh, p, s),
                    table.is_some()
                );
                let mut got = vec![0.0f32; c * h * w];
                col2im(&g, &col, g.p(), 0, &mut got, table.as_deref());
                assert_eq!(bits(&got), bits(&want), "{what}");
                let mut twice = got.clone();
                col2im(&g, &wide, ld, 2, &mut twice, table.as_deref());
                for (i, (&t, &o)) in twice.iter().zip(&got).enumerate() {
                    assert!(
                        (t - 2.0 * o).abs() <= 1e-6 * o.abs().max(1.0),
                        "{what}, value {i}"
                    );
                }
            }
        }
    }

    /// `im2col_images` agrees with a direct definition of `col` on every
    /// path, for a group of three images side by side in a wider matrix,
    /// serial and spread over the pool.
    #[test]
    fn im2col_matches_definition() {
        for &(h, w, kh, p, s) in GEOMETRIES {
            let (n, c) = (3, 2);
            let g = Geometry::new((n, c, h, w), (1, c, kh, kh), p, s).unwrap();
            let x: Vec<f32> = (0..n * c * h * w).map(|i| i as f32 + 1.0).collect();
            let ld = n * g.p() + 1;
            for table in tables(&g) {
                for par in [false, true] {
                    let mut col = vec![f32::NAN; g.k() * ld];
                    im2col_images(&g, &x, n, &mut col, ld, par, table.as_deref());
                    for b in 0..n {
                        for ci in 0..c {
                            for ki in 0..kh {
                                for kj in 0..kh {
                                    for y in 0..g.oh {
                                        for xo in 0..g.ow {
                                            let iy = (y * s + ki) as isize - p as isize;
                                            let ix = (xo * s + kj) as isize - p as isize;
                                            let inside = iy >= 0
                                                && ix >= 0
                                                && iy < h as isize
                                                && ix < w as isize;
                                            let want = if inside {
                                                x[(b * c + ci) * h * w
                                                    + iy as usize * w
                                                    + ix as usize]
                                            } else {
                                                0.0
                                            };
                                            let r = (ci * kh + ki) * kh + kj;
                                            let at = r * ld + b * g.p() + y * g.ow + xo;
                                            assert_eq!(
                                                col[at],
                                                want,
                                                "{:?} table {} par {par}",
                                                (h, w, kh, p, s),
                                                table.is_some()
                                            );
                                        }
                                    }
                                }
                            }
                        }
                    }
                    // The column past the group is not written.
                    assert!((0..g.k()).all(|r| col[r * ld + n * g.p()].is_nan()));
                }
            }
        }
    }
}
