"""FP8 all-reduce on 2 and 4 gloo ranks: bit-identical on every rank, error within a derived elementwise bound."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lowbit_amp.distributed.fp8_allreduce import fp8_all_reduce_, fp8_all_reduce_codes, simulate_fp8_all_reduce
from lowbit_amp.formats import get_format
from tests.distributed._launch import run_ranks

# Lengths that are and are not multiples of the world size / 16; segment sizes with a zero-length and a 1-element one.
SEGMENTS = (1000, 0, 1, 37, 2011)


def _rank_data(rank: int, length: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234 + rank)
    # per-segment magnitudes differ by 2**10, as layers' gradients do
    scales = torch.cat([torch.full((n,), 2.0 ** (-3 * i)) for i, n in enumerate(SEGMENTS)])
    return torch.randn(length, generator=gen, dtype=torch.float64) * scales * torch.exp(
        torch.randn(length, generator=gen, dtype=torch.float64))


def _worker(rank: int, world: int) -> dict:
    length = sum(SEGMENTS)
    out = {}
    for fmt in ("e4m3", "e5m2"):
        x = _rank_data(rank, length)
        buf = x.float().clone()
        fp8_all_reduce_(buf, fmt=fmt, segments=SEGMENTS)
        out[fmt] = buf
    # sum mode, and a non-finite segment that must come back NaN on every rank
    x = _rank_data(rank, length).float()
    out["sum"] = fp8_all_reduce_codes(x.clone(), average=False, segments=SEGMENTS).dequantize()
    bad = x.clone()
    if rank == world - 1:
        bad[5] = float("inf")
    fp8_all_reduce_(bad, segments=SEGMENTS)
    out["nonfinite"] = bad
    # bytes really are 1 per element on the wire: the payload dtype the collectives moved
    reduced = fp8_all_reduce_codes(x.clone(), segments=SEGMENTS)
    out["codes_dtype"] = reduced.codes.dtype
    dist.barrier()
    return out


def _bound(per_rank: torch.Tensor, got: torch.Tensor, fmt: str) -> torch.Tensor:
    """Rigorous elementwise bound on |got - mean|, per segment.

    Input cast: relative error <= 2**-(m+1) (half an ulp, m mantissa bits) or absolute <= half the subnormal step, in
    code units, per rank; the mean of N such errors is bounded by the same. Output cast: the same again, relative to
    the output. The scale is ``fmt.max / amax`` of the segment (in code units), the output boost only shrinks the
    output's absolute term, so using boost 1 keeps the bound valid.
    """
    f = get_format(fmt)
    rel = 2.0 ** -(f.mantissa_bits + 1)
    half_sub = f.min_subnormal / 2
    bound = torch.empty_like(got, dtype=torch.float64)
    start = 0
    for n in SEGMENTS:
        seg = per_rank[:, start:start + n]
        if n:
            scale = f.max / seg.abs().amax()
            input_err = rel * seg.abs().mean(0) + half_sub / scale
            bound[start:start + n] = input_err + rel * (seg.mean(0).abs() + input_err) + half_sub / scale
        start += n
    return bound * (1 + 1e-6)


@pytest.mark.parametrize("world", [2, 4])
def test_fp8_all_reduce_gloo(world: int) -> None:
    results = run_ranks(_worker, world)
    length = sum(SEGMENTS)
    per_rank = torch.stack([_rank_data(r, length).float().double() for r in range(world)])
    exact = per_rank.mean(0)
    for fmt in ("e4m3", "e5m2"):
        first = results[0][fmt]
        for r in range(1, world):
            assert torch.equal(first.view(torch.int32), results[r][fmt].view(torch.int32)), f"rank {r} differs ({fmt})"
        err = (first.double() - exact).abs()
        bound = _bound(per_rank, first.double(), fmt)
        assert bool((err <= bound).all()), f"{fmt}: {int((err > bound).sum())} elements exceed the bound"
        rel_l2 = float((first.double() - exact).norm() / exact.norm())
        assert rel_l2 < (0.05 if fmt == "e4m3" else 0.10), rel_l2
        # the distributed path is exactly the simulated one (same code, collectives swapped for reshuffles)
        sim = simulate_fp8_all_reduce(per_rank.float(), fmt=fmt, segments=SEGMENTS)
        assert torch.equal(sim, first)
    total = per_rank.sum(0)
    got_sum = results[0]["sum"].double()
    assert float((got_sum - total).norm() / total.norm()) < 0.05
    for r in range(world):
        nonfinite = results[r]["nonfinite"]
        assert bool(nonfinite[:1000].isnan().all()), "the segment with an inf must come back NaN"
        assert bool(torch.isfinite(nonfinite[1000:]).all()), "other segments stay finite"
        assert results[r]["codes_dtype"] == torch.float8_e4m3fn


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match=r"shape \(N ranks, L\)"):
        simulate_fp8_all_reduce(torch.zeros(2, 4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        simulate_fp8_all_reduce(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="segments"):
        simulate_fp8_all_reduce(torch.zeros(2, 8), segments=(3, 4))
    with pytest.raises(ValueError, match="prescale"):
        simulate_fp8_all_reduce(torch.zeros(2, 8), prescale="half")
    with pytest.raises(ValueError, match="output_scaling"):
        simulate_fp8_all_reduce(torch.ones(2, 8), output_scaling="row")
