"""Turn a DiT built on the meta device into real parameters, reading from the weight
source only what this rank keeps.

Every strategy builds the DiT on the meta device. :func:`plan_weights` then swaps each
meta parameter for a *placeholder*: a zero-stride tensor of the right shape, dtype and
device that costs one element of memory. The placeholders let ``before_wrap`` (peft LoRA
injection) run on the unloaded model as if it were real, so the adapters it adds are
created on the right device with their own initialisation, while the base weights are
still unread. The :class:`WeightPlan` remembers, for every placeholder, which
module attribute it sits in and which source key fills it (identity, not name: peft
moves ``q`` to ``q.base_layer`` but keeps the parameter object).

Ways to fill the plan:
- :meth:`WeightPlan.load` — the whole parameters of one module subtree (every rank for
  single/ulysses; one FSDP1 unit at a time for the shard-only FSDP1 path);
- :meth:`WeightPlan.to_meta` then :meth:`WeightPlan.fill_local_shards` — FSDP2: only the
  rows of each DTensor this rank owns, read with ``source.get(key, rows=...)``.
Parameters that ``before_wrap`` added (not in the source) keep the values it gave them;
in the FSDP2 path their full values are held aside (they are small) and sliced the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

from wan_exp.models.checkpoint import check_compatible


@dataclass
class _Slot:
    """One parameter attribute of one module."""

    module: nn.Module
    attr: str

    def get(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    def set(self, value: torch.Tensor, requires_grad: bool) -> None:
        setattr(self.module, self.attr, nn.Parameter(value, requires_grad=requires_grad))


def _placeholder(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of ``shape`` whose every element is one shared zero (stride 0)."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def _direct_params(module: nn.Module):
    return list(module.named_parameters(recurse=False))


class WeightPlan:
    """Which source key fills which placeholder, and the values before_wrap added."""

    def __init__(self, source, dtype: torch.dtype, device: torch.device) -> None:
        self.source = source
        self.dtype = dtype
        self.device = device
        self.pending: dict[int, tuple[_Slot, str]] = {}  # id(placeholder) -> (slot, key)
        # FSDP2 path (after to_meta): slots to fill from the source, and before_wrap's values
        self.shard_from_source: list[tuple[_Slot, str]] = []
        self.shard_from_added: list[tuple[_Slot, torch.Tensor]] = []

    # ------------------------------------------------------------------ whole parameters
    def load(self, root: nn.Module) -> None:
        """Replace every placeholder under ``root`` by its full value from the source."""
        for module in root.modules():
            for _attr, param in _direct_params(module):
                entry = self.pending.pop(id(param), None)
                if entry is None:
                    continue  # already loaded, or added by before_wrap
                slot, key = entry
                slot.set(self.source.get(key, self.dtype, self.device), param.requires_grad)

    def check_all_loaded(self) -> None:
        if self.pending:
            keys = sorted(key for _, key in self.pending.values())
            raise RuntimeError(f"{len(keys)} parameters were never loaded, e.g. {keys[:3]}")

    # ------------------------------------------------------------------ FSDP2 local shards
    def to_meta(self, root: nn.Module) -> None:
        """Make every parameter under ``root`` a meta tensor (before fully_shard), keeping
        the full values of the parameters before_wrap added so they can be sliced later."""
        for module in root.modules():
            for attr, param in _direct_params(module):
                slot = _Slot(module, attr)
                entry = self.pending.pop(id(param), None)
                if entry is None:
                    self.shard_from_added.append((slot, param.detach().clone()))
                else:
                    self.shard_from_source.append((slot, entry[1]))
                slot.set(torch.empty(param.shape, dtype=param.dtype, device="meta"), param.requires_grad)

    def fill_local_shards(self) -> None:
        """After fully_shard and ``to_empty``: copy into each DTensor's local shard the rows
        it owns, from the source (model weights) or from before_wrap's values."""
        with torch.no_grad():
            for slot, key in self.shard_from_source:
                local, rows = _local_shard(slot.get())
                if local.numel():
                    local.copy_(self.source.get(key, self.dtype, self.device, rows=rows))
            for slot, full in self.shard_from_added:
                local, rows = _local_shard(slot.get())
                local.copy_(full[rows])
        self.shard_from_source, self.shard_from_added = [], []


def plan_weights(dit: nn.Module, source, dtype: torch.dtype, device: torch.device) -> WeightPlan:
    """Check the meta-built ``dit`` against the source (keys and shapes; CheckpointError)
    and swap its parameters for placeholders on ``device``."""
    check_compatible(dit, source)
    plan = WeightPlan(source, dtype, device)
    prefix_of = {module: name for name, module in dit.named_modules()}
    for module in dit.modules():
        for attr, param in _direct_params(module):
            key = f"{prefix_of[module]}.{attr}" if prefix_of[module] else attr
            slot = _Slot(module, attr)
            slot.set(_placeholder(param.shape, dtype, device), param.requires_grad)
            plan.pending[id(slot.get())] = (slot, key)
    return plan


def _local_shard(param: DTensor) -> tuple[torch.Tensor, slice]:
    """The local tensor of an FSDP2 parameter and the rows of the full one it holds.

    FSDP2 shards dim 0 like ``torch.chunk``: ceil(n / world) rows per rank, the last
    ranks holding fewer or none."""
    if not isinstance(param, DTensor) or tuple(param.placements) != (Shard(0),):
        raise RuntimeError(f"expected an FSDP2 parameter sharded on dim 0, got {type(param).__name__}")
    mesh = param.device_mesh
    n, world, rank = param.shape[0], mesh.size(), mesh.get_local_rank()
    per_rank = -(-n // world)
    start, stop = min(n, rank * per_rank), min(n, (rank + 1) * per_rank)
    local = param.to_local()
    if local.shape[0] != stop - start:
        raise RuntimeError(f"FSDP2 local shard has {local.shape[0]} rows, expected rows {start}:{stop} of {n}")
    return local, slice(start, stop)


def local_parameters(module: nn.Module) -> list[torch.Tensor]:
    """This rank's part of each parameter of ``module`` (a DTensor's local shard)."""
    return [p.to_local() if isinstance(p, DTensor) else p for p in module.parameters()]


def local_param_bytes(module: nn.Module) -> int:
    """Bytes of parameter storage this rank holds for ``module`` (only local shards)."""
    return sum(t.numel() * t.element_size() for t in local_parameters(module))


def gather_rows(param: torch.Tensor) -> torch.Tensor:
    """The whole value of an FSDP2 parameter (Shard(0) over a 1-D mesh), gathered with one
    c10d ``all_gather_into_tensor`` of the padded local rows; any other tensor as it is.

    Not ``DTensor.full_tensor()``: its functional-collective path crashed both ranks (SIGSEGV)
    under gloo with CUDA tensors, the backend of ranks that share a GPU (docs/rehearsal.md)."""
    if not isinstance(param, DTensor):
        return param
    local, _ = _local_shard(param)
    group = param.device_mesh.get_group()
    per_rank = -(-param.shape[0] // param.device_mesh.size())
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = local.new_empty((per_rank * param.device_mesh.size(), *local.shape[1:]))
    torch.distributed.all_gather_into_tensor(gathered, padded, group=group)
    return gathered[: param.shape[0]]
