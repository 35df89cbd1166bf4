"""Communication priced on a link, per collective kind and message size: a simulated rank's predicted step.

A simulated job (``launcher.simulate_world_size``) measures one rank's compute and counts the
collectives it issued (metrics/comm.py: calls, ``bytes``, ``bus_bytes`` and the message sizes
per kind and step) but moves no data. This module turns those counts into time on a link
(``launcher.link``): one curve per collective kind (all-reduce, all-gather, reduce-scatter,
all-to-all, send/recv), each either

- **sourced** (``LINKS``): ``time = latency + bus bytes / bus bandwidth``, the two figures taken
  from published nccl-tests results (docs/rehearsal.md lists each with its source, and says
  where none was found), so the bus bandwidth grows with the message size towards its peak; or
- **measured**: a file of nccl-tests output (``all_reduce_perf ...`` or ``python -m
  wan_exp.linkbench``), its bus bandwidth interpolated linearly in the message size.

Point-to-point is full duplex: a step's sends and receives travel at once (a ring sends to
one neighbour while it receives from the other), so they cost the larger of the two, not the
sum. A prediction is a range (docs/rehearsal.md, "Overlap"):

    serial      = compute + every call's time
    overlapped  = max(compute, time of the calls the code overlaps) + the other calls' time

and says which of the two the strategy's code does (``overlap_of``). No torch import.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wan_exp.config import ConfigError
from wan_exp.metrics.messages import parse_message_key
from wan_exp.parallel.dims import fsdp_shards

GB = 1e9  # link figures are decimal GB/s, as nccl-tests prints them
# the curve kinds; the counter's kinds map onto them (CURVE_OF)
CURVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
CURVE_OF = {
    "all_reduce": "all_reduce",
    "all_gather": "all_gather",
    "reduce_scatter": "reduce_scatter",
    "all_to_all": "all_to_all",
    "send": "send_recv",
    "recv": "send_recv",
    # rooted collectives: priced as an all-gather's bus bandwidth (bus factor 1, metrics/comm.py)
    "broadcast": "all_gather",
    "reduce": "all_gather",
    "gather": "all_gather",
    "scatter": "all_gather",
}
P2P = ("send", "recv")
ASSUMPTION = (
    "comm priced at {link}: per call latency + bus bytes / bus bandwidth of its kind at its size; "
    "sends and receives of a step overlap each other (full duplex)"
)


@dataclass(frozen=True)
class SourcedCurve:
    """``time = latency + bus_bytes / bus bandwidth`` of one collective kind on one link."""

    bus_gbps: float
    latency_s: float
    source: str

    def time_s(self, nbytes: float, bus_bytes: float) -> float:
        return self.latency_s + bus_bytes / (self.bus_gbps * GB)

    def bus_gbps_at(self, nbytes: float, bus_factor: float = 1.0) -> float:
        """nccl-tests' busbw this curve gives a message of ``nbytes`` (bus factor as nccl-tests')."""
        bus = nbytes * bus_factor
        return bus / self.time_s(nbytes, bus) / GB


@dataclass(frozen=True)
class MeasuredCurve:
    """nccl-tests rows of one collective: (size bytes, time s, busbw GB/s), sizes ascending.

    A message between two measured sizes gets the bus bandwidth interpolated linearly in the
    size; one below the smallest takes at least the smallest row's time (the latency floor);
    one above the largest moves at the largest row's bus bandwidth."""

    sizes: tuple[int, ...]
    times_s: tuple[float, ...]
    bus_gbps: tuple[float, ...]
    source: str

    @property
    def latency_s(self) -> float:
        """The smallest measured message's time."""
        return self.times_s[0]

    def bus_gbps_at(self, nbytes: float, bus_factor: float = 1.0) -> float:
        if nbytes <= self.sizes[0]:
            return self.bus_gbps[0]
        if nbytes >= self.sizes[-1]:
            return self.bus_gbps[-1]
        i = bisect.bisect_right(self.sizes, nbytes)
        s0, s1 = self.sizes[i - 1], self.sizes[i]
        b0, b1 = self.bus_gbps[i - 1], self.bus_gbps[i]
        return b0 + (b1 - b0) * (nbytes - s0) / (s1 - s0)

    def time_s(self, nbytes: float, bus_bytes: float) -> float:
        if nbytes <= self.sizes[0]:
            return self.times_s[0]
        bandwidth = self.bus_gbps_at(nbytes)
        return bus_bytes / (bandwidth * GB) if bandwidth > 0 else float("inf")


