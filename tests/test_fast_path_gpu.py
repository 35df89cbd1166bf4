"""The fast path (bf16 weights, torch.compile per block, the fastest attention backend) computes
the same function as the plain path (fp32 weights and arithmetic, eager, SDPA math), within bf16
tolerance, on a reduced Wan config (head dim 128 like the 14B models) on a GPU.

The benchmarks (bench/dit_forward.py) time exactly this fast path at full size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from wan_exp.config import ModelConfig
from wan_exp.models import attention as attn_backend
from wan_exp.models.checkpoint import RandomWeights, load_into
from wan_exp.models.wan_s2v import WanModel, apply_compile

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
# 14B trunk shapes scaled down: 4 heads of 128, ffn/dim as in the real model
REDUCED = {
    "dim": 512,
    "ffn_dim": 1382,
    "num_heads": 4,
    "num_layers": 3,
    "text_dim": 256,
    "text_len": 64,
    "freq_dim": 256,
    "audio_dim": 64,
    "audio_layers": 5,
    "audio_inject_layers": [0, 2],
}
BF16_TOLERANCE = 2e-2  # relative L2 error of bf16 operands (docs/facts.md §M: 1e-3 .. 1e-2)

pytestmark = pytest.mark.gpu


def reduced_cfg(name: str, **overrides):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / f"{name}.yaml"), REDUCED, overrides)


def make_inputs(cfg, seed: int) -> dict:
    """Fresh random inputs: latents 4 x 32 x 48 (1536 noisy tokens), text, and for S2V audio,
    reference and motion latents."""
    g = torch.Generator("cuda").manual_seed(seed)
    f, h, w = 4, 32, 48

    def randn(*shape):
        return torch.randn(shape, generator=g, device="cuda")

    inputs = {
        "noisy": randn(1, 16, f, h, w),
        "timestep": torch.tensor([731.0], device="cuda"),
        "context": randn(1, cfg.text_len, cfg.text_dim),
    }
    if cfg.s2v:
        inputs.update(
            audio=randn(1, cfg.audio_layers, 4 * f, cfg.audio_dim),
            ref=randn(1, 16, 1, h, w),
            motion=randn(1, 16, cfg.motion_frames, h, w),
        )
    return inputs


def build(cfg, dtype: torch.dtype, state: dict | None = None) -> WanModel:
    with torch.device("meta"):
        model = WanModel(cfg)
    apply_compile(model, cfg)
    if state is None:
        load_into(model, RandomWeights(cfg, seed=3), dtype, "cuda")
    else:
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def run(model: WanModel, backend: str, inputs: dict) -> torch.Tensor:
    attn_backend.configure(backend)
    with torch.inference_mode():
        return model(**inputs).float()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def exact_fp32():
    """The reference must be true fp32: no TF32 in convolutions or matmuls."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    attn_backend.configure("auto")


@pytest.mark.parametrize("name", ["t2v_14b", "s2v_14b"])
def test_compiled_bf16_matches_fp32_reference(name, exact_fp32):
    fast = build(reduced_cfg(name, compile=True), torch.bfloat16)
    eager = build(reduced_cfg(name), torch.bfloat16, fast.state_dict())
    reference = build(reduced_cfg(name), torch.float32, fast.state_dict())  # the same (bf16) values
    for seed in (0, 1):  # the compiled graph must compute the same function on any input
        bf16_inputs = {k: v if k == "timestep" else v.bfloat16() for k, v in make_inputs(fast.cfg, seed).items()}
        inputs = {k: v.float() for k, v in bf16_inputs.items()}  # the same values in fp32
        expected = run(reference, "sdpa_math", inputs)
        got_eager = run(eager, "auto", bf16_inputs)
        got_fast = run(fast, "auto", bf16_inputs)
        assert attn_backend.selected_backend() not in (None, "sdpa_math")
        assert got_fast.shape == expected.shape == inputs["noisy"].shape
        assert torch.isfinite(got_fast).all()
        fast_error, eager_error = rel_l2(got_fast, expected), rel_l2(got_eager, expected)
        assert fast_error < BF16_TOLERANCE, (name, seed, fast_error, eager_error)
        # compilation may reorder bf16 rounding, never add error of its own
        assert fast_error <= 1.5 * eager_error + 1e-3, (name, seed, fast_error, eager_error)
