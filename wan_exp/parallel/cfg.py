"""Classifier-free guidance: the two forwards of a step, one after the other or at the same time.

Guidance scale, and how many DiT forwards a step costs:
  * ``scale == 1``: the guided flow equals the conditional one -> 1 forward (conditional).
  * ``scale == 0``: it equals the unconditional one -> 1 forward (unconditional).
  * any other scale: ``uncond + scale * (cond - uncond)`` -> 2 forwards, conditional
    first, then unconditional, one after the other (as upstream Wan does; not batched).

CFG parallel: the conditional and the unconditional forward of a step at the same time.

With ``parallel.cfg_degree=2`` the ranks form two cfg groups (the outer mesh axis "cfg");
group 0 runs the conditional forward and group 1 the unconditional one, each over its own
sequence-parallel ranks. One all-gather per sampling step, between the two ranks at the
same place in both groups, gives every rank both flows, and every rank applies the
guidance formula ``uncond + scale * (cond - uncond)`` itself, exactly as one rank does.

The sampler sees one guided-flow function with :func:`guided_flow`'s signature;
:func:`guidance_for` returns the sequential one or the CFG-parallel one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from wan_exp.parallel.ulysses import _all_gather_single


def forwards_per_step(guidance_scale: float) -> int:
    """DiT forwards one sampling step costs (see the module docstring)."""
    return 1 if guidance_scale in (0.0, 1.0) else 2


@dataclass
class Condition:
    """What the DiT takes for one branch of guidance besides the latents and the timestep."""

    context: torch.Tensor  # (1, text_len, text_dim)
    audio: torch.Tensor | None = None  # (1, audio_layers, video frames, audio_dim)
    ref: torch.Tensor | None = None  # (1, 16, 1, h, w)
    motion: torch.Tensor | None = None  # (1, 16, motion latents, h, w); None: no motion tokens


def dit_flow(dit: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, condition: Condition) -> torch.Tensor:
    """One DiT forward for one branch of guidance (no autograd: sampling only)."""
    with torch.no_grad():
        return dit(
            latents, timestep, condition.context, audio=condition.audio, ref=condition.ref, motion=condition.motion
        )


def guided_flow(
    dit: torch.nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    cond: Condition,
    uncond: Condition,
    guidance_scale: float,
) -> torch.Tensor:
    """The two forwards of one denoising step and their guidance, ``u + g * (c - u)``:
    conditional first, then unconditional; only the forward the formula needs when g is 1 or 0.
    This is the one call a CFG-parallel split replaces (``cfg_parallel_flow`` below)."""
    if guidance_scale == 1.0:
        return dit_flow(dit, latents, timestep, cond)
    if guidance_scale == 0.0:
        return dit_flow(dit, latents, timestep, uncond)
    flow_cond = dit_flow(dit, latents, timestep, cond)
    flow_uncond = dit_flow(dit, latents, timestep, uncond)
    return flow_uncond + guidance_scale * (flow_cond - flow_uncond)


# guided_flow's signature: what ParallelModel.guidance is, sequential or CFG-parallel
GuidedFlow = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Condition, Condition, float], torch.Tensor]


def cfg_parallel_flow(
    dit: torch.nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    cond: Condition,
    uncond: Condition,
    guidance_scale: float,
    group: ProcessGroup,
) -> torch.Tensor:
    """The guided flow (as :func:`guided_flow`) with this rank running only its cfg group's
    forward."""
    if dist.get_world_size(group) != 2:
        raise ValueError(f"CFG parallel needs a group of 2 ranks, got {dist.get_world_size(group)}")
    mine = cond if dist.get_rank(group) == 0 else uncond
    flow = dit_flow(dit, latents, timestep, mine).contiguous()
    both = flow.new_empty((2 * flow.shape[0], *flow.shape[1:]))  # joined along dim 0, cfg rank order
    _all_gather_single(both, flow, group=group)  # the one exchange of the step
    flow_cond, flow_uncond = both.chunk(2)
    return flow_uncond + guidance_scale * (flow_cond - flow_uncond)


def guidance_for(cfg_group: ProcessGroup | None) -> GuidedFlow:
    """:func:`guided_flow`, or the CFG-parallel guided flow over ``cfg_group``."""
    if cfg_group is None:
        return guided_flow
    return functools.partial(cfg_parallel_flow, group=cfg_group)
