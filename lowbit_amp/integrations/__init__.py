"""Integrations with training engines. Each loads its engine lazily: importing this package imports no engine.

* DeepSpeed: :func:`lowbit_amp.integrations.deepspeed_plugin.initialize` (a drop-in for ``deepspeed.initialize`` that
  reads a ``"lowbit_amp"`` config section).
"""

from __future__ import annotations

from typing import Any

__all__ = ["deepspeed_initialize"]


def deepspeed_initialize(**kwargs: Any) -> tuple:
    """``lowbit_amp.integrations.deepspeed_plugin.initialize(**kwargs)``; raises ImportError naming
    ``pip install deepspeed`` when DeepSpeed is missing."""
    from lowbit_amp.integrations.deepspeed_plugin import initialize

    return initialize(**kwargs)
