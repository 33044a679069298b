"""Multi-rank lowbit_amp over torch.distributed: FP8 gradient all-reduce, a DDP comm hook, FSDP2 support.

Nothing here initialises a process group or imports DeepSpeed; the DeepSpeed plugin is
:mod:`lowbit_amp.integrations.deepspeed_plugin`.
"""

from lowbit_amp.distributed.amax_sync import check_scales_synchronized
from lowbit_amp.distributed.ddp_hook import Fp8HookState, fp8_allreduce_hook, wrap_ddp
from lowbit_amp.distributed.fp8_allreduce import Fp8Reduced, fp8_all_reduce_, fp8_all_reduce_codes, simulate_fp8_all_reduce

__all__ = [
    "Fp8HookState",
    "Fp8Reduced",
    "check_scales_synchronized",
    "fp8_all_reduce_",
    "fp8_all_reduce_codes",
    "fp8_allreduce_hook",
    "simulate_fp8_all_reduce",
    "wrap_ddp",
]
