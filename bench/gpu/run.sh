#!/usr/bin/env bash
# The GPU check: runs the artifacts `bench/gpu/prepare.sh` built (on a
# machine with Rust, no GPU needed) on the borrowed GPU machine, which has
# no Rust and no network, and writes what it saw to $OUT/gpu.json.
#
# On the GPU machine (device tool), from the repository root:
#     run(command="bash bench/gpu/run.sh", carry=["bench/gpu/artifacts"], timeout_s=560)
# Here, as a dry run of every step on the CPU build (`just gpu-artifacts cpu`):
#     OUT=/tmp/gpu-out bash bench/gpu/run.sh
#
# Steps, each timed (tests 150 s, each bench 100 s, each training 90 s at
# most) and recorded even when an earlier one failed; $OUT/gpu.json is
# rewritten after each, so a run cut short still reports:
#   1. unpack the compressed binaries; on a CUDA set, point LD_LIBRARY_PATH at
#      the CUDA 13 libraries that PyTorch's `nvidia-*` wheels ship, and
#      record nvidia-smi's view of the GPU;
#   2. the device tests: each GPU op against the CPU kernels, forward and
#      gradients, and whole ResNet-18/50 training steps (with
#      NVIDIA_TF32_OVERRIDE=0, so cuBLAS and cuDNN compute in true f32 and
#      the 1e-4 tolerance holds); a CPU set runs the generic-path tests;
#   3. side by side with PyTorch on the same device (`bench-cpu --device`,
#      bench/pytorch_cpu.py): training frozen and unfrozen and eval
#      images/s and peak GPU memory on random tensors, the same model and
#      batch, steady state after warm-up: on CUDA in bf16 (PyTorch:
#      autocast + channels_last + fused AdamW), f32 and TF32 at batch 64 and
#      in bf16 at batch 256, into $OUT/bench-<precision>-<batch>.json; and
#      our loader's images/s on the machine's cores (bench-data.json);
#   4. ResNet-50 + fastai head at 128 px, batch 64, from random weights on a
#      generated dataset: a frozen and an unfrozen phase through the CLI,
#      images/s from the run's history.csv (the later epoch of each phase,
#      so start-up is not counted), plus the first-run ("cold") times: in
#      f32, and on CUDA also with --tf32 and in --precision bf16; then
#      f32 with `--kernels generic` (on CUDA: without the fused BatchNorm,
#      max-pool and cuDNN convolutions, so the runs show what they gain);
#   5. the whole recipe, fine_tune(3, freeze_epochs=3) on 2,501 + 2,510
#      generated 500×375 JPEGs, wall time to the saved model: ours through
#      the CLI (--precision auto) against bench/gpu/pytorch_fine_tune.py, a
#      plain PyTorch loop with the same recipe (240 s each at most).
#
# Knobs (environment): GPU_CHECK_ARCH (resnet50), GPU_CHECK_SIZE (128),
# GPU_CHECK_BS (64), GPU_CHECK_TRAIN (images per epoch, 1280),
# GPU_CHECK_VALID (128), GPU_CHECK_TEST_FILTER (a test-name filter),
# GPU_CHECK_BENCH_ITERS (timed steps per phase: 20 on CUDA, 2 on a CPU set),
# GPU_CHECK_PYTHON (the Python with torch: python3), GPU_CHECK_STEPS (a
# comma list of tests,bench,train,e2e: all by default), GPU_CHECK_E2E_TRAIN
# and GPU_CHECK_E2E_VALID (the whole recipe's images: 2501 and 2510).
# Expected under 10 minutes on an H200 with the defaults (never measured:
# no GPU has been lent yet); rerun a subset with GPU_CHECK_STEPS.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
artifacts=$here/artifacts
out=${OUT:-$here/out}
mkdir -p "$out"
log=$out/log.txt
: >"$log"
exec > >(tee -a "$log") 2>&1

arch=${GPU_CHECK_ARCH:-resnet50}
size=${GPU_CHECK_SIZE:-128}
bs=${GPU_CHECK_BS:-64}
n_train=${GPU_CHECK_TRAIN:-1280}
n_valid=${GPU_CHECK_VALID:-128}
filter=${GPU_CHECK_TEST_FILTER:-}
steps=${GPU_CHECK_STEPS:-tests,bench,train,e2e}
wants() { [[ ",$steps," == *",$1,"* ]]; }

work=$(mktemp -d /tmp/gpu-check-XXXXXX)
results=$work/results.jsonl
: >"$results"
started=$(date +%s)

say() { printf '== %s  %s\n' "$(date +%T)" "$*"; }
# record NAME STATUS SECONDS [KEY=NUMBER ...]: one JSON line per step.
record() {
    python3 - "$@" >>"$results" <<'PY'
import json, sys
name, status, seconds, *rest = sys.argv[1:]
entry = {"step": name, "status": status, "seconds": float(seconds)}
for pair in rest:
    key, value = pair.split("=", 1)
    try:
        entry[key] = float(value)
    except ValueError:
        entry[key] = value
print(json.dumps(entry))
PY
}

