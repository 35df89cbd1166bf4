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
