//! Convolutions through cuDNN (the `cudnn` feature): the forward pass, the
//! input gradient and the kernel gradient each as one cuDNN call, instead of
//! the generic path's candle convolutions over dilated, padded and
//! transposed copies.
//!
//! - **Algorithms** are benchmarked once per shape, pass, dtype, math mode
//!   and operand alignment (cuDNN's `Find`, as PyTorch's
//!   `cudnn.benchmark = True`), falling back to cuDNN's heuristic if
//!   benchmarking finds nothing, and cached for the process, fastest first:
//!   one whose workspace cannot be allocated or that cuDNN refuses is
//!   dropped and the next one runs. As with PyTorch's benchmark mode, the
//!   fastest algorithm may sum in a run-dependent order (atomics), so GPU
//!   gradients are not reproducible to the bit.
//! - **One workspace** per device and thread, grown to the largest any call
//!   needed and reused: every call runs on candle's one stream, in order.
//! - **Only what is needed**: the graph node holds the input and the kernel
//!   (never a second copy of the output); its backward computes the input
//!   gradient only if the input tracks one (never for the image) and the
//!   kernel gradient only if the kernel does (never for a frozen kernel).
//! - **Math**: `f32` operands run in exact `f32` ([`F32Math::Exact`], cuDNN's
//!   FMA kernels, what the CPU computes) unless [`F32Math::Tf32`] allows the
//!   tensor cores' TF32 (PyTorch's default for convolutions); `bf16` and `f16`
//!   operands use the tensor cores and accumulate in `f32`.
//!
//! `tests/device.rs` checks all three passes against the CPU kernels on a GPU.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{result as dnn, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtrMut};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, DeviceId};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// How cuDNN may compute a convolution of `f32` operands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum F32Math {
    /// Plain `f32` fused multiply-adds: the CPU kernels' values up to the
    /// order of summation.
    #[default]
    Exact,
    /// TF32 on the tensor cores (compute capability ≥ 8.0): a 10-bit
    /// mantissa for the products, several times faster.
    Tf32,
}

/// Whether cuDNN takes these operands: all on one CUDA device, all `f32`,
/// `bf16` or `f16`, one dtype.
pub fn supported(tensors: &[&Tensor]) -> bool {
    let Some(first) = tensors.first() else {
        return false;
    };
    matches!(first.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && tensors
            .iter()
            .all(|t| t.device().is_cuda() && t.device().same_device(first.device()))
        && tensors.iter().all(|t| t.dtype() == first.dtype())
}

/// `conv2d(x, kernel)` through cuDNN with square `padding` and `stride`, one
/// group, no dilation; the result carries gradients for whichever operands
/// track them.
pub fn conv2d(
    x: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
    math: F32Math,
) -> Result<Tensor> {
    let (x, kernel) = (x.contiguous()?, kernel.contiguous()?);
    x.apply_op2(
        &kernel,
        Conv {
            padding,
            stride,
            math,
        },
    )
}

/// One convolution's sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Geometry {
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    k_h: usize,
    k_w: usize,
    padding: usize,
    stride: usize,
}

impl Geometry {
    /// From the input's and the kernel's dims, refusing what cuDNN would.
    fn new(
        (n, c_in, h, w): (usize, usize, usize, usize),
        (c_out, k_c, k_h, k_w): (usize, usize, usize, usize),
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let g = Self {
            n,
            c_in,
            h,
            w,
            c_out,
            k_h,
            k_w,
            padding,
            stride,
        };
        if k_c != c_in {
            candle_core::bail!(
                "cudnn conv2d: the input has {c_in} channels, the kernel [{c_out}, {k_c}, {k_h}, {k_w}] expects {k_c}"
            )
        }
        if stride == 0 || k_h == 0 || k_w == 0 || h + 2 * padding < k_h || w + 2 * padding < k_w {
            candle_core::bail!(
                "cudnn conv2d: a {k_h}×{k_w} kernel with stride {stride} does not fit a {h}×{w} input padded by {padding}"
            )
        }
        for (what, v) in [
            ("the input", n * c_in * h * w),
            ("the kernel", c_out * c_in * k_h * k_w),
            ("the output", n * c_out * g.out_h() * g.out_w()),
        ] {
            if i32::try_from(v).is_err() {
                candle_core::bail!("cudnn conv2d: {what} has {v} values, more than cuDNN indexes")
            }
        }
        Ok(g)
    }

    fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.k_h) / self.stride + 1
    }

    fn out_w(&self) -> usize {
        (self.w + 2 * self.padding - self.k_w) / self.stride + 1
    }

    fn x_len(&self) -> usize {
        self.n * self.c_in * self.h * self.w
    }

    fn k_len(&self) -> usize {
        self.c_out * self.c_in * self.k_h * self.k_w
    }

    fn y_len(&self) -> usize {
        self.n * self.c_out * self.out_h() * self.out_w()
    }

    fn x_shape(&self) -> Shape {
        Shape::from((self.n, self.c_in, self.h, self.w))
    }

    fn k_shape(&self) -> Shape {
        Shape::from((self.c_out, self.c_in, self.k_h, self.k_w))
    }

    fn y_shape(&self) -> Shape {
        Shape::from((self.n, self.c_out, self.out_h(), self.out_w()))
    }
}

/// `i32` dims for a descriptor (sizes checked by [`Geometry::new`]).
fn dims_i32(d: [usize; 4]) -> [i32; 4] {
    d.map(|v| v as i32)
}

/// The three passes, each with its own algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Pass {
    Forward,
    InputGrad,
    KernelGrad,
}

/// What a cached algorithm is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    pass: Pass,
    geometry: Geometry,
    dtype: DType,
    math: F32Math,
    /// The smaller alignment of the two operands, in bytes (≤ 16).
    align: u8,
}

/// A chosen algorithm: which one, the math it runs in, its workspace bytes.
#[derive(Debug, Clone, Copy)]
struct Choice<A> {
    algo: A,
    math: sys::cudnnMathType_t,
    workspace: usize,
}

/// A cuDNN handle on candle's stream of one device.
struct Handle(sys::cudnnHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by `create_handle` and destroyed once.
        let _ = unsafe { dnn::destroy_handle(self.0) };
    }
}

/// Per device and thread: the handle, the algorithm caches, the workspace.
struct State {
    handle: Handle,
    forward: HashMap<Key, Vec<Choice<sys::cudnnConvolutionFwdAlgo_t>>>,
    input_grad: HashMap<Key, Vec<Choice<sys::cudnnConvolutionBwdDataAlgo_t>>>,
    kernel_grad: HashMap<Key, Vec<Choice<sys::cudnnConvolutionBwdFilterAlgo_t>>>,
    workspace: Option<CudaSlice<u8>>,
}

impl State {
    fn new(dev: &CudaDevice) -> Result<Self> {
        let stream = dev.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(candle_core::Error::wrap)?;
        let handle = Handle(dnn::create_handle()?);
        // SAFETY: a live handle and candle's live stream of this device.
        unsafe { dnn::set_stream(handle.0, stream.cu_stream() as sys::cudaStream_t) }?;
        Ok(Self {
            handle,
            forward: HashMap::new(),
            input_grad: HashMap::new(),
            kernel_grad: HashMap::new(),
            workspace: None,
        })
    }
}

/// The shared workspace, at least `bytes` long: a device pointer (null
/// when nothing is needed) and its length.
fn grow(
    workspace: &mut Option<CudaSlice<u8>>,
    dev: &CudaDevice,
    bytes: usize,
) -> Result<(u64, usize)> {
    if bytes == 0 {
        return Ok((0, 0));
    }
    if workspace.as_ref().is_none_or(|w| w.len() < bytes) {
        // The old one is freed in stream order, after the calls that used it.
        *workspace = None;
        // SAFETY: a workspace is scratch memory cuDNN writes before it reads.
        *workspace = Some(unsafe { dev.alloc::<u8>(bytes)? });
    }
    let workspace = workspace.as_mut().expect("allocated above");
    let len = workspace.len();
    let stream = dev.cuda_stream();
    let (ptr, _sync) = workspace.device_ptr_mut(&stream);
    Ok((ptr, len))
}

thread_local! {
    // cuDNN handles are not `Send`; training runs its graph on one thread.
    static STATES: RefCell<HashMap<DeviceId, State>> = RefCell::new(HashMap::new());
}

