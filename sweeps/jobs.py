"""One job's life, the same for every stage: plan -> track (its MLflow run) -> build its
inputs (sweeps.stages) -> fit -> save the model.

The run key (a hash of every configuration value that changes the result) names the
run's folder and tags its MLflow run: a finished run is skipped, an interrupted one
resumes from its checkpoint into the same MLflow run. While a job writes its run folder,
rank 0 holds an exclusive lock on `.lock` in it (run_folder_lock, with tracking on or
off): the same run started again meanwhile is refused at once (RunLocked), never trained
twice; the lock dies with its process, so a killed job never blocks the next start.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path

from hydra.errors import CompactHydraException

from polar.model import ShapeCounts
from polar.names import RunParams
from sweeps.derive import Plan, local_refusal, passes_refusal, plan_run, synthesis_plan
from sweeps.runs import JobRun, git_sha, sweep_id
from sweeps.schema import JobConfig
from sweeps.stages import Measured, stage_of

WAIT_FOR_REQUEUE_S = 600                    # how long ranks > 0 wait for rank 0's requeue to end them
PROGRESS_LINE_ENV = "POLAR_PROGRESS_LINE"   # the terminal line of this job's progress bar (parallel jobs)
LOCK_FILE = ".lock"                         # in the run folder: held (flock) by the job writing it


class RunLocked(CompactHydraException, RuntimeError):
    """The job's run folder is being written by another job (its lock is held): refused
    before anything is read or written. Printed as its message alone, without a traceback."""


def plan_of(job: JobConfig, measured: Measured | None = None, counts: ShapeCounts | None = None) -> Plan:
    """The job's plan (pure). `measured`: the real data's lengths, for stages that have
    them (fine-tuning; see plan_job); without a budget, such a job trains one epoch, and a
    preset with POLAR's own budget (model.paper_tokens) trains that. `counts`: a
    checkpoint's real parameter counts (a pre-trained backbone)."""
    if job.stage == "synthesize":
        return _synthesis_plan(job)
    tokens, flops, lengths = job.budget.tokens, job.budget.flops, None
    if measured is not None:
        lengths = (measured.seq_len, measured.tokens_per_triplet)
        if tokens is None and flops is None:
            tokens = measured.n_triplets * measured.tokens_per_triplet
    if tokens is None and flops is None:
        tokens = job.model.paper_tokens
    if job.recipe.needs_backbone and not job.model.init_from:
        raise ValueError(f"recipe={job.recipe.name} assumes a pre-trained backbone (its LR law depends on the "
                         f"backbone's pre-training tokens Dp), but model={job.model.name} starts from random "
                         "weights (no model.init_from; Dp would be 0): give model.init_from=DIR, or use recipe=fixed")
    plan = plan_run(job.model, job.data, job.train, tokens, flops, job.recipe, job.resources, lengths=lengths,
                    counts=counts, n_triplets=measured.n_triplets if measured is not None else None)
    if job.stage == "pretrain" and (refusal := passes_refusal(plan, job.data.max_epochs)):
        raise ValueError(refusal)
    return plan


def _synthesis_plan(job: JobConfig) -> Plan:
    from sweeps.data_sets import estimate, policy_sizes, refusal

    est = estimate(job.data, policy_sizes(job.data), job.resources)
    if reason := refusal(est, job.resources):
        raise ValueError(reason)
    return synthesis_plan(job.data, sum(e.tokens for e in est), sum(e.gpu_hours for e in est))


def plan_job(job: JobConfig, dry: bool = False) -> Plan:
    """Check the stage's inputs, measure what the plan needs from them, and plan. Inputs
    that are not on disk refuse the job, except in a dry run (`dry`), which plans from the
    configuration alone (the preset's shape, the budget)."""
    stage = stage_of(job)
    missing = stage.missing(job)
    if missing and not dry:
        raise ValueError("; ".join(missing) + " (the dry run, hydra/launcher=dryrun, plans without it)")
    if missing:
        return plan_of(job)
    stage.check(job)
    return plan_of(job, stage.measure(job), stage.counts(job))


# Config fields added after runs were made, each with the value at which training is as it
# was before the field existed ("section.field": value). At that value a field stays out of
# the run key, so a run that finished before the field was added is found again after an
# upgrade instead of being trained again. tests/test_run_key.py holds every field the key
# hashes and fails on a new one until it is listed here or, when its default changes
# training, accepted there (then every earlier run trains again).
KEY_NEUTRAL: dict[str, object] = {}


