//! The loader: shapes, order, targets, determinism across thread counts,
//! errors.

mod common;

use candle_core::Device;
use multilabel_data::{
    Augment, Batch, DataError, Dataset, DatasetConfig, Item, Loader, LoaderConfig, TransformConfig,
    load_image_for_eval,
};

const CSV: &str = "fname,labels,is_valid\n\
a.png,dog cat,False\n\
b.png,,False\n\
c.png,person,False\n\
d.png,cat,False\n\
e.png,dog person,False\n\
f.png,cat,True\n\
g.png,dog,True\n\
h.png,person cat,True\n";
const IMAGES: &[&str] = &[
    "a.png", "b.png", "c.png", "d.png", "e.png", "f.png", "g.png", "h.png",
];

fn dataset() -> (tempfile::TempDir, Dataset) {
    let dir = tempfile::tempdir().unwrap();
    common::make_dataset(dir.path(), CSV, IMAGES);
    let data = Dataset::load(&DatasetConfig::new(dir.path())).unwrap();
    (dir, data)
}

fn small() -> TransformConfig {
    TransformConfig {
        size: 16,
        ..Default::default()
    }
}

fn collect(loader: &Loader, epoch: usize) -> Vec<Batch> {
    loader.epoch(epoch).collect::<Result<_, _>>().unwrap()
}

fn flat(batch: &Batch) -> Vec<f32> {
    batch.images.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn valid_loader_keeps_order_and_last_partial_batch() {
    let (_dir, data) = dataset();
    let loader = Loader::new(
        data.valid().to_vec(),
        3,
        small(),
        LoaderConfig::valid(2),
        Device::Cpu,
    );
    assert_eq!(loader.n_batches(), 2);
    assert_eq!(loader.n_items(), 3);
    let batches = collect(&loader, 0);
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0].indices, [0, 1]);
    assert_eq!(batches[1].indices, [2]);
    assert_eq!(batches[0].images.dims(), &[2, 3, 16, 16]);
    assert_eq!(batches[1].images.dims(), &[1, 3, 16, 16]);
    // vocab: cat, dog, person
    let targets: Vec<Vec<f32>> = batches[0].targets.to_vec2().unwrap();
    assert_eq!(targets, [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]);
    let last: Vec<Vec<f32>> = batches[1].targets.to_vec2().unwrap();
    assert_eq!(last, [[1.0, 0.0, 1.0]]);

    // Each row is exactly what predict would see for that file.
    let eval = load_image_for_eval(&data.valid()[1].path, &small()).unwrap();
    let row = batches[0].images.get(1).unwrap();
    let diff = (row - eval)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn train_loader_shuffles_per_epoch_and_drops_last() {
    let (_dir, data) = dataset();
    let loader = Loader::new(
        data.train().to_vec(),
        3,
        small(),
        LoaderConfig::train(2, 7),
        Device::Cpu,
    );
    assert_eq!(loader.n_batches(), 2); // 5 items, batch 2, last dropped
    let epoch0 = collect(&loader, 0);
    assert_eq!(epoch0.len(), 2);
    let mut seen: Vec<usize> = epoch0.iter().flat_map(|b| b.indices.clone()).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 4);
    assert!(seen.iter().all(|&i| i < 5));

    // Targets follow the shuffled indices.
    for batch in &epoch0 {
        let targets: Vec<Vec<f32>> = batch.targets.to_vec2().unwrap();
        for (row, &index) in targets.iter().zip(&batch.indices) {
            let mut expected = vec![0.0; 3];
            for &label in &data.train()[index].labels {
                expected[label] = 1.0;
            }
            assert_eq!(row, &expected);
        }
    }

    // Orders differ between epochs (over several epochs at least once) and
    // repeat exactly for the same epoch.
    let plans: Vec<_> = (0..6).map(|e| loader.batch_plan(e)).collect();
    assert!(plans.iter().any(|p| p != &plans[0]));
    let again = collect(&loader, 0);
    for (a, b) in epoch0.iter().zip(&again) {
        assert_eq!(a.indices, b.indices);
        assert_eq!(flat(a), flat(b));
    }
}

#[test]
fn batches_do_not_depend_on_the_thread_count() {
    let (_dir, data) = dataset();
    let run = |threads: usize| {
        let cfg = LoaderConfig {
            threads: Some(threads),
            prefetch: 1,
            ..LoaderConfig::train(2, 11)
        };
        let loader = Loader::new(data.train().to_vec(), 3, small(), cfg, Device::Cpu);
        (0..3)
            .flat_map(|epoch| collect(&loader, epoch))
            .map(|b| (b.indices.clone(), flat(&b)))
            .collect::<Vec<_>>()
    };
    let one = run(1);
    let four = run(4);
    assert_eq!(one, four);
    // And the augmentation really is random across epochs.
    assert_ne!(one[0].1, one[2].1);
}

