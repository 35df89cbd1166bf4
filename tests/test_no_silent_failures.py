"""Nothing silent: exhausted memory named, weights that cannot fit refused, non-finite values
failing the job, settings that would do nothing refused, readable files, a report that
survives a corrupt result."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from launch_helpers import REPO, job_results, output, run_launch
from wan_exp import memory_fit, results
from wan_exp.config import ConfigError, compose_config
from wan_exp.preflight import check_schema_keys, config_warnings, validate
from wan_exp.rank.numerics import NonFiniteError, check_finite
from wan_exp.units import GIB


# ----------------------------------------------------------------------------- host OOM
def _death(rank: int, exitcode: int, phase: str = "load") -> dict:
    return {
        "exitcode": exitcode,
        "time": 10.0,
        "phase": phase,
        "message": f"rank {rank} killed by {signal.Signals(-exitcode).name} without writing its record",
    }


def test_a_sigkill_is_host_oom_only_when_the_kernel_counted_an_oom_kill():
    beats = {
        1: {
            "rank": 1,
            "phase": "load",
            "step": None,
            "seq": 4,
            "time": 9.0,
            "host_rss_gib": 7.25,
            "host_rss_peak_gib": 7.5,
        }
    }
    dead = {1: _death(1, -signal.SIGKILL)}
    cause = results.failure_root_cause([], dead, beats, kernel_oom_kills=1)
    assert (cause["status"], cause["memory"], cause["rank"], cause["phase"]) == ("oom", "host", 1, "load")
    assert "out of host memory" in cause["message"] and "OOM killer ended 1 process" in cause["message"]
    assert "7.25 GiB host RSS (peak 7.50 GiB)" in cause["message"] and cause["host_rss_gib"] == 7.25
    # no kernel OOM kill (or no way to know): a SIGKILL from someone else, but the RSS is still named
    for count in (0, None):
        cause = results.failure_root_cause([], dead, beats, kernel_oom_kills=count)
        assert (cause["status"], cause["memory"]) == ("failed", None)
        assert "7.25 GiB host RSS" in cause["message"]
    # a SIGSEGV during an OOM-kill elsewhere is not an OOM
    cause = results.failure_root_cause([], {1: _death(1, -signal.SIGSEGV)}, beats, kernel_oom_kills=3)
    assert cause["status"] == "failed"


@pytest.mark.parametrize(
    "phase, advice",
    [
        ("load", "The weights ran out of memory: use a strategy that shards them (parallel=fsdp_fixed)"),
        ("audio_encode", "The audio encoding ran out of memory (wav2vec2 encodes the whole workload.audio_path"),
        ("vae_decode", "The VAE ran out of memory: parallel.vae=tiled or sharded"),
        ("video_write", "Writing the video ran out of memory"),
    ],
)
def test_the_host_oom_advice_names_the_stage_that_ran_out(phase, advice):
    cause = results.failure_root_cause([], {1: _death(1, -signal.SIGKILL, phase)}, {}, kernel_oom_kills=1)
    assert cause["phase"] == phase and advice in cause["message"], cause["message"]
    assert cause["message"].endswith("fewer ranks per node, or a machine with more memory")
    if phase != "load":
        assert "parallel=fsdp_fixed" not in cause["message"], "not the weights' advice"


def test_recorded_out_of_memory_errors_say_which_memory():
    def record(device: str, err_type: str, message: str) -> dict:
        return {
            "rank": 0,
            "status": "oom",
            "device": device,
            "error": {"type": err_type, "message": message, "phase": "step", "step": 3, "time": 1.0},
        }

    cuda = record("cuda:0", "OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB")
    assert results.failure_root_cause([cuda], {})["memory"] == "gpu"
    cpu_alloc = record("cuda:0", "OutOfMemoryError", "DefaultCPUAllocator: not enough memory")
    assert results.failure_root_cause([cpu_alloc], {})["memory"] == "host"
    on_cpu = record("cpu", "MemoryError", "")
    cause = results.failure_root_cause([on_cpu], {})
    assert (cause["memory"], cause["step"]) == ("host", 3)


def test_kernel_oom_kill_count_reads_vmstat(tmp_path, monkeypatch):
    vmstat = tmp_path / "vmstat"
    vmstat.write_text("nr_free_pages 100\noom_kill 7\npgfault 9\n")
    monkeypatch.setattr(results, "VMSTAT", vmstat)
    assert results.kernel_oom_kill_count() == 7
    vmstat.write_text("nr_free_pages 100\n")  # an old kernel: no count
    assert results.kernel_oom_kill_count() is None
    monkeypatch.setattr(results, "VMSTAT", tmp_path / "absent")
    assert results.kernel_oom_kill_count() is None


# Runs launch.py with the kernel's OOM-kill count simulated: it reads 0 before the job's
# ranks start and 1 after. Everything else is real: the rank fills host memory, its
# heartbeat reports the RSS, it dies by SIGKILL, the agent and the launcher see the death.
SIMULATED_OOM_KILLER = """
import itertools, runpy, sys
from wan_exp import results
readings = itertools.count()
results.kernel_oom_kill_count = lambda: next(readings)
sys.argv = ["launch.py", *sys.argv[1:]]
runpy.run_path("launch.py", run_name="__main__")
"""


@pytest.mark.slow
def test_a_rank_killed_at_a_high_rss_is_reported_as_out_of_host_memory(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SIMULATED_OOM_KILLER, "fault=signal", "fault.rank=1", "fault.phase=build",
         "fault.host_gib=0.5", "workload=init", "logger=disabled", f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 1, output(proc)
    (job,) = job_results(tmp_path)
    cause = job["root_cause"]
    assert job["status"] == "oom", cause
    assert (cause["rank"], cause["phase"], cause["exitcode"], cause["memory"]) == (1, "build", -signal.SIGKILL, "host")
    assert cause["host_rss_gib"] >= 0.5, "the heartbeat saw the memory the rank filled"
    assert "out of host memory" in cause["message"] and "GiB host RSS" in cause["message"]
    assert "out of host memory" in proc.stdout  # the one-screen summary
    assert not (tmp_path / "0" / "stacks").exists(), "no rank dumped stacks: no empty files are left"


# ----------------------------------------------------------------------------- weights fit
FakeMemory = namedtuple("FakeMemory", "available")


def _independent_tiny_weight_bytes() -> int:
    """Bytes of the tiny model's DiT, T5 and wav2vec2, from real (not meta) modules cast as
    the ranks hold them: DiT and T5 at model.dtype, wav2vec2 in fp32."""
    from transformers import UMT5EncoderModel, Wav2Vec2Model

    from wan_exp.models.encoders import audio_encoder_config, text_encoder_config
    from wan_exp.models.wan_s2v import WanModel
    from wan_exp.parallel.fsdp import torch_dtype

    model = compose_config(["model=tiny"]).model
    modules = (
        WanModel(model).to(torch_dtype(model.dtype)),
        UMT5EncoderModel(text_encoder_config(model)).to(torch_dtype(model.dtype)),
        Wav2Vec2Model(audio_encoder_config(model)).to(torch.float32),
    )
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def test_weights_that_cannot_fit_in_host_memory_are_refused_with_the_figures(monkeypatch):
    cfg = compose_config(["model=tiny", "parallel=ulysses"])
    need = 2 * _independent_tiny_weight_bytes()  # two ranks on this node, each the whole model
    monkeypatch.setattr(memory_fit.psutil, "virtual_memory", lambda: FakeMemory(need))
    memory_fit.check_memory_fits(cfg, world_size=2, nproc_per_node=2, gpus=0)  # exactly fits
    monkeypatch.setattr(memory_fit.psutil, "virtual_memory", lambda: FakeMemory(need - 1))
    with pytest.raises(ConfigError, match="model=tiny does not fit in host memory: with parallel=ulysses"):
        memory_fit.check_memory_fits(cfg, world_size=2, nproc_per_node=2, gpus=0)


def test_s2v_14b_on_a_small_cpu_box_is_refused_and_sharding_is_counted(monkeypatch):
    monkeypatch.setattr(memory_fit.psutil, "virtual_memory", lambda: FakeMemory(64 * GIB))
    cfg = compose_config(["model=s2v_14b", "parallel=ulysses"])
    with pytest.raises(ConfigError) as refused:
        memory_fit.check_memory_fits(cfg, world_size=2, nproc_per_node=2, gpus=0)
    message = str(refused.value)
    # upstream's DiT has about 16.3e9 parameters: 30.35 GiB in bf16
    assert "the DiT (16.30e9 parameters, 30.35 GiB)" in message and "64.00 GiB is available" in message
    assert "parallel=fsdp_fixed" in message  # the way out

    # GPUs: fsdp_fixed on 8 ranks puts 1/8 of the DiT on each GPU; upstream fsdp first loads
    # the whole DiT into host memory on every rank (8 x 30.35 GiB > 128 GiB)
    monkeypatch.setattr(memory_fit.psutil, "virtual_memory", lambda: FakeMemory(128 * GIB))
    monkeypatch.setattr(memory_fit, "gpu_free_bytes", lambda count: [80 * GIB] * count)
    fixed = compose_config(["model=s2v_14b", "parallel=fsdp_fixed"])
    memory_fit.check_memory_fits(fixed, world_size=8, nproc_per_node=8, gpus=8)
    upstream = compose_config(["model=s2v_14b", "parallel=fsdp"])
    with pytest.raises(ConfigError, match=r"does not fit in host memory: with parallel=fsdp each of the 8 rank"):
        memory_fit.check_memory_fits(upstream, world_size=8, nproc_per_node=8, gpus=8)
    # upstream's generate.py builds the whole DiT and T5 on the host on every rank, also with
    # the fsdp_fixed patch (it changes only the broadcast): refused where wan-exp's own fits
    upstream_fixed = compose_config(["model=s2v_14b", "parallel=fsdp_fixed", "workload=upstream"])
    with pytest.raises(ConfigError, match=r"with parallel=fsdp_fixed each of the 8 rank.*the DiT \(16\.30e9"):
        memory_fit.check_memory_fits(upstream_fixed, world_size=8, nproc_per_node=8, gpus=8)
    dit, text, _audio = memory_fit.model_weights(upstream_fixed.model)
    needed = 8 * (dit.bytes + text.bytes)  # the whole DiT and the whole T5, once each, per rank
    monkeypatch.setattr(memory_fit.psutil, "virtual_memory", lambda: FakeMemory(needed))
    memory_fit.check_memory_fits(upstream_fixed, world_size=8, nproc_per_node=8, gpus=8)
    monkeypatch.setattr(memory_fit.psutil, "virtual_memory", lambda: FakeMemory(needed - 1))
    with pytest.raises(ConfigError, match=f"the {text.name}"):
        memory_fit.check_memory_fits(upstream_fixed, world_size=8, nproc_per_node=8, gpus=8)

    # one 40 GiB GPU: the whole DiT plus both encoders (wav2vec2 in fp32: 42.11 GiB, the
    # param_gib a real s2v_14b rank recorded on an H200) do not fit; T5 on the CPU does
    monkeypatch.setattr(memory_fit, "gpu_free_bytes", lambda count: [40 * GIB] * count)
    single = compose_config(["model=s2v_14b", "parallel=single"])
    with pytest.raises(ConfigError, match=r"does not fit in GPU memory.*42\.11 GiB.*40\.00 GiB free"):
        memory_fit.check_memory_fits(single, world_size=1, nproc_per_node=1, gpus=1)
    single_t5_on_cpu = compose_config(["model=s2v_14b", "parallel=single", "parallel.text_encoder_placement=cpu"])
    memory_fit.check_memory_fits(single_t5_on_cpu, world_size=1, nproc_per_node=1, gpus=1)


def test_a_write_that_fails_names_the_file_and_its_role(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the write (EFBIG), as a full disk refuses with ENOSPC."""
    target = tmp_path / "3" / "results.json"
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's signal ends pytest
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, old_limit[1]))
    try:
        with pytest.raises(results.WriteError) as failed:
            results.write_json_atomic(target, {"status": "completed", "padding": "x" * 4096})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert failed.value.errno == errno.EFBIG
    assert not target.exists() and not list(target.parent.glob(".*")), "no result and no partial temporary file"
    assert f"could not write the job's result {target}" in str(failed.value)
    assert "free space" in str(failed.value)
    assert list(target.parent.iterdir()) == [], "no temporary file is left behind"
    assert results.file_role(tmp_path / "ranks" / "rank_3.json") == "a rank record"
    assert results.file_role(tmp_path / "report.html") == "the sweep report"


