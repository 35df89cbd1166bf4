"""The pre-launch check builds no model and imports no torch; the figures it and the ranks use
(parameter counts, the job's geometry, the split's degrees) come from the config alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import UMT5EncoderModel, Wav2Vec2Model

from wan_exp.config import ConfigError, compose_config
from wan_exp.geometry import job_geometry
from wan_exp.models.encoders import audio_encoder_config, text_encoder_config
from wan_exp.models.sizes import (
    audio_encoder_parameters,
    dit_parameters,
    text_encoder_parameters,
)
from wan_exp.models.wan_s2v import WanModel
from wan_exp.parallel.dims import parallel_dims
from wan_exp.preflight import ranks_per_node, validate

REPO = Path(__file__).resolve().parents[1]


def _built_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a tied weight once


@pytest.mark.parametrize("model", ["tiny", "s2v_14b", "t2v_14b"])
def test_the_formula_counts_every_parameter_of_the_built_models(model):
    """The per-layer formula against the models as the ranks build them (meta device: no memory)."""
    cfg = compose_config([f"model={model}"]).model
    with torch.device("meta"):
        assert dit_parameters(cfg) == _built_count(WanModel(cfg))
        assert text_encoder_parameters(cfg) == _built_count(UMT5EncoderModel(text_encoder_config(cfg)))
        expected_audio = _built_count(Wav2Vec2Model(audio_encoder_config(cfg))) if cfg.s2v else 0
        assert audio_encoder_parameters(cfg) == expected_audio


def test_the_formula_follows_the_config_shapes():
    """A shape the presets do not use (odd widths, no qk norm, three injections) is still exact."""
    cfg = compose_config(
        [
            "model=tiny",
            "model.dim=96",
            "model.num_heads=6",
            "model.ffn_dim=200",
            "model.qk_norm=false",
            "model.cross_attn_norm=false",
            "model.audio_inject_layers=[0,1,3]",
            "model.text_encoder.num_layers=3",
            "model.audio_encoder.num_hidden_layers=2",
            "model.audio_layers=3",
        ]
    ).model
    with torch.device("meta"):
        assert dit_parameters(cfg) == _built_count(WanModel(cfg))
        assert text_encoder_parameters(cfg) == _built_count(UMT5EncoderModel(text_encoder_config(cfg)))
        assert audio_encoder_parameters(cfg) == _built_count(Wav2Vec2Model(audio_encoder_config(cfg)))


CHECK_IN_A_FRESH_PROCESS = """
import json, sys
from wan_exp.config import compose_config
from wan_exp.preflight import check_job
shape = check_job(compose_config(sys.argv[1:]), 0)
print(json.dumps({"world_size": shape.world_size,
                  "loaded": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=s2v_14b", "parallel=fsdp_fixed", "launcher.simulate_world_size=64"],
        ["model=tiny", "parallel=hybrid", "workload=train_lora", "parallel.vae=sharded"],
    ],
)
def test_check_job_of_a_built_in_model_imports_no_torch(overrides, tmp_path):
    """A fresh process (nothing cached: its own empty cache folder) runs the whole pre-launch
    check of a built-in model, memory check included, and has imported neither torch nor
    transformers."""
    proc = subprocess.run(
        [sys.executable, "-c", CHECK_IN_A_FRESH_PROCESS, *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    assert out["world_size"] == (64 if "launcher.simulate_world_size=64" in overrides else 2)


def test_geometry_is_the_config_sizes_and_the_models_token_count():
    """480x832, 80 frames on the S2V-14B: latents (16, 20, 60, 104); tokens 20*30*52 noisy +
    30*52 reference (+ motion: 1*30*52 + 1*15*26 + 4*7*13)."""
    geometry = job_geometry(compose_config(["model=s2v_14b"]))
    assert (geometry.height, geometry.width, geometry.frames_per_clip) == (480, 832, 80)
    assert geometry.latent_shape == (16, 20, 60, 104)
    assert geometry.motion_shape == (16, 19, 60, 104)
    assert geometry.noisy_tokens == 20 * 30 * 52
    assert geometry.tokens(with_motion=False) == 21 * 30 * 52
    assert geometry.tokens(with_motion=True) == 21 * 30 * 52 + 30 * 52 + 15 * 26 + 4 * 7 * 13
    assert geometry.seconds_per_clip == 80 / 16
    assert geometry.flops_args(with_motion=True) == {
        "n_tokens": geometry.tokens(with_motion=True),
        "audio_query_tokens": 20 * 30 * 52,
        "audio_tokens": 20 * 5,
        "audio_tokens_per_query": 5,
    }


def test_geometry_refuses_a_size_naming_the_setting():
    with pytest.raises(ConfigError, match=r"workload.size='480\*830': width 830 must be a positive multiple of 16"):
        job_geometry(compose_config(["workload.size=480*830"]))


# ------------------------------------------------------------------ a strategy is its degrees
def test_fsdp_is_its_degree_not_the_preset_name():
    """parallel.fsdp.degree is the one switch: 0 in the replicated presets, -1 in the FSDP ones,
    and a replicated preset given an FSDP degree shards like hybrid."""
    for preset, sharded in (
        ("single", False),
        ("ulysses", False),
        ("cfg", False),
        ("usp", False),
        ("cfg_ulysses", False),
        ("fsdp", True),
        ("fsdp_fixed", True),
        ("hybrid", True),
    ):
        cfg = compose_config([f"parallel={preset}"])
        assert OmegaConf.select(cfg, "parallel.fsdp.enabled") is None  # no second switch
        world = {"single": 1, "cfg": 2}.get(preset, 4)  # the presets whose degrees fix the world size
        assert parallel_dims(cfg, world).fsdp_enabled is sharded, preset
    mixed = compose_config(["parallel=ulysses", "parallel.fsdp.degree=-1"])
    validate(mixed, 4)
    dims = parallel_dims(mixed, 4)
    assert (dims.ulysses, dims.fsdp_shard_ranks) == (4, 4)
    assert dims == parallel_dims(compose_config(["parallel=hybrid"]), 4)


def test_a_preset_is_one_yaml_file(tmp_path):
    """A new preset needs no code: a YAML file in a config dir of its own (Hydra's search path)
    with a new name and degrees is a valid, checked split, labelled by its name."""
    (tmp_path / "parallel").mkdir()
    (tmp_path / "parallel" / "ring_fsdp.yaml").write_text("name: ring_fsdp\nring_degree: -1\nfsdp:\n  degree: -1\n")
    cfg = compose_config([f"hydra.searchpath=[file://{tmp_path}]", "parallel=ring_fsdp"])
    validate(cfg, 4)
    dims = parallel_dims(cfg, 4)
    assert (dims.ring, dims.ulysses, dims.fsdp_enabled, dims.fsdp_shard_ranks) == (4, 1, True, 4)
    assert str(cfg.parallel.name) == "ring_fsdp"


def test_a_split_of_one_rank_runs_one_rank_whatever_its_name():
    cfg = compose_config(["parallel=ulysses", "parallel.ulysses_degree=1"])
    assert ranks_per_node(cfg, gpus=8) == 1
    with pytest.raises(ConfigError, match=r"parallel=ulysses runs one rank, got 2 \(every degree is 1"):
        validate(cfg, 2)
    with pytest.raises(ConfigError, match=r"parallel.fsdp.degree=-2: use 0 \(no FSDP\)"):
        parallel_dims(compose_config(["parallel=fsdp_fixed", "parallel.fsdp.degree=-2"]), 2)
