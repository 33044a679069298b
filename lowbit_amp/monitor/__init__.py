"""Numerics monitor (opt-in): per layer and operand, amax/scale, saturated and underflowed fractions, sampled SQNR
against a float64 recomputation, INT8 fallback ratios, optimizer-state zero fractions — and optionally moving a layer
that keeps saturating back to high precision. See docs/monitor.md.

    model, opt = amp.initialize(model, opt, opt_level="O1", monitor=True)   # or monitor_options={...}
    ...
    print(lowbit_amp.monitor.report(model))
    lowbit_amp.monitor.report(model).save("runs/monitor", plots=True)
"""

from lowbit_amp.monitor.counters import count_saturated, count_underflowed, operand_stats
from lowbit_amp.monitor.monitor import Monitor, attach, detach, get_monitor
from lowbit_amp.monitor.optimizer_state import optimizer_state_stats
from lowbit_amp.monitor.report import MonitorReport, report

__all__ = [
    "Monitor",
    "MonitorReport",
    "attach",
    "count_saturated",
    "count_underflowed",
    "detach",
    "get_monitor",
    "operand_stats",
    "optimizer_state_stats",
    "report",
]
