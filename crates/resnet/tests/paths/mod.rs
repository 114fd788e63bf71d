//! The generic ops (what CUDA and Metal run) on some device against the
//! CPU kernels on the CPU: forward values and every gradient of each op, and
//! whole training steps. `generic_path.rs` runs these with the generic path
//! forced on the CPU (`Kernels::Generic`), so a machine without a GPU checks
//! the GPU path's maths; `device.rs` runs them on a CUDA or Metal device.
//!
//! Every comparison is relative to the largest magnitude of the CPU
//! kernel's result: `max |generic − cpu| / max |cpu| ≤ 1e-4` (the two sum
//! in different orders, and the CPU kernels accumulate BatchNorm sums in
//! f64, the generic ops in f32).
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use multilabel_resnet::{Arch, HeadConfig, Kernels, Ops, Precision, ResNet, ResNetConfig};
use rand::{Rng, SeedableRng};

const TOLERANCE: f32 = 1e-4;

fn cpu_ops() -> Ops {
    Ops::new(Kernels::Auto)
}

fn generic_ops() -> Ops {
    Ops::new(Kernels::Generic)
}

fn values(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn var(shape: &[usize], seed: u64) -> Var {
    Var::from_tensor(&values(shape, seed)).unwrap()
}

/// The same values as a variable on `device`.
fn on(device: &Device, v: &Var) -> Var {
    Var::from_tensor(&v.as_tensor().to_device(device).unwrap()).unwrap()
}

fn to(device: &Device, t: &Tensor) -> Tensor {
    t.to_device(device).unwrap()
}

fn cpu(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap()
}

/// `max |a − b| / max |b|`.
fn relative_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let scale = scale.to_scalar::<f32>().unwrap().max(1e-12);
    let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
    diff.max(0).unwrap().to_scalar::<f32>().unwrap() / scale
}

#[track_caller]
fn assert_close(what: &str, generic: &Tensor, cpu_result: &Tensor) {
    assert_within(what, generic, cpu_result, TOLERANCE);
}

/// `max |a − b| / max |b| ≤ tolerance`, `a` cast to `b`'s dtype.
#[track_caller]
fn assert_within(what: &str, a: &Tensor, b: &Tensor, tolerance: f32) {
    let a = cpu(a).to_dtype(b.dtype()).unwrap();
    let d = relative_diff(&a, b);
    assert!(d <= tolerance, "{what}: relative difference {d:e}");
}

/// A weighting of the output, so every output element gets its own gradient.
fn weighted_sum(y: &Tensor, seed: u64) -> Tensor {
    let r = values(y.dims(), seed).to_dtype(y.dtype()).unwrap();
    (y * to(y.device(), &r)).unwrap().sum_all().unwrap()
}

/// Compares the gradients of `vars` (named; each a pair of the generic
/// side's variable and the CPU side's) after backpropagating each loss; a
/// variable must get a gradient on both paths or on neither.
#[track_caller]
fn assert_same_grads(what: &str, generic: &Tensor, cpu: &Tensor, vars: &[(&str, &Var, &Var)]) {
    assert_grads_within(what, generic, cpu, vars, TOLERANCE);
}

/// [`assert_same_grads`] within `tolerance` (0: equal to the bit).
#[track_caller]
fn assert_grads_within(
    what: &str,
    generic: &Tensor,
    cpu: &Tensor,
    vars: &[(&str, &Var, &Var)],
    tolerance: f32,
) {
    let g_generic = generic.backward().unwrap();
    let g_cpu = cpu.backward().unwrap();
    for (name, var_generic, var_cpu) in vars {
        match (g_generic.get(var_generic), g_cpu.get(var_cpu)) {
            (Some(a), Some(b)) => assert_within(&format!("{what}: d{name}"), a, b, tolerance),
            (None, None) => {}
            (a, b) => panic!(
                "{what}: d{name} present on the generic path: {}, on the CPU path: {}",
                a.is_some(),
                b.is_some()
            ),
        }
    }
}

/// (c_in, c_out, kernel, stride, padding, size): every conv shape a ResNet
/// has (7×7/2 stem, 3×3/1, 3×3/2 on even and odd sizes, 1×1/1, 1×1/2).
pub const CONV_CASES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (3, 8, 7, 2, 3, 17),
    (4, 6, 3, 1, 1, 9),
    (4, 6, 3, 2, 1, 9),
    (4, 6, 3, 2, 1, 8),
    (8, 6, 1, 1, 0, 8),
    (8, 6, 1, 2, 0, 9),
    (8, 6, 1, 2, 0, 8),
];

