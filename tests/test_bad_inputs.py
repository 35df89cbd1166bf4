"""Every bad input fails fast with a message naming the problem, and no result claims success.

Settings that are wrong on their own or together fail while the config is composed
(Hydra, against the schema) or checked (wan_exp.preflight.check_job, which the launcher's
batch check runs for every job before any worker starts): those are checked in-process.
A few end-to-end runs prove the launch path refuses before any job dir exists.
Checkpoint problems surface in the ranks (the model loader); their job must be failed
with the loader's message as root cause.
"""

from __future__ import annotations

import json

import psutil
import pytest
import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launch_helpers import completed_results, job_results, output, run_launch
from wan_exp.config import ConfigError, ExperimentConfig, compose_config
from wan_exp.preflight import check_job, ranks_per_node

BAD_OVERRIDES = [
    # (overrides, what the message must say)
    (["model.dimm=3"], "Key 'dimm' not in 'ModelConfig'"),
    (["model.dim=abc"], "model.dim"),
    (["parallel=foo"], "Could not find 'parallel/foo'"),
    (["model.attention_backend=foo"], "Invalid value 'foo'"),
    (["logger.mode=sometimes"], "Invalid value 'sometimes'"),
    (
        ["parallel.ulysses_degree=3"],
        "ulysses=3 = 3 ranks, but the job has 2; with cfg=1 and fsdp=1 this works: "
        "parallel.ulysses_degree=2 parallel.ring_degree=1",
    ),
    (
        ["parallel.ulysses_degree=-1", "launcher.nproc_per_node=3"],
        "parallel.ulysses_degree=3 does not divide the 4 heads (model.num_heads); "
        "parallel.ulysses_degree=1 parallel.ring_degree=3 does",
    ),
    (["launcher.nproc_per_node=abc"], "launcher.nproc_per_node='abc'"),
    (["launcher.nproc_per_node=0"], "launcher.nproc_per_node='0'"),
    (["workload.size=100*64"], "workload.size='100*64': height 100 must be a positive multiple of 16"),
    (["workload.size=big"], "workload.size='big' is not H*W"),
    (["workload.frames_per_clip=6"], "workload.frames_per_clip=6 must be a positive multiple of 4"),
    (["workload.sample_steps=0"], "workload.sample_steps=0 must be >= 1"),
    (["fault=raise", "fault.rank=2"], "fault.rank=2 is outside 0..1"),
    (["fault=raise", "fault.phase=compile"], "fault.phase='compile' is not a phase"),
    (["fault=signal", "fault.signal=SIGNOPE"], "fault.signal='SIGNOPE' is not a signal name"),
    (["launcher.rdzv_endpoint=nohost"], "launcher.rdzv_endpoint='nohost' is not host:port"),
    (["launcher.hang_timeout_s=0"], "launcher.hang_timeout_s=0.0 must be > 0"),
    (["workload=init", "fault=raise", "fault.phase=step"], "fault.phase=step never happens in workload=init"),
    (["parallel=fsdp"], "parallel.fsdp.sync_module_states=true needs GPUs"),
    (["launcher.nnodes=2"], "the other nodes cannot reach it"),
    (["+unknown=1"], "unknown is not a setting of the experiment config"),
    (["workload.sample_steps=2", "workload.warmup_steps=2"], "workload.warmup_steps=2 but workload=generate runs 2"),
    (
        ["parallel=hybrid", "parallel.ulysses_degree=2", "parallel.fsdp.degree=3", "launcher.nproc_per_node=4"],
        "cfg x fsdp = 3 does not divide 4 ranks; use degrees whose product is 4",
    ),
]


