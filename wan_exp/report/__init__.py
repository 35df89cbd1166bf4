"""The sweep dashboard: ``python -m wan_exp.report <sweep dir>`` writes report.md and a
self-contained report.html into the sweep dir. It reads the jobs' results.json files
only, so it can run at any time, on any machine, after the fact."""
from __future__ import annotations

from pathlib import Path

from wan_exp.report.render import html_page, markdown
from wan_exp.report.table import build_rows, load_results, text_table
from wan_exp.results import write_text_atomic

__all__ = ["comparison_table", "write_report"]


def write_report(sweep_dir: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into the sweep dir; return their paths."""
    sweep_dir = Path(sweep_dir).resolve()
    rows = build_rows(load_results(sweep_dir))
    md_path, html_path = sweep_dir / "report.md", sweep_dir / "report.html"
    write_text_atomic(md_path, markdown(sweep_dir, rows))
    write_text_atomic(html_path, html_page(sweep_dir, rows))
    return md_path, html_path


def comparison_table(sweep_dir: Path) -> str:
    """The comparison table as fixed-width text (printed at sweep end)."""
    return text_table(build_rows(load_results(Path(sweep_dir))))
