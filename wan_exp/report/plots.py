"""The dashboard's figures (matplotlib, rendered off-screen to PNG bytes).

Each function takes the table's rows and returns PNG bytes, or None when the sweep has
nothing to show for that figure (e.g. no scaling plot when every job used one rank count).
"""

from __future__ import annotations

import io
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from wan_exp.metrics.phases import INIT_PHASES, PIPELINE_STAGES  # noqa: E402
from wan_exp.report.table import Row, column  # noqa: E402

# Per-rank GPU memory bars, most telling first; host RSS only where there is no GPU figure.
GPU_MEMORY_SERIES = (
    ("nvml_used_gib", "NVML used"),
    ("peak_reserved_gib", "peak reserved"),
    ("peak_allocated_gib", "peak allocated"),
)
HOST_MEMORY_SERIES = (("peak_host_rss_gib", "host RSS"),)


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def per_rank_memory(rows: list[Row]) -> Optional[bytes]:
    """One panel per configuration, a group of bars per rank: an overloaded GPU 0 stands out."""
    shown = [(row, row.representative()) for row in rows if row.representative()]
    if not shown:
        return None
    ncols = min(3, len(shown))
    nrows = -(-len(shown) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[len(shown) :]:
        ax.set_visible(False)
    for ax, (row, job) in zip(axes.flat, shown):
        ranks = job.get("ranks", [])
        has = lambda key: any(r["memory"].get(key) is not None for r in ranks)  # noqa: E731
        series = [s for s in GPU_MEMORY_SERIES if has(s[0])] or [s for s in HOST_MEMORY_SERIES if has(s[0])]
        width = 0.8 / max(len(series), 1)
        for i, (key, name) in enumerate(series):
            xs = [r["rank"] + (i - (len(series) - 1) / 2) * width for r in ranks]
            ax.bar(xs, [r["memory"].get(key) or 0.0 for r in ranks], width, label=name)
        ax.set_title(row.label, fontsize=9)
        ax.set_xticks([r["rank"] for r in ranks], [f"rank {r['rank']}" for r in ranks], fontsize=7)
        ax.set_ylabel("GiB")
        ax.margins(y=0.25)  # room for the legend above the bars
        ax.legend(fontsize=6, loc="upper center", ncol=len(series), frameon=False)
    return _png(fig)


def throughput(rows: list[Row]) -> Optional[bytes]:
    """Throughput (steps/s) per configuration, and MFU where the device peak is known."""
    steps = [(row.label, row.value(column("steps/s"))) for row in rows]
    steps = [(label, v) for label, v in steps if v is not None]
    if not steps:
        return None
    mfu = [(row.label, row.value(column("MFU %"))) for row in rows]
    mfu = [(label, v) for label, v in mfu if v is not None]
    panels = [("steps/s", steps)] + ([("MFU %", mfu)] if mfu else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.5 * len(steps) + 1.6), squeeze=False)
    for ax, (title, points) in zip(axes[0], panels):
        ax.barh([label for label, _ in points], [v for _, v in points], color="tab:green")
        ax.invert_yaxis()
        ax.set_xlabel(title)
        ax.tick_params(axis="y", labelsize=7)
    return _png(fig)


def init_phases(rows: list[Row]) -> Optional[bytes]:
    """Initialisation time per configuration, stacked by phase (slowest rank per phase)."""
    shown = [(row, row.representative()) for row in rows if row.representative()]
    shown = [(row, job["summary"].get("init_phases_s") or {}) for row, job in shown]
    shown = [(row, phases) for row, phases in shown if phases]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(shown) + 1.6))
    labels = [row.label for row, _ in shown]
    left = [0.0] * len(shown)
    for phase in INIT_PHASES:
        widths = [phases.get(phase, 0.0) for _, phases in shown]
        ax.barh(labels, widths, left=left, label=phase)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, ncol=len(INIT_PHASES), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return _png(fig)


def scaling(rows: list[Row]) -> Optional[bytes]:
    """Steps/s against rank count per strategy (and variant), with ideal linear scaling
    from each line's smallest rank count. None unless some line has two rank counts."""
    steps_column = column("steps/s")
    lines: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        value = row.value(steps_column)
        if value is not None:
            name = f"{row.strategy} {row.variant}".strip()
            lines.setdefault(name, []).append((row.world_size, value))
    lines = {name: sorted(points) for name, points in lines.items() if len({n for n, _ in points}) > 1}
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in lines.items():
        ranks, values = zip(*points)
        line = ax.plot(ranks, values, marker="o", label=name)[0]
        ideal = [values[0] * n / ranks[0] for n in ranks]
        ax.plot(ranks, ideal, linestyle=":", color=line.get_color())
    ax.set_xlabel("ranks")
    ax.set_ylabel("steps/s (dotted: linear scaling)")
    ax.set_xticks(sorted({n for points in lines.values() for n, _ in points}))
    ax.legend(fontsize=7)
    return _png(fig)


def _with_stages(rows: list[Row]) -> list[tuple[Row, dict]]:
    shown = [(row, row.representative()) for row in rows if row.representative()]
    return [(row, job["summary"]) for row, job in shown if job["summary"].get("stages_s")]


def _stage_order(summaries: list[dict]) -> list[str]:
    """The known stages in pipeline order, then any other stage name met."""
    names = [n for s in summaries for n in s["stages_s"]]
    return [n for n in PIPELINE_STAGES if n in names] + sorted(set(names) - set(PIPELINE_STAGES))


def pipeline_stages(rows: list[Row]) -> Optional[bytes]:
    """Where the time goes: the pipeline's seconds per configuration, stacked by stage
    (slowest rank per stage)."""
    shown = _with_stages(rows)
    if not shown:
        return None
    stages = _stage_order([summary for _, summary in shown])
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(shown) + 1.8))
    labels = [row.label for row, _ in shown]
    left = [0.0] * len(shown)
    for stage in stages:
        widths = [summary["stages_s"].get(stage) or 0.0 for _, summary in shown]
        ax.barh(labels, widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return _png(fig)


def stage_peak_memory(rows: list[Row]) -> Optional[bytes]:
    """Where memory peaks: each stage's peak (reserved on GPUs, host RSS on CPU; highest
    rank) per configuration, one group of bars per stage."""
    shown = _with_stages(rows)
    if not shown:
        return None
    key = "stage_peak_reserved_gib"
    if not any(v is not None for _, s in shown for v in (s.get(key) or {}).values()):
        key = "stage_peak_host_rss_gib"
    stages = _stage_order([summary for _, summary in shown])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(stages) + 2), 3.4))
    width = 0.8 / len(shown)
    for i, (row, summary) in enumerate(shown):
        xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(stages))]
        ax.bar(xs, [(summary.get(key) or {}).get(stage) or 0.0 for stage in stages], width, label=row.label)
    ax.set_xticks(range(len(stages)), stages, fontsize=7, rotation=20)
    ax.set_ylabel(f"GiB ({'peak reserved' if key == 'stage_peak_reserved_gib' else 'host RSS'})")
    ax.legend(fontsize=6, frameon=False)
    return _png(fig)


FIGURES = (
    ("Per-rank peak memory", per_rank_memory),
    ("Throughput and MFU", throughput),
    ("Initialisation phases", init_phases),
    ("Scaling over rank counts", scaling),
    ("Pipeline time per stage", pipeline_stages),
    ("Peak memory per stage", stage_peak_memory),
)
