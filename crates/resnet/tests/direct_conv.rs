//! The direct convolutions (`cpu/direct.rs`) and Winograd's
//! (`cpu/winograd.rs`) against a plain `f64` evaluation of the definition,
//! at every SIMD level this machine has: the baseline level's im2col +
//! `gemm` and the AVX2 and AVX-512 kernels all land within 1e-5 of the
//! largest output (relative), AVX2 and AVX-512 give the same bits, the
//! `f64` variant gives the definition's value rounded to `f32` to the bit,
//! and the inference epilogue gives the bits of the separate ops. The
//! kernel gradients (Winograd's where it applies) land within the same
//! bound, with the same bits on one thread as on four. Strides 1 to 3,
//! images grouped into tasks, planes too small for the direct kernel, odd
//! planes cut into 2×2 tiles. One test, because the level and the
//! Winograd switch are process-wide.

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

/// A convolution to check: shapes, padding, stride and the family of
/// kernel it should take with AVX2 or AVX-512.
#[derive(Debug, Clone, Copy)]
struct Case {
    n: usize,
    c: usize,
    o: usize,
    h: usize,
    w: usize,
    k: usize,
    pad: usize,
    stride: usize,
    family: Family,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Family {
    /// The `f32` direct kernel.
    Direct,
    /// The direct kernel's `f64` variant (at most four input channels).
    ExactDirect,
    /// im2col + `gemm` at every level (here: planes too small).
    Im2col,
    /// Winograd's F(2×2, 3×3) (3×3, stride 1, padding 1, enough tiles),
    /// with F(4×4, 3×3) turned off.
    Winograd,
    /// Winograd's F(4×4, 3×3) (the same, on planes its tiles fit).
    Winograd4,
    /// The direct kernel over each pixel's valid taps (planes where at
    /// most half of all taps read the image).
    ValidTaps,
}

impl Case {
    const fn new(n: usize, c: usize, o: usize, hw: (usize, usize), k: usize) -> Self {
        Self {
            n,
            c,
            o,
            h: hw.0,
            w: hw.1,
            k,
            pad: k / 2,
            stride: 1,
            family: Family::Direct,
        }
    }
    const fn pad(self, pad: usize) -> Self {
        Self { pad, ..self }
    }
    const fn stride(self, stride: usize) -> Self {
        Self { stride, ..self }
    }
    const fn family(self, family: Family) -> Self {
        Self { family, ..self }
    }
    fn out(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.pad - self.k) / self.stride + 1,
            (self.w + 2 * self.pad - self.k) / self.stride + 1,
        )
    }
}

