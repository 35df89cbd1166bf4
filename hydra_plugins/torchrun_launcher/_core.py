"""The torchrun launcher's work: check a whole batch, then run each job under the elastic agent.

For a batch of jobs (a sweep, or the one job of a plain run):
1. compose every job's config and check it (wan_exp.config.validate plus the launch
   settings below) before the first job starts, so a bad override costs no worker;
2. per job: write the job dir, config.yaml and job.json once; set the ranks' environment
   for the launch only; start the ranks with torch's elastic agent (c10d rendezvous, a
   free port per job) while a watchdog thread looks for a hang; write results.json for a
   job whose ranks failed (rank 0 writes it for a job that completed); log to W&B and
   print a one-screen summary;
3. at the end of the batch: the sweep's report and comparison table.

A job that fails, runs out of memory or hangs is a result, not an error: its JobReturn is
COMPLETED with the job's status in return_value, so Hydra's sweeper goes on to the next.

This process never initialises CUDA: GPUs are counted with NVML.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import psutil
import torch
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict

from wan_exp import results
from wan_exp.config import ConfigError, Strategy, check_schema_keys, config_warnings, validate
from wan_exp.envvars import applied_environment, rank_environment
from wan_exp.faults import PHASES, signal_number
from wan_exp.memory_fit import check_memory_fits
from wan_exp.parallel.fsdp import check_fsdp_device

log = logging.getLogger(__name__)

CPU_DEFAULT_NPROC = 2  # nproc_per_node=auto on a machine without GPUs
STACK_DUMP_WAIT_S = 5.0  # how long the watchdog waits for every rank's stack file
WATCHDOG_POLL_S = 0.5
WORKER_SHUTDOWN_S = 5  # grace between the agent's SIGTERM and SIGKILL to surviving ranks
RESUME_OVERRIDE = "launcher.resume"
STEP_PHASES = ("first_step", "step")  # phases only workloads that run DiT steps pass through


# ----------------------------------------------------------------------------- GPUs
def visible_gpu_count() -> int:
    """GPUs this process could give its ranks, from NVML (never CUDA), honouring
    CUDA_VISIBLE_DEVICES; 0 when NVML or its driver library is absent."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            present = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVIDIA driver: a CPU machine
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return present
    count = 0
    for entry in (e.strip() for e in visible.split(",")):
        # CUDA stops at the first entry that names no device
        if entry.startswith(("GPU-", "MIG-")) or (entry.isdigit() and int(entry) < present):
            count += 1
        else:
            break
    return count


# ----------------------------------------------------------------------------- checks
def ranks_per_node(cfg: Any, gpus: int) -> int:
    """launcher.nproc_per_node resolved: auto = visible GPUs (2 on a CPU machine);
    parallel=single always runs one rank. Raises ConfigError naming the setting."""
    requested = str(cfg.launcher.nproc_per_node).strip()
    if requested == "auto":
        nproc = gpus or CPU_DEFAULT_NPROC
    elif requested.isdigit() and int(requested) > 0:
        nproc = int(requested)
    else:
        raise ConfigError(
            f"launcher.nproc_per_node={requested!r} is not allowed; use auto or a positive integer"
        )
    if cfg.parallel.name == Strategy.single:
        if requested != "auto" and nproc != 1:
            log.warning("parallel=single runs one rank; ignoring launcher.nproc_per_node=%s", requested)
        return 1
    if gpus and nproc > gpus:
        raise ConfigError(
            f"launcher.nproc_per_node={nproc} but only {gpus} GPU(s) are visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            f"use at most {gpus} or auto"
        )
    return nproc


