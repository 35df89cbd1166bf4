"""Metrics: FLOP count, device peaks, MFU, balance, the per-rank record."""

from __future__ import annotations

import os
import time

import pytest
import torch
from omegaconf import OmegaConf

from wan_exp import results
from wan_exp.config import ExperimentConfig
from wan_exp.metrics import MetricsCollector, dit_forward_flops, mfu, peak_flops, summarize
from wan_exp.wandb_logger import RANK_TABLE_COLUMNS, rank_row

CONF = os.path.join(os.path.dirname(__file__), "..", "conf")


def _model_cfg(name: str):
    schema = OmegaConf.structured(ExperimentConfig().model)
    return OmegaConf.merge(schema, OmegaConf.load(os.path.join(CONF, "model", f"{name}.yaml")))


def test_flops_of_14b_trunk_at_480x832_match_the_formula():
    cfg = _model_cfg("t2v_14b")
    # 480x832, 81 frames: 21 latent frames x (480/16) x (832/16) tokens
    n, m, d, f, layers = 21 * 30 * 52, 512, 5120, 13824, 40
    expected = layers * (12 * n * d**2 + 4 * n * d * f + 4 * n**2 * d + 4 * n * m * d + 4 * m * d**2)
    assert dit_forward_flops(cfg, n_tokens=n) == pytest.approx(expected, rel=1e-12)
    # docs/facts.md §6: 4.06 s per forward on one H100 is 41.8 % MFU at this shape
    assert mfu(expected, 4.06, 1, peak_flops("NVIDIA H100 80GB HBM3")) == pytest.approx(0.418, abs=0.002)


def test_s2v_flops_add_the_audio_cross_attention_at_injected_blocks():
    cfg = _model_cfg("s2v_14b")
    n, d, hw = 35_100, 5120, 30 * 52
    trunk = dit_forward_flops(cfg, n_tokens=n)
    # 20 latent frames of noisy tokens attend to 5 audio tokens of their frame each
    with_audio = dit_forward_flops(
        cfg, n_tokens=n, audio_query_tokens=20 * hw, audio_tokens=20 * 5, audio_tokens_per_query=5
    )
    per_block = 4 * 20 * hw * d * d + 4 * 100 * d * d + 4 * 20 * hw * 5 * d
    assert with_audio - trunk == pytest.approx(12 * per_block, rel=1e-12)
    # the same model with s2v off counts no audio
    cfg.s2v = False
    assert (
        dit_forward_flops(cfg, n_tokens=n, audio_query_tokens=20 * hw, audio_tokens=100, audio_tokens_per_query=5)
        == trunk
    )


@pytest.mark.parametrize(
    "name, dtype, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H200", "fp16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA L40S", "bf16", 362e12),
        ("NVIDIA GeForce RTX 4090", "bf16", 82.6e12),  # fp32 accumulate: half rate on GeForce
        ("NVIDIA GH200 480GB", "bf16", 989e12),
        ("NVIDIA H100 80GB HBM3", "fp32", None),  # the bf16 peak would mislead
        ("cpu", "bf16", None),
        ("Some Future GPU", "bf16", None),
    ],
)
def test_peak_flops_by_device_name(name, dtype, expected):
    assert peak_flops(name, dtype) == expected


def _record(
    rank: int,
    reserved: float | None,
    steps: list[float],
    device_name: str = "NVIDIA H100 80GB HBM3",
    phases: dict | None = None,
) -> dict:
    """A rank record as MetricsCollector.rank_record() lays it out, with chosen numbers."""
    return {
        "rank": rank,
        "world_size": 4,
        "device_name": device_name,
        "init_phases_s": phases or {"build": 1.0 + rank, "load": 2.0},
        "step_times_s": steps,
        "memory": {
            "peak_allocated_gib": reserved,
            "peak_reserved_gib": reserved,
            "nvml_used_gib": reserved,
            "alloc_retries": 1 if reserved else None,
            "ooms": 0 if reserved else None,
            "peak_host_rss_gib": 3.0,
        },
        "workload": {
            "tokens_per_forward": 1000,
            "forwards_per_step": 2,
            "flops_per_step": 4e15,
            "video_seconds_per_step": 0.25,
        },
    }


