#!/usr/bin/env bash
# One GPU call that brings back every headline number: `bash bench/gpu_session.sh` ends within BUDGET_S
# (540 s) of command time on an H100/H200 with a cold Triton cache, so it fits the device tool's window
# (10 min per command, 15 min of device time per session including the machine's 1-2 min start, at most
# 8 files back from $OUT, no package registry there). With the device tool:
#     run(command="bash bench/gpu_session.sh", timeout_s=580)
# then copy the files into bench/results/<date>-<device>/ and commit them.
#
#   bash bench/gpu_session.sh --dry-run   # print the plan, each step's cap and their sum; run nothing
#
# Steps run in the order of the PLAN table below, each under its own `timeout` (its cap, or less when
# the budget ends sooner). Every step appends to its log in $OUT as it goes and the benchmarks rewrite
# bench.json/bench.md after every finished piece (python -m bench --json-out), so a kill at any moment
# still returns everything finished so far. `req` steps always start (cut to the time left); `opt` steps
# start only with at least MIN_STEP_S (30 s) left and run in whatever time the earlier steps left over.
# Tunables: BUDGET_S, PYTHON (default python3), OUT (default bench/results/<date>-gpu-session).
# Offline tokenizer: copy ../shared/tiktoken_cache to .carry/tiktoken_cache (git-ignored) and carry it.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

# ---- the plan: adding a benchmark is one line ------------------------------------------------------
# name | cap_s | req/opt | log file in $OUT | command (a function below, or python -m bench --only STEP)
PLAN=(
    "env          |  20 | req | env.txt       | env_info"
    "gpu_tests    | 115 | req | tests.txt     | gpu_tests"
    "attn_d64     |  70 | req | bench.log     | bench attention_d64"
    "attn_d128    |  60 | req | bench.log     | bench attention_d128"
    "norm_gelu    |  40 | req | bench.log     | bench norm_gelu"
    "train_step   | 105 | req | bench.log     | bench train_step"
    "decode_b1    |  40 | req | bench.log     | bench decode_b1"
    "linear_ce    |  70 | req | bench.log     | bench linear_ce"
    "memcheck     |  90 | opt | sanitizer.txt | sanitize memcheck"
    "racecheck    |  60 | opt | sanitizer.txt | sanitize racecheck"
    "gate_sm90    |  30 | opt | env.txt       | gate"
    "decode_attn  |  45 | opt | bench.log     | bench decode_attention"
    "batch_gen    |  60 | opt | bench.log     | bench batch_generate"
    "loss_train   |  90 | opt | bench.log     | bench loss_train"
    "attn_var     |  75 | opt | bench.log     | bench attention_variants"
    "llama_layers |  90 | opt | bench.log     | bench llama_layers"
)
BUDGET_S=${BUDGET_S:-540}
MIN_STEP_S=${MIN_STEP_S:-30}
RESERVE_S=5  # for the final summary line
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench/results/$(date +%F)-gpu-session}
# Every file this script can write into $OUT (the device tool returns at most 8).
OUT_FILES=(session.txt env.txt tests.txt bench.log bench.json bench.md sanitizer.txt)

