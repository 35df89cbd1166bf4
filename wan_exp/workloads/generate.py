"""The `generate` workload: Wan2.2's S2V pipeline end to end (docs/pipeline.md).

Per job, each a timed stage of the rank (MetricsCollector.stage): encode the prompt and the
negative prompt (``text_encode``), the audio (``audio_encode``), the reference image
(``reference_encode``, the VAE encoder). Per clip: sample the latents from seeded noise with
``workload.sample_steps`` steps of ``workload.sampler`` (``denoise``; each step one or two DiT
forwards through parallel.cfg.guided_flow), decode them to pixels (``vae_decode``; where, by
``parallel.vae``), keep the clip's frames, shift them into the motion buffer and encode it into
the next clip's motion latents (``motion_encode``). At the end one rank writes
``<job dir>/video.mp4`` with the audio muxed in (``video_write``).

As upstream (wan/speech2video.py) with its default drop_first_motion:
- the first clip's DiT sees no motion tokens (21·hw tokens at 80 frames), later ones do
  (22.5·hw);
- the first clip decodes [reference latent, clip latents] and keeps the last
  ``frames_per_clip`` frames but the first ``FIRST_CLIP_DROPPED_FRAMES`` of them; later clips
  decode [motion latents, clip latents] and keep the last ``frames_per_clip``: a video of
  ``frames_per_clip * clips - 3`` frames;
- the motion buffer holds the last 73 pixel frames (zeros before the first clip); each clip's
  last min(73, kept) frames are shifted into it and the whole buffer is encoded into the
  19 motion latents, so with fewer than 73 frames per clip it keeps earlier clips' pixels.

Steps are numbered across clips; the first ``workload.warmup_steps`` are not measured.

Data parallel over clips (``parallel.dp_degree``): each dp group runs this whole pipeline on its
own inputs (inputs.group_config: the job's seed + dp_rank x DP_SEED_STRIDE; the prompt, the audio
file and the image are the same for every group, synthetic ones are drawn from the group's seed),
its VAE modes over the group's ranks, and the group's first rank writes ``video_dp<k>.mp4``
(``video_file``). The figures of one step count the whole job's work (every group's forwards).
"""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator, Optional

import numpy as np
import torch
from torch.distributed import ProcessGroup
from tqdm import tqdm

from wan_exp.config import SamplerName, VaePlacement
from wan_exp.geometry import FIRST_CLIP_DROPPED_FRAMES, JobGeometry, job_geometry, video_frames
from wan_exp.media import SAMPLE_RATE, wants_video, write_video
from wan_exp.metrics.flops import dit_forward_flops
from wan_exp.models.vae import TEMPORAL_STRIDE, WanVAE, build_vae
from wan_exp.parallel.cfg import Condition, GuidedFlow, forwards_per_step
from wan_exp.parallel.fsdp import torch_dtype
from wan_exp.parallel.registry import ParallelModel, setup_parallel
from wan_exp.parallel.vae import decode_clip, encode_motion
from wan_exp.rank.numerics import check_finite, checked_output
from wan_exp.workloads.inputs import (
    clip_audio,
    encode_audio,
    encode_prompts,
    group_config,
    group_seed,
    input_seed,
    random_latents,
    reference_latents,
    text_is_synthetic,
    workload_step,
)
from wan_exp.workloads.sampler import sample

VIDEO_FILE = "video.mp4"


def video_file(dp_rank: int, dp_degree: int) -> str:
    """The video a dp group writes in the job dir: video.mp4 with one group, video_dp<k>.mp4 with several."""
    return VIDEO_FILE if dp_degree == 1 else f"video_dp{dp_rank}.mp4"


def motion_pixel_frames(motion_latents: int) -> int:
    """Pixel frames that encode into ``motion_latents`` latent frames (19 -> 73)."""
    return 1 + TEMPORAL_STRIDE * (motion_latents - 1)


def decode_input(ref: Optional[torch.Tensor], motion: torch.Tensor, latents: torch.Tensor, clip: int) -> torch.Tensor:
    """What a clip's decode starts from (fp32): the reference latent before the first clip's
    latents, the motion latents before a later clip's (and before every clip of a model
    without a reference, model.s2v=false)."""
    first = ref if clip == 0 and ref is not None else motion
    return torch.cat([first.float(), latents.float()], dim=2)


def kept_frames(pixels: torch.Tensor, frames_per_clip: int, clip: int) -> torch.Tensor:
    """The clip's frames out of its decoded pixels (1, 3, T, H, W): the last
    ``frames_per_clip``, without the first ``FIRST_CLIP_DROPPED_FRAMES`` in the first clip."""
    kept = pixels[:, :, -frames_per_clip:]
    return kept[:, :, FIRST_CLIP_DROPPED_FRAMES:] if clip == 0 else kept


