//! End-to-end tests of the `multilabel` binary on generated data: training
//! learns, `eval` reproduces the end-of-training metrics, a resumed run ends
//! with the same weights, and bad input fails cleanly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

fn bin() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_multilabel"));
    // Tests never reach the network, even by accident.
    command
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:9");
    command
}

fn run(args: &[&str], cwd: &Path) -> Output {
    bin()
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("running multilabel")
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn ok(args: &[&str], cwd: &Path) -> Output {
    let output = run(args, cwd);
    assert!(
        output.status.success(),
        "{args:?} failed:\n{}",
        text(&output)
    );
    output
}

/// One small synthetic dataset shared by the tests (generation is deterministic).
fn dataset() -> &'static Path {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    DATA.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("multilabel-e2e-data-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = dir.to_str().unwrap().to_string();
        ok(
            &[
                "synth",
                "--out",
                &out,
                "--n-train",
                "96",
                "--n-valid",
                "48",
                "--classes",
                "3",
                "--seed",
                "7",
            ],
            Path::new("."),
        );
        dir
    })
}

/// Flags of a quick training run of a narrow ResNet-18 from scratch (64 px:
/// at 32 px the body ends at 1×1 and learns the synthetic shapes poorly).
fn train_flags<'a>(data: &'a str, run: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    #[rustfmt::skip]
    let mut flags = vec![
        "train", "--data", data, "--run", run,
        "--arch", "resnet18", "--width", "16", "--weights", "none",
        "--size", "64", "--min-scale", "0.9", "--bs", "16",
        "--freeze-epochs", "1", "--epochs", "3", "--base-lr", "1e-2", "--lr-mult", "1",
        "--device", "cpu", "--seed", "3",
    ];
    // Flags given in `extra` replace the defaults above (clap refuses repeats).
    let mut rest = extra.iter();
    while let Some(&flag) = rest.next() {
        let takes_value = flag != "--flip";
        let value = if takes_value {
            rest.next().copied()
        } else {
            None
        };
        match (flags.iter().position(|f| *f == flag), value) {
            (Some(at), Some(value)) => flags[at + 1] = value,
            (_, value) => flags.extend(std::iter::once(flag).chain(value)),
        }
    }
    flags
}

