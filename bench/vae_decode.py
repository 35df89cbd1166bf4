"""The VAE decode of one clip per ``parallel.vae`` mode on the GPU, at full size: peak memory,
seconds, and the difference from the whole-frame decode.

    python bench/vae_decode.py                                   # 480*832: every_rank and tiled
    python bench/vae_decode.py --size 704*1024 --frames 80
    torchrun --nproc_per_node 4 bench/vae_decode.py              # and sharded on 4 ranks, per rank

The latents are those a later clip decodes: 19 motion latents and frames/4 clip latents
(39 latent frames, 153 pixel frames at 80 frames per clip; ``--first`` gives the first clip's
reference latent + clip latents, 21 -> 81). Weights are random (the real VAE's width,
model.vae_dim 96, fp32 as upstream S2V runs it); memory and time do not depend on the values.

One process measures, after a warm-up, each mode's decode alone: ``every_rank`` (the whole
frame; ``rank0`` is the same on rank 0) and ``tiled``. Under torchrun (NCCL) every rank
measures those and its share of ``sharded``: its strip alone (``sharded_strip``: the decode with
the border exchanges, without the gather) and ``decode_clip`` (``sharded``: the strips gathered,
every rank ends with the whole clip). Per mode and rank: the allocator's peak above what was
allocated before the call (the latents and weights), seconds (best of --repeat), the peak's
ratio to the whole-frame decode's, and the largest difference from it (fp32 with TF32 off).
The goal (docs/pipeline.md): tiled <= 0.6 x whole; a sharded rank <= 0.6 x whole / N.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from benchlib import header
from wan_exp.models.vae import SPATIAL_STRIDE, WanVAE
from wan_exp.parallel.vae import STRIP_TILES, TILED_GRID, decode_clip, shard_strip
from wan_exp.units import GIB

MOTION_LATENTS = 19


def measure(decode: Callable[[], torch.Tensor], repeat: int, whole: Optional[torch.Tensor]) -> dict:
    """Peak above the allocation at the call, best seconds, and the max |difference| from ``whole``."""
    decode()  # warm-up: kernels chosen, workspaces allocated once
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        pixels = decode()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() - base
        reserved = torch.cuda.max_memory_reserved()
        diff = None
        if whole is not None:
            diff = (pixels - whole).abs().max().item()
        del pixels
    return {"peak_gib": peak / GIB, "peak_reserved_gib": reserved / GIB, "seconds": best, "max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="480*832")
    parser.add_argument("--frames", type=int, default=80, help="frames per clip")
    parser.add_argument("--first", action="store_true", help="the first clip's decode (reference latent + clip)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/vae_decode.py needs a CUDA GPU")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    height, width = (int(v) // SPATIAL_STRIDE for v in args.size.split("*"))
    latent_frames = (1 if args.first else MOTION_LATENTS) + args.frames // 4
    torch.manual_seed(0)
    with torch.device(device):
        vae = WanVAE(96).eval().requires_grad_(False)
        latents = torch.randn(1, 16, latent_frames, height, width)
    if rank == 0:
        header(
            size=args.size,
            latent_frames=latent_frames,
            pixel_frames=1 + 4 * (latent_frames - 1),
            tiled_grid=TILED_GRID,
            strip_tiles=STRIP_TILES,
            world=world,
        )
    if world > 1:
        dist.init_process_group("nccl", device_id=device)
    whole_row = measure(lambda: vae.decode(latents), args.repeat, None)
    whole = vae.decode(latents)
    rows = [
        {"mode": "every_rank", **whole_row},
        {"mode": "tiled", **measure(lambda: decode_clip(vae, latents, "tiled", 0, 1), args.repeat, whole)},
    ]
    if world > 1:
        strip = shard_strip(height, width, rank, world)
        own = latents.narrow(strip.dim, strip.offset, strip.lengths[rank])
        grid = (STRIP_TILES, 1) if strip.dim == -1 else (1, STRIP_TILES)
        cut = whole.narrow(strip.dim, strip.offset * SPATIAL_STRIDE, strip.lengths[rank] * SPATIAL_STRIDE)
        rows.append({"mode": "sharded_strip", **measure(lambda: vae.decode_tiled(own, grid, strip), args.repeat, cut)})
        sharded = measure(lambda: decode_clip(vae, latents, "sharded", rank, world), args.repeat, whole)
        rows.append({"mode": "sharded", **sharded})
    for row in rows:
        row.update(rank=rank, ranks=world)
        row["peak_vs_whole"] = row["peak_gib"] / whole_row["peak_gib"]
        row["seconds_vs_whole"] = row["seconds"] / whole_row["seconds"]
        print(json.dumps(row), flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
