"""Structured configs: the schema of the one config object that drives a wan-exp job.

Every Hydra config group under ``conf/`` is validated against a dataclass here, so a
typo, a wrong type or an unknown option fails while Hydra composes the config, before
any process starts. This module is the schema only: enums, dataclasses, composition
(:func:`compose_config`, :func:`typed_config`) and pure helpers that read one setting
(:func:`parse_size`, :func:`steps_run`, :func:`signal_number`, :func:`tokenizer_dir`). It
imports nothing of wan_exp, so every module may import it. The rules that tie fields
together, or a field to the machine, live one level up in ``wan_exp.preflight``
(``check_job``); the degrees of a split in ``wan_exp.parallel.dims``; the sizes derived
from the config (pixels, latents, tokens) in ``wan_exp.geometry``.

No torch import, so the launcher process can use it freely.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore


class ConfigError(ValueError):
    """A setting is out of range or inconsistent with another; the message names it."""


# --------------------------------------------------------------------------- enums
class ConfigEnum(str, Enum):
    """A choice that prints as its name: paths, tables and logs show ``every_rank``, not
    ``VaePlacement.every_rank`` (e.g. ``hydra.sweep.subdir=${workload.name}``)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class FsdpApi(ConfigEnum):
    fsdp1 = "fsdp1"
    fsdp2 = "fsdp2"


