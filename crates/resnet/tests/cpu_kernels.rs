// Parity of the fast CPU kernels (`multilabel_resnet::cpu`) with candle's own
// ops, forward and backward, on small random shapes: every kernel size a
// ResNet uses, stride 1 and 2, padding, odd and non-square sizes, batches
// that do and do not split evenly into the kernels' image groups, and both
// the parallel and the single-thread plans.

use candle_core::{DType, Device, Tensor, Var};
use multilabel_resnet::cpu;

/// Deterministic values in about [-2, 2] (xorshift; no RNG crate needed).
fn values(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// max |a − b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
    let diff = diff.max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    diff / scale.to_scalar::<f32>().unwrap().max(1e-6)
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor) {
    let e = rel_err(a, b);
    assert!(e <= 1e-4, "{what}: relative error {e}");
}

/// (n, c_in, c_out, h, w, k, stride, padding)
type ConvCase = (usize, usize, usize, usize, usize, usize, usize, usize);

const CONV_CASES: [ConvCase; 20] = [
    (2, 3, 5, 16, 16, 7, 2, 3), // stem
    (2, 3, 4, 17, 13, 7, 2, 3), // stem, odd and non-square
    (3, 4, 6, 8, 8, 3, 1, 1),   // 3×3
    (2, 4, 6, 9, 9, 3, 2, 1),   // 3×3 stride 2, odd
    (2, 5, 3, 10, 7, 3, 2, 1),  // 3×3 stride 2, non-square
    (2, 6, 8, 8, 8, 1, 1, 0),   // 1×1 (no im2col)
    (2, 6, 8, 7, 7, 1, 2, 0),   // 1×1 stride 2 (downsample)
    (5, 4, 6, 10, 10, 3, 1, 1), // 100 pixels: images grouped 3 + 2
    (5, 8, 4, 4, 4, 1, 1, 0),   // 16 pixels: one group of 5, 1×1
    (7, 4, 4, 4, 4, 3, 1, 1),   // 16 pixels, 3×3
    (1, 2, 3, 5, 5, 5, 1, 0),   // no padding, 5×5
    (2, 3, 4, 9, 7, 5, 1, 2),   // 5×5 "same", non-square: shifted-row im2col
    (3, 2, 3, 2, 3, 3, 1, 1),   // 3×3 "same" on a 2×3 plane
    (1, 1, 2, 3, 2, 7, 1, 3),   // 7×7 "same" with padding wider than the plane
    // More than 4 input channels: the f32 path (the image's conv is f64).
    (5, 8, 6, 10, 10, 3, 1, 1), // 3×3 "same", images grouped
    (2, 6, 4, 9, 7, 5, 1, 2),   // 5×5 "same", non-square
    // Stride 1 with more than 4 output channels: the input gradient is a
    // forward convolution of the output gradient with the turned kernel.
    (2, 3, 6, 5, 5, 5, 1, 0), // no padding, 5×5
    (3, 5, 7, 2, 3, 3, 1, 1), // 3×3 "same" on a 2×3 plane
    (1, 5, 6, 3, 2, 7, 1, 3), // 7×7 "same", padding wider than the plane
    (2, 5, 6, 6, 5, 2, 1, 0), // 2×2, no padding
];

fn check_conv_case(i: usize, case: ConvCase) {
    let (n, c_in, c_out, h, w, k, stride, padding) = case;
    let x = Var::from_tensor(&values(&[n, c_in, h, w], 10 + i as u64)).unwrap();
    let kernel = Var::from_tensor(&values(&[c_out, c_in, k, k], 100 + i as u64)).unwrap();
    let ours = cpu::conv2d(&x, &kernel, padding, stride).unwrap();
    let theirs = candle_conv(&x, &kernel, padding, stride);
    assert_close(&format!("case {i} forward"), &ours, &theirs);
    // A random linear loss makes the output gradient non-uniform.
    let r = values(theirs.dims(), 1000 + i as u64);
    let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g_theirs = (theirs * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in [("input", &x), ("kernel", &kernel)] {
        let a = g_ours.get(var).expect("our gradient");
        let b = g_theirs.get(var).expect("candle's gradient");
        assert_close(&format!("case {i} {name} gradient"), a, b);
    }
}

/// candle's conv2d on an explicitly padded input cropped to the rows and
/// columns the windows reach: candle 0.11's conv backward returns an input
/// gradient of the wrong width when the last window stops short of the
/// padded edge (e.g. width 7, 3×3, stride 2, padding 1), so the reference
/// convolution is arranged to fit exactly.
fn candle_conv(x: &Tensor, kernel: &Tensor, padding: usize, stride: usize) -> Tensor {
    let (_, _, h, w) = x.dims4().unwrap();
    let (_, _, kh, kw) = kernel.dims4().unwrap();
    let reach = |len: usize, k: usize| ((len + 2 * padding - k) / stride) * stride + k;
    let padded = x
        .pad_with_zeros(2, padding, padding)
        .unwrap()
        .pad_with_zeros(3, padding, padding)
        .unwrap()
        .narrow(2, 0, reach(h, kh))
        .unwrap()
        .narrow(3, 0, reach(w, kw))
        .unwrap();
    padded.conv2d(kernel, 0, stride, 1, 1).unwrap()
}

/// Forward, input gradient and kernel gradient equal candle's conv2d and
/// its backward for every case.
#[test]
fn conv2d_matches_candle_forward_and_backward() {
    for (i, &case) in CONV_CASES.iter().enumerate() {
        check_conv_case(i, case);
    }
}

/// The same in a one-thread pool, where each product gets every thread
/// rather than each image group getting one.
#[test]
fn conv2d_matches_candle_in_one_thread() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| {
        for (i, &case) in CONV_CASES.iter().enumerate() {
            check_conv_case(i, case);
        }
    });
}

