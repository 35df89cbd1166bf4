"""The Wan2.1 VAE: official key names and shapes (encoder and decoder), pinned numerics,
loading from an official-layout file, and the reference image through the generate inputs.
(The streaming decoder/encoder against whole-clip references: tests/test_pipeline.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tolerance import close_kwargs, vae_encoder_chain
from wan_exp.config import compose_config
from wan_exp.geometry import job_geometry
from wan_exp.media import reference_pixels
from wan_exp.models.checkpoint import CheckpointError, write_checkpoint
from wan_exp.models.vae import (
    LATENT_MEAN,
    LATENT_STD,
    AttentionBlock,
    Cache,
    CausalConv3d,
    ChannelRMSNorm,
    WanVAE,
    load_vae,
    vae_checkpoint_path,
)
from wan_exp.models.wan_s2v import WanModel
from wan_exp.parallel.registry import setup_parallel
from wan_exp.rank.runtime import RankContext
from wan_exp.workloads import WORKLOADS, generate
from wan_exp.workloads.inputs import encode_job_inputs, reference_latents

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TINY_DIM = 8


def official_encoder_shapes(dim: int = 96, z: int = 16) -> dict[str, tuple[int, ...]]:
    """The encoder tensors of Wan2.1_VAE.pth, written out from the upstream facts: base width
    96, multipliers (1, 2, 4, 4), two residual blocks per level, down-sampling after levels
    0 (spatial only), 1 and 2 (spatial + time_conv), a middle block with attention, a head
    to 2*z channels, then conv1 (1x1x1) before the mean/log-var split."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv3d(name, cout, cin, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k, k), (cout,)

    def residual(name, cin, cout):
        shapes[f"{name}.residual.0.gamma"] = (cin, 1, 1, 1)
        conv3d(f"{name}.residual.2", cout, cin, 3)
        shapes[f"{name}.residual.3.gamma"] = (cout, 1, 1, 1)
        conv3d(f"{name}.residual.6", cout, cout, 3)
        if cin != cout:
            conv3d(f"{name}.shortcut", cout, cin, 1)

    def downsample(name, c, temporal):
        shapes[f"{name}.resample.1.weight"], shapes[f"{name}.resample.1.bias"] = (c, c, 3, 3), (c,)
        if temporal:
            shapes[f"{name}.time_conv.weight"], shapes[f"{name}.time_conv.bias"] = (c, c, 3, 1, 1), (c,)

    d1, d2, d4 = dim, 2 * dim, 4 * dim
    conv3d("encoder.conv1", d1, 3, 3)
    residual("encoder.downsamples.0", d1, d1)
    residual("encoder.downsamples.1", d1, d1)
    downsample("encoder.downsamples.2", d1, temporal=False)
    residual("encoder.downsamples.3", d1, d2)
    residual("encoder.downsamples.4", d2, d2)
    downsample("encoder.downsamples.5", d2, temporal=True)
    residual("encoder.downsamples.6", d2, d4)
    residual("encoder.downsamples.7", d4, d4)
    downsample("encoder.downsamples.8", d4, temporal=True)
    residual("encoder.downsamples.9", d4, d4)
    residual("encoder.downsamples.10", d4, d4)
    residual("encoder.middle.0", d4, d4)
    shapes["encoder.middle.1.norm.gamma"] = (d4, 1, 1)
    shapes["encoder.middle.1.to_qkv.weight"], shapes["encoder.middle.1.to_qkv.bias"] = (3 * d4, d4, 1, 1), (3 * d4,)
    shapes["encoder.middle.1.proj.weight"], shapes["encoder.middle.1.proj.bias"] = (d4, d4, 1, 1), (d4,)
    residual("encoder.middle.2", d4, d4)
    shapes["encoder.head.0.gamma"] = (d4, 1, 1, 1)
    conv3d("encoder.head.2", 2 * z, d4, 3)
    conv3d("conv1", 2 * z, 2 * z, 1)
    return shapes


