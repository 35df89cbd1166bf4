"""THE results writer: rank records, the job's results.json, and the files around them.

Every JSON file of a job is written atomically (a temporary file in the same folder, then
``os.replace``), so a reader never sees half a file and a crash never leaves one behind.
Files get the permissions of an ordinary ``open`` under the process umask (0644 with the
usual 022), not the 0600 of a bare temporary file; a write that fails (a full disk)
raises :class:`WriteError` naming the path and what the file is.

One writer produces results.json: :func:`finalize_job`, called by wan_exp.host.job on the
host that ran global rank 0 once every rank is gone. It builds the result from the rank
records (each rank writes its own), every host's agent outcome (dead ranks, rendezvous
errors) and the job process's own findings (hang, start-up bound, interrupt). A
completed results.json is never overwritten.

No torch import: the job process on the host uses this module.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import signal
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from wan_exp.metrics.summary import summarize
from wan_exp.plan.pricing import overlap_of, parse_link, predict_step

SCHEMA = 1
COMPLETED, FAILED, OOM, HANG, INTERRUPTED = "completed", "failed", "oom", "hang", "interrupted"
HOST, GPU = "host", "gpu"  # which memory an oom job ran out of (root_cause["memory"])
RESULTS_FILE = "results.json"
JOB_FILE = "job.json"
CONFIG_FILE = "config.yaml"


# ----------------------------------------------------------------------------- files
# What each file of a job or sweep is, for error messages: (file name pattern, role).
FILE_ROLES = (
    (r"results\.json", "the job's result"),
    (r"job\.json", "the job record"),
    (r"config\.yaml", "the job's resolved config"),
    (r"ranks/rank_\d+\.json", "a rank record"),
    (r"progress/rank_\d+\.json", "a rank heartbeat"),
    (r"report\.(md|html)", "the sweep report"),
    (r"video\.mp4", "the job's video"),
    (r"nodes/node_\d+\.json", "a host's agent outcome"),
    (r"\.wan_exp/sweep\.json", "the sweep record"),
    (r"\.wan_exp/lock\.node_\d+", "the sweep's lock"),
    (r"wandb/logged\.json", "the W&B run's marker"),
)

# A rank that could not write its own record exits with this code (EX_TEMPFAIL of sysexits.h),
# so the job's result can say why the record is missing.
RECORD_NOT_WRITTEN_EXIT = 75


class WriteError(OSError):
    """A file could not be written (e.g. the disk is full); the message names the file,
    its role and the operating system's reason. Keeps the OSError's errno."""


class ResultNotWritten(WriteError):
    """results.json could not be written; ``results`` holds what it would have said, so
    the caller can put the job's outcome on the console instead."""

    def __init__(self, cause: WriteError, job_results: dict) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.results = job_results


def write_error(path: Path, exc: OSError) -> WriteError:
    """The WriteError for `exc` raised while writing `path`: the file, its role, the reason
    and what to do."""
    hint = (
        "free space on that file system or write elsewhere (hydra.sweep.dir=...)"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        else "the folder is gone (removed while the job ran?)"
        if exc.errno == errno.ENOENT
        else "check the folder's permissions and that its file system is mounted read-write"
    )
    return WriteError(exc.errno, f"could not write {file_role(path)} {path}: {exc.strerror or exc}; {hint}")


def write_problem(folder: Path) -> Optional[str]:
    """Why `folder` cannot take a small durable write right now (full, read-only, gone, not
    ours), or None when it can: a probe file is written, synced and removed."""
    try:
        write_text_atomic(Path(folder) / ".write_probe", "probe\n" * 512)
    except WriteError as exc:
        return str(exc)
    (Path(folder) / ".write_probe").unlink(missing_ok=True)
    return None


def file_role(path: Path) -> str:
    """What `path` is to wan-exp ("the job's result", "a rank record", ...)."""
    tail = "/".join(Path(path).parts[-2:])
    for pattern, role in FILE_ROLES:
        if re.search(rf"(^|/){pattern}$", tail):
            return role
    return "a file"


@functools.lru_cache(maxsize=1)
def process_umask() -> int:
    """This process's umask (read once), without changing it: os.umask can only be read
    by setting it, which would race with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc (not Linux): read it the only other way
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, data: Any, durable: bool = True) -> None:
    """Write `data` as JSON to `path` via a temporary file and a rename."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str), durable)


