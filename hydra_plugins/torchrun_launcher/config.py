"""Config of the `hydra/launcher=torchrun` plugin (discovered by Hydra, kept import-light).

The launcher has no settings of its own: per-job launch settings (ranks, nodes,
rendezvous, timeouts, resume) live in the job config's `launcher` node so that a sweep
can vary them, and the job itself starts its ranks.
"""
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class TorchrunLauncherConf:
    _target_: str = "hydra_plugins.torchrun_launcher.torchrun_launcher.TorchrunLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="torchrun", node=TorchrunLauncherConf, provider="torchrun_launcher")
