"""Non-finite values stop the job instead of producing numbers that mean nothing.

A NaN or Inf in the weights, an overflow in bf16 or a diverging loss does not raise by
itself: the run completes and its figures look valid. :func:`check_finite` turns such a
tensor into :class:`NonFiniteError`, which the rank records like any failure (phase and
step from its heartbeat, the tensor's name in the message), so the job ends `failed`.

Cost: one device-to-host synchronisation per check (``isfinite(...).all()`` is read on
the host). Workloads check once per step, where the metrics collector synchronises
anyway; the NaN/Inf counts are read only on the failure path.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., torch.Tensor])


_checks_on = True  # off in a simulated job (wan_exp.rank.worker): its collectives return garbage


def disable_checks() -> None:
    """Turn every check_finite of this process off: a simulated rank (fake process group)
    computes on values no collective filled, so NaN/Inf there mean nothing."""
    global _checks_on
    _checks_on = False


class NonFiniteError(FloatingPointError):
    """A tensor that must be finite holds NaN or Inf; the message names the tensor."""


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError naming `what` if `tensor` holds a NaN or an Inf."""
    if not _checks_on or bool(torch.isfinite(tensor).all()):
        return
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    raise NonFiniteError(
        f"{what} is not finite: {nan} NaN and {inf} Inf of {tensor.numel()} values "
        f"(shape {tuple(tensor.shape)}, {tensor.dtype}); check the weights (model.checkpoint_dir), "
        "the inputs and model.dtype"
    )


def checked_output(fn: F, what: str) -> F:
    """`fn` whose tensor result goes through check_finite(result, what) on every call."""

    def checked(*args, **kwargs) -> torch.Tensor:
        out = fn(*args, **kwargs)
        check_finite(out, what)
        return out

    return checked  # type: ignore[return-value]
