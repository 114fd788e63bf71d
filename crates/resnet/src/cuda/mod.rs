//! Fused CUDA kernels for the training ops that candle composes from many
//! generic ops: train-mode BatchNorm (+ ReLU) forward and backward, in two
//! launches each way instead of a dozen, and the stem's max-pool forward and
//! backward in one launch each instead of some forty. With the `cudnn`
//! feature, [`cudnn`] runs the convolutions.
//!
//! The kernels (`kernels.cu`) are CUDA C compiled once per process by NVRTC
//! at first use, so the build needs no extra nvcc step. The PTX is that of
//! the NVRTC library found at run time, so that library must not be newer
//! than the driver (a CUDA 13.x NVRTC needs a 13.x-or-later driver), as for
//! every CUDA program. They take contiguous `f32` or `bf16` activations
//! with `f32` parameters and statistics on a CUDA device; [`crate::Ops`]
//! sends them nothing else. `tests/device.rs` checks each against the CPU
//! kernels (on a GPU only).

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

#[cfg(feature = "cudnn")]
pub mod cudnn;

/// The kernels' CUDA C source.
pub const SOURCE: &str = include_str!("kernels.cu");
const MODULE: &str = "multilabel_resnet_kernels";
/// Threads per block; `kernels.cu`'s `BLOCK`.
const BLOCK: u32 = 256;

/// The PTX of [`SOURCE`], compiled once.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        nvrtc::compile_ptx(SOURCE)
            .map(|ptx| ptx.to_src())
            .map_err(|e| e.to_string())
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(format!("NVRTC could not compile kernels.cu: {e}")))
}

/// Whether the fused kernels take these operands: `activations` all `f32`
/// or all `bf16`, `params` (BatchNorm's weight and bias) `f32`, every one
/// on a CUDA device.
pub fn supported(activations: &[&Tensor], params: &[&Tensor]) -> bool {
    let Some(first) = activations.first() else {
        return false;
    };
    matches!(first.dtype(), DType::F32 | DType::BF16)
        && activations
            .iter()
            .all(|t| t.device().is_cuda() && t.dtype() == first.dtype())
        && params
            .iter()
            .all(|t| t.device().is_cuda() && t.dtype() == DType::F32)
}

/// The name of `kernel`'s entry point for activations of `dtype`.
fn entry(kernel: &str, dtype: DType) -> Result<String> {
    match dtype {
        DType::F32 => Ok(kernel.to_string()),
        DType::BF16 => Ok(format!("{kernel}_bf16")),
        other => candle_core::bail!("cuda kernels: {kernel} has no {other:?} version"),
    }
}

/// The device address of a contiguous `f32`, `bf16` or `f16` operand, at
/// its offset (kernels and cuDNN take operands as raw addresses).
fn address(storage: &CudaStorage, layout: &Layout, what: &str) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let Some((start, _)) = layout.contiguous_offsets() else {
        candle_core::bail!("cuda kernels: {what} is not contiguous")
    };
    let stream = storage.device().cuda_stream();
    let (base, size) = match storage.dtype() {
        DType::F32 => (storage.as_cuda_slice::<f32>()?.device_ptr(&stream).0, 4),
        DType::BF16 => (
            storage.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
            2,
        ),
        DType::F16 => (
            storage.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
            2,
        ),
        other => candle_core::bail!("cuda kernels: {what} is {other:?}, not f32, bf16 or f16"),
    };
    Ok(base + (start * size) as u64)
}

