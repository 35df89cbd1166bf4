"""Write every file upstream's S2V pipeline loads from --ckpt_dir, with random weights.

============================================  ==============================================
DiT: ``diffusion_pytorch_model-0000N-of-0000M``  wan_exp.models.checkpoint.RandomWeights (the
``.safetensors`` + index + ``config.json``       weights wan-exp uses without a folder), in
                                                 ``model.dtype``, written one shard at a time;
                                                 config.json with upstream's WanModel_S2V
                                                 arguments (:func:`dit_config`)
``models_t5_umt5-xxl-enc-bf16.pth``              umT5 encoder, official names, bf16, drawn per
                                                 tensor (:func:`t5_tensor`)
``google/umt5-xxl/``                             a word-level tokenizer with only the special
                                                 tokens: every word is ``<unk>`` (the real
                                                 sentencepiece model cannot be made)
``Wan2.1_VAE.pth``                               the whole Wan2.1 VAE (wan_exp.models.vae), fp32
``wav2vec2-large-xlsr-53-english/``              Wav2Vec2ForCTC (transformers), its feature
                                                 extractor and a character CTC vocabulary
============================================  ==============================================

Every value is deterministic by ``seed``. A manifest (:data:`MANIFEST`) says the folder is random.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from wan_exp.config import TOKENIZER_SUBDIR, DType
from wan_exp.models.checkpoint import RandomWeights, write_sharded
from wan_exp.models.encoders import audio_encoder_config, t5_hf_to_official, text_encoder_config
from wan_exp.models.vae import WanVAE

MANIFEST = "wan_exp_random_weights.json"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"
DTYPES = {DType.bf16: torch.bfloat16, DType.fp16: torch.float16, DType.fp32: torch.float32}
# upstream's S2V transformer settings (wan/configs/wan_s2v_14B.py) that are not dimensions
S2V_SETTINGS = {
    "model_type": "s2v",
    "cond_dim": 16,
    "num_audio_token": 4,
    "enable_adain": True,
    "adain_mode": "attn_norm",
    "zero_init": True,
    "zero_timestep": True,
    "enable_motioner": False,
    "add_last_motion": True,
    "enable_tsm": False,
    "trainable_token_pos_emb": False,
    "motion_token_num": 1024,
    "enable_framepack": True,
    "framepack_drop_mode": "padd",
    "window_size": [-1, -1],
}
# the CTC vocabulary of an English character model: special tokens, word separator, letters
CTC_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ", "'"]
TOKENIZER_SPECIALS = ["<pad>", "</s>", "<unk>"]
DISK_MARGIN = 1.05  # free space asked for beyond the estimate (file headers, the index)


class CheckpointWriteError(RuntimeError):
    """The folder cannot be written (not empty, too little disk); the message says what to do."""


def dit_config(model_cfg: Any) -> dict:
    """config.json for upstream's ``WanModel_S2V.from_pretrained``: its constructor arguments."""
    return {
        "_class_name": "WanModel_S2V",
        **S2V_SETTINGS,
        "patch_size": list(model_cfg.patch_size),
        "text_len": model_cfg.text_len,
        "in_dim": model_cfg.in_dim,
        "dim": model_cfg.dim,
        "ffn_dim": model_cfg.ffn_dim,
        "freq_dim": model_cfg.freq_dim,
        "text_dim": model_cfg.text_dim,
        "out_dim": model_cfg.out_dim,
        "num_heads": model_cfg.num_heads,
        "num_layers": model_cfg.num_layers,
        "qk_norm": model_cfg.qk_norm,
        "cross_attn_norm": model_cfg.cross_attn_norm,
        "eps": model_cfg.eps,
        "audio_dim": model_cfg.audio_dim,
        "audio_inject_layers": list(model_cfg.audio_inject_layers),
    }


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def t5_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One umT5 tensor (transformers name): norms one, embeddings and relative position biases
    N(0, 1), projections N(0, 1/fan_in) so that activations keep unit scale through the layers."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(_seed(seed, name))
    std = 1.0 if name.endswith(("shared.weight", "relative_attention_bias.weight")) else shape[1] ** -0.5
    return (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)


