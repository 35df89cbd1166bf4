"""Weight sources: the official sharded layout round trip, random weights, and every failure
the loader must explain (missing/unexpected keys, wrong shape, bad index, corrupt shard)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from wan_exp.config import ModelConfig
from wan_exp.models.checkpoint import (
    INDEX_NAME,
    CheckpointError,
    CheckpointReader,
    RandomWeights,
    load_into,
    open_weights,
    write_checkpoint,
)
from wan_exp.models.wan_s2v import WanModel

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


@pytest.fixture(scope="module")
def cfg():
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / "tiny.yaml"))


@pytest.fixture(scope="module")
def source_model(cfg):
    torch.manual_seed(0)
    return WanModel(cfg).eval()


@pytest.fixture()
def folder(source_model, tmp_path):
    return write_checkpoint(source_model.state_dict(), tmp_path / "ckpt", shards=3, config={"dim": 64})


def meta_model(cfg):
    with torch.device("meta"):
        return WanModel(cfg)


def inputs(cfg):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, 16, 1, 8, 8, generator=g),
        torch.tensor([300.0]),
        torch.randn(1, cfg.text_len, cfg.text_dim, generator=g),
        torch.randn(1, cfg.audio_layers, 4, cfg.audio_dim, generator=g),
        torch.randn(1, 16, 1, 8, 8, generator=g),
        torch.randn(1, 16, 19, 8, 8, generator=g),
    )


def test_official_layout_round_trip_gives_identical_output(cfg, source_model, folder):
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json"] + [f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + [
        INDEX_NAME
    ]
    index = json.loads((folder / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(source_model.state_dict())
    assert len(set(index["weight_map"].values())) == 3
    assert json.loads((folder / "config.json").read_text()) == {"dim": 64}

    model = meta_model(cfg)
    load_into(model, CheckpointReader(folder), torch.float32, "cpu")
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs(cfg)), source_model(*inputs(cfg)), rtol=0, atol=0)

    reader = open_weights(OmegaConf.merge(cfg, {"checkpoint_dir": str(folder)}))
    key = "blocks.2.ffn.0.weight"
    assert reader.shape(key) == (128, 64)
    rows = reader.get(key, torch.bfloat16, "cpu", rows=slice(10, 20))
    assert rows.dtype == torch.bfloat16
    assert torch.equal(rows, source_model.state_dict()[key][10:20].to(torch.bfloat16))


def test_random_weights_are_deterministic_by_name_and_row_slices_match(cfg):
    source = open_weights(cfg)
    assert isinstance(source, RandomWeights)
    key = "time_projection.1.weight"  # (384, 64): two draws of ROWS_PER_DRAW = 256 rows
    assert source.shape(key)[0] > RandomWeights.ROWS_PER_DRAW
    full = source.get(key, torch.float32, "cpu")
    assert torch.equal(source.get(key, torch.float32, "cpu", rows=slice(200, 300)), full[200:300])
    assert torch.equal(RandomWeights(cfg, 0).get(key, torch.float32, "cpu", rows=slice(300, None)), full[300:])
    assert not torch.equal(RandomWeights(cfg, 1).get(key, torch.float32, "cpu"), full)
    assert not torch.equal(
        source.get("blocks.1.self_attn.q.weight", torch.float32, "cpu"),
        source.get("blocks.0.self_attn.q.weight", torch.float32, "cpu"),
    )
    assert full.std().item() == pytest.approx(64**-0.5, rel=0.1)  # unit-variance outputs
    assert torch.equal(source.get("blocks.0.norm3.weight", torch.float32, "cpu"), torch.ones(64))
    assert torch.equal(source.get("blocks.0.ffn.0.bias", torch.float32, "cpu"), torch.zeros(128))

    model = meta_model(cfg)
    load_into(model, source, torch.float32, "cpu")
    with torch.no_grad():
        out = model(*inputs(cfg))
    assert torch.isfinite(out).all() and out.abs().mean() > 0


def test_missing_and_unexpected_keys_are_listed(cfg, source_model, tmp_path):
    state = dict(source_model.state_dict())
    del state["head.modulation"], state["blocks.3.ffn.2.bias"]
    state["blocks.0.extra.weight"] = torch.zeros(2)
    write_checkpoint(state, tmp_path, shards=2)
    with pytest.raises(CheckpointError) as err:
        load_into(meta_model(cfg), CheckpointReader(tmp_path), torch.float32, "cpu")
    message = str(err.value)
    assert "2 missing keys" in message and "blocks.3.ffn.2.bias" in message and "head.modulation" in message
    assert "1 unexpected keys" in message and "blocks.0.extra.weight" in message


def test_wrong_shape_names_key_and_both_shapes(cfg, source_model, tmp_path):
    state = dict(source_model.state_dict())
    state["blocks.1.self_attn.q.weight"] = torch.zeros(64, 32)
    write_checkpoint(state, tmp_path, shards=2)
    with pytest.raises(
        CheckpointError,
        match=r"blocks\.1\.self_attn\.q\.weight: the weights have shape "
        r"\(64, 32\), the model expects \(64, 64\)",
    ):
        load_into(meta_model(cfg), CheckpointReader(tmp_path), torch.float32, "cpu")


@pytest.mark.parametrize(
    "content, reason",
    [
        (None, "not found"),
        ("{not json", "unreadable or not valid JSON"),
        ('{"metadata": {}}', "has no 'weight_map' object"),
    ],
)
def test_bad_index_is_reported_by_file_name(folder, content, reason):
    index = folder / INDEX_NAME
    if content is None:
        index.unlink()
    else:
        index.write_text(content)
    with pytest.raises(CheckpointError, match=reason) as err:
        CheckpointReader(folder)
    assert str(index) in str(err.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_corrupt_or_missing_shard_is_reported_by_file_name(cfg, folder, damage):
    shard = folder / "diffusion_pytorch_model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        shard.write_bytes(b"\x00garbage" * 8)
    else:
        shard.unlink()
    with pytest.raises(CheckpointError, match="missing" if damage == "delete" else "corrupt or truncated") as err:
        load_into(meta_model(cfg), CheckpointReader(folder), torch.float32, "cpu")
    assert str(shard) in str(err.value)
