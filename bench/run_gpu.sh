#!/usr/bin/env bash
# Every GPU check and benchmark behind the docs; each case fits one device call (the tool's 10-minute limit):
#   (Nothing written without device time is pending as of 2026-12-02's fourth session: runs zq-zv.)
#   bash bench/run_gpu.sh checks   # GPU tests (kernel bit-identity, custom ops under compile, fused optimizer step incl.
#                                  # re-launch, fp32 masters) + the optimizer benchmark (anchor protocol)
#   bash bench/run_gpu.sh memory   # COAT memory/time per variant (one process each) + the blockwise recipe table
#   bash bench/run_gpu.sh int8     # INT8 Triton GEMM tests + benchmark
#   bash bench/run_gpu.sh optim    # fused optimizer step tests + benchmark with the launch sweep and a profile
#   bash bench/run_gpu.sh e2e      # bench_all.py e2e_big e2e_small (bf16 / lowbit O1 / torchao; eager and compiled)
#   bash bench/run_gpu.sh pending  # GPU checks of work written without device time (see the case below)
#   bash bench/run_gpu.sh pending_memory  # then the issue-7 memory table with those options
#   bash bench/run_gpu.sh issue7   # group cast + fused SwiGLU GPU tests, the low-memory peak breakdown and table
#   bash bench/run_gpu.sh issue7b  # the same after the SwiGLU rework + GPU parity of configs/O3_low_memory.yaml
#   bash bench/run_gpu.sh issue7c  # which pieces the low-memory recipe needs + 5-seed GPU parity
#   bash bench/run_gpu.sh issue7d  # paired parity: O3 vs O3_low_memory, O2 vs O2_low_memory (5 seeds)
#   bash bench/run_gpu.sh s20a..s20d  # session 19 (2026-12-02): cast re-test + rounds with host times, the shared
#                                  # input cast (GPU tests, cast sweep, rounds with/without), issue 6's confirmation, profile
#   bash bench/run_gpu.sh s19 / s19b / s19c / s19d  # session 18 (2026-12-02): interleaved-round ratios (INT8 GEMM, anchor
#                                  # step), the grid-stride FP8 cast (tests, sweep), the compiled cast as a triton_op
#   bash bench/run_gpu.sh s18 / s18b  # session 18 (2026-12-02): flag reuse + merged hp loop (dropped); INT8 compiled ops
#   bash bench/run_gpu.sh s17a..s17f  # session 17 (2026-12-02): 1mma row GEMM, K-split quantizer, INT8 per-layer bench
#   bash bench/run_gpu.sh int8quant  # the row quantizer on transposed views (ran in s17b/zc)
#   bash bench/run_gpu.sh next_parity2 # then: the stochastic-rounding recipe's GPU parity + unit scaling at lr 1.5e-3
#   bash bench/run_gpu.sh next_parity3 # and unit scaling at lr 6e-3 and 2.4e-2, each next to O0 (issue 7)
#   bash bench/run_gpu.sh next     # all GPU tests (ran 2026-12-01 run r: 318 passed), seed-3 probe (DIAGNOSE=1: fused-Adam modes)
#   bash bench/run_gpu.sh next_parity  # block-wise and unit-scaling GPU parity (issue 7; ran: run o)
#   bash bench/run_gpu.sh int8row / int8row2  # the row-scaled INT8 GEMM bench / + tests and training parity (runs p-s)
#   bash bench/run_gpu.sh e2e6     # issue 6's anchor (4096 wide), eager and compiled, delayed and current weight scaling
#   bash bench/run_gpu.sh parity   # multi-seed 6x512 parity: O2, O3 (8-bit v), O3 with FP16 v (configs/O3_fp16_v.yaml) vs O0
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
    timeout 330 python -m pytest -q -p no:cacheprovider tests/gpu tests/kernels tests/nn/test_linear.py \
      tests/nn/test_compile.py tests/optim/test_fused_step.py tests/test_initialize.py 2>&1 | tail -25 \
      | tee "$OUT/gpu_pytest.txt"
    timeout 150 python bench/bench_optim.py --out "$OUT" --iters 10 2>&1 | tail -16 | tee "$OUT/optim.txt"
    ;;
  memory)
    timeout 300 python bench/bench_coat.py 2>&1 | tail -40 | tee "$OUT/coat.txt"
    timeout 90 python bench/bench_recipes.py 2>&1 | tail -30 | tee "$OUT/recipes.txt"
    ;;
  int8)
    python -m pytest -q -p no:cacheprovider tests/int8 2>&1 | tail -5
    python bench/bench_int8.py --out "$OUT" 2>&1 | tail -20
    ;;
  optim)
    timeout 200 python -m pytest -q -p no:cacheprovider tests/optim/test_fused_step.py 2>&1 | tail -8 \
      | tee "$OUT/fused_step_pytest.txt"
    python bench/bench_optim.py --out "$OUT" --iters 10 --sweep > "$OUT/optim_full.txt" 2>&1
    tail -40 "$OUT/optim_full.txt"
    ;;
  e2e)
    # torchao eager (0.47x in shared/ANCHORS.md) and the policy-off 1024-wide variants are left out to fit the budget;
    # BENCH_VARIANTS= (empty) runs every variant.
    export BENCH_VARIANTS=${BENCH_VARIANTS-bf16_eager,lowbit_O1_eager,bf16_compile,lowbit_O1_compile,torchao_tensorwise_compile}
    python bench/bench_all.py e2e_big e2e_small 2>&1 | grep -v "^{" | tail -30
    cp "$OUT/bench.jsonl" "$OUT/bench_e2e.jsonl" 2>/dev/null || true
    ;;
  parity)
    # Multi-seed paired parity on the 6x512 SwiGLU TinyGPT (docs/optimizer.md): O2, O3 and O3 with the 8-bit second
    # moment replaced by FP16 (configs/O3_fp16_v.yaml) vs O0, same seeds. ~12 s per level and seed on an H200: SEEDS=6 -> ~5 min.
    # LEVELS=O0,int8,bench/configs/int8_nofallback.yaml: the INT8 fallback ablation (issue 5) instead.
    python -m lowbit_amp --levels "${LEVELS:-O0,O2,O3,configs/O3_fp16_v.yaml}" --seeds "${SEEDS:-6}" --eval-batches 32 \
      --device cuda --n-layer 6 --n-embd 512 --n-head 8 --steps 300 --batch-size 32 --quiet \
      --json "$OUT/parity_6x512_seeds.json" 2>&1 | tail -14
    ;;
  pending)
    # What the 2026-12-01 session wrote after its device time ended (each item's doc says so): the FP8-gradient fused
    # encode (then flip lowbit_amp.grads.fp8_grad.FUSED_ENCODE), the mixed FP8/plain-gradient re-launch, the int8
    # cached launcher, and the issue-7 peak with the memory changes (docs/recipes.md "What the 5.00 GiB peak"),
    # FP8-saved attention (activations.attention: fp8) included. ~6 min.
    timeout 240 python -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_grad_encode_gpu.py \
      tests/gpu/test_memory_options_gpu.py tests/gpu/test_group_cast_gpu.py \
      tests/optim/test_relaunch_mixed.py tests/int8 2>&1 | tail -8 | tee "$OUT/pending_pytest.txt"
    timeout 60 python bench/memory_peak_breakdown.py --variant O3+fp8act+nocache --json "$OUT/peak.json" 2>&1 | tail -14
    timeout 60 python bench/memory_peak_breakdown.py --variant O3+fp8act+nocache --fused-encode \
      --json "$OUT/peak_fused_encode.json" 2>&1 | tail -14
    timeout 60 python bench/memory_peak_breakdown.py --variant O3+fp8act+nocache+fp8attn+wgbf16 --fused-encode \
      --json "$OUT/peak_fused_encode_fp8attn_wgbf16.json" 2>&1 | tail -14
    ;;
  pending_memory)
    # The issue-7 table with the pending options, one process per variant (~4 min; a separate call from `pending`,
    # which fills most of one device call). Run it with LOWBIT_AMP_FUSED_ENCODE=1 once
    # tests/gpu/test_fp8_grad_encode_gpu.py has passed (and then make that the default in lowbit_amp/grads/fp8_grad.py).
    timeout 420 python bench/bench_coat.py --sections e2e --variants \
      bf16,O3+fp8act+nocache,O3+fp8act+nocache+fp8attn,O3+fp8act+nocache+fp8attn+wgbf16,O3+nocache,O3+nocache+wgbf16 \
      2>&1 | tail -14
    # the Triton group cast (COAT's casts: +26-28 ms/step with the reference ops), same variants' step time
    LOWBIT_AMP_FUSED_GROUP_CAST=1 timeout 150 python bench/bench_coat.py --sections e2e \
      --variants O3+fp8act+nocache,O3+fp8act+nocache+fp8attn 2>&1 | tail -6
    ;;
  issue7)
    # The group-cast bf16 fix and the fused SwiGLU backward (activations.glu: fused) on the GPU; then, with the Triton
    # group cast on only if its test passed: the peak breakdown with every memory option (configs/O3_low_memory.yaml's
    # variant) and the issue-7 table, one process per variant. ~5 min.
    timeout 150 python -m pytest -q -p no:cacheprovider tests/gpu/test_group_cast_gpu.py tests/gpu/test_fp8_glu_gpu.py \
      > "$OUT/issue7_pytest.txt" 2>&1
    rc=$?; tail -6 "$OUT/issue7_pytest.txt"
    if [ "$rc" = 0 ]; then export LOWBIT_AMP_FUSED_GROUP_CAST=1; else echo "group cast / glu GPU tests failed: reference casts"; fi
    timeout 60 python bench/memory_peak_breakdown.py --variant O3+fp8act+nocache+fp8attn+glu+wgbf16 \
      --json "$OUT/peak_low_memory.json" 2>&1 | tail -16
    timeout 330 python bench/bench_coat.py --sections e2e --variants \
      bf16,O3+nocache,O3+fp8act+nocache+fp8attn+wgbf16,O3+fp8act+nocache+fp8attn+glu+wgbf16 2>&1 | tail -10
    ;;
  issue7b)
    # After the SwiGLU rework (SiLU keeps only the FP8 pack of its input) and with the Triton group cast on by default:
    # GPU tests, the low-memory peak breakdown, the issue-7 table, and the GPU parity of configs/O3_low_memory.yaml
    # vs O0 (SEEDS seeds, 6x512 tiny GPT; loss target within 1% of bf16). ~6 min.
    timeout 150 python -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_glu_gpu.py tests/gpu/test_group_cast_gpu.py \
      tests/gpu/test_memory_options_gpu.py 2>&1 | tail -4 | tee "$OUT/issue7b_pytest.txt"
    timeout 60 python bench/memory_peak_breakdown.py --variant O3+fp8act+nocache+fp8attn+glu+wgbf16 \
      --json "$OUT/peak_low_memory.json" 2>&1 | tail -16
    timeout 200 python bench/bench_coat.py --sections e2e --variants \
      bf16,O3+fp8act+nocache+fp8attn+wgbf16,O3+fp8act+nocache+fp8attn+glu+wgbf16 2>&1 | tail -8
    python -m lowbit_amp --levels "O0,configs/O3_low_memory.yaml" --seeds "${SEEDS:-3}" --eval-batches 32 \
      --device cuda --n-layer 6 --n-embd 512 --n-head 8 --steps 300 --batch-size 32 --quiet \
      --json "$OUT/parity_low_memory.json" 2>&1 | tail -14
    ;;
  issue7c)
    # Which pieces the 1.45x needs: the low-memory variant without the bf16 dW GEMM, and with the FP8 weight cache;
    # the fixed bf16-dW GPU test; then a 5-seed GPU parity of configs/O3_low_memory.yaml vs O0. ~6 min.
    timeout 60 python -m pytest -q -p no:cacheprovider tests/gpu/test_memory_options_gpu.py 2>&1 | tail -3
    timeout 260 python bench/bench_coat.py --sections e2e --variants \
      bf16,O3+fp8act+nocache+fp8attn+glu,O3+fp8act+fp8attn+glu+wgbf16,O3+fp8act+nocache+fp8attn+glu+wgbf16 2>&1 | tail -8
    python -m lowbit_amp --levels "O0,configs/O3_low_memory.yaml" --seeds "${SEEDS:-5}" --eval-batches 32 \
      --device cuda --n-layer 6 --n-embd 512 --n-head 8 --steps 300 --batch-size 32 --quiet \
      --json "$OUT/parity_low_memory.json" 2>&1 | tail -14
    ;;
  issue7d)
    # Paired, same run: O3 vs configs/O3_low_memory.yaml (what the activation recipes add on top of O3's optimizer) and
    # O2 vs the same pieces on O2 (bench/configs/O2_low_memory.yaml), 5 seeds; and the bf16-dW GPU test in full. ~6 min.
    timeout 60 python -m pytest -q -p no:cacheprovider tests/gpu/test_memory_options_gpu.py -k weight_grad 2>&1 | grep -E "^E|passed|failed" | head -12
    python -m lowbit_amp --levels "O3,configs/O3_low_memory.yaml,O2,bench/configs/O2_low_memory.yaml" --seeds "${SEEDS:-5}" \
      --eval-batches 32 --device cuda --n-layer 6 --n-embd 512 --n-head 8 --steps 300 --batch-size 32 --quiet \
      --json "$OUT/parity_low_memory_paired.json" 2>&1 | tail -16
    ;;
  o3spike)
    # O3 spikes at step ~30 on the parity recipe's seed 3 (6x512, lr 3e-3; +5.4% val vs O0): which optimizer piece.
    timeout 280 python -m lowbit_amp --levels "O0,O3,bench/configs/O3_m_bf16.yaml,bench/configs/O3_master_fp32.yaml,bench/configs/O3_v_fp32.yaml" \
      --seeds "3," --eval-batches 32 --device cuda --n-layer 6 --n-embd 512 --n-head 8 --steps 300 --batch-size 32 \
      --quiet --json "$OUT/o3spike.json" 2>&1 | tail -12
    ;;
  next)
    # Written 2026-12-01 (ran as run r that evening: 318 passed), one device call (~6 min): every GPU
    # test after the day's changes (fused SwiGLU/GeGLU — when the GELU kernel cases pass, add them to
    # lowbit_amp.recipes.fp8_glu.GPU_VERIFIED —, checkpoint guard, group cast and fused encode on by default), the fused
    # Adam's unserved modes (is the disagreement only the bias corrections' powf?), and seed 3's step-30 spike (all FP8
    # levels; delayed vs current output-gradient scaling). Then `next_parity` in a second call.
    timeout 330 python -m pytest -q -p no:cacheprovider tests/gpu tests/kernels 2>&1 | tail -8 | tee "$OUT/next_pytest.txt"
    [ -n "${DIAGNOSE:-}" ] && timeout 120 python tools/diagnose_fused_modes.py 2>&1 | tail -6
    timeout 120 python -m lowbit_amp --levels "O0,O1,bench/configs/O1_current_grad_output.yaml" --seeds "3," \
      --eval-batches 32 --device cuda --n-layer 6 --n-embd 512 --n-head 8 --steps 300 --batch-size 32 --quiet \
      --json "$OUT/seed3_grad_output.json" 2>&1 | tail -12
    ;;
  int8row)
    # The row-scaled INT8 GEMM (whole-K INT32 accumulation; lowbit_amp/int8/row_scaled.py) vs bf16 and _int_mm, and its
    # accuracy next to the block-scaled layouts; plus its GPU test against the reference. ~3 min.
    timeout 200 python -m pytest -q -p no:cacheprovider tests/int8/test_row_scaled_gpu.py 2>&1 | tail -4
    timeout 300 python bench/bench_int8.py --configs n256_w8_s3 --top 1 --row all --out "$OUT" 2>&1 | tail -40
    ;;
  next_gaps)
    # For the next session (not run yet): does compiled O1's ~2.5 ms per step that no kernel accounts for depend on
    # how often the protocol synchronises? 5 interleaved rounds at the protocol's 4 steps per window, then at 16. ~5 min.
    for n in 4 16; do
      STEPS_PER_WINDOW=$n E2E_ROUNDS=5 BENCH_VARIANTS=bf16_compile,lowbit_O1_compile \
        timeout 250 python bench/bench_all.py e2e_big 2>&1 | grep -v "^{" | grep -v "round " | tail -3
    done
    ;;
  s20d)
    # Session 19: where the compiled step's GPU time goes after sharing (kernel time by kind, O1 and bf16), then 9
    # more interleaved rounds of the 4096-wide anchor. ~4 min.
    timeout 200 python bench/bench_all.py profile_compile 2>&1 | grep "GPU kernel ms"
    E2E_ROUNDS=9 BENCH_VARIANTS=bf16_eager,lowbit_O1_eager,bf16_compile,lowbit_O1_compile \
      timeout 300 python bench/bench_all.py e2e_big 2>&1 | grep -v "^{" | grep -v "round " | tail -6
    ;;
  s20c)
    # Session 19: issue 6's confirmation with today's code (shared input cast on): both anchor workloads, eager and
    # compiled, 9 interleaved rounds each. ~5 min.
    E2E_ROUNDS=9 BENCH_VARIANTS=bf16_eager,lowbit_O1_eager,bf16_compile,lowbit_O1_compile \
      timeout 500 python bench/bench_all.py e2e_big e2e_small 2>&1 | grep -v "^{" | grep -v "round " | tail -14
    ;;
  s20b)
    # Session 19: the shared input cast (GPU bit-equality with the unshared run, eager and compiled; the kernel's amax
    # slot), the cast launch-shape sweep with 128-row tiles and the L2 hint, then the anchor in 7 interleaved rounds
    # with and without sharing. ~6 min.
    timeout 200 python -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_cast_gpu.py \
      tests/gpu/test_shared_input_cast_gpu.py 2>&1 | tail -4 | tee "$OUT/pytest.txt"
    timeout 150 python bench/bench_cast_sweep.py --rounds 3 --out "$OUT" 2>&1 | tail -10
    E2E_ROUNDS=7 BENCH_VARIANTS=bf16_eager,lowbit_O1_eager,lowbit_O1_noshare_eager,bf16_compile,lowbit_O1_compile,lowbit_O1_noshare_compile \
      timeout 300 python bench/bench_all.py e2e_big 2>&1 | grep -v "^{" | tail -9
    ;;
  s20a)
    # Session 19 (2026-12-02): the GPU re-test of the cast kernels after the _load_tile refactor, then issue 6's
    # anchor in 9 interleaved rounds (eager and compiled) with each window's host enqueue time. ~6 min.
    timeout 150 python -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_cast_gpu.py 2>&1 | tail -2 \
      | tee "$OUT/cast_pytest.txt"
    E2E_ROUNDS=9 BENCH_VARIANTS=bf16_eager,lowbit_O1_eager,bf16_compile,lowbit_O1_compile \
      timeout 330 python bench/bench_all.py e2e_big 2>&1 | grep -v "^{" | tail -16
    ;;
  s19d)
    # Session 18: the compiled cast through torch.library.triton_op (VIA_TRITON_OP, off): its GPU test, and only if
    # it passes, compiled bf16 / O1 (dispatcher op) / O1 (triton_op) in interleaved rounds. ~4 min.
    timeout 120 python -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_cast_gpu.py -k compiled_layer 2>&1 | tail -15 \
      && E2E_ROUNDS=5 BENCH_VARIANTS=bf16_compile,lowbit_O1_compile,lowbit_O1_top_compile \
      timeout 200 python bench/bench_all.py e2e_big 2>&1 | grep -v "^{" | tail -5
    ;;
  s19c)
    # Session 18: the cast kernel's GPU tests after the launcher-key change, the INT8 row kernel's after the merged
    # hp loop was removed, and the cast launch-shape sweep with settings timed back to back per shape. ~4 min.
    timeout 150 python -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_cast_gpu.py 2>&1 | tail -2
    timeout 100 python -m pytest -q -p no:cacheprovider tests/int8/test_row_scaled_gpu.py -k "1mma_g16 or chunks" 2>&1 | tail -2
    timeout 150 python bench/bench_cast_sweep.py --rounds 5 --out "$OUT" 2>&1 | tail -11
    ;;
  s19b)
    # Session 18 (2026-12-02): the FP8 cast kernel strides over tiles (PROGRAMS_PER_SM, default 8) instead of one
    # program per tile: its bit-exactness tests, the launch-shape sweep over the anchor's cast shapes, then the anchor
    # step (eager and compiled O1 vs bf16) in interleaved rounds. ~6 min.
    timeout 240 python -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_cast_gpu.py tests/gpu/test_fp8_grad_encode_gpu.py \
      2>&1 | tail -2
    timeout 120 python bench/bench_cast_sweep.py --out "$OUT" 2>&1 | tail -10
    E2E_ROUNDS=5 BENCH_VARIANTS=bf16_eager,lowbit_O1_eager,bf16_compile,lowbit_O1_compile \
      timeout 240 python bench/bench_all.py e2e_big 2>&1 | grep -v "^{" | tail -6
    ;;
  s19)
    # Session 18 (2026-12-02): bf16's time varies more between runs (0.71-0.83 ms at 16384x4096x4096, compiled step
    # 41.9-43.7 ms) than the gaps to issue 5's and 6's targets, so both are measured as per-round ratios over
    # interleaved rounds (median [min, max]); the GPU tests of INT8 under compile now that its ops are on. ~6 min.
    timeout 120 python -m pytest -q -p no:cacheprovider tests/int8/test_compiled_ops_gpu.py 2>&1 | tail -2
    timeout 150 python bench/bench_int8.py --configs none --rounds 9 --out "$OUT" 2>&1 | grep -E "round|bf16 "
    E2E_ROUNDS=5 BENCH_VARIANTS=bf16_eager,lowbit_O1_eager,lowbit_int8_eager,bf16_compile,lowbit_O1_compile,lowbit_int8_compile \
      timeout 330 python bench/bench_all.py e2e_big 2>&1 | grep -v "^{" | tail -14
    ;;
  s18)
    # START HERE (written 2026-12-02 after that session's device time): (1) the weight gradient's reuse of the
    # forward's flags for xᵀ (on by default; interpreter- and CPU-tested; its GPU test here); (2) the row GEMM's hp
    # fallback with both N halves in one loop (r256_w8_s4_1mma_g16_mfb; compiled on CPU, spill-free, interpreter-checked
    # with fp32 operands, never run on a GPU): if its test passes and the GEMM / anchor step are faster, make it
    # DEFAULT_ROW_CONFIG (lowbit_amp/kernels/int8_row_gemm.py) and record the numbers in docs/int8.md. ~6 min.
    # Then s18b.
    timeout 150 python -m pytest -q -p no:cacheprovider tests/int8/test_row_scaled_gpu.py tests/int8/test_row_quant_gpu.py \
      -k "mfb or given_flags" 2>&1 | tail -2
    timeout 120 python bench/bench_int8.py --configs none --row r256_w8_s4_1mma_g16,r256_w8_s4_1mma_g16_mfb \
      --out "$OUT" 2>&1 | grep -E "row r|bf16 "
    timeout 60 python bench/int8_breakdown.py --flags 2>&1 | tail -5  # the detector's GPU time, never measured alone
    BENCH_VARIANTS=bf16_eager,lowbit_int8_eager timeout 100 python bench/bench_all.py e2e_big 2>&1 | grep -v "^{" | tail -2
    INT8_ROW_CONFIG=r256_w8_s4_1mma_g16_mfb BENCH_VARIANTS=bf16_eager,lowbit_int8_eager \
      timeout 100 python bench/bench_all.py e2e_big 2>&1 | grep -v "^{" | tail -2
    ;;
  s18b)
    # (3) INT8 under torch.compile through its ops on CUDA (written 2026-12-02 without device time): the GPU test — if
    # it passes set lowbit_amp/int8/compiled_ops.py CUDA_ENABLED = True — then compiled INT8 vs compiled bf16. ~6 min.
    timeout 150 python -m pytest -q -p no:cacheprovider tests/int8/test_compiled_ops_gpu.py 2>&1 | tail -2
    INT8_COMPILED_OPS=1 BENCH_VARIANTS=bf16_compile,lowbit_int8_compile,lowbit_int8_eager \
      timeout 240 python bench/bench_all.py e2e_big 2>&1 | grep -v "^{" | tail -4
    ;;
  s17f)
    # Session 17's last call (2026-12-02): the compiled cast op folding the amax into the state in place (no traced
    # max/add per cast): its GPU tests, then compiled bf16 vs compiled O1 (issue 6). ~4 min.
    timeout 70 python -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_cast_gpu.py -k "custom_op or compiled" \
      2>&1 | tail -2
    BENCH_VARIANTS=bf16_compile,lowbit_O1_compile timeout 200 python bench/bench_all.py e2e_big 2>&1 | grep -v "^{" | tail -3
    ;;
  s17e)
    # Session 17's fifth call (2026-12-02): the anchor step with INT8 everywhere vs INT8 only from 4096x12288 up (the
    # per-layer benchmark's break-even, which is host-bound), i.e. the o-projections in bf16. ~2 min.
    BENCH_VARIANTS=bf16_eager,lowbit_int8_eager,lowbit_int8_min50m_eager timeout 150 python bench/bench_all.py e2e_big \
      2>&1 | grep -v "^{" | tail -4
    ;;
  s17d)
    # Session 17's fourth call (2026-12-02): the per-layer benchmark for INT8 and FP8 side by side (the shape
    # policy's INT8 threshold was never measured), and the anchor step with the g16 default. ~5 min.
    LINEAR_LEVEL=int8 timeout 160 python bench/bench_all.py linear 2>&1 | grep -v "^{" | tail -16
    LINEAR_LEVEL=O1 timeout 120 python bench/bench_all.py linear 2>&1 | grep -v "^{" | tail -16
    BENCH_VARIANTS=bf16_eager,lowbit_int8_eager timeout 110 python bench/bench_all.py e2e_big 2>&1 | grep -v "^{" | tail -3
    ;;
  s17c)
    # Session 17's third call (2026-12-02): the GPU tests s17b's timeout cut (K-split quantizer, 1mma GEMM), then the
    # default row GEMM's variants (fallback depth, L2 grouping) at issue 5's shapes. ~6 min.
    timeout 100 python -m pytest -q -p no:cacheprovider tests/int8/test_row_quant_gpu.py 2>&1 | tail -2
    timeout 150 python -m pytest -q -p no:cacheprovider tests/int8/test_row_scaled_gpu.py -k "1mma or chunks or strided" \
      2>&1 | tail -2
    timeout 150 python bench/bench_int8.py --configs none \
      --row r256_w8_s4_1mma,r256_w8_s4_1mma_fb2,r256_w8_s4_1mma_g4,r256_w8_s4_1mma_g16 --out "$OUT" 2>&1 | grep -E "row r|bf16 " 
    ;;
  s17b)
    # Session 17's second call (2026-12-02): GPU tests of the K-split row quantizer (transposed inputs) and of the
    # 1mma default; the quantizer sweep; the anchor step (INT8 preset vs bf16 and O1); the INT8 per-call breakdown;
    # the compiled O1 step's kernel table (issue 6). ~9 min.
    timeout 120 python -m pytest -q -p no:cacheprovider tests/int8/test_row_quant_gpu.py tests/int8/test_row_scaled_gpu.py \
      2>&1 | tail -3
    timeout 90 python bench/int8_breakdown.py --quant 2>&1 | tail -6
    BENCH_VARIANTS=bf16_eager,lowbit_O1_eager,lowbit_int8_eager,lowbit_int8row_eager \
      timeout 150 python bench/bench_all.py e2e_big 2>&1 | grep -v "^{" | tail -6
    timeout 80 python bench/int8_breakdown.py lowbit_int8_eager 2>&1 | tail -30
    timeout 120 python bench/bench_all.py profile_compile 2>&1 | grep -v "^{" | tail -70 > "$OUT/profile_compile.txt"
    ;;
  s17a)
    # Session 17's first call (2026-12-02): the row GEMM with one 128x256 MMA per K step and a split epilogue
    # (r256_w8_s*_1mma; GPU test first), timed next to the default and r256_w8_s4_one; the quantizer sweep on
    # transposed views; the anchor step with the best-guess 1mma config. ~8 min.
    timeout 90 python -m pytest -q -p no:cacheprovider tests/int8/test_row_scaled_gpu.py -k "1mma or r256_w8_s4-" 2>&1 | tail -3
    timeout 170 python bench/bench_int8.py --configs none --row r256_w8_s3,r256_w8_s4_one,r256_w8_s3_1mma,r256_w8_s4_1mma \
      --out "$OUT" 2>&1 | tail -22
    timeout 110 python bench/int8_breakdown.py --quant 2>&1 | tail -8
    INT8_ROW_CONFIG=r256_w8_s4_1mma BENCH_VARIANTS=bf16_eager,lowbit_int8_eager \
      timeout 110 python bench/bench_all.py e2e_big 2>&1 | grep -v "^{" | tail -4
    ;;
  int8quant)
    # (ran as part of s17b, run zc, 2026-12-02) the row quantizer on the weight gradient's transposed operands
    # with more rows per program (64/128: longer contiguous runs per load) vs the default and copy-then-quantize
    # (bench/int8_breakdown.py --quant); if rb=64/128 wins, make _rows_per_program pick it for stride-1 rows (the
    # strided quantizations are ~8 of the INT8 anchor step's ~14 ms of quantizer time, docs/int8.md "End to end"),
    # then re-measure the anchor step. ~3 min.
    timeout 150 python bench/int8_breakdown.py --quant 2>&1 | tail -8
    BENCH_VARIANTS=bf16_eager,lowbit_O1_eager,lowbit_int8_eager \
      timeout 150 python bench/bench_all.py e2e_big 2>&1 | grep -v "^{" | tail -5
    ;;
  int8e2e)
    # (run u, 2026-12-02; kept for reference)  (written 2026-12-02 after the device time): first the GPU tests of what was written
    # without device time (K chunks, strided fallback operands in both INT8 kernels, the fused hp zeroing — if
    # test_row_quant_gpu.py passes, set lowbit_amp/int8/activation.py FUSED_HP_ZEROING = True), then the INT8 layouts'
    # end-to-end anchor step (4096-wide, 8192 tokens, AdamW, eager) next to bf16 and O1 in one process — what decides
    # whether the row layout becomes the int8 preset's default — and the row GEMM bench once more. ~8 min.
    timeout 150 python -m pytest -q -p no:cacheprovider tests/int8/test_row_quant_gpu.py tests/int8/test_row_scaled_gpu.py \
      tests/int8/test_triton_gpu.py 2>&1 | tail -3
    BENCH_VARIANTS=bf16_eager,lowbit_O1_eager,lowbit_int8_eager,lowbit_int8row_eager,lowbit_int8rowhp_eager \
      timeout 240 python bench/bench_all.py e2e_big 2>&1 | grep -v "^{" | tail -12
    cp "$OUT/bench.jsonl" "$OUT/bench_int8_e2e.jsonl" 2>/dev/null || true
    timeout 110 python bench/bench_int8.py --configs none --row r256_w8_s4,r256_w8_s3 --out "$OUT" 2>&1 | tail -16
    ;;
  int8prof)
    # Why the INT8 anchor step is 0.43x bf16 (run u, 2026-12-02) while its GEMMs are 1.4-1.7x: both profile tables
    # of the row and block layouts' steps, to $OUT/profile_d4096_*.txt. Plus the one INT8 GPU test run u's timeout cut.
    timeout 100 python -m pytest -q -p no:cacheprovider tests/int8/test_triton_gpu.py -k strided 2>&1 | tail -2
    timeout 200 python bench/bench_all.py profile_int8 2>&1 | grep -v "^{" | tail -60
    ;;
  next_parity2)
    # The stochastic-rounding recipe's GPU parity (issue 7): O2 with SR on the E5M2 output-gradient casts and the FP8
    # weight-gradient encode vs O2 and O0, 3 seeds of the 6x512 tiny GPT. (Enhanced loss scaling is for fp16 models; the
    # CLI refuses pure-fp16 training — see lowbit_amp/train_loop.py — so its check stays the CPU tests.) ~3 min.
    timeout 240 python -m lowbit_amp --levels "O0,O2,bench/configs/O2_sr.yaml" --seeds "${SEEDS:-3}" --eval-batches 32 \
      --device cuda --n-layer 6 --n-embd 512 --n-head 8 --steps 300 --batch-size 32 --quiet \
      --json "$OUT/parity_sr.json" 2>&1 | tail -14
    LRS=0.0015 bash "$0" unit_lr
    ;;
  next_parity3)
    LRS="0.006 0.024" bash "$0" unit_lr
    ;;
  unit_lr)
    # Unit scaling's learning-rate sweep, each rate with O0 next to it (on CPU O0 is best at <= 1.5e-3 and the
    # unit-scaled model at >= 2.4e-2; docs/recipes.md). ~2 min per rate.
    for lr in ${LRS:-0.0015 0.006 0.024}; do
      timeout 200 python -m lowbit_amp --levels "O0,configs/unit_scaled_O1.yaml" --lr $lr --seeds "${SEEDS:-3}" \
        --eval-batches 32 --device cuda --n-layer 6 --n-embd 512 --n-head 8 --steps 300 --batch-size 32 --quiet \
        --json "$OUT/parity_unit_scaling_lr$lr.json" 2>&1 | tail -8
    done
    ;;
  int8row2)
    # Row-scaled INT8 in full: GPU tests of the kernels and the fused row quantizer, the GEMM bench with hp/residual
    # fallback and quantizer + GEMM, then training quality (6x512 tiny GPT, 3 seeds) of row hp / no
    # fallback vs O0 (residual: bench/configs/int8_row_residual.yaml). ~8 min.
    timeout 110 python -m pytest -q -p no:cacheprovider tests/int8 2>&1 | tail -6
    timeout 140 python bench/bench_int8.py --configs none --row r256_w8_s4,r256_w8_s3,r256_w8_s3_fb2,r128_w8_s5 \
      --out "$OUT" 2>&1 | grep -v "^  n256" | tail -30
    timeout 300 python -m lowbit_amp --levels "O0,bench/configs/int8_row_hp.yaml,bench/configs/int8_row_nofallback.yaml" \
      --seeds "${SEEDS:-3}" --eval-batches 32 --device cuda --n-layer 6 --n-embd 512 --n-head 8 --steps 300 \
      --batch-size 32 --quiet --json "$OUT/parity_int8_row.json" 2>&1 | tail -16
    ;;
  next_parity)
    # Issue 7's missing GPU parity: the DeepSeek-V3 block-wise recipe (emulated GEMMs: slow) and unit scaling vs O0,
    # SEEDS seeds of the 6x512 tiny GPT (the low-memory recipe's parity is in docs/recipes.md). ~5-8 min at 3 seeds.
    timeout 560 python -m lowbit_amp --levels "O0,configs/deepseek_blockwise.yaml,configs/unit_scaled_O1.yaml" \
      --seeds "${SEEDS:-3}" --eval-batches 32 --device cuda --n-layer 6 --n-embd 512 --n-head 8 --steps 300 \
      --batch-size 32 --quiet --json "$OUT/parity_recipes.json" 2>&1 | tail -14
    ;;
  e2e6)
    # Issue 6's third sample: the 4096-wide anchor, eager and compiled, delayed (default) and current weight scaling.
    export BENCH_VARIANTS=${BENCH_VARIANTS-bf16_eager,lowbit_O1_eager,bf16_compile,lowbit_O1_compile,lowbit_O1_cw_compile}
    timeout 300 python bench/bench_all.py e2e_big 2>&1 | grep -v "^{" | tail -14
    cp "$OUT/bench.jsonl" "$OUT/bench_e2e.jsonl" 2>/dev/null || true
    ;;
  *)
    echo "usage: bash bench/run_gpu.sh checks|memory|int8|optim|e2e|e2e6|parity|pending|pending_memory|issue7|issue7b|issue7c|issue7d|o3spike|next|next_parity" >&2; exit 2
    ;;
esac
