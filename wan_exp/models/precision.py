"""``model.precision`` applied to a built DiT from outside the model (as parallelism is), and
the drift check that measures what it costs (docs/precision.md).

:func:`apply_precision` puts the blocks' linear layers in FP8 with row-wise scales through
torchao's inference quantisation (``quantize_`` with a float8 dynamic-activation /
float8-weight config, ``PerRow`` granularity: one scale per weight row and per activation
token) and turns on 8-bit attention (models.attention). The layers kept in the model's dtype
are the ones the engines keep too, and the ones whose error the whole output feels:
embeddings (patch, text, time, audio), every norm, the timestep modulation and the head
(:data:`FP8_LINEAR_PATTERN` is the one list).

:class:`DriftCheck` keeps a bf16 reference of the DiT (a copy before quantisation where the
linear layers change, else the same module run with full-precision attention), runs it beside
the job's own forward on the first ``workload.drift_steps`` steps and on one whole clip, and
records the flow's relative L2 error and the frames' PSNR/SSIM in the rank record.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from wan_exp.metrics.drift import frame_drift, relative_l2
from wan_exp.models import attention
from wan_exp.precision_support import drift_check_on, precision_name, precision_needs

# The linear layers that run in FP8: the blocks' attention projections and FFN, and the audio
# injectors' attention projections (together ~all of the DiT's GEMM FLOPs). Everything else
# stays in the model's dtype: text/time embeddings and the timestep projection (modulation),
# the head, the audio encoder and AdaLN layers (evaluated in fp32 by the model), every norm,
# the convolutions of the patch embedding and the frame packer.
FP8_LINEAR_PATTERN = re.compile(
    r"blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)|blocks\.\d+\.ffn\.(0|2)"
    r"|audio_injector\.injector\.\d+\.(q|k|v|o)"
)
FP8_LINEAR_KERNEL = "torchao float8 e4m3, row-wise scales, dynamic activation scales (torch._scaled_mm)"


class PrecisionError(RuntimeError):
    """model.precision cannot be applied on this rank (the pre-launch check should have said so)."""


def linear_layers(model: nn.Module) -> list[str]:
    """Names of every nn.Linear of the model, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def fp8_linear_names(model: nn.Module) -> list[str]:
    """The linear layers model.precision puts in FP8 (:data:`FP8_LINEAR_PATTERN`)."""
    return [name for name in linear_layers(model) if FP8_LINEAR_PATTERN.fullmatch(name)]


def apply_precision(model: nn.Module, precision: Any, device: torch.device) -> dict:
    """Apply model.precision to a loaded DiT on ``device``; returns what was applied (for the
    rank record). bf16 changes nothing but resets the attention to the model's dtype."""
    name = precision_name(precision)
    needs = precision_needs(name)
    report: dict = {"precision": name, "fp8_linear": None, "attention_bits": needs.attention}
    if name != "bf16" and torch.device(device).type != "cuda":
        raise PrecisionError(
            f"model.precision={name} runs 8-bit GPU kernels; this rank runs on {device}: use model.precision=bf16"
        )
    if needs.fp8_linear:
        try:
            from torchao.quantization import (
                Float8DynamicActivationFloat8WeightConfig,
                PerRow,
                quantize_,
            )
        except ImportError as err:
            raise PrecisionError(f"model.precision={name} needs torchao ({err}): pip install torchao") from err
        chosen = set(fp8_linear_names(model))
        quantize_(
            model,
            Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
            filter_fn=lambda module, fqn: fqn in chosen,
        )
        report["fp8_linear"] = {
            "kernel": FP8_LINEAR_KERNEL,
            "layers": len(chosen),
            "kept_in_model_dtype": [n for n in linear_layers(model) if n not in chosen],
        }
    attention.configure_attention_bits(needs.attention)
    return report


