//! One Adam update in place over `f32` memory (gradient average,
//! squared-gradient average, parameter) instead of a dozen candle ops that
//! each allocate a new tensor. On the CPU it is one pass over the four
//! arrays ([`OnePass`]); with the `cuda` feature, three in-place passes
//! with CUDA kernels (`adam.cu`, compiled at run time by NVRTC), or one
//! kernel for many parameters ([`update_many`]).
//!
//! On the CPU the pass does the same `f32` operations in the same order as
//! the composite path in `optim.rs` (candle's `affine(mul, add)` is `v·mul +
//! add` with both constants rounded to `f32`), so the two give the same
//! bits (a unit test in `optim.rs` checks it). On CUDA the compiler may fuse
//! a multiply and an add, so the result is within rounding of it
//! (`tests/device.rs`).

use std::sync::Mutex;

#[cfg(feature = "cuda")]
use candle_core::InplaceOp3;
use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Tensor};
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
    #[cfg(feature = "cuda")]
    if param.device().is_cuda() {
        grad_avg.inplace_op2(grad, &Average { h, squared: false })?;
        sqr_avg.inplace_op2(grad, &Average { h, squared: true })?;
        return param.inplace_op3(grad_avg, sqr_avg, &Step { h });
    }
    // One pass over the four arrays.
    let outer = WithGradAvg {
        param,
        sqr_avg,
        grad,
        h,
    };
    grad_avg.inplace_op1(&outer)
}

/// The CPU's single pass, as nested in-place ops: candle lends one mutable
/// storage per op, and the pass writes three (the two averages and the
/// parameter). Each level holds its storage while it runs the next.
struct WithGradAvg<'a> {
    param: &'a Tensor,
    sqr_avg: &'a Tensor,
    grad: &'a Tensor,
    h: Hypers,
}

struct WithSqrAvg<'a, 'm> {
    param: &'a Tensor,
    grad: &'a Tensor,
    grad_avg: Mutex<&'m mut [f32]>,
    h: Hypers,
}

struct OnePass<'m> {
    grad_avg: Mutex<&'m mut [f32]>,
    sqr_avg: Mutex<&'m mut [f32]>,
    h: Hypers,
}

impl InplaceOp1 for WithGradAvg<'_> {
    fn name(&self) -> &'static str {
        "adam-one-pass"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let next = WithSqrAvg {
            param: self.param,
            grad: self.grad,
            grad_avg: Mutex::new(slice_mut(storage, layout)?),
            h: self.h,
        };
        self.sqr_avg.inplace_op1(&next)
    }
}

impl InplaceOp1 for WithSqrAvg<'_, '_> {
    fn name(&self) -> &'static str {
        "adam-one-pass"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let mut grad_avg = self.grad_avg.lock().unwrap_or_else(|e| e.into_inner());
        let next = OnePass {
            grad_avg: Mutex::new(&mut grad_avg),
            sqr_avg: Mutex::new(slice_mut(storage, layout)?),
            h: self.h,
        };
        self.param.inplace_op2(self.grad, &next)
    }
}

impl InplaceOp2 for OnePass<'_> {
    fn name(&self) -> &'static str {
        "adam-one-pass"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let p = slice_mut(dst, dst_l)?;
        let g = slice(g, gl)?;
        let mut ga = self.grad_avg.lock().unwrap_or_else(|e| e.into_inner());
        let mut sa = self.sqr_avg.lock().unwrap_or_else(|e| e.into_inner());
        if g.len() != p.len() || ga.len() != p.len() || sa.len() != p.len() {
            candle_core::bail!("fused Adam: moments, gradient and parameter differ in size")
        }
        let h = self.h;
        let level = vector_level();
        p.par_chunks_mut(CHUNK)
            .zip(ga.par_chunks_mut(CHUNK))
            .zip(sa.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, ga), sa), g)| one_pass(level, p, ga, sa, g, h));
        Ok(())
    }
}

/// The instruction set [`one_pass`] is compiled for on this CPU: with the
/// `learner` feature the ResNet kernels' level (`MULTILABEL_SIMD` lowers
/// it), else the best the CPU has.
#[derive(Clone, Copy)]
enum Level {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

fn vector_level() -> Level {
    #[cfg(all(target_arch = "x86_64", feature = "learner"))]
    {
        use multilabel_resnet::cpu::{SimdLevel, simd_level};
        match simd_level() {
            SimdLevel::Avx512 => Level::Avx512,
            SimdLevel::Avx2 => Level::Avx2,
            SimdLevel::Baseline => Level::Baseline,
        }
    }
    #[cfg(all(target_arch = "x86_64", not(feature = "learner")))]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") {
            Level::Avx512
        } else if has!("avx2") && has!("fma") {
            Level::Avx2
        } else {
            Level::Baseline
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Level::Baseline
    }
}

