"""``python -m wan_exp.checkpoint write model=s2v_14b out=<dir> [seed=0] [shards=4] [<model overrides>]``

Writes a random-weight folder in the official Wan2.2-S2V-14B layout (wan_exp.checkpoint.writer).
``out`` must be new or empty; the disk must hold the estimate (about 46 GiB for s2v_14b).
Every other ``key=value`` is a config override as for launch.py (``model=tiny``, ``model.seed``...).
"""

from __future__ import annotations

import sys

from wan_exp.checkpoint.writer import CheckpointWriteError, write_random_checkpoint
from wan_exp.config import compose_config

USAGE = "usage: python -m wan_exp.checkpoint write model=s2v_14b out=<dir> [seed=0] [shards=4]"
OWN_KEYS = ("out", "seed", "shards")


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "write":
        print(USAGE, file=sys.stderr)
        return 2
    own = {}
    overrides = []
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep:
            print(f"{arg!r} is not key=value\n{USAGE}", file=sys.stderr)
            return 2
        if key in OWN_KEYS:
            own[key] = value
        else:
            overrides.append(arg)
    if "out" not in own:
        print(f"out=<dir> is missing\n{USAGE}", file=sys.stderr)
        return 2
    try:
        seed, shards = int(own.get("seed", 0)), int(own.get("shards", 4))
    except ValueError:
        print(f"seed and shards are integers, got seed={own.get('seed')} shards={own.get('shards')}", file=sys.stderr)
        return 2
    model_cfg = compose_config(overrides).model
    try:
        out = write_random_checkpoint(model_cfg, own["out"], seed=seed, shards=shards)
    except CheckpointWriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote a random-weight {model_cfg.name} folder (seed {seed}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
