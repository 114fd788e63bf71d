//! Fast CPU kernels for training, as candle custom ops with their own backward.
//!
//! candle 0.11's CPU path trains a ResNet slowly: the conv input gradient is a
//! direct transposed convolution, the kernel gradient goes through transposed
//! copies, and BatchNorm built from tensor ops makes a dozen passes over
//! every activation, each on one thread. These ops do the same maths in few
//! passes on rayon's pool:
//!
//! - [`conv2d`]: im2col + `gemm`; backward computes only the gradients whose
//!   operands track them (no kernel gradient for a frozen kernel, no input
//!   gradient for the image).
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

mod conv;
mod norm;

pub use conv::{conv2d, conv2d_input_grad, conv2d_kernel_grad, supported};
pub use norm::{add_relu, batch_norm_train, scale_shift};

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

/// A zeroed `f32` buffer of `len` values, zeroed in parallel.
///
/// `vec![0.0; len]` zeroes (and, for a fresh mapping, page-faults in) the
/// whole buffer on the calling thread, which is the main thread during
/// backward while the pool idles; at ResNet activation sizes that serial pass
/// was a visible share of a training step. Zeroing chunks on the pool spreads
/// both the writes and the page faults over the threads.
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    /// Values per task: below this one thread zeroes everything.
    const CHUNK: usize = 1 << 16;
    if len <= CHUNK {
        return vec![0.0; len];
    }
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(CHUNK)
        .for_each(|chunk: &mut [MaybeUninit<f32>]| chunk.fill(MaybeUninit::new(0.0)));
    // SAFETY: the loop above initialised all `len` values.
    unsafe { out.set_len(len) };
    out
}
