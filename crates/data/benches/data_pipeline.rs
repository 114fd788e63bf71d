//! Images per second for decode + augment + batch at 128 px.
//!
//! ```text
//! cargo bench -p multilabel-data --bench data_pipeline [-- DATASET_DIR]
//! MULTILABEL_BENCH_DATA=data/pascal_2007 cargo bench -p multilabel-data
//! ```
//!
//! Always measures two generated sets (the synthetic dataset as written,
//! 96–224 px, and the same dataset drawn at PASCAL's typical 500×375),
//! plus the dataset folder given as an argument or in
//! `MULTILABEL_BENCH_DATA`. Each with one thread and with all threads, for
//! the training and validation transforms.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use multilabel_data::{
    Augment, Dataset, DatasetConfig, Item, Loader, LoaderConfig, SynthConfig, TransformConfig,
    synth,
};

const BATCH: usize = 64;

fn main() {
    let folder = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("MULTILABEL_BENCH_DATA").map(PathBuf::from));

    let scratch = std::env::temp_dir().join(format!("multilabel-bench-{}", std::process::id()));
    // The same dataset twice: as `synth` draws it, and with every image at
    // PASCAL's typical 500×375, so decoding costs what it would there.
    let write = |name: &str, image_size| {
        let out = scratch.join(name);
        synth(&SynthConfig {
            out: out.clone(),
            n_train: 512,
            n_valid: 0,
            classes: 6,
            seed: 0,
            image_size,
        })
        .expect("writing the synthetic set");
        load_items(&out)
    };
    let small_items = write("synth", None);
    let large_items = write("pascal_sized", Some((500, 375)));

    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("decode + augment + batch at 128 px, batch {BATCH}, {all} hardware threads");
    println!(
        "{:<34} {:>7} {:>6} {:>7} {:>10}",
        "set", "images", "aug", "threads", "images/s"
    );
    let mut sets = vec![
        ("synthetic 96-224 px".to_string(), small_items),
        ("synthetic at 500x375".to_string(), large_items),
    ];
    if let Some(folder) = folder {
        let items = load_items(&folder);
        sets.push((folder.display().to_string(), items));
    }
    for (name, items) in &sets {
        for augment in [Augment::Train, Augment::Valid] {
            let mut thread_counts = vec![1, all];
            thread_counts.dedup();
            for threads in thread_counts {
                let rate = images_per_second(items, augment, threads);
                println!(
                    "{:<34} {:>7} {:>6} {:>7} {:>10.0}",
                    name,
                    items.len(),
                    format!("{augment:?}").to_lowercase(),
                    threads,
                    rate
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

fn load_items(root: &Path) -> Vec<Item> {
    let data = Dataset::load(&DatasetConfig::new(root))
        .unwrap_or_else(|e| panic!("loading {}: {e}", root.display()));
    let mut items = data.train().to_vec();
    items.extend_from_slice(data.valid());
    items
}

/// Best of three epochs, counting only images that reach a batch.
fn images_per_second(items: &[Item], augment: Augment, threads: usize) -> f64 {
    let n_classes = items
        .iter()
        .flat_map(|i| i.labels.iter().copied())
        .max()
        .map_or(1, |m| m + 1);
    let cfg = LoaderConfig {
        batch_size: BATCH,
        shuffle: augment == Augment::Train,
        drop_last: augment == Augment::Train,
        augment,
        seed: 0,
        threads: Some(threads),
        prefetch: 2,
        // Every epoch decodes: that is what this measures.
        cache: false,
    };
    let loader = Loader::new(
        items.to_vec(),
        n_classes,
        TransformConfig::default(),
        cfg,
        Device::Cpu,
    );
    let mut best = 0f64;
    for epoch in 0..3 {
        let start = Instant::now();
        let mut images = 0;
        for batch in loader.epoch(epoch) {
            images += batch.expect("loading a batch").indices.len();
        }
        best = best.max(images as f64 / start.elapsed().as_secs_f64());
    }
    best
}
