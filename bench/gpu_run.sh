#!/usr/bin/env bash
# The whole GPU run in ONE device call. Here, in the repo root:
#     mkdir -p .whl && cp ../shared/wheels/*.whl .whl/        # diffusers, peft, importlib_metadata
# then   run(command="bash bench/gpu_run.sh $OUT", carry=[".whl"], timeout_s=600)
# The lease is 15 minutes in all (the machine's start-up and the transfers included) and one command at most
# 600 s, so everything runs against one deadline: QF_DEADLINE seconds (default 540) from this script's start,
# minus QF_RESERVE (default 15) for the summary. Each step gets min(its cap, the time left); a step whose minimum
# is not left is skipped and says so. QF_DRY=1 prints the plan (at the estimates) and exits.
#
# Plan. The times are ESTIMATES for an H200 or H100, not measurements: the only timing measured so far is the op
# and block cases of `--quick` (48 s of bench wall time in run 3, before the ours-blocks providers existed); the
# rest comes from bench/NOTES.md's estimates (block compiles ~30-60 s each) or is a guess (tests, tuning).
#
#   step            what                                                          est s   cap s   min s
#   setup           nvidia-smi, wheels from .whl/, the project (editable)            20       -       -
#   tests-gpu       tests/test_kernels_gpu.py + the gpu-marked tests of               90     150      30
#                   test_block_ops.py and test_block_fusion.py
#   check           `qwen-fused check --device cuda` (bf16, whole models vs stock       50      90      30
#                   and float64: tiny ones and one real-width block of each family)
#   tune            dispatcher table -> $OUT/tuning/<gpu>.json; the bench steps       45      90      30
#                   below use it (QWEN_FUSED_TUNING_DIR) when it completes
#   bench-opblock   `--quick --level op,block`: 4 cases, every provider               80     150      40
#   bench-model     model/edit-1024/b1/fwd/n60 (QF_MODEL_PROVIDERS)                  200     400     120
#   bench-train     model/train-512/b1/fwdbwd-r32-gc/n60, only if 200 s are left     240     400     200
#   bench-model21   Qwen-Image 2.1: model/q21-edit-1024/b1/fwd/n32                 180     300     120
#                   (QF_MODEL21_PROVIDERS), only if 120 s are left
#   tests-kernel    the other kernel tests (-m "kernel and not gpu"), native here     60      90      30
#   host-time       bench/host_time.py, train-512 only, no profiler pass             20      40      20
#   tile-sweep      only with QF_TILE_SWEEP: the op fwd per tile config vs the GEMM  30/config rest  30
#   summary         the step table, this call's runs (PARTIAL ones named), files      5   reserve
# At the estimates (QF_DRY=1 shows it): bench-train and bench-model21 are skipped (40 s left after bench-model,
# they need 200 and 120), tests-kernel gets 40 s, host-time is skipped, and the summary starts at about 525 s. bench-model21's
# estimate is a guess from the Qwen-Image one: three groups of block compiles (stock, ours, ours-swiglu).
#
# Results are written as they go: the bench saves its run into $OUT/results/<gpu>.json (a copy of
# bench/results/<gpu>.json taken before the first bench step) after every case, marked PARTIAL until the last
# one finishes, so a limit loses only the case in progress (of a model case, only the group of providers in
# progress: the groups timed are kept under the run's `in_progress`); the tuning keeps finished keys in
# tuning/<gpu>.partial.json until it completes; host_time.json is rewritten after every row.
# $OUT (the device tool returns at most 8 files): gpu_run.log (all output, nvidia-smi included), tests.log,
# tuning/<gpu>.json, results/<gpu>.json, host_time.json, bench.md (this call's runs), tile_sweep.log (if swept).
# Afterwards: tuning/<gpu>.json -> kernels/tuning/, results/<gpu>.json -> bench/results/ (only if bench.md
# shows this call's runs), and the outcome into bench/NOTES.md.
#
# usage: bench/gpu_run.sh OUTDIR
# env:   QF_DEADLINE (s, default 540)  QF_RESERVE (s, default 15)  QF_DRY=1: print the plan and exit
#        QF_WHEELS (default: .whl/ in the repo root)  QF_SITE (default /tmp/qf_site)  QF_SHIM=1: symlink shim
#        QWEN_FUSED_COMMIT: the commit to record (the copy on the device machine may have no git)
#        QF_MODEL_PROVIDERS (default stock,stock-compile,ours-triton,ours-compile,ours-blocks,ours-blocks-compile)
#        QF_MODEL21_PROVIDERS (default stock,stock-compile,ours-triton,ours-compile,ours-swiglu,ours-swiglu-compile)
#        QF_TUNE_ARGS (extra args of python -m qwen_fused.kernels.tune)
#        QF_TILE_SWEEP="BM,maxN,BK,warps,stages ..." (configs that spill are no candidates: check them first with
#        `python -m qwen_fused.kernels.inspect --arch sm_90`)
set -uo pipefail

