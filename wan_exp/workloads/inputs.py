"""Inputs of real shape for one S2V clip, shared by the generate and train_lora workloads.

- Text: umT5 over token ids. Real ids only when ``workload.prompt`` is set and the
  checkpoint folder holds the tokenizer (``google/umt5-xxl``); otherwise deterministic ids
  from the seed. Nothing is ever downloaded.
- Audio: a 16 kHz waveform (``workload.audio_path``, a wav file, or seeded noise of the
  job's duration) -> wav2vec2 hidden states (all layers) -> resampled in time to one
  feature per video frame, which is what the DiT's causal audio encoder takes.
- Latents: (B=1, 16, frames_per_clip/4, H/8, W/8). The reference frame: the VAE encoding
  of ``workload.image_path`` (scaled to cover H x W, centre-cropped; the VAE encoder is
  loaded from the checkpoint folder only then), else random latents.
Every rank draws the same values (same seed): under Ulysses the model shards the tokens.
"""
from __future__ import annotations

import wave
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from wan_exp.config import parse_size
from wan_exp.models.encoders import encode_text
from wan_exp.models.vae import load_vae_encoder, vae_checkpoint_path
from wan_exp.models.wan_s2v import AUDIO_TOKENS_PER_FRAME, sequence_length
from wan_exp.parallel.fsdp import torch_dtype
from wan_exp.parallel.registry import ParallelModel

SAMPLE_RATE = 16000  # wav2vec2's input rate
TOKENIZER_SUBDIR = "google/umt5-xxl"  # inside model.checkpoint_dir (docs/facts.md §7)
VAE_STRIDE = 8  # pixels per latent in height and width
FRAMES_PER_LATENT = 4  # video frames per latent frame
# Each random input draws from its own generator, seeded cfg.seed + its offset, so adding
# one input never changes another (and every rank draws the same values).
SEED_OFFSETS = {"prompt": 0, "null_prompt": 1, "audio": 2, "reference": 3, "latents": 4,
                "motion": 5, "noise": 100}  # noise: + clip index


def input_seed(cfg: Any, what: str, index: int = 0) -> int:
    return cfg.seed + SEED_OFFSETS[what] + index


@dataclass
class ClipInputs:
    """What one DiT forward takes besides the noisy latents and the timestep."""

    latents: torch.Tensor  # (1, 16, F, H/8, W/8): the clean latents (train) or the shape to sample
    context: torch.Tensor  # (1, text_len, text_dim) conditional text embedding
    null_context: torch.Tensor  # the unconditional (negative prompt) embedding
    audio: Optional[torch.Tensor]  # (1, audio_layers, video frames, audio_dim), S2V only
    ref: Optional[torch.Tensor]  # (1, 16, 1, H/8, W/8) reference latents, S2V only
    motion: Optional[torch.Tensor]  # (1, 16, motion_frames, H/8, W/8) or None (first clip)


