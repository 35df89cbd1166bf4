"""One job, end to end, on the host it runs on: the body of launch.py's Hydra task.

Whatever Hydra launcher runs the task (torchrun: in the launching process; submitit:
in a Slurm task or a local subprocess), :func:`run_job` does the same:

1. checks the job on this machine (wan_exp.preflight.check_job) and finds its node layout:
   ``launcher.nnodes / node_rank / rdzv_endpoint``, or Slurm's allocation
   (:func:`node_layout`);
2. on node 0: writes the job dir (config.yaml, job.json) once;
3. starts this host's elastic agent (``python -m wan_exp.host.agent``, own session) with the
   ranks' environment, and watches the ranks' heartbeats: every rank must send its first
   one within ``launcher.rdzv_timeout_s`` of the start (the bounded start; a rendezvous
   that cannot form ends here, naming the endpoint), then no progress from any rank for
   ``launcher.hang_timeout_s`` is a hang (stacks dumped, ranks killed). Ctrl-C or SIGTERM
   ends the ranks and records the job as interrupted;
4. on the host that ran global rank 0: builds the job's result from every rank's record
   and every host's agent outcome, and writes results.json (wan_exp.results.finalize_job,
   the only writer).

It returns ``{"status", "job_dir", "results_owner", "skipped"}`` to Hydra; the W&B run
and the summary are the job-end callback's (wan_exp.host.callbacks). After an interrupt it
raises :class:`SweepInterrupted` (a KeyboardInterrupt), which ends the sweep.

No torch import: this runs in the launching process (the weights-fit check counts parameters
from the config's shapes, wan_exp.models.sizes).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import psutil
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from wan_exp import results
from wan_exp.config import ConfigError, steps_run
from wan_exp.devices import visible_gpu_count
from wan_exp.host.envvars import rank_environment
from wan_exp.host.machine import (
    LoadSampler,
    machine_figures,
    positive_int,
)
from wan_exp.host.progress import ProgressDisplay
from wan_exp.host.pyspy import dump_with_pyspy
from wan_exp.preflight import JobShape, check_job, config_warnings
from wan_exp.upstream.monitor import host_monitor

log = logging.getLogger(__name__)

POLL_S = 0.2
STACK_DUMP_WAIT_S = 5.0  # how long a hang waits for every rank's stack file
NODE_FILE_WAIT_S = 30.0  # how long global rank 0's host waits for the other hosts' outcomes
NODE_ID_VAR = "WAN_EXP_NODE_ID"  # set for the ranks; their record says which host ran them
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000  # rendezvous port from the Slurm job id
STALE = ("ranks", "progress", "stacks", "nccl_trace", "wandb", "lora_adapter", "nodes", "upstream")
SWEEP_STATE_DIR = ".wan_exp"  # <sweep dir>/.wan_exp/: the sweep record and lock (wan_exp.host.callbacks)
SWEEP_RECORD = "sweep.json"
# The module each rank runs: wan-exp's own worker, or upstream's generate.py (workload=upstream)
RANK_ENTRY_MODULES = {"upstream": "wan_exp.upstream.runner"}
DEFAULT_RANK_ENTRY = "wan_exp.rank.worker"


class SweepStopped(KeyboardInterrupt):
    """The sweep cannot go on: the job is recorded where it can be (or named on the console
    with what was lost) and no further job starts. A KeyboardInterrupt, so that it passes
    Hydra's task wrapper (which keeps an Exception as the job's return value) and the
    checked launcher ends the sweep on it; its message is the cause."""


class SweepInterrupted(SweepStopped):
    """Ctrl-C or SIGTERM during a job: the job is recorded as interrupted, the sweep ends."""


@dataclass(frozen=True)
class NodeLayout:
    """Where this host stands in a job of one or more hosts."""

    nnodes: int
    node_rank: int
    rdzv_endpoint: str


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[03-05,9],cpu1" -> "gpu03"."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} is not a Slurm node list")
    prefix, ranges = match.groups()
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0]


def node_layout(launcher_cfg: Any, environ: Mapping[str, str]) -> NodeLayout:
    """The launcher settings, or, inside a Slurm task of an allocation of several nodes (one
    task per node, as srun and submitit start them), Slurm's: node count, this node's rank,
    and the rendezvous on the allocation's first node at a port derived from the job id (so
    two jobs on one node differ). A shell inside the allocation (salloc) is no task
    (no SLURM_STEP_ID): there the launcher settings hold."""
    nnodes = int(environ.get("SLURM_NNODES", "1"))
    if "SLURM_JOB_ID" in environ and "SLURM_STEP_ID" in environ and nnodes > 1:
        port = SLURM_PORT_BASE + int(environ["SLURM_JOB_ID"]) % SLURM_PORT_SPAN
        return NodeLayout(
            nnodes=nnodes,
            node_rank=int(environ["SLURM_NODEID"]),
            rdzv_endpoint=f"{first_slurm_host(environ['SLURM_JOB_NODELIST'])}:{port}",
        )
    return NodeLayout(
        nnodes=int(launcher_cfg.nnodes),
        node_rank=int(launcher_cfg.node_rank),
        rdzv_endpoint=str(launcher_cfg.rdzv_endpoint),
    )


def job_dir_of(cfg: DictConfig) -> Path:
    """The job's folder: Hydra's output dir for this job (<sweep dir>/<subdir>)."""
    return Path(HydraConfig.get().runtime.output_dir).resolve()


# ----------------------------------------------------------------------------- processes
def job_processes(agent: Optional[subprocess.Popen], job_dir: Path) -> list[psutil.Process]:
    """This host's processes of the job: the agent and everything under it, and any worker
    of this job dir still running under this process (found by its command line)."""
    found: dict[int, psutil.Process] = {}

    def add_tree(proc: psutil.Process) -> None:
        found[proc.pid] = proc
        for child in proc.children(recursive=True):
            found[child.pid] = child

    try:
        if agent is not None and agent.returncode is None:
            add_tree(psutil.Process(agent.pid))
        for proc in psutil.Process().children(recursive=True):
            try:
                if str(job_dir) in proc.cmdline():
                    add_tree(proc)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
    except psutil.NoSuchProcess:
        pass
    return list(found.values())


def workers_of(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            if any(m in proc.cmdline() for m in (DEFAULT_RANK_ENTRY, *RANK_ENTRY_MODULES.values())):
                out.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return out


def kill_all(procs: list[psutil.Process]) -> list[int]:
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)
    return [p.pid for p in procs]


def dump_stacks(job_dir: Path, beats: dict[int, dict], workers: list[psutil.Process]) -> None:
    """SIGUSR1 to this host's live ranks (each writes its stacks, see wan_exp.rank.worker) and
    py-spy on each (wan_exp.host.pyspy); wait briefly for the files. A PID from another host's
    heartbeat is never signalled."""
    local = {p.pid for p in workers}
    mine = [b for b in beats.values() if b["pid"] in local]
    for beat in mine:
        try:
            os.kill(beat["pid"], signal.SIGUSR1)
        except ProcessLookupError:
            pass
    # py-spy's view from outside, with native frames (an NCCL wait), while the ranks write theirs
    pyspy = threading.Thread(target=dump_with_pyspy, args=(job_dir, {b["rank"]: b["pid"] for b in mine}))
    pyspy.start()
    stack_files = [job_dir / "stacks" / f"rank_{b['rank']}.txt" for b in mine]
    deadline = time.time() + STACK_DUMP_WAIT_S
    while time.time() < deadline and not all(f.exists() and f.stat().st_size for f in stack_files):
        time.sleep(0.1)
    pyspy.join()


# ----------------------------------------------------------------------------- findings
def furthest_behind(beats: dict[int, dict], world_size: int, started_at: float) -> dict:
    """The heartbeat of the rank the others wait for: the fewest heartbeats (ranks run the
    same program), then the oldest. A rank with no heartbeat yet never got past start-up."""
    ranks = [
        beats.get(r, {"rank": r, "phase": "start", "step": None, "seq": 0, "time": started_at})
        for r in range(world_size)
    ]
    return min(ranks, key=lambda b: (b["seq"], b["time"], b["rank"]))


def _where(beat: dict) -> str:
    """ "vae_decode (decode frame 3/21)", "step 4": the phase, its step, the last in-stage beat."""
    where = beat["phase"] if beat.get("step") is None else f"{beat['phase']} {beat['step']}"
    return f"{where} ({beat['detail']})" if beat.get("detail") else where


def check_progress(
    beats: dict[int, dict], world_size: int, started_at: float, now: float, launcher_cfg: Any, endpoint: str
) -> Optional[dict]:
    """The watchdog's rule, once per poll. Until every rank has sent its first heartbeat the
    start-up bound applies (launcher.rdzv_timeout_s from the job's start); after that, no
    new heartbeat from any rank for launcher.hang_timeout_s is a hang. Returns a finding
    {"status", "rank", "phase", "step", "message"} or None."""
    start_s, hang_s = float(launcher_cfg.rdzv_timeout_s), float(launcher_cfg.hang_timeout_s)
    if len(beats) < world_size:
        if now - started_at <= start_s:
            return None
        if not beats:
            return {
                "status": results.FAILED,
                "rank": None,
                "phase": "rendezvous",
                "step": None,
                "message": (
                    f"no rank started within launcher.rdzv_timeout_s={start_s:g}s: the rendezvous "
                    f"at {endpoint} did not form (port taken by another program, host unreachable, "
                    "or another node not started?)"
                ),
            }
        missing = min(set(range(world_size)) - set(beats))
        return {
            "status": results.HANG,
            "rank": missing,
            "phase": "start",
            "step": None,
            "message": (
                f"rank {missing} sent no heartbeat within launcher.rdzv_timeout_s={start_s:g}s "
                f"of the job's start ({len(beats)} of {world_size} ranks started)"
            ),
        }
    last_progress = max(b["time"] for b in beats.values())
    if now - last_progress <= hang_s:
        return None
    stuck = furthest_behind(beats, world_size, started_at)
    return hang_finding(
        stuck,
        f"no progress from any rank for {hang_s:g}s (launcher.hang_timeout_s); rank "
        f"{stuck['rank']} last reported {_where(stuck)!r} {now - stuck['time']:.0f}s ago",
    )


def hang_finding(stuck: dict, message: str) -> dict:
    """A hang blamed on the rank ``stuck`` (its last heartbeat: rank, phase, step)."""
    return {
        "status": results.HANG,
        "rank": stuck["rank"],
        "phase": stuck["phase"],
        "step": stuck["step"],
        "message": message,
    }


COLLECTIVE_TIMEOUT = re.compile(r"timed? ?out|timeout", re.IGNORECASE)


def collective_timeout_hang(job_dir: Path, world_size: int) -> Optional[dict]:
    """A hang that the process group's own timeout ended before the watchdog did.

    With nccl.timeout_s below launcher.hang_timeout_s (nccl=debug, nccl=container) the ranks
    that wait in a collective raise a timeout first, and the agent then stops the rank they
    were waiting for, which never wrote an error of its own. The job hung in that rank.
    """
    records = {r["rank"]: r for r in results.read_rank_records(job_dir)}
    timed_out = sorted(
        rank
        for rank, r in records.items()
        if r.get("error") and COLLECTIVE_TIMEOUT.search(f"{r['error'].get('type')} {r['error'].get('message')}")
    )
    if not timed_out:
        return None
    stuck = furthest_behind(results.read_heartbeats(job_dir), world_size, started_at=0.0)
    if stuck["rank"] in timed_out or records.get(stuck["rank"], {}).get("error"):
        return None  # the slowest rank failed on its own: an ordinary failure
    return hang_finding(
        stuck,
        f"rank(s) {timed_out} timed out in a collective (nccl.timeout_s) waiting for "
        f"rank {stuck['rank']}, which last reported {_where(stuck)!r}",
    )


def dead_ranks(job_dir: Path, node_outcomes: list[dict]) -> dict[int, dict]:
    """rank -> {"exitcode", "time", "phase", "message"} for every rank an agent saw exit
    non-zero; the rank's last heartbeat dates the death (the agent's timestamp has whole
    seconds), so it sorts before the errors it caused in other ranks."""
    beats = results.read_heartbeats(job_dir)
    dead = {}
    for outcome in node_outcomes:
        for rank_text, failure in outcome.get("failures", {}).items():
            rank, code = int(rank_text), failure["exitcode"]
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            if code == results.RECORD_NOT_WRITTEN_EXIT:
                how = f"could not write its record (exit code {code}: the job dir's disk is full or not writable)"
            beat = beats.get(rank, {"phase": "start", "time": failure["time"]})
            dead[rank] = {
                "exitcode": code,
                "time": min(beat["time"], failure["time"]),
                "phase": beat["phase"],
                "message": (
                    f"rank {rank} {how} without writing its record (see {job_dir / 'logs'} on {outcome.get('host')})"
                ),
            }
    return dead


# ----------------------------------------------------------------------------- the job
def prepare_job_dir(
    job_dir: Path,
    cfg: DictConfig,
    overrides: list[str],
    job_num: int,
    shape: JobShape,
    layout: NodeLayout,
    env: dict[str, str],
) -> dict:
    """config.yaml and job.json, written once by node 0 before its ranks start; leftovers
    of an earlier unfinished attempt (launcher.resume) are removed first. Returns what
    was written ({file name: text}), to write it again if the job dir is lost mid-run.
    Raises WriteError when the job dir cannot be written."""
    try:
        for stale in STALE:
            shutil.rmtree(job_dir / stale, ignore_errors=True)
        (job_dir / results.RESULTS_FILE).unlink(missing_ok=True)
        if cfg.nccl.flight_recorder:
            (job_dir / "nccl_trace").mkdir()
    except OSError as exc:
        raise results.write_error(job_dir, exc) from exc
    written = {
        results.CONFIG_FILE: OmegaConf.to_yaml(cfg, resolve=True),
        results.JOB_FILE: json.dumps(job_record(job_dir, overrides, job_num, shape, layout, env), indent=2),
    }
    for name, text in written.items():
        results.write_text_atomic(job_dir / name, text)
    return written


def job_record(
    job_dir: Path, overrides: list[str], job_num: int, shape: JobShape, layout: NodeLayout, env: dict[str, str]
) -> dict:
    """job.json's content (docs/architecture.md, "Job directory")."""
    return {
        "overrides": overrides,
        "job_num": job_num,
        "sweep_dir": str(job_dir.parent),
        "world_size": shape.world_size,
        "nproc_per_node": shape.nproc_per_node,
        "nnodes": layout.nnodes,
        "node_rank": layout.node_rank,
        "rdzv_endpoint": layout.rdzv_endpoint,
        "backend": shape.backend,
        "device": shape.device,
        "gpus": shape.gpus,
        "shared_gpus": shape.shared_gpus,
        "simulated": (
            None if shape.simulated_rank is None else {"world_size": shape.world_size, "rank": shape.simulated_rank}
        ),
        "processes": shape.processes,
        "env": env,
        "started_at": results.now_iso(),
    }