/// `len` uninitialised values of `dtype` (`f32`, `bf16` or `f16`) and
/// their address; the kernel that fills them must write every one.
///
/// # Safety
/// The caller's kernel writes all `len` values before anything reads them.
unsafe fn alloc_as(
    dev: &candle_core::cuda_backend::CudaDevice,
    dtype: DType,
    len: usize,
) -> Result<(CudaStorage, u64)> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let stream = dev.cuda_stream();
    Ok(match dtype {
        DType::F32 => {
            // SAFETY: forwarded to the caller.
            let slice = unsafe { dev.alloc::<f32>(len)? };
            let at = slice.device_ptr(&stream).0;
            (CudaStorage::wrap_cuda_slice(slice, dev.clone()), at)
        }
        DType::BF16 => {
            // SAFETY: forwarded to the caller.
            let slice = unsafe { dev.alloc::<half::bf16>(len)? };
            let at = slice.device_ptr(&stream).0;
            (CudaStorage::wrap_cuda_slice(slice, dev.clone()), at)
        }
        DType::F16 => {
            // SAFETY: forwarded to the caller.
            let slice = unsafe { dev.alloc::<half::f16>(len)? };
            let at = slice.device_ptr(&stream).0;
            (CudaStorage::wrap_cuda_slice(slice, dev.clone()), at)
        }
        other => candle_core::bail!("cuda kernels: no {other:?} output"),
    })
}

/// Both operands of an elementwise kernel must have the same dtype.
fn same_dtype(a: &CudaStorage, b: &CudaStorage, what: &str) -> Result<()> {
    if a.dtype() != b.dtype() {
        candle_core::bail!(
            "cuda kernels: {what}: {:?} and {:?} operands",
            a.dtype(),
            b.dtype()
        )
    }
    Ok(())
}

/// `(N, C, HW)` of an activation `[N, C, ...]`.
fn dims(shape: &Shape) -> Result<(usize, usize, usize)> {
    let d = shape.dims();
    if d.len() < 2 {
        candle_core::bail!("cuda batch-norm: expected [N, C, ...], got {d:?}")
    }
    Ok((d[0], d[1], d[2..].iter().product()))
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| candle_core::Error::Msg(format!("cuda kernels: {what} {v} too large")))
}

/// A launch of `len` elementwise threads, grid-stride looped past 65535 blocks.
fn elementwise(len: usize) -> LaunchConfig {
    let blocks = len.div_ceil(BLOCK as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per channel.
fn per_channel(c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The storage of a tensor that must be a contiguous `f32` CUDA tensor.
macro_rules! cuda_slice {
    ($storage:expr, $layout:expr, $what:expr) => {{
        let Some((start, end)) = $layout.contiguous_offsets() else {
            candle_core::bail!("cuda kernels: {} is not contiguous", $what)
        };
        $storage.as_cuda_slice::<f32>()?.slice(start..end)
    }};
}

fn cpu_unsupported(name: &str) -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("{name} runs on CUDA devices only")
}

/// `[5, C]` statistics of `x` (mean, biased var, inv_std, scale, shift).
struct Stats {
    eps: f64,
}

impl CustomOp3 for Stats {
    fn name(&self) -> &'static str {
        "cuda-batch-norm-stats"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, c, hw) = dims(xl.shape())?;
        if wl.shape().elem_count() != c || bl.shape().elem_count() != c {
            candle_core::bail!("cuda batch-norm: {c} channels but weight/bias differ")
        }
        if n * hw < 2 {
            candle_core::bail!(
                "cuda batch-norm: train mode needs more than one value per channel, got {:?}; use a larger batch",
                xl.shape().dims()
            )
        }
        let dev = xs.device().clone();
        let (x, w, b) = (
            address(xs, xl, "x")?,
            cuda_slice!(ws, wl, "weight"),
            cuda_slice!(bs, bl, "bias"),
        );
        let out = dev.alloc_zeros::<f32>(5 * c)?;
        let func = dev.get_or_load_custom_func(&entry("bn_stats", xs.dtype())?, MODULE, ptx()?)?;
        let (n32, c32, hw32) = (i32_of(n, "N")?, i32_of(c, "C")?, i32_of(hw, "H·W")?);
        let mut launch = func.builder();
        launch.arg(&x);
        launch.arg(&w);
        launch.arg(&b);
        launch.arg(&out);
        launch.arg(&n32);
        launch.arg(&c32);
        launch.arg(&hw32);
        launch.arg(&self.eps);
        // SAFETY: the argument list matches `bn_stats` in kernels.cu, and
        // every pointer covers what the kernel reads or writes.
        unsafe { launch.launch(per_channel(c)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((5, c))))
    }
}

