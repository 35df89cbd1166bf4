"""flash-attn: does it import and run, and if not, what attention uses instead.

The probe and the meaning of its errors belong to wan_exp.models.attention (the same probe
decides ``model.attention_backend=auto``); this module only turns its answer into a row and
names the fallback.
"""

from __future__ import annotations

from wan_exp.doctor.rows import OK, WARN, Row
from wan_exp.doctor.software import TorchInfo


def fallback_backends(have_gpu: bool) -> list[str]:
    """What ``model.attention_backend=auto`` tries without flash-attn, fastest first."""
    from wan_exp.models import attention

    if not have_gpu:
        return list(attention.AUTO_ORDER_CPU)
    importable = attention.importable_backends()  # fa3 / fa4 live in other modules
    return [name for name in attention.AUTO_ORDER_CUDA if name != "flash_attn" and importable.get(name, True)]


def flash_attn_rows(torch_info: TorchInfo, have_gpu: bool) -> list[Row]:
    if torch_info.version is None:
        return [Row("flash-attn", WARN, "not checked: torch does not import", "fix torch first")]
    from wan_exp.models.attention import flash_attn_status, importable_backends

    status = flash_attn_status()
    fallback = fallback_backends(have_gpu)
    instead = f"attention (auto) uses {fallback[0]} instead" + (
        f" (then {', '.join(fallback[1:])})" if len(fallback) > 1 else ""
    )
    if status["ok"]:
        return [Row("flash-attn", OK, f"{status['version']}: imports and runs a tiny forward")]
    if not importable_backends()["flash_attn"]:
        return [Row("flash-attn", OK, "not installed (optional)", instead)]
    if not have_gpu and status["version"] is not None and status["error"] and "no CUDA device" in status["error"]:
        return [Row("flash-attn", OK, f"{status['version']}: imports; no GPU to run it on", instead)]
    this_torch = (
        f"this torch: {torch_info.version}, CUDA {torch_info.cuda or 'none'}, "
        f"C++11 ABI {'on' if torch_info.cxx11_abi else 'off'}"
    )
    return [
        Row(
            "flash-attn",
            WARN,
            f"broken: {status['error']}",
            f"{status['diagnosis']} ({this_torch}); meanwhile {instead}",
        )
    ]
