"""The Wan2.1 VAE (``Wan2.1_VAE.pth``): causal video encoder and decoder with a feature cache.

Pixels (B, 3, T, H, W) in [-1, 1] <-> latents (B, 16, 1 + (T - 1) / 4, H / 8, W / 8).

Encoder: conv (3 -> dim) -> 4 levels of two residual blocks, widths dim x (1, 2, 4, 4), each
level but the last followed by a stride-2 down-sampling in height and width (levels 1 and 2
also halve time) -> middle (residual block, single-head attention over the positions of each
frame, residual block) -> RMS norm, SiLU, conv to 2 x 16 channels -> 1x1x1 conv -> the
posterior MEAN (no sampling), normalised per channel with Wan's latent mean/std.

Decoder: the mirror image: 1x1x1 conv (``conv2``) -> conv (16 -> 4 dim) -> middle -> 4 levels
of three residual blocks, widths dim x (4, 4, 2, 1), the first two levels followed by a 2x
up-sampling of time, height and width, the third of height and width only -> RMS norm, SiLU,
conv to 3 channels; the pixels are clamped to [-1, 1].

Causal streaming, as upstream (docs/pipeline.md, "VAE"): the encoder reads the first frame
alone, then four frames at a time; the decoder one latent frame at a time. Every causal
convolution keeps the last ``kernel_t - 1`` frames of its input in a cache (a dict keyed by
the module, one per stream), so a chunk sees exactly what a causal convolution over the whole
clip would. The temporal re-samplers treat the first chunk apart: the down-sampler passes it
through and keeps its last frame, the up-sampler passes it through without time up-sampling
(so latent frame 0 <-> pixel frame 0, and every later latent frame <-> four pixel frames).

Lower-peak decoding (``decode_tiled``; parallel/vae.py runs it for ``tiled`` and ``sharded``):
the low-resolution part (conv1 + middle, where the attention over the whole frame is) runs
first on the part of the frame being decoded (the whole frame, or a rank's strip through a
``FramePart`` that fills the convolutions' padding with the neighbouring ranks' rows and gathers
the attention's keys and values), and its output is kept for every latent frame. The
up-sampling part (where the causal caches and the activations, and so the peak, are large)
then runs per spatial tile, one tile after the other, each streamed through all frames with
its own cache, one frame at a time after each time up-sampling (``Decoder.high_by_frame``), and
each level with the halo the rest of the part still reads (``_level_halos``: 13 latents, then
12, 10 and 7 pixels of the next levels). Tiles and strips equal the plain decode up to float
rounding (in fp32 the CPU's convolutions pick shape-dependent algorithms, so a tile and the
whole frame round differently).

Parameter names and shapes are those of the official file (``encoder.*``, ``conv1.*``,
``decoder.*``, ``conv2.*``). Sequential indices that hold no parameters (activations, padding,
upstream's dropout slot) are kept so that the indices of the others match.
"""

from __future__ import annotations

import logging
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from wan_exp.liveness import beat
from wan_exp.models.checkpoint import CheckpointError, check_compatible

log = logging.getLogger(__name__)

LATENT_CHANNELS = 16  # z_dim of the Wan2.1 VAE = the DiT's in_dim
SPATIAL_STRIDE = 8  # pixels per latent in height and width
TEMPORAL_STRIDE = 4  # pixel frames per latent frame after the first
WIDTH_MULTIPLIERS = (1, 2, 4, 4)  # channel width of each encoder level, times vae_dim
TEMPORAL_DOWNSAMPLE = (False, True, True)  # after encoder levels 0, 1, 2 (3 has no down-sampling)
TEMPORAL_UPSAMPLE = TEMPORAL_DOWNSAMPLE[::-1]  # after decoder levels 0, 1, 2
# Per-channel statistics of the posterior mean over Wan's training data: latents are
# (mean - LATENT_MEAN) / LATENT_STD so that the DiT sees roughly unit-variance inputs.
LATENT_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
LATENT_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)