/// `relu?(x·scale + shift)` from the statistics, with BatchNorm's backward.
struct Apply {
    stats: Tensor,
    relu: bool,
}

/// The `f32` CUDA slice of a whole contiguous tensor captured by an op.
fn with_slice<R>(
    t: &Tensor,
    f: impl FnOnce(&candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(storage) = &*storage else {
        candle_core::bail!("cuda batch-norm: statistics not on a CUDA device")
    };
    let view = cuda_slice!(storage, layout, "statistics");
    f(&view)
}

impl CustomOp3 for Apply {
    fn name(&self) -> &'static str {
        "cuda-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let y = apply(xs, xl, &self.stats, None, self.relu)?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need_x = x.track_op();
        if !need_x && !weight.track_op() && !bias.track_op() {
            return Ok((None, None, None));
        }
        let grad = grad.contiguous()?;
        let weight_value = weight.detach().contiguous()?;
        let (red, dx) = backward(&self.stats, &weight_value, self.relu, x, y, &grad)?;
        let dw = weight.track_op().then(|| red.get(0)).transpose()?;
        let db = bias.track_op().then(|| red.get(1)).transpose()?;
        Ok((dx, dw, db))
    }
}

/// BatchNorm's backward from its input `x`, output `y` and output gradient
/// `grad`: the `[5, C]` reduction (dweight and dbias are its first rows) and,
/// when `x` tracks gradients, dx.
fn backward(
    stats: &Tensor,
    weight: &Tensor,
    relu: bool,
    x: &Tensor,
    y: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Option<Tensor>)> {
    let (xv, yv) = (x.detach(), y.detach());
    let red = xv.apply_op3_no_bwd(
        &yv,
        grad,
        &GradReduce {
            stats: stats.clone(),
            weight: weight.clone(),
            relu,
        },
    )?;
    let dx = x
        .track_op()
        .then(|| {
            xv.apply_op3_no_bwd(
                &yv,
                grad,
                &GradInput {
                    stats: stats.clone(),
                    red: red.clone(),
                    relu,
                },
            )
        })
        .transpose()?;
    Ok((red, dx))
}

/// Launches `bn_apply`: `relu?(x·scale + shift (+ residual))`.
fn apply(
    xs: &CudaStorage,
    xl: &Layout,
    stats: &Tensor,
    residual: Option<(&CudaStorage, &Layout)>,
    relu: bool,
) -> Result<CudaStorage> {
    let (_, c, hw) = dims(xl.shape())?;
    let len = xl.shape().elem_count();
    let dev = xs.device().clone();
    let x = address(xs, xl, "x")?;
    // A null device pointer when there is no residual.
    let residual = match residual {
        Some((rs, rl)) => {
            if rl.shape() != xl.shape() {
                candle_core::bail!(
                    "cuda batch-norm: residual {:?} for an input {:?}",
                    rl.shape().dims(),
                    xl.shape().dims()
                )
            }
            same_dtype(xs, rs, "the residual")?;
            address(rs, rl, "the residual")?
        }
        None => 0u64,
    };
    // SAFETY: `bn_apply` writes every one of the `len` values.
    let (y_storage, y) = unsafe { alloc_as(&dev, xs.dtype(), len)? };
    let func = dev.get_or_load_custom_func(&entry("bn_apply", xs.dtype())?, MODULE, ptx()?)?;
    let (len64, c32, hw32, relu) = (
        len as i64,
        i32_of(c, "C")?,
        i32_of(hw, "H·W")?,
        i32::from(relu),
    );
    with_slice(stats, |stats| {
        let mut launch = func.builder();
        launch.arg(&x);
        launch.arg(stats);
        launch.arg(&residual);
        launch.arg(&y);
        launch.arg(&len64);
        launch.arg(&c32);
        launch.arg(&hw32);
        launch.arg(&relu);
        // SAFETY: the arguments match `bn_apply`.
        unsafe { launch.launch(elementwise(len)) }.w()?;
        Ok(())
    })?;
    Ok(y_storage)
}