# report: every step so far into $OUT/gpu.json.
report() {
    python3 - "$results" "$out/gpu.json" "$flavour" "$device" "$arch" "$size" "$bs" "$n_train" "$started" <<'PY'
import json, platform, sys, time
results, target, flavour, device, arch, size, bs, n_train, started = sys.argv[1:]
steps = [json.loads(line) for line in open(results) if line.strip()]
report = {
    "flavour": flavour,
    "device": device,
    "host": platform.node(),
    "config": {"arch": arch, "size": int(size), "batch": int(bs), "train_images": int(n_train)},
    "wall_seconds": round(time.time() - int(started), 1),
    "all_passed": all(s["status"] == "pass" for s in steps),
    "steps": steps,
}
# The whole recipe's wall time, ours / PyTorch's (lower is better; goal ≤ 0.8).
e2e = {s["step"]: s for s in steps if s["step"].startswith("e2e-") and s["status"] == "pass"}
if "e2e-ours" in e2e and "e2e-pytorch" in e2e:
    report["e2e"] = {"ours_seconds": e2e["e2e-ours"]["seconds"],
                     "pytorch_seconds": e2e["e2e-pytorch"]["seconds"],
                     "ratio": round(e2e["e2e-ours"]["seconds"] / e2e["e2e-pytorch"]["seconds"], 3)}
json.dump(report, open(target, "w"), indent=2)
print(json.dumps(report, indent=2))
PY
}

if [ ! -f "$artifacts/manifest.json" ]; then
    echo "no artifacts in $artifacts: run bench/gpu/prepare.sh (just gpu-artifacts) first" >&2
    exit 1
fi
flavour=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["flavour"])' "$artifacts/manifest.json")
say "artifacts: $flavour ($(python3 -c 'import json, sys; m = json.load(open(sys.argv[1])); print(m["commit"])' "$artifacts/manifest.json"))"

