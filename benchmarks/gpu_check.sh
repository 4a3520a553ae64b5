#!/usr/bin/env bash
# The one script to run on a lent GPU: the kernel tests on CUDA, then the
# benchmark table, everything under $OUT (default benchmarks/results/gpu).
# Budgeted at 5 minutes on one H200 by the timeouts below (not yet timed on one:
# no GPU was lent to the session that set them). xformers rows run where a wheel
# matching this torch has CUDA kernels, and are skipped with the reason elsewhere.
#
# The GPU image has torch and triton but not open_clip; carry wheels in .whl/
# (see the device tool's README) and this script installs them first:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       open_clip_torch ftfy wcwidth
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1

# Without a GPU every figure would be a CPU figure filed as a GPU one: stop first.
if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check.sh: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine." >&2
    echo "On a CPU: pytest benchmarks/ --benchmark-only (see the README's Benchmarks section)." >&2
    exit 2
fi

mkdir -p "$OUT"
$PY - <<'PY' > "$OUT/env.json"
import json, platform, torch, triton
print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "cuda": torch.version.cuda, "python": platform.python_version(), "cores": __import__("os").cpu_count()}))
PY
cat "$OUT/env.json"

status=0
timeout 120 $PY -m pytest tests/test_oca.py tests/test_synergy.py tests/test_fused_model.py tests/test_model.py \
    tests/test_kernel_builds.py \
    -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" || status=1

timeout 170 $PY -m pytest benchmarks/ --benchmark-only -rs --benchmark-json "$OUT/benchmarks.json" \
    -q -p no:cacheprovider 2>&1 | tee "$OUT/benchmarks.log" || status=1

$PY benchmarks/report.py "$OUT/benchmarks.json" --env "$OUT/env.json" --md "$OUT/table.md" --png "$OUT/speedups.png" \
    && cat "$OUT/table.md" || status=1
exit $status
