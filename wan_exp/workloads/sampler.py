"""Flow-matching sampler with a shifted sigma schedule and classifier-free guidance.

Flow matching (as Wan trains it) mixes data ``x0`` and noise ``n`` along a straight line,
``x_sigma = (1 - sigma) * x0 + sigma * n``, and the DiT predicts the velocity
``v = n - x0``. Sampling walks sigma from 1 (pure noise) down to 0 (data) with Euler
steps, ``x <- x + (sigma_next - sigma) * v(x, sigma)``.

Everything here is a pure function of a *velocity callable* ``(x, sigma) -> v`` so it can
be checked on a toy velocity; the generate workload wraps the DiT into such a callable.

Guidance scale, and how many DiT forwards a step costs:
  * ``scale == 1``: the guided velocity equals the conditional one -> 1 forward (conditional).
  * ``scale == 0``: it equals the unconditional one -> 1 forward (unconditional).
  * any other scale: ``uncond + scale * (cond - uncond)`` -> 2 forwards, conditional
    first, then unconditional, one after the other (as upstream Wan does; not batched).
So the result always equals the guidance formula; a forward is skipped only when the
formula does not need it.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Optional

import torch

Velocity = Callable[[torch.Tensor, float], torch.Tensor]
StepContext = Callable[[int], ContextManager]


def shift_sigma(t: float, shift: float) -> float:
    """Warp a uniform time t in [0, 1] so more steps are spent at high noise:
    ``shift * t / (1 + (shift - 1) * t)`` (identity for shift 1; 0 -> 0, 1 -> 1)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def sigma_schedule(steps: int, shift: float) -> list[float]:
    """``steps + 1`` sigmas from 1 down to 0: uniform times 1, 1 - 1/steps, ..., 0, shifted.

    The velocity is evaluated at the first ``steps`` of them; the last (0) is where the
    final Euler step lands.
    """
    if steps < 1:
        raise ValueError(f"sample steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return [shift_sigma(1.0 - i / steps, shift) for i in range(steps + 1)]


def forwards_per_step(guidance_scale: float) -> int:
    """DiT forwards one sampling step costs (see the module docstring)."""
    return 1 if guidance_scale in (0.0, 1.0) else 2


def guided_velocity(cond: Velocity, uncond: Velocity, guidance_scale: float) -> Velocity:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)`` as one velocity callable,
    calling only the forwards the scale needs (conditional before unconditional)."""
    if guidance_scale == 1.0:
        return cond
    if guidance_scale == 0.0:
        return uncond

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        v_cond = cond(x, sigma)
        v_uncond = uncond(x, sigma)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    return velocity


def sample(
    velocity: Velocity,
    x: torch.Tensor,
    sigmas: list[float],
    step_context: Optional[StepContext] = None,
) -> torch.Tensor:
    """Integrate from ``sigmas[0]`` to ``sigmas[-1]`` with one Euler step per interval.

    ``step_context(i)`` (optional) wraps step i, e.g. to time it; the caller decides what
    a step means for its measurements. Returns the final x (the input is not modified).
    """
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        with step_context(i) if step_context is not None else nullcontext():
            x = x + (sigma_next - sigma) * velocity(x, sigma)
    return x
