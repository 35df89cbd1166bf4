"""The `init` workload: build, load and wrap the model, nothing else.

It exists to compare start-up between strategies (``fsdp`` with upstream's
``sync_module_states=True`` against ``fsdp_fixed``, or FSDP1 against FSDP2). The phases
themselves are timed by ``setup_parallel`` (``build``, ``load``, ``wrap``) and the worker
(``process_group``); no DiT step runs, so the record has no step times and no FLOPs.
"""

from __future__ import annotations

from typing import Any

from wan_exp.parallel.materialise import local_parameters
from wan_exp.parallel.registry import setup_parallel


def run_init(cfg: Any, ctx: Any) -> dict:
    """Initialise the parallel model and report how many parameters this rank holds."""
    parallel_model = setup_parallel(cfg, ctx)
    local_params = sum(t.numel() for t in local_parameters(parallel_model.dit))
    info = {
        "tokens_per_forward": None,
        "forwards_per_step": 0,
        "forwards_per_step_per_rank": 0,
        "flops_per_step": None,
        "video_seconds_per_step": None,
        "dit_local_parameters": local_params,
    }
    ctx.metrics.set_workload_info(**info)
    return info