#[test]
fn images_are_normalized_with_the_configured_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flat.png");
    image::RgbImage::from_pixel(20, 10, image::Rgb([255, 0, 51]))
        .save(&path)
        .unwrap();
    let items = vec![Item {
        path,
        labels: vec![],
    }];
    let t = TransformConfig {
        size: 8,
        mean: [0.5, 0.5, 0.5],
        std: [0.5, 0.25, 0.1],
        ..Default::default()
    };
    let loader = Loader::new(items, 2, t, LoaderConfig::valid(4), Device::Cpu);
    let batch = collect(&loader, 0).remove(0);
    let values: Vec<f32> = flat(&batch);
    let (r, g, b) = (values[0], values[64], values[128]);
    assert!((r - 1.0).abs() < 1e-6, "{r}");
    assert!((g + 2.0).abs() < 1e-6, "{g}");
    assert!((b - (0.2 - 0.5) / 0.1).abs() < 1e-5, "{b}");
    assert_eq!(batch.targets.to_vec2::<f32>().unwrap(), [[0.0, 0.0]]);
}

#[test]
fn a_corrupt_image_ends_the_epoch_with_an_error_naming_it() {
    let (dir, data) = dataset();
    std::fs::write(dir.path().join("train/g.png"), b"\x89PNG broken").unwrap();
    let loader = Loader::new(
        data.valid().to_vec(),
        3,
        small(),
        LoaderConfig::valid(1),
        Device::Cpu,
    );
    let results: Vec<_> = loader.epoch(0).collect();
    assert_eq!(results.len(), 2);
    assert!(results[0].is_ok());
    let err = results[1].as_ref().unwrap_err();
    assert!(err.to_string().contains("g.png"), "{err}");
}

#[test]
fn invalid_configuration_is_reported_by_the_epoch() {
    let (_dir, data) = dataset();
    let cfg = LoaderConfig {
        batch_size: 0,
        ..LoaderConfig::valid(1)
    };
    let loader = Loader::new(data.valid().to_vec(), 3, small(), cfg, Device::Cpu);
    let results: Vec<_> = loader.epoch(0).collect();
    assert_eq!(results.len(), 1);
    assert!(matches!(results[0], Err(DataError::Config(_))));

    // A label index beyond n_classes is caught too.
    let loader = Loader::new(
        data.valid().to_vec(),
        1,
        small(),
        LoaderConfig::valid(1),
        Device::Cpu,
    );
    assert!(matches!(
        loader.epoch(0).next(),
        Some(Err(DataError::Config(_)))
    ));
}

#[test]
fn dropping_an_epoch_early_stops_the_worker() {
    let (_dir, data) = dataset();
    let mut items = data.train().to_vec();
    for _ in 0..5 {
        items.extend_from_slice(data.train());
    }
    let cfg = LoaderConfig {
        augment: Augment::Train,
        prefetch: 1,
        ..LoaderConfig::train(1, 0)
    };
    let loader = Loader::new(items, 3, small(), cfg, Device::Cpu);
    let mut epoch = loader.epoch(0);
    assert!(epoch.next().unwrap().is_ok());
    drop(epoch); // must return promptly, not decode the remaining 29 items
    assert_eq!(loader.epoch(1).count(), 30);
}

/// The validation loader keeps its decoded batches: once an epoch has made
/// them, later epochs give the same values without reading the files (here
/// broken in between). A loader whose batches change from epoch to epoch
/// (random crops, even in dataset order, as TTA uses), or one told not to
/// keep them, reads them again.
#[test]
fn the_validation_loader_decodes_each_image_once() {
    let (dir, data) = dataset();
    let valid = Loader::new(
        data.valid().to_vec(),
        3,
        small(),
        LoaderConfig::valid(2),
        Device::Cpu,
    );
    let augmented = Loader::new(
        data.valid().to_vec(),
        3,
        small(),
        LoaderConfig {
            augment: Augment::Train,
            ..LoaderConfig::valid(2)
        },
        Device::Cpu,
    );
    assert!(valid.caches());
    assert!(!augmented.caches());
    let uncached = LoaderConfig {
        cache: false,
        ..LoaderConfig::valid(2)
    };
    let uncached = Loader::new(data.valid().to_vec(), 3, small(), uncached, Device::Cpu);
    assert!(!uncached.caches());
    assert!(uncached.epoch(0).all(|b| b.is_ok()));
    // An epoch dropped after its first batch keeps that one; the next
    // epoch makes the rest.
    let first = valid.epoch(0).next().unwrap().unwrap();
    let before = collect(&valid, 1);
    assert!(augmented.epoch(0).all(|b| b.is_ok()));
    for name in ["f.png", "g.png", "h.png"] {
        std::fs::write(dir.path().join("train").join(name), b"\x89PNG broken").unwrap();
    }
    let after = collect(&valid, 2);
    assert_eq!(after.len(), before.len());
    assert_eq!(flat(&first), flat(&before[0]));
    for (a, b) in after.iter().zip(&before) {
        assert_eq!(a.indices, b.indices);
        assert_eq!(flat(a), flat(b));
        assert_eq!(
            a.targets.to_vec2::<f32>().unwrap(),
            b.targets.to_vec2::<f32>().unwrap()
        );
    }
    for loader in [&augmented, &uncached] {
        let err = loader.epoch(1).find_map(|b| b.err()).unwrap();
        assert!(err.to_string().contains("f.png"), "{err}");
    }
    // Too many pixels to keep: the same batches, made every epoch.
    let huge = TransformConfig {
        size: 8192,
        ..Default::default()
    };
    let n = multilabel_data::CACHE_MAX_BYTES / (3 * 8192 * 8192) + 1;
    let items: Vec<Item> = data.valid().iter().cycle().take(n).cloned().collect();
    assert!(!Loader::new(items, 3, huge, LoaderConfig::valid(2), Device::Cpu).caches());
}
