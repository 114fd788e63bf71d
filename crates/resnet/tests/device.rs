//! The generic path on a real GPU (CUDA device 0, or Metal) against the CPU
//! kernels on the CPU: see `paths/mod.rs`. Built only with the `cuda` or
//! `metal` feature; a machine without the GPU fails these tests (they are
//! what `bench/gpu/run.sh` runs on the borrowed GPU machine).
#![cfg(any(feature = "cuda", feature = "metal"))]

mod paths;

use candle_core::Device;
use multilabel_resnet::Arch;

fn device() -> Device {
    #[cfg(feature = "cuda")]
    let device = Device::new_cuda(0);
    #[cfg(not(feature = "cuda"))]
    let device = Device::new_metal(0);
    device.expect("a GPU: these tests run only where one is present")
}

#[test]
fn conv2d_forward_and_gradients() {
    paths::conv2d_forward_and_gradients(&device());
}

#[test]
fn max_pool_forward_and_gradient() {
    paths::max_pool_forward_and_gradient(&device());
}

#[test]
fn batch_norm_train_and_eval() {
    paths::batch_norm_train_and_eval(&device());
}

#[test]
fn fused_block_nodes() {
    paths::fused_block_nodes(&device());
}

#[test]
fn resnet18_training_step() {
    paths::whole_network_step(&device(), Arch::ResNet18, (16, 4, 64), true);
}

#[test]
fn resnet50_training_step() {
    paths::whole_network_step(&device(), Arch::ResNet50, (64, 4, 64), false);
}

/// The fused CUDA BatchNorm (what `Kernels::Auto` runs on CUDA) against
/// the CPU kernels, alone and in whole training steps.
#[cfg(feature = "cuda")]
#[test]
fn fused_cuda_batch_norm() {
    paths::batch_norm_train_and_eval_with(&device(), multilabel_resnet::Ops::default());
}

#[cfg(feature = "cuda")]
#[test]
fn fused_cuda_block_nodes() {
    paths::fused_block_nodes_with(&device(), multilabel_resnet::Ops::default());
}

#[cfg(feature = "cuda")]
#[test]
fn resnet18_training_step_fused_cuda() {
    paths::whole_network_step_with(
        &device(),
        multilabel_resnet::Kernels::Auto,
        Arch::ResNet18,
        (16, 4, 64),
        true,
    );
}

#[cfg(feature = "cuda")]
#[test]
fn resnet50_training_step_fused_cuda() {
    paths::whole_network_step_with(
        &device(),
        multilabel_resnet::Kernels::Auto,
        Arch::ResNet50,
        (64, 4, 64),
        false,
    );
}

/// The CUDA max-pool kernels (what `Kernels::Auto` runs on CUDA): the same
/// values as the CPU kernel, and the same gradient to the bit (summed in the
/// same order).
#[cfg(feature = "cuda")]
#[test]
fn cuda_max_pool() {
    paths::max_pool_forward_and_gradient_with(&device(), multilabel_resnet::Ops::default(), 0.0);
}

/// The bits of every value of `t` (copied to the CPU), every NaN as `u32::MAX`.
#[cfg(feature = "cuda")]
fn nan_bits(t: &candle_core::Tensor) -> Vec<u32> {
    t.to_device(&candle_core::Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() })
        .collect()
}

/// A NaN wins every window that holds it, on the device as on the CPU.
#[cfg(feature = "cuda")]
#[test]
fn cuda_max_pool_nan_wins() {
    use candle_core::Tensor;
    let mut plane: Vec<f32> = (0..7 * 6).map(|i| (i % 5) as f32).collect();
    plane[2 * 6 + 3] = f32::NAN;
    let x = Tensor::from_vec(plane, (1, 1, 7, 6), &candle_core::Device::Cpu).unwrap();
    let ours = multilabel_resnet::Ops::default()
        .max_pool_3x3_s2(&x.to_device(&device()).unwrap())
        .unwrap();
    let cpu = multilabel_resnet::Ops::default()
        .max_pool_3x3_s2(&x)
        .unwrap();
    let expected = nan_bits(&cpu);
    assert!(expected.contains(&u32::MAX));
    assert_eq!(nan_bits(&ours), expected);
}

