"""Upstream's command line for one job, and the flags a checkout's generate.py declares.

The strategy decides the parallel flags (docs/upstream.md, "Strategies"):

============  ==========================================================
single        none (one rank)
ulysses       ``--ulysses_size N``
fsdp          ``--dit_fsdp --t5_fsdp`` (upstream as it is: sync_module_states=True)
fsdp_fixed    the same, with upstream's shard_model patched (wan_exp.upstream.runner)
hybrid        ``--ulysses_size N --dit_fsdp --t5_cpu``
============  ==========================================================

``--t5_cpu`` follows ``parallel.text_encoder_placement=cpu`` (the hybrid preset sets it), and
an FSDP strategy whose T5 stays on the device shards it too (``--t5_fsdp``). Workload settings
map one to one (:func:`workload_flags`). Upstream's flags are read from generate.py's source
by walking its syntax tree for ``add_argument("--name", ...)`` calls (:func:`declared_flags`):
the checkout is never imported or run on the launching host.

No torch import: the launching process uses this module.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Optional

from wan_exp.config import S2V_NEGATIVE_PROMPT, ConfigError, SamplerName, VaePlacement, WorkloadConfig
from wan_exp.parallel.dims import fsdp_shards, parallel_dims
from wan_exp.results import VIDEO_FILE  # --save_file, in the job dir (as workload=generate names it)

TASK = "s2v-14B"
GENERATE_SCRIPT = "generate.py"
FSDP_HELPER = Path("wan") / "distributed" / "fsdp.py"  # defines shard_model (the fsdp_fixed patch)
FSDP_FUNCTION = "shard_model"
# Presets whose degrees upstream's flags can express, and the sampler names of its --sample_solver.
UPSTREAM_STRATEGIES = ("single", "ulysses", "fsdp", "fsdp_fixed", "hybrid")
UPSTREAM_SOLVERS = {SamplerName.unipc.value: "unipc"}


def _refuse(what: str) -> ConfigError:
    return ConfigError(
        f"workload=upstream: {what}; upstream's generate.py can run parallel="
        f"{', '.join(UPSTREAM_STRATEGIES)} (docs/upstream.md)"
    )


def strategy_flags(cfg: Any, world_size: int) -> list[str]:
    """Upstream's parallel flags for the job's split, from its degrees; ConfigError for a split
    upstream cannot express (CFG parallel, ring attention, Ulysses over part of the ranks, an
    own FSDP axis, FSDP2, FSDP on one rank)."""
    name, par = str(cfg.parallel.name), cfg.parallel
    if int(par.cfg_degree) != 1 or int(par.ring_degree) != 1:  # the settings, before they are resolved
        raise _refuse(
            f"parallel={name} has no upstream equivalent: parallel.cfg_degree={par.cfg_degree} "
            f"parallel.ring_degree={par.ring_degree}; upstream splits only with Ulysses over every rank and "
            "FSDP over every rank"
        )
    dims = parallel_dims(cfg, world_size)
    if dims.ulysses not in (1, world_size):
        raise _refuse(
            f"parallel.ulysses_degree={dims.ulysses} on {world_size} ranks: upstream asserts "
            "--ulysses_size equals the world size"
        )
    flags: list[str] = []
    if dims.ulysses > 1:
        flags += ["--ulysses_size", str(world_size)]
    if dims.fsdp_enabled:
        if str(cfg.parallel.fsdp.api) != "fsdp1":
            raise _refuse(f"parallel.fsdp.api={cfg.parallel.fsdp.api}: upstream wraps with FSDP1")
        if int(cfg.parallel.fsdp.degree) not in (-1, world_size):
            raise _refuse(f"parallel.fsdp.degree={cfg.parallel.fsdp.degree}: upstream shards over every rank")
        if world_size < 2:
            raise _refuse(
                f"parallel={name} on 1 rank: upstream asserts --dit_fsdp and --t5_fsdp need "
                "a process group of several ranks"
            )
        flags.append("--dit_fsdp")
        flags.append("--t5_cpu" if str(cfg.parallel.text_encoder_placement) == "cpu" else "--t5_fsdp")
    elif str(cfg.parallel.text_encoder_placement) == "cpu":
        flags.append("--t5_cpu")
    return flags


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def workload_flags(cfg: Any, job_dir: Optional[Path]) -> list[str]:
    """Upstream's flags for the workload and model settings (docs/upstream.md, "Settings").
    Unset inputs are left to upstream's defaults: its example prompt, image and audio."""
    wl = cfg.workload
    sampler = SamplerName(wl.sampler).value
    if sampler not in UPSTREAM_SOLVERS:
        raise ConfigError(
            f"workload.sampler={sampler}: upstream's --sample_solver offers unipc and dpm++; "
            "use workload.sampler=unipc with workload=upstream"
        )
    flags = [
        "--task",
        TASK,
        "--ckpt_dir",
        _absolute(str(cfg.model.checkpoint_dir)),
        "--size",
        str(wl.size),
        "--infer_frames",
        str(wl.frames_per_clip),
        "--sample_steps",
        str(wl.sample_steps),
        "--sample_shift",
        f"{float(wl.shift):g}",
        "--sample_guide_scale",
        f"{float(wl.guidance_scale):g}",
        "--sample_solver",
        UPSTREAM_SOLVERS[sampler],
        "--base_seed",
        str(int(cfg.seed)),
    ]
    if int(wl.clips) != -1:  # -1: as many clips as the audio gives, upstream's default
        flags += ["--num_clip", str(wl.clips)]
    if wl.prompt:
        flags += ["--prompt", str(wl.prompt)]
    for flag, path in (("--image", wl.image_path), ("--audio", wl.audio_path)):
        if path:
            flags += [flag, _absolute(str(path))]
    if wl.offload_model is not None:
        flags += ["--offload_model", str(bool(wl.offload_model))]
    if wl.convert_model_dtype:
        flags.append("--convert_model_dtype")
    if job_dir is not None:
        flags += ["--save_file", str(Path(job_dir) / VIDEO_FILE)]
    return flags


