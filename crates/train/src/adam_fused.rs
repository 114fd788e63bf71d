//! One Adam update as three in-place passes over `f32` memory (gradient
//! average, squared-gradient average, parameter) instead of a dozen candle
//! ops that each allocate a new tensor: each pass a candle in-place op with
//! a CPU implementation and, with the `cuda` feature, a CUDA one
//! (`adam.cu`, compiled at run time by NVRTC) side by side.
//!
//! On the CPU each pass does the same `f32` operations in the same order as
//! the composite path in `optim.rs` (candle's `affine(mul, add)` is `v·mul +
//! add` with both constants rounded to `f32`), so the two give the same
//! bits (a unit test in `optim.rs` checks it). On CUDA the compiler may fuse
//! a multiply and an add, so the result is within rounding of it
//! (`tests/device.rs`).

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

/// Values per parallel task: big enough that a task outweighs its scheduling.
const CHUNK: usize = 1 << 15;

/// Whether the fused update applies: every tensor `f32` and contiguous,
/// all on the CPU or (with the `cuda` feature) all on one CUDA device.
pub(crate) fn supported(tensors: &[&Tensor]) -> bool {
    let plain = |t: &&Tensor| t.dtype() == DType::F32 && t.is_contiguous();
    let cpu = tensors.iter().all(|t| plain(t) && t.device().is_cpu());
    #[cfg(feature = "cuda")]
    let cuda = tensors.iter().all(|t| plain(t) && t.device().is_cuda())
        && tensors
            .windows(2)
            .all(|w| w[0].device().same_device(w[1].device()));
    #[cfg(not(feature = "cuda"))]
    let cuda = false;
    cpu || cuda
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

/// One parameter's update for [`update_many`].
pub(crate) struct Item<'a> {
    pub(crate) param: &'a Tensor,
    pub(crate) grad_avg: &'a Tensor,
    pub(crate) sqr_avg: &'a Tensor,
    pub(crate) grad: &'a Tensor,
    pub(crate) h: Hypers,
}

