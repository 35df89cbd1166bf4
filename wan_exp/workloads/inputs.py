"""Inputs of real shape for one S2V clip, shared by the generate and train_lora workloads.

- Text: umT5 over token ids. Real ids only when the prompt (or the negative prompt) is set
  and the checkpoint folder holds the tokenizer (``google/umt5-xxl``); otherwise deterministic
  ids from the seed, and the record says the text branch is synthetic. Nothing is ever
  downloaded. The unconditional branch uses ``workload.negative_prompt`` (upstream's default).
- Audio (docs/pipeline.md, "Audio"): ``workload.audio_path`` read as 16 kHz mono (media.py),
  or seeded noise of the job's duration -> normalised as wav2vec2's feature extractor does ->
  wav2vec2 in fp32, all hidden states (50 Hz) -> linearly interpolated to 30 fps -> video frame
  i takes the 30 fps feature round(i * 30 / fps); frames past the audio's end take zeros.
- Latents: (B=1, 16, frames_per_clip/4, H/8, W/8), the job's ``geometry.JobGeometry``. The
  reference frame: the VAE encoding of ``workload.image_path`` (media.reference_pixels), else
  random latents.
Every rank draws the same values (same seed): under Ulysses the model shards the tokens.
With several dp groups (parallel.dp_degree) each group draws its own: group k's inputs are
those of a job whose seed is ``group_seed(seed, k)`` (``group_config``), so its clip is exactly
the clip one rank makes with that seed.
"""

from __future__ import annotations

import copy
import html
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import ftfy
import numpy as np
import regex
import torch
import torch.nn.functional as F

from wan_exp.config import tokenizer_dir
from wan_exp.geometry import JobGeometry
from wan_exp.media import SAMPLE_RATE, read_audio, reference_pixels
from wan_exp.models.encoders import encode_text
from wan_exp.models.vae import WanVAE, build_vae
from wan_exp.parallel.fsdp import torch_dtype
from wan_exp.parallel.registry import ParallelModel

FEATURE_RATE = 50  # wav2vec2 hidden states per second of 16 kHz audio
AUDIO_FEATURE_FPS = 30  # upstream interpolates the features to this rate before picking frames
# Each random input draws from its own generator, seeded cfg.seed + its offset, so adding
# one input never changes another (and every rank draws the same values).
SEED_OFFSETS = {
    "prompt": 0,
    "null_prompt": 1,
    "audio": 2,
    "reference": 3,
    "latents": 4,
    "motion": 5,
    "noise": 100,
}  # noise: + clip index


# dp group k draws from seed + k x DP_SEED_STRIDE: far enough apart that no generator of one
# group (seed + an offset above, noise + the clip index) is one of another group's
DP_SEED_STRIDE = 1_000_000


def input_seed(cfg: Any, what: str, index: int = 0) -> int:
    return cfg.seed + SEED_OFFSETS[what] + index


def group_seed(seed: int, dp_rank: int) -> int:
    """The seed dp group ``dp_rank`` draws its inputs from (group 0: the job's own)."""
    return seed + dp_rank * DP_SEED_STRIDE


def group_config(cfg: Any, dp_rank: int) -> Any:
    """The job's config as dp group ``dp_rank`` makes its clip: the same, with ``seed`` =
    ``group_seed`` (model weights follow ``model.seed``, which stays). Group 0 gets ``cfg`` itself."""
    if dp_rank == 0:
        return cfg
    group = copy.deepcopy(cfg)
    group.seed = group_seed(cfg.seed, dp_rank)
    return group


@dataclass
class ClipInputs:
    """What one DiT forward takes besides the noisy latents and the timestep."""

    latents: torch.Tensor  # (1, 16, F, H/8, W/8): the clean latents (train) or the shape to sample
    context: torch.Tensor  # (1, text_len, text_dim) conditional text embedding
    null_context: torch.Tensor  # the unconditional (negative prompt) embedding
    audio: Optional[torch.Tensor]  # (1, audio_layers, video frames, audio_dim), S2V only
    ref: Optional[torch.Tensor]  # (1, 16, 1, H/8, W/8) reference latents, S2V only
    motion: Optional[torch.Tensor]  # (1, 16, motion_frames, H/8, W/8) or None (first clip)


