"""The drift figures of workload.drift_check against independent references: the relative L2
error against the plain formula, PSNR against its formula on images with a known error, SSIM
against scikit-image on known images; and a CPU job with the check on records them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from launch_helpers import job_results, output, run_launch
from wan_exp.metrics.drift import frame_drift, relative_l2


def test_relative_l2_matches_the_plain_formula():
    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(2, 16, 3, 5, 7, generator=gen)
    value = (reference + 0.03 * torch.randn(reference.shape, generator=gen)).to(torch.bfloat16)
    ref_list, value_list = reference.flatten().tolist(), value.float().flatten().tolist()
    expected = math.sqrt(sum((v - r) ** 2 for v, r in zip(value_list, ref_list))) / math.sqrt(
        sum(r * r for r in ref_list)
    )
    # both sides sum the same 3360 squares in double precision: agreement to ~1e-15 relative
    assert relative_l2(value, reference) == pytest.approx(expected, rel=1e-12)


def test_relative_l2_edge_cases():
    zero = torch.zeros(4)
    assert relative_l2(zero, zero) == 0.0
    assert relative_l2(torch.ones(4), zero) == math.inf
    assert relative_l2(2 * torch.ones(4), torch.ones(4)) == 1.0
    with pytest.raises(ValueError, match=r"shapes differ, \(4,\) vs \(5,\)"):
        relative_l2(zero, torch.zeros(5))


def known_clip(frames: int = 3, height: int = 32, width: int = 40) -> torch.Tensor:
    """(1, 3, T, H, W) in [-1, 1]: smooth gradients with a checkerboard, away from the clamp."""
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    channels = [
        0.5 * torch.sin(0.2 * x + 0.3 * t),
        0.5 * torch.cos(0.15 * y - 0.2 * t),
        0.4 * ((x // 4 + y // 4) % 2) - 0.2,
    ]
    return torch.stack(channels).float()[None]


def test_psnr_matches_its_formula_on_a_known_error():
    """Every pixel off by 0.02 in [-1, 1], i.e. 0.01 in [0, 1]: MSE 1e-4, PSNR 10 log10(1/1e-4) = 40 dB."""
    reference = known_clip()
    shifted = reference + 0.02
    mse = np.mean(((shifted.numpy() + 1) / 2 - (reference.numpy() + 1) / 2) ** 2, dtype=np.float64)
    expected = 10 * math.log10(1.0 / mse)
    result = frame_drift(shifted, reference)
    # fp32 pixels: the 0.01 offsets carry ~1e-7 relative rounding, so MSE to ~1e-6: 1e-5 dB
    assert result["psnr_db"] == pytest.approx(expected, abs=1e-4)
    assert expected == pytest.approx(40.0, abs=1e-3)
    assert result["frames_identical"] is False and result["frames"] == 3


def test_ssim_matches_scikit_image_on_known_images():
    """SSIM with the 11x11 Gaussian window (sigma 1.5), population covariances, data range 1,
    averaged over the frames: scikit-image computes the same definition in float64."""
    reference = known_clip()
    gen = torch.Generator().manual_seed(1)
    noisy = (reference + 0.1 * torch.randn(reference.shape, generator=gen)).clamp(-1, 1)
    mine = frame_drift(noisy, reference)["ssim"]
    a, b = ((noisy[0] + 1) / 2).clamp(0, 1).numpy(), ((reference[0] + 1) / 2).clamp(0, 1).numpy()
    per_frame = [
        structural_similarity(
            a[:, i],
            b[:, i],
            data_range=1.0,
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for i in range(a.shape[1])
    ]
    # torchmetrics filters in float32: local means and variances of values in [0, 1] carry ~1e-7
    # relative error, which the SSIM ratio turns into ~1e-6; 1e-4 leaves room for the border
    assert mine == pytest.approx(float(np.mean(per_frame)), abs=1e-4)
    assert 0.0 < mine < 0.99


def test_identical_frames_record_no_psnr_and_ssim_one():
    clip = known_clip()
    result = frame_drift(clip, clip.clone())
    assert result["psnr_db"] is None and result["frames_identical"] is True
    assert result["ssim"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_a_job_with_the_drift_check_records_it_and_keeps_it_out_of_the_pipeline_time(tmp_path):
    """bf16 against its own bf16 reference on the CPU: flow error 0, identical frames, in
    results.json and the dashboard; the check's stage is timed apart from the pipeline."""
    proc = run_launch(tmp_path, "workload.drift_check=true", "logger.mode=disabled")
    assert proc.returncode == 0, output(proc)
    (results,) = job_results(tmp_path)
    summary = results["summary"]
    assert summary["precision"] == "bf16"
    assert summary["drift_flow_rel_l2"] == 0.0 and summary["drift_frames_identical"] is True
    assert summary["drift_psnr_db"] is None and summary["drift_ssim"] == pytest.approx(1.0, abs=1e-6)
    for record in results["ranks"]:
        # one step checked, two forwards (conditional and unconditional)
        assert [e["step"] for e in record["drift"]["flow_rel_l2"]] == [0, 0]
        assert record["attention_kernels"]["selected"] == record["attention_backend"] == "sdpa"
    stages = summary["stages_s"]
    assert stages["drift_check"] > 0
    assert summary["pipeline_s"] == pytest.approx(sum(v for k, v in stages.items() if k != "drift_check"))
    report = (tmp_path / "report.md").read_text()
    assert "flow rel L2" in report and "SSIM" in report