def write_text_atomic(path: Path, text: str, durable: bool = True) -> None:
    """Write a text file via a temporary file in the same folder and a rename.

    The file ends up with mode 0666 minus the umask, as ``open(path, "w")`` would give it.
    durable=False skips the fsync: readers still never see half a file, but a machine
    crash may lose it (fine for heartbeats, which are rewritten every step).
    Only the file's own folder is created when missing, never the folders above it: a job
    dir removed while its ranks run is not silently made again by their next write.
    Raises WriteError (an OSError) naming the file and its role when the disk is full or
    the folder cannot be written."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o666 & ~process_umask())  # mkstemp creates 0600
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:  # a file system remounted read-only keeps it; nothing more to do
                pass
        raise write_error(path, exc) from exc
    except BaseException:
        if tmp is not None:
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
    """The rank's progress file: {"rank", "pid", "phase", "step", "seq", "time",
    "host_rss_gib", "host_rss_peak_gib", "memory_time"}. seq/time change with progress
    only; the host memory figures are refreshed every few seconds in between."""
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
    """Write results.json atomically; refuses to replace a completed result. A write that
    fails raises ResultNotWritten, which carries the results."""
    if is_completed(job_dir):
        raise FileExistsError(f"{Path(job_dir) / RESULTS_FILE} holds a completed result; not overwriting it")
    path = Path(job_dir) / RESULTS_FILE
    try:
        write_json_atomic(path, results)
    except WriteError as exc:
        raise ResultNotWritten(exc, results) from exc
    return path


def _results(
    job_dir: Path, status: str, root_cause: Optional[dict], records: list[dict], summary: Optional[dict]
) -> dict:
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
        # more ranks than GPUs (launcher.share_gpus): step times not comparable, memory per process is
        "shared_gpus": bool(job.get("shared_gpus")),
        # {"world_size": N, "rank": r}: one process played rank r of N over the fake process group
        "simulated": job.get("simulated"),
        # simulated: the rank's step priced at launcher.link (plan/pricing.py)
        "prediction": _prediction(job, config, records),
        "model": config.get("model", {}).get("name"),
        "workload": config.get("workload", {}).get("name"),
        "overrides": job.get("overrides", []),
        "job_dir": str(job_dir),
        "sweep_dir": job.get("sweep_dir"),
        "job_num": job.get("job_num"),
        "config": config,
        "warnings": job_warnings(records),
        # each host's cores, ranks, threads and load during the job, and what made its times slow
        "machine": job_machine(job_dir),
        "ranks": records,
        "summary": summary,
        "started_at": started,
        "finished_at": finished,
        "wall_s": wall_s,
    }


def _prediction(job: dict, config: dict, records: list[dict]) -> Optional[dict]:
    if not job.get("simulated") or not records:
        return None
    return predict_step(records[0], parse_link(config.get("launcher", {}).get("link", "nvlink4")), overlap_of(config))


def is_write_failure(root_cause: Optional[dict]) -> bool:
    """True when a job failed because a file could not be written: a rank's WriteError, or a
    rank that exited with RECORD_NOT_WRITTEN_EXIT. The sweep stops on it (the next job's
    files would meet the same disk)."""
    if not root_cause:
        return False
    return root_cause.get("exitcode") == RECORD_NOT_WRITTEN_EXIT or str(root_cause.get("message", "")).startswith(
        f"{WriteError.__name__}:"
    )


def job_warnings(records: list[dict]) -> list[str]:
    """Every warning the ranks recorded (e.g. a prompt without a tokenizer), once each."""
    return list(dict.fromkeys(w for r in records for w in r.get("warnings") or []))


def job_machine(job_dir: Path) -> Optional[dict]:
    """{"hosts": [each host's "machine" figures from nodes/node_<n>.json (wan_exp.host.machine)],
    "warnings": [theirs, once each]}, or None when no host recorded any."""
    hosts = []
    for path in sorted((Path(job_dir) / "nodes").glob("node_*.json")):
        outcome = read_json(path) or {}
        if isinstance(outcome.get("machine"), dict):
            hosts.append({"host": outcome.get("host"), "node_rank": outcome.get("node_rank"), **outcome["machine"]})
    if not hosts:
        return None
    return {"hosts": hosts, "warnings": list(dict.fromkeys(w for h in hosts for w in h.get("warnings") or []))}


def completed_results(job_dir: Path, records: list[dict], summarize: Callable[[list[dict], Any], dict]) -> dict:
    """The results of a job whose ranks all finished."""
    summary = summarize(records, read_job_config(job_dir))
    return _results(job_dir, COMPLETED, None, records, summary)


# ----------------------------------------------------------------------------- memory exhaustion
VMSTAT = Path("/proc/vmstat")


def kernel_oom_kill_count() -> Optional[int]:
    """How many processes the kernel's OOM killer has ended since boot (the ``oom_kill``
    line of /proc/vmstat, Linux >= 4.13; it counts cgroup limits too); None where the
    kernel does not say. The launcher reads it before and after a job's ranks run."""
    try:
        for line in VMSTAT.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def oom_memory(record: dict) -> str:
    """HOST or GPU: which memory a rank that recorded an out-of-memory error ran out of.
    CUDA's allocator says "CUDA out of memory"; the CPU allocator's error and Python's
    MemoryError are host memory, and so is anything on a CPU rank."""
    err = record.get("error") or {}
    on_gpu = str(record.get("device", "")).startswith("cuda")
    cpu_error = err.get("type") == "MemoryError" or "CPUAllocator" in str(err.get("message", ""))
    return GPU if on_gpu and not cpu_error else HOST