/// `relu(BatchNorm(x) + residual)`, the end of a residual block, over
/// `(x, [weight | bias], residual)`: weight and bias travel as one tensor
/// so that the op has the three inputs a candle custom op allows.
struct ApplyResidual {
    stats: Tensor,
    channels: usize,
}

impl CustomOp3 for ApplyResidual {
    fn name(&self) -> &'static str {
        "cuda-batch-norm-add-relu-train"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        _: &CudaStorage,
        _: &Layout,
        rs: &CudaStorage,
        rl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let y = apply(xs, xl, &self.stats, Some((rs, rl)), true)?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        residual: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let c = self.channels;
        let (dx, dwb) = if x.track_op() || wb.track_op() {
            let weight = wb.detach().narrow(0, 0, c)?.contiguous()?;
            let (red, dx) = backward(&self.stats, &weight, true, x, y, &grad)?;
            let dwb = wb
                .track_op()
                .then(|| red.narrow(0, 0, 2)?.flatten_all())
                .transpose()?;
            (dx, dwb)
        } else {
            (None, None)
        };
        let dres = residual
            .track_op()
            .then(|| y.detach().apply_op2_no_bwd(&grad, &ReluMask))
            .transpose()?;
        Ok((dx, dwb, dres))
    }
}

/// `g` where `y > 0`, zero elsewhere.
struct ReluMask;

impl candle_core::CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "cuda-relu-mask"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        ys: &CudaStorage,
        yl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if yl.shape() != gl.shape() {
            candle_core::bail!("cuda relu-mask: shapes differ")
        }
        let len = yl.shape().elem_count();
        let dev = ys.device().clone();
        same_dtype(ys, gs, "relu-mask")?;
        let (y, g) = (
            address(ys, yl, "y")?,
            address(gs, gl, "the output gradient")?,
        );
        // SAFETY: `relu_mask` writes every one of the `len` values.
        let (out_storage, out) = unsafe { alloc_as(&dev, ys.dtype(), len)? };
        let func = dev.get_or_load_custom_func(&entry("relu_mask", ys.dtype())?, MODULE, ptx()?)?;
        let len64 = len as i64;
        let mut launch = func.builder();
        launch.arg(&y);
        launch.arg(&g);
        launch.arg(&out);
        launch.arg(&len64);
        // SAFETY: the arguments match `relu_mask`.
        unsafe { launch.launch(elementwise(len)) }.w()?;
        Ok((out_storage, yl.shape().clone()))
    }
}

/// `[5, C]`: dweight, dbias and the coefficients of dx.
struct GradReduce {
    stats: Tensor,
    weight: Tensor,
    relu: bool,
}

impl CustomOp3 for GradReduce {
    fn name(&self) -> &'static str {
        "cuda-batch-norm-grad-reduce"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ys: &CudaStorage,
        yl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, c, hw) = dims(xl.shape())?;
        let dev = xs.device().clone();
        same_dtype(xs, ys, "batch-norm backward")?;
        same_dtype(xs, gs, "batch-norm backward")?;
        let (x, y, g) = (
            address(xs, xl, "x")?,
            address(ys, yl, "y")?,
            address(gs, gl, "the output gradient")?,
        );
        let red = dev.alloc_zeros::<f32>(5 * c)?;
        let func =
            dev.get_or_load_custom_func(&entry("bn_grad_reduce", xs.dtype())?, MODULE, ptx()?)?;
        let (n32, c32, hw32, relu) = (
            i32_of(n, "N")?,
            i32_of(c, "C")?,
            i32_of(hw, "H·W")?,
            i32::from(self.relu),
        );
        with_slice(&self.stats, |stats| {
            with_slice(&self.weight, |w| {
                let mut launch = func.builder();
                launch.arg(&x);
                launch.arg(&y);
                launch.arg(&g);
                launch.arg(stats);
                launch.arg(w);
                launch.arg(&red);
                launch.arg(&n32);
                launch.arg(&c32);
                launch.arg(&hw32);
                launch.arg(&relu);
                // SAFETY: the arguments match `bn_grad_reduce`.
                unsafe { launch.launch(per_channel(c)) }.w()?;
                Ok(())
            })
        })?;
        Ok((CudaStorage::wrap_cuda_slice(red, dev), Shape::from((5, c))))
    }
}