@pytest.mark.parametrize("overrides,message", BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_override_is_refused_by_the_schema_or_the_job_check(overrides, message):
    """What the launcher's batch check does for each job, on this (GPU-less) machine."""
    with pytest.raises((ConfigError, HydraException, OmegaConfBaseException)) as caught:
        check_job(compose_config(overrides), gpus=0)
    told = f"{caught.value} {caught.value.__cause__}"  # Hydra wraps the schema's own message
    assert message in told, told


@pytest.mark.slow
def test_a_bad_override_stops_launch_py_before_any_worker(tmp_path):
    proc = run_launch(tmp_path, "parallel.ulysses_degree=3", "logger=disabled", timeout=60)
    assert proc.returncode != 0
    assert "bad config, no job started" in output(proc) and "ulysses=3 = 3 ranks, but the job has 2" in output(proc)
    assert "Traceback" not in output(proc)
    assert not (tmp_path / "0").exists(), "no job may start"


@pytest.mark.slow
def test_one_bad_job_stops_the_whole_sweep_before_it_starts(tmp_path):
    proc = run_launch(tmp_path, "workload.frames_per_clip=8,6", "logger=disabled", multirun=True, timeout=60)
    assert proc.returncode != 0
    assert "job 1 (workload.frames_per_clip=6" in output(proc)
    assert not (tmp_path / "0").exists(), "job 0 is fine but must not start either"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine fault=oom is allowed")
def test_oom_fault_without_a_gpu():
    with pytest.raises(ConfigError, match="fault=oom allocates GPU memory until it runs out, but no GPU is visible"):
        check_job(compose_config(["fault=oom"]), gpus=0)


@pytest.mark.skipif(
    torch.cuda.is_available() or psutil.virtual_memory().available > 80 * 1024**3,
    reason="the 14B model's weights (2 ranks x 41.5 GiB) fit on this machine",
)
def test_s2v_14b_on_a_small_cpu_box_fails_before_any_worker(tmp_path):
    proc = run_launch(tmp_path, "model=s2v_14b", "logger=disabled", timeout=120)
    assert proc.returncode != 0
    assert "model=s2v_14b does not fit in host memory" in output(proc) and "GiB is available" in output(proc)
    assert not (tmp_path / "0").exists(), "no job may start"


def test_more_ranks_than_gpus():
    cfg = OmegaConf.structured(ExperimentConfig)
    cfg.parallel.name, cfg.parallel.ulysses_degree = "ulysses", -1  # the degree makes it ulysses
    cfg.launcher.nproc_per_node = "2"
    with pytest.raises(ConfigError, match=r"launcher.nproc_per_node=2 but only 1 GPU\(s\) are visible"):
        ranks_per_node(cfg, gpus=1)


# ----------------------------------------------------------------------------- checkpoints
def _bad_checkpoints(root):
    """Two broken checkpoint folders: unreadable index, truncated shard (a missing folder
    fails before launch: test_missing_input_paths_fail_before_any_worker)."""
    from wan_exp.models.checkpoint import write_checkpoint
    from wan_exp.models.wan_s2v import WanModel

    bad_index = root / "bad_index"
    bad_index.mkdir()
    (bad_index / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": {')
    truncated = root / "truncated"
    model_cfg = OmegaConf.load("conf/model/tiny.yaml")
    model_cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig).model, model_cfg)
    write_checkpoint(WanModel(model_cfg).state_dict(), truncated, shards=2)
    shard = sorted(truncated.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return {"bad_index": bad_index, "truncated": truncated, "shard": shard}


@pytest.mark.slow
def test_bad_checkpoints_fail_their_jobs_with_the_loader_message(tmp_path):
    folders = _bad_checkpoints(tmp_path)
    sweep = tmp_path / "sweep"
    dirs = ",".join(str(folders[k]) for k in ("bad_index", "truncated"))
    proc = run_launch(
        sweep, f"model.checkpoint_dir={dirs}", "parallel=single", "workload=init", "logger=disabled", multirun=True
    )
    assert proc.returncode == 1, output(proc)
    jobs = job_results(sweep)
    assert [r["status"] for r in jobs] == ["failed"] * 2
    expected_names = ["index.json", folders["shard"].name]
    for job, name in zip(jobs, expected_names):
        cause = job["root_cause"]
        assert cause["rank"] == 0 and cause["phase"] in ("build", "load"), cause  # where weights open
        assert name in cause["message"], cause
    assert completed_results(sweep) == []
    assert json.loads((sweep / "0" / "job.json").read_text())["world_size"] == 1


def test_missing_input_paths_fail_before_any_worker(tmp_path):
    for setting in ("model.checkpoint_dir", "workload.audio_path", "workload.image_path"):
        missing = tmp_path / f"no_such_{setting.split('.')[1]}"
        extra = [f"model.checkpoint_dir={tmp_path}"] if setting == "workload.image_path" else []
        with pytest.raises(ConfigError, match=f"{setting}='{missing}' does not exist"):
            check_job(compose_config([f"{setting}={missing}", *extra]), gpus=0)
