"""Where each clip's VAE decode (and the motion re-encode after it) runs: ``parallel.vae``.

- ``every_rank`` (upstream S2V): every rank decodes the whole clip and re-encodes the motion
  frames itself.
- ``rank0`` (upstream T2V, the "GPU 0 overloaded" case): rank 0 decodes and re-encodes, then
  broadcasts the motion latents; the other ranks hold no pixels.
- ``tiled``: every rank decodes the whole clip in ``TILED_GRID`` spatial tiles, one tile after
  the other through all frames, so that only one tile's causal cache and activations are alive
  at a time (a lower peak, more compute: each tile recomputes its halo).
- ``sharded``: the frame is cut into one strip per rank along its longer side; each rank
  decodes its strip, itself in ``TILED_GRID`` tiles one after the other, and the strips are
  all-gathered, so every rank ends with the whole clip.

``rank`` and ``world_size`` are the rank's place among the ranks that make the clip and their
number, and ``group`` their process group (None: the default group): with several dp groups
(parallel.dp_degree) each group decodes its own clip, so "rank 0" and "every rank" are the
group's.

Tiles and strips equal the whole-frame decode up to float rounding (models/vae.py: the
attention runs on the whole frame, the local part per tile with a halo covering its
receptive field); tests/test_pipeline.py measures it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from wan_exp.geometry import strip_axis
from wan_exp.models.vae import SPATIAL_STRIDE, Tile, WanVAE, grid_tiles

VAE_MODES = ("every_rank", "rank0", "tiled", "sharded")
TILED_GRID = (2, 2)  # rows x columns of latent tiles for parallel.vae=tiled (and within a strip)


def shard_strips(height: int, width: int, world_size: int) -> tuple[list[Tile], int]:
    """One strip per rank along the longer latent axis: (strips, the pixel axis they split)."""
    along_width, _ = strip_axis(height, width, world_size)
    strips = grid_tiles(height, width, 1, world_size) if along_width else grid_tiles(height, width, world_size, 1)
    return strips, 4 if along_width else 3


def _all_gather_strips(
    piece: torch.Tensor, strips: list[Tile], axis: int, group: Optional[ProcessGroup] = None
) -> torch.Tensor:
    """Every rank's strip of pixels, concatenated along ``axis`` (strips may differ by one latent)."""
    sizes = [((s.right - s.left) if axis == 4 else (s.bottom - s.top)) * SPATIAL_STRIDE for s in strips]
    padded = torch.nn.functional.pad(piece, [0, 0] * (4 - axis) + [0, max(sizes) - piece.shape[axis]])
    gathered = [torch.empty_like(padded) for _ in strips]
    dist.all_gather(gathered, padded.contiguous(), group=group)
    return torch.cat([g.narrow(axis, 0, size) for g, size in zip(gathered, sizes)], dim=axis)


def decode_clip(
    vae: WanVAE,
    latents: torch.Tensor,
    mode: str,
    rank: int,
    world_size: int,
    group: Optional[ProcessGroup] = None,
) -> Optional[torch.Tensor]:
    """Latents (1, 16, T, h, w) -> pixels (1, 3, 1 + 4(T - 1), 8h, 8w) in [-1, 1] on the ranks
    that hold pixels in ``mode`` (None on the others)."""
    height, width = latents.shape[3], latents.shape[4]
    if mode == "every_rank" or (mode == "rank0" and rank == 0):
        return vae.decode(latents)
    if mode == "rank0":
        return None
    if mode == "tiled":
        return vae.decode(latents, grid=TILED_GRID)
    if mode == "sharded":
        strips, axis = shard_strips(height, width, world_size)
        piece = vae.decode(latents, strips[rank], grid=TILED_GRID)
        return _all_gather_strips(piece, strips, axis, group) if world_size > 1 else piece
    raise ValueError(f"parallel.vae={mode!r} is not one of {VAE_MODES}")


def encode_motion(
    vae: WanVAE,
    pixels: Optional[torch.Tensor],
    mode: str,
    rank: int,
    world_size: int,
    latent_shape: tuple[int, ...],
    group: Optional[ProcessGroup] = None,
) -> torch.Tensor:
    """The motion latents (``latent_shape``) of the motion buffer's pixel frames on every rank:
    encoded where the pixels are; under ``rank0`` broadcast from rank 0."""
    if pixels is not None:
        motion = vae.encode(pixels)
    else:
        param = next(vae.parameters())
        motion = torch.empty(latent_shape, device=param.device, dtype=param.dtype)
    if mode == "rank0" and world_size > 1:
        dist.broadcast(motion, group=group, group_src=0)
    return motion
