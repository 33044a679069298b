"""Block-scaled INT8 GEMM ``out = a · bᵀ`` with INT32 accumulation and the dequantization in the epilogue.

The numerical truth the Triton kernel (:mod:`lowbit_amp.kernels.int8_gemm`) is tested against. Both operands are
row-major and contract over their last dim (NT form); they share the K block ``bk``. For every K block ``kb``::

    acc   = Σ_k∈kb q_a[m, k] · q_b[n, k]                 (INT32, exact: |acc| ≤ 127²·bk)
    out  += (float(acc) · sinv_a[m, kb]) · sinv_b[n, kb]   (FP32, K blocks in ascending order)

then, for fallback tiles of ``a`` only, in ascending K-block order, one more term per tile: ``residual`` mode adds the
same product with the residual codes and scales; ``hp`` mode adds the bf16 product of the tile's 16-bit values (FP32
accumulation) — its INT8 codes were zeroed, so the main loop contributed nothing there. Bias in FP32, then the cast.

``torch._int_mm`` does the INT32 products. Its shape rules: on CPU any shape; on CUDA ``m > 16`` and ``k``, ``n``
multiples of 8 — the reference zero-pads to meet them (zeros add nothing). ``_int_mm`` runs one K block at a time,
so this path is for correctness, not speed: on CUDA ``backend="auto"`` dispatches to the Triton kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lowbit_amp.int8.block_quant import Int8Blocks, expand_blocks
from lowbit_amp.int8.compiled_ops import compiled_row_mm, use_compiled_ops
from lowbit_amp.int8.fallback import FallbackOperand, main_of, require_b_hp, to_hp
from lowbit_amp.int8.row_scaled import ROW, finish_gemm, is_row_scaled, reference_row_mm_nt, row_mm_chunked
from lowbit_amp.quant.granularity import Granularity

__all__ = ["int8_block_mm_nt", "int_mm_nt"]

BACKENDS = ("auto", "reference", "triton")


def int_mm_nt(a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
    """``a_q @ b_q.T`` for int8 operands with int32 accumulation, padding to ``torch._int_mm``'s CUDA shape rules."""
    m, k = a_q.shape
    n = b_q.shape[0]
    if a_q.is_cuda:
        pad_m, pad_k, pad_n = max(0, 17 - m), (-k) % 8, (-n) % 8
        if pad_m or pad_k:
            a_q = F.pad(a_q, (0, pad_k, 0, pad_m))
        if pad_n or pad_k:
            b_q = F.pad(b_q, (0, pad_k, 0, pad_n))
        return torch._int_mm(a_q, b_q.t())[:m, :n]
    return torch._int_mm(a_q.contiguous(), b_q.t())


def _row_scale_inv(blocks: Int8Blocks, rows: int) -> torch.Tensor:
    """``(rows, n_kblocks)`` float32 dequantization multipliers, one per row and K block."""
    inv = blocks.scale.float().reciprocal()
    return expand_blocks(inv, rows, inv.shape[1], Granularity(blocks.block.rows, 1))


def _check(a_main: Int8Blocks, b: Int8Blocks) -> None:
    if a_main.q.dtype != torch.int8 or b.q.dtype != torch.int8:
        raise TypeError(f"INT8 GEMM needs int8 codes, got {a_main.q.dtype} and {b.q.dtype}.")
    if a_main.q.shape[1] != b.q.shape[1]:
        raise ValueError(f"INT8 GEMM (NT form): a is {tuple(a_main.q.shape)} and b is {tuple(b.q.shape)}; their last "
                         "dims (the contraction) must match.")
    if a_main.block.cols != b.block.cols:
        raise ValueError(f"INT8 GEMM: a's K block ({a_main.block.cols}) and b's ({b.block.cols}) must be equal, "
                         "because both scales are applied once per K block.")


