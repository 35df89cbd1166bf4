"""Ring attention: each rank keeps its queries and passes its keys/values around the ring.

With R ranks in the ring group, rank r starts with key/value chunk r; at step s it holds
chunk (r - s) mod R, computes attention of its queries over that chunk with the chunk's
log-sum-exp (``models.attention.attention_with_lse``), and merges it into the running
result. Meanwhile the chunk travels on to rank r + 1 (send) while chunk r - s - 1 arrives
from rank r - 1 (receive), overlapped with the computation. After R steps every query has
seen every key once.

Merge rule (exact): for partials (o1, lse1) over keys K1 and (o2, lse2) over keys K2,
attention over K1 and K2 is ``o = o1 * exp(lse1 - lse) + o2 * exp(lse2 - lse)`` with
``lse = logaddexp(lse1, lse2)``; it is done in fp32.

Padding: the token sequence is padded to a multiple of the sequence-parallel degree, so the
last chunks may end in pad tokens. ``valid_keys(chunk)`` says how many leading keys of a
chunk are real; the rest are never attended to (a chunk with none is skipped).

Under autograd (train_lora) the exchange is a differentiable function (its gradient goes
round the ring the other way) and blocking; without autograd it is overlapped.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from wan_exp.models.attention import attention_with_lse


def _exchange(send: torch.Tensor, group: ProcessGroup, to_rank: int, from_rank: int) -> Callable[[], torch.Tensor]:
    """Start sending ``send`` to group rank ``to_rank`` and receiving a tensor like it from
    ``from_rank``; returns the function that waits and gives the received tensor.

    gloo sends point-to-point messages from host memory only (a CUDA tensor fails in its TCP
    transport with "Bad address", while its collectives stage CUDA tensors themselves), so
    over gloo a CUDA tensor travels through the host (ranks sharing a GPU)."""
    device = send.device
    if send.is_cuda and dist.get_backend(group) == "gloo":
        send = send.cpu()
    recv = torch.empty_like(send)
    ops = [
        dist.P2POp(dist.isend, send, dist.get_global_rank(group, to_rank), group),
        dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, from_rank), group),
    ]
    requests = dist.batch_isend_irecv(ops)
    in_flight = (send, recv)  # both buffers (a host copy of ``send`` among them) live until done

    def received() -> torch.Tensor:
        for request in requests:
            request.wait()
        return in_flight[1].to(device)

    return received


def _shift(x: torch.Tensor, group: ProcessGroup, step: int) -> torch.Tensor:
    """Blocking: send ``x`` to the rank ``step`` further round the ring, receive from the
    rank ``step`` behind."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    return _exchange(x.contiguous(), group, (rank + step) % size, (rank - step) % size)()


class _RingShift(torch.autograd.Function):
    """Send to the next rank, receive from the previous; the gradient goes the other way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return _shift(x, group, +1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _shift(grad, ctx.group, -1), None


class _Pending:
    """The next key/value chunk: in flight (no autograd) or already received (autograd)."""

    def __init__(self, kv: torch.Tensor, group: ProcessGroup) -> None:
        if torch.is_grad_enabled() and kv.requires_grad:
            received = _RingShift.apply(kv, group)
            self._received: Callable[[], torch.Tensor] = lambda: received
        else:
            rank, size = dist.get_rank(group), dist.get_world_size(group)
            self._received = _exchange(kv, group, (rank + 1) % size, (rank - 1) % size)

    def wait(self) -> torch.Tensor:
        return self._received()


def merge_partials(
    out: Optional[torch.Tensor], lse: Optional[torch.Tensor], part_out: torch.Tensor, part_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a partial attention (out (B, N, H, d), lse (B, H, N)) into the running one (fp32)."""
    part_out = part_out.float()
    if out is None:
        return part_out, part_lse
    new_lse = torch.logaddexp(lse, part_lse)
    weight_old = torch.exp(lse - new_lse).transpose(1, 2).unsqueeze(-1)
    weight_new = torch.exp(part_lse - new_lse).transpose(1, 2).unsqueeze(-1)
    return out * weight_old + part_out * weight_new, new_lse


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: ProcessGroup, valid_keys: Callable[[int], int]
) -> torch.Tensor:
    """q, k, v: this rank's chunk (B, L, H, d) -> attention of q over every rank's keys."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    kv = torch.stack([k, v]).contiguous()
    out = lse = None
    for step in range(size):
        chunk = (rank - step) % size
        pending = _Pending(kv, group) if step < size - 1 else None
        n = valid_keys(chunk)
        if n > 0:
            part_out, part_lse = attention_with_lse(q, kv[0][:, :n], kv[1][:, :n])
            out, lse = merge_partials(out, lse, part_out, part_lse)
        if pending is not None:
            kv = pending.wait()
    if out is None:
        raise RuntimeError("ring attention: no chunk holds a valid key (empty sequence)")
    return out.to(q.dtype)
