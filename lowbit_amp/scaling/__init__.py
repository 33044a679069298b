"""Scaling-factor management: one :class:`ScalingState` per GEMM operand, one :class:`ScalingManager` per model."""

from lowbit_amp.scaling.manager import ScalingManager
from lowbit_amp.scaling.state import ScalingState

__all__ = ["ScalingManager", "ScalingState"]
