"""Where each clip's VAE decode (and the motion re-encode after it) runs: ``parallel.vae``.

- ``every_rank`` (upstream S2V): every rank decodes the whole clip and re-encodes the motion
  frames itself.
- ``rank0`` (upstream T2V, the "GPU 0 overloaded" case): rank 0 decodes and re-encodes, then
  broadcasts the motion latents; the other ranks hold no pixels.
- ``tiled``: every rank decodes the whole clip in ``TILED_GRID`` spatial tiles, one tile after
  the other through all frames, one frame at a time above the time up-sampling, so that only
  one tile's causal cache and one frame's activations are alive at a time (a lower peak, more
  compute: each tile recomputes its halo).
- ``sharded``: the frame is cut into one strip per rank along its longer side; each rank
  decodes its strip alone through the whole decoder, exchanging border rows with the
  neighbouring ranks before every spatial convolution and gathering the attention's keys and
  values (``Strip``), itself in ``STRIP_TILES`` tiles across the strip one after the other as
  ``tiled`` runs them; the strips' pixels are then gathered, so every rank ends with the whole
  clip.

``rank`` and ``world_size`` are the rank's place among the ranks that make the clip and their
number, and ``group`` their process group (None: the default group): with several dp groups
(parallel.dp_degree) each group decodes its own clip, so "rank 0", "every rank" and the strips'
neighbours are the group's.

All equal the plain decode up to float rounding (tests/test_pipeline.py measures it).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from wan_exp.geometry import strip_axis
from wan_exp.models.vae import FramePart, WanVAE

VAE_MODES = ("every_rank", "rank0", "tiled", "sharded")
TILED_GRID = (2, 2)  # rows x columns of latent tiles for parallel.vae=tiled
STRIP_TILES = 2  # tiles along each strip of parallel.vae=sharded, one after the other


class Strip(FramePart):
    """This rank's strip of the frame for ``parallel.vae=sharded``: rank r holds ``lengths[r]``
    latents along ``dim`` (-1: a strip of columns, -2: of rows), in rank order, at every
    resolution of the decoder (a strip ``scale`` times its latent length at ``scale`` times the
    latent resolution).

    The padding of a spatial convolution on the strip's inner sides is filled with the border
    rows of the neighbouring ranks (point to point, before every such convolution), zeros at
    the frame's edges: each rank's convolution then sums exactly the terms of the whole frame's.
    The attention's keys and values are gathered from every rank (at latent resolution).
    ``rank`` is the place in ``group`` (None: the default group) of the ranks that share the frame."""

    def __init__(self, rank: int, lengths: list[int], dim: int, group: Optional[ProcessGroup] = None) -> None:
        if dim not in (-1, -2):
            raise ValueError(f"a strip is cut along the rows (-2) or the columns (-1), got dim={dim}")
        self.rank, self.lengths, self.dim, self.group = rank, lengths, dim, group
        self.offset = sum(lengths[:rank])  # the strip's first latent along ``dim``

    def _scale(self, x: torch.Tensor) -> int:
        """The resolution of ``x`` in multiples of the latent one."""
        return x.shape[self.dim] // self.lengths[self.rank]

    def pad(self, x: torch.Tensor, padding: tuple[int, ...]) -> torch.Tensor:
        pair = -1 - self.dim  # F.pad lists the last dimension first
        before, after = padding[2 * pair], padding[2 * pair + 1]
        padded = F.pad(x, padding)
        ops, received = [], []
        size = x.shape[self.dim]
        if self.rank > 0 and (before or after):  # the previous strip: our first rows, its last ones
            ops.append(self._p2p(dist.isend, x.narrow(self.dim, 0, after).contiguous(), self.rank - 1))
            border = x.new_empty(_resized(x.shape, self.dim, before))
            ops.append(self._p2p(dist.irecv, border, self.rank - 1))
            received.append((border, 0))
        if self.rank < len(self.lengths) - 1 and (before or after):  # the next strip: the other way round
            ops.append(self._p2p(dist.isend, x.narrow(self.dim, size - before, before).contiguous(), self.rank + 1))
            border = x.new_empty(_resized(x.shape, self.dim, after))
            ops.append(self._p2p(dist.irecv, border, self.rank + 1))
            received.append((border, before + size))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        for border, start in received:
            _inside_padding(padded, x.shape, padding, self.dim, start, border.shape[self.dim]).copy_(border)
        return padded

    def _p2p(self, op: Callable, tensor: torch.Tensor, peer: int) -> dist.P2POp:
        return dist.P2POp(op, tensor, group=self.group, group_peer=peer)

    def conv2d(self, conv: nn.Conv2d, frames: torch.Tensor) -> torch.Tensor:
        rows, cols = conv.padding
        return F.conv2d(self.pad(frames, (cols, cols, rows, rows)), conv.weight, conv.bias, conv.stride)

    def whole_frame(self, frames: torch.Tensor) -> torch.Tensor:
        """Every rank's strip, in order along ``dim``, from one broadcast per rank into one tensor
        (the whole frame, this strip and one other strip alive at a time)."""
        if len(self.lengths) == 1:
            return frames
        scale = self._scale(frames)
        whole = frames.new_empty(_resized(frames.shape, self.dim, scale * sum(self.lengths)))
        offset = 0
        for rank, length in enumerate(self.lengths):
            if rank == self.rank:
                piece = frames.contiguous()
            else:
                piece = frames.new_empty(_resized(frames.shape, self.dim, scale * length))
            dist.broadcast(piece, group=self.group, group_src=rank)
            whole.narrow(self.dim, offset, scale * length).copy_(piece)
            offset += scale * length
            del piece
        return whole


def _resized(shape: torch.Size, dim: int, length: int) -> list[int]:
    resized = list(shape)
    resized[dim] = length
    return resized


def _inside_padding(
    padded: torch.Tensor, shape: torch.Size, padding: tuple[int, ...], dim: int, start: int, length: int
) -> torch.Tensor:
    """The view of ``padded`` (``F.pad`` of a tensor of ``shape`` by ``padding``) at rows
    [start, start + length) along ``dim``, and where the unpadded tensor lies along the others."""
    view = padded
    for pair in range(len(padding) // 2):
        axis = padded.dim() - 1 - pair
        if axis == padded.dim() + dim:
            view = view.narrow(axis, start, length)
        else:
            view = view.narrow(axis, padding[2 * pair], shape[axis])
    return view


def shard_strip(height: int, width: int, rank: int, world_size: int, group: Optional[ProcessGroup] = None) -> Strip:
    """Rank ``rank``'s strip of a latent frame of height x width: one strip per rank along the
    longer axis, lengths differing by at most one."""
    along_width, length = strip_axis(height, width, world_size)
    edges = [round(r * length / world_size) for r in range(world_size + 1)]
    return Strip(rank, [b - a for a, b in zip(edges[:-1], edges[1:])], -1 if along_width else -2, group)


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
    if mode == "every_rank" or (mode == "rank0" and rank == 0):
        return vae.decode(latents)
    if mode == "rank0":
        return None
    if mode == "tiled":
        return vae.decode_tiled(latents, TILED_GRID)
    if mode == "sharded":
        strip = shard_strip(latents.shape[3], latents.shape[4], rank, world_size, group)
        own = latents.narrow(strip.dim, strip.offset, strip.lengths[rank])
        grid = (STRIP_TILES, 1) if strip.dim == -1 else (1, STRIP_TILES)  # tiles span the strip's width
        return strip.whole_frame(vae.decode_tiled(own, grid, strip))
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
