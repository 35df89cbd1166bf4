"""Hydra's own errors at launch, said in one line with the fix.

launch.py runs its Hydra entry point through :func:`run_explained`. Hydra is told to let its
errors through (``HYDRA_FULL_ERROR=1``; a user who set that variable gets Hydra's full
traces, untouched), and the ones a command-line mistake causes become one line on stderr
and exit status 1:

- a launcher plugin that is not installed (``hydra/launcher=cluster`` or
  ``submitit_slurm``/``submitit_local`` without hydra-submitit-launcher): the pip command;
- the Slurm launcher on a machine without Slurm (submitit finds no ``srun``): where to run
  it, and the local launcher that tries the same path here;
- any other Hydra error (a config dir or name that does not exist, an option that does not
  exist, an override Hydra cannot parse): Hydra's message, without the traceback, as
  Hydra prints it;
- a file Hydra itself cannot write outside a job (``multirun.yaml`` on a full or read-only
  disk; wan-exp's own files are handled where they are written): the file and what to do.

Anything else is a bug and keeps its traceback. The modes (``hydra.mode=RUN``) and the sweep
dir are refused by the sweep callback (wan_exp.host.callbacks), which Hydra calls first.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable
from typing import Any

FULL_ERROR_VAR = "HYDRA_FULL_ERROR"
# a file system that cannot take a write: full, a quota, a file-size limit, read-only, not ours
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})
SUBMITIT_PLUGIN = re.compile(r"'hydra/launcher/(submitit_\w+)'")
NO_SRUN = re.compile(r'Could not detect "srun"')


def explain(exc: BaseException) -> str | None:
    """The one-line message for an error a command-line mistake causes, or None (a bug)."""
    from hydra.errors import HydraException

    text = str(exc).strip()
    if isinstance(exc, HydraException):
        plugin = SUBMITIT_PLUGIN.search(text)
        if plugin and "Could not" in text:
            return (
                f"the launcher {plugin.group(1)} needs the hydra-submitit-launcher plugin, which is not "
                "installed: pip install -e '.[slurm]' (or drop hydra/launcher=... to run with the default "
                "launcher on this machine)"
            )
        first = " ".join(text.split("\n\n")[0].split())
        if "config directory" in first:
            first += " (--config-dir takes a folder of config files, e.g. --config-dir sweeps)"
        return first
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:  # e.g. Hydra's multirun.yaml on a full disk
        return (
            f"{text}; free space there or choose another hydra.sweep.dir (a sweep that had started goes on "
            "with the same command and launcher.resume=true)"
        )
    if isinstance(exc, RuntimeError) and NO_SRUN.search(text):
        return (
            "the Slurm launcher (hydra/launcher=cluster or submitit_slurm) needs Slurm, but srun is not on "
            "this machine's PATH: launch from a Slurm login node, or try the same path here with "
            "hydra/launcher=submitit_local (or the default launcher: drop hydra/launcher=...)"
        )
    return None


def run_explained(main: Callable[[], Any]) -> None:
    """Run the Hydra entry point `main`; the errors above end the process with one line."""
    if os.environ.get(FULL_ERROR_VAR):
        main()
        return
    os.environ[FULL_ERROR_VAR] = "1"
    try:
        main()
    except Exception as exc:  # what is not explained is raised again, traceback and all
        message = explain(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        os.environ.pop(FULL_ERROR_VAR, None)


__all__ = ["explain", "run_explained"]
