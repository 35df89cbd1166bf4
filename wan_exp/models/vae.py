"""The encoder half of the Wan2.1 VAE, for one image: the S2V reference frame -> latents.

What it computes, for pixels (B, 3, 1, H, W) in [-1, 1]:

    conv (3 -> dim) -> 4 levels of two residual blocks, widths dim x (1, 2, 4, 4), each level
    but the last followed by a stride-2 down-sampling in height and width -> middle (residual
    block, single-head attention over the H/8 x W/8 positions, residual block) -> RMS norm,
    SiLU, conv to 2 x 16 channels -> 1x1x1 conv -> split into posterior mean and log-variance

and returns the posterior MEAN (no sampling), normalised per channel with Wan's latent
mean/std: (B, 16, 1, H/8, W/8), what the DiT takes as ``ref``.

ONE FRAME ONLY. Upstream encodes a video causally, the first frame alone and then groups of
four frames that see cached features of the frames before. For the first frame every causal
time padding is zeros, so a 3-D convolution reduces to its last temporal kernel slice, and
the temporal down-sampling convolutions (``time_conv``) are not applied at all (upstream
only caches the first frame for them). This module implements exactly that first-frame path;
``time_conv`` weights exist so that the official file loads, and are never used. A clip of
more than one frame is refused.

Parameter names and shapes are those of the official ``Wan2.1_VAE.pth`` (``encoder.*`` and
``conv1.*``), so its encoder part loads without renaming; its decoder part (``decoder.*``,
``conv2.*``) is skipped on purpose. Sequential indices that hold no parameters (activations,
padding, upstream's dropout slot) are kept so that the indices of the others match.
"""
from __future__ import annotations

import logging
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from wan_exp.models.checkpoint import CheckpointError, check_compatible

log = logging.getLogger(__name__)

LATENT_CHANNELS = 16  # z_dim of the Wan2.1 VAE = the DiT's in_dim
WIDTH_MULTIPLIERS = (1, 2, 4, 4)  # channel width of each level, times vae_dim
TEMPORAL_DOWNSAMPLE = (False, True, True)  # after levels 0, 1, 2 (3 has no down-sampling)
# Per-channel statistics of the posterior mean over Wan's training data: latents are
# (mean - LATENT_MEAN) / LATENT_STD so that the DiT sees roughly unit-variance inputs.
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
# tensors of the official file that belong to the decoder, which we never build
DECODER_PREFIXES = ("decoder.", "conv2.")


