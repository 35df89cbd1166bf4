"""Attention entry point: backends agree with the softmax formula on CPU, `auto` records what
ran, unknown or unusable backends fail with a clear message, and the flash-attn probe."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from tolerance import close_kwargs
from wan_exp.models import attention as attn


@pytest.fixture(autouse=True)
def restore_auto():
    yield
    attn.configure("auto")


def qkv(seed=0, nq=7, nk=9):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, nq, 3, 16, generator=g),
        torch.randn(2, nk, 3, 16, generator=g),
        torch.randn(2, nk, 3, 16, generator=g),
    )


# two fp32 evaluations in other summation orders: scores over the head size (16), the softmax's
# sum and the weighting over the keys (9), a chain of 3 reductions (tests/tolerance.py)
ATTENTION_TOLERANCE = close_kwargs(torch.float32, terms=16, depth=3)


def formula(q, k, v):
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_math", "sdpa_flash"])
def test_cpu_backends_agree_with_the_formula(backend):
    q, k, v = qkv()
    attn.configure(backend)
    out = attn.attention(q, k, v)
    assert attn.selected_backend() == backend
    assert out.shape == q.shape
    torch.testing.assert_close(out, formula(q, k, v), **ATTENTION_TOLERANCE)


def test_auto_on_cpu_picks_sdpa_and_records_it():
    attn.configure("auto")
    assert attn.selected_backend() is None
    q, k, v = qkv(1)
    torch.testing.assert_close(attn.attention(q, k, v), formula(q, k, v), **ATTENTION_TOLERANCE)
    assert attn.selected_backend() == "sdpa"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(attn.AttentionBackendError, match="model.attention_backend='flash3' is unknown; choose one of"):
        attn.configure("flash3")


def test_backend_that_cannot_run_names_itself_and_the_way_out():
    attn.configure("sdpa_cudnn")  # needs a CUDA device
    with pytest.raises(attn.AttentionBackendError) as err:
        attn.attention(*qkv())
    assert "model.attention_backend='sdpa_cudnn': no backend ran on cpu" in str(err.value)
    assert "sdpa_math" in str(err.value)
    (why,) = attn.backend_report()["not_chosen"].values()  # recorded for the rank record too
    assert list(attn.backend_report()["not_chosen"]) == ["sdpa_cudnn"] and why.split(":")[0] in str(err.value)


def test_every_candidate_passed_over_is_recorded_with_why(monkeypatch):
    """auto on a CUDA device with none of the extra packages importable: fa3, fa4 and
    flash_attn are recorded as not installed; the LSE search in fp32 records the kernels that
    take half precision only. (Only the candidate lists are built: no GPU is needed.)"""
    monkeypatch.setattr(attn, "module_importable", lambda module: False)
    rejected: dict[str, str] = {}
    candidates = attn._auto_candidates(torch.device("cuda"), rejected)
    assert candidates == ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math"]
    assert rejected == {
        "fa3": "not installed (module flash_attn_interface not importable)",
        "fa4": "not installed (module flash_attn.cute not importable)",
        "flash_attn": "not installed (module flash_attn not importable)",
    }
    attn.configure("sdpa_math")
    attn.configure("auto")  # a new request clears what an earlier one recorded
    assert attn.backend_report()["not_chosen_lse"] == {}
    assert attn._lse_candidates(torch.device("cuda"), torch.float32) == ["lse_sdpa_efficient", "lse_math"]
    lse_rejected = attn.backend_report()["not_chosen_lse"]
    assert lse_rejected["lse_sdpa_cudnn"] == lse_rejected["lse_sdpa_flash"] == "takes fp16/bf16 only, not torch.float32"
    assert lse_rejected["lse_fa3"].startswith("not installed")


def test_flash_attn_status_reports_and_diagnoses():
    status = attn.flash_attn_status()
    assert set(status) == {"ok", "version", "error", "diagnosis", "forward_ran"}
    if not attn.importable_backends()["flash_attn"]:
        assert status["ok"] is False and status["forward_ran"] is False
        assert status["diagnosis"].startswith("flash-attn is not installed")
    elif not torch.cuda.is_available():
        assert status["ok"] is False and "no CUDA device" in status["error"]


@pytest.mark.parametrize(
    "error, meaning",
    [
        ("ImportError: /x/flash_attn_2_cuda.so: undefined symbol: _ZN3c10", "another torch version or C++ ABI"),
        ("RuntimeError: CUDA error: no kernel image is available", "another GPU architecture"),
        ("ImportError: No module named 'flash_attn'", "flash-attn is not installed"),
        ("ImportError: cannot import name 'flash_attn_func' from 'flash_attn' (unknown location)", "use fa4"),
        ("something new", "see the error text"),
    ],
)
def test_flash_attn_errors_are_diagnosed(error, meaning):
    assert meaning in attn.diagnose_flash_attn_error(error)


def test_flash_attn_4_alone_is_not_taken_for_flash_attn_2(tmp_path, monkeypatch):
    # flash-attn 4 installs flash_attn/cute without flash_attn/__init__.py: `flash_attn` is then a
    # namespace package, findable although flash-attn 2 (flash_attn_func) is absent
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        found = attn.importable_backends()
    finally:
        for name in ("flash_attn.cute", "flash_attn"):
            sys.modules.pop(name, None)
    assert found["fa4"] is True
    assert found["flash_attn"] is False


@pytest.mark.gpu
@pytest.mark.skipif(not attn.importable_backends()["fa4"], reason="flash-attn 4 not installed (bench/fa4_carry.sh)")
def test_fa4_agrees_with_fp32_sdpa_at_the_wan_head_shape():
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4096, 40, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    attn.configure("fa4")
    out = attn.attention(q, k, v)
    assert attn.selected_backend() == "fa4" and out.shape == q.shape
    attn.configure("sdpa_math")
    reference = attn.attention(q.float(), k.float(), v.float())
    assert float((out.float() - reference).norm() / reference.norm()) < 1e-2
