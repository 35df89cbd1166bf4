"""Reliability: hang watchdog, faults, no leftover workers, atomic and resumable results."""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch
from omegaconf import OmegaConf

from launch_helpers import job_pids, job_results, output, pid_alive, root_cause, run_fault_sweep, run_launch
from wan_exp import liveness, results
from wan_exp.config import compose_config
from wan_exp.host.job import check_progress, furthest_behind
from wan_exp.rank.runtime import BEAT_MIN_INTERVAL_S, RankContext

HANG_TIMEOUT_S = 8


@pytest.mark.slow
def test_hang_is_detected_with_stacks_and_the_next_job_completes(tmp_path):
    """Job 0: rank 1 blocks on entering wrap (rank 0, with nothing to wait for in
    workload=init, finishes). Job 1: rank 1 sleeps 2 s on entering wrap (a slow rank, under the
    timeout), and completes. Start-up (process start, imports) does not count against
    the hang timeout, however slow the machine: launcher.rdzv_timeout_s bounds it."""
    hung, slow = run_fault_sweep(
        tmp_path, "fault=hang,sleep", "fault.phase=wrap", "fault.seconds=2", f"launcher.hang_timeout_s={HANG_TIMEOUT_S}"
    )
    assert hung["status"] == "hang" and root_cause(hung)[:2] == (1, "wrap")
    assert "launcher.hang_timeout_s" in hung["root_cause"]["message"]
    job_dir = tmp_path / "0"
    assert f"no progress from any rank for {HANG_TIMEOUT_S}s" in hung["root_cause"]["message"]
    assert "'wrap'" in hung["root_cause"]["message"], "the phase rank 1 stopped in"
    finished = {r["rank"] for r in hung["ranks"] if r["status"] == "completed"}
    assert 1 not in finished
    for rank in set(range(2)) - finished:  # every rank still running when the hang was found
        stacks = (job_dir / "stacks" / f"rank_{rank}.txt").read_text()
        assert "most recent call first" in stacks, f"rank {rank} wrote no stack"
    assert "_hang" in (job_dir / "stacks" / "rank_1.txt").read_text(), "the hung rank's stack shows where"
    pids = job_pids(job_dir)
    assert len(pids) == 2 and not any(pid_alive(p) for p in pids), "no worker outlives its job"

    assert slow["status"] == "completed"
    wrap_s = {r["rank"]: r["init_phases_s"]["wrap"] for r in slow["ranks"]}
    assert wrap_s[1] >= 2.0, wrap_s


@pytest.mark.slow
def test_a_stage_longer_than_the_hang_timeout_is_not_a_hang_while_it_beats(tmp_path):
    """fault=slow makes every in-stage heartbeat of the VAE decode wait 3 s: the decode of the
    tiny model's first clip (one rank decodes the whole frame: the reference latent and 2 clip
    latents, one beat per latent frame) lasts at least 3 x 3 = 9 s, longer than
    launcher.hang_timeout_s=8, but it reports each frame, so the job completes.
    Without the decoder's beats the stage would be short (nothing to slow) and this fails;
    with beats that never reach the heartbeat file it would be called a hang."""
    hang_timeout_s, delay_s = HANG_TIMEOUT_S, 3.0
    proc = run_launch(
        tmp_path,
        "fault=slow",
        "fault.phase=vae_decode",
        f"fault.seconds={delay_s}",
        f"launcher.hang_timeout_s={hang_timeout_s}",
        "launcher.nproc_per_node=1",
        "parallel=single",
        "logger=disabled",
        timeout=900,
    )
    assert proc.returncode == 0, output(proc)
    (job,) = job_results(tmp_path)
    assert job["status"] == "completed", job["root_cause"]
    decode_s = job["ranks"][0]["stages"]["vae_decode"]["seconds"]
    assert decode_s > hang_timeout_s, decode_s