/// dx from the reduction.
struct GradInput {
    stats: Tensor,
    red: Tensor,
    relu: bool,
}

impl CustomOp3 for GradInput {
    fn name(&self) -> &'static str {
        "cuda-batch-norm-grad-input"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ys: &CudaStorage,
        yl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (_, c, hw) = dims(xl.shape())?;
        let len = xl.shape().elem_count();
        let dev = xs.device().clone();
        same_dtype(xs, ys, "batch-norm backward")?;
        same_dtype(xs, gs, "batch-norm backward")?;
        let (x, y, g) = (
            address(xs, xl, "x")?,
            address(ys, yl, "y")?,
            address(gs, gl, "the output gradient")?,
        );
        // SAFETY: `bn_grad_input` writes every one of the `len` values.
        let (dx_storage, dx) = unsafe { alloc_as(&dev, xs.dtype(), len)? };
        let func =
            dev.get_or_load_custom_func(&entry("bn_grad_input", xs.dtype())?, MODULE, ptx()?)?;
        let (len64, c32, hw32, relu) = (
            len as i64,
            i32_of(c, "C")?,
            i32_of(hw, "H·W")?,
            i32::from(self.relu),
        );
        with_slice(&self.stats, |stats| {
            with_slice(&self.red, |red| {
                let mut launch = func.builder();
                launch.arg(&x);
                launch.arg(&y);
                launch.arg(&g);
                launch.arg(stats);
                launch.arg(red);
                launch.arg(&dx);
                launch.arg(&len64);
                launch.arg(&c32);
                launch.arg(&hw32);
                launch.arg(&relu);
                // SAFETY: the arguments match `bn_grad_input`.
                unsafe { launch.launch(elementwise(len)) }.w()?;
                Ok(())
            })
        })?;
        Ok((dx_storage, xl.shape().clone()))
    }
}

/// Train-mode BatchNorm (+ ReLU) of `x` `[N, C, ...]` on a CUDA device:
/// `(y, mean, biased var)`, as [`crate::cpu::batch_norm_train`]; `y`
/// carries gradients for whichever of `x`, `weight`, `bias` track them.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let x = x.contiguous()?;
    let (weight, bias) = (weight.contiguous()?, bias.contiguous()?);
    let stats = x
        .detach()
        .apply_op3_no_bwd(&weight.detach(), &bias.detach(), &Stats { eps })?;
    let y = x.apply_op3(
        &weight,
        &bias,
        Apply {
            stats: stats.clone(),
            relu,
        },
    )?;
    Ok((y, stats.get(0)?, stats.get(1)?))
}

/// `relu(BatchNorm(x) + residual)` in train mode on a CUDA device, the end
/// of a residual block: `(y, mean, biased var)`, as
/// [`crate::cpu::conv2d_batch_norm_add_relu_train`] after its convolution;
/// `y` carries gradients for whichever of `x`, `weight`, `bias` and
/// `residual` track them.
pub fn batch_norm_add_relu_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    residual: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let x = x.contiguous()?;
    let (weight, bias) = (weight.contiguous()?, bias.contiguous()?);
    let stats = x
        .detach()
        .apply_op3_no_bwd(&weight.detach(), &bias.detach(), &Stats { eps })?;
    // Differentiable: the gradient of `wb` splits back into weight and bias.
    let wb = Tensor::cat(&[&weight, &bias], 0)?;
    let y = x.apply_op3(
        &wb,
        &residual.contiguous()?,
        ApplyResidual {
            stats: stats.clone(),
            channels: weight.elem_count(),
        },
    )?;
    Ok((y, stats.get(0)?, stats.get(1)?))
}

