"""Recipes from the research, each a config option plus the helpers that evaluate it (docs/recipes.md).

* :mod:`lowbit_amp.recipes.blockwise` — DeepSeek-V3 fine-grained block scaling (``configs/deepseek_blockwise.yaml``).
* :mod:`lowbit_amp.recipes.unit_scaling` — unit-scaled linear layers so FP8 casts need only a static scale.

Enhanced loss scaling lives with the loss scaler (``loss_scaling.floor_schedule``); the numerics monitor in
:mod:`lowbit_amp.monitor`.
"""
