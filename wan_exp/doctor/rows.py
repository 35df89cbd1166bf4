"""One row of the doctor's table, and how rows decide the exit status."""

from __future__ import annotations

from dataclasses import asdict, dataclass

OK = "ok"
WARN = "warn"
FAIL = "FAIL"  # upper case so that it stands out in the table


@dataclass
class Row:
    check: str  # what was looked at: "torch", "GPU 0", "NCCL_BLOCKING_WAIT", ...
    status: str  # OK, WARN or FAIL
    value: str  # what was found
    hint: str = ""  # what it means and what to do; empty when there is nothing to do

    def as_dict(self) -> dict:
        return asdict(self)


def exit_status(rows: list[Row]) -> int:
    """1 when any row blocks a run (FAIL), else 0. Warnings never fail the doctor."""
    return 1 if any(row.status == FAIL for row in rows) else 0


def format_table(rows: list[Row]) -> str:
    """Aligned text, one line per row (CHECK  STATUS  VALUE) and its hint on the line below,
    under the value, so that long hints never push the columns apart."""
    header = Row("CHECK", "STATUS", "VALUE")
    check_width = max(len(r.check) for r in [header, *rows])
    status_width = max(len(r.status) for r in [header, *rows])
    indent = " " * (check_width + status_width + 4)
    lines = []
    for r in [header, *rows]:
        lines.append(f"{r.check:<{check_width}}  {r.status:<{status_width}}  {r.value}".rstrip())
        if r.hint:
            lines.append(f"{indent}-> {r.hint}")
    return "\n".join(lines)
