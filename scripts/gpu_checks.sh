#!/usr/bin/env bash
# Every GPU check of issues 5 (ling-dist) and 9 (ling-kernels) in one run, for a session whose task
# is lent a GPU (the `device` tool; its machine has python3 with torch and triton but cannot
# download, so the few pure-Python packages it lacks travel as wheels in the git-ignored .whl/).
#
#   here, once:     echo /.whl/ >> .git/info/exclude; bash scripts/gpu_checks.sh --fetch-wheels
#   on the device:  run(command="bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=560)
#
# It writes gpu_tests.log, kernels.log, kernels.json and nvidia-smi.txt into $OUT. The tests are
# the `gpu`-marked ones (tests/test_train_gpu.py, the Triton kernels, ling-dist's mixed CPU+CUDA
# job and pinned snapshots); the benchmark is benchmarks/test_kernels_gpu.py.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="tomli-w==1.2.0 zstandard==0.25.0 liger-kernel==0.8.5"

if [ "${1:-}" = "--fetch-wheels" ]; then
    # shellcheck disable=SC2086
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
fi

OUT=${OUT:-/tmp/ling-gpu-checks}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "no wheels in .whl/: run 'bash scripts/gpu_checks.sh --fetch-wheels' here first"; exit 1; }
PYTHONPATH=/tmp/site:src
for package in packages/*/src; do PYTHONPATH=$PYTHONPATH:$package; done
export PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

status=0
timeout 330 python3 -m pytest -m gpu -q -p no:cacheprovider -x --durations=10 tests packages 2>&1 \
    | tee "$OUT/gpu_tests.log" || status=1
timeout 180 python3 -m pytest benchmarks/test_kernels_gpu.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" || status=1
exit $status
