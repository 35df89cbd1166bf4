"""torch, its CUDA build, and the Python packages wan-exp needs.

Package versions come from ``importlib.metadata`` (no heavy imports); the version each
package must have comes from wan-exp's own requirements (pyproject.toml, as installed), so
this module never restates a version range.
"""

from __future__ import annotations

import importlib.metadata as metadata
from dataclasses import dataclass

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from wan_exp.doctor.rows import FAIL, OK, WARN, Row

# Shown in this order. A missing package blocks a run (FAIL) unless it is listed in
# NEEDED_ONLY_FOR, which says what will fail without it. peft is not listed there: the
# workload registry imports train_lora, and with it peft, for every workload.
PACKAGES = ("hydra-core", "omegaconf", "wandb", "transformers", "safetensors", "peft", "nvidia-ml-py")
NEEDED_ONLY_FOR = {
    "nvidia-ml-py": "GPU rows here and the ranks' NVML memory figure",
    # the launcher logs to W&B after results.json is safe; without wandb it only warns
    "wandb": "W&B runs (logger=offline|online); results.json and the report do not need it",
}
INSTALL_HINTS = {
    "wandb": "pip install wandb (or run with logger=disabled)",
}


@dataclass
class TorchInfo:
    """What the doctor learnt from importing torch (no CUDA initialisation)."""

    version: str | None  # None when torch does not import
    cuda: str | None  # CUDA version torch was built with; None for a CPU build
    cudnn: int | None
    cxx11_abi: bool | None
    error: str | None = None


def read_torch_info() -> TorchInfo:
    try:
        import torch
    except Exception as exc:  # a broken install raises OSError/ImportError/RuntimeError alike
        return TorchInfo(None, None, None, None, error=f"{type(exc).__name__}: {exc}")
    # cudnn.version() only loads the library; it does not create a CUDA context
    cudnn = torch.backends.cudnn.version() if torch.version.cuda else None
    return TorchInfo(torch.__version__, torch.version.cuda, cudnn, bool(torch._C._GLIBCXX_USE_CXX11_ABI))


def wan_exp_requirements() -> dict[str, Requirement]:
    """Canonical name -> requirement, for the unconditional dependencies of the installed
    wan-exp (extras such as [flash] and [test] are left out). Empty when wan-exp runs from
    a checkout that was never installed."""
    try:
        lines = metadata.requires("wan-exp") or []
    except metadata.PackageNotFoundError:
        return {}
    reqs = (Requirement(line) for line in lines)
    return {canonicalize_name(r.name): r for r in reqs if r.marker is None}


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_row(name: str, version: str | None, requirement: Requirement | None) -> Row:
    """A package's row: missing, outside the required range, or fine."""
    wanted = f" (wan-exp needs {requirement.specifier})" if requirement and requirement.specifier else ""
    blocking = FAIL if name not in NEEDED_ONLY_FOR else WARN
    if version is None:
        needed_for = NEEDED_ONLY_FOR.get(name, "every run")
        hint = f"needed for {needed_for}: {INSTALL_HINTS.get(name, f'pip install {name}')}"
        return Row(name, blocking, "not installed" + wanted, hint)
    if requirement and not requirement.specifier.contains(version, prereleases=True):
        return Row(name, blocking, version + wanted, f"pip install '{requirement}'")
    return Row(name, OK, version)


def torch_rows(info: TorchInfo, requirements: dict[str, Requirement]) -> list[Row]:
    if info.version is None:
        return [
            Row(
                "torch",
                FAIL,
                f"does not import: {info.error}",
                "install the torch build for your CUDA driver (https://pytorch.org/get-started)",
            )
        ]
    row = version_row("torch", info.version, requirements.get("torch"))
    row.value += f" (C++11 ABI {'on' if info.cxx11_abi else 'off'})"
    if info.cuda:
        cuda = Row("CUDA (torch build)", OK, f"{info.cuda}, cuDNN {info.cudnn}")
    else:
        cuda = Row(
            "CUDA (torch build)",
            OK,
            "none: CPU build of torch",
            "runs use the CPU with gloo; install a CUDA build of torch for GPUs",
        )
    return [row, cuda]


def package_rows(requirements: dict[str, Requirement]) -> list[Row]:
    return [version_row(name, installed_version(name), requirements.get(name)) for name in PACKAGES]
