"""8-bit attention kernels for ``model.precision`` (int8_attention, fp8_attention, fp8).

Each takes and returns ``(B, N, H, d)`` tensors like models.attention's backends:

- ``sage_int8``: SageAttention's INT8 Q.K^T with a 16-bit P.V (its Triton kernel; the PyPI
  wheel ``sageattention`` is SageAttention 1, which has only this one).
- ``sage_fp8``: SageAttention 2's INT8 Q.K^T with an FP8 P.V (CUDA kernels for compute
  capability 8.9 and 9.0; built from source).
- ``fa3_fp8``: flash-attn 3's FP8 forward (Hopper): q, k, v cast to e4m3 with one scale per
  batch and head, the scales passed as descale factors.

The kernels are Python calling their own extensions or Triton, so a compiled block calls them
eagerly (``torch.compiler.disable``), as it calls flash-attn 4.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448: the largest finite e4m3 value
AMAX_FLOOR = 1e-12  # an all-zero head gets scale 448/1e-12 instead of a division by zero


def quantize_fp8_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, H, d) -> e4m3 values and the (B, H) fp32 descale factors with
    ``x ≈ values * descale``: each head's largest magnitude maps to 448."""
    amax = x.abs().amax(dim=(1, 3)).float().clamp(min=AMAX_FLOOR)
    scale = FP8_MAX / amax
    values = (x.float() * scale[:, None, :, None]).to(FP8_DTYPE)
    return values, scale.reciprocal()


@torch.compiler.disable
def _sage_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    import sageattention

    # SageAttention 2 names its INT8/FP16 Triton kernel; SageAttention 1's sageattn is that kernel
    kernel = getattr(sageattention, "sageattn_qk_int8_pv_fp16_triton", None) or sageattention.sageattn
    return kernel(q, k, v, tensor_layout="NHD", is_causal=False)


@torch.compiler.disable
def _sage_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from sageattention import sageattn_qk_int8_pv_fp8_cuda

    return sageattn_qk_int8_pv_fp8_cuda(q, k, v, tensor_layout="NHD", is_causal=False)


@torch.compiler.disable
def _fa3_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn_interface import flash_attn_func

    (q8, q_descale), (k8, k_descale), (v8, v_descale) = (quantize_fp8_per_head(t) for t in (q, k, v))
    out = flash_attn_func(q8, k8, v8, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    return (out[0] if isinstance(out, tuple) else out).to(q.dtype)


KERNELS_8BIT: dict[str, Callable[..., torch.Tensor]] = {
    "sage_int8": _sage_int8,
    "sage_fp8": _sage_fp8,
    "fa3_fp8": _fa3_fp8,
}
# the module each kernel needs; a kernel whose module is missing is not tried
REQUIRED_MODULE_8BIT = {"sage_int8": "sageattention", "sage_fp8": "sageattention", "fa3_fp8": "flash_attn_interface"}
# attention bits -> kernels to try, first that runs wins (SageAttention first: what the engines
# of docs/precision.md use; the order between the two FP8 kernels is not measured yet)
ORDER_8BIT = {"int8": ("sage_int8",), "fp8": ("sage_fp8", "fa3_fp8")}
