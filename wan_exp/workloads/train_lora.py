"""The `train_lora` workload: LoRA adapters (peft) on the DiT, flow-matching loss.

- Adapters are injected with ``peft.inject_adapter_in_model`` through ``before_wrap``, so
  the DiT keeps its own module names and FSDP sees the adapters when it wraps. Targets are
  a regex (``workload.lora.target_regex``, docs/facts.md §9); the matched module names go into
  the workload info. peft freezes every base weight; only ``lora_A`` / ``lora_B`` train.
- Loss (flow matching, as in the sampler): ``x_sigma = (1 - sigma) x0 + sigma noise``, the
  DiT predicts ``noise - x0``; mean squared error over the whole latent.
- Every rank draws the same inputs (same seed). Gradients then come out right as follows:
  * sequence parallel (Ulysses, ring, USP): each rank backpropagates only through its own
    tokens (the sequence gather's gradient is this rank's slice), so the adapter gradients
    are summed over the sequence-parallel (ring x ulysses) group;
  * FSDP averages gradients over its group. Where that group contains the sequence group
    (FSDP over all ranks), the average already adds the token slices, divided by the
    sequence-parallel degree (cfg replicas add identical copies, divided by their number):
    the loss is scaled up by that degree. Where it does not (an own fsdp mesh axis),
    FSDP's average is over identical replicas and the sequence-parallel sum follows.
  * CFG parallel: training has no guidance (one forward per step), so the two cfg groups
    train as identical replicas: same inputs, same gradients, same updates.
  So the gradients before the optimiser equal single-rank ones (tests/test_train_lora.py).
- AdamW over the adapter parameters only; ``workload.steps`` optimiser steps.
- ``workload.lora.save``: rank 0 writes ``<job_dir>/lora_adapter`` in peft's format
  (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
  ``PeftModel.from_pretrained``), full adapter weights gathered from FSDP shards.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from wan_exp.geometry import JobGeometry, job_geometry
from wan_exp.metrics.flops import dit_forward_flops
from wan_exp.parallel.materialise import gather_rows, local_param_bytes
from wan_exp.parallel.registry import ParallelModel, setup_parallel
from wan_exp.rank.numerics import check_finite
from wan_exp.workloads.inputs import (
    ClipInputs,
    clip_audio,
    encode_job_inputs,
    input_seed,
    random_latents,
    workload_step,
)
from wan_exp.workloads.sampler import shift_sigma

ADAPTER_DIR = "lora_adapter"
ADAPTER_NAME = "default"  # peft's name for the one adapter inject_adapter_in_model adds
# PeftModel.save_pretrained prefixes every key with the wrapper's attribute path.
PEFT_KEY_PREFIX = "base_model.model."
# Training FLOPs per step = this x one forward: the usual forward + 2x backward convention.
# The frozen base skips its weight gradients, so this overstates the work by up to a
# third; compare training MFU with training MFU only.
TRAIN_FLOPS_PER_FORWARD = 3


def lora_config(lora_cfg: Any) -> LoraConfig:
    """peft's LoraConfig from ``workload.lora`` (target_modules as a regex string: peft
    then matches it against the full module name with re.fullmatch)."""
    try:
        re.compile(lora_cfg.target_regex)
    except re.error as exc:
        raise ValueError(f"workload.lora.target_regex={lora_cfg.target_regex!r} is not a valid regex: {exc}") from None
    return LoraConfig(
        r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout, target_modules=lora_cfg.target_regex
    )


def inject_lora(dit: nn.Module, lora_cfg: Any, seed: int) -> list[str]:
    """Add LoRA adapters to ``dit`` in place; return the names of the adapted modules.

    peft draws lora_A from torch's global generator: seeding it makes the adapters the
    same on every rank (Ulysses replicas must agree) and in every run."""
    device = next(dit.parameters()).device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            inject_adapter_in_model(lora_config(lora_cfg), dit, adapter_name=ADAPTER_NAME)
    except ValueError as exc:
        if "not found in the base model" not in str(exc):
            raise
        raise ValueError(
            f"workload.lora.target_regex={lora_cfg.target_regex!r} matches no module of the DiT; "
            "module names look like 'blocks.0.self_attn.q' or 'blocks.0.ffn.0'"
        ) from None
    return [name for name, module in dit.named_modules() if isinstance(module, BaseTunerLayer)]


def adapter_parameters(dit: nn.Module) -> list[nn.Parameter]:
    """The trainable (adapter) parameters; everything else is frozen by peft."""
    return [p for p in dit.parameters() if p.requires_grad]


def loss_scale_and_sp_group(
    cfg: Any, parallel_model: ParallelModel, world_size: int
) -> tuple[float, Optional[dist.ProcessGroup]]:
    """(factor on the loss before backward, group to sum adapter gradients over or None);
    see the module docstring for why."""
    dims = parallel_model.dims
    if dims.sp == 1:
        return 1.0, None
    if dims.fsdp_enabled and dims.fsdp_over_all_ranks:
        return float(dims.sp), None
    return 1.0, parallel_model.sp_group


def sum_gradients(params: list[nn.Parameter], group: dist.ProcessGroup) -> None:
    """All-reduce (sum) each parameter's gradient over ``group``, in place. FSDP2 leaves
    DTensor gradients; their local shard is what this rank holds and updates."""
    for p in params:
        if p.grad is None:
            continue
        local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        dist.all_reduce(local, group=group)


def training_inputs(cfg: Any, geometry: JobGeometry, parallel_model: ParallelModel, device: torch.device) -> ClipInputs:
    """One clip that continues a video: the first clip's text, audio and reference, plus
    random motion latents (so the token count is that of a clip after the first)."""
    inputs = encode_job_inputs(cfg, geometry, parallel_model, device)
    inputs.audio = clip_audio(inputs.audio, 0, cfg.workload.frames_per_clip)
    if cfg.model.s2v:
        inputs.motion = random_latents(geometry.motion_shape, input_seed(cfg, "motion"), device, inputs.latents.dtype)
    return inputs


def flow_matching_loss(dit: nn.Module, inputs: ClipInputs, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """MSE between the DiT's predicted velocity and ``noise - x0`` at noise level sigma."""
    x0 = inputs.latents
    noisy = (1.0 - sigma) * x0 + sigma * noise
    timestep = torch.full((x0.shape[0],), sigma * 1000.0, device=x0.device)
    flow = dit(noisy, timestep, inputs.context, audio=inputs.audio, ref=inputs.ref, motion=inputs.motion)
    return F.mse_loss(flow.float(), (noise - x0).float())


