//! fastai Adam against the numpy transcription in fixtures/make_golden.py
//! (`adam_case`): two groups, scheduled mom, no-decay bias, a step where one
//! parameter has no gradient.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, flat_f32, golden};
use multilabel_train::optim::{Adam, AdamConfig, OptGroup, OptParam, StepHypers};

fn shape_of(v: &serde_json::Value) -> Vec<usize> {
    match v {
        serde_json::Value::Array(items) => {
            let mut s = vec![items.len()];
            s.extend(shape_of(&items[0]));
            s
        }
        _ => vec![],
    }
}

fn tensor(v: &serde_json::Value) -> Tensor {
    Tensor::from_vec(flat_f32(v), shape_of(v), &Device::Cpu).unwrap()
}

fn build() -> (Adam, Vec<OptParam>, serde_json::Value) {
    let g = golden()["adam"].clone();
    let mut groups = vec![
        OptGroup {
            name: "body".into(),
            params: vec![],
        },
        OptGroup {
            name: "head".into(),
            params: vec![],
        },
    ];
    let mut all = Vec::new();
    for p in g["params"].as_array().unwrap() {
        let param = OptParam {
            name: p["name"].as_str().unwrap().into(),
            var: Var::from_tensor(&tensor(&p["value"])).unwrap(),
            no_decay: p["no_decay"].as_bool().unwrap(),
        };
        groups[p["group"].as_u64().unwrap() as usize]
            .params
            .push(param.clone());
        all.push(param);
    }
    (Adam::new(groups, AdamConfig::default()).unwrap(), all, g)
}

fn grad_store(params: &[OptParam], grads: &serde_json::Value) -> GradStore {
    // A GradStore can only be made by backward(): sum(p * g) has gradient g.
    let mut total: Option<Tensor> = None;
    for p in params {
        if let Some(g) = grads.get(&p.name) {
            let term = (p.var.as_tensor() * tensor(g)).unwrap().sum_all().unwrap();
            total = Some(match total {
                Some(t) => (t + term).unwrap(),
                None => term,
            });
        }
    }
    total.unwrap().backward().unwrap()
}