# ------------------------------------------------------------------------------ text
def clean_prompt(text: str) -> str:
    """The text as upstream's umT5 tokenizer wrapper cleans it before tokenising: ftfy's
    fix_text, HTML entities unescaped twice, stripped, then every run of whitespace made one
    space (the ``regex`` module's ``\\s``, as upstream's) and stripped again."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


def prompt_token_ids(cfg: Any, prompt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (1, text_len): the prompt cleaned (``clean_prompt``) and
    tokenised when a tokenizer folder exists, else deterministic ids from ``seed`` (all
    positions valid, as a long prompt; preflight.config_warnings says so for a prompt given
    without a tokenizer); ``text_is_synthetic`` says which."""
    text_len = cfg.model.text_len
    folder = tokenizer_dir(cfg.model)
    if prompt and folder is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        enc = tokenizer(
            clean_prompt(prompt), padding="max_length", truncation=True, max_length=text_len, return_tensors="pt"
        )
        return enc.input_ids, enc.attention_mask
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.model.text_encoder.vocab_size, (1, text_len), generator=generator)
    return ids, torch.ones_like(ids)


def text_is_synthetic(cfg: Any, prompt: str) -> bool:
    """True where prompt_token_ids draws ids instead of tokenising ``prompt``."""
    return not (prompt and tokenizer_dir(cfg.model) is not None)


def _encoder_placement(encoder: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where an encoder runs (parallel.*_encoder_placement) and its dtype."""
    param = next(encoder.parameters())
    return param.device, param.dtype


# ------------------------------------------------------------------------------ audio
def job_waveform(cfg: Any, seed: int) -> torch.Tensor:
    """(samples,) 16 kHz mono: the audio file whole, or seeded noise of ``workload.clips``
    clips' duration."""
    wl = cfg.workload
    if wl.audio_path:
        return torch.from_numpy(read_audio(wl.audio_path))
    n = round(wl.clips * wl.frames_per_clip / wl.fps * SAMPLE_RATE)
    return 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(seed))


def feature_extractor(cfg: Any) -> Any:
    """wav2vec2's feature extractor: the checkpoint folder's preprocessor_config.json, else
    transformers' defaults (16 kHz, zero mean / unit variance normalisation)."""
    from transformers import Wav2Vec2FeatureExtractor

    folder = (
        Path(cfg.model.checkpoint_dir) / cfg.model.audio_encoder.checkpoint
        if cfg.model.checkpoint_dir and cfg.model.audio_encoder.checkpoint
        else None
    )
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        return Wav2Vec2FeatureExtractor.from_pretrained(str(folder), local_files_only=True)
    return Wav2Vec2FeatureExtractor()


def features_per_video_frame(
    states: torch.Tensor, fps: int, frames_per_clip: int, max_clips: int
) -> tuple[torch.Tensor, int]:
    """(B, layers, T, C) hidden states at 50 Hz -> ((B, layers, clips * frames_per_clip, C), clips).

    Linear interpolation (align_corners) to int(T * 30 / 50) features at 30 fps; video frame i
    takes feature round(i * 30 / fps) (numpy rounding), zeros past the end. The audio gives
    int(T30 / (frames_per_clip * 30 / fps)) + 1 clips, at most ``max_clips`` (-1: no cap)."""
    b, layers, t, c = states.shape
    t30 = int(t * AUDIO_FEATURE_FPS / FEATURE_RATE)
    flat = states.permute(0, 1, 3, 2).reshape(b, layers * c, t).float()
    at30 = F.interpolate(flat, size=t30, mode="linear", align_corners=True)
    clips = int(t30 / (frames_per_clip * AUDIO_FEATURE_FPS / fps)) + 1
    if max_clips != -1:
        clips = min(clips, max_clips)
    index = np.round(np.arange(clips * frames_per_clip) * AUDIO_FEATURE_FPS / fps).astype(np.int64)
    inside = torch.from_numpy(index < t30).to(at30.device, at30.dtype)
    picked = at30[:, :, torch.from_numpy(np.minimum(index, t30 - 1)).to(at30.device)] * inside
    return picked.reshape(b, layers, c, -1).permute(0, 1, 3, 2).to(states.dtype), clips


