"""``python -m wan_exp.plan``: will a split fit, and how fast will it be, on GPUs you do not have?

    python -m wan_exp.plan model=s2v_14b workload.size=704*1024 gpus=1,2,4,8 gpu_memory_gib=24,48,80,141

For every preset of conf/parallel (or ``strategies=a,b``) and every GPU count the degrees allow,
it runs one simulated job (``launcher.simulate_world_size=N``: one process plays rank 0 of N over
torch's fake process group, docs/rehearsal.md) on this machine's device, then prints and writes
(``<out>/plan.md``, ``plan.html``, ``plan.json``) strategy x GPUs -> that rank's peak memory and the
stage where it peaks, fits or OOM at each memory size, predicted step and clip time and the
predicted scaling efficiency.

Measured (on this device, by the simulated rank): peak memory per stage, compute time per step
(3 measured steps: median, min and max) and per stage, the collectives issued (count, bytes, sizes).
Modelled: their time on ``link=`` (plan/pricing.py: a curve per collective kind, sourced or
measured), the step as a range (serial: compute + comm; overlapped: what the strategy's code
hides behind compute), hence the step, clip and efficiency figures; and what a GPU must hold
besides the measured peak (the CUDA context, NCCL's buffers, a fragmentation margin) for the
fits verdict. With ``measured=<sweep dir>`` the real runs of that sweep (same model and size)
are shown beside, and a link fitted to them (``fit_link``) re-prices every row's collectives.

Plan options (the rest are config overrides for every job): ``gpus``, ``gpu_memory_gib``,
``strategies``, ``link`` (launcher.link), ``out`` (default outputs/plan/<date>/<time>),
``measured``, ``clip_steps``, ``fragmentation``. Jobs are short: workload=generate with one
clip, ``workload.sample_steps=4`` and ``workload.warmup_steps=1`` (3 measured steps) unless
given; the clip time is predicted for ``clip_steps`` sampling steps (default 40, upstream S2V's).
The same command with the same ``out`` again keeps the jobs that finished with the same code
(``code_version``: a hash of the package's source and configs); a job of older code runs again.
"""

from __future__ import annotations

import hashlib
import html
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from wan_exp.config import CONF_DIR, PIPELINE_STAGES, ConfigError, compose_config, parse_size, steps_run
from wan_exp.devices import visible_gpu_count
from wan_exp.host.callbacks import lock_holder, override_differences
from wan_exp.host.job import SWEEP_STATE_DIR
from wan_exp.metrics.summary import clips_per_hour_per_gpu
from wan_exp.plan.pricing import ASSUMPTION, GB, Link, comm_times_s, parse_link, step_range
from wan_exp.preflight import check_job
from wan_exp.report.render import CSS
from wan_exp.results import (
    COMPLETED,
    JOB_FILE,
    OOM,
    RESULTS_FILE,
    read_json,
    read_results,
    write_json_atomic,
    write_text_atomic,
)
from wan_exp.units import GIB

REPO = Path(__file__).resolve().parents[2]
PLAN_OPTIONS = ("gpus", "gpu_memory_gib", "strategies", "link", "out", "measured", "clip_steps", "fragmentation")
# sampling steps of the clip the plan predicts: upstream S2V's default (its jobs run 4 of them)
DEFAULT_CLIP_STEPS = 40
# 4 steps, the first a warm-up: 3 measured steps give a median and a spread
SHORT_JOB = {
    "workload.sample_steps": "4",
    "workload.warmup_steps": "1",
    "workload.clips": "1",
    "logger": "disabled",
    # on the CPU host RSS is mostly the runtime and varies run to run: count the tensors too
    # (peak_tensor_gib, what real ranks are checked against); a GPU rank ignores the setting
    "allocator.count_cpu_tensors": "true",
}
CODE_VERSION_FILE = "plan_code_version"  # in a job's sweep dir: the code_version that ran it
INIT_STAGE = "init (build/load/wrap)"
JOB_STOP_TIMEOUT_S = 120  # a stopped plan waits this long for its job to end its ranks
MEASURED_NOTE = "measured on {device} by the simulated rank: peak memory per stage, compute time, collectives issued"


def presets() -> list[str]:
    """The parallel presets (conf/parallel/*.yaml)."""
    return sorted(p.stem for p in (CONF_DIR / "parallel").glob("*.yaml"))


@dataclass
class PlanArgs:
    gpus: list[int]
    gpu_memory_gib: list[float]
    strategies: list[str]
    link: str
    out: Path
    measured: Optional[Path]
    overrides: list[str] = field(default_factory=list)
    clip_steps: int = DEFAULT_CLIP_STEPS
    fragmentation: float = 0.05


def _numbers(key: str, text: str, kind: type) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"{key}={text!r}: give positive numbers separated by commas, e.g. {key}=1,2,4,8")
    return values