OUT=${1:?usage: bench/gpu_run.sh OUTDIR}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEADLINE=${QF_DEADLINE:-540}
RESERVE=${QF_RESERVE:-15}
DRY=${QF_DRY:-}
MODEL_PROVIDERS=${QF_MODEL_PROVIDERS:-stock,stock-compile,ours-triton,ours-compile,ours-blocks,ours-blocks-compile}
MODEL21_PROVIDERS=${QF_MODEL21_PROVIDERS:-stock,stock-compile,ours-triton,ours-compile,ours-swiglu,ours-swiglu-compile}
T0=$(date +%s)
START_ISO=$(date -u +%Y-%m-%dT%H:%M:%S)
SIM=0          # QF_DRY: a clock advanced by each step's estimate instead of the real one
STATUS=()      # one line per step for the summary
FIRST_RC=0     # the script's exit status: the first failing step's
if (( DEADLINE + 10 > 600 )); then
    echo "warning: QF_DEADLINE=$DEADLINE leaves under 10 s before the device tool's 600 s limit" >&2
fi

elapsed() { if [ -n "$DRY" ]; then echo "$SIM"; else echo $(( $(date +%s) - T0 )); fi; }
left() { echo $(( DEADLINE - RESERVE - $(elapsed) )); }

# step NAME EST CAP MIN FUNCTION: run FUNCTION with its budget, min(CAP, time left), or skip it below MIN
step() {
    local name=$1 est=$2 cap=$3 min=$4 fn=$5 budget rc t
    budget=$(left)
    (( budget > cap )) && budget=$cap
    if (( budget < min )); then
        STATUS+=("$(printf '%-14s %6s %6s %6s  skipped (%ss left, needs %ss)' "$name" "$est" - - "$(left)" "$min")")
        [ -n "$DRY" ] || echo "=== [$(elapsed)s] $name: skipped, $(left) s left (needs $min)"
        return 0
    fi
    if [ -n "$DRY" ]; then
        STATUS+=("$(printf '%-14s %6s %6s %6s' "$name" "$est" "$budget" "$(( est < budget ? est : budget ))")")
        SIM=$(( SIM + (est < budget ? est : budget) ))
        return 0
    fi
    echo "=== [$(elapsed)s] $name (budget ${budget}s, estimate ${est}s)"
    t=$(date +%s)
    "$fn" "$budget"
    rc=$?
    t=$(( $(date +%s) - t ))
    local what=ok
    (( rc == 124 || rc == 137 )) && what="CUT by its ${budget}s budget"
    (( rc != 0 && rc != 124 && rc != 137 )) && what="failed"
    STATUS+=("$(printf '%-14s %6s %6s %6s  exit %s %s' "$name" "$est" "$budget" "$t" "$rc" "$what")")
    echo "=== [$(elapsed)s] $name: exit $rc ($what) after ${t}s"
    (( FIRST_RC == 0 && rc != 0 )) && FIRST_RC=$rc
    return 0
}
# limit BUDGET CMD...: SIGTERM at the budget (to the command's process group: compile workers too), KILL 5 s on
limit() { local b=$1; shift; timeout -k 5 "$b" "$@"; }