def reference_block_mm_nt(
    a: Int8Blocks | FallbackOperand,
    b: Int8Blocks,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    b_hp: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pure-PyTorch block-scaled INT8 GEMM (see the module docstring for the exact arithmetic)."""
    main = main_of(a)
    _check(main, b)
    rows, k_dim = main.q.shape
    cols = b.q.shape[0]
    bk = main.block.cols
    sa_inv, sb_inv = _row_scale_inv(main, rows), _row_scale_inv(b, cols)
    out = torch.zeros(rows, cols, dtype=torch.float32, device=main.q.device)
    n_kb = math.ceil(k_dim / bk)
    for kb in range(n_kb):
        ks = slice(kb * bk, min(k_dim, (kb + 1) * bk))
        acc = int_mm_nt(main.q[:, ks], b.q[:, ks]).float()
        out += (acc * sa_inv[:, kb, None]) * sb_inv[None, :, kb]
    if isinstance(a, FallbackOperand):
        row_flags = expand_blocks(a.flags, rows, a.flags.shape[1], Granularity(a.tile.rows, 1))
        if a.mode == "residual":
            assert a.residual is not None
            sr_inv = _row_scale_inv(a.residual, rows)
        else:  # converted once, not per K block (elementwise conversions: the same values, fewer ops)
            assert a.hp is not None
            a_hp, b_hp = a.hp.float(), to_hp(require_b_hp(b_hp)).float()
        for kb in range(n_kb):
            ks = slice(kb * bk, min(k_dim, (kb + 1) * bk))
            if a.mode == "residual":
                part = (int_mm_nt(a.residual.q[:, ks], b.q[:, ks]).float() * sr_inv[:, kb, None]) * sb_inv[None, :, kb]
            else:
                part = a_hp[:, ks] @ b_hp[:, ks].t()  # bf16 products, fp32 sums
            out += torch.where(row_flags[:, kb, None], part, 0.0)
    return finish_gemm(out, bias, out_dtype)


def int8_block_mm_nt(
    a: Int8Blocks | FallbackOperand,
    b: Int8Blocks,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    b_hp: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``dequant(a) · dequant(b)ᵀ (+ bias)`` in ``out_dtype``; row-scaled operands (both) take the row-scaled GEMM
    (:mod:`lowbit_amp.int8.row_scaled`), block-scaled ones the block GEMM.

    ``backend``: ``"auto"`` runs the Triton kernel on CUDA when its block shapes are supported (see
    :func:`lowbit_amp.kernels.int8_gemm.kernel_supports`) and the reference otherwise; ``"reference"`` / ``"triton"``
    force one (``"triton"`` raises if it cannot serve the call).
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown INT8 GEMM backend {backend!r}; use one of {list(BACKENDS)}.")
    main = main_of(a)
    if is_row_scaled(main) and is_row_scaled(b):
        if backend == "auto" and use_compiled_ops(ROW, "nearest"):  # torch.compile: the op (compiled_ops.py)
            return compiled_row_mm(a, b, out_dtype, bias, b_hp)
        if backend != "reference" and main.q.is_cuda:
            from lowbit_amp.kernels.int8_row_gemm import row_kernel_supports, triton_row_mm_nt

            ok, reason = row_kernel_supports(a, b)
            if ok:
                return row_mm_chunked(
                    lambda a_, b_, dtype, bias_, hp_: triton_row_mm_nt(a_, b_, dtype, bias_, b_hp=hp_),
                    a, b, out_dtype, bias, b_hp)
            if backend == "triton":
                raise ValueError(f"The Triton row-scaled INT8 GEMM cannot serve this call: {reason}.")
        elif backend == "triton":
            raise ValueError("The Triton INT8 GEMM needs CUDA tensors; use backend='reference' on CPU.")
        return reference_row_mm_nt(a, b, out_dtype, bias, b_hp)
    if backend != "reference" and main.q.is_cuda:
        from lowbit_amp.kernels.int8_gemm import kernel_supports, triton_block_mm_nt

        ok, reason = kernel_supports(a, b)
        if ok:
            return triton_block_mm_nt(a, b, out_dtype, bias, b_hp)
        if backend == "triton":
            raise ValueError(f"The Triton INT8 GEMM cannot serve this call: {reason}.")
    elif backend == "triton":
        raise ValueError("The Triton INT8 GEMM needs CUDA tensors; use backend='reference' on CPU.")
    return reference_block_mm_nt(a, b, out_dtype, bias, b_hp)