/// [`update`] for every item, each [`supported`]: on the CPU one after the
/// other (the same bits as [`update`]); on CUDA a few launches for them all
/// (up to 32 parameters per launch, the three passes in one), as
/// PyTorch's multi-tensor Adam.
pub(crate) fn update_many(items: &[Item<'_>]) -> Result<()> {
    #[cfg(feature = "cuda")]
    if items.first().is_some_and(|i| i.param.device().is_cuda()) {
        return cuda::update_many(items);
    }
    for i in items {
        update(i.param, i.grad_avg, i.sqr_avg, i.grad, i.h)?;
    }
    Ok(())
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

impl Average {
    fn betas(&self) -> (f32, f32) {
        if self.squared {
            (self.h.sqr_mom, self.h.one_minus_sqr_mom)
        } else {
            (self.h.mom, self.h.one_minus_mom)
        }
    }
}

impl InplaceOp2 for Average {
    fn name(&self) -> &'static str {
        "adam-average"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let (start, end) = cuda::offsets(dst_l)?;
        let (g_start, g_end) = cuda::offsets(gl)?;
        if end - start != g_end - g_start {
            candle_core::bail!("fused Adam: moments and gradient differ in size")
        }
        let dev = dst.device().clone();
        let func = dev.get_or_load_custom_func("adam_average", cuda::MODULE, cuda::ptx()?)?;
        let g = g.as_cuda_slice::<f32>()?.slice(g_start..g_end);
        let mut avg = dst.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
        let (beta, one_minus) = self.betas();
        let (len, squared) = ((end - start) as i64, i32::from(self.squared));
        let mut launch = func.builder();
        launch.arg(&mut avg);
        launch.arg(&g);
        launch.arg(&len);
        launch.arg(&beta);
        launch.arg(&one_minus);
        launch.arg(&squared);
        // SAFETY: the arguments match `adam_average` in adam.cu.
        unsafe { launch.launch(cuda::config(end - start)) }.w()?;
        Ok(())
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
        let (beta, one_minus) = self.betas();
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        ga: &candle_core::CudaStorage,
        gal: &Layout,
        sa: &candle_core::CudaStorage,
        sal: &Layout,
    ) -> Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let (start, end) = cuda::offsets(dst_l)?;
        let (ga_start, ga_end) = cuda::offsets(gal)?;
        let (sa_start, sa_end) = cuda::offsets(sal)?;
        if ga_end - ga_start != end - start || sa_end - sa_start != end - start {
            candle_core::bail!("fused Adam: moments and parameter differ in size")
        }
        let dev = dst.device().clone();
        let func = dev.get_or_load_custom_func("adam_param", cuda::MODULE, cuda::ptx()?)?;
        let ga = ga.as_cuda_slice::<f32>()?.slice(ga_start..ga_end);
        let sa = sa.as_cuda_slice::<f32>()?.slice(sa_start..sa_end);
        let mut p = dst.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
        let h = self.h;
        let (len, decays, decay) = (
            (end - start) as i64,
            i32::from(h.decay.is_some()),
            h.decay.unwrap_or(1.0),
        );
        let mut launch = func.builder();
        launch.arg(&mut p);
        launch.arg(&ga);
        launch.arg(&sa);
        launch.arg(&len);
        launch.arg(&decay);
        launch.arg(&decays);
        launch.arg(&h.inv_debias2);
        launch.arg(&h.eps);
        launch.arg(&h.step_size);
        // SAFETY: the arguments match `adam_param` in adam.cu.
        unsafe { launch.launch(cuda::config(end - start)) }.w()?;
        Ok(())
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

/// NVRTC compilation and launch shapes of `adam.cu`.
#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::OnceLock;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    use candle_core::cuda_backend::cudarc::nvrtc;
    use candle_core::{Layout, Result, Tensor};

    use super::{Hypers, Item};

    pub(super) const MODULE: &str = "multilabel_train_adam";
    const SOURCE: &str = include_str!("adam.cu");
    const BLOCK: u32 = 256;

    /// The PTX of `adam.cu`, compiled once per process.
    pub(super) fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        PTX.get_or_init(|| {
            nvrtc::compile_ptx(SOURCE)
                .map(|ptx| ptx.to_src())
                .map_err(|e| e.to_string())
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(format!("NVRTC could not compile adam.cu: {e}")))
    }

    pub(super) fn offsets(layout: &Layout) -> Result<(usize, usize)> {
        layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("fused Adam: expected a contiguous tensor".into())
        })
    }

    /// Parameters per `adam_multi` launch; `adam.cu`'s `MULTI`.
    const MULTI: usize = 32;
    /// Values per block of `adam_multi`.
    const CHUNK: usize = 16 * BLOCK as usize;

    /// `adam.cu`'s `AdamTable`, passed to the kernel by value.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct AdamTable {
        p: [u64; MULTI],
        g: [u64; MULTI],
        grad_avg: [u64; MULTI],
        sqr_avg: [u64; MULTI],
        len: [i64; MULTI],
        first_block: [i64; MULTI + 1],
        step_size: [f32; MULTI],
        decay: [f32; MULTI],
        inv_debias2: [f32; MULTI],
        decays: [i32; MULTI],
        n: i32,
    }

    // The layout nvcc gives the C struct (2,064 bytes, 8-aligned).
    const _: () = assert!(std::mem::size_of::<AdamTable>() == 2064);

    // SAFETY: plain `repr(C)` data with the layout of `AdamTable` in adam.cu.
    unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for AdamTable {}

    /// The device address of a contiguous `f32` CUDA tensor, and its length.
    fn address(t: &Tensor) -> Result<(u64, usize)> {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cuda(storage) = &*storage else {
            candle_core::bail!("fused Adam: expected a CUDA tensor")
        };
        let (start, end) = offsets(layout)?;
        let slice = storage.as_cuda_slice::<f32>()?;
        let stream = storage.device().cuda_stream();
        let base = slice.device_ptr(&stream).0;
        Ok((base + (start * 4) as u64, end - start))
    }

    /// The scalars every parameter of one launch shares.
    fn shared(h: &Hypers) -> [u32; 5] {
        [
            h.mom,
            h.one_minus_mom,
            h.sqr_mom,
            h.one_minus_sqr_mom,
            h.eps,
        ]
        .map(f32::to_bits)
    }

    /// [`super::update_many`] on CUDA: parameters in runs of up to
    /// [`MULTI`] that share the step's scalars, one launch per run.
    pub(super) fn update_many(items: &[Item<'_>]) -> Result<()> {
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let mut rest = items;
        while let Some(first) = rest.first() {
            let scalars = shared(&first.h);
            let run = rest
                .iter()
                .take(MULTI)
                .take_while(|i| shared(&i.h) == scalars)
                .count();
            let (now, later) = rest.split_at(run);
            rest = later;
            // SAFETY: all-zero is a valid table; the first `n` entries are
            // filled below.
            let mut table: AdamTable = unsafe { std::mem::zeroed() };
            let mut blocks = 0usize;
            for (k, item) in now.iter().enumerate() {
                let (p, len) = address(item.param)?;
                let (g, g_len) = address(item.grad)?;
                let (grad_avg, a_len) = address(item.grad_avg)?;
                let (sqr_avg, s_len) = address(item.sqr_avg)?;
                if g_len != len || a_len != len || s_len != len {
                    candle_core::bail!("fused Adam: parameter, gradient and moments differ in size")
                }
                table.p[k] = p;
                table.g[k] = g;
                table.grad_avg[k] = grad_avg;
                table.sqr_avg[k] = sqr_avg;
                table.len[k] = len as i64;
                table.first_block[k] = blocks as i64;
                table.step_size[k] = item.h.step_size;
                table.decay[k] = item.h.decay.unwrap_or(1.0);
                table.decays[k] = i32::from(item.h.decay.is_some());
                table.inv_debias2[k] = item.h.inv_debias2;
                // An empty tensor still gets a block, which does nothing.
                blocks += len.div_ceil(CHUNK).max(1);
            }
            table.first_block[now.len()] = blocks as i64;
            table.n = now.len() as i32;
            let candle_core::Storage::Cuda(storage) = &*first.param.storage_and_layout().0 else {
                candle_core::bail!("fused Adam: expected a CUDA tensor")
            };
            let dev = storage.device().clone();
            let func = dev.get_or_load_custom_func("adam_multi", MODULE, ptx()?)?;
            let h = first.h;
            let chunk = CHUNK as i64;
            let mut launch = func.builder();
            launch.arg(&table);
            launch.arg(&h.mom);
            launch.arg(&h.one_minus_mom);
            launch.arg(&h.sqr_mom);
            launch.arg(&h.one_minus_sqr_mom);
            launch.arg(&h.eps);
            launch.arg(&chunk);
            let config = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match `adam_multi` in adam.cu; every
            // address covers `len` f32 values of a live tensor, and nothing
            // else touches them until the stream has run the kernel.
            unsafe { launch.launch(config) }.w()?;
        }
        Ok(())
    }

    pub(super) fn config(len: usize) -> LaunchConfig {
        let blocks = len.div_ceil(BLOCK as usize).clamp(1, 65_535) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}
