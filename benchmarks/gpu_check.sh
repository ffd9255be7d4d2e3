#!/usr/bin/env bash
# The GPU check (README "On a GPU"): bash benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]
#
# Stage 1, the build of vitkern._C for this GPU's architecture only, runs here; stages 2-6 (ceilings, tests,
# compute-sanitizer, timings, results) run in benchmarks/gpu_check.py, which caps each stage's time so that the
# whole check fits in 9 minutes on an H100/H200. --dry-run: no build and no sanitizer, the other stages on CPU
# tensors at tiny shapes (the test suite runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}  # the interpreter that holds torch; PYTHON=... picks another

dry_run=()
out_dir=gpu_check_out
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=(--dry-run) ;;
        -*) echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]" >&2; exit 2 ;;
        *) out_dir=$arg ;;
    esac
done
mkdir -p "$out_dir"
started=$(date +%s)

if [ ${#dry_run[@]} -eq 0 ]; then
    arch=$("$python" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
    echo "== stage 1: build vitkern._C for sm_${arch/./} only, and the emulation build, on $(nproc) cores"
    # The emulation build too: the test suite's emulation tests need it on any machine.
    build_start=$(date +%s)
    if ! CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} VITKERN_CUDA_ARCHS=$arch VITKERN_BUILD_EMULATION=1 MAX_JOBS=$(nproc) \
        "$python" -m pip install --no-build-isolation --no-deps -e . >"$out_dir/build.log" 2>&1; then
        tail -n 40 "$out_dir/build.log"
        echo "stage 1: the build failed after $(($(date +%s) - build_start)) s (log: $out_dir/build.log)"
        exit 1
    fi
    echo "stage 1: built in $(($(date +%s) - build_start)) s"
else
    # The Triton kernels run on CPU tensors under the interpreter, which must be chosen before triton is imported.
    export TRITON_INTERPRET=1
    echo "== stage 1: skipped (dry run: no build)"
fi

exec "$python" benchmarks/gpu_check.py "${dry_run[@]}" --out "$out_dir" --started "$started"
