"""What the host measures of a workload=upstream job from outside its processes.

While the ranks run, :class:`HostMonitor` samples every second:
- per GPU through NVML (wan_exp.devices.read_nvml): memory used and utilisation, and which
  processes hold a context on it (a rank on a GPU it was not given: "GPU 0 overloaded");
- per rank of this host, its resident set (psutil), found by the PIDs of the ranks' heartbeats
  that are processes of this job on this host.
Once the ranks are gone it writes ``<job>/upstream/host_samples.json`` and adds to each rank
record (written by wan_exp.upstream.runner) its own GPU's peak NVML memory, mean utilisation
and name (:func:`rank_gpu`), the other GPUs it holds a context on, and its sampled peak RSS;
on the host holding rank 0 it checks the output video (:func:`check_video`) and fails rank 0's
record when the video is missing or short. Then
wan_exp.results.finalize_job builds results.json as for any job.

No torch import: the job process on the host uses this module.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import psutil

from wan_exp import results
from wan_exp.devices import NvmlView, read_nvml, visible_gpus
from wan_exp.units import GIB

SAMPLE_S = 1.0
SAMPLES_FILE = Path("upstream") / "host_samples.json"


class HostMonitor:
    """Samples NVML and the ranks' RSS in a thread from ``__enter__`` to ``__exit__``."""

    def __init__(
        self,
        job_dir: Path,
        local_pids: Callable[[], set[int]],
        read_gpus: Callable[[], NvmlView] = read_nvml,
        interval_s: float = SAMPLE_S,
    ):
        self.job_dir, self.local_pids = Path(job_dir), local_pids
        self.read_gpus, self.interval_s = read_gpus, interval_s
        self.gpus: dict[int, dict] = {}  # index -> {"name", "used_gib": [...], "util_pct": [...], "pids": set}
        self.rss: dict[int, dict] = {}  # rank -> {"pid", "rss_gib": [...]}
        self.cuda_order: list[int] = []  # NVML indices of the GPUs CUDA shows the ranks, in CUDA's order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wan-exp-host-monitor", daemon=True)

    def __enter__(self) -> HostMonitor:
        # a video an earlier attempt left (launcher.resume) must not pass for this run's
        (self.job_dir / results.VIDEO_FILE).unlink(missing_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # one last look (a job shorter than the interval)
        self.finish()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        view = self.read_gpus()
        visible, _ = visible_gpus(view.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))  # the ranks inherit it
        self.cuda_order = [g.index for g in visible]
        for gpu in view.gpus:
            entry = self.gpus.setdefault(gpu.index, {"name": gpu.name, "used_gib": [], "util_pct": [], "pids": set()})
            entry["used_gib"].append(gpu.used_bytes / GIB)
            if gpu.utilisation_pct is not None:
                entry["util_pct"].append(gpu.utilisation_pct)
            entry["pids"] |= set(gpu.process_pids)
        local = self.local_pids()
        for rank, beat in results.read_heartbeats(self.job_dir).items():
            if beat["pid"] not in local:
                continue  # another host's rank, or a PID this host reuses
            try:
                rss = psutil.Process(beat["pid"]).memory_info().rss / GIB
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self.rss.setdefault(rank, {"pid": beat["pid"], "rss_gib": []})["rss_gib"].append(rss)

    def gpu_summary(self) -> list[dict]:
        return [
            {
                "index": index,
                "name": g["name"],
                "peak_used_gib": max(g["used_gib"]),
                "mean_utilisation_pct": statistics.fmean(g["util_pct"]) if g["util_pct"] else None,
                "peak_utilisation_pct": max(g["util_pct"]) if g["util_pct"] else None,
                "pids": sorted(g["pids"]),
            }
            for index, g in sorted(self.gpus.items())
            if g["used_gib"]
        ]

    def finish(self) -> None:
        gpus = self.gpu_summary()
        ranks = {
            rank: {"pid": r["pid"], "peak_rss_gib": max(r["rss_gib"]), "samples": len(r["rss_gib"])}
            for rank, r in sorted(self.rss.items())
        }
        results.write_json_atomic(
            self.job_dir / SAMPLES_FILE, {"gpus": gpus, "ranks": ranks, "interval_s": self.interval_s}
        )
        for record in results.read_rank_records(self.job_dir):
            sampled = ranks.get(record["rank"])
            if sampled is None:
                continue  # another host's rank: that host adds its own figures
            add_host_figures(record, gpus, sampled, self.cuda_order)
            if record["rank"] == 0:
                add_video_check(record, self.job_dir)
            results.write_rank_record(self.job_dir, record)