/// The convolution that reads the image (3 input channels here, a stem-like
/// 7×7/2 and odd sizes) rounds once: each output is the `f64` dot product
/// rounded to `f32`, whatever the summation order, so it is within half a
/// unit in the last place of candle's `f64` convolution, and equal to it
/// rounded except where the two `f64` sums straddle a rounding boundary.
/// Accumulating in `f32` instead is ~8 units off at K = 147.
#[test]
fn image_conv_is_correctly_rounded() {
    for (i, &(n, c_out, h, w)) in [(2, 8, 32, 32), (3, 5, 17, 13), (1, 4, 9, 40)]
        .iter()
        .enumerate()
    {
        let x = values(&[n, 3, h, w], 20 + i as u64);
        let kernel = values(&[c_out, 3, 7, 7], 200 + i as u64);
        let ours = cpu::conv2d(&x, &kernel, 3, 2)
            .unwrap()
            .flatten_all()
            .unwrap();
        let truth = candle_conv(
            &x.to_dtype(DType::F64).unwrap(),
            &kernel.to_dtype(DType::F64).unwrap(),
            3,
            2,
        )
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
        let ours = ours.to_vec1::<f32>().unwrap();
        let mut differ = 0;
        for (j, (&a, &t)) in ours.iter().zip(&truth).enumerate() {
            let r = (t as f32).abs();
            let ulp = f64::from(r.next_up() - r);
            assert!(
                (f64::from(a) - t).abs() <= 0.5 * ulp * (1.0 + 1e-6),
                "shape {i}, output {j}: {a} is not {t} rounded"
            );
            differ += usize::from(a != t as f32);
        }
        assert!(
            differ * 1000 <= ours.len(),
            "shape {i}: {differ} of {} differ",
            ours.len()
        );
    }
}

/// A detached (frozen) kernel gets no gradient, and an input that tracks
/// nothing (the image) gets none either, while the other operand does.
#[test]
fn conv2d_computes_only_needed_gradients() {
    let x = Var::from_tensor(&values(&[2, 3, 6, 6], 1)).unwrap();
    let kernel = Var::from_tensor(&values(&[4, 3, 3, 3], 2)).unwrap();
    let out = cpu::conv2d(x.as_tensor(), &kernel.as_detached_tensor(), 1, 1).unwrap();
    let grads = out.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_some());
    assert!(grads.get(&kernel).is_none());
    let image = x.as_detached_tensor();
    let out = cpu::conv2d(&image, kernel.as_tensor(), 1, 2).unwrap();
    let grads = out.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&kernel).is_some());
    assert!(grads.get(&image).is_none());
    let out = cpu::conv2d(&image, &kernel.as_detached_tensor(), 1, 1).unwrap();
    assert!(!out.track_op(), "nothing to differentiate: no graph node");
}

/// Shape errors say what is wrong instead of panicking.
#[test]
fn conv2d_rejects_mismatched_channels() {
    let x = values(&[1, 3, 8, 8], 1);
    let kernel = values(&[4, 2, 3, 3], 2);
    let err = cpu::conv2d(&x, &kernel, 1, 1).unwrap_err().to_string();
    assert!(err.contains("3 channels"), "{err}");
}

