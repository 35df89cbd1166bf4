"""FSDP over the DiT: one unit per transformer block plus the root (everything else).

Two ways to get the weights in, chosen by ``parallel.fsdp.load_full_on_every_rank``:

- full load (``parallel=fsdp``, upstream Wan): every rank loads the whole model on the CPU,
  then FSDP1 moves each unit to the GPU and, with ``sync_module_states=True``, broadcasts
  rank 0's values. This is the configuration users report hanging; it is kept as it is so
  the harness can reproduce and measure it. On the CPU FSDP1 refuses
  ``sync_module_states=True``; wan_exp.preflight.check_fsdp_device says so before anything is built.
- shard-only (``parallel=fsdp_fixed``): no broadcast, and no rank ever holds the whole
  model. FSDP1: each block is loaded in full, wrapped (FSDP keeps this rank's shard and
  frees the rest), then the next one. FSDP2 (``parallel.fsdp.api=fsdp2``): the model is
  sharded on the meta device and each rank reads only its own rows of every parameter.

FSDP1 runs with ``use_orig_params=True`` so that a unit may mix frozen base weights and
trainable LoRA adapters (train_lora); FSDP2 allows that anyway.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecision, MixedPrecisionPolicy, ShardingStrategy, fully_shard

from wan_exp.config import FsdpApi, FsdpConfig
from wan_exp.parallel.materialise import WeightPlan

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def torch_dtype(name) -> torch.dtype:
    """'bf16' (or the DType enum) -> torch.bfloat16."""
    return TORCH_DTYPES[getattr(name, "value", name)]


def shard_dit(
    dit: nn.Module,
    mesh: DeviceMesh,
    fsdp_cfg: FsdpConfig,
    device: torch.device,
    plan: WeightPlan,
    phase: Callable[[str], object],
) -> nn.Module:
    """Shard ``dit`` over ``mesh``; parameters still in ``plan`` are loaded shard-only.

    ``phase(name)`` is ``RankContext.phase``: reading weights is timed as "load",
    wrapping as "wrap" (the FSDP1 shard-only path alternates them, block by block)."""
    if fsdp_cfg.api == FsdpApi.fsdp2:
        return _shard_fsdp2(dit, mesh, fsdp_cfg, device, plan, phase)
    return _shard_fsdp1(dit, mesh, fsdp_cfg, device, plan, phase)


def _shard_fsdp1(dit, mesh, fsdp_cfg, device, plan, phase) -> FSDP:
    settings = dict(
        process_group=mesh.get_group(),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        mixed_precision=MixedPrecision(
            param_dtype=torch_dtype(fsdp_cfg.param_dtype),
            reduce_dtype=torch_dtype(fsdp_cfg.reduce_dtype),
            buffer_dtype=torch.float32,
        ),
        device_id=device,
        sync_module_states=fsdp_cfg.sync_module_states,
        use_orig_params=True,
    )
    shard_only = bool(plan.pending)  # full load: everything is in memory already

    def load_and_wrap(unit: nn.Module) -> FSDP:
        if shard_only:
            with phase("load"):
                plan.load(unit)  # the whole unit; FSDP keeps this rank's shard of it
        with phase("wrap"):
            return FSDP(unit, **settings)

    # one unit per block, then the root takes what is left (as upstream's lambda policy)
    for index, block in enumerate(dit.blocks):
        dit.blocks[index] = load_and_wrap(block)
    root = load_and_wrap(dit)
    plan.check_all_loaded()
    return root


def _shard_fsdp2(dit, mesh, fsdp_cfg, device, plan, phase) -> nn.Module:
    shard_only = bool(plan.pending)  # full load: fully_shard shards the loaded values
    if shard_only:
        plan.to_meta(dit)
    policy = MixedPrecisionPolicy(
        param_dtype=torch_dtype(fsdp_cfg.param_dtype), reduce_dtype=torch_dtype(fsdp_cfg.reduce_dtype)
    )
    with phase("wrap"):
        for block in dit.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(dit, mesh=mesh, mp_policy=policy)
    if shard_only:
        with phase("load"):
            dit.to_empty(device=device)
            plan.fill_local_shards()
    return dit
