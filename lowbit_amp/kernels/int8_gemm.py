"""Triton kernels of the INT8 path: the block-scaled INT8 GEMM with the fallback fused in, and the fused quantizer.

Every number below: H200, torch 2.11, Triton 3.6, ``bench/bench_int8.py``, 2026-12-01 (docs/int8.md), or ptxas
(``sm_90``) register/shared-memory counts of the compiled kernels.

GEMM (NT form, ``out = a · bᵀ``; numerics of :mod:`lowbit_amp.int8.reference_gemm`): each program owns a
``128 x BN`` output tile (128 = the fallback tile's rows) and walks K in blocks of ``BK`` = the scale block, so each
block's INT8 ``tl.dot`` gives an exact INT32 product that is promoted once: ``acc += float(part) · (sinv_a[m] ·
sinv_b[n])`` (one I2FP + one FFMA per element; with 128x128 weight blocks ``sinv_b`` is a scalar per half tile).
Choices, each measured:

* TMA descriptors for both operands (K-major tiles, as wgmma's INT8 path needs): pointer loads through registers ran
  at 0.46x bf16 vs 1.16x with TMA (same config). Ragged or unaligned operands fall back to pointer loads.
* ``BN`` = 256 computed as two 128-wide MMAs (``split_n``): one 128x256 INT32 product would need 128 more registers
  per thread and spills (255 + 152 B stack); split, 238 registers, no spill.
* INT32 -> FP32 with ``I2FP`` (``.to(float32)``), not an MMA started from the float bit pattern 0x4B400000: the latter
  removes the conversion but adds a register MOV per element and measured 13% slower (0.804 vs 0.714 ms).
* Two CTAs per SM (``n128_w4_s3``, 243 registers x 128 threads; ``n128_w8_s3_r128``, capped at 128 registers) so that
  one CTA's promotion overlaps the other's MMAs: within 2% of the single big tile — Triton waits for each wgmma right
  after issuing it (SASS: ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` after every ``IGMMA`` group), so the promotion is on the
  critical path either way; issuing both halves' MMAs before the promotions (``interleave``) measured 1.38-1.42x slower.
* The fallback loop runs *before* the main loop: after it, its indices and pointers stayed live through the main loop
  and made it spill (96-136 B of stack). It visits only this M tile's flagged K blocks (compact index list, one small
  kernel, no host sync); ``residual``: one more INT8 product with the residual codes, pipelined (vs ``fb_stages=1``:
  1.464 vs 1.564 ms at 8192^3); ``hp``: one bf16 product, not pipelined (its multi-buffered bf16 tiles need more
  shared memory than the SM has at BN = 256).

Quantizer (activation blocks ``1 x BK``, fallback tiles ``128 x BK``): one full pass over ``x`` writes codes, scales
and every row-block amax (0.064 ms for 16384x4096 bf16: 192 MB moved, 3.0 TB/s); torch reduces the amaxes to tile
amaxes, takes the median and flags tiles (no host sync: the median needs the whole tensor, so it cannot be fused
into the pass); a second kernel touches only the flagged tiles: residual codes and scales (``residual``) or zeroed
codes (``hp``). Rounding is round-half-even (as ``torch.round``), divisions are IEEE (``div_rn``) so codes and scales
match the reference bit for bit.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, replace
from typing import Any

import torch

from lowbit_amp.int8.block_quant import Int8Blocks
from lowbit_amp.int8.fallback import FallbackOperand, detect_outlier_tiles, main_of, require_b_hp, to_hp

__all__ = ["GemmConfig", "CONFIGS", "fallback_index", "kernel_supports", "triton_block_mm_nt", "triton_quantize_act"]

TILE_M = 128  # the GEMM's M tile = the fallback tile's rows
_KBLOCKS = (32, 64, 128, 256)
_QUANT_ROWS = 64  # rows per program of the quantizer's full pass


@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration of the GEMM (``BM`` is always :data:`TILE_M`)."""

    block_n: int = 256
    split_n: int = 2  # the N tile as 2 MMAs of block_n/2: halves the live INT32 registers (see the module doc)
    num_warps: int = 8
    num_stages: int = 4
    group_m: int = 8
    use_tma: bool = True  # only where the operands allow it (16-byte aligned rows); else pointer loads
    magic: bool = False  # INT32 -> FP32 by a 0x4B400000-initialised MMA instead of I2FP: measured 13% slower
    interleave: bool = False  # split_n == 2: both halves' MMAs before either promotion: measured 1.38-1.42x slower
    maxnreg: int | None = None  # register cap (128 lets two 8-warp CTAs share an SM)
    fb_stages: int | None = None  # software-pipeline depth of the fallback loop (None: num_stages for residual, 1 for
    # hp, whose bf16 tiles otherwise need their own multi-buffered shared memory: 384 KB for 128x256, over the 227 KB)