/// `(planes, h, w, oh, ow)` of a max-pool input `[N, C, H, W]`.
fn pool_dims(layout: &Layout) -> Result<(usize, usize, usize, usize, usize)> {
    let (n, c, h, w) = layout.shape().dims4()?;
    if h == 0 || w == 0 {
        candle_core::bail!("cuda max-pool: empty plane {h}×{w}")
    }
    i32_of(h * w, "H·W")?;
    let (oh, ow) = (
        crate::max_pool::pooled_len(h),
        crate::max_pool::pooled_len(w),
    );
    Ok((n * c, h, w, oh, ow))
}

/// The stem's 3×3, stride-2, padding-1 max-pool, with [`MaxPoolBackward`].
struct MaxPool;

impl candle_core::CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "cuda-max-pool-3x3-s2"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (planes, h, w, oh, ow) = pool_dims(xl)?;
        let (n, c, _, _) = xl.shape().dims4()?;
        let len = planes * oh * ow;
        let dev = xs.device().clone();
        let x = address(xs, xl, "the max-pool input")?;
        // SAFETY: `max_pool_fwd` writes every one of the `len` values.
        let (y_storage, y) = unsafe { alloc_as(&dev, xs.dtype(), len)? };
        let func =
            dev.get_or_load_custom_func(&entry("max_pool_fwd", xs.dtype())?, MODULE, ptx()?)?;
        let planes64 = planes as i64;
        let (h32, w32) = (i32_of(h, "H")?, i32_of(w, "W")?);
        let (oh32, ow32) = (oh as i32, ow as i32);
        let mut launch = func.builder();
        launch.arg(&x);
        launch.arg(&y);
        launch.arg(&planes64);
        launch.arg(&h32);
        launch.arg(&w32);
        launch.arg(&oh32);
        launch.arg(&ow32);
        // SAFETY: the arguments match `max_pool_fwd`.
        unsafe { launch.launch(elementwise(len)) }.w()?;
        Ok((y_storage, Shape::from((n, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(x.detach().apply_op2_no_bwd(&grad, &MaxPoolBackward)?))
    }
}

/// The max-pool's input gradient from its input and output gradient.
struct MaxPoolBackward;

impl candle_core::CustomOp2 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "cuda-max-pool-3x3-s2-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (planes, h, w, oh, ow) = pool_dims(xl)?;
        let (n, c, _, _) = xl.shape().dims4()?;
        if gl.shape().dims4()? != (n, c, oh, ow) {
            candle_core::bail!(
                "cuda max-pool backward: gradient {:?} for an input {:?}",
                gl.shape().dims(),
                xl.shape().dims()
            )
        }
        let len = planes * h * w;
        let dev = xs.device().clone();
        same_dtype(xs, gs, "max-pool backward")?;
        let (x, g) = (
            address(xs, xl, "the max-pool input")?,
            address(gs, gl, "the output gradient")?,
        );
        // SAFETY: `max_pool_bwd` writes every one of the `len` values.
        let (dx_storage, dx) = unsafe { alloc_as(&dev, xs.dtype(), len)? };
        let func =
            dev.get_or_load_custom_func(&entry("max_pool_bwd", xs.dtype())?, MODULE, ptx()?)?;
        let planes64 = planes as i64;
        let (h32, w32) = (i32_of(h, "H")?, i32_of(w, "W")?);
        let (oh32, ow32) = (oh as i32, ow as i32);
        let mut launch = func.builder();
        launch.arg(&x);
        launch.arg(&g);
        launch.arg(&dx);
        launch.arg(&planes64);
        launch.arg(&h32);
        launch.arg(&w32);
        launch.arg(&oh32);
        launch.arg(&ow32);
        // SAFETY: the arguments match `max_pool_bwd`.
        unsafe { launch.launch(elementwise(len)) }.w()?;
        Ok((dx_storage, xl.shape().clone()))
    }
}

/// The stem's 3×3, stride-2, padding-1 max-pool of an `f32` `[N, C, H, W]`
/// on a CUDA device, as [`crate::max_pool::max_pool_3x3_s2`] on the CPU:
/// the same values, and the same gradient summed in the same order.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPool)
}

