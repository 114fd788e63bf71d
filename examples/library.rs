//! The README's library example: fastai's chapter-6 recipe from Rust code.
//! Run with `cargo run --release --example library` once PASCAL 2007 is in
//! `data/pascal_2007` and the hub (or its cache) is reachable.

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use multilabel_data::{Dataset, DatasetConfig, Loader, LoaderConfig, TransformConfig};
use multilabel_resnet::{Arch, ResNet, ResNetConfig, WeightsSource, load_pretrained};
use multilabel_train::{FineTune, Learner, LearnerConfig, metrics};

fn main() -> anyhow::Result<()> {
    let device = Device::Cpu;
    let data = Dataset::load(&DatasetConfig::new("data/pascal_2007"))?;
    let n_classes = data.vocab().len();
    let transform = TransformConfig::default(); // 128 px, min_scale 0.35, ImageNet stats
    let train = Loader::new(
        data.train().to_vec(),
        n_classes,
        transform.clone(),
        LoaderConfig::train(64, 42),
        device.clone(),
    );
    let valid = Loader::new(
        data.valid().to_vec(),
        n_classes,
        transform,
        LoaderConfig::valid(64),
        device.clone(),
    );

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let model = ResNet::new(&ResNetConfig::new(Arch::ResNet50, n_classes), vb, 42)?;
    load_pretrained(
        &varmap,
        &WeightsSource::Hub {
            repo: "timm/resnet50.tv_in1k".into(),
            offline: false,
        },
    )?;

    let mut learner = Learner::new(
        model,
        varmap,
        train,
        valid,
        LearnerConfig::default(),
        device,
    )?;
    learner.fine_tune(&FineTune {
        freeze_epochs: 3,
        ..FineTune::new(3, 3e-3)
    })?;
    // The last epoch's validation predictions, without a second pass.
    let preds = learner.take_valid_preds()?;
    let sweep =
        metrics::threshold_sweep(&preds.probs, &preds.targets, &metrics::default_thresholds())?;
    println!("{:?}", metrics::best_threshold(&sweep));
    Ok(())
}