def test_summarize_balance_throughput_and_mfu_from_known_inputs():
    records = [
        _record(0, 60.0, [2.0, 4.0, 3.0]),
        _record(1, 20.0, [2.5, 3.0, 3.0]),
        _record(2, 30.0, [2.0, 3.0, 5.0]),
        _record(3, 40.0, [2.0, 3.0, 3.0]),
    ]
    s = summarize(records, {"model": {"dtype": "bf16"}})
    assert s["balance_max_over_min"] == pytest.approx(3.0)  # 60 / 20
    assert s["balance_rank0_over_median"] == pytest.approx(2.0)  # 60 / median(20, 30, 40)
    assert s["balance_basis"] == "peak_reserved_gib"
    # per step the slowest rank counts: [2.5, 4.0, 5.0]
    assert (s["step_time_s_median"], s["step_time_s_min"], s["step_time_s_max"]) == (4.0, 2.5, 5.0)
    assert s["steps_per_s"] == pytest.approx(0.25)
    assert s["tokens_per_s"] == pytest.approx(2000 / 4.0)
    assert s["video_s_per_s"] == pytest.approx(0.25 / 4.0)
    assert s["tflops_per_gpu"] == pytest.approx(4e15 / 4.0 / 4 / 1e12)
    assert s["mfu"] == pytest.approx(4e15 / (4.0 * 4 * 989e12))
    assert s["init_phases_s"] == {"build": 4.0, "load": 2.0}  # slowest rank per phase
    assert s["init_s"] == pytest.approx(6.0)
    assert s["alloc_retries"] == 4 and s["ooms"] == 0
    # fp32 model: no bf16 peak applies, so no MFU, but TFLOP/s still
    fp32 = summarize(records, {"model": {"dtype": "fp32"}})
    assert fp32["mfu"] is None and fp32["tflops_per_gpu"] == s["tflops_per_gpu"]


def test_summarize_on_cpu_keeps_gpu_figures_absent():
    records = [_record(r, None, [1.0], device_name="cpu") for r in range(2)]
    s = summarize(records, {"model": {"dtype": "bf16"}})
    for key in ("peak_reserved_gib_max", "nvml_used_gib_max", "alloc_retries", "ooms", "mfu"):
        assert s[key] is None, key
    assert s["balance_basis"] == "peak_host_rss_gib" and s["balance_max_over_min"] == 1.0


def test_collector_times_phases_and_measured_steps_only():
    collector = MetricsCollector("cpu", 0, 1)
    with collector.phase("build"):
        time.sleep(0.05)
    with collector.phase("build"):  # a phase met twice adds up
        time.sleep(0.02)
    with collector.phase("step"):  # not an init phase
        for i in range(3):
            with collector.step(measured=i > 0):
                time.sleep(0.01 * (i + 1))
    collector.set_workload_info(tokens_per_forward=10, flops_per_step=1e9)
    collector.note("attention_backend", "sdpa_math")
    collector.note("param_gib", 0.5)
    record = collector.rank_record()
    assert record["init_phases_s"]["build"] == pytest.approx(0.07, abs=0.03)
    assert "step" not in record["init_phases_s"] and record["other_phases_s"]["step"] >= 0.06
    assert record["warmup_steps"] == 1 and len(record["step_times_s"]) == 2
    assert record["step_times_s"][0] == pytest.approx(0.02, abs=0.015)
    assert record["step_times_s"][1] == pytest.approx(0.03, abs=0.015)
    mem = record["memory"]
    assert mem["peak_reserved_gib"] is None and mem["nvml_used_gib"] is None and mem["ooms"] is None
    assert 0.01 < mem["peak_host_rss_gib"] < 24 and mem["param_gib"] == 0.5
    assert record["allocator_settings"] is None and record["device_name"] == "cpu"
    assert record["attention_backend"] == "sdpa_math" and "param_gib" not in record
    assert record["workload"] == {"tokens_per_forward": 10, "flops_per_step": 1e9}


@pytest.mark.gpu
def test_collector_on_cuda_reads_memory_nvml_and_allocator_settings():
    device = torch.device("cuda", 0)
    torch.zeros(1, device=device)  # resetting peak stats before CUDA's first use is an error
    torch.cuda.reset_peak_memory_stats(device)
    collector = MetricsCollector(device, 0, 1)
    with collector.phase("build"):
        block = torch.empty(256 * 1024**2, dtype=torch.uint8, device=device)  # 0.25 GiB
    with collector.step(measured=True):
        block.add_(1)
    mem = collector.rank_record()["memory"]
    assert mem["peak_allocated_gib"] >= 0.25 and mem["peak_reserved_gib"] >= mem["peak_allocated_gib"]
    # NVML sees the CUDA context on top of PyTorch's own reservations
    assert mem["nvml_used_gib"] > mem["peak_reserved_gib"]
    assert mem["alloc_retries"] == 0 and mem["ooms"] == 0
    record = collector.rank_record()
    assert isinstance(record["allocator_settings"], dict) and record["device_name"].startswith("NVIDIA")


