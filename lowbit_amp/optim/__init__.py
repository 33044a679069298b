"""Low-bit optimizers (O2/O3): per-moment state formats, 16-bit master weights, a fused FP32 update."""

from lowbit_amp.optim.build import build_optimizer
from lowbit_amp.optim.lowbit_adamw import LowBitAdam, LowBitAdamW
from lowbit_amp.optim.lowbit_optimizer import LowBitOptimizer
from lowbit_amp.optim.lowbit_sgd import LowBitSGD

__all__ = ["LowBitAdam", "LowBitAdamW", "LowBitOptimizer", "LowBitSGD", "build_optimizer"]