class FramePart:
    """The part of each frame that a decode stream computes, seen by the decoder's spatial
    operations: this base class is the whole frame (zero padding at every edge, attention among
    the frame's own positions). parallel/vae.py's strips fill the padding on their inner sides
    with the neighbouring ranks' border rows and gather the attention's keys and values."""

    def pad(self, x: torch.Tensor, padding: tuple[int, ...]) -> torch.Tensor:
        """``x`` (..., H, W) padded as ``F.pad(x, padding)`` pads it (width first)."""
        return F.pad(x, padding)

    def conv2d(self, conv: nn.Conv2d, frames: torch.Tensor) -> torch.Tensor:
        """The 2-D ``conv`` (with its own zero padding) over (N, C, H, W) frames of this part."""
        return conv(frames)

    def whole_frame(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) frames of this part -> the same of the whole frame."""
        return frames


WHOLE_FRAME = FramePart()


class Cache(dict):
    """One stream's state: module -> what it keeps between the stream's chunks, and the part
    of the frame the stream computes (``part``)."""

    def __init__(self, part: FramePart = WHOLE_FRAME) -> None:
        super().__init__()
        self.part = part


def _part(cache: Optional[Cache]) -> FramePart:
    return WHOLE_FRAME if cache is None else cache.part


class CausalConv3d(nn.Conv3d):
    """A 3-D convolution over (time, height, width) that never looks at later frames: time is
    padded with kernel_t - 1 frames in front (zeros, or the cached frames of the previous chunk)
    and none behind; height and width keep their size (symmetric padding of kernel // 2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int]) -> None:
        kernel = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__(in_channels, out_channels, kernel)
        self.time_context = kernel[0] - 1
        self.spatial_padding = (kernel[2] // 2, kernel[2] // 2, kernel[1] // 2, kernel[1] // 2)

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        context = x
        if cache is not None and self.time_context:
            previous = cache.get(self)
            context = x if previous is None else torch.cat([previous, x], dim=2)
            cache[self] = context[:, :, -self.time_context :].clone()
        front = self.time_context - (context.shape[2] - x.shape[2])
        return super().forward(_part(cache).pad(context, (*self.spatial_padding, front, 0)))


class ChannelRMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(channels) * gamma: RMS normalisation over the channel axis
    (dim 1) of a (B, C, ...) tensor, no mean subtraction, no bias. ``spatial_dims`` is the
    number of axes after C (3 for video, 2 for images), which gives gamma its shape."""

    def __init__(self, channels: int, spatial_dims: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * (x.shape[1] ** 0.5) * self.gamma


def _per_frame(layer: Any, video: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D ``layer`` to each frame of (B, C, T, H, W)."""
    b, _, t = video.shape[:3]
    frames = layer(video.transpose(1, 2).flatten(0, 1))
    return frames.unflatten(0, (b, t)).transpose(1, 2)


def _run(layers: nn.Sequential, x: torch.Tensor, cache: Optional[Cache]) -> torch.Tensor:
    """Run a sequence of layers, handing the stream's cache to those that keep one."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, ResidualBlock, Resample, AttentionBlock)) else layer(x)
    return x


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            ChannelRMSNorm(in_channels, spatial_dims=3),
            nn.SiLU(),
            CausalConv3d(in_channels, out_channels, 3),
            ChannelRMSNorm(out_channels, spatial_dims=3),
            nn.SiLU(),
            nn.Identity(),  # upstream's dropout (p=0) sits here; it keeps index 6 for the conv
            CausalConv3d(out_channels, out_channels, 3),
        )
        # a 1x1x1 projection where the width changes, else the identity
        self.shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        return self.shortcut(x) + _run(self.residual, x, cache)


class Resample(nn.Module):
    """Base of the two re-samplers (they take the stream's cache)."""


class Downsample(Resample):
    """Halve height and width: pad one zero row/column at the bottom/right, then a 3x3
    convolution of stride 2 on each frame. ``temporal`` then halves time with ``time_conv``
    (kernel 3, stride 2, no padding) over the last frame of the previous chunk and this chunk;
    the first chunk passes through (see the module docstring)."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(channels, channels, 3, stride=2))
        self.temporal = temporal
        if temporal:
            self.time_conv = nn.Conv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        x = _per_frame(self.resample, x)
        if not self.temporal:
            return x
        if cache is None:
            if x.shape[2] != 1:
                raise ValueError("the VAE encoder reads a video as a stream: pass a cache (WanVAE.encode)")
            return x
        previous = cache.get(self)
        cache[self] = x[:, :, -1:].clone()
        return x if previous is None else self.time_conv(torch.cat([previous, x], dim=2))


class Upsample(Resample):
    """Double height and width (nearest neighbour, then a 3x3 conv halving the channels) of
    each frame; ``temporal`` first doubles time with ``time_conv`` (a causal conv to twice the
    channels, whose two halves become two consecutive frames), except for the first chunk."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(channels, channels // 2, 3, padding=1)
        )
        self.temporal = temporal
        if temporal:
            self.time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1))

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        if self.temporal:
            if cache is None:
                if x.shape[2] != 1:
                    raise ValueError("the VAE decoder reads latents as a stream: pass a cache (WanVAE.decode)")
            elif self not in cache:
                cache[self] = True  # the first chunk: no time up-sampling
            else:
                b, c, t, h, w = x.shape
                pairs = self.time_conv(x, cache).view(b, 2, c, t, h, w)
                x = torch.stack((pairs[:, 0], pairs[:, 1]), dim=3).reshape(b, c, 2 * t, h, w)
        upsample, conv = self.resample
        part = _part(cache)
        return _per_frame(lambda frames: part.conv2d(conv, upsample(frames)), x)