def job_overrides(cfg: DictConfig) -> list[str]:
    """The job's own overrides as recorded in job.json (launcher.resume left out)."""
    return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("launcher.resume")]


def sweep_title(sweep_dir: Path, job_num: int) -> str:
    record = results.read_json(sweep_dir / SWEEP_STATE_DIR / SWEEP_RECORD) or {}
    launches = record.get("launches") or [{}]
    total = launches[record.get("active", -1)].get("jobs")
    return f"job {job_num + 1} of {total}" if total else f"job {job_num + 1}"


def agent_spec(cfg: DictConfig, job_dir: Path, job_num: int, layout: NodeLayout, shape: JobShape, node_id: str) -> dict:
    """What this host's agent (python -m wan_exp.host.agent) needs to start its ranks."""
    return {
        "job_dir": str(job_dir),
        "node_rank": layout.node_rank,
        "nnodes": layout.nnodes,
        "node_id": node_id,
        "nproc_per_node": shape.nproc_per_node,
        "rdzv_backend": str(cfg.launcher.rdzv_backend),
        "rdzv_endpoint": layout.rdzv_endpoint,
        "rdzv_timeout_s": float(cfg.launcher.rdzv_timeout_s),
        "max_restarts": int(cfg.launcher.max_restarts),
        "log_dir": str(job_dir / "logs" / f"node_{layout.node_rank}"),
        "node_file": str(job_dir / "nodes" / f"node_{layout.node_rank}.json"),
        # the same on every host of the job: the sweep dir's name and the job number
        "run_id": f"wan-exp-{job_dir.parent.name}-{job_num}"[:60],
        # the agent ends its ranks once this process is gone (agent.end_with_parent)
        "parent_pid": os.getpid(),
        "entry_module": RANK_ENTRY_MODULES.get(str(cfg.workload.name), DEFAULT_RANK_ENTRY),
    }