/// `(n, c, h·w)` of an `f32` concat-pool input `[N, C, H, W]`.
fn concat_dims(storage: &CudaStorage, layout: &Layout) -> Result<(usize, usize, usize)> {
    if storage.dtype() != DType::F32 {
        candle_core::bail!("cuda concat-pool: expects f32, got {:?}", storage.dtype())
    }
    let (n, c, h, w) = layout.shape().dims4()?;
    if h * w == 0 {
        candle_core::bail!("cuda concat-pool: empty plane {h}×{w}")
    }
    i32_of(h * w, "H·W")?;
    i32_of(c, "C")?;
    Ok((n, c, h * w))
}

/// The CUDA body of [`crate::concat_pool`]'s forward op: `[N, 2C]`.
pub(crate) fn concat_pool_fwd(xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
    let (n, c, hw) = concat_dims(xs, xl)?;
    let dev = xs.device().clone();
    let x = address(xs, xl, "the concat-pool input")?;
    // SAFETY: `concat_pool_fwd` writes both values of every plane.
    let (y_storage, y) = unsafe { alloc_as(&dev, DType::F32, n * 2 * c)? };
    let func = dev.get_or_load_custom_func("concat_pool_fwd", MODULE, ptx()?)?;
    let planes = (n * c) as i64;
    let (c32, hw32, inv) = (c as i32, hw as i32, 1.0 / hw as f32);
    let mut launch = func.builder();
    launch.arg(&x);
    launch.arg(&y);
    launch.arg(&planes);
    launch.arg(&c32);
    launch.arg(&hw32);
    launch.arg(&inv);
    // SAFETY: the arguments match `concat_pool_fwd`.
    unsafe { launch.launch(elementwise(n * c)) }.w()?;
    Ok((y_storage, Shape::from((n, 2 * c))))
}

/// The CUDA body of [`crate::concat_pool`]'s backward op: `dx` from the
/// input and the `[N, 2C]` output gradient.
pub(crate) fn concat_pool_bwd(
    xs: &CudaStorage,
    xl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (n, c, hw) = concat_dims(xs, xl)?;
    same_dtype(xs, gs, "concat-pool backward")?;
    if gl.shape().dims() != [n, 2 * c] {
        candle_core::bail!(
            "cuda concat-pool backward: gradient {:?} for an input {:?}",
            gl.shape().dims(),
            xl.shape().dims()
        )
    }
    let dev = xs.device().clone();
    let (x, g) = (
        address(xs, xl, "the concat-pool input")?,
        address(gs, gl, "the output gradient")?,
    );
    // SAFETY: `concat_pool_bwd` writes every value of every plane.
    let (dx_storage, dx) = unsafe { alloc_as(&dev, DType::F32, n * c * hw)? };
    let func = dev.get_or_load_custom_func("concat_pool_bwd", MODULE, ptx()?)?;
    let planes = (n * c) as i64;
    let (c32, hw32, inv) = (c as i32, hw as i32, 1.0 / hw as f32);
    let mut launch = func.builder();
    launch.arg(&x);
    launch.arg(&g);
    launch.arg(&dx);
    launch.arg(&planes);
    launch.arg(&c32);
    launch.arg(&hw32);
    launch.arg(&inv);
    // SAFETY: the arguments match `concat_pool_bwd`.
    unsafe { launch.launch(elementwise(n * c)) }.w()?;
    Ok((dx_storage, xl.shape().clone()))
}

/// The compute capability `(major, minor)` of a CUDA device; `None` for
/// any other device or if the driver does not say.
pub fn compute_capability(device: &candle_core::Device) -> Option<(i32, i32)> {
    let candle_core::Device::Cuda(dev) = device else {
        return None;
    };
    dev.cuda_stream().context().compute_capability().ok()
}

