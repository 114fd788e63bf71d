//! Structure, initialisation, freezing, parameter groups and train/eval
//! behaviour of the network.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use multilabel_resnet::{Arch, HeadConfig, ResNet, ResNetConfig};

/// A VarBuilder backend that records every requested name and shape and
/// hands out zeros that are not variables, so full-size networks can be
/// checked without initialising tens of millions of values.
#[derive(Default)]
struct Recorder {
    seen: Mutex<BTreeMap<String, Vec<usize>>>,
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.seen
            .lock()
            .unwrap()
            .insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros(s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("recorder has no {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

struct Recorded {
    model: ResNet,
    names: BTreeMap<String, Vec<usize>>,
}

fn record(cfg: &ResNetConfig) -> Recorded {
    let recorder = std::sync::Arc::new(Recorder::default());
    struct Shared(std::sync::Arc<Recorder>);
    impl SimpleBackend for Shared {
        fn get(
            &self,
            s: Shape,
            name: &str,
            h: Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get(s, name, h, dtype, dev)
        }
        fn get_unchecked(&self, name: &str, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
            self.0.get_unchecked(name, d, dev)
        }
        fn contains_tensor(&self, name: &str) -> bool {
            self.0.contains_tensor(name)
        }
    }
    let vb = VarBuilder::from_backend(Box::new(Shared(recorder.clone())), DType::F32, Device::Cpu);
    let model = ResNet::new(cfg, vb, 0).unwrap();
    let names = recorder.seen.lock().unwrap().clone();
    Recorded { model, names }
}

fn arch_keys() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/arch_keys.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn numel(param: &Var) -> usize {
    param.elem_count()
}

/// Every architecture has exactly torchvision's tensor names and shapes
/// (without `fc.*` and `num_batches_tracked`) and its parameter count.
#[test]
fn names_shapes_and_sizes_match_torchvision() {
    let keys = arch_keys();
    for arch in Arch::ALL {
        let reference = &keys[arch.name()];
        let expected: BTreeMap<String, Vec<usize>> = reference["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|pair| {
                let name = pair[0].as_str().unwrap().to_string();
                let shape = pair[1]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                (name, shape)
            })
            .filter(|(name, _)| !name.starts_with("fc."))
            .collect();
        let recorded = record(&ResNetConfig::new(arch, 20));
        let body: BTreeMap<String, Vec<usize>> = recorded
            .names
            .into_iter()
            .filter(|(name, _)| !name.starts_with("head."))
            .collect();
        assert_eq!(body, expected, "{arch}");

        let groups = recorded.model.param_groups();
        let body_params: usize = groups[..2]
            .iter()
            .flat_map(|g| &g.params)
            .map(|p| numel(&p.var))
            .sum();
        let torchvision = reference["num_params"].as_u64().unwrap() as usize;
        let fc = reference["fc_params"].as_u64().unwrap() as usize;
        assert_eq!(body_params, torchvision - fc, "{arch}");
    }
}

/// fastai's `_resnet_split` of ResNet-50 with a 20-class head, with the
/// sizes from the fastai recipe (and PyTorch for the head).
#[test]
fn param_groups_follow_fastai_resnet_split() {
    let recorded = record(&ResNetConfig::new(Arch::ResNet50, 20));
    let groups = recorded.model.param_groups();
    let sizes: Vec<(String, usize, usize)> = groups
        .iter()
        .map(|g| {
            let total = g.params.iter().map(|p| numel(&p.var)).sum();
            let norm = g
                .params
                .iter()
                .filter(|p| p.is_norm)
                .map(|p| numel(&p.var))
                .sum();
            (g.name.clone(), total, norm)
        })
        .collect();
    let head_params = arch_keys()["fastai_head_resnet50_20"]["num_params"]
        .as_u64()
        .unwrap() as usize;
    assert_eq!(
        sizes,
        vec![
            ("stem-layer2".to_string(), 1_444_928, 10_112),
            ("layer3-layer4".to_string(), 22_063_104, 43_008),
            ("head".to_string(), head_params, 9_216),
        ]
    );
    assert_eq!(head_params, 2_116_608);
    // PyTorch's module.parameters() order, and no running statistics.
    let names: Vec<&str> = groups[0].params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        &names[..6],
        &[
            "conv1.weight",
            "bn1.weight",
            "bn1.bias",
            "layer1.0.conv1.weight",
            "layer1.0.bn1.weight",
            "layer1.0.bn1.bias"
        ]
    );
    let head_names: Vec<&str> = groups[2].params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        head_names,
        [
            "head.0.bn.weight",
            "head.0.bn.bias",
            "head.0.linear.weight",
            "head.1.bn.weight",
            "head.1.bn.bias",
            "head.1.linear.weight"
        ]
    );
    for param in groups.iter().flat_map(|g| &g.params) {
        assert!(!param.name.contains("running"), "{}", param.name);
        assert_eq!(param.no_decay, param.is_norm, "{}", param.name);
        assert_eq!(
            param.is_norm,
            param.name.contains("bn") || param.name.contains("downsample.1")
        );
    }
    assert_eq!(recorded.model.buffers().len(), 2 * (53 + 2));
}