def owns_result(job_dir: Path, node_id: str, layout: NodeLayout) -> bool:
    """True on the host that ran global rank 0 (its record carries this host's node id);
    node 0 when rank 0 left no record."""
    record = results.read_json(results.rank_record_path(job_dir, 0))
    ran_on = (record or {}).get("env", {}).get(NODE_ID_VAR)
    return ran_on == node_id if ran_on else layout.node_rank == 0


def node_outcomes(job_dir: Path, nnodes: int, wait_s: float) -> list[dict]:
    """Every host's agent outcome (nodes/node_<n>.json), waiting up to `wait_s` for the others."""
    deadline = time.time() + wait_s
    while True:
        found = [results.read_json(p) for p in sorted((job_dir / "nodes").glob("node_*.json"))]
        found = [f for f in found if f is not None]
        if len(found) >= nnodes or time.time() > deadline:
            return found
        time.sleep(POLL_S)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise SweepInterrupted(signal.Signals(signum).name)


def _exit_at_once(signum: int, frame: Any) -> None:
    os._exit(128 + signum)  # a second Ctrl-C: no cleanup, no traceback


def run_job(cfg: DictConfig) -> dict:
    """Run this host's part of one job; see the module docstring."""
    job_dir = job_dir_of(cfg)
    job_num = int(HydraConfig.get().job.num)
    keep_log_file_errors_off_the_console()
    if cfg.launcher.resume and results.is_completed(job_dir):
        log.info("job %d: %s already completed (launcher.resume); skipping", job_num, job_dir)
        return {"status": results.COMPLETED, "job_dir": str(job_dir), "results_owner": True, "skipped": True}
    layout = node_layout(cfg.launcher, os.environ)
    if layout.node_rank == 0 and not cfg.launcher.resume and results.read_json(job_dir / results.JOB_FILE) is not None:
        # the checked launcher's batch check refuses this before any job; other launchers
        # (submitit) arrive here: never clear a job dir an earlier launch left
        log.error(
            "job %d: not started: %s already holds a job; use launcher.resume=true to finish "
            "that sweep, or a new hydra.sweep.dir",
            job_num,
            job_dir,
        )
        return {"status": results.FAILED, "job_dir": str(job_dir), "results_owner": False, "skipped": False}
    with_layout = OmegaConf.merge(
        cfg,
        {"launcher": {"nnodes": layout.nnodes, "node_rank": layout.node_rank, "rdzv_endpoint": layout.rdzv_endpoint}},
    )
    try:
        shape = check_job(with_layout, visible_gpu_count())  # again here: another launcher or host
    except ConfigError as exc:
        # launchers without a batch check (submitit) meet a bad job here: a result, not a crash
        try:
            return record_config_error(job_dir, with_layout, job_overrides(cfg), job_num, layout, str(exc))
        except results.WriteError as lost:
            report_unwritten(job_num, lost)
            raise SweepStopped(f"job {job_num}: {lost}") from None
    for warning in config_warnings(cfg):
        log.warning("job %d: %s", job_num, warning)
    node_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    env, thread_warnings = rank_environment(with_layout, job_dir, shape.nproc_per_node)
    spec = agent_spec(cfg, job_dir, job_num, layout, shape, node_id)
    node_file, log_dir = Path(spec["node_file"]), Path(spec["log_dir"])
    written: dict[str, str] = {}
    try:
        if layout.node_rank == 0:
            written = prepare_job_dir(job_dir, with_layout, job_overrides(cfg), job_num, shape, layout, env)
        node_file.unlink(missing_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        agent_log = open(log_dir / "agent.log", "w")  # noqa: SIM115  (the with-block below closes it)
    except OSError as exc:  # a full or read-only disk: nothing started, nothing to record
        problem = exc if isinstance(exc, results.WriteError) else results.write_error(log_dir, exc)
        log.error("job %d: not started: %s", job_num, problem)
        raise SweepStopped(f"job {job_num} not started: {problem}") from None
    identity = dir_identity(job_dir)  # the folder this job writes; checked while the ranks run
    log.info(
        "job %d: %d rank(s) (%d node(s)), backend %s%s, job dir %s",
        job_num,
        shape.world_size,
        layout.nnodes,
        shape.backend,
        f" (simulated: one process plays rank {shape.simulated_rank})"
        if shape.simulated_rank is not None
        else " (ranks share the GPUs)"
        if shape.shared_gpus
        else "",
        job_dir,
    )
    finding, interrupted = None, None
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    in_main_thread = threading.current_thread() is threading.main_thread()
    agent: Optional[subprocess.Popen] = None
    sampler = LoadSampler()
    oom_kills_before = results.kernel_oom_kill_count()  # the kernel's OOM killer, host-wide
    try:
        if in_main_thread:
            signal.signal(signal.SIGTERM, _raise_interrupt)
            signal.signal(signal.SIGINT, _raise_interrupt)
        with agent_log, host_monitor(cfg, job_dir, lambda: {p.pid for p in workers_of(job_processes(agent, job_dir))}):
            agent = subprocess.Popen(
                [sys.executable, "-m", "wan_exp.host.agent", json.dumps(spec)],
                env={**os.environ, **env, NODE_ID_VAR: node_id},
                stdout=agent_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            finding = watch(
                agent,
                job_dir,
                shape.processes,
                cfg,
                layout.rdzv_endpoint,
                sweep_title(job_dir.parent, job_num),
                sampler,
                identity,
            )
    except KeyboardInterrupt as exc:
        if in_main_thread:
            signal.signal(signal.SIGINT, _exit_at_once)
            signal.signal(signal.SIGTERM, _exit_at_once)
        how = str(exc) if isinstance(exc, SweepInterrupted) else "SIGINT"
        beats = results.read_heartbeats(job_dir)
        stuck = furthest_behind(beats, shape.processes, time.time())
        interrupted = {
            "rank": stuck["rank"] if beats else None,
            "phase": stuck["phase"] if beats else "start",
            "step": stuck.get("step") if beats else None,
            "message": (
                f"interrupted by {how} while rank {stuck['rank']} was in {_where(stuck)!r}"
                if beats
                else f"interrupted by {how} before any rank started"
            ),
        }
    finally:
        leftovers = kill_all(job_processes(agent, job_dir))
        if leftovers and finding is None and interrupted is None:
            log.warning("job %d: killed leftover processes %s", job_num, leftovers)
        if in_main_thread and interrupted is None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    threads = positive_int({**os.environ, **env}.get("OMP_NUM_THREADS")) or 1
    machine = machine_figures(sampler, shape.nproc_per_node, threads, thread_warnings)
    for warning in machine["warnings"]:
        log.warning("job %d: %s", job_num, warning)
    if finding is None and interrupted is None:  # the ranks ended, but into the folder they started in?
        finding = lost_job_dir_finding(job_dir, identity, results.read_heartbeats(job_dir), shape.processes)
    try:
        if finding is not None and finding.get("job_dir_lost"):
            owner, final = layout.node_rank == 0, None
            if owner:
                final = record_lost_job_dir(job_dir, job_num, written, finding)
        else:
            owner, final = record_outcome(
                job_dir, layout, node_id, shape, finding, interrupted, oom_kills_before, machine
            )
    except results.WriteError as exc:  # a full or read-only disk: say what is lost, stop the sweep
        report_unwritten(job_num, exc)
        raise SweepStopped(f"job {job_num}: {exc}") from None
    if interrupted is not None:
        raise SweepInterrupted(interrupted["message"])
    if final is not None and results.is_write_failure(final.get("root_cause")):
        raise SweepStopped(f"job {job_num} failed writing its files: {final['root_cause']['message']}")
    status = None if final is None else final["status"]
    return {"status": status, "job_dir": str(job_dir), "results_owner": owner, "skipped": False}


def record_outcome(
    job_dir: Path,
    layout: NodeLayout,
    node_id: str,
    shape: JobShape,
    finding: Optional[dict],
    interrupted: Optional[dict],
    oom_kills_before: Optional[int],
    machine: dict,
) -> tuple[bool, Optional[dict]]:
    """This host's agent outcome with ``machine`` (this host's figures) beside it, then, on the
    host that owns the result, results.json. Returns (owner, the results or None). Raises
    WriteError when a file cannot be written: a results.json that cannot be written as
    ResultNotWritten (with the results), else the first file that failed, after the result was
    still worked out and written if it could be."""
    node_file = job_dir / "nodes" / f"node_{layout.node_rank}.json"
    outcome = results.read_json(node_file)
    unwritten: Optional[results.WriteError] = None
    if outcome is None:  # the agent was killed (hang, start-up bound, interrupt) or could not write it
        outcome = {
            "node_rank": layout.node_rank,
            "node_id": node_id,
            "host": socket.gethostname(),
            "failures": {},
            "error": None,
        }
    outcome["machine"] = machine  # this host's load, cores and thread settings (wan_exp.host.machine)
    try:
        results.write_json_atomic(node_file, outcome)
    except results.WriteError as exc:
        unwritten = exc
    # every host's outcome first: a host's agent writes it after its ranks are gone, so rank 0's
    # record, which names the host that owns the result, is on disk by then wherever it ran
    outcomes = node_outcomes(
        job_dir, layout.nnodes, NODE_FILE_WAIT_S if interrupted is None and unwritten is None else 0
    )
    if unwritten is not None:
        outcomes = [o for o in outcomes if o.get("node_rank") != layout.node_rank] + [outcome]
    owner = owns_result(job_dir, node_id, layout)
    final = None
    if owner:
        oom_kills_after = results.kernel_oom_kill_count()
        oom_kills = None if oom_kills_before is None or oom_kills_after is None else oom_kills_after - oom_kills_before
        unknown = None
        if unwritten is not None and len(results.read_rank_records(job_dir)) < shape.processes:
            # neither the agent's outcome nor every rank's record: what the missing ranks did is unknown
            beats = results.read_heartbeats(job_dir)
            stuck = furthest_behind(beats, shape.processes, time.time()) if beats else {"phase": None}
            unknown = {
                "rank": None,
                "phase": stuck["phase"],
                "step": stuck.get("step"),
                "message": (
                    f"the job's files could not be written ({unwritten.strerror}): the ranks' "
                    "records and this host's agent outcome are missing"
                ),
            }
        final = finalize(
            job_dir, shape.processes, outcomes, finding, interrupted, layout.rdzv_endpoint, oom_kills, unknown
        )
    if unwritten is not None:
        raise unwritten
    return owner, final


def keep_log_file_errors_off_the_console() -> None:
    """Hydra's job log file (<job dir>/<task>.log) copies the console. When it cannot be
    written (a full disk), logging would print a traceback for every line; instead the
    file is named once on stderr and the console goes on carrying every line."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handleError = functools.partial(_log_file_failed, handler)  # type: ignore[method-assign]


def _log_file_failed(handler: logging.FileHandler, record: logging.LogRecord) -> None:
    if getattr(handler, "failed_once", False):
        return
    handler.failed_once = True  # type: ignore[attr-defined]
    print(
        f"the log file {handler.baseFilename} could not be written ({sys.exc_info()[1]}); "
        "the console carries every line",
        file=sys.stderr,
        flush=True,
    )


def report_unwritten(job_num: int, exc: results.WriteError) -> None:
    """On the console: the file that could not be written and, for results.json, the job's
    outcome that it would have held (so it is not lost with the file)."""
    log.error("job %d: %s", job_num, exc)
    if isinstance(exc, results.ResultNotWritten):
        print(results.summary_text(exc.results), flush=True)
        log.error("job %d: the result above is NOT in its results.json (the write failed); the sweep stops", job_num)


# ----------------------------------------------------------------------------- the job dir's identity
def dir_identity(path: Path) -> Optional[tuple[int, int]]:
    """(device, inode) of the folder at `path`, or None when nothing is there. A path can
    come to name another folder (removed and made again); the identity cannot."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def lost_job_dir_finding(
    job_dir: Path, identity: Optional[tuple[int, int]], beats: dict[int, dict], world_size: int
) -> Optional[dict]:
    """A finding (status failed, "job_dir_lost") when the folder at `job_dir` is no longer
    the one the job started writing (`identity`): removed, or replaced by another. The rank
    furthest behind at its last heartbeat gives the phase."""
    now = dir_identity(job_dir)
    if identity is None or now == identity:
        return None
    was = f"device:inode {identity[0]}:{identity[1]}"
    what = (
        f"was removed while the job ran (it was {was})"
        if now is None
        else f"was replaced by another folder while the job ran ({was}, now {now[0]}:{now[1]})"
    )
    stuck = furthest_behind(beats, world_size, time.time()) if beats else {"rank": None, "phase": "start", "step": None}
    return {
        "status": results.FAILED,
        "job_dir_lost": True,
        "rank": None,
        "phase": stuck["phase"],
        "step": stuck.get("step"),
        "message": (
            f"the job dir {job_dir} {what}; the ranks were stopped and what they had written "
            "there (records, heartbeats, logs) is lost"
        ),
    }


def record_lost_job_dir(job_dir: Path, job_num: int, written: dict[str, str], finding: dict) -> Optional[dict]:
    """The result of a job whose dir was lost mid-run: written into the folder now at that
    path (made again if removed), with the job's config.yaml and job.json put back; not when
    that folder holds another job's job.json (then only the console has it). Raises WriteError."""
    log.error("job %d: %s", job_num, finding["message"])
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise results.write_error(job_dir, exc) from exc
    theirs = results.read_json(job_dir / results.JOB_FILE)
    if theirs is not None and theirs != json.loads(written[results.JOB_FILE]):
        log.error(
            "job %d: failed (%s); not recorded: %s now holds another job's %s",
            job_num,
            finding["message"],
            job_dir,
            results.JOB_FILE,
        )
        return {"status": results.FAILED, "root_cause": finding}
    for name, text in written.items():
        results.write_text_atomic(job_dir / name, text)
    return results.finalize_job(job_dir, {}, None, job_failure=finding)


def record_config_error(
    job_dir: Path, cfg: DictConfig, overrides: list[str], job_num: int, layout: NodeLayout, message: str
) -> dict:
    """The result of a job its own host refuses to start (phase "config")."""
    log.error("job %d: not started: %s", job_num, message)
    if layout.node_rank != 0:
        return {"status": results.FAILED, "job_dir": str(job_dir), "results_owner": False, "skipped": False}
    prepare_job_dir(job_dir, cfg, overrides, job_num, JobShape(0, 0, "none"), layout, env={})
    final = results.finalize_job(job_dir, {}, None, launch_error=message, launch_phase="config")
    return {"status": final["status"], "job_dir": str(job_dir), "results_owner": True, "skipped": False}


def watch(
    agent: subprocess.Popen,
    job_dir: Path,
    world_size: int,
    cfg: DictConfig,
    endpoint: str,
    title: str,
    sampler: LoadSampler,
    identity: Optional[tuple[int, int]] = None,
) -> Optional[dict]:
    """Poll heartbeats until the agent exits; end the job on a finding (see check_progress),
    or when the job dir is no longer the folder the job started in (`identity`). The host's
    load is sampled along (``sampler``)."""
    started_at = time.time()
    beats: dict[int, dict] = {}
    with ProgressDisplay(title, world_size, steps_run(cfg.workload)) as display:
        while agent.poll() is None:
            sampler.sample(lambda: job_processes(agent, job_dir))
            finding = lost_job_dir_finding(job_dir, identity, beats, world_size)
            if finding is None:
                beats = results.read_heartbeats(job_dir)
                display.update(beats)
                finding = check_progress(beats, world_size, started_at, time.time(), cfg.launcher, endpoint)
            if finding is not None:
                log.error(finding["message"])
                procs = job_processes(agent, job_dir)
                if finding["status"] == results.HANG:
                    dump_stacks(job_dir, beats, workers_of(procs))
                    finding["message"] += f"; stacks in {job_dir / 'stacks'}"
                kill_all(procs)
                return finding
            time.sleep(POLL_S)
    return None


def finalize(
    job_dir: Path,
    world_size: int,
    outcomes: list[dict],
    finding: Optional[dict],
    interrupted: Optional[dict],
    endpoint: str,
    kernel_oom_kills: Optional[int] = None,
    job_failure: Optional[dict] = None,
) -> dict:
    """The job's result from what every host saw; written by results.finalize_job.
    ``kernel_oom_kills``: processes the kernel's OOM killer ended on this host meanwhile;
    ``job_failure``: a failure this process saw itself (results.finalize_job)."""
    errors = [f"{o.get('host')}: {o['error']}" for o in outcomes if o.get("error")]
    launch_error = None
    if finding is not None and finding["status"] == results.FAILED:
        launch_error, finding = finding["message"], None
    elif errors and finding is None:
        launch_error = f"the elastic agent failed at the rendezvous {endpoint}: {'; '.join(errors)}"
    hang = finding if finding is not None else collective_timeout_hang(job_dir, world_size)
    return results.finalize_job(
        job_dir,
        dead_ranks(job_dir, outcomes),
        hang,
        launch_error,
        interrupted,
        kernel_oom_kills=kernel_oom_kills,
        job_failure=job_failure,
    )


def check_config(cfg: DictConfig) -> Any:
    """check_job on this machine, for callers that hold a composed config (the batch check)."""
    return check_job(cfg, visible_gpu_count())


__all__ = ["ConfigError", "SweepInterrupted", "SweepStopped", "check_config", "node_layout", "run_job"]
