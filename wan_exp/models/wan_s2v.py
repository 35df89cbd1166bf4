"""The Wan2.2 14B DiT trunk and the speech-to-video (S2V) additions, in one readable file.

Parameter names and shapes are the official ones (docs/facts.md §7), so an official
``Wan2.2-S2V-14B`` folder loads without renaming; ``model.s2v=false`` gives the plain trunk.

One forward, for one clip::

    noisy (B,16,F,H,W) --patch_embedding(+cond_encoder(pose))--> noisy tokens   type 0, time t
    ref   (B,16,1,H,W) --patch_embedding--------------------------> ref tokens   type 1, time 0
    motion(B,16,19,H,W) --frame_packer (1x, 2x, 4x compression)---> motion tokens type 2, time 0
    x = [noisy | ref | motion] + trainable_cond_mask[type]          (the residual stream, fp32)
    blocks: self-attn (3D RoPE) -> cross-attn to text -> FFN, AdaLN-modulated by the timestep;
            after the audio blocks, each noisy token cross-attends to its latent frame's
            audio tokens (AdaLN on the global audio token first)
    head over the noisy tokens -> predicted flow (B,16,F,H,W)

Splitting hooks (the model knows nothing else about parallelism): ``blocks`` are the FSDP
units, and ``sequence_sharding`` (None by default) shards every per-token tensor right after
embedding, runs each self-attention and gathers before the head (docs/architecture.md).
The constructor builds the model only: ``model.compile`` is applied from outside by
:func:`apply_compile`, and ``model.attention_backend`` (process-wide) by the rank's setup
through ``attention.configure``.

Per-token state kept small: the two timestep modulations (noisy tokens, conditioning tokens)
are applied on the two contiguous parts of the sequence, never expanded per token. The
split point and the audio frame of each token come from ``token_frame`` (1 + latent frame for
noisy tokens, 0 for reference/motion/padding), so any contiguous shard of tokens works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from wan_exp.geometry import AUDIO_TOKENS_PER_FRAME, FRAME_PACK_BUCKETS, FRAME_PACK_KERNELS
from wan_exp.models import attention as attn_backend

ROPE_THETA = 10000.0
REF_TIME_POSITION = 30  # reference tokens sit at latent time 30 (upstream convention)
ADAIN_EPS = 1e-5  # the audio AdaLN's LayerNorm (upstream uses diffusers' default)


# =============================================================================== helpers
def fp32_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear evaluated in fp32 whatever the parameter dtype (time and audio embeddings)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) [cos | sin] features, computed in fp64 like upstream."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=torch.float64) / half)
    angles = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def split_apply(n_first: int, fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """``fn(segment, *parts)`` on tokens [0, n_first) (segment 0) and the rest (segment 1).

    The tensors are (B, L, ...); the results are joined along L again. A sequence that lies
    in one segment (the usual case for a shard) costs no split and no copy.
    """
    length = tensors[0].shape[1]
    if n_first >= length:
        return fn(0, *tensors)
    if n_first <= 0:
        return fn(1, *tensors)
    head = fn(0, *(t[:, :n_first] for t in tensors))
    tail = fn(1, *(t[:, n_first:] for t in tensors))
    return torch.cat([head, tail], dim=1)


def modulate(
    h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, n_first: int, dtype: torch.dtype
) -> torch.Tensor:
    """``h * (1 + scale) + shift`` with per-segment (B, 2, D) shift/scale, cast to ``dtype``."""
    return split_apply(
        n_first,
        lambda s, part: torch.addcmul(shift[:, s : s + 1], part, 1 + scale[:, s : s + 1]).to(dtype),
        h,
    )


def add_gated(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, n_first: int) -> torch.Tensor:
    """Residual update ``x + y * gate`` with a per-segment (B, 2, D) gate."""
    return split_apply(n_first, lambda s, xp, yp: torch.addcmul(xp, yp, gate[:, s : s + 1]), x, y)


# =============================================================================== RoPE
def rope_pairs(head_dim: int) -> tuple[int, int, int]:
    """Frequency pairs for (time, height, width): 22/21/21 for head dim 128."""
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def rope_angles(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, 3) integer (t, h, w) positions -> the cos and signed sin tables of shape (L, head_dim)
    that ``apply_rope`` multiplies with, fp32.

    Each axis with n pairs rotates pair j by ``position * theta^(-j/n)``; the pairs are
    laid out time first, then height, then width (interleaved (even, odd) channel pairs).
    Both tables repeat each pair's value on its two channels, and the sine carries the sign of
    the rotation (-sin on the even channel, +sin on the odd one), so the rotation is two
    elementwise products with no complex numbers and no gathers.
    """
    columns = []
    for axis, n in enumerate(rope_pairs(head_dim)):
        inv_freq = torch.pow(ROPE_THETA, -torch.arange(n, device=positions.device, dtype=torch.float64) / n)
        columns.append(positions[:, axis : axis + 1].to(torch.float64) * inv_freq[None])
    angles = torch.cat(columns, dim=1)  # (L, head_dim/2)
    cos = angles.cos().repeat_interleave(2, dim=1)
    sin = torch.stack((-angles.sin(), angles.sin()), dim=-1).flatten(1)
    return cos.float(), sin.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (even, odd) channel pairs of x (B, L, H, d) by the tables of ``rope_angles``, in
    fp32: ``x * cos + swap(x) * sin`` with swap exchanging the two channels of each pair."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x.float() * cos[:, None] + swapped * sin[:, None]


