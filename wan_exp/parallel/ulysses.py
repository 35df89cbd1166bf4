"""Ulysses sequence parallelism: each rank holds 1/P of the tokens, and self-attention
swaps to 1/P of the heads over the whole sequence with an all-to-all.

:class:`UlyssesSharding` is the object a strategy sets as ``model.sequence_sharding``
(docs/architecture.md, Model). The model calls

- ``shard(t, dim)`` on the token sequence and on every per-token tensor right after the
  embedding: the sequence is padded to a multiple of P and this rank keeps its slice;
- ``attention(q, k, v, attn_fn)`` for every self-attention: tokens-split -> heads-split,
  ``attn_fn`` over the whole *unpadded* sequence (pad tokens are dropped, so they are never
  attended to), then heads-split -> tokens-split;
- ``gather(t, dim)`` before the head: all ranks' slices joined and the padding removed.

Any token count works. Only the head count must divide by P (checked by config.validate).

The collectives are plain ``dist.all_to_all_single`` / ``dist.all_gather_single``
(gloo supports both; gloo lacks the list form of all_to_all), wrapped in small autograd
functions so that LoRA training can backpropagate through them.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# torch 2.13 renamed all_gather_into_tensor (deprecated there); older torch (2.11 on the
# GPU machines) has only the old name
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def pad_to_multiple(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """Zero-pad ``t`` along ``dim`` so that its length divides by ``multiple``."""
    missing = -t.shape[dim] % multiple
    if missing == 0:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = missing
    return torch.cat([t, t.new_zeros(pad_shape)], dim=dim)


def _all_to_all(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Chunk i of dim 0 goes to rank i; chunk j of the result came from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0; its gradient is the same exchange in reverse, which
    for equal chunks is again an all-to-all over dim 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _all_to_all(grad, ctx.group), None


class _GatherSlices(torch.autograd.Function):
    """Concatenate every rank's equal slice along dim 0. Everything after the gather runs
    identically on every rank, so the gradient of this rank's slice is its own part of
    the (replicated) gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.rows = dist.get_rank(group), x.shape[0]
        x = x.contiguous()
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


class UlyssesSharding:
    """The ``model.sequence_sharding`` hook for one Ulysses process group.

    It remembers the unpadded length of the sequence it last sharded: every per-token
    tensor of one forward has that length, and ``attention`` / ``gather`` need it to drop
    the padding.
    """

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group
        self.degree = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.full_len: int | None = None

    def shard(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Pad ``t`` along ``dim`` to a multiple of the degree; return this rank's slice."""
        self.full_len = t.shape[dim]
        padded = pad_to_multiple(t, dim, self.degree)
        return padded.chunk(self.degree, dim=dim)[self.rank]

    def _unpadded_len(self) -> int:
        if self.full_len is None:
            raise RuntimeError("sequence_sharding.shard() must be called before attention()/gather()")
        return self.full_len

    def gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """All ranks' slices joined along ``dim``, padding removed."""
        moved = t.movedim(dim, 0)
        full = _GatherSlices.apply(moved, self.group)
        return full[: self._unpadded_len()].movedim(0, dim)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_fn: AttnFn) -> torch.Tensor:
        """q, k, v: (B, N_local, H, d) -> (B, N_local, H, d), attention over all N tokens."""
        n = self._unpadded_len()
        heads = q.shape[2]
        if heads % self.degree:
            raise ValueError(
                f"Ulysses degree {self.degree} does not divide the {heads} attention heads; "
                "config.validate should have rejected parallel.ulysses_degree"
            )
        q, k, v = (self._tokens_to_heads(x)[:, :n] for x in (q, k, v))
        out = attn_fn(q, k, v)
        return self._heads_to_tokens(pad_to_multiple(out, 1, self.degree))

    def _tokens_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N/P, H, d) on each rank -> (B, N, H/P, d): rank j receives head group j."""
        b, n_local, h, d = x.shape
        p = self.degree
        # chunk dim 0 = destination rank = head group
        send = x.reshape(b, n_local, p, h // p, d).permute(2, 0, 1, 3, 4)
        recv = _AllToAll.apply(send, self.group)  # dim 0 now = source rank = token slice
        return recv.permute(1, 0, 2, 3, 4).reshape(b, p * n_local, h // p, d)

    def _heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H/P, d) -> (B, N/P, H, d): the inverse of ``_tokens_to_heads``."""
        b, n, h_local, d = x.shape
        p = self.degree
        # chunk dim 0 = destination rank = token slice
        send = x.reshape(b, p, n // p, h_local, d).permute(1, 0, 2, 3, 4)
        recv = _AllToAll.apply(send, self.group)  # dim 0 now = source rank = head group
        return recv.permute(1, 2, 0, 3, 4).reshape(b, n // p, p * h_local, d)
