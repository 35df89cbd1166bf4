"""Every model.precision on a GPU: the DiT (a reduced config with the 14B head dim, and one block
of the 14B shapes) runs, stays within the stated drift of its bf16 self, and the kernels the
rank records are the ones that ran. A precision whose library or compute capability is missing
here is skipped, saying which (the pre-launch check refuses it the same way).

Stated drift (relative L2 of the flow against the bf16 forward of the same weights and inputs):
- FP8 linears: e4m3 keeps 3 mantissa bits, so rounding moves a value by at most 2^-4 of it,
  ~2^-4/sqrt(3) = 3.6e-2 RMS; a GEMM with both operands rounded and independent errors is off
  by ~sqrt(2) x 3.6e-2 = 5.1e-2 relative. The residual stream (kept in fp32) carries the
  embeddings unchanged, so the whole forward drifts less than one GEMM: bound 6e-2.
- INT8 Q.K^T with per-block scales (SageAttention): a step of 1/127 of each block's largest
  value, ~2.3e-3 RMS relative per operand, then the 16-bit P.V: bound 2e-2, the bf16 tolerance
  of tests/test_fast_path_gpu.py.
- FP8 P.V adds e4m3 rounding to the attention output only: bound 6e-2 as for one GEMM; fp8
  (both): the two add in quadrature at most, bound 8e-2.
The 14B goal (flow relative L2 <= 3e-2 at 480x832) is measured by bench/precision.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from launch_helpers import job_results, output, run_launch
from test_fast_path_gpu import build, make_inputs, reduced_cfg
from wan_exp.metrics.drift import relative_l2
from wan_exp.models import attention, attention_8bit
from wan_exp.models.precision import apply_precision, fp8_linear_names, reference_copy
from wan_exp.precision_support import NEEDS

pytestmark = pytest.mark.gpu

DRIFT_BOUND = {"fp8_linear": 6e-2, "int8_attention": 2e-2, "fp8_attention": 6e-2, "fp8": 8e-2}
# one block at the 14B shapes (dim 5120, 40 heads of 128, FFN 13824, text 4096) with one audio injection
ONE_14B_BLOCK = {
    "dim": 5120,
    "ffn_dim": 13824,
    "num_heads": 40,
    "num_layers": 1,
    "text_dim": 4096,
    "text_len": 512,
    "freq_dim": 256,
    "audio_dim": 1024,
    "audio_layers": 25,
    "audio_inject_layers": [0],
}


def skip_unless_runnable(precision: str) -> None:
    needs = NEEDS[precision]
    capability = torch.cuda.get_device_capability()
    if needs.min_capability and capability < needs.min_capability:
        pytest.skip(f"{precision} needs compute capability {needs.min_capability}, this GPU has {capability}")
    for group in needs.libraries:
        if not any(library.installed() for library in group):
            pytest.skip(f"{precision} needs {' or '.join(lib.name for lib in group)}: {group[0].install}")


@pytest.fixture
def counted_kernels(monkeypatch):
    """Calls per 8-bit attention kernel, counted by wrapping each one."""
    calls = dict.fromkeys(attention_8bit.KERNELS_8BIT, 0)

    def counting(name, kernel):
        def run(q, k, v):
            calls[name] += 1
            return kernel(q, k, v)

        return run

    for name, kernel in list(attention_8bit.KERNELS_8BIT.items()):
        monkeypatch.setitem(attention_8bit.KERNELS_8BIT, name, counting(name, kernel))
    yield calls
    attention.configure_attention_bits(None)


@pytest.mark.parametrize("shape", ["reduced", "one_14b_block"])
@pytest.mark.parametrize("precision", ["fp8_linear", "int8_attention", "fp8_attention", "fp8"])
def test_precision_runs_within_its_drift_and_records_the_kernels_that_ran(precision, shape, counted_kernels):
    skip_unless_runnable(precision)
    cfg = reduced_cfg("s2v_14b", **(ONE_14B_BLOCK if shape == "one_14b_block" else {}))
    model = build(cfg, torch.bfloat16)
    reference = reference_copy(model)
    report = apply_precision(model, precision, torch.device("cuda"))
    inputs = {k: v if k == "timestep" else v.bfloat16() for k, v in make_inputs(cfg, seed=0).items()}
    with torch.inference_mode():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = model(**inputs).float()
        with attention.full_precision():
            expected = reference(**inputs).float()
    assert torch.isfinite(got).all()
    drift = relative_l2(got, expected)
    assert drift <= DRIFT_BOUND[precision], (precision, shape, drift)

    ops = {event.key for event in prof.key_averages()}
    kernels = attention.backend_report()
    if NEEDS[precision].fp8_linear:
        fp8 = [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "Float8" in type(m.weight).__name__
        ]
        assert fp8 == fp8_linear_names(model) and report["fp8_linear"]["layers"] == len(fp8)
        assert "aten::_scaled_mm" in ops  # the FP8 GEMM ran
    else:
        assert report["fp8_linear"] is None and "aten::_scaled_mm" not in ops
    if NEEDS[precision].attention:
        chosen = kernels["selected_8bit"]
        assert counted_kernels[chosen] > 0
        assert all(count == 0 for name, count in counted_kernels.items() if name != chosen)
        assert set(kernels["not_chosen_8bit"]) < set(attention_8bit.ORDER_8BIT[NEEDS[precision].attention])
    else:
        assert "selected_8bit" not in kernels and not any(counted_kernels.values())


@pytest.mark.slow
def test_an_fp8_job_records_precision_kernels_and_drift(tmp_path):
    """One generate job at model.precision=fp8 (head dim 128): results.json names the kernels
    and the drift of its warm-up step and of the clip's frames."""
    skip_unless_runnable("fp8")
    proc = run_launch(
        tmp_path,
        "parallel=single",
        "model.precision=fp8",
        "model.dtype=bf16",
        "model.dim=512",
        "model.num_heads=4",
        "model.ffn_dim=1024",
        "logger.mode=disabled",
    )
    assert proc.returncode == 0, output(proc)
    (results,) = job_results(tmp_path)
    summary, record = results["summary"], results["ranks"][0]
    assert summary["precision"] == "fp8" and summary["fp8_linear_layers"] > 0
    assert summary["attention_kernels"]["selected_8bit"] in ("sage_fp8", "fa3_fp8")
    assert 0 < summary["drift_flow_rel_l2"] <= DRIFT_BOUND["fp8"]
    assert summary["drift_ssim"] is not None and summary["drift_psnr_db"] is not None
    assert [e["step"] for e in record["drift"]["flow_rel_l2"]] == [0, 0]
    json.dumps(results, allow_nan=False)  # every figure is plain JSON
