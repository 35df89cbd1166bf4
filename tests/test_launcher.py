"""The torchrun launcher plugin end to end on CPU: real ranks (gloo), results read back."""
from __future__ import annotations

import json
import os

import pytest
from omegaconf import OmegaConf

from launch_helpers import REPO, job_results, output, root_cause, run_fault_sweep, run_launch
from wan_exp.envvars import JOB_DIR_VAR, applied_environment

import subprocess
import sys


def test_info_plugins_lists_the_torchrun_launcher():
    proc = subprocess.run([sys.executable, "launch.py", "--info", "plugins"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, output(proc)
    assert "TorchrunLauncher" in proc.stdout


def test_one_job_default_workload(tmp_path):
    """A plain run (no -m) is one job through the launcher: 2 ranks on CPU, the default
    generate workload, rank environment from the nccl and allocator groups."""
    proc = run_launch(tmp_path, "nccl.env={WAN_EXP_PROBE:seen}", "allocator=expandable")
    assert proc.returncode == 0, output(proc)
    (results,) = job_results(tmp_path)
    job_dir = tmp_path / "0"
    assert results["status"] == "completed" and results["root_cause"] is None
    assert results["world_size"] == 2 and results["strategy"] == "ulysses"
    assert results["workload"] == "generate" and results["model"] == "tiny"
    assert results["overrides"] == ["nccl.env={WAN_EXP_PROBE:seen}", "allocator=expandable"]
    assert [r["rank"] for r in results["ranks"]] == [0, 1]
    # the resolved config was written once, and is what results.json carries
    written = OmegaConf.to_container(OmegaConf.load(job_dir / "config.yaml"))
    assert written == results["config"] and written["workload"]["size"] == "64*64"
    job = json.loads((job_dir / "job.json").read_text())
    assert job["backend"] == "gloo" and job["nproc_per_node"] == 2
    for record in results["ranks"]:
        assert record["status"] == "completed" and record["device"] == "cpu"
        assert record["step_times_s"], "generate measures steps"
        env = record["env"]
        assert env["WAN_EXP_PROBE"] == "seen"
        assert env["PYTORCH_ALLOC_CONF"] == env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True,max_split_size_mb:512"
        assert env[JOB_DIR_VAR] == str(job_dir)
    # per-rank logs, the W&B run, and the one-screen summary
    assert len(list((job_dir / "logs").rglob("stdout.log"))) == 2
    assert (job_dir / "wandb").is_dir()
    assert "COMPLETED" in proc.stdout and "strategy=ulysses" in proc.stdout
    assert str(job_dir / "results.json") in proc.stdout


def test_three_job_sweep_strategies_and_ports(tmp_path):
    proc = run_launch(tmp_path, "parallel=single,ulysses,fsdp_fixed", "workload=init", "logger=disabled",
                      multirun=True)
    assert proc.returncode == 0, output(proc)
    jobs = job_results(tmp_path)
    assert [(r["job_num"], r["strategy"], r["world_size"], r["status"]) for r in jobs] == [
        (0, "single", 1, "completed"), (1, "ulysses", 2, "completed"), (2, "fsdp_fixed", 2, "completed")]
    ports = []
    for results in jobs:
        assert len(results["ranks"]) == results["world_size"]
        job_ports = {r["env"]["MASTER_PORT"] for r in results["ranks"]}
        assert len(job_ports) == 1, "all ranks of a job meet at one port"
        ports.append(job_ports.pop())
    assert len(set(ports)) == 3, f"each job gets its own rendezvous port, got {ports}"
    # the sweep's report and comparison table
    assert (tmp_path / "report.md").exists()
    for strategy in ("single", "ulysses", "fsdp_fixed"):
        assert strategy in proc.stdout


def test_nccl_variable_reaches_ranks_and_not_the_next_job(tmp_path):
    """Job 0 sets a variable; job 1 does not and must not see it, which it would if the
    launching process had kept it (ranks inherit the launcher's environment)."""
    proc = run_launch(tmp_path, "nccl.env={WAN_EXP_PROBE:job0},{}", "parallel=single", "workload=init",
                      "logger=disabled", multirun=True)
    assert proc.returncode == 0, output(proc)
    first, second = job_results(tmp_path)
    assert [r["env"].get("WAN_EXP_PROBE") for r in first["ranks"]] == ["job0"]
    assert [r["env"].get("WAN_EXP_PROBE") for r in second["ranks"]] == [None]


def test_applied_environment_restores_the_parent_exactly(monkeypatch):
    monkeypatch.setenv("WAN_EXP_KEEP", "parent")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = dict(os.environ)
    with applied_environment({"WAN_EXP_PROBE": "x", "WAN_EXP_KEEP": "job"}):
        assert os.environ["WAN_EXP_PROBE"] == "x" and os.environ["WAN_EXP_KEEP"] == "job"
        os.environ["OMP_NUM_THREADS"] = "1"  # as the elastic agent may do
        del os.environ["WAN_EXP_KEEP"]
    assert dict(os.environ) == before


def test_failing_rank_fails_the_job_and_the_sweep_continues(tmp_path):
    failed, completed = run_fault_sweep(tmp_path, "fault=raise,none", "fault.phase=build")
    assert failed["status"] == "failed" and root_cause(failed) == (0, "build", 1)
    message = failed["root_cause"]["message"]
    assert "InjectedFault" in message and "build" in message
    rank0 = next(r for r in failed["ranks"] if r["rank"] == 0)
    assert rank0["status"] == "failed" and rank0["error"]["phase"] == "build"
    assert "Traceback" in rank0["error"]["traceback"]
    assert completed["status"] == "completed" and len(completed["ranks"]) == 2
