//! The synthetic dataset: layout, determinism, and that its labels are
//! visible in the pixels.

use multilabel_data::{
    Dataset, DatasetConfig, SynthConfig, TransformConfig, decode_rgb, synth, valid_image,
};

fn config(out: &std::path::Path, seed: u64) -> SynthConfig {
    SynthConfig {
        out: out.to_path_buf(),
        n_train: 60,
        n_valid: 20,
        classes: 4,
        seed,
        image_size: None,
    }
}

#[test]
fn writes_a_loadable_pascal_layout() {
    let dir = tempfile::tempdir().unwrap();
    let summary = synth(&config(dir.path(), 1)).unwrap();
    assert_eq!(summary.vocab, ["circle", "cross", "square", "triangle"]);
    let data = Dataset::load(&DatasetConfig::new(dir.path())).unwrap();
    assert_eq!(data.vocab(), summary.vocab);
    assert_eq!((data.train().len(), data.valid().len()), (60, 20));

    // Counts in the summary agree with the CSV.
    let mut counts = vec![0; 4];
    let mut empty = 0;
    for item in data.train().iter().chain(data.valid()) {
        for &l in &item.labels {
            counts[l] += 1;
        }
        empty += usize::from(item.labels.is_empty());
        assert!(item.labels.len() <= 3);
    }
    assert_eq!(counts, summary.label_counts);
    assert_eq!(empty, summary.n_empty);
    assert!(counts.iter().all(|&c| c >= 10), "{counts:?}");

    // Varied sizes and aspect ratios.
    let sizes: Vec<(u32, u32)> = data
        .train()
        .iter()
        .map(|i| decode_rgb(&i.path).unwrap().dimensions())
        .collect();
    let ratios: Vec<f64> = sizes.iter().map(|(w, h)| *w as f64 / *h as f64).collect();
    assert!(ratios.iter().any(|&r| r < 0.8) && ratios.iter().any(|&r| r > 1.25));
    assert!(
        sizes
            .iter()
            .all(|&(w, h)| (96..=224).contains(&w) && (96..=224).contains(&h))
    );
}

/// A fixed image size (PASCAL's 500×375 here) gives every image that size,
/// still with every class in the training rows; a size outside the allowed
/// sides is refused before anything is written.
#[test]
fn a_fixed_image_size_gives_every_image_that_size() {
    let dir = tempfile::tempdir().unwrap();
    let summary = synth(&SynthConfig {
        n_train: 12,
        n_valid: 4,
        image_size: Some((500, 375)),
        ..config(dir.path(), 3)
    })
    .unwrap();
    let data = Dataset::load(&DatasetConfig::new(dir.path())).unwrap();
    assert_eq!(data.vocab(), summary.vocab);
    assert_eq!(data.vocab().len(), 4);
    for item in data.train().iter().chain(data.valid()) {
        assert_eq!(decode_rgb(&item.path).unwrap().dimensions(), (500, 375));
    }
    for bad in [(31, 100), (100, 5000), (0, 0)] {
        let dir = tempfile::tempdir().unwrap();
        let err = synth(&SynthConfig {
            image_size: Some(bad),
            ..config(dir.path(), 0)
        })
        .unwrap_err();
        assert!(err.to_string().contains("image size"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

#[test]
fn same_seed_same_files_other_seed_other_files() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    synth(&config(a.path(), 5)).unwrap();
    synth(&config(b.path(), 5)).unwrap();
    synth(&config(c.path(), 6)).unwrap();
    let read = |d: &std::path::Path, f: &str| std::fs::read(d.join(f)).unwrap();
    assert_eq!(read(a.path(), "train.csv"), read(b.path(), "train.csv"));
    assert_eq!(
        read(a.path(), "train/000042.jpg"),
        read(b.path(), "train/000042.jpg")
    );
    assert_ne!(
        read(a.path(), "train/000042.jpg"),
        read(c.path(), "train/000042.jpg")
    );
}

#[test]
fn labels_can_be_read_off_the_pixels_after_the_valid_transform() {
    // A stand-in for "a small CNN can learn it": after the 64 px validation
    // transform, the class colours alone recover nearly every label.
    let dir = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        n_train: 80,
        n_valid: 0,
        classes: 6,
        ..config(dir.path(), 2)
    };
    synth(&cfg).unwrap();
    let data = Dataset::load(&DatasetConfig::new(dir.path())).unwrap();
    let colours: Vec<[i32; 3]> = data
        .vocab()
        .iter()
        .map(|name| match name.as_str() {
            "circle" => [230, 40, 40],
            "square" => [40, 200, 60],
            "triangle" => [50, 80, 235],
            "cross" => [240, 220, 40],
            "ring" => [225, 60, 225],
            "diamond" => [40, 225, 225],
            other => panic!("unexpected class {other}"),
        })
        .collect();
    let size = TransformConfig {
        size: 64,
        ..Default::default()
    }
    .size;
    let (mut right, mut total) = (0, 0);
    for item in data.train() {
        let image = valid_image(&decode_rgb(&item.path).unwrap(), size);
        for (class, colour) in colours.iter().enumerate() {
            let near = image
                .pixels()
                .filter(|p| (0..3).all(|c| (p.0[c] as i32 - colour[c]).abs() <= 40))
                .count();
            let predicted = near >= 12;
            right += usize::from(predicted == item.labels.contains(&class));
            total += 1;
        }
    }
    let accuracy = right as f64 / total as f64;
    assert!(accuracy >= 0.95, "colour rule accuracy {accuracy}");
}

#[test]
fn rejects_impossible_configs() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        synth(&SynthConfig {
            classes: 0,
            ..config(dir.path(), 0)
        })
        .is_err()
    );
    assert!(
        synth(&SynthConfig {
            classes: 11,
            ..config(dir.path(), 0)
        })
        .is_err()
    );
    assert!(
        synth(&SynthConfig {
            n_train: 2,
            ..config(dir.path(), 0)
        })
        .is_err()
    );
}
