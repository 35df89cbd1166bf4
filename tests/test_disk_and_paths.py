"""Nothing lost at the edges of the file system: a disk that fills or turns read-only
mid-sweep, a job dir removed or replaced mid-run, sweep dirs that cannot be written, a
resume into an empty dir, paths with spaces, and Hydra's own errors, each with a real
fault (a small tmpfs, a read-only mount, a file-size limit) and read back from the files
and the console."""

from __future__ import annotations

import errno
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf, open_dict, read_write

from launch_helpers import REPO, job_results, output, run_launch, wait_for
from wan_exp import results
from wan_exp.config import ConfigError, compose_config
from wan_exp.host import disk
from wan_exp.host.callbacks import SweepCallback, hydra_override, resume_command
from wan_exp.media import write_video
from wan_exp.wandb_logger import log_job

MIB = 1024**2
JOB = ("workload=init", "logger=disabled")  # the quickest real job: build, load, wrap


# ----------------------------------------------------------------------------- real file systems
def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here (mount {' '.join(args)}: {done.stderr.strip()}); needs root and CAP_SYS_ADMIN")


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 64 MiB at a path with a space in it; unmounted afterwards."""
    point = tmp_path / "disk with space"
    point.mkdir()
    _mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(point))
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder that is a read-only bind mount (root ignores permission bits, not this)."""
    source, point = tmp_path / "source", tmp_path / "read only"
    source.mkdir()
    point.mkdir()
    _mount("--bind", str(source), str(point))
    try:
        _mount("-o", "remount,ro,bind", str(point))
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(folder: Path, leave: int = 0) -> Path:
    """Write a file into `folder` until its file system has only `leave` bytes free, or
    (leave=0) until it refuses with ENOSPC."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while shutil.disk_usage(folder).free > leave:
                f.write(b"\0" * min(MIB, shutil.disk_usage(folder).free - leave or MIB))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def start_launch(sweep_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "launch.py"), "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for_phase(job_dir: Path, rank: int, phase: str) -> None:
    beat = results.heartbeat_path(job_dir, rank)
    wait_for(lambda: (results.read_json(beat) or {}).get("phase") == phase, 120, f"rank {rank} in {phase}")


def printed_resume(text: str) -> list[str]:
    """The resume command the console printed, split as a shell would."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.rstrip().endswith("resume it with:"))
    return shlex.split(lines[at + 1])


# ----------------------------------------------------------------------------- before any job
def test_sweep_dirs_that_cannot_hold_a_sweep_are_refused_before_any_job(read_only_dir, tmp_path):
    proc = run_launch(read_only_dir / "sweep", *JOB)
    assert proc.returncode == 1, output(proc)
    assert "no job started: hydra.sweep.dir=" in proc.stderr and "Read-only file system" in proc.stderr
    assert "Traceback" not in output(proc) and not any(read_only_dir.iterdir())

    before = sorted(p.name for p in REPO.iterdir())  # an empty sweep dir would write here
    proc = run_launch("", *JOB)
    assert proc.returncode == 1 and "hydra.sweep.dir is empty" in proc.stderr, output(proc)
    assert sorted(p.name for p in REPO.iterdir()) == before

    proc = run_launch(tmp_path / "typo", "launcher.resume=true", *JOB)  # resume into nothing
    assert proc.returncode == 1, output(proc)
    assert "holds no sweep to resume" in proc.stderr and "Traceback" not in output(proc)
    assert not list((tmp_path / "typo").glob("*/job.json")), "no job ran"