fn with_state<R>(dev: &CudaDevice, f: impl FnOnce(&mut State) -> Result<R>) -> Result<R> {
    STATES.with(|states| {
        let mut states = states.borrow_mut();
        let state = match states.entry(dev.id()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(State::new(dev)?),
        };
        f(state)
    })
}

/// cuDNN's data type of the operands and the type it accumulates in.
fn data_types(dtype: DType) -> Result<(sys::cudnnDataType_t, sys::cudnnDataType_t)> {
    use sys::cudnnDataType_t::*;
    Ok(match dtype {
        DType::F32 => (CUDNN_DATA_FLOAT, CUDNN_DATA_FLOAT),
        DType::BF16 => (CUDNN_DATA_BFLOAT16, CUDNN_DATA_FLOAT),
        DType::F16 => (CUDNN_DATA_HALF, CUDNN_DATA_FLOAT),
        other => candle_core::bail!("cudnn conv2d: no cuDNN path for {other:?}"),
    })
}

/// The math mode a descriptor starts in.
fn math_type(dtype: DType, math: F32Math) -> sys::cudnnMathType_t {
    use sys::cudnnMathType_t::*;
    match (dtype, math) {
        (DType::F32, F32Math::Exact) => CUDNN_FMA_MATH,
        (DType::F32, F32Math::Tf32) => CUDNN_DEFAULT_MATH,
        _ => CUDNN_TENSOR_OP_MATH,
    }
}

macro_rules! descriptor {
    ($name:ident, $raw:ty, $destroy:path) => {
        struct $name($raw);

        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: created once by its `create_*` and destroyed once.
                let _ = unsafe { $destroy(self.0) };
            }
        }
    };
}

descriptor!(
    TensorDesc,
    sys::cudnnTensorDescriptor_t,
    dnn::destroy_tensor_descriptor
);
descriptor!(
    FilterDesc,
    sys::cudnnFilterDescriptor_t,
    dnn::destroy_filter_descriptor
);
descriptor!(
    ConvDesc,
    sys::cudnnConvolutionDescriptor_t,
    dnn::destroy_convolution_descriptor
);

/// The descriptors of one convolution: input, kernel, output, convolution.
struct Descriptors {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    conv: ConvDesc,
}

impl Descriptors {
    fn new(g: &Geometry, dtype: DType, math: F32Math) -> Result<Self> {
        use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let (data, compute) = data_types(dtype)?;
        let tensor = |dims: [usize; 4]| -> Result<TensorDesc> {
            let desc = TensorDesc(dnn::create_tensor_descriptor()?);
            let [n, c, h, w] = dims_i32(dims);
            // SAFETY: a live descriptor.
            unsafe { dnn::set_tensor4d_descriptor(desc.0, CUDNN_TENSOR_NCHW, data, [n, c, h, w]) }?;
            Ok(desc)
        };
        let x = tensor([g.n, g.c_in, g.h, g.w])?;
        let y = tensor([g.n, g.c_out, g.out_h(), g.out_w()])?;
        let w = FilterDesc(dnn::create_filter_descriptor()?);
        let [o, c, kh, kw] = dims_i32([g.c_out, g.c_in, g.k_h, g.k_w]);
        // SAFETY: a live descriptor.
        unsafe { dnn::set_filter4d_descriptor(w.0, data, CUDNN_TENSOR_NCHW, [o, c, kh, kw]) }?;
        let conv = ConvDesc(dnn::create_convolution_descriptor()?);
        let (p, s) = (g.padding as i32, g.stride as i32);
        // SAFETY: a live descriptor.
        unsafe {
            dnn::set_convolution2d_descriptor(
                conv.0,
                p,
                p,
                s,
                s,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                compute,
            )?;
            dnn::set_convolution_math_type(conv.0, math_type(dtype, math))?;
        }
        Ok(Self { x, w, y, conv })
    }
}

/// The fields of cuDNN's per-algorithm results that a choice needs.
trait Perf: Copy {
    type Algo: Copy;
    fn parts(&self) -> (Self::Algo, sys::cudnnStatus_t, sys::cudnnMathType_t);
}

