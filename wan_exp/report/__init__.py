"""The sweep dashboard: ``python -m wan_exp.report <sweep dir>`` writes report.md and a
self-contained report.html into the sweep dir. It reads the jobs' results.json files
only, so it can run at any time, on any machine, after the fact."""

from __future__ import annotations

import logging
from pathlib import Path

from wan_exp.report.render import html_page, markdown
from wan_exp.report.table import build_rows, load_results, text_table
from wan_exp.results import write_text_atomic

__all__ = ["comparison_table", "write_report"]

log = logging.getLogger(__name__)


def write_report(sweep_dir: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into the sweep dir; return their paths.
    An unreadable results.json is named in both (and logged); the other jobs are reported."""
    sweep_dir = Path(sweep_dir).resolve()
    sweep = load_results(sweep_dir)
    for problem in sweep.unreadable:
        log.warning("report: left out an unreadable results.json: %s", problem)
    rows = build_rows(sweep.jobs)
    md_path, html_path = sweep_dir / "report.md", sweep_dir / "report.html"
    write_text_atomic(md_path, markdown(sweep_dir, rows, sweep.unreadable))
    write_text_atomic(html_path, html_page(sweep_dir, rows, sweep.unreadable))
    return md_path, html_path


def comparison_table(sweep_dir: Path) -> str:
    """The comparison table as fixed-width text (printed at sweep end)."""
    sweep = load_results(Path(sweep_dir))
    return text_table(build_rows(sweep.jobs), sweep.unreadable)
