"""Run launch.py (or a script under torchrun) in a subprocess and read back what its jobs left
(shared by the harness tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, *target: str, timeout: float = 240, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``target`` (a script and its arguments, or ``-m module ...``) on ``nproc`` local ranks under
    torchrun, a free rendezvous port, one thread per rank (the ranks share this machine's cores)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", *target]
    return subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def run_launch(
    sweep_dir: Path, *overrides: str, multirun: bool = False, timeout: float = 180, env: Optional[dict] = None
) -> subprocess.CompletedProcess:
    """`python launch.py [-m] <overrides> hydra.sweep.dir=<sweep_dir>`, output captured."""
    cmd = [sys.executable, str(REPO / "launch.py")] + (["-m"] if multirun else [])
    cmd += list(overrides) + [f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def job_results(sweep_dir: Path) -> list[dict]:
    """Every job's results.json of a sweep, in job order."""
    found = [json.loads(p.read_text()) for p in Path(sweep_dir).glob("*/results.json")]
    return sorted(found, key=lambda r: r["job_num"])


def completed_results(root: Path) -> list[Path]:
    """results.json files under `root` that claim a completed job."""
    return [p for p in Path(root).rglob("results.json") if json.loads(p.read_text()).get("status") == "completed"]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has exited; it only waits to be reaped by its parent
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def wait_for(condition, timeout: float, what: str) -> None:
    """Poll ``condition`` every 0.2 s until it holds; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def job_pids(job_dir: Path) -> list[int]:
    """Every worker PID a job reported (heartbeats and rank records)."""
    pids = set()
    for sub in ("progress", "ranks"):
        for p in (Path(job_dir) / sub).glob("rank_*.json"):
            pids.add(json.loads(p.read_text())["pid"])
    return sorted(pids)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def run_fault_sweep(sweep_dir: Path, *overrides: str, **kwargs) -> list[dict]:
    """A `workload=init` sweep with a fault in it: exits 1 (some job did not complete);
    returns every job's results."""
    proc = run_launch(sweep_dir, *overrides, "workload=init", "logger=disabled", multirun=True, **kwargs)
    assert proc.returncode == 1, output(proc)
    return job_results(sweep_dir)


def root_cause(results: dict) -> tuple:
    """(rank, phase, exitcode) of a job that did not complete."""
    cause = results["root_cause"]
    return cause["rank"], cause["phase"], cause["exitcode"]
