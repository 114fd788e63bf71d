//! The fused Adam update on a CUDA device against the same update on the
//! CPU (which is bit-identical to the candle-op path). Built only with the
//! `cuda` feature; a machine without a GPU fails it (`bench/gpu/run.sh`
//! runs it on the borrowed GPU machine).
#![cfg(feature = "cuda")]

use candle_core::{Device, Tensor, Var};
use multilabel_train::{Adam, AdamConfig, OptGroup, OptParam, StepHypers};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// Five steps of a two-group optimizer (one decayed weight, one norm
/// parameter) on `device`; the parameters after each step.
fn run(device: &Device) -> Vec<Vec<f32>> {
    let w = Var::from_vec(values(70_001, 1), 70_001, device).unwrap();
    let b = Var::from_vec(values(33, 2), 33, device).unwrap();
    let group = |name: &str, var: &Var, no_decay| OptGroup {
        name: name.into(),
        params: vec![OptParam {
            name: name.into(),
            var: var.clone(),
            no_decay,
        }],
    };
    let mut adam = Adam::new(
        vec![group("w", &w, false), group("b", &b, true)],
        AdamConfig::default(),
    )
    .unwrap();
    let mut out = Vec::new();
    for step in 0..5u64 {
        let tw = Tensor::from_vec(values(70_001, 10 + step), 70_001, device).unwrap();
        let tb = Tensor::from_vec(values(33, 20 + step), 33, device).unwrap();
        let loss = ((w.as_tensor() * &tw).unwrap().sum_all().unwrap()
            + (b.as_tensor().sqr().unwrap() * &tb)
                .unwrap()
                .sum_all()
                .unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let hypers = StepHypers {
            lrs: vec![1e-3, 3e-3],
            mom: 0.95 - 0.01 * step as f64,
        };
        adam.step(&grads, &hypers).unwrap();
        for v in [&w, &b] {
            out.push(v.as_tensor().to_vec1::<f32>().unwrap());
        }
    }
    out
}

#[test]
fn fused_adam_on_cuda_matches_the_cpu() {
    assert_gpu_matches_cpu(run);
}

/// `run` on the GPU and on the CPU gives the same tensors up to rounding
/// (the GPU may fuse a multiply and an add): max error ≤ 1e-5 of each
/// tensor's largest magnitude.
fn assert_gpu_matches_cpu(run: impl Fn(&Device) -> Vec<Vec<f32>>) {
    let gpu = Device::new_cuda(0).expect("a CUDA GPU: this test runs only where one is present");
    let (on_gpu, on_cpu) = (run(&gpu), run(&Device::Cpu));
    for (k, (g, c)) in on_gpu.iter().zip(&on_cpu).enumerate() {
        let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = g.iter().zip(c).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= 1e-5 * scale,
            "tensor {k}: max error {err} (scale {scale})"
        );
    }
}

/// Many parameters at once (the multi-tensor launch takes 32 at a time):
/// 45 tensors of awkward sizes around the kernel's 4,096-value chunks, two
/// groups, some without weight decay, and one left out of every other step
/// (so its bias correction differs from its neighbours'); three steps on
/// the GPU against the CPU.
#[test]
fn fused_adam_many_parameters() {
    let run = |device: &Device| -> Vec<Vec<f32>> {
        let sizes: Vec<usize> = (0..45)
            .map(|i| [1, 33, 4095, 4096, 4097, 9000, 12_289][i % 7] + i)
            .collect();
        let vars: Vec<Var> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Var::from_vec(values(n, 100 + i as u64), n, device).unwrap())
            .collect();
        let group = |name: &str, range: std::ops::Range<usize>| OptGroup {
            name: name.into(),
            params: range
                .map(|i| OptParam {
                    name: format!("p{i}"),
                    var: vars[i].clone(),
                    no_decay: i % 3 == 0,
                })
                .collect(),
        };
        let mut adam = Adam::new(
            vec![group("body", 0..30), group("head", 30..45)],
            AdamConfig::default(),
        )
        .unwrap();
        for step in 0..3u64 {
            let mut loss = Tensor::zeros((), candle_core::DType::F32, device).unwrap();
            for (i, (var, &n)) in vars.iter().zip(&sizes).enumerate() {
                // p7 gets a gradient only on even steps.
                if i == 7 && step % 2 == 1 {
                    continue;
                }
                let t = Tensor::from_vec(values(n, 1000 * step + i as u64), n, device).unwrap();
                loss = (loss + (var.as_tensor() * &t).unwrap().sum_all().unwrap()).unwrap();
            }
            let grads = loss.backward().unwrap();
            let hypers = StepHypers {
                lrs: vec![2e-3, 1e-2],
                mom: 0.9 + 0.01 * step as f64,
            };
            adam.step(&grads, &hypers).unwrap();
        }
        vars.iter()
            .map(|v| v.as_tensor().to_vec1::<f32>().unwrap())
            .collect()
    };
    assert_gpu_matches_cpu(run);
}