# The small configuration table (each entry compiles once per K). BM is always 128. Registers / shared memory from
# ptxas (sm_90); ms = GEMM without fallback at 16384x4096x4096 / 8192^3 (H200, run 2 of docs/int8.md, 2026-12-01).
# The default is the fastest with residual fallback at 8192^3 (1.464 ms) and within 2% of the fastest without.
CONFIGS: dict[str, GemmConfig] = {
    # the big tile as two 128x128 MMAs: 238 registers, 144 KB shared, one CTA per SM: 0.707 / 1.374 ms
    "n256_w8_s3": GemmConfig(256, 2, 8, 3),
    # 4 stages, 192 KB shared: 0.711 / 1.379 ms
    "n256_w8_s4": GemmConfig(256, 2, 8, 4),
    # one warpgroup per 128x128 tile, 243 registers, 97 KB: two CTAs per SM: 0.714 / 1.406 ms
    "n128_w4_s3": GemmConfig(128, 2, 4, 3),
    # two warpgroups capped at 128 registers (127 used, no spill), two CTAs per SM: 0.695 / 1.391 ms; residual
    # fallback 0.773 ms at 16384x4096x4096 (the best measured there)
    "n128_w8_s3_r128": GemmConfig(128, 2, 8, 3, maxnreg=128),
    # the magic-offset MMA instead of I2FP: 0.804 / 1.575 ms — kept as the measured counter-example
    "n128_w4_s3_magic": GemmConfig(128, 2, 4, 3, magic=True),
}
DEFAULT_CONFIG = "n256_w8_s3"




def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------------------------------------------- launchers


