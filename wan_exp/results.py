"""THE results writer: rank records, the job's results.json, and the files around them.

Every JSON file of a job is written atomically (a temporary file in the same folder, then
``os.replace``), so a reader never sees half a file and a crash never leaves one behind.

One writer produces results.json: :func:`finalize_job`, called by wan_exp.job on the
host that ran global rank 0 once every rank is gone. It builds the result from the rank
records (each rank writes its own), every host's agent outcome (dead ranks, rendezvous
errors) and the job process's own findings (hang, start-up bound, interrupt). A
completed results.json is never overwritten.

No torch import: the job process on the host uses this module.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

SCHEMA = 1
COMPLETED, FAILED, OOM, HANG, INTERRUPTED = "completed", "failed", "oom", "hang", "interrupted"
RESULTS_FILE = "results.json"
JOB_FILE = "job.json"
CONFIG_FILE = "config.yaml"


# ----------------------------------------------------------------------------- files
def write_json_atomic(path: Path, data: Any, durable: bool = True) -> None:
    """Write `data` as JSON to `path` via a temporary file and a rename."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str), durable)


def write_text_atomic(path: Path, text: str, durable: bool = True) -> None:
    """Write a text file via a temporary file in the same folder and a rename.

    durable=False skips the fsync: readers still never see half a file, but a machine
    crash may lose it (fine for heartbeats, which are rewritten every step)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in `path`, or None if the file is absent or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_job_config(job_dir: Path) -> dict:
    """The job's resolved config (config.yaml, written once by the launcher) as plain data."""
    from omegaconf import OmegaConf

    path = Path(job_dir) / CONFIG_FILE
    return OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else {}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def rank_record_path(job_dir: Path, rank: int) -> Path:
    return Path(job_dir) / "ranks" / f"rank_{rank}.json"


def write_rank_record(job_dir: Path, record: dict) -> None:
    write_json_atomic(rank_record_path(job_dir, record["rank"]), record)


def heartbeat_path(job_dir: Path, rank: int) -> Path:
    """The rank's progress file: {"rank", "pid", "phase", "step", "seq", "time"}."""
    return Path(job_dir) / "progress" / f"rank_{rank}.json"


def read_heartbeats(job_dir: Path) -> dict[int, dict]:
    """rank -> its last heartbeat, for every rank that wrote one."""
    beats = (read_json(p) for p in heartbeat_path(job_dir, 0).parent.glob("rank_*.json"))
    return {b["rank"]: b for b in beats if b is not None}


def read_rank_records(job_dir: Path) -> list[dict]:
    """Every rank record a job has, sorted by rank."""
    records = [read_json(p) for p in (Path(job_dir) / "ranks").glob("rank_*.json")]
    return sorted((r for r in records if r is not None), key=lambda r: r["rank"])


def read_results(job_dir: Path) -> Optional[dict]:
    return read_json(Path(job_dir) / RESULTS_FILE)


def is_completed(job_dir: Path) -> bool:
    """True when the job dir holds a results.json of a job that completed."""
    results = read_results(job_dir)
    return results is not None and results.get("status") == COMPLETED


# ----------------------------------------------------------------------------- results.json
def write_results(job_dir: Path, results: dict) -> Path:
    """Write results.json atomically; refuses to replace a completed result."""
    if is_completed(job_dir):
        raise FileExistsError(f"{Path(job_dir) / RESULTS_FILE} holds a completed result; not overwriting it")
    path = Path(job_dir) / RESULTS_FILE
    write_json_atomic(path, results)
    return path


def _results(job_dir: Path, status: str, root_cause: Optional[dict], records: list[dict],
             summary: Optional[dict]) -> dict:
    job = read_json(Path(job_dir) / JOB_FILE) or {}
    config = read_job_config(job_dir)
    started = job.get("started_at")
    finished = now_iso()
    wall_s = None
    if started:
        wall_s = (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()
    return {
        "schema": SCHEMA,
        "status": status,
        "root_cause": root_cause,
        "strategy": config.get("parallel", {}).get("name"),
        "world_size": job.get("world_size"),
        "model": config.get("model", {}).get("name"),
        "workload": config.get("workload", {}).get("name"),
        "overrides": job.get("overrides", []),
        "job_dir": str(job_dir),
        "sweep_dir": job.get("sweep_dir"),
        "job_num": job.get("job_num"),
        "config": config,
        "ranks": records,
        "summary": summary,
        "started_at": started,
        "finished_at": finished,
        "wall_s": wall_s,
    }


def completed_results(job_dir: Path, records: list[dict],
                      summarize: Callable[[list[dict], Any], dict]) -> dict:
    """The results of a job whose ranks all finished."""
    summary = summarize(records, read_job_config(job_dir))
    return _results(job_dir, COMPLETED, None, records, summary)


def failure_root_cause(records: list[dict], dead_ranks: dict[int, dict]) -> Optional[dict]:
    """The earliest failure among ranks that recorded an error and ranks that died
    without a record (`dead_ranks`: rank -> {"exitcode", "time", "phase", "message"}).

    Ranks ended by SIGTERM are what the elastic agent does to the survivors once one rank
    failed, so they are the root cause only when nothing else failed.
    """
    candidates, stopped_by_agent = [], []
    for r in records:
        if r.get("status") in (FAILED, OOM) and r.get("error"):
            err = r["error"]
            candidates.append((err.get("time", float("inf")), {
                "rank": r["rank"], "phase": err.get("phase"),
                "message": f"{err.get('type')}: {err.get('message')}", "exitcode": 1,
                "status": r["status"],
            }))
    recorded = {r["rank"] for r in records}
    for rank, death in dead_ranks.items():
        if rank not in recorded:
            found = stopped_by_agent if death.get("exitcode") == -signal.SIGTERM else candidates
            found.append((death.get("time", float("inf")), {
                "rank": rank, "phase": death.get("phase"), "message": death["message"],
                "exitcode": death.get("exitcode"), "status": FAILED,
            }))
    candidates = candidates or stopped_by_agent
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c[0], c[1]["rank"]))[1]