# 1. Unpack.
bin=$work/bin
mkdir -p "$bin"
# xz through Python's lzma (always there with CPython; the xz tool may not be).
for packed in "$artifacts"/*.xz "$artifacts"/*.gz; do
    [ -e "$packed" ] || continue
    name=$(basename "${packed%.*}")
    python3 -c 'import gzip, lzma, shutil, sys
opener = lzma.open if sys.argv[1].endswith(".xz") else gzip.open
with opener(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)' "$packed" "$bin/$name" && chmod +x "$bin/$name"
done
multilabel=$bin/multilabel

device=cpu
if [ "$flavour" != cpu ]; then
    device=cuda
    nvidia_libs=$(python3 - <<'PY'
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
dirs = set()
for root in nvidia.__path__:
    for lib in glob.glob(os.path.join(root, "*", "lib")):
        dirs.add(lib)
print(":".join(sorted(dirs)))
PY
)
    export LD_LIBRARY_PATH=${nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
    # The CUDA wheels there (their versions decide which symbols resolve).
    python3 -m pip list 2>/dev/null | grep -iE '^(torch|nvidia-(cudnn|cublas|cuda-runtime|cuda-nvrtc|curand))' | tee "$out/wheels.txt"
    # Which libraries the binary resolves, and whether any is missing.
    ldd "$multilabel" | grep -E 'cuda|cublas|curand|nvrtc|cudnn|not found' | tee "$out/ldd.txt"
fi
"$multilabel" --version || true

# 2. The device tests (the generic-path tests on a CPU set).
say "tests"
for test in "$bin"/test-*; do
    wants tests || break
    [ -e "$test" ] || continue
    name=$(basename "$test")
    t0=$(date +%s.%N)
    # The half-precision tests print their errors for calibration.
    # shellcheck disable=SC2086
    NVIDIA_TF32_OVERRIDE=0 MULTILABEL_TEST_SHOW_ERRORS=1 timeout 150 "$test" --test-threads=1 $filter \
        --nocapture >"$out/$name.txt" 2>&1
    status=$?
    t1=$(date +%s.%N)
    seconds=$(python3 -c "print(round($t1 - $t0, 2))")
    summary=$(grep -E '^test result:' "$out/$name.txt" | tail -1)
    say "$name: exit $status in ${seconds}s: $summary"
    grep -E '^test .* FAILED$|panicked at|^thread .* panicked' "$out/$name.txt" | head -20
    record "$name" "$([ $status = 0 ] && echo pass || echo fail)" "$seconds" "summary=$summary"
    report >/dev/null
done

# 3. Side by side with PyTorch on the same device: on CUDA in f32, TF32
# and bf16 at batch $bs, and bf16 at batch 256; one f32 run on a CPU set.
bench() { # TAG PRECISION BATCH
    local tag=$1 precision=$2 batch=$3
    local t0 t1 status seconds
    say "bench $tag: ours and PyTorch, $arch at $size px, batch $batch, $precision on $device ($warmup warm-up + $iters timed steps)"
    rm -f "$work/target/bench/cpu.json"
    t0=$(date +%s.%N)
    CARGO_TARGET_DIR=$work/target timeout 100 "$bin/bench-cpu" --device "$device" \
        --python "${GPU_CHECK_PYTHON:-python3}" --arch "$arch" --size "$size" --batch-size "$batch" \
        --precision "$precision" --only train_frozen,train_unfrozen,eval --warmup "$warmup" \
        --iters "$iters" >"$out/bench-$tag.txt" 2>&1
    status=$?
    t1=$(date +%s.%N)
    seconds=$(python3 -c "print(round($t1 - $t0, 2))")
    tail -14 "$out/bench-$tag.txt"
    [ -f "$work/target/bench/cpu.json" ] && cp "$work/target/bench/cpu.json" "$out/bench-$tag.json"
    python3 - "$work/target/bench/cpu.json" "$status" "$seconds" "$tag" "$precision" "$batch" >>"$results" <<'PY'
import json, sys
path, status, seconds, tag, precision, batch = sys.argv[1:]
entry = {"step": f"bench-{tag}", "status": "pass" if status == "0" else "fail",
         "seconds": float(seconds), "precision": precision, "batch": int(batch)}
try:
    report = json.load(open(path))
except (OSError, ValueError):
    report = {}
for side in ("ours", "reference", "ratio"):
    for key, value in (report.get(side) or {}).items():
        entry[f"{side}_{key}"] = round(value, 3)
print(json.dumps(entry))
PY
    say "bench $tag: exit $status in ${seconds}s"
    report >/dev/null
}
if [ -x "$bin/bench-cpu" ] && wants bench; then
    if [ "$device" = cuda ]; then
        iters=${GPU_CHECK_BENCH_ITERS:-20}
        warmup=3
        bench "bf16-$bs" bf16 "$bs"
        bench "f32-$bs" f32 "$bs"
        bench "tf32-$bs" tf32 "$bs"
        bench bf16-256 bf16 256
        # The input pipeline's own speed on this machine's cores (decode,
        # crop, batch of 500×375 JPEGs; PyTorch/fastai's side needs fastai,
        # which the machine lacks): to set next to the training images/s.
        say "bench data: our loader on $(nproc) cores, $size px"
        rm -f "$work/target/bench/cpu.json"
        t0=$(date +%s.%N)
        CARGO_TARGET_DIR=$work/target timeout 100 "$bin/bench-cpu" --device cpu --no-pytorch \
            --size "$size" --batch-size "$bs" --only data --images 1024 >"$out/bench-data.txt" 2>&1
        status=$?
        t1=$(date +%s.%N)
        seconds=$(python3 -c "print(round($t1 - $t0, 2))")
        tail -6 "$out/bench-data.txt"
        [ -f "$work/target/bench/cpu.json" ] && cp "$work/target/bench/cpu.json" "$out/bench-data.json"
        python3 - "$work/target/bench/cpu.json" "$status" "$seconds" >>"$results" <<'PY'
import json, sys
path, status, seconds = sys.argv[1:]
entry = {"step": "bench-data", "status": "pass" if status == "0" else "fail", "seconds": float(seconds)}
try:
    ours = json.load(open(path)).get("ours") or {}
except (OSError, ValueError):
    ours = {}
for key in ("data_1_worker", "data_all_workers"):
    if key in ours:
        entry[key] = round(ours[key], 1)
print(json.dumps(entry))
PY
        say "bench data: exit $status in ${seconds}s"
        report >/dev/null
    else
        iters=${GPU_CHECK_BENCH_ITERS:-2}
        warmup=1
        bench "f32-$bs" f32 "$bs"
    fi
fi

# 4. Training through the CLI.
data=$work/data
if wants train; then
    say "generating $n_train + $n_valid images"
    "$multilabel" synth --out "$data" --n-train "$n_train" --n-valid "$n_valid" >/dev/null
fi
train() { # NAME, extra flags...
    local name=$1
    shift
    local run=$work/run-$name
    local t0 t1 status seconds
    t0=$(date +%s.%N)
    timeout 90 "$multilabel" train --data "$data" --run "$run" --device "$device" --arch "$arch" \
        --weights none --offline --size "$size" --bs "$bs" --seed 1 "$@" >"$out/train-$name.txt" 2>&1
    status=$?
    t1=$(date +%s.%N)
    seconds=$(python3 -c "print(round($t1 - $t0, 2))")
    tail -12 "$out/train-$name.txt"
    [ -f "$run/history.csv" ] && cp "$run/history.csv" "$out/history-$name.csv"
    # Images/s of the last epoch of each phase (steady state: the first
    # epoch pays for start-up, kernel compilation and algorithm search).
    python3 - "$run/history.csv" "$n_train" "$name" "$status" "$seconds" >>"$results" <<'PY'
import csv, json, sys
path, n_train, name, status, seconds = sys.argv[1:]
entry = {"step": f"train-{name}", "status": "pass" if status == "0" else "fail",
         "seconds": float(seconds)}
try:
    rows = list(csv.DictReader(open(path)))
except OSError:
    rows = []
for phase in ("frozen", "unfrozen"):
    epochs = [r for r in rows if r["phase"] == phase]
    if epochs:
        last = epochs[-1]
        entry[f"{phase}_epoch_seconds"] = float(last["seconds"])
        entry[f"{phase}_images_per_s"] = round(int(n_train) / float(last["seconds"]), 2)
        entry[f"{phase}_valid_loss"] = float(last["valid_loss"])
print(json.dumps(entry))
PY
    say "train $name: exit $status in ${seconds}s"
    report >/dev/null
}
if wants train; then
    say "training $arch at $size px, batch $bs: 2 frozen + 2 unfrozen epochs"
    train fine_tune --freeze-epochs 2 --epochs 2 --lr-mult 1 --base-lr 1e-3 --precision f32
    if [ "$device" = cuda ]; then
        # What TF32 convolutions and the bf16 body gain (the default on an H200
        # is bf16: --precision auto).
        say "the same with TF32 convolutions (--tf32)"
        train tf32 --freeze-epochs 2 --epochs 2 --lr-mult 1 --base-lr 1e-3 --precision f32 --tf32
        say "the same in bf16 (--precision bf16)"
        train bf16 --freeze-epochs 2 --epochs 2 --lr-mult 1 --base-lr 1e-3 --precision bf16
    fi
    # The generic ops for comparison: on CUDA, what the fused BatchNorm,
    # max-pool and cuDNN convolutions gain over candle's composites (both runs
    # use the fused Adam); on the CPU, the CPU kernels' gain.
    say "the same with the generic ops forced (--kernels generic)"
    train generic --freeze-epochs 2 --epochs 2 --lr-mult 1 --base-lr 1e-3 --kernels generic --precision f32
fi

# 5. The whole recipe on a PASCAL-sized set: `fine_tune(3, freeze_epochs=3)`
# at 128 px, batch 64, on 2,501 + 2,510 generated 500×375 JPEGs (10
# classes: the generator's most), wall time from start to the saved model,
# ours (`multilabel train`, --precision auto) against a plain PyTorch loop
# with the same recipe (bench/gpu/pytorch_fine_tune.py: DataLoader on every
# core, bf16 autocast, channels_last, fused AdamW).
e2e() { # NAME, command...
    local name=$1
    shift
    local t0 t1 status seconds
    t0=$(date +%s.%N)
    timeout 240 "$@" >"$out/e2e-$name.txt" 2>&1
    status=$?
    t1=$(date +%s.%N)
    seconds=$(python3 -c "print(round($t1 - $t0, 2))")
    tail -8 "$out/e2e-$name.txt"
    record "e2e-$name" "$([ $status = 0 ] && echo pass || echo fail)" "$seconds"
    say "e2e $name: exit $status in ${seconds}s"
    report >/dev/null
}
if wants e2e; then
    pascal=$work/pascal
    e2e_train=${GPU_CHECK_E2E_TRAIN:-2501}
    e2e_valid=${GPU_CHECK_E2E_VALID:-2510}
    say "generating $e2e_train + $e2e_valid PASCAL-sized JPEGs"
    "$multilabel" synth --out "$pascal" --n-train "$e2e_train" --n-valid "$e2e_valid" --classes 10 \
        --image-size 500x375 >/dev/null
    e2e ours "$multilabel" train --data "$pascal" --run "$work/run-e2e" --device "$device" \
        --arch "$arch" --weights none --offline --size "$size" --bs "$bs" --epochs 3 \
        --freeze-epochs 3 --seed 1
    [ -f "$work/run-e2e/history.csv" ] && cp "$work/run-e2e/history.csv" "$out/history-e2e.csv"
    precision=$([ "$device" = cuda ] && echo bf16 || echo f32)
    e2e pytorch "${GPU_CHECK_PYTHON:-python3}" "$here/pytorch_fine_tune.py" --data "$pascal" \
        --out "$work/pytorch-e2e.pt" --device "$device" --arch "$arch" --size "$size" \
        --bs "$bs" --epochs 3 --freeze-epochs 3 --precision "$precision"
fi

# 6. Everything into $OUT/gpu.json (also written after every step, so a
# run cut short by the device's time limit still reports what it did).
report
rm -rf "$work"
