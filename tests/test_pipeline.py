"""The S2V pipeline around the DiT: audio preparation, the reference image's size and pixels,
the VAE decoder (and the streaming encoder) against whole-clip references written here, tiled
decoding, and the pre-launch input checks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tolerance import close_kwargs, reordered_sum_tolerance, vae_decoder_chain, vae_encoder_chain

from wan_exp.config import ConfigError, compose_config, validate
from wan_exp.media import check_inputs, read_audio, reference_pixels, size_within_area
from wan_exp.models.vae import (
    LATENT_MEAN, LATENT_STD, AttentionBlock, Downsample, ResidualBlock, Upsample, WanVAE, grid_tiles, stitch,
)
from wan_exp.workloads.inputs import feature_extractor, features_per_video_frame

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# ----------------------------------------------------------------------------- audio
def write_audio(path, codec: str, rate: int, left: np.ndarray, right: np.ndarray) -> None:
    """A stereo file through PyAV (the test's own writer)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "stereo"
        fmt = "s16" if codec == "flac" else "fltp"
        samples = np.stack([left, right]).astype(np.float32)
        for start in range(0, samples.shape[1], 1152):
            chunk = samples[:, start:start + 1152]
            if fmt == "s16":
                frame = av.AudioFrame.from_ndarray((chunk.T.reshape(1, -1) * 32767).astype(np.int16),
                                                   format="s16", layout="stereo")
            else:
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.mark.parametrize("codec, suffix", [("flac", "flac"), ("libmp3lame", "mp3")])
def test_stereo_44k_file_is_read_as_16k_mono(tmp_path, codec, suffix):
    rate, seconds = 44100, 1.0
    t = np.arange(int(rate * seconds)) / rate
    tone = np.sin(2 * np.pi * 440 * t)
    path = tmp_path / f"speech.{suffix}"
    write_audio(path, codec, rate, 0.5 * tone, 0.3 * tone)
    mono = read_audio(path)
    assert mono.dtype == np.float32
    assert abs(mono.size - 16000 * seconds) < 0.06 * 16000  # mp3 adds encoder padding
    # the channels' mean, 0.4 sin: its RMS is 0.4 / sqrt(2) (ignore the edges)
    middle = mono[2000:14000]
    assert np.sqrt(np.mean(middle ** 2)) == pytest.approx(0.4 / np.sqrt(2), rel=0.05)
    spectrum = np.abs(np.fft.rfft(middle))
    assert np.argmax(spectrum) * 16000 / middle.size == pytest.approx(440, abs=3)


def test_features_are_interpolated_to_30fps_and_picked_per_video_frame():
    states = torch.randn(1, 2, 50, 3, dtype=torch.float64)  # one second at 50 Hz
    features, clips = features_per_video_frame(states, fps=16, frames_per_clip=8, max_clips=-1)
    # reference: 30 features at 30 fps by linear interpolation with aligned corners ...
    t30 = 30
    positions = np.arange(t30) * (50 - 1) / (t30 - 1)
    at30 = np.stack([[np.interp(positions, np.arange(50), states[0, l, :, c].numpy()) for c in range(3)]
                     for l in range(2)])  # (layers, C, 30)
    # ... video frame i takes feature round(i * 30 / 16); the audio gives int(30 / 15) + 1 clips
    assert clips == 3 and features.shape == (1, 2, 24, 3)
    for i in range(24):
        j = int(np.round(i * 30 / 16))
        expected = at30[:, :, j] if j < t30 else np.zeros((2, 3))
        np.testing.assert_allclose(features[0, :, i].numpy(), expected, atol=1e-5)  # fp32 inside
    assert not features[0, :, -1].any()  # frames past the audio's end are zeros
    capped, capped_clips = features_per_video_frame(states, 16, 8, max_clips=1)
    assert capped_clips == 1 and torch.equal(capped, features[:, :, :8])


def test_waveform_is_normalised_as_the_checkpoints_feature_extractor_says(tmp_path):
    wave = np.random.default_rng(0).normal(0.3, 2.0, 1600).astype(np.float32)
    cfg = compose_config(["model=tiny"])
    normalised = feature_extractor(cfg)(wave, sampling_rate=16000, return_tensors="np").input_values[0]
    np.testing.assert_allclose(normalised, (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7), rtol=1e-4, atol=1e-4)
    folder = tmp_path / "wav2vec2"
    folder.mkdir()
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "Wav2Vec2FeatureExtractor", "do_normalize": False, "feature_size": 1,
        "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False, "sampling_rate": 16000}))
    cfg = compose_config(["model=tiny", f"model.checkpoint_dir={tmp_path}", "model.audio_encoder.checkpoint=wav2vec2"])
    raw = feature_extractor(cfg)(wave, sampling_rate=16000, return_tensors="np").input_values[0]
    np.testing.assert_allclose(raw, wave)


# ----------------------------------------------------------------------------- image
def largest_padded_size(height: int, width: int, area: int) -> tuple[int, int]:
    """The rule by brute force: over a fine grid of scales <= 1, the largest whose size padded
    up to multiples of 64 fits in the area, and that padded size."""
    scales = np.linspace(1.0, 1e-4, 400001)
    padded_h = np.ceil((height * scales).astype(np.int64) / 64) * 64
    padded_w = np.ceil((width * scales).astype(np.int64) / 64) * 64
    first = np.argmax(padded_h * padded_w <= area)
    return int(padded_h[first]), int(padded_w[first])


@pytest.mark.parametrize("height, width", [(1000, 1000), (720, 1280), (1280, 720), (300, 100)])
def test_size_from_image_is_the_largest_padded_size_within_the_area(height, width):
    area = 1024 * 704
    chosen = size_within_area(height, width, area)
    assert chosen == largest_padded_size(height, width, area)
    assert chosen[0] % 64 == 0 and chosen[1] % 64 == 0 and chosen[0] * chosen[1] <= area
    if height * width <= area:  # small images are not scaled up, only padded
        assert chosen == (-(-height // 64) * 64, -(-width // 64) * 64)


@pytest.mark.parametrize("image_hw, target, pad_cols", [
    ((50, 50), (64, 128), 32),  # square into wide: the resized 64x64 image, black 32 columns each side
    ((100, 50), (64, 128), 32),  # tall into wide: 128x64 after resize, centre 64 rows, black sides
    ((50, 200), (64, 64), 0),  # wide into square: 64x256 after resize, centre 64 columns, no padding
])
def test_reference_pixels_resize_shorter_side_centre_crop_and_pad_black(tmp_path, image_hw, target, pad_cols):
    h, w = image_hw
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = 255  # red everywhere ...
    image[:, w // 2:, 2] = 255  # ... and blue in the right half
    Image.fromarray(image).save(tmp_path / "ref.png")
    out = reference_pixels(tmp_path / "ref.png", *target)
    assert out.shape == (*target, 3) and out.dtype == np.float32
    if pad_cols:
        assert (out[:, :pad_cols] == -1).all() and (out[:, -pad_cols:] == -1).all()
    inner = out[:, pad_cols:target[1] - pad_cols]
    np.testing.assert_allclose(inner[..., 0], 1.0)  # red kept
    np.testing.assert_allclose(inner[:, :inner.shape[1] // 2 - 2, 2], -1.0)  # left half: no blue
    np.testing.assert_allclose(inner[:, inner.shape[1] // 2 + 2:, 2], 1.0)  # right half: blue


# ----------------------------------------------------------------------------- VAE references
def ref_conv(conv: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A causal conv over the whole clip: zero frames in front, nothing cached."""
    kt, kh, kw = conv.kernel_size
    return F.conv3d(F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)), conv.weight, conv.bias)


def ref_norm(norm, x):
    return x / x.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-12) * x.shape[1] ** 0.5 * norm.gamma


def ref_frames(fn, x):
    return torch.stack([fn(x[:, :, t]) for t in range(x.shape[2])], dim=2)


def ref_layer(layer, x):
    if isinstance(layer, ResidualBlock):
        r = layer.residual
        h = ref_conv(r[2], F.silu(ref_norm(r[0], x)))
        h = ref_conv(r[6], F.silu(ref_norm(r[3], h)))
        return h + (ref_conv(layer.shortcut, x) if isinstance(layer.shortcut, torch.nn.Conv3d) else x)
    if isinstance(layer, AttentionBlock):
        def attend(frame):
            n, c, hh, ww = frame.shape
            qkv = F.conv2d(ref_norm(layer.norm, frame), layer.to_qkv.weight, layer.to_qkv.bias).flatten(2)
            q, k, v = qkv.split(c, dim=1)  # (n, c, hw)
            weights = torch.softmax(q.transpose(1, 2) @ k / c ** 0.5, dim=-1)
            out = (weights @ v.transpose(1, 2)).transpose(1, 2).reshape(n, c, hh, ww)
            return frame + F.conv2d(out, layer.proj.weight, layer.proj.bias)
        return ref_frames(attend, x)
    if isinstance(layer, Upsample):
        if layer.temporal and x.shape[2] > 1:  # frame 0 alone; the rest doubled in time
            rest = ref_conv(layer.time_conv, x[:, :, 1:])
            c = x.shape[1]
            doubled = torch.stack([rest[:, :c], rest[:, c:]], dim=3).flatten(2, 3)
            x = torch.cat([x[:, :, :1], doubled], dim=2)
        conv = layer.resample[1]
        return ref_frames(lambda f: F.conv2d(f.repeat_interleave(2, 2).repeat_interleave(2, 3),
                                             conv.weight, conv.bias, padding=1), x)
    if isinstance(layer, Downsample):
        conv = layer.resample[1]
        x = ref_frames(lambda f: F.conv2d(F.pad(f, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2), x)
        if layer.temporal and x.shape[2] > 1:  # frame 0 alone; then stride 2 from frame 0 on
            x = torch.cat([x[:, :, :1], F.conv3d(x, layer.time_conv.weight, layer.time_conv.bias, stride=(2, 1, 1))], 2)
        return x
    if isinstance(layer, torch.nn.Conv3d):
        return ref_conv(layer, x)
    return ref_norm(layer, x) if hasattr(layer, "gamma") else layer(x)


def ref_run(layers, x):
    for layer in layers:
        x = ref_layer(layer, x)
    return x


STATS = torch.tensor(LATENT_MEAN).view(1, 16, 1, 1, 1), torch.tensor(LATENT_STD).view(1, 16, 1, 1, 1)


def ref_decode(vae: WanVAE, z: torch.Tensor) -> torch.Tensor:
    d = vae.decoder
    x = ref_conv(vae.conv2, z * STATS[1] + STATS[0])
    x = ref_run(d.middle, ref_conv(d.conv1, x))
    return ref_run(d.head, ref_run(d.upsamples, x)).clamp(-1, 1)


def ref_encode(vae: WanVAE, pixels: torch.Tensor) -> torch.Tensor:
    e = vae.encoder
    x = ref_run(e.head, ref_run(e.middle, ref_run(e.downsamples, ref_conv(e.conv1, pixels))))
    mean = ref_conv(vae.conv1, x)[:, :16]
    return (mean - STATS[0]) / STATS[1]


def small_vae(seed: int = 0) -> WanVAE:
    torch.manual_seed(seed)
    vae = WanVAE(4).eval()
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("proj.weight"):  # so the attention's output matters
                param.normal_(0, 0.3)
    return vae


def test_streaming_decoder_equals_the_whole_clip_causal_reference():
    vae = small_vae()
    z = torch.randn(1, 16, 3, 4, 6)
    out = vae.decode(z)[0]
    assert out.shape == (1, 3, 9, 32, 48)  # 1 + 4 * (3 - 1) frames, 8x the latent size
    with torch.no_grad():
        expected = ref_decode(vae, z)
    torch.testing.assert_close(out, expected, **close_kwargs(torch.float32, *vae_decoder_chain(4, 4 * 6)))
    assert out.abs().max() <= 1 and out.std() > 0.01


def test_streaming_encoder_equals_the_whole_clip_causal_reference():
    vae = small_vae(1)
    pixels = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    out = vae.encode(pixels)
    assert out.shape == (1, 16, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(out, ref_encode(vae, pixels), **close_kwargs(torch.float32, *vae_encoder_chain(4)))
    # causal: the first latent frame is the first pixel frame's alone
    torch.testing.assert_close(out[:, :, :1], vae.encode(pixels[:, :, :1]),
                               **close_kwargs(torch.float32, *vae_encoder_chain(4)))


def test_tiles_equal_the_whole_frame_decode():
    """Tiles wider than the halo: the attention runs on the whole frame, the rest per tile;
    measured difference against the plain decode (docs/pipeline.md states the tolerance)."""
    vae = small_vae(2)
    z = torch.randn(1, 16, 2, 4, 40)
    whole = vae.decode(z)[0]
    for rows, cols in ((2, 2), (1, 3)):
        tiles = grid_tiles(4, 40, rows, cols)
        tiled = stitch(tiles, vae.decode(z, tiles))
        assert tiled.shape == whole.shape
        # pixels are in [-1, 1]: the bound is absolute
        assert (tiled - whole).abs().max().item() <= reordered_sum_tolerance(torch.float32,
                                                                             *vae_decoder_chain(4, 4 * 40))


# ----------------------------------------------------------------------------- bad input
def generate_cfg(*overrides: str):
    return compose_config(["model=tiny", "parallel=ulysses", *overrides])


def test_bad_inputs_are_config_errors_before_launch(tmp_path):
    silent = tmp_path / "silent.flac"
    write_audio(silent, "flac", 16000, np.zeros(8000), np.zeros(8000))
    with pytest.raises(ConfigError, match=r"workload\.audio_path=.*silent\.flac' is silent"):
        validate(generate_cfg(f"workload.audio_path={silent}"), 2)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF but not really audio" * 10)
    with pytest.raises(ConfigError, match=r"workload\.audio_path=.*junk\.wav' is not a readable audio file"):
        check_inputs(generate_cfg(f"workload.audio_path={junk}"), 2)
    (tmp_path / "face.png").write_bytes(b"not an image")
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ConfigError, match=r"workload\.image_path=.*face\.png' is not a readable image"):
        validate(generate_cfg(f"workload.image_path={tmp_path / 'face.png'}",
                              f"model.checkpoint_dir={tmp_path / 'ckpt'}"), 2)
    with pytest.raises(ConfigError, match=r"parallel\.vae=sharded .* needs >= 2 ranks, got 1"):
        validate(compose_config(["model=tiny", "parallel=single", "parallel.vae=sharded"]), 1)
    with pytest.raises(ConfigError, match=r"workload\.size='40\*64': height 40 must be a positive multiple of 16"):
        validate(generate_cfg("workload.size=40*64"), 2)
    with pytest.raises(ConfigError, match=r"workload\.save_video='maybe'; use one of auto, true, false"):
        validate(generate_cfg("workload.save_video=maybe"), 2)
    validate(generate_cfg("workload.save_video=true"), 2)  # a boolean on the command line is fine


# ----------------------------------------------------------------------------- distributed
@pytest.mark.slow
def test_every_vae_mode_equals_the_plain_decode_on_two_ranks():
    """tests/dist/vae_modes.py under torchrun, 2 gloo ranks: every parallel.vae mode's pixels
    and motion latents against the plain decode on every rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "tests/dist/vae_modes.py"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    measured = dict(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("max_abs_diff"))
    assert set(measured) == {"every_rank", "rank0", "tiled", "sharded"}
    assert all(float(v) <= reordered_sum_tolerance(torch.float32, *vae_decoder_chain(4, 4 * 40))
               for v in measured.values())


# ----------------------------------------------------------------------------- a tiny job end to end
TEST_VAE_DIM = 4  # half the tiny model's VAE width: the decode dominates a tiny job on the CPU


def write_tiny_checkpoint_folder(folder: Path) -> None:
    """The official folder layout at tiny size: DiT shards, umT5 file, VAE file, wav2vec2
    folder with its preprocessor config, umT5 tokenizer folder (a word-level tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Wav2Vec2FeatureExtractor

    from wan_exp.models.checkpoint import write_checkpoint
    from wan_exp.models.encoders import (
        audio_encoder_config, build_text_encoder, t5_hf_to_official,
    )
    from wan_exp.models.wan_s2v import WanModel

    cfg = compose_config(["model=tiny"]).model
    torch.manual_seed(0)
    write_checkpoint(WanModel(cfg).state_dict(), folder, shards=2)
    torch.save(t5_hf_to_official(build_text_encoder(cfg, "cpu", torch.float32).state_dict()), folder / "t5.pth")
    torch.save(WanVAE(TEST_VAE_DIM).state_dict(), folder / "Wan2.1_VAE.pth")
    from transformers import Wav2Vec2Model

    Wav2Vec2Model(audio_encoder_config(cfg)).save_pretrained(folder / "wav2vec2")
    Wav2Vec2FeatureExtractor().save_pretrained(folder / "wav2vec2")
    words = ["<pad>", "</s>", "<unk>", "a", "person", "talks", "smiling"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder / "google" / "umt5-xxl")


@pytest.mark.slow
def test_tiny_job_from_a_checkpoint_folder_writes_the_video_and_stage_figures(tmp_path):
    from launch_helpers import job_results, run_launch

    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_tiny_checkpoint_folder(folder)
    speech = tmp_path / "speech.flac"
    t = np.arange(int(44100 * 0.8)) / 44100  # 0.8 s: 23 features at 30 fps -> int(23 / 15) + 1 = 2 clips
    write_audio(speech, "flac", 44100, 0.5 * np.sin(2 * np.pi * 220 * t), 0.5 * np.sin(2 * np.pi * 330 * t))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 90, 3), dtype=np.uint8)).save(tmp_path / "face.png")
    sweep = tmp_path / "sweep"
    proc = run_launch(sweep, "model=tiny", "parallel=ulysses", "launcher.nproc_per_node=2", "logger=disabled",
                      f"model.checkpoint_dir={folder}", "model.text_encoder.checkpoint=t5.pth",
                      "model.audio_encoder.checkpoint=wav2vec2", f"model.vae_dim={TEST_VAE_DIM}",
                      "workload.prompt=a person talks", f"workload.audio_path={speech}",
                      f"workload.image_path={tmp_path / 'face.png'}", "workload.clips=-1",
                      "workload.sample_steps=2", "parallel.vae=sharded", timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = job_results(sweep)[0]
    assert results["status"] == "completed"
    work = results["ranks"][0]["workload"]
    assert work["clips"] == 2 and work["text_branch"] == "tokenized" and work["size"] == "64*64"

    with av.open(str(sweep / "0" / "video.mp4")) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0]
        assert video.average_rate == 16 and (video.width, video.height) == (64, 64)
        frames = sum(1 for _ in container.decode(video))
    assert frames == 2 * 8  # two clips of 8 frames
    with av.open(str(sweep / "0" / "video.mp4")) as container:
        samples = sum(f.samples for f in container.decode(container.streams.audio[0]))
    assert audio.rate == 16000 and abs(samples / 16000 - frames / 16) < 0.1  # the video's second

    summary = results["summary"]
    stages = summary["stages_s"]
    assert set(stages) == {"text_encode", "audio_encode", "reference_encode", "motion_encode", "denoise",
                           "vae_decode", "video_write"}
    assert all(v > 0 for v in stages.values())
    assert summary["stage_peak_host_rss_gib"]["vae_decode"] > 0
    assert summary["seconds_per_clip"] == pytest.approx(summary["pipeline_s"] / 2)
    assert summary["seconds_per_video_second"] == pytest.approx(summary["pipeline_s"] / 1.0)
    assert summary["dit_share"] == pytest.approx(stages["denoise"] / summary["pipeline_s"])
    # only rank 0 writes the video
    assert "video_write" in results["ranks"][0]["stages"] and "video_write" not in results["ranks"][1]["stages"]
    page = (sweep / "report.html").read_text()
    assert "Pipeline time per stage" in page and "Peak memory per stage" in page and "s/clip" in page
