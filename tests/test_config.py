"""Config groups compose against the schema; rank environment and rank counts are decided right."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from wan_exp.config import ConfigError, ExperimentConfig, register_configs
from wan_exp.host.agent import launch_config
from wan_exp.host.envvars import JOB_DIR_VAR, rank_environment
from wan_exp.host.job import agent_spec, node_layout
from wan_exp.preflight import JobShape, check_launch_settings, ranks_per_node, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("model", "parallel", "nccl", "allocator", "workload", "logger", "fault")


def _compose(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_group_option_composes_and_validates(group, option, tmp_path):
    extra = []
    if (group, option) == ("workload", "upstream"):  # needs a checkout and a checkpoint folder
        from upstream_standin import write_checkout, write_checkpoint_folder

        extra = [
            f"workload.repo={write_checkout(tmp_path / 'repo')}",
            f"model.checkpoint_dir={write_checkpoint_folder(tmp_path / 'ckpt')}",
        ]
    cfg = _compose(f"{group}={option}", *extra)
    world_size = {"single": 1}.get(str(cfg.parallel.name), 2)
    validate(cfg, world_size)
    check_launch_settings(cfg, gpus=2)  # fault=oom needs a GPU: give it two
    # the option chosen is the one composed: each group's config names itself
    label = cfg[group][{"logger": "mode", "fault": "kind"}.get(group, "name")]
    assert getattr(label, "name", label) == option


def test_the_default_config_is_tiny_ulysses_through_torchrun():
    cfg = _compose()
    assert (cfg.model.name, cfg.parallel.name, cfg.workload.name.name) == ("tiny", "ulysses", "generate")
    assert cfg.launcher.nproc_per_node == "auto" and cfg.fault.kind.name == "none"


def test_ranks_per_node():
    cfg = OmegaConf.structured(ExperimentConfig)
    cfg.parallel.name, cfg.parallel.ulysses_degree = "ulysses", -1
    assert ranks_per_node(cfg, gpus=0) == 2  # auto on a CPU machine
    assert ranks_per_node(cfg, gpus=8) == 8  # auto = visible GPUs
    cfg.launcher.nproc_per_node = "3"
    assert ranks_per_node(cfg, gpus=0) == 3  # CPU ranks are not limited by GPUs
    cfg.parallel.name, cfg.parallel.ulysses_degree = "single", 1
    assert ranks_per_node(cfg, gpus=8) == 1  # a split of one rank always runs one rank
    cfg.launcher.nproc_per_node = "two"
    with pytest.raises(ConfigError, match="launcher.nproc_per_node='two'"):
        ranks_per_node(cfg, gpus=0)


def test_rank_environment(tmp_path, caplog):
    cfg = _compose(
        "nccl=seed", "allocator=expandable", "nccl.flight_recorder=true", "+nccl.env.TORCH_NCCL_ASYNC_ERROR_HANDLING=3"
    )
    with caplog.at_level(logging.WARNING):
        env, _thread_warnings = rank_environment(cfg, tmp_path, nproc_per_node=2)
    # deprecated names become TORCH_NCCL_*; a value set under the new name wins
    assert "NCCL_BLOCKING_WAIT" not in env and "NCCL_ASYNC_ERROR_HANDLING" not in env
    assert env["TORCH_NCCL_BLOCKING_WAIT"] == "1" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert "deprecated NCCL_BLOCKING_WAIT" in caplog.text and "deprecated NCCL_ASYNC_ERROR_HANDLING" in caplog.text
    # both allocator names, the flight recorder into the job dir, the job dir itself
    assert (
        env["PYTORCH_ALLOC_CONF"] == env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True,max_split_size_mb:512"
    )
    assert int(env["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0 and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"].startswith(str(tmp_path / "nccl_trace"))
    assert env[JOB_DIR_VAR] == str(tmp_path)


def test_default_profiles_set_no_allocator_or_trace_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's choice is left alone
    env, _thread_warnings = rank_environment(_compose(), tmp_path, nproc_per_node=2)
    assert env == {JOB_DIR_VAR: str(tmp_path)}
    monkeypatch.delenv("OMP_NUM_THREADS")
    env, _thread_warnings = rank_environment(_compose(), tmp_path, nproc_per_node=2)
    assert env["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))  # the cores it may use


@pytest.mark.parametrize("backend,expected_rdzv", [("c10d", {"is_host": False}), ("static", {"rank": 1})])
def test_multi_node_settings_reach_the_agent(tmp_path, backend, expected_rdzv):
    cfg = _compose(
        "launcher.nnodes=2",
        "launcher.node_rank=1",
        "launcher.rdzv_endpoint=node0:29500",
        f"launcher.rdzv_backend={backend}",
        "launcher.max_restarts=2",
        "launcher.nproc_per_node=4",
    )
    check_launch_settings(cfg, gpus=4)
    layout = node_layout(cfg.launcher, environ={})
    spec = agent_spec(cfg, tmp_path / "sweep" / "3", 3, layout, JobShape(4, 8, "nccl"), node_id="n1")
    agent = launch_config(spec)
    assert (agent.min_nodes, agent.max_nodes, agent.nproc_per_node, agent.max_restarts) == (2, 2, 4, 2)
    assert (agent.rdzv_backend, agent.rdzv_endpoint) == (backend, "node0:29500")
    assert expected_rdzv.items() <= agent.rdzv_configs.items()
    assert agent.logs_specs.root_log_dir == str(tmp_path / "sweep" / "3" / "logs" / "node_1")
    assert agent.run_id == "wan-exp-sweep-3", "the same on every host of the job"
    if backend == "c10d":
        assert agent.rdzv_configs["join_timeout"] == 120, "launcher.rdzv_timeout_s bounds the rendezvous"