def check_launch_settings(cfg: Any, gpus: int) -> None:
    """The launcher and fault settings that wan_exp.config.validate does not know about."""
    lc = cfg.launcher
    if lc.nnodes < 1:
        raise ConfigError(f"launcher.nnodes={lc.nnodes} must be >= 1")
    if not 0 <= lc.node_rank < lc.nnodes:
        raise ConfigError(f"launcher.node_rank={lc.node_rank} is outside 0..{lc.nnodes - 1}")
    if lc.rdzv_backend not in ("c10d", "static"):
        raise ConfigError(f"launcher.rdzv_backend={lc.rdzv_backend!r} is not allowed; use c10d or static")
    host, _, port = str(lc.rdzv_endpoint).rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"launcher.rdzv_endpoint={lc.rdzv_endpoint!r} is not host:port; "
            "use e.g. localhost:0 (a free port) or node0:29500"
        )
    if lc.nnodes > 1 and (host in ("localhost", "127.0.0.1") or port == "0"):
        raise ConfigError(
            f"launcher.nnodes={lc.nnodes} with launcher.rdzv_endpoint={lc.rdzv_endpoint!r}: the other "
            "nodes cannot reach it; use node 0's host name and a fixed port, e.g. node0:29500"
        )
    if lc.hang_timeout_s <= 0:
        raise ConfigError(f"launcher.hang_timeout_s={lc.hang_timeout_s} must be > 0")
    if lc.max_restarts < 0:
        raise ConfigError(f"launcher.max_restarts={lc.max_restarts} must be >= 0")
    if cfg.nccl.flight_recorder and cfg.nccl.timeout_s >= lc.hang_timeout_s:
        # the recorder dumps on an NCCL timeout; the watchdog kills the ranks before that
        log.warning("nccl.timeout_s=%s >= launcher.hang_timeout_s=%s: a hang ends before NCCL times out, "
                    "so the flight recorder writes no dump; lower nccl.timeout_s to get one",
                    cfg.nccl.timeout_s, lc.hang_timeout_s)
    # e.g. parallel=fsdp (sync_module_states=true) on a machine without GPUs
    check_fsdp_device(cfg.parallel.fsdp, torch.device("cuda" if gpus else "cpu"))
    fault = cfg.fault
    kind = fault.kind.name
    if kind == "none":
        return
    if fault.phase not in PHASES:
        raise ConfigError(f"fault.phase={fault.phase!r} is not a phase; use one of {', '.join(PHASES)}")
    if cfg.workload.name.value == "init" and fault.phase in STEP_PHASES:
        # a fault that never fires would report a healthy job as the demonstration's outcome
        raise ConfigError(
            f"fault.phase={fault.phase} never happens in workload=init, which stops after wrap; "
            "use fault.phase=build, load or wrap, or another workload"
        )
    if kind == "signal":
        try:
            signal_number(fault.signal)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if kind == "sleep" and fault.seconds < 0:
        raise ConfigError(f"fault.seconds={fault.seconds} must be >= 0")
    if kind == "oom" and not gpus:
        raise ConfigError("fault=oom allocates GPU memory until it runs out, but no GPU is visible")


# ----------------------------------------------------------------------------- planning
@dataclass
class JobPlan:
    """One job of a batch, checked and ready to start."""

    num: int
    overrides: list[str]  # the job's own overrides, launcher.resume left out
    hydra_overrides: list[str]  # as Hydra gave them (for its JobReturn)
    config: DictConfig  # with the hydra node
    job_dir: Path
    nproc_per_node: int
    world_size: int
    backend: str
    already_completed: bool  # launcher.resume found a completed results.json


def job_overrides_for_record(overrides: Sequence[str]) -> list[str]:
    return [o for o in overrides if not o.lstrip("+~").startswith(RESUME_OVERRIDE)]