const CASES: [Case; 30] = [
    // 64 output channels: AVX-512's kernel; 256 pixels (whole tiles of 6 but
    // for 4).
    Case::new(2, 8, 64, (16, 16), 3),
    // 24 input channels (two passes of 16 and 8), 260 pixels (a tile's tail),
    // non-square.
    Case::new(1, 24, 128, (20, 13), 3),
    // 16 output channels: AVX2's kernel at either level; three passes.
    Case::new(2, 40, 16, (17, 19), 3),
    // 5×5 "same".
    Case::new(1, 6, 32, (18, 18), 5),
    // No padding: an 18×18 output.
    Case::new(1, 7, 64, (20, 20), 3).pad(0),
    // 1×1 with padding (a border of zeros around the product).
    Case::new(3, 5, 64, (16, 16), 1).pad(1),
    // Two images of three blocks of 16 channels (AVX2's kernel): with the
    // four threads below, each image's blocks are shared out unevenly (2 + 1).
    Case::new(2, 9, 48, (16, 16), 3),
    // 16 output channels forward; the input gradient (64 "output" channels
    // of the flipped convolution) takes AVX-512's kernel.
    Case::new(1, 64, 16, (16, 16), 3),
    // Stride 2 onto 17×16 (the input gradient takes col2im).
    Case::new(1, 8, 64, (34, 32), 3).stride(2),
    // Stride 2, 1×1, no padding, odd width.
    Case::new(2, 6, 16, (32, 34), 1).pad(0).stride(2),
    // 12×12 planes, two images a task (with four threads and nine images),
    // the last task one image.
    Case::new(9, 6, 64, (12, 12), 3),
    // 8×8 planes: im2col + `gemm` at every level.
    Case::new(8, 16, 64, (8, 8), 3).family(Family::Im2col),
    // The stem's shape, smaller: 7×7, stride 2, three channels, in `f64`
    // (blocks of 32 with AVX-512); 10×11 outputs, tiles spanning images.
    Case::new(3, 3, 64, (20, 22), 7)
        .stride(2)
        .family(Family::ExactDirect),
    // Eight output channels: the `f64` kernel's AVX2 blocks at either level.
    Case::new(2, 4, 8, (9, 9), 3).family(Family::ExactDirect),
    // Two channels, 48 outputs (AVX2's `f64` blocks on AVX-512), stride 3.
    Case::new(2, 2, 48, (13, 11), 5)
        .stride(3)
        .family(Family::ExactDirect),
    // Winograd: 8 × 144 tiles of 2×2, 64 output channels (AVX-512's
    // blocks), the input gradient 16 (AVX2's).
    Case::new(8, 16, 64, (24, 24), 3).family(Family::Winograd),
    // Odd planes (the last tile row and column cut off), 48 output
    // channels (AVX2's blocks at either level), 7 × 156 tiles in tasks
    // spanning images.
    Case::new(7, 32, 48, (23, 25), 3).family(Family::Winograd),
    // One image, fewer than the threads: its channel blocks shared out.
    Case::new(1, 5, 64, (64, 64), 3).family(Family::Winograd),
    // Channels enough for the kernel gradient's shared chunks (16·O·C
    // values over 1 MiB), 144 outputs (AVX2's blocks), odd planes.
    Case::new(3, 120, 144, (21, 19), 3).family(Family::Winograd),
    // F(4×4, 3×3): 16×16 planes (four tiles a side), 64 outputs; the
    // input gradient 16 (AVX2's blocks).
    Case::new(4, 16, 64, (16, 16), 3).family(Family::Winograd4),
    // 14×14 planes (the last tile row and column cut in half), 48 outputs
    // (AVX2's blocks at either level).
    Case::new(6, 24, 48, (14, 14), 3).family(Family::Winograd4),
    // Odd 7×9 planes, 13 images.
    Case::new(13, 8, 64, (7, 9), 3).family(Family::Winograd4),
    // One image, fewer than the threads: its channel blocks shared out.
    Case::new(1, 8, 128, (32, 32), 3).family(Family::Winograd4),
    // 64 tiles an image, channels enough for two chunks of 32.
    Case::new(2, 160, 64, (32, 32), 3).family(Family::Winograd4),
    // Valid taps: 3×3 on 2×2 planes (16 of 36 taps read the image), 64
    // outputs (AVX-512's blocks); the input gradient has 16 (AVX2's).
    Case::new(8, 16, 64, (2, 2), 3).family(Family::ValidTaps),
    // One image, fewer than the threads: its two blocks shared out.
    Case::new(1, 32, 128, (2, 2), 3).family(Family::ValidTaps),
    // 1×3 planes: three classes of taps (2·1, 3·1, 2·1 of 9), 48 outputs
    // (AVX2's blocks at either level).
    Case::new(6, 24, 48, (1, 3), 3).family(Family::ValidTaps),
    // 5×5 on 3×3 planes (100 of 225 taps), five images in tasks of two
    // and a last one of one.
    Case::new(5, 7, 64, (3, 3), 5).family(Family::ValidTaps),
    // Stride 2 onto 2×2 (16 of 36 taps; the input gradient takes col2im).
    Case::new(4, 8, 64, (3, 3), 3)
        .stride(2)
        .family(Family::ValidTaps),
    // Five output channels: no direct block fits; im2col + the `f64` product.
    Case::new(2, 3, 5, (9, 9), 3).family(Family::Im2col),
];

