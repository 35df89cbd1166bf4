"""The launcher end to end on CPU: real ranks (gloo), results read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from launch_helpers import REPO, job_results, output, run_launch
from wan_exp.host.envvars import JOB_DIR_VAR, applied_environment


@pytest.mark.slow
def test_info_plugins_lists_the_checked_launcher():
    proc = subprocess.run(
        [sys.executable, "launch.py", "--info", "plugins"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, output(proc)
    assert "CheckedLauncher" in proc.stdout


@pytest.mark.slow
def test_one_job_default_workload(tmp_path):
    """A plain run (no -m) is one job through the launcher: 2 ranks on CPU, the default
    generate workload, rank environment from the nccl and allocator groups."""
    proc = run_launch(tmp_path, "+nccl.env.WAN_EXP_PROBE=seen", "allocator=expandable")
    assert proc.returncode == 0, output(proc)
    (results,) = job_results(tmp_path)
    job_dir = tmp_path / "0"
    assert results["status"] == "completed" and results["root_cause"] is None
    assert results["world_size"] == 2 and results["strategy"] == "ulysses"
    assert results["workload"] == "generate" and results["model"] == "tiny"
    assert results["overrides"] == ["+nccl.env.WAN_EXP_PROBE=seen", "allocator=expandable"]
    assert [r["rank"] for r in results["ranks"]] == [0, 1]
    # the resolved config was written once, and is what results.json carries
    written = OmegaConf.to_container(OmegaConf.load(job_dir / "config.yaml"))
    assert written == results["config"] and written["workload"]["size"] == "64*64"
    job = json.loads((job_dir / "job.json").read_text())
    assert job["backend"] == "gloo" and job["nproc_per_node"] == 2
    for record in results["ranks"]:
        assert record["status"] == "completed" and record["device"] == "cpu"
        assert record["step_times_s"], "generate measures steps"
        assert record["attention_backend"] == "sdpa"  # what `auto` chose and ran on a CPU
        env = record["env"]
        assert env["WAN_EXP_PROBE"] == "seen"
        assert (
            env["PYTORCH_ALLOC_CONF"]
            == env["PYTORCH_CUDA_ALLOC_CONF"]
            == "expandable_segments:True,max_split_size_mb:512"
        )
        assert env[JOB_DIR_VAR] == str(job_dir)
    # per-rank logs, the W&B run, and the one-screen summary
    assert len(list((job_dir / "logs").rglob("stdout.log"))) == 2
    assert (job_dir / "wandb").is_dir()
    assert "COMPLETED" in proc.stdout and "strategy=ulysses" in proc.stdout
    assert str(job_dir / "results.json") in proc.stdout


@pytest.mark.slow
def test_three_job_sweep_over_nccl_profiles(tmp_path):
    """Three jobs, one per NCCL profile: each gets its own rendezvous port and exactly its
    profile's variables. Job 1 (default) sets none and would show job 0's if the launching
    process had kept them (ranks inherit the launcher's environment)."""
    assert not any(n.endswith(("BLOCKING_WAIT", "NCCL_DEBUG_SUBSYS")) for n in os.environ)
    proc = run_launch(tmp_path, "nccl=seed,default,debug", "workload=init", "logger=disabled", multirun=True)
    assert proc.returncode == 0, output(proc)
    jobs = job_results(tmp_path)
    assert [(r["job_num"], r["world_size"], r["status"]) for r in jobs] == [(n, 2, "completed") for n in range(3)]
    ports = []
    for results in jobs:
        job_ports = {r["env"]["MASTER_PORT"] for r in results["ranks"]}
        assert len(job_ports) == 1, "all ranks of a job meet at one port"
        ports.append(job_ports.pop())
    assert len(set(ports)) == 3, f"each job gets its own rendezvous port, got {ports}"

    seed, default, debug = ([r["env"] for r in results["ranks"]] for results in jobs)
    for env in seed:  # deprecated names arrive under their TORCH_NCCL_* names
        assert env["TORCH_NCCL_BLOCKING_WAIT"] == "1" and "NCCL_BLOCKING_WAIT" not in env
    assert "deprecated NCCL_BLOCKING_WAIT" in output(proc)
    for env in default:
        assert not any(n.endswith("BLOCKING_WAIT") for n in env)
    for env in debug:  # the profile's variables and the flight recorder into the job dir
        assert env["NCCL_DEBUG_SUBSYS"] == "INIT,COLL" and int(env["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0
        assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"].startswith(str(tmp_path / "2" / "nccl_trace"))
    assert (tmp_path / "2" / "nccl_trace").is_dir()
    # the sweep's report and comparison table
    assert (tmp_path / "report.md").exists() and "report:" in proc.stdout


def test_applied_environment_restores_the_parent_exactly(monkeypatch):
    monkeypatch.setenv("WAN_EXP_KEEP", "parent")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = dict(os.environ)
    with applied_environment({"WAN_EXP_PROBE": "x", "WAN_EXP_KEEP": "job"}):
        assert os.environ["WAN_EXP_PROBE"] == "x" and os.environ["WAN_EXP_KEEP"] == "job"
        os.environ["OMP_NUM_THREADS"] = "1"  # as the elastic agent may do
        del os.environ["WAN_EXP_KEEP"]
    assert dict(os.environ) == before
