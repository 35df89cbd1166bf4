"""Config of the `hydra/launcher=checked` plugin (discovered by Hydra, kept import-light).

The launcher has no settings of its own: per-job launch settings (ranks, nodes,
rendezvous, timeouts, resume) live in the job config's `launcher` node so that a sweep
can vary them, and the job itself starts its ranks.
"""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class CheckedLauncherConf:
    _target_: str = "hydra_plugins.checked_launcher.checked_launcher.CheckedLauncher"


ConfigStore.instance().store(
    group="hydra/launcher", name="checked", node=CheckedLauncherConf, provider="checked_launcher"
)
