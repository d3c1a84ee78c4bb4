"""`hydra/launcher=local`: the jobs of a sweep run on this machine, several at once when
the cores allow, after every job of the sweep has been composed and planned (a bad job
at the end of a sweep fails it before the first job trains) and each data set the jobs
need has been synthesized here, once (sweeps.data_sets). A job that trains on this
machine's CPU (no GPU here, or train.device=cpu) and that derive.local_refusal refuses
(too much memory or time for this machine) fails the whole sweep up front.

`n_jobs` (conf/hydra/launcher/local.yaml, schema PolarLocalConf) says how many jobs run
at once: "auto" fits them to the cores when every job pins `train.threads` (a sweep of
1-thread jobs on a 2-core laptop runs 2 at a time) and to the memory
(sweeps.sweep_plan.local_workers). One at a time: in this process, as Hydra's basic
launcher runs them. Several at a time: each job runs in a fresh process (spawned, so no
torch or MLflow state is shared), with its progress bar on a line of its own; the jobs
with the most planned compute start first, so that no long job runs alone at the end. An app that is not a POLAR sweep
(base.is_polar_sweep) has no plan: its jobs are composed first, then run one at a time.

Workers die with the launcher: each watches its parent (_watch_parent, every
PARENT_POLL_S) and, once the parent is gone however it ended (SIGKILL included), sends
itself SIGTERM, so that its job ends through its SIGTERM path (sweeps.jobs: the run is
marked FAILED with the reason) and the worker exits without returning its result to a
parent that will never read it (at most ORPHAN_GRACE_S later in any case). A SIGTERM to
the launcher terminates its workers the same way before the launcher exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence, Union

import cloudpickle
from hydra.core.utils import JobReturn, configure_log, run_job, setup_globals

from hydra_plugins.polar_launchers.base import PlanningLauncher, compose_jobs, is_polar_sweep, plan_jobs, sweep_config

PARENT_POLL_S = 0.5         # how often a worker checks that the launcher still lives
ORPHAN_GRACE_S = 60         # how long an orphaned worker's job may take to end before the worker exits anyway
WORKERS_STOP_S = 30         # how long the launcher, on SIGTERM, waits for its workers to end their jobs


class LauncherTerminated(SystemExit):
    """The launcher received SIGTERM while its workers ran (they are terminated too)."""


class LocalLauncher(PlanningLauncher):
    def __init__(self, n_jobs: Union[int, str] = "auto") -> None:
        super().__init__()
        self.n_jobs = n_jobs

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from sweeps.data_sets import needed, synthesize_missing
        from sweeps.sweep_plan import check_n_jobs, local_workers, machine, no_gpu_here

        assert self.config is not None and self.hydra_context is not None
        check_n_jobs(self.n_jobs)
        if not is_polar_sweep(self.config):
            jobs = compose_jobs(self.hydra_context, self.config, job_overrides, initial_job_idx)
            return self.run_here([job.config for job in jobs])
        gpu_here = not no_gpu_here()
        planned = plan_jobs(self.hydra_context, self.config, job_overrides, initial_job_idx, refuse_local=True,
                            gpu_here=gpu_here)
        synthesize_missing(needed(planned))   # each data set once, before any job starts
        on_gpu = gpu_here and any(not p.plan.on_cpu for p in planned)
        workers = local_workers(self.n_jobs, planned, *machine(), gpu=on_gpu)
        if workers == 1:
            return self.run_here([self._job_config(p.overrides, p.idx) for p in planned])
        return self._launch_parallel(job_overrides, initial_job_idx, planned, workers)

    def run_here(self, configs: list) -> list[JobReturn]:
        """Each job's composed config run in this process, one after the other (a failed
        job's JobReturn says so; the sweeper raises its error once all have run)."""
        self._prepare()
        returns = []
        for cfg in configs:
            returns.append(_run(self.hydra_context, self.task_function, cfg))
            self._log_here()
        return returns

    def _prepare(self) -> None:
        """Hydra's globals and logging in this process, and the sweep folder."""
        setup_globals()
        self._log_here()
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)

    def _log_here(self) -> None:
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)

    def _launch_parallel(self, job_overrides, initial_job_idx: int, planned, workers: int) -> list[JobReturn]:
        from sweeps.jobs import finished_locally
        from sweeps.sweep_plan import largest_first

        self._prepare()
        results: dict[int, JobReturn] = {}
        queue = []
        for i in largest_first(planned):
            overrides = job_overrides[i]
            if finished_locally(planned[i].job):   # skipped in a moment here; a worker would take seconds to start
                results[i] = _run(self.hydra_context, self.task_function,
                                  self._job_config(overrides, initial_job_idx + i))
            else:
                queue.append((i, overrides))
        if queue:
            print(f"[local launcher] {len(queue)} jobs, {min(workers, len(queue))} at a time, "
                  "the largest first", flush=True)
            results.update(self._run_in_workers(queue, initial_job_idx, workers))
        self._log_here()
        return [results[i] for i in range(len(job_overrides))]

    def _run_in_workers(self, queue: list, initial_job_idx: int, workers: int) -> dict[int, JobReturn]:
        """Each job in a fresh spawned process, at most `workers` at once; a job's progress
        bar takes the terminal line its worker slot frees."""
        from hydra.core.singleton import Singleton

        state, results = Singleton.get_state(), {}
        running, free_lines = {}, list(range(workers))
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), max_tasks_per_child=1,
                                   initializer=_watch_parent, initargs=(os.getpid(),))
        with pool, StopWorkersOnSigterm(pool):
            while queue or running:
                while queue and free_lines:
                    i, overrides = queue.pop(0)
                    line = free_lines.pop(0)
                    job_config = self._job_config(overrides, initial_job_idx + i)
                    # cloudpickle: Hydra's state holds classes and lambdas that plain pickle refuses
                    payload = cloudpickle.dumps((state, self.hydra_context, self.task_function, job_config))
                    running[pool.submit(_run_in_child, payload, line)] = (i, line)
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    i, line = running.pop(future)
                    free_lines.append(line)
                    results[i] = cloudpickle.loads(future.result())
        return results

    def _job_config(self, overrides, idx: int):
        return sweep_config(self.hydra_context, self.config, overrides, idx)