def _clip_steps(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(
            f"clip_steps={text!r}: give the sampling steps of one clip, a positive whole number "
            f"(default {DEFAULT_CLIP_STEPS}, as upstream S2V samples)"
        )
    return int(text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise ConfigError(
            f"fragmentation={text!r}: give the share of the peak kept free for fragmentation, "
            "from 0 up to (not including) 1, e.g. fragmentation=0.05"
        )
    return value


def parse_args(argv: Sequence[str]) -> PlanArgs:
    """Plan options and config overrides; ConfigError naming a bad option."""
    options: dict[str, str] = {}
    overrides = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"{arg!r} is not key=value; e.g. gpus=1,2,4,8 or model=s2v_14b")
        if key in PLAN_OPTIONS:
            options[key] = value
        else:
            overrides.append(arg)
    known = presets()
    strategies = [s for s in options.get("strategies", ",".join(known)).split(",") if s]
    unknown = [s for s in strategies if s not in known]
    if unknown:
        raise ConfigError(f"strategies={options['strategies']!r}: {unknown} not presets; use some of {known}")
    link = options.get("link", "nvlink4")
    parse_link(link)
    if Path(link).expanduser().is_file():  # a curve file: its jobs run from the repository, not from here
        link = str(Path(link).expanduser().resolve())
    given = {o.partition("=")[0] for o in overrides}
    overrides = [f"{k}={v}" for k, v in SHORT_JOB.items() if k not in given] + overrides
    if "workload" not in given:
        overrides.insert(0, "workload=generate")
    return PlanArgs(
        gpus=_numbers("gpus", options.get("gpus", "1,2,4,8"), int),
        gpu_memory_gib=_numbers("gpu_memory_gib", options.get("gpu_memory_gib", "24,48,80,141"), float),
        strategies=strategies,
        link=link,
        out=Path(options.get("out") or f"outputs/plan/{time.strftime('%Y-%m-%d/%H-%M-%S')}").resolve(),
        measured=Path(options["measured"]) if options.get("measured") else None,
        overrides=overrides,
        clip_steps=_clip_steps(options.get("clip_steps", str(DEFAULT_CLIP_STEPS))),
        fragmentation=_fraction(options.get("fragmentation", "0.05")),
    )


def job_overrides(args: PlanArgs, strategy: str, gpus: int) -> list[str]:
    return [
        *args.overrides,
        f"parallel={strategy}",
        f"launcher.simulate_world_size={gpus}",
        f"launcher.link={args.link}",
    ]


def check_candidate(overrides: list[str], gpus_here: int) -> Optional[str]:
    """None if the simulated job may run here, else why not (the config rule's message)."""
    try:
        check_job(compose_config(overrides), gpus_here)
    except ConfigError as err:
        return str(err)
    return None


# what code_version hashes: the package, the launcher plugin, launch.py and the configs
CODE_GLOBS = ("wan_exp/**/*.py", "hydra_plugins/**/*.py", "launch.py", "conf/**/*.yaml")


def code_version(root: Path = REPO) -> str:
    """A hash of the source that produces a plan row (CODE_GLOBS under ``root``: each file's
    path and bytes, in path order): any change to them changes it."""
    digest = hashlib.sha256()
    files = sorted({p for pattern in CODE_GLOBS for p in root.glob(pattern) if p.is_file()})
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def stale_code(sweep_dir: Path, version: str) -> Optional[str]:
    """Why the job in ``sweep_dir`` cannot be kept for code ``version`` (ran other code, or its
    version is unknown), or None when it ran this code."""
    recorded = (
        (sweep_dir / CODE_VERSION_FILE).read_text().strip() if (sweep_dir / CODE_VERSION_FILE).is_file() else None
    )
    if recorded == version:
        return None
    return (
        f"ran code version {recorded}, now {version}"
        if recorded
        else f"its code version is not recorded (now {version})"
    ) + "; it runs again"


def as_recorded(overrides: list[str]) -> list[str]:
    """One job's overrides as its record keeps them: as Hydra's basic sweeper renders them
    (``x=true`` becomes ``x=True``), so a plan run again recognises its own jobs."""
    ((job,),) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
    return list(job)


# results kept when the same plan runs again; any other status (failed, hang, interrupted) runs again
KEPT_STATUSES = (COMPLETED, OOM)


def earlier_results(
    overrides: list[str], sweep_dir: Path, version: Optional[str] = None
) -> tuple[Optional[dict], bool]:
    """What an earlier run of the same plan (same ``out``) left for this job: ``(results to
    keep or None, whether its directory must be cleared before the job runs)``. Kept: a
    completed or OOM job of these overrides (and, given ``version``, of that code version).
    Cleared: one of these overrides that was cut short (interrupted, failed, hung, or no
    readable results.json) or, given ``version``, that ran other code (``stale_code``). ConfigError, before anything is
    cleared, for a job of other settings (the plan does not delete what it did not make) or one
    still running."""
    if not sweep_dir.exists():
        return None, False
    job = sweep_dir / "0"
    for lock in sorted((sweep_dir / SWEEP_STATE_DIR).glob("lock.*")):
        holder = lock_holder(lock)
        if holder is not None:
            raise ConfigError(
                f"{sweep_dir}: its job is still running (process {holder.get('pid')} on "
                f"{holder.get('host')}); wait for it or stop it, or give the plan another out="
            )
    results = read_results(job)
    results = results if isinstance(results, dict) else None
    job_record = read_json(job / JOB_FILE)
    recorded = (results or (job_record if isinstance(job_record, dict) else None) or {}).get("overrides")
    recorded, given = (None if recorded is None else as_recorded(recorded)), as_recorded(overrides)
    if recorded is not None and sorted(recorded) != sorted(given):
        raise ConfigError(
            f"{sweep_dir}: holds a job of other settings ("
            + "; ".join(override_differences(recorded, given))
            + "); give the plan another out= (or remove that directory)"
        )
    if results is not None and results.get("status") in KEPT_STATUSES:
        if version is not None and stale_code(sweep_dir, version) is not None:
            return None, True
        return results, False
    return None, True


class PlanStopped(Exception):
    """SIGTERM (a time limit) or Ctrl-C while the plan runs."""


class _StopSignals:
    """SIGTERM/SIGINT handler of the plan: raises PlanStopped, except while a job is being
    started (no handle on it yet to stop it with): then the stop waits for ``started``.
    (Blocking the signals instead would hand the blocked mask on to the job.)"""

    def __init__(self) -> None:
        self.starting = False
        self.pending: Optional[str] = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.starting:
            self.pending = signal.Signals(signum).name
            return
        raise PlanStopped(signal.Signals(signum).name)

    def started(self) -> None:
        self.starting = False
        if self.pending is not None:
            raise PlanStopped(self.pending)


_stop = _StopSignals()


def run_simulated_job(overrides: list[str], sweep_dir: Path) -> tuple[Optional[dict], str]:
    """One simulated job through launch.py: its results.json (None if it wrote none) and the
    last lines it printed (why, when there are no results).

    The job runs in a session of its own, so a Ctrl-C at the terminal reaches the plan only;
    when the plan is stopped, the job gets one SIGTERM, ends its ranks and records itself as
    interrupted (never left running on the GPU after the plan is gone)."""
    _stop.starting = True
    try:
        job = subprocess.Popen(
            [sys.executable, str(REPO / "launch.py"), *overrides, f"hydra.sweep.dir={sweep_dir}"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    except BaseException:
        _stop.starting = False
        raise
    try:
        _stop.started()  # a stop that came meanwhile is handled here
        output, _ = job.communicate()
    except BaseException:
        _stop_job(job)
        raise
    lines = [line for line in output.splitlines() if line.strip()]
    return read_results(sweep_dir / "0"), " | ".join(lines[-2:])


def _stop_job(job: subprocess.Popen) -> None:
    """One SIGTERM (the job ends its ranks and records itself interrupted), then wait; a further
    signal or JOB_STOP_TIMEOUT_S kills it (its agent, seeing its parent gone, ends the ranks)."""
    job.send_signal(signal.SIGTERM)
    forced = {}
    if threading.current_thread() is threading.main_thread():
        forced = {sig: signal.signal(sig, lambda signum, frame: job.kill()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        job.communicate(timeout=JOB_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        job.kill()
        job.communicate()
    finally:
        for sig, handler in forced.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- rows
def memory_key(record: dict) -> str:
    """What a rank's memory is judged by: the allocator's reserved peak on a GPU (what the
    device must hold), the process's host RSS peak on the CPU."""
    return "peak_reserved_gib" if record["memory"].get("peak_reserved_gib") is not None else "peak_host_rss_gib"


def peak_and_stage(record: dict) -> tuple[Optional[float], Optional[str]]:
    """The rank's peak memory and the stage it happened in (init when it came before every
    pipeline stage, i.e. in build/load/wrap)."""
    key = memory_key(record)
    peak = record["memory"].get(key)
    stages = {name: s.get(key) for name, s in (record.get("stages") or {}).items() if s.get(key) is not None}
    if peak is None:
        return None, None
    if not stages or max(stages.values()) < peak * 0.999:
        return peak, INIT_STAGE
    return peak, max(stages, key=stages.get)


# a clip's stages besides the DiT's steps (config.PIPELINE_STAGES less denoise and the drift check)
CLIP_STAGES_AROUND_THE_DIT = tuple(s for s in PIPELINE_STAGES if s not in ("denoise", "drift_check"))


def clip_seconds(results: dict, step_s: Optional[float], clip_steps: int) -> Optional[float]:
    """Predicted time of one whole clip of ``clip_steps`` sampling steps: clip_steps x the
    predicted step, plus the measured per-clip time of every other stage of the pipeline (text
    and audio encoding, the reference, VAE decode, motion re-encode, writing the video; the
    job's one-off stages shared over its clips). The job itself ran fewer steps (SHORT_JOB):
    its step is what is measured."""
    if step_s is None:
        return None
    record = results["ranks"][0]
    stages = record.get("stages") or {}
    clips = (stages.get("denoise") or {}).get("count") or 1
    around = sum(entry.get("seconds", 0.0) for name, entry in stages.items() if name in CLIP_STAGES_AROUND_THE_DIT)
    return clip_steps * step_s + around / clips


# ----------------------------------------------------------------------------- fits
# The CUDA context a process holds on its GPU besides the allocator's memory: 287,047,680 bytes
# with lazy module loading (PyTorch's measurement when it made CUDA_MODULE_LOADING=LAZY its
# default, https://github.com/pytorch/pytorch/pull/86509; eager loading took 666,632,192). Lazy
# loading is CUDA's default on Linux since 12.2. Kernels loaded later add to it.
CUDA_CONTEXT_BYTES = 287_047_680
NCCL_BUFFSIZE_DEFAULT = 4 << 20  # NCCL_BUFFSIZE's default, 4 MiB: the SIMPLE protocol's buffer
# the other two protocols' buffers (NCCL's src/init.cc): LL, 8 lines x 512 threads x 8 steps x
# 16-byte lines (512 KiB); LL128, 120 elements x 640 threads x 8 steps x 8 bytes (4.6875 MiB)
NCCL_LL_BUFFSIZE_DEFAULT = 8 * 512 * 8 * 16
NCCL_LL128_BUFFSIZE_DEFAULT = 120 * 640 * 8 * 8
# NCCL allocates each connection's buffers with cuMem (its default since 2.19), rounded up to the
# allocation granularity: 2 MiB, the sizes https://github.com/NVIDIA/nccl/issues/1685 logged
NCCL_CUMEM_GRANULARITY = 2 << 20
# channels NCCL opens per connection when NCCL_MAX_NCHANNELS does not say: 32, what an
# all-to-all on 8 H100s opened per pair of GPUs (https://github.com/NVIDIA/nccl/issues/1685)
NCCL_CHANNELS_DEFAULT = 32


def nccl_peer_bytes(env: dict) -> int:
    """NCCL's buffers of one rank for one channel and one connected peer: it receives into
    buffers of all three protocols (LL, LL128, SIMPLE = NCCL_BUFFSIZE; NCCL's
    src/transport/p2p.cc) and sends through a small header, each one allocation rounded up to
    cuMem's granularity: 10 MiB + 2 MiB at the defaults."""
    received = sum(
        int(env.get(name, default))
        for name, default in (
            ("NCCL_LL_BUFFSIZE", NCCL_LL_BUFFSIZE_DEFAULT),
            ("NCCL_LL128_BUFFSIZE", NCCL_LL128_BUFFSIZE_DEFAULT),
            ("NCCL_BUFFSIZE", NCCL_BUFFSIZE_DEFAULT),
        )
    )
    granules = -(-received // NCCL_CUMEM_GRANULARITY)
    return (granules + 1) * NCCL_CUMEM_GRANULARITY  # + one granule for the sender's header


def nccl_buffer_bytes(env: dict, gpus: int, peer_to_peer: bool) -> int:
    """NCCL's buffers on one rank, by the rule in docs/rehearsal.md ("Fits"): ``nccl_peer_bytes``
    per channel and connected peer; peers: the ring's neighbour for the collectives, plus every
    other rank where the job sends point to point or all-to-all (those connect every pair);
    channels from NCCL_MAX_NCHANNELS (else NCCL_CHANNELS_DEFAULT). Zero on one GPU."""
    if gpus <= 1:
        return 0
    channels = int(env.get("NCCL_MAX_NCHANNELS", NCCL_CHANNELS_DEFAULT))
    peers = 1 + (gpus - 1 if peer_to_peer else 0)
    return channels * peers * nccl_peer_bytes(env)


@dataclass(frozen=True)
class FitBudget:
    """What one GPU must hold: the measured peak plus what the allocator does not see."""

    peak_gib: float
    context_gib: float
    nccl_gib: float
    margin_gib: float

    @property
    def need_gib(self) -> float:
        return self.peak_gib + self.context_gib + self.nccl_gib + self.margin_gib


def fit_budget(
    peak_gib: float, on_gpu: bool, nccl_env: dict, gpus: int, peer_to_peer: bool, fragmentation: float
) -> FitBudget:
    """The fits verdict's figures. On a GPU (the allocator's reserved peak): + the CUDA context,
    + NCCL's buffers, + ``fragmentation`` x the peak. On the CPU (host RSS, gloo) the process's
    RSS already holds its runtime and buffers: only the margin is added."""
    context = CUDA_CONTEXT_BYTES / GIB if on_gpu else 0.0
    nccl = nccl_buffer_bytes(nccl_env, gpus, peer_to_peer) / GIB if on_gpu else 0.0
    return FitBudget(peak_gib, context, nccl, fragmentation * peak_gib)


@dataclass
class PlanRow:
    strategy: str
    gpus: int
    status: str  # completed | failed | oom | not allowed | not run
    note: str = ""
    job_dir: Optional[str] = None
    peak_gib: Optional[float] = None
    memory_basis: Optional[str] = None
    peak_stage: Optional[str] = None
    fits: dict[str, bool] = field(default_factory=dict)  # "<GiB>" -> need_gib fits
    context_gib: Optional[float] = None  # CUDA context (GPU only)
    nccl_gib: Optional[float] = None  # NCCL's buffers (GPU only)
    margin_gib: Optional[float] = None  # fragmentation margin
    need_gib: Optional[float] = None  # peak + the three above: what the fits verdict compares
    compute_s: Optional[float] = None  # median of the measured steps
    compute_min_s: Optional[float] = None
    compute_max_s: Optional[float] = None
    measured_steps: int = 0
    comm_s: Optional[float] = None
    comm_overlapped_s: Optional[float] = None  # the part the code runs behind compute
    step_serial_s: Optional[float] = None
    step_overlapped_s: Optional[float] = None
    overlap: Optional[str] = None  # what the code does: serial | overlapped
    step_s: Optional[float] = None  # the one the code does
    clip_s: Optional[float] = None
    efficiency: Optional[float] = None
    dp: Optional[int] = None  # dp groups, each making its own clip (parallel.dp_degree); None: no job ran
    clips_per_hour_per_gpu: Optional[float] = None  # throughput, from clip_s (metrics.summary)
    clip_efficiency: Optional[float] = None  # latency: clip_s(single, 1 GPU) / (GPUs x clip_s)
    throughput_efficiency: Optional[float] = None  # clips/h/GPU over single's on 1 GPU
    measured_step_s: Optional[float] = None
    measured_peak_gib: Optional[float] = None
    fitted_step_s: Optional[float] = None  # priced at the link fitted to the measured runs
    comm_per_step: Optional[dict] = None  # the simulated rank's collectives per step (comm.per_step)
    peak_tensor_gib: Optional[float] = None  # CPU: the simulated rank's tensors at their peak
    measured_peak_tensor_gib: Optional[float] = None  # CPU: the real runs' (largest rank)


def row_from_results(
    strategy: str,
    gpus: int,
    results: Optional[dict],
    sizes: list[float],
    clip_steps: int = DEFAULT_CLIP_STEPS,
    output_tail: str = "",
    fragmentation: float = 0.05,
) -> PlanRow:
    if results is None:
        return PlanRow(
            strategy, gpus, "not run", "the job wrote no results.json" + (f": {output_tail}" if output_tail else "")
        )
    row = PlanRow(strategy, gpus, results["status"], job_dir=results["job_dir"])
    if results["status"] != "completed":
        row.note = " ".join(str((results.get("root_cause") or {}).get("message", "")).split())[:200]
    if not results["ranks"]:
        return row
    record = results["ranks"][0]
    row.peak_gib, row.peak_stage = peak_and_stage(record)
    row.memory_basis = memory_key(record)
    row.comm_per_step = (record.get("comm") or {}).get("per_step")
    row.peak_tensor_gib = record["memory"].get("peak_tensor_gib")
    if row.peak_gib is not None:
        nccl_env = dict(((results.get("config") or {}).get("nccl") or {}).get("env") or {})
        peer_to_peer = any(kind in (row.comm_per_step or {}) for kind in ("all_to_all", "send", "recv"))
        budget = fit_budget(
            row.peak_gib, row.memory_basis == "peak_reserved_gib", nccl_env, gpus, peer_to_peer, fragmentation
        )
        row.context_gib, row.nccl_gib, row.margin_gib = budget.context_gib, budget.nccl_gib, budget.margin_gib
        row.need_gib = budget.need_gib
        row.fits = {f"{size:g}": budget.need_gib <= size and results["status"] == "completed" for size in sizes}
    prediction = results.get("prediction") or {}
    for key in (
        "compute_s",
        "compute_min_s",
        "compute_max_s",
        "comm_s",
        "comm_overlapped_s",
        "step_serial_s",
        "step_overlapped_s",
        "overlap",
        "step_s",
    ):
        setattr(row, key, prediction.get(key))
    row.measured_steps = prediction.get("measured_steps") or len(record.get("step_times_s") or [])
    row.clip_s = clip_seconds(results, row.step_s, clip_steps)
    row.dp = (record.get("parallel_dims") or {}).get("dp", 1)
    row.clips_per_hour_per_gpu = clips_per_hour_per_gpu(row.clip_s, row.dp, gpus)
    return row


def add_efficiency(rows: list[PlanRow]) -> None:
    """Scaling efficiency = T(single, 1 GPU) / (N x T(N)), from predicted step times; the same of
    the whole clip (latency), and the throughput's: clips/h/GPU over single's on 1 GPU (dp times
    the clip's, with dp groups making clips at once)."""
    single = next((r for r in rows if r.strategy == "single" and r.gpus == 1), None)
    base = single.step_s if single is not None else None
    for row in rows:
        if base and row.step_s:
            row.efficiency = base / (row.gpus * row.step_s)
        if single is not None and single.clip_s and row.clip_s:
            row.clip_efficiency = single.clip_s / (row.gpus * row.clip_s)
        if single is not None and single.clips_per_hour_per_gpu and row.clips_per_hour_per_gpu:
            row.throughput_efficiency = row.clips_per_hour_per_gpu / single.clips_per_hour_per_gpu


def add_measured(rows: list[PlanRow], sweep_dir: Path, model: str, size: str) -> int:
    """Real runs of the same model and size in ``sweep_dir``: their median step and peak
    memory beside the predicted figures. Returns how many rows got one."""
    found = 0
    for path in sorted(sweep_dir.rglob(RESULTS_FILE)):
        real = read_json(path)
        if (
            not real
            or real.get("status") != "completed"
            or real.get("simulated")
            or real.get("shared_gpus")
            or real.get("model") != model
            or real["config"]["workload"]["size"] != size
        ):
            continue
        for row in rows:
            if row.strategy == real.get("strategy") and row.gpus == real.get("world_size"):
                row.measured_step_s = (real.get("summary") or {}).get("step_time_s_median")
                peaks = [r["memory"].get(memory_key(r)) for r in real["ranks"]]
                row.measured_peak_gib = max((p for p in peaks if p is not None), default=None)
                tensors = [r["memory"].get("peak_tensor_gib") for r in real["ranks"]]
                row.measured_peak_tensor_gib = max((t for t in tensors if t is not None), default=None)
                found += 1
    return found


def fit_link(rows: list[PlanRow], latency_s: float, source: str) -> Optional[Link]:
    """The bus bandwidth that makes the serial predictions meet the measured runs: over every
    row with a measured step, sum(bus bytes) / sum(measured step - simulated compute - calls x
    latency). The same GPU computes the same rank's work in both, so what is left of the
    measured step is communication (and whatever else the real ranks waited for). None when
    no measured row communicated or the measured steps leave no time for it."""
    # priced on these two links a step's comm is its calls x latency, and its bus bytes (as
    # seconds), with sends and receives counted once as on any link (full duplex)
    latencies = Link.uniform("latency only", float("inf"), latency_s, "")
    bus_bytes_as_seconds = Link.uniform("1 B/s", 1 / GB, 0.0, "")
    pairs = [
        (
            r.measured_step_s - r.compute_s - sum(comm_times_s(r.comm_per_step, latencies)),
            sum(comm_times_s(r.comm_per_step, bus_bytes_as_seconds)),
        )
        for r in rows
        if r.measured_step_s is not None and r.compute_s is not None and r.comm_per_step
    ]
    seconds, bus_bytes = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    if not pairs or bus_bytes <= 0 or seconds <= 0:
        return None
    gbps = bus_bytes / seconds / GB
    return Link.uniform(
        f"fitted {gbps:.1f} GB/s", gbps, latency_s, f"fitted to {len(pairs)} measured run(s) in {source}"
    )


def add_fitted(rows: list[PlanRow], link: Link) -> None:
    """Every row's step priced at ``link`` instead, serial (the fit compares serial steps)."""
    for row in rows:
        parts = comm_times_s(row.comm_per_step, link) if row.compute_s is not None else None
        if parts is not None:
            row.fitted_step_s = step_range(row.compute_s, *parts)[0]


# ----------------------------------------------------------------------------- output
def _f(value: Optional[float], fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def table(
    rows: list[PlanRow], sizes: list[float], with_measured: bool, clip_steps: int = DEFAULT_CLIP_STEPS
) -> tuple[list[str], list[list[str]]]:
    header = (
        ["strategy", "GPUs", "status", "peak GiB/rank", "peaks in", "+ CUDA ctx", "+ NCCL", "+ margin", "need GiB"]
        + [f"{s:g} GiB" for s in sizes]
        + [
            "compute s/step (min-max, n)",
            "comm s/step",
            "step s serial",
            "step s overlapped",
            "code does",
            "step s",
            f"clip s ({clip_steps} steps)",
            "efficiency",
            "dp",
            "clips/h/GPU",
            "clip eff.",
            "throughput eff.",
        ]
    )
    if with_measured:
        header += ["measured step s", "measured peak GiB", "step s at fitted link"]
    body = []
    for r in rows:
        fits = [("fits" if r.fits[f"{s:g}"] else "OOM") if r.fits else "-" for s in sizes]
        spread = (
            f"{r.compute_s:.3f} ({r.compute_min_s:.3f}-{r.compute_max_s:.3f}, {r.measured_steps})"
            if r.compute_s is not None and r.compute_min_s is not None
            else _f(r.compute_s, ".3f")
        )
        cells = (
            [
                r.strategy,
                str(r.gpus),
                r.status,
                _f(r.peak_gib),
                r.peak_stage or "-",
                _f(r.context_gib),
                _f(r.nccl_gib),
                _f(r.margin_gib),
                _f(r.need_gib),
            ]
            + fits
            + [
                spread,
                _f(r.comm_s, ".4f"),
                _f(r.step_serial_s, ".3f"),
                _f(r.step_overlapped_s, ".3f"),
                r.overlap or "-",
                _f(r.step_s, ".3f"),
                _f(r.clip_s, ".1f"),
                _f(r.efficiency, ".0%"),
                "-" if r.dp is None else str(r.dp),
                _f(r.clips_per_hour_per_gpu, ".1f"),
                _f(r.clip_efficiency, ".0%"),
                _f(r.throughput_efficiency, ".0%"),
            ]
        )
        if with_measured:
            cells += [_f(r.measured_step_s, ".3f"), _f(r.measured_peak_gib), _f(r.fitted_step_s, ".3f")]
        body.append(cells)
    return header, body


def explanation(args: PlanArgs, device: str, memory_basis: str) -> list[str]:
    link = parse_link(args.link)
    return [
        "Measured: " + MEASURED_NOTE.format(device=device) + f"; peak memory is {memory_basis}; "
        "compute s/step is the median of the measured steps (min-max, how many).",
        "Modelled: "
        + ASSUMPTION.format(link=link.name)
        + f" ({link.source}"
        + "".join(f"; {note}" for note in link.notes)
        + "). "
        "Step s serial = compute + comm; overlapped = max(compute, the comm the code runs behind compute) + "
        "the rest; 'code does' says which the strategy's code does (ring attention's K/V pass, FSDP's "
        "all-gathers overlap; Ulysses' all-to-alls and CFG's all-gather block) and step s is that one; "
        f"clip s = {args.clip_steps} sampling steps (clip_steps=; upstream S2V's "
        "default is 40) x step s + the measured VAE decode and motion re-encode of a clip (the latency); "
        "efficiency = T(single, 1 GPU) / (GPUs x T) of the step, clip eff. the same of the clip; "
        "clips/h/GPU = dp x 3600 / clip s / GPUs (the throughput: dp groups each make a clip at once, "
        "parallel.dp_degree) and throughput eff. = clips/h/GPU / single's on 1 GPU.",
        (
            f"Fits: need = peak + the CUDA context ({CUDA_CONTEXT_BYTES / GIB:.2f} GiB, GPU only) + NCCL's buffers "
            f"(GPU, 2+ ranks: per channel and connected peer the LL, LL128 and SIMPLE (NCCL_BUFFSIZE) receive "
            f"buffers and a send header, each rounded up to {NCCL_CUMEM_GRANULARITY >> 20} MiB, from nccl.env; "
            f"defaults {nccl_peer_bytes({}) >> 20} MiB x "
            f"{NCCL_CHANNELS_DEFAULT} channels x (1 + ranks-1 where the job sends point to point or all-to-all)) "
            f"+ a fragmentation margin of {args.fragmentation:.0%} of the peak "
            "(fragmentation=; a chosen figure, not measured), against each memory size."
        ),
    ]


def markdown(title: str, lines: list[str], header: list[str], body: list[list[str]]) -> str:
    out = [
        f"# {title}",
        "",
        *[f"- {line}" for line in lines],
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    out += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(out) + "\n"


def html_page(title: str, lines: list[str], header: list[str], body: list[list[str]]) -> str:
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td class='text'>{html.escape(c)}</td>" if i < 5 else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(cells)
        )
        + "</tr>"
        for cells in body
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS} td.oom {{ background: #fde2e2; }}</style></head><body><h1>{html.escape(title)}</h1>"
        + "<ul>"
        + "".join(f"<li>{html.escape(line)}</li>" for line in lines)
        + "</ul>"
        + "<table><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in header)
        + "</tr>"
        + rows
        + "</table></body></html>\n"
    )


def run_plan(args: PlanArgs) -> list[PlanRow]:
    """Run every allowed simulated job, then print the plan. The files are rewritten after
    every job, so a plan cut short (a time limit) still leaves the rows it has; run again with
    the same ``out`` and the jobs that wrote results are kept, the rest run."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    gpus_here = visible_gpu_count()
    version = code_version()
    args.out.mkdir(parents=True, exist_ok=True)
    # every row first (refused, kept from an earlier run, or still to run), so the files show
    # all that is known at every moment; then the jobs still to run, each replacing its row
    rows: list[PlanRow] = []
    to_run: list[tuple[int, list[str], Path]] = []
    to_clear: list[Path] = []  # job dirs of these settings left by a run cut short
    for strategy in args.strategies:
        for n in args.gpus:
            overrides = job_overrides(args, strategy, n)
            refused = check_candidate(overrides, gpus_here)
            if refused is not None:
                rows.append(PlanRow(strategy, n, "not allowed", refused))
                continue
            job_dir = args.out / "jobs" / f"{strategy}_{n}"
            results, clear = earlier_results(overrides, job_dir, version)
            if results is not None:
                print(f"{strategy} on {n} GPU(s): kept from an earlier run of this code ({job_dir})")
                rows.append(
                    row_from_results(
                        strategy, n, results, args.gpu_memory_gib, args.clip_steps, fragmentation=args.fragmentation
                    )
                )
            else:
                stale = stale_code(job_dir, version) if (job_dir / "0" / RESULTS_FILE).exists() else None
                if stale is not None:
                    print(f"{strategy} on {n} GPU(s): {job_dir} {stale}")
                to_run.append((len(rows), overrides, job_dir))
                to_clear.extend([job_dir] if clear else [])
                rows.append(PlanRow(strategy, n, "not run", "its simulated job has not run (yet)"))
    for job_dir in to_clear:  # only once every job dir has been checked
        shutil.rmtree(job_dir)
    write_plan(args, rows)
    with Progress() as progress:
        task = progress.add_task("simulated jobs", total=len(to_run))
        for index, overrides, job_dir in to_run:
            row = rows[index]
            progress.update(task, description=f"{row.strategy} on {row.gpus} GPU(s)")
            job_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(job_dir / CODE_VERSION_FILE, version + "\n")
            try:
                results, output_tail = run_simulated_job(overrides, job_dir)
            except PlanStopped:
                rows[index] = PlanRow(
                    row.strategy,
                    row.gpus,
                    "interrupted",
                    "the plan was stopped during this job; the same command again runs it",
                    job_dir=str(job_dir / "0"),
                )
                write_plan(args, rows)
                raise
            rows[index] = row_from_results(
                row.strategy, row.gpus, results, args.gpu_memory_gib, args.clip_steps, output_tail, args.fragmentation
            )
            write_plan(args, rows)
            progress.advance(task)
    title, lines, header, body = write_plan(args, rows)
    console = Console()
    if not console.is_terminal:  # a log or a pipe: rich would squeeze the columns to 80 characters
        print(markdown(title, lines, header, body) + f"plan: {args.out / 'plan.md'}  {args.out / 'plan.html'}")
        return rows
    shown = Table(title=title)
    for name in header:
        shown.add_column(name)
    for cells in body:
        shown.add_row(*cells)
    console.print(shown)
    for line in lines:
        console.print(f"- {line}", markup=False)
    console.print(f"plan: {args.out / 'plan.md'}  {args.out / 'plan.html'}", markup=False)
    return rows


def write_plan(args: PlanArgs, rows: list[PlanRow]) -> tuple[str, list[str], list[str], list[list[str]]]:
    """Efficiency, measured runs and the fitted link for ``rows``, then plan.md, plan.html and
    plan.json; returns (title, notes, header, body)."""
    add_efficiency(rows)
    cfg = compose_config(args.overrides)
    model, size = str(cfg.model.name), str(cfg.workload.size)
    parse_size(size)
    with_measured = args.measured is not None and add_measured(rows, args.measured, model, size) > 0
    device = _device_name(rows)
    basis = next((r.memory_basis for r in rows if r.memory_basis), "peak_reserved_gib")
    title = f"Plan: model={model} workload.size={size}, link {args.link}"
    lines = explanation(args, device, basis) + [
        f"Command: python -m wan_exp.plan {' '.join(sys.argv[1:])}",
        f"Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; device: {device}; steps measured per job: "
        f"{steps_run(cfg.workload) - int(cfg.workload.warmup_steps)} (warm-up {cfg.workload.warmup_steps})",
    ]
    if args.measured is not None:
        lines.append(
            f"Measured runs from {args.measured}: "
            + ("shown beside the prediction" if with_measured else "none of the same model and size")
        )
        latency = parse_link(args.link).curve("all_reduce").latency_s if with_measured else 0.0
        fitted = fit_link(rows, latency, str(args.measured)) if with_measured else None
        if fitted is not None:
            add_fitted(rows, fitted)
            lines.append(
                f"Fitted link: {fitted.name} ({fitted.source}); 'step s at fitted link' prices every "
                "row's collectives at it instead of the default figures"
            )
    lines += [f"{r.strategy} on {r.gpus} GPU(s), {r.status}: {r.note}" for r in rows if r.note]
    header, body = table(rows, args.gpu_memory_gib, with_measured, args.clip_steps)
    write_text_atomic(args.out / "plan.md", markdown(title, lines, header, body))
    write_text_atomic(args.out / "plan.html", html_page(title, lines, header, body))
    write_json_atomic(
        args.out / "plan.json",
        {
            "title": title,
            "notes": lines,
            "overrides": args.overrides,
            "code_version": code_version(),
            "gpu_memory_gib": args.gpu_memory_gib,
            "link": args.link,
            "rows": [asdict(r) for r in rows],
        },
    )
    return title, lines, header, body


def _device_name(rows: list[PlanRow]) -> str:
    for row in rows:
        results = read_results(Path(row.job_dir)) if row.job_dir else None
        if results and results["ranks"]:
            return results["ranks"][0].get("device_name") or "cpu"
    return "unknown"


def main(argv: Optional[Sequence[str]] = None) -> int:
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signals can be caught
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)} if in_main_thread else {}
    args: Optional[PlanArgs] = None
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        rows = run_plan(args)
    except ConfigError as err:
        print(f"wan_exp.plan: {err}", file=sys.stderr)
        return 2
    except PlanStopped as stop:
        where = f"the rows so far are in {args.out / 'plan.md'}; " if args is not None else ""
        print(
            f"wan_exp.plan: stopped by {stop}; {where}the same command again keeps the jobs done and runs the rest",
            file=sys.stderr,
        )
        return 128 + getattr(signal, str(stop)).value
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if any(r.status == "completed" for r in rows) else 1