macro_rules! perf {
    ($perf:ty, $algo:ty) => {
        impl Perf for $perf {
            type Algo = $algo;
            fn parts(&self) -> (Self::Algo, sys::cudnnStatus_t, sys::cudnnMathType_t) {
                (self.algo, self.status, self.mathType)
            }
        }
    };
}

perf!(
    sys::cudnnConvolutionFwdAlgoPerf_t,
    sys::cudnnConvolutionFwdAlgo_t
);
perf!(
    sys::cudnnConvolutionBwdDataAlgoPerf_t,
    sys::cudnnConvolutionBwdDataAlgo_t
);
perf!(
    sys::cudnnConvolutionBwdFilterAlgoPerf_t,
    sys::cudnnConvolutionBwdFilterAlgo_t
);

/// The results that succeeded, fastest first, each with the math type to
/// run it in: exact `f32` takes no tensor-op algorithm and runs in FMA math;
/// no algorithm that converts to FP16 internally (its small range can
/// overflow) is taken at all.
fn usable<P: Perf>(results: &[P], exact: bool) -> Vec<(P::Algo, sys::cudnnMathType_t)> {
    use sys::cudnnMathType_t::*;
    results
        .iter()
        .map(Perf::parts)
        .filter(|&(_, status, math)| {
            status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                && math != CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION
                && !(exact && math == CUDNN_TENSOR_OP_MATH)
        })
        .map(|(algo, _, math)| (algo, if exact { CUDNN_FMA_MATH } else { math }))
        .collect()
}

type CudnnResult<T> = std::result::Result<T, dnn::CudnnError>;

/// A query that fills cuDNN's per-algorithm results and their count.
type Query<'a, P, const N: usize> = dyn Fn(&mut [P; N], &mut i32) -> CudnnResult<()> + 'a;

/// The cached candidates for `key`, or new ones: the usable results of
/// cuDNN's benchmark `find`, else of its heuristic `guess`, fastest first,
/// each sized by `workspace` once its math type is set on `conv`.
fn candidates<'c, P: Perf, const N: usize>(
    cache: &'c mut HashMap<Key, Vec<Choice<P::Algo>>>,
    key: Key,
    conv: &ConvDesc,
    find: impl Fn(&mut [P; N], &mut i32) -> CudnnResult<()>,
    guess: impl Fn(&mut [P; N], &mut i32) -> CudnnResult<()>,
    workspace: impl Fn(P::Algo) -> CudnnResult<usize>,
) -> Result<&'c mut Vec<Choice<P::Algo>>> {
    // An empty list is one whose every algorithm failed at launch: ask
    // cuDNN again rather than fail for good.
    let slot = cache.entry(key).or_default();
    if !slot.is_empty() {
        return Ok(slot);
    }
    let exact = key.dtype == DType::F32 && key.math == F32Math::Exact;
    let ask = |f: &Query<'_, P, N>| {
        // SAFETY: cuDNN's result structs are plain C data; all-zero is
        // valid (algorithm 0, success, default math) and cuDNN
        // overwrites the first `count`.
        let mut results: [P; N] = unsafe { std::mem::zeroed() };
        let mut count = 0i32;
        if f(&mut results, &mut count).is_err() {
            return Vec::new();
        }
        let count = (count.max(0) as usize).min(N);
        usable(&results[..count], exact)
    };
    let mut found = ask(&find);
    if found.is_empty() {
        found = ask(&guess);
    }
    let mut list = Vec::with_capacity(found.len());
    for (algo, math) in found {
        // SAFETY: a live descriptor.
        unsafe { dnn::set_convolution_math_type(conv.0, math) }?;
        if let Ok(bytes) = workspace(algo) {
            list.push(Choice {
                algo,
                math,
                workspace: bytes,
            });
        }
    }
    if list.is_empty() {
        candle_core::bail!(
            "cuDNN has no {:?} algorithm for {:?} in {:?} ({:?})",
            key.pass,
            key.geometry,
            key.dtype,
            key.math
        )
    }
    *slot = list;
    Ok(slot)
}