def official_decoder_shapes(dim: int = 96, z: int = 16) -> dict[str, tuple[int, ...]]:
    """The decoder tensors of Wan2.1_VAE.pth: conv2 (1x1x1), conv1 (z -> 4 dim), the middle
    block, four levels of three residual blocks at widths 4, 4, 2, 1 x dim (levels 1-3 start
    from half the previous width, as the up-sampling conv halves the channels), up-sampling
    after levels 0 and 1 (time_conv to twice the width + 2-D conv) and 2 (2-D conv only), and
    the head to 3 channels."""
    shapes: dict[str, tuple[int, ...]] = {}
    encoder = official_encoder_shapes(dim, z)

    def copy(ours: str, theirs: str) -> None:  # a residual/middle block of the same width
        shapes.update({k.replace(theirs, ours): v for k, v in encoder.items() if k.startswith(theirs + ".")})

    d1, d2, d4 = dim, 2 * dim, 4 * dim
    shapes["conv2.weight"], shapes["conv2.bias"] = (z, z, 1, 1, 1), (z,)
    shapes["decoder.conv1.weight"], shapes["decoder.conv1.bias"] = (d4, z, 3, 3, 3), (d4,)
    for i in range(3):
        copy(f"decoder.middle.{i}", f"encoder.middle.{i}")

    def residual(name, cin, cout):
        shapes[f"{name}.residual.0.gamma"] = (cin, 1, 1, 1)
        shapes[f"{name}.residual.2.weight"], shapes[f"{name}.residual.2.bias"] = (cout, cin, 3, 3, 3), (cout,)
        shapes[f"{name}.residual.3.gamma"] = (cout, 1, 1, 1)
        shapes[f"{name}.residual.6.weight"], shapes[f"{name}.residual.6.bias"] = (cout, cout, 3, 3, 3), (cout,)
        if cin != cout:
            shapes[f"{name}.shortcut.weight"], shapes[f"{name}.shortcut.bias"] = (cout, cin, 1, 1, 1), (cout,)

    def upsample(name, c, temporal):
        shapes[f"{name}.resample.1.weight"], shapes[f"{name}.resample.1.bias"] = (c // 2, c, 3, 3), (c // 2,)
        if temporal:
            shapes[f"{name}.time_conv.weight"], shapes[f"{name}.time_conv.bias"] = (2 * c, c, 3, 1, 1), (2 * c,)

    index = 0
    for cin, cout, up in ((d4, d4, "3d"), (d2, d4, "3d"), (d2, d2, "2d"), (d1, d1, None)):
        for _ in range(3):
            residual(f"decoder.upsamples.{index}", cin, cout)
            cin, index = cout, index + 1
        if up:
            upsample(f"decoder.upsamples.{index}", cout, temporal=up == "3d")
            index += 1
    shapes["decoder.head.0.gamma"] = (d1, 1, 1, 1)
    shapes["decoder.head.2.weight"], shapes["decoder.head.2.bias"] = (3, d1, 3, 3, 3), (3,)
    return shapes


def tiny_vae(seed: int = 0) -> WanVAE:
    torch.manual_seed(seed)
    model = WanVAE(TINY_DIM).eval()
    with torch.no_grad():  # norms start at ones; give them values so that loading them is tested
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.5)
    return model


def write_vae_file(model: WanVAE, path, extra: dict | None = None, drop: str | None = None, zip_format: bool = True):
    """An official-layout Wan2.1_VAE.pth: the encoder's and the decoder's tensors."""
    state = {k: v.clone() for k, v in model.state_dict().items() if k != drop}
    state.update(extra or {})
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    return path


def pixels(shape, seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- structure
def test_tiny_encoder_maps_one_frame_to_16_latent_channels_at_stride_8():
    out = tiny_vae().encode(pixels((2, 3, 1, 32, 48)))
    assert out.shape == (2, 16, 1, 4, 6) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"RGB video \(B, 3, 1 \+ 4k, H, W\), got \(1, 3, 4, 32, 32\)"):
        tiny_vae().encode(pixels((1, 3, 4, 32, 32)))


def test_real_vae_names_and_shapes_equal_the_official_file():
    with torch.device("meta"):
        model = WanVAE(96)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {**official_encoder_shapes(), **official_decoder_shapes()}
    # z_dim 16 and the 16 normalisation constants per channel
    assert len(LATENT_MEAN) == len(LATENT_STD) == 16 and min(LATENT_STD) > 1


