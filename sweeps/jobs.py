"""One job's life: plan, find or create its MLflow run, build data and model, train, log.

The run key (a hash of every configuration value that changes the result) names the
run's folder and tags its MLflow run: a finished run is skipped, an interrupted one
resumes from its checkpoint into the same MLflow run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
from dataclasses import asdict, replace
from pathlib import Path

from polar.names import RunParams
from sweeps.derive import Plan, local_refusal, plan_run
from sweeps.runs import ENV_SWEEP_ID, JobRun, git_sha
from sweeps.schema import JobConfig

WAIT_FOR_REQUEUE_S = 600                    # how long ranks > 0 wait for rank 0's requeue to end them
PROGRESS_LINE_ENV = "POLAR_PROGRESS_LINE"   # the terminal line of this job's progress bar (parallel jobs)


def plan_of(job: JobConfig) -> Plan:
    if job.stage == "finetune":
        return _plan_finetune(job)
    return plan_run(job.model, job.data, job.train, job.budget.tokens, job.budget.flops,
                    job.recipe, job.train.backbone_tokens, job.resources)


def run_key(job: JobConfig) -> str:
    """Hash of what changes the result: model, data, training, budget, recipe, seed (and,
    for fine-tuning, the preference files' contents and the starting model).
    Not: tracking, paths, resources, CPU threads, how ranks share the model (parallel)."""
    train = {k: v for k, v in asdict(job.train).items() if k not in ("threads", "parallel")}
    blob = {"model": asdict(job.model), "data": asdict(job.data), "train": train,
            "budget": asdict(job.budget), "recipe": job.recipe, "seed": job.seed}
    if job.stage == "finetune":
        blob["finetune"] = {**asdict(job.finetune), "data_id": finetune_data_id(job),
                            "init_from": _model_identity(job.finetune.init_from)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_name(job: JobConfig, plan: Plan) -> str:
    budget = f"C{plan.compute:.2g}" if job.budget.flops is not None else f"T{plan.tokens:.2g}"
    stage = "-ft" if job.stage == "finetune" else ""
    return f"polar-{job.model.name}{stage}-{budget.replace('+', '')}-s{job.seed}"


# ------------------------------------------------------------------ stage=finetune

def _check_init_from(job: JobConfig) -> Path:
    """The starting model directory, checked against the `model` preset's shape."""
    path = Path(job.finetune.init_from)
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"finetune.init_from={str(path)!r} is not a POLAR model directory (no config.json); "
                         "give a pre-training run's model folder, e.g. outputs/runs/<run key>/model")
    saved = json.loads(config.read_text())
    shape = {"hidden_size": job.model.hidden_size, "num_hidden_layers": job.model.num_layers,
             "num_attention_heads": job.model.num_heads, "num_key_value_heads": job.model.num_kv_heads,
             "intermediate_size": job.model.intermediate_size, "vocab_size": job.model.vocab_size}
    differ = {k: (saved.get(k), v) for k, v in shape.items() if saved.get(k) != v}
    if differ:
        raise ValueError(f"finetune.init_from={str(path)!r} does not have the shape of model={job.model.name!r}: "
                         + ", ".join(f"{k} {a} (saved) != {b} (preset)" for k, (a, b) in differ.items())
                         + "; pick the preset the model was pre-trained with")
    return path


def _finetune_data(job: JobConfig):
    """(tokenizer, train, val) of a fine-tuning job, read and tokenized once per process
    (planning and training both need them)."""
    ft = job.finetune
    return _preference_data(str(_check_init_from(job)), ft.train_path, ft.val_path, ft.val_fraction, job.seed,
                            ft.wrapper)


@functools.lru_cache(maxsize=8)
def _preference_data(init_from, train_path, val_path, val_fraction, seed, wrapper):
    from polar.finetune import preference_data
    from polar.template import Layout

    return preference_data(init_from, train_path, val_path, val_fraction, seed, Layout(wrapper=wrapper))


def _plan_finetune(job: JobConfig) -> Plan:
    """The plan from the preference data's real lengths; one epoch unless a budget is given."""
    _, train, _ = _finetune_data(job)
    per_triplet = float((train.packed_tokens() if job.train.packing else train.naive_tokens()).mean())
    lengths = (float(train.naive_tokens().mean()) / 2, per_triplet)
    tokens, flops = job.budget.tokens, job.budget.flops
    if tokens is None and flops is None:
        tokens = len(train) * per_triplet
    return plan_run(job.model, job.data, job.train, tokens, flops, job.recipe, job.train.backbone_tokens,
                    job.resources, lengths=lengths)


