//! Reading train.csv: columns, booleans, vocab, splits and the errors that
//! name what is wrong.

mod common;

use common::make_dataset;
use multilabel_data::{DataError, Dataset, DatasetConfig, SplitConfig, random_split};

const CSV: &str = "fname,labels,is_valid\n\
a.png,dog cat,False\n\
b.png,,False\n\
c.png,person,False\n\
d.png,cat,True\n\
e.png,dog person,True\n";
const IMAGES: &[&str] = &["a.png", "b.png", "c.png", "d.png", "e.png"];

fn load(csv: &str, images: &[&str]) -> Result<Dataset, DataError> {
    let dir = tempfile::tempdir().unwrap();
    make_dataset(dir.path(), csv, images);
    Dataset::load(&DatasetConfig::new(dir.path()))
}

#[test]
fn reads_fastai_layout_with_sorted_training_vocab() {
    let data = load(CSV, IMAGES).unwrap();
    assert_eq!(data.vocab(), ["cat", "dog", "person"]);
    let names = |items: &[multilabel_data::Item]| -> Vec<String> {
        items
            .iter()
            .map(|i| i.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names(data.train()), ["a.png", "b.png", "c.png"]);
    assert_eq!(names(data.valid()), ["d.png", "e.png"]);
    // Labels are vocab indices, sorted; an empty cell is an all-zero target.
    assert_eq!(data.train()[0].labels, [0, 1]);
    assert!(data.train()[1].labels.is_empty());
    assert_eq!(data.train()[2].labels, [2]);
    assert_eq!(data.valid()[1].labels, [1, 2]);
    assert!(data.train()[0].path.ends_with("train/a.png"));
}

#[test]
fn accepts_every_boolean_spelling() {
    let csv =
        "fname,labels,is_valid\na.png,x,true\nb.png,x,0\nc.png,x,1\nd.png,x,False\ne.png,x,TRUE\n";
    let data = load(csv, IMAGES).unwrap();
    assert_eq!(data.train().len(), 2);
    assert_eq!(data.valid().len(), 3);
}

#[test]
fn bad_boolean_names_file_row_and_column() {
    let csv = "fname,labels,is_valid\na.png,x,False\nb.png,x,maybe\n";
    let err = load(csv, IMAGES).unwrap_err();
    assert!(
        matches!(&err, DataError::BadBool { row: 2, column, value, .. } if column == "is_valid" && value == "maybe"),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("train.csv") && message.contains("row 2"),
        "{message}"
    );
}

#[test]
fn missing_column_lists_the_columns_found() {
    let err = load("fname,tags,is_valid\na.png,x,False\n", IMAGES).unwrap_err();
    match err {
        DataError::MissingColumn { column, found, .. } => {
            assert_eq!(column, "labels");
            assert_eq!(found, "fname, tags, is_valid");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_and_empty_csv_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = Dataset::load(&DatasetConfig::new(dir.path())).unwrap_err();
    assert!(matches!(err, DataError::CsvMissing { .. }), "{err:?}");
    assert!(matches!(
        load("", IMAGES).unwrap_err(),
        DataError::EmptyCsv { .. }
    ));
    assert!(matches!(
        load("fname,labels,is_valid\n", IMAGES).unwrap_err(),
        DataError::EmptyCsv { .. }
    ));
}

#[test]
fn all_missing_images_are_reported_at_once() {
    let err = load(CSV, &["a.png", "c.png"]).unwrap_err();
    match &err {
        DataError::MissingImages { count, first, .. } => {
            assert_eq!(*count, 3);
            for name in ["b.png", "d.png", "e.png"] {
                assert!(first.contains(name), "{first}");
            }
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn file_names_escaping_the_image_folder_are_refused() {
    for bad in ["../a.png", "/etc/passwd", "x/../../a.png"] {
        let csv = format!("fname,labels,is_valid\na.png,x,False\n{bad},x,False\n");
        let err = load(&csv, IMAGES).unwrap_err();
        assert!(
            matches!(&err, DataError::UnsafeFileName { row: 2, name, .. } if name == bad),
            "{bad}: {err:?}"
        );
    }
}

#[test]
fn validation_label_outside_training_vocab_is_an_error_unless_vocab_from_all() {
    let csv = "fname,labels,is_valid\na.png,cat,False\nb.png,cat zebra,True\n";
    let err = load(csv, IMAGES).unwrap_err();
    assert!(
        matches!(&err, DataError::UnknownLabel { row: 2, label, .. } if label == "zebra"),
        "{err:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    make_dataset(dir.path(), csv, IMAGES);
    let cfg = DatasetConfig {
        vocab_from_all: true,
        ..DatasetConfig::new(dir.path())
    };
    let data = Dataset::load(&cfg).unwrap();
    assert_eq!(data.vocab(), ["cat", "zebra"]);
    assert_eq!(data.valid()[0].labels, [0, 1]);
}

#[test]
fn custom_columns_delimiter_csv_and_image_folder() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("pics");
    common::write_png(&images.join("sub/a.png"), 8, 8, 0);
    common::write_png(&images.join("b.png"), 8, 8, 1);
    let csv = dir.path().join("meta.csv");
    std::fs::write(&csv, "file,tags,holdout\nsub/a.png,x;y,0\nb.png,y,1\n").unwrap();
    let cfg = DatasetConfig {
        root: dir.path().to_path_buf(),
        csv: Some(csv),
        image_dir: Some(images.clone()),
        fname_col: "file".into(),
        labels_col: "tags".into(),
        label_delim: ";".into(),
        split: SplitConfig::Column("holdout".into()),
        ..Default::default()
    };
    let data = Dataset::load(&cfg).unwrap();
    assert_eq!(data.vocab(), ["x", "y"]);
    assert_eq!(data.train()[0].path, images.join("sub/a.png"));
    assert_eq!(data.train()[0].labels, [0, 1]);
    assert_eq!(data.valid()[0].labels, [1]);
}

#[test]
fn random_split_is_deterministic_and_sized() {
    let a = random_split(100, 0.2, 7);
    assert_eq!(a.iter().filter(|v| **v).count(), 20);
    assert_eq!(a, random_split(100, 0.2, 7));
    assert_ne!(a, random_split(100, 0.2, 8));

    // Through the loader, the split column is not needed at all.
    let csv = "fname,labels\na.png,x\nb.png,x\nc.png,y\nd.png,y\ne.png,x\n";
    let dir = tempfile::tempdir().unwrap();
    make_dataset(dir.path(), csv, IMAGES);
    let cfg = DatasetConfig {
        split: SplitConfig::Random {
            valid_pct: 0.4,
            seed: 3,
        },
        ..DatasetConfig::new(dir.path())
    };
    let first = Dataset::load(&cfg).unwrap();
    let second = Dataset::load(&cfg).unwrap();
    assert_eq!(first.valid().len(), 2);
    assert_eq!(first.valid(), second.valid());
}

#[test]
fn skip_bad_images_drops_and_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    make_dataset(dir.path(), CSV, IMAGES);
    std::fs::write(dir.path().join("train/b.png"), b"").unwrap();
    std::fs::write(dir.path().join("train/d.png"), b"not an image").unwrap();

    let strict = DatasetConfig::new(dir.path());
    // Without the option the CSV loads (files exist); decoding fails later.
    assert_eq!(Dataset::load(&strict).unwrap().train().len(), 3);

    let lenient = DatasetConfig {
        skip_bad_images: true,
        ..strict
    };
    let data = Dataset::load(&lenient).unwrap();
    assert_eq!(data.train().len(), 2);
    assert_eq!(data.valid().len(), 1);
    let skipped: Vec<_> = data.skipped().iter().map(|s| s.path.clone()).collect();
    assert_eq!(
        skipped,
        [
            dir.path().join("train/b.png"),
            dir.path().join("train/d.png")
        ]
    );
    assert!(data.skipped()[0].reason.contains("empty"));
}

#[test]
fn config_round_trips_through_json() {
    let cfg = DatasetConfig {
        split: SplitConfig::Random {
            valid_pct: 0.25,
            seed: 9,
        },
        ..DatasetConfig::new("/data/x")
    };
    let json = serde_json::to_string(&cfg).unwrap();
    let back: DatasetConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cfg);
}
