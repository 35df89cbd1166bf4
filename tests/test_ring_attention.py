"""Attention with its log-sum-exp, and the ring merge, in one process.

CPU: the math path against float64 softmax written here; merging key chunks with
parallel.ring.merge_partials equals attention over the whole sequence at odd lengths.
GPU (``gpu`` marker): every kernel that returns the log-sum-exp at the Wan head shape
(40 heads x 128, bf16) against the fp32 math path. Ring attention across real processes
is checked in tests/dist/split_equivalence.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tolerance import attention_reductions, chain_close_kwargs
from wan_exp.models import attention as attn
from wan_exp.parallel.ring import merge_partials


@pytest.fixture(autouse=True)
def restore_auto():
    attn._lse_by_input.clear()  # every test chooses its kernels afresh
    yield
    attn.configure("auto")
    attn._lse_by_input.clear()


def qkv(n_q: int, n_k: int, heads: int = 3, head_dim: int = 16, seed: int = 0, **kwargs):
    g = torch.Generator(kwargs.get("device", "cpu")).manual_seed(seed)
    return tuple(torch.randn(2, n, heads, head_dim, generator=g, **kwargs) for n in (n_q, n_k, n_k))


def float64_reference(q, k, v):
    """softmax(q k^T / sqrt(d)) v and log sum exp of the scores, in float64."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double()), scores.logsumexp(-1)


def fp32_bound(reductions: list[int], reference: torch.Tensor) -> dict:
    """assert_close's bound for an fp32 result of these reductions against the fp64 ``reference``,
    relative to its largest value (tests/tolerance.py)."""
    return chain_close_kwargs(torch.float32, reductions, scale=reference.abs().max().item())


def merged_reductions(head_dim: int, keys: int, chunks: int) -> list[int]:
    """Attention over ``chunks`` chunks of the keys merged: each merge after the first sums two
    log-sum-exps and two weighted outputs."""
    return attention_reductions(head_dim, keys) + [2, 2] * (chunks - 1)


@pytest.mark.parametrize("n_q, n_k", [(7, 9), (13, 1), (31, 29)])
def test_math_path_returns_attention_and_its_log_sum_exp(n_q, n_k):
    q, k, v = qkv(n_q, n_k)
    out, lse = attn.lse_math(q, k, v)
    ref_out, ref_lse = float64_reference(q, k, v)
    assert out.dtype == torch.float32 and lse.shape == (2, 3, n_q) and lse.dtype == torch.float32
    reductions = attention_reductions(16, n_k)
    torch.testing.assert_close(out.double(), ref_out, **fp32_bound(reductions, ref_out))
    torch.testing.assert_close(lse.double(), ref_lse, **fp32_bound(reductions, ref_lse))


@pytest.mark.parametrize("n_k, splits", [(29, [10, 10, 9]), (31, [1, 30]), (17, [5, 5, 5, 2])])
def test_merging_key_chunks_equals_whole_sequence_attention(n_k, splits):
    q, k, v = qkv(11, n_k, seed=n_k)
    out = lse = None
    for k_part, v_part in zip(k.split(splits, dim=1), v.split(splits, dim=1)):
        out, lse = merge_partials(out, lse, *attn.lse_math(q, k_part, v_part))
    ref_out, ref_lse = float64_reference(q, k, v)
    reductions = merged_reductions(16, n_k, len(splits))
    torch.testing.assert_close(out.double(), ref_out, **fp32_bound(reductions, ref_out))
    torch.testing.assert_close(lse.double(), ref_lse, **fp32_bound(reductions, ref_lse))


def test_on_cpu_the_math_path_runs_and_is_recorded():
    attn.configure("auto")
    q, k, v = qkv(5, 6)
    attn.attention_with_lse(q, k, v)
    assert attn.selected_lse_backend() == "lse_math"


def test_half_precision_kernels_are_never_handed_fp32_on_cuda():
    """The raw kernel ops skip SDPA's dtype checks: fp32 goes to the efficient kernel or the
    math path only; bf16 may use every kernel (the list is built without touching a GPU)."""
    cuda = torch.device("cuda")
    fp32 = attn._lse_candidates(cuda, torch.float32)
    assert not set(fp32) & set(attn.HALF_PRECISION_ONLY), fp32
    assert fp32[0] == "lse_sdpa_efficient" and "lse_math" in fp32
    bf16 = attn._lse_candidates(cuda, torch.bfloat16)
    assert bf16.index("lse_sdpa_cudnn") < bf16.index("lse_sdpa_efficient"), bf16


