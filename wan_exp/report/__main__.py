"""``python -m wan_exp.report <sweep dir>``: write report.md and report.html, print the table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wan_exp.report import comparison_table, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wan_exp.report", description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="the sweep's output folder (holds <job>/results.json)")
    args = parser.parse_args(argv)
    try:
        md_path, html_path = write_report(args.sweep_dir)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(comparison_table(args.sweep_dir))
    print(f"\nwrote {md_path}\nwrote {html_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
