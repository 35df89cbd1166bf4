"""Room for a sweep: what its jobs will write against the free space of the sweep dir's
file system, checked before the first job starts (wan_exp.host.callbacks).

The estimate is an upper bound of the usual case, not an exact figure:

- every job: ``JOB_BYTES`` (config, job record, results.json, Hydra's files, the W&B run;
  a 2-rank tiny job wrote 0.3 MiB in all) plus ``RANK_BYTES`` per rank (its record, its
  heartbeat, its logs and its copy inside results.json);
- the sweep: ``REPORT_BYTES`` for report.md and report.html;
- a generate job that writes its video (``workload.save_video``): every frame as the H.264
  encoder receives it, yuv420p at 1.5 bytes per pixel, which the encoder's output does
  not exceed in practice (0.50 to 0.74 bytes per pixel measured on pure noise, the
  hardest content; real footage is tens of times smaller), plus the AAC audio at its
  ceiling of 128 kbit/s; one video per dp group (parallel.dp_degree).

Not counted: NCCL flight-recorder dumps (nccl=debug), stack dumps of a hang and a saved
LoRA adapter (workload=train_lora).

No torch import.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wan_exp.geometry import job_geometry
from wan_exp.media import SAMPLE_RATE, audio_peak_and_samples, wants_video
from wan_exp.parallel.dims import parallel_dims

MIB = 1024**2
JOB_BYTES = 1 * MIB
RANK_BYTES = 128 * 1024
REPORT_BYTES = 1 * MIB
VIDEO_BYTES_PER_PIXEL = 1.5  # yuv420p: a full-size luma plane and two quarter-size chroma planes
AUDIO_BYTES_PER_S = 128_000 // 8  # AAC at 128 kbit/s


@dataclass(frozen=True)
class SweepBytes:
    """What a batch of jobs will write: in all, and the videos' part of it."""

    total: int
    videos: int
    jobs: int


def planned_video_frames(workload: Any) -> int:
    """At most the frames of a generate job's video: clips x frames_per_clip; with
    ``workload.clips=-1`` the clip count follows the audio file (one more than its whole clips,
    as the workload counts them), its length read a frame at a time (the file is never held)."""
    clips = int(workload.clips)
    if clips == -1:
        if workload.audio_path:
            seconds = audio_peak_and_samples(workload.audio_path)[1] / SAMPLE_RATE
            clips = int(seconds * int(workload.fps) / int(workload.frames_per_clip)) + 1
        else:
            clips = 1
    return clips * int(workload.frames_per_clip)


def video_bytes(cfg: Any) -> int:
    """Upper bound of the bytes of the job's video.mp4; 0 when the job writes none."""
    wl = cfg.workload
    if wl.name != "generate" or not wants_video(wl, cfg.model.checkpoint_dir):
        return 0
    geometry = job_geometry(cfg)
    height, width = geometry.height, geometry.width
    frames = planned_video_frames(wl)
    seconds = frames / int(wl.fps)
    return int(frames * height * width * VIDEO_BYTES_PER_PIXEL + seconds * AUDIO_BYTES_PER_S)


def job_bytes(cfg: Any, ranks: int) -> tuple[int, int]:
    """(all bytes, video bytes) one job of `ranks` ranks writes: a video per dp group."""
    video = video_bytes(cfg)
    if video:
        video *= parallel_dims(cfg, ranks).dp
    return JOB_BYTES + ranks * RANK_BYTES + video, video


def sweep_bytes(jobs: list[tuple[int, int]]) -> SweepBytes:
    """What the jobs ((all bytes, video bytes) each, from :func:`job_bytes`) and the report
    will write."""
    return SweepBytes(total=REPORT_BYTES + sum(t for t, _ in jobs), videos=sum(v for _, v in jobs), jobs=len(jobs))


def existing_ancestor(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists (a sweep dir not yet made)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged write can still use on the file system that holds `path`."""
    return shutil.disk_usage(existing_ancestor(path)).free


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB" if n < 1024 * MIB else f"{n / 1024**3:.2f} GiB"


def space_problem(sweep_dir: Path, need: SweepBytes) -> str | None:
    """Why the sweep would not fit in its file system (the figures and what to do), or None."""
    free = free_bytes(sweep_dir)
    if need.total <= free:
        return None
    video = f", {_mib(need.videos)} of it video at {VIDEO_BYTES_PER_PIXEL} bytes per pixel" if need.videos else ""
    return (
        f"the sweep's {need.jobs} job(s) will write about {_mib(need.total)}{video}, but the file system of "
        f"hydra.sweep.dir={sweep_dir} has {_mib(free)} free; free space there, choose another "
        "hydra.sweep.dir" + (", or write no videos (workload.save_video=false)" if need.videos else "")
    )


__all__ = ["SweepBytes", "free_bytes", "job_bytes", "space_problem", "sweep_bytes", "video_bytes"]
