"""Structured configs: the one config object that drives a wan-exp job.

Every Hydra config group under ``conf/`` is validated against a dataclass here, so a
typo, a wrong type or an unknown option fails while Hydra composes the config, before
any process starts. Every rule that ties fields together, or a field to the machine,
lives here too and nowhere else:
- :func:`validate` (model, parallel, workload, fault rank: the rules a job has whatever
  machine it runs on),
- :func:`check_launch_settings` (the ``launcher`` node, the FSDP device rule, the fault
  phases) and :func:`ranks_per_node`,
- :func:`check_job`, which runs all of them for one job on this machine and says how many
  ranks it gets. The torchrun launcher calls it (through the batch check of
  wan_exp.host.callbacks) for every job of a batch before the first starts; wan_exp.host.job calls
  it again where the job runs (another launcher, another host).

This module imports no torch, so the launcher process can use it freely.
"""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A setting is out of range or inconsistent with another; the message names it."""


# --------------------------------------------------------------------------- enums
class ConfigEnum(str, Enum):
    """A choice that prints as its name: paths, tables and logs show ``ulysses``, not
    ``Strategy.ulysses`` (e.g. ``hydra.sweep.subdir=${parallel.name}``)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Strategy(ConfigEnum):
    single = "single"
    ulysses = "ulysses"
    fsdp = "fsdp"
    fsdp_fixed = "fsdp_fixed"
    hybrid = "hybrid"
    cfg = "cfg"
    usp = "usp"
    cfg_ulysses = "cfg_ulysses"


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
CPU_DEFAULT_NPROC = 2  # launcher.nproc_per_node=auto on a machine without GPUs

# Functional form because "raise" is a keyword; OmegaConf matches members by name.
FaultKind = ConfigEnum("FaultKind", {k: k for k in ("none", "raise", "hang", "sleep", "signal", "oom")})


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
    patch_size: List[int] = field(default_factory=lambda: [1, 2, 2])
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
    audio_inject_layers: List[int] = field(default_factory=lambda: [0, 2])
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
    enabled: bool = False
    api: FsdpApi = FsdpApi.fsdp1
    # True reproduces upstream Wan (and its hang); fsdp_fixed sets False
    sync_module_states: bool = False
    # upstream: every rank loads the full checkpoint before wrapping
    load_full_on_every_rank: bool = False
    param_dtype: DType = DType.bf16
    reduce_dtype: DType = DType.fp32
    # -1 = shard over all ranks (shared with the other axes, as upstream); N = an own
    # "fsdp" mesh axis of N ranks (parallel/dims.py)
    degree: int = -1


@dataclass
class ParallelConfig:
    """One split = these degrees (resolved and checked by parallel/dims.ParallelDims);
    ``name`` labels the preset and picks the loading path (replicated or FSDP)."""

    name: Strategy = Strategy.single
    # degrees of the mesh axes; their product (with the fsdp axis) is the world size.
    # -1 = the ranks the other axes leave (at most one of ulysses/ring)
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
    env: Dict[str, str] = field(default_factory=dict)
    flight_recorder: bool = False  # dumps into <job dir>/nccl_trace/
    timeout_s: float = 600.0  # process-group timeout


@dataclass
class AllocatorConfig:
    name: str = "default"
    # PYTORCH_ALLOC_CONF string ("" = PyTorch defaults); the launcher sets both variable names
    conf: str = ""


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


# --------------------------------------------------------------------------- logger, fault
@dataclass
class LoggerConfig:
    mode: LoggerMode = LoggerMode.offline
    project: str = "wan-exp"
    entity: Optional[str] = None
    group: Optional[str] = None  # default: the sweep dir's name
    tags: List[str] = field(default_factory=list)


@dataclass
class FaultConfig:
    kind: FaultKind = FaultKind["none"]
    rank: int = 0  # which rank misbehaves
    phase: str = "wrap"  # process_group | build | load | wrap | first_step | step
    seconds: float = 0.0  # for sleep
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