def upstream_arguments(cfg: Any, world_size: int, job_dir: Optional[Path]) -> list[str]:
    """generate.py's whole argument list for this job (without the script name)."""
    return workload_flags(cfg, job_dir) + strategy_flags(cfg, world_size)


UPSTREAM_FPS = 16  # upstream's sample_fps for S2V (wan/configs/shared_config.py)


def ignored_settings(cfg: Any) -> list[str]:
    """Settings of wan-exp's own pipeline that upstream's generate.py has no flag for: they run,
    but do nothing (kept as warnings in the rank records and results.json)."""
    wl, found = cfg.workload, []
    if wl.negative_prompt != S2V_NEGATIVE_PROMPT:
        found.append("workload.negative_prompt: upstream uses its own (sample_neg_prompt of its task config)")
    if int(wl.fps) != UPSTREAM_FPS:
        found.append(f"workload.fps={wl.fps}: upstream writes {UPSTREAM_FPS} fps")
    if not wl.size_from_image:
        found.append("workload.size_from_image=false: upstream always fits the image into the area of --size")
    if str(wl.save_video).lower() != WorkloadConfig.save_video:
        found.append(f"workload.save_video={wl.save_video}: upstream always writes the video")
    if str(cfg.parallel.vae) != VaePlacement.every_rank.value:
        found.append(f"parallel.vae={cfg.parallel.vae}: upstream decodes on every rank")
    if wl.drift_check:
        found.append("workload.drift_check=true: upstream's run has no bf16 reference to compare with")
    if cfg.model.compile:
        found.append("model.compile=true: upstream does not compile")
    if str(cfg.model.attention_backend) != "auto":
        found.append(f"model.attention_backend={cfg.model.attention_backend}: upstream picks its own attention")
    return [f"{text} (workload=upstream)" for text in found]


# ----------------------------------------------------------------------------- reading the checkout
def _syntax_tree(path: Path) -> ast.Module:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError) as exc:
        raise ConfigError(f"workload.repo: {path} cannot be read as Python ({type(exc).__name__}: {exc})") from None


def declared_flags(script: Path) -> set[str]:
    """Every ``--flag`` that ``script`` passes to an ``add_argument`` call (its first string
    arguments), read from the source without running it."""
    flags = set()
    for node in ast.walk(_syntax_tree(script)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            flags |= {
                a.value
                for a in node.args
                if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("--")
            }
    return flags


def function_parameters(module: Path, function: str) -> Optional[list[str]]:
    """The parameter names of the top-level ``def function`` in ``module``, None if there is none."""
    for node in _syntax_tree(module).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == function:
            params = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            return [p.arg for p in params]
    return None


def literal_dict_keys(module: Path, name: str) -> Optional[set[str]]:
    """The string keys of a top-level ``name = {...}`` dict literal in ``module``; None when the
    module has no such literal (then nothing is checked against it)."""
    if not module.is_file():
        return None
    for node in _syntax_tree(module).body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return None


def attribute_assignments(module: Path) -> dict[str, Any]:
    """``obj.attr = <literal>`` assignments at the top level of ``module`` (upstream's task
    configs, e.g. ``s2v_14B.vae_checkpoint = 'Wan2.1_VAE.pth'``): attr -> value."""
    found: dict[str, Any] = {}
    if not module.is_file():
        return found
    for node in _syntax_tree(module).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Attribute):
            try:
                found[node.targets[0].attr] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return found


def patches_fsdp_broadcast(cfg: Any) -> bool:
    """The fsdp_fixed split under upstream: FSDP on and no broadcast of rank 0's weights
    (``parallel.fsdp.sync_module_states=false``), which upstream's shard_model does, so the
    runner patches it (wan_exp/upstream/runner.py)."""
    return fsdp_shards(cfg.parallel.fsdp.degree) and not bool(cfg.parallel.fsdp.sync_module_states)
