"""Before launch: refuse a job whose weights alone cannot fit in host or GPU memory.

Without this check, ``model=s2v_14b`` on a small machine starts its ranks, which load for
minutes and are then ended by the kernel's OOM killer (or CUDA runs out of memory). The
weights are a lower bound of what a rank needs (activations, the CUDA context and NCCL
buffers come on top), so a job refused here could never have run.

Where the weights live, by the split's degrees (wan_exp/parallel/registry.py):
- no FSDP (``parallel.fsdp.degree=0``: ``single``, ``ulysses``, ``cfg``, ``usp``, ``cfg_ulysses``):
  the whole DiT on every rank's device;
- FSDP with shard-only loading (``fsdp_fixed``, ``hybrid``): 1/(ranks sharing one copy) of the
  DiT per rank, read straight to the device;
- FSDP with ``parallel.fsdp.load_full_on_every_rank`` (upstream, ``fsdp``): every rank first
  loads the whole DiT into host memory, then FSDP moves its shard to the device;
- ``workload=upstream`` (the public generate.py, whatever the split): its S2V pipeline builds
  the DiT in host memory on every rank when ``--dit_fsdp`` is given (``from_pretrained``
  without a device map, then ``shard_model``; the fsdp_fixed patch changes only the broadcast)
  and always builds the whole T5 encoder in host memory before it is sharded or moved;
- the text and audio encoders: whole, on the device or the host as
  ``parallel.*_encoder_placement`` says; wav2vec2 always in fp32.
On a machine without GPUs the device is the host. Host memory is per node
(``nproc_per_node`` ranks share it); it is compared with psutil's available memory, GPU
memory with NVML's free memory of each GPU the node's ranks use.

Parameter counts come from the config's shapes (``models/sizes.py``: a formula per layer,
checked against the built models by the tests), so this check builds no model and imports
no torch.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from wan_exp.config import ConfigError, Placement, WorkloadName
from wan_exp.devices import read_nvml, visible_gpu_count, visible_gpus
from wan_exp.models.sizes import (
    audio_encoder_parameters,
    dit_parameters,
    text_encoder_parameters,
)
from wan_exp.parallel.dims import fsdp_shards, parallel_dims
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


def model_weights(model_cfg: Any) -> tuple[Weights, Weights, Weights | None]:
    """(DiT, text encoder, audio encoder or None) as the ranks load them: the DiT and the text
    encoder at model.dtype, wav2vec2 always in fp32 (as upstream runs it)."""
    dit, text, audio = (
        dit_parameters(model_cfg),
        text_encoder_parameters(model_cfg),
        audio_encoder_parameters(model_cfg),
    )
    size = DTYPE_BYTES[getattr(model_cfg.dtype, "value", model_cfg.dtype)]
    return (
        Weights("DiT", dit, dit * size),
        Weights("text encoder", text, text * size),
        Weights("audio encoder", audio, audio * DTYPE_BYTES["fp32"]) if audio else None,
    )


def gpu_free_bytes(count: int) -> list[int] | None:
    """NVML's free memory (total - used) of the first `count` GPUs CUDA would give the ranks,
    as wan_exp.devices reads them (CUDA_VISIBLE_DEVICES by index or UUID); None when NVML cannot
    tell (no driver) or names fewer GPUs (MIG slices: NVML's figures are per parent GPU)."""
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
    dims = parallel_dims(cfg, world_size)
    sharded = dims.fsdp_enabled
    share = dims.fsdp_shard_ranks  # ranks sharing one copy of the DiT
    upstream = cfg.workload.name == WorkloadName.upstream
    full_load = sharded and (bool(par.fsdp.load_full_on_every_rank) or upstream)
    on_device: list[tuple[Weights, int]] = [(dit, share)]
    on_host: list[tuple[Weights, int]] = [(dit, 1)] if full_load else []
    for encoder, placement in ((text, par.text_encoder_placement), (audio, par.audio_encoder_placement)):
        if encoder is not None:
            (on_device if placement == Placement.device else on_host).append((encoder, 1))
    if upstream and (text, 1) not in on_host:  # its T5 is built whole on the host first, then moved
        on_host.append((text, 1))
    if not gpus:  # the device is the host; a full load replaces the rank's DiT shard at its peak
        rest = [p for p in on_host + on_device if p[0] is not dit]
        on_host = ([(dit, 1)] if full_load else [(dit, share)]) + list(dict.fromkeys(rest))  # each part once
        on_device = []

    strategy = f"parallel={par.name}"
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
        f"({ranks_per_gpu} per GPU) each GPU holds {_listing([w.describe(s) for w, s in on_device])}: "
        f"{_size(device_need)} for the "
        f"weights alone, but the fullest GPU has {_size(min(free))} free (NVML); "
        f"{_hint(cfg, full_load, False, encoders_on_gpu=any(w is not dit for w, _ in on_device))}"
    )


