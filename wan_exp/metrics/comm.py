"""Communication counted per rank: calls and bytes per collective kind, at the c10d op level.

:class:`CommCounter` is a ``TorchDispatchMode``. Every collective of a process group reaches
the dispatcher as a ``c10d::*`` op (``dist.all_to_all_single`` -> ``c10d::alltoall_base_``,
FSDP1/FSDP2's ``all_gather_into_tensor`` -> ``c10d::_allgather_base_``, point-to-point ->
``c10d::send`` / ``c10d::recv_``, ...) and DTensor's functional collectives as
``_c10d_functional::*`` ops, so the counter sees the collectives issued inside FSDP, DTensor
and DeviceMesh as well as ours, on any backend (nccl, gloo, and the fake backend that plays
N ranks in one process). An op a collective runs inside another is not seen twice: the
mode is off while it runs the op it intercepted.

Bytes, per call (nccl-tests' "size", so a link's bus bandwidth prices it directly):

=============== ============================================ ================
kind            ``bytes``                                    bus factor (n ranks)
=============== ============================================ ================
all_reduce      the tensor                                   2(n-1)/n
all_gather      the gathered output (n x this rank's input)  (n-1)/n
reduce_scatter  the input before scattering (n x the output) (n-1)/n
all_to_all      this rank's input (all chunks)               (n-1)/n
broadcast       the tensor                                   1
send / recv     the tensor sent / received                   1
gather/scatter  this rank's input / output                   1
reduce          the tensor                                   1
barrier         0                                            -
=============== ============================================ ================

``bus_bytes`` = bytes x bus factor: the bytes one rank moves over its busiest link under
NCCL's ring algorithms, so ``bus_bytes / bus bandwidth`` is the call's time on that link. An
all-to-all's bus bytes are exact for uneven splits too: this rank's input less the chunk it
keeps (equal splits give (n-1)/n). ``messages`` counts the calls per size and bus factor
(metrics/messages.py), so a link's curve prices every size on its own (plan/pricing.py).

Point-to-point: ``dist.send``/``recv``, ``isend``/``irecv`` and ``batch_isend_irecv`` all
dispatch ``c10d::send`` / ``c10d::recv_`` per message and are counted as ``send`` / ``recv``;
the functional ``reduce_scatter_tensor_out`` (``out=``) is counted as a reduce-scatter.

``groups``: every process group a collective ran on (any bucket), by its name: its ranks and
the kinds it carried. Each group is its own NCCL communicator with its own buffers (plan/run.py,
``nccl_buffer_bytes``).

Which bucket a call lands in (``init``, ``step``, ``warmup`` or ``other``) is set by the
MetricsCollector around phases and steps; see :meth:`MetricsCollector.phase`.
The mode adds a Python call to every eager op while it is active (its cost per op is measured by
``bench/comm_counter_cost.py``; figures in docs/benchmarks.md);
torch.compile'd code still compiles (``ignore_compile_internals``) and its collectives,
calls of ``_c10d_functional`` ops or eager graph breaks, are counted at run time.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from wan_exp.metrics.messages import message_key

NAMESPACES = ("c10d", "_c10d_functional")
# op name -> (kind, index of the positional argument whose tensors make the call's bytes;
# -1: none)
_OPS: dict[str, tuple[str, int]] = {
    # c10d ops (what ProcessGroup methods dispatch to)
    "allreduce_": ("all_reduce", 0),
    "allreduce_coalesced_": ("all_reduce", 0),
    "allgather_": ("all_gather", 0),
    "_allgather_base_": ("all_gather", 0),
    "allgather_coalesced_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "reduce_scatter_": ("reduce_scatter", 1),
    "_reduce_scatter_base_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "alltoall_base_": ("all_to_all", 1),
    "alltoall_": ("all_to_all", 1),
    "broadcast_": ("broadcast", 0),
    "reduce_": ("reduce", 0),
    "gather_": ("gather", 1),
    "scatter_": ("scatter", 0),
    "send": ("send", 0),
    "recv_": ("recv", 0),
    "recv_any_source_": ("recv", 0),
    "barrier": ("barrier", -1),
    "monitored_barrier_": ("barrier", -1),
    # functional collectives (DTensor, torch.compile'd code); all_gather / reduce_scatter /
    # all_to_all below are special-cased in _call_bytes (their input is not their size)
    "all_reduce": ("all_reduce", 0),
    "all_reduce_": ("all_reduce", 0),
    "all_reduce_coalesced": ("all_reduce", 0),
    "all_reduce_coalesced_": ("all_reduce", 0),
    "all_gather_into_tensor": ("all_gather", 0),
    "all_gather_into_tensor_out": ("all_gather", 0),
    "all_gather_into_tensor_coalesced": ("all_gather", 0),
    "reduce_scatter_tensor": ("reduce_scatter", 0),
    "reduce_scatter_tensor_out": ("reduce_scatter", 0),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", 0),
    "all_to_all_single": ("all_to_all", 0),
    "broadcast": ("broadcast", 0),  # (its in-place form has the c10d name broadcast_ above)
}
_FUNCTIONAL_GATHERS = ("all_gather_into_tensor", "all_gather_into_tensor_out", "all_gather_into_tensor_coalesced")
BUCKETS = ("init", "step", "warmup", "other")
BYTES_DEFINITION = (
    "bytes: nccl-tests size per call (all_reduce/broadcast/reduce/send/recv: the tensor; "
    "all_gather: the gathered output; reduce_scatter: the input; all_to_all: this rank's "
    "input); bus_bytes = bytes x bus factor (all_reduce 2(n-1)/n; all_gather, "
    "reduce_scatter (n-1)/n; all_to_all: the input less the chunk kept, (n-1)/n for "
    "equal splits; others 1); messages: calls per '<bytes>x<bus factor>'"
)


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _process_group(namespace: str, args: tuple) -> Any:
    """The call's ProcessGroup, or None where it cannot be found."""
    if namespace == "c10d":  # the group arrives as a TorchScript object
        from torch.distributed import ProcessGroup

        for arg in args:
            if isinstance(arg, torch.ScriptObject) and arg._type().qualified_name().endswith("c10d.ProcessGroup"):
                return ProcessGroup.unbox(arg)
        return None
    group_name = next((a for a in reversed(args) if isinstance(a, str)), None)
    if group_name is None:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def group_of(namespace: str, args: tuple) -> tuple[int, int]:
    """(ranks, this process's rank) of the call's process group ((1, 0) where it cannot be found)."""
    group = _process_group(namespace, args)
    return (group.size(), group.rank()) if group is not None else (1, 0)


