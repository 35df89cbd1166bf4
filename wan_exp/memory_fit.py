"""Before launch: refuse a job whose weights alone cannot fit in host or GPU memory.

Without this check, ``model=s2v_14b`` on a small machine starts its ranks, which load for
minutes and are then ended by the kernel's OOM killer (or CUDA runs out of memory). The
weights are a lower bound of what a rank needs (activations, the CUDA context and NCCL
buffers come on top), so a job refused here could never have run.

Where the weights live, per strategy (wan_exp/parallel/registry.py):
- no FSDP (``single``, ``ulysses``, ``cfg``, ``usp``, ``cfg_ulysses``): the whole DiT on every
  rank's device;
- ``fsdp_fixed``, ``hybrid``: 1/(ranks sharing one copy) of the DiT per rank, read straight to the
  device;
- ``fsdp`` (upstream, ``parallel.fsdp.load_full_on_every_rank``): every rank first loads the
  whole DiT into host memory, then FSDP moves its shard to the device;
- the text and audio encoders: whole, on the device or the host as
  ``parallel.*_encoder_placement`` says; wav2vec2 always in fp32.
On a machine without GPUs the device is the host. Host memory is per node
(``nproc_per_node`` ranks share it); it is compared with psutil's available memory, GPU
memory with NVML's free memory of each GPU the node's ranks use.

Parameter counts come from the models themselves, built on the meta device (no memory),
once per model config: importing torch and transformers and building them takes seconds, so
the counts are kept in ``$XDG_CACHE_HOME/wan-exp/parameter_counts.json`` (default
``~/.cache``), keyed by the model config and the model code, and later launches read them
from there. torch and transformers are imported only for a count not yet kept, so importing
this module keeps the launcher light.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import psutil
from omegaconf import OmegaConf

from wan_exp.config import ConfigError, Placement, Strategy, parallel_dims
from wan_exp.results import write_json_atomic
from wan_exp.units import GIB

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Weights:
    """One model part's parameters."""

    name: str
    parameters: int
    bytes: int

    def describe(self, share: int = 1) -> str:
        part = "" if share == 1 else f"1/{share} of "
        count = f"{self.parameters / 1e9:.2f}e9" if self.parameters >= 1e8 else f"{self.parameters:,}"
        return f"{part}the {self.name} ({count} parameters, {_size(self.bytes // share)})"


def _size(n_bytes: int) -> str:
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB // 10 else f"{n_bytes / 2**20:.1f} MiB"


# the code that decides the parameter counts: a change to it makes the kept counts stale
_MODEL_SOURCES = ("models/wan_s2v.py", "models/encoders.py", "config.py", "memory_fit.py")