def rank_gpu(record: dict, gpus: list[dict], pid: int, cuda_order: list[int]) -> Optional[dict]:
    """The rank's own GPU: the one CUDA calls ``local_rank`` (upstream's device; ``cuda_order``:
    NVML indices in CUDA's order under CUDA_VISIBLE_DEVICES), else the first whose NVML process
    list holds the rank's PID; None for a CPU rank or where neither is known."""
    by_index = {g["index"]: g for g in gpus}
    local = record.get("local_rank", record["rank"])
    if str(record.get("device", "")).startswith("cuda") and cuda_order:
        own = by_index.get(cuda_order[local % len(cuda_order)])
        if own is not None:
            return own
    return next((g for g in gpus if pid in g["pids"]), None)


def add_host_figures(record: dict, gpus: list[dict], sampled: dict, cuda_order: list[int]) -> None:
    """The host's view of one rank, into its record (memory.nvml_used_gib, peak_host_rss_gib)."""
    memory = record.setdefault("memory", {})
    own_peak = memory.get("peak_host_rss_gib")
    memory["peak_host_rss_gib"] = max(v for v in (own_peak, sampled["peak_rss_gib"]) if v is not None)
    gpu = rank_gpu(record, gpus, sampled["pid"], cuda_order)
    if gpu is not None:
        memory["nvml_used_gib"] = gpu["peak_used_gib"]
        record["device_name"] = gpu["name"]
        record["gpu_utilisation_pct_mean"] = gpu["mean_utilisation_pct"]
        # other GPUs this rank put a context on: the "GPU 0 overloaded" symptom, from outside
        record["other_gpus_used"] = [g["index"] for g in gpus if sampled["pid"] in g["pids"] and g is not gpu]


def check_video(path: Path, expected_frames: Optional[int]) -> dict:
    """Open the output video with PyAV: frames, size, fps, audio stream; ``error`` says what
    is wrong (missing, unreadable, fewer frames than the clips run give)."""
    import av

    found: dict[str, Any] = {"path": str(path), "expected_frames": expected_frames, "error": None}
    if not path.is_file():
        return {**found, "error": f"{path} was not written"}
    try:
        with av.open(str(path)) as container:
            video = next((s for s in container.streams if s.type == "video"), None)
            found["audio_stream"] = any(s.type == "audio" for s in container.streams)
            if video is None:
                return {**found, "error": f"{path} holds no video stream"}
            found.update(
                width=video.codec_context.width,
                height=video.codec_context.height,
                fps=float(video.average_rate) if video.average_rate else None,
            )
            found["frames"] = sum(1 for _ in container.decode(video=0))
    except (av.error.FFmpegError, OSError) as exc:
        return {**found, "error": f"{path} cannot be read as a video ({exc})"}
    if expected_frames is not None and found["frames"] != expected_frames:
        found["error"] = (
            f"{path} has {found['frames']} frames, not the {expected_frames} of the clips upstream "
            "ran (clips x workload.frames_per_clip, less the 3 the first clip drops)"
        )
    return found


def add_video_check(record: dict, job_dir: Path) -> None:
    """Rank 0 writes the video: a completed rank 0 without a readable, whole video failed."""
    if record.get("status") != results.COMPLETED:
        return
    expected = (record.get("workload") or {}).get("frames")
    video = check_video(Path(job_dir) / results.VIDEO_FILE, expected)
    record["video"] = video
    if video["error"] is not None:
        record["status"] = results.FAILED
        record["error"] = {
            "type": "OutputVideoError",
            "message": video["error"],
            "phase": "video_write",
            "step": None,
            "time": time.time(),
        }
    elif not video.get("audio_stream"):
        record.setdefault("warnings", []).append(
            f"{video['path']} has no audio stream (upstream merges the audio "
            "with ffmpeg after writing the video: is ffmpeg on PATH?)"
        )


def host_monitor(cfg: Any, job_dir: Path, local_pids: Callable[[], set[int]]) -> ContextManager:
    """The monitor for a workload=upstream job; nothing for other jobs (their ranks measure themselves)."""
    if str(cfg.workload.name) != "upstream":
        return nullcontext()
    return HostMonitor(job_dir, local_pids)
