"""The VAE decode of one clip per ``parallel.vae`` mode on the GPU, at full size: peak memory,
seconds, and the difference from the whole-frame decode.

    python bench/vae_decode.py                              # 480*832: every_rank, tiled, sharded strips
    python bench/vae_decode.py --size 704*1024 --frames 80
    torchrun --nproc_per_node 2 bench/vae_decode.py --gather  # sharded for real, per rank, gather included

The latents are those a later clip decodes: 19 motion latents and frames/4 clip latents
(39 latent frames, 153 pixel frames at 80 frames per clip; ``--first`` gives the first clip's
reference latent + clip latents, 21 -> 81). Weights are random (the real VAE's width,
model.vae_dim 96, fp32 as upstream S2V runs it); memory and time do not depend on the values.

Without ``--gather`` one process measures, after a warm-up, each mode's decode alone:
``every_rank`` (the whole frame; ``rank0`` is the same on rank 0), ``tiled`` (models/vae.py:
one tile at a time), and each rank's share of ``sharded`` at --ranks N (its strip in tiles,
without the all-gather). With ``--gather`` under torchrun every rank runs decode_clip in the
sharded mode, all-gather included. Per mode: the allocator's peak above what was allocated
before the call (the latents and weights), seconds (best of --repeat), the peak's ratio to the
whole-frame decode's, and the largest difference from it (fp32 with TF32 off).
The goal (docs/pipeline.md): tiled <= 0.6 x whole; a sharded rank <= 0.6 x whole / N plus the gather.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from benchlib import header
from wan_exp.models.vae import WanVAE
from wan_exp.parallel.vae import TILED_GRID, decode_clip, shard_strips
from wan_exp.units import GIB

MOTION_LATENTS = 19


def measure(decode, repeat: int, whole: torch.Tensor | None) -> dict:
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
        if whole is not None and pixels.shape == whole.shape:
            diff = (pixels - whole).abs().max().item()
        del pixels
    return {"peak_gib": peak / GIB, "peak_reserved_gib": reserved / GIB, "seconds": best, "max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="480*832")
    parser.add_argument("--frames", type=int, default=80, help="frames per clip")
    parser.add_argument("--first", action="store_true", help="the first clip's decode (reference latent + clip)")
    parser.add_argument("--ranks", type=int, nargs="*", default=[2, 4, 8], help="sharded shares to measure")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--gather", action="store_true", help="under torchrun: sharded with its all-gather")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/vae_decode.py needs a CUDA GPU")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    height, width = (int(v) // 8 for v in args.size.split("*"))
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
            world=world,
        )
    if args.gather:
        dist.init_process_group("nccl", device_id=device)
        whole = vae.decode(latents)
        row = measure(lambda: decode_clip(vae, latents, "sharded", rank, world), args.repeat, whole)
        print(json.dumps({"mode": "sharded", "rank": rank, "ranks": world, "with_gather": True, **row}), flush=True)
        dist.destroy_process_group()
        return
    whole_row = measure(lambda: vae.decode(latents), args.repeat, None)
    whole = vae.decode(latents)
    rows = [
        {"mode": "every_rank", **whole_row},
        {"mode": "tiled", **measure(lambda: decode_clip(vae, latents, "tiled", 0, 1), args.repeat, whole)},
    ]
    for ranks in args.ranks:
        strips, _axis = shard_strips(height, width, ranks)
        for share, strip in enumerate(strips):
            row = measure(lambda strip=strip: vae.decode(latents, strip, grid=TILED_GRID), args.repeat, None)
            cut = whole[:, :, :, strip.top * 8 : strip.bottom * 8, strip.left * 8 : strip.right * 8]
            row["max_abs_diff"] = (vae.decode(latents, strip, grid=TILED_GRID) - cut).abs().max().item()
            rows.append({"mode": "sharded", "ranks": ranks, "rank": share, "with_gather": False, **row})
    for row in rows:
        row["peak_vs_whole"] = row["peak_gib"] / whole_row["peak_gib"]
        row["seconds_vs_whole"] = row["seconds"] / whole_row["seconds"]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