# ------------------------------------------------------------------------------------------------ steps
setup() {
    echo "=== [0s] machine (deadline ${DEADLINE}s, reserve ${RESERVE}s)"
    if ! command -v python >/dev/null; then  # the GPU image's interpreter may be python3 only; timeout needs a file
        mkdir -p /tmp/qf_bin && ln -sf "$(command -v python3)" /tmp/qf_bin/python && export PATH="/tmp/qf_bin:$PATH"
    fi
    { nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
        --format=csv; } 2>&1 || echo "nvidia-smi failed (no NVIDIA driver?)"
    echo "=== [$(elapsed)s] dependencies from local wheels ($WHEELS)"
    shopt -s nullglob
    local whls=("$WHEELS"/*.whl)
    if (( ${#whls[@]} )); then
        python -m pip install -q --no-index --no-deps --target "$SITE" "${whls[@]}" \
            || { echo "wheel install failed"; exit 1; }
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "no wheels in $WHEELS; using what is installed"
    fi
    echo "=== [$(elapsed)s] the project"
    # Run everything from a neutral folder: from the repo root, ./qwen_fused would shadow the installed package
    # (whose qwen_fused.kernels lives in kernels/ through setup.py's package_dir).
    cd /tmp || exit 1
    check() { python -c "import qwen_fused, qwen_fused.kernels, qwen_fused.bench.cli" 2>/dev/null; }
    editable() { PIP_NO_INDEX=1 python -m pip install -q --no-deps --no-build-isolation --use-pep517 -e "$REPO"; }
    if [ -n "${QF_SHIM:-}" ] || ! (editable && check); then
        # no setuptools (or no write access): a shim package tree of symlinks with the package_dir mapping
        echo "editable install unavailable; using a symlink shim of the package_dir mapping"
        local shim
        shim=$(mktemp -d /tmp/qf_shim.XXXX)
        mkdir -p "$shim/qwen_fused"
        for f in "$REPO"/qwen_fused/*; do ln -s "$f" "$shim/qwen_fused/"; done
        ln -s "$REPO/kernels" "$shim/qwen_fused/kernels"
        ln -s "$REPO/bench" "$shim/qwen_fused/bench"
        export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
        check || { python -c "import qwen_fused.kernels, qwen_fused.bench.cli"; echo "cannot import qwen_fused"
                   exit 1; }
    fi
    python - <<'EOF'
import torch, triton, diffusers, peft, qwen_fused
print("torch", torch.__version__, "| triton", triton.__version__, "| diffusers", diffusers.__version__,
      "| peft", peft.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
    GPU=$(python -c "import torch; from qwen_fused.kernels.dispatch import slug
print(slug(torch.cuda.get_device_name()))" 2>/dev/null) || GPU=""
    echo "gpu slug: ${GPU:-none (no CUDA device?)}"
    # pytest-timeout is on the GPU image: one hung test must not take the whole step
    PYTEST_TIMEOUT=()
    python -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT=(--timeout=120)
}

pytest_run() {  # BUDGET ARGS...: one pytest run, its whole log appended to tests.log, its summary shown here
    local b=$1; shift
    echo "##### pytest $*" >> "$OUT/tests.log"
    limit "$b" python -m pytest -q -rfEs --maxfail=15 -p no:cacheprovider --durations=10 "${PYTEST_TIMEOUT[@]}" \
        "$@" >> "$OUT/tests.log" 2>&1
    local rc=$?
    tail -n 20 "$OUT/tests.log"
    return $rc
}

tests_gpu() {
    pytest_run "$1" "$REPO/tests/test_kernels_gpu.py" "$REPO/tests/test_block_ops.py" \
        "$REPO/tests/test_block_fusion.py" -m gpu
}

tests_kernel() { pytest_run "$1" "$REPO/tests" -m "kernel and not gpu"; }

check_bf16() { limit "$1" python -m qwen_fused.cli check --device cuda --dtype bf16; }

tune() {
    # shellcheck disable=SC2086
    limit "$1" python -m qwen_fused.kernels.tune --out "$OUT/tuning" ${QF_TUNE_ARGS:-}
    local rc=$?
    if (( rc == 0 )) && [ -n "$GPU" ] && [ -f "$OUT/tuning/$GPU.json" ]; then
        export QWEN_FUSED_TUNING_DIR="$OUT/tuning"
        echo "the bench steps use $OUT/tuning/$GPU.json"
    else
        echo "tuning incomplete: the bench steps use the committed tables (kernels/tuning/), if any"
    fi
    return $rc
}

bench() {  # BUDGET ARGS...: one `qwen-fused bench`, saving into $OUT/results as it goes
    local b=$1; shift
    if [ -n "$GPU" ] && [ ! -e "$OUT/results/$GPU.json" ] && [ -f "$REPO/bench/results/$GPU.json" ]; then
        mkdir -p "$OUT/results" && cp "$REPO/bench/results/$GPU.json" "$OUT/results/"  # the runs so far
    fi
    limit "$b" python -m qwen_fused.cli bench "$@" --out /tmp/qf_bench --results-dir "$OUT/results"
}
bench_opblock() { bench "$1" --quick --level op,block; }
bench_model() { bench "$1" --cases model/edit-1024/b1/fwd/n60 --providers "$MODEL_PROVIDERS" --quick; }
bench_train() { bench "$1" --cases model/train-512/b1/fwdbwd-r32-gc/n60 --providers "$MODEL_PROVIDERS" --quick; }
bench_model21() { bench "$1" --cases model/q21-edit-1024/b1/fwd/n32 --providers "$MODEL21_PROVIDERS" --quick; }

host_time() {
    limit "$1" python -m qwen_fused.bench.host_time --shapes train-512 --no-profile --calls 10 --rounds 3 \
        --out "$OUT/host_time.json"
}

tile_sweep() {
    # forward tile candidates for the op, each against the bare GEMM in the same process (log only, not saved)
    local tiles b rc=0
    for tiles in $QF_TILE_SWEEP; do
        b=$(left)
        (( b > 60 )) && b=60
        (( b < 30 )) && { echo "--- $tiles: skipped, $(left) s left"; continue; }
        echo "--- QWEN_FUSED_TILES=$tiles"
        QWEN_FUSED_TILES=$tiles limit "$b" python -m qwen_fused.cli bench --cases op/edit-1024/b1/fwd \
            --providers ours-triton,gemm --no-save --out /tmp/qf_sweep 2>&1 | grep -E "ours-triton|gemm " | head -n 2
        local st=("${PIPESTATUS[@]}")
        (( rc == 0 )) && rc=${st[0]}
    done > "$OUT/tile_sweep.log" 2>&1
    cat "$OUT/tile_sweep.log"
    return $rc
}

summary() {
    echo "=== [$(elapsed)s] summary (times in s; estimates from this script's header)"
    printf '%-14s %6s %6s %6s  %s\n' step est budget took result
    printf '%s\n' "${STATUS[@]}"
    if [ -n "$DRY" ]; then
        echo "(QF_DRY: 'took' is the estimate, capped by the budget; deadline ${DEADLINE}s, reserve ${RESERVE}s)"
        return
    fi
    if [ -n "$GPU" ] && [ -f "$OUT/results/$GPU.json" ]; then
        # this call's runs only (dated from its start); PARTIAL ones say which case was cut
        python -m qwen_fused.bench.report "$OUT/results" --since "$START_ISO" > "$OUT/bench.md" 2>&1
        cat "$OUT/bench.md"
    else
        echo "no bench results in $OUT/results"
    fi
    [ -n "$GPU" ] && [ -f "$OUT/tuning/$GPU.partial.json" ] && echo "TUNING CUT: only tuning/$GPU.partial.json"
    ls -lR "$OUT"
    local n
    n=$(find "$OUT" -type f | wc -l)
    (( n > 8 )) && echo "warning: $n files in $OUT; the device tool returns at most 8"
}

# ------------------------------------------------------------------------------------------------ the run
if [ -z "$DRY" ]; then
    mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
    exec > >(tee -a "$OUT/gpu_run.log") 2>&1
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
    WHEELS=${QF_WHEELS:-$REPO/.whl}
    SITE=${QF_SITE:-/tmp/qf_site}
    GPU=""
    setup
    STATUS+=("$(printf '%-14s %6s %6s %6s  done' setup 20 - "$(elapsed)")")
else
    echo "QF_DRY: the plan at the estimates (no command runs); OUT would be $OUT"
    SIM=20  # setup's estimate
    STATUS+=("$(printf '%-14s %6s %6s %6s' setup 20 - 20)")
fi
step tests-gpu      90 150  30 tests_gpu
step check          50  90  30 check_bf16
step tune           45  90  30 tune
step bench-opblock  80 150  40 bench_opblock
step bench-model   200 400 120 bench_model
step bench-train   240 400 200 bench_train
step bench-model21 180 300 120 bench_model21
step tests-kernel   60  90  30 tests_kernel
step host-time      20  40  20 host_time
[ -n "${QF_TILE_SWEEP:-}" ] && step tile-sweep 30 600 30 tile_sweep
summary
exit $FIRST_RC
