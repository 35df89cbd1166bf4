"""Command line: ``python -m wan_exp.doctor [--json] [--gpus N]``; see the package docstring."""

from __future__ import annotations

import argparse
import json
import sys

from wan_exp.doctor import diagnose, exit_status, format_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wan_exp.doctor", description="Check this machine and environment for wan-exp runs."
    )
    parser.add_argument("--json", action="store_true", help="print {'exit_status', 'rows'} as JSON")
    parser.add_argument(
        "--gpus",
        type=int,
        default=0,
        metavar="N",
        help="fail unless at least N GPUs are visible (e.g. the run's launcher.nproc_per_node)",
    )
    args = parser.parse_args(argv)
    if args.gpus < 0:
        parser.error(f"--gpus {args.gpus}: give a number of GPUs >= 0")
    rows = diagnose(required_gpus=args.gpus)
    status = exit_status(rows)
    if args.json:
        print(json.dumps({"exit_status": status, "rows": [row.as_dict() for row in rows]}, indent=2))
    else:
        print(format_table(rows))
        print(f"\n{'usable' if status == 0 else 'NOT usable: fix the FAIL rows'} (exit status {status})")
    return status


if __name__ == "__main__":
    sys.exit(main())