fn epoch_ends(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("events.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|event| event["event"] == "epoch_end")
        .collect()
}

fn metric(record: &Value, name: &str) -> f64 {
    record["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|pair| pair[0] == name)
        .unwrap()[1]
        .as_f64()
        .unwrap()
}

#[test]
fn training_learns_and_eval_reproduces_its_metrics() {
    let work = tempfile::tempdir().unwrap();
    let data = dataset().to_str().unwrap();
    let run_dir = work.path().join("run");
    let run_str = run_dir.to_str().unwrap();
    let output = ok(&train_flags(data, run_str, &["--epochs", "8"]), work.path());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("train_loss"), "no epoch table:\n{stdout}");
    for file in [
        "model.safetensors",
        "model.json",
        "config.json",
        "history.csv",
        "events.jsonl",
        "sweep.png",
    ] {
        assert!(run_dir.join(file).exists(), "{file} missing");
    }

    let epochs = epoch_ends(&run_dir);
    assert_eq!(epochs.len(), 9, "1 frozen + 8 unfrozen epochs");
    let first_loss = epochs[0]["train_loss"].as_f64().unwrap();
    let last = epochs.last().unwrap();
    let last_loss = last["train_loss"].as_f64().unwrap();
    assert!(
        last_loss < 0.8 * first_loss,
        "train loss {first_loss} -> {last_loss}"
    );

    // eval at the training metric's threshold reproduces the last epoch exactly.
    let json_path = work.path().join("eval.json");
    ok(
        &[
            "eval",
            "--run",
            run_str,
            "--thresh",
            "0.2",
            "--json",
            json_path.to_str().unwrap(),
            "--device",
            "cpu",
            "--bs",
            "16",
        ],
        work.path(),
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(
        report["accuracy_multi"].as_f64().unwrap(),
        metric(last, "accuracy_multi")
    );
    let valid_loss = report["valid_loss"].as_f64().unwrap();
    let trained_valid_loss = last["valid_loss"].as_f64().unwrap();
    assert!(
        (valid_loss - trained_valid_loss).abs() <= 1e-6 * trained_valid_loss.abs(),
        "{valid_loss} vs {trained_valid_loss}"
    );
    assert_eq!(report["n_images"], 48);

    // Better than predicting "nothing" for every label, by a clear margin.
    let targets_positive: f64 = report["per_class"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["support"].as_f64().unwrap())
        .sum();
    let all_negative = 1.0 - targets_positive / (48.0 * 3.0);
    let best = report["best"]["accuracy_multi"].as_f64().unwrap();
    assert!(
        best > all_negative + 0.05,
        "best accuracy {best} vs all-negative {all_negative}"
    );
    // A random ranking has AP ≈ the positive rate (~0.3-0.5 here).
    let map = report["map"].as_f64().unwrap();
    assert!(map > 0.75, "mAP {map}");
    assert_eq!(report["sweep"].as_array().unwrap().len(), 30);

    // predict uses the bundle alone.
    let image = first_image();
    let output = ok(
        &[
            "predict",
            "--run",
            run_str,
            "--device",
            "cpu",
            image.to_str().unwrap(),
        ],
        work.path(),
    );
    assert!(
        String::from_utf8_lossy(&output.stdout)
            .contains(image.file_name().unwrap().to_str().unwrap())
    );
}

#[test]
fn a_resumed_run_ends_with_the_same_weights() {
    let work = tempfile::tempdir().unwrap();
    let data = dataset().to_str().unwrap();
    let whole = work.path().join("whole");
    let parts = work.path().join("parts");
    ok(
        &train_flags(data, whole.to_str().unwrap(), &[]),
        work.path(),
    );

    // Stop in the middle of the unfrozen phase (frozen: 6 steps of 16).
    let stopped = run(
        &train_flags(data, parts.to_str().unwrap(), &["--stop-after-steps", "9"]),
        work.path(),
    );
    assert_eq!(stopped.status.code(), Some(130), "{}", text(&stopped));
    assert!(
        !parts.join("model.safetensors").exists(),
        "no final model after an interruption"
    );
    ok(
        &[
            "train",
            "--resume",
            parts.to_str().unwrap(),
            "--device",
            "cpu",
        ],
        work.path(),
    );

    let a = std::fs::read(whole.join("model.safetensors")).unwrap();
    let b = std::fs::read(parts.join("model.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from the uninterrupted run");
    let last = |dir: &Path| {
        epoch_ends(dir).last().unwrap()["valid_loss"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(last(&whole), last(&parts));
}

/// One image of the shared dataset.
fn first_image() -> PathBuf {
    std::fs::read_dir(dataset().join("train"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

fn fails(args: &[&str], cwd: &Path, needle: &str) -> String {
    let output = run(args, cwd);
    assert!(
        !output.status.success(),
        "{args:?} should fail:\n{}",
        text(&output)
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(
        stderr.contains(needle),
        "stderr lacks `{needle}`:\n{stderr}"
    );
    stderr
}

#[test]
fn bad_input_fails_cleanly_and_writes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let cwd = work.path();
    let data = dataset().to_str().unwrap();

    // --thresh out of range: refused before anything is created.
    fails(
        &train_flags(data, "r1", &["--thresh", "2"]),
        cwd,
        "--thresh",
    );
    fails(&["eval", "--run", "r1", "--thresh", "2"], cwd, "--thresh");
    assert!(!cwd.join("r1").exists());

    // A missing data folder.
    fails(
        &train_flags("no/such/folder", "r2", &[]),
        cwd,
        "no/such/folder",
    );
    assert!(!cwd.join("r2").join("model.json").exists());

    // A weights file that is not safetensors.
    let bogus = cwd.join("bogus.safetensors");
    std::fs::write(&bogus, b"this is not a safetensors file").unwrap();
    let mut flags = train_flags(data, "r3", &[]);
    let at = flags.iter().position(|f| *f == "none").unwrap();
    flags[at] = bogus.to_str().unwrap();
    fails(&flags, cwd, "bogus.safetensors");
    assert!(!cwd.join("r3").join("model.json").exists());

    // An empty CSV.
    let empty = cwd.join("empty");
    std::fs::create_dir_all(empty.join("train")).unwrap();
    std::fs::write(empty.join("train.csv"), b"").unwrap();
    fails(
        &train_flags(empty.to_str().unwrap(), "r4", &[]),
        cwd,
        "train.csv",
    );

    // A run folder that cannot be created (its parent is a file).
    std::fs::write(cwd.join("plainfile"), b"x").unwrap();
    fails(&train_flags(data, "plainfile/run", &[]), cwd, "plainfile");

    // eval without any run.
    fails(&["eval", "--thresh", "0.5"], cwd, "runs/latest");
}

#[test]
fn lr_find_prints_the_search_and_writes_a_plot() {
    let work = tempfile::tempdir().unwrap();
    let data = dataset().to_str().unwrap();
    let mut flags = train_flags(data, "unused", &["--num-it", "12", "--plot", "lr.png"]);
    flags[0] = "lr-find";
    let at = flags.iter().position(|f| *f == "--run").unwrap();
    flags.drain(at..at + 2);
    let output = ok(&flags, work.path());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let rows = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("1.000e-7") || l.contains("e-"))
        .count();
    assert!(rows >= 2, "no lr rows:\n{stdout}");
    assert!(
        stdout.contains("1.000e-7"),
        "first lr is start_lr:\n{stdout}"
    );
    let png = std::fs::read(work.path().join("lr.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        !work.path().join("unused").exists(),
        "lr-find creates no run"
    );
}

/// A finished run of the quickest training (one frozen epoch), shared by the
/// tests that damage copies of its bundle.
fn trained_run() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("multilabel-e2e-run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let run = dir.join("run");
        ok(
            &train_flags(
                dataset().to_str().unwrap(),
                run.to_str().unwrap(),
                &["--epochs", "0"],
            ),
            Path::new("."),
        );
        run
    })
}

/// A copy of the trained run's bundle in `dir`, with `edit` applied to its
/// `model.json`.
fn damaged_bundle(dir: &Path, edit: impl Fn(&mut Value)) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for file in ["model.safetensors", "config.json"] {
        std::fs::copy(trained_run().join(file), dir.join(file)).unwrap();
    }
    let text = std::fs::read_to_string(trained_run().join("model.json")).unwrap();
    let mut meta: Value = serde_json::from_str(&text).unwrap();
    edit(&mut meta);
    std::fs::write(dir.join("model.json"), meta.to_string()).unwrap();
    dir.to_path_buf()
}

#[test]
fn a_bundle_whose_files_disagree_is_refused_naming_the_file() {
    let work = tempfile::tempdir().unwrap();
    let image = first_image();
    let vocab = |meta: &mut Value| meta["vocab"].as_array_mut().unwrap().clone();
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, Box<dyn Fn(&mut Value)>, &str, &str)> = vec![
        (
            "vocab shorter than the head",
            Box::new(|meta| {
                meta["vocab"].as_array_mut().unwrap().pop();
            }),
            "model.json",
            "lists 2 labels",
        ),
        (
            "vocab longer than the head",
            Box::new(|meta| {
                meta["vocab"].as_array_mut().unwrap().push("zebra".into());
            }),
            "model.json",
            "lists 4 labels",
        ),
        (
            "model.json consistent, weights from another vocab",
            Box::new(move |meta| {
                let mut names = vocab(meta);
                names.pop();
                meta["vocab"] = Value::Array(names);
                meta["model"]["head"]["n_classes"] = 2.into();
            }),
            "model.safetensors",
            "the head has 3 outputs",
        ),
        (
            "another architecture",
            Box::new(|meta| {
                meta["arch"] = "resnet34".into();
                meta["model"]["arch"] = "resnet34".into();
            }),
            "model.safetensors",
            "do not belong together",
        ),
        (
            "another width",
            Box::new(|meta| {
                meta["base_width"] = 8.into();
                meta["model"]["base_width"] = 8.into();
            }),
            "model.safetensors",
            "do not belong together",
        ),
        (
            "arch entries that disagree",
            Box::new(|meta| {
                meta["arch"] = "resnet50".into();
            }),
            "model.json",
            "`arch`",
        ),
        (
            "threshold out of range",
            Box::new(|meta| {
                meta["threshold"] = 7.0.into();
            }),
            "model.json",
            "threshold",
        ),
        (
            "per-class thresholds for another vocab",
            Box::new(|meta| {
                meta["class_thresholds"] = serde_json::json!([0.3, 0.4]);
            }),
            "model.json",
            "`class_thresholds` has 2 values for 3 labels",
        ),
        (
            "a per-class threshold out of range",
            Box::new(|meta| {
                meta["class_thresholds"] = serde_json::json!([0.3, 1.5, 0.2]);
            }),
            "model.json",
            "must be between 0 and 1, got 1.5",
        ),
        (
            "image size zero",
            Box::new(|meta| {
                meta["image_size"] = 0.into();
            }),
            "model.json",
            "image settings",
        ),
    ];
    for (i, (case, edit, file, needle)) in cases.iter().enumerate() {
        let bundle = damaged_bundle(&work.path().join(format!("b{i}")), edit);
        let bundle = bundle.to_str().unwrap();
        let predict = [
            "predict",
            "--run",
            bundle,
            "--device",
            "cpu",
            image.to_str().unwrap(),
        ];
        let eval = ["eval", "--run", bundle, "--device", "cpu", "--bs", "16"];
        for args in [&predict[..], &eval[..]] {
            let output = run(args, work.path());
            assert_eq!(output.status.code(), Some(1), "{case}: {}", text(&output));
            let stderr = String::from_utf8_lossy(&output.stderr);
            let first = stderr.lines().next().unwrap_or("");
            assert!(
                first.contains(&format!("{bundle}/{file}")) && first.contains(needle),
                "{case}: {args:?}: the first line should name {file} and say `{needle}`:\n{stderr}"
            );
        }
    }

    // A weights file that is not safetensors at all.
    let bundle = damaged_bundle(&work.path().join("garbage"), |_| {});
    std::fs::write(bundle.join("model.safetensors"), b"not safetensors").unwrap();
    let bundle = bundle.to_str().unwrap();
    fails(
        &["eval", "--run", bundle, "--device", "cpu"],
        work.path(),
        &format!("{bundle}/model.safetensors"),
    );
}

/// A run whose training ended (`finished.json` beside its checkpoint) has
/// nothing to resume; the same checkpoint without the mark resumes.
#[test]
fn resume_refuses_a_finished_run() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["config.json", "state.safetensors", "finished.json"] {
        std::fs::copy(trained_run().join(file), dir.join(file)).unwrap();
    }
    let resume = [
        "train",
        "--resume",
        dir.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    fails(&resume, work.path(), "already finished training");
    std::fs::remove_file(dir.join("finished.json")).unwrap();
    ok(&resume, work.path());
}

#[test]
fn resume_refuses_an_edited_config_naming_it() {
    let work = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(trained_run().join("config.json")).unwrap();
    for (key, value) in [
        ("batch_size", Value::from(0)),
        ("base_lr", Value::from(-1.0)),
        ("metric_thresh", Value::from(3.0)),
    ] {
        let dir = work.path().join(key);
        std::fs::create_dir_all(&dir).unwrap();
        let mut config: Value = serde_json::from_str(&text).unwrap();
        config[key] = value;
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let stderr = fails(
            &[
                "train",
                "--resume",
                dir.to_str().unwrap(),
                "--device",
                "cpu",
            ],
            work.path(),
            &format!("{}/config.json: {key}", dir.display()),
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn flag_errors_exit_1_and_a_negative_value_says_how_to_write_it() {
    let work = tempfile::tempdir().unwrap();
    let cwd = work.path();
    // A negative number after a space reads as a flag: say how to write it.
    let stderr = fails(&["eval", "--thresh", "-0.1"], cwd, "--thresh=-0.1");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    fails(&["predict", "--thresh", "-2", "x.png"], cwd, "--thresh=-2");
    fails(
        &["train", "--base-lr", "-1e-3", "--data", "x"],
        cwd,
        "--base-lr=-1e-3",
    );
    // Written that way it reaches the range check.
    fails(
        &["eval", "--thresh=-0.1"],
        cwd,
        "--thresh must be between 0 and 1",
    );
    // A width that would only abort on allocation.
    fails(
        &["train", "--width", "100000", "--data", "x"],
        cwd,
        "--width",
    );
    // Other flag errors exit 1 as well (clap's own status is 2).
    fails(&["train", "--no-such-flag"], cwd, "--no-such-flag");
    fails(&["eval", "--bs", "many"], cwd, "many");
    fails(&["no-such-command"], cwd, "no-such-command");
    fails(&[], cwd, "Usage");
    // Help and version are not errors.
    for flag in ["--help", "--version"] {
        let output = run(&[flag], cwd);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    }
}

#[test]
fn train_refuses_a_folder_that_is_not_its_own_and_changes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let folder = work.path().join("mine");
    std::fs::create_dir_all(&folder).unwrap();
    let files = [
        ("config.json", "{\"my\": \"settings\"}\n"),
        ("history.csv", "date,amount\n2024-01-01,3\n"),
        ("events.jsonl", "{\"party\": true}\n"),
    ];
    for (name, content) in files {
        std::fs::write(folder.join(name), content).unwrap();
    }
    let stderr = fails(
        &train_flags(dataset().to_str().unwrap(), folder.to_str().unwrap(), &[]),
        work.path(),
        folder.to_str().unwrap(),
    );
    assert!(stderr.contains("not empty"), "{stderr}");
    for (name, content) in files {
        assert_eq!(
            std::fs::read_to_string(folder.join(name)).unwrap(),
            content,
            "{name} changed"
        );
    }
    assert_eq!(std::fs::read_dir(&folder).unwrap().count(), files.len());
    assert!(!work.path().join("latest").exists());

    // Any other file is refused too, and so is a run that has a checkpoint.
    let other = work.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "x").unwrap();
    fails(
        &train_flags(dataset().to_str().unwrap(), other.to_str().unwrap(), &[]),
        work.path(),
        "not empty",
    );
    fails(
        &train_flags(
            dataset().to_str().unwrap(),
            trained_run().to_str().unwrap(),
            &[],
        ),
        work.path(),
        "already holds a run",
    );
}

#[test]
fn a_bad_image_stops_training_with_advice_that_exists_and_the_run_can_start_again() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    std::fs::create_dir_all(data.join("train")).unwrap();
    std::fs::copy(dataset().join("train.csv"), data.join("train.csv")).unwrap();
    for entry in std::fs::read_dir(dataset().join("train")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, data.join("train").join(path.file_name().unwrap())).unwrap();
    }
    let bad = data.join("train/000005.jpg");
    let good = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, b"this is not a JPEG").unwrap();
    let run_dir = work.path().join("run");
    let flags = train_flags(
        data.to_str().unwrap(),
        run_dir.to_str().unwrap(),
        &["--epochs", "0"],
    );
    let stderr = fails(&flags, work.path(), "000005.jpg");
    assert!(!stderr.contains("skip_bad_images"), "{stderr}");
    assert!(!stderr.contains("skip-bad-images"), "{stderr}");
    assert!(
        !run_dir.join("state.safetensors").exists(),
        "the failure came before the first checkpoint"
    );

    // The folder the failed start left holds only our files: a new start
    // in it is allowed and begins from nothing.
    std::fs::write(&bad, good).unwrap();
    let output = ok(&flags, work.path());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("starting it again"),
        "{}",
        text(&output)
    );
    assert_eq!(epoch_ends(&run_dir).len(), 1, "old events were kept");
    let history = std::fs::read_to_string(run_dir.join("history.csv")).unwrap();
    assert_eq!(history.lines().count(), 2, "{history}");
}

#[test]
fn csv_errors_are_short_and_say_what_is_wrong_first() {
    let work = tempfile::tempdir().unwrap();
    let cwd = work.path();
    let data = work.path().join("data");
    std::fs::create_dir_all(data.join("train")).unwrap();
    let csv_path = data.join("train.csv");
    let original = std::fs::read_to_string(dataset().join("train.csv")).unwrap();
    for entry in std::fs::read_dir(dataset().join("train")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, data.join("train").join(path.file_name().unwrap())).unwrap();
    }
    let data_str = data.to_str().unwrap();
    let mut lines: Vec<String> = original.lines().map(str::to_string).collect();
    let train_csv = |lines: &[String]| {
        std::fs::write(&csv_path, lines.join("\n") + "\n").unwrap();
    };

    // An unclosed quote on line 11: one short message naming the line.
    let mut broken = lines.clone();
    broken[10] = format!("\"{}", broken[10]);
    train_csv(&broken);
    let stderr = fails(&train_flags(data_str, "r1", &[]), cwd, "train.csv: line 11");
    assert!(stderr.lines().count() <= 3, "{stderr}");
    assert!(!stderr.contains(&lines[40]), "echoes the file:\n{stderr}");

    // Every row in validation: the error says that, first.
    let all_valid: Vec<String> = lines
        .iter()
        .map(|line| line.replace(",False", ",True"))
        .collect();
    train_csv(&all_valid);
    let stderr = fails(&train_flags(data_str, "r2", &[]), cwd, "no training rows");
    assert!(!stderr.contains("vocab"), "{stderr}");

    // The same image twice.
    let mut duplicate = lines.clone();
    let first = duplicate[2].clone();
    let name = first.split(',').next().unwrap().to_string();
    duplicate.push(format!("{name},,True"));
    train_csv(&duplicate);
    let stderr = fails(&train_flags(data_str, "r3", &[]), cwd, &name);
    assert!(stderr.contains("rows 2 and 145"), "{stderr}");

    // Blank lines at the end are fine: training starts (and is cut short).
    lines.extend(["".to_string(), String::new()]);
    train_csv(&lines);
    let stopped = run(
        &train_flags(data_str, "r4", &["--stop-after-steps", "1"]),
        cwd,
    );
    assert_eq!(stopped.status.code(), Some(130), "{}", text(&stopped));
    for dir in ["r1", "r2", "r3"] {
        assert!(!cwd.join(dir).exists(), "{dir} was left behind");
    }
}

