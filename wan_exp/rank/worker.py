"""One rank of a job, start to end: ``python -m wan_exp.rank.worker <job_dir>``.

This host's elastic agent (wan_exp.host.agent) starts this once per rank with RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set. The rank reads the job's resolved config.yaml (children
have no Hydra state), joins the process group, runs the workload and writes its own rank
record. Nothing is gathered: the job process on the host (wan_exp.host.job) reads every
rank's record and writes results.json.

On an exception the rank writes a record with status failed (oom for
torch.OutOfMemoryError or MemoryError, with its memory figures) and the phase and step it
was in, then exits non-zero at once; the agent stops the other ranks and the job process
writes the result.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from wan_exp import results
from wan_exp.config import ExperimentConfig, typed_config
from wan_exp.host.envvars import JOB_DIR_VAR, seen_environment
from wan_exp.models.attention import backend_report, selected_backend, selected_lse_backend
from wan_exp.models.attention import configure as configure_attention
from wan_exp.plan.fake_collectives import RealisticFakeCollectives
from wan_exp.preflight import config_warnings, rank_device
from wan_exp.rank import numerics
from wan_exp.rank.runtime import RankContext
from wan_exp.units import GIB


def load_job_config(job_dir: Path) -> ExperimentConfig:
    """The job's config.yaml as typed objects (the schema's dataclasses), converted once."""
    return typed_config(OmegaConf.load(job_dir / results.CONFIG_FILE))


def dump_stacks_on_sigusr1(job_dir: Path, rank: int) -> None:
    """The hang watchdog sends SIGUSR1; faulthandler then writes every thread's stack.
    (faulthandler writes from a signal handler, so the file is opened up front; the
    launcher's finalisation removes the files that stayed empty.)"""
    stacks = job_dir / "stacks"
    stacks.mkdir(parents=True, exist_ok=True)
    stack_file = open(stacks / f"rank_{rank}.txt", "w")  # kept open for the life of the rank
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)


def error_record(ctx: RankContext, exc: BaseException) -> dict:
    """This rank's record after `exc`: status failed, or oom with the memory figures."""
    record = ctx.metrics.rank_record()
    is_oom = isinstance(exc, (torch.OutOfMemoryError, MemoryError))
    record["status"] = results.OOM if is_oom else results.FAILED
    record["error"] = {
        "type": type(exc).__name__,
        "message": str(exc).strip().splitlines()[0] if str(exc).strip() else "",
        "traceback": traceback.format_exc(),
        "phase": ctx.current_phase,
        "step": ctx.current_step,
        "time": time.time(),
    }
    if is_oom and ctx.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(ctx.device)
        record["error"]["device_free_gib"] = free / GIB
        record["error"]["device_total_gib"] = total / GIB
    return record


SIMULATED_NOTE = (
    "fake process group: collectives were counted but moved no data (what they deliver was "
    "filled from this rank's own data), so the outputs are meaningless and the non-finite "
    "checks were off; memory and compute are this rank's own"
)


def init_process_group(backend: str, device: torch.device, rank: int, world_size: int, timeout_s: float) -> None:
    """Join the job's process group. ``fake`` (a simulated job): torch's fake process group, in
    which this one process is ``rank`` of ``world_size`` and collectives return at once."""
    timeout = timedelta(seconds=timeout_s)
    if backend == "fake":
        from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the backend

        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size, timeout=timeout)
        return
    # gloo also on shared GPUs (NCCL refuses two ranks on one GPU); device_id binds NCCL only
    dist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None)


def run_rank(job_dir: Path) -> int:
    job = json.loads((job_dir / results.JOB_FILE).read_text())
    cfg = load_job_config(job_dir)
    process_rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    simulated = job.get("simulated")  # one process plays rank simulated["rank"] of simulated["world_size"]
    rank, world_size = (
        (simulated["rank"], simulated["world_size"]) if simulated else (process_rank, int(os.environ["WORLD_SIZE"]))
    )
    dump_stacks_on_sigusr1(job_dir, process_rank)
    device = torch.device(*rank_device(job, local_rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ctx = RankContext(cfg, rank, local_rank, world_size, device, job_dir, process_rank=process_rank)
    configure_attention(cfg.model.attention_backend)  # process-wide: every attention call of this rank
    ctx.metrics.note("warnings", config_warnings(cfg))
    if simulated:
        numerics.disable_checks()
        ctx.metrics.note("simulated", {**simulated, "note": SIMULATED_NOTE})
    if job.get("shared_gpus"):
        ctx.metrics.note("shared_gpus", True)
    try:
        fake_data = RealisticFakeCollectives() if simulated else nullcontext()
        # innermost, so the fake collectives' own work is not counted as the rank's tensors
        tensors = ctx.metrics.tensors if ctx.metrics.tensors is not None else nullcontext()
        with ctx.metrics.comm, fake_data, tensors:  # count every collective from the process group to the last step
            with ctx.phase("process_group"):
                init_process_group(job["backend"], device, rank, world_size, cfg.nccl.timeout_s)
            ctx.heartbeat("workload")  # until the workload enters its first phase
            from wan_exp.workloads import WORKLOADS  # imported here so an import error is recorded

            WORKLOADS[cfg.workload.name](cfg, ctx)
        ctx.metrics.note("attention_backend", selected_backend())  # None: no attention ran (init)
        ctx.metrics.note("attention_lse_backend", selected_lse_backend())  # None: no ring attention
        ctx.metrics.note("attention_kernels", backend_report())  # what ran, why the faster ones did not
        record = ctx.metrics.rank_record()
        record.update(status=results.COMPLETED, error=None, env=seen_environment(job), rank=process_rank)
        results.write_rank_record(job_dir, record)
        ctx.heartbeat("done")
        dist.destroy_process_group()
        return 0
    except BaseException as exc:  # record any failure, including KeyboardInterrupt, then leave
        record = error_record(ctx, exc)
        record.update(env=seen_environment(job), rank=process_rank)
        print(f"[rank {rank}] {record['status']} in phase {ctx.current_phase}:", file=sys.stderr)
        traceback.print_exc()
        try:
            results.write_rank_record(job_dir, record)
        except results.WriteError as lost:  # a full or read-only disk: the exit code says so
            print(f"[rank {rank}] {lost}", file=sys.stderr)
            return results.RECORD_NOT_WRITTEN_EXIT
        return 1


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m wan_exp.rank.worker <job_dir>  (started by wan_exp.host.agent)")
    job_dir = Path(sys.argv[1])
    os.environ.setdefault(JOB_DIR_VAR, str(job_dir))
    code = run_rank(job_dir)
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: skip interpreter teardown, which can block on a broken process group
    os._exit(code)


if __name__ == "__main__":
    main()