def plan_job(hydra_context: HydraContext, sweep_config: DictConfig, overrides: Sequence[str],
             num: int, gpus: int) -> JobPlan:
    config = hydra_context.config_loader.load_sweep_config(sweep_config, list(overrides))
    with open_dict(config):
        config.hydra.job.id = num
        config.hydra.job.num = num
    check_schema_keys(config)  # a '+key=value' the schema lacks would fail in every rank
    nproc = ranks_per_node(config, gpus)
    check_launch_settings(config, gpus)
    world_size = nproc * config.launcher.nnodes
    validate(config, world_size)
    check_memory_fits(config, world_size, nproc, gpus)
    for warning in config_warnings(config):
        log.warning("job %d: %s", num, warning)
    job_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
    own_overrides = job_overrides_for_record(overrides)
    completed = check_existing_job_dir(job_dir, own_overrides, bool(config.launcher.resume))
    return JobPlan(num=num, overrides=own_overrides, hydra_overrides=list(overrides), config=config,
                   job_dir=job_dir, nproc_per_node=nproc, world_size=world_size,
                   backend="nccl" if gpus else "gloo", already_completed=completed)


def check_existing_job_dir(job_dir: Path, overrides: list[str], resume: bool) -> bool:
    """True if launcher.resume may skip this job. A job dir left by an earlier run is only
    reused with launcher.resume=true and only for the same overrides."""
    job = results.read_json(job_dir / results.JOB_FILE)
    if job is None:
        return False
    if not resume:
        raise ConfigError(
            f"{job_dir} already holds a job; use launcher.resume=true to finish that sweep, "
            "or a new hydra.sweep.dir"
        )
    if job.get("overrides") != overrides:
        raise ConfigError(
            f"launcher.resume=true: {job_dir} holds a job with overrides {job.get('overrides')}, "
            f"but this sweep's job there has {overrides}; resume with the same sweep arguments"
        )
    return results.is_completed(job_dir)


def plan_batch(hydra_context: HydraContext, sweep_config: DictConfig,
               job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobPlan]:
    """Every job of the batch composed and checked; raises ConfigError before any starts."""
    gpus = visible_gpu_count()
    plans = []
    for offset, overrides in enumerate(job_overrides):
        try:
            plans.append(plan_job(hydra_context, sweep_config, overrides, initial_job_idx + offset, gpus))
        except ConfigError as exc:
            raise ConfigError(f"job {initial_job_idx + offset} ({' '.join(overrides) or 'no overrides'}): {exc}") from None
    return plans


# ----------------------------------------------------------------------------- job dir
def prepare_job_dir(plan: JobPlan, task_cfg: DictConfig, env: dict[str, str]) -> None:
    """config.yaml and job.json, written once before the ranks start; leftovers of an
    earlier unfinished attempt (launcher.resume) are removed first."""
    job_dir = plan.job_dir
    for stale in ("ranks", "progress", "stacks", "nccl_trace", "wandb", "lora_adapter"):
        shutil.rmtree(job_dir / stale, ignore_errors=True)
    (job_dir / results.RESULTS_FILE).unlink(missing_ok=True)
    (job_dir / "logs").mkdir(parents=True, exist_ok=True)
    if task_cfg.nccl.flight_recorder:
        (job_dir / "nccl_trace").mkdir()
    results.write_text_atomic(job_dir / results.CONFIG_FILE, OmegaConf.to_yaml(task_cfg, resolve=True))
    results.write_json_atomic(job_dir / results.JOB_FILE, {
        "overrides": plan.overrides,
        "job_num": plan.num,
        "sweep_dir": str(job_dir.parent),
        "world_size": plan.world_size,
        "nproc_per_node": plan.nproc_per_node,
        "nnodes": task_cfg.launcher.nnodes,
        "node_rank": task_cfg.launcher.node_rank,
        "backend": plan.backend,
        "env": env,
        "started_at": results.now_iso(),
    })


