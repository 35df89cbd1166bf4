"""The new splits on 4 CPU ranks (gloo) against one rank: CFG parallel, ring attention,
USP, and their mixes with FSDP, in ONE process group. tests/test_parallel.py runs it under
``torchrun --nproc_per_node 4``.

For each case (tiny S2V model, fp32) on every rank:
1. the DiT output for the conditional input and the guided velocity of one sampling step
   (through ``ParallelModel.guidance``: CFG parallel where cfg=2) equal the single-rank
   ones within the fp32 bound of the DiT's chain of reductions (tests/tolerance.py), relative
   to the output's largest value, at 147 and 209 tokens (4 divides neither, so every split pads);
2. train_lora's adapter gradients after one step equal one rank's (lora_train.py's check);
3. ring attention alone over the 4 ranks equals whole-sequence attention at odd lengths
   (outputs and gradients);
4. for two cases, the collectives of one call counted by metrics.comm.CommCounter equal
   the counts and bytes worked out by hand below.
Prints "ALL <n> SPLIT CASES MATCH" at the end; exits 1 naming the case at the first mismatch.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lora_train import compose_config as compose_lora_config
from lora_train import gradient_tolerance, one_step_gradients
from strategy_equivalence import GUIDANCE, FRAMES, LAT_H, LAT_W, clip_inputs, compose_config, conditions
from wan_exp.metrics.comm import CommCounter
from wan_exp.geometry import sequence_length
from wan_exp.parallel.registry import setup_parallel
from wan_exp.rank.runtime import RankContext
from wan_exp.parallel.cfg import dit_flow, guided_flow

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tolerance module
from tolerance import attention_reductions, chain_tolerance, dit_reductions  # noqa: E402

CASES = {
    "usp preset (ring2 x ulysses2)": ["parallel=usp"],
    "cfg_ulysses preset (cfg2 x ulysses2)": ["parallel=cfg_ulysses"],
    "cfg2 x ring2": ["parallel=cfg", "parallel.ring_degree=2"],
    "ring4": ["parallel=usp", "parallel.ring_degree=4"],
    "ring2 x fsdp2 axis (fsdp1)": ["parallel=hybrid", "parallel.ring_degree=2", "parallel.ulysses_degree=1",
                                   "parallel.fsdp.degree=2"],
    "cfg2 x ring2, fsdp over all (fsdp2)": ["parallel=hybrid", "parallel.cfg_degree=2", "parallel.ring_degree=2",
                                            "parallel.ulysses_degree=1", "parallel.fsdp.api=fsdp2"],
}
GRADIENT_CASES = ("usp preset (ring2 x ulysses2)", "cfg2 x ring2", "ring2 x fsdp2 axis (fsdp1)",
                  "cfg2 x ring2, fsdp over all (fsdp2)")
F32 = 4  # bytes per fp32 element


def fail(case: str, message: str) -> None:
    print(f"MISMATCH [{case}] rank {dist.get_rank()}: {message}", flush=True)
    sys.exit(1)


def hand_count_usp_forward(model_cfg, tokens: int) -> dict:
    """One DiT forward under ring 2 x ulysses 2 (P = 4 sequence ranks), B = 1, fp32.
    Per block: 4 all-to-alls (q, k, v to heads; out back) of this rank's (1, N_pad/4, dim)
    slice, in the ulysses pair; one ring step: send + recv of stacked k/v (2, 1, N_pad/2,
    heads/2, d) = N_pad/4 x dim x 2 elements. Then one all-gather of x over the 4 ranks."""
    dim, blocks = model_cfg.dim, model_cfg.num_layers
    n_local = -(-tokens // 4)
    slice_bytes = n_local * dim * F32
    return {
        "all_to_all": {"count": 4 * blocks, "bytes": 4 * blocks * slice_bytes,
                       "bus_bytes": 4 * blocks * slice_bytes * 1 / 2},
        "send": {"count": blocks, "bytes": blocks * 2 * slice_bytes, "bus_bytes": blocks * 2 * slice_bytes},
        "recv": {"count": blocks, "bytes": blocks * 2 * slice_bytes, "bus_bytes": blocks * 2 * slice_bytes},
        "all_gather": {"count": 1, "bytes": 4 * slice_bytes, "bus_bytes": 4 * slice_bytes * 3 / 4},
    }


def hand_count_cfg_ring_step(model_cfg, tokens: int, flow_numel: int) -> dict:
    """One guided velocity under cfg 2 x ring 2: one forward (ring over 2: per block one
    send + recv of k/v (2, 1, N_pad/2, heads, d); one all-gather of x over the ring pair),
    then the step's one exchange: all-gather of the (flow-shaped) velocity over the cfg pair."""
    dim, blocks = model_cfg.dim, model_cfg.num_layers
    n_local = -(-tokens // 2)
    kv_bytes = 2 * n_local * dim * F32
    return {
        "send": {"count": blocks, "bytes": blocks * kv_bytes, "bus_bytes": blocks * kv_bytes},
        "recv": {"count": blocks, "bytes": blocks * kv_bytes, "bus_bytes": blocks * kv_bytes},
        "all_gather": {"count": 2, "bytes": 2 * n_local * dim * F32 + 2 * flow_numel * F32,
                       "bus_bytes": (2 * n_local * dim * F32 + 2 * flow_numel * F32) / 2},
    }


def ring_attention_bounds(head_dim: int, keys: int, world_size: int) -> tuple[float, float]:
    """fp32 bounds (tests/tolerance.py) on ring attention against whole-sequence attention,
    relative to the largest value: the output (the attention, then a merge of two log-sum-exps
    and two weighted outputs per further rank) and the gradients (that forward, its backward:
    v's over the queries, the probabilities' over the head size, the softmax's over the keys,
    q's over the keys and k's over the queries; the ranks' shares summed)."""
    forward = attention_reductions(head_dim, keys) + [2, 2] * (world_size - 1)
    backward = [keys, head_dim, keys, keys, world_size]
    return chain_tolerance(torch.float32, forward), chain_tolerance(torch.float32, forward + backward)


def check_ring_attention_alone(rank: int, world_size: int) -> None:
    """ring_attention over all ranks equals whole-sequence attention (SDPA, one process) at
    lengths the ranks do not divide: the outputs of this rank's queries, and the gradients
    of q, k, v (each rank's share summed over ranks)."""
    from wan_exp.parallel.ring import ring_attention

    lengths = [13, 29, 31]
    worst_out = worst_grad = 0.0
    for n in lengths:
        out_bound, grad_bound = ring_attention_bounds(8, n, world_size)
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, n, 2, 8, generator=g, requires_grad=True) for _ in range(3))
        weight = torch.randn(1, n, 2, 8, generator=g)
        ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
        chunk = -(-n // world_size)
        rows = slice(rank * chunk, (rank + 1) * chunk)
        pad = chunk * world_size - n
        local = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad))[:, rows] for t in (q, k, v)]
        out = ring_attention(*local, dist.group.WORLD, lambda c: max(0, min(chunk, n - c * chunk)))
        valid = max(0, min(chunk, n - rank * chunk))
        err = (out[:, :valid] - ref[:, rows][:, :valid]).abs().max().item() / ref.abs().max().item() if valid else 0.0
        if not err <= out_bound:
            fail("ring attention alone", f"length {n}: output relative error {err:.2e} > {out_bound:.2e}")
        grads = list(torch.autograd.grad((out[:, :valid] * weight[:, rows][:, :valid]).sum(), (q, k, v)))
        for grad in grads:
            dist.all_reduce(grad)
        worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, ref_grads))
        if not worst <= grad_bound:
            fail("ring attention alone", f"length {n}: gradient relative error {worst:.2e} > {grad_bound:.2e}")
        worst_out, worst_grad = max(worst_out, err), max(worst_grad, worst)
    if rank == 0:
        print(f"ok [ring attention alone, lengths {lengths}] worst relative error output {worst_out:.1e}, "
              f"gradients {worst_grad:.1e}", flush=True)


