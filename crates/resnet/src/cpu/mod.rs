//! Fast CPU kernels for training, as candle custom ops with their own backward.
//!
//! candle 0.11's CPU path trains a ResNet slowly: the conv input gradient is a
//! direct transposed convolution, the kernel gradient goes through transposed
//! copies, and BatchNorm built from tensor ops makes a dozen passes over
//! every activation, each on one thread. These ops do the same maths in few
//! passes on rayon's pool:
//!
//! - [`conv2d`]: im2col + `gemm`, Winograd's F(2×2, 3×3) for 3×3 stride-1
//!   convolutions, or a direct kernel for others on larger planes
//!   ([`conv2d_path`] says which); backward
//!   computes only the gradients whose operands track them (no kernel
//!   gradient for a frozen kernel, no input gradient for the image).
//! - [`conv2d_batch_norm_train`]: a convolution and the train-mode BatchNorm
//!   (and ReLU) after it as one graph node, so the BatchNorm's input
//!   gradient goes straight into the convolution's backward;
//! - [`conv2d_affine`]: inference, a convolution with its eval-mode
//!   BatchNorm, residual add and ReLU applied while the result is in cache;
//! - [`batch_norm_train`]: BatchNorm with batch statistics, optionally fused
//!   with the ReLU after it, in one parallel pass per channel, and a backward
//!   in two.
//! - [`scale_shift`]: the per-channel affine of eval-mode BatchNorm,
//!   optionally with ReLU.
//! - [`add_relu`]: the residual `relu(a + b)`.
//!
//! Each takes and returns ordinary tensors. Only `f32` tensors on the CPU
//! take the fast path ([`supported`]); anything else (CUDA, Metal, other
//! dtypes) runs the equivalent candle ops, so the GPU builds keep working.

mod block;
mod conv;
mod conv_bn;
mod direct;
mod norm;
pub(crate) mod simd;
mod winograd;
mod winograd4;

pub(crate) use block::{After, block_per_layer};
pub use block::{BlockLayer, LayerStats, residual_block_train};
pub use conv::{
    conv2d, conv2d_affine, conv2d_input_grad, conv2d_kernel_grad, conv2d_kernel_grad_path,
    conv2d_path, supported,
};
pub use conv_bn::{conv2d_batch_norm_add_relu_train, conv2d_batch_norm_train};
pub use norm::{add_relu, batch_norm_train, scale_shift};
pub use simd::{SimdLevel, detected_simd_level, gemm_simd_level, set_simd_level, simd_level};
pub use winograd::{set_winograd, set_winograd_large_tiles, winograd_enabled};

/// Keeps freed memory in the process for reuse instead of handing it back
/// to the OS; call once at the start of a program that trains on the CPU.
/// Returns whether the policy was applied (only with glibc's allocator).
///
/// glibc serves every allocation above its mmap threshold (at most 32 MiB)
/// with a fresh `mmap` and gives it back with `munmap` on free. A ResNet-50
/// training step at batch 64 allocates and frees gigabytes of activations
/// and gradients far above that size, so each one is page-faulted and zeroed
/// by the kernel again on first touch: measured here, a third of a training
/// step's CPU time went to the kernel. With `mmap` off for the heap and
/// trimming off, freed blocks stay mapped and the next step reuses them. Peak
/// memory stays about the same (a step needs the same blocks every time);
/// the memory is returned when the process exits.
///
/// A process-wide setting, so the library never calls it on its own: the
/// `multilabel` CLI and the benchmarks do, and embedding programs may.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes glibc's allocation parameters.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Makes the calling thread, normally the program's main thread, the first
/// of the threads of rayon's global pool (which our kernels, candle and
/// `gemm` run on); call it once, first thing, before anything uses rayon.
/// Returns whether the pool was built that way.
///
/// Otherwise the thread that drives training stays outside the pool: each
/// parallel op hands its work to the pool and puts that thread to sleep
/// until the work is done, two context switches per op and a wake-up on
/// the critical path, hundreds of times a step. Measured here (two cores,
/// ResNet-18 at 64 px, batch 64): 1,200 context switches per training step
/// against 400, and 2–5 % more images/s. The pool keeps its size (the
/// calling thread replaces one of the threads it would start).
///
/// Not with fewer than two threads (`RAYON_NUM_THREADS`, else the CPUs):
/// the calling thread only runs the pool's work while it waits inside a
/// parallel op, so with no other thread, work handed to the pool from
/// elsewhere (a data loader's producer thread) would wait for as long as
/// the calling thread blocks, for example on that loader. A process-wide
/// setting, so the library never calls it on its own: the `multilabel`
/// CLI and the benchmarks do, and embedding programs may.
pub fn use_main_thread_in_pool() -> bool {
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    threads >= 2
        && rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .use_current_thread()
            .build_global()
            .is_ok()
}

/// Hands the memory that [`keep_freed_memory`] kept back to the OS (glibc's
/// `malloc_trim`), for a program that is done training and goes on to
/// other work, or hands the machine to another process. Returns whether
/// any memory was released (always `false` without glibc).
pub fn release_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only returns free heap pages to the OS.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Writes `T`'s zero (its `Default`) into every value of `xs` and returns
/// them as initialised: for a buffer zeroed piece by piece by the task that
/// then adds into it, in parallel and while the piece is in cache, rather
/// than all at once up front on one thread.
pub(crate) fn zeroed<T: Copy + Default>(xs: &mut [std::mem::MaybeUninit<T>]) -> &mut [T] {
    for v in xs.iter_mut() {
        v.write(T::default());
    }
    // SAFETY: every value was written just above; `MaybeUninit<T>` has
    // `T`'s layout.
    unsafe { &mut *(std::ptr::from_mut(xs) as *mut [T]) }
}

/// An output buffer of `len` values that the op writes in full before
/// [`Uninit::finish`] turns it into a `Vec`. Kernels that overwrite every
/// value (gemm, element-wise maps) would waste a pass over memory zeroing
/// it first; writing through `MaybeUninit` keeps that sound.
pub(crate) struct Uninit<T = f32> {
    buf: Vec<T>,
    len: usize,
}

impl<T> Uninit<T> {
    pub(crate) fn new(len: usize) -> Self {
        Self {
            buf: Vec::with_capacity(len),
            len,
        }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [std::mem::MaybeUninit<T>] {
        &mut self.buf.spare_capacity_mut()[..self.len]
    }

    /// # Safety
    /// Every one of the `len` values must have been written.
    pub(crate) unsafe fn finish(mut self) -> Vec<T> {
        // SAFETY: guaranteed by the caller.
        unsafe { self.buf.set_len(self.len) };
        self.buf
    }
}
