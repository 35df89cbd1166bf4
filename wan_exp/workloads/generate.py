"""The `generate` workload: the S2V clip loop, as upstream Wan2.2 S2V samples a video.

Per job: encode the prompt (umT5) and the whole audio (wav2vec2) once. Per clip: start
from seeded noise and run ``workload.sample_steps`` flow-matching steps (sampler.py), each
one or two DiT forwards (conditional, then unconditional with the null text and silent
audio, as upstream). The DiT's own causal audio encoder turns the clip's audio features
into audio tokens inside each forward.

Motion: the model conditions each clip on the last ``model.motion_frames`` latent frames
generated so far. Before the first clip there are none; upstream feeds zeros there and
drops them from the token sequence, so the first clip runs without motion tokens
(docs/facts.md §7: 21·hw tokens at 80 frames) and later clips with them (22.5·hw).

Steps are numbered across clips; the first ``workload.warmup_steps`` are not measured.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Iterator, Optional

import torch
from tqdm import tqdm

from wan_exp.metrics.flops import dit_forward_flops
from wan_exp.parallel.registry import setup_parallel
from wan_exp.workloads.inputs import (
    ClipInputs,
    clip_audio,
    clip_token_counts,
    encode_job_inputs,
    input_seed,
    random_latents,
    seconds_per_clip,
    workload_step,
)
from wan_exp.workloads.sampler import Velocity, forwards_per_step, guided_velocity, sample, sigma_schedule


def dit_velocity(dit: torch.nn.Module, context: torch.Tensor, inputs: ClipInputs,
                 audio: Optional[torch.Tensor]) -> Velocity:
    """The DiT as a velocity callable ``(x, sigma) -> v`` for one clip and one condition."""

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        timestep = torch.full((x.shape[0],), sigma * 1000.0, device=x.device)
        with torch.no_grad():
            return dit(x, timestep, context, audio=audio, ref=inputs.ref, motion=inputs.motion)

    return velocity


def next_motion(motion: Optional[torch.Tensor], clip_latents: torch.Tensor, motion_frames: int) -> torch.Tensor:
    """The last ``motion_frames`` latent frames of the history followed by this clip
    (zeros where the history is shorter)."""
    if motion is None:
        b, c, _, h, w = clip_latents.shape
        motion = clip_latents.new_zeros(b, c, motion_frames, h, w)
    return torch.cat([motion, clip_latents], dim=2)[:, :, -motion_frames:]


def generate_clips(cfg: Any, dit: torch.nn.Module, inputs: ClipInputs,
                   step_scope: Callable[[int], ContextManager]) -> list[torch.Tensor]:
    """Sample ``workload.clips`` clips one after the other, carrying motion latents.

    ``step_scope(global_step)`` wraps each sampling step (timing, heartbeat, progress).
    Returns the latents of every clip."""
    wl = cfg.workload
    sigmas = sigma_schedule(wl.sample_steps, wl.shift)
    motion, clips = None, []
    for clip in range(wl.clips):
        audio = clip_audio(inputs.audio, clip, wl.frames_per_clip)
        clip_inputs = ClipInputs(inputs.latents, inputs.context, inputs.null_context, audio, inputs.ref, motion)
        cond = dit_velocity(dit, inputs.context, clip_inputs, audio)
        # unconditional: negative prompt and silent audio (upstream zeroes the audio input)
        uncond = dit_velocity(dit, inputs.null_context, clip_inputs, None if audio is None else torch.zeros_like(audio))
        noise = random_latents(tuple(inputs.latents.shape[1:]), input_seed(cfg, "noise", clip),
                               inputs.latents.device, inputs.latents.dtype)
        first = clip * wl.sample_steps

        def scope(i: int, first: int = first):
            return step_scope(first + i)

        latents = sample(guided_velocity(cond, uncond, wl.guidance_scale), noise, sigmas, step_context=scope)
        clips.append(latents)
        motion = next_motion(motion, latents, cfg.model.motion_frames)
    return clips


def generate_workload_info(cfg: Any) -> dict:
    """Tokens, forwards and FLOPs per step, averaged over the measured steps (the first
    clip has no motion tokens, later ones do)."""
    wl = cfg.workload
    forwards = forwards_per_step(wl.guidance_scale)
    per_clip = [clip_token_counts(cfg, with_motion=clip > 0) for clip in range(wl.clips)]
    per_step = [per_clip[step // wl.sample_steps] for step in range(wl.clips * wl.sample_steps)]
    measured = per_step[wl.warmup_steps:] or per_step  # all warm-up: describe the steps run
    tokens = sum(c["total"] for c in measured) / len(measured)
    flops = sum(forwards * dit_forward_flops(cfg.model, **c["flops_args"]) for c in measured) / len(measured)
    return {
        "tokens_per_forward": tokens,
        "forwards_per_step": forwards,
        "flops_per_step": flops,
        "video_seconds_per_step": seconds_per_clip(cfg) / wl.sample_steps,
        "tokens_per_clip": [c["total"] for c in per_clip],
        "clips": wl.clips,
        "sample_steps": wl.sample_steps,
        "guidance_scale": wl.guidance_scale,
    }


def run_generate(cfg: Any, ctx: Any) -> dict:
    wl = cfg.workload
    parallel_model = setup_parallel(cfg, ctx)
    with ctx.phase("encode"):
        inputs = encode_job_inputs(cfg, parallel_model, ctx.device)
    show = ctx.rank == 0 and sys.stdout.isatty()
    with tqdm(total=wl.clips * wl.sample_steps, desc="generate", unit="step", disable=not show) as bar:
        @contextmanager
        def scope(step: int) -> Iterator[None]:
            with workload_step(ctx, step, wl.warmup_steps):
                yield
            bar.update(1)

        generate_clips(cfg, parallel_model.dit, inputs, scope)
    info = generate_workload_info(cfg)
    ctx.metrics.set_workload_info(**info)
    return info
