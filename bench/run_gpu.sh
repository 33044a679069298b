#!/usr/bin/env bash
# Every GPU check and benchmark behind the docs, in two device calls (each fits the device tool's 10-minute limit):
#   bash bench/run_gpu.sh checks   # GPU tests (kernels bit-identity, _scaled_mm vs emulation, INT8 Triton), INT8 +
#                                  # blockwise + optimizer benches, the 6x512 SwiGLU parity run (O0..O3, int8)
#   bash bench/run_gpu.sh e2e      # bench_all.py: cast, linear, e2e_big, e2e_small (bf16 / lowbit O1 / torchao)
# Results go to $OUT (default ./out). torchao is optional: carry its wheel in .whl/ (see bench/README.md).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"; export OUT
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
export GIT_COMMIT=${GIT_COMMIT:-unknown}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
case "${1:-checks}" in
  checks)
    python -m pytest -q -p no:cacheprovider tests/gpu tests/kernels tests/int8 tests/nn/test_linear.py 2>&1 | tail -15 | tee "$OUT/gpu_pytest.txt"
    python bench/bench_int8.py --out "$OUT" 2>&1 | tail -20
    python bench/bench_recipes.py 2>&1 | tail -30 | tee "$OUT/recipes.txt"
    python bench/bench_optim.py --out "$OUT" --iters 10 2>&1 | tail -12
    python -m lowbit_amp --levels O0,O1,O2,O3,int8 --device cuda --n-layer 6 --n-embd 512 --n-head 8 \
      --steps 300 --batch-size 32 --quiet --json "$OUT/parity_6x512.json" 2>&1 | tail -15 | tee "$OUT/parity.txt"
    ;;
  e2e)
    python bench/bench_all.py cast linear e2e_big e2e_small 2>&1 | tail -60
    ;;
esac
