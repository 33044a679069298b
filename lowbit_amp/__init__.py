"""lowbit_amp: 8-bit (FP8 / INT8) training for PyTorch in one line.

    import lowbit_amp as amp
    model, optimizer = amp.initialize(model, optimizer, opt_level="O2")

Importing this package needs only torch and pyyaml: it does not import Triton, DeepSpeed or Transformer Engine, and
does not initialise CUDA.
"""

from lowbit_amp.config import ConfigError, LowBitConfig
from lowbit_amp.initialize import amp_state, initialize, step_scaling, summary
from lowbit_amp.levels import resolve_config
from lowbit_amp.loss_scaler import DynamicLossScaler, scale_loss
from lowbit_amp.nn.linear import LowBitLinear
from lowbit_amp.nn.swap import NoEligibleLayersError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DynamicLossScaler",
    "LowBitConfig",
    "LowBitLinear",
    "NoEligibleLayersError",
    "amp_state",
    "initialize",
    "resolve_config",
    "scale_loss",
    "step_scaling",
    "summary",
]