@pytest.mark.slow
def test_a_hang_ended_by_the_process_group_timeout_blames_the_stuck_rank(tmp_path):
    """nccl.timeout_s below launcher.hang_timeout_s (as in nccl=debug): rank 0 times out in
    the first step's all-to-all (Ulysses) waiting for rank 1, which blocks on entering
    that step. The job hung in rank 1."""
    proc = run_launch(
        tmp_path,
        "fault=hang",
        "fault.phase=first_step",
        "parallel=ulysses",
        "nccl.timeout_s=6",
        "launcher.hang_timeout_s=120",
        "logger=disabled",
    )
    assert proc.returncode == 1, output(proc)
    (hung,) = job_results(tmp_path)
    assert hung["status"] == "hang" and root_cause(hung)[:2] == (1, "first_step"), hung["root_cause"]
    assert "timed out in a collective" in hung["root_cause"]["message"]


@pytest.mark.slow
def test_raising_and_killed_ranks_fail_their_jobs_and_the_sweep_goes_on(tmp_path):
    """Job 0: rank 0 raises on entering build. Job 1: rank 1 kills itself with SIGKILL
    on entering build. Both are failed with the right root cause; launch.py exits 1."""
    raised, killed = run_fault_sweep(tmp_path, "fault=raise,signal")
    assert raised["status"] == "failed" and root_cause(raised) == (0, "build", 1)
    message = raised["root_cause"]["message"]
    assert "InjectedFault" in message and "build" in message
    rank0 = next(r for r in raised["ranks"] if r["rank"] == 0)
    assert rank0["status"] == "failed" and rank0["error"]["phase"] == "build"
    assert "Traceback" in rank0["error"]["traceback"]

    assert killed["status"] == "failed" and root_cause(killed) == (1, "build", -signal.SIGKILL)
    assert "SIGKILL" in killed["root_cause"]["message"]
    for job_dir in (tmp_path / "0", tmp_path / "1"):
        pids = job_pids(job_dir)
        assert len(pids) == 2 and not any(pid_alive(p) for p in pids), "no worker outlives its job"


@pytest.mark.slow
def test_resume_runs_only_the_missing_jobs(tmp_path):
    """Resume reads the sweep's own overrides: none given, or the same in another order,
    re-run only the jobs without a completed result; a real difference is named."""
    sweep = ("seed=0,1", "parallel=single", "workload=init", "logger=disabled")
    assert run_launch(tmp_path, *sweep, multirun=True).returncode == 0
    kept = (tmp_path / "0" / "results.json").read_bytes()
    kept_mtime = (tmp_path / "0" / "results.json").stat().st_mtime_ns

    for resume_args in ((), tuple(reversed(sweep))):
        (tmp_path / "1" / "results.json").unlink()  # as if the sweep had been stopped during job 1
        first_pid = results.read_rank_records(tmp_path / "1")[0]["pid"]
        proc = run_launch(tmp_path, *resume_args, "launcher.resume=true")
        assert proc.returncode == 0, output(proc)
        assert [r["status"] for r in job_results(tmp_path)] == ["completed"] * 2
        assert [r["overrides"] for r in job_results(tmp_path)] == [
            ["seed=0", "parallel=single", "workload=init", "logger=disabled"],
            ["seed=1", "parallel=single", "workload=init", "logger=disabled"],
        ]
        assert results.read_rank_records(tmp_path / "1")[0]["pid"] != first_pid, "job 1 ran again"
        assert (tmp_path / "0" / "results.json").read_bytes() == kept
        assert (tmp_path / "0" / "results.json").stat().st_mtime_ns == kept_mtime
        assert output(proc).count("already completed") == 1

    # a finished sweep dir is never reused silently, nor resumed with other arguments
    again = run_launch(tmp_path, *sweep, multirun=True)
    assert again.returncode == 1 and "already holds a job; use launcher.resume=true" in output(again)
    other = run_launch(
        tmp_path,
        "seed=0,1",
        "parallel=single",
        "workload=generate",
        "logger=disabled",
        "launcher.resume=true",
        multirun=True,
    )
    assert other.returncode == 1
    assert "workload: the sweep has 'workload=init', given 'workload=generate'" in output(other), output(other)
    assert "Traceback" not in output(other)


@pytest.mark.gpu
def test_oom_is_recorded_with_memory_figures(tmp_path):
    proc = run_launch(tmp_path, "fault=oom", "parallel=single", "workload=init", "logger=disabled")
    assert proc.returncode == 1, output(proc)
    (oom,) = job_results(tmp_path)
    assert oom["status"] == "oom" and oom["root_cause"]["rank"] == 0
    record = oom["ranks"][0]
    assert record["status"] == "oom" and record["memory"]["peak_allocated_gib"] > 1
    assert record["error"]["device_total_gib"] > 0


