"""The peak of live tensor bytes of one clip's VAE decode per ``parallel.vae`` mode, at full
size, on the CPU without computing anything: the decode runs on the meta device (shapes only)
and a dispatch mode adds up the bytes of every storage an operator allocates until the last
tensor on it is gone. This is what a caching allocator holds at least, kernel workspaces (cuDNN,
the CPU's im2col buffers) left out: an estimate of the GPU's ``max_memory_allocated`` before
bench/vae_decode.py measures it.

    python bench/vae_live_bytes.py                          # 480*832, 39 latent frames, 2 4 8 ranks
    python bench/vae_live_bytes.py --size 704*1024 --ranks 2

``sharded`` is one inner rank's share (two neighbours: the most border rows) through
``decode_clip`` under torch's fake process group (collectives move nothing), with and
without the gather of the strips. Prints one JSON line per mode: GiB and the ratio to the
whole-frame decode's. Takes a few minutes (every operator passes through Python).
"""

from __future__ import annotations

import argparse
import json
import weakref
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the fake backend
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchlib import header
from wan_exp.models.vae import SPATIAL_STRIDE, WanVAE
from wan_exp.parallel.vae import STRIP_TILES, TILED_GRID, decode_clip, shard_strip
from wan_exp.units import GIB

MOTION_LATENTS = 19


class LiveBytes(TorchDispatchMode):
    """The bytes of the storages that operators allocate, alive now (``live``) and at most (``peak``)."""

    def __init__(self) -> None:
        super().__init__()
        self.holders: dict[int, int] = {}  # storage -> how many tensors seen on it are alive
        self.nbytes: dict[int, int] = {}
        self.live = self.peak = 0

    def _release(self, storage: int) -> None:
        self.holders[storage] -= 1
        if not self.holders[storage]:
            del self.holders[storage]
            self.live -= self.nbytes.pop(storage)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key not in self.holders:
                if key in inputs:
                    continue  # a view of a tensor from before the measurement
                self.holders[key], self.nbytes[key] = 0, storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self.holders[key] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def peak_of(decode: Callable[[], torch.Tensor]) -> int:
    with LiveBytes() as live:
        pixels = decode()
        del pixels
    return live.peak


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
