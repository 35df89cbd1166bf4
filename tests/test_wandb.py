"""W&B: the offline run the launcher writes for a real tiny job, read back from run-<id>.wandb."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("wandb")  # a dependency of wan-exp; absent only where it was left out on purpose

from wan_exp.metrics.summary import job_step_times  # noqa: E402
from wan_exp.results import summary_text  # noqa: E402
from wan_exp.wandb_logger import is_logged, log_job  # noqa: E402
from wandb_reader import WandbFileError, find_run_file, read_run  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory) -> Path:
    """One real 2-rank job of the tiny model through launch.py, logged offline to W&B (with an
    attention backend other than auto's choice on a CPU, for the test below)."""
    sweep_dir = tmp_path_factory.mktemp("wandb_sweep")
    done = subprocess.run(
        [sys.executable, "launch.py", "logger=offline", "workload.sample_steps=3",
         "model.attention_backend=sdpa_math", f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return sweep_dir / "0"


def test_offline_run_read_back_matches_results_json(job_dir):
    results = json.loads((job_dir / "results.json").read_text())
    assert results["status"] == "completed"
    run = read_run(find_run_file(job_dir))

    assert run.job_type == results["strategy"] == "ulysses"
    assert run.group == Path(results["sweep_dir"]).name
    assert {k: v for k, v in run.config.items() if k != "_wandb"} == results["config"]

    for key, value in results["summary"].items():
        assert run.summary[key] == value, key
    assert run.summary["status"] == "completed" and run.summary["root_cause"] is None

    step_rows = [row for row in run.history if "step_time_s" in row]
    expected = job_step_times(results["ranks"])
    assert results["summary"]["step_times_s"] == expected  # derived once, read by W&B
    assert len(expected) == results["summary"]["measured_steps"] >= 2
    assert [row["step_time_s"] for row in step_rows] == expected
    for rank in results["ranks"]:
        assert [row[f"rank_step_time_s/{rank['rank']}"] for row in step_rows] == rank["step_times_s"]
    # the per-rank table is logged (one row per rank)
    assert any(row.get("ranks/nrows") == results["world_size"] for row in run.history)


def test_wandb_and_the_console_show_each_rank_median_the_record_holds(job_dir):
    """One definition of a rank's median step: the W&B per-rank table (read back from the run's
    files) and the console's per-rank line both show the rank record's field."""
    results = json.loads((job_dir / "results.json").read_text())
    (table_file,) = (find_run_file(job_dir).parent / "files" / "media" / "table").glob("ranks_*.table.json")
    table = json.loads(table_file.read_text())
    logged = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    console = {
        int(line.split()[0]): line.split()
        for line in summary_text(results).splitlines()
        if line.split()[:1] and line.split()[0].isdigit()
    }
    for record in results["ranks"]:
        median = record["step_time_s_median"]
        assert median == statistics.median(record["step_times_s"])  # two steps: the mean of both
        assert logged[record["rank"]]["step_time_s_median"] == median
        assert logged[record["rank"]]["init_s"] == record["init_s"]
        assert console[record["rank"]][-1] == f"{median:.3f}"


def test_each_rank_applies_the_configured_attention_backend(job_dir):
    """The model's constructor leaves the backend alone; the rank's setup applies
    model.attention_backend (auto would have chosen sdpa on a CPU)."""
    results = json.loads((job_dir / "results.json").read_text())
    assert [r["attention_backend"] for r in results["ranks"]] == ["sdpa_math", "sdpa_math"]


def test_a_failing_wandb_is_a_warning_not_an_error(job_dir, tmp_path):
    results = json.loads((job_dir / "results.json").read_text())
    results["config"]["logger"]["mode"] = "no-such-mode"  # wandb.init refuses it
    log_job(results, tmp_path)  # must return normally
    warning = (tmp_path / "wandb" / "warning.txt").read_text()
    assert "W&B logging (no-such-mode)" in warning and "results.json is unaffected" in warning


def test_disabled_logger_writes_no_run(job_dir, tmp_path):
    results = json.loads((job_dir / "results.json").read_text())
    results["config"]["logger"]["mode"] = "disabled"
    log_job(results, tmp_path)
    assert not (tmp_path / "wandb").exists()


def test_reader_rejects_damaged_files(job_dir, tmp_path):
    data = bytearray(find_run_file(job_dir).read_bytes())
    data[40] ^= 0xFF  # flip one byte inside the first record
    damaged = tmp_path / "run-damaged.wandb"
    damaged.write_bytes(bytes(data))
    with pytest.raises(WandbFileError, match="CRC mismatch"):
        read_run(damaged)
    not_wandb = tmp_path / "run-text.wandb"
    not_wandb.write_text("hello world")
    with pytest.raises(WandbFileError, match="not a W&B run file"):
        read_run(not_wandb)


def test_a_resumed_sweep_logs_a_skipped_job_only_if_its_run_was_not_written(job_dir, tmp_path):
    """A Ctrl-C can cut a completed job's report short (before or during its W&B run); the
    resume skips the job but writes its run then, and only then."""
    import shutil

    from hydra.core.utils import JobReturn, JobStatus

    from wan_exp.host.callbacks import JobReportCallback

    assert is_logged(job_dir)  # the launch wrote the run in full
    cut = tmp_path / "0"
    shutil.copytree(job_dir, cut, ignore=shutil.ignore_patterns("wandb"))
    assert not is_logged(cut)
    skipped = JobReturn(
        status=JobStatus.COMPLETED, _return_value={"job_dir": str(cut), "results_owner": True, "skipped": True}
    )
    JobReportCallback().on_job_end(config=None, job_return=skipped)
    assert is_logged(cut)
    (run_file,) = list((cut / "wandb").rglob("run-*.wandb"))
    results = json.loads((cut / "results.json").read_text())
    assert read_run(run_file).summary["status"] == results["status"] == "completed"
    JobReportCallback().on_job_end(config=None, job_return=skipped)  # logged: not again
    assert list((cut / "wandb").rglob("run-*.wandb")) == [run_file]
