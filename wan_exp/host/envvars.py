"""The environment a job's ranks run with, built from the `nccl` and `allocator` groups.

The elastic agent has no field for environment variables: its workers inherit the
launching process's environment. So the launcher sets these variables in its own
environment for the duration of one launch only (:func:`applied_environment`) and
restores the previous environment exactly afterwards, which keeps one job's settings out
of the next job and out of the user's shell.

No torch import: the launcher process uses this module.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from wan_exp.host.machine import rank_thread_settings, usable_cores

log = logging.getLogger(__name__)

# Deprecated NCCL names (torch >= 2.2 warns about them) and the names that replace them.
DEPRECATED_NCCL_NAMES = {
    "NCCL_BLOCKING_WAIT": "TORCH_NCCL_BLOCKING_WAIT",
    "NCCL_ASYNC_ERROR_HANDLING": "TORCH_NCCL_ASYNC_ERROR_HANDLING",
}
# PyTorch reads the allocator string under its new name and, for older releases, the old one.
ALLOCATOR_NAMES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
# Ring buffer of collectives kept per rank by the NCCL flight recorder.
FLIGHT_RECORDER_ENTRIES = "2000"
# Where each rank finds its job directory (the doctor lists running workers by it).
JOB_DIR_VAR = "WAN_EXP_JOB_DIR"
# Variables a rank records as it sees them, so a reader can check what reached the rank:
# the rendezvous, threads, and every NCCL / allocator / harness variable.
RECORDED_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
RECORDED_PREFIXES = ("NCCL_", "TORCH_NCCL_", "PYTORCH_", "WAN_EXP_")


def nccl_variables(nccl_env: Mapping[str, Any]) -> dict[str, str]:
    """The `nccl.env` mapping with deprecated names replaced by their TORCH_NCCL_* names.

    A deprecated name is renamed with a warning; if the config also sets the new name,
    the new name's value wins.
    """
    env = {str(k): str(v) for k, v in nccl_env.items() if k not in DEPRECATED_NCCL_NAMES}
    for old, new in DEPRECATED_NCCL_NAMES.items():
        if old not in nccl_env:
            continue
        log.warning("nccl.env sets deprecated %s; the ranks get %s=%s instead", old, new, nccl_env[old])
        env.setdefault(new, str(nccl_env[old]))
    return env


def rank_environment(cfg: Any, job_dir: Path, nproc_per_node: int) -> tuple[dict[str, str], list[str]]:
    """(every variable the launcher sets for one job's ranks, the warnings about this host's
    thread variables that came with them)."""
    env = nccl_variables(cfg.nccl.env)
    # as torchrun does: ranks sharing a host split its cores instead of each taking all; a
    # thread variable that is not a number is replaced by that split (machine.py warns)
    threads, thread_warnings = rank_thread_settings({**os.environ, **env}, nproc_per_node, usable_cores())
    env.update(threads)
    if cfg.allocator.conf:
        for name in ALLOCATOR_NAMES:
            env[name] = str(cfg.allocator.conf)
    if cfg.nccl.flight_recorder:
        trace_dir = Path(job_dir) / "nccl_trace"
        env.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", FLIGHT_RECORDER_ENTRIES)
        env.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
        # torch appends the rank to this prefix: nccl_trace/rank_<r>
        env.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(trace_dir / "rank_"))
    env[JOB_DIR_VAR] = str(job_dir)
    return env, thread_warnings


def seen_environment(job: dict) -> dict[str, str | None]:
    """The launcher's variables (job.json's ``env``), the rendezvous and every
    NCCL/allocator/harness variable, as the calling rank sees them (None: not set)."""
    names = set(job.get("env", {})) | set(RECORDED_VARIABLES)
    names |= {n for n in os.environ if n.startswith(RECORDED_PREFIXES)}
    return {name: os.environ.get(name) for name in sorted(names)}


@contextmanager
def applied_environment(env: Mapping[str, str]) -> Iterator[None]:
    """Set `env` in this process for the duration of the block, then put back the
    environment exactly as it was (including whatever the block itself changed, such as
    the OMP_NUM_THREADS that the elastic agent sets)."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        os.environ.update(saved)