/// Which operands track gradients: trainable, frozen kernel, or the input image.
#[derive(Debug, Clone, Copy)]
enum Tracking {
    Both,
    FrozenKernel,
    Image,
}

const TRACKINGS: [Tracking; 3] = [Tracking::Both, Tracking::FrozenKernel, Tracking::Image];

fn operands(x: &Var, w: &Var, tracking: Tracking) -> (Tensor, Tensor) {
    match tracking {
        Tracking::Both => (x.as_tensor().clone(), w.as_tensor().clone()),
        Tracking::FrozenKernel => (x.as_tensor().clone(), w.as_detached_tensor()),
        Tracking::Image => (x.as_detached_tensor(), w.as_tensor().clone()),
    }
}

/// Convolution forward and both gradients, for every conv shape and
/// tracking; the generic path also skips what it must skip.
pub fn conv2d_forward_and_gradients(device: &Device) {
    conv2d_forward_and_gradients_with(device, generic_ops(), DType::F32, TOLERANCE, &CONV_CASES, 2);
}

/// Larger convolutions, where cuDNN picks other algorithms (implicit GEMM,
/// Winograd, FFT) than for the small [`CONV_CASES`]: ResNet's 3×3 and 1×1
/// shapes at a few channels more (run them on 8 images).
pub const LARGE_CONV_CASES: [(usize, usize, usize, usize, usize, usize); 4] = [
    (3, 16, 7, 2, 3, 40),
    (32, 32, 3, 1, 1, 16),
    (32, 64, 3, 2, 1, 16),
    (64, 32, 1, 1, 0, 8),
];

/// [`conv2d_forward_and_gradients`] through `device_ops` with `dtype`
/// operands on `device`, `batch` images, within `tolerance` of the CPU
/// kernels in `f32`.
pub fn conv2d_forward_and_gradients_with(
    device: &Device,
    device_ops: Ops,
    dtype: DType,
    tolerance: f32,
    cases: &[(usize, usize, usize, usize, usize, usize)],
    batch: usize,
) {
    for (i, &(c_in, c_out, k, stride, padding, size)) in cases.iter().enumerate() {
        for tracking in TRACKINGS {
            let what = format!("conv case {i} {tracking:?} {dtype:?}");
            // The CPU side starts from the values the device side holds
            // (rounded to `dtype`), so only the arithmetic differs.
            let rounded = |shape: &[usize], seed| {
                values(shape, seed)
                    .to_dtype(dtype)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            };
            let x = Var::from_tensor(&rounded(&[batch, c_in, size, size], i as u64)).unwrap();
            let w = Var::from_tensor(&rounded(&[c_out, c_in, k, k], 100 + i as u64)).unwrap();
            let in_dtype = |v: &Var| {
                Var::from_tensor(
                    &v.as_tensor()
                        .to_dtype(dtype)
                        .unwrap()
                        .to_device(device)
                        .unwrap(),
                )
                .unwrap()
            };
            let (xd, wd) = (in_dtype(&x), in_dtype(&w));
            let (xt, wt) = operands(&x, &w, tracking);
            let (xdt, wdt) = operands(&xd, &wd, tracking);
            let ours = device_ops.conv2d(&xdt, &wdt, padding, stride).unwrap();
            assert_eq!(ours.dtype(), dtype, "{what}: output dtype");
            let reference = cpu_ops().conv2d(&xt, &wt, padding, stride).unwrap();
            assert_within(&format!("{what}: forward"), &ours, &reference, tolerance);
            assert_grads_within(
                &what,
                &weighted_sum(&ours, 7),
                &weighted_sum(&reference, 7),
                &[("x", &xd, &x), ("w", &wd, &w)],
                tolerance,
            );
            // What the device path skips, it skips: no kernel gradient for
            // a frozen kernel, none for the image.
            let grads = weighted_sum(&ours, 7).backward().unwrap();
            match tracking {
                Tracking::Both => assert!(grads.get(&xd).is_some() && grads.get(&wd).is_some()),
                Tracking::FrozenKernel => assert!(grads.get(&wd).is_none()),
                Tracking::Image => assert!(grads.get(&xd).is_none()),
            }
        }
    }
}

