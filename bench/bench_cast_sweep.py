"""The fused FP8 cast kernel's launch shape (tile rows, programs per SM) over the anchor step's cast shapes (GPU).

Why: in the compiled 4096-wide anchor step the 30 casts took 2.6 ms per step (profile, run zc) where the bytes they
must move take ~1.7 ms at the H200's copy bandwidth, and that gap is about what issue 6's compiled target misses by.
One program per 64x128 tile made 8192 programs per 16384x4096 cast, each with two same-address atomics and their
fences; the kernel now strides over tiles (``lowbit_amp.kernels.fp8_cast.PROGRAMS_PER_SM``).

Run: PYTHONPATH=. python bench/bench_cast_sweep.py [--rounds 3] [--out DIR]
Every setting is timed in interleaved rounds (median of do_bench medians), delayed-warm (the one-pass path the
activations, gradients and — under delayed weight scaling — weights take) with the transpose, bf16 input, E4M3. Per
setting it prints each shape's ms and its share of the copy-bandwidth floor, then the anchor step's cast total (the
shapes weighted by how often a step casts them). Bytes, and the first setting's outputs, are checked equal across
settings (every byte of the FP8 outputs and the recorded amax).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

# (rows, cols): calls per anchor step (2 Llama blocks, dim 4096, ffn 14336, 8192 tokens): x of wqkv/wo/w1/w3 and dy
# of wo/w2 are 8192x4096; x of w2 and dy of w1/w3 8192x14336; dy of wqkv 8192x12288; the five weights.
STEP_SHAPES = {(8192, 4096): 10, (8192, 14336): 6, (8192, 12288): 2, (12288, 4096): 2, (4096, 4096): 2,
               (14336, 4096): 4, (4096, 14336): 2}
# (8192, 4096) was 12 per step until w3 began sharing w1's cast of h (lowbit_amp/nn/shared_input_cast.py, 2026-12-02).
# (tile rows, tile cols, programs per SM or None for one program per tile, warps). Run zo (H200, 2026-12-02): 64x128
# tiles, 8 warps, one program per tile 2.435 / 2.431 ms of casts per anchor step, 8 per SM 2.366 / 2.359 (the default
# since), 16 per SM 2.378, 4 warps 2.372, 32x128 2.580, 64x256 one per tile 2.444. Run zr (28 casts after sharing):
# default 2.258 / 2.271, 128x128 8 warps 2.833, 16 warps 2.593 (4 per SM) / 2.738 (8 per SM), 128x64 2.465, and an L2
# evict-first hint on the read (a knob since removed) 2.348.
SETTINGS = [(64, 128, 8, 8), (128, 128, 4, 16), (128, 64, 8, 8), (64, 128, 8, 8), (64, 128, 16, 8)]
KNOBS = ("_BLOCK_M", "_BLOCK_K", "PROGRAMS_PER_SM", "_NUM_WARPS")


def main() -> None:
    import triton.testing

    from lowbit_amp.kernels import fp8_cast

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    bw = 2 * src.numel() / copy_ms / 1e9  # TB/s, read + write
    inputs = {shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for shape in STEP_SHAPES}
    scale = torch.tensor(10.0, device="cuda")

    def cast(x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple:
        return fp8_cast.launch_cast(x, scale, torch.float8_e4m3fn, 448.0, 448.0, False, True, True, *state)

    def fresh_state() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.zeros((), device="cuda"), torch.zeros((), dtype=torch.int64, device="cuda"),
                torch.zeros(2, dtype=torch.int32, device="cuda"))

    base = [getattr(fp8_cast, knob) for knob in KNOBS]

    def use(setting: tuple) -> None:
        for knob, value in zip(KNOBS, setting):
            setattr(fp8_cast, knob, value)

    ref = {}
    times: dict = {i: {shape: [] for shape in STEP_SHAPES} for i in range(len(SETTINGS))}  # repeats on purpose
    try:
        for setting in SETTINGS:  # correctness first: every setting's bytes and amax equal the first's
            use(setting)
            for shape, x in inputs.items():
                state = fresh_state()
                lp, lp_t, _ = cast(x, state)
                got = (lp.view(torch.uint8), lp_t.view(torch.uint8), state[0].clone())
                if shape not in ref:
                    ref[shape] = got
                else:
                    assert all(torch.equal(a, b) for a, b in zip(ref[shape], got)), (setting, shape)
                    assert int(state[2].abs().sum()) == 0, (setting, shape)
        print(f"outputs equal across settings; copy bandwidth {bw:.2f} TB/s", flush=True)
        for _ in range(args.rounds):  # per shape, every setting back to back (drift between them stays small)
            for shape, x in inputs.items():
                for i, setting in enumerate(SETTINGS):
                    use(setting)
                    state = fresh_state()
                    times[i][shape].append(
                        triton.testing.do_bench(lambda: cast(x, state), warmup=10, rep=40, return_mode="median"))
    finally:
        use(tuple(base))
    rows = []
    for i, setting in enumerate(SETTINGS):
        med = {shape: statistics.median(t) for shape, t in times[i].items()}
        step_ms = sum(med[shape] * n for shape, n in STEP_SHAPES.items())
        floor = {shape: 4 * shape[0] * shape[1] / bw / 1e9 for shape in STEP_SHAPES}  # read bf16, write lp + lpᵀ
        cells = "  ".join(f"{r}x{c} {med[(r, c)]:.3f} ({floor[(r, c)] / med[(r, c)]:.0%})" for r, c in STEP_SHAPES)
        print(f"tile {setting[0]}x{setting[1]} programs/SM {str(setting[2]):>4} warps {setting[3]:>2}: "
              f"step casts {step_ms:.3f} ms   {cells}", flush=True)
        rows.append({**dict(zip(KNOBS, setting)), "step_cast_ms": step_ms,
                     "ms": {f"{r}x{c}": v for (r, c), v in med.items()}})
    floor_step = sum(4 * r * c / bw / 1e9 * n for (r, c), n in STEP_SHAPES.items())
    print(f"floor of the step's casts at {bw:.2f} TB/s: {floor_step:.3f} ms", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cast_sweep.json"), "w") as handle:
        json.dump({"gpu": torch.cuda.get_device_name(), "copy_TBps": bw, "floor_step_ms": floor_step,
                   "rounds": args.rounds, "settings": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
