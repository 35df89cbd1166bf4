"""Bytes of the CPU tensors a rank holds, and their peak: the CPU's counterpart of the CUDA
allocator's ``max_memory_allocated``.

On the CPU the harness otherwise has only the process's host RSS, which holds the Python
runtime, torch's libraries, malloc's arenas and gloo's buffers besides the tensors: on the tiny
model (about 33 MiB of tensors in about 600 MiB of RSS) jobs of the same settings peaked 575 to
675 MiB (docs/facts.md, CPU). :class:`TensorMemory` counts what the job's own code allocates instead:
it is a ``TorchDispatchMode`` that sees every tensor an ATen op returns (factories such as
``torch.empty`` included) and adds the bytes of each CPU storage it has not seen, until
the storage is freed (a weak reference's callback; torch keeps one Python object per storage
for as long as the storage lives). ``UntypedStorage.resize_`` (FSDP1 and FSDP2 free and
re-allocate their gathered parameters with it) does not pass the dispatcher and is counted by wrapping it
while the mode is entered.

Not counted: memory an ATen kernel takes for itself and frees before it returns (oneDNN's
scratch space, a gloo transfer's staging), tensors made from foreign memory
(``torch.from_numpy``, ``torch.frombuffer``: not allocated by torch) and storages that existed
before the mode was entered. Under torch's DTensor the mode lets DTensor turn each op into its
local ops first and counts those (a DTensor's storage is its local tensor's).
"""

from __future__ import annotations

import weakref
from functools import wraps
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    is_traceable_wrapper_subclass,
    is_traceable_wrapper_subclass_type,
)
from torch.utils._pytree import tree_leaves


def _storages(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages behind ``tensor`` (a wrapper subclass's inner tensors' storages)."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [s for name in names for s in _storages(getattr(tensor, name))]
    if tensor.is_sparse:
        return []
    return [tensor.untyped_storage()]


class TensorMemory(TorchDispatchMode):
    """While entered: ``live_bytes`` of the storages on ``device_type`` the ops made, and
    ``peak_bytes``, their high-water mark since the last ``reset_peak``. On ``"meta"`` it counts
    what a run would allocate without computing it (bench/vae_live_bytes.py)."""

    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        self.device_type = device_type
        self.live_bytes = 0
        self.peak_bytes = 0
        self._sizes: dict[int, int] = {}  # storage (its C++ address) -> bytes counted
        self._refs: dict[int, weakref.ref] = {}  # the callbacks that uncount them
        self._resize: Callable[..., Any] | None = None

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """As the comm counter: compiled code still compiles, its ops' outputs are counted."""
        return True

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def _count(self, storage: torch.UntypedStorage) -> None:
        if storage.device.type != self.device_type:
            return
        key = storage._cdata
        nbytes = storage.nbytes()
        counted = self._sizes.get(key)
        if counted is None:
            self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._freed(key))
        elif counted == nbytes:
            return
        self._sizes[key] = nbytes
        self.live_bytes += nbytes - (counted or 0)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _freed(self, key: int) -> None:
        self.live_bytes -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def __enter__(self) -> TensorMemory:
        original = torch.UntypedStorage.resize_
        self._resize = original

        @wraps(original)
        def resize_(storage: torch.UntypedStorage, size: int) -> Any:
            result = original(storage, size)
            if storage._cdata in self._sizes or size:
                self._count(storage)
            return result

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._resize is not None:
            torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]
            self._resize = None
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        if any(is_traceable_wrapper_subclass_type(t) for t in types):
            return NotImplemented  # a DTensor: counted as the local ops it becomes
        result = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(result):
            if isinstance(leaf, torch.Tensor):
                for storage in _storages(leaf):
                    self._count(storage)
        return result
