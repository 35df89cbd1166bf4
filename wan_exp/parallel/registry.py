"""The one place that turns the split's degrees into a built, loaded and split model.

Every split follows the same path (docs/facts.md §3), driven by ``ParallelDims`` (the degrees,
parallel/dims.py) and the loading path of ``parallel.fsdp``; no code looks at the preset's
name, so a preset is one YAML file under conf/parallel/:

    build the DiT on the meta device            phase "build"
    read its weights (all, or this rank's part) phase "load"
    before_wrap(dit)                            (train_lora injects peft adapters here)
    split it: sequence sharding and/or FSDP     phase "wrap"

- FSDP off (``parallel.fsdp.degree=0``: single, ulysses, cfg, usp, cfg_ulysses): every rank
  loads the whole DiT onto its device; sequence parallelism (Ulysses, ring or both) sets
  ``dit.sequence_sharding`` when ring x ulysses is above 1.
- FSDP on (fsdp, fsdp_fixed, hybrid): FSDP over all ranks or its own "fsdp" mesh axis,
  plus sequence parallelism and CFG parallel where the degrees ask for them.
  ``parallel.fsdp.load_full_on_every_rank`` picks upstream's full load on the CPU (fsdp)
  or shard-only loading (fsdp_fixed, hybrid); for the latter ``before_wrap`` runs before
  the weights are read: it sees the model's structure with zero placeholders as base
  weights (see materialise.py).

CFG parallel needs no change to the DiT: ``ParallelModel.guidance`` is what the generate
workload combines the two forwards of a step with (parallel/cfg.py). The settings are
checked before launch by ``preflight.validate``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from wan_exp.config import Placement
from wan_exp.models.checkpoint import open_weights
from wan_exp.models.encoders import build_audio_encoder, build_text_encoder
from wan_exp.models.precision import DriftCheck, setup_precision
from wan_exp.models.wan_s2v import WanModel, apply_compile
from wan_exp.parallel.cfg import guidance_for
from wan_exp.parallel.dims import ParallelDims, ParallelMesh, parallel_dims
from wan_exp.parallel.fsdp import shard_dit, torch_dtype
from wan_exp.parallel.materialise import WeightPlan, local_param_bytes, plan_weights
from wan_exp.parallel.ulysses import SequenceSharding
from wan_exp.preflight import check_fsdp_device
from wan_exp.units import GIB

BeforeWrap = Callable[[nn.Module], None]


@dataclass
class ParallelModel:
    dit: nn.Module  # wrapped / sequence-sharded DiT, call it like the model
    text_encoder: nn.Module | None  # placed per parallel.text_encoder_placement
    audio_encoder: nn.Module | None  # placed per parallel.audio_encoder_placement
    sp_group: ProcessGroup | None  # sequence-parallel group, ring x ulysses (None when 1)
    mesh: DeviceMesh | None  # (dp, cfg, fsdp, ring, ulysses) mesh; None when nothing is split
    dims: ParallelDims  # the degrees of the split
    cfg_group: ProcessGroup | None  # this rank's cfg pair (None when cfg_degree is 1)
    # parallel.cfg.guided_flow's signature (dit, latents, timestep, cond, uncond, scale) -> guided flow:
    # sequential, or CFG-parallel over cfg_group
    guidance: Callable[..., torch.Tensor]
    drift: DriftCheck | None = None  # the bf16 reference of workload.drift_check (models/precision.py)
    # the ranks of this rank's dp group, for the clip's collectives outside the DiT (the VAE's);
    # None: the default group is the clip's (parallel.dp_degree=1), or the clip has one rank
    clip_group: ProcessGroup | None = None


def setup_parallel(cfg: Any, ctx: Any, before_wrap: BeforeWrap | None = None) -> ParallelModel:
    """Build, load and split the model on this rank as the split's degrees say."""
    check_fsdp_device(cfg.parallel.fsdp, ctx.device.type)  # before the first collective
    dims = parallel_dims(cfg, ctx.world_size)
    meshes = dims.build_mesh(ctx.device.type)
    dit = _split_dit(cfg, ctx, dims, meshes, before_wrap or (lambda dit: None))
    drift = setup_precision(dit, cfg, ctx)  # model.precision, from outside the model
    ctx.metrics.note(
        "parallel_dims", {**dims.degrees, "fsdp_shard_ranks": dims.fsdp_shard_ranks, "describe": dims.describe()}
    )
    text_encoder, audio_encoder = _encoders(cfg, ctx)
    dit_bytes = local_param_bytes(dit)
    encoder_bytes = sum(
        local_param_bytes(enc)
        for enc in (text_encoder, audio_encoder)
        if enc is not None and next(enc.parameters()).device == ctx.device
    )
    ctx.metrics.note("dit_param_gib", dit_bytes / GIB)  # this rank's part of the DiT
    ctx.metrics.note("param_gib", (dit_bytes + encoder_bytes) / GIB)  # all in this rank's device memory
    cfg_group = meshes.cfg if meshes is not None else None
    return ParallelModel(
        dit,
        text_encoder,
        audio_encoder,
        sp_group=meshes.sp if meshes is not None else None,
        mesh=meshes.mesh if meshes is not None else None,
        dims=dims,
        cfg_group=cfg_group,
        guidance=guidance_for(cfg_group),
        drift=drift,
        clip_group=meshes.clip if meshes is not None else None,
    )


