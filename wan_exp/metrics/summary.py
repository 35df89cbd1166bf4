"""Derived figures of a rank and of a job (no torch: the job process on the host uses it).

Every derived figure is computed once, here, and stored; readers (the console, W&B, the
dashboard, the plan) read the stored field and never compute it again:

- :func:`rank_figures`: one rank's figures from its own measurements (median step,
  initialisation seconds, collective totals), stored in its rank record by
  ``MetricsCollector.rank_record``;
- :func:`summarize`: the job's comparison figures from every rank's record (the ``summary`` of
  results.json: the job's step times and their median, balance, throughput, MFU, comm, stages,
  and the clips the dp groups made with their latency and throughput, :func:`clip_summary`);
- :func:`clips_per_hour_per_gpu`: THE throughput figure, also of the plan's predicted clips.
"""

from __future__ import annotations

import statistics
from typing import Any, Optional

from wan_exp.metrics.flops import mfu, peak_flops

# ---------------------------------------------------------------------------- job level
BALANCE_BASES = ("peak_reserved_gib", "nvml_used_gib", "peak_host_rss_gib")  # first one every rank has


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num is not None and den else None


def rank_figures(step_times_s: list[float], init_phases_s: dict[str, float], comm: dict) -> dict[str, Any]:
    """One rank's derived figures, as its record stores them (docs/architecture.md):

    - ``step_time_s_median``: the median of its measured steps (the mean of the middle two for an
      even count; None without a measured step);
    - ``init_s``: the sum of its initialisation phases;
    - ``comm_step_totals`` / ``comm_init_totals``: its collectives summed over the kinds
      (:func:`comm_totals`) per measured step (None without a measured step) and for initialisation.
    """
    return {
        "step_time_s_median": statistics.median(step_times_s) if step_times_s else None,
        "init_s": sum(init_phases_s.values()),
        "comm_step_totals": comm_totals(comm["per_step"]) if comm.get("per_step") is not None else None,
        "comm_init_totals": comm_totals(comm.get("init")),
    }


def job_step_times(records: list[dict]) -> list[float]:
    """The job's time of each measured step: the slowest rank's (ranks wait for each
    other in collectives), over the steps every rank measured."""
    n_steps = min((len(r.get("step_times_s", [])) for r in records), default=0)
    return [max(r["step_times_s"][i] for r in records) for i in range(n_steps)]