Curve = SourcedCurve | MeasuredCurve


@dataclass(frozen=True)
class Link:
    """A link's curve per collective kind (CURVES)."""

    name: str
    curves: Mapping[str, Curve]
    source: str
    notes: tuple[str, ...] = field(default=())

    @classmethod
    def uniform(cls, name: str, bus_gbps: float, latency_s: float, source: str) -> Link:
        """One bus bandwidth and latency for every kind (``launcher.link=<GB/s>``, a fitted link)."""
        curve = SourcedCurve(bus_gbps, latency_s, source)
        return cls(name, {kind: curve for kind in CURVES}, source)

    def curve(self, kind: str) -> Curve:
        return self.curves[CURVE_OF.get(kind, "all_gather")]

    def time_s(self, kind: str, figures: Mapping[str, Any]) -> float:
        """Time of the calls ``figures`` (a ``comm.per_step`` entry) of ``kind``: per message size
        where the counter recorded sizes (``messages``), else at the mean size per call."""
        curve = self.curve(kind)
        messages = figures.get("messages")
        if messages:
            total = 0.0
            for key, calls in messages.items():
                nbytes, bus_factor = parse_message_key(key)
                total += calls * curve.time_s(nbytes, nbytes * bus_factor)
            return total
        calls = figures["count"]
        if not calls:
            return 0.0
        return calls * curve.time_s(figures["bytes"] / calls, figures["bus_bytes"] / calls)


# ----------------------------------------------------------------------------- sourced links
# Each figure's source is in docs/rehearsal.md ("Link curves"), with the URL; "no source" there
# means none was found and the figure is an estimate, said so in the link's notes.
_NCCL_TESTS_212 = "https://github.com/NVIDIA/nccl-tests/issues/212"
_NCCL_2169 = "https://github.com/NVIDIA/nccl/issues/2169"
_NCCL_TESTS_268 = "https://github.com/NVIDIA/nccl-tests/issues/268"
_NCCL_1259 = "https://github.com/NVIDIA/nccl/issues/1259"
_ALAYA = "https://docs.alayanew.com/en/docs/tech-blog/2026-05-06-nccl-tests"
_NCCL_1530 = "https://github.com/NVIDIA/nccl/issues/1530"
_NCCL_TESTS_267 = "https://github.com/NVIDIA/nccl-tests/issues/267"
_NCCL_TESTS_214 = "https://github.com/NVIDIA/nccl-tests/issues/214"
_TINYGRAD_P2P = "https://github.com/tinygrad/open-gpu-kernel-modules (README)"


def _sourced(name: str, figures: dict[str, tuple[float, str, float, str]], notes: tuple[str, ...]) -> Link:
    """figures: kind -> (bus GB/s, its source, latency s, its source)."""
    curves = {
        kind: SourcedCurve(gbps, latency, f"bandwidth: {bw_src}; latency: {lat_src}")
        for kind, (gbps, bw_src, latency, lat_src) in figures.items()
    }
    return Link(name, curves, f"nccl-tests figures, docs/rehearsal.md (Link curves), {name}", notes)