# --------------------------------------------------------------------------- keys
def check_schema_keys(cfg: Any) -> None:
    """Refuse keys the schema does not know (ConfigError naming the key).

    Hydra composes ``+key=value`` with the config's struct flag lifted (``+`` means "add
    this key"), so a key the schema lacks, e.g. ``+unknown=1`` or ``+model.dimm=3``, passes
    composition; each rank would only meet it when it merges config.yaml into the schema
    (worker.load_job_config), after start-up. This is that same merge, before launch.
    Open dictionaries of the schema (``nccl.env``) take any key, as there."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)  # Hydra's own node, not part of the experiment
    try:
        OmegaConf.merge(OmegaConf.structured(ExperimentConfig), plain)
    except ConfigKeyError as exc:
        key = getattr(exc, "full_key", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"{key} is not a setting of the experiment config (an override '+{key}=...' adds a key "
            "the schema does not know); check the spelling: `python launch.py --cfg job` prints every key"
        ) from None


# --------------------------------------------------------------------------- warnings
def tokenizer_dir(model: Any) -> Optional[Path]:
    """The prompt's tokenizer folder inside model.checkpoint_dir, None if there is none."""
    if not model.checkpoint_dir:
        return None
    folder = Path(model.checkpoint_dir) / TOKENIZER_SUBDIR
    return folder if folder.is_dir() else None


def config_warnings(cfg: Any) -> list[str]:
    """Settings that run but do not do what they say (printed before launch, kept in the
    rank records and results.json)."""
    found = []
    if cfg.workload.prompt and cfg.workload.name != WorkloadName.init and tokenizer_dir(cfg.model) is None:
        where = (f"{cfg.model.checkpoint_dir}/{TOKENIZER_SUBDIR} does not exist" if cfg.model.checkpoint_dir
                 else "model.checkpoint_dir is not set")
        found.append(f"workload.prompt is ignored: no tokenizer ({where}); the text embedding comes "
                     "from seeded random token ids")
    return found


# --------------------------------------------------------------------------- cross-field rules
def steps_run(wl: Any) -> Optional[int]:
    """DiT steps the workload runs: clips x sample_steps (generate; one clip where the audio
    decides the count, workload.clips=-1, since it gives at least one), steps (train_lora);
    None for init, which runs none."""
    if wl.name == WorkloadName.generate:
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
        raise ConfigError(
            f"workload.size={size!r} is not H*W in pixels; use e.g. workload.size=480*832"
        ) from None
    for name, v in (("height", height), ("width", width)):
        if v < 16 or v % 16:
            raise ConfigError(
                f"workload.size={size!r}: {name} {v} must be a positive multiple of 16 "
                "(VAE stride 8 x patch 2)"
            )
    return height, width


FSDP_STRATEGIES = ("fsdp", "fsdp_fixed", "hybrid")


def _check_fsdp_flag(par: ParallelConfig) -> None:
    """The preset name picks the loading path (wan_exp/parallel/registry.py: replicated, or
    FSDP), so parallel.fsdp.enabled must agree with it."""
    name = Strategy(par.name).value
    uses_fsdp = name in FSDP_STRATEGIES
    if bool(par.fsdp.enabled) != uses_fsdp:
        raise ConfigError(
            f"parallel.fsdp.enabled={par.fsdp.enabled} does not fit parallel={name}: "
            + ("it shards with FSDP; set parallel.fsdp.enabled=true" if uses_fsdp
               else "it does not shard; use parallel=fsdp_fixed or parallel=hybrid for FSDP")
        )


def _check_strategy_settings(par: ParallelConfig, dims: Any) -> None:
    """The settings each preset name needs besides the FSDP flag."""
    name = Strategy(par.name).value
    others = {axis: degree for axis, degree in dims.degrees.items() if axis != "fsdp" and degree > 1}
    if name in ("fsdp", "fsdp_fixed") and others:
        raise ConfigError(
            f"parallel={name} with {' '.join(f'{a}={d}' for a, d in others.items())}: "
            "use parallel=hybrid to combine Ulysses, ring or CFG parallel with FSDP"
        )
    if par.fsdp.api == FsdpApi.fsdp2 and par.fsdp.sync_module_states:
        raise ConfigError(
            "parallel.fsdp.sync_module_states=true is an FSDP1 option; FSDP2 (parallel.fsdp.api=fsdp2) "
            "has no broadcast. Use parallel.fsdp.api=fsdp1 to reproduce upstream, or parallel=fsdp_fixed"
        )


