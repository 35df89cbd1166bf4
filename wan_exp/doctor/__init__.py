"""``python -m wan_exp.doctor``: is this machine ready for a wan-exp run, and if not, why?

Prints one table (``--json`` for machines), a row per thing checked, each with a status
and, where there is something to do, a hint:

- torch (version, C++ ABI) and the CUDA/cuDNN it was built with;
- each GPU through NVML (name, memory used/total, utilisation), the driver's CUDA version,
  CUDA_VISIBLE_DEVICES; "none" on a CPU-only machine;
- flash-attn: imported and run on a tiny input in a subprocess
  (``wan_exp.models.attention.flash_attn_status``); on failure the error, what it means and
  which SDPA backend attention falls back to;
- versions of hydra-core, omegaconf, wandb, transformers, safetensors, peft, nvidia-ml-py;
- NCCL variables (deprecated names with their TORCH_NCCL_* replacements, blocking wait,
  NCCL_NVLS_ENABLE);
- the allocator string(s) PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF;
- the size of /dev/shm;
- the usable CPU cores, OMP_NUM_THREADS / MKL_NUM_THREADS (a value that is not a positive
  integer warns: each rank would take every core) and the 1-minute load average (warns when
  other processes keep more than a quarter of the cores busy);
- harness workers running now (PID, rank, job dir, last heartbeat).

Statuses: ``ok``; ``warn`` = works, but slower, deprecated, inert or risky, read the hint;
``FAIL`` = a run will not work as things stand.

Exit status 1 when any row is FAIL, which happens exactly when:
- torch does not import, or its version is outside wan-exp's requirement;
- hydra-core, omegaconf, wandb, transformers, safetensors or peft is missing or outside
  wan-exp's requirement (every run imports them: the workload registry loads train_lora,
  and with it peft, whatever the workload); nvidia-ml-py only warns (GPU figures);
- an allocator string holds an unknown key or a value torch rejects (torch would raise at
  the first CUDA allocation of every rank);
- CUDA_VISIBLE_DEVICES names a GPU that does not exist, or repeats one ("-1" or "",
  which hide every GPU on purpose, are fine);
- the NVIDIA driver supports an older CUDA major version than torch was built for;
- ``--gpus N`` asks for more GPUs than are visible (also on a machine without GPUs).
Otherwise 0, warnings included: flash-attn absent or broken (SDPA takes over), a small
/dev/shm, deprecated NCCL names, inert allocator settings and busy GPUs all let a run start.

The doctor initialises no CUDA context (GPU figures come from NVML) and takes a couple of
seconds, most of it importing torch here and in the flash-attn subprocess.
"""

from __future__ import annotations

import os
from typing import Mapping

from wan_exp.devices import read_nvml
from wan_exp.doctor.allocator import allocator_rows
from wan_exp.doctor.flash import flash_attn_rows
from wan_exp.doctor.gpus import gpu_rows
from wan_exp.doctor.nccl import nccl_rows
from wan_exp.doctor.rows import FAIL, OK, WARN, Row, exit_status, format_table
from wan_exp.doctor.software import package_rows, read_torch_info, torch_rows, wan_exp_requirements
from wan_exp.doctor.system import machine_rows, shm_rows
from wan_exp.doctor.workers import find_workers, worker_rows

__all__ = ["FAIL", "OK", "WARN", "Row", "diagnose", "exit_status", "format_table"]


def diagnose(env: Mapping[str, str] | None = None, required_gpus: int = 0) -> list[Row]:
    """Every row of the doctor's table, in display order. ``env`` defaults to this
    process's environment (what the launcher and its ranks would inherit)."""
    env = os.environ if env is None else env
    requirements = wan_exp_requirements()
    torch_info = read_torch_info()
    gpus, visible = gpu_rows(read_nvml(), env, torch_info.cuda, required_gpus)
    return [
        *torch_rows(torch_info, requirements),
        *gpus,
        *flash_attn_rows(torch_info, have_gpu=bool(visible)),
        *package_rows(requirements),
        *nccl_rows(env, [gpu.name for gpu in visible]),
        *allocator_rows(env, torch_info.version),
        *shm_rows(env),
        *machine_rows(env),
        *worker_rows(find_workers()),
    ]
