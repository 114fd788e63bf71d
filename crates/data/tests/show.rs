//! show_batch: the grid holds the de-normalized images and a caption per
//! image.

use candle_core::{Device, Tensor};
use multilabel_data::{
    Batch, IMAGENET_MEAN, IMAGENET_STD, ShowBatchConfig, render_batch, show_batch,
};

/// Two 32 x 32 images: pure red and pure blue, normalized with ImageNet stats.
fn batch() -> Batch {
    let mut data = Vec::new();
    for colour in [[1.0f32, 0.0, 0.0], [0.0, 0.0, 1.0]] {
        for c in 0..3 {
            let v = (colour[c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            data.extend(std::iter::repeat_n(v, 32 * 32));
        }
    }
    Batch {
        images: Tensor::from_vec(data, (2, 3, 32, 32), &Device::Cpu).unwrap(),
        targets: Tensor::from_vec(vec![1f32, 0.0, 1.0, 0.0, 0.0, 0.0], (2, 3), &Device::Cpu)
            .unwrap(),
        indices: vec![0, 1],
    }
}

fn ink_in(image: &image::RgbImage, x0: u32, y0: u32, w: u32, h: u32) -> usize {
    let mut n = 0;
    for y in y0..(y0 + h).min(image.height()) {
        for x in x0..(x0 + w).min(image.width()) {
            n += usize::from(image.get_pixel(x, y).0 == [20, 20, 20]);
        }
    }
    n
}

#[test]
fn grid_has_denormalized_images_and_captions() {
    let vocab = ["abc".to_string(), "zz".to_string(), "cde".to_string()];
    let cfg = ShowBatchConfig {
        cols: Some(2),
        ..Default::default()
    };
    let grid = render_batch(&batch(), &vocab, &IMAGENET_MEAN, &IMAGENET_STD, &cfg).unwrap();
    // 32 px images hold 5 characters per caption line, so "abc cde" wraps
    // to two lines: cells are 32 + 6 px wide and 32 + 6 + 2 * 10 px tall,
    // plus a 6 px margin.
    assert_eq!(grid.dimensions(), (2 * 38 + 6, 58 + 6));
    assert_eq!(grid.get_pixel(6, 6).0, [255, 0, 0]);
    assert_eq!(grid.get_pixel(6 + 31, 6 + 31).0, [255, 0, 0]);
    assert_eq!(grid.get_pixel(44 + 16, 6 + 16).0, [0, 0, 255]);
    assert_eq!(grid.get_pixel(40, 6).0, [255, 255, 255]);
    // First caption: two lines of ink under the first image, nothing below.
    assert!(ink_in(&grid, 6, 41, 32, 7) > 20);
    assert!(ink_in(&grid, 6, 51, 32, 7) > 20);
    assert_eq!(ink_in(&grid, 0, 58, 82, 6), 0);
    // Second image has no labels: "(none)" is drawn under it.
    assert!(ink_in(&grid, 44, 41, 32, 7) > 20);
}

#[test]
fn different_labels_give_different_captions() {
    let cfg = ShowBatchConfig::default();
    let a = render_batch(
        &batch(),
        &["cat".into(), "x".into(), "dog".into()],
        &IMAGENET_MEAN,
        &IMAGENET_STD,
        &cfg,
    )
    .unwrap();
    let b = render_batch(
        &batch(),
        &["cow".into(), "x".into(), "dog".into()],
        &IMAGENET_MEAN,
        &IMAGENET_STD,
        &cfg,
    )
    .unwrap();
    assert_eq!(a.dimensions(), b.dimensions());
    assert_ne!(a, b);
}

#[test]
fn writes_a_png_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid.png");
    let vocab = ["a".to_string(), "b".to_string(), "c".to_string()];
    show_batch(
        &batch(),
        &vocab,
        &IMAGENET_MEAN,
        &IMAGENET_STD,
        &ShowBatchConfig::default(),
        &out,
    )
    .unwrap();
    let back = image::open(&out).unwrap().to_rgb8();
    let direct = render_batch(
        &batch(),
        &vocab,
        &IMAGENET_MEAN,
        &IMAGENET_STD,
        &ShowBatchConfig::default(),
    )
    .unwrap();
    assert_eq!(back, direct);
}