def parallel_dims(cfg: Any, world_size: int) -> Any:
    """The job's split as one ParallelDims (parallel/dims.py); ConfigError naming the
    settings when the degrees do not fit the world size or the heads."""
    from wan_exp.parallel.dims import DegreeError, ParallelDims  # dims imports no torch

    try:
        return ParallelDims.from_config(cfg.parallel, world_size, cfg.model.num_heads)
    except DegreeError as err:
        raise ConfigError(str(err)) from None


def validate(cfg: Any, world_size: int) -> None:
    """Check the rules no single field can express. Raises ConfigError naming the setting."""
    model, par, wl = cfg.model, cfg.parallel, cfg.workload
    if world_size < 1:
        raise ConfigError(f"launcher.nproc_per_node x launcher.nnodes gives {world_size} ranks; need >= 1")
    if model.dim % model.num_heads:
        raise ConfigError(f"model.dim={model.dim} is not divisible by model.num_heads={model.num_heads}")
    if (model.dim // model.num_heads) % 2:
        raise ConfigError("model.dim / model.num_heads must be even (RoPE works on pairs)")
    bad_layers = [i for i in model.audio_inject_layers if not 0 <= i < model.num_layers]
    if model.s2v and bad_layers:
        raise ConfigError(
            f"model.audio_inject_layers has {bad_layers}, outside 0..{model.num_layers - 1}"
        )
    if model.s2v and model.audio_layers != model.audio_encoder.num_hidden_layers + 1:
        raise ConfigError(
            f"model.audio_layers={model.audio_layers} must be "
            f"model.audio_encoder.num_hidden_layers + 1 = {model.audio_encoder.num_hidden_layers + 1} "
            "(wav2vec2 returns one hidden state per layer plus the embeddings)"
        )
    if par.name == Strategy.single and world_size != 1:
        raise ConfigError(f"parallel=single runs one rank, got {world_size}")
    _check_fsdp_flag(par)
    dims = parallel_dims(cfg, world_size)
    _check_strategy_settings(par, dims)
    if dims.cfg > 1 and wl.name == WorkloadName.generate and wl.guidance_scale in (0.0, 1.0):
        raise ConfigError(
            f"parallel.cfg_degree=2 with workload.guidance_scale={wl.guidance_scale}: that scale needs "
            "one DiT forward per step, so the second cfg group would have nothing to do; "
            "set parallel.cfg_degree=1 or a guidance scale other than 0 and 1"
        )
    parse_size(wl.size)
    if wl.frames_per_clip < 4 or wl.frames_per_clip % 4:
        raise ConfigError(
            f"workload.frames_per_clip={wl.frames_per_clip} must be a positive multiple of 4 "
            "(the VAE packs 4 frames per latent frame; upstream uses 80)"
        )
    if wl.clips < 1 and wl.clips != -1:
        raise ConfigError(f"workload.clips={wl.clips} must be >= 1, or -1 for as many as the audio gives")
    if wl.clips == -1 and not model.s2v:
        raise ConfigError("workload.clips=-1 takes the clip count from the audio, which a model without "
                          "speech input (model.s2v=false) does not read; set a clip count")
    if wl.clips == -1 and not wl.audio_path:
        raise ConfigError("workload.clips=-1 takes the clip count from workload.audio_path; set the file "
                          "or a clip count")
    if str(wl.save_video).lower() not in SAVE_VIDEO_SETTINGS:
        raise ConfigError(f"workload.save_video={wl.save_video!r}; use one of {', '.join(SAVE_VIDEO_SETTINGS)}")
    if par.vae == VaePlacement.sharded and world_size < 2:
        raise ConfigError("parallel.vae=sharded spreads the decode over the ranks and needs >= 2 ranks, "
                          f"got {world_size}; use parallel.vae=tiled on one rank")
    for name in ("sample_steps", "steps"):
        if getattr(wl, name) < 1:
            raise ConfigError(f"workload.{name}={getattr(wl, name)} must be >= 1")
    if wl.warmup_steps < 0:
        raise ConfigError(f"workload.warmup_steps={wl.warmup_steps} must be >= 0")
    steps = steps_run(wl)
    if steps is not None and wl.warmup_steps >= steps:
        counted = ("workload.clips x workload.sample_steps" if wl.name == WorkloadName.generate
                   else "workload.steps")
        raise ConfigError(
            f"workload.warmup_steps={wl.warmup_steps} but workload={WorkloadName(wl.name).value} runs "
            f"{steps} step(s) ({counted}): no step would be measured; lower workload.warmup_steps "
            f"below {steps} or run more steps"
        )
    if wl.guidance_scale < 0:
        raise ConfigError(f"workload.guidance_scale={wl.guidance_scale} must be >= 0")
    # a typo in a path would otherwise surface in every rank, after minutes of building
    for name, path in (("model.checkpoint_dir", model.checkpoint_dir),
                       ("workload.audio_path", wl.audio_path), ("workload.image_path", wl.image_path)):
        if path and not Path(path).exists():
            raise ConfigError(f"{name}={path!r} does not exist (relative to {Path.cwd()}); "
                              "fix the path or leave it unset for synthetic inputs / random weights")
    if wl.image_path and not model.checkpoint_dir:
        raise ConfigError("workload.image_path needs model.checkpoint_dir (the VAE encodes the image)")
    if cfg.fault.kind != FaultKind["none"] and not 0 <= cfg.fault.rank < world_size:
        raise ConfigError(f"fault.rank={cfg.fault.rank} is outside 0..{world_size - 1}")
    if cfg.fault.host_gib < 0:
        raise ConfigError(f"fault.host_gib={cfg.fault.host_gib} must be >= 0")
    if wl.name == WorkloadName.generate:
        from wan_exp.media import check_inputs  # reads the files; imported here to keep this module light

        check_inputs(cfg, world_size)


# --------------------------------------------------------------------------- launch rules
def signal_number(name: str) -> signal.Signals:
    """SIGKILL -> signal.SIGKILL; raises ConfigError naming fault.signal otherwise."""
    try:
        return signal.Signals[str(name).upper()]
    except KeyError:
        raise ConfigError(
            f"fault.signal={name!r} is not a signal name; use e.g. SIGKILL, SIGTERM, SIGSEGV"
        ) from None


def ranks_per_node(cfg: Any, gpus: int) -> int:
    """launcher.nproc_per_node resolved: auto = visible GPUs (2 on a CPU machine);
    parallel=single always runs one rank. Raises ConfigError naming the setting."""
    requested = str(cfg.launcher.nproc_per_node).strip()
    if requested == "auto":
        nproc = gpus or CPU_DEFAULT_NPROC
    elif requested.isdigit() and int(requested) > 0:
        nproc = int(requested)
    else:
        raise ConfigError(
            f"launcher.nproc_per_node={requested!r} is not allowed; use auto or a positive integer"
        )
    if int(cfg.launcher.simulate_world_size) > 0:
        return 1  # one process plays one rank of the simulated job
    if cfg.parallel.name == Strategy.single:
        if requested != "auto" and nproc != 1:
            log.warning("parallel=single runs one rank; ignoring launcher.nproc_per_node=%s", requested)
        return 1
    if gpus and nproc > gpus and not cfg.launcher.share_gpus:
        raise ConfigError(
            f"launcher.nproc_per_node={nproc} but only {gpus} GPU(s) are visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            f"use at most {gpus} or auto, or launcher.share_gpus=true to put several ranks on one GPU "
            "over gloo (times then not comparable)"
        )
    return nproc


def check_fsdp_device(fsdp_cfg: Any, device_type: str) -> None:
    """Fail early, with the setting to change, where FSDP1 itself would refuse."""
    if fsdp_cfg.enabled and fsdp_cfg.sync_module_states and device_type != "cuda":
        raise ConfigError(
            "parallel.fsdp.sync_module_states=true needs GPUs: FSDP1 broadcasts rank 0's "
            f"weights from GPU memory and raises ValueError for a {device_type} module. "
            "parallel=fsdp (the upstream hang reproducer) is a GPU-only experiment; "
            "on the CPU use parallel=fsdp_fixed"
        )


def check_launch_settings(cfg: Any, gpus: int) -> None:
    """The launcher node, the FSDP device rule and the fault settings on a machine with
    `gpus` visible GPUs. Raises ConfigError naming the setting."""
    lc = cfg.launcher
    if lc.nnodes < 1:
        raise ConfigError(f"launcher.nnodes={lc.nnodes} must be >= 1")
    if not 0 <= lc.node_rank < lc.nnodes:
        raise ConfigError(f"launcher.node_rank={lc.node_rank} is outside 0..{lc.nnodes - 1}")
    if lc.rdzv_backend not in ("c10d", "static"):
        raise ConfigError(f"launcher.rdzv_backend={lc.rdzv_backend!r} is not allowed; use c10d or static")
    host, _, port = str(lc.rdzv_endpoint).rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"launcher.rdzv_endpoint={lc.rdzv_endpoint!r} is not host:port; "
            "use e.g. localhost:0 (a free port) or node0:29500"
        )
    if lc.nnodes > 1 and port == "0":
        raise ConfigError(
            f"launcher.nnodes={lc.nnodes} with launcher.rdzv_endpoint={lc.rdzv_endpoint!r}: the other "
            "nodes cannot reach it (port 0 is a random port on each host); use node 0's host name "
            "and a fixed port, e.g. node0:29500"
        )
    if lc.nnodes > 1 and host in ("localhost", "127.0.0.1"):
        log.warning("launcher.nnodes=%s with launcher.rdzv_endpoint=%s: only processes on this host can "
                    "join; other hosts need node 0's host name", lc.nnodes, lc.rdzv_endpoint)
    for name in ("rdzv_timeout_s", "hang_timeout_s"):
        if getattr(lc, name) <= 0:
            raise ConfigError(f"launcher.{name}={getattr(lc, name)} must be > 0")
    if lc.max_restarts < 0:
        raise ConfigError(f"launcher.max_restarts={lc.max_restarts} must be >= 0")
    if cfg.nccl.flight_recorder and cfg.nccl.timeout_s >= lc.hang_timeout_s:
        # the recorder dumps on an NCCL timeout; the watchdog kills the ranks before that
        log.warning("nccl.timeout_s=%s >= launcher.hang_timeout_s=%s: a hang ends before NCCL times out, "
                    "so the flight recorder writes no dump; lower nccl.timeout_s to get one",
                    cfg.nccl.timeout_s, lc.hang_timeout_s)
    _check_rehearsal_settings(lc, gpus)
    # e.g. parallel=fsdp (sync_module_states=true) on a machine without GPUs
    check_fsdp_device(cfg.parallel.fsdp, "cuda" if gpus else "cpu")
    fault = cfg.fault
    kind = fault.kind.name
    if kind == "none":
        return
    if fault.phase not in PHASES:
        raise ConfigError(f"fault.phase={fault.phase!r} is not a phase; use one of {', '.join(PHASES)}")
    if WorkloadName(cfg.workload.name) == WorkloadName.init and fault.phase in STEP_PHASES:
        # a fault that never fires would report a healthy job as the demonstration's outcome
        raise ConfigError(
            f"fault.phase={fault.phase} never happens in workload=init, which stops after wrap; "
            "use fault.phase=build, load or wrap, or another workload"
        )
    if kind == "signal":
        signal_number(fault.signal)
    if kind == "sleep" and fault.seconds < 0:
        raise ConfigError(f"fault.seconds={fault.seconds} must be >= 0")
    if kind == "oom" and not gpus:
        raise ConfigError("fault=oom allocates GPU memory until it runs out, but no GPU is visible")


