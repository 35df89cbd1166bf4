"""What every benchmark script prints and how it times: one place for both.

Each script prints a header (device, torch/CUDA/cuDNN versions, date, the exact command
line) so that a figure copied into docs/benchmarks.md carries its provenance with it.
"""

from __future__ import annotations

import datetime
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]


def load_model_config(name: str, **overrides: Any) -> Any:
    """conf/model/<name>.yaml merged over the ModelConfig schema, with ``overrides`` applied."""
    from omegaconf import OmegaConf

    from wan_exp.config import ModelConfig

    path = REPO / "conf" / "model" / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise SystemExit(f"--model {name}: no {path}; choose one of {known}")
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path), overrides)


def header(**extra: Any) -> dict:
    """Print and return the provenance of a measurement."""
    info = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + shlex.join(sys.argv),
        **extra,
    }
    for key, value in info.items():
        print(f"{key:>12}: {value}")
    return info


def timed_runs(fn: Callable[[], Any], warmup: int, repeat: int) -> tuple[list[float], list[float]]:
    """Seconds of each warm-up call and each measured call of ``fn`` (device synchronised
    around every call, so the host clock measures the device work)."""

    def once() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    warm = [once() for _ in range(warmup)]
    return warm, [once() for _ in range(repeat)]


def median(values: list[float]) -> float:
    return statistics.median(values)


def event_time(fn: Callable[[], Any], warmup: int = 2, repeat: int = 10) -> float:
    """Median seconds of ``fn`` timed with CUDA events (for kernels of milliseconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)