class AttentionBlock(nn.Module):
    """Single-head self-attention among the positions of each frame, with a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = ChannelRMSNorm(channels, spatial_dims=2)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def attend(self, frames: torch.Tensor, part: FramePart) -> torch.Tensor:
        n, c, h, w = frames.shape
        qkv = self.to_qkv(self.norm(frames))  # (N, 3C, H, W): queries, keys, values
        k, v = part.whole_frame(qkv[:, c:]).chunk(2, dim=1)  # of every position of the frame

        def tokens(maps: torch.Tensor) -> torch.Tensor:  # (N, 1 head, positions, C), as upstream
            return maps.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()

        # the part's queries against the whole frame; with a head axis the CPU, like a GPU,
        # runs a fused kernel that holds no positions^2 matrix
        out = F.scaled_dot_product_attention(tokens(qkv[:, :c]), tokens(k), tokens(v))  # scale 1/sqrt(C)
        return self.proj(out.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        part = _part(cache)
        return x + _per_frame(lambda frames: self.attend(frames, part), x)


def _middle(width: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(width, width), AttentionBlock(width), ResidualBlock(width, width))


def _head(width: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(ChannelRMSNorm(width, spatial_dims=3), nn.SiLU(), CausalConv3d(width, out_channels, 3))


class Encoder(nn.Module):
    """Pixels (B, 3, T, H, W) -> (B, out_channels, T', H/8, W/8) before the posterior split."""

    def __init__(self, dim: int, out_channels: int) -> None:
        super().__init__()
        widths = [dim] + [dim * m for m in WIDTH_MULTIPLIERS]
        self.conv1 = CausalConv3d(3, dim, 3)
        layers: list[nn.Module] = []
        for level, (in_width, width) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [ResidualBlock(in_width, width), ResidualBlock(width, width)]
            if level < len(TEMPORAL_DOWNSAMPLE):
                layers.append(Downsample(width, temporal=TEMPORAL_DOWNSAMPLE[level]))
        self.downsamples = nn.Sequential(*layers)
        top = widths[-1]
        self.middle = _middle(top)
        self.head = _head(top, out_channels)

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        x = _run(self.downsamples, self.conv1(x, cache), cache)
        return _run(self.head, _run(self.middle, x, cache), cache)


class Decoder(nn.Module):
    """Latents after ``conv2`` (B, 16, T, h, w) -> pixels (B, 3, T', 8h, 8w), in two parts:
    ``low`` (conv1 + middle, at latent resolution, attention over the whole frame) and
    ``high`` (up-sampling levels + head, local: it can run per spatial tile)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        widths = [dim * m for m in (WIDTH_MULTIPLIERS[-1], *WIDTH_MULTIPLIERS[::-1])]  # 4,4,4,2,1
        self.conv1 = CausalConv3d(LATENT_CHANNELS, widths[0], 3)
        self.middle = _middle(widths[0])
        layers: list[nn.Module] = []
        for level, (in_width, width) in enumerate(zip(widths[:-1], widths[1:])):
            if level > 0:
                in_width //= 2  # the up-sampling conv before this level halved the channels
            for _ in range(3):
                layers.append(ResidualBlock(in_width, width))
                in_width = width
            if level < len(TEMPORAL_UPSAMPLE):
                layers.append(Upsample(width, temporal=TEMPORAL_UPSAMPLE[level]))
        self.upsamples = nn.Sequential(*layers)
        self.head = _head(widths[-1], 3)
        self.level_halos = _level_halos(self.upsamples, self.head)

    def low(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        return _run(self.middle, self.conv1(x, cache), cache)

    def high(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        return _run(self.head, _run(self.upsamples, x, cache), cache)

    def high_by_frame(
        self, x: torch.Tensor, cache: Cache, window: Optional[Window] = None, start: int = 0
    ) -> Iterator[torch.Tensor]:
        """``high`` of one chunk run depth first: the frames a time up-sampling makes go on one at
        a time, each through the rest of the part before the next, so the levels after it hold
        one frame's activations instead of the chunk's. Yields the chunk's pixels one frame at a
        time, in order: the values of ``high`` (a causal cache makes a chunk and its frames one
        by one equal).

        With a ``window`` (``x`` holds ``window.held`` of the frame), each level starts from its
        tile with only the halo that level still needs (``level_halos``): the recomputed border
        shrinks as the resolution grows, and the pixels yielded are the tile's alone."""
        for index in range(start, len(self.upsamples)):
            if window is not None and index in self.level_halos:
                x, window = window.crop(x, self.level_halos[index])
            layer = self.upsamples[index]
            x = layer(x, cache)
            if isinstance(layer, Upsample):
                window = None if window is None else window.doubled()
                if layer.temporal and x.shape[2] > 1:
                    for t in range(x.shape[2]):
                        yield from self.high_by_frame(x[:, :, t : t + 1], cache, window, index + 1)
                    return
        pixels = _run(self.head, x, cache)
        yield pixels if window is None else window.crop(pixels, 0)[0]

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        return self.high(self.low(x, cache), cache)


@dataclass(frozen=True)
class Tile:
    """A rectangle of the latent frame, rows [top, bottom) and columns [left, right)."""

    top: int
    bottom: int
    left: int
    right: int


@dataclass(frozen=True)
class Window:
    """A tile's stream through the up-sampling part: the ``tile`` it makes (latent rows and
    columns of the part of the frame being decoded), the rows and columns its tensor now
    holds (``held``, in pixels of the current resolution) and that resolution (``scale``
    pixels per latent)."""

    tile: Tile
    held: Tile
    scale: int = 1

    def crop(self, x: torch.Tensor, halo: int) -> tuple[torch.Tensor, Window]:
        """``x`` (..., H, W) cut to the tile plus ``halo`` pixels on every side, as far as it
        holds them (the edges of the part), and the window of what is left."""
        s, tile, held = self.scale, self.tile, self.held
        kept = Tile(
            max(tile.top * s - halo, held.top),
            min(tile.bottom * s + halo, held.bottom),
            max(tile.left * s - halo, held.left),
            min(tile.right * s + halo, held.right),
        )
        rows = slice(kept.top - held.top, kept.bottom - held.top)
        cols = slice(kept.left - held.left, kept.right - held.left)
        return x[..., rows, cols], Window(tile, kept, s)

    def doubled(self) -> Window:
        """The window after a nearest-neighbour doubling of height and width."""
        held = self.held
        return Window(self.tile, Tile(2 * held.top, 2 * held.bottom, 2 * held.left, 2 * held.right), 2 * self.scale)


def _reach(module: nn.Module) -> int:
    """Pixels beyond an output pixel that the 3-D convolutions of ``module``, one after the
    other, read (a residual block's 1x1 shortcut reads none, its two 3x3 convs one each)."""
    return sum(max(conv.spatial_padding) for conv in module.modules() if isinstance(conv, CausalConv3d))


def _level_halos(upsamples: nn.Sequential, head: nn.Sequential) -> dict[int, int]:
    """Index of each up-sampling level's first layer -> the halo its tiles need, in that
    level's pixels, for the tile's pixels to equal the whole frame's: the receptive field of
    the rest of the part, walked back from the head. Each 3x3 convolution adds one pixel; an
    up-sampler's 3x3 convolution adds one at the doubled resolution, and the nearest-neighbour
    doubling before it (output i reads input i // 2) halves, rounding up. For the Wan decoder:
    13, 12, 10 and 7 (latents at the first level: 12.25 rounded up level by level)."""
    halo = _reach(head)
    halos = {}
    for index in reversed(range(len(upsamples))):
        layer = upsamples[index]
        if isinstance(layer, Upsample):
            halos[index + 1] = halo
            halo = -(-(halo + layer.resample[1].padding[0]) // 2)
        else:
            halo += _reach(layer)
    halos[0] = halo
    return halos


def grid_tiles(height: int, width: int, rows: int, cols: int) -> list[Tile]:
    """``rows`` x ``cols`` tiles covering a latent frame of height x width (sizes differ by at
    most one; rows/cols are capped at the frame's size)."""
    rows, cols = min(rows, height), min(cols, width)
    row_edges = [round(i * height / rows) for i in range(rows + 1)]
    col_edges = [round(j * width / cols) for j in range(cols + 1)]
    return [
        Tile(row_edges[i], row_edges[i + 1], col_edges[j], col_edges[j + 1]) for i in range(rows) for j in range(cols)
    ]


class WanVAE(nn.Module):
    """The whole Wan2.1 VAE: ``encode`` pixels -> normalised latents, ``decode`` back."""

    def __init__(self, dim: int = 96) -> None:
        super().__init__()
        self.encoder = Encoder(dim, 2 * LATENT_CHANNELS)
        self.conv1 = CausalConv3d(2 * LATENT_CHANNELS, 2 * LATENT_CHANNELS, 1)
        self.conv2 = CausalConv3d(LATENT_CHANNELS, LATENT_CHANNELS, 1)
        self.decoder = Decoder(dim)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, LATENT_CHANNELS, 1, 1, 1)
        return (
            torch.tensor(LATENT_MEAN, device=like.device, dtype=like.dtype).view(shape),
            torch.tensor(LATENT_STD, device=like.device, dtype=like.dtype).view(shape),
        )

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 1 + 4k, H, W) in [-1, 1], H and W multiples of 8 -> (B, 16, 1 + k, H/8, W/8):
        the first frame alone, then four at a time, through one cache."""
        frames = pixels.shape[2]
        if pixels.dim() != 5 or pixels.shape[1] != 3 or (frames - 1) % TEMPORAL_STRIDE:
            raise ValueError(f"WanVAE.encode takes RGB video (B, 3, 1 + 4k, H, W), got {tuple(pixels.shape)}")
        cache = Cache()
        chunks = [pixels[:, :, :1]] + [pixels[:, :, i : i + TEMPORAL_STRIDE] for i in range(1, frames, TEMPORAL_STRIDE)]
        features = torch.cat(
            [self._encode_chunk(chunk, cache, i, len(chunks)) for i, chunk in enumerate(chunks)], dim=2
        )
        mean, _log_var = self.conv1(features).chunk(2, dim=1)
        shift, scale = self._latent_stats(mean)
        return (mean - shift) / scale

    def _encode_chunk(self, chunk: torch.Tensor, cache: Cache, index: int, count: int) -> torch.Tensor:
        beat(f"encode chunk {index + 1}/{count}")  # the rank's heartbeat (wan_exp.liveness)
        return self.encoder(chunk, cache)

    def _unnormalised(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> the decoder's input (``conv2`` of the posterior mean)."""
        shift, scale = self._latent_stats(latents)
        return self.conv2(latents * scale + shift)

    @staticmethod
    def _pixels_like(x: torch.Tensor) -> torch.Tensor:
        """The (empty) pixels of a decode whose input after ``conv2`` is ``x``."""
        b, _, t, h, w = x.shape
        return x.new_empty((b, 3, 1 + TEMPORAL_STRIDE * (t - 1), h * SPATIAL_STRIDE, w * SPATIAL_STRIDE))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 16, T, h, w) normalised latents -> pixels (B, 3, 1 + 4(T - 1), 8h, 8w) in [-1, 1],
        as upstream decodes: one latent frame at a time through the whole decoder, one cache."""
        x = self._unnormalised(latents)
        out = self._pixels_like(x)
        cache = Cache()
        first = 0
        for t in range(x.shape[2]):
            beat(f"decode frame {t + 1}/{x.shape[2]}")  # the rank's heartbeat (wan_exp.liveness)
            pixels = self.decoder(x[:, :, t : t + 1], cache)
            out[:, :, first : first + pixels.shape[2]] = pixels
            first += pixels.shape[2]
        return out.clamp_(-1.0, 1.0)

    @torch.no_grad()
    def decode_tiled(self, latents: torch.Tensor, grid: tuple[int, int], part: FramePart = WHOLE_FRAME) -> torch.Tensor:
        """``decode``'s pixels of ``part`` of the frame (from that part's latents), in ``grid``
        (rows, columns) spatial tiles of the part, one tile after the other.

        The low-resolution part (where the attention is) runs first, on the part, one latent
        frame at a time, and its output is kept for every frame. Each tile then streams through
        all frames with its own cache (``Decoder.high_by_frame``: one frame at a time after
        each time up-sampling, each level with the halo it still needs) before the next starts:
        one tile's caches and one frame's activations are alive at a time. Spatial operations
        reach past the part through ``part``, past a tile by recomputing its halo; a tile must
        therefore span a part that is not the whole frame along the axis ``part`` cuts."""
        x = self._unnormalised(latents)
        out = self._pixels_like(x)
        low_cache = Cache(part)
        low_frames = []
        for t in range(x.shape[2]):
            beat(f"decode frame {t + 1}/{x.shape[2]} (low resolution)")  # the rank's heartbeat (wan_exp.liveness)
            low_frames.append(self.decoder.low(x[:, :, t : t + 1], low_cache))
        low = torch.cat(low_frames, dim=2)
        del low_frames, low_cache, x
        height, width = low.shape[3], low.shape[4]
        s = SPATIAL_STRIDE
        for tile in grid_tiles(height, width, *grid):
            rows, cols = slice(tile.top * s, tile.bottom * s), slice(tile.left * s, tile.right * s)
            cache = Cache(part)
            window = Window(tile, Tile(0, height, 0, width))
            frame = 0
            for t in range(low.shape[2]):
                beat(
                    f"decode tile rows {tile.top}-{tile.bottom} cols {tile.left}-{tile.right}, "
                    f"frame {t + 1}/{low.shape[2]}"
                )
                for pixels in self.decoder.high_by_frame(low[:, :, t : t + 1], cache, window):
                    out[:, :, frame, rows, cols] = pixels[:, :, 0]
                    frame += 1
            del cache
        return out.clamp_(-1.0, 1.0)


# ============================================================================ loading
def vae_checkpoint_path(model_cfg: Any) -> Path:
    """``model.checkpoint_dir`` / ``model.vae_checkpoint``; CheckpointError if it is not there."""
    if not model_cfg.checkpoint_dir or not model_cfg.vae_checkpoint:
        raise CheckpointError(
            "loading the VAE needs model.checkpoint_dir (the official folder) and model.vae_checkpoint "
            "(the file in it, Wan2.1_VAE.pth)"
        )
    path = Path(model_cfg.checkpoint_dir) / model_cfg.vae_checkpoint
    if not path.is_file():
        raise CheckpointError(
            f"{path}: VAE checkpoint not found (model.checkpoint_dir={model_cfg.checkpoint_dir!r}, "
            f"model.vae_checkpoint={model_cfg.vae_checkpoint!r}); copy Wan2.1_VAE.pth from the "
            "official Wan2.2-S2V-14B folder there, or leave model.checkpoint_dir unset for random weights"
        )
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A torch.save file in any of its formats: zip (memory-mapped), the older pickle stream,
    or the oldest tar format. Upstream Wan2.2 loads Wan2.1_VAE.pth with weights_only=False
    because the file is in the tar format, which torch refuses to read with weights_only=True;
    so full unpickling is allowed for a tar file only (the user's own official download)."""
    is_zip = zipfile.is_zipfile(path)
    is_tar = not is_zip and tarfile.is_tarfile(path)
    try:
        return torch.load(path, map_location="cpu", mmap=is_zip, weights_only=not is_tar)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read the VAE checkpoint ({err})") from err