def killed_by_oom_killer(death: dict, kernel_oom_kills: Optional[int]) -> bool:
    """A rank that died by SIGKILL without writing its record, in a job during which the
    kernel's OOM killer ended processes: the kernel killed it for host memory. SIGKILL alone
    proves nothing (a user, a scheduler or fault injection send it too)."""
    return death.get("exitcode") == -signal.SIGKILL and bool(kernel_oom_kills)


def _host_memory_seen(beat: Optional[dict]) -> str:
    """ "12.30 GiB host RSS (peak 14.10 GiB) at its last heartbeat" or "" without one."""
    if not beat or beat.get("host_rss_gib") is None:
        return ""
    peak = beat.get("host_rss_peak_gib")
    peak_text = "" if peak is None else f" (peak {peak:.2f} GiB)"
    return f"{beat['host_rss_gib']:.2f} GiB host RSS{peak_text} at its last heartbeat"


# What to change when a rank runs out of host memory, by the phase or stage it was in.
OOM_ADVICE = {
    **dict.fromkeys(
        ("start", "process_group", "build", "load", "wrap"),
        "The weights ran out of memory: use a strategy that shards them (parallel=fsdp_fixed)",
    ),
    "text_encode": "The text encoder ran out of memory: parallel.text_encoder_placement=device",
    "audio_encode": (
        "The audio encoding ran out of memory (wav2vec2 encodes the whole workload.audio_path at "
        "once): cut the file to what workload.clips needs"
    ),
    "reference_encode": "The reference image's encoding ran out of memory: a smaller workload.size",
    **dict.fromkeys(
        ("vae_decode", "motion_encode"),
        "The VAE ran out of memory: parallel.vae=tiled or sharded, or a smaller workload.size",
    ),
    **dict.fromkeys(
        ("denoise", "first_step", "step"),
        "The DiT's steps ran out of memory: a smaller workload.size or frames_per_clip, or a "
        "sequence split (parallel=ulysses, usp)",
    ),
    "drift_check": (
        "The drift check ran out of memory (it keeps a bf16 copy of the DiT beside the job's own): "
        "workload.drift_check=false"
    ),
    "video_write": (
        "Writing the video ran out of memory (every frame is held until the end): fewer "
        "workload.clips or workload.save_video=false"
    ),
}


def oom_advice(phase: Optional[str]) -> str:
    """What to change after a host OOM in ``phase``, then the general remedies."""
    specific = OOM_ADVICE.get(phase or "", "")
    return (f"{specific}; or " if specific else "Use ") + "fewer ranks per node, or a machine with more memory"


