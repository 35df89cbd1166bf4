"""The sweep's comparison table, built from the jobs' results.json files only.

One row per configuration: strategy, rank count and whatever else the sweep varied
(allocator, NCCL profile, size, ...). Jobs that differ only in ``seed`` (or ``logger.*``)
are repeats of one row: its metrics are the median over the completed repeats and its
stability is completed/total. A row with no completed job shows the status and root
cause of its last job instead of numbers.

Only comparable figures are ranked (marked best): GPU-only columns (TFLOP/s per GPU, MFU)
among rows that ran on GPUs, and no column among CPU rows told apart by a setting that
only acts on GPUs (the CUDA allocator, NCCL): on the CPU their differences are noise.
A results.json that cannot be read is named and left out; the other jobs are reported.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

# Overrides that do not make a configuration of their own: the strategy and the rank count
# have their own columns (exact keys only: parallel.fsdp.api or parallel.ulysses_degree ARE
# variants), seeds are repeats, and where the logs go changes no measurement (with subkeys).
NOT_VARIANT_KEYS = ("seed", "parallel", "launcher.nproc_per_node")
NOT_VARIANT_PREFIXES = ("logger",)
# Config groups that only act on GPUs: the CUDA caching allocator's settings and NCCL's.
GPU_ONLY_SETTINGS = ("allocator", "nccl")


@dataclass(frozen=True)
class Column:
    title: str
    value: Callable[[dict], Optional[float]]  # from one completed job's results.json
    better: str  # "low" or "high": which end is marked best
    digits: int = 2
    gpu_only: bool = False  # ranked only among rows that ran on GPUs


def _summary(key: str) -> Callable[[dict], Optional[float]]:
    return lambda results: (results.get("summary") or {}).get(key)


def _mfu_percent(results: dict) -> Optional[float]:
    value = (results.get("summary") or {}).get("mfu")
    return None if value is None else 100.0 * value


METRIC_COLUMNS = (
    Column("balance max/min", _summary("balance_max_over_min"), "low", 3),
    Column("rank0/median", _summary("balance_rank0_over_median"), "low", 3),
    Column("peak reserved GiB", _summary("peak_reserved_gib_max"), "low"),
    Column("NVML used GiB", _summary("nvml_used_gib_max"), "low"),
    Column("host RSS GiB", _summary("peak_host_rss_gib_max"), "low"),
    Column("init s", _summary("init_s"), "low"),
    Column("step s", _summary("step_time_s_median"), "low", 4),
    # workload.drift_check beside the step time: faster, at what cost (docs/precision.md)
    Column("flow rel L2", _summary("drift_flow_rel_l2"), "low", 4),
    Column("PSNR dB", _summary("drift_psnr_db"), "high", 1),
    Column("SSIM", _summary("drift_ssim"), "high", 4),
    Column("comm bytes/step", _summary("comm_step_bytes_max"), "low", 0),  # busiest rank
    Column("steps/s", _summary("steps_per_s"), "high"),
    Column("tokens/s", _summary("tokens_per_s"), "high", 0),
    Column("video s/s", _summary("video_s_per_s"), "high", 4),
    Column("TFLOP/s/GPU", _summary("tflops_per_gpu"), "high", 3, gpu_only=True),
    Column("MFU %", _mfu_percent, "high", 1, gpu_only=True),
    Column("s/clip", _summary("seconds_per_clip"), "low"),  # latency: one clip, every stage
    # throughput: the clips every dp group makes, per hour and GPU (metrics.summary.clips_per_hour_per_gpu)
    Column("clips/h/GPU", _summary("clips_per_hour_per_gpu"), "high", 1),
    Column("s per video s", _summary("seconds_per_video_second"), "low"),
    Column(
        "DiT share %",
        lambda r: None if _summary("dit_share")(r) is None else 100.0 * _summary("dit_share")(r),
        "high",
        1,
    ),
)


def column(title: str) -> Column:
    """The metric column with this title."""
    return next(c for c in METRIC_COLUMNS if c.title == title)


@dataclass
class Row:
    strategy: str
    world_size: int
    variant: str  # the other overrides that tell this configuration apart
    jobs: list[dict] = field(default_factory=list)  # results.json contents, by job_num

    @property
    def completed(self) -> list[dict]:
        return [j for j in self.jobs if j.get("status") == "completed"]

    @property
    def label(self) -> str:
        base = f"{self.strategy} x{self.world_size}"
        return f"{base} {self.variant}" if self.variant else base

    @property
    def stability(self) -> float:
        return len(self.completed) / len(self.jobs)

    @property
    def machine_warnings(self) -> list[str]:
        """What made this configuration's times a busy or misconfigured machine's (results.json
        "machine": too many ranks or threads for the cores, a bad OMP_NUM_THREADS, other load)."""
        return list(dict.fromkeys(w for j in self.jobs for w in (j.get("machine") or {}).get("warnings") or []))

    @property
    def status(self) -> str:
        """'completed' when every repeat completed, else the statuses seen, e.g. 'hang'."""
        statuses = sorted({j.get("status", "unknown") for j in self.jobs})
        return "/".join(statuses)

    @property
    def root_cause(self) -> str:
        """The last failed job's root cause, as one line ('' when none failed)."""
        failed = [j for j in self.jobs if j.get("status") != "completed"]
        if not failed:
            return ""
        cause = failed[-1].get("root_cause") or {}
        where = ", ".join(f"{k} {cause[k]}" for k in ("rank", "phase", "step", "exitcode") if cause.get(k) is not None)
        message = " ".join(str(cause.get("message", "")).split())
        return f"{failed[-1].get('status')}: {message} ({where})" if where else f"{failed[-1].get('status')}: {message}"

    @property
    def on_gpu(self) -> bool:
        """True when the row's completed jobs ran on GPUs."""
        return any(str((j.get("summary") or {}).get("device_name", "cpu")) != "cpu" for j in self.completed)

    def ranked_in(self, column: Column) -> bool:
        """Whether this row's value of `column` competes for best (module docstring)."""
        if self.on_gpu:
            return True
        gpu_setting = any(
            o.split("=", 1)[0].lstrip("+~").split(".")[0] in GPU_ONLY_SETTINGS for o in self.variant.split()
        )
        return not column.gpu_only and not gpu_setting

    def value(self, column: Column) -> Optional[float]:
        values = [v for v in (column.value(j) for j in self.completed) if v is not None]
        return statistics.median(values) if values else None

    def representative(self) -> Optional[dict]:
        """The completed job whose step time is the row's median (for per-rank plots)."""
        done = sorted(self.completed, key=lambda j: (j.get("summary") or {}).get("step_time_s_median") or 0.0)
        return done[len(done) // 2] if done else None


@dataclass
class SweepResults:
    jobs: list[dict]  # results.json contents, in job order
    unreadable: list[str]  # "<path>: why" for each results.json that could not be read


def load_results(sweep_dir: Path) -> SweepResults:
    """Every readable ``<sweep dir>/<job>/results.json``, in job order, and the unreadable
    ones named (a corrupt file must not hide the rest of the sweep)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep dir {sweep_dir} does not exist; pass the folder that holds the job dirs")
    results, unreadable = [], []
    for path in sorted(sweep_dir.glob("*/results.json")):
        try:
            job = json.loads(path.read_text())
            if not isinstance(job, dict) or "status" not in job:
                raise ValueError("not a job result (no status)")
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            unreadable.append(f"{path}: {type(exc).__name__}: {exc}")
            continue
        results.append(job)
    if not results:
        found = f" ({len(unreadable)} unreadable: {'; '.join(unreadable)})" if unreadable else ""
        raise FileNotFoundError(
            f"no readable <job>/results.json under {sweep_dir}{found}; is it a sweep dir (outputs/<date>/<time>)?"
        )
    jobs = sorted(results, key=lambda r: (r.get("job_num") is None, r.get("job_num"), r.get("job_dir", "")))
    return SweepResults(jobs, unreadable)


def _is_variant(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return key not in NOT_VARIANT_KEYS and not any(key == k or key.startswith(k + ".") for k in NOT_VARIANT_PREFIXES)


def build_rows(results: list[dict]) -> list[Row]:
    """Group the jobs into configurations (see the module docstring), in first-seen order.
    Overrides every job shares (e.g. model=s2v_14b given for the whole sweep) tell no rows
    apart and are left out of the variant."""
    shared = set.intersection(*(set(job.get("overrides", [])) for job in results)) if len(results) > 1 else set()
    rows: dict[tuple, Row] = {}
    for job in results:
        variant = " ".join(sorted(o for o in job.get("overrides", []) if _is_variant(o) and o not in shared))
        key = (job.get("strategy"), job.get("world_size"), variant)
        if key not in rows:
            rows[key] = Row(str(job.get("strategy")), int(job.get("world_size") or 0), variant)
        rows[key].jobs.append(job)
    return list(rows.values())


def best_values(rows: list[Row]) -> dict[str, Optional[float]]:
    """The best value of each metric column and of stability; None where the rows do not
    differ (marking every row would say nothing)."""
    best: dict[str, Optional[float]] = {}
    for column in METRIC_COLUMNS:
        values = [v for v in (row.value(column) for row in rows if row.ranked_in(column)) if v is not None]
        pick = min if column.better == "low" else max
        best[column.title] = pick(values) if len(set(values)) > 1 else None
    stabilities = {row.stability for row in rows}
    best["stability"] = max(stabilities) if len(stabilities) > 1 else None
    return best


def format_value(value: Optional[float], digits: int) -> str:
    """Fixed decimals; scientific where they would round a non-zero value to zero (the
    tiny model's TFLOP/s)."""
    if value is None:
        return "—"
    if value and abs(value) < 10**-digits:
        return f"{value:.2e}"
    return f"{value:,.{digits}f}"


def shown_columns(rows: list[Row]) -> list[Column]:
    """The metric columns some row has a value for (a CPU sweep has no GPU columns)."""
    return [c for c in METRIC_COLUMNS if any(row.value(c) is not None for row in rows)]


def table_cells(rows: list[Row]) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Header and, per row, (text, is_best) cells: the one layout every output uses."""
    best = best_values(rows)
    columns = shown_columns(rows)
    header = ["strategy", "ranks", "variant", "stability"] + [c.title for c in columns] + ["status / root cause"]
    body = []
    for row in rows:
        stability = f"{len(row.completed)}/{len(row.jobs)}"
        cells = [
            (row.strategy, False),
            (str(row.world_size), False),
            (row.variant or "—", False),
            (stability, row.stability == best["stability"]),
        ]
        for column in columns:
            value = row.value(column)
            is_best = value is not None and value == best[column.title] and row.ranked_in(column)
            cells.append((format_value(value, column.digits), is_best))
        # the warning sits beside the figures it concerns; "Times not comparable" says it whole
        cells.append(((row.root_cause or row.status) + (MACHINE_MARK if row.machine_warnings else ""), False))
        body.append(cells)
    return header, body


def _clip(text: str, width: int = 100) -> str:
    """Long root-cause messages cut for the console (report.md keeps them whole)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def text_table(rows: list[Row], unreadable: Sequence[str] = ()) -> str:
    """Fixed-width console table; '*' marks the best value of a column. Unreadable
    results.json files are named below it."""
    header, body = table_cells(rows)
    lines = [header] + [[_clip(text) + ("*" if is_best else "") for text, is_best in cells] for cells in body]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append("(* best in column; metrics are medians over completed repeats)")
    out += [f"left out, unreadable: {problem}" for problem in unreadable]
    return "\n".join(out)


CAVEATS_TITLE = "Times not comparable"
MACHINE_MARK = " (busy/misconfigured machine: see below)"


def time_caveats(rows: list[Row]) -> list[str]:
    """One line per configuration whose step times do not measure the split on its own GPUs:
    ranks that shared GPUs (launcher.share_gpus) or one simulated rank (launcher.simulate_world_size)."""
    lines = []
    for row in rows:
        if any(j.get("shared_gpus") for j in row.jobs):
            lines.append(
                f"{row.label}: ranks shared GPUs (launcher.share_gpus) and ran their collectives over "
                "gloo, so its times are not comparable; memory per process holds"
            )
        simulated = next((j["simulated"] for j in row.jobs if j.get("simulated")), None)
        if simulated:
            lines.append(
                f"{row.label}: simulated (one process played rank {simulated['rank']} of "
                f"{simulated['world_size']} over the fake process group): its step time is that rank's "
                "compute only, no data moved; results.json's prediction prices the communication"
            )
        lines += [f"{row.label}: {warning}" for warning in row.machine_warnings]
    return lines