def _check_rehearsal_settings(lc: Any, gpus: int) -> None:
    """launcher.share_gpus / simulate_world_size / simulate_rank / link (docs/rehearsal.md)."""
    from wan_exp.plan.pricing import parse_link  # no torch

    if lc.share_gpus and not gpus:
        raise ConfigError(
            "launcher.share_gpus=true puts several ranks on each GPU, but no GPU is visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); leave it false "
            "(ranks run on the CPU over gloo) or run on a machine with a GPU"
        )
    n = int(lc.simulate_world_size)
    if n < 0:
        raise ConfigError(f"launcher.simulate_world_size={n} must be >= 0 (0 = off, N = simulate N ranks)")
    if n and lc.nnodes != 1:
        raise ConfigError(f"launcher.simulate_world_size={n} runs one process on one host; "
                          f"set launcher.nnodes=1 (got {lc.nnodes})")
    if n and lc.share_gpus:
        raise ConfigError("launcher.simulate_world_size and launcher.share_gpus=true exclude each other: "
                          "a simulation runs one process; set one of them")
    if n and not 0 <= int(lc.simulate_rank) < n:
        raise ConfigError(f"launcher.simulate_rank={lc.simulate_rank} is outside 0..{n - 1} "
                          f"(launcher.simulate_world_size={n})")
    parse_link(str(lc.link))  # ConfigError naming launcher.link


