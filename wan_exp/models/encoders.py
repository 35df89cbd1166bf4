"""The text encoder (umT5-XXL) and the audio encoder (wav2vec2), through transformers.

Both are built from the dimensions in ``model.text_encoder`` / ``model.audio_encoder``: with
random weights (deterministic by seed), or loaded from the official files under
``model.checkpoint_dir``. Nothing is ever downloaded. The caller decides the device
(``parallel.text_encoder_placement``: the hybrid strategy keeps T5 on the CPU).

The official T5 file (``models_t5_umt5-xxl-enc-bf16.pth``) uses Wan's own module names;
``t5_official_to_hf`` / ``t5_hf_to_official`` map them to and from transformers' names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from transformers import UMT5Config, UMT5EncoderModel, Wav2Vec2Config, Wav2Vec2Model

from wan_exp.liveness import beat
from wan_exp.models.checkpoint import CheckpointError

# (official name, transformers name) per T5 encoder tensor; {0} is the block index
_T5_NAMES = (
    ("blocks.{0}.norm1.weight", "encoder.block.{0}.layer.0.layer_norm.weight"),
    *((f"blocks.{{0}}.attn.{p}.weight", f"encoder.block.{{0}}.layer.0.SelfAttention.{p}.weight") for p in "qkvo"),
    (
        "blocks.{0}.pos_embedding.embedding.weight",
        "encoder.block.{0}.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    ("blocks.{0}.norm2.weight", "encoder.block.{0}.layer.1.layer_norm.weight"),
    ("blocks.{0}.ffn.gate.0.weight", "encoder.block.{0}.layer.1.DenseReluDense.wi_0.weight"),
    ("blocks.{0}.ffn.fc1.weight", "encoder.block.{0}.layer.1.DenseReluDense.wi_1.weight"),
    ("blocks.{0}.ffn.fc2.weight", "encoder.block.{0}.layer.1.DenseReluDense.wo.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
    ("token_embedding.weight", "shared.weight"),
)
# transformers keeps the input embedding twice (tied): shared.weight is the one we map
_HF_TIED_EMBEDDING = "encoder.embed_tokens.weight"


def _rename(state_dict: Mapping[str, torch.Tensor], pairs: list[tuple[str, str]], direction: str) -> dict:
    """Rename every key by the first (source template, target template) pair it matches."""
    patterns = [(re.compile(re.escape(src).replace(r"\{0\}", r"(\d+)")), dst) for src, dst in pairs]
    out = {}
    for key, tensor in state_dict.items():
        for pattern, template in patterns:
            match = pattern.fullmatch(key)
            if match:
                out[template.format(*match.groups())] = tensor
                break
        else:
            raise CheckpointError(f"T5 {direction}: no mapping for tensor {key!r}")
    return out


def t5_official_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan's umT5 encoder names -> transformers UMT5EncoderModel names (tied embedding added)."""
    out = _rename(state_dict, list(_T5_NAMES), "official -> transformers")
    if "shared.weight" in out:
        out[_HF_TIED_EMBEDDING] = out["shared.weight"]
    return out


def t5_hf_to_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers UMT5EncoderModel names -> Wan's umT5 encoder names."""
    untied = {k: v for k, v in state_dict.items() if k != _HF_TIED_EMBEDDING}
    return _rename(untied, [(hf, official) for official, hf in _T5_NAMES], "transformers -> official")


# ============================================================================ text encoder
def text_encoder_config(model_cfg: Any) -> UMT5Config:
    te = model_cfg.text_encoder
    return UMT5Config(
        vocab_size=te.vocab_size,
        d_model=te.d_model,
        d_ff=te.d_ff,
        d_kv=te.d_kv,
        num_heads=te.num_heads,
        num_layers=te.num_layers,
        relative_attention_num_buckets=te.relative_attention_num_buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
    )