# ----------------------------------------------------------------------------- the audio encoder
# wav2vec2 (models/encoders.py) encodes the whole audio file in one forward, in fp32, on the
# host or device of parallel.audio_encoder_placement: its memory grows with the file's length.
# Per 16 kHz sample, at its peak: the waveform read, resampled and normalised (4 fp32 copies);
# the first feature-extractor conv (512 channels at 1/5 of the rate): its output, the transposed
# copy its layer norm reads, the norm's output and the GELU's (4 copies); every hidden state
# (layers + 1, at 1/320 of the rate) kept, stacked, then interpolated and picked per video frame
# (4 copies). Measured on the tiny model, 20 s of audio: 452 MiB of peak RSS, estimate 506 MiB.
FP32_BYTES = 4
WAVEFORM_COPIES = 4
CONV_CHANNELS, CONV_STRIDE, CONV_COPIES = 512, 5, 4  # transformers' Wav2Vec2Config defaults
SAMPLES_PER_STATE, STATE_COPIES = 320, 4


def audio_encode_bytes(model_cfg: Any, samples: int) -> int:
    """Peak bytes of encoding ``samples`` samples of 16 kHz audio with the model's wav2vec2."""
    ae = model_cfg.audio_encoder
    per_sample = (
        WAVEFORM_COPIES
        + CONV_COPIES * CONV_CHANNELS / CONV_STRIDE
        + STATE_COPIES * (ae.num_hidden_layers + 1) * ae.hidden_size / SAMPLES_PER_STATE
    )
    return int(samples * per_sample * FP32_BYTES)


def available_host_bytes() -> int:
    """Host memory a rank can use: psutil's available memory, or less under a per-process
    address-space limit (ulimit -v, RLIMIT_AS) or a cgroup's memory.max (containers, Slurm)."""
    limits = [psutil.virtual_memory().available]
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    try:
        cgroup_max = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cgroup_max != "max":
            limits.append(int(cgroup_max) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(0, min(limits))


def check_audio_fits(cfg: Any, path: str, samples: int, sample_rate: int, ranks_here: int) -> None:
    """ConfigError when wav2vec2 over the whole file cannot fit in host memory (the encoder on
    the host, or no GPU), naming the file, its length and workload.clips."""
    on_host = cfg.parallel.audio_encoder_placement != Placement.device or not visible_gpu_count()
    if not on_host:
        return
    need = ranks_here * audio_encode_bytes(cfg.model, samples)
    available = available_host_bytes()
    if need <= available:
        return
    wl = cfg.workload
    seconds = samples / sample_rate
    used = (
        "every clip the audio gives"
        if wl.clips == -1
        else f"only its first {wl.clips * wl.frames_per_clip / wl.fps:g} s"
    )
    raise ConfigError(
        f"workload.audio_path={path!r} is {seconds:.0f} s long: wav2vec2 encodes the whole file at once, "
        f"which needs about {_size(need)} of host memory ({ranks_here} rank(s) on this host, "
        f"{_size(need // ranks_here)} each), but {_size(available)} is available; workload.clips={wl.clips} "
        f"uses {used}: cut the file to what the clips need (e.g. ffmpeg -i in.wav -t SECONDS out.wav), "
        "or use fewer ranks per host or a machine with more memory"
    )


def _hint(cfg: Any, full_load: bool, fewer_ranks: bool, encoders_on_gpu: bool = False) -> str:
    """What would make the job fit, among the settings that apply to it."""
    options = []
    if not fsdp_shards(cfg.parallel.fsdp.degree) or full_load:
        options.append(
            "a strategy that shards the DiT over the ranks without a full load (parallel=fsdp_fixed or parallel=hybrid)"
        )
    elif fewer_ranks is False:
        options.append("more ranks to shard over (launcher.nproc_per_node, launcher.nnodes)")
    if fewer_ranks:
        options.append("fewer ranks per node (launcher.nproc_per_node)")
    if encoders_on_gpu:
        options.append("the text encoder on the CPU (parallel.text_encoder_placement=cpu)")
    options.append(
        "a machine with more memory"
        if cfg.model.name == "tiny"
        else "a smaller model (model=tiny) or a machine with more memory"
    )
    return "use " + " or ".join(options)
