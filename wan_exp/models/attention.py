"""The one attention entry point of the DiT, and the backends behind it.

``attention(q, k, v)`` takes and returns ``(B, N, H, d)`` tensors (tokens before heads, the
layout the Linear projections produce), so no caller transposes. The backend is chosen once
per process: ``configure(name)`` records the requested name (``model.attention_backend``);
``auto`` is resolved at the first call, on that call's device and dtype, by trying the
candidates fastest first and keeping the first that runs. ``selected_backend()`` says which
one ran; ``backend_report()`` gives the rank record what ran and every candidate passed over
and why (not installed, a broken build, or the error it raised), for the attention backend, ring
attention's log-sum-exp kernel and model.precision's 8-bit kernel.

flash-attn is a compiled extension that often does not match the installed torch (an
``undefined symbol`` at import); ``flash_attn_status()`` imports it and runs a tiny forward
in a subprocess, so a broken build is diagnosed without touching this process.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from wan_exp.installed import module_importable
from wan_exp.models.attention_8bit import KERNELS_8BIT, ORDER_8BIT, REQUIRED_MODULE_8BIT

SDPA_KERNELS = {
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
BACKENDS = ("flash_attn", "fa3", "fa4", "sdpa", *SDPA_KERNELS)
# `auto` on a GPU, fastest first (docs/facts.md §6: cuDNN 585, FA2 370, efficient 179 TFLOP/s on H100;
# flash-attn 4.0.0b36 663-678 TFLOP/s at the Wan shapes on H100, docs/benchmarks.md).
AUTO_ORDER_CUDA = ("fa3", "fa4", "sdpa_cudnn", "flash_attn", "sdpa_flash", "sdpa_efficient", "sdpa_math")
# On a CPU PyTorch's own choice among its SDPA kernels is the fastest that exists.
AUTO_ORDER_CPU = ("sdpa",)


class AttentionBackendError(RuntimeError):
    """The requested attention backend is unknown or cannot run here."""


# ----------------------------------------------------------------------------- backends
def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # SDPA wants (B, H, N, d); transposed views keep the last dim contiguous, which every
    # kernel accepts, and the output view is transposed back without a copy.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _sdpa_with(kernel: SDPBackend) -> Callable[..., torch.Tensor]:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([kernel]):
            return _sdpa(q, k, v)

    return run


def _first(out: torch.Tensor | tuple) -> torch.Tensor:
    # FA3 and FA4 return (out, softmax_lse) in some versions and out alone in others.
    return out[0] if isinstance(out, tuple) else out


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v)


def _fa3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn_interface import flash_attn_func

    return _first(flash_attn_func(q, k, v))


# FA4 is Python that JIT-compiles CuTe DSL kernels and registers no torch op, so dynamo cannot
# trace it: a compiled block calls it eagerly (one graph break per attention).
@torch.compiler.disable
def _fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn.cute import flash_attn_func

    return _first(flash_attn_func(q, k, v))


_IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "flash_attn": _flash_attn,
    "fa3": _fa3,
    "fa4": _fa4,
    "sdpa": _sdpa,
    **{name: _sdpa_with(kernel) for name, kernel in SDPA_KERNELS.items()},
}
# the module each optional backend needs; a missing one is skipped by `auto` without trying
_REQUIRED_MODULE = {"flash_attn": "flash_attn", "fa3": "flash_attn_interface", "fa4": "flash_attn.cute"}

# ----------------------------------------------------------------------------- selection
_requested = "auto"
_selected: str | None = None
# candidate -> why it was passed over (not importable, broken build, or the error it raised)
_rejected: dict[str, str] = {}
_rejected_lse: dict[str, str] = {}
# model.precision's attention bits ("int8", "fp8"; None: the model's dtype), set by
# models.precision; the 8-bit kernel is chosen at the first call like `auto`
_attention_bits: str | None = None
_selected_8bit: str | None = None
_rejected_8bit: dict[str, str] = {}
_full_precision = False  # inside full_precision(): the drift check's reference forward


def _backend_name(name: object) -> str:
    """Accept the config enum or a plain string."""
    return str(getattr(name, "value", name))


def configure(name: object) -> None:
    """Record the backend requested by ``model.attention_backend``; resolved at the first call."""
    global _requested, _selected, _selected_lse
    name = _backend_name(name)
    if name != "auto" and name not in BACKENDS:
        raise AttentionBackendError(
            f"model.attention_backend={name!r} is unknown; choose one of auto, {', '.join(BACKENDS)}"
        )
    if name != _requested:
        _requested, _selected, _selected_lse = name, None, None
        _lse_by_input.clear()
        _rejected.clear()
        _rejected_lse.clear()


def selected_backend() -> str | None:
    """The backend that ran (None before the first attention call)."""
    return _selected


def configure_attention_bits(bits: str | None) -> None:
    """8-bit attention for model.precision: "int8" or "fp8" (None: the backend of
    model.attention_backend in the model's dtype). The kernel is chosen at the first call."""
    global _attention_bits, _selected_8bit
    if bits is not None and bits not in ORDER_8BIT:
        raise AttentionBackendError(f"8-bit attention {bits!r} is unknown; choose one of {', '.join(ORDER_8BIT)}")
    _attention_bits, _selected_8bit = bits, None
    _rejected_8bit.clear()


@contextmanager
def full_precision() -> Iterator[None]:
    """Attention in the model's dtype inside the block, whatever model.precision says (the
    drift check's reference forward)."""
    global _full_precision
    before, _full_precision = _full_precision, True
    try:
        yield
    finally:
        _full_precision = before


def backend_report() -> dict:
    """Which attention kernels ran and why every candidate passed over did not (not installed,
    broken build, the error it raised), for the rank record: the backend of
    model.attention_backend, the log-sum-exp kernel of ring attention, and the 8-bit kernel
    where model.precision asks for one."""
    report = {
        "requested": _requested,
        "selected": _selected,
        "not_chosen": dict(_rejected),
        "selected_lse": _selected_lse,
        "not_chosen_lse": dict(_rejected_lse),
    }
    if _attention_bits is not None:
        report.update(bits=_attention_bits, selected_8bit=_selected_8bit, not_chosen_8bit=dict(_rejected_8bit))
    return report


def _why(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _unavailable(name: str) -> str | None:
    """Why ``name`` cannot run in this process before trying it (None: it may)."""
    module = _REQUIRED_MODULE.get(name)
    if module and not module_importable(module):
        return f"not installed (module {module} not importable)"
    if name == "flash_attn":
        status = flash_attn_status()
        if not status["ok"]:  # importable but broken (docs/facts.md §9): never touch it in this process
            return f"its build is broken: {status.get('diagnosis') or status.get('error')}"
    return None


def _auto_candidates(device: torch.device, rejected: dict[str, str]) -> list[str]:
    """The candidates to try, fastest first; those that cannot run here go into ``rejected``."""
    if device.type != "cuda":
        return list(AUTO_ORDER_CPU)
    candidates = []
    for name in AUTO_ORDER_CUDA:
        why = _unavailable(name)
        if why is None:
            candidates.append(name)
        else:
            rejected[name] = why
    return candidates


def _first_that_runs(
    candidates: list[str], implementations: dict[str, Callable], rejected: dict[str, str], *qkv: torch.Tensor
) -> tuple[str | None, Any, list[str]]:
    """The first of ``candidates`` whose implementation runs on ``qkv``: (its name, its output,
    "name: why" for each that failed before it, also recorded in ``rejected``); (None, None,
    failures) when none ran. An out-of-memory error is the job's, not a candidate's: it propagates."""
    failures = []
    for name in candidates:
        try:
            out = implementations[name](*qkv)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - any other failure means "does not run here"
            rejected[name] = _why(err)
            failures.append(f"{name}: {rejected[name]}")
            continue
        return name, out, failures
    return None, None, failures


@torch.compiler.disable  # imports, subprocesses and retries: run eagerly inside a compiled block
def _resolve_and_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    global _selected
    candidates = _auto_candidates(q.device, _rejected) if _requested == "auto" else [_requested]
    name, out, failures = _first_that_runs(candidates, _IMPLEMENTATIONS, _rejected, q, k, v)
    if name is not None:
        _selected = name
        return out
    raise AttentionBackendError(
        f"model.attention_backend={_requested!r}: no backend ran on {q.device} with "
        f"{q.dtype}, head dim {q.shape[-1]}: "
        + "; ".join(failures)
        + ". Use model.attention_backend=sdpa_math (always available) or fix the backend."
    )


@torch.compiler.disable
def _resolve_8bit_and_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The first 8-bit kernel of model.precision's attention bits that runs here. None running
    fails the job: a job labelled 8-bit must not measure 16-bit attention."""
    global _selected_8bit
    candidates = []
    for name in ORDER_8BIT[_attention_bits]:
        if module_importable(REQUIRED_MODULE_8BIT[name]):
            candidates.append(name)
        else:
            _rejected_8bit[name] = f"not installed (module {REQUIRED_MODULE_8BIT[name]} not importable)"
    name, out, _failures = _first_that_runs(candidates, KERNELS_8BIT, _rejected_8bit, q, k, v)
    if name is not None:
        _selected_8bit = name
        return out
    raise AttentionBackendError(
        f"{_attention_bits} attention (model.precision): no 8-bit kernel ran on {q.device} with {q.dtype}, "
        f"head dim {q.shape[-1]}: "
        + "; ".join(f"{n}: {why}" for n, why in _rejected_8bit.items())
        + '. Install the kernels (pip install -e ".[gpu]") or use model.precision=bf16 / fp8_linear.'
    )


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention, no mask, scale 1/sqrt(d). q (B, Nq, H, d), k/v (B, Nk, H, d) -> (B, Nq, H, d)."""
    if _attention_bits is not None and not _full_precision:
        if _selected_8bit is None:
            return _resolve_8bit_and_run(q, k, v)
        return KERNELS_8BIT[_selected_8bit](q, k, v)
    if _selected is None:
        return _resolve_and_run(q, k, v)
    return _IMPLEMENTATIONS[_selected](q, k, v)


# ----------------------------------------------------------------------------- with log-sum-exp
# Ring attention (parallel/ring.py) merges partial attentions over chunks of the keys, which
# needs each partial's log-sum-exp of the scaled scores per query and head. Every function
# here returns ``(out (B, Nq, H, d) in q's dtype, lse (B, H, Nq) float32)``.
def lse_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in fp32 from plain differentiable ops (the CPU path, and the path under
    autograd): scores, their log-sum-exp, and the probabilities as exp(score - lse), so a
    merge of chunks reproduces whole-sequence attention to fp32 rounding."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse.unsqueeze(-1)), v.float())
    return out.to(q.dtype), lse


def _normalise_lse(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(B, H, Nq) float32 from the layouts kernels return: (B, H, Nq[, 1]), padded Nq."""
    b, n, h, _ = q.shape
    lse = lse.reshape(b, h, -1) if lse.shape[0] == b and lse.shape[1] == h else lse.transpose(1, 2)
    return lse[:, :, :n].float()


def _lse_sdpa_op(op_name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        if op_name == "flash":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
        elif op_name == "efficient":
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True)[:2]
        return out.transpose(1, 2), _normalise_lse(lse, q)

    return run


def _lse_flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    return out, _normalise_lse(lse, q)


def _lse_fa3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn_interface import flash_attn_func

    result = flash_attn_func(q, k, v, return_attn_probs=True)
    return result[0], _normalise_lse(result[1], q)


@torch.compiler.disable
def _lse_fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse = _flash_attn_fwd(q, k, v)[:2]  # the forward that flash_attn_func wraps
    return out, _normalise_lse(lse, q)


LSE_IMPLEMENTATIONS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "lse_math": lse_math,
    "lse_sdpa_flash": _lse_sdpa_op("flash"),
    "lse_sdpa_cudnn": _lse_sdpa_op("cudnn"),
    "lse_sdpa_efficient": _lse_sdpa_op("efficient"),
    "lse_flash_attn": _lse_flash_attn,
    "lse_fa3": _lse_fa3,
    "lse_fa4": _lse_fa4,
}
# model.attention_backend -> the LSE kernels to try, first that runs wins
_LSE_CANDIDATES = {
    "flash_attn": ("lse_flash_attn",),
    "fa3": ("lse_fa3",),
    "fa4": ("lse_fa4",),
    "sdpa_flash": ("lse_sdpa_flash",),
    "sdpa_cudnn": ("lse_sdpa_cudnn",),
    "sdpa_efficient": ("lse_sdpa_efficient",),
    "sdpa_math": ("lse_math",),
    "sdpa": ("lse_sdpa_cudnn", "lse_sdpa_flash", "lse_sdpa_efficient"),
}
_selected_lse: str | None = None
# (device type, dtype) -> the LSE kernel that ran for such inputs: a kernel that takes bf16
# need not take fp32, so one choice never carries over to another dtype
_lse_by_input: dict[tuple[str, torch.dtype], str] = {}


def selected_lse_backend() -> str | None:
    """The log-sum-exp kernel ring attention last ran (None: no ring attention ran)."""
    return _selected_lse


# Kernels for fp16/bf16 only. Called as raw ops they skip SDPA's input checks, so they are
# never handed other dtypes (ring attention in fp32 on CUDA gave NaN on an H200 while these
# were first in line; the efficient kernel and the math path take fp32).
HALF_PRECISION_ONLY = ("lse_sdpa_flash", "lse_sdpa_cudnn", "lse_flash_attn", "lse_fa3", "lse_fa4")


def _lse_candidates(device: torch.device, dtype: torch.dtype) -> list[str]:
    if device.type != "cuda":
        return ["lse_math"]
    names = AUTO_ORDER_CUDA if _requested == "auto" else (_requested,)
    candidates = []
    for name in names:
        why = _unavailable(name) if _requested == "auto" else None
        for kernel in _LSE_CANDIDATES[name]:
            if why is not None:
                _rejected_lse.setdefault(kernel, why)
            elif dtype not in (torch.float16, torch.bfloat16) and kernel in HALF_PRECISION_ONLY:
                _rejected_lse.setdefault(kernel, f"takes fp16/bf16 only, not {dtype}")
            elif kernel not in candidates:
                candidates.append(kernel)
    return candidates


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp: ``(out (B, Nq, H, d), lse (B, H, Nq) fp32)``.

    The kernel follows ``model.attention_backend`` (auto: fastest first). Kernels drop the
    gradient of their log-sum-exp output, which a merge of chunks needs, so under autograd
    (train_lora) the differentiable math path runs. The choice is recorded
    (``selected_lse_backend``)."""
    global _selected_lse
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        _selected_lse = "lse_math"
        return lse_math(q, k, v)
    chosen = _lse_by_input.get((q.device.type, q.dtype))
    if chosen is not None:
        try:
            result = LSE_IMPLEMENTATIONS[chosen](q, k, v)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - not for this shape (head size, length): search again
            _rejected_lse[chosen] = f"failed on a later shape {tuple(q.shape)}: {_why(err)}"
            del _lse_by_input[(q.device.type, q.dtype)]
        else:
            _selected_lse = chosen
            return result
    name, result, failures = _first_that_runs(
        _lse_candidates(q.device, q.dtype), LSE_IMPLEMENTATIONS, _rejected_lse, q, k, v
    )
    if name is not None:
        _selected_lse = _lse_by_input[(q.device.type, q.dtype)] = name
        return result
    raise AttentionBackendError(
        f"model.attention_backend={_requested!r}: no attention kernel returning the log-sum-exp ran on "
        f"{q.device} with {q.dtype}: "
        + "; ".join(failures)
        + ". Use model.attention_backend=sdpa_math (the math path always runs)."
    )


# ----------------------------------------------------------------------------- flash-attn probe
_PROBE = r"""
import json, sys
report = {"ok": False, "version": None, "error": None, "forward_ran": False}
try:
    import flash_attn
    report["version"] = getattr(flash_attn, "__version__", None)
    from flash_attn import flash_attn_func
    import torch
    if torch.cuda.is_available():
        q = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
        out = flash_attn_func(q, q, q)
        torch.cuda.synchronize()
        report["forward_ran"] = bool(torch.isfinite(out).all())
        report["ok"] = report["forward_ran"]
        if not report["ok"]:
            report["error"] = "tiny forward returned non-finite values"
    else:
        report["error"] = "no CUDA device: flash-attn imports but cannot run here"
except BaseException as err:
    report["error"] = f"{type(err).__name__}: {err}"
print("FLASH_ATTN_STATUS " + json.dumps(report))
"""

# substrings of an error and what they mean, first match wins
_DIAGNOSES = (
    ("No module named 'flash_attn'", "flash-attn is not installed (optional; SDPA is used instead)"),
    (
        "cannot import name 'flash_attn_func' from 'flash_attn' (unknown location)",
        "flash-attn is not installed (flash_attn holds only flash-attn 4's cute package: use fa4)",
    ),
    (
        "undefined symbol",
        "flash-attn was built against another torch version or C++ ABI; "
        "reinstall it built for the installed torch (pip install flash-attn --no-build-isolation)",
    ),
    ("no kernel image", "flash-attn was built for another GPU architecture"),
    ("libcudart", "flash-attn needs a CUDA runtime library that is not found or has another version"),
    ("GLIBC", "flash-attn was built on a newer system (glibc) than this one"),
    ("no CUDA device", "no GPU visible: flash-attn can only run on a CUDA device"),
)


def diagnose_flash_attn_error(error: str | None) -> str | None:
    if not error:
        return None
    for needle, meaning in _DIAGNOSES:
        if needle in error:
            return meaning
    return "flash-attn failed to import or run; see the error text"


@functools.lru_cache(maxsize=1)
def flash_attn_status(timeout_s: float = 120.0) -> dict:
    """Import flash-attn and run a tiny forward in a subprocess.

    Returns ``{"ok", "version", "error", "diagnosis", "forward_ran"}``. A crash of the
    subprocess (a segfault in a mismatched extension) is reported, never propagated.
    """
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        error = f"the flash-attn probe did not finish within {timeout_s:.0f} s"
        return {"ok": False, "version": None, "error": error, "diagnosis": error, "forward_ran": False}
    marker = [line for line in proc.stdout.splitlines() if line.startswith("FLASH_ATTN_STATUS ")]
    if marker:
        report = json.loads(marker[-1].split(" ", 1)[1])
    else:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        report = {
            "ok": False,
            "version": None,
            "forward_ran": False,
            "error": f"probe exited with code {proc.returncode}: " + " | ".join(tail),
        }
    report["diagnosis"] = diagnose_flash_attn_error(report["error"])
    return report


def importable_backends() -> dict[str, bool]:
    """Which optional backend modules can be found (without importing them)."""
    return {name: module_importable(module) for name, module in _REQUIRED_MODULE.items()}


__all__ = [
    "BACKENDS",
    "AttentionBackendError",
    "attention",
    "configure",
    "selected_backend",
    "attention_with_lse",
    "lse_math",
    "selected_lse_backend",
    "LSE_IMPLEMENTATIONS",
    "flash_attn_status",
    "diagnose_flash_attn_error",
    "importable_backends",
]
