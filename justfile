# multilabel: entry points. Extra arguments pass through to the command,
# e.g. `just train --epochs 1`, `just eval --thresh 0.48`.
# Pick a GPU backend with `MULTILABEL_FEATURES=cuda just train` (or cudnn, metal).

features := env("MULTILABEL_FEATURES", "")
cargo_features := if features == "" { "" } else { "--features " + features }
run := "cargo run --release --quiet " + cargo_features + " --"

# list the recipes
default:
    @just --list

# fine-tune ResNet-50 on PASCAL 2007 with fastai's chapter-6 recipe
train *ARGS:
    {{run}} train {{ARGS}}

# evaluate the latest run (or --run DIR) at a threshold, e.g. --thresh 0.48
eval *ARGS:
    {{run}} eval {{ARGS}}

# print the labels the latest run predicts for images
predict *ARGS:
    {{run}} predict {{ARGS}}

# fastai's learning-rate finder
lr-find *ARGS:
    {{run}} lr-find {{ARGS}}

# offline demo: synthetic data, narrow ResNet from scratch, CPU, a few minutes
demo *ARGS:
    {{run}} demo {{ARGS}}

# write a synthetic PASCAL-layout dataset
synth *ARGS:
    {{run}} synth {{ARGS}}

# draw a batch as a PNG grid with labels, e.g. --data DIR --out batch.png
show-batch *ARGS:
    {{run}} show-batch {{ARGS}}

# download and verify PASCAL 2007 into data/
download *ARGS:
    {{run}} download {{ARGS}}

# the whole test suite (what CI runs)
test:
    cargo test --workspace

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

# ResNet-50 training/eval/data images/s and peak memory next to PyTorch's (same threads);
# e.g. `just bench-cpu --batch-size 16 --iters 2`; writes target/bench/cpu.json
bench-cpu *ARGS:
    cargo bench -p multilabel --bench cpu -- {{ARGS}}