def test_free_space_is_checked_against_what_the_sweep_will_write(small_disk):
    # the bound on a video: every frame as yuv420p (1.5 bytes per pixel) plus AAC at 128 kbit/s
    cfg = compose_config(
        [
            "workload.save_video=true",
            "workload.size=256*256",
            "workload.frames_per_clip=16",
            "workload.clips=3",
            "workload.fps=16",
        ]
    )
    assert disk.video_bytes(cfg) == 3 * 16 * 256 * 256 * 3 // 2 + 3 * 16000
    noise = np.random.default_rng(0).integers(0, 256, (16, 256, 256, 3), dtype=np.uint8)
    audio = np.random.default_rng(1).standard_normal(16000).astype(np.float32)
    written = write_video(small_disk / "noise.mp4", noise, 16, audio)  # the hardest content to compress
    assert written.stat().st_size <= disk.video_bytes(
        compose_config(
            ["workload.save_video=true", "workload.size=256*256", "workload.frames_per_clip=16", "workload.fps=16"]
        )
    )
    assert disk.video_bytes(compose_config(["workload.save_video=false"])) == 0
    written.unlink()

    fill(small_disk, leave=2 * MIB)  # room to start a sweep, not for what this one will write
    proc = run_launch(
        small_disk / "sweep", "workload.save_video=true", "workload.size=256*256", "workload.clips=3", "logger=disabled"
    )
    assert proc.returncode == 1, output(proc)
    assert "no job started: the sweep's 1 job(s) will write about" in proc.stderr, output(proc)
    assert "of it video at 1.5 bytes per pixel" in proc.stderr and "workload.save_video=false" in proc.stderr
    assert "Traceback" not in output(proc) and not (small_disk / "sweep" / "0").exists()


def test_a_video_that_cannot_be_written_names_itself_and_leaves_no_file(tmp_path):
    frames = np.zeros((8, 64, 64, 3), np.uint8)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (512, old_limit[1]))  # the kernel refuses more: EFBIG
    try:
        with pytest.raises(results.WriteError) as failed:
            write_video(tmp_path / "video.mp4", frames, 16, None)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert failed.value.errno == errno.EFBIG
    assert f"could not write the job's video {tmp_path / 'video.mp4'}" in str(failed.value)
    assert list(tmp_path.iterdir()) == [], "no partial video, no temporary file"


def test_w_and_b_files_and_the_report_that_cannot_be_written_are_named(read_only_dir, capsys):
    job = {"job_num": 0, "status": "completed", "config": {"logger": {"mode": "offline"}}, "ranks": []}
    problem = log_job(job, read_only_dir)  # returns, never raises
    assert problem is not None and "Read-only file system" in problem and "results.json is unaffected" in problem

    sweep = read_only_dir.parent / "source"  # the same folder, writable: put a job in, then read-only again
    subprocess.run(["mount", "-o", "remount,rw,bind", str(read_only_dir)], check=True)
    results.write_json_atomic(
        read_only_dir / "0" / "results.json",
        {
            "schema": 1,
            "status": "completed",
            "root_cause": None,
            "strategy": "single",
            "world_size": 1,
            "job_num": 0,
            "overrides": [],
            "ranks": [],
            "summary": {},
        },
    )
    subprocess.run(["mount", "-o", "remount,ro,bind", str(read_only_dir)], check=True)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(read_only_dir)}}, "launcher": {"node_rank": 0}})
    with pytest.raises(SystemExit) as ended:
        SweepCallback().on_multirun_end(config)
    assert ended.value.code == 1, "a report that could not be written is a failed sweep"
    err = capsys.readouterr().err
    assert f"report NOT written: [Errno {errno.EROFS}] could not write the sweep report" in err
    assert not (sweep / "report.md").exists()