class CausalConv3d(nn.Conv3d):
    """A 3-D convolution over (time, height, width) that never looks at later frames:
    time is padded with kernel_t - 1 zero frames in front and none behind; height and width
    keep their size (symmetric padding of kernel // 2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size)
        half = kernel_size // 2
        self.causal_padding = (half, half, half, half, kernel_size - 1, 0)  # F.pad order: W, H, T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.causal_padding))


class ChannelRMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(channels) * gamma: RMS normalisation over the channel axis
    (dim 1) of a (B, C, ...) tensor, no mean subtraction, no bias. ``spatial_dims`` is the
    number of axes after C (3 for video, 2 for images), which gives gamma its shape."""

    def __init__(self, channels: int, spatial_dims: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * (x.shape[1] ** 0.5) * self.gamma


def _per_frame(layer: nn.Module, video: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D ``layer`` to each frame of (B, C, T, H, W)."""
    b, _, t = video.shape[:3]
    frames = layer(video.transpose(1, 2).flatten(0, 1))
    return frames.unflatten(0, (b, t)).transpose(1, 2)


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            ChannelRMSNorm(in_channels, spatial_dims=3), nn.SiLU(),
            CausalConv3d(in_channels, out_channels, 3),
            ChannelRMSNorm(out_channels, spatial_dims=3), nn.SiLU(),
            nn.Identity(),  # upstream's dropout (p=0) sits here; it keeps index 6 for the conv
            CausalConv3d(out_channels, out_channels, 3),
        )
        # a 1x1x1 projection where the width changes, else the identity
        self.shortcut = (CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.residual(x)


class Downsample(nn.Module):
    """Halve height and width: pad one zero row/column at the bottom/right, then a 3x3
    convolution of stride 2 on each frame. ``temporal`` adds the (unused) time_conv, see the
    module docstring."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(channels, channels, 3, stride=2))
        if temporal:
            self.time_conv = nn.Conv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _per_frame(self.resample, x)


class AttentionBlock(nn.Module):
    """Single-head self-attention among the positions of each frame, with a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = ChannelRMSNorm(channels, spatial_dims=2)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def attend(self, frames: torch.Tensor) -> torch.Tensor:
        n, c, h, w = frames.shape
        tokens = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2)  # (N, H*W, 3C)
        q, k, v = tokens.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H*W, C), scale 1/sqrt(C)
        return self.proj(out.transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _per_frame(self.attend, x)


class Encoder(nn.Module):
    """Pixels (B, 3, 1, H, W) -> (B, out_channels, 1, H/8, W/8) before the posterior split."""

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
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        self.head = nn.Sequential(ChannelRMSNorm(top, spatial_dims=3), nn.SiLU(), CausalConv3d(top, out_channels, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.middle(self.downsamples(self.conv1(x))))


class VAEEncoder(nn.Module):
    """The Wan2.1 VAE encoder: one frame of pixels -> normalised reference latents."""

    def __init__(self, dim: int = 96) -> None:
        super().__init__()
        self.encoder = Encoder(dim, 2 * LATENT_CHANNELS)
        self.conv1 = CausalConv3d(2 * LATENT_CHANNELS, 2 * LATENT_CHANNELS, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 1, H, W) in [-1, 1], H and W multiples of 8 -> (B, 16, 1, H/8, W/8)."""
        if pixels.dim() != 5 or pixels.shape[1] != 3 or pixels.shape[2] != 1:
            raise ValueError(f"VAEEncoder takes one RGB frame (B, 3, 1, H, W), got {tuple(pixels.shape)}")
        mean, _log_var = self.conv1(self.encoder(pixels)).chunk(2, dim=1)
        shift = torch.tensor(LATENT_MEAN, device=mean.device, dtype=mean.dtype).view(1, -1, 1, 1, 1)
        scale = torch.tensor(LATENT_STD, device=mean.device, dtype=mean.dtype).view(1, -1, 1, 1, 1)
        return (mean - shift) / scale


# ============================================================================ loading
def vae_checkpoint_path(model_cfg: Any) -> Path:
    """``model.checkpoint_dir`` / ``model.vae_checkpoint``; CheckpointError if it is not there."""
    if not model_cfg.checkpoint_dir or not model_cfg.vae_checkpoint:
        raise CheckpointError(
            "encoding workload.image_path needs the VAE: set model.checkpoint_dir to the official "
            "folder and model.vae_checkpoint to the file in it (Wan2.1_VAE.pth)"
        )
    path = Path(model_cfg.checkpoint_dir) / model_cfg.vae_checkpoint
    if not path.is_file():
        raise CheckpointError(
            f"{path}: VAE checkpoint not found (model.checkpoint_dir={model_cfg.checkpoint_dir!r}, "
            f"model.vae_checkpoint={model_cfg.vae_checkpoint!r}); copy Wan2.1_VAE.pth from the "
            "official Wan2.2-S2V-14B folder there, or leave workload.image_path unset for a random "
            "reference frame"
        )
    return path


def encoder_state(official: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the encoder's tensors, the names of the decoder tensors skipped) of a full VAE state dict."""
    skipped = sorted(k for k in official if k.startswith(DECODER_PREFIXES))
    return {k: v for k, v in official.items() if not k.startswith(DECODER_PREFIXES)}, skipped


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


def load_vae_encoder(path: str | Path, dim: int, device: torch.device | str,
                     dtype: torch.dtype) -> VAEEncoder:
    """The encoder from an official-layout VAE file (decoder tensors skipped), in eval mode.
    Any other missing or unexpected tensor, or a wrong shape, is a CheckpointError naming it."""
    state, skipped = encoder_state(read_state_dict(path))
    log.info("%s: loading the VAE encoder, skipping %d decoder tensors", path, len(skipped))
    with torch.device("meta"):
        model = VAEEncoder(dim)
    try:
        check_compatible(model, _StateDictShapes(state))
    except CheckpointError as err:
        raise CheckpointError(f"{path} (model.vae_dim={dim}): {err}") from None
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()},
                          strict=True, assign=True)
    return model.eval().requires_grad_(False)
