"""The checked launcher's work: check the whole batch, then run each job via run_job."""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, open_dict

if TYPE_CHECKING:
    from hydra_plugins.checked_launcher.checked_launcher import CheckedLauncher

log = logging.getLogger(__name__)

CHECK_HOOK = "check_batch"  # a callback method that checks every job config of a batch
# A file system that cannot take the job's files (full, read-only, not ours): Hydra's own
# writes into the job dir fail with these before the task runs, and every later job would too.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def job_configs(
    launcher: CheckedLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> list[DictConfig]:
    """Each job's composed config, with its job number set (as Hydra's basic launcher does)."""
    assert launcher.hydra_context is not None and launcher.config is not None
    configs = []
    for offset, overrides in enumerate(job_overrides):
        config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = initial_job_idx + offset
            config.hydra.job.num = initial_job_idx + offset
        configs.append(config)
    return configs


def check_batch(launcher: CheckedLauncher, configs: list[DictConfig]) -> None:
    """Every registered callback's batch check, before the first job starts. A check refuses
    the batch by raising SystemExit with its message (no job has started, no traceback);
    any other exception out of a check is a bug in it and propagates with its traceback."""
    assert launcher.hydra_context is not None
    for callback in getattr(launcher.hydra_context.callbacks, "callbacks", []):
        check = getattr(callback, CHECK_HOOK, None)
        if check is not None:
            check(configs)


def launch(
    launcher: CheckedLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> Sequence[JobReturn]:
    assert launcher.hydra_context is not None and launcher.config is not None
    assert launcher.task_function is not None, "setup() comes first"
    if launcher.interrupted:
        return []
    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    configs = job_configs(launcher, job_overrides, initial_job_idx)
    check_batch(launcher, configs)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info("Launching %d job(s) into %s", len(configs), sweep_dir)
    returns = []
    for overrides, config in zip(job_overrides, configs):
        try:  # a Ctrl-C anywhere in the loop, in a job or between two, ends the sweep the same way
            log.info("\t#%d : %s", config.hydra.job.num, " ".join(filter_overrides(overrides)))
            returns.append(
                run_job(
                    hydra_context=launcher.hydra_context,
                    task_function=launcher.task_function,
                    config=config,
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                )
            )
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, or the task's own stop (a KeyboardInterrupt)
            log.error("job %s: the sweep stops here: %s", config.hydra.job.num, exc or "interrupted")
            launcher.interrupted = True
            break
        except OSError as exc:  # Hydra's own files of the job (its dir, .hydra/, the log)
            if exc.errno not in DISK_ERRNOS:
                raise
            log.error(
                "job %s not started, the sweep stops here: Hydra could not write its files: %s",
                config.hydra.job.num,
                exc,
            )
            launcher.interrupted = True
            break
        finally:
            configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    return returns
