"""Text (umT5) and audio (wav2vec2) encoders at tiny size; the official T5 key mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from wan_exp.config import ModelConfig
from wan_exp.models.checkpoint import CheckpointError
from wan_exp.models.encoders import (
    build_audio_encoder,
    build_text_encoder,
    encode_text,
    t5_hf_to_official,
    t5_official_to_hf,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


@pytest.fixture()
def tiny_cfg():
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / "tiny.yaml"))


def test_text_encoder_runs_and_zeroes_padding(tiny_cfg):
    encoder = build_text_encoder(tiny_cfg, "cpu", torch.float32, seed=3)
    ids = torch.randint(0, tiny_cfg.text_encoder.vocab_size, (2, tiny_cfg.text_len))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        out = encode_text(encoder, ids, mask)
    assert out.shape == (2, tiny_cfg.text_len, tiny_cfg.text_dim)
    assert torch.isfinite(out).all() and out[0].abs().sum() > 0
    assert out[1, 5:].abs().sum() == 0
    again = build_text_encoder(tiny_cfg, "cpu", torch.float32, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), again.state_dict().values()))


def test_t5_key_mapping_round_trips(tiny_cfg):
    hf = build_text_encoder(tiny_cfg, "cpu", torch.float32).state_dict()
    official = t5_hf_to_official(hf)
    n_layers = tiny_cfg.text_encoder.num_layers
    assert len(official) == 2 + 10 * n_layers  # token_embedding, norm + 10 tensors per block
    assert {
        "token_embedding.weight",
        "norm.weight",
        "blocks.1.attn.q.weight",
        "blocks.0.ffn.gate.0.weight",
        "blocks.0.ffn.fc1.weight",
        "blocks.0.ffn.fc2.weight",
        "blocks.1.pos_embedding.embedding.weight",
        "blocks.0.norm1.weight",
        "blocks.0.norm2.weight",
    } <= set(official)
    assert official["blocks.1.ffn.gate.0.weight"] is hf["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"]
    back = t5_official_to_hf(official)
    assert set(back) == set(hf)
    assert all(back[k] is hf[k] or torch.equal(back[k], hf[k]) for k in hf)
    with pytest.raises(CheckpointError, match="no mapping for tensor 'blocks.0.attn.bogus.weight'"):
        t5_official_to_hf({"blocks.0.attn.bogus.weight": torch.zeros(1)})


def test_text_encoder_loads_the_official_file(tiny_cfg, tmp_path):
    source = build_text_encoder(tiny_cfg, "cpu", torch.float32, seed=7)
    torch.save(t5_hf_to_official(source.state_dict()), tmp_path / "t5.pth")
    cfg = OmegaConf.merge(tiny_cfg, {"checkpoint_dir": str(tmp_path), "text_encoder": {"checkpoint": "t5.pth"}})
    loaded = build_text_encoder(cfg, "cpu", torch.float32)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            encode_text(loaded, ids, torch.ones_like(ids)), encode_text(source, ids, torch.ones_like(ids))
        )
    missing = OmegaConf.merge(cfg, {"text_encoder": {"checkpoint": "absent.pth"}})
    with pytest.raises(CheckpointError, match="absent.pth: not found"):
        build_text_encoder(missing, "cpu", torch.float32)


def test_audio_encoder_returns_every_hidden_state(tiny_cfg):
    encoder = build_audio_encoder(tiny_cfg, "cpu", torch.float32, seed=0)
    waveform = torch.randn(2, 16000)  # one second at 16 kHz -> about 50 feature frames
    with torch.no_grad():
        states = encoder(waveform)
    layers = tiny_cfg.audio_encoder.num_hidden_layers + 1
    assert states.shape[:2] == (2, layers) and states.shape[3] == tiny_cfg.audio_dim
    assert 45 <= states.shape[2] <= 50