/// The stem max-pool: forward equal to the bit, gradient routed alike.
pub fn max_pool_forward_and_gradient(device: &Device) {
    max_pool_forward_and_gradient_with(device, generic_ops(), TOLERANCE);
}

/// [`max_pool_forward_and_gradient`] through `device_ops`, the gradient
/// within `grad_tolerance` (0: equal to the bit).
pub fn max_pool_forward_and_gradient_with(device: &Device, device_ops: Ops, grad_tolerance: f32) {
    // Random values, small integers (windows with ties) and a constant
    // plane (every window one tie): both paths route the gradient to the
    // first maximum in row-major order.
    let cases = [
        values(&[2, 3, 9, 11], 1),
        values(&[2, 3, 8, 8], 2),
        (values(&[2, 3, 8, 8], 3) * 2.0).unwrap().round().unwrap(),
        Tensor::zeros((2, 3, 8, 8), DType::F32, &Device::Cpu).unwrap(),
        values(&[1, 2, 1, 3], 4),
        values(&[4, 16, 33, 32], 5),
    ];
    for (i, input) in cases.iter().enumerate() {
        let x = Var::from_tensor(input).unwrap();
        let xd = on(device, &x);
        let generic = device_ops.max_pool_3x3_s2(xd.as_tensor()).unwrap();
        let reference = cpu_ops().max_pool_3x3_s2(x.as_tensor()).unwrap();
        assert_eq!(
            cpu(&generic)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            reference.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "max-pool case {i}: forward"
        );
        assert_grads_within(
            &format!("max-pool case {i}"),
            &weighted_sum(&generic, 9),
            &weighted_sum(&reference, 9),
            &[("x", &xd, &x)],
            grad_tolerance,
        );
    }
}

fn bshape(shape: &[usize]) -> Vec<usize> {
    let mut b = vec![1; shape.len()];
    b[1] = shape[1];
    b
}

/// BatchNorm in train mode (output, batch statistics, gradients of input,
/// weight and bias) and eval mode, rank 4 and rank 2, with and without ReLU.
pub fn batch_norm_train_and_eval(device: &Device) {
    batch_norm_train_and_eval_with(device, generic_ops());
}

/// [`batch_norm_train_and_eval`] with `device_ops` on the device: with
/// `Kernels::Auto` on CUDA, the fused CUDA BatchNorm.
pub fn batch_norm_train_and_eval_with(device: &Device, device_ops: Ops) {
    for (i, shape) in [[4, 6, 5, 7].as_slice(), &[8, 12]].into_iter().enumerate() {
        for relu in [false, true] {
            let what = format!("batch-norm {shape:?} relu {relu}");
            let c = shape[1];
            // An offset and a spread per channel, as activations have.
            let spread = values(&[c], 11)
                .abs()
                .unwrap()
                .reshape(bshape(shape))
                .unwrap();
            let offset = values(&[c], 12).reshape(bshape(shape)).unwrap();
            let x = values(shape, 10 + i as u64)
                .broadcast_mul(&spread)
                .unwrap()
                .broadcast_add(&offset)
                .unwrap();
            let x = Var::from_tensor(&x).unwrap();
            let (w, b) = (var(&[c], 13), var(&[c], 14));
            let (xd, wd, bd) = (on(device, &x), on(device, &w), on(device, &b));
            let (y_g, mean_g, var_g) = device_ops
                .batch_norm_train(xd.as_tensor(), wd.as_tensor(), bd.as_tensor(), 1e-5, relu)
                .unwrap();
            let (y_c, mean_c, var_c) = cpu_ops()
                .batch_norm_train(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5, relu)
                .unwrap();
            assert_close(&format!("{what}: forward"), &y_g, &y_c);
            assert_close(&format!("{what}: mean"), &mean_g, &mean_c);
            assert_close(&format!("{what}: var"), &var_g, &var_c);
            assert_same_grads(
                &what,
                &weighted_sum(&y_g, 15),
                &weighted_sum(&y_c, 15),
                &[("x", &xd, &x), ("w", &wd, &w), ("b", &bd, &b)],
            );
            // Eval mode: the per-channel affine.
            let (scale, shift) = (var(&[c], 16), var(&[c], 17));
            let (scale_d, shift_d) = (on(device, &scale), on(device, &shift));
            let e_g = device_ops
                .scale_shift(
                    xd.as_tensor(),
                    scale_d.as_tensor(),
                    shift_d.as_tensor(),
                    relu,
                )
                .unwrap();
            let e_c = cpu_ops()
                .scale_shift(x.as_tensor(), scale.as_tensor(), shift.as_tensor(), relu)
                .unwrap();
            assert_close(&format!("{what}: eval forward"), &e_g, &e_c);
            assert_same_grads(
                &format!("{what} eval"),
                &weighted_sum(&e_g, 18),
                &weighted_sum(&e_c, 18),
                &[
                    ("x", &xd, &x),
                    ("scale", &scale_d, &scale),
                    ("shift", &shift_d, &shift),
                ],
            );
        }
    }
}