def finalize_job(job_dir: Path, dead_ranks: dict[int, dict], hang: Optional[dict],
                 launch_error: Optional[str] = None, interrupted: Optional[dict] = None,
                 launch_phase: str = "rendezvous") -> dict:
    """The job's results after its ranks are gone; writes results.json (the only writer)
    unless it already holds a completed result, which is returned as it is.

    dead_ranks: rank -> {"exitcode", "time", "phase", "message"} for every rank an agent
        saw exit non-zero (exit codes < 0 are signals).
    hang: the watchdog's finding {"rank", "phase", "step", "message"} or None.
    launch_error: why no rank could run, or None; launch_phase says where it failed
        ("rendezvous": start-up bound, agent; "config": the job's check on its host).
    interrupted: {"rank", "phase", "message"} when Ctrl-C or SIGTERM ended the job, or None.
    The job completed when none of these happened and every rank of job.json's world
    size wrote a completed record.
    """
    from wan_exp.metrics.summary import summarize

    existing = read_results(job_dir)
    if existing is not None and existing.get("status") == COMPLETED:
        return existing
    records = read_rank_records(job_dir)
    world_size = (read_json(Path(job_dir) / JOB_FILE) or {}).get("world_size")
    if interrupted is not None:
        status = INTERRUPTED
        root_cause = {"rank": interrupted["rank"], "phase": interrupted["phase"],
                      "message": interrupted["message"], "exitcode": None}
    elif launch_error is not None:
        status = FAILED
        root_cause = {"rank": None, "phase": launch_phase, "message": launch_error, "exitcode": None}
    elif hang is not None:
        status = HANG
        root_cause = {"rank": hang["rank"], "phase": hang["phase"], "message": hang["message"],
                      "exitcode": dead_ranks.get(hang["rank"], {}).get("exitcode")}
    else:
        root_cause = failure_root_cause(records, dead_ranks)
        if root_cause is None:
            missing = sorted(set(range(world_size or 0)) - {r["rank"] for r in records})
            if not missing and all(r.get("status") == COMPLETED for r in records):
                results = completed_results(job_dir, records, summarize)
                write_results(job_dir, results)
                return results
            root_cause = {"rank": missing[0] if missing else None, "phase": None, "exitcode": None,
                          "message": f"rank(s) {missing} exited cleanly without writing a record"}
        status = OOM if root_cause.pop("status", FAILED) == OOM else FAILED
    results = _results(job_dir, status, root_cause, records, None)
    write_results(job_dir, results)
    return results


# ----------------------------------------------------------------------------- console
def _gib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def summary_text(results: dict) -> str:
    """One screen about one job: strategy, ranks, per-rank memory, step time, status, path."""
    lines = [
        f"job {results.get('job_num')}  {results.get('status', '?').upper()}  "
        f"strategy={results.get('strategy')} model={results.get('model')} "
        f"workload={results.get('workload')} ranks={results.get('world_size')}  "
        f"wall {results.get('wall_s') or 0:.1f}s",
    ]
    if results.get("overrides"):
        lines.append(f"  overrides: {' '.join(results['overrides'])}")
    lines.append("  rank  device        peak_alloc_GiB  peak_reserved_GiB  host_rss_GiB  median_step_s")
    for r in results.get("ranks", []):
        mem = r.get("memory") or {}
        steps = sorted(r.get("step_times_s") or [])
        median = f"{steps[len(steps) // 2]:.3f}" if steps else "-"
        lines.append(f"  {r['rank']:>4}  {str(r.get('device')):<12}  {_gib(mem.get('peak_allocated_gib')):>14}  "
                     f"{_gib(mem.get('peak_reserved_gib')):>17}  {_gib(mem.get('peak_host_rss_gib')):>12}  {median:>13}")
    cause = results.get("root_cause")
    if cause:
        who = "the launcher" if cause.get("rank") is None else f"rank {cause['rank']}"
        code = "" if cause.get("exitcode") is None else f" (exit code {cause['exitcode']})"
        lines.append(f"  root cause: {who} in phase {cause.get('phase')}{code}: {cause.get('message')}")
    lines.append(f"  results: {Path(results.get('job_dir', '.')) / RESULTS_FILE}")
    return "\n".join(lines)