def test_the_kernel_chosen_for_one_dtype_is_not_reused_for_another(monkeypatch):
    """A kernel that ran for bf16 is not handed fp32 later: the choice is kept per dtype."""
    calls = []

    def half_only(q, k, v):
        calls.append(q.dtype)
        if q.dtype != torch.bfloat16:
            raise TypeError("half precision only")
        return attn.lse_math(q, k, v)

    monkeypatch.setitem(attn.LSE_IMPLEMENTATIONS, "half_only", half_only)
    monkeypatch.setattr(attn, "_lse_candidates", lambda device, dtype: ["half_only", "lse_math"])
    attn.configure("sdpa")  # a fresh choice (restore_auto sets auto back)
    q, k, v = qkv(5, 6)
    attn.attention_with_lse(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert attn.selected_lse_backend() == "half_only"
    out, lse = attn.attention_with_lse(q, k, v)
    assert attn.selected_lse_backend() == "lse_math"
    ref_out, ref_lse = float64_reference(q, k, v)
    torch.testing.assert_close(out.double(), ref_out, **fp32_bound(attention_reductions(16, 6), ref_out))
    attn.attention_with_lse(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert attn.selected_lse_backend() == "half_only"
    # bf16, fp32 (refused, then math), bf16 again from the kept choice: fp32 tried once only
    assert calls == [torch.bfloat16, torch.float32, torch.bfloat16]


def test_a_kept_kernel_that_refuses_a_new_shape_is_replaced_by_one_that_runs(monkeypatch):
    def head_16_only(q, k, v):
        if q.shape[-1] != 16:
            raise RuntimeError("head size not supported")
        return attn.lse_math(q, k, v)

    monkeypatch.setitem(attn.LSE_IMPLEMENTATIONS, "head_16_only", head_16_only)
    monkeypatch.setattr(attn, "_lse_candidates", lambda device, dtype: ["head_16_only", "lse_math"])
    attn.configure("sdpa")
    attn.attention_with_lse(*qkv(5, 6))
    assert attn.selected_lse_backend() == "head_16_only"
    q, k, v = qkv(5, 6, head_dim=8)
    out, lse = attn.attention_with_lse(q, k, v)
    assert attn.selected_lse_backend() == "lse_math"
    ref_out, ref_lse = float64_reference(q, k, v)
    reductions = attention_reductions(8, 6)
    torch.testing.assert_close(out.double(), ref_out, **fp32_bound(reductions, ref_out))
    torch.testing.assert_close(lse.double(), ref_lse, **fp32_bound(reductions, ref_lse))


def test_under_autograd_the_differentiable_math_path_runs():
    """Kernels drop the gradient of their log-sum-exp; the merge needs it."""
    q, k, v = (t.requires_grad_() for t in qkv(9, 9))
    out, lse = attn.attention_with_lse(q, k, v)
    assert attn.selected_lse_backend() == "lse_math"
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = float64_reference(*leaves)
    ref_grads = torch.autograd.grad(ref_out.sum() + ref_lse.sum(), leaves)
    # the forward, then its backward: v's gradient over the queries, the probabilities' over the
    # head size, the softmax's over the keys, q's over the keys and k's over the queries
    reductions = attention_reductions(16, 9) + [9, 16, 9, 9]
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad.double(), ref, **fp32_bound(reductions, ref))


# ----------------------------------------------------------------------------- GPU kernels
def _available(name: str) -> bool:
    module = {"lse_flash_attn": "flash_attn", "lse_fa3": "flash_attn_interface", "lse_fa4": "flash_attn.cute"}.get(name)
    if module is None:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name", ["lse_sdpa_flash", "lse_sdpa_cudnn", "lse_sdpa_efficient", "lse_flash_attn", "lse_fa3", "lse_fa4"]
)
@pytest.mark.parametrize("n_q, n_k", [(1031, 1031), (517, 1543)])
def test_gpu_kernel_returns_the_log_sum_exp_at_the_wan_head_shape(name, n_q, n_k):
    if not _available(name):
        pytest.skip(f"{name}: its package is not installed")
    q, k, v = qkv(n_q, n_k, heads=40, head_dim=128, device="cuda", dtype=torch.bfloat16)
    out, lse = attn.LSE_IMPLEMENTATIONS[name](q, k, v)
    ref_out, ref_lse = attn.lse_math(q.float(), k.float(), v.float())
    assert out.shape == q.shape and lse.shape == (2, 40, n_q) and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_ring_merge_at_the_tiny_model_shape_equals_float64_attention(dtype):
    """The tiny model's ring attention shape (4 heads x 16), in fp32 (its dtype) and bf16: the
    kernel auto picks returns finite values equal to float64 attention, merged over chunks."""
    attn.configure("auto")
    q, k, v = qkv(37, 41, heads=4, head_dim=16, device="cuda", dtype=dtype)
    ref_out, _ = float64_reference(q, k, v)
    out = lse = None
    for k_part, v_part in zip(k.tensor_split(3, dim=1), v.tensor_split(3, dim=1)):
        out, lse = merge_partials(out, lse, *attn.attention_with_lse(q, k_part, v_part))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all(), attn.selected_lse_backend()
    if dtype == torch.float32:
        bound = fp32_bound(merged_reductions(16, 41, 3), ref_out)
    else:
        bound = {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(out.double(), ref_out, **bound)


@pytest.mark.gpu
@pytest.mark.parametrize("chunks", [2, 4, 8])
def test_gpu_ring_merge_of_kernel_chunks_equals_the_whole_sequence_kernel(chunks):
    q, k, v = qkv(2053, 2053, heads=40, head_dim=128, device="cuda", dtype=torch.bfloat16)
    attn.configure("auto")
    whole = attn.attention(q, k, v).float()
    out = lse = None
    for k_part, v_part in zip(k.tensor_split(chunks, dim=1), v.tensor_split(chunks, dim=1)):
        out, lse = merge_partials(out, lse, *attn.attention_with_lse(q, k_part, v_part))
    assert attn.selected_lse_backend() != "lse_math"
    torch.testing.assert_close(out, whole, atol=2e-2, rtol=2e-2)