/// Runs `launch(algo, workspace, workspace bytes)` with the first candidate
/// that works (as PyTorch does): one whose workspace cannot be allocated or
/// that cuDNN refuses is dropped from the cache and the next one tried.
fn launch_first<A: Copy>(
    candidates: &mut Vec<Choice<A>>,
    workspace: &mut Option<CudaSlice<u8>>,
    dev: &CudaDevice,
    conv: &ConvDesc,
    mut launch: impl FnMut(A, u64, usize) -> Result<()>,
) -> Result<()> {
    let mut failure = None;
    for (i, choice) in candidates.iter().enumerate() {
        let attempt = (|| {
            // SAFETY: a live descriptor.
            unsafe { dnn::set_convolution_math_type(conv.0, choice.math) }?;
            let (ws, ws_len) = grow(workspace, dev, choice.workspace)?;
            launch(choice.algo, ws, ws_len)
        })();
        match attempt {
            Ok(()) => {
                candidates.drain(..i);
                return Ok(());
            }
            Err(e) => failure = Some(e),
        }
    }
    candidates.clear();
    Err(failure.unwrap_or_else(|| candle_core::Error::Msg("cuDNN: no algorithm left".into())))
}

/// The largest power of two (up to 16) that divides the byte offset of an
/// operand starting `start` elements of `size` bytes into its buffer
/// (buffers themselves are aligned far more): cuDNN's choice may depend on
/// it, so it is part of the cache key.
fn alignment(layout: &Layout, size: usize) -> u8 {
    let bytes = layout.start_offset() * size;
    if bytes == 0 {
        16
    } else {
        (1usize << bytes.trailing_zeros()).min(16) as u8
    }
}

/// Runs `f` with the operands' device addresses (each `(storage, layout,
/// expected length, name)`) and those of a fresh output of `len` values of
/// their dtype, which cuDNN overwrites (β = 0).
fn with_output(
    a: (&CudaStorage, &Layout, usize, &str),
    b: (&CudaStorage, &Layout, usize, &str),
    len: usize,
    f: impl FnOnce(u64, u64, u64) -> Result<()>,
) -> Result<CudaStorage> {
    super::same_dtype(a.0, b.0, "cudnn conv2d")?;
    for (_, layout, expected, what) in [a, b] {
        let values = layout.shape().elem_count();
        if values != expected {
            candle_core::bail!("cudnn conv2d: {what} has {values} values, expected {expected}")
        }
    }
    let pa = super::address(a.0, a.1, a.3)?;
    let pb = super::address(b.0, b.1, b.3)?;
    // SAFETY: cuDNN writes all `len` values (β = 0 never reads them).
    let (out, po) = unsafe { super::alloc_as(a.0.device(), a.0.dtype(), len)? };
    f(pa, pb, po)?;
    Ok(out)
}

/// α = 1, β = 0 as cuDNN reads them for `f32` accumulation (all our types).
const ALPHA: f32 = 1.0;
const BETA: f32 = 0.0;

fn scaling(v: &f32) -> *const c_void {
    (v as *const f32).cast()
}

