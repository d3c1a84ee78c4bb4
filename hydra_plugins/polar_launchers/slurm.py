"""`hydra/launcher=slurm`: hydra-submitit-launcher's submitit_slurm, one job array per shape.

Before anything is submitted: every job is composed and planned (sweeps.sweep_plan), SLURM
must answer (client commands, slurmctld's port, sinfo and sacct, each with a timeout),
and `sbatch --test-only` must accept every resource shape. Jobs are then grouped by the
resources their plans need (nodes, GPUs per node, one task per GPU, memory, time limit;
a job that trains on the CPU: no GPU, train.threads CPUs) and each group is submitted as
one submitit job array. The sweep waits for all jobs and fails naming every failed or
cancelled job with its log files. An app that is not a POLAR sweep (base.is_polar_sweep)
has no plan: its jobs are composed first, then submitted as one array with the
launcher's own resources (as submitit_slurm would; null: one node, one task, no GPU,
submitit's 60 minutes). Schema: config.py PolarSlurmConf.

Data first: a data set that the sweep's jobs need and that does not exist yet is planned
here (prefixes and pairs, cheap) and its units of work (one policy x one shard each,
polar.synthesis.run_unit_task) are submitted as job arrays, one per resource shape (the
GPUs each policy needs; n-gram policies on a CPU); the sweep's job arrays wait for them
(afterok; SLURM cancels them if a unit fails), and the first job assembles the parts
under the data set's lock. A failed unit fails the sweep naming its policy, shard and
log; the parts already written stay, so running the sweep again resumes.

In the job, each task runs Hydra's job (BaseSubmititLauncher.__call__, hence
sweeps.run's task function and sweeps.jobs.run_job). A multi-task job first exports
torch.distributed's env:// variables (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE) from SLURM's. On submitit's time-limit / preemption signal
(USR2), checkpoint() resubmits the same call: the requeued job re-runs run_job, which
resumes from its last checkpoint (polar.trainer) into the same MLflow run.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

from hydra_plugins.polar_launchers.base import compose_jobs, is_polar_sweep, plan_jobs, tracking_uri

RESOURCE_KEYS = ("nodes", "gpus_per_node", "tasks_per_node", "mem_gb", "timeout_min", "max_timeout_min",
                 "cpus_per_task")
PLAIN_TIMEOUT_MIN = 60   # submitit_slurm's default time limit, for apps without a plan
OWN_KEYS = ("check_timeout_s", "test_only", "poll_s", "state_poll_s", "result_grace_s", "wait")
INIT_KEYS = ("submitit_folder", "max_num_timeout")
BASE_KEYS = ("timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name",
             "stderr_to_stdout")
CLIENTS = ("sbatch", "sacct", "scancel", "sinfo")
BF16_GB = 2 * 1.25          # host memory of a synthesis unit per policy parameter (bytes), beyond 16 GB


# ------------------------------------------------------------------ before submitting

def slurm_problem(timeout_s: float = 15.0) -> Optional[str]:
    """Why SLURM cannot take jobs now, or None. Never hangs: every check has a timeout."""
    missing = [c for c in CLIENTS if shutil.which(c) is None]
    if missing:
        return (f"the SLURM client commands {', '.join(missing)} are not on PATH: run the sweep on the "
                "cluster's login node (or install slurm-client), or use hydra/launcher=dryrun or local")
    conf = os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"
    addr = ctld_address(conf)
    if addr is not None:
        try:
            socket.create_connection(addr, timeout=min(2.0, timeout_s)).close()
        except OSError as err:
            return (f"slurmctld does not answer at {addr[0]}:{addr[1]} ({err.strerror or err}; SLURM_CONF={conf}); "
                    "is the cluster up (scripts/dev-cluster.sh up on the dev machine)?")
    for cmd, what in ((["sinfo", "-h", "-o", "%P"], "sinfo"),
                      (["sacct", "-n", "-X", "-S", "now", "-o", "JobID"], "sacct (submitit polls accounting)")):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return f"{what} did not answer within {timeout_s:g} s (SLURM_CONF={conf})"
        if out.returncode != 0:
            return f"{what} failed (SLURM_CONF={conf}): {out.stderr.strip() or f'exit {out.returncode}'}"
    return None


def ctld_address(conf: str) -> Optional[tuple[str, int]]:
    """(host, port) of the first SlurmctldHost in slurm.conf, or None if not found."""
    try:
        text = Path(conf).read_text()
    except OSError:
        return None
    host = re.search(r"^\s*(?:SlurmctldHost|ControlMachine)\s*=\s*([^\s(#]+)(?:\(([^)]+)\))?", text, re.M | re.I)
    port = re.search(r"^\s*SlurmctldPort\s*=\s*(\d+)", text, re.M | re.I)
    if not host:
        return None
    return (host.group(2) or host.group(1)), int(port.group(1)) if port else 6817


def test_only_args(shape, params: dict) -> list[str]:
    """`sbatch --test-only` arguments asking for what submitit will ask for this shape."""
    args = ["sbatch", "--test-only", "--job-name=polar-preflight", f"--nodes={shape.nodes}",
            f"--ntasks-per-node={shape.tasks_per_node}", f"--time={shape.timeout_min}"]
    if shape.mem_gb is not None:
        args.append(f"--mem={shape.mem_gb}G")
    if shape.gpus_per_node > 0:
        args.append(f"--gpus-per-node={shape.gpus_per_node}")
    if shape.cpus_per_task:
        args.append(f"--cpus-per-task={shape.cpus_per_task}")
    flags = {"partition": "partition", "account": "account", "qos": "qos",
             "constraint": "constraint", "exclude": "exclude", "gres": "gres", "cpus_per_gpu": "cpus-per-gpu",
             "gpus_per_task": "gpus-per-task", "mem_per_gpu": "mem-per-gpu", "mem_per_cpu": "mem-per-cpu"}
    args += [f"--{flag}={params[key]}" for key, flag in flags.items() if params.get(key) is not None]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in (params.get("additional_parameters") or {}).items()]
    return [*args, "--wrap=true"]


def plain_shape(params: dict):
    """The one shape of an app without a plan: the launcher's resources as submitit_slurm
    takes them (null: one node, one task, no GPU, SLURM's memory and CPUs, 60 minutes)."""
    from sweeps.sweep_plan import Shape

    p = {k: params.get(k) for k in RESOURCE_KEYS}
    minutes = min(p["timeout_min"] or PLAIN_TIMEOUT_MIN, p["max_timeout_min"] or float("inf"))
    return Shape(p["nodes"] or 1, p["gpus_per_node"] or 0, p["tasks_per_node"] or 1, p["mem_gb"], int(minutes),
                 p["cpus_per_task"])


# ------------------------------------------------------------------ the launcher

class PolarSlurmLauncher(BaseSubmititLauncher):
    _EXECUTOR = "slurm"

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """In the job (each task): env:// variables for torch.distributed, then Hydra's job."""
        import submitit

        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        ret = super().__call__(*args, **kwargs)
        # Done: a time-limit signal from now on must neither requeue the finished job nor
        # kill it while submitit writes the result or Python exits (Python restores the
        # default action, "terminate", at exit, and SLURM then records FAILED).
        signal.signal(submitit.JobEnvironment._usr_sig(), signal.SIG_IGN)
        return ret

    # checkpoint() is BaseSubmititLauncher's: DelayedSubmission(self, *same args), so a
    # requeued job re-runs run_job, which resumes from its checkpoint.

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from sweeps.runs import terminate_parent_run
        from sweeps.sweep_plan import SweepError, print_flush

        assert self.config is not None and self.hydra_context is not None
        groups = self.jobs_by_shape(job_overrides, initial_job_idx)
        try:
            checked = time.monotonic()
            self.preflight(groups)
        except SweepError as err:
            terminate_parent_run(str(err), tracking_uri(self.config))
            raise
        submitting = time.monotonic()
        units = self.submit_synthesis([j for group in groups.values() for j in group])
        submitted = self.submit(groups, after=[job for _, job in units])
        print_flush(f"(SLURM checks {submitting - checked:.2f} s, submission {time.monotonic() - submitting:.2f} s)")
        if not self.params.get("wait", True):
            print_flush("not waiting (hydra.launcher.wait=false); follow them with squeue / sacct")
            return [JobReturn(overrides=list(j.overrides), status=JobStatus.COMPLETED, _return_value=job.job_id)
                    for j, job in submitted]
        self.wait_units(units, submitted)
        return self.collect(submitted)

    def jobs_by_shape(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> dict:
        """A POLAR sweep's jobs planned (the job table printed) and grouped by their shapes;
        another app's jobs composed, in one group of the launcher's own resources."""
        from sweeps.sweep_plan import group_by_shape, job_shape, job_table, print_flush

        if not is_polar_sweep(self.config):
            jobs = compose_jobs(self.hydra_context, self.config, job_overrides, initial_job_idx)
            return {plain_shape(self.params): jobs}
        start = time.monotonic()
        jobs = plan_jobs(self.hydra_context, self.config, job_overrides, initial_job_idx)
        print_flush(job_table(jobs) + f"\n(planned in {time.monotonic() - start:.2f} s)\n")
        return group_by_shape(jobs, lambda j: job_shape(j, **{k: self.params.get(k) for k in RESOURCE_KEYS}))

    def preflight(self, groups: dict) -> None:
        """SLURM answers and accepts every shape, or a SweepError before any submission."""
        from sweeps.sweep_plan import SweepError

        self.check_time_limits(groups)
        problem = slurm_problem(float(self.params.get("check_timeout_s", 15.0)))
        if problem:
            raise SweepError(f"SLURM is not reachable, so nothing was submitted: {problem}")
        if not self.params.get("test_only", True):
            return
        refused = []
        for shape, group in groups.items():
            try:
                out = subprocess.run(test_only_args(shape, self.params), capture_output=True, text=True,
                                     timeout=float(self.params.get("check_timeout_s", 15.0)), check=False)
            except subprocess.TimeoutExpired:
                refused.append(f"{shape.describe()}: sbatch --test-only did not answer")
                continue
            if out.returncode != 0:
                why = " ".join(out.stderr.split()) or f"exit {out.returncode}"
                refused.append(f"{shape.describe()} (jobs {' '.join(f'#{j.idx}' for j in group)}): {why}")
        if refused:
            raise SweepError("SLURM would not accept these resource requests, so nothing was submitted "
                             "(sbatch --test-only); set hydra.launcher.partition/account/qos/constraint, or "
                             "override hydra.launcher.timeout_min / max_timeout_min / mem_gb / gpus_per_node / "
                             "nodes:\n  " + "\n  ".join(refused))

    def check_time_limits(self, groups: dict) -> None:
        """Every job of a POLAR sweep can reach its end within its time limit and requeues,
        and checkpoint on the requeue signal in time (sweeps.sweep_plan.time_problems)."""
        from sweeps.sweep_plan import PlannedJob, SweepError, time_problems

        problems = [p for shape, group in groups.items() for job in group if isinstance(job, PlannedJob)
                    for p in time_problems(job, shape, int(self.params.get("max_num_timeout", 0)),
                                           float(self.params.get("signal_delay_s", 90)))]
        if problems:
            raise SweepError("SLURM's time limits would stop these jobs before their end, so nothing was "
                             "submitted:\n  " + "\n  ".join(problems))

    def executor(self):
        import submitit

        p = self.params
        ex = submitit.AutoExecutor(folder=p["submitit_folder"], cluster="slurm",
                                   slurm_max_num_timeout=p.get("max_num_timeout", 0))
        skip = set(RESOURCE_KEYS) | set(OWN_KEYS) | set(INIT_KEYS) | {"_target_"}
        ex.update_parameters(**{(k if k in BASE_KEYS else f"slurm_{k}"): v for k, v in p.items() if k not in skip})
        return ex

    # ------------------------------------------------------------------ synthesis first

    def submit_synthesis(self, jobs: list) -> list:
        """The units of work of every data set the sweep's jobs need that is not there yet
        (planned here, on the login node), as job arrays, one per resource shape:
        [(unit, submitit job)]. The sweep's jobs then wait for them (afterok)."""
        from sweeps.data_sets import estimate, needed, policy_sizes, prepare_units, unit_table
        from sweeps.sweep_plan import print_flush

        if not jobs or not is_polar_sweep(self.config):
            return []
        missing = [ds for ds in needed(jobs) if not ds.ready]
        if not missing:
            return []
        res = jobs[0].job.resources
        print_flush(unit_table(missing, res))
        submitted = []
        for ds in missing:
            shapes = {e.policy: self.unit_shape(e, res) for e in estimate(ds.data, policy_sizes(ds.data), res)}
            groups: dict = {}
            for unit in prepare_units(ds):
                groups.setdefault(shapes[unit.name], []).append(unit)
            for shape, group in groups.items():
                submitted += self.submit_units(ds, shape, group, submitted)
        return submitted

    def unit_shape(self, est, res):
        """The SLURM request of a policy's units (est: its sweeps.data_sets.UnitEstimate):
        the GPUs it needs and its time with the sweep's margin; an n-gram policy's unit runs
        on one CPU."""
        from sweeps.sweep_plan import Shape

        if not est.gpus or self.params.get("gpus_per_node") == 0:
            return Shape(1, 0, 1, 4, 60, 1)
        hours = est.gpu_hours / max(est.units, 1) / est.gpus
        minutes = int(math.ceil(hours * 60 * res.time_margin)) + 10
        if self.params.get("max_timeout_min"):
            minutes = min(minutes, self.params["max_timeout_min"])
        return Shape(1, est.gpus, 1, math.ceil(BF16_GB * (est.n_params or 0) / 1e9) + 16, minutes, None)

    def submit_units(self, ds, shape, group: list, before: list) -> list:
        from polar.synthesis import run_unit_task
        from sweeps.sweep_plan import SweepError, print_flush

        ex = self.executor()
        ex.update_parameters(**self.shape_resources(shape), name=f"polar-synth-{ds.name}")
        try:
            jobs = ex.map_array(run_unit_task, [str(ds.dir)] * len(group), [[u.key] for u in group])
        except Exception as err:
            for _, job in before:
                job.cancel(check=False)
            raise SweepError(f"submitting the synthesis units of data set {ds.name} failed: {err}; the "
                             f"{len(before)} unit jobs submitted before were cancelled") from err
        print_flush(f"  synthesis array {jobs[0].job_id.split('_')[0]}: {shape.describe()}: {len(group)} units "
                    f"of data set {ds.name} ({', '.join(sorted({u.name for u in group}))})")
        return list(zip(group, jobs))

    def wait_units(self, units: list, submitted: list) -> None:
        """Wait for the synthesis units; a unit that fails fails the sweep, naming its
        policy, shard and log (the jobs that depended on it are cancelled by SLURM)."""
        from sweeps.runs import terminate_parent_run
        from sweeps.sweep_plan import SweepFailed, print_flush

        if not units:
            return
        print_flush(f"Waiting for {len(units)} synthesis units first ...")
        failed = []
        for unit, job in units:
            try:
                job.result()
            except Exception as err:
                failed.append(f"unit {unit.key}: policy {unit.name!r}, shard {unit.split}-{unit.shard:05d}, SLURM "
                              f"job {job.job_id}: {_last_line(str(err))}\n    logs: {job.paths.stdout}  "
                              f"{job.paths.stderr}")
        if failed:
            for _, job in submitted:
                job.cancel(check=False)
            message = (f"{len(failed)} of {len(units)} synthesis units failed (the parts already written are "
                       "kept; the sweep's jobs were cancelled; run the sweep again to resume):\n  "
                       + "\n  ".join(failed))
            terminate_parent_run(message, tracking_uri(self.config))
            raise SweepFailed(message)
        print_flush(f"  {len(units)} synthesis units done")

    @staticmethod
    def shape_resources(shape) -> dict:
        resources = {"nodes": shape.nodes, "tasks_per_node": shape.tasks_per_node, "timeout_min": shape.timeout_min}
        if shape.mem_gb is not None:
            resources["mem_gb"] = shape.mem_gb
        if shape.gpus_per_node > 0:
            resources["gpus_per_node"] = shape.gpus_per_node
        if shape.cpus_per_task:
            resources["cpus_per_task"] = shape.cpus_per_task
        return resources

    # ------------------------------------------------------------------ the sweep's jobs

    def submit(self, groups: dict, after: Sequence = ()) -> list:
        """One job array per shape, each waiting for the jobs `after` (SLURM afterok; a
        failed one cancels it); on a failed submission, cancel what was submitted and raise."""
        from hydra.core.singleton import Singleton

        from sweeps.sweep_plan import SweepError, print_flush, varying_overrides

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        submitted: list = []
        everyone = [j for group in groups.values() for j in group]
        coords = dict(zip((j.idx for j in everyone), varying_overrides(everyone)))
        print_flush(f"Submitting {sum(map(len, groups.values()))} jobs as {len(groups)} SLURM job array"
                    f"{'s' * (len(groups) != 1)} (sweep dir {sweep_dir}):")
        dependency = {}
        if after:
            arrays = sorted({job.job_id.split("_")[0] for job in after})
            dependency = {"dependency": "afterok:" + ":".join(arrays), "kill-on-invalid-dep": "yes"}
        for shape, group in groups.items():
            ex = self.executor()
            ex.update_parameters(**self.shape_resources(shape))
            if dependency:
                ex.update_parameters(slurm_additional_parameters={**(self.params.get("additional_parameters") or {}),
                                                                  **dependency})
            state = Singleton.get_state()
            try:
                jobs = ex.map_array(self, [list(j.overrides) for j in group], ["hydra.sweep.dir"] * len(group),
                                    [j.idx for j in group], [f"job_id_for_{j.idx}" for j in group],
                                    [state] * len(group))
            except Exception as err:
                for _, job in submitted:
                    job.cancel(check=False)
                raise SweepError(f"submitting the job array for {shape.describe()} failed: {err}; "
                                 f"the {len(submitted)} jobs submitted before it were cancelled") from err
            array_id = jobs[0].job_id.split("_")[0]
            print_flush(f"  job array {array_id}: {shape.describe()}")
            for j, job in zip(group, jobs):
                print_flush(f"    #{j.idx} {j.name} -> {job.job_id}  {coords[j.idx]}  log {job.paths.stdout}")
                submitted.append((j, job))
        return sorted(submitted, key=lambda pair: pair[0].idx)   # results in the sweep's job order

    # ------------------------------------------------------------------ waiting

    def collect(self, submitted: list) -> list[JobReturn]:
        """Wait for every job; return their JobReturns, or raise SweepFailed naming each failure."""
        from sweeps.runs import terminate_parent_run
        from sweeps.sweep_plan import SweepFailed, print_flush, varying_overrides

        ids = " ".join(job.job_id for _, job in submitted)
        print_flush(f"Waiting for {len(submitted)} jobs ({ids}); Ctrl-C stops waiting, the jobs keep running.")
        try:
            outcomes = self.wait_all(submitted)
        except KeyboardInterrupt:
            print_flush(f"\nStopped waiting; the jobs keep running. Cancel them with: scancel {ids}")
            raise
        returns, failures = [], []
        coords = varying_overrides([planned for planned, _ in submitted])
        for (planned, job), (ret, failure), where in zip(submitted, outcomes, coords):
            returns.append(ret)
            if failure:
                failures.append(f"#{planned.idx} {planned.name}{f' ({where})' if where else ''}: SLURM job "
                                f"{job.job_id} {failure}\n"
                                f"    logs: {job.paths.stdout}  {job.paths.stderr}")
            else:
                print_flush(f"  #{planned.idx} {planned.name}: job {job.job_id} done, "
                            f"returned {ret.return_value!r}")
        if failures:
            message = (f"{len(failures)} of {len(submitted)} jobs of the sweep failed or were cancelled:\n  "
                       + "\n  ".join(failures))
            terminate_parent_run(message, tracking_uri(self.config))
            raise SweepFailed(message)
        return returns

    def wait_all(self, submitted: list) -> list[tuple[JobReturn, Optional[str]]]:
        poll = float(self.params.get("poll_s", 2.0))
        state_poll = float(self.params.get("state_poll_s", 30.0))
        outcomes: dict[int, tuple[JobReturn, Optional[str]]] = {}
        last_forced = time.monotonic()
        while len(outcomes) < len(submitted):
            time.sleep(poll)
            if time.monotonic() - last_forced > state_poll:
                submitted[0][1].watcher.update()   # one sacct call for every job
                last_forced = time.monotonic()
            for i, (planned, job) in enumerate(submitted):
                if i not in outcomes and job.done():
                    outcomes[i] = self.outcome(planned, job)
                    ok = outcomes[i][1] is None
                    print(f"  #{planned.idx} ({job.job_id}) {'finished' if ok else 'FAILED: ' + outcomes[i][1]}",
                          flush=True)
        return [outcomes[i] for i in range(len(submitted))]

    def outcome(self, planned, job) -> tuple[JobReturn, Optional[str]]:
        """(JobReturn, None) for a job that returned; (a FAILED JobReturn, why) otherwise."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        grace = float(self.params.get("result_grace_s", 3.0))
        deadline = time.monotonic() + grace
        while not job.paths.result_pickle.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        failed = JobReturn(overrides=list(planned.overrides), status=JobStatus.FAILED)
        if not job.paths.result_pickle.exists():
            state = job.watcher.get_state(job.job_id, mode="force")
            failed._return_value = UncompletedJobError(f"job {job.job_id} ended {state} without a result")
            return failed, f"ended {state} without a result"
        try:
            # a job of several tasks (one per GPU) trains one model: every task must end
            # well; rank 0's return is the job's, unless another task's failed
            rets = job.results() if job.num_tasks > 1 else [job.result()]
        except (FailedJobError, UncompletedJobError) as err:
            failed._return_value = err
            return failed, f"failed ({job.state}): {_last_line(str(err))}"
        ret = next((r for r in rets if isinstance(r, JobReturn) and r.status == JobStatus.FAILED), rets[0])
        if isinstance(ret, JobReturn) and ret.status == JobStatus.FAILED:
            err = ret._return_value
            return ret, f"raised {type(err).__name__}: {_last_line(str(err))}"
        return ret, None


def _last_line(text: str) -> str:
    """The last non-empty line of text (at most 500 characters)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""