class _StateDictShapes:
    """A state dict seen as a weight source for checkpoint.check_compatible."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)


def load_vae(path: str | Path, dim: int, device: torch.device | str, dtype: torch.dtype) -> WanVAE:
    """The whole VAE from an official-layout file, in eval mode. A missing or unexpected tensor,
    or a wrong shape, is a CheckpointError naming it."""
    state = read_state_dict(path)
    log.info("%s: loading the VAE (%d tensors)", path, len(state))
    with torch.device("meta"):
        model = WanVAE(dim)
    try:
        check_compatible(model, _StateDictShapes(state))
    except CheckpointError as err:
        raise CheckpointError(f"{path} (model.vae_dim={dim}): {err}") from None
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def build_vae(model_cfg: Any, device: torch.device | str, dtype: torch.dtype = torch.float32) -> WanVAE:
    """The VAE of a job: the official file when ``model.checkpoint_dir`` is set, else random
    weights (deterministic by ``model.seed``) of width ``model.vae_dim``. Upstream S2V runs the
    VAE in fp32."""
    if model_cfg.checkpoint_dir:
        return load_vae(vae_checkpoint_path(model_cfg), model_cfg.vae_dim, device, dtype)
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(model_cfg.seed)
        with torch.device(device):
            model = WanVAE(model_cfg.vae_dim).to(dtype)
    return model.eval().requires_grad_(False)