# ----------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_get_the_umask_not_0600(tmp_path, umask, mode):
    old = os.umask(umask)
    results.process_umask.cache_clear()
    try:
        results.write_text_atomic(tmp_path / "config.yaml", "a: 1\n")
        results.write_json_atomic(tmp_path / "results.json", {"a": 1})
    finally:
        os.umask(old)
        results.process_umask.cache_clear()
    for name in ("config.yaml", "results.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


# ----------------------------------------------------------------------------- non-finite values
def test_check_finite_names_the_tensor_and_counts():
    check_finite(torch.ones(3), "fine")
    bad = torch.tensor([1.0, float("nan"), float("inf"), float("-inf")])
    with pytest.raises(NonFiniteError, match=r"DiT output is not finite: 1 NaN and 2 Inf of 4 values"):
        check_finite(bad, "DiT output")


def _nan_checkpoint(folder: Path) -> Path:
    """The tiny DiT's weights in the official layout, one element of one weight NaN, beside
    a finite tiny VAE (a checkpoint folder holds the VAE too)."""
    from omegaconf import OmegaConf

    from wan_exp.config import ModelConfig
    from wan_exp.models.checkpoint import write_checkpoint
    from wan_exp.models.vae import WanVAE
    from wan_exp.models.wan_s2v import WanModel

    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "conf/model/tiny.yaml"))
    state = WanModel(model_cfg).state_dict()
    state["blocks.0.ffn.0.weight"][0, 0] = float("nan")
    written = write_checkpoint(state, folder, shards=2)
    torch.save(WanVAE(model_cfg.vae_dim).state_dict(), folder / model_cfg.vae_checkpoint)
    return written