/// [`one_pass_body`] built for `level`. The square root and the division
/// made the SSE2 build compute-bound: the AVX-512 build ran the ResNet-50
/// update about twice as fast. Every build does the same IEEE operations
/// in the same order (Rust does not contract them into FMAs), so the
/// result is the same to the bit.
fn one_pass(level: Level, p: &mut [f32], ga: &mut [f32], sa: &mut [f32], g: &[f32], h: Hypers) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
        unsafe fn v4(p: &mut [f32], ga: &mut [f32], sa: &mut [f32], g: &[f32], h: Hypers) {
            one_pass_body(p, ga, sa, g, h)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn v3(p: &mut [f32], ga: &mut [f32], sa: &mut [f32], g: &[f32], h: Hypers) {
            one_pass_body(p, ga, sa, g, h)
        }
        match level {
            // SAFETY: `vector_level` picks only levels this CPU supports.
            Level::Avx512 => return unsafe { v4(p, ga, sa, g, h) },
            // SAFETY: as above.
            Level::Avx2 => return unsafe { v3(p, ga, sa, g, h) },
            Level::Baseline => {}
        }
    }
    let _ = level;
    one_pass_body(p, ga, sa, g, h)
}

#[inline(always)]
fn one_pass_body(p: &mut [f32], ga: &mut [f32], sa: &mut [f32], g: &[f32], h: Hypers) {
    for (((p, m), v), &g) in p.iter_mut().zip(ga).zip(sa).zip(g) {
        // The three passes' operations, in their order.
        *m = (*m * h.mom + 0.0) + (g * h.one_minus_mom + 0.0);
        *v = (*v * h.sqr_mom + 0.0) + ((g * g) * h.one_minus_sqr_mom + 0.0);
        let value = match h.decay {
            Some(d) => *p * d + 0.0,
            None => *p,
        };
        let denom = (*v * h.inv_debias2 + 0.0).sqrt() * 1.0 + h.eps;
        let update = (*m / denom) * h.step_size + 0.0;
        *p = value - update;
    }
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
#[cfg(feature = "cuda")]
struct Average {
    h: Hypers,
    squared: bool,
}

#[cfg(feature = "cuda")]
impl Average {
    fn betas(&self) -> (f32, f32) {
        if self.squared {
            (self.h.sqr_mom, self.h.one_minus_sqr_mom)
        } else {
            (self.h.mom, self.h.one_minus_mom)
        }
    }
}

#[cfg(feature = "cuda")]
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

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("fused Adam: on the CPU the update is one pass (`OnePass`)")
    }
}

/// `p = decay?(p) − (grad_avg / (sqrt(sqr_avg / debias2) + eps)) · lr / debias1`.
#[cfg(feature = "cuda")]
struct Step {
    h: Hypers,
}

#[cfg(feature = "cuda")]
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
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle_core::bail!("fused Adam: on the CPU the update is one pass (`OnePass`)")
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

#[cfg(test)]
mod tests {
    use super::{Hypers, Level, one_pass};

    /// Every build of the one-pass update this CPU can run gives the
    /// baseline build's bits, with and without weight decay.
    #[test]
    fn one_pass_is_the_same_at_every_simd_level() {
        // Awkward values: tiny and huge gradients, zeros, negative zero.
        let n = 1000;
        let wave = |i: usize, k: f32| ((i as f32 * k).sin() * 3.0).exp2() - 4.0;
        let g: Vec<f32> = (0..n)
            .map(|i| match i % 97 {
                0 => 0.0,
                1 => -0.0,
                2 => 1e-30,
                3 => 3e8,
                _ => wave(i, 0.37) * 1e-3,
            })
            .collect();
        let p0: Vec<f32> = (0..n).map(|i| wave(i, 0.11)).collect();
        let m0: Vec<f32> = (0..n).map(|i| wave(i, 0.23) * 1e-3).collect();
        let v0: Vec<f32> = (0..n).map(|i| wave(i, 0.05).abs() * 1e-6).collect();
        let mut levels = vec![Level::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                levels.push(Level::Avx2);
            }
            if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") {
                levels.push(Level::Avx512);
            }
        }
        for decay in [None, Some(1.0 - 1e-3 * 0.01)] {
            let h = Hypers {
                decay,
                mom: 0.9,
                one_minus_mom: 0.1,
                sqr_mom: 0.99,
                one_minus_sqr_mom: 0.01,
                inv_debias2: 1.0 / (1.0 - 0.99f32.powi(3)),
                eps: 1e-5,
                step_size: 1e-3 / (1.0 - 0.9f32.powi(3)),
            };
            let run = |level: Level| {
                let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
                one_pass(level, &mut p, &mut m, &mut v, &g, h);
                [p, m, v].map(|a| a.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
            };
            let baseline = run(Level::Baseline);
            assert_ne!(
                baseline[0],
                p0.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            for &level in &levels[1..] {
                assert!(
                    run(level) == baseline,
                    "a SIMD build differs from the baseline"
                );
            }
        }
    }
}
