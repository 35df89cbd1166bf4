"""Flow-matching samplers (UniPC multistep, as upstream S2V, or Euler).

Flow matching (as Wan trains it) mixes data ``x0`` and noise ``n`` along a straight line,
``x_sigma = (1 - sigma) * x0 + sigma * n``, and the DiT predicts the flow ``v = n - x0``.
Sampling walks sigma from (almost) 1 down to 0 (docs/pipeline.md, "Sampler"):

- the grid: ``steps`` unshifted sigmas ``linspace(0.999, 0, steps + 1)[:-1]`` (0.999 is the
  largest sigma of the shift-1 training schedule of 1000 steps), each shifted by
  ``shift * s / (1 + (shift - 1) * s)``, then a final 0;
- the DiT gets the integer timestep ``int64(sigma * 1000)`` (truncated), the solver the
  float sigma;
- ``unipc`` (the default): diffusers' ``UniPCMultistepScheduler`` configured as upstream's
  flow UniPC (order 2, bh2, data prediction, corrector on, lower order at the last step,
  final sigma 0) and handed the shifted grid as a numpy array, which reproduces upstream's
  timesteps and updates; ``euler``: ``x <- x + (sigma_next - sigma) * v`` on the same grid.

Everything here is a pure function of a *flow callable* ``(x, timestep) -> v`` so it can be
checked on a toy flow; the generate workload wraps the guided DiT into such a callable.
Classifier-free guidance (the two forwards of a step and their formula) is in
wan_exp/parallel/cfg.py, beside its CFG-parallel version.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Optional

import numpy as np
import torch

SAMPLERS = ("unipc", "euler")
TRAIN_TIMESTEPS = 1000
LARGEST_TRAIN_SIGMA = 0.999  # sigma of the shift-1 training schedule at its first of 1000 steps

Flow = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, timestep (1,) int64) -> flow
StepContext = Callable[[int], ContextManager]


def shift_sigma(sigma: np.ndarray, shift: float) -> np.ndarray:
    """``shift * s / (1 + (shift - 1) * s)``: more steps at high noise (identity for shift 1)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sigma_schedule(steps: int, shift: float) -> np.ndarray:
    """The ``steps`` shifted sigmas the model is evaluated at (float64, descending, no final 0)."""
    if steps < 1:
        raise ValueError(f"workload.sample_steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"workload.shift must be > 0, got {shift}")
    return shift_sigma(np.linspace(LARGEST_TRAIN_SIGMA, 0.0, steps + 1)[:-1], shift)


def model_timesteps(sigmas: np.ndarray) -> torch.Tensor:
    """The DiT's integer timesteps of a sigma grid: ``int64(sigma * 1000)``, truncated."""
    return torch.from_numpy((np.asarray(sigmas) * TRAIN_TIMESTEPS).astype(np.int64))


def unipc_scheduler(steps: int, shift: float):
    """A fresh diffusers UniPC scheduler on upstream's grid (it keeps per-run state: one per clip)."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=1.0,  # the grid below is already shifted; its own shift would move it
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(sigmas=sigma_schedule(steps, shift))  # a numpy array, not a list
    return scheduler


def sample(
    flow: Flow,
    noise: torch.Tensor,
    steps: int,
    shift: float,
    sampler: str = "unipc",
    step_context: Optional[StepContext] = None,
) -> torch.Tensor:
    """Integrate from noise to data with ``steps`` evaluations of ``flow``.

    ``step_context(i)`` (optional) wraps step i, e.g. to time it. The state stays in the dtype
    of ``noise``, as upstream keeps it: each update is computed against the flow (fp32 from
    the DiT) and rounded back to that dtype. Returns the final x (the input is not modified)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"workload.sampler={sampler!r} is not one of {SAMPLERS}")
    sigmas = sigma_schedule(steps, shift)
    timesteps = model_timesteps(sigmas).to(noise.device)
    x = noise
    scheduler = unipc_scheduler(steps, shift) if sampler == "unipc" else None
    next_sigmas = [*sigmas[1:], 0.0]
    for i in range(steps):
        with step_context(i) if step_context is not None else nullcontext():
            v = flow(x, timesteps[i : i + 1])
            if scheduler is not None:
                x = scheduler.step(v, scheduler.timesteps[i], x, return_dict=False)[0]
            else:
                x = (x + float(next_sigmas[i] - sigmas[i]) * v).to(x.dtype)
    return x.to(noise.dtype)