field() { # field LINE N: the N-th |-separated field, trimmed
    local f
    IFS='|' read -ra f <<<"$1"
    f=${f[$2]}
    f=${f#"${f%%[![:space:]]*}"}
    printf '%s' "${f%"${f##*[![:space:]]}"}"
}

if [ "${1:-}" = "--dry-run" ]; then
    echo "gpu_session.sh plan: budget ${BUDGET_S}s, python '${PYTHON}', out \$OUT (${#OUT_FILES[@]} files at most: ${OUT_FILES[*]})"
    printf '%-4s %-12s %6s  %-4s %-14s %s\n' "#" step cap_s kind log command
    req=0 all=0 i=0
    for line in "${PLAN[@]}"; do
        i=$((i + 1))
        name=$(field "$line" 0) cap=$(field "$line" 1) kind=$(field "$line" 2) log=$(field "$line" 3) cmd=$(field "$line" 4)
        printf '%-4s %-12s %6s  %-4s %-14s %s\n' "$i" "$name" "$cap" "$kind" "$log" "$cmd"
        all=$((all + cap))
        [ "$kind" = req ] && req=$((req + cap))
    done
    echo "sum of required caps: ${req}s (budget ${BUDGET_S}s); all caps: ${all}s; optional steps run only in the time left"
    echo "total at most: ${BUDGET_S}s (every cap is cut to the budget left)"
    exit 0
fi
[ $# -eq 0 ] || { echo "gpu_session.sh: unknown argument '$1' (only --dry-run)" >&2; exit 2; }

mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
[ -d .carry/tiktoken_cache ] && export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$PWD/.carry/tiktoken_cache}
export HF_HUB_OFFLINE=1

# ---- the steps ------------------------------------------------------------------------------------
env_info() {
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
        --format=csv 2>&1
    "$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
    "$PYTHON" -c "import xdist, pytest_timeout" 2>&1 | tail -1
    command -v compute-sanitizer >/dev/null && compute-sanitizer --version 2>&1 | tail -1
    return 0
}

# tests/gpu_ready.py's fast subset with this machine's triton: registers, spills, shared memory, HGMMA.
gate() { "$PYTHON" tests/gpu_ready.py; }

# The gpu-marked correctness tests in bf16/fp16 (fp32 variants left out: compile hogs, and fp32 is the
# CPU suite's reference path), parallel compiles, one hung test cannot eat the step.
gpu_tests() {
    local extra=() files=(tests/test_attention.py tests/test_decode.py tests/test_layernorm.py tests/test_gelu.py
        tests/test_cross_entropy.py tests/test_model.py tests/test_guard_bands.py tests/test_generate_batch.py
        tests/test_rms_norm.py tests/test_glu.py tests/test_rotary.py tests/test_loss_options.py)
    "$PYTHON" -c "import xdist" 2>/dev/null && extra+=(-n 8)
    "$PYTHON" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 90)
    "$PYTHON" -m pytest -v -p no:cacheprovider -rfE --durations=10 -m "gpu and not slow" -k "not fp32" \
        "${extra[@]}" "${files[@]}"
}

# One python -m bench step (its STEPS), merged into bench.json/bench.md after every finished piece.
bench() { "$PYTHON" -m bench --only "$1" --json-out "$OUT/bench.json"; }

# compute-sanitizer over tests/sanitize_driver.py (every kernel, fwd and bwd, odd shapes). Without
# PyTorch's caching allocator each tensor is its own cudaMalloc block, so memcheck sees a stray access.
sanitize() {
    if ! command -v compute-sanitizer >/dev/null 2>&1; then
        echo "compute-sanitizer not found: $1 skipped"
        return 0
    fi
    if ! compute-sanitizer --tool memcheck "$PYTHON" -c "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()" \
        >/dev/null 2>&1; then
        echo "compute-sanitizer cannot see the device here (gVisor?): $1 skipped"
        return 0
    fi
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$1" --error-exitcode 3 --print-limit 50 \
        "$PYTHON" tests/sanitize_driver.py
}

# ---- the runner -----------------------------------------------------------------------------------
export PYTHON OUT
export -f env_info gate gpu_tests bench sanitize
status=0
summary() { echo "$*" | tee -a "$OUT/session.txt"; }
summary "gpu_session.sh $(date -u +%FT%TZ): budget ${BUDGET_S}s, python '${PYTHON}'"
for line in "${PLAN[@]}"; do
    name=$(field "$line" 0) cap=$(field "$line" 1) kind=$(field "$line" 2) log=$OUT/$(field "$line" 3)
    read -ra cmd <<<"$(field "$line" 4)"
    left=$((BUDGET_S - SECONDS - RESERVE_S))
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt "$MIN_STEP_S" ] && { [ "$kind" = opt ] || [ "$cap" -lt 5 ]; }; then
        summary "== $name: not run, ${left}s left"
        [ "$kind" = req ] && status=1
        continue
    fi
    echo "== $name (at most ${cap}s): ${cmd[*]}" >>"$log"
    t0=$SECONDS
    # `timeout` runs the step's function in a child bash (exported); -k: a step that ignores TERM is killed.
    timeout -k 5 "$cap" bash -c '"$@"' _ "${cmd[@]}" >>"$log" 2>&1
    rc=$?
    took=$((SECONDS - t0))
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        summary "== $name: CUT at its ${cap}s cap (what finished is in $(basename "$log"))"
        [ "$kind" = req ] && status=1
    else
        summary "== $name: exit $rc in ${took}s"
        [ "$rc" -eq 0 ] || status=1
    fi
done
summary "gpu_session.sh: done in ${SECONDS}s, exit $status"
exit $status
