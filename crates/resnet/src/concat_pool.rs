//! fastai's `AdaptiveConcatPool2d(1)`, the head's first layer: `[N, C, H, W]`
//! → `[N, 2C]`, each image's per-channel maxima followed by its per-channel
//! means, as one op with its own backward.
//!
//! As in PyTorch's adaptive max-pool (and our stem pool), the first maximum
//! of a plane in row-major order takes the whole gradient of its maximum,
//! and a NaN counts as a maximum; every value gets `1/(H·W)` of its mean's
//! gradient. candle's `max` backward would instead give the gradient to
//! every tied value.
//!
//! On the CPU in `f32` this is a custom op with a direct kernel; with the
//! `cuda` feature the same on CUDA ([`crate::cuda::concat_pool`]). Other
//! devices and dtypes use [`concat_pool_composed`].

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Max then mean of every channel of `x` `[N, C, H, W]`: `[N, 2C]`.
pub fn concat_pool(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(ConcatPool);
    }
    concat_pool_composed(x)
}

/// [`concat_pool`] as candle ops, on any device and dtype.
pub fn concat_pool_composed(x: &Tensor) -> Result<Tensor> {
    let flat = x.flatten_from(2)?;
    Tensor::cat(&[&flat.max(2)?, &flat.mean(2)?], 1)
}

/// Index of the first maximum of `plane` (of the first NaN, if any).
#[inline]
pub(crate) fn first_max(plane: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in plane.iter().enumerate() {
        if v.is_nan() {
            return i;
        }
        if v > plane[best] {
            best = i;
        }
    }
    best
}

/// `(n, c, h·w)` of a contiguous `f32` `[N, C, H, W]` operand, and its values.
fn operand<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<(&'a [f32], usize, usize, usize)> {
    let (n, c, h, w) = layout.shape().dims4()?;
    if h * w == 0 {
        candle_core::bail!("concat-pool: empty {h}x{w} planes")
    }
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("concat-pool: expects f32, got {:?}", storage.dtype())
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("concat-pool: the input must be contiguous")
    };
    Ok((&values[start..end], n, c, h * w))
}

/// The forward op: `x.apply_op1(ConcatPool)`.
struct ConcatPool;

/// The backward op: `x.apply_op2_no_bwd(grad, ConcatPoolGrad)` gives `dx`.
struct ConcatPoolGrad;

impl CustomOp1 for ConcatPool {
    fn name(&self) -> &'static str {
        "concat-pool"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, n, c, hw) = operand(storage, layout)?;
        let inv = 1.0 / hw as f32;
        let mut out = vec![0f32; n * 2 * c];
        out.par_chunks_mut(2 * c)
            .zip(x.par_chunks(c * hw))
            .for_each(|(out, image)| {
                let (max, mean) = out.split_at_mut(c);
                for ((plane, max), mean) in image.chunks_exact(hw).zip(max).zip(mean) {
                    *max = plane[first_max(plane)];
                    *mean = plane.iter().fold(0.0f32, |a, &v| a + v) * inv;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, 2 * c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::concat_pool_fwd(storage, layout)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(x.detach().apply_op2_no_bwd(&grad, &ConcatPoolGrad)?))
    }
}

impl CustomOp2 for ConcatPoolGrad {
    fn name(&self) -> &'static str {
        "concat-pool-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, n, c, hw) = operand(xs, xl)?;
        let (CpuStorage::F32(g), Some((start, end))) = (gs, gl.contiguous_offsets()) else {
            candle_core::bail!("concat-pool backward: the gradient must be contiguous f32")
        };
        let g = &g[start..end];
        if g.len() != n * 2 * c {
            candle_core::bail!(
                "concat-pool backward: gradient of {} values for [{n}, {}]",
                g.len(),
                2 * c
            )
        }
        let inv = 1.0 / hw as f32;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(c * hw)
            .zip(x.par_chunks(c * hw))
            .zip(g.par_chunks(2 * c))
            .for_each(|((dx, image), g)| {
                let (g_max, g_mean) = g.split_at(c);
                for (((dx, plane), &gm), &ga) in dx
                    .chunks_exact_mut(hw)
                    .zip(image.chunks_exact(hw))
                    .zip(g_max)
                    .zip(g_mean)
                {
                    dx.fill(ga * inv);
                    dx[first_max(plane)] += gm;
                }
            });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::concat_pool_bwd(xs, xl, gs, gl)
    }
}

/// [`concat_pool`] through the custom op on any device that implements it
/// (the CPU, or CUDA with the `cuda` feature), `f32` only.
pub(crate) fn concat_pool_op(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ConcatPool)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::{concat_pool, concat_pool_composed};
    use crate::test_util::{linear_loss_grads, max_abs_diff};

    /// Without ties the op is candle's composition: the same maxima, means
    /// within rounding, and the same gradients.
    #[test]
    fn equals_candle_ops_without_ties() {
        for (n, c, h, w) in [(2, 3, 4, 4), (3, 5, 1, 1), (2, 4, 7, 3), (1, 2, 2, 2)] {
            let len = n * c * h * w;
            // Distinct values: a permutation scaled, so no plane has a tie.
            let values: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % len) as f32 / len as f32 - 0.5)
                .collect();
            let x = Var::from_vec(values, (n, c, h, w), &Device::Cpu).unwrap();
            let ours = concat_pool(&x).unwrap();
            let theirs = concat_pool_composed(&x).unwrap();
            assert_eq!(ours.dims(), &[n, 2 * c]);
            assert!(
                max_abs_diff(&ours, &theirs) <= 1e-6,
                "{n}x{c}x{h}x{w} values"
            );
            let r = Tensor::randn(0f32, 1f32, (n, 2 * c), &Device::Cpu).unwrap();
            let (g_ours, g_theirs) = (linear_loss_grads(&ours, &r), linear_loss_grads(&theirs, &r));
            let (a, b) = (g_ours.get(&x).unwrap(), g_theirs.get(&x).unwrap());
            assert!(max_abs_diff(a, b) <= 1e-6, "{n}x{c}x{h}x{w} gradient");
        }
    }

    /// A tied maximum sends the gradient to its first place only, and a
    /// NaN is the maximum and takes the gradient.
    #[test]
    fn first_maximum_or_nan_takes_the_gradient() {
        let planes = [
            [1.0, 3.0, 3.0, 2.0],           // tie: index 1
            [0.0, 0.0, 0.0, 0.0],           // all equal: index 0
            [1.0, f32::NAN, 5.0, f32::NAN], // first NaN: index 1
            [-4.0, -2.0, -3.0, -2.0],       // negative tie: index 1
        ];
        let flat: Vec<f32> = planes.iter().flatten().copied().collect();
        let x = Var::from_vec(flat, (1, 4, 2, 2), &Device::Cpu).unwrap();
        let y = concat_pool(&x).unwrap();
        let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got[0], 3.0);
        assert_eq!(got[1], 0.0);
        assert!(got[2].is_nan());
        assert_eq!(got[3], -2.0);
        assert_eq!(got[4], 2.25);
        // Max gradients 10, 20, 30, 40; mean gradients 4 each (1 per value).
        let g = Tensor::new(&[[10f32, 20., 30., 40., 4., 4., 4., 4.]], &Device::Cpu).unwrap();
        let grads = (y * g).unwrap().sum_all().unwrap().backward().unwrap();
        let dx: Vec<f32> = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = [
            1., 11., 1., 1., //
            21., 1., 1., 1., //
            1., 31., 1., 1., //
            1., 41., 1., 1.,
        ];
        assert_eq!(dx, want);
    }
}