/// fastai's concat pool on CUDA equals the CPU kernel to the bit: values,
/// and the gradient, on random planes, tied maxima and a NaN, at the
/// plane sizes of 64, 128 and 224 px inputs.
#[cfg(feature = "cuda")]
#[test]
fn cuda_concat_pool() {
    use candle_core::{Tensor, Var};
    let ops = multilabel_resnet::Ops::default();
    let cpu = candle_core::Device::Cpu;
    for (n, c, side) in [(3, 40, 2), (2, 24, 4), (2, 16, 7)] {
        let mut values: Vec<f32> = Tensor::randn(0f32, 1f32, n * c * side * side, &cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let plane = side * side;
        // Plane 1 all equal, plane 2 with a tie, plane 3 with a NaN.
        values[plane..2 * plane].fill(0.25);
        values[2 * plane] = 9.0;
        values[2 * plane + plane - 1] = 9.0;
        values[3 * plane + plane / 2] = f32::NAN;
        let grad = Tensor::randn(0f32, 1f32, (n, 2 * c), &cpu).unwrap();
        let run = |device: &candle_core::Device| {
            let x = Var::from_vec(values.clone(), (n, c, side, side), device).unwrap();
            let y = ops.concat_pool(&x).unwrap();
            let loss = (&y * grad.to_device(device).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let dx = loss.backward().unwrap().get(&x).unwrap().clone();
            (nan_bits(&y), nan_bits(&dx))
        };
        let (y_cpu, dx_cpu) = run(&cpu);
        let (y_gpu, dx_gpu) = run(&device());
        assert!(y_cpu.contains(&u32::MAX));
        assert_eq!(y_gpu, y_cpu, "{n}x{c}x{side}x{side} values");
        assert_eq!(dx_gpu, dx_cpu, "{n}x{c}x{side}x{side} gradient");
    }
}

/// cuDNN's convolutions (what `Kernels::Auto` runs with the `cudnn`
/// feature) in exact `f32`: every pass, every ResNet shape, small and larger.
#[cfg(feature = "cudnn")]
#[test]
fn cudnn_conv2d_f32() {
    use candle_core::DType;
    let ops = multilabel_resnet::Ops::default();
    for (cases, batch) in [
        (&paths::CONV_CASES[..], 2),
        (&paths::LARGE_CONV_CASES[..], 8),
    ] {
        paths::conv2d_forward_and_gradients_with(&device(), ops, DType::F32, 1e-4, cases, batch);
    }
}

/// The same in TF32 (10-bit mantissa products): within 5e-3 of exact `f32`.
#[cfg(feature = "cudnn")]
#[test]
fn cudnn_conv2d_tf32() {
    use candle_core::DType;
    let ops = multilabel_resnet::Ops::default().with_tf32(true);
    for (cases, batch) in [
        (&paths::CONV_CASES[..], 2),
        (&paths::LARGE_CONV_CASES[..], 8),
    ] {
        paths::conv2d_forward_and_gradients_with(&device(), ops, DType::F32, 5e-3, cases, batch);
    }
}

/// In `bf16` (operands rounded to bf16 on both sides; sums in `f32`, the
/// output and gradients rounded to bf16): within 2e-2 of the CPU in `f32`.
#[cfg(feature = "cudnn")]
#[test]
fn cudnn_conv2d_bf16() {
    use candle_core::DType;
    let ops = multilabel_resnet::Ops::default();
    for (cases, batch) in [
        (&paths::CONV_CASES[..], 2),
        (&paths::LARGE_CONV_CASES[..], 8),
    ] {
        paths::conv2d_forward_and_gradients_with(&device(), ops, DType::BF16, 2e-2, cases, batch);
    }
}

/// Mixed precision on CUDA (what `--precision bf16` trains with): the body
/// in `bf16` through cuDNN, BatchNorm statistics in `f32` on the fused
/// kernels, the head and the master weights' gradients in `f32`; against
/// f64 on the CPU. The tolerances are those of the `f16` run on the CPU
/// (`generic_path.rs`: measured 1.0e-2 and 0.17), values loosened for
/// bf16's 3 fewer mantissa bits; the errors print for calibration.
#[cfg(feature = "cudnn")]
#[test]
fn resnet18_training_step_bf16() {
    let [values, grads] = paths::whole_network_step_half(
        &device(),
        multilabel_resnet::Kernels::Auto,
        multilabel_resnet::Precision::Bf16,
        Arch::ResNet18,
        (16, 4, 64),
        (5e-2, 0.3),
    );
    eprintln!("bf16 body against f64: values {values:e}, gradients {grads:e}");
}

/// The fused BatchNorm and max-pool kernels' `bf16` versions (what the
/// `bf16` body runs) against the CPU kernels on the same values: within
/// 2e-2 (bf16 keeps 8 bits of mantissa: one rounding is up to 2⁻⁹ ≈ 2e-3).
#[cfg(feature = "cuda")]
#[test]
fn cuda_bf16_activation_ops() {
    use candle_core::DType;
    paths::half_activation_ops(
        &device(),
        multilabel_resnet::Ops::default(),
        DType::BF16,
        2e-2,
    );
}

#[test]
fn generic_path_stays_in_f32() {
    paths::generic_path_stays_in_f32(&device());
}

/// Dropout masks drawn on the device: the right fraction, the right scale,
/// and the same mask again from the same seed.
#[test]
fn dropout_on_the_device() {
    use std::sync::Mutex;

    use candle_core::{DType, Tensor};
    use multilabel_resnet::Ops;
    use rand::SeedableRng;

    let device = device();
    let x = Tensor::ones((200, 100), DType::F32, &device).unwrap();
    let draw = || {
        let rng = Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(5));
        Ops::default()
            .dropout(&x, 0.25, &rng)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let mask = draw();
    let zeros = mask.iter().filter(|&&v| v == 0.0).count() as f32 / mask.len() as f32;
    assert!((zeros - 0.25).abs() < 0.02, "zero fraction {zeros}");
    assert!(
        mask.iter()
            .all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6)
    );
    assert_eq!(mask, draw());
}