def test_nan_weights_fail_train_lora_at_its_loss(tmp_path):
    from wan_exp.rank.runtime import RankContext
    from wan_exp.workloads import WORKLOADS

    cfg = compose_config(
        [
            "model=tiny",
            "parallel=single",
            "workload=train_lora",
            "workload.lora.save=false",
            f"model.checkpoint_dir={_nan_checkpoint(tmp_path / 'ckpt')}",
        ]
    )
    ctx = RankContext(cfg, 0, 0, 1, torch.device("cpu"), None)
    with pytest.raises(NonFiniteError, match="training loss is not finite"):
        WORKLOADS["train_lora"](cfg, ctx)
    assert (ctx.current_phase, ctx.current_step) == ("step", 0)


@pytest.mark.slow
def test_nan_weights_fail_a_generate_job_with_phase_step_and_tensor(tmp_path):
    ckpt = _nan_checkpoint(tmp_path / "ckpt")
    proc = run_launch(tmp_path / "sweep", "parallel=single", f"model.checkpoint_dir={ckpt}", "logger=disabled")
    assert proc.returncode == 1, output(proc)
    (job,) = job_results(tmp_path / "sweep")
    cause = job["root_cause"]
    assert job["status"] == "failed" and (cause["rank"], cause["phase"], cause["step"]) == (0, "step", 0), cause
    assert cause["message"].startswith("NonFiniteError: DiT output (guided flow) is not finite"), cause


