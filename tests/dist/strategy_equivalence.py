"""Every parallel strategy of the tiny S2V model (fp32) against the single-rank model.

Run under ``torchrun --nproc_per_node 2`` (gloo on the CPU; tests/test_parallel.py does).
For each case it builds the strategy with setup_parallel, then checks on every rank:
- the gathered full state dict equals the single-rank model's, tensor for tensor
  (base weights and, where the case injects LoRA through before_wrap, the adapters);
- the DiT output, and the guided velocity of one sampling step (through
  ParallelModel.guidance: CFG parallel where cfg=2), equal the single-rank ones within
  relative_tolerance (fp32 arithmetic over the tiny model's chain: tests/tolerance.py), for
  a clip whose token count is odd (so sequence splits must pad) with and
  without reference/motion tokens;
- FSDP ranks hold about half the DiT parameters (dit_param_gib note).
Exits with status 1 and a message naming the case at the first mismatch.

With WAN_EXP_TEST_DEVICE=cuda the ranks share the visible GPUs round robin over gloo (what
launcher.share_gpus=true runs), the same fp32 tolerance with TF32 off (cuBLAS and cuDNN would
otherwise round fp32 operands to 10 mantissa bits); with 4 ranks the cfg case is
cfg=2 x ulysses=2.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, inject_adapter_in_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from wan_exp.config import compose_config as compose_experiment
from wan_exp.geometry import sequence_length
from wan_exp.parallel.materialise import gather_rows
from wan_exp.parallel.registry import setup_parallel
from wan_exp.rank.runtime import RankContext
from wan_exp.parallel.cfg import Condition, guided_flow

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tolerance module
from tolerance import chain_tolerance, dit_reductions  # noqa: E402

COMMON = ["model=tiny", "parallel.fsdp.param_dtype=fp32", "parallel.fsdp.reduce_dtype=fp32"]
# name -> (overrides, inject LoRA in before_wrap)
CASES = {
    "ulysses": (["parallel=ulysses"], False),
    "ulysses+lora": (["parallel=ulysses"], True),
    "fsdp_fixed/fsdp1": (["parallel=fsdp_fixed"], False),
    "fsdp_fixed/fsdp1+lora": (["parallel=fsdp_fixed"], True),
    "fsdp_fixed/fsdp2": (["parallel=fsdp_fixed", "parallel.fsdp.api=fsdp2"], False),
    "fsdp_fixed/fsdp2+lora": (["parallel=fsdp_fixed", "parallel.fsdp.api=fsdp2"], True),
    "hybrid/fsdp1 (sp and fsdp over all ranks)": (["parallel=hybrid"], False),
    "hybrid/fsdp2 (sp and fsdp over all ranks)": (["parallel=hybrid", "parallel.fsdp.api=fsdp2"], True),
    "hybrid/fsdp1 2-D mesh (sp=2 x fsdp=1)": (["parallel=hybrid", "parallel.fsdp.degree=1"], False),
    "cfg (cfg=2)": (["parallel=cfg"], False),
    "usp on 2 ranks (ring=2)": (["parallel=usp"], True),
}
ON_CUDA = os.environ.get("WAN_EXP_TEST_DEVICE") == "cuda"
GUIDANCE = 4.5


def compose_config(overrides: list[str]):
    return compose_experiment(COMMON + overrides)


def inject_lora(dit: torch.nn.Module) -> None:
    """peft LoRA on the attention projections, with non-zero B so the adapters matter."""
    torch.manual_seed(1)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=r"blocks\.\d+\.self_attn\.(q|v)"), dit)
    with torch.no_grad():
        for name, param in dit.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))


# 2 latent frames of 14x14 latents: 49 tokens per frame, 147 tokens with the reference
# frame and 209 with the motion history too; both odd, so Ulysses must pad
FRAMES, LAT_H, LAT_W = 2, 14, 14


def relative_tolerance(model_cfg, tokens: int, with_motion: bool) -> float:
    """Split and whole sum in other orders (and shapes), so their outputs differ by the fp32 bound
    of the DiT's chain of reductions (tests/tolerance.py), relative to the output's scale."""
    return chain_tolerance(torch.float32, dit_reductions(model_cfg, tokens, with_motion))


def clip_inputs(model_cfg, with_motion: bool) -> dict:
    """A clip with reference latents, and the motion history when ``with_motion``."""
    g = torch.Generator().manual_seed(7)
    frames, lat_h, lat_w = FRAMES, LAT_H, LAT_W
    inputs = dict(
        noisy=torch.randn(1, model_cfg.in_dim, frames, lat_h, lat_w, generator=g),
        timestep=torch.tensor([600.0]),
        context=torch.randn(1, model_cfg.text_len, model_cfg.text_dim, generator=g),
        audio=torch.randn(1, model_cfg.audio_layers, 4 * frames, model_cfg.audio_dim, generator=g),
        ref=torch.randn(1, model_cfg.in_dim, 1, lat_h, lat_w, generator=g),
    )
    if with_motion:
        inputs["motion"] = torch.randn(1, model_cfg.in_dim, model_cfg.motion_frames, lat_h, lat_w, generator=g)
    return inputs


def conditions(x: dict) -> tuple[Condition, Condition]:
    """The conditional and unconditional branch of one clip (as generate's: the
    unconditional one with another text embedding and silent audio)."""
    uncond_context = torch.randn(x["context"].shape, generator=torch.Generator().manual_seed(11)).to(x["context"])
    return (Condition(x["context"], x["audio"], x["ref"], x.get("motion")),
            Condition(uncond_context, torch.zeros_like(x["audio"]), x["ref"], x.get("motion")))


def full_state(dit: torch.nn.Module) -> dict[str, torch.Tensor]:
    if any(isinstance(p, DTensor) for p in dit.parameters()):  # FSDP2: c10d gather (no full_tensor on gloo+CUDA)
        return {name: gather_rows(p.detach()) for name, p in dit.named_parameters()}
    return get_model_state_dict(dit, options=StateDictOptions(full_state_dict=True))


def rank_device(rank: int) -> torch.device:
    return torch.device("cuda", rank % torch.cuda.device_count()) if ON_CUDA else torch.device("cpu")


def run(cfg, rank: int, world_size: int, lora: bool):
    ctx = RankContext(cfg, rank, rank, world_size, rank_device(rank), None)
    parallel_model = setup_parallel(cfg, ctx, before_wrap=inject_lora if lora else None)
    return parallel_model, ctx


def fail(case: str, message: str) -> None:
    print(f"MISMATCH [{case}] rank {dist.get_rank()}: {message}", flush=True)
    sys.exit(1)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    if ON_CUDA:
        torch.cuda.set_device(rank_device(rank))
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 arithmetic, as the tolerance assumes
        torch.backends.cudnn.allow_tf32 = False
    if world_size == 4:  # plain cfg parallel takes 2 ranks
        CASES["cfg (cfg=2)"] = (["parallel=cfg", "parallel.ulysses_degree=2"], False)
    single_cfg = compose_config(["parallel=single"])
    inputs = {motion: {k: v.to(rank_device(rank)) for k, v in clip_inputs(single_cfg.model, motion).items()}
              for motion in (False, True)}
    counts = {motion: sequence_length(single_cfg.model, 8 * LAT_H, 8 * LAT_W, 4 * FRAMES, motion)
              for motion in inputs}
    if any(n % world_size == 0 for n in counts.values()):
        fail("inputs", f"token counts {counts} should not divide by {world_size}")
    tolerances = {motion: relative_tolerance(single_cfg.model, n, motion) for motion, n in counts.items()}
    references = {}
    for lora in (False, True):
        single, single_ctx = run(single_cfg, rank, 1, lora)
        with torch.no_grad():
            outputs = {motion: single.dit(**x) for motion, x in inputs.items()}
        guided = {motion: guided_flow(single.dit, x["noisy"], x["timestep"], *conditions(x), GUIDANCE)
                  for motion, x in inputs.items()}
        references[lora] = (full_state(single.dit), outputs, guided, single_ctx.metrics.notes["dit_param_gib"])

    for case, (overrides, lora) in CASES.items():
        cfg = compose_config(overrides)
        parallel_model, ctx = run(cfg, rank, world_size, lora)
        ref_state, ref_outputs, ref_guided, ref_param_gib = references[lora]
        state = full_state(parallel_model.dit)
        if state.keys() != ref_state.keys():
            fail(case, f"state dict keys differ: {sorted(state.keys() ^ ref_state.keys())[:5]}")
        for key, value in state.items():
            if not torch.equal(value, ref_state[key]):
                fail(case, f"loaded weight {key} differs from the single-rank model")
        worst = 0.0
        with torch.no_grad():
            for motion, x in inputs.items():
                out = parallel_model.dit(**x)
                ref = ref_outputs[motion]
                err = (out - ref).abs().max().item() / ref.abs().max().item()
                if not err <= tolerances[motion]:
                    fail(case, f"output ({counts[motion]} tokens, motion={motion}) relative error {err:.2e}")
                worst = max(worst, err)
                guided = parallel_model.guidance(parallel_model.dit, x["noisy"], x["timestep"], *conditions(x), GUIDANCE)
                err = (guided - ref_guided[motion]).abs().max().item() / ref_guided[motion].abs().max().item()
                if not err <= tolerances[motion]:
                    fail(case, f"guided velocity ({counts[motion]} tokens) relative error {err:.2e}")
                worst = max(worst, err)
        share = ctx.metrics.notes["dit_param_gib"] / ref_param_gib
        if cfg.parallel.fsdp.degree == -1 and not share < 0.6:  # FSDP over all ranks
            fail(case, f"FSDP rank holds {share:.2f} of the parameters, expected about 1/{world_size}")
        if rank == 0:
            print(f"ok [{case}] param share {share:.2f}, worst relative error {worst:.1e}", flush=True)
        dist.barrier()
    if rank == 0:
        print(f"ALL {len(CASES)} STRATEGY CASES MATCH (token counts {sorted(counts.values())})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    main()
