"""report.md and the self-contained report.html (figures inlined as base64 PNG)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Sequence

from wan_exp.report.plots import FIGURES
from wan_exp.report.table import CAVEATS_TITLE, Row, table_cells, time_caveats
from wan_exp.report.upstream import ratio_cells

UPSTREAM_TITLE = "Upstream generate.py / wan-exp (same strategy and ranks)"
UPSTREAM_NOTE = (
    "Each workload=upstream row divided by the workload=generate row it pairs with; above 1: "
    "upstream's run takes longer or holds more memory (docs/upstream.md)."
)

UNREADABLE_TITLE = "Results that could not be read (left out)"

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; }
td.text { text-align: left; }
td.best { font-weight: bold; background: #d8f5d0; }
tr.failed td { background: #fde2e2; }
tr.warned td { background: #fff4cc; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
"""


def _failed_jobs(rows: list[Row]) -> list[dict]:
    return [job for row in rows for job in row.jobs if job.get("status") != "completed"]


def _job_line(job: dict) -> str:
    cause = job.get("root_cause") or {}
    return (
        f"job {job.get('job_num')} ({' '.join(job.get('overrides', [])) or 'defaults'}): "
        f"{job.get('status')}, rank {cause.get('rank')}, phase {cause.get('phase')}: "
        f"{' '.join(str(cause.get('message', '')).split())}"
    )


def markdown(sweep_dir: Path, rows: list[Row], unreadable: Sequence[str] = ()) -> str:
    header, body = table_cells(rows)
    lines = [
        f"# wan-exp sweep report: {sweep_dir.name}",
        "",
        f"Sweep dir: `{sweep_dir}`. {sum(len(r.jobs) for r in rows)} jobs in {len(rows)} configurations. "
        "Metrics are medians over completed repeats; **bold** marks the best value of a column. "
        "Figures are in report.html.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for cells in body:
        texts = [f"**{text}**" if best else text for text, best in cells]
        lines.append("| " + " | ".join(t.replace("|", "\\|") for t in texts) + " |")
    ratio_header, ratio_body = ratio_cells(rows)
    if ratio_body:
        lines += [
            "",
            f"## {UPSTREAM_TITLE}",
            "",
            UPSTREAM_NOTE,
            "",
            "| " + " | ".join(ratio_header) + " |",
            "|" + "|".join("---" for _ in ratio_header) + "|",
        ]
        lines += ["| " + " | ".join(cells) + " |" for cells in ratio_body]
    caveats = time_caveats(rows)
    if caveats:
        lines += ["", f"## {CAVEATS_TITLE}", ""] + [f"- {line}" for line in caveats]
    failed = _failed_jobs(rows)
    if failed:
        lines += ["", "## Jobs that did not complete", ""] + [f"- {_job_line(job)}" for job in failed]
    if unreadable:
        lines += ["", f"## {UNREADABLE_TITLE}", ""] + [f"- `{problem}`" for problem in unreadable]
    return "\n".join(lines) + "\n"


def html_page(sweep_dir: Path, rows: list[Row], unreadable: Sequence[str] = ()) -> str:
    header, body = table_cells(rows)
    out = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>wan-exp report {html.escape(sweep_dir.name)}</title><style>{CSS}</style></head><body>",
        f"<h1>wan-exp sweep report: {html.escape(sweep_dir.name)}</h1>",
        f"<p>Sweep dir <code>{html.escape(str(sweep_dir))}</code>: {sum(len(r.jobs) for r in rows)} jobs in "
        f"{len(rows)} configurations. Metrics are medians over completed repeats; "
        "the best value of each column is highlighted.</p>",
        "<table id='comparison'><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header),
        "</tr></thead><tbody>",
    ]
    for row, cells in zip(rows, body):
        css_row = " class='failed'" if row.status != "completed" else " class='warned'" if row.machine_warnings else ""
        tds = []
        for i, (text, best) in enumerate(cells):
            classes = [c for c, on in (("best", best), ("text", i in (0, 2, len(cells) - 1))) if on]
            attr = f" class='{' '.join(classes)}'" if classes else ""
            tds.append(f"<td{attr}>{html.escape(text)}</td>")
        out.append(f"<tr{css_row}>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    ratio_header, ratio_body = ratio_cells(rows)
    if ratio_body:
        out.append(f"<h2>{html.escape(UPSTREAM_TITLE)}</h2><p>{html.escape(UPSTREAM_NOTE)}</p>")
        out.append(
            "<table id='upstream'><thead><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in ratio_header)
            + "</tr></thead><tbody>"
        )
        out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in ratio_body]
        out.append("</tbody></table>")
    caveats = time_caveats(rows)
    if caveats:
        out.append(f"<h2>{CAVEATS_TITLE}</h2><ul>" + "".join(f"<li>{html.escape(c)}</li>" for c in caveats) + "</ul>")
    failed = _failed_jobs(rows)
    if failed:
        out.append("<h2>Jobs that did not complete</h2><ul>")
        out += [f"<li>{html.escape(_job_line(job))}</li>" for job in failed]
        out.append("</ul>")
    if unreadable:
        out.append(f"<h2>{UNREADABLE_TITLE}</h2><ul>")
        out += [f"<li><code>{html.escape(problem)}</code></li>" for problem in unreadable]
        out.append("</ul>")
    for title, figure in FIGURES:
        png = figure(rows)
        if png is not None:
            data = base64.b64encode(png).decode("ascii")
            out.append(
                f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
            )
    out.append("</body></html>")
    return "\n".join(out) + "\n"