def shift_motion_buffer(buffer: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """The buffer (1, 3, N, H, W) with its first min(N, F) frames dropped and the last
    min(N, F) of ``frames`` (1, 3, F, H, W) appended: always the last N pixel frames made."""
    shifted = min(buffer.shape[2], frames.shape[2])
    return torch.cat([buffer[:, :, shifted:], frames[:, :, frames.shape[2] - shifted :].to(buffer.dtype)], dim=2)


def denoise_clip(
    cfg: Any,
    geometry: JobGeometry,
    dit: torch.nn.Module,
    guidance: GuidedFlow,
    cond: Condition,
    uncond: Condition,
    clip: int,
    step_scope: Callable[[int], ContextManager],
) -> torch.Tensor:
    """One clip's latents, in the model's dtype, from its seeded noise. As upstream, the solver's
    state is kept in the model's dtype (the noise is drawn and rounded to it, each update is
    computed against the DiT's fp32 flow and rounded back to it).
    ``guidance`` is ParallelModel.guidance (parallel.cfg.guided_flow, or its CFG-parallel version);
    ``step_scope(global_step)`` wraps each step. The guided flow is checked for NaN/Inf once
    per step, the sampled latents once per clip."""
    wl = cfg.workload
    model_dtype = cond.context.dtype
    noise = random_latents(geometry.latent_shape, input_seed(cfg, "noise", clip), cond.context.device, model_dtype)

    guided = checked_output(guidance, "DiT output (guided flow)")

    def flow(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return guided(dit, x, timestep, cond, uncond, wl.guidance_scale).float()

    first = clip * wl.sample_steps
    latents = sample(
        flow,
        noise,
        wl.sample_steps,
        wl.shift,
        SamplerName(wl.sampler).value,
        step_context=lambda i: step_scope(first + i),
    )
    check_finite(latents, f"sampled latents of clip {clip}")
    return latents


def sample_and_decode(
    cfg: Any,
    geometry: JobGeometry,
    vae: WanVAE,
    guidance: GuidedFlow,
    cond: Condition,
    uncond: Condition,
    ref: Optional[torch.Tensor],
    motion: torch.Tensor,
    clip: int,
    mode: str,
    rank: int,
    world: int,
    dit: torch.nn.Module,
    group: Optional[ProcessGroup] = None,
) -> torch.Tensor | None:
    """One clip sampled with ``dit`` and decoded as the job decodes it (over ``group``, the dp
    group's ranks), untimed (the drift check's bf16 clip); the clip's kept frames where this
    rank holds them."""
    latents = denoise_clip(cfg, geometry, dit, guidance, cond, uncond, clip, lambda step: nullcontext())
    pixels = decode_clip(vae, decode_input(ref, motion, latents, clip), mode, rank, world, group)
    return None if pixels is None else kept_frames(pixels, cfg.workload.frames_per_clip, clip)


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """(1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8 on the host, as upstream's save_video:
    clamped, mapped to [0, 1], times 255, truncated (not rounded)."""
    frames = ((pixels[0].float().clamp(-1.0, 1.0) + 1.0) / 2.0 * 255.0).to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def generate_workload_info(cfg: Any, geometry: JobGeometry, clips: int) -> dict:
    """Tokens, forwards and FLOPs per step, averaged over the measured steps (the first
    clip has no motion tokens, later ones do), and the video's size."""
    wl = cfg.workload
    forwards = forwards_per_step(wl.guidance_scale)
    with_motion = [clip > 0 for clip in range(clips)]
    per_step = [with_motion[step // wl.sample_steps] for step in range(clips * wl.sample_steps)]
    measured = per_step[wl.warmup_steps :] or per_step  # all warm-up: describe the steps run
    tokens = sum(geometry.tokens(m) for m in measured) / len(measured)
    flops = sum(forwards * dit_forward_flops(cfg.model, **geometry.flops_args(m)) for m in measured) / len(measured)
    return {
        "tokens_per_forward": tokens,
        "forwards_per_step": forwards,
        "flops_per_step": flops,
        "video_seconds_per_step": geometry.seconds_per_clip / wl.sample_steps,
        "video_seconds": video_frames(wl.frames_per_clip, clips) / wl.fps,
        "video_frames": video_frames(wl.frames_per_clip, clips),
        "tokens_per_clip": [geometry.tokens(m) for m in with_motion],
        "clips": clips,
        "sample_steps": wl.sample_steps,
        "sampler": SamplerName(wl.sampler).value,
        "guidance_scale": wl.guidance_scale,
        "size": geometry.size,
        "text_branch": "synthetic" if text_is_synthetic(cfg, wl.prompt) else "tokenized",
        "vae_mode": VaePlacement(cfg.parallel.vae).value,
    }


def generate_video(
    cfg: Any,
    geometry: JobGeometry,
    ctx: Any,
    parallel_model: ParallelModel,
    step_scope: Callable[[int], ContextManager],
) -> tuple[Optional[np.ndarray], Any, int]:
    """The pipeline after the models are set up, for this rank's dp group: its inputs from
    ``group_config``, its VAE decode over the group's ranks. Returns (the video's uint8 frames
    where it is written: the group's first rank, in a job with a job dir and workload.save_video
    on, else None; the waveform; the clip count)."""
    dims = parallel_model.dims
    cfg = group_config(cfg, dims.dp_rank(ctx.rank))
    wl, dtype, device = cfg.workload, torch_dtype(cfg.model.dtype), ctx.device
    # the VAE's ranks are the dp group's: rank 0 and "every rank" of parallel.vae are the group's
    mode, rank, world = VaePlacement(cfg.parallel.vae).value, dims.clip_rank(ctx.rank), dims.clip_ranks
    group = parallel_model.clip_group
    with ctx.stage("text_encode"):
        context, null_context = encode_prompts(cfg, parallel_model, device, dtype)
    audio, waveform, clips = None, None, wl.clips
    with ctx.stage("audio_encode"):
        if cfg.model.s2v:
            audio, clips, waveform = encode_audio(cfg, parallel_model, device, dtype)
    with ctx.stage("reference_encode"):
        vae: WanVAE = build_vae(cfg.model, device)
        ref = reference_latents(cfg, geometry, vae, device, torch.float32) if cfg.model.s2v else None

    height, width = geometry.height, geometry.width
    motion_shape = (1, *geometry.motion_shape)
    holds_pixels = mode != "rank0" or rank == 0
    with ctx.stage("motion_encode"):  # before the first clip: zero pixels
        buffer = (
            torch.zeros(1, 3, motion_pixel_frames(geometry.motion_frames), height, width, device=device)
            if holds_pixels
            else None
        )
        motion = encode_motion(vae, buffer, mode, rank, world, motion_shape, group)
    keep_frames = rank == 0 and ctx.job_dir is not None and wants_video(wl, cfg.model.checkpoint_dir)
    frames: list[np.ndarray] = []
    dit_ref = None if ref is None else ref.to(dtype)
    for clip in range(clips):
        clip_features = clip_audio(audio, clip, wl.frames_per_clip)
        silent = None if clip_features is None else torch.zeros_like(clip_features)
        dit_motion = None if clip == 0 else motion.to(dtype)  # drop_first_motion
        cond = Condition(context, clip_features, dit_ref, dit_motion)
        uncond = Condition(null_context, silent, dit_ref, dit_motion)  # negative prompt, zero audio
        with ctx.stage("denoise"):
            latents = denoise_clip(
                cfg, geometry, parallel_model.dit, parallel_model.guidance, cond, uncond, clip, step_scope
            )
        with ctx.stage("vae_decode"):
            pixels = decode_clip(vae, decode_input(ref, motion, latents, clip), mode, rank, world, group)
            clip_frames = None if pixels is None else kept_frames(pixels, wl.frames_per_clip, clip)
            del pixels
        if clip == 0 and parallel_model.drift is not None:  # workload.drift_check: this clip in bf16 too
            with ctx.stage("drift_check"):
                parallel_model.drift.compare_frames(
                    functools.partial(
                        sample_and_decode,
                        cfg,
                        geometry,
                        vae,
                        parallel_model.guidance,
                        cond,
                        uncond,
                        ref,
                        motion,
                        clip,
                        mode,
                        rank,
                        world,
                        group=group,
                    ),
                    clip_frames,
                    wl.frames_per_clip,
                )
        if keep_frames:
            frames.append(to_uint8_frames(clip_frames))
        if clip + 1 < clips:
            with ctx.stage("motion_encode"):
                buffer = None if buffer is None else shift_motion_buffer(buffer, clip_frames)
                motion = encode_motion(vae, buffer, mode, rank, world, motion_shape, group)
        del clip_frames
    return (np.concatenate(frames) if keep_frames else None), waveform, clips


def run_generate(cfg: Any, ctx: Any) -> dict:
    wl = cfg.workload
    geometry = job_geometry(cfg)
    parallel_model = setup_parallel(cfg, ctx)
    show = ctx.rank == 0 and sys.stdout.isatty()
    with tqdm(total=None, desc="generate", unit="step", disable=not show) as bar:

        @contextmanager
        def scope(step: int) -> Iterator[None]:
            with workload_step(ctx, step, wl.warmup_steps):
                yield
            bar.update(1)

        frames, waveform, clips = generate_video(cfg, geometry, ctx, parallel_model, scope)
    dims = parallel_model.dims
    dp_rank = dims.dp_rank(ctx.rank)
    video = video_file(dp_rank, dims.dp)
    if frames is not None:
        with ctx.stage("video_write"):
            audio = None if waveform is None else waveform.numpy()
            write_video(ctx.job_dir / video, frames, wl.fps, audio, SAMPLE_RATE)
    info = generate_workload_info(cfg, geometry, clips)
    # CFG parallel: each rank runs one of the two forwards (FLOPs stay the whole job's)
    info["forwards_per_step_per_rank"] = info["forwards_per_step"] // dims.cfg
    # one step of the job is a step of every dp group's own clip: the job's forwards, FLOPs and
    # video of a step are dp times one clip's (clips, video_seconds: one group's video)
    for key in ("forwards_per_step", "flops_per_step", "video_seconds_per_step"):
        info[key] *= dims.dp
    info["clip_group"] = {
        "dp_rank": dp_rank,
        "dp_degree": dims.dp,
        "seed": group_seed(cfg.seed, dp_rank),
        "video": video if frames is not None else None,
    }
    ctx.metrics.set_workload_info(**info)
    return info