/// Reference BatchNorm (train mode) from candle tensor ops.
fn batch_norm_reference(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    relu: bool,
) -> (Tensor, Tensor, Tensor) {
    let c = x.dim(1).unwrap();
    let mut bshape = vec![1; x.rank()];
    bshape[1] = c;
    let reduce: Vec<usize> = (0..x.rank()).filter(|&d| d != 1).collect();
    let mean = x.mean_keepdim(reduce.as_slice()).unwrap();
    let centred = x.broadcast_sub(&mean).unwrap();
    let var = centred
        .sqr()
        .unwrap()
        .mean_keepdim(reduce.as_slice())
        .unwrap();
    let inv_std = (var.clone() + 1e-5)
        .unwrap()
        .sqrt()
        .unwrap()
        .recip()
        .unwrap();
    let y = centred
        .broadcast_mul(&inv_std)
        .unwrap()
        .broadcast_mul(&w.reshape(bshape.as_slice()).unwrap())
        .unwrap()
        .broadcast_add(&b.reshape(bshape.as_slice()).unwrap())
        .unwrap();
    let y = if relu { y.relu().unwrap() } else { y };
    (y, mean.flatten_all().unwrap(), var.flatten_all().unwrap())
}

/// Train-mode BatchNorm, with and without the fused ReLU, on 4-D and 2-D
/// inputs: output, batch statistics and the gradients of input, weight and
/// bias match the composition of candle ops.
#[test]
fn batch_norm_train_matches_candle_ops() {
    // Planes summed by position (5×7, 2×2, 1×3 and 3×3, and rank 2) and
    // by lanes (8×8, and 9×9 with a tail), and channels of fewer than 16
    // values in all.
    let cases: [&[usize]; 9] = [
        &[3, 4, 9, 9],
        &[4, 3, 5, 7],
        &[2, 6, 8, 8],
        &[8, 6, 2, 2],
        &[16, 5, 1, 3],
        &[7, 4, 3, 3],
        &[40, 6],
        &[3, 5, 1, 1],
        &[8, 10],
    ];
    for (i, dims) in cases.iter().enumerate() {
        for relu in [false, true] {
            let c = dims[1];
            // An offset mean checks that the variance is computed stably.
            let x = Var::from_tensor(&(values(dims, 20 + i as u64) + 3.0).unwrap()).unwrap();
            let w = Var::from_tensor(&values(&[c], 30 + i as u64)).unwrap();
            let b = Var::from_tensor(&values(&[c], 40 + i as u64)).unwrap();
            let (y, mean, var) = cpu::batch_norm_train(&x, &w, &b, 1e-5, relu).unwrap();
            let (y_ref, mean_ref, var_ref) = batch_norm_reference(&x, &w, &b, relu);
            let what = format!("case {i} relu {relu}");
            assert_close(&format!("{what} forward"), &y, &y_ref);
            assert_close(&format!("{what} mean"), &mean, &mean_ref);
            assert_close(&format!("{what} var"), &var, &var_ref);
            assert!(!mean.track_op() && !var.track_op());
            let r = values(dims, 50 + i as u64);
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, var) in [("x", &x), ("weight", &w), ("bias", &b)] {
                let a = g.get(var).expect("our gradient");
                let e = g_ref.get(var).expect("reference gradient");
                assert_close(&format!("{what} {name} gradient"), a, e);
            }
        }
    }
}

/// With an input that tracks nothing (a frozen conv's output) only the
/// weight and bias get gradients.
#[test]
fn batch_norm_train_skips_input_gradient() {
    let x = values(&[2, 3, 4, 4], 1);
    let w = Var::from_tensor(&values(&[3], 2)).unwrap();
    let b = Var::from_tensor(&values(&[3], 3)).unwrap();
    let (y, _, _) = cpu::batch_norm_train(&x, &w, &b, 1e-5, true).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&w).is_some() && grads.get(&b).is_some());
    assert!(grads.get(&x).is_none());
}

