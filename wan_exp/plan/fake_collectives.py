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

All-gathers: the fake group writes this rank's input into every rank's chunk, so FSDP's
gathered weights were this rank's rows repeated N times (and simulated FSDP ranks came out
1-4 % faster than one GPU doing the same work). The mode gives every other rank's chunk
values drawn from a normal distribution with the mean and standard deviation of this rank's
chunk (its own generator, seeded, so the job's random stream is untouched): data of the right
statistics, not the same block again. This rank's chunk keeps its own input. One RNG fill per
call, in the rank's compute time.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from wan_exp.metrics.comm import group_of

GATHER_FILL_SEED = 20261205  # the other ranks' chunks of an all-gather are drawn from this seed
ALL_GATHERS = (
    "_allgather_base_",
    "allgather_",
    "allgather_into_tensor_coalesced_",
    "all_gather_into_tensor",
    "all_gather_into_tensor_out",
    "all_gather_into_tensor_coalesced",
)


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


def fill_like(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator) -> None:
    """Fill ``target`` with values drawn from a normal distribution of ``source``'s mean and
    standard deviation (floating dtypes; others take ``source``'s elements, as fill_from)."""
    if target.numel() == 0 or source.numel() == 0:
        return
    if not source.is_floating_point():
        fill_from(target, source)
        return
    stats = source.detach().float()
    mean = float(stats.mean())
    std = float(stats.std()) if stats.numel() > 1 else 0.0
    target.normal_(mean, std, generator=generator)


class RealisticFakeCollectives(TorchDispatchMode):
    """While entered, the collectives that the fake process group leaves unwritten get this
    rank's own data (see the module's docstring). Only for a process on the fake backend: on a
    real one it would overwrite what the collective delivered."""

    def __init__(self) -> None:
        super().__init__()
        # weak: holding a sent block would keep it alive and add to the peak being measured
        self._last_sent: dict[tuple, weakref.ref] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(GATHER_FILL_SEED)
        return self._generators[device]

    def fill_gathered(self, output: torch.Tensor, source: torch.Tensor, rank: int, n: int) -> None:
        """An all-gather's ``output`` (n chunks of ``source``'s size, in rank order): every chunk
        but this rank's drawn with ``source``'s statistics; this rank's chunk is ``source``."""
        chunk = source.numel()
        if n <= 1 or chunk == 0 or output.numel() != n * chunk:
            return
        flat = (
            output.view(-1)
            if output.is_contiguous()
            else torch.empty(output.numel(), dtype=output.dtype, device=output.device)
        )
        generator = self._generator(flat.device)
        for index in range(n):
            if index != rank:
                fill_like(flat[index * chunk : (index + 1) * chunk], source, generator)
        fill_from(flat[rank * chunk : (rank + 1) * chunk], source)
        if not output.is_contiguous():  # a strided output: filled through a copy
            output.copy_(flat.view(output.shape))

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """As the comm counter: compiled code still compiles, its collectives pass through here."""
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        result = func(*args, **(kwargs or {}))
        if func.namespace in ("c10d", "_c10d_functional"):
            name = func._schema.name.split("::", 1)[1]
            if func.namespace == "c10d":
                self._fill_c10d(name, args)
            else:
                self._fill_functional(name, args, kwargs or {}, result)
            self._fill_gathers(name, func.namespace, args, kwargs or {}, result)
        return result

    def _fill_gathers(self, name: str, namespace: str, args: tuple, kwargs: dict, result: Any) -> None:
        """All-gathers, by schema position: c10d (outputs, inputs, group), functional (input,
        group_size, group_name) returning the output (or writing ``out=``)."""
        if name not in ALL_GATHERS:
            return
        n, rank = group_of(namespace, args)
        if name == "_allgather_base_":
            self.fill_gathered(args[0], args[1], rank, n)
        elif name == "allgather_":  # ([[chunk per rank]], [input])
            for chunks, source in zip(args[0], args[1]):
                generator = self._generator(source.device)
                for index, chunk in enumerate(chunks):
                    if index == rank:
                        fill_from(chunk, source)
                    else:
                        fill_like(chunk, source, generator)
        elif name == "allgather_into_tensor_coalesced_":
            for output, source in zip(args[0], args[1]):
                self.fill_gathered(output, source, rank, n)
        elif name == "all_gather_into_tensor" and isinstance(result, torch.Tensor):
            self.fill_gathered(result, args[0], rank, n)
        elif name == "all_gather_into_tensor_out" and isinstance(kwargs.get("out"), torch.Tensor):
            self.fill_gathered(kwargs["out"], args[0], rank, n)
        elif name == "all_gather_into_tensor_coalesced" and isinstance(result, (list, tuple)):
            for output, source in zip(result, args[0]):
                self.fill_gathered(output, source, rank, n)

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
