//! The generic path (what CUDA and Metal run) forced on the CPU
//! (`Kernels::Generic`) against the CPU kernels: see `paths/mod.rs`.

mod paths;

use candle_core::Device;
use multilabel_resnet::Arch;

#[test]
fn conv2d_forward_and_gradients() {
    paths::conv2d_forward_and_gradients(&Device::Cpu);
}

/// The larger shapes the cuDNN device tests use, and the same comparison
/// in a half-precision dtype (`tests/device.rs` runs `bf16` through cuDNN;
/// candle's CPU matmul has no `bf16`, so `f16` here), through candle's own
/// convolution on the CPU: the harness itself is checked before a GPU runs
/// it.
#[test]
fn conv2d_larger_shapes_and_bf16() {
    use candle_core::DType;
    use multilabel_resnet::{Kernels, Ops};
    let generic = Ops::new(Kernels::Generic);
    paths::conv2d_forward_and_gradients_with(
        &Device::Cpu,
        generic,
        DType::F32,
        1e-4,
        &paths::LARGE_CONV_CASES,
        8,
    );
    paths::conv2d_forward_and_gradients_with(
        &Device::Cpu,
        generic,
        DType::F16,
        2e-2,
        &paths::CONV_CASES,
        2,
    );
}

/// Mixed precision on the generic path: the body in `f16` (candle's CPU
/// matmul has no `bf16`; CUDA runs `bf16` in `tests/device.rs`), the
/// parameters, head and gradients in `f32`. Measured against f64: values
/// 1.0e-2, gradients up to 0.17 (candle's CPU `f16` products also sum in
/// `f16`); a missing or misrouted gradient is off by about 1.
#[test]
fn resnet18_training_step_in_f16() {
    let [values, grads] = paths::whole_network_step_half(
        &Device::Cpu,
        multilabel_resnet::Kernels::Auto,
        multilabel_resnet::Precision::F16,
        Arch::ResNet18,
        (16, 4, 64),
        (2e-2, 0.3),
    );
    eprintln!("f16 body against f64: values {values:e}, gradients {grads:e}");
}

/// BatchNorm and max-pool on `f16` activations with `f32` parameters, on
/// the generic path (which widens to `f32` for BatchNorm): within 5e-3 of
/// the CPU kernels on the same values.
#[test]
fn half_activation_ops() {
    let generic = multilabel_resnet::Ops::new(multilabel_resnet::Kernels::Generic);
    paths::half_activation_ops(&Device::Cpu, generic, candle_core::DType::F16, 5e-3);
}

#[test]
fn max_pool_forward_and_gradient() {
    paths::max_pool_forward_and_gradient(&Device::Cpu);
}

#[test]
fn batch_norm_train_and_eval() {
    paths::batch_norm_train_and_eval(&Device::Cpu);
}

#[test]
fn fused_block_nodes() {
    paths::fused_block_nodes(&Device::Cpu);
}

#[test]
fn resnet18_training_step() {
    paths::whole_network_step(&Device::Cpu, Arch::ResNet18, (16, 4, 64), true);
}

#[test]
fn resnet50_training_step() {
    paths::whole_network_step(&Device::Cpu, Arch::ResNet50, (64, 4, 64), false);
}

#[test]
fn generic_path_stays_in_f32() {
    paths::generic_path_stays_in_f32(&Device::Cpu);
}