def grid_positions(
    t: Sequence[int] | torch.Tensor,
    h: Sequence[int] | torch.Tensor,
    w: Sequence[int] | torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """(t, h, w) position lists -> (len(t)*len(h)*len(w), 3) positions in t-major token order."""
    axes = [torch.as_tensor(a, dtype=torch.long, device=device) for a in (t, h, w)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def spread(count: int, span: int) -> torch.Tensor:
    """``count`` integer positions spread evenly over [0, span) (a compressed grid keeps the
    full grid's range): floor of linspace(0, span - 1, count)."""
    return torch.linspace(0, span - 1, count, dtype=torch.float64).long()


# =============================================================================== layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm that normalises in the input's dtype (the fp32 residual stream) even when its
    affine parameters are bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class Attention(nn.Module):
    """q, k, v, o projections with RMS norms on q and k; the (B, L, H, d) layout throughout."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))

    def key_value(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1))
        return k, self.v(context).unflatten(-1, (self.num_heads, -1))

    def output(self, heads: torch.Tensor) -> torch.Tensor:
        return self.o(heads.flatten(-2))


class SelfAttention(Attention):
    def forward(self, x: torch.Tensor, tokens: TokenLayout, sharding: Any) -> torch.Tensor:
        q = apply_rope(self.query(x), tokens.rope_cos, tokens.rope_sin).to(x.dtype)
        k, v = self.key_value(x)
        k = apply_rope(k, tokens.rope_cos, tokens.rope_sin).to(x.dtype)
        if sharding is None:
            out = attn_backend.attention(q, k, v)
        else:
            out = sharding.attention(q, k, v, attn_backend.attention)
        return self.output(out)


class CrossAttention(Attention):
    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.output(attn_backend.attention(self.query(x), *self.key_value(context)))


@dataclass
class TokenLayout:
    """What a block needs to know about this rank's tokens, built once per forward."""

    rope_cos: torch.Tensor  # (L, head_dim) fp32 tables of rope_angles
    rope_sin: torch.Tensor
    n_noisy: int  # the local noisy tokens are the first n_noisy (timestep t; the rest use 0)
    frame_runs: list[tuple[int, int, int]]  # (start, end, latent frame) runs of noisy tokens
    dtype: torch.dtype  # compute dtype of the Linear layers


class WanAttentionBlock(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, num_heads: int, qk_norm: bool, cross_attn_norm: bool, eps: float):
        super().__init__()
        self.eps = eps
        self.self_attn = SelfAttention(dim, num_heads, qk_norm, eps)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, num_heads, qk_norm, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self, x: torch.Tensor, time_mod: torch.Tensor, context: torch.Tensor, tokens: TokenLayout, sharding: Any = None
    ) -> torch.Tensor:
        """x (B, L, D) residual stream; time_mod (B, S, 6, D) fp32 for the S segments
        (noisy, conditioning); context (B, text_len, D) embedded text."""
        # (B, S, 6, D) -> six (B, S, D): shift, scale, gate (attention), shift, scale, gate (FFN)
        mod = (self.modulation.float().unsqueeze(1) + time_mod).unbind(2)
        n, dim = tokens.n_noisy, x.shape[-1]
        h = modulate(F.layer_norm(x, (dim,), eps=self.eps), mod[0], mod[1], n, tokens.dtype)
        x = add_gated(x, self.self_attn(h, tokens, sharding), mod[2], n)
        x = x + self.cross_attn(self.norm3(x).to(tokens.dtype), context)
        h = modulate(F.layer_norm(x, (dim,), eps=self.eps), mod[3], mod[4], n, tokens.dtype)
        return add_gated(x, self.ffn(h), mod[5], n)


class Head(nn.Module):
    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + time_emb.float()[:, None]).unbind(1)
        h = F.layer_norm(x.float(), x.shape[-1:], eps=self.eps)
        return fp32_linear(self.head, torch.addcmul(shift[:, None], h, 1 + scale[:, None]))