/// The convolution's graph node over `(x, kernel)`.
struct Conv {
    padding: usize,
    stride: usize,
    math: F32Math,
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "cudnn-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        super::cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let g = Geometry::new(
            xl.shape().dims4()?,
            kl.shape().dims4()?,
            self.padding,
            self.stride,
        )?;
        let dtype = xs.dtype();
        let dev = xs.device().clone();
        let key = Key {
            pass: Pass::Forward,
            geometry: g,
            dtype,
            math: self.math,
            align: alignment(xl, dtype.size_in_bytes()).min(alignment(kl, dtype.size_in_bytes())),
        };
        let d = Descriptors::new(&g, dtype, self.math)?;
        let y = with_state(&dev, |state| {
            let State {
                handle,
                forward,
                workspace,
                ..
            } = state;
            let h = handle.0;
            let list = candidates(
                forward,
                key,
                &d.conv,
                // SAFETY (all three): live handle and descriptors, and
                // result arrays of the length passed.
                |r: &mut [sys::cudnnConvolutionFwdAlgoPerf_t; 8], n: &mut i32| unsafe {
                    sys::cudnnFindConvolutionForwardAlgorithm(
                        h,
                        d.x.0,
                        d.w.0,
                        d.conv.0,
                        d.y.0,
                        8,
                        n,
                        r.as_mut_ptr(),
                    )
                    .result()
                },
                |r: &mut [sys::cudnnConvolutionFwdAlgoPerf_t; 8], n: &mut i32| unsafe {
                    dnn::get_convolution_forward_algorithm(
                        h,
                        d.x.0,
                        d.w.0,
                        d.conv.0,
                        d.y.0,
                        8,
                        n,
                        r.as_mut_ptr(),
                    )
                },
                |algo| unsafe {
                    dnn::get_convolution_forward_workspace_size(
                        h, d.x.0, d.w.0, d.conv.0, d.y.0, algo,
                    )
                },
            )?;
            with_output(
                (xs, xl, g.x_len(), "the input"),
                (ks, kl, g.k_len(), "the kernel"),
                g.y_len(),
                |x, k, y| {
                    launch_first(list, workspace, &dev, &d.conv, |algo, ws, ws_len| {
                        // SAFETY: pointers to contiguous buffers of the sizes
                        // the descriptors give, on the handle's stream.
                        unsafe {
                            dnn::convolution_forward(
                                h,
                                scaling(&ALPHA),
                                d.x.0,
                                x as *const c_void,
                                d.w.0,
                                k as *const c_void,
                                d.conv.0,
                                algo,
                                ws as *mut c_void,
                                ws_len,
                                scaling(&BETA),
                                d.y.0,
                                y as *mut c_void,
                            )
                        }?;
                        Ok(())
                    })
                },
            )
        })?;
        Ok((y, g.y_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = if x.track_op() {
            let op = InputGrad {
                x_dims: x.dims4()?,
                padding: self.padding,
                stride: self.stride,
                math: self.math,
            };
            Some(grad.apply_op2_no_bwd(&kernel.detach(), &op)?)
        } else {
            None
        };
        let dk = if kernel.track_op() {
            let op = KernelGrad {
                k_dims: kernel.dims4()?,
                padding: self.padding,
                stride: self.stride,
                math: self.math,
            };
            Some(x.detach().apply_op2_no_bwd(&grad, &op)?)
        } else {
            None
        };
        Ok((dx, dk))
    }
}

/// The input gradient over `(output gradient, kernel)`.
struct InputGrad {
    x_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
    math: F32Math,
}

/// The output gradient's dims must be those of the convolution's output.
fn check_grad(g: &Geometry, grad: &Layout) -> Result<()> {
    if grad.shape() != &g.y_shape() {
        candle_core::bail!(
            "cudnn conv2d backward: output gradient {:?}, expected {:?}",
            grad.shape().dims(),
            g.y_shape().dims()
        )
    }
    Ok(())
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "cudnn-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        super::cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let g = Geometry::new(self.x_dims, kl.shape().dims4()?, self.padding, self.stride)?;
        check_grad(&g, gl)?;
        let dtype = gs.dtype();
        let dev = gs.device().clone();
        let key = Key {
            pass: Pass::InputGrad,
            geometry: g,
            dtype,
            math: self.math,
            align: alignment(gl, dtype.size_in_bytes()).min(alignment(kl, dtype.size_in_bytes())),
        };
        let d = Descriptors::new(&g, dtype, self.math)?;
        let dx = with_state(&dev, |state| {
            let State {
                handle,
                input_grad,
                workspace,
                ..
            } = state;
            let h = handle.0;
            let list = candidates(
                input_grad,
                key,
                &d.conv,
                // SAFETY (all three): live handle and descriptors, and
                // result arrays of the length passed.
                |r: &mut [sys::cudnnConvolutionBwdDataAlgoPerf_t; 6], n: &mut i32| unsafe {
                    sys::cudnnFindConvolutionBackwardDataAlgorithm(
                        h,
                        d.w.0,
                        d.y.0,
                        d.conv.0,
                        d.x.0,
                        6,
                        n,
                        r.as_mut_ptr(),
                    )
                    .result()
                },
                |r: &mut [sys::cudnnConvolutionBwdDataAlgoPerf_t; 6], n: &mut i32| unsafe {
                    dnn::get_convolution_backward_data_algorithm(
                        h,
                        d.w.0,
                        d.y.0,
                        d.conv.0,
                        d.x.0,
                        6,
                        n,
                        r.as_mut_ptr(),
                    )
                },
                |algo| unsafe {
                    dnn::get_convolution_backward_data_workspace_size(
                        h, d.w.0, d.y.0, d.conv.0, d.x.0, algo,
                    )
                },
            )?;
            with_output(
                (gs, gl, g.y_len(), "the output gradient"),
                (ks, kl, g.k_len(), "the kernel"),
                g.x_len(),
                |dy, k, dx| {
                    launch_first(list, workspace, &dev, &d.conv, |algo, ws, ws_len| {
                        // SAFETY: as in the forward pass.
                        unsafe {
                            dnn::convolution_backward_data(
                                h,
                                scaling(&ALPHA),
                                d.w.0,
                                k as *const c_void,
                                d.y.0,
                                dy as *const c_void,
                                d.conv.0,
                                algo,
                                ws as *mut c_void,
                                ws_len,
                                scaling(&BETA),
                                d.x.0,
                                dx as *mut c_void,
                            )
                        }?;
                        Ok(())
                    })
                },
            )
        })?;
        Ok((dx, g.x_shape()))
    }
}

