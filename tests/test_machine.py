"""A busy or misconfigured host is said, not hidden: a thread variable that is not a number,
more ranks than cores, other processes' load; in results.json, the report and the doctor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from launch_helpers import REPO, job_results, output
from wan_exp.doctor import OK, WARN
from wan_exp.doctor.system import machine_rows
from wan_exp.host.machine import (
    LoadSampler,
    busy_warning,
    oversubscription_warning,
    rank_thread_settings,
)


def test_a_thread_variable_that_is_not_a_number_is_replaced_by_the_split_and_named():
    env, warnings = rank_thread_settings({"OMP_NUM_THREADS": "abc", "MKL_NUM_THREADS": "0"}, nproc_per_node=2, cores=8)
    assert env == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
    assert len(warnings) == 2 and "OMP_NUM_THREADS='abc' is not a positive integer" in warnings[0]
    assert "MKL_NUM_THREADS='0'" in warnings[1]
    # a number is the user's choice; unset OMP is the split (as torchrun does)
    assert rank_thread_settings({"OMP_NUM_THREADS": "3"}, 2, 8) == ({}, [])
    assert rank_thread_settings({}, 3, 8) == ({"OMP_NUM_THREADS": "2"}, [])
    assert rank_thread_settings({}, 4, 2) == ({"OMP_NUM_THREADS": "1"}, [])


def test_oversubscription_and_a_busy_host_are_warned_about():
    assert "3 ranks on 2 core(s)" in oversubscription_warning(3, 1, 2)
    assert "2 rank(s) x 4 threads" in oversubscription_warning(2, 4, 4)
    assert oversubscription_warning(2, 2, 4) is None
    assert busy_warning(other_cores=0.5, load_max=1.0, cores=2) is None  # a quarter of the cores: not yet
    assert "kept 1.5 of 2 core(s) busy" in busy_warning(other_cores=1.5, load_max=3.2, cores=2)


def _spin(cpu_s: float) -> subprocess.Popen:
    """A child that burns ``cpu_s`` seconds of CPU time, then waits to be ended."""
    code = f"import time\nwhile time.process_time() < {cpu_s}: pass\nprint('done', flush=True)\ntime.sleep(60)"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_the_load_sampler_counts_other_processes_cpu_and_not_the_jobs():
    """Between two samples a child burns 1 s of CPU: counted as other processes' when it is
    not one of the job's, left out when it is (the host's busy time includes it either way)."""
    for child_is_job in (False, True):
        sampler = LoadSampler()
        child = _spin(1.0)
        try:
            proc = psutil.Process(child.pid)
            job_procs = [proc] if child_is_job else []
            listed = job_procs.copy
            sampler.sample(listed)
            child.stdout.readline()  # "done": the CPU second is spent
            time.sleep(0.05)  # psutil's CPU times move in clock ticks
            while sampler.elapsed_s == 0:  # samples are at least machine.SAMPLE_S apart
                sampler.sample(listed)
            child_cpu = sum(proc.cpu_times()[:2])
        finally:
            child.kill()
            child.wait()
        if child_is_job:
            assert sampler.other_cpu_s < sampler.elapsed_s * sampler.cores - child_cpu + 0.05
        else:
            assert sampler.other_cpu_s >= child_cpu - 0.05, (sampler.other_cpu_s, child_cpu)


def test_the_doctor_reports_thread_variables_cores_and_load():
    rows = {r.check: r for r in machine_rows({"OMP_NUM_THREADS": "abc"}, cores=2, load_1m=0.1)}
    assert rows["OMP_NUM_THREADS"].status == WARN and "not a positive integer" in rows["OMP_NUM_THREADS"].hint
    assert rows["MKL_NUM_THREADS"].status == OK and rows["load average (1 min)"].status == OK
    busy = {r.check: r for r in machine_rows({"OMP_NUM_THREADS": "1"}, cores=2, load_1m=1.8)}
    assert busy["load average (1 min)"].status == WARN and busy["OMP_NUM_THREADS"].status == OK
    assert machine_rows({"MKL_NUM_THREADS": "16"}, cores=2, load_1m=0.0)[2].status == WARN


def _one_core() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


@pytest.mark.slow
def test_omp_abc_and_more_ranks_than_cores_are_recorded_and_reported(tmp_path):
    """The launcher runs on one core (its affinity) with two ranks and OMP_NUM_THREADS=abc:
    the ranks get OMP_NUM_THREADS=1, the job completes, and results.json, the console and the
    report name both problems."""
    cmd = [
        sys.executable,
        str(REPO / "launch.py"),
        "workload=init",
        "logger=disabled",
        "launcher.nproc_per_node=2",
        f"hydra.sweep.dir={tmp_path}",
    ]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        preexec_fn=_one_core,
        env={**os.environ, "OMP_NUM_THREADS": "abc"},
    )
    assert proc.returncode == 0, output(proc)
    (job,) = job_results(tmp_path)
    assert job["status"] == "completed"
    assert [r["env"]["OMP_NUM_THREADS"] for r in job["ranks"]] == ["1", "1"]
    (host,) = job["machine"]["hosts"]
    assert (host["cores"], host["ranks"], host["threads_per_rank"]) == (1, 2, 1)
    warnings = job["machine"]["warnings"]
    assert any("OMP_NUM_THREADS='abc' is not a positive integer" in w for w in warnings), warnings
    assert any("2 ranks on 1 core(s)" in w for w in warnings), warnings
    assert "machine: 2 ranks on 1 core(s)" in output(proc)
    report = (tmp_path / "report.md").read_text()
    assert "busy/misconfigured machine" in report and "OMP_NUM_THREADS='abc'" in report
    node = json.loads((tmp_path / "0" / "nodes" / "node_0.json").read_text())
    assert {"host": node["host"], "node_rank": 0, **node["machine"]} == host
