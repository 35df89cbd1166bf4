"""Ring attention's pieces at the Wan head shape (40 heads x 128, bf16) on GPUs.

One GPU (default): for every kernel that returns the log-sum-exp
(``wan_exp.models.attention.LSE_IMPLEMENTATIONS``), the whole-sequence call and the ring
simulated in one process (K/V split into 2/4/8 chunks, partials merged with the
log-sum-exp as ``parallel.ring`` does) against the whole-sequence kernel the model runs
without a ring (``model.attention_backend=auto``): time and relative L2 error. Each row also
gives the error of its first 256 queries against fp32 attention (math over all keys).

    python bench/ring_attention.py                       # N = 35100 (S2V 480p), chunks 2 4 8
    python bench/ring_attention.py --tokens 35100 75600 --chunks 2 4 8

Several GPUs (torchrun, NCCL): the real ring, ``parallel.ring.ring_attention`` over all
ranks, each holding N / ranks tokens (padded), against the whole-sequence kernel on each
rank's own queries; time is the slowest rank's.

    torchrun --nproc_per_node 8 bench/ring_attention.py --tokens 35100
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from benchlib import event_time, header
from wan_exp.models import attention as attn
from wan_exp.parallel.ring import merge_partials, ring_attention

WAN_HEADS, WAN_HEAD_DIM = 40, 128
KERNELS = ("lse_sdpa_cudnn", "lse_sdpa_flash", "lse_sdpa_efficient", "lse_flash_attn", "lse_fa3", "lse_fa4")
CHECK_QUERIES = 256


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def qkv(tokens: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator("cuda").manual_seed(seed)
    return tuple(
        torch.randn(1, tokens, WAN_HEADS, WAN_HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(3)
    )


def ring_in_one_process(kernel, q, k, v, chunks: int) -> torch.Tensor:
    out = lse = None
    for k_part, v_part in zip(k.tensor_split(chunks, dim=1), v.tensor_split(chunks, dim=1)):
        out, lse = merge_partials(out, lse, *kernel(q, k_part, v_part))
    return out.to(q.dtype)


def one_gpu(tokens_list: list[int], chunks_list: list[int]) -> None:
    print(f"{'tokens':>7} {'kernel':<20} {'chunks':>6} {'ms':>9} {'x whole':>8} {'rel err':>9} {'fp32 err':>9}")
    for tokens in tokens_list:
        one_gpu_rows(tokens, chunks_list)
        torch.cuda.empty_cache()  # this length's tensors are gone with the call


def one_gpu_rows(tokens: int, chunks_list: list[int]) -> None:
    q, k, v = qkv(tokens)
    attn.configure("auto")
    whole = attn.attention(q, k, v)
    whole_ms = 1e3 * event_time(lambda: attn.attention(q, k, v))
    fp32 = attn.lse_math(q[:, :CHECK_QUERIES].float(), k.float(), v.float())[0]
    print(
        f"{tokens:>7} {'whole: ' + str(attn.selected_backend()):<20} {1:>6} {whole_ms:>9.2f} {1.0:>8.3f} "
        f"{0.0:>9.1e} {relative_error(whole[:, :CHECK_QUERIES], fp32):>9.1e}"
    )
    for name in KERNELS:
        kernel = attn.LSE_IMPLEMENTATIONS[name]
        try:
            kernel(q[:, :64], k[:, :64], v[:, :64])
        except Exception as err:  # noqa: BLE001 - a kernel absent or unusable here: say why
            print(f"{tokens:>7} {name:<20} not measured: {type(err).__name__}: {str(err).splitlines()[0][:90]}")
            continue
        for chunks in (1, *chunks_list):
            out = ring_in_one_process(kernel, q, k, v, chunks)
            ms = 1e3 * event_time(lambda: ring_in_one_process(kernel, q, k, v, chunks))
            print(
                f"{tokens:>7} {name:<20} {chunks:>6} {ms:>9.2f} {ms / whole_ms:>8.3f} "
                f"{relative_error(out, whole):>9.1e} {relative_error(out[:, :CHECK_QUERIES], fp32):>9.1e}"
            )


def several_gpus(tokens_list: list[int]) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        print(
            f"{'tokens':>7} {'ranks':>5} {'ring ms (max)':>14} {'whole ms':>9} {'rel err (max)':>14} {'lse kernel':<18}"
        )
    for tokens in tokens_list:
        several_gpus_row(tokens, rank, world)
        torch.cuda.empty_cache()


def several_gpus_row(tokens: int, rank: int, world: int) -> None:
    q, k, v = qkv(tokens)  # the same seed on every rank: the whole sequence everywhere
    chunk = -(-tokens // world)
    pad = chunk * world - tokens
    local = [
        torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad))[:, rank * chunk : (rank + 1) * chunk].contiguous()
        for t in (q, k, v)
    ]

    def valid(c: int) -> int:
        return max(0, min(chunk, tokens - c * chunk))

    attn.configure("auto")
    out = ring_attention(*local, dist.group.WORLD, valid)
    ring_ms = torch.tensor(1e3 * event_time(lambda: ring_attention(*local, dist.group.WORLD, valid)), device="cuda")
    whole = attn.attention(q[:, rank * chunk : rank * chunk + valid(rank)], k, v)
    whole_ms = 1e3 * event_time(lambda: attn.attention(q, k, v))
    err = torch.tensor(relative_error(out[:, : valid(rank)], whole) if valid(rank) else 0.0, device="cuda")
    dist.all_reduce(ring_ms, op=dist.ReduceOp.MAX)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(
            f"{tokens:>7} {world:>5} {ring_ms.item():>14.2f} {whole_ms:>9.2f} {err.item():>14.1e} "
            f"{str(attn.selected_lse_backend()):<18}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[35100])
    parser.add_argument("--chunks", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/ring_attention.py needs a CUDA GPU")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        if dist.get_rank() == 0:
            header(heads=WAN_HEADS, head_dim=WAN_HEAD_DIM, dtype="bf16", ranks=world)
        several_gpus(args.tokens)
        dist.destroy_process_group()
        return
    header(heads=WAN_HEADS, head_dim=WAN_HEAD_DIM, dtype="bf16")
    one_gpu(args.tokens, args.chunks)


if __name__ == "__main__":
    main()