# =============================================================================== S2V parts
class CausalConv1d(nn.Module):
    """Conv1d over time that sees only the past: the input is padded on the left by
    repeating its first frame."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T), fp32
        x = F.pad(x, (self.conv.kernel_size[0] - 1, 0), mode="replicate")
        return F.conv1d(x, self.conv.weight.float(), self.conv.bias.float(), stride=self.conv.stride)


class AudioTokenEncoder(nn.Module):
    """Audio features (B, T, C_in) -> per latent frame 4 local tokens + 1 padding token, and
    one global token. Two stride-2 causal convs downsample time 4x (4 video frames per latent)."""

    def __init__(self, in_dim: int, dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.conv1_local = CausalConv1d(in_dim, dim // 4 * num_tokens)
        self.conv1_global = CausalConv1d(in_dim, dim // 4)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, stride=2)
        self.final_linear = nn.Linear(dim, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    @staticmethod
    def _norm_silu(x: torch.Tensor) -> torch.Tensor:
        """LayerNorm (no affine) over channels of a (N, C, T) tensor, then SiLU; -> (N, T, C)."""
        x = x.transpose(1, 2)
        return F.silu(F.layer_norm(x, x.shape[-1:], eps=1e-6))

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C/4, T) after conv1 -> (N, T/4, C): the stack shared by the local and global paths."""
        x = self._norm_silu(x)
        x = self._norm_silu(self.conv2(x.transpose(1, 2)))
        return self._norm_silu(self.conv3(x.transpose(1, 2)))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = features.shape[0]
        x = features.transpose(1, 2)  # (B, C_in, T)
        local = self.conv1_local(x)  # (B, n * C/4, T): n token streams side by side
        local = local.unflatten(1, (self.num_tokens, -1)).flatten(0, 1)  # (B*n, C/4, T)
        local = self._downsample(local).unflatten(0, (b, self.num_tokens)).transpose(1, 2)  # (B, T', n, C)
        padding = self.padding_tokens.float().expand(b, local.shape[1], 1, -1)
        local = torch.cat([local, padding], dim=2)
        glob = fp32_linear(self.final_linear, self._downsample(self.conv1_global(x)))  # (B, T', C)
        return local, glob


class CausalAudioEncoder(nn.Module):
    """(B, layers, T, C) wav2vec2 hidden states -> a learned softmax-free weighted mean of the
    layers (SiLU weights) -> audio tokens. Named ``casual_audio_encoder`` upstream (sic)."""

    def __init__(self, audio_dim: int, audio_layers: int, dim: int):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, audio_layers, 1, 1), 0.01))
        self.encoder = AudioTokenEncoder(audio_dim, dim, AUDIO_TOKENS_PER_FRAME)

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = F.silu(self.weights.float())
        features = (audio.float() * weights).sum(dim=1) / weights.sum(dim=1)  # (B, T, C)
        return self.encoder(features)


