"""The sweep dashboard, built from a real sweep of the tiny model through launch.py."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from wan_exp.report import comparison_table, write_report

REPO = Path(__file__).resolve().parent.parent
# Two strategies on 2 ranks, Ulysses with two repeats (seed: a row's figures are medians
# over its repeats); one more rank count for Ulysses (a scaling line); a job that fails on
# purpose. Each launch after the first joins the same sweep dir under its own subdir (Hydra
# numbers every launch's jobs from 0).
LAUNCHES = {
    "repeats": (["parallel=ulysses", "seed=0,1"], 0),
    "fsdp_fixed": (["parallel=fsdp_fixed", "hydra.sweep.subdir=fsdp_fixed"], 0),
    "one_rank": (["parallel=ulysses", "launcher.nproc_per_node=1", "hydra.sweep.subdir=one_rank"], 0),
    "failing": (["fault=raise", "fault.rank=1", "fault.phase=process_group", "hydra.sweep.subdir=failing"], 1),
}

# Column title -> (results.json summary key, True if lower is better); written out
# here independently of the report's own column list.
EXPECTED_COLUMNS = {
    "balance max/min": ("balance_max_over_min", True),
    "rank0/median": ("balance_rank0_over_median", True),
    "host RSS GiB": ("peak_host_rss_gib_max", True),
    "init s": ("init_s", True),
    "step s": ("step_time_s_median", True),
    "comm bytes/step": ("comm_step_bytes_max", True),
    "steps/s": ("steps_per_s", False),
    "tokens/s": ("tokens_per_s", False),
    "video s/s": ("video_s_per_s", False),
    "TFLOP/s/GPU": ("tflops_per_gpu", False),
}
GPU_ONLY_TITLES = {"TFLOP/s/GPU"}  # shown for CPU jobs too, but only ranked among GPU rows


def _launch(sweep_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launch.py", "logger=disabled", "workload.sample_steps=2", f"hydra.sweep.dir={sweep_dir}",
         *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    sweep_dir = tmp_path_factory.mktemp("sweep")
    for overrides, exit_code in LAUNCHES.values():
        done = _launch(sweep_dir, overrides)
        assert done.returncode == exit_code, done.stdout[-3000:] + done.stderr[-3000:]
    return sweep_dir


def _jobs(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/results.json"))]


def _markdown_table(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split(" | ")))) for line in lines[1:]]


class _TableParser(HTMLParser):
    """Cells of the comparison table: (text, is_best) per cell, header row first."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[tuple[str, bool]]] = []
        self.images: list[str] = []
        self._cell: list[str] | None = None
        self._best = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell, self._best = [], "best" in (attrs.get("class") or "")
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(("".join(self._cell), self._best))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _jobs_of_row(jobs: list[dict], row: dict[str, str]) -> list[dict]:
    return [
        j for j in jobs
        if j["strategy"] == row["strategy"] and str(j["world_size"]) == row["ranks"]
        and (("fault=raise" in j["overrides"]) == ("fault=raise" in row["variant"]))
    ]  # fmt: skip


def test_report_tables_equal_the_jobs_results(sweep_dir):
    md_path, html_path = write_report(sweep_dir)
    assert (md_path, html_path) == (sweep_dir.resolve() / "report.md", sweep_dir.resolve() / "report.html")
    jobs = _jobs(sweep_dir)
    assert sorted(j["status"] for j in jobs) == ["completed"] * 4 + ["failed"]
    rows = _markdown_table(md_path.read_text())
    assert len(rows) == 4  # ulysses x2 (2 repeats), fsdp_fixed x2, ulysses x1, failing
    for row in rows:
        plain = {k: v.strip("*") for k, v in row.items()}
        matched = _jobs_of_row(jobs, plain)
        completed = [j for j in matched if j["status"] == "completed"]
        repeated = (plain["strategy"], plain["ranks"]) == ("ulysses", "2") and not plain["variant"].startswith("fault")
        assert len(matched) == (2 if repeated else 1)
        assert plain["stability"] == f"{len(completed)}/{len(matched)}"
        if not completed:
            assert "failed" in plain["status / root cause"] and "rank 1" in plain["status / root cause"]
            assert matched[0]["root_cause"]["message"] in plain["status / root cause"]
            continue
        for title, (key, _) in EXPECTED_COLUMNS.items():
            cell, expected = plain[title], _median([j["summary"][key] for j in completed])
            if expected is None:
                assert cell == "—", (title, cell)
                continue
            if "e" in cell:  # scientific: three significant digits
                assert float(cell) == pytest.approx(expected, rel=0.006), title
                continue
            digits = len(cell.split(".")[1]) if "." in cell else 0
            assert float(cell.replace(",", "")) == pytest.approx(expected, abs=0.51 * 10**-digits), title
        # GPU-only columns are absent from a CPU sweep, not shown as zeros
        assert "peak reserved GiB" not in row and "MFU %" not in row


