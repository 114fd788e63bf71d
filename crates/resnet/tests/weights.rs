//! Loading pretrained body weights from safetensors files.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use multilabel_resnet::{
    Arch, HeadConfig, ResNet, ResNetConfig, ResNetError, WeightsSource, load_pretrained,
};

fn config() -> ResNetConfig {
    ResNetConfig {
        arch: Arch::ResNet18,
        base_width: 4,
        head: HeadConfig {
            n_classes: 3,
            ps: 0.5,
            hidden: vec![8],
            concat_pool: true,
        },
        kernels: Default::default(),
        tf32: false,
        precision: Default::default(),
    }
}

fn build(seed: u64) -> (ResNet, VarMap) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    (ResNet::new(&config(), vb, seed).unwrap(), varmap)
}

/// The body tensors of `varmap` as a torchvision/timm checkpoint would hold
/// them: with an ImageNet `fc` and `num_batches_tracked` counters.
fn checkpoint(varmap: &VarMap) -> HashMap<String, Tensor> {
    let mut tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(name, _)| !name.starts_with("head."))
        .map(|(name, var)| (name.clone(), var.as_tensor().copy().unwrap()))
        .collect();
    let counters: Vec<String> = tensors
        .keys()
        .filter(|n| n.ends_with("running_mean"))
        .map(|n| n.replace("running_mean", "num_batches_tracked"))
        .collect();
    for name in counters {
        tensors.insert(name, Tensor::new(7i64, &Device::Cpu).unwrap());
    }
    tensors.insert(
        "fc.weight".into(),
        Tensor::zeros((1000, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    tensors.insert(
        "fc.bias".into(),
        Tensor::zeros(1000, DType::F32, &Device::Cpu).unwrap(),
    );
    tensors
}

fn snapshot(varmap: &VarMap) -> HashMap<String, Vec<f32>> {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
}

fn save(tensors: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

/// Body tensors are copied, the head keeps its own initialisation, `fc.*`
/// and `num_batches_tracked` are skipped and reported.
#[test]
fn loads_torchvision_names_and_skips_classifier() {
    let (_, source) = build(1);
    let (_, target) = build(2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet.safetensors");
    save(&checkpoint(&source), &path);
    let head_before = snapshot(&target);

    let report = load_pretrained(&target, &WeightsSource::File(path.clone())).unwrap();
    let (want, got) = (snapshot(&source), snapshot(&target));
    for (name, values) in &got {
        if name.starts_with("head.") {
            assert_eq!(
                values, &head_before[name],
                "{name} must keep its initialisation"
            );
        } else {
            assert_eq!(values, &want[name], "{name}");
        }
    }
    assert_eq!(report.path.as_deref(), Some(path.as_path()));
    assert_eq!(
        report.loaded.len(),
        got.keys().filter(|n| !n.starts_with("head.")).count()
    );
    assert!(report.skipped.contains(&"fc.weight".to_string()));
    assert!(
        report
            .skipped
            .contains(&"bn1.num_batches_tracked".to_string())
    );
    assert!(!report.mapped_from_transformers);
    let none = load_pretrained(&target, &WeightsSource::None).unwrap();
    assert!(none.loaded.is_empty());
}

/// Half-precision files load into f32 variables.
#[test]
fn converts_dtype_on_load() {
    let (_, source) = build(3);
    let (_, target) = build(4);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("half.safetensors");
    let half: HashMap<String, Tensor> = checkpoint(&source)
        .into_iter()
        .map(|(n, t)| {
            let t = if t.dtype() == DType::F32 {
                t.to_dtype(DType::F16).unwrap()
            } else {
                t
            };
            (n, t)
        })
        .collect();
    save(&half, &path);
    load_pretrained(&target, &WeightsSource::File(path)).unwrap();
    let (want, got) = (snapshot(&source), snapshot(&target));
    let conv = &got["layer1.0.conv1.weight"];
    assert_eq!(
        target.data().lock().unwrap()["conv1.weight"].dtype(),
        DType::F32
    );
    for (a, b) in conv.iter().zip(&want["layer1.0.conv1.weight"]) {
        assert!((a - b).abs() <= 1e-3 * b.abs().max(1e-2), "{a} vs {b}");
    }
}

/// A file that does not fit names every missing, unexpected and mis-shaped
/// tensor, and changes nothing.
#[test]
fn mismatch_lists_every_problem_and_loads_nothing() {
    let (_, source) = build(5);
    let (_, target) = build(6);
    let mut tensors = checkpoint(&source);
    tensors.remove("layer2.1.conv2.weight");
    tensors.insert(
        "layer5.0.conv1.weight".into(),
        Tensor::zeros((4, 4, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    tensors.insert(
        "layer1.0.bn1.weight".into(),
        Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    save(&tensors, &path);
    let before = snapshot(&target);
    let err = load_pretrained(&target, &WeightsSource::File(path)).unwrap_err();
    match &err {
        ResNetError::WeightsMismatch {
            missing,
            unexpected,
            mis_shaped,
            ..
        } => {
            assert_eq!(missing, &["layer2.1.conv2.weight".to_string()]);
            assert_eq!(unexpected, &["layer5.0.conv1.weight".to_string()]);
            assert_eq!(
                mis_shaped,
                &[("layer1.0.bn1.weight".to_string(), vec![4], vec![5])]
            );
        }
        other => panic!("unexpected error {other}"),
    }
    let message = err.to_string();
    for name in [
        "layer2.1.conv2.weight",
        "layer5.0.conv1.weight",
        "layer1.0.bn1.weight",
    ] {
        assert!(message.contains(name), "{message}");
    }
    assert_eq!(snapshot(&target), before);

    let missing_file = load_pretrained(
        &target,
        &WeightsSource::File("/nonexistent.safetensors".into()),
    );
    let message = missing_file.unwrap_err().to_string();
    assert!(message.contains("/nonexistent.safetensors"), "{message}");
}

/// `microsoft/resnet-50`-style names (transformers' ResNetModel) are mapped.
#[test]
fn loads_transformers_names() {
    let (_, source) = build(7);
    let (_, target) = build(8);
    let renamed: HashMap<String, Tensor> = checkpoint(&source)
        .into_iter()
        .filter(|(name, _)| !name.starts_with("fc."))
        .map(|(name, t)| (to_transformers(&name), t))
        .chain([(
            "classifier.1.weight".to_string(),
            Tensor::zeros((1000, 32), DType::F32, &Device::Cpu).unwrap(),
        )])
        .collect();
    assert!(renamed.contains_key("resnet.encoder.stages.1.layers.0.shortcut.convolution.weight"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hf.safetensors");
    save(&renamed, &path);
    let report = load_pretrained(&target, &WeightsSource::File(path)).unwrap();
    assert!(report.mapped_from_transformers);
    assert!(report.skipped.contains(&"classifier.1.weight".to_string()));
    let (want, got) = (snapshot(&source), snapshot(&target));
    for (name, values) in &got {
        if !name.starts_with("head.") {
            assert_eq!(values, &want[name], "{name}");
        }
    }
}

/// torchvision name → transformers name, written independently of the crate's mapping.
fn to_transformers(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("conv1.") {
        return format!("resnet.embedder.embedder.convolution.{rest}");
    }
    if let Some(rest) = name.strip_prefix("bn1.") {
        return format!("resnet.embedder.embedder.normalization.{rest}");
    }
    let parts: Vec<&str> = name.split('.').collect();
    let stage: usize = parts[0].trim_start_matches("layer").parse().unwrap();
    let block = parts[1];
    let prefix = format!("resnet.encoder.stages.{}.layers.{block}", stage - 1);
    let tensor = parts[parts.len() - 1];
    match parts[2] {
        "downsample" if parts[3] == "0" => format!("{prefix}.shortcut.convolution.{tensor}"),
        "downsample" => format!("{prefix}.shortcut.normalization.{tensor}"),
        layer => {
            let j: usize = layer[layer.len() - 1..].parse().unwrap();
            let kind = if layer.starts_with("conv") {
                "convolution"
            } else {
                "normalization"
            };
            format!("{prefix}.layer.{}.{kind}.{tensor}", j - 1)
        }
    }
}

/// A ResNet built under a prefix in a larger model loads the same weights
/// as one at the root, and the model's other variables are left alone; a
/// prefix with no network under it is an error naming it.
#[test]
fn loads_a_network_under_a_prefix_and_leaves_the_rest_alone() {
    use multilabel_resnet::load_pretrained_at;

    let (_, source) = build(1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet.safetensors");
    save(&checkpoint(&source), &path);
    let weights = WeightsSource::File(path);

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let _model = ResNet::new(&config(), vb.pp("backbone"), 2).unwrap();
    let other = vb
        .pp("extra")
        .get_with_hints(4, "scale", candle_nn::Init::Const(0.5))
        .unwrap();
    let report = load_pretrained_at(&varmap, "backbone", &weights).unwrap();
    let (want, got) = (snapshot(&source), snapshot(&varmap));
    for (name, values) in &want {
        if !name.starts_with("head.") {
            assert_eq!(&got[&format!("backbone.{name}")], values, "{name}");
        }
    }
    assert!(report.loaded.iter().all(|n| !n.starts_with("backbone.")));
    assert_eq!(
        report.loaded.len(),
        want.keys().filter(|n| !n.starts_with("head.")).count()
    );
    assert_eq!(other.to_vec1::<f32>().unwrap(), [0.5; 4]);

    let err = load_pretrained_at(&varmap, "trunk", &weights).unwrap_err();
    assert!(err.to_string().contains("`trunk.…`"), "{err}");
    // At the root, the other part of the model is missing from the file.
    let err = load_pretrained_at(&varmap, "", &weights).unwrap_err();
    assert!(matches!(err, ResNetError::WeightsMismatch { .. }), "{err}");
}