def summarize(records: list[dict], config: Any) -> dict:
    """Job-level metrics from the rank records (docs/architecture.md, docs/facts.md "Metrics").

    - balance: max/min of peak reserved memory over ranks, and rank 0 over the median of
      the other ranks (the "GPU 0 overloaded" symptom); where the ranks did not measure it
      NVML's used memory of their GPUs stands in (workload=upstream), on CPU peak host RSS;
      ``balance_basis`` says which was used.
    - time: init phases as the max over ranks (the slowest rank gates the job); a step's
      time is the max over ranks (``step_times_s``), then median/min/max over the measured steps.
    - throughput from the median step: steps/s, tokens/s, video seconds per second,
      TFLOP/s per GPU, and MFU against the device's dense peak for ``model.dtype``.
    - communication: calls, bytes and bus bytes per measured step and for initialisation,
      of the rank that moves the most (each record's ``comm_*_totals``, :func:`rank_figures`).
    - generate's pipeline stages (stage_summary).
    """
    if not records:
        return {"ranks_reported": 0}
    records = sorted(records, key=lambda r: r["rank"])
    world_size = records[0]["world_size"]
    rank0 = records[0]

    # the allocator's figure where the ranks measured it; NVML's where only the host saw the
    # GPUs (workload=upstream); host RSS on the CPU
    for basis in BALANCE_BASES:
        reserved = [r["memory"].get(basis) for r in records]
        if all(v is not None for v in reserved):
            break
    others = reserved[1:]
    rank0_over_median = _ratio(reserved[0], statistics.median(others)) if others else None

    def column_max(key: str) -> Optional[float]:
        values = [r["memory"].get(key) for r in records if r["memory"].get(key) is not None]
        return max(values) if values else None

    def column_sum(key: str) -> Optional[float]:
        values = [r["memory"].get(key) for r in records if r["memory"].get(key) is not None]
        return sum(values) if values else None

    phases: dict[str, float] = {}
    for r in records:
        for name, seconds in r.get("init_phases_s", {}).items():
            phases[name] = max(phases.get(name, 0.0), seconds)

    step_times = job_step_times(records)
    step_median = statistics.median(step_times) if step_times else None
    # per step: only where steps were measured (init has none: absent, not 0)
    comm_step = [r["comm_step_totals"] for r in records if r.get("comm_step_totals") is not None]
    comm_init = [r["comm_init_totals"] for r in records if r.get("comm_init_totals") is not None]

    def comm_max(figures: list[dict], key: str) -> Optional[float]:
        return max(f[key] for f in figures) if figures else None

    work = rank0.get("workload", {})
    tokens_per_step = (
        work["tokens_per_forward"] * work.get("forwards_per_step", 1)
        if work.get("tokens_per_forward") is not None
        else None
    )
    flops_per_step = work.get("flops_per_step")
    dtype = str((config.get("model") or {}).get("dtype", "bf16"))  # a dict or a DictConfig
    peak = peak_flops(rank0["device_name"], dtype)
    stages = stage_summary(records)

    return {
        "ranks_reported": len(records),
        "world_size": world_size,
        "device_name": rank0["device_name"],
        "peak_allocated_gib_max": column_max("peak_allocated_gib"),
        "peak_reserved_gib_max": column_max("peak_reserved_gib"),
        "peak_reserved_gib_min": min(reserved) if basis == "peak_reserved_gib" else None,
        "nvml_used_gib_max": column_max("nvml_used_gib"),
        "peak_host_rss_gib_max": column_max("peak_host_rss_gib"),
        "alloc_retries": column_sum("alloc_retries"),
        "ooms": column_sum("ooms"),
        "balance_basis": basis,
        "balance_max_over_min": _ratio(max(reserved), min(reserved)),
        "balance_rank0_over_median": rank0_over_median,
        "init_phases_s": phases,
        "init_s": sum(phases.values()) if phases else None,
        "measured_steps": len(step_times),
        "step_times_s": step_times,  # the job's time of each measured step (job_step_times)
        "step_time_s_median": step_median,
        "step_time_s_min": min(step_times) if step_times else None,
        "step_time_s_max": max(step_times) if step_times else None,
        "steps_per_s": _ratio(1.0, step_median),
        "tokens_per_s": _ratio(tokens_per_step, step_median),
        "video_s_per_s": _ratio(work.get("video_seconds_per_step"), step_median),
        "flops_per_step": flops_per_step,
        "tflops_per_gpu": _ratio(flops_per_step, step_median * world_size * 1e12) if step_median else None,
        "peak_flops_per_gpu": peak,
        "mfu": mfu(flops_per_step or 0.0, step_median or 0.0, world_size, peak),
        "attention_backend": rank0.get("attention_backend"),
        "attention_lse_backend": rank0.get("attention_lse_backend"),
        "attention_kernels": rank0.get("attention_kernels"),
        "precision": (rank0.get("precision") or {}).get("precision"),
        "fp8_linear_layers": ((rank0.get("precision") or {}).get("fp8_linear") or {}).get("layers"),
        **drift_summary(records),
        "parallel_dims": rank0.get("parallel_dims"),
        # communication: the busiest rank's collectives (metrics/comm.py defines bytes)
        "comm_step_calls_max": comm_max(comm_step, "count"),
        "comm_step_bytes_max": comm_max(comm_step, "bytes"),
        "comm_step_bus_bytes_max": comm_max(comm_step, "bus_bytes"),
        "comm_init_calls_max": comm_max(comm_init, "count"),
        "comm_init_bytes_max": comm_max(comm_init, "bytes"),
        **stages,
        **clip_summary(records, stages.get("seconds_per_clip")),
    }


def drift_summary(records: list[dict]) -> dict:
    """workload.drift_check's figures over the ranks (empty when it was off): the worst flow
    relative L2 error of any rank, and the frames' PSNR/SSIM (the ranks that decoded agree on
    their pixels; the lowest is kept)."""
    drifts = [r["drift"] for r in records if r.get("drift")]
    if not drifts:
        return {}

    def worst(key: str, pick: Any) -> Optional[float]:
        values = [d[key] for d in drifts if d.get(key) is not None]
        return pick(values) if values else None

    identical = [d["frames_identical"] for d in drifts if "frames_identical" in d]
    return {
        "drift_flow_rel_l2": worst("flow_rel_l2_max", max),
        "drift_psnr_db": worst("psnr_db", min),
        "drift_ssim": worst("ssim", min),
        "drift_frames_identical": all(identical) if identical else None,
    }