def failure_root_cause(
    records: list[dict],
    dead_ranks: dict[int, dict],
    beats: Optional[dict[int, dict]] = None,
    kernel_oom_kills: Optional[int] = None,
) -> Optional[dict]:
    """The earliest failure among ranks that recorded an error and ranks that died
    without a record (`dead_ranks`: rank -> {"exitcode", "time", "phase", "message"}).

    Ranks ended by SIGTERM are what the elastic agent does to the survivors once one rank
    failed, so they are the root cause only when nothing else failed. An out-of-memory
    cause says which memory ran out ("memory": host or gpu): a recorded OOM error by its
    allocator (:func:`oom_memory`), a rank without a record by the kernel's OOM-kill count
    over the job (:func:`killed_by_oom_killer`), with the host RSS its heartbeat last saw.
    """
    beats = beats or {}
    candidates, stopped_by_agent = [], []
    for r in records:
        if r.get("status") in (FAILED, OOM) and r.get("error"):
            err = r["error"]
            candidates.append(
                (
                    err.get("time", float("inf")),
                    {
                        "rank": r["rank"],
                        "phase": err.get("phase"),
                        "step": err.get("step"),
                        "message": f"{err.get('type')}: {err.get('message')}",
                        "exitcode": 1,
                        "status": r["status"],
                        "memory": oom_memory(r) if r["status"] == OOM else None,
                    },
                )
            )
    recorded = {r["rank"] for r in records}
    for rank, death in dead_ranks.items():
        if rank in recorded:
            continue
        found = stopped_by_agent if death.get("exitcode") == -signal.SIGTERM else candidates
        beat = beats.get(rank)
        seen = _host_memory_seen(beat)
        cause = {
            "rank": rank,
            "phase": death.get("phase"),
            "step": (beat or {}).get("step"),
            "message": death["message"] + (f"; {seen}" if seen else ""),
            "exitcode": death.get("exitcode"),
            "status": FAILED,
            "memory": None,
            "host_rss_gib": (beat or {}).get("host_rss_gib"),
        }
        if killed_by_oom_killer(death, kernel_oom_kills):
            cause.update(
                status=OOM,
                memory=HOST,
                message=(
                    f"rank {rank} ran out of host memory: killed by SIGKILL without writing its record "
                    f"while the kernel's OOM killer ended {kernel_oom_kills} process(es)"
                    + (f"; {seen}" if seen else "")
                    + f". {oom_advice(death.get('phase'))}"
                ),
            )
        found.append((death.get("time", float("inf")), cause))
    candidates = candidates or stopped_by_agent
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c[0], c[1]["rank"]))[1]


def remove_empty_stack_files(job_dir: Path) -> None:
    """Every rank opens stacks/rank_<r>.txt at start (its stack dump on a hang is written
    from a signal handler); once the ranks are gone, the files no dump filled, and then the
    folder if empty, are removed."""
    stacks = Path(job_dir) / "stacks"
    try:
        for path in stacks.glob("rank_*.txt"):
            if path.stat().st_size == 0:
                path.unlink()
        if stacks.is_dir() and not any(stacks.iterdir()):
            stacks.rmdir()
    except OSError:  # a read-only file system: empty files stay, the result matters more
        pass


