"""Data parallel over clips (parallel.dp_degree): the degrees and their errors, the rules that
refuse it, latency and throughput (results.json, the dashboard, the plan), and one real 4-rank
gloo run against one rank per clip (tests/dist/dp_clips.py)."""

from __future__ import annotations

import av
import pytest

from launch_helpers import REPO, torchrun
from wan_exp.config import ConfigError, compose_config
from wan_exp.host.disk import job_bytes, video_bytes
from wan_exp.metrics.summary import clips_per_hour_per_gpu, summarize
from wan_exp.parallel.dims import parallel_dims
from wan_exp.plan.run import add_efficiency, row_from_results, table
from wan_exp.preflight import validate
from wan_exp.report.table import build_rows, text_table
from wan_exp.results import read_rank_records


@pytest.mark.parametrize(
    "overrides, world, degrees, shard_ranks",
    [
        # the preset: one dp group per rank, FSDP over all of them
        (["parallel=fsdp_throughput"], 8, {"dp": 8, "cfg": 1, "fsdp": 1, "ring": 1, "ulysses": 1}, 8),
        # dp groups of 4 Ulysses ranks, FSDP still over all 8
        (
            ["parallel=fsdp_throughput", "parallel.dp_degree=2", "parallel.ulysses_degree=-1"],
            8,
            {"dp": 2, "cfg": 1, "fsdp": 1, "ring": 1, "ulysses": 4},
            8,
        ),
        # fsdp_fixed with 2 groups: the replica axis takes the other 4 ranks of each group
        (
            ["parallel=fsdp_fixed", "parallel.dp_degree=2"],
            8,
            {"dp": 2, "cfg": 1, "fsdp": 4, "ring": 1, "ulysses": 1},
            8,
        ),
        # no FSDP: whole DiT per rank, dp takes what Ulysses leaves
        (
            ["parallel=ulysses", "parallel.ulysses_degree=2", "parallel.dp_degree=-1"],
            8,
            {"dp": 4, "cfg": 1, "fsdp": 1, "ring": 1, "ulysses": 2},
            1,
        ),
        # an own fsdp axis shards inside the group only
        (
            ["parallel=hybrid", "parallel.dp_degree=2", "parallel.ulysses_degree=2", "parallel.fsdp.degree=2"],
            8,
            {"dp": 2, "cfg": 1, "fsdp": 2, "ring": 1, "ulysses": 2},
            2,
        ),
    ],
)
def test_dp_degrees_resolve_with_fsdp_over_all_ranks_including_dp(overrides, world, degrees, shard_ranks):
    dims = parallel_dims(compose_config(overrides), world)
    assert dims.degrees == degrees and dims.fsdp_shard_ranks == shard_ranks
    assert dims.clip_ranks == world // degrees["dp"]
    # dp is the outermost mesh axis: groups are blocks of neighbouring ranks
    assert [dims.dp_rank(r) for r in range(world)] == [r // dims.clip_ranks for r in range(world)]
    assert [dims.clip_rank(r) for r in range(world)] == [r % dims.clip_ranks for r in range(world)]


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.dp_degree=0"], 2, "parallel.dp_degree=0: use 1 (every rank on one clip), N >= 2"),
        (["parallel.dp_degree=-2"], 2, "parallel.dp_degree=-2: use 1"),
        (
            ["parallel=ulysses", "parallel.dp_degree=-1"],
            4,
            "parallel.dp_degree=-1 and parallel.ulysses_degree=-1: at most one degree can take the ranks",
        ),
        (
            ["parallel=usp", "parallel.ulysses_degree=1", "parallel.dp_degree=-1"],
            3,
            "parallel.dp_degree=-1 takes the ranks the other axes leave, but cfg=1 x fsdp=1 x ring=2 x "
            "ulysses=1 = 2 does not divide 3 ranks",
        ),
        (
            ["parallel=fsdp_fixed", "parallel.dp_degree=3"],
            4,
            "degrees dp=3 x cfg=1 x fsdp=1 x ring=1 x ulysses=1 = 3 ranks, but the job has 4; "
            "dp x cfg x fsdp = 3 does not divide 4 ranks",
        ),
        (
            ["parallel=ulysses", "parallel.ulysses_degree=1", "parallel.dp_degree=2"],
            4,
            "= 2 ranks, but the job has 4; with dp=2, cfg=1 and fsdp=1 this works: parallel.ulysses_degree=2",
        ),
    ],
)
def test_bad_dp_degrees_name_the_setting_and_what_works(overrides, world, message):
    with pytest.raises(ConfigError) as err:
        parallel_dims(compose_config(overrides), world)
    assert message in str(err.value)


def test_rules_that_refuse_dp_groups():
    lora = compose_config(["workload=train_lora", "parallel=fsdp_throughput"])
    with pytest.raises(
        ConfigError, match=r"parallel.dp_degree=-1 with workload=train_lora: .* set parallel.dp_degree=1"
    ):
        validate(lora, 2)
    # a sharded decode splits a clip over its group's ranks: one rank per group has none to share
    sharded = compose_config(["parallel=fsdp_throughput", "parallel.vae=sharded"])
    with pytest.raises(ConfigError, match=r"needs >= 2 ranks, got 1 \(2 ranks in 2 dp groups\)"):
        validate(sharded, 2)
    validate(compose_config(["parallel=fsdp_throughput", "workload=init"]), 2)  # init makes no clip: allowed
    # plain data parallel (whole model per rank) is not a one-rank split
    validate(compose_config(["parallel=single", "parallel.dp_degree=-1"]), 2)