class AdaLayerNorm(nn.Module):
    """LayerNorm modulated by a conditioning vector: shift, scale = linear(silu(c))."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def shift_scale(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fp32_linear(self.linear, F.silu(cond.float())).chunk(2, dim=-1)


def inject_audio(
    attn: CrossAttention,
    adain: AdaLayerNorm,
    x: torch.Tensor,
    audio_tokens: torch.Tensor,
    audio_global: torch.Tensor,
    tokens: TokenLayout,
) -> torch.Tensor:
    """One audio injection: AdaLN of the noisy tokens on their frame's global audio token, then
    each noisy token attends to its own latent frame's audio tokens; returns the new x.

    A function of the two layers rather than a method taking their index, so that one compiled
    graph serves all injections (an index would be a constant of the graph: one compile each).
    """
    n = tokens.n_noisy
    shift, scale = adain.shift_scale(audio_global)  # (B, F, D)
    normed = F.layer_norm(x[:, :n].float(), x.shape[-1:], eps=ADAIN_EPS)
    runs = tokens.frame_runs
    h = torch.cat(
        [  # AdaLN per latent frame: runs of consecutive tokens of one frame
            torch.addcmul(shift[:, f : f + 1], normed[:, a:b], 1 + scale[:, f : f + 1]) for a, b, f in runs
        ],
        dim=1,
    ).to(tokens.dtype)
    q = attn.query(h)
    k, v = attn.key_value(audio_tokens.to(tokens.dtype))  # (B, F, 5, H, d)
    heads = torch.cat([attn_backend.attention(q[:, a:b], k[:, f], v[:, f]) for a, b, f in runs], dim=1)
    update = attn.output(heads)
    return torch.cat([x[:, :n] + update, x[:, n:]], dim=1)


class AudioInjector(nn.Module):
    """After the listed blocks, each noisy token attends to its own latent frame's audio tokens."""

    def __init__(self, dim: int, num_heads: int, num_injections: int, eps: float):
        super().__init__()
        self.injector = nn.ModuleList(
            CrossAttention(dim, num_heads, qk_norm=True, eps=eps) for _ in range(num_injections)
        )
        self.injector_adain_layers = nn.ModuleList(AdaLayerNorm(dim) for _ in range(num_injections))
        self.inject = inject_audio  # torch.compile(inject_audio) once the model is compiled

    def forward(
        self, x: torch.Tensor, index: int, audio_tokens: torch.Tensor, audio_global: torch.Tensor, tokens: TokenLayout
    ) -> torch.Tensor:
        """x (B, L, D); audio_tokens (B, F, 5, D); audio_global (B, F, D); returns the new x."""
        if tokens.n_noisy == 0:
            return x
        return self.inject(
            self.injector[index], self.injector_adain_layers[index], x, audio_tokens, audio_global, tokens
        )