class _Launcher:
    """Launch one of the INT8 ``@jit`` kernels with less host time than ``kernel[grid](...)``.

    Why: on small models the INT8 training step is host-bound (H200, 6x512 tiny GPT: O0 15.5 ms/step, int8 86 ms) and
    every linear layer launches 13 of these kernels per step (4 quantizer passes, 3 fallback passes, 3 fallback
    indexes, 3 GEMMs). ``kernel[grid]`` re-binds the signature (48 parameters for the GEMM), re-specializes every
    argument, builds a string cache key and reads Triton's environment knobs on every call. Same pattern as
    :class:`lowbit_amp.kernels.fp8_cast._Launcher` (measured there: 80.6 -> 55.5 us per fused cast call, H100 host):
    the first call of a key compiles through ``kernel[grid]``; later calls go straight to the compiled kernel's
    launcher. The key is at least as fine as Triton's specialization, so a cached binary is never used for a call
    Triton would have compiled differently: per tensor its dtype and 16-byte alignment, per TMA descriptor its dtype
    and block shape, the integer arguments by value (finer than Triton's ``== 1`` / ``% 16`` / 32-or-64-bit classes,
    and cheaper to key: one tuple), the constexprs and compile options, and the current device (a compiled binary
    belongs to one device's context). Variable shapes therefore add keys (each one a dict entry pointing at an
    existing binary; the cache is cleared past :attr:`MAX_KEYS`). Differences from the fp8 launcher: any grid rank,
    compile options beyond ``num_warps`` (``num_stages``, ``maxnreg``), TMA descriptors, the device in the key, and
    Triton's own path whenever the interpreter runs (``TRITON_INTERPRET=1`` makes ``@jit`` an interpreted function) or
    a launch hook is installed (profilers such as proton observe launches through it).

    The kernels take their pointer / descriptor parameters first, then their integer parameters, then constexprs:
    ``tensors``, ``ints`` and ``constexprs`` (by keyword) follow that signature order, which the first call of each
    key checks, since the compiled launcher takes them positionally.
    """

    MAX_KEYS = 4096

    def __init__(self, name: str, module: str = "lowbit_amp.kernels._int8_triton") -> None:
        self.name = name
        self.module = module  # the @jit file, imported on the first call (importing lowbit_amp never imports Triton)
        self.kernel: Any = None
        self.direct = False
        self.cache: dict = {}

    def __call__(self, grid: tuple[int, ...], tensors: tuple, ints: tuple, constexprs: dict[str, Any],
                 **options: Any) -> None:
        kernel = self.kernel
        if kernel is None:
            kernel = self.kernel = getattr(importlib.import_module(self.module), self.name)
            from triton.runtime.jit import JITFunction

            self.direct = isinstance(kernel, JITFunction)  # False under TRITON_INTERPRET=1
        if not self.direct or _launch_hooked():
            kernel[grid](*tensors, *ints, **constexprs, **options)
            return
        device = torch._C._cuda_getDevice()  # what Triton launches on: the current device and its current stream
        key = (device, ints, *[(t.dtype, t.data_ptr() % 16 == 0) if type(t) is torch.Tensor else _spec(t)
                               for t in tensors], *constexprs.values(), *options.items())
        compiled = self.cache.get(key)
        if compiled is None:
            names = kernel.arg_names
            if [*constexprs] != names[len(tensors) + len(ints):] or not all(type(i) is int for i in ints):
                raise TypeError(f"_Launcher({self.name}): pass the pointer arguments, then the int arguments, then "
                                f"every constexpr by keyword, in signature order {names}.")
            compiled = kernel[grid](*tensors, *ints, **constexprs, **options)
            if hasattr(compiled, "result"):
                compiled = compiled.result()
            if len(self.cache) >= self.MAX_KEYS:
                self.cache.clear()
            self.cache[key] = compiled
            return
        compiled.run(*grid, *(1,) * (3 - len(grid)), torch._C._cuda_getCurrentRawStream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *tensors, *ints, *constexprs.values())


def _launch_hooked() -> bool:
    from triton import knobs

    return knobs.runtime.launch_enter_hook is not None or knobs.runtime.launch_exit_hook is not None


def _spec(arg: object) -> object:
    """What Triton specializes a pointer-like or int kernel argument on (the launcher keys ints by value instead)."""
    kind = type(arg)
    if kind is int:
        return (arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31)  # type: ignore[operator]
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if arg is None:
        return None  # a constexpr None to Triton
    base = getattr(arg, "base", None)  # triton.tools.tensor_descriptor.TensorDescriptor (base: 16-byte aligned)
    if isinstance(base, torch.Tensor):
        return (kind, base.dtype, tuple(arg.block_shape))  # type: ignore[attr-defined]
    raise TypeError(f"_Launcher: no specialization rule for a kernel argument of type {kind.__name__}.")


_launch_gemm = _Launcher("int8_block_mm_kernel")
_launch_fallback_index = _Launcher("fallback_index_kernel")
_launch_quantize_main = _Launcher("quantize_main_kernel")
_launch_quantize_fallback = _Launcher("quantize_fallback_kernel")