def _run(hydra_context, task_function, job_config) -> JobReturn:
    """One job in this process, in its folder under the sweep's (Hydra's run_job)."""
    return run_job(hydra_context=hydra_context, task_function=task_function, config=job_config,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


class StopWorkersOnSigterm:
    """While the workers run (in the main thread only): a SIGTERM to the launcher sends
    SIGTERM to every worker, waits up to WORKERS_STOP_S for them to end their jobs (each
    run marked FAILED with the reason), kills any left, and exits with status 143."""

    def __init__(self, pool: ProcessPoolExecutor):
        self.pool, self.previous = pool, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._terminate)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def _terminate(self, signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)     # one stop is enough
        print(f"[local launcher] terminated by signal {signum}: stopping its workers (their runs end FAILED; "
              "run the sweep again to resume them)", file=sys.stderr, flush=True)
        stop_workers(list((self.pool._processes or {}).values()), WORKERS_STOP_S)
        self.pool.shutdown(wait=False, cancel_futures=True)
        raise LauncherTerminated(128 + signum)


def stop_workers(processes: list, timeout_s: float) -> None:
    """SIGTERM to each live process, then SIGKILL to those still alive after timeout_s."""
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(5)


_orphaned = threading.Event()   # set in a worker once its launcher is gone


def _watch_parent(parent_pid: int) -> None:
    """A worker's initializer: a daemon thread that, once the launcher (parent_pid) is
    gone (the worker re-parented), sends SIGTERM to this worker, whose job then ends
    through its SIGTERM path; ORPHAN_GRACE_S later the worker exits regardless.
    (A parent-death signal, prctl PR_SET_PDEATHSIG, would fire when the launcher's thread
    that started the worker ends, which is the pool's management thread for the workers
    that replace finished ones: not the launcher's death. Polling is exact and portable.)"""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        _orphaned.set()
        print(f"[worker {os.getpid()}] the sweep's launcher (pid {parent_pid}) is gone: ending this job",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(ORPHAN_GRACE_S)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="polar-parent-watch", daemon=True).start()


def _run_in_child(payload: bytes, line: int) -> bytes:
    """One job in a spawned worker: Hydra's global state as in the launcher, then run_job;
    its JobReturn goes back cloudpickled too. An orphaned worker (_watch_parent) exits as
    soon as its job has ended: nobody reads what it would send back."""
    from hydra.core.singleton import Singleton

    from sweeps.jobs import PROGRESS_LINE_ENV

    state, hydra_context, task_function, job_config = cloudpickle.loads(payload)
    Singleton.set_state(state)
    setup_globals()
    os.environ[PROGRESS_LINE_ENV] = str(line)
    try:
        return cloudpickle.dumps(_run(hydra_context, task_function, job_config))
    finally:
        if _orphaned.is_set():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signal.SIGTERM)
