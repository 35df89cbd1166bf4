"""One rank of a workload=upstream job: ``python -m wan_exp.upstream.runner <job_dir>``.

The job's elastic agent starts this in place of wan_exp.rank.worker (same environment:
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, the nccl and allocator groups). It runs the
checkout's ``generate.py`` in this process with ``runpy`` (as ``python generate.py ...`` would:
``__main__``, the checkout first on sys.path, its folder as the working directory), with the
flags of wan_exp.upstream.command, and around it only what a launcher can see from outside:

- its output: stdout and stderr go on to the rank's log as they are, and every line and
  progress update is also read (:class:`ProgressReader`): upstream's tqdm bar ``n/total``
  gives the steps and their times, upstream's log lines the phase; each is a heartbeat, so
  the job's watchdog (start-up bound, hang timeout) works as for built-in ranks;
- SIGUSR1 writes every thread's Python stack to ``<job>/stacks/rank_<r>.txt`` (the watchdog's
  hang dump; py-spy adds native frames from the host, wan_exp.host.pyspy);
- ``parallel=fsdp_fixed``: an import hook wraps ``wan.distributed.fsdp.shard_model`` as the
  module is first imported, so every call wraps with ``sync_module_states=False`` (no
  broadcast of rank 0's weights); the checkout's files are not touched, and no bytecode is
  written into it;
- ``torch.distributed.init_process_group`` gets ``nccl.timeout_s`` where upstream gives no
  timeout (:func:`with_default_timeout`), so a stuck collective times out and the NCCL flight
  recorder dumps (``nccl=debug``) before the watchdog ends the job.

At the end the rank writes its record (ranks/rank_<r>.json, the same fields as a built-in
rank's where they can be known from outside; docs/upstream.md); the host adds NVML, host RSS
and the output video's check (wan_exp.upstream.monitor) before results.json is written.
"""

from __future__ import annotations

import faulthandler
import functools
import importlib.abc
import importlib.machinery
import inspect
import io
import json
import os
import re
import runpy
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional, TextIO

import torch.distributed as dist
from omegaconf import OmegaConf

from wan_exp import results
from wan_exp.geometry import video_frames
from wan_exp.host.envvars import seen_environment
from wan_exp.metrics.summary import rank_figures
from wan_exp.units import GIB
from wan_exp.upstream.command import (
    FSDP_FUNCTION,
    GENERATE_SCRIPT,
    UPSTREAM_FPS,
    ignored_settings,
    patches_fsdp_broadcast,
    upstream_arguments,
)

FSDP_MODULE = "wan.distributed.fsdp"
BAR = re.compile(r"(\d+)/(\d+) \[")  # tqdm's "n/total [elapsed<remaining, rate]"
# upstream's rank-0 log lines (generate.py) -> the phase the rank is in from then on
PHASE_MARKERS = (
    ("Creating WanS2V pipeline", "load"),
    ("Generating video", "generate"),
    ("Saving generated video", "video_write"),
)
BEAT_INTERVAL_S = 0.5  # at most this often a heartbeat for output that changes no step


# ----------------------------------------------------------------------------- progress
class ProgressReader:
    """Reads upstream's output as it is written: tqdm updates (carriage-return separated) and
    log lines. Keeps the time each step ended (this process's clock when tqdm printed it) and
    the start of each bar (a clip's denoising loop); calls ``beat(phase, step)``."""

    def __init__(self, beat: Callable[[str, Optional[int]], None], clock: Callable[[], float] = time.time):
        self.beat, self.clock = beat, clock
        self.phase: str = "upstream"
        self.bars: list[dict] = []  # per bar: {"total", "start", "ends": [time of step 1.., ]}
        self._partial = ""
        self._last_beat = 0.0
        self._lock = threading.Lock()

    @property
    def steps_done(self) -> int:
        return sum(len(b["ends"]) for b in self.bars)

    def feed(self, text: str) -> None:
        with self._lock:
            pieces = re.split(r"[\r\n]", self._partial + text)
            self._partial = pieces.pop()
            if BAR.search(self._partial):  # tqdm writes "\r<bar>" with no terminator: read it now
                pieces.append(self._partial)
                self._partial = ""
            for piece in pieces:
                self._read(piece)

    def _read(self, piece: str) -> None:
        now = self.clock()
        for marker, phase in PHASE_MARKERS:
            if marker in piece:
                self.phase = phase
        match = BAR.search(piece)
        if match is None:
            if now - self._last_beat >= BEAT_INTERVAL_S:
                self._beat(now, None)
            return
        n, total = int(match.group(1)), int(match.group(2))
        bar = self.bars[-1] if self.bars else None
        if bar is None or n < len(bar["ends"]) or bar["total"] != total or (n == 0 and bar["ends"]):
            bar = {"total": total, "start": now, "ends": []}  # a new clip's loop
            self.bars.append(bar)
        new = n - len(bar["ends"])
        if new > 0:
            # tqdm may print several steps at once (its mininterval): spread the time evenly
            last = bar["ends"][-1] if bar["ends"] else bar["start"]
            bar["ends"] += [last + (now - last) * (i + 1) / new for i in range(new)]
            self.phase = "step"
        self._beat(now, self.steps_done if self.phase == "step" else None)

    def _beat(self, now: float, step: Optional[int]) -> None:
        self._last_beat = now
        self.beat(self.phase, step)

    def step_times(self) -> list[float]:
        """Every step's seconds, in order over the clips."""
        out = []
        for bar in self.bars:
            starts = [bar["start"]] + bar["ends"][:-1]
            out += [end - start for start, end in zip(starts, bar["ends"])]
        return out

    def first_bar_start(self) -> Optional[float]:
        return self.bars[0]["start"] if self.bars else None

    def denoise_seconds(self) -> float:
        return sum(b["ends"][-1] - b["start"] for b in self.bars if b["ends"])


