"""CFG parallel: the conditional and the unconditional forward of a step at the same time.

With ``parallel.cfg_degree=2`` the ranks form two cfg groups (the outer mesh axis "cfg");
group 0 runs the conditional forward and group 1 the unconditional one, each over its own
sequence-parallel ranks. One all-gather per sampling step, between the two ranks at the
same place in both groups, gives every rank both flows, and every rank applies the
guidance formula ``uncond + scale * (cond - uncond)`` itself, exactly as one rank does.

The sampler sees one guided-flow function with sampler.guided_flow's signature;
:func:`guidance_for` returns the sequential one or the CFG-parallel one.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from wan_exp.parallel.ulysses import _all_gather_single


def cfg_parallel_flow(dit: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, cond, uncond,
                      guidance_scale: float, group: ProcessGroup) -> torch.Tensor:
    """The guided flow (as sampler.guided_flow) with this rank running only its cfg group's
    forward; ``cond``/``uncond`` are sampler.Condition."""
    from wan_exp.workloads.sampler import dit_flow  # the workloads package imports this module

    if dist.get_world_size(group) != 2:
        raise ValueError(f"CFG parallel needs a group of 2 ranks, got {dist.get_world_size(group)}")
    mine = cond if dist.get_rank(group) == 0 else uncond
    flow = dit_flow(dit, latents, timestep, mine).contiguous()
    both = flow.new_empty((2 * flow.shape[0], *flow.shape[1:]))  # joined along dim 0, cfg rank order
    _all_gather_single(both, flow, group=group)  # the one exchange of the step
    flow_cond, flow_uncond = both.chunk(2)
    return flow_uncond + guidance_scale * (flow_cond - flow_uncond)


def guidance_for(cfg_group: ProcessGroup | None):
    """sampler.guided_flow, or the CFG-parallel guided flow over ``cfg_group``."""
    if cfg_group is None:
        from wan_exp.workloads.sampler import guided_flow

        return guided_flow
    return functools.partial(cfg_parallel_flow, group=cfg_group)