#[test]
fn adam_steps_match_fastai_update_rule() {
    let (mut adam, params, g) = build();
    for (k, step) in g["steps"].as_array().unwrap().iter().enumerate() {
        let grads = grad_store(&params, &step["grads"]);
        let hypers = StepHypers {
            lrs: step["lrs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect(),
            mom: step["mom"].as_f64().unwrap(),
        };
        adam.step(&grads, &hypers).unwrap();
        for p in &params {
            let actual = p
                .var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let expected = flat_f32(&step["after"][&p.name]);
            assert_close(&actual, &expected, 2e-5, &format!("step {k} {}", p.name));
        }
    }
    // Step counts: the bias skipped one step.
    assert_eq!(adam.param_state("body.weight").unwrap().step, 4);
    assert_eq!(adam.param_state("body.bn.bias").unwrap().step, 3);
    let final_state = &g["final_state"]["head.weight"];
    let avg = adam
        .param_state("head.weight")
        .unwrap()
        .sqr_avg
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_close(&avg, &flat_f32(&final_state["sqr_avg"]), 1e-5, "sqr_avg");
}

#[test]
fn exported_state_round_trips_and_continues_identically() {
    let (mut a, params_a, g) = build();
    let steps = g["steps"].as_array().unwrap();
    let hypers = |s: &serde_json::Value| StepHypers {
        lrs: s["lrs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect(),
        mom: s["mom"].as_f64().unwrap(),
    };
    for s in &steps[..2] {
        a.step(&grad_store(&params_a, &s["grads"]), &hypers(s))
            .unwrap();
    }
    // A second optimizer over copies of the parameters, loaded from the export.
    let (mut b, params_b, _) = build();
    for (pa, pb) in params_a.iter().zip(&params_b) {
        pb.var.set(pa.var.as_tensor()).unwrap();
    }
    let exported = a.export_state();
    assert_eq!(exported.tensors.len(), 6);
    b.import_state(&exported).unwrap();
    for s in &steps[2..] {
        a.step(&grad_store(&params_a, &s["grads"]), &hypers(s))
            .unwrap();
        b.step(&grad_store(&params_b, &s["grads"]), &hypers(s))
            .unwrap();
    }
    for (pa, pb) in params_a.iter().zip(&params_b) {
        let va = pa
            .var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let vb = pb
            .var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(va, vb, "{}", pa.name);
    }
}

#[test]
fn clear_state_restarts_moments_and_bad_state_is_rejected() {
    let (mut adam, params, g) = build();
    let s0 = &g["steps"][0];
    let hypers = StepHypers {
        lrs: vec![1e-2, 1e-1],
        mom: 0.95,
    };
    adam.step(&grad_store(&params, &s0["grads"]), &hypers)
        .unwrap();
    assert!(adam.param_state("head.weight").is_some());
    adam.clear_state();
    assert!(adam.param_state("head.weight").is_none());
    assert!(adam.export_state().tensors.is_empty());

    let mut bad = multilabel_train::optim::AdamState::default();
    bad.steps.insert("head.weight".into(), 1);
    bad.tensors.insert(
        "head.weight.grad_avg".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    bad.tensors.insert(
        "head.weight.sqr_avg".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = adam.import_state(&bad).unwrap_err().to_string();
    assert!(err.contains("head.weight.grad_avg"), "{err}");
    let wrong_lrs = StepHypers {
        lrs: vec![1e-2],
        mom: 0.9,
    };
    assert!(
        adam.step(&grad_store(&params, &s0["grads"]), &wrong_lrs)
            .is_err()
    );
}

#[test]
fn frozen_parameter_without_gradient_is_untouched_even_by_weight_decay() {
    let (mut adam, params, g) = build();
    let before = params[0]
        .var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    // Only head.weight gets a gradient.
    let mut grads = serde_json::Map::new();
    grads.insert(
        "head.weight".into(),
        g["steps"][0]["grads"]["head.weight"].clone(),
    );
    adam.step(
        &grad_store(&params, &serde_json::Value::Object(grads)),
        &StepHypers {
            lrs: vec![1.0, 1e-2],
            mom: 0.9,
        },
    )
    .unwrap();
    let after = params[0]
        .var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(before, after);
    assert!(adam.param_state("body.weight").is_none());
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// A small least-squares problem: `loss = Σ (x·W + b − y)²`, minimum 0.
fn regression(w: &Var, b: &Var) -> Tensor {
    let device = Device::Cpu;
    let x = Tensor::arange(0f32, 24.0, &device)
        .unwrap()
        .reshape((6, 4))
        .unwrap()
        .affine(0.1, -1.0)
        .unwrap();
    // Targets a linear map can reach exactly, so the loss can go to zero.
    let w_true = Tensor::arange(0f32, 12.0, &device)
        .unwrap()
        .reshape((4, 3))
        .unwrap()
        .cos()
        .unwrap();
    let y = x.matmul(&w_true).unwrap().affine(1.0, 0.3).unwrap();
    let pred = x
        .matmul(w.as_tensor())
        .unwrap()
        .broadcast_add(b.as_tensor())
        .unwrap();
    (pred - y).unwrap().sqr().unwrap().sum_all().unwrap()
}

fn regression_vars() -> (Var, Var) {
    let device = Device::Cpu;
    let w = Tensor::arange(0f32, 12.0, &device)
        .unwrap()
        .reshape((4, 3))
        .unwrap()
        .sin()
        .unwrap();
    let b = Tensor::new(&[0.5f32, -0.25, 0.125], &device).unwrap();
    (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap())
}

/// Through `candle_nn::Optimizer`, Adam steps exactly as its group API does
/// with one group, the bias (rank 1) exempt from weight decay, and the
/// trait's learning rate and β1; `set_learning_rate` takes effect.
#[test]
fn adam_as_a_candle_optimizer_steps_like_the_group_api() {
    use candle_nn::Optimizer;
    use multilabel_train::AdamParams;

    let config = AdamParams {
        lr: 0.05,
        mom: 0.85,
        adam: AdamConfig {
            wd: 0.1,
            ..AdamConfig::default()
        },
    };
    let (w1, b1) = regression_vars();
    let mut ours = <Adam as Optimizer>::new(vec![w1.clone(), b1.clone()], config).unwrap();
    assert_eq!(ours.learning_rate(), 0.05);

    let (w2, b2) = regression_vars();
    let param = |name: &str, var: &Var, no_decay| OptParam {
        name: name.into(),
        var: var.clone(),
        no_decay,
    };
    let group = OptGroup {
        name: "all".into(),
        params: vec![param("w", &w2, false), param("b", &b2, true)],
    };
    let mut reference = Adam::new(vec![group], config.adam).unwrap();
    for step in 0..6 {
        let lr = if step < 3 { 0.05 } else { 0.02 };
        if step == 3 {
            ours.set_learning_rate(lr);
            assert_eq!(ours.learning_rate(), lr);
        }
        ours.backward_step(&regression(&w1, &b1)).unwrap();
        let grads = regression(&w2, &b2).backward().unwrap();
        let hypers = StepHypers {
            lrs: vec![lr],
            mom: config.mom,
        };
        reference.step(&grads, &hypers).unwrap();
    }
    assert_eq!(values(w1.as_tensor()), values(w2.as_tensor()));
    assert_eq!(values(b1.as_tensor()), values(b2.as_tensor()));
    assert_ne!(
        values(w1.as_tensor()),
        values(regression_vars().0.as_tensor())
    );
}

/// Adam in a training loop written for any candle optimizer: the loss falls.
#[test]
fn adam_trains_in_a_generic_candle_loop() {
    use candle_nn::Optimizer;

    fn fit<O: Optimizer>(opt: &mut O, w: &Var, b: &Var, steps: usize) -> Vec<f32> {
        (0..steps)
            .map(|_| {
                let loss = regression(w, b);
                opt.backward_step(&loss).unwrap();
                loss.to_scalar::<f32>().unwrap()
            })
            .collect()
    }
    let (w, b) = regression_vars();
    let params = multilabel_train::AdamParams {
        lr: 0.05,
        ..Default::default()
    };
    let mut opt = Adam::from_slice(&[&w, &b], params).unwrap();
    let losses = fit(&mut opt, &w, &b, 200);
    assert!(
        losses[199] < 0.01 * losses[0],
        "loss {} -> {}",
        losses[0],
        losses[199]
    );
}