class TeeStream(io.TextIOBase):
    """A text stream that writes through to ``target`` and hands every write to ``reader``."""

    def __init__(self, target: TextIO, reader: ProgressReader):
        self.target, self.reader = target, reader

    def write(self, text: str) -> int:
        self.target.write(text)
        self.target.flush()  # a hang must not hide the last lines in a buffer
        try:
            self.reader.feed(text)
        except OSError:  # a heartbeat that cannot be written (full disk): the output still goes on
            pass
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", "utf-8")


# ----------------------------------------------------------------------------- the fsdp_fixed patch
class PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` right after the module ``name`` executes on its first import, so
    every ``from ... import`` of it (upstream's ``from .distributed.fsdp import shard_model``)
    binds the patched object. The module's source is loaded as usual, never changed."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]):
        self.name, self.patch = name, patch

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            self.patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def no_broadcast_patch(calls: list[dict]) -> Callable[[ModuleType], None]:
    """The fsdp_fixed patch: wrap the module's shard_model so that every call passes
    sync_module_states=False, whatever the caller asked; each call is appended to ``calls``
    ({"requested": what the caller's arguments gave, "passed": False})."""

    def patch(module: ModuleType) -> None:
        original = getattr(module, FSDP_FUNCTION)
        signature = inspect.signature(original)

        @functools.wraps(original)
        def shard_model(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            calls.append({"requested": bool(bound.arguments["sync_module_states"]), "passed": False})
            bound.arguments["sync_module_states"] = False
            return original(*bound.args, **bound.kwargs)

        setattr(module, FSDP_FUNCTION, shard_model)

    return patch


# ----------------------------------------------------------------------------- the rank
class Heartbeat:
    """The rank's progress file in the format of wan_exp.rank.runtime (the watchdog reads it)."""

    def __init__(self, job_dir: Path, rank: int):
        self.job_dir, self.rank, self.seq = job_dir, rank, 0
        self.phase: str = "start"
        self.step: Optional[int] = None

    def __call__(self, phase: str, step: Optional[int] = None) -> None:
        self.phase, self.step, self.seq = phase, step, self.seq + 1
        rss, peak = host_memory_gib()
        results.write_json_atomic(
            results.heartbeat_path(self.job_dir, self.rank),
            {
                "rank": self.rank,
                "pid": os.getpid(),
                "phase": phase,
                "step": step,
                "seq": self.seq,
                "time": time.time(),
                "host_rss_gib": rss,
                "host_rss_peak_gib": peak,
                "memory_time": time.time(),
            },
            durable=False,
        )


def host_memory_gib() -> tuple[Optional[float], Optional[float]]:
    """This process's RSS and its high-water mark (VmRSS, VmHWM) in GiB."""
    values = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) * 1024 / GIB
    except OSError:
        pass
    return values.get("VmRSS"), values.get("VmHWM")


def rank_record(
    job: dict,
    cfg: Any,
    rank: int,
    world_size: int,
    started: float,
    ended: float,
    progress: ProgressReader,
    fsdp_calls: Optional[list[dict]],
    arguments: list[str],
) -> dict:
    """A rank record in the worker's format, with what can be known from outside the model: no
    allocator figures, no collective counts (docs/upstream.md, "What is measured")."""
    steps = progress.step_times()
    warmup = min(int(cfg.workload.warmup_steps), len(steps))
    first_bar = progress.first_bar_start()
    phases = {}
    if first_bar is not None:
        phases["start_up"] = first_bar - started  # import, load, wrap, encoders: everything before step 1
    if steps:
        phases["first_step"] = steps[0]
    clips = len(progress.bars)
    denoise = progress.denoise_seconds()
    rest = ended - first_bar - denoise if first_bar is not None else None
    _, peak_rss = host_memory_gib()
    frames = video_frames(int(cfg.workload.frames_per_clip), clips) if clips else 0
    figures = rank_figures(steps[warmup:], phases, comm={})
    figures.update(comm_step_totals=None, comm_init_totals=None)  # collectives are not seen from outside
    return {
        "rank": rank,
        "local_rank": int(os.environ.get("LOCAL_RANK", rank)),
        "world_size": world_size,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "device": job.get("device", "cuda"),
        # the GPU's name comes from the host's NVML samples (wan_exp.upstream.monitor)
        "device_name": "cpu" if job.get("device") == "cpu" else "cuda",
        "init_phases_s": phases,
        "other_phases_s": {},
        "warmup_steps": warmup,
        "step_times_s": steps[warmup:],
        "memory": {
            "peak_allocated_gib": None,
            "peak_reserved_gib": None,
            "nvml_used_gib": None,
            "alloc_retries": None,
            "ooms": None,
            "peak_host_rss_gib": peak_rss,
        },
        "workload": {
            "clips": clips,
            "frames": frames,
            "video_seconds": frames / UPSTREAM_FPS,
            "steps_per_clip": [b["total"] for b in progress.bars],
        },
        "stages": (
            {"denoise": {"seconds": denoise, "count": clips}, "decode_and_write": {"seconds": rest, "count": clips}}
            if clips
            else {}
        ),
        "upstream": {
            "command": [GENERATE_SCRIPT, *arguments],
            "repo": str(cfg.workload.repo),
            "seconds": ended - started,
            "fsdp_patch_calls": fsdp_calls,
        },
        "warnings": ignored_settings(cfg),
        **figures,
    }


def with_default_timeout(init_process_group: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    """``init_process_group`` that uses ``seconds`` (nccl.timeout_s) where the caller gives no
    timeout, as upstream's generate.py does: then a rank stuck in a collective times out, and
    the NCCL flight recorder (nccl=debug) dumps, before the watchdog's hang timeout."""

    @functools.wraps(init_process_group)
    def init(*args: Any, **kwargs: Any) -> Any:
        if "timeout" not in kwargs and len(args) < 3:  # (backend, init_method, timeout, ...)
            kwargs["timeout"] = timedelta(seconds=seconds)
        return init_process_group(*args, **kwargs)

    return init


def run_upstream(repo: Path, arguments: list[str]) -> None:
    """generate.py as ``python generate.py <arguments>`` from the checkout would run it."""
    script = repo / GENERATE_SCRIPT
    sys.argv = [str(script), *arguments]
    sys.path.insert(0, str(repo))
    os.chdir(repo)
    runpy.run_path(str(script), run_name="__main__")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m wan_exp.upstream.runner <job_dir>  (started by the launcher)")
    sys.dont_write_bytecode = True  # never write __pycache__ into the user's checkout
    job_dir = Path(sys.argv[1]).resolve()
    job = json.loads((job_dir / results.JOB_FILE).read_text())
    cfg = OmegaConf.load(job_dir / results.CONFIG_FILE)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    beat = Heartbeat(job_dir, rank)
    beat("start")
    stacks = job_dir / "stacks"
    stacks.mkdir(parents=True, exist_ok=True)
    stack_file = open(stacks / f"rank_{rank}.txt", "w")  # open for the life of the rank (signal handler)
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    repo = Path(str(cfg.workload.repo)).expanduser().resolve()
    arguments = upstream_arguments(cfg, world_size, job_dir)  # paths made absolute before the chdir
    fsdp_calls: Optional[list[dict]] = None
    if patches_fsdp_broadcast(cfg):
        fsdp_calls = []
        sys.meta_path.insert(0, PatchOnImport(FSDP_MODULE, no_broadcast_patch(fsdp_calls)))
    dist.init_process_group = with_default_timeout(dist.init_process_group, float(cfg.nccl.timeout_s))
    progress = ProgressReader(beat)
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = TeeStream(stdout, progress), TeeStream(stderr, progress)
    started = time.time()
    error = None
    beat("upstream")
    try:
        run_upstream(repo, arguments)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            error = {
                "type": "SystemExit",
                "message": f"generate.py exited with {exc.code}",
                "traceback": traceback.format_exc(),
            }
    except BaseException as exc:  # recorded, then the rank exits non-zero as a built-in rank does
        error = {
            "type": type(exc).__name__,
            "message": (str(exc).strip().splitlines() or [""])[0],
            "traceback": traceback.format_exc(),
        }
        traceback.print_exc()
    finally:
        sys.stdout, sys.stderr = stdout, stderr
    ended = time.time()
    record = rank_record(job, cfg, rank, world_size, started, ended, progress, fsdp_calls, arguments)
    if error is not None:
        error.update(phase=beat.phase, step=beat.step, time=ended)
    status = (
        results.COMPLETED
        if error is None
        else (results.OOM if error["type"] in ("OutOfMemoryError", "MemoryError") else results.FAILED)
    )
    record.update(status=status, error=error, env=seen_environment(job))
    results.write_rank_record(job_dir, record)
    beat("done" if error is None else beat.phase, beat.step)
    sys.exit(0 if error is None else 1)


if __name__ == "__main__":
    main()
