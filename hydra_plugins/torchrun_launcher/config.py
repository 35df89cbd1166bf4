"""Config of the `hydra/launcher=torchrun` plugin (discovered by Hydra, kept import-light).

Per-job launch settings (ranks, rendezvous, hang timeout, resume) live in the job config's
`launcher` node (wan_exp/config.py: LauncherConfig) so that a sweep can vary them.
"""
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class TorchrunLauncherConf:
    _target_: str = "hydra_plugins.torchrun_launcher.torchrun_launcher.TorchrunLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="torchrun", node=TorchrunLauncherConf, provider="torchrun_launcher")