def test_room_for_a_video_per_dp_group():
    cfg = compose_config(["parallel=fsdp_throughput", "workload.save_video=true"])
    one = video_bytes(cfg)
    assert one > 0 and job_bytes(cfg, 4)[1] == 4 * one


def test_throughput_is_dp_clips_per_latency_per_gpu():
    # 2 groups of 4 GPUs, each a clip in 90 s: 80 clips an hour on 8 GPUs
    assert clips_per_hour_per_gpu(90.0, 2, 8) == pytest.approx(2 * 3600 / 90 / 8) == pytest.approx(10.0)
    assert clips_per_hour_per_gpu(None, 2, 8) is None


def _plan_results(strategy: str, gpus: int, dp: int, step_s: float, decode_s: float, tmp_path) -> dict:
    """A simulated job's results.json as the plan reads it: rank 0's record and the prediction."""
    record = {
        "memory": {"peak_host_rss_gib": 1.0},
        "stages": {"denoise": {"count": 1, "seconds": 4 * step_s}, "vae_decode": {"seconds": decode_s}},
        "comm": {"per_step": None},
        "parallel_dims": {"dp": dp},
        "step_times_s": [step_s] * 3,
    }
    return {
        "status": "completed",
        "job_dir": str(tmp_path / f"{strategy}_{gpus}"),
        "ranks": [record],
        "prediction": {"step_s": step_s, "compute_s": step_s},
        "config": {},
    }


def test_plan_rows_show_latency_throughput_and_their_efficiency(tmp_path):
    """single on 1 GPU: 1 s steps, 2 s decode -> 40 + 2 s per 40-step clip; fsdp_throughput on 4
    GPUs (dp 4): 1.25 s steps, the same decode -> 52 s per clip, but 4 clips at once."""
    rows = [
        row_from_results("single", 1, _plan_results("single", 1, 1, 1.0, 2.0, tmp_path), [64.0]),
        row_from_results("fsdp_throughput", 4, _plan_results("fsdp_throughput", 4, 4, 1.25, 2.0, tmp_path), [64.0]),
    ]
    add_efficiency(rows)
    single, dp = rows
    assert (single.clip_s, dp.clip_s) == (pytest.approx(42.0), pytest.approx(52.0))
    assert dp.dp == 4 and dp.clips_per_hour_per_gpu == pytest.approx(4 * 3600 / 52.0 / 4)
    assert single.clips_per_hour_per_gpu == pytest.approx(3600 / 42.0)
    assert dp.clip_efficiency == pytest.approx(42.0 / (4 * 52.0))  # one clip is no faster
    assert dp.throughput_efficiency == pytest.approx(42.0 / 52.0)  # but 4 at once
    header, body = table(rows, [64.0], with_measured=False)
    cells = dict(zip(header, body[1]))
    assert cells["dp"] == "4" and cells["clips/h/GPU"] == f"{4 * 3600 / 52.0 / 4:.1f}"
    assert cells["throughput eff."] == f"{42.0 / 52.0:.0%}" and cells["clip eff."] == f"{42.0 / 208.0:.0%}"


def test_dashboard_has_the_throughput_column():
    job = {
        "status": "completed",
        "strategy": "fsdp_throughput",
        "world_size": 4,
        "overrides": [],
        "summary": {"seconds_per_clip": 52.0, "clips_per_hour_per_gpu": 69.2},
    }
    text = text_table(build_rows([job]))
    assert "s/clip" in text and "clips/h/GPU" in text and "69.2" in text


@pytest.mark.slow
def test_dp_groups_make_their_own_clips_equal_to_one_rank_each_with_weights_sharded_over_all(tmp_path):
    """tests/dist/dp_clips.py on 4 gloo ranks (dp 2 x ulysses 2, FSDP over 4): see its docstring.
    Then what the ranks wrote: a video per group, and results.json's clip figures from their records."""
    proc = torchrun(4, str(REPO / "tests" / "dist" / "dp_clips.py"), str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "DP CLIPS MATCH (dp2 x cfg1 x ring1 x ulysses2 x fsdp(all 4)" in proc.stdout, proc.stdout

    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["video_dp0.mp4", "video_dp1.mp4"]
    for name in ("video_dp0.mp4", "video_dp1.mp4"):
        with av.open(str(tmp_path / name)) as video:
            assert sum(1 for _ in video.decode(video=0)) == 2 * 8 - 3  # two clips of 8 frames, 3 dropped
    records = read_rank_records(tmp_path)
    assert [r["rank"] for r in records] == [0, 1, 2, 3]
    summary = summarize(records, {"model": {"dtype": "fp32"}})
    assert summary["dp_degree"] == 2 and summary["clips_made"] == 4
    assert summary["clip_groups"] == [
        {"dp_rank": 0, "seed": 5, "clips": 2, "video": "video_dp0.mp4"},
        {"dp_rank": 1, "seed": 5 + 1_000_000, "clips": 2, "video": "video_dp1.mp4"},
    ]
    assert summary["clips_per_hour_per_gpu"] == pytest.approx(2 * 3600 / summary["seconds_per_clip"] / 4)
    work = records[0]["workload"]
    # a step of the job: each group's two guidance forwards, every rank running both of its own
    assert (work["forwards_per_step"], work["forwards_per_step_per_rank"]) == (4, 2)
    assert summary["parallel_dims"]["describe"] == "dp2 x cfg1 x ring1 x ulysses2 x fsdp(all 4)"
