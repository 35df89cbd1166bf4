"""The S2V pipeline around the DiT: audio preparation, the reference image's size and pixels,
the VAE decoder (and the streaming encoder) against whole-clip references written here, tiled
decoding, and the pre-launch input checks."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from launch_helpers import torchrun
from tolerance import close_kwargs, reordered_sum_tolerance, vae_decoder_chain, vae_encoder_chain
from wan_exp.config import ConfigError, compose_config
from wan_exp.geometry import job_geometry
from wan_exp.media import read_audio, reference_pixels, size_within_area
from wan_exp.models.vae import (
    LATENT_MEAN,
    LATENT_STD,
    AttentionBlock,
    Downsample,
    ResidualBlock,
    Upsample,
    WanVAE,
)
from wan_exp.preflight import check_inputs, validate
from wan_exp.workloads.inputs import clean_prompt, feature_extractor, features_per_video_frame

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
            chunk = samples[:, start : start + 1152]
            if fmt == "s16":
                frame = av.AudioFrame.from_ndarray(
                    (chunk.T.reshape(1, -1) * 32767).astype(np.int16), format="s16", layout="stereo"
                )
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
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.4 / np.sqrt(2), rel=0.05)
    spectrum = np.abs(np.fft.rfft(middle))
    assert np.argmax(spectrum) * 16000 / middle.size == pytest.approx(440, abs=3)


def test_44k_stereo_file_is_resampled_as_soxr_hq_does(tmp_path):
    """The oracle: soxr called directly on the channels' mean of the samples the file holds
    (16-bit integers / 32768, as soundfile reads them), cut to ceil(n * 16000 / 44100) as
    librosa.load does. Both sides run the same float32 arithmetic: within 1e-6."""
    import soxr

    rate, n = 44100, 30870  # 0.7 s
    t = np.arange(n) / rate
    noise = np.random.default_rng(0).normal(0, 0.05, n)
    samples = np.stack([0.5 * np.sin(2 * np.pi * 440 * t) + noise, 0.3 * np.sin(2 * np.pi * 7900 * t)])
    ints = (samples * 32767).astype(np.int16)
    path = tmp_path / "speech44k.flac"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("flac", rate=rate)
        stream.layout = "stereo"
        for start in range(0, n, 1152):
            chunk = np.ascontiguousarray(ints[:, start : start + 1152].T).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    mono = (ints.astype(np.float32) / 32768).mean(axis=0)
    expected = soxr.resample(mono, rate, 16000, quality="soxr_hq")[: int(np.ceil(n * 16000 / rate))]
    got = read_audio(path)
    assert got.shape == expected.shape == (11200,) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_16k_file_is_read_without_resampling(tmp_path):
    ints = (np.random.default_rng(1).normal(0, 0.2, (2, 4000)) * 32767).clip(-32768, 32767).astype(np.int16)
    path = tmp_path / "speech16k.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=16000)
        stream.layout = "stereo"
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(ints.T).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 16000, 0, Fraction(1, 16000)
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    np.testing.assert_array_equal(read_audio(path), (ints.astype(np.float32) / 32768).mean(axis=0))


def test_prompts_are_cleaned_as_upstreams_tokenizer_wrapper_does():
    # ftfy turns full-width punctuation into ASCII, HTML entities are unescaped twice, every
    # whitespace run becomes one space
    assert clean_prompt("  a\u3000woman，\t\n smiling&amp;amp;talking  ") == "a woman, smiling&talking"
    negative = compose_config(["model=tiny"]).workload.negative_prompt
    assert negative.count("\uff0c") == 20
    cleaned = clean_prompt(negative)
    assert "\uff0c" not in cleaned and cleaned.count(",") == negative.count("\uff0c") + negative.count(",")


def test_features_are_interpolated_to_30fps_and_picked_per_video_frame():
    states = torch.randn(1, 2, 50, 3, dtype=torch.float64)  # one second at 50 Hz
    features, clips = features_per_video_frame(states, fps=16, frames_per_clip=8, max_clips=-1)
    # reference: 30 features at 30 fps by linear interpolation with aligned corners ...
    t30 = 30
    positions = np.arange(t30) * (50 - 1) / (t30 - 1)
    at30 = np.stack(
        [[np.interp(positions, np.arange(50), states[0, layer, :, c].numpy()) for c in range(3)] for layer in range(2)]
    )  # (layers, C, 30)
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
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "feature_extractor_type": "Wav2Vec2FeatureExtractor",
                "do_normalize": False,
                "feature_size": 1,
                "padding_side": "right",
                "padding_value": 0.0,
                "return_attention_mask": False,
                "sampling_rate": 16000,
            }
        )
    )
    cfg = compose_config(["model=tiny", f"model.checkpoint_dir={tmp_path}", "model.audio_encoder.checkpoint=wav2vec2"])
    raw = feature_extractor(cfg)(wave, sampling_rate=16000, return_tensors="np").input_values[0]
    np.testing.assert_allclose(raw, wave)


# ----------------------------------------------------------------------------- image
def upstream_size(height: int, width: int, area: int) -> tuple[int, int]:
    """Upstream's rule, written here from its description: 100 scales s_i = top - (top -
    bottom) * i / 100, i = 0..99 (an image within the area: top 1, bottom 0.1; a larger one:
    top sqrt(area / hw), bottom the root (-b + sqrt(b^2 - 2ac)) / 2a, a = hw, b = 63(h + w),
    c = 63^2 - area); the first whose truncated sides padded up to multiples of 64 fit."""
    if height * width <= area:
        top, bottom = 1.0, 0.1
    else:
        a, b, c = height * width, 63 * (height + width), 63**2 - area
        top, bottom = np.sqrt(area / (height * width)), (-b + np.sqrt(b * b - 2 * a * c)) / (2 * a)
    for i in range(100):
        s = top - (top - bottom) * i / 100
        h, w = int(height * s), int(width * s)
        h, w = h + (64 - h % 64) % 64, w + (64 - w % 64) % 64
        if h * w <= area:
            return h, w
    raise AssertionError("no scale fits: the table below holds none of those")


@pytest.mark.parametrize(
    "height, width, area, expected",
    [
        (1350, 1080, 480 * 832, (640, 512)),  # a bisection for the largest scale gives 704x512
        (4000, 3000, 704 * 1280, (1024, 768)),  # ... 1088x768
        (3000, 4000, 704 * 1280, (768, 1024)),
        (1080, 1920, 480 * 832, None),
        (1920, 1080, 720 * 1280, None),
        (1000, 1000, 1024 * 704, None),
        (720, 1280, 1024 * 704, None),
        (300, 100, 1024 * 704, None),
        (500, 375, 480 * 832, None),
        (2448, 3264, 480 * 832, None),
        (1536, 2048, 704 * 1024, None),
        (768, 1366, 480 * 832, None),
    ],
)
def test_size_from_image_is_upstreams_first_fitting_scale(height, width, area, expected):
    chosen = size_within_area(height, width, area)
    assert chosen == upstream_size(height, width, area)
    if expected is not None:
        assert chosen == expected
    assert chosen[0] % 64 == 0 and chosen[1] % 64 == 0 and chosen[0] * chosen[1] <= area
    if height * width <= area:  # small images are not scaled up, only padded
        assert chosen == (-(-height // 64) * 64, -(-width // 64) * 64)


@pytest.mark.parametrize(
    "image_hw, target, pad_cols",
    [
        ((50, 50), (64, 128), 32),  # square into wide: the resized 64x64 image, black 32 columns each side
        ((100, 50), (64, 128), 32),  # tall into wide: 128x64 after resize, centre 64 rows, black sides
        ((50, 200), (64, 64), 0),  # wide into square: 64x256 after resize, centre 64 columns, no padding
    ],
)
def test_reference_pixels_resize_shorter_side_centre_crop_and_pad_black(tmp_path, image_hw, target, pad_cols):
    h, w = image_hw
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = 255  # red everywhere ...
    image[:, w // 2 :, 2] = 255  # ... and blue in the right half
    Image.fromarray(image).save(tmp_path / "ref.png")
    out = reference_pixels(tmp_path / "ref.png", *target)
    assert out.shape == (*target, 3) and out.dtype == np.float32
    if pad_cols:
        assert (out[:, :pad_cols] == -1).all() and (out[:, -pad_cols:] == -1).all()
    inner = out[:, pad_cols : target[1] - pad_cols]
    np.testing.assert_allclose(inner[..., 0], 1.0)  # red kept
    np.testing.assert_allclose(inner[:, : inner.shape[1] // 2 - 2, 2], -1.0)  # left half: no blue
    np.testing.assert_allclose(inner[:, inner.shape[1] // 2 + 2 :, 2], 1.0)  # right half: blue


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
            weights = torch.softmax(q.transpose(1, 2) @ k / c**0.5, dim=-1)
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
        return ref_frames(
            lambda f: F.conv2d(f.repeat_interleave(2, 2).repeat_interleave(2, 3), conv.weight, conv.bias, padding=1), x
        )
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


def stats(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent mean and std per channel, in the dtype of ``like``."""
    return (
        torch.tensor(LATENT_MEAN, dtype=like.dtype).view(1, 16, 1, 1, 1),
        torch.tensor(LATENT_STD, dtype=like.dtype).view(1, 16, 1, 1, 1),
    )