def finalize_job(
    job_dir: Path,
    dead_ranks: dict[int, dict],
    hang: Optional[dict],
    launch_error: Optional[str] = None,
    interrupted: Optional[dict] = None,
    launch_phase: str = "rendezvous",
    kernel_oom_kills: Optional[int] = None,
    job_failure: Optional[dict] = None,
) -> dict:
    """The job's results after its ranks are gone; writes results.json (the only writer)
    unless it already holds a completed result, which is returned as it is. Empty stack
    files go.

    dead_ranks: rank -> {"exitcode", "time", "phase", "message"} for every rank an agent
        saw exit non-zero (exit codes < 0 are signals).
    hang: the watchdog's finding {"rank", "phase", "step", "message"} or None.
    launch_error: why no rank could run, or None; launch_phase says where it failed
        ("rendezvous": start-up bound, agent; "config": the job's check on its host).
    interrupted: {"rank", "phase", "message"} when Ctrl-C or SIGTERM ended the job, or None.
    kernel_oom_kills: processes the kernel's OOM killer ended while the ranks ran (the
        difference of two :func:`kernel_oom_kill_count` readings), None if unknown.
    job_failure: {"rank", "phase", "step", "message"} of a failure the job process saw
        itself (its job dir removed or replaced while the ranks ran), or None.
    The job completed when none of these happened and every rank of job.json's world
    size wrote a completed record; without job.json nothing says how many ranks that is,
    so the job failed. A results.json that cannot be written raises ResultNotWritten.
    """
    remove_empty_stack_files(job_dir)
    existing = read_results(job_dir)
    if existing is not None and existing.get("status") == COMPLETED:
        return existing
    records = read_rank_records(job_dir)
    job = read_json(Path(job_dir) / JOB_FILE) or {}
    processes = job.get("processes", job.get("world_size"))  # a simulated job: one process
    if interrupted is not None:
        status = INTERRUPTED
        root_cause = {
            "rank": interrupted["rank"],
            "phase": interrupted["phase"],
            "step": interrupted.get("step"),
            "message": interrupted["message"],
            "exitcode": None,
        }
    elif job_failure is not None:
        status = FAILED
        root_cause = {
            "rank": job_failure.get("rank"),
            "phase": job_failure.get("phase"),
            "step": job_failure.get("step"),
            "message": job_failure["message"],
            "exitcode": None,
        }
    elif processes is None:
        status = FAILED
        root_cause = {
            "rank": None,
            "phase": None,
            "step": None,
            "exitcode": None,
            "message": f"{Path(job_dir) / JOB_FILE} is missing: the job's rank count is unknown, "
            "so its records cannot prove it completed",
        }
    elif launch_error is not None:
        status = FAILED
        root_cause = {"rank": None, "phase": launch_phase, "step": None, "message": launch_error, "exitcode": None}
    elif hang is not None:
        status = HANG
        root_cause = {
            "rank": hang["rank"],
            "phase": hang["phase"],
            "step": hang.get("step"),
            "message": hang["message"],
            "exitcode": dead_ranks.get(hang["rank"], {}).get("exitcode"),
        }
    else:
        root_cause = failure_root_cause(records, dead_ranks, read_heartbeats(job_dir), kernel_oom_kills)
        if root_cause is None:
            missing = sorted(set(range(processes or 0)) - {r["rank"] for r in records})
            if not missing and all(r.get("status") == COMPLETED for r in records):
                results = completed_results(job_dir, records, summarize)
                write_results(job_dir, results)
                return results
            root_cause = {
                "rank": missing[0] if missing else None,
                "phase": None,
                "exitcode": None,
                "message": f"rank(s) {missing} exited cleanly without writing a record",
            }
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
        median = r.get("step_time_s_median")  # the rank's own (metrics.summary.rank_figures)
        median_text = "-" if median is None else f"{median:.3f}"
        lines.append(
            f"  {r['rank']:>4}  {str(r.get('device')):<12}  {_gib(mem.get('peak_allocated_gib')):>14}  "
            f"{_gib(mem.get('peak_reserved_gib')):>17}  {_gib(mem.get('peak_host_rss_gib')):>12}  {median_text:>13}"
        )
    summary = results.get("summary") or {}
    if summary.get("clips_per_hour_per_gpu") is not None:
        lines.append(
            f"  clips: {summary.get('clips_made', '?')} by {summary.get('dp_degree', 1)} dp group(s); "
            f"{summary['seconds_per_clip']:.2f} s/clip, {summary['clips_per_hour_per_gpu']:.1f} clips/h/GPU"
        )
    for warning in results.get("warnings") or []:
        lines.append(f"  warning: {warning}")
    for warning in (results.get("machine") or {}).get("warnings") or []:
        lines.append(f"  machine: {warning}")
    cause = results.get("root_cause")
    if cause:
        who = "the launcher" if cause.get("rank") is None else f"rank {cause['rank']}"
        where = f"phase {cause.get('phase')}" + ("" if cause.get("step") is None else f" step {cause['step']}")
        code = "" if cause.get("exitcode") is None else f" (exit code {cause['exitcode']})"
        lines.append(f"  root cause: {who} in {where}{code}: {cause.get('message')}")
    lines.append(f"  results: {Path(results.get('job_dir', '.')) / RESULTS_FILE}")
    return "\n".join(lines)
