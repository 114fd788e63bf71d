//! The direct stride-1 convolution (`cpu/direct.rs`) against a plain `f64`
//! evaluation of the definition, at every SIMD level this machine has: the
//! baseline level's im2col + `gemm` and the AVX2 and AVX-512 direct kernels
//! all land within 1e-5 of the largest output (relative), the two direct
//! kernels give the same bits, and the inference epilogue gives the bits of
//! the separate ops. One test, because the level is process-wide.

use candle_core::{Device, Tensor};
use multilabel_resnet::cpu::{self, SimdLevel};

/// Deterministic values in about [-2, 2] (xorshift).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// `(n, c, o, h, w, k, padding)`, stride 1.
type Case = (usize, usize, usize, usize, usize, usize, usize);

const CASES: [Case; 8] = [
    // 64 output channels: AVX-512's kernel; 256 pixels (whole tiles of 6 but
    // for 4).
    (2, 8, 64, 16, 16, 3, 1),
    // 24 input channels (two passes of 16 and 8), 260 pixels (a tile's tail),
    // non-square.
    (1, 24, 128, 20, 13, 3, 1),
    // 16 output channels: AVX2's kernel at either level; three passes.
    (2, 40, 16, 17, 19, 3, 1),
    // 5×5 "same".
    (1, 6, 32, 18, 18, 5, 2),
    // No padding: an 18×18 output.
    (1, 7, 64, 20, 20, 3, 0),
    // 1×1 with padding (a border of zeros around the product).
    (3, 5, 64, 16, 16, 1, 1),
    // Two images of three blocks of 16 channels (AVX2's kernel): with the
    // four threads below, each image's blocks are shared out unevenly (2 + 1).
    (2, 9, 48, 16, 16, 3, 1),
    // 16 output channels forward; the input gradient (64 "output" channels
    // of the flipped convolution) takes AVX-512's kernel.
    (1, 64, 16, 16, 16, 3, 1),
];

/// Calls `term(output index, input index, kernel index)` for every product
/// of the convolution's definition, each output's terms in `(c, i, j)` order;
/// taps that fall on the padding have no term.
fn for_each_term(case: Case, mut term: impl FnMut(usize, usize, usize)) {
    let (n, c, o, h, w, kk, pad) = case;
    let (oh, ow) = (h + 2 * pad - kk + 1, w + 2 * pad - kk + 1);
    for b in 0..n {
        for oc in 0..o {
            for (y, xx) in (0..oh).flat_map(|y| (0..ow).map(move |xx| (y, xx))) {
                let out = ((b * o + oc) * oh + y) * ow + xx;
                for ic in 0..c {
                    for (i, j) in (0..kk).flat_map(|i| (0..kk).map(move |j| (i, j))) {
                        let (iy, ix) = ((y + i).checked_sub(pad), (xx + j).checked_sub(pad));
                        let (Some(iy), Some(ix)) = (iy, ix) else {
                            continue;
                        };
                        if iy >= h || ix >= w {
                            continue;
                        }
                        term(
                            out,
                            ((b * c + ic) * h + iy) * w + ix,
                            ((oc * c + ic) * kk + i) * kk + j,
                        );
                    }
                }
            }
        }
    }
}

/// `Σ_c,i,j k[o,c,i,j] · x[n,c,y+i-pad,x+j-pad]` in `f64`.
fn reference(x: &[f32], k: &[f32], case: Case) -> Vec<f64> {
    let (n, _, o, h, w, kk, pad) = case;
    let mut out = vec![0f64; n * o * (h + 2 * pad - kk + 1) * (w + 2 * pad - kk + 1)];
    for_each_term(case, |oi, xi, ki| {
        out[oi] += f64::from(x[xi]) * f64::from(k[ki])
    });
    out
}

/// The input gradient of the case's convolution for output gradient `g`, in `f64`.
fn reference_input_grad(g: &[f32], k: &[f32], case: Case) -> Vec<f64> {
    let (n, c, _, h, w, _, _) = case;
    let mut dx = vec![0f64; n * c * h * w];
    for_each_term(case, |oi, xi, ki| {
        dx[xi] += f64::from(g[oi]) * f64::from(k[ki])
    });
    dx
}

