"""wan-exp ranks running on this machine now, found by the job directory in their
environment (the launcher sets WAN_EXP_JOB_DIR for every rank, next to torchrun's RANK)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from wan_exp.doctor.rows import OK, WARN, Row
from wan_exp.host.envvars import JOB_DIR_VAR
from wan_exp.results import heartbeat_path, read_json

PROC = Path("/proc")


@dataclass
class Worker:
    pid: int
    parent_pid: int
    rank: str  # as the environment says; "?" when RANK is missing
    job_dir: str


def read_environ(pid_dir: Path) -> dict[str, str]:
    """The environment a process was started with; {} for processes we may not read."""
    try:
        raw = (pid_dir / "environ").read_bytes()
    except OSError:  # another user's process, or it ended while we looked
        return {}
    pairs = (entry.partition(b"=") for entry in raw.split(b"\0") if entry)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def parent_pid(pid_dir: Path) -> int:
    try:
        stat = (pid_dir / "stat").read_text()
    except OSError:
        return 0
    # "pid (command name) state ppid ...": the name may hold spaces and parentheses
    return int(stat.rsplit(")", 1)[1].split()[1])


def find_workers(proc: Path = PROC) -> list[Worker]:
    """Every process started with WAN_EXP_JOB_DIR, except this one and the children a rank
    starts itself (a probe, a compile worker): they inherit the variable, but belong to
    their rank. A child whose rank is gone is listed: it is a leftover."""
    found: dict[int, Worker] = {}
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        env = read_environ(pid_dir)
        if JOB_DIR_VAR in env:
            pid = int(pid_dir.name)
            found[pid] = Worker(pid, parent_pid(pid_dir), env.get("RANK", "?"), env[JOB_DIR_VAR])
    workers = [w for w in found.values() if w.parent_pid not in found or found[w.parent_pid].job_dir != w.job_dir]
    return sorted(workers, key=lambda w: (w.job_dir, w.rank, w.pid))


def last_progress(worker: Worker) -> str:
    """'phase wrap, step 3, 12 s ago' from the rank's heartbeat file, if it has one."""
    try:
        beat = read_json(heartbeat_path(worker.job_dir, int(worker.rank)))
        return f", phase {beat['phase']}, step {beat['step']}, {time.time() - beat['time']:.0f} s ago"
    except (OSError, ValueError, KeyError, TypeError):  # no heartbeat yet, or caught mid-write
        return ""


def worker_rows(workers: list[Worker]) -> list[Row]:
    if not workers:
        return [Row("harness workers", OK, "none running")]
    rows = []
    for w in workers:
        value = f"rank {w.rank}, job dir {w.job_dir}{last_progress(w)}"
        if w.parent_pid == 1:
            rows.append(
                Row(
                    f"worker PID {w.pid}",
                    WARN,
                    value,
                    f"orphaned (its launcher is gone) and may hold GPU memory: kill {w.pid}",
                )
            )
        else:
            rows.append(Row(f"worker PID {w.pid}", OK, value))
    return rows