/// The fused nodes a block is made of: conv + BatchNorm (+ ReLU), the
/// block end conv + BatchNorm + add + ReLU, and the inference conv with
/// eval BatchNorm, residual and ReLU; every conv shape and tracking.
pub fn fused_block_nodes(device: &Device) {
    fused_block_nodes_with(device, generic_ops());
}

/// [`fused_block_nodes`] with `device_ops` on the device: with
/// `Kernels::Auto` on CUDA, the fused CUDA BatchNorm and block end.
pub fn fused_block_nodes_with(device: &Device, device_ops: Ops) {
    for (i, &(c_in, c_out, k, stride, padding, size)) in CONV_CASES.iter().enumerate() {
        for tracking in TRACKINGS {
            let x = var(&[2, c_in, size, size], 20 + i as u64);
            let kernel = var(&[c_out, c_in, k, k], 30 + i as u64);
            let (w, b) = (var(&[c_out], 40), var(&[c_out], 41));
            let (xd, kd, wd, bd) = (
                on(device, &x),
                on(device, &kernel),
                on(device, &w),
                on(device, &b),
            );
            let (xt, kt) = operands(&x, &kernel, tracking);
            let (xdt, kdt) = operands(&xd, &kd, tracking);
            let vars = [
                ("x", &xd, &x),
                ("kernel", &kd, &kernel),
                ("w", &wd, &w),
                ("b", &bd, &b),
            ];
            let geometry = (padding, stride);
            for relu in [false, true] {
                let what = format!("conv+bn case {i} {tracking:?} relu {relu}");
                let (y_g, m_g, v_g) = device_ops
                    .conv2d_batch_norm_train(
                        &xdt,
                        &kdt,
                        geometry,
                        wd.as_tensor(),
                        bd.as_tensor(),
                        1e-5,
                        relu,
                    )
                    .unwrap();
                let (y_c, m_c, v_c) = cpu_ops()
                    .conv2d_batch_norm_train(
                        &xt,
                        &kt,
                        geometry,
                        w.as_tensor(),
                        b.as_tensor(),
                        1e-5,
                        relu,
                    )
                    .unwrap();
                assert_close(&format!("{what}: forward"), &y_g, &y_c);
                assert_close(&format!("{what}: mean"), &m_g, &m_c);
                assert_close(&format!("{what}: var"), &v_g, &v_c);
                assert_same_grads(
                    &what,
                    &weighted_sum(&y_g, 42),
                    &weighted_sum(&y_c, 42),
                    &vars,
                );
            }
            let what = format!("conv+bn+add+relu case {i} {tracking:?}");
            let out_dims = cpu_ops()
                .conv2d(&xt, &kt, padding, stride)
                .unwrap()
                .dims()
                .to_vec();
            let residual = var(&out_dims, 43);
            let residual_d = on(device, &residual);
            let (y_g, _, _) = device_ops
                .conv2d_batch_norm_add_relu_train(
                    &xdt,
                    &kdt,
                    geometry,
                    wd.as_tensor(),
                    bd.as_tensor(),
                    1e-5,
                    residual_d.as_tensor(),
                )
                .unwrap();
            let (y_c, _, _) = cpu_ops()
                .conv2d_batch_norm_add_relu_train(
                    &xt,
                    &kt,
                    geometry,
                    w.as_tensor(),
                    b.as_tensor(),
                    1e-5,
                    residual.as_tensor(),
                )
                .unwrap();
            assert_close(&format!("{what}: forward"), &y_g, &y_c);
            let mut all = vars.to_vec();
            all.push(("residual", &residual_d, &residual));
            assert_same_grads(
                &what,
                &weighted_sum(&y_g, 44),
                &weighted_sum(&y_c, 44),
                &all,
            );

            // Inference: conv + eval BatchNorm + residual + ReLU, no graph.
            let (scale, shift) = (values(&[c_out], 45), values(&[c_out], 46));
            let (scale_d, shift_d) = (to(device, &scale), to(device, &shift));
            let (r, r_d) = (
                residual.as_detached_tensor(),
                residual_d.as_detached_tensor(),
            );
            for (with_residual, relu) in [(false, false), (false, true), (true, true)] {
                let a = device_ops
                    .conv2d_affine(
                        &xdt,
                        &kdt,
                        geometry,
                        &scale_d,
                        &shift_d,
                        with_residual.then_some(&r_d),
                        relu,
                    )
                    .unwrap();
                let c = cpu_ops()
                    .conv2d_affine(
                        &xt,
                        &kt,
                        geometry,
                        &scale,
                        &shift,
                        with_residual.then_some(&r),
                        relu,
                    )
                    .unwrap();
                assert_close(
                    &format!("conv affine case {i} residual {with_residual} relu {relu}"),
                    &a,
                    &c,
                );
            }
        }
    }
}

