#!/usr/bin/env bash
# Installs the pinned CUDA toolkit from PyPI wheels (no GPU, no driver, no
# system packages needed) and prints the environment a CUDA build needs, as
# `export` lines for `eval`:
#
#   eval "$(.ci/cuda-toolkit.sh check)"   # nvcc + headers: enough for `cargo check`
#   eval "$(.ci/cuda-toolkit.sh build)"   # + cudart, nvrtc, cuBLAS, cuRAND, cuDNN and
#                                         #   a link-time libcuda stub: a release build
#
# Why these pins:
# - CUDA 13.0 (cuda-toolkit 13.0.3.0, nvcc 13.0.88) is what the H200 machines
#   we borrow run (driver 580). candle loads its kernels as PTX, and a driver
#   refuses PTX made by a newer toolkit (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
#   cudarc reads its CUDA API version from `nvcc --version`.
# - cuDNN 9.21.1.3: cudarc 0.19 binds the 9.21 API (its `cudnn-09021`).
# - CUDA_COMPUTE_CAP=90 (H100/H200) unless set: without it candle-kernels'
#   build asks nvidia-smi and fails on a machine without a GPU.
# - candle links cudarc with `dynamic-linking`, so the linker needs
#   unversioned .so names (the wheels ship only versioned ones) and a
#   libcuda.so: the driver is in no wheel, so a stub with the driver API's
#   names is built from cudarc's own bindings, as the toolkit's lib/stubs
#   does. The stub is for linking only; at run time the real driver is used.
#
# Knobs: CUDA_VENV (default .venv-cuda in the repository root).
set -euo pipefail

mode=${1:-check}
case "$mode" in
check | build) ;;
*)
    echo "usage: $0 check|build" >&2
    exit 2
    ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${CUDA_VENV:-$root/.venv-cuda}
toolkit_version=13.0.3.0
cudnn_version=9.21.1.3

say() { echo "cuda-toolkit: $*" >&2; }

[ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check --progress-bar off)
if [ "$mode" = check ]; then
    extras=nvcc,cccl
else
    extras=nvcc,cccl,cudart,nvrtc,curand,cublas
fi
say "installing cuda-toolkit[$extras]==$toolkit_version into $venv"
"${pip[@]}" "cuda-toolkit[$extras]==$toolkit_version" >&2
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cuda_home=$site/nvidia/cu13
if [ ! -x "$cuda_home/bin/nvcc" ]; then
    say "no nvcc at $cuda_home/bin after the install"
    exit 1
fi

cudnn_lib=
if [ "$mode" = build ]; then
    say "installing nvidia-cudnn-cu13==$cudnn_version"
    "${pip[@]}" "nvidia-cudnn-cu13==$cudnn_version" >&2
    for so in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13 libcurand.so.10; do
        [ -e "$cuda_home/lib/$so" ] || { say "missing $cuda_home/lib/$so"; exit 1; }
        ln -sf "$so" "$cuda_home/lib/${so%.so.*}.so"
    done
    cudnn_lib=$site/nvidia/cudnn
    ln -sf libcudnn.so.9 "$cudnn_lib/lib/libcudnn.so"

    # The libcuda stub: every cu* entry point cudarc binds, each returning
    # CUDA_ERROR_STUB_LIBRARY (34), with the driver's soname.
    stub=$cuda_home/lib/stubs/libcuda.so
    if [ ! -e "$stub" ]; then
        cudarc_dir=$(cd "$root" && cargo metadata --format-version 1 --locked --features cuda 2>/dev/null |
            python3 -c 'import json, os, sys
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"))')
        src=$(mktemp /tmp/libcuda-stub-XXXXXX.c)
        grep -o 'load::<_F>("cu[A-Za-z0-9_]*")' "$cudarc_dir/src/driver/sys/mod.rs" |
            sed 's/.*("\(.*\)")/\1/' | sort -u |
            awk '{ print "int " $1 "(void) { return 34; }" }' >"$src"
        mkdir -p "$(dirname "$stub")"
        gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$src"
        rm -f "$src"
        say "built the link-time libcuda stub $stub"
    fi
fi

echo "export PATH=\"$cuda_home/bin:\$PATH\""
echo "export CUDA_HOME=\"$cuda_home\""
echo "export CUDA_COMPUTE_CAP=\"${CUDA_COMPUTE_CAP:-90}\""
if [ -n "$cudnn_lib" ]; then
    echo "export CUDNN_LIB=\"$cudnn_lib\""
fi
