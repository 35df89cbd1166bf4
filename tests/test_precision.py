"""model.precision on the CPU: the setting checked before launch (bad value, FP8 on a CPU or an
old GPU, missing kernel libraries, settings it cannot go with), the compute capability read
through NVML, the FP8 quantisation of 8-bit attention, the bf16 reference copy and the drift
hook. The kernels themselves run only on a GPU: tests/test_precision_gpu.py."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from omegaconf import OmegaConf

from wan_exp import devices, precision_support
from wan_exp.config import ConfigError, ModelConfig, compose_config
from wan_exp.devices import Gpu, JobShape, NvmlView, visible_compute_capabilities
from wan_exp.metrics.drift import relative_l2
from wan_exp.models import attention
from wan_exp.models.attention_8bit import FP8_MAX, quantize_fp8_per_head
from wan_exp.models.checkpoint import RandomWeights, load_into
from wan_exp.models.precision import DriftCheck, fp8_linear_names, reference_copy
from wan_exp.models.wan_s2v import WanModel
from wan_exp.precision_support import check_precision, drift_check_on
from wan_exp.preflight import check_job
from wan_exp.rank.runtime import RankContext

H200 = [("NVIDIA H200", (9, 0))]
A100 = [("NVIDIA A100-SXM4-80GB", (8, 0))]
ONE_GPU = JobShape(nproc_per_node=1, world_size=1, backend="nccl", device="cuda", gpus=1)


def job(*overrides: str):
    """One job of the tiny model in bf16 (8-bit precisions quantise a bf16 model)."""
    return compose_config(["parallel=single", "model.dtype=bf16", *overrides])


@pytest.fixture
def libraries_installed(monkeypatch):
    """Every kernel library found (their presence is the machine's business, not the test's)."""
    monkeypatch.setattr(precision_support, "module_importable", lambda name: True)
    monkeypatch.setattr(precision_support, "sageattention_fp8_kernels_found", lambda: True)


@pytest.fixture
def no_libraries(monkeypatch):
    monkeypatch.setattr(precision_support, "module_importable", lambda name: False)
    monkeypatch.setattr(precision_support, "sageattention_fp8_kernels_found", lambda: False)


def test_unknown_precision_fails_composition_naming_the_choices():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="model.precision=fp4") as err:
        compose_config(["model.precision=fp4"])
    cause = str(err.value.__cause__)  # the schema's enum: the bad value and the allowed ones
    assert "Invalid value 'fp4'" in cause and "fp8_linear" in cause and "int8_attention" in cause


@pytest.mark.parametrize("precision", ["fp8_linear", "fp8_attention", "fp8", "int8_attention"])
def test_8bit_precision_on_the_cpu_is_refused_before_launch(precision):
    with pytest.raises(ConfigError) as err:
        check_job(job(f"model.precision={precision}"), gpus=0)
    message = str(err.value)
    assert f"model.precision={precision}" in message
    assert "this job runs on the CPU" in message and "use model.precision=bf16" in message
    if precision != "int8_attention":
        assert "compute capability >= 8.9" in message


def test_bf16_on_the_cpu_passes_the_whole_job_check():
    shape = check_job(job("model.precision=bf16"), gpus=0)
    assert shape.device == "cpu"


def test_fp8_on_a_gpu_below_8_9_names_the_gpu_and_its_capability(libraries_installed):
    with pytest.raises(ConfigError) as err:
        check_precision(job("model.precision=fp8_linear"), ONE_GPU, capabilities=A100)
    assert str(err.value) == (
        "model.precision=fp8_linear needs compute capability >= 8.9, but "
        "NVIDIA A100-SXM4-80GB has 8.0; use model.precision=bf16 or int8_attention on this GPU"
    )
    check_precision(job("model.precision=int8_attention"), ONE_GPU, capabilities=A100)  # INT8 from 8.0


@pytest.mark.parametrize("precision", ["fp8_linear", "int8_attention", "fp8_attention", "fp8"])
def test_every_precision_passes_on_hopper_with_its_libraries(libraries_installed, precision):
    check_precision(job(f"model.precision={precision}"), ONE_GPU, capabilities=H200)


@pytest.mark.parametrize(
    ("precision", "needle"),
    [
        ("fp8_linear", "needs torchao, which is not installed (torchao: pip install torchao;"),
        ("int8_attention", "needs sageattention, which is not installed (sageattention: pip install sageattention;"),
        ("fp8_attention", "needs SageAttention 2 (FP8 P.V kernels) or flash-attn 3 (flash_attn_interface)"),
    ],
)
def test_missing_library_is_named_with_its_install_command(no_libraries, precision, needle):
    with pytest.raises(ConfigError) as err:
        check_precision(job(f"model.precision={precision}"), ONE_GPU, capabilities=H200)
    assert needle in str(err.value) and 'pip install -e ".[gpu]"' in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.precision=fp8_linear", "model.dtype=fp32"], "model.dtype=fp32; set model.dtype=bf16"),
        (
            ["model.precision=fp8_linear", "parallel=fsdp_fixed"],
            "FSDP's sharded weights do not allow (parallel=fsdp_fixed)",
        ),
        (["model.precision=fp8", "workload=train_lora"], "is an inference setting"),
    ],
)
def test_settings_a_precision_cannot_go_with(libraries_installed, overrides, needle):
    with pytest.raises(ConfigError, match=r"model\.precision=fp8") as err:
        check_precision(compose_config(["model.dtype=bf16", *overrides]), ONE_GPU, capabilities=H200)
    assert needle in str(err.value)


def test_8bit_attention_under_ring_attention_is_refused(libraries_installed):
    cfg = compose_config(
        [
            "parallel=usp",
            "model.dtype=bf16",
            "model.precision=int8_attention",
            "parallel.ring_degree=2",
            "parallel.ulysses_degree=2",
        ]
    )
    shape = JobShape(nproc_per_node=4, world_size=4, backend="nccl", device="cuda", gpus=4)
    with pytest.raises(ConfigError, match="parallel.ring_degree>1 merges chunks"):
        check_precision(cfg, shape, capabilities=H200 * 4)


def test_drift_check_defaults_on_for_8bit_and_must_stay_in_warm_up(libraries_installed):
    assert drift_check_on(job("model.precision=fp8"))
    assert not drift_check_on(job("model.precision=bf16"))
    assert drift_check_on(job("model.precision=bf16", "workload.drift_check=true"))
    assert not drift_check_on(job("model.precision=fp8", "workload.drift_check=false"))
    with pytest.raises(ConfigError) as err:
        check_precision(job("model.precision=fp8", "workload.warmup_steps=0"), ONE_GPU, capabilities=H200)
    assert "on by default for model.precision=fp8" in str(err.value)
    assert "workload.warmup_steps=0; raise workload.warmup_steps to 1" in str(err.value)
    # off: no warm-up needed
    check_precision(
        job("model.precision=fp8", "workload.warmup_steps=0", "workload.drift_check=false"), ONE_GPU, capabilities=H200
    )
    with pytest.raises(ConfigError, match="workload=init does not sample"):
        check_job(job("workload=init", "workload.drift_check=true"), gpus=0)


def test_compute_capability_is_read_through_nvml(monkeypatch):
    """read_nvml fills each Gpu's capability from nvmlDeviceGetCudaComputeCapability (no CUDA),
    and the visible GPUs keep CUDA_VISIBLE_DEVICES's order."""
    capability = {0: (9, 0), 1: (8, 0)}
    fake = types.SimpleNamespace(
        NVMLError=Exception,
        NVMLError_NotSupported=type("NotSupported", (Exception,), {}),
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlSystemGetCudaDriverVersion=lambda: 12080,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=0, total=80 * 2**30),
        nvmlDeviceGetName=lambda h: ["NVIDIA H200", "NVIDIA A100"][h],
        nvmlDeviceGetUUID=lambda h: f"GPU-{h}",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=0),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [],
        nvmlDeviceGetCudaComputeCapability=lambda h: capability[h],
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    view = devices.read_nvml()
    assert [g.compute_capability for g in view.gpus] == [(9, 0), (8, 0)]
    assert visible_compute_capabilities(view, {"CUDA_VISIBLE_DEVICES": "1,0"}) == [
        ("NVIDIA A100", (8, 0)),
        ("NVIDIA H200", (9, 0)),
    ]


