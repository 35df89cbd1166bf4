"""Hydra callbacks: the work around jobs and sweeps (registered in conf/config.yaml).

- :class:`SweepCallback` (the sweep's life, on the machine that launches it):
  ``on_multirun_start`` takes the sweep dir's lock (one launch at a time per directory),
  records the launch's overrides in ``<sweep>/.wan_exp/sweep.json`` or, with
  ``launcher.resume=true``, puts the recorded ones back (so ``hydra.sweep.dir=<dir>
  launcher.resume=true`` alone resumes); :meth:`SweepCallback.check_batch` checks every
  job of a batch before the first starts (the checked launcher calls it);
  ``on_multirun_end`` writes the dashboard, prints the comparison table and, after an
  interrupt, the resume command, and exits 1 when a job of the sweep dir did not
  complete. The exit status comes from the job results on disk.
- :class:`JobReportCallback` (after each job, where the job ran): the W&B run and the
  one-screen summary, on the host that wrote results.json.

Hydra turns an exception in a callback into a warning, so refusals here are SystemExit.
No torch import.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import socket
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import psutil
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from wan_exp import results
from wan_exp.config import ConfigError
from wan_exp.devices import JobShape
from wan_exp.host.disk import job_bytes, space_problem, sweep_bytes
from wan_exp.host.job import NODE_FILE_WAIT_S, SWEEP_RECORD, SWEEP_STATE_DIR, SweepStopped, check_config

log = logging.getLogger(__name__)

RESUME_KEY = "launcher.resume"


# ----------------------------------------------------------------------------- overrides
def override_key(override: str) -> str:
    """'+nccl.env.X=1' -> 'nccl.env.X'; 'parallel=a,b' -> 'parallel'."""
    return override.split("=", 1)[0].lstrip("+~")


def effective_overrides(params: dict, task_overrides: list[str]) -> tuple[list[str], int]:
    """What Hydra's basic sweeper runs: the sweep config's params, then the command line
    (a later value of the same key wins, in the first one's place), launcher.resume left
    out; and the number of jobs it makes."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{k}={v}" for k, v in params.items()] + list(task_overrides)
    lines = [line for line in lines if override_key(line) != RESUME_KEY]
    by_key: OrderedDict[str, str] = OrderedDict()
    for line in lines:
        by_key[override_key(line)] = line
    parsed = OverridesParser.create().parse_overrides(list(by_key.values()))
    jobs = len(BasicSweeper.split_arguments(parsed, None)[0])
    return list(by_key.values()), jobs


