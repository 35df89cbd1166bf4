"""The peak of live tensor bytes of one clip's VAE decode per ``parallel.vae`` mode, at full
size, on the CPU without computing anything: the decode runs on the meta device (shapes only)
and ``TensorMemory("meta")`` adds up the bytes of every storage an operator allocates until the
storage is freed. This is what a caching allocator holds at least, kernel workspaces (cuDNN,
the CPU's im2col buffers) left out: an estimate of the GPU's ``max_memory_allocated`` before
bench/vae_decode.py measures it.

    python bench/vae_live_bytes.py                          # 480*832, 39 latent frames, 2 4 8 ranks
    python bench/vae_live_bytes.py --size 704*1024 --ranks 2

``sharded`` is one inner rank's share (two neighbours: the most border rows) through
``decode_clip`` under torch's fake process group (collectives move nothing), with and
without the gather of the strips. Prints one JSON line per mode: GiB and the ratio to the
whole-frame decode's. Takes about ten minutes on two CPU cores (every operator passes through Python).
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the fake backend

from benchlib import header
from wan_exp.metrics.tensor_memory import TensorMemory
from wan_exp.models.vae import SPATIAL_STRIDE, WanVAE
from wan_exp.parallel.vae import STRIP_TILES, TILED_GRID, decode_clip, shard_strip
from wan_exp.units import GIB

MOTION_LATENTS = 19


def peak_of(decode: Callable[[], torch.Tensor]) -> int:
    """The most bytes of meta storages alive at once while ``decode()`` runs."""
    with TensorMemory("meta") as counter:
        pixels = decode()
        del pixels
    return counter.peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="480*832")
    parser.add_argument("--frames", type=int, default=80, help="frames per clip")
    parser.add_argument("--ranks", type=int, nargs="*", default=[2, 4, 8], help="sharded over this many ranks")
    args = parser.parse_args()
    height, width = (int(v) // SPATIAL_STRIDE for v in args.size.split("*"))
    with torch.device("meta"):
        vae = WanVAE(96).eval().requires_grad_(False)
        latents = torch.empty(1, 16, MOTION_LATENTS + args.frames // 4, height, width)
    header(size=args.size, latent_frames=latents.shape[2], tiled_grid=TILED_GRID, strip_tiles=STRIP_TILES)
    whole = peak_of(lambda: vae.decode(latents))
    tiled = peak_of(lambda: vae.decode_tiled(latents, TILED_GRID))
    rows = [{"mode": "every_rank", "gib": whole / GIB}, {"mode": "tiled", "gib": tiled / GIB}]
    for ranks in args.ranks:
        rank = 1 if ranks > 2 else 0  # an inner strip where there is one
        dist.init_process_group("cpu:fake,meta:fake", store=FakeStore(), rank=rank, world_size=ranks)
        strip = shard_strip(height, width, rank, ranks)
        own = latents.narrow(strip.dim, strip.offset, strip.lengths[rank])
        grid = (STRIP_TILES, 1) if strip.dim == -1 else (1, STRIP_TILES)
        alone = peak_of(lambda: vae.decode_tiled(own, grid, strip))
        gathered = peak_of(lambda: decode_clip(vae, latents, "sharded", rank, ranks))
        dist.destroy_process_group()
        rows.append({"mode": "sharded_strip", "ranks": ranks, "gib": alone / GIB})
        rows.append({"mode": "sharded", "ranks": ranks, "gib": gathered / GIB})
    for row in rows:
        row["vs_whole"] = row["gib"] * GIB / whole
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
