"""CFG parallel: the conditional and the unconditional forward of a step at the same time.

With ``parallel.cfg_degree=2`` the ranks form two cfg groups (the outer mesh axis "cfg");
group 0 runs the conditional forward and group 1 the unconditional one, each over its own
sequence-parallel ranks. One all-gather per sampling step, between the two ranks at the
same place in both groups, gives every rank both velocities, and every rank applies the
guidance formula ``uncond + scale * (cond - uncond)`` itself, exactly as one rank does.

The sampler only sees a velocity callable; :func:`guidance_for` returns the function that
turns (conditional, unconditional, scale) into it, sequential or CFG-parallel.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from wan_exp.parallel.ulysses import _all_gather_single

Velocity = Callable[[torch.Tensor, float], torch.Tensor]  # as workloads.sampler.Velocity
Guidance = Callable[[Velocity, Velocity, float], Velocity]


def cfg_parallel_velocity(cond: Velocity, uncond: Velocity, guidance_scale: float,
                          group: ProcessGroup) -> Velocity:
    """The guided velocity with this rank running only its cfg group's forward."""
    if dist.get_world_size(group) != 2:
        raise ValueError(f"CFG parallel needs a group of 2 ranks, got {dist.get_world_size(group)}")
    mine = cond if dist.get_rank(group) == 0 else uncond

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        v = mine(x, sigma).contiguous()
        both = v.new_empty((2 * v.shape[0], *v.shape[1:]))  # joined along dim 0, cfg rank order
        _all_gather_single(both, v, group=group)  # the one exchange of the step
        v_cond, v_uncond = both.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    return velocity


def guidance_for(cfg_group: ProcessGroup | None) -> Guidance:
    """Sequential guidance (sampler.guided_velocity) or the CFG-parallel one for ``cfg_group``."""
    if cfg_group is None:
        # imported here: the workloads package imports the registry, which imports this module
        from wan_exp.workloads.sampler import guided_velocity

        return guided_velocity
    return functools.partial(cfg_parallel_velocity, group=cfg_group)
