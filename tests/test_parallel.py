"""Parallel strategies (wan_exp/parallel): equivalence with one rank, invalid settings, GPU init.

The equivalence checks run in one torchrun launch of 2 CPU ranks and one of 4 (gloo):
tests/dist/strategy_equivalence.py and tests/dist/split_equivalence.py say what each case checks.
"""

from __future__ import annotations

import gc
import subprocess

import pytest
import torch

from launch_helpers import REPO, torchrun
from wan_exp.config import ConfigError
from wan_exp.config import compose_config as compose_experiment
from wan_exp.parallel.dims import parallel_dims
from wan_exp.preflight import validate
from wan_exp.units import GIB


def compose_config(*overrides: str):
    return compose_experiment(overrides)


def _torchrun(nproc: int, script: str, *args: str) -> subprocess.CompletedProcess:
    return torchrun(nproc, str(REPO / "tests" / "dist" / script), *args)


def _assert_script_prints(nproc: int, script: str, *verdicts: str) -> None:
    """The torchrun script exits 0 and prints every verdict line."""
    proc = _torchrun(nproc, script)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    for verdict in verdicts:
        assert verdict in proc.stdout, output[-6000:]


@pytest.mark.slow
def test_cfg_ring_usp_and_fsdp_mixes_on_4_ranks_equal_one_rank():
    _assert_script_prints(
        4,
        "split_equivalence.py",
        "ALL 6 SPLIT CASES MATCH (token counts [147, 209]; 4 gradient cases)",
        "ok [ring attention alone, lengths [13, 29, 31]]",
    )


@pytest.mark.slow
def test_every_strategy_equals_the_single_rank_model():
    _assert_script_prints(2, "strategy_equivalence.py", "ALL 11 STRATEGY CASES MATCH (token counts [147, 209])")


@pytest.mark.parametrize(
    "world_size, overrides, message",
    [
        (
            8,
            ["parallel=ulysses"],
            "parallel.ulysses_degree=8 does not divide the 4 heads (model.num_heads); "
            "parallel.ulysses_degree=4 parallel.ring_degree=2 does",
        ),
        (
            16,
            ["parallel=ulysses", "model=s2v_14b"],
            "parallel.ulysses_degree=16 does not divide the 40 heads "
            "(model.num_heads); parallel.ulysses_degree=8 parallel.ring_degree=2 does",
        ),
        (
            2,
            ["parallel=fsdp_fixed", "parallel.fsdp.degree=-3"],
            "parallel.fsdp.degree=-3: use 0 (no FSDP), -1 (shard over all ranks, as upstream)",
        ),
        (2, ["parallel=fsdp", "parallel.fsdp.api=fsdp2"], "sync_module_states=true is an FSDP1 option"),
        (
            4,
            ["parallel=hybrid", "parallel.ulysses_degree=2", "parallel.fsdp.degree=1"],
            "degrees cfg=1 x fsdp=1 x ring=1 x ulysses=2 = 2 ranks, but the job has 4; with cfg=1 and fsdp=1 "
            "this works: parallel.ulysses_degree=4 parallel.ring_degree=1",
        ),
        (
            4,
            ["parallel=cfg"],
            "degrees cfg=2 x fsdp=1 x ring=1 x ulysses=1 = 2 ranks, but the job has 4; "
            "with cfg=2 and fsdp=1 this works: parallel.ulysses_degree=2 parallel.ring_degree=1",
        ),
        (
            3,
            ["parallel=usp"],
            "leave no whole number of ranks out of 3; with cfg=1 and fsdp=1 this works: "
            "parallel.ulysses_degree=1 parallel.ring_degree=3",
        ),
        (4, ["parallel=hybrid", "parallel.fsdp.degree=3"], "cfg x fsdp = 3 does not divide 4 ranks"),
        (2, ["parallel=cfg", "parallel.cfg_degree=3"], "parallel.cfg_degree=3: use 1 (off) or 2"),
        (4, ["parallel=usp", "parallel.ring_degree=-1"], "at most one degree can take the ranks the others leave"),
        (2, ["parallel=usp", "parallel.ring_degree=0"], "parallel.ring_degree=0: use -1"),
        (
            2,
            ["parallel=cfg", "workload.guidance_scale=1.0"],
            "parallel.cfg_degree=2 with workload.guidance_scale=1.0: that scale needs one DiT forward per step",
        ),
        (2, ["parallel=single"], "parallel=single runs one rank, got 2"),
    ],
)
def test_invalid_combinations_fail_before_launch(world_size, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(*overrides), world_size)
    assert message in str(err.value)


