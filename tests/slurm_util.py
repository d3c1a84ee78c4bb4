"""Helpers for tests that need a real SLURM cluster (scripts/dev-cluster.sh up).

Owns the rule for when SLURM tests run: they run when the cluster answers
(sinfo shows a usable node and sacct answers, since submitit polls sacct);
otherwise they skip with the reason, except under POLAR_REQUIRE_SLURM=1 (CI),
where an unreachable cluster is a test failure instead of a skip.

Use from a test module::

    from tests.slurm_util import slurm_cluster  # module-scoped fixture
    pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

or from tests/conftest.py, for every test marked ``@pytest.mark.slurm``::

    from tests.slurm_util import skip_unless_slurm
    def pytest_runtest_setup(item):
        skip_unless_slurm(item)

(``from slurm_util import ...`` when tests/ has no __init__.py.)

SLURM_CONF: clients need it. When it is unset, ``use_dev_cluster_conf()`` points
it at the dev cluster's config (also linked from /etc/slurm/slurm.conf by the
script), so that sbatch/sacct called by submitit find the cluster.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REQUIRE_ENV = "POLAR_REQUIRE_SLURM"
DEV_CLUSTER_DIR = Path(os.environ.get("POLAR_CLUSTER_DIR", "/var/lib/polar-dev-cluster"))
DEV_CLUSTER_CONF = DEV_CLUSTER_DIR / "etc" / "slurm.conf"
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo", "sacct", "scontrol")
HINT = "start it with `bash scripts/dev-cluster.sh up`"


def slurm_required() -> bool:
    """True when a missing cluster must fail the tests (CI), not skip them."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def use_dev_cluster_conf() -> str | None:
    """Set SLURM_CONF to the dev cluster's config when unset; return the value."""
    if not os.environ.get("SLURM_CONF") and DEV_CLUSTER_CONF.is_file():
        os.environ["SLURM_CONF"] = str(DEV_CLUSTER_CONF)
    return os.environ.get("SLURM_CONF")