/// max |got − want| / max |want|.
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((f64::from(g) - w).abs()));
    diff / scale
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The kernel `conv2d` should pick for `dims` at `level`.
fn expected_path(level: SimdLevel, o: usize) -> &'static str {
    match level {
        SimdLevel::Baseline => "im2col",
        SimdLevel::Avx512 if o.is_multiple_of(64) => "direct avx512",
        _ => "direct avx2",
    }
}

#[test]
fn direct_convolution_matches_the_definition_at_every_level() {
    // More threads than most cases have images, whatever this machine has,
    // so that images' channel blocks are shared among tasks.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    pool.install(check_every_case);
}

fn check_every_case() {
    let dev = Device::Cpu;
    let detected = cpu::detected_simd_level();
    let levels: Vec<SimdLevel> = [SimdLevel::Baseline, SimdLevel::Avx2, SimdLevel::Avx512]
        .into_iter()
        .filter(|&l| l <= detected)
        .collect();
    for (ci, &case) in CASES.iter().enumerate() {
        let (n, c, o, h, w, kk, pad) = case;
        let (oh, ow) = (h + 2 * pad - kk + 1, w + 2 * pad - kk + 1);
        let xv = values(n * c * h * w, 1 + ci as u64);
        let kv = values(o * c * kk * kk, 100 + ci as u64);
        let gv = values(n * o * oh * ow, 200 + ci as u64);
        let rv = values(n * o * oh * ow, 300 + ci as u64);
        let x = Tensor::from_vec(xv.clone(), (n, c, h, w), &dev).unwrap();
        let k = Tensor::from_vec(kv.clone(), (o, c, kk, kk), &dev).unwrap();
        let g = Tensor::from_vec(gv.clone(), (n, o, oh, ow), &dev).unwrap();
        let residual = Tensor::from_vec(rv, (n, o, oh, ow), &dev).unwrap();
        let scale = Tensor::from_vec(values(o, 400 + ci as u64), o, &dev).unwrap();
        let shift = Tensor::from_vec(values(o, 500 + ci as u64), o, &dev).unwrap();
        let want = reference(&xv, &kv, case);
        let want_dx = reference_input_grad(&gv, &kv, case);
        let mut direct: Vec<(SimdLevel, Vec<f32>, Vec<f32>)> = Vec::new();
        for &level in &levels {
            cpu::set_simd_level(level).unwrap();
            let path = cpu::conv2d_path((n, c, h, w), (o, c, kk, kk), pad, 1).unwrap();
            assert_eq!(path, expected_path(level, o), "case {case:?} at {level:?}");
            let y = cpu::conv2d(&x, &k, pad, 1).unwrap();
            assert_eq!(y.dims(), &[n, o, oh, ow]);
            let y = flat(&y);
            let e = rel_err(&y, &want);
            assert!(
                e <= 1e-5,
                "case {case:?} at {level:?} ({path}): relative error {e}"
            );
            let dx = flat(&cpu::conv2d_input_grad(&g, &k, (n, c, h, w), pad, 1).unwrap());
            let e = rel_err(&dx, &want_dx);
            assert!(
                e <= 1e-5,
                "case {case:?} at {level:?}: input gradient relative error {e}"
            );
            // The inference epilogue gives the bits of the separate ops.
            let fused =
                cpu::conv2d_affine(&x, &k, pad, 1, &scale, &shift, Some(&residual), true).unwrap();
            let y_t = Tensor::from_vec(y.clone(), (n, o, oh, ow), &dev).unwrap();
            let separate = cpu::add_relu(
                &cpu::scale_shift(&y_t, &scale, &shift, false).unwrap(),
                &residual,
            )
            .unwrap();
            assert_eq!(
                bits(&flat(&fused)),
                bits(&flat(&separate)),
                "case {case:?} at {level:?}: epilogue"
            );
            if level >= SimdLevel::Avx2 {
                direct.push((level, y, dx));
            }
        }
        // AVX2 and AVX-512 add the same products in the same order.
        if let [(_, y2, dx2), (_, y5, dx5)] = &direct[..] {
            assert_eq!(
                bits(y2),
                bits(y5),
                "case {case:?}: AVX2 and AVX-512 outputs differ"
            );
            assert_eq!(
                bits(dx2),
                bits(dx5),
                "case {case:?}: AVX2 and AVX-512 input gradients differ"
            );
        }
    }
    cpu::set_simd_level(detected).unwrap();
}