def finetune_data_id(job: JobConfig) -> str:
    """Content hash of the preference files (train, and val when given)."""
    h = hashlib.sha256()
    for path in (job.finetune.train_path, job.finetune.val_path):
        if path is not None:
            try:
                h.update(Path(path).read_bytes())
            except OSError as err:
                raise ValueError(f"cannot read preference file {path!r}: {err.strerror}") from None
    return h.hexdigest()[:16]


def _model_identity(path: str) -> dict:
    """Which starting model: its folder, and size and mtime of its weights (cheap to take
    for a 7B model, unlike a hash)."""
    weights = sorted(Path(path).glob("*.safetensors"))
    return {"path": str(Path(path).resolve()),
            "weights": [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]}


def _finetune_inputs(job: JobConfig, plan: Plan) -> tuple:
    from polar.model import load_model
    from polar.tokenizer import special_ids

    tokenizer, train, val = _finetune_data(job)
    model = load_model(_check_init_from(job))
    return model, {"tokenizer": tokenizer, "special": special_ids(tokenizer), "train": train, "val": val,
                   "data_id": finetune_data_id(job)}


def run_params(job: JobConfig, plan: Plan, key: str, data_id: str) -> RunParams:
    """The run parameters of DESIGN.md's contract, as logged to MLflow."""
    finetune = job.stage == "finetune"
    return RunParams(model=plan.model, n_params=plan.n_params, n_params_nonembed=plan.n_params_nonembed,
                     flops_per_token=plan.flops_per_token, tokens=plan.tokens, compute=plan.compute, lr=plan.lr,
                     batch_size=plan.batch_size, seq_len=plan.seq_len, seed=job.seed, steps=plan.steps,
                     data_id=data_id, run_key=key, sweep_id=os.environ.get(ENV_SWEEP_ID, "none"),
                     git_sha=git_sha(), stage=job.stage,
                     init_from=str(Path(job.finetune.init_from).resolve()) if finetune else None)


def run_job(job: JobConfig, job_index: str = "") -> dict:
    """Train one point of a sweep (or skip it when its run already finished). Started as
    several processes (torchrun, or one SLURM task per GPU), the ranks train one model
    together: rank 0 owns the MLflow run, the metrics, the checkpoint and the model."""
    import torch

    from polar.distributed import dist_env, init_distributed, shutdown

    if job.train.threads > 0:
        torch.set_num_threads(job.train.threads)
    plan, key = plan_of(job), run_key(job)
    name = run_name(job, plan)
    run_dir = Path(job.paths.runs_dir) / key
    env = dist_env()
    if env.is_main:
        print(f"[job {job_index}] {name}: N={plan.n_params:,} tokens={plan.tokens:.3g} "
              f"C={plan.compute:.3g} steps={plan.steps} lr={plan.lr:.3g} run_dir={run_dir}"
              + (f" ranks={env.world_size} ({plan.parallel})" if env.distributed else ""), flush=True)
    if not torch.cuda.is_available() and (reason := local_refusal(plan, job.resources)):
        raise RuntimeError(reason)
    owns_group = env.distributed and not torch.distributed.is_initialized()
    init_distributed(env)
    try:
        return _run_ranks(job, plan, key, name, run_dir, env, job_index)
    finally:
        if owns_group:
            shutdown()


def _run_ranks(job: JobConfig, plan: Plan, key: str, name: str, run_dir: Path, env, job_index: str) -> dict:
    from polar.distributed import broadcast_object, on_main
    from polar.trainer import Preempted

    job_run = on_main(lambda: JobRun.open(job, key, name, run_dir), env)
    finished = broadcast_object((job_run.finished, job_run.final_loss) if env.is_main else None)
    if finished[0]:
        if env.is_main:
            print(f"[job {job_index}] {name}: finished earlier (run {job_run.run_id}); skipped", flush=True)
        return {"run_key": key, "skipped": True, "val_loss": finished[1]}
    previous, requeue = _fail_on_sigterm(), RequeueSignal.install()
    try:
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


def _pretrain_inputs(job: JobConfig, plan: Plan) -> tuple:
    import torch

    from polar.model import build_model

    data = prepare_data(job)
    torch.manual_seed(job.seed)
    model = build_model(job.model, bos_token_id=data["special"]["bos"], pad_token_id=data["special"]["pad"],
                        reward_token_id=data["special"]["reward"], sep_token_id=data["special"]["sep"])
    return model, data