def estimated_bytes(model_cfg: Any) -> int:
    """Bytes of the folder's weights: DiT in model.dtype, umT5 in bf16, VAE and wav2vec2 in fp32."""
    from transformers import UMT5EncoderModel, Wav2Vec2ForCTC

    with torch.device("meta"):
        t5 = sum(p.numel() for p in UMT5EncoderModel(text_encoder_config(model_cfg)).parameters())
        wav = sum(p.numel() for p in Wav2Vec2ForCTC(_wav2vec_config(model_cfg)).parameters())
        vae = sum(p.numel() for p in WanVAE(model_cfg.vae_dim).parameters())
    dit_source = RandomWeights(model_cfg)
    dit = sum(math.prod(dit_source.shape(k)) for k in dit_source.keys())
    return dit * DTYPES[DType(model_cfg.dtype)].itemsize + 2 * t5 + 4 * (wav + vae)


def _wav2vec_config(model_cfg: Any) -> Any:
    config = audio_encoder_config(model_cfg)
    config.vocab_size = len(CTC_VOCAB)
    config.pad_token_id = 0
    return config


def write_dit(model_cfg: Any, out: Path, seed: int, shards: int) -> None:
    source = RandomWeights(model_cfg, seed)
    dtype = DTYPES[DType(model_cfg.dtype)]
    sizes = {k: math.prod(source.shape(k)) * dtype.itemsize for k in source.keys()}
    write_sharded(sizes, lambda key: source.get(key, dtype, "cpu"), out, shards, dit_config(model_cfg))


def write_text_encoder(model_cfg: Any, out: Path, seed: int) -> None:
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        shapes = {k: tuple(t.shape) for k, t in UMT5EncoderModel(text_encoder_config(model_cfg)).state_dict().items()}
    # the tied input embedding is one tensor; t5_hf_to_official drops its second name
    hf = {name: t5_tensor(name, shape, seed) for name, shape in shapes.items() if name != "encoder.embed_tokens.weight"}
    hf["encoder.embed_tokens.weight"] = hf["shared.weight"]
    torch.save(t5_hf_to_official(hf), out / T5_FILE)


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TOKENIZER_SPECIALS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)


def write_vae(model_cfg: Any, out: Path, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = WanVAE(model_cfg.vae_dim)
    torch.save(vae.state_dict(), out / VAE_FILE)


def write_audio_encoder(model_cfg: Any, folder: Path, seed: int) -> None:
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Processor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        Wav2Vec2ForCTC(_wav2vec_config(model_cfg)).save_pretrained(folder)
    vocab = folder / "vocab.json"
    vocab.write_text(json.dumps({token: i for i, token in enumerate(CTC_VOCAB)}))
    tokenizer = Wav2Vec2CTCTokenizer(str(vocab), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    extractor.save_pretrained(folder)  # preprocessor_config.json, as the official folder has it
    tokenizer.save_pretrained(folder)  # the tokenizer's own files too, for older transformers


def check_target(out: Path, needed: int) -> None:
    if out.exists() and any(out.iterdir()):
        raise CheckpointWriteError(f"out={out} is not empty; give a new or empty folder (nothing is overwritten)")
    existing = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed * DISK_MARGIN:
        raise CheckpointWriteError(
            f"out={out}: the folder needs about {needed / 1024**3:.1f} GiB, but "
            f"{existing} has {free / 1024**3:.1f} GiB free; write it elsewhere"
        )


def write_random_checkpoint(model_cfg: Any, out: Path, seed: int = 0, shards: int = 4) -> Path:
    """Every file of the official folder with random weights (module docstring); returns ``out``."""
    out = Path(out)
    needed = estimated_bytes(model_cfg)
    check_target(out, needed)
    out.mkdir(parents=True, exist_ok=True)
    write_dit(model_cfg, out, seed, shards)
    write_text_encoder(model_cfg, out, seed)
    write_tokenizer(out / TOKENIZER_SUBDIR)
    write_vae(model_cfg, out, seed)
    write_audio_encoder(model_cfg, out / WAV2VEC_DIR, seed)
    (out / MANIFEST).write_text(
        json.dumps(
            {
                "random": True,
                "model": model_cfg.name,
                "seed": seed,
                "bytes": needed,
                "note": (
                    "random weights in the official Wan2.2-S2V-14B layout, written by python -m wan_exp.checkpoint; "
                    "good for time and memory, not for pictures (docs/upstream.md)"
                ),
            },
            indent=2,
        )
    )
    return out
