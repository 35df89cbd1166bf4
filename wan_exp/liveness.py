"""Heartbeats from inside a long stage: ``beat()`` says "still working" without a new phase.

A rank's heartbeat moves when it enters a phase, a stage or a step (wan_exp.rank.runtime), and
the launcher's watchdog calls a job hung after ``launcher.hang_timeout_s`` without one. Some
single stages take longer than that on a healthy job (the VAE decode of a long clip at 720p,
reading 60 GB of weights, the first torch.compile), so the code doing that work calls
:func:`beat` once per unit of it (a latent frame, a weight tensor, a chunk of audio, a video
frame). The rank's runtime installs the listener that writes the heartbeat (rate-limited
there); without one (tests, the launcher process, benchmarks) ``beat`` does nothing.

This module imports nothing, so the lowest layers (models, media) can call it.
"""

from __future__ import annotations

from collections.abc import Callable

_listener: Callable[[str], None] | None = None


def set_listener(listener: Callable[[str], None] | None) -> None:
    """Install (or, with None, remove) what :func:`beat` calls: one per process."""
    global _listener
    _listener = listener


def beat(detail: str = "") -> None:
    """Progress inside the current stage; ``detail`` says where (e.g. "frame 3/21")."""
    if _listener is not None:
        _listener(detail)
