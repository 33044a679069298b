"""Low-bit weight gradients (O2+): :class:`Fp8Grad` stores ``p.grad`` as FP8 codes + a scale, 1 byte per parameter."""

from lowbit_amp.grads.fp8_grad import Fp8Grad, to_fp8_weight_grad

__all__ = ["Fp8Grad", "to_fp8_weight_grad"]
