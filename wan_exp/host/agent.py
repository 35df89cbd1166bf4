"""One host's elastic agent for one job: ``python -m wan_exp.host.agent <spec json>``.

wan_exp.host.job starts this process once per host and job (in its own session, so that a
Ctrl-C meant for the sweep reaches the job process, which then ends this one). It runs
torch's elastic agent: rendezvous (c10d or static) with the other hosts, then this
host's ranks (``python -m <spec's entry_module> <job dir>``: wan_exp.rank.worker, or
wan_exp.upstream.runner for workload=upstream), per-rank logs under
``<job>/logs/node_<n>/``. What the agent saw is written to the node file named in the
spec (``<job>/nodes/node_<n>.json``): ``{"node_rank", "node_id", "host", "failures":
{rank: {"exitcode", "time"}}, "error": str | None}``, plus ``"ended_by": "signal SIGTERM"``
when the agent was ended from outside; wan_exp.host.job builds the job's result from it and the
rank records.

The rendezvous gives up after ``launcher.rdzv_timeout_s`` (``join_timeout``); the job
process bounds the whole start-up by the same setting in case the agent blocks.

When the job process is gone without ending this agent (killed, or a second Ctrl-C made it exit
at once), the agent ends its ranks itself (``end_with_parent``): no rank outlives its job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from wan_exp.host.envvars import applied_environment
from wan_exp.results import WriteError, write_json_atomic

WORKER_SHUTDOWN_S = 5  # grace between the agent's SIGTERM and SIGKILL to surviving ranks
PARENT_POLL_S = 1.0  # how often the agent checks that the job process that started it is there


def launch_config(spec: dict) -> Any:
    """The elastic agent's LaunchConfig from the spec wan_exp.host.job wrote."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig

    rdzv_configs: dict[str, Any] = {"join_timeout": int(max(1, spec["rdzv_timeout_s"]))}
    if spec["rdzv_backend"] == "static":
        rdzv_configs = {"rank": spec["node_rank"]}
    elif spec["nnodes"] > 1:
        rdzv_configs["is_host"] = spec["node_rank"] == 0
    optional = {"shutdown_timeout": WORKER_SHUTDOWN_S}  # torch >= 2.13; older agents use their default
    supported = {f.name for f in dataclasses.fields(LaunchConfig)}
    # LaunchConfig asks torch.cuda.is_available(); NVML answers it, CUDA stays uninitialised here
    with applied_environment({"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}):
        return LaunchConfig(
            min_nodes=spec["nnodes"],
            max_nodes=spec["nnodes"],
            nproc_per_node=spec["nproc_per_node"],
            run_id=spec["run_id"],
            rdzv_backend=spec["rdzv_backend"],
            rdzv_endpoint=spec["rdzv_endpoint"],
            rdzv_configs=rdzv_configs,
            max_restarts=spec["max_restarts"],
            monitor_interval=0.1,
            start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=spec["log_dir"], redirects=Std.ALL),
            **{name: value for name, value in optional.items() if name in supported},
        )


def run_agent(spec: dict) -> dict:
    """Run this host's ranks; return the node file's content."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import launch_agent

    outcome: dict[str, Any] = {
        "node_rank": spec["node_rank"],
        "node_id": spec["node_id"],
        "host": socket.gethostname(),
        "failures": {},
        "error": None,
    }
    try:
        launch_agent(launch_config(spec), sys.executable, ["-m", spec["entry_module"], spec["job_dir"]])
    except ChildFailedError as exc:
        outcome["failures"] = {
            str(rank): {"exitcode": f.exitcode, "time": f.timestamp} for rank, f in exc.failures.items()
        }
    except SignalException as exc:  # ended from outside (the job process, or its end): no agent error
        outcome["ended_by"] = f"signal {exc.sigval.name}"
    except Exception as exc:  # rendezvous or agent failure: the ranks never ran (or not all)
        outcome["error"] = f"{type(exc).__name__}: {exc}"
    return outcome


def end_with_parent(parent: int) -> None:
    """Watch the job process ``parent`` that started this agent (its pid comes in the spec, so
    a parent gone before this runs is seen too); once it is gone, SIGTERM this agent, which
    ends its ranks as torch's elastic agent does on SIGTERM (terminate, then kill after
    WORKER_SHUTDOWN_S)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m wan_exp.host.agent <spec json>  (started by wan_exp.host.job)")
    spec = json.loads(sys.argv[1])
    end_with_parent(int(spec["parent_pid"]))
    outcome = run_agent(spec)
    try:
        write_json_atomic(Path(spec["node_file"]), outcome)
    except WriteError as exc:  # the job process writes its own outcome and reports the disk
        print(f"agent: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0 if not outcome["failures"] and outcome["error"] is None else 1)


if __name__ == "__main__":
    main()
