"""Sequence parallelism: Ulysses, ring attention, or both (USP). Each of the P = ring x
ulysses ranks holds 1/P of the tokens. Ulysses swaps to 1/ulysses of the heads over its
group's tokens with an all-to-all; ring attention (ring.py) passes keys/values around.

:class:`SequenceSharding` is the object a strategy sets as ``model.sequence_sharding``
(docs/architecture.md, Model). The model calls

- ``shard(t, dim)`` on the token sequence and on every per-token tensor right after the
  embedding: the sequence is padded to a multiple of P and this rank keeps its slice;
- ``attention(q, k, v, attn_fn)`` for every self-attention: tokens-split -> heads-split
  (Ulysses), ``attn_fn`` over the keys of the whole *unpadded* sequence (ring 1) or ring
  attention over the ring group (pad keys are cut off, so they are never attended to),
  then heads-split -> tokens-split;
- ``gather(t, dim)`` before the head: all ranks' slices joined and the padding removed.

Any token count works. Only the head count must divide by the Ulysses degree (checked by
preflight.validate).

The collectives are plain ``dist.all_to_all_single`` / ``dist.all_gather_single``
(gloo supports both; gloo lacks the list form of all_to_all), wrapped in small autograd
functions so that LoRA training can backpropagate through them.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from wan_exp.parallel.ring import ring_attention

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


class SequenceSharding:
    """The ``model.sequence_sharding`` hook for a split of the sequence over ring x ulysses
    ranks (Ulysses alone, ring alone, or both: USP).

    The sequence is padded to a multiple of P = ring x ulysses and cut into P slices; the
    rank at (ring r, ulysses u) keeps slice r * ulysses + u (its rank in the flattened "sp"
    group). So the ulysses group of ring position r holds ring chunk r, and the all-to-all
    inside it gives each of its ranks chunk r for 1/ulysses of the heads; ring attention
    then passes keys/values of those heads around the ring group.

    It remembers the unpadded length of the sequence it last sharded: every per-token
    tensor of one forward has that length, and ``attention`` / ``gather`` need it to keep
    the padding out.
    """

    def __init__(
        self, sp_group: ProcessGroup, ulysses_group: ProcessGroup | None, ring_group: ProcessGroup | None
    ) -> None:
        self.group = sp_group
        self.ulysses_group, self.ring_group = ulysses_group, ring_group
        self.ulysses = dist.get_world_size(ulysses_group) if ulysses_group is not None else 1
        self.ring = dist.get_world_size(ring_group) if ring_group is not None else 1
        self.degree = dist.get_world_size(sp_group)
        self.rank = dist.get_rank(sp_group)
        ring_rank = dist.get_rank(ring_group) if ring_group is not None else 0
        ulysses_rank = dist.get_rank(ulysses_group) if ulysses_group is not None else 0
        if self.degree != self.ring * self.ulysses or self.rank != ring_rank * self.ulysses + ulysses_rank:
            raise RuntimeError(
                f"sequence-parallel group (rank {self.rank} of {self.degree}) does not match ring "
                f"{ring_rank}/{self.ring} x ulysses {ulysses_rank}/{self.ulysses}"
            )
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
        """q, k, v: (B, N_local, H, d) -> (B, N_local, H, d), attention over all N tokens.

        Pad tokens are never attended to (keys past the real length are cut off); pad
        queries get a value that ``gather`` drops."""
        heads = q.shape[2]
        if heads % self.ulysses:
            raise ValueError(
                f"Ulysses degree {self.ulysses} does not divide the {heads} attention heads; "
                "preflight.validate should have rejected parallel.ulysses_degree"
            )
        if self.ulysses > 1:
            q, k, v = (self._tokens_to_heads(x) for x in (q, k, v))
        chunk_len = q.shape[1]  # this ring chunk (the whole padded sequence when ring is 1)

        def valid_keys(chunk: int) -> int:
            return max(0, min(chunk_len, self._unpadded_len() - chunk * chunk_len))

        if self.ring > 1:
            out = ring_attention(q, k, v, self.ring_group, valid_keys)
        else:
            n = valid_keys(0)
            out = attn_fn(q, k[:, :n], v[:, :n])
        return self._heads_to_tokens(out) if self.ulysses > 1 else out

    def _tokens_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N/P, H, d) on each rank -> (B, N/P x U, H/U, d): rank j of the ulysses group
        receives head group j of every slice of its ring chunk."""
        b, n_local, h, d = x.shape
        p = self.ulysses
        # chunk dim 0 = destination rank = head group
        send = x.reshape(b, n_local, p, h // p, d).permute(2, 0, 1, 3, 4)
        recv = _AllToAll.apply(send, self.ulysses_group)  # dim 0 now = source rank = token slice
        return recv.permute(1, 0, 2, 3, 4).reshape(b, p * n_local, h // p, d)

    def _heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of ``_tokens_to_heads``."""
        b, n, h_local, d = x.shape
        p = self.ulysses
        # chunk dim 0 = destination rank = token slice
        send = x.reshape(b, p, n // p, h_local, d).permute(1, 0, 2, 3, 4)
        recv = _AllToAll.apply(send, self.ulysses_group)  # dim 0 now = source rank = head group
        return recv.permute(1, 2, 0, 3, 4).reshape(b, n // p, p * h_local, d)