def _build_dit(cfg: Any, ctx: Any, load_device: torch.device) -> tuple[nn.Module, WeightPlan]:
    """The DiT on the meta device with zero placeholders on ``load_device``, and its plan."""
    with ctx.phase("build"):
        with torch.device("meta"):
            dit = WanModel(cfg.model)
        apply_compile(dit, cfg.model)
        plan = plan_weights(dit, open_weights(cfg.model), torch_dtype(cfg.model.dtype), load_device)
    return dit, plan


def _sequence_sharding(dit: nn.Module, meshes: ParallelMesh | None) -> None:
    if meshes is not None and meshes.sp is not None:
        dit.sequence_sharding = SequenceSharding(meshes.sp, meshes.ulysses, meshes.ring)


def _split_dit(
    cfg: Any, ctx: Any, dims: ParallelDims, meshes: ParallelMesh | None, before_wrap: BeforeWrap
) -> nn.Module:
    """The DiT built, loaded and split: whole on every rank's device without FSDP; with FSDP
    sharded over all ranks or the "fsdp" axis, after upstream's full load into host memory
    (``load_full_on_every_rank``) or unit by unit with no rank holding the whole model."""
    fsdp_cfg = cfg.parallel.fsdp
    full_load = not dims.fsdp_enabled or bool(fsdp_cfg.load_full_on_every_rank)
    # upstream's full load puts the whole model in host memory on every rank; FSDP then
    # moves it to the GPU. Without FSDP and with shard-only loading it goes to the device.
    dit, plan = _build_dit(cfg, ctx, torch.device("cpu") if dims.fsdp_enabled and full_load else ctx.device)
    if full_load:
        with ctx.phase("load"):
            plan.load(dit)
            plan.check_all_loaded()
    before_wrap(dit)
    if not dims.fsdp_enabled:
        with ctx.phase("wrap"):
            _sequence_sharding(dit, meshes)
        return dit
    _sequence_sharding(dit, meshes)
    return shard_dit(dit, meshes.fsdp, fsdp_cfg, ctx.device, plan, ctx.phase)


def _encoders(cfg: Any, ctx: Any) -> tuple[nn.Module | None, nn.Module | None]:
    """Text and audio encoders, each on the device or the CPU as the config places it.
    They come after the DiT is split (its phases first); their time adds to "load"."""

    def place(placement) -> torch.device:
        return ctx.device if placement == Placement.device else torch.device("cpu")

    model, dtype = cfg.model, torch_dtype(cfg.model.dtype)
    with ctx.phase("load"):
        text = build_text_encoder(model, place(cfg.parallel.text_encoder_placement), dtype, model.seed)
        # wav2vec2 runs in fp32 whatever the DiT's dtype, as upstream S2V
        audio = (
            build_audio_encoder(model, place(cfg.parallel.audio_encoder_placement), torch.float32, model.seed)
            if model.s2v
            else None
        )
    return text, audio
