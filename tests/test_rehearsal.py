"""Rehearsing a world size: shared GPUs, the simulated world size (fake process group), link
pricing and the plan (docs/rehearsal.md)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launch_helpers import REPO, job_results, output, run_launch, torchrun
from wan_exp.config import ConfigError, compose_config
from wan_exp.metrics.comm import BUCKETS
from wan_exp.plan.pricing import GB, LINKS, Link, comm_time_s, comm_times_s, parse_link, predict_step
from wan_exp.preflight import check_job, job_shape, rank_device, ranks_per_node


# ----------------------------------------------------------------------------- config rules
def test_share_gpus_without_gpus_is_refused_naming_the_flag():
    cfg = compose_config(["parallel=ulysses", "launcher.share_gpus=true", "launcher.nproc_per_node=2"])
    with pytest.raises(ConfigError, match=r"launcher\.share_gpus=true .*no GPU is visible"):
        check_job(cfg, gpus=0)


def test_more_ranks_than_gpus_names_share_gpus_and_the_flag_allows_them():
    cfg = compose_config(["parallel=ulysses", "launcher.nproc_per_node=4"])
    with pytest.raises(ConfigError, match=r"only 1 GPU\(s\).*launcher\.share_gpus=true"):
        ranks_per_node(cfg, gpus=1)
    shared = compose_config(["parallel=ulysses", "launcher.nproc_per_node=4", "launcher.share_gpus=true"])
    shape = job_shape(shared, ranks_per_node(shared, gpus=2), gpus=2)
    assert (shape.backend, shape.device, shape.shared_gpus, shape.world_size) == ("gloo", "cuda", True, 4)
    job = {"backend": shape.backend, "device": shape.device, "gpus": shape.gpus}
    assert [rank_device(job, r) for r in range(4)] == [("cuda", 0), ("cuda", 1), ("cuda", 0), ("cuda", 1)]
    # without the flag a GPU per rank, over NCCL
    plain = compose_config(["parallel=ulysses", "launcher.nproc_per_node=2"])
    assert job_shape(plain, 2, gpus=2).backend == "nccl"
    assert rank_device({"backend": "gloo", "device": "cpu", "gpus": 0}, 3) == ("cpu", None)


def test_weights_check_counts_the_ranks_sharing_a_gpu(monkeypatch):
    """fsdp_fixed s2v_14b on 4 ranks: 30.35 / 4 GiB of DiT + 11.76 GiB of encoders (T5 in bf16,
    wav2vec2 in fp32) = 19.35 GiB per rank fits a 64 GiB GPU each, but 4 ranks on one GPU need
    77.4 GiB."""
    from wan_exp import memory_fit

    monkeypatch.setattr(memory_fit, "gpu_free_bytes", lambda count: [64 * 2**30] * count)
    cfg = compose_config(["model=s2v_14b", "parallel=fsdp_fixed"])
    memory_fit.check_memory_fits(cfg, world_size=4, nproc_per_node=4, gpus=4)
    with pytest.raises(ConfigError, match=r"on 4 rank\(s\) \(4 per GPU\) each GPU holds.*77\.38 GiB.*64\.00 GiB free"):
        memory_fit.check_memory_fits(cfg, world_size=4, nproc_per_node=4, gpus=1)


def test_simulated_shape_and_bad_settings():
    cfg = compose_config(
        ["parallel=fsdp_fixed", "launcher.simulate_world_size=1024", "launcher.simulate_rank=7", "workload=init"]
    )
    shape = check_job(cfg, gpus=0)
    assert (shape.nproc_per_node, shape.world_size, shape.processes, shape.backend, shape.simulated_rank) == (
        1,
        1024,
        1,
        "fake",
        7,
    )
    for override, message in (
        ("launcher.simulate_rank=1024", r"launcher\.simulate_rank=1024 is outside 0\.\.1023"),
        ("launcher.link=fast", r"launcher\.link='fast' is not a link"),
        ("launcher.simulate_world_size=-2", r"launcher\.simulate_world_size=-2 must be >= 0"),
    ):
        bad = compose_config(["parallel=fsdp_fixed", "launcher.simulate_world_size=1024", "workload=init", override])
        with pytest.raises(ConfigError, match=message):
            check_job(bad, gpus=0)
    # the degrees still decide: ulysses over 3 ranks cannot split tiny's 4 heads
    with pytest.raises(ConfigError, match="ulysses"):
        check_job(compose_config(["parallel=ulysses", "launcher.simulate_world_size=3"]), gpus=0)


def test_dashboard_says_shared_gpu_times_are_not_comparable(tmp_path):
    from wan_exp.report.render import markdown
    from wan_exp.report.table import Row

    job = {"status": "completed", "shared_gpus": True, "simulated": None, "summary": {}, "ranks": [], "job_num": 0}
    rows = [Row("ulysses", 4, "launcher.share_gpus=true", [job]), Row("single", 1, "", [{**job, "shared_gpus": False}])]
    page = markdown(tmp_path, rows)
    caveats = page.split("## Times not comparable")[1].strip().splitlines()
    assert caveats == [
        "- ulysses x4 launcher.share_gpus=true: ranks shared GPUs (launcher.share_gpus) and ran their "
        "collectives over gloo, so its times are not comparable; memory per process holds"
    ]


# ----------------------------------------------------------------------------- pricing
def test_pricing_against_hand_computed_times():
    nvlink4 = LINKS["nvlink4"]
    per_step = {
        "all_to_all": {"count": 4, "bytes": 8e9, "bus_bytes": 7.4e9},
        "all_reduce": {"count": 1, "bytes": 1e9, "bus_bytes": 1.88e9},
        "barrier": {"count": 1, "bytes": 0, "bus_bytes": 0},
    }
    # 4 x (6 us + 1.85 GB / 335 GB/s), then 6 us + 1.88 GB / 480 GB/s; barriers are not priced
    expected = 4 * (6e-6 + 1.85e9 / 335e9) + 6e-6 + 1.88e9 / 480e9
    assert comm_time_s(per_step, nvlink4) == pytest.approx(expected)
    prediction = predict_step(
        {"step_times_s": [1.0, 3.0, 2.0], "step_time_s_median": 2.0, "comm": {"per_step": per_step}}, nvlink4
    )
    assert prediction["step_s"] == prediction["step_serial_s"] == pytest.approx(2.0 + expected)
    assert prediction["overlap"] == "serial" and "full duplex" in prediction["assumption"]
    custom = parse_link("100")
    assert comm_time_s({"all_gather": {"count": 2, "bytes": 0, "bus_bytes": 1e9}}, custom) == pytest.approx(
        2 * 6e-6 + 0.01
    )
    assert predict_step({"step_times_s": [], "comm": {"per_step": None}}, nvlink4)["step_s"] is None


def test_measured_runs_sit_beside_the_prediction_and_fit_the_link(tmp_path):
    """Two real runs whose steps took compute + 100 us per call + bus bytes at 50 GB/s: the
    fitted link is 50 GB/s, and it re-prices a row with no real run."""
    from wan_exp.plan.run import PlanRow, add_fitted, add_measured, fit_link

    per_step = {
        2: {"all_to_all": {"count": 10, "bytes": 4e9, "bus_bytes": 2e9}},
        4: {
            "all_to_all": {"count": 10, "bytes": 4e9, "bus_bytes": 3e9},
            "all_reduce": {"count": 2, "bytes": 1e9, "bus_bytes": 1.5e9},
        },
    }
    compute = {2: 1.0, 4: 0.5}
    for n in (2, 4):
        calls = sum(f["count"] for f in per_step[n].values())
        bus = sum(f["bus_bytes"] for f in per_step[n].values())
        real = {
            "status": "completed",
            "simulated": None,
            "shared_gpus": False,
            "model": "tiny",
            "strategy": "ulysses",
            "world_size": n,
            "config": {"workload": {"size": "64*64"}},
            "summary": {"step_time_s_median": compute[n] + calls * 100e-6 + bus / 50e9},
            "ranks": [{"memory": {"peak_reserved_gib": 3.0 + n, "peak_allocated_gib": 2.0}}],
        }
        (tmp_path / str(n)).mkdir()
        (tmp_path / str(n) / "results.json").write_text(json.dumps(real))
    other = tmp_path / "other_size"
    other.mkdir()
    (other / "results.json").write_text(
        json.dumps({**real, "config": {"workload": {"size": "32*32"}}, "world_size": 8})
    )
    rows = [PlanRow("ulysses", n, "completed", compute_s=compute[n], comm_per_step=per_step[n]) for n in (2, 4)]
    rows.append(PlanRow("ulysses", 8, "completed", compute_s=0.25, comm_per_step=per_step[4]))
    assert add_measured(rows, tmp_path, "tiny", "64*64") == 2
    assert [r.measured_peak_gib for r in rows] == [5.0, 7.0, None]  # reserved: what the GPU must hold
    link = fit_link(rows, 100e-6, str(tmp_path))
    assert [c.bus_gbps for c in link.curves.values()] == pytest.approx([50.0] * 5)
    add_fitted(rows, link)
    assert rows[2].fitted_step_s == pytest.approx(0.25 + 12 * 100e-6 + 4.5e9 / 50e9)
    assert [r.fitted_step_s for r in rows[:2]] == pytest.approx([r.measured_step_s for r in rows[:2]])
    assert fit_link(rows[2:], 100e-6, "none") is None  # no measured run: nothing to fit


# ----------------------------------------------------------------------------- simulated vs real
def _by_world_size(sweep_dir: Path) -> dict[int, dict]:
    found = {}
    for res in job_results(sweep_dir):
        assert res["status"] == "completed", res["root_cause"]
        found[res["world_size"]] = res
    return found


def _comm_figures(record: dict) -> dict:
    """Every bucket's collectives with their counts and bytes (bus bytes follow from them), and
    the process groups they ran on (their ranks and kinds: NCCL's communicators)."""
    figures = {
        bucket: {kind: (f["count"], f["bytes"]) for kind, f in record["comm"][bucket].items()} for bucket in BUCKETS
    }
    figures["groups"] = sorted((g["ranks"], g["kinds"]) for g in record["comm"]["groups"].values())
    return figures


@pytest.mark.slow
@pytest.mark.timeout(600)  # several jobs, each starting torch, on a shared CPU
def test_simulated_rank_matches_real_gloo_ranks(tmp_path):
    """N=2 and N=4 of hybrid (FSDP + Ulysses) train_lora: the one simulated process holds the
    parameter, gradient and optimiser-state bytes of a real rank and issues the same
    collectives with the same bytes."""
    common = [
        "model=tiny",
        "parallel=hybrid",
        "workload=train_lora",
        "workload.steps=2",
        "logger=disabled",
        "workload.lora.save=false",
        "allocator.count_cpu_tensors=true",
    ]
    real = run_launch(tmp_path / "real", *common, "launcher.nproc_per_node=2,4", multirun=True, timeout=400)
    assert real.returncode == 0, output(real)
    sim = run_launch(tmp_path / "sim", *common, "launcher.simulate_world_size=2,4", multirun=True, timeout=400)
    assert sim.returncode == 0, output(sim)
    real_jobs, sim_jobs = _by_world_size(tmp_path / "real"), _by_world_size(tmp_path / "sim")
    assert sorted(real_jobs) == sorted(sim_jobs) == [2, 4]
    for n in (2, 4):
        simulated = sim_jobs[n]
        assert simulated["simulated"] == {"world_size": n, "rank": 0}
        assert len(simulated["ranks"]) == 1 and len(real_jobs[n]["ranks"]) == n
        sim_rank, real_rank0 = simulated["ranks"][0], real_jobs[n]["ranks"][0]
        state = sim_rank["train_state_bytes"]
        assert state == real_rank0["train_state_bytes"]
        assert state["gradients"] > 0 and state["optimizer_state"] > 2 * state["gradients"] - 1
        assert _comm_figures(sim_rank) == _comm_figures(real_rank0), n
        # the tensors at their peak (weights, activations, gradients, optimiser state)
        assert sim_rank["memory"]["peak_tensor_gib"] == pytest.approx(real_rank0["memory"]["peak_tensor_gib"], rel=0.05)
        assert "non-finite checks were off" in sim_rank["simulated"]["note"]
        assert simulated["prediction"]["step_s"] >= simulated["prediction"]["compute_s"] > 0
    # the dashboard says the simulated times are one rank's compute; the real sweep's need no such
    # caveat (it may carry another: 4 real ranks on a 2-core machine are an oversubscribed host)
    sim_report = (tmp_path / "sim" / "report.md").read_text()
    assert "## Times not comparable" in sim_report and "played rank 0 of 4 over the fake process group" in sim_report
    assert "fake process group" not in (tmp_path / "real" / "report.md").read_text()
    # sharded over more ranks, each holds less
    assert (
        sim_jobs[4]["ranks"][0]["train_state_bytes"]["parameters"]
        < sim_jobs[2]["ranks"][0]["train_state_bytes"]["parameters"]
    )


@pytest.mark.slow
@pytest.mark.timeout(600)  # a real job of 2 ranks and a plan of 1 simulated job on a shared CPU
def test_plan_predictions_match_real_gloo_ranks(tmp_path):
    """What the plan predicts per rank against a real 2-rank gloo job of the same settings (its
    measured= sweep), for hybrid (Ulysses' all-to-alls and FSDP's sharded weights and all-gathers
    in one job; test_simulated_rank_matches_real_gloo_ranks does the same split training): the
    tensors at their peak (job-wide and in every pipeline stage) within 5 %, the parameter bytes,
    and the collectives of a step to the byte, as counted and as the pricing reads them. Host RSS
    is not compared: mostly the runtime, it varied by up to 17 % between jobs of the same settings
    (docs/rehearsal.md, "Checked against real ranks")."""
    common = ["model=tiny", "workload=generate", "workload.sample_steps=2", "workload.warmup_steps=1"]
    real = run_launch(
        tmp_path / "real",
        *common,
        "logger=disabled",
        "allocator.count_cpu_tensors=true",
        "parallel=hybrid",
        "launcher.nproc_per_node=2",
        multirun=True,
        timeout=400,
    )
    assert real.returncode == 0, output(real)
    out = tmp_path / "plan"
    plan = subprocess.run(
        [sys.executable, "-m", "wan_exp.plan", *common, "gpus=2", "strategies=hybrid"]
        + [f"out={out}", f"measured={tmp_path / 'real'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert plan.returncode == 0, plan.stdout + plan.stderr
    (row,) = json.loads((out / "plan.json").read_text())["rows"]
    (job,) = job_results(tmp_path / "real")
    assert row["status"] == job["status"] == "completed", (row, job["root_cause"])
    sim = json.loads((Path(row["job_dir"]) / "results.json").read_text())["ranks"][0]
    assert sim["simulated"]["world_size"] == 2 and len(job["ranks"]) == 2
    # memory: the tensors at their peak, job-wide and in every stage, of every real rank
    predicted = row["peak_tensor_gib"]
    assert predicted == sim["memory"]["peak_tensor_gib"] > 0
    assert predicted == pytest.approx(row["measured_peak_tensor_gib"], rel=0.05)
    for rank in job["ranks"]:
        assert predicted == pytest.approx(rank["memory"]["peak_tensor_gib"], rel=0.05), rank["rank"]
        stages = {name: s["peak_tensor_gib"] for name, s in rank["stages"].items()}
        assert stages.keys() == sim["stages"].keys()
        for name, peak in stages.items():
            assert sim["stages"][name]["peak_tensor_gib"] == pytest.approx(peak, rel=0.05), (rank["rank"], name)
    # the weights: rank 0's part exactly (half the DiT's rows, padded as rank 0's)
    assert sim["memory"]["param_gib"] == job["ranks"][0]["memory"]["param_gib"]
    assert sim["dit_param_gib"] == job["ranks"][0]["dit_param_gib"]
    # the collectives of a step: every kind, count, byte and message size of every real rank
    counted = [rank["comm"]["per_step"] for rank in job["ranks"]]
    assert row["comm_per_step"].keys() >= {"all_to_all", "all_gather"}
    assert all(c == row["comm_per_step"] for c in counted), counted
    # and as the pricing reads them: at 1 s per bus byte and no latency a step costs its bus bytes
    priced = sum(comm_times_s(row["comm_per_step"], Link.uniform("1 B/s", 1 / GB, 0.0, "")))
    assert priced == sum(f["bus_bytes"] for f in counted[0].values()) > 0


@pytest.mark.slow
def test_1024_rank_simulation_of_s2v_14b_holds_its_own_rows_only(tmp_path):
    """fsdp_fixed over 1024 ranks, one process: 1/1024 of the DiT per rank, and the process
    never holds the whole DiT (about 30 GiB in bf16). FSDP2 reads only the rank's own rows
    (FSDP1 reads one whole block at a time: minutes of random numbers on two cores). The
    text and audio encoders are cut to one small layer so the test measures the DiT (a
    umT5-xxl of random weights alone is 11 GiB, a wav2vec2-large 1.2 GiB)."""
    model = [
        "model=s2v_14b",
        "model.text_encoder.num_layers=1",
        "model.text_encoder.vocab_size=64",
        "model.text_encoder.d_ff=64",
        "model.audio_encoder.num_hidden_layers=1",
        "model.audio_encoder.intermediate_size=64",
        "model.audio_layers=2",  # the DiT's weighted mean takes the encoder's hidden states
    ]
    proc = run_launch(
        tmp_path,
        *model,
        "parallel=fsdp_fixed",
        "parallel.fsdp.api=fsdp2",
        "workload=init",
        "logger=disabled",
        "launcher.simulate_world_size=1024",
        "launcher.simulate_rank=5",
        timeout=900,
    )
    assert proc.returncode == 0, output(proc)
    (res,) = job_results(tmp_path)
    assert res["status"] == "completed" and res["simulated"] == {"world_size": 1024, "rank": 5}
    record = res["ranks"][0]
    shapes = _dit_shapes(model)
    full = sum(math.prod(s) for s in shapes)
    # Shard(0) splits rows as torch.chunk: chunks of ceil(rows / 1024), rank 5 takes the sixth
    # (none of a parameter with fewer than 6 chunks' rows)
    chunks = [-(-s[0] // 1024) for s in shapes]
    own_rows = sum(max(0, min(6 * c, s[0]) - 5 * c) * math.prod(s[1:]) for s, c in zip(shapes, chunks, strict=True))
    assert record["workload"]["dit_local_parameters"] == own_rows
    assert 0.95 * full / 1024 < own_rows < 1.05 * full / 1024
    assert full * 2 / 2**30 > 30  # the whole DiT in bf16
    assert record["memory"]["peak_host_rss_gib"] < 6.0, record["memory"]


def _dit_shapes(model_overrides: list[str]) -> list[tuple[int, ...]]:
    import torch

    from wan_exp.config import typed_config
    from wan_exp.models.wan_s2v import WanModel

    cfg = typed_config(compose_config(model_overrides))
    with torch.device("meta"):
        return [tuple(p.shape) for p in WanModel(cfg.model).parameters()]


# ----------------------------------------------------------------------------- the plan
def test_plan_options_are_parsed_and_bad_ones_named():
    from wan_exp.plan.run import DEFAULT_CLIP_STEPS, parse_args

    args = parse_args(["model=tiny", "gpus=1,8", "gpu_memory_gib=24,80", "strategies=single,ulysses", "clip_steps=30"])
    assert (args.gpus, args.gpu_memory_gib, args.strategies, args.clip_steps) == (
        [1, 8],
        [24.0, 80.0],
        ["single", "ulysses"],
        30,
    )
    # a short job of 3 measured steps
    assert {"model=tiny", "workload.sample_steps=4", "workload.warmup_steps=1"} <= set(args.overrides)
    assert parse_args(["fragmentation=0.1"]).fragmentation == 0.1 and args.fragmentation == 0.05
    assert parse_args(["workload.sample_steps=3"]).overrides.count("workload.sample_steps=3") == 1
    assert parse_args([]).clip_steps == DEFAULT_CLIP_STEPS == 40
    for bad, message in (
        ["gpus=0,2", r"gpus='0,2': give positive numbers"],
        ["clip_steps=2.5", r"clip_steps='2\.5': give the sampling steps of one clip"],
        ["strategies=single,magic", r"\['magic'\] not presets"],
        ["gpus", r"'gpus' is not key=value"],
        ["fragmentation=1.5", r"fragmentation='1\.5': give the share of the peak"],
    ):
        with pytest.raises(ConfigError, match=message):
            parse_args([bad])


def test_plan_overrides_as_a_job_records_them_and_a_sweep_is_refused():
    """A job's record keeps its overrides as Hydra renders them (``true`` -> ``True``, a key
    given twice once with its last value): the plan compares its own overrides in that form. A
    sweep in the plan's overrides would be several jobs: refused, naming it, before any runs."""
    from wan_exp.plan.run import as_recorded, parse_args

    given = ["workload.save_video=true", "seed=3", "+extra=x", "seed=4", "~logger", "parallel.fsdp.degree=-1"]
    assert as_recorded(given) == [
        "workload.save_video=True",
        "seed=4",
        "+extra=x",
        "~logger=null",
        "parallel.fsdp.degree=-1",
    ]
    for sweep in ("seed=1,2", "seed=range(3)", "seed=choice(1,2)"):
        with pytest.raises(ConfigError, match=rf"'{re.escape(sweep)}' is a sweep; the plan runs one job per"):
            parse_args(["gpus=2", sweep])
    with pytest.raises(ConfigError, match=r"seed=\[1: no viable alternative"):
        parse_args(["seed=[1"])


def test_what_a_plan_run_again_keeps_reruns_and_refuses(tmp_path):
    """The job dirs an earlier run of the plan left, read back: completed and OOM jobs of the same
    settings are kept, cut-short ones cleared to run again, others refused before any is cleared."""
    from wan_exp.plan.run import earlier_results, parse_args, run_plan

    args = parse_args(["model=tiny", "gpus=1", "strategies=single,ulysses", f"out={tmp_path}"])
    single = [*args.overrides, "parallel=single", "launcher.simulate_world_size=1", "launcher.link=nvlink4"]

    def job_dir(name: str, results=None, job=None) -> Path:
        where = tmp_path / "jobs" / name
        (where / "0").mkdir(parents=True)
        for file, content in (("results.json", results), ("job.json", job)):
            if content is not None:
                (where / "0" / file).write_text(content if isinstance(content, str) else json.dumps(content))
        return where

    for status, kept in (
        ("completed", True),
        ("oom", True),
        ("failed", False),
        ("hang", False),
        ("interrupted", False),
    ):
        where = job_dir(f"a_{status}", {"status": status, "overrides": list(reversed(single))})
        results, clear = earlier_results(single, where)
        assert (results is not None, clear) == (kept, not kept), status
    assert earlier_results(single, job_dir("unreadable", "[1, 2]")) == (None, True)
    assert earlier_results(single, job_dir("no_files")) == (None, True)
    assert earlier_results(single, tmp_path / "jobs" / "absent") == (None, False)
    other = job_dir("other", job={"overrides": [o.replace("model=tiny", "model=s2v_14b") for o in single]})
    with pytest.raises(
        ConfigError,
        match=r"holds a job of other settings \(model: the sweep has "
        r"'model=s2v_14b', given 'model=tiny'\)",
    ):
        earlier_results(single, other)
    running = job_dir("running", job={"overrides": single})
    (running / ".wan_exp").mkdir()
    (running / ".wan_exp" / "lock.node_0").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(ConfigError, match=rf"its job is still running \(process {os.getpid()} on"):
        earlier_results(single, running)

    # the whole plan: a refusal at a later job comes before an earlier cut-short dir is cleared
    cut_short = job_dir("single_1")
    ulysses = [o.replace("parallel=single", "parallel=ulysses") for o in single]
    job_dir("ulysses_1", {"status": "completed", "overrides": [*ulysses, "seed=3"]})
    with pytest.raises(ConfigError, match=r"seed: the sweep has 'seed=3', given 'nothing'"):
        run_plan(args)
    assert cut_short.exists()


@pytest.mark.slow
@pytest.mark.timeout(900)  # several jobs of 4 steps, each starting torch, on a shared CPU
def test_plan_table_for_tiny_matches_the_simulated_jobs_it_ran(tmp_path):
    from launch_helpers import REPO, job_pids, pid_alive, wait_for
    from wan_exp.plan.run import code_version
    from wan_exp.results import heartbeat_path, read_json

    out = tmp_path / "plan"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "wan_exp.plan",
            "model=tiny",
            "gpus=1,2",
            "gpu_memory_gib=0.5,64",
            "strategies=single,ulysses,fsdp",
            f"out={out}",
            f"measured={out / 'jobs'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = json.loads((out / "plan.json").read_text())
    rows = {(r["strategy"], r["gpus"]): r for r in plan["rows"]}
    assert sorted(rows) == [("fsdp", 1), ("fsdp", 2), ("single", 1), ("single", 2), ("ulysses", 1), ("ulysses", 2)]
    # refused by the config rules, no job run
    assert rows[("single", 2)]["status"] == "not allowed" and "runs one rank" in rows[("single", 2)]["note"]
    assert rows[("fsdp", 1)]["status"] == "not allowed" and "needs GPUs" in rows[("fsdp", 1)]["note"]
    nvlink4 = LINKS["nvlink4"]
    steps = {}
    for key in (("single", 1), ("ulysses", 1), ("ulysses", 2)):
        row = rows[key]
        results = json.loads((Path(row["job_dir"]) / "results.json").read_text())
        assert results["status"] == row["status"] == "completed"
        assert results["simulated"] == {"world_size": key[1], "rank": 0}
        record = results["ranks"][0]
        peak = record["memory"]["peak_host_rss_gib"]  # the CPU: host memory is the device's
        assert row["peak_gib"] == peak
        stage_peaks = {name: s["peak_host_rss_gib"] for name, s in record["stages"].items()}
        expected_stage = (
            max(stage_peaks, key=stage_peaks.get)
            if max(stage_peaks.values()) >= 0.999 * peak
            else "init (build/load/wrap)"
        )
        assert row["peak_stage"] == expected_stage
        # the CPU: no CUDA context or NCCL buffers; a 5 % fragmentation margin
        assert row["need_gib"] == pytest.approx(peak * 1.05) and row["nccl_gib"] == row["context_gib"] == 0
        assert row["fits"] == {"0.5": peak * 1.05 <= 0.5, "64": True}
        steps_measured = sorted(record["step_times_s"])
        assert len(steps_measured) == row["measured_steps"] == 3
        compute = steps_measured[1]  # the median of 3
        assert (row["compute_min_s"], row["compute_max_s"]) == (steps_measured[0], steps_measured[2])
        # nvlink4: 6 us per call + bus bytes at each kind's sourced bandwidth, per recorded size
        bandwidth = {"all_reduce": 480, "all_gather": 370, "reduce_scatter": 370, "all_to_all": 335}
        comm = sum(
            calls * (6e-6 + int(key.split("x")[0]) * float(key.split("x")[1]) / (bandwidth[kind] * 1e9))
            for kind, f in (record["comm"]["per_step"] or {}).items()
            if kind != "barrier"
            for key, calls in f["messages"].items()
        )
        assert row["compute_s"] == pytest.approx(compute) and row["comm_s"] == pytest.approx(comm)
        assert row["overlap"] == "serial"  # Ulysses' all-to-alls block
        assert row["step_s"] == row["step_serial_s"] == pytest.approx(compute + comm)
        around = ("text_encode", "audio_encode", "reference_encode", "vae_decode", "motion_encode", "video_write")
        rest = sum(record["stages"][n]["seconds"] for n in around if n in record["stages"])
        assert row["clip_s"] == pytest.approx(40 * (compute + comm) + rest)  # upstream S2V: 40 steps, one clip
        steps[key] = compute + comm
    assert nvlink4.name in plan["title"]
    assert rows[("ulysses", 2)]["comm_s"] > 0  # Ulysses exchanges heads every attention
    for key, step in steps.items():
        assert rows[key]["efficiency"] == pytest.approx(steps[("single", 1)] / (key[1] * step))
    # the plan's own simulated jobs are no measurement: nothing shown beside the prediction
    assert all(r["measured_step_s"] is None for r in plan["rows"])
    page = (out / "plan.md").read_text()
    assert "full duplex" in page and "Measured:" in page and "Modelled:" in page and "Fits: need = peak" in page
    assert plan["code_version"] == code_version()
    assert "none of the same model and size" in page
    assert f"| ulysses | 2 | completed | {rows[('ulysses', 2)]['peak_gib']:.2f} |" in page
    assert "clip s (40 steps)" in page and "clip s (40 steps)" in proc.stdout  # a log gets the whole table
    assert (out / "plan.html").read_text().count("<tr>") == 7

    # the same plan again keeps the jobs that finished and runs the rest: a plan cut short
    # (here ulysses on 2 GPUs without results, as a kill mid-job leaves it) goes on
    ran = {key: Path(r["job_dir"]) / "results.json" for key, r in rows.items() if r["job_dir"]}
    assert len(ran) == 3
    ran.pop(("ulysses", 2)).unlink()
    written = {key: path.stat().st_mtime_ns for key, path in ran.items()}
    again = subprocess.run(proc.args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("kept from an earlier run") == 2
    assert {key: path.stat().st_mtime_ns for key, path in ran.items()} == written
    rerun = {(r["strategy"], r["gpus"]): r for r in json.loads((out / "plan.json").read_text())["rows"]}
    assert rerun[("ulysses", 2)]["status"] == "completed"
    assert rerun[("ulysses", 2)]["comm_per_step"] == rows[("ulysses", 2)]["comm_per_step"]  # the same job
    assert {k: r for k, r in rerun.items() if k != ("ulysses", 2)} == {
        k: r for k, r in rows.items() if k != ("ulysses", 2)
    }

    # a plan stopped by SIGTERM (a time limit) mid-job: its job ends its ranks and records itself
    # interrupted, the row says so, and the plan says how to go on
    slow = tmp_path / "slow"
    stopped = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wan_exp.plan",
            "model=tiny",
            "gpus=1",
            "strategies=single",
            f"out={slow}",
            "fault=sleep",
            "fault.rank=0",
            "fault.phase=build",
            "fault.seconds=120",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    job_dir = slow / "jobs" / "single_1" / "0"
    try:
        wait_for(
            lambda: (read_json(heartbeat_path(job_dir, 0)) or {}).get("phase") == "build" or stopped.poll() is not None,
            120,
            "the job to sleep in build",
        )
        assert stopped.poll() is None, stopped.communicate()
        ranks = job_pids(job_dir)
        stopped.terminate()
        told = stopped.communicate(timeout=180)
    finally:
        if stopped.poll() is None:
            stopped.kill()
    assert stopped.returncode == 128 + signal.SIGTERM, told
    assert "stopped by SIGTERM" in told[1] and "the same command again keeps the jobs done" in told[1], told
    assert json.loads((job_dir / "results.json").read_text())["status"] == "interrupted"
    assert ranks and not any(pid_alive(pid) for pid in ranks), "the job's ranks are ended"
    (halted,) = json.loads((slow / "plan.json").read_text())["rows"]
    assert halted["status"] == "interrupted" and "the same command again runs it" in halted["note"]

    # other settings into the same out: refused, nothing overwritten
    other = subprocess.run(
        [*proc.args, "workload.sample_steps=3"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert other.returncode == 2 and "holds a job of other settings" in other.stderr, other.stderr
    assert "give the plan another out=" in other.stderr
    assert {key: path.stat().st_mtime_ns for key, path in ran.items()} == written


# ----------------------------------------------------------------------------- GPU (the lead runs these)
def _torchrun_shared_gpu(nproc: int) -> str:
    proc = torchrun(
        nproc,
        str(REPO / "tests" / "dist" / "strategy_equivalence.py"),
        timeout=280,
        env={"WAN_EXP_TEST_DEVICE": "cuda"},
    )
    told = proc.stdout + proc.stderr
    verdicts = "\n".join(line for line in told.splitlines() if "MISMATCH" in line or "Error" in line)
    assert proc.returncode == 0, verdicts + "\n" + told[-3000:]
    return proc.stdout


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_every_strategy_on_shared_gpu_ranks_equals_single(nproc):
    """2 and 4 gloo ranks on the visible GPU(s), round robin: every split's weights equal the
    single-rank model's and its output and guided velocity agree within bf16 tolerance."""
    assert "ALL 11 STRATEGY CASES MATCH" in _torchrun_shared_gpu(nproc)


GPU_MODEL = [
    "model=s2v_14b",
    "model.num_layers=8",
    "model.audio_inject_layers=[0,4]",
    "workload=generate",
    "workload.size=256*256",
    "workload.frames_per_clip=16",
    "workload.sample_steps=2",
    "logger=disabled",
]


@pytest.mark.gpu
@pytest.mark.slow
def test_shared_gpu_jobs_of_every_preset_complete_and_say_so(tmp_path):
    proc = run_launch(
        tmp_path,
        "model=tiny",
        "workload=generate",
        "logger=disabled",
        "launcher.nproc_per_node=4",
        "launcher.share_gpus=true",
        "parallel=ulysses,fsdp,fsdp_fixed,hybrid,usp,cfg_ulysses",
        multirun=True,
        timeout=280,
    )
    assert proc.returncode == 0, output(proc)
    jobs = job_results(tmp_path)
    assert len(jobs) == 6 and all(j["status"] == "completed" and j["shared_gpus"] for j in jobs)
    assert all(r["device"].startswith("cuda") for j in jobs for r in j["ranks"])
    assert "## Times not comparable" in (tmp_path / "report.md").read_text()


@pytest.mark.gpu
@pytest.mark.slow
def test_simulated_peak_allocated_within_5_percent_of_shared_gpu_process(tmp_path):
    """fsdp_fixed, s2v_14b cut to 8 blocks: rank 0 simulated at N=2 and 4 against rank 0 of
    real N-rank jobs sharing the GPU(s) (per-process allocator figures)."""
    common = [*GPU_MODEL, "parallel=fsdp_fixed"]
    real = run_launch(
        tmp_path / "real",
        *common,
        "launcher.share_gpus=true",
        "launcher.nproc_per_node=2,4",
        multirun=True,
        timeout=290,
    )
    assert real.returncode == 0, output(real)
    sim = run_launch(tmp_path / "sim", *common, "launcher.simulate_world_size=2,4", multirun=True, timeout=290)
    assert sim.returncode == 0, output(sim)
    real_jobs, sim_jobs = _by_world_size(tmp_path / "real"), _by_world_size(tmp_path / "sim")
    for n in (2, 4):
        measured = real_jobs[n]["ranks"][0]["memory"]["peak_allocated_gib"]
        simulated = sim_jobs[n]["ranks"][0]["memory"]["peak_allocated_gib"]
        assert simulated == pytest.approx(measured, rel=0.05), (n, simulated, measured)