/// The kernel gradient over `(input, output gradient)`.
struct KernelGrad {
    k_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
    math: F32Math,
}

impl CustomOp2 for KernelGrad {
    fn name(&self) -> &'static str {
        "cudnn-conv2d-kernel-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        super::cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let g = Geometry::new(xl.shape().dims4()?, self.k_dims, self.padding, self.stride)?;
        check_grad(&g, gl)?;
        let dtype = xs.dtype();
        let dev = xs.device().clone();
        let key = Key {
            pass: Pass::KernelGrad,
            geometry: g,
            dtype,
            math: self.math,
            align: alignment(xl, dtype.size_in_bytes()).min(alignment(gl, dtype.size_in_bytes())),
        };
        let d = Descriptors::new(&g, dtype, self.math)?;
        let dk = with_state(&dev, |state| {
            let State {
                handle,
                kernel_grad,
                workspace,
                ..
            } = state;
            let h = handle.0;
            let list = candidates(
                kernel_grad,
                key,
                &d.conv,
                // SAFETY (all three): live handle and descriptors, and
                // result arrays of the length passed.
                |r: &mut [sys::cudnnConvolutionBwdFilterAlgoPerf_t; 7], n: &mut i32| unsafe {
                    sys::cudnnFindConvolutionBackwardFilterAlgorithm(
                        h,
                        d.x.0,
                        d.y.0,
                        d.conv.0,
                        d.w.0,
                        7,
                        n,
                        r.as_mut_ptr(),
                    )
                    .result()
                },
                |r: &mut [sys::cudnnConvolutionBwdFilterAlgoPerf_t; 7], n: &mut i32| unsafe {
                    dnn::get_convolution_backward_filter_algorithm(
                        h,
                        d.x.0,
                        d.y.0,
                        d.conv.0,
                        d.w.0,
                        7,
                        n,
                        r.as_mut_ptr(),
                    )
                },
                |algo| unsafe {
                    dnn::get_convolution_backward_filter_workspace_size(
                        h, d.x.0, d.y.0, d.conv.0, d.w.0, algo,
                    )
                },
            )?;
            with_output(
                (xs, xl, g.x_len(), "the input"),
                (gs, gl, g.y_len(), "the output gradient"),
                g.k_len(),
                |x, dy, dk| {
                    launch_first(list, workspace, &dev, &d.conv, |algo, ws, ws_len| {
                        // SAFETY: as in the forward pass.
                        unsafe {
                            dnn::convolution_backward_filter(
                                h,
                                scaling(&ALPHA),
                                d.x.0,
                                x as *const c_void,
                                d.y.0,
                                dy as *const c_void,
                                d.conv.0,
                                algo,
                                ws as *mut c_void,
                                ws_len,
                                scaling(&BETA),
                                d.w.0,
                                dk as *mut c_void,
                            )
                        }?;
                        Ok(())
                    })
                },
            )
        })?;
        Ok((dk, g.k_shape()))
    }
}
