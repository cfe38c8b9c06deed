#!/usr/bin/env bash
# Everything a GPU session owes, in stages that each fit one device call (the device tool: 10 min per
# command, 30 min per session, at most 8 files back from $OUT; the machine keeps nothing between sessions).
# Logs land in $OUT (default bench/results/<date>-gpu-session/); commit them under
# bench/results/<date>-<device>/.
#
#   bash bench/gpu_session.sh checks   # call 1, ends within $BUDGET_S (570 s), in order of priority:
#       env.txt                 GPU, driver, torch, triton
#       adversarial-tests.txt   issue 13's tests compiled on the GPU (pytest -m "not slow": guard bands with
#                               the gpu-marked large shapes, fuzz, kernel contracts, sanitize-driver cases)
#       sanitizer-memcheck.txt  compute-sanitizer memcheck over tests/sanitize_driver.py (every kernel, fwd
#                               and bwd, odd shapes, exact-size allocations and NaN guard bands)
#       gpu-tests.txt           every other gpu-marked test
#       sanitizer-racecheck.txt racecheck over the same driver
#       fuzz-slow.txt           pytest -m slow over tests/test_fuzz.py, FUZZ_MAX_EXAMPLES (40) per test, in
#                               whatever time is left
#   bash bench/gpu_session.sh bench    # call 2: python -m bench (QUICK=1: --quick; BENCH_ONLY=kernels,loss:
#                                      #   --only, to split a run that does not fit one call) -> bench.txt,
#                                      #   the JSON, the Markdown and the plots
#   bash bench/gpu_session.sh          # both, one after the other (where no 10-minute limit applies)
#
# With the device tool: run(command="bash bench/gpu_session.sh checks", timeout_s=600), then the same with
# "bench" (carry .carry if the tokenizer cache is needed); copy each call's files into
# bench/results/<date>-<device>/ and commit them. Tune with BUDGET_S, FUZZ_MAX_EXAMPLES, QUICK, BENCH_ONLY.
#
# A step that would not finish inside the budget is cut by `timeout` (its log says so) or not started,
# so every log still comes back. Offline machines: copy ../shared/tiktoken_cache to .carry/tiktoken_cache
# (git-ignored) and carry it.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-bench/results/$(date +%F)-gpu-session}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
[ -d .carry/tiktoken_cache ] && export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$PWD/.carry/tiktoken_cache}
BUDGET_S=${BUDGET_S:-570}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(checks bench)
for stage in "${STAGES[@]}"; do
    case $stage in
    checks | bench) ;;
    *) echo "gpu_session.sh: unknown stage '$stage' (checks, bench)" >&2; exit 2 ;;
    esac
done
status=0
ADVERSARIAL=(tests/test_guard_bands.py tests/test_fuzz.py tests/test_kernel_contracts.py tests/test_sanitize_driver.py)
PYTEST=(python -m pytest -v -p no:cacheprovider --durations=15)  # -v: a cut log still names each test
python -c "import pytest_timeout" >/dev/null 2>&1 && PYTEST+=(--timeout 240)  # one hung test cannot eat a step
XDIST=() GPU_XDIST=()
if python -c "import xdist" >/dev/null 2>&1; then  # parallel Triton compiles, one GPU shared
    XDIST=(-n 8) GPU_XDIST=(-n 4)  # (fewer for the gpu tests: some hold tens of GiB)
fi

# step NAME CAP_S LOG CMD...: run CMD under `timeout` (CAP_S, or less where the call's budget ends
# sooner), its output teed into $OUT/LOG. A failure sets the exit status; so does a cut or a step left
# out for lack of time, unless OPTIONAL=1 is set for the step.
step() {
    local name=$1 cap=$2 log=$OUT/$3
    shift 3
    local left=$((BUDGET_S - SECONDS - 15)) t0=$SECONDS rc
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 30 ]; then
        echo "== $name: NOT RUN, ${left}s left of the ${BUDGET_S}s budget" | tee -a "$log"
        [ -n "${OPTIONAL:-}" ] || status=1
        return 0
    fi
    echo "== $name (at most ${cap}s): $*" | tee -a "$log"
    timeout -k 10 "$cap" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "== $name: CUT by the timeout after ${cap}s (what ran is above)" | tee -a "$log"
        [ -n "${OPTIONAL:-}" ] || status=1
    elif [ "$rc" -ne 0 ]; then
        status=1
    fi
    echo "== $name: exit $rc in $((SECONDS - t0))s" | tee -a "$log"
}

env_info() {
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
    compute-sanitizer --version 2>&1 | tail -1
}

# Without PyTorch's caching allocator each tensor is its own cudaMalloc block: a read or write past its
# end leaves every allocation, which memcheck reports (inside a cached block it would not).
SANITIZE=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --error-exitcode 3 --print-limit 50)
if ! command -v compute-sanitizer >/dev/null 2>&1; then
    SANITIZE=(sh -c 'echo "compute-sanitizer not found: not run"; exit 1' --)
fi

for stage in "${STAGES[@]}"; do
    case $stage in
    checks)
        env_info 2>&1 | tee "$OUT/env.txt"
        step "adversarial tests, compiled" 300 adversarial-tests.txt \
            "${PYTEST[@]}" "${XDIST[@]}" -m "not slow" "${ADVERSARIAL[@]}"
        step "memcheck over tests/sanitize_driver.py" 200 sanitizer-memcheck.txt \
            "${SANITIZE[@]}" --tool memcheck python tests/sanitize_driver.py
        step "other gpu tests" 240 gpu-tests.txt \
            "${PYTEST[@]}" "${GPU_XDIST[@]}" -m gpu tests --ignore=tests/test_guard_bands.py
        step "racecheck over tests/sanitize_driver.py" 150 sanitizer-racecheck.txt \
            "${SANITIZE[@]}" --tool racecheck python tests/sanitize_driver.py
        OPTIONAL=1 FUZZ_MAX_EXAMPLES=${FUZZ_MAX_EXAMPLES:-40} step "slow fuzz" 400 fuzz-slow.txt \
            "${PYTEST[@]}" "${XDIST[@]}" -m slow tests/test_fuzz.py
        ;;
    bench)
        SECONDS=0
        { env_info; python -m bench ${QUICK:+--quick} ${BENCH_ONLY:+--only "$BENCH_ONLY"} --out "$OUT"; } 2>&1 \
            | tee "$OUT/bench.txt"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
        ;;
    esac
    SECONDS=0
done
exit $status
