"""python -m wan_exp.checkpoint write: a random-weight folder in the official layout, read back
by the loaders that use it (wan-exp's own, transformers' as upstream calls them, and the
workload=upstream preflight)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from wan_exp.checkpoint.__main__ import main
from wan_exp.checkpoint.writer import (
    MANIFEST,
    CheckpointWriteError,
    check_target,
    estimated_bytes,
    write_random_checkpoint,
)
from wan_exp.config import compose_config
from wan_exp.models.checkpoint import CheckpointReader, RandomWeights
from wan_exp.models.encoders import build_text_encoder, encode_text
from wan_exp.models.vae import load_vae
from wan_exp.upstream.preflight import missing_checkpoint_files

# upstream's WanModel_S2V constructor parameters (wan/modules/s2v/model_s2v.py), written out here
UPSTREAM_DIT_PARAMETERS = {
    "cond_dim",
    "audio_dim",
    "num_audio_token",
    "enable_adain",
    "adain_mode",
    "audio_inject_layers",
    "zero_init",
    "zero_timestep",
    "enable_motioner",
    "add_last_motion",
    "enable_tsm",
    "trainable_token_pos_emb",
    "motion_token_num",
    "enable_framepack",
    "framepack_drop_mode",
    "model_type",
    "patch_size",
    "text_len",
    "in_dim",
    "dim",
    "ffn_dim",
    "freq_dim",
    "text_dim",
    "out_dim",
    "num_heads",
    "num_layers",
    "window_size",
    "qk_norm",
    "cross_attn_norm",
    "eps",
}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, object]:
    cfg = compose_config(["model=tiny"]).model
    out = tmp_path_factory.mktemp("random") / "Wan2.2-S2V-14B"
    assert main(["write", "model=tiny", f"out={out}", "seed=3", "shards=2"]) == 0
    return out, cfg


def test_the_folder_has_every_file_upstream_loads(written, tmp_path):
    out, _ = written
    assert missing_checkpoint_files(tmp_path, out) == []  # a checkout without task config: upstream's names
    assert json.loads((out / MANIFEST).read_text())["random"] is True


def test_dit_shards_hold_the_random_weights_and_upstreams_config(written):
    out, cfg = written
    reader = CheckpointReader(out)
    source = RandomWeights(cfg, 3)
    assert sorted(reader.keys()) == sorted(source.keys())
    assert len({p.name for p in out.glob("diffusion_pytorch_model-*.safetensors")}) == 2
    for key in ("blocks.0.self_attn.q.weight", "patch_embedding.weight", "head.modulation"):
        assert torch.equal(reader.get(key, torch.float32, "cpu"), source.get(key, torch.float32, "cpu"))
    config = json.loads((out / "config.json").read_text())
    assert set(config) - {"_class_name"} == UPSTREAM_DIT_PARAMETERS
    assert (config["dim"], config["num_layers"], config["audio_inject_layers"]) == (64, 4, [0, 2])


def test_t5_vae_and_wav2vec2_load_with_the_loaders_that_read_them(written):
    from transformers import AutoTokenizer, Wav2Vec2ForCTC, Wav2Vec2Processor

    out, cfg = written
    model_cfg = OmegaConf.merge(
        cfg, {"checkpoint_dir": str(out), "text_encoder": {"checkpoint": "models_t5_umt5-xxl-enc-bf16.pth"}}
    )
    t5 = build_text_encoder(model_cfg, "cpu", torch.float32)
    official = torch.load(out / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in official.values())
    tokenizer = AutoTokenizer.from_pretrained(str(out / "google" / "umt5-xxl"))
    ids = tokenizer(["a woman talks"], padding="max_length", max_length=cfg.text_len, return_tensors="pt")
    assert ids.attention_mask.sum().item() == 3 and (ids.input_ids[0, :3] == tokenizer.unk_token_id).all()
    hidden = encode_text(t5, ids.input_ids, ids.attention_mask)
    assert torch.isfinite(hidden).all() and hidden[0, :3].abs().sum() > 0
    vae = load_vae(out / "Wan2.1_VAE.pth", cfg.vae_dim, "cpu", torch.float32)
    assert sum(p.numel() for p in vae.parameters()) > 0
    folder = str(out / "wav2vec2-large-xlsr-53-english")
    processor = Wav2Vec2Processor.from_pretrained(folder)  # as upstream's AudioEncoder loads them
    wav2vec = Wav2Vec2ForCTC.from_pretrained(folder)
    speech = processor(np.sin(np.arange(16000) / 20.0), sampling_rate=16000, return_tensors="pt").input_values
    states = wav2vec(speech, output_hidden_states=True).hidden_states
    assert len(states) == cfg.audio_encoder.num_hidden_layers + 1 and torch.isfinite(states[-1]).all()


def test_the_estimate_counts_the_written_weights(written):
    out, cfg = written
    weights = sum(p.stat().st_size for p in out.rglob("*") if p.suffix in (".safetensors", ".pth"))
    estimate = estimated_bytes(cfg)
    assert estimate <= weights <= estimate * 1.05 + 200_000  # file headers and the pickled names


def test_a_full_folder_or_a_small_disk_is_refused(written, tmp_path):
    out, cfg = written
    with pytest.raises(CheckpointWriteError, match="is not empty"):
        write_random_checkpoint(cfg, out)
    with pytest.raises(CheckpointWriteError, match=r"needs about .* GiB, but .* GiB free; write it elsewhere"):
        check_target(tmp_path / "new", needed=2**62)
    assert main(["write", "model=tiny"]) == 2  # no out=
