"""The dashboard's upstream section: each ``workload=upstream`` row beside the wan-exp
``workload=generate`` row of the same strategy, rank count and other settings, as ratios.

Rows pair when their variants differ only in the keys that choose or feed the upstream run
(:data:`UPSTREAM_ONLY_KEYS`), so ``python launch.py -m workload=generate,upstream
parallel=ulysses,fsdp_fixed ...`` gives one ratio line per strategy. A ratio above 1 says
upstream's run takes longer (or holds more memory) than wan-exp's on the same split.
"""

from __future__ import annotations

from typing import Optional

from wan_exp.report.table import Row, column, format_value

UPSTREAM = "upstream"
GENERATE = "generate"
# Overrides that tell an upstream job from its wan-exp twin without changing what is compared.
UPSTREAM_ONLY_KEYS = (
    "workload",
    "workload.repo",
    "workload.offload_model",
    "workload.convert_model_dtype",
    "model.checkpoint_dir",
)
RATIO_COLUMNS = ("step s", "s/clip", "init s", "NVML used GiB", "host RSS GiB")


def row_workload(row: Row) -> Optional[str]:
    return row.jobs[0].get("workload") if row.jobs else None


def pairing_key(row: Row) -> tuple:
    kept = [o for o in row.variant.split() if o.split("=", 1)[0].lstrip("+~") not in UPSTREAM_ONLY_KEYS]
    return row.strategy, row.world_size, " ".join(sorted(kept))


def upstream_pairs(rows: list[Row]) -> list[tuple[Row, Row]]:
    """(upstream row, wan-exp generate row) for every upstream row that has a twin."""
    generate = {pairing_key(r): r for r in rows if row_workload(r) == GENERATE}
    return [(r, generate[pairing_key(r)]) for r in rows if row_workload(r) == UPSTREAM and pairing_key(r) in generate]


def ratio(upstream: Row, wan_exp: Row, title: str) -> Optional[float]:
    mine, theirs = wan_exp.value(column(title)), upstream.value(column(title))
    return theirs / mine if mine and theirs is not None else None


def ratio_cells(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and text cells of the upstream / wan-exp table (no rows when nothing pairs)."""
    header = ["strategy", "ranks", "variant"] + [f"{t} upstream/wan-exp" for t in RATIO_COLUMNS]
    body = []
    for up, mine in upstream_pairs(rows):
        body.append(
            [up.strategy, str(up.world_size), pairing_key(up)[2] or "—"]
            + [format_value(ratio(up, mine, t), 2) for t in RATIO_COLUMNS]
        )
    return header, body
