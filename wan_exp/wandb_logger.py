"""One W&B run per job, written into the job dir (offline by default).

The launcher process calls :func:`log_job` after a job's results.json is written. The
run itself is made in a child process (``python -m wan_exp.wandb_logger <job dir>``,
results on stdin) under a time limit, so that W&B can neither hang the sweep (an
unreachable server, a stuck upload) nor leave threads or signal handlers in the
launcher. Any failure becomes a warning in the log and in ``<job dir>/wandb/warning.txt``;
the sweep goes on.

What the run holds: group = ``logger.group`` or the sweep dir's name, job_type = the
strategy, config = the resolved config, one history row per measured step (the job's
step time and each rank's), a per-rank table, and a summary with the comparison metrics
of results.json plus the status and root cause.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from wan_exp.results import WriteError, now_iso, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

# Seconds the child may take: offline runs finish in about a second; online ones upload.
TIME_LIMIT_S = {"offline": 120.0, "online": 300.0}

STAGE_TABLE_COLUMNS = [
    "rank",
    "stage",
    "seconds",
    "count",
    "peak_allocated_gib",
    "peak_reserved_gib",
    "peak_host_rss_gib",
]
RANK_TABLE_COLUMNS = [
    "rank", "device_name", "status", "peak_allocated_gib", "peak_reserved_gib",
    "nvml_used_gib", "peak_host_rss_gib", "alloc_retries", "ooms", "init_s", "step_time_s_median",
    "comm_step_calls", "comm_step_bytes", "comm_init_bytes",
]  # fmt: skip


LOGGED_MARKER = Path("wandb") / "logged.json"  # in a job dir: its W&B run was written in full


def is_logged(job_dir: Path) -> bool:
    """True once ``log_job`` has written the job's W&B run to the end."""
    return (Path(job_dir) / LOGGED_MARKER).exists()


def log_job(results: dict, job_dir: Path) -> str | None:
    """Write the job's W&B run (mode from ``logger.mode``), then the marker ``is_logged``
    reads; never raises, never hangs. Returns why the run was not written (also logged as a
    warning and kept in ``<job dir>/wandb/warning.txt`` where that can be written), or None."""
    mode = str(results.get("config", {}).get("logger", {}).get("mode", "offline"))
    if mode == "disabled":
        return None
    job_dir = Path(job_dir)
    env = dict(os.environ, WANDB_SILENT="true")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "wan_exp.wandb_logger", str(job_dir)],
            input=json.dumps(results),
            capture_output=True,
            text=True,
            env=env,
            timeout=TIME_LIMIT_S.get(mode, TIME_LIMIT_S["online"]),
        )
        problem = None if done.returncode == 0 else f"exit code {done.returncode}: {done.stderr[-2000:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is None:
        try:
            write_json_atomic(job_dir / LOGGED_MARKER, {"mode": mode, "at": now_iso()})
            return None
        except WriteError as exc:  # a resumed sweep would log the run again: say so
            problem = str(exc)
    message = f"W&B logging ({mode}) for {job_dir} failed, the job's results.json is unaffected: {problem}"
    try:
        write_text_atomic(job_dir / "wandb" / "warning.txt", message + "\n")
    except WriteError as exc:
        message += f" (and {exc})"
    log.warning(message)
    return message


def rank_row(record: dict) -> list[Any]:
    """One row of the run's per-rank table (RANK_TABLE_COLUMNS): the record's own fields, its
    derived figures as the rank stored them (metrics.summary.rank_figures), none computed here."""
    memory = record.get("memory", {})
    comm_step = record.get("comm_step_totals") or {}  # None: no measured step (init): absent, not 0
    comm_init = record.get("comm_init_totals") or {}
    return [
        record.get("rank"),
        record.get("device_name"),
        record.get("status"),
        memory.get("peak_allocated_gib"),
        memory.get("peak_reserved_gib"),
        memory.get("nvml_used_gib"),
        memory.get("peak_host_rss_gib"),
        memory.get("alloc_retries"),
        memory.get("ooms"),
        record.get("init_s"),
        record.get("step_time_s_median"),
        comm_step.get("count"),
        comm_step.get("bytes"),
        comm_init.get("bytes"),
    ]


def stage_table_rows(ranks: list[dict]) -> list[list[Any]]:
    """One row per rank and pipeline stage: seconds and peak memory (the dashboard's per-stage
    figures, per rank); the run summary holds the job-level stage figures."""
    return [
        [
            r.get("rank"),
            name,
            entry.get("seconds"),
            entry.get("count"),
            entry.get("peak_allocated_gib"),
            entry.get("peak_reserved_gib"),
            entry.get("peak_host_rss_gib"),
        ]
        for r in ranks
        for name, entry in r.get("stages", {}).items()
    ]


def run_summary(results: dict) -> dict:
    """What the run's summary holds: results.json's summary plus status and root cause."""
    summary = dict(results.get("summary") or {})
    summary["status"] = results.get("status")
    summary["root_cause"] = results.get("root_cause")
    summary["wall_s"] = results.get("wall_s")
    return summary


def _write_run(results: dict, job_dir: Path) -> None:
    """Make the run (runs in the child process)."""
    import wandb

    config = results.get("config", {})
    logger_cfg = config.get("logger", {})
    sweep_dir = Path(results.get("sweep_dir") or job_dir.parent)
    strategy = results.get("strategy") or config.get("parallel", {}).get("name", "unknown")
    run = wandb.init(
        project=logger_cfg.get("project", "wan-exp"),
        entity=logger_cfg.get("entity"),
        group=logger_cfg.get("group") or sweep_dir.name,
        job_type=strategy,
        name=f"{sweep_dir.name}/{results.get('job_num', job_dir.name)} {strategy} x{results.get('world_size')}",
        tags=list(logger_cfg.get("tags", [])),
        config=config,
        dir=str(job_dir),
        mode=str(logger_cfg.get("mode", "offline")),
        settings=wandb.Settings(
            silent=True,
            console="off",
            x_disable_stats=True,
            disable_git=True,
            save_code=False,
            init_timeout=60,
        ),  # fmt: skip
    )
    ranks = results.get("ranks", [])
    for step, job_time in enumerate((results.get("summary") or {}).get("step_times_s") or []):
        row = {"step_time_s": job_time}
        row.update({f"rank_step_time_s/{r['rank']}": r["step_times_s"][step] for r in ranks})
        run.log(row, step=step)
    run.log({"ranks": wandb.Table(columns=RANK_TABLE_COLUMNS, data=[rank_row(r) for r in ranks])})
    stage_rows = stage_table_rows(ranks)
    if stage_rows:
        run.log({"stages": wandb.Table(columns=STAGE_TABLE_COLUMNS, data=stage_rows)})
    run.summary.update(run_summary(results))
    run.finish(exit_code=0 if results.get("status") == "completed" else 1)


if __name__ == "__main__":
    _write_run(json.load(sys.stdin), Path(sys.argv[1]))
