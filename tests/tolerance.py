"""Tolerances derived from the arithmetic, never from one machine's rounding.

Two evaluations of the same floating-point computation differ when their sums run in another
order: ATen's CPU kernels block and vectorise a reduction differently under
ATEN_CPU_CAPABILITY=default, avx2 and avx512 (and a GPU kernel differs again), a tiled or
split computation sums over other shapes. Each addition of a sum of n terms rounds with a
relative error of at most u = eps/2; these errors are independent and of either sign, so the
error of the sum grows like sqrt(n) * u relative to the sum of the terms' sizes (the worst
case, n * u, needs every rounding in the same direction, which round-to-nearest in fp32 does
not do). Four standard deviations of that, for the difference of two orders (sqrt 2 more):
4 * sqrt(2n) * u = 2 * sqrt(2n) * eps per reduction. With operands of order one (randn inputs,
unit-variance weights, normalised activations) the sum of the terms' sizes is of the order of
the output's own scale, so the bound is relative to it; a chain of ``depth`` reductions adds
its bounds (first order).

A correct machine stays inside this on any CPU, while a real bug (a wrong halo, a missing
term, a 1e-3 error in attention) stays far above it for the sizes the tests use.
"""

from __future__ import annotations

import math

import torch

from wan_exp.geometry import AUDIO_TOKENS_PER_FRAME, FRAME_PACK_KERNELS


def reordered_sum_tolerance(dtype: torch.dtype, terms: int, depth: int = 1) -> float:
    """Relative bound on the difference between two evaluations, in different summation
    orders, of ``depth`` chained reductions of at most ``terms`` products each in ``dtype``."""
    return depth * 2 * math.sqrt(2 * terms) * torch.finfo(dtype).eps


def close_kwargs(dtype: torch.dtype, terms: int, depth: int = 1, scale: float = 1.0) -> dict:
    """atol/rtol for torch.testing.assert_close: the bound above, relative and absolute at the
    values' ``scale`` (values of order one: 1)."""
    bound = reordered_sum_tolerance(dtype, terms, depth)
    return {"rtol": bound, "atol": bound * scale}


# The Wan VAE's longest chains of reductions (wan_exp/models/vae.py), for tests that compare two
# evaluations of an encode or a decode. Convolutions sum 3x3x3 kernels over at most 4 x vae_dim
# channels; the middle attention sums over the positions of a latent frame.
def vae_encoder_chain(vae_dim: int, positions: int = 0) -> tuple[int, int]:
    """(terms, depth): stem conv, 4 levels of two residual blocks of two convs, 3 down-samplers
    (two of them also in time), the middle (two blocks, attention: q/k/v, scores, weighting,
    projection), the head conv and the 1x1x1 conv1."""
    return max(27 * 4 * vae_dim, positions), 1 + 16 + 5 + 8 + 1 + 1


def vae_decoder_chain(vae_dim: int, positions: int = 0) -> tuple[int, int]:
    """(terms, depth): the 1x1x1 conv2, conv1, the middle (8 as above), 4 levels of three
    residual blocks of two convs, 3 up-samplers (a time and a space conv each), the head conv."""
    return max(27 * 4 * vae_dim, positions), 1 + 1 + 8 + 24 + 6 + 1


def chain_tolerance(dtype: torch.dtype, reductions: list[int]) -> float:
    """Relative bound on the difference between two evaluations of a chain of reductions of the
    given lengths: each adds its own bound (first order). ``depth`` equal reductions of ``terms``
    give ``reordered_sum_tolerance(dtype, terms, depth)``."""
    return sum(reordered_sum_tolerance(dtype, terms) for terms in reductions)


def attention_reductions(head_dim: int, keys: int) -> list[int]:
    """Softmax attention: the scores over the head size, the softmax's sum over the keys, the
    weighting of the values over the keys."""
    return [head_dim, keys, keys]


def dit_reductions(model, tokens: int, with_motion: bool = True) -> list[int]:
    """The lengths of the reductions of one DiT forward (wan_exp/models/wan_s2v.py; ``model`` the
    model config) over ``tokens`` tokens. The trunk: the patch embedding (with the motion history,
    the frame packer's largest kernel: in_dim x 4x8x8 products), per block the self-attention
    (layer norm's mean and variance, q/k/v, RMS norm, attention over every token, output), the
    cross-attention (the same over the text tokens), the FFN (layer norm, two linears) and, in
    the audio layers, the injection (layer norm, q, RMS norm, attention over a frame's audio
    tokens and its padding token, output); then the head (layer norm, linear). Beside the trunk,
    each entering it once: the time embedding (three linears, every block's modulation), the text
    embedding (two linears) and the audio encoder (the mean over its layers, three convolutions of
    3 taps each followed by a layer norm, the global token's linear)."""
    dim, head_dim = model.dim, model.dim // model.num_heads
    kernel = max(FRAME_PACK_KERNELS, key=math.prod) if with_motion else model.patch_size
    embedding = [model.in_dim * math.prod(kernel)]
    norm = [dim, dim]  # mean, variance
    self_attention = [*norm, dim, dim, *attention_reductions(head_dim, tokens), dim]
    cross_attention = [*norm, dim, dim, *attention_reductions(head_dim, model.text_len), dim]
    ffn = [*norm, dim, model.ffn_dim]
    injection = [*norm, dim, dim, *attention_reductions(head_dim, AUDIO_TOKENS_PER_FRAME + 1), dim]
    blocks = model.num_layers * (self_attention + cross_attention + ffn)
    blocks += len(model.audio_inject_layers) * injection
    head = [*norm, dim]
    time = [model.freq_dim, dim, dim]
    text = [model.text_dim, dim]
    quarter, half = dim // 4, dim // 2
    audio = [model.audio_layers, 3 * model.audio_dim, quarter, quarter, 3 * quarter, half, half, 3 * half, *norm, dim]
    return embedding + blocks + head + time + text + audio


def chain_close_kwargs(dtype: torch.dtype, reductions: list[int], scale: float = 1.0) -> dict:
    """atol/rtol for torch.testing.assert_close from ``chain_tolerance``, absolute at ``scale``."""
    bound = chain_tolerance(dtype, reductions)
    return {"rtol": bound, "atol": bound * scale}


def dit_gradient_reductions(model, tokens: int, with_motion: bool = True) -> list[int]:
    """The reductions behind a parameter's gradient after one forward and backward of the DiT:
    the forward's, the backward's (the same chain run back: a linear's input gradient sums over
    its outputs, the attention's over the tokens and the head size again, so the same lengths)
    and the weight gradient's sum over the tokens."""
    forward = dit_reductions(model, tokens, with_motion)
    return forward + forward + [tokens]