def ref_decode(vae: WanVAE, z: torch.Tensor) -> torch.Tensor:
    d = vae.decoder
    mean, std = stats(z)
    x = ref_conv(vae.conv2, z * std + mean)
    x = ref_run(d.middle, ref_conv(d.conv1, x))
    return ref_run(d.head, ref_run(d.upsamples, x)).clamp(-1, 1)


def ref_encode(vae: WanVAE, pixels: torch.Tensor) -> torch.Tensor:
    e = vae.encoder
    x = ref_run(e.head, ref_run(e.middle, ref_run(e.downsamples, ref_conv(e.conv1, pixels))))
    mean = ref_conv(vae.conv1, x)[:, :16]
    shift, scale = stats(mean)
    return (mean - shift) / scale


def small_vae(seed: int = 0, dim: int = 4) -> WanVAE:
    torch.manual_seed(seed)
    vae = WanVAE(dim).eval()
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("proj.weight"):  # so the attention's output matters
                param.normal_(0, 0.3)
    return vae


# fp64 for the decoder comparisons. Each value passes about 30 layers, each a sum of at most
# 16 * 27 = 432 products of values below about 10: a worst-case rounding bound of
# 30 * 432 * 2^-53 * 10 = 1.4e-11. (In fp32 the CPU's convolution algorithms differ by shape,
# and their rounding alone reaches 1e-5 to 1e-3 on random weights.) A real error, a halo one
# latent short, is 1e-9 in the test below.
DECODE_TOLERANCE = 2e-11