# ----------------------------------------------------------------------------- mid-run
# job 0 ends, then the sweep pauses 3 s before job 1 (tests/pause_callback.py); Hydra's log
# file goes to the console only, so nothing holds a file open on the disk between the jobs
# (a file system with files open for writing cannot be remounted read-only: "busy")
BETWEEN_JOBS = (
    "+hydra.callbacks.pause._target_=pause_callback.PauseAfterJob",
    "+hydra.callbacks.pause.seconds=3",
    "hydra/job_logging=stdout",
)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_disk_that_fails_mid_sweep_stops_it_and_the_resume_command_works(small_disk, fault):
    """full: job 0 of 2 is in its wrap phase (rank 1 sleeps there) when the disk fills up.
    read-only: the disk is remounted read-only after job 0, before job 1. Either way the
    sweep stops with the cause and a resume command (the sweep dir's path has a space) that
    works once the disk is back, with exit status 1 and no traceback."""
    sweep = small_disk / "sweep"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    # full: only job 0 sleeps (a resume runs both); read-only: two jobs, a pause between them
    jobs = ("fault=sleep,none", "fault.seconds=3") if fault == "full" else ("seed=0,1", *BETWEEN_JOBS)
    proc = start_launch(sweep, *jobs, *JOB, env=env)
    try:
        if fault == "full":
            wait_for_phase(sweep / "0", 1, "wrap")
            filler = fill(small_disk)
        else:
            wait_for(lambda: (sweep / "between_jobs").exists(), 120, "job 0 to end")
            subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        text, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 1, text
    assert "Traceback" not in text and "--- Logging error ---" not in text, text
    if fault == "full":  # job 0's outcome is on the console, since its results.json could not be written
        assert f"job 0: [Errno {errno.ENOSPC}] could not write the job's result" in text, text
        assert "job 0  FAILED" in text and "the job's files could not be written (could not write" in text, text
        assert "the result above is NOT in its results.json" in text and not (sweep / "0" / "results.json").exists()
        assert "sweep stopped before job 0 finished (2 job(s) without results: 0, 1)" in text
    else:  # job 0 is recorded; job 1 cannot be; the report cannot be written
        assert [(r["job_num"], r["status"]) for r in job_results(sweep)] == [(0, "completed")]
        assert (
            f"job 1 not started, the sweep stops here: Hydra could not write its files: [Errno {errno.EROFS}]" in text
        )
        assert "report NOT written" in text and "Read-only file system" in text
        assert "sweep stopped before job 1 finished (1 job(s) without results: 1)" in text
    assert (
        "the sweep cannot go on in its dir: " in text
        and "make room (or make it writable), then resume it with:" in text
    )
    assert not (sweep / "1" / "job.json").exists(), "no job ran after the disk failed"
    command = printed_resume(text)
    assert command[0] == "python" and f'hydra.sweep.dir="{sweep}"' in command, command  # the space survives

    if fault == "full":
        filler.unlink()
    else:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    resumed = subprocess.run(
        [sys.executable, *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert resumed.returncode == 0, output(resumed)
    assert [(r["job_num"], r["status"]) for r in job_results(sweep)] == [(0, "completed"), (1, "completed")]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_job_dir_lost_mid_run_fails_the_job_with_that_cause(tmp_path, how):
    proc = start_launch(tmp_path, "fault=sleep", "fault.seconds=5", *JOB)
    job_dir = tmp_path / "0"
    try:
        wait_for_phase(job_dir, 1, "wrap")
        job_dir.rename(tmp_path / "gone")  # at once (rmtree would race the ranks' writes); removed below
        if how == "replaced":
            job_dir.mkdir()
        text, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 1, text
    shutil.rmtree(tmp_path / "gone")
    (job,) = job_results(tmp_path)
    cause = job["root_cause"]
    assert job["status"] == "failed" and job["job_num"] == 0, job
    expected = "was removed while the job ran" if how == "removed" else "was replaced by another folder"
    assert f"the job dir {job_dir} {expected}" in cause["message"], cause
    assert "COMPLETED" not in text and "Traceback" not in text, text


# ----------------------------------------------------------------------------- paths, modes, plugins
def test_the_resume_command_survives_the_shell_and_hydra():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for path in (
        "/data/my sweeps/run 1",
        "/data/a,b",
        "/data/it's",
        '/data/say "hi"',
        "/data/end\\",
        '/data/odd\\"mix',
        "/plain/dir_1.2",
    ):
        words = shlex.split(resume_command(Path(path)))
        assert words[-1] == "launcher.resume=true"
        assert parser.parse_overrides([words[-2]])[0].value() == path
    assert hydra_override("hydra.sweep.dir", "/plain/dir_1.2") == "hydra.sweep.dir=/plain/dir_1.2"


def test_the_resume_command_repeats_the_launch_s_config_and_hydra_settings(tmp_path):
    sweep = tmp_path / "my sweep"
    sweep.mkdir()
    results.write_json_atomic(
        sweep / ".wan_exp" / "sweep.json",
        {
            "active": 0,
            "launches": [
                {
                    "overrides": ["parallel=ulysses,hybrid"],
                    "hydra_overrides": ["hydra.sweeper.max_batch_size=1"],
                    "argv": [
                        "launch.py",
                        "-m",
                        "--config-dir",
                        "my sweeps",
                        "--config-name=strategies",
                        "parallel=ulysses,hybrid",
                        "hydra.sweeper.max_batch_size=1",
                        f"hydra.sweep.dir={sweep}",
                    ],
                }
            ],
        },
    )
    assert shlex.split(resume_command(sweep))[2:] == [
        "--config-dir",
        "my sweeps",
        "--config-name=strategies",
        "hydra.sweeper.max_batch_size=1",
        f'hydra.sweep.dir="{sweep}"',
        "launcher.resume=true",
    ]


def test_hydra_mode_run_and_a_missing_launcher_plugin_are_one_line_with_the_fix(tmp_path):
    proc = run_launch(tmp_path / "a", "hydra.mode=RUN", *JOB)
    assert proc.returncode == 1 and "hydra.mode=RUN is not supported" in proc.stderr, output(proc)
    assert "Traceback" not in output(proc)

    # hydra-submitit-launcher out of Hydra's plugin path, as on a machine without it
    without_plugin = (
        "import runpy, sys, hydra_plugins\n"
        "hydra_plugins.__path__._path[:] = [p for p in hydra_plugins.__path__ if 'site-packages' not in p]\n"
        "sys.argv = ['launch.py', *sys.argv[1:]]\n"
        "runpy.run_path('launch.py', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", without_plugin, "hydra/launcher=cluster", f"hydra.sweep.dir={tmp_path / 'b'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, output(proc)
    assert proc.stderr.strip().splitlines() == [
        (
            "error: the launcher submitit_slurm needs the hydra-submitit-launcher plugin, which is not installed: "
            "pip install -e '.[slurm]' (or drop hydra/launcher=... to run with the default launcher on this machine)"
        )
    ]

    if shutil.which("srun"):
        return  # a Slurm machine: the launcher would submit
    proc = run_launch(tmp_path / "c", "hydra/launcher=cluster", *JOB)
    assert proc.returncode == 1, output(proc)
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: the Slurm launcher (hydra/launcher=cluster or submitit_slurm) needs Slurm, but srun is not")
    )
    assert "Traceback" not in output(proc)


def test_the_batch_check_keeps_the_traceback_of_a_bug():
    from hydra_plugins.checked_launcher._core import check_batch

    class Context:
        def __init__(self, callback):
            self.callbacks = type("Callbacks", (), {"callbacks": [callback]})()

    class Launcher:
        def __init__(self, callback):
            self.hydra_context = Context(callback)

    class Buggy:
        def check_batch(self, configs):
            raise KeyError("a bug in a check")

    with pytest.raises(KeyError, match="a bug in a check"):
        check_batch(Launcher(Buggy()), [])

    bad = compose_config(["workload.warmup_steps=99"])  # a ConfigError: one line, no traceback
    with read_write(bad), open_dict(bad):
        bad.hydra = {
            "job": {"num": 0},
            "overrides": {"task": ["workload.warmup_steps=99"]},
            "sweep": {"dir": "/tmp/unused", "subdir": "0"},
        }
    with pytest.raises(SystemExit) as refused:
        check_batch(Launcher(SweepCallback()), [bad])
    assert str(refused.value.code).startswith("bad config, no job started: job 0 (workload.warmup_steps=99): ")
    with pytest.raises(ConfigError):
        SweepCallback().check_configs([bad])
