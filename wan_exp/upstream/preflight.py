"""workload=upstream's checks before launch: :func:`check_upstream` (called by preflight.validate).

A bad input is named before any rank starts: a folder that is no Wan2.2 checkout, a
generate.py that lacks a flag the job needs (read from its source, see
wan_exp.upstream.command), an FSDP helper without the function the fsdp_fixed patch wraps,
a size upstream does not offer, and a checkpoint folder missing a file upstream loads
(the names come from the checkout's own task config, wan/configs/wan_s2v_14B.py).

No torch import: the launching process uses this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wan_exp.config import ConfigError, Precision
from wan_exp.upstream.command import (
    FSDP_FUNCTION,
    FSDP_HELPER,
    GENERATE_SCRIPT,
    TASK,
    attribute_assignments,
    declared_flags,
    function_parameters,
    literal_dict_keys,
    patches_fsdp_broadcast,
    upstream_arguments,
)

CONFIGS_MODULE = Path("wan") / "configs" / "__init__.py"  # WAN_CONFIGS and SIZE_CONFIGS
TASK_CONFIG = Path("wan") / "configs" / "wan_s2v_14B.py"
# What upstream's S2V pipeline loads from --ckpt_dir (wan/configs/wan_s2v_14B.py, wan/speech2video.py),
# used where the checkout's task config does not say: attribute -> default file or folder name.
CHECKPOINT_FILES = {
    "t5_checkpoint": "models_t5_umt5-xxl-enc-bf16.pth",
    "vae_checkpoint": "Wan2.1_VAE.pth",
}
CHECKPOINT_FOLDERS = {
    "t5_tokenizer": "google/umt5-xxl",
    "wav2vec": "wav2vec2-large-xlsr-53-english",
}
DIT_CONFIG = "config.json"  # diffusers' from_pretrained reads it before the weights
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIT_SINGLE = "diffusion_pytorch_model.safetensors"
WAV2VEC_FILES = ("config.json", "preprocessor_config.json")
WAV2VEC_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# generate.py's example inputs, used when workload.image_path / audio_path are unset (relative to the checkout)
EXAMPLE_INPUTS = {"workload.image_path": "examples/i2v_input.JPG", "workload.audio_path": "examples/talk.wav"}


def check_checkout(repo: Any) -> Path:
    """The checkout folder, or ConfigError naming workload.repo."""
    if not repo:
        raise ConfigError(
            "workload=upstream needs workload.repo=<a Wan2.2 checkout> (git clone https://github.com/Wan-Video/Wan2.2)"
        )
    folder = Path(str(repo)).expanduser()
    missing = [
        name
        for name, ok in ((GENERATE_SCRIPT, (folder / GENERATE_SCRIPT).is_file()), ("wan/", (folder / "wan").is_dir()))
        if not ok
    ]
    if not folder.is_dir() or missing:
        what = "does not exist" if not folder.is_dir() else f"has no {' and no '.join(missing)}"
        raise ConfigError(
            f"workload.repo={repo!r} {what}: it is not a Wan2.2 checkout "
            "(git clone https://github.com/Wan-Video/Wan2.2)"
        )
    return folder.resolve()


def check_flags(repo: Path, arguments: list[str], strategy: str) -> None:
    """Every flag of the job's command line is declared by the checkout's generate.py."""
    declared = declared_flags(repo / GENERATE_SCRIPT)
    missing = [a for a in dict.fromkeys(arguments) if a.startswith("--") and a not in declared]
    if missing:
        raise ConfigError(
            f"workload.repo={str(repo)!r}: its {GENERATE_SCRIPT} declares no {', '.join(missing)}, which "
            f"parallel={strategy} with these workload settings needs (generate.py {' '.join(arguments)}); "
            "use a Wan2.2 checkout with speech-to-video support, or another strategy"
        )


def check_fsdp_helper(repo: Path) -> None:
    """parallel=fsdp_fixed wraps wan/distributed/fsdp.py's shard_model(..., sync_module_states)."""
    helper = repo / FSDP_HELPER
    params = function_parameters(helper, FSDP_FUNCTION) if helper.is_file() else None
    if params is None or "sync_module_states" not in params:
        what = (
            "does not exist"
            if not helper.is_file()
            else f"defines no {FSDP_FUNCTION}()"
            if params is None
            else f"has {FSDP_FUNCTION}({', '.join(params)}) without sync_module_states"
        )
        raise ConfigError(
            f"parallel=fsdp_fixed patches {FSDP_HELPER}'s {FSDP_FUNCTION}(sync_module_states=...), "
            f"but {helper} {what}; use parallel=fsdp to run the checkout as it is"
        )


