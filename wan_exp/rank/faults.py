"""Fault injection (config group `fault`): make one rank misbehave on entry to one phase.

Used by the reliability tests and to demonstrate failures on purpose (e.g. the seed's
hang: one rank slowed before FSDP wraps). A fault fires once, on rank `fault.rank`, when
that rank enters phase `fault.phase` (RankContext calls :meth:`FaultInjector.on_phase`).

Kinds: raise (RuntimeError), hang (block forever), sleep (fault.seconds), signal (the
rank kills itself with fault.signal), oom (GPU only: allocate until the device is full),
slow (every in-stage heartbeat of the phase waits fault.seconds first: a stage made as long
as one likes while it keeps reporting progress, which the watchdog must not call a hang).
fault.phase may also name a pipeline stage of the generate workload (vae_decode, ...).
``fault.host_gib`` > 0 makes the rank first fill that much host memory and report it in
its heartbeat, e.g. ``fault=signal fault.host_gib=1``: a SIGKILL at a high RSS, which is
what a rank the kernel's OOM killer ends leaves behind.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Optional

from wan_exp.config import signal_number  # the fault settings are checked in wan_exp.preflight
from wan_exp.units import GIB


class InjectedFault(RuntimeError):
    """Raised by fault.kind=raise."""


class FaultInjector:
    """Fires the configured fault once, on the configured rank and phase."""

    def __init__(
        self, fault_cfg: Any, rank: int, device: Any, report_memory: Optional[Callable[[], None]] = None
    ) -> None:
        self.cfg = fault_cfg
        self.device = device
        kind = getattr(fault_cfg.kind, "name", fault_cfg.kind)
        self.kind = str(kind)
        self.armed = self.kind != "none" and rank == fault_cfg.rank
        self.report_memory = report_memory  # rewrites the heartbeat's host memory figures
        self.held: list[bytes] = []

    def on_phase(self, phase: str) -> None:
        if not self.armed or phase != self.cfg.phase or self.kind == "slow":
            return
        self.armed = False
        if self.cfg.host_gib > 0:
            self._hold_host_memory(self.cfg.host_gib)
        inject = getattr(self, f"_{self.kind}")
        inject(phase)

    def on_beat(self, phase: str) -> None:
        """A heartbeat inside ``phase`` (wan_exp.liveness.beat): fault.kind=slow waits here,
        on every beat of its phase, not only the first."""
        if self.kind == "slow" and self.armed and phase == self.cfg.phase:
            time.sleep(float(self.cfg.seconds))

    def _hold_host_memory(self, gib: float) -> None:
        """Fill `gib` of host memory (non-zero bytes, so every page is resident) and
        keep it until the rank ends."""
        chunk = 64 << 20
        remaining = int(gib * GIB)
        while remaining > 0:
            self.held.append(b"\x01" * min(chunk, remaining))
            remaining -= chunk
        if self.report_memory is not None:
            self.report_memory()

    def _raise(self, phase: str) -> None:
        raise InjectedFault(f"injected fault: rank {self.cfg.rank} raised on entering phase {phase!r}")

    def _hang(self, phase: str) -> None:
        threading.Event().wait()  # never set: the watchdog must find and end this rank

    def _sleep(self, phase: str) -> None:
        time.sleep(float(self.cfg.seconds))

    def _signal(self, phase: str) -> None:
        os.kill(os.getpid(), signal_number(self.cfg.signal))
        time.sleep(5)  # a caught or ignored signal falls through to here; let the job carry on

    def _oom(self, phase: str) -> None:
        import torch

        if self.device.type != "cuda":
            raise RuntimeError("fault.kind=oom needs a GPU")
        hoard = []
        while True:  # ends with torch.OutOfMemoryError, which the worker records as oom
            hoard.append(torch.empty(GIB, dtype=torch.uint8, device=self.device))