def train_step(
    dit: nn.Module,
    inputs: ClipInputs,
    generator: torch.Generator,
    shift: float,
    loss_scale: float,
    sp_group: Optional[dist.ProcessGroup],
) -> torch.Tensor:
    """Forward, backward and gradient reduction of one step (no optimiser). Returns the
    detached loss, still on the device (the caller's finiteness check is the step's one
    extra device sync)."""
    sigma = shift_sigma(torch.rand((), generator=generator).item(), shift)
    noise = torch.randn(inputs.latents.shape, generator=generator).to(inputs.latents)
    loss = flow_matching_loss(dit, inputs, sigma, noise)
    (loss * loss_scale).backward()
    if sp_group is not None:
        sum_gradients(adapter_parameters(dit), sp_group)
    return loss.detach()


def full_adapter_state_dict(dit: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter weight, whole, on the CPU; a collective under FSDP (every rank calls it).

    Gathered to every rank (adapters are small): FSDP1's rank-0-only CPU offload crashed
    (segmentation fault) on CPU ranks with torch 2.13. FSDP still unshards one unit at a
    time, so the frozen base is never whole in memory. FSDP2's adapters are gathered with
    c10d (materialise.gather_rows), which also holds for gloo ranks sharing a GPU."""
    if any(isinstance(p, DTensor) for p in dit.parameters()):  # FSDP2: names unchanged, rows gathered by c10d
        return {name: gather_rows(p.detach()).cpu() for name, p in dit.named_parameters() if p.requires_grad}
    options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
    return {k: v.detach().cpu() for k, v in get_model_state_dict(dit, options=options).items()}


def save_adapter(state_dict: dict[str, torch.Tensor], lora_cfg: Any, folder: Path) -> Path:
    """Write ``folder`` as PeftModel.save_pretrained would: adapter_config.json and
    adapter_model.safetensors with keys ``base_model.model.<module>.lora_A.weight``
    (peft's saved names carry no adapter name; in the model it is ``lora_A.default``)."""
    adapter = f".{ADAPTER_NAME}."
    tensors = {
        PEFT_KEY_PREFIX + key.replace(adapter, "."): value.contiguous()
        for key, value in state_dict.items()
        if ".lora_" in key
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    lora_config(lora_cfg).save_pretrained(str(folder))
    return folder


def _tensor_bytes(tensors: Any) -> int:
    local = (t.to_local() if isinstance(t, DTensor) else t for t in tensors if isinstance(t, torch.Tensor))
    return sum(t.numel() * t.element_size() for t in local)


def train_state_bytes(dit: nn.Module, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> dict:
    """This rank's training memory by kind, in bytes of its own shards: every parameter of the
    DiT, the trainable ones, their gradients and the optimiser's state (AdamW: two moments)."""
    return {
        "parameters": local_param_bytes(dit),
        "trainable": _tensor_bytes(params),
        "gradients": _tensor_bytes(p.grad for p in params),
        "optimizer_state": _tensor_bytes(v for state in optimizer.state.values() for v in state.values()),
    }


def run_train_lora(cfg: Any, ctx: Any) -> dict:
    wl = cfg.workload
    geometry = job_geometry(cfg)
    adapters: dict[str, Any] = {}

    def before_wrap(dit: nn.Module) -> None:  # on the whole, unsharded DiT
        adapters["matched"] = inject_lora(dit, wl.lora, cfg.seed)
        adapters["parameters"] = sum(p.numel() for p in adapter_parameters(dit))

    parallel_model = setup_parallel(cfg, ctx, before_wrap=before_wrap)
    dit = parallel_model.dit
    params = adapter_parameters(dit)
    optimizer = torch.optim.AdamW(params, lr=wl.lora.lr)
    loss_scale, sp_group = loss_scale_and_sp_group(cfg, parallel_model, ctx.world_size)

    with ctx.phase("encode"):
        inputs = training_inputs(cfg, geometry, parallel_model, ctx.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for i in range(wl.steps):
        with workload_step(ctx, i, wl.warmup_steps):
            losses.append(train_step(dit, inputs, generator, wl.shift, loss_scale, sp_group))
            check_finite(losses[-1], "training loss")  # before the optimiser spreads it into the adapters
            optimizer.step()
            if i == wl.steps - 1:  # gradients and optimiser state exist now, not after zero_grad
                ctx.metrics.note("train_state_bytes", train_state_bytes(dit, params, optimizer))
            optimizer.zero_grad(set_to_none=True)

    saved = None
    if wl.lora.save:
        state = full_adapter_state_dict(dit)
        if ctx.rank == 0 and ctx.job_dir is not None:
            saved = str(save_adapter(state, wl.lora, ctx.job_dir / ADAPTER_DIR))

    info = {
        "tokens_per_forward": geometry.tokens(with_motion=True),
        "forwards_per_step": 1,
        "forwards_per_step_per_rank": 1,  # cfg groups are replicas here
        "flops_per_step": TRAIN_FLOPS_PER_FORWARD
        * dit_forward_flops(cfg.model, **geometry.flops_args(with_motion=True)),
        "video_seconds_per_step": geometry.seconds_per_clip,
        "lora_matched_modules": adapters["matched"],
        "lora_trainable_parameters": adapters["parameters"],
        "losses": [loss.item() for loss in losses],
        "adapter_dir": saved,
    }
    ctx.metrics.set_workload_info(**info)
    return info
