"""workload=upstream: a Wan2.2 checkout's generate.py under the launcher.

The checkout is a stand-in written by the test (tests/upstream_standin.py) with upstream's
flags and module layout, doing small real work on gloo. Two real launches: fsdp_fixed beside
wan-exp's own fsdp_fixed job (patch, records, video, W&B, dashboard), and a stand-in that
hangs at start-up (watchdog, stacks)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from launch_helpers import job_results, run_launch  # noqa: E402
from upstream_standin import standin_numel, write_checkout, write_checkpoint_folder  # noqa: E402
from wan_exp.config import ConfigError, compose_config  # noqa: E402
from wan_exp.preflight import check_job  # noqa: E402
from wan_exp.report.table import build_rows, column, load_results  # noqa: E402
from wan_exp.report.upstream import ratio_cells  # noqa: E402
from wan_exp.upstream.command import declared_flags, strategy_flags, upstream_arguments  # noqa: E402
from wan_exp.upstream.runner import PatchOnImport, ProgressReader, no_broadcast_patch  # noqa: E402
from wandb_reader import find_run_file, read_run  # noqa: E402


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("upstream")
    return write_checkout(root / "Wan2.2"), write_checkpoint_folder(root / "Wan2.2-S2V-14B")


def upstream_config(repo: Path, ckpt: Path, *overrides: str):
    return compose_config(
        ["workload=upstream", f"workload.repo={repo}", f"model.checkpoint_dir={ckpt}", "logger=disabled", *overrides]
    )


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize(
    "strategy, ranks, expected",
    [
        ("single", 1, []),
        ("ulysses", 4, ["--ulysses_size", "4"]),
        ("fsdp", 2, ["--dit_fsdp", "--t5_fsdp"]),
        ("fsdp_fixed", 2, ["--dit_fsdp", "--t5_fsdp"]),
        ("hybrid", 4, ["--ulysses_size", "4", "--dit_fsdp", "--t5_cpu"]),
    ],
)
def test_each_strategy_maps_to_upstreams_flags(standin, strategy, ranks, expected):
    cfg = upstream_config(*standin, f"parallel={strategy}")
    assert strategy_flags(cfg, ranks) == expected


@pytest.mark.parametrize("strategy", ["cfg", "usp", "cfg_ulysses"])
def test_a_split_upstream_cannot_express_is_refused_naming_the_ones_it_can(standin, strategy):
    cfg = upstream_config(*standin, f"parallel={strategy}", "launcher.nproc_per_node=4")
    with pytest.raises(ConfigError, match=r"single, ulysses, fsdp, fsdp_fixed, hybrid"):
        check_job(cfg, gpus=0)


def test_workload_settings_map_to_upstreams_flags(standin, tmp_path):
    repo, ckpt = standin
    audio = tmp_path / "a.wav"
    audio.write_bytes(b"x")
    cfg = upstream_config(
        repo,
        ckpt,
        "parallel=single",
        "workload.size=480*832",
        "workload.frames_per_clip=48",
        "workload.clips=3",
        "workload.sample_steps=7",
        "workload.shift=5",
        "workload.guidance_scale=3.5",
        "seed=11",
        "workload.prompt=a cat",
        f"workload.audio_path={audio}",
        "workload.offload_model=true",
        "workload.convert_model_dtype=true",
    )
    args = upstream_arguments(cfg, 1, tmp_path)
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--task"] == "s2v-14B" and pairs["--ckpt_dir"] == str(ckpt.resolve())
    assert (pairs["--size"], pairs["--infer_frames"], pairs["--num_clip"], pairs["--sample_steps"]) == (
        "480*832",
        "48",
        "3",
        "7",
    )
    assert (pairs["--sample_shift"], pairs["--sample_guide_scale"], pairs["--base_seed"]) == ("5", "3.5", "11")
    assert pairs["--prompt"] == "a cat" and pairs["--audio"] == str(audio.resolve())
    assert args[args.index("--offload_model") + 1] == "True" and "--convert_model_dtype" in args
    assert "--image" not in args  # unset: upstream's own example image
    assert args[args.index("--save_file") + 1] == str(tmp_path / "video.mp4")


def test_flags_are_read_from_the_source_without_running_it(tmp_path):
    script = tmp_path / "generate.py"
    script.write_text(
        "raise SystemExit('never run')\n"
        "p.add_argument('--one', type=int)\nq.add_argument(\"--two\", '-t')\nadd_argument('--not')\n"
    )
    assert declared_flags(script) == {"--one", "--two"}


# ----------------------------------------------------------------------------- bad input
def test_bad_checkouts_and_checkpoint_folders_are_named_before_launch(standin, tmp_path):
    repo, ckpt = standin
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"workload.repo=.*has no generate.py and no wan/: it is not a Wan2.2"):
        check_job(upstream_config(empty, ckpt, "parallel=single"), gpus=0)
    (empty / "generate.py").write_text("")
    with pytest.raises(ConfigError, match=r"has no wan/"):
        check_job(upstream_config(empty, ckpt, "parallel=single"), gpus=0)
    old = write_checkout(tmp_path / "old", drop_flags=("--dit_fsdp",))
    with pytest.raises(ConfigError, match=r"declares no --dit_fsdp, which parallel=fsdp_fixed"):
        check_job(upstream_config(old, ckpt, "parallel=fsdp_fixed", "launcher.nproc_per_node=2"), gpus=0)
    check_job(upstream_config(old, ckpt, "parallel=ulysses", "launcher.nproc_per_node=2"), gpus=0)  # not needed
    with pytest.raises(ConfigError, match=r"workload.size='704\*1024': upstream's --size accepts only"):
        check_job(upstream_config(repo, ckpt, "parallel=single", "workload.size=704*1024"), gpus=0)
    partial = write_checkpoint_folder(tmp_path / "partial")
    (partial / "Wan2.1_VAE.pth").unlink()
    (partial / "wav2vec2-large-xlsr-53-english" / "preprocessor_config.json").unlink()
    with pytest.raises(
        ConfigError,
        match=r"lacks what upstream's s2v-14B loads: Wan2.1_VAE.pth, "
        r"wav2vec2-large-xlsr-53-english/preprocessor_config.json",
    ):
        check_job(upstream_config(repo, partial, "parallel=single"), gpus=0)
    with pytest.raises(ConfigError, match=r"launcher.simulate_world_size=8 with workload=upstream"):
        check_job(upstream_config(repo, ckpt, "parallel=ulysses", "launcher.simulate_world_size=8"), gpus=0)
    with pytest.raises(ConfigError, match=r"model.precision=fp8 with workload=upstream"):
        check_job(upstream_config(repo, ckpt, "parallel=single", "model.precision=fp8"), gpus=1)
    with pytest.raises(ConfigError, match=r"needs workload.repo="):
        check_job(compose_config(["workload=upstream", f"model.checkpoint_dir={ckpt}", "parallel=single"]), gpus=0)


# ----------------------------------------------------------------------------- pieces of the runner
def test_progress_reader_times_steps_from_tqdm_output():
    now = [100.0]
    beats = []
    reader = ProgressReader(lambda phase, step: beats.append((phase, step)), clock=lambda: now[0])
    reader.feed("Creating WanS2V pipeline.\n")
    ends = {0: 101.0, 1: 103.5, 2: 104.0, 3: 106.0}  # bar 0/3 at 101, then steps end at 103.5, 104, 106
    for n, t in ends.items():
        now[0] = t
        reader.feed(f"\r{n * 33:3d}%|###  | {n}/3 [00:01<00:02,  1.00s/it]")
    now[0] = 110.0
    reader.feed("\r  0%|     | 0/3 [00:00<?, ?it/s]")  # the second clip's bar
    now[0] = 116.0
    reader.feed("\r 66%|#### | 2/3 [00:06<00:03,  3.00s/it]")  # tqdm skipped 1/3: two steps, 3 s each
    assert reader.step_times() == [2.5, 0.5, 2.0, 3.0, 3.0]
    assert reader.first_bar_start() == 101.0 and len(reader.bars) == 2
    assert beats[0] == ("load", None) and beats[-1] == ("step", 5)


def test_the_import_hook_patches_shard_model_for_every_importer(tmp_path, monkeypatch):
    pkg = tmp_path / "fakewan"
    (pkg / "distributed").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import pipeline\n")
    (pkg / "distributed" / "__init__.py").write_text("")
    (pkg / "distributed" / "fsdp.py").write_text(
        "def shard_model(model, device_id, sync_module_states=True):\n    return sync_module_states\n"
    )
    (pkg / "pipeline.py").write_text("from .distributed.fsdp import shard_model\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls: list[dict] = []
    hook = PatchOnImport("fakewan.distributed.fsdp", no_broadcast_patch(calls))
    sys.meta_path.insert(0, hook)
    try:
        import fakewan  # noqa: F401
        from fakewan import pipeline

        assert pipeline.shard_model("m", device_id=0) is False  # upstream's default True, patched
        assert pipeline.shard_model("m", 0, True) is False  # positional too
        assert calls == [{"requested": True, "passed": False}] * 2
        assert (pkg / "distributed" / "fsdp.py").read_text().endswith("return sync_module_states\n")
    finally:
        sys.meta_path.remove(hook)
        for name in [m for m in sys.modules if m.startswith("fakewan")]:
            del sys.modules[name]


def test_the_process_group_gets_nccl_timeout_unless_upstream_gives_one():
    from datetime import timedelta

    from wan_exp.upstream.runner import with_default_timeout

    seen = []
    init = with_default_timeout(lambda *args, **kwargs: seen.append((args, kwargs)), 42.0)
    init(backend="nccl", init_method="env://", rank=0, world_size=2)
    init("gloo", timeout=timedelta(seconds=7))
    assert seen[0][1]["timeout"] == timedelta(seconds=42) and seen[1][1]["timeout"] == timedelta(seconds=7)


def test_settings_upstream_has_no_flag_for_are_named(standin):
    from wan_exp.upstream.command import ignored_settings

    assert ignored_settings(upstream_config(*standin, "parallel=single")) == []
    found = ignored_settings(upstream_config(*standin, "parallel=single", "workload.fps=24", "parallel.vae=tiled"))
    assert [w.split(":")[0] for w in found] == ["workload.fps=24", "parallel.vae=tiled"]


def test_the_host_gives_each_rank_its_gpus_nvml_peak_and_names_other_gpus_it_touched(tmp_path, monkeypatch):
    """NVML cannot run on a CPU machine: the readings are given, the attribution is real."""
    import os

    from wan_exp import results
    from wan_exp.devices import Gpu, NvmlView
    from wan_exp.upstream.monitor import HostMonitor

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    me, other = os.getpid(), os.getppid()
    readings = iter(
        [
            NvmlView(
                [
                    Gpu(0, "H200", "GPU-a", 30 * 2**30, 141 * 2**30, 90, [me, other]),
                    Gpu(1, "H200", "GPU-b", 20 * 2**30, 141 * 2**30, 50, [other]),
                ],
                "12.8",
            ),
            NvmlView(
                [
                    Gpu(0, "H200", "GPU-a", 40 * 2**30, 141 * 2**30, 70, [me, other]),
                    Gpu(1, "H200", "GPU-b", 25 * 2**30, 141 * 2**30, 30, [other]),
                ],
                "12.8",
            ),
        ]
    )
    for rank, pid in ((0, me), (1, other)):
        results.write_json_atomic(results.heartbeat_path(tmp_path, rank), {"rank": rank, "pid": pid, "seq": 1})
        results.write_rank_record(
            tmp_path,
            {
                "rank": rank,
                "local_rank": rank,
                "device": "cuda",
                "status": "failed",
                "memory": {"peak_host_rss_gib": 0.001},
            },
        )
    monitor = HostMonitor(tmp_path, local_pids=lambda: {me, other}, read_gpus=lambda: next(readings))
    monitor.sample()
    monitor.sample()
    monitor.finish()
    rank0, rank1 = results.read_rank_records(tmp_path)
    assert rank0["memory"]["nvml_used_gib"] == 40 and rank0["gpu_utilisation_pct_mean"] == 80
    assert rank0["device_name"] == "H200" and rank0["other_gpus_used"] == []
    # rank 1 (local rank 1: GPU 1) holds a context on GPU 0 too: the "GPU 0 overloaded" symptom
    assert rank1["memory"]["nvml_used_gib"] == 25 and rank1["gpu_utilisation_pct_mean"] == 40
    assert rank1["other_gpus_used"] == [0]
    assert rank0["memory"]["peak_host_rss_gib"] > 0.001  # psutil's RSS of this process beats the record's


# ----------------------------------------------------------------------------- real launches
@pytest.mark.slow
def test_fsdp_fixed_upstream_beside_wan_exps_own_job(standin, tmp_path):
    repo, ckpt = standin
    files_before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    sweep = tmp_path / "sweep"
    common = ["parallel=fsdp_fixed", "launcher.nproc_per_node=2", "logger=offline"]
    mine = run_launch(sweep, *common, "workload=generate", "hydra.sweep.subdir=generate")
    assert mine.returncode == 0, mine.stdout[-2000:] + mine.stderr[-2000:]
    theirs = run_launch(
        sweep,
        *common,
        "workload=upstream",
        f"workload.repo={repo}",
        f"model.checkpoint_dir={ckpt}",
        "hydra.sweep.subdir=upstream",
    )
    assert theirs.returncode == 0, theirs.stdout[-2000:] + theirs.stderr[-2000:]
    up = json.loads((sweep / "upstream" / "results.json").read_text())
    assert up["status"] == "completed" and up["workload"] == "upstream" and up["strategy"] == "fsdp_fixed"
    for record in up["ranks"]:
        # the patch reached the wrapping call: upstream asked for the broadcast, FSDP got none
        assert record["upstream"]["fsdp_patch_calls"] == [{"requested": True, "passed": False}]
        seen = json.loads((sweep / "upstream" / f"standin_fsdp_rank{record['rank']}.json").read_text())
        assert seen["sync_module_states"] is False
        assert seen["held_numel"] < standin_numel()  # this rank holds a shard, not the model
        assert len(record["step_times_s"]) == 4 - 1  # workload=upstream: 4 steps, 1 warm-up
        assert record["init_phases_s"]["start_up"] > 0 and record["memory"]["peak_host_rss_gib"] > 0
    args = json.loads((sweep / "upstream" / "standin_args.json").read_text())
    assert args["dit_fsdp"] and args["t5_fsdp"] and args["ulysses_size"] == 1 and args["task"] == "s2v-14B"
    video = up["ranks"][0]["video"]
    assert video["error"] is None and video["frames"] == 5 and video["audio_stream"]  # 1 clip x 8 frames, less 3
    samples = json.loads((sweep / "upstream" / "upstream" / "host_samples.json").read_text())
    assert set(samples["ranks"]) == {"0", "1"} and all(r["peak_rss_gib"] > 0 for r in samples["ranks"].values())
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == files_before  # checkout untouched
    run = read_run(find_run_file(sweep / "upstream"))  # the W&B run, as for any job
    assert run.config["workload"]["name"] == "upstream" and run.job_type == "fsdp_fixed"
    assert run.summary["step_time_s_median"] == up["summary"]["step_time_s_median"]
    # the dashboard: two rows of one strategy, and the ratio of the pair
    rows = build_rows(load_results(sweep).jobs)
    assert sorted(r.variant.split()[0] for r in rows if r.strategy == "fsdp_fixed") == [
        "model.checkpoint_dir=" + str(ckpt),
        "workload=generate",
    ]
    header, body = ratio_cells(rows)
    assert len(body) == 1 and body[0][:2] == ["fsdp_fixed", "2"]
    steps = {r.jobs[0]["workload"]: r.value(column("step s")) for r in rows}
    assert body[0][3] == f"{steps['upstream'] / steps['generate']:,.2f}"
    from wan_exp.report import write_report

    md, _ = write_report(sweep)
    assert "Upstream generate.py / wan-exp" in md.read_text()


@pytest.mark.slow
def test_a_checkout_that_hangs_at_start_up_is_a_hang_with_every_ranks_stacks(tmp_path, standin):
    _, ckpt = standin
    repo = write_checkout(tmp_path / "hanging", hang=True)
    sweep = tmp_path / "sweep"
    proc = run_launch(
        sweep,
        "parallel=ulysses",
        "launcher.nproc_per_node=2",
        "logger=disabled",
        "workload=upstream",
        f"workload.repo={repo}",
        f"model.checkpoint_dir={ckpt}",
        "launcher.hang_timeout_s=10",
    )
    assert proc.returncode != 0
    result = job_results(sweep)[0]
    assert result["status"] == "hang", result["root_cause"]
    stacks = sweep / "0" / "stacks"
    for rank in (0, 1):
        text = (stacks / f"rank_{rank}.txt").read_text()
        assert "generate.py" in text and "wan_exp/upstream/runner.py" in text
    # the rank that never joined is in generate.py itself (its sleep), the other waits for it
    never_joined = (stacks / "rank_1.txt").read_text().splitlines()
    assert "generate.py" in never_joined[1] and "in generate" in never_joined[1]
    assert "init_process_group" in (stacks / "rank_0.txt").read_text()
    for rank in (0, 1):  # py-spy's view from outside, with the native frames below Python's
        pyspy = (stacks / f"rank_{rank}.pyspy.txt").read_text()
        assert "generate (generate.py" in pyspy and "wan_exp/upstream/runner.py" in pyspy, pyspy
