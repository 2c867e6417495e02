#!/usr/bin/env bash
# One-command GPU run on an offline machine: install from local wheels, run the GPU/kernel tests, tune the
# dispatcher (kernels/tuning/<gpu-slug>.json, which the benchmark then uses), measure the op's host time per call
# (bench/host_time.py), then `qwen-fused bench --quick`.
# Everything lands in OUTDIR (few files: the device machine returns at most 8):
#   gpu_run.log (with nvidia-smi)  gpu_tests.log  tuning-<gpu-slug>.json  host_time.json  bench-*.json  bench-*.md
#   bench-*.png  <gpu-slug>.json
# Copy tuning-<gpu-slug>.json back to kernels/tuning/<gpu-slug>.json, and <gpu-slug>.json
# (bench/results/<gpu-slug>.json with this run appended) back into bench/results/.
#
# usage: bench/gpu_run.sh OUTDIR
# env:   QF_WHEELS (default: .whl/ in the repo root)   QF_SITE (default /tmp/qf_site)
#        QWEN_FUSED_COMMIT: the commit to record where the copy has no git
#        QF_SHIM=1: skip the editable install, use the symlink shim
#        QF_TEST_TIMEOUT (s, default 180)   QF_BENCH_TIMEOUT (s, default 420)   QF_BENCH_ARGS (default --quick)
#        --quick now holds the two model-level cases (compiles dominate: estimated 5-7 min on an H100/H200), so
#        tests + tune + bench exceed one 600 s device call: run `QF_BENCH_ARGS="--quick --level op,block"` first,
#        then a second call with `QF_TEST_TIMEOUT=1 QF_TUNE_TIMEOUT=1 QF_BENCH_ARGS="--quick --level model"`
#        QF_TUNE_TIMEOUT (s, default 90)   QF_TUNE_ARGS (extra args of python -m qwen_fused.kernels.tune)
#        QF_HOST_TIMEOUT (s, default 60; 1 skips it in effect)
#        QF_TILE_SWEEP="BM,maxN,BK,warps,stages ..." also times the op's forward at each tile config (tile_sweep.log)
set -uo pipefail

OUT=${1:?usage: bench/gpu_run.sh OUTDIR}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/gpu_run.log") 2>&1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WHEELS=${QF_WHEELS:-$REPO/.whl}
SITE=${QF_SITE:-/tmp/qf_site}
T0=$(date +%s)
step() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }

step "machine"
{ nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
    --format=csv; } 2>&1 || echo "nvidia-smi failed (no NVIDIA driver?)"

step "dependencies from local wheels ($WHEELS)"
shopt -s nullglob
whls=("$WHEELS"/*.whl)
if (( ${#whls[@]} )); then
    python -m pip install -q --no-index --no-deps --target "$SITE" "${whls[@]}" \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no wheels in $WHEELS; using what is installed"
fi

step "the project"
# Run everything from a neutral folder: from the repo root, ./qwen_fused would shadow the installed package
# (whose qwen_fused.kernels lives in kernels/ through setup.py's package_dir).
cd /tmp || exit 1
check() { python -c "import qwen_fused, qwen_fused.kernels, qwen_fused.bench.cli" 2>/dev/null; }
editable() { PIP_NO_INDEX=1 python -m pip install -q --no-deps --no-build-isolation --use-pep517 -e "$REPO"; }
if [ -n "${QF_SHIM:-}" ] || ! (editable && check); then
    # no setuptools (or no write access): a shim package tree of symlinks with the package_dir mapping
    echo "editable install unavailable; using a symlink shim of the package_dir mapping"
    SHIM=$(mktemp -d /tmp/qf_shim.XXXX)
    mkdir -p "$SHIM/qwen_fused"
    for f in "$REPO"/qwen_fused/*; do ln -s "$f" "$SHIM/qwen_fused/"; done
    ln -s "$REPO/kernels" "$SHIM/qwen_fused/kernels"
    ln -s "$REPO/bench" "$SHIM/qwen_fused/bench"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    check || { python -c "import qwen_fused.kernels, qwen_fused.bench.cli"; echo "cannot import qwen_fused"; exit 1; }
fi
python - <<'EOF'
import torch, triton, diffusers, peft, qwen_fused
print("torch", torch.__version__, "| triton", triton.__version__, "| diffusers", diffusers.__version__,
      "| peft", peft.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF

step "GPU and kernel tests"
timeout "${QF_TEST_TIMEOUT:-180}" python -m pytest "$REPO/tests" -m "gpu or kernel" -q -rfEs --maxfail=15 \
    -p no:cacheprovider \
    > "$OUT/gpu_tests.log" 2>&1
echo "pytest exit $? (124 = timed out)"; tail -n 15 "$OUT/gpu_tests.log"

step "tune the dispatcher (fused vs gemm+epilogue, per rows / LoRA rank / dtype)"
# shellcheck disable=SC2086
timeout "${QF_TUNE_TIMEOUT:-90}" python -m qwen_fused.kernels.tune --out "$REPO/kernels/tuning" ${QF_TUNE_ARGS:-}
echo "tune exit $? (124 = timed out)"
table=$(python -c "import torch; from qwen_fused.kernels.dispatch import slug
print(slug(torch.cuda.get_device_name()))" 2>/dev/null)
[ -n "$table" ] && [ -f "$REPO/kernels/tuning/$table.json" ] && cp "$REPO/kernels/tuning/$table.json" \
    "$OUT/tuning-$table.json"

step "host time per op call (CPU timer without synchronising, and the profiler)"
timeout "${QF_HOST_TIMEOUT:-60}" python -m qwen_fused.bench.host_time --out "$OUT/host_time.json"
echo "host_time exit $? (124 = timed out)"

step "benchmark"
# shellcheck disable=SC2086
timeout "${QF_BENCH_TIMEOUT:-420}" python -m qwen_fused.cli bench ${QF_BENCH_ARGS:---quick} --out "$OUT" \
    --results-dir "$REPO/bench/results"
rc=$?
echo "bench exit $rc (124 = timed out, 3 = a provider failed verification)"
latest=$(ls -t "$REPO"/bench/results/*.json 2>/dev/null | head -n 1)
[ -n "$latest" ] && cp "$latest" "$OUT/"

if [ -n "${QF_TILE_SWEEP:-}" ]; then
    # forward tile candidates for the op, each against the bare GEMM in the same process (log only, not saved)
    step "tile sweep: $QF_TILE_SWEEP"
    for tiles in $QF_TILE_SWEEP; do
        echo "--- QWEN_FUSED_TILES=$tiles"
        QWEN_FUSED_TILES=$tiles timeout 60 python -m qwen_fused.cli bench --cases op/edit-1024/b1/fwd \
            --providers ours-triton,gemm --no-save --out "$OUT/sweep" 2>&1 | grep -E "ours-triton|gemm " | head -n 2
    done >> "$OUT/tile_sweep.log" 2>&1
    rm -rf "$OUT/sweep"; cat "$OUT/tile_sweep.log"
fi
step "done; files in $OUT:"
ls -l "$OUT"
for md in "$OUT"/bench-*.md; do cat "$md"; done
exit $rc
