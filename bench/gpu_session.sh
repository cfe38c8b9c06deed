#!/usr/bin/env bash
# Everything a GPU session owes, in one call (the device tool runs one command at a time, and the GPU
# machine keeps nothing): environment, the gpu-marked tests, a race check of the attention and decode
# kernels under compute-sanitizer, and the full benchmark suite. Writes into $OUT (default
# bench/results/<date>-gpu-session/); commit what comes back under bench/results/.
#
#   bash bench/gpu_session.sh            # everything (~15 min on an H100)
#   QUICK=1 bash bench/gpu_session.sh    # python -m bench --quick
#
# Offline machines: copy ../shared/tiktoken_cache to .carry/tiktoken_cache (git-ignored) and carry it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/$(date +%F)-gpu-session}
mkdir -p "$OUT"
export TRITON_INTERPRET=0
[ -d .carry/tiktoken_cache ] && export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$PWD/.carry/tiktoken_cache}
status=0

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

echo "== gpu tests"
python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== race check (compute-sanitizer racecheck + memcheck on small shapes, fixed configs)"
if command -v compute-sanitizer >/dev/null 2>&1; then
    cat > "$OUT/race_target.py" <<'PY'
import torch
from kernels import decode_attention, flash_attention
torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float32):
    for T, D, causal in ((77, 64, True), (128, 128, False), (33, 80, True)):
        q, k, v = (torch.randn(2, 3, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        flash_attention(q, k, v, causal=causal, dropout_p=0.1).sum().backward()
kc, vc = (torch.randn(2, 12, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
decode_attention(torch.randn(2, 12, 1, 64, device="cuda", dtype=torch.bfloat16), kc, vc,
                 torch.tensor([5, 300], device="cuda", dtype=torch.int32))
torch.cuda.synchronize()
print("race target done")
PY
    for tool in racecheck memcheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 3 python "$OUT/race_target.py" 2>&1 | tail -20 \
            | tee "$OUT/sanitizer-$tool.txt"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    done
else
    echo "compute-sanitizer not found: race check not run" | tee "$OUT/sanitizer.txt"
fi

echo "== benchmarks"
python -m bench ${QUICK:+--quick} --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
