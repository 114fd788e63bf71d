//! Event sinks, the smoothed loss and run folders.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarMap};
use multilabel_train::events::*;
use multilabel_train::optim::AdamState;
use multilabel_train::run::{ModelMeta, RunDir, TrainState, atomic_write};

fn record(phase: &str, epoch: usize) -> EpochRecord {
    EpochRecord {
        phase: phase.into(),
        epoch,
        train_loss: 0.942663,
        valid_loss: 0.703737,
        metrics: vec![("accuracy_multi".into(), 0.233307)],
        seconds: 8.4,
    }
}

#[test]
fn smoothed_loss_is_debiased_ema() {
    let mut s = SmoothedLoss::default();
    // The first value is returned exactly: (0.02·x) / (1 − 0.98).
    assert!((s.push(2.0) - 2.0).abs() < 1e-12);
    let v = s.push(1.0);
    let expected = (0.98 * 0.02 * 2.0 + 0.02 * 1.0) / (1.0 - 0.98f64.powi(2));
    assert!((v - expected).abs() < 1e-12);
    for _ in 0..2000 {
        s.push(0.5);
    }
    assert!((s.value() - 0.5).abs() < 1e-9);
}

#[test]
fn epoch_table_has_fastai_layout() {
    let mut table = EpochTable::new(Vec::new());
    table
        .on_event(&Event::FitBegin {
            phase: "frozen".into(),
            n_epochs: 1,
            n_batches: 39,
            lr_max: vec![3e-3],
            resumed_at: None,
        })
        .unwrap();
    table
        .on_event(&Event::EpochEnd(record("frozen", 0)))
        .unwrap();
    table
        .on_event(&Event::EpochEnd(record("frozen", 1)))
        .unwrap();
    let text = String::from_utf8(table.into_inner()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "epoch     train_loss  valid_loss  accuracy_multi  time    "
    );
    assert_eq!(
        lines[1],
        "0         0.942663    0.703737    0.233307        00:08"
    );
    assert_eq!(
        lines[2],
        "1         0.942663    0.703737    0.233307        00:08"
    );
    assert_eq!(format_time(3725.0), "1:02:05");
}

#[test]
fn history_csv_rewrites_and_keeps_rows_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.csv");
    let mut h = HistoryCsv::open(&path).unwrap();
    h.on_event(&Event::EpochEnd(record("frozen", 0))).unwrap();
    h.on_event(&Event::EpochEnd(record("frozen", 1))).unwrap();
    let mut h = HistoryCsv::open(&path).unwrap();
    h.retain(|phase, epoch| phase == "frozen" && epoch < 1);
    h.on_event(&Event::EpochEnd(record("unfrozen", 0))).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "phase,epoch,train_loss,valid_loss,accuracy_multi,seconds"
    );
    assert_eq!(lines.len(), 3);
    assert!(
        lines[1].starts_with("frozen,0,0.942663,0.703737,0.233307,8.4"),
        "{}",
        lines[1]
    );
    assert!(lines[2].starts_with("unfrozen,0,"));
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn events_jsonl_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let events = vec![
        Event::EpochBegin {
            phase: "frozen".into(),
            epoch: 0,
            n_epochs: 2,
        },
        Event::BatchEnd {
            phase: "frozen".into(),
            epoch: 0,
            batch: 3,
            n_batches: 39,
            loss: 0.5,
            smooth_loss: 0.6,
            lrs: vec![1e-4, 1e-3],
            mom: 0.95,
        },
        Event::EpochEnd(record("frozen", 0)),
    ];
    let mut sink = EventsJsonl::open(&path).unwrap();
    for e in &events {
        sink.on_event(e).unwrap();
    }
    let read: Vec<Event> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(read, events);
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .starts_with("{\"event\":\"epoch_begin\"")
    );
}

fn varmap() -> VarMap {
    let vm = VarMap::new();
    vm.get(
        (2, 3),
        "layer.weight",
        Init::Const(0.5),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    vm.get(
        3,
        "bn.running_mean",
        Init::Const(0.1),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    vm
}

#[test]
fn model_bundle_and_checkpoint_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path().join("runs/demo")).unwrap();
    let vm = varmap();
    let meta = ModelMeta {
        arch: "resnet18".into(),
        base_width: 16,
        vocab: vec!["cat".into(), "dog".into()],
        image_size: 64,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
        threshold: 0.48,
        class_thresholds: None,
        model: serde_json::json!({"arch": "resnet18"}),
    };
    run.save_model(&vm, &meta).unwrap();
    assert_eq!(run.load_model_meta().unwrap(), meta);
    let weights = run.load_model_weights(&Device::Cpu).unwrap();
    assert_eq!(
        weights["bn.running_mean"].to_vec1::<f32>().unwrap(),
        vec![0.1; 3]
    );

    let state = TrainState {
        seed: 42,
        fit: 1,
        epoch: 2,
        batch: 5,
        global_step: 17,
        smooth_loss: SmoothedLoss {
            beta: 0.98,
            average: 0.3,
            count: 9,
        },
        frozen: false,
        finished: false,
    };
    let mut opt = AdamState::default();
    opt.tensors.insert(
        "layer.weight.grad_avg".into(),
        Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    opt.steps.insert("layer.weight".into(), 17);
    run.save_checkpoint(&state, &vm, &opt).unwrap();
    let ck = run.load_checkpoint(&Device::Cpu).unwrap().unwrap();
    assert_eq!(ck.state, state);
    assert_eq!(ck.optimizer.steps["layer.weight"], 17);
    assert_eq!(
        ck.optimizer.tensors["layer.weight.grad_avg"].dims(),
        &[2, 3]
    );
    assert_eq!(
        ck.weights["layer.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        vec![0.5; 6]
    );

    run.mark_latest().unwrap();
    let latest = RunDir::open(dir.path().join("runs/latest")).unwrap();
    assert_eq!(latest.load_model_meta().unwrap().threshold, 0.48);
    let other = RunDir::create(dir.path().join("runs/second")).unwrap();
    other.mark_latest().unwrap();
    assert_eq!(
        std::fs::canonicalize(dir.path().join("runs/latest")).unwrap(),
        std::fs::canonicalize(other.path()).unwrap()
    );
}

#[test]
fn atomic_write_replaces_whole_file_and_reports_bad_paths() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.json");
    atomic_write(&path, b"first").unwrap();
    atomic_write(&path, b"second").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"second");
    let err = atomic_write(&dir.path().join("missing/a.json"), b"x")
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing/a.json"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    assert!(RunDir::open(dir.path().join("nope")).is_err());
    assert!(RunDir::create(dir.path().join("a.json/sub")).is_err());
}