def test_start_up_is_bounded_by_the_rdzv_timeout_and_then_the_hang_timeout_applies():
    launcher = OmegaConf.create({"rdzv_timeout_s": 60.0, "hang_timeout_s": 8.0})
    beat = {"rank": 0, "pid": 1, "phase": "build", "step": None, "seq": 3, "time": 100.0}
    # 30 s into the job, rank 1 still starting (a loaded machine): no verdict yet
    assert check_progress({0: beat}, 2, started_at=95.0, now=125.0, launcher_cfg=launcher, endpoint="h:1") is None
    # past the start-up bound: the rank that never started is named, in phase start
    late = check_progress({0: beat}, 2, started_at=0.0, now=61.0, launcher_cfg=launcher, endpoint="h:1")
    assert (late["status"], late["rank"], late["phase"]) == ("hang", 1, "start")
    assert "launcher.rdzv_timeout_s=60s" in late["message"]
    # no rank at all: the rendezvous did not form, and its endpoint is named
    none = check_progress({}, 2, started_at=0.0, now=61.0, launcher_cfg=launcher, endpoint="node0:29500")
    assert (none["status"], none["rank"], none["phase"]) == ("failed", None, "rendezvous")
    assert "node0:29500" in none["message"]
    # every rank started: 8 s without progress from any rank is a hang in the rank furthest behind
    beats = {0: beat, 1: {**beat, "rank": 1, "phase": "wrap", "seq": 2, "time": 101.0}}
    assert check_progress(beats, 2, started_at=0.0, now=108.5, launcher_cfg=launcher, endpoint="h:1") is None
    hang = check_progress(beats, 2, started_at=0.0, now=109.5, launcher_cfg=launcher, endpoint="h:1")
    assert (hang["status"], hang["rank"], hang["phase"]) == ("hang", 1, "wrap")


def test_in_stage_beats_move_the_heartbeat_time_but_not_its_phase_or_seq(tmp_path):
    """liveness.beat() (a VAE frame, a weight tensor...) is progress for the watchdog: the
    heartbeat's time and detail move, phase and seq stay (ranks need not beat equally often)."""
    ctx = RankContext(compose_config(["workload=init"]), 0, 0, 1, torch.device("cpu"), tmp_path)
    try:
        ctx.heartbeat("vae_decode")
        before = results.read_heartbeats(tmp_path)[0]
        time.sleep(BEAT_MIN_INTERVAL_S)  # beats closer than this are not written
        liveness.beat("decode frame 1/21")
        after = results.read_heartbeats(tmp_path)[0]
    finally:
        liveness.set_listener(None)  # later tests in this process must not write into tmp_path
    assert (after["phase"], after["seq"], after["detail"]) == ("vae_decode", before["seq"], "decode frame 1/21")
    assert after["time"] > before["time"]
    launcher = OmegaConf.create({"rdzv_timeout_s": 60.0, "hang_timeout_s": 8.0})
    hang = check_progress({0: after}, 1, started_at=0.0, now=after["time"] + 9, launcher_cfg=launcher, endpoint="h:1")
    assert "'vae_decode (decode frame 1/21)'" in hang["message"], hang["message"]


def test_the_hung_rank_is_the_one_furthest_behind():
    # rank 0 got further and waits in a collective; rank 1 entered wrap later and stopped there
    beats = {
        0: {"rank": 0, "phase": "first_step", "step": None, "seq": 7, "time": 10.0},
        1: {"rank": 1, "phase": "wrap", "step": None, "seq": 6, "time": 10.5},
    }
    assert furthest_behind(beats, 2, started_at=0.0)["rank"] == 1
    # equal progress: the older heartbeat; a rank with none never started
    beats[0].update(phase="wrap", seq=6)
    assert furthest_behind(beats, 2, started_at=0.0)["rank"] == 0
    assert furthest_behind(beats, 3, started_at=0.0) == {
        "rank": 2,
        "phase": "start",
        "step": None,
        "seq": 0,
        "time": 0.0,
    }


# ----------------------------------------------------------------------------- results.py
def _failed_record(rank: int, when: float, phase: str, status: str = "failed") -> dict:
    return {
        "rank": rank,
        "status": status,
        "error": {"type": "RuntimeError", "message": f"rank {rank} broke", "phase": phase, "time": when},
    }