def comm_totals(kinds: Optional[dict]) -> dict[str, float]:
    """Sum over the collective kinds of one bucket of a rank record's ``comm``:
    {"count", "bytes", "bus_bytes"} (zeros for None)."""
    kinds = kinds or {}
    return {key: sum(t[key] for t in kinds.values()) for key in ("count", "bytes", "bus_bytes")}


def clips_per_hour_per_gpu(seconds_per_clip: Optional[float], dp_degree: int, world_size: int) -> Optional[float]:
    """Throughput: clips per hour per GPU, ``dp_degree x 3600 / seconds_per_clip / world_size``
    (dp_degree groups each make a clip in ``seconds_per_clip``, the latency, on world_size GPUs).
    None without a clip time."""
    if not seconds_per_clip:
        return None
    return dp_degree * 3600.0 / seconds_per_clip / world_size


def clip_summary(records: list[dict], seconds_per_clip: Optional[float]) -> dict:
    """The clips of a job (empty where it made none): ``clips_per_hour_per_gpu`` from
    ``seconds_per_clip`` (:func:`stage_summary`: one clip, every stage; the latency) and, for
    workload=generate, ``dp_degree``; ``clip_groups``, per dp group that reported: its dp_rank,
    seed, clip count and video file (from its ranks' records); ``clips_made``, by every group
    (each makes the job's clip count). A job without dp groups (workload=upstream) is one group."""
    groups: dict[int, dict] = {}
    dp_degree = 1
    for r in records:
        group = (r.get("workload") or {}).get("clip_group")
        if group is None:
            continue
        dp_degree = group["dp_degree"]
        entry = groups.setdefault(
            group["dp_rank"],
            {"dp_rank": group["dp_rank"], "seed": group["seed"], "clips": r["workload"].get("clips"), "video": None},
        )
        entry["video"] = entry["video"] or group.get("video")
    if not groups and seconds_per_clip is None:
        return {}
    out: dict[str, Any] = {
        "clips_per_hour_per_gpu": clips_per_hour_per_gpu(seconds_per_clip, dp_degree, records[0]["world_size"])
    }
    if groups:
        clips = next(iter(groups.values()))["clips"]
        out["dp_degree"] = dp_degree
        out["clip_groups"] = [groups[k] for k in sorted(groups)]
        out["clips_made"] = None if clips is None else dp_degree * clips
    return out


CHECK_STAGES = ("drift_check",)  # stages a job runs only to check itself (models/precision.py)
STAGE_PEAKS = ("peak_allocated_gib", "peak_reserved_gib", "peak_host_rss_gib")


def stage_summary(records: list[dict]) -> dict:
    """Per-stage figures of the job (empty when no rank timed stages): each stage's seconds and
    peaks as the max over ranks (the slowest rank gates the job; the fullest one fails first),
    and the figures people quote: seconds per clip and per second of video (all stages
    together), and the DiT's share of that time (the ``denoise`` stage)."""
    names: list[str] = []
    for r in records:
        names += [n for n in r.get("stages", {}) if n not in names]
    if not names:
        return {}

    def over_ranks(name: str, key: str) -> Optional[float]:
        values = [
            r["stages"][name][key]
            for r in records
            if name in r.get("stages", {}) and r["stages"][name].get(key) is not None
        ]
        return max(values) if values else None

    seconds = {n: over_ranks(n, "seconds") for n in names}
    # the drift check's bf16 clip is a measurement of the measurement, not part of the pipeline
    total = sum(v for n, v in seconds.items() if v is not None and n not in CHECK_STAGES)
    work = records[0].get("workload", {})
    out: dict[str, Any] = {"stages_s": seconds, "pipeline_s": total}
    for key in STAGE_PEAKS:
        out[f"stage_{key}"] = {n: over_ranks(n, key) for n in names}
    out["seconds_per_clip"] = _ratio(total, work.get("clips"))
    out["seconds_per_video_second"] = _ratio(total, work.get("video_seconds"))
    out["dit_share"] = _ratio(seconds.get("denoise"), total)
    return out
