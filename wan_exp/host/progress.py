"""Live progress of a running job on the console, from the ranks' heartbeats.

Each rank rewrites ``<job>/progress/rank_<r>.json`` at every phase and step
(wan_exp.rank.runtime); while the job runs, wan_exp.host.job redraws one table from them with
rich: per rank the phase, step i/n and the time since the job started, under a title
"job k of n". Nothing is drawn when the output is not a terminal (logs, CI, pipes).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

REFRESH_PER_S = 2


def progress_table(
    title: str, beats: dict[int, dict], world_size: int, total_steps: Optional[int], started_at: float, now: float
) -> Table:
    """One row per rank: phase, step i/n (steps count from 1), seconds since the job
    started and since the rank's last heartbeat."""
    table = Table(title=title, title_justify="left")
    for column in ("rank", "phase", "step", "elapsed", "last beat"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for rank in range(world_size):
        beat = beats.get(rank)
        if beat is None:
            table.add_row(str(rank), "starting", "-", f"{now - started_at:.0f}s", "-")
            continue
        step = "-" if beat.get("step") is None else f"{beat['step'] + 1}/{total_steps or '?'}"
        where = " ".join(filter(None, (str(beat["phase"]), beat.get("detail"))))  # "vae_decode decode frame 3/21"
        table.add_row(str(rank), where, step, f"{now - started_at:.0f}s", f"{now - beat['time']:.0f}s ago")
    return table


class ProgressDisplay:
    """Redraws the table in place while a job runs; does nothing off a terminal."""

    def __init__(
        self, title: str, world_size: int, total_steps: Optional[int], stream: Optional[TextIO] = None
    ) -> None:
        self.title, self.world_size, self.total_steps = title, world_size, total_steps
        stream = sys.stdout if stream is None else stream
        self.started_at = time.time()
        self._live: Optional[Live] = None
        if stream.isatty():
            self._live = Live(console=Console(file=stream), refresh_per_second=REFRESH_PER_S, transient=True)

    def __enter__(self) -> ProgressDisplay:
        if self._live is not None:
            self._live.start()
        return self

    def update(self, beats: dict[int, dict]) -> None:
        if self._live is not None:
            self._live.update(
                progress_table(self.title, beats, self.world_size, self.total_steps, self.started_at, time.time())
            )

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.stop()