/// Eval-mode BatchNorm as a per-channel affine (with and without ReLU)
/// matches broadcast ops, forward and backward.
#[test]
fn scale_shift_matches_candle_ops() {
    for relu in [false, true] {
        let x = Var::from_tensor(&values(&[3, 4, 5, 6], 7)).unwrap();
        let scale = Var::from_tensor(&values(&[4], 8)).unwrap();
        let shift = Var::from_tensor(&values(&[4], 9)).unwrap();
        let y = cpu::scale_shift(&x, &scale, &shift, relu).unwrap();
        let y_ref = x
            .broadcast_mul(&scale.reshape((1, 4, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&shift.reshape((1, 4, 1, 1)).unwrap())
            .unwrap();
        let y_ref = if relu { y_ref.relu().unwrap() } else { y_ref };
        assert_close("scale-shift forward", &y, &y_ref);
        let r = values(&[3, 4, 5, 6], 10);
        let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("x", &x), ("scale", &scale), ("shift", &shift)] {
            assert_close(
                &format!("scale-shift relu {relu} {name} gradient"),
                g.get(var).unwrap(),
                g_ref.get(var).unwrap(),
            );
        }
    }
}

/// The residual `relu(a + b)` matches candle's add and relu, forward and
/// backward, on a tensor larger than one parallel chunk.
#[test]
fn add_relu_matches_candle_ops() {
    let dims = [3, 7, 40, 41];
    let a = Var::from_tensor(&values(&dims, 11)).unwrap();
    let b = Var::from_tensor(&values(&dims, 12)).unwrap();
    let y = cpu::add_relu(&a, &b).unwrap();
    let y_ref = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
    assert_close("add-relu forward", &y, &y_ref);
    let r = values(&dims, 13);
    let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g_ref = (y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in [("a", &a), ("b", &b)] {
        assert_close(
            &format!("add-relu {name} gradient"),
            g.get(var).unwrap(),
            g_ref.get(var).unwrap(),
        );
    }
}

/// Other dtypes take candle's path and still give the same values.
#[test]
fn f64_falls_back_to_candle() {
    let x = values(&[2, 3, 6, 6], 1).to_dtype(DType::F64).unwrap();
    let kernel = values(&[4, 3, 3, 3], 2).to_dtype(DType::F64).unwrap();
    let ours = cpu::conv2d(&x, &kernel, 1, 2).unwrap();
    let theirs = x.conv2d(&kernel, 1, 2, 1, 1).unwrap();
    assert_eq!(ours.dtype(), DType::F64);
    let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f64>().unwrap(), 0.0);
}

/// Off the fast path (f64 here; CUDA and Metal in practice) the fused ops
/// are compositions of candle ops with the same results: forward values and
/// gradients agree with the f32 kernels.
#[test]
fn fused_ops_fall_back_to_candle_with_the_same_results() {
    let f64_var = |v: &Var| Var::from_tensor(&v.to_dtype(DType::F64).unwrap()).unwrap();
    let to32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let x = Var::from_tensor(&values(&[3, 4, 8, 8], 1)).unwrap();
    let kernel = Var::from_tensor(&values(&[6, 4, 3, 3], 2)).unwrap();
    let wt = Var::from_tensor(&values(&[6], 3)).unwrap();
    let b = Var::from_tensor(&values(&[6], 4)).unwrap();
    let res = Var::from_tensor(&values(&[3, 6, 8, 8], 5)).unwrap();
    let (x64, k64, w64, b64, r64) = (
        f64_var(&x),
        f64_var(&kernel),
        f64_var(&wt),
        f64_var(&b),
        f64_var(&res),
    );
    let (y, mean, var) =
        cpu::conv2d_batch_norm_add_relu_train(&x, &kernel, 1, 1, &wt, &b, 1e-5, &res).unwrap();
    let (y64, mean64, var64) =
        cpu::conv2d_batch_norm_add_relu_train(&x64, &k64, 1, 1, &w64, &b64, 1e-5, &r64).unwrap();
    assert_eq!(y64.dtype(), DType::F64);
    assert_same_node(
        "f64 fallback",
        (&y, &mean, &var),
        (&to32(&y64), &to32(&mean64), &to32(&var64)),
        6,
        &[],
    );
    let r = values(y.dims(), 7);
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g64 = (&y64 * r.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, v, v64) in [
        ("x", &x, &x64),
        ("kernel", &kernel, &k64),
        ("weight", &wt, &w64),
        ("bias", &b, &b64),
        ("residual", &res, &r64),
    ] {
        let a = g.get(v).expect("f32 gradient");
        let e = to32(g64.get(v64).expect("f64 gradient"));
        assert_close(&format!("f64 fallback {name} gradient"), a, &e);
    }
    let (scale, shift) = (values(&[6], 8), values(&[6], 9));
    let fused = cpu::conv2d_affine(&x, &kernel, 1, 1, &scale, &shift, Some(&res), true).unwrap();
    let fused64 = cpu::conv2d_affine(
        &x64,
        &k64,
        1,
        1,
        &scale.to_dtype(DType::F64).unwrap(),
        &shift.to_dtype(DType::F64).unwrap(),
        Some(&r64),
        true,
    )
    .unwrap();
    assert_close("f64 fallback inference", &fused, &to32(&fused64));
}

/// The fused inference conv equals, to the bit, the conv followed by the
/// separate scale-shift and add-relu ops, for every conv case (the grouped
/// small-image path included), with and without a residual and a ReLU.
#[test]
fn conv2d_affine_equals_separate_ops_bitwise() {
    for (i, &(n, c_in, c_out, h, w, k, stride, padding)) in CONV_CASES.iter().enumerate() {
        let x = values(&[n, c_in, h, w], 10 + i as u64);
        let kernel = values(&[c_out, c_in, k, k], 100 + i as u64);
        let scale = values(&[c_out], 200 + i as u64);
        let shift = values(&[c_out], 300 + i as u64);
        let conv = cpu::conv2d(&x, &kernel, padding, stride).unwrap();
        let residual = values(conv.dims(), 400 + i as u64);
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.into_iter().map(f32::to_bits).collect()
        };
        for relu in [false, true] {
            let fused =
                cpu::conv2d_affine(&x, &kernel, padding, stride, &scale, &shift, None, relu)
                    .unwrap();
            let separate = cpu::scale_shift(&conv, &scale, &shift, relu).unwrap();
            assert_eq!(bits(&fused), bits(&separate), "case {i}, relu {relu}");
        }
        let fused = cpu::conv2d_affine(
            &x,
            &kernel,
            padding,
            stride,
            &scale,
            &shift,
            Some(&residual),
            true,
        )
        .unwrap();
        let separate = cpu::add_relu(
            &cpu::scale_shift(&conv, &scale, &shift, false).unwrap(),
            &residual,
        )
        .unwrap();
        assert_eq!(bits(&fused), bits(&separate), "case {i}, residual");
        assert!(!fused.track_op(), "inference carries no graph");
    }
}

