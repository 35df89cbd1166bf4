"""Parameter counts of the DiT, the umT5 text encoder and the wav2vec2 audio encoder from the
config's shapes, layer by layer, without building a model (no torch, no transformers).

The launching process checks that a job's weights fit before any rank starts
(``memory_fit``); counting by formula keeps torch out of it. Each count is the sum of the
parameters of the layers the model code builds (wan_s2v.py, and transformers'
``UMT5EncoderModel`` / ``Wav2Vec2Model`` with the configs of encoders.py); a test builds the
models on the meta device and checks the counts are equal, so a change to a layer that the
formula misses fails there.
"""

from __future__ import annotations

import math
from typing import Any

from wan_exp.geometry import AUDIO_TOKENS_PER_FRAME, FRAME_PACK_KERNELS

# wav2vec2's convolutional feature extractor and positional convolution: transformers'
# Wav2Vec2Config defaults, which encoders.audio_encoder_config keeps (wav2vec2-large-xlsr-53)
WAV2VEC2_CONV_DIM = (512,) * 7
WAV2VEC2_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
WAV2VEC2_POS_CONV_KERNEL = 128
WAV2VEC2_POS_CONV_GROUPS = 16
CAUSAL_CONV_KERNEL = 3  # the DiT's audio token encoder (wan_s2v.CausalConv1d)


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def conv(n_in: int, n_out: int, kernel: tuple[int, ...] | int, groups: int = 1) -> int:
    """A Conv1d/Conv3d with bias."""
    return n_in // groups * n_out * math.prod(kernel if isinstance(kernel, tuple) else (kernel,)) + n_out


def _attention(dim: int, qk_norm: bool) -> int:
    """wan_s2v.Attention: q, k, v, o with bias, RMS norms (weight only) on q and k."""
    return 4 * linear(dim, dim) + (2 * dim if qk_norm else 0)


def dit_parameters(model: Any) -> int:
    """Parameters of wan_s2v.WanModel for ``model`` (the ``model`` config group)."""
    dim, ffn, patch = int(model.dim), int(model.ffn_dim), tuple(int(p) for p in model.patch_size)
    block = (
        _attention(dim, model.qk_norm)  # self-attention
        + (2 * dim if model.cross_attn_norm else 0)  # norm3 (affine)
        + _attention(dim, model.qk_norm)  # cross-attention
        + linear(dim, ffn)
        + linear(ffn, dim)  # ffn
        + 6 * dim
    )  # modulation
    n = (
        conv(model.in_dim, dim, patch)  # patch_embedding
        + linear(model.text_dim, dim)
        + linear(dim, dim)  # text_embedding
        + linear(model.freq_dim, dim)
        + linear(dim, dim)  # time_embedding
        + linear(dim, 6 * dim)  # time_projection
        + int(model.num_layers) * block
        + linear(dim, model.out_dim * math.prod(patch))
        + 2 * dim
    )  # head + its modulation
    if not model.s2v:
        return n
    quarter, half = dim // 4, dim // 2
    audio_encoder = (
        int(model.audio_layers)  # the weights of the wav2vec2 hidden states
        + conv(model.audio_dim, quarter * AUDIO_TOKENS_PER_FRAME, CAUSAL_CONV_KERNEL)  # conv1_local
        + conv(model.audio_dim, quarter, CAUSAL_CONV_KERNEL)  # conv1_global
        + conv(quarter, half, CAUSAL_CONV_KERNEL)
        + conv(half, dim, CAUSAL_CONV_KERNEL)  # conv2, conv3
        + linear(dim, dim)
        + dim
    )  # final_linear, padding_tokens
    injections = len(model.audio_inject_layers)
    audio_injector = injections * (_attention(dim, True) + linear(dim, 2 * dim))  # cross-attention + AdaLN
    return (
        n
        + conv(model.in_dim, dim, patch)  # cond_encoder
        + audio_encoder
        + audio_injector
        + 3 * dim  # trainable_cond_mask: noisy, reference, motion
        + sum(conv(model.in_dim, dim, kernel) for kernel in FRAME_PACK_KERNELS)
    )  # frame_packer


def text_encoder_parameters(model: Any) -> int:
    """Parameters of transformers' UMT5EncoderModel for ``model.text_encoder`` (the input
    embedding is tied, counted once; umT5 has a relative attention bias in every layer)."""
    te = model.text_encoder
    d, inner = int(te.d_model), int(te.num_heads) * int(te.d_kv)
    layer = (
        4 * d * inner  # q, k, v, o without bias
        + int(te.relative_attention_num_buckets) * int(te.num_heads)
        + d  # layer_norm (weight only)
        + 3 * d * int(te.d_ff)  # gated FFN: wi_0, wi_1, wo without bias
        + d
    )  # layer_norm
    return int(te.vocab_size) * d + int(te.num_layers) * layer + d  # + final_layer_norm


def audio_encoder_parameters(model: Any) -> int:
    """Parameters of transformers' Wav2Vec2Model for ``model.audio_encoder`` (layer-norm feature
    extractor with conv bias, pre-norm transformer, no masking embedding); 0 without S2V."""
    if not model.s2v:
        return 0
    ae = model.audio_encoder
    hidden, inter = int(ae.hidden_size), int(ae.intermediate_size)
    extractor, channels = 0, 1
    for width, kernel in zip(WAV2VEC2_CONV_DIM, WAV2VEC2_CONV_KERNEL):
        extractor += conv(channels, width, kernel) + 2 * width  # conv + its LayerNorm
        channels = width
    projection = 2 * channels + linear(channels, hidden)  # LayerNorm + Linear
    # positional convolution under weight norm over the kernel axis: g (kernel) + v + bias
    positional = WAV2VEC2_POS_CONV_KERNEL + conv(hidden, hidden, WAV2VEC2_POS_CONV_KERNEL, WAV2VEC2_POS_CONV_GROUPS)
    layer = 4 * linear(hidden, hidden) + 2 * hidden + linear(hidden, inter) + linear(inter, hidden) + 2 * hidden
    return extractor + projection + positional + 2 * hidden + int(ae.num_hidden_layers) * layer
