"""NCCL-related variables in this environment (the ranks inherit them).

Deprecated names come from wan_exp.host.envvars, the one place that maps them for the ranks.
"""

from __future__ import annotations

from typing import Mapping

from wan_exp.doctor.rows import OK, WARN, Row
from wan_exp.host.envvars import DEPRECATED_NCCL_NAMES

PREFIXES = ("NCCL_", "TORCH_NCCL_")
BLOCKING_WAIT_NAMES = ("TORCH_NCCL_BLOCKING_WAIT", "NCCL_BLOCKING_WAIT")
NVLS = "NCCL_NVLS_ENABLE"
# docs/facts.md §9: on this workplace's H200 machines NVLink multicast (NVLS) must stay off.
NVLS_OFF_GPUS = ("H200",)
WATCHDOG_HINT = (
    "blocking wait disables the NCCL watchdog: a stuck collective surfaces only as a "
    "timeout in the rank that waits on it"
)


def _is_true(value: str) -> bool:
    return value.strip() not in ("", "0")


def nccl_rows(env: Mapping[str, str], gpu_names: list[str]) -> list[Row]:
    rows = []
    for name in sorted(n for n in env if n.startswith(PREFIXES)):
        value = env[name]
        hints, status = [], OK
        if name in DEPRECATED_NCCL_NAMES:
            replacement = DEPRECATED_NCCL_NAMES[name]
            status = WARN
            hints.append(
                f"deprecated: use {replacement}={value} (torch warns; wan-exp's launcher renames it"
                f" for the ranks{'; ' + replacement + ' is also set and wins' if replacement in env else ''})"
            )
        if name in BLOCKING_WAIT_NAMES and _is_true(value):
            status = WARN
            hints.append(WATCHDOG_HINT + "; unset it (nccl=debug gives timeouts with dumps instead)")
        rows.append(Row(name, status, value, "; ".join(hints)))
    if NVLS not in env:
        needs_off = [n for n in gpu_names if any(tag in n for tag in NVLS_OFF_GPUS)]
        if needs_off:
            rows.append(
                Row(
                    NVLS,
                    WARN,
                    "unset (NCCL uses NVLink multicast where it can)",
                    f"on this workplace's {needs_off[0]} machines set {NVLS}=0",
                )
            )
        else:
            rows.append(Row(NVLS, OK, "unset (NCCL default)"))
    return rows