/// A residual of the wrong shape is an error naming both shapes.
#[test]
fn conv2d_affine_rejects_a_mismatched_residual() {
    let x = values(&[2, 3, 8, 8], 1);
    let kernel = values(&[4, 3, 3, 3], 2);
    let (scale, shift) = (values(&[4], 3), values(&[4], 4));
    let residual = values(&[2, 4, 4, 4], 5);
    let err = cpu::conv2d_affine(&x, &kernel, 1, 1, &scale, &shift, Some(&residual), true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("residual") && err.contains("[2, 4, 4, 4]"),
        "{err}"
    );
}

/// A fused train-mode node `(y, mean, var)` equals its reference: values,
/// statistics, and the gradients of `vars` under a random linear loss.
fn assert_same_node(
    what: &str,
    (y, mean, var): (&Tensor, &Tensor, &Tensor),
    (y_ref, mean_ref, var_ref): (&Tensor, &Tensor, &Tensor),
    seed: u64,
    vars: &[(&str, &Var)],
) {
    assert_close(&format!("{what} forward"), y, y_ref);
    assert_close(&format!("{what} mean"), mean, mean_ref);
    assert_close(&format!("{what} var"), var, var_ref);
    let r = values(y.dims(), seed);
    let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g_ref = (y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in vars {
        let a = g.get(v).expect("our gradient");
        let e = g_ref.get(v).expect("reference gradient");
        assert_close(&format!("{what} {name} gradient"), a, e);
    }
}

/// The fused train-mode conv + BatchNorm (+ ReLU) node equals the two
/// separate ops (our conv and our BatchNorm, each checked against candle
/// above): output, batch statistics and the gradients of input, kernel,
/// weight and bias, for every conv case, with and without ReLU.
#[test]
fn conv2d_batch_norm_train_matches_separate_ops() {
    for (i, &(n, c_in, c_out, h, w, k, stride, padding)) in CONV_CASES.iter().enumerate() {
        for relu in [false, true] {
            let x = Var::from_tensor(&values(&[n, c_in, h, w], 10 + i as u64)).unwrap();
            let kernel = Var::from_tensor(&values(&[c_out, c_in, k, k], 100 + i as u64)).unwrap();
            let wt = Var::from_tensor(&values(&[c_out], 200 + i as u64)).unwrap();
            let b = Var::from_tensor(&values(&[c_out], 300 + i as u64)).unwrap();
            let fused =
                cpu::conv2d_batch_norm_train(&x, &kernel, padding, stride, &wt, &b, 1e-5, relu);
            let (oh, ow) = (
                (h + 2 * padding - k) / stride + 1,
                (w + 2 * padding - k) / stride + 1,
            );
            if n * oh * ow < 2 {
                // One value per channel: no batch variance.
                let err = fused.unwrap_err().to_string();
                assert!(err.contains("more than one value per channel"), "{err}");
                continue;
            }
            let (y, mean, var) = fused.unwrap();
            let conv = cpu::conv2d(&x, &kernel, padding, stride).unwrap();
            let (y_ref, mean_ref, var_ref) =
                cpu::batch_norm_train(&conv, &wt, &b, 1e-5, relu).unwrap();
            assert_same_node(
                &format!("case {i} relu {relu}"),
                (&y, &mean, &var),
                (&y_ref, &mean_ref, &var_ref),
                400 + i as u64,
                &[
                    ("x", &x),
                    ("kernel", &kernel),
                    ("weight", &wt),
                    ("bias", &b),
                ],
            );
        }
    }
}

/// A frozen (detached) kernel and an input image that tracks nothing get
/// no gradient from the fused node, while the BatchNorm parameters still do.
#[test]
fn conv2d_batch_norm_train_computes_only_needed_gradients() {
    let x = Var::from_tensor(&values(&[2, 3, 6, 6], 1)).unwrap();
    let kernel = Var::from_tensor(&values(&[4, 3, 3, 3], 2)).unwrap();
    let wt = Var::from_tensor(&values(&[4], 3)).unwrap();
    let b = Var::from_tensor(&values(&[4], 4)).unwrap();
    let frozen = kernel.as_detached_tensor();
    let (y, _, _) = cpu::conv2d_batch_norm_train(&x, &frozen, 1, 1, &wt, &b, 1e-5, true).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_some() && grads.get(&wt).is_some() && grads.get(&b).is_some());
    assert!(grads.get(&kernel).is_none());
    let image = x.as_detached_tensor();
    let (y, _, _) =
        cpu::conv2d_batch_norm_train(&image, &frozen, 1, 2, &wt, &b, 1e-5, false).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&wt).is_some() && grads.get(&b).is_some());
    assert!(grads.get(&image).is_none() && grads.get(&kernel).is_none());
}