# ----------------------------------------------------------------------------- settings that do nothing
def test_unknown_added_keys_are_refused_naming_the_key():
    for override, key in (
        ("+unknown=1", "unknown"),
        ("+model.dimm=3", "model.dimm"),
        ("+workload.lora.rnak=4", "workload.lora.rnak"),
    ):
        with pytest.raises(ConfigError, match=rf"^{key} is not a setting of the experiment config"):
            check_schema_keys(compose_config([override]))
    check_schema_keys(compose_config(["+nccl.env.NCCL_DEBUG=INFO"]))  # an open dictionary takes any key


def test_warmup_that_leaves_no_measured_step_is_refused():
    cases = (
        (["workload.sample_steps=2", "workload.warmup_steps=2"], "workload=generate runs 2 step(s)"),
        (
            ["workload.clips=2", "workload.sample_steps=2", "workload.warmup_steps=5"],
            "runs 4 step(s) (workload.clips x workload.sample_steps)",
        ),
        (["workload=train_lora", "workload.steps=3", "workload.warmup_steps=3"], "runs 3 step(s) (workload.steps)"),
    )
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(compose_config(["parallel=single", *overrides]), 1)
    validate(
        compose_config(["parallel=single", "workload.clips=2", "workload.sample_steps=2", "workload.warmup_steps=3"]), 1
    )
    validate(compose_config(["parallel=single", "workload=init", "workload.warmup_steps=9"]), 1)  # runs no step