def override_differences(recorded: list[str], given: list[str]) -> list[str]:
    """Each key whose value differs, as "key: sweep has X, given Y" (order does not matter)."""
    old = {override_key(o): o for o in recorded}
    new = {override_key(o): o for o in given}
    return [
        f"{key}: the sweep has {old.get(key, 'nothing')!r}, given {new.get(key, 'nothing')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


# ----------------------------------------------------------------------------- lock
def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def lock_holder(path: Path) -> Optional[dict]:
    """The {pid, host, since} of the process holding the lock file ``path``; None when there is
    no lock or its process, on this host, is gone. One from another host counts as held, since
    its process cannot be checked from here."""
    if not path.exists():
        return None
    holder = results.read_json(path)
    holder = holder if isinstance(holder, dict) else {}
    if (
        holder.get("host") == socket.gethostname()
        and isinstance(holder.get("pid"), int)
        and not pid_alive(holder["pid"])
    ):
        return None
    return holder


def take_lock(path: Path) -> None:
    """Create the lock file {pid, host}; refuse (SystemExit naming the holder) while the
    process that holds it is alive. A lock left by a dead process on this host is taken
    over; one from another host is refused, since its process cannot be checked from here."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": results.now_iso()}
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock_holder(path)
            if holder is None:
                path.unlink(missing_ok=True)  # its owner died without cleaning up
                continue
            same_host = holder.get("host") == me["host"]
            where = "this host" if same_host else f"host {holder.get('host')}"
            raise SystemExit(
                f"{path.parent.parent} is in use by process {holder.get('pid')} on {where} (since "
                f"{holder.get('since')}); wait for it, stop it, or use another hydra.sweep.dir"
                + ("" if same_host else f" (remove {path} if that process is gone)")
            ) from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        except OSError:  # a full disk: no half-written lock stays behind
            path.unlink(missing_ok=True)
            raise
        return
    raise SystemExit(f"could not take the lock {path}; another launch is racing for it")


def release_lock(path: Path) -> None:
    holder = results.read_json(path) or {}
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # a read-only file system; the next launch takes over a dead process's lock
            log.warning("could not remove the sweep lock %s: %s", path, exc)


# ----------------------------------------------------------------------------- sweep
def sweep_dir_of(config: DictConfig) -> Path:
    return Path(str(config.hydra.sweep.dir)).resolve()


# a value Hydra's override grammar reads as it is; anything else is quoted for Hydra
HYDRA_PLAIN_VALUE = re.compile(r"[\w./@%+:-]+")


def hydra_override(key: str, value: str) -> str:
    """`key=value` as Hydra parses it back to `value`: in Hydra's double quotes when the
    value holds anything but plain characters (a space, a comma that would make a sweep,
    brackets, quotes), with a backslash doubled where it precedes a quote or ends the
    value and a backslash before each double quote (Hydra's escaping rules)."""
    if HYDRA_PLAIN_VALUE.fullmatch(value):
        return f"{key}={value}"
    escaped = re.sub(r'(\\+)(?="|$)', r"\1\1", value).replace('"', '\\"')
    return f'{key}="{escaped}"'


def shell_command(*words: str) -> str:
    """A command line to print for the user to paste: every word shell-quoted."""
    return shlex.join(words)


CONFIG_FLAGS = ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp")


def recorded_launch_words(sweep_dir: Path) -> list[str]:
    """What a resume must give again of the sweep record's active launch: its config flags
    (``--config-dir sweeps --config-name strategies``) and its hydra.* overrides."""
    record = results.read_json(sweep_dir / SWEEP_STATE_DIR / SWEEP_RECORD) or {}
    launches = record.get("launches") or []
    if not launches:
        return []
    launch = launches[record.get("active", -1)]
    argv, words = list(launch.get("argv") or [])[1:], []
    for i, word in enumerate(argv):
        if word in CONFIG_FLAGS and i + 1 < len(argv):
            words += [word, argv[i + 1]]
        elif word.split("=", 1)[0] in CONFIG_FLAGS:
            words.append(word)
    return words + list(launch.get("hydra_overrides") or [])


def resume_command(sweep_dir: Path) -> str:
    """The command that resumes the sweep in `sweep_dir`, quoted for the shell and Hydra."""
    return shell_command(
        "python",
        sys.argv[0],
        *recorded_launch_words(sweep_dir),
        hydra_override("hydra.sweep.dir", str(sweep_dir)),
        f"{RESUME_KEY}=true",
    )


def sweep_dir_problem(configured: str) -> str | None:
    """Why ``hydra.sweep.dir`` cannot hold a sweep, before anything is written: empty (it
    would write into the current folder), or an existing file."""
    if not configured.strip():
        return (
            "hydra.sweep.dir is empty: the sweep would write into the current folder; give a folder, e.g. "
            "hydra.sweep.dir=outputs/my_sweep (or leave it unset for outputs/<date>/<time>)"
        )
    path = Path(configured)
    if path.exists() and not path.is_dir():
        return f"hydra.sweep.dir={configured} is a file, not a folder; give a folder"
    return None


def batch_job_dir(cfg: DictConfig) -> Path:
    """A composed job config's job dir, as Hydra will make it (<sweep dir>/<subdir>)."""
    return (Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)).resolve()


def job_results_of(sweep_dir: Path) -> list[dict]:
    """Every job result of the sweep dir, in job order (unreadable files left out)."""
    found = [results.read_json(p) for p in sweep_dir.glob(f"*/{results.RESULTS_FILE}")]
    return sorted((r for r in found if r is not None), key=lambda r: r.get("job_num", 0))


# how long a host waits for a results.json that global rank 0's host writes
RESULTS_WAIT_S = NODE_FILE_WAIT_S + 10


def wait_for_files(paths: list[Path], timeout_s: float) -> None:
    """Poll until every file in ``paths`` exists, for at most ``timeout_s``."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and not all(p.exists() for p in paths):
        time.sleep(0.5)


class SweepCallback(Callback):
    """Lock, sweep record and resume, the batch check, the dashboard and the exit status."""

    def __init__(self) -> None:
        self.lock: Optional[Path] = None
        # what the checked launcher's batch checks saw: job num -> job dir; and how many jobs the
        # sweep has (its record), later batches included
        self.batch_job_dirs: dict[int, Path] = {}
        self.sweep_jobs: Optional[int] = None
        # what each checked job will write (all bytes, video bytes): the free-space checks
        self.job_bytes: dict[int, tuple[int, int]] = {}

    # --- start
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """hydra.mode=RUN would run the task without a launcher: no batch check, lock or record."""
        raise SystemExit(
            "hydra.mode=RUN is not supported: every wan-exp launch is a sweep run by its launcher "
            "(hydra.mode=MULTIRUN, set in conf/config.yaml); drop hydra.mode=RUN and give the "
            "folder with hydra.sweep.dir=... instead of hydra.run.dir"
        )

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problem = sweep_dir_problem(str(config.hydra.sweep.dir))
        if problem:
            raise SystemExit(f"no job started: {problem}")
        sweep_dir = sweep_dir_of(config)
        node_rank = int(config.launcher.node_rank)
        self.lock = sweep_dir / SWEEP_STATE_DIR / f"lock.node_{node_rank}"
        try:
            take_lock(self.lock)
            if node_rank == 0:  # node 0's launch owns the sweep record; other hosts join its jobs
                self._record_or_restore(config, sweep_dir)
            problem = results.write_problem(sweep_dir)  # e.g. room for the lock but not for more
        except OSError as exc:  # Hydra would only warn about an exception here and go on
            problem = str(exc if isinstance(exc, results.WriteError) else results.write_error(self.lock, exc))
        if problem:
            self._refuse(f"no job started: hydra.sweep.dir={sweep_dir} cannot be written: {problem}")

    def _record_or_restore(self, config: DictConfig, sweep_dir: Path) -> None:
        """A new launch is appended to the sweep record; a resume (launcher.resume=true)
        puts back the recorded overrides of the launch it names (none given: the only one)."""
        record_path = sweep_dir / SWEEP_STATE_DIR / SWEEP_RECORD
        record = results.read_json(record_path) or {"launches": []}
        launches = record["launches"]
        given, jobs = effective_overrides(dict(config.hydra.sweeper.params or {}), list(config.hydra.overrides.task))
        hydra_given = sorted(o for o in config.hydra.overrides.hydra if override_key(o) != "hydra.sweep.dir")
        if not config.launcher.resume:
            launches.append(
                {
                    "overrides": given,
                    "hydra_overrides": hydra_given,
                    "jobs": jobs,
                    "argv": sys.argv,
                    "started_at": results.now_iso(),
                }
            )
            record["active"] = len(launches) - 1
            results.write_json_atomic(record_path, record)
            self.sweep_jobs = jobs
            return
        if not launches:
            if not any(sweep_dir.glob(f"*/{results.JOB_FILE}")):
                self._refuse(
                    f"launcher.resume=true: {sweep_dir} holds no sweep to resume (no {SWEEP_STATE_DIR}/"
                    f"{SWEEP_RECORD}, no job dir); check hydra.sweep.dir, or drop launcher.resume=true "
                    "to start a new sweep there"
                )
            if not given:
                self._refuse(
                    f"launcher.resume=true: {sweep_dir} holds no sweep record; give the sweep's "
                    "overrides again, or check hydra.sweep.dir"
                )
            return  # a sweep dir from before sweep records: the job dirs' own overrides are checked
        if given:
            matching = [i for i, launch in enumerate(launches) if not override_differences(launch["overrides"], given)]
            if not matching:
                differences = override_differences(launches[-1]["overrides"], given)
                self._refuse(
                    "launcher.resume=true with other overrides than the sweep's: "
                    + "; ".join(differences)
                    + f". Resume with the same overrides (any order) or none: {resume_command(sweep_dir)}"
                )
            chosen = matching[-1]
        elif len(launches) == 1:
            chosen = 0
        else:
            self._refuse(
                f"launcher.resume=true: {sweep_dir} holds {len(launches)} launches; give the overrides of "
                "the one to resume: " + " | ".join(" ".join(launch["overrides"]) for launch in launches)
            )
        launch = launches[chosen]
        missing_hydra = sorted(set(launch["hydra_overrides"]) - set(hydra_given))
        if missing_hydra:
            self._refuse(
                f"launcher.resume=true: the sweep was started with {' '.join(missing_hydra)}; "
                "give those hydra.* settings again"
            )
        record["active"] = chosen
        results.write_json_atomic(record_path, record)
        self.sweep_jobs = launch["jobs"]
        # the sweeper reads these after this callback: it runs the recorded sweep again
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweeper.params = {}
            config.hydra.overrides.task = launch["overrides"] + [f"{RESUME_KEY}=true"]
        log.info("resuming %s: %s", sweep_dir, " ".join(launch["overrides"]) or "no overrides")

    def _refuse(self, message: str) -> None:
        if self.lock is not None:
            release_lock(self.lock)
        raise SystemExit(message)

    # --- the batch check (called by the checked launcher before the first job starts)
    def check_batch(self, configs: list[DictConfig]) -> None:
        """The checked launcher's hook: :meth:`check_configs`, then room on the disk for what
        the jobs still to run will write. A refusal is a SystemExit with a one-line message
        (no job has started); any other exception is a bug and keeps its traceback."""
        try:
            shapes = self.check_configs(configs)
        except ConfigError as exc:
            raise SystemExit(f"bad config, no job started: {exc}") from None
        for cfg, shape in zip(configs, shapes, strict=True):
            if not (cfg.launcher.resume and results.is_completed(batch_job_dir(cfg))):
                self.job_bytes[int(cfg.hydra.job.num)] = job_bytes(cfg, shape.world_size, shape.processes)
        batch = [self.job_bytes[int(cfg.hydra.job.num)] for cfg in configs if int(cfg.hydra.job.num) in self.job_bytes]
        if batch:
            problem = space_problem(Path(str(configs[0].hydra.sweep.dir)), sweep_bytes(batch))
            if problem:
                raise SystemExit(f"no job started: {problem}")

    def disk_problem(self, sweep_dir: Path, not_run: list[int]) -> Optional[str]:
        """Why the sweep cannot go on in its dir now: a write fails there, or the jobs
        without results need more room than its file system has free; None otherwise."""
        problem = results.write_problem(sweep_dir)
        if problem is None and not_run:
            problem = space_problem(sweep_dir, sweep_bytes([self.job_bytes[n] for n in not_run if n in self.job_bytes]))
        return problem

    def check_configs(self, configs: list[DictConfig]) -> list[JobShape]:
        """Every job of the batch: the config rules on this machine, no two jobs in one
        directory, and no job dir left by another sweep (launcher.resume=true reuses one
        only for the same overrides, in any order). Returns each job's JobShape; raises
        ConfigError naming the job."""
        seen: dict[Path, int] = {}
        shapes = []
        for cfg in configs:
            num = int(cfg.hydra.job.num)
            overrides = [o for o in cfg.hydra.overrides.task if override_key(o) != RESUME_KEY]
            try:
                shapes.append(check_config(cfg))
                job_dir = batch_job_dir(cfg)
                if job_dir in seen:
                    raise ConfigError(
                        f"its job dir {job_dir} is job {seen[job_dir]}'s too (hydra.sweep.subdir="
                        f"{cfg.hydra.sweep.subdir}); make hydra.sweep.subdir unique per job, e.g. "
                        "add ${hydra.job.num}"
                    )
                seen[job_dir] = num
                if int(cfg.launcher.node_rank) == 0:
                    self._check_existing_job_dir(job_dir, overrides, bool(cfg.launcher.resume))
                    self.batch_job_dirs[num] = job_dir
            except ConfigError as exc:
                raise ConfigError(f"job {num} ({' '.join(overrides) or 'no overrides'}): {exc}") from None
        return shapes

    @staticmethod
    def _check_existing_job_dir(job_dir: Path, overrides: list[str], resume: bool) -> None:
        job = results.read_json(job_dir / results.JOB_FILE)
        if job is None:
            return
        if not resume:
            raise ConfigError(
                f"{job_dir} already holds a job; use launcher.resume=true to finish that "
                "sweep, or a new hydra.sweep.dir"
            )
        differences = override_differences(job.get("overrides", []), overrides)
        if differences:
            raise ConfigError(
                f"launcher.resume=true: {job_dir} holds a job with other overrides ("
                + "; ".join(differences)
                + "); resume with the same sweep arguments"
            )

    # --- end
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from wan_exp.report import comparison_table, write_report

        sweep_dir = sweep_dir_of(config)
        if int(config.launcher.node_rank) > 0:
            wait_for_results(sweep_dir, int(config.launcher.node_rank))
        jobs = job_results_of(sweep_dir)
        report_lost = None
        if jobs:
            print(comparison_table(sweep_dir), flush=True)
            try:
                markdown, html = write_report(sweep_dir)
                print(f"report: {markdown}  {html}", flush=True)
            except results.WriteError as exc:  # the table above is all there is of it
                report_lost = str(exc)
                print(f"report NOT written: {exc}", file=sys.stderr, flush=True)
        if self.lock is not None:
            release_lock(self.lock)
        interrupted = [j for j in jobs if j.get("status") == results.INTERRUPTED]
        not_run = self.unfinished_jobs()
        disk = self.disk_problem(sweep_dir, not_run) if (not_run or report_lost) else None
        if disk:
            print(f"the sweep cannot go on in its dir: {disk}", file=sys.stderr, flush=True)
        if interrupted:
            print(
                f"sweep stopped at job {interrupted[0].get('job_num')} (interrupted); resume it with:\n"
                f"  {resume_command(sweep_dir)}",
                flush=True,
            )
        elif not_run:
            first = "make room (or make it writable), then " if disk else ""
            print(
                f"sweep stopped before job {not_run[0]} finished ({len(not_run)} job(s) without results: "
                f"{', '.join(map(str, not_run))}); {first}resume it with:\n  {resume_command(sweep_dir)}",
                flush=True,
            )
        if not_run or report_lost or any(j.get("status") != results.COMPLETED for j in jobs):
            sys.exit(1)

    def unfinished_jobs(self) -> list[int]:
        """The sweep's jobs without a results.json: never started (a Ctrl-C between two jobs, or
        in an earlier batch), or stopped before their result was written. Judged only where the
        checked launcher's batch check ran (other launchers run jobs elsewhere); a job several
        hosts ran gets its results.json from the host of global rank 0: waited for (bounded)."""
        if not self.batch_job_dirs:
            return []
        total = self.sweep_jobs if self.sweep_jobs is not None else max(self.batch_job_dirs) + 1
        multi_host = [
            job_dir / results.RESULTS_FILE
            for job_dir in self.batch_job_dirs.values()
            if int((results.read_json(job_dir / results.JOB_FILE) or {}).get("nnodes") or 1) > 1
        ]
        wait_for_files(multi_host, RESULTS_WAIT_S)
        return [
            num
            for num in range(total)
            if num not in self.batch_job_dirs or not (self.batch_job_dirs[num] / results.RESULTS_FILE).exists()
        ]


def wait_for_results(sweep_dir: Path, node_rank: int) -> None:
    """On a host other than node 0: the jobs this host took part in get their results.json
    from global rank 0's host; wait for them (bounded)."""
    mine = [p.parent.parent for p in sweep_dir.glob(f"*/nodes/node_{node_rank}.json")]
    wait_for_files([d / results.RESULTS_FILE for d in mine], RESULTS_WAIT_S)


class JobReportCallback(Callback):
    """After a job: its W&B run (not again for a job a resumed sweep skipped, if its run was
    written in full) and the one-screen summary, on the host that wrote the job's results.json."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.COMPLETED:
            return  # the task itself raised: Hydra reports it
        outcome = job_return.return_value or {}
        if not outcome.get("results_owner"):
            return
        job_dir = Path(outcome["job_dir"])
        job_results = results.read_results(job_dir)
        if job_results is None:
            return
        from wan_exp.wandb_logger import is_logged, log_job

        # a job a resumed sweep skipped was logged then, unless a Ctrl-C cut its report short
        problem = None
        if not outcome.get("skipped") or not is_logged(job_dir):
            problem = log_job(job_results, job_dir)  # the result is safe on disk; W&B is a copy of it
        print(results.summary_text(job_results), flush=True)
        if problem is not None:
            disk = results.write_problem(job_dir)
            if disk:  # the next job's files would meet the same disk
                raise SweepStopped(f"job {job_results.get('job_num')}: its W&B run was not written and {disk}")


__all__ = ["JobReportCallback", "SweepCallback", "effective_overrides", "override_differences"]