def _median(values: list) -> float | None:
    """Median over the repeats that have a value."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def test_best_value_of_each_column_is_marked(sweep_dir):
    md_path, html_path = write_report(sweep_dir)
    jobs = _jobs(sweep_dir)
    rows = _markdown_table(md_path.read_text())
    parser = _TableParser()
    parser.feed(html_path.read_text())
    header = [text for text, _ in parser.rows[0]]
    for title, (key, lower_better) in EXPECTED_COLUMNS.items():
        values = {}
        for i, row in enumerate(rows):
            matched = _jobs_of_row(jobs, {k: v.strip("*") for k, v in row.items()})
            value = _median([j["summary"][key] for j in matched if j["status"] == "completed"])
            if value is not None:
                values[i] = value
        best = (min if lower_better else max)(values.values())
        # the best row(s) are marked, or none where every row has the same value; a GPU-only
        # figure is never ranked in this CPU sweep
        expected = {i for i, v in values.items() if v == best} if len(set(values.values())) > 1 else set()
        if title in GPU_ONLY_TITLES:
            expected = set()
        marked = {i for i, r in enumerate(rows) if r[title].startswith("**")}
        assert marked == expected, title
        # the HTML marks the same cells and shows the same text
        column = header.index(title)
        html_cells = [cells[column] for cells in parser.rows[1:]]
        assert {i for i, (_, best_cell) in enumerate(html_cells) if best_cell} == marked, title
        assert [text for text, _ in html_cells] == [r[title].strip("*") for r in rows], title
    # stability: the rows whose every job completed beat the failed one (0/1)
    assert {i for i, r in enumerate(rows) if r["stability"].startswith("**")} == {
        i for i, r in enumerate(rows) if "fault=raise" not in r["variant"]
    }


def test_html_is_self_contained_with_the_figures(sweep_dir):
    _, html_path = write_report(sweep_dir)
    text = html_path.read_text()
    parser = _TableParser()
    parser.feed(text)
    # per-rank memory, throughput, init phases, scaling (rank counts vary), and the generate
    # jobs' pipeline time per stage and peak memory per stage
    assert len(parser.images) == 6
    assert "Pipeline time per stage" in text and "Peak memory per stage" in text
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(src|href)=['\"](?!data:)", text)  # nothing loaded from elsewhere
    # the failed job, with its root cause
    failed = next(j for j in _jobs(sweep_dir) if j["status"] == "failed")
    assert "fault=raise" in text and html.escape(failed["root_cause"]["message"]) in text


def test_console_table_and_command_line(sweep_dir):
    table = comparison_table(sweep_dir)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["strategy", "ranks", "variant", "stability"]
    assert sum(line.startswith(("ulysses", "fsdp_fixed")) for line in lines) == 4
    done = subprocess.run([sys.executable, "-m", "wan_exp.report", str(sweep_dir)], capture_output=True, text=True)
    assert done.returncode == 0 and table in done.stdout and "report.html" in done.stdout
    missing = subprocess.run([sys.executable, "-m", "wan_exp.report", str(sweep_dir / "nope")],
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 2 and "nope does not exist" in missing.stderr


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")
def test_html_renders_in_headless_chromium(sweep_dir, tmp_path):
    from PIL import Image

    _, html_path = write_report(sweep_dir)
    shot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1400,2400",
             html_path.as_uri()],
            capture_output=True, timeout=60,
        )  # fmt: skip
    image = Image.open(shot).convert("RGB")
    pixels = list(image.getdata())
    non_white = sum(1 for p in pixels if sum(p) < 700) / len(pixels)
    assert non_white > 0.02, f"screenshot is nearly blank ({non_white:.1%} non-white)"
    assert len(set(pixels)) > 50  # text, table shading and plot colours, not one flat colour
    shutil.copy(shot, Path(tempfile.gettempdir()) / "wan_exp_report_screenshot.png")


def test_strategy_options_are_variants_but_strategy_seed_and_logger_are_not():
    from wan_exp.report.table import _is_variant

    assert _is_variant("parallel.fsdp.api=fsdp2") and _is_variant("parallel.ulysses_degree=4")
    assert not _is_variant("parallel=hybrid") and not _is_variant("seed=3")
    assert not _is_variant("logger=disabled") and not _is_variant("logger.mode=offline")
    assert not _is_variant("launcher.nproc_per_node=8") and _is_variant("launcher.nnodes=2")


def test_the_report_imports_no_torch():
    """The report runs on the host after every sweep (and from `python -m wan_exp.report`): it
    reads files, so it must not pay for importing torch (1.5 s of every launch here)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, wan_exp.report, wan_exp.report.__main__\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