def check_counts(case: str, counted: dict, expected: dict) -> None:
    """count, bytes and bus bytes per kind (the per-size ``messages`` sum to the same bytes)."""
    for kind, figures in counted.items():
        messages = figures.get("messages", {})
        if sum(int(key.split("x")[0]) * calls for key, calls in messages.items()) != figures["bytes"]:
            fail(case, f"{kind}: message sizes {messages} do not add up to its {figures['bytes']} bytes")
    counted = {kind: {k: v for k, v in figures.items() if k != "messages"} for kind, figures in counted.items()}
    if counted != expected:
        fail(case, f"collectives counted {counted} != worked out by hand {expected}")


def main() -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    check_ring_attention_alone(rank, world_size)
    single_cfg = compose_config(["parallel=single"])
    model_cfg = single_cfg.model
    inputs = {motion: clip_inputs(model_cfg, motion) for motion in (False, True)}
    counts = {motion: sequence_length(model_cfg, 8 * LAT_H, 8 * LAT_W, 4 * FRAMES, motion) for motion in inputs}
    if any(n % world_size == 0 for n in counts.values()):
        fail("inputs", f"token counts {counts} should not divide by {world_size}")
    # split and whole sum in other orders and shapes: the fp32 bound of the DiT's reductions
    # (tests/tolerance.py), relative to the output's largest value
    bounds = {motion: chain_tolerance(torch.float32, dit_reductions(model_cfg, n, motion))
              for motion, n in counts.items()}

    single = setup_parallel(single_cfg, RankContext(single_cfg, rank, rank, 1, torch.device("cpu"), None))
    references = {}
    for motion, x in inputs.items():
        cond, uncond = conditions(x)
        references[motion] = (dit_flow(single.dit, x["noisy"], x["timestep"], cond),
                              guided_flow(single.dit, x["noisy"], x["timestep"], cond, uncond, GUIDANCE))

    for case, overrides in CASES.items():
        cfg = compose_config(overrides)
        parallel_model = setup_parallel(cfg, RankContext(cfg, rank, rank, world_size, torch.device("cpu"), None))
        worst = 0.0
        for motion, x in inputs.items():
            cond, uncond = conditions(x)
            ref_cond, ref_guided = references[motion]
            counter = CommCounter()
            with counter:
                guided = parallel_model.guidance(parallel_model.dit, x["noisy"], x["timestep"], cond, uncond, GUIDANCE)
            out = dit_flow(parallel_model.dit, x["noisy"], x["timestep"], cond)
            for what, value, ref in (("conditional output", out, ref_cond), ("guided velocity", guided, ref_guided)):
                err = (value - ref).abs().max().item() / ref.abs().max().item()
                if not err <= bounds[motion]:
                    fail(case, f"{what} ({counts[motion]} tokens) relative error {err:.2e} > {bounds[motion]:.2e}")
                worst = max(worst, err)
            if case == "cfg2 x ring2" and motion:
                check_counts(case, counter.counts["other"],
                             hand_count_cfg_ring_step(model_cfg, counts[motion], ref_guided.numel()))
        if case.startswith("usp"):
            counter = CommCounter()
            with counter, torch.no_grad():
                parallel_model.dit(**inputs[True])
            check_counts(case, counter.counts["other"], hand_count_usp_forward(model_cfg, counts[True]))
        if rank == 0:
            print(f"ok [{case}] {parallel_model.dims.describe()}, worst relative error {worst:.1e}", flush=True)
        dist.barrier()

    reference_grads = one_step_gradients(compose_lora_config(["parallel=single"]), rank, 1)
    gradient_bound = gradient_tolerance()
    for case in GRADIENT_CASES:
        grads = one_step_gradients(compose_lora_config(CASES[case]), rank, world_size)
        if grads.keys() != reference_grads.keys():
            fail(case, f"adapter names differ: {sorted(grads.keys() ^ reference_grads.keys())[:5]}")
        worst = max((grads[k] - ref).norm().item() / ref.norm().item() for k, ref in reference_grads.items())
        if not worst <= gradient_bound:
            fail(case, f"train_lora adapter gradient relative error {worst:.2e} > {gradient_bound:.2e}")
        if rank == 0:
            print(f"ok [{case}] gradients, worst relative error {worst:.1e}", flush=True)
        dist.barrier()
    if rank == 0:
        print(f"ALL {len(CASES)} SPLIT CASES MATCH (token counts {sorted(counts.values())}; "
              f"{len(GRADIENT_CASES)} gradient cases)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    main()