def test_a_prompt_without_a_tokenizer_is_a_warning(tmp_path):
    assert config_warnings(compose_config(["workload.prompt=a cat"])) == [
        "workload.prompt is ignored: no tokenizer (model.checkpoint_dir is not set); the text embedding "
        "comes from seeded random token ids"
    ]
    assert (
        "google/umt5-xxl does not exist"
        in config_warnings(compose_config(["workload.prompt=a cat", f"model.checkpoint_dir={tmp_path}"]))[0]
    )
    (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
    assert config_warnings(compose_config(["workload.prompt=a cat", f"model.checkpoint_dir={tmp_path}"])) == []
    assert config_warnings(compose_config([])) == []


# ----------------------------------------------------------------------------- report
def _job(num: int, overrides: list[str], device: str, step_s: float, tflops: float) -> dict:
    """A completed job's results.json with the fields the report reads."""
    return {
        "schema": 1,
        "status": "completed",
        "root_cause": None,
        "strategy": "ulysses",
        "world_size": 2,
        "overrides": overrides,
        "job_num": num,
        "job_dir": f"/sweep/{num}",
        "summary": {
            "device_name": device,
            "step_time_s_median": step_s,
            "tflops_per_gpu": tflops,
            "steps_per_s": 1 / step_s,
            "peak_host_rss_gib_max": 1.0,
        },
        "ranks": [
            {"rank": r, "device": "cpu" if device == "cpu" else f"cuda:{r}", "memory": {"peak_host_rss_gib": 1.0}}
            for r in (0, 1)
        ],
    }


def _best_marked(rows, title: str) -> set[str]:
    from wan_exp.report.table import table_cells

    header, body = table_cells(rows)
    column = header.index(title)
    return {cells[2][0] for cells in body if cells[column][1]}


def test_gpu_only_figures_and_gpu_only_settings_are_not_ranked_on_cpu():
    from wan_exp.report.table import build_rows

    cpu = [_job(0, ["allocator=default"], "cpu", 0.5, 1e-4), _job(1, ["allocator=expandable"], "cpu", 0.4, 2e-4)]
    rows = build_rows(cpu)
    # on the CPU the allocator does nothing: neither its step time nor its TFLOP/s is a result
    assert _best_marked(rows, "step s") == set() and _best_marked(rows, "TFLOP/s/GPU") == set()
    gpu = [
        _job(0, ["allocator=default"], "NVIDIA H200", 0.5, 300.0),
        _job(1, ["allocator=expandable"], "NVIDIA H200", 0.4, 400.0),
    ]
    rows = build_rows(gpu)
    assert _best_marked(rows, "step s") == {"allocator=expandable"}
    assert _best_marked(rows, "TFLOP/s/GPU") == {"allocator=expandable"}
    # strategies on the CPU are still compared, but not by a GPU-only figure
    strategies = [
        _job(0, ["workload.size=64*64"], "cpu", 0.5, 1e-4),
        _job(1, ["workload.size=32*64"], "cpu", 0.2, 2e-4),
    ]
    rows = build_rows(strategies)
    assert _best_marked(rows, "step s") == {"workload.size=32*64"} and _best_marked(rows, "TFLOP/s/GPU") == set()


def test_a_corrupt_results_json_is_named_and_the_others_are_reported(tmp_path):
    from wan_exp.report import comparison_table, write_report

    for num, size in ((0, "64*64"), (2, "32*64")):
        results.write_json_atomic(
            tmp_path / str(num) / "results.json", _job(num, [f"workload.size={size}"], "cpu", 0.1 + num, 1e-4)
        )
    corrupt = tmp_path / "1" / "results.json"
    corrupt.parent.mkdir()
    corrupt.write_text('{"status": "completed", "summ')  # cut off mid-write
    md_path, html_path = write_report(tmp_path)
    md = md_path.read_text()
    assert "workload.size=64*64" in md and "workload.size=32*64" in md
    assert f"{corrupt}: JSONDecodeError" in md and "Results that could not be read" in md
    assert f"{corrupt}: JSONDecodeError" in html_path.read_text()
    assert f"left out, unreadable: {corrupt}" in comparison_table(tmp_path)
    done = subprocess.run([sys.executable, "-m", "wan_exp.report", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0 and str(corrupt) in done.stdout + done.stderr


# ----------------------------------------------------------------------------- a real job's files
@pytest.mark.slow
def test_a_completed_job_leaves_readable_files_no_empty_stacks_and_its_warnings(tmp_path):
    old = os.umask(0o022)
    try:
        proc = run_launch(
            tmp_path, "parallel=single", "workload.sample_steps=2", "workload.prompt=a cat", "logger=disabled"
        )
    finally:
        os.umask(old)
    assert proc.returncode == 0, output(proc)
    job_dir = tmp_path / "0"
    written = [
        job_dir / "results.json",
        job_dir / "job.json",
        job_dir / "config.yaml",
        job_dir / "ranks" / "rank_0.json",
        tmp_path / "report.md",
        tmp_path / "report.html",
    ]
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert not (job_dir / "stacks").exists(), "a completed job leaves no empty stack files"
    job = json.loads((job_dir / "results.json").read_text())
    warning = "workload.prompt is ignored: no tokenizer"
    assert job["status"] == "completed" and any(w.startswith(warning) for w in job["warnings"])
    assert any(w.startswith(warning) for w in job["ranks"][0]["warnings"])
    assert f"warning: {warning}" in proc.stdout  # the one-screen summary


@pytest.mark.gpu
def test_weights_beyond_a_real_gpu_are_refused_with_nvml_figures():
    """On a GPU machine, with NVML's real free memory: the 14B model fits one GPU of 80 GiB or
    more; five times its blocks (about 150 GiB of DiT in bf16) fit none."""
    free = memory_fit.gpu_free_bytes(1)
    assert free and free[0] > 0, "NVML reports the GPU's free memory"
    single = compose_config(["model=s2v_14b", "parallel=single"])
    if free[0] > 45 * GIB:
        memory_fit.check_memory_fits(single, world_size=1, nproc_per_node=1, gpus=1)
    huge = compose_config(["model=s2v_14b", "parallel=single", "model.num_layers=200"])
    with pytest.raises(ConfigError, match=r"does not fit in GPU memory: with parallel=single.*free \(NVML\)"):
        memory_fit.check_memory_fits(huge, world_size=1, nproc_per_node=1, gpus=1)


def test_the_heartbeat_carries_host_memory_refreshed_without_faking_progress(tmp_path):
    from wan_exp.rank.runtime import RankContext

    cfg = compose_config(["parallel=single"])
    ctx = RankContext(cfg, 0, 0, 1, torch.device("cpu"), tmp_path)
    ctx.heartbeat("load")
    before = results.read_heartbeats(tmp_path)[0]
    held = b"\x01" * (256 << 20)  # 256 MiB, every page touched
    ctx.refresh_memory()
    after = results.read_heartbeats(tmp_path)[0]
    # the kernel's own figure as the oracle: resident pages x page size
    rss_gib = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB
    assert len(held) and after["host_rss_gib"] == pytest.approx(rss_gib, abs=0.05)
    assert after["host_rss_gib"] >= before["host_rss_gib"] + 0.2 and after["host_rss_peak_gib"] >= after["host_rss_gib"]
    # progress (what the hang watchdog reads) is untouched by a memory refresh
    assert (after["phase"], after["seq"], after["time"]) == (before["phase"], before["seq"], before["time"])
    assert after["memory_time"] > before["memory_time"]
