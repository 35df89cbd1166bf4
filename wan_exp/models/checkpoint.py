"""Weight sources for the DiT: an official checkpoint folder, or deterministic random weights.

Both sources answer the same questions (``keys()``, ``shape(key)``, ``get(key, dtype, device,
rows)``), so a strategy materialises parameters the same way with or without a download, and
an FSDP rank can read just its rows of a parameter:

- ``CheckpointReader(folder)``: the official layout (``diffusion_pytorch_model-0000N-of-0000M
  .safetensors`` + ``diffusion_pytorch_model.safetensors.index.json``), memory-mapped through
  safetensors; ``get`` reads only the requested rows.
- ``RandomWeights(model_cfg, seed)``: each parameter drawn from a generator seeded by a hash of
  (seed, parameter name, block of rows), so a row slice equals the same rows of the full tensor
  on every rank, and the scales keep a bf16 14B forward finite.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from wan_exp.liveness import beat

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_FILE_NAME = "diffusion_pytorch_model.safetensors"
MAX_LISTED_KEYS = 20  # an error lists at most this many keys, then a count


class CheckpointError(RuntimeError):
    """A checkpoint folder, file or key does not match the model; the message names it."""


def shard_name(index: int, count: int) -> str:
    return f"diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"


def _row_range(rows: slice | None, length: int) -> tuple[int, int]:
    if rows is None:
        return 0, length
    start, stop, step = rows.indices(length)
    if step != 1:
        raise ValueError(f"rows={rows}: only contiguous row slices (step 1) are supported")
    return start, max(start, stop)


# ============================================================================ checkpoint folder
class CheckpointReader:
    """Sharded safetensors + index json, memory-mapped; tensors are read on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._weight_map = self._read_weight_map()
        self._handles: dict[str, Any] = {}

    def _read_weight_map(self) -> dict[str, str]:
        index = self.folder / INDEX_NAME
        if not index.exists():
            single = self.folder / SINGLE_FILE_NAME
            if single.exists():  # small models are saved unsharded
                return {key: SINGLE_FILE_NAME for key in self._open(SINGLE_FILE_NAME).keys()}
            raise CheckpointError(
                f"{index}: not found; model.checkpoint_dir must be a folder with the official "
                f"layout ({INDEX_NAME} + {shard_name(1, 4)}, ...)"
            )
        try:
            data = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{index}: unreadable or not valid JSON ({err})") from err
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: has no 'weight_map' object mapping tensor names to shard files")
        return weight_map

    def _open(self, filename: str) -> Any:
        if filename not in self._handles:
            path = self.folder / filename
            if not path.exists():
                raise CheckpointError(f"{path}: listed in {INDEX_NAME} but missing")
            try:
                self._handles[filename] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as err:  # safetensors raises its own error types
                raise CheckpointError(
                    f"{path}: not a readable safetensors file ({err}); it is corrupt or truncated, download it again"
                ) from err
        return self._handles[filename]

    def _slice(self, key: str) -> Any:
        if key not in self._weight_map:
            raise CheckpointError(f"{self.folder}: no tensor named {key!r} in the checkpoint")
        filename = self._weight_map[key]
        try:
            return self._open(filename).get_slice(key)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"{self.folder / filename}: cannot read {key!r} ({err})") from err

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def get(self, key: str, dtype: torch.dtype, device: torch.device | str, rows: slice | None = None) -> torch.Tensor:
        """The tensor (or its rows along dim 0), read from the memory map and converted."""
        beat(f"read {self._weight_map[key]}")  # the rank's heartbeat, per tensor of each shard
        tensor_slice = self._slice(key)
        start, stop = _row_range(rows, tensor_slice.get_shape()[0])
        try:
            tensor = tensor_slice[start:stop]
        except Exception as err:
            raise CheckpointError(
                f"{self.folder / self._weight_map[key]}: cannot read {key!r} ({err}); the file is corrupt or truncated"
            ) from err
        return tensor.to(device=device, dtype=dtype)