def reference_copy(model: nn.Module) -> nn.Module:
    """A copy of the DiT with its own weights, sharing the sequence sharding (its process groups
    cannot be copied); modules compiled with nn.Module.compile are compiled again on the copy (a
    copied compiled call would run the original's forward)."""
    compiled = {
        name: module._compiled_call_impl
        for name, module in model.named_modules()
        if getattr(module, "_compiled_call_impl", None) is not None
    }
    modules = dict(model.named_modules())
    for name in compiled:
        modules[name]._compiled_call_impl = None
    sharding = getattr(model, "sequence_sharding", None)
    try:
        reference = copy.deepcopy(model, memo={} if sharding is None else {id(sharding): sharding})
    finally:
        for name, call in compiled.items():
            modules[name]._compiled_call_impl = call
    copies = dict(reference.named_modules())
    for name in compiled:
        copies[name].compile()
    return reference


class DriftCheck:
    """The bf16 reference of this rank's DiT and the drift figures measured against it."""

    def __init__(self, reference: nn.Module, steps: int, ctx: Any) -> None:
        self.reference = reference
        self.steps = steps
        self.ctx = ctx
        self.flow_rel_l2: list[dict] = []  # one entry per checked forward: step, relative L2
        self.frames: dict | None = None
        self._in_reference = False

    def attach(self, dit: nn.Module) -> None:
        """Compare every forward of ``dit`` in the checked steps with the reference's."""
        dit.register_forward_hook(self._after_forward, with_kwargs=True)

    def _checking(self) -> bool:
        step = self.ctx.current_step
        return not self._in_reference and self.ctx.current_phase == "step" and step is not None and step < self.steps

    def run_reference(self, fn: Callable[[nn.Module], Any]) -> Any:
        """``fn(reference)`` with full-precision attention and no drift hook firing."""
        self._in_reference = True
        try:
            with attention.full_precision(), torch.no_grad():
                return fn(self.reference)
        finally:
            self._in_reference = False

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        if not self._checking():
            return
        with self.ctx.metrics.aside("drift_check"):  # not the job's own denoise time
            expected = self.run_reference(lambda reference: reference(*args, **kwargs))
        self.flow_rel_l2.append({"step": self.ctx.current_step, "rel_l2": relative_l2(output, expected)})
        self.ctx.metrics.note("drift", self.record())

    def compare_frames(
        self,
        reference_pixels: Callable[[nn.Module], torch.Tensor | None],
        pixels: torch.Tensor | None,
        keep_frames: int,
    ) -> None:
        """PSNR/SSIM of a clip's frames against the same clip sampled and decoded with the
        reference (``reference_pixels(reference)``; every rank calls it: it may hold collectives).
        Ranks that hold no pixels record none."""
        expected = self.run_reference(reference_pixels)
        if pixels is not None and expected is not None:
            self.frames = frame_drift(pixels[:, :, -keep_frames:], expected[:, :, -keep_frames:])
        self.ctx.metrics.note("drift", self.record())

    def record(self) -> dict:
        """What the rank record keeps under ``drift``."""
        values = [entry["rel_l2"] for entry in self.flow_rel_l2]
        return {
            "flow_rel_l2": self.flow_rel_l2,
            "flow_rel_l2_max": max(values) if values else None,
            "checked_steps": self.steps,
            **(self.frames or {}),
        }


def setup_precision(dit: nn.Module, cfg: Any, ctx: Any) -> DriftCheck | None:
    """Apply model.precision to this rank's loaded, split DiT and, when workload.drift_check is
    on, keep its bf16 reference (taken before the weights change). Notes what was applied."""
    needs = precision_needs(cfg.model.precision)
    drift = None
    if drift_check_on(cfg):
        reference = reference_copy(dit) if needs.fp8_linear else dit
        drift = DriftCheck(reference, int(cfg.workload.drift_steps), ctx)
        drift.attach(dit)
    ctx.metrics.note("precision", apply_precision(dit, cfg.model.precision, ctx.device))
    return drift