def test_a_gpu_whose_capability_nvml_cannot_say_is_not_refused(libraries_installed):
    view = NvmlView([Gpu(0, "MIG 1g.18gb", "MIG-0", 0, 18 * 2**30, None)], "12.8")
    found = visible_compute_capabilities(view, {})
    assert found == [("MIG 1g.18gb", None)]
    check_precision(job("model.precision=fp8"), ONE_GPU, capabilities=found)


def test_fp8_per_head_quantisation_round_trip_within_e4m3_rounding():
    """values * descale recovers x to e4m3's rounding: 3 mantissa bits, so at most 2^-4 of the
    magnitude for normal numbers, plus half the smallest subnormal step (2^-10) times the
    descale below the normal range; each head's largest magnitude lands on 448."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 3, 16, generator=gen) * torch.tensor([0.01, 1.0, 300.0])[None, None, :, None]
    values, descale = quantize_fp8_per_head(x.to(torch.bfloat16))
    assert values.dtype == torch.float8_e4m3fn and descale.shape == (2, 3)
    x32 = x.to(torch.bfloat16).float()
    back = values.float() * descale[:, None, :, None]
    bound = 2.0**-4 * x32.abs() + 2.0**-10 * descale[:, None, :, None]
    assert bool(((back - x32).abs() <= bound).all())
    assert torch.allclose(values.float().abs().amax(dim=(1, 3)), torch.full((2, 3), FP8_MAX))


def tiny_model() -> WanModel:
    cfg = OmegaConf.structured(ModelConfig)
    with torch.device("meta"):
        model = WanModel(cfg)
    load_into(model, RandomWeights(cfg, seed=1), torch.float32, "cpu")
    return model.eval()


def tiny_inputs(cfg, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "noisy": torch.randn(1, 16, 2, 8, 8, generator=g),
        "timestep": torch.tensor([500.0]),
        "context": torch.randn(1, cfg.text_len, cfg.text_dim, generator=g),
        "audio": torch.randn(1, cfg.audio_layers, 8, cfg.audio_dim, generator=g),
        "ref": torch.randn(1, 16, 1, 8, 8, generator=g),
    }


def test_fp8_layers_are_the_blocks_and_injectors_projections_only():
    model = tiny_model()
    names = fp8_linear_names(model)
    per_block = [f"blocks.0.{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + [
        "blocks.0.ffn.0",
        "blocks.0.ffn.2",
    ]
    assert [n for n in names if n.startswith("blocks.0.")] == per_block
    assert "audio_injector.injector.1.q" in names
    kept = (
        "text_embedding",
        "time_embedding",
        "time_projection",
        "head.head",
        "casual_audio_encoder",
        "injector_adain_layers",
    )
    assert not [n for n in names if n.startswith(kept) or "adain" in n]
    assert len(names) == 10 * model.cfg.num_layers + 4 * len(model.cfg.audio_inject_layers)


def test_reference_copy_owns_its_weights_and_shares_the_sequence_sharding():
    model = tiny_model()
    marker = object()
    model.sequence_sharding = None
    reference = reference_copy(model)
    inputs = tiny_inputs(model.cfg)
    with torch.no_grad():
        assert torch.equal(model(**inputs), reference(**inputs))
        reference.blocks[0].ffn[0].weight.add_(1.0)
        assert not torch.equal(model.blocks[0].ffn[0].weight, reference.blocks[0].ffn[0].weight)
    model.sequence_sharding = marker  # stands for SequenceSharding: process groups cannot be copied
    assert reference_copy(model).sequence_sharding is marker


def test_reference_copy_of_compiled_blocks_gets_its_own_compiled_calls():
    """A copied compiled call would run the original block's forward (the quantised one); the
    copy's blocks are compiled on their own, the original's compiled calls are kept."""
    model = tiny_model()
    for block in model.blocks:
        block.compile()
    before = [block._compiled_call_impl for block in model.blocks]
    reference = reference_copy(model)
    assert [block._compiled_call_impl for block in model.blocks] == before
    for original, copied in zip(model.blocks, reference.blocks):
        assert copied._compiled_call_impl is not None
        assert copied._compiled_call_impl is not original._compiled_call_impl


def test_drift_hook_records_the_relative_l2_of_the_checked_steps_only():
    """The hook compares every forward of the first drift_steps steps with the reference's;
    a reference with one changed weight gives the relative L2 of the two outputs."""
    model = tiny_model()
    reference = reference_copy(model)
    with torch.no_grad():
        reference.blocks[1].ffn[2].weight.mul_(1.05)
    ctx = RankContext(compose_config([]), 0, 0, 1, "cpu", None)
    drift = DriftCheck(reference, steps=1, ctx=ctx)
    drift.attach(model)
    inputs = tiny_inputs(model.cfg)
    with torch.no_grad():
        expected = relative_l2(model(**inputs), reference(**inputs))  # outside a step: not recorded
        assert drift.flow_rel_l2 == []
        with ctx.step(0, measured=False):
            model(**inputs)
        with ctx.step(1, measured=True):
            model(**inputs)  # past drift_steps
    assert expected > 0
    assert drift.flow_rel_l2 == [{"step": 0, "rel_l2": expected}]
    assert ctx.metrics.notes["drift"]["flow_rel_l2_max"] == expected


# ----------------------------------------------------------------------------- kernel records
def qkv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 6, 2, 8, generator=g) for _ in range(3))


@pytest.fixture
def fresh_attention():
    """The attention choice starts over for each test and is left as the model expects."""
    attention.configure("sdpa_math")
    attention.configure("auto")
    attention.configure_attention_bits(None)
    yield
    attention.configure("sdpa_math")
    attention.configure("auto")
    attention.configure_attention_bits(None)


def test_auto_records_why_each_faster_backend_did_not_run(fresh_attention, monkeypatch):
    """A candidate ahead of the winner that fails here (cuDNN attention on a CPU tensor) is
    named with its error; the winner is the one recorded as selected."""
    monkeypatch.setattr(attention, "AUTO_ORDER_CPU", ("sdpa_cudnn", "sdpa"))
    q, k, v = qkv()
    attention.attention(q, k, v)
    report = attention.backend_report()
    assert report["requested"] == "auto" and report["selected"] == "sdpa"
    assert list(report["not_chosen"]) == ["sdpa_cudnn"] and "Error" in report["not_chosen"]["sdpa_cudnn"]
    assert "bits" not in report  # no 8-bit attention asked for


def test_8bit_attention_with_no_kernel_installed_fails_naming_each(fresh_attention, monkeypatch):
    monkeypatch.setattr(attention, "module_importable", lambda module: False)
    attention.configure_attention_bits("fp8")
    with pytest.raises(attention.AttentionBackendError) as err:
        attention.attention(*qkv())
    assert (
        "sage_fp8: not installed (module sageattention not importable); "
        "fa3_fp8: not installed (module flash_attn_interface not importable)"
    ) in str(err.value)
    assert "model.precision=bf16" in str(err.value)


def test_8bit_attention_keeps_the_first_kernel_that_runs_and_full_precision_bypasses_it(fresh_attention, monkeypatch):
    """The FP8 kernels cannot run on a CPU: stand-ins in their places, the first raising as a
    kernel refusing a shape does, the second computing attention in fp32 (SDPA math)."""
    calls = []

    def refuses(q, k, v):
        raise RuntimeError("head dim 8 is not supported")

    def computes(q, k, v):
        calls.append(q.shape)
        return attention.lse_math(q, k, v)[0]

    monkeypatch.setattr(attention, "module_importable", lambda module: True)
    monkeypatch.setitem(attention.KERNELS_8BIT, "sage_fp8", refuses)
    monkeypatch.setitem(attention.KERNELS_8BIT, "fa3_fp8", computes)
    attention.configure_attention_bits("fp8")
    q, k, v = qkv()
    expected = attention.lse_math(q, k, v)[0]
    assert torch.equal(attention.attention(q, k, v), expected)
    assert torch.equal(attention.attention(q, k, v), expected)  # the choice is kept: no new search
    report = attention.backend_report()
    assert report["selected_8bit"] == "fa3_fp8" and len(calls) == 2
    assert report["not_chosen_8bit"] == {"sage_fp8": "RuntimeError: head dim 8 is not supported"}
    with attention.full_precision():  # the drift check's reference: the model dtype's backend
        attention.attention(q, k, v)
    assert len(calls) == 2 and attention.backend_report()["selected"] == "sdpa"