_NO_SOURCE = "no published figure found (estimate)"
LINKS: dict[str, Link] = {
    "nvlink4": _sourced(
        "nvlink4",
        {
            "all_reduce": (480.0, _NCCL_TESTS_212, 6e-6, _NCCL_1259),
            "all_gather": (370.0, _NCCL_TESTS_212, 6e-6, f"{_NO_SOURCE}: all-reduce's"),
            "reduce_scatter": (370.0, _NCCL_TESTS_212, 6e-6, f"{_NO_SOURCE}: all-reduce's"),
            "all_to_all": (335.0, _NCCL_2169, 6e-6, f"{_NO_SOURCE}: all-reduce's"),
            "send_recv": (180.0, _NCCL_TESTS_268, 6e-6, f"{_NO_SOURCE}: all-reduce's"),
        },
        ("latency of every kind: all-reduce's 6 us (2 GPUs, CUDA graphs); eager launches add host time",),
    ),
    "nvlink3": _sourced(
        "nvlink3",
        {
            "all_reduce": (240.0, _ALAYA, 6e-6, f"{_NO_SOURCE}: NVLink 4's"),
            "all_gather": (185.0, f"{_NO_SOURCE}: all-reduce x 370/480 as on NVLink 4", 6e-6, _NO_SOURCE),
            "reduce_scatter": (185.0, f"{_NO_SOURCE}: all-reduce x 370/480 as on NVLink 4", 6e-6, _NO_SOURCE),
            "all_to_all": (185.0, f"{_NO_SOURCE}: all-reduce x 370/480 as on NVLink 4", 6e-6, _NO_SOURCE),
            "send_recv": (185.0, f"{_NO_SOURCE}: all-reduce x 370/480 as on NVLink 4", 6e-6, _NO_SOURCE),
        },
        ("only the all-reduce bandwidth has a source; the rest are estimates",),
    ),
    "pcie5": _sourced(
        "pcie5",
        {
            kind: (
                40.0,
                _ALAYA if kind == "all_reduce" else f"{_NO_SOURCE}: all-reduce's",
                42e-6,
                f"{_NO_SOURCE}: PCIe 4's",
            )
            for kind in CURVES
        },
        ("only the all-reduce bandwidth has a source; the rest are estimates",),
    ),
    "pcie4": _sourced(
        "pcie4",
        {
            kind: (
                24.0,
                _TINYGRAD_P2P if kind == "all_reduce" else f"{_NO_SOURCE}: all-reduce's",
                42e-6,
                _NCCL_1530 if kind == "all_reduce" else f"{_NO_SOURCE}: all-reduce's",
            )
            for kind in CURVES
        },
        ("only the all-reduce has sources (RTX 4090s, peer to peer on); the other kinds borrow its figures",),
    ),
    "ib400": _sourced(
        "ib400",
        {
            kind: (
                48.0,
                _NCCL_TESTS_267,
                32e-6,
                _NCCL_TESTS_214 if kind == "send_recv" else f"{_NO_SOURCE}: send/recv's",
            )
            for kind in CURVES
        },
        ("one NDR NIC per GPU; the latency is a two-node send/recv of unstated network",),
    ),
}
CUSTOM_LATENCY_S = 6e-6  # launcher.link=<GB/s>: NVLink 4's sourced all-reduce latency


# ----------------------------------------------------------------------------- measured curves
# nccl-tests' binary names -> curve kind (the "Collective test starting: <name>" line)
NCCL_TESTS_NAMES = {
    "all_reduce_perf": "all_reduce",
    "all_gather_perf": "all_gather",
    "reduce_scatter_perf": "reduce_scatter",
    "alltoall_perf": "all_to_all",
    "sendrecv_perf": "send_recv",
}
_STARTING = re.compile(r"Collective test starting:\s*(\w+)")


class CurveFileError(ValueError):
    """A curve file that cannot be read as nccl-tests output."""


