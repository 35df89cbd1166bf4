"""wan-exp entry point: compose an experiment with Hydra and run it.

    python launch.py                                   # one job: tiny model, 2 ranks on CPU
    python launch.py parallel=fsdp_fixed model=s2v_14b launcher.nproc_per_node=8
    python launch.py -m parallel=single,ulysses,fsdp_fixed,hybrid   # a sweep
    python launch.py -m hydra/launcher=submitit_slurm ...           # the same jobs on Slurm

Data flows Hydra -> task -> ranks -> files -> callbacks. conf/config.yaml sets
hydra.mode=MULTIRUN, so even a plain run is a sweep of one job and goes through a Hydra
launcher (torchrun by default: jobs one after the other in this process). Each job is
the task function below (wan_exp.host.job.run_job: the job dir, this host's ranks under the
elastic agent, results.json). The callbacks in conf/config.yaml do the rest: W&B and the
summary after each job; the dashboard, the resume command and the exit status (1 if any
job did not complete) after the sweep. Hydra's own errors (a launcher plugin not installed,
Slurm missing, a config that does not exist) end in one line with the fix
(wan_exp.host.hydra_errors).
"""

import hydra
from omegaconf import DictConfig

from wan_exp.config import register_configs
from wan_exp.host.hydra_errors import run_explained

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    from wan_exp.host.job import run_job

    return run_job(cfg)


if __name__ == "__main__":
    run_explained(main)