fn model(
    arch: Arch,
    width: usize,
    kernels: Kernels,
    on: (&Device, DType),
    ps: f32,
) -> (ResNet, VarMap) {
    model_in(arch, width, kernels, Precision::F32, on, ps)
}

/// [`model`] with its body computing in `precision`.
fn model_in(
    arch: Arch,
    width: usize,
    kernels: Kernels,
    precision: Precision,
    (device, dtype): (&Device, DType),
    ps: f32,
) -> (ResNet, VarMap) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, device);
    let config = ResNetConfig {
        kernels,
        precision,
        base_width: width,
        head: HeadConfig {
            hidden: vec![32],
            ps,
            ..HeadConfig::new(5)
        },
        ..ResNetConfig::new(arch, 5)
    };
    (ResNet::new(&config, vb, 7).unwrap(), varmap)
}

/// `‖a − b‖ / ‖b‖` (Euclidean norms) in f64, whatever the dtypes and devices.
fn error_against(a: &Tensor, truth: &Tensor) -> f64 {
    let a = cpu(a).to_dtype(DType::F64).unwrap();
    let truth = cpu(truth).to_dtype(DType::F64).unwrap();
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt()
    };
    norm(&(a - &truth).unwrap()) / norm(&truth).max(1e-300)
}

/// The generic result agrees with the CPU kernels' to [`TOLERANCE`]
/// (largest difference over largest magnitude), or, where float32 itself is
/// not that accurate, is within [`TOLERANCE`] of an f64 computation of the
/// same thing or no further from it than twice the CPU kernels' own error
/// (both as norm-wise relative errors). The first of those matters since
/// the CPU kernels compute the image's convolution in f64 (a ResNet-50's
/// head running variance, measured: generic 5.4e-5 from f64, CPU kernels
/// 2.3e-5).
#[track_caller]
fn assert_as_accurate(what: &str, generic: &Tensor, cpu_result: &Tensor, truth: &Tensor) {
    if relative_diff(&cpu(generic), cpu_result) <= TOLERANCE {
        return;
    }
    let generic_error = error_against(generic, truth);
    let cpu_error = error_against(cpu_result, truth);
    assert!(
        generic_error <= f64::from(TOLERANCE).max(2.0 * cpu_error),
        "{what}: against f64 the generic path is off by {generic_error:e}, the CPU kernels by {cpu_error:e}"
    );
}

/// One training step of a whole network, generic path on `device` against
/// the CPU kernels: logits, every trainable parameter's gradient and the
/// running statistics, with the body trainable and frozen; eval mode and
/// `forward_infer` too. Dropout is on when both sides run on the CPU (same
/// host masks) and off otherwise: a GPU draws its masks on the device.
///
/// A deep network at random initialisation in train mode is ill-conditioned
/// in float32: measured here, a ResNet-50 at 64 px, batch 4 (and the same
/// at batch 16) has logits 2-5e-4 and some BatchNorm and conv gradients
/// 1e-2 to 1e-1 (norm-wise) away from the same network computed in f64, on
/// both paths alike, so two float32 paths cannot agree to 1e-4 there.
/// `strict` asks for the 1e-4 agreement everywhere (a narrow ResNet-18
/// meets it); otherwise a quantity where the paths differ by more is
/// checked against the generic path in f64 on the CPU: the generic path
/// must be at most twice as far from it as the CPU kernels are.
///
/// The CPU kernels keep to Winograd's F(2×2, 3×3) here: they are the
/// reference, and F(4×4, 3×3)'s rounding (a few e-6 of the largest
/// output per convolution, ten times F(2×2, 3×3)'s, see
/// `cpu/winograd4.rs`) comes out of this ill-conditioned network at up to
/// 1.5e-4 in the first convolution's kernel gradient, past the strict
/// bound.
pub fn whole_network_step(device: &Device, arch: Arch, dims: (usize, usize, usize), strict: bool) {
    whole_network_step_with(device, Kernels::Generic, arch, dims, strict);
}