class DType(ConfigEnum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class AttentionBackend(ConfigEnum):
    auto = "auto"
    flash_attn = "flash_attn"  # flash-attn 2 API
    fa3 = "fa3"
    fa4 = "fa4"
    sdpa = "sdpa"  # let PyTorch choose among its SDPA kernels
    sdpa_cudnn = "sdpa_cudnn"
    sdpa_flash = "sdpa_flash"
    sdpa_efficient = "sdpa_efficient"
    sdpa_math = "sdpa_math"


class Precision(ConfigEnum):
    """model.precision: the arithmetic of the DiT's linear layers and attention
    (wan_exp/precision_support.py says what each needs; docs/precision.md)."""

    bf16 = "bf16"  # the model's dtype throughout (model.dtype)
    fp8_linear = "fp8_linear"  # the blocks' linear layers in FP8, row-wise scales (torchao)
    int8_attention = "int8_attention"  # 8-bit attention: INT8 Q.K, 16-bit P.V (SageAttention)
    fp8_attention = "fp8_attention"  # 8-bit attention with FP8 P.V (SageAttention 2, FA3)
    fp8 = "fp8"  # fp8_linear and fp8_attention


class Placement(ConfigEnum):
    """Where an encoder runs: on the rank's device or on the host CPU."""

    device = "device"
    cpu = "cpu"


class WorkloadName(ConfigEnum):
    generate = "generate"
    init = "init"
    train_lora = "train_lora"
    upstream = "upstream"  # the public Wan2.2 generate.py under the launcher (wan_exp/upstream/)


class VaePlacement(ConfigEnum):
    """Where each clip's VAE decode runs (docs/pipeline.md, "Where the decode runs")."""

    every_rank = "every_rank"  # every rank decodes the whole clip (upstream S2V)
    rank0 = "rank0"  # rank 0 decodes and broadcasts the motion latents (upstream T2V)
    tiled = "tiled"  # every rank decodes the whole clip in spatial tiles, one after another
    sharded = "sharded"  # the tiles are spread over the ranks and gathered


class SamplerName(ConfigEnum):
    unipc = "unipc"  # upstream S2V's default: flow-matching UniPC multistep
    euler = "euler"


class LoggerMode(ConfigEnum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


# The phases a rank passes through, in order (docs/architecture.md); fault.phase names one.
PHASES = ("process_group", "build", "load", "wrap", "first_step", "step")
STEP_PHASES = ("first_step", "step")  # phases only workloads that run DiT steps pass through
# the generate workload's stages, in pipeline order (MetricsCollector.stage); fault.phase may name one
PIPELINE_STAGES = (
    "text_encode",
    "audio_encode",
    "reference_encode",
    "motion_encode",
    "denoise",
    "vae_decode",
    "drift_check",  # workload.drift_check's bf16 clip (models/precision.py), outside the clip's time
    "video_write",
)

# Functional form because "raise" is a keyword; OmegaConf matches members by name.
FaultKind = ConfigEnum("FaultKind", {k: k for k in ("none", "raise", "hang", "sleep", "signal", "oom", "slow")})


# --------------------------------------------------------------------------- model
@dataclass
class TextEncoderConfig:
    """umT5 encoder (transformers UMT5EncoderModel) dimensions."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_ff: int = 10240
    d_kv: int = 64
    num_heads: int = 64
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    checkpoint: Optional[str] = None  # models_t5_umt5-xxl-enc-bf16.pth, relative to model.checkpoint_dir


@dataclass
class AudioEncoderConfig:
    """wav2vec2 (transformers Wav2Vec2Model) dimensions; its 25 hidden states feed the DiT."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    checkpoint: Optional[str] = None  # folder, relative to model.checkpoint_dir


@dataclass
class ModelConfig:
    name: str = "tiny"
    # DiT trunk (docs/facts.md "Wan2.2 S2V-14B")
    dim: int = 64
    ffn_dim: int = 128
    num_heads: int = 4
    num_layers: int = 4
    in_dim: int = 16
    out_dim: int = 16
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    text_dim: int = 32
    text_len: int = 16
    freq_dim: int = 32
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    # S2V additions; s2v=false gives the plain T2V trunk
    s2v: bool = True
    audio_dim: int = 32  # width of each wav2vec2 hidden state
    audio_layers: int = 3  # number of wav2vec2 hidden states (25 for the real model)
    audio_inject_layers: list[int] = field(default_factory=lambda: [0, 2])
    motion_frames: int = 19  # latent frames of motion history packed by frame_packer
    # what a workload uses unless told otherwise (workload.size: ${model.default_size})
    default_size: str = "64*64"
    default_frames_per_clip: int = 8
    default_sample_steps: int = 4  # workload=generate's steps (40 for the real models, as upstream)
    # weights
    checkpoint_dir: Optional[str] = None  # official folder layout; None = random weights
    # Wan2.1 VAE (encoder only: the reference image of workload.image_path)
    vae_checkpoint: Optional[str] = "Wan2.1_VAE.pth"  # relative to model.checkpoint_dir
    vae_dim: int = 8  # base channel width (96 for the real VAE)
    dtype: DType = DType.bf16
    seed: int = 0
    attention_backend: AttentionBackend = AttentionBackend.auto
    compile: bool = False
    precision: Precision = Precision.bf16  # sweepable: model.precision=bf16,fp8_linear,fp8
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    audio_encoder: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)


# --------------------------------------------------------------------------- parallel
@dataclass
class FsdpConfig:
    # 0 = no FSDP (every rank holds the whole DiT); -1 = shard over all ranks (shared with
    # the other axes, as upstream); N = an own "fsdp" mesh axis of N ranks (parallel/dims.py).
    # FSDP is on exactly when this is not 0: the degree is the switch.
    degree: int = 0
    api: FsdpApi = FsdpApi.fsdp1
    # True reproduces upstream Wan (and its hang); fsdp_fixed sets False
    sync_module_states: bool = False
    # upstream: every rank loads the full checkpoint before wrapping
    load_full_on_every_rank: bool = False
    param_dtype: DType = DType.bf16
    reduce_dtype: DType = DType.fp32


@dataclass
class ParallelConfig:
    """One split = these degrees (resolved and checked by parallel/dims.ParallelDims) and
    the loading path (``fsdp.load_full_on_every_rank``, ``fsdp.sync_module_states``).
    ``name`` is the preset's label (paths, records, the dashboard); no code decides by it,
    so a new preset is one YAML file under conf/parallel/."""

    name: str = "single"
    # degrees of the mesh axes; their product (with the fsdp axis) is the world size.
    # -1 = the ranks the other axes leave (at most one of dp/ring/ulysses)
    # data parallel over clips: dp_degree groups of ranks, each making its own clip (its own
    # seed); the outermost axis. FSDP with fsdp.degree=-1 shards over the dp groups too.
    dp_degree: int = 1
    cfg_degree: int = 1  # 2 = conditional and unconditional forwards on two rank groups
    ring_degree: int = 1  # ring attention (keys/values passed around)
    ulysses_degree: int = 1  # Ulysses (heads exchanged by all-to-all)
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    text_encoder_placement: Placement = Placement.device
    audio_encoder_placement: Placement = Placement.device
    vae: VaePlacement = VaePlacement.every_rank


# --------------------------------------------------------------------------- environment
@dataclass
class NcclConfig:
    name: str = "default"
    # variables set for the ranks only (the launching process keeps its own environment)
    env: dict[str, str] = field(default_factory=dict)
    flight_recorder: bool = False  # dumps into <job dir>/nccl_trace/
    timeout_s: float = 600.0  # process-group timeout


@dataclass
class AllocatorConfig:
    name: str = "default"
    # PYTORCH_ALLOC_CONF string ("" = PyTorch defaults); the launcher sets both variable names
    conf: str = ""
    # CPU ranks: count the bytes of the tensors the rank holds (memory.peak_tensor_gib, per stage
    # too; metrics/tensor_memory.py). Off by default: a Python call per op. A GPU's allocator
    # counts its tensors itself, so a GPU rank ignores it
    count_cpu_tensors: bool = False


# --------------------------------------------------------------------------- workload
@dataclass
class LoraConfig:
    rank: int = 16
    alpha: int = 16
    dropout: float = 0.0
    # regex over module names (docs/facts.md "peft": a regex avoids unrelated modules ending in q/o).
    # Under Ulysses keep it inside `blocks.`: modules after the sequence gather (head) see the
    # whole sequence on every rank, and the sequence-parallel gradient sum would count them N times.
    target_regex: str = r"blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)|blocks\.\d+\.ffn\.(0|2)"
    lr: float = 1e-4
    save: bool = True


SAVE_VIDEO_SETTINGS = ("auto", "true", "false")
# Upstream S2V's default negative prompt (the unconditional text branch).
S2V_NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，多余的手指，"
    "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)


@dataclass
class WorkloadConfig:
    name: WorkloadName = WorkloadName.generate
    size: str = "${model.default_size}"  # H*W in pixels, as upstream's --size
    frames_per_clip: int = "${model.default_frames_per_clip}"  # type: ignore[assignment]  # 4 per latent frame
    # generate: at most this many clips (fewer when workload.audio_path is shorter); -1 = as
    # many as the audio file gives (upstream's default); synthetic audio: exactly this many
    clips: int = 1
    sample_steps: int = 2
    sampler: SamplerName = SamplerName.unipc
    shift: float = 3.0
    guidance_scale: float = 4.5
    warmup_steps: int = 1  # DiT steps excluded from the measurement
    steps: int = 2  # optimiser steps for train_lora
    fps: int = 16
    prompt: str = ""  # empty = synthetic embeddings
    negative_prompt: str = S2V_NEGATIVE_PROMPT  # the unconditional branch's text
    audio_path: Optional[str] = None  # wav/flac/mp3/...; None = synthetic audio
    image_path: Optional[str] = None  # reference frame; needs model.checkpoint_dir (VAE)
    size_from_image: bool = True  # H*W chosen from image_path within the area of workload.size
    # <job dir>/video.mp4 (generate): auto = when model.checkpoint_dir is set, or true / false
    # (a string, since YAML and the command line read true/false as booleans)
    save_video: str = "auto"
    # the bf16 forward beside the job's own on the first drift_steps steps (warm-up steps) and
    # the first clip sampled and decoded in bf16 too: flow relative L2, PSNR, SSIM
    # (docs/precision.md); None = on for any model.precision but bf16
    drift_check: Optional[bool] = None
    drift_steps: int = 1
    lora: LoraConfig = field(default_factory=LoraConfig)
    # workload=upstream (docs/upstream.md): the Wan2.2 checkout whose generate.py runs, upstream's
    # --offload_model (None: upstream's default, on for one rank and off otherwise) and
    # --convert_model_dtype
    repo: Optional[str] = None
    offload_model: Optional[bool] = None
    convert_model_dtype: bool = False


# --------------------------------------------------------------------------- logger, fault
@dataclass
class LoggerConfig:
    mode: LoggerMode = LoggerMode.offline
    project: str = "wan-exp"
    entity: Optional[str] = None
    group: Optional[str] = None  # default: the sweep dir's name
    tags: list[str] = field(default_factory=list)


@dataclass
class FaultConfig:
    kind: FaultKind = FaultKind["none"]
    rank: int = 0  # which rank misbehaves
    phase: str = "wrap"  # process_group | build | load | wrap | first_step | step
    seconds: float = 0.0  # for sleep; slow: per in-stage heartbeat
    signal: str = "SIGKILL"  # for signal
    host_gib: float = 0.0  # host memory the faulty rank fills before the fault fires


# --------------------------------------------------------------------------- launcher
@dataclass
class LauncherConfig:
    """How the torchrun launcher starts this job's ranks.

    It lives in the job's config (not under ``hydra.launcher``) so that a sweep can vary
    it per job, e.g. ``-m launcher.nproc_per_node=1,2,4,8`` for a scaling sweep.
    """

    nproc_per_node: str = "auto"  # "auto" = visible GPUs, or 2 on a CPU-only machine
    nnodes: int = 1
    node_rank: int = 0
    rdzv_backend: str = "c10d"
    rdzv_endpoint: str = "localhost:0"  # port 0: a free port per job
    max_restarts: int = 0
    # start-up bound: every rank must send its first heartbeat (rendezvous formed, torch
    # imported, process started) within this many seconds of the job's start
    rdzv_timeout_s: float = 120.0
    # after its first heartbeat: no progress from any rank for this long = hang
    hang_timeout_s: float = 300.0
    resume: bool = False  # skip jobs whose job dir already holds a complete result
    # more ranks than visible GPUs: ranks take the GPUs round robin over gloo (docs/rehearsal.md);
    # times are not comparable, per-process memory is
    share_gpus: bool = False
    # N > 0: ONE process plays rank launcher.simulate_rank of an N-rank job over torch's fake
    # process group (collectives counted, no data moved; docs/rehearsal.md)
    simulate_world_size: int = 0
    simulate_rank: int = 0
    # the link a simulated job's collectives are priced at: nvlink4|nvlink3|pcie4|pcie5|ib400|<GB/s>,
    # or measured:<sweep dir> (wan_exp/plan/pricing.py)
    link: str = "nvlink4"


# --------------------------------------------------------------------------- root
@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    nccl: NcclConfig = field(default_factory=NcclConfig)
    allocator: AllocatorConfig = field(default_factory=AllocatorConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    seed: int = 0


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
TOKENIZER_SUBDIR = "google/umt5-xxl"  # the prompt's tokenizer, inside model.checkpoint_dir


def compose_config(overrides: Sequence[str] = ()) -> Any:
    """The experiment config as `python launch.py <overrides>` composes it, for code that
    runs outside the launcher (tests, notebooks, scripts started by hand under torchrun)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def typed_config(cfg: Any) -> ExperimentConfig:
    """The resolved config as the schema's dataclasses (enums, ints, nested objects): what
    a rank works with, converted once when it starts."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), cfg)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def register_configs() -> None:
    """Store the schema that conf/config.yaml names first in its defaults list, so that
    every group file merged into it is checked field by field."""
    ConfigStore.instance().store(name="experiment_schema", node=ExperimentConfig)


# --------------------------------------------------------------------------- pure helpers
def tokenizer_dir(model: Any) -> Optional[Path]:
    """The prompt's tokenizer folder inside model.checkpoint_dir, None if there is none."""
    if not model.checkpoint_dir:
        return None
    folder = Path(model.checkpoint_dir) / TOKENIZER_SUBDIR
    return folder if folder.is_dir() else None


def steps_run(wl: Any) -> Optional[int]:
    """DiT steps the workload runs: clips x sample_steps (generate; one clip where the audio
    decides the count, workload.clips=-1, since it gives at least one), steps (train_lora);
    None for init, which runs none."""
    if wl.name in (WorkloadName.generate, WorkloadName.upstream):
        return max(wl.clips, 1) * wl.sample_steps
    if wl.name == WorkloadName.train_lora:
        return wl.steps
    return None


def parse_size(size: str) -> tuple[int, int]:
    """'480*832' -> (480, 832); raises ConfigError naming workload.size."""
    parts = str(size).lower().replace("x", "*").split("*")
    try:
        height, width = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"workload.size={size!r} is not H*W in pixels; use e.g. workload.size=480*832") from None
    for name, v in (("height", height), ("width", width)):
        if v < 16 or v % 16:
            raise ConfigError(
                f"workload.size={size!r}: {name} {v} must be a positive multiple of 16 (VAE stride 8 x patch 2)"
            )
    return height, width


def signal_number(name: str) -> signal.Signals:
    """SIGKILL -> signal.SIGKILL; raises ConfigError naming fault.signal otherwise."""
    try:
        return signal.Signals[str(name).upper()]
    except KeyError:
        raise ConfigError(f"fault.signal={name!r} is not a signal name; use e.g. SIGKILL, SIGTERM, SIGSEGV") from None