# ----------------------------------------------------------------------------- workers
def job_workers(job_dir: Path) -> list[psutil.Process]:
    """The live worker processes of this job (children of this process running
    `wan_exp.worker <job_dir>`), with their own children."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if "wan_exp.worker" in cmdline and str(job_dir) in cmdline:
            found.append(proc)
            found.extend(proc.children(recursive=True))
    return found


def kill_workers(job_dir: Path) -> list[int]:
    """SIGKILL every process of the job; returns their PIDs."""
    procs = job_workers(job_dir)
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)
    return [p.pid for p in procs]


def furthest_behind(beats: dict[int, dict], world_size: int, started_at: float) -> dict:
    """The heartbeat of the rank the others wait for on a hang: the fewest heartbeats
    (ranks run the same program), then the oldest. A rank with no heartbeat yet never got
    past start-up."""
    ranks = [beats.get(r, {"rank": r, "phase": "start", "step": None, "seq": 0, "time": started_at})
             for r in range(world_size)]
    return min(ranks, key=lambda b: (b["seq"], b["time"], b["rank"]))


class HangWatchdog(threading.Thread):
    """Ends a job whose ranks made no progress for `timeout_s`.

    Progress is a new heartbeat from any rank. On a hang: SIGUSR1 to every rank (each
    dumps all its threads' stacks into stacks/rank_<r>.txt), a short wait for the files,
    then SIGKILL to every worker. `finding` then holds the rank furthest behind (fewest
    heartbeats, then the oldest) and its phase: the rank the others were waiting for.
    """

    def __init__(self, job_dir: Path, world_size: int, timeout_s: float) -> None:
        super().__init__(name="wan-exp-hang-watchdog", daemon=True)
        self.job_dir, self.world_size, self.timeout_s = job_dir, world_size, timeout_s
        self.finding: Optional[dict] = None
        self._stop_event = threading.Event()
        self._started_at = time.time()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def run(self) -> None:
        while not self._stop_event.wait(WATCHDOG_POLL_S):
            beats = results.read_heartbeats(self.job_dir)
            last_progress = max([b["time"] for b in beats.values()] + [self._started_at])
            if time.time() - last_progress > self.timeout_s:
                self._end_hung_job(beats)
                return

    def _end_hung_job(self, beats: dict[int, dict]) -> None:
        stuck = furthest_behind(beats, self.world_size, self._started_at)
        silent_s = time.time() - stuck["time"]
        where = stuck["phase"] if stuck["step"] is None else f"{stuck['phase']} {stuck['step']}"
        self.finding = {
            "rank": stuck["rank"], "phase": stuck["phase"], "step": stuck["step"], "silent_s": silent_s,
            "message": (f"no progress from any rank for {self.timeout_s:g}s "
                        f"(launcher.hang_timeout_s); rank {stuck['rank']} last reported "
                        f"{where!r} {silent_s:.0f}s ago; stacks in {self.job_dir / 'stacks'}"),
        }
        log.error(self.finding["message"])
        self._dump_stacks(list(beats.values()))
        kill_workers(self.job_dir)

    def _dump_stacks(self, beats: list[dict]) -> None:
        # only this node's live workers: a PID from another node's heartbeat (shared job dir)
        # or a reused one must never receive SIGUSR1, whose default action kills
        local = {p.pid for p in job_workers(self.job_dir)}
        beats = [b for b in beats if b["pid"] in local]
        for beat in beats:
            try:
                os.kill(beat["pid"], signal.SIGUSR1)
            except ProcessLookupError:
                pass
        stack_files = [self.job_dir / "stacks" / f"rank_{b['rank']}.txt" for b in beats]
        deadline = time.time() + STACK_DUMP_WAIT_S
        while time.time() < deadline and not all(f.exists() and f.stat().st_size for f in stack_files):
            time.sleep(0.1)


COLLECTIVE_TIMEOUT = re.compile(r"timed? ?out|timeout", re.IGNORECASE)


def collective_timeout_hang(job_dir: Path, world_size: int) -> Optional[dict]:
    """A hang that the process group's own timeout ended before the watchdog did.

    With nccl.timeout_s below launcher.hang_timeout_s (nccl=debug, nccl=container) the ranks
    that wait in a collective raise a timeout first, and the agent then stops the rank they
    were waiting for, which never wrote an error of its own. The job hung in that rank, not
    in the ones that timed out: returns a finding like the watchdog's, or None.
    """
    records = {r["rank"]: r for r in results.read_rank_records(job_dir)}
    timed_out = sorted(rank for rank, r in records.items()
                       if r.get("error") and COLLECTIVE_TIMEOUT.search(
                           f"{r['error'].get('type')} {r['error'].get('message')}"))
    if not timed_out:
        return None
    stuck = furthest_behind(results.read_heartbeats(job_dir), world_size, started_at=0.0)
    if stuck["rank"] in timed_out or records.get(stuck["rank"], {}).get("error"):
        return None  # the slowest rank failed on its own: an ordinary failure
    where = stuck["phase"] if stuck["step"] is None else f"{stuck['phase']} {stuck['step']}"
    return {
        "rank": stuck["rank"], "phase": stuck["phase"], "step": stuck["step"], "silent_s": None,
        "message": (f"rank(s) {timed_out} timed out in a collective (nccl.timeout_s) waiting for "
                    f"rank {stuck['rank']}, which last reported {where!r}"),
    }


def launch_config(plan: JobPlan, launcher_cfg: Any) -> Any:
    """The elastic agent's LaunchConfig for one job: ranks, nodes, rendezvous, restarts,
    per-rank logs under <job>/logs."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig

    lc = launcher_cfg
    rdzv_configs: dict[str, Any] = {}
    if lc.rdzv_backend == "static":
        rdzv_configs["rank"] = lc.node_rank
    elif lc.nnodes > 1:
        rdzv_configs["is_host"] = lc.node_rank == 0
    optional = {"shutdown_timeout": WORKER_SHUTDOWN_S}  # torch >= 2.13; older agents use their default
    supported = {f.name for f in dataclasses.fields(LaunchConfig)}
    # LaunchConfig asks torch.cuda.is_available(); answered from NVML, CUDA stays uninitialised here
    with applied_environment({"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}):
        return LaunchConfig(
            min_nodes=lc.nnodes, max_nodes=lc.nnodes, nproc_per_node=plan.nproc_per_node,
            run_id=f"wan-exp-{plan.num}-{uuid.uuid4().hex[:8]}",
            rdzv_backend=lc.rdzv_backend, rdzv_endpoint=lc.rdzv_endpoint, rdzv_configs=rdzv_configs,
            max_restarts=lc.max_restarts, monitor_interval=0.1, start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=str(plan.job_dir / "logs"), redirects=Std.ALL),
            **{name: value for name, value in optional.items() if name in supported},
        )


def start_ranks(plan: JobPlan, task_cfg: DictConfig) -> tuple[dict[int, dict], Optional[dict], Optional[str]]:
    """Run the job's ranks under the elastic agent (this thread) and the hang watchdog.

    Returns (dead_ranks, hang finding, launch error): dead_ranks maps each rank that
    exited non-zero to {"exitcode", "time", "phase", "message"}.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import launch_agent

    watchdog = HangWatchdog(plan.job_dir, plan.world_size, float(task_cfg.launcher.hang_timeout_s))
    watchdog.start()
    dead: dict[int, dict] = {}
    launch_error = None
    try:
        config = launch_config(plan, task_cfg.launcher)
        launch_agent(config, sys.executable, ["-m", "wan_exp.worker", str(plan.job_dir)])
    except ChildFailedError as exc:
        beats = results.read_heartbeats(plan.job_dir)
        for rank, failure in exc.failures.items():
            how = (f"killed by {failure.signal_name()}" if failure.exitcode < 0
                   else f"exited with code {failure.exitcode}")
            beat = beats.get(rank, {"phase": "start", "time": failure.timestamp})
            # its last heartbeat, not the agent's whole-second timestamp, dates the death, so
            # it sorts before the errors it caused in other ranks
            dead[rank] = {"exitcode": failure.exitcode, "time": min(beat["time"], failure.timestamp),
                          "phase": beat["phase"],
                          "message": f"rank {rank} {how} without writing its record (see {plan.job_dir / 'logs'})"}
    except SignalException:  # the launcher itself was told to stop: end the sweep, not just this job
        raise
    except Exception as exc:  # config, rendezvous or agent failure: the job failed before its ranks ran
        launch_error = f"{type(exc).__name__}: {exc}"
        log.exception("job %d: the elastic agent failed: %s", plan.num, launch_error)
    finally:
        watchdog.stop()
        leftovers = kill_workers(plan.job_dir)  # nothing of this job may outlive it
        if leftovers:
            log.warning("job %d: killed leftover worker processes %s", plan.num, leftovers)
    return dead, watchdog.finding, launch_error


def run_one_job(plan: JobPlan, task_cfg: DictConfig) -> dict:
    """Run one job and return its results (also on disk as <job>/results.json)."""
    if plan.already_completed:
        log.info("job %d: %s already completed (launcher.resume); skipping", plan.num, plan.job_dir)
        return results.read_results(plan.job_dir)
    env = rank_environment(task_cfg, plan.job_dir, plan.nproc_per_node)
    prepare_job_dir(plan, task_cfg, env)
    log.info("job %d: %d rank(s), backend %s, job dir %s", plan.num, plan.world_size, plan.backend, plan.job_dir)
    oom_kills_before = results.kernel_oom_kill_count()
    with applied_environment(env):
        dead, hang, launch_error = start_ranks(plan, task_cfg)
    if hang is None and launch_error is None:
        hang = collective_timeout_hang(plan.job_dir, plan.world_size)
    oom_kills_after = results.kernel_oom_kill_count()
    oom_kills = (None if oom_kills_before is None or oom_kills_after is None
                 else oom_kills_after - oom_kills_before)
    return results.finalize_job(plan.job_dir, dead, hang, launch_error, oom_kills)


def report_job(job_results: dict, job_dir: Path, log_to_wandb: bool) -> None:
    """W&B run (not again for a job a resumed sweep skipped) and the one-screen summary."""
    from wan_exp.wandb_logger import log_job

    try:
        if log_to_wandb:
            log_job(job_results, job_dir)
    except Exception as exc:  # the result is safe on disk; W&B is a copy of it
        log.warning("job %s: W&B logging failed (results.json is unaffected): %s", job_results.get("job_num"), exc)
    print(results.summary_text(job_results), flush=True)


def report_sweep(sweep_dir: Path) -> None:
    """The sweep's report.md/report.html and its comparison table on the console."""
    from wan_exp.report import comparison_table, write_report

    markdown, html = write_report(sweep_dir)
    print(comparison_table(sweep_dir), flush=True)
    print(f"report: {markdown}  {html}", flush=True)


def launch_batch(hydra_context: HydraContext, sweep_config: DictConfig,
                 job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    """Check every job of the batch, then run them one after the other."""
    setup_globals()
    configure_log(sweep_config.hydra.hydra_logging, sweep_config.hydra.verbose)
    sweep_dir = Path(str(sweep_config.hydra.sweep.dir))
    plans = plan_batch(hydra_context, sweep_config, job_overrides, initial_job_idx)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info("Launching %d job(s) under torchrun into %s", len(plans), sweep_dir)
    returns = []
    for plan in plans:
        log.info("\t#%d : %s", plan.num, " ".join(filter_overrides(plan.hydra_overrides)))

        def job_task(task_cfg: DictConfig, plan: JobPlan = plan) -> dict:
            job_results = run_one_job(plan, task_cfg)
            report_job(job_results, plan.job_dir, log_to_wandb=not plan.already_completed)
            return {"status": job_results["status"], "job_dir": str(plan.job_dir)}

        returns.append(run_job(hydra_context=hydra_context, task_function=job_task, config=plan.config,
                               job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir"))
        configure_log(sweep_config.hydra.hydra_logging, sweep_config.hydra.verbose)
    report_sweep(sweep_dir)
    return returns
