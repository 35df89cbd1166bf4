"""The checked launcher plugin as a Hydra plugin: Hydra's own launcher test suites, and
the plugin's promise to import nothing of the application (no torch)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import version as hydra_version
from hydra.test_utils.launcher_common_tests import (
    BatchedSweeperTestSuite,
    IntegrationTestSuite,
    LauncherTestSuite,
)

from launch_helpers import REPO

# Hydra's suites assume the version base of a fresh process; other tests compose configs
# with version_base="1.3" (no chdir into the job dir), which Hydra keeps process-wide.
FRESH_VERSION_BASE = hydra_version.VersionBase.instance().getbase()


@pytest.fixture(autouse=True)
def fresh_hydra_version_base():
    base = hydra_version.VersionBase.instance()
    saved = base.getbase()
    base.version_base = FRESH_VERSION_BASE  # may be Hydra's "unspecified" marker, which setbase refuses
    yield
    base.version_base = saved


@pytest.mark.parametrize("launcher_name, overrides", [("checked", [])])
class TestCheckedLauncher(LauncherTestSuite):
    """Hydra's shared launcher tests with a tiny task (each returns 100), in-process."""


@pytest.mark.parametrize("launcher_name, overrides", [("checked", ["hydra.sweeper.max_batch_size=2"])])
class TestCheckedLauncherBatches(BatchedSweeperTestSuite):
    """Jobs numbered across batches of one sweep."""


@pytest.mark.slow
@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [({}, ["-m", "hydra/launcher=checked"])])
class TestCheckedLauncherIntegration(IntegrationTestSuite):
    """Hydra's integration tests: small apps run as `python app.py -m hydra/launcher=checked`."""


def test_the_launcher_imports_no_torch_and_nothing_of_the_application():
    code = (
        "import sys\n"
        "import hydra_plugins.checked_launcher.checked_launcher, hydra_plugins.checked_launcher._core\n"
        "import hydra_plugins.checked_launcher.config\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'wan_exp', 'psutil', 'rich'))\n"
        "print(heavy)\n"
    )
    # hydra itself is imported first: what the plugin adds is what is checked
    proc = subprocess.run(
        [sys.executable, "-c", "import hydra.core.utils, hydra.plugins.launcher\n" + code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    # what makes the import light is what it does not import (no wall-clock bound: CI may be busy)
    assert proc.stdout.strip() == "[]", proc.stdout
