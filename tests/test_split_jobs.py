"""The new splits as whole jobs through launch.py (2 CPU ranks, gloo): every workload,
shard-only FSDP loading, fault injection and the hang watchdog; the rank records and
results.json carry the communication counts and the split's degrees."""

from __future__ import annotations

import pytest

from tests.launch_helpers import job_results, output, root_cause, run_launch

HANG_TIMEOUT_S = 8
pytestmark = pytest.mark.slow


def test_usp_generate_completes_with_comm_counts_and_faults_are_caught(tmp_path):
    """Job 0: ring 2 generate completes. Job 1: rank 1 raises entering wrap. Job 2: rank 1
    hangs there while rank 0 goes on to its first forward and waits in the ring exchange: a
    hang blamed on rank 1, the one behind. (A hang injected at the step both ranks enter
    would leave both with the same heartbeat count; which one the heartbeats blame would
    then depend on timing.)"""
    proc = run_launch(
        tmp_path,
        "parallel=usp",
        "workload=generate",
        "logger=disabled",
        "fault=none,raise,hang",
        "fault.rank=1",
        "fault.phase=wrap",
        f"launcher.hang_timeout_s={HANG_TIMEOUT_S}",
        "workload.sample_steps=2",
        multirun=True,
        timeout=300,
    )
    assert proc.returncode == 1, output(proc)  # some job did not complete
    done, raised, hung = job_results(tmp_path)
    assert done["status"] == "completed", done.get("root_cause")
    for record in done["ranks"]:
        assert record["parallel_dims"]["ring"] == 2 and record["attention_lse_backend"] == "lse_math"
        comm = record["comm"]
        # per measured step (2 forwards): per block one send + one recv of k/v, one gather each
        blocks = done["config"]["model"]["num_layers"]
        assert comm["per_step"]["send"]["count"] == comm["per_step"]["recv"]["count"] == 2 * blocks
        assert comm["per_step"]["all_gather"]["count"] == 2
    assert done["summary"]["comm_step_bytes_max"] == max(
        sum(k["bytes"] for k in r["comm"]["per_step"].values()) for r in done["ranks"]
    )
    assert raised["status"] == "failed" and root_cause(raised)[:2] == (1, "wrap")
    assert hung["status"] == "hang" and root_cause(hung)[:2] == (1, "wrap"), hung["root_cause"]


def test_cfg_parallel_with_shard_only_fsdp_generates_trains_and_initialises(tmp_path):
    """cfg 2 x FSDP over both ranks, shard-only loading (fsdp_fixed's path), for every
    workload; FSDP's own all-gathers and reduce-scatters are counted; generate counts the
    job's two forwards per step, one per rank, and its MFU basis is every GPU."""
    proc = run_launch(
        tmp_path,
        "parallel=hybrid",
        "parallel.cfg_degree=2",
        "workload=generate,train_lora,init",
        "logger=disabled",
        "workload.steps=2",
        "workload.sample_steps=2",
        multirun=True,
        timeout=400,
    )
    assert proc.returncode == 0, output(proc)
    generate, train, init = job_results(tmp_path)
    work = generate["ranks"][0]["workload"]
    assert work["forwards_per_step"] == 2 and work["forwards_per_step_per_rank"] == 1
    summary = generate["summary"]
    assert summary["flops_per_step"] == work["flops_per_step"]
    assert summary["tflops_per_gpu"] == pytest.approx(
        work["flops_per_step"] / (summary["step_time_s_median"] * 2 * 1e12)
    )
    # each measured step: the cfg pair's one all-gather of the velocity, besides FSDP's
    assert generate["ranks"][0]["comm"]["per_step"]["all_gather"]["count"] > 1
    for results in (generate, train, init):
        assert results["status"] == "completed"
        assert results["ranks"][0]["parallel_dims"] == {
            "dp": 1,
            "cfg": 2,
            "fsdp": 1,
            "ring": 1,
            "ulysses": 1,
            "fsdp_shard_ranks": 2,
            "describe": "cfg2 x ring1 x ulysses1 x fsdp(all 2)",
        }
    step = train["ranks"][0]["comm"]["per_step"]
    assert step["all_gather"]["count"] > 0 and step["reduce_scatter"]["count"] > 0
    assert train["ranks"][0]["workload"]["forwards_per_step_per_rank"] == 1
    assert init["ranks"][0]["comm"]["per_step"] is None and init["summary"]["comm_step_bytes_max"] is None