def key_values(job: JobConfig) -> dict:
    """What the run key hashes: model, data, training, budget, recipe, seed (and, for
    fine-tuning, the preference files' contents and the starting model), less the fields
    at their KEY_NEUTRAL value. Not: tracking, paths, resources, CPU threads, how ranks
    share the model (parallel)."""
    train = {k: v for k, v in asdict(job.train).items() if k not in ("threads", "parallel", "data_workers",
                                                                       "checkpoint_every_min", "compile")}
    data = {k: v for k, v in asdict(job.data).items() if k != "max_epochs"}   # bounds the plan, not the result
    blob = {"model": asdict(job.model), "data": data, "train": train,
            "budget": asdict(job.budget), "recipe": {"name": job.recipe.name, **asdict(job.recipe)},
            "seed": job.seed, **stage_of(job).key_extras(job)}
    absent = object()
    return {section: {k: v for k, v in values.items() if KEY_NEUTRAL.get(f"{section}.{k}", absent) != v}
            if isinstance(values, dict) else values for section, values in blob.items()}


def run_key(job: JobConfig) -> str:
    """The hash of key_values(job): a run's identity, its folder's name and its MLflow tag."""
    return hashlib.sha256(json.dumps(key_values(job), sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_name(job: JobConfig, plan: Plan) -> str:
    budget = f"C{plan.compute:.2g}" if job.budget.flops is not None else f"T{plan.tokens:.2g}"
    return f"polar-{job.model.name}{stage_of(job).suffix}-{budget.replace('+', '')}-s{job.seed}"


def run_params(job: JobConfig, plan: Plan, key: str, data_id: str) -> RunParams:
    """The run parameters of DESIGN.md's contract, as logged to MLflow."""
    return RunParams(model=plan.model, n_params=plan.n_params, n_params_nonembed=plan.n_params_nonembed,
                     flops_per_token=plan.flops_per_token, tokens=plan.tokens, compute=plan.compute, lr=plan.lr,
                     batch_size=plan.batch_size, seq_len=plan.seq_len, seed=job.seed, steps=plan.steps,
                     data_id=data_id, run_key=key, sweep_id=sweep_id(),
                     git_sha=git_sha(), stage=job.stage, init_from=stage_of(job).init_from(job),
                     backbone_tokens=job.model.backbone_tokens or getattr(job.recipe, "backbone_tokens", None))


def run_job(job: JobConfig, job_index: str = "", plan: Plan | None = None) -> dict:
    """Train one point of a sweep (or skip it when its run already finished). Started as
    several processes (torchrun, or one SLURM task per GPU), the ranks train one model
    together: rank 0 owns the MLflow run, the metrics, the checkpoint and the model.
    `plan`: plan_job(job), where the caller has made it already."""
    import torch

    from polar.distributed import dist_env, init_distributed, shutdown

    if job.train.threads > 0:
        torch.set_num_threads(job.train.threads)
    if job.stage == "synthesize":
        return synthesize_job(job, job_index)
    plan, key = plan or plan_job(job), run_key(job)
    name = run_name(job, plan)
    run_dir = Path(job.paths.runs_dir) / key
    env = dist_env()
    if env.is_main:
        print(f"[job {job_index}] {name}: N={plan.n_params:,} tokens={plan.tokens:.3g} "
              f"C={plan.compute:.3g} steps={plan.steps} lr={plan.lr:.3g} run_dir={run_dir}"
              + (f" ranks={env.world_size} ({plan.parallel})" if env.distributed else ""), flush=True)
    if not torch.cuda.is_available() and (reason := local_refusal(plan, job.resources)):
        raise RuntimeError(reason)
    with ExitStack() as held:
        if env.is_main:                     # ranks > 0 do not write the folder
            held.enter_context(run_folder_lock(run_dir, key, name))
        owns_group = env.distributed and not torch.distributed.is_initialized()
        init_distributed(env)
        try:
            return _run_ranks(job, plan, key, name, run_dir, env, job_index)
        finally:
            if owns_group:
                shutdown()


@contextmanager
def run_folder_lock(run_dir: Path, key: str, name: str = ""):
    """An exclusive flock on run_dir/.lock (the folder made first) for as long as the
    context lasts, with the holder's pid, host and start time written in it; another
    holder makes it raise RunLocked at once. The kernel releases the lock when the
    process ends, however it ends. A file system without flock support only gets a note."""
    import fcntl
    import socket

    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(_locked_message(run_dir, key, name, _lock_holder(fd))) from None
        except OSError as err:
            print(f"note: cannot lock {run_dir / LOCK_FILE} ({err}); nothing stops a second job from writing "
                  "this run folder at the same time: start each run once", flush=True)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        yield
    finally:
        os.close(fd)                        # releases the lock


def _lock_holder(fd: int, wait_s: float = 2.0) -> dict:
    """What the lock's holder wrote in it: its pid, host and start time, which it writes just
    after taking the lock, so an empty or partly written file is read again for up to wait_s;
    {} when there is still nothing readable."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            holder = {}
        if (isinstance(holder, dict) and holder) or time.monotonic() >= deadline:
            return holder if isinstance(holder, dict) else {}
        time.sleep(0.05)


def _locked_message(run_dir: Path, key: str, name: str, holder: dict) -> str:
    who = (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {holder.get('since', '?')})"
           if holder else "another process")
    stop = f"stop it (kill {holder['pid']} on {holder.get('host', 'its host')})" if holder.get("pid") else "stop it"
    return (f"run {name or key} (run key {key}) is being written by another job: {who} holds the lock "
            f"{run_dir / LOCK_FILE} on its run folder {run_dir}, and two jobs must never train one run folder. "
            f"Wait for that job to end (then run this command again: a finished run is skipped), or {stop} and "
            "run this command again: the run resumes from its last checkpoint.")


def _run_ranks(job: JobConfig, plan: Plan, key: str, name: str, run_dir: Path, env, job_index: str) -> dict:
    from polar.distributed import broadcast_object, failures_end_the_job, on_main
    from polar.trainer import Preempted

    job_run = on_main(lambda: JobRun.open(job, key, name, run_dir), env)
    finished = broadcast_object((job_run.finished, job_run.final_loss) if env.is_main else None)
    if finished[0]:
        if env.is_main:
            print(f"[job {job_index}] {name}: finished earlier (run {job_run.run_id}); skipped", flush=True)
        return {"run_key": key, "skipped": True, "val_loss": finished[1]}
    previous, requeue = _fail_on_sigterm(), RequeueSignal.install()
    try:
        with failures_end_the_job(env, on_failure=_record_failure(job_run)):
            result = _train(job, plan, key, name, run_dir, job_run, env, stop=requeue and requeue.requested)
    except Preempted as stopped:
        _hand_over(requeue, stopped, job_run, env)
        raise
    except BaseException as err:
        if job_run is not None:
            job_run.fail(err)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if requeue is not None:
            requeue.restore()
    return {"run_key": key, "skipped": False, "val_loss": result.val_loss}


def _record_failure(job_run: JobRun | None):
    """What rank 0 does when another rank failed: end its run FAILED with that reason."""
    if job_run is None:
        return None
    return lambda reason: job_run.fail(RuntimeError(reason))


def _hand_over(requeue: "RequeueSignal", stopped: BaseException, job_run: JobRun | None, env) -> None:
    """After a checkpoint on the requeue signal: submitit requeues the job and exits
    (SystemExit on rank 0); the run then waits as SCHEDULED. Anything else (too many
    time-outs, say) ends the run FAILED."""
    if env.is_main:
        print(f"{stopped} (on signal {requeue.signum}); requeueing", flush=True)
    try:
        requeue.hand_over(env)
    except SystemExit:
        if job_run is not None:
            job_run.requeued(stopped)
        raise
    except BaseException as err:
        if job_run is not None:
            job_run.fail(err)
        raise


class RequeueSignal:
    """Under submitit on SLURM: the signal that announces the time limit or a preemption
    (USR2) no longer interrupts a training step. Training stops at the end of the step
    with a checkpoint of it (polar.trainer.fit's `stop`), then submitit's own handler
    requeues the job, which resumes from that step."""

    def __init__(self, signum: int, previous):
        self.signum, self.previous, self.received = signum, previous, None

    @classmethod
    def install(cls) -> "RequeueSignal | None":
        import threading

        if not os.environ.get("SLURM_JOB_ID") or threading.current_thread() is not threading.main_thread():
            return None
        import submitit

        signum = submitit.JobEnvironment._usr_sig()
        previous = signal.getsignal(signum)
        if not callable(previous):              # not started by submitit: nothing to hand over to
            return None
        self = cls(signum, previous)
        signal.signal(signum, self._receive)
        return self

    def _receive(self, signum, frame) -> None:
        self.received = (signum, frame)

    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        signal.signal(self.signum, self.previous)

    def hand_over(self, env) -> None:
        """submitit's handler: on rank 0 it requeues the job and exits; on the other ranks
        it returns, and they wait for the requeue to end them (exiting first would make
        srun end rank 0 before it has requeued), at most WAIT_FOR_REQUEUE_S."""
        import time

        self.restore()
        # all ranks stop together (any_rank): this one may not have received the signal yet
        self.previous(*(self.received or (self.signum, None)))
        deadline = time.monotonic() + WAIT_FOR_REQUEUE_S
        while not env.is_main and time.monotonic() < deadline:
            time.sleep(5)
        raise SystemExit(f"rank {env.rank}: stopped for a requeue that did not come within {WAIT_FOR_REQUEUE_S} s")


def _fail_on_sigterm():
    """Outside SLURM (whose SIGTERM submitit handles for preemption), a SIGTERM (kill,
    systemd, a closed session) ends the job through its failure path, so that its run is
    marked FAILED with the reason at once. Returns the handler it replaced, or None."""
    import threading

    if os.environ.get("SLURM_JOB_ID") or threading.current_thread() is not threading.main_thread():
        return None

    def terminated(signum, frame):
        raise SystemExit(f"terminated by SIGTERM (signal {signum}); resume by running the sweep again")

    return signal.signal(signal.SIGTERM, terminated)


def _train(job: JobConfig, plan: Plan, key: str, name: str, run_dir: Path, job_run: JobRun | None, env,
           stop=None):
    from polar.distributed import device_for, on_main, shard_from_rank0, wrap_model
    from polar.model import set_attention
    from polar.packing import attention_for
    from polar.sinks import NullSink
    from polar.trainer import fit

    stage = stage_of(job)
    sharded = plan.parallel == "fsdp" and env.distributed    # only rank 0 builds the whole model
    # rank 0 synthesizes (or reads) the shared data first, then the others read it
    built = on_main(lambda: stage.inputs(job), env)
    inputs = built if env.is_main else stage.inputs(job, with_model=not sharded)
    params = run_params(job, plan, key, inputs.data_id).as_dict()
    on_main(lambda: job_run.start(params), env)
    train_cfg = job.train.for_trainer(plan.lr, plan.batch_size)
    train_cfg.activation_checkpointing = plan.activation_checkpointing or bool(job.train.activation_checkpointing)
    device = device_for(env, job.train.device)
    attention, dtype = attention_for(device, train_cfg.packing), fsdp_param_dtype(job, device)
    if sharded:       # every rank materialises only its shards, filled from rank 0's model
        model = shard_from_rank0(set_attention(inputs.model, attention) if env.is_main else None, env, device,
                                 dtype)
    else:
        model = wrap_model(set_attention(inputs.model.to(device), attention), plan.parallel, env, param_dtype=dtype)
    line = os.environ.get(PROGRESS_LINE_ENV)   # set by the local launcher when jobs run side by side
    result = fit(model, inputs.train, inputs.val, inputs.special, train_cfg, plan.steps,
                 plan.flops_per_token, run_dir, job_run.sink if job_run is not None else NullSink(), desc=name,
                 position=int(line) if line is not None else None, env=env, stop=stop,
                 peak_flops=job.resources.gpu_peak_flops if device.type == "cuda" else None)
    model_dir = run_dir / "model"
    save_model(model, inputs.tokenizer, model_dir, env)
    on_main(lambda: job_run.complete(result, model_dir, log_model=plan.n_params < 1e9), env)
    return result


def fsdp_param_dtype(job: JobConfig, device):
    """FSDP2's compute dtype: bf16 on GPUs (train.dtype auto or bfloat16; the master weights
    and AdamW stay fp32), None (fp32) elsewhere."""
    import torch

    bf16 = job.train.dtype == "bfloat16" or (job.train.dtype == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else None


def save_model(model, tokenizer, model_dir: Path, env) -> None:
    """The trained model in the Hugging Face folder format, tokenizer beside it, written
    by rank 0 from the unsharded weights (gathering them is a collective); the folder
    appears whole or not at all."""
    from polar.atomic import atomic_path
    from polar.distributed import full_state_dict, on_main, unwrap

    state = full_state_dict(model, rank0_only=True) if env.distributed else None

    def write():
        with atomic_path(model_dir) as tmp:
            unwrap(model).save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)

    on_main(write, env)


def finished_locally(job: JobConfig) -> bool:
    """Whether the job's run folder says that it finished (its metrics.jsonl ends
    FINISHED); run_job still asks MLflow, this only spares such a job a worker process."""
    from polar.names import METRICS_FILE
    from polar.sinks import read_jsonl

    return read_jsonl(Path(job.paths.runs_dir) / run_key(job) / METRICS_FILE).status == "FINISHED"


def synthesize_job(job: JobConfig, job_index: str = "") -> dict:
    """`stage=synthesize`: the job's data set, made here (plan, the units not done yet,
    assemble), or found; after SLURM's unit arrays only the assembling is left."""
    from polar.inputs import synthesized_data

    _, where, manifest = synthesized_data(job.data, job.model, job.paths.cache_dir)
    print(f"[job {job_index}] data set {manifest['data_id']} in {where}", flush=True)
    return {"run_key": manifest["data_id"], "skipped": False, "val_loss": None}