/// The default memory pool of a CUDA device: where candle's stream-ordered
/// allocations (`cuMemAllocAsync`) come from.
fn memory_pool(
    device: &candle_core::Device,
) -> Option<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let candle_core::Device::Cuda(dev) = device else {
        return None;
    };
    let stream = dev.cuda_stream();
    let context = stream.context();
    context.bind_to_thread().ok()?;
    let mut pool = std::mem::MaybeUninit::uninit();
    // SAFETY: a valid device of a live context; the driver writes the pool.
    unsafe { sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), context.cu_device()) }
        .result()
        .ok()?;
    // SAFETY: written by the successful call above.
    Some(unsafe { pool.assume_init() })
}

/// Keeps the memory that tensors free on a CUDA device in its pool for the
/// next allocations, instead of returning it to the driver at every
/// synchronization (the pool's default), as PyTorch's caching allocator
/// does: a training step then allocates from memory it already holds.
/// Whether it could (false off CUDA). Called by the CLI and the benches,
/// never by the library itself.
pub fn keep_pool_memory(device: &candle_core::Device) -> bool {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Some(pool) = memory_pool(device) else {
        return false;
    };
    let mut threshold = u64::MAX;
    // SAFETY: a live pool and a u64 attribute value.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
    .is_ok()
}

/// The most memory in use on a CUDA device's pool (tensors, workspaces)
/// since the last [`reset_peak_memory`], in bytes; `None` off CUDA.
pub fn peak_memory(device: &candle_core::Device) -> Option<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = memory_pool(device)?;
    let mut bytes = 0u64;
    // SAFETY: a live pool and a u64 attribute value.
    unsafe {
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut bytes as *mut u64).cast(),
        )
    }
    .result()
    .ok()?;
    Some(bytes)
}

/// Starts [`peak_memory`] again from what is in use now.
pub fn reset_peak_memory(device: &candle_core::Device) -> bool {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Some(pool) = memory_pool(device) else {
        return false;
    };
    let mut zero = 0u64;
    // SAFETY: a live pool; the driver allows only 0 for this attribute.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut zero as *mut u64).cast(),
        )
    }
    .result()
    .is_ok()
}

/// `running = running·(1 − momentum) + batch·factor·momentum` in place.
struct BlendRunning {
    momentum: f64,
    factor: f64,
}

impl candle_core::InplaceOp2 for BlendRunning {
    fn name(&self) -> &'static str {
        "cuda-batch-norm-running"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("{} runs on CUDA devices only", self.name())
    }

    fn cuda_fwd(
        &self,
        running: &mut CudaStorage,
        rl: &Layout,
        batch: &CudaStorage,
        bl: &Layout,
    ) -> Result<()> {
        let c = rl.shape().elem_count();
        if bl.shape().elem_count() != c {
            candle_core::bail!(
                "cuda batch-norm: {c} running values but {} batch values",
                bl.shape().elem_count()
            )
        }
        let dev = running.device().clone();
        let batch = cuda_slice!(batch, bl, "the batch statistic");
        let Some((start, end)) = rl.contiguous_offsets() else {
            candle_core::bail!("cuda kernels: the running statistic is not contiguous")
        };
        let mut target = running.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
        let func = dev.get_or_load_custom_func("bn_running", MODULE, ptx()?)?;
        let c32 = i32_of(c, "C")?;
        let (keep, take, factor) = (
            (1.0 - self.momentum) as f32,
            self.momentum as f32,
            self.factor as f32,
        );
        let mut launch = func.builder();
        launch.arg(&mut target);
        launch.arg(&batch);
        launch.arg(&c32);
        launch.arg(&keep);
        launch.arg(&take);
        launch.arg(&factor);
        // SAFETY: the arguments match `bn_running`; both cover `c` values.
        unsafe { launch.launch(elementwise(c)) }.w()?;
        Ok(())
    }
}

/// BatchNorm's running statistic `running` (an `f32` variable on a CUDA
/// device) blended in place with the batch's, `batch · factor`, in one
/// launch: `running·(1 − momentum) + batch·factor·momentum`.
pub fn blend_running(running: &Tensor, batch: &Tensor, momentum: f64, factor: f64) -> Result<()> {
    running.inplace_op2(&batch.contiguous()?, &BlendRunning { momentum, factor })
}
