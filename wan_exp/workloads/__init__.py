"""What a job does, selected by ``workload=<name>``: name -> run function.

A run function takes the resolved config and the rank's RankContext, sets up the parallel
model through ``wan_exp.parallel.registry.setup_parallel``, does its steps inside
``ctx.phase("first_step")`` / ``ctx.step(i, measured)`` and returns the workload info that
goes into the rank record (it also hands it to ``ctx.metrics.set_workload_info``).
"""

from __future__ import annotations

from typing import Any, Callable

from wan_exp.workloads.generate import run_generate
from wan_exp.workloads.init import run_init
from wan_exp.workloads.train_lora import run_train_lora

WORKLOADS: dict[str, Callable[[Any, Any], dict]] = {
    "generate": run_generate,
    "init": run_init,
    "train_lora": run_train_lora,
}