def _kept_chunk_bytes(name: str, args: tuple, n: int, rank: int) -> Optional[int]:
    """Bytes of an all-to-all's input that stay on this rank (its own chunk); None when not an
    all-to-all or the rank is outside the inputs."""
    if name == "alltoall_":  # (outputs, inputs, group, ...)
        inputs = args[1]
        return _tensor_bytes(inputs[rank]) if rank < len(inputs) else None
    if name == "alltoall_base_":  # (output, input, group, output_splits, input_splits, ...)
        source, splits = args[1], args[4]
    elif name == "all_to_all_single":  # (input, output_splits, input_splits, group_name)
        source, splits = args[0], args[2]
    else:
        return None
    total = _tensor_bytes(source)
    if not splits:
        return total // n
    rows = source.shape[0] if source.dim() else 1
    return int(splits[rank]) * (total // rows) if rows and rank < len(splits) else None


def bus_factor(kind: str, n: int) -> float:
    if n <= 1:
        return 0.0 if kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all") else 1.0
    if kind == "all_reduce":
        return 2.0 * (n - 1) / n
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    return 1.0


def _empty() -> dict[str, dict[str, dict[str, float]]]:
    return {bucket: {} for bucket in BUCKETS}


class CommCounter(TorchDispatchMode):
    """Counts every collective while entered (``with counter:``); ``bucket`` says where."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = _empty()  # bucket -> kind -> {"count", "bytes", "bus_bytes"}
        # process group name -> (its ranks, the kinds it carried), every bucket: each group is
        # its own NCCL communicator (plan/run.py prices their buffers)
        self.groups: dict[str, tuple[int, set[str]]] = {}
        self._bucket_stack = ["other"]

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """Let torch.compile compile while counting (by default dynamo skips every frame
        under a dispatch mode, which would silently run model.compile=true eagerly); the
        compiled code's collectives still dispatch through this mode at run time."""
        return True

    @property
    def bucket(self) -> str:
        return self._bucket_stack[-1]

    @contextmanager
    def in_bucket(self, bucket: str) -> Iterator[None]:
        """Calls made inside land in ``bucket`` (nested: the innermost wins)."""
        if bucket not in BUCKETS:
            raise ValueError(f"comm bucket {bucket!r} is not one of {BUCKETS}")
        self._bucket_stack.append(bucket)
        try:
            yield
        finally:
            self._bucket_stack.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        if func.namespace in NAMESPACES:
            self._count(func, args)
        return func(*args, **kwargs)

    def _count(self, func: Any, args: tuple) -> None:
        name = func._schema.name.split("::", 1)[1]
        entry = _OPS.get(name)
        if entry is None:
            return  # wait_tensor and other bookkeeping ops move no data
        kind, arg_index = entry
        group = _process_group(func.namespace, args)
        n, rank = (group.size(), group.rank()) if group is not None else (1, 0)
        if group is not None:
            self.groups.setdefault(group.group_name, (n, set()))[1].add(kind)
        size = _tensor_bytes(args[arg_index]) if arg_index >= 0 else 0
        if func.namespace == "_c10d_functional" and name in _FUNCTIONAL_GATHERS:
            size *= n  # the functional all-gather's argument is this rank's input
        kept = _kept_chunk_bytes(name, args, n, rank) if kind == "all_to_all" and n > 1 else None
        bus_bytes = size - kept if kept is not None else size * bus_factor(kind, n)
        self.add(kind, size, bus_bytes)

    def add(self, kind: str, nbytes: int, bus_bytes: float) -> None:
        totals = self.counts[self.bucket].setdefault(kind, {"count": 0, "bytes": 0, "bus_bytes": 0.0, "messages": {}})
        totals["count"] += 1
        totals["bytes"] += nbytes
        totals["bus_bytes"] += bus_bytes
        key = message_key(nbytes, bus_bytes / nbytes if nbytes else 0.0)
        totals["messages"][key] = totals["messages"].get(key, 0) + 1

    def record(self, measured_steps: int) -> dict:
        """The rank record's ``comm`` block: per bucket, kind -> count/bytes/bus_bytes/messages;
        ``per_step`` is the measured steps' total divided by their number."""
        per_step: Optional[dict] = None
        if measured_steps:
            per_step = {
                kind: {key: _per_step(value, measured_steps) for key, value in totals.items()}
                for kind, totals in self.counts["step"].items()
            }
        return {
            "bytes_definition": BYTES_DEFINITION,
            "measured_steps": measured_steps,
            "per_step": per_step,
            "groups": {
                name: {"ranks": ranks, "kinds": sorted(kinds)} for name, (ranks, kinds) in sorted(self.groups.items())
            },
            **{
                bucket: {
                    kind: {key: dict(v) if isinstance(v, dict) else v for key, v in t.items()}
                    for kind, t in kinds.items()
                }
                for bucket, kinds in self.counts.items()
            },
        }


def _per_step(total: Any, steps: int) -> Any:
    """total / steps, an int where it divides (every measured step does the same calls); a
    dict (``messages``) divided value by value."""
    if isinstance(total, dict):
        return {key: _per_step(value, steps) for key, value in total.items()}
    return total // steps if isinstance(total, int) and total % steps == 0 else total / steps
