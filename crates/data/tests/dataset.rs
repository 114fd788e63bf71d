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

/// A long CSV of `n` rows naming `000001.png`...; `edit` may change any
/// line (0 is the header) before it is written.
fn long_csv(n: usize, edit: impl Fn(usize, String) -> String) -> String {
    let mut csv = edit(0, "fname,labels,is_valid".into());
    csv.push('\n');
    for i in 1..=n {
        let valid = if i % 5 == 0 { "True" } else { "False" };
        csv.push_str(&edit(i, format!("{i:06}.png,dog cat,{valid}")));
        csv.push('\n');
    }
    csv
}

/// The checks every CSV syntax error must pass: short, names the file and
/// the line, quotes no other row, and has no Python-API hints.
fn assert_short_csv_error(err: &DataError, line: usize, other_row: &str) -> String {
    let message = err.to_string();
    assert!(
        matches!(err, DataError::CsvSyntax { line: l, .. } if *l == line),
        "{err:?}"
    );
    assert!(message.lines().count() <= 2, "{message}");
    assert!(message.len() < 400, "{} chars: {message}", message.len());
    assert!(message.contains("train.csv"), "{message}");
    assert!(message.contains(&format!("line {line}")), "{message}");
    assert!(
        !message.contains(other_row),
        "echoes another row: {message}"
    );
    for hint in ["infer_schema_length", "ignore_errors", "=True"] {
        assert!(!message.contains(hint), "python hint: {message}");
    }
    message
}

#[test]
fn unclosed_quote_names_its_line_in_one_short_message() {
    // Line 51 (row 50) opens a quote that never closes, in each column.
    for (column, broken) in [
        (0, "\"000050.png,dog,False"),
        (1, "000050.png,\"dog cat,False"),
        (2, "000050.png,dog,\"False"),
    ] {
        // Syntax is checked before any image, so none are needed.
        let csv = long_csv(300, |i, line| if i == 50 { broken.into() } else { line });
        let err = load(&csv, &[]).unwrap_err();
        let message = assert_short_csv_error(&err, 51, "000299.png");
        assert!(message.contains("quote"), "column {column}: {message}");
    }
}

#[test]
fn extra_fields_and_bad_encoding_name_their_line() {
    let csv = long_csv(300, |i, line| {
        if i == 7 {
            "000007.png,dog,cat,False".into()
        } else {
            line
        }
    });
    let err = load(&csv, &[]).unwrap_err();
    let message = assert_short_csv_error(&err, 8, "000299.png");
    assert!(
        message.contains("4 fields") && message.contains("3"),
        "{message}"
    );

    // Latin-1 bytes in a UTF-8 file.
    let dir = tempfile::tempdir().unwrap();
    make_dataset(dir.path(), CSV, IMAGES);
    let mut bytes = CSV.as_bytes().to_vec();
    bytes.extend_from_slice(b"caf\xe9.png,x,False\n");
    std::fs::write(dir.path().join("train.csv"), bytes).unwrap();
    let err = Dataset::load(&DatasetConfig::new(dir.path())).unwrap_err();
    let message = assert_short_csv_error(&err, 7, "zzz");
    assert!(message.contains("UTF-8"), "{message}");
}

#[test]
fn a_huge_bad_value_is_shortened_in_the_message() {
    let junk = "x".repeat(5000);
    let csv = format!("fname,labels,is_valid\na.png,x,False\nb.png,x,{junk}\n");
    let err = load(&csv, IMAGES).unwrap_err();
    assert!(matches!(err, DataError::BadBool { row: 2, .. }), "{err:?}");
    assert!(err.to_string().len() < 300, "{err}");
}

#[test]
fn blank_lines_are_skipped_like_pandas() {
    // Blank lines in the middle, at the end (as hand edits leave them), with
    // spaces and with CRLF endings.
    let csv = "fname,labels,is_valid\n\
               a.png,dog cat,False\n\
               \n\
               b.png,,False\n\
               c.png,person,False\r\n\
               \r\n\
               d.png,cat,True\n\
               e.png,dog person,True\n\
               \n   \n\n";
    let data = load(csv, IMAGES).unwrap();
    assert_eq!(data.train().len(), 3);
    assert_eq!(data.valid().len(), 2);
    assert_eq!(data.vocab(), ["cat", "dog", "person"]);
    // Row numbers still count the blank lines, so they match the file's lines.
    let csv = "fname,labels,is_valid\na.png,x,False\n\nb.png,x,maybe\n\n";
    let err = load(csv, IMAGES).unwrap_err();
    assert!(matches!(err, DataError::BadBool { row: 3, .. }), "{err:?}");
    // Only blank lines after the header: no rows.
    let err = load("fname,labels,is_valid\n\n\n", IMAGES).unwrap_err();
    assert!(matches!(err, DataError::EmptyCsv { .. }), "{err:?}");
}

#[test]
fn all_rows_in_validation_says_there_are_no_training_rows() {
    let csv = "fname,labels,is_valid\na.png,cat,True\nb.png,dog,True\n";
    let err = load(csv, IMAGES).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, DataError::NoTrainingRows { .. }), "{err:?}");
    assert!(
        message.contains("no training rows") && message.contains("is_valid"),
        "{message}"
    );
    assert!(!message.contains("vocab"), "{message}");
}

#[test]
fn duplicate_file_names_are_refused_with_both_rows() {
    // The same image in training and in validation, with other labels.
    for second in ["a.png", "./a.png", " a.png"] {
        let csv =
            format!("fname,labels,is_valid\na.png,dog,False\nb.png,cat,False\n{second},cat,True\n");
        let err = load(&csv, IMAGES).unwrap_err();
        assert!(
            matches!(
                &err,
                DataError::DuplicateFileName {
                    first_row: 1,
                    row: 3,
                    ..
                }
            ),
            "{second}: {err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("rows 1 and 3") && message.contains("a.png"),
            "{message}"
        );
    }
    // Names that differ only in folder are different files.
    let dir = tempfile::tempdir().unwrap();
    common::write_png(&dir.path().join("train/x/a.png"), 8, 8, 0);
    common::write_png(&dir.path().join("train/a.png"), 8, 8, 1);
    std::fs::write(
        dir.path().join("train.csv"),
        "fname,labels,is_valid\na.png,x,False\nx/a.png,x,True\n",
    )
    .unwrap();
    assert!(Dataset::load(&DatasetConfig::new(dir.path())).is_ok());
}