# ----------------------------------------------------------------------------- numerics
def test_causal_conv_on_one_frame_is_the_last_time_slice_as_a_2d_conv():
    torch.manual_seed(0)
    conv = CausalConv3d(4, 5, 3)
    x = torch.randn(2, 4, 1, 7, 9)
    expected = F.conv2d(x[:, :, 0], conv.weight[:, :, 2], conv.bias, padding=1)  # earlier frames are zeros
    # a 3x3x3 conv over 4 channels sums 108 products per output (the 2-D reference 36)
    torch.testing.assert_close(conv(x)[:, :, 0], expected, **close_kwargs(torch.float32, terms=4 * 27))
    # and causal over several frames: frame t never sees frame t+1
    clip = torch.randn(1, 4, 3, 7, 9)
    later_changed = clip.clone()
    later_changed[:, :, 2] += 1.0
    torch.testing.assert_close(
        conv(clip)[:, :, :2], conv(later_changed)[:, :, :2], **close_kwargs(torch.float32, terms=4 * 27)
    )


def test_rms_norm_is_root_mean_square_over_channels_times_gamma():
    norm = ChannelRMSNorm(6, spatial_dims=3)
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 2.0)
    x = torch.randn(2, 6, 1, 3, 4)
    expected = x / x.pow(2).mean(dim=1, keepdim=True).sqrt() * norm.gamma
    # a sum of 6 squares, then the root and the division
    torch.testing.assert_close(norm(x), expected, **close_kwargs(torch.float32, terms=6, depth=2))


def test_attention_block_is_single_head_softmax_over_positions():
    torch.manual_seed(0)
    block = AttentionBlock(6)
    x = torch.randn(1, 6, 1, 3, 4)
    frame = block.norm(x[:, :, 0])[0].flatten(1)  # (C, positions)
    w, b = block.to_qkv.weight[:, :, 0, 0], block.to_qkv.bias
    q, k, v = ((w[i * 6 : (i + 1) * 6] @ frame + b[i * 6 : (i + 1) * 6, None]).T for i in range(3))
    attended = torch.softmax(q @ k.T / math.sqrt(6), dim=-1) @ v  # (positions, C)
    projected = block.proj.weight[:, :, 0, 0] @ attended.T + block.proj.bias[:, None]
    # the norm, q/k/v (6 terms), scores (6), softmax and weighting over 12 positions, the projection (6)
    torch.testing.assert_close(
        block(x)[0, :, 0], x[0, :, 0] + projected.view(6, 3, 4), **close_kwargs(torch.float32, terms=12, depth=5)
    )


def test_output_is_the_normalised_posterior_mean():
    model = tiny_vae()
    x = pixels((1, 3, 1, 16, 16))
    moments = F.conv3d(model.encoder(x, Cache()), model.conv1.weight, model.conv1.bias)  # 1x1x1 conv
    mean = moments[:, :16]  # channels 16..31 are the log-variance, unused
    expected = (mean - torch.tensor(LATENT_MEAN).view(1, 16, 1, 1, 1)) / torch.tensor(LATENT_STD).view(1, 16, 1, 1, 1)
    # the same encoder output, then the 1x1x1 conv over 32 channels and the normalisation
    torch.testing.assert_close(model.encode(x), expected, **close_kwargs(torch.float32, terms=32, depth=2))


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy_pickle"])
def test_official_layout_file_round_trips(tmp_path, zip_format):
    source = tiny_vae()
    path = write_vae_file(source, tmp_path / "Wan2.1_VAE.pth", zip_format=zip_format)
    loaded = load_vae(path, TINY_DIM, "cpu", torch.float32)
    x = pixels((1, 3, 1, 16, 24))
    torch.testing.assert_close(loaded.encode(x), source.encode(x), rtol=0, atol=0)
    z = torch.randn(1, 16, 2, 2, 3)
    torch.testing.assert_close(loaded.decode(z), source.decode(z), rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing", r"1 missing keys \(in the model, not in the weights\): encoder\.middle\.1\.proj\.bias"),
        ("unexpected", r"1 unexpected keys \(in the weights, not in the model\): encoder\.extra\.weight"),
        ("shape", r"encoder\.head\.2\.bias: the weights have shape \(7,\), the model expects \(32,\)"),
    ],
)
def test_mismatched_file_names_the_tensor(tmp_path, problem, message):
    source = tiny_vae()
    extra = {
        "unexpected": {"encoder.extra.weight": torch.zeros(1)},
        "shape": {"encoder.head.2.bias": torch.zeros(7)},
    }.get(problem)
    drop = "encoder.middle.1.proj.bias" if problem == "missing" else None
    path = write_vae_file(source, tmp_path / "Wan2.1_VAE.pth", extra=extra, drop=drop)
    with pytest.raises(CheckpointError, match=rf"Wan2\.1_VAE\.pth \(model\.vae_dim=8\): .*{message}"):
        load_vae(path, TINY_DIM, "cpu", torch.float32)