def _checkpoint_path(model_cfg: Any, relative: str | None) -> Path | None:
    """The official file/folder when a checkpoint folder is configured, else None."""
    if not model_cfg.checkpoint_dir or not relative:
        return None
    path = Path(model_cfg.checkpoint_dir) / relative
    if not path.exists():
        raise CheckpointError(
            f"{path}: not found (model.checkpoint_dir={model_cfg.checkpoint_dir!r}); "
            "put the official file there or leave model.checkpoint_dir unset for random weights"
        )
    return path


def _random_init(build: Any, seed: int, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """Build with transformers' own initialisation, deterministic by seed, directly on ``device``."""
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with torch.device(device):
            return build(dtype)


def build_text_encoder(
    model_cfg: Any, device: torch.device | str, dtype: torch.dtype, seed: int = 0
) -> UMT5EncoderModel:
    """umT5 encoder from ``model.text_encoder``: the official weights if configured, else random."""
    config = text_encoder_config(model_cfg)
    path = _checkpoint_path(model_cfg, model_cfg.text_encoder.checkpoint)
    if path is None:
        model = _random_init(lambda dt: UMT5EncoderModel._from_config(config, dtype=dt), seed, device, dtype)
        return model.eval()
    try:
        official = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read the T5 checkpoint ({err})") from err
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    state = {k: v.to(device=device, dtype=dtype) for k, v in t5_official_to_hf(official).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: T5 weights do not match model.text_encoder: "
            f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    model.tie_weights()
    return model.eval()


def encode_text(encoder: UMT5EncoderModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, text_len) token ids -> (B, text_len, d_model), zero after each prompt's end (as the
    DiT expects: upstream pads the shorter prompts with zeros)."""
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden * attention_mask[..., None].to(hidden.dtype)


# ============================================================================ audio encoder
def audio_encoder_config(model_cfg: Any) -> Wav2Vec2Config:
    ae = model_cfg.audio_encoder
    # wav2vec2-large-xlsr-53: layer-norm feature extractor with conv bias, pre-norm transformer
    return Wav2Vec2Config(
        hidden_size=ae.hidden_size,
        num_hidden_layers=ae.num_hidden_layers,
        num_attention_heads=ae.num_attention_heads,
        intermediate_size=ae.intermediate_size,
        feat_extract_norm="layer",
        conv_bias=True,
        do_stable_layer_norm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
    )


class AudioEncoder(nn.Module):
    """wav2vec2 returning every hidden state: (B, samples) -> (B, layers + 1, T, hidden)."""

    def __init__(self, wav2vec2: Wav2Vec2Model):
        super().__init__()
        self.wav2vec2 = wav2vec2
        # a long audio file takes minutes: the rank's heartbeat after each conv and transformer layer
        layers = [*wav2vec2.feature_extractor.conv_layers, *wav2vec2.encoder.layers]
        for index, layer in enumerate(layers):
            layer.register_forward_hook(lambda *_, i=index: beat(f"audio layer {i + 1}/{len(layers)}"))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, samples) normalised 16 kHz audio -> (B, layers + 1, T, hidden) at about 50 Hz."""
        out = self.wav2vec2(waveform, output_hidden_states=True)
        return torch.stack(out.hidden_states, dim=1)


def build_audio_encoder(model_cfg: Any, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> AudioEncoder:
    """wav2vec2 from ``model.audio_encoder``: the official folder if configured, else random."""
    path = _checkpoint_path(model_cfg, model_cfg.audio_encoder.checkpoint)
    if path is None:
        config = audio_encoder_config(model_cfg)
        wav2vec2 = _random_init(lambda dt: Wav2Vec2Model._from_config(config, dtype=dt), seed, device, dtype)
    else:
        try:
            wav2vec2 = Wav2Vec2Model.from_pretrained(str(path), local_files_only=True, dtype=dtype)
        except Exception as err:
            raise CheckpointError(f"{path}: cannot load the wav2vec2 folder ({err})") from err
        wav2vec2 = wav2vec2.to(device)
    return AudioEncoder(wav2vec2).eval()