def _train(job: JobConfig, plan: Plan, key: str, name: str, run_dir: Path, job_run: JobRun | None, env,
           stop=None):
    from polar.distributed import device_for, on_main, wrap_model
    from polar.model import set_attention
    from polar.packing import attention_for
    from polar.sinks import NullSink
    from polar.trainer import fit

    inputs = _finetune_inputs if job.stage == "finetune" else _pretrain_inputs
    # rank 0 synthesizes (or reads) the shared data first, then the others read it
    built = on_main(lambda: inputs(job, plan), env)
    model, data = built if env.is_main else inputs(job, plan)
    params = run_params(job, plan, key, data["data_id"]).as_dict()
    on_main(lambda: job_run.start(params), env)
    train_cfg = replace(job.train, lr=plan.lr, batch_size=plan.batch_size, parallel=plan.parallel)
    device = device_for(env)
    model = set_attention(model.to(device), attention_for(device, train_cfg.packing))
    model = wrap_model(model, plan.parallel, env)
    line = os.environ.get(PROGRESS_LINE_ENV)   # set by the local launcher when jobs run side by side
    result = fit(model, data["train"], data["val"], data["special"], train_cfg, plan.steps,
                 plan.flops_per_token, run_dir, job_run.sink if job_run is not None else NullSink(), desc=name,
                 position=int(line) if line is not None else None, env=env, stop=stop,
                 peak_flops=job.resources.gpu_peak_flops if device.type == "cuda" else None)
    model_dir = run_dir / "model"
    save_model(model, data["tokenizer"], model_dir, env)
    on_main(lambda: job_run.complete(result, model_dir, log_model=plan.n_params < 1e9), env)
    return result


def save_model(model, tokenizer, model_dir: Path, env) -> None:
    """The trained model in the Hugging Face folder format, tokenizer beside it, written
    by rank 0 from the unsharded weights (gathering them is a collective)."""
    from polar.distributed import full_state_dict, on_main, unwrap

    state = full_state_dict(model, rank0_only=True) if env.distributed else None

    def write():
        unwrap(model).save_pretrained(model_dir, state_dict=state)
        tokenizer.save_pretrained(model_dir)

    on_main(write, env)


def prepare_data(job: JobConfig) -> dict:
    """Tokenizer, synthesized data (cached by content) and its token ids."""
    from polar.data import tokenize_triplets
    from polar.synthesis import read_split
    from polar.tokenizer import special_ids

    tok, data_dir, manifest = synthesized(job)
    return {"tokenizer": tok, "special": special_ids(tok), "data_id": manifest["data_id"],
            "train": tokenize_triplets(read_split(data_dir, "train"), tok),
            "val": tokenize_triplets(read_split(data_dir, "val"), tok)}


def finished_locally(job: JobConfig) -> bool:
    """Whether the job's run folder says that it finished (its metrics.jsonl ends
    FINISHED); run_job still asks MLflow, this only spares such a job a worker process."""
    from polar.sinks import read_jsonl
    from sweeps.runs import METRICS_FILE

    return read_jsonl(Path(job.paths.runs_dir) / run_key(job) / METRICS_FILE).status == "FINISHED"


def prepare_shared_data(jobs: list[JobConfig]) -> None:
    """Train the tokenizers and synthesize the data sets of a sweep's jobs, each once
    (before jobs that share them start at the same time)."""
    seen = set()
    for job in jobs:
        if job.stage != "pretrain":
            continue
        key = (json.dumps(asdict(job.data), sort_keys=True, default=str), job.paths.cache_dir)
        if key not in seen:
            seen.add(key)
            synthesized(job)


def synthesized(job: JobConfig):
    """(tokenizer, data folder, manifest) of a job's data, built when not cached yet."""
    from polar.synthesis import config_key, synthesize
    from polar.tokenizer import cached_bpe, load_tokenizer

    cache = Path(job.paths.cache_dir)
    if job.data.tokenizer == "bpe":
        tok = cached_bpe(job.data.corpus, job.data.vocab_size, cache)
        tok_id = f"bpe-{job.data.vocab_size}-{'-'.join(job.data.corpus)}"
    else:
        tok, tok_id = load_tokenizer(job.data.tokenizer), str(Path(job.data.tokenizer).resolve())
    if len(tok) > job.model.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but model.vocab_size={job.model.vocab_size}; "
                         "use a model preset with a vocabulary at least as large")
    data_dir = cache / "data" / config_key(job.data, tok_id)
    return tok, data_dir, synthesize(job.data, tok, data_dir)   # reads the manifest when the data set exists
