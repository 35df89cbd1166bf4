"""Communication priced at a link's bandwidth and latency: a simulated rank's predicted step time.

A simulated job (``launcher.simulate_world_size``) measures one rank's compute and counts the
collectives it issued (metrics/comm.py: calls, ``bytes`` and ``bus_bytes`` per kind and step)
but moves no data. This module turns those counts into time on a link (``launcher.link``)::

    comm time of a step = sum over collective calls of (latency + bus_bytes / bus bandwidth)
    predicted step time = measured compute time of the step + comm time

No overlap of communication with compute is assumed (every collective adds its whole time),
so the prediction is an upper bound where a strategy overlaps (FSDP prefetch, ring attention).
The figures and their sources are in docs/rehearsal.md. No torch import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

GB = 1e9  # link figures are decimal GB/s, as nccl-tests prints them
ASSUMPTION = ("comm priced at {link}: per call latency + bus bytes / bus bandwidth, summed per step; "
              "no overlap with compute assumed")


@dataclass(frozen=True)
class Link:
    """Bus bandwidth (nccl-tests' busBw, GB/s) for all-reduce and for the other collectives,
    and a per-call latency."""

    name: str
    all_reduce_gbps: float
    other_gbps: float
    latency_s: float
    source: str

    def time_s(self, kind: str, calls: float, bus_bytes: float) -> float:
        """``calls`` collectives of ``kind`` moving ``bus_bytes`` in all over this link."""
        bandwidth = self.all_reduce_gbps if kind == "all_reduce" else self.other_gbps
        return calls * self.latency_s + bus_bytes / (bandwidth * GB)


LINKS: dict[str, Link] = {
    "nvlink4": Link("nvlink4", 470.0, 370.0, 20e-6,
                    "NVLink 4 (H100/H200 SXM, 450 GB/s line rate): NVIDIA's ~370 GB/s bus bandwidth for "
                    "non-all-reduce collectives, 460-480 GB/s all-reduce on 8 GPUs (nccl-tests); latency estimate"),
    "nvlink3": Link("nvlink3", 240.0, 190.0, 20e-6,
                    "NVLink 3 (8xA100): 230-250 GB/s all-reduce (nccl-tests); other collectives estimated "
                    "at the same 370/470 ratio as NVLink 4; latency estimate"),
    "pcie5": Link("pcie5", 40.0, 40.0, 30e-6,
                  "PCIe 5 (8xH100 PCIe): 35-45 GB/s all-reduce (nccl-tests); other collectives and latency "
                  "are estimates"),
    "pcie4": Link("pcie4", 20.0, 20.0, 30e-6,
                  "PCIe 4: estimate, half of PCIe 5 (x16 gives 32 GB/s per direction against 64)"),
    "ib400": Link("ib400", 45.0, 45.0, 50e-6,
                  "InfiniBand NDR 400 Gb/s (50 GB/s line rate) per rank: estimate, about 90 % of line rate "
                  "as bus bandwidth; latency estimate"),
}
CUSTOM_LATENCY_S = 20e-6  # launcher.link=<GB/s>


def parse_link(text: str) -> Link:
    """``launcher.link``: a name of LINKS or a bus bandwidth in GB/s. Raises ConfigError
    naming the setting."""
    from wan_exp.config import ConfigError

    key = str(text).strip().lower()
    if key in LINKS:
        return LINKS[key]
    try:
        gbps = float(key)
    except ValueError:
        gbps = 0.0
    if gbps > 0:
        return Link(f"{gbps:g} GB/s", gbps, gbps, CUSTOM_LATENCY_S,
                    f"given: {gbps:g} GB/s bus bandwidth for every collective, {CUSTOM_LATENCY_S * 1e6:g} us per call")
    raise ConfigError(f"launcher.link={text!r} is not a link; use one of {', '.join(LINKS)} "
                      "or a bus bandwidth in GB/s, e.g. launcher.link=100")


def comm_time_s(per_step: Optional[dict], link: Link) -> Optional[float]:
    """Seconds the collectives of one step take on ``link``: ``per_step`` is a rank record's
    ``comm.per_step`` (kind -> {"count", "bytes", "bus_bytes"}; counts may be fractional,
    a mean over steps). None when the record measured no step."""
    if per_step is None:
        return None
    return sum(link.time_s(kind, f["count"], f["bus_bytes"]) for kind, f in per_step.items() if kind != "barrier")


def predict_step(record: dict, link: Link) -> dict[str, Any]:
    """A simulated rank's predicted step: {"compute_s" (median measured step, the rank's own
    compute), "comm_s", "step_s", "assumption"}; None figures where no step was measured."""
    compute = record.get("step_time_s_median")  # the rank's own (metrics.summary.rank_figures)
    comm = comm_time_s((record.get("comm") or {}).get("per_step"), link)
    return {"compute_s": compute, "comm_s": comm,
            "step_s": compute + comm if compute is not None and comm is not None else None,
            "link": link.name, "assumption": ASSUMPTION.format(link=link.name)}