def read_curve_file(path: Path) -> dict[str, MeasuredCurve]:
    """The tables of an nccl-tests output file (one or several tests, each announced by
    ``# Collective test starting: <name>_perf``, or one test named by the file name, e.g.
    ``all_gather_perf.txt``): kind -> curve from the out-of-place columns (size, time,
    busbw). Raises CurveFileError saying what is missing."""
    text = path.read_text(errors="replace")
    kind = next((k for name, k in NCCL_TESTS_NAMES.items() if name in path.name), None)
    columns: dict[str, int] | None = None
    rows: dict[str, list[tuple[int, float, float]]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        started = _STARTING.search(line)
        if started:
            kind = NCCL_TESTS_NAMES.get(started.group(1))
            if kind is None:
                raise CurveFileError(f"{path}:{number}: test {started.group(1)!r} is none of {list(NCCL_TESTS_NAMES)}")
            continue
        words = line.lstrip("#").split()
        if line.startswith("#") and "size" in words and "busbw" in words and "time" in words:
            columns = {name: words.index(name) for name in ("size", "time", "busbw")}
            continue
        if line.startswith("#") or not words or not words[0].isdigit():
            continue
        if columns is None:
            raise CurveFileError(
                f"{path}:{number}: a data row before the header line "
                "('#  size  count  type  redop  root  time  algbw  busbw ...')"
            )
        if kind is None:
            raise CurveFileError(
                f"{path}: which collective is it? Name the file after the nccl-tests binary "
                f"(e.g. all_gather_perf.txt) or keep its '# Collective test starting:' line"
            )
        try:
            size = int(words[columns["size"]])
            time_us = float(words[columns["time"]])
            busbw = float(words[columns["busbw"]])
        except (IndexError, ValueError) as err:
            raise CurveFileError(f"{path}:{number}: not an nccl-tests row ({err}): {line.strip()!r}") from err
        rows.setdefault(kind, []).append((size, time_us * 1e-6, busbw))
    if not rows:
        raise CurveFileError(f"{path}: no nccl-tests rows (size count type ... time algbw busbw) found")
    curves = {}
    for kind, found in rows.items():
        found = sorted({size: (size, t, b) for size, t, b in found}.values())  # one row per size
        curves[kind] = MeasuredCurve(
            tuple(r[0] for r in found), tuple(r[1] for r in found), tuple(r[2] for r in found), f"measured: {path}"
        )
    return curves


def measured_link(path: Path) -> Link:
    """A link from a curve file; a kind it lacks borrows the all-reduce curve (else the first
    one): bus bandwidth is meant to compare across collectives (nccl-tests' definition)."""
    curves = read_curve_file(path)
    stand_in = curves.get("all_reduce") or next(iter(curves.values()))
    missing = [kind for kind in CURVES if kind not in curves]
    notes = (
        (
            (
                f"not in the file: {', '.join(missing)}; priced with the "
                f"{'all_reduce' if 'all_reduce' in curves else next(iter(curves))} curve"
            ),
        )
        if missing
        else ()
    )
    return Link(
        f"measured {path.name}",
        {kind: curves.get(kind, stand_in) for kind in CURVES},
        f"measured: {path} ({', '.join(curves)})",
        notes,
    )


def parse_link(text: str) -> Link:
    """``launcher.link``: a name of LINKS, a bus bandwidth in GB/s, or an nccl-tests output
    file. Raises ConfigError naming the setting."""
    key = str(text).strip()
    if key.lower() in LINKS:
        return LINKS[key.lower()]
    try:
        gbps = float(key)
    except ValueError:
        gbps = 0.0
    if gbps > 0:
        return Link.uniform(
            f"{gbps:g} GB/s",
            gbps,
            CUSTOM_LATENCY_S,
            f"given: {gbps:g} GB/s bus bandwidth for every collective, {CUSTOM_LATENCY_S * 1e6:g} us per call",
        )
    path = Path(key).expanduser()
    if key and path.is_file():
        try:
            return measured_link(path)
        except CurveFileError as err:
            raise ConfigError(f"launcher.link={text!r}: {err}") from err
    raise ConfigError(
        f"launcher.link={text!r} is not a link; use one of {', '.join(LINKS)}, a bus bandwidth "
        "in GB/s (e.g. launcher.link=100), or a file of nccl-tests output "
        "(e.g. from python -m wan_exp.linkbench)"
    )


# ----------------------------------------------------------------------------- a step's time
@dataclass(frozen=True)
class Overlap:
    """Which collective kinds the strategy's code runs while it computes, and why."""

    kinds: tuple[str, ...]
    reason: str

    @property
    def mode(self) -> str:
        return "overlapped" if self.kinds else "serial"


SERIAL = Overlap((), "every collective blocks the computation that needs its result")


def overlap_of(config: Mapping[str, Any]) -> Overlap:
    """What the strategy's code overlaps, from the job's config (a plain dict):

    - ring attention (``parallel.ring_degree`` > 1) without autograd: the next K/V chunk's
      send/recv runs while the current chunk's attention computes (parallel/ring.py); under
      autograd (train_lora) the exchange blocks;
    - FSDP (``parallel.fsdp.degree`` not 0): each unit's all-gather runs on FSDP's own stream, issued
      while the previous unit computes;
    - Ulysses' all-to-alls and CFG's all-gather block (their result is needed at once)."""
    parallel = config.get("parallel") or {}
    workload = str((config.get("workload") or {}).get("name", ""))
    kinds: list[str] = []
    reasons = []
    if int(parallel.get("ring_degree", 1) or 1) > 1 and workload != "train_lora":
        kinds += ["send", "recv"]
        reasons.append("ring attention sends the next K/V chunk while it computes on the current one")
    if fsdp_shards((parallel.get("fsdp") or {}).get("degree", 0)):
        kinds.append("all_gather")
        reasons.append(
            "FSDP all-gathers the next unit on its own stream while the current one computes"
            + (
                " (CFG's per-step all-gather is counted with them)"
                if int(parallel.get("cfg_degree", 1) or 1) > 1
                else ""
            )
        )
    return Overlap(tuple(kinds), "; ".join(reasons)) if kinds else SERIAL


def comm_times_s(
    per_step: Mapping[str, Any] | None, link: Link, overlapped: tuple[str, ...] = ()
) -> tuple[float, float] | None:
    """(time of the calls the code overlaps, time of the rest) of one step on ``link``;
    ``per_step`` is a rank record's ``comm.per_step``. Sends and receives count once, the
    larger of the two. None when the record measured no step."""
    if per_step is None:
        return None
    times = {kind: link.time_s(kind, figures) for kind, figures in per_step.items() if kind != "barrier"}
    p2p = max((times.pop(kind) for kind in P2P if kind in times), default=None)
    hidden = sum(t for kind, t in times.items() if kind in overlapped)
    blocking = sum(t for kind, t in times.items() if kind not in overlapped)
    if p2p is not None:
        if "send" in overlapped:
            hidden += p2p
        else:
            blocking += p2p
    return hidden, blocking


def comm_time_s(per_step: Mapping[str, Any] | None, link: Link) -> float | None:
    """Seconds the collectives of one step take on ``link`` one after the other (serial)."""
    parts = comm_times_s(per_step, link)
    return None if parts is None else sum(parts)


def step_range(compute_s: float, hidden_s: float, blocking_s: float) -> tuple[float, float]:
    """(serial, overlapped) step: compute + all comm, and max(compute, overlapped comm) + the rest."""
    return compute_s + hidden_s + blocking_s, max(compute_s, hidden_s) + blocking_s


def predict_step(record: Mapping[str, Any], link: Link, overlap: Overlap = SERIAL) -> dict[str, Any]:
    """A simulated rank's predicted step: the measured compute (median of the measured steps,
    with their min, max and count), the comm on ``link`` (overlapped and blocking parts), the
    serial and overlapped step, and ``step_s``, the one the strategy's code does. None figures
    where no step was measured."""
    steps = list(record.get("step_times_s") or [])
    compute = record.get("step_time_s_median")  # the rank's own (metrics.summary.rank_figures)
    parts = comm_times_s((record.get("comm") or {}).get("per_step"), link, overlap.kinds)
    prediction: dict[str, Any] = {
        "compute_s": compute,
        "compute_min_s": min(steps) if steps else None,
        "compute_max_s": max(steps) if steps else None,
        "measured_steps": len(steps),
        "comm_s": sum(parts) if parts else None,
        "comm_overlapped_s": parts[0] if parts else None,
        "step_serial_s": None,
        "step_overlapped_s": None,
        "step_s": None,
        "overlap": overlap.mode,
        "overlap_reason": overlap.reason,
        "overlapped_kinds": list(overlap.kinds),
        "link": link.name,
        "link_source": link.source,
        "link_notes": list(link.notes),
        "assumption": ASSUMPTION.format(link=link.name),
    }
    if compute is not None and parts is not None:
        serial, overlapped = step_range(compute, *parts)
        prediction.update(
            step_serial_s=serial, step_overlapped_s=overlapped, step_s=overlapped if overlap.kinds else serial
        )
    return prediction