# ============================================================================ random weights
class RandomWeights:
    """Deterministic random parameters for a model config, generated on the asking device.

    Values depend on (seed, name, device type): the CPU and CUDA generators differ.
    """

    ROWS_PER_DRAW = 256  # rows drawn from one generator; a row slice draws only its blocks

    def __init__(self, model_cfg: Any, seed: int = 0):
        from wan_exp.models.wan_s2v import WanModel

        with torch.device("meta"):
            model = WanModel(model_cfg)
        self._shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
        self.seed = int(seed)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._shapes:
            raise CheckpointError(f"random weights: the model has no parameter named {key!r}")
        return self._shapes[key]

    @staticmethod
    def init_rule(key: str, shape: tuple[int, ...]) -> tuple[str, float]:
        """("const", value) or ("normal", std) for a parameter; one place decides the scales."""
        if len(shape) == 1:
            return ("const", 0.0) if key.endswith(".bias") else ("const", 1.0)  # biases, norm weights
        if key.endswith("casual_audio_encoder.weights"):
            return "const", 0.01  # equal layer weights, as upstream initialises them
        if key.endswith("modulation"):
            return "normal", shape[-1] ** -0.5
        return "normal", math.prod(shape[1:]) ** -0.5  # unit-variance outputs for unit inputs

    def _generator_seed(self, key: str, block: int) -> int:
        digest = hashlib.sha256(f"{self.seed}/{key}/{block}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)

    def get(self, key: str, dtype: torch.dtype, device: torch.device | str, rows: slice | None = None) -> torch.Tensor:
        beat("random weights")  # the rank's heartbeat (a 14B model takes minutes on a CPU)
        shape = self.shape(key)
        start, stop = _row_range(rows, shape[0])
        device = torch.device(device)
        kind, value = self.init_rule(key, shape)
        if kind == "const":
            return torch.full((stop - start, *shape[1:]), value, dtype=dtype, device=device)
        per = self.ROWS_PER_DRAW
        blocks = []
        for block in range(start // per, (stop + per - 1) // per):
            first, last = block * per, min((block + 1) * per, shape[0])
            generator = torch.Generator(device).manual_seed(self._generator_seed(key, block))
            drawn = torch.randn((last - first, *shape[1:]), generator=generator, device=device)
            blocks.append(drawn[max(start, first) - first : min(stop, last) - first])
        if not blocks:
            return torch.empty((0, *shape[1:]), dtype=dtype, device=device)
        return (torch.cat(blocks) * value).to(dtype)


def open_weights(model_cfg: Any) -> CheckpointReader | RandomWeights:
    """The official folder when ``model.checkpoint_dir`` is set, random weights otherwise."""
    if model_cfg.checkpoint_dir:
        return CheckpointReader(model_cfg.checkpoint_dir)
    return RandomWeights(model_cfg, model_cfg.seed)


# ============================================================================ load / write
def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = len(keys) - MAX_LISTED_KEYS
    return shown + (f" ... and {more} more" if more > 0 else "")


def check_compatible(module: nn.Module, source: Any) -> None:
    """Raise CheckpointError listing missing/unexpected keys, or naming a wrong shape."""
    expected = {key: tuple(t.shape) for key, t in module.state_dict().items()}
    available = set(source.keys())
    missing = sorted(set(expected) - available)
    unexpected = sorted(available - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (in the model, not in the weights): {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (in the weights, not in the model): {_listed(unexpected)}")
    if problems:
        raise CheckpointError("weights do not match the model: " + "; ".join(problems))
    for key, shape in expected.items():
        found = tuple(source.shape(key))
        if found != shape:
            raise CheckpointError(f"{key}: the weights have shape {found}, the model expects {shape}")


def load_into(module: nn.Module, source: Any, dtype: torch.dtype, device: torch.device | str) -> None:
    """Give every parameter of ``module`` (meta or not) its full value from ``source``.

    All keys and shapes are checked before anything is read; the module's tensors are replaced
    by the loaded ones (no second copy)."""
    check_compatible(module, source)
    state = {key: source.get(key, dtype, device) for key in module.state_dict()}
    module.load_state_dict(state, strict=True, assign=True)


def write_checkpoint(
    state_dict: Mapping[str, torch.Tensor], folder: str | Path, shards: int = 4, config: Mapping[str, Any] | None = None
) -> Path:
    """Write ``state_dict`` in the official layout: shards of about equal size, the index json
    and config.json (``config`` or {}). Returns the folder."""
    sizes = {key: t.numel() * t.element_size() for key, t in state_dict.items()}
    return write_sharded(sizes, state_dict.__getitem__, folder, shards, config)


def write_sharded(
    sizes: Mapping[str, int],
    tensor_of: Callable[[str], torch.Tensor],
    folder: str | Path,
    shards: int = 4,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """The official layout from ``sizes`` (key -> bytes, in order) and ``tensor_of(key)``, which is
    called for one shard's keys at a time, so a model larger than memory can be written shard
    by shard (random weights: wan_exp.checkpoint)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(sizes)
    shards = max(1, min(shards, len(keys)))
    cumulative = list(itertools.accumulate(sizes[k] for k in keys))
    total = cumulative[-1] if cumulative else 0
    # contiguous groups of about total/shards bytes each, none of them empty
    bounds = [0]
    for j in range(1, shards):
        end = bisect.bisect_left(cumulative, total * j / shards) + 1
        bounds.append(min(max(end, bounds[-1] + 1), len(keys) - (shards - j)))
    bounds.append(len(keys))
    groups = [keys[a:b] for a, b in zip(bounds, bounds[1:])]
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        name = shard_name(i, shards)
        tensors = {k: tensor_of(k).detach().to("cpu").contiguous() for k in group}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
        weight_map.update({k: name for k in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(dict(config or {}), indent=2))
    return folder
