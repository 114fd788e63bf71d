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