fn small_config(ps: f32) -> ResNetConfig {
    ResNetConfig {
        arch: Arch::ResNet18,
        base_width: 4,
        head: HeadConfig {
            n_classes: 3,
            ps,
            hidden: vec![16],
            concat_pool: true,
        },
        kernels: Default::default(),
        tf32: false,
        precision: Default::default(),
    }
}

fn small_model(ps: f32, seed: u64) -> (ResNet, VarMap) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = ResNet::new(&small_config(ps), vb, seed).unwrap();
    (model, varmap)
}

fn image(seed: u64) -> Tensor {
    let n = 4 * 3 * 32 * 32;
    let values: Vec<f32> = (0..n)
        .map(|i| ((i as u64 * 2_654_435_761 + seed * 97) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    Tensor::from_vec(values, (4, 3, 32, 32), &Device::Cpu).unwrap()
}

fn values(var: &Var) -> Vec<f32> {
    var.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
}

/// fastai's `freeze()`: gradients reach exactly the head and every BatchNorm
/// affine parameter; no conv kernel and not the image get one. After
/// `unfreeze()` every parameter gets one.
#[test]
fn freezing_limits_gradients_to_head_and_batch_norms() {
    let (mut model, varmap) = small_model(0.5, 1);
    model.freeze();
    assert!(model.is_frozen());
    let trainable: HashSet<String> = model
        .trainable_params()
        .into_iter()
        .map(|p| p.name)
        .collect();
    let all: Vec<_> = model
        .param_groups()
        .into_iter()
        .flat_map(|g| g.params)
        .collect();
    for param in &all {
        let expected = param.is_norm || param.name.starts_with("head.");
        assert_eq!(trainable.contains(&param.name), expected, "{}", param.name);
    }
    let x = image(0);
    let grads = model
        .forward_t(&x, true)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let vars = varmap.data().lock().unwrap();
    for (name, var) in vars.iter() {
        let has_grad = grads.get(var.as_tensor()).is_some();
        assert_eq!(has_grad, trainable.contains(name), "{name}");
    }
    assert!(grads.get(&x).is_none());
    // Nothing of the image's shape was computed. Besides the variables the
    // store only holds what candle's Mul backward computes for a constant
    // operand: the two dropout masks and the stem BatchNorm's normalised input.
    let var_ids: HashSet<_> = vars.values().map(|v| v.as_tensor().id()).collect();
    let extras: Vec<Vec<usize>> = grads
        .get_ids()
        .filter(|id| !var_ids.contains(id))
        .map(|id| grads.get_id(*id).unwrap().dims().to_vec())
        .collect();
    assert!(extras.len() <= 3, "{extras:?}");
    assert!(
        extras.iter().all(|dims| dims.as_slice() != x.dims()),
        "{extras:?}"
    );
    drop(vars);

    model.unfreeze();
    assert!(!model.is_frozen());
    assert_eq!(model.trainable_params().len(), all.len());
    let grads = model
        .forward_t(&x, true)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for param in &all {
        assert!(grads.get(param.var.as_tensor()).is_some(), "{}", param.name);
    }
}

/// `forward_infer` (each conv fused with its BatchNorm, residual and ReLU)
/// gives the same logits and features as `forward_t(x, false)` once the
/// running statistics are no longer the initial 0/1, for bottleneck and
/// basic blocks, and carries no graph.
#[test]
fn inference_equals_eval_mode() {
    for arch in [Arch::ResNet18, Arch::ResNet50] {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let mut cfg = small_config(0.5);
        cfg.arch = arch;
        let model = ResNet::new(&cfg, vb, 3).unwrap();
        // Two train-mode passes move every running mean and variance.
        for seed in [1, 2] {
            model.forward_t(&image(seed), true).unwrap();
        }
        let x = image(5);
        let eval = model.forward_t(&x, false).unwrap();
        let infer = model.forward_infer(&x).unwrap();
        assert!(!infer.track_op());
        let (a, b): (Vec<f32>, Vec<f32>) = (
            eval.flatten_all().unwrap().to_vec1().unwrap(),
            infer.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(a, b, "{arch:?} logits");
        let eval = model.features_t(&x, false).unwrap();
        let infer = model.features_infer(&x).unwrap();
        assert_eq!(
            eval.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            infer.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{arch:?} features"
        );
    }
}

/// Eval mode uses the running statistics, has no dropout and leaves the
/// statistics alone; train mode updates them, and dropout masks replay from a seed.
#[test]
fn train_and_eval_modes() {
    let (model, varmap) = small_model(0.5, 2);
    let x = image(1);
    let before: Vec<Vec<f32>> = model.buffers().iter().map(|b| values(&b.var)).collect();
    let eval_a = model.forward_t(&x, false).unwrap();
    let eval_b = model.forward_t(&x, false).unwrap();
    assert_eq!(
        eval_a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        eval_b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let after_eval: Vec<Vec<f32>> = model.buffers().iter().map(|b| values(&b.var)).collect();
    assert_eq!(before, after_eval);

    model.set_dropout_seed(7);
    let train_a: Vec<f32> = model
        .forward_t(&x, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let after_train: Vec<Vec<f32>> = model.buffers().iter().map(|b| values(&b.var)).collect();
    assert!(before.iter().zip(&after_train).all(|(b, a)| b != a));
    model.set_dropout_seed(7);
    let train_b: Vec<f32> = model
        .forward_t(&x, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(train_a, train_b, "same dropout seed, same batch statistics");
    model.set_dropout_seed(8);
    let train_c: Vec<f32> = model
        .forward_t(&x, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_ne!(train_a, train_c, "another dropout seed");

    // The updated statistics are what VarMap::save writes.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    varmap.save(&path).unwrap();
    let saved = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    for buffer in model.buffers() {
        let file: Vec<f32> = saved[&buffer.name]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(file, values(&buffer.var), "{}", buffer.name);
    }
    let features = model.features_t(&x, false).unwrap();
    assert_eq!(features.dims(), &[4, 32, 1, 1]);
}

/// Same seed, same network; another seed, another one; initial values follow
/// torchvision (conv kaiming-normal fan-out, BatchNorm 1/0) and fastai (head
/// Linear kaiming-normal fan-in, head BatchNorm 1/1e-3).
#[test]
fn initialisation_is_seeded_and_follows_torchvision_and_fastai() {
    let (_, a) = small_model(0.5, 11);
    let (_, b) = small_model(0.5, 11);
    let (_, c) = small_model(0.5, 12);
    let get = |m: &VarMap, name: &str| values(&m.data().lock().unwrap()[name]);
    for name in [
        "conv1.weight",
        "layer4.1.conv2.weight",
        "head.0.linear.weight",
    ] {
        assert_eq!(get(&a, name), get(&b, name), "{name}");
        assert_ne!(get(&a, name), get(&c, name), "{name}");
    }
    let std = |v: &[f32]| {
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt()
    };
    // layer4.1.conv2: [32, 32, 3, 3], fan_out = 288.
    let conv = get(&a, "layer4.1.conv2.weight");
    let expected = (2.0f32 / 288.0).sqrt();
    assert!((std(&conv) / expected - 1.0).abs() < 0.05, "{}", std(&conv));
    // head.0.linear: [16, 64], fan_in = 64.
    let linear = get(&a, "head.0.linear.weight");
    let expected = (2.0f32 / 64.0).sqrt();
    assert!(
        (std(&linear) / expected - 1.0).abs() < 0.1,
        "{}",
        std(&linear)
    );
    assert!(get(&a, "layer2.0.bn1.weight").iter().all(|&v| v == 1.0));
    assert!(get(&a, "layer2.0.bn1.bias").iter().all(|&v| v == 0.0));
    assert!(get(&a, "head.1.bn.weight").iter().all(|&v| v == 1.0));
    assert!(get(&a, "head.1.bn.bias").iter().all(|&v| v == 1e-3));
    assert!(get(&a, "head.1.bn.running_var").iter().all(|&v| v == 1.0));
    assert!(
        get(&a, "layer3.0.downsample.1.running_mean")
            .iter()
            .all(|&v| v == 0.0)
    );
}

#[test]
fn arch_names_and_config_serde() {
    for (text, arch) in [
        ("resnet18", Arch::ResNet18),
        ("ResNet-34", Arch::ResNet34),
        ("resnet50", Arch::ResNet50),
        ("resnet_101", Arch::ResNet101),
        ("RESNET152", Arch::ResNet152),
    ] {
        assert_eq!(text.parse::<Arch>().unwrap(), arch);
        assert_eq!(arch.to_string().parse::<Arch>().unwrap(), arch);
    }
    let err = "resnet51".parse::<Arch>().unwrap_err().to_string();
    assert!(
        err.contains("resnet51") && err.contains("resnet50"),
        "{err}"
    );

    let cfg = ResNetConfig::new(Arch::ResNet50, 20);
    let json = serde_json::to_string(&cfg).unwrap();
    assert!(json.contains("\"resnet50\""), "{json}");
    assert_eq!(serde_json::from_str::<ResNetConfig>(&json).unwrap(), cfg);
    let minimal: ResNetConfig =
        serde_json::from_str(r#"{"arch":"resnet34","head":{"n_classes":3}}"#).unwrap();
    assert_eq!(minimal, ResNetConfig::new(Arch::ResNet34, 3));
    // TF32 is saved only when asked for, and read back.
    assert!(!json.contains("tf32"), "{json}");
    let tf32 = ResNetConfig {
        tf32: true,
        ..cfg.clone()
    };
    let json = serde_json::to_string(&tf32).unwrap();
    assert!(json.contains("\"tf32\":true"), "{json}");
    assert_eq!(serde_json::from_str::<ResNetConfig>(&json).unwrap(), tf32);
    assert_eq!(cfg.num_features(), 2048);
    assert_eq!(cfg.head.dropouts(), vec![0.25, 0.5]);

    let mut bad = small_config(1.5);
    let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
    let err = ResNet::new(&bad, vb, 0).unwrap_err().to_string();
    assert!(err.contains("ps"), "{err}");
    bad.head.ps = 0.5;
    bad.base_width = 0;
    let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
    assert!(ResNet::new(&bad, vb, 0).is_err());
}

/// Train-mode BatchNorm needs more than one value per channel, as in PyTorch.
#[test]
fn single_sample_train_batch_is_an_error() {
    let (model, _) = small_model(0.0, 4);
    let x = image(3).narrow(0, 0, 1).unwrap();
    let err = model.forward_t(&x, true).unwrap_err().to_string();
    assert!(err.contains("more than one value per channel"), "{err}");
    assert_eq!(model.forward_t(&x, false).unwrap().dims(), &[1, 3]);
}

/// `ResNet` is a `candle_nn::ModuleT`: `apply_t` and a trait object give
/// the same logits as `forward_t`, in eval and (with dropout off) train mode.
#[test]
fn resnet_is_a_candle_module() {
    use candle_nn::ModuleT;
    let (model, _varmap) = small_model(0.0, 5);
    let x = image(2);
    for train in [false, true] {
        let direct = model.forward_t(&x, train).unwrap();
        let applied = x.apply_t(&model, train).unwrap();
        let module: &dyn ModuleT = &model;
        let dynamic = module.forward_t(&x, train).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(direct.dims(), &[4, 3]);
        assert_eq!(flat(&direct), flat(&applied), "train {train}");
        assert_eq!(flat(&direct), flat(&dynamic), "train {train}");
    }
}