@dataclass(frozen=True)
class JobShape:
    """How many ranks one checked job gets on this machine, and where they run.

    ``world_size`` is the job's rank count (a simulated job: N); ``nproc_per_node`` the
    processes this host starts (a simulated job: 1)."""

    nproc_per_node: int
    world_size: int
    backend: str  # "nccl" with GPUs, "gloo" without GPUs or with shared GPUs, "fake" simulated
    device: str = "cpu"  # "cuda" or "cpu": what the ranks compute on
    gpus: int = 0  # visible GPUs the ranks take round robin
    shared_gpus: bool = False  # more ranks on this host than GPUs
    simulated_rank: Optional[int] = None  # the rank the one process plays (simulated jobs)

    @property
    def processes(self) -> int:
        """The processes of the job on all hosts (a simulated job: 1)."""
        return 1 if self.simulated_rank is not None else self.world_size


def job_shape(cfg: Any, nproc: int, gpus: int) -> JobShape:
    """THE device and backend decision for a job (the job process writes it into job.json,
    every rank reads it back through :func:`rank_device`)."""
    lc = cfg.launcher
    device = "cuda" if gpus else "cpu"
    simulated = int(lc.simulate_world_size)
    if simulated:
        return JobShape(nproc_per_node=1, world_size=simulated, backend="fake", device=device,
                        gpus=min(gpus, 1), simulated_rank=int(lc.simulate_rank))
    shared = bool(gpus) and nproc > gpus
    backend = "nccl" if gpus and not lc.share_gpus else "gloo"  # NCCL refuses two ranks on one GPU
    return JobShape(nproc_per_node=nproc, world_size=nproc * int(lc.nnodes), backend=backend, device=device,
                    gpus=gpus, shared_gpus=shared)


def rank_device(job: dict, local_rank: int) -> tuple[str, Optional[int]]:
    """(device type, index) of a rank from its job.json: GPUs round robin (local_rank % gpus),
    which is one GPU per rank unless launcher.share_gpus put several ranks on one."""
    if job.get("device", "cuda" if job["backend"] == "nccl" else "cpu") != "cuda":
        return "cpu", None
    gpus = int(job.get("gpus") or 1)
    return "cuda", local_rank % gpus


def check_job(cfg: Any, gpus: int) -> JobShape:
    """Every rule for one job on a machine with `gpus` visible GPUs; raises ConfigError
    naming the setting, else says how many ranks the job gets."""
    from wan_exp.memory_fit import check_memory_fits  # imports this module
    from wan_exp.precision_support import check_precision  # imports this module

    check_schema_keys(cfg)  # a '+key=value' the schema lacks would fail in every rank
    nproc = ranks_per_node(cfg, gpus)
    check_launch_settings(cfg, gpus)
    shape = job_shape(cfg, nproc, gpus)
    validate(cfg, shape.world_size)
    check_precision(cfg, shape)
    check_memory_fits(cfg, shape.world_size, nproc, gpus)
    return shape
