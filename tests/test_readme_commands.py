"""Every `python launch.py ...` command of the README composes: each runs with `--cfg job` (Hydra
prints the job's config and starts nothing), a sweep once per swept value, and the printed config
holds the values the command sets."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from launch_helpers import REPO, output

README = REPO / "README.md"
# The README's placeholders, and a value each can take for composing
PLACEHOLDERS = {"<sweep dir>": "/tmp/wan_exp_readme_sweep", "<partition>": "gpu", "<account>": "research"}
SWEEP_FLAGS = ("-m", "--multirun")
OPTIONS_WITH_VALUE = ("--config-dir", "--config-name", "-cd", "-cn")


def readme_commands() -> list[list[str]]:
    """The arguments after `python launch.py` of every command in the README (code blocks, inline
    code, continued lines), comments and the prose mention `python launch.py ...` left out."""
    text = README.read_text().replace("\\\n", " ")
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    commands = []
    for match in re.finditer(r"python launch\.py([^`\n]*)", text):
        args = shlex.split(match.group(1), comments=True)
        if args != ["..."]:
            commands.append(args)
    return commands


def sweep_params(options: dict[str, str]) -> dict[str, list[str]]:
    """hydra.sweeper.params of the sweep config a command names (--config-dir/--config-name)."""
    if "--config-name" not in options:
        return {}
    config = OmegaConf.load(REPO / options.get("--config-dir", "conf") / f"{options['--config-name']}.yaml")
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return {key: str(values).split(",") for key, values in params.items()}


def jobs(args: list[str]) -> tuple[list[str], list[list[str]]]:
    """(Hydra options, the overrides of each job to compose): as Hydra's basic sweeper would
    sweep them (command-line values win over the sweep config's params), one job per swept value
    with every other swept key at its first value."""
    options: dict[str, str] = {}
    plain: list[str] = []
    swept: dict[str, list[str]] = {}
    rest = [a for a in args if a not in SWEEP_FLAGS]
    while rest:
        arg = rest.pop(0)
        if arg in OPTIONS_WITH_VALUE:
            options[{"-cd": "--config-dir", "-cn": "--config-name"}.get(arg, arg)] = rest.pop(0)
            continue
        key, _, value = arg.partition("=")
        if "," in value and not value.startswith(("[", "{", "'", '"')):
            swept[key] = value.split(",")
        else:
            plain.append(arg)
    swept = {**sweep_params(options), **swept}
    plain = [o for o in plain if o.partition("=")[0] not in swept]
    first = [f"{key}={values[0]}" for key, values in swept.items()]
    each = [
        [*plain, *(f"{k}={v if k == key else vs[0]}" for k, vs in swept.items())]
        for key, values in swept.items()
        for v in values[1:]
    ]
    hydra_options = [part for name, value in options.items() for part in (name, value)]
    return hydra_options, [[*plain, *first], *each]


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_this_test_runs():
    assert len(COMMANDS) >= 20, COMMANDS  # one-job runs, rehearsals, sweeps, Slurm, two hosts, resume
    assert not any("<" in arg for args in COMMANDS for arg in args), "a README placeholder without a value here"


@pytest.mark.slow  # about 50 compositions, 0.5 s each
@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(args) or "(no overrides)" for args in COMMANDS])
def test_a_readme_command_composes(args):
    options, job_overrides = jobs(args)
    for overrides in job_overrides:
        proc = subprocess.run(
            [sys.executable, "launch.py", *options, *overrides, "--cfg", "job"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, f"{' '.join(overrides)}\n{output(proc)}"
        config = OmegaConf.create(proc.stdout)
        for override in overrides:
            key, _, value = override.lstrip("+").partition("=")
            if key.startswith("hydra") or "/" in key:
                continue  # Hydra's own settings are not part of the job's config
            chosen = OmegaConf.select(config, key)
            if OmegaConf.is_dict(chosen):  # a group's choice: its config names itself, where it has a name
                assert chosen.get("name", value) == value, override
            else:  # a value, as YAML reads it or as a string field keeps it (launcher.nproc_per_node)
                assert chosen in (yaml.safe_load(value), value), override
