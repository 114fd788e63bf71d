#!/usr/bin/env bash
# Exits 0 when the NVIDIA driver library libcuda.so.1 can be found, else
# prints one line saying what is missing and how to get a CPU build.
#
# A CUDA build of multilabel links libcuda.so.1 (candle links the CUDA
# libraries at build time), so without the driver the program cannot even
# start and the system loader would print its own error. `just` runs this
# first for MULTILABEL_FEATURES=cuda|cudnn.
set -u
found() {
    local dir
    IFS=: read -ra dirs <<<"${LD_LIBRARY_PATH:-}"
    for dir in "${dirs[@]}"; do
        [ -n "$dir" ] && [ -e "$dir/libcuda.so.1" ] && return 0
    done
    if command -v ldconfig >/dev/null 2>&1 || [ -x /sbin/ldconfig ]; then
        { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | grep -q 'libcuda\.so\.1 ' && return 0
    fi
    local candidate
    for candidate in /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib/wsl/lib /usr/local/nvidia/lib64; do
        [ -e "$candidate/libcuda.so.1" ] && return 0
    done
    return 1
}
if found; then
    exit 0
fi
echo "multilabel: this is a CUDA build (MULTILABEL_FEATURES=${MULTILABEL_FEATURES:-cuda}) and the NVIDIA driver library libcuda.so.1 is not installed; install the NVIDIA driver, or unset MULTILABEL_FEATURES for a CPU build" >&2
exit 1
