"""What each ``model.precision`` needs and whether this machine has it, checked before launch.

A precision is two independent choices (docs/precision.md): the blocks' linear layers in FP8
with row-wise scales (torchao), and 8-bit attention (SageAttention, flash-attn 3). Each needs
a kernel library that is not a core dependency (``pip install -e ".[gpu]"``) and a GPU whose
tensor cores have the 8-bit format: FP8 from compute capability 8.9 (Ada, Hopper and newer),
INT8 from 8.0 (Ampere). The capability is read through NVML (wan_exp.devices), without
initialising CUDA; the libraries are looked up without importing them. No torch import: the
launching process runs this for every job of a sweep (preflight.check_job calls
:func:`check_precision`).

``workload.drift_check`` (on by default for any precision but bf16) runs the bf16 forward
beside the job's own, so its rules are here too: the checked steps must be warm-up steps (their
time is never measured), and only the generate workload samples a flow.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wan_exp.config import ConfigError, DType, Precision, WorkloadName
from wan_exp.devices import JobShape, visible_compute_capabilities
from wan_exp.installed import module_importable
from wan_exp.parallel.dims import parallel_dims

FP8_MIN_CAPABILITY = (8, 9)  # FP8 (e4m3) tensor-core matmuls: Ada 8.9, Hopper 9.0 and newer
INT8_MIN_CAPABILITY = (8, 0)  # SageAttention's INT8 Q.K kernels: Ampere 8.0 and newer
GPU_EXTRA = 'pip install -e ".[gpu]"'


@dataclass(frozen=True)
class Library:
    """A kernel library a precision needs: how to tell it is installed, and how to install it."""

    name: str
    installed: Callable[[], bool]
    install: str  # the command that installs it


def sageattention_fp8_kernels_found() -> bool:
    """SageAttention 2 built with its FP8 P.V kernels (``_qattn_sm89`` / ``_qattn_sm90``
    extension modules); the PyPI wheel (SageAttention 1, Triton) has none. Looked up in the
    package folder so that the package (which imports torch and triton) is not imported."""
    try:
        spec = importlib.util.find_spec("sageattention")
    except (ImportError, ValueError):
        return False
    folders = list(spec.submodule_search_locations or []) if spec else []
    return any(
        next(Path(folder).glob(f"_qattn_sm{arch}*"), None) is not None for folder in folders for arch in ("89", "90")
    )


TORCHAO = Library("torchao", lambda: module_importable("torchao"), "pip install torchao")
SAGEATTENTION = Library("sageattention", lambda: module_importable("sageattention"), "pip install sageattention")
SAGEATTENTION_FP8 = Library(
    "SageAttention 2 (FP8 P.V kernels)",
    sageattention_fp8_kernels_found,
    "build it from source: pip install git+https://github.com/thu-ml/SageAttention --no-build-isolation",
)
FLASH_ATTN_3 = Library(
    "flash-attn 3 (flash_attn_interface)",
    lambda: module_importable("flash_attn_interface"),
    "build flash-attn's hopper/ folder: cd flash-attention/hopper && python setup.py install",
)


@dataclass(frozen=True)
class PrecisionNeeds:
    """What one model.precision changes and needs."""

    fp8_linear: bool  # the blocks' linear layers in FP8 (torchao)
    attention: str | None  # "int8", "fp8" or None (the model's dtype)
    min_capability: tuple[int, int] | None
    # every group must have one installed library (a group lists alternatives)
    libraries: tuple[tuple[Library, ...], ...]


NEEDS: dict[str, PrecisionNeeds] = {
    "bf16": PrecisionNeeds(False, None, None, ()),
    "fp8_linear": PrecisionNeeds(True, None, FP8_MIN_CAPABILITY, ((TORCHAO,),)),
    "int8_attention": PrecisionNeeds(False, "int8", INT8_MIN_CAPABILITY, ((SAGEATTENTION,),)),
    "fp8_attention": PrecisionNeeds(False, "fp8", FP8_MIN_CAPABILITY, ((SAGEATTENTION_FP8, FLASH_ATTN_3),)),
    "fp8": PrecisionNeeds(True, "fp8", FP8_MIN_CAPABILITY, ((TORCHAO,), (SAGEATTENTION_FP8, FLASH_ATTN_3))),
}


def precision_name(value: Any) -> str:
    """model.precision as its plain name (the enum or a string)."""
    return str(getattr(value, "value", value))


def precision_needs(value: Any) -> PrecisionNeeds:
    """The needs of one model.precision; ConfigError naming the setting for an unknown one."""
    name = precision_name(value)
    if name not in NEEDS:
        raise ConfigError(f"model.precision={name!r} is unknown; choose one of {', '.join(NEEDS)}")
    return NEEDS[name]


def drift_check_on(cfg: Any) -> bool:
    """workload.drift_check resolved: its value where set, else on for any precision but bf16;
    only the generate workload samples a flow to compare."""
    wl = cfg.workload
    if WorkloadName(wl.name) != WorkloadName.generate:
        return False
    if wl.drift_check is None:
        return precision_name(cfg.model.precision) != Precision.bf16.value
    return bool(wl.drift_check)


def _format_capability(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def check_drift_settings(cfg: Any) -> None:
    """workload.drift_check / drift_steps: the checked steps are warm-up steps."""
    wl, name = cfg.workload, precision_name(cfg.model.precision)
    if wl.drift_steps < 1:
        raise ConfigError(f"workload.drift_steps={wl.drift_steps} must be >= 1")
    if wl.drift_check and WorkloadName(wl.name) != WorkloadName.generate:
        raise ConfigError(
            f"workload.drift_check=true compares sampled flows, which workload={WorkloadName(wl.name).value} "
            "does not sample; use workload=generate or leave workload.drift_check unset"
        )
    if drift_check_on(cfg) and wl.drift_steps > wl.warmup_steps:
        why = "set" if wl.drift_check else f"on by default for model.precision={name}"
        raise ConfigError(
            f"workload.drift_check ({why}) runs the bf16 forward beside the first "
            f"workload.drift_steps={wl.drift_steps} step(s), which must be warm-up steps so that no measured "
            f"step pays for it, but workload.warmup_steps={wl.warmup_steps}; raise workload.warmup_steps to "
            f"{wl.drift_steps}, lower workload.drift_steps, or set workload.drift_check=false"
        )


def check_precision(
    cfg: Any, shape: JobShape, capabilities: list[tuple[str, tuple[int, int] | None]] | None = None
) -> None:
    """Refuse, before launch, a model.precision this job or machine cannot run (ConfigError
    naming the setting, the value and what to do). ``capabilities``: (name, compute capability)
    of the visible GPUs (default: read through NVML)."""
    model, name = cfg.model, precision_name(cfg.model.precision)
    needs = precision_needs(name)
    check_drift_settings(cfg)
    if name == Precision.bf16.value:
        return
    setting = f"model.precision={name}"
    if shape.device != "cuda":
        need = (
            f"compute capability >= {_format_capability(needs.min_capability)}"
            if needs.min_capability
            else "a CUDA GPU"
        )
        raise ConfigError(
            f"{setting} runs 8-bit GPU kernels ({need}: FP8 from 8.9, Ada/Hopper or newer; INT8 attention "
            "from 8.0), but this job runs on the CPU (no GPU visible); use model.precision=bf16 here, or run "
            "the job on such a GPU"
        )
    if DType(model.dtype) != DType.bf16:
        raise ConfigError(
            f"{setting} quantises a bf16 model, but model.dtype={DType(model.dtype).value}; "
            "set model.dtype=bf16 or model.precision=bf16"
        )
    if WorkloadName(cfg.workload.name) == WorkloadName.train_lora:
        raise ConfigError(
            f"{setting} is an inference setting; workload=train_lora trains bf16 adapters: use model.precision=bf16"
        )
    dims = parallel_dims(cfg, shape.world_size)
    if needs.fp8_linear and dims.fsdp_enabled:
        raise ConfigError(
            f"{setting} quantises each whole weight once after loading, which FSDP's sharded weights do not "
            f"allow (parallel={cfg.parallel.name}); use a split without FSDP, parallel.fsdp.degree=0 "
            "(parallel=single, ulysses, cfg or cfg_ulysses), or "
            "model.precision=int8_attention / fp8_attention (attention only)"
        )
    if needs.attention and dims.ring > 1:
        raise ConfigError(
            f"{setting} runs 8-bit attention, but parallel.ring_degree>1 merges chunks of attention by their "
            "log-sum-exp, which the 8-bit kernels do not return; use Ulysses (parallel.ring_degree=1) or "
            "model.precision=bf16 / fp8_linear"
        )
    found = visible_compute_capabilities() if capabilities is None else capabilities
    for gpu, capability in found[: max(shape.gpus, 1)]:
        if capability is not None and needs.min_capability and tuple(capability) < needs.min_capability:
            raise ConfigError(
                f"{setting} needs compute capability >= {_format_capability(needs.min_capability)}, but {gpu} "
                f"has {_format_capability(tuple(capability))}; use model.precision=bf16"
                + (" or int8_attention" if tuple(capability) >= INT8_MIN_CAPABILITY else "")
                + " on this GPU"
            )
    for group in needs.libraries:
        if not any(library.installed() for library in group):
            how = "; or ".join(f"{library.name}: {library.install}" for library in group)
            raise ConfigError(
                f"{setting} needs {' or '.join(lib.name for lib in group)}, which is not installed "
                f"({how}; {GPU_EXTRA} installs the kept ones)"
            )
