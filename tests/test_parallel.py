"""Parallel strategies (wan_exp/parallel): equivalence with one rank, invalid settings, GPU init.

The equivalence checks run in ONE torchrun launch of 2 CPU ranks (gloo):
tests/dist/strategy_equivalence.py says what each case checks.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wan_exp.config import ConfigError, validate
from wan_exp.config import compose_config as compose_experiment

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3


def compose_config(*overrides: str):
    return compose_experiment(overrides)


def test_every_strategy_equals_the_single_rank_model():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
           str(REPO / "tests" / "dist" / "strategy_equivalence.py")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=170,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "ALL 9 STRATEGY CASES MATCH (token counts [147, 209])" in proc.stdout, output[-6000:]


@pytest.mark.parametrize("world_size, overrides, message", [
    (8, ["parallel=ulysses"], "parallel.ulysses_degree=8 does not divide model.num_heads=4"),
    (2, ["parallel=ulysses", "parallel.fsdp.enabled=true"], "does not fit parallel=ulysses: it does not shard"),
    (2, ["parallel=fsdp_fixed", "parallel.fsdp.enabled=false"], "set parallel.fsdp.enabled=true"),
    (2, ["parallel=fsdp_fixed", "parallel.ulysses_degree=2"], "use parallel=hybrid to combine Ulysses with FSDP"),
    (2, ["parallel=fsdp", "parallel.fsdp.api=fsdp2"], "sync_module_states=true is an FSDP1 option"),
    (4, ["parallel=hybrid", "parallel.ulysses_degree=2", "parallel.fsdp.degree=1"],
     "hybrid degrees ulysses=2 x fsdp=1 must equal the world size 4"),
    (2, ["parallel=single"], "parallel=single runs one rank, got 2"),
])
def test_invalid_combinations_fail_before_launch(world_size, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(*overrides), world_size)
    assert message in str(err.value)


@pytest.mark.parametrize("world_size, overrides", [
    (2, ["parallel=ulysses"]), (2, ["parallel=fsdp_fixed"]), (2, ["parallel=fsdp"]),
    (2, ["parallel=fsdp_fixed", "parallel.fsdp.api=fsdp2"]), (2, ["parallel=hybrid"]),
    (8, ["parallel=hybrid", "parallel.ulysses_degree=4", "parallel.fsdp.degree=2"]),
    (1, ["parallel=single"]),
])
def test_shipped_combinations_are_valid(world_size, overrides):
    validate(compose_config(*overrides), world_size)


def test_upstream_fsdp_on_cpu_is_a_clear_error_before_any_collective():
    """FSDP1 refuses sync_module_states=True on the CPU with a ValueError deep in its
    init; setup_parallel says what to do instead, before touching a process group."""
    from wan_exp.parallel.registry import setup_parallel
    from wan_exp.runtime import RankContext

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
    from wan_exp.runtime import RankContext

    cfg = compose_config("model=s2v_14b", f"parallel={strategy}")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    ctx = RankContext(cfg, 0, 0, 1, device, None)
    parallel_model = setup_parallel(cfg, ctx)
    dit_gib = sum(p.numel() * p.element_size() for p in parallel_model.dit.parameters()) / GIB
    print(f"{strategy}: phases {ctx.metrics.init_phases_s} param_gib {ctx.metrics.notes['param_gib']:.1f} "
          f"dit_gib {dit_gib:.1f} peak_allocated_gib {torch.cuda.max_memory_allocated() / GIB:.1f}")
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