def fallback_index(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per M tile: how many K blocks fall back, and their indices first in ascending order (int32, no host sync);
    the rest of each row holds the other K blocks, ascending.

    One small kernel (a torch sum + stable argsort + casts were five launches)."""
    rows, n_kb = flags.shape
    flag_bytes = flags.contiguous().view(torch.uint8)
    counts = torch.empty(rows, dtype=torch.int32, device=flags.device)
    # No zero-fill (one launch per GEMM with fallback): the kernel writes every entry (flagged K blocks, then the
    # others), so even the GEMM's look-ahead load past a tile's count reads a valid index.
    order = (torch.empty if n_kb else torch.zeros)(rows, max(n_kb, 1), dtype=torch.int32, device=flags.device)
    if rows:
        _launch_fallback_index(
            (rows,), (flag_bytes, order, counts), (n_kb, *flag_bytes.stride(), order.stride(0)),
            {"NKB_P2": max(16, triton_next_pow2(n_kb))})
    return counts, order


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def kernel_supports(a: Int8Blocks | FallbackOperand, b: Int8Blocks) -> tuple[bool, str]:
    """Whether :func:`triton_block_mm_nt` serves these operands, and if not why."""
    main = main_of(a)
    bk = main.block.cols
    if bk not in _KBLOCKS or b.block.cols != bk:
        return False, f"K block {bk} (a) / {b.block.cols} (b) must be equal and one of {_KBLOCKS}"
    if isinstance(a, FallbackOperand) and (a.tile.rows != TILE_M or a.tile.cols != bk):
        return False, f"fallback tile {a.tile} must be {TILE_M}x{bk} (the kernel's M tile by the K block)"
    return True, "ok"


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need a contiguous last dim and 16-byte aligned base and row stride."""
    return all(t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
               and t.data_ptr() % 16 == 0 for t in tensors)


def triton_block_mm_nt(
    a: Int8Blocks | FallbackOperand,
    b: Int8Blocks,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    b_hp: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: GemmConfig | str | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    group_m: int | None = None,
    dynamic_fallback_loop: bool = True,
) -> torch.Tensor:
    """The Triton GEMM; same contract as :func:`lowbit_amp.int8.reference_gemm.reference_block_mm_nt`.

    ``out`` may be a strided view (e.g. the transpose of a buffer), which writes a transposed result for free.
    ``config``: a :class:`GemmConfig` or a key of :data:`CONFIGS` (default :data:`DEFAULT_CONFIG`); ``block_n`` etc.
    override its fields. ``dynamic_fallback_loop``: loop over the flagged K blocks with a loaded bound (GPU); the
    interpreter always uses the static bound with a guard.
    """
    ok, reason = kernel_supports(a, b)
    if not ok:
        raise ValueError(f"triton_block_mm_nt: {reason}.")
    cfg = CONFIGS[config or DEFAULT_CONFIG] if not isinstance(config, GemmConfig) else config
    over = {k: v for k, v in (("block_n", block_n), ("num_warps", num_warps), ("num_stages", num_stages),
                              ("group_m", group_m)) if v is not None}
    if over:
        cfg = replace(cfg, **over)
        if "block_n" in over and cfg.block_n < 128:
            cfg = replace(cfg, split_n=1)
    main = main_of(a)
    rows, k_dim = main.q.shape
    cols = b.q.shape[0]
    bk = main.block.cols
    if out is None:
        out = torch.empty(rows, cols, dtype=out_dtype, device=main.q.device)
    sa = main.scale if main.scale.dtype == torch.float32 else main.scale.float()  # inverted in the kernel
    sb_inv = b.scale.float().reciprocal()
    mode = 0
    a2 = sa2 = b2 = idx = cnt = main.q  # placeholders, never read when mode == 0
    s_a2 = s_sa2 = s_b2 = (0, 0)
    s_fb = 0
    if isinstance(a, FallbackOperand):
        cnt, idx = fallback_index(a.flags)
        s_fb = idx.stride(0)
        if a.mode == "residual":
            assert a.residual is not None
            mode, a2, sa2 = 1, a.residual.q, a.residual.scale.float()
            s_a2, s_sa2 = a2.stride(), sa2.stride()
        else:
            mode, a2, b2 = 2, a.hp, require_b_hp(b_hp).to(a.hp.dtype)
            s_a2, s_b2 = a2.stride(), b2.stride()
    bm, bn = TILE_M, cfg.block_n
    bns = bn // cfg.split_n
    if mode == 2 and cfg.use_tma and _tma_ok(main.q, b.q) and not _tma_ok(a2, b2):
        # The weight gradient's 16-bit operands are transposed views: copied contiguous so that TMA stays on for the
        # whole GEMM (one strided operand turned it off: pointer loads ran at 0.46x bf16, and in this kernel's
        # fallback step alone they spilled, see fallback_step). Written 2026-12-02 without device time.
        a2, b2 = a2.contiguous(), b2.contiguous()
        s_a2, s_b2 = a2.stride(), b2.stride()
    use_tma = cfg.use_tma and _tma_ok(main.q, b.q, *((a2,) if mode else ()), *((b2,) if mode == 2 else ()))
    a_src: Any = main.q
    b_src: Any = b.q
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_src = TensorDescriptor.from_tensor(main.q, [bm, bk])
        b_src = TensorDescriptor.from_tensor(b.q, [bns, bk])
        if mode:
            a2 = TensorDescriptor.from_tensor(a2, [bm, bk])
        if mode == 2:
            b2 = TensorDescriptor.from_tensor(b2, [bns, bk])
    b_rows = b.block.rows
    even = rows % bm == 0 and cols % bn == 0 and k_dim % bk == 0
    grid = (math.ceil(rows / bm) * math.ceil(cols / bn),)
    _launch_gemm(
        grid,
        (a_src, b_src, out, sa, sb_inv, bias if bias is not None else sb_inv, a2, sa2, b2, idx, cnt),
        (rows, cols, k_dim,
         *main.q.stride(), *b.q.stride(), *out.stride(), *sa.stride(), *sb_inv.stride(),
         *s_a2, *s_sa2, *s_b2, s_fb),
        {"A_ROWS": main.block.rows, "B_ROWS": b_rows, "SB_SCALAR": b_rows % bns == 0, "FALLBACK": mode,
         "HAS_BIAS": bias is not None, "EVEN": even, "N_KB": math.ceil(k_dim / bk),
         "DYNAMIC_FB": dynamic_fallback_loop and not _interpreting(), "BM": bm, "BN": bn, "BK": bk,
         "SPLIT_N": cfg.split_n, "GROUP_M": cfg.group_m, "USE_TMA": use_tma, "MAGIC": cfg.magic,
         "INTERLEAVE": cfg.interleave, "FB_STAGES": cfg.fb_stages or (cfg.num_stages if mode == 1 else 1)},
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
    )
    return out


def triton_quantize_act(
    x2d: torch.Tensor, block_k: int, fallback: bool, threshold: float, mode: str = "residual"
) -> Int8Blocks | FallbackOperand:
    """Fused ``1 x block_k`` quantization with fallback tiles ``128 x block_k``; same codes as the reference.

    One full pass over ``x`` (codes, scales and block amaxes), the fallback decision in torch (the median needs the
    whole tensor), then a second kernel that touches only the flagged tiles."""
    from lowbit_amp.quant.granularity import Granularity, amax

    if block_k not in _KBLOCKS:
        raise ValueError(f"triton_quantize_act: block_k={block_k} must be one of {_KBLOCKS}.")
    if mode not in ("residual", "hp"):
        raise ValueError(f"Unknown fallback mode {mode!r}; use 'residual' or 'hp'.")
    rows, k_dim = x2d.shape
    n_kb = math.ceil(k_dim / block_k)
    row_amax = torch.empty(rows, n_kb, dtype=torch.float32, device=x2d.device)
    scale = torch.empty_like(row_amax)
    q = torch.empty(rows, k_dim, dtype=torch.int8, device=x2d.device)
    _launch_quantize_main(
        (math.ceil(rows / _QUANT_ROWS), n_kb),
        (x2d, row_amax, q, scale), (rows, k_dim, *x2d.stride(), *row_amax.stride(), *q.stride()),
        {"RB": _QUANT_ROWS, "BK": block_k}, num_warps=4,
    )
    main = Int8Blocks(q, scale, Granularity(1, block_k))
    if not fallback:
        return main
    tile = Granularity(TILE_M, block_k)
    flags = detect_outlier_tiles(amax(row_amax, Granularity(TILE_M, 1)), threshold)
    mode_id = 1 if mode == "residual" else 2
    q2 = torch.empty_like(q) if mode_id == 1 else q
    scale2 = torch.ones_like(row_amax) if mode_id == 1 else scale
    flag_codes = flags.view(torch.uint8)
    _launch_quantize_fallback(
        tuple(flags.shape),
        (x2d, scale, flag_codes, q, q2, scale2),
        (rows, k_dim, *x2d.stride(), *row_amax.stride(), *flag_codes.stride(), *q.stride()),
        {"MODE": mode_id, "BM": TILE_M, "BK": block_k}, num_warps=8,
    )
    operand = FallbackOperand(main, tile, flags, mode)
    if mode_id == 1:
        operand.residual = Int8Blocks(q2, scale2, Granularity(1, block_k))
    else:
        operand.hp = to_hp(x2d)  # a view when x2d is bf16 already
    return operand