/// Forward, input gradient and kernel gradient are the same to the bit
/// with 1, 3 and 8 threads (8 is more threads than image groups, so each
/// product is split across threads instead).
#[test]
fn conv2d_results_do_not_depend_on_thread_count() {
    let x = values(&[20, 4, 8, 8], 1);
    let kernel = values(&[6, 4, 3, 3], 2);
    let grad = values(&[20, 6, 8, 8], 3);
    let bits = |t: Tensor| -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    };
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            (
                bits(cpu::conv2d(&x, &kernel, 1, 1).unwrap()),
                bits(cpu::conv2d_input_grad(&grad, &kernel, (20, 4, 8, 8), 1, 1).unwrap()),
                bits(cpu::conv2d_kernel_grad(&x, &grad, (6, 4, 3, 3), 1, 1).unwrap()),
            )
        })
    };
    let one = run(1);
    assert!(one == run(3), "1 vs 3 threads");
    assert!(one == run(8), "1 vs 8 threads");
}

/// The end of a residual block as one node equals the fused conv +
/// BatchNorm followed by add-relu: output, statistics and the gradients of
/// input, kernel, weight, bias and residual, for every conv case.
#[test]
fn conv2d_batch_norm_add_relu_train_matches_separate_ops() {
    for (i, &(n, c_in, c_out, h, w, k, stride, padding)) in CONV_CASES.iter().enumerate() {
        let (oh, ow) = (
            (h + 2 * padding - k) / stride + 1,
            (w + 2 * padding - k) / stride + 1,
        );
        if n * oh * ow < 2 {
            continue;
        }
        let x = Var::from_tensor(&values(&[n, c_in, h, w], 10 + i as u64)).unwrap();
        let kernel = Var::from_tensor(&values(&[c_out, c_in, k, k], 100 + i as u64)).unwrap();
        let wt = Var::from_tensor(&values(&[c_out], 200 + i as u64)).unwrap();
        let b = Var::from_tensor(&values(&[c_out], 300 + i as u64)).unwrap();
        let res = Var::from_tensor(&values(&[n, c_out, oh, ow], 500 + i as u64)).unwrap();
        let (y, mean, var) = cpu::conv2d_batch_norm_add_relu_train(
            &x, &kernel, padding, stride, &wt, &b, 1e-5, &res,
        )
        .unwrap();
        let (bn, mean_ref, var_ref) =
            cpu::conv2d_batch_norm_train(&x, &kernel, padding, stride, &wt, &b, 1e-5, false)
                .unwrap();
        let y_ref = cpu::add_relu(&bn, &res).unwrap();
        assert_same_node(
            &format!("case {i}"),
            (&y, &mean, &var),
            (&y_ref, &mean_ref, &var_ref),
            400 + i as u64,
            &[
                ("x", &x),
                ("kernel", &kernel),
                ("weight", &wt),
                ("bias", &b),
                ("residual", &res),
            ],
        );
    }
}

/// A frozen kernel gets no gradient from the block-end node; the input,
/// the BatchNorm parameters and the residual still do.
#[test]
fn conv2d_batch_norm_add_relu_train_skips_a_frozen_kernel() {
    let x = Var::from_tensor(&values(&[2, 3, 6, 6], 1)).unwrap();
    let kernel = Var::from_tensor(&values(&[4, 3, 1, 1], 2)).unwrap();
    let wt = Var::from_tensor(&values(&[4], 3)).unwrap();
    let b = Var::from_tensor(&values(&[4], 4)).unwrap();
    let res = Var::from_tensor(&values(&[2, 4, 6, 6], 5)).unwrap();
    let frozen = kernel.as_detached_tensor();
    let (y, _, _) =
        cpu::conv2d_batch_norm_add_relu_train(&x, &frozen, 0, 1, &wt, &b, 1e-5, &res).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    for v in [&x, &wt, &b, &res] {
        assert!(grads.get(v).is_some());
    }
    assert!(grads.get(&kernel).is_none());
}