def _run(cmd: list[str], timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _ctld_refuses(conf: str) -> str | None:
    """A reason if slurmctld's port refuses connections (fails fast; sinfo takes ~10 s)."""
    from hydra_plugins.polar_launchers.slurm import ctld_address

    addr = ctld_address(conf)
    if addr is None:
        return None
    try:
        socket.create_connection(addr, timeout=2).close()
    except OSError as e:
        return f"slurmctld not reachable at {addr[0]}:{addr[1]} ({e.strerror or e})"
    return None


def _check() -> tuple[bool, str]:
    missing = [c for c in CLIENTS if shutil.which(c) is None]
    if missing:
        return False, f"SLURM client commands not found: {', '.join(missing)}; {HINT}"
    conf = use_dev_cluster_conf() or "/etc/slurm/slurm.conf"
    if not Path(conf).is_file():
        return False, f"no SLURM config at {conf} (SLURM_CONF); {HINT}"
    refused = _ctld_refuses(conf)
    if refused:
        return False, f"{refused}; {HINT}"
    try:
        sinfo = _run(["sinfo", "-h", "-N", "-o", "%N %T"])
        if sinfo.returncode != 0:
            return False, f"sinfo failed: {sinfo.stderr.strip() or sinfo.returncode}; {HINT}"
        states = [line.split()[-1] for line in sinfo.stdout.splitlines() if line.strip()]
        # a trailing * means "not responding"; other suffixes (~#!%$@^-) are flags
        if not any(not s.endswith("*") and s.rstrip("~#!%$@^-") in USABLE_NODE_STATES for s in states):
            return False, f"no usable SLURM node (node states: {states or 'none'}); {HINT}"
        sacct = _run(["sacct", "-n", "-X", "-S", "now", "-o", "JobID"])
        if sacct.returncode != 0:
            return False, (f"sacct does not answer (submitit needs accounting): "
                           f"{sacct.stderr.strip() or sacct.returncode}; {HINT}")
    except subprocess.TimeoutExpired as e:
        return False, f"SLURM did not answer within {e.timeout:.0f} s ({' '.join(e.cmd)}); {HINT}"
    return True, ""


@functools.lru_cache(maxsize=None)
def _check_cached(conf: str | None) -> tuple[bool, str]:
    return _check()


def slurm_available(refresh: bool = False) -> tuple[bool, str]:
    """(True, "") when a SLURM cluster with accounting answers, else (False, reason).

    The answer is cached per SLURM_CONF for the session; refresh=True asks again.
    """
    conf = use_dev_cluster_conf()
    if refresh:
        _check_cached.cache_clear()
    return _check_cached(conf)


def require_slurm() -> None:
    """Return if SLURM is usable; else pytest.skip, or pytest.fail under POLAR_REQUIRE_SLURM=1."""
    ok, reason = slurm_available()
    if ok:
        return
    if slurm_required():
        pytest.fail(f"SLURM cluster required ({REQUIRE_ENV}=1) but not usable: {reason}", pytrace=False)
    pytest.skip(f"SLURM cluster not usable: {reason}")


def skip_unless_slurm(item: pytest.Item) -> None:
    """For conftest's pytest_runtest_setup: apply require_slurm() to items marked slurm."""
    if item.get_closest_marker("slurm") is not None:
        require_slurm()


@pytest.fixture(scope="module")
def slurm_cluster() -> str:
    """Module-scoped fixture: skip/fail as require_slurm(); yields SLURM_CONF."""
    require_slurm()
    return os.environ["SLURM_CONF"] if os.environ.get("SLURM_CONF") else "/etc/slurm/slurm.conf"


# ------------------------------------------------------------------ job queries

def sacct_runs(job_id: str, fields: tuple[str, ...] = ("State", "ElapsedRaw")) -> list[dict[str, str]]:
    """Every run of a job's allocation from `sacct -D`, oldest first.

    A requeued job has one record per run: earlier ones end in state REQUEUED.
    ElapsedRaw is in seconds.
    """
    out = _run(["sacct", "-D", "-n", "-P", "-X", "-j", str(job_id), "-o", ",".join(fields)]).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]


LIVE_STATES = ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "CONFIGURING", "SUSPENDED")


def ended_runs(job_id: str, fields: tuple[str, ...] = ("State", "ElapsedRaw"), timeout: float = 60.0):
    """sacct_runs once the latest run has ended: accounting may still say RUNNING for a
    moment after a job's result file is written (and the sweep has returned)."""
    return wait_until(lambda: (runs := sacct_runs(job_id, fields)) and runs[-1]["State"] not in LIVE_STATES and runs,
                      timeout, what=lambda: f"sacct to record job {job_id} as ended (now {sacct_runs(job_id, fields)})")


def sacct_states(job_id: str, all_runs: bool = False) -> list[str]:
    """States of a job's allocation from sacct: its latest run, or every run (all_runs)."""
    states = [run["State"] for run in sacct_runs(job_id, ("State",))]
    return states if all_runs else states[-1:]


def squeue_state(job_id: str) -> str:
    """The job's state as squeue sees it ('' once the controller forgot it)."""
    return _run(["squeue", "-h", "-j", str(job_id), "-o", "%T"]).stdout.strip()


def wait_until(predicate, timeout: float, interval: float = 0.5, what="condition"):
    """Poll predicate() until it returns a truthy value; return it, or fail after timeout.

    what: a description, or a callable giving one (evaluated at failure time).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            desc = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {desc}", pytrace=False)
        time.sleep(interval)


def wait_for_sacct_state(job_id: str, prefixes: tuple[str, ...], timeout: float = 60) -> str:
    """Wait until sacct reports the job's latest state starting with one of prefixes."""
    def latest() -> str | None:
        states = sacct_states(job_id)
        return states[-1] if states and states[-1].startswith(prefixes) else None
    return wait_until(latest, timeout, what=lambda: f"job {job_id} to reach {'/'.join(prefixes)} "
                      f"in sacct (sacct -D says: {sacct_states(job_id, all_runs=True)})")
