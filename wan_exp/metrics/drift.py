"""How far a lower-precision run drifts from the bf16 one (docs/precision.md).

- :func:`relative_l2`: ``||x - ref||_2 / ||ref||_2`` over every element, accumulated in fp64
  (a 14B flow has ~5e6 elements per forward: fp32 sums would round at ~1e-7 of the total,
  harmless, but fp64 costs nothing here and keeps the figure exact to its inputs).
- :func:`frame_drift`: PSNR and SSIM of decoded frames against the bf16 frames (torchmetrics),
  on pixels in [0, 1] (the VAE's [-1, 1] mapped): PSNR from the mean squared error over the
  whole clip; SSIM with its usual 11x11 Gaussian window (sigma 1.5), averaged over the pixels
  whose window lies inside the frame (Wang et al.'s reference code and scikit-image do the same;
  torchmetrics' own mean also takes the 5-pixel border, whose windows see padding) and the frames.
"""

from __future__ import annotations

import math

import torch


def relative_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative L2 error of ``value`` against ``reference`` (same shape); 0.0 for two zero
    tensors, inf for a non-zero value against a zero reference."""
    if value.shape != reference.shape:
        raise ValueError(f"relative_l2: shapes differ, {tuple(value.shape)} vs {tuple(reference.shape)}")
    error = torch.linalg.vector_norm((value.double() - reference.double()).flatten()).item()
    norm = torch.linalg.vector_norm(reference.double().flatten()).item()
    if norm == 0.0:
        return 0.0 if error == 0.0 else math.inf
    return error / norm


SSIM_BORDER = 5  # the 11x11 window's radius: pixels nearer the edge see the padding


def unit_frames(pixels: torch.Tensor) -> torch.Tensor:
    """(1, 3, T, H, W) decoded pixels in [-1, 1] -> (T, 3, H, W) fp32 in [0, 1]."""
    return ((pixels[0].float().transpose(0, 1) + 1.0) / 2.0).clamp(0.0, 1.0)


def frame_drift(pixels: torch.Tensor, reference: torch.Tensor) -> dict[str, float | None]:
    """PSNR (dB) and SSIM of decoded frames (1, 3, T, H, W) in [-1, 1] against the reference's.
    Identical frames have an infinite PSNR, recorded as None with ``frames_identical`` true
    (JSON has no infinity)."""
    # imported here, not with the module: torchmetrics brings scipy and matplotlib (about 1 s),
    # which every rank would pay at start-up for a check only some jobs run
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    frames, target = unit_frames(pixels), unit_frames(reference)
    identical = bool(torch.equal(frames, target))
    psnr = peak_signal_noise_ratio(frames, target, data_range=1.0).item()
    _, ssim_map = structural_similarity_index_measure(frames, target, data_range=1.0, return_full_image=True)
    ssim = ssim_map[..., SSIM_BORDER:-SSIM_BORDER, SSIM_BORDER:-SSIM_BORDER].mean().item()
    return {
        "psnr_db": None if identical else psnr,
        "ssim": ssim,
        "frames_identical": identical,
        "frames": int(frames.shape[0]),
    }