/// At a block's end the residual's gradient is the output gradient where
/// the block's output is positive (`+0` elsewhere), written by the
/// BatchNorm's backward pass: the same values whether that pass also
/// computes the convolution's gradient (input and kernel tracked) or only
/// the mask (neither tracked).
#[test]
fn block_end_residual_gradient_is_the_relu_mask() {
    let x = values(&[2, 8, 6, 6], 11);
    let kernel = values(&[16, 8, 3, 3], 12);
    let wt = Var::from_tensor(&values(&[16], 13)).unwrap();
    let b = Var::from_tensor(&values(&[16], 14)).unwrap();
    let res = Var::from_tensor(&values(&[2, 16, 6, 6], 15)).unwrap();
    let r = values(&[2, 16, 6, 6], 16);
    let run = |x: &Tensor, k: &Tensor| {
        let (y, _, _) =
            cpu::conv2d_batch_norm_add_relu_train(x, k, 1, 1, &wt, &b, 1e-5, &res).unwrap();
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let get = |v: &Var| grads.get(v).expect("a gradient").clone();
        (y, get(&res), get(&wt))
    };
    let (y, dres, dw) = run(&x, &kernel);
    let (xv, kv) = (
        Var::from_tensor(&x).unwrap(),
        Var::from_tensor(&kernel).unwrap(),
    );
    let (y_tracked, dres_tracked, dw_tracked) = run(xv.as_tensor(), kv.as_tensor());
    let positive = y.gt(0f32).unwrap();
    let want = positive.where_cond(&r, &r.zeros_like().unwrap()).unwrap();
    let bits = |t: &Tensor| -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    };
    assert!(
        positive
            .to_dtype(DType::F32)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.2
    );
    assert_eq!(bits(&dres), bits(&want), "mask alone");
    assert_eq!(bits(&dres_tracked), bits(&want), "mask beside dx");
    assert_eq!(bits(&y), bits(&y_tracked));
    assert_eq!(bits(&dw), bits(&dw_tracked));
}

/// (c_in, c_out, kernel, stride) of a block's layers.
type LayerShape = (usize, usize, usize, usize);