def test_missing_or_unreadable_vae_file_says_what_to_do(tmp_path):
    cfg = compose_config(["model=tiny", f"model.checkpoint_dir={tmp_path}"])
    with pytest.raises(CheckpointError, match=r"Wan2\.1_VAE\.pth: VAE checkpoint not found .*copy Wan2\.1_VAE\.pth"):
        vae_checkpoint_path(cfg.model)
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"Wan2\.1_VAE\.pth: cannot read the VAE checkpoint"):
        load_vae(vae_checkpoint_path(cfg.model), TINY_DIM, "cpu", torch.float32)


# ----------------------------------------------------------------------------- the image
def test_missing_or_unreadable_image_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"workload\.image_path='.*nope\.png' does not exist"):
        reference_pixels(tmp_path / "nope.png", 16, 16)
    (tmp_path / "bad.png").write_bytes(b"no image here")
    with pytest.raises(ValueError, match=r"workload\.image_path='.*bad\.png' is not a readable image"):
        reference_pixels(tmp_path / "bad.png", 16, 16)


def test_generate_uses_the_vae_encoding_of_the_image_as_reference(tmp_path, monkeypatch):
    overrides = [
        "model=tiny",
        "parallel=single",
        f"model.checkpoint_dir={tmp_path}",
        "workload.size=32*32",
        f"workload.image_path={tmp_path / 'face.png'}",
        "workload.size_from_image=false",
        "workload.sample_steps=1",
        "workload.warmup_steps=0",
        "workload.save_video=false",
    ]
    cfg = compose_config(overrides)
    write_checkpoint(WanModel(cfg.model).state_dict(), tmp_path, shards=2)
    vae = tiny_vae(seed=3)
    write_vae_file(vae, tmp_path / "Wan2.1_VAE.pth")
    face = np.random.default_rng(0).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    Image.fromarray(face).save(tmp_path / "face.png")
    face_pixels = torch.from_numpy(reference_pixels(tmp_path / "face.png", 32, 32))
    expected = vae.encode(face_pixels.permute(2, 0, 1)[None, :, None])

    ctx = RankContext(cfg, 0, 0, 1, torch.device("cpu"), None)
    parallel_model = setup_parallel(cfg, ctx)
    inputs = encode_job_inputs(cfg, job_geometry(cfg), parallel_model, torch.device("cpu"))
    terms, depth = vae_encoder_chain(TINY_DIM, positions=4 * 4)
    torch.testing.assert_close(inputs.ref, expected, **close_kwargs(torch.float32, terms, depth))
    # encoded in fp32 as upstream, then given the model's dtype
    assert torch.equal(
        reference_latents(cfg, job_geometry(cfg), None, torch.device("cpu"), torch.bfloat16),
        expected.to(torch.bfloat16),
    )
    seen = []
    ctx = RankContext(cfg, 0, 0, 1, torch.device("cpu"), None)
    original = generate.setup_parallel

    def setup_and_watch(cfg, ctx):
        model = original(cfg, ctx)
        model.dit.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["ref"]), with_kwargs=True)
        return model

    monkeypatch.setattr(generate, "setup_parallel", setup_and_watch)
    info = WORKLOADS["generate"](cfg, ctx)
    assert info["clips"] == 1 and len(seen) == 2  # cond and uncond of the one step
    assert all(torch.equal(ref, inputs.ref) for ref in seen)