/// Calls `term(output index, input index, kernel index)` for every product
/// of the convolution's definition, each output's terms in `(c, i, j)` order;
/// taps that fall on the padding have no term.
fn for_each_term(case: Case, mut term: impl FnMut(usize, usize, usize)) {
    let Case {
        n,
        c,
        o,
        h,
        w,
        k: kk,
        pad,
        stride,
        ..
    } = case;
    let (oh, ow) = case.out();
    for b in 0..n {
        for oc in 0..o {
            for (y, xx) in (0..oh).flat_map(|y| (0..ow).map(move |xx| (y, xx))) {
                let out = ((b * o + oc) * oh + y) * ow + xx;
                for ic in 0..c {
                    for (i, j) in (0..kk).flat_map(|i| (0..kk).map(move |j| (i, j))) {
                        let iy = (y * stride + i).checked_sub(pad);
                        let ix = (xx * stride + j).checked_sub(pad);
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

/// `Σ_c,i,j k[o,c,i,j] · x[n,c,y·s+i-pad,x·s+j-pad]` in `f64`, each output's
/// terms added in `(c, i, j)` order (every product of two `f32` is exact).
fn reference(x: &[f32], k: &[f32], case: Case) -> Vec<f64> {
    let (oh, ow) = case.out();
    let mut out = vec![0f64; case.n * case.o * oh * ow];
    for_each_term(case, |oi, xi, ki| {
        out[oi] += f64::from(x[xi]) * f64::from(k[ki])
    });
    out
}

/// The input gradient of the case's convolution for output gradient `g`, in `f64`.
fn reference_input_grad(g: &[f32], k: &[f32], case: Case) -> Vec<f64> {
    let mut dx = vec![0f64; case.n * case.c * case.h * case.w];
    for_each_term(case, |oi, xi, ki| {
        dx[xi] += f64::from(g[oi]) * f64::from(k[ki])
    });
    dx
}

/// The kernel gradient of the case's convolution for input `x` and output
/// gradient `g`, in `f64`.
fn reference_kernel_grad(x: &[f32], g: &[f32], case: Case) -> Vec<f64> {
    let mut dk = vec![0f64; case.o * case.c * case.k * case.k];
    for_each_term(case, |oi, xi, ki| {
        dk[ki] += f64::from(g[oi]) * f64::from(x[xi])
    });
    dk
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

/// The kernel `conv2d` should pick for `case` at `level`.
fn expected_path(level: SimdLevel, case: &Case) -> &'static str {
    let avx512 = level == SimdLevel::Avx512;
    match (case.family, level) {
        (Family::Im2col, _) => {
            if case.c <= 4 {
                "exact"
            } else {
                "im2col"
            }
        }
        (Family::ExactDirect, SimdLevel::Baseline) => "exact",
        (Family::Direct, SimdLevel::Baseline) => "im2col",
        (Family::ExactDirect, _) if avx512 && case.o.is_multiple_of(32) => "exact direct avx512",
        (Family::ExactDirect, _) => "exact direct avx2",
        (Family::Direct, _) if avx512 && case.o.is_multiple_of(64) => "direct avx512",
        (Family::Direct, _) => "direct avx2",
        (Family::Winograd, SimdLevel::Baseline) => "im2col",
        (Family::Winograd, _) if avx512 && case.o.is_multiple_of(64) => "winograd avx512",
        (Family::Winograd, _) => "winograd avx2",
        (Family::Winograd4, SimdLevel::Baseline) => "im2col",
        (Family::Winograd4, _) if avx512 && case.o.is_multiple_of(64) => "winograd 4x4 avx512",
        (Family::Winograd4, _) => "winograd 4x4 avx2",
        (Family::ValidTaps, SimdLevel::Baseline) => "im2col",
        (Family::ValidTaps, _) if avx512 && case.o.is_multiple_of(64) => "valid taps avx512",
        (Family::ValidTaps, _) => "valid taps avx2",
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
        let Case {
            n,
            c,
            o,
            h,
            w,
            k: kk,
            pad,
            stride,
            ..
        } = case;
        let (oh, ow) = case.out();
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
        let want_dk = reference_kernel_grad(&xv, &gv, case);
        // Winograd only for its own cases, so that the other kernels keep
        // their coverage on shapes it would take.
        let winograd_family = matches!(case.family, Family::Winograd | Family::Winograd4);
        cpu::set_winograd(winograd_family);
        cpu::set_winograd_large_tiles(case.family == Family::Winograd4);
        // Output, input gradient and kernel gradient at AVX2 and AVX-512.
        let mut direct: Vec<[Vec<f32>; 3]> = Vec::new();
        for &level in &levels {
            cpu::set_simd_level(level).unwrap();
            let path = cpu::conv2d_path((n, c, h, w), (o, c, kk, kk), pad, stride).unwrap();
            assert_eq!(
                path,
                expected_path(level, &case),
                "case {case:?} at {level:?}"
            );
            let y = cpu::conv2d(&x, &k, pad, stride).unwrap();
            assert_eq!(y.dims(), &[n, o, oh, ow]);
            let y = flat(&y);
            let e = rel_err(&y, &want);
            assert!(
                e <= 1e-5,
                "case {case:?} at {level:?} ({path}): relative error {e}"
            );
            if path.starts_with("valid taps") {
                // Each output's sum runs over channels and taps in the
                // same order whatever the tasks: the same bits on one
                // thread.
                let one = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap();
                let alone = one.install(|| flat(&cpu::conv2d(&x, &k, pad, stride).unwrap()));
                assert_eq!(
                    bits(&alone),
                    bits(&y),
                    "case {case:?} at {level:?}: valid taps on one thread"
                );
            }
            if path.starts_with("exact direct") {
                // The same f64 sums in the same order, rounded once: the
                // definition's value rounded to f32, to the bit.
                let rounded: Vec<f32> = want.iter().map(|&v| v as f32).collect();
                assert_eq!(
                    bits(&y),
                    bits(&rounded),
                    "case {case:?} at {level:?}: exact kernel"
                );
            }
            let dx = flat(&cpu::conv2d_input_grad(&g, &k, (n, c, h, w), pad, stride).unwrap());
            let e = rel_err(&dx, &want_dx);
            assert!(
                e <= 1e-5,
                "case {case:?} at {level:?}: input gradient relative error {e}"
            );
            let kernel_path =
                cpu::conv2d_kernel_grad_path((n, c, h, w), (o, c, kk, kk), pad, stride).unwrap();
            // The kernel gradient's own threshold: tiles ≥ 64 and tiles ×
            // the fewer channels ≥ 32768.
            let tiles = n * h.div_ceil(2) * w.div_ceil(2);
            let winograd = winograd_family
                && level >= SimdLevel::Avx2
                && tiles >= 64
                && tiles * c.min(o) >= 32 * 1024;
            assert_eq!(
                kernel_path,
                if winograd { "winograd" } else { "im2col" },
                "case {case:?} at {level:?}: kernel gradient"
            );
            let kernel_grad =
                || flat(&cpu::conv2d_kernel_grad(&x, &g, (o, c, kk, kk), pad, stride).unwrap());
            let dk = kernel_grad();
            let e = rel_err(&dk, &want_dk);
            assert!(
                e <= 1e-5,
                "case {case:?} at {level:?} ({kernel_path}): kernel gradient relative error {e}"
            );
            if winograd {
                // The same sums in the same order on one thread.
                let one = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap();
                assert_eq!(
                    bits(&one.install(kernel_grad)),
                    bits(&dk),
                    "case {case:?} at {level:?}: kernel gradient on one thread"
                );
            }
            // The inference epilogue gives the bits of the separate ops.
            let fused =
                cpu::conv2d_affine(&x, &k, pad, stride, &scale, &shift, Some(&residual), true)
                    .unwrap();
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
            if level >= SimdLevel::Avx2 && case.family != Family::Im2col {
                direct.push([y, dx, dk]);
            }
        }
        // AVX2 and AVX-512 add the same products in the same order.
        if let [[y2, dx2, dk2], [y5, dx5, dk5]] = &direct[..] {
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
            assert_eq!(
                bits(dk2),
                bits(dk5),
                "case {case:?}: AVX2 and AVX-512 kernel gradients differ"
            );
        }
    }
    cpu::set_simd_level(detected).unwrap();
    cpu::set_winograd(true);
    cpu::set_winograd_large_tiles(true);
}
