"""Low-precision GEMMs in "NT" form: ``out = a @ b.T`` with ``a (M, K)`` and ``b (N, K)`` both contracting on K."""

from lowbit_amp.gemm.fp8 import fp8_mm_nt

__all__ = ["fp8_mm_nt"]
