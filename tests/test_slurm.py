"""Slurm through hydra-submitit-launcher: the same jobs run by submitit on this machine,
the sbatch script a cluster would get (written by submitit, checked against the config),
and the node layout a job reads from Slurm's environment."""

from __future__ import annotations

import os
import re
from types import SimpleNamespace

import pytest

from launch_helpers import job_results, output, run_launch
from wan_exp.host.job import NodeLayout, first_slurm_host, node_layout

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the slurm extra")


@pytest.mark.slow
def test_submitit_local_runs_a_strategy_sweep_to_completion(tmp_path):
    """Two jobs through submitit on this machine: parallel=single completes, parallel=fsdp
    (GPU-only) is refused by its own host's check and recorded as failed; every job has its
    results.json, the dashboard covers both, and launch.py exits 1."""
    proc = run_launch(
        tmp_path,
        "hydra/launcher=submitit_local",
        "parallel=single,fsdp",
        "workload=init",
        "logger=disabled",
        multirun=True,
        timeout=300,
    )
    assert proc.returncode == 1, output(proc)
    single, fsdp = job_results(tmp_path)
    assert (single["strategy"], single["status"]) == ("single", "completed")
    assert single["ranks"][0]["status"] == "completed" and single["summary"]["init_s"] > 0
    assert (fsdp["strategy"], fsdp["status"]) == ("fsdp", "failed")
    assert fsdp["root_cause"]["phase"] == "config" and "needs GPUs" in fsdp["root_cause"]["message"]
    report = (tmp_path / "report.md").read_text()
    assert "single" in report and "fsdp" in report
    assert list((tmp_path / ".submitit").iterdir()), "submitit ran the jobs"


def test_the_sbatch_script_matches_the_cluster_config(tmp_path):
    """hydra/launcher=cluster (conf/hydra/launcher/cluster.yaml) as submitit writes it for
    sbatch; a stand-in sbatch keeps the script and refuses the submission."""
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_CAPTURE"\necho "sbatch: no cluster" >&2\nexit 1\n')
    (fakebin / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit looks for it before submitting
    for tool in fakebin.iterdir():
        tool.chmod(0o755)
    captured = tmp_path / "job.sbatch"
    sweep = tmp_path / "sweep"
    proc = run_launch(
        sweep,
        "hydra/launcher=cluster",
        "parallel=single,ulysses",
        "hydra.launcher.nodes=2",
        "hydra.launcher.account=proj",
        "hydra.launcher.qos=high",
        "hydra.launcher.partition=h200",
        multirun=True,
        timeout=120,
        env={"PATH": f"{fakebin}:{os.environ['PATH']}", "SBATCH_CAPTURE": str(captured)},
    )
    assert proc.returncode != 0 and "sbatch: no cluster" in output(proc)
    script = captured.read_text()
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, re.MULTILINE))
    assert options["partition"] == "h200" and options["account"] == "proj" and options["qos"] == "high"
    assert options["nodes"] == "2" and options["ntasks-per-node"] == "1", "one task per node"
    assert options["gpus-per-node"] == "8" and options["cpus-per-task"] == "64"
    assert options["mem"] == "480GB" and options["time"] == "120"
    assert options["array"] == "0-1%2", "the two jobs of the sweep as one array"
    assert options["output"].startswith(f"{sweep.resolve()}/.submitit/"), "logs in the sweep dir"
    assert "source .venv/bin/activate" in script.split("# command")[0], "the setup lines run first"
    assert re.search(r"^srun .* -m submitit\.core\._submit ", script, re.MULTILINE)


def test_a_job_reads_its_nodes_from_slurm():
    cfg = SimpleNamespace(nnodes=1, node_rank=0, rdzv_endpoint="localhost:0")
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_NNODES": "3",
        "SLURM_NODEID": "2",
        "SLURM_JOB_NODELIST": "gpu[07-09]",
    }
    assert node_layout(cfg, slurm) == NodeLayout(nnodes=3, node_rank=2, rdzv_endpoint="gpu07:24242")
    # one node, a shell inside the allocation (salloc: no job step), or no Slurm: the launcher settings
    assert node_layout(cfg, {**slurm, "SLURM_NNODES": "1"}) == NodeLayout(1, 0, "localhost:0")
    in_salloc_shell = {k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}
    assert node_layout(cfg, in_salloc_shell) == NodeLayout(1, 0, "localhost:0")
    assert node_layout(cfg, {}) == NodeLayout(1, 0, "localhost:0")
    assert first_slurm_host("node12") == "node12"
    assert first_slurm_host("a[3,5-6],b1") == "a3"
    assert first_slurm_host("gpu-[001-004]") == "gpu-001"