/// A residual block as one node gives the bits of its layers as separate
/// nodes (conv + BatchNorm + ReLU, the last with the residual add): the
/// output, every BatchNorm's statistics, and the gradients of the input,
/// every trainable kernel and every BatchNorm weight and bias; for basic
/// and bottleneck blocks, with and without a downsample, with every
/// kernel trainable, none, or some.
#[test]
fn residual_block_matches_its_layers() {
    #[allow(clippy::type_complexity)]
    let cases: [([usize; 4], &[LayerShape], Option<LayerShape>); 4] = [
        ([4, 16, 8, 8], &[(16, 16, 3, 1), (16, 16, 3, 1)], None),
        (
            [3, 16, 9, 9],
            &[(16, 32, 3, 2), (32, 32, 3, 1)],
            Some((16, 32, 1, 2)),
        ),
        (
            [3, 64, 6, 6],
            &[(64, 32, 1, 1), (32, 32, 3, 2), (32, 128, 1, 1)],
            Some((64, 128, 1, 2)),
        ),
        (
            [2, 64, 5, 5],
            &[(64, 16, 1, 1), (16, 16, 3, 1), (16, 64, 1, 1)],
            None,
        ),
    ];
    let bits = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    // The first index where two results differ (`==`, so ±0 agree).
    let differ = |a: &Option<Vec<f32>>, b: &Option<Vec<f32>>| -> Option<String> {
        match (a, b) {
            (Some(a), Some(b)) if a.len() == b.len() => (0..a.len())
                .find(|&i| a[i] != b[i])
                .map(|i| format!("at {i}: {} against {}", a[i], b[i])),
            (None, None) => None,
            _ => Some("present on one side only, or of other lengths".into()),
        }
    };
    let check = |what: String, a: Option<Vec<f32>>, b: Option<Vec<f32>>| {
        if let Some(d) = differ(&a, &b) {
            panic!("{what}: {d}");
        }
    };
    for (ci, (xdims, shapes, ds)) in cases.iter().enumerate() {
        let all: Vec<LayerShape> = shapes.iter().copied().chain(*ds).collect();
        for trainable in ["all", "none", "first frozen"] {
            let seed = 100 * ci as u64;
            let x = Var::from_tensor(&values(xdims, seed)).unwrap();
            let kernels: Vec<Var> = all
                .iter()
                .enumerate()
                .map(|(j, &(c, o, k, _))| {
                    let t = (values(&[o, c, k, k], seed + 10 + j as u64) * 0.2).unwrap();
                    Var::from_tensor(&t).unwrap()
                })
                .collect();
            let bn: Vec<(Var, Var)> = all
                .iter()
                .enumerate()
                .map(|(j, &(_, o, _, _))| {
                    let w = (values(&[o], seed + 20 + j as u64) + 1.5).unwrap();
                    let b = values(&[o], seed + 30 + j as u64);
                    (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap())
                })
                .collect();
            let tracked = |j: usize| match trainable {
                "all" => true,
                "none" => false,
                _ => j > 0,
            };
            let ks: Vec<Tensor> = kernels
                .iter()
                .enumerate()
                .map(|(j, k)| {
                    if tracked(j) {
                        k.as_tensor().clone()
                    } else {
                        k.as_detached_tensor()
                    }
                })
                .collect();
            let layers: Vec<cpu::BlockLayer> = all
                .iter()
                .enumerate()
                .map(|(j, &(_, _, k, s))| cpu::BlockLayer {
                    kernel: &ks[j],
                    padding: k / 2,
                    stride: s,
                    weight: bn[j].0.as_tensor(),
                    bias: bn[j].1.as_tensor(),
                })
                .collect();
            let (main, downsample) = layers.split_at(shapes.len());
            let (y, stats) =
                cpu::residual_block_train(x.as_tensor(), main, downsample.first(), 1e-5).unwrap();
            // The same block as one node per layer.
            let mut want_stats = Vec::new();
            let count = |t: &Tensor| t.elem_count() / t.dim(1).unwrap();
            let mut h = x.as_tensor().clone();
            let residual = match downsample.first() {
                Some(l) => {
                    let (r, m, v) = cpu::conv2d_batch_norm_train(
                        x.as_tensor(),
                        l.kernel,
                        l.padding,
                        l.stride,
                        l.weight,
                        l.bias,
                        1e-5,
                        false,
                    )
                    .unwrap();
                    want_stats.push((m, v, count(&r)));
                    r
                }
                None => x.as_tensor().clone(),
            };
            let mut layer_stats = Vec::new();
            let (last, inner) = main.split_last().unwrap();
            for l in inner {
                let (out, m, v) = cpu::conv2d_batch_norm_train(
                    &h, l.kernel, l.padding, l.stride, l.weight, l.bias, 1e-5, true,
                )
                .unwrap();
                layer_stats.push((m, v, count(&out)));
                h = out;
            }
            let (want_y, m, v) = cpu::conv2d_batch_norm_add_relu_train(
                &h,
                last.kernel,
                last.padding,
                last.stride,
                last.weight,
                last.bias,
                1e-5,
                &residual,
            )
            .unwrap();
            layer_stats.push((m, v, count(&want_y)));
            layer_stats.extend(want_stats);
            let what = format!("case {ci}, kernels trainable: {trainable}");
            check(
                format!("{what}: output"),
                Some(bits(&y)),
                Some(bits(&want_y)),
            );
            assert_eq!(stats.len(), layer_stats.len());
            for (j, ((m, v, n), (wm, wv, wn))) in stats.iter().zip(&layer_stats).enumerate() {
                check(
                    format!("{what}: layer {j} mean"),
                    Some(bits(m)),
                    Some(bits(wm)),
                );
                check(
                    format!("{what}: layer {j} variance"),
                    Some(bits(v)),
                    Some(bits(wv)),
                );
                assert_eq!(n, wn, "{what}: layer {j} values per channel");
            }
            let r = values(y.dims(), seed + 99);
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let want_g = (&want_y * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grad = |store: &candle_core::backprop::GradStore, v: &Var| store.get(v).map(bits);
            assert!(grad(&g, &x).is_some(), "{what}: no input gradient");
            check(
                format!("{what}: input gradient"),
                grad(&g, &x),
                grad(&want_g, &x),
            );
            for j in 0..all.len() {
                let (dk, want_dk) = (grad(&g, &kernels[j]), grad(&want_g, &kernels[j]));
                assert_eq!(
                    dk.is_some(),
                    tracked(j),
                    "{what}: layer {j} kernel gradient present"
                );
                check(format!("{what}: layer {j} kernel gradient"), dk, want_dk);
                for (name, v) in [("weight", &bn[j].0), ("bias", &bn[j].1)] {
                    assert!(grad(&g, v).is_some(), "{what}: layer {j} {name}");
                    let (a, b) = (grad(&g, v), grad(&want_g, v));
                    check(format!("{what}: layer {j} {name} gradient"), a, b);
                }
            }
        }
    }
}