/// `synth --image-size WxH` writes every image at that size; a malformed or
/// out-of-range size is one clear error and writes nothing.
#[test]
fn synth_writes_images_of_the_asked_size() {
    let work = tempfile::tempdir().unwrap();
    let cwd = work.path();
    let common = [
        "synth",
        "--n-train",
        "6",
        "--n-valid",
        "2",
        "--classes",
        "2",
    ];
    let with = |out: &str, size: &str| {
        let mut args = common.to_vec();
        args.extend(["--out", out, "--image-size", size]);
        args.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    let args = with("sized", "80x60");
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>(), cwd);
    let images: Vec<_> = std::fs::read_dir(cwd.join("sized/train"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(images.len(), 8);
    for path in images {
        let image = multilabel_data::decode_rgb(&path).unwrap();
        assert_eq!(image.dimensions(), (80, 60), "{}", path.display());
    }
    for (out, size, needle) in [
        ("bad1", "80", "WIDTHxHEIGHT"),
        ("bad2", "80x-60", "WIDTHxHEIGHT"),
        ("bad3", "8x60", "image size 8x60"),
    ] {
        let args = with(out, size);
        fails(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            cwd,
            needle,
        );
        assert!(!cwd.join(out).exists(), "{out} was created");
    }
}

/// `eval --per-class` reports a threshold per class with the held-out
/// estimate, `--save` stores them in model.json (nothing else in the bundle
/// changes), `predict` then uses them and says so, and `--thresh` overrides
/// them. `--save` alone is a flag error.
#[test]
fn per_class_thresholds_are_chosen_saved_and_used() {
    let work = tempfile::tempdir().unwrap();
    let run_dir = work.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    for file in ["model.safetensors", "config.json", "model.json"] {
        std::fs::copy(trained_run().join(file), run_dir.join(file)).unwrap();
    }
    let weights = std::fs::read(run_dir.join("model.safetensors")).unwrap();
    let run_arg = run_dir.to_str().unwrap();
    let json = work.path().join("eval.json");
    let out = ok(
        &[
            "eval",
            "--run",
            run_arg,
            "--device",
            "cpu",
            "--per-class",
            "--save",
            "--json",
            json.to_str().unwrap(),
            // A threshold among the sweep's, so each class's own can only beat it.
            "--thresh",
            "0.05",
        ],
        work.path(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("per class, held-out halves"), "{stdout}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let per_class = &report["per_class_thresholds"];
    let classes = per_class["classes"].as_array().unwrap();
    assert_eq!(classes.len(), 3);
    let chosen: Vec<f64> = classes
        .iter()
        .map(|c| c["thresh"].as_f64().unwrap())
        .collect();
    // Each class's F1 at its own threshold is at least its F1 at the single one.
    for (class, single) in classes.iter().zip(report["per_class"].as_array().unwrap()) {
        assert!(class["f1"].as_f64().unwrap() >= single["f1"].as_f64().unwrap() - 1e-12);
    }
    for key in ["held_out_single", "held_out_per_class"] {
        let acc = per_class[key]["accuracy_multi"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{key}: {acc}");
    }
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("model.json")).unwrap())
            .unwrap();
    let saved: Vec<f64> = meta["class_thresholds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    assert_eq!(saved.len(), 3);
    for (a, b) in saved.iter().zip(&chosen) {
        assert!((a - b).abs() < 1e-6, "saved {saved:?}, reported {chosen:?}");
    }
    assert_eq!(
        std::fs::read(run_dir.join("model.safetensors")).unwrap(),
        weights
    );

    let image = first_image();
    let predict = [
        "predict",
        "--run",
        run_arg,
        "--device",
        "cpu",
        image.to_str().unwrap(),
    ];
    let out = ok(&predict, work.path());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("using the per-class thresholds"),
        "{}",
        text(&out)
    );
    let mut with_thresh = predict.to_vec();
    with_thresh.extend(["--thresh", "0.5"]);
    let out = ok(&with_thresh, work.path());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("per-class"));

    fails(
        &["eval", "--run", run_arg, "--save"],
        work.path(),
        "--per-class",
    );
}

/// `eval --tta` reports the TTA predictions next to the plain ones, in the
/// table and in eval.json; the plain figures do not change.
#[test]
fn eval_with_tta_reports_both_predictions() {
    let work = tempfile::tempdir().unwrap();
    let run_arg = trained_run().to_str().unwrap();
    let plain_json = work.path().join("plain.json");
    let tta_json = work.path().join("tta.json");
    let base = ["eval", "--run", run_arg, "--device", "cpu", "--plot"];
    let plot = work.path().join("sweep.png");
    let mut args: Vec<&str> = base.to_vec();
    args.extend([
        plot.to_str().unwrap(),
        "--json",
        plain_json.to_str().unwrap(),
    ]);
    ok(&args, work.path());
    let mut args: Vec<&str> = base.to_vec();
    args.extend([
        plot.to_str().unwrap(),
        "--json",
        tta_json.to_str().unwrap(),
        "--tta",
        "--tta-n",
        "2",
    ]);
    let out = ok(&args, work.path());
    assert!(String::from_utf8_lossy(&out.stdout).contains("TTA (n=2, beta=0.25)"));
    let read =
        |p: &Path| -> Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let (plain, with_tta) = (read(&plain_json), read(&tta_json));
    assert!(plain.get("tta").is_none());
    assert_eq!(plain["map"], with_tta["map"]);
    assert_eq!(plain["accuracy_multi"], with_tta["accuracy_multi"]);
    let tta = &with_tta["tta"];
    assert_eq!(tta["config"]["n"], 2);
    for key in ["map", "accuracy_multi", "valid_loss"] {
        assert!(tta[key].as_f64().unwrap().is_finite(), "{key}");
    }
    fails(
        &["eval", "--run", run_arg, "--tta", "--tta-n", "0"],
        work.path(),
        "--tta-n",
    );
}

/// `predict` over a folder (recursively, images only), a CSV of file names
/// and files, writing CSV or JSON lines: a broken image is listed and
/// skipped (exit 0) unless --strict (exit 1, nothing written); the labels
/// written are the classes above the threshold.
#[test]
fn predict_reads_folders_and_csvs_and_skips_broken_images() {
    let work = tempfile::tempdir().unwrap();
    let cwd = work.path();
    let run_arg = trained_run().to_str().unwrap();
    let images: Vec<PathBuf> = {
        let mut all: Vec<PathBuf> = std::fs::read_dir(dataset().join("train"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        all.sort();
        all.truncate(5);
        all
    };
    let folder = cwd.join("photos");
    std::fs::create_dir_all(folder.join("nested/deeper")).unwrap();
    for (i, image) in images.iter().enumerate() {
        let to = if i % 2 == 0 {
            folder.join(format!("a{i}.jpg"))
        } else {
            folder.join(format!("nested/deeper/b{i}.JPG"))
        };
        std::fs::copy(image, to).unwrap();
    }
    std::fs::write(folder.join("notes.txt"), b"not an image").unwrap();
    std::fs::write(folder.join("nested/broken.jpg"), b"\xff\xd8 truncated").unwrap();
    // A link back to the top folder is not followed (it would loop).
    #[cfg(unix)]
    std::os::unix::fs::symlink(&folder, folder.join("nested/loop")).unwrap();
    let folder_arg = folder.to_str().unwrap();

    let out_csv = cwd.join("p.csv");
    let base = [
        "predict", "--run", run_arg, "--device", "cpu", "--bs", "2", "--thresh", "0.5",
    ];
    let mut args = base.to_vec();
    args.extend([folder_arg, "--out", out_csv.to_str().unwrap()]);
    let output = ok(&args, cwd);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("skipped 1 of 6 images"), "{stderr}");
    assert!(stderr.contains("broken.jpg"), "{stderr}");
    let text = std::fs::read_to_string(&out_csv).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(trained_run().join("model.json")).unwrap())
            .unwrap();
    let vocab: Vec<&str> = meta["vocab"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(header[0], "file");
    assert_eq!(&header[1..header.len() - 1], &vocab[..]);
    assert_eq!(header[header.len() - 1], "labels");
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 5);
    for row in &rows {
        let probs: Vec<f64> = row[1..=vocab.len()]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        assert!(probs.iter().all(|p| (0.0..=1.0).contains(p)));
        let mut above: Vec<&str> = vocab
            .iter()
            .zip(&probs)
            .filter(|(_, p)| **p > 0.5)
            .map(|(n, _)| *n)
            .collect();
        let mut written: Vec<&str> = row[vocab.len() + 1].split_whitespace().collect();
        above.sort();
        written.sort();
        assert_eq!(above, written, "{row:?}");
    }
    assert!(rows.iter().any(|r| r[0].ends_with("deeper/b1.JPG")));

    // --tta: the same rows; beta 1 is the plain prediction, beta 0.25 moves it.
    let probs_of = |path: &Path| -> Vec<Vec<f64>> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| {
                let fields: Vec<&str> = l.split(',').collect();
                fields[1..=vocab.len()]
                    .iter()
                    .map(|p| p.parse().unwrap())
                    .collect()
            })
            .collect()
    };
    let plain = probs_of(&out_csv);
    for (beta, same) in [("1", true), ("0.25", false)] {
        let tta_csv = cwd.join(format!("tta-{beta}.csv"));
        let mut args = base.to_vec();
        args.extend([folder_arg, "--out", tta_csv.to_str().unwrap()]);
        args.extend(["--tta", "--tta-n", "2", "--tta-beta", beta]);
        ok(&args, cwd);
        let tta = probs_of(&tta_csv);
        assert_eq!(tta.len(), plain.len());
        let max_diff = plain
            .iter()
            .flatten()
            .zip(tta.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        if same {
            assert!(max_diff <= 2e-6, "beta 1 differs from plain by {max_diff}");
        } else {
            assert!(max_diff > 1e-4, "TTA changed nothing");
        }
    }

    // --strict: the broken image stops it, naming the file; nothing written.
    let strict_csv = cwd.join("strict.csv");
    let mut args = base.to_vec();
    args.extend([
        folder_arg,
        "--out",
        strict_csv.to_str().unwrap(),
        "--strict",
    ]);
    fails(&args, cwd, "broken.jpg");
    assert!(!strict_csv.exists());

    // The dataset's own CSV, as JSON lines: one line per row.
    let out_jsonl = cwd.join("p.jsonl");
    let csv = dataset().join("train.csv");
    let mut args = base.to_vec();
    args.extend([
        "--csv",
        csv.to_str().unwrap(),
        "--out",
        out_jsonl.to_str().unwrap(),
    ]);
    ok(&args, cwd);
    let n_rows = std::fs::read_to_string(&csv)
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count();
    let lines: Vec<Value> = std::fs::read_to_string(&out_jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), n_rows);
    assert_eq!(lines[0]["probs"].as_object().unwrap().len(), vocab.len());
    assert!(lines[0]["labels"].is_array());

    // Bad requests: an unknown format, nothing to read, a missing column.
    let mut args = base.to_vec();
    args.extend([folder_arg, "--out", "p.txt"]);
    fails(&args, cwd, ".csv or .jsonl");
    fails(&base, cwd, "nothing to predict");
    let mut args = base.to_vec();
    args.extend([folder_arg, "--tta-n", "2"]);
    fails(&args, cwd, "--tta");
    let mut args = base.to_vec();
    args.extend(["--csv", csv.to_str().unwrap(), "--column", "path"]);
    fails(&args, cwd, "no column named `path`");
}
