"""Every rule of a job, checked before any rank starts: the one module above the schema.

``wan_exp.config`` is the schema (dataclasses, enums, composition); this module holds the
rules that tie fields together, or a field to the machine, and raises ConfigError naming
the setting:
- :func:`check_schema_keys` (a ``+key=value`` the schema lacks),
- :func:`validate` (model, parallel, workload, fault rank, input files: the rules a job has
  whatever machine it runs on),
- :func:`check_launch_settings` (the ``launcher`` node, the FSDP device rule, the fault
  phases) and :func:`ranks_per_node`,
- :func:`job_shape` (THE device and backend decision) and :func:`rank_device`,
- :func:`check_job`, which runs all of them, then the memory check
  (``memory_fit.check_memory_fits``), for one job on this machine and says how many ranks
  it gets. The torchrun launcher calls it (through the batch check of
  wan_exp.host.callbacks) for every job of a batch before the first starts;
  wan_exp.host.job calls it again where the job runs (another launcher, another host).
- :func:`config_warnings`: settings that run but do nothing.

Imports run downward only (config, geometry, parallel.dims, media, memory_fit, plan.pricing);
no torch is imported, so the launching process stays light.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from wan_exp.config import (
    PHASES,
    PIPELINE_STAGES,
    SAVE_VIDEO_SETTINGS,
    STEP_PHASES,
    TOKENIZER_SUBDIR,
    ConfigError,
    ExperimentConfig,
    FaultKind,
    FsdpApi,
    VaePlacement,
    WorkloadName,
    signal_number,
    steps_run,
    tokenizer_dir,
)
from wan_exp.devices import JobShape
from wan_exp.geometry import JobGeometry, job_geometry, strip_axis
from wan_exp.media import SAMPLE_RATE, SILENCE_PEAK, audio_peak_and_samples
from wan_exp.memory_fit import check_audio_fits, check_memory_fits
from wan_exp.parallel.dims import fsdp_shards, parallel_dims, runs_one_rank
from wan_exp.plan.pricing import parse_link
from wan_exp.precision_support import check_precision
from wan_exp.upstream.preflight import check_upstream

log = logging.getLogger(__name__)

CPU_DEFAULT_NPROC = 2  # launcher.nproc_per_node=auto on a machine without GPUs


# --------------------------------------------------------------------------- keys
def check_schema_keys(cfg: Any) -> None:
    """Refuse keys the schema does not know (ConfigError naming the key).

    Hydra composes ``+key=value`` with the config's struct flag lifted (``+`` means "add
    this key"), so a key the schema lacks, e.g. ``+unknown=1`` or ``+model.dimm=3``, passes
    composition; each rank would only meet it when it merges config.yaml into the schema
    (worker.load_job_config), after start-up. This is that same merge, before launch.
    Open dictionaries of the schema (``nccl.env``) take any key, as there."""
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
def config_warnings(cfg: Any) -> list[str]:
    """Settings that run but do not do what they say (printed before launch, kept in the
    rank records and results.json)."""
    found = []
    if cfg.workload.prompt and cfg.workload.name != WorkloadName.init and tokenizer_dir(cfg.model) is None:
        where = (
            f"{cfg.model.checkpoint_dir}/{TOKENIZER_SUBDIR} does not exist"
            if cfg.model.checkpoint_dir
            else "model.checkpoint_dir is not set"
        )
        found.append(
            f"workload.prompt is ignored: no tokenizer ({where}); the text embedding comes from seeded random token ids"
        )
    return found


# --------------------------------------------------------------------------- job rules
def _check_fsdp_settings(par: Any) -> None:
    """The FSDP options that exclude each other."""
    if par.fsdp.api == FsdpApi.fsdp2 and par.fsdp.sync_module_states:
        raise ConfigError(
            "parallel.fsdp.sync_module_states=true is an FSDP1 option; FSDP2 (parallel.fsdp.api=fsdp2) "
            "has no broadcast. Use parallel.fsdp.api=fsdp1 to reproduce upstream, or parallel=fsdp_fixed"
        )


def validate(cfg: Any, world_size: int) -> None:
    """Check the rules no single field can express (and the input files of a generate job).
    Raises ConfigError naming the setting."""
    model, par, wl = cfg.model, cfg.parallel, cfg.workload
    if world_size < 1:
        raise ConfigError(f"launcher.nproc_per_node x launcher.nnodes gives {world_size} ranks; need >= 1")
    if model.dim % model.num_heads:
        raise ConfigError(f"model.dim={model.dim} is not divisible by model.num_heads={model.num_heads}")
    if (model.dim // model.num_heads) % 2:
        raise ConfigError("model.dim / model.num_heads must be even (RoPE works on pairs)")
    bad_layers = [i for i in model.audio_inject_layers if not 0 <= i < model.num_layers]
    if model.s2v and bad_layers:
        raise ConfigError(f"model.audio_inject_layers has {bad_layers}, outside 0..{model.num_layers - 1}")
    if model.s2v and model.audio_layers != model.audio_encoder.num_hidden_layers + 1:
        raise ConfigError(
            f"model.audio_layers={model.audio_layers} must be "
            f"model.audio_encoder.num_hidden_layers + 1 = {model.audio_encoder.num_hidden_layers + 1} "
            "(wav2vec2 returns one hidden state per layer plus the embeddings)"
        )
    if runs_one_rank(par) and world_size != 1:
        raise ConfigError(
            f"parallel={par.name} runs one rank, got {world_size} (every degree is 1 and "
            "parallel.fsdp.degree=0); set the degree of the axis to split over, e.g. "
            "parallel.ulysses_degree=-1, or run one rank"
        )
    if int(par.dp_degree) != 1 and wl.name in (WorkloadName.upstream, WorkloadName.train_lora):
        raise ConfigError(
            f"parallel.dp_degree={par.dp_degree} with workload={WorkloadName(wl.name).value}: dp groups "
            "each make their own clip, which only workload=generate (and init, which makes none) does; "
            f"{'upstream has no such axis' if wl.name == WorkloadName.upstream else 'training on one clip per step'}"
            ": set parallel.dp_degree=1"
        )
    if wl.name == WorkloadName.upstream:  # first: it names the splits upstream can run
        check_upstream(cfg, world_size)
    dims = parallel_dims(cfg, world_size)
    _check_fsdp_settings(par)
    if dims.cfg > 1 and wl.name == WorkloadName.generate and wl.guidance_scale in (0.0, 1.0):
        raise ConfigError(
            f"parallel.cfg_degree=2 with workload.guidance_scale={wl.guidance_scale}: that scale needs "
            "one DiT forward per step, so the second cfg group would have nothing to do; "
            "set parallel.cfg_degree=1 or a guidance scale other than 0 and 1"
        )
    if wl.frames_per_clip < 4 or wl.frames_per_clip % 4:
        raise ConfigError(
            f"workload.frames_per_clip={wl.frames_per_clip} must be a positive multiple of 4 "
            "(the VAE packs 4 frames per latent frame; upstream uses 80)"
        )
    if wl.clips < 1 and wl.clips != -1:
        raise ConfigError(f"workload.clips={wl.clips} must be >= 1, or -1 for as many as the audio gives")
    if wl.clips == -1 and not model.s2v:
        raise ConfigError(
            "workload.clips=-1 takes the clip count from the audio, which a model without "
            "speech input (model.s2v=false) does not read; set a clip count"
        )
    if wl.clips == -1 and not wl.audio_path:
        raise ConfigError(
            "workload.clips=-1 takes the clip count from workload.audio_path; set the file or a clip count"
        )
    if str(wl.save_video).lower() not in SAVE_VIDEO_SETTINGS:
        raise ConfigError(f"workload.save_video={wl.save_video!r}; use one of {', '.join(SAVE_VIDEO_SETTINGS)}")
    if par.vae == VaePlacement.sharded and dims.clip_ranks < 2:
        raise ConfigError(
            "parallel.vae=sharded spreads the decode over the ranks that make a clip and needs >= 2 ranks, "
            f"got {dims.clip_ranks}"
            + (f" ({world_size} ranks in {dims.dp} dp groups)" if dims.dp > 1 else "")
            + "; use parallel.vae=tiled on one rank"
        )
    for name in ("sample_steps", "steps"):
        if getattr(wl, name) < 1:
            raise ConfigError(f"workload.{name}={getattr(wl, name)} must be >= 1")
    if wl.warmup_steps < 0:
        raise ConfigError(f"workload.warmup_steps={wl.warmup_steps} must be >= 0")
    steps = steps_run(wl)
    if steps is not None and wl.warmup_steps >= steps:
        counted = "workload.clips x workload.sample_steps" if wl.name == WorkloadName.generate else "workload.steps"
        raise ConfigError(
            f"workload.warmup_steps={wl.warmup_steps} but workload={WorkloadName(wl.name).value} runs "
            f"{steps} step(s) ({counted}): no step would be measured; lower workload.warmup_steps "
            f"below {steps} or run more steps"
        )
    if wl.guidance_scale < 0:
        raise ConfigError(f"workload.guidance_scale={wl.guidance_scale} must be >= 0")
    # a typo in a path would otherwise surface in every rank, after minutes of building
    for name, path in (
        ("model.checkpoint_dir", model.checkpoint_dir),
        ("workload.audio_path", wl.audio_path),
        ("workload.image_path", wl.image_path),
    ):
        if path and not Path(path).exists():
            raise ConfigError(
                f"{name}={path!r} does not exist (relative to {Path.cwd()}); "
                "fix the path or leave it unset for synthetic inputs / random weights"
            )
    if wl.image_path and not model.checkpoint_dir:
        raise ConfigError("workload.image_path needs model.checkpoint_dir (the VAE encodes the image)")
    if cfg.fault.kind != FaultKind["none"] and not 0 <= cfg.fault.rank < world_size:
        raise ConfigError(f"fault.rank={cfg.fault.rank} is outside 0..{world_size - 1}")
    if cfg.fault.host_gib < 0:
        raise ConfigError(f"fault.host_gib={cfg.fault.host_gib} must be >= 0")
    geometry = job_geometry(cfg)  # workload.size, and the size the reference image gives
    if wl.name == WorkloadName.generate:
        check_inputs(cfg, geometry, world_size)


def check_inputs(cfg: Any, geometry: JobGeometry, world_size: int) -> None:
    """The input files of a generate job, read before any rank loads weights: an audio file that
    ffmpeg cannot read, that is silent, or whose wav2vec2 encoding cannot fit in host memory
    (read a frame at a time: never whole); an image that is not an image, or gives no usable
    size, already failed in ``job_geometry``; for parallel.vae=sharded whether the ranks of a
    clip (a dp group) can share a latent frame (one strip per rank). Raises ConfigError naming
    the setting and what to do."""
    wl = cfg.workload
    if VaePlacement(cfg.parallel.vae) == VaePlacement.sharded:
        strip_axis(geometry.latent_height, geometry.latent_width, parallel_dims(cfg, world_size).clip_ranks)
    if not wl.audio_path:
        return
    try:
        peak, samples = audio_peak_and_samples(wl.audio_path)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(str(exc)) from None
    if peak < SILENCE_PEAK:
        raise ConfigError(
            f"workload.audio_path={wl.audio_path!r} is silent (peak {peak:.1e}); "
            "S2V animates speech: give a file with sound, or leave it unset "
            "for synthetic audio"
        )
    check_audio_fits(cfg, wl.audio_path, samples, SAMPLE_RATE, max(1, world_size // cfg.launcher.nnodes))


# --------------------------------------------------------------------------- launch rules
def ranks_per_node(cfg: Any, gpus: int) -> int:
    """launcher.nproc_per_node resolved: auto = visible GPUs (2 on a CPU machine); a split of
    one rank (every degree 1, no FSDP: parallel=single) always runs one rank. Raises
    ConfigError naming the setting."""
    requested = str(cfg.launcher.nproc_per_node).strip()
    if requested == "auto":
        nproc = gpus or CPU_DEFAULT_NPROC
    elif requested.isdigit() and int(requested) > 0:
        nproc = int(requested)
    else:
        raise ConfigError(f"launcher.nproc_per_node={requested!r} is not allowed; use auto or a positive integer")
    if int(cfg.launcher.simulate_world_size) > 0:
        return 1  # one process plays one rank of the simulated job
    if runs_one_rank(cfg.parallel):
        if requested != "auto" and nproc != 1:
            log.warning("parallel=%s runs one rank; ignoring launcher.nproc_per_node=%s", cfg.parallel.name, requested)
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
    if fsdp_shards(fsdp_cfg.degree) and fsdp_cfg.sync_module_states and device_type != "cuda":
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
        log.warning(
            "launcher.nnodes=%s with launcher.rdzv_endpoint=%s: only processes on this host can "
            "join; other hosts need node 0's host name",
            lc.nnodes,
            lc.rdzv_endpoint,
        )
    for name in ("rdzv_timeout_s", "hang_timeout_s"):
        if getattr(lc, name) <= 0:
            raise ConfigError(f"launcher.{name}={getattr(lc, name)} must be > 0")
    if lc.max_restarts < 0:
        raise ConfigError(f"launcher.max_restarts={lc.max_restarts} must be >= 0")
    if cfg.nccl.flight_recorder and cfg.nccl.timeout_s >= lc.hang_timeout_s:
        # the recorder dumps on an NCCL timeout; the watchdog kills the ranks before that
        log.warning(
            "nccl.timeout_s=%s >= launcher.hang_timeout_s=%s: a hang ends before NCCL times out, "
            "so the flight recorder writes no dump; lower nccl.timeout_s to get one",
            cfg.nccl.timeout_s,
            lc.hang_timeout_s,
        )
    _check_rehearsal_settings(lc, gpus)
    # e.g. parallel=fsdp (sync_module_states=true) on a machine without GPUs
    check_fsdp_device(cfg.parallel.fsdp, "cuda" if gpus else "cpu")
    fault = cfg.fault
    kind = fault.kind.name
    if kind == "none":
        return
    generate = WorkloadName(cfg.workload.name) == WorkloadName.generate
    if fault.phase not in PHASES + (PIPELINE_STAGES if generate else ()):
        raise ConfigError(
            f"fault.phase={fault.phase!r} is not a phase; use one of {', '.join(PHASES)}"
            + (f" or a stage: {', '.join(PIPELINE_STAGES)}" if generate else "")
        )
    if WorkloadName(cfg.workload.name) == WorkloadName.init and fault.phase in STEP_PHASES:
        # a fault that never fires would report a healthy job as the demonstration's outcome
        raise ConfigError(
            f"fault.phase={fault.phase} never happens in workload=init, which stops after wrap; "
            "use fault.phase=build, load or wrap, or another workload"
        )
    if kind == "signal":
        signal_number(fault.signal)
    if kind in ("sleep", "slow") and fault.seconds < 0:
        raise ConfigError(f"fault.seconds={fault.seconds} must be >= 0")
    if kind == "oom" and not gpus:
        raise ConfigError("fault=oom allocates GPU memory until it runs out, but no GPU is visible")


def _check_rehearsal_settings(lc: Any, gpus: int) -> None:
    """launcher.share_gpus / simulate_world_size / simulate_rank / link (docs/rehearsal.md)."""
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
        raise ConfigError(
            f"launcher.simulate_world_size={n} runs one process on one host; set launcher.nnodes=1 (got {lc.nnodes})"
        )
    if n and lc.share_gpus:
        raise ConfigError(
            "launcher.simulate_world_size and launcher.share_gpus=true exclude each other: "
            "a simulation runs one process; set one of them"
        )
    if n and not 0 <= int(lc.simulate_rank) < n:
        raise ConfigError(
            f"launcher.simulate_rank={lc.simulate_rank} is outside 0..{n - 1} (launcher.simulate_world_size={n})"
        )
    parse_link(str(lc.link))  # ConfigError naming launcher.link


def job_shape(cfg: Any, nproc: int, gpus: int) -> JobShape:
    """THE device and backend decision for a job (the job process writes it into job.json,
    every rank reads it back through :func:`rank_device`)."""
    lc = cfg.launcher
    device = "cuda" if gpus else "cpu"
    simulated = int(lc.simulate_world_size)
    if simulated:
        return JobShape(
            nproc_per_node=1,
            world_size=simulated,
            backend="fake",
            device=device,
            gpus=min(gpus, 1),
            simulated_rank=int(lc.simulate_rank),
        )
    shared = bool(gpus) and nproc > gpus
    backend = "nccl" if gpus and not lc.share_gpus else "gloo"  # NCCL refuses two ranks on one GPU
    return JobShape(
        nproc_per_node=nproc,
        world_size=nproc * int(lc.nnodes),
        backend=backend,
        device=device,
        gpus=gpus,
        shared_gpus=shared,
    )


def rank_device(job: dict, local_rank: int) -> tuple[str, int | None]:
    """(device type, index) of a rank from its job.json: GPUs round robin (local_rank % gpus),
    which is one GPU per rank unless launcher.share_gpus put several ranks on one."""
    if job.get("device", "cuda" if job["backend"] == "nccl" else "cpu") != "cuda":
        return "cpu", None
    gpus = int(job.get("gpus") or 1)
    return "cuda", local_rank % gpus


def check_job(cfg: Any, gpus: int) -> JobShape:
    """Every rule for one job on a machine with `gpus` visible GPUs; raises ConfigError
    naming the setting, else says how many ranks the job gets."""
    check_schema_keys(cfg)  # a '+key=value' the schema lacks would fail in every rank
    nproc = ranks_per_node(cfg, gpus)
    check_launch_settings(cfg, gpus)
    shape = job_shape(cfg, nproc, gpus)
    validate(cfg, shape.world_size)
    check_precision(cfg, shape)
    check_memory_fits(cfg, shape.world_size, nproc, gpus)
    return shape
