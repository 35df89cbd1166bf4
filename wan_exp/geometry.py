"""The job's sizes, resolved once from the config: pixels, latents, tokens, frames, clips.

:func:`job_geometry` reads ``workload.size`` (``config.parse_size``), the reference image's
header where ``workload.size_from_image`` picks the size from it (``media``), and the model's
patch and S2V shapes, and returns one :class:`JobGeometry`. The pre-launch checks
(``preflight``) and the workloads on every rank take their sizes from it instead of working
them out again, as the split's degrees come from ``parallel.dims.ParallelDims``.

The token arithmetic of the S2V DiT lives here (the model imports its frame-packing shapes
from this module), so the launching process counts tokens without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wan_exp.config import ConfigError, parse_size
from wan_exp.media import image_size, size_within_area

VAE_STRIDE = 8  # pixels per latent in height and width (the Wan2.1 VAE)
FRAMES_PER_LATENT = 4  # video frames per latent frame
FRAME_PACK_BUCKETS = (1, 2, 16)  # motion latents, newest first: 1 at full, 2 at 2x, 16 at 4x
FRAME_PACK_KERNELS = ((1, 2, 2), (2, 4, 4), (4, 8, 8))
FIRST_CLIP_DROPPED_FRAMES = 3  # upstream S2V drops these of the first clip's kept frames


def video_frames(frames_per_clip: int, clips: int) -> int:
    """Frames of a finished S2V video: every clip's, less those the first clip drops (upstream's
    two clips of 80 frames make 157)."""
    return frames_per_clip * clips - FIRST_CLIP_DROPPED_FRAMES


AUDIO_TOKENS_PER_FRAME = 4  # local tokens per latent frame, plus one learned padding token


def sequence_length(model: Any, height: int, width: int, frames_per_clip: int, with_motion: bool = True) -> int:
    """Tokens of one DiT forward for a clip of ``height`` x ``width`` pixels (VAE stride 8).

    S2V: noisy + reference + frame-packed motion tokens (the first clip has no motion);
    480x832, 80 frames -> 31200 + 1560 + 2314 = 35074.
    """
    pt, ph, pw = model.patch_size
    lat_h, lat_w, lat_f = height // VAE_STRIDE, width // VAE_STRIDE, frames_per_clip // FRAMES_PER_LATENT
    hw = (lat_h // ph) * (lat_w // pw)
    n = (lat_f // pt) * hw
    if not model.s2v:
        return n
    n += hw
    if with_motion:
        for (kt, kh, kw), bucket in zip(FRAME_PACK_KERNELS, FRAME_PACK_BUCKETS):
            n += (bucket // kt) * (lat_h // kh) * (lat_w // kw)
    return n


@dataclass(frozen=True)
class JobGeometry:
    """Every size of one job, in pixels, latents and tokens."""

    height: int  # pixels of the generated video (chosen from the image where it decides)
    width: int
    frames_per_clip: int  # video frames per clip (4 per latent frame)
    fps: int
    clips: int  # workload.clips: at most this many (-1: as many as the audio gives)
    latent_channels: int  # model.in_dim
    motion_frames: int  # latent frames of motion history (model.motion_frames)
    patch: tuple[int, int, int]  # model.patch_size (frames, height, width)
    s2v: bool
    tokens_first_clip: int  # tokens of one forward without motion (the first clip)
    tokens_later_clip: int  # with motion (every later clip; train_lora's clip)

    @property
    def size(self) -> str:
        """'H*W', as workload.size is written."""
        return f"{self.height}*{self.width}"

    @property
    def latent_frames(self) -> int:
        return self.frames_per_clip // FRAMES_PER_LATENT

    @property
    def latent_height(self) -> int:
        return self.height // VAE_STRIDE

    @property
    def latent_width(self) -> int:
        return self.width // VAE_STRIDE

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(channels, latent frames, latent height, latent width) of one clip."""
        return self.latent_channels, self.latent_frames, self.latent_height, self.latent_width

    @property
    def reference_shape(self) -> tuple[int, int, int, int]:
        """(channels, 1, latent height, latent width): the reference frame's latents."""
        return self.latent_channels, 1, self.latent_height, self.latent_width

    @property
    def motion_shape(self) -> tuple[int, int, int, int]:
        """(channels, motion frames, latent height, latent width): the motion history."""
        return self.latent_channels, self.motion_frames, self.latent_height, self.latent_width

    @property
    def seconds_per_clip(self) -> float:
        return self.frames_per_clip / self.fps

    @property
    def noisy_tokens(self) -> int:
        """Tokens of the noisy latents alone (the queries of the audio injection)."""
        pt, ph, pw = self.patch
        return (self.latent_frames // pt) * (self.latent_height // ph) * (self.latent_width // pw)

    def tokens(self, with_motion: bool) -> int:
        """Tokens of one DiT forward (with_motion: a clip after the first)."""
        return self.tokens_later_clip if with_motion else self.tokens_first_clip

    def flops_args(self, with_motion: bool) -> dict:
        """The arguments of metrics.flops.dit_forward_flops for one forward."""
        args: dict = {"n_tokens": self.tokens(with_motion)}
        if self.s2v:
            audio_per_frame = AUDIO_TOKENS_PER_FRAME + 1  # local tokens + the padding token
            args.update(
                audio_query_tokens=self.noisy_tokens,
                audio_tokens=self.latent_frames * audio_per_frame,
                audio_tokens_per_query=audio_per_frame,
            )
        return args


def output_size(workload: Any) -> tuple[int, int]:
    """(H, W) of the generated video: chosen from ``workload.image_path`` within the area of
    ``workload.size`` when ``workload.size_from_image`` (upstream's behaviour), else the size.
    ConfigError naming the setting for a size that is not H*W in multiples of 16, or an image
    that gives none."""
    height, width = parse_size(workload.size)
    if not (workload.image_path and workload.size_from_image):
        return height, width
    try:
        chosen = size_within_area(*image_size(workload.image_path), height * width)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(str(exc)) from None
    parse_size("{}*{}".format(*chosen))  # the size the image gives must meet the VAE and patch strides too
    return chosen


def job_geometry(cfg: Any) -> JobGeometry:
    """The job's sizes from its config (reads the reference image's header where it sets the
    size); ConfigError naming the setting when they do not work out."""
    model, wl = cfg.model, cfg.workload
    height, width = output_size(wl)
    frames = int(wl.frames_per_clip)
    return JobGeometry(
        height=height,
        width=width,
        frames_per_clip=frames,
        fps=int(wl.fps),
        clips=int(wl.clips),
        latent_channels=int(model.in_dim),
        motion_frames=int(model.motion_frames),
        patch=tuple(int(p) for p in model.patch_size),
        s2v=bool(model.s2v),  # type: ignore[arg-type]
        tokens_first_clip=sequence_length(model, height, width, frames, with_motion=False),
        tokens_later_clip=sequence_length(model, height, width, frames, with_motion=True),
    )


def strip_axis(latent_height: int, latent_width: int, world_size: int) -> tuple[bool, int]:
    """parallel.vae=sharded: (strips along the width, the latent length they split), one strip
    per rank along the longer latent axis; ConfigError when there are more ranks than latents."""
    along_width = latent_width >= latent_height
    length = latent_width if along_width else latent_height
    if world_size > length:
        raise ConfigError(
            f"parallel.vae=sharded: {world_size} ranks cannot share a latent frame "
            f"{length} wide; use parallel.vae=tiled or a larger workload.size"
        )
    return along_width, length