def test_stage_records_seconds_count_and_the_host_peak_of_the_stage():
    collector = MetricsCollector("cpu", 0, 1)
    with collector.stage("vae_decode"):
        time.sleep(0.02)
    with collector.stage("vae_decode"):
        big = bytearray(64 * 2**20)  # 64 MiB touched inside the stage raises its host peak
        big[::4096] = b"x" * len(big[::4096])
        time.sleep(0.02)
    del big
    with collector.stage("video_write"):
        pass
    record = collector.rank_record()
    decode, write = record["stages"]["vae_decode"], record["stages"]["video_write"]
    assert decode["count"] == 2 and decode["seconds"] >= 0.04 and write["count"] == 1
    assert decode["peak_allocated_gib"] is None and decode["peak_reserved_gib"] is None  # CPU: absent
    # the second occurrence held 64 MiB more than the stage after it (its peak was reset at the start)
    assert decode["peak_host_rss_gib"] - write["peak_host_rss_gib"] > 0.05
    assert record["memory"]["peak_host_rss_gib"] >= decode["peak_host_rss_gib"]  # job-wide peak kept


def test_stage_summary_takes_the_slowest_rank_and_the_quoted_figures():
    def record(rank, denoise, decode):
        return {
            "rank": rank,
            "world_size": 2,
            "device_name": "cpu",
            "memory": {"peak_host_rss_gib": 1.0},
            "workload": {"clips": 2, "video_seconds": 10.0},
            "stages": {
                "denoise": {"seconds": denoise, "peak_host_rss_gib": 1.0 + rank},
                "vae_decode": {"seconds": decode, "peak_host_rss_gib": 2.0},
            },
        }

    summary = summarize([record(0, 8.0, 1.0), record(1, 6.0, 3.0)], {"model": {"dtype": "fp32"}})
    assert summary["stages_s"] == {"denoise": 8.0, "vae_decode": 3.0}
    assert summary["pipeline_s"] == 11.0
    assert summary["seconds_per_clip"] == pytest.approx(5.5)
    assert summary["seconds_per_video_second"] == pytest.approx(1.1)
    assert summary["dit_share"] == pytest.approx(8.0 / 11.0)
    assert summary["stage_peak_host_rss_gib"] == {"denoise": 2.0, "vae_decode": 2.0}
    assert "stages_s" not in summarize([{**record(0, 1.0, 1.0), "stages": {}}], {})


def test_a_rank_median_is_computed_once_and_console_and_wandb_read_that_field():
    """The per-rank median step time is stored in the rank record; the console's per-rank line
    and the W&B per-rank table both show that field. An even step count tells the true median
    (the mean of the middle two) from the upper middle value an own computation might take."""
    collector = MetricsCollector("cpu", 0, 1)
    with collector.phase("build"):
        pass
    collector.step_times_s = [1.0, 4.0, 2.0, 3.0]
    record = {**collector.rank_record(), "status": "completed"}
    assert record["step_time_s_median"] == (2.0 + 3.0) / 2
    assert record["init_s"] == record["init_phases_s"]["build"]

    console = results.summary_text({"job_num": 0, "status": "completed", "ranks": [record]})
    (rank_line,) = [line.split() for line in console.splitlines() if line.split()[:1] == ["0"]]
    assert rank_line[-1] == "2.500"

    row = dict(zip(RANK_TABLE_COLUMNS, rank_row(record)))
    assert row["step_time_s_median"] == record["step_time_s_median"]
    assert row["init_s"] == record["init_s"]
    assert row["comm_step_calls"] == 0 and row["comm_init_bytes"] == 0  # no collective ran


def test_job_step_times_are_stored_in_the_summary_that_wandb_reads():
    """The job's time of each step (the slowest rank's) is derived once, into the summary."""
    records = [_record(0, 60.0, [2.0, 4.0, 3.0]), _record(1, 20.0, [2.5, 3.0, 3.0])]
    assert summarize(records, {"model": {"dtype": "bf16"}})["step_times_s"] == [2.5, 4.0, 3.0]


def test_work_set_aside_inside_a_stage_is_booked_to_its_own_stage(monkeypatch):
    """The drift check's reference forwards run inside denoise: their seconds go to drift_check
    and out of denoise (a fake clock: denoise 10 s in all, of which 3 s aside)."""
    from wan_exp.metrics import collector as collector_module

    clock = iter([0.0, 4.0, 7.0, 10.0])  # denoise starts, aside starts, aside ends, denoise ends
    monkeypatch.setattr(collector_module.time, "perf_counter", lambda: next(clock))
    metrics = collector_module.MetricsCollector("cpu", 0, 1)
    with metrics.stage("denoise"):
        with metrics.aside("drift_check"):
            pass
    assert metrics.stages["denoise"]["seconds"] == 10.0 - 3.0
    assert metrics.stages["drift_check"]["seconds"] == 3.0 and metrics.stages["drift_check"]["count"] == 1