@torch.no_grad()
def encode_audio(
    cfg: Any, parallel_model: ParallelModel, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(features (1, layers, clips * frames_per_clip, C) in ``dtype``, clips, waveform)."""
    wl = cfg.workload
    waveform = job_waveform(cfg, input_seed(cfg, "audio"))
    normalised = feature_extractor(cfg)(waveform.numpy(), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
    audio_device, audio_dtype = _encoder_placement(parallel_model.audio_encoder)
    states = parallel_model.audio_encoder(normalised.to(audio_device, audio_dtype))
    features, clips = features_per_video_frame(states, wl.fps, wl.frames_per_clip, wl.clips)
    return features.to(device, dtype), clips, waveform


# ------------------------------------------------------------------------------ all inputs
def random_latents(shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Seeded standard normal latents, identical on every rank."""
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed)).to(device, dtype)


@torch.no_grad()
def reference_latents(
    cfg: Any, geometry: JobGeometry, vae: Optional[WanVAE], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """(1, 16, 1, H/8, W/8): the VAE encoding (fp32, as upstream) of workload.image_path, else
    seeded noise."""
    if cfg.workload.image_path:
        pixels = torch.from_numpy(reference_pixels(cfg.workload.image_path, geometry.height, geometry.width))
        vae = vae if vae is not None else build_vae(cfg.model, device)
        return vae.encode(pixels.permute(2, 0, 1)[None, :, None].to(device)).to(dtype)
    return random_latents(geometry.reference_shape, input_seed(cfg, "reference"), device, dtype)


@torch.no_grad()
def encode_prompts(
    cfg: Any, parallel_model: ParallelModel, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, null context): the prompt and the negative prompt through umT5."""
    text_device, _ = _encoder_placement(parallel_model.text_encoder)

    def text(prompt: str, seed: int) -> torch.Tensor:
        ids, mask = prompt_token_ids(cfg, prompt, seed)
        return encode_text(parallel_model.text_encoder, ids.to(text_device), mask.to(text_device)).to(device, dtype)

    return (
        text(cfg.workload.prompt, input_seed(cfg, "prompt")),
        text(cfg.workload.negative_prompt, input_seed(cfg, "null_prompt")),
    )


@torch.no_grad()
def encode_job_inputs(
    cfg: Any, geometry: JobGeometry, parallel_model: ParallelModel, device: torch.device, vae: Optional[WanVAE] = None
) -> ClipInputs:
    """Text, audio (all clips at once) and reference for the job, motion None (the generate
    workload calls the three parts one by one to time them).

    ``audio`` spans every clip: ``clip_audio`` picks one clip's frames out of it."""
    dtype = torch_dtype(cfg.model.dtype)
    context, null_context = encode_prompts(cfg, parallel_model, device, dtype)
    audio = ref = None
    if cfg.model.s2v:
        audio, _clips, _waveform = encode_audio(cfg, parallel_model, device, dtype)
        ref = reference_latents(cfg, geometry, vae, device, dtype)
    latents = random_latents(geometry.latent_shape, input_seed(cfg, "latents"), device, dtype)
    return ClipInputs(latents, context, null_context, audio, ref, motion=None)


def clip_audio(audio: Optional[torch.Tensor], clip: int, frames_per_clip: int) -> Optional[torch.Tensor]:
    """The video frames of clip ``clip`` out of the job's audio features."""
    if audio is None:
        return None
    return audio[:, :, clip * frames_per_clip : (clip + 1) * frames_per_clip]


@contextmanager
def workload_step(ctx: Any, index: int, warmup_steps: int) -> Iterator[None]:
    """One DiT step of a workload: the first also times the "first_step" init phase;
    the first ``warmup_steps`` are not measured."""
    with ctx.phase("first_step") if index == 0 else nullcontext():
        with ctx.step(index, measured=index >= warmup_steps):
            yield
