# multilabel: entry points. Extra arguments pass through to the command,
# e.g. `just train --epochs 1`, `just eval --thresh 0.48`.
# Pick a GPU backend with `MULTILABEL_FEATURES=cuda just train` (or cudnn, metal).

features := env("MULTILABEL_FEATURES", "")
cargo_features := if features == "" { "" } else { "--features " + features }
# A CUDA build links the NVIDIA driver's libcuda.so.1 and cannot start
# without it: say so in one line before cargo builds anything.
driver_check := if features =~ "cud" { "bench/gpu/driver-check.sh && " } else { "" }
run := driver_check + "cargo run --release --quiet " + cargo_features + " --"

# list the recipes
default:
    @just --list

# fine-tune ResNet-50 on PASCAL 2007 with fastai's chapter-6 recipe
[no-exit-message]
train *ARGS:
    {{run}} train {{ARGS}}

# evaluate the latest run (or --run DIR) at a threshold, e.g. --thresh 0.48
[no-exit-message]
eval *ARGS:
    {{run}} eval {{ARGS}}

# print the labels the latest run predicts for images
[no-exit-message]
predict *ARGS:
    {{run}} predict {{ARGS}}

# fastai's learning-rate finder
[no-exit-message]
lr-find *ARGS:
    {{run}} lr-find {{ARGS}}

# offline demo: synthetic data, narrow ResNet from scratch, CPU, a few minutes
[no-exit-message]
demo *ARGS:
    {{run}} demo {{ARGS}}

# write a synthetic PASCAL-layout dataset
[no-exit-message]
synth *ARGS:
    {{run}} synth {{ARGS}}

# draw a batch as a PNG grid with labels, e.g. --data DIR --out batch.png
[no-exit-message]
show-batch *ARGS:
    {{run}} show-batch {{ARGS}}

# download and verify PASCAL 2007 into data/
[no-exit-message]
download *ARGS:
    {{run}} download {{ARGS}}

# the whole test suite (CI runs this, then check-cuda)
test:
    cargo test --workspace

# (The pinned CUDA 13.0 toolkit comes from PyPI into .venv-cuda; CUDA_COMPUTE_CAP=90.)
# compile-check the CUDA builds (cuda, cudnn) without a GPU or driver, as CI does
check-cuda:
    #!/usr/bin/env bash
    set -euo pipefail
    eval "$(.ci/cuda-toolkit.sh check)"
    # Our own kernels are compiled by NVRTC at run time; compile them here so
    # a syntax error shows in CI, not on the GPU machine.
    for source in $(find crates -name '*.cu' | sort); do
        nvcc --ptx -arch=compute_90 "$source" -o /dev/null
        echo "check-cuda: $source compiles"
    done
    for feature in cuda cudnn; do
        start=$SECONDS
        cargo check --workspace --all-targets --locked --features "multilabel/$feature"
        echo "check-cuda: --features $feature checked in $((SECONDS - start)) s"
    done

# (sm_90 by default: set CUDA_COMPUTE_CAP for other GPUs. Running the binary needs the
# NVIDIA driver and the CUDA 13 libraries.)
# release build with cuDNN for H100/H200, on a machine without a GPU or driver
build-cuda *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    eval "$(.ci/cuda-toolkit.sh build)"
    start=$SECONDS
    cargo build --release --locked --features cudnn {{ARGS}}
    echo "build-cuda: built in $((SECONDS - start)) s: target/release/multilabel"

# (`just gpu-artifacts cpu` makes a CPU set, for a dry run of bench/gpu/run.sh here.)
# binaries for the GPU check (bench/gpu/run.sh), stripped and xz-compressed in bench/gpu/artifacts
gpu-artifacts FLAVOUR="cudnn":
    bench/gpu/prepare.sh {{FLAVOUR}}

# formatting and lints as CI would want them
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# every benchmark
bench: bench-data bench-resnet bench-cpu

# data pipeline images/s at 128 px (1 thread and all threads); `just bench-data DIR` adds a real dataset folder
bench-data *ARGS:
    cargo bench -p multilabel-data --bench data_pipeline -- {{ARGS}}

# ResNet-50 forward / forward+backward time per image, frozen and unfrozen
# (RESNET_BENCH_BATCH, RESNET_BENCH_SIZE, RESNET_BENCH_ITERS change the defaults 64, 128, 1)
bench-resnet *ARGS:
    cargo bench -p multilabel-resnet --bench resnet50 -- {{ARGS}}

# ResNet-50 training/eval/data images/s and peak memory next to PyTorch's and fastai's (same threads);
# e.g. `just bench-cpu --batch-size 16 --iters 2` (`--rounds 2` on a shared machine); writes target/bench/cpu.json.
# `--matrix`: ResNet-18/50 at 64/128/224 px; `--e2e [--seeds 3]`: the whole recipe vs fastai
# (see benches/cpu.rs for every flag)
bench-cpu *ARGS:
    cargo bench -p multilabel --bench cpu -- {{ARGS}}

# (Our kernels at MULTILABEL_SIMD=avx2, gemm built without its AVX-512 kernels in target/avx2,
# PyTorch at ATEN_CPU_CAPABILITY=avx2 with oneDNN capped at AVX2; the bench prints each side's level.)
# bench-cpu as an AVX2-only machine would run it, on an AVX-512 machine, e.g. `just bench-cpu-avx2 --matrix`
bench-cpu-avx2 *ARGS:
    MULTILABEL_SIMD=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 CARGO_TARGET_DIR=target/avx2 \
        cargo bench -p multilabel --no-default-features --bench cpu -- {{ARGS}}
