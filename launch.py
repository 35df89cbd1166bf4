"""wan-exp entry point: compose an experiment with Hydra and run it under torchrun.

    python launch.py                                   # one job: tiny model, 2 ranks on CPU
    python launch.py parallel=fsdp_fixed model=s2v_14b launcher.nproc_per_node=8
    python launch.py -m parallel=single,ulysses,fsdp_fixed,hybrid   # a sweep

conf/config.yaml sets hydra.mode=MULTIRUN, so even a plain run is a sweep of one job and
goes through the torchrun launcher (hydra_plugins/torchrun_launcher), which starts the
ranks (`python -m wan_exp.worker <job dir>`). The process exits 1 if any job did not
complete (failed, oom or hang), after every job of the sweep has run.
"""
import sys

import hydra
from omegaconf import DictConfig

from hydra_plugins.torchrun_launcher.torchrun_launcher import sweep_exit_code
from wan_exp.config import register_configs

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # Hydra calls this only in RUN mode, which would run the job inside this process
    # without ranks; every job must go through the torchrun launcher instead.
    sys.exit("launch.py runs jobs through the torchrun launcher; leave hydra.mode=MULTIRUN")


if __name__ == "__main__":
    main()
    sys.exit(sweep_exit_code())
