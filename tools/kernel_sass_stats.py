"""Static instruction counts of the fused Adam kernel's compiled variants, for sm_90, on a machine without a GPU.

Why: the fused step is instruction-bound, not bandwidth-bound (docs/optimizer.md), so its cost per element is roughly
its SASS instruction count per element. Triton compiles (and ptxas assembles) for a given target without a device, so
this compares variants — which math lowers to libdevice polynomials, how many MUFU/shuffle ops a tile needs — without
spending device time. Run: ``python tools/kernel_sass_stats.py`` (needs Triton with its bundled ptxas/cuobjdump).
"""

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lowbit_amp.kernels import adam_triton as K

SIGNATURE = {"table_ptr": "*i64", "scratch_ptr": "*fp32", "chunk_ptr": "*i64", "ok_ptr": "*u8", "base_u8": "*u8",
             "base_u16": "*i16", "base_f16": "*fp16", "base_f32": "*fp32", "base_e4m3": "*fp8e4nv",
             "base_e5m2": "*fp8e5"}
VARIANTS = {
    "O3 (e4m3 m, fp16 v)": dict(V_KIND=1),
    "O3 8-bit v (e4m3 m, e4m3_expand v)": dict(V_KIND=2),
}


def compile_variant(overrides: dict) -> dict:
    constexprs = dict(BLOCK_SIZE=128, BLOCK=128, BPP=8, GRAD_KIND=2, PARAM_KIND=0, M_KIND=2, V_KIND=1, MASTER_KIND=2,
                      DECOUPLED=True, MAXIMIZE=False, USE_LIBDEVICE=True, EXACT_POW=False, ALIGNED=True,
                      NUMEL16=True, FAST_MATH=True)
    constexprs.update(overrides)
    sig = dict(SIGNATURE)
    sig.update({name: "constexpr" for name in constexprs})
    src = ASTSource(fn=K.fused_adam_kernel, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "enable_fp_fusion": False})


def sass_of(compiled) -> str:
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


def opcode_counts(sass: str) -> collections.Counter:
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if m:
            ops[m.group(1).split(".")[0]] += 1
    return ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    elems = 8 * 128 / 128  # elements per thread: BPP x BLOCK over 4 warps x 32 threads
    for name, overrides in VARIANTS.items():
        compiled = compile_variant(overrides)
        ops = opcode_counts(sass_of(compiled))
        total = sum(ops.values())
        ptx = compiled.asm["ptx"]
        print(f"{name}: {total} SASS instructions, static count over every branch ({total / elems:.1f} per element "
              f"of a thread's {elems:.0f}), "
              f"libdevice log2 polynomials in PTX: "
              f"{ptx.count('__nv_log2f.exit')}, MUFU {ops['MUFU']}, SHFL {ops['SHFL']}")
        print("   ", ", ".join(f"{k} {v}" for k, v in ops.most_common(args.top)))


if __name__ == "__main__":
    sys.exit(main())