def counts_cache_path() -> Path:
    """Where the parameter counts are kept between launches."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "wan-exp" / "parameter_counts.json"


def _counts_key(model_yaml: str) -> str:
    from importlib.metadata import version

    digest = hashlib.sha256(model_yaml.encode())
    package = Path(__file__).resolve().parent
    for relative in _MODEL_SOURCES:
        digest.update((package / relative).read_bytes())
    digest.update(version("transformers").encode())  # the encoders' classes are transformers'
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _parameter_counts(model_yaml: str) -> tuple[int, int, int]:
    """(DiT, text encoder, audio encoder) parameter counts of a model config: kept ones when
    the config and the model code are unchanged, else counted (``count_parameters``) and kept.
    A cache that cannot be read or written only costs the count."""
    path, key = counts_cache_path(), _counts_key(model_yaml)
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        kept = {}
    entry = kept.get(key) if isinstance(kept, dict) else None
    if isinstance(entry, list) and len(entry) == 3 and all(isinstance(n, int) for n in entry):
        return tuple(entry)  # type: ignore[return-value]
    counts = count_parameters(model_yaml)
    try:  # two launches writing at once: the file stays whole, the last writer's entries win
        write_json_atomic(path, {**(kept if isinstance(kept, dict) else {}), key: list(counts)})
    except OSError:
        pass  # a read-only home: count again next time
    return counts


def count_parameters(model_yaml: str) -> tuple[int, int, int]:
    """(DiT, text encoder, audio encoder) parameter counts, from the models built on the
    meta device (tied weights counted once); audio 0 without S2V."""
    import torch
    from transformers import UMT5EncoderModel, Wav2Vec2Model

    from wan_exp.config import ModelConfig
    from wan_exp.models.encoders import audio_encoder_config, text_encoder_config
    from wan_exp.models.wan_s2v import WanModel

    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.create(model_yaml))

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        dit = count(WanModel(model_cfg))
        text = count(UMT5EncoderModel(text_encoder_config(model_cfg)))
        audio = count(Wav2Vec2Model(audio_encoder_config(model_cfg))) if model_cfg.s2v else 0
    return dit, text, audio


def model_weights(model_cfg: Any) -> tuple[Weights, Weights, Optional[Weights]]:
    """(DiT, text encoder, audio encoder or None) as the ranks load them: the DiT and the text
    encoder at model.dtype, wav2vec2 always in fp32 (as upstream runs it)."""
    dit, text, audio = _parameter_counts(OmegaConf.to_yaml(model_cfg, resolve=True))
    size = DTYPE_BYTES[getattr(model_cfg.dtype, "value", model_cfg.dtype)]
    return (Weights("DiT", dit, dit * size), Weights("text encoder", text, text * size),
            Weights("audio encoder", audio, audio * DTYPE_BYTES["fp32"]) if audio else None)


def gpu_free_bytes(count: int) -> Optional[list[int]]:
    """NVML's free memory (total - used) of the first `count` GPUs CUDA would give the ranks,
    as wan_exp.devices reads them (CUDA_VISIBLE_DEVICES by index or UUID); None when NVML cannot
    tell (no driver) or names fewer GPUs (MIG slices: NVML's figures are per parent GPU)."""
    from wan_exp.devices import read_nvml, visible_gpus

    nvml = read_nvml()
    if nvml.error:
        return None
    visible, _ = visible_gpus(nvml.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if len(visible) < count:
        return None
    return [gpu.total_bytes - gpu.used_bytes for gpu in visible[:count]]


def _listing(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def check_memory_fits(cfg: Any, world_size: int, nproc_per_node: int, gpus: int) -> None:
    """Raise ConfigError, with the figures, if the job's weights alone exceed the host
    memory available (per node) or the free memory of a GPU (per rank)."""
    par = cfg.parallel
    dit, text, audio = model_weights(cfg.model)
    sharded = bool(par.fsdp.enabled)
    share = parallel_dims(cfg, world_size).fsdp_shard_ranks  # ranks sharing one copy of the DiT
    full_load = sharded and bool(par.fsdp.load_full_on_every_rank)
    on_device: list[tuple[Weights, int]] = [(dit, share)]
    on_host: list[tuple[Weights, int]] = [(dit, 1)] if full_load else []
    for encoder, placement in ((text, par.text_encoder_placement), (audio, par.audio_encoder_placement)):
        if encoder is not None:
            (on_device if placement == Placement.device else on_host).append((encoder, 1))
    if not gpus:  # the device is the host; a full load replaces the rank's DiT shard at its peak
        on_host = ([(dit, 1)] if full_load else [(dit, share)]) + [p for p in on_device + on_host if p[0] is not dit]
        on_device = []

    strategy = f"parallel={Strategy(par.name).value}"
    host_need = nproc_per_node * sum(w.bytes // s for w, s in on_host)
    available = psutil.virtual_memory().available
    if host_need > available:
        raise ConfigError(
            f"model={cfg.model.name} does not fit in host memory: with {strategy} each of the "
            f"{nproc_per_node} rank(s) on this node holds {_listing([w.describe(s) for w, s in on_host])} "
            f"in host memory: {_size(host_need)} for the weights alone, but "
            f"{_size(available)} is available; {_hint(cfg, full_load, nproc_per_node > 1)}"
        )
    if not on_device:
        return
    ranks_per_gpu = -(-nproc_per_node // gpus)  # launcher.share_gpus: ranks round robin on the GPUs
    device_need = ranks_per_gpu * sum(w.bytes // s for w, s in on_device)
    free = gpu_free_bytes(min(nproc_per_node, gpus))
    if not free or device_need <= min(free):
        return
    raise ConfigError(
        f"model={cfg.model.name} does not fit in GPU memory: with {strategy} on {world_size} rank(s) "
        f"({ranks_per_gpu} per GPU) each GPU holds {_listing([w.describe(s) for w, s in on_device])}: {_size(device_need)} for the "
        f"weights alone, but the fullest GPU has {_size(min(free))} free (NVML); "
        f"{_hint(cfg, full_load, False, encoders_on_gpu=any(w is not dit for w, _ in on_device))}"
    )


def _hint(cfg: Any, full_load: bool, fewer_ranks: bool, encoders_on_gpu: bool = False) -> str:
    """What would make the job fit, among the settings that apply to it."""
    options = []
    if not cfg.parallel.fsdp.enabled or full_load:
        options.append("a strategy that shards the DiT over the ranks without a full load "
                       "(parallel=fsdp_fixed or parallel=hybrid)")
    elif fewer_ranks is False:
        options.append("more ranks to shard over (launcher.nproc_per_node, launcher.nnodes)")
    if fewer_ranks:
        options.append("fewer ranks per node (launcher.nproc_per_node)")
    if encoders_on_gpu:
        options.append("the text encoder on the CPU (parallel.text_encoder_placement=cpu)")
    options.append("a machine with more memory" if cfg.model.name == "tiny"
                   else "a smaller model (model=tiny) or a machine with more memory")
    return "use " + " or ".join(options)