def check_task_and_size(repo: Path, size: str) -> None:
    tasks = literal_dict_keys(repo / CONFIGS_MODULE, "WAN_CONFIGS")
    if tasks is not None and TASK not in tasks:
        raise ConfigError(
            f"workload.repo={str(repo)!r}: {CONFIGS_MODULE} has no task {TASK!r} "
            f"(it has {', '.join(sorted(tasks))}); use a checkout with Wan2.2-S2V"
        )
    sizes = literal_dict_keys(repo / CONFIGS_MODULE, "SIZE_CONFIGS")
    if sizes is not None and str(size) not in sizes:
        raise ConfigError(
            f"workload.size={size!r}: upstream's --size accepts only {', '.join(sorted(sizes))} "
            f"({CONFIGS_MODULE}); pick one of them"
        )


def missing_checkpoint_files(repo: Path, checkpoint_dir: Path) -> list[str]:
    """Files and folders upstream loads from --ckpt_dir that ``checkpoint_dir`` lacks."""
    task = attribute_assignments(repo / TASK_CONFIG)
    missing = []
    for attr, default in CHECKPOINT_FILES.items():
        name = str(task.get(attr, default))
        if not (checkpoint_dir / name).is_file():
            missing.append(name)
    for attr, default in CHECKPOINT_FOLDERS.items():
        name = str(task.get(attr, default))
        folder = checkpoint_dir / name
        if not folder.is_dir():
            missing.append(f"{name}/")
        elif attr == "wav2vec":
            missing += [f"{name}/{f}" for f in WAV2VEC_FILES if not (folder / f).is_file()]
            if not any((folder / w).is_file() for w in WAV2VEC_WEIGHTS):
                missing.append(f"{name}/{' or '.join(WAV2VEC_WEIGHTS)}")
    if not (checkpoint_dir / DIT_CONFIG).is_file():
        missing.append(DIT_CONFIG)
    index = checkpoint_dir / DIT_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return missing + [f"{DIT_INDEX} (unreadable: no weight_map)"]
        missing += [s for s in shards if not (checkpoint_dir / s).is_file()]
    elif not (checkpoint_dir / DIT_SINGLE).is_file():
        missing.append(f"{DIT_INDEX} (or {DIT_SINGLE})")
    return missing


def check_upstream(cfg: Any, world_size: int) -> None:
    """Every check of a workload=upstream job before launch; ConfigError naming the setting."""
    repo = check_checkout(cfg.workload.repo)
    strategy = str(cfg.parallel.name)
    for setting, value in (
        ("launcher.simulate_world_size", int(cfg.launcher.simulate_world_size)),
        ("launcher.share_gpus", bool(cfg.launcher.share_gpus)),
    ):
        if value:
            raise ConfigError(
                f"{setting}={value} with workload=upstream: upstream's generate.py joins its own "
                "NCCL process group, one GPU per rank (no fake or shared-GPU ranks); leave it unset"
            )
    if str(cfg.model.precision) != Precision.bf16.value:
        raise ConfigError(
            f"model.precision={cfg.model.precision} with workload=upstream: upstream's generate.py has no "
            "precision setting and runs its DiT in bf16; use model.precision=bf16 (the pair then compares like "
            "with like)"
        )
    if not cfg.model.checkpoint_dir:
        raise ConfigError(
            "workload=upstream needs model.checkpoint_dir=<a Wan2.2-S2V-14B folder>; "
            "`python -m wan_exp.checkpoint write model=s2v_14b out=<dir>` writes one with "
            "random weights (docs/upstream.md)"
        )
    arguments = upstream_arguments(cfg, world_size, job_dir=Path("job"))  # ConfigError: a split it lacks
    check_flags(repo, arguments, strategy)
    if patches_fsdp_broadcast(cfg):
        check_fsdp_helper(repo)
    check_task_and_size(repo, cfg.workload.size)
    checkpoint_dir = Path(str(cfg.model.checkpoint_dir)).expanduser()
    missing = missing_checkpoint_files(repo, checkpoint_dir)
    if missing:
        raise ConfigError(
            f"model.checkpoint_dir={str(cfg.model.checkpoint_dir)!r} lacks what upstream's "
            f"{TASK} loads: {', '.join(missing)} (names from {TASK_CONFIG} of the checkout); "
            "point it at a Wan2.2-S2V-14B folder"
        )
    for setting, example in EXAMPLE_INPUTS.items():
        if not _setting(cfg, setting) and not (repo / example).is_file():
            raise ConfigError(
                f"{setting} is unset, so upstream's generate.py reads its example {example}, "
                f"which {repo} lacks; set {setting}"
            )


def _setting(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node
