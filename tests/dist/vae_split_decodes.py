"""parallel.vae=tiled and sharded on the ranks of one launch: the sharded pixels against the
plain decode, and the memory peaks of both against the plain (whole-frame) decode's.

Run under ``torchrun --nproc_per_node N`` with N even, 4 or more (gloo on the CPU;
tests/test_pipeline.py runs 4) and ``MALLOC_MMAP_THRESHOLD_=65536``, so that malloc maps every
block over 64 KiB on its own, a freed tensor leaves the resident set at once and the resident
high-water mark (VmHWM, reset through /proc/self/clear_refs) follows the live tensors, the
temporaries inside the kernels included. ``sharded`` runs over all N ranks and over two process
groups of N/2 interleaved ranks (even ranks, odd ranks), each group sharding its own clip, as the
dp groups of a job do.

1. Pixels, in fp64, the largest difference from ``WanVAE.decode`` on any rank: over N ranks for
   latent frames whose strips are cut along the columns, along the rows, of unequal lengths,
   and one latent wide; over each group of N/2 for a clip of its own (``groups``).
2. Peaks, in fp32, a VAE 2 channels wide, 2 latent frames of 60 x 32 latents (480 pixels high
   at a reduced width), each in bytes above the resident set at the call: rank 0 decodes the
   whole frame (``whole``) while rank 1 decodes it in ``TILED_GRID`` tiles (``tiled``); then
   every rank its share of ``sharded`` through ``decode_clip``, the gather of the strips
   included (every rank ends with the whole clip), over its group of N/2, then over all N.

Rank 0 prints one JSON line: {"max_abs_diff": {case: value}, "whole": bytes, "tiled": bytes,
"sharded": {ranks sharing a clip: [bytes per rank]}}.
"""

from __future__ import annotations

import gc
import json
import sys
from typing import Callable

import torch
import torch.distributed as dist

from wan_exp.models.vae import WanVAE
from wan_exp.parallel.vae import TILED_GRID, decode_clip

# (1, 16, T, h, w): strips of columns, of rows, and (over 4 ranks) one latent wide
EQUALITY_SHAPES = ((1, 16, 2, 5, 18), (1, 16, 2, 13, 6), (1, 16, 2, 3, 4))
PEAK_LATENTS = (1, 16, 2, 60, 32)


def resident(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


def peak_of(decode: Callable[[], torch.Tensor]) -> int:
    """The resident high-water mark of ``decode()`` above the resident set at the call."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS
    base = resident("VmRSS:")
    pixels = decode()
    peak = resident("VmHWM:") - base
    del pixels
    return peak


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 4 or world % 2:
        raise SystemExit(f"run on an even number of ranks, 4 or more (got {world})")
    half, parity = world // 2, rank % 2
    groups = [dist.new_group(list(range(first, world, 2))) for first in (0, 1)]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae = WanVAE(4).eval().double()
    with torch.no_grad():  # so that the attention's output matters
        for name, param in vae.named_parameters():
            if name.endswith("proj.weight"):
                param.normal_(0, 0.3)
    diffs = {}
    for shape in EQUALITY_SHAPES:
        z = torch.randn(shape, dtype=torch.float64)
        sharded = decode_clip(vae, z, "sharded", rank, world)
        plain = vae.decode(z) if rank == 0 else torch.empty_like(sharded)
        dist.broadcast(plain, src=0)
        diffs[str(shape)] = (sharded - plain).abs().max().item()
    z = torch.randn(EQUALITY_SHAPES[0], dtype=torch.float64) + parity  # each group a clip of its own
    sharded = decode_clip(vae, z, "sharded", rank // 2, half, groups[parity])
    plain = vae.decode(z) if rank < 2 else torch.empty_like(sharded)  # on each group's first rank
    dist.broadcast(plain, group=groups[parity], group_src=0)
    diffs["groups"] = (sharded - plain).abs().max().item()

    vae = WanVAE(2).eval()
    z = torch.randn(PEAK_LATENTS)
    small = z[:, :, :1, :8, : 8 * world]  # first-call allocations (kernels, thread pools) out of the way
    decode_clip(vae, small, "sharded", rank, world)
    peaks = {}
    if rank == 0:
        vae.decode(small)
        peaks["whole"] = peak_of(lambda: vae.decode(z))
    if rank == 1:  # at the same time, on another core
        vae.decode_tiled(small, TILED_GRID)
        peaks["tiled"] = peak_of(lambda: vae.decode_tiled(z, TILED_GRID))
    dist.barrier()
    peaks[half] = peak_of(lambda: decode_clip(vae, z, "sharded", rank // 2, half, groups[parity]))
    dist.barrier()
    peaks[world] = peak_of(lambda: decode_clip(vae, z, "sharded", rank, world))
    every = [None] * world
    dist.all_gather_object(every, {**peaks, "diffs": diffs})
    if rank == 0:
        found = {
            "max_abs_diff": {case: max(r["diffs"][case] for r in every) for case in diffs},  # over the ranks
            "whole": every[0]["whole"],
            "tiled": every[1]["tiled"],
            "sharded": {ranks: [r[ranks] for r in every] for ranks in (half, world)},
        }
        print(json.dumps(found), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