# world size, overrides, the resolved (cfg, fsdp axis, ring, ulysses), FSDP ranks per copy
@pytest.mark.parametrize(
    "world_size, overrides, degrees, shard_ranks",
    [
        (2, ["parallel=ulysses"], (1, 1, 1, 2), 1),
        (2, ["parallel=fsdp_fixed"], (1, 2, 1, 1), 2),
        (2, ["parallel=fsdp"], (1, 2, 1, 1), 2),
        (2, ["parallel=fsdp_fixed", "parallel.fsdp.api=fsdp2"], (1, 2, 1, 1), 2),
        # a strategy is its degrees: FSDP presets take sequence and CFG degrees, and back
        (2, ["parallel=fsdp_fixed", "parallel.ulysses_degree=2"], (1, 1, 1, 2), 2),
        (4, ["parallel=fsdp_fixed", "parallel.cfg_degree=2", "parallel.ring_degree=2"], (2, 1, 2, 1), 4),
        (2, ["parallel=ulysses", "parallel.fsdp.degree=-1"], (1, 1, 1, 2), 2),
        (8, ["parallel=hybrid", "parallel.ulysses_degree=2"], (1, 4, 1, 2), 8),
        (2, ["parallel=hybrid"], (1, 1, 1, 2), 2),
        (8, ["parallel=hybrid", "parallel.ulysses_degree=4", "parallel.fsdp.degree=2"], (1, 2, 1, 4), 2),
        (1, ["parallel=single"], (1, 1, 1, 1), 1),
        (2, ["parallel=cfg"], (2, 1, 1, 1), 1),
        (4, ["parallel=usp"], (1, 1, 2, 2), 1),
        (8, ["parallel=cfg_ulysses"], (2, 1, 1, 4), 1),
        (16, ["parallel=usp", "model=s2v_14b", "parallel.ulysses_degree=8"], (1, 1, 2, 8), 1),
        (3, ["parallel=usp", "parallel.ring_degree=3"], (1, 1, 3, 1), 1),
        (
            4,
            ["parallel=hybrid", "parallel.ring_degree=2", "parallel.ulysses_degree=1", "parallel.fsdp.degree=2"],
            (1, 2, 2, 1),
            2,
        ),
        (8, ["parallel=hybrid", "parallel.cfg_degree=2", "parallel.ring_degree=2"], (2, 1, 2, 2), 8),
    ],
)
def test_shipped_and_explicit_splits_resolve_to_their_degrees(world_size, overrides, degrees, shard_ranks):
    cfg = compose_config(*overrides)
    validate(cfg, world_size)
    dims = parallel_dims(cfg, world_size)
    assert (dims.cfg, dims.fsdp, dims.ring, dims.ulysses) == degrees
    assert dims.cfg * dims.fsdp * dims.ring * dims.ulysses == world_size
    assert dims.fsdp_shard_ranks == shard_ranks


def test_upstream_fsdp_on_cpu_is_a_clear_error_before_any_collective():
    """FSDP1 refuses sync_module_states=True on the CPU with a ValueError deep in its
    init; setup_parallel says what to do instead, before touching a process group."""
    from wan_exp.parallel.registry import setup_parallel
    from wan_exp.rank.runtime import RankContext

    cfg = compose_config("parallel=fsdp")
    ctx = RankContext(cfg, 0, 0, 2, torch.device("cpu"), None)
    with pytest.raises(ConfigError, match=r"sync_module_states=true needs GPUs.*use parallel=fsdp_fixed"):
        setup_parallel(cfg, ctx)


@pytest.fixture(scope="module")
def one_rank_nccl_group(tmp_path_factory):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_fixed"])
def test_fsdp_strategies_initialise_s2v_14b_on_one_gpu(strategy, one_rank_nccl_group):
    """World size 1, random bf16 weights: init, parameter memory, one small forward."""
    from wan_exp.parallel.registry import setup_parallel
    from wan_exp.rank.runtime import RankContext

    cfg = compose_config("model=s2v_14b", f"parallel={strategy}")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    ctx = RankContext(cfg, 0, 0, 1, device, None)
    parallel_model = setup_parallel(cfg, ctx)
    dit_gib = sum(p.numel() * p.element_size() for p in parallel_model.dit.parameters()) / GIB
    print(
        f"{strategy}: phases {ctx.metrics.init_phases_s} param_gib {ctx.metrics.notes['param_gib']:.1f} "
        f"dit_gib {dit_gib:.1f} peak_allocated_gib {torch.cuda.max_memory_allocated() / GIB:.1f}"
    )
    assert 29.5 < dit_gib < 31.0  # 16.3e9 bf16 parameters = 30.4 GiB, all on this one rank
    model = cfg.model
    g = torch.Generator(device).manual_seed(0)
    frames, lat = 1, 16
    with torch.no_grad():
        out = parallel_model.dit(
            torch.randn(1, 16, frames, lat, lat, device=device, generator=g),
            torch.tensor([500.0], device=device),
            torch.randn(1, model.text_len, model.text_dim, device=device, generator=g),
            audio=torch.randn(1, model.audio_layers, 4 * frames, model.audio_dim, device=device, generator=g),
            ref=torch.randn(1, 16, 1, lat, lat, device=device, generator=g),
        )
    assert out.shape == (1, 16, frames, lat, lat) and torch.isfinite(out).all()
    del parallel_model, out
    gc.collect()  # FSDP modules hold reference cycles; free this model before the next one
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
