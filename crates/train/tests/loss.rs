//! Stable BCE-with-logits against PyTorch's documented formula
//! (values from fixtures/make_golden.py, `loss_cases`).

mod common;

use candle_core::{Device, Tensor, Var};
use common::{assert_close, flat_f32, golden};
use multilabel_train::loss::bce_with_logits;

fn inputs() -> (Var, Tensor, Tensor, serde_json::Value) {
    let g = golden()["loss"].clone();
    let x = flat_f32(&g["logits"]);
    let y = flat_f32(&g["targets"]);
    let pw = flat_f32(&g["pos_weight"]);
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::from_vec(x, (4, 5), &dev).unwrap()).unwrap();
    let y = Tensor::from_vec(y, (4, 5), &dev).unwrap();
    let pw = Tensor::from_vec(pw, 5, &dev).unwrap();
    (x, y, pw, g)
}

#[test]
fn loss_and_gradient_match_pytorch_formula_with_extreme_logits() {
    let (x, y, _, g) = inputs();
    let loss = bce_with_logits(x.as_tensor(), &y, None).unwrap();
    let value = loss.to_vec0::<f32>().unwrap();
    assert!(value.is_finite());
    assert_close(
        &[value],
        &[g["loss"].as_f64().unwrap() as f32],
        1e-6,
        "loss",
    );
    let grads = loss.backward().unwrap();
    let grad = grads
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(grad.iter().all(|v| v.is_finite()));
    assert_close(&grad, &flat_f32(&g["grad"]), 1e-5, "grad");
}

#[test]
fn gradient_is_sigmoid_minus_target_over_numel() {
    // Includes x = 0 (where max(x, 0) has a kink) and x = ±100.
    let (x, y, _, _) = inputs();
    let loss = bce_with_logits(x.as_tensor(), &y, None).unwrap();
    let grads = loss.backward().unwrap();
    let grad = grads
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let xs = x
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let ys = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let expected: Vec<f32> = xs
        .iter()
        .zip(&ys)
        .map(|(&x, &y)| (1.0 / (1.0 + (-x).exp()) - y) / 20.0)
        .collect();
    assert_close(&grad, &expected, 1e-6, "grad");
}

#[test]
fn pos_weight_matches_pytorch_formula() {
    let (x, y, pw, g) = inputs();
    let loss = bce_with_logits(x.as_tensor(), &y, Some(&pw)).unwrap();
    let value = loss.to_vec0::<f32>().unwrap();
    assert_close(
        &[value],
        &[g["loss_pos_weight"].as_f64().unwrap() as f32],
        1e-6,
        "loss",
    );
    let grads = loss.backward().unwrap();
    let grad = grads
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_close(&grad, &flat_f32(&g["grad_pos_weight"]), 1e-5, "grad");
}

#[test]
fn naive_formula_is_not_finite_where_ours_is() {
    // The reason this module exists: log(sigmoid(x)) underflows at x = -100.
    let dev = Device::Cpu;
    let x = Tensor::new(&[[-100f32, 100.0]], &dev).unwrap();
    let y = Tensor::new(&[[1f32, 0.0]], &dev).unwrap();
    let naive = candle_nn::loss::binary_cross_entropy_with_logit(&x, &y).unwrap();
    assert!(!naive.to_vec0::<f32>().unwrap().is_finite());
    let ours = bce_with_logits(&x, &y, None)
        .unwrap()
        .to_vec0::<f32>()
        .unwrap();
    assert!((ours - 100.0).abs() < 1e-4, "{ours}");
}

#[test]
fn mismatched_shapes_are_an_error() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
    let y = Tensor::zeros((2, 4), candle_core::DType::F32, &dev).unwrap();
    let err = bce_with_logits(&x, &y, None).unwrap_err().to_string();
    assert!(err.contains("[2, 3]") && err.contains("[2, 4]"), "{err}");
}
