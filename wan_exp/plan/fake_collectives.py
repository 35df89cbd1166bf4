"""Realistic data out of torch's fake process group, so a simulated rank computes at its real speed.

The fake process group (``launcher.simulate_world_size``) copies its input into every chunk of an
all-gather's output, and leaves an all-reduce's or a broadcast's tensor as it is; in torch 2.11 it
never writes the output of an all-to-all, a reduce-scatter or a receive (2.13 copies the input for
the first two, not for a receive): those buffers keep whatever ``torch.empty`` gave them (zeros or
another tensor's stale bytes). After Ulysses' all-to-alls the whole attention and everything after
it then ran on such data, and a GPU runs its matrix products faster on zeros than on real
activations (less power drawn, higher clocks): on an H200 the simulated Ulysses ranks' compute
per step came out 15-20 % shorter than with real-looking data.

:class:`RealisticFakeCollectives` fills those outputs from this rank's own input (an all-to-all
with equal splits moves exactly as many elements as it receives; a reduce-scatter's output is
taken from the start of its input; a receive gets the tensor this rank last sent of the same
shape, as in a ring). The values are still not the real job's, but they are activations of the
right size and spread. The cost is one device copy per call, in the rank's compute time (about
the local memory traffic the real collective has), and a few microseconds of host time per op
for a second dispatch mode. Not filled: a broadcast's tensor on a rank that is not its source
(there is no source data in this process; only ``launcher.simulate_rank`` other than 0 meets it).
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def fill_from(target: torch.Tensor, source: torch.Tensor) -> None:
    """Fill ``target`` with ``source``'s elements in order (repeated if ``target`` is larger,
    cut if smaller), in ``target``'s dtype."""
    if target.numel() == 0 or source.numel() == 0:
        return
    flat_source = source.detach().reshape(-1)
    repeats = -(-target.numel() // flat_source.numel())
    if repeats > 1:
        flat_source = flat_source.repeat(repeats)
    flat_source = flat_source[: target.numel()]
    if target.is_contiguous():
        target.view(-1).copy_(flat_source)
    else:
        target.copy_(flat_source.view(target.shape))


class RealisticFakeCollectives(TorchDispatchMode):
    """While entered, the collectives that the fake process group leaves unwritten get this
    rank's own data (see the module's docstring). Only for a process on the fake backend: on a
    real one it would overwrite what the collective delivered."""

    def __init__(self) -> None:
        super().__init__()
        # weak: holding a sent block would keep it alive and add to the peak being measured
        self._last_sent: dict[tuple, weakref.ref] = {}

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """As the comm counter: compiled code still compiles, its collectives pass through here."""
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        result = func(*args, **(kwargs or {}))
        if func.namespace == "c10d":
            self._fill_c10d(func._schema.name.split("::", 1)[1], args)
        elif func.namespace == "_c10d_functional":
            self._fill_functional(func._schema.name.split("::", 1)[1], args, kwargs or {}, result)
        return result

    def _fill_c10d(self, name: str, args: tuple) -> None:
        if name in ("alltoall_base_", "_reduce_scatter_base_"):  # (output, input, ...)
            fill_from(args[0], args[1])
        elif name in ("alltoall_", "reduce_scatter_tensor_coalesced_"):  # (outputs, inputs, ...)
            for output, source in zip(args[0], args[1]):
                fill_from(output, source)
        elif name == "reduce_scatter_":  # (outputs, [inputs per output], ...)
            for output, sources in zip(args[0], args[1]):
                fill_from(output, sources[0])
        elif name == "send":  # (tensors, ...)
            for tensor in args[0]:
                self._last_sent[_shape_key(tensor)] = weakref.ref(tensor)
        elif name in ("recv_", "recv_any_source_"):  # (tensors, ...)
            for tensor in args[0]:
                sent_ref = self._last_sent.get(_shape_key(tensor))
                sent = sent_ref() if sent_ref is not None else None
                if sent is not None:
                    fill_from(tensor, sent)

    @staticmethod
    def _fill_functional(name: str, args: tuple, kwargs: dict, result: Any) -> None:
        # DTensor / compiled code: the functional ops return a new (unwritten) output
        if name in ("all_to_all_single", "reduce_scatter_tensor") and isinstance(result, torch.Tensor):
            fill_from(result, args[0])
        elif name == "reduce_scatter_tensor_out" and isinstance(kwargs.get("out"), torch.Tensor):
            fill_from(kwargs["out"], args[0])
        elif name == "reduce_scatter_tensor_coalesced" and isinstance(result, (list, tuple)):
            for output, source in zip(result, args[0]):
                fill_from(output, source)


def _shape_key(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tensor.dtype, tensor.device