class FramePacker(nn.Module):
    """Motion history latents -> tokens: the newest frame at full resolution (proj), the next 2
    at 2x compression (proj_2x), the oldest 16 at 4x (proj_4x)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj, self.proj_2x, self.proj_4x = (
            nn.Conv3d(in_dim, dim, kernel_size=k, stride=k) for k in FRAME_PACK_KERNELS
        )

    def forward(self, motion: torch.Tensor, patch: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """motion (B, C, T, H, W) -> tokens (B, L_m, D) and their (L_m, 3) RoPE positions."""
        total = sum(FRAME_PACK_BUCKETS)
        b, c, t, height, width = motion.shape
        if t < total:  # too short a history: the missing oldest frames are zeros
            motion = torch.cat([motion.new_zeros(b, c, total - t, height, width), motion], dim=2)
        motion = motion[:, :, -total:]
        # buckets newest first; the latents are oldest first
        newest_1, next_2, oldest_16 = FRAME_PACK_BUCKETS
        parts = (motion[:, :, -newest_1:], motion[:, :, -newest_1 - next_2 : -newest_1], motion[:, :, :oldest_16])
        grid_h, grid_w = height // patch[1], width // patch[2]  # the noisy token grid
        tokens, positions, start = [], [], 0
        for proj, part, bucket in zip((self.proj, self.proj_2x, self.proj_4x), parts, FRAME_PACK_BUCKETS):
            y = proj(part)  # (B, D, t', h', w')
            start -= bucket  # this bucket covers latent times [start, start + bucket)
            positions.append(
                grid_positions(
                    self._times(start, bucket, y.shape[2]),
                    spread(y.shape[3], grid_h),
                    spread(y.shape[4], grid_w),
                    motion.device,
                )
            )
            tokens.append(y.flatten(2).transpose(1, 2))
        return torch.cat(tokens, dim=1), torch.cat(positions, dim=0)

    @staticmethod
    def _times(start: int, bucket: int, count: int) -> torch.Tensor:
        """Negative latent times of ``count`` compressed frames covering [start, start+bucket):
        -|start| first, spaced evenly towards -(|start| - bucket + 1) (upstream's sampling)."""
        return -torch.linspace(-start, -start - bucket + 1, count, dtype=torch.float64).long()


# =============================================================================== the model
class WanModel(nn.Module):
    """The Wan2.2 14B DiT (``model.s2v=false``) or S2V-14B (``model.s2v=true``)."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg
        dim, heads = cfg.dim, cfg.num_heads
        self.patch_size = tuple(cfg.patch_size)
        self.out_dim = cfg.out_dim
        self.s2v = bool(cfg.s2v)
        self.sequence_sharding = None  # set by a sequence-parallel strategy (Ulysses)

        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(
            WanAttentionBlock(dim, cfg.ffn_dim, heads, cfg.qk_norm, cfg.cross_attn_norm, cfg.eps)
            for _ in range(cfg.num_layers)
        )
        self.head = Head(dim, cfg.out_dim * math.prod(self.patch_size), cfg.eps)
        if self.s2v:
            self.audio_block_index = {block: i for i, block in enumerate(cfg.audio_inject_layers)}
            self.cond_encoder = nn.Conv3d(cfg.in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
            self.casual_audio_encoder = CausalAudioEncoder(cfg.audio_dim, cfg.audio_layers, dim)
            self.audio_injector = AudioInjector(dim, heads, len(cfg.audio_inject_layers), cfg.eps)
            self.trainable_cond_mask = nn.Embedding(3, dim)  # token type: noisy, reference, motion
            self.frame_packer = FramePacker(cfg.in_dim, dim)

    # ------------------------------------------------------------------ embeddings
    def _patchify(self, conv: nn.Conv3d, latents: torch.Tensor) -> torch.Tensor:
        return conv(latents.to(conv.weight.dtype)).flatten(2).transpose(1, 2)

    def _time_modulation(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> time embedding (B, D) for the head, and (B, S, 6, D) block modulation for the
        S segments (S2V: noisy tokens at t, conditioning tokens at t = 0)."""
        t = timestep.float()
        if self.s2v:
            t = torch.cat([t, t.new_zeros(1)])
        emb = sinusoidal_embedding(self.cfg.freq_dim, t)
        emb = fp32_linear(self.time_embedding[2], F.silu(fp32_linear(self.time_embedding[0], emb)))
        proj = fp32_linear(self.time_projection[1], F.silu(emb)).unflatten(1, (6, -1))
        b = timestep.shape[0]
        if not self.s2v:
            return emb, proj[:, None]
        return emb[:b], torch.stack([proj[:b], proj[b:].expand(b, -1, -1)], dim=1)

    def _encode_audio(self, audio: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, layers, T, C) -> tokens (B, F, 5, D) and global tokens (B, F, D) for F frames."""
        video_frames = 4 * frames
        if audio.shape[2] < video_frames:
            raise ValueError(
                f"audio has {audio.shape[2]} feature frames but the clip has {frames} latent "
                f"frames = {video_frames} video frames; pass one wav2vec2 feature per video frame"
            )
        audio = audio[:, :, :video_frames]
        # upstream prepends the motion history's span (4*(motion_frames-1)+1 video frames) by
        # repeating the first feature, so the causal convs see a warm history; its tokens are
        # dropped again after the 4x downsampling
        history = 4 * (self.cfg.motion_frames - 1) + 1
        audio = torch.cat([audio[:, :, :1].expand(-1, -1, history, -1), audio], dim=2)
        tokens, glob = self.casual_audio_encoder(audio)
        return tokens[:, -frames:], glob[:, -frames:]

    def _embed(self, noisy, ref, motion, pose):
        """-> x (B, L, D) fp32, positions (L, 3), token_frame (L,) and the noisy token count."""
        f, h, w = (s // p for s, p in zip(noisy.shape[2:], self.patch_size))
        device = noisy.device
        x = self._patchify(self.patch_embedding, noisy)
        groups = [x]
        positions = [grid_positions(range(f), range(h), range(w), device)]
        if self.s2v:
            # pose latents go through their own patch embedding; no pose = zero latents
            x = x + (
                self._patchify(self.cond_encoder, pose) if pose is not None else self.cond_encoder.bias.to(x.dtype)
            )
            types = self.trainable_cond_mask.weight.to(x.dtype)
            groups = [x + types[0]]
            if ref is not None:
                groups.append(self._patchify(self.patch_embedding, ref) + types[1])
                positions.append(grid_positions([REF_TIME_POSITION], range(h), range(w), device))
            if motion is not None:
                motion_tokens, motion_positions = self.frame_packer(motion.to(x.dtype), self.patch_size)
                groups.append(motion_tokens + types[2])
                positions.append(motion_positions)
        x = torch.cat(groups, dim=1).float()
        positions = torch.cat(positions)
        n_noisy = f * h * w
        token_frame = torch.zeros(x.shape[1], dtype=torch.long, device=device)
        token_frame[:n_noisy] = torch.arange(n_noisy, device=device) // (h * w) + 1
        return x, positions, token_frame, n_noisy

    @staticmethod
    def _frame_runs(token_frame: torch.Tensor) -> tuple[int, list[tuple[int, int, int]]]:
        """Local noisy-token count and (start, end, frame) runs, read once per forward."""
        frames, counts = torch.unique_consecutive(token_frame.cpu(), return_counts=True)  # one sync
        ends = counts.cumsum(0)
        runs = [
            (end - count, end, frame - 1)
            for frame, count, end in zip(frames.tolist(), counts.tolist(), ends.tolist())
            if frame > 0
        ]
        n_noisy = runs[-1][1] if runs else 0  # noisy tokens come first in every shard
        return n_noisy, runs

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        noisy: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        audio: torch.Tensor | None = None,
        ref: torch.Tensor | None = None,
        motion: torch.Tensor | None = None,
        pose: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted flow (B, out_dim, F, H, W) for the noisy latents (B, in_dim, F, H, W)."""
        if self.s2v and audio is None:
            raise ValueError("the S2V model needs audio features (B, audio_layers, T, audio_dim)")
        dtype = self.patch_embedding.weight.dtype
        sharding = self.sequence_sharding
        b, _, frames, height, width = noisy.shape
        x, positions, token_frame, n_noisy_total = self._embed(noisy, ref, motion, pose)
        rope_cos, rope_sin = rope_angles(positions, self.cfg.dim // self.cfg.num_heads)
        time_emb, time_mod = self._time_modulation(timestep)
        context = self.text_embedding(context.to(dtype))
        if self.s2v:
            audio_tokens, audio_global = self._encode_audio(audio, frames)

        if sharding is not None:
            x = sharding.shard(x, 1)
            rope_cos, rope_sin = sharding.shard(rope_cos, 0), sharding.shard(rope_sin, 0)
            token_frame = sharding.shard(token_frame, 0)
        if self.s2v:
            n_noisy, runs = self._frame_runs(token_frame)
        else:  # one segment: every token is a noisy token
            n_noisy, runs = x.shape[1], []
        tokens = TokenLayout(rope_cos, rope_sin, n_noisy, runs, dtype)

        for i, block in enumerate(self.blocks):
            x = block(x, time_mod, context, tokens, sharding)
            if self.s2v and i in self.audio_block_index:
                x = self.audio_injector(x, self.audio_block_index[i], audio_tokens, audio_global, tokens)

        if sharding is not None:
            x = sharding.gather(x, 1)
        out = self.head(x[:, :n_noisy_total], time_emb)
        return self._unpatchify(out, frames, height, width)

    def _unpatchify(self, out: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """(B, f*h*w, pt*ph*pw*C) -> (B, C, F, H, W); channels vary fastest within a patch."""
        pt, ph, pw = self.patch_size
        b = out.shape[0]
        out = out.view(b, frames // pt, height // ph, width // pw, pt, ph, pw, self.out_dim)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, self.out_dim, frames, height, width)


def apply_compile(model: WanModel, model_cfg: Any) -> None:
    """``model.compile=true``: ``torch.compile`` each block (and the audio injector) on its own;
    nothing otherwise. Applied by the strategy's setup right after building, before any wrapping
    (FSDP wraps the compiled blocks; compilation itself happens at the first forward).

    The 40 blocks share their code and shapes, so one compiled graph serves all of them and
    compilation costs about one block; the fused kernels take one pass over the activations
    where the eager norms, RoPE, modulation and gated residuals take several."""
    if not model_cfg.compile:
        return
    for block in model.blocks:
        block.compile()
    if model.s2v:
        model.audio_injector.inject = torch.compile(inject_audio)
