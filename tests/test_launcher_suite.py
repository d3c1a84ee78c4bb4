"""Hydra's own launcher test suites (hydra.test_utils.launcher_common_tests) against
POLAR's three launchers: local, dryrun and slurm (on the dev cluster), as
hydra-submitit-launcher's tests run them against its launchers.

The suites run Hydra's example apps, which are not POLAR sweeps (their configs are not
composed over sweeps.schema.JobConfig), so the launchers run them unplanned
(hydra_plugins/polar_launchers/base.py): through the same code that composes every job
before starting any (one SweepError naming every bad job), the local launcher's
in-process runs, and the SLURM launcher's preflight checks, job arrays and waiting for
results. POLAR sweeps themselves are tested in test_launchers.py, test_sweep.py and
test_slurm_sweep.py. A suite test that cannot apply to a launcher by design is skipped
in the launcher's subclass, with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

try:
    from tests.slurm_util import slurm_cluster  # noqa: F401 (fixture)
except ImportError:  # tests/ without __init__.py
    from slurm_util import slurm_cluster  # noqa: F401

QUIET = ["-m", "hydra/hydra_logging=disabled", "hydra/job_logging=disabled"]
# the dev cluster answers in well under a second: look for results often
SLURM = ["hydra.launcher.poll_s=0.25", "hydra.launcher.state_poll_s=5", "hydra.launcher.timeout_min=5"]


@pytest.fixture(autouse=True)
def hydra_version_base_unset(monkeypatch):
    """Hydra's version_base is process-wide: tests that compose with version_base="1.3"
    (job chdir off) would change what these suites (written for the default) expect."""
    from hydra import version

    monkeypatch.setattr(version.VersionBase.instance(), "version_base", version._UNSPECIFIED_)



# ------------------------------------------------------------------ local

@pytest.mark.parametrize("launcher_name, overrides", [("polar_local", [])])

class TestLocalLauncher(LauncherTestSuite):
    pass


@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [({}, [*QUIET, "hydra/launcher=polar_local"])])
class TestLocalLauncherIntegration(IntegrationTestSuite):
    pass


# ------------------------------------------------------------------ dryrun

RUNS_NOTHING = ("hydra/launcher=dryrun starts no job by design: there is no job folder, log, output "
                "or return value to check")


def _not_for_dryrun(*fixtures: str):
    """A suite test that needs its jobs to run, skipped for the dry run (same fixtures)."""
    def test(self, **kwargs) -> None:
        pytest.skip(RUNS_NOTHING)

    import inspect

    test.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(f, inspect.Parameter.KEYWORD_ONLY) for f in fixtures])
    return test


_SWEEP = ("hydra_sweep_runner", "launcher_name", "overrides", "tmpdir")
_APP = ("tmpdir", "task_launcher_cfg", "extra_flags")


@pytest.mark.parametrize("launcher_name, overrides", [("polar_dryrun", [])])
class TestDryRunLauncher(LauncherTestSuite):
    """Kept from the suite: a sweep over Hydra's own config is refused, and a job whose
    config does not compose fails the dry run. Added: every job composed, none started."""

    test_sweep_1_job = _not_for_dryrun(*_SWEEP)
    test_sweep_2_jobs = _not_for_dryrun(*_SWEEP)
    test_sweep_1_job_strict = _not_for_dryrun(*_SWEEP)
    test_sweep_2_optimizers = _not_for_dryrun(*_SWEEP)
    test_sweep_over_unspecified_mandatory_default = _not_for_dryrun(*_SWEEP)
    test_sweep_and_override = _not_for_dryrun(*_SWEEP)
    test_sweep_with_custom_resolver = _not_for_dryrun(*_SWEEP)

    def test_composes_every_job_and_starts_nothing(self, hydra_sweep_runner, launcher_name, overrides,
                                                   tmpdir, capsys) -> None:
        ran = []
        sweep = hydra_sweep_runner(calling_file=None, calling_module="hydra.test_utils.a_module",
                                   task_function=ran.append, config_path="configs", config_name="compose",
                                   overrides=[f"hydra/launcher={launcher_name}", "+a=0,1", *overrides],
                                   temp_dir=tmpdir)
        with sweep:
            returns = sweep.returns[0]
            assert [r.overrides for r in returns] == [["+a=0"], ["+a=1"]]
            assert all(r.return_value is None for r in returns) and ran == []
            assert not [p for p in Path(tmpdir).iterdir() if p.is_dir()]     # no job folders
        assert "Dry run: 2 jobs composed" in capsys.readouterr().out


@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [({}, [*QUIET, "hydra/launcher=polar_dryrun"])])
class TestDryRunLauncherIntegration(IntegrationTestSuite):
    test_custom_task_name = _not_for_dryrun(*_APP)
    test_custom_sweeper_run_workdir = _not_for_dryrun(*_APP)
    test_get_orig_dir_multirun = _not_for_dryrun(*_APP)
    test_to_absolute_path_multirun = _not_for_dryrun(*_APP)


# ------------------------------------------------------------------ slurm (dev cluster)

@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
@pytest.mark.parametrize("launcher_name, overrides", [("polar_slurm", SLURM)])
class TestSlurmLauncher(LauncherTestSuite):
    pass


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [({}, [*QUIET, "hydra/launcher=polar_slurm", *SLURM])])
class TestSlurmLauncherIntegration(IntegrationTestSuite):
    pass
