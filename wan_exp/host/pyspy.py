"""Every rank's stacks from outside the process, with py-spy (``py-spy dump --pid``).

The hang watchdog (wan_exp.host.job.dump_stacks) asks each rank for its Python stacks by
SIGUSR1 (faulthandler); py-spy reads them from outside instead, with ``--native`` the C/C++
frames too (a rank stuck in an NCCL broadcast shows it), and works on a process that never
registered a handler. One file per rank: ``<job>/stacks/rank_<r>.pyspy.txt``. Needs
permission to ptrace the ranks (same user; in a container, CAP_SYS_PTRACE where
kernel.yama.ptrace_scope > 0); what py-spy said instead is written into the file.

No torch import: the job process on the host uses this module.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

PYSPY_TIMEOUT_S = 20.0  # one dump; --native on a large process takes a few seconds


def pyspy_executable() -> Optional[str]:
    """py-spy next to this Python (the venv's bin), else on PATH; None if not installed."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def dump_with_pyspy(job_dir: Path, pids_by_rank: dict[int, int], native: bool = True) -> list[Path]:
    """Write each rank's py-spy dump; returns the files written (none without py-spy)."""
    exe = pyspy_executable()
    if exe is None or not pids_by_rank:
        return []
    stacks = Path(job_dir) / "stacks"
    stacks.mkdir(parents=True, exist_ok=True)
    running = {}
    for rank, pid in sorted(pids_by_rank.items()):
        command = [exe, "dump", "--pid", str(pid)] + (["--native"] if native else [])
        out = stacks / f"rank_{rank}.pyspy.txt"
        handle = open(out, "w")
        running[out] = (subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT), handle)
    for proc, handle in running.values():  # every rank at once: their stacks from one moment
        try:
            proc.wait(timeout=PYSPY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            handle.write(f"\npy-spy gave no dump within {PYSPY_TIMEOUT_S:g}s\n")
        handle.close()
    return list(running)