def test_streaming_decoder_equals_the_whole_clip_causal_reference():
    vae = small_vae().double()
    z = torch.randn(1, 16, 3, 4, 6, dtype=torch.float64)
    out = vae.decode(z)
    assert out.shape == (1, 3, 9, 32, 48)  # 1 + 4 * (3 - 1) frames, 8x the latent size
    with torch.no_grad():
        expected = ref_decode(vae, z)
    torch.testing.assert_close(out, expected, rtol=0, atol=DECODE_TOLERANCE)
    assert out.abs().max() <= 1 and out.std() > 0.01


def test_streaming_encoder_equals_the_whole_clip_causal_reference():
    vae = small_vae(1)
    pixels = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    out = vae.encode(pixels)
    assert out.shape == (1, 16, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(out, ref_encode(vae, pixels), **close_kwargs(torch.float32, *vae_encoder_chain(4)))
    # causal: the first latent frame is the first pixel frame's alone
    torch.testing.assert_close(
        out[:, :, :1], vae.encode(pixels[:, :, :1]), **close_kwargs(torch.float32, *vae_encoder_chain(4))
    )


# The halo each up-sampling level's tiles need (in that level's pixels), from the receptive field
# of what follows it, walked back from the head: a 3x3 convolution reads one pixel further, a
# nearest doubling (output i reads input i // 2) halves, rounding up. Pixel level: the head conv
# and 3 residual blocks of two 3x3 convs = 7; level 2 (4x): the up-sampler's conv at 8x
# (7 + 1 = 8 -> 4) + 6 = 10; level 1 (2x): 10 + 1 = 11 -> 6, + 6 = 12; level 0 (latents):
# 12 + 1 = 13 -> 7, + 6 = 13.
LEVEL_HALOS = {0: 13, 4: 12, 8: 10, 12: 7}  # index of the level's first layer in decoder.upsamples


def test_tiles_equal_the_whole_frame_decode():
    """Tiles: the attention runs on the whole frame, the rest per tile with a halo covering its
    receptive field at each level, so they equal the plain decode up to fp64 rounding; a halo
    one pixel short of it at any level does not."""
    vae = small_vae(2, dim=2).double()
    assert vae.decoder.level_halos == LEVEL_HALOS
    z = torch.randn(1, 16, 2, 6, 34, dtype=torch.float64)  # halos reach past the rows, not the columns
    whole = vae.decode(z)
    for grid in ((2, 2), (6, 1)):  # (6, 1): tiles one latent high
        tiled = vae.decode_tiled(z, grid)
        assert tiled.shape == whole.shape
        assert (tiled - whole).abs().max().item() <= DECODE_TOLERANCE
    for level in LEVEL_HALOS:
        vae.decoder.level_halos[level] -= 1
        try:
            assert (vae.decode_tiled(z, (2, 2)) - whole).abs().max().item() > 10 * DECODE_TOLERANCE, level
        finally:
            vae.decoder.level_halos[level] += 1


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's VmHWM reset")
def test_tiled_and_sharded_decodes_equal_the_plain_one_and_cut_the_peak():
    """tests/dist/vae_split_decodes.py on 4 gloo ranks: the sharded pixels (fp64) equal the
    plain decode on every rank, over the 4 ranks and over two groups of 2 interleaved ranks each
    decoding a clip of its own; the resident high-water mark of a tiled decode is at most 0.6 of
    the whole-frame decode's, that of each rank's sharded share, the gather of the strips
    included, at most 0.6 / N with N = 2 and 4 ranks sharing the clip (full latent height, 60 as
    480 px, at a reduced width)."""
    proc = torchrun(4, "tests/dist/vae_split_decodes.py", env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(found["max_abs_diff"]) == 4 and all(
        diff <= 10 * reordered_sum_tolerance(torch.float64, *vae_decoder_chain(4, 5 * 18))
        for diff in found["max_abs_diff"].values()
    ), found["max_abs_diff"]
    whole = found["whole"]
    assert whole > 100 * 2**20  # the measurement sees the decode (about 150 MiB)
    assert found["tiled"] <= 0.6 * whole, found
    for ranks in (2, 4):
        per_rank = found["sharded"][str(ranks)]
        assert len(per_rank) == 4 and max(per_rank) <= 0.6 / ranks * whole, (ranks, found)


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
        junk_cfg = generate_cfg(f"workload.audio_path={junk}")
        check_inputs(junk_cfg, job_geometry(junk_cfg), 2)
    (tmp_path / "face.png").write_bytes(b"not an image")
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ConfigError, match=r"workload\.image_path=.*face\.png' is not a readable image"):
        validate(
            generate_cfg(f"workload.image_path={tmp_path / 'face.png'}", f"model.checkpoint_dir={tmp_path / 'ckpt'}"), 2
        )
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
    proc = torchrun(2, "tests/dist/vae_modes.py")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    measured = dict(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("max_abs_diff"))
    assert set(measured) == {"every_rank", "rank0", "tiled", "sharded"}
    assert all(
        float(v) <= 10 * reordered_sum_tolerance(torch.float64, *vae_decoder_chain(4, 4 * 40))
        for v in measured.values()
    )


# ----------------------------------------------------------------------------- a tiny job end to end
TEST_VAE_DIM = 4  # half the tiny model's VAE width: the decode dominates a tiny job on the CPU


def write_tiny_checkpoint_folder(folder: Path) -> None:
    """The official folder layout at tiny size: DiT shards, umT5 file, VAE file, wav2vec2
    folder with its preprocessor config, umT5 tokenizer folder (a word-level tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Wav2Vec2FeatureExtractor

    from wan_exp.models.checkpoint import write_checkpoint
    from wan_exp.models.encoders import (
        audio_encoder_config,
        build_text_encoder,
        t5_hf_to_official,
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
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder / "google" / "umt5-xxl")


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
    proc = run_launch(
        sweep,
        "model=tiny",
        "parallel=ulysses",
        "launcher.nproc_per_node=2",
        "logger=disabled",
        f"model.checkpoint_dir={folder}",
        "model.text_encoder.checkpoint=t5.pth",
        "model.audio_encoder.checkpoint=wav2vec2",
        f"model.vae_dim={TEST_VAE_DIM}",
        "workload.prompt=a person talks",
        f"workload.audio_path={speech}",
        f"workload.image_path={tmp_path / 'face.png'}",
        "workload.clips=-1",
        "workload.sample_steps=2",
        "parallel.vae=sharded",
        timeout=400,
    )
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
    assert frames == 2 * 8 - 3  # two clips of 8 frames, less the 3 the first clip drops
    with av.open(str(sweep / "0" / "video.mp4")) as container:
        samples = sum(f.samples for f in container.decode(container.streams.audio[0]))
    assert audio.rate == 16000 and abs(samples / 16000 - frames / 16) < 0.1  # the video's second

    summary = results["summary"]
    stages = summary["stages_s"]
    assert set(stages) == {
        "text_encode",
        "audio_encode",
        "reference_encode",
        "motion_encode",
        "denoise",
        "vae_decode",
        "video_write",
    }
    assert all(v > 0 for v in stages.values())
    assert summary["stage_peak_host_rss_gib"]["vae_decode"] > 0
    assert summary["seconds_per_clip"] == pytest.approx(summary["pipeline_s"] / 2)
    assert summary["seconds_per_video_second"] == pytest.approx(summary["pipeline_s"] / (13 / 16))
    assert summary["dit_share"] == pytest.approx(stages["denoise"] / summary["pipeline_s"])
    # only rank 0 writes the video
    assert "video_write" in results["ranks"][0]["stages"] and "video_write" not in results["ranks"][1]["stages"]
    page = (sweep / "report.html").read_text()
    assert "Pipeline time per stage" in page and "Peak memory per stage" in page and "s/clip" in page


# ----------------------------------------------------------------------------- the clip loop
@pytest.mark.slow
def test_clips_decode_as_upstream_and_the_motion_buffer_keeps_earlier_pixels(tmp_path, monkeypatch):
    """Three clips of 48 frames (upstream's other suggested clip length) from a tiny checkpoint
    folder written here, against a plain reference of upstream's loop written in this test:
    the first clip decodes [reference latent, its latents] and keeps its last 48 frames but the
    first 3, later clips decode [motion latents, their latents] and keep the last 48; the motion
    latents are the encoding of the last 73 pixel frames made (zeros before the first clip), so
    at 48 frames per clip the third clip's motion still holds 25 frames of the first clip; the
    video is those frames, truncated to uint8 as upstream's writer does."""
    from contextlib import nullcontext

    from wan_exp.models.checkpoint import write_checkpoint
    from wan_exp.models.wan_s2v import WanModel
    from wan_exp.parallel.registry import setup_parallel
    from wan_exp.rank.runtime import RankContext
    from wan_exp.workloads import generate

    folder = tmp_path / "ckpt"
    folder.mkdir()
    face = np.random.default_rng(0).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    Image.fromarray(face).save(tmp_path / "face.png")
    cfg = compose_config(
        [
            "model=tiny",
            "parallel=single",
            f"model.checkpoint_dir={folder}",
            "workload.size=64*64",
            "workload.size_from_image=false",
            f"workload.image_path={tmp_path / 'face.png'}",
            "workload.frames_per_clip=48",
            "workload.clips=3",
            "workload.sample_steps=1",
            "workload.warmup_steps=0",
            "workload.save_video=true",
            "model.vae_dim=2",
        ]
    )
    torch.manual_seed(0)
    write_checkpoint(WanModel(cfg.model).state_dict(), folder, shards=2)
    vae = small_vae(3, dim=cfg.model.vae_dim)
    torch.save(vae.state_dict(), folder / "Wan2.1_VAE.pth")
    face_pixels = torch.from_numpy(reference_pixels(tmp_path / "face.png", 64, 64))
    reference = vae.encode(face_pixels.permute(2, 0, 1)[None, :, None])

    sampled, decoded, encoded = [], [], []

    def recorder(function, log):
        def record(*args):
            out = function(*args)
            log.append((args, out))
            return out

        return record

    monkeypatch.setattr(generate, "denoise_clip", recorder(generate.denoise_clip, sampled))
    monkeypatch.setattr(generate, "decode_clip", recorder(generate.decode_clip, decoded))
    monkeypatch.setattr(generate, "encode_motion", recorder(generate.encode_motion, encoded))
    (tmp_path / "job" / "progress").mkdir(parents=True)  # as the host prepares a job dir for its ranks
    ctx = RankContext(cfg, 0, 0, 1, torch.device("cpu"), tmp_path / "job")
    frames, _waveform, clips = generate.generate_video(
        cfg, job_geometry(cfg), ctx, setup_parallel(cfg, ctx), lambda step: nullcontext()
    )

    assert clips == 3 and len(sampled) == 3 and len(decoded) == 3 and len(encoded) == 3  # encodes: before, after 0, 1
    latents = [out.float() for _args, out in sampled]
    assert all(lat.shape == (1, 16, 12, 8, 8) for lat in latents)
    # decode inputs: the reference latent, then the motion latents of the buffer
    motion = [out for _args, out in encoded]
    torch.testing.assert_close(decoded[0][0][1], torch.cat([reference, latents[0]], dim=2), rtol=0, atol=0)
    for clip in (1, 2):
        torch.testing.assert_close(decoded[clip][0][1], torch.cat([motion[clip], latents[clip]], dim=2), rtol=0, atol=0)
    # the frames each clip keeps, and the buffer as a plain history of every frame made
    pixels = [out for _args, out in decoded]
    assert [p.shape[2] for p in pixels] == [1 + 4 * 12, 1 + 4 * (19 + 12 - 1), 1 + 4 * (19 + 12 - 1)]
    kept = [pixels[0][:, :, -48:][:, :, 3:], pixels[1][:, :, -48:], pixels[2][:, :, -48:]]
    history = torch.zeros(1, 3, 73, 64, 64)
    for clip in range(3):
        buffer = encoded[clip][0][1]
        torch.testing.assert_close(buffer, history[:, :, -73:], rtol=0, atol=0)
        history = torch.cat([history, kept[clip]], dim=2)
    third_buffer = encoded[2][0][1]
    torch.testing.assert_close(third_buffer[:, :, :25], kept[0][:, :, -25:], rtol=0, atol=0)  # clip 0's pixels
    # the video: 48 * 3 - 3 frames, truncated to uint8
    video = torch.cat(kept, dim=2)[0].permute(1, 2, 3, 0).numpy()
    assert frames.shape == (48 * 3 - 3, 64, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, np.floor((np.clip(video, -1, 1) + 1) / 2 * 255).astype(np.uint8))
