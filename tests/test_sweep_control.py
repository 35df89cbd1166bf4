"""Control of a running sweep, with real processes: interrupts, one sweep per directory,
colliding job dirs, a rendezvous that cannot form, live progress on a terminal, and one
job spread over two "hosts" (two launch.py processes on loopback)."""

from __future__ import annotations

import os
import pty
import select
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launch_helpers import REPO, job_pids, job_results, output, pid_alive, run_launch, wait_for
from tolerance import chain_tolerance, dit_gradient_reductions
from wan_exp import results
from wan_exp.config import compose_config
from wan_exp.geometry import job_geometry

pytestmark = pytest.mark.slow


def launch_cmd(sweep_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "launch.py"), *overrides, f"hydra.sweep.dir={sweep_dir}"]


def with_sigint() -> None:
    """A child's SIGINT as at a terminal: a shell starts background jobs with SIGINT ignored,
    and a Python started so never turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def heartbeat_phase(job_dir: Path, rank: int = 0):
    beat = results.read_json(results.heartbeat_path(job_dir, rank))
    return beat and beat["phase"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- interrupts
# job 0 sleeps 4 s entering build, job 1 has no fault (a resume runs both again)
SLOW_SWEEP = (
    "-m",
    "fault=sleep,none",
    "parallel=single",
    "workload=init",
    "fault.rank=0",
    "fault.phase=build",
    "fault.seconds=4",
    "logger=disabled",
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_stops_the_sweep_records_the_job_and_prints_the_resume_command(tmp_path, sig):
    """A second launch into the busy dir (job 0 started) is refused, naming the first. Job 0 of
    two is in phase build (an injected 4 s sleep) when the signal comes. The interrupted job's
    result says where it was, job 1 never starts, the dashboard is written, the console
    shows the resume command and no traceback; that command (SIGINT case) finishes it."""
    first = subprocess.Popen(
        launch_cmd(tmp_path, *SLOW_SWEEP), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for(lambda: (tmp_path / "0" / "job.json").exists() or first.poll() is not None, 120, "job 0 to start")
        second = run_launch(tmp_path, *SLOW_SWEEP[1:], multirun=True, timeout=60)
        assert second.returncode != 0
        assert f"in use by process {first.pid} on this host" in output(second), output(second)
        wait_for(
            lambda: heartbeat_phase(tmp_path / "0") == "build" or first.poll() is not None, 120, "job 0 to enter build"
        )
        assert first.poll() is None, first.communicate()[0]
        first.send_signal(sig)
        out, _ = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0, out
    assert "Traceback" not in out, out
    (interrupted,) = job_results(tmp_path)
    assert interrupted["status"] == "interrupted" and interrupted["job_num"] == 0
    cause = interrupted["root_cause"]
    assert (cause["rank"], cause["phase"]) == (0, "build") and sig.name in cause["message"], cause
    assert not (tmp_path / "1").exists(), "the sweep stops: job 1 never starts"
    ranks = job_pids(tmp_path / "0")
    assert ranks and not any(pid_alive(p) for p in ranks), "the job's ranks are ended"
    assert (tmp_path / "report.md").exists() and "interrupted" in (tmp_path / "report.md").read_text()
    resume = f"launch.py hydra.sweep.dir={tmp_path.resolve()} launcher.resume=true"
    assert resume in out, out
    assert not list((tmp_path / ".wan_exp").glob("lock.*")), "the lock is released"
    if sig != signal.SIGINT:
        return
    line = next(text for text in out.splitlines() if resume in text).split()
    assert line[:2] == ["python", str(REPO / "launch.py")], line
    done = subprocess.run([sys.executable, *line[1:]], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, output(done)
    assert [(r["job_num"], r["status"]) for r in job_results(tmp_path)] == [(0, "completed"), (1, "completed")]


@pytest.mark.parametrize("batch", [[], ["hydra.sweeper.max_batch_size=1"]], ids=["one_batch", "batches_of_one"])
def test_a_ctrl_c_between_two_jobs_stops_the_sweep_and_says_how_to_resume(tmp_path, batch):
    """The first of two jobs has ended, the second has not started (a test callback pauses
    there) when Ctrl-C comes: the sweep exits non-zero, names the job not run and prints the
    resume command; no job is left half-recorded. In batches of one job the second batch is
    never even checked: the sweep record says how many jobs there are."""
    pause = [
        "+hydra.callbacks.pause._target_=pause_callback.PauseAfterJob",
        "+hydra.callbacks.pause.seconds=60",
        *batch,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    sweep = subprocess.Popen(
        launch_cmd(tmp_path, "-m", "seed=0,1", "parallel=single", "workload=init", "logger=disabled", *pause),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=with_sigint,
    )
    try:
        wait_for(lambda: (tmp_path / "between_jobs").exists() or sweep.poll() is not None, 120, "job 0 to end")
        assert sweep.poll() is None, sweep.communicate()[0]
        sweep.send_signal(signal.SIGINT)
        out, _ = sweep.communicate(timeout=60)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 1, out
    assert "Traceback" not in out, out
    assert [(r["job_num"], r["status"]) for r in job_results(tmp_path)] == [(0, "completed")]
    assert not (tmp_path / "1").exists()
    assert "sweep stopped before job 1 finished (1 job(s) without results: 1); resume it with:" in out, out
    # the printed command gives the launch's hydra.* settings again (here the test's pause), so it works as printed
    command = shlex.split(out.split("resume it with:\n", 1)[1].splitlines()[0])
    assert command[2:] == sorted(pause[:2] + batch) + [f"hydra.sweep.dir={tmp_path.resolve()}", "launcher.resume=true"]
    assert not list((tmp_path / ".wan_exp").glob("lock.*")), "the lock is released"


def test_ranks_do_not_outlive_a_job_process_that_is_killed(tmp_path):
    """A job process killed outright (SIGKILL, or a second Ctrl-C, which exits at once without
    cleaning up): its agent sees it gone and ends the ranks."""
    stuck = [o.replace("fault.seconds=6", "fault.seconds=300") for o in SLOW_SWEEP]  # no rank ends by itself
    job = subprocess.Popen(launch_cmd(tmp_path, *stuck), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(
            lambda: heartbeat_phase(tmp_path / "0") == "build" or job.poll() is not None, 120, "job 0 to enter build"
        )
        assert job.poll() is None
        ranks = job_pids(tmp_path / "0")
        assert ranks and all(pid_alive(pid) for pid in ranks)
        job.kill()
        job.wait(timeout=10)
        wait_for(lambda: not any(pid_alive(pid) for pid in ranks), 30, "the ranks to end")
    finally:
        if job.poll() is None:
            job.kill()
        for pid in job_pids(tmp_path / "0"):  # this test's own leftovers, should it fail
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_job_dirs_that_would_collide_are_refused_before_any_job_starts(tmp_path):
    proc = run_launch(
        tmp_path,
        "seed=0,1",
        "parallel=single",
        "workload=init",
        "logger=disabled",
        "hydra.sweep.subdir=${parallel.name}",
        multirun=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert (
        f"job 1 (seed=1 parallel=single workload=init logger=disabled): its job dir {tmp_path.resolve()}/single "
        "is job 0's too" in output(proc)
    ), output(proc)
    assert "Traceback" not in output(proc)
    assert not (tmp_path / "single").exists(), "no job may start"


# ----------------------------------------------------------------------------- bounded start
def test_a_rendezvous_port_held_by_another_program_fails_within_the_timeout(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        endpoint = f"127.0.0.1:{holder.getsockname()[1]}"
        # (run_launch's own timeout only stops a stuck test; the bound is the watchdog's, below)
        proc = run_launch(
            tmp_path,
            f"launcher.rdzv_endpoint={endpoint}",
            "launcher.rdzv_timeout_s=5",
            "workload=init",
            "logger=disabled",
            timeout=300,
        )
    assert proc.returncode == 1, output(proc)
    (failed,) = job_results(tmp_path)
    assert failed["status"] == "failed" and failed["root_cause"]["phase"] == "rendezvous", failed["root_cause"]
    assert endpoint in failed["root_cause"]["message"]


# ----------------------------------------------------------------------------- progress
def test_live_progress_on_a_terminal(tmp_path):
    """Through a pseudo-terminal: the per-rank table (phase, step i/n, elapsed) and job k of n."""
    main, child = pty.openpty()
    proc = subprocess.Popen(
        launch_cmd(
            tmp_path,
            "parallel=ulysses",
            "workload.sample_steps=3",
            "fault=sleep",
            "fault.phase=step",
            "fault.seconds=3",
            "logger=disabled",
        ),
        cwd=REPO,
        stdin=child,
        stdout=child,
        stderr=child,
        env={**os.environ, "COLUMNS": "120"},
    )
    os.close(child)
    seen = b""
    try:
        while True:
            ready, _, _ = select.select([main], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the child side closed
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        proc.wait(timeout=120)
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()
    text = seen.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "job 1 of 1" in text
    for column in ("rank", "phase", "step", "elapsed"):
        assert column in text
    assert "/3" in text, "step i/n of the 3 sampling steps"


# ----------------------------------------------------------------------------- two hosts
def test_two_hosts_on_loopback_form_one_job_equal_to_one_host(tmp_path):
    """Two launch.py processes, one rank each (launcher.nnodes=2, node_rank 0 and 1, c10d
    rendezvous on a fixed port) make one job of world size 2: one results.json, one W&B
    run, both ranks' records, and the same losses as one host running both ranks (whose
    output, off a terminal, shows no progress display)."""
    train = ("parallel=ulysses", "workload=train_lora", "workload.steps=2", "workload.lora.save=false")
    endpoint = f"localhost:{free_port()}"
    sweep = tmp_path / "two_hosts"
    hosts = [
        subprocess.Popen(
            launch_cmd(
                sweep,
                *train,
                "launcher.nnodes=2",
                f"launcher.node_rank={n}",
                "launcher.nproc_per_node=1",
                f"launcher.rdzv_endpoint={endpoint}",
            ),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in (0, 1)
    ]
    outs = [h.communicate(timeout=300)[0] for h in hosts]
    assert [h.returncode for h in hosts] == [0, 0], outs
    (two,) = job_results(sweep)
    assert two["status"] == "completed" and two["world_size"] == 2
    assert [r["rank"] for r in two["ranks"]] == [0, 1]
    nodes = {r["env"]["WAN_EXP_NODE_ID"] for r in two["ranks"]}
    assert len(nodes) == 2, "each rank ran under its own host's agent"
    assert len(list((sweep / "0" / "wandb").glob("offline-run-*"))) == 1, "one W&B run"
    assert sum("COMPLETED" in out for out in outs) == 1, "one summary, from global rank 0's host"

    one = run_launch(tmp_path / "one_host", *train, "launcher.nproc_per_node=2", timeout=300)
    assert one.returncode == 0, output(one)
    # off a terminal (captured here) the live progress table is never drawn
    assert "last beat" not in output(one) and "job 1 of 1" not in output(one)
    (single,) = job_results(tmp_path / "one_host")
    for key in ("status", "world_size", "strategy", "workload"):
        assert two[key] == single[key]
    losses = [[r["workload"]["losses"] for r in job["ranks"]] for job in (two, single)]
    # equal up to fp32 rounding: hosts may run their ranks on other thread counts (torch's agent
    # sets an unset OMP_NUM_THREADS to 1 only where a host runs several ranks), which sum the
    # matrix products in another order. The second loss follows an update from the first
    # step's gradients: the DiT's forward and backward (tests/tolerance.py), then the loss's mean
    # over the flow's elements
    cfg = compose_config(list(train))
    geometry = job_geometry(cfg)
    flow = cfg.model.out_dim * geometry.latent_frames * geometry.latent_height * geometry.latent_width
    reductions = dit_gradient_reductions(cfg.model, geometry.tokens_later_clip) + [flow]
    assert np.allclose(losses[0], losses[1], rtol=chain_tolerance(torch.float32, reductions), atol=0), losses
