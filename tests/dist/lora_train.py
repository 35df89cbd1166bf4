"""LoRA training under every strategy against one rank (tiny S2V model, fp32, gloo CPU).

Run under ``torchrun --nproc_per_node 2`` (tests/test_train_lora.py does), with one
argument: an empty folder for the job directories.

1. Gradients: for each case, one train_step (forward, backward, the workload's gradient
   reduction; no optimiser) on the same inputs as a single-rank model; every adapter's
   full gradient must equal the single-rank one within the fp32 bound of the DiT's forward
   and backward (tests/tolerance.py), relative (norm of the difference over the norm).
   lora_B starts non-zero so the lora_A gradients are too.
2. Saving: the whole train_lora workload under single and under fsdp_fixed (FSDP1, FSDP2)
   writes <folder>/<case>/lora_adapter; tests/test_train_lora.py reloads them with peft.
Prints "LORA GRADIENTS MATCH" at the end; exits 1 naming the case at the first mismatch.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from wan_exp.geometry import job_geometry
from wan_exp.config import compose_config as compose_experiment
from wan_exp.parallel.registry import setup_parallel
from wan_exp.rank.runtime import RankContext
from wan_exp.workloads.train_lora import (
    inject_lora,
    loss_scale_and_sp_group,
    run_train_lora,
    train_step,
    training_inputs,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tolerance module
from tolerance import chain_tolerance, dit_gradient_reductions  # noqa: E402

# 112x112 pixels: 14x14 latents, 209 tokens with reference and motion (odd: Ulysses pads)
COMMON = ["model=tiny", "workload=train_lora", "workload.size=112*112",
          "parallel.fsdp.param_dtype=fp32", "parallel.fsdp.reduce_dtype=fp32"]
GRADIENT_CASES = {
    "ulysses": ["parallel=ulysses"],
    "fsdp_fixed/fsdp1": ["parallel=fsdp_fixed"],
    "fsdp_fixed/fsdp2": ["parallel=fsdp_fixed", "parallel.fsdp.api=fsdp2"],
    "hybrid/fsdp1 (sp and fsdp over all ranks)": ["parallel=hybrid"],
    "hybrid/fsdp2 2-D mesh (sp=2 x fsdp=1)": ["parallel=hybrid", "parallel.fsdp.api=fsdp2",
                                              "parallel.fsdp.degree=1"],
}
SAVE_CASES = {
    "single": ["parallel=single"],
    "fsdp1": ["parallel=fsdp_fixed"],
    "fsdp2": ["parallel=fsdp_fixed", "parallel.fsdp.api=fsdp2"],
}
FSDP_PREFIX = "_fsdp_wrapped_module."


def compose_config(overrides: list[str]):
    return compose_experiment(COMMON + overrides)


def gradient_tolerance() -> float:
    """Split and single rank sum in other orders and shapes: the fp32 bound of one forward and
    backward of the DiT over the training clip's tokens (with the motion history)."""
    cfg = compose_config(["parallel=single"])
    return chain_tolerance(torch.float32, dit_gradient_reductions(cfg.model, job_geometry(cfg).tokens_later_clip))


def inject_with_nonzero_b(cfg):
    def before_wrap(dit: torch.nn.Module) -> None:
        inject_lora(dit, cfg.workload.lora, cfg.seed)
        with torch.no_grad():
            for index, (name, param) in enumerate(sorted(dit.named_parameters())):
                if "lora_B" in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(index)))
    return before_wrap


def full_adapter_gradients(dit: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> whole gradient of every adapter parameter, gathered from FSDP shards."""
    if isinstance(dit, FSDP):
        with FSDP.summon_full_params(dit, with_grads=True):
            return {name.replace(FSDP_PREFIX, ""): p.grad.clone()
                    for name, p in dit.named_parameters() if p.requires_grad}
    grads = {}
    for name, p in dit.named_parameters():
        if p.requires_grad:
            grads[name] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
    return grads


def one_step_gradients(cfg, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    ctx = RankContext(cfg, rank, rank, world_size, torch.device("cpu"), None)
    parallel_model = setup_parallel(cfg, ctx, before_wrap=inject_with_nonzero_b(cfg))
    inputs = training_inputs(cfg, job_geometry(cfg), parallel_model, ctx.device)
    loss_scale, sp_group = loss_scale_and_sp_group(cfg, parallel_model, world_size)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_step(parallel_model.dit, inputs, generator, cfg.workload.shift, loss_scale, sp_group)
    frozen_with_grad = [n for n, p in parallel_model.dit.named_parameters()
                        if not p.requires_grad and p.grad is not None]
    if frozen_with_grad:
        fail("frozen", f"base weights received gradients: {frozen_with_grad[:3]}")
    return full_adapter_gradients(parallel_model.dit)


def fail(case: str, message: str) -> None:
    print(f"MISMATCH [{case}] rank {dist.get_rank()}: {message}", flush=True)
    sys.exit(1)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    out_dir = Path(sys.argv[1])

    tolerance = gradient_tolerance()
    reference = one_step_gradients(compose_config(["parallel=single"]), rank, 1)
    if not any(g.abs().sum() > 0 for name, g in reference.items() if "lora_A" in name):
        fail("single", "lora_A gradients are all zero: the comparison would be vacuous")
    for case, overrides in GRADIENT_CASES.items():
        grads = one_step_gradients(compose_config(overrides), rank, world_size)
        if grads.keys() != reference.keys():
            fail(case, f"adapter names differ: {sorted(grads.keys() ^ reference.keys())[:5]}")
        worst = max((grads[k] - ref).norm().item() / ref.norm().item() for k, ref in reference.items())
        if not worst <= tolerance:
            fail(case, f"adapter gradient relative error {worst:.2e} > {tolerance:.2e}")
        if rank == 0:
            print(f"ok [{case}] worst relative error {worst:.1e}", flush=True)
        dist.barrier()

    for case, overrides in SAVE_CASES.items():
        cfg = compose_config(overrides)
        job_dir = out_dir / case
        job_dir.mkdir(parents=True, exist_ok=True)
        ctx = RankContext(cfg, rank, rank, 1 if case == "single" else world_size, torch.device("cpu"), job_dir)
        info = run_train_lora(cfg, ctx)
        if rank == 0:
            print(f"saved [{case}] {info['adapter_dir']} losses {info['losses']}", flush=True)
        dist.barrier()
    if rank == 0:
        print(f"LORA GRADIENTS MATCH ({len(GRADIENT_CASES)} cases, {len(reference)} adapter tensors)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    main()
