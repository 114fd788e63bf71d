#!/usr/bin/env bash
# Builds the artifacts `bench/gpu/run.sh` runs on the GPU machine, into
# bench/gpu/artifacts/ (git-ignored): the release `multilabel`, the test
# binaries of the device tests and the `bench-cpu` benchmark (which runs
# PyTorch beside us with --device cuda), stripped and compressed with xz
# (the device tool carries at most 64 MiB, and that machine has no Rust),
# plus manifest.json.
#
#   bench/gpu/prepare.sh cudnn   # the CUDA + cuDNN build (default), for the H200
#   bench/gpu/prepare.sh cuda    # CUDA without cuDNN
#   bench/gpu/prepare.sh cpu     # a CPU set, for a dry run of run.sh here
#
# The CUDA sets use the pinned toolkit of .ci/cuda-toolkit.sh (CUDA 13.0,
# CUDA_COMPUTE_CAP=90 unless set). A first CUDA build takes 25-60 minutes
# on 2 cores; later ones rebuild only this workspace.
set -euo pipefail

flavour=${1:-cudnn}
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
artifacts=$root/bench/gpu/artifacts
target=${CARGO_TARGET_DIR:-$root/target}

case "$flavour" in
cpu)
    features=()
    tests=(generic_path)
    packages=(-p multilabel-resnet)
    ;;
cuda | cudnn)
    eval "$(.ci/cuda-toolkit.sh build)"
    features=(--features "$flavour")
    tests=(device)
    # The ResNet ops (fused BatchNorm among them) and the fused Adam.
    packages=(-p multilabel-resnet -p multilabel-train)
    ;;
*)
    echo "usage: $0 cudnn|cuda|cpu" >&2
    exit 2
    ;;
esac

start=$SECONDS
cargo build --release --locked "${features[@]}"
build_seconds=$((SECONDS - start))

# The test binaries, built in release like the program; cargo names them.
test_args=()
for t in "${tests[@]}"; do test_args+=(--test "$t"); done
test_bins=$(cargo test --release --locked "${features[@]}" "${packages[@]}" "${test_args[@]}" \
    --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        crate = m["package_id"].split("#")[-1].split("@")[0].replace("multilabel-", "")
        print(crate + "-" + m["target"]["name"], m["executable"])')
# The benchmark binary (`just bench-cpu`), with the same features.
bench_bin=$(cargo bench --locked "${features[@]}" --bench cpu --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["bench"]:
        print(m["executable"])')
total_seconds=$((SECONDS - start))

rm -rf "$artifacts"
mkdir -p "$artifacts"
pack() { # SOURCE NAME
    strip -o "$artifacts/$2" "$1"
    xz -9 -T0 -f "$artifacts/$2"
}
pack "$target/release/multilabel" multilabel
pack "$bench_bin" bench-cpu
while read -r name path; do
    [ -n "$name" ] && pack "$path" "test-$name"
done <<<"$test_bins"

python3 - "$artifacts" "$flavour" "$build_seconds" "$total_seconds" "$target/release/multilabel" <<'PY'
import json, os, subprocess, sys
artifacts, flavour, build_seconds, total_seconds, binary = sys.argv[1:]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
files = {name: os.path.getsize(os.path.join(artifacts, name)) for name in sorted(os.listdir(artifacts))}
manifest = {
    "flavour": flavour,
    "commit": commit + ("-dirty" if dirty else ""),
    "cuda_compute_cap": os.environ.get("CUDA_COMPUTE_CAP"),
    "build_seconds": int(build_seconds),
    "build_and_tests_seconds": int(total_seconds),
    "unstripped_bytes": os.path.getsize(binary),
    "compressed_bytes": files,
    "total_compressed_bytes": sum(files.values()),
}
json.dump(manifest, open(os.path.join(artifacts, "manifest.json"), "w"), indent=2)
print(json.dumps(manifest, indent=2))
PY
du -sh "$artifacts"
total=$(du -sb "$artifacts" | cut -f1)
if [ "$total" -gt $((64 * 1024 * 1024)) ]; then
    echo "prepare.sh: $artifacts is $total bytes, over the device tool's 64 MiB" >&2
    exit 1
fi