def test_root_cause_is_the_earliest_failure():
    records = [
        _failed_record(0, 100.5, "step"),
        _failed_record(2, 101.0, "step"),
        {"rank": 3, "status": "completed", "error": None},
    ]
    died = {
        1: {"exitcode": -9, "time": 100, "phase": "wrap", "message": "rank 1 killed by SIGKILL"},
        3: {"exitcode": -15, "time": 99, "phase": "step", "message": "stopped"},
    }
    cause = results.failure_root_cause(records, died)
    assert (cause["rank"], cause["phase"], cause["exitcode"]) == (1, "wrap", -9)
    # without the killed rank, the earliest recorded error; SIGTERM victims come last
    cause = results.failure_root_cause(records, {3: died[3]})
    assert (cause["rank"], cause["message"]) == (0, "RuntimeError: rank 0 broke")
    assert results.failure_root_cause([], {3: died[3]})["rank"] == 3


def _job_dir(tmp_path):
    results.write_json_atomic(
        tmp_path / "job.json", {"overrides": ["x=1"], "job_num": 4, "world_size": 2, "started_at": results.now_iso()}
    )
    (tmp_path / "config.yaml").write_text("parallel:\n  name: ulysses\nmodel:\n  name: tiny\n")
    return tmp_path


def test_finalize_job_status_and_oom(tmp_path):
    job_dir = _job_dir(tmp_path)
    results.write_rank_record(job_dir, _failed_record(1, 5.0, "first_step", status="oom"))
    final = results.finalize_job(job_dir, {1: {"exitcode": 1, "time": 6, "phase": "first_step", "message": "x"}}, None)
    assert final["status"] == "oom" and final["root_cause"]["rank"] == 1
    assert final["strategy"] == "ulysses" and final["overrides"] == ["x=1"] and final["job_num"] == 4
    assert json.loads((job_dir / "results.json").read_text()) == final


def test_completed_results_are_never_overwritten(tmp_path):
    job_dir = _job_dir(tmp_path)
    record = {"rank": 0, "status": "completed", "error": None}
    done = results.completed_results(job_dir, [record], lambda records, config: {"n": len(records)})
    results.write_results(job_dir, done)
    with pytest.raises(FileExistsError, match="completed result"):
        results.write_results(job_dir, {**done, "status": "failed"})
    # nor by a second finalisation, whatever it saw after the first
    hang = {"rank": 1, "phase": "step", "message": "late"}
    assert results.finalize_job(job_dir, {1: {"exitcode": -9, "message": "x"}}, hang) == done
    assert results.read_results(job_dir) == done


def test_finalize_job_completes_only_when_every_rank_recorded_completion(tmp_path):
    job_dir = _job_dir(tmp_path)  # world size 2
    done = {
        "rank": 0,
        "world_size": 2,
        "status": "completed",
        "error": None,
        "device_name": "cpu",
        "memory": {"peak_host_rss_gib": 1.0},
        "step_times_s": [0.5],
        "workload": {},
    }
    results.write_rank_record(job_dir, done)
    missing = results.finalize_job(job_dir, {}, None)
    assert missing["status"] == "failed" and missing["root_cause"]["rank"] == 1
    assert "without writing a record" in missing["root_cause"]["message"]
    (job_dir / "results.json").unlink()
    results.write_rank_record(job_dir, {**done, "rank": 1, "step_times_s": [0.7]})
    final = results.finalize_job(job_dir, {}, None)
    assert final["status"] == "completed" and final["root_cause"] is None
    assert [r["rank"] for r in final["ranks"]] == [0, 1]
    assert final["summary"]["step_time_s_median"] == 0.7  # the slowest rank's step
    interrupted = results.finalize_job(
        _job_dir(tmp_path / "other"),
        {},
        None,
        interrupted={"rank": 1, "phase": "wrap", "message": "interrupted by SIGINT"},
    )
    assert interrupted["status"] == "interrupted" and interrupted["root_cause"]["phase"] == "wrap"


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "results.json"
    results.write_json_atomic(target, {"a": 1})
    with pytest.raises(TypeError):
        results.write_json_atomic(target, {("tuple", "key"): 2})  # fails half-way through dumping
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