def latent_shape(cfg: Any) -> tuple[int, int, int, int]:
    """(channels, latent frames, latent height, latent width) of one clip."""
    height, width = parse_size(cfg.workload.size)
    return (cfg.model.in_dim, cfg.workload.frames_per_clip // FRAMES_PER_LATENT,
            height // VAE_STRIDE, width // VAE_STRIDE)


def seconds_per_clip(cfg: Any) -> float:
    return cfg.workload.frames_per_clip / cfg.workload.fps


def clip_token_counts(cfg: Any, with_motion: bool) -> dict:
    """Tokens of one forward and the arguments of metrics.flops.dit_forward_flops for it."""
    height, width = parse_size(cfg.workload.size)
    total = sequence_length(cfg.model, height, width, cfg.workload.frames_per_clip, with_motion=with_motion)
    pt, ph, pw = cfg.model.patch_size
    _, frames, lat_h, lat_w = latent_shape(cfg)
    noisy = (frames // pt) * (lat_h // ph) * (lat_w // pw)
    audio_per_frame = AUDIO_TOKENS_PER_FRAME + 1  # local tokens + the padding token
    flops_args = {"n_tokens": total}
    if cfg.model.s2v:
        flops_args.update(audio_query_tokens=noisy, audio_tokens=frames * audio_per_frame,
                          audio_tokens_per_query=audio_per_frame)
    return {"total": total, "flops_args": flops_args}


# ------------------------------------------------------------------------------ text
def _tokenizer_dir(cfg: Any) -> Optional[Path]:
    if not cfg.model.checkpoint_dir:
        return None
    folder = Path(cfg.model.checkpoint_dir) / TOKENIZER_SUBDIR
    return folder if folder.is_dir() else None


def prompt_token_ids(cfg: Any, prompt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (1, text_len): the tokenised prompt when a tokenizer folder
    exists, else deterministic ids from ``seed`` (all positions valid, as a long prompt)."""
    text_len = cfg.model.text_len
    folder = _tokenizer_dir(cfg)
    if prompt and folder is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        enc = tokenizer(prompt, padding="max_length", truncation=True, max_length=text_len,
                        return_tensors="pt")
        return enc.input_ids, enc.attention_mask
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.model.text_encoder.vocab_size, (1, text_len), generator=generator)
    return ids, torch.ones_like(ids)


def _encoder_placement(encoder: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where an encoder runs (parallel.*_encoder_placement) and its dtype."""
    param = next(encoder.parameters())
    return param.device, param.dtype


# ------------------------------------------------------------------------------ audio
def read_wav(path: str | Path) -> torch.Tensor:
    """Mono float waveform at 16 kHz from a PCM wav file (standard library ``wave``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"workload.audio_path={str(path)!r} does not exist")
    try:
        with wave.open(str(path), "rb") as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except wave.Error as exc:
        raise ValueError(f"workload.audio_path={str(path)!r} is not a PCM wav file ({exc}); "
                         "convert it, e.g. ffmpeg -i in.mp3 -ar 16000 -ac 1 out.wav") from None
    dtypes = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
    if width not in dtypes:
        raise ValueError(f"workload.audio_path={str(path)!r}: {8 * width}-bit samples are not supported; "
                         "use 8, 16 or 32-bit PCM")
    samples = torch.frombuffer(bytearray(raw), dtype=dtypes[width]).float()
    if width == 1:
        samples = samples - 128.0  # 8-bit wav is unsigned
    samples = samples / float(2 ** (8 * width - 1))
    mono = samples.view(-1, channels).mean(dim=1)
    if rate != SAMPLE_RATE:
        n_out = round(mono.numel() * SAMPLE_RATE / rate)
        mono = F.interpolate(mono[None, None], size=n_out, mode="linear", align_corners=False)[0, 0]
    return mono


def job_waveform(cfg: Any, seconds: float, seed: int) -> torch.Tensor:
    """(samples,) for ``seconds`` of audio: the wav file cut or zero-padded to length,
    or seeded noise."""
    n = round(seconds * SAMPLE_RATE)
    if cfg.workload.audio_path:
        audio = read_wav(cfg.workload.audio_path)[:n]
        return F.pad(audio, (0, n - audio.numel()))
    return 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ all inputs
def random_latents(shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Seeded standard normal latents, identical on every rank."""
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def read_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """(1, 3, 1, height, width) RGB pixels in [-1, 1]: the image scaled (bilinear) so that it
    covers height x width, then cropped about its centre."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"workload.image_path={str(path)!r} does not exist")
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"workload.image_path={str(path)!r} is not a readable image ({exc}); "
                         "use a PNG or JPEG file") from None
    scale = max(height / image.height, width / image.width)
    scaled_w, scaled_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((scaled_w, scaled_h), Image.BILINEAR)
    left, top = round((scaled_w - width) / 2), round((scaled_h - height) / 2)
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)) / 127.5 - 1.0  # (H, W, 3)
    return pixels.permute(2, 0, 1)[None, :, None]


def reference_latents(cfg: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, 16, 1, H/8, W/8): the VAE encoding of workload.image_path, else seeded noise."""
    if cfg.workload.image_path:
        pixels = read_image(cfg.workload.image_path, *parse_size(cfg.workload.size))
        # fp32 as upstream S2V encodes it (the encoder is small; one frame)
        vae = load_vae_encoder(vae_checkpoint_path(cfg.model), cfg.model.vae_dim, device, torch.float32)
        return vae(pixels.to(device)).to(dtype)
    channels, _, lat_h, lat_w = latent_shape(cfg)
    return random_latents((channels, 1, lat_h, lat_w), input_seed(cfg, "reference"), device, dtype)


@torch.no_grad()
def encode_job_inputs(cfg: Any, parallel_model: ParallelModel, device: torch.device) -> ClipInputs:
    """Text, audio (all clips at once) and reference for the job, motion None.

    ``audio`` spans every clip: ``clip_audio`` picks one clip's frames out of it."""
    dtype = torch_dtype(cfg.model.dtype)
    wl = cfg.workload
    text_device, _ = _encoder_placement(parallel_model.text_encoder)

    def text(prompt: str, seed: int) -> torch.Tensor:
        ids, mask = prompt_token_ids(cfg, prompt, seed)
        return encode_text(parallel_model.text_encoder, ids.to(text_device), mask.to(text_device)).to(device, dtype)

    context = text(wl.prompt, input_seed(cfg, "prompt"))
    null_context = text("", input_seed(cfg, "null_prompt"))  # the negative prompt
    audio = ref = None
    if cfg.model.s2v:
        video_frames = wl.clips * wl.frames_per_clip
        waveform = job_waveform(cfg, video_frames / wl.fps, input_seed(cfg, "audio"))
        audio_device, audio_dtype = _encoder_placement(parallel_model.audio_encoder)
        audio = parallel_model.audio_encoder(waveform[None].to(audio_device, audio_dtype),
                                             num_frames=video_frames).to(device, dtype)
        ref = reference_latents(cfg, device, dtype)
    latents = random_latents(latent_shape(cfg), input_seed(cfg, "latents"), device, dtype)
    return ClipInputs(latents, context, null_context, audio, ref, motion=None)


def clip_audio(audio: Optional[torch.Tensor], clip: int, frames_per_clip: int) -> Optional[torch.Tensor]:
    """The video frames of clip ``clip`` out of the job's audio features."""
    if audio is None:
        return None
    return audio[:, :, clip * frames_per_clip:(clip + 1) * frames_per_clip]


@contextmanager
def workload_step(ctx: Any, index: int, warmup_steps: int) -> Iterator[None]:
    """One DiT step of a workload: the first also times the "first_step" init phase;
    the first ``warmup_steps`` are not measured."""
    with ctx.phase("first_step") if index == 0 else nullcontext():
        with ctx.step(index, measured=index >= warmup_steps):
            yield
