"""Fault injection (config group `fault`): make one rank misbehave on entry to one phase.

Used by the reliability tests and to demonstrate failures on purpose (e.g. the seed's
hang: one rank slowed before FSDP wraps). A fault fires once, on rank `fault.rank`, when
that rank enters phase `fault.phase` (RankContext calls :meth:`FaultInjector.on_phase`).

Kinds: raise (RuntimeError), hang (block forever), sleep (fault.seconds), signal (the
rank kills itself with fault.signal), oom (GPU only: allocate until the device is full).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any

from wan_exp.config import signal_number  # the fault settings are checked in wan_exp.config


class InjectedFault(RuntimeError):
    """Raised by fault.kind=raise."""


class FaultInjector:
    """Fires the configured fault once, on the configured rank and phase."""

    def __init__(self, fault_cfg: Any, rank: int, device: Any) -> None:
        self.cfg = fault_cfg
        self.device = device
        kind = getattr(fault_cfg.kind, "name", fault_cfg.kind)
        self.kind = str(kind)
        self.armed = self.kind != "none" and rank == fault_cfg.rank

    def on_phase(self, phase: str) -> None:
        if not self.armed or phase != self.cfg.phase:
            return
        self.armed = False
        inject = getattr(self, f"_{self.kind}")
        inject(phase)

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
            hoard.append(torch.empty(1 << 30, dtype=torch.uint8, device=self.device))
