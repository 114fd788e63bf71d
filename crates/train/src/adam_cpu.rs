//! The CPU implementation of one Adam update: three in-place passes over
//! `f32` memory (gradient average, squared-gradient average, parameter)
//! instead of a dozen candle ops that each allocate a new tensor.
//!
//! Each pass does the same `f32` operations in the same order as the
//! composite path in `optim.rs` (candle's `affine(mul, add)` is `v·mul +
//! add` with both constants rounded to `f32`), so the two give the same
//! bits; `tests/optim.rs` checks it.

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

/// Values per parallel task: big enough that a task outweighs its scheduling.
const CHUNK: usize = 1 << 15;

/// Whether the fused update applies: every tensor `f32`, on the CPU,
/// contiguous.
pub(crate) fn supported(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
}

/// The scalars of one update, rounded to `f32` as candle's `affine` rounds them.
#[derive(Clone, Copy)]
pub(crate) struct Hypers {
    /// `1 − lr·wd`, or `None` for no weight decay.
    pub(crate) decay: Option<f32>,
    pub(crate) mom: f32,
    pub(crate) one_minus_mom: f32,
    pub(crate) sqr_mom: f32,
    pub(crate) one_minus_sqr_mom: f32,
    /// `1 / (1 − sqr_mom^step)`.
    pub(crate) inv_debias2: f32,
    pub(crate) eps: f32,
    /// `lr / (1 − mom^step)`.
    pub(crate) step_size: f32,
}

/// `grad_avg`/`sqr_avg` and `param` updated in place from `grad`.
pub(crate) fn update(
    param: &Tensor,
    grad_avg: &Tensor,
    sqr_avg: &Tensor,
    grad: &Tensor,
    h: Hypers,
) -> Result<()> {
    grad_avg.inplace_op2(grad, &Average { h, squared: false })?;
    sqr_avg.inplace_op2(grad, &Average { h, squared: true })?;
    param.inplace_op3(grad_avg, sqr_avg, &Step { h })
}

fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("fused Adam: expected f32")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused Adam: expected a contiguous tensor")
    };
    Ok(&values[start..end])
}

fn slice_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("fused Adam: expected f32")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused Adam: expected a contiguous tensor")
    };
    Ok(&mut values[start..end])
}

/// `avg = avg·β + f(g)·(1 − β)`, with `f(g) = g` or `g·g`.
struct Average {
    h: Hypers,
    squared: bool,
}

impl InplaceOp2 for Average {
    fn name(&self) -> &'static str {
        "adam-average"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let avg = slice_mut(dst, dst_l)?;
        let g = slice(g, gl)?;
        if avg.len() != g.len() {
            candle_core::bail!(
                "fused Adam: {} moments for {} gradients",
                avg.len(),
                g.len()
            )
        }
        let (beta, one_minus) = if self.squared {
            (self.h.sqr_mom, self.h.one_minus_sqr_mom)
        } else {
            (self.h.mom, self.h.one_minus_mom)
        };
        let squared = self.squared;
        avg.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(avg, g)| {
                for (a, &g) in avg.iter_mut().zip(g) {
                    let g = if squared { g * g } else { g };
                    *a = (*a * beta + 0.0) + (g * one_minus + 0.0);
                }
            });
        Ok(())
    }
}

/// `p = decay?(p) − (grad_avg / (sqrt(sqr_avg / debias2) + eps)) · lr / debias1`.
struct Step {
    h: Hypers,
}

impl InplaceOp3 for Step {
    fn name(&self) -> &'static str {
        "adam-step"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        ga: &CpuStorage,
        gal: &Layout,
        sa: &CpuStorage,
        sal: &Layout,
    ) -> Result<()> {
        let p = slice_mut(dst, dst_l)?;
        let (ga, sa) = (slice(ga, gal)?, slice(sa, sal)?);
        if ga.len() != p.len() || sa.len() != p.len() {
            candle_core::bail!("fused Adam: moments and parameter differ in size")
        }
        let h = self.h;
        p.par_chunks_mut(CHUNK)
            .zip(ga.par_chunks(CHUNK))
            .zip(sa.par_chunks(CHUNK))
            .for_each(|((p, ga), sa)| {
                for ((p, &m), &v) in p.iter_mut().zip(ga).zip(sa) {
                    let value = match h.decay {
                        Some(d) => *p * d + 0.0,
                        None => *p,
                    };
                    let denom = (v * h.inv_debias2 + 0.0).sqrt() * 1.0 + h.eps;
                    let update = (m / denom) * h.step_size + 0.0;
                    *p = value - update;
                }
            });
        Ok(())
    }
}
