"""One job's life: plan, find or create its MLflow run, build data and model, train, log.

The run key (a hash of every configuration value that changes the result) names the
run's folder and tags its MLflow run: a finished run is skipped, an interrupted one
resumes from its checkpoint into the same MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from sweeps.derive import Plan, local_refusal, plan_run
from sweeps.schema import JobConfig
from sweeps.tracker import ENV_SWEEP_ID, Tracker, git_sha

PROGRESS_LINE_ENV = "POLAR_PROGRESS_LINE"   # the terminal line of this job's progress bar (parallel jobs)


def plan_of(job: JobConfig) -> Plan:
    return plan_run(job.model, job.data, job.train, job.budget.tokens, job.budget.flops,
                    job.recipe, job.train.backbone_tokens, job.resources)


def run_key(job: JobConfig) -> str:
    """Hash of what changes the result: model, data, training, budget, recipe, seed.
    Not: tracking, paths, resources, CPU threads."""
    train = {k: v for k, v in asdict(job.train).items() if k != "threads"}
    blob = {"model": asdict(job.model), "data": asdict(job.data), "train": train,
            "budget": asdict(job.budget), "recipe": job.recipe, "seed": job.seed}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_name(job: JobConfig, plan: Plan) -> str:
    budget = f"C{plan.compute:.2g}" if job.budget.flops is not None else f"T{plan.tokens:.2g}"
    return f"polar-{job.model.name}-{budget.replace('+', '')}-s{job.seed}"


def run_params(job: JobConfig, plan: Plan, key: str, data_id: str) -> dict:
    """The run parameters of DESIGN.md's contract, as logged to MLflow."""
    return {"model": plan.model, "n_params": plan.n_params, "n_params_nonembed": plan.n_params_nonembed,
            "flops_per_token": plan.flops_per_token, "tokens": plan.tokens, "compute": plan.compute,
            "lr": plan.lr, "batch_size": plan.batch_size, "seq_len": plan.seq_len, "seed": job.seed,
            "steps": plan.steps, "data_id": data_id, "run_key": key,
            "sweep_id": os.environ.get(ENV_SWEEP_ID, "none"), "git_sha": git_sha(),
            "flops_convention": "6N+12LdS fwd+bwd (PaLM)"}


def run_job(job: JobConfig, job_index: str = "") -> dict:
    """Train one point of a sweep (or skip it when its run already finished)."""
    import torch

    if job.train.threads > 0:
        torch.set_num_threads(job.train.threads)
    plan, key = plan_of(job), run_key(job)
    name = run_name(job, plan)
    run_dir = Path(job.paths.runs_dir) / key
    print(f"[job {job_index}] {name}: N={plan.n_params:,} tokens={plan.tokens:.3g} "
          f"C={plan.compute:.3g} steps={plan.steps} lr={plan.lr:.3g} run_dir={run_dir}", flush=True)
    if not torch.cuda.is_available() and (reason := local_refusal(plan, job.resources)):
        raise RuntimeError(reason)
    tracker = Tracker.open(job, key, name, run_dir)
    if tracker.finished:
        print(f"[job {job_index}] {name}: finished earlier (run {tracker.run_id}); skipped", flush=True)
        return {"run_key": key, "skipped": True, "val_loss": tracker.final_loss}
    try:
        result = _train(job, plan, key, name, run_dir, tracker)
    except BaseException as err:
        tracker.fail(err)
        raise
    return {"run_key": key, "skipped": False, "val_loss": result.val_loss}


def _train(job: JobConfig, plan: Plan, key: str, name: str, run_dir: Path, tracker: Tracker):
    import torch

    from polar.model import build_model
    from polar.trainer import fit

    data = prepare_data(job)
    tracker.start(run_params(job, plan, key, data["data_id"]))
    torch.manual_seed(job.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(job.model, bos_token_id=data["special"]["bos"], pad_token_id=data["special"]["pad"],
                        reward_token_id=data["special"]["reward"], sep_token_id=data["special"]["sep"]).to(device)
    train_cfg = replace(job.train, lr=plan.lr, batch_size=plan.batch_size)   # the plan's recipe decides
    line = os.environ.get(PROGRESS_LINE_ENV)   # set by the local launcher when jobs run side by side
    result = fit(model, data["train"], data["val"], data["special"], train_cfg, plan.steps,
                 plan.flops_per_token, run_dir, tracker.sink, desc=name,
                 position=int(line) if line is not None else None)
    model_dir = run_dir / "model"
    model.save_pretrained(model_dir)
    data["tokenizer"].save_pretrained(model_dir)
    tracker.complete(result, model_dir, log_model=plan.n_params < 1e9)
    return result


def prepare_data(job: JobConfig) -> dict:
    """Tokenizer, synthesized data (cached by content) and its token ids."""
    from polar.data import tokenize_triplets
    from polar.synthesis import read_split
    from polar.tokenizer import special_ids

    tok, data_dir, manifest = synthesized(job)
    return {"tokenizer": tok, "special": special_ids(tok), "data_id": manifest["data_id"],
            "train": tokenize_triplets(read_split(data_dir, "train"), tok),
            "val": tokenize_triplets(read_split(data_dir, "val"), tok)}


def prepare_shared_data(jobs: list[JobConfig]) -> None:
    """Train the tokenizers and synthesize the data sets of a sweep's jobs, each once
    (before jobs that share them start at the same time)."""
    seen = set()
    for job in jobs:
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