/// [`whole_network_step`] with the device's model on `kernels` (with
/// `Kernels::Auto` on CUDA: the fused CUDA kernels).
pub fn whole_network_step_with(
    device: &Device,
    kernels: Kernels,
    arch: Arch,
    (width, batch, size): (usize, usize, usize),
    strict: bool,
) {
    multilabel_resnet::cpu::set_winograd_large_tiles(false);
    let ps = if device.is_cpu() { 0.5 } else { 0.0 };
    let f32_on = |d| (d, DType::F32);
    let (mut generic, generic_vars) = model(arch, width, kernels, f32_on(device), ps);
    let (mut reference, reference_vars) =
        model(arch, width, Kernels::Auto, f32_on(&Device::Cpu), ps);
    let (mut truth, _) = model(
        arch,
        width,
        Kernels::Generic,
        (&Device::Cpu, DType::F64),
        ps,
    );
    let x = values(&[batch, 3, size, size], 50);
    let xd = to(device, &x);
    let x64 = x.to_dtype(DType::F64).unwrap();
    let check = |what: &str, g: &Tensor, c: &Tensor, t: &Tensor| {
        if strict {
            assert_close(what, g, c);
        } else {
            assert_as_accurate(what, g, c, t);
        }
    };
    for frozen in [false, true] {
        if frozen {
            generic.freeze();
            reference.freeze();
            truth.freeze();
        }
        for model in [&generic, &reference, &truth] {
            model.set_dropout_seed(3);
        }
        let what = format!("{arch} frozen {frozen}");
        let y_g = generic.forward_t(&xd, true).unwrap();
        let y_c = reference.forward_t(&x, true).unwrap();
        let y_t = truth.forward_t(&x64, true).unwrap();
        check(&format!("{what}: logits"), &y_g, &y_c, &y_t);
        let g_g = weighted_sum(&y_g, 51).backward().unwrap();
        let g_c = weighted_sum(&y_c, 51).backward().unwrap();
        let g_t = weighted_sum(&y_t, 51).backward().unwrap();
        let params_g = generic.trainable_params();
        let params_c = reference.trainable_params();
        let params_t = truth.trainable_params();
        assert_eq!(params_g.len(), params_c.len());
        for ((p_g, p_c), p_t) in params_g.iter().zip(&params_c).zip(&params_t) {
            assert_eq!(p_g.name, p_c.name);
            let grad = |grads: &candle_core::backprop::GradStore, var: &Var| {
                grads
                    .get(var)
                    .unwrap_or_else(|| panic!("{what}: no d{}", p_g.name))
                    .clone()
            };
            check(
                &format!("{what}: d{}", p_g.name),
                &grad(&g_g, &p_g.var),
                &grad(&g_c, &p_c.var),
                &grad(&g_t, &p_t.var),
            );
        }
        let buffers = generic.buffers().into_iter().zip(reference.buffers());
        for ((b_g, b_c), b_t) in buffers.zip(truth.buffers()) {
            check(
                &format!("{what}: {}", b_g.name),
                b_g.var.as_tensor(),
                b_c.var.as_tensor(),
                b_t.var.as_tensor(),
            );
        }
        let e_g = generic.forward_t(&xd, false).unwrap();
        let e_c = reference.forward_t(&x, false).unwrap();
        let e_t = truth.forward_t(&x64, false).unwrap();
        check(&format!("{what}: eval logits"), &e_g, &e_c, &e_t);
        let i_g = generic.forward_infer(&xd).unwrap();
        check(&format!("{what}: forward_infer"), &i_g, &e_c, &e_t);
    }
    // Same variables on both sides (the generic path added or lost none).
    assert_eq!(
        generic_vars.all_vars().len(),
        reference_vars.all_vars().len()
    );
    // The logits are not trivially equal: they vary across the batch.
    let spread = reference.forward_t(&x, false).unwrap().var(0).unwrap();
    assert!(spread.sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
}

/// The generic path never leaves the tensors' dtype: no f64 (Metal has none).
pub fn generic_path_stays_in_f32(device: &Device) {
    let x = to(device, &values(&[2, 4, 6, 6], 60));
    let (w, b) = (to(device, &values(&[4], 61)), to(device, &values(&[4], 62)));
    let (y, mean, var) = generic_ops()
        .batch_norm_train(&x, &w, &b, 1e-5, true)
        .unwrap();
    for t in [&y, &mean, &var] {
        assert_eq!(t.dtype(), DType::F32);
    }
    let kernel = to(device, &values(&[3, 4, 3, 3], 63));
    let (w3, b3) = (to(device, &values(&[3], 64)), to(device, &values(&[3], 65)));
    let (y, mean, var) = generic_ops()
        .conv2d_batch_norm_train(&x, &kernel, (1, 1), &w3, &b3, 1e-5, true)
        .unwrap();
    for t in [&y, &mean, &var] {
        assert_eq!(t.dtype(), DType::F32);
    }
}

/// One training step of a whole network whose body computes in a half
/// `precision` on `device`, against the same network in f64 on the CPU,
/// with the body trainable and frozen: logits, running statistics, eval
/// logits and `forward_infer` within `values` and every trainable
/// parameter's gradient (in `f32`, the master weights' dtype) within
/// `grads`, as norm-wise relative errors. Returns the largest errors seen,
/// `[values, grads]`; `MULTILABEL_TEST_SHOW_ERRORS=1` prints each.
///
/// Gradients are much further off than values: they are evaluated at the
/// half-precision forward pass, whose small differences (ReLU masks flipping
/// near zero, batch statistics over few values) train-mode BatchNorm's
/// backward amplifies at random initialisation; scaling the loss by 16 to
/// 256 left the f16 errors unchanged, so it is not underflow.
pub fn whole_network_step_half(
    device: &Device,
    kernels: Kernels,
    precision: Precision,
    arch: Arch,
    (width, batch, size): (usize, usize, usize),
    (value_tolerance, grad_tolerance): (f64, f64),
) -> [f64; 2] {
    let show = std::env::var_os("MULTILABEL_TEST_SHOW_ERRORS").is_some();
    let ps = if device.is_cpu() { 0.5 } else { 0.0 };
    let (mut half, _) = model_in(arch, width, kernels, precision, (device, DType::F32), ps);
    let (mut truth, _) = model(
        arch,
        width,
        Kernels::Generic,
        (&Device::Cpu, DType::F64),
        ps,
    );
    let x = values(&[batch, 3, size, size], 50);
    let xd = to(device, &x);
    let x64 = x.to_dtype(DType::F64).unwrap();
    let mut worst = [0f64; 2];
    let mut check = |what: &str, ours: &Tensor, t: &Tensor| {
        let error = error_against(ours, t);
        if show {
            eprintln!("{what}: {error:e}");
        }
        let (kind, tolerance) = if what.contains(": d") {
            (1, grad_tolerance)
        } else {
            (0, value_tolerance)
        };
        worst[kind] = worst[kind].max(error);
        assert!(
            error <= tolerance,
            "{what}: {precision} is off by {error:e} from f64"
        );
    };
    for frozen in [false, true] {
        if frozen {
            half.freeze();
            truth.freeze();
        }
        for model in [&half, &truth] {
            model.set_dropout_seed(3);
        }
        let what = format!("{arch} {precision} frozen {frozen}");
        let y_h = half.forward_t(&xd, true).unwrap();
        assert_eq!(y_h.dtype(), DType::F32, "{what}: logits dtype");
        let y_t = truth.forward_t(&x64, true).unwrap();
        check(&format!("{what}: logits"), &y_h, &y_t);
        let g_h = weighted_sum(&y_h, 51).backward().unwrap();
        let g_t = weighted_sum(&y_t, 51).backward().unwrap();
        let params_h = half.trainable_params();
        let params_t = truth.trainable_params();
        assert_eq!(params_h.len(), params_t.len());
        for (p_h, p_t) in params_h.iter().zip(&params_t) {
            let grad_h = g_h
                .get(&p_h.var)
                .unwrap_or_else(|| panic!("{what}: no d{}", p_h.name));
            assert_eq!(grad_h.dtype(), DType::F32, "{what}: d{} dtype", p_h.name);
            check(
                &format!("{what}: d{}", p_h.name),
                grad_h,
                g_t.get(&p_t.var).unwrap(),
            );
        }
        for (b_h, b_t) in half.buffers().into_iter().zip(truth.buffers()) {
            check(
                &format!("{what}: {}", b_h.name),
                b_h.var.as_tensor(),
                b_t.var.as_tensor(),
            );
        }
        let e_t = truth.forward_t(&x64, false).unwrap();
        check(
            &format!("{what}: eval logits"),
            &half.forward_t(&xd, false).unwrap(),
            &e_t,
        );
        check(
            &format!("{what}: forward_infer"),
            &half.forward_infer(&xd).unwrap(),
            &e_t,
        );
    }
    worst
}

/// Train-mode BatchNorm (with and without ReLU) and the stem max-pool on
/// activations of the half `dtype` on `device` through `device_ops`, with
/// `f32` weight and bias (the mixed-precision body's ops), against the CPU
/// kernels in `f32` on the same values (rounded to `dtype` first): outputs
/// and gradients within `tolerance`, statistics and the weight and bias
/// gradients in `f32`; the pool's forward equal to the bit.
pub fn half_activation_ops(device: &Device, device_ops: Ops, dtype: DType, tolerance: f32) {
    let rounded = |t: Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
    let in_dtype = |v: &Var| {
        Var::from_tensor(
            &v.as_tensor()
                .to_dtype(dtype)
                .unwrap()
                .to_device(device)
                .unwrap(),
        )
        .unwrap()
    };
    for relu in [false, true] {
        let shape = [4, 6, 5, 7];
        let what = format!("{dtype:?} batch-norm relu {relu}");
        let offset = values(&[6], 12).reshape((1, 6, 1, 1)).unwrap();
        let x = rounded(values(&shape, 10).broadcast_add(&offset).unwrap());
        let x = Var::from_tensor(&x).unwrap();
        let (w, b) = (var(&[6], 13), var(&[6], 14));
        let (xd, wd, bd) = (in_dtype(&x), on(device, &w), on(device, &b));
        let (y_d, mean_d, var_d) = device_ops
            .batch_norm_train(xd.as_tensor(), wd.as_tensor(), bd.as_tensor(), 1e-5, relu)
            .unwrap();
        assert_eq!(y_d.dtype(), dtype, "{what}: output dtype");
        assert_eq!(mean_d.dtype(), DType::F32, "{what}: statistics dtype");
        let (y_c, mean_c, var_c) = cpu_ops()
            .batch_norm_train(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5, relu)
            .unwrap();
        assert_within(&format!("{what}: forward"), &y_d, &y_c, tolerance);
        // The statistics come from the same (rounded) values in f32.
        assert_close(&format!("{what}: mean"), &mean_d, &mean_c);
        assert_close(&format!("{what}: var"), &var_d, &var_c);
        let grads = weighted_sum(&y_d, 15).backward().unwrap();
        assert_eq!(grads.get(&xd).unwrap().dtype(), dtype, "{what}: dx dtype");
        assert_eq!(
            grads.get(&wd).unwrap().dtype(),
            DType::F32,
            "{what}: dw dtype"
        );
        assert_grads_within(
            &what,
            &weighted_sum(&y_d, 15),
            &weighted_sum(&y_c, 15),
            &[("x", &xd, &x), ("w", &wd, &w), ("b", &bd, &b)],
            tolerance,
        );
    }
    let x = Var::from_tensor(&rounded(values(&[2, 3, 9, 11], 1))).unwrap();
    let xd = in_dtype(&x);
    let pooled = device_ops.max_pool_3x3_s2(xd.as_tensor()).unwrap();
    assert_eq!(pooled.dtype(), dtype);
    let reference = cpu_ops().max_pool_3x3_s2(x.as_tensor()).unwrap();
    assert_within(
        &format!("{dtype:?} max-pool: forward"),
        &pooled,
        &reference,
        0.0,
    );
    assert_grads_within(
        &format!("{dtype:?} max-pool"),
        &weighted_sum(&pooled, 9),
        &weighted_sum(&reference, 9),
        &[("x", &xd, &x)],
        tolerance,
    );
}
